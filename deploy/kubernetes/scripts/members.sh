#!/bin/sh
# The members Job (Job mcpd-bootstrap, and the runs made from CronJob mcpd-members): forms the
# cluster once, then keeps its membership equal to the StatefulSet's pods. It runs to the end
# again and again without harm: each step looks before it acts.
#
#   1. Scale-down, when the StatefulSet carries the annotation mcpd/scale-down-to=N: every
#      member whose pod's ordinal is >= N is removed (`mcpctl cluster remove-node`, highest
#      first), after ConfigMap mcpd-node-ids has recorded a fresh id for the next volume of
#      that ordinal (ids are never reused); then the StatefulSet is scaled to N and the
#      annotation dropped. Members leave before their pods do, so quorum never counts on a
#      deleted pod. Their claims stay (delete them: they hold the removed nodes' data and
#      ca.key).
#   2. Waits until every pod 0..replicas-1 answers GET /v1/node (HTTPS, the cluster CA).
#   3. No pod initialised: `mcpctl cluster init` with all of them, and the admin token it
#      prints once goes into Secret mcpd-admin-token (key token), which the operator made empty
#      beforehand; a dry run proves the Job may write it before the cluster is formed. Some
#      initialised: the others are added with `mcpctl cluster add-node`, with the id and
#      addresses each pod's /v1/node reports; a member left a learner is promoted. All
#      initialised: nothing to do. `cluster init` is never run twice.
#   4. Waits until every pod answers /readyz with 200, and prints `mcpctl cluster status`.
#
# The Kubernetes API is called with curl and the Job's service account (Role mcpd-members:
# get/patch on statefulset mcpd, configmap mcpd-node-ids, patch on secret mcpd-admin-token).
# Environment: POD_NAMESPACE, MCPCTL_CACERT (ca.pem only), MCPCTL_TOKEN (from Secret
# mcpd-admin-token; empty before the first run), CLUSTER_DOMAIN (cluster.local),
# MCPD_WAIT_S (600); for tests: MCPD_STATEFULSET, MCPD_SERVICE, MCPD_HTTP_PORT,
# SERVICEACCOUNT_DIR, KUBERNETES_API.
set -eu

log() {
  echo "mcpd-members: $*" >&2
}
die() {
  log "$*"
  exit 1
}

