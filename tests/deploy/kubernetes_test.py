#!/usr/bin/env python3
"""deploy/kubernetes/ (a kustomization) against the Kubernetes API schemas, itself, and mcpd.

No cluster here: what a cluster would refuse or get wrong is checked offline.

- Render: kustomization.yaml by the loader below (resources, namespace, images and
  configMapGenerator, the fields the kustomization keeps to; any other field fails), every
  document parsed with PyYAML; where kubectl is installed, `kubectl kustomize` must render the
  same documents.
- Schemas: every document validates with kubernetes-validate (tests/py/requirements.txt, in
  .venv) in strict mode (an unknown field fails), against the oldest Kubernetes the manifests
  support (1.31) and the newest the package ships.
- Cross-references an operator could break: serviceName and the headless Service, selectors
  and pod labels, the PDB and the NetworkPolicy, probes (/readyz, /livez) and container ports,
  every Secret, ConfigMap, key, volume, service account and role a pod or binding names (made
  here or, for the Secrets the operator makes, documented in deploy/README.md), the scripts'
  default paths against the mounts, the ConfigMap's mcpd.toml (TOML; every key one of
  deploy/systemd/mcpd.toml.example), the image of compose.yml, the grace period of
  mcpd.service, the restricted Pod Security Standard.
- The checks can fail: each is run again on documents broken on purpose.
- The scripts: sh -n (and shellcheck where installed); start.sh with a stand-in mcpd (node
  ids from volume, ConfigMap or ordinal; names; the config it writes); install-tls.sh; and
  members.sh through bootstrap, a second run, scale-up, scale-down and scale-up again against
  stand-ins of the Kubernetes API (which enforce Role mcpd-members), the nodes and mcpctl.
- With target/debug/mcpd built: mcpd starts through install-tls.sh and start.sh with the
  ConfigMap's mcpd.toml, serves /livez and /readyz over HTTPS with the cluster CA under the
  pod's and the Service's names, and stops cleanly on SIGTERM (mcpd has no check-only mode).
"""

import base64
import copy
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import tomllib

import yaml

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEPLOY, Results, binary, http, make_ca, toml_keys, wait_until  # noqa: E402

R = Results()
K8S = os.path.join(DEPLOY, "kubernetes")
OLDEST_K8S = "1.31"
# Secrets the operator makes (their contents must not be in git), with the keys pods use.
OPERATOR_SECRETS = {"mcpd-ca": {"ca.pem", "ca.key", "data.key"}, "mcpd-admin-token": {"token"}}
NODE_LABELS = {"app.kubernetes.io/name": "mcpd", "app.kubernetes.io/component": "node"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "PriorityClass", "CustomResourceDefinition"}
SH = shutil.which("dash") or "/bin/sh"  # the image's /bin/sh is dash

# ------------------------------------------------------------------------------------- render


