//! W3C trace context in and out of the node (`traceparent`, `tracestate`):
//!
//! - MCP messages carry it in `params._meta` (SEP-414; the 2026-07-28 revision's convention,
//!   honoured in every revision since the keys are reserved in all), HTTP requests in their
//!   headers. A message's own context wins over its HTTP request's.
//! - The peer hop carries it in gRPC metadata, a forwarded registry write in its request.
//! - An upstream server gets it in the `_meta` of each request the node sends it.
//!
//! Nothing is read or written while tracing is off.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde_json::{Map, Value};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The keys SEP-414 reserves in `_meta`.
const KEYS: [&str; 2] = ["traceparent", "tracestate"];

struct Meta<'a>(&'a Map<String, Value>);

impl Extractor for Meta<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct MetaOut<'a>(&'a mut Map<String, Value>);

impl Injector for MetaOut<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` is left out, as W3C says a sender may.
        if !value.is_empty() {
            self.0.insert(key.to_string(), Value::String(value));
        }
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        KEYS.into_iter()
            .filter(|k| self.0.contains_key(*k))
            .collect()
    }
}

struct MetadataOut<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataOut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

struct OneOut(Option<String>);

impl Injector for OneOut {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// `Some` when `extractor` held a well-formed context.
fn extract(extractor: &dyn Extractor) -> Option<Context> {
    let cx = TraceContextPropagator::new().extract(extractor);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The current span's context, when tracing is on and the span is recorded.
fn current() -> Option<Context> {
    super::with_current(of).flatten()
}

/// `span`'s context, when the span is recorded (while tracing is off, none is).
fn of(span: &tracing::Span) -> Option<Context> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    cx.span().span_context().is_valid().then_some(cx)
}

/// The caller's context: the message's `_meta`, else its HTTP request's headers.
pub fn from_request(headers: &http::HeaderMap, params: Option<&Value>) -> Option<Context> {
    if !super::enabled() {
        return None;
    }
    callers(headers, params)
}

fn callers(headers: &http::HeaderMap, params: Option<&Value>) -> Option<Context> {
    params
        .and_then(|p| p.get("_meta"))
        .and_then(Value::as_object)
        .and_then(|m| extract(&Meta(m)))
        .or_else(|| extract(&Headers(headers)))
}

/// Puts `span`'s context into a request's `params._meta` (replacing the caller's: the
/// server's parent is the node's span, which the caller's is the ancestor of).
pub fn into_meta(params: &mut Option<Value>, span: &tracing::Span) {
    let Some(cx) = of(span) else { return };
    let params = params.get_or_insert_with(|| Value::Object(Map::new()));
    let Some(p) = params.as_object_mut() else {
        return;
    };
    let meta = p
        .entry("_meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(m) = meta.as_object_mut() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetaOut(m));
    }
}

/// Puts the current span's context into a gRPC request's metadata.
pub fn into_metadata(md: &mut tonic::metadata::MetadataMap) {
    if let Some(cx) = current() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataOut(md));
    }
}

/// The caller's context from a gRPC request's metadata.
pub fn from_metadata(md: &tonic::metadata::MetadataMap) -> Option<Context> {
    if !super::enabled() {
        return None;
    }
    extract(&Metadata(md))
}

fn traceparent_of(cx: &Context) -> Option<String> {
    let mut out = OneOut(None);
    TraceContextPropagator::new().inject_context(cx, &mut out);
    out.0
}

/// The current span's `traceparent`, for a message that carries one string ("": none).
pub fn traceparent() -> String {
    current()
        .and_then(|cx| traceparent_of(&cx))
        .unwrap_or_default()
}

/// The current span's `traceparent` when it is traced and sampled (for the call log: a
/// trace that is not exported is not pointed at).
pub fn current_traceparent() -> Option<String> {
    current()
        .filter(|cx| cx.span().span_context().is_sampled())
        .and_then(|cx| traceparent_of(&cx))
}

/// The context of a `traceparent` string (empty: none).
pub fn from_traceparent(traceparent: &str) -> Option<Context> {
    if !super::enabled() || traceparent.is_empty() {
        return None;
    }
    extract(&One(traceparent))
}

/// The current span's context, to be the parent of spans made in another task or thread.
pub fn current_parent() -> Option<super::Parent> {
    current().map(super::Parent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_message_context_wins_over_its_http_request() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-11111111111111111111111111111111-2222222222222222-01"
                .parse()
                .unwrap(),
        );
        let trace =
            |cx: Option<Context>| cx.map(|c| c.span().span_context().trace_id().to_string());
        let params = json!({"_meta": {"traceparent": TP}});
        assert_eq!(
            trace(callers(&headers, Some(&params))).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        // Without one in `_meta`, the header's.
        assert_eq!(
            trace(callers(&headers, Some(&json!({"_meta": {}})))).as_deref(),
            Some("11111111111111111111111111111111")
        );
        assert_eq!(trace(callers(&http::HeaderMap::new(), None)), None);
    }

    #[test]
    fn malformed_contexts_are_none() {
        for bad in [
            "",
            "00-zz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(extract(&One(bad)).is_none(), "{bad}");
        }
        assert!(extract(&One(TP)).is_some());
    }
}
