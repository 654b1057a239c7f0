//! Assembles a node: data directory, Raft with its stores, the gRPC and HTTP listeners, and
//! the background tasks, and tears them down in order on shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mcpcp_proto::api::Member;
use mcpcp_proto::cluster::cluster_server::ClusterServer;
use mcpcp_proto::raft::raft_server::RaftServer;
use metrics_exporter_prometheus::PrometheusHandle;
use openraft::SnapshotPolicy;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::mcp::McpState;
use crate::pool::reconcile::{self, Pools};
use crate::raft::log_store::LogStore;
use crate::raft::network::{EarlyAcks, NetworkFactory, PeerChannels};
use crate::raft::service::{ClusterService, RaftService};
use crate::raft::state_machine::StateMachineStore;
use crate::raft::Raft;
use crate::registry::Registry;
use crate::route::peer::PeerService;
use crate::route::{placement, Router};
use crate::shard::ShardHandles;
use crate::shutdown::{self, Shutdown};
use crate::tls::admission::MembersOnly;
use crate::tls::edge::{EdgeSource, EdgeTls, EdgeTlsMode};
use crate::tls::members::MembersCheck;
use crate::tls::peer::PeerConnector;
use crate::tls::{NodeTls, TlsError};
use mcpcp_proto::peer::peer_server::PeerServer;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data_dir {path} belongs to node {found}, not to node {wanted}; node ids are never reused: give this node a fresh data_dir")]
    WrongNode {
        path: PathBuf,
        found: u64,
        wanted: u64,
    },
    #[error("opening {path}: {source}")]
    Store { path: PathBuf, source: redb::Error },
    #[error("raft configuration: {0}")]
    RaftConfig(String),
    #[error("the call log (call_audit): {0}")]
    CallAudit(crate::call_audit::StartError),
    #[error("starting raft: {0}")]
    Raft(String),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Join(#[from] crate::join::JoinError),
    #[error("restoring a snapshot: {0}")]
    Restore(#[from] crate::restore::RestoreError),
    #[error("{0} (make it with `mcpctl cluster ca create` and put data.key into every node's TLS directory)")]
    DataKey(#[from] crate::seal::SealError),
    #[error("binding {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
}

/// The addresses a node actually listens on, written to `<data_dir>/endpoints.json` so tools
/// and tests that started it on port 0 can find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    pub id: u64,
    pub http_addr: String,
    pub grpc_addr: String,
    pub pid: u32,
}

/// Makes `dir` and the node's files in it readable by the node's user only: the directory
/// 0700 (so nothing in it can be opened by others, whatever its own mode), each file directly
/// in it 0600. The TLS directory's keys are written 0600 by themselves.
fn lock_down(dir: &Path) -> Result<(), StartError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StartError::DataDir { path, source }
        };
        let private =
            |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
        private(dir, 0o700).map_err(io(dir))?;
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_file() {
                private(&path, 0o600).map_err(io(&path))?;
            } else if kind.is_dir() {
                private(&path, 0o700).map_err(io(&path))?;
            }
        }
    }
    Ok(())
}

