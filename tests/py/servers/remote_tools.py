"""A remote MCP server for the tests, written with the Python SDK (`MCPServer`) and served over
Streamable HTTP in both eras (2025 sessions, and 2026-07-28 stateless requests):
`remote_tools.py PORT KEY [--sessions-only]`. Every request must carry `X-Api-Key: KEY` (else
401), so a test sees that the gateway sends a server's headers. `--sessions-only` answers a
2026-07-28 request (`server/discover` included) as a server of the 2025 revisions does, 400
without a session, so the gateway falls back to `initialize`.

Tools: `echo(text)`, `add(a, b)`, and `count()`, which counts its calls in this process (a
restarted server starts again from 1, which a test uses to tell a new process from the old).
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse

from mcp.server.mcpserver import MCPServer

PORT = int(sys.argv[1])
KEY = sys.argv[2]
SESSIONS_ONLY = "--sessions-only" in sys.argv[3:]

server = MCPServer("remote-tools")
calls = 0


@server.tool()
def echo(text: str) -> str:
    """Returns the text it was given."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@server.tool()
def count() -> int:
    """How many times this process has run this tool."""
    global calls
    calls += 1
    return calls


class RequireKey(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        if request.headers.get("x-api-key") != KEY:
            return JSONResponse({"error": "missing or wrong X-Api-Key"}, status_code=401)
        if SESSIONS_ONLY and request.headers.get("mcp-protocol-version") == "2026-07-28":
            error = {"code": -32600, "message": "Bad Request: Missing session ID"}
            return JSONResponse({"jsonrpc": "2.0", "id": "server-error", "error": error}, status_code=400)
        return await call_next(request)


app = server.streamable_http_app()
app.add_middleware(RequireKey)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
