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
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest

from conftest import ROOT, VENV_BIN, Cluster, everything_on_one_node, mcpd_config, own_cluster, start_cluster
from helpers import answer_of, client, end_session, legacy_initialize, legacy_post, run, text_of, wait_until

IDLE_TIMEOUT_MS = 2000
SLOW_SUBSCRIBE = ROOT / "tests/py/servers/slow_subscribe.py"


@pytest.fixture(scope="module")
def holds(tmp_path_factory) -> tuple[Cluster, int, int]:
    """The cluster, the host (runs server-everything) and the front (the clients' node)."""
    config = mcpd_config(tmp_path_factory, "holds", f"[mcp]\nsession_idle_timeout_ms = {IDLE_TIMEOUT_MS}\n")
    with own_cluster(tmp_path_factory, "holds", 2, [config]) as c:
        host = everything_on_one_node(c)
        yield c, host, 1 - host


def held(c: Cluster, host: int) -> float:
    """The URIs the host's server-everything process is subscribed to."""
    return c.metric("mcpd_pool_subscriptions", 'server="everything"', node=host) or 0


def dropped(c: Cluster, host: int, reason: str) -> float:
    """The holds of departed nodes the host let go of, for `reason`."""
    return c.metric("mcpd_pool_subscription_holds_dropped_total",
                    f'server="everything",reason="{reason}"', node=host) or 0


def expired(c: Cluster, node: int) -> float:
    return c.metric("mcpd_mcp_sessions_expired_total", "", node=node) or 0


def subscribe(url: str, token: str, sid: str, uri: str) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "resources/subscribe", "params": {"uri": uri}}
    r = legacy_post(url, token, body, session=sid)
    assert r.status_code == 200, r.text
    assert "result" in answer_of(r), r.text


def subscribed_session(c: Cluster, host: int, url: str, uri: str) -> tuple[float, str]:
    """A session opened on `url` and subscribed to `uri`, which the host's process took: what
    the host held before, and the session."""
    before = held(c, host)
    sid = legacy_initialize(url, c.token)
    subscribe(url, c.token, sid, uri)
    assert held(c, host) == before + 1, "the host's process took the subscription"
    return before, sid


def continued_then_ended(c: Cluster, host: int, url: str, sid: str, before: float) -> None:
    """The session's client comes back: the session, continued, holds its subscription on the
    host again; ended, it lets go."""
    ping = legacy_post(url, c.token, {"jsonrpc": "2.0", "id": 2, "method": "ping"}, session=sid)
    assert ping.status_code == 200, ping.text
    wait_until(lambda: held(c, host) == before + 1, 10, "the continued session's subscription taken again")
    end_session(url, c.token, sid)
    wait_until(lambda: held(c, host) == before, 10, "the ended session's subscription withdrawn")


def test_a_session_that_ends_withdraws_its_subscription_on_the_node_that_runs_the_server(holds):
    c, host, front = holds
    url = c.url(front, "everything")
    before, sid = subscribed_session(c, host, url, "demo://resource/dynamic/text/11")
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
            continued_then_ended(c, host, url, sid, before + 1)

    run(scenario())
    wait_until(lambda: held(c, host) == before, 10, "the listening session's subscription withdrawn at its end")


def test_a_node_that_stops_lets_go_of_its_sessions_subscriptions_and_takes_them_again_after(holds):
    """A graceful stop of the front (SIGTERM, as `systemctl stop` sends) withdraws what its
    sessions held on the host; the session, continued on the front once it is back, holds
    again."""
    c, host, front = holds
    url = c.url(front, "everything")
    before, sid = subscribed_session(c, host, url, "demo://resource/dynamic/text/14")
    c.stop(front)
    wait_until(lambda: held(c, host) == before, 10, "the stopped node's session let go on the host")
    c.restart(front)
    continued_then_ended(c, host, url, sid, before)


def test_a_node_killed_without_stopping_has_its_holds_let_go_when_it_comes_back(holds):
    """kill -9 of the front lets go of nothing; once it is back, the host lets go of what its
    earlier run held (it used to keep them until the server's process ended), and the session,
    continued on the front, holds again."""
    c, host, front = holds
    url = c.url(front, "everything")
    dropped_before = dropped(c, host, "restarted")
    before, sid = subscribed_session(c, host, url, "demo://resource/dynamic/text/15")
    c.kill(front)
    c.restart(front)
    wait_until(lambda: held(c, host) == before, 20, "the host let go of the killed run's subscription")
    assert dropped(c, host, "restarted") == dropped_before + 1
    continued_then_ended(c, host, url, sid, before)


