# Sourced by the benchmarks that run etcd beside mcpd: installs Debian's etcd-server when
# etcd is not on PATH.
if ! command -v etcd >/dev/null 2>&1; then
  echo "etcd not found: installing etcd-server" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server; then
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server
  fi
fi
