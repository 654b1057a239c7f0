#!/usr/bin/env python3
"""deploy/systemd/mcpd.toml.example against the mcpd it configures.

- Its keys are exactly those of mcpd's `Config` (the `pub struct XxxConfig`s in node/src), set
  (to their defaults, or to values for the deployment the example describes) or, for keys
  without a default, shown commented out; the TLS and connection-limit
  keys each have a comment; `tls_names` names keepalived's VIP and the name HAProxy verifies.
- mcpd starts with it (the cluster CA and data key installed in its TLS directory as
  deploy/README.md says) and stops cleanly on SIGTERM, in each HTTPS mode: `cluster` (HTTPS
  verified with the cluster CA, the certificate names `tls_names`, /readyz reports the mode,
  /metrics needs a token, no plain HTTP), `off` (plain HTTP and a warning at start) and
  `files` (the operator's certificate, reloaded when its files are replaced). Its data
  directory stays 0700 and its files 0600, and the installed keys are left as they were.
- Without data.key in its TLS directory mcpd does not start, and says which file it lacks.
"""

import glob
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import tomllib

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    CLUSTER_FILES, DEPLOY, ROOT, Results, binary, http, install_ca, loose_modes, make_ca, openssl_cert,
    toml_keys, wait_until,
)

R = Results()


def config_structs():
    """Every `pub struct XxxConfig { pub field: Type, ... }` in node/src: name -> [(field, type)],
    without the fields serde skips."""
    out = {}
    for path in glob.glob(os.path.join(ROOT, "node", "src", "**", "*.rs"), recursive=True):
        with open(path) as f:
            text = f.read()
        for m in re.finditer(r"pub struct (\w*Config) \{(.*?)\n\}", text, flags=re.S):
            # A field under #[serde(skip)] is set at start, not read from the file.
            body = re.sub(r"#\[serde\(skip\)\]\s*pub \w+:", "", m.group(2))
            out[m.group(1)] = re.findall(r"^\s*pub (\w+): ([\w:<>]+)", body, flags=re.M)
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


# Keys of the TLS work (issue 16) the example must show and explain, each under a comment.
TLS_KEYS = ("api.tls", "api.tls_names", "api.tls_cert_file", "api.tls_key_file", "tls.dir",
            "tls.node_cert_ttl_hours", "api.header_read_timeout_ms", "api.max_connections")


def example_lines(text):
    """Every key line of a TOML example, set or shown commented out (`# key = value`, for keys
    without a default): dotted key -> (line index, commented)."""
    out, table = {}, ""
    for i, line in enumerate(text.splitlines()):
        m = re.match(r"^\[([a-z_.]+)\]\s*(#.*)?$", line)
        if m:
            table = m.group(1) + "."
            continue
        m = re.match(r"^(# ?)?([a-z][a-z0-9_]*) = (.+)$", line)
        if not m:
            continue
        try:
            tomllib.loads(f"{m.group(2)} = {m.group(3)}")
        except tomllib.TOMLDecodeError:
            continue  # prose in a comment that happens to contain " = "
        out[table + m.group(2)] = (i, bool(m.group(1)))
    return out


class Mcpd:
    """One mcpd started with a config file, stopped with SIGTERM."""

    def __init__(self, d, text):
        self.d, self.data = d, os.path.join(d, "data")
        self.conf, self.log = os.path.join(d, "mcpd.toml"), os.path.join(d, "log")
        with open(self.conf, "w") as f:
            f.write(text)
        self.logf = open(self.log, "w")
        self.p = subprocess.Popen([binary("mcpd"), "--config", self.conf], stdout=self.logf, stderr=self.logf,
                                  stdin=subprocess.DEVNULL)

    def listening(self, deadline_s=20):
        """The node's endpoints.json once it has written it; raises if it exits or the deadline passes."""
        path = os.path.join(self.data, "endpoints.json")

        def written():
            if self.p.poll() is not None:
                raise RuntimeError(f"exited {self.p.returncode}")
            with open(path) as f:
                return json.load(f)

        try:
            return wait_until("mcpd writes endpoints.json", written, deadline_s, every=0.1)
        except (TimeoutError, RuntimeError) as e:
            raise RuntimeError(f"{e}: {self.tail()}") from None

    def stop(self):
        """SIGTERM; the exit status."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                return self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
                return "killed after 15s"
        return self.p.returncode

    def tail(self):
        """The end of the node's log, or its error (without a backtrace) when it failed."""
        self.logf.flush()
        text = open(self.log, errors="replace").read()
        if "Error:" in text:
            return text[text.index("Error:"):].split("Stack backtrace:")[0].strip()[:600]
        return text.split("stack backtrace:")[0][-600:]


