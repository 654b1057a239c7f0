"""A session's state (its subscriptions and log level) is replicated before its client is
answered, so that another node can continue the session. Without a quorum that write cannot
commit: the answer waits `mcp.session_state_wait_ms` for it, not `api.quorum_wait_ms`, and
the write goes on.

A 2-node cluster: killing one node takes the quorum away from the other.
"""

from __future__ import annotations

import pytest

from conftest import Cluster, mcpd_config, own_cluster
from helpers import answer_of, end_session, legacy_initialize, legacy_post, wait_until

# Far apart: an answer held for the quorum wait would time the client out.
STATE_WAIT_MS = 500
QUORUM_WAIT_MS = 30_000
CLIENT_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Cluster:
    config = mcpd_config(tmp_path_factory, "session-state",
                         f"[mcp]\nsession_state_wait_ms = {STATE_WAIT_MS}\n[api]\nquorum_wait_ms = {QUORUM_WAIT_MS}\n")
    with own_cluster(tmp_path_factory, "session-state", 2, [config]) as c:
        c.wait_tools("demo", ["echo"])
        yield c


def unconfirmed(c: Cluster) -> float:
    return c.metric("mcpd_mcp_session_state_writes_total", 'outcome="unconfirmed"', node=0) or 0


@pytest.mark.parametrize("change", ["logging/setLevel", "resources/subscribe"])
def test_a_session_change_without_a_quorum_is_answered_after_the_state_wait(pair, change):
    """The other node is killed: node 0 cannot commit the session's new state. Its client is
    answered after mcp.session_state_wait_ms (0.5 s), well inside its 10 s timeout, where
    api.quorum_wait_ms (30 s) would have held it; the answer is counted `unconfirmed`. With
    the quorum back, a session's change is confirmed again."""
    c = pair
    url = c.url(0, "demo")
    sid = legacy_initialize(url, c.token)
    params = {"level": "debug"} if change == "logging/setLevel" else {"uri": "test://template/1/data"}
    before = unconfirmed(c)
    c.kill(1)
    try:
        r = legacy_post(url, c.token, {"jsonrpc": "2.0", "id": 1, "method": change, "params": params},
                        session=sid, timeout=CLIENT_TIMEOUT_S)
        assert "result" in answer_of(r), r.text
        assert unconfirmed(c) == before + 1
    finally:
        c.restart(1)
    wait_until(lambda: c.leader(0) is not None or None, 60, "a leader once both nodes are up")
    end_session(url, c.token, sid)
    sid = legacy_initialize(url, c.token)
    r = legacy_post(url, c.token, {"jsonrpc": "2.0", "id": 2, "method": change, "params": params},
                    session=sid, timeout=CLIENT_TIMEOUT_S)
    assert "result" in answer_of(r), r.text
    assert unconfirmed(c) == before + 1, "a change with the quorum back was not confirmed"
    end_session(url, c.token, sid)
