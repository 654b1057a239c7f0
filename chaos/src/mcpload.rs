//! The MCP workload: MCP clients calling the demo server (`mcpd demo-server`) through the
//! cluster's data plane while the fault happens, judged by what they were answered and by the
//! demo server's ledger.
//!
//! Set-up: a tenant, a tenant token, and the tenant's server [`SERVER`] running
//! `mcpd demo-server` on every node (replicas unset) with `idempotent_tools: ["echo"]`, a
//! short request timeout, and `MCPD_DEMO_LEDGER` pointing at a file in the scenario's
//! directory (every node's processes append to it: one filesystem). The set-up waits until
//! every node answers an `echo`.
//!
//! Clients, each call either `echo` (idempotent; the answer must be the message sent) or
//! `counter_increment` (not idempotent: one ledger line per execution, carrying the call's
//! unique `_meta["mcpd/request-key"]`):
//! - plain-HTTP sessions: `initialize` on a random node, then calls on that node; now and then
//!   (and after any failure) the same `Mcp-Session-Id` moves to another node, since sessions
//!   survive nodes; an unknown session (404) is initialized again. Half of them use the
//!   aggregate endpoint `/mcp`, half the server's own `/servers/{name}/mcp`;
//! - `mcp-bridge` processes given every node's URL (in a random order), each driven by
//!   concurrent callers over its stdin/stdout: `initialize`, `notifications/initialized`,
//!   `tools/list` (so the bridge learns which tools are idempotent), then `tools/call` lines,
//!   answers matched by id.
//!
//! Every request has a deadline ([`McpLoad::deadline`]); its outcome is ok, failed (a clear
//! JSON-RPC or HTTP error) or unknown (no answer: timeout, transport error, bridge gone).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcpcp_proto::api::{CreateTokenRequest, ServerSpec, TenantSpec, Timeouts};
use mcpcp_testkit::{HttpMcp, Reply, PROTOCOL_VERSION};
use mcpctl::{AdminClient, CallOptions};
use serde_json::{json, Value};

use crate::checker::mcp::{self as checks, parse_ledger};
use crate::checker::Check;
use crate::cluster::{Target, Targets};
use crate::history::{
    Failure, Latency, McpMethod, Op, OpKind, OpResult, Outcome, Tally, UnknownCause, Via,
};
use crate::janitor::Janitor;
use crate::mcp::Bridge;
use crate::workload::{retry, think, BoxFuture, FinalView, Workload, WorkloadCtx, WorkloadError};

/// The demo server's name (a tenant's own server).
pub const SERVER: &str = "chaos-demo";
/// The tenant whose token the clients use.
pub const TENANT: &str = "chaos-mcp";
/// How long a bridge gets to exit once its stdin is closed.
const BRIDGE_EXIT: Duration = Duration::from_secs(5);

/// How many clients of each kind, and their pace.
#[derive(Debug, Clone, Copy)]
pub struct McpLoad {
    pub http_clients: usize,
    pub bridges: usize,
    /// Concurrent callers sharing one bridge.
    pub callers_per_bridge: usize,
    /// Pause between two calls of one client, in milliseconds (random in this range).
    pub think_ms: (u64, u64),
    /// Share of calls that are `counter_increment`, in percent.
    pub counter_percent: u8,
    /// A request unanswered after this is recorded as a timeout (unanswered).
    pub deadline: Duration,
    /// The demo server's request timeout (`timeouts.request_ms`).
    pub request_timeout_ms: u64,
}

impl Default for McpLoad {
    fn default() -> Self {
        McpLoad {
            http_clients: 3,
            bridges: 2,
            callers_per_bridge: 2,
            think_ms: (10, 40),
            counter_percent: 40,
            // The server's request timeout (5 s) plus the bridge's failover deadline (10 s):
            // the longest a healthy path may take to answer, even with an error.
            deadline: Duration::from_secs(15),
            request_timeout_ms: 5_000,
        }
    }
}

/// What the MCP workload needs from the run.
#[derive(Debug, Clone)]
pub struct McpConfig {
    /// The `mcpd` binary: the demo server is `mcpd demo-server`.
    pub mcpd: PathBuf,
    /// The `mcp-bridge` binary.
    pub bridge: PathBuf,
    pub load: McpLoad,
}

