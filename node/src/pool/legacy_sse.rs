//! A remote MCP server of the legacy HTTP+SSE transport (2024-11-05), which many servers still
//! speak: a GET opens an event stream whose first event (`endpoint`) names where to POST; every
//! message of the server, answers included, comes on that one stream. A node tries it when a
//! server refuses the Streamable HTTP `initialize` with a 4xx, as the spec's
//! backwards-compatibility rule says.
//!
//! Answers find their call by id; progress finds it by the `mcpd-p-<id>` token; the server's
//! own requests go to the one call in flight when there is one, and are refused otherwise (on
//! a shared connection they could not be told apart). The stream's end is the connection's
//! end: calls in flight fail as `Crashed` and the supervisor connects again.
//!
//! A server with an OAuth client (`oauth`) gets the stream's GET and every POST with the
//! connection's access token (`super::oauth`), and a `401` once more with a new one, as
//! `super::remote` does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use mcpcp_proto::api::ServerSpec;
use mcpcp_proto::mcp::{code, ErrorObject, Message, RequestId};
use mcpcp_proto::sse::SseParser;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::events::PoolEvent;
use super::liveness::Liveness;
use super::oauth::Tokens;
use super::process::ProcessError;
use crate::call::{CallError, CallEvent, EventSink, Responder};

/// Largest event accepted on the stream.
const MAX_EVENT: usize = 16 << 20;

struct Pending {
    reply: oneshot::Sender<Result<Value, CallError>>,
    events: Option<EventSink>,
    progress_token: Option<Value>,
}

struct Shared {
    server: String,
    http: reqwest::Client,
    /// The access tokens of the server's OAuth client, if it has one.
    tokens: Option<Tokens>,
    /// Where messages are POSTed (the `endpoint` event's URL, resolved).
    post_url: String,
    pending: Mutex<BTreeMap<u64, Pending>>,
    next_id: AtomicU64,
    liveness: Liveness,
    pool_events: mpsc::Sender<PoolEvent>,
    request_timeout: Duration,
}

