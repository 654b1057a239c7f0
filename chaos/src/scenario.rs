//! One scenario: a fresh cluster, the workload's setup, then under load: warm-up, the fault,
//! the hold, healing, recovery; then the workload stops, the cluster settles, and every
//! checker judges what was recorded. The cluster's processes are stopped whatever happened.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::checker::availability::{self, Impairment, LeaderImpact, Recovery};
use crate::checker::leaders;
use crate::checker::Check;
use crate::cluster::{Cluster, ClusterError, NodeConfig, Placement};
use crate::faults::{Fault, FaultEnv, FaultError, Injected};
use crate::history::{Clock, History, Latency, Micros, Op, Tally};
use crate::janitor::Janitor;
use crate::mcpload::{McpConfig, McpWorkload};
use crate::poll;
use crate::sampler::Sampler;
use crate::workload::{FinalView, RegistryLoad, RegistryWorkload, Workload, WorkloadCtx};

/// Durations of a scenario's phases.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// Load before the fault.
    pub warmup: Duration,
    /// How long the fault stays.
    pub hold: Duration,
    /// The longest wait for a successful write after healing.
    pub recovery_max: Duration,
    /// Load after writes succeed again.
    pub tail: Duration,
    /// The longest wait for the cluster to settle and the nodes to converge.
    pub settle: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            warmup: Duration::from_secs(4),
            hold: Duration::from_secs(8),
            recovery_max: Duration::from_secs(30),
            tail: Duration::from_secs(4),
            settle: Duration::from_secs(60),
        }
    }
}

/// What every scenario of a run shares.
#[derive(Clone)]
pub struct RunEnv {
    pub janitor: Janitor,
    pub placement: Placement,
    pub node: NodeConfig,
    pub nodes: u64,
    pub timings: Timings,
    pub load: RegistryLoad,
    /// The MCP workload beside the registry's (`None`: registry only).
    pub mcp: Option<McpConfig>,
}

/// What a workload other than the registry's did, for the report.
#[derive(Debug, Clone)]
pub struct Figures {
    pub workload: &'static str,
    pub tally: Tally,
    pub rows: Vec<(String, String)>,
}

/// What a scenario that ran found.
#[derive(Debug, Clone)]
pub struct Ran {
    /// The workloads' names (`registry + mcp`).
    pub workload: String,
    pub description: String,
    pub tally: Tally,
    pub writes: Tally,
    pub write_latency: Latency,
    pub read_latency: Latency,
    /// The other workloads' figures.
    pub others: Vec<Figures>,
    pub checks: Vec<Check>,
    pub recovery: Recovery,
    pub notes: Vec<String>,
    pub duration: Duration,
}

#[derive(Debug, Clone)]
pub enum ScenarioOutcome {
    Ran(Box<Ran>),
    Skipped(String),
    /// The harness could not run it (the cluster did not start, a fault could not be
    /// injected): counts as a failure.
    Error {
        message: String,
        logs: Vec<String>,
    },
}

#[derive(Debug, Clone)]
pub struct ScenarioReport {
    pub index: usize,
    pub fault: Fault,
    pub seed: u64,
    pub outcome: ScenarioOutcome,
}

impl ScenarioReport {
    pub fn passed(&self) -> bool {
        match &self.outcome {
            ScenarioOutcome::Ran(r) => r.checks.iter().all(|c| c.passed),
            _ => false,
        }
    }

    pub fn skipped(&self) -> bool {
        matches!(self.outcome, ScenarioOutcome::Skipped(_))
    }
}