/// The MCP workload of one scenario.
pub struct McpWorkload {
    cfg: McpConfig,
    /// Request keys and echoed messages start with this (unique per scenario).
    prefix: String,
    /// The scenario's directory: the ledger and the bridges' logs.
    dir: PathBuf,
    ledger: PathBuf,
    janitor: Janitor,
    token: Mutex<Option<String>>,
    /// The leader when the set-up ran: the first bridge starts there (most faults hit it).
    leader: Mutex<Option<u64>>,
    notes: Arc<Mutex<Vec<String>>>,
}

impl McpWorkload {
    pub fn new(scenario: usize, cfg: McpConfig, dir: &Path, janitor: &Janitor) -> Self {
        McpWorkload {
            cfg,
            prefix: format!("m{scenario}"),
            dir: dir.to_path_buf(),
            ledger: dir.join("mcp-ledger.jsonl"),
            janitor: janitor.clone(),
            token: Mutex::new(None),
            leader: Mutex::new(None),
            notes: Arc::default(),
        }
    }

    /// The cluster CA's certificate: the scenario's cluster lives in the same directory.
    fn cacert(&self) -> PathBuf {
        self.dir.join(mcpcp_pki::ca::CA_CERT)
    }

    fn server_spec(&self) -> ServerSpec {
        let mut env = BTreeMap::new();
        env.insert(
            "MCPD_DEMO_LEDGER".to_string(),
            self.ledger.to_string_lossy().to_string(),
        );
        env.insert("RUST_LOG".to_string(), "warn".to_string());
        ServerSpec {
            name: SERVER.into(),
            tenant: Some(TENANT.into()),
            command: self.cfg.mcpd.to_string_lossy().to_string(),
            args: vec!["demo-server".into()],
            env,
            cwd: None,
            enabled: true,
            pool_size: 2,
            // Every node runs it.
            replicas: None,
            fallbacks: vec![],
            timeouts: Timeouts {
                request_ms: self.cfg.load.request_timeout_ms,
                ..Timeouts::default()
            },
            idempotent_tools: vec!["echo".into()],
            session_mode: Default::default(),
            sandbox: None,
            url: None,
            headers: BTreeMap::new(),
            ca_file: None,
            oauth: None,
        }
    }

