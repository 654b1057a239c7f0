"""Tracing: OpenTelemetry spans over OTLP (`--otlp-endpoint`, `[tracing]`; off by default).

The runbook's check (deploy/README.md, "Tracing") as tests: a 3-node cluster exports to an OTLP
receiver; a real MCP client calls a real MCP server that runs on one node only, through another
node. The client's span, every node's spans of the call and the server's own span are one
connected trace. A registry write sent to a follower is one trace from the follower to the
leader's fsync and apply. With tracing off, nothing of the caller's trace context is changed.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import MCPD, ROOT, VENV_BIN, Cluster, start_cluster
from helpers import MODES, client, run, text_of, wait_until
from otlp_receiver import OtlpReceiver, Span

TRACED = ROOT / "tests/py/servers/traced.py"

# The spans of one MCP call through a peer, from the edge to the server's own span, by
# (service, name). The edge span is named as the OpenTelemetry MCP conventions (and the
# server's SDK) name it: method and target.
CALL = "tools/call trace_context"
CALL_SPANS = {
    ("mcpd", CALL), ("mcpd", "mcp.policy"), ("mcpd", "mcp.route"), ("mcpd", "route.attempt"),
    ("mcpd", "peer.call"), ("mcpd", "peer.serve"), ("mcpd", "pool.queue"),
    ("mcpd", "upstream.call"), ("traced-server", CALL),
}
# The spans of a registry write sent to a follower.
WRITE_SPANS = {"registry.write", "registry.forward", "raft.propose", "raft.fsync", "raft.apply"}


@pytest.fixture(scope="module")
def otlp():
    with OtlpReceiver() as receiver:
        yield receiver


def add_traced_server(c: Cluster, otlp: OtlpReceiver | None) -> int:
    """Adds the `traced` server on one node (replicas 1); returns that node's index."""
    env = ["--env", f"OTEL_EXPORTER_OTLP_ENDPOINT={otlp.endpoint}"] if otlp else []
    c.mcpctl("server", "add", "traced", "--replicas", "1", "--pool-size", "1", *env, "--",
             str(VENV_BIN / "python"), str(TRACED))
    c.wait_tools("traced", ["trace_context"])

    def serving() -> int | None:
        status = json.loads(c.mcpctl("server", "status", "traced", "-o", "json"))
        ready = [r["node"] for r in status["replicas"] if "ready" in r["processes"]]
        return c.ids.index(ready[0]) if len(ready) == 1 else None

    return wait_until(lambda: (serving(),) if serving() is not None else None, 60, "one node runs traced")[0]


@pytest.fixture(scope="module")
def traced(tmp_path_factory, otlp):
    c = start_cluster(tmp_path_factory, "traced", 3, [f"--otlp-endpoint={otlp.endpoint}"])
    try:
        c.serving = add_traced_server(c, otlp)
        yield c
    finally:
        c.down()


def call_in_a_client_span(url: str, token: str, mode: str) -> tuple[str, str, str]:
    """Calls `trace_context` with the real SDK client inside a span of the caller's own (its
    SDK injects the context into `_meta`); returns the trace id, the caller's span id and
    the `traceparent` the server received."""
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))

    async def scenario() -> str:
        async with client(url, token, mode) as c:
            return text_of(await c.call_tool("trace_context", {}))

    with tracer.get_tracer("operator").start_as_current_span("operator.request") as span:
        received = run(scenario())
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", received


