//! How requests reach a remote server in the stateless revision (2026-07-28): each round of
//! a request (`super::rounds`) is one POST, sent by the connection (`super::remote_stateless`)
//! and its listen stream (`super::listen`, whose stream is the POST's event stream):
//!
//! - a POST carries the `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` headers; the
//!   server's OAuth client (`super::oauth`) and the `401`-once-more rule are as in
//!   `super::remote`;
//! - its answer is JSON, or an SSE stream whose notifications go to the call.

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::future::BoxFuture;
use mcpcp_proto::mcp::{ErrorObject, Message, RequestId, STATELESS_VERSION};
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::Value;

use super::listen::{Listened, Listens, Stream};
use super::oauth::Tokens;
use super::rounds::Carrier;
use crate::call::{CallError, CallEvent, EventSink};

/// Largest answer body read from a remote server.
const MAX_BODY: usize = 16 << 20;

/// How requests reach one server.
pub struct Link {
    pub server: String,
    pub url: reqwest::Url,
    http: reqwest::Client,
    tokens: Option<Tokens>,
    /// The client capabilities a request carries when its caller gave none (the gateway's).
    capabilities: Value,
    /// Most questions one round may ask (`[pool] max_input_questions`).
    max_questions: usize,
    next_id: AtomicU64,
}

/// How one POST ended.
enum Posted {
    Answer(Result<Value, ErrorObject>),
    /// An HTTP error without a JSON-RPC answer.
    Refused(StatusCode),
}

impl Link {
    pub fn new(
        server: String,
        url: reqwest::Url,
        http: reqwest::Client,
        tokens: Option<Tokens>,
        capabilities: Value,
        max_questions: usize,
    ) -> Link {
        Link {
            server,
            url,
            http,
            tokens,
            capabilities,
            max_questions,
            next_id: AtomicU64::new(1),
        }
    }

    /// A request id of this connection.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The server's `server/discover` result if it names 2026-07-28; `None` for any other
    /// answer. An error only when the server was not reached.
    pub async fn discovered(&self) -> Result<Option<Value>, CallError> {
        let params = self.with_meta(None);
        let result = match self.post("server/discover", &params, None).await? {
            Posted::Answer(Ok(result)) => result,
            Posted::Answer(Err(_)) | Posted::Refused(_) => return Ok(None),
        };
        Ok(super::rounds::speaks(&result).then_some(result))
    }

    /// The request's params with this revision's `_meta` (`super::rounds::with_meta`).
    pub fn with_meta(&self, params: Option<Value>) -> Option<Value> {
        super::rounds::with_meta(params, &self.capabilities)
    }

    /// POSTs one request (a new id of this connection) with this revision's headers, once
    /// more with a new access token after a `401` (`oauth::send_authorized`).
    pub async fn send(
        &self,
        method: &str,
        params: Option<&Value>,
    ) -> Result<reqwest::Response, CallError> {
        let id = RequestId::Num(self.next_id() as i64);
        let name = routing_name(method, params);
        // Shared, not copied, by a request sent again after a `401`.
        let body = bytes::Bytes::from(Message::request_line(&id, method, params));
        let resp = super::oauth::send_authorized(self.tokens.as_ref(), &self.server, || {
            let req = self
                .http
                .post(self.url.clone())
                .header(ACCEPT, "application/json, text/event-stream")
                .header(CONTENT_TYPE, "application/json")
                .header("mcp-protocol-version", STATELESS_VERSION)
                .header("mcp-method", method)
                .body(body.clone());
            match &name {
                Some(name) => req.header("mcp-name", name.clone()),
                None => req,
            }
        })
        .await?
        .map_err(|e| super::remote_http::send_failed(&self.server, e))?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(CallError::NotRun(format!(
                "remote server {:?} refused the credentials it was sent (HTTP 401); the call did not run",
                self.server
            )));
        }
        Ok(resp)
    }

    /// POSTs one request; its answer is read from JSON or from its SSE stream, whose
    /// notifications go to `events`.
    async fn post(
        &self,
        method: &str,
        params: &Option<Value>,
        events: Option<&EventSink>,
    ) -> Result<Posted, CallError> {
        let resp = self.send(method, params.as_ref()).await?;
        let status = resp.status();
        if status.is_success() && super::remote_http::is_event_stream(&resp) {
            return self.read_stream(resp, events).await;
        }
        match super::remote_http::read_message(resp, MAX_BODY, &self.server).await? {
            Some(Message::Response { outcome, .. }) => Ok(Posted::Answer(outcome)),
            _ if status.is_client_error() => Ok(Posted::Refused(status)),
            _ => Err(CallError::Crashed(format!(
                "remote server {:?} answered HTTP {status} without a JSON-RPC answer; it may or may not have run",
                self.server
            ))),
        }
    }

    /// Reads a request's SSE stream until its answer; its notifications go to `events`.
    async fn read_stream(
        &self,
        resp: reqwest::Response,
        events: Option<&EventSink>,
    ) -> Result<Posted, CallError> {
        let outcome =
            super::remote_http::read_answer(resp, MAX_BODY, &self.server, |msg| async move {
                // This revision has no requests of the server on a request's stream.
                if let (Message::Notification { .. }, Some(events)) = (&msg, events) {
                    let _ = events.send(CallEvent::Notify(msg)).await;
                }
            })
            .await?;
        Ok(Posted::Answer(outcome))
    }
}

