"""The MCP authorization flow end to end, as a real client runs it: the Python SDK's OAuth client
(`mcp.client.auth.OAuthClientProvider`) against mcpd as the resource server and a real
authorization server (`oidc-provider`, tests/py/oidc/provider.mjs), with no token minted by the
test.

From the `401` of `/servers/NAME/mcp` (or `/mcp`) the SDK follows `WWW-Authenticate`'s
`resource_metadata` to the resource's metadata (RFC 9728), takes the first authorization server
listed there, reads its metadata (RFC 8414), registers itself (RFC 7591), runs the authorization
code grant with PKCE and the `resource` indicator (RFC 8707), exchanges the code for a token and
retries the MCP request with it. The person at the browser is played over HTTP: the
authorization URL is followed with a cookie-keeping client, the provider's devInteractions login
form (any login and password) and consent form are submitted, and the final redirect to the
client's `redirect_uri` is captured, not followed, for its `code` and `state`.

The issuer is trusted for tenant `sso` only (`mcpctl issuer add --tenant sso`): every caller it
vouches for is a `user` of `sso`, who reaches `sso`'s server `sso-demo` directly and, prefixed,
on the aggregate `/mcp`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html import unescape
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx2
import jwt
import pytest
from mcp.client.auth import OAuthClientProvider
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import MCPD
from helpers import MODES, run, text_of
from oidc_provider import OidcProvider

TENANT = "sso"
ISSUER = "sso-idp"
SERVER = "sso-demo"
# The client's redirect URI (a loopback one, as a native client's): nothing listens there, the
# user agent below stops at the redirect to it.
REDIRECT_URI = "http://127.0.0.1:9/callback"


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    with OidcProvider(tmp_path_factory.mktemp("sso-idp"), [], ttl=300, scopes=["mcp"]) as p:
        yield p


@pytest.fixture(scope="module")
def sso(cluster, idp):
    """The cluster with tenant `sso`, the provider trusted as `sso`'s issuer, and `sso`'s demo
    server on one node, listed on every node (checked with a `user` API token of `sso`, revoked
    after)."""
    cluster.mcpctl("tenant", "add", TENANT)
    try:
        cluster.mcpctl("issuer", "add", ISSUER, "--issuer", idp.issuer, "--tenant", TENANT, "--algorithm", "RS256")
        try:
            cluster.mcpctl(
                "server", "add", SERVER, "--tenant", TENANT, "--replicas", "1", "--", str(MCPD), "demo-server"
            )
            try:
                name = "sso-readiness"
                token = cluster.mcpctl(
                    "token", "create", "--role", "user", "--tenant", TENANT, "--name", name, "--ttl", "600"
                ).strip()
                try:
                    cluster.wait_tools(SERVER, ["echo"], token=token, timeout=60)
                finally:
                    ids = [t["id"] for t in json.loads(cluster.mcpctl("token", "list", "-o", "json")) if t["name"] == name]
                    assert ids, f"token {name} not listed"
                    for tid in ids:
                        cluster.mcpctl("token", "revoke", tid)
                yield cluster
            finally:
                cluster.mcpctl("server", "rm", SERVER)
        finally:
            cluster.mcpctl("issuer", "rm", ISSUER)
    finally:
        cluster.mcpctl("tenant", "rm", TENANT)


# --- the SDK's OAuth client and the person at the browser ------------------------------------


class MemoryStorage:
    """The SDK's `TokenStorage`, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


_FORM = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.S | re.I)
_INPUT = re.compile(r"<input\b([^>]*)>", re.I)
_ATTR = re.compile(r'([\w-]+)\s*=\s*"([^"]*)"')


def _form(html: str, page: str) -> tuple[str, dict[str, str]]:
    """The first form of a page: its absolute action URL and its fields, with a login and a
    password filled in when it asks for them (devInteractions takes any)."""
    m = _FORM.search(html)
    assert m, f"no form on {page}:\n{html[:2000]}"
    action = unescape(dict(_ATTR.findall(m.group(1))).get("action", page))
    fields: dict[str, str] = {}
    for attrs in _INPUT.findall(m.group(2)):
        a = {k.lower(): unescape(v) for k, v in _ATTR.findall(attrs)}
        if "name" not in a:
            continue
        fields[a["name"]] = a.get("value", "")
    if "login" in fields:
        fields["login"] = "alice"
    if "password" in fields:
        fields["password"] = "any"
    return urljoin(page, action), fields


