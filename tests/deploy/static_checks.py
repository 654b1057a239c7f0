#!/usr/bin/env python3
"""Checks of the files in deploy/ that need no running cluster.

promtool (config, rules, rule unit tests), the alert rules' conventions, METRICS.md against
the metric names in node/src and in the dashboard/alerts, the Grafana dashboard's structure
and provisioning, the systemd unit (systemd-analyze verify and offline security score), the
example mcpd.toml against node/src/config.rs (and mcpd starting with it), the compose file
(docker-compose config), the Dockerfile (a syntax and consistency lint: no Docker engine
here), keepalived (-t) and HAProxy (-c).
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib

import yaml

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DEPLOY, PLANNED, ROOT, Results, base_metric, binary, dashboard_queries, grafana_subst, run, selectors,
)

R = Results()
PROM = os.path.join(DEPLOY, "prometheus")


def need(tool, name):
    if shutil.which(tool):
        return True
    R.skip(name, f"{tool} not installed")
    return False


def cmd_check(name, argv, cwd=None, timeout=120):
    r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    out = (r.stdout + r.stderr).strip()
    R.check(name, r.returncode == 0, out[-1500:], out.splitlines()[-1] if out else "")
    return r.returncode == 0


# ------------------------------------------------------------------------------- prometheus

def prometheus():
    if not shutil.which("promtool"):
        R.fail("promtool", "not installed (Debian package prometheus): the rules cannot be checked")
        return
    cmd_check("promtool check config deploy/prometheus/prometheus.yml", ["promtool", "check", "config", "prometheus.yml"], cwd=PROM)
    # The file_sd alternative the comments describe, with the example targets file.
    with open(os.path.join(PROM, "prometheus.yml")) as f:
        cfg = yaml.safe_load(f)
    for job in cfg["scrape_configs"]:
        if job["job_name"] == "mcpd":
            job.pop("static_configs", None)
            job["file_sd_configs"] = [{"files": [os.path.join(PROM, "targets", "mcpd*.json")]}]
    cfg["rule_files"] = [os.path.join(PROM, "alerts.yml")]
    with open(os.path.join(PROM, "targets", "mcpd.json")) as f:
        sd = json.load(f)
    sd_ok = isinstance(sd, list) and all(isinstance(g.get("targets"), list) for g in sd)
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as tmp:
        yaml.safe_dump(cfg, tmp)
        tmp.flush()
        r = run(["promtool", "check", "config", tmp.name])
    R.check("promtool check config with file_sd (targets/mcpd.json)", r.returncode == 0 and sd_ok,
            (r.stdout + r.stderr).strip()[-500:] or "targets/mcpd.json is not a list of {targets: [...]}")
    cmd_check("promtool check rules deploy/prometheus/alerts.yml", ["promtool", "check", "rules", "alerts.yml"], cwd=PROM)
    cmd_check("promtool test rules deploy/prometheus/alerts_test.yml", ["promtool", "test", "rules", "alerts_test.yml"], cwd=PROM)

    with open(os.path.join(PROM, "alerts.yml")) as f:
        rules = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    with open(os.path.join(PROM, "alerts_test.yml")) as f:
        tests = yaml.safe_load(f)["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    problems = []
    for r in rules:
        name = r.get("alert", "?")
        if r.get("labels", {}).get("severity") not in ("critical", "warning"):
            problems.append(f"{name}: severity must be critical or warning")
        if not {"summary", "description"} <= set(r.get("annotations", {})):
            problems.append(f"{name}: needs summary and description")
        if not name.startswith("Mcpd"):
            problems.append(f"{name}: alert names start with Mcpd")
        if 'job="mcpd"' not in r["expr"]:
            problems.append(f"{name}: select job=\"mcpd\"")
        if name not in tested:
            problems.append(f"{name}: no test in alerts_test.yml expects it to fire")
    R.check("alerts: severity, summary/description, job selector, a firing test for each", not problems,
            "; ".join(problems), f"{len(rules)} alerts")


# ---------------------------------------------------------------------------------- metrics

def documented_metrics():
    with open(os.path.join(DEPLOY, "METRICS.md")) as f:
        text = f.read()
    planned_part = text[text.index("## Planned"):text.index("## Label cardinality")]
    table = lambda t: set(re.findall(r"^\| `(mcpd_[a-z0-9_]+)` \|", t, flags=re.M))  # noqa: E731
    return table(text), table(planned_part)


def code_metrics():
    names = {}
    for path in glob.glob(os.path.join(ROOT, "node", "src", "**", "*.rs"), recursive=True):
        with open(path) as f:
            for m in re.finditer(r'"(mcpd_[a-z0-9_]+)"', f.read()):
                names.setdefault(m.group(1), os.path.relpath(path, ROOT))
    return names


def used_metrics():
    used = {}
    with open(os.path.join(DEPLOY, "grafana", "dashboards", "mcpd-overview.json")) as f:
        for where, expr, _ in dashboard_queries(json.load(f)):
            for m, _ in selectors(grafana_subst(expr)):
                used.setdefault(m, f"dashboard {where}")
    with open(os.path.join(PROM, "alerts.yml")) as f:
        for g in yaml.safe_load(f)["groups"]:
            for r in g["rules"]:
                for m, _ in selectors(r["expr"]):
                    used.setdefault(m, f"alert {r['alert']}")
    out = {}
    for m, where in used.items():
        if m in ("up", "ALERTS"):
            continue
        b = m
        for suffix in ("_bucket", "_count", "_sum"):
            if m.endswith(suffix):
                b = m[: -len(suffix)]
        out.setdefault(b, where)
    return out


def metrics_doc():
    documented, planned_doc = documented_metrics()
    code = code_metrics()
    missing = [f"{m} ({where})" for m, where in sorted(code.items()) if m not in documented]
    R.check("METRICS.md lists every metric name in node/src", not missing,
            "add to deploy/METRICS.md: " + ", ".join(missing), f"{len(code)} names in the code")
    used = used_metrics()
    undeclared = [f"{m} ({w})" for m, w in sorted(used.items()) if m not in documented]
    R.check("every metric the dashboard and alerts use is in METRICS.md", not undeclared,
            ", ".join(undeclared), f"{len(used)} metrics used")
    phantom = [f"{m} ({w})" for m, w in sorted(used.items())
               if m not in code and m not in planned_doc]
    R.check("metrics used but not exported are listed under Planned", not phantom, ", ".join(phantom))
    stray = sorted(set(PLANNED) - planned_doc)
    R.check("the live test's planned list matches METRICS.md's Planned section", not stray,
            "in tests/deploy/common.py PLANNED but not METRICS.md: " + ", ".join(stray))


# ---------------------------------------------------------------------------------- grafana

def grafana():
    path = os.path.join(DEPLOY, "grafana", "dashboards", "mcpd-overview.json")
    try:
        with open(path) as f:
            dash = json.load(f)
    except ValueError as e:
        R.fail("grafana: dashboard is JSON", str(e))
        return
    problems = []
    for key in ("uid", "title", "panels", "templating", "schemaVersion"):
        if key not in dash:
            problems.append(f"no {key}")
    ids, cells = set(), {}
    panels = []

    def walk(ps):
        for p in ps:
            panels.append(p)
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for p in panels:
        pid = p.get("id")
        if pid in ids:
            problems.append(f"duplicate panel id {pid}")
        ids.add(pid)
        g = p.get("gridPos", {})
        if not {"x", "y", "w", "h"} <= set(g) or g["x"] + g["w"] > 24:
            problems.append(f"panel {p.get('title')!r}: bad gridPos {g}")
            continue
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    problems.append(f"panel {p.get('title')!r} overlaps {cells[(x, y)]!r}")
                    break
                cells[(x, y)] = p.get("title")
            else:
                continue
            break
        if p.get("type") != "row":
            if p.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"panel {p.get('title')!r}: datasource must be ${{datasource}}")
            if not p.get("targets"):
                problems.append(f"panel {p.get('title')!r}: no query")
            for t in p.get("targets", []):
                if t.get("datasource", {}).get("uid") != "${datasource}":
                    problems.append(f"panel {p.get('title')!r} {t.get('refId')}: datasource must be ${{datasource}}")
            planned = any(base_metric(m) in PLANNED for t in p.get("targets", []) for m, _ in selectors(t.get("expr", "")))
            if planned and "PLANNED" not in p.get("title", ""):
                problems.append(f"panel {p.get('title')!r} uses a planned metric: say PLANNED in its title")
    names = {v["name"] for v in dash["templating"]["list"]}
    for needed in ("datasource", "instance", "server"):
        if needed not in names:
            problems.append(f"no ${needed} variable")
    R.check("grafana: dashboard structure (ids, grid, datasource variable, PLANNED labels)", not problems,
            "; ".join(problems[:8]), f"{len(panels)} panels")

    problems = []
    with open(os.path.join(DEPLOY, "grafana", "provisioning", "datasources", "prometheus.yml")) as f:
        ds = yaml.safe_load(f)
    if not any(d.get("type") == "prometheus" and d.get("url") for d in ds.get("datasources", [])):
        problems.append("datasources: no prometheus datasource with a url")
    with open(os.path.join(DEPLOY, "grafana", "provisioning", "dashboards", "mcpd.yml")) as f:
        prov = yaml.safe_load(f)
    paths = [p["options"]["path"] for p in prov.get("providers", [])]
    with open(os.path.join(DEPLOY, "docker", "compose.yml")) as f:
        compose = yaml.safe_load(f)
    mounts = [v.split(":")[1] for v in compose["services"]["grafana"]["volumes"] if v.startswith("../grafana/dashboards")]
    if not paths or paths[0] not in mounts:
        problems.append(f"dashboard provider path {paths} is not where compose mounts the dashboards {mounts}")
    R.check("grafana: provisioning files (datasource, dashboard provider matching compose)", not problems, "; ".join(problems))


# ---------------------------------------------------------------------------------- systemd

def systemd():
    if not need("systemd-analyze", "systemd unit"):
        return
    mcpd = binary("mcpd")
    if not os.access(mcpd, os.X_OK):
        R.skip("systemd unit", f"{mcpd} not built")
        return
    with open(os.path.join(DEPLOY, "systemd", "mcpd.service")) as f:
        unit = f.read()
    problems = []
    for needed in ("ProtectSystem=strict", "NoNewPrivileges=yes", "StateDirectory=", "KillMode=mixed"):
        if needed not in unit:
            problems.append(f"missing {needed}")
    for forbidden in (r"^MemoryDenyWriteExecute=yes", r"^SystemCallFilter=~.*@process", r"^RestrictNamespaces=yes"):
        if re.search(forbidden, unit, flags=re.M):
            problems.append(f"{forbidden[1:]} would break the MCP server processes mcpd spawns")
    R.check("systemd: hardening present, fork/exec of MCP servers allowed", not problems, "; ".join(problems))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mcpd.service")
        with open(path, "w") as f:
            f.write(unit.replace("/usr/local/bin/mcpd", mcpd))
        cmd_check("systemd-analyze verify deploy/systemd/mcpd.service", ["systemd-analyze", "verify", path])
        # --threshold is on the 0-100 scale; the report prints it divided by 10.
        r = run(["systemd-analyze", "security", "--offline=true", "--threshold=30", path])
        last = [line for line in (r.stdout + r.stderr).splitlines() if "exposure level" in line]
        R.check("systemd-analyze security --offline: exposure at most 3", r.returncode == 0,
                (last or [r.stderr.strip()])[-1], (last or [""])[-1].replace("→ ", "").strip())


def config_structs():
    """Every `pub struct XxxConfig { pub field: Type, ... }` in node/src: name -> [(field, type)]."""
    out = {}
    for path in glob.glob(os.path.join(ROOT, "node", "src", "**", "*.rs"), recursive=True):
        with open(path) as f:
            text = f.read()
        for m in re.finditer(r"pub struct (\w*Config) \{(.*?)\n\}", text, flags=re.S):
            out[m.group(1)] = re.findall(r"^\s*pub (\w+): ([\w:<>]+)", m.group(2), flags=re.M)
    return out


def config_keys(structs, name, prefix=""):
    """Dotted keys of struct `name`, descending into fields whose type is another XxxConfig."""
    keys = set()
    for field, typ in structs[name]:
        inner = typ.split("::")[-1]
        if inner in structs:
            keys |= config_keys(structs, inner, f"{prefix}{field}.")
        else:
            keys.add(prefix + field)
    return keys


def toml_keys(table, prefix=""):
    keys = set()
    for k, v in table.items():
        if isinstance(v, dict):
            keys |= toml_keys(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def toml_example():
    path = os.path.join(DEPLOY, "systemd", "mcpd.toml.example")
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    structs = config_structs()
    problems = []
    if "Config" not in structs:
        problems.append("no pub struct Config in node/src")
    else:
        want, have = config_keys(structs, "Config"), toml_keys(cfg)
        problems += [f"missing {k}" for k in sorted(want - have)] + [f"unknown {k}" for k in sorted(have - want)]
    R.check("mcpd.toml.example has every key of mcpd's Config (node/src) and no other", not problems,
            "; ".join(problems), f"{len(toml_keys(cfg))} keys")

    mcpd = binary("mcpd")
    if not os.access(mcpd, os.X_OK):
        R.skip("mcpd starts with mcpd.toml.example", f"{mcpd} not built")
        return
    with tempfile.TemporaryDirectory() as d:
        with open(path) as f:
            text = f.read()
        text = text.replace('"/var/lib/mcpd"', json.dumps(os.path.join(d, "data")))
        text = re.sub(r'^(http_addr|grpc_addr) = "[^"]*"', r'\1 = "127.0.0.1:0"', text, flags=re.M)
        conf = os.path.join(d, "mcpd.toml")
        with open(conf, "w") as f:
            f.write(text)
        logf = open(os.path.join(d, "log"), "w")
        p = subprocess.Popen([mcpd, "--config", conf], stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        ok, why = False, ""
        try:
            end = time.monotonic() + 20
            while time.monotonic() < end and p.poll() is None:
                if os.path.exists(os.path.join(d, "data", "endpoints.json")):
                    ok = True
                    break
                time.sleep(0.1)
            if not ok:
                why = f"exited {p.returncode}" if p.poll() is not None else "did not listen within 20s"
            p.send_signal(signal.SIGTERM)
            rc = p.wait(timeout=15)
            if ok and rc != 0:
                ok, why = False, f"exit status {rc} after SIGTERM"
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        if not ok:
            why += ": " + open(os.path.join(d, "log"), errors="replace").read()[-600:]
        R.check("mcpd starts with mcpd.toml.example and stops cleanly on SIGTERM", ok, why)


# ----------------------------------------------------------------------------------- docker

DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                       "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


def dockerfile_lint(path):
    """Problems found in a Dockerfile: instructions, stages, JSON forms, COPY sources."""
    problems = []
    with open(path) as f:
        lines = f.read().splitlines()
    instrs, buf, start = [], "", 0
    for i, line in enumerate(lines, 1):
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if not buf:
            start = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        instrs.append((start, buf.strip()))
        buf = ""
    if buf:
        problems.append("file ends inside a continued line")
    stages, args_before, seen_from = [], set(), False
    for n, ins in instrs:
        word, _, rest = ins.partition(" ")
        kw = word.upper()
        if kw not in DOCKER_INSTRUCTIONS:
            problems.append(f"line {n}: unknown instruction {word}")
            continue
        if kw != word:
            problems.append(f"line {n}: write instructions in upper case ({word})")
        if not seen_from and kw not in ("ARG", "FROM"):
            problems.append(f"line {n}: {kw} before the first FROM")
        if kw == "ARG" and not seen_from:
            args_before.add(rest.split("=")[0].strip())
        if kw == "FROM":
            seen_from = True
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", rest, flags=re.I)
            if not m:
                problems.append(f"line {n}: FROM {rest!r}")
                continue
            for var in re.findall(r"\$\{(\w+)\}", m.group(1)):
                if var not in args_before:
                    problems.append(f"line {n}: FROM uses ${{{var}}} not declared by an ARG before it")
            stages.append(m.group(2))
        if kw in ("CMD", "ENTRYPOINT") or (kw == "HEALTHCHECK" and " CMD [" in ins):
            js = rest if kw != "HEALTHCHECK" else ins[ins.index(" CMD [") + 5:]
            if js.lstrip().startswith("["):
                try:
                    v = json.loads(js)
                    if not all(isinstance(x, str) for x in v):
                        raise ValueError("not a list of strings")
                except ValueError as e:
                    problems.append(f"line {n}: {kw} JSON form: {e}")
        if kw == "EXPOSE":
            for port in rest.split():
                if not re.fullmatch(r"\d+(/(tcp|udp))?", port):
                    problems.append(f"line {n}: EXPOSE {port}")
        if kw in ("COPY", "ADD"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            frm = re.search(r"--from=(\S+)", rest)
            if frm:
                if frm.group(1) not in stages[:-1]:
                    problems.append(f"line {n}: COPY --from={frm.group(1)}: no earlier stage of that name")
            else:
                for src in parts[:-1]:
                    if not glob.glob(os.path.join(ROOT, src)):
                        problems.append(f"line {n}: COPY source {src} does not exist in the build context (repo root)")
    if len(stages) < 2:
        problems.append("not multi-stage")
    return problems, stages


def docker():
    dockerfile = os.path.join(DEPLOY, "docker", "Dockerfile")
    problems, stages = dockerfile_lint(dockerfile)
    # The workspace members the build stage must copy, and the binaries it must find.
    with open(os.path.join(ROOT, "Cargo.toml"), "rb") as f:
        members = tomllib.load(f)["workspace"]["members"]
    with open(dockerfile) as f:
        text = f.read()
    for m in members:
        if not re.search(rf"^COPY {re.escape(m)} {re.escape(m)}$", text, flags=re.M):
            problems.append(f"workspace member {m} is not copied into the build stage")
    r = run(["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"], timeout=120)
    if r.returncode == 0:
        meta = json.loads(r.stdout)
        bins = {(p["name"], t["name"]) for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"]}
        for pkg, binname in (("mcpd", "mcpd"), ("mcpctl", "mcpctl"), ("mcp-bridge", "mcp-bridge")):
            if (pkg, binname) not in bins:
                problems.append(f"cargo: package {pkg} has no binary {binname}")
            if f"-p {pkg}" not in text or f"target/release/{binname}" not in text:
                problems.append(f"Dockerfile does not build/copy {binname}")
    else:
        problems.append(f"cargo metadata: {r.stderr.strip()[-300:]}")
    ignore = os.path.join(DEPLOY, "docker", "Dockerfile.dockerignore")
    if not os.path.exists(ignore) or "target" not in open(ignore).read().split():
        problems.append("Dockerfile.dockerignore must exclude target")
    R.check("docker: Dockerfile lint (instructions, stages, JSON forms, COPY sources, workspace, binaries)",
            not problems, "; ".join(problems), f"stages {stages}; no Docker engine here: not built")

    compose_path = os.path.join(DEPLOY, "docker", "compose.yml")
    with open(compose_path) as f:
        compose = yaml.safe_load(f)
    problems = []
    services = compose.get("services", {})
    for s in ("mcpd-1", "mcpd-2", "mcpd-3", "mcpd-init", "prometheus", "grafana"):
        if s not in services:
            problems.append(f"no service {s}")
    for name, s in services.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                if not os.path.exists(os.path.join(DEPLOY, "docker", src)):
                    problems.append(f"{name}: mounts {src}, which does not exist")
        b = s.get("build")
        if b:
            ctx = os.path.normpath(os.path.join(DEPLOY, "docker", b["context"]))
            if not os.path.exists(os.path.join(ctx, b["dockerfile"])):
                problems.append(f"{name}: build file {b['dockerfile']} not in context {ctx}")
    with open(os.path.join(PROM, "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    targets = [t for j in prom["scrape_configs"] if j["job_name"] == "mcpd" for sc in j.get("static_configs", []) for t in sc["targets"]]
    for t in targets:
        host = t.split(":")[0]
        if host not in services:
            problems.append(f"prometheus.yml target {t} is not a compose service")
        elif f"{t}" not in json.dumps(services[host].get("command", [])):
            problems.append(f"prometheus.yml target {t} is not what {host} advertises")
    R.check("docker: compose.yml services, mounts, and prometheus targets consistent", not problems, "; ".join(problems))
    if shutil.which("docker-compose"):
        cmd_check("docker-compose config -q (compose file schema)", ["docker-compose", "-f", compose_path, "config", "-q"])
    else:
        R.skip("docker-compose config -q (compose file schema)", "docker-compose not installed")


# ------------------------------------------------------------------------ keepalived, haproxy

def keepalived_haproxy():
    kdir = os.path.join(DEPLOY, "keepalived")
    script = os.path.join(kdir, "check_mcpd.sh")
    ok = os.access(script, os.X_OK) and run(["sh", "-n", script]).returncode == 0
    R.check("keepalived: check_mcpd.sh is executable shell", ok, "not executable or sh -n fails")
    if need("keepalived", "keepalived -t (config test)"):
        with tempfile.TemporaryDirectory() as d:
            # keepalived -t signals its process group: its own session keeps this test alive.
            r = subprocess.run(["keepalived", "-t", "-f", os.path.join(kdir, "keepalived.conf"),
                                "-p", os.path.join(d, "p"), "-r", os.path.join(d, "r"), "-c", os.path.join(d, "c")],
                               capture_output=True, text=True, timeout=30, start_new_session=True)
            out = (r.stdout + r.stderr).strip()
            R.check("keepalived -t deploy/keepalived/keepalived.conf", not out, out[-800:])
    if need("haproxy", "haproxy -c"):
        cmd_check("haproxy -c -f deploy/haproxy/haproxy.cfg", ["haproxy", "-c", "-f", os.path.join(DEPLOY, "haproxy", "haproxy.cfg")])


def main():
    for section in (prometheus, metrics_doc, grafana, systemd, toml_example, docker, keepalived_haproxy):
        try:
            section()
        except Exception as e:  # noqa: BLE001
            R.fail(section.__name__, f"{type(e).__name__}: {e}")
    R.exit()


if __name__ == "__main__":
    main()
