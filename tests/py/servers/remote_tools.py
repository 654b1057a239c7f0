"""A remote MCP server for the tests, written with the Python SDK (`MCPServer`) and served over
Streamable HTTP in both eras (2025 sessions, and 2026-07-28 stateless requests):
`remote_tools.py PORT KEY [--sessions-only] [--resumable]`. Every request must carry
`X-Api-Key: KEY` (else 401), so a test sees that the gateway sends a server's headers.
`--sessions-only` answers a 2026-07-28 request (`server/discover` included) as a server of the
2025 revisions does, 400 without a session, so the gateway falls back to `initialize`.
`--resumable` keeps its SSE events in an event store, as the SDK's resumability asks: they get
ids, and a client that lost a stream asks for the rest with `Last-Event-ID`.

Tools: `echo(text)`, `add(a, b)`, `count()`, which counts its calls in this process (a
restarted server starts again from 1, which a test uses to tell a new process from the old),
and `steps(n, pause_ms)`, which reports progress `n` times, `pause_ms` apart.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import uvicorn
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore

PORT = int(sys.argv[1])
KEY = sys.argv[2]
SESSIONS_ONLY = "--sessions-only" in sys.argv[3:]
RESUMABLE = "--resumable" in sys.argv[3:]

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


@server.tool()
async def steps(n: int, pause_ms: int, ctx: Context) -> str:
    """Reports progress n times, pause_ms apart."""
    for i in range(1, n + 1):
        await asyncio.sleep(pause_ms / 1000)
        await ctx.report_progress(i, n)
    return f"{n} steps done"


class MemoryEventStore(EventStore):
    """Every event of every stream, in order, ids counting up."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []
        self.ids = itertools.count(1)

    async def store_event(self, stream_id, message):
        event_id = str(next(self.ids))
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback: EventCallback):
        stream = next((s for e, s, _ in self.events if e == last_event_id), None)
        if stream is None:
            return None
        after = False
        for event_id, s, message in self.events:
            if event_id == last_event_id:
                after = True
            elif after and s == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


class RequireKey(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        if request.headers.get("x-api-key") != KEY:
            return JSONResponse({"error": "missing or wrong X-Api-Key"}, status_code=401)
        if SESSIONS_ONLY and request.headers.get("mcp-protocol-version") == "2026-07-28":
            error = {"code": -32600, "message": "Bad Request: Missing session ID"}
            return JSONResponse({"jsonrpc": "2.0", "id": "server-error", "error": error}, status_code=400)
        return await call_next(request)


app = server.streamable_http_app(event_store=MemoryEventStore() if RESUMABLE else None)
app.add_middleware(RequireKey)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