@dataclass
class Browser:
    """Plays the person: follows the authorization URL, submits devInteractions' login and
    consent forms, and stops at the redirect to `REDIRECT_URI`, whose query it keeps. Every
    page it saw is recorded in `pages` (method, URL, status), the `prompt` of every form it
    submitted in `prompts`."""

    authorization_url: str = ""
    result: AuthorizationCodeResult | None = None
    pages: list[tuple[str, str, int]] = field(default_factory=list)
    prompts: list[str | None] = field(default_factory=list)

    async def redirect_handler(self, authorization_url: str) -> None:
        self.authorization_url = authorization_url
        async with httpx2.AsyncClient(timeout=30, follow_redirects=False) as ua:
            r = await self._get(ua, authorization_url)
            forms = 0
            while True:
                if r.is_redirect:
                    location = urljoin(str(r.url), r.headers["location"])
                    if location.startswith(REDIRECT_URI):
                        query = parse_qs(urlsplit(location).query)
                        assert "error" not in query, f"the provider refused: {query}"
                        one = lambda k: query.get(k, [None])[0]  # noqa: E731
                        self.result = AuthorizationCodeResult(code=one("code"), state=one("state"), iss=one("iss"))
                        return
                    r = await self._get(ua, location)
                    continue
                assert r.status_code == 200, f"{r.request.method} {r.url}: {r.status_code}\n{r.text[:2000]}"
                forms += 1
                assert forms <= 4, f"still a form after {forms - 1} submitted: {r.text[:2000]}"
                action, fields = _form(r.text, str(r.url))
                self.prompts.append(fields.get("prompt"))
                r = await ua.post(action, data=fields)
                self.pages.append(("POST", action, r.status_code))

    async def _get(self, ua: httpx2.AsyncClient, url: str) -> httpx2.Response:
        r = await ua.get(url)
        self.pages.append(("GET", url, r.status_code))
        return r

    async def callback_handler(self) -> AuthorizationCodeResult:
        assert self.result is not None, f"no redirect to {REDIRECT_URI}; pages: {self.pages}"
        return self.result


@dataclass
class Flow:
    """One SDK OAuth client for `url`: its storage, its browser, and every request its HTTP
    client sent and the status it got (`sent`: (method, URL, form body or None, status))."""

    url: str
    storage: MemoryStorage = field(default_factory=MemoryStorage)
    browser: Browser = field(default_factory=Browser)
    sent: list[tuple[str, str, dict[str, list[str]] | None, int]] = field(default_factory=list)

    def client(self, mode: str) -> Client:
        auth = OAuthClientProvider(
            server_url=self.url,
            client_metadata=OAuthClientMetadata(
                client_name="mcpd-tests-oauth",
                redirect_uris=[REDIRECT_URI],
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
            ),
            storage=self.storage,
            redirect_handler=self.browser.redirect_handler,
            callback_handler=self.browser.callback_handler,
        )

        async def record(response: httpx2.Response) -> None:
            req = response.request
            form = None
            if req.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                form = parse_qs(req.content.decode())
            self.sent.append((req.method, str(req.url), form, response.status_code))

        http = httpx2.AsyncClient(auth=auth, timeout=60, event_hooks={"response": [record]})
        return Client(streamable_http_client(self.url, http_client=http), mode=mode)

    def requests_to(self, prefix: str) -> list[tuple[str, str, dict[str, list[str]] | None, int]]:
        return [s for s in self.sent if s[1].startswith(prefix)]

    def trace(self) -> str:
        lines = [f"{m} {u} -> {s}" + (f" {sorted(f)}" if f else "") for m, u, f, s in self.sent]
        lines += [f"browser: {m} {u} -> {s}" for m, u, s in self.browser.pages]
        return "\n".join(lines)


