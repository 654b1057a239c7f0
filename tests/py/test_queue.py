"""Admission control: a node whose pools take one call per process and queue one more refuses
the next call at once with a clear error, instead of letting it wait."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2

import pytest
from mcp.shared.exceptions import MCPError

from conftest import MCPD, start_cluster
from helpers import MODES, await_until, client, run, stateless_post, text_of, wait_until

QUEUE_FULL = -32051


@pytest.fixture(scope="module")
def tiny_queue(tmp_path_factory):
    """A one-node cluster whose pools run 1 call per process and queue 1, with `slow`: the
    demo server, one process."""
    c = start_cluster(
        tmp_path_factory,
        "tinyqueue",
        1,
        ["--pool-queue-size=1", "--pool-max-concurrency=1"],
    )
    try:
        c.add_server("slow", [MCPD, "demo-server"], pool_size=1)
        c.wait_tools("slow", ["sleep", "echo"])
        yield c
    finally:
        c.down()


@pytest.mark.parametrize("mode", MODES)
def test_a_call_beyond_a_full_queue_is_refused_at_once(tiny_queue, mode):
    c_ = tiny_queue
    url = c_.url(0, "slow")

    def queued() -> float:
        return c_.metric("mcpd_pool_queue_depth", 'server="slow"') or 0

    assert queued() == 0

    async def scenario():
        running = asyncio.Event()

        async def on_progress(progress, total, message) -> None:
            running.set()

        async with client(url, c_.token, mode) as a, client(url, c_.token, mode) as b, client(
            url, c_.token, mode
        ) as c:
            first = asyncio.create_task(
                a.call_tool("sleep", {"ms": 60_000, "steps": 60}, progress_callback=on_progress)
            )
            await asyncio.wait_for(running.wait(), 20)  # it holds the only slot
            second = asyncio.create_task(b.call_tool("sleep", {"ms": 60_000, "steps": 0}))

            async def second_is_queued() -> bool:
                return queued() == 1

            await await_until(second_is_queued, 20, "the second call waits in the queue")
            t0 = time.monotonic()
            with pytest.raises(MCPError) as refused:
                await c.call_tool("echo", {"message": "one too many"})
            elapsed = time.monotonic() - t0
            assert refused.value.code == QUEUE_FULL, refused.value
            assert "busy" in refused.value.message and "did not run" in refused.value.message
            # At once: a call let into the queue would wait for the 60 s sleeps (or its 30 s timeout).
            assert elapsed < 3, f"refused after {elapsed:.2f} s, not at once"
            for task in (first, second):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            # The cancelled call that was waiting leaves the queue (its depth is not left behind).
            async def queue_empty() -> bool:
                return queued() == 0

            await await_until(queue_empty, 20, "the queue is empty once its call was cancelled")

            # Once the two calls are cancelled the pool takes calls again.
            async def echo_works() -> bool:
                return text_of(await c.call_tool("echo", {"message": "room again"})) == "room again"

            await await_until(echo_works, 30, "a call succeeds once the queue drained")

    run(scenario())


@pytest.fixture(scope="module")
def shared_pair(tmp_path_factory):
    """A one-node cluster whose `shared` server has two processes serving one call each, used
    by two tenants: `flood` and `quiet`, each with a user token."""
    c = start_cluster(tmp_path_factory, "fairqueue", 1, ["--pool-max-concurrency=1"])
    try:
        c.add_server("shared", [MCPD, "demo-server"], pool_size=2)
        c.wait_tools("shared", ["sleep", "echo"])
        tokens = {}
        for tenant in ("flood", "quiet"):
            c.mcpctl("tenant", "add", tenant)
            tokens[tenant] = c.mcpctl("token", "create", "--tenant", tenant, "--name", "t").strip()
        yield c, tokens
    finally:
        c.down()


def sleep_call(http: httpx2.Client, url: str, token: str, ms: int) -> dict:
    r = stateless_post(
        url, token, "tools/call", {"name": "sleep", "arguments": {"ms": ms, "steps": 0}},
        name="sleep", http=http,
    )
    r.raise_for_status()
    return r.json()


def quiet_latencies(url: str, token: str, calls: int) -> list[float]:
    """Seconds each of `calls` sequential 100 ms calls of the quiet tenant took, end to end."""
    took = []
    with httpx2.Client() as http:
        for _ in range(calls):
            t0 = time.monotonic()
            answer = sleep_call(http, url, token, 100)
            took.append(time.monotonic() - t0)
            assert "result" in answer and not answer["result"].get("isError"), answer
    return sorted(took)


def p99(sorted_values: list[float]) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * 0.99))]


def test_a_flooding_tenant_cannot_starve_a_quiet_one(shared_pair):
    """Thirty callers of `flood` keep both processes busy with 50 ms calls and a backlog of
    about 28; the quiet tenant's 100 ms calls still all succeed, each waiting for one slot at
    most (first in, first out would make them wait for the whole backlog: ~0.7 s)."""
    c, tokens = shared_pair
    url = c.url(0, "shared")
    unloaded = quiet_latencies(url, tokens["quiet"], 10)

    stop = threading.Event()
    flood_done = []
    flood_failed = []

    def flood() -> None:
        with httpx2.Client() as http:
            while not stop.is_set():
                answer = sleep_call(http, url, tokens["flood"], 50)
                (flood_done if "result" in answer else flood_failed).append(answer)

    with ThreadPoolExecutor(30) as pool:
        flooders = [pool.submit(flood) for _ in range(30)]
        try:
            wait_until(
                lambda: (c.metric("mcpd_pool_queue_depth", 'server="shared"') or 0) >= 20 or None,
                30, "the flood builds a backlog",
            )
            loaded = quiet_latencies(url, tokens["quiet"], 20)
            backlog = c.metric("mcpd_pool_queue_depth", 'server="shared"') or 0
        finally:
            stop.set()
            for f in flooders:
                f.result(timeout=60)
    print(f"\nquiet tenant p99: unloaded {p99(unloaded) * 1000:.0f} ms, "
          f"beside the flood {p99(loaded) * 1000:.0f} ms (backlog {backlog:.0f}); "
          f"flood calls {len(flood_done)} ok, {len(flood_failed)} refused")
    assert backlog >= 10, "the flood kept a backlog while the quiet tenant called"
    assert not flood_failed, flood_failed[:1]
    assert p99(loaded) <= 2 * p99(unloaded), (unloaded, loaded)


def test_a_tenant_weight_is_validated_and_listed(shared_pair):
    c, _ = shared_pair
    refused = c.mcpctl_result("tenant", "add", "heavy", "--weight", "0")
    assert refused.returncode != 0 and "weight" in refused.stderr, refused.stderr
    c.mcpctl("tenant", "add", "heavy", "--weight", "3")
    listed = {t["spec"]["name"]: t["spec"] for t in json.loads(c.mcpctl("tenant", "list", "-o", "json"))}
    assert listed["heavy"]["weight"] == 3
    assert "weight" not in listed["quiet"], "weight 1 is left out, for older nodes"
