//! A plain Streamable HTTP MCP client, bounded by a per-request deadline: what a curl user
//! does. `initialize` (the node answers with an `Mcp-Session-Id`), `notifications/initialized`,
//! then every request POSTed with that id. Sessions are signed and self-contained, so the same
//! id works on any node.
//!
//! [`HttpMcp`] keeps no session state (its caller keeps the id, as the chaos harness moves one
//! session between nodes) and returns a [`Reply`]: what came back, before any judgement of
//! what it means. [`McpSession`] is one session on top of it, for tests.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

/// The protocol revision these sessions speak.
pub const PROTOCOL_VERSION: &str = "2025-06-18";

/// What one MCP request got back.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A JSON-RPC response object (with `result` or `error`).
    Response(Value),
    /// An HTTP refusal: the status, and the JSON-RPC error in the body if there was one.
    Http {
        status: u16,
        error: Option<Value>,
        text: String,
    },
    /// The request never reached a node (connection refused).
    NotSent(String),
    /// No answer within the deadline.
    Timeout(String),
    /// The connection (or the bridge) went away after the request was sent.
    Lost(String),
    /// An answer that is not a JSON-RPC response to this request.
    Garbled(String),
}

/// A plain-HTTP MCP client (no session state of its own: the caller keeps the session id).
#[derive(Clone)]
pub struct HttpMcp {
    http: reqwest::Client,
    token: String,
}

impl HttpMcp {
    /// A client whose every request (connect, send, whole body) ends within `deadline`.
    pub fn new(token: &str, cacert: &Path, deadline: Duration) -> Result<HttpMcp, String> {
        let http = mcpctl::https::client_builder(Some(cacert))
            .map_err(|e| e.to_string())?
            .no_proxy()
            .connect_timeout(Duration::from_secs(2).min(deadline))
            .timeout(deadline)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(8)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(HttpMcp {
            http,
            token: token.to_string(),
        })
    }

    /// `initialize` at `url`, declaring no client capability; the session id the node gave,
    /// or what went wrong.
    pub async fn initialize(&self, url: &str, id: i64) -> Result<String, Reply> {
        self.initialize_declaring(url, id, json!({}))
            .await
            .map(|(session, _)| session)
    }

    /// `initialize` at `url`, declaring `capabilities`; the session id the node gave and its
    /// answer (the JSON-RPC response object), or what went wrong.
    pub async fn initialize_declaring(
        &self,
        url: &str,
        id: i64,
        capabilities: Value,
    ) -> Result<(String, Value), Reply> {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": capabilities,
            "clientInfo": {"name": "mcpcp-testkit", "version": env!("CARGO_PKG_VERSION")}}});
        let (session, reply) = self.post(url, None, &body, Some(id)).await;
        match (session, reply) {
            (Some(s), Reply::Response(v)) if v.get("result").is_some() => Ok((s, v)),
            (None, Reply::Response(v)) if v.get("result").is_some() => Err(Reply::Garbled(
                "initialize answered without an Mcp-Session-Id".into(),
            )),
            (_, other) => Err(other),
        }
    }

    /// A notification on `session` (the node answers 202).
    pub async fn notify(&self, url: &str, session: &str, method: &str) -> Result<(), Reply> {
        let body = json!({"jsonrpc": "2.0", "method": method});
        match self.post(url, Some(session), &body, None).await.1 {
            Reply::Http { status: 202, .. } => Ok(()),
            other => Err(other),
        }
    }

    /// A request on `session`: its JSON-RPC response, or what went wrong.
    pub async fn request(
        &self,
        url: &str,
        session: &str,
        id: i64,
        method: &str,
        params: Value,
    ) -> Reply {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.post(url, Some(session), &body, Some(id)).await.1
    }

    /// POSTs `body`; returns the `Mcp-Session-Id` of the answer (if any) and the reply.
    async fn post(
        &self,
        url: &str,
        session: Option<&str>,
        body: &Value,
        id: Option<i64>,
    ) -> (Option<String>, Reply) {
        let mut req = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(s) = session {
            req = req
                .header("mcp-session-id", s)
                .header("mcp-protocol-version", PROTOCOL_VERSION);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return (None, transport(&e)),
        };
        let status = resp.status().as_u16();
        let new_session = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let sse = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => return (new_session, transport(&e)),
        };
        if !(200..300).contains(&status) || status == 202 || id.is_none() {
            let error = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").cloned());
            return (
                new_session,
                Reply::Http {
                    status,
                    error,
                    text: short(&text, 200),
                },
            );
        }
        let id = id.unwrap_or_default();
        let found = if sse {
            mcpcp_proto::sse::events(text.as_bytes())
                .into_iter()
                .filter_map(|d| serde_json::from_str::<Value>(&d).ok())
                .find(|v| is_response_to(v, id))
        } else {
            serde_json::from_str::<Value>(&text)
                .ok()
                .filter(|v| is_response_to(v, id))
        };
        let reply = match found {
            Some(v) => Reply::Response(v),
            None if sse => Reply::Lost(format!(
                "the event stream ended without the answer: {}",
                short(&text, 200)
            )),
            None => Reply::Garbled(short(&text, 200)),
        };
        (new_session, reply)
    }
}

