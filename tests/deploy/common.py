"""Helpers shared by the deploy tests: results, processes, HTTP, MCP, PromQL.

Standard library only (plus PyYAML for reading deploy/prometheus/*.yml), so the tests run
with Debian's /usr/bin/python3 and python3-yaml.
"""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")
BIN = os.environ.get("MCPCP_BIN_DIR", os.path.join(ROOT, "target", "debug"))


def binary(name):
    return os.path.join(BIN, name)


# ------------------------------------------------------------------------------------ results

class Results:
    """Collects PASS/FAIL/SKIP lines; each is printed as it happens."""

    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def ok(self, name, detail=""):
        self.passed += 1
        print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)

    def fail(self, name, why):
        self.failed += 1
        print(f"FAIL {name}: {why}", flush=True)

    def skip(self, name, why):
        self.skipped += 1
        print(f"SKIP {name}: {why}", flush=True)

    def check(self, name, cond, why="", detail=""):
        if cond:
            self.ok(name, detail)
        else:
            self.fail(name, why)
        return cond

    def exit(self):
        sys.exit(1 if self.failed else 0)


def log(msg):
    print(f"  .. {msg}", flush=True)


# ---------------------------------------------------------------------------------- processes

class Procs:
    """Processes this test started, ended by their pid (never by name) on cleanup."""

    def __init__(self):
        self.procs = []  # (pid, what, Popen or None)
        self.lock = threading.Lock()

    def start(self, what, argv, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, **kw)
        with self.lock:
            self.procs.append((p.pid, what, p))
        return p

    def adopt(self, pid, what):
        with self.lock:
            self.procs.append((pid, what, None))

    def kill_all(self):
        with self.lock:
            procs = list(reversed(self.procs))
            self.procs.clear()
        for pid, what, p in procs:
            if p is not None:
                if p.poll() is None:
                    try:
                        p.terminate()
                        p.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(timeout=5)
                    except ProcessLookupError:
                        pass
            else:
                kill_pid(pid)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def exited(pid):
    """Whether process `pid` has exited (a zombie not reaped yet counts, unlike pid_alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def kill_pid(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def children_of(pid):
    """Direct children of pid (from /proc), with their command lines."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == pid:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                out.append((int(d), cmd))
        except (OSError, ValueError):
            continue
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def install_signal_cleanup(cleanup):
    """Runs cleanup on SIGTERM/SIGINT/SIGHUP too, then exits."""

    def handler(signum, _frame):
        print(f"  .. signal {signum}: cleaning up", flush=True)
        try:
            cleanup()
        finally:
            os._exit(1)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, handler)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv, timeout=60, check=False, env=None, input=None):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return r


def wait_until(what, fn, deadline_s, every=0.2):
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - polled until the deadline
            last = e
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {deadline_s}s" + (f" (last error: {last})" if last else ""))


# --------------------------------------------------------------------------------------- HTTP

_tls = {"context": None}


def trust(ca_file):
    """From now on, https:// URLs are verified against `ca_file` (a cluster's ca.pem),
    host names and addresses included."""
    _tls["context"] = ssl.create_default_context(cafile=ca_file)


def http(method, url, body=None, headers=None, timeout=10, context=None):
    """Returns (status, headers dict with lower-case names, body bytes). https:// URLs are
    verified with `context`, else the CA given to `trust`, else the system's roots."""
    data = body if isinstance(body, (bytes, type(None))) else body.encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    ctx = (context or _tls["context"]) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def get_json(url, timeout=10, headers=None):
    status, _, body = http("GET", url, headers=headers, timeout=timeout)
    return status, (json.loads(body) if body else None)


# ---------------------------------------------------------------------------------------- MCP

class McpSession:
    """A Streamable HTTP session (2025-06-18) with one node's /servers/NAME/mcp."""

    def __init__(self, base, server, token, protocol="2025-06-18"):
        self.url = f"{base}/servers/{server}/mcp"
        self.token = token
        self.protocol = protocol
        self.session = None
        self.next_id = 1
        self.lock = threading.Lock()

    def _headers(self):
        h = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        }
        if self.session:
            h["Mcp-Session-Id"] = self.session
            h["MCP-Protocol-Version"] = self.protocol
        return h

    def post(self, msg, timeout=15):
        status, headers, body = http("POST", self.url, json.dumps(msg), self._headers(), timeout)
        if headers.get("content-type", "").startswith("text/event-stream"):
            # The answer is the last `data:` event that carries our id.
            answer = None
            for line in body.decode().splitlines():
                if line.startswith("data:"):
                    m = json.loads(line[5:].strip())
                    if "id" in m and m.get("id") == msg.get("id"):
                        answer = m
            return status, headers, answer
        return status, headers, (json.loads(body) if body.strip() else None)

    def initialize(self):
        status, headers, answer = self.post({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": self.protocol, "capabilities": {},
                       "clientInfo": {"name": "deploy-test", "version": "1"}},
        })
        if status != 200 or "result" not in (answer or {}):
            raise RuntimeError(f"initialize: {status} {answer}")
        self.session = headers.get("mcp-session-id")
        s, _, _ = self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        if s != 202:
            raise RuntimeError(f"notifications/initialized: {s}")
        return answer

    def request(self, method, params=None, timeout=15, id=None):
        with self.lock:
            if id is None:
                id = self.next_id
                self.next_id += 1
        msg = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            msg["params"] = params
        return self.post(msg, timeout)

    def call(self, tool, args=None, timeout=15, id=None):
        return self.request("tools/call", {"name": tool, "arguments": args or {}}, timeout, id)

    def notify(self, method, params=None):
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        return self.post(msg)


