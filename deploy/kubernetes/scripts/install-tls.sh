#!/bin/sh
# The tls-install init container: puts the cluster CA and data key (Secret mcpd-ca: ca.pem,
# ca.key, data.key, from `mcpctl cluster ca create`) into the node's TLS directory on its
# volume before mcpd starts, as every initial node needs them (deploy/README.md, "TLS").
# Only this init container mounts the Secret; mcpd reads its copy on the volume.
#
# A file the TLS directory lacks is copied (mode 0600, the directories 0700); one it holds is
# left alone if it is the Secret's, and stops the pod if it is not: every node needs the same
# CA and data key (a node with another data.key cannot open the env values others sealed).
#
# Environment, for tests: MCPD_VOLUME (/var/lib/mcpd/volume), MCPD_CA_DIR (/etc/mcpd/ca).
set -eu
umask 077

die() {
  echo "install-tls.sh: $*" >&2
  exit 1
}

volume=${MCPD_VOLUME:-/var/lib/mcpd/volume}
ca=${MCPD_CA_DIR:-/etc/mcpd/ca}
data=$volume/data
tls=$data/tls

if [ ! -d "$volume" ] || [ ! -w "$volume" ]; then
  die "$volume is not a writable directory (the pod's volume; fsGroup must let uid $(id -u) write it)"
fi
mkdir -p "$tls" "$volume/home"
chmod 0700 "$data" "$tls" "$volume/home"

for f in ca.pem ca.key data.key; do
  [ -s "$ca/$f" ] || die "Secret mcpd-ca has no $f: make the three files with mcpctl cluster ca create (deploy/README.md, Kubernetes)"
  if [ ! -e "$tls/$f" ]; then
    cp "$ca/$f" "$tls/.$f.tmp"
    chmod 0600 "$tls/.$f.tmp"
    mv "$tls/.$f.tmp" "$tls/$f"
    echo "install-tls.sh: $f installed in $tls" >&2
  elif ! cmp -s "$ca/$f" "$tls/$f"; then
    die "$tls/$f is not the one of Secret mcpd-ca: every node needs the same ca.pem, ca.key and data.key"
  fi
done
