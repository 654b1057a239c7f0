#!/usr/bin/env python3
"""Live test of the monitoring deliverables against a real 3-node dev cluster.

1. `mcpctl dev up` (JSON logs, HTTPS), a metrics token made with `mcpctl token create --role
   metrics --name prometheus` in the environment of the dev directory's env file, and a real
   Prometheus on 127.0.0.1 scraping the nodes over HTTPS every second, verified with the dev
   cluster's ca.pem and with that token, with deploy/prometheus/alerts.yml loaded (its config
   is derived from deploy/prometheus/prometheus.yml: only targets, intervals, the rule path
   and the paths of its CA and token files change). The HTTPS edge itself: probes without a
   token, /metrics only to admin and metrics tokens, a metrics token that cannot write, no
   plain HTTP, and the env file's PATH finding mcpctl.
2. Load: admin writes through every node with mcpctl, MCP sessions and calls on every node
   (echo, a tool error, a crash, a cancelled call, a burst that overflows the queue, a
   malformed body, a bad token), a server that crash-loops.
3. kill -9 the leader: McpdNodeDown must go pending. More writes; kill -9 a second node and
   try a write: it fails with no_quorum and McpdQuorumLost must go pending.
4. Every PromQL expression of the Grafana dashboard and of alerts.yml must parse, every rule
   must evaluate without error, every dashboard panel must return data and every metric
   selector must return data, except metrics listed in common.PLANNED/ABSENT_BY_DESIGN.
5. Logs: every line of every node's log is one JSON object; no token secret appears in them.
6. Files: the nodes' data directories are 0700 and their files 0600, and every node holds the
   same data.key.

Everything it starts is stopped (by pid) and its temporary directory removed, also on failure.
"""

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import yaml

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ABSENT_BY_DESIGN, DEPLOY, PLANNED, Procs, Prom, Results, base_metric, binary, children_of,
    cmdline, dashboard_queries, exited, free_port, get_json, grafana_subst, http,
    install_signal_cleanup, kill_pid, log, loose_modes, McpSession, pid_alive, read_env_file, run, selectors,
    sourced_env, split_token, trust, wait_until,
)

R = Results()
procs = Procs()
state = {"dir": None, "keep": os.environ.get("DEPLOY_TEST_KEEP") == "1", "children": []}


def mcpctl(*args, endpoints=None, token=None, timeout=30):
    """mcpctl in the environment `. DIR/env` gives (endpoints, admin token, CA file), with the
    endpoints or the token replaced when given."""
    env = dict(state["env"])
    env["MCPCTL_ENDPOINTS"] = ",".join(endpoints or state["endpoints"])
    env["MCPCTL_TOKEN"] = token or state["admin"]
    return run([binary("mcpctl"), *args], timeout=timeout, env=env)


