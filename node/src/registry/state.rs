//! The replicated registry: what every node holds after applying the Raft log, and the pure,
//! deterministic function that applies one command to it.
//!
//! Nothing here does I/O or reads a clock: every input (timestamps, token hashes, request ids)
//! travels inside the command, so every node that applies the same log reaches the same state.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use mcpcp_proto::api::{
    AddNodeRequest, ApprovedCommand, IssuerSpec, LimitSpec, ObjectKind, PolicySpec, Role,
    ServerSpec, TenantSpec, TokenInfo, ToolPins, UsageRow, Versioned, VirtualServerSpec,
    WatchEvent,
};
use mcpcp_proto::audit::{self, Actor, AuditEvent};
use serde::{Deserialize, Serialize};

use crate::audit_key::AuditKey;

/// What a write must find before it applies (`If-Match` and create-only semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precondition {
    /// Apply whatever is there (upsert / delete-if-present-else-404).
    None,
    /// Create only: fail if the object exists.
    Absent,
    /// Compare-and-set: the object must exist at exactly this revision.
    Revision(u64),
}

/// A change to the registry, as proposed to Raft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    PutServer {
        spec: ServerSpec,
        precondition: Precondition,
    },
    DeleteServer {
        name: String,
        precondition: Precondition,
    },
    PutTenant {
        spec: TenantSpec,
        precondition: Precondition,
    },
    DeleteTenant {
        name: String,
        precondition: Precondition,
    },
    PutIssuer {
        spec: IssuerSpec,
        precondition: Precondition,
    },
    PutPolicy {
        spec: PolicySpec,
        precondition: Precondition,
    },
    DeletePolicy {
        name: String,
        precondition: Precondition,
    },
    DeleteIssuer {
        name: String,
        precondition: Precondition,
    },
    CreateToken {
        info: TokenInfo,
        hash: String,
    },
    RevokeToken {
        id: String,
    },
    /// A command tenants' local servers may run (`api::approved_commands`).
    PutApprovedCommand {
        spec: ApprovedCommand,
        precondition: Precondition,
    },
    DeleteApprovedCommand {
        name: String,
        precondition: Precondition,
    },
    /// A rate limit or quota on MCP calls (`crate::limits`).
    PutLimit {
        spec: LimitSpec,
        precondition: Precondition,
    },
    /// Removes a limit and what its quota used.
    DeleteLimit {
        name: String,
        precondition: Precondition,
    },
    /// Counts `calls` against a quota's budget `bucket` (`LIMIT/BUDGET`) in `period`, all or
    /// none: refused (`QuotaExhausted`) when they would pass `max`. A new period starts the
    /// count again. A node asks before it lets the calls run, so that a count survives the
    /// loss of every node.
    ConsumeQuota {
        bucket: String,
        period: String,
        calls: u64,
        max: u64,
    },
    /// A node's usage figures since its last flush, added to the hourly aggregates; hours
    /// older than `retention_hours` before the newest are dropped (`crate::usage`).
    AddUsage {
        rows: Vec<UsageRow>,
        retention_hours: u64,
    },
    /// A virtual server: a curated set of tools of several servers (`/v/NAME/mcp`).
    PutVirtualServer {
        spec: VirtualServerSpec,
        precondition: Precondition,
    },
    DeleteVirtualServer {
        name: String,
        precondition: Precondition,
    },
    /// The tools of `server` an admin approved (`crate::pinning`).
    PutToolPins {
        server: String,
        pins: ToolPins,
        precondition: Precondition,
    },
    /// The server's tools are no longer checked against approved ones.
    DeleteToolPins {
        server: String,
        precondition: Precondition,
    },
    /// A node saw a pinned server offer `tool` other than approved (`change`: `changed` or
    /// `new`), with this fingerprint. Recorded once per fingerprint until the next approval:
    /// a repeat is refused, so the audit trail holds each change once.
    NoteToolChange {
        server: String,
        tool: String,
        change: String,
        fingerprint: String,
    },
    /// How many audit events the state keeps (older ones leave with their chain head).
    SetAuditRetention {
        events: u64,
    },
    /// When API tokens were last used, as nodes saw them (`registry::token_use`).
    TouchTokens {
        used: BTreeMap<String, u64>,
    },
    /// The nodes that run a server with `replicas` (written by the leader's placement loop).
    SetPlacement {
        server: String,
        nodes: Vec<u64>,
    },
    /// The key that signs MCP session ids, so any node can verify and continue a session.
    /// Written once at bootstrap; a second one is refused.
    SetSessionKey {
        key: String,
    },
    /// The mutable part of an MCP session (subscriptions, log level), so that another node
    /// can continue it. `None` removes it.
    PutSessionState {
        id: String,
        state: Option<SessionState>,
    },
    /// The cluster's one bootstrap, in one entry: the first admin token and the key that signs
    /// MCP session ids. Refused once the cluster has a session key (it was bootstrapped),
    /// whatever tokens exist, so `init` can never be replayed to mint an admin token.
    Bootstrap {
        info: TokenInfo,
        hash: String,
        session_key: String,
    },
    /// A single-use join token for node `token.node` (`mcpctl cluster add-node`).
    CreateJoinToken {
        id: String,
        token: JoinToken,
        now: u64,
    },
    /// A join token used: it is gone, so it works once.
    RedeemJoinToken {
        id: String,
    },
    /// An admin token issued by `mcpd recover-admin` on a node's host (every admin token was
    /// lost); recorded with when and through which node, for the audit.
    RecoverAdmin {
        info: TokenInfo,
        hash: String,
        node: u64,
    },
    /// A membership change an admin asked for, written before it is made: the change itself is
    /// Raft's own log entry, which says nothing of who asked. Changes no state but the audit
    /// trail (format 2).
    ChangeMembership {
        change: MembershipChange,
    },
}

/// A membership change, as an admin asks for it and as it is forwarded to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    Add(AddNodeRequest),
    Remove { id: u64 },
}

/// An admin command, as its audit event shows it (`Command::audit_summary`, in
/// `registry::audit`).
pub struct AuditSummary {
    pub kind: &'static str,
    pub object: Option<String>,
    pub detail: serde_json::Value,
}

/// Tool changes recorded per pinned server until its next approval.
pub const TOOL_CHANGES_NOTED: usize = 100;

/// A join token waiting for its node (see `crate::join`): only its hash is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Hex SHA-256 of the token's secret.
    pub hash: String,
    /// The node id it lets join, and no other.
    pub node: u64,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Join tokens the state keeps at most (expired ones are dropped first).
