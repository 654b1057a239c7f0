//! The Streamable HTTP wire, shared by both protocol eras: header names, JSON-RPC errors as
//! HTTP answers, SSE framing, log levels, and the bounded labels of the request metrics.

use std::convert::Infallible;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use mcpcp_proto::mcp::{code, ErrorObject, Message, RequestId};
use serde_json::{json, Value};

use super::target::Target;

pub const SESSION_HEADER: &str = "mcp-session-id";
pub const VERSION_HEADER: &str = "mcp-protocol-version";

pub use mcpcp_proto::mcp::LOG_LEVELS as LEVELS;

/// Whether a log message at `level` passes a session's minimum level `min`.
pub fn level_passes(level: &str, min: &str) -> bool {
    let rank = |l: &str| LEVELS.iter().position(|x| *x == l).unwrap_or(1);
    rank(level) >= rank(min)
}

/// Whether the log line `msg` (`notifications/message`, level `info` when it names none) is
/// at or above `min`.
pub fn log_passes(msg: &Message, min: &str) -> bool {
    let level = match msg {
        Message::Notification {
            params: Some(p), ..
        } => p["level"].as_str().unwrap_or("info"),
        _ => "info",
    };
    level_passes(level, min)
}

/// An HTTP error whose body is a JSON-RPC error (with the id when known).
pub fn rpc_error(status: StatusCode, id: Option<RequestId>, error: ErrorObject) -> Response {
    let body = json!({ "jsonrpc": "2.0", "id": id, "error": error });
    (status, Json(body)).into_response()
}

pub fn accepts_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// One SSE event carrying one JSON-RPC message.
pub fn sse_event(m: &Message) -> Event {
    Event::default()
        .event("message")
        .data(serde_json::to_string(&m.to_value()).unwrap_or_default())
}

/// An SSE answer with keep-alives and no proxy buffering.
pub fn sse<S>(stream: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

pub fn method_label(method: &str) -> String {
    // Bounded cardinality: known methods by name, anything else as "other".
    const KNOWN: &[&str] = &[
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "ping",
        "logging/setLevel",
        "initialize",
        "server/discover",
        "subscriptions/listen",
    ];
    if KNOWN.contains(&method) {
        method.to_string()
    } else {
        "other".into()
    }
}

pub fn endpoint_label(target: &Target) -> String {
    match target {
        Target::Aggregate => "aggregate".into(),
        Target::Server(name) => name.clone(),
        Target::Virtual(name) => format!("v/{name}"),
    }
}

fn outcome_label(outcome: &Result<Value, ErrorObject>) -> &'static str {
    match outcome {
        Ok(v) if v["isError"] == json!(true) => "tool_error",
        Ok(_) => "ok",
        Err(e) if e.code == code::TIMEOUT => "timeout",
        Err(e) if e.code == code::QUEUE_FULL => "queue_full",
        Err(e) if e.code == code::UNAVAILABLE => "unavailable",
        Err(e) if e.code == code::CRASHED => "crashed",
        Err(_) => "error",
    }
}

/// Labels and start time of one request, for its metrics when it ends.
#[derive(Clone)]
pub struct Measure {
    pub labels: [(&'static str, String); 2],
    pub started: std::time::Instant,
}

impl Measure {
    pub fn finish(&self, outcome: &Result<Value, ErrorObject>) {
        let mut l = self.labels.to_vec();
        l.push(("outcome", outcome_label(outcome).to_string()));
        metrics::counter!("mcpd_mcp_requests_total", &l).increment(1);
        metrics::histogram!("mcpd_mcp_request_seconds", &self.labels)
            .record(self.started.elapsed().as_secs_f64());
    }
}
