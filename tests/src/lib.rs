//! The harness of the end-to-end tests and benchmarks: [`Cluster`] starts real `mcpd`
//! processes on loopback (each binds port 0 and reports the port it got), forms a cluster the
//! way an operator does (through the admin API), and kills every process it started when it is
//! dropped, printing the nodes' logs when a test failed.
//!
//! Waiting is always a condition polled until a deadline ([`eventually`]), never a bare sleep.
//!
//! Every cluster the harness starts is a cluster of one CA and data key, the harness's own
//! ([`test_ca`]): each node gets them in its TLS directory before its first start, as an
//! operator installs them, and every client here ([`https`]) trusts the CA.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mcpcp_proto::api::Member;
use mcpctl::AdminClient;
use tokio::process::{Child, Command};

/// Polls `check` until it returns `Some` or `within` passes; panics with `what` on timeout.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The CA of every cluster the harness starts: `ca.pem` and `ca.key` in one directory under
/// the system's temporary directory, made once and reused by later runs (it is valid for ten
/// years and trusted by nothing outside these tests).
pub fn test_ca() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("mcpcp-test-ca");
        if !(dir.join("ca.key").exists() && dir.join("ca.pem").exists()) {
            // Made aside and renamed into place: concurrent test processes agree on one CA.
            let fresh = std::env::temp_dir().join(format!("mcpcp-test-ca.{}", std::process::id()));
            let ca = mcpcp_pki::Ca::create(&mcpcp_pki::ClusterId::new("e2e").expect("valid"))
                .expect("test CA");
            ca.write(&fresh).expect("write test CA");
            mcpcp_pki::datakey::write_new(&fresh).expect("write the data key");
            if std::fs::rename(&fresh, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&fresh);
            }
        }
        // A CA made before data keys existed gets one.
        mcpcp_pki::datakey::write_new(&dir).expect("the test data key");
        dir
    })
}

/// The test CA's certificate, which clients trust.
pub fn test_ca_cert() -> PathBuf {
    test_ca().join("ca.pem")
}

/// An HTTPS client that trusts the test CA.
pub fn https() -> reqwest::Client {
    mcpctl::https::client(Some(&test_ca_cert())).expect("HTTPS client")
}

/// A built binary of this workspace: `$NAME_BIN` (e.g. `MCPD_BIN`) or the one next to the
/// test executable's directory (`target/<profile>/`).
pub fn binary(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    let mut dir = exe.parent().expect("in a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace` first or set {var}",
        path.display()
    );
    path
}

/// One `mcpd` process.
pub struct Node {
    pub id: u64,
    pub member: Member,
    /// `https`, or `http` for a node started with `--api-tls off`.
    pub scheme: &'static str,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.member.http_addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// A cluster of real `mcpd` processes in a temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, Node>,
    pub admin_token: String,
    mcpd: PathBuf,
    args: Vec<String>,
}

impl Cluster {
    /// Starts `n` nodes with default settings and forms a cluster of them.
    pub async fn start(n: u64) -> Cluster {
        Self::start_with(n, &[]).await
    }

    /// Starts `n` nodes, each with the extra `mcpd` flags `args`, and forms a cluster.
    pub async fn start_with(n: u64, args: &[&str]) -> Cluster {
        Self::start_binary(&binary("mcpd"), n, args).await
    }

