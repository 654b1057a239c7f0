#!/usr/bin/env python3
"""VIP test: keepalived moves a virtual IP to a healthy node when the node holding it dies,
and mcp-bridge pointed at the VIP keeps serving; HAProxy (deploy/haproxy) as the alternative.

Topology, all in network namespaces this test creates (nothing changes in the host's own
network namespace; everything is removed at the end, also on failure):

    <p>-sw   a bridge br0 with one veth port per host below (no address)
    <p>-n1   10.213.250.11   mcpd 1 + keepalived (priority 150)
    <p>-n2   10.213.250.12   mcpd 2 + keepalived (priority 100)
    <p>-n3   10.213.250.13   mcpd 3 + keepalived (priority 50)
    <p>-cl   10.213.250.100  the client: mcpctl, mcp-bridge, curl, HAProxy
    VIP      10.213.250.200  held by one of n1..n3

Everything speaks TLS as deploy/ sets it up: a cluster CA and data key made with `mcpctl
cluster ca create` and installed into each node's TLS directory before its first start, each
node's `[api] tls_names` naming the VIP and the balancer's name (mcp.vip.test), and every
client (curl, mcpctl, mcp-bridge, keepalived's check, HAProxy's check) verifying the
certificates against the CA. The demo server is registered with a secret in its `env`: the
API shows it `<redacted>`, no node's data directory or log holds it, and every node (all with
the one data.key) opens it for its processes.

The keepalived configuration and check script are deploy/keepalived/*, with only their
per-node definitions changed; the HAProxy configuration is deploy/haproxy/haproxy.cfg with
its server addresses, the balancer's name and the CA file's path changed. Skipped (SKIP line,
exit 0) where namespaces or keepalived are not available. `DEPLOY_VIP_IDLE_S=600` first
watches the VIP for that long with nothing failing (no flapping).
"""

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DEPLOY, Procs, Results, binary, install_ca, install_signal_cleanup, kill_pid, log, make_ca, run, split_token,
    wait_until,
)

R = Results()
procs = Procs()
SUBNET = os.environ.get("DEPLOY_VIP_SUBNET", "10.213.250")
ADDR = {1: f"{SUBNET}.11", 2: f"{SUBNET}.12", 3: f"{SUBNET}.13"}
CLIENT = f"{SUBNET}.100"
VIP = f"{SUBNET}.200"
PORT = 7400
# The balancer's name in the nodes' certificates (tls_names), resolved by curl --resolve.
LB_NAME = "mcp.vip.test"
PREFIX = "mcpdvip" + os.urandom(2).hex()
NS = {1: f"{PREFIX}-n1", 2: f"{PREFIX}-n2", 3: f"{PREFIX}-n3", "cl": f"{PREFIX}-cl", "sw": f"{PREFIX}-sw"}
state = {"dir": None, "namespaces": [], "nodes": {}, "tokens": []}


def sh(*argv, timeout=30, check=True):
    return run(list(argv), timeout=timeout, check=check)


def in_ns(ns, *argv, timeout=30, check=False, env=None):
    return run(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check, env=env)


def curl(ns, url, timeout=3, headers=()):
    """GET url from namespace ns, verifying the node's certificate against the cluster CA."""
    hdrs = [a for h in headers for a in ("-H", h)]
    r = in_ns(ns, "curl", "-sS", "--cacert", state["ca"], "--max-time", str(timeout), *hdrs, "-o", "-",
              "-w", "\n%{http_code}", url, timeout=timeout + 5)
    body, _, code = r.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body


def cleanup():
    procs.kill_all()
    # Anything still running inside our namespaces (MCP server processes, keepalived children).
    for ns in state["namespaces"]:
        r = run(["ip", "netns", "pids", ns], timeout=10)
        for pid in r.stdout.split():
            kill_pid(int(pid))
    time.sleep(0.2)
    for ns in reversed(state["namespaces"]):
        run(["ip", "netns", "del", ns], timeout=10)
    state["namespaces"].clear()
    if state["dir"] and os.environ.get("DEPLOY_TEST_KEEP") != "1":
        shutil.rmtree(state["dir"], ignore_errors=True)
    elif state["dir"]:
        log(f"kept {state['dir']}")


