#!/bin/sh
# The mcpd container's command (under tini, as the image runs mcpd): works out this pod's node
# id and names, then becomes mcpd.
#
# The node id (> 0, never reused in a cluster, see deploy/README.md "Kubernetes"):
#   1. the one the pod's volume already holds (<data_dir>/node_id, written by mcpd at its first
#      start), so a pod that is rescheduled or restarted stays the same node;
#   2. else, for a new volume, ConfigMap mcpd-node-ids' key <pod name>, which the members Job
#      writes when it removes that pod's node (scale-down), so that the next volume of that
#      ordinal gets a fresh id;
#   3. else ordinal + 1 (mcpd-0 is node 1).
# A volume whose node_id is not that ConfigMap's id for the pod belongs to a removed node: the
# pod refuses to start and says to delete the claim.
#
# Environment (the StatefulSet sets the first two from the downward API):
#   POD_NAME, POD_NAMESPACE, CLUSTER_DOMAIN (cluster.local), MCPD_SERVICE (the headless
#   Service, mcpd), MCPD_HTTP_PORT (7400), MCPD_GRPC_PORT (7500); paths, for tests:
#   MCPD_VOLUME, MCPD_CONFIG_TEMPLATE, MCPD_RUN_DIR, MCPD_NODE_IDS_DIR, MCPD_BIN.
# Arguments are passed on to mcpd after the ones below (flags override the file).
set -eu

die() {
  echo "start.sh: $*" >&2
  exit 1
}

pod=${POD_NAME:?POD_NAME is not set (the pod name, from the downward API)}
ns=${POD_NAMESPACE:?POD_NAMESPACE is not set (from the downward API)}
domain=${CLUSTER_DOMAIN:-cluster.local}
svc=${MCPD_SERVICE:-mcpd}
http_port=${MCPD_HTTP_PORT:-7400}
grpc_port=${MCPD_GRPC_PORT:-7500}
volume=${MCPD_VOLUME:-/var/lib/mcpd/volume}
template=${MCPD_CONFIG_TEMPLATE:-/etc/mcpd/config/mcpd.toml}
run=${MCPD_RUN_DIR:-/run/mcpd}
ids=${MCPD_NODE_IDS_DIR:-/etc/mcpd/node-ids}
mcpd=${MCPD_BIN:-/usr/local/bin/mcpd}
data=$volume/data

is_id() {
  case $1 in '' | *[!0-9]* | 0*) return 1 ;; esac
}

ordinal=${pod##*-}
case $ordinal in
  '' | *[!0-9]*) die "cannot read an ordinal from the pod name $pod (a StatefulSet pod is <name>-<ordinal>)" ;;
esac

next=""
if [ -s "$ids/$pod" ]; then
  next=$(cat "$ids/$pod")
  is_id "$next" || die "ConfigMap mcpd-node-ids gives $pod the id '$next': not a number > 0"
fi
if [ -s "$data/node_id" ]; then
  id=$(cat "$data/node_id")
  is_id "$id" || die "$data/node_id holds '$id', not a node id"
  if [ -n "$next" ] && [ "$id" != "$next" ]; then
    die "the volume of $pod holds node $id, which was removed from the cluster (ConfigMap mcpd-node-ids gives $pod the id $next). Its data is of no use: delete the claim so that $pod starts afresh as node $next: kubectl -n $ns delete pvc data-$pod --wait=false && kubectl -n $ns delete pod $pod"
  fi
else
  id=${next:-$((ordinal + 1))}
fi

fqdn=$pod.$svc.$ns.svc.$domain
mkdir -p "$run"
sed -e "s/@NAMESPACE@/$ns/g" -e "s/@CLUSTER_DOMAIN@/$domain/g" "$template" >"$run/mcpd.toml"
echo "start.sh: $pod is node $id, advertised as $fqdn (HTTPS $http_port, gRPC $grpc_port)" >&2
exec "$mcpd" --config "$run/mcpd.toml" --id "$id" --data-dir "$data" \
  --advertise-http "$fqdn:$http_port" --advertise-grpc "$fqdn:$grpc_port" "$@"
