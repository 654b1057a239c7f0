//! One request to a remote server in the stateless revision (2026-07-28), round after
//! round (`super::remote_stateless` is the connection that sends them):
//!
//! - each request is one POST carrying its revision and the client's capabilities in
//!   `_meta` (the caller's own for a 2026-07-28 client, else the gateway's; the caller's log
//!   level when it gave one) and the `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name`
//!   headers; the server's OAuth client (`super::oauth`) and the `401`-once-more rule are as
//!   in `super::remote`;
//! - an `input_required` result's questions (at most 64 a round) go to the call's client as
//!   the server's own requests, under the server's input keys (a 2025 client gets them as
//!   sampling, elicitation or roots requests on its stream, a 2026 client in its own
//!   `input_required`); their answers are sent back with the server's `requestState` in the
//!   next round, until the result is complete. The call's timeout bounds the rounds;
//! - `ping` is a `server/discover`; `logging/setLevel` is refused as a method the server
//!   does not have.

use std::sync::atomic::{AtomicU64, Ordering};

use mcpcp_proto::mcp::{code, ErrorObject, Message, RequestId, STATELESS_VERSION};
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::oauth::Tokens;
use crate::call::{CallError, CallEvent, EventSink, Responder};

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPS: &str = "io.modelcontextprotocol/clientCapabilities";
/// Largest answer body read from a remote server.
const MAX_BODY: usize = 16 << 20;
/// Most questions one `input_required` result may ask (each reaches the client).
const MAX_QUESTIONS: usize = 64;