ns=${POD_NAMESPACE:?POD_NAMESPACE is not set}
ca=${MCPCTL_CACERT:?MCPCTL_CACERT is not set (the cluster CA certificate, ca.pem)}
domain=${CLUSTER_DOMAIN:-cluster.local}
sts=${MCPD_STATEFULSET:-mcpd}
svc=${MCPD_SERVICE:-mcpd}
http_port=${MCPD_HTTP_PORT:-7400}
sa=${SERVICEACCOUNT_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
api=${KUBERNETES_API:-https://kubernetes.default.svc}
wait_s=${MCPD_WAIT_S:-600}
token_secret=mcpd-admin-token
ids_configmap=mcpd-node-ids
annotation=mcpd/scale-down-to
# A removed node's ordinal gets id + 1000 next: ordinals keep apart (ordinal + 1 modulo 1000,
# for fewer than 1000 replicas) and each one's ids only grow.
stride=1000
if [ -z "${MCPCTL_TOKEN:-}" ]; then
  unset MCPCTL_TOKEN
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

sts_path=/apis/apps/v1/namespaces/$ns/statefulsets/$sts
secret_path=/api/v1/namespaces/$ns/secrets/$token_secret
ids_path=/api/v1/namespaces/$ns/configmaps/$ids_configmap

# kube METHOD PATH [JSON merge patch]: the API's answer, without whitespace, on stdout.
kube() {
  printf 'Authorization: Bearer %s\n' "$(cat "$sa/token")" >"$work/auth"
  if [ $# -ge 3 ]; then
    printf '%s' "$3" >"$work/body"
    set -- "$1" "$2" -H 'Content-Type: application/merge-patch+json' --data-binary @"$work/body"
  fi
  method=$1 path=$2
  shift 2
  if ! curl -sS --fail-with-body --max-time 30 --cacert "$sa/ca.crt" -H @"$work/auth" -X "$method" \
    -o "$work/answer" "$@" "$api$path"; then
    log "$method $path failed: $(cat "$work/answer" 2>/dev/null)"
    return 1
  fi
  tr -d '[:space:]' <"$work/answer"
}

is_count() {
  case $1 in '' | *[!0-9]* | 0*) return 1 ;; esac
}
fqdn() {
  echo "$sts-$1.$svc.$ns.svc.$domain"
}
url() {
  echo "https://$(fqdn "$1"):$http_port"
}
# endpoints ORDINAL...: the pods' URLs, comma-separated (MCPCTL_ENDPOINTS).
endpoints() {
  list=""
  for k in "$@"; do
    list="$list${list:+,}$(url "$k")"
  done
  echo "$list"
}
# node_info ORDINAL: the pod's GET /v1/node, without whitespace; fails if it does not answer.
node_info() {
  curl -sSf --max-time 5 --cacert "$ca" -o "$work/node" "$(url "$1")/v1/node" 2>/dev/null || return 1
  tr -d '[:space:]' <"$work/node"
}
ready() {
  curl -sSf --max-time 5 --cacert "$ca" -o /dev/null "$(url "$1")/readyz" 2>/dev/null
}
# json_num KEY, json_str KEY: the value of KEY (its last occurrence) in flattened JSON.
json_num() {
  sed -n "s|.*\"$1\":\([0-9][0-9]*\).*|\1|p"
}
json_str() {
  sed -n "s|.*\"$1\":\"\([^\"]*\)\".*|\1|p"
}
# ordinal_of HOST:PORT: the ordinal of a pod of this StatefulSet named by its address, or "".
ordinal_of() {
  host=${1%:*}
  case $host in
    "$sts"-*".$svc.$ns.svc.$domain")
      k=${host%%.*}
      k=${k#"$sts"-}
      case $k in '' | *[!0-9]*) ;; *) echo "$k" ;; esac
      ;;
  esac
}
# members FILE: `ID ROLE HTTP GRPC` of every member, from `mcpctl cluster status`.
members() {
  mcpctl cluster status >"$work/status" || die "mcpctl cluster status failed (endpoints $MCPCTL_ENDPOINTS)"
  awk '$1 ~ /^[0-9]+$/ { print $1, $2, $3, $4 }' "$work/status" >"$1"
}
# record_next_id POD ID: the id the next volume of POD gets, once node ID is removed.
record_next_id() {
  want=$(($2 + stride))
  kube GET "$ids_path" >"$work/ids"
  have=$(json_str "$1" <"$work/ids")
  if [ -n "$have" ] && [ "$have" -ge "$want" ]; then
    return 0
  fi
  kube PATCH "$ids_path" "{\"data\":{\"$1\":\"$want\"}}" >/dev/null
  log "$1: the next volume of $1 is node $want (ConfigMap $ids_configmap)"
}
# wait_for WHAT COMMAND ORDINAL...: until COMMAND succeeds for every ordinal, or die.
wait_for() {
  what=$1 check=$2
  shift 2
  deadline=$(($(date +%s) + wait_s))
  while :; do
    missing=""
    for k in "$@"; do
      "$check" "$k" >"$work/$check-$k" || missing="$missing $sts-$k"
    done
    [ -z "$missing" ] && return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then
      die "$what: not from$missing within ${wait_s}s (kubectl -n $ns get pods; kubectl -n $ns logs POD)"
    fi
    sleep 5
  done
}

statefulset=$(kube GET "$sts_path")
replicas=$(printf '%s' "$statefulset" | sed -n 's/.*"spec":{"replicas":\([0-9][0-9]*\).*/\1/p')
[ -n "$replicas" ] || die "statefulset $sts: no spec.replicas in the API's answer"
down=$(printf '%s' "$statefulset" | json_str "$annotation")

# 1. Scale-down: members leave first, then their pods.
if [ -n "$down" ]; then
  is_count "$down" || die "annotation $annotation=$down: not a number >= 1"
  [ -n "${MCPCTL_TOKEN:-}" ] || die "scaling down needs the admin token: Secret $token_secret has none"
  keep=$replicas
  [ "$down" -lt "$keep" ] && keep=$down
  [ "$keep" -ge 1 ] || die "statefulset $sts has no replicas"
  stay=$(seq 0 $((keep - 1)))
  # shellcheck disable=SC2086 # word splitting of the ordinals is wanted
  MCPCTL_ENDPOINTS=$(endpoints $stay)
  export MCPCTL_ENDPOINTS
  members "$work/members"
  : >"$work/leaving"
  while read -r id _role http _grpc; do
    k=$(ordinal_of "$http")
    if [ -n "$k" ] && [ "$k" -ge "$keep" ]; then
      echo "$k $id" >>"$work/leaving"
    fi
  done <"$work/members"
  sort -rn "$work/leaving" >"$work/leaving.sorted"
  while read -r k id; do
    record_next_id "$sts-$k" "$id"
    log "removing node $id ($sts-$k)"
    mcpctl cluster remove-node "$id" </dev/null || die "mcpctl cluster remove-node $id failed"
  done <"$work/leaving.sorted"
  kube PATCH "$sts_path" "{\"metadata\":{\"annotations\":{\"$annotation\":null}},\"spec\":{\"replicas\":$keep}}" >/dev/null
  if [ "$keep" -lt "$replicas" ]; then
    log "statefulset $sts scaled from $replicas to $keep; delete the claims of the removed pods, they hold their data and ca.key:"
    for k in $(seq "$keep" $((replicas - 1))); do
      log "  kubectl -n $ns delete pvc data-$sts-$k"
    done
  fi
  replicas=$keep
