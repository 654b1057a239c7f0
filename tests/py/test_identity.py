"""Identity and roles, as an operator sets them up: a real OpenID provider (`oidc-provider`,
run by tests/py/oidc/provider.mjs) trusted as an issuer with `mcpctl issuer add`, its JWT access
tokens used on the MCP endpoints and the admin API of a 3-node cluster, and API tokens of every
role checked against every admin route.

What a client of the MCP authorization spec sees is checked as it would see it: the `401`'s
`WWW-Authenticate` points at the resource's metadata (RFC 9728), which names the resource and
the issuer; a token minted for another resource, expired, not yet valid, unsigned, from an
untrusted issuer or without the needed scope is refused with the reason.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import time
from urllib.parse import urlparse

import httpx2
import pytest
import jwt
from jwt.algorithms import RSAAlgorithm

from conftest import MCPD, start_cluster
from helpers import client, legacy_post, run, wait_until
from oidc_provider import OidcProvider, new_rsa_jwk

SCOPES = "mcp admin:read admin:write"

# The provider's clients: (client_id, tenant, roles, scope).
CLIENTS = [
    ("oidc-acme-user", "oidc-acme", ["user"], "mcp"),
    ("oidc-acme-admin", "oidc-acme", ["tenant-admin"], SCOPES),
    ("ops", None, ["operator"], SCOPES),
    ("root", None, ["cluster-admin"], SCOPES),
    ("oidc-acme-noscope", "oidc-acme", ["user"], "admin:read"),
]


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    clients = []
    for cid, tenant, roles, scope in CLIENTS:
        c = {"client_id": cid, "client_secret": f"secret-{cid}", "roles": roles, "scope": scope}
        if tenant:
            c["tenant"] = tenant
        clients.append(c)
    with OidcProvider(tmp_path_factory.mktemp("idp"), clients, ttl=300, scopes=SCOPES.split()) as p:
        yield p


@pytest.fixture(scope="module")
def trusted(cluster, idp):
    """The cluster with tenants `oidc-acme` and `oidc-globex`, the provider trusted as issuer `idp`, and
    `oidc-acme-demo`: oidc-acme's demo server on one node only (calls on the others take a peer hop)."""
    for t in ("oidc-acme", "oidc-globex"):
        cluster.mcpctl("tenant", "add", t)
    cluster.mcpctl("issuer", "add", "idp", "--issuer", idp.issuer, "--algorithm", "RS256")
    cluster.mcpctl("server", "add", "oidc-acme-demo", "--tenant", "oidc-acme", "--replicas", "1", "--", str(MCPD), "demo-server")
    yield cluster
    cluster.mcpctl("server", "rm", "oidc-acme-demo")
    cluster.mcpctl("issuer", "rm", "idp")


def challenge(resp: httpx2.Response) -> dict[str, str]:
    """The parameters of a `WWW-Authenticate: Bearer k="v", ...` challenge."""
    value = resp.headers.get("www-authenticate", "")
    assert value.startswith("Bearer "), value
    return dict(re.findall(r'(\w+)="([^"]*)"', value))


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


def post_mcp(url: str, token: str | None) -> httpx2.Response:
    """An `initialize` on `url` with `token`: where a caller's credential is judged."""
    return legacy_post(url, token, INITIALIZE)


