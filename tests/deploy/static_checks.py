#!/usr/bin/env python3
"""Checks of the files in deploy/ that need no running cluster.

promtool (config, rules, rule unit tests), the alert rules' conventions, METRICS.md against
the metric names in node/src and in the dashboard/alerts, the Grafana dashboard's structure
and provisioning, the systemd unit (systemd-analyze verify and offline security score), the
compose file (docker-compose config), the Dockerfile (a syntax and consistency lint: no Docker
engine here), keepalived (-t), the keepalived check script against a local HTTPS server, and
HAProxy (-c, both the passthrough file and the re-encryption it documents). The example
mcpd.toml is config_test.py's.

TLS everywhere: the Prometheus scrape is HTTPS with a CA file and a token file, the example
config documents every TLS key, every probe and client in deploy/ speaks https:// with the
cluster CA, and nothing turns certificate verification off. The cluster's data key goes
wherever the CA key goes: compose's mcpd-pki script (run here without Docker) and every
install instruction in deploy/.
"""

import glob
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DEPLOY, PLANNED, ROOT, Results, base_metric, binary, dashboard_queries, grafana_subst, openssl_cert, run,
    selectors,
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

def mcpd_job(cfg):
    return next((j for j in cfg.get("scrape_configs", []) if j.get("job_name") == "mcpd"), None)


def prometheus_scrape_tls(cfg):
    """Problems with how the mcpd job reaches the nodes: HTTPS verified with a CA file, a
    bearer token read from a file."""
    job = mcpd_job(cfg)
    if job is None:
        return ["no job_name: mcpd"]
    problems = []
    if job.get("scheme") != "https":
        problems.append(f"scheme is {job.get('scheme', 'http')!r}, not https")
    tls = job.get("tls_config") or {}
    if not tls.get("ca_file"):
        problems.append("no tls_config.ca_file (the cluster CA)")
    if tls.get("insecure_skip_verify"):
        problems.append("tls_config.insecure_skip_verify turns verification off")
    auth = job.get("authorization") or {}
    if auth.get("type", "Bearer") != "Bearer" or not auth.get("credentials_file"):
        problems.append("no authorization {type: Bearer, credentials_file: ...} (a metrics token)")
    for inline in ("credentials",):
        if auth.get(inline):
            problems.append(f"authorization.{inline} puts the token in the config; use credentials_file")
    for old in ("bearer_token", "bearer_token_file", "basic_auth"):
        if old in job:
            problems.append(f"{old}: use authorization.credentials_file")
    return problems


def prometheus_dir_with_secrets(d, cfg):
    """Writes cfg as d/prometheus.yml with the files its mcpd job names present (a placeholder
    token and CA), so that a full `promtool check config` can run."""
    job = mcpd_job(cfg) or {}
    for path in ((job.get("tls_config") or {}).get("ca_file"), (job.get("authorization") or {}).get("credentials_file")):
        if path:
            full = path if os.path.isabs(path) else os.path.join(d, path)
            if not os.path.isabs(path):
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "w") as f:
                    f.write("placeholder\n")
    out = os.path.join(d, "prometheus.yml")
    with open(out, "w") as f:
        yaml.safe_dump(cfg, f)
    return out


