"""The web console (`/ui`), in a real browser (Debian's Chromium, driven by Playwright) against
a real 3-node cluster: sign in with a token, look at the cluster, add a server (a bad field
gets the API's own message next to it), mint and revoke a token, watch the audit trail and
the traffic, keep working when the node the page came from dies, and stay read-only for a
viewer. Screenshots of each page land in `target/console-screenshots/`.

Runbook: `mcpctl dev up`, then open `https://NODE/ui/` and paste a token
(`mcpctl token create --role viewer|operator|tenant-admin|cluster-admin`)."""

from __future__ import annotations

import json
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from playwright.sync_api import expect

from browser import chromium, screenshot
from conftest import CA_CERT, MCPD, ROOT, Cluster, start_cluster
from helpers import run, stateless_post, text_of, wait_until
from oidc_provider import OidcProvider



@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory, "console", 3)
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def browser(cluster):
    with chromium(CA_CERT) as b:
        yield b


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(15_000)
    try:
        yield ctx
    finally:
        ctx.close()


BRIDGE = ROOT / "target/debug/mcp-bridge"


def sign_in(context, base: str, token: str, page=None):
    """Opens the console at `base` (as typed: `/ui`, redirected to `/ui/`) and signs in with
    `token`; returns the page."""
    page = page or context.new_page()
    page.goto(f"{base}/ui")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    return page


def mint(cluster: Cluster, role: str, *more: str) -> str:
    return cluster.mcpctl("token", "create", "--role", role, "--name", f"console-{role}-{uuid.uuid4().hex[:6]}", *more).strip()


def csrf_of(page) -> str:
    return page.evaluate("document.cookie.split('; ').find(c => c.startsWith('__Host-mcpd_csrf=')).split('=')[1]")


def post_from_page(page, path: str, body: dict, csrf: str | None) -> dict:
    """A write made by script in the signed-in page (cookies included)."""
    return page.evaluate(
        """async ([path, body, csrf]) => {
            const headers = {'content-type': 'application/json'};
            if (csrf) headers['x-csrf-token'] = csrf;
            const r = await fetch(path, {method: 'POST', headers, body: JSON.stringify(body), credentials: 'include'});
            return {status: r.status, body: await r.json().catch(() => null)};
        }""",
        [path, body, csrf],
    )


def test_an_operator_signs_in_with_a_token_and_sees_the_cluster(cluster, context):
    page = sign_in(context, cluster.base(0), cluster.admin_token)
    expect(page.get_by_role("heading", name="Cluster")).to_be_visible()
    leader = cluster.leader() + 1
    members = page.get_by_role("table", name="Members")
    expect(members.get_by_role("row")).to_have_count(4)  # a header and three members
    expect(members).to_contain_text(f"{leader} (leader)")
    expect(page.locator("dl.facts")).to_contain_text(f"node {leader}")
    screenshot(page, "cluster")

    # The session is a cookie script cannot read, sent over TLS only, never to other sites.
    cookies = {c["name"]: c for c in context.cookies()}
    session = cookies["__Host-mcpd_session"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    assert cluster.admin_token not in session["value"]
    assert "mcpd_session" not in page.evaluate("document.cookie")

    # Figures: the first page's load (navigation timing) and the bytes the console is made of.
    timing = page.evaluate(
        """() => {
            const n = performance.getEntriesByType('navigation')[0];
            const assets = performance.getEntriesByType('resource').filter(r => r.name.includes('/ui/'));
            return {load_ms: n.loadEventEnd - n.startTime, bytes: n.encodedBodySize + assets.reduce((a, r) => a + r.encodedBodySize, 0), files: assets.length + 1};
        }"""
    )
    print(f"\nconsole first load: {timing['load_ms']:.0f} ms, {timing['files']} files, {timing['bytes'] / 1024:.1f} KiB served")
    assert timing["files"] >= 10, timing
    assert timing["bytes"] <= 200 * 1024, f"the console's assets grew past 200 KiB: {timing}"


def test_the_page_forbids_inline_script_and_framing(cluster):
    r = httpx2.get(f"{cluster.base(0)}/ui/", timeout=10)
    csp = r.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    for ep in cluster.endpoints:
        assert f" {ep}" in csp, f"connect-src must let the page move to {ep}: {csp}"
    assert r.headers["x-frame-options"] == "DENY"


def test_a_bad_field_gets_the_apis_message_next_to_it_and_a_good_server_runs(cluster, context):
    page = sign_in(context, cluster.base(0), cluster.admin_token)
    page.goto(f"{cluster.base(0)}/ui/#/servers")
    page.get_by_role("button", name="Add server").click()
    form = page.get_by_role("form", name="Add a server")
    bad = "Not A Name!"
    form.get_by_label("Name").fill(bad)
    form.get_by_label("Command").fill(str(MCPD))
    form.get_by_label("Arguments (one per line)").fill("demo-server")
    form.get_by_role("button", name="Add").click()
    # The message is the API's own for the same body, shown at the field it names.
    api = httpx2.post(
        f"{cluster.base(0)}/v1/servers",
        json={"name": bad, "command": str(MCPD), "args": ["demo-server"], "tenant": None, "pool_size": 2, "enabled": True},
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
        timeout=10,
    )
    assert api.status_code == 422 and api.json()["error"]["field"] == "name", api.text
    name_field = form.locator('[data-field="name"]')
    expect(name_field.locator(".error")).to_have_text(api.json()["error"]["message"])
    expect(name_field.locator("input")).to_have_attribute("aria-invalid", "true")
    screenshot(page, "servers-invalid")

    name = f"ui{uuid.uuid4().hex[:6]}"
    form.get_by_label("Name").fill(name)
    form.get_by_role("button", name="Add").click()
    expect(page.get_by_role("table", name="Registered servers")).to_contain_text(name)
    assert json.loads(cluster.mcpctl("server", "get", name, "-o", "json"))["spec"]["command"] == str(MCPD)
    page.get_by_role("link", name=name).click()
    expect(page.get_by_role("table", name=f"Pools of {name}")).to_contain_text("ready", timeout=60_000)
    screenshot(page, "servers")

    # Disable it from the page: the registry says so.
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name))
    row.get_by_role("button", name="Disable").click()
    wait_until(
        lambda: json.loads(cluster.mcpctl("server", "get", name, "-o", "json"))["spec"]["enabled"] is False,
        15,
        "the server disabled from the console",
    )


