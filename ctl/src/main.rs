//! `mcpctl`: operate an MCP control-plane cluster.
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 3 unavailable (no quorum, or no node reachable).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mcpcp_proto::api::{
    AddNodeRequest, ClusterStatus, CreateTokenRequest, Effect, IssuerSpec, Member, OAuthClient,
    PolicySpec, PolicyTest, Role, SandboxCapabilities, SandboxSpec, ServerPatch, ServerSpec,
    SessionMode, TenantSpec, Timeouts, ToolDiff, ToolPins, Versioned,
};
use mcpctl::{dev, import, AdminClient, CallOptions, ClientError};
use serde::Serialize;

/// `println!` for the command's output. When stdout is closed early (`mcpctl server list |
/// head -1`), the command ends quietly, as Unix tools do, instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: writing the output: {e}");
            std::process::exit(1);
        }
    }};
}

#[derive(Debug, Parser)]
#[command(
    name = "mcpctl",
    version,
    about = "Operate an MCP control-plane cluster"
)]
struct Cli {
    /// Node endpoints (comma list of host:port or URLs), tried in order.
    #[arg(long, env = "MCPCTL_ENDPOINTS", value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// Admin bearer token.
    #[arg(long, env = "MCPCTL_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The CA certificate (PEM) that signed the nodes' HTTPS certificates: the cluster's
    /// `ca.pem`. Without it, the system's roots.
    #[arg(long, env = "MCPCTL_CACERT", global = true)]
    cacert: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table", global = true)]
    output: Output,
    /// Read this node's local state instead of a linearizable read (works without quorum).
    #[arg(long, global = true)]
    stale: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

// Parsed once per run: the size of its largest variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Bootstrap, inspect and change the cluster's membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Register and manage MCP servers.
    #[command(subcommand)]
    Server(ServerCmd),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Mint, list and revoke bearer tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Trust an OpenID provider's JWT access tokens (OIDC/OAuth), list and remove issuers.
    #[command(subcommand)]
    Issuer(IssuerCmd),
    /// Authorization rules for MCP calls: add, list, remove, and test a call against them.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Virtual servers: curated, renamed tools of several servers at /v/NAME/mcp.
    #[command(subcommand, name = "vserver")]
    Vserver(VserverCmd),
    /// Commands tenant admins may run as local servers: approve, list, remove.
    #[command(subcommand, name = "command")]
    Approved(CommandCmd),
    /// Rate limits and quotas on MCP calls, for the whole cluster: set, list, usage, remove.
    #[command(subcommand)]
    Limit(LimitCmd),
    /// Calls, errors, time and bytes per tenant, subject, server and tool.
    Usage {
        /// How far back: 90m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        server: Option<String>,
    },
    /// The audit trail of admin changes: list, export, verify its hash chain, retention.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Register the servers of a control-plane YAML or a Claude Desktop config.
    Import {
        /// `control_plane.yaml` or `claude_desktop_config.json`.
        file: PathBuf,
        /// Register into this tenant instead of globally.
        #[arg(long)]
        tenant: Option<String>,
        /// Print what would be registered, register nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Back up the registry, and make a new cluster from a backup.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// A local cluster for development.
    #[command(subcommand)]
    Dev(DevCmd),
    /// Configure AI clients to reach the cluster through `mcp-bridge`.
    #[command(subcommand)]
    Bridge(BridgeCmd),
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Save a consistent snapshot of the registry, taken by the leader at a linearizable
    /// point, into FILE (never over an existing file); checked before it is named FILE.
    Save { file: PathBuf },
    /// Check a snapshot file (length, checksum) and print where and when it was taken.
    Status { file: PathBuf },
    /// Lay out one member's data directory of a new cluster made from a snapshot; run once per
    /// member, then start each `mcpd` on its directory with the CA, and the data key of the
    /// snapshot's cluster, in its TLS directory.
    Restore {
        file: PathBuf,
        /// The new, empty data directory of this member (it may hold a filled `tls`).
        #[arg(long)]
        data_dir: PathBuf,
        /// This member's node id.
        #[arg(long)]
        id: u64,
        /// Every member of the new cluster, as ID=HTTP_ADDR,GRPC_ADDR (repeat). The ids must
        /// be new to the snapshot's cluster.
        #[arg(long = "member", required = true, value_parser = mcpcp_proto::snapshot::parse_member)]
        members: Vec<Member>,
        /// Accept a snapshot whose audit trail begins with events without a MAC (taken from a
        /// cluster that started on a release before the trail was keyed). Without it such a
        /// trail is refused at the first start: its MACs may have been taken off.
        #[arg(long)]
        allow_unkeyed_audit: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BridgeCmd {
    /// Print the JSON snippet to paste into the client's MCP configuration.
    Config {
        /// Which client's format.
        #[arg(long, value_enum)]
        client: AiClient,
        /// Expose one server instead of the aggregate.
        #[arg(long)]
        server: Option<String>,
        /// Mint a fresh token for this tenant and put it in the snippet (else a placeholder).
        #[arg(long)]
        tenant: Option<String>,
        /// The name of the entry in the client's configuration.
        #[arg(long, default_value = "mcpcp")]
        name: String,
        /// The mcp-bridge binary (default: next to mcpctl).
        #[arg(long)]
        bridge: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AiClient {
    Claude,
    Cursor,
    Vscode,
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Form a cluster of the given nodes (default: every endpoint) and print the admin token.
    Init {
        /// Nodes to form the cluster from; the first receives the request.
        #[arg(long = "node", value_delimiter = ',')]
        nodes: Vec<String>,
    },
    /// Members, leader, term, indexes and each member's health.
    Status,
    /// Add a node: as a learner, then (unless --learner) a voter once it caught up.
    AddNode {
        #[arg(long)]
        id: u64,
        /// The new node's HTTP address (host:port).
        #[arg(long)]
        http: String,
        /// The new node's gRPC address (host:port).
        #[arg(long)]
        grpc: String,
        /// Keep it a non-voting learner.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the membership.
    RemoveNode { id: u64 },
    /// Disaster recovery: make the node of --endpoints (a standby site's learner) a one-node
    /// cluster of its own state after every voter is lost, as etcd's --force-new-cluster.
    /// Refused while any voter answers it. Grow the new cluster with `add-node`.
    Promote {
        /// Required: the node leaves its cluster for good and starts a new one.
        #[arg(long)]
        force_new_cluster: bool,
    },
    /// A single-use join token for a new node: start it with `--join <a node> --join-token
    /// <token>` and an empty TLS directory; it fetches the cluster CA and data key itself, over
    /// TLS pinned to the CA. Then `cluster add-node` makes it a member.
    JoinToken {
        /// The new node's id (never a member before).
        #[arg(long)]
        id: u64,
        /// How long the token stays valid, in seconds.
        #[arg(long, default_value_t = 900)]
        ttl: u64,
    },
    /// Every member issues itself new certificates now (peer and HTTPS), without a restart;
    /// connections already open stay up. Nodes also renew by themselves before expiry.
    RotateCerts,
    /// The cluster's certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
}

#[derive(Debug, Subcommand)]
enum CaCmd {
    /// Make the cluster CA once, before the first node starts: DIR/ca.pem (the certificate
    /// clients trust), DIR/ca.key and DIR/data.key (the key that seals secrets at rest; both
    /// mode 0600). Put all three into every initial node's TLS directory (`[tls] dir`,
    /// default `<data_dir>/tls`); each node issues its own certificates from the CA.
    Create {
        /// Where to write ca.pem, ca.key and data.key.
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's id, named in every certificate (lowercase letters, digits, '-').
        #[arg(long)]
        cluster_id: String,
    },
}

#[derive(Debug, Args)]
struct ServerFlags {
    /// Restrict the server to one tenant (default: global).
    #[arg(long)]
    tenant: Option<String>,
    /// Processes per node.
    #[arg(long)]
    pool_size: Option<u32>,
    /// Nodes that run it (default: every node).
    #[arg(long)]
    replicas: Option<u32>,
    /// A fallback server (repeat for more, in order).
    #[arg(long = "fallback")]
    fallbacks: Vec<String>,
    /// Environment variable K=V (repeatable).
    #[arg(long = "env", value_parser = parse_kv)]
    env: Vec<(String, String)>,
    /// A tool that is safe to retry (repeatable).
    #[arg(long = "idempotent-tool")]
    idempotent_tools: Vec<String>,
    /// Working directory of the processes.
    #[arg(long)]
    cwd: Option<String>,
    /// shared (pooled) or dedicated (a process per session).
    #[arg(long, value_enum)]
    session_mode: Option<Mode>,
    /// Request timeout in milliseconds.
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    /// A remote server's Streamable HTTP endpoint (`https://host/mcp`), instead of a command.
    #[arg(long)]
    url: Option<String>,
    /// A header K=V sent to a remote server (repeatable); its value is sealed like env.
    #[arg(long = "header", value_parser = parse_kv)]
    headers: Vec<(String, String)>,
    /// Send `Authorization: Bearer <the value of this environment variable>` to a remote
    /// server (read here, so the token is not on the command line).
    #[arg(long)]
    bearer_env: Option<String>,
    /// A remote server's CA certificate file (PEM, on every node; default: the system's
    /// roots).
    #[arg(long)]
    ca_file: Option<String>,
    /// A remote server's OAuth token endpoint: each node gets its access tokens there with
    /// the client credentials grant (with --oauth-client-id and --oauth-client-secret-env).
    #[arg(long)]
    oauth_token_url: Option<String>,
    /// The OAuth client's id.
    #[arg(long)]
    oauth_client_id: Option<String>,
    /// The environment variable that holds the OAuth client's secret (read here, so the
    /// secret is not on the command line; sealed like env).
    #[arg(long)]
    oauth_client_secret_env: Option<String>,
    /// A scope to ask the token for (repeatable).
    #[arg(long = "oauth-scope")]
    oauth_scopes: Vec<String>,
    /// The resource the tokens are for, their audience (default: --url).
    #[arg(long)]
    oauth_resource: Option<String>,
    /// A CA certificate file for the token endpoint (default: the system's roots).
    #[arg(long)]
    oauth_ca_file: Option<String>,
    /// Run the processes as USER or USER:GROUP (names or numbers; mcpd must run as root).
    #[arg(long)]
    run_as: Option<String>,
    /// Kill a process whose resident memory passes this many MiB.
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Kill a process that has used this many seconds of CPU (its slot starts a new one).
    #[arg(long)]
    cpu_seconds: Option<u64>,
    /// Most open files per process.
    #[arg(long)]
    open_files: Option<u64>,
    /// Most processes of the --run-as user.
    #[arg(long)]
    processes: Option<u64>,
    /// No network for the processes (a network namespace of their own). This and the
    /// filesystem flags below need --run-as (a user of the server's own) and mcpd as root.
    #[arg(long)]
    private_network: bool,
    /// A read-only filesystem for the processes, but --writable paths (mcpd must run as root).
    #[arg(long)]
    read_only: bool,
    /// With --read-only: a path the processes may still write (repeatable).
    #[arg(long = "writable", value_name = "PATH")]
    writable_paths: Vec<String>,
    /// A path the processes cannot see (repeatable); mcpd's data directory is always hidden
    /// with --read-only, --private-tmp or --hide.
    #[arg(long = "hide", value_name = "PATH")]
    hidden_paths: Vec<String>,
    /// A /tmp of the processes' own.
    #[arg(long)]
    private_tmp: bool,
}

impl ServerFlags {
    /// The sandbox the flags ask for, if any of its flags is given.
    fn sandbox(&self) -> Option<SandboxSpec> {
        let s = SandboxSpec {
            run_as: self.run_as.clone(),
            memory_mb: self.memory_mb,
            cpu_seconds: self.cpu_seconds,
            open_files: self.open_files,
            processes: self.processes,
            private_network: self.private_network,
            read_only: self.read_only,
            writable_paths: self.writable_paths.clone(),
            hidden_paths: self.hidden_paths.clone(),
            private_tmp: self.private_tmp,
        };
        (s != SandboxSpec::default()).then_some(s)
    }

    /// The OAuth client the `--oauth-*` flags describe, if any is given.
    fn oauth(&self) -> Result<Option<OAuthClient>, Failure> {
        let any = self.oauth_client_id.is_some()
            || self.oauth_client_secret_env.is_some()
            || !self.oauth_scopes.is_empty()
            || self.oauth_resource.is_some()
            || self.oauth_ca_file.is_some();
        let Some(token_url) = &self.oauth_token_url else {
            return match any {
                true => Err(fail(2, "the --oauth-* flags need --oauth-token-url")),
                false => Ok(None),
            };
        };
        let client_id = self
            .oauth_client_id
            .clone()
            .ok_or_else(|| fail(2, "--oauth-token-url needs --oauth-client-id"))?;
        let var = self
            .oauth_client_secret_env
            .as_deref()
            .ok_or_else(|| fail(2, "--oauth-token-url needs --oauth-client-secret-env"))?;
        let client_secret = secret_from_env("--oauth-client-secret-env", var)?;
        Ok(Some(OAuthClient {
            token_url: token_url.clone(),
            client_id,
            client_secret,
            scopes: self.oauth_scopes.clone(),
            resource: self.oauth_resource.clone(),
            ca_file: self.oauth_ca_file.clone(),
        }))
    }

    /// `--header` values, with `--bearer-env`'s token as `Authorization`.
    fn headers(&self) -> Result<BTreeMap<String, String>, Failure> {
        let mut headers: BTreeMap<String, String> = self.headers.iter().cloned().collect();
        if let Some(var) = &self.bearer_env {
            let token = secret_from_env("--bearer-env", var)?;
            headers.insert("Authorization".into(), format!("Bearer {token}"));
        }
        Ok(headers)
    }
}

/// The secret a flag names by its environment variable (read here, so that it is not on the
/// command line).
fn secret_from_env(flag: &str, var: &str) -> Result<String, Failure> {
    std::env::var(var).map_err(|_| fail(2, format!("{flag} {var}: the variable is not set")))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Shared,
    Dedicated,
}

impl From<Mode> for SessionMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Shared => SessionMode::Shared,
            Mode::Dedicated => SessionMode::Dedicated,
        }
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not K=V"))
}

#[derive(Debug, Subcommand)]
enum ServerCmd {
    /// Register a server: `mcpctl server add NAME [flags] -- CMD [ARGS...]`.
    Add {
        name: String,
        #[command(flatten)]
        flags: ServerFlags,
        /// Register it disabled.
        #[arg(long)]
        disabled: bool,
        /// The command and its arguments, after `--` (or `--url` for a remote server).
        #[arg(last = true)]
        command: Vec<String>,
    },
    List,
    Get {
        name: String,
    },
    /// Where it runs, each replica's processes, and the circuit breakers.
    Status {
        name: String,
    },
    /// Change a server; only the given flags change (`-- CMD ARGS` replaces the command).
    Update {
        name: String,
        #[command(flatten)]
        flags: ServerFlags,
        /// Only if the server is at this revision.
        #[arg(long)]
        if_revision: Option<u64>,
        #[arg(last = true)]
        command: Vec<String>,
    },
    Enable {
        name: String,
    },
    Disable {
        name: String,
    },
    #[command(alias = "remove", alias = "delete")]
    Rm {
        name: String,
        /// Only if the server is at this revision.
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// The server's tools now against the approved ones: changed and new tools are held back
    /// from clients until approved (exit status 3 when any is).
    Diff {
        name: String,
    },
    /// Approve the server's tools as the diff shows them now (all, or only --tool ones); from
    /// then on a tool that changes, or a new one, is held back until approved again.
    Approve {
        name: String,
        /// Approve only these tools (the others keep their approved version, or stay held).
        #[arg(long = "tool")]
        tools: Vec<String>,
    },
    /// Stop checking the server's tools against approved ones.
    Unpin {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCmd {
    Add {
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Its share of a busy shared server: up to this many calls per turn when several
        /// tenants' calls wait (1 to 100).
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    List,
    #[command(alias = "remove", alias = "delete")]
    Rm {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Mint a token; prints only the token on stdout (shown this once).
    Create {
        /// The tenant of a `user` or `tenant-admin` token.
        #[arg(long, conflicts_with = "admin")]
        tenant: Option<String>,
        /// A cluster-admin token (the same as `--role cluster-admin`).
        #[arg(long, conflicts_with = "role")]
        admin: bool,
        /// The token's role: `cluster-admin`, `tenant-admin` and `user` (with --tenant),
        /// `operator`, `viewer`, or `metrics` (reads /metrics only, for Prometheus). The
        /// older `admin` and `tenant` still work.
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
        /// A label for people.
        #[arg(long, default_value = "mcpctl")]
        name: String,
        /// Lifetime in seconds (default: never expires).
        #[arg(long)]
        ttl: Option<u64>,
        /// Narrow the token to a scope: `mcp`, `admin:read`, `admin:write` (repeat; default:
        /// every scope of its role).
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    List,
    /// Revoke a token by id (effective on every node at once).
    Revoke {
        id: String,
    },
}

fn parse_role(name: &str) -> Result<Role, String> {
    Role::parse(name).ok_or_else(|| {
        let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
        format!("one of {}", names.join(", "))
    })
}

#[derive(Debug, Subcommand)]
enum LimitCmd {
    /// Create or replace a limit: `mcpctl limit set free --tenant free --per subject --rate 10 --quota 1000/day --concurrency 4`.
    Set {
        name: String,
        /// Count only this tenant's calls.
        #[arg(long)]
        tenant: Option<String>,
        /// Count only this caller's calls (a token id, or jwt:ISSUER:SUBJECT).
        #[arg(long)]
        subject: Option<String>,
        /// Count only calls to this server.
        #[arg(long)]
        server: Option<String>,
        /// Count only calls of this tool (with --server).
        #[arg(long)]
        tool: Option<String>,
        /// Whose budget: all (one for every call it counts), tenant or subject.
        #[arg(long, value_enum, default_value_t = Per::All)]
        per: Per,
        /// Calls per second.
        #[arg(long)]
        rate: Option<u32>,
        /// Calls at once after a quiet spell (default: the rate).
        #[arg(long)]
        burst: Option<u32>,
        /// Calls per UTC day or month: `1000/day`, `50000/month`.
        #[arg(long, value_parser = parse_quota)]
        quota: Option<mcpcp_proto::api::Quota>,
        /// Calls running at once, in the whole cluster.
        #[arg(long)]
        concurrency: Option<u32>,
    },
    List,
    /// What a limit's quota used in the current period, per budget.
    Usage {
        name: String,
    },
    #[command(alias = "remove", alias = "delete")]
    Rm {
        name: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Per {
    All,
    Tenant,
    Subject,
}

fn parse_quota(s: &str) -> Result<mcpcp_proto::api::Quota, String> {
    use mcpcp_proto::api::QuotaPeriod;
    let (calls, period) = s.split_once('/').ok_or("CALLS/day or CALLS/month")?;
    let calls = calls
        .parse()
        .map_err(|_| format!("{calls:?} is not a number"))?;
    let period = match period {
        "day" => QuotaPeriod::Day,
        "month" => QuotaPeriod::Month,
        other => return Err(format!("{other:?}: day or month")),
    };
    Ok(mcpcp_proto::api::Quota { calls, period })
}

/// `; runs as nobody, memory 128 MiB, …` for `server status`.
fn sandbox_summary(s: &SandboxSpec) -> String {
    let parts: Vec<String> = [
        s.run_as.as_ref().map(|u| format!("runs as {u}")),
        s.memory_mb.map(|m| format!("memory {m} MiB")),
        s.cpu_seconds.map(|c| format!("CPU {c} s")),
        s.open_files.map(|n| format!("{n} open files")),
        s.processes.map(|n| format!("{n} processes")),
        s.private_network.then(|| "no network".to_string()),
        s.read_only.then(|| match s.writable_paths.as_slice() {
            [] => "read-only filesystem".to_string(),
            paths => format!("read-only filesystem but {}", paths.join(" ")),
        }),
        s.private_tmp.then(|| "private /tmp".to_string()),
        (!s.hidden_paths.is_empty()).then(|| format!("hides {}", s.hidden_paths.join(" "))),
    ]
    .into_iter()
    .flatten()
    .collect();
    format!("; {}", parts.join(", "))
}

async fn usage(cli: &Cli, since: &str, tenant: Option<&str>, server: Option<&str>) -> Outcome {
    let list = client(cli)?.usage(since, tenant, server).await?;
    if cli.output == Output::Json {
        print_json(&list.items);
        return Ok(());
    }
    let rows = list
        .items
        .iter()
        .map(|u| {
            vec![
                if u.tenant.is_empty() {
                    "-".into()
                } else {
                    u.tenant.clone()
                },
                u.subject.clone(),
                u.server.clone(),
                u.tool.clone(),
                u.calls.to_string(),
                u.errors.to_string(),
                format!("{:.1}", u.duration_ms as f64 / 1e3),
                u.bytes_in.to_string(),
                u.bytes_out.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "TENANT",
            "SUBJECT",
            "SERVER",
            "TOOL",
            "CALLS",
            "ERRORS",
            "TIME S",
            "BYTES IN",
            "BYTES OUT",
        ],
        rows,
    );
    Ok(())
}

async fn limit(cli: &Cli, cmd: &LimitCmd) -> Outcome {
    use mcpcp_proto::api::{LimitPer, LimitSpec, QuotaPeriod, RateLimit};
    let c = client(cli)?;
    match cmd {
        LimitCmd::Set {
            name,
            tenant,
            subject,
            server,
            tool,
            per,
            rate,
            burst,
            quota,
            concurrency,
        } => {
            let spec = LimitSpec {
                name: name.clone(),
                tenant: tenant.clone(),
                subject: subject.clone(),
                server: server.clone(),
                tool: tool.clone(),
                per: match per {
                    Per::All => LimitPer::All,
                    Per::Tenant => LimitPer::Tenant,
                    Per::Subject => LimitPer::Subject,
                },
                rate: rate.map(|r| RateLimit {
                    per_second: r,
                    burst: burst.unwrap_or(r),
                }),
                quota: *quota,
                concurrency: *concurrency,
            };
            let a = c.put_limit(&spec, &CallOptions::default()).await?;
            ack(cli, &format!("limit {name} set"), a.revision);
        }
        LimitCmd::List => {
            let list = c.limits().await?;
            if cli.output == Output::Json {
                print_json(&list.items);
            } else {
                let rows = list
                    .items
                    .iter()
                    .map(|v| {
                        let s = &v.spec;
                        let counts = [
                            s.tenant.as_ref().map(|t| format!("tenant={t}")),
                            s.subject.as_ref().map(|t| format!("subject={t}")),
                            s.server.as_ref().map(|t| format!("server={t}")),
                            s.tool.as_ref().map(|t| format!("tool={t}")),
                        ]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>();
                        vec![
                            s.name.clone(),
                            if counts.is_empty() {
                                "every call".into()
                            } else {
                                counts.join(" ")
                            },
                            format!("{:?}", s.per).to_lowercase(),
                            opt(s
                                .rate
                                .map(|r| format!("{}/s (burst {})", r.per_second, r.burst))),
                            opt(s.quota.map(|q| {
                                let p = match q.period {
                                    QuotaPeriod::Day => "day",
                                    QuotaPeriod::Month => "month",
                                };
                                format!("{}/{p}", q.calls)
                            })),
                            opt(s.concurrency.map(|c| c.to_string())),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "COUNTS", "PER", "RATE", "QUOTA", "AT ONCE"], rows);
            }
        }
        LimitCmd::Usage { name } => {
            let list = c.limit_usage(name).await?;
            if cli.output == Output::Json {
                print_json(&list.items);
            } else {
                let rows = list
                    .items
                    .iter()
                    .map(|u| {
                        vec![
                            if u.budget.is_empty() {
                                "(all)".into()
                            } else {
                                u.budget.clone()
                            },
                            u.period.clone(),
                            u.used.to_string(),
                            u.calls.to_string(),
                        ]
                    })
                    .collect();
                print_table(&["BUDGET", "PERIOD", "USED", "QUOTA"], rows);
            }
        }
        LimitCmd::Rm { name } => {
            let a = c.delete_limit(name, &CallOptions::default()).await?;
            ack(cli, &format!("limit {name} removed"), a.revision);
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum CommandCmd {
    /// Let tenant admins add local servers that run this: `mcpctl command approve time --env TZ -- uvx mcp-server-time`.
    Approve {
        name: String,
        /// Servers may add arguments after the approved ones.
        #[arg(long)]
        extra_args: bool,
        /// An environment variable a tenant's server may set (repeat).
        #[arg(long = "env")]
        env: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        /// The program and its leading arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    List,
    #[command(alias = "remove", alias = "delete")]
    Rm {
        name: String,
    },
}

async fn approved_command(cli: &Cli, cmd: &CommandCmd) -> Outcome {
    let c = client(cli)?;
    match cmd {
        CommandCmd::Approve {
            name,
            extra_args,
            env,
            description,
            command,
        } => {
            let spec = mcpcp_proto::api::ApprovedCommand {
                name: name.clone(),
                command: command[0].clone(),
                args: command[1..].to_vec(),
                extra_args: *extra_args,
                env: env.clone(),
                description: description.clone(),
            };
            let a = c
                .put_approved_command(&spec, &CallOptions::default())
                .await?;
            ack(
                cli,
                &format!("command {name} approved for tenants' servers"),
                a.revision,
            );
        }
        CommandCmd::List => {
            let list = c.approved_commands().await?;
            if cli.output == Output::Json {
                print_json(&list.items);
            } else {
                let rows = list
                    .items
                    .iter()
                    .map(|v| {
                        let s = &v.spec;
                        let mut run = std::iter::once(s.command.clone())
                            .chain(s.args.iter().cloned())
                            .collect::<Vec<_>>()
                            .join(" ");
                        if s.extra_args {
                            run.push_str(" …");
                        }
                        vec![
                            s.name.clone(),
                            run,
                            s.env.join(" "),
                            opt(s.description.clone()),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "RUNS", "ENV", "DESCRIPTION"], rows);
            }
        }
        CommandCmd::Rm { name } => {
            let a = c
                .delete_approved_command(name, &CallOptions::default())
                .await?;
            ack(
                cli,
                &format!("command {name} no longer approved"),
                a.revision,
            );
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum VserverCmd {
    /// Create or replace a virtual server: `mcpctl vserver set kit --tool files/read_text_file=read --tool time/get_current_time`.
    Set {
        name: String,
        /// SERVER/TOOL, or SERVER/TOOL=NAME to show it under another name (repeat).
        #[arg(long = "tool", required = true)]
        tools: Vec<String>,
        /// Only this tenant's callers may use it (default: every tenant's).
        #[arg(long)]
        tenant: Option<String>,
        /// Shown to clients as the server's instructions.
        #[arg(long)]
        description: Option<String>,
    },
    List,
    #[command(alias = "remove", alias = "delete")]
    Rm {
        name: String,
    },
}

/// `SERVER/TOOL[=NAME]`.
fn parse_virtual_tool(s: &str) -> Result<mcpcp_proto::api::VirtualTool, Failure> {
    let (path, name) = match s.split_once('=') {
        Some((p, n)) => (p, Some(n.to_string())),
        None => (s, None),
    };
    let (server, tool) = path.split_once('/').ok_or_else(|| {
        fail(
            2,
            format!("--tool {s:?}: expected SERVER/TOOL or SERVER/TOOL=NAME"),
        )
    })?;
    Ok(mcpcp_proto::api::VirtualTool {
        server: server.to_string(),
        tool: tool.to_string(),
        name,
    })
}

async fn vserver(cli: &Cli, cmd: &VserverCmd) -> Outcome {
    let c = client(cli)?;
    match cmd {
        VserverCmd::Set {
            name,
            tools,
            tenant,
            description,
        } => {
            let spec = mcpcp_proto::api::VirtualServerSpec {
                name: name.clone(),
                tenant: tenant.clone(),
                description: description.clone(),
                tools: tools
                    .iter()
                    .map(|t| parse_virtual_tool(t))
                    .collect::<Result<_, _>>()?,
            };
            let a = c.put_virtual_server(&spec, &CallOptions::default()).await?;
            ack(
                cli,
                &format!("virtual server {name} set: /v/{name}/mcp"),
                a.revision,
            );
        }
        VserverCmd::List => {
            let list = c.virtual_servers().await?;
            if cli.output == Output::Json {
                print_json(&list.items);
            } else {
                let rows = list
                    .items
                    .iter()
                    .map(|v| {
                        let tools: Vec<String> = v
                            .spec
                            .tools
                            .iter()
                            .map(|t| match &t.name {
                                Some(n) => format!("{}/{}={n}", t.server, t.tool),
                                None => format!("{}/{}", t.server, t.tool),
                            })
                            .collect();
                        vec![
                            v.spec.name.clone(),
                            opt(v.spec.tenant.clone()),
                            tools.join(" "),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "TENANT", "TOOLS"], rows);
            }
        }
        VserverCmd::Rm { name } => {
            let a = c
                .delete_virtual_server(name, &CallOptions::default())
                .await?;
            ack(cli, &format!("virtual server {name} removed"), a.revision);
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Add or replace a rule. Rules run in --order (then name); the first that matches
    /// decides; when none matches, a call is allowed.
    Add(Box<PolicyAdd>),
    List,
    #[command(alias = "remove", alias = "delete")]
    Rm {
        name: String,
    },
    /// Would this caller be allowed this call, and by which rule? Nothing is called.
    Test {
        #[arg(long, value_parser = parse_role, default_value = "user")]
        role: Role,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long = "group")]
        groups: Vec<String>,
        /// `tool:SERVER__TOOL`, `prompt:SERVER__PROMPT` or `resource:SERVER:URI`.
        #[arg(long)]
        target: String,
        /// The call's arguments, as JSON.
        #[arg(long, default_value = "{}")]
        args: String,
    },
}

#[derive(Debug, Args)]
struct PolicyAdd {
    name: String,
    /// Lower runs first.
    #[arg(long)]
    order: u32,
    /// Allow what matches.
    #[arg(long, conflicts_with = "deny", required_unless_present = "deny")]
    allow: bool,
    /// Deny what matches.
    #[arg(long)]
    deny: bool,
    /// What it covers (repeat): server:NAME, tool:SERVER__TOOL, prompt:SERVER__PROMPT,
    /// resource:URI, with `*` globs. None: every call.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Whose calls (each repeatable; none: anyone's).
    #[arg(long = "tenant")]
    tenants: Vec<String>,
    #[arg(long = "role", value_parser = parse_role)]
    roles: Vec<Role>,
    #[arg(long = "subject")]
    subjects: Vec<String>,
    #[arg(long = "group")]
    groups: Vec<String>,
    /// A CEL condition that must hold too, e.g. 'args.path.startsWith("/srv/" + principal.tenant)'.
    #[arg(long = "if")]
    condition: Option<String>,
    #[arg(long)]
    description: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Admin changes, oldest first.
    List {
        /// Events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Only this actor's: a token id, `jwt:ISSUER:SUBJECT`, or a JWT subject.
        #[arg(long)]
        actor: Option<String>,
        /// Only this kind: put_server, delete_server, create_token, revoke_token...
        #[arg(long)]
        kind: Option<String>,
    },
    /// Writes every event the cluster keeps to FILE, one JSON object per line.
    Export { file: PathBuf },
    /// Checks the hash chain, then each event's MAC with the cluster's key: of the cluster's
    /// events, or of an exported FILE. Exit 1 names the first event that was edited, removed,
    /// reordered, or written without the key.
    Verify {
        #[arg(long)]
        file: Option<PathBuf>,
        /// The head hash the chain must end at (kept apart from the file, e.g. from the
        /// output of `verify` when the file was exported): a file cut short is found by it.
        #[arg(long)]
        head: Option<String>,
        /// With --file: check the hash chain only, without asking the cluster (MACs are not
        /// checked: only the cluster holds their key).
        #[arg(long, requires = "file")]
        offline: bool,
        /// Accept events without a MAC before the first that has one (written before the
        /// chain was keyed, by an older release).
        #[arg(long)]
        allow_unkeyed: bool,
    },
    /// How many events the cluster keeps (older ones are dropped, the chain's head kept).
    Retention { events: u64 },
}

#[derive(Debug, Subcommand)]
enum IssuerCmd {
    /// Trust the JWT access tokens of an OpenID provider or OAuth authorization server.
    Add(Box<IssuerAdd>),
    List,
    #[command(alias = "remove", alias = "delete")]
    Rm {
        name: String,
    },
}

#[derive(Debug, Args)]
struct IssuerAdd {
    name: String,
    /// The `iss` its tokens carry (https; http only on loopback).
    #[arg(long)]
    issuer: String,
    /// An audience accepted besides the resource URL called (repeat for more).
    #[arg(long = "audience")]
    audiences: Vec<String>,
    /// Its JWKS URL (default: from its discovery document).
    #[arg(long)]
    jwks_url: Option<String>,
    /// A signature algorithm accepted (repeat; default RS256 and ES256).
    #[arg(long = "algorithm")]
    algorithms: Vec<String>,
    /// Seconds of clock skew tolerated on exp and nbf.
    #[arg(long, default_value_t = 60)]
    clock_skew: u64,
    /// Every caller of this issuer belongs to this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// The claim naming the caller's tenant (a cluster-wide issuer).
    #[arg(long, default_value = "tenant")]
    tenant_claim: String,
    /// The claim listing the caller's roles.
    #[arg(long, default_value = "roles")]
    roles_claim: String,
    /// The role of a caller whose token names none.
    #[arg(long, value_parser = parse_role, default_value = "user")]
    default_role: Role,
    /// The claim listing the caller's groups (for policies).
    #[arg(long, default_value = "groups")]
    groups_claim: String,
    /// Accept tokens whose typ is not at+jwt (Entra ID and Okta issue `JWT`).
    #[arg(long)]
    accept_untyped: bool,
    /// A CA file (PEM) for its discovery and JWKS endpoints.
    #[arg(long)]
    ca_file: Option<String>,
    /// The console's public OAuth client at this issuer (authorization code + PKCE; redirect
    /// URIs `https://NODE/ui/`): the console then offers to sign in with it.
    #[arg(long)]
    console_client_id: Option<String>,
}

#[derive(Debug, Subcommand)]
enum DevCmd {
    /// Start N local nodes, form a cluster, create tenant `default`, register `demo`.
    ///
    /// On a DIR whose cluster is stopped (after `dev down`), or has nodes stopped (killed,
    /// crashed), start those nodes again instead: same addresses, same data and tokens
    /// (DIR/env stays valid).
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
        /// The mcpd binary (default: next to mcpctl).
        #[arg(long, env = "MCPD_BIN")]
        mcpd: Option<PathBuf>,
        /// Do not register the demo server.
        #[arg(long)]
        no_demo: bool,
        /// An extra flag for every mcpd (repeatable), e.g. `--mcpd-arg=--pool-queue-size=4`.
        #[arg(long = "mcpd-arg", allow_hyphen_values = true)]
        mcpd_args: Vec<String>,
        /// The cluster CA's directory (ca.pem, ca.key; made there if missing). Default: DIR.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
    },
    /// Stop the nodes `dev up` started in DIR.
    Down {
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
    },
}

/// The command's outcome: an error with the exit code it maps to.
struct Failure {
    code: i32,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

impl From<dev::DevError> for Failure {
    fn from(e: dev::DevError) -> Self {
        let code = match &e {
            dev::DevError::Usage(_) => 2,
            dev::DevError::Api(c) => c.exit_code(),
            _ => 1,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

type Outcome = Result<(), Failure>;

fn print_json<T: Serialize>(v: &T) {
    out!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as an aligned table.
fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths[i]))
            .collect();
        out!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// A list as a table cell: its values, or `*` (anything) when empty.
fn any(v: &[String]) -> String {
    if v.is_empty() {
        "*".to_string()
    } else {
        v.join(",")
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn client(cli: &Cli) -> Result<AdminClient, Failure> {
    Ok(AdminClient::new(
        &cli.endpoints,
        cli.token.clone(),
        cli.cacert.as_deref(),
    )?)
}

fn ack(cli: &Cli, what: &str, revision: u64) {
    match cli.output {
        Output::Json => print_json(&serde_json::json!({ "revision": revision })),
        Output::Table => out!("{what} (revision {revision})"),
    }
}

async fn cluster(cli: &Cli, cmd: &ClusterCmd) -> Outcome {
    match cmd {
        ClusterCmd::Init { nodes } => {
            let nodes = if nodes.is_empty() {
                cli.endpoints.clone()
            } else {
                nodes.clone()
            };
            let anon = AdminClient::new(&nodes, None, cli.cacert.as_deref())?;
            let mut members = Vec::new();
            for e in anon.endpoints() {
                let info = anon.for_endpoint(e).node_info().await?;
                if info.initialized {
                    return Err(fail(
                        1,
                        format!("node {} ({e}) already belongs to a cluster", info.id),
                    ));
                }
                members.push(Member {
                    id: info.id,
                    http_addr: info.http_addr,
                    grpc_addr: info.grpc_addr,
                });
            }
            let resp = anon
                .for_endpoint(&anon.endpoints()[0])
                .init(members)
                .await?;
            match cli.output {
                Output::Json => print_json(&resp),
                Output::Table => {
                    eprintln!(
                        "cluster initialised: members {:?}, leader {}. The admin token below is shown once:",
                        resp.members, resp.leader
                    );
                    out!("{}", resp.admin_token);
                }
            }
            Ok(())
        }
        ClusterCmd::Status => {
            let c = client(cli)?;
            let mut status = c.cluster_status().await?;
            // Health and lag are known on the leader: ask it when we reached someone else.
            if let Some(leader) = status.leader.filter(|l| *l != status.node_id) {
                if let Some(m) = status.members.iter().find(|m| m.id == leader) {
                    if let Ok(s) = c.for_endpoint(&m.http_addr).cluster_status().await {
                        status = s;
                    }
                }
            }
            // What each node can enforce of a sandbox, asked of each (2 s at most).
            let mut asks = tokio::task::JoinSet::new();
            for m in &status.members {
                let (id, node) = (m.id, c.for_endpoint(&m.http_addr));
                asks.spawn(async move {
                    let info = tokio::time::timeout(Duration::from_secs(2), node.node_info()).await;
                    (id, info.ok().and_then(Result::ok).map(|i| i.sandbox))
                });
            }
            let mut sandboxes = BTreeMap::new();
            while let Some(asked) = asks.join_next().await {
                if let Ok((id, Some(caps))) = asked {
                    sandboxes.insert(id, caps);
                }
            }
            print_status(cli, &status, &sandboxes);
            Ok(())
        }
        ClusterCmd::AddNode {
            id,
            http,
            grpc,
            learner,
        } => {
            let c = client(cli)?;
            let m = c
                .add_node(&AddNodeRequest {
                    id: *id,
                    http_addr: http.clone(),
                    grpc_addr: grpc.clone(),
                    voter: !learner,
                })
                .await?;
            match cli.output {
                Output::Json => print_json(&m),
                Output::Table => out!(
                    "node {} added as {}",
                    m.id,
                    if *learner { "learner" } else { "voter" }
                ),
            }
            Ok(())
        }
        ClusterCmd::Promote { force_new_cluster } => {
            if !force_new_cluster {
                return Err(fail(
                    2,
                    "only `--force-new-cluster` exists: a learner of a healthy cluster becomes a voter with `mcpctl cluster add-node`",
                ));
            }
            if cli.endpoints.len() != 1 {
                return Err(fail(
                    2,
                    "name exactly the node to promote with --endpoints (one endpoint)",
                ));
            }
            let c = client(cli)?;
            let promoted = c.promote_force_new_cluster().await?;
            let node = promoted.node;
            // It restarts in place; it is done once it leads a cluster of itself.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(s) = c.cluster_status().await {
                    if s.leader == Some(node) && s.members.iter().all(|m| m.id == node) {
                        break;
                    }
                }
                if std::time::Instant::now() > deadline {
                    return Err(fail(
                        1,
                        format!(
                            "node {node} did not lead its new cluster within 60 s: see its log"
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            match cli.output {
                Output::Json => print_json(&promoted),
                Output::Table => out!(
                    "node {node} leads a new cluster of itself at revision {}; add members with `mcpctl cluster add-node`",
                    promoted.revision
                ),
            }
            Ok(())
        }
        ClusterCmd::RemoveNode { id } => {
            client(cli)?.remove_node(*id).await?;
            if cli.output == Output::Table {
                out!("node {id} removed");
            }
            Ok(())
        }
        ClusterCmd::JoinToken { id, ttl } => {
            let c = client(cli)?;
            let created = c.create_join_token(*id, Some(*ttl)).await?;
            match cli.output {
                Output::Json => print_json(&created),
                Output::Table => {
                    let token = created["token"].as_str().unwrap_or_default();
                    eprintln!(
                        "join token for node {id}, valid {ttl} s, usable once. Start the node with an empty TLS directory:\n  \
                         MCPD_JOIN_TOKEN=<the token> mcpd --id {id} --data-dir ... --join {} ...\n\
                         then make it a member: mcpctl cluster add-node --id {id} --http HOST:PORT --grpc HOST:PORT",
                        c.endpoints()[0]
                    );
                    out!("{token}");
                }
            }
            Ok(())
        }
        ClusterCmd::RotateCerts => {
            let c = client(cli)?;
            let status = c.cluster_status().await?;
            let mut rotated = Vec::new();
            for m in &status.members {
                let answer = c.for_endpoint(&m.http_addr).rotate_certs().await?;
                rotated.push(answer);
            }
            match cli.output {
                Output::Json => print_json(&rotated),
                Output::Table => {
                    for r in &rotated {
                        out!(
                            "node {}: new certificates (peer until {}, HTTPS until {})",
                            r["node"],
                            r["peer_not_after"],
                            r["edge_not_after"]
                        );
                    }
                }
            }
            Ok(())
        }
        ClusterCmd::Ca(CaCmd::Create { dir, cluster_id }) => {
            use mcpcp_pki::ca::{CA_CERT, CA_KEY};
            if dir.join(CA_KEY).exists() {
                return Err(fail(
                    1,
                    format!(
                        "{} already holds a CA key; a cluster's CA is made once",
                        dir.display()
                    ),
                ));
            }
            let id = mcpcp_pki::ClusterId::new(cluster_id).map_err(|e| fail(2, e.to_string()))?;
            let ca = mcpcp_pki::Ca::create(&id).map_err(|e| fail(1, e.to_string()))?;
            ca.write(dir).map_err(|e| fail(1, e.to_string()))?;
            mcpcp_pki::datakey::write_new(dir).map_err(|e| fail(1, e.to_string()))?;
            match cli.output {
                Output::Json => print_json(&serde_json::json!({
                    "cluster_id": id.as_str(),
                    "ca_cert": dir.join(CA_CERT),
                    "ca_key": dir.join(CA_KEY),
                    "data_key": dir.join(mcpcp_pki::datakey::DATA_KEY),
                    "fingerprint": ca.fingerprint(),
                })),
                Output::Table => {
                    out!("cluster CA for {id}: {}", ca.fingerprint());
                    out!(
                        "  {}  the certificate clients trust (--cacert)",
                        dir.join(CA_CERT).display()
                    );
                    out!("  {}  the key (0600)", dir.join(CA_KEY).display());
                    out!(
                        "  {}  the data key that seals secrets (0600)",
                        dir.join(mcpcp_pki::datakey::DATA_KEY).display()
                    );
                    out!("copy all three into every initial node's TLS directory");
                }
            }
            Ok(())
        }
    }
}

fn print_status(cli: &Cli, s: &ClusterStatus, sandboxes: &BTreeMap<u64, SandboxCapabilities>) {
    if cli.output == Output::Json {
        let mut v = serde_json::to_value(s).unwrap_or_default();
        v["sandbox"] = serde_json::json!(sandboxes
            .iter()
            .map(|(id, caps)| (id.to_string(), caps))
            .collect::<BTreeMap<_, _>>());
        return print_json(&v);
    }
    out!(
        "leader: {}   term: {}   revision: {}   answered by: node {} ({})",
        opt(s.leader),
        s.term,
        s.revision,
        s.node_id,
        s.state
    );
    out!(
        "last log: {}   committed: {}   applied: {}   snapshot: {}   purged: {}",
        opt(s.last_log_index),
        opt(s.committed_index),
        opt(s.applied_index),
        opt(s.snapshot_index),
        opt(s.purged_index)
    );
    let rows = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                if Some(m.id) == s.leader {
                    "leader".into()
                } else if m.voter {
                    "voter".into()
                } else {
                    "learner".into()
                },
                m.http_addr.clone(),
                m.grpc_addr.clone(),
                opt(m.matched_index),
                opt(m.applied_index),
                opt(m.lag),
                m.health.clone(),
                sandboxes.get(&m.id).map_or("?".into(), can_enforce),
            ]
        })
        .collect();
    print_table(
        &[
            "ID", "ROLE", "HTTP", "GRPC", "MATCHED", "APPLIED", "LAG", "HEALTH", "SANDBOX",
        ],
        rows,
    );
}

/// `run_as,rlimits,namespaces`: what a node can enforce of a server's sandbox.
fn can_enforce(caps: &SandboxCapabilities) -> String {
    let named = [
        (caps.run_as, "run_as"),
        (caps.rlimits, "rlimits"),
        (caps.cgroup_v2, "cgroup_v2"),
        (caps.namespaces, "namespaces"),
    ];
    let can: Vec<&str> = named
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
    if can.is_empty() {
        "-".into()
    } else {
        can.join(",")
    }
}

fn apply_flags(spec: &mut ServerSpec, f: &ServerFlags) -> Result<(), Failure> {
    if let Some(t) = &f.tenant {
        spec.tenant = Some(t.clone());
    }
    if let Some(p) = f.pool_size {
        spec.pool_size = p;
    }
    if let Some(r) = f.replicas {
        spec.replicas = Some(r);
    }
    if !f.fallbacks.is_empty() {
        spec.fallbacks = f.fallbacks.clone();
    }
    if !f.env.is_empty() {
        spec.env.extend(f.env.iter().cloned());
    }
    if !f.idempotent_tools.is_empty() {
        spec.idempotent_tools = f.idempotent_tools.clone();
    }
    if let Some(c) = &f.cwd {
        spec.cwd = Some(c.clone());
    }
    if let Some(m) = f.session_mode {
        spec.session_mode = m.into();
    }
    if let Some(t) = f.request_timeout_ms {
        spec.timeouts.request_ms = t;
    }
    if let Some(s) = f.sandbox() {
        spec.sandbox = Some(s);
    }
    if let Some(o) = f.oauth()? {
        spec.oauth = Some(Box::new(o));
    }
    if let Some(ca) = &f.ca_file {
        spec.ca_file = Some(ca.clone());
    }
    spec.headers.extend(f.headers()?);
    Ok(())
}

fn patch_from_flags(f: &ServerFlags, command: &[String]) -> Result<ServerPatch, Failure> {
    if f.tenant.is_some() {
        return Err(fail(
            2,
            "--tenant cannot be changed; remove and add the server again",
        ));
    }
    let mut p = ServerPatch {
        pool_size: f.pool_size,
        replicas: f.replicas,
        cwd: f.cwd.clone(),
        session_mode: f.session_mode.map(Into::into),
        sandbox: f.sandbox(),
        oauth: f.oauth()?,
        ca_file: f.ca_file.clone(),
        ..Default::default()
    };
    if !f.fallbacks.is_empty() {
        p.fallbacks = Some(f.fallbacks.clone());
    }
    if !f.env.is_empty() {
        p.env = Some(f.env.iter().cloned().collect::<BTreeMap<_, _>>());
    }
    if !f.idempotent_tools.is_empty() {
        p.idempotent_tools = Some(f.idempotent_tools.clone());
    }
    if let Some(t) = f.request_timeout_ms {
        p.timeouts = Some(Timeouts {
            request_ms: t,
            ..Default::default()
        });
    }
    if let Some((cmd, args)) = command.split_first() {
        p.command = Some(cmd.clone());
        p.args = Some(args.to_vec());
    }
    p.url = f.url.clone();
    let headers = f.headers()?;
    if !headers.is_empty() {
        p.headers = Some(headers);
    }
    Ok(p)
}

fn print_servers(cli: &Cli, items: &[Versioned<ServerSpec>]) {
    if cli.output == Output::Json {
        return print_json(&items);
    }
    let rows = items
        .iter()
        .map(|s| {
            let sp = &s.spec;
            vec![
                sp.name.clone(),
                opt(sp.tenant.clone()),
                if sp.enabled {
                    "yes".into()
                } else {
                    "no".into()
                },
                sp.pool_size.to_string(),
                sp.replicas
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "all".into()),
                s.revision.to_string(),
                match &sp.url {
                    Some(url) => url.clone(),
                    None => std::iter::once(sp.command.clone())
                        .chain(sp.args.iter().cloned())
                        .collect::<Vec<_>>()
                        .join(" "),
                },
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "TENANT",
            "ENABLED",
            "POOL",
            "REPLICAS",
            "REVISION",
            "COMMAND/URL",
        ],
        rows,
    );
}

async fn server(cli: &Cli, cmd: &ServerCmd) -> Outcome {
    let c = client(cli)?;
    let none = CallOptions::default();
    match cmd {
        ServerCmd::Add {
            name,
            flags,
            disabled,
            command,
        } => {
            let mut spec: ServerSpec = match (command.split_first(), &flags.url) {
                (Some(_), Some(_)) => {
                    return Err(fail(
                        2,
                        "give either --url or a command after `--`, not both",
                    ))
                }
                (None, None) => {
                    return Err(fail(
                        2,
                        "give the server's command after `--`, or --url for a remote server",
                    ))
                }
                (Some((cmd0, args)), None) => serde_json::from_value(serde_json::json!({
                    "name": name, "command": cmd0, "args": args,
                })),
                (None, Some(url)) => serde_json::from_value(serde_json::json!({
                    "name": name, "url": url,
                })),
            }
            .map_err(|e| fail(1, e.to_string()))?;
            spec.enabled = !disabled;
            apply_flags(&mut spec, flags)?;
            let a = c.create_server(&spec, &none).await?;
            ack(cli, &format!("server {name} added"), a.revision);
        }
        ServerCmd::List => {
            let list = c.list_servers(cli.stale).await?;
            print_servers(cli, &list.items);
        }
        ServerCmd::Get { name } => {
            let s = c.get_server(name, cli.stale).await?;
            match cli.output {
                Output::Json => print_json(&s),
                Output::Table => {
                    print_servers(cli, std::slice::from_ref(&s));
                    out!();
                    out!(
                        "{}",
                        serde_json::to_string_pretty(&s.spec).unwrap_or_default()
                    );
                }
            }
        }
        ServerCmd::Status { name } => {
            let st = c.server_status(name).await?;
            match cli.output {
                Output::Json => print_json(&st),
                Output::Table => {
                    out!(
                        "server {} (revision {}, {})",
                        st.name,
                        st.revision,
                        if st.enabled { "enabled" } else { "disabled" }
                    );
                    out!("placement: {:?}", st.placement);
                    // The limits each process and call run under.
                    if let Ok(v) = c.get_server(name, cli.stale).await {
                        let spec = &v.spec;
                        out!(
                            "limits: each call {} ms (past it the call is cancelled; the process lives on){}",
                            spec.timeouts.request_ms,
                            spec.sandbox
                                .as_ref()
                                .map(sandbox_summary)
                                .unwrap_or_default()
                        );
                    }
                    let rows = st
                        .replicas
                        .iter()
                        .map(|r| {
                            vec![
                                r.node.to_string(),
                                if r.reachable {
                                    "yes".into()
                                } else {
                                    "no".into()
                                },
                                if r.processes.is_empty() {
                                    "-".into()
                                } else {
                                    r.processes.join(",")
                                },
                                opt(r.queue_depth),
                            ]
                        })
                        .collect();
                    print_table(&["NODE", "REACHABLE", "PROCESSES", "QUEUE"], rows);
                    if !st.breakers.is_empty() {
                        out!();
                        let rows = st
                            .breakers
                            .iter()
                            .map(|b| {
                                vec![
                                    b["node"].to_string(),
                                    b["state"].as_str().unwrap_or("-").to_string(),
                                    b["calls"].to_string(),
                                    b["failures"].to_string(),
                                    b["retry_after_ms"]
                                        .as_u64()
                                        .map(|v| v.to_string())
                                        .unwrap_or_else(|| "-".into()),
                                ]
                            })
                            .collect();
                        print_table(
                            &[
                                "BREAKER NODE",
                                "STATE",
                                "CALLS",
                                "FAILURES",
                                "RETRY_AFTER_MS",
                            ],
                            rows,
                        );
                    }
                    // Why a process is failing, where the operator looks: each slot's last
                    // failure, how its last process ended, and its last stderr lines.
                    for r in &st.replicas {
                        for (slot, p) in r.details.iter().enumerate() {
                            if p.last_error.is_none() && p.last_exit.is_none() {
                                continue;
                            }
                            out!();
                            let transport = match (p.transport.as_deref(), &p.protocol) {
                                (Some(t), Some(v)) if t != "stdio" => format!(", {t} {v}"),
                                (Some(t), None) if t != "stdio" => format!(", {t}"),
                                _ => String::new(),
                            };
                            out!(
                                "node {} process {slot} ({}{transport}, {} restarts):",
                                r.node,
                                p.state,
                                p.restarts
                            );
                            if let Some(e) = &p.last_error {
                                out!("  last error: {e}");
                            }
                            if let Some(x) = &p.last_exit {
                                out!("  last exit: {x}");
                            }
                            for line in p.stderr.iter().rev().take(5).rev() {
                                out!("  stderr: {line}");
                            }
                        }
                    }
                }
            }
        }
        ServerCmd::Update {
            name,
            flags,
            if_revision,
            command,
        } => {
            let patch = patch_from_flags(flags, command)?;
            let opts = CallOptions {
                if_match: *if_revision,
                ..Default::default()
            };
            let a = c.patch_server(name, &patch, &opts).await?;
            ack(cli, &format!("server {name} updated"), a.revision);
        }
        ServerCmd::Enable { name } | ServerCmd::Disable { name } => {
            let enabled = matches!(cmd, ServerCmd::Enable { .. });
            let patch = ServerPatch {
                enabled: Some(enabled),
                ..Default::default()
            };
            let a = c.patch_server(name, &patch, &none).await?;
            ack(
                cli,
                &format!(
                    "server {name} {}",
                    if enabled { "enabled" } else { "disabled" }
                ),
                a.revision,
            );
        }
        ServerCmd::Rm { name, if_revision } => {
            let opts = CallOptions {
                if_match: *if_revision,
                ..Default::default()
            };
            let a = c.delete_server(name, &opts).await?;
            ack(cli, &format!("server {name} removed"), a.revision);
        }
        ServerCmd::Diff { name } => {
            let d = c.tool_diff(name).await?;
            match cli.output {
                Output::Json => print_json(&d),
                Output::Table => print_diff(&d),
            }
            if d.tools
                .iter()
                .any(|t| matches!(t.status.as_str(), "changed" | "new"))
            {
                return Err(fail(
                    3,
                    format!(
                        "{name}: tools are held back until approved (mcpctl server approve {name})"
                    ),
                ));
            }
        }
        ServerCmd::Approve { name, tools } => {
            let d = c.tool_diff(name).await?;
            if !d.loaded {
                return Err(fail(
                    1,
                    format!("{name} has not listed its tools yet (no process was ready): nothing to approve"),
                ));
            }
            let pins = approved_set(&d, tools)?;
            let opts = CallOptions {
                if_match: d.revision,
                ..Default::default()
            };
            let n = pins.tools.len();
            let a = c.put_tool_pins(name, &pins, &opts).await?;
            ack(
                cli,
                &format!("server {name}: {n} tools approved"),
                a.revision,
            );
        }
        ServerCmd::Unpin { name } => {
            let a = c.delete_tool_pins(name, &CallOptions::default()).await?;
            ack(
                cli,
                &format!("server {name}: tools no longer checked"),
                a.revision,
            );
        }
    }
    Ok(())
}

/// The pins after approving `only` (every current tool when empty) of what the diff shows:
/// the tools approved are their current definitions; the others keep their approved one.
fn approved_set(d: &ToolDiff, only: &[String]) -> Result<ToolPins, Failure> {
    if let Some(unknown) = only
        .iter()
        .find(|t| !d.tools.iter().any(|c| &c.name == *t && c.current.is_some()))
    {
        return Err(fail(
            2,
            format!("{}: no current tool {unknown:?}", d.server),
        ));
    }
    let mut pins = ToolPins::default();
    for t in &d.tools {
        let take = only.is_empty() || only.contains(&t.name);
        let def = if take {
            t.current.as_ref()
        } else {
            t.approved.as_ref().filter(|_| t.current.is_some())
        };
        if let Some(def) = def {
            pins.tools.insert(t.name.clone(), def.clone());
        }
    }
    Ok(pins)
}

/// One line per tool that is not as approved, with what changed in its description.
fn print_diff(d: &ToolDiff) {
    if !d.pinned {
        out!(
            "{}: tools not pinned (every tool passes); `mcpctl server approve {}` pins them",
            d.server,
            d.server
        );
    }
    let rows = d
        .tools
        .iter()
        .map(|t| {
            let text = |v: &Option<serde_json::Value>| {
                v.as_ref()
                    .and_then(|v| v["description"].as_str())
                    .unwrap_or("-")
                    .to_string()
            };
            let what = match t.status.as_str() {
                "changed" => {
                    let (a, b) = (t.approved.as_ref(), t.current.as_ref());
                    let schema = a.map(|a| &a["inputSchema"]) != b.map(|b| &b["inputSchema"]);
                    let desc = text(&t.approved) != text(&t.current);
                    match (desc, schema) {
                        (true, true) => format!(
                            "description: {:?} → {:?}; input schema changed",
                            text(&t.approved),
                            text(&t.current)
                        ),
                        (true, false) => format!(
                            "description: {:?} → {:?}",
                            text(&t.approved),
                            text(&t.current)
                        ),
                        (false, true) => "input schema changed".to_string(),
                        (false, false) => "title, output schema or annotations changed".to_string(),
                    }
                }
                "new" => format!("not approved: {:?}", text(&t.current)),
                "removed" => "no longer offered".to_string(),
                _ => String::new(),
            };
            vec![t.name.clone(), t.status.clone(), what]
        })
        .collect();
    print_table(&["TOOL", "STATUS", "WHAT CHANGED"], rows);
}

async fn tenant(cli: &Cli, cmd: &TenantCmd) -> Outcome {
    let c = client(cli)?;
    let none = CallOptions::default();
    match cmd {
        TenantCmd::Add {
            name,
            description,
            weight,
        } => {
            let a = c
                .create_tenant(
                    &TenantSpec {
                        name: name.clone(),
                        description: description.clone(),
                        weight: *weight,
                    },
                    &none,
                )
                .await?;
            ack(cli, &format!("tenant {name} added"), a.revision);
        }
        TenantCmd::List => {
            let list = c.list_tenants(cli.stale).await?;
            if cli.output == Output::Json {
                print_json(&list.items);
            } else {
                let rows = list
                    .items
                    .iter()
                    .map(|t| {
                        vec![
                            t.spec.name.clone(),
                            t.revision.to_string(),
                            t.spec.weight.to_string(),
                            opt(t.spec.description.clone()),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "REVISION", "WEIGHT", "DESCRIPTION"], rows);
            }
        }
        TenantCmd::Rm { name } => {
            let a = c.delete_tenant(name, &none).await?;
            ack(cli, &format!("tenant {name} removed"), a.revision);
        }
    }
    Ok(())
}

async fn policy(cli: &Cli, cmd: &PolicyCmd) -> Outcome {
    let c = client(cli)?;
    let none = CallOptions::default();
    match cmd {
        PolicyCmd::Add(add) => {
            let spec = PolicySpec {
                name: add.name.clone(),
                order: add.order,
                effect: if add.deny {
                    Effect::Deny
                } else {
                    Effect::Allow
                },
                targets: add.targets.clone(),
                tenants: add.tenants.clone(),
                roles: add.roles.clone(),
                subjects: add.subjects.clone(),
                groups: add.groups.clone(),
                condition: add.condition.clone(),
                description: add.description.clone(),
            };
            let a = c.put_policy(&spec, &none).await?;
            ack(cli, &format!("policy {} set", add.name), a.revision);
        }
        PolicyCmd::List => {
            let list = c.list_policies(cli.stale).await?;
            if cli.output == Output::Json {
                print_json(&list.items);
            } else {
                let rows = list
                    .items
                    .iter()
                    .map(|p| {
                        let s = &p.spec;
                        let roles: Vec<String> = s.roles.iter().map(|r| r.to_string()).collect();
                        vec![
                            s.order.to_string(),
                            s.name.clone(),
                            s.effect.as_str().to_string(),
                            any(&s.targets),
                            any(&s.tenants),
                            any(&roles),
                            any(&s.subjects),
                            any(&s.groups),
                            opt(s.condition.clone()),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ORDER", "NAME", "EFFECT", "TARGETS", "TENANTS", "ROLES", "SUBJECTS",
                        "GROUPS", "IF",
                    ],
                    rows,
                );
            }
        }
        PolicyCmd::Rm { name } => {
            let a = c.delete_policy(name, &none).await?;
            ack(cli, &format!("policy {name} removed"), a.revision);
        }
        PolicyCmd::Test {
            role,
            tenant,
            subject,
            groups,
            target,
            args,
        } => {
            let args: serde_json::Value = serde_json::from_str(args)
                .map_err(|e| fail(2, format!("--args: not JSON: {e}")))?;
            let verdict = c
                .test_policy(&PolicyTest {
                    role: *role,
                    tenant: tenant.clone(),
                    subject: subject.clone(),
                    groups: groups.clone(),
                    target: target.clone(),
                    args,
                })
                .await?;
            match cli.output {
                Output::Json => print_json(&verdict),
                Output::Table => match (&verdict.allowed, &verdict.rule) {
                    (true, Some(r)) => out!("allowed by policy {r}"),
                    (true, None) => out!("allowed: no policy matches"),
                    (false, r) => out!("denied by policy {}", r.as_deref().unwrap_or("?")),
                },
            }
        }
    }
    Ok(())
}

impl From<mcpctl::snapshot::SnapshotCmdError> for Failure {
    fn from(e: mcpctl::snapshot::SnapshotCmdError) -> Self {
        fail(e.exit_code(), e.to_string())
    }
}

async fn snapshot(cli: &Cli, cmd: &SnapshotCmd) -> Outcome {
    use mcpctl::snapshot as snap;
    let header = match cmd {
        SnapshotCmd::Save { file } => {
            // A large registry takes longer than one API call's usual bound.
            let c = AdminClient::with_timeout(
                &cli.endpoints,
                cli.token.clone(),
                cli.cacert.as_deref(),
                Duration::from_secs(600),
            )?;
            let mut progress = Progress::new();
            let saved = snap::save(&c, file, &mut |got, total| progress.show(got, total)).await;
            progress.finish();
            let saved = saved?;
            if cli.output == Output::Table {
                out!(
                    "saved {} ({} bytes) from {}",
                    file.display(),
                    saved.bytes,
                    saved.from
                );
            }
            saved.header
        }
        SnapshotCmd::Status { file } => snap::check(file)?,
        SnapshotCmd::Restore {
            file,
            data_dir,
            id,
            members,
            allow_unkeyed_audit,
        } => {
            let plan = mcpcp_proto::snapshot::RestorePlan {
                node: *id,
                members: members.clone(),
                force_new_cluster: false,
                allow_unkeyed_audit: *allow_unkeyed_audit,
            };
            let header = snap::restore(&snap::Restore {
                file,
                data_dir,
                plan,
            })?;
            if cli.output == Output::Table {
                let list: Vec<String> = members
                    .iter()
                    .map(mcpcp_proto::snapshot::member_arg)
                    .collect();
                out!(
                    "restored node {id}'s data directory {}: start mcpd --id {id} --data-dir {} with the CA and the old cluster's data.key in its TLS directory",
                    data_dir.display(),
                    data_dir.display()
                );
                out!("members (the same on every member): {}", list.join(" "));
            }
            header
        }
    };
    match cli.output {
        Output::Json => print_json(&header),
        Output::Table => print_table(
            &[
                "CLUSTER", "REVISION", "INDEX", "TERM", "NODE", "TAKEN", "BYTES", "SHA256",
            ],
            vec![vec![
                header.cluster.clone(),
                header.revision.to_string(),
                header.last_log_index.to_string(),
                header.last_log_term.to_string(),
                format!(
                    "{}{}",
                    header.node,
                    if header.leader { " (leader)" } else { "" }
                ),
                header.taken_at.to_string(),
                header.data_bytes.to_string(),
                header.sha256.clone(),
            ]],
        ),
    }
    Ok(())
}

/// Progress of a download on a terminal (stderr), at most ten updates a second; nothing
/// when stderr is not a terminal.
struct Progress {
    on: bool,
    last: Option<std::time::Instant>,
}

impl Progress {
    fn new() -> Progress {
        use std::io::IsTerminal;
        Progress {
            on: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn show(&mut self, received: u64, total: Option<u64>) {
        let due = self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
        if !self.on || !(due || total == Some(received)) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        match total {
            Some(t) if t > 0 => eprint!(
                "\r{:.1} / {:.1} MiB ({:.0}%)",
                mib(received),
                mib(t),
                100.0 * received as f64 / t as f64
            ),
            _ => eprint!("\r{:.1} MiB", mib(received)),
        }
    }

    /// Ends the line, if one was shown.
    fn finish(&self) {
        if self.on && self.last.is_some() {
            eprintln!();
        }
    }
}

/// The events of an exported audit FILE (one JSON object per line).
fn read_audit_file(f: &Path) -> Result<Vec<mcpcp_proto::audit::AuditEvent>, Failure> {
    let text =
        std::fs::read_to_string(f).map_err(|e| fail(1, format!("reading {}: {e}", f.display())))?;
    let mut events = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let e = serde_json::from_str(line).map_err(|e| {
            fail(
                1,
                format!("{} line {}: not an audit event: {e}", f.display(), i + 1),
            )
        })?;
        events.push(e);
    }
    Ok(events)
}

/// Events per request when a file's MACs are sent to the cluster: well under the admin API's
/// 1 MiB default body for events of a few KiB.
const MAC_CHECK_BATCH: usize = 200;

/// Has the cluster check MACs with its key: of `events` (a file's, in batches, each after
/// the ones before), or of its own copy of the trail.
async fn check_macs(
    c: &AdminClient,
    events: Option<&[mcpcp_proto::audit::AuditEvent]>,
    allow_unkeyed: bool,
) -> Result<mcpcp_proto::audit::MacReport, Failure> {
    use mcpcp_proto::audit::{AuditVerify, MacReport};
    let batches: Vec<Option<Vec<_>>> = match events {
        None => vec![None],
        Some(events) => events
            .chunks(MAC_CHECK_BATCH)
            .map(|b| Some(b.to_vec()))
            .collect(),
    };
    let mut total = MacReport::default();
    for batch in batches {
        let verdict = c
            .verify_audit(&AuditVerify {
                events: batch,
                allow_unkeyed,
                after_keyed: total.keyed > 0,
            })
            .await
            .map_err(|e| match e {
                // A node of a release before the trail was keyed.
                ClientError::Api { status: 404, .. } => fail(
                    1,
                    "the node cannot check MACs (a release before the audit trail was keyed): upgrade it, or check the hash chain alone with --file and --offline",
                ),
                other => other.into(),
            })?;
        if let Some(broken) = verdict.broken {
            return Err(fail(1, format!("audit chain broken: {broken}")));
        }
        total.keyed += verdict.macs.keyed;
        total.unkeyed += verdict.macs.unkeyed;
    }
    Ok(total)
}

async fn audit(cli: &Cli, cmd: &AuditCmd) -> Outcome {
    use mcpcp_proto::audit::verify;
    let c = client(cli)?;
    match cmd {
        AuditCmd::List { since, actor, kind } => {
            let page = c
                .audit_page(*since, actor.as_deref(), kind.as_deref())
                .await?;
            if cli.output == Output::Json {
                print_json(&page.items);
            } else {
                let rows = page
                    .items
                    .iter()
                    .map(|e| {
                        vec![
                            e.seq.to_string(),
                            e.at.to_string(),
                            e.actor
                                .subject
                                .clone()
                                .unwrap_or_else(|| e.actor.token_id.clone()),
                            opt(e.from.clone()),
                            e.kind.clone(),
                            opt(e.object.clone()),
                            e.revision.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &["SEQ", "AT", "ACTOR", "FROM", "KIND", "OBJECT", "REVISION"],
                    rows,
                );
            }
        }
        AuditCmd::Export { file } => {
            let (events, _, _) = c.audit_all().await?;
            let mut text = String::new();
            for e in &events {
                text.push_str(&serde_json::to_string(e).unwrap_or_default());
                text.push('\n');
            }
            std::fs::write(file, text)
                .map_err(|e| fail(1, format!("writing {}: {e}", file.display())))?;
            out!("{} events written to {}", events.len(), file.display());
        }
        AuditCmd::Verify {
            file,
            head: anchor,
            offline,
            allow_unkeyed,
        } => {
            let (events, head) = match file {
                Some(f) => (read_audit_file(f)?, None),
                None => {
                    let (events, head, first_kept) = c.audit_all().await?;
                    if events.first().is_some_and(|e| e.seq != first_kept) {
                        return Err(fail(
                            1,
                            format!("audit chain broken: it starts at event {first_kept}, but event {first_kept} was not served"),
                        ));
                    }
                    (events, Some(head))
                }
            };
            let head = anchor.clone().or(head);
            verify(&events).map_err(|e| fail(1, format!("audit chain broken: {e}")))?;
            if let (Some(head), Some(last)) = (head, events.last()) {
                if last.hash != head {
                    return Err(fail(
                        1,
                        "audit chain broken: it does not end at the expected head (cut short or rewritten)",
                    ));
                }
            }
            let keyed = if *offline {
                "MACs not checked (--offline)".to_string()
            } else {
                let macs =
                    check_macs(&c, file.is_some().then_some(&events[..]), *allow_unkeyed).await?;
                match macs.unkeyed {
                    0 => format!("{} keyed by the cluster", macs.keyed),
                    n => format!(
                        "{} keyed by the cluster, {n} before them unkeyed",
                        macs.keyed
                    ),
                }
            };
            match (events.first(), events.last()) {
                (Some(first), Some(last)) => out!(
                    "audit chain verified: events {} to {}, head {}; {keyed}",
                    first.seq,
                    last.seq,
                    last.hash
                ),
                _ => out!("audit chain verified: no events"),
            }
        }
        AuditCmd::Retention { events } => {
            let a = c
                .set_audit_retention(*events, &CallOptions::default())
                .await?;
            ack(
                cli,
                &format!("the cluster keeps {events} audit events"),
                a.revision,
            );
        }
    }
    Ok(())
}

async fn issuer(cli: &Cli, cmd: &IssuerCmd) -> Outcome {
    let c = client(cli)?;
    let none = CallOptions::default();
    match cmd {
        IssuerCmd::Add(add) => {
            let IssuerAdd {
                name,
                issuer,
                audiences,
                jwks_url,
                algorithms,
                clock_skew,
                tenant,
                tenant_claim,
                roles_claim,
                default_role,
                groups_claim,
                accept_untyped,
                ca_file,
                console_client_id,
            } = add.as_ref();
            let spec = IssuerSpec {
                name: name.clone(),
                issuer: issuer.clone(),
                audiences: audiences.clone(),
                jwks_url: jwks_url.clone(),
                algorithms: if algorithms.is_empty() {
                    vec!["RS256".into(), "ES256".into()]
                } else {
                    algorithms.clone()
                },
                clock_skew_s: *clock_skew,
                tenant: tenant.clone(),
                tenant_claim: tenant_claim.clone(),
                roles_claim: roles_claim.clone(),
                default_role: *default_role,
                groups_claim: groups_claim.clone(),
                accept_untyped: *accept_untyped,
                ca_file: ca_file.clone(),
                console_client_id: console_client_id.clone(),
            };
            let a = c.create_issuer(&spec, &none).await?;
            ack(cli, &format!("issuer {name} added"), a.revision);
        }
        IssuerCmd::List => {
            let list = c.list_issuers(cli.stale).await?;
            if cli.output == Output::Json {
                print_json(&list.items);
            } else {
                let rows = list
                    .items
                    .iter()
                    .map(|i| {
                        vec![
                            i.spec.name.clone(),
                            i.spec.issuer.clone(),
                            opt(i.spec.tenant.clone()),
                            i.spec.default_role.to_string(),
                            i.spec.algorithms.join(","),
                            i.revision.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "NAME",
                        "ISSUER",
                        "TENANT",
                        "DEFAULT ROLE",
                        "ALGORITHMS",
                        "REVISION",
                    ],
                    rows,
                );
            }
        }
        IssuerCmd::Rm { name } => {
            let a = c.delete_issuer(name, &none).await?;
            ack(cli, &format!("issuer {name} removed"), a.revision);
        }
    }
    Ok(())
}

async fn token(cli: &Cli, cmd: &TokenCmd) -> Outcome {
    let c = client(cli)?;
    match cmd {
        TokenCmd::Create {
            tenant,
            admin,
            role,
            name,
            ttl,
            scopes,
        } => {
            let role = match (role, admin, tenant) {
                (Some(r), _, _) => *r,
                (None, true, _) => Role::ClusterAdmin,
                (None, false, Some(_)) => Role::User,
                (None, false, None) => {
                    return Err(fail(
                        2,
                        "say whose token it is: --tenant NAME, --admin or --role metrics",
                    ))
                }
            };
            let created = c
                .create_token(&CreateTokenRequest {
                    name: name.clone(),
                    role: Some(role),
                    tenant: tenant.clone(),
                    ttl_seconds: *ttl,
                    scopes: (!scopes.is_empty()).then(|| scopes.clone()),
                })
                .await?;
            match cli.output {
                Output::Json => print_json(&created),
                Output::Table => out!("{}", created.token),
            }
        }
        TokenCmd::List => {
            let list = c.list_tokens(cli.stale).await?;
            if cli.output == Output::Json {
                print_json(&list.items);
            } else {
                let rows = list
                    .items
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.name.clone(),
                            t.role.to_string(),
                            opt(t.tenant.clone()),
                            any(t.scopes.as_deref().unwrap_or_default()),
                            t.created_at.to_string(),
                            opt(t.expires_at),
                            opt(t.last_used_at),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "NAME",
                        "ROLE",
                        "TENANT",
                        "SCOPES",
                        "CREATED",
                        "EXPIRES",
                        "LAST USED",
                    ],
                    rows,
                );
            }
        }
        TokenCmd::Revoke { id } => {
            let a = c.revoke_token(id).await?;
            ack(cli, &format!("token {id} revoked"), a.revision);
        }
    }
    Ok(())
}

async fn import_cmd(cli: &Cli, file: &PathBuf, tenant: &Option<String>, dry_run: bool) -> Outcome {
    let text = std::fs::read_to_string(file)
        .map_err(|e| fail(1, format!("reading {}: {e}", file.display())))?;
    let mut imported =
        import::parse(&text).map_err(|e| fail(1, format!("{}: {e}", file.display())))?;
    for w in &imported.warnings {
        eprintln!("warning: {w}");
    }
    for s in &mut imported.servers {
        s.tenant = tenant.clone();
    }
    if dry_run {
        let items: Vec<_> = imported
            .servers
            .into_iter()
            .map(|spec| Versioned {
                revision: 0,
                created_revision: 0,
                spec,
            })
            .collect();
        print_servers(cli, &items);
        return Ok(());
    }
    let c = client(cli)?;
    let mut failed = 0;
    for s in &imported.servers {
        match c.create_server(s, &CallOptions::default()).await {
            Ok(a) => eprintln!("registered {} (revision {})", s.name, a.revision),
            Err(e) if e.code() == Some("already_exists") => {
                eprintln!("skipped {}: already registered", s.name)
            }
            Err(e) if e.exit_code() == 3 => return Err(e.into()),
            Err(e) => {
                failed += 1;
                eprintln!("error: {}: {e}", s.name);
            }
        }
    }
    if failed > 0 {
        return Err(fail(
            1,
            format!("{failed} server(s) could not be registered"),
        ));
    }
    Ok(())
}

async fn dev_cmd(cli: &Cli, cmd: &DevCmd) -> Outcome {
    match cmd {
        DevCmd::Up {
            nodes,
            dir,
            mcpd,
            no_demo,
            mcpd_args,
            ca_dir,
        } => {
            let mcpd = match mcpd {
                Some(p) => p.clone(),
                None => std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("mcpd")))
                    .filter(|p| p.exists())
                    .ok_or_else(|| fail(2, "mcpd not found next to mcpctl; pass --mcpd PATH"))?,
            };
            let opts = dev::UpOptions {
                nodes: *nodes,
                dir: dir.clone(),
                mcpd,
                mcpd_args: mcpd_args.clone(),
                demo: !no_demo,
                ca_dir: ca_dir.clone(),
            };
            let c = dev::up(&opts, &|line| eprintln!("dev: {line}")).await?;
            match cli.output {
                Output::Json => print_json(&serde_json::json!({
                    "dir": c.dir, "endpoints": c.endpoints(), "pids": c.pids,
                    "admin_token": c.admin_token, "tenant_token": c.tenant_token,
                })),
                Output::Table => {
                    out!(
                        "cluster of {} nodes is up: {}",
                        c.members.len(),
                        c.endpoints().join(", ")
                    );
                    out!("load its settings with:  . {}/env", c.dir.display());
                    out!(
                        "stop it with:            mcpctl dev down --dir {}",
                        dir.display()
                    );
                }
            }
            Ok(())
        }
        DevCmd::Down { dir } => {
            let stopped = dev::down(dir, Duration::from_secs(10)).await;
            if stopped.is_empty() {
                eprintln!("no running nodes in {}", dir.display());
            } else if cli.output == Output::Table {
                out!("stopped nodes {stopped:?}");
            }
            Ok(())
        }
    }
}

async fn bridge_cmd(cli: &Cli, cmd: &BridgeCmd) -> Outcome {
    let BridgeCmd::Config {
        client,
        server,
        tenant,
        name,
        bridge,
    } = cmd;
    let bridge = match bridge {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("mcp-bridge")))
            .ok_or_else(|| fail(2, "cannot locate mcp-bridge; pass --bridge PATH"))?,
    };
    let bridge = bridge.canonicalize().unwrap_or(bridge);
    if cli.endpoints.is_empty() {
        return Err(fail(
            2,
            "no endpoints: pass --endpoints or set MCPCTL_ENDPOINTS (the nodes or a VIP)",
        ));
    }
    let urls: Vec<String> = cli
        .endpoints
        .iter()
        .map(|e| mcpctl::normalize_endpoint(e))
        .collect();
    let token = match tenant {
        Some(t) => {
            let created = crate::client(cli)?
                .create_token(&CreateTokenRequest {
                    name: format!("{name}-{}", format!("{client:?}").to_lowercase()),
                    role: Some(Role::User),
                    tenant: Some(t.clone()),
                    ttl_seconds: None,
                    scopes: None,
                })
                .await?;
            created.token
        }
        None => "<a tenant token: mcpctl token create --tenant NAME>".to_string(),
    };
    let mut args = vec!["--url".to_string(), urls.join(",")];
    if let Some(ca) = &cli.cacert {
        let ca = ca.canonicalize().unwrap_or_else(|_| ca.clone());
        args.push("--cacert".into());
        args.push(ca.to_string_lossy().to_string());
    }
    if let Some(s) = server {
        args.push("--server".into());
        args.push(s.clone());
    }
    let entry = serde_json::json!({
        "command": bridge.to_string_lossy(),
        "args": args,
        "env": { "MCP_BRIDGE_TOKEN": token },
    });
    let snippet = match client {
        AiClient::Claude | AiClient::Cursor => {
            serde_json::json!({ "mcpServers": { name.as_str(): entry } })
        }
        AiClient::Vscode => {
            let mut e = entry;
            e["type"] = serde_json::json!("stdio");
            serde_json::json!({ "servers": { name.as_str(): e } })
        }
    };
    print_json(&snippet);
    let file = match client {
        AiClient::Claude => "claude_desktop_config.json",
        AiClient::Cursor => "~/.cursor/mcp.json",
        AiClient::Vscode => ".vscode/mcp.json",
    };
    eprintln!("paste this into {file} (merge with entries already there)");
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Cluster(c) => cluster(&cli, c).await,
        Command::Server(c) => server(&cli, c).await,
        Command::Tenant(c) => tenant(&cli, c).await,
        Command::Issuer(c) => issuer(&cli, c).await,
        Command::Audit(c) => audit(&cli, c).await,
        Command::Policy(c) => policy(&cli, c).await,
        Command::Vserver(c) => vserver(&cli, c).await,
        Command::Approved(c) => approved_command(&cli, c).await,
        Command::Limit(c) => limit(&cli, c).await,
        Command::Usage {
            since,
            tenant,
            server,
        } => usage(&cli, since, tenant.as_deref(), server.as_deref()).await,
        Command::Token(c) => token(&cli, c).await,
        Command::Snapshot(c) => snapshot(&cli, c).await,
        Command::Import {
            file,
            tenant,
            dry_run,
        } => import_cmd(&cli, file, tenant, *dry_run).await,
        Command::Dev(c) => dev_cmd(&cli, c).await,
        Command::Bridge(c) => bridge_cmd(&cli, c).await,
    };
    if let Err(f) = outcome {
        eprintln!("error: {}", f.message);
        std::process::exit(f.code);
    }
}
