"""Sandboxed server processes: a server runs as another user, with limits on its memory, CPU
time, processes and open files, and a process that hits a limit is a clear event; a server
can be kept off the network, off the filesystem but for chosen paths, and away from the
node's own secrets.

Each test needs what the node reports it can do (`GET /v1/node`: `sandbox`), and skips,
saying why, where the machine lacks it."""

from __future__ import annotations

import functools
import json
import pwd
import re
import shutil
import subprocess
import tempfile
import sysconfig
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx2
import pytest

from conftest import MCPD, ROOT, VENV_BIN, start_cluster
from helpers import stateless_post, wait_until

HOG = ROOT / "tests/py/servers/hog.py"
SECRET = "s3cret-of-the-victim"
NOBODY = "nobody"


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory):
    """A one-node cluster with `victim` (the demo server, running as mcpd's user with a secret
    in its environment)."""
    c = start_cluster(tmp_path_factory, "sandbox", 1)
    try:
        c.add_server("victim", [MCPD, "demo-server"], pool_size=1, env={"API_KEY": SECRET})
        c.wait_tools("victim", ["echo"])
        yield c
    finally:
        c.down()


def node_sandbox(c) -> dict:
    r = httpx2.get(f"{c.base(0)}/v1/node", headers={"Authorization": f"Bearer {c.token}"}, timeout=10)
    r.raise_for_status()
    return r.json()["sandbox"]


def node_can(c, what: str) -> bool:
    return bool(node_sandbox(c)[what])


def need_run_as(c) -> None:
    if not node_can(c, "run_as"):
        pytest.skip("mcpd does not run as root (or with CAP_SETUID): it cannot run servers as another user")
    try:
        pwd.getpwnam(NOBODY)
    except KeyError:
        pytest.skip(f"this machine has no user {NOBODY!r}")


def need_namespaces(c) -> None:
    if not node_can(c, "namespaces"):
        pytest.skip("mcpd does not run as root (or with CAP_SYS_ADMIN): it cannot give a server "
                    "namespaces of its own")


@functools.cache
def python_for(user: str) -> tuple[str, dict[str, str]]:
    """An interpreter `user` can run with the `mcp` SDK importable, and the environment it
    needs: the venv's own, or (when the venv's interpreter lives in a home only root can
    read, as pyenv's does) the system's Python of the same version with the venv's packages."""
    site = sysconfig.get_paths(vars={"base": str(ROOT / ".venv"), "platbase": str(ROOT / ".venv")})["purelib"]
    candidates = [(str(VENV_BIN / "python"), {}), ("/usr/bin/python3", {"PYTHONPATH": site})]
    for python, env in candidates:
        probe = subprocess.run(
            ["runuser", "-u", user, "--", "env", *[f"{k}={v}" for k, v in env.items()], python, "-c",
             "import mcp.server.mcpserver"],
            capture_output=True, timeout=60,
        )
        if probe.returncode == 0:
            return python, env
    pytest.skip(f"no Python with the mcp SDK that user {user!r} can run on this machine")


def add_hog(c, name: str, *sandbox: str, user: str = "root") -> None:
    python, env = python_for(user)
    env_flags = [f for k, v in env.items() for f in ("--env", f"{k}={v}")]
    c.mcpctl("server", "add", name, "--pool-size", "1", *sandbox, *env_flags, "--", python, str(HOG))
    c.wait_tools(name, ["whoami", "allocate"])


def call(c, server: str, tool: str, args: dict, timeout: float = 60) -> dict:
    r = stateless_post(c.url(0, server), c.token, "tools/call", {"name": tool, "arguments": args},
                       name=tool, timeout=timeout)
    r.raise_for_status()
    return r.json()


def text(answer: dict) -> str:
    assert "result" in answer, answer
    return answer["result"]["content"][0]["text"]


def process(c, server: str) -> dict:
    status = json.loads(c.mcpctl("server", "status", server, "-o", "json"))
    return status["replicas"][0]["details"][0]


def victim_pid(c) -> int:
    return wait_until(lambda: process(c, "victim").get("pid"), 30, "the victim's process is up")


