//! The cluster under test: real `mcpd` processes, each in its own network namespace (or all on
//! 127.0.0.1 when namespaces are not available), formed through the admin API the way an
//! operator does it (`POST /v1/cluster/init` with every member, then `add-node` /
//! `remove-node`). Processes are owned by the [`Janitor`], so they are killed and reaped on
//! every way out.
//!
//! Every wait here is a condition polled until a deadline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::{Arc, RwLock};
use std::time::Duration;

use mcpcp_proto::api::{AddNodeRequest, ClusterStatus, Member};
use mcpctl::launch::{log_tail, wait_started, Launch};
use mcpctl::{AdminClient, ClientError};
use tokio::process::Command;

use crate::janitor::{Janitor, JanitorError};
use crate::netns::{NetError, Network};
use crate::poll;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("node {id}: {message}")]
    Start { id: u64, message: String },
    #[error("{what}: {source}")]
    Api { what: String, source: ClientError },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Janitor(#[from] JanitorError),
    #[error("timed out after {within:?} waiting for {what}")]
    Timeout { what: String, within: Duration },
    #[error("unknown node {0}")]
    UnknownNode(u64),
    #[error(transparent)]
    Launch(#[from] mcpctl::launch::LaunchError),
    #[error("the cluster CA: {0}")]
    Ca(#[from] mcpctl::dev::DevError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

fn api(what: impl Into<String>) -> impl FnOnce(ClientError) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Api { what, source }
}

/// Where nodes run.
#[derive(Clone)]
pub enum Placement {
    /// All on 127.0.0.1, each on ports it picked.
    Loopback,
    /// Each in its own namespace on the test bridge.
    Netns(Network),
}

/// How nodes are started.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub mcpd: PathBuf,
    pub quorum_wait_ms: u64,
    pub snapshot_every: u64,
}

/// Timeout of a status probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Ports a node listens on inside its namespace.
const NETNS_HTTP_PORT: u16 = 7080;
const NETNS_GRPC_PORT: u16 = 7090;

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: u64,
    pub member: Member,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// `None`: not running.
    pub pid: Option<u32>,
    pub paused: bool,
    /// Whether it is (as far as the harness made it) a voter of the cluster.
    pub member_of_cluster: bool,
}

impl Node {
    pub fn url(&self) -> String {
        format!("https://{}", self.member.http_addr)
    }

    pub fn running(&self) -> bool {
        self.pid.is_some()
    }
}

/// A node the workload may send to.
#[derive(Clone)]
pub struct Target {
    pub id: u64,
    /// Base URL of its HTTP API (`https://addr:port`).
    pub url: String,
    /// For the workload: times out after the node's quorum wait plus a margin.
    pub client: AdminClient,
    /// For status probes: a short timeout.
    pub probe: AdminClient,
}

/// The members the workload sends to; updated on membership changes. Cheap to clone.
#[derive(Clone, Default)]
pub struct Targets(Arc<RwLock<Vec<Target>>>);

impl Targets {
    pub fn all(&self) -> Vec<Target> {
        self.0.read().map(|t| t.clone()).unwrap_or_default()
    }

    pub fn pick(&self, rng: &mut fastrand::Rng) -> Option<Target> {
        let all = self.0.read().ok()?;
        if all.is_empty() {
            return None;
        }
        all.get(rng.usize(..all.len())).cloned()
    }

    fn set(&self, targets: Vec<Target>) {
        if let Ok(mut t) = self.0.write() {
            *t = targets;
        }
    }
}

/// A cluster of `mcpd` processes under test.
pub struct Cluster {
    janitor: Janitor,
    placement: Placement,
    cfg: NodeConfig,
    dir: PathBuf,
    nodes: BTreeMap<u64, Node>,
    admin_token: String,
    next_id: u64,
    targets: Targets,
    client_timeout: Duration,
}

