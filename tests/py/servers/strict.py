"""A stdio MCP server (2025-11-25) that exits when its first request is not `initialize`, as
servers of some SDKs do (the Rust SDK's answer anything else before `initialize` by closing):
a node that probes with `server/discover` first must start it again with `initialize` alone.

Tools: `echo(text)`.
"""

from __future__ import annotations

import json
import sys

ECHO = {
    "name": "echo",
    "description": "Returns the text it was given.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
}


def answer(id_, result) -> None:
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": id_, "result": result}) + "\n")
    sys.stdout.flush()


def main() -> None:
    initialized = False
    for line in sys.stdin:
        msg = json.loads(line)
        method, id_ = msg.get("method"), msg.get("id")
        if id_ is None:
            continue  # notifications
        if not initialized and method != "initialize":
            sys.stderr.write(f"expected initialize, got {method}; exiting\n")
            sys.exit(1)
        if method == "initialize":
            initialized = True
            answer(id_, {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                         "serverInfo": {"name": "strict", "version": "1"}})
        elif method == "tools/list":
            answer(id_, {"tools": [ECHO]})
        elif method == "tools/call":
            text = msg["params"]["arguments"]["text"]
            answer(id_, {"content": [{"type": "text", "text": text}]})
        elif method == "ping":
            answer(id_, {})
        else:
            error = {"code": -32601, "message": f"Method not found: {method}"}
            sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": id_, "error": error}) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