    async fn setup_inner(
        &self,
        admin: &AdminClient,
        targets: &Targets,
    ) -> Result<(), WorkloadError> {
        let within = Duration::from_secs(30);
        let tenant = TenantSpec {
            name: TENANT.into(),
            description: Some("the chaos harness's MCP clients".into()),
            weight: 1,
        };
        let opts = CallOptions::default();
        retry("the MCP tenant", within, || {
            admin.create_tenant(&tenant, &opts)
        })
        .await?;
        let req = CreateTokenRequest {
            name: "chaos-mcp".into(),
            role: None,
            tenant: Some(TENANT.into()),
            ttl_seconds: None,
            scopes: None,
        };
        let token = retry("the MCP tenant token", within, || admin.create_token(&req))
            .await?
            .ok_or_else(|| WorkloadError::Mcp {
                what: "the MCP tenant token".into(),
                message: "409 on a create".into(),
            })?
            .token;
        let spec = self.server_spec();
        retry(&format!("server {SERVER}"), within, || {
            admin.create_server(&spec, &opts)
        })
        .await?;
        // Every node must run the demo server before the load starts.
        let http = HttpMcp::new(&token, &self.cacert(), self.cfg.load.deadline).map_err(|m| {
            WorkloadError::Mcp {
                what: "an HTTP client".into(),
                message: m,
            }
        })?;
        let ready_within = Duration::from_secs(45);
        for t in targets.all() {
            let url = format!("{}/mcp", t.url);
            let deadline = Instant::now() + ready_within;
            loop {
                let last = match ready(&http, &url).await {
                    Ok(()) => break,
                    Err(e) => e,
                };
                if Instant::now() > deadline {
                    return Err(WorkloadError::Mcp {
                        what: format!("{SERVER} on node {}", t.id),
                        message: format!("no echo answered within {ready_within:?}: {last}"),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) =
            admin.cluster_status().await.ok().and_then(|s| s.leader);
        Ok(())
    }

    fn bridge_logs(&self) -> Vec<PathBuf> {
        (0..self.cfg.load.bridges)
            .map(|b| self.dir.join(format!("mcp-bridge-{b}.log")))
            .collect()
    }
}

/// One `echo` through a fresh session at `url`.
async fn ready(http: &HttpMcp, url: &str) -> Result<(), String> {
    let session = http
        .initialize(url, 0)
        .await
        .map_err(|r| format!("initialize: {r:?}"))?;
    let _ = http
        .notify(url, &session, "notifications/initialized")
        .await;
    let r = http
        .request(
            url,
            &session,
            1,
            "tools/call",
            json!({"name": format!("{SERVER}__echo"), "arguments": {"message": "ready"}}),
        )
        .await;
    match r {
        Reply::Response(v) if tool_text(&v).as_deref() == Some("ready") => Ok(()),
        other => Err(format!("echo: {other:?}")),
    }
}

/// The text of the first content block of a tool result.
fn tool_text(v: &Value) -> Option<String> {
    v["result"]["content"][0]["text"].as_str().map(String::from)
}

/// What a reply means for a request. `key` is the echoed message of an `echo`.
pub fn classify(method: McpMethod, key: &str, reply: Reply, http: bool) -> Outcome {
    match reply {
        Reply::Response(v) => {
            if let Some(e) = v.get("error") {
                return Outcome::Failed(Failure {
                    status: http.then_some(200),
                    code: e["code"]
                        .as_i64()
                        .map_or_else(|| "rpc".to_string(), |c| c.to_string()),
                    message: e["message"].as_str().unwrap_or_default().to_string(),
                });
            }
            let result = &v["result"];
            match method {
                McpMethod::Initialize => Outcome::Ok(OpResult::Answer {
                    text: result["protocolVersion"]
                        .as_str()
                        .unwrap_or("?")
                        .to_string(),
                }),
                McpMethod::ListTools => Outcome::Ok(OpResult::Answer {
                    text: format!("{} tools", result["tools"].as_array().map_or(0, Vec::len)),
                }),
                McpMethod::Echo | McpMethod::Counter => {
                    let text = tool_text(&v);
                    if result["isError"] == json!(true) {
                        return Outcome::Failed(Failure {
                            status: http.then_some(200),
                            code: "tool_error".into(),
                            message: text.unwrap_or_default(),
                        });
                    }
                    match (method, text) {
                        (McpMethod::Echo, Some(t)) if t == key => {
                            Outcome::Ok(OpResult::Answer { text: t })
                        }
                        (McpMethod::Counter, Some(t)) => Outcome::Ok(OpResult::Answer { text: t }),
                        (_, t) => Outcome::Unknown {
                            cause: UnknownCause::Garbled,
                            detail: format!(
                                "answered {:?}, expected {}",
                                t.unwrap_or_else(|| crate::checker::short(&v.to_string(), 120)),
                                if method == McpMethod::Echo {
                                    format!("{key:?}")
                                } else {
                                    "a count".into()
                                }
                            ),
                        },
                    }
                }
            }
        }
        Reply::Http {
            status,
            error: Some(e),
            ..
        } => Outcome::Failed(Failure {
            status: Some(status),
            code: e["code"]
                .as_i64()
                .map_or_else(|| "rpc".to_string(), |c| c.to_string()),
            message: e["message"].as_str().unwrap_or_default().to_string(),
        }),
        Reply::Http { status, text, .. } if status < 500 => Outcome::Failed(Failure {
            status: Some(status),
            code: format!("http {status}"),
            message: text,
        }),
        Reply::Http { status, text, .. } => Outcome::Unknown {
            cause: UnknownCause::ServerUnsure,
            detail: format!("HTTP {status}: {text}"),
        },
        Reply::NotSent(m) => Outcome::Failed(Failure {
            status: None,
            code: "connect".into(),
            message: m,
        }),
        Reply::Timeout(m) => Outcome::Unknown {
            cause: UnknownCause::Timeout,
            detail: m,
        },
        Reply::Lost(m) => Outcome::Unknown {
            cause: UnknownCause::ConnectionLost,
            detail: m,
        },
        Reply::Garbled(m) => Outcome::Unknown {
            cause: UnknownCause::Garbled,
            detail: m,
        },
    }
}

/// A tool call's method and `tools/call` params. `aggregate`: names are `{server}__{tool}`.
fn tool_call(
    rng: &mut fastrand::Rng,
    percent: u8,
    key: &str,
    aggregate: bool,
) -> (McpMethod, Value) {
    let prefix = if aggregate {
        format!("{SERVER}__")
    } else {
        String::new()
    };
    if rng.u8(..100) < percent {
        (
            McpMethod::Counter,
            json!({"name": format!("{prefix}counter_increment"), "arguments": {},
                   "_meta": {"mcpd/request-key": key}}),
        )
    } else {
        (
            McpMethod::Echo,
            json!({"name": format!("{prefix}echo"), "arguments": {"message": key}}),
        )
    }
}

/// How long a plain-HTTP client avoids a node that did not answer it (when it can).
const AVOID_FOR: Duration = Duration::from_secs(2);

/// A random target outside `avoid` when there is one.
fn pick_other(targets: &Targets, rng: &mut fastrand::Rng, avoid: &[u64]) -> Option<Target> {
    let all = targets.all();
    let others: Vec<Target> = all
        .iter()
        .filter(|t| !avoid.contains(&t.id))
        .cloned()
        .collect();
    let from = if others.is_empty() { all } else { others };
    if from.is_empty() {
        return None;
    }
    from.get(rng.usize(..from.len())).cloned()
}

/// What a plain-HTTP client does next after an outcome.
enum Next {
    Stay,
    /// Move the session to another node (the node did not answer).
    Move,
    /// The node does not know the session: initialize again.
    Reopen,
}

fn next_after(o: &Outcome) -> Next {
    match o {
        Outcome::Failed(f) if f.status == Some(404) => Next::Reopen,
        Outcome::Failed(f) if f.code == "connect" => Next::Move,
        Outcome::Unknown { .. } => Next::Move,
        _ => Next::Stay,
    }
}

struct HttpClientCfg {
    worker: usize,
    token: String,
    cacert: PathBuf,
    prefix: String,
    aggregate: bool,
    load: McpLoad,
}

async fn http_client(mut ctx: WorkloadCtx, c: HttpClientCfg) {
    let mut rng = fastrand::Rng::with_seed(ctx.seed ^ (c.worker as u64 + 1).wrapping_mul(0x5bd1));
    let Ok(http) = HttpMcp::new(&c.token, &c.cacert, c.load.deadline) else {
        return;
    };
    let path = if c.aggregate {
        "/mcp".to_string()
    } else {
        format!("/servers/{SERVER}/mcp")
    };
    let mut session: Option<String> = None;
    let mut node: Option<Target> = None;
    // Nodes that recently did not answer, and when.
    let mut failed: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut seq = 0usize;
    while ctx.keep_going(seq) {
        seq += 1;
        let id = i64::try_from(seq).unwrap_or(i64::MAX);
        if node.is_none() || rng.u8(..10) == 0 {
            // Now and then the session moves to another node; after a failure it must.
            failed.retain(|_, at| at.elapsed() < AVOID_FOR);
            let mut avoid: Vec<u64> = failed.keys().copied().collect();
            avoid.extend(node.as_ref().map(|t| t.id));
            node = pick_other(&ctx.targets, &mut rng, &avoid);
        }
        let Some(t) = node.clone() else {
            break;
        };
        let url = format!("{}{path}", t.url);
        let key = format!("{}-h{}-{seq}", c.prefix, c.worker);
        let next = match session.clone() {
            None => {
                let p = ctx.history.invoke(
                    c.worker,
                    t.id,
                    OpKind::McpCall {
                        via: Via::Http,
                        method: McpMethod::Initialize,
                        key,
                    },
                );
                match http.initialize(&url, id).await {
                    Ok(s) => {
                        let _ = http.notify(&url, &s, "notifications/initialized").await;
                        session = Some(s);
                        ctx.history.complete(
                            p,
                            Outcome::Ok(OpResult::Answer {
                                text: "session".into(),
                            }),
                        );
                        Next::Stay
                    }
                    Err(r) => {
                        let o = classify(McpMethod::Initialize, "", r, true);
                        let n = next_after(&o);
                        ctx.history.complete(p, o);
                        match n {
                            Next::Reopen => Next::Move,
                            n => n,
                        }
                    }
                }
            }
            Some(s) => {
                let (method, params) =
                    tool_call(&mut rng, c.load.counter_percent, &key, c.aggregate);
                let p = ctx.history.invoke(
                    c.worker,
                    t.id,
                    OpKind::McpCall {
                        via: Via::Http,
                        method,
                        key: key.clone(),
                    },
                );
                let r = http.request(&url, &s, id, "tools/call", params).await;
                let o = classify(method, &key, r, true);
                let n = next_after(&o);
                ctx.history.complete(p, o);
                n
            }
        };
        match next {
            Next::Stay => {}
            Next::Move => {
                failed.insert(t.id, Instant::now());
                node = None;
            }
            Next::Reopen => session = None,
        }
        if !think(
            &mut ctx.stop,
            rng.u64(c.load.think_ms.0..=c.load.think_ms.1),
        )
        .await
        {
            break;
        }
    }
}

struct BridgeCfg {
    index: usize,
    /// Worker number of its first caller (the others follow).
    first_worker: usize,
    token: String,
    cacert: PathBuf,
    prefix: String,
    bin: PathBuf,
    urls: Vec<String>,
    log: PathBuf,
    janitor: Janitor,
    load: McpLoad,
    notes: Arc<Mutex<Vec<String>>>,
}

/// One `mcp-bridge`: started, initialized, driven by its callers until told to stop, closed.
async fn bridge_client(mut ctx: WorkloadCtx, c: BridgeCfg) {
    let via = Via::Bridge(c.index);
    let note = |n: String| c.notes.lock().unwrap_or_else(|p| p.into_inner()).push(n);
    let bridge = match Bridge::start(&c.bin, &c.urls, &c.token, &c.cacert, &c.log, &c.janitor) {
        Ok(b) => Arc::new(b),
        Err(e) => {
            let p = ctx.history.invoke(
                c.first_worker,
                0,
                OpKind::McpCall {
                    via,
                    method: McpMethod::Initialize,
                    key: format!("{}-b{}-init", c.prefix, c.index),
                },
            );
            ctx.history.complete(
                p,
                Outcome::Unknown {
                    cause: UnknownCause::Garbled,
                    detail: format!("mcp-bridge could not be started: {e}"),
                },
            );
            return;
        }
    };
    let mut rng =
        fastrand::Rng::with_seed(ctx.seed ^ (c.first_worker as u64 + 1).wrapping_mul(0x2c1b));
    // initialize, until it works (it is safe to send again), bounded.
    let mut initialized = false;
    for attempt in 0..20 {
        if !ctx.keep_going(0) || bridge.gone() {
            break;
        }
        let p = ctx.history.invoke(
            c.first_worker,
            0,
            OpKind::McpCall {
                via,
                method: McpMethod::Initialize,
                key: format!("{}-b{}-init{attempt}", c.prefix, c.index),
            },
        );
        let params = json!({"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name": format!("chaos-bridge-{}", c.index), "version": env!("CARGO_PKG_VERSION")}});
        let r = bridge.request("initialize", params, c.load.deadline).await;
        let o = classify(McpMethod::Initialize, "", r, false);
        initialized = o.is_ok();
        ctx.history.complete(p, o);
        if initialized || !think(&mut ctx.stop, 200).await {
            break;
        }
    }
    if initialized {
        if let Err(e) = bridge.notify("notifications/initialized", None).await {
            note(format!(
                "bridge {}: notifications/initialized: {e}",
                c.index
            ));
        }
        let p = ctx.history.invoke(
            c.first_worker,
            0,
            OpKind::McpCall {
                via,
                method: McpMethod::ListTools,
                key: format!("{}-b{}-list", c.prefix, c.index),
            },
        );
        let r = bridge
            .request("tools/list", json!({}), c.load.deadline)
            .await;
        ctx.history
            .complete(p, classify(McpMethod::ListTools, "", r, false));
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..c.load.callers_per_bridge {
            callers.spawn(bridge_caller(
                ctx.clone(),
                bridge.clone(),
                via,
                c.first_worker + i,
                format!("{}-b{}c{i}", c.prefix, c.index),
                rng.u64(..),
                c.load,
            ));
        }
        while callers.join_next().await.is_some() {}
    }
    let died = bridge.gone();
    let status = bridge.close(BRIDGE_EXIT).await;
    if died || !status.contains("exit status: 0") {
        note(format!(
            "bridge {}: {}; its log: {}",
            c.index,
            if died {
                format!("exited during the load ({status})")
            } else {
                status
            },
            c.log.display()
        ));
    }
}

async fn bridge_caller(
    mut ctx: WorkloadCtx,
    bridge: Arc<Bridge>,
    via: Via,
    worker: usize,
    prefix: String,
    seed: u64,
    load: McpLoad,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut seq = 0usize;
    // The first bridge speaks to the aggregate endpoint, the others to the server's own.
    let aggregate = matches!(via, Via::Bridge(0));
    while ctx.keep_going(seq) && !bridge.gone() {
        seq += 1;
        let key = format!("{prefix}-{seq}");
        let (method, params) = tool_call(&mut rng, load.counter_percent, &key, aggregate);
        let p = ctx.history.invoke(
            worker,
            0,
            OpKind::McpCall {
                via,
                method,
                key: key.clone(),
            },
        );
        let r = bridge.request("tools/call", params, load.deadline).await;
        ctx.history.complete(p, classify(method, &key, r, false));
        if !think(&mut ctx.stop, rng.u64(load.think_ms.0..=load.think_ms.1)).await {
            break;
        }
    }
}

fn is_tool_call(op: &Op) -> bool {
    matches!(&op.kind, OpKind::McpCall { method, .. } if method.is_tool_call())
}

fn via_of(op: &Op) -> Option<Via> {
    match &op.kind {
        OpKind::McpCall { via, .. } => Some(*via),
        _ => None,
    }
}

fn tally(t: &Tally) -> String {
    format!("{} ok, {} failed, {} unknown", t.ok, t.failed, t.unknown)
}

impl Workload for McpWorkload {
    fn name(&self) -> &'static str {
        "mcp"
    }

    fn setup<'a>(
        &'a self,
        admin: &'a AdminClient,
        targets: &'a Targets,
    ) -> BoxFuture<'a, Result<(), WorkloadError>> {
        Box::pin(self.setup_inner(admin, targets))
    }

