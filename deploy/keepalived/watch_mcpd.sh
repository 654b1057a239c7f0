#!/bin/sh
# keepalived check for mcpd's process: exits 1 the moment nothing listens on mcpd's port on
# this host (the process died, was killed or is restarting, and the kernel refuses the
# connection), and 0 once it has watched the port stay open for MS milliseconds.
#
# keepalived runs a check at most once a second, so /readyz alone (check_mcpd.sh, two failures
# in a row) moves the VIP 1-2 s after mcpd dies. This check probes about ten times a second
# within each run and keepalived acts on its first failure (fall 1): a dead mcpd loses the VIP
# in about 0.3 s. Only a refused connection counts. A busy, slow or unready node is
# check_mcpd.sh's to judge, with its two failures in a row, so this check does not flap.
#
#   watch_mcpd.sh [HOST:PORT [MS]]
#
#   HOST:PORT  default 127.0.0.1:7400, where mcpd listens on this host (its http_addr)
#   MS         how long one run watches, default 700. Keep a run (MS plus one probe, about
#              0.8 s) under keepalived's interval of 1 s: keepalived skips a run while the
#              previous one still goes.
#
# A probe opens a TCP connection and closes it (curl's telnet://, about 0.1 s): no TLS and no
# request, so it costs mcpd an accept, and mcpd logs it at debug level only.
#
# Install: /etc/keepalived/watch_mcpd.sh, owned by root, mode 0755 (enable_script_security
# refuses scripts that a non-root user could change).
addr="${1:-127.0.0.1:7400}"
ms="${2:-700}"

# Hundredths of a second since boot, from /proc/uptime ("12345.67 ...").
now() {
    read -r up _ </proc/uptime
    echo "${up%.*}${up#*.}"
}

end=$(($(now) + ms / 10))
while :; do
    # curl exits 7 when the connection is refused; an open port ends in its time-out (28).
    curl --silent --output /dev/null --max-time 0.05 "telnet://$addr" </dev/null
    if [ $? -eq 7 ]; then
        echo "watch_mcpd: nothing listens on $addr" >&2
        exit 1
    fi
    [ "$(now)" -ge "$end" ] && exit 0
    sleep 0.02
done
