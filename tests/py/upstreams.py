"""Remote MCP servers the tests start: one process on a loopback port, started for a test module
and stopped whatever happens."""

from __future__ import annotations

import os
import socket
import subprocess

from helpers import wait_until

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """One remote server process on a loopback port; `restart` keeps the port."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str] | None = None):
        self.argv, self.port, self.env = argv, port, env
        self.path = "/mcp"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self) -> None:
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(self.argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listening, 30, f"the upstream listening on port {self.port}")

    def _listening(self) -> bool:
        assert self.proc and self.proc.poll() is None, "the upstream exited"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


def serving(up: Upstream):
    """Starts `up` for a test module and stops it whatever happens."""
    up.start()
    try:
        yield up
    finally:
        up.stop()
