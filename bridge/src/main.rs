//! `mcp-bridge`: the stdio program an AI client launches. It speaks MCP over stdio to the
//! client (newline-delimited JSON-RPC on stdin/stdout) and Streamable HTTP to the cluster,
//! and keeps the client working when the node it talks to dies.
//!
//! Stdout carries only protocol messages; logs go to stderr.

mod link;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use link::{Link, Reply, SendError};
use mcpcp_proto::mcp::{code, ErrorObject, Message, RequestId};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;

/// Connect an MCP client (Claude Desktop, Cursor, VS Code, ...) to an MCP control-plane
/// cluster. Configure it as a stdio server in the client.
#[derive(Debug, Parser)]
#[command(name = "mcp-bridge", version)]
struct Args {
    /// Node URLs (comma list): a VIP or every node. `http://host:port` or a full `/mcp` URL.
    #[arg(long, env = "MCP_BRIDGE_URL", value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// Bearer token (a tenant token).
    #[arg(long, env = "MCP_BRIDGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA certificate (PEM) that signed the nodes' HTTPS certificates: the cluster's
    /// `ca.pem`. Without it, the system's roots.
    #[arg(long, env = "MCP_BRIDGE_CACERT")]
    cacert: Option<std::path::PathBuf>,
    /// Talk to one server (`/servers/NAME/mcp`) instead of the aggregate `/mcp`.
    #[arg(long)]
    server: Option<String>,
    /// Log level on stderr (RUST_LOG wins when set).
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// How long a failover may try nodes before requests fail (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    failover_deadline_ms: u64,
    /// Messages read from stdin that may wait while the bridge reconnects.
    #[arg(long, default_value_t = 1024)]
    stdin_buffer: usize,
    /// How long one request may wait out the cluster's rate limits (JSON-RPC -32029, whose
    /// `retryAfterMs` says how long) before the refusal is passed to the client
    /// (milliseconds; 0: pass it at once). The bridge waits on the same node: a limit is the
    /// cluster's, so another node would refuse alike.
    #[arg(long, default_value_t = 10_000)]
    rate_limit_wait_ms: u64,
}

/// The MCP endpoint URL for `base` (with or without a path); a bare `host:port` is HTTPS.
fn endpoint(base: &str, server: Option<&str>) -> String {
    let base = base.trim().trim_end_matches('/');
    let base = if base.starts_with("http://") || base.starts_with("https://") {
        base.to_string()
    } else {
        format!("https://{base}")
    };
    let root = link::root(&base).to_string();
    match server {
        Some(s) => format!("{root}/servers/{s}/mcp"),
        None if base.len() > root.len() => base,
        None => format!("{root}/mcp"),
    }
}

type Out = mpsc::Sender<Message>;

/// How long a call may go without news before the bridge checks that its node still answers.
const WATCHDOG: Duration = Duration::from_secs(3);
type InFlight = Arc<Mutex<HashMap<RequestId, tokio::task::AbortHandle>>>;

fn error_to_client(id: RequestId, code: i64, message: impl Into<String>) -> Message {
    Message::error(id, ErrorObject::new(code, message))
}

/// How long a rate-limited answer asks to wait (`-32029` with `data.retryAfterMs`), when
/// that fits in what is left of `patience`; the wait is taken from it.
fn rate_limited_wait(m: &Message, patience: &mut Duration) -> Option<Duration> {
    let Message::Response {
        outcome: Err(e), ..
    } = m
    else {
        return None;
    };
    if e.code != code::RATE_LIMITED {
        return None;
    }
    // mcpd's own refusal names its limit; at least 50 ms apart, whatever it says.
    let data = e.data.as_ref()?;
    data.get("limit")?;
    let wait = Duration::from_millis(data["retryAfterMs"].as_u64()?.max(50));
    *patience = patience.checked_sub(wait)?;
    Some(wait)
}