def split_token(token):
    """mcpt_<12 hex id>_<secret> -> (id, secret). The secret may contain '_'."""
    m = re.fullmatch(r"mcpt_([0-9a-f]+)_(.+)", token.strip())
    if not m:
        raise ValueError("token does not look like mcpt_<id>_<secret>")
    return m.group(1), m.group(2)


def read_env_file(path):
    """The `export NAME='value'` lines of a `mcpctl dev up` env file."""
    env = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"export (\w+)='(.*)'$", line.strip())
            if m:
                env[m.group(1)] = m.group(2)
    return env


def sourced_env(path):
    """The environment a shell has after `. path` (PATH changes included), as a dict."""
    r = subprocess.run(["sh", "-c", '. "$1" && env -0', "sh", path], capture_output=True, timeout=10,
                       env=dict(os.environ))
    if r.returncode != 0:
        raise RuntimeError(f". {path}: exit {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}")
    return dict(kv.split("=", 1) for kv in r.stdout.decode().split("\0") if "=" in kv)


# What `mcpctl cluster ca create` makes and every node's TLS directory must hold before its
# first start: the CA's certificate and key, and the cluster's data key (it seals server `env`
# values at rest; the same on every node, never replicated).
CLUSTER_FILES = ("ca.pem", "ca.key", "data.key")


def make_ca(directory, cluster_id):
    """`mcpctl cluster ca create`: directory/ca.pem, and directory/ca.key and directory/data.key
    (0600; the data key 64 hex digits). Returns the three paths."""
    r = run([binary("mcpctl"), "cluster", "ca", "create", "--dir", directory, "--cluster-id", cluster_id], timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"mcpctl cluster ca create: exit {r.returncode}: {(r.stdout + r.stderr).strip()[-500:]}")
    for f in CLUSTER_FILES:
        if not os.path.isfile(os.path.join(directory, f)):
            raise RuntimeError(f"mcpctl cluster ca create wrote no {f} in {directory}")
    for f in ("ca.key", "data.key"):
        mode = os.stat(os.path.join(directory, f)).st_mode & 0o777
        if mode != 0o600:
            raise RuntimeError(f"mcpctl cluster ca create wrote {f} with mode {oct(mode)}, not 0600")
    with open(os.path.join(directory, "data.key")) as f:
        if not re.fullmatch(r"[0-9a-f]{64}", f.read().strip()):
            raise RuntimeError(f"{directory}/data.key is not 64 hex digits")
    return tuple(os.path.join(directory, f) for f in CLUSTER_FILES)


def loose_modes(root):
    """Entries under a node's data dir that others could read: directories not 0700, files
    not 0600. A certificate (*.pem) is public and may be 0644; its key may not."""
    bad = []
    for dirpath, _dirs, files in os.walk(root):
        entries = [(dirpath, (0o700,))] + [(os.path.join(dirpath, f), (0o600, 0o644) if f.endswith(".pem") else (0o600,))
                                         for f in files]
        for path, allowed in entries:
            st = os.lstat(path)
            if not os.path.islink(path) and st.st_mode & 0o777 not in allowed:
                bad.append(f"{os.path.relpath(path, root)} {oct(st.st_mode & 0o777)}")
    return bad


def openssl_cert(d, name, sans, cn="deploy-check"):
    """A self-signed certificate (which is also its own CA) and its key: (cert path, key path)."""
    crt, key = os.path.join(d, f"{name}.pem"), os.path.join(d, f"{name}.key")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", crt, "-days", "2", "-subj", f"/CN={cn}", "-addext", f"subjectAltName={sans}"],
        check=True)
    return crt, key


