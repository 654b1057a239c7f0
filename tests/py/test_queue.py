"""Admission control: a node whose pools take one call per process and queue one more refuses
the next call at once with a clear error, instead of letting it wait."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from mcp.shared.exceptions import MCPError

from conftest import MCPD, start_cluster
from helpers import MODES, await_until, client, run, text_of

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
