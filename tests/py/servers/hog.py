"""A stdio MCP server that misbehaves on request, for the sandbox tests: it reads other
processes' environment, allocates memory without bound, spins on the CPU, forks, opens
files, and connects, writes and reads where it is told. Written with the Python SDK
(`MCPServer`). Every loop is bounded, so that a sandbox that fails to hold it still ends."""

from __future__ import annotations

import os
import socket
import time

from mcp.server.mcpserver import MCPServer

server = MCPServer("hog")


@server.tool()
def whoami() -> str:
    """The process's user, group and supplementary groups."""
    return f"uid={os.getuid()} gid={os.getgid()} groups={sorted(os.getgroups())}"


@server.tool()
def getenv(name: str) -> str:
    """The value of one of its own environment variables (empty when unset)."""
    return os.environ.get(name, "")


@server.tool()
def read_environ(pid: int) -> str:
    """Another process's environment, or why it cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().replace(b"\0", b"\n").decode(errors="replace")
    except OSError as e:
        return f"denied: {e.strerror}"


@server.tool()
def allocate(mb: int, step_ms: int = 5) -> str:
    """Allocates (and touches) 1 MiB every `step_ms` until `mb` MiB are held."""
    held = []
    for _ in range(min(mb, 4096)):
        held.append(bytearray(1 << 20))
        time.sleep(step_ms / 1000)
    return f"allocated {len(held)} MiB"


@server.tool()
def spin(seconds: float) -> str:
    """Burns CPU for `seconds` of wall time (at most 60)."""
    end = time.monotonic() + min(seconds, 60)
    n = 0
    while time.monotonic() < end:
        n += 1
    return f"spun {n} times"


@server.tool()
def fork(n: int) -> str:
    """Starts up to `n` (at most 200) children that sleep, counts them, and stops them."""
    children, error = [], ""
    for _ in range(min(n, 200)):
        try:
            pid = os.fork()
        except OSError as e:
            error = e.strerror or str(e)
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return f"forked {len(children)} ({error or 'no error'})"


@server.tool()
def open_files(n: int) -> str:
    """Opens up to `n` (at most 10000) files, counts them, and closes them."""
    files, error = [], ""
    for _ in range(min(n, 10000)):
        try:
            files.append(open("/dev/null"))
        except OSError as e:
            error = e.strerror or str(e)
            break
    for f in files:
        f.close()
    return f"opened {len(files)} ({error or 'no error'})"


@server.tool()
def allocate_in_children(n: int, mb: int, hold_s: float = 10) -> str:
    """Starts `n` (at most 16) children that each allocate (and touch) `mb` MiB (at most 512)
    and hold it for `hold_s` s (at most 30); waits for them."""
    children = []
    for _ in range(min(n, 16)):
        pid = os.fork()
        if pid == 0:
            try:
                held = [bytearray(1 << 20) for _ in range(min(mb, 512))]
                time.sleep(min(hold_s, 30))
                del held
            finally:
                os._exit(0)
        children.append(pid)
    codes = [os.waitpid(pid, 0)[1] for pid in children]
    return f"children done: {codes}"


@server.tool()
def connect(host: str, port: int) -> str:
    """Opens a TCP connection to `host`:`port` (within 5 s), or says why it cannot."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return "connected"
    except OSError as e:
        return f"refused: {e.strerror or e}"


@server.tool()
def write_file(path: str, text: str) -> str:
    """Writes `text` to `path`, or says why it cannot."""
    try:
        with open(path, "w") as f:
            f.write(text)
        return "written"
    except OSError as e:
        return f"denied: {e.strerror}"


@server.tool()
def read_file(path: str) -> str:
    """The first 4 KiB of `path`, or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            return "read: " + f.read(4096).decode(errors="replace")
    except OSError as e:
        return f"denied: {e.strerror}"


if __name__ == "__main__":
    server.run()
