#!/usr/bin/env bash
# The deploy tests: checks of deploy/ (promtool, the dashboard, systemd, compose, Dockerfile,
# keepalived, haproxy), the example mcpd.toml against mcpd in each HTTPS mode, the Kubernetes
# manifests against the Kubernetes API schemas (kubernetes_test.py, with .venv's python, which
# has kubernetes-validate from tests/py/requirements.txt), a live test against a 3-node dev
# cluster with a real Prometheus scraping over HTTPS, and a VIP failover test in network
# namespaces. Each check prints PASS/FAIL/SKIP; the last line
# is `N passed, M failed` (`, K skipped` when some were skipped). Exits non-zero on a failure.
#
#   tests/deploy/run.sh                 # needs target/debug/{mcpd,mcpctl,mcp-bridge}
#
# Environment: MCPCP_BIN_DIR (default target/debug), DEPLOY_TEST_NO_INSTALL=1 (do not
# apt-get missing tools), DEPLOY_TEST_KEEP=1 (keep temporary directories), DEPLOY_TEST_PYTHON.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
export MCPCP_BIN_DIR="${MCPCP_BIN_DIR:-$root/target/debug}"
export PYTHONDONTWRITEBYTECODE=1

# Tools from Debian's packages: install what is missing (root on Debian only).
declare -A pkg_of=(
  [promtool]=prometheus [prometheus]=prometheus [keepalived]=keepalived [haproxy]=haproxy
  [docker-compose]=docker-compose [curl]=curl [ip]=iproute2 [systemd-analyze]=systemd [openssl]=openssl
  [shellcheck]=shellcheck
)
missing=()
for tool in "${!pkg_of[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${pkg_of[$tool]}")
done
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
if [ "${#missing[@]}" -gt 0 ] && [ "${DEPLOY_TEST_NO_INSTALL:-0}" != 1 ] \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "deploy tests: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/tmp/deploy-tests-apt.log 2>&1 \
    || echo "deploy tests: apt-get failed (see /tmp/deploy-tests-apt.log); checks needing those tools fail or skip"
fi

py="${DEPLOY_TEST_PYTHON:-/usr/bin/python3}"
if ! "$py" -c 'import yaml, tomllib' 2>/dev/null; then
  py=python3
fi

passed=0 failed=0 skipped=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for t in static_checks config_test kubernetes_test live_test vip_test; do
  printf -- '-- %s\n' "$t"
  start=$SECONDS
  tpy=$py
  if [ "$t" = kubernetes_test ] && [ -x "$root/.venv/bin/python" ]; then
    tpy=$root/.venv/bin/python   # kubernetes-validate (tests/py/requirements.txt)
  fi
  "$tpy" "tests/deploy/$t.py" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  p=$(grep -c '^PASS ' "$out") f=$(grep -c '^FAIL ' "$out") s=$(grep -c '^SKIP ' "$out")
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    echo "FAIL $t: exited $rc"
    f=1
  fi
  passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
  printf -- '-- %s: %d passed, %d failed, %d skipped in %ds\n' "$t" "$p" "$f" "$s" $((SECONDS - start))
done

if [ "$skipped" -gt 0 ]; then
  echo "$passed passed, $failed failed, $skipped skipped"
else
  echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
