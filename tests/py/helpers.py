"""Helpers shared by the end-to-end tests: real MCP clients (the Python SDK) and raw HTTP, and
polling with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx2
import mcp.types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.subscriptions import ToolsListChanged

T = TypeVar("T")

MODES = ["legacy", "2026-07-28"]
"""The two protocol eras the SDK client speaks: the session era (initialize, Mcp-Session-Id,
2025-11-25) and the stateless 2026-07-28 revision."""

STATELESS = "2026-07-28"


def run(coro: Awaitable[T], timeout: float = 120) -> T:
    """Runs one test's async scenario, failing it (instead of hanging) after `timeout` s."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def client(url: str, token: str, mode: str, **kwargs: Any) -> Client:
    """An SDK client on Streamable HTTP with a bearer token. `mode` is "legacy" or "2026-07-28"."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
    return Client(streamable_http_client(url, http_client=http), mode=mode, **kwargs)


def accepting(content: dict[str, Any], asked: list[str]) -> Callable[..., Awaitable[types.ElicitResult]]:
    """An elicitation callback that accepts with `content`, noting each question in `asked`."""

    async def elicitation(ctx: Any, p: Any) -> types.ElicitResult:
        asked.append(p.message)
        return types.ElicitResult(action="accept", content=content)

    return elicitation


def text_of(result: types.CallToolResult) -> str:
    """The text blocks of a tool result, joined."""
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Polls `check` until it returns something truthy (returned), or fails after `timeout` s
    saying `what` did not happen. An exception from `check` counts as "not yet"."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001 - "not yet", reported if it never succeeds
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")
        time.sleep(interval)


async def await_until(
    check: Callable[[], Awaitable[T | None]], timeout: float, what: str, interval: float = 0.2
) -> T:
    """`wait_until` for async checks."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = await check()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001 - "not yet", reported if it never succeeds
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")
        await asyncio.sleep(interval)


def protocols(cluster: Any, server: str) -> set[str | None]:
    """The revisions the nodes speak with `server` (`mcpctl server status`)."""
    status = json.loads(cluster.mcpctl("server", "status", server, "-o", "json"))
    return {d.get("protocol") for r in status["replicas"] for d in r["details"]}


def stateless_post(
    url: str,
    token: str | None,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    name: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
    http: httpx2.Client | None = None,
    capabilities: dict[str, Any] | None = None,
) -> httpx2.Response:
    """One raw 2026-07-28 request (no session): `_meta` and the routing headers as the
    revision requires, declaring `capabilities` (none by default). `http`: a client whose
    connection is kept between calls."""
    body_params = dict(params or {})
    body_params["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": STATELESS,
        "io.modelcontextprotocol/clientCapabilities": capabilities or {},
    }
    h = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": STATELESS,
        "Mcp-Method": method,
    }
    if name is not None:
        h["Mcp-Name"] = name
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": body_params}
    if http is not None:
        return http.post(url, json=body, headers=h, timeout=timeout)
    return httpx2.post(url, json=body, headers=h, timeout=timeout)


def stateless_tool_names(url: str, token: str, timeout: float = 60) -> list[str]:
    """The tool names `tools/list` answers on `url` (2026-07-28, raw HTTP), within `timeout`."""
    r = stateless_post(url, token, "tools/list", timeout=timeout)
    r.raise_for_status()
    return [t["name"] for t in r.json()["result"]["tools"]]


def legacy_post(
    url: str,
    token: str | None,
    body: dict[str, Any] | bytes,
    *,
    session: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> httpx2.Response:
    """One raw session-era POST (JSON-RPC body or raw bytes)."""
    h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if session is not None:
        h["Mcp-Session-Id"] = session
        h["MCP-Protocol-Version"] = "2025-11-25"
    h.update(headers or {})
    content = body if isinstance(body, bytes) else None
    return httpx2.post(url, content=content, json=None if content else body, headers=h, timeout=timeout)


def answer_of(r: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC answer of a POST, sent as JSON or as the last message of an SSE stream."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        messages = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:") and line[5:].strip()]
        answers = [m for m in messages if "id" in m and ("result" in m or "error" in m)]
        assert answers, f"no answer in the stream: {r.text}"
        return answers[-1]
    return r.json()