def cleanup():
    procs.kill_all()
    d = state["dir"]
    if d and os.path.isdir(d):
        try:
            run([binary("mcpctl"), "dev", "down", "--dir", d], timeout=30)
        except Exception as e:  # noqa: BLE001
            log(f"dev down: {e}")
        for n in range(1, 4):
            try:
                pid = int(open(os.path.join(d, f"node{n}", "mcpd.pid")).read())
                if pid_alive(pid) and "mcpd" in (cmdline(pid) or ""):
                    kill_pid(pid)
            except (OSError, ValueError):
                pass
    # MCP server processes of nodes that were killed -9 (they exit on stdin EOF; make sure).
    for pid, cmd in state["children"]:
        if pid_alive(pid) and cmdline(pid) == cmd:
            kill_pid(pid)
    if d and os.path.isdir(d):
        if state["keep"]:
            log(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    state["dir"] = None


def node_pid(n):
    return int(open(os.path.join(state["dir"], f"node{n}", "mcpd.pid")).read())


def remember_children():
    for n in range(1, 4):
        try:
            for c in children_of(node_pid(n)):
                if c not in state["children"]:
                    state["children"].append(c)
        except OSError:
            pass


def admin_headers():
    return {"Authorization": f"Bearer {state['admin']}"}


def leader_id(endpoints):
    for e in endpoints:
        try:
            _, body = get_json(f"{e}/readyz", timeout=2)
            if body and body.get("leader"):
                return body["leader"]
        except OSError:
            continue
    return None


# ----------------------------------------------------------------------------------- phases

def start_cluster():
    d = tempfile.mkdtemp(prefix="mcpcp-deploy-live.")
    state["dir"] = d
    args = [binary("mcpctl"), "dev", "up", "--nodes", "3", "--dir", d, "--mcpd", binary("mcpd"),
            "--mcpd-arg=--log-format=json", "--mcpd-arg=--quorum-wait-ms=1500",
            "--mcpd-arg=--snapshot-every=20", "--mcpd-arg=--pool-queue-size=1",
            "--mcpd-arg=--pool-max-concurrency=1"]
    r = run(args, timeout=90)
    if r.returncode != 0:
        raise RuntimeError(f"dev up failed: {r.stderr.strip()[-800:]}")
    env_file = os.path.join(d, "env")
    env = read_env_file(env_file)
    state["env"] = sourced_env(env_file)
    state["endpoints"] = env["MCPCTL_ENDPOINTS"].split(",")
    state["admin"] = env["MCPCTL_TOKEN"]
    state["tenant"] = env["MCP_BRIDGE_TOKEN"]
    state["tokens"] = [env["MCPCTL_TOKEN"], env["MCP_BRIDGE_TOKEN"]]
    problems = []
    if not all(e.startswith("https://") for e in state["endpoints"]):
        problems.append(f"MCPCTL_ENDPOINTS are not https:// URLs: {env['MCPCTL_ENDPOINTS']}")
    bridge_urls = env.get("MCP_BRIDGE_URL", "").split(",")
    if not all(u.startswith("https://") for u in bridge_urls):
        problems.append(f"MCP_BRIDGE_URL is not https://: {env.get('MCP_BRIDGE_URL')}")
    ca = os.path.join(d, "ca.pem")
    for var in ("MCPCTL_CACERT", "MCP_BRIDGE_CACERT"):
        v = env.get(var)
        if not v or not os.path.exists(v) or not os.path.exists(ca) or not os.path.samefile(v, ca):
            problems.append(f"{var}={v!r} is not {ca}")
    found = shutil.which("mcpctl", path=state["env"].get("PATH", ""))
    if not found or not os.path.samefile(os.path.dirname(found), os.path.dirname(binary("mcpctl"))):
        problems.append(f"after `. {env_file}`, mcpctl is {found!r}, not the one in {os.path.dirname(binary('mcpctl'))}")
    R.check("dev up: DIR/ca.pem, and DIR/env gives https:// endpoints and bridge URLs, MCPCTL_CACERT, "
            "MCP_BRIDGE_CACERT, and mcpctl on PATH", not problems, "; ".join(problems))
    if not os.path.isfile(ca):
        raise RuntimeError(f"dev up wrote no {ca}")
    state["ca"] = ca
    trust(ca)
    state["addr"] = {n: state["endpoints"][n - 1].split("://", 1)[1] for n in range(1, 4)}
    log(f"dev cluster up in {d}: {', '.join(state['endpoints'])}")


def metrics_token():
    """The token Prometheus scrapes with, made as deploy/README.md says, in the environment of
    the dev directory's env file (`. DIR/env && mcpctl token create --role metrics ...`)."""
    env_file = os.path.join(state["dir"], "env")
    r = run(["sh", "-c", '. "$1" && exec "$2" token create --role metrics --name prometheus', "sh",
             env_file, binary("mcpctl")], timeout=30)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"mcpctl token create --role metrics: exit {r.returncode}: {r.stderr.strip()[-300:]}")
    token = r.stdout.strip().splitlines()[-1].strip()
    state["metrics"] = token
    state["tokens"].append(token)
    path = os.path.join(state["dir"], "prometheus-metrics-token")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(token + "\n")
    return path


