"""What an operator changes reaches the lists of clients already connected: a client of `/mcp`
is told (`notifications/tools/list_changed`, on its session's stream or on its 2026-07-28
`subscriptions/listen` stream) when a server is added or removed, and when a server that was
still on its first start when it listed comes up. A list waits for a starting server only
`[route] list_wait_ms` (3 s by default), not for its whole start. A client of a server's own
endpoint also hears of the fallback that lists its tools there while the server is down, and
is told when the server goes down (its process, or the node of its only replica) and when it
comes back.

A client here does what a real one does with the notification: it lists again. Each test
waits for notifications with a deadline; a client that is never told fails it.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from mcp.shared.exceptions import MCPError

from conftest import MCPD, VENV_BIN
from helpers import MODES, TOLD_WITHIN, client, listening, relist_until, run, stateless_post, wait_until


@pytest.mark.parametrize("mode", MODES)
def test_a_client_of_mcp_is_told_when_a_server_is_added_and_when_it_is_removed(cluster, mode):
    """A client is connected to node 2's `/mcp` when the operator adds a server: the client is
    told its tool list changed, and lists the new server's tools. Once every node lists them,
    another client connects, and the operator removes the server: that client is told, and
    the tools are gone. (Its own client for each change: the first may still have
    announcements of the server's start to hear, from each node, which a removal must not
    stand on.)"""
    name = f"added-{uuid.uuid4().hex[:6]}"
    tool = f"{name}__echo"

    async def added():
        async with listening(cluster, mode, 1) as (c, next_change):
            assert tool not in {t.name for t in (await c.list_tools()).tools}
            await asyncio.to_thread(cluster.add_server, name, [MCPD, "demo-server"], pool_size=1)
            await relist_until(c, next_change, tool, listed=True)

    async def removed():
        async with listening(cluster, mode, 1) as (c, next_change):
            assert tool in {t.name for t in (await c.list_tools()).tools}
            await asyncio.to_thread(cluster.mcpctl, "server", "rm", name)
            await relist_until(c, next_change, tool, listed=False)

    try:
        run(added())
        cluster.wait_tools(name, ["echo"])
        run(removed())
    finally:
        cluster.mcpctl_result("server", "rm", name)


@pytest.mark.parametrize("mode", MODES)
def test_a_server_still_starting_is_listed_without_waiting_and_announced_when_it_comes_up(cluster, mode):
    """A server whose first start takes 20 s (longer than `list_wait_ms`; its start timeout
    is 60 s) is added with one replica. Clients of its own node and of another node list
    while it starts: the lists are answered without it (its own node waited `list_wait_ms`
    for it, and counted that it gave up). Both clients, listening from then on, are told when
    it comes up (its first catalogue; the other node hears it from the server's node), and
    then list its tools."""
    name = f"slow-{uuid.uuid4().hex[:6]}"
    tool = f"{name}__echo"
    cluster.put_server({"name": name, "command": "sh", "args": ["-c", f"sleep 20; exec {MCPD} demo-server"],
                        "replicas": 1, "pool_size": 1, "timeouts": {"startup_ms": 60_000}})
    try:
        # The node whose pool of it is on its first start (its one replica).
        home = cluster.node_with(name, "starting", 30)
        other = (home + 1) % cluster.nodes

        def gave_up() -> float:
            return cluster.metric("mcpd_route_list_waits_total", f'server="{name}",outcome="gave_up"', home) or 0

        async def scenario():
            async with listening(cluster, mode, home) as (at_home, home_change), \
                    listening(cluster, mode, other) as (elsewhere, other_change):
                before = gave_up()
                for c in (at_home, elsewhere):
                    assert tool not in {t.name for t in (await c.list_tools()).tools}, \
                        "a list waited out the server's first start"
                assert gave_up() > before, "the server's node did not count the list that went without it"
                await asyncio.gather(relist_until(at_home, home_change, tool, listed=True),
                                     relist_until(elsewhere, other_change, tool, listed=True))

        run(scenario())
    finally:
        cluster.mcpctl("server", "rm", name)


def add_with_fallback(cluster, name: str, command: str, args: list[str], fallback: str) -> int:
    """Adds `fallback` (mcp-server-time, one process per node) and, once every node lists it,
    server `name` (one replica, one process) naming it as its fallback; returns the node
    (0-based) whose process of `name` is ready."""
    cluster.add_server(fallback, [VENV_BIN / "mcp-server-time", "--local-timezone", "UTC"], pool_size=1)
    cluster.wait_tools(fallback, ["get_current_time"])
    cluster.put_server({"name": name, "command": command, "args": args, "replicas": 1, "pool_size": 1,
                        "fallbacks": [fallback]})
    return cluster.node_with(name, "ready")


@pytest.mark.parametrize("mode", MODES)
def test_a_client_of_a_server_that_is_down_hears_of_the_fallback_that_lists_for_it(cluster, mode):
    """A server that cannot start (`/bin/false`) names a fallback, which answers on the
    server's own endpoint: a client there lists the fallback's tools. That client is told when
    the fallback announces that its tools changed (another client of the fallback has it
    announce so), and when the operator removes the fallback: its list is then the server's
    own, which says it has no process."""
    tag = uuid.uuid4().hex[:6]
    spare, down = f"spare-{tag}", f"down-{tag}"
    cluster.add_server(spare, [MCPD, "demo-server"], pool_size=1)
    url = cluster.url(1, down)
    try:
        cluster.wait_tools(spare, ["echo"])
        cluster.mcpctl("server", "add", down, "--pool-size", "1", "--fallback", spare, "--", "/bin/false")

        def fallback_lists() -> bool:
            r = stateless_post(url, cluster.token, "tools/list", timeout=30)
            return r.status_code == 200 and "echo" in {t["name"] for t in r.json()["result"]["tools"]}

        wait_until(fallback_lists, 60, f"{down}'s endpoint listing {spare}'s tools")

        async def scenario():
            async with listening(cluster, mode, 1, url) as (c, next_change):
                assert "echo" in {t.name for t in (await c.list_tools()).tools}
                async with client(cluster.url(0, spare), cluster.token, "legacy") as other:
                    await other.call_tool("test_trigger_tool_change", {})
                try:
                    await asyncio.wait_for(next_change(), TOLD_WITHIN)
                except TimeoutError:
                    raise AssertionError(f"not told that {spare}, listing for {down}, changed its tools") from None
                await asyncio.to_thread(cluster.mcpctl, "server", "rm", spare)
                for _ in range(20):
                    try:
                        await asyncio.wait_for(next_change(), TOLD_WITHIN)
                    except TimeoutError:
                        raise AssertionError(f"not told that {spare}, listing for {down}, is gone") from None
                    try:
                        if "echo" not in {t.name for t in (await c.list_tools()).tools}:
                            return
                    except MCPError as e:
                        # With no fallback left, its list is its own: it has no process.
                        assert "no running process" in str(e), e
                        return
                raise AssertionError(f"20 changes told, and {spare}'s tools still listed for {down}")

        run(scenario())
    finally:
        cluster.mcpctl_result("server", "rm", down)
        cluster.mcpctl_result("server", "rm", spare)


@pytest.mark.parametrize("mode", MODES)
def test_a_client_of_a_server_is_told_when_its_fallback_takes_its_lists_over_and_gives_them_back(cluster, mode, tmp_path):
    """A server (the demo server, one replica) whose restarts fail while a flag file exists
    names mcp-server-time as its fallback. A client of the server's own endpoint lists the
    demo's tools. The server's process crashes (its `crash` tool) and cannot start again:
    the client is told, and lists the fallback's tools. The operator removes the flag, the
    server starts again: the client is told, and lists the demo's tools again."""
    tag = uuid.uuid4().hex[:6]
    spare, flaky = f"spare-{tag}", f"flaky-{tag}"
    flag = tmp_path / "started-once"
    try:
        # One process starts once (one replica, one process, the demo server speaking the
        # first revision it is asked): any further start finds the flag.
        once = f'test -e "{flag}" && exit 1; touch "{flag}"; exec {MCPD} demo-server'
        home = add_with_fallback(cluster, flaky, "sh", ["-c", once], spare)
        url = cluster.url(home, flaky)

        async def scenario():
            async with listening(cluster, mode, home, url) as (c, next_change):
                assert "echo" in {t.name for t in (await c.list_tools()).tools}
                async with client(url, cluster.token, "legacy") as other:
                    with pytest.raises(MCPError):
                        await other.call_tool("crash", {})
                await relist_until(c, next_change, "get_current_time", listed=True)
                flag.unlink()
                await relist_until(c, next_change, "echo", listed=True)

        run(scenario())
    finally:
        cluster.mcpctl_result("server", "rm", flaky)
        cluster.mcpctl_result("server", "rm", spare)


def test_a_client_is_told_when_the_node_of_a_servers_only_replica_dies(cluster):
    """A server with one replica names a fallback. A client of the server's endpoint on
    another node lists the server's tools. The server's node is killed: the client is told
    (the dead node's stream of announcements ended), and lists the fallback's tools. The node
    is started again for the tests that follow."""
    tag = uuid.uuid4().hex[:6]
    spare, lone = f"spare-{tag}", f"lone-{tag}"
    home, killed = None, False
    try:
        home = add_with_fallback(cluster, lone, str(MCPD), ["demo-server"], spare)
        elsewhere = (home + 1) % cluster.nodes
        url = cluster.url(elsewhere, lone)

        async def scenario():
            async with listening(cluster, "legacy", elsewhere, url) as (c, next_change):
                assert "echo" in {t.name for t in (await c.list_tools()).tools}
                nonlocal killed
                await asyncio.to_thread(cluster.kill, home)
                killed = True
                await relist_until(c, next_change, "get_current_time", listed=True)

        run(scenario())
    finally:
        try:
            if killed:
                cluster.restart(home)
                wait_until(lambda: cluster.leader(home) is not None or None, 60, "the node back in its cluster")
                # Its pools back too, for the tests that follow.
                cluster.wait_tools("demo", ["echo"])
        finally:
            cluster.mcpctl_result("server", "rm", lone)
            cluster.mcpctl_result("server", "rm", spare)


@pytest.mark.parametrize("mode", MODES)
def test_a_burst_of_list_changes_reaches_a_client_as_one_and_a_last_one(cluster, mode):
    """The demo server announces five tool-list changes at once (five concurrent calls of
    `test_trigger_tool_change`). A client listening on its endpoint is told at once, and once
    more when the burst's window closes, after the last change; the node counts the ones it
    held (`mcpd_mcp_list_changes_coalesced_total`)."""
    url = cluster.url(1, "demo")

    def coalesced() -> float:
        return cluster.metric("mcpd_mcp_list_changes_coalesced_total", "", 1) or 0

    async def scenario():
        async with listening(cluster, mode, 1, url) as (c, next_change):
            before = coalesced()
            async with client(url, cluster.token, "legacy") as demo:
                await asyncio.gather(*(demo.call_tool("test_trigger_tool_change", {}) for _ in range(5)))
            for which in ("the first", "the last, after the burst"):
                try:
                    await asyncio.wait_for(next_change(), TOLD_WITHIN)
                except TimeoutError:
                    raise AssertionError(f"not told {which}") from None
            await asyncio.to_thread(wait_until, lambda: coalesced() > before or None, 10,
                                    "the node counting the announcements it held")

    run(scenario())