impl Cluster {
    /// Starts `n` nodes in `dir` and forms a cluster of them.
    pub async fn start(
        janitor: &Janitor,
        placement: Placement,
        cfg: NodeConfig,
        dir: &Path,
        n: u64,
    ) -> Result<Cluster, ClusterError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let client_timeout = Duration::from_millis(cfg.quorum_wait_ms + 3_000);
        let mut c = Cluster {
            janitor: janitor.clone(),
            placement,
            cfg,
            dir: dir.to_path_buf(),
            nodes: BTreeMap::new(),
            admin_token: String::new(),
            next_id: n + 1,
            targets: Targets::default(),
            client_timeout,
        };
        for id in 1..=n {
            c.spawn(id).await?;
        }
        let members: Vec<Member> = c.nodes.values().map(|n| n.member.clone()).collect();
        let first = c.nodes.get(&1).ok_or(ClusterError::UnknownNode(1))?.url();
        let anon =
            AdminClient::new(&[first], None, Some(&c.ca_file())).map_err(api("admin client"))?;
        let init = anon.init(members).await.map_err(api("cluster init"))?;
        c.admin_token = init.admin_token;
        for node in c.nodes.values_mut() {
            node.member_of_cluster = true;
        }
        c.refresh_targets();
        c.wait_leader(Duration::from_secs(30)).await?;
        Ok(c)
    }

    /// The cluster CA's certificate (`<dir>/ca.pem`), which every client trusts.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(mcpcp_pki::ca::CA_CERT)
    }

    pub fn node(&self, id: u64) -> Result<&Node, ClusterError> {
        self.nodes.get(&id).ok_or(ClusterError::UnknownNode(id))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut Node, ClusterError> {
        self.nodes.get_mut(&id).ok_or(ClusterError::UnknownNode(id))
    }

    /// Ids of the voters, as the harness made them.
    pub fn members(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.member_of_cluster)
            .map(|n| n.id)
            .collect()
    }

    /// Members whose process runs and is not paused.
    pub fn live_members(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.member_of_cluster && n.running() && !n.paused)
            .map(|n| n.id)
            .collect()
    }

    pub fn targets(&self) -> Targets {
        self.targets.clone()
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    pub fn client_timeout(&self) -> Duration {
        self.client_timeout
    }

    /// Records a mount the harness made for a node, so that it is removed on every way out.
    pub fn track_mount(&self, path: &Path) {
        self.janitor.track_mount(path);
    }

    pub fn untrack_mount(&self, path: &Path) {
        self.janitor.untrack_mount(path);
    }

    /// A fresh id (ids are never reused).
    pub fn allocate_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn refresh_targets(&self) {
        let ca = self.ca_file();
        let targets = self
            .nodes
            .values()
            .filter(|n| n.member_of_cluster)
            .filter_map(|n| {
                let token = Some(self.admin_token.clone());
                let client = AdminClient::with_timeout(
                    &[n.url()],
                    token.clone(),
                    Some(&ca),
                    self.client_timeout,
                )
                .ok()?;
                let probe =
                    AdminClient::with_timeout(&[n.url()], token, Some(&ca), PROBE_TIMEOUT).ok()?;
                Some(Target {
                    id: n.id,
                    url: n.url(),
                    client,
                    probe,
                })
            })
            .collect();
        self.targets.set(targets);
    }

    /// A client of one node, with `timeout`.
    pub fn client_of(&self, id: u64, timeout: Duration) -> Result<AdminClient, ClusterError> {
        let url = self.node(id)?.url();
        AdminClient::with_timeout(
            &[url],
            Some(self.admin_token.clone()),
            Some(&self.ca_file()),
            timeout,
        )
        .map_err(api("admin client"))
    }

    /// A client of every live member (tried in order), for the harness's own calls.
    pub fn admin(&self, timeout: Duration) -> Result<AdminClient, ClusterError> {
        let urls: Vec<String> = self
            .live_members()
            .iter()
            .filter_map(|id| self.nodes.get(id).map(Node::url))
            .collect();
        AdminClient::with_timeout(
            &urls,
            Some(self.admin_token.clone()),
            Some(&self.ca_file()),
            timeout,
        )
        .map_err(api("admin client"))
    }

    /// Starts process `id` (with its data and addresses, when it ran before) and waits until
    /// it reports its addresses.
    pub async fn spawn(&mut self, id: u64) -> Result<Member, ClusterError> {
        let nd = self.dir.join(format!("node{id}"));
        mcpctl::dev::ensure_ca(&self.dir)?;
        let mut program = Vec::new();
        if let Placement::Netns(net) = &self.placement {
            net.ensure_node(id)?;
            program.extend(["ip", "netns", "exec"].map(Into::into));
            program.push(net.ns(id).into());
        }
        program.push(self.cfg.mcpd.clone().into_os_string());
        let (http, grpc) = match (self.nodes.get(&id), &self.placement) {
            // A restarted node keeps its addresses: peers know it by them.
            (Some(old), _) => (old.member.http_addr.clone(), old.member.grpc_addr.clone()),
            (None, Placement::Loopback) => ("127.0.0.1:0".into(), "127.0.0.1:0".into()),
            (None, Placement::Netns(net)) => (
                format!("{}:{NETNS_HTTP_PORT}", net.ip(id)),
                format!("{}:{NETNS_GRPC_PORT}", net.ip(id)),
            ),
        };
        let launch = Launch {
            program,
            http_addr: http,
            grpc_addr: grpc,
            args: vec![
                "--quorum-wait-ms".into(),
                self.cfg.quorum_wait_ms.to_string(),
                "--snapshot-every".into(),
                self.cfg.snapshot_every.to_string(),
            ],
            // A Ctrl-C at the terminal reaches the harness only, which then stops the nodes
            // itself.
            own_group: true,
            ..Launch::new(&self.cfg.mcpd, id, &nd, &self.dir)
        };
        let (cmd, files) = launch.prepare()?;
        let mut cmd = Command::from(cmd);
        cmd.env("RUST_LOG", "info,openraft=warn").kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", self.cfg.mcpd.display())))?;
        let pid = self
            .janitor
            .adopt(child)
            .ok_or_else(|| ClusterError::Start {
                id,
                message: "exited before its pid was known".into(),
            })?;
        std::fs::write(nd.join("mcpd.pid"), format!("{pid}\n"))
            .map_err(io("writing the pid file"))?;
        let member = wait_started(id, &files, pid, || self.janitor.exited(pid)).await?;
        let (data, log_path) = (files.data_dir, files.log);
        let member_of_cluster = self.nodes.get(&id).is_some_and(|n| n.member_of_cluster);
        self.nodes.insert(
            id,
            Node {
                id,
                member: member.clone(),
                dir: nd,
                data_dir: data,
                log: log_path,
                pid: Some(pid),
                paused: false,
                member_of_cluster,
            },
        );
        Ok(member)
    }

    /// kill -9 (and reap).
    pub async fn kill(&mut self, id: u64) -> Result<(), ClusterError> {
        let node = self.node_mut(id)?;
        let pid = node.pid.take();
        node.paused = false;
        if let Some(pid) = pid {
            self.janitor.kill(pid).await?;
        }
        Ok(())
    }

    /// SIGTERM, SIGKILL after `grace`. Returns whether it exited by itself.
    pub async fn stop(&mut self, id: u64, grace: Duration) -> Result<bool, ClusterError> {
        let node = self.node_mut(id)?;
        let pid = node.pid.take();
        node.paused = false;
        match pid {
            Some(pid) => Ok(self.janitor.terminate(pid, grace).await?),
            None => Ok(true),
        }
    }

    /// SIGSTOP.
    pub fn pause(&mut self, id: u64) -> Result<bool, ClusterError> {
        let node = self.node_mut(id)?;
        let Some(pid) = node.pid else {
            return Ok(false);
        };
        node.paused = crate::sys::signal(pid, "STOP");
        Ok(node.paused)
    }

    /// SIGCONT.
    pub fn resume(&mut self, id: u64) -> Result<(), ClusterError> {
        let node = self.node_mut(id)?;
        if let Some(pid) = node.pid {
            crate::sys::signal(pid, "CONT");
        }
        node.paused = false;
        Ok(())
    }

    /// Whether the process of `id` died on its own; if so it is marked stopped.
    pub fn check_exited(&mut self, id: u64) -> Option<String> {
        let pid = self.nodes.get(&id)?.pid?;
        let status = self.janitor.exited(pid)?;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.pid = None;
            n.paused = false;
        }
        Some(status)
    }

    /// Deletes the data directory of a stopped node.
    pub fn wipe(&mut self, id: u64) -> Result<(), ClusterError> {
        let node = self.node(id)?.clone();
        if node.running() {
            return Err(ClusterError::Start {
                id,
                message: "cannot wipe a running node".into(),
            });
        }
        if node.data_dir.exists() {
            std::fs::remove_dir_all(&node.data_dir)
                .map_err(io(format!("wiping {}", node.data_dir.display())))?;
        }
        Ok(())
    }

    /// `add-node` for process `id` (already spawned), as a voter.
    pub async fn add_member(&mut self, id: u64) -> Result<(), ClusterError> {
        let m = self.node(id)?.member.clone();
        let admin = self.admin(Duration::from_secs(90))?;
        admin
            .add_node(&AddNodeRequest {
                id,
                http_addr: m.http_addr,
                grpc_addr: m.grpc_addr,
                voter: true,
            })
            .await
            .map_err(api(format!("add-node {id}")))?;
        self.node_mut(id)?.member_of_cluster = true;
        self.refresh_targets();
        Ok(())
    }

    /// `remove-node id`, sent to the other live members.
    pub async fn remove_member(&mut self, id: u64) -> Result<(), ClusterError> {
        let urls: Vec<String> = self
            .live_members()
            .into_iter()
            .filter(|m| *m != id)
            .filter_map(|m| self.nodes.get(&m).map(Node::url))
            .collect();
        let admin = AdminClient::with_timeout(
            &urls,
            Some(self.admin_token.clone()),
            Some(&self.ca_file()),
            Duration::from_secs(90),
        )
        .map_err(api("admin client"))?;
        admin
            .remove_node(id)
            .await
            .map_err(api(format!("remove-node {id}")))?;
        self.node_mut(id)?.member_of_cluster = false;
        self.refresh_targets();
        Ok(())
    }

    /// `GET /v1/cluster/status` of one node.
    pub async fn status(&self, id: u64) -> Result<ClusterStatus, ClusterError> {
        self.client_of(id, Duration::from_secs(3))?
            .cluster_status()
            .await
            .map_err(api(format!("status of node {id}")))
    }

    /// The leader every live member agrees on, if they agree now.
    pub async fn agreed_leader(&self) -> Option<u64> {
        let live = self.live_members();
        let mut leader = None;
        for id in &live {
            let s = self.status(*id).await.ok()?;
            let l = s.leader?;
            if leader.is_some_and(|x| x != l) || !live.contains(&l) {
                return None;
            }
            leader = Some(l);
        }
        leader
    }

    /// Waits until every live member agrees on one live leader; returns it.
    pub async fn wait_leader(&self, within: Duration) -> Result<u64, ClusterError> {
        poll::until(within, Duration::from_millis(100), || self.agreed_leader())
            .await
            .ok_or_else(|| ClusterError::Timeout {
                what: "a leader every live member agrees on".into(),
                within,
            })
    }

    /// Waits until every live member agrees on the leader and has applied the same index, at
    /// least the leader's commit index (nothing is in flight). Returns that index.
    pub async fn wait_settled(&self, within: Duration) -> Result<u64, ClusterError> {
        poll::until(within, Duration::from_millis(100), || self.settled_index())
            .await
            .ok_or_else(|| ClusterError::Timeout {
                what: "every live member to apply the same index under one leader".into(),
                within,
            })
    }

    async fn settled_index(&self) -> Option<u64> {
        let leader = self.agreed_leader().await?;
        let ls = self.status(leader).await.ok()?;
        let committed = ls.committed_index?;
        let mut applied = None;
        for id in self.live_members() {
            let a = self.status(id).await.ok()?.applied_index?;
            if applied.is_some_and(|x| x != a) || a < committed {
                return None;
            }
            applied = Some(a);
        }
        applied
    }

    /// Kills every process of the cluster.
    pub async fn shutdown(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let _ = self.kill(id).await;
        }
    }

    /// The last lines of every node's log.
    pub fn log_tails(&self, lines: usize) -> Vec<String> {
        self.nodes
            .values()
            .map(|n| {
                format!(
                    "----- node {} ({}) -----\n{}",
                    n.id,
                    n.log.display(),
                    log_tail(&n.log, lines)
                )
            })
            .collect()
    }
}
