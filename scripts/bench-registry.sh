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

. scripts/need-etcd.sh

exec target/release/registry-bench "$@"
