"""Virtual servers: a named, curated set of tools from several servers, some renamed, served at
`/v/NAME/mcp` by every node, to the Python SDK in both protocol eras. The checks of a server's
own endpoint hold through it: the caller must be allowed the server, policies decide each
call and hide what they deny, and another tenant's virtual server does not exist.

Runbook: `mcpctl vserver set kit --tool demo/echo=say --tool time/get_current_time`, then point
a client at `https://NODE/v/kit/mcp`; `mcpctl vserver list`, `mcpctl vserver rm kit`."""

from __future__ import annotations

import asyncio
import uuid

import httpx2
import pytest
from mcp import MCPError

from conftest import Cluster
from helpers import (TOLD_WITHIN, MODES, client, listening, relist_until, run, stateless_post, text_of,
                     wait_until)


@pytest.mark.parametrize("mode", MODES)
def test_a_virtual_server_serves_curated_renamed_tools_of_several_servers(cluster: Cluster, mode: str):
    name = f"kit{uuid.uuid4().hex[:4]}"
    cluster.mcpctl("vserver", "set", name, "--tool", "demo/echo=say", "--tool", "time/get_current_time",
                   "--description", "A small kit")
    try:
        url = f"{cluster.base(1)}/v/{name}/mcp"

        async def scenario() -> None:
            async with client(url, cluster.token, mode) as c:
                tools = sorted(t.name for t in (await c.list_tools()).tools)
                assert tools == ["get_current_time", "say"], tools
                assert "hello kit" in text_of(await c.call_tool("say", {"message": "hello kit"}))
                assert "UTC" in text_of(await c.call_tool("get_current_time", {"timezone": "UTC"}))
                # Only what the virtual server names, under the name it gives.
                for hidden in ("echo", "demo__echo", "add"):
                    with pytest.raises(MCPError, match="unknown tool"):
                        await c.call_tool(hidden, {})

        run(scenario())
        assert name in cluster.mcpctl("vserver", "list")
    finally:
        cluster.mcpctl("vserver", "rm", name)


def test_policies_decide_calls_through_a_virtual_server_and_tenants_stay_apart(cluster: Cluster):
    name = f"kit{uuid.uuid4().hex[:4]}"
    rule = f"no-say-{uuid.uuid4().hex[:4]}"
    other = f"vt{uuid.uuid4().hex[:4]}"
    cluster.mcpctl("vserver", "set", name, "--tool", "demo/echo=say", "--tool", "demo/add")
    cluster.mcpctl("tenant", "add", other)
    cluster.mcpctl("vserver", "set", f"{other}-kit", "--tenant", other, "--tool", "demo/echo")
    url = f"{cluster.base(2)}/v/{name}/mcp"
    try:
        cluster.mcpctl("policy", "add", rule, "--order", "5", "--deny", "--target", "tool:demo__echo",
                       "--tenant", "default")
        # The rule names the server's own tool: the renamed one is denied, naming the rule,
        # and left out of the list.
        denied = wait_until(
            lambda: stateless_post(url, cluster.token, "tools/call", {"name": "say", "arguments": {"message": "x"}},
                                   name="say").json().get("error"),
            15,
            "say denied by the rule",
        )
        assert denied["code"] == -32054 and denied["data"]["policy"] == rule, denied
        listed = stateless_post(url, cluster.token, "tools/list").json()["result"]["tools"]
        assert [t["name"] for t in listed] == ["add"], listed
        # An OAuth client without a token is pointed at the virtual server's own metadata
        # (RFC 9728), which names it as the resource its token must be for.
        anonymous = stateless_post(url, None, "tools/list")
        assert anonymous.status_code == 401, anonymous.text
        metadata_url = anonymous.headers["www-authenticate"].split('resource_metadata="')[1].split('"')[0]
        assert metadata_url.endswith(f"/.well-known/oauth-protected-resource/v/{name}/mcp"), metadata_url
        metadata = httpx2.get(metadata_url, timeout=10).json()
        assert metadata["resource"].endswith(f"/v/{name}/mcp"), metadata
        # Another tenant's virtual server does not exist for this caller.
        r = stateless_post(f"{cluster.base(0)}/v/{other}-kit/mcp", cluster.token, "tools/list")
        assert r.status_code == 404, r.text
    finally:
        cluster.mcpctl("policy", "rm", rule)
        cluster.mcpctl("vserver", "rm", name)
        cluster.mcpctl("vserver", "rm", f"{other}-kit")
        cluster.mcpctl("tenant", "rm", other)


@pytest.mark.parametrize("mode", MODES)
def test_a_virtual_servers_client_is_told_when_it_changes_and_when_its_servers_tools_change(cluster: Cluster, mode: str):
    """A client of a virtual server is told its tool list changed when the operator adds a
    tool to the virtual server (and then lists it), and when one of the servers it curates
    announces that its own tools changed."""
    name = f"kit{uuid.uuid4().hex[:4]}"
    cluster.mcpctl("vserver", "set", name, "--tool", "demo/echo=say")
    url = f"{cluster.base(1)}/v/{name}/mcp"

    async def scenario() -> None:
        async with listening(cluster, mode, 1, url) as (c, next_change):
            await asyncio.to_thread(cluster.mcpctl, "vserver", "set", name, "--tool", "demo/echo=say",
                                    "--tool", "demo/add")
            await relist_until(c, next_change, "add", listed=True)
            async with client(cluster.url(1, "demo"), cluster.token, "legacy") as demo:
                await demo.call_tool("test_trigger_tool_change", {})
            await asyncio.wait_for(next_change(), TOLD_WITHIN)

    try:
        run(scenario())
    finally:
        cluster.mcpctl("vserver", "rm", name)
