//! `mcpctl dev up|down`: a local cluster in one command.
//!
//! `up` makes the cluster's CA (`DIR/ca.pem`, and its key `DIR/ca.key`, readable by its
//! owner only) and puts it into each node's TLS directory, as an operator does, starts N
//! `mcpd` processes on free loopback ports (each node binds port 0 and reports the port it got
//! in `<data>/endpoints.json`, so there is no port race), initialises the cluster over HTTPS,
//! creates tenant `default` and its token, registers the demo MCP server as `demo`, and
//! writes `DIR/env` for `sh` to source. `down` stops what `up` started.
//!
//! `up` on a directory that holds a stopped cluster, or one with some nodes stopped (killed,
//! crashed), starts those nodes again instead: each on the addresses it had (the members know
//! each other by them), with its data, so `DIR/env` stays valid; nothing is initialised or
//! created a second time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mcpcp_proto::api::{CreateTokenRequest, Member, Role, ServerSpec, TenantSpec};

pub use crate::launch::{install_ca, read_endpoints};
use crate::launch::{last_endpoints, wait_started, Launch, LaunchError};
use crate::{AdminClient, CallOptions, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Start(String),
    #[error(transparent)]
    Api(#[from] ClientError),
    #[error("cluster CA: {0}")]
    Pki(#[from] mcpcp_pki::PkiError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let what = what.into();
    move |source| DevError::Io { what, source }
}

/// What `dev up` made, also written to `DIR/env`.
#[derive(Debug, Clone)]
pub struct DevCluster {
    pub dir: PathBuf,
    /// The cluster CA's certificate, which clients trust (`DIR/ca.pem`).
    pub ca_file: PathBuf,
    pub members: Vec<Member>,
    pub pids: Vec<u32>,
    pub admin_token: String,
    pub tenant_token: String,
}

impl DevCluster {
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("https://{}", m.http_addr))
            .collect()
    }

    /// An admin client of the cluster.
    pub fn admin(&self) -> Result<AdminClient, ClientError> {
        AdminClient::new(
            &self.endpoints(),
            Some(self.admin_token.clone()),
            Some(&self.ca_file),
        )
    }
}

/// The CA of the dev cluster in `dir` (`DIR/ca.pem`, `DIR/ca.key`), made on first use;
/// returns the certificate's path.
pub fn ensure_ca(dir: &Path) -> Result<PathBuf, DevError> {
    use mcpcp_pki::ca::{CA_CERT, CA_KEY};
    let cert = dir.join(CA_CERT);
    if !(cert.exists() && dir.join(CA_KEY).exists()) {
        let ca = mcpcp_pki::Ca::create(&mcpcp_pki::ClusterId::new("dev")?)?;
        ca.write(dir)?;
    }
    mcpcp_pki::datakey::write_new(dir)?;
    Ok(cert)
}

/// Options of `dev up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: u32,
    pub dir: PathBuf,
    pub mcpd: PathBuf,
    /// Extra flags for every `mcpd`.
    pub mcpd_args: Vec<String>,
    /// Register the demo server as `demo`.
    pub demo: bool,
    /// Where the cluster CA is (made there if missing): `DIR` itself by default; tests share
    /// one CA between their clusters this way.
    pub ca_dir: Option<PathBuf>,
}

fn node_dir(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("node{id}"))
}

