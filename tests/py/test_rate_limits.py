"""Rate limits, quotas and concurrency limits on MCP calls, for the whole cluster: a tenant
limited to N calls/s gets N from the cluster, however its calls are spread over the nodes; a
tenant limited to N calls at once runs N at once in the whole cluster, and a dead node's slots
come back; a daily quota holds across a kill -9 of every node; refusals are JSON-RPC -32029
with `retryAfterMs`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest

from conftest import MCPD, mcpd_config, own_cluster
from helpers import stateless_post, wait_until

RATE_LIMITED = -32029


def tenant_with_token(c, name: str) -> str:
    c.mcpctl("tenant", "add", name)
    return c.mcpctl("token", "create", "--tenant", name, "--name", "load").strip()


def echo(c, node: int, token: str, http: httpx2.Client | None = None, server: str = "demo") -> dict:
    r = stateless_post(c.url(node, server), token, "tools/call",
                       {"name": "echo", "arguments": {"message": "x"}}, name="echo", http=http)
    if r.status_code != 429:  # a refused request: the JSON-RPC error is in the body
        r.raise_for_status()
    return r.json()


def sleep_call(c, node: int, token: str, ms: int) -> dict:
    r = stateless_post(c.url(node, "demo"), token, "tools/call",
                       {"name": "sleep", "arguments": {"ms": ms}}, name="sleep")
    if r.status_code != 429:
        r.raise_for_status()
    return r.json()


def at_once(c, token: str, nodes: list[int], ms: int) -> list[dict]:
    """One `sleep` call per entry of `nodes`, all started together; their answers."""
    start = threading.Barrier(len(nodes))

    def one(node: int) -> dict:
        start.wait(timeout=30)
        return sleep_call(c, node, token, ms)

    with ThreadPoolExecutor(len(nodes)) as pool:
        return [f.result(timeout=ms / 1000 + 60) for f in [pool.submit(one, n) for n in nodes]]


def refused_for(kind: str, answers: list[dict]) -> list[dict]:
    return [a for a in answers if "error" in a and a["error"]["code"] == RATE_LIMITED
            and a["error"]["data"]["kind"] == kind]


def limit_known_everywhere(c, name: str) -> None:
    """Every node has applied the limit (a limit a node has not seen yet counts nothing)."""
    for node in range(c.nodes):
        wait_until(lambda: name in c.mcpctl("limit", "list", node=node), 30, f"node {node} knows {name}")


def drive(c, token: str, nodes: list[int], seconds: float, callers: int = 6) -> tuple[int, int, list]:
    """Calls echo as fast as `callers` threads can, spread over `nodes`, for `seconds`;
    returns (answered, refused as rate limited, other errors)."""
    answered, refused, other = [0], [0], []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def caller(i: int) -> None:
        node = nodes[i % len(nodes)]
        with httpx2.Client() as http:
            while time.monotonic() < deadline:
                a = echo(c, node, token, http)
                with lock:
                    if "result" in a:
                        answered[0] += 1
                    elif a["error"]["code"] == RATE_LIMITED:
                        refused[0] += 1
                    else:
                        other.append(a)

    with ThreadPoolExecutor(callers) as pool:
        for f in [pool.submit(caller, i) for i in range(callers)]:
            f.result(timeout=seconds + 60)
    return answered[0], refused[0], other


@pytest.mark.parametrize("spread", ["three nodes", "one node"])
def test_a_tenant_rate_limit_holds_for_the_whole_cluster(cluster, spread):
    c = cluster
    tenant = f"rl-{uuid.uuid4().hex[:6]}"
    token = tenant_with_token(c, tenant)
    rate, burst, seconds = 40, 4, 10
    c.mcpctl("limit", "set", tenant, "--tenant", tenant, "--rate", str(rate), "--burst", str(burst))
    limit_known_everywhere(c, tenant)
    nodes = [0, 1, 2] if spread == "three nodes" else [1]
    answered, refused, other = drive(c, token, nodes, seconds)
    allowed = rate * seconds + burst
    print(f"\n{spread}: {answered} answered, {refused} refused; the limit allows {allowed}")
    assert not other, other[:2]
    assert refused > answered, "the load was well over the limit"
    assert 0.9 * allowed <= answered <= 1.1 * allowed, (answered, allowed)
    c.mcpctl("limit", "rm", tenant)


def test_a_refusal_names_the_limit_and_when_to_retry_and_other_tenants_are_untouched(cluster):
    c = cluster
    tenant = f"rl-{uuid.uuid4().hex[:6]}"
    token = tenant_with_token(c, tenant)
    other_token = tenant_with_token(c, f"{tenant}-other")
    c.mcpctl("limit", "set", tenant, "--tenant", tenant, "--rate", "1", "--burst", "1")
    limit_known_everywhere(c, tenant)
    first = echo(c, 0, token)
    assert "result" in first, first
    refusal = stateless_post(c.url(0, "demo"), token, "tools/call",
                             {"name": "echo", "arguments": {"message": "x"}}, name="echo")
    # The request was one call: the whole HTTP request is refused, with when to come back.
    assert refusal.status_code == 429 and int(refusal.headers["retry-after"]) >= 1, refusal.headers
    second = refusal.json()
    assert second["error"]["code"] == RATE_LIMITED, second
    data = second["error"]["data"]
    assert data["limit"] == tenant and data["kind"] == "rate" and 0 < data["retryAfterMs"] <= 1000, data
    # Another tenant, another budget.
    assert "result" in echo(c, 0, other_token)
    # The limit is per budget, and once its bucket refilled the tenant is served again.
    wait_until(lambda: "result" in echo(c, 1, token), 10, "served again once the budget refilled")
    assert (c.metric("mcpd_limit_refusals_total", f'limit="{tenant}",kind="rate"') or 0) >= 1
    c.mcpctl("limit", "rm", tenant)


def test_a_concurrency_limit_holds_for_the_whole_cluster_and_frees_its_slots(cluster):
    c = cluster
    tenant = f"cl-{uuid.uuid4().hex[:6]}"
    token = tenant_with_token(c, tenant)
    c.mcpctl("limit", "set", tenant, "--tenant", tenant, "--concurrency", "2")
    limit_known_everywhere(c, tenant)
    # Nine slow calls at once, three on each node: two run, in the whole cluster.
    answers = at_once(c, token, [0, 1, 2] * 3, ms=3000)
    ran = [a for a in answers if "result" in a]
    refused = refused_for("concurrency", answers)
    print(f"\n9 calls at once under a limit of 2: {len(ran)} ran, {len(refused)} refused")
    assert len(ran) == 2 and len(refused) == 7, answers
    data = refused[0]["error"]["data"]
    assert data["limit"] == tenant and 0 < data["retryAfterMs"] <= 1000, data
    assert "every slot in use" in refused[0]["error"]["message"], refused[0]
    # Once they ended, their slots come back to every node.
    for node in range(c.nodes):
        wait_until(lambda node=node: "result" in sleep_call(c, node, token, 0), 10,
                   f"node {node} runs a call once the slots are free")
    # Calls one after another never meet the limit.
    assert all("result" in sleep_call(c, i % 3, token, 0) for i in range(6))
    assert (c.metric("mcpd_limit_refusals_total", f'limit="{tenant}",kind="concurrency"') or 0) >= 1
    c.mcpctl("limit", "rm", tenant)


def test_the_most_specific_limit_counts_a_call(cluster):
    c = cluster
    tenant = f"rl-{uuid.uuid4().hex[:6]}"
    token = tenant_with_token(c, tenant)
    # The tenant-wide limit is generous; the tool's own quota is not.
    c.mcpctl("limit", "set", f"{tenant}-all", "--tenant", tenant, "--rate", "1000")
    c.mcpctl("limit", "set", f"{tenant}-echo", "--tenant", tenant, "--server", "demo", "--tool", "echo",
             "--quota", "3/day")
    limit_known_everywhere(c, f"{tenant}-echo")
    answers = [echo(c, i % 3, token) for i in range(4)]
    assert all("result" in a for a in answers[:3]), answers
    assert answers[3]["error"]["code"] == RATE_LIMITED and answers[3]["error"]["data"]["kind"] == "quota", answers[3]
    # Another tool of the server falls under the tenant-wide limit only.
    r = stateless_post(c.url(0, "demo"), token, "tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}}, name="add")
    assert "result" in r.json(), r.json()
    usage = json.loads(c.mcpctl("limit", "usage", f"{tenant}-echo", "-o", "json"))
    assert [(u["used"], u["calls"]) for u in usage] == [(3, 3)], usage
    for name in (f"{tenant}-all", f"{tenant}-echo"):
        c.mcpctl("limit", "rm", name)


def test_a_fallback_servers_own_limit_counts_the_calls_it_answers(cluster):
    """A call its server could not take goes to the fallback only within the fallback's own
    limits; the caller's limits count it once."""
    c = cluster
    tenant = f"rl-{uuid.uuid4().hex[:6]}"
    token = tenant_with_token(c, tenant)
    fb, broken = f"{tenant}-fb", f"{tenant}-broken"
    c.add_server(fb, [MCPD, "demo-server"], pool_size=1)
    c.wait_tools(fb, ["echo"])
    c.mcpctl("server", "add", broken, "--pool-size", "1", "--fallback", fb, "--", "/bin/false")
    # More specific than the tenant's own quota, so that it is the one counting calls to fb.
    c.mcpctl("limit", "set", f"{tenant}-fb-quota", "--tenant", tenant, "--server", fb, "--quota", "2/day")
    c.mcpctl("limit", "set", f"{tenant}-all", "--tenant", tenant, "--quota", "100/day")
    limit_known_everywhere(c, f"{tenant}-fb-quota")
    limit_known_everywhere(c, f"{tenant}-all")
    answers = [echo(c, i % 3, token, server=broken) for i in range(3)]
    by_fallback = [a for a in answers if a.get("result", {}).get("_meta", {}).get("io.mcpcp/fallback")]
    assert len(by_fallback) == 2 and "error" in answers[2], answers
    used = {name: json.loads(c.mcpctl("limit", "usage", name, "-o", "json"))[0]["used"]
            for name in (f"{tenant}-fb-quota", f"{tenant}-all")}
    # The fallback's quota counted the two it answered; the tenant's, each call once.
    assert used == {f"{tenant}-fb-quota": 2, f"{tenant}-all": 3}, used
    for name in (f"{tenant}-fb-quota", f"{tenant}-all"):
        c.mcpctl("limit", "rm", name)
    c.mcpctl("server", "rm", broken)
    c.mcpctl("server", "rm", fb)


