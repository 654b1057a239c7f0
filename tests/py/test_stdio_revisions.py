"""Each stdio server is spoken to in the newest revision it speaks. When a node starts a
server process it writes a `server/discover` of 2026-07-28 and an `initialize` together: a
server of that revision answers the first, an earlier one the second.

- `mcp-server-time` and `mcp-server-git` (PyPI, on the SDK's 2.x line) speak 2026-07-28, and
  so do `servers/questions.py`, an SDK server whose tools ask the client for input, and the
  node's own demo server: their questions come back as `input_required` results, each keyed
  to its own request, so they reach the right client even while several sessions share the
  one process.
- server-everything speaks only the session revisions (2025-11-25).
- A 2026-07-28 server that announces list changes (the SDK's `MCPServer` by default) sends
  them only on a `subscriptions/listen` request: the node asks for one at the start, and holds
  one open on the process while it lives. A server that refuses it (`servers/nolisten.py`)
  is spoken to in a 2025-11-25 session instead, where its list changes are heard.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path

import pytest

import mcp.types as types
from mcp import MCPError

from conftest import VENV_BIN, Cluster
from helpers import MODES, STATELESS, accepting, await_until, client, protocols, run, stateless_post, text_of, wait_until

HERE = Path(__file__).resolve().parent
QUESTIONS = HERE / "servers/questions.py"
RUGPULL = HERE / "servers/rugpull.py"
STRICT = HERE / "servers/strict.py"
NOLISTEN = HERE / "servers/nolisten.py"


@pytest.fixture(scope="module")
def questions(cluster: Cluster):
    """`servers/questions.py` on every node, one shared process each."""
    name = "questions"
    cluster.mcpctl("server", "add", name, "--pool-size", "1", "--", str(VENV_BIN / "python"), str(QUESTIONS))
    try:
        cluster.wait_tools(name, ["greet", "capabilities", "echo"])
        yield name
    finally:
        cluster.mcpctl("server", "rm", name)


def revision_restarts(cluster: Cluster, server: str, reason: str) -> float:
    """Processes of `server` the nodes started again to speak another revision, for `reason`."""
    series = ("mcpd_pool_revision_restarts_total", f'server="{server}",reason="{reason}"')
    return sum(cluster.metric(*series, node=n) or 0 for n in range(cluster.nodes))


def slot_on_node_1(cluster: Cluster, server: str) -> dict:
    """The one process slot of `server` on node 1 (`mcpctl server status`)."""
    status = json.loads(cluster.mcpctl("server", "status", server, "-o", "json"))
    return next(d for r in status["replicas"] if r["node"] == 1 for d in r["details"])


def kill_and_await_replacement(cluster: Cluster, server: str) -> dict:
    """kill -9 of node 1's process of `server`; its slot once a new process is ready."""
    killed = slot_on_node_1(cluster, server)["pid"]
    os.kill(killed, signal.SIGKILL)
    return wait_until(
        lambda: (s := slot_on_node_1(cluster, server))["state"] == "ready" and s["pid"] not in (None, killed) and s,
        30, f"the killed process of {server} replaced")


def rounds(cluster: Cluster, server: str) -> float:
    """Rounds of questions the nodes passed on for `server`."""
    series = ("mcpd_upstream_input_required_total", f'server="{server}"')
    return sum(cluster.metric(*series, node=n) or 0 for n in range(cluster.nodes))


def test_each_stdio_server_is_spoken_to_in_the_newest_revision_it_speaks(cluster, questions):
    assert protocols(cluster, "time") == {STATELESS}
    assert protocols(cluster, "git") == {STATELESS}
    assert protocols(cluster, questions) == {STATELESS}
    assert protocols(cluster, "demo") == {STATELESS}
    assert protocols(cluster, "everything") == {"2025-11-25"}

    # Clients of either era are served by both kinds, on both endpoints.
    async def scenario():
        for mode in MODES:
            for node in range(cluster.nodes):
                async with client(cluster.url(node), cluster.token, mode) as c:
                    r = await c.call_tool("time__get_current_time", {"timezone": "UTC"})
                    assert not r.is_error and '"timezone": "UTC"' in text_of(r), text_of(r)
                    assert text_of(await c.call_tool("demo__echo", {"message": mode})) == mode
                async with client(cluster.url(node, questions), cluster.token, mode) as c:
                    assert text_of(await c.call_tool("echo", {"text": mode})) == mode

    run(scenario())


