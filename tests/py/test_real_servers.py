"""Real MCP servers (mcp-server-time, server-everything, server-filesystem, mcp-server-git)
behind the cluster, driven by the Python SDK in both protocol eras, through the aggregate
endpoint `/mcp` (names `server__tool`) and the transparent one `/servers/{name}/mcp`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
import uuid
from collections.abc import Callable

import mcp.types as types
import pytest

from helpers import MODES, STATELESS, accepting, await_until, client, run, text_of, wait_until

ENDPOINTS = ["aggregate", "server"]


def node_for(mode: str) -> int:
    """Spreads the eras over two nodes, so both serve real servers."""
    return 0 if mode == "legacy" else 1


def target(cluster, server: str, endpoint: str, mode: str) -> tuple[str, Callable[[str], str]]:
    """The URL to connect to and how a tool of `server` is named there."""
    node = node_for(mode)
    if endpoint == "aggregate":
        return cluster.url(node), lambda tool: f"{server}__{tool}"
    return cluster.url(node, server), lambda tool: tool


params = pytest.mark.parametrize(("mode", "endpoint"), [(m, e) for m in MODES for e in ENDPOINTS])


@params
def test_time_server_lists_its_tools_and_tells_the_time(cluster, mode, endpoint):
    url, name = target(cluster, "time", endpoint, mode)

    async def scenario():
        async with client(url, cluster.token, mode) as c:
            tools = {t.name for t in (await c.list_tools()).tools}
            assert {name("get_current_time"), name("convert_time")} <= tools
            now = json.loads(text_of(await c.call_tool(name("get_current_time"), {"timezone": "UTC"})))
            assert now["timezone"] == "UTC"
            told = datetime.datetime.fromisoformat(now["datetime"])
            assert abs(told - datetime.datetime.now(datetime.timezone.utc)) < datetime.timedelta(minutes=5)
            converted = json.loads(
                text_of(
                    await c.call_tool(
                        name("convert_time"),
                        {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"},
                    )
                )
            )
            assert converted["target"]["datetime"][11:16] == "21:00"

    run(scenario())


@params
def test_everything_server_lists_its_tools_and_answers_calls(cluster, mode, endpoint):
    url, name = target(cluster, "everything", endpoint, mode)
    payload = f"hello {uuid.uuid4().hex}"

    async def scenario():
        async with client(url, cluster.token, mode) as c:
            tools = {t.name for t in (await c.list_tools()).tools}
            assert {name("echo"), name("get-sum"), name("trigger-sampling-request")} <= tools
            assert text_of(await c.call_tool(name("echo"), {"message": payload})) == f"Echo: {payload}"
            assert text_of(await c.call_tool(name("get-sum"), {"a": 2, "b": 40})) == "The sum of 2 and 40 is 42."

    run(scenario())


@params
def test_filesystem_server_reads_a_known_file(cluster, files_dir, mode, endpoint):
    url, name = target(cluster, "files", endpoint, mode)
    known = files_dir / "known.txt"

    async def scenario():
        async with client(url, cluster.token, mode) as c:
            tools = {t.name for t in (await c.list_tools()).tools}
            assert {name("read_text_file"), name("list_directory")} <= tools
            allowed = text_of(await c.call_tool(name("list_allowed_directories"), {}))
            assert str(files_dir.resolve()) in allowed
            listing = text_of(await c.call_tool(name("list_directory"), {"path": str(files_dir)}))
            assert "known.txt" in listing
            content = text_of(await c.call_tool(name("read_text_file"), {"path": str(known)}))
            assert content.strip() == known.read_text().strip()

    run(scenario())


@pytest.mark.parametrize("mode", MODES)
def test_git_server_shows_the_log_of_its_repository(cluster, git_repo, mode):
    url, name = target(cluster, "git", "aggregate", mode)

    async def scenario():
        async with client(url, cluster.token, mode) as c:
            log = text_of(await c.call_tool(name("git_log"), {"repo_path": str(git_repo), "max_count": 1}))
            assert "the known commit" in log

    run(scenario())


@params
def test_sampling_request_of_server_everything_is_answered_by_the_client(cluster, mode, endpoint):
    url, name = target(cluster, "everything", endpoint, mode)
    answer = f"sampled {uuid.uuid4().hex}"
    asked: list[str] = []

    async def sampling(ctx, p: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(p.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=answer), model="test-model"
        )

    async def scenario():
        async with client(url, cluster.token, mode, sampling_callback=sampling) as c:
            r = await c.call_tool(name("trigger-sampling-request"), {"prompt": "ping the model"})
            assert not r.is_error, text_of(r)
            assert answer in text_of(r)
            assert len(asked) == 1 and "ping the model" in asked[0]

    run(scenario())


@params
def test_elicitation_request_of_server_everything_is_answered_by_the_client(cluster, mode, endpoint):
    url, name = target(cluster, "everything", endpoint, mode)
    who = f"Ada {uuid.uuid4().hex[:8]}"
    asked: list[str] = []

    elicitation = accepting({"name": who}, asked)

    async def scenario():
        async with client(url, cluster.token, mode, elicitation_callback=elicitation) as c:
            r = await c.call_tool(name("trigger-elicitation-request"), {})
            assert not r.is_error, text_of(r)
            assert "User provided the requested information" in text_of(r)
            assert who in text_of(r)
            assert len(asked) == 1

    run(scenario())


@params
def test_progress_notifications_arrive_while_the_call_runs(cluster, mode, endpoint):
    url, name = target(cluster, "everything", endpoint, mode)
    seen: list[tuple[float, float]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, time.monotonic()))

    async def scenario():
        async with client(url, cluster.token, mode) as c:
            r = await c.call_tool(
                name("trigger-long-running-operation"), {"duration": 1.5, "steps": 3}, progress_callback=on_progress
            )
            done = time.monotonic()
            assert "Long running operation completed" in text_of(r)

            async def all_steps() -> bool:
                # The SDK may run the last progress callback just after handing over the result.
                return len(seen) >= 3

            await await_until(all_steps, 5, "3 progress notifications")
            assert [p for p, _ in seen] == [1, 2, 3]
            # The first step ends after 0.5 s of 1.5: it must reach the client then, not with the answer.
            assert done - seen[0][1] > 0.5, f"progress came {done - seen[0][1]:.2f} s before the result"

    run(scenario())


WATCHED = "demo://resource/dynamic/text/1"


async def updates_on(c, toggle: str) -> None:
    """Turns on server-everything's simulated updates (every 5 s, for subscribed resources).
    The switch is a toggle kept per process, so it may have to be flipped twice."""
    for _ in range(2):
        if text_of(await c.call_tool(toggle, {})).startswith("Started"):
            return
    raise AssertionError("server-everything did not start its simulated updates")


@params
def test_resource_subscription_delivers_updated_notifications(cluster, mode, endpoint):
    url, name = target(cluster, "everything", endpoint, mode)

    async def scenario():
        if mode == STATELESS:
            async with client(url, cluster.token, mode) as c:
                async with c.listen(resource_subscriptions=[WATCHED]) as sub:
                    assert sub.honored.resource_subscriptions == [WATCHED]
                    await updates_on(c, name("toggle-subscriber-updates"))
                    event = await asyncio.wait_for(anext(sub), 20)
                    assert event.uri == WATCHED
            return
        updated = asyncio.Event()
        uris: list[str] = []

        async def on_message(m) -> None:
            if getattr(m, "method", None) == "notifications/resources/updated":
                uris.append(m.params.uri)
                updated.set()

        async with client(url, cluster.token, mode, message_handler=on_message) as c:
            await c.subscribe_resource(WATCHED)
            await updates_on(c, name("toggle-subscriber-updates"))
            await asyncio.wait_for(updated.wait(), 20)
            assert set(uris) == {WATCHED}

    run(scenario())


def test_one_sessions_unsubscribe_leaves_another_sessions_subscription(cluster):
    """Two sessions on node 0 subscribe to the same resource of server-everything, whose one
    process there they share. The first unsubscribes; the second still hears the resource's
    updates: the process is told to forget the URI only when its last holder lets go, by
    unsubscribing or by ending its session. (A resource no other test subscribes to.)"""
    url = cluster.url(0)
    uri = "demo://resource/dynamic/text/2"
    toggle = "everything__toggle-subscriber-updates"

    def subscribed() -> float:
        return cluster.metric("mcpd_pool_subscriptions", 'server="everything"', node=0) or 0

    async def scenario():
        updated = asyncio.Event()

        async def on_message(m) -> None:
            if getattr(m, "method", None) == "notifications/resources/updated" and m.params.uri == uri:
                updated.set()

        async with client(url, cluster.token, "legacy") as first, \
                client(url, cluster.token, "legacy", message_handler=on_message) as second:
            await first.subscribe_resource(uri)
            await second.subscribe_resource(uri)
            assert subscribed() == before + 1, "one subscription on the process, two holders"
            await first.unsubscribe_resource(uri)
            assert subscribed() == before + 1, "the second session still holds it"
            await updates_on(second, toggle)
            # Only an update sent after the first session let go counts.
            updated.clear()
            await asyncio.wait_for(updated.wait(), 20)
            await second.unsubscribe_resource(uri)
            assert subscribed() == before, "the last holder let go"
            # A session that ends holding a subscription lets go of it too.
            await second.subscribe_resource(uri)
            assert subscribed() == before + 1

    before = subscribed()
    run(scenario())
    # Both sessions ended (DELETE).
    wait_until(lambda: subscribed() == before, 10, "the ended session's subscription withdrawn")


def cancellations(cluster, node: int) -> int:
    """How many `notifications/cancelled` the demodbg processes of `node` reported receiving."""
    return cluster.log(node).count("request cancelled by the client")


@params
def test_cancelling_a_call_cancels_it_upstream_and_the_gateway_stays_healthy(cluster, mode, endpoint):
    url, name = target(cluster, "demodbg", endpoint, mode)
    node = node_for(mode)
    before = cancellations(cluster, node)

    async def scenario():
        started = asyncio.Event()

        async def on_progress(progress, total, message) -> None:
            started.set()

        async with client(url, cluster.token, mode) as c:
            call = asyncio.create_task(
                c.call_tool(name("sleep"), {"ms": 60_000, "steps": 60}, progress_callback=on_progress)
            )
            # Running upstream once its first progress (after 1 s) came back.
            await asyncio.wait_for(started.wait(), 20)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call

            async def cancelled_upstream() -> bool:
                return cancellations(cluster, node) > before

            await await_until(cancelled_upstream, 15, "the server logged the notifications/cancelled it got")
            # The gateway goes on serving, on the same session and process, without waiting
            # for the cancelled minute to pass.
            t0 = time.monotonic()
            assert text_of(await c.call_tool(name("echo"), {"message": "still here"})) == "still here"
            assert time.monotonic() - t0 < 20

    run(scenario())


@pytest.mark.parametrize("mode", MODES)
def test_cancelling_a_long_running_call_of_server_everything_leaves_it_serving(cluster, mode):
    url = cluster.url(node_for(mode), "everything")

    async def scenario():
        started = asyncio.Event()

        async def on_progress(progress, total, message) -> None:
            started.set()

        async with client(url, cluster.token, mode) as c:
            call = asyncio.create_task(
                c.call_tool("trigger-long-running-operation", {"duration": 60, "steps": 120}, progress_callback=on_progress)
            )
            await asyncio.wait_for(started.wait(), 20)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
            t0 = time.monotonic()
            assert text_of(await c.call_tool("echo", {"message": "after"})) == "Echo: after"
            assert time.monotonic() - t0 < 20

    run(scenario())
