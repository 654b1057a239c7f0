//! JSON bodies of the admin API served by every node under `/v1/`.
//!
//! Request bodies reject unknown fields, so a typo (`pool_sise`) is a 400 naming the field
//! instead of a silently ignored setting. Responses wrap a stored object as
//! `{"revision": .., "created_revision": .., "spec": {..}}`: the spec is what an operator
//! wrote, the revisions are what the cluster assigned.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The address book entry of one node. It is also the Raft `Node` type, so membership carries
/// every address a peer needs and nothing has to be configured twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: u64,
    /// `host:port` of the node's admin/MCP HTTP listener.
    pub http_addr: String,
    /// `host:port` of the node's gRPC listener (Raft and forwarding).
    pub grpc_addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}(http={}, grpc={})",
            self.id, self.http_addr, self.grpc_addr
        )
    }
}

/// The error body of every non-2xx admin response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable, machine-readable code: `invalid_field`, `not_found`, `conflict`,
    /// `revision_mismatch`, `unauthorized`, `forbidden`, `no_quorum`, `not_initialized`, ...
    pub code: String,
    pub message: String,
    /// The request field at fault, where there is one (`name`, `spec.pool_size`, `If-Match`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `GET /v1/node`: who this node is. Unauthenticated, so `mcpctl cluster init` can learn the
/// identities of nodes that have no cluster (and no tokens) yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u64,
    pub http_addr: String,
    pub grpc_addr: String,
    /// Whether this node belongs to an initialised cluster.
    pub initialized: bool,
    pub version: String,
    /// When this node's certificates expire (unix seconds; they renew themselves before):
    /// the one it shows its peers, and the one its clients see (absent without TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_cert_expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_cert_expires_at: Option<u64>,
    /// What this node can enforce of a server's sandbox.
    #[serde(default)]
    pub sandbox: SandboxCapabilities,
}

/// What a node can enforce of a server's sandbox ([`SandboxSpec`]), detected at its start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxCapabilities {
    /// It may run processes as another user (root, or CAP_SETUID and CAP_SETGID).
    pub run_as: bool,
    /// It sets rlimits (always, on Linux).
    pub rlimits: bool,
    /// Its own cgroup is on a delegated cgroup v2 hierarchy (detected; limits are rlimits and
    /// mcpd's own memory watch today).
    pub cgroup_v2: bool,
    /// It may give a process mount and network namespaces of its own (root, or
    /// CAP_SYS_ADMIN): `private_network`, `read_only`, `private_tmp`, `hidden_paths`.
    #[serde(default)]
    pub namespaces: bool,
}

/// `POST /v1/cluster/init`: bootstrap a new cluster. Accepted only by a node that has never
/// been part of one; the answer carries the first admin token, shown this once.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitRequest {
    /// The initial voters. Empty means this node alone (others join with `add-node`).
    #[serde(default)]
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitResponse {
    pub leader: u64,
    pub members: Vec<u64>,
    /// `mcpt_<id>_<secret>`; only its SHA-256 is stored.
    pub admin_token: String,
}

/// `GET /v1/cluster/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node_id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    /// Role of the answering node: `leader`, `follower`, `candidate`, `learner`, `shutdown`.
    pub state: String,
    pub last_log_index: Option<u64>,
    /// Highest index held by a quorum of voters (known on the leader only).
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    /// The registry revision (bumped by every applied change).
    pub revision: u64,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: u64,
    pub http_addr: String,
    pub grpc_addr: String,
    pub voter: bool,
    /// Last log index known to be replicated to this member (known on the leader only).
    pub matched_index: Option<u64>,
    /// How many entries this member is behind the leader's last log (leader only).
    pub lag: Option<u64>,
    /// The applied index the member reported when pinged (None: it did not answer).
    #[serde(default)]
    pub applied_index: Option<u64>,
    /// `healthy` (answers and, as far as the answering node knows, keeps up), `lagging`
    /// (more than 100 entries behind the leader) or `unreachable` (did not answer a ping).
    pub health: String,
}

