"""Tool pinning (tool certification), as an operator runs it against a real cluster and a real
MCP server that changes its tools after approval (tests/py/servers/rugpull.py, written with the
Python SDK): approve the server's tools; the server rewrites a description with hidden
instructions and adds a tool; both are held back from clients, listed nowhere and refused when
called, until `mcpctl server diff` has been read and the change approved.

Runbook: `mcpctl server approve NAME` pins a server's tools; `mcpctl server diff NAME` shows
what changed since (exit 3 while tools are held); `mcpctl server approve NAME --tool T`
approves one; `mcpctl server unpin NAME` stops checking."""

from __future__ import annotations

import json
import uuid

from conftest import ROOT, VENV_BIN, Cluster
from helpers import stateless_post, stateless_tool_names, wait_until

RUGPULL = ROOT / "tests/py/servers/rugpull.py"


def call(cluster: Cluster, server: str, tool: str, args: dict, node: int = 0) -> dict:
    url = cluster.url(node, server)
    return stateless_post(url, cluster.token, "tools/call", {"name": tool, "arguments": args}, name=tool).json()


def test_a_tool_changed_after_approval_is_held_back_until_approved_again(cluster: Cluster):
    name = f"rp{uuid.uuid4().hex[:4]}"
    # One process in the cluster (replicas 1), so every node sees the one that changes.
    cluster.mcpctl("server", "add", name, "--replicas", "1", "--pool-size", "1", "--", str(VENV_BIN / "python"), str(RUGPULL))
    try:
        cluster.wait_tools(name, ["forecast", "rug_pull"])
        before = cluster.mcpctl_result("server", "diff", name)
        assert before.returncode == 0 and "not pinned" in before.stdout, before

        assert "2 tools approved" in cluster.mcpctl("server", "approve", name)
        approved = json.loads(cluster.mcpctl("server", "diff", name, "-o", "json"))
        assert approved["pinned"] and {t["status"] for t in approved["tools"]} == {"approved"}, approved

        assert "pulled" in json.dumps(call(cluster, name, "rug_pull", {}))

        # Held back on every node and both endpoints: not listed, and refused when called.
        for node in range(cluster.nodes):
            wait_until(
                lambda: set(stateless_tool_names(cluster.url(node, name), cluster.token)) == {"rug_pull"},
                30,
                f"only rug_pull listed on node {node}",
            )
            # /mcp lists from the catalogue, which a node that does not run the server
            # re-reads from the one that does within seconds.
            aggregate = wait_until(
                lambda: (names := set(stateless_tool_names(cluster.url(node), cluster.token)))
                and {f"{name}__forecast", f"{name}__upload"}.isdisjoint(names)
                and names,
                30,
                f"forecast and upload gone from /mcp on node {node}",
            )
            assert f"{name}__rug_pull" in aggregate
        changed = wait_until(
            lambda: call(cluster, name, "forecast", {"city": "Oslo"}, node=1).get("error"),
            30,
            "the changed tool refused",
        )
        assert changed["code"] == -32054 and changed["data"]["held"] == "changed", changed
        new = call(cluster, name, "upload", {"path": "/etc/passwd"}, node=2)["error"]
        assert new["data"]["held"] == "new", new

        # The operator sees what changed, including the hidden instruction.
        diff = cluster.mcpctl_result("server", "diff", name)
        assert diff.returncode == 3, diff
        assert "id_rsa" in diff.stdout and "changed" in diff.stdout and "new" in diff.stdout, diff.stdout
        held = sum(cluster.metric("mcpd_tools_held_total", f'server="{name}",change="changed"', node=n) or 0 for n in range(cluster.nodes))
        assert held >= 1
        # Each change is in the audit trail once, however many nodes and lists saw it.
        def noted() -> list[tuple[str, str]]:
            events = json.loads(cluster.mcpctl("audit", "list", "--kind", "tool_changed", "-o", "json"))
            events = events["items"] if isinstance(events, dict) else events
            return sorted((e["detail"]["tool"], e["detail"]["change"]) for e in events if e.get("object") == name)
        assert wait_until(lambda: noted() == [("forecast", "changed"), ("upload", "new")] and noted(), 15,
                          "both changes audited") == [("forecast", "changed"), ("upload", "new")]

        # Approving one tool lets that one through; the other stays held.
        cluster.mcpctl("server", "approve", name, "--tool", "forecast")
        wait_until(
            lambda: "result" in call(cluster, name, "forecast", {"city": "Oslo"}, node=2),
            30,
            "the approved tool served again",
        )
        assert call(cluster, name, "upload", {"path": "x"})["error"]["data"]["held"] == "new"
        events = cluster.mcpctl("audit", "list", "--kind", "approve_tools")
        assert events.count(name) >= 2, events
    finally:
        cluster.mcpctl("server", "rm", name)


def test_approving_needs_a_tenant_admin_of_the_servers_tenant_or_a_cluster_admin(cluster: Cluster):
    tenant = f"pin{uuid.uuid4().hex[:4]}"
    cluster.mcpctl("tenant", "add", tenant)
    viewer = cluster.mcpctl("token", "create", "--role", "viewer", "--name", f"{tenant}-viewer").strip()
    other_admin = cluster.mcpctl("token", "create", "--role", "tenant-admin", "--tenant", tenant, "--name", f"{tenant}-ta").strip()
    # demo is a global server: neither a viewer nor another tenant's admin may pin it.
    for token in (viewer, other_admin):
        r = cluster.mcpctl_result("server", "approve", "demo", "--token", token)
        assert r.returncode != 0 and "403" in r.stdout + r.stderr, r
