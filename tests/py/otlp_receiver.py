"""An OTLP/gRPC trace and log receiver for the tracing tests, built on the official OTLP protobuf
definitions (the `opentelemetry-proto` package's `TraceService`) and grpcio, on 127.0.0.1.
(No OpenTelemetry Collector can be installed from the package registries this project uses.)

    with OtlpReceiver() as otlp:          # otlp.endpoint == "http://127.0.0.1:PORT"
        ...                               # point mcpd (--otlp-endpoint) and SDKs at it
        spans = otlp.trace(trace_id)      # every span received of that trace
        logs = otlp.logs()                # every log record received

A span is a `Span` record: its ids in hex, name, kind, the `service.name` and
`service.instance.id` of the process that sent it, and its attributes.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    service: str
    instance: str
    status: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any] = field(hash=False, compare=False)

    def __repr__(self) -> str:
        return f"<{self.service}/{self.instance} {self.name} {self.span_id}<-{self.parent_id or '-'}>"


@dataclass(frozen=True)
class Log:
    trace_id: str  # "" when the record names no trace
    span_id: str
    event_name: str
    severity: str
    body: Any
    service: str
    instance: str
    attributes: dict[str, Any] = field(hash=False, compare=False)


def _attributes(kvs) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in kvs}


def _items(resources, scopes: str, items: str):
    """(resource attributes, item) for every item of an export request."""
    for r in resources:
        res = _attributes(r.resource.attributes)
        for scope in getattr(r, scopes):
            for item in getattr(scope, items):
                yield res, item


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver):
        self.receiver = receiver

    def Export(self, request, context):  # noqa: N802 - the protobuf service's name
        got = [
            Log(trace_id=r.trace_id.hex(), span_id=r.span_id.hex(), event_name=r.event_name,
                severity=r.severity_text, body=_value(r.body),
                service=str(res.get("service.name", "")), instance=str(res.get("service.instance.id", "")),
                attributes=_attributes(r.attributes))
            for res, r in _items(request.resource_logs, "scope_logs", "log_records")
        ]
        with self.receiver.lock:
            self.receiver.log_records.extend(got)
        return logs_service_pb2.ExportLogsServiceResponse()


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver):
        self.receiver = receiver

    def Export(self, request, context):  # noqa: N802 - the protobuf service's name
        got = [
            Span(trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                 name=s.name, kind=s.kind,
                 service=str(res.get("service.name", "")), instance=str(res.get("service.instance.id", "")),
                 status=s.status.code, attributes=_attributes(s.attributes))
            for res, s in _items(request.resource_spans, "scope_spans", "spans")
        ]
        with self.receiver.lock:
            self.receiver.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.log_records: list[Log] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"

    def __enter__(self) -> OtlpReceiver:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None)

    def all(self) -> list[Span]:
        with self.lock:
            return list(self.spans)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.all() if s.trace_id == trace_id]

    def logs(self) -> list[Log]:
        with self.lock:
            return list(self.log_records)
