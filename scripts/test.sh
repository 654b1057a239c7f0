#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh Debian machine, builds the
# workspace once (one profile for binaries and tests), and runs every test: the Rust tests, then
# the Python end-to-end tests of the data plane (tests/py: real clusters, real MCP servers, the
# Python SDK in both protocol eras, the MCP conformance suite).
#
#   scripts/test.sh            # the default run (unit + end-to-end tests, chaos smoke)
#   scripts/test.sh --full     # also the long chaos profile
#   scripts/test.sh --upgrade  # also the rolling upgrade from the previous release
#                              # (builds mcpd at that commit: scripts/test-upgrade.sh)
#
# What tests/py needs, installed once and checked quickly after that:
#   .venv/        Python venv with tests/py/requirements.txt (mcp, pytest, mcp-server-time,
#                 playwright, ...)
#   .tools/npm/   tests/py/npm/package*.json: server-everything, server-filesystem, the
#                 conformance suite, `node` 22 (the suite needs Node >= 22), oidc-provider,
#                 axe-core, and uPlot (vendored into the console)
#   chromium      Debian's, for the console's browser tests (tests/py/test_console.py)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

full=0
upgrade=0
for a in "$@"; do
  case "$a" in
    --full) full=1 ;;
    --upgrade) upgrade=1 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done

step() { printf '\n== %s\n' "$*"; }

step "toolchain"
cargo --version

# Debian packages, installed only when missing (apt-get update only when something is).
apt_missing=()
# A C compiler and make build mcpd's allocator (jemalloc) and ring.
command -v cc >/dev/null || apt_missing+=(gcc)
command -v make >/dev/null || apt_missing+=(make)
command -v python3 >/dev/null || apt_missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_missing+=(python3-venv)
command -v node >/dev/null || apt_missing+=(nodejs)
command -v npm >/dev/null || apt_missing+=(npm)
# The console's tests drive Debian's Chromium (Playwright's own browser download is not used).
[[ -x /usr/bin/chromium ]] || apt_missing+=(chromium)
if ((${#apt_missing[@]})); then
  step "Debian packages: ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${apt_missing[@]}"
fi

# Reinstalls a tool set when its manifest changed since the last install (a stamp holds its hash).
stale() { # stale STAMP FILE...
  [[ "$(cat "$1" 2>/dev/null)" != "$(cat "${@:2}" | sha256sum)" ]]
}
stamp() { # stamp STAMP FILE...
  cat "${@:2}" | sha256sum >"$1"
}

step "Python test environment (.venv)"
if ! .venv/bin/python -c '' 2>/dev/null; then
  rm -rf .venv
  python3 -m venv .venv
fi
if stale .venv/.tests-py-requirements tests/py/requirements.txt; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r tests/py/requirements.txt
  stamp .venv/.tests-py-requirements tests/py/requirements.txt
fi
.venv/bin/python -c 'import importlib.metadata as m; print("mcp", m.version("mcp"), "pytest", m.version("pytest"))'

step "npm test tools (.tools/npm)"
mkdir -p .tools/npm
if stale .tools/npm/.stamp tests/py/npm/package.json tests/py/npm/package-lock.json \
  || [[ ! -x .tools/npm/node_modules/.bin/node ]]; then
  cp tests/py/npm/package.json tests/py/npm/package-lock.json .tools/npm/
  (cd .tools/npm && npm ci --no-audit --no-fund --loglevel=error)
  stamp .tools/npm/.stamp tests/py/npm/package.json tests/py/npm/package-lock.json
fi
node22=$(.tools/npm/node_modules/.bin/node --version)
[[ "$node22" == v22.* ]] || { echo "expected Node 22 in .tools/npm, got $node22" >&2; exit 1; }
echo "node $node22 (tests), $(node --version) (system)"
# The console's vendored uPlot is the pinned npm package's, byte for byte.
node/console/vendor.sh --check

step "build (dev profile, shared by binaries and tests)"
cargo build --workspace --all-targets --locked

step "tests"
cargo test --workspace --locked -- --test-threads=2

step "end-to-end tests of the data plane (tests/py)"
.venv/bin/pytest tests/py -q

# --- deploy tests (deploy/: promtool, dashboard, systemd, compose, keepalived/haproxy; a live
# --- Prometheus against a dev cluster; a VIP failover in network namespaces) -- tests/deploy
step "deploy tests (tests/deploy)"
tests/deploy/run.sh
# --- end of deploy tests

# --- chaos: the checker's self-test, then the smoke profile (kill leader, kill follower, pause
# --- leader, partition leader when network namespaces are available, rotate every node's
# --- certificates); --full adds the rest.
step "chaos (self-test and smoke profile)"
if [[ $EUID -eq 0 ]] && ! command -v iptables >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q iptables iproute2 >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q iptables iproute2; }
fi
target/debug/chaos self-test
target/debug/chaos run --profile smoke
if ((full)); then
  target/debug/chaos run --profile full
fi
if ((upgrade)); then
  step "rolling upgrade from the previous release (scripts/test-upgrade.sh)"
  scripts/test-upgrade.sh
fi