def prometheus():
    if not shutil.which("promtool"):
        R.fail("promtool", "not installed (Debian package prometheus): the rules cannot be checked")
        return
    cmd_check("promtool check config --syntax-only deploy/prometheus/prometheus.yml",
              ["promtool", "check", "config", "--syntax-only", "prometheus.yml"], cwd=PROM)
    with open(os.path.join(PROM, "prometheus.yml")) as f:
        cfg = yaml.safe_load(f)
    problems = prometheus_scrape_tls(cfg)
    R.check("prometheus.yml: job mcpd scrapes https with tls_config.ca_file and a Bearer credentials_file",
            not problems, "; ".join(problems))
    cfg["rule_files"] = [os.path.join(PROM, "alerts.yml")]
    with tempfile.TemporaryDirectory() as d:
        path = prometheus_dir_with_secrets(d, cfg)
        r = run(["promtool", "check", "config", path])
        R.check("promtool check config (with the token and CA files it names in place)", r.returncode == 0,
                (r.stdout + r.stderr).strip()[-500:])
        # The file_sd alternative the comments describe, with the example targets file.
        job = mcpd_job(cfg)
        if job is not None:
            job.pop("static_configs", None)
            job["file_sd_configs"] = [{"files": [os.path.join(PROM, "targets", "mcpd*.json")]}]
        with open(os.path.join(PROM, "targets", "mcpd.json")) as f:
            sd = json.load(f)
        sd_ok = isinstance(sd, list) and all(isinstance(g.get("targets"), list) for g in sd)
        path = prometheus_dir_with_secrets(d, cfg)
        r = run(["promtool", "check", "config", path])
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
    # The TLS directory (ca.key, node.key) readable by the service user only.
    state_dirs = " ".join(re.findall(r"^StateDirectory=(.*)$", unit, flags=re.M)).split()
    if "mcpd/tls" not in state_dirs:
        problems.append(f"StateDirectory= does not create mcpd/tls (the TLS directory): {state_dirs}")
    if not re.search(r"^StateDirectoryMode=0?700$", unit, flags=re.M):
        problems.append("StateDirectoryMode=0700 missing: the TLS directory holds the CA key")
    if not re.search(r"^UMask=0?077$", unit, flags=re.M):
        problems.append("UMask=0077 missing: keys and data files must be 0600")
    for forbidden in (r"^MemoryDenyWriteExecute=yes", r"^SystemCallFilter=~.*@process", r"^RestrictNamespaces=yes"):
        if re.search(forbidden, unit, flags=re.M):
            problems.append(f"{forbidden[1:]} would break the MCP server processes mcpd spawns")
    R.check("systemd: hardening present, TLS dir 0700 for the service user, fork/exec of MCP servers allowed",
            not problems, "; ".join(problems))
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
    compose_tls(services, prom, text)
    if shutil.which("docker-compose"):
        cmd_check("docker-compose config -q (compose file schema)", ["docker-compose", "-f", compose_path, "config", "-q"])
    else:
        R.skip("docker-compose config -q (compose file schema)", "docker-compose not installed")