def test_a_new_tokens_secret_is_shown_once_works_and_is_revoked_from_the_page(cluster, context):
    page = sign_in(context, cluster.base(0), cluster.admin_token)
    page.on("dialog", lambda d: d.accept())
    page.goto(f"{cluster.base(0)}/ui/#/tokens")
    form = page.get_by_role("form", name="Create a token")
    name = f"ui-{uuid.uuid4().hex[:6]}"
    form.get_by_label("Token name").fill(name)
    form.get_by_label("Role").select_option("user")
    form.get_by_label("Tenant").fill("default")
    form.get_by_role("button", name="Create token").click()
    secret = page.locator("#new-token")
    expect(secret).to_have_text(re.compile(r"^mcpt_[0-9a-f]+_\S+$"))
    token = secret.inner_text()
    screenshot(page, "tokens")
    tools = stateless_post(f"{cluster.base(1)}/servers/demo/mcp", token, "tools/list")
    assert tools.status_code == 200, tools.text

    # Shown once: after leaving the page it is gone, and the list shows the token's id only.
    page.goto(f"{cluster.base(0)}/ui/#/cluster")
    page.goto(f"{cluster.base(0)}/ui/#/tokens")
    expect(page.get_by_role("table", name="Tokens")).to_contain_text(name)
    expect(page.locator("#new-token")).to_have_count(0)
    assert token not in page.content()

    row = page.get_by_role("row").filter(has_text=name)
    row.get_by_role("button", name="Revoke").click()
    wait_until(
        lambda: stateless_post(f"{cluster.base(2)}/servers/demo/mcp", token, "tools/list").status_code == 401,
        15,
        "the revoked token refused",
    )


def test_an_admin_change_appears_in_the_audit_page_while_it_is_open(cluster, context):
    page = sign_in(context, cluster.base(1), cluster.admin_token)
    page.goto(f"{cluster.base(1)}/ui/#/audit")
    table = page.get_by_role("table", name="Admin changes, newest first")
    expect(table).to_be_visible()
    tenant = f"audited-{uuid.uuid4().hex[:6]}"
    cluster.mcpctl("tenant", "add", tenant)
    expect(table).to_contain_text(f"put_tenant {tenant}", timeout=15_000)
    screenshot(page, "audit")