    /// [`Cluster::start_with`] of another `mcpd` binary (an earlier build, for a benchmark's
    /// anchor).
    pub async fn start_binary(mcpd: &Path, n: u64, args: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("mcpcp-e2e-")
            .tempdir()
            .expect("temp dir");
        let mut cluster = Cluster {
            dir,
            nodes: BTreeMap::new(),
            admin_token: String::new(),
            mcpd: mcpd.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        for id in 1..=n {
            cluster.spawn(id).await;
        }
        let members: Vec<Member> = cluster.nodes.values().map(|n| n.member.clone()).collect();
        let anon = AdminClient::new(&[cluster.nodes[&1].url()], None, Some(&test_ca_cert()))
            .expect("client");
        let init = anon.init(members).await.expect("cluster init");
        cluster.admin_token = init.admin_token;
        cluster.wait_leader().await;
        cluster
    }

    fn node_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}"))
    }

    /// Starts process `id` (not yet a member unless its data says so) and waits until it has
    /// reported its addresses.
    pub async fn spawn(&mut self, id: u64) -> Member {
        self.spawn_process(id, &[], true).await
    }

    /// Starts process `id` with an empty TLS directory and a join token: it fetches the CA
    /// and the data key itself, through the node at `via` (see `mcpd::join`).
    pub async fn spawn_joining(&mut self, id: u64, via: &str, token: &str) -> Member {
        let args = [
            "--join".to_string(),
            via.to_string(),
            "--join-token".into(),
            token.into(),
        ];
        self.spawn_process(id, &args, false).await
    }

    async fn spawn_process(&mut self, id: u64, extra: &[String], install_ca: bool) -> Member {
        // A restarted node keeps its addresses: peers know it by them.
        let (http, grpc) = match self.nodes.get(&id) {
            Some(old) => (old.member.http_addr.clone(), old.member.grpc_addr.clone()),
            None => ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()),
        };
        let launch = mcpctl::launch::Launch {
            http_addr: http,
            grpc_addr: grpc,
            args: self.args.iter().chain(extra).cloned().collect(),
            ca_dir: install_ca.then(|| test_ca().to_path_buf()),
            ..mcpctl::launch::Launch::new(&self.mcpd, id, &self.node_dir(id), test_ca())
        };
        let (cmd, files) = launch.prepare().expect("the node directory");
        let mut cmd = Command::from(cmd);
        cmd.env("RUST_LOG", "info,openraft=warn").kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn mcpd");
        let pid = child.id().expect("pid");
        let exited = || child.try_wait().ok().flatten().map(|s| s.to_string());
        let member = mcpctl::launch::wait_started(id, &files, pid, exited)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (data, log) = (files.data_dir, files.log);
        let plain = self
            .args
            .windows(2)
            .any(|w| w[0] == "--api-tls" && w[1] == "off")
            || self.args.iter().any(|a| a == "--api-tls=off");
        self.nodes.insert(
            id,
            Node {
                id,
                member: member.clone(),
                scheme: if plain { "http" } else { "https" },
                data_dir: data,
                log,
                child: Some(child),
            },
        );
        member
    }

    /// kill -9.
    pub async fn kill(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(mut child) = node.child.take() {
            child.kill().await.expect("kill -9");
        }
    }

    /// SIGTERM, then waits for the process to exit (graceful shutdown).
    pub async fn terminate(&mut self, id: u64) -> std::process::ExitStatus {
        let node = self.nodes.get_mut(&id).expect("known node");
        let mut child = node.child.take().expect("running");
        let pid = child.id().expect("pid");
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("exits within 30 s of SIGTERM")
            .expect("wait")
    }

    /// Restarts a killed node with its data and addresses.
    pub async fn restart(&mut self, id: u64) {
        assert!(!self.nodes[&id].running(), "node {id} is running");
        self.spawn(id).await;
    }

    /// Kills node `id` and deletes its data directory.
    pub async fn wipe(&mut self, id: u64) {
        self.kill(id).await;
        let dir = self.nodes[&id].data_dir.clone();
        std::fs::remove_dir_all(&dir).expect("wipe data dir");
        self.nodes.remove(&id);
    }

    pub fn running_ids(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.running())
            .map(|n| n.id)
            .collect()
    }

    /// An admin client of every running node.
    pub fn client(&self) -> AdminClient {
        let eps: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.running())
            .map(|n| n.url())
            .collect();
        AdminClient::new(&eps, Some(self.admin_token.clone()), Some(&test_ca_cert()))
            .expect("client")
    }

    /// An admin client of one node only.
    pub fn node_client(&self, id: u64) -> AdminClient {
        AdminClient::new(
            &[self.nodes[&id].url()],
            Some(self.admin_token.clone()),
            Some(&test_ca_cert()),
        )
        .expect("client")
    }

    /// The sum of a Prometheus series' samples on `node_url`'s `/metrics` (read with the
    /// admin token): every sample whose line starts with `series` (a name, or a name with its
    /// first labels), 0 when there is none. Also returns the whole text, for failure messages.
    pub async fn scrape_sum(&self, node_url: &str, series: &str) -> (f64, String) {
        let text = https()
            .get(format!("{node_url}/metrics"))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        let sum = text
            .lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum();
        (sum, text)
    }

    pub fn url(&self, id: u64) -> String {
        self.nodes[&id].url()
    }

    /// A gRPC channel to `grpc_addr` that speaks as node `as_node` of the harness's cluster:
    /// mutual TLS with a certificate the test CA issues for that node id, as a peer presents.
    pub async fn peer_channel(
        &self,
        grpc_addr: &str,
        as_node: u64,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        let data = self.dir.path().join(format!("as-node{as_node}"));
        mcpctl::dev::install_ca(test_ca(), &data).expect("the CA in a TLS directory");
        let tls = mcpd::tls::NodeTls::load(&data.join("tls"), as_node, Duration::from_secs(3600))
            .expect("a node identity");
        // A test client takes any node of the cluster at the address it dials.
        let members = mcpd::tls::members::Members::default();
        let connector = mcpd::tls::peer::PeerConnector::new(&tls, members).expect("connector");
        tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))?
            .connect_with_connector(connector)
            .await
    }

    /// Makes the started node `member` a voter (`mcpctl cluster add-node`).
    pub async fn add_member(&self, member: &Member) {
        self.client()
            .add_node(&mcpcp_proto::api::AddNodeRequest {
                id: member.id,
                http_addr: member.http_addr.clone(),
                grpc_addr: member.grpc_addr.clone(),
                voter: true,
            })
            .await
            .unwrap_or_else(|e| panic!("add node {}: {e}", member.id));
        // Added is not caught up: the new member serves the admin API once it has the
        // registry (the tokens) and knows the leader.
        let client = self.node_client(member.id);
        eventually(
            "the new member caught up with the registry",
            Duration::from_secs(30),
            || {
                let client = client.clone();
                async move { client.cluster_status().await.ok()?.leader }
            },
        )
        .await;
    }

    /// A running node that is not `leader`.
    pub fn other_than(&self, leader: u64) -> u64 {
        self.running_ids()
            .into_iter()
            .find(|id| *id != leader)
            .expect("a running node besides the leader")
    }

    /// Waits for a leader; returns a running node that is not it.
    pub async fn follower(&self) -> u64 {
        let leader = self.wait_leader().await;
        self.other_than(leader)
    }

    /// Waits until every running node agrees on one running leader; returns its id.
    pub async fn wait_leader(&self) -> u64 {
        let running = self.running_ids();
        eventually(
            "a leader every running node agrees on",
            Duration::from_secs(30),
            || {
                let clients: Vec<_> = running.iter().map(|id| self.node_client(*id)).collect();
                let running = running.clone();
                async move {
                    let mut leader = None;
                    for c in clients {
                        let s = c.cluster_status().await.ok()?;
                        let l = s.leader?;
                        if leader.is_some_and(|x| x != l) || !running.contains(&l) {
                            return None;
                        }
                        leader = Some(l);
                    }
                    leader
                }
            },
        )
        .await
    }

    /// Tail of every node's log.
    pub fn dump_logs(&self) {
        for n in self.nodes.values() {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            eprintln!("----- node {} ({}) -----", n.id, n.log.display());
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
    }

    pub fn data_dirs(&self) -> Vec<&Path> {
        self.nodes.values().map(|n| n.data_dir.as_path()).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for n in self.nodes.values_mut() {
            if let Some(c) = n.child.as_mut() {
                let _ = c.start_kill();
            }
        }
    }
}