def test_a_2026_server_that_announces_list_changes_is_heard_on_the_listen_the_node_holds(cluster):
    """An SDK server that announces list changes is spoken to in 2026-07-28 on its first
    process, and the node holds a `subscriptions/listen` open on its pipe: a tool list change
    it sends on that stream only (`RUGPULL_ANNOUNCE=listen`) reaches the node, which reloads
    the server's tools for its clients. The same after a kill -9: the new process is listened
    to again."""
    name = f"rugpull-{uuid.uuid4().hex[:6]}"
    cluster.mcpctl("server", "add", name, "--pool-size", "1", "--replicas", "1", "--env", "RUGPULL_ANNOUNCE=listen",
                   "--", str(VENV_BIN / "python"), str(RUGPULL))

    async def pull_and_see_upload(node: int) -> None:
        async with client(cluster.url(node), cluster.token, "legacy") as c:
            assert text_of(await c.call_tool(f"{name}__forecast", {"city": "Oslo"})) == "sunny in Oslo"
            assert text_of(await c.call_tool(f"{name}__rug_pull", {})) == "pulled"
            # The aggregate catalogue is reloaded only when the server says its list changed.
            await tools_include(c, f"{name}__upload")

    try:
        cluster.wait_tools(name, ["forecast", "rug_pull"])
        assert protocols(cluster, name) == {STATELESS}
        assert revision_restarts(cluster, name, "announces_changes") == 0, "spoken to as it was started"
        run(pull_and_see_upload(slot_node(cluster, name)))
    finally:
        cluster.mcpctl("server", "rm", name)


@pytest.mark.parametrize("one_era", [False, True], ids=["same-process", "started-again"])
def test_a_2026_server_that_refuses_a_listen_is_spoken_to_in_a_session(cluster, one_era):
    """`servers/nolisten.py` announces list changes but refuses `subscriptions/listen`: the
    node keeps the process in the session it also accepted, or, when it refused that session
    after its discovery (`NOLISTEN_ONE_ERA`), starts it again for one and remembers. Either
    way its session-era list change reaches the node."""
    name = f"nolisten-{uuid.uuid4().hex[:6]}"
    env = ["--env", "NOLISTEN_ONE_ERA=1"] if one_era else []
    cluster.mcpctl("server", "add", name, "--pool-size", "1", "--replicas", "1", *env,
                   "--", str(VENV_BIN / "python"), str(NOLISTEN))
    try:
        cluster.wait_tools(name, ["echo", "grow"])
        assert protocols(cluster, name) == {"2025-11-25"}
        restarts = revision_restarts(cluster, name, "announces_changes")
        assert restarts == (1 if one_era else 0), restarts

        async def grow(node: int) -> None:
            async with client(cluster.url(node), cluster.token, STATELESS) as c:
                assert text_of(await c.call_tool(f"{name}__grow", {})) == "grown"
                await tools_include(c, f"{name}__extra")

        run(grow(slot_node(cluster, name)))
    finally:
        cluster.mcpctl("server", "rm", name)


async def tools_include(c, tool: str) -> None:
    """Waits until `tool` is in the client's tool list (the node reloads its aggregate catalogue
    on a list change)."""

    async def listed() -> list[str] | None:
        names = [t.name for t in (await c.list_tools()).tools]
        return names if tool in names else None

    await await_until(listed, 30, f"{tool} listed")


def slot_node(cluster: Cluster, server: str) -> int:
    """The index of the node that runs `server`'s one replica."""
    status = json.loads(cluster.mcpctl("server", "status", server, "-o", "json"))
    [replica] = [r for r in status["replicas"] if r["details"]]
    return replica["node"] - 1


@pytest.mark.parametrize("mode", MODES)
def test_a_2026_stdio_servers_questions_reach_the_client_of_either_era(cluster, questions, mode):
    """The server's `input_required` round: its question reaches a 2025 client as an
    elicitation request on its stream, a 2026 client in an `input_required` of its own, and
    the answer goes back to the server with its requestState."""
    who = f"Ada {uuid.uuid4().hex[:8]}"
    asked: list[str] = []

    elicitation = accepting({"name": who}, asked)

    async def scenario():
        async with client(cluster.url(2, questions), cluster.token, mode, elicitation_callback=elicitation) as c:
            r = await c.call_tool("greet", {})
            assert not r.is_error, text_of(r)
            assert text_of(r) == f"Hello, {who}!"

    before = rounds(cluster, questions)
    run(scenario())
    assert asked == ["What is your name?"]
    assert rounds(cluster, questions) == before + 1, "one round of questions"