def test_the_traffic_page_charts_the_calls_this_node_received(cluster, context):
    url = f"{cluster.base(2)}/servers/demo/mcp"
    wait_until(lambda: stateless_post(url, cluster.token, "tools/list").status_code == 200, 60, "demo listed")
    calls = 25
    for i in range(calls):
        r = stateless_post(url, cluster.token, "tools/call", {"name": "echo", "arguments": {"message": str(i)}}, name="echo")
        assert r.status_code == 200, r.text
    page = sign_in(context, cluster.base(2), cluster.admin_token)
    page.goto(f"{cluster.base(2)}/ui/#/traffic")
    chart = page.locator("figure.chart").filter(has_text="demo")
    expect(chart.locator(".summary")).to_have_text(f"{calls} calls, 0 errors (0.0 %)")
    expect(chart.locator("canvas")).to_have_count(1)
    report = httpx2.get(
        f"{cluster.base(2)}/v1/traffic", headers={"Authorization": f"Bearer {cluster.admin_token}"}, timeout=10
    ).json()
    assert sum(p["calls"] for p in report["servers"]["demo"]) == calls
    assert all(p["p50_ms"] and p["p99_ms"] >= p["p50_ms"] for p in report["servers"]["demo"])
    screenshot(page, "traffic")


def test_the_page_carries_on_when_the_node_it_came_from_dies(cluster, context):
    leader = cluster.leader()
    loaded_from = next(i for i in range(3) if i != leader)
    page = sign_in(context, cluster.base(loaded_from), cluster.admin_token)
    expect(page.locator("#where")).to_have_text(f"via {cluster.base(loaded_from)}/")
    expect(page.get_by_role("table", name="Members")).to_contain_text("healthy")
    cluster.kill(loaded_from)
    try:
        # The next refresh finds the node gone and moves to another member, still signed in.
        expect(page.locator("#where")).not_to_have_text(f"via {cluster.base(loaded_from)}/", timeout=20_000)
        expect(page.get_by_role("table", name="Members")).to_contain_text("unreachable", timeout=20_000)
        page.get_by_role("link", name="Servers").click()
        expect(page.get_by_role("table", name="Registered servers")).to_contain_text("demo")
        screenshot(page, "failover")
    finally:
        cluster.restart(loaded_from)
        wait_until(lambda: httpx2.get(f"{cluster.base(loaded_from)}/readyz", timeout=2).status_code == 200, 60, "node back")


def test_a_viewer_sees_no_write_controls_and_the_api_refuses_its_writes(cluster, context):
    page = sign_in(context, cluster.base(0), mint(cluster, "viewer"))
    page.goto(f"{cluster.base(0)}/ui/#/servers")
    expect(page.get_by_role("table", name="Registered servers")).to_contain_text("demo")
    for label in ["Add server", "Disable", "Edit", "Remove"]:
        expect(page.get_by_role("button", name=label)).to_have_count(0)
    page.goto(f"{cluster.base(0)}/ui/#/tokens")
    expect(page.get_by_role("table", name="Tokens")).to_be_visible()
    expect(page.get_by_role("button", name="Create token")).to_have_count(0)
    expect(page.get_by_role("button", name="Revoke")).to_have_count(0)
    screenshot(page, "viewer")
    # The controls are hidden for comfort only: the API refuses the write itself.
    r = post_from_page(page, "/v1/tenants", {"name": "viewer-made"}, csrf_of(page))
    assert r["status"] == 403 and r["body"]["error"]["code"] == "forbidden", r


def test_a_write_with_the_session_cookie_needs_its_csrf_token(cluster, context):
    page = sign_in(context, cluster.base(0), cluster.admin_token)
    without = post_from_page(page, "/v1/tenants", {"name": f"csrf-{uuid.uuid4().hex[:6]}"}, None)
    assert without["status"] == 403 and without["body"]["error"]["code"] == "csrf", without
    wrong = post_from_page(page, "/v1/tenants", {"name": f"csrf-{uuid.uuid4().hex[:6]}"}, "x" * 43)
    assert wrong["status"] == 403, wrong
    good = post_from_page(page, "/v1/tenants", {"name": f"csrf-{uuid.uuid4().hex[:6]}"}, csrf_of(page))
    assert good["status"] == 201, good
    # A session cannot renew itself: signing in again takes the token.
    renew = post_from_page(page, "/v1/session", {}, csrf_of(page))
    assert renew["status"] == 400 and renew["body"]["error"]["field"] == "Authorization", renew
    # The cookie stands for a token on the admin API only, never on MCP.
    mcp = page.evaluate(
        """async () => (await fetch('/servers/demo/mcp', {method: 'POST', credentials: 'include',
            headers: {'content-type': 'application/json', 'accept': 'application/json, text/event-stream'},
            body: JSON.stringify({jsonrpc: '2.0', id: 1, method: 'ping'})})).status"""
    )
    assert mcp == 401