def check_edge():
    """What the HTTPS edge promises an operator, on every node."""
    problems = []
    auth = lambda t: {"Authorization": f"Bearer {t}"}  # noqa: E731
    for n, base in enumerate(state["endpoints"], 1):
        for path in ("/livez", "/readyz"):
            st, _, body = http("GET", f"{base}{path}", timeout=5)
            if st != 200:
                problems.append(f"node {n} {path} without a token: {st}")
        st, _, body = http("GET", f"{base}/readyz", timeout=5)
        mode = json.loads(body or b"{}").get("tls")
        if mode != "cluster":
            problems.append(f"node {n} /readyz says tls={mode!r}, not 'cluster'")
        for who, headers, want in (("no token", {}, (401,)), ("a tenant token", auth(state["tenant"]), (401, 403)),
                                   ("the metrics token", auth(state["metrics"]), (200,)),
                                   ("the admin token", auth(state["admin"]), (200,))):
            st, _, _ = http("GET", f"{base}/metrics", headers=headers, timeout=5)
            if st not in want:
                problems.append(f"node {n} /metrics with {who}: {st}, want {'/'.join(map(str, want))}")
        try:
            st, _, _ = http("GET", base.replace("https://", "http://", 1) + "/livez", timeout=5)
            if st == 200:
                problems.append(f"node {n} answers plain http://")
        except Exception:  # noqa: BLE001 - refused, reset or garbled: no plain HTTP, as wanted
            pass
    r = mcpctl("tenant", "add", "written-by-metrics", token=state["metrics"])
    if r.returncode == 0:
        problems.append("the metrics token could write (tenant add succeeded)")
    R.check("edge: probes without a token, /metrics to admin and metrics tokens only, "
            "a metrics token cannot write, no plain HTTP, /readyz says tls=cluster", not problems,
            "; ".join(problems[:6]))