/// Claims `dir` for node `id`: a directory that held another node refuses to start.
fn claim_data_dir(dir: &Path, id: u64) -> Result<(), StartError> {
    let io = |source| StartError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    lock_down(dir)?;
    let id_file = dir.join("node_id");
    match std::fs::read_to_string(&id_file) {
        Ok(text) => {
            let found: u64 = text.trim().parse().map_err(|_| {
                io(std::io::Error::other(format!(
                    "{} does not hold a node id",
                    id_file.display()
                )))
            })?;
            if found != id {
                return Err(StartError::WrongNode {
                    path: dir.to_path_buf(),
                    found,
                    wanted: id,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&id_file, format!("{id}\n")).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

fn raft_config(cfg: &Config) -> Result<openraft::Config, StartError> {
    let r = &cfg.raft;
    openraft::Config {
        cluster_name: "mcpd".into(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_every),
        max_in_snapshot_log_to_keep: r.keep_logs,
        snapshot_max_chunk_size: r.snapshot_chunk_bytes,
        max_payload_entries: r.max_payload_entries,
        // A request carries this many milliseconds before openraft gives up on a peer.
        install_snapshot_timeout: 10_000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::RaftConfig(e.to_string()))
}

async fn bind(what: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// Runs a node until `stop` completes, serving the data plane on `shards`.
pub async fn run(
    cfg: Config,
    metrics: PrometheusHandle,
    stop: impl std::future::Future<Output = ()>,
    shards: ShardHandles,
) -> Result<Exit, StartError> {
    claim_data_dir(&cfg.data_dir, cfg.id)?;
    let http_listener = bind("http_addr", cfg.http_addr).await?;
    let grpc_listener = bind("grpc_addr", cfg.grpc_addr).await?;
    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let me = Member {
        id: cfg.id,
        http_addr: cfg
            .advertise_http
            .clone()
            .unwrap_or_else(|| local(&http_listener)),
        grpc_addr: cfg
            .advertise_grpc
            .clone()
            .unwrap_or_else(|| local(&grpc_listener)),
    };

    // The names clients reach this node by: in its HTTPS certificate, and the only `Host`s
    // it serves.
    let names = edge_names(&cfg, &me);
    // A new node with a join token fetches the cluster CA and data key before anything else.
    if let (false, Some(url), Some(token)) = (
        cfg.tls_dir().join(mcpcp_pki::ca::CA_CERT).exists(),
        &cfg.tls.join_url,
        &cfg.tls.join_token,
    ) {
        crate::join::join(url, token, cfg.id, &names, &cfg.tls_dir()).await?;
    }
    // The data key seals secrets and keys the audit chain the state machine appends to.
    let data_key = crate::seal::DataKey::load(&cfg.tls_dir())?;
    let log_path = cfg.data_dir.join("raft-log.redb");
    let sm_path = cfg.data_dir.join("state.redb");
    let sm = StateMachineStore::open(&sm_path, data_key.audit_key().clone()).map_err(|source| {
        StartError::Store {
            path: sm_path,
            source,
        }
    })?;
    let restored =
        crate::restore::apply_pending(&cfg.data_dir, &log_path, cfg.id, &cfg.tls_dir(), &sm)
            .await?;
    if let Some(r) = &restored {
        let ids: Vec<u64> = r.members.iter().map(|m| m.id).collect();
        tracing::info!(revision = r.revision, from_cluster = %r.from_cluster, members = ?ids, fingerprint = %r.fingerprint, "restored the registry from a snapshot");
    }
    let mut log_store = LogStore::open(&log_path, cfg.id).map_err(|source| StartError::Store {
        path: log_path,
        source,
    })?;
    let early = cfg.raft.early_replication.then(|| {
        let peers = crate::raft::early::EarlyPeers::default();
        log_store.send_early_to(peers.clone());
        (peers, EarlyAcks::default())
    });
    let node_tls = Arc::new(NodeTls::load(
        &cfg.tls_dir(),
        cfg.id,
        Duration::from_secs(cfg.tls.node_cert_ttl_hours * 3600),
    )?);
    tracing::info!(identity = %node_tls.identity, signs = node_tls.ca.is_some(), "peer identity");
    let members = crate::tls::members::Members::default();
    let channels = PeerChannels::new(
        Duration::from_millis(500),
        PeerConnector::new(&node_tls, members.clone())?,
    );
    let network = NetworkFactory {
        channels: channels.clone(),
        early_acks: early.as_ref().map(|(_, acks)| acks.clone()),
    };
    let raft = Raft::new(
        cfg.id,
        Arc::new(raft_config(&cfg)?),
        network.clone(),
        log_store,
        sm.clone(),
    )
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?;
    if restored.is_some() {
        // No election before the restored members agree (`restore::hold_first_election`).
        raft.runtime_config().elect(false);
    }
    if let Some((peers, acks)) = early {
        let early = crate::raft::early::run(cfg.id, raft.clone(), network, peers, acks);
        tokio::spawn(early);
    }
    let registry = Registry::new(
        me.clone(),
        raft.clone(),
        sm,
        channels.clone(),
        Duration::from_millis(cfg.api.quorum_wait_ms),
    );

    let endpoints = Endpoints {
        id: cfg.id,
        http_addr: local(&http_listener),
        grpc_addr: local(&grpc_listener),
        pid: std::process::id(),
    };
    let ep_path = cfg.data_dir.join("endpoints.json");
    std::fs::write(
        &ep_path,
        serde_json::to_vec_pretty(&endpoints).unwrap_or_default(),
    )
    .map_err(|source| StartError::DataDir {
        path: ep_path,
        source,
    })?;
    // The stores and files just made: readable by this node's user only.
    lock_down(&cfg.data_dir)?;
    tracing::info!(
        node = cfg.id,
        http = %endpoints.http_addr,
        grpc = %endpoints.grpc_addr,
        advertise_http = %me.http_addr,
        advertise_grpc = %me.grpc_addr,
        "mcpd listening"
    );

    let (trigger, shutdown) = shutdown::channel();
    tracing::info!(shards = shards.len(), "data-plane threads");
    let pools = Pools::on(shards.clone());
    // Which peers' open event streams named their run (`pool::departed`).
    let runs = Arc::new(crate::pool::departed::RunsNamed::default());
    let mut tasks = JoinSet::new();
    // One membership check for both directions: whom this node serves, and whom it dials.
    members.set(members_check(
        &raft,
        crate::join::told_members(&cfg.tls_dir())?,
    ));
    let edge = edge_tls(&cfg, names.clone(), &node_tls)?;
    tasks.spawn(node_tls.clone().renew(shutdown.clone()));
    if let Some(edge) = &edge {
        tasks.spawn(edge.clone().keep_fresh(node_tls.clone(), shutdown.clone()));
    }
    // Without the CA key, this node's renewals are signed by a member that holds it.
    node_tls.set_signer(crate::raft::signing::signer(
        registry.clone(),
        channels.clone(),
    ));
    tasks.spawn(serve_grpc(
        GrpcServer {
            listener: grpc_listener,
            tls: crate::tls::peer::server_config(&node_tls)?,
            handshakes: cfg.tls.handshakes(),
            members_only: MembersOnly::new(node_tls.identity.cluster.clone(), members.clone()),
            node_tls: node_tls.clone(),
            raft: raft.clone(),
            registry: registry.clone(),
            pools: pools.clone(),
            runs: runs.clone(),
        },
        shutdown.clone(),
    ));
    tasks.spawn(crate::raft::watchdog::run(raft.clone(), shutdown.clone()));
    if let Some(r) = restored {
        // Not in `tasks`: it ends once the members agree, which is no reason to stop.
        tokio::spawn(crate::restore::hold_first_election(
            registry.clone(),
            r,
            shutdown.clone(),
        ));
    }
    let router = Router::new(registry.clone(), pools.clone(), channels.clone(), cfg.route);
    tasks.spawn(crate::route::peer::relay_events(
        router.clone(),
        shutdown.clone(),
    ));
    let identity = crate::identity::Identity::new(
        registry.clone(),
        cfg.identity.clone(),
        cfg.api.tls != crate::tls::edge::EdgeTlsMode::Off,
        data_key.clone(),
    );
    let source = crate::telemetry::Source {
        service_name: cfg.tracing.service_name.clone(),
        node_id: cfg.id,
    };
    let calls = crate::call_audit::CallAudit::start(&cfg.call_audit, &cfg.data_dir, &source)
        .map_err(StartError::CallAudit)?;
    let calls_log = calls.clone();
    let mcp = McpState::new(
        registry.clone(),
        router.clone(),
        identity.clone(),
        crate::mcp::state::Records {
            calls,
            traffic: crate::traffic::Traffic::new(cfg.traffic.clone()),
            usage: crate::usage::Usage::new(cfg.usage.clone()),
        },
        &cfg.mcp,
        &me.http_addr,
    );
    tasks.spawn(crate::mcp::listings::watch(
        registry.clone(),
        mcp.listings.clone(),
        shutdown.clone(),
    ));
    let mut pool_cfg = cfg.pool.clone();
    pool_cfg.node_paths = crate::pool::sandbox::NodePaths::of(&cfg);
    tasks.spawn(crate::pool::departed::run(
        registry.clone(),
        pools.clone(),
        runs.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(reconcile::run(
        registry.clone(),
        pools,
        pool_cfg,
        data_key.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(crate::registry::token_use::report(
        registry.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(placement::run(
        registry.clone(),
        Duration::from_millis(cfg.route.placement_grace_ms),
        shutdown.clone(),
    ));
    tasks.spawn(crate::mcp::housekeeping(mcp.clone(), shutdown.clone()));
    tasks.spawn(
        mcp.usage
            .clone()
            .flush_loop(registry.clone(), shutdown.clone()),
    );
    let restart = crate::shutdown::Restart::default();
    let state = AppState {
        restart: restart.clone(),
        registry: registry.clone(),
        metrics,
        router: router.clone(),
        tls: cfg.api.tls,
        data_dir: cfg.data_dir.clone(),
        data_key,
        certs: crate::tls::Certificates {
            node: node_tls.clone(),
            edge: edge.clone(),
        },
        identity,
        policies: mcp.policies.clone(),
        traffic: mcp.traffic.clone(),
    };
    tasks.spawn(api::listener::serve(
        http_listener,
        crate::http::router(
            state,
            mcp.clone(),
            crate::http::Layers {
                max_body_bytes: cfg.api.max_body_bytes,
                body_timeout: api::request_body::BodyTimeout(Duration::from_millis(
                    cfg.api.body_read_timeout_ms,
                )),
                hosts: api::host::HostPolicy::new(names),
            },
        ),
        shards.clone(),
        api::listener::EdgeSettings {
            tls: edge,
            next_request_spin: Duration::from_micros(cfg.api.next_request_spin_us),
            header_read_timeout: Duration::from_millis(cfg.api.header_read_timeout_ms),
            max_connections: cfg.api.max_connections,
        },
        shutdown.clone(),
    ));
    let exporter = tokio::spawn(crate::metrics::export_raft(raft.clone()));

    tokio::select! {
        _ = stop => tracing::info!("shutdown requested"),
        _ = restart.wait() => tracing::warn!("restarting in place"),
        Some(res) = tasks.join_next() => tracing::error!(?res, "a server task ended early; shutting down"),
    }
    // While the peers are still reached: what this node's sessions hold on servers elsewhere.
    crate::mcp::holds::let_go_all(&mcp, Duration::from_secs(2)).await;
    trigger.fire();
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    exporter.abort();
    // Give in-flight requests a moment (open watch streams never end on their own); then stop
    // whatever is left.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let _ = tokio::task::spawn_blocking(move || calls_log.close()).await;
    tracing::info!("mcpd stopped");
    Ok(if restart.requested() {
        Exit::Restart
    } else {
        Exit::Stopped
    })
}

/// How a node's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop (a signal).
    Stopped,
    /// Asked to start again in place, with the same arguments.
    Restart,
}

/// The edge's TLS as configured; `None` for `api.tls = "off"` (warned about).
fn edge_tls(cfg: &Config, names: Vec<String>, node: &NodeTls) -> Result<Option<EdgeTls>, TlsError> {
    let source = match cfg.api.tls {
        EdgeTlsMode::Off => {
            tracing::warn!(
                "api.tls = \"off\": the admin API and MCP are served as plain HTTP, tokens cross \
                 the network in clear text unless a TLS-terminating load balancer is in front"
            );
            return Ok(None);
        }
        EdgeTlsMode::Files => EdgeSource::Files {
            cert: cfg.api.tls_cert_file.clone().unwrap_or_default(),
            key: cfg.api.tls_key_file.clone().unwrap_or_default(),
        },
        EdgeTlsMode::Cluster => EdgeSource::Cluster {
            names,
            ttl: Duration::from_secs(cfg.tls.node_cert_ttl_hours * 3600),
        },
    };
    EdgeTls::new(source, node).map(Some)
}

/// The names a cluster-issued HTTPS certificate carries: loopback, the host the node
/// advertises and the one it listens on (unless a wildcard address), and `api.tls_names`.
fn edge_names(cfg: &Config, me: &Member) -> Vec<String> {
    let host = |hostport: &str| -> Option<String> {
        let h = hostport.rsplit_once(':')?.0.trim_matches(['[', ']']);
        let unspecified = h
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
        (!h.is_empty() && !unspecified).then(|| h.to_string())
    };
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
    names.extend(host(&me.http_addr));
    names.extend(host(&cfg.http_addr.to_string()));
    names.extend(cfg.api.tls_names.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Whether node `id` may call this node over gRPC: a member (voter or learner) of the
/// membership this node knows. While it knows none: the members it was told about when it
/// joined with a token, or (an initial node, before `init`) any node of the cluster.
fn members_check(raft: &Raft, told: Option<std::collections::BTreeSet<u64>>) -> MembersCheck {
    let raft = raft.clone();
    Arc::new(move |id| {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        if membership.nodes().next().is_none() {
            return told.as_ref().is_none_or(|t| t.contains(&id));
        }
        membership.get_node(&id).is_some()
    })
}

/// What the gRPC listener serves, and how it lets callers in.
struct GrpcServer {
    listener: TcpListener,
    /// Mutual TLS: a client certificate of the cluster CA required.
    tls: Arc<rustls::ServerConfig>,
    handshakes: crate::tls::peer::HandshakeLimits,
    members_only: MembersOnly,
    node_tls: Arc<NodeTls>,
    raft: Raft,
    registry: Registry,
    pools: Pools,
    runs: Arc<crate::pool::departed::RunsNamed>,
}

async fn serve_grpc(grpc: GrpcServer, shutdown: Shutdown) {
    let raft_svc = RaftServer::new(RaftService { raft: grpc.raft })
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let peer_svc = PeerServer::new(PeerService {
        registry: grpc.registry.clone(),
        pools: grpc.pools,
        runs: grpc.runs,
    })
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20);
    let cluster_svc = ClusterServer::new(ClusterService {
        registry: grpc.registry,
        tls: grpc.node_tls,
        shutdown: shutdown.clone(),
    });
    // Mutual TLS on every connection (no plaintext gRPC); `members_only` then checks each
    // call's certificate against the membership.
    let incoming =
        crate::tls::peer::incoming(grpc.listener, grpc.tls, grpc.handshakes, shutdown.clone());
    // Pings find a peer that vanished (powered off, cut off) under an idle long-lived stream,
    // which TCP alone would keep forever.
    let res = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .layer(grpc.members_only)
        .add_service(raft_svc)
        .add_service(cluster_svc)
        .add_service(peer_svc)
        .serve_with_incoming_shutdown(incoming, shutdown.wait())
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "gRPC server failed");
    }
}
