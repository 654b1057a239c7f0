"""Requests the gateway must refuse, each with a clear error, seen with raw HTTP: unknown tool,
a capability the client did not declare, bad token, another tenant's server, malformed body,
foreign Origin."""

from __future__ import annotations

import httpx2
import pytest

from conftest import MCPD
from helpers import legacy_initialize, legacy_post, stateless_post, stateless_tool_names

INVALID_PARAMS = -32602
INVALID_REQUEST = -32600
PARSE_ERROR = -32700


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}


def call_tool(name: str, arguments: dict | None = None, id: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": arguments or {}}}


@pytest.mark.parametrize(
    ("endpoint", "tool", "named"),
    [
        ("server", "no_such_tool", "no_such_tool"),  # the server's own error
        ("aggregate", "demo__no_such_tool", "no_such_tool"),  # the server's, through the aggregate
        ("aggregate", "nosuchserver__echo", "nosuchserver__echo"),  # the gateway's
        ("aggregate", "echo", "echo"),  # no server prefix at all
    ],
)
def test_an_unknown_tool_is_a_jsonrpc_error_naming_it(cluster, endpoint, tool, named):
    url = cluster.url(0, "demo" if endpoint == "server" else None)
    # Session era: a JSON-RPC error in a 200 answer, with the request's id.
    sid = legacy_initialize(url, cluster.token)
    r = legacy_post(url, cluster.token, call_tool(tool, id=7), session=sid)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == 7
    assert body["error"]["code"] == INVALID_PARAMS, body
    assert named in body["error"]["message"], body
    # Stateless era: the same error, with HTTP 400.
    r = stateless_post(url, cluster.token, "tools/call", {"name": tool, "arguments": {}}, name=tool)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == INVALID_PARAMS, r.text
    assert named in r.json()["error"]["message"], r.text


def test_a_stateless_call_that_needs_a_capability_its_client_did_not_declare_gets_32021(cluster):
    """2026-07-28 (SEP-2575): the demo server's tool asks the client's LLM (sampling) and the
    request's `_meta` declares no capability, so the gateway refuses the request with
    MissingRequiredClientCapability, naming what it needs, and HTTP 400."""
    r = stateless_post(cluster.url(0, "demo"), cluster.token, "tools/call",
                       {"name": "test_missing_capability", "arguments": {}}, name="test_missing_capability")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == -32021, error
    assert error["data"]["requiredCapabilities"] == {"sampling": {}}, error
    assert "sampling" in error["message"]


@pytest.mark.parametrize("server", [None, "demo"])
@pytest.mark.parametrize("token", [None, "not-a-token", "mcpcp_0000000000000000000000000000000000000000"])
def test_a_missing_or_bad_token_gets_401_with_www_authenticate(cluster, server, token):
    url = cluster.url(1, server)
    r = legacy_post(url, token, {"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["message"]
    r = stateless_post(url, token, "tools/list")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.fixture(scope="module")
def acme(cluster):
    """Tenant `acme`, its token, and its own server `acme-vault` (the demo server)."""
    cluster.mcpctl("tenant", "add", "acme")
    token = cluster.mcpctl("token", "create", "--tenant", "acme").strip()
    cluster.add_server("acme-vault", [MCPD, "demo-server"], tenant="acme", pool_size=1)
    cluster.wait_tools("acme-vault", ["echo"], token=token)
    return token


def test_another_tenants_server_is_404_and_absent_from_the_aggregate(cluster, acme):
    for node in range(3):
        own = cluster.url(node, "acme-vault")
        # The owner sees and uses it.
        assert "echo" in stateless_tool_names(own, acme)
        assert "acme-vault__echo" in stateless_tool_names(cluster.url(node), acme)
        # Tenant `default` does not: 404 on its endpoint, in both eras, and nothing in /mcp.
        r = legacy_post(own, cluster.token, INITIALIZE)
        assert r.status_code == 404, r.text
        assert "acme-vault" in r.json()["error"]["message"]
        r = stateless_post(own, cluster.token, "tools/list")
        assert r.status_code == 404, r.text
        listed = stateless_tool_names(cluster.url(node), cluster.token)
        assert "demo__echo" in listed
        assert not [t for t in listed if t.startswith("acme-vault__")]
        # Nor can it call it by its aggregate name.
        call = {"name": "acme-vault__echo", "arguments": {"message": "x"}}
        r = stateless_post(cluster.url(node), cluster.token, "tools/call", call, name="acme-vault__echo")
        assert r.status_code == 400 and r.json()["error"]["code"] == INVALID_PARAMS, r.text


@pytest.mark.parametrize("server", [None, "demo"])
@pytest.mark.parametrize("body", [b"{oops", b'{"jsonrpc":"2.0","id":1,"meth', b"", b"\xff\xfe"])
def test_a_malformed_body_gets_400_with_a_jsonrpc_parse_error(cluster, server, body):
    r = legacy_post(cluster.url(2, server), cluster.token, body)
    assert r.status_code == 400, r.text
    assert r.json()["id"] is None
    assert r.json()["error"]["code"] == PARSE_ERROR, r.text
    assert r.json()["error"]["message"].startswith("parse error")


@pytest.mark.parametrize("body", [b"[]", b"42", b'{"jsonrpc":"2.0"}'])
def test_valid_json_that_is_no_jsonrpc_message_gets_400_invalid_request(cluster, body):
    r = legacy_post(cluster.url(2), cluster.token, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == INVALID_REQUEST, r.text


@pytest.mark.parametrize("server", [None, "demo"])
def test_a_foreign_origin_gets_403(cluster, server):
    url = cluster.url(0, server)
    evil = {"Origin": "http://evil.example.com"}
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    r = legacy_post(url, cluster.token, ping, headers=evil)
    assert r.status_code == 403, r.text
    assert "Origin" in r.json()["error"]["message"]
    r = stateless_post(url, cluster.token, "tools/list", headers=evil)
    assert r.status_code == 403
    # Every method of the endpoint checks it, not only POST.
    sid = legacy_initialize(url, cluster.token)
    for method in ("GET", "DELETE"):
        r = httpx2.request(
            method,
            url,
            headers={
                "Authorization": f"Bearer {cluster.token}",
                "Accept": "text/event-stream",
                "Mcp-Session-Id": sid,
                **evil,
            },
            timeout=10,
        )
        assert r.status_code == 403, f"{method}: {r.status_code} {r.text}"
    # A local page's Origin passes.
    r = legacy_post(url, cluster.token, INITIALIZE, headers={"Origin": "http://localhost:5173"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("origin", [None, "http://evil.example.com", "http://localhost:5173"])
def test_a_foreign_host_gets_421_whatever_its_origin(cluster, origin):
    """DNS rebinding: `evil.example.com` resolved to the node's address arrives with its own
    Host. Refused before anything runs, with or without an Origin, on MCP and the admin API;
    probes answer any Host (load balancers probe by address)."""
    headers = {"Host": "evil.example.com:7400"}
    if origin:
        headers["Origin"] = origin
    r = legacy_post(cluster.url(0), cluster.token, INITIALIZE, headers=headers)
    assert r.status_code == 421, r.text
    assert r.json()["error"]["field"] == "Host", r.text
    r = httpx2.get(
        f"{cluster.base(1)}/v1/tenants",
        headers={"Authorization": f"Bearer {cluster.admin_token}", **headers},
        timeout=10,
    )
    assert r.status_code == 421, r.text
    assert httpx2.get(f"{cluster.base(1)}/readyz", headers=headers, timeout=10).status_code == 200
    # The node's own names pass: loopback by address and by name.
    r = legacy_post(cluster.url(0), cluster.token, INITIALIZE, headers={"Host": "localhost"})
    assert r.status_code == 200, r.text
