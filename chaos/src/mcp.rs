//! The harness's MCP clients, each bounded by a per-request deadline:
//! - `mcpcp_testkit::HttpMcp`: plain HTTP, what a curl user does (shared with the tests);
//! - [`Bridge`]: an `mcp-bridge` child process given every node's URL, driven over its
//!   stdin/stdout (newline-delimited JSON-RPC); responses are matched to requests by id.
//!
//! Both return a `Reply`: what came back, before any judgement of what it means.

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

use mcpcp_testkit::Reply;

use crate::janitor::Janitor;

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
        let tail = mcpctl::launch::log_tail(&self.log, 3);
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
