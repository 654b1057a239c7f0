"""Remote MCP servers behind the cluster: servers that run elsewhere and speak Streamable HTTP,
registered with `mcpctl server add NAME --url URL`. Every node connects to them; clients reach
them as they reach stdio servers, through `/mcp` (names `server__tool`) and
`/servers/{name}/mcp`, in both protocol eras.

The upstreams are real: a server written with the Python SDK (`servers/remote_tools.py`, an
API key required), which speaks 2026-07-28 (so each node speaks that to it), and the same
server in its sessions-only mode (2025-11-25, as a server of the older SDKs);
`@modelcontextprotocol/server-everything` in its streamableHttp mode and in its legacy HTTP+SSE
(`sse`) mode; and a node's own `/servers/demo/mcp`, a 2026-07-28 upstream whose questions
(elicitation) come back as `input_required` results. They listen on loopback ports the tests pick, and are stopped whatever
happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcp.shared.subscriptions import ToolsListChanged

from conftest import NODE22, NPM, VENV_BIN, Cluster, own_server_as_remote
from cutting_proxy import CuttingProxy
from upstreams import Upstream, free_port, serving
from helpers import (MODES, accepting, await_until, client, protocols, run, stateless_tool_names, text_of,
                     wait_until)

HERE = Path(__file__).resolve().parent
KEY = f"key-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def sdk_upstream():
    port = free_port()
    argv = [str(VENV_BIN / "python"), str(HERE / "servers/remote_tools.py"), str(port), KEY]
    yield from serving(Upstream(argv, port))


@pytest.fixture(scope="module")
def sdk_legacy_upstream():
    """The SDK server answering only the session-based revisions."""
    port = free_port()
    argv = [str(VENV_BIN / "python"), str(HERE / "servers/remote_tools.py"), str(port), KEY, "--sessions-only"]
    yield from serving(Upstream(argv, port))


@pytest.fixture(scope="module")
def sdk_resumable_upstream():
    """The SDK server in the session-based revisions, with an event store: its SSE events
    have ids, and a lost stream is resumed with `Last-Event-ID`."""
    port = free_port()
    argv = [str(VENV_BIN / "python"), str(HERE / "servers/remote_tools.py"), str(port), KEY,
            "--sessions-only", "--resumable"]
    yield from serving(Upstream(argv, port))


@pytest.fixture(scope="module")
def everything_upstream():
    port = free_port()
    argv = [str(NODE22), str(NPM / "@modelcontextprotocol/server-everything/dist/index.js"), "streamableHttp"]
    yield from serving(Upstream(argv, port, env={"PORT": str(port)}))


@pytest.fixture(scope="module")
def everything_sse_upstream():
    """server-everything in its `sse` mode: the legacy HTTP+SSE transport (GET /sse, then
    POSTs to the endpoint it names)."""
    port = free_port()
    argv = [str(NODE22), str(NPM / "@modelcontextprotocol/server-everything/dist/index.js"), "sse"]
    up = Upstream(argv, port, env={"PORT": str(port)})
    up.path = "/sse"
    yield from serving(up)


@pytest.fixture(scope="module")
def remote(cluster: Cluster, sdk_upstream: Upstream) -> Iterator[str]:
    """The SDK server, registered with its API key as a (sealed) header."""
    name = "remote"
    cluster.mcpctl("server", "add", name, "--url", sdk_upstream.url, "--header", f"X-Api-Key={KEY}")
    try:
        cluster.wait_tools(name, ["echo", "add", "count"])
        yield name
    finally:
        cluster.mcpctl("server", "rm", name)


@pytest.fixture(scope="module")
def remote_legacy(cluster: Cluster, sdk_legacy_upstream: Upstream) -> Iterator[str]:
    name = "remote-legacy"
    cluster.mcpctl("server", "add", name, "--url", sdk_legacy_upstream.url, "--header", f"X-Api-Key={KEY}")
    try:
        cluster.wait_tools(name, ["echo", "add", "count"])
        yield name
    finally:
        cluster.mcpctl("server", "rm", name)


def test_a_remote_server_is_registered_with_its_headers_sealed(cluster, remote):
    shown = json.loads(cluster.mcpctl("server", "get", remote, "-o", "json"))
    assert shown["spec"]["url"].startswith("http://127.0.0.1:")
    assert shown["spec"]["headers"] == {"X-Api-Key": "<redacted>"}
    assert "command" not in shown["spec"] or not shown["spec"]["command"]
    # The key reached the server (it answers nothing without it): its tools are listed.
    table = cluster.mcpctl("server", "list")
    assert shown["spec"]["url"] in table
    # `server status` says how each node reaches it.
    status = json.loads(cluster.mcpctl("server", "status", remote, "-o", "json"))
    transports = {d.get("transport") for r in status["replicas"] for d in r["details"]}
    assert transports == {"http"}, status
    # Its pool's metrics say it is remote, beside the stdio servers'.
    for node in range(cluster.nodes):
        ready = cluster.metric("mcpd_pool_processes", f'server="{remote}",transport="remote",state="ready"', node)
        assert ready and ready >= 1, node


@pytest.mark.parametrize("mode", MODES)
def test_a_remote_server_answers_on_both_endpoints_in_both_eras(cluster, remote, mode):
    text = f"over http {uuid.uuid4().hex}"

    async def scenario():
        for node in range(cluster.nodes):
            async with client(cluster.url(node), cluster.token, mode) as c:
                tools = {t.name for t in (await c.list_tools()).tools}
                assert {"remote__echo", "remote__add", "time__get_current_time"} <= tools
                assert text_of(await c.call_tool("remote__echo", {"text": text})) == text
            async with client(cluster.url(node, remote), cluster.token, mode) as c:
                assert text_of(await c.call_tool("add", {"a": 40, "b": 2})) == "42"

    run(scenario())


def test_each_node_speaks_the_newest_revision_each_remote_server_speaks(cluster, remote, remote_legacy):
    assert protocols(cluster, remote) == {"2026-07-28"}
    assert protocols(cluster, remote_legacy) == {"2025-11-25"}

    # Both eras of client are served by both, on both endpoints: the node translates.
    async def scenario():
        for mode in MODES:
            for server in (remote, remote_legacy):
                async with client(cluster.url(1, server), cluster.token, mode) as c:
                    assert text_of(await c.call_tool("add", {"a": 40, "b": 2})) == "42"
                async with client(cluster.url(2), cluster.token, mode) as c:
                    assert text_of(await c.call_tool(f"{server}__echo", {"text": mode})) == mode

    run(scenario())


def test_a_2026_remote_server_that_restarts_is_reached_again_without_an_error(cluster, remote, sdk_upstream):
    async def count(node: int) -> int:
        async with client(cluster.url(node, remote), cluster.token, "legacy") as c:
            return int(text_of(await c.call_tool("count", {})))

    assert run(count(0)) >= 1
    # No session to lose: each request stands alone, so the new process just answers.
    sdk_upstream.restart()
    after = [run(count(node)) for node in range(cluster.nodes)]
    assert after == [1, 2, 3], f"the calls did not reach the restarted server: {after}"


def test_a_remote_server_that_restarts_is_reached_again_without_an_error(
    cluster, remote_legacy, sdk_legacy_upstream
):
    remote, sdk_upstream = remote_legacy, sdk_legacy_upstream

    async def count(node: int) -> int:
        async with client(cluster.url(node, remote), cluster.token, "legacy") as c:
            return int(text_of(await c.call_tool("count", {})))

    def renewed() -> float:
        series = ("mcpd_upstream_sessions_renewed_total", f'server="{remote}"')
        return sum(cluster.metric(*series, node=n) or 0 for n in range(cluster.nodes))

    assert run(count(0)) >= 1
    before = renewed()
    # The new process knows none of the sessions the nodes opened: a node's next call meets a
    # 404, opens a new session and sends the call again; the client sees only the answer.
    sdk_upstream.restart()
    after = [run(count(node)) for node in range(cluster.nodes)]
    assert after[0] == 1, f"the calls did not reach the restarted server: {after}"
    assert after == sorted(after), after
    assert renewed() > before, "no node renewed its session with the restarted server"


@pytest.mark.parametrize(
    ("upstream", "name"),
    [("everything_upstream", "everything-http"), ("everything_sse_upstream", "everything-sse")],
)
def test_server_everything_answers_through_the_cluster_over_either_http_transport(
    cluster, request, upstream, name
):
    """Streamable HTTP, and the legacy HTTP+SSE transport, which a node falls back to when the
    server refuses the Streamable HTTP `initialize`."""
    up = request.getfixturevalue(upstream)
    cluster.mcpctl("server", "add", name, "--url", up.url, "--pool-size", "1")
    cluster.wait_tools(name, ["echo", "get-sum"])
    payload = f"hello {uuid.uuid4().hex}"

    async def scenario():
        for mode in MODES:
            for url, tool in ((cluster.url(1), f"{name}__"), (cluster.url(0, name), "")):
                async with client(url, cluster.token, mode) as c:
                    got = text_of(await c.call_tool(f"{tool}echo", {"message": payload}))
                    assert got == f"Echo: {payload}"
                    got = text_of(await c.call_tool(f"{tool}get-sum", {"a": 2, "b": 40}))
                    assert got == "The sum of 2 and 40 is 42."

    try:
        run(scenario())
    finally:
        cluster.mcpctl("server", "rm", name)


def test_a_call_whose_stream_breaks_off_is_resumed_from_the_last_event_the_node_got(cluster, sdk_resumable_upstream):
    """The SDK server gives its SSE events ids (its event store). When the connection that
    carries a call's stream breaks mid-call, the node asks for the rest with `Last-Event-ID`:
    the client gets every progress notification once and the answer, as if nothing had
    happened. Without the resume the call fails as one that may or may not have run.

    (server-everything's own event store cannot be used: its replay returns an event id where
    the SDK expects the stream's, so a resumed stream never gets the rest of its events.)"""
    proxy = CuttingProxy(sdk_resumable_upstream.port)
    name = "remote-cut"
    cluster.mcpctl("server", "add", name, "--url", proxy.url("/mcp"), "--header", f"X-Api-Key={KEY}",
                   "--pool-size", "1")

    def resumed() -> float:
        labels = f'server="{name}",outcome="resumed"'
        return cluster.metric("mcpd_remote_stream_resumptions_total", labels, node=0) or 0

    async def scenario():
        seen: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(progress)
            if len(seen) == 2:
                proxy.cut()

        async with client(cluster.url(0, name), cluster.token, "legacy") as c:
            r = await c.call_tool("steps", {"n": 6, "pause_ms": 300}, progress_callback=on_progress)
            assert text_of(r) == "6 steps done", text_of(r)

            async def all_steps() -> bool:
                # The SDK may run the last progress callback just after handing over the result.
                return len(seen) >= 6

            await await_until(all_steps, 5, "6 progress notifications")
            assert seen == [1, 2, 3, 4, 5, 6], seen
        assert proxy.cuts == 1

    try:
        cluster.wait_tools(name, ["steps"])
        before = resumed()
        run(scenario())
        assert resumed() > before
    finally:
        cluster.mcpctl("server", "rm", name)
        proxy.close()


def test_a_remote_server_that_is_down_is_answered_by_its_fallback(cluster, remote):
    name = "remote-down"
    cluster.mcpctl(
        "server", "add", name, "--url", f"http://127.0.0.1:{free_port()}/mcp",
        "--fallback", remote, "--request-timeout-ms", "3000",
    )

    async def scenario():
        async with client(cluster.url(2), cluster.token, "legacy") as c:
            r = await c.call_tool(f"{name}__echo", {"text": "via the fallback"})
            assert text_of(r) == "via the fallback"
            meta = (r.meta or {}).get("io.mcpcp/fallback", {})
            assert meta.get("fallback") == remote, r

    try:
        run(scenario())
    finally:
        cluster.mcpctl("server", "rm", name)


def test_a_server_that_is_down_does_not_hold_up_the_aggregate_list(cluster):
    """A remote server no node can reach: once each node's first start of it failed, the
    aggregate `/mcp` list answers at once with the other servers' tools, well inside a 5 s
    client timeout, instead of waiting up to 10 s on every list for a process that is not
    coming."""
    name = f"down-{uuid.uuid4().hex[:6]}"
    cluster.mcpctl("server", "add", name, "--url", f"http://127.0.0.1:{free_port()}/mcp")

    def state(node: int, s: str) -> float:
        return cluster.metric("mcpd_pool_processes", f'server="{name}",transport="remote",state="{s}"', node) or 0

    try:
        for node in range(cluster.nodes):
            wait_until(lambda: state(node, "starting") == 0 and state(node, "restarting") + state(node, "crash_loop") > 0,
                       60, f"node {node} failed its first start of {name}")
        for node in range(cluster.nodes):
            listed = stateless_tool_names(cluster.url(node), cluster.token, timeout=5)
            assert "time__get_current_time" in listed, listed
    finally:
        cluster.mcpctl("server", "rm", name)


@pytest.fixture(scope="module")
def remote_asks(cluster: Cluster) -> str:
    """The demo server, whose tools ask their client for input (`input_required`)."""
    yield from own_server_as_remote(cluster, "remote-asks", "demo", "test_input_required_result_elicitation")


@pytest.mark.parametrize("mode", MODES)
def test_a_2026_remote_servers_questions_reach_the_client_of_either_era(cluster, remote_asks, mode):
    """The server's `input_required` round: its question reaches a 2025 client as an
    elicitation request on its stream, a 2026 client in an `input_required` of its own, and
    the answer goes back with the server's requestState."""
    assert protocols(cluster, remote_asks) == {"2026-07-28"}
    who = f"Ada {uuid.uuid4().hex[:8]}"
    asked: list[str] = []

    elicitation = accepting({"name": who}, asked)

    async def scenario():
        async with client(cluster.url(1, remote_asks), cluster.token, mode, elicitation_callback=elicitation) as c:
            r = await c.call_tool("test_input_required_result_elicitation", {})
            assert not r.is_error, text_of(r)
            assert text_of(r) == f"Hello, {who}!"
        assert asked == ["What is your name?"]

    def rounds() -> float:
        return sum(cluster.metric("mcpd_upstream_input_required_total", f'server="{remote_asks}"', n) or 0
                   for n in range(cluster.nodes))

    def parked_or_expired() -> float:
        """Calls parked on node 1 now, plus those that expired there (earlier tests' calls
        may expire meanwhile: the sum stays)."""
        return sum(cluster.metric(name, "", 0) or 0
                   for name in ("mcpd_mcp_parked_calls", "mcpd_mcp_parked_calls_expired_total"))

    before, parked_before = rounds(), parked_or_expired()
    run(scenario())
    assert rounds() == before + 1, "one round of questions"
    # The upstream's call was resumed with its requestState, not started again and left parked.
    assert parked_or_expired() == parked_before


def test_a_2026_remote_servers_list_changes_reach_the_clients(cluster, remote_asks):
    """The server (node 1's demo, behind its 2026 front) announces a change of its tool list on
    the `subscriptions/listen` stream node 2 keeps open with it; a client listening on node 2
    hears it."""

    async def scenario():
        async with client(cluster.url(1, remote_asks), cluster.token, "2026-07-28") as c:
            async with c.listen(tools_list_changed=True) as sub:
                await c.call_tool("test_trigger_tool_change", {})
                event = await asyncio.wait_for(anext(sub), 20)
                assert isinstance(event, ToolsListChanged), event

    run(scenario())


WATCHED = "demo://resource/dynamic/text/1"


@pytest.fixture(scope="module")
def remote_everything(cluster: Cluster) -> str:
    """server-everything (over stdio behind the node), whose resources change."""
    yield from own_server_as_remote(cluster, "remote-everything", "everything", "toggle-subscriber-updates")


@pytest.fixture(scope="module")
def remote_demodbg(cluster: Cluster) -> str:
    """The demo server whose processes log the cancellations they receive."""
    yield from own_server_as_remote(cluster, "remote-demodbg", "demodbg", "sleep")


@pytest.mark.parametrize("mode", MODES)
def test_a_subscription_through_a_2026_remote_server_delivers_its_updates(cluster, remote_everything, mode):
    """A 2025 client's resources/subscribe (a 2026 client's listen) to a 2026 upstream is
    asked for on the listen stream the node keeps with it; the updates come back on it."""
    assert protocols(cluster, remote_everything) == {"2026-07-28"}
    url = cluster.url(1, remote_everything)

    async def updates_on(c) -> None:
        for _ in range(2):
            if text_of(await c.call_tool("toggle-subscriber-updates", {})).startswith("Started"):
                return
        raise AssertionError("server-everything did not start its simulated updates")

    async def scenario():
        if mode == "2026-07-28":
            async with client(url, cluster.token, mode) as c:
                async with c.listen(resource_subscriptions=[WATCHED]) as sub:
                    assert sub.honored.resource_subscriptions == [WATCHED]
                    await updates_on(c)
                    event = await asyncio.wait_for(anext(sub), 20)
                    assert event.uri == WATCHED
            return
        updated = asyncio.Event()

        async def on_message(m) -> None:
            if getattr(m, "method", None) == "notifications/resources/updated" and m.params.uri == WATCHED:
                updated.set()

        async with client(url, cluster.token, mode, message_handler=on_message) as c:
            await c.subscribe_resource(WATCHED)
            await updates_on(c)
            await asyncio.wait_for(updated.wait(), 20)
            await c.unsubscribe_resource(WATCHED)

    run(scenario())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("level", "expected"), [
    ("info", ["Tool execution started", "Tool processing data", "Tool execution completed"]),
    ("error", []),
])
def test_a_2026_remote_servers_log_lines_reach_the_client_of_either_era_at_its_level(
    cluster, remote_asks, mode, level, expected
):
    """The caller's own level goes to the upstream (a 2026 client's opt-in, a 2025 client's
    logging/setLevel): the info lines of the demo's logging tool come at `info`, none at
    `error`."""
    lines: list[str] = []

    async def on_log(params) -> None:
        lines.append(str(params.data))

    async def scenario():
        async with client(cluster.url(1, remote_asks), cluster.token, mode, logging_callback=on_log,
                          log_level=level) as c:
            if mode != "2026-07-28":
                await c.set_logging_level(level)
            r = await c.call_tool("test_logging_tool", {})
            assert not r.is_error, text_of(r)

    run(scenario())
    assert lines == expected, lines


@pytest.mark.parametrize("mode", MODES)
def test_a_call_to_a_2026_remote_server_reports_progress_and_is_cancelled_upstream(cluster, remote_demodbg, mode):
    """Progress comes back on the call's stream; a client that cancels closes it, and the
    cancellation reaches the server behind the 2026 upstream (node 1's demodbg logs it)."""
    def cancellations() -> int:
        return cluster.log(0).count("request cancelled by the client")

    before = cancellations()

    async def scenario():
        started = asyncio.Event()

        async def on_progress(progress, total, message) -> None:
            started.set()

        async with client(cluster.url(1, remote_demodbg), cluster.token, mode) as c:
            call = asyncio.create_task(
                c.call_tool("sleep", {"ms": 60_000, "steps": 60}, progress_callback=on_progress)
            )
            await asyncio.wait_for(started.wait(), 20)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call

            async def cancelled_upstream() -> bool:
                return cancellations() > before

            await await_until(cancelled_upstream, 15, "the server behind the upstream logged the cancellation")
            assert text_of(await c.call_tool("echo", {"message": "still here"})) == "still here"

    run(scenario())