def test_a_limit_names_the_field_it_gets_wrong(cluster):
    c = cluster
    for args, field in [
        (["--tool", "echo", "--rate", "5"], "tool"),
        (["--tenant", "default"], "rate"),
        (["--rate", "0"], "rate.per_second"),
        (["--concurrency", "0"], "concurrency"),
    ]:
        r = c.mcpctl_result("limit", "set", "bad", *args)
        assert r.returncode != 0 and field in r.stderr, (args, r.stderr)


@pytest.fixture(scope="module")
def quota_cluster(tmp_path_factory):
    """A cluster of its own (every node of it is killed), with `demo` (`mcpctl dev up`'s)."""
    with own_cluster(tmp_path_factory, "quota", 3) as c:
        c.wait_tools("demo", ["echo"])
        yield c


def test_a_daily_quota_survives_a_kill_of_every_node(quota_cluster):
    c = quota_cluster
    token = tenant_with_token(c, "metered")
    c.mcpctl("limit", "set", "metered-daily", "--tenant", "metered", "--per", "tenant", "--quota", "20/day")
    limit_known_everywhere(c, "metered-daily")
    for i in range(12):
        a = echo(c, i % 3, token)
        assert "result" in a, a
    for node in range(c.nodes):
        c.kill(node)
    for node in range(c.nodes):
        c.restart(node)
    c.wait_tools("demo", ["echo"])
    used = json.loads(c.mcpctl("limit", "usage", "metered-daily", "-o", "json"))
    assert [(u["budget"], u["used"]) for u in used] == [("metered", 12)], used
    for i in range(8):
        a = echo(c, i % 3, token)
        assert "result" in a, (i, a)
    refused = echo(c, 0, token)
    assert refused["error"]["code"] == RATE_LIMITED, refused
    data = refused["error"]["data"]
    assert data["kind"] == "quota" and 0 < data["retryAfterMs"] <= 86_400_000, data


