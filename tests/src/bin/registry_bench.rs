//! `registry-bench`: registry write throughput and latency of a 3-node `mcpd` cluster, next to a
//! 3-node etcd cluster driven by the same load generator, all on loopback.
//!
//! A write is, for `mcpd`, the creation of a tenant with a unique name (`POST /v1/tenants`) and,
//! for etcd, a put of a unique key through its v3 JSON gateway (`POST /v3/kv/put`) whose value is
//! the same JSON body. Writes go round-robin to the three nodes (a follower forwards to the
//! leader, as it does for real clients), from 1, 16 and 128 concurrent clients sharing one
//! keep-alive HTTP client, for a fixed time per level.
//!
//! Both clusters run side by side for the whole run, and each level's time is cut into
//! `--rounds` slices that alternate between the systems (mcpd first in even rounds, etcd first
//! in odd ones). On a shared machine, whose speed drifts by 10–20 % over minutes, this puts
//! both systems under the same conditions; the table gives each system's figures over all its
//! slices, and a second table the ratio of each round, with their median.
//!
//! Both systems run with TLS, as in production: `mcpd` serves HTTPS and its nodes speak mutual
//! TLS; etcd serves its clients HTTPS (a certificate of the same test CA) and its members speak
//! TLS to each other. `--plain` takes TLS off where each system can: `mcpd`'s
//! edge (`api.tls = off`; its nodes keep mutual TLS, which cannot be turned off) and all of
//! etcd's.
//!
//! The benchmark prints figures and asserts nothing about them. Latency percentiles are of
//! successful writes; failed writes are counted in `errors` and not in `writes/s`.
//!
//! ```text
//! registry-bench [--seconds 10] [--rounds 5] [--levels 1,16,128] [--max-writes 1000000] [--plain]
//! ```

use mcpcp_tests::bench::{find_on_path, percentile, round3, run_until_stopped};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use mcpcp_tests::etcd::{EtcdCluster, READY_WITHIN};
use mcpcp_tests::write::{send, System};
use mcpcp_tests::Cluster;
use serde_json::json;

/// Bound of one request (connect + answer); the servers bound their own quorum waits below it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that got an error pauses this long, so that a dead endpoint is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Error descriptions kept per level, to be printed.
const ERROR_SAMPLES: usize = 3;

#[derive(Debug, Parser)]
#[command(
    name = "registry-bench",
    about = "Registry write throughput and latency: 3 mcpd nodes vs 3 etcd members on loopback"
)]
struct Args {
    /// Duration of each concurrency level, per system, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Slices each level's time is cut into, alternating between the systems.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Numbers of concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 16, 128],
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    levels: Vec<u32>,
    /// Most writes sent in one level (a level ends at its time or at this count).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_writes: u64,
    /// Plain HTTP to both systems and between etcd's members (mcpd's nodes keep mutual TLS).
    #[arg(long)]
    plain: bool,
}

/// What one client saw during a level.
#[derive(Default)]
struct ClientTally {
    latencies: Vec<Duration>,
    errors: u64,
    samples: Vec<String>,
}

/// The figures of one (system, level).
#[derive(Debug, Clone)]
struct LevelResult {
    system: &'static str,
    clients: u32,
    errors: u64,
    elapsed: Duration,
    /// Every successful write's latency, sorted.
    latencies: Vec<Duration>,
}

impl LevelResult {
    fn new(
        system: &'static str,
        clients: u32,
        mut latencies: Vec<Duration>,
        errors: u64,
        elapsed: Duration,
    ) -> Self {
        latencies.sort_unstable();
        LevelResult {
            system,
            clients,
            errors,
            elapsed,
            latencies,
        }
    }

    /// Successful writes.
    fn writes(&self) -> u64 {
        self.latencies.len() as u64
    }

    fn p50(&self) -> Option<Duration> {
        percentile(&self.latencies, 0.50)
    }

    fn p99(&self) -> Option<Duration> {
        percentile(&self.latencies, 0.99)
    }

    fn max(&self) -> Option<Duration> {
        self.latencies.last().copied()
    }

    /// The figures of several slices of one (system, level) taken together.
    fn merge(slices: &[LevelResult]) -> Option<Self> {
        let first = slices.first()?;
        Some(LevelResult::new(
            first.system,
            first.clients,
            slices
                .iter()
                .flat_map(|r| r.latencies.iter().copied())
                .collect(),
            slices.iter().map(|r| r.errors).sum(),
            slices.iter().map(|r| r.elapsed).sum(),
        ))
    }