def start_prometheus():
    d = state["dir"]
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        cfg = yaml.safe_load(f)
    port = free_port()
    cfg["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    cfg["rule_files"] = [os.path.join(DEPLOY, "prometheus", "alerts.yml")]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    if "mcpd" not in jobs:
        raise RuntimeError("deploy/prometheus/prometheus.yml has no job_name: mcpd")
    mcpd = jobs["mcpd"]
    mcpd.pop("file_sd_configs", None)
    mcpd["static_configs"] = [{"targets": list(state["addr"].values())}]
    # The scrape as deploy/prometheus/prometheus.yml has it (HTTPS, verified, with a token
    # file); only where its CA and token files are changes.
    problems = []
    if mcpd.get("scheme") != "https":
        problems.append(f"scheme {mcpd.get('scheme')!r}")
    if not (mcpd.get("tls_config") or {}).get("ca_file"):
        problems.append("no tls_config.ca_file")
    if not (mcpd.get("authorization") or {}).get("credentials_file"):
        problems.append("no authorization.credentials_file")
    if problems:
        raise RuntimeError("deploy/prometheus/prometheus.yml does not scrape as mcpd needs: " + ", ".join(problems))
    mcpd["tls_config"]["ca_file"] = state["ca"]
    mcpd["authorization"]["credentials_file"] = metrics_token()
    if "prometheus" in jobs:
        jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    path = os.path.join(d, "prometheus.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    r = run(["promtool", "check", "config", path])
    if r.returncode != 0:
        raise RuntimeError(f"derived config invalid: {r.stdout}{r.stderr}")
    logf = open(os.path.join(d, "prometheus.log"), "w")
    procs.start("prometheus", [
        "prometheus", f"--config.file={path}", f"--storage.tsdb.path={os.path.join(d, 'tsdb')}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ], stdout=logf, stderr=logf)
    prom = Prom(f"http://127.0.0.1:{port}")
    wait_until("Prometheus ready", lambda: http("GET", f"{prom.base}/-/ready", timeout=2)[0] == 200, 30)
    try:
        wait_until("all three nodes scraped", lambda: sum(
            1 for t in prom.targets() if t["labels"]["job"] == "mcpd" and t["health"] == "up") == 3, 30)
    except TimeoutError as e:
        errors = sorted({f"{t['scrapeUrl']}: {t.get('lastError')}" for t in prom.targets() if t["health"] != "up"})
        raise RuntimeError(f"{e}: {'; '.join(errors)[:600]}") from None
    R.ok("prometheus: scrapes every node over https with the dev cluster's ca.pem and a metrics token",
         f"127.0.0.1:{port}, 3 targets up")
    return prom


def admin_load(rounds, endpoints_by_node):
    """Writes through each node in turn (followers forward to the leader), and reads."""
    failures = []
    nodes = list(endpoints_by_node)
    for i in range(rounds):
        n = nodes[i % len(nodes)]
        name = f"load{int(time.time() * 1000) % 10**9}-{i}"
        r = mcpctl("tenant", "add", name, endpoints=[endpoints_by_node[n]])
        if r.returncode != 0:
            failures.append(r.stderr.strip()[-200:])
        if i % 3 == 0:
            mcpctl("tenant", "rm", name, endpoints=[endpoints_by_node[n]])
        if i % 5 == 0:
            mcpctl("server", "list", endpoints=[endpoints_by_node[n]])
    return failures


def mcp_load():
    """MCP traffic on every node; returns a list of problems."""
    problems = []
    sessions = []
    for n in range(1, 4):
        base = state["endpoints"][n - 1]
        s = McpSession(base, "demo", state["tenant"])
        s.initialize()
        sessions.append(s)
        for i in range(10):
            st, _, a = s.call("echo", {"message": f"hello {i}"})
            text = ((a or {}).get("result", {}).get("content") or [{}])[0].get("text")
            if st != 200 or text != f"hello {i}":
                problems.append(f"node {n} echo: {st} {a}")
        s.request("tools/list")
        s.request("ping")
        s.call("fail", {"message": "as asked"})                   # outcome tool_error
        s.call("crash")                                           # outcome crashed, a restart
        # A call cancelled by the client while it runs.
        th = threading.Thread(target=lambda: s.call("sleep", {"ms": 3000}, id="cancel-me", timeout=20))
        th.start()
        wait_until(f"the sleep call running on node {n}", lambda: calls_in_flight(base, "demo") >= 1, 10)
        s.notify("notifications/cancelled", {"requestId": "cancel-me", "reason": "deploy test"})
        th.join(20)
        # Malformed JSON-RPC and a bad token.
        http("POST", f"{base}/servers/demo/mcp", "{not json", {
            "Authorization": f"Bearer {state['tenant']}", "Content-Type": "application/json"})
        tid, _ = split_token(state["tenant"])
        state["bogus"] = f"mcpt_{tid}_deployTestWrongSecretXXXXXXXXXXXXXXXXXXXXXX"
        http("POST", f"{base}/servers/demo/mcp", "{}", {
            "Authorization": f"Bearer {state['bogus']}", "Content-Type": "application/json"})
    # A burst that overflows every node's queue (2 processes x 1 call + 1 queued).
    outcomes = []

    def slow(s):
        try:
            st, _, a = s.call("sleep", {"ms": 800}, timeout=20)
            outcomes.append((a or {}).get("error", {}).get("message", "ok"))
        except Exception as e:  # noqa: BLE001
            outcomes.append(str(e))

    threads = [threading.Thread(target=slow, args=(s,)) for s in sessions for _ in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    busy = sum(1 for o in outcomes if "busy" in o or "queued" in o)
    # Whether the queue overflowed shows in mcpd_pool_queue_rejections_total (checked with
    # every other selector); the routing layer may retry a refused call on another node.
    log(f"burst: {len(outcomes)} calls, {busy} answered with a full queue")
    return problems


def alert_state(prom, name, **labels):
    for a in prom.alerts():
        if a["labels"].get("alertname") == name and all(a["labels"].get(k) == v for k, v in labels.items()):
            return a["state"]
    return None


def calls_in_flight(base, server):
    """mcpd_pool_calls_in_flight of `server` on the node at `base`."""
    _, _, body = http("GET", f"{base}/metrics", headers=admin_headers())
    needle = f'mcpd_pool_calls_in_flight{{server="{server}"}} '
    return sum(float(line[len(needle):]) for line in body.decode().splitlines() if line.startswith(needle))


def wait_scrapes(prom, count, deadline_s=30):
    """Waits until Prometheus has scraped every healthy target and evaluated its rule groups
    `count` more times: what the nodes exported before the call is then in the queries."""
    first, seen = {}, {}

    def enough():
        _, rules = get_json(f"{prom.base}/api/v1/rules")
        stamps = [(t["scrapeUrl"], t.get("lastScrape")) for t in prom.targets() if t.get("health") == "up"]
        stamps += [(f"rules {g['name']}", g.get("lastEvaluation")) for g in rules["data"]["groups"]]
        for key, stamp in stamps:
            if key not in first:
                first[key], seen[key] = stamp, set()
            elif stamp != first[key]:
                seen[key].add(stamp)
        return bool(stamps) and all(len(seen[k]) >= count for k, _ in stamps)

    wait_until(f"{count} scrapes of every target and evaluations of every rule group", enough, deadline_s)


def evaluate_everything(prom):
    with open(os.path.join(DEPLOY, "grafana", "dashboards", "mcpd-overview.json")) as f:
        dash = json.load(f)
    with open(os.path.join(DEPLOY, "prometheus", "alerts.yml")) as f:
        rules = [(r["alert"], r["expr"]) for g in yaml.safe_load(f)["groups"] for r in g["rules"]]

    exempt = {**PLANNED, **ABSENT_BY_DESIGN}
    parse_errors, empty_panels, empty_selectors, exempted = [], [], [], {}
    checked_selectors = {}
    items = [(w, e, k) for (w, e, k) in dashboard_queries(dash)]
    items += [(f"alert {name}", expr, "alert") for name, expr in rules]
    n_panel = 0
    for where, expr, kind in items:
        if kind == "variable":
            # label_values(selector, label)
            inner = expr[len("label_values("):-1]
            sel, label = inner.rsplit(",", 1)
            try:
                vals = prom.label_values(label.strip(), sel.strip())
            except ValueError as e:
                parse_errors.append(f"{where}: {e}")
                continue
            if not vals:
                empty_panels.append(f"{where}: no values")
            continue
        q = grafana_subst(expr)
        try:
            result = prom.query(q)
        except ValueError as e:
            parse_errors.append(f"{where}: {e}: {q}")
            continue
        sels = selectors(q)
        planned_only = sels and all(base_metric(m) in exempt for m, _ in sels)
        if kind == "panel":
            n_panel += 1
            if not result and not planned_only:
                empty_panels.append(f"{where}: {q}")
        for metric, sel in sels:
            key = base_metric(metric)
            if sel in checked_selectors:
                has = checked_selectors[sel]
            else:
                has = bool(prom.query(sel))
                checked_selectors[sel] = has
            if not has:
                if key in exempt:
                    exempted.setdefault(key, exempt[key])
                else:
                    empty_selectors.append(f"{where}: {sel}")
    R.check("promql: every dashboard and alert expression parses", not parse_errors,
            "; ".join(parse_errors[:5]), f"{len(items)} expressions")
    R.check("promql: every dashboard panel query returns data", not empty_panels,
            "; ".join(empty_panels[:8]), f"{n_panel} panel queries")
    R.check("promql: every metric selector returns data (except the listed planned/absent ones)",
            not empty_selectors, "; ".join(sorted(set(empty_selectors))[:8]),
            f"{len(checked_selectors)} selectors")
    for metric, why in sorted(exempted.items()):
        log(f"no data, as expected: {metric} ({why})")
    bad = [f"{r['name']}: {r.get('lastError')}" for r in prom.rules() if r.get("health") != "ok"]
    R.check("rules: every alert rule evaluates without error", not bad, "; ".join(bad[:5]),
            f"{len(prom.rules())} rules")


def check_logs():
    d = state["dir"]
    bad_lines, secrets_found, lines = [], [], 0
    needles = []
    for t in state["tokens"] + [state.get("bogus", "")]:
        if not t:
            continue
        needles.append(t)
        try:
            needles.append(split_token(t)[1])
        except ValueError:
            pass
    for n in range(1, 4):
        path = os.path.join(d, f"node{n}", "mcpd.log")
        with open(path, errors="replace") as f:
            text = f.read()
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            lines += 1
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not {"timestamp", "level", "target"} <= obj.keys():
                    raise ValueError("not an object with timestamp, level, target")
            except ValueError as e:
                bad_lines.append(f"node{n}/mcpd.log:{i}: {e}: {line[:120]}")
        for s in needles:
            if s in text:
                secrets_found.append(f"node{n}/mcpd.log contains a token secret ({s[:9]}...)")
    R.check("logs: --log-format json writes one JSON object per line", not bad_lines and lines > 0,
            "; ".join(bad_lines[:3]) or "no log lines", f"{lines} lines from 3 nodes")
    R.check("logs: no token secret in any node log", not secrets_found, "; ".join(secrets_found),
            f"{len(needles)} secrets searched")


def check_modes():
    """The nodes' data directories, which dev up created and the nodes filled: 0700, files 0600."""
    bad = []
    for n in range(1, 4):
        data = os.path.join(state["dir"], f"node{n}", "data")
        bad += [f"node{n}/data/{b}" for b in loose_modes(data)]
    R.check("data dirs: 0700, files 0600 (certificates may be 0644) on every node", not bad, "; ".join(bad[:8]))
    keys = {}
    for n in range(1, 4):
        path = os.path.join(state["dir"], f"node{n}", "data", "tls", "data.key")
        keys[n] = open(path).read().strip() if os.path.exists(path) else None
    missing = [f"node{n}" for n, k in keys.items() if k is None]
    R.check("dev up: every node's TLS directory holds the same data.key", not missing and len(set(keys.values())) == 1,
            f"no data.key in {missing}" if missing else "the nodes' data.key files differ")


def main():
    for b in ("mcpd", "mcpctl"):
        if not os.access(binary(b), os.X_OK):
            R.fail("live", f"{binary(b)} not built (cargo build first)")
            R.exit()
    if not shutil.which("prometheus"):
        R.fail("live", "prometheus not installed (apt-get install prometheus)")
        R.exit()
    install_signal_cleanup(cleanup)
    started = time.monotonic()
    try:
        start_cluster()
        prom = start_prometheus()
        check_edge()
        by_node = {n: state["endpoints"][n - 1] for n in range(1, 4)}

        # A server that crash-loops, and a token created through the CLI.
        r = mcpctl("server", "add", "broken", "--", shutil.which("false") or "/bin/false")
        if r.returncode != 0:
            raise RuntimeError(f"server add broken: {r.stderr.strip()}")
        r = mcpctl("token", "create", "--tenant", "default", "--name", "deploy-test")
        if r.returncode != 0:
            raise RuntimeError(f"token create: {r.stderr.strip()}")
        state["tokens"].append(r.stdout.strip())
        s = McpSession(by_node[1], "demo", r.stdout.strip())
        s.initialize()
        s.call("echo", {"message": "with the new token"})

        failures = admin_load(30, by_node)
        R.check("load: admin writes through every node", not failures, "; ".join(failures[:3]), "30 writes")
        problems = mcp_load()
        R.check("load: MCP calls on every node", not problems, "; ".join(problems[:3]))
        remember_children()
        wait_scrapes(prom, 2)

        # kill -9 the leader: its node-down alert goes pending.
        lead = leader_id(state["endpoints"])
        if not lead:
            raise RuntimeError("no leader known")
        log(f"kill -9 node {lead} (the leader, pid {node_pid(lead)})")
        os.kill(node_pid(lead), signal.SIGKILL)
        t0 = time.monotonic()
        try:
            st = wait_until("McpdNodeDown pending", lambda: alert_state(
                prom, "McpdNodeDown", instance=state["addr"][lead]), 30, every=0.5)
            R.ok("alert: McpdNodeDown goes pending after kill -9", f"{st} after {time.monotonic() - t0:.1f}s")
        except TimeoutError as e:
            R.fail("alert: McpdNodeDown goes pending after kill -9", str(e))
        try:
            st = wait_until("McpdQuorumAtRisk pending", lambda: alert_state(prom, "McpdQuorumAtRisk"), 20, every=0.5)
            R.ok("alert: McpdQuorumAtRisk goes pending with one node down", st)
        except TimeoutError as e:
            R.fail("alert: McpdQuorumAtRisk goes pending with one node down", str(e))

        survivors = {n: e for n, e in by_node.items() if n != lead}
        new_lead = wait_until("a new leader among the survivors", lambda: (
            lambda l: l if l in survivors else None)(leader_id(list(survivors.values()))), 20)
        failures = admin_load(10, survivors)
        R.check("load: writes go on with two of three nodes", not failures, "; ".join(failures[:3]))
        for n, e in survivors.items():
            ms = McpSession(e, "demo", state["tenant"])
            ms.initialize()
            ms.call("echo", {"message": "after the kill"})
        remember_children()

        # kill -9 the other follower: the survivor has no quorum; a write fails with no_quorum.
        victim = next(n for n in survivors if n != new_lead)
        log(f"kill -9 node {victim} (pid {node_pid(victim)}); node {new_lead} is left alone")
        victim_pid = node_pid(victim)
        os.kill(victim_pid, signal.SIGKILL)
        wait_until(f"node {victim} gone", lambda: exited(victim_pid), 10)
        r = mcpctl("tenant", "add", "never-committed", endpoints=[by_node[new_lead]], timeout=30)
        R.check("cluster: a write without quorum fails (503 no_quorum)",
                r.returncode != 0 and "quorum" in r.stderr.lower(),
                f"the write succeeded: {r.stdout.strip()}", r.stderr.strip().splitlines()[-1][:120] if r.stderr.strip() else "")
        try:
            st = wait_until("McpdQuorumLost pending", lambda: alert_state(prom, "McpdQuorumLost"), 30, every=0.5)
            R.ok("alert: McpdQuorumLost goes pending with two nodes down", st)
        except TimeoutError as e:
            R.fail("alert: McpdQuorumLost goes pending with two nodes down", str(e))
        try:
            st = wait_until("McpdServerCrashLooping", lambda: alert_state(
                prom, "McpdServerCrashLooping", server="broken"), 20, every=0.5)
            R.ok("alert: McpdServerCrashLooping goes pending for a server that exits at once", st)
        except TimeoutError as e:
            R.fail("alert: McpdServerCrashLooping goes pending for a server that exits at once", str(e))
        wait_scrapes(prom, 2)
        evaluate_everything(prom)
        pending = sorted({a["labels"]["alertname"] + ":" + a["state"] for a in prom.alerts()})
        log("alerts at the end: " + ", ".join(pending))
        procs.kill_all()
        run([binary("mcpctl"), "dev", "down", "--dir", state["dir"]], timeout=30)
        check_logs()
        check_modes()
        log(f"live test took {time.monotonic() - started:.0f}s")
    except Exception as e:  # noqa: BLE001
        R.fail("live", f"{type(e).__name__}: {e}")
        d = state["dir"]
        if d:
            for n in range(1, 4):
                p = os.path.join(d, f"node{n}", "mcpd.log")
                if os.path.exists(p):
                    tail = open(p, errors="replace").read().splitlines()[-5:]
                    print(f"  -- last lines of node{n}/mcpd.log:\n    " + "\n    ".join(tail))
    finally:
        cleanup()
    R.exit()


if __name__ == "__main__":
    main()
