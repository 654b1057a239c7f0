"""`mcp-bridge` as an AI client runs it: the Python SDK's stdio client launches the bridge
against a 3-node cluster with all three URLs, and the client keeps working while nodes die.

Each test starts its own cluster, since it kills nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import mcp.types as types
import pytest
from mcp import Client, MCPError, StdioServerParameters

from conftest import CA_CERT, ROOT, VENV_BIN, Cluster, everything_on_one_node, start_cluster
from helpers import (MODES, ToolListChanges, relist_until, run, stream_open, streams_answered, text_of,
                     wait_until)

BRIDGE = Path(os.environ.get("MCP_BRIDGE_BIN") or ROOT / "target/debug/mcp-bridge")
WATCHED = "demo://resource/dynamic/text/1"


def bridge(urls: list[str], token: str, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=str(BRIDGE),
        args=["--url", ",".join(urls), "--log-level", "info", *extra],
        env={"MCP_BRIDGE_TOKEN": token, "MCP_BRIDGE_CACERT": str(CA_CERT), "PATH": os.environ.get("PATH", "")},
    )


def mcp_urls(c: Cluster, order: list[int]) -> list[str]:
    return [c.url(n) for n in order]


@pytest.fixture
def fresh(tmp_path_factory):
    c = start_cluster(tmp_path_factory, "bridge", 3)
    c.wait_tools("demo", ["echo", "counter_increment"])
    yield c
    c.down()


async def sampling(ctx, params):
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text="sampled by the test"), model="t"
    )


def test_bridge_lists_and_calls_demo_time_and_sampling(fresh):
    """The operator adds `time` while the client runs: the client is told through the bridge
    (`notifications/tools/list_changed` on the bridge's session stream, relayed on stdio),
    lists it, and calls it."""
    c = fresh

    async def scenario():
        changes = ToolListChanges()
        before = streams_answered(c, 0, c.url(0))
        async with Client(bridge(mcp_urls(c, [0, 1, 2]), c.token), mode="legacy", sampling_callback=sampling,
                          message_handler=changes.on_message) as cl:
            await stream_open(c, 0, c.url(0), before)
            await asyncio.to_thread(c.add_server, "time", [VENV_BIN / "mcp-server-time"])
            await relist_until(cl, changes.next, "time__get_current_time", listed=True)
            names = {t.name for t in (await cl.list_tools()).tools}
            assert {"demo__echo", "demo__test_sampling", "time__get_current_time"} <= names
            assert text_of(await cl.call_tool("demo__echo", {"message": "hi"})) == "hi"
            now = await cl.call_tool("time__get_current_time", {"timezone": "UTC"})
            assert not now.is_error and "UTC" in text_of(now)
            sampled = await cl.call_tool("demo__test_sampling", {"prompt": "say hi"})
            assert "sampled by the test" in text_of(sampled)

    run(scenario())


def test_killing_the_bridges_node_is_invisible_and_subscriptions_keep_delivering(fresh):
    c = fresh
    # server-everything on one node, not the one the bridge talks to first, in one process:
    # it keeps subscriptions per process, so the subscribe and the tool that starts the
    # updates must reach the same one (with two, a call made while the other is busy loading
    # the catalogue takes the other).
    host = everything_on_one_node(c)
    first = next(n for n in range(3) if n != host)
    order = [first] + [n for n in range(3) if n != first]

    async def scenario():
        updates: list[float] = []
        got = asyncio.Event()

        async def on_message(m) -> None:
            if getattr(m, "method", None) == "notifications/resources/updated":
                updates.append(time.monotonic())
                got.set()

        async with Client(bridge(mcp_urls(c, order), c.token), mode="legacy", message_handler=on_message) as cl:
            await cl.subscribe_resource(WATCHED)
            for _ in range(2):
                if text_of(await cl.call_tool("everything__toggle-subscriber-updates", {})).startswith("Started"):
                    break
            await asyncio.wait_for(got.wait(), 20)
            c.kill(first)
            killed = time.monotonic()
            # The next calls succeed: no error reaches the client.
            for i in range(5):
                r = await cl.call_tool("demo__echo", {"message": f"after {i}"})
                assert not r.is_error and text_of(r) == f"after {i}"
            # And the subscription made before the kill still delivers.
            got.clear()
            await asyncio.wait_for(got.wait(), 25)
            assert updates[-1] > killed

    run(scenario(), timeout=180)


def test_a_counter_in_flight_during_a_kill_runs_at_most_once(fresh):
    c = fresh
    ledger = c.dir / "demo-ledger.jsonl"

    async def scenario():
        outcomes: dict[str, str] = {}
        async with Client(bridge(mcp_urls(c, [0, 1, 2]), c.token), mode="legacy") as cl:
            async def one(i: int) -> None:
                key = f"bridge-k{i}"
                try:
                    r = await cl.call_tool("demo__counter_increment", {}, meta={"mcpd/request-key": key})
                    outcomes[key] = "error" if r.is_error else "ok"
                except MCPError as e:
                    # A clear error: the bridge says the call may or may not have run.
                    outcomes[key] = "error"
                    assert "may or may not have run" in str(e) or "unreachable" in str(e), str(e)

            for i in range(10):
                await one(i)
            in_flight = [asyncio.create_task(one(i)) for i in range(10, 20)]
            c.kill(0)
            await asyncio.gather(*in_flight)
            for i in range(20, 30):
                await one(i)
        seen: dict[str, int] = {}
        for line in ledger.read_text().splitlines():
            k = json.loads(line).get("key")
            if k and k.startswith("bridge-k"):
                seen[k] = seen.get(k, 0) + 1
        assert all(n == 1 for n in seen.values()), f"ran twice: {[k for k, n in seen.items() if n > 1]}"
        assert all(seen.get(k) == 1 for k, o in outcomes.items() if o == "ok"), "an ok call is missing from the ledger"
        assert sum(o == "ok" for o in outcomes.values()) >= 20

    run(scenario(), timeout=180)


def test_all_nodes_down_gives_clear_errors_then_the_same_session_recovers(fresh):
    c = fresh

    async def scenario():
        params = bridge(mcp_urls(c, [0, 1, 2]), c.token, "--failover-deadline-ms", "2000")
        async with Client(params, mode="legacy") as cl:
            assert text_of(await cl.call_tool("demo__echo", {"message": "up"})) == "up"
            for n in range(3):
                c.kill(n)
            started = time.monotonic()
            with pytest.raises(MCPError) as err:
                await cl.call_tool("demo__echo", {"message": "down"})
            assert "unreachable" in str(err.value), str(err.value)
            assert time.monotonic() - started < 30
            for n in range(3):
                c.restart(n)
            deadline = time.monotonic() + 60
            while True:
                try:
                    r = await cl.call_tool("demo__echo", {"message": "back"})
                    if text_of(r) == "back":
                        break
                except MCPError:
                    pass
                assert time.monotonic() < deadline, "the bridge did not recover"
                await asyncio.sleep(0.5)

    run(scenario(), timeout=180)


def test_bad_url_token_and_server_give_clear_errors(fresh, capfd):
    c = fresh

    async def expect_error(params: StdioServerParameters, needle: str) -> None:
        try:
            async with Client(params, mode="legacy") as cl:
                await cl.call_tool("demo__echo", {"message": "x"})
        except Exception as e:  # the SDK raises on a failed initialize
            assert needle in repr(e) or needle in str(getattr(e, "exceptions", "")), repr(e)
            return
        raise AssertionError(f"expected an error mentioning {needle!r}")

    run(expect_error(bridge(["http://127.0.0.1:1"], c.token, "--failover-deadline-ms", "1000"), "unreachable"))
    run(expect_error(bridge(mcp_urls(c, [0]), "mcpt_000000000000_wrong"), "401"))
    run(expect_error(bridge(mcp_urls(c, [0]), c.token, "--server", "nope"), "no server"))


@pytest.mark.parametrize("mode", MODES)
def test_the_bridge_waits_out_a_rate_limit_instead_of_failing_over(cluster, mode):
    """A tenant limited to 1 call/s: through the bridge, three quick calls all succeed (each
    refusal's retryAfterMs is waited out, on the same node; in the 2026 era the refusal is an
    HTTP 429); with no patience the client gets the refusal itself."""
    c = cluster
    tenant = f"bridge-rl-{uuid.uuid4().hex[:6]}"
    c.mcpctl("tenant", "add", tenant)
    token = c.mcpctl("token", "create", "--tenant", tenant, "--name", "bridge").strip()
    c.mcpctl("limit", "set", tenant, "--tenant", tenant, "--rate", "1", "--burst", "1")
    for node in range(c.nodes):
        wait_until(lambda: tenant in c.mcpctl("limit", "list", node=node), 30, f"node {node} knows the limit")
    refused_before = sum(c.metric("mcpd_limit_refusals_total", f'limit="{tenant}",kind="rate"', n) or 0
                         for n in range(c.nodes))

    async def scenario():
        async with Client(bridge(mcp_urls(c, [0, 1, 2]), token), mode=mode) as cl:
            for i in range(3):
                r = await cl.call_tool("demo__echo", {"message": f"call {i}"})
                assert not r.is_error and text_of(r) == f"call {i}"
        async with Client(bridge(mcp_urls(c, [0, 1, 2]), token, "--rate-limit-wait-ms", "0"), mode=mode) as cl:
            with pytest.raises(MCPError) as refused:
                for i in range(3):
                    await cl.call_tool("demo__echo", {"message": f"impatient {i}"})
            assert refused.value.code == -32029, refused.value

    run(scenario(), timeout=120)
    refused_after = sum(c.metric("mcpd_limit_refusals_total", f'limit="{tenant}",kind="rate"', n) or 0
                        for n in range(c.nodes))
    assert refused_after >= refused_before + 2, "the bridge met refusals and waited them out"
    c.mcpctl("limit", "rm", tenant)
