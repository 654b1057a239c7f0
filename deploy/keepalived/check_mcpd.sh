#!/bin/sh
# keepalived health check for mcpd: succeeds only while the local node answers /readyz with 200
# (member of a cluster, knows a leader, applied state caught up). keepalived calls it every
# second; two failures in a row move the VIP away, two successes make the node eligible again.
#
#   check_mcpd.sh [URL]      default URL: http://127.0.0.1:7400/readyz
#
# Install: /etc/keepalived/check_mcpd.sh, owned by root, mode 0755 (enable_script_security
# refuses scripts that a non-root user could change).
url="${1:-http://127.0.0.1:7400/readyz}"
exec curl --fail --silent --show-error --max-time 1 --output /dev/null "$url"