fi
[ "$replicas" -ge 1 ] || die "statefulset $sts has no replicas"
if [ $((replicas % 2)) -eq 0 ]; then
  log "warning: $replicas voters tolerate $(((replicas - 1) / 2)) failure(s), as $((replicas - 1)) do; prefer an odd count"
fi

# 2. Every pod answers.
ordinals=$(seq 0 $((replicas - 1)))
# shellcheck disable=SC2086
wait_for "GET /v1/node" node_info $ordinals
joined="" fresh=""
for k in $ordinals; do
  if grep -q '"initialized":true' "$work/node_info-$k"; then
    joined="$joined $k"
  else
    fresh="$fresh $k"
  fi
done

# 3. Form the cluster once, or add the pods that are not members yet.
if [ -z "$joined" ]; then
  kube PATCH "$secret_path?dryRun=All" '{}' >/dev/null \
    || die "the Job cannot write Secret $token_secret; make it first: kubectl -n $ns create secret generic $token_secret"
  # shellcheck disable=SC2086
  MCPCTL_ENDPOINTS=$(endpoints $ordinals)
  export MCPCTL_ENDPOINTS
  log "forming the cluster of$(for k in $ordinals; do printf ' %s' "$sts-$k"; done)"
  mcpctl cluster init >"$work/token" || die "mcpctl cluster init failed"
  MCPCTL_TOKEN=$(cat "$work/token")
  export MCPCTL_TOKEN
  encoded=$(printf '%s' "$MCPCTL_TOKEN" | base64 | tr -d '\n')
  if ! kube PATCH "$secret_path" "{\"data\":{\"token\":\"$encoded\"}}" >/dev/null; then
    log "the cluster is formed, but its admin token could not be stored in Secret $token_secret; it is shown this once:"
    cat "$work/token" >&2
    exit 1
  fi
  log "cluster initialised; its admin token is in Secret $token_secret (key token)"
elif [ -n "$fresh" ]; then
  [ -n "${MCPCTL_TOKEN:-}" ] || die "pods$fresh are not members, and Secret $token_secret holds no admin token to add them with (mcpd recover-admin makes one)"
  # shellcheck disable=SC2086
  MCPCTL_ENDPOINTS=$(endpoints $joined)
  export MCPCTL_ENDPOINTS
  for k in $fresh; do
    id=$(json_num id <"$work/node_info-$k")
    http=$(json_str http_addr <"$work/node_info-$k")
    grpc=$(json_str grpc_addr <"$work/node_info-$k")
    if [ -z "$id" ] || [ -z "$http" ] || [ -z "$grpc" ]; then
      die "$sts-$k: no id or addresses in its /v1/node"
    fi
    log "adding $sts-$k as node $id"
    mcpctl cluster add-node --id "$id" --http "$http" --grpc "$grpc" \
      || die "mcpctl cluster add-node --id $id failed (an id that was a member before is refused: see deploy/README.md, Kubernetes)"
  done
else
  log "every pod is a member already"
fi

# A member left a learner (a promotion that timed out) is promoted.
if [ -n "${MCPCTL_TOKEN:-}" ]; then
  # shellcheck disable=SC2086
  MCPCTL_ENDPOINTS=$(endpoints $ordinals)
  export MCPCTL_ENDPOINTS
  members "$work/members"
  while read -r id role http grpc; do
    k=$(ordinal_of "$http")
    if [ "$role" = learner ] && [ -n "$k" ] && [ "$k" -lt "$replicas" ]; then
      log "promoting node $id ($sts-$k) to voter"
      mcpctl cluster add-node --id "$id" --http "$http" --grpc "$grpc" </dev/null || die "promoting node $id failed"
    fi
  done <"$work/members"
fi

# 4. Every pod ready.
# shellcheck disable=SC2086
wait_for "GET /readyz 200" ready $ordinals
if [ -n "${MCPCTL_TOKEN:-}" ]; then
  mcpctl cluster status
fi
log "done: $replicas pods, every one a ready member"
