"""A remote server behind OAuth: the node is the server's OAuth client (`mcpctl server add
NAME --url URL --oauth-token-url ... --oauth-client-id ... --oauth-client-secret-env VAR`),
gets its access tokens from a real authorization server (`oidc-provider`, tests/py/oidc) with
the client credentials grant and the resource indicator, and calls the server with them.

The protected server is real too: mcpd itself, as the resource server of its tenant `oauth-up`
(the provider trusted as that tenant's issuer), serving its demo server at
`/servers/oauth-inner/mcp`. The cluster's global server `oauth-outer` is registered with that
URL and the OAuth client: a call to `oauth-outer` goes out of the node over HTTPS with the
token, and comes back in as a call of the client's own identity (`jwt:ISSUER:CLIENT_ID`).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx2
import pytest

from conftest import CA_CERT, MCPD, VENV_BIN, Cluster
from helpers import client, run, text_of, wait_until
from oidc_provider import OidcProvider
from upstreams import Upstream, free_port

TENANT = "oauth-up"
ISSUER = "oauth-up-idp"
ROTATED = "oauth-up-idp-rotated"
INNER = "oauth-inner"
CLIENT_ID = "mcpd-upstream-client"
SECRET = f"secret-{uuid.uuid4().hex}"
SECRET_VAR = "OAUTH_UPSTREAM_SECRET"


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    clients = [{"client_id": CLIENT_ID, "client_secret": SECRET, "scope": "mcp"}]
    with OidcProvider(tmp_path_factory.mktemp("oauth-upstream-idp"), clients, ttl=300) as p:
        yield p


@pytest.fixture(scope="module")
def inner(cluster: Cluster, idp: OidcProvider) -> str:
    """Tenant `oauth-up`'s demo server on one node, the provider trusted as the tenant's
    issuer; returns its URL on node 0 (which forwards to the node that runs it)."""
    cluster.mcpctl("tenant", "add", TENANT)
    cluster.mcpctl("issuer", "add", ISSUER, "--issuer", idp.issuer, "--tenant", TENANT, "--algorithm", "RS256")
    cluster.mcpctl("server", "add", INNER, "--tenant", TENANT, "--replicas", "1", "--", str(MCPD), "demo-server")
    try:
        yield cluster.url(0, INNER)
    finally:
        cluster.mcpctl("server", "rm", INNER)
        cluster.mcpctl("issuer", "rm", ISSUER)
        cluster.mcpctl("tenant", "rm", TENANT)


def add_outer(c: Cluster, name: str, url: str, token_url: str, secret: str) -> None:
    os.environ[SECRET_VAR] = secret
    try:
        c.mcpctl("server", "add", name, "--url", url, "--ca-file", str(CA_CERT), "--replicas", "1", "--pool-size", "1",
                 "--oauth-token-url", token_url, "--oauth-client-id", CLIENT_ID,
                 "--oauth-client-secret-env", SECRET_VAR, "--oauth-scope", "mcp")
    finally:
        del os.environ[SECRET_VAR]


def tokens(c: Cluster, server: str, outcome: str) -> float:
    """Tokens the cluster's nodes fetched for `server`, by outcome."""
    return sum(c.metric("mcpd_upstream_oauth_tokens_total", f'server="{server}",outcome="{outcome}"', n) or 0
               for n in range(c.nodes))


def attempt(c: Cluster, server: str, message: str, tool: str = "echo", args: dict | None = None) -> tuple[bool, str]:
    """Calls `tool` (the demo server's `echo` of `message`, by default) on `server` through
    node 0: (whether it worked, its text or error)."""
    async def call() -> tuple[bool, str]:
        async with client(c.url(0, server), c.token, "2026-07-28") as cl:
            try:
                r = await cl.call_tool(tool, args if args is not None else {"message": message})
            except Exception as e:  # the JSON-RPC error, as the SDK raises it
                return False, str(e)
            return not r.is_error, text_of(r)

    return run(call())