def compose_tls(services, prom, dockerfile):
    """The compose cluster's TLS: a CA made once and installed in every node's TLS directory
    before the nodes start, HTTPS health checks with that CA, mcpctl over HTTPS, and the
    files Prometheus's scrape names mounted where it looks for them."""
    problems = []
    pki = services.get("mcpd-pki")
    nodes = [f"mcpd-{n}" for n in (1, 2, 3)]
    if pki is None:
        problems.append("no service mcpd-pki (makes and installs the cluster CA before the nodes start)")
    else:
        script = json.dumps(pki.get("command", "")) + json.dumps(pki.get("entrypoint", ""))
        if "cluster ca create" not in script:
            problems.append("mcpd-pki does not run `mcpctl cluster ca create`")
        mounted = {v.split(":")[0] for v in pki.get("volumes", [])}
        for n in nodes:
            if n not in mounted:
                problems.append(f"mcpd-pki does not mount {n}'s volume")
    for n in nodes:
        s = services.get(n, {})
        dep = (s.get("depends_on") or {})
        if not isinstance(dep, dict) or (dep.get("mcpd-pki") or {}).get("condition") != "service_completed_successfully":
            problems.append(f"{n} does not wait for mcpd-pki (depends_on condition service_completed_successfully)")
        test = " ".join((s.get("healthcheck") or {}).get("test", []))
        if "--cacert" not in test or "https://" not in test:
            problems.append(f"{n}: healthcheck is not https with --cacert: {test!r}")
    init = services.get("mcpd-init", {})
    env = init.get("environment") or {}
    init_text = json.dumps(init.get("command", "")) + json.dumps(env)
    if "http://" in init_text or "https://" not in init_text:
        problems.append("mcpd-init does not reach the nodes over https://")
    if "MCPCTL_CACERT" not in init_text and "--cacert" not in init_text:
        problems.append("mcpd-init gives mcpctl no CA (MCPCTL_CACERT or --cacert)")
    if "--role metrics" not in init_text:
        problems.append("mcpd-init makes no metrics token for Prometheus")
    job = mcpd_job(prom) or {}
    prom_svc = services.get("prometheus", {})
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom_svc.get("volumes", [])}
    for what, rel in (("ca_file", (job.get("tls_config") or {}).get("ca_file")),
                      ("credentials_file", (job.get("authorization") or {}).get("credentials_file"))):
        if not rel:
            continue
        where = os.path.normpath(os.path.join("/etc/prometheus", rel))
        vol = next((src for dst, src in mounts.items() if where.startswith(dst.rstrip("/") + "/")), None)
        if vol is None:
            problems.append(f"prometheus: nothing mounted where its {what} {where} is")
        elif vol.startswith(".") and not os.path.exists(os.path.join(DEPLOY, "docker", vol, os.path.basename(where))):
            problems.append(f"prometheus: {what} {where} comes from {vol}, which lacks it")
        elif not vol.startswith(".") and not any(vol in [v.split(":")[0] for v in s.get("volumes", [])]
                                                 for name, s in services.items() if name in ("mcpd-pki", "mcpd-init")):
            problems.append(f"prometheus: volume {vol} ({what}) is not filled by mcpd-pki or mcpd-init")
    hc = re.search(r"^HEALTHCHECK .*$\n?.*", dockerfile, flags=re.M)
    if not hc or "--cacert" not in hc.group(0) or "https://" not in hc.group(0):
        problems.append("Dockerfile HEALTHCHECK is not https with --cacert")
    R.check("docker: cluster CA made once and installed before the nodes, https health checks with the CA, "
            "mcpctl and Prometheus over https", not problems, "; ".join(problems))
    if pki is not None:
        compose_pki_script(pki)


