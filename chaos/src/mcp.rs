//! The harness's MCP clients, each bounded by a per-request deadline:
//! - [`HttpMcp`]: plain HTTP, what a curl user does: `initialize` (the node answers with an
//!   `Mcp-Session-Id`), `notifications/initialized`, then every request POSTed with that id.
//!   Sessions are signed and self-contained, so the same id works on any node.
//! - [`Bridge`]: an `mcp-bridge` child process given every node's URL, driven over its
//!   stdin/stdout (newline-delimited JSON-RPC); responses are matched to requests by id.
//!
//! Both return a [`Reply`]: what came back, before any judgement of what it means.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::oneshot;

use crate::janitor::Janitor;

/// The protocol revision the harness's sessions speak.
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

    /// `initialize` at `url`; the session id the node gave, or what went wrong.
    pub async fn initialize(&self, url: &str, id: i64) -> Result<String, Reply> {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "chaos", "version": env!("CARGO_PKG_VERSION")}}});
        let (session, reply) = self.post(url, None, &body, Some(id)).await;
        match (session, reply) {
            (Some(s), Reply::Response(v)) if v.get("result").is_some() => Ok(s),
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
                    text: crate::checker::short(&text, 200),
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
                crate::checker::short(&text, 200)
            )),
            None => Reply::Garbled(crate::checker::short(&text, 200)),
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

type Pending = Arc<Mutex<HashMap<i64, oneshot::Sender<Value>>>>;

/// An `mcp-bridge` child process and the harness's end of its stdin/stdout.
pub struct Bridge {
    pid: u32,
    janitor: Janitor,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pending: Pending,
    next: AtomicI64,
    /// Set when the bridge's stdout closed (it exited).
    gone: Arc<AtomicBool>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Whether the process was reaped (then its pid is not ours any more).
    reaped: AtomicBool,
    pub log: PathBuf,
}

impl Bridge {
    /// Starts `bin --url <urls>` with the token in `MCP_BRIDGE_TOKEN` (out of process
    /// listings), its stderr going to `log`. The process belongs to `janitor`, so it is
    /// killed on every way out of the run.
    pub fn start(
        bin: &Path,
        urls: &[String],
        token: &str,
        cacert: &Path,
        log: &Path,
        janitor: &Janitor,
    ) -> Result<Bridge, String> {
        let err = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(bin)
            .arg("--url")
            .arg(urls.join(","))
            .env("MCP_BRIDGE_TOKEN", token)
            .env("MCP_BRIDGE_CACERT", cacert)
            .args(["--log-level", "info"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C at the terminal reaches the harness only.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let pid = janitor
            .adopt(child)
            .ok_or_else(|| "mcp-bridge exited before its pid was known".to_string())?;
        let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
            janitor.kill_now(pid);
            return Err("mcp-bridge has no stdin/stdout pipes".into());
        };
        let pending: Pending = Arc::default();
        let gone = Arc::new(AtomicBool::new(false));
        let reader = {
            let pending = pending.clone();
            let gone = gone.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    // Notifications and server requests have no answer to match.
                    let Some(id) = v["id"].as_i64() else { continue };
                    if v.get("result").is_none() && v.get("error").is_none() {
                        continue;
                    }
                    let tx = pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    if let Some(tx) = tx {
                        let _ = tx.send(v);
                    }
                }
                gone.store(true, Ordering::SeqCst);
                // Waiting requests see their sender dropped: the bridge is gone.
                pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
            })
        };
        Ok(Bridge {
            pid,
            janitor: janitor.clone(),
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            pending,
            next: AtomicI64::new(1),
            gone,
            reader: Mutex::new(Some(reader)),
            reaped: AtomicBool::new(false),
            log: log.to_path_buf(),
        })
    }

    /// Whether the bridge's stdout closed.
    pub fn gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    async fn write(&self, msg: &Value) -> Result<(), String> {
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        let mut guard = self.stdin.lock().await;
        let Some(stdin) = guard.as_mut() else {
            return Err("the bridge's stdin is closed".into());
        };
        stdin
            .write_all(&line)
            .await
            .and(stdin.flush().await)
            .map_err(|e| format!("writing to mcp-bridge: {e}"))
    }

    /// A notification line.
    pub async fn notify(&self, method: &str, params: Option<Value>) -> Result<(), String> {
        let mut msg = json!({"jsonrpc": "2.0", "method": method});
        if let Some(p) = params {
            msg["params"] = p;
        }
        self.write(&msg).await
    }

    /// A request line; waits for the line with its id, at most `deadline`. On timeout the
    /// request is cancelled (`notifications/cancelled`), as a client would.
    pub async fn request(&self, method: &str, params: Value, deadline: Duration) -> Reply {
        let started = Instant::now();
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        if self.gone() {
            return Reply::Lost(self.gone_message());
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let written = tokio::time::timeout(deadline, self.write(&msg)).await;
        let outcome = match written {
            Ok(Ok(())) => {
                let left = deadline.saturating_sub(started.elapsed());
                tokio::time::timeout(left, rx).await
            }
            Ok(Err(e)) => {
                self.forget(id);
                return Reply::Lost(e);
            }
            Err(_) => {
                self.forget(id);
                return Reply::Timeout(format!(
                    "mcp-bridge did not read the request within {deadline:?}"
                ));
            }
        };
        match outcome {
            Ok(Ok(v)) => Reply::Response(v),
            Ok(Err(_)) => Reply::Lost(self.gone_message()),
            Err(_) => {
                self.forget(id);
                let _ = self
                    .notify(
                        "notifications/cancelled",
                        Some(json!({"requestId": id, "reason": "client deadline"})),
                    )
                    .await;
                Reply::Timeout(format!("no answer from mcp-bridge within {deadline:?}"))
            }
        }
    }

    fn forget(&self, id: i64) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn gone_message(&self) -> String {
        let tail = crate::cluster::log_tail(&self.log, 3);
        format!(
            "mcp-bridge closed its stdout (exited?); its log {} ends: {tail}",
            self.log.display()
        )
    }

    /// Closes the bridge's stdin (the client is gone: it exits) and waits up to `within` for
    /// it to exit, then kills it. Returns how it ended.
    pub async fn close(&self, within: Duration) -> String {
        self.stdin.lock().await.take();
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.janitor.exited(self.pid) {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.janitor.kill(self.pid).await;
                break format!("killed: did not exit within {within:?} of its stdin closing");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.reaped.store(true, Ordering::SeqCst);
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(r) = reader {
            // The pipe closed with the process: the reader ends at once (bounded anyway).
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
        status
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(r) = reader {
            r.abort();
        }
        if !self.reaped.load(Ordering::SeqCst) {
            // A worker aborted mid-run: the process goes now, not at the end of the run.
            self.janitor.kill_now(self.pid);
        }
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
