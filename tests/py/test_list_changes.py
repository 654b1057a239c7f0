"""What an operator changes reaches the lists of clients already connected: a client of `/mcp`
is told (`notifications/tools/list_changed`, on its session's stream or on its 2026-07-28
`subscriptions/listen` stream) when a server is added or removed, and when a server that was
still on its first start when it listed comes up. A list waits for a starting server only
`[route] list_wait_ms` (3 s by default), not for its whole start.

A client here does what a real one does with the notification: it lists again. Each test
waits for notifications with a deadline; a client that is never told fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from mcp import Client
from mcp.shared.subscriptions import ToolsListChanged

from conftest import MCPD, Cluster
from helpers import MODES, STATELESS, client, run, wait_until

TOLD_WITHIN = 30
"""How long a client waits to be told of a change (seconds)."""


@contextlib.asynccontextmanager
async def listening(cluster: Cluster, node: int, mode: str) -> AsyncIterator[tuple[Client, Callable[[], Awaitable[None]]]]:
    """A client of node `node`'s `/mcp` that hears its tool list's changes, and a way to wait
    for the next one. A session's client hears them on its GET stream, open once the node
    counts it; a 2026-07-28 client on its listen stream, open once acknowledged."""
    if mode == STATELESS:
        async with client(cluster.url(node), cluster.token, mode) as c:
            async with c.listen(tools_list_changed=True) as sub:

                async def next_change() -> None:
                    while not isinstance(await anext(sub), ToolsListChanged):
                        pass

                yield c, next_change
        return
    changes: asyncio.Queue[None] = asyncio.Queue()

    async def on_message(m) -> None:
        if getattr(m, "method", None) == "notifications/tools/list_changed":
            changes.put_nowait(None)

    def streams() -> float:
        return cluster.metric("mcpd_mcp_session_streams", "", node) or 0

    before = streams()
    async with client(cluster.url(node), cluster.token, mode, message_handler=on_message) as c:
        await asyncio.to_thread(wait_until, lambda: streams() > before, 20, "the session's GET stream open")
        yield c, changes.get


async def relist_until(c: Client, next_change: Callable[[], Awaitable[None]], tool: str, listed: bool) -> None:
    """Lists again at each change the client is told of, until `tool` is (or is no longer)
    listed; fails when the client is not told of another change within TOLD_WITHIN."""
    for _ in range(20):
        try:
            await asyncio.wait_for(next_change(), TOLD_WITHIN)
        except TimeoutError:
            raise AssertionError(f"not told of a change that {'lists' if listed else 'drops'} {tool}") from None
        names = {t.name for t in (await c.list_tools()).tools}
        if (tool in names) == listed:
            return
    raise AssertionError(f"20 changes told, and {tool} still {'not ' if listed else ''}listed")


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
        async with listening(cluster, 1, mode) as (c, next_change):
            assert tool not in {t.name for t in (await c.list_tools()).tools}
            await asyncio.to_thread(cluster.add_server, name, [MCPD, "demo-server"], pool_size=1)
            await relist_until(c, next_change, tool, listed=True)

    async def removed():
        async with listening(cluster, 1, mode) as (c, next_change):
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
    """A server whose first start takes 10 s (longer than `list_wait_ms`) is added with one
    replica. Clients of its own node and of another node list while it starts: the lists are
    answered without it (its own node waited `list_wait_ms` for it, and counted that it gave
    up). Both clients, listening from then on, are told when it comes up (its first catalogue;
    the other node hears it from the server's node), and then list its tools."""
    name = f"slow-{uuid.uuid4().hex[:6]}"
    tool = f"{name}__echo"
    cluster.mcpctl("server", "add", name, "--replicas", "1", "--pool-size", "1", "--",
                   "sh", "-c", f"sleep 10; exec {MCPD} demo-server")
    try:
        placed = wait_until(
            lambda: json.loads(cluster.mcpctl("server", "status", name, "-o", "json"))["placement"],
            30, f"a placement for {name}")
        home = placed[0] - 1
        other = (home + 1) % cluster.nodes

        def gave_up() -> float:
            return cluster.metric("mcpd_route_list_waits_total", 'outcome="gave_up"', home) or 0

        async def scenario():
            async with listening(cluster, home, mode) as (at_home, home_change), \
                    listening(cluster, other, mode) as (elsewhere, other_change):
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
