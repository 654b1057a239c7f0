"""Per-tool authorization, as an operator writes it: ordered rules (`mcpctl policy add`) that
allow or deny tools by name and by their arguments (a CEL condition), evaluated on the node
that receives the call. A denied call is a JSON-RPC error naming the rule; lists show only
what the caller may use; `mcpctl policy test` answers without calling.

The rules here name tenant `pol-t` only, so the other tests sharing the cluster are not
affected; the module removes them when it ends.
"""

from __future__ import annotations

import json

import httpx2
import pytest
from mcp import MCPError

from helpers import MODES, client, run, text_of, wait_until

TENANT = "pol-t"
RULES = ["pol-no-crash", "pol-own-files", "pol-files-rest"]
DENIED = -32054


@pytest.fixture(scope="module")
def pol(cluster, files_dir):
    cluster.mcpctl("tenant", "add", TENANT)
    token = cluster.mcpctl("token", "create", "--tenant", TENANT, "--name", "pol-user").strip()
    cluster.mcpctl(
        "policy", "add", "pol-no-crash", "--order", "10", "--deny",
        "--target", "tool:demo__crash", "--tenant", TENANT,
    )
    cluster.mcpctl(
        "policy", "add", "pol-own-files", "--order", "20", "--allow",
        "--target", "tool:files__read_*", "--tenant", TENANT,
        "--if", f'args.path.startsWith("{files_dir}/")',
    )
    cluster.mcpctl(
        "policy", "add", "pol-files-rest", "--order", "30", "--deny",
        "--target", "server:files", "--tenant", TENANT,
    )
    yield cluster, token
    for rule in RULES:
        cluster.mcpctl("policy", "rm", rule)


def tool_names(url: str, token: str, mode: str) -> list[str]:
    async def go():
        async with client(url, token, mode) as c:
            return [t.name for t in (await c.list_tools()).tools]

    return run(go())


def call(url: str, token: str, mode: str, tool: str, args: dict) -> str:
    async def go():
        async with client(url, token, mode) as c:
            return text_of(await c.call_tool(tool, args))

    return run(go())


def refusal(url: str, token: str, mode: str, tool: str, args: dict):
    """The JSON-RPC error of a call that must fail (caught inside the session)."""

    async def go():
        async with client(url, token, mode) as c:
            try:
                await c.call_tool(tool, args)
            except MCPError as e:
                return e.error
            raise AssertionError(f"{tool} was not refused")

    return run(go())


@pytest.mark.parametrize("mode", MODES)
def test_a_denied_tool_is_refused_naming_the_rule_and_is_not_listed(pol, mode):
    c, token = pol
    for url, tool in [(c.url(0), "demo__crash"), (c.url(1, "demo"), "crash")]:
        error = refusal(url, token, mode, tool, {})
        assert error.code == DENIED
        assert error.data == {"policy": "pol-no-crash"}
        assert "pol-no-crash" in error.message
        names = tool_names(url, token, mode)
        assert tool not in names
        assert tool.replace("crash", "echo") in names
    # The operator's own calls are not covered by the tenant's rules.
    assert "demo__crash" in tool_names(c.url(0), c.admin_token, mode)
    # The refusal is in the node's call log, with the rule.
    wait_until(
        lambda: any(
            e["name"] == "crash" and e["server"] == "demo" and e["outcome"] == "denied"
            and e["policy"] == "pol-no-crash" and e["tenant"] == TENANT
            for e in c.call_log(0)
        ),
        10,
        "the denied call in node 1's call log",
    )


def test_a_condition_on_the_arguments_allows_some_calls_of_a_tool_and_not_others(pol, files_dir):
    c, token = pol
    known = files_dir / "known.txt"
    assert "known content" in call(c.url(2), token, "legacy", "files__read_text_file", {"path": str(known)})
    error = refusal(c.url(2), token, "legacy", "files__read_text_file", {"path": "/etc/hostname"})
    assert error.code == DENIED and error.data == {"policy": "pol-files-rest"}
    names = tool_names(c.url(2), token, "legacy")
    assert "files__read_text_file" in names, "some arguments are allowed, so it is listed"
    assert "files__list_directory" not in names, "no call of it could be allowed"


def test_policy_test_answers_without_calling(pol, files_dir):
    c, _ = pol

    def verdict(target: str, args: dict) -> dict:
        out = c.mcpctl(
            "policy", "test", "--role", "user", "--tenant", TENANT, "--target", target,
            "--args", json.dumps(args), "-o", "json",
        )
        return json.loads(out)

    assert verdict("tool:demo__crash", {}) == {"allowed": False, "rule": "pol-no-crash"}
    assert verdict("tool:files__read_text_file", {"path": f"{files_dir}/x"}) == {
        "allowed": True, "rule": "pol-own-files",
    }
    assert verdict("tool:files__read_text_file", {"path": "/etc"}) == {"allowed": False, "rule": "pol-files-rest"}
    assert verdict("tool:time__get_current_time", {}) == {"allowed": True, "rule": None}
    assert "denied by policy pol-no-crash" in c.mcpctl(
        "policy", "test", "--tenant", TENANT, "--target", "tool:demo__crash"
    )
    listed = c.mcpctl("policy", "list")
    assert listed.index("pol-no-crash") < listed.index("pol-own-files") < listed.index("pol-files-rest")


def test_a_bad_rule_is_refused_naming_the_field_and_a_tenant_admin_writes_its_own_only(pol):
    c, _ = pol
    auth = {"Authorization": f"Bearer {c.admin_token}"}
    bad = {"name": "bad", "order": 1, "effect": "deny", "condition": "args.path.startsWith("}
    r = httpx2.post(f"{c.base(0)}/v1/policies", json=bad, headers=auth, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["field"] == "condition", r.text
    r = httpx2.post(f"{c.base(0)}/v1/policies", json={**bad, "condition": None, "targets": ["files"]}, headers=auth, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["field"] == "targets", r.text

    ta = c.mcpctl("token", "create", "--role", "tenant-admin", "--tenant", TENANT, "--name", "pol-ta").strip()
    as_ta = {"Authorization": f"Bearer {ta}"}
    everyone = {"name": "pol-ta-all", "order": 1, "effect": "deny"}
    r = httpx2.post(f"{c.base(0)}/v1/policies", json=everyone, headers=as_ta, timeout=10)
    assert r.status_code == 403, r.text
    # An allow rule of its own, placed first, would undo the cluster's deny rules.
    undo = {"name": "pol-ta-undo", "order": 0, "effect": "allow", "tenants": [TENANT], "targets": ["server:files"]}
    r = httpx2.post(f"{c.base(0)}/v1/policies", json=undo, headers=as_ta, timeout=10)
    assert r.status_code == 403 and "deny rules only" in r.json()["error"]["message"], r.text
    own = {**everyone, "name": "pol-ta-own", "tenants": [TENANT], "targets": ["tool:time__*"]}
    r = httpx2.post(f"{c.base(0)}/v1/policies", json=own, headers=as_ta, timeout=10)
    assert r.status_code == 201, r.text
    try:
        listed = httpx2.get(f"{c.base(0)}/v1/policies", headers=as_ta, timeout=10).json()["items"]
        assert {p["spec"]["name"] for p in listed} == {*RULES, "pol-ta-own"}
    finally:
        assert httpx2.delete(f"{c.base(0)}/v1/policies/pol-ta-own", headers=as_ta, timeout=10).status_code == 200
    wait_until(
        lambda: "pol-ta-own" not in c.mcpctl("policy", "list"), 10, "the tenant admin's rule is gone"
    )
