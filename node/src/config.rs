//! `mcpd`'s configuration: a TOML file whose every field has a default except the node's
//! identity, overridable by flags, validated once at load with errors that name the field.
//!
//! ```toml
//! id = 1
//! data_dir = "/var/lib/mcpd"
//! http_addr = "0.0.0.0:7400"        # admin API, MCP, /metrics, /livez, /readyz
//! grpc_addr = "0.0.0.0:7500"        # Raft and forwarding between nodes
//! advertise_http = "10.0.0.1:7400"  # what peers and clients dial (default: the listen address)
//! advertise_grpc = "10.0.0.1:7500"
//!
//! [raft]
//! heartbeat_ms = 50
//! election_timeout_min_ms = 200
//! election_timeout_max_ms = 400
//! snapshot_every = 1000             # entries between snapshots (log compaction)
//! keep_logs = 500                   # entries kept behind a snapshot for slow followers
//! early_replication = true          # send new entries to followers during the leader's fsync
//!
//! [api]
//! quorum_wait_ms = 5000             # bound on a write or linearizable read without quorum
//! max_body_bytes = 1048576
//! next_request_spin_us = 100        # after answering, poll this long for the next request
//! tls = "cluster"                   # HTTPS certificate: "cluster" (issued here), "files", "off"
//! tls_names = []                    # extra names/addresses of the cluster-issued certificate
//! tls_cert_file = "/etc/mcpd/https.pem"   # with tls = "files"; re-read when it changes
//! tls_key_file = "/etc/mcpd/https.key"
//! header_read_timeout_ms = 10000    # headers (and the TLS handshake) within this, or closed
//! max_connections = 4096            # open connections; more are closed at once
//! body_read_timeout_ms = 30000      # a request's body within this of its headers
//!
//! [tls]
//! dir = "/var/lib/mcpd/tls"         # ca.pem, ca.key, node.pem, node.key (default <data_dir>/tls)
//! node_cert_ttl_hours = 720         # the peer certificate's life; renewed with a third left
//! join_url = "https://10.0.0.1:7400" # a new node: join through this node ...
//! join_token = "mcpj_..."           # ... with this token (mcpctl cluster join-token --id N)
//! peer_handshake_timeout_ms = 10000 # a peer's TLS handshake on the gRPC address, or closed
//! max_peer_handshakes = 256         # handshakes under way there; more are closed at once
//!
//! [log]
//! format = "text"                   # or "json"
//! level = "info"                    # RUST_LOG wins when set
//!
//! [pool]
//! queue_size = 256                  # calls that may wait for a process, per server
//! queue_size_per_tenant = 128       # of them, calls of one tenant (no tenant: queue_size)
//! max_concurrency_per_process = 32
//! health_interval_ms = 15000        # ping every process this often
//! answer_spin_us = 100              # a lone call polls this long for its answer (0: never)
//! max_input_questions = 64          # questions a 2026-07-28 server may ask in one round
//! listen_open_timeout_ms = 10000    # a 2026-07-28 server's listen stream: taken within this
//! listen_backoff_max_ms = 30000     # ...else tried again, pauses doubling up to this
//! oauth_failure_hold_ms = 5000      # a remote server's failed token fetch stands this long
//! inherit_env = ["PATH", "HOME", "LANG", "TMPDIR"]   # what server processes get of mcpd's env
//!
//! [runtime]
//! worker_threads = 0                # 0: one per CPU
//! data_plane_threads = 0            # HTTP connections and server I/O; 0: one per CPU
//!
//! [mcp]
//! allowed_origins = []              # browser origins allowed besides loopback
//! session_idle_timeout_ms = 1800000
//! max_sessions_per_tenant = 1000    # live sessions per tenant on this node; more get 429
//! max_session_info_bytes = 4096     # clientInfo + capabilities an initialize may carry
//! max_subscriptions_per_session = 256
//! max_uri_bytes = 2048              # longest resource URI a session may subscribe to
//! max_streams_per_session = 4       # open SSE streams (GET) per session per node
//! session_state_interval_ms = 1000  # a session's state is replicated at most this often
//! session_state_wait_ms = 1000      # an answer waits this long for that replication
//! parked_call_ttl_ms = 300000       # a call waiting for its client's input waits this long
//! max_parked_calls_per_caller = 64  # calls one caller may have waiting for its input
//! input_gather_ms = 20              # questions asked within this of the first go together
//! max_answers_ahead = 32            # answers a first request may give before the questions
//!
//! [route]                           # see crate::route::config; every key has a default
//! placement_grace_ms = 10000        # a node unreachable this long loses its placed servers
//! max_attempts = 3                  # attempts per call, the first included
//! list_wait_ms = 3000               # a list waits this long after a server's start for it
//! [route.breaker]                   # window_ms, min_calls, failure_rate, consecutive_failures,
//!                                   # open_base_ms, open_max_ms, probes, successes_to_close
//! [route.retry_budget]              # ratio, window_ms, min_retries_per_sec
//! [route.backoff]                   # base_ms, cap_ms
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tls::edge::EdgeTlsMode;