pub const JOIN_TOKENS_KEPT: usize = 64;

/// A use of `mcpd recover-admin`, kept in the replicated state (the last 100).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// Unix seconds.
    pub at: u64,
    /// The node whose host ran the recovery.
    pub node: u64,
    /// The admin token it issued.
    pub token_id: String,
}

/// How many recoveries the state remembers.
pub const RECOVERIES_KEPT: usize = 100;

/// What an MCP session changed after `initialize`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    pub subscriptions: BTreeSet<String>,
    pub log_level: Option<String>,
    /// The client ended the session (`DELETE`): no node continues it any more.
    #[serde(default)]
    pub ended: bool,
    /// Unix seconds after which the state may be dropped.
    pub expires_at: u64,
}

/// The newest command format this build applies. A release that adds a command bumps it and
/// gives the new command that format in [`Command::format`]; the leader proposes the command
/// only once every member applies its format (`registry::formats`).
pub const STATE_FORMAT: u32 = 2;

impl Command {
    /// The format of the release that introduced this command (no wildcard: a new command
    /// must be given one).
    pub fn format(&self) -> u32 {
        match self {
            // A remote server's OAuth client is a field an older node refuses to decode.
            Command::PutServer { spec, .. } if spec.oauth.is_some() => 2,
            Command::PutServer { .. }
            | Command::DeleteServer { .. }
            | Command::PutTenant { .. }
            | Command::DeleteTenant { .. }
            | Command::PutIssuer { .. }
            | Command::PutPolicy { .. }
            | Command::DeletePolicy { .. }
            | Command::DeleteIssuer { .. }
            | Command::CreateToken { .. }
            | Command::RevokeToken { .. }
            | Command::TouchTokens { .. }
            | Command::SetAuditRetention { .. }
            | Command::PutToolPins { .. }
            | Command::PutVirtualServer { .. }
            | Command::PutApprovedCommand { .. }
            | Command::PutLimit { .. }
            | Command::DeleteLimit { .. }
            | Command::ConsumeQuota { .. }
            | Command::AddUsage { .. }
            | Command::DeleteApprovedCommand { .. }
            | Command::DeleteVirtualServer { .. }
            | Command::DeleteToolPins { .. }
            | Command::NoteToolChange { .. }
            | Command::SetPlacement { .. }
            | Command::SetSessionKey { .. }
            | Command::PutSessionState { .. }
            | Command::Bootstrap { .. }
            | Command::CreateJoinToken { .. }
            | Command::RedeemJoinToken { .. }
            | Command::RecoverAdmin { .. } => 1,
            Command::ChangeMembership { .. } => 2,
        }
    }

    /// A short label for logs and metrics (never carries secrets or specs).
    pub fn label(&self) -> &'static str {
        match self {
            Command::PutServer { .. } => "put_server",
            Command::DeleteServer { .. } => "delete_server",
            Command::PutTenant { .. } => "put_tenant",
            Command::DeleteTenant { .. } => "delete_tenant",
            Command::PutIssuer { .. } => "put_issuer",
            Command::PutPolicy { .. } => "put_policy",
            Command::DeletePolicy { .. } => "delete_policy",
            Command::DeleteIssuer { .. } => "delete_issuer",
            Command::CreateToken { .. } => "create_token",
            Command::RevokeToken { .. } => "revoke_token",
            Command::TouchTokens { .. } => "touch_tokens",
            Command::SetAuditRetention { .. } => "set_audit_retention",
            Command::PutToolPins { .. } => "approve_tools",
            Command::PutVirtualServer { .. } => "put_virtual_server",
            Command::PutApprovedCommand { .. } => "approve_command",
            Command::PutLimit { .. } => "put_limit",
            Command::DeleteLimit { .. } => "delete_limit",
            Command::ConsumeQuota { .. } => "consume_quota",
            Command::AddUsage { .. } => "add_usage",
            Command::DeleteApprovedCommand { .. } => "delete_approved_command",
            Command::DeleteVirtualServer { .. } => "delete_virtual_server",
            Command::DeleteToolPins { .. } => "unpin_tools",
            Command::NoteToolChange { .. } => "tool_changed",
            Command::SetPlacement { .. } => "set_placement",
            Command::SetSessionKey { .. } => "set_session_key",
            Command::PutSessionState { .. } => "put_session_state",
            Command::Bootstrap { .. } => "bootstrap",
            Command::CreateJoinToken { .. } => "create_join_token",
            Command::RedeemJoinToken { .. } => "redeem_join_token",
            Command::RecoverAdmin { .. } => "recover_admin",
            Command::ChangeMembership { .. } => "change_membership",
        }
    }
}

/// A command with the id its client gave it. Applying the same request id twice returns the
/// first outcome instead of applying again, so a client (or a forwarding node) may resend a
/// write whose answer it lost without running it twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub request_id: String,
    pub command: Command,
    /// Who asked, for the audit trail: set on admin writes, absent on the node's own
    /// (placement, session state, token uses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditContext>,
}

/// Who asked for a write, and from where and when (the clock of the node that took it, so
/// every node records the same time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditContext {
    pub actor: Actor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub at: u64,
}

/// Audit events kept unless `SetAuditRetention` says otherwise.
pub const AUDIT_RETENTION: u64 = 10_000;

/// What one Raft entry carries: writes proposed together (see `registry::propose`), applied
/// in order, each with its own result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub requests: Vec<Request>,
    /// The spans of the writes, on the node that proposed them, for the spans of their
    /// fsync and apply (`crate::telemetry`); empty while tracing is off, never written.
    #[serde(skip)]
    pub traces: crate::telemetry::Traces,
}

/// The outcome of a successful command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub revision: u64,
}

/// Why a well-formed command was refused by the state it met. Deterministic, so every node
/// refuses it alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("{kind:?} {name:?} not found")]
    NotFound { kind: ObjectKind, name: String },
    #[error("{kind:?} {name:?} already exists")]
    AlreadyExists { kind: ObjectKind, name: String },
    #[error("{kind:?} {name:?} is at revision {actual:?}, not {expected}")]
    RevisionMismatch {
        kind: ObjectKind,
        name: String,
        expected: u64,
        actual: Option<u64>,
    },
    #[error("quota {bucket:?} is used up: {used} of {max} calls in {period}")]
    QuotaExhausted {
        bucket: String,
        period: String,
        used: u64,
        max: u64,
    },
    #[error("{kind:?} {name:?} is in use: {detail}")]
    InUse {
        kind: ObjectKind,
        name: String,
        detail: String,
    },
    #[error("{field} refers to {kind:?} {name:?}, which does not exist")]
    MissingReference {
        field: String,
        kind: ObjectKind,
        name: String,
    },
    #[error("the cluster is already initialised; a cluster is initialised once (lost every admin token? run `mcpd recover-admin` on a node's host)")]
    AlreadyInitialized,
}

