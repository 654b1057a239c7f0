//! `mcpd`: run a node of the MCP control plane.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mcpd::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's allocator. A node's registry grows in bursts of writes whose
/// Raft entries stay in memory until the next snapshot lets them go; glibc kept what they held
/// spread over its arenas, so after 300,000 writes a node held 790-920 bytes per object where a
/// node restarted with the same registry holds 575. jemalloc gives freed pages back as they
/// age (`scale-bench` in ARCHITECTURE.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A node of the MCP control plane: replicates the registry of MCP servers, tenants and
/// tokens with its peers (Raft over gRPC) and serves the admin API on HTTP.
///
/// Start three nodes, then run `mcpctl cluster init` against them.
#[derive(Debug, Parser)]
#[command(name = "mcpd", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Sub>,
    /// TOML configuration file; flags override its values.
    #[arg(long, short = 'c', env = "MCPD_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id (> 0, unique in the cluster, never reused).
    #[arg(long)]
    id: Option<u64>,
    /// Where the Raft log, snapshots and node identity are kept.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Listen address of the admin/MCP HTTP API (port 0 picks a free port).
    #[arg(long)]
    http_addr: Option<std::net::SocketAddr>,
    /// Listen address of the gRPC server for peers (port 0 picks a free port).
    #[arg(long)]
    grpc_addr: Option<std::net::SocketAddr>,
    /// The HTTP address peers and clients dial, when not the listen address.
    #[arg(long)]
    advertise_http: Option<String>,
    /// The gRPC address peers dial, when not the listen address.
    #[arg(long)]
    advertise_grpc: Option<String>,
    /// Bound on a write or linearizable read when there is no quorum (milliseconds).
    #[arg(long)]
    quorum_wait_ms: Option<u64>,
    /// Log entries between snapshots.
    #[arg(long)]
    snapshot_every: Option<u64>,
    /// Log entries kept behind a snapshot.
    #[arg(long)]
    keep_logs: Option<u64>,
    /// Log format on stderr.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// How often usage figures are sent to the replicated state (seconds).
    #[arg(long)]
    usage_flush_interval_s: Option<u64>,
    /// Calls that may wait for a server process, per server, before calls are refused.
    #[arg(long)]
    pool_queue_size: Option<usize>,
    /// Calls one server process serves at the same time.
    #[arg(long)]
    pool_max_concurrency: Option<usize>,
    /// How long a node may be unreachable before its servers are placed elsewhere (ms).
    #[arg(long)]
    placement_grace_ms: Option<u64>,
    /// A client must send each request's headers (and its TLS handshake) within this (ms).
    #[arg(long)]
    header_read_timeout_ms: Option<u64>,
    /// A request's whole body must arrive within this of its headers (ms).
    #[arg(long)]
    body_read_timeout_ms: Option<u64>,
    /// Open HTTP connections served at once; more are closed on accept.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Live MCP sessions one tenant may hold on this node.
    #[arg(long)]
    max_sessions_per_tenant: Option<usize>,
    /// Join through this node (`https://host:port`) with `--join-token`, when the TLS
    /// directory is still empty.
    #[arg(long)]
    join: Option<String>,
    /// The single-use join token of `mcpctl cluster join-token --id <this node's id>`.
    #[arg(long, env = "MCPD_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// The TLS directory (cluster CA, this node's certificate); default `<data_dir>/tls`.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// HTTPS certificate of the admin API and MCP: issued from the cluster CA, the operator's
    /// files (`api.tls_cert_file`), or off (plain HTTP behind a TLS-terminating balancer).
    #[arg(long, value_enum)]
    api_tls: Option<mcpd::tls::edge::EdgeTlsMode>,
    /// Export OpenTelemetry traces over OTLP/gRPC to this collector (`http://HOST:PORT`).
    #[arg(long, env = "MCPD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Also export the call log's events as OpenTelemetry logs to this collector
    /// (`http://HOST:PORT`).
    #[arg(long, env = "MCPD_CALL_AUDIT_OTLP_ENDPOINT")]
    call_audit_otlp_endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Every admin token lost: issue a new one through this host's node. Run on a node's
    /// host, as the user that owns its data directory; the node must be running and the
    /// cluster have quorum. Writes a one-time code into the data directory and redeems it at
    /// the node over its own HTTPS; prints the new admin token. The recovery is logged and
    /// recorded in the replicated state.
    RecoverAdmin {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The node's TLS directory, for its CA (default `<data_dir>/tls`).
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// How long the code stays valid (seconds).
        #[arg(long, default_value_t = 300)]
        ttl_seconds: u64,
    },
    /// Run a demo MCP server on stdin/stdout (newline-delimited JSON-RPC; logs on stderr), for
    /// the dev cluster, tests, benchmarks and chaos runs. `MCPD_DEMO_LEDGER` names the file its
    /// `counter_increment` tool appends to.
    DemoServer,
    /// Run COMMAND in a sandbox (how mcpd starts a sandboxed server's process): makes its
    /// namespaces, sets its limits, drops to its user, then becomes COMMAND.
    #[command(hide = true)]
    SandboxExec {
        #[command(flatten)]
        plan: mcpd::pool::sandbox::ExecPlan,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

impl Args {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut cfg = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::empty(),
        };
        macro_rules! set {
            ($flag:expr => $($field:tt)+) => {
                if let Some(v) = $flag {
                    cfg.$($field)+ = v;
                }
            };
        }
        set!(self.id => id);
        set!(self.data_dir => data_dir);
        set!(self.http_addr => http_addr);
        set!(self.grpc_addr => grpc_addr);
        set!(self.quorum_wait_ms => api.quorum_wait_ms);
        set!(self.snapshot_every => raft.snapshot_every);
        set!(self.keep_logs => raft.keep_logs);
        set!(self.log_format => log.format);
        set!(self.pool_queue_size => pool.queue_size);
        set!(self.usage_flush_interval_s => usage.flush_interval_s);
        set!(self.pool_max_concurrency => pool.max_concurrency_per_process);
        set!(self.placement_grace_ms => route.placement_grace_ms);
        set!(self.api_tls => api.tls);
        set!(self.header_read_timeout_ms => api.header_read_timeout_ms);
        set!(self.max_connections => api.max_connections);
        set!(self.body_read_timeout_ms => api.body_read_timeout_ms);
        set!(self.max_sessions_per_tenant => mcp.max_sessions_per_tenant);
        if self.tls_dir.is_some() {
            cfg.tls.dir = self.tls_dir;
        }
        if self.join.is_some() {
            cfg.tls.join_url = self.join;
        }
        if self.join_token.is_some() {
            cfg.tls.join_token = self.join_token;
        }
        if self.advertise_http.is_some() {
            cfg.advertise_http = self.advertise_http;
        }
        if self.otlp_endpoint.is_some() {
            cfg.tracing.otlp_endpoint = self.otlp_endpoint;
        }
        if self.call_audit_otlp_endpoint.is_some() {
            cfg.call_audit.otlp_endpoint = self.call_audit_otlp_endpoint;
        }
        if self.advertise_grpc.is_some() {
            cfg.advertise_grpc = self.advertise_grpc;
        }
        cfg.validate().with_context(|| match &self.config {
            Some(p) => format!("invalid configuration in {} (or flags)", p.display()),
            None => "invalid configuration (flags)".to_string(),
        })?;
        Ok(cfg)
    }
}

