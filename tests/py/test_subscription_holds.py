"""A session's subscriptions on a server that runs on another node: the session holds them from
the node that serves it, lets go when it ends or goes idle there, and takes them again when its
client comes back. And what makes a session idle: no request, no open stream, no call in flight
(a call whose client left does not count).

A 2-node cluster with a short session idle timeout runs server-everything on one node (the
host); the clients talk to the other (the front), so every subscription is made through a peer.
What the host's process holds is read from its `mcpd_pool_subscriptions{server="everything"}`.
"""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest

from conftest import NODE22, NPM, Cluster, start_cluster
from helpers import answer_of, client, end_session, legacy_initialize, legacy_post, run, text_of, wait_until

IDLE_TIMEOUT_MS = 2000


@pytest.fixture(scope="module")
def holds(tmp_path_factory) -> tuple[Cluster, int, int]:
    """The cluster, the host (runs server-everything) and the front (the clients' node)."""
    config = tmp_path_factory.mktemp("holds-config") / "mcpd.toml"
    config.write_text(f"[mcp]\nsession_idle_timeout_ms = {IDLE_TIMEOUT_MS}\n")
    c = start_cluster(tmp_path_factory, "holds", 2, [f"--config={config}"])
    try:
        c.mcpctl("server", "add", "everything", "--replicas", "1", "--pool-size", "1", "--",
                 str(NODE22), str(NPM / "@modelcontextprotocol/server-everything/dist/index.js"), "stdio")
        status = wait_until(
            lambda: (s := json.loads(c.mcpctl("server", "status", "everything", "-o", "json")))["placement"] and s,
            60, "a placement for server-everything")
        host = status["placement"][0] - 1
        c.wait_tools("everything", ["toggle-subscriber-updates"])
        yield c, host, 1 - host
    finally:
        c.down()


def held(c: Cluster, host: int) -> float:
    """The URIs the host's server-everything process is subscribed to."""
    return c.metric("mcpd_pool_subscriptions", 'server="everything"', node=host) or 0


def expired(c: Cluster, node: int) -> float:
    return c.metric("mcpd_mcp_sessions_expired_total", "", node=node) or 0


def subscribe(url: str, token: str, sid: str, uri: str) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "resources/subscribe", "params": {"uri": uri}}
    r = legacy_post(url, token, body, session=sid)
    assert r.status_code == 200, r.text
    assert "result" in answer_of(r), r.text


def test_a_session_that_ends_withdraws_its_subscription_on_the_node_that_runs_the_server(holds):
    c, host, front = holds
    url = c.url(front, "everything")
    before = held(c, host)
    sid = legacy_initialize(url, c.token)
    subscribe(url, c.token, sid, "demo://resource/dynamic/text/11")
    assert held(c, host) == before + 1, "the host's process took the subscription"
    end_session(url, c.token, sid)
    wait_until(lambda: held(c, host) == before, 10, "the ended session's subscription withdrawn on the host")


def test_an_idle_session_lets_go_and_takes_its_subscription_again_when_its_client_comes_back(holds):
    """A session with its stream open (the SDK's client keeps a GET stream) is not idle, however
    long it sends nothing; one without (raw HTTP) is dropped from the front's memory, lets go,
    and takes its subscription again on its next request."""
    c, host, front = holds
    url = c.url(front, "everything")
    listened, raw_uri = "demo://resource/dynamic/text/12", "demo://resource/dynamic/text/13"
    before, expired_before = held(c, host), expired(c, front)

    async def scenario():
        updated = asyncio.Event()

        async def on_message(m) -> None:
            if getattr(m, "method", None) == "notifications/resources/updated" and m.params.uri == listened:
                updated.set()

        async with client(url, c.token, "legacy", message_handler=on_message) as listening:
            await listening.subscribe_resource(listened)
            # The raw session's last request comes after the listening session's: were the
            # listening one idle, it would be dropped first.
            sid = legacy_initialize(url, c.token)
            subscribe(url, c.token, sid, raw_uri)
            assert held(c, host) == before + 2

            wait_until(lambda: expired(c, front) > expired_before, 20, "the raw session dropped as idle")
            assert expired(c, front) == expired_before + 1, "only the session without a stream was idle"
            wait_until(lambda: held(c, host) == before + 1, 10, "the idle session let go of its subscription")

            # The listening session still hears its resource.
            for _ in range(2):
                if text_of(await listening.call_tool("toggle-subscriber-updates", {})).startswith("Started"):
                    break
            updated.clear()
            await asyncio.wait_for(updated.wait(), 20)

            # The raw session's client comes back: the session continues, holding again.
            ping = legacy_post(url, c.token, {"jsonrpc": "2.0", "id": 2, "method": "ping"}, session=sid)
            assert ping.status_code == 200, ping.text
            wait_until(lambda: held(c, host) == before + 2, 10, "the continued session's subscription taken again")
            end_session(url, c.token, sid)
            wait_until(lambda: held(c, host) == before + 1, 10, "the ended session's subscription withdrawn")

    run(scenario())
    wait_until(lambda: held(c, host) == before, 10, "the listening session's subscription withdrawn at its end")


def test_a_node_that_stops_lets_go_of_its_sessions_subscriptions_and_takes_them_again_after(holds):
    """A graceful stop of the front (SIGTERM, as `systemctl stop` sends) withdraws what its
    sessions held on the host; the session, continued on the front once it is back, holds
    again."""
    c, host, front = holds
    url = c.url(front, "everything")
    before = held(c, host)
    sid = legacy_initialize(url, c.token)
    subscribe(url, c.token, sid, "demo://resource/dynamic/text/14")
    assert held(c, host) == before + 1
    c.stop(front)
    wait_until(lambda: held(c, host) == before, 10, "the stopped node's session let go on the host")
    c.restart(front)
    ping = legacy_post(url, c.token, {"jsonrpc": "2.0", "id": 2, "method": "ping"}, session=sid)
    assert ping.status_code == 200, ping.text
    wait_until(lambda: held(c, host) == before + 1, 10, "the continued session's subscription taken again")
    end_session(url, c.token, sid)
    wait_until(lambda: held(c, host) == before, 10, "the ended session's subscription withdrawn")


def test_a_session_whose_client_left_in_the_middle_of_a_call_still_goes_idle(holds):
    """The client gives up on a minute-long call and closes its connection: the call is no
    longer in flight, so the session is dropped once idle (it used to stay, counted against
    the tenant's sessions, until the node restarted)."""
    c, _, front = holds
    url = c.url(front, "demo")
    expired_before = expired(c, front)
    sid = legacy_initialize(url, c.token)
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "sleep", "arguments": {"ms": 60000}}}
    headers = {"Authorization": f"Bearer {c.token}", "Content-Type": "application/json",
               "Accept": "application/json, text/event-stream", "Mcp-Session-Id": sid,
               "MCP-Protocol-Version": "2025-11-25"}
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(url, json=call, headers=headers, timeout=1)
    wait_until(lambda: expired(c, front) > expired_before, 20, "the session dropped as idle once its client left")
