"""A stdio MCP server that speaks 2026-07-28 and announces tool list changes, but refuses
`subscriptions/listen`, as a server written before the revision's streams were settled might.
It speaks a 2025-11-25 session too, and there sends `notifications/tools/list_changed` as the
session era does: a node must speak to it in a session to hear its changes.

With `NOLISTEN_ONE_ERA=1` it also refuses an `initialize` that follows a `server/discover` on
the same process (as servers that fix their revision at the first request do): the node must
start it again for a session.

Tools: `echo(text)`, and `grow()`, which adds the tool `extra` and announces the change.
"""

from __future__ import annotations

import json
import os
import sys

STATELESS = "2026-07-28"
CAPABILITIES = {"tools": {"listChanged": True}}
INFO = {"name": "nolisten", "version": "1"}


def tool(name: str, description: str) -> dict:
    return {"name": name, "description": description, "inputSchema": {"type": "object", "properties": {}}}


def send(msg: dict) -> None:
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", **msg}) + "\n")
    sys.stdout.flush()


def main() -> None:
    tools = [tool("echo", "Returns the text it was given."), tool("grow", "Adds a tool.")]
    discovered = False
    one_era = os.environ.get("NOLISTEN_ONE_ERA") == "1"
    for line in sys.stdin:
        msg = json.loads(line)
        method, id_ = msg.get("method"), msg.get("id")
        if id_ is None:
            continue  # notifications
        params = msg.get("params") or {}
        if method == "server/discover":
            discovered = True
            send({"id": id_, "result": {"supportedVersions": [STATELESS, "2025-11-25"], "capabilities": CAPABILITIES,
                                        "_meta": {"io.modelcontextprotocol/serverInfo": INFO}}})
        elif method == "initialize" and one_era and discovered:
            send({"id": id_, "error": {"code": -32600, "message": "this process speaks 2026-07-28"}})
        elif method == "initialize":
            send({"id": id_, "result": {"protocolVersion": "2025-11-25", "capabilities": CAPABILITIES,
                                        "serverInfo": INFO}})
        elif method == "tools/list":
            send({"id": id_, "result": {"tools": tools}})
        elif method == "tools/call" and params.get("name") == "grow":
            if not any(t["name"] == "extra" for t in tools):
                tools.append(tool("extra", "Added by grow."))
            send({"method": "notifications/tools/list_changed"})
            send({"id": id_, "result": {"content": [{"type": "text", "text": "grown"}]}})
        elif method == "tools/call":
            text = params.get("arguments", {}).get("text", "")
            send({"id": id_, "result": {"content": [{"type": "text", "text": text}]}})
        elif method == "ping":
            send({"id": id_, "result": {}})
        else:
            send({"id": id_, "error": {"code": -32601, "message": f"Method not found: {method}"}})


if __name__ == "__main__":
    main()