def legacy_initialize(url: str, token: str) -> str:
    """Opens a session-era session with raw HTTP; returns its Mcp-Session-Id."""
    r = legacy_post(
        url,
        token,
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "tests-py-raw", "version": "0"},
            },
        },
    )
    assert r.status_code == 200, r.text
    sid = r.headers.get("mcp-session-id")
    assert sid, f"initialize answered no Mcp-Session-Id: {r.headers}"
    legacy_post(url, token, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session=sid)
    return sid


def end_session(url: str, token: str, sid: str) -> None:
    """Ends a session-era session (DELETE)."""
    r = httpx2.delete(url, headers={"Authorization": f"Bearer {token}", "Mcp-Session-Id": sid}, timeout=10)
    assert r.status_code == 200, r.text


def rewrite_audit_trail(events: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """What someone who holds the data but not the cluster's key can do to the audit trail:
    hash every event from index `start` on again, as `mcpcp_proto::audit` does (SHA-256 over the
    previous hash, a newline, and the event's compact JSON with an empty hash and no MAC). The
    chain then holds together; the MACs, which need the key, are left as they were."""
    out = [dict(e) for e in events]
    for i in range(start, len(out)):
        if i > 0:
            out[i]["prev_hash"] = out[i - 1]["hash"]
        body = {k: ("" if k == "hash" else v) for k, v in out[i].items() if k != "mac"}
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        out[i]["hash"] = hashlib.sha256(f"{out[i]['prev_hash']}\n{text}".encode()).hexdigest()
    return out


TOLD_WITHIN = 30
"""How long a client waits to be told that its list changed (seconds)."""


@contextlib.asynccontextmanager
async def listening(
    cluster: Any, mode: str, node: int, url: str | None = None
) -> AsyncIterator[tuple[Client, Callable[[], Awaitable[None]]]]:
    """A client of `url` (default: `/mcp`) on node `node` that hears its tool list's changes,
    and a way to wait for the next one. A session's client hears them on its GET stream, open
    once the node has answered a GET on the endpoint (it listens before it answers); a
    2026-07-28 client on its listen stream, open once acknowledged."""
    url = url or cluster.url(node)
    if mode == STATELESS:
        async with client(url, cluster.token, mode) as c:
            async with c.listen(tools_list_changed=True) as sub:

                async def next_change() -> None:
                    while not isinstance(await anext(sub), ToolsListChanged):
                        pass

                yield c, next_change
        return
    changes = ToolListChanges()
    before = streams_answered(cluster, node, url)
    async with client(url, cluster.token, mode, message_handler=changes.on_message) as c:
        await stream_open(cluster, node, url, before)
        yield c, changes.next


class ToolListChanges:
    """The `notifications/tools/list_changed` a session's client hears: give it `on_message` as
    its message handler; `next` waits for the next one."""

    def __init__(self) -> None:
        self._heard: asyncio.Queue[None] = asyncio.Queue()

    async def on_message(self, m: Any) -> None:
        if getattr(m, "method", None) == "notifications/tools/list_changed":
            self._heard.put_nowait(None)

    async def next(self) -> None:
        await self._heard.get()


async def stream_open(cluster: Any, node: int, url: str, before: float) -> None:
    """Waits until node `node` has answered one more GET on the endpoint of `url` than
    `before` (`streams_answered`): a session's stream hears list changes from then on."""
    await asyncio.to_thread(wait_until, lambda: streams_answered(cluster, node, url) > before, 20,
                            "the session's GET stream open")


def streams_answered(cluster: Any, node: int, url: str) -> float:
    """GET streams node `node` has answered on the endpoint of `url` (its route's count): a
    session's stream hears list changes once it is answered."""
    path = urlsplit(url).path
    route = "/mcp" if path == "/mcp" else "/v/{vname}/mcp" if path.startswith("/v/") else "/servers/{name}/mcp"
    return cluster.metric("mcpd_http_requests_total", f'route="{route}",method="GET",status="200"', node) or 0


async def relist_until(c: Client, next_change: Callable[[], Awaitable[None]], tool: str, listed: bool) -> None:
    """Lists again at each change the client is told of, until `tool` is (or is no longer)
    listed; fails when the client is not told of another change within TOLD_WITHIN."""
    for _ in range(20):
        try:
            await asyncio.wait_for(next_change(), TOLD_WITHIN)
        except TimeoutError:
            raise AssertionError(f"not told of a change that {'lists' if listed else 'drops'} {tool}") from None
        names = {t.name for t in (await c.list_tools()).tools}
        if (tool in names) == listed:
            return
    raise AssertionError(f"20 changes told, and {tool} still {'not ' if listed else ''}listed")