/// `POST /v1/cluster/nodes`: add a node as a learner, wait for it to catch up, then promote it
/// to voter (unless `voter` is false).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddNodeRequest {
    pub id: u64,
    pub http_addr: String,
    pub grpc_addr: String,
    #[serde(default = "default_true")]
    pub voter: bool,
}

fn default_true() -> bool {
    true
}

/// `POST /v1/cluster/promote` on a learner (or any member) whose voters are lost: it becomes a
/// one-node cluster of its own state (`mcpctl cluster promote --force-new-cluster`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// Must be `true`: the only promotion is to a new cluster (a learner of a healthy cluster
    /// becomes a voter with `cluster add-node`).
    pub force_new_cluster: bool,
}

/// The answer to [`PromoteRequest`]: the node restarts as a new cluster of one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromoteResponse {
    pub node: u64,
    /// The registry revision the new cluster starts from.
    pub revision: u64,
}

/// How a server's processes are shared between downstream sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    /// Many sessions share a pool of processes (the default).
    #[default]
    Shared,
    /// Each downstream session gets a process of its own, reaped after `idle_ms`.
    Dedicated,
}

/// Timeouts of one MCP server, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// A single request (tool call, read, ...) end to end.
    pub request_ms: u64,
    /// Spawn + `initialize` of a process.
    pub startup_ms: u64,
    /// A dedicated process with no session activity for this long is reaped.
    pub idle_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request_ms: 30_000,
            startup_ms: 15_000,
            idle_ms: 600_000,
        }
    }
}

/// An MCP server as registered by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    pub name: String,
    /// `None`: a global server every tenant may use. `Some(t)`: only tenant `t`'s tokens.
    #[serde(default)]
    pub tenant: Option<String>,
    /// A local server: the program each node runs and speaks to over stdio. Empty for a
    /// remote server (`url`).
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A remote server: its Streamable HTTP endpoint (`https://host/mcp`), which every node
    /// that runs the server connects to instead of starting a process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Headers sent with every request to a remote server (`Authorization`, API keys).
    /// Their values are secrets, sealed and redacted like `env` values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// A remote server's CA certificate file (PEM, on every node); without it the system's
    /// roots are trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// A remote server's OAuth 2.1 client: each connection gets its access token from the
    /// authorization server (client credentials grant) instead of a static header. Left out
    /// when unset, for nodes of older releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<Box<OAuthClient>>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Processes per node that runs this server.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// On how many nodes the server runs; `None` means every node.
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Servers to try, in order, when this one has no healthy placement.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Tools that are safe to run twice; only these are retried after a failure that may
    /// have reached the process. A server's own annotations are never trusted for this.
    #[serde(default)]
    pub idempotent_tools: Vec<String>,
    #[serde(default)]
    pub session_mode: SessionMode,
    /// A local server's processes: the user they run as and the resources each may use.
    /// `None`: mcpd's own user, no limits. Left out when unset, for nodes of older releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxSpec>,
}

/// How a node gets access tokens for a remote server: the OAuth 2.1 client credentials grant
/// (RFC 6749 section 4.4) at the authorization server's token endpoint, with the resource
/// indicator (RFC 8707) the MCP authorization spec asks clients to send.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthClient {
    /// The authorization server's token endpoint (`https://`, or `http://` to a loopback
    /// host).
    pub token_url: String,
    pub client_id: String,
    /// Sealed and redacted like `env` values; sent with HTTP Basic authentication.
    pub client_secret: String,
    /// Scopes to ask for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// The resource the token is for (its audience); the server's `url` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// A CA certificate file (PEM, on every node) for the token endpoint; without it the
    /// system's roots are trusted (the server's own `ca_file` is not used for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// Who a local server's processes run as, and what each may use. Every limit is per process