def admin(cluster, method: str, path: str, token: str, node: int = 0, body: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    return httpx2.request(method, f"{cluster.base(node)}{path}", headers=headers, content=body, timeout=30)


# --- discovery ------------------------------------------------------------------------------


def test_a_client_without_a_token_is_pointed_at_the_resource_metadata(trusted, idp):
    for path, scopes in [("/mcp", ["mcp"]), ("/servers/oidc-acme-demo/mcp", ["mcp"])]:
        url = f"{trusted.base(0)}{path}"
        r = post_mcp(url, None)
        assert r.status_code == 401, r.text
        c = challenge(r)
        assert c["resource_metadata"] == f"{trusted.base(0)}/.well-known/oauth-protected-resource{path}"
        meta = httpx2.get(c["resource_metadata"], timeout=10).json()
        assert meta["resource"] == url
        assert meta["authorization_servers"] == [idp.issuer]
        assert meta["scopes_supported"] == scopes
    root = httpx2.get(f"{trusted.base(0)}/.well-known/oauth-protected-resource", timeout=10).json()
    assert root["resource"] == trusted.base(0)
    assert root["scopes_supported"] == ["admin:read", "admin:write"]
    assert httpx2.get(f"{trusted.base(0)}/.well-known/oauth-protected-resource/v1/tokens", timeout=10).status_code == 404


# --- JWT callers ----------------------------------------------------------------------------


def test_a_tenant_users_jwt_reaches_its_tenants_server_from_every_node(trusted, idp):
    """The server runs on one node; on the other two the call takes a peer hop, where the
    peer accepts the JWT caller the receiving node verified."""
    for node in range(trusted.nodes):
        url = trusted.url(node, "oidc-acme-demo")
        token = idp.token("oidc-acme-user", url, "mcp")

        async def call():
            async with client(url, token, "legacy") as c:
                r = await c.call_tool("echo", {"message": f"via node {node}"})
                return r.content[0].text

        assert "via node" in wait_until(lambda: run(call()), 60, f"oidc-acme-demo answers on node {node + 1}")


def test_the_same_jwt_is_refused_at_another_resource(trusted, idp):
    token = idp.token("oidc-acme-user", trusted.url(0, "oidc-acme-demo"), "mcp")
    r = post_mcp(trusted.url(0), token)
    assert r.status_code == 401
    c = challenge(r)
    assert c["error"] == "invalid_token"
    assert "not issued for this resource" in c["error_description"]
    assert r.json()["error"]["code"] == "invalid_token"


def test_a_jwt_without_the_needed_scope_gets_403_naming_the_scope(trusted, idp):
    token = idp.token("oidc-acme-noscope", trusted.url(0), "admin:read")
    r = post_mcp(trusted.url(0), token)
    assert r.status_code == 403
    c = challenge(r)
    assert c["error"] == "insufficient_scope"
    assert c["scope"] == "mcp"


def test_forged_expired_and_untrusted_tokens_are_refused_with_the_reason(trusted, idp):
    url = trusted.url(0)
    now = int(time.time())
    cases = {
        "expired": idp.forge(idp.claims("oidc-acme-user", url, "mcp", iat=now - 900, exp=now - 600)),
        "not valid yet": idp.forge(idp.claims("oidc-acme-user", url, "mcp", nbf=now + 600)),
        "not a well-formed JWT": idp.forge(idp.claims("oidc-acme-user", url, "mcp"), alg="none"),
        "is not trusted": idp.forge(idp.claims("oidc-acme-user", url, "mcp", iss="http://127.0.0.1:1")),
        # An ID token or another JWT of the issuer is not an access token (RFC 9068).
        "not an access token": idp.forge(idp.claims("oidc-acme-user", url, "mcp"), headers={"typ": "JWT"}),
    }
    # Signed by a key the issuer never published, under the issuer's own key id.
    stranger = RSAAlgorithm.from_jwk(json.dumps(new_rsa_jwk(idp.kid)))
    cases["signature does not verify"] = idp.forge(idp.claims("oidc-acme-user", url, "mcp"), key=stranger)
    for reason, token in cases.items():
        r = post_mcp(url, token)
        assert r.status_code == 401, (reason, r.status_code, r.text)
        assert reason in challenge(r).get("error_description", ""), (reason, r.headers.get("www-authenticate"))
    assert trusted.metric("mcpd_jwt_refused_total", 'reason="expired"') >= 1


def test_a_rotated_signing_key_is_fetched_when_a_token_names_it(trusted, idp):
    url = trusted.url(1)
    before = idp.token("oidc-acme-user", url, "mcp")
    assert post_mcp(url, before).status_code == 200
    new_kid = idp.rotate()
    after = idp.token("oidc-acme-user", url, "mcp")
    assert jwt.get_unverified_header(after)["kid"] == new_kid
    # The node refetches on the unknown key id, at most once per refresh interval (10 s).
    wait_until(lambda: post_mcp(url, after).status_code == 200, 30, "the token of the new key is accepted")
    assert post_mcp(url, before).status_code == 200, "the old key is still published"


def test_jwt_roles_gate_the_admin_api(trusted, idp):
    base = trusted.base(0)
    ops = idp.token("ops", base, SCOPES)
    assert admin(trusted, "GET", "/v1/cluster/status", ops).status_code == 200
    r = admin(trusted, "POST", "/v1/tenants", ops, body=json.dumps({"name": "nope"}))
    assert r.status_code == 403, r.text
    root = idp.token("root", base, SCOPES)
    assert admin(trusted, "GET", "/v1/issuers", root).json()["items"][0]["spec"]["issuer"] == idp.issuer
    # A token for the MCP endpoint is not one for the admin API.
    mcp_only = idp.token("root", trusted.url(0), SCOPES)
    assert admin(trusted, "GET", "/v1/cluster/status", mcp_only).status_code == 401


# --- API token roles × routes ---------------------------------------------------------------

ROLES = ["cluster-admin", "tenant-admin", "operator", "viewer", "user", "metrics"]

# Which roles pass each route's role check (the table in deploy/README.md, "Roles"). A passing
# request is sent with a body or target that fails after the check (400, 404, 422), so no
# request here changes the cluster.
CLUSTER_READ = {"cluster-admin", "operator", "viewer"}
CLUSTER_WRITE = {"cluster-admin"}
OBJECT_READ = {"cluster-admin", "tenant-admin", "operator", "viewer"}
OBJECT_WRITE = {"cluster-admin", "tenant-admin"}
OPERATE = {"cluster-admin", "tenant-admin", "operator"}
METRICS = {"cluster-admin", "operator", "viewer", "metrics"}
MCP = {"cluster-admin", "tenant-admin", "user"}
ROUTES = [
    ("GET", "/v1/cluster/status", None, CLUSTER_READ),
    ("POST", "/v1/cluster/join-tokens", "not json", CLUSTER_WRITE),
    ("POST", "/v1/cluster/nodes", "not json", CLUSTER_WRITE),
    ("DELETE", "/v1/cluster/nodes/0", None, CLUSTER_WRITE),
    ("POST", "/v1/cluster/promote", "not json", CLUSTER_WRITE),
    ("GET", "/v1/snapshot", None, CLUSTER_WRITE),
    ("GET", "/v1/servers", None, OBJECT_READ),
    ("GET", "/v1/servers/no-such-server", None, OBJECT_READ),
    ("GET", "/v1/servers/no-such-server/status", None, OBJECT_READ),
    ("GET", "/v1/servers/no-such-server/catalogue", None, OBJECT_READ),
    ("GET", "/v1/servers/no-such-server/diff", None, OBJECT_READ),
    ("PUT", "/v1/servers/no-such-server/pins", "not json", OBJECT_WRITE),
    ("DELETE", "/v1/servers/no-such-server/pins", None, OBJECT_WRITE),
    ("GET", "/v1/traffic", None, OBJECT_READ),
    ("GET", "/v1/session", None, OBJECT_READ),
    ("POST", "/v1/session", None, OBJECT_READ),
    ("POST", "/v1/servers", "not json", OBJECT_WRITE),
    ("PUT", "/v1/servers/no-such-server", "not json", OBJECT_WRITE),
    ("PATCH", "/v1/servers/no-such-server", "not json", OPERATE),
    ("DELETE", "/v1/servers/no-such-server", None, OBJECT_WRITE),
    ("GET", "/v1/tenants", None, OBJECT_READ),
    ("POST", "/v1/tenants", "not json", CLUSTER_WRITE),
    ("DELETE", "/v1/tenants/no-such-tenant", None, CLUSTER_WRITE),
    ("GET", "/v1/tokens", None, OBJECT_READ),
    ("GET", "/v1/tokens/no-such-token", None, OBJECT_READ),
    ("POST", "/v1/tokens", "not json", OBJECT_WRITE),
    ("DELETE", "/v1/tokens/no-such-token", None, OBJECT_WRITE),
    ("GET", "/v1/issuers", None, OBJECT_READ),
    ("POST", "/v1/issuers", "not json", CLUSTER_WRITE),
    ("PUT", "/v1/issuers/no-such-issuer", "not json", CLUSTER_WRITE),
    ("DELETE", "/v1/issuers/no-such-issuer", None, CLUSTER_WRITE),
    ("GET", "/v1/usage", None, OBJECT_READ),
    ("GET", "/v1/limits", None, OBJECT_READ),
    ("GET", "/v1/limits/no-such-limit/usage", None, OBJECT_READ),
    ("POST", "/v1/limits", "not json", CLUSTER_WRITE),
    ("DELETE", "/v1/limits/no-such-limit", None, CLUSTER_WRITE),
    ("GET", "/v1/approved-commands", None, OBJECT_READ),
    ("POST", "/v1/approved-commands", "not json", CLUSTER_WRITE),
    ("DELETE", "/v1/approved-commands/no-such-command", None, CLUSTER_WRITE),
    ("GET", "/v1/virtual-servers", None, OBJECT_READ),
    ("POST", "/v1/virtual-servers", "not json", OBJECT_WRITE),
    ("DELETE", "/v1/virtual-servers/no-such-vserver", None, OBJECT_WRITE),
    ("GET", "/v1/policies", None, OBJECT_READ),
    ("POST", "/v1/policies", "not json", OBJECT_WRITE),
    ("POST", "/v1/policies/test", "not json", OBJECT_READ),
    ("DELETE", "/v1/policies/no-such-policy", None, OBJECT_WRITE),
    ("GET", "/v1/audit", None, CLUSTER_READ),
    ("PUT", "/v1/audit/retention", "not json", CLUSTER_WRITE),
    ("POST", "/v1/audit/verify", "not json", CLUSTER_READ),
    ("GET", "/metrics", None, METRICS),
    ("POST", "/mcp", "not json", MCP),
]


@pytest.fixture(scope="module")
def role_tokens(trusted) -> dict[str, str]:
    tokens = {}
    for role in ROLES:
        args = ["token", "create", "--role", role, "--name", f"matrix-{role}"]
        if role in ("tenant-admin", "user"):
            args += ["--tenant", "oidc-acme"]
        tokens[role] = trusted.mcpctl(*args).strip()
    return tokens


def test_every_admin_route_checks_the_role_of_every_caller(trusted, role_tokens):
    wrong = []
    for method, path, body, allowed in ROUTES:
        for role, token in role_tokens.items():
            r = admin(trusted, method, path, token, body=body)
            passed = r.status_code not in (401, 403)
            if passed != (role in allowed):
                wrong.append(f"{method} {path} as {role}: {r.status_code} {r.text[:120]}")
    assert not wrong, "\n".join(wrong)


def test_a_tenant_admin_manages_its_own_tenant_only(trusted, role_tokens):
    ta = role_tokens["tenant-admin"]
    servers = admin(trusted, "GET", "/v1/servers", ta).json()["items"]
    names = {s["spec"]["name"] for s in servers}
    assert "oidc-acme-demo" in names and "demo" in names
    assert all(s["spec"]["tenant"] in (None, "oidc-acme") for s in servers)
    assert {t["spec"]["name"] for t in admin(trusted, "GET", "/v1/tenants", ta).json()["items"]} == {"oidc-acme"}
    assert {t["tenant"] for t in admin(trusted, "GET", "/v1/tokens", ta).json()["items"]} == {"oidc-acme"}

    remote = {"name": "oidc-acme-remote", "url": "https://mcp.oidc-acme.invalid/mcp", "tenant": "oidc-acme"}
    local = {"name": "oidc-acme-local", "command": "/bin/true", "tenant": "oidc-acme"}
    other = {"name": "oidc-globex-remote", "url": "https://mcp.oidc-acme.invalid/mcp", "tenant": "oidc-globex"}
    # What only the nodes can reach (their loopback, the cloud metadata address) or read
    # (their files) stays a cluster admin's.
    for field, bad in [
        ("url", {**remote, "url": "https://127.0.0.1:7400/mcp"}),
        ("url", {**remote, "url": "http://169.254.169.254/latest"}),
        ("ca_file", {**remote, "ca_file": "/etc/shadow"}),
        # Which user a process runs as decides whose secrets it can read.
        ("sandbox.run_as", {**local, "sandbox": {"run_as": "nobody"}}),
        ("sandbox", {**local, "sandbox": {"memory_mb": 4096}}),
    ]:
        r = admin(trusted, "POST", "/v1/servers", ta, body=json.dumps(bad))
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    # Another tenant's server is not the tenant admin's to overwrite, even by its name.
    hidden = {"name": "oidc-globex-hidden", "url": "https://mcp.globex.invalid/mcp", "tenant": "oidc-globex"}
    root = role_tokens["cluster-admin"]
    assert admin(trusted, "POST", "/v1/servers", root, body=json.dumps(hidden)).status_code == 201
    try:
        takeover = {**hidden, "tenant": "oidc-acme", "url": "https://evil.invalid/mcp"}
        r = admin(trusted, "PUT", "/v1/servers/oidc-globex-hidden", ta, body=json.dumps(takeover))
        assert r.status_code == 409, r.text
        kept = admin(trusted, "GET", "/v1/servers/oidc-globex-hidden", root).json()["spec"]
        assert kept["tenant"] == "oidc-globex" and kept["url"] == hidden["url"]
    finally:
        admin(trusted, "DELETE", "/v1/servers/oidc-globex-hidden", root)
    assert admin(trusted, "POST", "/v1/servers", ta, body=json.dumps(local)).status_code == 403
    assert admin(trusted, "POST", "/v1/servers", ta, body=json.dumps(other)).status_code == 403
    r = admin(trusted, "POST", "/v1/servers", ta, body=json.dumps(remote))
    assert r.status_code == 201, r.text
    assert admin(trusted, "DELETE", "/v1/servers/demo", ta).status_code == 404, "a global server is not its to remove"
    assert admin(trusted, "DELETE", "/v1/servers/oidc-acme-remote", ta).status_code == 200

    mint = lambda role, tenant: admin(  # noqa: E731
        trusted, "POST", "/v1/tokens", ta, body=json.dumps({"name": "ta", "role": role, "tenant": tenant})
    )
    r = mint("user", "oidc-acme")
    assert r.status_code == 201, r.text
    assert mint("user", "oidc-globex").status_code == 403
    assert mint("cluster-admin", None).status_code == 403
    minted = r.json()["info"]["id"]
    assert admin(trusted, "DELETE", f"/v1/tokens/{minted}", ta).status_code == 200
    admin_id = next(
        t["id"] for t in admin(trusted, "GET", "/v1/tokens", role_tokens["cluster-admin"]).json()["items"]
        if t["role"] == "cluster-admin"
    )
    assert admin(trusted, "DELETE", f"/v1/tokens/{admin_id}", ta).status_code == 404


def test_an_operator_turns_servers_off_and_on_and_changes_nothing_else(trusted, role_tokens):
    op = role_tokens["operator"]
    off = admin(trusted, "PATCH", "/v1/servers/oidc-acme-demo", op, body=json.dumps({"enabled": False}))
    assert off.status_code == 200, off.text
    on = admin(trusted, "PATCH", "/v1/servers/oidc-acme-demo", op, body=json.dumps({"enabled": True}))
    assert on.status_code == 200, on.text
    r = admin(trusted, "PATCH", "/v1/servers/oidc-acme-demo", op, body=json.dumps({"pool_size": 3}))
    assert r.status_code == 403 and "enabled" in r.json()["error"]["message"]


def test_an_api_token_narrowed_to_a_scope_gets_only_that_part(trusted):
    ro = trusted.mcpctl("token", "create", "--role", "cluster-admin", "--scope", "admin:read", "--name", "ro").strip()
    assert admin(trusted, "GET", "/v1/servers", ro).status_code == 200
    r = admin(trusted, "POST", "/v1/tenants", ro, body=json.dumps({"name": "nope"}))
    assert r.status_code == 403 and challenge(r)["scope"] == "admin:write", r.text
    r = post_mcp(trusted.url(0), ro)
    assert r.status_code == 403 and challenge(r)["scope"] == "mcp", r.text
    listed = {t["name"]: t for t in json.loads(trusted.mcpctl("token", "list", "-o", "json"))}
    assert listed["ro"]["scopes"] == ["admin:read"]
    assert "scopes" not in listed["matrix-viewer"], "an unnarrowed token has every scope of its role"


def test_a_tenants_server_points_its_clients_at_its_tenants_issuer_first(trusted, idp, tmp_path_factory):
    with OidcProvider(tmp_path_factory.mktemp("oidc-globex-idp"), [], scopes=["mcp"]) as globex_idp, OidcProvider(
        tmp_path_factory.mktemp("oidc-acme-idp"), [], scopes=["mcp"]
    ) as acme_idp:
        trusted.mcpctl("issuer", "add", "oidc-globex-idp", "--issuer", globex_idp.issuer, "--tenant", "oidc-globex")
        trusted.mcpctl("issuer", "add", "oidc-acme-idp", "--issuer", acme_idp.issuer, "--tenant", "oidc-acme")
        try:
            meta = lambda path: httpx2.get(  # noqa: E731
                f"{trusted.base(0)}/.well-known/oauth-protected-resource{path}", timeout=10
            ).json()["authorization_servers"]
            assert meta("/servers/oidc-acme-demo/mcp") == [acme_idp.issuer, idp.issuer], "its tenant's first, no other tenant's"
            assert meta("/mcp")[0] == idp.issuer, "the aggregate endpoint names the cluster-wide issuer first"
        finally:
            trusted.mcpctl("issuer", "rm", "oidc-globex-idp")
            trusted.mcpctl("issuer", "rm", "oidc-acme-idp")


def test_token_list_shows_when_each_token_was_last_used(trusted, role_tokens):
    """The route matrix used every role's token; each node reports the tokens it saw in one
    write every 30 s, so `last_used_at` appears within about that, without a write per call."""
    unused = trusted.mcpctl("token", "create", "--role", "viewer", "--name", "never-used").strip()
    assert unused
    started = int(time.time())
    admin(trusted, "GET", "/v1/servers", role_tokens["viewer"], node=2)

    def listed():
        by_name = {t["name"]: t for t in json.loads(trusted.mcpctl("token", "list", "-o", "json"))}
        return by_name if by_name["matrix-viewer"].get("last_used_at", 0) >= started - 60 else None

    by_name = wait_until(listed, 75, "the viewer token's use is recorded")
    assert "last_used_at" not in by_name["never-used"]
    assert "LAST USED" in trusted.mcpctl("token", "list")


def test_a_removed_issuer_takes_its_verified_tokens_with_it(trusted, idp):
    """A node caches the tokens it verified; removing the issuer refuses them at the next call."""
    url = trusted.url(0)
    token = idp.token("oidc-acme-user", url, "mcp")
    assert post_mcp(url, token).status_code == 200
    trusted.mcpctl("issuer", "rm", "idp")
    try:
        r = wait_until(lambda: r if (r := post_mcp(url, token)).status_code == 401 else None, 10, "the token is refused")
        assert "is not trusted" in challenge(r)["error_description"]
    finally:
        trusted.mcpctl("issuer", "add", "idp", "--issuer", idp.issuer, "--algorithm", "RS256")
    wait_until(lambda: post_mcp(url, token).status_code == 200, 10, "trusted again")


def test_a_tenants_server_named_by_dns_is_not_reached_at_the_nodes_own_addresses(trusted, role_tokens):
    """A tenant admin may not write a loopback address, so it writes a name that resolves to one
    (here the machine's own host name): every node resolves it at connect time, keeps the
    nodes' own addresses out, and so never calls its own API for the tenant (SSRF)."""
    host = socket.gethostname()
    addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    if not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        pytest.skip(f"{host} resolves to {addrs}, not to loopback only")
    name = "oidc-acme-rebound"
    port = urlparse(trusted.base(0)).port
    spec = {"name": name, "url": f"https://{host}:{port}/mcp", "tenant": "oidc-acme"}
    r = admin(trusted, "POST", "/v1/servers", role_tokens["tenant-admin"], body=json.dumps(spec))
    assert r.status_code == 201, r.text
    try:
        refused = lambda: sum(trusted.metric("mcpd_egress_refused_total", "", node=n) or 0 for n in range(trusted.nodes))
        wait_until(lambda: refused() >= trusted.nodes, 60, "every node refused to resolve the name to itself")
        status = admin(trusted, "GET", f"/v1/servers/{name}/status", role_tokens["cluster-admin"]).json()
        assert not any("ready" in r["processes"] for r in status["replicas"]), status
    finally:
        trusted.mcpctl("server", "rm", name)


def test_a_tenant_admin_adds_a_local_server_only_by_running_an_approved_command(trusted, role_tokens):
    """A local server's command runs on every node as mcpd's user: a tenant admin may add one
    only as a cluster admin approved it (program, leading arguments, allowed variables)."""
    ta = role_tokens["tenant-admin"]
    name = "oidc-acme-local-demo"
    spec = {"name": name, "command": str(MCPD), "args": ["demo-server"], "tenant": "oidc-acme", "pool_size": 1}
    r = admin(trusted, "POST", "/v1/servers", ta, body=json.dumps(spec))
    assert r.status_code == 403 and "approved command" in r.text, r.text
    trusted.mcpctl("command", "approve", "demo", "--env", "RUST_LOG", "--description", "the demo server",
                   "--", str(MCPD), "demo-server")
    try:
        assert "demo-server" in trusted.mcpctl("command", "list")
        seen = admin(trusted, "GET", "/v1/approved-commands", ta).json()["items"]
        assert [c["spec"]["name"] for c in seen] == ["demo"], seen
        # Only a cluster admin approves.
        r = admin(trusted, "PUT", "/v1/approved-commands/mine", ta,
                  body=json.dumps({"name": "mine", "command": "/bin/sh"}))
        assert r.status_code == 403, r.text
        # Another argument, a variable not allowed (a library to preload), or a working
        # directory of its own: refused.
        for bad in [
            {**spec, "args": ["demo-server", "--extra"]},
            {**spec, "env": {"LD_PRELOAD": "/tmp/evil.so"}},
            {**spec, "cwd": "/"},
            {**spec, "command": "/bin/sh", "args": ["-c", "id"]},
        ]:
            r = admin(trusted, "POST", "/v1/servers", ta, body=json.dumps(bad))
            assert r.status_code == 403, (bad, r.text)
        # As approved, with an allowed variable: added, and it serves the tenant.
        r = admin(trusted, "POST", "/v1/servers", ta, body=json.dumps({**spec, "env": {"RUST_LOG": "info"}}))
        assert r.status_code == 201, r.text
        trusted.wait_tools(name, ["echo"], token=role_tokens["user"])
    finally:
        trusted.mcpctl("server", "rm", name)
        trusted.mcpctl("command", "rm", "demo")


def test_with_tenant_issuers_kept_out_of_shared_metadata_a_stranger_learns_no_tenants_idp(tmp_path_factory):
    """`identity.tenant_issuers_in_shared_metadata = false`: the shared resources' metadata and
    the console's plain sign-in page name the cluster-wide issuer only; a tenant's server, and
    the sign-in page opened for that tenant, name its issuer first and no other tenant's."""
    config = tmp_path_factory.mktemp("private-issuers") / "mcpd.toml"
    config.write_text("[identity]\ntenant_issuers_in_shared_metadata = false\n")
    c = start_cluster(tmp_path_factory, "private-issuers", 1, [f"--config={config}"])
    try:
        # Issuers are data here: nothing in this test asks them for a key.
        for name, url, tenant in [("corp", "https://corp-idp.invalid", None),
                                  ("acme", "https://acme-idp.invalid", "acme"),
                                  ("globex", "https://globex-idp.invalid", "globex")]:
            if tenant:
                c.mcpctl("tenant", "add", tenant)
            c.mcpctl("issuer", "add", name, "--issuer", url, "--jwks-url", f"{url}/jwks",
                     "--console-client-id", "mcpd-console", *(["--tenant", tenant] if tenant else []))
        c.mcpctl("server", "add", "acme-demo", "--tenant", "acme", "--", str(MCPD), "demo-server")

        def metadata(path: str) -> list[str]:
            r = httpx2.get(f"{c.base(0)}/.well-known/oauth-protected-resource{path}", timeout=10)
            assert r.status_code == 200, r.text
            return r.json()["authorization_servers"]

        def sign_in(query: str = "") -> list[str]:
            r = httpx2.get(f"{c.base(0)}/v1/session/providers{query}", timeout=10)
            assert r.status_code == 200, r.text
            return [p["issuer"] for p in r.json()["providers"]]

        assert metadata("") == ["https://corp-idp.invalid"]
        assert metadata("/mcp") == ["https://corp-idp.invalid"]
        assert sign_in() == ["https://corp-idp.invalid"], "the plain sign-in page names no tenant's provider"
        assert metadata("/servers/acme-demo/mcp") == ["https://acme-idp.invalid", "https://corp-idp.invalid"]
        assert sign_in("?tenant=acme") == ["https://acme-idp.invalid", "https://corp-idp.invalid"]
        r = httpx2.get(f"{c.base(0)}/v1/session/providers?tenant=acme&x=1", timeout=10)
        assert r.status_code == 400 and "x" in r.text, r.text
    finally:
        c.down()