impl Carrier for Link {
    fn server(&self) -> &str {
        &self.server
    }

    fn max_questions(&self) -> usize {
        self.max_questions
    }

    fn capabilities(&self) -> &Value {
        &self.capabilities
    }

    fn round<'a>(
        &'a self,
        method: &'a str,
        params: &'a Option<Value>,
        events: Option<&'a EventSink>,
    ) -> BoxFuture<'a, Result<Value, CallError>> {
        Box::pin(async move {
            match self.post(method, params, events).await? {
                Posted::Answer(outcome) => outcome.map_err(CallError::Answered),
                Posted::Refused(status) => Err(CallError::NotRun(format!(
                    "remote server {:?} refused the request (HTTP {status}); the call did not run",
                    self.server
                ))),
            }
        })
    }
}

/// The `Mcp-Name` of a request: the tool, prompt or resource it names, base64-encoded
/// (`=?base64?...?=`) when it is not plain visible ASCII.
fn routing_name(method: &str, params: Option<&Value>) -> Option<HeaderValue> {
    let field = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" => "uri",
        _ => return None,
    };
    let name = params?.get(field)?.as_str()?;
    if name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return HeaderValue::from_str(name).ok();
    }
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(name);
    HeaderValue::from_str(&format!("=?base64?{encoded}?=")).ok()
}

/// Largest event of a listen stream read.
const MAX_EVENT: usize = 16 << 20;

impl Listens for Link {
    fn server(&self) -> &str {
        &self.server
    }

    /// POSTs `subscriptions/listen`; its SSE stream, once the server took it.
    fn open(&self, notifications: Value) -> BoxFuture<'_, Result<Stream, Listened>> {
        Box::pin(async move {
            let params =
                self.with_meta(Some(serde_json::json!({ "notifications": notifications })));
            let resp = self
                .send("subscriptions/listen", params.as_ref())
                .await
                .map_err(|_| Listened::Ended)?;
            let sse = super::remote_http::is_event_stream(&resp);
            match resp.status() {
                s if s.is_success() && sse => Ok(event_messages(resp)),
                // A stream it has not: the method or the endpoint is not there, or the
                // request is not one it takes. Anything else (busy, a timeout, a server
                // error) is tried again.
                StatusCode::NOT_FOUND
                | StatusCode::METHOD_NOT_ALLOWED
                | StatusCode::BAD_REQUEST => {
                    tracing::info!(server = %self.server, "the remote server has no subscriptions/listen stream; its list changes are not heard");
                    Err(Listened::Refused)
                }
                // A JSON answer: an error when the method is unknown (else nothing to listen to).
                s if s.is_success() => Err(Listened::Refused),
                _ => Err(Listened::Ended),
            }
        })
    }
}

/// The JSON-RPC messages of an SSE answer, until it ends, breaks, or sends an event over
/// [`MAX_EVENT`].
fn event_messages(resp: reqwest::Response) -> Stream {
    use futures_util::StreamExt;
    let start = (
        resp.bytes_stream(),
        mcpcp_proto::sse::SseParser::default(),
        std::collections::VecDeque::new(),
    );
    futures_util::stream::unfold(start, |(mut body, mut parser, mut ready)| async move {
        loop {
            if let Some(msg) = ready.pop_front() {
                return Some((msg, (body, parser, ready)));
            }
            let chunk = body.next().await?.ok()?;
            if parser.pending() > MAX_EVENT {
                return None;
            }
            ready.extend(
                parser
                    .feed(&chunk)
                    .into_iter()
                    .filter_map(|event| Message::parse(event.data.as_bytes()).ok()),
            );
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_routing_name_is_the_tool_prompt_or_uri_encoded_when_not_plain_ascii() {
        let call = json!({ "name": "echo", "arguments": {} });
        assert_eq!(routing_name("tools/call", Some(&call)).unwrap(), "echo");
        let read = json!({ "uri": "file:///tmp/a.txt" });
        assert_eq!(
            routing_name("resources/read", Some(&read)).unwrap(),
            "file:///tmp/a.txt"
        );
        let accented = json!({ "name": "café" });
        assert_eq!(
            routing_name("prompts/get", Some(&accented)).unwrap(),
            "=?base64?Y2Fmw6k=?="
        );
        assert!(routing_name("tools/list", Some(&call)).is_none());
    }
}
