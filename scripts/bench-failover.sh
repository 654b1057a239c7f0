#!/usr/bin/env bash
# The failover benchmark: 3 mcpd nodes and 3 etcd members on loopback, each under write load
# through every node while its leader is killed with SIGKILL, round after round; prints the
# write pause of each round and its distribution, side by side, and a JSON summary line.
#
#   scripts/bench-failover.sh                    # 10 rounds per system, 8 writers
#   scripts/bench-failover.sh --rounds 20        # any flag is passed to failover-bench
#   scripts/bench-failover.sh --idle 600         # first 10 minutes idle: false elections
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p mcpcp-tests -p mcpd

. scripts/need-etcd.sh

exec target/release/failover-bench "$@"