def test_the_node_reports_what_it_can_enforce(sandboxed):
    caps = node_sandbox(sandboxed)
    assert set(caps) == {"run_as", "rlimits", "cgroup_v2", "namespaces"}, caps
    assert caps["rlimits"] is True
    # `mcpctl cluster status` says it for every node.
    status = json.loads(sandboxed.mcpctl("cluster", "status", "-o", "json"))
    assert status["sandbox"] == {"1": caps}, status
    table = sandboxed.mcpctl("cluster", "status")
    can = ",".join(k for k in ("run_as", "rlimits", "cgroup_v2", "namespaces") if caps[k])
    assert "SANDBOX" in table and can in table, table


def test_a_server_run_as_another_user_cannot_read_another_servers_secrets(sandboxed):
    c = sandboxed
    need_run_as(c)
    pid = victim_pid(c)
    # Run as mcpd's own user (no sandbox), a server reads the victim's environment: the hole.
    add_hog(c, "hog-root")
    assert SECRET in text(call(c, "hog-root", "read_environ", {"pid": pid}))
    # As another user, with no supplementary groups, it cannot.
    add_hog(c, "hog-nobody", "--run-as", NOBODY, user=NOBODY)
    who = text(call(c, "hog-nobody", "whoami", {}))
    uid = pwd.getpwnam(NOBODY).pw_uid
    assert who.startswith(f"uid={uid} gid={pwd.getpwnam(NOBODY).pw_gid} groups=[") and "0" not in who.split("groups=")[1], who
    seen = text(call(c, "hog-nobody", "read_environ", {"pid": pid}))
    assert seen.startswith("denied:") and SECRET not in seen, seen


def test_a_run_as_the_node_cannot_honour_is_a_clear_start_error(sandboxed):
    c = sandboxed
    c.mcpctl("server", "add", "hog-ghost", "--pool-size", "1", "--run-as", "no-such-user-here",
             "--", str(VENV_BIN / "python"), str(HOG))
    error = wait_until(lambda: process(c, "hog-ghost").get("last_error"), 30, "the start fails")
    assert "no-such-user-here" in error and "no such user" in error, error
    c.mcpctl("server", "rm", "hog-ghost")


def test_a_process_that_allocates_without_bound_is_killed_at_its_memory_limit(sandboxed):
    c = sandboxed
    add_hog(c, "hog-mem", "--memory-mb", "128")
    killed_before = c.metric("mcpd_server_processes_killed_total", 'server="hog-mem",limit="memory"') or 0
    answer = call(c, "hog-mem", "allocate", {"mb": 1024, "step_ms": 5})
    # The call in flight gets a clear error at once, not a hang until its timeout.
    assert "error" in answer and "memory limit" in answer["error"]["message"], answer
    exit_ = wait_until(lambda: process(c, "hog-mem").get("last_exit"), 30, "the kill is reported")
    assert re.match(r"killed: memory limit \(resident \d+ MiB > 128 MiB\)", exit_), exit_
    assert (c.metric("mcpd_server_processes_killed_total", 'server="hog-mem",limit="memory"') or 0) == killed_before + 1
    # Its slot starts a new process, which serves again.
    wait_until(lambda: text(call(c, "hog-mem", "whoami", {})).startswith("uid=") or None, 60,
               "the slot serves again")
    # A server within its limit is untouched.
    assert text(call(c, "hog-mem", "allocate", {"mb": 16, "step_ms": 0})) == "allocated 16 MiB"


def test_children_that_allocate_together_are_killed_at_the_servers_memory_limit(sandboxed):
    """Each child stays under the limit (and its per-process backstop); together they pass it:
    the limit is the process group's."""
    c = sandboxed
    add_hog(c, "hog-brood", "--memory-mb", "128")
    answer = call(c, "hog-brood", "allocate_in_children", {"n": 4, "mb": 64, "hold_s": 20})
    assert "error" in answer and "memory limit" in answer["error"]["message"], answer
    exit_ = wait_until(lambda: process(c, "hog-brood").get("last_exit"), 30, "the kill is reported")
    assert re.match(r"killed: memory limit \(resident \d+ MiB > 128 MiB\)", exit_), exit_


