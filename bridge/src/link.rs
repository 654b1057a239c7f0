//! The bridge's connection to the cluster: which node it talks to, the MCP session it holds
//! there, and how it moves to another node.
//!
//! A failover is done once per failure (an epoch number tells callers whether someone else
//! already did it): try the next URL, with exponential backoff and jitter, until the
//! failover deadline; on the new node replay the session: the client's own `initialize`
//! (its answer is checked, not forwarded), `notifications/initialized`, the resource
//! subscriptions and the log level. Requests wait while it happens. (Jitter here is backon's:
//! a random extra of up to the delay itself.)

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use base64::Engine;
use futures_util::StreamExt;
use mcpcp_proto::mcp::{Message, RequestId};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use mcpcp_proto::sse::SseParser;

/// `scheme://host:port` of a URL (the URL itself when it has no path).
pub fn root(url: &str) -> &str {
    match url
        .find("://")
        .and_then(|i| url[i + 3..].find('/').map(|j| i + 3 + j))
    {
        Some(p) => &url[..p],
        None => url,
    }
}

/// Why a POST did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The request never reached a node (connection refused, DNS, connect timeout).
    #[error("not sent: {0}")]
    NotSent(String),
    /// It may have reached a node, which then failed (5xx, dropped connection or stream).
    #[error("lost: {0}")]
    Lost(String),
    /// The node no longer knows our session (404): re-initialise and resend.
    #[error("session expired on the node")]
    SessionGone,
    /// The node refused the request with an HTTP error (its JSON body, when it had one: a
    /// JSON-RPC error, or the admin API's error format).
    #[error("refused ({status})")]
    Refused { status: u16, body: Option<Value> },
}

/// What a node answered.
pub enum Reply {
    Accepted,
    Message(Message),
    /// An SSE stream of messages; ends after the response to the request.
    Stream(mpsc::Receiver<Result<Message, SendError>>),
}

/// What is replayed on a new node.
#[derive(Default, Clone)]
struct Replay {
    initialize: Option<(RequestId, Value)>,
    initialized: bool,
    subscriptions: BTreeSet<String>,
    log_level: Option<String>,
}

struct State {
    index: usize,
    session: Option<String>,
    version: Option<String>,
    epoch: u64,
}

pub struct Link {
    http: reqwest::Client,
    urls: Vec<String>,
    token: Option<String>,
    failover_deadline: Duration,
    state: Mutex<State>,
    replay: Mutex<Replay>,
    /// Tools the registry marks idempotent (learnt from `tools/list` answers).
    idempotent: Mutex<HashSet<String>>,
    /// Serialises failovers.
    failing_over: tokio::sync::Mutex<()>,
}

/// How a request may be retried after a failure that may have reached a node.
pub fn safe_to_resend(method: &str, params: &Option<Value>, idempotent: &HashSet<String>) -> bool {
    // A listen subscription only streams notifications: opening it again is harmless.
    if mcpcp_proto::mcp::is_read_only(method)
        || method == "initialize"
        || method == "subscriptions/listen"
    {
        return true;
    }
    if method == "tools/call" {
        let name = params
            .as_ref()
            .and_then(|p| p["name"].as_str())
            .unwrap_or_default();
        return idempotent.contains(name);
    }
    false
}

/// Header-safe form of a value (`=?base64?...?=` when it is not plain visible ASCII).
fn header_value(v: &str) -> String {
    let plain = !v.is_empty()
        && v.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !v.starts_with(' ')
        && !v.ends_with(' ')
        && !v.starts_with("=?base64?");
    if plain {
        v.to_string()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(v)
        )
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(n) = cur.source() {
        cur = n;
    }
    cur.to_string()
}

impl Link {
    /// A link to `urls`, trusting `cacert` (the cluster's `ca.pem`) or the system's roots.
    pub fn new(
        urls: Vec<String>,
        token: Option<String>,
        cacert: Option<&std::path::Path>,
        failover_deadline: Duration,
    ) -> anyhow::Result<Link> {
        let tls = mcpcp_pki::trust::client_config(cacert, &[b"http/1.1"])
            .map_err(|e| anyhow::anyhow!("--cacert: {e}"))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Link {
            http,
            urls,
            token,
            failover_deadline,
            state: Mutex::new(State {
                index: 0,
                session: None,
                version: None,
                epoch: 0,
            }),
            replay: Mutex::new(Replay::default()),
            idempotent: Mutex::new(HashSet::new()),
            failing_over: tokio::sync::Mutex::new(()),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).epoch
    }

