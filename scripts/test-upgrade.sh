#!/usr/bin/env bash
# The rolling-upgrade test: builds mcpd at an earlier commit (the previous release), then runs
# tests/py/test_upgrade.py, which starts a cluster on it and upgrades it node by node to this
# checkout's build under load, and rolls one node back.
#
#   scripts/test-upgrade.sh              # from UPGRADE_FROM below
#   scripts/test-upgrade.sh 437ef7a      # from the commit (or tag) named
#
# The earlier commit is checked out into a git worktree under target/upgrade/ and built there
# with its own target directory, seeded with a copy of this one's so that unchanged
# dependencies are not built again. Run scripts/test.sh (or cargo build) first.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# The previous release: the last commit of the stage before this one (no tags yet).
UPGRADE_FROM=${1:-${UPGRADE_FROM:-437ef7a}}
commit=$(git rev-parse --verify "$UPGRADE_FROM^{commit}")
work=target/upgrade/src-$commit
if [[ ! -d $work ]]; then
  git worktree prune
  git worktree add --detach "$work" "$commit" >/dev/null
fi
if [[ ! -d target/upgrade/target/debug && -d target/debug ]]; then
  mkdir -p target/upgrade/target
  cp -r target/debug target/upgrade/target/debug
fi
(cd "$work" && CARGO_TARGET_DIR=$root/target/upgrade/target cargo build -p mcpd --bin mcpd)
old=$root/target/upgrade/target/debug/mcpd
cp "$old" "target/upgrade/mcpd-$commit"
echo "previous build: mcpd at $commit"

MCPCP_UPGRADE_FROM_BIN=$root/target/upgrade/mcpd-$commit \
  exec .venv/bin/pytest tests/py/test_upgrade.py -v -s