/// and inherited by the processes it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// `user` or `user:group`, by name or number: the process runs as it, with no
    /// supplementary groups. mcpd must run as root (or with CAP_SETUID and CAP_SETGID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// Resident memory, in MiB: the process is killed when it passes this
    /// (`killed: memory limit`), and cannot map more than 1.25 times it (RLIMIT_DATA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// CPU time, in seconds, over the process's life (RLIMIT_CPU): past it the process is
    /// killed (`killed: CPU limit`) and its slot starts a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<u64>,
    /// Open files (RLIMIT_NOFILE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// Processes and threads of the `run_as` user (RLIMIT_NPROC, counted per user by the
    /// kernel, and not enforced for root): needs `run_as`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    /// No network: the process gets a network namespace of its own, with only a loopback
    /// interface that is down (stdio needs none). This and the three fields below need
    /// `run_as` (a user other than root and mcpd's own).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private_network: bool,
    /// The whole filesystem read-only, but `writable_paths` (and `/dev`, `/proc`, `/sys`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// With `read_only`: absolute paths the process may still write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writable_paths: Vec<String>,
    /// Absolute paths the process cannot see: a directory is empty and unreadable, a file is
    /// empty. mcpd's own data and TLS directories are hidden whenever any of `read_only`,
    /// `private_tmp` or `hidden_paths` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden_paths: Vec<String>,
    /// A `/tmp` of its own, empty at start and gone with the process.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private_tmp: bool,
}

impl SandboxSpec {
    /// Whether the process gets a mount namespace of its own.
    pub fn private_mounts(&self) -> bool {
        self.read_only || self.private_tmp || !self.hidden_paths.is_empty()
    }

    /// Whether the process gets any namespace of its own (which needs `run_as`).
    pub fn isolated(&self) -> bool {
        self.private_network || self.private_mounts()
    }
}

fn default_pool_size() -> u32 {
    2
}

/// A partial update of a server (`PATCH /v1/servers/{name}`): absent fields keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallbacks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotent_tools: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_mode: Option<SessionMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthClient>,
}

impl ServerPatch {
    /// Applies the present fields to `spec`.
    pub fn apply_to(&self, spec: &mut ServerSpec) {
        let p = self.clone();
        if let Some(v) = p.command {
            spec.command = v;
        }
        if let Some(v) = p.args {
            spec.args = v;
        }
        if let Some(v) = p.env {
            spec.env = v;
        }
        if let Some(v) = p.url {
            spec.url = Some(v);
        }
        if let Some(v) = p.headers {
            spec.headers = v;
        }
        if let Some(v) = p.ca_file {
            spec.ca_file = Some(v);
        }
        if let Some(v) = p.cwd {
            spec.cwd = Some(v);
        }
        if let Some(v) = p.enabled {
            spec.enabled = v;
        }
        if let Some(v) = p.pool_size {
            spec.pool_size = v;
        }
        if let Some(v) = p.replicas {
            spec.replicas = Some(v);
        }
        if let Some(v) = p.fallbacks {
            spec.fallbacks = v;
        }
        if let Some(v) = p.timeouts {
            spec.timeouts = v;
        }
        if let Some(v) = p.idempotent_tools {
            spec.idempotent_tools = v;
        }
        if let Some(v) = p.session_mode {
            spec.session_mode = v;
        }
        if let Some(v) = p.sandbox {
            // An empty sandbox clears it.
            spec.sandbox = Some(v).filter(|s| *s != SandboxSpec::default());
        }
        // Set by a patch, cleared only by a PUT of the whole spec (as `url` and `ca_file`).
        if let Some(v) = p.oauth {
            spec.oauth = Some(Box::new(v));
        }
    }
}

/// A tenant: the unit of isolation for servers and tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The tenant's share of a busy shared server: when several tenants' calls wait for its
    /// processes, a tenant gets up to this many in each turn (1 to 100). Left out when 1, so
    /// that nodes of a release before weights still read the tenant.
    #[serde(
        default = "TenantSpec::default_weight",
        skip_serializing_if = "TenantSpec::is_default_weight"
    )]
    pub weight: u32,
}