pub type CommandResult = Result<Applied, ApplyError>;

/// A token as stored: its metadata and the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    pub info: TokenInfo,
    pub hash: String,
    pub revision: u64,
}

/// How long a session's replicated state outlives its last change (seconds).
pub const SESSION_STATE_TTL: u64 = 24 * 3600;

/// How many request ids are remembered for de-duplication. A client retries within seconds;
/// this covers far more writes than fit in that time.
pub const DEDUP_WINDOW: usize = 10_000;

/// The registry. Serialised whole into snapshots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Bumped by every successful command; each object records the revision that last
    /// changed it.
    pub revision: u64,
    pub servers: BTreeMap<String, Versioned<ServerSpec>>,
    pub tenants: BTreeMap<String, Versioned<TenantSpec>>,
    pub tokens: BTreeMap<String, StoredToken>,
    /// Trusted issuers of JWT access tokens, by name.
    #[serde(default)]
    pub issuers: BTreeMap<String, Versioned<IssuerSpec>>,
    /// Authorization rules for MCP calls, by name (`crate::policy` orders them).
    #[serde(default)]
    pub policies: BTreeMap<String, Versioned<PolicySpec>>,
    /// Bumped by every change of `policies`, so nodes recompile them only then.
    #[serde(default)]
    pub policies_version: u64,
    /// The audit trail of admin changes, oldest first, chained by hash (`mcpcp_proto::audit`).
    #[serde(default)]
    pub audit: VecDeque<AuditEvent>,
    /// The sequence number of the last audit event.
    #[serde(default)]
    pub audit_seq: u64,
    /// The hash of the last audit event (empty before the first: the chain starts at
    /// `audit::GENESIS`).
    #[serde(default)]
    pub audit_head: String,
    /// How many events `audit` keeps (0: [`AUDIT_RETENTION`]).
    #[serde(default)]
    pub audit_retention: u64,
    /// Nodes assigned to run each server that has `replicas` set.
    #[serde(default)]
    pub placements: BTreeMap<String, Vec<u64>>,
    /// Key (hex) that signs MCP session ids.
    #[serde(default)]
    pub session_key: Option<String>,
    /// Mutable state of MCP sessions by session id.
    #[serde(default)]
    pub sessions: BTreeMap<String, SessionState>,
    /// Every node id that was ever a member, so that no id is used twice.
    pub node_ids_ever: BTreeSet<u64>,
    /// The fingerprint of the restore this cluster was made by (`mcpctl snapshot restore`):
    /// every member of one restore has the same, so members restored differently never form
    /// a cluster together (`crate::restore::hold_first_election`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_as: Option<String>,
    /// Join tokens not used yet, by token id.
    #[serde(default)]
    pub join_tokens: BTreeMap<String, JoinToken>,
    /// Uses of `mcpd recover-admin`, oldest first.
    #[serde(default)]
    pub recoveries: VecDeque<Recovery>,
    /// The approved tools of servers that have pins (by server name).
    #[serde(default)]
    pub tool_pins: BTreeMap<String, Versioned<ToolPins>>,
    /// The tool changes recorded since each pinned server's last approval: `server/tool` →
    /// the fingerprint seen.
    #[serde(default)]
    pub tool_changes: BTreeMap<String, String>,
    /// Commands approved for tenants' local servers, by name.
    #[serde(default)]
    pub approved_commands: BTreeMap<String, Versioned<ApprovedCommand>>,
    /// Virtual servers (`/v/NAME/mcp`) by name.
    #[serde(default)]
    pub virtual_servers: BTreeMap<String, Versioned<VirtualServerSpec>>,
    /// Rate limits and quotas on MCP calls, by name.
    #[serde(default)]
    pub limits: BTreeMap<String, Versioned<LimitSpec>>,
    /// What each quota budget used in its current period: `LIMIT/BUDGET` → (period, calls).
    #[serde(default)]
    pub quota_use: BTreeMap<String, (String, u64)>,
    /// Hourly usage aggregates, by [`usage_key`].
    #[serde(default)]
    pub usage: BTreeMap<String, UsageRow>,
    /// Outcomes of recent requests by request id, oldest first.
    pub recent: VecDeque<(String, CommandResult)>,
    /// The ids in `recent`, for a constant-time duplicate check (rebuilt from it on load).
    #[serde(skip)]
    pub recent_ids: HashSet<String>,
}

/// Hourly usage rows the state keeps at most (the oldest hours leave first).
pub const MAX_USAGE_ROWS: usize = 500_000;

/// Where a usage row is kept: its hour first (zero-padded, so that the oldest sort first),
/// then whose call to what.
pub fn usage_key(row: &UsageRow) -> String {
    format!(
        "{:012}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
        row.hour, row.tenant, row.subject, row.server, row.tool
    )
}

/// One object changed by an applied command, for persistence and watchers.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: ObjectKind,
    pub name: String,
    /// `None` when the object was deleted.
    pub present: bool,
}

impl State {
    /// Rebuilds indexes that snapshots do not carry.
    pub fn reindex(&mut self) {
        self.recent_ids = self.recent.iter().map(|(id, _)| id.clone()).collect();
    }

    /// Applies one request. Returns its outcome and the objects it changed (empty when it was
    /// refused or was a duplicate). An admin change's audit event gets its MAC from `key`.
    pub fn apply(&mut self, req: Request, key: &AuditKey) -> (CommandResult, Vec<Change>) {
        if self.recent_ids.contains(&req.request_id) {
            if let Some((_, outcome)) = self
                .recent
                .iter()
                .rev()
                .find(|(id, _)| *id == req.request_id)
            {
                return (outcome.clone(), Vec::new());
            }
        }
        let next = self.revision + 1;
        let summary = req.audit.as_ref().and_then(|_| req.command.audit_summary());
        let result = self.apply_command(req.command, next);
        let (result, changes) = match result {
            Ok(mut changes) => {
                self.revision = next;
                if let (Some(ctx), Some(summary)) = (req.audit, summary) {
                    changes.push(self.record(ctx, summary, next, key));
                }
                (Ok(Applied { revision: next }), changes)
            }
            Err(e) => (Err(e), Vec::new()),
        };
        self.recent_ids.insert(req.request_id.clone());
        self.recent.push_back((req.request_id, result.clone()));
        while self.recent.len() > DEDUP_WINDOW {
            if let Some((id, _)) = self.recent.pop_front() {
                self.recent_ids.remove(&id);
            }
        }
        (result, changes)
    }

