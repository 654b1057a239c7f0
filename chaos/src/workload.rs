//! Workloads: concurrent clients that run during a scenario and record every operation in the
//! [`History`], and the checks that judge that history once the cluster has settled.
//!
//! [`Workload`] is the seam: the registry workload ([`RegistryWorkload`]) here, and the MCP
//! data-plane workload (`crate::mcpload`: tool calls over plain HTTP and through
//! `mcp-bridge`, judged by the demo server's ledger), run side by side, each with its own
//! history: `setup` before the fault, `workers` during the scenario, `check` after it.
//!
//! The registry workload runs three kinds of clients, each through a random member:
//! - writers creating tenants under names no other operation uses (unique keys);
//! - compare-and-set clients on a few shared servers: read the server (linearizable), then
//!   `PUT` it with `If-Match` = the revision read and a new, unique register value (the
//!   server's `args`, `["--chaos-register", "<value>"]`, mirrored in `pool_size`; not `env`,
//!   whose values are secrets the API never shows); the servers are disabled, so no node
//!   starts processes for them;
//! - readers: linearizable `GET` of a shared server and `GET /v1/tenants`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcpcp_proto::api::{ServerSpec, TenantSpec, Versioned};
use mcpctl::{AdminClient, CallOptions, ClientError};
use tokio::sync::watch;

use crate::checker::availability::Impairment;
use crate::checker::linearizable::Budget;
use crate::checker::registers::{self, FinalRead, RegisterKey};
use crate::checker::tenants::{self, NodeTenants};
use crate::checker::Check;
use crate::cluster::Targets;
use crate::history::{Clock, Failure, History, Op, OpKind, OpResult, Outcome, Tally, UnknownCause};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("setting up {what}: {source}")]
    Setup { what: String, source: ClientError },
    #[error("setting up {what}: gave up after {within:?}")]
    SetupTimeout { what: String, within: Duration },
    #[error("setting up {what}: {message}")]
    Mcp { what: String, message: String },
}

/// What a workload's clients get.
#[derive(Clone)]
pub struct WorkloadCtx {
    pub targets: Targets,
    pub history: History,
    pub seed: u64,
    pub stop: watch::Receiver<bool>,
    /// Workers stop at this instant even if not told to.
    pub deadline: Instant,
}

/// What a workload's checks get once the cluster has settled.
pub struct FinalView<'a> {
    /// One client per live member (stale reads of each node's own state).
    pub nodes: Vec<(u64, AdminClient)>,
    pub ops: &'a [Op],
    pub clock: Clock,
    /// How long to wait for the nodes to converge.
    pub within: Duration,
    /// When calls to a node could legitimately go unanswered (the fault's timeline).
    pub impairments: &'a [Impairment],
}

/// A load generator with its own checks.
pub trait Workload: Send + Sync {
    fn name(&self) -> &'static str;
    /// Creates what the workers need, before any fault (`targets`: every member).
    fn setup<'a>(
        &'a self,
        admin: &'a AdminClient,
        targets: &'a Targets,
    ) -> BoxFuture<'a, Result<(), WorkloadError>>;
    /// The concurrent clients; each ends when `ctx.stop` turns true, at `ctx.deadline`, or
    /// after its own bounded number of operations.
    fn workers(&self, ctx: &WorkloadCtx) -> Vec<BoxFuture<'static, ()>>;
    /// How long its workers may take to end once told to stop (a call in flight finishing).
    fn stop_within(&self) -> Duration {
        Duration::ZERO
    }
    /// Judges the history against the final state of every node.
    fn check<'a>(&'a self, view: FinalView<'a>) -> BoxFuture<'a, Vec<Check>>;
    /// Rows for the scenario's table.
    fn figures(&self, _ops: &[Op]) -> Vec<(String, String)> {
        Vec::new()
    }
    /// The outcomes of its operations, for the summary table.
    fn tally(&self, ops: &[Op]) -> Tally {
        Tally::of(ops)
    }
    /// Remarks for the report (a client process that exited, a file that could not be read).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Upper bound of operations per worker (or MCP client) and scenario.
const MAX_OPS_PER_WORKER: usize = 20_000;

impl WorkloadCtx {
    /// Whether a worker that has done `done` operations goes on: not stopped, before the
    /// deadline, under the bound.
    pub fn keep_going(&self, done: usize) -> bool {
        !*self.stop.borrow() && Instant::now() < self.deadline && done < MAX_OPS_PER_WORKER
    }
}

