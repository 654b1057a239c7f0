"""A remote MCP server for the tests, written with the Python SDK (`MCPServer`) and served over
Streamable HTTP in both eras (2025 sessions, and 2026-07-28 stateless requests):
`remote_tools.py PORT KEY [--sessions-only] [--resumable]`. Every request must carry
`X-Api-Key: KEY` (else 401), so a test sees that the gateway sends a server's headers.
`--sessions-only` answers a 2026-07-28 request (`server/discover` included) as a server of the
2025 revisions does, 400 without a session, so the gateway falls back to `initialize`.
`--resumable` keeps its SSE events in an event store, as the SDK's resumability asks: they get
ids, and a client that lost a stream asks for the rest with `Last-Event-ID`.
`--legacy-sse` serves the legacy HTTP+SSE transport instead (GET /sse, POST /messages/).
`--oauth ISSUER JWKS_URI` makes it an OAuth resource server with the SDK's bearer middleware:
every request needs a JWT access token of ISSUER (keys at JWKS_URI) for its own URL, with the
scope `mcp`.

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

import jwt

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore

PORT = int(sys.argv[1])
KEY = sys.argv[2]
FLAGS = sys.argv[3:]
SESSIONS_ONLY = "--sessions-only" in FLAGS
RESUMABLE = "--resumable" in FLAGS
LEGACY_SSE = "--legacy-sse" in FLAGS
OAUTH = FLAGS[FLAGS.index("--oauth") + 1:FLAGS.index("--oauth") + 3] if "--oauth" in FLAGS else None
SELF_URL = f"http://127.0.0.1:{PORT}" + ("/sse" if LEGACY_SSE else "/mcp")


class JwtVerifier:
    """Accepts the issuer's JWT access tokens minted for this server's URL (RFC 8707)."""

    def __init__(self, issuer: str, jwks_uri: str):
        self.issuer, self.keys = issuer, jwt.PyJWKClient(jwks_uri)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            key = self.keys.get_signing_key_from_jwt(token)
            claims = jwt.decode(token, key, algorithms=["RS256"], audience=SELF_URL, issuer=self.issuer)
        except jwt.PyJWTError:
            return None
        return AccessToken(token=token, client_id=claims.get("client_id", ""), scopes=claims.get("scope", "").split(),
                           expires_at=claims.get("exp"), resource=SELF_URL)


if OAUTH:
    auth = AuthSettings(issuer_url=OAUTH[0], resource_server_url=SELF_URL, required_scopes=["mcp"],
                        validate_token_resource=True)
    server = MCPServer("remote-tools", token_verifier=JwtVerifier(*OAUTH), auth=auth)
else:
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


if LEGACY_SSE:
    app = server.sse_app()
else:
    app = server.streamable_http_app(event_store=MemoryEventStore() if RESUMABLE else None)
app.add_middleware(RequireKey)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