/// A plain-HTTP MCP client session (2025-06-18), for tests that must not depend on an SDK:
/// `mcpcp_testkit`'s, trusting the test CA.
pub use mcpcp_testkit::McpSession;

/// Opens MCP sessions against the test cluster (the test CA trusted, 60 s per request).
pub struct Mcp;

impl Mcp {
    /// `initialize` + `notifications/initialized` at `url`, declaring no client capability.
    pub async fn open(url: &str, token: &str) -> Result<McpSession, String> {
        Self::open_declaring(url, token, serde_json::json!({})).await
    }

    /// As [`Mcp::open`], declaring `capabilities` (`{"elicitation": {}}`: the server may ask
    /// this client; this client never answers, so such a call ends at its timeout).
    pub async fn open_declaring(
        url: &str,
        token: &str,
        capabilities: serde_json::Value,
    ) -> Result<McpSession, String> {
        let http = mcpcp_testkit::HttpMcp::new(token, &test_ca_cert(), Duration::from_secs(60))?;
        McpSession::open(http, url, capabilities).await
    }
}

/// The text of the first content block of a successful tool result.
pub fn tool_text(response: &serde_json::Value) -> Option<String> {
    response["result"]["content"][0]["text"]
        .as_str()
        .map(String::from)
}

/// A demo MCP server spec (`mcpd demo-server`) named `name`, writing its ledger to `ledger`.
pub fn demo_server(name: &str, ledger: &Path) -> mcpcp_proto::api::ServerSpec {
    let mut spec: mcpcp_proto::api::ServerSpec = serde_json::from_value(serde_json::json!({
        "name": name,
        "command": binary("mcpd").to_string_lossy(),
        "args": ["demo-server"],
        "idempotent_tools": ["echo", "add"],
    }))
    .expect("demo spec");
    spec.env.insert(
        "MCPD_DEMO_LEDGER".into(),
        ledger.to_string_lossy().to_string(),
    );
    spec
}