def example_for(text, d, tls_dir=None, api=None):
    """The example config with its paths in d, its addresses on loopback port 0, and `api`
    keys replaced (a dict of key -> TOML value text, None to comment the key out)."""
    data = os.path.join(d, "data")
    text = text.replace('"/var/lib/mcpd/tls"', json.dumps(tls_dir or os.path.join(data, "tls")))
    text = text.replace('"/var/lib/mcpd"', json.dumps(data))
    text = re.sub(r'^(http_addr|grpc_addr) = "[^"]*"', r'\1 = "127.0.0.1:0"', text, flags=re.M)
    for key, value in (api or {}).items():
        pattern = rf"^(# ?)?{key} = .*$"
        repl = f"{key} = {value}" if value is not None else f"# {key} = \"\""
        text, n = re.subn(pattern, lambda _m: repl, text, count=1, flags=re.M)
        if n != 1:
            raise RuntimeError(f"mcpd.toml.example: no line for {key}")
    return text


def served_cert(addr):
    host, port = addr.rsplit(":", 1)
    return ssl.get_server_certificate((host, int(port)), timeout=5)


def peer_sans(addr, ca):
    """The subjectAltNames of the certificate served at addr, verified against ca."""
    import socket

    host, port = addr.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            return {v for _, v in s.getpeercert().get("subjectAltName", ())}




def toml_example():
    path = os.path.join(DEPLOY, "systemd", "mcpd.toml.example")
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    shown = example_lines(text)
    structs = config_structs()
    problems = []
    if "Config" not in structs:
        problems.append("no pub struct Config in node/src")
    else:
        want, have = config_keys(structs, "Config"), toml_keys(cfg) | set(shown)
        problems += [f"missing {k}" for k in sorted(want - have)] + [f"unknown {k}" for k in sorted(have - want)]
    R.check("mcpd.toml.example has every key of mcpd's Config (node/src) and no other", not problems,
            "; ".join(problems), f"{len(toml_keys(cfg))} keys set, {sum(c for _, c in shown.values())} shown commented out")

    problems = []
    for key in TLS_KEYS:
        if key not in shown:
            problems.append(f"no {key}")
            continue
        i, _ = shown[key]
        if not (i > 0 and lines[i - 1].startswith("#")) and " # " not in lines[i]:
            problems.append(f"{key} has no comment above it")
    api, tls = cfg.get("api", {}), cfg.get("tls", {})
    if api.get("tls") not in ("cluster", "files", "off"):
        problems.append(f"api.tls = {api.get('tls')!r}: one of cluster, files, off")
    names = api.get("tls_names", [])
    for mode in ("cluster", "files", "off"):
        if f'"{mode}"' not in text:
            problems.append(f"the tls mode {mode!r} is not explained")
    with open(os.path.join(DEPLOY, "keepalived", "keepalived.conf")) as f:
        vip = re.search(r"^\$VIP=([^/\s]+)", f.read(), flags=re.M)
    if vip and vip.group(1) not in names:
        problems.append(f"api.tls_names {names} lacks keepalived's VIP {vip.group(1)}")
    with open(os.path.join(DEPLOY, "haproxy", "haproxy.cfg")) as f:
        lb = re.search(r"^\s*default-server .*\bverifyhost (\S+)", f.read(), flags=re.M)
    if lb and lb.group(1) not in names:
        problems.append(f"api.tls_names {names} lacks the name HAProxy verifies ({lb.group(1)})")
    if "dir" in tls and not str(tls["dir"]).startswith(cfg.get("data_dir", "/var/lib/mcpd")):
        problems.append(f"tls.dir {tls['dir']} is outside data_dir: the unit's StateDirectory does not cover it")
    R.check("mcpd.toml.example documents the TLS and connection-limit keys; tls_names has the VIP and the LB name",
            not problems, "; ".join(problems), ", ".join(TLS_KEYS))

    for b in ("mcpd", "mcpctl"):
        if not os.access(binary(b), os.X_OK):
            R.skip("mcpd starts with mcpd.toml.example", f"{binary(b)} not built")
            return
    with tempfile.TemporaryDirectory() as d:
        pki = os.path.join(d, "pki")
        try:
            make_ca(pki, "deploy-check")
        except RuntimeError as e:
            R.fail("mcpd starts with mcpd.toml.example", f"no cluster CA to start it with: {e}")
            return
        example_cluster_mode(text, os.path.join(d, "cluster"), pki, names)
        example_without_data_key(text, os.path.join(d, "nokey"), pki)
        example_off_mode(text, os.path.join(d, "off"), pki)
        example_files_mode(text, os.path.join(d, "files"), pki)


