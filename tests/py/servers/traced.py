"""A stdio MCP server that takes part in traces, for the tracing tests. Written with the Python
SDK (`MCPServer`), whose own middleware makes a server span per request as a child of the
W3C trace context in the request's `_meta` (SEP-414). When OTEL_EXPORTER_OTLP_ENDPOINT is set,
those spans go there (service.name `traced-server`), each as soon as it ends.

Its tool `trace_context` answers the W3C trace context keys of the request's `_meta` as it
received them (`traceparent`, `tracestate`, `baggage`: those present), as JSON."""

from __future__ import annotations

import json
import os

from mcp.server.mcpserver import Context, MCPServer

if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "traced-server"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(insecure=True)))
    trace.set_tracer_provider(provider)

server = MCPServer("traced")


@server.tool()
def trace_context(ctx: Context) -> str:
    """The trace context keys of the request's `_meta`, as this server received them."""
    meta = ctx.request_context.meta or {}
    return json.dumps({k: meta[k] for k in ("traceparent", "tracestate", "baggage") if k in meta})


if __name__ == "__main__":
    server.run()
