//! Helpers for the node's spans: parents made elsewhere, and failure status.

use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A span context to parent spans made elsewhere: in another task, on the Raft log's writer
/// thread, in the state machine.
#[derive(Clone, Debug)]
pub struct Parent(pub opentelemetry::Context);

impl Parent {
    /// Makes `span` a child of this context.
    pub fn adopt(&self, span: &tracing::Span) {
        let _ = span.set_parent(self.0.clone());
    }
}

/// The traced writes of a Raft entry, in memory on the node that proposed it: never
/// serialized, and ignored when entries are compared (an entry read back from disk or from a
/// peer has none and is the same entry).
#[derive(Clone, Default)]
pub struct Traces(pub Vec<Parent>);

impl PartialEq for Traces {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Traces({})", self.0.len())
    }
}

impl Traces {
    pub fn iter(&self) -> impl Iterator<Item = &Parent> {
        self.0.iter()
    }
}

/// Makes `span` a child of `cx`, the caller's context, when there is one.
pub fn adopt(span: &tracing::Span, cx: Option<opentelemetry::Context>) {
    if let Some(cx) = cx {
        let _ = span.set_parent(cx);
    }
}

/// Marks `span` failed with `kind`, for spans declared with `otel.status_code` and
/// `error.type` fields.
pub fn failed(span: &tracing::Span, kind: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", kind);
}