def example_cluster_mode(text, d, pki, names):
    """The example as it is: tls = "cluster", the CA installed as the README says."""
    start = "mcpd starts with mcpd.toml.example and stops cleanly on SIGTERM"
    https = "example config: HTTPS with the cluster CA, /readyz says tls=cluster, the certificate names tls_names, /metrics needs a token, no plain HTTP"
    perms = "mcpd keeps its data dir 0700 and its files 0600 (TLS directory and keys included; certificates may be 0644)"
    ca = os.path.join(pki, "ca.pem")
    install_ca(pki, os.path.join(d, "data", "tls"))
    node = Mcpd(d, example_for(text, d))
    problems, ep = [], None
    try:
        ep = node.listening()
    except RuntimeError as e:
        problems.append(str(e))
    if ep:
        addr = ep["http_addr"]
        ctx = ssl.create_default_context(cafile=ca)
        try:
            st, _, _ = http("GET", f"https://{addr}/livez", context=ctx, timeout=5)
            if st != 200:
                problems.append(f"/livez {st}")
            st, _, body = http("GET", f"https://{addr}/readyz", context=ctx, timeout=5)
            mode = json.loads(body or b"{}").get("tls")
            if mode != "cluster":
                problems.append(f"/readyz ({st}) says tls={mode!r}: {body[:200]!r}")
            st, _, _ = http("GET", f"https://{addr}/metrics", context=ctx, timeout=5)
            if st != 401:
                problems.append(f"/metrics without a token: {st}, not 401")
            sans = peer_sans(addr, ca)
            lacking = [n for n in names + ["127.0.0.1", "localhost", "10.0.0.1"] if n not in sans]
            if lacking:
                problems.append(f"the certificate lacks {lacking} (has {sorted(sans)})")
        except (OSError, ValueError) as e:
            problems.append(f"HTTPS with the cluster CA: {e}")
        try:
            st, _, _ = http("GET", f"http://{addr}/livez", timeout=5)
            if st == 200:
                problems.append("plain http:// answers 200")
        except Exception:  # noqa: BLE001 - refused, reset or garbled: no plain HTTP, as wanted
            pass
    rc = node.stop()
    R.check(https, ep and not problems, "; ".join(problems)[-900:])
    R.check(start, ep is not None and rc == 0, f"exit status {rc} after SIGTERM: {node.tail()}" if ep else "; ".join(problems)[-900:])
    if ep:
        bad = loose_modes(node.data)
        tls_dir = os.path.join(node.data, "tls")
        tls_files = os.listdir(tls_dir)
        if not {"node.pem", "node.key"} <= set(tls_files):
            bad.append(f"no node.pem/node.key in the TLS directory (it has {sorted(tls_files)})")
        for f in CLUSTER_FILES:
            with open(os.path.join(pki, f), "rb") as a:
                installed = a.read()
            path = os.path.join(tls_dir, f)
            if not os.path.exists(path) or open(path, "rb").read() != installed:
                bad.append(f"tls/{f} is not the installed one any more")
        R.check(perms, not bad, "; ".join(bad[:8]))
    else:
        R.skip(perms, "mcpd did not start")


