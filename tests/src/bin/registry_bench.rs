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

use mcpcp_tests::bench::{find_on_path, percentile, root_cause, round3, run_until_stopped};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use mcpcp_tests::Cluster;
use serde_json::json;
use tokio::process::{Child, Command};

/// Bound of one request (connect + answer); the servers bound their own quorum waits below it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a system to accept its first writes, and for etcd to become healthy.
const READY_WITHIN: Duration = Duration::from_secs(60);
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

/// The system under load and how one of its writes is made.
enum System {
    Mcpd { token: String },
    Etcd,
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            System::Mcpd { .. } => "mcpd",
            System::Etcd => "etcd",
        }
    }

    /// Write number `seq` to the node at `base`. Both systems get the same JSON document: the
    /// body of a tenant creation.
    fn request(&self, http: &reqwest::Client, base: &str, seq: u64) -> reqwest::RequestBuilder {
        let name = format!("bench-{seq}");
        match self {
            System::Mcpd { token } => http
                .post(format!("{base}/v1/tenants"))
                .bearer_auth(token)
                .json(&json!({ "name": name })),
            System::Etcd => {
                let value = json!({ "name": name }).to_string();
                http.post(format!("{base}/v3/kv/put")).json(&json!({
                    "key": base64(format!("bench/{seq}").as_bytes()),
                    "value": base64(value.as_bytes()),
                }))
            }
        }
    }
}

/// Standard base64 with padding (RFC 4648 §4), for etcd's JSON gateway.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Sends one write and reads its whole answer (so the connection is reused).
async fn send(req: reqwest::RequestBuilder) -> Result<(), String> {
    let resp = req.send().await.map_err(|e| root_cause(&e))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| root_cause(&e))?;
    if status.is_success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.chars().take(200).collect();
        Err(format!("{status}: {text}"))
    }
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

async fn stop_mcpd(cluster: &mut Cluster) {
    for id in cluster.running_ids() {
        cluster.kill(id).await;
    }
}

// === etcd ===

/// Free loopback ports: all bound at once (so they differ), released when returned.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("binding a free loopback port")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

struct EtcdMember {
    name: String,
    client_url: String,
    log: PathBuf,
    child: Option<Child>,
}

/// A 3-member etcd cluster in a temporary directory. Dropping it kills the members and removes
/// the directory; [`EtcdCluster::stop`] does the same and waits for the processes to exit.
struct EtcdCluster {
    dir: Option<tempfile::TempDir>,
    members: Vec<EtcdMember>,
}