/// The flag in a register server's `args` whose value is the register's value.
const REGISTER_ARG: &str = "--chaos-register";

/// How many clients of each kind.
#[derive(Debug, Clone, Copy)]
pub struct RegistryLoad {
    pub tenant_writers: usize,
    pub cas_clients: usize,
    pub readers: usize,
    pub registers: usize,
    /// Pause between two operations of one client, in milliseconds (random in this range).
    pub think_ms: (u64, u64),
    /// Read with `?consistency=stale` instead of linearizably: a deliberate bug that the
    /// checkers must catch under a partition (`chaos run --stale-reads`).
    pub stale_reads: bool,
}

impl Default for RegistryLoad {
    fn default() -> Self {
        RegistryLoad {
            tenant_writers: 2,
            cas_clients: 3,
            readers: 2,
            registers: 3,
            think_ms: (5, 30),
            stale_reads: false,
        }
    }
}

/// The registry workload of one scenario.
pub struct RegistryWorkload {
    load: RegistryLoad,
    /// Tenant names start with this (unique per scenario).
    prefix: String,
    keys: Vec<String>,
    initial: Mutex<BTreeMap<String, u64>>,
    next_value: Arc<AtomicU64>,
}

impl RegistryWorkload {
    pub fn new(scenario: usize, load: RegistryLoad) -> Self {
        RegistryWorkload {
            load,
            prefix: format!("c{scenario}-"),
            keys: (0..load.registers).map(|i| format!("reg-{i}")).collect(),
            initial: Mutex::new(BTreeMap::new()),
            next_value: Arc::new(AtomicU64::new(1)),
        }
    }

    fn register_spec(key: &str, value: u64) -> ServerSpec {
        ServerSpec {
            name: key.to_string(),
            tenant: None,
            command: "/bin/true".into(),
            args: register_args(value),
            env: BTreeMap::new(),
            cwd: None,
            // A register only: no node runs processes for it.
            enabled: false,
            pool_size: pool_size_of(value),
            replicas: None,
            fallbacks: vec![],
            timeouts: Default::default(),
            idempotent_tools: vec![],
            session_mode: Default::default(),
            sandbox: None,
            url: None,
            headers: BTreeMap::new(),
            ca_file: None,
            oauth: None,
        }
    }