def install_ca(ca_dir, tls_dir):
    """Puts the cluster CA and data key into a node's TLS directory as an operator does before
    its first start: the directory and the data directory holding it 0700; ca.pem, ca.key and
    data.key 0600, copied from ca_dir (so every node made from one ca_dir has the same keys)."""
    data = os.path.dirname(os.path.abspath(tls_dir))
    os.makedirs(data, mode=0o700, exist_ok=True)
    os.chmod(data, 0o700)
    os.makedirs(tls_dir, mode=0o700, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    for f in CLUSTER_FILES:
        dst = os.path.join(tls_dir, f)
        with open(os.path.join(ca_dir, f), "rb") as src, open(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            out.write(src.read())
        os.chmod(dst, 0o600)


# ------------------------------------------------------------------------------------- PromQL

# Metric names the deploy files may reference that the code does not export (yet), and why.
# A selector over one of these may return nothing; every other selector must return data.
PLANNED = {
    "mcpd_breaker_state": "planned: circuit breaker state per (server, node)",
    "mcpd_breaker_short_circuits_total": "planned: routing layer (node/src/route)",
    "mcpd_breaker_transitions_total": "planned: routing layer (node/src/route)",
    "mcpd_retries_total": "planned: routing layer (node/src/route)",
    "mcpd_retry_budget_exhausted_total": "planned: routing layer (node/src/route)",
    "mcpd_fallbacks_total": "planned: routing layer (node/src/route)",
    "mcpd_peer_forwards_total": "planned: routing layer (node/src/route)",
    "mcpd_peer_calls_served_total": "planned: routing layer (node/src/route)",
    "mcpd_placement_changes_total": "planned: placement of servers with replicas (node/src/route)",
}
ABSENT_BY_DESIGN = {
    "mcpd_raft_snapshot_installs_total": "only once a leader sends a snapshot to a lagging or new node",
    "mcpd_mcp_input_required_total": "only with 2026-07-28 (stateless) clients using input requests",
    "mcpd_mcp_parked_calls": "only with 2026-07-28 (stateless) clients using input requests",
    "mcpd_mcp_listen_streams": "only with 2026-07-28 (stateless) clients using subscriptions/listen",
    "mcpd_pool_dedicated_processes": "only while a server with session_mode dedicated has a session",
    "mcpd_mcp_sessions_recovered_total": "only once a session created on one node continues on another",
    "ALERTS": "only while an alert is pending or firing",
}

# Grafana's variables, as the dashboard uses them, replaced by what "All" means.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$instance": ".*",
    "$server": ".*",
}

SELECTOR = re.compile(r"\b(mcpd_[A-Za-z0-9_]+|up|ALERTS)\b(\s*\{[^}]*\})?(?!\s*\()")


def grafana_subst(expr):
    for k in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(k, GRAFANA_VARS[k])
    return expr


def selectors(expr):
    """The vector selectors of a PromQL expression: [(metric, 'metric{matchers}')]."""
    out = []
    for m in SELECTOR.finditer(expr):
        name = m.group(1)
        sel = name + (m.group(2) or "").strip()
        if (name, sel) not in out:
            out.append((name, sel))
    return out


def base_metric(name):
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name[: -len(suffix)] in PLANNED:
            return name[: -len(suffix)]
    return name


class Prom:
    def __init__(self, base):
        self.base = base

    def query(self, expr):
        q = urllib.parse.urlencode({"query": expr})
        status, body = get_json(f"{self.base}/api/v1/query?{q}")
        if body is None or body.get("status") != "success":
            raise ValueError((body or {}).get("error", f"HTTP {status}"))
        return body["data"]["result"]

    def label_values(self, label, match):
        q = urllib.parse.urlencode({"match[]": match})
        status, body = get_json(f"{self.base}/api/v1/label/{label}/values?{q}")
        if body is None or body.get("status") != "success":
            raise ValueError((body or {}).get("error", f"HTTP {status}"))
        return body["data"]

    def alerts(self):
        _, body = get_json(f"{self.base}/api/v1/alerts")
        return body["data"]["alerts"]

    def rules(self):
        _, body = get_json(f"{self.base}/api/v1/rules")
        return [r for g in body["data"]["groups"] for r in g["rules"]]

    def targets(self):
        _, body = get_json(f"{self.base}/api/v1/targets")
        return body["data"]["activeTargets"]


def dashboard_queries(dash):
    """(where, expr, kind) for every PromQL expression in a Grafana dashboard."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"], "panel"))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f"annotation {a.get('name')!r}", a["expr"], "annotation"))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            out.append((f"variable {v.get('name')!r}", q, "variable"))
    return out


def toml_keys(table, prefix=""):
    """Every key a parsed TOML table sets, dotted (`raft.heartbeat_ms`)."""
    keys = set()
    for k, v in table.items():
        if isinstance(v, dict):
            keys |= toml_keys(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys
