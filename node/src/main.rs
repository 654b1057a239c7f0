//! `mcpd`: run a node of the MCP control plane.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mcpd::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

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
    /// Calls that may wait for a server process, per server, before calls are refused.
    #[arg(long)]
    pool_queue_size: Option<usize>,
    /// Calls one server process serves at the same time.
    #[arg(long)]
    pool_max_concurrency: Option<usize>,
    /// How long a node may be unreachable before its servers are placed elsewhere (ms).
    #[arg(long)]
    placement_grace_ms: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Run a demo MCP server on stdin/stdout (newline-delimited JSON-RPC; logs on stderr), for
    /// the dev cluster, tests, benchmarks and chaos runs. `MCPD_DEMO_LEDGER` names the file its
    /// `counter_increment` tool appends to.
    DemoServer,
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
        set!(self.pool_max_concurrency => pool.max_concurrency_per_process);
        set!(self.placement_grace_ms => route.placement_grace_ms);
        if self.advertise_http.is_some() {
            cfg.advertise_http = self.advertise_http;
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

fn init_logging(cfg: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},openraft=warn", cfg.log.level)));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cfg.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
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

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(Sub::DemoServer) = args.cmd.take() {
        return runtime
            .build()
            .context("starting the async runtime")?
            .block_on(mcpd::demo::run());
    }
    let cfg = args.into_config()?;
    if cfg.runtime.worker_threads > 0 {
        runtime.worker_threads(cfg.runtime.worker_threads);
    }
    let shards = mcpd::shard::Shards::start(cfg.runtime.shards())?;
    let handles = shards.handles();
    let ran = runtime
        .build()
        .context("starting the async runtime")?
        .block_on(async move {
            init_logging(&cfg);
            let metrics = mcpd::metrics::install().context("installing the metrics recorder")?;
            mcpd::app::run(cfg, metrics, shutdown_signal(), handles).await?;
            Ok(())
        });
    // The main runtime is gone: stop the data plane's threads and what still runs on them.
    drop(shards);
    ran
}