impl TenantSpec {
    /// Most turns a tenant's weight may give it.
    pub const MAX_WEIGHT: u32 = 100;

    fn default_weight() -> u32 {
        1
    }

    fn is_default_weight(w: &u32) -> bool {
        *w == 1
    }
}

/// What the API shows in place of a secret's value (a server's `env` values). Sent back in
/// a write, it stands for the value already stored.
pub const REDACTED: &str = "<redacted>";

impl ServerSpec {
    /// The spec as the API shows it: `env` and `headers` names with every value [`REDACTED`].
    pub fn redacted(&self) -> ServerSpec {
        let mut spec = self.clone();
        for v in spec.env.values_mut().chain(spec.headers.values_mut()) {
            *v = REDACTED.to_string();
        }
        if let Some(oauth) = &mut spec.oauth {
            oauth.client_secret = REDACTED.to_string();
        }
        spec
    }

    /// Whether the server is remote (reached over HTTP at `url`) rather than a local process.
    pub fn is_remote(&self) -> bool {
        self.url.is_some()
    }
}

impl Versioned<ServerSpec> {
    /// The stored server as the API shows it: `env` values [`REDACTED`].
    pub fn redacted(&self) -> Versioned<ServerSpec> {
        let mut v = self.clone();
        v.spec = v.spec.redacted();
        v
    }
}

/// What a caller may do: the role of its API token, or the one a trusted issuer's JWT maps it
/// to. The route × role table is in `deploy/README.md` ("Roles"); [`Role::ALL`] lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything: the admin API and every tenant's MCP traffic.
    #[serde(alias = "admin")]
    ClusterAdmin,
    /// One tenant's tokens and remote servers, and that tenant's MCP traffic.
    TenantAdmin,
    /// Reads everything, enables and disables servers.
    Operator,
    /// Reads everything, changes nothing.
    Viewer,
    /// MCP traffic of one tenant: global servers and the tenant's own.
    #[serde(alias = "tenant")]
    User,
    /// Reads `/metrics` and nothing else (for Prometheus).
    Metrics,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::ClusterAdmin,
        Role::TenantAdmin,
        Role::Operator,
        Role::Viewer,
        Role::User,
        Role::Metrics,
    ];

    /// Whether the role belongs to one tenant (its tokens name the tenant).
    pub fn is_tenant_scoped(self) -> bool {
        matches!(self, Role::TenantAdmin | Role::User)
    }

    /// The name the API and `mcpctl` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ClusterAdmin => "cluster-admin",
            Role::TenantAdmin => "tenant-admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::User => "user",
            Role::Metrics => "metrics",
        }
    }

    /// The role named `name` (also the older `admin` and `tenant`).
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::ClusterAdmin),
            "tenant" => Some(Role::User),
            _ => Role::ALL.into_iter().find(|r| r.as_str() == name),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A trusted issuer of JWT access tokens (an OpenID provider or OAuth authorization server),
/// and how its tokens' claims become a caller: subject, tenant and roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSpec {
    /// The registry's name for it (`okta`, `keycloak-acme`).
    pub name: String,
    /// The `iss` its tokens carry, exactly (an `https` URL; `http` only on loopback).
    pub issuer: String,
    /// Audiences accepted besides the resource URL of the endpoint called (RFC 8707): a token
    /// whose `aud` holds none of them is refused.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where its signing keys are; by default the `jwks_uri` of its discovery document
    /// (`/.well-known/openid-configuration`, then `/.well-known/oauth-authorization-server`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Signature algorithms accepted (never `none`, never an HMAC one).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Tolerance, in seconds, for `exp` and `nbf` against this node's clock.
    #[serde(default = "default_clock_skew")]
    pub clock_skew_s: u64,
    /// Every caller of this issuer belongs to this tenant (a per-tenant issuer).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Otherwise the claim that names the caller's tenant.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The claim (a list of strings, or one space-separated string) whose values that are
    /// role names give the caller's roles; the most powerful one counts.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The role of a caller whose token names none.
    #[serde(default = "default_role")]
    pub default_role: Role,
    /// The claim listing the caller's groups (for policies' `groups`).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Accept tokens whose `typ` is not `at+jwt` (RFC 9068 asks for it; Entra ID and Okta
    /// issue `JWT`). Off: an ID token or another JWT of the issuer is not an access token.
    #[serde(default)]
    pub accept_untyped: bool,
    /// A CA file (PEM) for its discovery and JWKS endpoints; the system's roots otherwise.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// A public OAuth client (authorization code with PKCE, no secret) registered at the issuer
    /// for the web console, whose redirect URIs are the nodes' `https://NODE/ui/`. Set: the
    /// console's sign-in page offers this issuer (`GET /v1/session/providers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_client_id: Option<String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}