#[derive(Debug, thiserror::Error)]
enum ScenarioError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Fault(#[from] FaultError),
    #[error(transparent)]
    Workload(#[from] crate::workload::WorkloadError),
}

/// Why `fault` cannot run with this placement, if it cannot.
fn skip_reason(env: &RunEnv, fault: Fault) -> Option<String> {
    match (&env.placement, fault.needs_netns()) {
        (Placement::Loopback, true) => Some(
            "needs each node in its own network namespace (root and a working `ip netns`)".into(),
        ),
        (Placement::Netns(net), true)
            if net.firewall().is_none()
                && matches!(fault, Fault::PartitionLeader | Fault::PartitionMajority) =>
        {
            Some("neither iptables nor nft is installed (apt-get install -y iptables)".into())
        }
        _ => None,
    }
}

/// Runs scenario `index` with `fault`.
pub async fn run(env: &RunEnv, index: usize, fault: Fault, seed: u64) -> ScenarioReport {
    let report = |outcome| ScenarioReport {
        index,
        fault,
        seed,
        outcome,
    };
    if let Some(why) = skip_reason(env, fault) {
        return report(ScenarioOutcome::Skipped(why));
    }
    let dir = env
        .janitor
        .dir()
        .join(format!("{index:02}-{}", fault.name()));
    let mut cluster = match Cluster::start(
        &env.janitor,
        env.placement.clone(),
        env.node.clone(),
        &dir,
        env.nodes,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            return report(ScenarioOutcome::Error {
                message: format!("starting the cluster: {e}"),
                logs: vec![],
            })
        }
    };
    let outcome = match run_in(env, &mut cluster, &dir, index, fault, seed).await {
        Ok(ran) => {
            let logs_needed = !ran.checks.iter().all(|c| c.passed);
            let mut ran = ran;
            if logs_needed {
                ran.notes.extend(cluster.log_tails(15));
            }
            ScenarioOutcome::Ran(Box::new(ran))
        }
        Err(ScenarioError::Fault(FaultError::Skip(why))) => ScenarioOutcome::Skipped(why),
        Err(e) => ScenarioOutcome::Error {
            message: e.to_string(),
            logs: cluster.log_tails(15),
        },
    };
    cluster.shutdown().await;
    if let Placement::Netns(net) = &env.placement {
        net.heal_all();
    }
    report(outcome)
}

/// Polls the history until a write invoked at or after `since` succeeded, or `within` passes.
async fn wait_write_ok(history: &History, since: Micros, within: Duration) -> bool {
    poll::until(within, Duration::from_millis(100), || async {
        history
            .any(|op| op.kind.is_write() && op.invoke >= since && op.outcome.is_ok())
            .then_some(())
    })
    .await
    .is_some()
}