def compose_pki_script(pki):
    """mcpd-pki's script, run here with its volumes as directories of a temporary one (no
    Docker engine): the same CA and data key in every node's tls/ (0700, files 0600), the
    public ca.pem for Prometheus and no key in its volume; a second run that changes nothing;
    volumes from before data keys (no data.key anywhere) given one, the same on every node, CA
    kept; and a node whose data.key differs from mcpd-1's stops the script, its key untouched."""
    name = ("docker: mcpd-pki's script installs one CA and one data key in every node (0700/0600) and ca.pem "
            "for Prometheus, idempotently, upgrades volumes without data.key, refuses differing keys")
    if not os.access(binary("mcpctl"), os.X_OK):
        R.skip(name, f"{binary('mcpctl')} not built")
        return
    import grp
    import pwd

    me = f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"
    with tempfile.TemporaryDirectory() as d:
        script = pki["command"][0].replace("$$", "$").replace("mcpd:mcpd", me)
        mounts = list(pki.get("tmpfs", [])) + [v.split(":")[1] for v in pki.get("volumes", [])]
        for mount in mounts:
            os.makedirs(d + mount.split(":")[0], exist_ok=True)
        # A path starts after white space, a quote or `=` (a shell assignment).
        for top in {"/" + m.split(":")[0].split("/")[1] for m in mounts}:
            script = re.sub(rf"(?<=[\s\"=]){re.escape(top)}(?=[/\s\"]|$)", d + top, script, flags=re.M)
        # Never let it touch the host's own /nodes, /pki ...: every path must be under d now.
        stray = [p for p in re.findall(r"(?<=[\s\"=])/[^\s\"]*", script) if not p.startswith(d + "/")]
        if stray:
            R.fail(name, f"the script names paths outside its volumes, not run: {sorted(set(stray))}")
            return
        bindir = os.path.join(d, "bin")
        os.makedirs(bindir)
        os.symlink(binary("mcpctl"), os.path.join(bindir, "mcpctl"))
        env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        nodes = (1, 2, 3)

        def tls(n, f):
            return f"{d}/nodes/{n}/tls/{f}"

        def keys():
            """{file: [node 1's, node 2's, node 3's]} of the two keys (None where missing)."""
            return {f: [open(tls(n, f), "rb").read() if os.path.exists(tls(n, f)) else None for n in nodes]
                    for f in ("ca.key", "data.key")}

        def run_script(what):
            r = run(["sh", "-c", script], env=env, timeout=60)
            if r.returncode != 0:
                problems.append(f"{what}: exit {r.returncode}: {(r.stdout + r.stderr).strip()[-300:]}")
            # What it made on /pki (a tmpfs in compose) must not outlive the container.
            shutil.rmtree(f"{d}/pki", ignore_errors=True)
            os.makedirs(f"{d}/pki")
            return r

        problems, seen = [], []
        for attempt in ("first run", "second run"):
            run_script(attempt)
            if problems:
                break
            seen.append(keys())
        if not problems:
            for f in ("ca.key", "data.key"):
                if len({k for ks in seen for k in ks[f]}) != 1 or None in seen[0][f]:
                    problems.append(f"the nodes do not all hold the same {f}, or the second run made another")
            if not re.fullmatch(rb"[0-9a-f]{64}\n?", seen[0]["data.key"][0] or b""):
                problems.append("data.key is not 64 hex digits")
            for n in nodes:
                for rel, want in (("", 0o700), ("/tls", 0o700), ("/tls/ca.key", 0o600), ("/tls/ca.pem", 0o600),
                                  ("/tls/data.key", 0o600)):
                    path = f"{d}/nodes/{n}{rel}"
                    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else None
                    if mode != want:
                        problems.append(f"node {n}{rel or '/'}: {oct(mode) if mode is not None else 'missing'}, "
                                        f"want {oct(want)}")
            public = f"{d}/prometheus-mcpd/ca.pem"
            if not os.path.exists(public) or os.stat(public).st_mode & 0o777 != 0o644:
                problems.append("no ca.pem (0644) in the prometheus-mcpd volume")
            leaked = [p for p in glob.glob(f"{d}/prometheus-mcpd/*") if p.endswith(".key")]
            if leaked:
                problems.append(f"a key in Prometheus's volume: {leaked}")
        if not problems:
            # Volumes made before data keys: a CA in every node, no data.key anywhere.
            for n in nodes:
                os.remove(tls(n, "data.key"))
            run_script("run on volumes without data.key")
            after = keys()
            if not problems:
                if after["ca.key"] != seen[0]["ca.key"]:
                    problems.append("the run on volumes without data.key replaced the CA key")
                if None in after["data.key"] or len(set(after["data.key"])) != 1:
                    problems.append("the run on volumes without data.key did not give every node the same data.key")
        if not problems:
            # A node whose data key is not the cluster's: refused, and nothing overwritten.
            other = b"0" * 64 + b"\n"
            with open(tls(3, "data.key"), "wb") as f:
                f.write(other)
            r = run(["sh", "-c", script], env=env, timeout=60)
            if r.returncode == 0:
                problems.append("a node with another data.key than mcpd-1's: the script exits 0")
            elif "data.key" not in r.stdout + r.stderr:
                problems.append(f"a node with another data.key: the script does not name it: {(r.stdout + r.stderr)[-200:]}")
            if open(tls(3, "data.key"), "rb").read() != other or keys()["data.key"][0] != after["data.key"][0]:
                problems.append("a node with another data.key: the script overwrote a data key")
        R.check(name, not problems, "; ".join(problems))


