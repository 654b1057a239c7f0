//! `mcp-bench`: the MCP data plane's latency and throughput, next to the gateways a user would
//! pick instead, all on loopback and all driven by the same load generator.
//!
//! The load is the demo server's `echo` tool (`mcpd demo-server`). A client opens one session
//! (`initialize`, `notifications/initialized`) and then calls `tools/call echo` back to back,
//! checking that each answer echoes its own message. Over HTTP that is raw JSON-RPC on
//! Streamable HTTP (hyper's HTTP/1.1 client connection, keep-alive, one connection and one
//! session per client, driven by the client's own task as load generators do, JSON or SSE
//! answers); over stdio it is JSON-RPC lines on the child's stdin, answers matched by id, and
//! the clients of a level share the one process (their requests are pipelined).
//!
//! Sections (`--sections data,routing,bridge,upstream,identity,limits,tracing`):
//!
//! - `data`: direct stdio to `mcpd demo-server` (the floor); one node's local pool
//!   (`/servers/demo/mcp` of a 3-node cluster) with `pool_size` 2 and then 4; `mcp-proxy` and
//!   `supergateway` (stateful and stateless) fronting the same server. 1 and 64 clients; plus
//!   `ping` through the node at 1 client (answered without the server: where the time goes).
//! - `routing`: a server with `replicas: 1` called through its placement node (local pool) and
//!   through another node (forwarded to the placement over gRPC); 64 clients spread over the 3
//!   nodes.
//! - `upstream`: a remote (Streamable HTTP) upstream: node 2's `/servers/demo/mcp` called
//!   directly, then registered on the cluster as a server with a `url` and called through
//!   node 1 (`/servers/demo-remote/mcp`: node 1's HTTP upstream → node 2 → its pool), at 1 and
//!   64 clients; the added p50 and the calls/s ratio against the direct calls of the same run.
//!   The same for a server written with the Python SDK (`tests/py/servers/remote_tools.py`,
//!   run by the tests' `.venv`), as remote servers are, called in 2026-07-28 directly and
//!   through node 1 (the revision node 1 speaks to it: the SDK serves a 2025 session's
//!   requests at another cost, so the two upstreams' rows do not compare with each other).
//!   At 64 clients that server is the bottleneck, and the ratio says what node 1 takes from
//!   its CPU on this machine more than what node 1 costs; the 1-client p50 is node 1's hop.
//! - `identity`: the cost of a JWT caller and of policies: node 1's `/servers/demo/mcp` called
//!   with an API key while no policy exists, then with an ES256 JWT of a trusted issuer
//!   (`mcpcp_tests::bench_issuer`, keys cached after the first call), first alone, then while 100 rules apply to
//!   the caller's tenant, the last of them the one that matches, with a CEL condition on the
//!   call's arguments, and last with that condition taken away (what the CEL costs); at 1 and
//!   64 clients, the added p50 and the calls/s ratio of the same run.
//! - `limits`: the cost of a rate limit and a daily quota that match every call (set too high
//!   to refuse any): node 1's `/servers/demo/mcp` without, with, and without again (the mean
//!   of the two runs without is the anchor); at 1 and 64 clients.
//! - `tracing`: node 1's `/servers/demo/mcp` on the cluster without tracing, on a second
//!   cluster of the same build that samples and exports every call's spans (OTLP/gRPC to a sink
//!   in this process, `mcpcp_tests::otlp`), then without again (the anchor is the mean of the
//!   two); with `--baseline-mcpd PATH`, first on a cluster of an earlier build too (tracing off
//!   against no tracing at all). At 1 and 64 clients; then 5 alternating rounds of the 1-client
//!   level, off then on, whose median difference is the goal's figure, and node 1's CPU time
//!   per call in those rounds (every thread of the process, read from
//!   `/proc/PID/task/*/schedstat`: steadier than a latency on a shared machine, and it counts
//!   the exporter's thread); the spans the sink received per call.
//! - `bridge`: `mcp-bridge` (stdio, given every node's URL) vs the same calls straight to `/mcp`;
//!   then `--kills` times: kill -9 the node the bridge is using and time the pause until a call
//!   sent after the kill succeeds, restarting the node (and waiting for `/readyz`) in between.
//!
//! The peers get their best case: logging off or at warnings (at info both log every message).
//! A failover pause is the time from kill -9 of the node to the end of the first successful call
//! that was sent after the killed process was reaped.
//!
//! Each level runs a short warm-up (a fifth of `--seconds`, at most 1 s, not counted) and then
//! `--seconds`, or `--max-calls` calls. Latency percentiles are of successful calls; failed
//! calls are counted in `errors`, not in `calls/s`. The benchmark prints figures and the goals
//! they are measured against; it asserts nothing about them.
//!
//! ```text
//! mcp-bench [--seconds 5] [--sections data,routing,bridge] [--kills 20] [--max-calls 2000000]
//! ```
//!
//! Peers are found at `$MCP_PROXY_BIN` / `$SUPERGATEWAY_BIN`, else in `.tools/` of the
//! repository (where `scripts/bench-mcp.sh` installs pinned versions), else on `PATH`; a peer
//! that is missing is skipped and said so.

use mcpcp_tests::bench::{
    find_on_path, percentile, root_cause, round3, run_until_stopped, tool_version,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::header::{ACCEPT, CONTENT_TYPE};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use mcpcp_proto::api::{
    CreateTokenRequest, IssuerSpec, LimitSpec, PolicySpec, ServerPatch, ServerSpec, TenantSpec,
};
use mcpcp_proto::mcp::STATELESS_VERSION;
use mcpcp_tests::Cluster;
use mcpctl::{AdminClient, CallOptions};
use serde_json::{json, Value};
use std::pin::Pin;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};

/// Bound of one call over HTTP or stdio (the bridge's kill test uses [`FAILOVER_CALL_TIMEOUT`]).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A call through the bridge while it fails over: longer than its 10 s failover deadline.
const FAILOVER_CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a gateway, a cluster node or a pool gets to become usable.
const READY_WITHIN: Duration = Duration::from_secs(90);
/// A kill whose client sees no successful call within this is counted as not recovered.
const PAUSE_WITHIN: Duration = Duration::from_secs(30);
/// A client that got an error pauses this long, so that a dead endpoint is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Between two calls of the kill test's client (leaves CPU for the restarts).
const KILL_CLIENT_PACE: Duration = Duration::from_millis(1);
/// Error descriptions kept per level, to be printed.
const ERROR_SAMPLES: usize = 3;
/// Longest warm-up of a level.
const MAX_WARMUP: Duration = Duration::from_secs(1);
/// The session-era protocol revision every client asks for (all systems here speak it).
const PROTOCOL_VERSION: &str = "2025-06-18";
/// Concurrent clients of each level.
const LEVELS: [u32; 2] = [1, 64];
/// The direct-stdio floor's row.
const FLOOR_SYSTEM: &str = "demo-server stdio (floor)";
/// Pool sizes of the demo server in the data section, in order.
const POOL_SIZES: [u32; 2] = [2, 4];
/// The data section's row of `ping` through mcpd (answered by the node, no server call).
const PING_SYSTEM: &str = "mcpd ping /servers/demo/mcp (no server call)";
/// Clients spread over the three nodes in the routing section.
const SPREAD_CLIENTS: u32 = 64;

// Goals the figures are reported against.
const GOAL_DATA_P50_OVER_FLOOR_MS: f64 = 0.150;
const GOAL_DATA_PEER_FACTOR: f64 = 8.0;
const GOAL_ROUTING_HOP_MS: f64 = 0.5;
const GOAL_BRIDGE_P50_MS: f64 = 0.3;
const GOAL_PAUSE_P99_MS: f64 = 1000.0;
const GOAL_UPSTREAM_P50_ADDED_MS: f64 = 0.150;
const GOAL_UPSTREAM_FACTOR: f64 = 0.8;
const GOAL_IDENTITY_P50_ADDED_MS: f64 = 0.020;
const GOAL_IDENTITY_FACTOR: f64 = 0.95;
/// A rate limit and quota that match every call add at most this to the 1-client p50 (ms)…
const GOAL_LIMITS_P50_ADDED_MS: f64 = 0.010;
/// …and keep at least this share of the 64-client calls/s.
const GOAL_LIMITS_FACTOR: f64 = 0.95;
/// Tracing on, every call sampled and exported, adds at most this to the 1-client p50 (ms).
const GOAL_TRACING_ON_P50_ADDED_MS: f64 = 0.010;

#[derive(Debug, Parser)]
#[command(
    name = "mcp-bench",
    about = "MCP data-plane latency and throughput: stdio floor, mcpd pools, peers (mcp-proxy, \
             supergateway), peer routing and mcp-bridge failover, on loopback"
)]
struct Args {
    /// Duration of each level, in seconds (after a short warm-up).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Sections to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "data,routing,bridge,upstream,identity,limits,tracing"
    )]
    sections: Vec<Section>,
    /// kill -9 rounds of the bridge's failover test.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=200))]
    kills: u32,
    /// Most calls counted in one level (a level ends at its time or at this count).
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_calls: u64,
    /// Leave out the peers (mcp-proxy, supergateway): for iterating on mcpd alone. The
    /// comparison goals then have nothing to compare with.
    #[arg(long)]
    no_peers: bool,
    /// Serve mcpd's edge as plain HTTP (`--api-tls off`; gRPC between nodes stays mutual
    /// TLS): run once with it and once without, same build, for the cost of TLS.
    #[arg(long)]
    plain_edge: bool,
    /// The `tracing` section's anchor: an `mcpd` built before tracing existed (e.g. from
    /// `git worktree add /tmp/before f1f8dbe`), whose calls the tracing-off build's are
    /// compared with.
    #[arg(long)]
    baseline_mcpd: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Data,
    Routing,
    Bridge,
    Upstream,
    Identity,
    Limits,
    Tracing,
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Section::Data => "data",
            Section::Routing => "routing",
            Section::Bridge => "bridge",
            Section::Upstream => "upstream",
            Section::Identity => "identity",
            Section::Limits => "limits",
            Section::Tracing => "tracing",
        }
    }
}

// === results ===

/// The figures of one (system, level).
#[derive(Debug, Clone)]
struct Row {
    section: &'static str,
    system: String,
    clients: u32,
    calls: u64,
    errors: u64,
    elapsed: Duration,
    p50: Option<Duration>,
    p99: Option<Duration>,
    max: Option<Duration>,
    /// The 1-minute load average when the level started (the machine is shared).
    load1: f64,
    /// TCP delayed ACKs on this machine while the level ran (`TcpExt DelayedACKs`): many per
    /// call point at Nagle's algorithm meeting a delayed ACK somewhere on the path.
    delayed_acks: Option<u64>,
    /// CPU time of the watched process (every thread: its work on the call path and beside
    /// it, an exporter's say) per call issued, warm-up included, when the level watched one.
    cpu_per_call: Option<Duration>,
    /// A few of the errors, as the client saw them.
    samples: Vec<String>,
    /// Rows that are not a throughput level (the failover pauses) print no calls/s.
    rate: bool,
}

impl Row {
    fn calls_per_s(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.calls as f64 / self.elapsed.as_secs_f64()
        }
    }

    fn json(&self) -> Value {
        json!({
            "section": self.section,
            "system": self.system,
            "clients": self.clients,
            "calls": self.calls,
            "errors": self.errors,
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "calls_per_s": self.rate.then(|| round3(self.calls_per_s())),
            "p50_ms": ms3(self.p50),
            "p99_ms": ms3(self.p99),
            "max_ms": ms3(self.max),
            "load1": self.load1,
            "tcp_delayed_acks": self.delayed_acks,
            "cpu_us_per_call": self.cpu_per_call.map(|d| round3(d.as_secs_f64() * 1e6)),
            "error_samples": self.samples,
        })
    }
}

/// A goal and how the run measured against it.
#[derive(Debug, Clone)]
struct Goal {
    section: &'static str,
    goal: String,
    measured: String,
    met: Option<bool>,
}

impl Goal {
    /// The goal that `what`'s p50 be at most `limit_ms` above `reference`'s.
    fn p50_over(
        section: &'static str,
        goal: String,
        (what, p50): (&str, Option<Duration>),
        (reference, reference_p50): (&str, Option<Duration>),
        limit_ms: f64,
    ) -> Goal {
        let (measured, met) = match (p50, reference_p50) {
            (Some(p), Some(r)) => {
                let over = ms(p) - ms(r);
                (
                    format!(
                        "{what} p50 {:.3} ms, {reference} {:.3} ms: {over:+.3} ms",
                        ms(p),
                        ms(r)
                    ),
                    Some(over <= limit_ms),
                )
            }
            _ => (format!("{what} no figure"), None),
        };
        Goal {
            section,
            goal,
            measured,
            met,
        }
    }