def by_name(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def subtree(spans: list[Span], root: Span) -> list[Span]:
    """`root` and its descendants."""
    out, ids = [root], {root.span_id}
    grew = True
    while grew:
        more = [s for s in spans if s.parent_id in ids and s.span_id not in ids]
        out += more
        ids |= {s.span_id for s in more}
        grew = bool(more)
    return out


def assert_connected(spans: list[Span], root_parent: str) -> None:
    """Every span's parent is a span of the trace, except the roots', which is `root_parent`
    (a session's requests are each a root under the caller's span)."""
    ids = {s.span_id for s in spans}
    orphans = [s for s in spans if s.parent_id not in ids]
    assert orphans and {s.parent_id for s in orphans} == {root_parent}, f"not one tree: orphans {orphans} in {spans}"


@pytest.mark.parametrize("mode", MODES)
def test_one_call_through_a_peer_is_one_connected_trace(traced, otlp, mode):
    c = traced
    entry = (c.serving + 1) % c.nodes
    trace_id, caller, received = call_in_a_client_span(c.url(entry, "traced"), c.token, mode)

    # Every span arrives (the nodes and the server export in batches, as they would).
    def spans() -> list[Span] | None:
        got = otlp.trace(trace_id)
        return got if CALL_SPANS <= {(s.service, s.name) for s in got} else None

    try:
        everything = wait_until(spans, 30, f"the spans {sorted(CALL_SPANS)} of trace {trace_id}")
    except AssertionError as e:
        raise AssertionError(f"{e}; received of it: {otlp.trace(trace_id)}; of all traces: "
                             f"{sorted({(s.service, s.name) for s in otlp.all()})}") from None
    assert_connected(everything, caller)
    # The call's own spans: the node's edge span of the tools/call and what is under it (a
    # session-era client's initialize and tools/list are traced too, beside it).
    (request,) = [s for s in everything if s.service == "mcpd" and s.name == CALL]
    got = subtree(everything, request)
    assert CALL_SPANS <= {(s.service, s.name) for s in got}, got
    assert request.parent_id == caller, "the edge span is a child of the caller's span"
    assert request.kind == 2, "the edge span is a server span"  # SPAN_KIND_SERVER
    assert request.attributes["mcp.method.name"] == "tools/call"
    assert request.attributes["gen_ai.tool.name"] == "trace_context"

    # The hop: the call crosses from the entry node to the node that runs the server.
    entry_id, serving_id = str(c.ids[entry]), str(c.ids[c.serving])
    for name, node in [("mcp.route", entry_id), ("peer.call", entry_id),
                       ("peer.serve", serving_id), ("pool.queue", serving_id), ("upstream.call", serving_id)]:
        assert {s.instance for s in by_name(got, name)} == {node}, f"{name} on node {node}: {got}"
        assert {s.service for s in by_name(got, name)} == {"mcpd"}
    (peer_call,) = by_name(got, "peer.call")
    (peer_serve,) = by_name(got, "peer.serve")
    assert peer_serve.parent_id == peer_call.span_id, "the serving node continues the caller node's span"

    # The server got the upstream span's context in `_meta`, and its own span is its child.
    (upstream,) = by_name(got, "upstream.call")
    (server_span,) = [s for s in got if s.service == "traced-server"]
    assert server_span.service == "traced-server"
    assert server_span.parent_id == upstream.span_id
    version, tid, parent, flags = received.split("-")
    assert (tid, parent) == (trace_id, upstream.span_id), received
    assert int(flags, 16) & 1, "sampled"

    exported = c.metric("mcpd_trace_spans_exported_total", "", node=entry)
    assert exported and exported >= 1


def test_a_write_sent_to_a_follower_is_one_trace_down_to_the_leaders_fsync_and_apply(traced, otlp):
    c = traced
    leader = c.leader()
    follower = (leader + 1) % c.nodes
    c.mcpctl("tenant", "add", "traced-tenant", node=follower)

    def trace() -> list[Span] | None:
        roots = [s for s in otlp.all() if s.name == "registry.write" and s.parent_id == ""
                 and s.instance == str(c.ids[follower]) and s.attributes.get("op") == "put_tenant"]
        for root in roots:
            got = otlp.trace(root.trace_id)
            if WRITE_SPANS <= {s.name for s in got}:
                return got
        return None

    got = wait_until(trace, 30, f"a trace of {sorted(WRITE_SPANS)} from node {c.ids[follower]}")
    assert_connected(got, "")
    leader_id = str(c.ids[leader])
    for name in ["raft.propose", "raft.fsync", "raft.apply"]:
        assert {s.instance for s in by_name(got, name)} == {leader_id}, f"{name} on the leader: {got}"
    (forwarded,) = [s for s in by_name(got, "registry.write") if s.instance == leader_id]
    (forward,) = by_name(got, "registry.forward")
    assert forwarded.parent_id == forward.span_id


def test_with_tracing_off_the_callers_context_reaches_the_server_unchanged(tmp_path_factory):
    c = start_cluster(tmp_path_factory, "untraced", 1)
    try:
        add_traced_server(c, None)
        trace_id, caller, received = call_in_a_client_span(c.url(0, "traced"), c.token, "2026-07-28")
        # The caller's own trace id and span id (and its flags, sampled and random).
        assert received.startswith(f"00-{trace_id}-{caller}-"), received
        assert "mcpd_trace_spans_exported_total" not in c.metrics(0)
    finally:
        c.down()


def test_a_bad_collector_address_is_refused_at_start_naming_the_field(tmp_path):
    r = subprocess.run([str(MCPD), "--id", "1", "--data-dir", str(tmp_path / "data"),
                        "--otlp-endpoint", "https://collector.example:4317"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "tracing.otlp_endpoint" in r.stderr and "http://HOST:PORT" in r.stderr, r.stderr