fn default_clock_skew() -> u64 {
    60
}
fn default_tenant_claim() -> String {
    "tenant".into()
}
fn default_roles_claim() -> String {
    "roles".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_role() -> Role {
    Role::User
}

/// An authorization rule for MCP calls (`/v1/policies`, `mcpctl policy`). Rules are evaluated
/// in `order` (then name) on the node that receives a call; the first whose targets, callers
/// and condition all match decides. When none matches, the call is allowed (end with a
/// `deny` rule of no targets for deny-by-default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    /// Lower first.
    pub order: u32,
    pub effect: Effect,
    /// What it covers, with `*` globs: `server:NAME`, `tool:SERVER__TOOL`,
    /// `prompt:SERVER__PROMPT`, `resource:URI`. Empty: every call.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Whose calls (each list empty: anyone's): tenants as globs; subjects as globs over the
    /// caller's qualified id (`jwt:ISSUER:SUB` for a JWT, the id of an API token); roles; and
    /// a JWT's groups as globs (a tenant's issuer's groups read `ISSUER:group`).
    #[serde(default)]
    pub tenants: Vec<String>,
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub subjects: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// A CEL expression that must be true as well, over `args` (the call's arguments),
    /// `principal` (`subject`: the qualified id, `tenant`, `role`, `groups`, `issuer`), `server`, `name` (the tool or
    /// prompt) and `uri`. Example: `args.path.startsWith("/srv/" + principal.tenant)`.
    #[serde(default)]
    pub condition: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

impl Effect {
    /// The name the API and `mcpctl` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        }
    }
}

/// `POST /v1/policies/test`: would this caller be allowed this call, and by which rule?
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTest {
    pub role: Role,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// `tool:SERVER__TOOL`, `prompt:SERVER__PROMPT` or `resource:SERVER:URI`... as a call
    /// names it: `tool:files__read_text_file`.
    pub target: String,
    /// The call's arguments.
    #[serde(default)]
    pub args: serde_json::Value,
}

/// The answer to a [`PolicyTest`], and what a denied call's error carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVerdict {
    pub allowed: bool,
    /// The rule that decided; `None`: no rule matched (allowed by default).
    pub rule: Option<String>,
}

/// OAuth scopes a JWT must carry for each surface (API tokens carry their role's rights).
pub mod scope {
    /// MCP endpoints: `/mcp`, `/servers/NAME/mcp`.
    pub const MCP: &str = "mcp";
    /// The admin API, reading.
    pub const ADMIN_READ: &str = "admin:read";
    /// The admin API, writing.
    pub const ADMIN_WRITE: &str = "admin:write";
    pub const ALL: [&str; 3] = [MCP, ADMIN_READ, ADMIN_WRITE];
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// A label for people (`ci`, `alice-laptop`).
    pub name: String,
    /// Defaults to `user` when `tenant` is given, else required.
    #[serde(default)]
    pub role: Option<Role>,
    #[serde(default)]
    pub tenant: Option<String>,
    /// Lifetime; `None` never expires.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Narrows the token to these scopes (of [`scope::ALL`]); `None`: every scope its role
    /// has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
}