/// A session with a legacy HTTP+SSE server.
pub struct LegacySse {
    shared: Arc<Shared>,
    init: Value,
    shard: Option<usize>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for LegacySse {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl LegacySse {
    /// Opens the event stream, learns the endpoint, and initialises, with the access tokens
    /// of the server's OAuth client, if it has one.
    pub async fn connect(
        spec: &ServerSpec,
        pool_events: mpsc::Sender<PoolEvent>,
        client_init: Value,
        tokens: Option<Tokens>,
    ) -> Result<LegacySse, ProcessError> {
        let failed =
            |e: String| ProcessError::Initialize(format!("the remote server (HTTP+SSE): {e}"));
        let startup = Duration::from_millis(spec.timeouts.startup_ms);
        let url = spec.url.clone().unwrap_or_default();
        let http = super::remote_http::client_for(spec).map_err(failed)?;
        let resp = super::oauth::send_authorized(tokens.as_ref(), &spec.name, || {
            http.get(&url).header(ACCEPT, "text/event-stream")
        })
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(failed(format!(
                "the event stream answered HTTP {}",
                resp.status()
            )));
        }
        let mut stream = resp.bytes_stream();
        let mut parser = SseParser::default();
        let endpoint = tokio::time::timeout(startup, async {
            while let Some(Ok(chunk)) = stream.next().await {
                if parser.pending() > MAX_EVENT {
                    break;
                }
                if let Some(e) = parser
                    .feed(&chunk)
                    .into_iter()
                    .find(|e| e.event.as_deref() == Some("endpoint"))
                {
                    return Some(e.data);
                }
            }
            None
        })
        .await
        .map_err(|_| ProcessError::StartupTimeout(startup))?
        .ok_or_else(|| failed("the event stream named no endpoint".into()))?;
        let post_url = resolve(&url, endpoint.trim())
            .ok_or_else(|| failed("the endpoint event names another host or no URL".into()))?;
        let shared = Arc::new(Shared {
            server: spec.name.clone(),
            http,
            tokens,
            post_url,
            pending: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            liveness: Liveness::default(),
            pool_events,
            request_timeout: Duration::from_millis(spec.timeouts.request_ms),
        });
        let reader = tokio::spawn(read(shared.clone(), stream, parser));
        let mut conn = LegacySse {
            shared,
            init: Value::Null,
            shard: crate::shard::current(),
            reader,
        };
        let init = tokio::time::timeout(startup, conn.call("initialize", Some(client_init), None))
            .await
            .map_err(|_| ProcessError::StartupTimeout(startup))?
            .map_err(|e| failed(e.to_string()))?;
        conn.notify("notifications/initialized", None).await;
        conn.init = init;
        tracing::info!(server = %spec.name, origin = %super::remote_http::origin(&url), "remote server connected (legacy HTTP+SSE)");
        Ok(conn)
    }

    pub fn init(&self) -> &Value {
        &self.init
    }

    pub fn shard(&self) -> Option<usize> {
        self.shard
    }

    pub fn is_alive(&self) -> bool {
        self.shared.liveness.is_alive()
    }

    pub fn in_flight(&self) -> usize {
        self.shared.pending().len()
    }

    pub async fn exited(&self) {
        self.shared.liveness.closed().await
    }

    /// POSTs a request and waits for its answer on the stream.
    pub async fn call(
        &self,
        method: &str,
        mut params: Option<Value>,
        events: Option<EventSink>,
    ) -> Result<Value, CallError> {
        let shared = &self.shared;
        shared.liveness.check(&shared.server)?;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let progress_token = crate::call::events::substitute_progress_token(&mut params, id);
        let (tx, rx) = oneshot::channel();
        shared.pending().insert(
            id,
            Pending {
                reply: tx,
                events,
                progress_token,
            },
        );
        let mut guard = Forget {
            shared: shared.clone(),
            id,
            armed: true,
        };
        let request = Message::request(RequestId::Num(id as i64), method, params);
        match shared.post(&request).await {
            Ok(()) => {}
            Err(PostError::NotSent(e)) => {
                return Err(CallError::NotRun(format!(
                    "remote server {:?}: {e}; the call did not run",
                    shared.server
                )))
            }
            Err(PostError::Unknown(e)) => {
                return Err(CallError::Crashed(format!(
                    "remote server {:?}: {e}; it may or may not have run",
                    shared.server
                )))
            }
        }
        let outcome = rx.await.unwrap_or_else(|_| {
            Err(CallError::Crashed(format!(
                "remote server {:?} closed its event stream with the call in flight; it may or may not have run",
                shared.server
            )))
        });
        guard.armed = false;
        outcome
    }

    pub async fn notify(&self, method: &str, params: Option<Value>) {
        let _ = self
            .shared
            .post(&Message::notification(method, params))
            .await;
    }

    /// Closes the stream (the server ends the session with it).
    pub async fn stop(&self, _grace: Duration) {
        self.reader.abort();
        self.shared.liveness.close();
        self.shared.fail_all();
    }
}

/// How a POST failed.
enum PostError {
    /// Refused or unreachable: the server did not take it.
    NotSent(String),
    /// The POST broke after it was sent.
    Unknown(String),
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail_all(&self) {
        let drained = std::mem::take(&mut *self.pending());
        for (_, p) in drained {
            let _ = p.reply.send(Err(CallError::Crashed(format!(
                "remote server {:?} closed its event stream with the call in flight; it may or may not have run",
                self.server
            ))));
        }
    }