def test_a_cpu_spinner_is_stopped_by_the_cpu_limit(sandboxed):
    c = sandboxed
    add_hog(c, "hog-cpu", "--cpu-seconds", "2")
    answer = call(c, "hog-cpu", "spin", {"seconds": 30})
    assert "error" in answer and "CPU limit" in answer["error"]["message"], answer
    exit_ = wait_until(lambda: process(c, "hog-cpu").get("last_exit"), 30, "the kill is reported")
    assert exit_.startswith("killed: CPU limit"), exit_
    assert (c.metric("mcpd_server_processes_killed_total", 'server="hog-cpu",limit="cpu"') or 0) >= 1
    # `server status` says what each process and call run under.
    status = c.mcpctl("server", "status", "hog-cpu")
    assert "limits: each call 30000 ms" in status and "CPU 2 s" in status, status


def test_a_fork_bomb_is_stopped_by_the_process_limit(sandboxed):
    c = sandboxed
    need_run_as(c)
    add_hog(c, "hog-fork", "--run-as", NOBODY, "--processes", "24", user=NOBODY)
    forked = text(call(c, "hog-fork", "fork", {"n": 200}))
    count = int(re.match(r"forked (\d+) \((.*)\)", forked).group(1))
    assert count < 24 and "temporarily unavailable" in forked.lower(), forked
    # The limit needs run_as: the kernel does not count root's processes.
    refused = c.mcpctl_result("server", "add", "hog-fork-root", "--processes", "24", "--",
                              str(VENV_BIN / "python"), str(HOG))
    assert refused.returncode != 0 and "sandbox.processes" in refused.stderr, refused.stderr


def test_open_files_are_limited(sandboxed):
    c = sandboxed
    add_hog(c, "hog-files", "--open-files", "64")
    opened = text(call(c, "hog-files", "open_files", {"n": 1000}))
    count = int(re.match(r"opened (\d+)", opened).group(1))
    assert count < 64 and "Too many open files" in opened, opened