/// A token as listed: metadata only, never the secret or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub tenant: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<u64>,
    /// The scopes it is narrowed to; absent: every scope of its role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Unix seconds of its last use anywhere in the cluster, to within a minute (each node
    /// reports the tokens it saw in one write a minute, not one per call); absent: never
    /// used since it was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<u64>,
}

/// The answer to `POST /v1/tokens`: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    pub token: String,
    pub info: TokenInfo,
    pub revision: u64,
}

/// A stored object with the revisions the cluster assigned to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned<T> {
    /// Registry revision of the last change to this object; send it as `If-Match`.
    pub revision: u64,
    /// Registry revision at which the object was created.
    pub created_revision: u64,
    pub spec: T,
}

/// `GET /v1/servers/{name}/status`: where a server runs and how each replica is doing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerStatus {
    pub name: String,
    pub revision: u64,
    pub enabled: bool,
    /// Nodes assigned by the leader (servers with `replicas`); every member otherwise.
    pub placement: Vec<u64>,
    pub replicas: Vec<ReplicaStatus>,
    /// Circuit breakers as the answering node sees each replica.
    pub breakers: Vec<serde_json::Value>,
}

/// One node's pool of a server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub node: u64,
    /// `ready`, `starting`, `restarting`, `crash_loop`, `stopped` per process; empty when the
    /// node runs no pool of it or did not answer.
    pub processes: Vec<String>,
    pub queue_depth: Option<u64>,
    /// Whether the node answered.
    pub reachable: bool,
    /// Per process slot: why it last failed and what it last wrote to stderr.
    #[serde(default)]
    pub details: Vec<ProcessReport>,
}

/// One process slot of a node's pool, as an operator who asks why it fails needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessReport {
    /// `ready`, `starting`, `restarting`, `crash_loop`, `stopped`.
    pub state: String,
    pub pid: Option<u32>,
    /// Processes the slot started again after one failed or was lost.
    pub restarts: u64,
    /// The last failure: a start error (`spawning "uvx": No such file or directory`), an exit
    /// status, a missed health ping.
    pub last_error: Option<String>,
    /// When it happened (Unix seconds).
    pub last_error_at: Option<u64>,
    /// How the slot's last process ended (`exit status: 1`, `signal: 9 (SIGKILL)`).
    pub last_exit: Option<String>,
    /// The last lines the slot's processes wrote to stderr (at most 20).
    pub stderr: Vec<String>,
    /// How the slot reaches its server: `stdio`, `http` (Streamable HTTP) or `sse` (legacy
    /// HTTP+SSE); unset until it first connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The protocol revision the slot speaks with its server (`2025-11-25`, `2026-07-28`:
    /// the newest both speak); unset until it first connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// A list answer, with the registry revision it was read at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct List<T> {
    pub revision: u64,
    pub items: Vec<T>,
}

/// The answer to a write: the registry revision it produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteAck {
    pub revision: u64,
}

/// What kind of object a watch event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    Server,
    Tenant,
    Token,
    /// A trusted JWT issuer.
    Issuer,
    /// An event of the audit trail (its name is its sequence number).
    Audit,
    /// An authorization rule for MCP calls.
    Policy,
    /// Where a server with `replicas` runs (the node ids), assigned by the leader.
    Placement,
    /// MCP session state (not streamed to watchers).
    Session,
    /// The tools of a server an admin approved (its name is the server's).
    ToolPins,
    /// A curated set of tools from several servers, served at `/v/NAME/mcp`.
    VirtualServer,
    /// A command a cluster admin approved for tenants' local servers.
    ApprovedCommand,
    /// A rate limit or quota on MCP calls.
    Limit,
}

/// One line of `GET /v1/watch` (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchEvent {
    Put {
        revision: u64,
        kind: ObjectKind,
        name: String,
        value: serde_json::Value,
    },
    Delete {
        revision: u64,
        kind: ObjectKind,
        name: String,
    },
    /// The whole state was replaced (a snapshot was installed) or the watcher fell behind:
    /// re-read everything at or after `revision`.
    Reset { revision: u64 },
}