    /// The goal that `what`'s calls/s be at least `factor` times `reference`'s.
    fn rate_at_least(
        section: &'static str,
        goal: String,
        (what, rate): (&str, Option<f64>),
        (reference, reference_rate): (&str, Option<f64>),
        factor: f64,
    ) -> Goal {
        let (measured, met) = match (rate, reference_rate) {
            (Some(r), Some(b)) if b > 0.0 => (
                format!("{what} {r:.0}/s, {reference} {b:.0}/s: {:.2}x", r / b),
                Some(r / b >= factor),
            ),
            _ => ("no figure".to_string(), None),
        };
        Goal {
            section,
            goal,
            measured,
            met,
        }
    }

    fn json(&self) -> Value {
        json!({
            "section": self.section,
            "goal": self.goal,
            "measured": self.measured,
            "met": self.met,
        })
    }
}

/// One kill -9 of the bridge's node.
#[derive(Debug, Clone)]
struct Kill {
    round: u32,
    node: u64,
    pause: Option<Duration>,
    errors: u64,
    restart_ready: Option<Duration>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    goals: Vec<Goal>,
    kills: Vec<Kill>,
    /// Things that went wrong or were skipped, by section.
    notes: Vec<(&'static str, String)>,
}

impl Report {
    fn row(&self, section: &str, system: &str, clients: u32) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.section == section && r.system == system && r.clients == clients)
    }

    fn note(&mut self, section: &'static str, text: impl Into<String>) {
        let text = text.into();
        eprintln!("{section}: note: {text}");
        self.notes.push((section, text));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ms3(d: Option<Duration>) -> Option<f64> {
    d.map(|d| round3(ms(d)))
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    t.replace('\n', " ")
}

// === MCP clients ===

/// The `tools/call` of `echo`-like tool `tool` with message `msg`.
fn echo_call(id: u64, tool: &str, argument: &str, msg: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": "tools/call",
        "params": { "name": tool, "arguments": { argument: msg } },
    })
}

/// The `_meta` every 2026-07-28 request carries (no client capabilities).
fn stateless_meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": STATELESS_VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
    })
}

fn initialize_params() -> Value {
    json!({
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": { "name": "mcp-bench", "version": env!("CARGO_PKG_VERSION") },
    })
}

/// The result of a JSON-RPC answer, or its error.
fn rpc_result(answer: &Value) -> Result<&Value, String> {
    if let Some(e) = answer.get("error") {
        return Err(format!(
            "JSON-RPC error {}: {}",
            e["code"],
            snippet(e["message"].as_str().unwrap_or_default())
        ));
    }
    answer
        .get("result")
        .ok_or_else(|| format!("not an answer: {}", snippet(&answer.to_string())))
}

/// Checks that an answer to an echo call is a success that echoes `msg`.
fn check_echo(answer: &Value, msg: &str) -> Result<(), String> {
    let result = rpc_result(answer)?;
    if result["isError"] == json!(true) {
        return Err(format!("tool error: {}", snippet(&result.to_string())));
    }
    match result["content"][0]["text"].as_str() {
        Some(t) if t == msg => Ok(()),
        _ => Err(format!(
            "echo answered something else: {}",
            snippet(&result.to_string())
        )),
    }
}

/// The JSON-RPC answer to request `id` in an SSE body.
fn sse_answer(body: &[u8], id: u64) -> Result<Value, String> {
    mcpcp_proto::sse::events(body)
        .iter()
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find(|v| {
            (v.get("result").is_some() || v.get("error").is_some()) && v["id"].as_u64() == Some(id)
        })
        .ok_or_else(|| {
            format!(
                "no answer to request {id} in the SSE body: {}",
                snippet(&String::from_utf8_lossy(body))
            )
        })
}

/// Where HTTP clients go.
#[derive(Debug, Clone)]
struct HttpTarget {
    url: String,
    token: Option<String>,
    tool: String,
    /// The echo tool's argument (`message` for mcpd's demo server).
    argument: &'static str,
    /// Headers every request carries besides `Authorization`.
    headers: Vec<(&'static str, String)>,
    /// Speak 2026-07-28 (each request stands alone), not a 2025-06-18 session.
    stateless: bool,
}

impl HttpTarget {
    /// The demo server's `echo` (or, with no `tool`, `ping`) at `url`.
    fn demo(url: String, token: Option<String>, tool: &str) -> HttpTarget {
        HttpTarget {
            url,
            token,
            tool: tool.into(),
            argument: "message",
            headers: Vec::new(),
            stateless: false,
        }
    }
}

/// One HTTP/1.1 keep-alive connection, driven by the task that sends on it: a request costs
/// the socket's round trip and nothing else (no pool lookup, no hop to a connection task), the
/// way a load generator (wrk, oha) measures a server rather than its own client library.
struct HttpConn {
    send: http1::SendRequest<Full<Bytes>>,
    /// The connection's driver: plain TCP, or TLS for an `https://` target.
    conn: Pin<Box<dyn std::future::Future<Output = Result<(), hyper::Error>> + Send>>,
}

/// The TLS client of every `https://` connection (trusting the harness's CA): one
/// configuration, so reconnects resume their TLS sessions, as a long-lived client's would.
fn tls_client() -> tokio_rustls::TlsConnector {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        Arc::new(
            mcpcp_pki::trust::client_config(Some(&mcpcp_tests::test_ca_cert()), &[b"http/1.1"])
                .expect("TLS client configuration"),
        )
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

impl HttpConn {
    async fn connect(authority: &str, tls: bool) -> Result<HttpConn, String> {
        let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(authority))
            .await
            .map_err(|_| format!("connecting to {authority}: no answer within 2 s"))?
            .map_err(|e| format!("connecting to {authority}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        if !tls {
            let (send, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| root_cause(&e))?;
            return Ok(HttpConn {
                send,
                conn: Box::pin(conn),
            });
        }
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host}: {e}"))?;
        let stream = tls_client()
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS with {authority}: {e}"))?;
        let (send, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| root_cause(&e))?;
        Ok(HttpConn {
            send,
            conn: Box::pin(conn),
        })
    }

    /// Sends `req` and reads the whole answer, polling the connection meanwhile.
    async fn exchange(
        &mut self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<(http::response::Parts, Bytes), String> {
        let HttpConn { send, conn } = self;
        let exchange = async {
            send.ready().await.map_err(|e| root_cause(&e))?;
            let resp = send.send_request(req).await.map_err(|e| root_cause(&e))?;
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await.map_err(|e| root_cause(&e))?;
            Ok::<_, String>((parts, bytes.to_bytes()))
        };
        tokio::select! {
            biased;
            r = exchange => r,
            end = conn.as_mut() => Err(match end {
                Ok(()) => "the server closed the connection".to_string(),
                Err(e) => root_cause(&e),
            }),
        }
    }
}

/// One MCP session on Streamable HTTP, over one connection (re-opened after an error).
struct HttpSession {
    target: HttpTarget,
    /// `host:port` and path of `target.url`, and whether it is `https://`.
    authority: String,
    path: String,
    tls: bool,
    /// `Authorization` of every request, when the target has a token.
    bearer: Option<String>,
    conn: Option<HttpConn>,
    session: Option<String>,
    version: Option<String>,
    next_id: u64,
}

impl HttpSession {
    /// `initialize` + `notifications/initialized`.
    async fn open(target: &HttpTarget) -> Result<HttpSession, String> {
        let uri: http::Uri = target
            .url
            .parse()
            .map_err(|e| format!("{}: {e}", target.url))?;
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{}: no host", target.url))?
            .to_string();
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.to_string());
        let mut s = HttpSession {
            target: target.clone(),
            authority,
            path,
            tls: uri.scheme_str() == Some("https"),
            bearer: target.token.as_ref().map(|t| format!("Bearer {t}")),
            conn: None,
            session: None,
            version: None,
            next_id: 1,
        };
        if target.stateless {
            s.version = Some(STATELESS_VERSION.into());
            return Ok(s);
        }
        let init = json!({
            "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": initialize_params(),
        });
        let (answer, session) = s.post(&init, Some(0)).await?;
        let answer = answer.ok_or("initialize was not answered")?;
        let result = rpc_result(&answer)?;
        s.version = Some(
            result["protocolVersion"]
                .as_str()
                .unwrap_or(PROTOCOL_VERSION)
                .to_string(),
        );
        s.session = session;
        let note = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
        s.post(&note, None).await?;
        Ok(s)
    }

    fn request(&self, method: http::Method, body: Vec<u8>) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(&self.path)
            .header(http::header::HOST, &self.authority)
            .header(ACCEPT, "application/json, text/event-stream")
            .header(CONTENT_TYPE, "application/json");
        if let Some(b) = &self.bearer {
            req = req.header(http::header::AUTHORIZATION, b);
        }
        for (name, value) in &self.target.headers {
            req = req.header(*name, value);
        }
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s);
        }
        if let Some(v) = &self.version {
            req = req.header("mcp-protocol-version", v);
        }
        if self.target.stateless {
            req = match self.target.tool.as_str() {
                "" => req.header("mcp-method", "ping"),
                tool => req
                    .header("mcp-method", "tools/call")
                    .header("mcp-name", tool),
            };
        }
        req.body(Full::new(Bytes::from(body)))
            .expect("the request's parts are valid")
    }

    /// Sends one request on the session's connection (opening it when there is none) within
    /// `bound`; an error drops the connection.
    async fn send(
        &mut self,
        req: http::Request<Full<Bytes>>,
        bound: Duration,
    ) -> Result<(http::response::Parts, Bytes), String> {
        let HttpSession {
            authority,
            conn,
            tls,
            ..
        } = self;
        let outcome = tokio::time::timeout(bound, async {
            let c = match conn {
                Some(c) => c,
                None => conn.insert(HttpConn::connect(authority, *tls).await?),
            };
            c.exchange(req).await
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {bound:?}")));
        if outcome.is_err() {
            *conn = None;
        }
        outcome
    }

    /// POSTs one message; the answer to `id` when it is a request.
    async fn post(
        &mut self,
        body: &Value,
        id: Option<u64>,
    ) -> Result<(Option<Value>, Option<String>), String> {
        let req = self.request(
            http::Method::POST,
            serde_json::to_vec(body).unwrap_or_default(),
        );
        let (parts, bytes) = self.send(req, REQUEST_TIMEOUT).await?;
        let status = parts.status;
        let session = parts
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let sse = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !status.is_success() {
            return Err(format!(
                "HTTP {status}: {}",
                snippet(&String::from_utf8_lossy(&bytes))
            ));
        }
        let Some(id) = id else {
            return Ok((None, session));
        };
        let answer = if sse {
            sse_answer(&bytes, id)?
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "HTTP {status}, not JSON ({e}): {}",
                    snippet(&String::from_utf8_lossy(&bytes))
                )
            })?
        };
        Ok((Some(answer), session))
    }

    async fn call(&mut self, seq: u64) -> Result<(), String> {
        let id = self.next_id;
        self.next_id += 1;
        if self.target.tool.is_empty() {
            // `ping`: the gateway answers it itself, without the server.
            let mut ping = json!({ "jsonrpc": "2.0", "id": id, "method": "ping" });
            if self.target.stateless {
                ping["params"] = json!({ "_meta": stateless_meta() });
            }
            let (answer, _) = self.post(&ping, Some(id)).await?;
            rpc_result(&answer.ok_or("the ping was not answered")?)?;
            return Ok(());
        }
        let msg = format!("m{seq}");
        let mut call = echo_call(id, &self.target.tool, self.target.argument, &msg);
        if self.target.stateless {
            call["params"]["_meta"] = stateless_meta();
        }
        let (answer, _) = self.post(&call, Some(id)).await?;
        check_echo(&answer.ok_or("the call was not answered")?, &msg)
    }

    /// Ends the session (DELETE), best effort.
    async fn close(mut self) {
        if self.session.is_none() {
            return;
        }
        let req = self.request(http::Method::DELETE, Vec::new());
        let _ = self.send(req, Duration::from_secs(2)).await;
    }
}