    async fn setup_inner(&self, admin: &AdminClient) -> Result<(), WorkloadError> {
        let within = Duration::from_secs(30);
        for key in &self.keys {
            let value = self.next_value.fetch_add(1, Ordering::SeqCst);
            let spec = Self::register_spec(key, value);
            let opts = CallOptions::default();
            retry(&format!("server {key}"), within, || {
                admin.create_server(&spec, &opts)
            })
            .await?;
            self.initial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), value);
        }
        Ok(())
    }

    /// Stale reads of every node until they agree with each other and hold every
    /// acknowledged tenant, or `view.within` passes. Returns the last reads.
    async fn final_reads(&self, view: &FinalView<'_>) -> (Vec<NodeTenants>, Vec<FinalRead>) {
        let acked: BTreeSet<&str> = view
            .ops
            .iter()
            .filter(|op| op.outcome.is_ok())
            .filter_map(|op| match &op.kind {
                OpKind::CreateTenant { name } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        let deadline = Instant::now() + view.within;
        loop {
            let mut tenants = Vec::new();
            let mut regs = Vec::new();
            for (id, client) in &view.nodes {
                let names = client.list_tenants(true).await.ok().map(|l| {
                    l.items
                        .into_iter()
                        .map(|t| t.spec.name)
                        .filter(|n| n.starts_with(&self.prefix))
                        .collect::<BTreeSet<String>>()
                });
                tenants.push(NodeTenants { node: *id, names });
                for key in &self.keys {
                    let invoke = view.clock.now();
                    if let Ok(v) = client.get_server(key, true).await {
                        if let Some(value) = register_value(&v) {
                            regs.push(FinalRead {
                                key: key.clone(),
                                node: *id,
                                value,
                                revision: v.revision,
                                invoke,
                                complete: view.clock.now(),
                            });
                        }
                    }
                }
            }
            let all_read = tenants.iter().all(|t| t.names.is_some())
                && regs.len() == view.nodes.len() * self.keys.len();
            let same_tenants = tenants.windows(2).all(|w| w[0].names == w[1].names);
            let complete = tenants
                .first()
                .and_then(|t| t.names.as_ref())
                .is_some_and(|names| acked.iter().all(|a| names.contains(*a)));
            let same_regs = self.keys.iter().all(|k| {
                let vals: BTreeSet<(u64, u64)> = regs
                    .iter()
                    .filter(|r| &r.key == k)
                    .map(|r| (r.value, r.revision))
                    .collect();
                vals.len() <= 1
            });
            if (all_read && same_tenants && complete && same_regs) || Instant::now() > deadline {
                return (tenants, regs);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn pool_size_of(value: u64) -> u32 {
    u32::try_from(value % 256).unwrap_or(0) + 1
}

fn register_args(value: u64) -> Vec<String> {
    vec![REGISTER_ARG.to_string(), value.to_string()]
}

fn register_value(v: &Versioned<ServerSpec>) -> Option<u64> {
    match v.spec.args.as_slice() {
        [flag, value] if flag == REGISTER_ARG => value.parse().ok(),
        _ => None,
    }
}

/// What a failed call means for a write.
pub fn classify_write_error(e: &ClientError) -> Outcome {
    match e {
        ClientError::Api { status, body } => {
            let code = body.error.code.clone();
            let failed = Outcome::Failed(Failure {
                status: Some(*status),
                code: code.clone(),
                message: body.error.message.clone(),
            });
            match *status {
                400..=499 => failed,
                // Refused before anything was proposed.
                503 if code == "not_initialized" => failed,
                503 if code == "no_quorum"
                    && !body.error.message.contains("may still be applied") =>
                {
                    failed
                }
                _ => Outcome::Unknown {
                    cause: UnknownCause::ServerUnsure,
                    detail: format!("{status} {code}"),
                },
            }
        }
        ClientError::Unavailable(msg) => classify_transport(msg),
        ClientError::Decode(msg) => Outcome::Unknown {
            cause: UnknownCause::Garbled,
            detail: msg.clone(),
        },
        ClientError::Usage(msg) => Outcome::Failed(Failure {
            status: None,
            code: "usage".into(),
            message: msg.clone(),
        }),
    }
}

/// A transport error: a refused or unroutable connection never carried the request; anything
/// else may have.
fn classify_transport(msg: &str) -> Outcome {
    let m = msg.to_ascii_lowercase();
    if m.contains("connection refused")
        || m.contains("no route to host")
        || m.contains("network is unreachable")
    {
        Outcome::Failed(Failure {
            status: None,
            code: "connect".into(),
            message: msg.to_string(),
        })
    } else if m.contains("timed out") || m.contains("timeout") || m.contains("deadline") {
        Outcome::Unknown {
            cause: UnknownCause::Timeout,
            detail: msg.to_string(),
        }
    } else {
        Outcome::Unknown {
            cause: UnknownCause::ConnectionLost,
            detail: msg.to_string(),
        }
    }
}

/// What a failed call means for a read. Only successful reads constrain the history; the
/// classification still tells timeouts (unanswered calls) from refusals.
fn classify_read_error(e: &ClientError) -> Outcome {
    classify_write_error(e)
}

/// Waits `ms` unless told to stop first. Returns whether to go on.
pub async fn think(stop: &mut watch::Receiver<bool>, ms: u64) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
        _ = stop.changed() => false,
    }
}

async fn tenant_writer(mut ctx: WorkloadCtx, worker: usize, prefix: String, think_ms: (u64, u64)) {
    let mut rng = fastrand::Rng::with_seed(ctx.seed ^ (worker as u64 + 1).wrapping_mul(0x9e37));
    let mut seq = 0usize;
    while ctx.keep_going(seq) {
        let Some(t) = ctx.targets.pick(&mut rng) else {
            break;
        };
        seq += 1;
        let name = format!("{prefix}w{worker}-{seq}");
        let p = ctx
            .history
            .invoke(worker, t.id, OpKind::CreateTenant { name: name.clone() });
        let spec = TenantSpec {
            name,
            description: None,
            weight: 1,
        };
        let outcome = match t.client.create_tenant(&spec, &CallOptions::default()).await {
            Ok(ack) => Outcome::Ok(OpResult::Written {
                revision: ack.revision,
            }),
            Err(e) => classify_write_error(&e),
        };
        ctx.history.complete(p, outcome);
        if !think(&mut ctx.stop, rng.u64(think_ms.0..=think_ms.1)).await {
            break;
        }
    }
}

/// Reads `key` through `t`, recording the read. Returns the spec and revision on success.
async fn read_register(
    ctx: &WorkloadCtx,
    worker: usize,
    t: &crate::cluster::Target,
    key: &str,
    stale: bool,
) -> Option<(Versioned<ServerSpec>, u64)> {
    let p = ctx.history.invoke(
        worker,
        t.id,
        OpKind::ReadRegister {
            key: key.to_string(),
        },
    );
    match t.client.get_server(key, stale).await {
        Ok(v) => match register_value(&v) {
            Some(value) => {
                ctx.history.complete(
                    p,
                    Outcome::Ok(OpResult::Register {
                        value,
                        revision: v.revision,
                    }),
                );
                Some((v, value))
            }
            None => {
                ctx.history.complete(
                    p,
                    Outcome::Unknown {
                        cause: UnknownCause::Garbled,
                        detail: format!("{key} has no {REGISTER_ARG} in its args"),
                    },
                );
                None
            }
        },
        Err(e) => {
            ctx.history.complete(p, classify_read_error(&e));
            None
        }
    }
}

async fn cas_client(
    mut ctx: WorkloadCtx,
    worker: usize,
    keys: Vec<String>,
    next_value: Arc<AtomicU64>,
    load: RegistryLoad,
) {
    let mut rng = fastrand::Rng::with_seed(ctx.seed ^ (worker as u64 + 1).wrapping_mul(0x7f4a));
    let mut done = 0usize;
    while ctx.keep_going(done) && !keys.is_empty() {
        done += 1;
        let key = &keys[rng.usize(..keys.len())];
        let Some(t) = ctx.targets.pick(&mut rng) else {
            break;
        };
        if let Some((current, from)) = read_register(&ctx, worker, &t, key, load.stale_reads).await
        {
            let to = next_value.fetch_add(1, Ordering::SeqCst);
            let mut spec = current.spec;
            spec.args = register_args(to);
            spec.pool_size = pool_size_of(to);
            // The write goes to a node of its own choosing, as a real client's would.
            let t = ctx.targets.pick(&mut rng).unwrap_or(t);
            let p = ctx.history.invoke(
                worker,
                t.id,
                OpKind::CasRegister {
                    key: key.clone(),
                    from,
                    to,
                    if_match: current.revision,
                },
            );
            let opts = CallOptions {
                if_match: Some(current.revision),
                idempotency_key: None,
            };
            let outcome = match t.client.put_server(&spec, &opts).await {
                Ok(ack) => Outcome::Ok(OpResult::Written {
                    revision: ack.revision,
                }),
                Err(e) => classify_write_error(&e),
            };
            ctx.history.complete(p, outcome);
        }
        if !think(&mut ctx.stop, rng.u64(load.think_ms.0..=load.think_ms.1)).await {
            break;
        }
    }
}

async fn reader(
    mut ctx: WorkloadCtx,
    worker: usize,
    keys: Vec<String>,
    prefix: String,
    load: RegistryLoad,
) {
    let mut rng = fastrand::Rng::with_seed(ctx.seed ^ (worker as u64 + 1).wrapping_mul(0x3c6e));
    let mut done = 0usize;
    while ctx.keep_going(done) && !keys.is_empty() {
        done += 1;
        let Some(t) = ctx.targets.pick(&mut rng) else {
            break;
        };
        if rng.u8(0..3) == 0 {
            let p = ctx.history.invoke(worker, t.id, OpKind::ListTenants);
            let outcome = match t.client.list_tenants(load.stale_reads).await {
                Ok(list) => Outcome::Ok(OpResult::Tenants {
                    names: list
                        .items
                        .into_iter()
                        .map(|t| t.spec.name)
                        .filter(|n| n.starts_with(&prefix))
                        .collect(),
                }),
                Err(e) => classify_read_error(&e),
            };
            ctx.history.complete(p, outcome);
        } else {
            let key = &keys[rng.usize(..keys.len())];
            read_register(&ctx, worker, &t, key, load.stale_reads).await;
        }
        if !think(&mut ctx.stop, rng.u64(load.think_ms.0..=load.think_ms.1)).await {
            break;
        }
    }
}

impl Workload for RegistryWorkload {
    fn name(&self) -> &'static str {
        "registry"
    }

    fn setup<'a>(
        &'a self,
        admin: &'a AdminClient,
        _targets: &'a Targets,
    ) -> BoxFuture<'a, Result<(), WorkloadError>> {
        Box::pin(self.setup_inner(admin))
    }

    fn workers(&self, ctx: &WorkloadCtx) -> Vec<BoxFuture<'static, ()>> {
        let mut out: Vec<BoxFuture<'static, ()>> = Vec::new();
        let mut worker = 0;
        let think = self.load.think_ms;
        for _ in 0..self.load.tenant_writers {
            out.push(Box::pin(tenant_writer(
                ctx.clone(),
                worker,
                self.prefix.clone(),
                think,
            )));
            worker += 1;
        }
        for _ in 0..self.load.cas_clients {
            out.push(Box::pin(cas_client(
                ctx.clone(),
                worker,
                self.keys.clone(),
                self.next_value.clone(),
                self.load,
            )));
            worker += 1;
        }
        for _ in 0..self.load.readers {
            out.push(Box::pin(reader(
                ctx.clone(),
                worker,
                self.keys.clone(),
                self.prefix.clone(),
                self.load,
            )));
            worker += 1;
        }
        out
    }

    fn check<'a>(&'a self, view: FinalView<'a>) -> BoxFuture<'a, Vec<Check>> {
        Box::pin(async move {
            let (tenants, regs) = self.final_reads(&view).await;
            let initial = self
                .initial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let keys: Vec<RegisterKey> = initial
                .into_iter()
                .map(|(key, initial)| RegisterKey { key, initial })
                .collect();
            let ops = view.ops.to_vec();
            let regs2 = regs.clone();
            // The search is CPU-bound: off the async workers.
            let lin = tokio::task::spawn_blocking(move || {
                registers::check(&ops, &keys, &regs2, Budget::default())
            })
            .await
            .unwrap_or_else(|e| {
                Check::fail(
                    "linearizable registers",
                    format!("the checker panicked: {e}"),
                    vec![],
                    Default::default(),
                )
            });
            vec![
                tenants::lost_writes(view.ops, &tenants),
                tenants::reads_and_duplicates(view.ops, &tenants),
                lin,
            ]
        })
    }
}

