//! A remote MCP server that speaks the stateless revision (2026-07-28), spoken to in that
//! revision: found by `server/discover` when the node connects (a server that answers it
//! with 2026-07-28 among its `supportedVersions`; any other answer falls back to the
//! `initialize` of `super::remote`, an unreachable server is no verdict).
//!
//! - **No session:** each request is one POST carrying its revision and the client's
//!   capabilities in `_meta` (the caller's own for a 2026-07-28 client, else the gateway's)
//!   and the `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` headers. A restarted server
//!   is simply reached again.
//! - **Multi-round trips:** an `input_required` result's questions go to the call's client
//!   as the server's own requests, under the server's input keys (a 2025 client gets them as
//!   sampling, elicitation or roots requests on its stream, a 2026 client in its own
//!   `input_required`); their answers are sent back with the server's `requestState` in the
//!   next round, until the result is complete. The call's timeout bounds the rounds.
//! - **List changes and resource updates** come on the server's `subscriptions/listen`
//!   stream, kept open by each connection and opened again after a pause when it breaks (then
//!   the lists are reloaded, for what changed meanwhile); they go to the pool's events, as a
//!   session server's GET stream's do. A server that refuses it is left alone.
//! - What this revision does not have: `ping` is a `server/discover`; notifications from
//!   the client are not sent (cancelling is closing the request's stream, which dropping a
//!   call does); `resources/subscribe`, `resources/unsubscribe` and `logging/setLevel` are
//!   refused as methods the server does not have.
//! - The server's OAuth client (`super::oauth`) and the `401`-once-more rule are as in
//!   `super::remote`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use mcpcp_proto::api::ServerSpec;
use mcpcp_proto::mcp::{code, ErrorObject, Message, RequestId, STATELESS_VERSION};
use mcpcp_proto::sse::SseParser;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::liveness::Liveness;
use super::oauth::Tokens;
use super::process::{PoolEvent, ProcessError};
use super::remote::InFlight;
use crate::call::{CallError, CallEvent, EventSink, Responder};

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPS: &str = "io.modelcontextprotocol/clientCapabilities";
const META_SERVER: &str = "io.modelcontextprotocol/serverInfo";
const META_SUB: &str = "io.modelcontextprotocol/subscriptionId";
/// Largest answer body read from a remote server.
const MAX_BODY: usize = 16 << 20;