/// One MCP session on a child's stdin/stdout; any number of callers share it, their requests
/// pipelined and their answers matched by id.
struct StdioConn {
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    next_id: AtomicU64,
    open: AtomicBool,
    tool: String,
    timeout: Duration,
}

impl StdioConn {
    /// Starts reading answers from `stdout`.
    fn start(stdin: ChildStdin, stdout: ChildStdout, tool: &str, timeout: Duration) -> Arc<Self> {
        let conn = Arc::new(StdioConn {
            stdin: tokio::sync::Mutex::new(stdin),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            open: AtomicBool::new(true),
            tool: tool.to_string(),
            timeout,
        });
        tokio::spawn(read_answers(conn.clone(), stdout));
        conn
    }

    async fn send_line(&self, msg: &Value) -> Result<(), String> {
        let mut line = serde_json::to_vec(msg).unwrap_or_default();
        line.push(b'\n');
        let mut w = self.stdin.lock().await;
        w.write_all(&line).await.map_err(|e| e.to_string())?;
        w.flush().await.map_err(|e| e.to_string())
    }

    async fn request(&self, method: &str, params: Value) -> Result<Value, String> {
        if !self.open.load(Ordering::Relaxed) {
            return Err("the process closed its stdout".into());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.request_with_id(
            id,
            json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }),
        )
        .await
    }

    async fn request_with_id(&self, id: u64, msg: Value) -> Result<Value, String> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        if let Err(e) = self.send_line(&msg).await {
            self.forget(id);
            return Err(format!("writing to the process: {e}"));
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err("the process closed its stdout".into()),
            Err(_) => {
                self.forget(id);
                Err(format!("no answer within {:?}", self.timeout))
            }
        }
    }

    fn forget(&self, id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// `initialize`, `notifications/initialized`, and `tools/list` (which tells the bridge
    /// which tools are idempotent, so that it may re-send them after a failover).
    async fn initialize(&self) -> Result<(), String> {
        let answer = self.request("initialize", initialize_params()).await?;
        rpc_result(&answer)?;
        self.send_line(&json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }))
            .await?;
        let tools = self.request("tools/list", json!({})).await?;
        let listed = rpc_result(&tools)?["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == json!(self.tool)));
        if !listed {
            return Err(format!("tools/list does not list {:?}", self.tool));
        }
        Ok(())
    }

    async fn call(&self, seq: u64) -> Result<(), String> {
        let msg = format!("m{seq}");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let answer = self
            .request_with_id(id, echo_call(id, &self.tool, "message", &msg))
            .await?;
        check_echo(&answer, &msg)
    }
}

/// Hands each answer on the child's stdout to its caller; answers the child's own requests
/// (`ping` with `{}`, anything else with method-not-found) so that nothing waits on us.
async fn read_answers(conn: Arc<StdioConn>, stdout: ChildStdout) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v.get("result").is_some() || v.get("error").is_some() {
            let waiter = v["id"].as_u64().and_then(|id| {
                conn.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id)
            });
            if let Some(tx) = waiter {
                let _ = tx.send(v);
            }
        } else if v.get("method").is_some() && v.get("id").is_some() {
            let answer = if v["method"] == json!("ping") {
                json!({ "jsonrpc": "2.0", "id": v["id"], "result": {} })
            } else {
                json!({ "jsonrpc": "2.0", "id": v["id"],
                        "error": { "code": -32601, "message": "mcp-bench answers no requests" } })
            };
            let _ = conn.send_line(&answer).await;
        }
    }
    conn.open.store(false, Ordering::Relaxed);
    // Dropping the senders fails every call still waiting.
    conn.pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
}

/// Where the clients of a level go: each its own HTTP session (client `i` at
/// `targets[i % len]`), or all of them through one stdio session.
#[derive(Clone)]
enum Endpoints {
    Http(Vec<HttpTarget>),
    Stdio(Arc<StdioConn>),
}

enum Client {
    /// Boxed: a session is large beside a shared stdio connection.
    Http(Box<HttpSession>),
    Stdio(Arc<StdioConn>),
}

impl Client {
    async fn open(ep: &Endpoints, i: usize) -> Result<Client, String> {
        match ep {
            Endpoints::Stdio(conn) => Ok(Client::Stdio(conn.clone())),
            Endpoints::Http(targets) => {
                let target = &targets[i % targets.len()];
                let mut last = String::new();
                for _ in 0..3 {
                    match HttpSession::open(target).await {
                        Ok(s) => return Ok(Client::Http(Box::new(s))),
                        Err(e) => last = format!("{}: opening a session: {e}", target.url),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(last)
            }
        }
    }

    async fn call(&mut self, seq: u64) -> Result<(), String> {
        match self {
            Client::Http(s) => s.call(seq).await,
            Client::Stdio(c) => c.call(seq).await,
        }
    }

    async fn close(self) {
        if let Client::Http(s) = self {
            s.close().await;
        }
    }
}

/// What one client saw during a level.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: u64,
    samples: Vec<String>,
}

fn keep_sample(samples: &mut Vec<String>, s: String) {
    if samples.len() < ERROR_SAMPLES && !samples.contains(&s) {
        samples.push(s);
    }
}

/// `clients` clients calling echo for a warm-up and then `args.seconds` (or `args.max_calls`
/// calls). With `watched` (a process id), the row also says that process's CPU time per
/// call issued (warm-up included).
async fn run_level(
    section: &'static str,
    system: &str,
    ep: &Endpoints,
    clients: u32,
    args: &Args,
    watched: Option<u32>,
) -> Row {
    eprintln!(
        "{section}: {system}: {clients} client(s) for {} s ...",
        args.seconds
    );
    let load1 = load_average().map(|l| l.0).unwrap_or(-1.0);
    let mut errors = 0u64;
    let mut samples = Vec::new();
    // Sessions first, untimed.
    let opening: Vec<_> = (0..clients as usize)
        .map(|i| {
            let ep = ep.clone();
            tokio::spawn(async move { Client::open(&ep, i).await })
        })
        .collect();
    let mut opened = Vec::new();
    for t in opening {
        match t.await {
            Ok(Ok(c)) => opened.push(c),
            Ok(Err(e)) => {
                errors += 1;
                keep_sample(&mut samples, e);
            }
            Err(e) => {
                errors += 1;
                keep_sample(&mut samples, format!("client task failed: {e}"));
            }
        }
    }
    let warmup = MAX_WARMUP.min(Duration::from_secs(args.seconds) / 5);
    let cpu_at_start = watched.and_then(cpu_time);
    let started = Instant::now();
    let measured_from = started + warmup;
    let end = measured_from + Duration::from_secs(args.seconds);
    let issued = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let max_calls = args.max_calls;
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|mut client| {
            let (issued, seq) = (issued.clone(), seq.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                loop {
                    let t0 = Instant::now();
                    let counted = t0 >= measured_from;
                    if t0 >= end || (counted && issued.fetch_add(1, Ordering::Relaxed) >= max_calls)
                    {
                        break;
                    }
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let r = client.call(n).await;
                    let dt = t0.elapsed();
                    match r {
                        Ok(()) if counted => tally.latencies.push(dt),
                        Ok(()) => {}
                        Err(e) => {
                            if counted {
                                tally.errors += 1;
                                keep_sample(&mut tally.samples, e);
                            }
                            tokio::time::sleep(ERROR_PAUSE).await;
                        }
                    }
                }
                (tally, client)
            })
        })
        .collect();
    // The clients run their warm-up meanwhile.
    tokio::time::sleep_until(measured_from.into()).await;
    let acks_at_start = delayed_acks();
    let mut latencies = Vec::new();
    let mut done = Vec::new();
    for t in tasks {
        match t.await {
            Ok((tally, client)) => {
                latencies.extend(tally.latencies);
                errors += tally.errors;
                for s in tally.samples {
                    keep_sample(&mut samples, s);
                }
                done.push(client);
            }
            Err(e) => {
                errors += 1;
                keep_sample(&mut samples, format!("client task failed: {e}"));
            }
        }
    }
    let elapsed = measured_from.elapsed();
    let issued_calls = seq.load(Ordering::Relaxed);
    let cpu_per_call = cpu_at_start
        .zip(watched.and_then(cpu_time))
        .filter(|_| issued_calls > 0)
        .map(|(a, b)| b.saturating_sub(a).div_f64(issued_calls as f64));
    let delayed_acks = acks_at_start
        .zip(delayed_acks())
        .map(|(a, b)| b.saturating_sub(a));
    let closing: Vec<_> = done.into_iter().map(|c| tokio::spawn(c.close())).collect();
    for c in closing {
        let _ = c.await;
    }
    for s in &samples {
        eprintln!("  {system} error: {s}");
    }
    latencies.sort_unstable();
    let row = Row {
        section,
        system: system.to_string(),
        clients,
        calls: latencies.len() as u64,
        errors,
        elapsed,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied(),
        load1,
        delayed_acks,
        cpu_per_call,
        samples,
        rate: true,
    };
    eprintln!(
        "{section}: {system}: {clients} client(s): {} calls ({:.0}/s), {} errors, p50 {:?} ms",
        row.calls,
        row.calls_per_s(),
        row.errors,
        ms3(row.p50)
    );
    row
}

async fn run_levels(
    section: &'static str,
    system: &str,
    ep: &Endpoints,
    args: &Args,
    report: &mut Report,
) {
    for clients in LEVELS {
        let row = run_level(section, system, ep, clients, args, None).await;
        report.rows.push(row);
    }
}

// === processes ===

/// A process this benchmark started, in its own process group. Dropping it kills the group;
/// [`Proc::stop`] asks first (SIGTERM), then kills what is left.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr to `log` unless the caller piped them.
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        cmd.process_group(0).kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.as_std().get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    fn log_files(log: &Path) -> anyhow::Result<(Stdio, Stdio)> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("log handle")?;
        Ok((Stdio::from(out), Stdio::from(err)))
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    fn signal_group(&self, sig: rustix::process::Signal) {
        if let Some(pid) = self
            .pid()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, sig);
        }
    }

    /// Whether it has exited (with what).
    fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                eprintln!("{}: no exit 5 s after SIGTERM; killing it", self.name);
            }
            // Whatever of its group is left (children that ignored the TERM).
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = child.kill().await;
    }

    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal_group(rustix::process::Signal::KILL);
            if let Some(c) = self.child.as_mut() {
                let _ = c.start_kill();
            }
        }
    }
}