    fn writes_per_s(&self) -> f64 {
        self.writes() as f64 / self.elapsed.as_secs_f64()
    }

    fn json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| round3(d.as_secs_f64() * 1e3));
        json!({
            "system": self.system,
            "clients": self.clients,
            "writes": self.writes(),
            "errors": self.errors,
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "writes_per_s": round3(self.writes_per_s()),
            "p50_ms": ms(self.p50()),
            "p99_ms": ms(self.p99()),
            "max_ms": ms(self.max()),
        })
    }
}

/// The load generator shared by both systems.
struct Load {
    http: reqwest::Client,
    system: Arc<System>,
    urls: Arc<Vec<String>>,
    /// Numbers writes across levels, so every write's name is unique.
    seq: Arc<AtomicU64>,
}

impl Load {
    /// Makes one successful write through every node, so that the system is known to accept
    /// writes (leader elected, forwarding working) before anything is timed.
    async fn warm_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        for base in self.urls.iter() {
            loop {
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                match send(self.system.request(&self.http, base, n)).await {
                    Ok(()) => break,
                    Err(e) if Instant::now() > deadline => bail!(
                        "{} at {base} accepted no write within {READY_WITHIN:?}: {e}",
                        self.system.name()
                    ),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(())
    }

    /// `clients` concurrent clients writing for `duration` or `max_writes` writes.
    async fn run_level(&self, clients: u32, duration: Duration, max_writes: u64) -> LevelResult {
        let issued = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + duration;
        let mut tasks = Vec::with_capacity(clients as usize);
        for _ in 0..clients {
            let http = self.http.clone();
            let system = self.system.clone();
            let urls = self.urls.clone();
            let seq = self.seq.clone();
            let issued = issued.clone();
            tasks.push(tokio::spawn(async move {
                let mut tally = ClientTally::default();
                while Instant::now() < deadline
                    && issued.fetch_add(1, Ordering::Relaxed) < max_writes
                {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let base = &urls[(n % urls.len() as u64) as usize];
                    let req = system.request(&http, base, n);
                    let t0 = Instant::now();
                    match send(req).await {
                        Ok(()) => tally.latencies.push(t0.elapsed()),
                        Err(e) => {
                            tally.errors += 1;
                            if tally.samples.len() < ERROR_SAMPLES {
                                tally.samples.push(format!("{base}: {e}"));
                            }
                            tokio::time::sleep(ERROR_PAUSE).await;
                        }
                    }
                }
                tally
            }));
        }
        let mut latencies = Vec::new();
        let mut errors = 0;
        let mut samples: Vec<String> = Vec::new();
        for t in tasks {
            match t.await {
                Ok(tally) => {
                    latencies.extend(tally.latencies);
                    errors += tally.errors;
                    for s in tally.samples {
                        if samples.len() < ERROR_SAMPLES && !samples.contains(&s) {
                            samples.push(s);
                        }
                    }
                }
                Err(e) => {
                    errors += 1;
                    samples.push(format!("client task failed: {e}"));
                }
            }
        }
        let elapsed = started.elapsed();
        for s in &samples {
            eprintln!("  {} error: {s}", self.system.name());
        }
        LevelResult::new(self.system.name(), clients, latencies, errors, elapsed)
    }
}

// === mcpd ===

/// Starts a 3-node mcpd cluster and the load generator for it, once it accepts writes.
async fn start_mcpd(http: &reqwest::Client, plain: bool) -> anyhow::Result<(Load, Cluster)> {
    eprintln!(
        "mcpd: starting 3 nodes ({}, edge {})",
        mcpcp_tests::binary("mcpd").display(),
        if plain { "plain HTTP" } else { "HTTPS" }
    );
    let mut cluster = if plain {
        Cluster::start_with(3, &["--api-tls", "off"]).await
    } else {
        Cluster::start(3).await
    };
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    let load = Load {
        http: http.clone(),
        system: Arc::new(System::Mcpd {
            token: cluster.admin_token.clone(),
        }),
        urls: Arc::new(ids.iter().map(|id| cluster.url(*id)).collect()),
        seq: Arc::new(AtomicU64::new(0)),
    };
    if let Err(e) = load.warm_up().await {
        cluster.dump_logs();
        stop_mcpd(&mut cluster).await;
        return Err(e);
    }
    Ok((load, cluster))
}

/// The Raft term every mcpd node agrees on (`None` if they do not).
async fn mcpd_term(cluster: &Cluster) -> Option<u64> {
    let mut terms = Vec::new();
    for id in cluster.running_ids() {
        terms.push(cluster.node_client(id).cluster_status().await.ok()?.term);
    }
    terms.dedup();
    (terms.len() == 1).then(|| terms[0])
}

async fn stop_mcpd(cluster: &mut Cluster) {
    for id in cluster.running_ids() {
        cluster.kill(id).await;
    }
}

/// Starts a 3-member etcd cluster and the load generator for it, once it accepts writes.
async fn start_etcd(
    http: &reqwest::Client,
    bin: &Path,
    tls: bool,
) -> anyhow::Result<(Load, EtcdCluster)> {
    eprintln!(
        "etcd: starting 3 members ({}, {})",
        bin.display(),
        if tls { "TLS" } else { "plain" }
    );
    let mut etcd = EtcdCluster::start(bin, 3, tls).await?;
    let ready = async {
        etcd.wait_healthy(http).await?;
        let load = Load {
            http: http.clone(),
            system: Arc::new(System::Etcd),
            urls: Arc::new(etcd.client_urls()),
            seq: Arc::new(AtomicU64::new(0)),
        };
        load.warm_up().await?;
        anyhow::Ok(load)
    }
    .await;
    match ready {
        Ok(load) => Ok((load, etcd)),
        Err(e) => {
            etcd.dump_logs();
            etcd.stop().await?;
            Err(e)
        }
    }
}

/// The figures of one level: each system's slices, in round order.
struct Level {
    clients: u32,
    slices: Vec<Vec<LevelResult>>,
}

impl Level {
    /// Writes/s of the first system over the second's, per round.
    fn ratios(&self) -> Vec<f64> {
        match self.slices.as_slice() {
            [a, b] => a
                .iter()
                .zip(b)
                .map(|(a, b)| a.writes_per_s() / b.writes_per_s())
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Runs every level over `loads`, alternating the systems slice by slice.
async fn run_rounds(loads: &[&Load], args: &Args) -> Vec<Level> {
    let rounds = args.rounds;
    let slice = Duration::from_secs(args.seconds) / rounds;
    let max_writes = (args.max_writes / u64::from(rounds)).max(1);
    let mut levels = Vec::new();
    for &clients in &args.levels {
        eprintln!(
            "{clients} client(s): {rounds} round(s) of {:.1} s per system",
            slice.as_secs_f64()
        );
        let mut slices: Vec<Vec<LevelResult>> = vec![Vec::new(); loads.len()];
        for round in 0..rounds {
            let mut order: Vec<usize> = (0..loads.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let r = loads[i].run_level(clients, slice, max_writes).await;
                eprintln!(
                    "  round {}: {}: {:.1} writes/s, {} errors",
                    round + 1,
                    r.system,
                    r.writes_per_s(),
                    r.errors
                );
                slices[i].push(r);
            }
        }
        levels.push(Level { clients, slices });
    }
    levels
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

// === report ===

/// Facts of the machine the figures were taken on.
fn machine_facts() -> Vec<(&'static str, String)> {
    let mut facts = mcpcp_tests::bench::machine_basics();
    // Where the data directories (and their fsyncs) go.
    let tmp = std::env::temp_dir();
    let fs = filesystem_of(&tmp).unwrap_or_else(|| "unknown".into());
    facts.push(("data dirs", format!("{} ({fs})", tmp.display())));
    facts
}

/// The filesystem type of the mount `path` is on, from `/proc/mounts`.
fn filesystem_of(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _device = f.next()?;
            let mount = f.next()?;
            let fstype = f.next()?;
            path.starts_with(mount)
                .then(|| (mount.len(), fstype.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fstype)| fstype)
}

fn print_table(results: &[LevelResult]) {
    let ms = |d: Option<Duration>| match d {
        Some(d) => format!("{:.2}", d.as_secs_f64() * 1e3),
        None => "-".into(),
    };
    println!(
        "{:<8} {:>8} {:>10} {:>9} {:>9} {:>8}",
        "system", "clients", "writes/s", "p50 ms", "p99 ms", "errors"
    );
    for r in results {
        println!(
            "{:<8} {:>8} {:>10.1} {:>9} {:>9} {:>8}",
            r.system,
            r.clients,
            r.writes_per_s(),
            ms(r.p50()),
            ms(r.p99()),
            r.errors
        );
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let command: Vec<String> = std::env::args().collect();
    println!("command: {}", command.join(" "));
    let facts = machine_facts();
    for (k, v) in &facts {
        println!("{k}: {v}");
    }
    println!(
        "load: {} s per level and system in {} alternating slices, clients {:?}, at most {} writes per level, round-robin over 3 nodes; both clusters run side by side",
        args.seconds, args.rounds, args.levels, args.max_writes
    );
    println!(
        "tls: {}",
        if args.plain {
            "plain HTTP to both; etcd's members plain, mcpd's nodes mutual TLS"
        } else {
            "HTTPS to both; TLS between etcd's members, mutual TLS between mcpd's nodes"
        }
    );

    let etcd_bin = find_on_path("etcd");
    match &etcd_bin {
        Some(bin) => println!(
            "etcd: {} ({})",
            mcpcp_tests::bench::tool_version(bin),
            bin.display()
        ),
        None => println!(
            "etcd: not installed (no `etcd` on PATH), skipping etcd; \
             `apt-get install -y etcd-server` installs it"
        ),
    }
    println!();

    // One client for every request of the run: keep-alive, a connection per concurrent client.
    let http = mcpctl::https::client_builder(Some(&mcpcp_tests::test_ca_cert()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()
        .context("HTTP client")?;

    let (mcpd_load, mut mcpd) = start_mcpd(&http, args.plain).await.context("mcpd")?;
    let mut etcd = None;
    let mut etcd_status = "skipped: not installed".to_string();
    if let Some(bin) = &etcd_bin {
        match start_etcd(&http, bin, !args.plain).await {
            Ok(started) => {
                etcd = Some(started);
                etcd_status = mcpcp_tests::bench::tool_version(bin);
            }
            Err(e) => {
                eprintln!("etcd: {e:#}");
                etcd_status = format!("failed: {e:#}");
            }
        }
    }
    let mut loads = vec![&mcpd_load];
    if let Some((load, _)) = &etcd {
        loads.push(load);
    }
    let term_before = mcpd_term(&mcpd).await;
    let levels = run_rounds(&loads, &args).await;
    let term_after = mcpd_term(&mcpd).await;
    stop_mcpd(&mut mcpd).await;
    if let Some((_, cluster)) = etcd {
        cluster.stop().await?;
    }

    let results: Vec<LevelResult> = levels
        .iter()
        .flat_map(|l| l.slices.iter().filter_map(|s| LevelResult::merge(s)))
        .collect();
    println!();
    print_table(&results);
    let mut rounds_json = Vec::new();
    for level in &levels {
        let ratios = level.ratios();
        if let Some(m) = median(&ratios) {
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "{} client(s): mcpd/etcd writes/s by round {}; median {m:.2}",
                level.clients,
                each.join(" ")
            );
            rounds_json.push(json!({
                "clients": level.clients,
                "mcpd_over_etcd_by_round": ratios.iter().map(|r| round3(*r)).collect::<Vec<_>>(),
                "median": round3(m),
            }));
        }
    }
    // Nobody was killed: every election during the run is a false one.
    let elections = term_after
        .zip(term_before)
        .map(|(a, b)| a.saturating_sub(b));
    println!(
        "mcpd elections during the run (nothing was killed): {}",
        elections.map_or("unknown".into(), |e| e.to_string())
    );
    println!();
    let summary = json!({
        "mcpd_elections_during_run": elections,
        "bench": "registry",
        "command": command.join(" "),
        "machine": facts.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "seconds_per_level": args.seconds,
        "rounds": args.rounds,
        "ratios": rounds_json,
        "levels": args.levels,
        "tls": !args.plain,
        "etcd": etcd_status,
        "results": results.iter().map(LevelResult::json).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    run_until_stopped("registry-bench", run(Args::parse())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn merged_slices_count_every_write_and_second() {
        let ms = Duration::from_millis;
        let a = LevelResult::new("mcpd", 1, vec![ms(3), ms(1)], 1, Duration::from_secs(1));
        let b = LevelResult::new("mcpd", 1, vec![ms(2)], 0, Duration::from_secs(2));
        let m = LevelResult::merge(&[a, b]).unwrap();
        assert_eq!((m.writes(), m.errors), (3, 1));
        assert_eq!(m.elapsed, Duration::from_secs(3));
        assert_eq!((m.p50(), m.max()), (Some(ms(2)), Some(ms(3))));
        assert_eq!(m.writes_per_s(), 1.0);
    }
}