def test_a_node_removed_from_the_cluster_has_its_holds_let_go(tmp_path_factory):
    """The front dies and the operator removes it (`mcpctl cluster remove-node`) instead of
    bringing it back: the host lets go of what the front's sessions held (it used to keep them
    until the server's process ended)."""
    c = start_cluster(tmp_path_factory, "holds-removed", 3)
    try:
        host = everything_on_one_node(c)
        front, survivor = [n for n in range(3) if n != host]
        url = c.url(front, "everything")
        dropped_before = dropped(c, host, "removed")
        before, _ = subscribed_session(c, host, url, "demo://resource/dynamic/text/16")
        c.kill(front)
        c.mcpctl("cluster", "remove-node", str(front + 1), node=survivor)
        wait_until(lambda: held(c, host) == before, 20, "the host let go of the removed node's subscription")
        assert dropped(c, host, "removed") == dropped_before + 1
    finally:
        c.down()


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


def test_a_call_longer_than_the_idle_timeout_leaves_its_session_fresh(holds):
    """Idle time counts from a call's end, not its start: a session whose 3 s call ended a
    second ago is still in the front's memory (it used to be dropped at the next sweep, and
    let go of what that call had just kept)."""
    c, _, front = holds
    url = c.url(front, "demo")
    sid = legacy_initialize(url, c.token)

    def recovered() -> float:
        return c.metric("mcpd_mcp_sessions_recovered_total", "", node=front) or 0

    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "sleep", "arguments": {"ms": IDLE_TIMEOUT_MS + 1000}}}
    r = legacy_post(url, c.token, call, session=sid)
    assert "result" in answer_of(r), r.text
    before = recovered()
    time.sleep(IDLE_TIMEOUT_MS / 2000)  # the client thinks for half the idle timeout
    ping = legacy_post(url, c.token, {"jsonrpc": "2.0", "id": 4, "method": "ping"}, session=sid)
    assert ping.status_code == 200, ping.text
    assert recovered() == before, "the session was dropped as idle right after its long call"
    end_session(url, c.token, sid)


@contextlib.contextmanager
def slow_subscribe(c: Cluster, through: str, *options: str):
    """slow-subscribe on one node, and the node its client calls (the other one, or that one):
    yields that node, its URL for the server, and a reader of the URIs the server holds."""
    c.mcpctl("server", "add", "slow-subscribe", "--replicas", "1", "--pool-size", "1", *options,
             "--env", "SLOW_SUBSCRIBE_S=2", "--", str(VENV_BIN / "python"), str(SLOW_SUBSCRIBE))
    try:
        status = wait_until(
            lambda: (s := json.loads(c.mcpctl("server", "status", "slow-subscribe", "-o", "json")))["placement"] and s,
            60, "a placement for slow-subscribe")
        host = status["placement"][0] - 1
        front = 1 - host if through == "peer" else host
        url = c.url(front, "slow-subscribe")
        c.wait_tools("slow-subscribe", ["subscriptions"])

        def server_holds() -> list[str]:
            call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                    "params": {"name": "subscriptions", "arguments": {}}}
            r = legacy_post(url, c.token, call, session=legacy_initialize(url, c.token))
            return json.loads(answer_of(r)["result"]["content"][0]["text"])

        yield front, url, server_holds
    finally:
        c.mcpctl("server", "rm", "slow-subscribe")


def not_kept(c: Cluster, node: int, reason: str) -> float:
    """Subscribes a session did not keep, withdrawn by `node`."""
    return c.metric("mcpd_mcp_subscription_holds_total",
                    f'action="released",reason="{reason}",outcome="ok"', node=node) or 0