def test_revoking_the_token_a_session_was_opened_with_ends_the_session(cluster, context):
    token = mint(cluster, "operator")
    page = sign_in(context, cluster.base(0), token)
    expect(page.get_by_role("table", name="Members")).to_be_visible()
    cluster.mcpctl("token", "revoke", token.split("_")[1])
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible(timeout=20_000)


def test_a_console_left_open_asks_at_most_once_every_two_seconds(cluster, context):
    page = sign_in(context, cluster.base(0), cluster.admin_token)
    for section, name in [("cluster", "Members"), ("tokens", "Tokens")]:
        page.goto(f"{cluster.base(0)}/ui/#/{section}")
        expect(page.get_by_role("table", name=name)).to_be_visible()
        # The first round paces itself by the requests the page made to load (two seconds
        # each), so the window opens at the page's first refresh, not at its load.
        page.wait_for_event("request", lambda r: "/v1/" in r.url, timeout=30_000)
        seen: list[str] = []

        def note(request, seen=seen):
            if "/v1/" in request.url:
                seen.append(request.url)

        page.on("request", note)
        window_s = 12
        page.wait_for_timeout(window_s * 1000)  # the window measured, not a condition awaited
        page.remove_listener("request", note)
        print(f"\n{section}: {len(seen)} API requests in {window_s} s after a refresh")
        assert 1 <= len(seen) <= window_s / 2 + 1, seen


def test_a_person_signs_in_with_single_sign_on_at_a_real_openid_provider(cluster, context, tmp_path_factory):
    """Authorization code + PKCE at oidc-provider (its dev login and consent pages stand in for
    a person's IdP), the token bound to the admin API, traded for a session cookie."""
    clients = [{
        "client_id": "mcpd-console",
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code"],
        "response_types": ["code"],
        "redirect_uris": [f"{ep}/ui/" for ep in cluster.endpoints],
        "roles": ["operator"],
    }]
    with OidcProvider(tmp_path_factory.mktemp("console-idp"), clients, scopes=["admin:read", "admin:write"]) as idp:
        name = f"sso{uuid.uuid4().hex[:4]}"
        cluster.mcpctl("issuer", "add", name, "--issuer", idp.issuer, "--algorithm", "RS256", "--console-client-id", "mcpd-console")
        try:
            page = context.new_page()
            page.goto(f"{cluster.base(1)}/ui/")
            page.get_by_role("button", name=f"Sign in with {name}").click()
            # The provider's own pages: any login, then consent.
            page.locator("input[name=login]").fill("alice")
            page.locator("input[name=password]").fill("any")
            page.locator("button[type=submit]").click()
            page.locator("button[type=submit]").click()
            expect(page.get_by_role("button", name="Sign out")).to_be_visible()
            expect(page.locator("#who")).to_contain_text(f"jwt:{name}:alice (operator)")
            expect(page.get_by_role("table", name="Members")).to_be_visible()
            assert "code=" not in page.url, "the authorization code must leave the address bar"
            # An operator may disable a server, and may not add one: the controls follow.
            page.goto(f"{cluster.base(1)}/ui/#/servers")
            expect(page.get_by_role("button", name="Disable").first).to_be_visible()
            expect(page.get_by_role("button", name="Add server")).to_have_count(0)
            screenshot(page, "sso")
        finally:
            cluster.mcpctl("issuer", "rm", name)
        # The issuer gone, its sessions end at the next request.
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible(timeout=20_000)


def test_a_crash_looping_server_is_flagged_with_its_last_words(cluster, context):
    name = f"loop{uuid.uuid4().hex[:4]}"
    # A program that says why on stderr, then exits at once: it never becomes ready.
    cluster.add_server(name, ["/bin/sh", "-c", "echo cannot open /etc/missing.conf >&2; exit 3"], pool_size=1)
    try:
        page = sign_in(context, cluster.base(0), cluster.admin_token)
        page.goto(f"{cluster.base(0)}/ui/#/servers/{name}")
        pools = page.get_by_role("table", name=f"Pools of {name}")
        expect(pools.locator(".badge.crash_loop").first).to_be_visible(timeout=90_000)
        expect(pools).to_contain_text("cannot open /etc/missing.conf", timeout=30_000)
        screenshot(page, "servers-crash-loop")
    finally:
        cluster.mcpctl("server", "rm", name)