UNVERIFIED = [
    (r"\bhttp://[^\s\"']*:7[45]\d\d\b", "a plain http:// URL to an mcpd port"),
    (r"(^|[\s\[,\"])(-k|--insecure)([\s\],\"]|$)", "curl without certificate verification"),
    (r"insecure_skip_verify:\s*true", "Prometheus without certificate verification"),
    (r"\bverify none\b", "HAProxy without certificate verification"),
]


def no_plaintext():
    """Outside comments, no file in deploy/ speaks plain HTTP to a node or skips verification."""
    found = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, "**", "*"), recursive=True)):
        if os.path.isdir(path) or path.endswith((".md", ".json")):
            continue
        with open(path, errors="replace") as f:
            for i, line in enumerate(f, 1):
                code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
                for pattern, what in UNVERIFIED:
                    if re.search(pattern, code):
                        found.append(f"{os.path.relpath(path, ROOT)}:{i}: {what}: {line.strip()[:100]}")
    R.check("deploy/: no plain http:// to a node and no skipped certificate verification (outside comments)",
            not found, "; ".join(found[:6]))


def data_key_installed():
    """A node does not start without data.key beside the CA: every file of deploy/ that
    installs ca.key into a node (a command or its instructions) installs data.key too."""
    lacking = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, "**", "*"), recursive=True)):
        if os.path.isdir(path):
            continue
        with open(path, errors="replace") as f:
            text = f.read()
        if re.search(r"\binstall\b[^\n]*\bca\.key\b", text) and not re.search(r"\binstall\b[^\n]*\bdata\.key\b", text):
            lacking.append(os.path.relpath(path, ROOT))
    R.check("deploy/: every file that installs ca.key into a node installs data.key too", not lacking,
            f"installs ca.key but not data.key: {', '.join(lacking)}")


# ------------------------------------------------------------------------ keepalived, haproxy

