"""Tracing: OpenTelemetry spans over OTLP (`--otlp-endpoint`, `[tracing]`; off by default).

The runbook's check (deploy/README.md, "Tracing") as tests: a 3-node cluster exports to an OTLP
receiver; a real MCP client calls a real MCP server that runs on one node only, through another
node. The client's span, every node's spans of the call and the server's own span are one
connected trace; so are a subscribe's and its release's, which the pool sends from tasks of
their own. A registry write sent to a follower is one trace from the follower to the
leader's fsync and apply. The call log's events are also OpenTelemetry logs, in the call's
trace (`--call-audit-otlp-endpoint`); a collector that hangs costs the export its excess
(counted), never a call or a line of the file. With tracing off, nothing of the caller's trace context is changed.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess

import httpx2

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import (CA_CERT, MCPD, ROOT, VENV_BIN, Cluster, everything_on_one_node, mcpd_config, own_cluster,
                      start_cluster)
from helpers import (MODES, answer_of, client, end_session, legacy_initialize, legacy_post, run, stateless_post,
                     text_of, wait_until)
from otlp_receiver import Log, OtlpReceiver, Span

TRACED = ROOT / "tests/py/servers/traced.py"

# The spans of one MCP call through a peer, from the edge to the server's own span, by
# (service, name). The edge span is named as the OpenTelemetry MCP conventions (and the
# server's SDK) name it: method and target.
CALL = "tools/call trace_context"
CALL_SPANS = {
    ("mcpd", CALL), ("mcpd", "mcp.policy"), ("mcpd", "mcp.route"),
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
def untraced(tmp_path_factory):
    c = start_cluster(tmp_path_factory, "untraced", 3)
    try:
        c.serving = add_traced_server(c, None)
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def traced(tmp_path_factory, otlp):
    c = start_cluster(tmp_path_factory, "traced", 3, [f"--otlp-endpoint={otlp.endpoint}",
                                                      f"--call-audit-otlp-endpoint={otlp.endpoint}"])
    try:
        c.serving = add_traced_server(c, otlp)
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def sampled_by_callers_only(tmp_path_factory, otlp):
    """One node that exports spans but samples none of its own (`tracing.sample_ratio = 0`,
    under its own service name): only calls whose caller sampled them are traced."""
    config = mcpd_config(tmp_path_factory, "ratio-0", '[tracing]\nsample_ratio = 0.0\nservice_name = "mcpd-ratio-0"\n')
    with own_cluster(tmp_path_factory, "ratio-0", 1, [config, f"--otlp-endpoint={otlp.endpoint}"]) as c:
        c.serving = add_traced_server(c, None)
        yield c


def call_in_a_client_span(url: str, token: str, mode: str) -> tuple[str, str, dict]:
    """Calls `trace_context` with the real SDK client inside a span of the caller's own (its
    SDK injects the context into `_meta`); returns the trace id, the caller's span id and
    the trace context keys of `_meta` as the server received them."""
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))

    async def scenario() -> str:
        async with client(url, token, mode) as c:
            return text_of(await c.call_tool("trace_context", {}))

    with tracer.get_tracer("operator").start_as_current_span("operator.request") as span:
        received = run(scenario())
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", json.loads(received)


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
    # Every span arrives (the nodes and the server export in batches, as they would), and they
    # form one tree under the caller's span. The call's own spans are the node's edge span of
    # the tools/call and what is under it (the SDK's initialize and tools/list are traced too).
    def call_spans() -> tuple[list[Span], Span, list[Span]] | None:
        everything = otlp.trace(trace_id)
        edges = [s for s in everything if s.service == "mcpd" and s.name == CALL]
        if len(edges) != 1:
            return None
        got = subtree(everything, edges[0])
        if not CALL_SPANS <= {(s.service, s.name) for s in got}:
            return None
        ids = {s.span_id for s in everything}
        if any(s.parent_id not in ids and s.parent_id != caller for s in everything):
            return None  # a parent still on its way
        return everything, edges[0], got

    try:
        everything, request, got = wait_until(call_spans, 30, f"the spans {sorted(CALL_SPANS)} of trace {trace_id}")
    except AssertionError as e:
        raise AssertionError(f"{e}; received of it: {otlp.trace(trace_id)}") from None
    assert_connected(everything, caller)
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
    (route,) = by_name(got, "mcp.route")
    assert (str(route.attributes["attempts"]), str(route.attributes["node"])) == ("1", str(c.ids[c.serving])), route.attributes
    (peer_call,) = by_name(got, "peer.call")
    (peer_serve,) = by_name(got, "peer.serve")
    assert peer_serve.parent_id == peer_call.span_id, "the serving node continues the caller node's span"

    # The server got the upstream span's context in `_meta`, and its own span is its child.
    (upstream,) = by_name(got, "upstream.call")
    (server_span,) = [s for s in got if s.service == "traced-server"]
    assert server_span.parent_id == upstream.span_id
    version, tid, parent, flags = received["traceparent"].split("-")
    assert (tid, parent) == (trace_id, upstream.span_id), received
    assert int(flags, 16) & 1, "sampled"
    assert "tracestate" not in received, "no empty tracestate is sent"

    wait_until(lambda: (c.metric("mcpd_otlp_exported_total", 'signal="spans"', node=entry) or 0) >= 1, 10,
               "the entry node's exported spans counted")


def test_a_subscribe_and_its_release_stay_in_their_requests_traces(traced, otlp):
    """The pool sends a subscribe, and the last holder's unsubscribe, from a task of its own
    (they must finish when their caller goes): their queue and upstream spans are still under
    the request's route, in the caller's trace."""
    c = traced
    try:
        url = c.url(everything_on_one_node(c), "everything")
        sid = legacy_initialize(url, c.token)
        uri = "demo://resource/dynamic/text/7"
        # The release goes to the process that holds the URI, past the queue.
        for method, trace_id, wanted in [
            ("resources/subscribe", "5ab5c71be0a5c0a1a0c1b5e5d0f1a2b3", {"mcp.route", "pool.queue", "upstream.call"}),
            ("resources/unsubscribe", "5ab5c71be0a5c0a1a0c1b5e5d0f1a2b4", {"mcp.route", "upstream.call"}),
        ]:
            caller = "00f067aa0ba902b7"
            body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {"uri": uri}}
            r = legacy_post(url, c.token, body, session=sid,
                            headers={"traceparent": f"00-{trace_id}-{caller}-01"})
            assert "result" in answer_of(r), r.text

            def spans() -> list[Span] | None:
                got = otlp.trace(trace_id)
                names = {s.name for s in got}
                return got if wanted <= names else None

            try:
                got = wait_until(spans, 30, f"the {method}'s spans {sorted(wanted)} in trace {trace_id}")
            except AssertionError as e:
                raise AssertionError(f"{e}; received of it: {otlp.trace(trace_id)}") from None
            assert_connected(got, caller)
            (route,) = by_name(got, "mcp.route")
            (upstream,) = by_name(got, "upstream.call")
            assert upstream.attributes["mcp.method.name"] == method
            assert {s.parent_id for s in got if s.name in wanted - {"mcp.route"}} == {route.span_id}, got
        end_session(url, c.token, sid)
    finally:
        c.mcpctl("server", "rm", "everything")


def test_each_call_log_event_is_also_an_opentelemetry_log_in_its_trace(traced, otlp):
    c = traced
    entry = (c.serving + 1) % c.nodes
    trace_id, _, _ = call_in_a_client_span(c.url(entry, "traced"), c.token, "2026-07-28")

    def record() -> Log | None:
        return next((r for r in otlp.logs() if r.trace_id == trace_id and r.event_name == "mcp.call"), None)

    log = wait_until(record, 30, f"the call's log record in trace {trace_id}")
    # The node that took the call logged it: the same event as its calls.jsonl line.
    assert log.instance == str(c.ids[entry]) and log.service == "mcpd"
    (line,) = [e for e in c.call_log(entry) if e.get("trace", "").split("-")[1:2] == [trace_id]]
    assert json.loads(log.body) == line
    assert (log.attributes["mcp.server"], log.attributes["mcp.name"], log.attributes["mcp.outcome"]) == (
        "traced", "trace_context", "ok")
    assert log.severity == "INFO"
    # Its span is the node's edge span of the call.
    (edge,) = wait_until(lambda: [s for s in otlp.trace(trace_id) if s.service == "mcpd" and s.name == CALL],
                         30, "the call's edge span")
    assert log.span_id == edge.span_id
    wait_until(lambda: (c.metric("mcpd_otlp_exported_total", 'signal="calls"', node=entry) or 0) >= 1, 10,
               "the entry node's exported call events counted")


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


def test_a_refused_write_is_a_failed_span_that_says_why(traced, otlp):
    c = traced
    c.mcpctl("tenant", "add", "twice")
    try:
        r = c.mcpctl_result("tenant", "add", "twice")
        assert r.returncode != 0 and "already exists" in r.stderr, r
    finally:
        c.mcpctl("tenant", "rm", "twice")

    def refused() -> list[Span]:
        return [s for s in otlp.all() if s.service == "mcpd" and s.name == "registry.write"
                and s.attributes.get("op") == "put_tenant" and s.status == 2]

    (span, *_) = wait_until(refused, 30, "a failed registry.write span of put_tenant")
    assert span.attributes["error.type"] == "rejected", span.attributes
    ok = wait_until(lambda: [s for s in otlp.all() if s.name == "registry.write"
                             and s.attributes.get("op") == "delete_tenant"], 30, "the delete_tenant span")
    assert all(s.status != 2 for s in ok), ok


def test_a_node_that_samples_nothing_traces_the_calls_its_callers_sampled(sampled_by_callers_only, otlp):
    c = sampled_by_callers_only
    url = c.url(0, "traced")
    mine = lambda: [s for s in otlp.all() if s.service == "mcpd-ratio-0"]  # noqa: E731

    # A call with no context of its caller's: not sampled, nothing exported.
    async def bare() -> str:
        async with client(url, c.token, "2026-07-28") as cl:
            return text_of(await cl.call_tool("trace_context", {}))

    run(bare())
    # A call in a sampled span of the caller's: the node follows the caller's decision.
    trace_id, caller, _ = call_in_a_client_span(url, c.token, "2026-07-28")
    edge = wait_until(lambda: [s for s in mine() if s.name == CALL], 30, "the sampled call's edge span")
    assert [s.trace_id for s in edge] == [trace_id], edge
    assert edge[0].parent_id == caller
    # The node exports in order, so the bare call's spans would have come first.
    assert {s.trace_id for s in mine()} == {trace_id}, mine()


@pytest.mark.parametrize("mode", MODES)
def test_with_tracing_off_the_callers_context_reaches_the_server_unchanged(untraced, mode):
    c = untraced
    entry = (c.serving + 1) % c.nodes
    trace_id, caller, received = call_in_a_client_span(c.url(entry, "traced"), c.token, mode)
    # Through a peer, the server gets the caller's own traceparent (its ids and flags) and
    # nothing else of trace context.
    assert list(received) == ["traceparent"], received
    assert received["traceparent"].startswith(f"00-{trace_id}-{caller}-"), received
    assert "mcpd_otlp" not in "".join(c.metrics(n) for n in range(c.nodes))
    # The call log points at no trace.
    logged = wait_until(lambda: [e for e in c.call_log(entry) if e["name"] == "trace_context"], 10, "the call logged")
    assert all("trace" not in e for e in logged), logged


def test_a_bad_collector_address_is_refused_at_start_naming_the_field(tmp_path):
    r = subprocess.run([str(MCPD), "--id", "1", "--data-dir", str(tmp_path / "data"),
                        "--otlp-endpoint", "https://collector.example:4317"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "tracing.otlp_endpoint" in r.stderr and "http://HOST:PORT" in r.stderr, r.stderr


OTLP_MAX_QUEUED = 64


@pytest.fixture(scope="module")
def stalled_collector():
    """A collector that accepts connections and never answers: every export waits out its
    timeout, as when the collector hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.fixture(scope="module")