/// Runs a create until it is acknowledged (`Some`), already there (`None`, a 409 after a lost
/// answer), refused (error), or `within` passes.
pub async fn retry<T, F, Fut>(
    what: &str,
    within: Duration,
    mut f: F,
) -> Result<Option<T>, WorkloadError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + within;
    loop {
        match f().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.status() == Some(409) => return Ok(None),
            Err(e) if e.status().is_some_and(|s| s < 500) => {
                return Err(WorkloadError::Setup {
                    what: what.to_string(),
                    source: e,
                })
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(_) => {
                return Err(WorkloadError::SetupTimeout {
                    what: what.to_string(),
                    within,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcpcp_proto::api::{ErrorBody, ErrorDetail};

    fn api(status: u16, code: &str, message: &str) -> ClientError {
        ClientError::Api {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code: code.into(),
                    message: message.into(),
                    field: None,
                },
            },
        }
    }

    fn unknown(o: Outcome) -> bool {
        matches!(o, Outcome::Unknown { .. })
    }

    #[test]
    fn write_errors_are_classified_conservatively() {
        assert!(matches!(
            classify_write_error(&api(412, "revision_mismatch", "")),
            Outcome::Failed(_)
        ));
        assert!(unknown(classify_write_error(&api(
            503,
            "no_quorum",
            "quorum lost: no leader could commit the write within 2s; the write may still be applied: re-read"
        ))));
        assert!(matches!(
            classify_write_error(&api(503, "not_initialized", "")),
            Outcome::Failed(_)
        ));
        assert!(unknown(classify_write_error(&api(
            503,
            "shutting_down",
            ""
        ))));
        assert!(unknown(classify_write_error(&api(500, "internal", ""))));
        assert!(matches!(
            classify_write_error(&ClientError::Unavailable(
                "no node could be reached: http://x: Connection refused (os error 111)".into()
            )),
            Outcome::Failed(_)
        ));
        assert_eq!(
            classify_write_error(&ClientError::Unavailable(
                "no node could be reached: http://x: operation timed out".into()
            )),
            Outcome::Unknown {
                cause: UnknownCause::Timeout,
                detail: "no node could be reached: http://x: operation timed out".into()
            }
        );
        assert!(unknown(classify_write_error(&ClientError::Unavailable(
            "reading the answer: connection reset".into()
        ))));
    }

    #[test]
    fn register_values_round_trip_through_the_spec() {
        let spec = RegistryWorkload::register_spec("reg-0", 300);
        assert_eq!(spec.pool_size, 45);
        let v = Versioned {
            revision: 3,
            created_revision: 1,
            spec,
        };
        assert_eq!(register_value(&v), Some(300));
    }
}
