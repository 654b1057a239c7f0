"""Usage accounting: after a known workload spread over the nodes, `GET /v1/usage` (and
`mcpctl usage`) shows exactly the calls made, per tenant, subject, server and tool, with their
errors and bytes; the figures survive a kill -9 of every node; a tenant admin sees only its own
tenant's."""

from __future__ import annotations

import json

import httpx2
import pytest

from conftest import start_cluster
from helpers import stateless_post, wait_until


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    """A cluster of its own (every node of it is killed) that flushes usage every second."""
    c = start_cluster(tmp_path_factory, "usage", 3, ["--usage-flush-interval-s=1"])
    try:
        c.wait_tools("demo", ["echo", "fail"])
        yield c
    finally:
        c.down()


def usage(c, token: str, node: int = 0, **query: str) -> list[dict]:
    r = httpx2.get(f"{c.base(node)}/v1/usage", params=query,
                   headers={"Authorization": f"Bearer {token}"}, timeout=10)
    r.raise_for_status()
    return r.json()["items"]


def by_tool(rows: list[dict]) -> dict[str, tuple[int, int]]:
    return {r["tool"]: (r["calls"], r["errors"]) for r in rows}


def test_usage_matches_the_calls_made_exactly_and_survives_a_restart(metered):
    c = metered
    c.mcpctl("tenant", "add", "billed")
    token = c.mcpctl("token", "create", "--tenant", "billed", "--name", "meter").strip()
    token_id = json.loads(c.mcpctl("token", "list", "-o", "json"))
    subject = next(t["id"] for t in token_id if t.get("tenant") == "billed")
    for i in range(7):
        r = stateless_post(c.url(i % 3, "demo"), token, "tools/call",
                           {"name": "echo", "arguments": {"message": "x" * 100}}, name="echo")
        assert "result" in r.json(), r.json()
    for i in range(2):
        r = stateless_post(c.url(i, "demo"), token, "tools/call",
                           {"name": "fail", "arguments": {"message": "on purpose"}}, name="fail")
        assert r.json()["result"]["isError"], r.json()

    want = {"echo": (7, 0), "fail": (2, 2)}
    wait_until(lambda: by_tool(usage(c, c.admin_token, tenant="billed")) == want or None, 30,
               "every node flushed its counts")
    rows = usage(c, c.admin_token, tenant="billed")
    assert {(r["tenant"], r["subject"], r["server"]) for r in rows} == {("billed", subject, "demo")}, rows
    echo = next(r for r in rows if r["tool"] == "echo")
    assert echo["bytes_in"] > 7 * 100 and echo["bytes_out"] > 7 * 100, echo
    # Counted once: later flushes of every node (which carry another tenant's calls) add
    # nothing to it.
    c.mcpctl("tenant", "add", "later")
    later = c.mcpctl("token", "create", "--tenant", "later", "--name", "meter").strip()
    for node in range(3):
        stateless_post(c.url(node, "demo"), later, "tools/call",
                       {"name": "echo", "arguments": {"message": "y"}}, name="echo").raise_for_status()
    wait_until(lambda: by_tool(usage(c, c.admin_token, tenant="later")) == {"echo": (3, 0)} or None, 30,
               "every node flushed again")
    assert by_tool(usage(c, c.admin_token, tenant="billed")) == want
    # The same in Prometheus, summed over the nodes.
    prom = sum(c.metric("mcpd_usage_calls_total", 'tenant="billed",server="demo",tool="echo"', n) or 0
               for n in range(3))
    assert prom == 7

    table = c.mcpctl("usage", "--tenant", "billed", "--since", "1h")
    assert "echo" in table and "fail" in table

    # Another tenant's admin sees none of it, whatever it asks for.
    c.mcpctl("tenant", "add", "other")
    other_admin = c.mcpctl("token", "create", "--tenant", "other", "--role", "tenant-admin", "--name", "a").strip()
    assert usage(c, other_admin, tenant="billed") == []

    for node in range(3):
        c.kill(node)
    for node in range(3):
        c.restart(node)
    wait_until(lambda: by_tool(usage(c, c.admin_token, node=2, tenant="billed")) == want or None, 60,
               "the figures are back after every node was killed")