def test_the_slots_of_a_node_that_dies_come_back_to_the_others(quota_cluster):
    c = quota_cluster
    token = tenant_with_token(c, "at-once")
    c.mcpctl("limit", "set", "at-once-2", "--tenant", "at-once", "--concurrency", "2")
    limit_known_everywhere(c, "at-once-2")
    leader = wait_until(lambda: None if (n := c.leader(0)) is None else [n], 30, "a leader")[0]
    doomed = (leader + 1) % c.nodes
    survivor = (leader + 2) % c.nodes
    # Two long calls hold both slots on a follower, which then dies without a word.
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(sleep_call, c, doomed, token, 60_000) for _ in range(2)]
        wait_until(lambda: refused_for("concurrency", [sleep_call(c, survivor, token, 0)]), 30,
                   "both slots are taken on the doomed node")
        c.kill(doomed)
        for f in held:
            with pytest.raises(Exception):
                f.result(timeout=60)
    try:
        # Its holding lapses on the leader: the survivors get the slots back.
        wait_until(lambda: "result" in sleep_call(c, survivor, token, 0), 30,
                   "the dead node's slots come back")
    finally:
        c.restart(doomed)


def test_a_leader_cut_off_from_its_peers_refuses_limited_calls_and_serves_the_rest(quota_cluster):
    """Fail closed: the leader, with the two other nodes down, has no quorum. It stops granting
    rate tokens (the majority could elect another leader that grants the same budget again),
    and cannot count quota; its limited calls get a clear -32050 after a bounded wait, and
    calls no limit counts are served as before."""
    c = quota_cluster
    limited = tenant_with_token(c, "cut-off")
    free = tenant_with_token(c, "unlimited")
    c.mcpctl("limit", "set", "cut-off-rate", "--tenant", "cut-off", "--rate", "1000")
    limit_known_everywhere(c, "cut-off-rate")
    leader = wait_until(lambda: None if (n := c.leader(0)) is None else [n], 30, "a leader")[0]
    assert "result" in echo(c, leader, limited)
    others = [n for n in range(c.nodes) if n != leader]
    for node in others:
        c.kill(node)
    try:
        def refused_as_unavailable():
            a = echo(c, leader, limited)
            return a if "error" in a and a["error"]["code"] == -32050 else None

        # Tokens leased before the cut may still be spent (for 1 s at most); then it refuses.
        answer = wait_until(refused_as_unavailable, 30, "limited calls are refused once the quorum is gone")
        assert "could not be checked" in answer["error"]["message"], answer
        assert "result" in echo(c, leader, free), "a call no limit counts is served"
    finally:
        for node in others:
            c.restart(node)


