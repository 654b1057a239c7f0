#!/usr/bin/env bash
# The MCP data-plane benchmark: direct stdio to the demo server (the floor), a 3-node mcpd
# cluster's pools, peer routing, a remote (HTTP) upstream against calling it directly, and
# mcp-bridge failover, next to mcp-proxy and supergateway
# fronting the same server, all on loopback and driven by the same load generator; prints a
# table per section and a JSON summary line.
#
#   scripts/bench-mcp.sh                                  # 5 s per level, 20 kills
#   scripts/bench-mcp.sh --seconds 3                      # any flag is passed to mcp-bench
#   scripts/bench-mcp.sh --sections data,routing --seconds 10
#   scripts/bench-mcp.sh --sections bridge --kills 50
#
# The peers are installed once, pinned, under .tools/ (git-ignored):
#   .tools/mcp-proxy      a Python venv with mcp-proxy     (PyPI)
#   .tools/supergateway   an npm prefix with supergateway  (npm; needs Node >= 20)
set -euo pipefail
cd "$(dirname "$0")/.."

MCP_PROXY_VERSION=0.13.0
SUPERGATEWAY_VERSION=4.0.0

cargo build --release -p mcpd -p mcpctl -p mcp-bridge -p mcpcp-tests

if [ ! -x .tools/mcp-proxy/bin/mcp-proxy ] \
  || ! .tools/mcp-proxy/bin/python -m pip show mcp-proxy 2>/dev/null | grep -qx "Version: $MCP_PROXY_VERSION"; then
  echo "installing mcp-proxy $MCP_PROXY_VERSION into .tools/mcp-proxy" >&2
  if ! python3 -m venv --help >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
  fi
  rm -rf .tools/mcp-proxy
  python3 -m venv .tools/mcp-proxy
  .tools/mcp-proxy/bin/python -m pip install --quiet --disable-pip-version-check \
    "mcp-proxy==$MCP_PROXY_VERSION"
fi

if [ ! -e .tools/supergateway/node_modules/.bin/supergateway ] \
  || ! grep -q "\"version\": \"$SUPERGATEWAY_VERSION\"" \
    .tools/supergateway/node_modules/supergateway/package.json 2>/dev/null; then
  echo "installing supergateway $SUPERGATEWAY_VERSION into .tools/supergateway" >&2
  if ! command -v npm >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm
  fi
  mkdir -p .tools/supergateway
  npm install --prefix .tools/supergateway --no-audit --no-fund --loglevel=error \
    "supergateway@$SUPERGATEWAY_VERSION"
fi

exec target/release/mcp-bench "$@"