pub mod bench_issuer;
pub mod etcd;
pub mod otlp;
pub mod write;

/// Helpers the benchmark binaries share.
pub mod bench {
    use std::path::PathBuf;
    use std::time::Duration;

    /// Ctrl-C or SIGTERM: returning from `main` drops the clusters, which kills their processes.
    pub async fn stop_signal() -> &'static str {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return "interrupted";
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "interrupted",
            _ = term.recv() => "terminated",
        }
    }

    /// A benchmark's `main`: runs `bench` until it ends or Ctrl-C/SIGTERM stops it (which drops
    /// what it started, killing its processes); errors go to stderr prefixed with `name`.
    pub async fn run_until_stopped(
        name: &str,
        bench: impl std::future::Future<Output = anyhow::Result<()>>,
    ) -> std::process::ExitCode {
        tokio::select! {
            r = bench => match r {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{name}: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            },
            why = stop_signal() => {
                eprintln!("{name}: {why}; stopped (the processes it started are killed)");
                std::process::ExitCode::from(130)
            }
        }
    }

    /// First line of `bin --version`.
    pub fn tool_version(bin: &std::path::Path) -> String {
        std::process::Command::new(bin)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).to_string()
                    + &String::from_utf8_lossy(&o.stderr);
                text.lines()
                    .find(|l| !l.trim().is_empty())
                    .map(|l| l.trim().to_string())
            })
            .unwrap_or_else(|| "version unknown".into())
    }

    /// `etcd` on `PATH`.
    pub fn find_on_path(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    }
    /// Nearest-rank percentile of sorted values.
    pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
        if sorted.is_empty() {
            return None;
        }
        let rank = (p * sorted.len() as f64).ceil() as usize;
        Some(sorted[rank.clamp(1, sorted.len()) - 1])
    }
    #[cfg(test)]
    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.50), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&v, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&v[..1], 0.99), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }

    pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
        let mut parts = vec![e.to_string()];
        let mut source = e.source();
        while let Some(s) = source {
            parts.push(s.to_string());
            source = s.source();
        }
        parts.join(": ")
    }
    pub fn round3(x: f64) -> f64 {
        (x * 1000.0).round() / 1000.0
    }

    /// Processor count, CPU model, memory and kernel of this machine, for benchmark reports.
    pub fn machine_basics() -> Vec<(&'static str, String)> {
        let mut facts = Vec::new();
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get().to_string())
            .unwrap_or_else(|_| "unknown".into());
        facts.push(("nproc", nproc));
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if let Some(model) = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
        {
            facts.push(("cpu", model.1.trim().to_string()));
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        if let Some(mem) = meminfo.lines().find(|l| l.starts_with("MemTotal:")) {
            let kb: u64 = mem
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            facts.push(("memory", format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0)));
        }
        if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
            facts.push(("kernel", release.trim().to_string()));
        }
        facts
    }
}
