"""The audit trail, as an operator reads it after an incident: every admin change is an event
in the Raft log itself (so every node has it, also after the leader dies), saying who, from
where, what (secrets taken out) and the revision it produced, chained by hash so that an
edited, removed or reordered event in an exported file is found by `mcpctl audit verify`, and
keyed with the cluster's data key so that a trail rewritten by someone who holds the data but
not the key is found too."""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest

from conftest import MCPD, start_cluster
from helpers import client, rewrite_audit_trail, run, wait_until

SECRET = "s3cret-value-never-in-the-trail"


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory, "audit", 3)
    yield cluster
    cluster.down()


def events(c, node: int, **query) -> list[dict]:
    """The trail as node `node` has applied it (a stale read: that node's own copy)."""
    r = httpx2.get(
        f"{c.base(node)}/v1/audit",
        params={"consistency": "stale", **query},
        headers={"Authorization": f"Bearer {c.admin_token}"},
        timeout=10,
    )
    r.raise_for_status()
    return r.json()["items"]


def test_every_admin_change_is_on_every_node_with_who_and_what(c):
    since = max((e["seq"] for e in events(c, 0)), default=0)
    c.mcpctl("tenant", "add", "audited")
    c.mcpctl("server", "add", "vault", "--tenant", "audited", "--env", f"TOKEN={SECRET}", "--", str(MCPD), "demo-server")
    token = c.mcpctl("token", "create", "--tenant", "audited", "--name", "ci", "-o", "json")
    token_id = json.loads(token)["info"]["id"]
    c.mcpctl("token", "revoke", token_id)
    c.mcpctl("server", "rm", "vault")
    kinds = ["put_tenant", "put_server", "create_token", "revoke_token", "delete_server"]

    for node in range(3):
        trail = wait_until(
            lambda: t if len(t := events(c, node, since=since)) >= len(kinds) else None,
            30,
            f"node {node + 1} has the changes",
        )
        assert [e["kind"] for e in trail] == kinds
        assert [e["object"] for e in trail] == ["audited", "vault", token_id, token_id, "vault"]
        revisions = [e["revision"] for e in trail]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
        for e in trail:
            assert e["actor"]["role"] == "cluster-admin"
            assert e["from"].startswith("127.0.0.1:")
            assert e["at"] > 0
        assert trail[1]["detail"]["spec"]["env"] == {"TOKEN": "<redacted>"}
        assert SECRET not in json.dumps(trail)
        assert "hash" not in trail[2]["detail"]["info"], "a token's hash stays out"
    # The same actor made them all, and the trail can be asked by actor and kind.
    actor = trail[0]["actor"]["token_id"]
    assert {e["actor"]["token_id"] for e in trail} == {actor}
    assert [e["kind"] for e in events(c, 0, since=since, actor=actor, kind="put_server")] == ["put_server"]
    assert "put_tenant" in c.mcpctl("audit", "list", "--since", str(since), "--kind", "put_tenant")


def test_the_trail_survives_the_leader_and_a_restarted_node_catches_up(c):
    leader = c.leader()
    assert leader is not None
    survivor = (leader + 1) % 3
    before = len(events(c, survivor))
    c.kill(leader)
    try:
        wait_until(lambda: c.leader(survivor) not in (None, leader), 30, "a new leader is elected")
        c.mcpctl("tenant", "add", "after-failover", node=survivor)
        trail = events(c, survivor)
        assert len(trail) == before + 1 and trail[-1]["object"] == "after-failover"
    finally:
        c.restart(leader)
    wait_until(
        lambda: [e["hash"] for e in events(c, leader)] == [e["hash"] for e in events(c, survivor)],
        60,
        "the restarted node has the same trail",
    )
    assert "audit chain verified" in c.mcpctl("audit", "verify", node=leader)


def test_an_edited_removed_or_reordered_event_in_an_export_is_found(c, tmp_path):
    c.mcpctl("tenant", "add", "export-me")
    export = tmp_path / "audit.jsonl"
    assert "events written" in c.mcpctl("audit", "export", str(export))
    lines = export.read_text().splitlines()
    assert len(lines) >= 3
    assert "audit chain verified" in c.mcpctl("audit", "verify", "--file", str(export))

    def verify(tampered: list[str]) -> str:
        bad = tmp_path / "tampered.jsonl"
        bad.write_text("\n".join(tampered) + "\n")
        r = c.mcpctl_result("audit", "verify", "--file", str(bad))
        assert r.returncode == 1, r.stdout
        return r.stderr

    edited = [json.loads(line) for line in lines]
    edited[1]["actor"]["token_id"] = "someone-else"
    assert f"event {edited[1]['seq']}: its hash does not match its content (edited)" in verify(
        [json.dumps(e) for e in edited]
    )
    assert "removed or reordered" in verify(lines[:1] + lines[2:])
    assert "removed or reordered" in verify([lines[1], lines[0], *lines[2:]])
    # A file cut short still chains; the head kept apart from it finds the cut.
    head = json.loads(lines[-1])["hash"]
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:-1]) + "\n")
    assert "audit chain verified" in c.mcpctl("audit", "verify", "--file", str(cut))
    r = c.mcpctl_result("audit", "verify", "--file", str(cut), "--head", head)
    assert r.returncode == 1 and "expected head" in r.stderr