def preflight():
    if os.geteuid() != 0:
        return "not root: cannot create network namespaces"
    for tool in ("ip", "curl", "keepalived"):
        if not shutil.which(tool):
            return f"{tool} not installed"
    for b in ("mcpd", "mcpctl", "mcp-bridge"):
        if not os.access(binary(b), os.X_OK):
            return f"{binary(b)} not built"
    probe = f"{PREFIX}-probe"
    r = run(["ip", "netns", "add", probe], timeout=10)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    run(["ip", "netns", "del", probe], timeout=10)
    return None


def make_network():
    for key in ("sw", 1, 2, 3, "cl"):
        sh("ip", "netns", "add", NS[key])
        state["namespaces"].append(NS[key])
    sw = NS["sw"]
    sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", sw, "link", "set", "br0", "up")
    for key, addr in [(1, ADDR[1]), (2, ADDR[2]), (3, ADDR[3]), ("cl", CLIENT)]:
        port = f"p{key}"
        sh("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", NS[key])
        sh("ip", "-n", sw, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", NS[key], "link", "set", "lo", "up")
        sh("ip", "-n", NS[key], "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", NS[key], "link", "set", "eth0", "up")
    log(f"namespaces {PREFIX}-{{sw,n1,n2,n3,cl}} on {SUBNET}.0/24")


def make_pki():
    """The cluster CA, made once as deploy/README.md says, and the public copy of ca.pem that
    keepalived's check script (run as nobody) reads."""
    pki = os.path.join(state["dir"], "pki")
    make_ca(pki, "viptest")
    state["pki"] = pki
    state["ca"] = os.path.join(state["dir"], "ca.pem")
    shutil.copy(os.path.join(pki, "ca.pem"), state["ca"])
    os.chmod(state["ca"], 0o644)


def start_node(n):
    d = os.path.join(state["dir"], f"node{n}")
    os.makedirs(d, exist_ok=True)
    data = os.path.join(d, "data")
    install_ca(state["pki"], os.path.join(data, "tls"))
    # The VIP and the balancer's name, as deploy/systemd/mcpd.toml.example shows them.
    conf = os.path.join(d, "mcpd.toml")
    with open(conf, "w") as f:
        f.write(f'id = {n}\ndata_dir = {json.dumps(data)}\n\n[api]\ntls = "cluster"\n'
                f'tls_names = {json.dumps([LB_NAME, VIP])}\n')
    logf = open(os.path.join(d, "mcpd.log"), "w")
    p = procs.start(f"mcpd {n}", [
        "ip", "netns", "exec", NS[n], binary("mcpd"), "--config", conf, "--id", str(n), "--data-dir", data,
        # HTTP on every address of the namespace: its own and the VIP when it holds it.
        "--http-addr", f"0.0.0.0:{PORT}", "--advertise-http", f"{ADDR[n]}:{PORT}",
        "--grpc-addr", f"{ADDR[n]}:7500", "--advertise-grpc", f"{ADDR[n]}:7500",
        "--log-format", "json",
    ], stdout=logf, stderr=logf)
    state["nodes"][n] = p


def mcpctl(*args, token=None, timeout=30):
    env = dict(os.environ)
    env["MCPCTL_ENDPOINTS"] = ",".join(f"https://{a}:{PORT}" for a in ADDR.values())
    env["MCPCTL_CACERT"] = state["ca"]
    if token or state.get("admin"):
        env["MCPCTL_TOKEN"] = token or state["admin"]
    return in_ns(NS["cl"], binary("mcpctl"), *args, timeout=timeout, env=env)


def form_cluster():
    for n in (1, 2, 3):
        start_node(n)
    for n in (1, 2, 3):
        wait_until(f"node {n} /livez", lambda n=n: curl(NS["cl"], f"https://{ADDR[n]}:{PORT}/livez")[0] == 200, 30)
    r = mcpctl("cluster", "init", "-o", "json")
    if r.returncode != 0:
        raise RuntimeError(f"cluster init: {r.stderr.strip()}")
    state["admin"] = json.loads(r.stdout)["admin_token"]
    state["tokens"].append(state["admin"])
    state["secret"] = "vip-secret-" + os.urandom(16).hex()
    for args in (["tenant", "add", "default"],
                 ["server", "add", "demo", "--idempotent-tool", "echo", "--env", f"VIP_TEST_SECRET={state['secret']}",
                  "--", binary("mcpd"), "demo-server"]):
        r = mcpctl(*args)
        if r.returncode != 0:
            raise RuntimeError(f"mcpctl {' '.join(args)}: {r.stderr.strip()}")
    r = mcpctl("token", "create", "--tenant", "default", "--name", "vip-test")
    if r.returncode != 0:
        raise RuntimeError(f"token create: {r.stderr.strip()}")
    state["tenant"] = r.stdout.strip()
    state["tokens"].append(state["tenant"])

    def demo_ready(n):
        code, body = curl(NS["cl"], f"https://{ADDR[n]}:{PORT}/metrics",
                          headers=[f"Authorization: Bearer {state['admin']}"])
        m = re.search(r'mcpd_pool_processes\{server="demo",(?:[^}]*,)?state="ready"\} (\d+)', body)
        return code == 200 and m and int(m.group(1)) >= 1

    for n in (1, 2, 3):
        try:
            wait_until(f"demo server ready on node {n}", lambda n=n: demo_ready(n), 30)
        except TimeoutError as e:
            # A node whose data.key is not the others' does not start a server with a sealed env.
            _, body = curl(NS["cl"], f"https://{ADDR[n]}:{PORT}/metrics",
                           headers=[f"Authorization: Bearer {state['admin']}"])
            refused = [line for line in body.splitlines() if line.startswith("mcpd_pool_start_refusals_total")]
            raise RuntimeError(f"{e}" + (f"; node {n} refused it: {refused}" if refused else "")) from None
    log("cluster formed with mcpctl cluster init; demo server ready on every node")


def mcp_call(url, tool, args, token):
    """initialize, notifications/initialized and one tools/call at url (a /servers/NAME/mcp
    endpoint) from the client namespace with curl; the call's JSON-RPC answer."""
    hdr = ["--cacert", state["ca"], "--max-time", "10", "-H", f"Authorization: Bearer {token}",
           "-H", "Content-Type: application/json", "-H", "Accept: application/json, text/event-stream"]

    def post(msg, *extra):
        r = in_ns(NS["cl"], "curl", "-sS", "-D", "-", *hdr, *extra, "-d", json.dumps(msg), url, timeout=15)
        return r.stdout

    out = post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "vip-test", "version": "1"}}})
    m = re.search(r"(?im)^mcp-session-id:\s*(\S+)", out)
    if not m:
        raise RuntimeError(f"initialize at {url}: {out[-300:]}")
    session = ["-H", f"Mcp-Session-Id: {m.group(1)}", "-H", "MCP-Protocol-Version: 2025-06-18"]
    post({"jsonrpc": "2.0", "method": "notifications/initialized"}, *session)
    out = post({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": tool, "arguments": args}},
               *session)
    for line in reversed(out.splitlines()):
        line = line[5:].strip() if line.startswith("data:") else line.strip()
        if line.startswith("{"):
            msg = json.loads(line)
            if msg.get("id") == 2:
                return msg
    raise RuntimeError(f"tools/call {tool} at {url}: no answer in {out[-300:]}")


def check_sealed_env():
    """The demo server's env secret: sealed with the data key all nodes share."""
    import hashlib

    secret = state["secret"].encode()
    want = hashlib.sha256(secret).hexdigest()
    problems = []
    for n in (1, 2, 3):
        code, body = curl(NS["cl"], f"https://{ADDR[n]}:{PORT}/v1/servers/demo",
                          headers=[f"Authorization: Bearer {state['admin']}"])
        env = (json.loads(body).get("spec", json.loads(body)).get("env") if code == 200 and body.startswith("{")
               else None)
        if code != 200 or state["secret"] in body or env != {"VIP_TEST_SECRET": "<redacted>"}:
            problems.append(f"node {n} GET /v1/servers/demo: {code}, env {env!r}"
                            + (" (shows the secret)" if state["secret"] in body else ""))
        data = os.path.join(state["dir"], f"node{n}", "data")
        for dirpath, _dirs, files in os.walk(data):
            for f in files:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    if secret in fh.read():
                        problems.append(f"node {n}: {os.path.relpath(os.path.join(dirpath, f), data)} holds the secret")
        try:
            answer = mcp_call(f"https://{ADDR[n]}:{PORT}/servers/demo/mcp", "env_sha256",
                              {"name": "VIP_TEST_SECRET"}, state["tenant"])
            got = ((answer.get("result") or {}).get("content") or [{}])[0].get("text")
            if got != want:
                problems.append(f"node {n}: env_sha256 gave {answer}")
        except (RuntimeError, ValueError) as e:
            problems.append(f"node {n}: {e}")
        code, body = curl(NS["cl"], f"https://{ADDR[n]}:{PORT}/metrics",
                          headers=[f"Authorization: Bearer {state['admin']}"])
        if "mcpd_pool_start_refusals_total" in body:
            problems.append(f"node {n} refused to start a server: "
                            + "; ".join(l for l in body.splitlines() if l.startswith("mcpd_pool_start_refusals_total")))
    R.check("vip: a server's env is sealed with the one data.key: <redacted> over the API, in no node's data "
            "files, opened by every node's processes", not problems, "; ".join(problems[:6]),
            "3 nodes: GET <redacted>, data dirs searched, env_sha256 matches")


def start_keepalived():
    with open(os.path.join(DEPLOY, "keepalived", "keepalived.conf")) as f:
        template = f.read()
    for name in ("check_mcpd.sh", "watch_mcpd.sh"):
        shutil.copy(os.path.join(DEPLOY, "keepalived", name), os.path.join(state["dir"], name))
        os.chmod(os.path.join(state["dir"], name), 0o755)
    for n, prio in ((1, 150), (2, 100), (3, 50)):
        conf = template
        for name, value in (("PRIORITY", prio), ("INTERFACE", "eth0"), ("VIP", f"{VIP}/24"),
                            ("ROUTER_ID", 51), ("CHECK_URL", f"https://127.0.0.1:{PORT}/readyz"),
                            ("CHECK_CACERT", state["ca"]), ("WATCH_ADDR", f"127.0.0.1:{PORT}")):
            conf, count = re.subn(rf"^\${name}=.+$", f"${name}={value}", conf, flags=re.M)
            if count != 1:
                raise RuntimeError(f"deploy/keepalived/keepalived.conf: no single ${name}= line")
        conf = conf.replace("/etc/keepalived/", state["dir"] + "/")
        path = os.path.join(state["dir"], f"keepalived{n}.conf")
        with open(path, "w") as f:
            f.write(conf)
        kd = os.path.join(state["dir"], f"keepalived{n}")
        os.makedirs(kd, exist_ok=True)
        logf = open(os.path.join(kd, "keepalived.log"), "w")
        # Its own session: keepalived signals its process group when it stops.
        procs.start(f"keepalived {n}", [
            "ip", "netns", "exec", NS[n], "keepalived", "--dont-fork", "--log-console", "--log-detail",
            "--no-syslog", "--vrrp", "-f", path, "-p", os.path.join(kd, "k.pid"),
            "-r", os.path.join(kd, "vrrp.pid"), "-c", os.path.join(kd, "checkers.pid"),
        ], stdout=logf, stderr=logf, start_new_session=True)


def vip_holders():
    out = []
    for n in (1, 2, 3):
        r = run(["ip", "-n", NS[n], "-o", "addr", "show", "dev", "eth0"], timeout=5)
        if f" {VIP}/" in r.stdout:
            out.append(n)
    return out


class Bridge:
    """mcp-bridge in the client namespace, spoken to over its stdio."""

    def __init__(self):
        env = dict(os.environ)
        env["MCP_BRIDGE_TOKEN"] = state["tenant"]
        self.errf = open(os.path.join(state["dir"], "bridge.log"), "w")
        self.p = procs.start("mcp-bridge", [
            "ip", "netns", "exec", NS["cl"], binary("mcp-bridge"), "--url", f"https://{VIP}:{PORT}",
            "--cacert", state["ca"],
            "--server", "demo", "--failover-deadline-ms", "30000", "--log-level", "info",
        ], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errf, env=env, text=True, bufsize=1)
        self.q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            try:
                self.q.put(json.loads(line))
            except ValueError:
                self.q.put({"unparsable": line})

    def send(self, msg):
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()

    def answer(self, id, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                m = self.q.get(timeout=max(0.05, end - time.monotonic()))
            except queue.Empty:
                break
            if m.get("id") == id:
                return m
        raise TimeoutError(f"no answer to request {id} within {timeout}s")

    def echo(self, id, text, timeout):
        self.send({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                   "params": {"name": "echo", "arguments": {"message": text}}})
        a = self.answer(id, timeout)
        got = ((a.get("result") or {}).get("content") or [{}])[0].get("text")
        if got != text:
            raise RuntimeError(f"echo {id}: {a}")
        return a


def haproxy_check(dead):
    """deploy/haproxy/haproxy.cfg in the client namespace, against the nodes' addresses."""
    if not shutil.which("haproxy"):
        R.skip("haproxy: TLS passthrough, /readyz checked over TLS with the CA, a session's calls served",
               "haproxy not installed")
        return
    with open(os.path.join(DEPLOY, "haproxy", "haproxy.cfg")) as f:
        cfg = f.read()
    for n in (1, 2, 3):
        cfg, count = re.subn(rf"^(\s*server mcpd-{n}) \S+", rf"\1 {ADDR[n]}:{PORT}", cfg, flags=re.M)
        if count != 1:
            raise RuntimeError(f"deploy/haproxy/haproxy.cfg: no single `server mcpd-{n}` line")
    cfg, count = re.subn(r"^(\s*default-server .*)\bca-file \S+", rf"\1ca-file {state['ca']}", cfg, flags=re.M)
    if count != 1:
        raise RuntimeError("deploy/haproxy/haproxy.cfg: no single ca-file for the nodes' health check")
    cfg = cfg.replace("mcp.example.com", LB_NAME)
    path = os.path.join(state["dir"], "haproxy.cfg")
    with open(path, "w") as f:
        f.write(cfg)
    logf = open(os.path.join(state["dir"], "haproxy.log"), "w")
    procs.start("haproxy", ["ip", "netns", "exec", NS["cl"], "haproxy", "-db", "-f", path],
                stdout=logf, stderr=logf, start_new_session=True)
    # Clients dial the balancer by its name (in every node's certificate), here on loopback.
    lb = f"https://{LB_NAME}:{PORT}"
    resolve = ["--resolve", f"{LB_NAME}:{PORT}:127.0.0.1"]

    def dead_marked_down():
        code, body = curl(NS["cl"], "http://127.0.0.1:8404/metrics")  # HAProxy's own stats
        m = re.search(rf'haproxy_server_status\{{proxy="mcpd_nodes",server="mcpd-{dead}",state="DOWN"\}} (\d)', body)
        return code == 200 and m and m.group(1) == "1"

    problems = []
    # HAProxy passes on the answer of a node that became unready since its last check (it
    # takes `fall 2` checks to mark it DOWN): test it once the survivors are ready.
    survivors = [n for n in (1, 2, 3) if n != dead]
    try:
        wait_until("the surviving nodes are ready", lambda: all(
            curl(NS["cl"], f"https://{ADDR[n]}:{PORT}/readyz")[0] == 200 for n in survivors), 20)
    except TimeoutError as e:
        problems.append(str(e))
    try:
        wait_until("haproxy marks the dead node DOWN", dead_marked_down, 20)
    except TimeoutError as e:
        problems.append(str(e))
    # Six ready answers in a row through the balancer. Right after a leader dies the survivors
    # may still settle their election; poll (with a deadline) rather than sample once.
    answers = []

    def lb_readyz():
        r = in_ns(NS["cl"], "curl", "-sS", "--cacert", state["ca"], *resolve, "--max-time", "3", "-o", "-",
                  "-w", "\n%{http_code}", f"{lb}/readyz", timeout=8)
        body, _, code = r.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body or r.stderr

    def six_ready_in_a_row():
        answers[:] = [lb_readyz() for _ in range(6)]
        return [c for c, _ in answers] == [200] * 6

    try:
        wait_until("six ready answers in a row through haproxy", six_ready_in_a_row, 15)
    except TimeoutError:
        problems.append("/readyz through haproxy: " + ", ".join(f"{c} {b.strip()[:120]}" for c, b in answers if c != 200))
    # A session's requests must reach the node that created it, whichever node that is.
    hdr = ["--cacert", state["ca"], *resolve, "-H", f"Authorization: Bearer {state['tenant']}",
           "-H", "Content-Type: application/json", "-H", "Accept: application/json, text/event-stream"]
    init = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    r = in_ns(NS["cl"], "curl", "-sS", "-D", "-", "--max-time", "10", *hdr, "-d", init, f"{lb}/servers/demo/mcp")
    m = re.search(r"(?im)^mcp-session-id:\s*(\S+)", r.stdout)
    if not m:
        problems.append(f"initialize through haproxy: {r.stdout[-300:]} {r.stderr[-200:]}")
    else:
        sid = m.group(1)
        ok = 0
        for i in range(8):
            call = json.dumps({"jsonrpc": "2.0", "id": 10 + i, "method": "tools/call",
                               "params": {"name": "echo", "arguments": {"message": f"lb {i}"}}})
            r = in_ns(NS["cl"], "curl", "-sS", "--max-time", "10", *hdr, "-H", f"Mcp-Session-Id: {sid}",
                      "-H", "MCP-Protocol-Version: 2025-06-18", "-d", call, f"{lb}/servers/demo/mcp")
            ok += f'"lb {i}"' in r.stdout
        if ok != 8:
            problems.append(f"{8 - ok} of 8 calls in one session through haproxy failed (stickiness?)")
    R.check("haproxy: TLS passthrough, /readyz checked over TLS with the CA, a session's calls served",
            not problems, "; ".join(problems), "dead node DOWN, 6 /readyz 200, 8 calls in one session")


def silent_death():
    """The VIP's holder goes silent (its link is cut at the switch: no advert, no goodbye), as
    when its host dies; a backup takes the VIP over after three missed adverts."""
    holders = vip_holders()
    if len(holders) != 1:
        R.fail("vip: the VIP moves when its holder goes silent", f"holders before: {holders}")
        return
    holder = holders[0]
    log(f"cut node {holder}'s link at the switch (it holds the VIP)")
    try:
        vip_moves("vip: the VIP moves when its holder goes silent (link cut)", holder,
                  lambda: sh("ip", "-n", NS["sw"], "link", "set", f"p{holder}", "down"), "VRRPv3, advert_int 0.1")
    finally:
        sh("ip", "-n", NS["sw"], "link", "set", f"p{holder}", "up")


def vip_moves(check, holder, fault, how):
    """Applies `fault` to the VIP's holder and checks that another node takes the VIP and
    answers through it; reports how long the move took."""
    t0 = time.monotonic()
    fault()
    try:
        new = wait_until("another node takes the VIP", lambda: next(
            (n for n in vip_holders() if n != holder), None), 40, every=0.01)
        moved = time.monotonic() - t0
        code, body = curl(NS["cl"], f"https://{VIP}:{PORT}/v1/node")
        node_id = json.loads(body).get("id") if code == 200 else None
        R.check(check, node_id == new, f"/v1/node through the VIP: {code} {body[:200]}",
                f"node {holder} -> node {new} in {moved:.2f}s ({how})")
    except TimeoutError as e:
        R.fail(check, f"{e}; holders now {vip_holders()}")


def check_logs():
    needles = [state["secret"]] if state.get("secret") else []
    for t in state["tokens"]:
        needles += [t, split_token(t)[1]]
    found, bad = [], 0
    for n in (1, 2, 3):
        text = open(os.path.join(state["dir"], f"node{n}", "mcpd.log"), errors="replace").read()
        for line in text.splitlines():
            try:
                json.loads(line)
            except ValueError:
                bad += 1
        found += [f"node{n}" for s in needles if s in text]
    bridge_log = open(os.path.join(state["dir"], "bridge.log"), errors="replace").read()
    found += ["mcp-bridge stderr" for s in needles if s in bridge_log]
    R.check("logs: VIP nodes log JSON and no token secret or env secret (nodes, bridge)", not found and bad == 0,
            f"secret in {sorted(set(found))}, {bad} non-JSON lines")


def main():
    why = preflight()
    if why:
        R.skip("vip", why)
        R.exit()
    install_signal_cleanup(cleanup)
    started = time.monotonic()
    state["dir"] = tempfile.mkdtemp(prefix="mcpcp-deploy-vip.", dir="/run" if os.path.isdir("/run") else None)
    os.chmod(state["dir"], 0o755)  # the check script runs as nobody (script_user)
    try:
        make_network()
        make_pki()
        form_cluster()
        check_sealed_env()
        start_keepalived()
        holders = wait_until("exactly one node holds the VIP", lambda: (lambda h: h if len(h) == 1 else None)(vip_holders()), 30)
        holder = holders[0]
        code, body = curl(NS["cl"], f"https://{VIP}:{PORT}/readyz")
        R.check("vip: one node holds the VIP and it answers /readyz over https (the VIP in its certificate)",
                code == 200, f"{code} {body}", f"node {holder} holds {VIP}")

        idle = int(os.environ.get("DEPLOY_VIP_IDLE_S", "0"))
        if idle > 0:
            # No flapping: the VIP stays where it is while nothing fails.
            changes, end = [], time.monotonic() + idle
            while time.monotonic() < end:
                now = vip_holders()
                if now != [holder]:
                    changes.append(f"{time.monotonic() - end + idle:.1f}s: {now}")
                time.sleep(0.5)
            R.check(f"vip: the VIP stays on node {holder} for {idle} s of idleness (advert_int 0.1)",
                    not changes, "; ".join(changes[:10]), "no change")
        bridge = Bridge()
        bridge.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "vip-test", "version": "1"}}})
        init = bridge.answer(1, 30)
        if "result" not in init:
            raise RuntimeError(f"initialize through mcp-bridge: {init}")
        bridge.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        bridge.echo(2, "before", 20)
        R.ok("vip: mcp-bridge --cacert ca.pem --url https://VIP serves calls", f"initialize + tools/call via node {holder}")

        _, body = curl(NS["cl"], f"https://{VIP}:{PORT}/readyz")
        raft_leader = json.loads(body).get("leader") if body.startswith("{") else None
        log(f"kill -9 node {holder} (holds the VIP, pid {state['nodes'][holder].pid}; Raft leader: node {raft_leader})")
        vip_moves("vip: the VIP moves to a healthy node after kill -9", holder,
                  lambda: os.kill(state["nodes"][holder].pid, signal.SIGKILL), "its port refused: watch_mcpd.sh")
        # The move came from the port watch, not from /readyz failing twice a second apart.
        klog = os.path.join(state["dir"], f"keepalived{holder}", "keepalived.log")
        watched = re.compile(r"chk_mcpd_running\W.*failed \(exited with status 1\)", re.I)
        try:
            line = wait_until("keepalived logs chk_mcpd_running failed", lambda: next(
                (ln for ln in open(klog, errors="replace") if watched.search(ln)), None), 10)
            R.ok("vip: the move after kill -9 came from watch_mcpd.sh (keepalived logged chk_mcpd_running failed)", line.strip()[-120:])
        except TimeoutError as e:
            R.fail("vip: the move after kill -9 came from watch_mcpd.sh (keepalived logged chk_mcpd_running failed)", str(e))
        try:
            t1 = time.monotonic()
            bridge.echo(3, "after", 40)
            bridge.echo(4, "again", 20)
            R.ok("vip: mcp-bridge keeps serving after the failover", f"answered {time.monotonic() - t1:.1f}s after the VIP moved")
        except (TimeoutError, RuntimeError) as e:
            R.fail("vip: mcp-bridge keeps serving after the failover", str(e))
        haproxy_check(holder)
        silent_death()
        bridge.p.stdin.close()
        procs.kill_all()
        check_logs()
        log(f"VIP test took {time.monotonic() - started:.0f}s")
    except Exception as e:  # noqa: BLE001
        R.fail("vip", f"{type(e).__name__}: {e}")
        d = state["dir"]
        for rel in ("node1/mcpd.log", "node2/mcpd.log", "node3/mcpd.log", "keepalived1/keepalived.log", "bridge.log"):
            p = os.path.join(d, rel)
            if os.path.exists(p):
                tail = open(p, errors="replace").read().splitlines()[-4:]
                print(f"  -- last lines of {rel}:\n    " + "\n    ".join(tail))
    finally:
        cleanup()
    R.exit()


if __name__ == "__main__":
    main()