/// What a reqwest error means for a request.
fn transport(e: &reqwest::Error) -> Reply {
    let mut msg = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = cur {
        msg = format!("{msg}: {s}");
        cur = s.source();
    }
    if e.is_timeout() {
        Reply::Timeout(msg)
    } else if e.is_connect() {
        Reply::NotSent(msg)
    } else {
        Reply::Lost(msg)
    }
}

/// Whether `v` is the JSON-RPC response to request `id`.
fn is_response_to(v: &Value, id: i64) -> bool {
    v["id"].as_i64() == Some(id) && (v.get("result").is_some() || v.get("error").is_some())
}

/// One session (2025-06-18), for tests that must not depend on an SDK.
pub struct McpSession {
    http: HttpMcp,
    pub url: String,
    pub session: String,
    /// The `initialize` answer (the JSON-RPC response object).
    pub init: Value,
    next: AtomicI64,
}

impl McpSession {
    /// `initialize` + `notifications/initialized` at `url` through `http`, declaring
    /// `capabilities` (`{"elicitation": {}}`: the server may ask this client; this client never
    /// answers, so such a call ends at its timeout).
    pub async fn open(http: HttpMcp, url: &str, capabilities: Value) -> Result<McpSession, String> {
        let (session, init) = http
            .initialize_declaring(url, 0, capabilities)
            .await
            .map_err(|r| r.describe())?;
        http.notify(url, &session, "notifications/initialized")
            .await
            .map_err(|r| r.describe())?;
        Ok(McpSession {
            http,
            url: url.to_string(),
            session,
            init,
            next: AtomicI64::new(1),
        })
    }

    /// The same session, sent to another node's URL.
    pub fn at(&self, url: &str) -> McpSession {
        McpSession {
            http: self.http.clone(),
            url: url.to_string(),
            session: self.session.clone(),
            init: self.init.clone(),
            next: AtomicI64::new(self.next.load(Ordering::Relaxed) + 1000),
        }
    }

    /// A request; the JSON-RPC response object.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        match self
            .http
            .request(&self.url, &self.session, id, method, params)
            .await
        {
            Reply::Response(v) => Ok(v),
            other => Err(other.describe()),
        }
    }

    /// `tools/call`; the JSON-RPC response object.
    pub async fn call_tool(&self, name: &str, arguments: Value) -> Result<Value, String> {
        self.request("tools/call", json!({"name": name, "arguments": arguments}))
            .await
    }
}

impl Reply {
    /// One line saying what came back, for an error message.
    pub fn describe(&self) -> String {
        match self {
            Reply::Response(v) => v.to_string(),
            Reply::Http { status, text, .. } => format!("HTTP {status}: {text}"),
            Reply::NotSent(e) => format!("not sent: {e}"),
            Reply::Timeout(e) => format!("timed out: {e}"),
            Reply::Lost(e) => format!("lost: {e}"),
            Reply::Garbled(e) => format!("garbled: {e}"),
        }
    }
}

/// `s`, cut to `max` characters.
fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_matched_by_id() {
        assert!(is_response_to(&json!({"id": 4, "result": {}}), 4));
        assert!(is_response_to(&json!({"id": 4, "error": {"code": 1}}), 4));
        assert!(!is_response_to(&json!({"id": 5, "result": {}}), 4));
        assert!(!is_response_to(
            &json!({"id": 4, "method": "sampling/createMessage"}),
            4
        ));
    }
}
