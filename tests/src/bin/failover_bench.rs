//! `failover-bench`: how long writes pause when the leader dies, for a 3-node `mcpd` cluster
//! next to a 3-member etcd cluster on the same machine, in the same run.
//!
//! Each round, for each system in turn: writers (`--writers`, spread over every node, as
//! clients behind a load balancer are) write without pause; once writes flow, the leader is
//! killed with SIGKILL; the **pause** is the time from the kill to the first acknowledged
//! write sent after it. Such writes are probes, one every 10 ms, each on its own task and to
//! the nodes in turn, so that writers stuck on the dead leader (etcd holds a proposal for up to
//! 7 s) do not hide the moment the cluster takes writes again. A writer whose node died (or
//! answered an error) moves to the next node. Then the killed node is started again on its data, and the next round waits
//! until every node agrees on a leader. Rounds alternate between the systems, so that a
//! machine whose speed drifts gives both the same conditions.
//!
//! `--idle SECONDS` first watches each idle cluster for that long and reports the elections
//! it saw (a false election: a leader change with nobody killed).
//!
//! The benchmark prints figures and asserts nothing about them.
//!
//! ```text
//! failover-bench [--rounds 10] [--writers 8] [--idle 0] [--no-etcd]
//! ```

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use mcpcp_tests::bench::{find_on_path, percentile, run_until_stopped};
use mcpcp_tests::etcd::EtcdCluster;
use mcpcp_tests::write::{send, System};
use mcpcp_tests::Cluster;
use serde_json::json;

/// Bound of one write (connect + answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A writer that got an error waits this long before it tries the next node.
const ERROR_PAUSE: Duration = Duration::from_millis(5);
/// How often a probe write is sent after the kill.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// How long a round may wait for writes to flow, or to come back after the kill.
const WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(
    name = "failover-bench",
    about = "Write pause after a SIGKILL of the leader: 3 mcpd nodes vs 3 etcd members on loopback"
)]
struct Args {
    /// Leader kills per system.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Concurrent writers, spread over the nodes.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=512))]
    writers: u32,
    /// Watch each idle cluster this many seconds first and count its elections.
    #[arg(long, default_value_t = 0)]
    idle: u64,
    /// mcpd only (etcd is installed by scripts/bench-failover.sh otherwise).
    #[arg(long)]
    no_etcd: bool,
}

/// A system under test: how to find its leader, kill it and bring it back.
enum Subject {
    Mcpd(Cluster),
    Etcd(EtcdCluster),
}