/// A configuration error that names the field (and file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid {
        field: std::borrow::Cow<'static, str>,
        message: String,
    },
}

fn invalid(
    field: impl Into<std::borrow::Cow<'static, str>>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub id: u64,
    #[serde(default)]
    pub data_dir: PathBuf,
    #[serde(default = "default_http")]
    pub http_addr: SocketAddr,
    #[serde(default = "default_grpc")]
    pub grpc_addr: SocketAddr,
    #[serde(default)]
    pub advertise_http: Option<String>,
    #[serde(default)]
    pub advertise_grpc: Option<String>,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub pool: crate::pool::PoolConfig,
    #[serde(default)]
    pub mcp: crate::mcp::McpConfig,
    #[serde(default)]
    pub route: crate::route::config::RouteConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub tls: crate::tls::TlsConfig,
    /// `[identity]`: resource URLs and trusted issuers' keys (`crate::identity`).
    #[serde(default)]
    pub identity: crate::identity::config::IdentityConfig,
    /// `[call_audit]`: the log of every tool call, resource read and prompt get
    /// (`crate::call_audit`).
    #[serde(default)]
    pub call_audit: crate::call_audit::config::CallAuditConfig,
    /// `[traffic]`: the recent figures per server the console charts (`crate::traffic`).
    #[serde(default)]
    pub traffic: crate::traffic::TrafficConfig,
    /// `[usage]`: usage accounting per tenant, subject, server and tool (`crate::usage`).
    #[serde(default)]
    pub usage: crate::usage::UsageConfig,
    /// `[tracing]`: OpenTelemetry traces over OTLP (`crate::telemetry`); off by default.
    #[serde(default)]
    pub tracing: crate::telemetry::TracingConfig,
}

/// `[runtime]`: the threads `mcpd` runs on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads of the main runtime (Raft, gRPC, supervisors, background work); 0: one
    /// per CPU. The Raft log's fsyncs and blocking work run on threads of their own either
    /// way. With `data_plane_threads`, this caps the CPU `mcpd` itself can take on a host it
    /// shares with the MCP server processes it runs.
    pub worker_threads: usize,
    /// Data-plane threads (see `crate::shard`): each runs a share of the HTTP connections and
    /// of the MCP server processes on a single-threaded runtime; 0: one per CPU.
    pub data_plane_threads: usize,
}