    pub fn current_url(&self) -> String {
        let i = self.state.lock().unwrap_or_else(|p| p.into_inner()).index;
        self.urls[i % self.urls.len()].clone()
    }

    /// Whether the current node's process answers its liveness probe within 2 s (a frozen or
    /// partitioned node does not, though its TCP connections may stay open).
    pub async fn node_answers(&self) -> bool {
        let url = self.current_url();
        let root = root(&url);
        matches!(
            self.http.get(format!("{root}/livez")).timeout(Duration::from_secs(2)).send().await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Whether the current node answers at all.
    pub async fn alive(&self) -> bool {
        let ping = Message::request(RequestId::Str("mcp-bridge-probe".into()), "ping", None);
        !matches!(
            self.post(&ping).await,
            Err(SendError::NotSent(_)) | Err(SendError::Lost(_))
        )
    }

    pub fn is_safe(&self, method: &str, params: &Option<Value>) -> bool {
        safe_to_resend(
            method,
            params,
            &self.idempotent.lock().unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Remembers what a client message changes in the session, for replay.
    pub fn record(&self, msg: &Message) {
        let mut r = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        match msg {
            Message::Request { id, method, params } => match method.as_str() {
                "initialize" => {
                    r.initialize = Some((id.clone(), params.clone().unwrap_or(json!({}))))
                }
                "resources/subscribe" | "resources/unsubscribe" => {
                    if let Some(uri) = params.as_ref().and_then(|p| p["uri"].as_str()) {
                        if method == "resources/subscribe" {
                            r.subscriptions.insert(uri.to_string());
                        } else {
                            r.subscriptions.remove(uri);
                        }
                    }
                }
                "logging/setLevel" => {
                    r.log_level = params
                        .as_ref()
                        .and_then(|p| p["level"].as_str())
                        .map(String::from)
                }
                _ => {}
            },
            Message::Notification { method, .. } if method == "notifications/initialized" => {
                r.initialized = true
            }
            _ => {}
        }
    }

    /// Learns idempotent tools from a `tools/list` answer.
    pub fn learn(&self, result: &Value) {
        if let Some(tools) = result["tools"].as_array() {
            let mut set = self.idempotent.lock().unwrap_or_else(|p| p.into_inner());
            for t in tools {
                if let Some(name) = t["name"].as_str() {
                    if t["_meta"]["io.mcpcp/idempotent"] == json!(true) {
                        set.insert(name.to_string());
                    } else {
                        set.remove(name);
                    }
                }
            }
        }
    }

    /// Captures the session id and negotiated version from an `initialize` answer.
    fn adopt(&self, session: Option<String>, answer: &Message) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if session.is_some() {
            st.session = session;
        }
        if let Message::Response { outcome: Ok(v), .. } = answer {
            if let Some(ver) = v["protocolVersion"].as_str() {
                st.version = Some(ver.to_string());
            }
        }
    }

    /// POSTs one message to the current node.
    pub async fn post(&self, msg: &Message) -> Result<Reply, SendError> {
        let (url, session, version) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (
                self.urls[st.index % self.urls.len()].clone(),
                st.session.clone(),
                st.version.clone(),
            )
        };
        self.post_to(&url, msg, session, version).await
    }

    async fn post_to(
        &self,
        url: &str,
        msg: &Message,
        session: Option<String>,
        version: Option<String>,
    ) -> Result<Reply, SendError> {
        let is_init = msg.method() == Some("initialize");
        let mut req = self
            .http
            .post(url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&msg.to_value()).unwrap_or_default());
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let modern = match msg {
            Message::Request {
                params: Some(p), ..
            } => p["_meta"]["io.modelcontextprotocol/protocolVersion"]
                .as_str()
                .map(String::from),
            _ => None,
        };
        if let (Some(v), Message::Request { method, params, .. }) = (&modern, msg) {
            req = req
                .header("mcp-protocol-version", v.as_str())
                .header("mcp-method", method.as_str());
            let name = match method.as_str() {
                "tools/call" | "prompts/get" => params.as_ref().and_then(|p| p["name"].as_str()),
                "resources/read" => params.as_ref().and_then(|p| p["uri"].as_str()),
                _ => None,
            };
            if let Some(n) = name {
                req = req.header("mcp-name", header_value(n));
            }
        } else if !is_init {
            if let Some(s) = &session {
                req = req.header("mcp-session-id", s.as_str());
            }
            if let Some(v) = &version {
                req = req.header("mcp-protocol-version", v.as_str());
            }
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Err(SendError::NotSent(root_cause(&e))),
            Err(e) => return Err(SendError::Lost(root_cause(&e))),
        };
        let status = resp.status();
        if status == StatusCode::NOT_FOUND && session.is_some() && modern.is_none() && !is_init {
            return Err(SendError::SessionGone);
        }
        if status.is_server_error() {
            return Err(SendError::Lost(format!("node answered {status}")));
        }
        if status == StatusCode::ACCEPTED {
            return Ok(Reply::Accepted);
        }
        let new_session = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let is_sse = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !status.is_success() {
            let body = resp
                .bytes()
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            return Err(SendError::Refused {
                status: status.as_u16(),
                body,
            });
        }
        if is_sse {
            let (tx, rx) = mpsc::channel(64);
            let mut stream = resp.bytes_stream();
            tokio::spawn(async move {
                let mut parser = SseParser::default();
                while let Some(chunk) = stream.next().await {
                    let chunk = match chunk {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = tx.send(Err(SendError::Lost(root_cause(&e)))).await;
                            return;
                        }
                    };
                    for ev in parser.feed(&chunk) {
                        match Message::parse(ev.data.as_bytes()) {
                            Ok(m) => {
                                if tx.send(Ok(m)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "node sent an SSE event that is not JSON-RPC")
                            }
                        }
                    }
                }
            });
            return Ok(Reply::Stream(rx));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| SendError::Lost(root_cause(&e)))?;
        let answer =
            Message::parse(&bytes).map_err(|e| SendError::Lost(format!("bad answer: {e}")))?;
        if is_init {
            self.adopt(new_session, &answer);
        }
        Ok(Reply::Message(answer))
    }