/// Runs one client request to its answer, failing over as needed, and waiting out rate
/// limits for up to `patience`.
async fn request(
    link: Arc<Link>,
    out: Out,
    id: RequestId,
    method: String,
    params: Option<serde_json::Value>,
    mut patience: Duration,
) {
    let msg = Message::Request {
        id: id.clone(),
        method: method.clone(),
        params: params.clone(),
    };
    let mut failovers = 0;
    'attempts: while failovers < 4 {
        let epoch = link.epoch();
        let post = link.post(&msg);
        tokio::pin!(post);
        let sent = loop {
            tokio::select! {
                r = &mut post => break r,
                // A long call is fine; a node that stopped answering (frozen, cut off) is not.
                _ = tokio::time::sleep(WATCHDOG) => {
                    if !link.node_answers().await {
                        break Err(SendError::Lost("the node stopped answering".into()));
                    }
                }
            }
        };
        let failure = match sent {
            Ok(Reply::Message(m)) => {
                if let Some(wait) = rate_limited_wait(&m, &mut patience) {
                    tracing::info!(%method, ?wait, "rate limited: waiting, then sending again");
                    tokio::time::sleep(wait).await;
                    continue 'attempts;
                }
                deliver_answer(&link, &out, &method, m).await;
                return;
            }
            Ok(Reply::Stream(mut rx)) => {
                let mut lost = None;
                loop {
                    let next = tokio::select! {
                        m = rx.recv() => m,
                        _ = tokio::time::sleep(WATCHDOG) => {
                            if link.node_answers().await {
                                continue;
                            }
                            Some(Err(SendError::Lost("the node stopped answering".into())))
                        }
                    };
                    match next {
                        Some(Ok(m)) => {
                            let done =
                                matches!(&m, Message::Response { id: rid, .. } if *rid == id);
                            if done {
                                if let Some(wait) = rate_limited_wait(&m, &mut patience) {
                                    tokio::time::sleep(wait).await;
                                    continue 'attempts;
                                }
                                deliver_answer(&link, &out, &method, m).await;
                                return;
                            }
                            let _ = out.send(m).await;
                        }
                        Some(Err(e)) => {
                            lost = Some(e);
                            break;
                        }
                        None => break,
                    }
                }
                lost.unwrap_or(SendError::Lost("the answer stream ended early".into()))
            }
            Ok(Reply::Accepted) => {
                let _ = out
                    .send(error_to_client(
                        id,
                        code::INTERNAL_ERROR,
                        "the node accepted the request without answering it",
                    ))
                    .await;
                return;
            }
            Err(SendError::Refused { status, body }) => {
                // A rate limit's refusal of the whole request (429): waited out like one in
                // a 200 answer.
                let refusal = body
                    .as_ref()
                    .and_then(|b| Message::from_value(b.clone()).ok());
                if let Some(wait) = refusal
                    .as_ref()
                    .and_then(|m| rate_limited_wait(m, &mut patience))
                {
                    tracing::info!(%method, ?wait, "rate limited: waiting, then sending again");
                    tokio::time::sleep(wait).await;
                    continue 'attempts;
                }
                // JSON-RPC errors carry a numeric code; the admin API's errors a word.
                let detail = body.as_ref().map(|b| &b["error"]);
                let message = detail
                    .and_then(|e| e["message"].as_str())
                    .map(|m| format!("the node refused the request (HTTP {status}): {m}"))
                    .unwrap_or_else(|| format!("the node refused the request (HTTP {status})"));
                let code = detail
                    .and_then(|e| e["code"].as_i64())
                    .unwrap_or(code::INVALID_REQUEST);
                tracing::error!(status, %message, "request refused");
                let _ = out.send(error_to_client(id, code, message)).await;
                return;
            }
            Err(e) => e,
        };
        let resend = match &failure {
            SendError::NotSent(_) | SendError::SessionGone => true,
            _ => link.is_safe(&method, &params),
        };
        if let Err(why) = link.failover(epoch, &failure.to_string()).await {
            tracing::error!(error = %why, "cluster unreachable");
            spawn_recovery(link.clone());
            let message = format!(
                "the MCP cluster is unreachable: {why}; mcp-bridge keeps trying in the background"
            );
            let code = if resend {
                code::UNAVAILABLE
            } else {
                code::CRASHED
            };
            let _ = out.send(error_to_client(id, code, message)).await;
            return;
        }
        if !resend {
            let message = format!(
                "the node handling {method} failed ({failure}); the call may or may not have run, and it is not retried because it is not known to be safe to run twice"
            );
            let _ = out.send(error_to_client(id, code::CRASHED, message)).await;
            return;
        }
        tracing::info!(%method, "re-sending after failover");
        failovers += 1;
    }
    let _ = out
        .send(error_to_client(
            id,
            code::UNAVAILABLE,
            "gave up after repeated node failures",
        ))
        .await;
}

async fn deliver_answer(link: &Link, out: &Out, method: &str, m: Message) {
    if method == "tools/list" {
        if let Message::Response { outcome: Ok(v), .. } = &m {
            link.learn(v);
        }
    }
    let _ = out.send(m).await;
}

/// Keeps trying to reach a node after a failover gave up, so the next request finds one.
fn spawn_recovery(link: Arc<Link>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if link
                .failover(link.epoch(), "background reconnect")
                .await
                .is_ok()
            {
                tracing::info!(node = %link.current_url(), "reconnected");
                return;
            }
        }
    });
}