def test_a_remote_server_is_called_with_a_token_its_authorization_server_issued(cluster, idp, inner):
    c = cluster
    # The token is asked for the server's URL, which is the resource its metadata names.
    prm = httpx2.get(f"{c.base(0)}/.well-known/oauth-protected-resource/servers/{INNER}/mcp", timeout=10).json()
    assert prm["resource"] == inner, prm
    fetched_before = tokens(c, "oauth-outer", "ok")
    add_outer(c, "oauth-outer", inner, idp.token_endpoint, SECRET)
    try:
        c.wait_tools("oauth-outer", ["echo"])
        for i in range(3):
            ok, text = attempt(c, "oauth-outer", f"hop {i}")
            assert ok and f"hop {i}" in text, text

        # The calls reached the inner server as the OAuth client, not as the caller.
        def inner_calls() -> list[dict]:
            return [e for n in range(c.nodes) for e in c.call_log(n)
                    if e.get("server") == INNER and e.get("name") == "echo"]

        logged = wait_until(lambda: x if len(x := inner_calls()) >= 3 else None, 30, "the inner calls logged")
        assert {e["subject"] for e in logged} == {f"jwt:{ISSUER}:{CLIENT_ID}"}, logged
        assert {e["tenant"] for e in logged} == {TENANT}
        # One connection, one token for all of it: kept, not fetched per request.
        assert tokens(c, "oauth-outer", "ok") - fetched_before == 1
        # The secret is sealed, shown redacted, and not in the audit trail.
        shown = json.loads(c.mcpctl("server", "get", "oauth-outer", "-o", "json"))["spec"]["oauth"]
        assert shown == {"token_url": idp.token_endpoint, "client_id": CLIENT_ID, "client_secret": "<redacted>",
                         "scopes": ["mcp"]}, shown
        assert SECRET not in c.mcpctl("audit", "list", "--since", "0", "-o", "json")

        # The issuer is withdrawn: the server refuses the token, the node drops it and tries
        # once with a new one, and the call fails as not run.
        c.mcpctl("issuer", "rm", ISSUER)
        try:
            refusal = wait_until(lambda: r[1] if not (r := attempt(c, "oauth-outer", "refused"))[0] else None,
                                 30, "the server to refuse the token")
            assert "HTTP 401" in refusal and "did not run" in refusal, refusal
            assert tokens(c, "oauth-outer", "ok") >= 2, "a new token was fetched after the 401"
        finally:
            c.mcpctl("issuer", "add", ISSUER, "--issuer", idp.issuer, "--tenant", TENANT, "--algorithm", "RS256")
        # Trusted again: the token fetched after the refusal works.
        back = wait_until(lambda: r[1] if (r := attempt(c, "oauth-outer", "back"))[0] else None, 30,
                          "the call to work again")
        assert "back" in back

        # The provider rotates its key and unpublishes the old one, and the provider is
        # trusted under a new name (the inner node reads its keys afresh): the kept token no
        # longer verifies. Within one call, the server's 401 makes the node fetch a token
        # signed with the new key and send the call once more; the caller sees no error.
        before = tokens(c, "oauth-outer", "ok")
        idp.rotate()
        idp.drop_old_keys()
        c.mcpctl("issuer", "rm", ISSUER)
        c.mcpctl("issuer", "add", ROTATED, "--issuer", idp.issuer, "--tenant", TENANT, "--algorithm", "RS256")
        try:
            wait_until(lambda: ROTATED in c.mcpctl("issuer", "list", node=0), 10, "node 1 trusts the issuer")
            ok, text = attempt(c, "oauth-outer", "rotated")
            assert ok and "rotated" in text, text
            assert tokens(c, "oauth-outer", "ok") == before + 1, "one new token, for the one refusal"
        finally:
            c.mcpctl("issuer", "rm", ROTATED)
            c.mcpctl("issuer", "add", ISSUER, "--issuer", idp.issuer, "--tenant", TENANT, "--algorithm", "RS256")
    finally:
        c.mcpctl("server", "rm", "oauth-outer")


def test_refused_client_credentials_are_the_servers_start_error_without_the_secret(cluster, idp, inner):
    c = cluster
    wrong = f"wrong-{uuid.uuid4().hex}"
    add_outer(c, "oauth-wrong", inner, idp.token_endpoint, wrong)
    try:
        def start_error() -> str | None:
            status = json.loads(c.mcpctl("server", "status", "oauth-wrong", "-o", "json"))
            return next((d.get("last_error") for r in status["replicas"] for d in r["details"]
                         if d.get("last_error")), None)

        error = wait_until(start_error, 30, "the start to fail")
        assert "refused the client credentials" in error and "invalid_client" in error, error
        assert wrong not in error
        assert tokens(c, "oauth-wrong", "refused") >= 1
    finally:
        c.mcpctl("server", "rm", "oauth-wrong")