def render(directory):
    """The documents kustomize makes of `directory`, for the fields this kustomization uses."""
    with open(os.path.join(directory, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images"}
    if unknown:
        raise ValueError(f"kustomization.yaml: fields this loader does not render: {sorted(unknown)}")
    docs = []
    for r in k.get("resources", []):
        path = os.path.join(directory, r)
        if os.path.isdir(path):
            docs += render(path)
            continue
        with open(path) as f:
            docs += [d for d in yaml.safe_load_all(f) if d is not None]
    for g in k.get("configMapGenerator", []):
        opts = g.get("options", {})
        if set(g) - {"name", "files", "options"} or set(opts) - {"disableNameSuffixHash", "labels"}:
            raise ValueError(f"configMapGenerator {g.get('name')}: fields this loader does not render")
        if not opts.get("disableNameSuffixHash"):
            raise ValueError(f"configMapGenerator {g['name']}: a name hash (this loader renders disableNameSuffixHash only)")
        data = {}
        for spec in g.get("files", []):
            key, _, path = spec.rpartition("=")
            with open(os.path.join(directory, path)) as f:
                data[key or os.path.basename(path)] = f.read()
        meta = {"name": g["name"]}
        if opts.get("labels"):
            meta["labels"] = dict(opts["labels"])
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    ns = k.get("namespace")
    for d in docs:
        if ns and d.get("kind") not in CLUSTER_SCOPED:
            d.setdefault("metadata", {})["namespace"] = ns
        if ns and d.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
            for s in d.get("subjects", []):
                if s.get("kind") == "ServiceAccount":
                    s["namespace"] = ns
    for img in k.get("images", []):
        for d in docs:
            for _, spec, _ in pod_specs(d):
                for c in containers(spec):
                    name, tag = split_image(c.get("image", ""))
                    if name == img["name"]:
                        c["image"] = img.get("newName", name) + (":" + img["newTag"] if "newTag" in img else tag)
    return docs


def split_image(image):
    """'repo/name:tag' -> ('repo/name', ':tag'); a digest stays with the tag part."""
    m = re.match(r"^(.*?)((?::[^/:@]+)?(?:@.+)?)$", image)
    return m.group(1), m.group(2)


def key(d):
    return (d.get("kind"), d.get("metadata", {}).get("namespace"), d.get("metadata", {}).get("name"))


def pod_specs(d):
    """(where, pod spec, pod labels) of the pods a workload makes."""
    kind, spec = d.get("kind"), d.get("spec") or {}
    if kind in ("StatefulSet", "Deployment", "DaemonSet", "ReplicaSet", "Job"):
        t = spec.get("template") or {}
        return [(f"{kind}/{d['metadata']['name']}", t.get("spec") or {}, (t.get("metadata") or {}).get("labels") or {})]
    if kind == "CronJob":
        t = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
        return [(f"{kind}/{d['metadata']['name']}", t.get("spec") or {}, (t.get("metadata") or {}).get("labels") or {})]
    if kind == "Pod":
        return [(f"Pod/{d['metadata']['name']}", spec, d["metadata"].get("labels") or {})]
    return []


def containers(spec):
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def find(docs, kind, name=None):
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name=None):
    found = find(docs, kind, name)
    if len(found) != 1:
        raise LookupError(f"{len(found)} {kind} {name or ''} documents, not 1")
    return found[0]


def matches(selector, labels):
    """A label selector (matchLabels/matchExpressions, or a Service's plain map) matches labels."""
    if selector is None:
        return False
    plain = selector if "matchLabels" not in selector and "matchExpressions" not in selector else None
    if plain is not None:
        return bool(plain) and all(labels.get(k) == v for k, v in plain.items())
    ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for e in selector.get("matchExpressions") or []:
        v, op, vals = labels.get(e["key"]), e["operator"], e.get("values") or []
        ok &= {"In": v in vals, "NotIn": v not in vals, "Exists": v is not None, "DoesNotExist": v is None}[op]
    return ok and bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def port_names(spec):
    return {p.get("name") for c in spec.get("containers") or [] for p in c.get("ports") or []} - {None}


def port_numbers(spec):
    return {p["containerPort"] for c in spec.get("containers") or [] for p in c.get("ports") or []}


def names_port(spec, port):
    return port in port_names(spec) if isinstance(port, str) else port in port_numbers(spec)


# ---------------------------------------------------------------------------- schema checks


def schema_problems(docs, version):
    import kubernetes_validate  # noqa: PLC0415 - reported as a failure when missing

    problems = []
    for d in docs:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{d.get('kind')}/{d.get('metadata', {}).get('name')}: {path}: {e.message[:200]}")
        except Exception as e:  # noqa: BLE001 - no schema for the kind, a bad apiVersion...
            problems.append(f"{d.get('kind')}/{d.get('metadata', {}).get('name')}: {type(e).__name__}: "
                            f"{getattr(e, 'message', e)}")
    return problems


# ---------------------------------------------------------------------- cross-reference checks


def statefulset_problems(docs):
    sts = one(docs, "StatefulSet", "mcpd")
    spec, problems = sts["spec"], []
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels") or {}
    if not matches(spec.get("selector"), labels):
        problems.append("the StatefulSet's selector does not match its pod labels")
    if labels != NODE_LABELS:
        problems.append(f"pod labels {labels}, not {NODE_LABELS} (the other objects select these)")
    svc = find(docs, "Service", spec.get("serviceName"))
    if not svc:
        problems.append(f"serviceName {spec.get('serviceName')!r} names no Service of the kustomization")
    else:
        s = svc[0]["spec"]
        if s.get("clusterIP") != "None":
            problems.append(f"Service {spec['serviceName']} is not headless (clusterIP: None)")
        if not s.get("publishNotReadyAddresses"):
            problems.append(f"Service {spec['serviceName']} lacks publishNotReadyAddresses: true (pods are dialed before they are Ready)")
    if spec.get("podManagementPolicy") != "Parallel":
        problems.append("podManagementPolicy is not Parallel (pods are Ready only once members: OrderedReady never forms the cluster)")
    if (spec.get("replicas") or 0) % 2 != 1:
        problems.append(f"replicas {spec.get('replicas')}: not an odd number of voters")
    claims = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates") or []}
    if "data" not in claims:
        problems.append("no volumeClaimTemplate named data (each pod's own volume)")
    ret = spec.get("persistentVolumeClaimRetentionPolicy") or {}
    if ret.get("whenScaled", "Retain") != "Retain":
        problems.append("whenScaled is not Retain: an accidental scale-down would delete a member's log")
    anti = ((pod.get("affinity") or {}).get("podAntiAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or []
    if not any(t.get("topologyKey") == "kubernetes.io/hostname" and matches(t.get("labelSelector"), labels) for t in anti):
        problems.append("no required podAntiAffinity of the mcpd pods on kubernetes.io/hostname")
    with open(os.path.join(DEPLOY, "systemd", "mcpd.service")) as f:
        stop = int(re.search(r"^TimeoutStopSec=(\d+)", f.read(), flags=re.M).group(1))
    with open(os.path.join(DEPLOY, "docker", "compose.yml")) as f:
        compose = yaml.safe_load(f)
    node = compose["services"]["mcpd-1"]
    grace = int(str(node.get("stop_grace_period", "0s")).rstrip("s"))
    if pod.get("terminationGracePeriodSeconds") != stop or grace != stop:
        problems.append(f"terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds')}: not mcpd.service's "
                        f"TimeoutStopSec {stop} (compose: {grace}s)")
    compose_image = split_image(node["image"])[0]
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        images = {i["name"] for i in yaml.safe_load(f).get("images", [])}
    with open(os.path.join(K8S, "statefulset.yaml")) as f:
        raw = yaml.safe_load(f)
    for c in containers(raw["spec"]["template"]["spec"]):
        if split_image(c["image"])[0] != compose_image or compose_image not in images:
            problems.append(f"container {c['name']} image {c['image']}: not compose.yml's {node['image']} "
                            f"(renamed by kustomization.yaml images:)")
    return problems


def selector_problems(docs):
    """Every Service, PDB and NetworkPolicy selects the mcpd pods; Services' target ports are
    container ports."""
    sts = one(docs, "StatefulSet", "mcpd")
    pod, labels = sts["spec"]["template"]["spec"], sts["spec"]["template"]["metadata"]["labels"]
    problems = []
    for s in find(docs, "Service"):
        name = s["metadata"]["name"]
        if not matches(s["spec"].get("selector"), labels):
            problems.append(f"Service {name} selects no mcpd pod ({s['spec'].get('selector')})")
        for p in s["spec"].get("ports") or []:
            if not names_port(pod, p.get("targetPort", p["port"])):
                problems.append(f"Service {name} port {p.get('name')}: targetPort {p.get('targetPort')} is no container port")
    pdb = one(docs, "PodDisruptionBudget")
    if not matches(pdb["spec"].get("selector"), labels):
        problems.append("the PodDisruptionBudget selects no mcpd pod")
    replicas = sts["spec"].get("replicas", 1)
    quorum_spare = (replicas - 1) // 2
    if "maxUnavailable" in pdb["spec"]:
        if not isinstance(pdb["spec"]["maxUnavailable"], int) or not 1 <= pdb["spec"]["maxUnavailable"] <= quorum_spare:
            problems.append(f"PDB maxUnavailable {pdb['spec']['maxUnavailable']}: 1 to {quorum_spare} keeps a quorum of {replicas}")
    elif pdb["spec"].get("minAvailable", 0) <= replicas // 2:
        problems.append(f"PDB minAvailable {pdb['spec'].get('minAvailable')}: not a quorum of {replicas}")
    np = one(docs, "NetworkPolicy")
    if not matches(np["spec"].get("podSelector"), labels):
        problems.append("the NetworkPolicy's podSelector selects no mcpd pod")
    if "Ingress" not in np["spec"].get("policyTypes", []):
        problems.append("the NetworkPolicy does not govern Ingress")
    grpc_rules = [r for r in np["spec"].get("ingress") or []
                  if any(p.get("port") in ("grpc", 7500) for p in r.get("ports") or [])]
    if not grpc_rules:
        problems.append("no NetworkPolicy rule for the gRPC port")
    for r in grpc_rules:
        peers = r.get("from") or []
        if not peers or not all(set(p) == {"podSelector"} and matches(p["podSelector"], labels) for p in peers):
            problems.append(f"the gRPC port is open to more than the mcpd pods: from {peers or 'anywhere'}")
    for r in np["spec"].get("ingress") or []:
        for p in r.get("ports") or []:
            if "port" in p and not names_port(pod, p["port"]):
                problems.append(f"NetworkPolicy port {p['port']} is no container port")
    if not any(p.get("port") in ("https", 7400) for r in np["spec"].get("ingress") or [] for p in r.get("ports") or []):
        problems.append("the NetworkPolicy lets no client reach the HTTPS port")
    return problems


def probe_problems(docs):
    sts = one(docs, "StatefulSet", "mcpd")
    pod = sts["spec"]["template"]["spec"]
    c = next((c for c in pod["containers"] if c["name"] == "mcpd"), None)
    if c is None:
        return ["no container named mcpd"]
    problems = []
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez"), ("startupProbe", "/livez")):
        p = c.get(probe)
        if p is None:
            if probe != "startupProbe":
                problems.append(f"no {probe}")
            continue
        g = p.get("httpGet") or {}
        if g.get("path") != path:
            problems.append(f"{probe} asks {g.get('path')!r}, not {path}")
        if g.get("scheme") != "HTTPS":
            problems.append(f"{probe} scheme {g.get('scheme', 'HTTP')}: mcpd serves HTTPS")
        if not names_port(pod, g.get("port")):
            problems.append(f"{probe} port {g.get('port')!r} is no container port")
    return problems


def reference_problems(docs):
    """Every Secret, ConfigMap (and key), volume, service account and role that a pod or a
    binding names exists in the kustomization, or is a Secret the operator makes."""
    problems = []
    cms = {d["metadata"]["name"]: d for d in find(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in find(docs, "Secret")}
    accounts = {d["metadata"]["name"] for d in find(docs, "ServiceAccount")}

    def keys_of(kind, name):
        if kind == "configMap" and name in cms:
            return set(cms[name].get("data") or {}) | set(cms[name].get("binaryData") or {})
        if kind == "secret" and name in secrets:
            return set(secrets[name].get("data") or {}) | set(secrets[name].get("stringData") or {})
        if kind == "secret" and name in OPERATOR_SECRETS:
            return OPERATOR_SECRETS[name]
        return None

    def ref(where, kind, name, items=(), optional=False):
        known = keys_of(kind, name)
        if known is None:
            if kind == "configMap" and name in cms:
                known = set()
            elif not optional:
                problems.append(f"{where}: {kind} {name} is neither in the kustomization nor made by the operator")
                return
            else:
                if kind == "configMap" and name not in cms:
                    problems.append(f"{where}: optional {kind} {name} is not in the kustomization")
                return
        for k in items:
            if k not in known:
                problems.append(f"{where}: {kind} {name} has no key {k}")

    for d in docs:
        for where, spec, _ in pod_specs(d):
            sa = spec.get("serviceAccountName", "default")
            if sa not in accounts:
                problems.append(f"{where}: serviceAccountName {sa} is not in the kustomization")
            vols = {v["name"]: v for v in spec.get("volumes") or []}
            claims = {t["metadata"]["name"] for t in (d["spec"].get("volumeClaimTemplates") or [])}
            for v in vols.values():
                if "secret" in v:
                    s = v["secret"]
                    ref(f"{where} volume {v['name']}", "secret", s["secretName"], [i["key"] for i in s.get("items") or []],
                        s.get("optional", False))
                if "configMap" in v:
                    cm = v["configMap"]
                    ref(f"{where} volume {v['name']}", "configMap", cm["name"], [i["key"] for i in cm.get("items") or []],
                        cm.get("optional", False))
                for src in (v.get("projected") or {}).get("sources") or []:
                    for kind in ("secret", "configMap"):
                        if kind in src:
                            ref(f"{where} volume {v['name']}", kind, src[kind]["name"],
                                [i["key"] for i in src[kind].get("items") or []], src[kind].get("optional", False))
            for c in containers(spec):
                for m in c.get("volumeMounts") or []:
                    if m["name"] not in vols and m["name"] not in claims:
                        problems.append(f"{where} container {c['name']}: volumeMount {m['name']} names no volume")
                for e in c.get("env") or []:
                    vf = e.get("valueFrom") or {}
                    if "secretKeyRef" in vf:
                        r = vf["secretKeyRef"]
                        ref(f"{where} env {e['name']}", "secret", r["name"], [r["key"]], r.get("optional", False))
                    if "configMapKeyRef" in vf:
                        r = vf["configMapKeyRef"]
                        ref(f"{where} env {e['name']}", "configMap", r["name"], [r["key"]], r.get("optional", False))
                for e in c.get("envFrom") or []:
                    for kind, field in (("secret", "secretRef"), ("configMap", "configMapRef")):
                        if field in e:
                            ref(f"{where} envFrom", kind, e[field]["name"], (), e[field].get("optional", False))
                # A script the command runs is a key of the ConfigMap mounted where it lives.
                for arg in (c.get("command") or []) + (c.get("args") or []):
                    for m in c.get("volumeMounts") or []:
                        if isinstance(arg, str) and arg.startswith(m["mountPath"].rstrip("/") + "/"):
                            v = vols.get(m["name"]) or {}
                            if "configMap" in v:
                                name = arg[len(m["mountPath"].rstrip("/")) + 1:]
                                ref(f"{where} container {c['name']} runs {arg}", "configMap", v["configMap"]["name"], [name])
    roles = {(d["kind"], d["metadata"]["name"]) for d in find(docs, "Role") + find(docs, "ClusterRole")}
    for b in find(docs, "RoleBinding"):
        if (b["roleRef"]["kind"], b["roleRef"]["name"]) not in roles:
            problems.append(f"RoleBinding {b['metadata']['name']}: roleRef {b['roleRef']['name']} is not in the kustomization")
        for s in b.get("subjects") or []:
            if s["kind"] == "ServiceAccount" and s["name"] not in accounts:
                problems.append(f"RoleBinding {b['metadata']['name']}: subject {s['name']} is not in the kustomization")
            if s["kind"] == "ServiceAccount" and s.get("namespace") != b["metadata"].get("namespace"):
                problems.append(f"RoleBinding {b['metadata']['name']}: subject {s['name']} in namespace {s.get('namespace')}")
    return problems


def readme_section():
    with open(os.path.join(DEPLOY, "README.md")) as f:
        text = f.read()
    m = re.search(r"^## Kubernetes\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    return m.group(1) if m else ""


def operator_secret_problems():
    """Each Secret the operator makes is documented: how to make it, with its keys."""
    section, problems = readme_section(), []
    if not section:
        return ["deploy/README.md has no '## Kubernetes' section"]
    for name, keys in OPERATOR_SECRETS.items():
        m = re.search(rf"kubectl[^\n]*create secret generic {re.escape(name)}\b((?:[^\n]*\\\n)*[^\n]*)", section)
        if not m:
            problems.append(f"no `kubectl ... create secret generic {name}` in the README's Kubernetes section")
            continue
        if name == "mcpd-ca":
            missing = [k for k in keys if not re.search(rf"--from-file=(\S*/)?{re.escape(k)}\b", m.group(0))]
            if missing:
                problems.append(f"the README's command for {name} lacks {missing}")
    return problems


def example_keys():
    """Every key of mcpd.toml.example, set or shown commented out."""
    path = os.path.join(DEPLOY, "systemd", "mcpd.toml.example")
    with open(path, "rb") as f:
        keys = toml_keys(tomllib.load(f))
    table = ""
    with open(path) as f:
        for line in f:
            m = re.match(r"^\[([a-z_.]+)\]", line)
            if m:
                table = m.group(1) + "."
            m = re.match(r"^# ?([a-z][a-z0-9_]*) = ", line)
            if m:
                keys.add(table + m.group(1))
    return keys


def script_default(text, var):
    m = re.search(rf"=\$\{{{var}:-([^}}]+)\}}", text)
    return m.group(1) if m else None


def config_problems(docs):
    """The ConfigMap's mcpd.toml: TOML, keys of the example, consistent with the pod."""
    cm = one(docs, "ConfigMap", "mcpd-config")
    text = cm["data"].get("mcpd.toml")
    if text is None:
        return ["ConfigMap mcpd-config has no mcpd.toml"]
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [f"mcpd.toml is not TOML: {e}"]
    problems = [f"mcpd.toml sets {k}, which mcpd.toml.example does not have" for k in sorted(toml_keys(cfg) - example_keys())]
    for k in ("id", "advertise_http", "advertise_grpc"):
        if k in cfg:
            problems.append(f"mcpd.toml sets {k}, which differs per pod (start.sh passes it)")
    sts = one(docs, "StatefulSet", "mcpd")
    pod = sts["spec"]["template"]["spec"]
    main = next(c for c in pod["containers"] if c["name"] == "mcpd")
    mounts = {m["name"]: m["mountPath"] for m in main.get("volumeMounts") or []}
    scripts = one(docs, "ConfigMap", "mcpd-scripts")["data"]
    start = scripts.get("start.sh", "")
    volume = script_default(start, "MCPD_VOLUME")
    if volume != mounts.get("data"):
        problems.append(f"start.sh's volume {volume} is not where the data claim is mounted ({mounts.get('data')})")
    if cfg.get("data_dir") != f"{volume}/data":
        problems.append(f"data_dir {cfg.get('data_dir')} is not start.sh's --data-dir {volume}/data")
    tls_dir = (cfg.get("tls") or {}).get("dir")
    if tls_dir and not tls_dir.startswith(f"{volume}/"):
        problems.append(f"tls.dir {tls_dir} is not on the volume")
    template = script_default(start, "MCPD_CONFIG_TEMPLATE") or ""
    if os.path.dirname(template) != mounts.get("config") or os.path.basename(template) not in one(docs, "ConfigMap", "mcpd-config")["data"]:
        problems.append(f"start.sh reads {template}: not the mounted ConfigMap mcpd-config ({mounts.get('config')})")
    for var, mount in (("MCPD_RUN_DIR", "run"), ("MCPD_NODE_IDS_DIR", "node-ids")):
        if script_default(start, var) != mounts.get(mount):
            problems.append(f"start.sh's {var} {script_default(start, var)} is not volume {mount}'s mount {mounts.get(mount)}")
    ports = {p["name"]: p["containerPort"] for p in main.get("ports") or []}
    for key, port, var in (("http_addr", "https", "MCPD_HTTP_PORT"), ("grpc_addr", "grpc", "MCPD_GRPC_PORT")):
        listen = str(cfg.get(key, ""))
        if not listen.endswith(f":{ports.get(port)}") or script_default(start, var) != str(ports.get(port)):
            problems.append(f"{key} {listen!r}, start.sh's {var} {script_default(start, var)} and container port {port} "
                            f"{ports.get(port)} differ")
        if listen.startswith("127.") or listen.startswith("[::1]"):
            problems.append(f"{key} {listen}: loopback only, unreachable by peers and probes")
    env = {e["name"]: e.get("value") for e in main.get("env") or []}
    if env.get("MCPD_SERVICE", "mcpd") != sts["spec"]["serviceName"]:
        problems.append(f"MCPD_SERVICE {env.get('MCPD_SERVICE')} is not serviceName {sts['spec']['serviceName']}")
    inherit = (cfg.get("pool") or {}).get("inherit_env", [])
    for var in inherit:
        if var not in ("PATH", "LANG") and var not in env:
            problems.append(f"[pool] inherit_env lists {var}, which the container does not set")
    names = (cfg.get("api") or {}).get("tls_names", [])
    api_svc = [s["metadata"]["name"] for s in find(docs, "Service") if s["spec"].get("clusterIP") != "None"]
    for s in api_svc:
        if f"{s}.@NAMESPACE@.svc" not in names:
            problems.append(f"[api] tls_names lacks Service {s}'s name {s}.@NAMESPACE@.svc")
    # The init container and the Job: their scripts' defaults against their mounts.
    init = next((c for c in pod.get("initContainers") or [] if c["name"] == "tls-install"), None)
    if init is None:
        problems.append("no init container tls-install")
    else:
        imounts = {m["name"]: m["mountPath"] for m in init.get("volumeMounts") or []}
        it = scripts.get("install-tls.sh", "")
        if script_default(it, "MCPD_VOLUME") != imounts.get("data") or script_default(it, "MCPD_CA_DIR") != imounts.get("ca"):
            problems.append("install-tls.sh's default paths are not tls-install's mounts")
    return problems


def security_problems(docs):
    """The restricted Pod Security Standard, resources, and who sees the CA key."""
    problems = []
    for nsd in find(docs, "Namespace"):
        if (nsd["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce") != "restricted":
            problems.append(f"Namespace {nsd['metadata']['name']} does not enforce the restricted Pod Security Standard")
    with open(os.path.join(DEPLOY, "docker", "Dockerfile")) as f:
        uid = int(re.search(r"useradd [^\n]*--uid (\d+)", f.read()).group(1))
    for d in docs:
        for where, spec, _ in pod_specs(d):
            psc = spec.get("securityContext") or {}
            if psc.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if psc.get("runAsUser", uid) != uid:
                problems.append(f"{where}: runAsUser {psc.get('runAsUser')} is not the image's mcpd user {uid}")
            if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: no RuntimeDefault seccomp profile")
            for f in ("hostNetwork", "hostPID", "hostIPC"):
                if spec.get(f):
                    problems.append(f"{where}: {f}")
            for v in spec.get("volumes") or []:
                if "hostPath" in v:
                    problems.append(f"{where}: hostPath volume {v['name']}")
            for c in containers(spec):
                sc = c.get("securityContext") or {}
                w = f"{where} container {c['name']}"
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{w}: allowPrivilegeEscalation is not false")
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{w}: readOnlyRootFilesystem is not true")
                if sc.get("privileged"):
                    problems.append(f"{w}: privileged")
                caps = sc.get("capabilities") or {}
                if caps.get("drop") != ["ALL"] or caps.get("add"):
                    problems.append(f"{w}: capabilities are not drop [ALL] with nothing added")
                res = c.get("resources") or {}
                for kind in ("requests", "limits"):
                    if not {"cpu", "memory"} <= set(res.get(kind) or {}):
                        problems.append(f"{w}: no cpu and memory {kind}")
    # ca.key: only the StatefulSet's init container mounts the whole mcpd-ca Secret.
    for d in docs:
        for where, spec, _ in pod_specs(d):
            for v in spec.get("volumes") or []:
                s = v.get("secret") or {}
                if s.get("secretName") != "mcpd-ca":
                    continue
                whole = not s.get("items") or "ca.key" in [i["key"] for i in s["items"]]
                users = [c["name"] for c in containers(spec) if any(m["name"] == v["name"] for m in c.get("volumeMounts") or [])]
                if whole and users != ["tls-install"]:
                    problems.append(f"{where}: containers {users} mount all of Secret mcpd-ca (ca.key), not tls-install alone")
    sts = one(docs, "StatefulSet", "mcpd")["spec"]["template"]["spec"]
    if sts.get("automountServiceAccountToken") is not False:
        problems.append("the mcpd pods mount a service account token (mcpd does not call the Kubernetes API)")
    return problems


def members_job_problems(docs):
    """The bootstrap Job and the CronJob runs are the same pod, running members.sh."""
    job, cron = one(docs, "Job", "mcpd-bootstrap"), one(docs, "CronJob", "mcpd-members")
    problems = []
    if job["spec"]["template"] != cron["spec"]["jobTemplate"]["spec"]["template"]:
        problems.append("Job mcpd-bootstrap's pod differs from CronJob mcpd-members' pod")
    if cron["spec"].get("suspend") is not True:
        problems.append("CronJob mcpd-members is not suspended (it is a template, never scheduled)")
    c = job["spec"]["template"]["spec"]["containers"][0]
    if not any(str(a).endswith("/members.sh") for a in c.get("command", []) + c.get("args", [])):
        problems.append("the Job does not run members.sh")
    if job["spec"]["template"]["spec"].get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append("the Job's restartPolicy")
    # The Job finds the pods by the names the pods advertise, and verifies them with ca.pem.
    sts = one(docs, "StatefulSet", "mcpd")["spec"]
    node_env = {e["name"]: e.get("value") for c in sts["template"]["spec"]["containers"] for e in c.get("env") or []}
    job_env = {e["name"]: e.get("value") for e in c.get("env") or []}
    if job_env.get("CLUSTER_DOMAIN") != node_env.get("CLUSTER_DOMAIN"):
        problems.append(f"CLUSTER_DOMAIN: the Job's {job_env.get('CLUSTER_DOMAIN')}, the nodes' {node_env.get('CLUSTER_DOMAIN')}")
    if sts["serviceName"] != "mcpd" or one(docs, "StatefulSet", "mcpd")["metadata"]["name"] != "mcpd":
        problems.append("members.sh dials mcpd-N.mcpd...: the StatefulSet and its Service must be named mcpd")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts") or []}
    ca = next((v for v in job["spec"]["template"]["spec"].get("volumes") or [] if (v.get("secret") or {}).get("secretName") == "mcpd-ca"), None)
    if ca is None or job_env.get("MCPCTL_CACERT") != f"{mounts.get(ca['name'])}/ca.pem":
        problems.append(f"MCPCTL_CACERT {job_env.get('MCPCTL_CACERT')} is not ca.pem of the mounted Secret mcpd-ca")
    return problems


CROSS_CHECKS = (
    ("StatefulSet: serviceName names the headless Service (publishNotReadyAddresses), Parallel, odd replicas, "
     "claims retained, anti-affinity per host, grace period of mcpd.service, compose's image", statefulset_problems),
    ("Services, PodDisruptionBudget and NetworkPolicy select the mcpd pods; ports name container ports; "
     "gRPC from mcpd pods only; the PDB keeps quorum", selector_problems),
    ("probes: readiness /readyz, liveness and startup /livez, over HTTPS, on a named container port", probe_problems),
    ("every Secret, ConfigMap, key, volume, script, service account and role named exists in the kustomization "
     "(or is a Secret the operator makes)", reference_problems),
    ("ConfigMap mcpd.toml parses as TOML, every key is one of mcpd.toml.example, and it agrees with the pod "
     "(volume, ports, service, env, tls_names)", config_problems),
    ("security: restricted Pod Security Standard, non-root uid of the image, read-only root, no capabilities, "
     "requests and limits, ca.key mounted only by tls-install", security_problems),
    ("members Job: bootstrap Job and CronJob template are the same pod running members.sh", members_job_problems),
)


def run_checks(docs, checks):
    out = {}
    for name, fn in checks:
        try:
            out[name] = fn(docs)
        except (LookupError, KeyError, TypeError, AttributeError, StopIteration, ValueError) as e:
            out[name] = [f"{type(e).__name__}: {e}"]
    return out


# Each breaks one thing; the checks must notice it (name of the check's function, or "schema").
def _set(path, value):
    def mutate(docs):
        kind, name, *keys = path
        d = one(docs, kind, name)
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return mutate


def _main_container(docs):
    return next(c for c in one(docs, "StatefulSet", "mcpd")["spec"]["template"]["spec"]["containers"] if c["name"] == "mcpd")


def _mut_probe(docs):
    _main_container(docs)["readinessProbe"]["httpGet"]["path"] = "/healthz"


def _mut_port(docs):
    _main_container(docs)["livenessProbe"]["httpGet"]["port"] = "http"


def _mut_secret(docs):
    for v in one(docs, "StatefulSet", "mcpd")["spec"]["template"]["spec"]["volumes"]:
        if v["name"] == "ca":
            v["secret"]["secretName"] = "mcpd-tls"


def _mut_config(docs):
    cm = one(docs, "ConfigMap", "mcpd-config")
    cm["data"]["mcpd.toml"] += "\n[api]\nquorum_wait = 5\n"


def _mut_config_key(docs):
    cm = one(docs, "ConfigMap", "mcpd-config")
    cm["data"]["mcpd.toml"] = cm["data"]["mcpd.toml"].replace("[log]\n", "[log]\nrotate = true\n")


def _mut_netpol(docs):
    np = one(docs, "NetworkPolicy")
    for r in np["spec"]["ingress"]:
        r.pop("from", None)


def _mut_root(docs):
    _main_container(docs)["securityContext"]["readOnlyRootFilesystem"] = False


MUTATIONS = (
    ("an unknown field (spec.replica) in the StatefulSet", _set(("StatefulSet", "mcpd", "spec", "replica"), 3), "schema"),
    ("a string where the schema wants an integer (terminationGracePeriodSeconds: '45')",
     _set(("StatefulSet", "mcpd", "spec", "template", "spec", "terminationGracePeriodSeconds"), "45"), "schema"),
    ("serviceName naming no Service", _set(("StatefulSet", "mcpd", "spec", "serviceName"), "mcpd-peers"), "statefulset_problems"),
    ("a PDB selector of other pods", _set(("PodDisruptionBudget", "mcpd", "spec", "selector"), {"matchLabels": {"app": "mcpd"}}),
     "selector_problems"),
    ("a readiness probe on /healthz", _mut_probe, "probe_problems"),
    ("a liveness probe on a port name no container has", _mut_port, "probe_problems"),
    ("a pod mounting a Secret nobody makes", _mut_secret, "reference_problems"),
    ("mcpd.toml that is not TOML (a table twice)", _mut_config, "config_problems"),
    ("mcpd.toml with a key mcpd does not have", _mut_config_key, "config_problems"),
    ("the gRPC port open to every pod", _mut_netpol, "selector_problems"),
    ("a writable root filesystem", _mut_root, "security_problems"),
)


def mutation_results(docs, validate):
    """For each mutation: None if a check failed on it, else what slipped through."""
    slipped = []
    for what, mutate, caught_by in MUTATIONS:
        broken = copy.deepcopy(docs)
        mutate(broken)
        if caught_by == "schema":
            caught = bool(validate(broken))
        else:
            fn = next(fn for _, fn in CROSS_CHECKS if fn.__name__ == caught_by)
            caught = bool(run_checks(broken, [("x", fn)])["x"])
        if not caught:
            slipped.append(what)
    return slipped


# -------------------------------------------------------------------------------- the scripts


def scripts_of(docs):
    return one(docs, "ConfigMap", "mcpd-scripts")["data"]


def check_syntax(docs):
    bad = []
    for name, text in scripts_of(docs).items():
        r = subprocess.run([SH, "-n"], input=text, capture_output=True, text=True)
        if r.returncode != 0:
            bad.append(f"{name}: {r.stderr.strip()}")
    R.check(f"scripts parse ({os.path.basename(SH)} -n): {', '.join(sorted(scripts_of(docs)))}", not bad, "; ".join(bad))
    if not shutil.which("shellcheck"):
        R.skip("shellcheck of the scripts", "shellcheck not installed")
        return
    r = subprocess.run(["shellcheck", "-s", "sh", *[os.path.join(K8S, "scripts", n) for n in sorted(scripts_of(docs))]],
                       capture_output=True, text=True)
    R.check("shellcheck of the scripts", r.returncode == 0, r.stdout[-1500:])


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def check_start_sh(docs):
    """start.sh with a stand-in mcpd that records its arguments."""
    scripts = scripts_of(docs)
    config = one(docs, "ConfigMap", "mcpd-config")["data"]["mcpd.toml"]
    problems = []
    with tempfile.TemporaryDirectory() as d:
        write(f"{d}/start.sh", scripts["start.sh"])
        write(f"{d}/config/mcpd.toml", config)
        write(f"{d}/mcpd", '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$ARGS_OUT"\n', 0o755)

        def start(pod, volume_id=None, next_id=None, extra=()):
            vol = tempfile.mkdtemp(dir=d)
            ids = tempfile.mkdtemp(dir=d)
            run_dir = os.path.join(vol, "run")
            if volume_id is not None:
                write(f"{vol}/data/node_id", f"{volume_id}\n")
            if next_id is not None:
                write(f"{ids}/{pod}", str(next_id))
            out = os.path.join(vol, "args")
            env = {"PATH": os.environ["PATH"], "POD_NAME": pod, "POD_NAMESPACE": "team-a", "CLUSTER_DOMAIN": "cluster.local",
                   "MCPD_VOLUME": vol, "MCPD_CONFIG_TEMPLATE": f"{d}/config/mcpd.toml", "MCPD_RUN_DIR": run_dir,
                   "MCPD_NODE_IDS_DIR": ids, "MCPD_BIN": f"{d}/mcpd", "ARGS_OUT": out}
            r = subprocess.run([SH, f"{d}/start.sh", *extra], env=env, capture_output=True, text=True, timeout=20)
            args = open(out).read().splitlines() if os.path.exists(out) else None
            rendered = open(os.path.join(run_dir, "mcpd.toml")).read() if os.path.exists(os.path.join(run_dir, "mcpd.toml")) else None
            return r, args, rendered, vol

        def flag(args, name):
            return args[args.index(name) + 1] if args and name in args else None

        r, args, rendered, vol = start("mcpd-2", extra=("--log-format", "text"))
        fqdn = "mcpd-2.mcpd.team-a.svc.cluster.local"
        want = {"--id": "3", "--data-dir": f"{vol}/data", "--advertise-http": f"{fqdn}:7400",
                "--advertise-grpc": f"{fqdn}:7500", "--config": f"{vol}/run/mcpd.toml"}
        if r.returncode != 0 or args is None:
            problems.append(f"a new volume: exit {r.returncode}: {r.stderr.strip()[-300:]}")
        else:
            for k, v in want.items():
                if flag(args, k) != v:
                    problems.append(f"a new volume of mcpd-2: {k} {flag(args, k)!r}, not {v!r}")
            if args[-2:] != ["--log-format", "text"]:
                problems.append(f"its own arguments are not passed on last: {args[-2:]}")
            try:
                cfg = tomllib.loads(rendered or "")
                names = cfg["api"]["tls_names"]
                if "@" in rendered or "mcpd-api.team-a.svc.cluster.local" not in names:
                    problems.append(f"the config it wrote has tls_names {names}")
            except (tomllib.TOMLDecodeError, KeyError) as e:
                problems.append(f"the config it wrote: {e}")
        r, args, _, _ = start("mcpd-2", volume_id=7)
        if flag(args, "--id") != "7":
            problems.append(f"a volume of node 7: --id {flag(args, '--id')} ({r.stderr.strip()[-200:]})")
        r, args, _, _ = start("mcpd-2", next_id=1003)
        if flag(args, "--id") != "1003":
            problems.append(f"a new volume after a removal (ConfigMap 1003): --id {flag(args, '--id')}")
        r, args, _, _ = start("mcpd-2", volume_id=1003, next_id=1003)
        if flag(args, "--id") != "1003":
            problems.append(f"the volume of node 1003, its ConfigMap id: --id {flag(args, '--id')}")
        r, args, _, _ = start("mcpd-2", volume_id=3, next_id=1003)
        if r.returncode == 0 or args is not None or "delete pvc data-mcpd-2" not in r.stderr:
            problems.append(f"the volume of removed node 3 must stop the pod and name its claim: exit {r.returncode}, "
                            f"mcpd {'ran' if args else 'not run'}: {r.stderr.strip()[-200:]}")
        r, args, _, _ = start("mcpd")
        if r.returncode == 0 or args is not None:
            problems.append("a pod name without an ordinal was accepted")
    R.check("start.sh: node id from the volume, else ConfigMap mcpd-node-ids, else ordinal+1; refuses a removed "
            "node's volume; advertises the headless-Service name; writes mcpd.toml for the namespace",
            not problems, "; ".join(problems))


def check_install_tls(docs):
    text = scripts_of(docs)["install-tls.sh"]
    problems = []
    with tempfile.TemporaryDirectory() as d:
        write(f"{d}/install-tls.sh", text)
        ca = f"{d}/secret"
        for f, body in (("ca.pem", "CERT\n"), ("ca.key", "KEY\n"), ("data.key", "0" * 64 + "\n")):
            write(f"{ca}/{f}", body, 0o440)
        vol = f"{d}/vol"
        os.makedirs(vol)
        env = {"PATH": os.environ["PATH"], "MCPD_VOLUME": vol, "MCPD_CA_DIR": ca}

        def run_it():
            return subprocess.run([SH, f"{d}/install-tls.sh"], env=env, capture_output=True, text=True, timeout=20)

        r = run_it()
        tls = f"{vol}/data/tls"
        if r.returncode != 0:
            problems.append(f"a new volume: exit {r.returncode}: {r.stderr.strip()}")
        else:
            for f in ("ca.pem", "ca.key", "data.key"):
                p = f"{tls}/{f}"
                if not os.path.exists(p) or open(p).read() != open(f"{ca}/{f}").read():
                    problems.append(f"tls/{f} not installed")
                elif stat.S_IMODE(os.stat(p).st_mode) != 0o600:
                    problems.append(f"tls/{f} mode {oct(stat.S_IMODE(os.stat(p).st_mode))}")
            for p in (f"{vol}/data", tls, f"{vol}/home"):
                if stat.S_IMODE(os.stat(p).st_mode) != 0o700:
                    problems.append(f"{os.path.relpath(p, vol)} mode {oct(stat.S_IMODE(os.stat(p).st_mode))}")
            if os.listdir(tls) != [] and sorted(os.listdir(tls)) != ["ca.key", "ca.pem", "data.key"]:
                problems.append(f"tls/ holds {sorted(os.listdir(tls))}")
        write(f"{tls}/node.pem", "NODE\n")
        r = run_it()
        if r.returncode != 0:
            problems.append(f"a second start: exit {r.returncode}: {r.stderr.strip()}")
        write(f"{ca}/data.key", "1" * 64 + "\n", 0o440)
        r = run_it()
        if r.returncode == 0 or "data.key" not in r.stderr:
            problems.append(f"another data.key in the Secret than on the volume: exit {r.returncode}")
        os.remove(f"{ca}/data.key")
        shutil.rmtree(f"{vol}/data")
        r = run_it()
        if r.returncode == 0 or "data.key" not in r.stderr:
            problems.append(f"a Secret without data.key: exit {r.returncode}")
    R.check("install-tls.sh: installs ca.pem, ca.key, data.key 0600 in a 0700 TLS directory; keeps them; refuses "
            "others; names a missing one", not problems, "; ".join(problems))


# members.sh against stand-ins: `curl` (the Kubernetes API, enforcing the Role, and the nodes'
# /v1/node and /readyz) and `mcpctl` (init, status, add-node, remove-node), over one state file.
FAKE = r'''
import base64, json, os, sys, urllib.parse

STATE = os.environ["FAKE_STATE"]
st = json.load(open(STATE))
NS, DOMAIN = st["ns"], "cluster.local"


def save():
    json.dump(st, open(STATE, "w"), indent=1)


def fqdn(k):
    return f"mcpd-{k}.mcpd.{NS}.svc.{DOMAIN}"


def pods():
    return {int(k): v for k, v in st["pods"].items()}


def set_replicas(n):
    st["replicas"] = n
    for k in list(st["pods"]):
        if int(k) >= n:
            del st["pods"][k]
    for k in range(n):
        if str(k) not in st["pods"]:
            nxt = st["configmap"].get(f"mcpd-{k}")
            vol = st["volumes"].get(str(k))
            st["pods"][str(k)] = {"id": vol if vol is not None else int(nxt) if nxt else k + 1, "initialized": False}
            st["volumes"][str(k)] = st["pods"][str(k)]["id"]


def allowed(verb, group, resource, name):
    return any(group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
               and (not r.get("resourceNames") or name in r["resourceNames"]) for r in st["rules"])


def pretty(obj):
    return json.dumps(obj, indent=2) + "\n"


def merge(dst, patch):
    for k, v in patch.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict):
            merge(dst.setdefault(k, {}), v)
        else:
            dst[k] = v


def curl(argv):
    opts, url, headers, i = {}, None, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("-H", "-X", "-o", "--cacert", "--max-time", "--data-binary"):
            if a == "-H":
                h = argv[i + 1]
                headers += open(h[1:]).read().splitlines() if h.startswith("@") else [h]
            else:
                opts[a] = argv[i + 1]
            i += 2
            continue
        if a.startswith("https://"):
            url = a
        elif not a.startswith("-"):
            sys.exit(f"fake curl: unexpected argument {a}")
        i += 1
    u = urllib.parse.urlsplit(url)
    method = opts.get("-X", "GET")
    out = opts.get("-o")

    def answer(code, body=""):
        if out:
            open(out, "w").write(body)
        else:
            sys.stdout.write(body)
        st["calls"].append(f"{method} {u.netloc}{u.path}{'?' + u.query if u.query else ''} {code}")
        save()
        sys.exit(0 if code < 400 else 22)

    if u.netloc == "kubernetes.default.svc":
        if f"Authorization: Bearer {st['sa_token']}" not in headers or opts.get("--cacert") != st["sa_ca"]:
            answer(401, "{}")
        parts = u.path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        if rest[:2] != ["namespaces", NS] or len(rest) != 4:
            answer(404, "{}")
        resource, name = rest[2], rest[3]
        verb = {"GET": "get", "PATCH": "patch"}[method]
        if not allowed(verb, group, resource, name):
            answer(403, json.dumps({"kind": "Status", "message": f"forbidden: {verb} {resource}/{name}"}))
        patch = None
        if method == "PATCH":
            if "Content-Type: application/merge-patch+json" not in headers:
                answer(415, "{}")
            patch = json.load(open(opts["--data-binary"][1:]))
        dry = "dryRun=All" in u.query
        if (resource, name) == ("statefulsets", "mcpd"):
            if patch and not dry:
                merge(st["sts_meta"], patch.get("metadata", {}))
                if "replicas" in patch.get("spec", {}):
                    set_replicas(patch["spec"]["replicas"])
            last = json.dumps({"spec": {"replicas": 99}, "metadata": {"annotations": {"mcpd/scale-down-to": "98"}}})
            ann = dict(st["sts_meta"].get("annotations", {}))
            ann["kubectl.kubernetes.io/last-applied-configuration"] = last
            answer(200, pretty({"apiVersion": "apps/v1", "kind": "StatefulSet",
                                "metadata": {"name": "mcpd", "namespace": NS, "annotations": ann},
                                "spec": {"replicas": st["replicas"], "serviceName": "mcpd",
                                         "template": {"spec": {"containers": [{"name": "mcpd"}]}},
                                         "volumeClaimTemplates": [{"spec": {"accessModes": ["ReadWriteOnce"]}}]},
                                "status": {"replicas": len(st["pods"]), "readyReplicas": 1}}))
        if (resource, name) == ("configmaps", "mcpd-node-ids"):
            if patch and not dry:
                merge(st["configmap"], patch.get("data", {}))
            answer(200, pretty({"kind": "ConfigMap", "metadata": {"name": name, "managedFields": [
                {"fieldsV1": {"f:data": {f"f:{k}": {} for k in st["configmap"]}}}]}, "data": st["configmap"]}))
        if (resource, name) == ("secrets", "mcpd-admin-token"):
            if not st["secret_exists"]:
                answer(404, json.dumps({"message": "secrets mcpd-admin-token not found"}))
            if patch and not dry:
                merge(st["secret"], patch.get("data", {}))
            answer(200, pretty({"kind": "Secret", "metadata": {"name": name}, "data": st["secret"]}))
        answer(404, "{}")
    for k, p in pods().items():
        if u.netloc == f"{fqdn(k)}:7400":
            if opts.get("--cacert") != st["ca"]:
                sys.exit(60)
            if u.path == "/v1/node":
                answer(200, pretty({"id": p["id"], "http_addr": f"{fqdn(k)}:7400", "grpc_addr": f"{fqdn(k)}:7500",
                                    "initialized": p["initialized"], "version": "0.0.0",
                                    "sandbox": {"run_as": False, "rlimits": True}}))
            if u.path == "/readyz":
                ok = p["initialized"] and str(p["id"]) in st["members"] and st["members"][str(p["id"])]["role"] == "voter"
                answer(200 if ok else 503, json.dumps({"ready": ok}))
    sys.exit(6)  # could not resolve host


def mcpctl(argv):
    eps = [e for e in os.environ.get("MCPCTL_ENDPOINTS", "").split(",") if e]
    token = os.environ.get("MCPCTL_TOKEN")
    st["calls"].append("mcpctl " + " ".join(argv) + f" @{len(eps)}")
    if not eps or os.environ.get("MCPCTL_CACERT") != st["ca"]:
        save()
        sys.exit("mcpctl: no endpoints or no CA")
    by_url = {f"https://{fqdn(k)}:7400": (k, p) for k, p in pods().items()}
    for e in eps:
        if e not in by_url:
            save()
            sys.exit(f"mcpctl: {e} does not answer")
    cmd = argv[1]
    if cmd == "init":
        for e in eps:
            if by_url[e][1]["initialized"]:
                save()
                sys.exit(f"node {by_url[e][1]['id']} ({e}) already belongs to a cluster")
        for k, p in (by_url[e] for e in eps):
            p["initialized"] = True
            st["members"][str(p["id"])] = {"role": "voter", "http": f"{fqdn(k)}:7400", "grpc": f"{fqdn(k)}:7500"}
            st["ever"].append(p["id"])
        st["inits"] += 1
        st["admin_token"] = "mcpt_0123456789ab_secret" + str(st["inits"])
        print(st["admin_token"])
        save()
        return
    if token != st.get("admin_token"):
        save()
        sys.exit("mcpctl: 401 unauthorized")
    if cmd == "status":
        print("leader: 1   term: 2   revision: 9   answered by: node 1 (leader)")
        print("last log: 9   committed: 9   applied: 9   snapshot: -   purged: -")
        print("ID    ROLE     HTTP   GRPC   MATCHED  APPLIED  LAG  HEALTH  SANDBOX")
        for mid, m in sorted(st["members"].items(), key=lambda x: int(x[0])):
            print(f"{mid}  {m['role']}  {m['http']}  {m['grpc']}  9  9  0  ok  rlimits")
    elif cmd == "add-node":
        a = dict(zip(argv[2::2], argv[3::2]))
        nid = int(a["--id"])
        if nid in st["ever"] and st["members"].get(str(nid), {}).get("role") != "learner":
            save()
            sys.exit(f"node id {nid} was a member before; node ids are never reused")
        st["members"][str(nid)] = {"role": "voter", "http": a["--http"], "grpc": a["--grpc"]}
        st["ever"].append(nid)
        for p in pods().values():
            if p["id"] == nid:
                p["initialized"] = True
        print(f"node {nid} added as voter")
    elif cmd == "remove-node":
        nid = argv[2]
        if nid not in st["members"]:
            save()
            sys.exit(f"node {nid} is not a member")
        del st["members"][nid]
        print(f"node {nid} removed")
    save()


if os.path.basename(sys.argv[0]) == "curl":
    curl(sys.argv[1:])
else:
    mcpctl(sys.argv[1:])
'''


def members_sandbox(d, rules, pods=3):
    """members.sh, the stand-ins (curl, mcpctl) and their state in d: (run, state, edit)."""
    write(f"{d}/bin/fake.py", f"#!{sys.executable}\n" + FAKE, 0o755)
    for tool in ("curl", "mcpctl"):
        os.symlink(f"{d}/bin/fake.py", f"{d}/bin/{tool}")
    write(f"{d}/sa/token", "sa-token\n")
    write(f"{d}/sa/ca.crt", "K8S CA\n")
    write(f"{d}/ca.pem", "CLUSTER CA\n")
    path = f"{d}/state.json"
    with open(path, "w") as f:
        json.dump({"ns": "team-a", "replicas": pods, "pods": {str(k): {"id": k + 1, "initialized": False} for k in range(pods)},
                   "volumes": {str(k): k + 1 for k in range(pods)}, "members": {}, "ever": [], "configmap": {},
                   "secret": {}, "secret_exists": True, "sts_meta": {}, "calls": [], "inits": 0, "rules": rules,
                   "sa_token": "sa-token", "sa_ca": f"{d}/sa/ca.crt", "ca": f"{d}/ca.pem"}, f)

    def state():
        with open(path) as f:
            return json.load(f)

    def edit(fn):
        s = state()
        fn(s)
        with open(path, "w") as f:
            json.dump(s, f)

    def run(script):
        env = {"PATH": f"{d}/bin:{os.environ['PATH']}", "FAKE_STATE": path, "POD_NAMESPACE": "team-a",
               "CLUSTER_DOMAIN": "cluster.local", "MCPCTL_CACERT": f"{d}/ca.pem", "SERVICEACCOUNT_DIR": f"{d}/sa",
               "MCPD_WAIT_S": "2", "TMPDIR": d}
        token = state()["secret"].get("token")
        if token:  # the Job's env comes from the Secret (secretKeyRef), as it was when the pod started
            env["MCPCTL_TOKEN"] = base64.b64decode(token).decode()
        return subprocess.run([SH, script], env=env, capture_output=True, text=True, timeout=120)

    return run, state, edit


def check_members_sh(docs):
    """members.sh: bootstrap, again, scale up, scale down, scale up again; no writable Secret."""
    text = scripts_of(docs)["members.sh"]
    rules = one(docs, "Role", "mcpd-members")["rules"]
    problems = []

    def expect(what, r, state, **want):
        s, bad = state(), []
        if r.returncode != 0:
            bad.append(f"exit {r.returncode}")
        for k, (get, wanted) in want.items():
            if get(s) != wanted:
                bad.append(f"{k} {get(s)!r}, not {wanted!r}")
        if bad:
            problems.append(f"{what}: {'; '.join(bad)}: {r.stderr.strip()[-400:]}")

    def voters(s):
        return sorted(int(i) for i, m in s["members"].items() if m["role"] == "voter")

    with tempfile.TemporaryDirectory() as d:
        write(f"{d}/members.sh", text)
        run, state, edit = members_sandbox(d, rules)
        # 1. Bootstrap: three new pods, an empty Secret.
        r = run(f"{d}/members.sh")
        expect("bootstrap", r, state, inits=(lambda s: s["inits"], 1), voters=(voters, [1, 2, 3]),
               token=(lambda s: base64.b64decode(s["secret"].get("token", "")).decode(), "mcpt_0123456789ab_secret1"),
               init=(lambda s: [c for c in s["calls"] if c.startswith("mcpctl cluster init")], ["mcpctl cluster init @3"]))
        if "mcpt_0123456789ab_secret1" in r.stderr + r.stdout:
            problems.append("bootstrap: the admin token is in the Job's log")
        # 2. Again: nothing to change, no second init.
        before = len(state()["calls"])
        r = run(f"{d}/members.sh")
        expect("a second run", r, state, inits=(lambda s: s["inits"], 1), voters=(voters, [1, 2, 3]),
               writes=(lambda s: [c for c in s["calls"][before:] if "add-node" in c or "remove-node" in c
                                  or c.startswith("PATCH")], []))
        # 3. kubectl scale --replicas=5, then the Job.
        def scale_up(s, n):
            s["replicas"] = n
            for k in range(n):
                if str(k) not in s["pods"]:
                    nid = s["volumes"].get(str(k)) or int(s["configmap"].get(f"mcpd-{k}", k + 1))
                    s["pods"][str(k)] = {"id": nid, "initialized": False}
                    s["volumes"][str(k)] = nid
        edit(lambda s: scale_up(s, 5))
        r = run(f"{d}/members.sh")
        expect("scale-up to 5", r, state, voters=(voters, [1, 2, 3, 4, 5]), inits=(lambda s: s["inits"], 1))
        # 4. Scale down to 3: the annotation, then the Job.
        edit(lambda s: s["sts_meta"].setdefault("annotations", {}).update({"mcpd/scale-down-to": "3"}))
        r = run(f"{d}/members.sh")
        expect("scale-down to 3", r, state, voters=(voters, [1, 2, 3]), replicas=(lambda s: s["replicas"], 3),
               annotation=(lambda s: s["sts_meta"].get("annotations", {}).get("mcpd/scale-down-to"), None),
               next_ids=(lambda s: s["configmap"], {"mcpd-3": "1004", "mcpd-4": "1005"}),
               order=(lambda s: [c.split(" @")[0] for c in s["calls"] if "remove-node" in c],
                      ["mcpctl cluster remove-node 5", "mcpctl cluster remove-node 4"]))
        if "delete pvc data-mcpd-3" not in r.stderr or "delete pvc data-mcpd-4" not in r.stderr:
            problems.append("scale-down: the Job does not say to delete the removed pods' claims")
        # 5. Up to 4 again, mcpd-3's claim deleted: a new volume, node 1004.
        edit(lambda s: (s["volumes"].pop("3", None), scale_up(s, 4)))
        r = run(f"{d}/members.sh")
        expect("scale-up to 4 after the scale-down", r, state, voters=(voters, [1, 2, 3, 1004]))
    # 6. A token Secret the Job may not write: it stops before forming the cluster.
    with tempfile.TemporaryDirectory() as d:
        write(f"{d}/members.sh", text)
        run, state, _ = members_sandbox(d, [r for r in rules if "secrets" not in r.get("resources", [])])
        r = run(f"{d}/members.sh")
        if r.returncode == 0 or state()["inits"] != 0 or "create secret generic mcpd-admin-token" not in r.stderr:
            problems.append(f"a Secret the Job cannot write: exit {r.returncode}, {state()['inits']} init(s): "
                            f"{r.stderr.strip()[-300:]}")
    R.check("members.sh against stand-ins of the API (Role mcpd-members enforced), the nodes and mcpctl: bootstrap inits "
            "once and stores the token; a rerun changes nothing; scale-up adds; scale-down removes (highest first), records "
            "fresh ids and scales; a new volume joins with its fresh id; no init without a writable token Secret",
            not problems, " | ".join(problems))


# ------------------------------------------------------------------------ mcpd with the config


def check_mcpd(docs):
    name = "mcpd starts through install-tls.sh and start.sh with the ConfigMap's mcpd.toml: HTTPS /livez 200, " \
           "/readyz 503 before init, the pod's and Service's names in its certificate, SIGTERM exits 0"
    for b in ("mcpd", "mcpctl"):
        if not os.access(binary(b), os.X_OK):
            R.skip(name, f"{binary(b)} not built (mcpd has no check-only mode: the config is checked by starting it)")
            return
    scripts = scripts_of(docs)
    config = one(docs, "ConfigMap", "mcpd-config")["data"]["mcpd.toml"]
    problems = []
    with tempfile.TemporaryDirectory() as d:
        pki = f"{d}/pki"
        try:
            make_ca(pki, "k8s-check")
        except RuntimeError as e:
            R.fail(name, f"no cluster CA: {e}")
            return
        for s in ("start.sh", "install-tls.sh"):
            write(f"{d}/{s}", scripts[s])
        write(f"{d}/config/mcpd.toml", config)
        vol = f"{d}/vol"
        os.makedirs(vol)
        env = {"PATH": os.environ["PATH"], "MCPD_VOLUME": vol, "MCPD_CA_DIR": pki}
        r = subprocess.run([SH, f"{d}/install-tls.sh"], env=env, capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            R.fail(name, f"install-tls.sh: {r.stderr.strip()}")
            return
        env.update(POD_NAME="mcpd-0", POD_NAMESPACE="k8s-check", MCPD_CONFIG_TEMPLATE=f"{d}/config/mcpd.toml",
                   MCPD_RUN_DIR=f"{d}/run", MCPD_NODE_IDS_DIR=f"{d}/ids", MCPD_BIN=binary("mcpd"),
                   HOME=f"{vol}/home", TMPDIR=d)
        log = open(f"{d}/log", "w")
        p = subprocess.Popen([SH, f"{d}/start.sh", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"], env=env,
                             stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        rc = None
        try:
            def listening():
                if p.poll() is not None:
                    raise RuntimeError(f"exited {p.returncode}")
                with open(f"{vol}/data/endpoints.json") as f:
                    return json.load(f)
            ep = wait_until("mcpd writes endpoints.json", listening, 30, every=0.1)
            addr = ep["http_addr"]
            ctx = ssl.create_default_context(cafile=f"{pki}/ca.pem")
            status, _, _ = http("GET", f"https://{addr}/livez", context=ctx, timeout=5)
            if status != 200:
                problems.append(f"/livez {status}")
            status, _, body = http("GET", f"https://{addr}/readyz", context=ctx, timeout=5)
            if status != 503 or json.loads(body).get("tls") != "cluster":
                problems.append(f"/readyz before init: {status} {body[:200]!r}")
            host, port = addr.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=host) as s:
                    sans = {v for _, v in s.getpeercert().get("subjectAltName", ())}
            for n in ("mcpd-0.mcpd.k8s-check.svc.cluster.local", "mcpd-api.k8s-check.svc", "mcpd-api"):
                if n not in sans:
                    problems.append(f"the certificate lacks {n} (has {sorted(sans)})")
            if open(f"{vol}/data/node_id").read().strip() != "1":
                problems.append("node_id on the volume is not 1")
        except (RuntimeError, TimeoutError, OSError, ValueError) as e:
            problems.append(str(e))
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    rc = p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    rc = "killed after 20s"
            else:
                rc = p.returncode
            log.close()
        if rc != 0:
            problems.append(f"exit status {rc} after SIGTERM")
        if problems:
            problems.append(open(f"{d}/log", errors="replace").read()[-600:])
    R.check(name, not problems, "; ".join(problems))


# -------------------------------------------------------------------------------------- main


def main():
    try:
        docs = render(K8S)
    except (OSError, ValueError, yaml.YAMLError) as e:
        R.fail("deploy/kubernetes renders", f"{type(e).__name__}: {e}")
        R.exit()
    kinds = sorted({d.get("kind") for d in docs})
    R.ok("deploy/kubernetes renders (kustomization.yaml by the test's loader, PyYAML)", f"{len(docs)} documents: {', '.join(kinds)}")

    if shutil.which("kubectl"):
        r = subprocess.run(["kubectl", "kustomize", K8S], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            R.fail("kubectl kustomize renders the same documents", r.stderr.strip()[-500:])
        else:
            theirs = {key(d): d for d in yaml.safe_load_all(r.stdout) if d}
            ours = {key(d): d for d in docs}
            diff = sorted(str(k) for k in set(theirs) ^ set(ours)) + sorted(str(k) for k in set(theirs) & set(ours)
                                                                            if theirs[k] != ours[k])
            R.check("kubectl kustomize renders the same documents as the test's loader", not diff, "differ: " + "; ".join(diff))
    else:
        R.skip("kubectl kustomize renders the same documents as the test's loader", "kubectl not installed")

    try:
        import kubernetes_validate  # noqa: PLC0415
        from importlib.metadata import version  # noqa: PLC0415
    except ImportError:
        R.fail("Kubernetes API schemas", "kubernetes-validate is not installed: .venv/bin/pip install -r tests/py/requirements.txt "
               "(scripts/test.sh does), and run this with .venv/bin/python")
        validate = None
    else:
        newest = kubernetes_validate.latest_version()
        versions = [OLDEST_K8S, ".".join(newest.split(".")[:2])]
        for v in versions:
            problems = schema_problems(docs, v)
            R.check(f"every document validates against the Kubernetes {v} API schemas, strict (kubernetes-validate "
                    f"{version('kubernetes-validate')})", not problems, "; ".join(problems[:8]), f"{len(docs)} documents")

        def validate(ds):
            return schema_problems(ds, OLDEST_K8S)

    results = run_checks(docs, CROSS_CHECKS)
    for name, problems in results.items():
        R.check(name, not problems, "; ".join(problems[:10]))
    problems = operator_secret_problems()
    R.check("the Secrets the operator makes (mcpd-ca: ca.pem, ca.key, data.key; mcpd-admin-token) are documented "
            "in deploy/README.md, Kubernetes", not problems, "; ".join(problems))

    if validate is None:
        validate = lambda _ds: ["no validator"]  # noqa: E731
    slipped = mutation_results(docs, validate)
    R.check(f"the checks fail on broken manifests ({len(MUTATIONS)} breakages, each caught)", not slipped,
            "not caught: " + "; ".join(slipped))

    for fn in (check_syntax, check_start_sh, check_install_tls, check_members_sh, check_mcpd):
        try:
            fn(docs)
        except Exception as e:  # noqa: BLE001
            R.fail(fn.__name__, f"{type(e).__name__}: {e}")
    print(f"kubernetes_test: {R.passed} passed, {R.failed} failed" + (f", {R.skipped} skipped" if R.skipped else ""))
    R.exit()


if __name__ == "__main__":
    main()