def jwt_claims(token: str) -> dict:
    """The claims of a JWT, not verified (mcpd verifies; this looks at what it was given)."""
    return jwt.decode(token, options={"verify_signature": False})


# --- the flow --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_sdk_oauth_client_gets_a_token_and_calls_a_tenants_server(sso, idp, mode):
    url = sso.url(0, SERVER)
    flow = Flow(url)

    async def call() -> str:
        async with flow.client(mode) as c:
            r = await c.call_tool("echo", {"message": f"signed in ({mode})"})
            assert not r.is_error, r
            return text_of(r)

    try:
        text = run(call(), timeout=60)
    except BaseException as e:
        raise AssertionError(f"the OAuth flow failed ({e!r}); requests:\n{flow.trace()}") from e
    assert f"signed in ({mode})" in text

    # Discovery: the first request got a 401 pointing at the resource's metadata, which named
    # the provider; then the provider's metadata, a registration, and the token.
    prm = f"{sso.base(0)}/.well-known/oauth-protected-resource/servers/{SERVER}/mcp"
    statuses = [(m, u.split("?")[0], s) for m, u, _, s in flow.sent]
    assert statuses[0][1:] == (url, 401), flow.trace()
    assert ("GET", prm, 200) in statuses, flow.trace()
    assert any(u.startswith(idp.issuer + "/.well-known/") and s == 200 for _, u, s in statuses), flow.trace()
    assert ("POST", idp.registration_endpoint, 201) in statuses, flow.trace()
    assert ("POST", idp.token_endpoint, 200) in statuses, flow.trace()
    assert flow.storage.client_info is not None and flow.storage.client_info.client_id
    assert flow.browser.result is not None and flow.browser.result.code
    assert flow.browser.prompts == ["login", "consent"], flow.trace()
    assert flow.browser.result.iss == idp.issuer, "RFC 9207: the redirect names the issuer (the SDK checks it)"

    # The provider was asked for a token for this resource, at both steps (RFC 8707).
    authz = parse_qs(urlsplit(flow.browser.authorization_url).query)
    assert authz["resource"] == [url], authz
    assert authz["code_challenge_method"] == ["S256"]
    # The scope PRM lists (the SDK adds offline_access, for a refresh token, as the provider
    # supports it).
    assert "mcp" in authz["scope"][0].split(), authz["scope"]
    [(_, _, form, _)] = flow.requests_to(idp.token_endpoint)
    assert form is not None and form["resource"] == [url] and form["grant_type"] == ["authorization_code"], form
    assert "code_verifier" in form

    # What it got: a JWT of the provider for exactly this endpoint, with `mcp`.
    assert flow.storage.tokens is not None
    claims = jwt_claims(flow.storage.tokens.access_token)
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == url, claims
    assert "mcp" in claims["scope"].split()
    assert claims["client_id"] == flow.storage.client_info.client_id


def test_the_sdk_oauth_client_lists_the_tenants_tools_on_the_aggregate_endpoint(sso, idp):
    url = sso.url(0)
    flow = Flow(url)

    async def tools() -> list[str]:
        async with flow.client("legacy") as c:
            names = [t.name for t in (await c.list_tools()).tools]
            r = await c.call_tool(f"{SERVER}__echo", {"message": "via the aggregate"})
            assert not r.is_error, r
            assert "via the aggregate" in text_of(r)
            return names

    try:
        names = run(tools(), timeout=60)
    except BaseException as e:
        raise AssertionError(f"the OAuth flow failed ({e!r}); requests:\n{flow.trace()}") from e
    assert f"{SERVER}__echo" in names, names
    prm = f"{sso.base(0)}/.well-known/oauth-protected-resource/mcp"
    assert ("GET", prm, 200) in [(m, u, s) for m, u, _, s in flow.sent], flow.trace()
    authz = parse_qs(urlsplit(flow.browser.authorization_url).query)
    assert authz["resource"] == [url], authz
    assert flow.storage.tokens is not None
    assert jwt_claims(flow.storage.tokens.access_token)["aud"] == url