async fn run_in(
    env: &RunEnv,
    cluster: &mut Cluster,
    dir: &std::path::Path,
    index: usize,
    fault: Fault,
    seed: u64,
) -> Result<Ran, ScenarioError> {
    let started = Instant::now();
    let t = env.timings;
    let mut rng = fastrand::Rng::with_seed(seed);
    // The registry's workload comes first: its writes measure recovery.
    let registry = RegistryWorkload::new(index, env.load);
    let mcp = env
        .mcp
        .clone()
        .map(|cfg| McpWorkload::new(index, cfg, dir, &env.janitor));
    let mut workloads: Vec<&dyn Workload> = vec![&registry];
    if let Some(m) = &mcp {
        workloads.push(m);
    }
    let admin = cluster.admin(Duration::from_secs(10))?;
    let targets = cluster.targets();
    for w in &workloads {
        w.setup(&admin, &targets).await?;
    }
    let stop_within = workloads
        .iter()
        .map(|w| w.stop_within())
        .fold(cluster.client_timeout(), Duration::max);

    let clock = Clock::new();
    // A history per workload; the registry's is `history`.
    let histories: Vec<History> = workloads.iter().map(|_| History::new(clock)).collect();
    let history = histories[0].clone();
    // Generous bounds: every phase below has its own, shorter one.
    let hard_deadline =
        Instant::now() + t.warmup + t.hold + t.recovery_max + t.tail + Duration::from_secs(300);
    let sampler = Sampler::start(cluster.targets(), clock, hard_deadline);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = JoinSet::new();
    for (w, h) in workloads.iter().zip(&histories) {
        let ctx = WorkloadCtx {
            targets: cluster.targets(),
            history: h.clone(),
            seed: rng.u64(..),
            stop: stop_rx.clone(),
            deadline: hard_deadline,
        };
        for f in w.workers(&ctx) {
            workers.spawn(f);
        }
    }
    let load_start = clock.now();

    // Warm-up: load without a fault.
    tokio::time::sleep(t.warmup).await;
    let mut crashed = Vec::new();
    scan_crashes(cluster, &mut crashed);
    let leader = cluster.wait_leader(Duration::from_secs(15)).await?;
    let fault_at = clock.now();
    let injected = fault
        .inject(
            cluster,
            leader,
            FaultEnv {
                rng: &mut rng,
                clock,
            },
        )
        .await;
    let mut injected: Injected = match injected {
        Ok(i) => i,
        Err(e) => {
            stop_workers(&stop_tx, &mut workers, stop_within).await;
            sampler.finish().await;
            return Err(e.into());
        }
    };
    // Hold: the fault stays, under load.
    tokio::time::sleep(t.hold).await;
    scan_crashes(cluster, &mut crashed);
    let heal_at = clock.now();
    let healed = fault.heal(cluster, &mut injected, clock).await;
    if let Err(e) = healed {
        stop_workers(&stop_tx, &mut workers, stop_within).await;
        sampler.finish().await;
        return Err(e.into());
    }
    let mut notes = injected.notes.clone();
    if !wait_write_ok(&history, heal_at, t.recovery_max).await {
        notes.push(format!(
            "no write succeeded within {:?} of healing",
            t.recovery_max
        ));
    }
    tokio::time::sleep(t.tail).await;
    stop_workers(&stop_tx, &mut workers, stop_within).await;
    let load_end = clock.now();

    // Settle, then judge.
    let mut checks = Vec::new();
    scan_crashes(cluster, &mut crashed);
    let expected_crash = |line: &String| {
        injected
            .may_crash
            .iter()
            .any(|v| line.starts_with(&format!("node {v} ")))
    };
    let unexpected: Vec<String> = crashed
        .iter()
        .filter(|l| !expected_crash(l))
        .cloned()
        .collect();
    notes.extend(crashed.iter().filter(|l| expected_crash(l)).cloned());
    // A node the fault made exit (when is not known): calls to it from the fault on are the
    // fault's doing.
    for v in injected.may_crash.clone() {
        if crashed.iter().any(|l| l.starts_with(&format!("node {v} "))) {
            injected.impairments.push(Impairment {
                node: v,
                from: fault_at,
                to: None,
                why: "exited, as the fault may make it".into(),
            });
        }
    }
    checks.push(if unexpected.is_empty() {
        Check::pass("no node crashed", "every member's process ran to the end")
    } else {
        Check::fail(
            "no node crashed",
            format!("{} nodes exited on their own", unexpected.len()),
            unexpected,
            Default::default(),
        )
    });
    let settle_started = Instant::now();
    checks.push(match cluster.wait_settled(t.settle).await {
        Ok(index) => Check::pass(
            "cluster settled",
            format!(
                "every live member applied index {index} under one leader after {:.1}s",
                settle_started.elapsed().as_secs_f64()
            ),
        ),
        Err(e) => Check::fail("cluster settled", e.to_string(), vec![], Default::default()),
    });
    let all_ops: Vec<Vec<Op>> = histories.iter().map(History::snapshot).collect();
    let ops: Vec<Op> = all_ops[0].clone();
    let nodes: Vec<(u64, mcpctl::AdminClient)> = cluster
        .live_members()
        .into_iter()
        .filter_map(|id| {
            cluster
                .client_of(id, Duration::from_secs(5))
                .ok()
                .map(|c| (id, c))
        })
        .collect();
    let mut others = Vec::new();
    for (i, (w, wops)) in workloads.iter().zip(&all_ops).enumerate() {
        checks.extend(
            w.check(FinalView {
                nodes: nodes.clone(),
                ops: wops,
                clock,
                within: t.settle,
                impairments: &injected.impairments,
            })
            .await,
        );
        notes.extend(w.notes());
        if i > 0 {
            others.push(Figures {
                workload: w.name(),
                tally: w.tally(wops),
                rows: w.figures(wops),
            });
        }
    }
    let samples = sampler.finish().await;
    checks.push(leaders::one_leader_per_term(&samples));
    checks.push(availability::unanswered(&ops, &injected.impairments));
    let recovery = availability::recovery(
        &ops,
        &samples,
        fault_at,
        &LeaderImpact {
            disrupts_leader: injected.disrupts_leader,
            victims: injected.victims.clone(),
        },
        (load_start, load_end),
    );
    let (writes, reads): (Vec<Op>, Vec<Op>) = ops.iter().cloned().partition(|o| o.kind.is_write());
    Ok(Ran {
        workload: workloads
            .iter()
            .map(|w| w.name())
            .collect::<Vec<_>>()
            .join(" + "),
        description: injected.description.clone(),
        tally: Tally::of(&ops),
        writes: Tally::of(&writes),
        write_latency: Latency::of(&writes),
        read_latency: Latency::of(&reads),
        others,
        checks,
        recovery,
        notes,
        duration: started.elapsed(),
    })
}

/// Adds a line for every member whose process exited without the harness stopping it.
fn scan_crashes(cluster: &mut Cluster, crashed: &mut Vec<String>) {
    for id in cluster.members() {
        if let Some(status) = cluster.check_exited(id) {
            crashed.push(format!("node {id} exited on its own: {status}"));
        }
    }
}

/// Tells the workers to stop and waits for them (each call is bounded by the client timeout),
/// aborting any that outlive that.
async fn stop_workers(stop: &watch::Sender<bool>, workers: &mut JoinSet<()>, client: Duration) {
    let _ = stop.send(true);
    let _ = tokio::time::timeout(client + Duration::from_secs(5), async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    workers.abort_all();
}