impl Subject {
    fn name(&self) -> &'static str {
        match self {
            Subject::Mcpd(_) => "mcpd",
            Subject::Etcd(_) => "etcd",
        }
    }

    fn system(&self) -> System {
        match self {
            Subject::Mcpd(c) => System::Mcpd {
                token: c.admin_token.clone(),
            },
            Subject::Etcd(_) => System::Etcd,
        }
    }

    fn urls(&self) -> Vec<String> {
        match self {
            Subject::Mcpd(c) => c.nodes.keys().map(|id| c.url(*id)).collect(),
            Subject::Etcd(e) => e.client_urls(),
        }
    }

    /// Waits until the cluster has a leader every running member agrees on (mcpd) or that a
    /// member reports (etcd); returns its index in [`Subject::urls`] and the term or `None`.
    async fn leader(&mut self, http: &reqwest::Client) -> anyhow::Result<(usize, Option<u64>)> {
        match self {
            Subject::Mcpd(c) => {
                let id = c.wait_leader().await;
                let term = c
                    .node_client(id)
                    .cluster_status()
                    .await
                    .ok()
                    .map(|s| s.term);
                let index = c.nodes.keys().position(|k| *k == id).context("leader id")?;
                Ok((index, term))
            }
            Subject::Etcd(e) => {
                let deadline = Instant::now() + WITHIN;
                loop {
                    if let Some(i) = e.leader(http).await {
                        return Ok((i, None));
                    }
                    if Instant::now() > deadline {
                        bail!("etcd has no leader within {WITHIN:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        match self {
            Subject::Mcpd(c) => {
                let id = *c.nodes.keys().nth(index).context("node")?;
                c.kill(id).await;
                Ok(())
            }
            Subject::Etcd(e) => e.kill(index).await,
        }
    }

    async fn restart(&mut self, index: usize, http: &reqwest::Client) -> anyhow::Result<()> {
        match self {
            Subject::Mcpd(c) => {
                let id = *c.nodes.keys().nth(index).context("node")?;
                c.restart(id).await;
                c.wait_leader().await;
                Ok(())
            }
            Subject::Etcd(e) => {
                e.restart(index)?;
                e.wait_healthy(http).await
            }
        }
    }

    /// Elections seen over `secs` of idleness: mcpd by its term, etcd by its leader.
    async fn idle(&mut self, http: &reqwest::Client, secs: u64) -> anyhow::Result<u64> {
        let (first, term) = self.leader(http).await?;
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut changes = 0;
        let (mut leader, mut term) = (first, term);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (l, t) = self.leader(http).await?;
            if l != leader || t != term {
                changes += 1;
            }
            (leader, term) = (l, t);
        }
        Ok(changes)
    }
}

/// The writers' acknowledged writes in a round.
#[derive(Default)]
struct Acks(AtomicU64);

impl Acks {
    fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Writers spread over `urls`, until `stop`.
fn start_writers(
    http: &reqwest::Client,
    system: Arc<System>,
    urls: Arc<Vec<String>>,
    writers: u32,
    seq: Arc<AtomicU64>,
    acks: Arc<Acks>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers as usize)
        .map(|w| {
            let (http, system, urls, seq, acks, stop) = (
                http.clone(),
                system.clone(),
                urls.clone(),
                seq.clone(),
                acks.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut node = w % urls.len();
                while !stop.load(Ordering::Relaxed) {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let req = system
                        .request(&http, &urls[node], n)
                        .timeout(REQUEST_TIMEOUT);
                    match send(req).await {
                        Ok(()) => {
                            acks.0.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            node = (node + 1) % urls.len();
                            tokio::time::sleep(ERROR_PAUSE).await;
                        }
                    }
                }
            })
        })
        .collect()
}

/// One kill of the leader under write load; returns the pause.
async fn round(
    subject: &mut Subject,
    http: &reqwest::Client,
    writers: u32,
    seq: &Arc<AtomicU64>,
) -> anyhow::Result<Duration> {
    let acks = Arc::new(Acks::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = start_writers(
        http,
        Arc::new(subject.system()),
        Arc::new(subject.urls()),
        writers,
        seq.clone(),
        acks.clone(),
        stop.clone(),
    );
    let outcome = async {
        let deadline = Instant::now() + WITHIN;
        while acks.count() < 20 * u64::from(writers) {
            if Instant::now() > deadline {
                bail!("{}: writes did not flow within {WITHIN:?}", subject.name());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The leader as it is now, after the warm-up.
        let (leader, _) = subject.leader(http).await?;
        let killed_at = Instant::now();
        subject.kill(leader).await?;
        Ok::<_, anyhow::Error>((leader, killed_at))
    }
    .await;
    let (leader, killed_at) = match outcome {
        Ok(k) => k,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
    };
    let outcome = async {
        // Probes: a fresh write every PROBE_EVERY, each on its own task and node in turn, so
        // that writes stuck on the dead leader do not hide the moment the cluster takes
        // writes again.
        let system = Arc::new(subject.system());
        let urls = subject.urls();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut probes = tokio::task::JoinSet::new();
        let mut k = 0usize;
        let mut next = tokio::time::interval(PROBE_EVERY);
        loop {
            tokio::select! {
                Some(done) = rx.recv() => {
                    probes.abort_all();
                    return Ok::<Duration, anyhow::Error>(done - killed_at);
                }
                _ = next.tick() => {
                    if killed_at.elapsed() > WITHIN {
                        bail!("{}: no write acknowledged within {WITHIN:?} of the kill", subject.name());
                    }
                    let (http, system, url, tx) =
                        (http.clone(), system.clone(), urls[k % urls.len()].clone(), tx.clone());
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    probes.spawn(async move {
                        if send(system.request(&http, &url, n).timeout(REQUEST_TIMEOUT)).await.is_ok() {
                            let _ = tx.send(Instant::now());
                        }
                    });
                    k += 1;
                }
            }
        }
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    subject.restart(leader, http).await?;
    outcome
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 10.0).round() / 10.0
}

fn summary(name: &str, pauses: &[Duration]) -> serde_json::Value {
    let mut sorted = pauses.to_vec();
    sorted.sort();
    let p = |q| percentile(&sorted, q).map(ms);
    println!(
        "{name:<6} {:>6} {:>8} {:>8} {:>8} {:>8}   {}",
        sorted.len(),
        p(0.0).map_or("-".into(), |v| format!("{v:.0}")),
        p(0.5).map_or("-".into(), |v| format!("{v:.0}")),
        p(0.9).map_or("-".into(), |v| format!("{v:.0}")),
        sorted
            .last()
            .map_or("-".into(), |v| format!("{:.0}", ms(*v))),
        pauses
            .iter()
            .map(|d| format!("{:.0}", ms(*d)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    json!({
        "system": name,
        "rounds": sorted.len(),
        "min_ms": p(0.0),
        "p50_ms": p(0.5),
        "p90_ms": p(0.9),
        "max_ms": sorted.last().map(|d| ms(*d)),
        "pauses_ms": pauses.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let http = mcpctl::https::client_builder(Some(&mcpcp_tests::test_ca_cert()))?
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()?;
    let mut subjects = vec![Subject::Mcpd(Cluster::start(3).await)];
    if !args.no_etcd {
        let bin = find_on_path("etcd")
            .context("etcd is not on PATH: run scripts/bench-failover.sh, or pass --no-etcd")?;
        println!(
            "etcd: {} ({})",
            mcpcp_tests::bench::tool_version(&bin),
            bin.display()
        );
        let mut etcd = EtcdCluster::start(&bin, 3, true).await?;
        etcd.wait_healthy(&http).await?;
        subjects.push(Subject::Etcd(etcd));
    }
    println!(
        "{} writers; rounds: {}; mcpd: default election settings",
        args.writers, args.rounds
    );
    if args.idle > 0 {
        for s in &mut subjects {
            let changes = s.idle(&http, args.idle).await?;
            println!("{}: {changes} elections in {} s idle", s.name(), args.idle);
        }
    }
    let seqs: Vec<Arc<AtomicU64>> = subjects.iter().map(|_| Arc::default()).collect();
    let mut pauses: Vec<Vec<Duration>> = subjects.iter().map(|_| Vec::new()).collect();
    for r in 0..args.rounds {
        // Alternate which system goes first.
        let order: Vec<usize> = if r % 2 == 0 {
            (0..subjects.len()).collect()
        } else {
            (0..subjects.len()).rev().collect()
        };
        for i in order {
            let pause = round(&mut subjects[i], &http, args.writers, &seqs[i]).await?;
            eprintln!(
                "round {r}: {} paused {:.0} ms",
                subjects[i].name(),
                ms(pause)
            );
            pauses[i].push(pause);
        }
    }
    println!("\nwrite pause after a SIGKILL of the leader (ms)");
    println!(
        "{:<6} {:>6} {:>8} {:>8} {:>8} {:>8}   each round",
        "system", "rounds", "min", "p50", "p90", "max"
    );
    let rows: Vec<_> = subjects
        .iter()
        .zip(&pauses)
        .map(|(s, p)| summary(s.name(), p))
        .collect();
    println!("{}", json!({ "failover": rows }));
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    run_until_stopped("failover-bench", run(Args::parse())).await
}