def test_an_open_breaker_shows_on_the_server_page(cluster, context):
    name = f"brk{uuid.uuid4().hex[:4]}"
    cluster.add_server(name, [MCPD, "demo-server"], pool_size=1)
    try:
        cluster.wait_tools(name, ["crash"])
        url = f"{cluster.base(0)}/servers/{name}/mcp"
        page = sign_in(context, cluster.base(0), cluster.admin_token)
        page.goto(f"{cluster.base(0)}/ui/#/servers/{name}")
        breakers = page.get_by_role("table", name="Circuit breakers")
        # Five crashes in a row through node 1 open node 1's breakers of the server, for 1 s
        # at first; every failed probe doubles that. Crash on until the page shows one open.
        for _ in range(8):
            for _ in range(6):
                stateless_post(url, cluster.admin_token, "tools/call", {"name": "crash", "arguments": {}}, name="crash")
            try:
                expect(breakers.locator(".badge.open").first).to_be_visible(timeout=5_000)
                break
            except AssertionError:
                continue
        else:
            raise AssertionError(f"no open breaker shown: {breakers.inner_text()}")
        expect(page.get_by_role("table", name=f"Tools of {name}")).to_contain_text("crash")
        screenshot(page, "servers-breaker")
    finally:
        cluster.mcpctl("server", "rm", name)


def test_a_policy_is_added_tested_and_edited_from_the_page(cluster, context):
    rule = f"no-echo-{uuid.uuid4().hex[:4]}"
    url = f"{cluster.base(1)}/servers/demo/mcp"

    def echo() -> dict:
        return stateless_post(url, cluster.token, "tools/call", {"name": "echo", "arguments": {"message": "hi"}}, name="echo").json()

    page = sign_in(context, cluster.base(1), cluster.admin_token)
    page.goto(f"{cluster.base(1)}/ui/#/policies")
    page.get_by_role("button", name="Add rule").click()
    form = page.get_by_role("form", name="Add a rule")
    form.get_by_label("Name", exact=True).fill(rule)
    form.get_by_label("Order (lower first)").fill("10")
    form.get_by_label("Effect").select_option("deny")
    form.get_by_label("Targets", exact=False).fill("tool:demo__echo")
    form.get_by_label("Tenants").fill("default")
    form.get_by_role("button", name="Add rule").click()
    expect(page.get_by_role("table", name="Rules")).to_contain_text(rule)
    try:
        test = page.get_by_role("form", name="Test a call")
        test.get_by_label("Tenant").fill("default")
        test.get_by_label("Target", exact=False).fill("tool:demo__echo")
        test.get_by_role("button", name="Test").click()
        expect(page.locator("#verdict")).to_have_text(f"Denied by rule {rule}")
        denied = wait_until(lambda: echo().get("error"), 15, "echo denied by the new rule")
        assert denied["data"]["policy"] == rule, denied

        row = page.get_by_role("row").filter(has_text=rule)
        row.get_by_role("button", name="Edit").click()
        edit = page.get_by_role("form", name=f"Edit rule {rule}")
        edit.get_by_label("Targets", exact=False).fill("tool:demo__sleep")
        edit.get_by_role("button", name="Save rule").click()
        expect(page.get_by_role("table", name="Rules")).to_contain_text("tool:demo__sleep")
        test.get_by_role("button", name="Test").click()
        expect(page.locator("#verdict")).to_have_text("Allowed (no rule matched)")
        wait_until(lambda: "result" in echo(), 15, "echo allowed after the edit")
        screenshot(page, "policies")
    finally:
        cluster.mcpctl("policy", "rm", rule)