/// Relays the session's standalone stream (list_changed, resources/updated, server requests).
async fn event_stream(link: Arc<Link>, out: Out) {
    loop {
        let epoch = link.epoch();
        match link.open_stream().await {
            Ok(mut rx) => {
                while let Some(Ok(m)) = rx.recv().await {
                    if out.send(m).await.is_err() {
                        return;
                    }
                }
            }
            Err(SendError::Refused { status, .. }) => {
                tracing::info!(status, "the node offers no event stream");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "event stream failed"),
        }
        if link.epoch() == epoch
            && !link.alive().await
            && link.failover(epoch, "event stream dropped").await.is_err()
        {
            spawn_recovery(link.clone());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends a client notification or response, once more after a failover if it did not arrive.
async fn forward(link: Arc<Link>, msg: Message) {
    for _ in 0..2 {
        let epoch = link.epoch();
        match link.post(&msg).await {
            Ok(_) | Err(SendError::Refused { .. }) => return,
            Err(e) => {
                if link.failover(epoch, &e.to_string()).await.is_err() {
                    spawn_recovery(link.clone());
                    return;
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&args.log_level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let urls: Vec<String> = args
        .url
        .iter()
        .filter(|u| !u.trim().is_empty())
        .map(|u| endpoint(u, args.server.as_deref()))
        .collect();
    if urls.is_empty() {
        anyhow::bail!("--url: give at least one node URL (or set MCP_BRIDGE_URL)");
    }
    tracing::info!(urls = ?urls, "mcp-bridge starting");
    let link = Arc::new(
        Link::new(
            urls,
            args.token.clone(),
            args.cacert.as_deref(),
            Duration::from_millis(args.failover_deadline_ms),
        )
        .context("building the HTTP client")?,
    );

    let (out_tx, mut out_rx) = mpsc::channel::<Message>(1024);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(m) = out_rx.recv().await {
            if stdout.write_all(&m.to_line()).await.is_err() || stdout.flush().await.is_err() {
                return;
            }
        }
    });

    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(args.stdin_buffer.max(1));
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if in_tx.send(line.into_bytes()).await.is_err() {
                return;
            }
        }
    });

    let in_flight: InFlight = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut stream_task: Option<tokio::task::JoinHandle<()>> = None;
    while let Some(line) = in_rx.recv().await {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let msg = match Message::parse(&line) {
            Ok(m) => m,
            Err(e) => {
                let body = json!({ "jsonrpc": "2.0", "id": e.id, "error": { "code": e.code, "message": e.message } });
                tracing::warn!(error = %e.message, "client sent a malformed message");
                if let Ok(m) = Message::from_value(body.clone()) {
                    let _ = out_tx.send(m).await;
                } else {
                    println!("{body}");
                }
                continue;
            }
        };
        link.record(&msg);
        match msg {
            Message::Request { id, method, params } => {
                let handle = tasks.spawn(request(
                    link.clone(),
                    out_tx.clone(),
                    id.clone(),
                    method,
                    params,
                    Duration::from_millis(args.rate_limit_wait_ms),
                ));
                let mut map = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                map.retain(|_, h| !h.is_finished());
                map.insert(id, handle);
            }
            Message::Notification {
                ref method,
                ref params,
            } => {
                if method == "notifications/cancelled" {
                    let id = params.as_ref().and_then(|p| {
                        serde_json::from_value::<RequestId>(p["requestId"].clone()).ok()
                    });
                    if let Some(h) = id.and_then(|id| {
                        in_flight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id)
                    }) {
                        h.abort();
                    }
                }
                if method == "notifications/initialized" && stream_task.is_none() {
                    // The session is set up: open its event stream once the node knows it.
                    let (link2, out2, msg) = (link.clone(), out_tx.clone(), msg.clone());
                    stream_task = Some(tokio::spawn(async move {
                        forward(link2.clone(), msg).await;
                        event_stream(link2, out2).await;
                    }));
                } else {
                    tasks.spawn(forward(link.clone(), msg.clone()));
                }
            }
            Message::Response { .. } => {
                tasks.spawn(forward(link.clone(), msg));
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    // stdin closed: the client is gone. Let answers in flight finish briefly, then exit.
    if let Some(t) = stream_task {
        t.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    reader.abort();
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::endpoint;

    #[test]
    fn endpoints_are_built_from_bases_and_urls() {
        assert_eq!(
            endpoint("127.0.0.1:7400", None),
            "https://127.0.0.1:7400/mcp"
        );
        assert_eq!(endpoint("http://vip:80/", None), "http://vip:80/mcp");
        assert_eq!(endpoint("http://n1:7400/mcp", None), "http://n1:7400/mcp");
        assert_eq!(
            endpoint("http://n1:7400/mcp", Some("time")),
            "http://n1:7400/servers/time/mcp"
        );
        assert_eq!(
            endpoint("n1:7400", Some("git")),
            "https://n1:7400/servers/git/mcp"
        );
    }
}
