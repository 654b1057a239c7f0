"""A rolling upgrade, and a rollback, under load: the runbook of deploy/README.md ("Upgrades").

A 3-node cluster starts on the previous build (`MCPCP_UPGRADE_FROM_BIN`, an mcpd built from
an earlier commit by `scripts/test-upgrade.sh`), serves admin writes and MCP calls without
pause, and has each node stopped (SIGTERM) and started on the current build, one at a time,
each once the one before is back and ready; then one node goes back to the previous build.
Afterwards every write the cluster acknowledged is there exactly once, and no MCP call failed
that a client could not have been told to send again. Skipped unless the previous build is
given (it takes a build of another commit: `scripts/test.sh --upgrade`).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import httpx2
import pytest

from conftest import MCPD, Cluster
from helpers import stateless_post, wait_until

OLD = os.environ.get("MCPCP_UPGRADE_FROM_BIN")
pytestmark = pytest.mark.skipif(not OLD, reason="no previous build: run scripts/test-upgrade.sh (scripts/test.sh --upgrade)")


class Load:
    """Admin writers and MCP callers against every node, until stopped. A request that finds
    its node down (connection refused or reset) is sent again, the same request, to the next
    node: what mcpctl and mcp-bridge do. Anything else is a failure."""

    def __init__(self, c, writers: int = 3, callers: int = 2):
        self.c = c
        self.stop = threading.Event()
        self.acked: list[str] = []
        self.write_failures: list[str] = []
        self.calls = 0
        self.call_failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._writer, args=(w,)) for w in range(writers)]
        self.threads += [threading.Thread(target=self._caller, args=(k,)) for k in range(callers)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _send(self, start: int, attempt) -> str | None:
        """Tries `attempt(node)` on each node in turn for up to 30 s; None when one answered."""
        deadline, node, last = time.monotonic() + 30, start, ""
        while time.monotonic() < deadline:
            try:
                return attempt(node % self.c.nodes)
            except (httpx2.ConnectError, httpx2.RemoteProtocolError, httpx2.ReadError) as e:
                last = f"node {node % self.c.nodes}: {type(e).__name__}"
                node += 1
                time.sleep(0.05)
        return f"no node answered within 30 s ({last})"

    def _outcome(self, start: int, attempt) -> str | None:
        """What went wrong with a request, or None when it succeeded."""
        try:
            return self._send(start, attempt)
        except AssertionError as e:
            return str(e)

    def _writer(self, w: int) -> None:
        headers = {"Authorization": f"Bearer {self.c.admin_token}"}
        i = 0
        while not self.stop.is_set():
            name = f"roll-{w}-{i}"
            key = str(uuid.uuid4())

            def attempt(node: int) -> None:
                r = httpx2.post(f"{self.c.base(node)}/v1/tenants", json={"name": name},
                                headers={**headers, "Idempotency-Key": key}, timeout=15)
                if r.status_code == 503 and "upgrade_in_progress" in r.text:
                    raise AssertionError(f"refused by the version gate: {r.text[:200]}")
                if r.status_code == 503:  # no quorum for a moment: the same write again
                    raise httpx2.ConnectError("503")
                if r.status_code != 201:
                    raise AssertionError(f"{r.status_code} {r.text[:200]}")

            failed = self._outcome(w + i, attempt)
            with self.lock:
                if failed:
                    self.write_failures.append(f"{name}: {failed}")
                else:
                    self.acked.append(name)
            i += 1

    def _caller(self, k: int) -> None:
        i = 0
        while not self.stop.is_set():
            text = f"call-{k}-{i}"

            def attempt(node: int) -> None:
                r = stateless_post(self.c.url(node, "demo"), self.c.token, "tools/call",
                                   {"name": "echo", "arguments": {"message": text}}, name="echo", timeout=15)
                body = r.json()
                got = body.get("result", {}).get("content", [{}])[0].get("text", "")
                if r.status_code != 200 or text not in got:
                    raise AssertionError(f"{r.status_code} {json.dumps(body)[:200]}")

            failed = self._outcome(k + i, attempt)
            with self.lock:
                self.calls += 1
                if failed:
                    self.call_failures.append(f"{text}: {failed}")
            i += 1


def ready(c, node: int) -> bool:
    r = httpx2.get(f"{c.base(node)}/readyz", timeout=5)
    return r.status_code == 200


def test_a_rolling_upgrade_and_a_rollback_lose_nothing(tmp_path_factory):
    old, new = Path(OLD), MCPD
    c = Cluster("upgrade", tmp_path_factory.mktemp("upgrade"), 3, [])
    c.mcpd = old
    try:
        c.up()
    except BaseException:
        c.down()
        raise
    try:
        c.wait_tools("demo", ["echo"])
        steps = []
        with Load(c) as load:
            wait_until(lambda: len(load.acked) >= 20 and load.calls >= 20, 60, "the load is flowing")
            # One node at a time to the current build, each once the previous one is ready.
            for node, binary in [(0, new), (1, new), (2, new), (2, old)]:
                before = len(load.acked)
                c.stop(node)
                c.mcpd = binary
                c.restart(node)
                wait_until(lambda: ready(c, node), 60, f"node {node} ready on {binary.name}")
                wait_until(lambda: len(load.acked) >= before + 10, 60, "writes flow again")
                steps.append(f"node {node + 1} -> {'current' if binary == new else 'previous'} build")
        assert not load.write_failures, f"{len(load.write_failures)} writes failed: {load.write_failures[:5]}"
        assert not load.call_failures, f"{len(load.call_failures)} of {load.calls} calls failed: {load.call_failures[:5]}"

        # Every acknowledged write is there, once.
        listed = [t["spec"]["name"] for t in json.loads(c.mcpctl("tenant", "list", "-o", "json"))]
        missing = set(load.acked) - set(listed)
        assert not missing, f"{len(missing)} acknowledged writes lost: {sorted(missing)[:5]}"
        assert len(listed) == len(set(listed))
        # The node started last catches up with what was written meanwhile.
        wait_until(lambda: [m["health"] for m in json.loads(c.mcpctl("cluster", "status", "-o", "json"))["members"]]
                   == ["healthy"] * 3, 30, "every member healthy")
        print(f"\n{'; '.join(steps)}: {len(load.acked)} writes acknowledged, all present; "
              f"{load.calls} MCP calls, 0 failed")
    finally:
        c.down()