/// Logs on stderr, and the spans of `[tracing]` to its collector when it is set (the
/// exporter is returned, to be shut down last). Spans of [`mcpd::telemetry::TARGET`] never
/// reach the log.
fn init_logging(cfg: &Config) -> anyhow::Result<Option<mcpd::telemetry::Exporter>> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},openraft=warn", cfg.log.level)))
        .add_directive(
            format!("{}=off", mcpd::telemetry::TARGET)
                .parse()
                .context("the trace target's log directive")?,
        );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match cfg.log.format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    let source = mcpd::telemetry::Source {
        service_name: cfg.tracing.service_name.clone(),
        node_id: cfg.id,
    };
    match mcpd::telemetry::Exporter::start(&cfg.tracing, &source)
        .context("tracing.otlp_endpoint")?
    {
        Some((exporter, layer)) => {
            let only_spans = tracing_subscriber::filter::Targets::new()
                .with_target(mcpd::telemetry::TARGET, tracing::Level::INFO);
            registry.with(layer.with_filter(only_spans)).init();
            tracing::info!(
                endpoint = cfg.tracing.otlp_endpoint.as_deref().unwrap_or_default(),
                sample_ratio = cfg.tracing.sample_ratio,
                "exporting traces over OTLP"
            );
            Ok(Some(exporter))
        }
        None => {
            registry.init();
            Ok(None)
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `mcpd recover-admin`: see `mcpd::recovery`.
async fn recover_admin(
    data_dir: PathBuf,
    tls_dir: Option<PathBuf>,
    ttl_seconds: u64,
) -> anyhow::Result<()> {
    let endpoints_path = data_dir.join("endpoints.json");
    let endpoints: mcpd::app::Endpoints =
        serde_json::from_slice(&std::fs::read(&endpoints_path).with_context(|| {
            format!(
                "reading {} (is this a node's data directory?)",
                endpoints_path.display()
            )
        })?)
        .with_context(|| format!("parsing {}", endpoints_path.display()))?;
    let ca = tls_dir
        .unwrap_or_else(|| data_dir.join("tls"))
        .join(mcpcp_pki::ca::CA_CERT);
    let code = mcpd::recovery::begin(&data_dir, std::time::Duration::from_secs(ttl_seconds))?;
    let recovered = mcpd::recovery::send(&endpoints.http_addr, &ca, &code).await?;
    eprintln!(
        "admin access recovered through node {}: new admin token {} (shown once):",
        endpoints.id, recovered.token_id
    );
    println!("{}", recovered.admin_token);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    match args.cmd.take() {
        Some(Sub::SandboxExec { plan, command }) => {
            let e = mcpd::pool::sandbox::exec(&plan, &command);
            eprintln!("mcpd sandbox-exec: {e}");
            std::process::exit(127);
        }
        Some(Sub::DemoServer) => {
            return runtime
                .build()
                .context("starting the async runtime")?
                .block_on(mcpd::demo::run());
        }
        Some(Sub::RecoverAdmin {
            data_dir,
            tls_dir,
            ttl_seconds,
        }) => {
            return runtime
                .build()
                .context("starting the async runtime")?
                .block_on(recover_admin(data_dir, tls_dir, ttl_seconds));
        }
        None => {}
    }
    let cfg = args.into_config()?;
    if cfg.runtime.worker_threads > 0 {
        runtime.worker_threads(cfg.runtime.worker_threads);
    }
    let shards = mcpd::shard::Shards::start(cfg.runtime.shards())?;
    let handles = shards.handles();
    let ran: anyhow::Result<mcpd::app::Exit> = runtime
        .build()
        .context("starting the async runtime")?
        .block_on(async move {
            let exporter = init_logging(&cfg)?;
            let metrics = mcpd::metrics::install().context("installing the metrics recorder")?;
            let exit = mcpd::app::run(cfg, metrics, shutdown_signal(), handles).await;
            if let Some(exporter) = exporter {
                // Blocks while it sends what is queued; the connection runs on this runtime.
                let _ = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
            }
            Ok(exit?)
        });
    // The main runtime is gone: stop the data plane's threads and what still runs on them.
    drop(shards);
    if let mcpd::app::Exit::Restart = ran? {
        return restart_in_place();
    }
    Ok(())
}

/// Becomes a new mcpd with the same arguments and environment, in the same process (same pid,
/// so a supervisor or a pid file sees no change).
#[cfg(unix)]
fn restart_in_place() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding mcpd's own binary")?;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec();
    Err(err).context("starting again in place")
}

#[cfg(not(unix))]
fn restart_in_place() -> anyhow::Result<()> {
    anyhow::bail!("this platform cannot restart in place: start mcpd again")
}