impl WatchEvent {
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put { revision, .. }
            | WatchEvent::Delete { revision, .. }
            | WatchEvent::Reset { revision } => *revision,
        }
    }
}

/// `POST`/`GET /v1/session`: who a console session belongs to. The session itself is the
/// `mcpd_session` cookie (`HttpOnly`); writes repeat `csrf_token` in `X-CSRF-Token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsoleSession {
    /// The caller's qualified id (a token id, or `jwt:ISSUER:SUBJECT`).
    pub subject: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Unix seconds (absent on `GET`: the cookie's own expiry is not re-read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    pub csrf_token: String,
}

/// `GET /v1/traffic`: the answering node's own calls per server over its last minutes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrafficReport {
    pub node: u64,
    /// Unix seconds when the report was made.
    pub now: u64,
    pub bucket_s: u64,
    pub window_s: u64,
    /// Per server, its buckets oldest first (buckets without calls are absent).
    pub servers: std::collections::BTreeMap<String, Vec<TrafficPoint>>,
}

/// One bucket of one server's calls (tool calls, resource reads, prompt gets).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrafficPoint {
    /// The bucket's start, unix seconds.
    pub t: u64,
    pub calls: u64,
    /// Calls answered with an error (a JSON-RPC error, a refusal, or a tool's `isError`).
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// `GET /v1/session/providers` (no credentials needed): the trusted issuers a person may sign
/// in to the console with, and the resource their access tokens must be for (RFC 8707).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignInProviders {
    /// The admin API's resource URL, as this request reached it.
    pub resource: String,
    /// The scopes to ask for (read and write the admin API).
    pub scope: String,
    pub providers: Vec<SignInProvider>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignInProvider {
    /// The issuer's registry name.
    pub name: String,
    /// Its URL (`iss`), where its discovery document is.
    pub issuer: String,
    /// The console's public client there.
    pub client_id: String,
}

/// `GET /v1/servers/{name}/catalogue`: what a server offers, as the server lists it (from the
/// answering node's pool, or a peer's that runs it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerCatalogue {
    pub name: String,
    /// Whether it was read from a ready process (false: none ran yet, the lists are empty).
    pub loaded: bool,
    pub tools: Vec<serde_json::Value>,
    pub resources: Vec<serde_json::Value>,
    #[serde(rename = "resourceTemplates")]
    pub resource_templates: Vec<serde_json::Value>,
    pub prompts: Vec<serde_json::Value>,
}

/// `PUT /v1/servers/{name}/pins`: the tools of a server an admin approved, each as the server
/// listed it (`mcpctl server approve`). Once a server has pins, a tool whose name, title,
/// description, schemas or annotations differ from the approved ones, or a tool not approved
/// at all, is held back from clients (not listed, not called) until approved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolPins {
    pub tools: BTreeMap<String, serde_json::Value>,
}

/// `GET /v1/servers/{name}/diff`: the server's tools now against the approved ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolDiff {
    pub server: String,
    /// Whether the server has pins (without, every tool passes).
    pub pinned: bool,
    /// Whether its catalogue was read from a ready process.
    pub loaded: bool,
    /// The pins' revision, for `If-Match` on the approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    pub tools: Vec<ToolChange>,
}

/// One tool, approved or not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolChange {
    pub name: String,
    /// `approved` (as approved), `changed` (held: differs from the approved one), `new` (held:
    /// never approved), `removed` (approved, no longer offered), or `unpinned` (the server has
    /// no pins).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<serde_json::Value>,
}

/// A virtual server (`/v1/virtual-servers`, `mcpctl vserver`): a named, curated set of tools
/// from several servers, each optionally renamed, served at `/v/NAME/mcp`. A caller reaches
/// through it only servers it may use anyway, under the same policies and tool pins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualServerSpec {
    pub name: String,
    /// `None`: every tenant's callers may use it. `Some(t)`: only tenant `t`'s.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Shown to clients as the server's instructions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub tools: Vec<VirtualTool>,
}