    async fn post(&self, msg: &Message) -> Result<(), PostError> {
        // Shared, not copied, by a request sent again after a `401`.
        let body = bytes::Bytes::from(msg.to_line());
        let resp = super::oauth::send_authorized(self.tokens.as_ref(), &self.server, || {
            self.http
                .post(&self.post_url)
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone())
                .timeout(self.request_timeout)
        })
        .await
        .map_err(|e| PostError::NotSent(e.to_string()))?
        .map_err(|e| {
            let e = e.without_url();
            if e.is_connect() {
                PostError::NotSent(e.to_string())
            } else {
                PostError::Unknown(e.to_string())
            }
        })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(PostError::NotSent(format!("HTTP {}", resp.status())))
        }
    }

    /// One message of the server's stream.
    async fn route(self: &Arc<Self>, msg: Message) {
        match msg {
            Message::Response { id, outcome } => {
                let key = match id {
                    RequestId::Num(n) => u64::try_from(n).ok(),
                    RequestId::Str(_) => None,
                };
                let pending = key.and_then(|k| self.pending().remove(&k));
                if let Some(p) = pending {
                    drop(p.events);
                    let _ = p.reply.send(outcome.map_err(CallError::Answered));
                }
            }
            Message::Notification { method, mut params } => {
                let call = params
                    .as_ref()
                    .and_then(|p| p["progressToken"].as_str())
                    .and_then(|t| t.strip_prefix("mcpd-p-"))
                    .and_then(|n| n.parse::<u64>().ok());
                let target = call.and_then(|id| {
                    let pending = self.pending();
                    let p = pending.get(&id)?;
                    Some((p.events.clone()?, p.progress_token.clone()))
                });
                match target {
                    Some((events, token)) => {
                        crate::call::events::restore_progress_token(&mut params, token);
                        let _ = events
                            .try_send(CallEvent::Notify(Message::Notification { method, params }));
                    }
                    None => {
                        let msg = Message::Notification { method, params };
                        let _ = self.pool_events.try_send(PoolEvent::Notify(msg));
                    }
                }
            }
            Message::Request { id, method, params } => {
                let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1);
                let shared = self.clone();
                tokio::spawn(async move {
                    if let Some(line) = rx.recv().await {
                        if let Ok(answer) = Message::parse(&line) {
                            let _ = shared.post(&answer).await;
                        }
                    }
                });
                let responder = Responder::new(tx, id);
                // Only a lone call in flight can be the one the request belongs to.
                let sink = {
                    let pending = self.pending();
                    match pending.len() {
                        1 => pending.values().next().and_then(|p| p.events.clone()),
                        _ => None,
                    }
                };
                match sink {
                    Some(events) => {
                        let _ = events
                            .send(CallEvent::Request {
                                method,
                                params,
                                responder,
                            })
                            .await;
                    }
                    None => {
                        responder
                            .respond(Err(ErrorObject::new(
                                code::METHOD_NOT_FOUND,
                                format!("{method}: no single client this request belongs to"),
                            )))
                            .await
                    }
                }
            }
        }
    }
}

/// Reads the event stream until it ends, then ends the connection.
async fn read(
    shared: Arc<Shared>,
    mut stream: impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
    mut parser: SseParser,
) {
    while let Some(Ok(chunk)) = stream.next().await {
        if parser.pending() > MAX_EVENT {
            tracing::warn!(server = %shared.server, "the event stream sent an event over {MAX_EVENT} bytes; closing it");
            break;
        }
        for event in parser.feed(&chunk) {
            if event.event.as_deref().is_some_and(|e| e != "message") {
                continue;
            }
            if let Ok(msg) = Message::parse(event.data.as_bytes()) {
                shared.route(msg).await;
            }
        }
    }
    shared.liveness.close();
    shared.fail_all();
    tracing::info!(server = %shared.server, "the remote server's event stream ended");
}

/// The POST URL an `endpoint` event names, resolved against the stream's URL: a path, or an
/// absolute URL on the same scheme, host and port (anything else would send the spec's
/// headers elsewhere).
fn resolve(base: &str, endpoint: &str) -> Option<String> {
    let (scheme, rest) = base.split_once("://")?;
    let origin = format!("{scheme}://{}", rest.split('/').next()?);
    if endpoint.starts_with('/') {
        return Some(format!("{origin}{endpoint}"));
    }
    (endpoint.starts_with(&format!("{origin}/")) || endpoint == origin)
        .then(|| endpoint.to_string())
}

/// Drops a call's entry (and tells the server) when its caller gives up first.
struct Forget {
    shared: Arc<Shared>,
    id: u64,
    armed: bool,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.shared.pending().remove(&self.id).is_none() {
            return;
        }
        let shared = self.shared.clone();
        let note = crate::call::events::cancelled(self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = shared.post(&note).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_stays_on_the_stream_s_origin() {
        let base = "http://127.0.0.1:3001/sse";
        assert_eq!(
            resolve(base, "/message?sessionId=a").as_deref(),
            Some("http://127.0.0.1:3001/message?sessionId=a")
        );
        assert_eq!(
            resolve(base, "http://127.0.0.1:3001/m").as_deref(),
            Some("http://127.0.0.1:3001/m")
        );
        assert_eq!(resolve(base, "http://evil.example/m"), None);
        assert_eq!(resolve(base, "http://127.0.0.1:30011/m"), None);
    }
}