def test_the_questions_of_sessions_sharing_one_process_each_reach_their_own_client(cluster, questions):
    """Two 2025 sessions call `greet` at once on node 1, whose one process serves both. Each
    question is part of its own request's result, so each reaches its own client: neither
    waits on the other, and nothing is refused as unattributable (a 2025 server's question,
    a request on the shared pipe, could belong to either session)."""
    names = [f"Ada {uuid.uuid4().hex[:6]}", f"Grace {uuid.uuid4().hex[:6]}"]
    asked = [asyncio.Event(), asyncio.Event()]

    def answering(i: int):
        async def elicitation(ctx, p) -> types.ElicitResult:
            asked[i].set()
            # Both calls are in flight on the process before either answers.
            await asyncio.wait_for(asked[1 - i].wait(), 30)
            return types.ElicitResult(action="accept", content={"name": names[i]})

        return elicitation

    async def greet(i: int) -> str:
        async with client(cluster.url(1, questions), cluster.token, "legacy", elicitation_callback=answering(i)) as c:
            r = await c.call_tool("greet", {})
            assert not r.is_error, text_of(r)
            return text_of(r)

    async def scenario():
        return await asyncio.gather(greet(0), greet(1))

    unattributable = ("mcpd_pool_unattributable_requests_total", f'server="{questions}"')
    before = cluster.metric(*unattributable, node=1) or 0
    assert run(scenario()) == [f"Hello, {names[0]}!", f"Hello, {names[1]}!"]
    assert (cluster.metric(*unattributable, node=1) or 0) == before


def test_a_2026_clients_own_capabilities_reach_the_stdio_server(cluster, questions):
    """The client's per-request capabilities are passed on: the server sees the ones its
    client declared, and refuses a call its client cannot answer (-32021, naming what it
    needs) instead of the gateway asking in its name."""

    async def elicitation(ctx, p) -> types.ElicitResult:
        return types.ElicitResult(action="decline")

    async def declared() -> str:
        async with client(cluster.url(0, questions), cluster.token, STATELESS, elicitation_callback=elicitation) as c:
            return text_of(await c.call_tool("capabilities", {}))

    # The client's own (elicitation only), not the gateway's (which include sampling).
    caps = json.loads(run(declared()))
    assert "elicitation" in caps and "sampling" not in caps, caps
    r = stateless_post(cluster.url(0, questions), cluster.token, "tools/call",
                       {"name": "greet", "arguments": {}}, name="greet")
    error = r.json()["error"]
    assert error["code"] == -32021, error
    assert "elicitation" in error["data"]["requiredCapabilities"], error

    # And through the SDK client that declares none.
    async def refused():
        async with client(cluster.url(0, questions), cluster.token, STATELESS) as c:
            with pytest.raises(MCPError) as e:
                await c.call_tool("greet", {})
            return e.value

    assert run(refused()).error.code == -32021


def test_a_server_that_exits_on_a_request_before_initialize_is_started_again_with_initialize_alone(cluster):
    """`servers/strict.py` exits when its first request is not `initialize` (as some SDKs'
    servers do): the probe ends it, the node starts it again with `initialize` alone and
    remembers, so a later process of the pool is spawned once."""
    name = f"strict-{uuid.uuid4().hex[:6]}"
    cluster.mcpctl("server", "add", name, "--pool-size", "1", "--", str(VENV_BIN / "python"), str(STRICT))
    try:
        cluster.wait_tools(name, ["echo"])
        assert protocols(cluster, name) == {"2025-11-25"}
        learned = revision_restarts(cluster, name, "probe_failed")
        assert learned >= cluster.nodes, "each node's first start probed and failed"
        assert not slot_on_node_1(cluster, name).get("last_exit"), \
            "the process the probe ended is not shown as the slot's exit"

        async def scenario():
            for mode in MODES:
                async with client(cluster.url(2, name), cluster.token, mode) as c:
                    assert text_of(await c.call_tool("echo", {"text": mode})) == mode

        run(scenario())
        replaced = kill_and_await_replacement(cluster, name)
        assert replaced["protocol"] == "2025-11-25"
        assert revision_restarts(cluster, name, "probe_failed") == learned, "no probe of the new process"
    finally:
        cluster.mcpctl("server", "rm", name)