/// One tool of a virtual server: `tool` of `server`, shown as `name` (default: `tool`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualTool {
    pub server: String,
    pub tool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl VirtualTool {
    /// The name clients see.
    pub fn exposed(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.tool)
    }
}

/// A command a cluster admin approved for tenants' local (stdio) servers
/// (`/v1/approved-commands`, `mcpctl command approve`): a tenant admin may add a local server
/// only by naming one. A local server's command runs on every node as mcpd's user, so what
/// runs is the cluster admin's choice: the program, its leading arguments, and which
/// environment variables a tenant may set (never `LD_PRELOAD` or the like, unless listed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovedCommand {
    pub name: String,
    /// The program, as a server spec's `command` must name it.
    pub command: String,
    /// The arguments a server's `args` must start with.
    #[serde(default)]
    pub args: Vec<String>,
    /// Whether a server may add arguments after them.
    #[serde(default)]
    pub extra_args: bool,
    /// Environment variables a tenant's server may set.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl ApprovedCommand {
    /// Whether `spec` runs this command as approved (command, arguments, environment, and no
    /// working directory of its own).
    pub fn allows(&self, spec: &ServerSpec) -> bool {
        spec.command == self.command
            && spec.args.starts_with(&self.args)
            && (self.extra_args || spec.args.len() == self.args.len())
            && spec.env.keys().all(|k| self.env.contains(k))
            && spec.cwd.is_none()
    }
}

/// A limit on MCP calls (`tools/call`, `resources/read`, `prompts/get`): a rate, a quota, a
/// number of calls at once, or any of them together. The fields `tenant`, `subject`, `server`
/// and `tool` narrow which calls it counts (unset: any); of the limits that match a call, the
/// most specific of each kind (the most of those fields set; then by name) counts it. The
/// budget is the cluster's, not a node's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// A caller: an API token's id, or `jwt:ISSUER:SUBJECT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// A tool (or prompt) of `server` (needs `server`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// Whose budget it is: one for every call it matches, or one per tenant or per subject.
    #[serde(default)]
    pub per: LimitPer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    /// Calls running at once, in the whole cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

/// Whose budget a limit is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitPer {
    /// One budget for every call the limit matches.
    #[default]
    All,
    /// One per tenant (cluster-wide callers share one).
    Tenant,
    /// One per caller.
    Subject,
}

/// Calls per second, with a burst (a token bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: u32,
    /// Calls that may come at once after a quiet spell (the bucket's size); at least 1.
    pub burst: u32,
}

/// Calls per UTC day or month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub calls: u64,
    pub period: QuotaPeriod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    Day,
    Month,
}

/// How much of a quota is used (`GET /v1/limits/NAME/usage`): per budget (the tenant or
/// subject of a `per` limit, else empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUsage {
    pub budget: String,
    /// `2026-12-05` or `2026-12`.
    pub period: String,
    /// Calls counted (granted to the nodes, which may not have used them all yet).
    pub used: u64,
    pub calls: u64,
}

/// Calls of one tenant's subject to one server's tool in one UTC hour (`GET /v1/usage`: summed
/// over the hours asked for, `hour` the first of them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// Unix seconds of the hour's start.
    pub hour: u64,
    /// Empty for cluster-wide callers.
    pub tenant: String,
    pub subject: String,
    pub server: String,
    /// The tool or prompt; `resources/read` for resource reads.
    pub tool: String,
    pub calls: u64,
    /// Calls answered with an error (JSON-RPC or a tool's own).
    pub errors: u64,
    pub duration_ms: u64,
    /// Bytes of the calls' parameters and of their results, as JSON.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl UsageRow {
    /// Adds `other`'s figures to these.
    pub fn add(&mut self, other: &UsageRow) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.duration_ms += other.duration_ms;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
    }
}