impl EtcdCluster {
    async fn start(bin: &Path, n: usize, tls: bool) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("mcpcp-bench-etcd-")
            .tempdir()
            .context("etcd temp dir")?;
        let ports = free_ports(2 * n)?;
        let names: Vec<String> = (1..=n).map(|i| format!("etcd{i}")).collect();
        let scheme = if tls { "https" } else { "http" };
        let peer_url = |i: usize| format!("{scheme}://127.0.0.1:{}", ports[2 * i]);
        let client_url = |i: usize| format!("{scheme}://127.0.0.1:{}", ports[2 * i + 1]);
        let tls_args = if tls {
            etcd_tls_args(dir.path())?
        } else {
            Vec::new()
        };
        let initial_cluster = (0..n)
            .map(|i| format!("{}={}", names[i], peer_url(i)))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("mcpcp-bench-{}", std::process::id());
        let mut cluster = EtcdCluster {
            dir: None,
            members: Vec::new(),
        };
        for (i, name) in names.iter().enumerate() {
            let data = dir.path().join(name);
            let log = dir.path().join(format!("{name}.log"));
            let out = std::fs::File::create(&log).context("etcd log file")?;
            let err = out.try_clone().context("etcd log handle")?;
            let child = Command::new(bin)
                .arg("--name")
                .arg(name)
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-peer-urls", &peer_url(i)])
                .args(["--initial-advertise-peer-urls", &peer_url(i)])
                .args(["--listen-client-urls", &client_url(i)])
                .args(["--advertise-client-urls", &client_url(i)])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-token", &token])
                .args(["--initial-cluster-state", "new"])
                .args(["--logger", "zap", "--log-level", "warn"])
                .args(&tls_args)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("spawning {}", bin.display()))?;
            cluster.members.push(EtcdMember {
                name: name.clone(),
                client_url: client_url(i),
                log,
                child: Some(child),
            });
        }
        cluster.dir = Some(dir);
        Ok(cluster)
    }

    fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Polls `GET /health` of every member until each says `{"health":"true"}`.
    async fn wait_healthy(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let mut healthy = 0;
            let mut last = String::new();
            for m in &mut self.members {
                if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    bail!("{} exited at start-up with {status}", m.name);
                }
                let answer = async {
                    let resp = http
                        .get(format!("{}/health", m.client_url))
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await
                        .map_err(|e| root_cause(&e))?;
                    let v: serde_json::Value = resp.json().await.map_err(|e| root_cause(&e))?;
                    match v["health"].as_str() {
                        Some("true") => Ok(()),
                        _ => Err(v.to_string()),
                    }
                };
                match answer.await {
                    Ok(()) => healthy += 1,
                    Err(e) => last = format!("{}: {e}", m.name),
                }
            }
            if healthy == self.members.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd not healthy within {READY_WITHIN:?}; last answer {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn dump_logs(&self) {
        for m in &self.members {
            let text = std::fs::read_to_string(&m.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("----- {} ({}) -----", m.name, m.log.display());
            for l in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("{l}");
            }
        }
    }

    /// Kills every member, waits for it to exit, and removes the directory.
    async fn stop(mut self) -> anyhow::Result<()> {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                c.kill()
                    .await
                    .with_context(|| format!("killing {}", m.name))?;
            }
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            dir.close()
                .with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    /// On an early return, a panic or a signal: kill, give the processes a moment to exit (so
    /// they write no more into the directory), then the directory is removed with `dir`.
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(c) = m.child.as_mut() {
                let _ = c.start_kill();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for m in &mut self.members {
            if let Some(c) = m.child.as_mut() {
                while !matches!(c.try_wait(), Ok(Some(_)) | Err(_)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

fn etcd_version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "etcd (version unknown)".into())
}

/// etcd's TLS flags: HTTPS for clients with a certificate for 127.0.0.1 from the test CA
/// (written into `dir`), and TLS between members with etcd's own self-signed certificates
/// (`--peer-auto-tls`: etcd checks a member's client certificate for the client-auth key usage,
/// which the test CA's server certificates do not carry). Every byte is encrypted as between
/// mcpd's nodes; only who checks whose certificate at the handshake differs, which kept-alive
/// connections pay once.
fn etcd_tls_args(dir: &Path) -> anyhow::Result<Vec<String>> {
    let ca = mcpcp_pki::Ca::load(mcpcp_tests::test_ca()).context("the test CA")?;
    let names = ["127.0.0.1".to_string(), "localhost".to_string()];
    let issued = ca
        .issue_server(&names, Duration::from_secs(24 * 3600))
        .context("etcd's certificate")?;
    let cert = dir.join("etcd.pem");
    let key = dir.join("etcd.key");
    mcpcp_pki::files::write_public(&cert, &issued.cert_pem)?;
    mcpcp_pki::files::write_private(&key, &issued.key_pem)?;
    let path = |p: &Path| p.display().to_string();
    Ok(vec![
        "--cert-file".into(),
        path(&cert),
        "--key-file".into(),
        path(&key),
        "--peer-auto-tls".into(),
    ])
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
        Some(bin) => println!("etcd: {} ({})", etcd_version(bin), bin.display()),
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
                etcd_status = etcd_version(bin);
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
    let levels = run_rounds(&loads, &args).await;
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
    println!();
    let summary = json!({
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
    fn base64_matches_rfc_4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

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
