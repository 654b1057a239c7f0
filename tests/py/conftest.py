"""Fixtures of the end-to-end tests of the data plane: real `mcpd` clusters started with
`mcpctl dev up`, real MCP servers registered on them, torn down with `mcpctl dev down` whatever
happens. When a test fails, the tail of every running node's log is attached to its report.

Binaries: `target/debug/{mcpctl,mcpd}` (built by scripts/test.sh), or `MCPCTL_BIN` / `MCPD_BIN`.

TLS: every cluster of the session is a cluster of one CA, made once per session with
`mcpctl cluster ca create` (as an organisation has one), and every client trusts it the way an
operator's machine would: `SSL_CERT_FILE` for Python (httpx2), `NODE_EXTRA_CA_CERTS` for
Node (the conformance suite), `MCPCTL_CACERT` for mcpctl and `MCP_BRIDGE_CACERT` for the bridge.
Servers: `.venv/bin/mcp-server-time`; server-everything and server-filesystem from `.tools/npm`
run by the Node 22 there (scripts/test.sh installs both).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from helpers import stateless_tool_names, wait_until

ROOT = Path(__file__).resolve().parents[2]
MCPCTL = Path(os.environ.get("MCPCTL_BIN") or ROOT / "target/debug/mcpctl")
MCPD = Path(os.environ.get("MCPD_BIN") or ROOT / "target/debug/mcpd")
VENV_BIN = ROOT / ".venv/bin"
NPM = ROOT / ".tools/npm/node_modules"
NODE22 = NPM / ".bin/node"

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Clusters running now, whose node logs a failing test's report gets.
_LIVE: list[Cluster] = []

# The session's CA: made in pytest_configure, removed in pytest_unconfigure.
CA_DIR = Path(tempfile.mkdtemp(prefix="mcpcp-py-ca-"))
CA_CERT = CA_DIR / "ca.pem"


def pytest_configure(config):
    if not MCPCTL.exists():
        return  # start_cluster says what is missing
    subprocess.run(
        [str(MCPCTL), "cluster", "ca", "create", "--dir", str(CA_DIR), "--cluster-id", "pytest"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    os.environ["SSL_CERT_FILE"] = str(CA_CERT)
    os.environ["NODE_EXTRA_CA_CERTS"] = str(CA_CERT)


def pytest_unconfigure(config):
    shutil.rmtree(CA_DIR, ignore_errors=True)


def _need(path: Path, how: str) -> None:
    if not path.exists():
        pytest.exit(f"{path} is missing: {how}", returncode=2)


def exited(pid: int) -> bool:
    """Whether process `pid` is gone or a zombie (its ports and files are free)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def unused_addr() -> str:
    """A loopback address no process listens on, below the kernel's ephemeral range (as
    `mcpctl dev up` picks them), for a node whose address must be known before it starts."""
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(10_000, max(low, 10_001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return f"127.0.0.1:{port}"
    raise RuntimeError("no free port below the ephemeral range")


class Cluster:
    """A dev cluster: its directory, endpoints, tokens, and `mcpctl` against it."""

    def __init__(self, name: str, dir: Path, nodes: int, mcpd_args: list[str]):
        self.name = name
        self.dir = dir
        self.nodes = nodes
        self.mcpd_args = mcpd_args
        self.endpoints: list[str] = []
        self.admin_token = ""
        self.token = ""  # a token of tenant `default`
        # The node id of each index (a restored cluster's ids are new: 4, 5, 6).
        self.ids = list(range(1, nodes + 1))
        # The mcpd binary nodes start from (a rolling upgrade changes it between restarts).
        self.mcpd = MCPD

    # -- life cycle ---------------------------------------------------------------------------

    def up(self) -> None:
        args = [str(MCPCTL), "dev", "up", "--nodes", str(self.nodes), "--dir", str(self.dir)]
        args += ["--mcpd", str(self.mcpd), "--ca-dir", str(CA_DIR)] + [f"--mcpd-arg={a}" for a in self.mcpd_args]
        _LIVE.append(self)
        r = subprocess.run(args, capture_output=True, text=True, timeout=180, env=self._env())
        if r.returncode != 0:
            raise RuntimeError(f"mcpctl dev up failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{self.log_tail()}")
        env = {}
        for line in (self.dir / "env").read_text().splitlines():
            if line.startswith("export "):
                k, v = line[len("export ") :].split("=", 1)
                env[k] = v.strip("'")
        self.endpoints = env["MCPCTL_ENDPOINTS"].split(",")
        self.admin_token = env["MCPCTL_TOKEN"]
        self.token = env["MCP_BRIDGE_TOKEN"]
        assert len(self.endpoints) == self.nodes

    def down(self) -> None:
        try:
            subprocess.run(
                [str(MCPCTL), "dev", "down", "--dir", str(self.dir)],
                capture_output=True,
                text=True,
                timeout=60,
                env=self._env(),
            )
        finally:
            if self in _LIVE:
                _LIVE.remove(self)

    def pid(self, node: int) -> int:
        """The pid of node `node` (0-based)."""
        return int((self.node_dir(node) / "mcpd.pid").read_text())

    def node_dir(self, node: int) -> Path:
        """Where node `node` (0-based) keeps its data (`data/`), log and pid file."""
        return self.dir / f"node{self.ids[node]}"

    def kill(self, node: int) -> None:
        """SIGKILL of node `node`: no goodbye to its peers or clients. Returns once it is dead
        (gone or a zombie), so that its ports are free for a restart."""
        pid = self.pid(node)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: exited(pid), 10, f"node {node} (pid {pid}) dies after SIGKILL", interval=0.01)

    def stop(self, node: int, within: float = 30) -> None:
        """SIGTERM to node `node`: a graceful stop, as `systemctl stop` does; returns once it
        has exited."""
        pid = self.pid(node)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: exited(pid), within, f"node {node} (pid {pid}) exits after SIGTERM")

    def restart(self, node: int, at: tuple[str, str] | None = None) -> None:
        """Starts a killed node again with its data, addresses and the cluster's mcpd flags (as
        `dev up` did), or at `at` (HTTP and gRPC address) for a first start, and returns once
        it listens. While it
        was down another connection may have taken one of its ports as its source port: the
        start is tried again until that connection is gone (30 s at most)."""
        nd = self.node_dir(node)
        if at is None:
            ep = json.loads((nd / "data" / "endpoints.json").read_text())
        else:
            ep = {"http_addr": at[0], "grpc_addr": at[1]}
        port = ep["http_addr"].rsplit(":", 1)[1]
        deadline = time.monotonic() + 30
        while True:
            logged = (nd / "mcpd.log").stat().st_size if (nd / "mcpd.log").exists() else 0
            with open(nd / "mcpd.log", "ab") as log:
                p = subprocess.Popen(
                    [str(self.mcpd), "--id", str(self.ids[node]), "--data-dir", str(nd / "data"),
                     "--http-addr", ep["http_addr"], "--grpc-addr", ep["grpc_addr"], *self.mcpd_args],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                )
            (nd / "mcpd.pid").write_text(f"{p.pid}\n")
            while p.poll() is None and time.monotonic() < deadline:
                # The node writes its endpoints, with its pid, once it listens on both.
                try:
                    if json.loads((nd / "data" / "endpoints.json").read_text()).get("pid") == p.pid:
                        return
                except (OSError, ValueError):
                    pass
                time.sleep(0.05)
            with open(nd / "mcpd.log", "rb") as log:
                log.seek(logged)
                said = log.read().decode(errors="replace")
            if p.poll() is None or "Address already in use" not in said or time.monotonic() > deadline:
                holders = subprocess.run(["ss", "-tanp", f"( sport = :{port} )"], capture_output=True,
                                         text=True).stdout
                raise AssertionError(f"node {node} did not come back on {ep['http_addr']}: {said[-2000:]}\n"
                                     f"sockets on port {port}:\n{holders}")
            time.sleep(0.2)

    def call_log(self, node: int) -> list[dict]:
        """Node `node`'s call log (`<data_dir>/audit/calls.jsonl`), one dict per call."""
        path = self.node_dir(node) / "data" / "audit" / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def leader(self, node: int = 0) -> int | None:
        """The leader's index (0-based) as node `node` sees it."""
        status = json.loads(self.mcpctl("cluster", "status", "-o", "json", node=node))
        return None if status["leader"] is None else self.ids.index(status["leader"])

    # -- addresses ----------------------------------------------------------------------------

    def base(self, node: int = 0) -> str:
        return self.endpoints[node]

    def url(self, node: int = 0, server: str | None = None) -> str:
        """`/mcp` of a node, or `/servers/{server}/mcp`."""
        return f"{self.base(node)}/mcp" if server is None else f"{self.base(node)}/servers/{server}/mcp"

    # -- admin ----------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCPCTL_")}
        env["MCPCTL_CACERT"] = str(CA_CERT)
        if self.endpoints:
            env["MCPCTL_ENDPOINTS"] = ",".join(self.endpoints)
            env["MCPCTL_TOKEN"] = self.admin_token
        return env

    def mcpctl(self, *args: str, node: int | None = None) -> str:
        """Runs `mcpctl ARGS` against the cluster (only `node`'s endpoint when given)."""
        r = self.mcpctl_result(*args, node=node)
        assert r.returncode == 0, f"mcpctl {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}"
        return r.stdout

    def mcpctl_result(self, *args: str, node: int | None = None) -> subprocess.CompletedProcess:
        """Runs `mcpctl ARGS`, whatever its exit code."""
        argv = [str(MCPCTL), *args]
        if node is not None:
            argv[2:2] = ["--endpoints", self.base(node)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=self._env())

    def add_server(
        self,
        name: str,
        command: list[str | Path],
        *,
        pool_size: int | None = None,
        tenant: str | None = None,
        env: dict[str, str] | None = None,
        node: int | None = None,
    ) -> None:
        args = ["server", "add", name]
        if pool_size is not None:
            args += ["--pool-size", str(pool_size)]
        if tenant is not None:
            args += ["--tenant", tenant]
        for k, v in (env or {}).items():
            args += ["--env", f"{k}={v}"]
        self.mcpctl(*args, "--", *map(str, command), node=node)

    def put_server(self, spec: dict) -> None:
        """Adds a server from its whole spec (`POST /v1/servers`): for what `server add` has no
        flag for (replicas, timeouts)."""
        r = httpx2.post(f"{self.base(0)}/v1/servers", json=spec,
                        headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30)
        assert r.status_code in (200, 201), r.text

    def node_with(self, server: str, state: str, within: float = 60) -> int:
        """Waits until a replica of `server` has a process in `state` (`ready`, `starting`,
        ...), as `server status` shows it; that replica's node (0-based)."""
        def replica() -> int | None:
            status = json.loads(self.mcpctl("server", "status", server, "-o", "json"))
            return next((r["node"] for r in status["replicas"] if state in r["processes"]), None)

        return self.ids.index(wait_until(replica, within, f"a process of {server} {state}"))

    def wait_tools(self, server: str, tools: list[str], *, token: str | None = None, timeout: float = 90) -> None:
        """Waits until every node lists `tools` on `/servers/{server}/mcp` and, prefixed, on
        `/mcp` (the aggregate answers from the catalogue, which loads after the process)."""
        token = token or self.token
        for node in range(self.nodes):
            for url, names in (
                (self.url(node, server), tools),
                (self.url(node), [f"{server}__{t}" for t in tools]),
            ):
                wait_until(
                    lambda: set(names) <= set(stateless_tool_names(url, token)),
                    timeout,
                    f"{names} listed on {url}",
                )

    # -- observation ----------------------------------------------------------------------

    def log(self, node: int = 0) -> str:
        """Node `node`'s log (mcpd and its servers' stderr), without colours."""
        path = self.node_dir(node) / "mcpd.log"
        return ANSI.sub("", path.read_text(errors="replace")) if path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        out = []
        for node in range(self.nodes):
            tail = self.log(node).splitlines()[-lines:]
            out.append(f"--- {self.name} node{self.ids[node]}/mcpd.log (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    def metrics(self, node: int = 0) -> str:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        return httpx2.get(f"{self.base(node)}/metrics", headers=headers, timeout=10).text

    def metric(self, name: str, labels: str, node: int = 0) -> float | None:
        """The value of `name{labels}` on `node`'s /metrics (labels as printed, e.g.
        `server="demo"`; empty for a series without labels), or None when absent."""
        series = f"{name}{{{labels}}} " if labels else f"{name} "
        for line in self.metrics(node).splitlines():
            if line.startswith(series):
                return float(line.rsplit(" ", 1)[1])
        return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for c in list(_LIVE):
            report.sections.append((f"node logs of cluster {c.name}", c.log_tail()))


def start_cluster(tmp_path_factory, name: str, nodes: int, mcpd_args: list[str] | None = None) -> Cluster:
    _need(MCPCTL, "build the workspace first (cargo build), or set MCPCTL_BIN")
    _need(MCPD, "build the workspace first (cargo build), or set MCPD_BIN")
    c = Cluster(name, tmp_path_factory.mktemp(name), nodes, mcpd_args or [])
    try:
        c.up()
    except BaseException:
        c.down()
        raise
    return c


def mcpd_config(tmp_path_factory, name: str, toml: str) -> str:
    """The `mcpd` flag that gives a cluster's nodes `toml` as their configuration (a file of
    its own in the run's temporary directory)."""
    path = tmp_path_factory.mktemp(f"{name}-config") / "mcpd.toml"
    path.write_text(toml)
    return f"--config={path}"


@contextlib.contextmanager
def own_cluster(tmp_path_factory, name: str, nodes: int, mcpd_args: list[str] | None = None) -> Iterator[Cluster]:
    """A cluster of a module's or a test's own, brought down when it ends, failed or not."""
    c = start_cluster(tmp_path_factory, name, nodes, mcpd_args)
    try:
        yield c
    finally:
        c.down()


def everything_on_one_node(c: Cluster) -> int:
    """Adds server-everything (over stdio, from `.tools/npm`) with one replica and one process
    (it keeps subscriptions per process, so a subscribe and the calls after it reach the same
    one); returns the index of the node it was placed on, once it lists its tools."""
    c.mcpctl("server", "add", "everything", "--replicas", "1", "--pool-size", "1", "--",
             str(NODE22), str(NPM / "@modelcontextprotocol/server-everything/dist/index.js"), "stdio")
    status = wait_until(
        lambda: (s := json.loads(c.mcpctl("server", "status", "everything", "-o", "json")))["placement"] and s,
        60, "a placement for server-everything")
    c.wait_tools("everything", ["toggle-subscriber-updates"])
    return status["placement"][0] - 1


def own_server_as_remote(cluster: Cluster, name: str, server: str, tool: str):
    """Registers node 1's `/servers/{server}/mcp` as the remote server `name`: a 2026-07-28
    upstream over HTTPS (the node's stateless front end, the stdio server behind it), reached
    with the cluster's token; removed at the end."""
    var = f"REMOTE_TOKEN_{uuid.uuid4().hex}"
    os.environ[var] = cluster.token
    try:
        cluster.mcpctl("server", "add", name, "--url", cluster.url(0, server), "--ca-file", str(CA_CERT),
                       "--bearer-env", var, "--pool-size", "1")
    finally:
        del os.environ[var]
    try:
        cluster.wait_tools(name, [tool])
        yield name
    finally:
        cluster.mcpctl("server", "rm", name)


# Servers of the main cluster: name -> tools that must be listed before tests start.
EVERYTHING_TOOLS = ["echo", "get-sum", "trigger-long-running-operation", "toggle-subscriber-updates",
                    "trigger-sampling-request", "trigger-elicitation-request"]
TIME_TOOLS = ["get_current_time", "convert_time"]
FILES_TOOLS = ["read_text_file", "list_directory", "list_allowed_directories"]
GIT_TOOLS = ["git_log", "git_status"]
DEMO_TOOLS = ["echo", "sleep", "crash"]


@pytest.fixture(scope="session")
def files_dir(tmp_path_factory) -> Path:
    """The directory server-filesystem serves, with one file of known content."""
    d = tmp_path_factory.mktemp("files")
    (d / "known.txt").write_text(f"known content {uuid.uuid4().hex}\n")
    return d


@pytest.fixture(scope="session")
def git_repo(tmp_path_factory) -> Path:
    """A scratch git repository (in a temp dir) with one commit, for mcp-server-git."""
    d = tmp_path_factory.mktemp("repo")
    (d / "a.txt").write_text("a\n")
    git = ["git", "-C", str(d), "-c", "user.name=tests", "-c", "user.email=tests@example.com"]
    for args in (["init", "-q"], ["add", "a.txt"], ["commit", "-qm", "the known commit"]):
        subprocess.run(git + args, check=True, capture_output=True, timeout=30)
    return d


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, files_dir, git_repo) -> Cluster:
    """A 3-node cluster with tenant `default` and these servers (global):

    - `demo` (mcpctl dev up's, pool of 2), `pool2` (demo, explicitly 2 processes per node),
      `crashy` (demo, 1 process), `demodbg` (demo, 1 process, debug logs: its stderr, in the
      node's log, shows the cancellations it receives);
    - `time`: mcp-server-time; `everything`: server-everything over stdio (1 process per node,
      so the per-process state its subscription tool keeps is the one the test talks to);
      `files`: server-filesystem on `files_dir`; `git`: mcp-server-git on `git_repo`.
    """
    _need(VENV_BIN / "mcp-server-time", "run scripts/test.sh (it installs .venv)")
    _need(NODE22, "run scripts/test.sh (it installs .tools/npm)")
    c = start_cluster(tmp_path_factory, "main", 3)
    try:
        c.add_server("time", [VENV_BIN / "mcp-server-time", "--local-timezone", "UTC"])
        c.add_server(
            "everything",
            [NODE22, NPM / "@modelcontextprotocol/server-everything/dist/index.js", "stdio"],
            pool_size=1,
        )
        c.add_server("files", [NODE22, NPM / "@modelcontextprotocol/server-filesystem/dist/index.js", files_dir])
        c.add_server("git", [VENV_BIN / "mcp-server-git", "--repository", git_repo])
        c.add_server("pool2", [MCPD, "demo-server"], pool_size=2)
        c.add_server("crashy", [MCPD, "demo-server"], pool_size=1)
        c.add_server("demodbg", [MCPD, "demo-server"], pool_size=1, env={"RUST_LOG": "info,mcpd::demo=debug"})
        for server, tools in [
            ("demo", DEMO_TOOLS),
            ("time", TIME_TOOLS),
            ("everything", EVERYTHING_TOOLS),
            ("files", FILES_TOOLS),
            ("git", GIT_TOOLS),
            ("pool2", DEMO_TOOLS),
            ("crashy", DEMO_TOOLS),
            ("demodbg", DEMO_TOOLS),
        ]:
            c.wait_tools(server, tools)
        yield c
    finally:
        c.down()