def test_the_bridge_snippet_runs_the_real_bridge_for_a_tenant(cluster, context):
    """What the page prints is what an AI client runs: the snippet, with the bridge's path and
    the CA filled in as the page asks, launches mcp-bridge and reaches `demo`."""
    page = sign_in(context, cluster.base(0), cluster.admin_token)
    page.goto(f"{cluster.base(0)}/ui/#/bridge")
    form = page.get_by_role("form", name="Bridge configuration")
    form.get_by_label("AI client").select_option("Claude Desktop")
    form.get_by_label("Server", exact=False).select_option("demo")
    form.get_by_label("Tenant", exact=False).fill("default")
    form.get_by_role("button", name="Make the snippet").click()
    snippet = json.loads(page.locator("#snippet").inner_text())
    screenshot(page, "bridge")
    entry = snippet["mcpServers"]["mcp-cluster"]
    assert entry["args"][entry["args"].index("--url") + 1].split(",") == cluster.endpoints
    args = [str(CA_CERT) if a.startswith("<path of the cluster CA") else a for a in entry["args"]]
    params = StdioServerParameters(command=str(BRIDGE), args=args, env={**entry["env"], "PATH": os.environ.get("PATH", "")})

    async def scenario() -> str:
        async with Client(params, mode="legacy") as c:
            tools = [t.name for t in (await c.list_tools()).tools]
            assert "echo" in tools, tools
            return text_of(await c.call_tool("echo", {"message": "from the console's snippet"}))

    # Playwright's sync API holds this thread's event loop: the SDK client runs in another.
    with ThreadPoolExecutor(1) as pool:
        assert "from the console's snippet" in pool.submit(lambda: run(scenario())).result()


AXE = ROOT / ".tools/npm/node_modules/axe-core/axe.min.js"


def test_every_page_passes_an_accessibility_check_and_works_from_the_keyboard(cluster, browser):
    """axe-core (the checker browsers' own audits use) finds no WCAG 2 A/AA violation of serious
    or critical impact on any page, and a keyboard user reaches the content first."""
    # The checker is the test's script, injected; the console's policy would refuse it.
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
    try:
        page = sign_in(ctx, cluster.base(0), cluster.admin_token)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        found = {}
        for section, ready in [
            ("cluster", ("table", "Members")),
            ("servers", ("table", "Registered servers")),
            ("tokens", ("table", "Tokens")),
            ("policies", ("form", "Test a call")),
            ("audit", ("table", "Admin changes, newest first")),
            ("traffic", ("heading", "Traffic")),
            ("bridge", ("form", "Bridge configuration")),
        ]:
            page.goto(f"{cluster.base(0)}/ui/#/{section}")
            expect(page.get_by_role(ready[0], name=ready[1])).to_be_visible()
            page.add_script_tag(path=str(AXE))
            result = page.evaluate("axe.run(document, {runOnly: ['wcag2a', 'wcag2aa']})")
            bad = [f"{v['id']}: {v['help']} ({len(v['nodes'])}×)" for v in result["violations"] if v["impact"] in ("serious", "critical")]
            if bad:
                found[section] = bad
        assert not found, found
    finally:
        ctx.close()


def test_a_rug_pull_shows_on_the_server_page_and_is_approved_there(cluster, context):
    name = f"rp{uuid.uuid4().hex[:4]}"
    rugpull = ROOT / "tests/py/servers/rugpull.py"
    cluster.mcpctl("server", "add", name, "--replicas", "1", "--pool-size", "1", "--", str(ROOT / ".venv/bin/python"), str(rugpull))
    try:
        cluster.wait_tools(name, ["forecast", "rug_pull"])
        page = sign_in(context, cluster.base(0), cluster.admin_token)
        page.goto(f"{cluster.base(0)}/ui/#/servers/{name}")
        page.get_by_role("button", name="Pin the tools as they are now").click()
        expect(page.get_by_text("Every tool is as approved.")).to_be_visible()

        pulled = stateless_post(f"{cluster.base(1)}/servers/{name}/mcp", cluster.token, "tools/call",
                                {"name": "rug_pull", "arguments": {}}, name="rug_pull")
        assert "pulled" in pulled.text, pulled.text
        # The catalogue is read once per visit: come back to the server to see the change.
        wait_until(
            lambda: json.loads(cluster.mcpctl_result("server", "diff", name, "-o", "json", node=0).stdout)["tools"][0]["status"] == "changed",
            30,
            "node 1 sees the change",
        )
        page.goto(f"{cluster.base(0)}/ui/#/servers")
        page.goto(f"{cluster.base(0)}/ui/#/servers/{name}")
        tools = page.get_by_role("table", name=f"Tools of {name}")
        expect(page.get_by_text("2 tools held back until approved")).to_be_visible()
        expect(tools.locator("ins")).to_contain_text("id_rsa")
        expect(tools.locator("del")).to_have_text("The weather forecast for a city.")
        screenshot(page, "servers-held-tools")
        page.get_by_role("button", name="Approve the tools as they are now").click()
        expect(page.get_by_text("Every tool is as approved.")).to_be_visible()
    finally:
        cluster.mcpctl("server", "rm", name)
