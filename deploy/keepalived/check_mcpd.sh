#!/bin/sh
# keepalived health check for mcpd: succeeds (exit 0) only while the local node answers
# /readyz with 200 (member of a cluster, knows a leader, applied state caught up); any other
# answer, a TLS error or no answer within a second exits non-zero. keepalived calls it every
# second; two failures in a row move the VIP away, two successes make the node eligible again.
#
#   check_mcpd.sh [URL [CA_FILE]]
#
#   URL      default https://127.0.0.1:7400/readyz (the certificate a node issues itself
#            always names 127.0.0.1)
#   CA_FILE  the cluster CA's certificate that the node's HTTPS certificate must chain to;
#            default $MCPD_CACERT, else /etc/mcpd/ca.pem. It is public (ca.pem, never ca.key
#            or data.key): keepalived runs this script as an unprivileged user
#            (script_user), which cannot read the node's TLS directory, so install a copy
#            readable by everyone:
#            install -m 0644 pki/ca.pem /etc/mcpd/ca.pem
#            With `[api] tls = "files"`, give the CA of your own certificate instead.
#            With `[api] tls = "off"` (behind a TLS-terminating load balancer), pass an
#            http:// URL; curl then ignores the CA file.
#
# Install: /etc/keepalived/check_mcpd.sh, owned by root, mode 0755 (enable_script_security
# refuses scripts that a non-root user could change).
url="${1:-https://127.0.0.1:7400/readyz}"
cacert="${2:-${MCPD_CACERT:-/etc/mcpd/ca.pem}}"
exec curl --fail --silent --show-error --max-time 1 --cacert "$cacert" --output /dev/null "$url"