/// Whether process `pid` runs: it exists (signal 0) and, where `/proc` tells, is not a zombie
/// (a node killed in a container whose init does not reap stays one).
pub fn alive(pid: u32) -> bool {
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state is the first field after the last `)`.
        return stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X");
    }
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The node directories of a dev cluster in `dir` (`node<ID>`), by id.
fn node_dirs(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut out: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let id = e.file_name().to_str()?.strip_prefix("node")?.parse().ok()?;
            Some((id, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The pids of the nodes of a dev cluster in `dir` that are still running.
pub fn running_pids(dir: &Path) -> Vec<(u32, u32)> {
    node_dirs(dir)
        .into_iter()
        .filter_map(|(id, nd)| Some((id, read_pid(&nd.join("mcpd.pid")).filter(|p| alive(*p))?)))
        .collect()
}

/// A loopback address with a port no process listens on, below the kernel's ephemeral range:
/// an outgoing connection never takes it as its source port, so a node that was stopped gets
/// its ports back when it starts again (with port 0 it would get one from that range).
fn unused_port(id: u32, which: u32) -> String {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let floor = 10_000u32;
    if low <= floor + 1000 {
        return "127.0.0.1:0".into();
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761)
        ^ (id * 2 + which).wrapping_mul(40_503);
    for attempt in 0..200u32 {
        let port = floor + (seed.wrapping_add(attempt.wrapping_mul(7_919))) % (low - floor);
        let addr = format!("127.0.0.1:{port}");
        if std::net::TcpListener::bind(&addr).is_ok() {
            return addr;
        }
    }
    "127.0.0.1:0".into()
}

/// Starts one node of a dev cluster, with the CA of `ca_dir` in its TLS directory, and waits
/// for it to report its addresses. `at` is `(http, grpc)` to listen on; `None` takes free
/// ports below the ephemeral range ([`unused_port`]).
pub async fn start_node(
    mcpd: &Path,
    dir: &Path,
    ca_dir: &Path,
    id: u32,
    at: Option<(&str, &str)>,
    extra: &[String],
) -> Result<(Member, u32), DevError> {
    let nd = node_dir(dir, id);
    ensure_ca(ca_dir)?;
    let (http, grpc) = match at {
        Some((http, grpc)) => (http.to_string(), grpc.to_string()),
        None => (unused_port(id, 0), unused_port(id, 1)),
    };
    let launch = Launch {
        http_addr: http,
        grpc_addr: grpc,
        args: extra.to_vec(),
        // A Ctrl-C at the terminal that ran `dev up` leaves it running.
        own_group: true,
        ..Launch::new(mcpd, id.into(), &nd, ca_dir)
    };
    let (mut cmd, files) = launch.prepare()?;
    let mut child = cmd
        .spawn()
        .map_err(io(format!("starting {}", mcpd.display())))?;
    let pid = child.id();
    std::fs::write(nd.join("mcpd.pid"), format!("{pid}\n")).map_err(io("writing the pid file"))?;
    let exited = || child.try_wait().ok().flatten().map(|s| s.to_string());
    let member = wait_started(id.into(), &files, pid, exited).await?;
    // Not waited for from here on: the node outlives this command by design.
    Ok((member, pid))
}

/// A node of the cluster in `dir`, running or not: the addresses it last listened on, and its
/// pid when it runs.
struct KnownNode {
    id: u32,
    member: Member,
    running: Option<u32>,
}

/// The nodes of the cluster in `dir`: each node directory whose data holds the addresses it
/// last listened on.
fn known_nodes(dir: &Path) -> Vec<KnownNode> {
    let running = running_pids(dir);
    node_dirs(dir)
        .into_iter()
        .filter_map(|(id, nd)| {
            let (member, _) = last_endpoints(&nd.join("data"))?;
            let running = running.iter().find(|(r, _)| *r == id).map(|(_, pid)| *pid);
            Some(KnownNode {
                id,
                member,
                running,
            })
        })
        .collect()
}

/// The value of `export NAME='value'` in a `DIR/env` file.
fn env_value(text: &str, name: &str) -> Option<String> {
    let line = text.lines().find_map(|l| {
        l.strip_prefix("export ")?
            .strip_prefix(name)?
            .strip_prefix('=')
    })?;
    Some(line.trim_matches('\'').to_string())
}

/// Starts the stopped nodes of the cluster in `dir` again, each on its old addresses, and
/// waits for a leader.
async fn restart(
    opts: &UpOptions,
    dir: &Path,
    nodes: Vec<KnownNode>,
    progress: &dyn Fn(&str),
) -> Result<DevCluster, DevError> {
    let env_path = dir.join("env");
    let env = std::fs::read_to_string(&env_path).map_err(io(format!(
        "{} holds a stopped cluster but no readable env file ({}); remove the directory to start afresh",
        dir.display(),
        env_path.display()
    )))?;
    let (Some(admin_token), Some(tenant_token), Some(ca_file)) = (
        env_value(&env, "MCPCTL_TOKEN"),
        env_value(&env, "MCP_BRIDGE_TOKEN"),
        env_value(&env, "MCPCTL_CACERT").map(PathBuf::from),
    ) else {
        return Err(DevError::Start(format!(
            "{} lacks MCPCTL_TOKEN, MCP_BRIDGE_TOKEN or MCPCTL_CACERT; remove {} to start afresh",
            env_path.display(),
            dir.display()
        )));
    };
    let stopped: Vec<String> = nodes
        .iter()
        .filter(|n| n.running.is_none())
        .map(|n| n.id.to_string())
        .collect();
    progress(&format!(
        "{} holds a cluster of {} nodes with node(s) {} stopped: starting them again",
        dir.display(),
        nodes.len(),
        stopped.join(", ")
    ));
    let mut members = Vec::new();
    let mut pids = Vec::new();
    for KnownNode {
        id,
        member,
        running,
    } in nodes
    {
        let (m, pid) = match running {
            Some(pid) => (member, pid),
            None => {
                let at = Some((member.http_addr.as_str(), member.grpc_addr.as_str()));
                let ca_dir = ca_file.parent().unwrap_or(dir);
                let (m, pid) = start_node(&opts.mcpd, dir, ca_dir, id, at, &opts.mcpd_args).await?;
                progress(&format!(
                    "node {id} up again (pid {pid}, http {}, grpc {})",
                    m.http_addr, m.grpc_addr
                ));
                (m, pid)
            }
        };
        members.push(m);
        pids.push(pid);
    }
    let cluster = DevCluster {
        dir: dir.to_path_buf(),
        ca_file,
        members,
        pids,
        admin_token,
        tenant_token,
    };
    let admin = cluster.admin()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = admin.cluster_status().await;
        if let Some(leader) = status.as_ref().ok().and_then(|s| s.leader) {
            progress(&format!("leader is node {leader}"));
            return Ok(cluster);
        }
        if Instant::now() >= deadline {
            return Err(match status {
                Err(e) => e.into(),
                Ok(_) => DevError::Start(
                    "no leader was elected within 30 s of the restart (see the nodes' mcpd.log)"
                        .into(),
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `dev up`.
pub async fn up(opts: &UpOptions, progress: &dyn Fn(&str)) -> Result<DevCluster, DevError> {
    if opts.nodes == 0 {
        return Err(DevError::Usage("--nodes must be at least 1".into()));
    }
    std::fs::create_dir_all(&opts.dir).map_err(io(format!("creating {}", opts.dir.display())))?;
    let dir = opts.dir.canonicalize().map_err(io("resolving --dir"))?;
    let known = known_nodes(&dir);
    if !known.is_empty() && known.iter().all(|n| n.running.is_some()) {
        return Err(DevError::Usage(format!(
            "a dev cluster is already running in {} (nodes {}); run `mcpctl dev down --dir {}` first",
            opts.dir.display(),
            known.iter().map(|n| n.id.to_string()).collect::<Vec<_>>().join(", "),
            opts.dir.display()
        )));
    }
    if !known.is_empty() {
        return restart(opts, &dir, known, progress).await;
    }
    let ca_dir = opts.ca_dir.clone().unwrap_or_else(|| dir.clone());
    let ca_file = ensure_ca(&ca_dir)?;
    let mut members = Vec::new();
    let mut pids = Vec::new();
    for id in 1..=opts.nodes {
        let (m, pid) = start_node(&opts.mcpd, &dir, &ca_dir, id, None, &opts.mcpd_args).await?;
        progress(&format!(
            "node {id} up (pid {pid}, http {}, grpc {})",
            m.http_addr, m.grpc_addr
        ));
        members.push(m);
        pids.push(pid);
    }
    let endpoints: Vec<String> = members
        .iter()
        .map(|m| format!("https://{}", m.http_addr))
        .collect();
    let anon = AdminClient::new(&endpoints, None, Some(&ca_file))?;
    let init = anon.init(members.clone()).await?;
    progress(&format!(
        "cluster initialised, leader is node {}",
        init.leader
    ));
    let admin = AdminClient::new(&endpoints, Some(init.admin_token.clone()), Some(&ca_file))?;
    let no_opts = CallOptions::default();
    admin
        .create_tenant(
            &TenantSpec {
                name: "default".into(),
                description: Some("created by mcpctl dev up".into()),
                weight: 1,
            },
            &no_opts,
        )
        .await?;
    let tenant_token = admin
        .create_token(&CreateTokenRequest {
            name: "dev".into(),
            role: Some(Role::User),
            tenant: Some("default".into()),
            ttl_seconds: None,
            scopes: None,
        })
        .await?;
    progress("tenant `default` and its token created");
    if opts.demo {
        let mut spec: ServerSpec = serde_json::from_value(serde_json::json!({
            "name": "demo",
            "command": opts.mcpd.canonicalize().unwrap_or(opts.mcpd.clone()).to_string_lossy(),
            "args": ["demo-server"],
            "idempotent_tools": ["echo", "add"],
        }))
        .map_err(|e| DevError::Start(e.to_string()))?;
        spec.env.insert(
            "MCPD_DEMO_LEDGER".into(),
            dir.join("demo-ledger.jsonl").to_string_lossy().to_string(),
        );
        admin.create_server(&spec, &no_opts).await?;
        progress("demo MCP server registered as `demo`");
    }
    let cluster = DevCluster {
        dir: dir.clone(),
        ca_file,
        members,
        pids,
        admin_token: init.admin_token,
        tenant_token: tenant_token.token,
    };
    write_env(&cluster, &opts.mcpd)?;
    Ok(cluster)
}

/// Writes `DIR/env`: the endpoints, tokens and CA for `mcpctl` and `mcp-bridge`, and the
/// directory of the binaries (the one `mcpd` is in) first on `PATH`.
fn write_env(c: &DevCluster, mcpd: &Path) -> Result<(), DevError> {
    let endpoints = c.endpoints().join(",");
    let bridge: Vec<String> = c
        .members
        .iter()
        .map(|m| format!("https://{}/mcp", m.http_addr))
        .collect();
    let mcpd = mcpd.canonicalize().unwrap_or_else(|_| mcpd.to_path_buf());
    let bin = mcpd.parent().unwrap_or(Path::new("."));
    let text = format!(
        "# written by mcpctl dev up; source it: . {dir}/env\n\
         export MCPCTL_ENDPOINTS='{endpoints}'\n\
         export MCPCTL_TOKEN='{admin}'\n\
         export MCPCTL_CACERT='{ca}'\n\
         export MCP_BRIDGE_URL='{bridge}'\n\
         export MCP_BRIDGE_TOKEN='{tenant}'\n\
         export MCP_BRIDGE_CACERT='{ca}'\n\
         export PATH='{bin}':\"$PATH\"\n",
        dir = c.dir.display(),
        admin = c.admin_token,
        ca = c.ca_file.display(),
        bridge = bridge.join(","),
        tenant = c.tenant_token,
        bin = bin.display(),
    );
    let path = c.dir.join("env");
    std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // It holds tokens: readable by its owner only.
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// Sends `signal` to `pid` (by name, as `kill -s` takes it).
pub fn signal(pid: u32, signal: &str) -> bool {
    std::process::Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `dev down`: SIGTERM every node, SIGKILL what is left after `grace`. Returns the ids stopped.
pub async fn down(dir: &Path, grace: Duration) -> Vec<u32> {
    let running = running_pids(dir);
    for (_, pid) in &running {
        signal(*pid, "TERM");
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && running.iter().any(|(_, p)| alive(*p)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (_, pid) in &running {
        if alive(*pid) {
            signal(*pid, "KILL");
        }
    }
    running.into_iter().map(|(id, _)| id).collect()
}