def test_a_legacy_sse_server_behind_oauth_gets_the_token_on_its_stream_and_every_post(cluster, idp):
    """A server of the legacy HTTP+SSE transport that is an OAuth resource server: the Python
    SDK's SSE app with its bearer middleware, accepting only the provider's tokens minted for
    its own URL. The node opens the event stream and POSTs its messages with the token it got
    by the client credentials grant; without the token the stream is refused (401)."""
    c = cluster
    port = free_port()
    key = f"key-{uuid.uuid4().hex}"
    argv = [str(VENV_BIN / "python"), str(Path(__file__).resolve().parent / "servers/remote_tools.py"), str(port),
            key, "--legacy-sse", "--oauth", idp.issuer, idp.jwks_uri]
    up = Upstream(argv, port)
    up.path = "/sse"
    up.start()
    name = "sse-oauth"
    try:
        assert httpx2.get(up.url, headers={"X-Api-Key": key}, timeout=10).status_code == 401, "the stream needs a token"
        fetched_before = tokens(c, name, "ok")
        os.environ[SECRET_VAR] = SECRET
        try:
            c.mcpctl("server", "add", name, "--url", up.url, "--header", f"X-Api-Key={key}", "--replicas", "1",
                     "--pool-size", "1", "--oauth-token-url", idp.token_endpoint, "--oauth-client-id", CLIENT_ID,
                     "--oauth-client-secret-env", SECRET_VAR, "--oauth-scope", "mcp")
        finally:
            del os.environ[SECRET_VAR]
        c.wait_tools(name, ["echo", "add"])
        status = json.loads(c.mcpctl("server", "status", name, "-o", "json"))
        transports = {d.get("transport") for r in status["replicas"] for d in r["details"]}
        assert transports == {"sse"}, f"reached over the legacy transport: {status}"
        for i in range(3):
            ok, text = attempt(c, name, f"sse {i}", tool="echo", args={"text": f"sse {i}"})
            assert ok and text == f"sse {i}", text
        assert tokens(c, name, "ok") - fetched_before == 1, "one token for the stream and every POST"
    finally:
        c.mcpctl("server", "rm", name)
        up.stop()


def test_a_tenant_admin_cannot_point_an_oauth_client_at_the_nodes_or_their_files(cluster, inner):
    c = cluster
    name = "oauth-tenant-admin"
    token = c.mcpctl("token", "create", "--role", "tenant-admin", "--tenant", TENANT, "--name", name,
                     "--ttl", "600").strip()
    try:
        good = {"token_url": "https://login.example.com/token", "client_id": CLIENT_ID, "client_secret": "s"}
        for field, oauth in [("oauth.token_url", {**good, "token_url": "http://127.0.0.1:9/token"}),
                             ("oauth.token_url", {**good, "token_url": "https://169.254.169.254/token"}),
                             ("oauth.ca_file", {**good, "ca_file": "/etc/shadow"})]:
            spec = {"name": name, "tenant": TENANT, "url": "https://mcp.example.com/mcp", "oauth": oauth}
            r = httpx2.post(f"{c.base(0)}/v1/servers", json=spec, headers={"Authorization": f"Bearer {token}"},
                            timeout=10)
            assert r.status_code == 422 and r.json()["error"]["field"] == field, (field, r.text)
    finally:
        ids = [t["id"] for t in json.loads(c.mcpctl("token", "list", "-o", "json")) if t["name"] == name]
        for tid in ids:
            c.mcpctl("token", "revoke", tid)


def test_a_stored_client_secret_goes_only_to_the_token_endpoint_it_was_given_for(cluster, idp):
    c = cluster
    name = "oauth-moved"
    add_outer(c, name, "https://mcp.example.com/mcp", "https://login.example.com/token", SECRET)
    try:
        admin = {"Authorization": f"Bearer {c.admin_token}"}
        shown = httpx2.get(f"{c.base(0)}/v1/servers/{name}", headers=admin, timeout=10).json()["spec"]
        assert shown["oauth"]["client_secret"] == "<redacted>"
        # Sent back redacted with the same endpoint and client: the stored secret stays.
        r = httpx2.put(f"{c.base(0)}/v1/servers/{name}", json={**shown, "pool_size": 2}, headers=admin, timeout=10)
        assert r.status_code == 200, r.text
        # Pointed elsewhere, it must be given again.
        moved = {**shown, "oauth": {**shown["oauth"], "token_url": "https://attacker.example.com/token"}}
        r = httpx2.put(f"{c.base(0)}/v1/servers/{name}", json=moved, headers=admin, timeout=10)
        assert r.status_code == 422 and r.json()["error"]["field"] == "oauth.client_secret", r.text
    finally:
        c.mcpctl("server", "rm", name)


def test_an_oauth_client_is_checked_when_the_server_is_written(cluster, idp):
    c = cluster
    os.environ[SECRET_VAR] = SECRET
    try:
        r = c.mcpctl_result("server", "add", "oauth-plain", "--url", "https://mcp.example.com/mcp",
                            "--oauth-token-url", "http://idp.example.com/token", "--oauth-client-id", CLIENT_ID,
                            "--oauth-client-secret-env", SECRET_VAR)
        assert r.returncode != 0 and "oauth.token_url" in r.stderr, r
        r = c.mcpctl_result("server", "add", "oauth-local", "--oauth-token-url", idp.token_endpoint,
                            "--oauth-client-id", CLIENT_ID, "--oauth-client-secret-env", SECRET_VAR,
                            "--", str(MCPD), "demo-server")
        assert r.returncode != 0 and "oauth" in r.stderr and "remote server" in r.stderr, r
        r = c.mcpctl_result("server", "add", "oauth-half", "--url", "https://mcp.example.com/mcp",
                            "--oauth-client-id", CLIENT_ID)
        assert r.returncode != 0 and "--oauth-token-url" in r.stderr, r
    finally:
        del os.environ[SECRET_VAR]
