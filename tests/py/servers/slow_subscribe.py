"""A stdio MCP server that takes a resource subscription at once and answers it only after
`SLOW_SUBSCRIBE_S` seconds (default 2), as a server behind a slow backend would: a client may
give up on its `resources/subscribe` after the server took it. Written with the Python SDK's
low-level `Server`, served in the session revisions only (as server-everything is):
`resources/subscribe` is theirs.

With `STUCK_FIRST_UNSUBSCRIBE=1`, the first `resources/unsubscribe` of each URI never answers
and lets go of nothing (a stuck backend; a cancel ends it without effect), and a later one
works.

Tool `subscriptions()`: the URIs this process holds now, as JSON, so that a test sees what a
server was left holding.
"""

from __future__ import annotations

import json
import os

import anyio
import mcp.server.stdio
import mcp_types as types
from mcp.server.lowlevel.server import Server
from mcp.server.runner import serve_loop

DELAY_S = float(os.environ.get("SLOW_SUBSCRIBE_S", "2"))
STUCK_FIRST_UNSUBSCRIBE = os.environ.get("STUCK_FIRST_UNSUBSCRIBE") == "1"
held: set[str] = set()
stuck_once: set[str] = set()


async def list_tools(ctx, params) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[types.Tool(
        name="subscriptions",
        description="The resource URIs this server process holds subscriptions to.",
        input_schema={"type": "object", "properties": {}},
    )])


async def call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=json.dumps(sorted(held)))])


async def list_resources(ctx, params) -> types.ListResourcesResult:
    return types.ListResourcesResult(resources=[])


async def subscribe(ctx, params: types.SubscribeRequestParams) -> types.EmptyResult:
    held.add(str(params.uri))
    # Taken: the answer is late, and a cancel of the request no longer undoes it.
    with anyio.CancelScope(shield=True):
        await anyio.sleep(DELAY_S)
    return types.EmptyResult()


async def unsubscribe(ctx, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
    uri = str(params.uri)
    if STUCK_FIRST_UNSUBSCRIBE and uri not in stuck_once:
        stuck_once.add(uri)
        await anyio.sleep_forever()
    held.discard(uri)
    return types.EmptyResult()


server = Server(
    "slow-subscribe",
    on_list_tools=list_tools,
    on_call_tool=call_tool,
    on_list_resources=list_resources,
    on_subscribe_resource=subscribe,
    on_unsubscribe_resource=unsubscribe,
)


async def main() -> None:
    async with mcp.server.stdio.stdio_server() as (read, write), server.lifespan(server) as state:
        await serve_loop(server, read, write, lifespan_state=state,
                         init_options=server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