    /// Drops the oldest audit events beyond the retention (`0`: [`AUDIT_RETENTION`]).
    fn trim_audit(&mut self) {
        let keep = match self.audit_retention {
            0 => AUDIT_RETENTION,
            n => n,
        };
        while self.audit.len() as u64 > keep {
            self.audit.pop_front();
        }
    }

    /// Refuses a reference to a tenant that does not exist.
    fn tenant_exists(&self, tenant: Option<&str>) -> Result<(), ApplyError> {
        match tenant {
            Some(t) if !self.tenants.contains_key(t) => Err(ApplyError::MissingReference {
                field: "tenant".into(),
                kind: ObjectKind::Tenant,
                name: t.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Appends the audit event of an applied change, chained to the one before and keyed with
    /// `key`, and drops the oldest beyond the retention.
    fn record(
        &mut self,
        ctx: AuditContext,
        summary: AuditSummary,
        revision: u64,
        key: &AuditKey,
    ) -> Change {
        self.audit_seq += 1;
        let prev_hash = if self.audit_head.is_empty() {
            audit::GENESIS.to_string()
        } else {
            self.audit_head.clone()
        };
        let mut event = AuditEvent {
            seq: self.audit_seq,
            at: ctx.at,
            actor: ctx.actor,
            from: ctx.from,
            kind: summary.kind.to_string(),
            object: summary.object,
            detail: summary.detail,
            revision,
            prev_hash,
            hash: String::new(),
            mac: None,
        };
        event.hash = event.digest();
        event.mac = Some(key.mac(&event.hash));
        self.audit_head = event.hash.clone();
        self.audit.push_back(event);
        self.trim_audit();
        Change {
            kind: ObjectKind::Audit,
            name: self.audit_seq.to_string(),
            present: true,
        }
    }

    fn apply_command(&mut self, cmd: Command, rev: u64) -> Result<Vec<Change>, ApplyError> {
        match cmd {
            Command::PutServer { spec, precondition } => {
                self.tenant_exists(spec.tenant.as_deref())?;
                let name = spec.name.clone();
                put(
                    &mut self.servers,
                    ObjectKind::Server,
                    name,
                    spec,
                    precondition,
                    rev,
                )
            }
            Command::DeleteServer { name, precondition } => {
                let mut changes = delete(
                    &mut self.servers,
                    ObjectKind::Server,
                    name.clone(),
                    precondition,
                )?;
                if self.placements.remove(&name).is_some() {
                    changes.push(Change {
                        kind: ObjectKind::Placement,
                        name: name.clone(),
                        present: false,
                    });
                }
                // A server added again under the name starts unapproved, not with old pins.
                self.forget_tool_changes(&name);
                if self.tool_pins.remove(&name).is_some() {
                    changes.push(Change {
                        kind: ObjectKind::ToolPins,
                        name,
                        present: false,
                    });
                }
                Ok(changes)
            }
            Command::SetSessionKey { key } => {
                if self.session_key.is_some() {
                    return Err(ApplyError::AlreadyExists {
                        kind: ObjectKind::Session,
                        name: "session key".into(),
                    });
                }
                self.session_key = Some(key);
                Ok(Vec::new())
            }
            Command::PutSessionState { id, state } => {
                // Expired states go whenever one is written: the table stays bounded.
                if let Some(now) = state
                    .as_ref()
                    .map(|s| s.expires_at.saturating_sub(SESSION_STATE_TTL))
                {
                    self.sessions.retain(|_, s| s.expires_at > now);
                }
                match state {
                    // An ended session stays ended: a late write of its state (a call that was
                    // still running, a coalesced replication) does not bring it back.
                    Some(st) if !st.ended && self.sessions.get(&id).is_some_and(|s| s.ended) => {}
                    Some(st) => {
                        self.sessions.insert(id.clone(), st);
                    }
                    None => {
                        self.sessions.remove(&id);
                    }
                }
                Ok(Vec::new())
            }
            Command::SetPlacement { server, nodes } => {
                if !self.servers.contains_key(&server) {
                    return Err(ApplyError::NotFound {
                        kind: ObjectKind::Server,
                        name: server,
                    });
                }
                self.placements.insert(server.clone(), nodes);
                Ok(vec![Change {
                    kind: ObjectKind::Placement,
                    name: server,
                    present: true,
                }])
            }
            Command::PutTenant { spec, precondition } => {
                let name = spec.name.clone();
                put(
                    &mut self.tenants,
                    ObjectKind::Tenant,
                    name,
                    spec,
                    precondition,
                    rev,
                )
            }
            Command::DeleteTenant { name, precondition } => {
                let servers = self
                    .servers
                    .values()
                    .filter(|s| s.spec.tenant.as_deref() == Some(name.as_str()))
                    .count();
                let tokens = self
                    .tokens
                    .values()
                    .filter(|t| t.info.tenant.as_deref() == Some(name.as_str()))
                    .count();
                let issuers = self
                    .issuers
                    .values()
                    .filter(|i| i.spec.tenant.as_deref() == Some(name.as_str()))
                    .count();
                let virtuals = self
                    .virtual_servers
                    .values()
                    .filter(|v| v.spec.tenant.as_deref() == Some(name.as_str()))
                    .count();
                if self.tenants.contains_key(&name)
                    && (servers > 0 || tokens > 0 || issuers > 0 || virtuals > 0)
                {
                    return Err(ApplyError::InUse {
                        kind: ObjectKind::Tenant,
                        name,
                        detail: format!(
                            "{servers} server(s), {virtuals} virtual server(s), {tokens} token(s) and {issuers} issuer(s) belong to it; remove them first"
                        ),
                    });
                }
                delete(&mut self.tenants, ObjectKind::Tenant, name, precondition)
            }
            Command::PutIssuer { spec, precondition } => {
                // One issuer per `iss`: which one a token is checked against must not depend
                // on the order of names.
                if let Some(other) = self
                    .issuers
                    .values()
                    .find(|i| i.spec.issuer == spec.issuer && i.spec.name != spec.name)
                {
                    return Err(ApplyError::InUse {
                        kind: ObjectKind::Issuer,
                        name: spec.name,
                        detail: format!(
                            "issuer {:?} already trusts {:?}",
                            other.spec.name, other.spec.issuer
                        ),
                    });
                }
                self.tenant_exists(spec.tenant.as_deref())?;
                let name = spec.name.clone();
                put(
                    &mut self.issuers,
                    ObjectKind::Issuer,
                    name,
                    spec,
                    precondition,
                    rev,
                )
            }
            Command::PutPolicy { spec, precondition } => {
                let name = spec.name.clone();
                let changes = put(
                    &mut self.policies,
                    ObjectKind::Policy,
                    name,
                    spec,
                    precondition,
                    rev,
                )?;
                self.policies_version += 1;
                Ok(changes)
            }
            Command::PutApprovedCommand { spec, precondition } => {
                let name = spec.name.clone();
                put(
                    &mut self.approved_commands,
                    ObjectKind::ApprovedCommand,
                    name,
                    spec,
                    precondition,
                    rev,
                )
            }
            Command::DeleteApprovedCommand { name, precondition } => delete(
                &mut self.approved_commands,
                ObjectKind::ApprovedCommand,
                name,
                precondition,
            ),
            Command::PutLimit { spec, precondition } => {
                let name = spec.name.clone();
                put(
                    &mut self.limits,
                    ObjectKind::Limit,
                    name,
                    spec,
                    precondition,
                    rev,
                )
            }
            Command::DeleteLimit { name, precondition } => {
                let changes = delete(
                    &mut self.limits,
                    ObjectKind::Limit,
                    name.clone(),
                    precondition,
                )?;
                let prefix = format!("{name}/");
                self.quota_use.retain(|k, _| !k.starts_with(&prefix));
                Ok(changes)
            }
            Command::AddUsage {
                rows,
                retention_hours,
            } => {
                let newest = rows.iter().map(|r| r.hour).max().unwrap_or_default();
                for row in rows {
                    self.usage
                        .entry(usage_key(&row))
                        .and_modify(|r| r.add(&row))
                        .or_insert(row);
                }
                let oldest = newest.saturating_sub(retention_hours.saturating_mul(3600));
                if self.usage.values().next().is_some_and(|r| r.hour < oldest) {
                    self.usage.retain(|_, r| r.hour >= oldest);
                }
                while self.usage.len() > MAX_USAGE_ROWS {
                    self.usage.pop_first();
                }
                Ok(Vec::new())
            }
            Command::ConsumeQuota {
                bucket,
                period,
                calls,
                max,
            } => {
                let limit = bucket.split('/').next().unwrap_or_default();
                if !self.limits.contains_key(limit) {
                    return Err(ApplyError::NotFound {
                        kind: ObjectKind::Limit,
                        name: limit.to_string(),
                    });
                }
                // Periods only move forward: a node whose clock is behind counts into the
                // period the state is in (plain string order is time order for `YYYY-MM-DD`
                // and `YYYY-MM`).
                let (period, used) = match self.quota_use.get(&bucket) {
                    Some((p, used)) if *p >= period => (p.clone(), *used),
                    _ => (period, 0),
                };
                if used.saturating_add(calls) > max {
                    return Err(ApplyError::QuotaExhausted {
                        bucket,
                        period,
                        used,
                        max,
                    });
                }
                if used == 0 {
                    // A new period: the limit's budgets still in older ones are done with.
                    let prefix = format!("{limit}/");
                    let limit_period = period.clone();
                    self.quota_use
                        .retain(|k, (p, _)| !k.starts_with(&prefix) || *p >= limit_period);
                }
                self.quota_use.insert(bucket, (period, used + calls));
                Ok(Vec::new())
            }
            Command::PutVirtualServer { spec, precondition } => {
                self.tenant_exists(spec.tenant.as_deref())?;
                let name = spec.name.clone();
                put(
                    &mut self.virtual_servers,
                    ObjectKind::VirtualServer,
                    name,
                    spec,
                    precondition,
                    rev,
                )
            }
            Command::DeleteVirtualServer { name, precondition } => delete(
                &mut self.virtual_servers,
                ObjectKind::VirtualServer,
                name,
                precondition,
            ),
            Command::PutToolPins {
                server,
                pins,
                precondition,
            } => {
                if !self.servers.contains_key(&server) {
                    return Err(ApplyError::NotFound {
                        kind: ObjectKind::Server,
                        name: server,
                    });
                }
                let changes = put(
                    &mut self.tool_pins,
                    ObjectKind::ToolPins,
                    server.clone(),
                    pins,
                    precondition,
                    rev,
                )?;
                self.forget_tool_changes(&server);
                Ok(changes)
            }
            Command::DeleteToolPins {
                server,
                precondition,
            } => {
                let changes = delete(
                    &mut self.tool_pins,
                    ObjectKind::ToolPins,
                    server.clone(),
                    precondition,
                )?;
                self.forget_tool_changes(&server);
                Ok(changes)
            }
            Command::NoteToolChange {
                server,
                tool,
                fingerprint,
                ..
            } => {
                if !self.tool_pins.contains_key(&server) {
                    return Err(ApplyError::NotFound {
                        kind: ObjectKind::ToolPins,
                        name: server,
                    });
                }
                let key = format!("{server}/{tool}");
                if self.tool_changes.get(&key) == Some(&fingerprint) {
                    return Err(ApplyError::AlreadyExists {
                        kind: ObjectKind::ToolPins,
                        name: key,
                    });
                }
                // A server that invents tools at every list cannot grow the state or the trail
                // past a bound until its next approval.
                let prefix = format!("{server}/");
                let noted = self
                    .tool_changes
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .count();
                if !self.tool_changes.contains_key(&key) && noted >= TOOL_CHANGES_NOTED {
                    return Err(ApplyError::InUse {
                        kind: ObjectKind::ToolPins,
                        name: server,
                        detail: format!("{TOOL_CHANGES_NOTED} tool changes are recorded already; approve or unpin"),
                    });
                }
                self.tool_changes.insert(key, fingerprint);
                Ok(Vec::new())
            }
            Command::DeletePolicy { name, precondition } => {
                let changes = delete(&mut self.policies, ObjectKind::Policy, name, precondition)?;
                self.policies_version += 1;
                Ok(changes)
            }
            Command::DeleteIssuer { name, precondition } => {
                delete(&mut self.issuers, ObjectKind::Issuer, name, precondition)
            }
            Command::Bootstrap {
                info,
                hash,
                session_key,
            } => {
                if self.session_key.is_some() {
                    return Err(ApplyError::AlreadyInitialized);
                }
                // The token first: when it is refused, nothing of the bootstrap was applied.
                let changes = self.apply_command(Command::CreateToken { info, hash }, rev)?;
                self.session_key = Some(session_key);
                Ok(changes)
            }
            Command::CreateJoinToken { id, token, now } => {
                if self.node_ids_ever.contains(&token.node) {
                    return Err(ApplyError::InUse {
                        kind: ObjectKind::Token,
                        name: id,
                        detail: format!(
                            "node id {} was a member before; ids are never reused",
                            token.node
                        ),
                    });
                }
                self.join_tokens.retain(|_, t| t.expires_at > now);
                if self.join_tokens.len() >= JOIN_TOKENS_KEPT {
                    return Err(ApplyError::InUse {
                        kind: ObjectKind::Token,
                        name: id,
                        detail: format!("{JOIN_TOKENS_KEPT} join tokens are waiting already"),
                    });
                }
                self.join_tokens.insert(id, token);
                Ok(Vec::new())
            }
            Command::RedeemJoinToken { id } => match self.join_tokens.remove(&id) {
                Some(used) => {
                    // One node joins per id: its other tokens go too.
                    self.join_tokens.retain(|_, t| t.node != used.node);
                    Ok(Vec::new())
                }
                None => Err(ApplyError::NotFound {
                    kind: ObjectKind::Token,
                    name: id,
                }),
            },
            Command::RecoverAdmin { info, hash, node } => {
                let recovery = Recovery {
                    at: info.created_at,
                    node,
                    token_id: info.id.clone(),
                };
                let changes = self.apply_command(Command::CreateToken { info, hash }, rev)?;
                self.recoveries.push_back(recovery);
                while self.recoveries.len() > RECOVERIES_KEPT {
                    self.recoveries.pop_front();
                }
                Ok(changes)
            }
            Command::ChangeMembership { .. } => Ok(Vec::new()),
            Command::SetAuditRetention { events } => {
                self.audit_retention = events;
                self.trim_audit();
                Ok(Vec::new())
            }
            Command::TouchTokens { used } => {
                for (id, at) in used {
                    if let Some(t) = self.tokens.get_mut(&id) {
                        t.info.last_used_at = Some(t.info.last_used_at.map_or(at, |l| l.max(at)));
                    }
                }
                // Not an object change worth waking watchers for.
                Ok(Vec::new())
            }
            Command::CreateToken { info, hash } => {
                if let Some(t) = &info.tenant {
                    if !self.tenants.contains_key(t) {
                        return Err(ApplyError::MissingReference {
                            field: "tenant".into(),
                            kind: ObjectKind::Tenant,
                            name: t.clone(),
                        });
                    }
                }
                if self.tokens.contains_key(&info.id) {
                    return Err(ApplyError::AlreadyExists {
                        kind: ObjectKind::Token,
                        name: info.id,
                    });
                }
                let id = info.id.clone();
                self.tokens.insert(
                    id.clone(),
                    StoredToken {
                        info,
                        hash,
                        revision: rev,
                    },
                );
                Ok(vec![Change {
                    kind: ObjectKind::Token,
                    name: id,
                    present: true,
                }])
            }
            Command::RevokeToken { id }
                if self
                    .tokens
                    .get(&id)
                    .is_some_and(|t| t.info.role == Role::ClusterAdmin)
                    && self
                        .tokens
                        .values()
                        .filter(|t| t.info.role == Role::ClusterAdmin)
                        .count()
                        == 1 =>
            {
                Err(ApplyError::InUse {
                    kind: ObjectKind::Token,
                    name: id,
                    detail:
                        "it is the cluster's last admin token; create another admin token first"
                            .into(),
                })
            }
            Command::RevokeToken { id } => match self.tokens.remove(&id) {
                Some(_) => Ok(vec![Change {
                    kind: ObjectKind::Token,
                    name: id,
                    present: false,
                }]),
                None => Err(ApplyError::NotFound {
                    kind: ObjectKind::Token,
                    name: id,
                }),
            },
        }
    }

    /// Drops the tool changes recorded of `server` (approved, unpinned or removed).
    fn forget_tool_changes(&mut self, server: &str) {
        let prefix = format!("{server}/");
        self.tool_changes.retain(|k, _| !k.starts_with(&prefix));
    }

    /// The watch event describing `change` in the current state.
    pub fn event_for(&self, change: &Change) -> WatchEvent {
        let value = if change.present {
            match change.kind {
                // Watchers learn env names, never values (sealed or not).
                ObjectKind::Server => self
                    .servers
                    .get(&change.name)
                    .and_then(|v| serde_json::to_value(v.redacted()).ok()),
                ObjectKind::Tenant => self
                    .tenants
                    .get(&change.name)
                    .and_then(|v| serde_json::to_value(v).ok()),
                // Watchers learn token metadata, never hashes.
                ObjectKind::Token => self
                    .tokens
                    .get(&change.name)
                    .and_then(|t| serde_json::to_value(&t.info).ok()),
                ObjectKind::Issuer => self
                    .issuers
                    .get(&change.name)
                    .and_then(|v| serde_json::to_value(v).ok()),
                ObjectKind::ToolPins => self
                    .tool_pins
                    .get(&change.name)
                    .and_then(|v| serde_json::to_value(v).ok()),
                ObjectKind::VirtualServer => self
                    .virtual_servers
                    .get(&change.name)
                    .and_then(|v| serde_json::to_value(v).ok()),
                ObjectKind::ApprovedCommand => self
                    .approved_commands
                    .get(&change.name)
                    .and_then(|v| serde_json::to_value(v).ok()),
                ObjectKind::Limit => self
                    .limits
                    .get(&change.name)
                    .and_then(|v| serde_json::to_value(v).ok()),
                ObjectKind::Policy => self
                    .policies
                    .get(&change.name)
                    .and_then(|v| serde_json::to_value(v).ok()),
                ObjectKind::Audit => change
                    .name
                    .parse::<u64>()
                    .ok()
                    .and_then(|seq| self.audit.iter().rev().find(|e| e.seq == seq))
                    .and_then(|e| serde_json::to_value(e).ok()),
                ObjectKind::Placement => self
                    .placements
                    .get(&change.name)
                    .and_then(|n| serde_json::to_value(n).ok()),
                ObjectKind::Session => None,
            }
        } else {
            None
        };
        match value {
            Some(value) => WatchEvent::Put {
                revision: self.revision,
                kind: change.kind,
                name: change.name.clone(),
                value,
            },
            None => WatchEvent::Delete {
                revision: self.revision,
                kind: change.kind,
                name: change.name.clone(),
            },
        }
    }
}

fn put<T>(
    map: &mut BTreeMap<String, Versioned<T>>,
    kind: ObjectKind,
    name: String,
    spec: T,
    precondition: Precondition,
    rev: u64,
) -> Result<Vec<Change>, ApplyError> {
    let current = map.get(&name);
    let created_revision = match (precondition, current) {
        (Precondition::Absent, Some(_)) => return Err(ApplyError::AlreadyExists { kind, name }),
        (Precondition::Revision(expected), cur) if cur.map(|c| c.revision) != Some(expected) => {
            return Err(ApplyError::RevisionMismatch {
                kind,
                name,
                expected,
                actual: cur.map(|c| c.revision),
            })
        }
        (_, Some(cur)) => cur.created_revision,
        (_, None) => rev,
    };
    map.insert(
        name.clone(),
        Versioned {
            revision: rev,
            created_revision,
            spec,
        },
    );
    Ok(vec![Change {
        kind,
        name,
        present: true,
    }])
}

fn delete<T>(
    map: &mut BTreeMap<String, Versioned<T>>,
    kind: ObjectKind,
    name: String,
    precondition: Precondition,
) -> Result<Vec<Change>, ApplyError> {
    let Some(current) = map.get(&name) else {
        return Err(ApplyError::NotFound { kind, name });
    };
    if let Precondition::Revision(expected) = precondition {
        if current.revision != expected {
            return Err(ApplyError::RevisionMismatch {
                kind,
                name,
                expected,
                actual: Some(current.revision),
            });
        }
    }
    map.remove(&name);
    Ok(vec![Change {
        kind,
        name,
        present: false,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit key of a cluster whose data key is all sevens.
    fn key() -> AuditKey {
        AuditKey::derive(&[7; 32])
    }

    fn server(name: &str, tenant: Option<&str>) -> ServerSpec {
        let mut s: ServerSpec =
            serde_json::from_value(serde_json::json!({"name": name, "command": "true"}))
                .expect("minimal spec");
        s.tenant = tenant.map(String::from);
        s
    }

    fn req(id: &str, command: Command) -> Request {
        Request {
            request_id: id.into(),
            command,
            audit: None,
        }
    }

    fn audited(id: &str, command: Command) -> Request {
        Request {
            audit: Some(AuditContext::system("test", Some("10.0.0.9:4000".into()))),
            ..req(id, command)
        }
    }

    #[test]
    fn admin_changes_leave_a_chained_audit_trail_without_secrets() {
        let mut s = State::default();
        let mut spec = server("db", None);
        spec.env.insert("PASSWORD".into(), "hunter2".into());
        let put = Command::PutServer {
            spec,
            precondition: Precondition::None,
        };
        assert!(s.apply(audited("a", put), &key()).0.is_ok());
        let placement = Command::SetPlacement {
            server: "db".into(),
            nodes: vec![1],
        };
        assert!(s.apply(audited("b", placement), &key()).0.is_ok());
        let (res, changes) = s.apply(
            audited(
                "c",
                Command::DeleteServer {
                    name: "db".into(),
                    precondition: Precondition::None,
                },
            ),
            &key(),
        );
        assert!(res.is_ok());
        assert!(changes
            .iter()
            .any(|c| c.kind == ObjectKind::Audit && c.name == "2"));
        let refused = Command::DeleteServer {
            name: "db".into(),
            precondition: Precondition::Revision(1),
        };
        assert!(s.apply(audited("d", refused), &key()).0.is_err());
        let kinds: Vec<&str> = s.audit.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["put_server", "delete_server"],
            "node commands and refusals leave none"
        );
        assert_eq!(
            audit::verify(&s.audit.iter().cloned().collect::<Vec<_>>()),
            Ok(())
        );
        assert_eq!(s.audit[0].prev_hash, audit::GENESIS);
        assert_eq!(s.audit_head, s.audit[1].hash);
        let trail: Vec<_> = s.audit.iter().cloned().collect();
        let keyed = audit::verify_macs(&trail, |e| key().checks(e), Default::default());
        assert_eq!(keyed.map(|r| r.keyed), Ok(2), "each event is keyed");
        let other = AuditKey::derive(&[8; 32]);
        assert_eq!(
            audit::verify_macs(&trail, |e| other.checks(e), Default::default()),
            Err(audit::ChainError::BadMac { seq: 1 }),
            "another cluster's key does not check them"
        );
        assert_eq!(s.audit[0].from.as_deref(), Some("10.0.0.9:4000"));
        let text = serde_json::to_string(&s.audit).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn the_audit_trail_keeps_its_retention_and_its_chain_head() {
        let mut s = State::default();
        let retention = Command::SetAuditRetention { events: 2 };
        assert!(s.apply(audited("r", retention), &key()).0.is_ok());
        for i in 0..5 {
            let t = Command::PutTenant {
                spec: TenantSpec {
                    name: format!("t{i}"),
                    description: None,
                    weight: 1,
                },
                precondition: Precondition::None,
            };
            assert!(s.apply(audited(&format!("t{i}"), t), &key()).0.is_ok());
        }
        let seqs: Vec<u64> = s.audit.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [5, 6]);
        assert_eq!(
            audit::verify(&s.audit.iter().cloned().collect::<Vec<_>>()),
            Ok(())
        );
        assert_eq!(s.audit_head, s.audit[1].hash);
    }

    fn put_server(id: &str, name: &str, pre: Precondition) -> Request {
        req(
            id,
            Command::PutServer {
                spec: server(name, None),
                precondition: pre,
            },
        )
    }

    #[test]
    fn revisions_count_successful_commands() {
        let mut st = State::default();
        let (r, ch) = st.apply(put_server("1", "a", Precondition::Absent), &key());
        assert_eq!(r, Ok(Applied { revision: 1 }));
        assert_eq!(ch.len(), 1);
        let (r, ch) = st.apply(put_server("2", "a", Precondition::Absent), &key());
        assert!(matches!(r, Err(ApplyError::AlreadyExists { .. })));
        assert!(ch.is_empty());
        assert_eq!(st.revision, 1);
        let (r, _) = st.apply(put_server("3", "a", Precondition::None), &key());
        assert_eq!(r, Ok(Applied { revision: 2 }));
        let s = &st.servers["a"];
        assert_eq!((s.created_revision, s.revision), (1, 2));
    }

    #[test]
    fn compare_and_set_needs_the_current_revision() {
        let mut st = State::default();
        let _ = st.apply(put_server("1", "a", Precondition::None), &key());
        let (r, _) = st.apply(put_server("2", "a", Precondition::Revision(7)), &key());
        assert_eq!(
            r,
            Err(ApplyError::RevisionMismatch {
                kind: ObjectKind::Server,
                name: "a".into(),
                expected: 7,
                actual: Some(1)
            })
        );
        let (r, _) = st.apply(put_server("3", "a", Precondition::Revision(1)), &key());
        assert_eq!(r, Ok(Applied { revision: 2 }));
        let (r, _) = st.apply(put_server("4", "b", Precondition::Revision(1)), &key());
        assert!(matches!(
            r,
            Err(ApplyError::RevisionMismatch { actual: None, .. })
        ));
    }

    #[test]
    fn a_repeated_request_id_is_applied_once() {
        let mut st = State::default();
        let first = st
            .apply(put_server("same", "a", Precondition::Absent), &key())
            .0;
        let again = st.apply(put_server("same", "a", Precondition::Absent), &key());
        assert_eq!(first, again.0);
        assert!(again.1.is_empty());
        assert_eq!(st.revision, 1);
    }

    #[test]
    fn dedup_window_is_bounded() {
        let mut st = State::default();
        for i in 0..DEDUP_WINDOW + 5 {
            let _ = st.apply(
                req(&i.to_string(), Command::RevokeToken { id: "x".into() }),
                &key(),
            );
        }
        assert_eq!(st.recent.len(), DEDUP_WINDOW);
    }

    #[test]
    fn tenant_references_are_enforced() {
        let mut st = State::default();
        let (r, _) = st.apply(
            req(
                "1",
                Command::PutServer {
                    spec: server("s", Some("acme")),
                    precondition: Precondition::None,
                },
            ),
            &key(),
        );
        assert!(
            matches!(r, Err(ApplyError::MissingReference { ref field, .. }) if field == "tenant")
        );
        let _ = st.apply(
            req(
                "2",
                Command::PutTenant {
                    spec: TenantSpec {
                        name: "acme".into(),
                        description: None,
                        weight: 1,
                    },
                    precondition: Precondition::Absent,
                },
            ),
            &key(),
        );
        let (r, _) = st.apply(
            req(
                "3",
                Command::PutServer {
                    spec: server("s", Some("acme")),
                    precondition: Precondition::None,
                },
            ),
            &key(),
        );
        assert!(r.is_ok());
        let (r, _) = st.apply(
            req(
                "4",
                Command::DeleteTenant {
                    name: "acme".into(),
                    precondition: Precondition::None,
                },
            ),
            &key(),
        );
        assert!(matches!(r, Err(ApplyError::InUse { .. })));
        let _ = st.apply(
            req(
                "5",
                Command::DeleteServer {
                    name: "s".into(),
                    precondition: Precondition::None,
                },
            ),
            &key(),
        );
        let (r, ch) = st.apply(
            req(
                "6",
                Command::DeleteTenant {
                    name: "acme".into(),
                    precondition: Precondition::None,
                },
            ),
            &key(),
        );
        assert!(r.is_ok());
        assert_eq!(
            ch,
            vec![Change {
                kind: ObjectKind::Tenant,
                name: "acme".into(),
                present: false
            }]
        );
    }

    #[test]
    fn tokens_are_created_once_and_revoked() {
        let mut st = State::default();
        let info = TokenInfo {
            id: "abc".into(),
            name: "ci".into(),
            role: Role::ClusterAdmin,
            tenant: None,
            created_at: 1,
            expires_at: None,
            scopes: None,
            last_used_at: None,
        };
        let create = |id: &str| {
            req(
                id,
                Command::CreateToken {
                    info: info.clone(),
                    hash: "h".into(),
                },
            )
        };
        assert!(st.apply(create("1"), &key()).0.is_ok());
        assert!(matches!(
            st.apply(create("2"), &key()).0,
            Err(ApplyError::AlreadyExists { .. })
        ));
        let ev = st.event_for(&Change {
            kind: ObjectKind::Token,
            name: "abc".into(),
            present: true,
        });
        let text = serde_json::to_string(&ev).expect("serialises");
        assert!(!text.contains("\"h\""), "watch events never carry hashes");
        // The last admin token cannot be revoked; with another one it can.
        assert!(matches!(
            st.apply(req("3", Command::RevokeToken { id: "abc".into() }), &key())
                .0,
            Err(ApplyError::InUse { .. })
        ));
        let mut second = info.clone();
        second.id = "def".into();
        let create_second = Command::CreateToken {
            info: second,
            hash: "h2".into(),
        };
        assert!(st.apply(req("4", create_second), &key()).0.is_ok());
        assert!(st
            .apply(req("5", Command::RevokeToken { id: "abc".into() }), &key())
            .0
            .is_ok());
        assert_eq!(st.tokens.keys().collect::<Vec<_>>(), ["def"]);
    }

    #[test]
    fn a_cluster_is_bootstrapped_once() {
        let mut st = State::default();
        let bootstrap = |id: &str| {
            let info = TokenInfo {
                id: id.into(),
                name: "bootstrap-admin".into(),
                role: Role::ClusterAdmin,
                tenant: None,
                created_at: 1,
                expires_at: None,
                scopes: None,
                last_used_at: None,
            };
            req(
                id,
                Command::Bootstrap {
                    info,
                    hash: "h".into(),
                    session_key: "k".into(),
                },
            )
        };
        assert!(st.apply(bootstrap("first"), &key()).0.is_ok());
        assert_eq!(st.session_key.as_deref(), Some("k"));
        // Whatever tokens exist (here: none), a second bootstrap is refused.
        st.tokens.clear();
        assert!(matches!(
            st.apply(bootstrap("second"), &key()).0,
            Err(ApplyError::AlreadyInitialized)
        ));
        assert!(st.tokens.is_empty());
    }
}