@pytest.fixture
def shared_dir():
    """A directory the sandbox's user can reach (pytest's own are root's alone), removed after."""
    d = Path(tempfile.mkdtemp(prefix="mcpd-sandbox-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def need_isolation(c) -> None:
    need_run_as(c)
    need_namespaces(c)


def test_a_server_with_a_private_network_reaches_nothing(sandboxed):
    c = sandboxed
    need_isolation(c)
    port = urlparse(c.base(0)).port
    # Without it, a server reaches the node's own API port on loopback.
    add_hog(c, "hog-wired", "--run-as", NOBODY, user=NOBODY)
    assert text(call(c, "hog-wired", "connect", {"host": "127.0.0.1", "port": port})) == "connected"
    add_hog(c, "hog-offline", "--run-as", NOBODY, "--private-network", user=NOBODY)
    seen = text(call(c, "hog-offline", "connect", {"host": "127.0.0.1", "port": port}))
    assert seen == "refused: Network is unreachable", seen
    assert "no network" in c.mcpctl("server", "status", "hog-offline")


def test_a_read_only_server_writes_only_where_allowed_and_sees_no_hidden_path(sandboxed, shared_dir):
    c = sandboxed
    need_isolation(c)
    out, closed = shared_dir / "out", shared_dir / "closed"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    closed.mkdir(mode=0o755)
    (closed / "plan.txt").write_text("the plan")
    (shared_dir / "open.txt").write_text("x")
    (shared_dir / "open.txt").chmod(0o666)
    through_proc = f"/proc/{c.pid(0)}/root{closed}/plan.txt"
    # As mcpd's user, a server reaches any file, even through mcpd's own /proc entry.
    add_hog(c, "hog-open")
    assert text(call(c, "hog-open", "read_file", {"path": through_proc})) == "read: the plan"

    add_hog(c, "hog-ro", "--run-as", NOBODY, "--read-only", "--writable", str(out), "--hide", str(closed),
            user=NOBODY)
    assert text(call(c, "hog-ro", "write_file", {"path": str(out / "result.txt"), "text": "ok"})) == "written"
    assert (out / "result.txt").read_text() == "ok"
    # A file its user may write, outside the writable paths.
    seen = text(call(c, "hog-ro", "write_file", {"path": str(shared_dir / "open.txt"), "text": "no"}))
    assert seen == "denied: Read-only file system" and (shared_dir / "open.txt").read_text() == "x", seen
    # A file its user may read, in a hidden directory; nor through mcpd's /proc entry.
    for path in (str(closed / "plan.txt"), through_proc):
        seen = text(call(c, "hog-ro", "read_file", {"path": path}))
        assert seen.startswith("denied:") and "plan" not in seen, (path, seen)
    # Its mounts stay its own: the node (and this test) still see everything.
    assert (closed / "plan.txt").read_text() == "the plan"
    assert str(closed) not in open("/proc/self/mountinfo").read()
    status = c.mcpctl("server", "status", "hog-ro")
    assert f"read-only filesystem but {out}" in status and f"hides {closed}" in status, status


def test_a_private_tmp_is_the_servers_own(sandboxed):
    c = sandboxed
    need_isolation(c)
    add_hog(c, "hog-tmp", "--run-as", NOBODY, "--private-tmp", user=NOBODY)
    path = f"/tmp/hog-{uuid.uuid4().hex}.txt"
    assert text(call(c, "hog-tmp", "write_file", {"path": path, "text": "mine"})) == "written"
    assert text(call(c, "hog-tmp", "read_file", {"path": path})) == "read: mine"
    assert not Path(path).exists()
    # Its environment reached it (sandbox-exec itself ran with none).
    assert "PATH=" in text(call(c, "hog-tmp", "read_file", {"path": "/proc/self/environ"}))


def test_isolation_as_root_is_refused(sandboxed):
    """Root (or mcpd's own user) in the namespaces could unmount them or reach the node's
    files through /proc: the API wants run_as, and the node refuses a run_as of root."""
    c = sandboxed
    refused = c.mcpctl_result("server", "add", "hog-rootbox", "--read-only", "--",
                              str(VENV_BIN / "python"), str(HOG))
    assert refused.returncode != 0 and "sandbox.run_as" in refused.stderr, refused.stderr
    need_namespaces(c)
    c.mcpctl("server", "add", "hog-rootbox", "--pool-size", "1", "--run-as", "root", "--private-network",
             "--", str(VENV_BIN / "python"), str(HOG))
    error = wait_until(lambda: process(c, "hog-rootbox").get("last_error"), 30, "the start fails")
    assert "root or mcpd's own user" in error, error
    c.mcpctl("server", "rm", "hog-rootbox")


def test_isolation_that_contradicts_itself_is_refused_naming_the_field(sandboxed):
    c = sandboxed
    for flags, field in [
        (["--writable", "/srv/out"], "sandbox.writable_paths"),
        (["--run-as", NOBODY, "--read-only", "--writable", "relative/path"], "sandbox.writable_paths"),
        (["--run-as", NOBODY, "--read-only", "--private-tmp", "--writable", "/tmp/out"], "sandbox.writable_paths"),
        (["--run-as", NOBODY, "--hide", "/"], "sandbox.hidden_paths"),
        (["--run-as", NOBODY, "--hide", "/etc/../root"], "sandbox.hidden_paths"),
        (["--private-network"], "sandbox.run_as"),
        (["--run-as", NOBODY, "--read-only", "--writable", "/srv/out", "--hide", "/srv/out/keys"],
         "sandbox.hidden_paths"),
    ]:
        refused = c.mcpctl_result("server", "add", "hog-bad", *flags, "--", str(VENV_BIN / "python"), str(HOG))
        assert refused.returncode != 0 and field in refused.stderr, (flags, refused.stderr)


def test_a_path_through_a_symbolic_link_is_refused_at_the_start(sandboxed, shared_dir):
    """Mounted as root, a link would make writable (or hide) where it points, which the
    server's user may have chosen."""
    c = sandboxed
    need_isolation(c)
    (shared_dir / "target").mkdir()
    (shared_dir / "link").symlink_to(shared_dir / "target")
    python, env = python_for(NOBODY)
    env_flags = [f for k, v in env.items() for f in ("--env", f"{k}={v}")]
    c.mcpctl("server", "add", "hog-linked", "--pool-size", "1", "--run-as", NOBODY, "--read-only",
             "--writable", str(shared_dir / "link"), *env_flags, "--", python, str(HOG))
    # The start fails, and the process's last words (in `server status`) say why.
    said = wait_until(lambda: [line for line in process(c, "hog-linked").get("stderr", [])
                               if "sandbox-exec" in line], 30, "the start fails")
    assert "goes through a symbolic link" in said[-1], said
    c.mcpctl("server", "rm", "hog-linked")