    fn workers(&self, ctx: &WorkloadCtx) -> Vec<BoxFuture<'static, ()>> {
        let Some(token) = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return vec![];
        };
        let load = self.cfg.load;
        let mut out: Vec<BoxFuture<'static, ()>> = Vec::new();
        let mut worker = 0;
        for i in 0..load.http_clients {
            out.push(Box::pin(http_client(
                ctx.clone(),
                HttpClientCfg {
                    worker,
                    token: token.clone(),
                    cacert: self.cacert(),
                    prefix: self.prefix.clone(),
                    aggregate: i % 2 == 0,
                    load,
                },
            )));
            worker += 1;
        }
        let mut rng = fastrand::Rng::with_seed(ctx.seed ^ 0xb41d9e);
        let leader = *self.leader.lock().unwrap_or_else(|p| p.into_inner());
        let logs = self.bridge_logs();
        for (b, log) in logs.into_iter().enumerate() {
            // Every URL, in a random order; the first bridge starts at the leader, the others
            // at a follower, so that a fault on one node hits a bridge's current node.
            let mut targets = ctx.targets.all();
            rng.shuffle(&mut targets);
            targets.sort_by_key(|t| (Some(t.id) == leader) != (b == 0));
            let urls: Vec<String> = targets.into_iter().map(|t| t.url).collect();
            let urls = if b == 0 {
                urls
            } else {
                urls.into_iter()
                    .map(|u| format!("{u}/servers/{SERVER}/mcp"))
                    .collect()
            };
            out.push(Box::pin(bridge_client(
                ctx.clone(),
                BridgeCfg {
                    index: b,
                    first_worker: worker,
                    token: token.clone(),
                    cacert: self.cacert(),
                    prefix: self.prefix.clone(),
                    bin: self.cfg.bridge.clone(),
                    urls,
                    log,
                    janitor: self.janitor.clone(),
                    load,
                    notes: self.notes.clone(),
                },
            )));
            worker += load.callers_per_bridge;
        }
        out
    }

    fn stop_within(&self) -> Duration {
        self.cfg.load.deadline + BRIDGE_EXIT + Duration::from_secs(3)
    }

    fn check<'a>(&'a self, view: FinalView<'a>) -> BoxFuture<'a, Vec<Check>> {
        Box::pin(async move {
            let text = match std::fs::read_to_string(&self.ledger) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => {
                    self.notes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("reading the ledger {}: {e}", self.ledger.display()));
                    String::new()
                }
            };
            let ledger = parse_ledger(&text);
            vec![
                checks::answered_within(view.ops, view.impairments, self.cfg.load.deadline),
                checks::no_duplicates(view.ops, &ledger),
                checks::answers_match(view.ops, &ledger),
            ]
        })
    }

    fn figures(&self, ops: &[Op]) -> Vec<(String, String)> {
        let calls: Vec<Op> = ops.iter().filter(|o| is_tool_call(o)).cloned().collect();
        let (http, bridge): (Vec<Op>, Vec<Op>) = calls
            .iter()
            .cloned()
            .partition(|o| via_of(o) == Some(Via::Http));
        let l = Latency::of(&calls);
        let failovers: usize = self
            .bridge_logs()
            .iter()
            .map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("failed over"))
                    .count()
            })
            .sum();
        vec![
            ("mcp tool calls".into(), tally(&Tally::of(&calls))),
            ("  plain HTTP".into(), tally(&Tally::of(&http))),
            ("  through mcp-bridge".into(), tally(&Tally::of(&bridge))),
            (
                "ok mcp call latency".into(),
                format!("p50 {} ms, p99 {} ms, max {} ms", l.p50, l.p99, l.max),
            ),
            ("bridge failovers".into(), failovers.to_string()),
        ]
    }

    fn tally(&self, ops: &[Op]) -> Tally {
        let calls: Vec<Op> = ops.iter().filter(|o| is_tool_call(o)).cloned().collect();
        Tally::of(&calls)
    }

    fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_classified() {
        let ok = Reply::Response(
            json!({"id": 1, "result": {"content": [{"type": "text", "text": "k"}]}}),
        );
        assert!(classify(McpMethod::Echo, "k", ok.clone(), true).is_ok());
        assert!(matches!(
            classify(McpMethod::Echo, "other", ok.clone(), true),
            Outcome::Unknown {
                cause: UnknownCause::Garbled,
                ..
            }
        ));
        assert!(classify(McpMethod::Counter, "x", ok, false).is_ok());
        let err =
            Reply::Response(json!({"id": 1, "error": {"code": -32053, "message": "crashed"}}));
        match classify(McpMethod::Counter, "x", err, false) {
            Outcome::Failed(f) => {
                assert_eq!(f.code, "-32053");
                assert!(!checks::did_not_run(&f));
            }
            o => panic!("{o:?}"),
        }
        let tool_err = Reply::Response(
            json!({"id": 1, "result": {"isError": true, "content": [{"type": "text", "text": "no"}]}}),
        );
        match classify(McpMethod::Counter, "x", tool_err, true) {
            Outcome::Failed(f) => assert!(checks::did_not_run(&f)),
            o => panic!("{o:?}"),
        }
        let gone = Reply::Http {
            status: 404,
            error: Some(json!({"code": -32600, "message": "session not found"})),
            text: String::new(),
        };
        let o = classify(McpMethod::Echo, "k", gone, true);
        assert!(matches!(next_after(&o), Next::Reopen));
        let o = classify(McpMethod::Echo, "k", Reply::NotSent("refused".into()), true);
        assert!(matches!(next_after(&o), Next::Move));
        assert!(!checks::answered(&o));
        let o = classify(
            McpMethod::Echo,
            "k",
            Reply::Http {
                status: 503,
                error: None,
                text: "busy".into(),
            },
            true,
        );
        assert!(!checks::answered(&o));
    }

    #[test]
    fn tool_calls_carry_their_key() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut seen = (false, false);
        for _ in 0..100 {
            let (m, p) = tool_call(&mut rng, 50, "k-1", true);
            match m {
                McpMethod::Counter => {
                    seen.0 = true;
                    assert_eq!(p["name"], "chaos-demo__counter_increment");
                    assert_eq!(p["_meta"]["mcpd/request-key"], "k-1");
                }
                _ => {
                    seen.1 = true;
                    assert_eq!(p["arguments"]["message"], "k-1");
                }
            }
        }
        assert!(seen.0 && seen.1);
    }
}