def test_tool_names_a_server_does_not_list_are_counted_as_other(metered):
    """Callers make names up: each would be a row in the replicated state and a label."""
    c = metered
    c.mcpctl("tenant", "add", "guesser")
    token = c.mcpctl("token", "create", "--tenant", "guesser", "--name", "meter").strip()
    # Every node knows what demo lists (its own pool's catalogue, or a peer's answer).
    for node in range(3):
        wait_until(lambda: any(t["name"] == "echo" for t in httpx2.get(
            f"{c.base(node)}/v1/servers/demo/catalogue", headers={"Authorization": f"Bearer {c.admin_token}"},
            timeout=10).json().get("tools", [])) or None, 60, f"node {node} knows demo's tools")
    for i in range(6):
        r = stateless_post(c.url(i % 3, "demo"), token, "tools/call",
                           {"name": f"made-up-{i}", "arguments": {}}, name=f"made-up-{i}")
        assert r.status_code < 500, r.text
    stateless_post(c.url(0, "demo"), token, "tools/call",
                   {"name": "echo", "arguments": {"message": "real"}}, name="echo").raise_for_status()
    want = {"other": (6, 6), "echo": (1, 0)}
    wait_until(lambda: by_tool(usage(c, c.admin_token, tenant="guesser")) == want or None, 30,
               "the made-up names are counted under other")


def test_a_bad_span_is_refused_naming_the_field(metered):
    r = httpx2.get(f"{metered.base(0)}/v1/usage", params={"since": "forever"},
                   headers={"Authorization": f"Bearer {metered.admin_token}"}, timeout=10)
    assert r.status_code in (400, 422) and r.json()["error"]["field"] == "since", r.text


def test_calls_made_while_the_quorum_is_lost_are_counted_once_when_it_is_back(metered):
    """The leader keeps serving calls with both followers down; its usage flushes fail (each
    may still be committed later) and are sent again; once the followers are back the calls
    are counted once, not once per failed flush."""
    c = metered
    c.mcpctl("tenant", "add", "cut-off")
    token = c.mcpctl("token", "create", "--tenant", "cut-off", "--name", "meter").strip()
    leader = wait_until(lambda: [c.leader(0)] if c.leader(0) is not None else None, 60, "a leader")[0]
    followers = [n for n in range(3) if n != leader]
    failed_before = c.metric("mcpd_usage_flushes_total", 'outcome="failed"', leader) or 0
    for node in followers:
        c.kill(node)
    for _ in range(5):
        r = stateless_post(c.url(leader, "demo"), token, "tools/call",
                           {"name": "echo", "arguments": {"message": "alone"}}, name="echo")
        assert "result" in r.json(), r.json()
    wait_until(lambda: (c.metric("mcpd_usage_flushes_total", 'outcome="failed"', leader) or 0)
               >= failed_before + 2, 60, "two usage flushes failed without a quorum")
    for node in followers:
        c.restart(node)
    wait_until(lambda: by_tool(usage(c, c.admin_token, node=leader, tenant="cut-off")) or None, 60,
               "the calls are counted once the quorum is back")
    # A later call on the leader is counted only after everything its log held before it.
    c.mcpctl("tenant", "add", "after")
    after = c.mcpctl("token", "create", "--tenant", "after", "--name", "meter").strip()
    stateless_post(c.url(leader, "demo"), after, "tools/call",
                   {"name": "echo", "arguments": {"message": "later"}}, name="echo").raise_for_status()
    wait_until(lambda: by_tool(usage(c, c.admin_token, node=leader, tenant="after")) or None, 60,
               "the later call is counted")
    assert by_tool(usage(c, c.admin_token, node=leader, tenant="cut-off")) == {"echo": (5, 0)}