    /// Moves to a working node unless a failover since `seen_epoch` already did. Errs when no
    /// node answered before the deadline.
    pub async fn failover(&self, seen_epoch: u64, why: &str) -> Result<(), String> {
        let _guard = self.failing_over.lock().await;
        if self.epoch() != seen_epoch {
            return Ok(());
        }
        let started = Instant::now();
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build();
        let from = self.current_url();
        tracing::warn!(node = %from, reason = why, "failing over");
        let mut last_error = String::new();
        let n = self.urls.len();
        let mut attempt = 0usize;
        while started.elapsed() < self.failover_deadline {
            let index = {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                (st.index + 1 + attempt) % n
            };
            attempt += 1;
            let url = self.urls[index].clone();
            match self.replay_on(&url).await {
                Ok(session) => {
                    let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.index = index;
                    st.session = session;
                    st.epoch += 1;
                    tracing::info!(node = %url, after_ms = started.elapsed().as_millis() as u64, "failed over");
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(node = %url, error = %e, "node not usable");
                    last_error = format!("{url}: {e}");
                }
            }
            if attempt.is_multiple_of(n) {
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
            }
        }
        Err(format!(
            "no node answered within {:?} (last: {last_error})",
            self.failover_deadline
        ))
    }

    /// Re-creates the session on `url`; returns the new session id (None without a session).
    async fn replay_on(&self, url: &str) -> Result<Option<String>, String> {
        let replay = self
            .replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some((id, params)) = replay.initialize else {
            // No session to replay (2026 requests, or before initialize): is the node alive?
            let ping = Message::request(RequestId::Str("mcp-bridge-probe".into()), "ping", None);
            return match self.post_to(url, &ping, None, None).await {
                Err(SendError::NotSent(e)) | Err(SendError::Lost(e)) => Err(e),
                _ => Ok(None),
            };
        };
        let old_version = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .version
            .clone();
        let init = Message::request(id, "initialize", Some(params.clone()));
        let answer = match self.post_to(url, &init, None, None).await {
            Ok(Reply::Message(m)) => m,
            Ok(_) => return Err("unexpected answer to initialize".into()),
            Err(e) => return Err(e.to_string()),
        };
        let (session, version) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (st.session.clone(), st.version.clone())
        };
        if let Message::Response {
            outcome: Err(e), ..
        } = &answer
        {
            return Err(format!("initialize refused: {}", e.message));
        }
        if old_version.is_some() && version != old_version {
            tracing::warn!(
                ?old_version,
                ?version,
                "the new node negotiated another protocol version"
            );
        }
        if replay.initialized {
            let note = Message::notification("notifications/initialized", None);
            self.post_to(url, &note, session.clone(), version.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        for (i, uri) in replay.subscriptions.iter().enumerate() {
            let sub = Message::request(
                RequestId::Str(format!("mcp-bridge-sub-{i}")),
                "resources/subscribe",
                Some(json!({ "uri": uri })),
            );
            self.post_to(url, &sub, session.clone(), version.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        if let Some(level) = &replay.log_level {
            let set = Message::request(
                RequestId::Str("mcp-bridge-log".into()),
                "logging/setLevel",
                Some(json!({ "level": level })),
            );
            self.post_to(url, &set, session.clone(), version.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(session)
    }

    /// Opens the standalone GET stream of the current session.
    pub async fn open_stream(
        &self,
    ) -> Result<mpsc::Receiver<Result<Message, SendError>>, SendError> {
        let (url, session, version) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (
                self.urls[st.index % self.urls.len()].clone(),
                st.session.clone(),
                st.version.clone(),
            )
        };
        let Some(session) = session else {
            return Err(SendError::Refused {
                status: 400,
                body: None,
            });
        };
        let mut req = self
            .http
            .get(&url)
            .header("accept", "text/event-stream")
            .header("mcp-session-id", session);
        if let Some(v) = version {
            req = req.header("mcp-protocol-version", v);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Err(SendError::NotSent(root_cause(&e))),
            Err(e) => return Err(SendError::Lost(root_cause(&e))),
        };
        match resp.status() {
            s if s.is_server_error() => return Err(SendError::Lost(format!("node answered {s}"))),
            StatusCode::NOT_FOUND => return Err(SendError::SessionGone),
            s if !s.is_success() => {
                return Err(SendError::Refused {
                    status: s.as_u16(),
                    body: None,
                })
            }
            _ => {}
        }
        let (tx, rx) = mpsc::channel(64);
        let mut stream = resp.bytes_stream();
        tokio::spawn(async move {
            let mut parser = SseParser::default();
            loop {
                let chunk = match stream.next().await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(SendError::Lost(root_cause(&e)))).await;
                        return;
                    }
                    None => {
                        let _ = tx.send(Err(SendError::Lost("stream ended".into()))).await;
                        return;
                    }
                };
                for ev in parser.feed(&chunk) {
                    if let Ok(m) = Message::parse(ev.data.as_bytes()) {
                        if tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_requests_are_resent() {
        let idem: HashSet<String> = ["echo".to_string()].into();
        assert!(safe_to_resend("tools/list", &None, &idem));
        assert!(safe_to_resend("resources/read", &None, &idem));
        assert!(safe_to_resend(
            "tools/call",
            &Some(json!({"name": "echo"})),
            &idem
        ));
        assert!(!safe_to_resend(
            "tools/call",
            &Some(json!({"name": "counter_increment"})),
            &idem
        ));
        assert!(!safe_to_resend("tools/call", &None, &idem));
        assert!(!safe_to_resend("resources/subscribe", &None, &idem));
    }

    #[test]
    fn header_values_are_encoded_when_unsafe() {
        assert_eq!(header_value("echo"), "echo");
        assert_eq!(header_value("file:///a b"), "file:///a b");
        assert_eq!(header_value("héllo"), "=?base64?aMOpbGxv?=");
        assert_eq!(header_value(" x"), "=?base64?IHg=?=");
    }
}
