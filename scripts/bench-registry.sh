#!/usr/bin/env bash
# The registry benchmark: 3 mcpd nodes and 3 etcd members on loopback, driven by the same load
# generator at 1, 16 and 128 concurrent clients; prints a table and a JSON summary line.
#
#   scripts/bench-registry.sh                    # 10 s per level and system, in 5 alternating rounds
#   scripts/bench-registry.sh --seconds 5        # any flag is passed to registry-bench
#   scripts/bench-registry.sh --levels 1,16 --seconds 3
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p mcpcp-tests -p mcpd

if ! command -v etcd >/dev/null 2>&1; then
  echo "etcd not found: installing etcd-server" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server; then
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server
  fi
fi

exec target/release/registry-bench "$@"