def example_without_data_key(text, d, pki):
    """The CA installed but not data.key: the node must refuse to start, naming the file."""
    name = "mcpd refuses to start without data.key in its TLS directory, and names it"
    install_ca(pki, os.path.join(d, "data", "tls"))
    os.remove(os.path.join(d, "data", "tls", "data.key"))
    node = Mcpd(d, example_for(text, d))
    problems = []
    try:
        wait_until("mcpd exits", lambda: node.p.poll() is not None, 20, every=0.1)
    except TimeoutError:
        problems.append("it is still running after 20s")
    rc = node.stop()
    if rc == 0:
        problems.append("exit status 0")
    if os.path.exists(os.path.join(d, "data", "endpoints.json")):
        problems.append("it listened (wrote endpoints.json)")
    tail = node.tail()
    if "data.key" not in tail:
        problems.append(f"its error does not name data.key: {tail[-300:]}")
    R.check(name, not problems, "; ".join(problems), f"exit {rc}: {tail.splitlines()[0][:120] if tail else ''}")


def example_off_mode(text, d, pki):
    name = 'example config with tls = "off": plain HTTP, /readyz says tls=off, a warning at start'
    install_ca(pki, os.path.join(d, "data", "tls"))  # gRPC between nodes stays mutual TLS
    node = Mcpd(d, example_for(text, d, api={"tls": '"off"'}))
    problems = []
    try:
        addr = node.listening()["http_addr"]
        st, _, body = http("GET", f"http://{addr}/readyz", timeout=5)
        mode = json.loads(body or b"{}").get("tls")
        if mode != "off":
            problems.append(f"/readyz ({st}) says tls={mode!r}")
    except (RuntimeError, OSError, ValueError) as e:
        problems.append(str(e))
    node.stop()
    log_text = open(node.log, errors="replace").read()
    if not any(re.search(r"\bWARN", line) and re.search(r"tls|TLS|plain|unencrypted", line) for line in log_text.splitlines()):
        problems.append(f"no warning about TLS being off in the log: {log_text[-400:]}")
    R.check(name, not problems, "; ".join(problems)[-900:])


def example_files_mode(text, d, pki):
    name = 'example config with tls = "files": serves the operator\'s certificate, /readyz says tls=files, reloads it when the files change'
    if not shutil.which("openssl"):
        R.skip(name, "openssl not installed (makes the operator's certificate)")
        return
    own = os.path.join(d, "own")
    os.makedirs(own)
    crt, key = openssl_cert(own, "server", "IP:127.0.0.1,DNS:localhost", cn="first")
    install_ca(pki, os.path.join(d, "data", "tls"))
    node = Mcpd(d, example_for(text, d, api={"tls": '"files"', "tls_cert_file": json.dumps(crt),
                                              "tls_key_file": json.dumps(key)}))
    problems = []
    try:
        addr = node.listening()["http_addr"]
        st, _, body = http("GET", f"https://{addr}/readyz", context=ssl.create_default_context(cafile=crt), timeout=5)
        mode = json.loads(body or b"{}").get("tls")
        if mode != "files":
            problems.append(f"/readyz ({st}) says tls={mode!r}")
        # A renewed certificate: written beside, then renamed over the old files (as certbot's
        # deploy hooks and cert-manager do); the node must serve it without a restart.
        new = os.path.join(d, "new")
        os.makedirs(new)
        ncrt, nkey = openssl_cert(new, "server", "IP:127.0.0.1,DNS:localhost", cn="second")
        os.replace(nkey, key)
        os.replace(ncrt, crt)
        want = ssl.PEM_cert_to_DER_cert(open(crt).read())
        wait_until("the node serves the replaced certificate",
                   lambda: ssl.PEM_cert_to_DER_cert(served_cert(addr)) == want, 30, every=0.5)
    except (RuntimeError, OSError, ValueError, TimeoutError, subprocess.CalledProcessError) as e:
        problems.append(str(e))
    rc = node.stop()
    if rc != 0:
        problems.append(f"exit status {rc} after SIGTERM")
    R.check(name, not problems, "; ".join(problems)[-900:])


def main():
    try:
        toml_example()
    except Exception as e:  # noqa: BLE001
        R.fail("toml_example", f"{type(e).__name__}: {e}")
    R.exit()


if __name__ == "__main__":
    main()