@pytest.mark.parametrize("gives_up", ["closes", "cancels"])
@pytest.mark.parametrize("through", ["peer", "host"])
def test_a_subscribe_whose_client_gave_up_after_the_server_took_it_is_withdrawn(holds, through, gives_up):
    """The server takes the subscription at once and answers 2 s later; the client gives up
    first: it closes its connection (the call goes on without it), or it cancels the request
    (the call is dropped, on the pool too). The session does not keep the URI, so the node it
    called withdraws what the server took, once the server's answer is in: through the peer
    that runs the server, or on its own pool (it used to stay on the server until its process
    ended)."""
    c, _, _ = holds
    with slow_subscribe(c, through) as (front, url, server_holds):
        reason = "abandoned" if gives_up == "closes" else "not_kept"

        def released() -> float:
            return not_kept(c, front, reason)

        uri, before = f"slow://resource/{through}-{gives_up}", released()
        sid = legacy_initialize(url, c.token)
        body = {"jsonrpc": "2.0", "id": 1, "method": "resources/subscribe", "params": {"uri": uri}}
        if gives_up == "closes":
            headers = {"Authorization": f"Bearer {c.token}", "Content-Type": "application/json",
                       "Accept": "application/json, text/event-stream", "Mcp-Session-Id": sid,
                       "MCP-Protocol-Version": "2025-11-25"}
            with pytest.raises(httpx2.ReadTimeout):
                httpx2.post(url, json=body, headers=headers, timeout=0.5)
            assert server_holds() == [uri], "the server took the subscription before it answered"
        else:
            with ThreadPoolExecutor(1) as pool:
                asked = pool.submit(legacy_post, url, c.token, body, session=sid)
                wait_until(lambda: server_holds() == [uri], 10, "the server took the subscription")
                cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
                assert legacy_post(url, c.token, cancel, session=sid).status_code == 202
                assert "error" in answer_of(asked.result()), "the cancelled subscribe is not answered as taken"
        wait_until(lambda: server_holds() == [], 15, "the subscription the session did not keep withdrawn on the server")
        assert released() == before + 1
        # The session lives on, without the URI: a client that subscribes again holds it.
        subscribe(url, c.token, sid, uri)
        assert server_holds() == [uri]
        end_session(url, c.token, sid)
        wait_until(lambda: server_holds() == [], 10, "the ended session's subscription withdrawn")


@pytest.mark.parametrize("through", ["peer", "host"])
def test_a_subscribe_that_timed_out_after_the_server_took_it_is_withdrawn(holds, through):
    """The server takes the subscription at once and answers 2 s later, past its 1 s request
    timeout: the client gets an error, so its session does not keep the URI, and the node it
    called withdraws what the server may have taken (it used to stay on the server until its
    process ended: the pool recorded only answered subscribes)."""
    c, _, _ = holds
    with slow_subscribe(c, through, "--request-timeout-ms", "1000") as (front, url, server_holds):
        uri, before = f"slow://resource/{through}-timed-out", not_kept(c, front, "not_kept")
        sid = legacy_initialize(url, c.token)
        body = {"jsonrpc": "2.0", "id": 1, "method": "resources/subscribe", "params": {"uri": uri}}
        answer = answer_of(legacy_post(url, c.token, body, session=sid))
        assert "error" in answer, f"a subscribe past the request timeout is an error: {answer}"
        wait_until(lambda: server_holds() == [], 15, "the timed-out subscription withdrawn on the server")
        assert not_kept(c, front, "not_kept") == before + 1
        end_session(url, c.token, sid)


def withdrawals(c: Cluster, outcome: str) -> float:
    """The unsubscribes sent to slow-subscribe's process that ended in `outcome`, on both nodes."""
    return sum(c.metric("mcpd_pool_subscription_withdrawals_total",
                        f'server="slow-subscribe",outcome="{outcome}"', node=n) or 0 for n in (0, 1))


@pytest.mark.parametrize("through", ["peer", "host"])
def test_an_unsubscribe_that_failed_is_sent_again_until_the_server_lets_go(holds, through):
    """The server's first unsubscribe of a URI hangs (a stuck backend) past its request
    timeout, and the cancel ends it without effect: the server still holds the URI, and the
    pool's books no longer name it. The node that runs the server sends the unsubscribe again
    a second later, and the server lets go (it used to keep the URI until its process ended,
    sending updates no one read)."""
    c, _, _ = holds
    with slow_subscribe(c, through, "--request-timeout-ms", "3000",
                        "--env", "STUCK_FIRST_UNSUBSCRIBE=1") as (_, url, server_holds):
        uri, failed, ok = f"slow://resource/{through}-stuck-unsubscribe", withdrawals(c, "failed"), withdrawals(c, "ok")
        sid = legacy_initialize(url, c.token)
        subscribe(url, c.token, sid, uri)
        assert server_holds() == [uri]
        body = {"jsonrpc": "2.0", "id": 2, "method": "resources/unsubscribe", "params": {"uri": uri}}
        answer = answer_of(legacy_post(url, c.token, body, session=sid))
        assert "error" in answer, f"an unsubscribe past the request timeout is an error: {answer}"
        wait_until(lambda: withdrawals(c, "failed") == failed + 1, 10, "the unsubscribe counted as failed")
        wait_until(lambda: server_holds() == [], 15, "the subscription withdrawn by the unsubscribe sent again")
        assert withdrawals(c, "ok") == ok + 1
        end_session(url, c.token, sid)