def call_log_to_a_stalled_collector(tmp_path_factory, stalled_collector):
    config = tmp_path_factory.mktemp("stalled") / "mcpd.toml"
    config.write_text(f"[call_audit]\notlp_max_queued = {OTLP_MAX_QUEUED}\n")
    c = start_cluster(tmp_path_factory, "stalled", 1,
                      [f"--config={config}", f"--call-audit-otlp-endpoint={stalled_collector}"])
    try:
        c.wait_tools("demo", ["echo"])
        yield c
    finally:
        c.down()


def test_a_stalled_collector_costs_the_export_its_excess_not_the_calls_or_the_file(call_log_to_a_stalled_collector):
    c = call_log_to_a_stalled_collector
    count = lambda name: c.metric(name, 'signal="calls"') or 0.0  # noqa: E731
    calls = OTLP_MAX_QUEUED * 2
    with httpx2.Client(verify=ssl.create_default_context(cafile=str(CA_CERT))) as http:
        for i in range(calls):
            r = stateless_post(f"{c.base(0)}/servers/demo/mcp", c.token, "tools/call",
                               {"name": "echo", "arguments": {"message": f"stalled-{i}"}}, name="echo", http=http)
            assert r.status_code == 200 and "result" in r.json(), r.text
    logged = lambda: [e for e in c.call_log(0) if e["name"] == "echo" and e["outcome"] == "ok"]  # noqa: E731
    wait_until(lambda: len(logged()) >= calls or None, 30, f"{calls} lines in the call log")
    assert len(logged()) == calls, "the file has every call"
    settled = wait_until(
        lambda: (q, d) if (q := count("mcpd_otlp_queued_total")) + (d := count("mcpd_otlp_dropped_total")) >= calls else None,
        30, "every event queued for export or dropped")
    queued, dropped = settled
    assert queued + dropped == calls, settled
    assert dropped > 0 and queued <= OTLP_MAX_QUEUED + count("mcpd_otlp_export_failed_total"), settled