impl RuntimeConfig {
    /// The number of data-plane threads to start.
    pub fn shards(&self) -> usize {
        match self.data_plane_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}

fn default_grpc() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7500))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_every: u64,
    pub keep_logs: u64,
    /// Largest snapshot chunk sent in one RPC.
    pub snapshot_chunk_bytes: u64,
    pub max_payload_entries: u64,
    /// The leader sends new entries to its followers while its own fsync of them runs
    /// (see `raft::early`), so that a write waits for two overlapping fsyncs, not two in a row.
    pub early_replication: bool,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_every: 1000,
            keep_logs: 500,
            snapshot_chunk_bytes: 1 << 20,
            max_payload_entries: 256,
            early_replication: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub quorum_wait_ms: u64,
    pub max_body_bytes: usize,
    /// How long a connection that has just answered polls for its client's next request
    /// before letting its thread sleep, in µs (0: never). One connection per node at a time;
    /// see `api::listener`.
    pub next_request_spin_us: u64,
    /// Where the HTTPS certificate comes from (`crate::tls::edge`): `cluster`, `files` or
    /// `off` (plain HTTP behind a TLS-terminating load balancer only).
    pub tls: EdgeTlsMode,
    /// Names and addresses the cluster-issued certificate carries besides `localhost`,
    /// loopback and the node's own host (a VIP, a load balancer's name).
    pub tls_names: Vec<String>,
    /// With `tls = "files"`: the certificate chain (PEM, leaf first), re-read when it changes.
    pub tls_cert_file: Option<PathBuf>,
    /// With `tls = "files"`: its private key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// A client must send a request's headers (and its TLS handshake) within this time; a
    /// kept-alive connection that sends no next request within it is closed.
    pub header_read_timeout_ms: u64,
    /// Open connections the node serves at once; more are closed at once, not queued.
    pub max_connections: usize,
    /// A request's whole body must arrive within this of its headers.
    pub body_read_timeout_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            quorum_wait_ms: 5000,
            max_body_bytes: 1 << 20,
            next_request_spin_us: 100,
            tls: EdgeTlsMode::Cluster,
            tls_names: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            header_read_timeout_ms: 10_000,
            max_connections: 4096,
            body_read_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Config {
    /// Reads `path`; unknown keys and wrong types are errors naming the key.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// An empty configuration for flags to fill.
    pub fn empty() -> Config {
        // Every field has a serde default, so an empty document always parses.
        toml::from_str("").unwrap_or_else(|_| unreachable!("an empty config parses"))
    }

    /// What peers dial for HTTP.
    pub fn advertised_http(&self) -> String {
        self.advertise_http
            .clone()
            .unwrap_or_else(|| self.http_addr.to_string())
    }

    /// The node's TLS directory (`[tls] dir`, default `<data_dir>/tls`).
    pub fn tls_dir(&self) -> PathBuf {
        self.tls
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("tls"))
    }

    /// What peers dial for gRPC.
    pub fn advertised_grpc(&self) -> String {
        self.advertise_grpc
            .clone()
            .unwrap_or_else(|| self.grpc_addr.to_string())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.route
            .validate()
            .map_err(|(field, message)| invalid(field, message))?;
        self.identity
            .validate()
            .map_err(|(field, message)| invalid(field, message))?;
        self.call_audit
            .validate()
            .map_err(|(field, message)| invalid(field, message))?;
        self.traffic
            .validate()
            .map_err(|(field, message)| invalid(field, message))?;
        self.usage
            .validate()
            .map_err(|(field, message)| invalid(field, message))?;
        self.tracing
            .validate()
            .map_err(|(field, message)| invalid(field, message))?;
        if self.id == 0 {
            return Err(invalid("id", "is required and must be greater than 0"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "is required"));
        }
        if self.http_addr == self.grpc_addr && self.http_addr.port() != 0 {
            return Err(invalid("grpc_addr", "must differ from http_addr"));
        }
        for (field, v) in [
            ("advertise_http", &self.advertise_http),
            ("advertise_grpc", &self.advertise_grpc),
        ] {
            if let Some(v) = v {
                if !v.contains(':') {
                    return Err(invalid(field, format!("{v:?} must be host:port")));
                }
            }
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            return Err(invalid("raft.heartbeat_ms", "must be greater than 0"));
        }
        if r.election_timeout_min_ms <= r.heartbeat_ms {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                "must be greater than raft.heartbeat_ms",
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                "must be greater than raft.election_timeout_min_ms",
            ));
        }
        if r.snapshot_every == 0 {
            return Err(invalid("raft.snapshot_every", "must be greater than 0"));
        }
        if r.snapshot_chunk_bytes < 1024 {
            return Err(invalid(
                "raft.snapshot_chunk_bytes",
                "must be at least 1024",
            ));
        }
        if r.max_payload_entries == 0 {
            return Err(invalid(
                "raft.max_payload_entries",
                "must be greater than 0",
            ));
        }
        if self.api.quorum_wait_ms == 0 {
            return Err(invalid("api.quorum_wait_ms", "must be greater than 0"));
        }
        if self.api.max_body_bytes < 1024 {
            return Err(invalid("api.max_body_bytes", "must be at least 1024"));
        }
        if self.pool.queue_size_per_tenant == 0 {
            return Err(invalid(
                "pool.queue_size_per_tenant",
                "must be greater than 0",
            ));
        }
        if self.pool.max_concurrency_per_process == 0 {
            return Err(invalid(
                "pool.max_concurrency_per_process",
                "must be greater than 0",
            ));
        }
        if self.pool.health_interval_ms == 0 || self.pool.health_timeout_ms == 0 {
            return Err(invalid(
                "pool.health_interval_ms",
                "health interval and timeout must be greater than 0",
            ));
        }
        if self.runtime.worker_threads > 1024 {
            return Err(invalid("runtime.worker_threads", "must be at most 1024"));
        }
        if self.runtime.data_plane_threads > 1024 {
            return Err(invalid(
                "runtime.data_plane_threads",
                "must be at most 1024",
            ));
        }
        if self.api.next_request_spin_us > 10_000 {
            return Err(invalid(
                "api.next_request_spin_us",
                "must be at most 10000 (10 ms); polling longer only burns CPU",
            ));
        }
        if !(1..=1024).contains(&self.pool.max_input_questions) {
            return Err(invalid(
                "pool.max_input_questions",
                "must be 1 to 1024 (each question of a round reaches the client at once)",
            ));
        }
        if !(100..=300_000).contains(&self.pool.listen_open_timeout_ms) {
            return Err(invalid(
                "pool.listen_open_timeout_ms",
                "must be 100 to 300000",
            ));
        }
        if !(500..=600_000).contains(&self.pool.listen_backoff_max_ms) {
            return Err(invalid(
                "pool.listen_backoff_max_ms",
                "must be 500 to 600000 (the first pause is 500 ms)",
            ));
        }
        if self.pool.oauth_failure_hold_ms > 300_000 {
            return Err(invalid(
                "pool.oauth_failure_hold_ms",
                "must be at most 300000 (5 minutes)",
            ));
        }
        if self.pool.answer_spin_us > 10_000 {
            return Err(invalid(
                "pool.answer_spin_us",
                "must be at most 10000 (10 ms); polling longer only burns CPU",
            ));
        }
        match (
            self.api.tls,
            &self.api.tls_cert_file,
            &self.api.tls_key_file,
        ) {
            (EdgeTlsMode::Files, None, _) => {
                return Err(invalid(
                    "api.tls_cert_file",
                    "is required with api.tls = \"files\"",
                ))
            }
            (EdgeTlsMode::Files, _, None) => {
                return Err(invalid(
                    "api.tls_key_file",
                    "is required with api.tls = \"files\"",
                ))
            }
            _ => {}
        }
        if self.tls.join_url.is_some() != self.tls.join_token.is_some() {
            return Err(invalid(
                "tls.join_token",
                "join_url and join_token go together",
            ));
        }
        if self.api.header_read_timeout_ms == 0 {
            return Err(invalid(
                "api.header_read_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.api.body_read_timeout_ms == 0 {
            return Err(invalid(
                "api.body_read_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.api.max_connections == 0 {
            return Err(invalid("api.max_connections", "must be greater than 0"));
        }
        if self.tls.node_cert_ttl_hours == 0 || self.tls.node_cert_ttl_hours > 5 * 365 * 24 {
            return Err(invalid(
                "tls.node_cert_ttl_hours",
                "must be from 1 to 43800 (5 years; the CA lives 10)",
            ));
        }
        if !(100..=120_000).contains(&self.tls.peer_handshake_timeout_ms) {
            return Err(invalid(
                "tls.peer_handshake_timeout_ms",
                "must be from 100 to 120000",
            ));
        }
        if !(1..=65_536).contains(&self.tls.max_peer_handshakes) {
            return Err(invalid(
                "tls.max_peer_handshakes",
                "must be from 1 to 65536",
            ));
        }
        if self.api.max_connections > 1 << 20 {
            return Err(invalid("api.max_connections", "must be at most 1048576"));
        }
        if let Some(bad) = self
            .pool
            .inherit_env
            .iter()
            .find(|n| n.is_empty() || n.contains('=') || n.contains('\0'))
        {
            return Err(invalid(
                "pool.inherit_env",
                format!("{bad:?} is not an environment variable name"),
            ));
        }
        for (field, value) in [
            (
                "mcp.max_sessions_per_tenant",
                self.mcp.max_sessions_per_tenant,
            ),
            (
                "mcp.max_session_info_bytes",
                self.mcp.max_session_info_bytes,
            ),
            (
                "mcp.max_subscriptions_per_session",
                self.mcp.max_subscriptions_per_session,
            ),
            ("mcp.max_uri_bytes", self.mcp.max_uri_bytes),
            (
                "mcp.max_streams_per_session",
                self.mcp.max_streams_per_session,
            ),
            (
                "mcp.max_parked_calls_per_caller",
                self.mcp.max_parked_calls_per_caller,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if self.mcp.session_idle_timeout_ms == 0 {
            return Err(invalid(
                "mcp.session_idle_timeout_ms",
                "must be greater than 0",
            ));
        }
        if !(1..=60_000).contains(&self.mcp.session_state_interval_ms) {
            return Err(invalid(
                "mcp.session_state_interval_ms",
                "must be from 1 to 60000",
            ));
        }
        if self.mcp.session_state_wait_ms > 60_000 {
            return Err(invalid(
                "mcp.session_state_wait_ms",
                "must be at most 60000 (0: answers never wait for the replication)",
            ));
        }
        if !(1_000..=24 * 3_600_000).contains(&self.mcp.parked_call_ttl_ms) {
            return Err(invalid(
                "mcp.parked_call_ttl_ms",
                "must be from 1000 to 86400000 (a day)",
            ));
        }
        if self.mcp.input_gather_ms > 10_000 {
            return Err(invalid(
                "mcp.input_gather_ms",
                "must be at most 10000 (each round waits this long for more questions)",
            ));
        }
        if self.mcp.max_answers_ahead > 1024 {
            return Err(invalid("mcp.max_answers_ahead", "must be at most 1024"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_only_identity() {
        let c: Config = toml::from_str("id = 3\ndata_dir = \"/tmp/x\"").expect("parses");
        assert!(c.validate().is_ok());
        assert_eq!(c.api.quorum_wait_ms, 5000);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = toml::from_str::<Config>("id = 1\n[raft]\nheartbeat = 5").unwrap_err();
        assert!(e.to_string().contains("heartbeat"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let mut c: Config = toml::from_str("id = 1\ndata_dir = \"d\"").expect("parses");
        c.raft.election_timeout_min_ms = 10;
        match c.validate() {
            Err(ConfigError::Invalid { field, .. }) => {
                assert_eq!(field, "raft.election_timeout_min_ms")
            }
            other => panic!("unexpected {other:?}"),
        }
        let c: Config = toml::from_str("data_dir = \"d\"").expect("parses");
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid { field, .. }) if field == "id"
        ));
        for (toml, field) in [
            ("[pool]\nanswer_spin_us = 20000", "pool.answer_spin_us"),
            (
                "[pool]\nmax_input_questions = 0",
                "pool.max_input_questions",
            ),
            (
                "[pool]\nqueue_size_per_tenant = 0",
                "pool.queue_size_per_tenant",
            ),
            (
                "[api]\nnext_request_spin_us = 20000",
                "api.next_request_spin_us",
            ),
            ("[runtime]\nworker_threads = 5000", "runtime.worker_threads"),
            (
                "[runtime]\ndata_plane_threads = 5000",
                "runtime.data_plane_threads",
            ),
            ("[mcp]\nparked_call_ttl_ms = 10", "mcp.parked_call_ttl_ms"),
            (
                "[mcp]\nsession_state_wait_ms = 600000",
                "mcp.session_state_wait_ms",
            ),
            (
                "[mcp]\nsession_state_interval_ms = 0",
                "mcp.session_state_interval_ms",
            ),
            (
                "[mcp]\nmax_parked_calls_per_caller = 0",
                "mcp.max_parked_calls_per_caller",
            ),
            ("[mcp]\ninput_gather_ms = 60000", "mcp.input_gather_ms"),
            (
                "[call_audit]\notlp_export_timeout_ms = 10",
                "call_audit.otlp_export_timeout_ms",
            ),
            (
                "[call_audit]\nflush_interval_ms = 0",
                "call_audit.flush_interval_ms",
            ),
            (
                "[pool]\nlisten_open_timeout_ms = 10",
                "pool.listen_open_timeout_ms",
            ),
            (
                "[pool]\nlisten_backoff_max_ms = 100",
                "pool.listen_backoff_max_ms",
            ),
            (
                "[pool]\noauth_failure_hold_ms = 900000",
                "pool.oauth_failure_hold_ms",
            ),
            ("[mcp]\nmax_answers_ahead = 5000", "mcp.max_answers_ahead"),
        ] {
            let c: Config =
                toml::from_str(&format!("id = 1\ndata_dir = \"d\"\n{toml}")).expect("parses");
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{toml}: unexpected {other:?}"),
            }
        }
    }
}