/// A free loopback port (bound, then released).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Polls until a session opens at `target` and an echo call through it succeeds.
async fn wait_callable(
    target: &HttpTarget,
    within: Duration,
    mut proc: Option<&mut Proc>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut last;
    loop {
        if let Some(status) = proc.as_mut().and_then(|p| p.exited()) {
            bail!("exited at start-up with {status}");
        }
        let attempt = async {
            let mut s = HttpSession::open(target).await?;
            let r = s.call(u64::MAX).await;
            s.close().await;
            r
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        if Instant::now() > deadline {
            bail!(
                "{} answered no echo call within {within:?}; last error: {last}",
                target.url
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts `cmd` as a child speaking MCP on stdio and opens its session.
async fn start_stdio(
    name: &str,
    mut cmd: Command,
    log: &Path,
    tool: &str,
    timeout: Duration,
) -> anyhow::Result<(Proc, Arc<StdioConn>)> {
    let err = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err));
    let mut proc = Proc::spawn(name, &mut cmd, log)?;
    let child = proc.child.as_mut().context("child")?;
    let stdin = child.stdin.take().context("stdin")?;
    let stdout = child.stdout.take().context("stdout")?;
    let conn = StdioConn::start(stdin, stdout, tool, timeout);
    let init = tokio::time::timeout(READY_WITHIN, conn.initialize()).await;
    match init {
        Ok(Ok(())) => Ok((proc, conn)),
        Ok(Err(e)) => bail!("{name}: {e}; its log ends with:\n{}", proc.tail(20)),
        Err(_) => bail!("{name}: no session within {READY_WITHIN:?}"),
    }
}

// === tools ===

/// The repository root, when this binary runs from its `target/<profile>/`.
fn repo_root() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let root = exe.parent()?.parent()?.parent()?.to_path_buf();
    root.join("Cargo.toml").is_file().then_some(root)
}

/// `$VAR`, else `<repo>/.tools/<local>`, else `name` on `PATH`.
fn find_tool(var: &str, local: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = repo_root().map(|r| r.join(".tools").join(local)) {
        if p.is_file() {
            return Some(p);
        }
    }
    find_on_path(name)
}

// === section: data ===

async fn bench_floor(
    mcpd: &Path,
    logs: &Path,
    args: &Args,
    report: &mut Report,
) -> anyhow::Result<(Proc, Arc<StdioConn>)> {
    let mut cmd = Command::new(mcpd);
    cmd.arg("demo-server").env("RUST_LOG", "warn");
    let (proc, conn) = start_stdio(
        "demo-server",
        cmd,
        &logs.join("demo-server.log"),
        "echo",
        REQUEST_TIMEOUT,
    )
    .await?;
    run_levels(
        "data",
        FLOOR_SYSTEM,
        &Endpoints::Stdio(conn.clone()),
        args,
        report,
    )
    .await;
    // Kept for the 1-client floor measured again next to each pool.
    Ok((proc, conn))
}

/// The 1-client floor measured again right before pool `pool`: on a shared machine, the
/// comparison is only fair between figures taken at about the same time.
fn floor_next_to(pool: u32) -> String {
    format!("demo-server stdio (floor, again next to pool={pool})")
}

/// A peer gateway to start: its name in the table and its command line for a port.
struct Peer {
    system: String,
    bin: PathBuf,
    args: Vec<String>,
}

async fn bench_peer(
    peer: &Peer,
    port: u16,
    logs: &Path,
    args: &Args,
    report: &mut Report,
) -> anyhow::Result<()> {
    let log = logs.join(format!("peer-{port}.log"));
    let (out, err) = Proc::log_files(&log)?;
    let mut cmd = Command::new(&peer.bin);
    cmd.args(&peer.args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    eprintln!("data: starting {} on port {port}", peer.system);
    let mut proc = Proc::spawn(&peer.system, &mut cmd, &log)?;
    let target = HttpTarget::demo(format!("http://127.0.0.1:{port}/mcp"), None, "echo");
    if let Err(e) = wait_callable(&target, READY_WITHIN, Some(&mut proc)).await {
        let tail = proc.tail(20);
        proc.stop().await;
        bail!("{e:#}; its log ends with:\n{tail}");
    }
    run_levels(
        "data",
        &peer.system,
        &Endpoints::Http(vec![target]),
        args,
        report,
    )
    .await;
    let exited = proc.exited();
    proc.stop().await;
    if let Some(status) = exited {
        report.note(
            "data",
            format!(
                "{} exited during its run ({status}); log:\n{}",
                peer.system,
                proc.tail(20)
            ),
        );
    } else if report
        .rows
        .iter()
        .any(|r| r.system == peer.system && r.errors > 0)
    {
        let tail = proc.tail(10);
        if !tail.trim().is_empty() {
            report.note(
                "data",
                format!("{} had errors; its log ends with:\n{tail}", peer.system),
            );
        }
    }
    Ok(())
}

fn peers(mcpd: &Path, report: &mut Report) -> Vec<(Peer, u16)> {
    let mut out = Vec::new();
    let server = format!("{} demo-server", mcpd.display());
    match find_tool("MCP_PROXY_BIN", "mcp-proxy/bin/mcp-proxy", "mcp-proxy") {
        Some(bin) => match free_port() {
            Ok(port) => {
                let version = tool_version(&bin);
                let version = version.strip_prefix("mcp-proxy ").unwrap_or(&version);
                out.push((
                    Peer {
                        system: format!("mcp-proxy {version}"),
                        // WARNING: at INFO it logs a line per request.
                        args: vec![
                            "--log-level".into(),
                            "WARNING".into(),
                            "--host".into(),
                            "127.0.0.1".into(),
                            "--port".into(),
                            port.to_string(),
                            "--".into(),
                            mcpd.display().to_string(),
                            "demo-server".into(),
                        ],
                        bin,
                    },
                    port,
                ))
            }
            Err(e) => report.note("data", format!("mcp-proxy skipped: {e:#}")),
        },
        None => report.note(
            "data",
            "mcp-proxy skipped: not installed (scripts/bench-mcp.sh installs it in .tools/)",
        ),
    }
    match find_tool(
        "SUPERGATEWAY_BIN",
        "supergateway/node_modules/.bin/supergateway",
        "supergateway",
    ) {
        Some(bin) => {
            let version = tool_version(&bin);
            // Stateful: a child process per session. Stateless (its default): a child per
            // request. Logging off: at info it logs every message.
            for stateful in [true, false] {
                let Ok(port) = free_port() else { continue };
                let mut a = vec![
                    "--stdio".to_string(),
                    server.clone(),
                    "--outputTransport".into(),
                    "streamableHttp".into(),
                    "--port".into(),
                    port.to_string(),
                    "--logLevel".into(),
                    "none".into(),
                ];
                if stateful {
                    a.push("--stateful".into());
                }
                out.push((
                    Peer {
                        system: format!(
                            "supergateway {version} {}",
                            if stateful { "--stateful" } else { "stateless" }
                        ),
                        bin: bin.clone(),
                        args: a,
                    },
                    port,
                ));
            }
        }
        None => report.note(
            "data",
            "supergateway skipped: not installed (scripts/bench-mcp.sh installs it in .tools/)",
        ),
    }
    out
}

/// The pool figures on node 1 of the cluster: `pool_size` 2, then 4.
async fn bench_pools(
    http: &reqwest::Client,
    mcp: &Mcp,
    floor: Option<&Arc<StdioConn>>,
    args: &Args,
    report: &mut Report,
) -> anyhow::Result<()> {
    let base = mcp.cluster.url(mcp.ids[0]);
    let target = HttpTarget::demo(
        format!("{base}/servers/demo/mcp"),
        Some(mcp.token.clone()),
        "echo",
    );
    for pool in POOL_SIZES {
        if pool != mcp.demo_pool_size() {
            let patch: ServerPatch = serde_json::from_value(json!({ "pool_size": pool }))?;
            mcp.admin
                .patch_server("demo", &patch, &CallOptions::default())
                .await
                .context("patching demo's pool_size")?;
            mcp.demo_pool.store(pool.into(), Ordering::Relaxed);
        }
        let token = &mcp.cluster.admin_token;
        wait_pool_ready(http, &base, token, "demo", pool, READY_WITHIN).await?;
        wait_callable(&target, READY_WITHIN, None).await?;
        if let Some(conn) = floor {
            let row = run_level(
                "data",
                &floor_next_to(pool),
                &Endpoints::Stdio(conn.clone()),
                1,
                args,
                None,
            )
            .await;
            report.rows.push(row);
        }
        let system = pool_system(pool);
        run_levels(
            "data",
            &system,
            &Endpoints::Http(vec![target.clone()]),
            args,
            report,
        )
        .await;
    }
    // Where the time above the floor goes: the same session's `ping`, which the node answers
    // without the pool (HTTP, auth, session lookup and this client's own cost).
    let ping = HttpTarget {
        tool: String::new(),
        ..target
    };
    let row = run_level(
        "data",
        PING_SYSTEM,
        &Endpoints::Http(vec![ping]),
        1,
        args,
        None,
    )
    .await;
    report.rows.push(row);
    Ok(())
}

/// Ready processes of `server`'s pool on the node at `base`, from its metrics.
/// Ready processes of `server` on the node at `base`, from its `/metrics` (read with `token`).
async fn pool_ready(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    server: &str,
) -> Result<u64, String> {
    let text = http
        .get(format!("{base}/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| root_cause(&e))?
        .text()
        .await
        .map_err(|e| root_cause(&e))?;
    let want_server = format!("server=\"{server}\"");
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("mcpd_pool_processes{")
                && l.contains(&want_server)
                && l.contains("state=\"ready\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        .max(0.0) as u64)
}

async fn wait_pool_ready(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    server: &str,
    n: u32,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let r = pool_ready(http, base, token, server).await;
        if r == Ok(u64::from(n)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{base}: the pool of {server} did not have {n} ready processes within {within:?} (last: {r:?})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pool_system(pool: u32) -> String {
    format!("mcpd pool={pool} /servers/demo/mcp")
}

/// The p50 of the 1-client floor taken next to pool `pool`, else the first one.
fn floor_p50(report: &Report, pool: u32) -> Option<Duration> {
    report
        .row("data", &floor_next_to(pool), 1)
        .or_else(|| report.row("data", FLOOR_SYSTEM, 1))
        .and_then(|r| r.p50)
}

fn data_goals(report: &mut Report) {
    let floor = FLOOR_SYSTEM;
    let mut goals = Vec::new();
    for pool in POOL_SIZES {
        let system = pool_system(pool);
        let floor_p50 = floor_p50(report, pool);
        let p50 = report.row("data", &system, 1).and_then(|r| r.p50);
        goals.push(Goal::p50_over(
            "data",
            format!(
                "1 client: p50 at most {:.0} µs above the direct-stdio floor",
                GOAL_DATA_P50_OVER_FLOOR_MS * 1e3
            ),
            (&format!("{system}:"), p50),
            ("floor measured next to it", floor_p50),
            GOAL_DATA_P50_OVER_FLOOR_MS,
        ));
    }
    let best = |pred: &dyn Fn(&Row) -> bool| {
        report
            .rows
            .iter()
            .filter(|r| r.section == "data" && r.clients == 64 && pred(r))
            .max_by(|a, b| a.calls_per_s().total_cmp(&b.calls_per_s()))
            .cloned()
    };
    let best_mcpd = best(&|r| r.system.starts_with("mcpd pool="));
    let best_peer =
        best(&|r| !r.system.starts_with("mcpd ") && !r.system.starts_with("demo-server"));
    if let (Some(ping), Some(f)) = (
        report.row("data", PING_SYSTEM, 1).and_then(|r| r.p50),
        floor_p50(report, POOL_SIZES[POOL_SIZES.len() - 1]),
    ) {
        goals.push(Goal {
            section: "data",
            goal: "1 client: mcpd's own HTTP path without the server (information)".into(),
            measured: format!(
                "ping p50 {:.3} ms, {:+.3} ms from the stdio floor, before any pool work",
                ms(ping),
                ms(ping) - ms(f)
            ),
            met: None,
        });
    }
    let (measured, met) = match (&best_mcpd, &best_peer) {
        (Some(m), Some(p)) if p.calls_per_s() > 0.0 => {
            let factor = m.calls_per_s() / p.calls_per_s();
            (
                format!(
                    "{} {:.0}/s vs best peer {} {:.0}/s: {factor:.1}x",
                    m.system,
                    m.calls_per_s(),
                    p.system,
                    p.calls_per_s()
                ),
                Some(factor >= GOAL_DATA_PEER_FACTOR),
            )
        }
        (Some(m), _) => (
            format!("{} {:.0}/s; no peer figure", m.system, m.calls_per_s()),
            None,
        ),
        _ => ("no figure".into(), None),
    };
    goals.push(Goal {
        section: "data",
        goal: format!("64 clients: at least {GOAL_DATA_PEER_FACTOR:.0}x the best peer's calls/s"),
        measured,
        met,
    });
    if let (Some(m), Some(f)) = (&best_mcpd, report.row("data", floor, 64)) {
        goals.push(Goal {
            section: "data",
            goal: "64 clients: a pool exceeds one process's floor (information)".into(),
            measured: format!(
                "{} {:.0}/s vs floor {:.0}/s: {:.2}x",
                m.system,
                m.calls_per_s(),
                f.calls_per_s(),
                m.calls_per_s() / f.calls_per_s().max(f64::MIN_POSITIVE)
            ),
            met: None,
        });
    }
    report.goals.extend(goals);
}

// === the cluster ===

/// A 3-node cluster with tenant `bench`, its token, and the demo server registered.
struct Mcp {
    cluster: Cluster,
    admin: AdminClient,
    token: String,
    ids: Vec<u64>,
    mcpd: PathBuf,
    demo_pool: AtomicU64,
}

impl Mcp {
    async fn start(mcpd: &Path, plain_edge: bool) -> anyhow::Result<Mcp> {
        Self::start_with(mcpd, mcpd, plain_edge, &[]).await
    }

    /// A cluster of `node` (the demo server is `mcpd`'s), with extra flags.
    async fn start_with(
        node: &Path,
        mcpd: &Path,
        plain_edge: bool,
        extra: &[&str],
    ) -> anyhow::Result<Mcp> {
        let edge = if plain_edge { "plain HTTP" } else { "HTTPS" };
        eprintln!(
            "mcpd: starting 3 nodes ({}, edge {edge}, {extra:?})",
            node.display()
        );
        let mut args = extra.to_vec();
        if plain_edge {
            args.extend(["--api-tls", "off"]);
        }
        let cluster = Cluster::start_binary(node, 3, &args).await;
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        let admin = cluster.client();
        let no_opts = CallOptions::default();
        let tenant: TenantSpec =
            serde_json::from_value(json!({ "name": "bench", "description": "mcp-bench" }))?;
        admin
            .create_tenant(&tenant, &no_opts)
            .await
            .context("creating tenant bench")?;
        let req: CreateTokenRequest = serde_json::from_value(
            json!({ "name": "mcp-bench", "role": "tenant", "tenant": "bench" }),
        )?;
        let token = admin
            .create_token(&req)
            .await
            .context("creating a token of tenant bench")?
            .token;
        let mcp = Mcp {
            cluster,
            admin,
            token,
            ids,
            mcpd: mcpd.to_path_buf(),
            demo_pool: AtomicU64::new(2),
        };
        mcp.register("demo", 2, None).await?;
        Ok(mcp)
    }

    fn demo_pool_size(&self) -> u32 {
        self.demo_pool.load(Ordering::Relaxed) as u32
    }

    /// Registers the demo server as `name` (echo marked idempotent, as `mcpctl dev up` does).
    async fn register(&self, name: &str, pool: u32, replicas: Option<u32>) -> anyhow::Result<()> {
        let spec: ServerSpec = serde_json::from_value(json!({
            "name": name,
            "command": self.mcpd.to_string_lossy(),
            "args": ["demo-server"],
            "env": { "RUST_LOG": "warn" },
            "pool_size": pool,
            "replicas": replicas,
            "idempotent_tools": ["echo", "add"],
        }))?;
        self.admin
            .create_server(&spec, &CallOptions::default())
            .await
            .with_context(|| format!("registering server {name}"))?;
        Ok(())
    }

    fn url(&self, id: u64) -> String {
        self.cluster.url(id)
    }

    fn target(&self, id: u64, path: &str, tool: &str) -> HttpTarget {
        HttpTarget::demo(
            format!("{}{path}", self.url(id)),
            Some(self.token.clone()),
            tool,
        )
    }

    async fn stop(mut self) {
        for id in self.cluster.running_ids() {
            self.cluster.kill(id).await;
        }
    }
}

// === section: upstream ===

/// One upstream, called directly and through node 1 as a remote server.
struct UpstreamPair {
    /// Names it in the goals.
    upstream: &'static str,
    direct: &'static str,
    through: &'static str,
}

/// mcpd's own endpoint: a fast upstream, so node 1's share of the machine shows most.
const UPSTREAM_MCPD: UpstreamPair = UpstreamPair {
    upstream: "mcpd",
    direct: "direct: node 2 /servers/demo/mcp",
    through: "mcpd http upstream: node 1 -> node 2",
};

/// A server written with the Python SDK, as remote servers are.
const UPSTREAM_SDK: UpstreamPair = UpstreamPair {
    upstream: "Python SDK server",
    direct: "direct: Python SDK server",
    through: "mcpd http upstream: node 1 -> Python SDK server",
};

/// The key the Python SDK server asks every request for (`X-Api-Key`).
const SDK_SERVER_KEY: &str = "bench-key";

/// Node 2's `/servers/demo/mcp` directly, then through node 1 as a remote server; the same
/// for a Python SDK server (`tests/py/servers/remote_tools.py`, from the tests' `.venv`).
async fn bench_upstream(
    mcp: &Mcp,
    logs: &Path,
    args: &Args,
    report: &mut Report,
) -> anyhow::Result<()> {
    let direct = mcp.target(mcp.ids[1], "/servers/demo/mcp", "echo");
    wait_callable(&direct, READY_WITHIN, None).await?;
    let spec = json!({
        "name": "demo-remote",
        "url": direct.url,
        "headers": { "Authorization": format!("Bearer {}", mcp.token) },
        "ca_file": mcpcp_tests::test_ca_cert(),
    });
    bench_pair(mcp, &UPSTREAM_MCPD, direct, spec, args, report).await?;
    let (mut sdk, port) = start_sdk_server(logs)?;
    let direct = HttpTarget {
        url: format!("http://127.0.0.1:{port}/mcp"),
        token: None,
        tool: "echo".into(),
        argument: "text",
        headers: vec![("x-api-key", SDK_SERVER_KEY.into())],
        // The revision node 1 speaks to it: the SDK serves each era at its own cost.
        stateless: true,
    };
    if let Err(e) = wait_callable(&direct, READY_WITHIN, Some(&mut sdk)).await {
        let tail = sdk.tail(20);
        sdk.stop().await;
        bail!("the Python SDK server: {e:#}; its log ends with:\n{tail}");
    }
    let spec = json!({
        "name": "sdk-remote",
        "url": direct.url,
        "headers": { "X-Api-Key": SDK_SERVER_KEY },
    });
    let measured = bench_pair(mcp, &UPSTREAM_SDK, direct, spec, args, report).await;
    // Gone before its server is: the nodes would try to reach it through the next sections.
    let removed = mcp
        .admin
        .delete_server("sdk-remote", &CallOptions::default())
        .await;
    sdk.stop().await;
    measured?;
    removed.context("removing sdk-remote")?;
    Ok(())
}

/// Calls `direct` (callable already), then registers `spec` (a remote server) on the
/// cluster and calls it through node 1, at each level.
async fn bench_pair(
    mcp: &Mcp,
    pair: &UpstreamPair,
    direct: HttpTarget,
    mut spec: Value,
    args: &Args,
    report: &mut Report,
) -> anyhow::Result<()> {
    run_levels(
        "upstream",
        pair.direct,
        &Endpoints::Http(vec![direct.clone()]),
        args,
        report,
    )
    .await;
    spec["pool_size"] = json!(2);
    spec["idempotent_tools"] = json!([direct.tool]);
    let spec: ServerSpec = serde_json::from_value(spec)?;
    mcp.admin
        .create_server(&spec, &CallOptions::default())
        .await
        .with_context(|| format!("registering {}", spec.name))?;
    let path = format!("/servers/{}/mcp", spec.name);
    let through = HttpTarget {
        argument: direct.argument,
        stateless: direct.stateless,
        ..mcp.target(mcp.ids[0], &path, &direct.tool)
    };
    wait_callable(&through, READY_WITHIN, None).await?;
    run_levels(
        "upstream",
        pair.through,
        &Endpoints::Http(vec![through]),
        args,
        report,
    )
    .await;
    Ok(())
}

/// Starts the tests' Python SDK server (plain HTTP, both eras) on a free port.
fn start_sdk_server(logs: &Path) -> anyhow::Result<(Proc, u16)> {
    let root = repo_root().context("not run from the repository's target/")?;
    let python = root.join(".venv/bin/python");
    anyhow::ensure!(
        python.is_file(),
        "no {} (scripts/test.sh makes it)",
        python.display()
    );
    let port = free_port()?;
    let log = logs.join("sdk-server.log");
    let (out, err) = Proc::log_files(&log)?;
    let mut cmd = Command::new(python);
    cmd.arg(root.join("tests/py/servers/remote_tools.py"))
        .arg(port.to_string())
        .arg(SDK_SERVER_KEY)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    eprintln!("upstream: starting the Python SDK server on port {port}");
    Ok((Proc::spawn("python-sdk-server", &mut cmd, &log)?, port))
}

/// The goals, against each upstream: the added p50 at 1 client, the calls/s ratio at 64.
fn upstream_goals(report: &mut Report) {
    for pair in [&UPSTREAM_MCPD, &UPSTREAM_SDK] {
        let row = |system: &str, clients: u32| report.row("upstream", system, clients).cloned();
        let p50 = |system: &str| row(system, 1).and_then(|r| r.p50);
        let goal_p50 = Goal::p50_over(
            "upstream",
            format!(
                "{}: 1 client: p50 at most {:.0} µs above calling the upstream directly",
                pair.upstream,
                GOAL_UPSTREAM_P50_ADDED_MS * 1e3
            ),
            ("through", p50(pair.through)),
            ("direct", p50(pair.direct)),
            GOAL_UPSTREAM_P50_ADDED_MS,
        );
        let rate = |system: &str| row(system, 64).map(|r| r.calls_per_s());
        let goal_rate = Goal::rate_at_least(
            "upstream",
            format!(
                "{}: 64 clients: at least {GOAL_UPSTREAM_FACTOR:.1}x the calls/s of calling the upstream directly",
                pair.upstream
            ),
            ("through", rate(pair.through)),
            ("direct", rate(pair.direct)),
            GOAL_UPSTREAM_FACTOR,
        );
        report.goals.push(goal_p50);
        report.goals.push(goal_rate);
    }
}

// === section: identity ===

const IDENTITY_API_KEY: &str = "api key, no policy";
const IDENTITY_JWT_ONLY: &str = "jwt, no policy";
const IDENTITY_JWT: &str = "jwt, 100 rules (cel)";
const IDENTITY_JWT_PLAIN: &str = "jwt, 100 rules (no cel)";

/// An API key with no policy, then a JWT with 100 rules, on node 1's `/servers/demo/mcp`.
async fn bench_identity(mcp: &Mcp, args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let key = mcp.target(mcp.ids[0], "/servers/demo/mcp", "echo");
    wait_callable(&key, READY_WITHIN, None).await?;
    let key_rows = Endpoints::Http(vec![key.clone()]);
    run_levels("identity", IDENTITY_API_KEY, &key_rows, args, report).await;

    let issuer = mcpcp_tests::bench_issuer::BenchIssuer::start()?;
    let spec: IssuerSpec = serde_json::from_value(json!({
        "name": "bench-idp",
        "issuer": issuer.issuer,
        "jwks_url": issuer.jwks_url,
        "algorithms": ["ES256"],
        "tenant": "bench",
    }))?;
    let none = CallOptions::default();
    mcp.admin
        .create_issuer(&spec, &none)
        .await
        .context("trusting the bench issuer")?;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let token = issuer.token(json!({
        "sub": "bench-user", "aud": key.url, "exp": exp, "scope": "mcp",
    }))?;
    let jwt = HttpTarget {
        token: Some(token),
        ..key
    };
    wait_callable(&jwt, READY_WITHIN, None).await?;
    let jwt_rows = Endpoints::Http(vec![jwt]);
    run_levels("identity", IDENTITY_JWT_ONLY, &jwt_rows, args, report).await;
    // 99 rules that do not match the call, then the one that does, with a condition.
    for i in 0..100u32 {
        let rule: PolicySpec = serde_json::from_value(if i < 99 {
            json!({ "name": format!("bench-{i:03}"), "order": i, "effect": "deny",
                    "targets": [format!("tool:other{i}__*")], "tenants": ["bench"] })
        } else {
            json!({ "name": "bench-echo", "order": i, "effect": "allow",
                    "targets": ["tool:demo__echo"], "tenants": ["bench"],
                    "condition": "size(args.message) > 0 && principal.tenant == \"bench\"" })
        })?;
        mcp.admin
            .put_policy(&rule, &none)
            .await
            .with_context(|| format!("adding rule {}", rule.name))?;
    }
    run_levels("identity", IDENTITY_JWT, &jwt_rows, args, report).await;
    // The same rules with the last one's condition taken away: what the CEL costs.
    let plain: PolicySpec = serde_json::from_value(json!({
        "name": "bench-echo", "order": 99, "effect": "allow",
        "targets": ["tool:demo__echo"], "tenants": ["bench"],
    }))?;
    mcp.admin
        .put_policy(&plain, &none)
        .await
        .context("dropping the condition")?;
    run_levels("identity", IDENTITY_JWT_PLAIN, &jwt_rows, args, report).await;
    Ok(())
}

fn identity_goals(report: &mut Report) {
    let row = |system: &str, clients: u32| report.row("identity", system, clients).cloned();
    let p50 = |system: &str| row(system, 1).and_then(|r| r.p50);
    let added = match (p50(IDENTITY_JWT), p50(IDENTITY_API_KEY)) {
        (Some(j), Some(k)) => Some((ms(j), ms(k), ms(j) - ms(k))),
        _ => None,
    };
    let goal_p50 = Goal {
        section: "identity",
        goal: format!(
            "1 client: JWT and 100 rules add at most {:.0} µs p50 to an API key with no policy",
            GOAL_IDENTITY_P50_ADDED_MS * 1e3
        ),
        measured: added
            .map(|(j, k, a)| format!("jwt {j:.3} ms, api key {k:.3} ms: {:+.0} µs", a * 1e3))
            .unwrap_or_else(|| "no figure".into()),
        met: added.map(|(_, _, a)| a <= GOAL_IDENTITY_P50_ADDED_MS),
    };
    let rate = |system: &str| row(system, 64).map(|r| r.calls_per_s());
    let goal_rate = Goal::rate_at_least(
        "identity",
        format!(
            "64 clients: with JWT and 100 rules at least {GOAL_IDENTITY_FACTOR:.2}x the calls/s of an API key"
        ),
        ("jwt", rate(IDENTITY_JWT)),
        ("api key", rate(IDENTITY_API_KEY)),
        GOAL_IDENTITY_FACTOR,
    );
    report.goals.push(goal_p50);
    report.goals.push(goal_rate);
}

// === section: limits ===

const LIMITS_NONE: &str = "no limit";
const LIMITS_ON: &str = "rate + quota + slots on every call";
const LIMITS_NONE_AGAIN: &str = "no limit, again";

/// Node 1's `/servers/demo/mcp` with no limit, then with a rate limit, a daily quota and a
/// concurrency limit that match every call (too high to refuse any), then with none again: the two runs without
/// bracket the one with, so that drift of the machine shows. Fair queueing is always on.
async fn bench_limits(mcp: &Mcp, args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let target = mcp.target(mcp.ids[0], "/servers/demo/mcp", "echo");
    wait_callable(&target, READY_WITHIN, None).await?;
    let rows = Endpoints::Http(vec![target]);
    run_levels("limits", LIMITS_NONE, &rows, args, report).await;
    let limit: LimitSpec = serde_json::from_value(json!({
        "name": "bench-every-call",
        "rate": { "per_second": 1_000_000, "burst": 1_000_000 },
        "quota": { "calls": 1_000_000_000_000u64, "period": "day" },
        "concurrency": 1_000_000,
    }))?;
    let none = CallOptions::default();
    mcp.admin
        .put_limit(&limit, &none)
        .await
        .context("setting the limit")?;
    // Every node has applied it once the leader's read barrier passed on node 1.
    mcp.admin.limits().await.context("reading the limits")?;
    run_levels("limits", LIMITS_ON, &rows, args, report).await;
    mcp.admin
        .delete_limit("bench-every-call", &none)
        .await
        .context("removing the limit")?;
    run_levels("limits", LIMITS_NONE_AGAIN, &rows, args, report).await;
    Ok(())
}

fn limits_goals(report: &mut Report) {
    let row = |system: &str, clients: u32| report.row("limits", system, clients).cloned();
    let both = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        (a, b) => a.or(b),
    };
    let p50 = |system: &str| row(system, 1).and_then(|r| r.p50).map(ms);
    let base_p50 = both(p50(LIMITS_NONE), p50(LIMITS_NONE_AGAIN));
    let added = base_p50.zip(p50(LIMITS_ON)).map(|(b, l)| (l, b, l - b));
    let goal_p50 = Goal {
        section: "limits",
        goal: format!(
            "1 client: a rate limit, a quota and a concurrency limit on every call add at most {:.0} µs p50",
            GOAL_LIMITS_P50_ADDED_MS * 1e3
        ),
        measured: added
            .map(|(l, b, a)| format!("limited {l:.3} ms, none {b:.3} ms (mean of the runs before and after): {:+.0} µs", a * 1e3))
            .unwrap_or_else(|| "no figure".into()),
        met: added.map(|(_, _, a)| a <= GOAL_LIMITS_P50_ADDED_MS),
    };
    let rate = |system: &str| row(system, 64).map(|r| r.calls_per_s());
    let goal_rate = Goal::rate_at_least(
        "limits",
        format!("64 clients: with the limit at least {GOAL_LIMITS_FACTOR:.2}x the calls/s without"),
        ("limited", rate(LIMITS_ON)),
        ("none", both(rate(LIMITS_NONE), rate(LIMITS_NONE_AGAIN))),
        GOAL_LIMITS_FACTOR,
    );
    report.goals.push(goal_p50);
    report.goals.push(goal_rate);
}

// === section: tracing ===

const TRACING_BEFORE: &str = "before tracing (--baseline-mcpd)";
const TRACING_OFF: &str = "tracing off";
const TRACING_ON: &str = "tracing on: every call sampled, exported";
const TRACING_OFF_AGAIN: &str = "tracing off, again";
/// The 1-client level again, off then on, this many times: the goal is judged on the median
/// of the rounds' differences, as one on-level between two off-levels moves by tens of µs
/// with the machine's load.
const TRACING_ROUNDS: u32 = 5;

fn tracing_round(on: bool, round: u32) -> String {
    let system = if on { TRACING_ON } else { TRACING_OFF };
    format!("{system} (round {round})")
}

/// Node 1's `/servers/demo/mcp` (local pool: the spans of the edge, policy, route, attempt,
/// queue and upstream call) on the cluster without tracing, on a second cluster of the same
/// build exporting every call's spans to an OTLP sink in this process, then on the first
/// again; with `--baseline-mcpd`, first on a cluster of that build too.
async fn bench_tracing(mcp: &Mcp, args: &Args, report: &mut Report) -> anyhow::Result<()> {
    let http = |m: &Mcp| Endpoints::Http(vec![m.target(m.ids[0], "/servers/demo/mcp", "echo")]);
    if let Some(baseline) = &args.baseline_mcpd {
        let before = Mcp::start_with(baseline, &mcp.mcpd, args.plain_edge, &[]).await?;
        wait_callable(
            &before.target(before.ids[0], "/servers/demo/mcp", "echo"),
            READY_WITHIN,
            None,
        )
        .await?;
        run_levels("tracing", TRACING_BEFORE, &http(&before), args, report).await;
        before.stop().await;
    }
    let sink = mcpcp_tests::otlp::OtlpSink::start().await?;
    let endpoint = sink.endpoint.clone();
    let traced = Mcp::start_with(
        &mcp.mcpd,
        &mcp.mcpd,
        args.plain_edge,
        &["--otlp-endpoint", &endpoint],
    )
    .await?;
    for m in [mcp, &traced] {
        wait_callable(
            &m.target(m.ids[0], "/servers/demo/mcp", "echo"),
            READY_WITHIN,
            None,
        )
        .await?;
    }
    run_levels("tracing", TRACING_OFF, &http(mcp), args, report).await;
    let spans_before = sink.spans();
    run_levels("tracing", TRACING_ON, &http(&traced), args, report).await;
    run_levels("tracing", TRACING_OFF_AGAIN, &http(mcp), args, report).await;
    for round in 1..=TRACING_ROUNDS {
        for (on, m) in [(false, mcp), (true, &traced)] {
            let node1 = m.cluster.nodes.get(&m.ids[0]).and_then(|n| n.pid());
            let system = tracing_round(on, round);
            let row = run_level("tracing", &system, &http(m), 1, args, node1).await;
            report.rows.push(row);
        }
    }
    let calls: u64 = report
        .rows
        .iter()
        .filter(|r| r.section == "tracing" && r.system.starts_with(TRACING_ON))
        .map(|r| r.calls + r.errors)
        .sum();
    // The last batches leave within the export delay (1 s): wait until the count holds still
    // for longer than that.
    let mut received = sink.spans();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = sink.spans();
        if now == received {
            break;
        }
        received = now;
    }
    report.note(
        "tracing",
        format!(
            "the sink (in this process, so its work loads the load generator's CPU too) received {} spans during the traced levels' {calls} measured calls (and their warm-ups): {:.1} per call",
            received - spans_before,
            (received - spans_before) as f64 / calls.max(1) as f64
        ),
    );
    traced.stop().await;
    Ok(())
}

/// A figure of the alternating rounds' rows, tracing on or off, round by round.
fn round_figures(
    report: &Report,
    on: bool,
    figure: &impl Fn(&Row) -> Option<f64>,
) -> Vec<Option<f64>> {
    (1..=TRACING_ROUNDS)
        .map(|k| figure(report.row("tracing", &tracing_round(on, k), 1)?))
        .collect()
}

/// The alternating rounds' differences (on minus off) of a figure of their rows, sorted.
fn round_differences(report: &Report, figure: impl Fn(&Row) -> Option<f64>) -> Vec<f64> {
    let (on, off) = (
        round_figures(report, true, &figure),
        round_figures(report, false, &figure),
    );
    sorted(
        on.into_iter()
            .zip(off)
            .filter_map(|(on, off)| Some(on? - off?)),
    )
}

fn sorted(figures: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = figures.collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The median of sorted figures (the upper one of an even count).
fn median(sorted: &[f64]) -> Option<f64> {
    sorted.get(sorted.len() / 2).copied()
}

fn tracing_goals(report: &mut Report) {
    let row = |system: &str, clients: u32| report.row("tracing", system, clients).cloned();
    let p50 = |system: &str| row(system, 1).and_then(|r| r.p50).map(ms);
    let off = match (p50(TRACING_OFF), p50(TRACING_OFF_AGAIN)) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        (a, b) => a.or(b),
    };
    let added = off.zip(p50(TRACING_ON)).map(|(b, t)| (t, b, t - b));
    let before = p50(TRACING_BEFORE);
    // The rounds, off then on: the median of their differences is the figure.
    let rounds = round_differences(report, |r| r.p50.map(ms));
    let median_added = median(&rounds);
    // Node 1's CPU per call in the same rounds: steadier than a latency on a shared machine,
    // and it counts the exporter's thread too.
    let cpu_us = |r: &Row| r.cpu_per_call.map(|d| d.as_secs_f64() * 1e6);
    let cpu = round_differences(report, cpu_us);
    let cpu_goal = median(&cpu).map(|added| {
        let side = |on: bool| {
            let figures = round_figures(report, on, &cpu_us);
            median(&sorted(figures.into_iter().flatten())).unwrap_or(f64::NAN)
        };
        Goal {
            section: "tracing",
            goal: "1 client: node 1's CPU per call (all its threads), tracing on against off"
                .into(),
            measured: format!(
                "median of the rounds' differences {added:+.1} µs (off {:.1} µs, on {:.1} µs per call, medians; differences, sorted: {})",
                side(false),
                side(true),
                cpu.iter()
                    .map(|d| format!("{d:+.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            met: None,
        }
    });
    let sandwich = added
        .map(|(t, b, a)| {
            format!(
                "; the levels above: on {t:.3} ms, off {b:.3} ms (mean of the runs before and after), {:+.0} µs",
                a * 1e3
            )
        })
        .unwrap_or_default();
    report.goals.push(Goal {
        section: "tracing",
        goal: format!(
            "1 client: tracing on (every call sampled and exported) adds at most {:.0} µs p50",
            GOAL_TRACING_ON_P50_ADDED_MS * 1e3
        ),
        measured: match median_added {
            Some(m) => format!(
                "median of {} alternating rounds (off, then on) {:+.0} µs (rounds, sorted: {}){sandwich}",
                rounds.len(),
                m * 1e3,
                rounds
                    .iter()
                    .map(|d| format!("{:+.0}", d * 1e3))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!("no figure{sandwich}"),
        },
        met: median_added.map(|m| m <= GOAL_TRACING_ON_P50_ADDED_MS),
    });
    report.goals.extend(cpu_goal);
    if let (Some(before), Some(off)) = (before, off) {
        report.goals.push(Goal {
            section: "tracing",
            goal: "1 client: tracing off costs nothing measurable next to the build before tracing"
                .into(),
            measured: format!(
                "off {off:.3} ms, before tracing {before:.3} ms: {:+.0} µs",
                (off - before) * 1e3
            ),
            met: None,
        });
    }
}

// === section: routing ===

/// The node(s) the leader placed `server` on, from `GET /v1/watch?since=0`.
async fn placement(
    http: &reqwest::Client,
    base: &str,
    admin_token: &str,
    server: &str,
) -> anyhow::Result<Vec<u64>> {
    let deadline = Instant::now() + READY_WITHIN;
    let mut resp = http
        .get(format!("{base}/v1/watch?since=0"))
        .bearer_auth(admin_token)
        .timeout(READY_WITHIN)
        .send()
        .await
        .context("GET /v1/watch")?;
    if !resp.status().is_success() {
        bail!("GET /v1/watch: HTTP {}", resp.status());
    }
    let mut buf = Vec::new();
    let mut found = None;
    while found.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => bail!("the watch stream ended before {server} was placed"),
            Ok(Err(e)) => bail!("reading the watch stream: {}", root_cause(&e)),
            Err(_) => bail!("{server} was not placed within {READY_WITHIN:?}"),
        };
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if ev["type"] == json!("put")
                && ev["kind"] == json!("placement")
                && ev["name"] == json!(server)
            {
                let nodes: Vec<u64> = ev["value"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                if !nodes.is_empty() {
                    found = Some(nodes);
                }
            }
        }
    }
    Ok(found.unwrap_or_default())
}

async fn bench_routing(
    http: &reqwest::Client,
    mcp: &Mcp,
    args: &Args,
    report: &mut Report,
) -> anyhow::Result<()> {
    mcp.register("solo", 2, Some(1)).await?;
    let placed = placement(http, &mcp.url(mcp.ids[0]), &mcp.cluster.admin_token, "solo").await?;
    let local = placed[0];
    let remote = *mcp
        .ids
        .iter()
        .find(|id| !placed.contains(id))
        .context("every node runs solo")?;
    eprintln!("routing: solo is placed on node {local}; forwarding from node {remote}");
    let path = "/servers/solo/mcp";
    let local_t = mcp.target(local, path, "echo");
    let remote_t = mcp.target(remote, path, "echo");
    let token = &mcp.cluster.admin_token;
    wait_pool_ready(http, &mcp.url(local), token, "solo", 2, READY_WITHIN).await?;
    wait_callable(&local_t, READY_WITHIN, None).await?;
    wait_callable(&remote_t, READY_WITHIN, None).await?;
    let local_name = format!("solo (replicas 1): local pool, node {local}");
    let remote_name = format!("solo (replicas 1): node {remote} -> node {local}");
    run_levels(
        "routing",
        &local_name,
        &Endpoints::Http(vec![local_t]),
        args,
        report,
    )
    .await;
    run_levels(
        "routing",
        &remote_name,
        &Endpoints::Http(vec![remote_t]),
        args,
        report,
    )
    .await;
    for (server, what) in [
        (
            "demo",
            format!("demo (pool={}, every node)", mcp.demo_pool_size()),
        ),
        ("solo", format!("solo (on node {local})")),
    ] {
        let targets: Vec<HttpTarget> = mcp
            .ids
            .iter()
            .map(|id| mcp.target(*id, &format!("/servers/{server}/mcp"), "echo"))
            .collect();
        for t in &targets {
            wait_callable(t, READY_WITHIN, None).await?;
        }
        let row = run_level(
            "routing",
            &format!("{what}: spread over 3 nodes"),
            &Endpoints::Http(targets),
            SPREAD_CLIENTS,
            args,
            None,
        )
        .await;
        report.rows.push(row);
    }
    let l = report.row("routing", &local_name, 1).and_then(|r| r.p50);
    let f = report.row("routing", &remote_name, 1).and_then(|r| r.p50);
    report.goals.push(Goal::p50_over(
        "routing",
        format!("a peer hop adds at most {GOAL_ROUTING_HOP_MS} ms p50"),
        ("1 client: forwarded", f),
        ("local", l),
        GOAL_ROUTING_HOP_MS,
    ));
    Ok(())
}

// === section: bridge ===

/// Starts `mcp-bridge` on every node's URL, with its stderr (log level `level`) in `log`, or
/// handed to `on_line` line by line when given.
async fn start_bridge(
    mcp: &Mcp,
    logs: &Path,
    name: &str,
    level: &str,
    timeout: Duration,
    on_line: Option<mpsc::UnboundedSender<String>>,
) -> anyhow::Result<(Proc, Arc<StdioConn>)> {
    let bin = mcpcp_tests::binary("mcp-bridge");
    let urls: Vec<String> = mcp.ids.iter().map(|id| mcp.url(*id)).collect();
    let mut cmd = Command::new(&bin);
    cmd.args(["--url", &urls.join(","), "--log-level", level])
        .env("MCP_BRIDGE_TOKEN", &mcp.token)
        .env("MCP_BRIDGE_CACERT", mcpcp_tests::test_ca_cert())
        .env_remove("RUST_LOG")
        .env_remove("MCP_BRIDGE_URL");
    let log = logs.join(format!("{name}.log"));
    let Some(lines) = on_line else {
        return start_stdio(name, cmd, &log, "demo__echo", timeout).await;
    };
    // Stderr through a pipe: each line to the log and to `lines`.
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut proc = Proc::spawn(name, &mut cmd, &log)?;
    let child = proc.child.as_mut().context("child")?;
    let stdin = child.stdin.take().context("stdin")?;
    let stdout = child.stdout.take().context("stdout")?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut file = tokio::fs::File::create(&log).await?;
    tokio::spawn(async move {
        let mut rd = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = rd.next_line().await {
            let _ = file.write_all(format!("{line}\n").as_bytes()).await;
            let _ = lines.send(line);
        }
        let _ = file.flush().await;
    });
    let conn = StdioConn::start(stdin, stdout, "demo__echo", timeout);
    match tokio::time::timeout(READY_WITHIN, conn.initialize()).await {
        Ok(Ok(())) => Ok((proc, conn)),
        Ok(Err(e)) => bail!("{name}: {e}; its log ends with:\n{}", proc.tail(20)),
        Err(_) => bail!("{name}: no session within {READY_WITHIN:?}"),
    }
}

async fn bench_bridge(
    http: &reqwest::Client,
    mcp: &mut Mcp,
    logs: &Path,
    args: &Args,
    report: &mut Report,
) -> anyhow::Result<()> {
    let first = mcp.ids[0];
    let direct = mcp.target(first, "/mcp", "demo__echo");
    for id in mcp.ids.clone() {
        wait_callable(&mcp.target(id, "/mcp", "demo__echo"), READY_WITHIN, None).await?;
    }
    let direct_name = format!("/mcp direct, node {first} (a session per client)");
    run_levels(
        "bridge",
        &direct_name,
        &Endpoints::Http(vec![direct]),
        args,
        report,
    )
    .await;
    let (mut bridge, conn) =
        start_bridge(mcp, logs, "mcp-bridge", "warn", REQUEST_TIMEOUT, None).await?;
    let bridge_name = format!("mcp-bridge -> /mcp, node {first} (one stdio session)");
    run_levels(
        "bridge",
        &bridge_name,
        &Endpoints::Stdio(conn),
        args,
        report,
    )
    .await;
    if let Some(status) = bridge.exited() {
        report.note(
            "bridge",
            format!("mcp-bridge exited during its run ({status})"),
        );
    }
    bridge.stop().await;
    let b = report.row("bridge", &bridge_name, 1).and_then(|r| r.p50);
    let d = report.row("bridge", &direct_name, 1).and_then(|r| r.p50);
    report.goals.push(Goal::p50_over(
        "bridge",
        format!("the bridge adds at most {GOAL_BRIDGE_P50_MS} ms p50"),
        ("1 client: bridge", b),
        ("direct", d),
        GOAL_BRIDGE_P50_MS,
    ));
    if args.kills > 0 {
        bench_kills(http, mcp, logs, args, report).await?;
    }
    Ok(())
}

/// One call of the kill test's client: when it was sent, when it ended, how.
struct Event {
    sent: Instant,
    done: Instant,
    result: Result<(), String>,
}

/// The node id whose URL `url` (the bridge's `node=` value) starts with.
fn node_of(mcp: &Mcp, url: &str) -> Option<u64> {
    mcp.ids.iter().copied().find(|id| {
        let base = mcp.url(*id);
        url == base || url.starts_with(&format!("{base}/"))
    })
}

async fn wait_readyz(http: &reqwest::Client, base: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let ok = http
            .get(format!("{base}/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{base}/readyz was not ready within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn bench_kills(
    http: &reqwest::Client,
    mcp: &mut Mcp,
    logs: &Path,
    args: &Args,
    report: &mut Report,
) -> anyhow::Result<()> {
    eprintln!(
        "bridge: {} kill -9 rounds of the node mcp-bridge uses",
        args.kills
    );
    let (line_tx, mut line_rx) = mpsc::unbounded_channel();
    let (mut bridge, conn) = start_bridge(
        mcp,
        logs,
        "mcp-bridge-kills",
        "info",
        FAILOVER_CALL_TIMEOUT,
        Some(line_tx),
    )
    .await?;
    // The bridge starts on the first URL and logs `failed over node=URL` when it moves.
    let mut current = mcp.ids[0];
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (conn, stop) = (conn.clone(), stop.clone());
        // Bounded: at most ~90 s a round and 10 M calls.
        let hard_end = Instant::now() + Duration::from_secs(60 + 90 * u64::from(args.kills));
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < hard_end && n < 10_000_000 {
                let sent = Instant::now();
                let result = conn.call(n).await;
                let failed = result.is_err();
                let done = Instant::now();
                if ev_tx.send(Event { sent, done, result }).is_err() {
                    return;
                }
                n += 1;
                tokio::time::sleep(if failed {
                    ERROR_PAUSE
                } else {
                    KILL_CLIENT_PACE
                })
                .await;
            }
        })
    };
    let mut all_errors = 0u64;
    let mut samples = Vec::new();
    let mut kills = Vec::new();
    let outcome: anyhow::Result<()> = async {
        for round in 1..=args.kills {
            // Steady state first: 20 successes in a row.
            let deadline = Instant::now() + PAUSE_WITHIN;
            let mut streak = 0;
            while streak < 20 {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, ev_rx.recv()).await {
                    Ok(Some(ev)) => match ev.result {
                        Ok(()) => streak += 1,
                        Err(e) => {
                            streak = 0;
                            all_errors += 1;
                            keep_sample(&mut samples, format!("before kill {round}: {e}"));
                        }
                    },
                    Ok(None) => bail!("the kill test's client stopped"),
                    Err(_) => bail!("no 20 successful calls in a row within {PAUSE_WITHIN:?} before kill {round}"),
                }
            }
            while let Ok(line) = line_rx.try_recv() {
                if let Some(n) = failed_over_to(&line).and_then(|u| node_of(mcp, &u)) {
                    current = n;
                }
            }
            let node = current;
            let t_kill = Instant::now();
            mcp.cluster.kill(node).await;
            let t_reaped = Instant::now();
            let mut errors = 0u64;
            let mut pause = None;
            let deadline = t_kill + PAUSE_WITHIN;
            while pause.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, ev_rx.recv()).await {
                    Ok(Some(ev)) => match ev.result {
                        Ok(()) if ev.sent >= t_reaped => pause = Some(ev.done - t_kill),
                        Ok(()) => {}
                        Err(e) => {
                            errors += 1;
                            keep_sample(&mut samples, format!("kill {round} (node {node}): {e}"));
                        }
                    },
                    Ok(None) => bail!("the kill test's client stopped"),
                    Err(_) => break,
                }
            }
            all_errors += errors;
            // Which node the bridge moved to (its log line comes before the successful call).
            let moved_by = Instant::now() + Duration::from_secs(5);
            while current == node && Instant::now() < moved_by {
                match tokio::time::timeout(Duration::from_millis(100), line_rx.recv()).await {
                    Ok(Some(line)) => {
                        if let Some(n) = failed_over_to(&line).and_then(|u| node_of(mcp, &u)) {
                            current = n;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            let restarted = Instant::now();
            mcp.cluster.restart(node).await;
            let ready = wait_readyz(http, &mcp.url(node), READY_WITHIN).await;
            let restart_ready = ready.is_ok().then(|| restarted.elapsed());
            eprintln!(
                "bridge: kill {round}/{}: node {node}: pause {} ms, {errors} client errors; bridge now on node {current}; node {node} ready again after {} ms",
                args.kills,
                ms3(pause).map_or("none (not recovered)".into(), |p| format!("{p:.1}")),
                ms3(restart_ready).map_or("-".into(), |p| format!("{p:.0}")),
            );
            kills.push(Kill { round, node, pause, errors, restart_ready });
            ready?;
            if current == node {
                report.note("bridge", format!("kill {round}: mcp-bridge logged no failover away from node {node}"));
            }
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    // Drain what is left so the client can end; it ends within its call timeout.
    let _ = tokio::time::timeout(FAILOVER_CALL_TIMEOUT + Duration::from_secs(1), async {
        while ev_rx.recv().await.is_some() {}
    })
    .await;
    client.abort();
    if let Some(status) = bridge.exited() {
        report.note(
            "bridge",
            format!(
                "mcp-bridge exited during the kill test ({status}); log:\n{}",
                bridge.tail(20)
            ),
        );
    }
    bridge.stop().await;
    for s in &samples {
        eprintln!("  kill test error: {s}");
    }
    for s in samples {
        report.note("bridge", format!("client error during the kill test: {s}"));
    }
    let mut pauses: Vec<Duration> = kills.iter().filter_map(|k| k.pause).collect();
    pauses.sort_unstable();
    let unrecovered = kills.iter().filter(|k| k.pause.is_none()).count();
    let row = Row {
        section: "bridge",
        system: format!(
            "pause after kill -9 of the bridge's node ({} kills{})",
            kills.len(),
            if unrecovered > 0 {
                format!(", {unrecovered} not recovered")
            } else {
                String::new()
            }
        ),
        clients: 1,
        calls: pauses.len() as u64,
        errors: all_errors,
        elapsed: Duration::ZERO,
        p50: percentile(&pauses, 0.50),
        p99: percentile(&pauses, 0.99),
        max: pauses.last().copied(),
        load1: load_average().map(|l| l.0).unwrap_or(-1.0),
        delayed_acks: None,
        cpu_per_call: None,
        samples: Vec::new(),
        rate: false,
    };
    let p99 = row.p99;
    report.rows.push(row);
    report.kills = kills;
    let (measured, met) = match p99 {
        Some(p) if unrecovered == 0 => (
            format!("pause p99 {:.1} ms", ms(p)),
            Some(ms(p) <= GOAL_PAUSE_P99_MS),
        ),
        Some(p) => (
            format!(
                "pause p99 {:.1} ms of the recovered; {unrecovered} kill(s) not recovered within {PAUSE_WITHIN:?}",
                ms(p)
            ),
            Some(false),
        ),
        None => ("no pause measured".into(), None),
    };
    report.goals.push(Goal {
        section: "bridge",
        goal: format!(
            "pause p99 at most {:.0} s (kill -9 to the first successful call sent after it)",
            GOAL_PAUSE_P99_MS / 1e3
        ),
        measured,
        met,
    });
    outcome
}

/// The URL of a bridge log line `... failed over node=URL ...`.
fn failed_over_to(line: &str) -> Option<String> {
    if !line.contains("failed over") {
        return None;
    }
    let rest = &line[line.find("node=")? + "node=".len()..];
    let url = rest.split_whitespace().next()?.trim_matches('"');
    Some(url.to_string())
}

// === report ===

/// The 1-, 5- and 15-minute load averages.
fn load_average() -> Option<(f64, f64, f64)> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut f = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some((f.next()??, f.next()??, f.next()??))
}

/// The time every live thread of process `pid` has spent on a CPU
/// (`/proc/PID/task/*/schedstat`, nanoseconds).
fn cpu_time(pid: u32) -> Option<Duration> {
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(text) = std::fs::read_to_string(task.ok()?.path().join("schedstat")) else {
            continue; // a thread that ended meanwhile
        };
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(ns))
}

/// `TcpExt: DelayedACKs` of this network namespace (`/proc/net/netstat`).
fn delayed_acks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "DelayedACKs")
        .and_then(|(_, v)| v.parse().ok())
}

/// Facts of the machine the figures were taken on.
fn machine_facts() -> Vec<(&'static str, String)> {
    let mut facts = mcpcp_tests::bench::machine_basics();
    if let Some((a, b, c)) = load_average() {
        facts.push((
            "load average",
            format!("{a:.2} {b:.2} {c:.2} (1, 5, 15 min, at start)"),
        ));
    }
    facts
}

fn print_section(report: &Report, section: &str) {
    let rows: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| r.section == section)
        .collect();
    if rows.is_empty() && !report.notes.iter().any(|(s, _)| *s == section) {
        return;
    }
    let fmt_ms = |d: Option<Duration>| match d {
        Some(d) => format!("{:.3}", ms(d)),
        None => "-".into(),
    };
    let width = rows
        .iter()
        .map(|r| r.system.chars().count())
        .max()
        .unwrap_or(10)
        .max(11);
    println!("== {section} ==");
    println!(
        "{:<width$} {:>7} {:>10} {:>9} {:>9} {:>7} {:>6}",
        "system/path", "clients", "calls/s", "p50 ms", "p99 ms", "errors", "load1"
    );
    for r in rows {
        let rate = if r.rate {
            format!("{:.1}", r.calls_per_s())
        } else {
            "-".into()
        };
        println!(
            "{:<width$} {:>7} {:>10} {:>9} {:>9} {:>7} {:>6.2}",
            r.system,
            r.clients,
            rate,
            fmt_ms(r.p50),
            fmt_ms(r.p99),
            r.errors,
            r.load1
        );
    }
    for r in report.rows.iter().filter(|r| r.section == section) {
        for e in &r.samples {
            println!("error: {} ({} clients): {e}", r.system, r.clients);
        }
        if let Some(acks) = r
            .delayed_acks
            .filter(|a| *a as f64 >= 0.5 * r.calls.max(1) as f64)
        {
            println!(
                "tcp: {} ({} clients): {acks} TCP delayed ACKs on the machine during the level, {:.2} per call (Nagle meeting a delayed ACK on the path?)",
                r.system,
                r.clients,
                acks as f64 / r.calls.max(1) as f64
            );
        }
    }
    if section == "bridge" && !report.kills.is_empty() {
        let pauses: Vec<String> = report
            .kills
            .iter()
            .map(|k| {
                format!(
                    "{}:n{}={}",
                    k.round,
                    k.node,
                    k.pause.map_or("none".into(), |p| format!("{:.1}", ms(p)))
                )
            })
            .collect();
        println!("kills (round:node=pause ms): {}", pauses.join(" "));
    }
    for g in report.goals.iter().filter(|g| g.section == section) {
        let verdict = match g.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "-",
        };
        println!("goal: {}: {} [{verdict}]", g.goal, g.measured);
    }
    for (_, n) in report.notes.iter().filter(|(s, _)| *s == section) {
        println!("note: {n}");
    }
    println!();
}

async fn run(args: Args) -> anyhow::Result<()> {
    let command: Vec<String> = std::env::args().collect();
    println!("command: {}", command.join(" "));
    let facts = machine_facts();
    for (k, v) in &facts {
        println!("{k}: {v}");
    }
    let sections: Vec<Section> = [
        Section::Data,
        Section::Routing,
        Section::Upstream,
        Section::Identity,
        Section::Limits,
        Section::Tracing,
        Section::Bridge,
    ]
    .into_iter()
    .filter(|s| args.sections.contains(s))
    .collect();
    println!(
        "load: {} s per level after a warm-up of {} ms, clients {LEVELS:?}, at most {} calls per level; sections {}; {} kills",
        args.seconds,
        MAX_WARMUP.min(Duration::from_secs(args.seconds) / 5).as_millis(),
        args.max_calls,
        sections.iter().map(|s| s.name()).collect::<Vec<_>>().join(","),
        args.kills
    );
    println!();

    let logs = tempfile::Builder::new()
        .prefix("mcpcp-bench-mcp-")
        .tempdir()
        .context("log dir")?;
    // The client of the harness's own requests (admin API, readiness, placement); the measured
    // calls go through `HttpSession`'s own connections.
    let http = mcpctl::https::client_builder(Some(&mcpcp_tests::test_ca_cert()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(Duration::from_secs(4))
        .tcp_nodelay(true)
        .build()
        .context("HTTP client")?;
    let mcpd = mcpcp_tests::binary("mcpd");
    let mut report = Report::default();

    let mut floor = None;
    if sections.contains(&Section::Data) {
        match bench_floor(&mcpd, logs.path(), &args, &mut report).await {
            Ok(f) => floor = Some(f),
            Err(e) => report.note("data", format!("the direct-stdio floor failed: {e:#}")),
        }
        let peers = if args.no_peers {
            Vec::new()
        } else {
            peers(&mcpd, &mut report)
        };
        for (peer, port) in peers {
            if let Err(e) = bench_peer(&peer, port, logs.path(), &args, &mut report).await {
                report.note("data", format!("{} failed: {e:#}", peer.system));
            }
        }
    }
    // Every section past the data plane's peers needs the cluster.
    if !sections.is_empty() {
        let mut mcp = Mcp::start(&mcpd, args.plain_edge).await?;
        if sections.contains(&Section::Data) {
            let conn = floor.as_ref().map(|(_, c)| c);
            if let Err(e) = bench_pools(&http, &mcp, conn, &args, &mut report).await {
                report.note("data", format!("mcpd pools failed: {e:#}"));
            }
            if let Some((mut proc, _)) = floor.take() {
                proc.stop().await;
            }
            data_goals(&mut report);
            print_section(&report, "data");
        }
        if sections.contains(&Section::Routing) {
            if let Err(e) = bench_routing(&http, &mcp, &args, &mut report).await {
                report.note("routing", format!("failed: {e:#}"));
            }
            print_section(&report, "routing");
        }
        if sections.contains(&Section::Upstream) {
            if let Err(e) = bench_upstream(&mcp, logs.path(), &args, &mut report).await {
                report.note("upstream", format!("failed: {e:#}"));
            }
            upstream_goals(&mut report);
            print_section(&report, "upstream");
        }
        if sections.contains(&Section::Identity) {
            if let Err(e) = bench_identity(&mcp, &args, &mut report).await {
                report.note("identity", format!("failed: {e:#}"));
            }
            identity_goals(&mut report);
            print_section(&report, "identity");
        }
        if sections.contains(&Section::Limits) {
            if let Err(e) = bench_limits(&mcp, &args, &mut report).await {
                report.note("limits", format!("failed: {e:#}"));
            }
            limits_goals(&mut report);
            print_section(&report, "limits");
        }
        if sections.contains(&Section::Tracing) {
            if let Err(e) = bench_tracing(&mcp, &args, &mut report).await {
                report.note("tracing", format!("failed: {e:#}"));
            }
            tracing_goals(&mut report);
            print_section(&report, "tracing");
        }
        if sections.contains(&Section::Bridge) {
            if let Err(e) = bench_bridge(&http, &mut mcp, logs.path(), &args, &mut report).await {
                report.note("bridge", format!("failed: {e:#}"));
            }
            print_section(&report, "bridge");
        }
        if report.notes.iter().any(|(_, n)| n.contains("failed")) {
            mcp.cluster.dump_logs();
        }
        mcp.stop().await;
    }

    let summary = json!({
        "bench": "mcp",
        "command": command.join(" "),
        "machine": facts.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "load_average_at_end": load_average().map(|(a, b, c)| json!([a, b, c])),
        "seconds_per_level": args.seconds,
        "levels": LEVELS,
        "sections": sections.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "results": report.rows.iter().map(Row::json).collect::<Vec<_>>(),
        "goals": report.goals.iter().map(Goal::json).collect::<Vec<_>>(),
        "kills": report.kills.iter().map(|k| json!({
            "round": k.round,
            "node": k.node,
            "pause_ms": ms3(k.pause),
            "client_errors": k.errors,
            "restart_ready_ms": ms3(k.restart_ready),
        })).collect::<Vec<_>>(),
        "notes": report.notes.iter().map(|(s, n)| json!({ "section": s, "note": n })).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    run_until_stopped("mcp-bench", run(Args::parse())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_answers_are_found_by_id() {
        let body = b"event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\r\n\r\n\
                     event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ok\":true}}\n\n";
        assert_eq!(sse_answer(body, 7).unwrap()["result"]["ok"], json!(true));
        assert!(sse_answer(body, 8).is_err());
        // No blank line after the last event.
        let body = b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}";
        assert!(sse_answer(body, 1).is_ok());
    }

    #[test]
    fn echo_answers_are_checked() {
        let ok = json!({"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"m1"}],"isError":false}});
        assert!(check_echo(&ok, "m1").is_ok());
        assert!(check_echo(&ok, "m2").is_err());
        let tool_err = json!({"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}});
        assert!(check_echo(&tool_err, "m1").is_err());
        let rpc_err = json!({"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"x"}});
        assert!(check_echo(&rpc_err, "m1").unwrap_err().contains("-32000"));
    }

    #[test]
    fn bridge_failover_lines_name_the_node() {
        let line = "2026-01-01T00:00:00.000Z  INFO mcp_bridge::link: failed over node=http://127.0.0.1:4100/mcp after_ms=3";
        assert_eq!(
            failed_over_to(line).as_deref(),
            Some("http://127.0.0.1:4100/mcp")
        );
        assert_eq!(failed_over_to("WARN failing over node=http://x/mcp"), None);
    }
}