# An election timeout long enough (5-10 s) that both followers can be paused past half of it
# (2.5 s) and two of the leader's ticks more (1.5 heartbeats each: its metrics say how old the
# acknowledgement is as of its last tick), and resumed well before either stands for election.
LONG_ELECTIONS = "[raft]\nheartbeat_ms = 300\nelection_timeout_min_ms = 5000\nelection_timeout_max_ms = 10000\n"
ACK_TOO_OLD_AFTER_S = 2.5 + 2 * 0.45


@pytest.fixture(scope="module")
def long_election_cluster(tmp_path_factory):
    config = mcpd_config(tmp_path_factory, "long-elections", LONG_ELECTIONS)
    with own_cluster(tmp_path_factory, "long-elections", 3, [config]) as c:
        c.wait_tools("demo", ["echo"])
        yield c


def test_a_leader_whose_heartbeats_are_late_asks_its_quorum_again_before_refusing(long_election_cluster):
    """Heartbeats late on a loaded machine leave the leader's last quorum acknowledgement older
    than half the election timeout, too old to grant a lease on. The leader then asks its quorum
    again before it refuses: a limited call waits for the followers' answer and is served, not
    refused as unchecked (-32050). Here both followers are paused past half the election timeout
    and resumed while the call waits."""
    c = long_election_cluster
    tenant = f"hb-{uuid.uuid4().hex[:6]}"
    token = tenant_with_token(c, tenant)
    c.mcpctl("limit", "set", tenant, "--tenant", tenant, "--rate", "1", "--burst", "1")
    limit_known_everywhere(c, tenant)
    leader = wait_until(lambda: None if (n := c.leader(0)) is None else [n], 30, "a leader")[0]
    followers = [c.pid(n) for n in range(c.nodes) if n != leader]

    def confirmed() -> float:
        return c.metric("mcpd_limit_lease_quorum_confirmations_total", 'outcome="confirmed"', node=leader) or 0

    before = confirmed()
    paused_at = time.monotonic()
    for pid in followers:
        os.kill(pid, signal.SIGSTOP)
    try:
        # The pause is the fault: no follower can answer, so the acknowledgement ages.
        time.sleep(ACK_TOO_OLD_AFTER_S)
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(echo, c, leader, token)
            # Without a second ask the leader would refuse at once; it waits for an answer.
            with pytest.raises(TimeoutError):
                call.result(timeout=0.1)
            for pid in followers:
                os.kill(pid, signal.SIGCONT)
            answer = call.result(timeout=30)
    finally:
        for pid in followers:
            os.kill(pid, signal.SIGCONT)
        c.mcpctl("limit", "rm", tenant)
    print(f"\nfollowers paused {time.monotonic() - paused_at:.2f} s; the call: {answer}")
    assert "result" in answer, answer
    assert confirmed() == before + 1
    assert c.leader(leader) == leader, "the pause cost no election"
