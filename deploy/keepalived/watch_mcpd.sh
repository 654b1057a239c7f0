#!/bin/sh
# keepalived check for mcpd's process: exits 1 the moment nothing accepts a TCP connection on
# mcpd's port on this host (the process died, was killed or is restarting, and the kernel
# refuses the connection), and 0 once it has watched the port stay open for MS milliseconds.
#
# keepalived runs a check at most once a second, so /readyz alone (check_mcpd.sh, two failures
# in a row) moves the VIP 1-2 s after mcpd dies. This check probes about seven times a second
# within each run and keepalived acts on its first failure (fall 1): a dead mcpd loses the VIP
# in about 0.1-0.3 s. Only a connection that could not be made counts (refused; or the
# address gone from the host). A busy, slow or unready node is check_mcpd.sh's to judge, with
# its two failures in a row.
#
#   watch_mcpd.sh [HOST:PORT [MS]]
#
#   HOST:PORT  default 127.0.0.1:7400, where mcpd listens on this host (its http_addr); an
#              IPv6 address in brackets: [::1]:7400
#   MS         how long one run watches, default 700. Keep a run (MS plus one probe, about
#              0.85 s) under keepalived's interval of 1 s: keepalived skips a run while the
#              previous one still goes.
#
# A probe opens a TCP connection and closes it (curl's telnet://, about 0.1 s): no TLS and no
# request. mcpd counts it in mcpd_tls_handshake_failures_total{reason="closed"} and logs it at
# debug level only. It needs a curl with telnet (Debian's and Ubuntu's curl, Fedora's full
# `curl`; not `curl-minimal`): without it every run exits 2 and names the problem, and the
# VIP stays off this node until curl is replaced.
#
# Install: /etc/keepalived/watch_mcpd.sh, owned by root, mode 0755 (enable_script_security
# refuses scripts that a non-root user could change).
addr="${1:-127.0.0.1:7400}"
ms="${2:-700}"

# Hundredths of a second since boot, from /proc/uptime ("12345.67 ..."); 0 where it cannot be
# read, and then the number of probes alone bounds the run.
now() {
    if read -r up _ 2>/dev/null </proc/uptime; then
        echo "${up%.*}${up#*.}"
    else
        echo 0
    fi
}

end=$(($(now) + ms / 10))
probes=$((ms / 130 + 1)) # a probe and its pause take about 0.13 s
while [ "$probes" -gt 0 ]; do
    probes=$((probes - 1))
    curl --silent --output /dev/null --max-time 0.05 "telnet://$addr" </dev/null
    rc=$?
    case $rc in
        0 | 28) ;; # connected (the time-out ends an open connection)
        7)
            echo "watch_mcpd: nothing accepts connections on $addr" >&2
            exit 1
            ;;
        *)
            echo "watch_mcpd: curl cannot probe telnet://$addr (curl exit $rc: a bad HOST:PORT, or a curl without telnet)" >&2
            exit 2
            ;;
    esac
    [ "$(now)" -ge "$end" ] && break
    sleep 0.02
done
exit 0