def test_a_trail_rewritten_without_the_clusters_key_is_found(c, tmp_path):
    """The attacker holds an export (or a backup, or a data directory) but not the TLS
    directory's data.key: they edit an event and hash every later one again, so the hash chain
    holds. Only the cluster's key makes the MACs, so the cluster finds the rewrite."""
    c.mcpctl("tenant", "add", "keyed-1")
    c.mcpctl("tenant", "add", "keyed-2")
    verified = c.mcpctl("audit", "verify")
    assert "keyed by the cluster" in verified and "unkeyed" not in verified, verified
    export = tmp_path / "audit.jsonl"
    c.mcpctl("audit", "export", str(export))
    trail = [json.loads(line) for line in export.read_text().splitlines()]
    assert all(len(e["mac"]) == 64 for e in trail), "every event carries a MAC"
    assert "keyed by the cluster" in c.mcpctl("audit", "verify", "--file", str(export))

    def verify(events: list[dict], *flags: str):
        bad = tmp_path / "rewritten.jsonl"
        bad.write_text("".join(json.dumps(e) + "\n" for e in events))
        return c.mcpctl_result("audit", "verify", "--file", str(bad), *flags)

    edited = [dict(e) for e in trail]
    edited[-2] = {**edited[-2], "actor": {**edited[-2]["actor"], "token_id": "someone-else"}}
    rewritten = rewrite_audit_trail(edited, len(edited) - 2)
    offline = verify(rewritten, "--offline")
    assert offline.returncode == 0 and "MACs not checked" in offline.stdout, offline
    r = verify(rewritten)
    assert r.returncode == 1, r.stdout
    assert f"event {edited[-2]['seq']}: its MAC does not match" in r.stderr, r.stderr

    # Taking the MACs off is found too: from some event on, or all of them.
    stripped = [{k: v for k, v in e.items() if k != "mac" or i < len(trail) - 1} for i, e in enumerate(trail)]
    r = verify(stripped)
    assert r.returncode == 1 and f"event {trail[-1]['seq']}: it carries no MAC" in r.stderr, r.stderr
    bare = [{k: v for k, v in e.items() if k != "mac"} for e in trail]
    r = verify(bare)
    assert r.returncode == 1 and "carry no MAC" in r.stderr, r.stderr
    # An operator who knows the events predate the key accepts them, and is told how many.
    r = verify(bare, "--allow-unkeyed")
    assert r.returncode == 0 and f"0 keyed by the cluster, {len(trail)} before them unkeyed" in r.stdout, r


def test_retention_is_a_setting_and_keeps_the_chain_verifiable(c):
    c.mcpctl("audit", "retention", "100")
    auth = {"Authorization": f"Bearer {c.admin_token}"}
    with httpx2.Client(headers=auth, timeout=10) as http:
        for i in range(101):
            r = http.post(f"{c.base(0)}/v1/tenants", json={"name": f"keep-{i}"})
            assert r.status_code == 201, r.text
        page = http.get(f"{c.base(0)}/v1/audit").json()
        assert len(page["items"]) == 100
        assert page["first_kept"] > 1 and page["items"][0]["seq"] == page["first_kept"]
        assert page["items"][-1]["hash"] == page["head_hash"]
        r = http.put(f"{c.base(0)}/v1/audit/retention", json={"events": 5})
        assert r.status_code == 400 and r.json()["error"]["field"] == "events"
    assert "audit chain verified" in c.mcpctl("audit", "verify")


def test_every_tool_call_leaves_one_line_in_the_nodes_call_log_under_load(c):
    """300 calls from 10 concurrent clients through node 1: 300 lines, none missing, none
    doubled, with who, what and how it ended, and the arguments' hash but not the arguments."""
    token = c.mcpctl("token", "create", "--tenant", "default", "--name", "call-log").strip()
    secret = "argument-that-stays-out-of-the-log"

    async def one_client(k: int) -> None:
        async with client(c.url(0), token, "legacy") as s:
            for i in range(30):
                r = await s.call_tool("demo__echo", {"message": f"{secret}-{k}-{i}"})
                assert not r.is_error

    async def load() -> None:
        await asyncio.gather(*(one_client(k) for k in range(10)))

    run(load())
    mine = lambda: [e for e in c.call_log(0) if e["method"] == "tools/call" and e["tenant"] == "default"  # noqa: E731
                    and e["name"] == "echo" and e["args_bytes"] > len(secret)]
    lines = wait_until(lambda: m if len(m := mine()) >= 300 else None, 30, "300 lines in node 1's call log")
    assert len(lines) == 300, "no gap and no double"
    subjects = {e["subject"] for e in lines}
    assert len(subjects) == 1
    assert {e["server"] for e in lines} == {"demo"} and {e["outcome"] for e in lines} == {"ok"}
    assert all(len(e["args_sha256"]) == 64 and e["duration_ms"] > 0 for e in lines)
    assert secret not in (c.dir / "node1" / "data" / "audit" / "calls.jsonl").read_text()
    assert c.metric("mcpd_call_audit_dropped_total", 'reason="full"') in (None, 0.0)