/// How requests reach one server.
pub struct Link {
    pub server: String,
    pub url: String,
    http: reqwest::Client,
    tokens: Option<Tokens>,
    /// The client capabilities a request carries when its caller gave none (the gateway's).
    capabilities: Value,
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
        url: String,
        http: reqwest::Client,
        tokens: Option<Tokens>,
        capabilities: Value,
    ) -> Link {
        Link {
            server,
            url,
            http,
            tokens,
            capabilities,
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
        let id = self.next_id();
        let params = self.with_meta(None);
        let request = Message::request(RequestId::Num(id as i64), "server/discover", params);
        let result = match self.post(&request, None).await? {
            Posted::Answer(Ok(result)) => result,
            Posted::Answer(Err(_)) | Posted::Refused(_) => return Ok(None),
        };
        let speaks = result["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v == STATELESS_VERSION));
        Ok(speaks.then_some(result))
    }

    /// Sends a request, round after round (see the module docs).
    pub async fn call(
        &self,
        method: &str,
        params: Option<Value>,
        events: Option<EventSink>,
    ) -> Result<Value, CallError> {
        match method {
            "ping" => {
                return match self.discovered().await? {
                    Some(_) => Ok(json!({})),
                    None => Err(CallError::Crashed(format!(
                        "remote server {:?} no longer answers server/discover with {STATELESS_VERSION}",
                        self.server
                    ))),
                }
            }
            "logging/setLevel" => {
                return Err(CallError::Answered(ErrorObject::new(
                    code::METHOD_NOT_FOUND,
                    format!(
                        "{method}: remote server {:?} speaks {STATELESS_VERSION}, which has no such method",
                        self.server
                    ),
                )))
            }
            _ => {}
        }
        let mut request = Message::request(RequestId::Num(0), method, self.with_meta(params));
        loop {
            // Each round is a request of its own id, its params those of the last round
            // with the answers (changed in place, not copied).
            let Message::Request { id, .. } = &mut request else {
                unreachable!("built as a request");
            };
            *id = RequestId::Num(self.next_id() as i64);
            let mut result = match self.post(&request, events.as_ref()).await? {
                Posted::Answer(outcome) => outcome.map_err(CallError::Answered)?,
                Posted::Refused(status) => {
                    return Err(CallError::NotRun(format!(
                    "remote server {:?} refused the request (HTTP {status}); the call did not run",
                    self.server
                )))
                }
            };
            if result["resultType"] != "input_required" {
                if let Some(r) = result.as_object_mut() {
                    r.remove("resultType");
                }
                return Ok(result);
            }
            metrics::counter!("mcpd_upstream_input_required_total", "server" => self.server.clone())
                .increment(1);
            let answers = self.ask(&result["inputRequests"], events.as_ref()).await?;
            let Message::Request { params, .. } = &mut request else {
                unreachable!("built as a request");
            };
            let p = params
                .get_or_insert_with(|| json!({}))
                .as_object_mut()
                .ok_or_else(|| {
                    CallError::Answered(ErrorObject::new(
                        code::INVALID_PARAMS,
                        "params: must be an object",
                    ))
                })?;
            p.insert("inputResponses".into(), Value::Object(answers));
            match result.get_mut("requestState").map(Value::take) {
                Some(state) => p.insert("requestState".into(), state),
                None => p.remove("requestState"),
            };
        }
    }

    /// The request's params with this revision's `_meta`: its version and the caller's
    /// client capabilities (or the gateway's). The caller's log level, when it gave one
    /// (a 2026 client's opt-in, a 2025 session's `logging/setLevel`), is in it already.
    pub fn with_meta(&self, params: Option<Value>) -> Option<Value> {
        let mut params = match params {
            Some(Value::Object(p)) => p,
            None => Map::new(),
            other => return other,
        };
        let meta = params
            .entry("_meta")
            .or_insert_with(|| json!({}))
            .as_object_mut();
        if let Some(meta) = meta {
            meta.insert(META_VERSION.into(), json!(STATELESS_VERSION));
            if !meta.get(META_CAPS).is_some_and(Value::is_object) {
                meta.insert(META_CAPS.into(), self.capabilities.clone());
            }
        }
        Some(Value::Object(params))
    }

    /// Asks the call's client the server's questions (`inputRequests`, by input key), all
    /// at once, and returns the answers by key.
    async fn ask(
        &self,
        questions: &Value,
        events: Option<&EventSink>,
    ) -> Result<Map<String, Value>, CallError> {
        let unanswerable =
            |why: String| CallError::Answered(ErrorObject::new(code::INTERNAL_ERROR, why));
        let Some(questions) = questions.as_object().filter(|q| !q.is_empty()) else {
            return Err(unanswerable(format!(
                "remote server {:?} asked for input without inputRequests",
                self.server
            )));
        };
        if questions.len() > MAX_QUESTIONS {
            return Err(unanswerable(format!(
                "remote server {:?} asked {} questions in one round, more than {MAX_QUESTIONS}",
                self.server,
                questions.len()
            )));
        }
        let Some(events) = events else {
            return Err(unanswerable(format!(
                "remote server {:?} asked for input, and no client is attached to this request",
                self.server
            )));
        };
        let mut waiting = Vec::with_capacity(questions.len());
        for (key, question) in questions {
            let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1);
            let method = question["method"].as_str().unwrap_or_default().to_string();
            let responder = Responder::new(tx, RequestId::Str(key.clone()));
            let asked = CallEvent::Request {
                method: method.clone(),
                params: question.get("params").cloned(),
                responder,
            };
            if events.send(asked).await.is_err() {
                return Err(unanswerable(format!(
                    "{method}: the client of this request is gone"
                )));
            }
            waiting.push(async move { (key.clone(), method, rx.recv().await) });
        }
        let mut answers = Map::new();
        for (key, method, line) in futures_util::future::join_all(waiting).await {
            let outcome = match line.as_deref().map(Message::parse) {
                Some(Ok(Message::Response { outcome, .. })) => outcome,
                _ => return Err(unanswerable(format!("{method}: the client gave no answer"))),
            };
            answers.insert(key, outcome.map_err(CallError::Answered)?);
        }
        Ok(answers)
    }

    /// POSTs one request with this revision's headers, once more with a new access token
    /// after a `401` (`oauth::send_authorized`).
    pub async fn send(&self, msg: &Message) -> Result<reqwest::Response, CallError> {
        let Message::Request { method, params, .. } = msg else {
            return Err(CallError::NotRun("not a request".into()));
        };
        let name = routing_name(method, params.as_ref());
        let body = msg.to_line();
        let resp = super::oauth::send_authorized(self.tokens.as_ref(), &self.server, || {
            let req = self
                .http
                .post(&self.url)
                .header(ACCEPT, "application/json, text/event-stream")
                .header(CONTENT_TYPE, "application/json")
                .header("mcp-protocol-version", STATELESS_VERSION)
                .header("mcp-method", method.as_str())
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
    async fn post(&self, msg: &Message, events: Option<&EventSink>) -> Result<Posted, CallError> {
        let resp = self.send(msg).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