class _Readyz(BaseHTTPRequestHandler):
    """Answers GET /readyz with the server's `status`."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.server.status if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args):
        pass


def check_script_contract(script, d):
    """check_mcpd.sh against a local HTTPS /readyz: exit 0 on 200 with the right CA (given as
    an argument or in $MCPD_CACERT), non-zero on 503, on a certificate from another CA and
    when nothing listens. Problems found, as a list."""
    crt, key = openssl_cert(d, "node", "IP:127.0.0.1,DNS:localhost")
    other, _ = openssl_cert(d, "other", "IP:127.0.0.1", cn="another CA")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.status = 200
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    url = f"https://127.0.0.1:{srv.server_address[1]}/readyz"
    env = {k: v for k, v in os.environ.items() if k != "MCPD_CACERT"}
    problems = []

    def expect(what, ok_wanted, argv, extra_env=None):
        r = run(["sh", script, *argv], timeout=15, env={**env, **(extra_env or {})})
        if (r.returncode == 0) != ok_wanted:
            problems.append(f"{what}: exit {r.returncode} ({r.stderr.strip()[:120]})")

    try:
        expect("200 with the CA as argument", True, [url, crt])
        expect("200 with the CA in MCPD_CACERT", True, [url], {"MCPD_CACERT": crt})
        expect("200 but a certificate from another CA", False, [url, other])
        srv.status = 503
        expect("503 (not ready)", False, [url, crt])
    finally:
        srv.shutdown()
        srv.server_close()
    expect("nothing listening", False, [url, crt])
    return problems


def watch_script_contract(script):
    """watch_mcpd.sh against a local port: exit 0 after its watch while the port stays open,
    exit 1 when nothing listens, and exit 1 when the port closes in the middle of a watch.
    Problems found, as a list."""
    srv = socket.create_server(("127.0.0.1", 0))
    addr = f"127.0.0.1:{srv.getsockname()[1]}"
    problems = []

    def expect(what, code_wanted, ms):
        r = run(["sh", script, addr, str(ms)], timeout=15)
        if r.returncode != code_wanted:
            problems.append(f"{what}: exit {r.returncode}, wanted {code_wanted} ({r.stderr.strip()[:120]})")

    try:
        expect("the port open for the whole watch", 0, 300)
        # A probe that cannot be made at all is not a dead mcpd: it says so, with its own code.
        r = run(["sh", script, "not an address", "300"], timeout=15)
        if r.returncode != 2 or "cannot probe" not in r.stderr:
            problems.append(f"a broken probe: exit {r.returncode}, wanted 2 naming it ({r.stderr.strip()[:120]})")
        # The port closes 0.5 s into a 5 s watch: the run fails instead of ending healthy.
        threading.Timer(0.5, srv.close).start()
        expect("the port closing during the watch", 1, 5000)
    finally:
        srv.close()
    expect("nothing listening", 1, 300)
    return problems


def keepalived_haproxy():
    kdir = os.path.join(DEPLOY, "keepalived")
    watch = os.path.join(kdir, "watch_mcpd.sh")
    ok = os.access(watch, os.X_OK) and run(["sh", "-n", watch]).returncode == 0
    with open(os.path.join(kdir, "keepalived.conf")) as f:
        tracked = re.search(r"track_script \{[^}]*\bchk_mcpd_running\b[^}]*\bchk_mcpd_ready\b", f.read())
    problems = ([] if ok else ["not executable or sh -n fails"]) + ([] if tracked else [
        "keepalived.conf does not track both chk_mcpd_running and chk_mcpd_ready"])
    detail = "contract not run: curl missing"
    if ok and not shutil.which("curl"):
        R.skip("keepalived: watch_mcpd.sh's contract", "curl not installed")
    elif ok:
        problems += watch_script_contract(watch)
        detail = "open: 0; closed mid-watch: 1; nothing listening: 1; broken probe: 2"
    R.check("keepalived: watch_mcpd.sh fails the moment mcpd's port refuses, within a run, and is tracked",
            not problems, "; ".join(problems), detail)
    script = os.path.join(kdir, "check_mcpd.sh")
    ok = os.access(script, os.X_OK) and run(["sh", "-n", script]).returncode == 0
    R.check("keepalived: check_mcpd.sh is executable shell", ok, "not executable or sh -n fails")
    with open(script) as f:
        stext = f.read()
    with open(os.path.join(kdir, "keepalived.conf")) as f:
        ktext = f.read()
    problems = []
    if not re.search(r'url="\$\{1:-https://127\.0\.0\.1:7400/readyz\}"', stext):
        problems.append("check_mcpd.sh's default URL is not https://127.0.0.1:7400/readyz")
    if "--cacert" not in stext or "MCPD_CACERT" not in stext:
        problems.append("check_mcpd.sh does not pass --cacert from $MCPD_CACERT")
    m = re.search(r"^\$CHECK_URL=(\S+)", ktext, flags=re.M)
    if not m or not m.group(1).startswith("https://"):
        problems.append("keepalived.conf's $CHECK_URL is not https://")
    if not re.search(r'script "\S*check_mcpd\.sh \$\{CHECK_URL\} \$\{CHECK_CACERT\}"', ktext) \
            or not re.search(r"^\$CHECK_CACERT=/\S+", ktext, flags=re.M):
        problems.append("keepalived.conf does not give the check script its CA ($CHECK_CACERT)")
    if shutil.which("openssl") and shutil.which("curl"):
        with tempfile.TemporaryDirectory() as d:
            problems += check_script_contract(script, d)
        detail = "exit 0 only on 200 with the right CA (argument or MCPD_CACERT)"
    else:
        detail = "exit-code contract not run: openssl or curl missing"
    R.check("keepalived: check_mcpd.sh asks /readyz over https with --cacert and keeps its exit-code contract",
            not problems, "; ".join(problems), detail)
    if need("keepalived", "keepalived -t (config test)"):
        with tempfile.TemporaryDirectory() as d:
            # keepalived -t signals its process group: its own session keeps this test alive.
            r = subprocess.run(["keepalived", "-t", "-f", os.path.join(kdir, "keepalived.conf"),
                                "-p", os.path.join(d, "p"), "-r", os.path.join(d, "r"), "-c", os.path.join(d, "c")],
                               capture_output=True, text=True, timeout=30, start_new_session=True)
            out = (r.stdout + r.stderr).strip()
            R.check("keepalived -t deploy/keepalived/keepalived.conf", not out, out[-800:])
    haproxy()


def haproxy():
    path = os.path.join(DEPLOY, "haproxy", "haproxy.cfg")
    with open(path) as f:
        text = f.read()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    problems = []
    if not re.search(r"^defaults\b(?:(?!^\S).)*^\s+mode tcp\b", code, flags=re.M | re.S):
        problems.append("defaults are not `mode tcp` (TLS passthrough)")
    ds = re.search(r"^\s*default-server (.*)$", code, flags=re.M)
    ds = ds.group(1) if ds else ""
    for needed in ("check-ssl", "verify required", "ca-file ", "verifyhost "):
        if needed not in ds:
            problems.append(f"the nodes' health check lacks `{needed.strip()}`")
    if not re.search(r"http-check send meth GET uri /readyz", code):
        problems.append("the health check does not GET /readyz")
    if "Replace the frontend and backend with:" not in text:
        problems.append("the re-encryption alternative is not described")
    R.check("haproxy: TLS passthrough, /readyz checked over TLS against the cluster CA, re-encryption documented",
            not problems, "; ".join(problems))
    if not need("haproxy", "haproxy -c"):
        return
    if not shutil.which("openssl"):
        R.skip("haproxy -c", "openssl not installed (makes the CA file the config names)")
        return
    with tempfile.TemporaryDirectory() as d:
        ca, _ = openssl_cert(d, "ca", "DNS:mcp.example.com")
        crt, key = openssl_cert(d, "lb", "DNS:mcp.example.com")
        lb_pem = os.path.join(d, "lb-combined.pem")
        with open(lb_pem, "w") as f:
            f.write(open(crt).read() + open(key).read())
        cfg = re.sub(r"ca-file \S+", f"ca-file {ca}", text)
        passthrough = os.path.join(d, "passthrough.cfg")
        with open(passthrough, "w") as f:
            f.write(cfg)
        cmd_check("haproxy -c -f deploy/haproxy/haproxy.cfg (its ca-file in place)", ["haproxy", "-c", "-f", passthrough])
        # The re-encryption alternative from the header comment, in place of frontend and backend.
        block = text.split("Replace the frontend and backend with:", 1)[-1].split("\n#\n", 1)[0]
        alt = [line[1:] for line in block.splitlines()[1:] if line.startswith("#") and line[1:].strip() not in ("", "...")]
        head = cfg[:cfg.index("\nfrontend mcpd")]
        tail = cfg[cfg.index("\n# HAProxy's own metrics"):]
        alt_cfg = head + "\n" + "\n".join(alt) + "\n" + tail
        alt_cfg = re.sub(r"crt \S+", f"crt {lb_pem}", alt_cfg)
        alt_cfg = re.sub(r"ca-file \S+", f"ca-file {ca}", alt_cfg)
        reencrypt = os.path.join(d, "reencrypt.cfg")
        with open(reencrypt, "w") as f:
            f.write(alt_cfg)
        cmd_check("haproxy -c: the re-encryption alternative documented in haproxy.cfg", ["haproxy", "-c", "-f", reencrypt])


def main():
    for section in (prometheus, metrics_doc, grafana, systemd, docker, no_plaintext, data_key_installed,
                    keepalived_haproxy):
        try:
            section()
        except Exception as e:  # noqa: BLE001
            R.fail(section.__name__, f"{type(e).__name__}: {e}")
    R.exit()


if __name__ == "__main__":
    main()