/// A remote server spoken to in the stateless revision.
pub struct Stateless {
    link: Arc<Link>,
    init: Value,
    shard: Option<usize>,
    in_flight: AtomicUsize,
    liveness: Liveness,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Stateless {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// How requests reach the server.
struct Link {
    server: String,
    url: String,
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

impl Stateless {
    /// Asks the server at `spec.url` what it speaks: `Some` when it speaks 2026-07-28, `None`
    /// when it answered otherwise (the caller falls back to `initialize`), an error when it
    /// could not be asked.
    pub async fn discover(
        spec: &ServerSpec,
        client_init: &Value,
        pool_events: mpsc::Sender<PoolEvent>,
    ) -> Result<Option<Stateless>, ProcessError> {
        // The URL stays out of errors: they reach clients, and a URL can carry a secret.
        let failed = |e: String| ProcessError::Initialize(format!("the remote server: {e}"));
        let startup = Duration::from_millis(spec.timeouts.startup_ms);
        let link = Arc::new(Link {
            server: spec.name.clone(),
            url: spec.url.clone().unwrap_or_default(),
            http: super::remote_http::client_for(spec).map_err(failed)?,
            tokens: Tokens::for_spec(spec).map_err(failed)?,
            capabilities: client_init["capabilities"].clone(),
            next_id: AtomicU64::new(1),
        });
        let asked = tokio::time::timeout(startup, link.discovered()).await;
        let discovered = match asked {
            Err(_) => return Err(ProcessError::StartupTimeout(startup)),
            Ok(Err(CallError::NotRun(e))) => return Err(failed(e)),
            Ok(Err(_)) | Ok(Ok(None)) => return Ok(None),
            Ok(Ok(Some(d))) => d,
        };
        let init = json!({
            "protocolVersion": STATELESS_VERSION,
            "capabilities": discovered["capabilities"],
            "serverInfo": discovered["_meta"][META_SERVER],
            "instructions": discovered["instructions"],
        });
        tracing::info!(server = %spec.name, origin = %super::remote_http::origin(&link.url), protocol = STATELESS_VERSION, "remote server connected");
        let listener = tokio::spawn(listen(Arc::downgrade(&link), pool_events));
        Ok(Some(Stateless {
            link,
            init,
            shard: crate::shard::current(),
            in_flight: AtomicUsize::new(0),
            liveness: Liveness::default(),
            listener,
        }))
    }

    pub fn init(&self) -> &Value {
        &self.init
    }

    pub fn shard(&self) -> Option<usize> {
        self.shard
    }

    pub fn is_alive(&self) -> bool {
        self.liveness.is_alive()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub async fn exited(&self) {
        self.liveness.closed().await
    }

    /// Nothing to end but the listening stream: there is no session.
    pub async fn stop(&self) {
        self.liveness.close();
        self.listener.abort();
    }

    /// Sends a request, with as many rounds as the server's questions take (see the module
    /// docs).
    pub async fn call(
        &self,
        method: &str,
        params: Option<Value>,
        events: Option<EventSink>,
    ) -> Result<Value, CallError> {
        self.liveness.check(&self.link.server)?;
        let _counted = InFlight::enter(&self.in_flight);
        self.link.call(method, params, events).await
    }
}

impl Link {
    /// The server's `server/discover` result if it names 2026-07-28; `None` for any other
    /// answer. An error only when the server was not reached.
    async fn discovered(&self) -> Result<Option<Value>, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
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
    async fn call(
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
            "resources/subscribe" | "resources/unsubscribe" | "logging/setLevel" => {
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
        let mut params = self.with_meta(params);
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let request = Message::request(RequestId::Num(id as i64), method, params.clone());
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

    /// The request's params with this revision's `_meta`: its version, and the caller's
    /// client capabilities (or the gateway's).
    fn with_meta(&self, params: Option<Value>) -> Option<Value> {
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

    /// POSTs one request with this revision's headers. A `401` with the connection's access
    /// token ran nothing: the request is sent once more with a new token.
    async fn send(&self, msg: &Message) -> Result<reqwest::Response, CallError> {
        let Message::Request { method, params, .. } = msg else {
            return Err(CallError::NotRun("not a request".into()));
        };
        let mut resent = false;
        loop {
            let mut req = self
                .http
                .post(&self.url)
                .header(ACCEPT, "application/json, text/event-stream")
                .header(CONTENT_TYPE, "application/json")
                .header("mcp-protocol-version", STATELESS_VERSION)
                .header("mcp-method", method.as_str());
            if let Some(name) = routing_name(method, params.as_ref()) {
                req = req.header("mcp-name", name);
            }
            let bearer = match &self.tokens {
                None => None,
                Some(tokens) => Some(tokens.bearer().await.map_err(|e| {
                    CallError::NotRun(format!(
                        "remote server {:?}: {e}; the call did not run",
                        self.server
                    ))
                })?),
            };
            if let Some(b) = &bearer {
                req = req.header(AUTHORIZATION, b.clone());
            }
            let resp = req.body(msg.to_line()).send().await.map_err(|e| {
                let e = e.without_url();
                if e.is_connect() {
                    CallError::NotRun(format!(
                        "remote server {:?} is unreachable ({e}); the call did not run",
                        self.server
                    ))
                } else {
                    CallError::Crashed(format!(
                        "remote server {:?}: {e}; it may or may not have run",
                        self.server
                    ))
                }
            })?;
            if resp.status() == StatusCode::UNAUTHORIZED {
                if let (Some(tokens), Some(sent), false) = (&self.tokens, &bearer, resent) {
                    tokens.refused(sent).await;
                    resent = true;
                    continue;
                }
                return Err(CallError::NotRun(format!(
                    "remote server {:?} refused the credentials it was sent (HTTP 401); the call did not run",
                    self.server
                )));
            }
            return Ok(resp);
        }
    }

    /// POSTs one request; its answer is read from JSON or from its SSE stream, whose
    /// notifications go to `events`.
    async fn post(&self, msg: &Message, events: Option<&EventSink>) -> Result<Posted, CallError> {
        let resp = self.send(msg).await?;
        let status = resp.status();
        let sse = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if sse && status.is_success() {
            return self.read_stream(resp, events).await;
        }
        let body = super::remote_http::read_body(resp, MAX_BODY)
            .await
            .map_err(|e| {
                CallError::Crashed(format!(
                    "remote server {:?}: {e}; it may or may not have run",
                    self.server
                ))
            })?;
        match Message::parse(&body) {
            Ok(Message::Response { outcome, .. }) => Ok(Posted::Answer(outcome)),
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
        let broke = |why: String| {
            CallError::Crashed(format!(
                "remote server {:?}: {why}; it may or may not have run",
                self.server
            ))
        };
        let mut parser = SseParser::default();
        let mut body = resp.bytes_stream();
        let mut read = 0usize;
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| broke(format!("the stream broke ({})", e.without_url())))?;
            read += chunk.len();
            if read > MAX_BODY {
                return Err(broke(format!(
                    "it streamed over {MAX_BODY} bytes without an answer"
                )));
            }
            for event in parser.feed(&chunk) {
                match Message::parse(event.data.as_bytes()) {
                    Ok(Message::Response { outcome, .. }) => return Ok(Posted::Answer(outcome)),
                    Ok(msg @ Message::Notification { .. }) => {
                        if let Some(events) = events {
                            let _ = events.send(CallEvent::Notify(msg)).await;
                        }
                    }
                    // This revision has no requests of the server on a request's stream.
                    _ => {}
                }
            }
        }
        Err(broke("it ended the stream without an answer".into()))
    }
}

/// How a `subscriptions/listen` stream ended.
enum Listened {
    /// The server has none (an error answer): nothing to listen to.
    Refused,
    /// It broke or ended: open it again after a pause.
    Ended,
}

/// Keeps the server's `subscriptions/listen` stream open while the connection lives, its
/// notifications to the pool's events. After a stream broke, the lists are announced changed
/// once it is back, for what changed meanwhile.
async fn listen(link: Weak<Link>, pool_events: mpsc::Sender<PoolEvent>) {
    let mut pause = Duration::from_millis(500);
    let mut reopened = false;
    loop {
        let Some(l) = link.upgrade() else { return };
        let opened = l.open_listen().await;
        drop(l);
        match opened {
            Ok(resp) => {
                pause = Duration::from_millis(500);
                if reopened {
                    for list in ["tools", "prompts", "resources"] {
                        let changed = Message::notification(
                            format!("notifications/{list}/list_changed"),
                            None,
                        );
                        let _ = pool_events.try_send(PoolEvent::Notify(changed));
                    }
                }
                if let Listened::Refused = relay_listen(&link, resp, &pool_events).await {
                    return;
                }
            }
            Err(Listened::Refused) => return,
            Err(Listened::Ended) => {}
        }
        reopened = true;
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

impl Link {
    /// POSTs `subscriptions/listen` for every list change; the stream, once the server
    /// took it.
    async fn open_listen(&self) -> Result<reqwest::Response, Listened> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let params = self.with_meta(Some(json!({
            "notifications": {
                "toolsListChanged": true,
                "promptsListChanged": true,
                "resourcesListChanged": true,
            },
        })));
        let request = Message::request(RequestId::Num(id as i64), "subscriptions/listen", params);
        let resp = self.send(&request).await.map_err(|_| Listened::Ended)?;
        let sse = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        match resp.status() {
            s if s.is_success() && sse => Ok(resp),
            s if s.is_server_error() => Err(Listened::Ended),
            _ => {
                tracing::info!(server = %self.server, "the remote server has no subscriptions/listen stream; its list changes are not heard");
                Err(Listened::Refused)
            }
        }
    }
}

/// Passes a listen stream's notifications on until it ends.
async fn relay_listen(
    link: &Weak<Link>,
    resp: reqwest::Response,
    pool_events: &mpsc::Sender<PoolEvent>,
) -> Listened {
    let mut parser = SseParser::default();
    let mut body = resp.bytes_stream();
    while let Some(Ok(chunk)) = body.next().await {
        if link.strong_count() == 0 {
            return Listened::Refused;
        }
        if parser.pending() > MAX_BODY {
            break;
        }
        for event in parser.feed(&chunk) {
            match Message::parse(event.data.as_bytes()) {
                Ok(Message::Notification { method, mut params }) => {
                    if method == "notifications/subscriptions/acknowledged" {
                        continue;
                    }
                    if let Some(meta) = params
                        .as_mut()
                        .and_then(|p| p.get_mut("_meta"))
                        .and_then(Value::as_object_mut)
                    {
                        meta.remove(META_SUB);
                    }
                    let msg = Message::Notification { method, params };
                    let _ = pool_events.try_send(PoolEvent::Notify(msg));
                }
                // The stream's end: an error (the server stopped it) or a result.
                Ok(Message::Response {
                    outcome: Err(_), ..
                }) => return Listened::Refused,
                _ => {}
            }
        }
    }
    Listened::Ended
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
