//! The registry as the rest of the node sees it: write a command, read the applied state
//! (linearizable or stale), watch changes, and change membership, without caring which node
//! leads. A follower forwards writes, read barriers and membership changes to the leader over
//! gRPC (the first two on one shared stream, [`forward`]); every wait is bounded by the
//! configured quorum wait, after which the caller gets [`RegistryError::NoQuorum`] instead of
//! a hang.
//!
//! Writes carry a request id, and the state machine remembers recent ids, so a write whose
//! answer was lost (leader change, timeout, dropped connection) is re-sent without running
//! twice.

pub mod audit;
pub mod formats;
pub mod forward;
pub mod join_token;
pub mod lease;
pub mod propose;
pub mod state;
pub mod token;
pub mod token_use;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLockReadGuard;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use mcpcp_proto::api::{Member, Role, TokenInfo};
use mcpcp_proto::cluster::cluster_client::ClusterClient;
use mcpcp_proto::cluster::{MembershipRequest, PingReply, PingRequest};
use openraft::error::RaftError;
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};

use crate::raft::network::PeerChannels;
use crate::raft::state_machine::{SmData, StateMachineStore, Subscription};
use crate::raft::typ::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, LogId};
use crate::raft::Raft;
use crate::telemetry::InSpanExt;
use state::{Applied, ApplyError, Command, Request};
use validate::FieldError;

/// Why a registry operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("invalid {0}")]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// A credential that is not a bearer token (a join token) was refused.
    #[error("{0}")]
    Forbidden(String),
    /// No leader could commit (or confirm leadership for a read) within the bound.
    #[error("quorum lost: no leader could {what} within {waited:?}")]
    NoQuorum {
        waited: Duration,
        what: &'static str,
        /// For writes: the command may still be applied later.
        maybe_applied: bool,
    },
    #[error("this node is not part of an initialised cluster")]
    NotInitialized,
    /// A member does not apply the command's format yet (`formats`).
    #[error("{0}")]
    UpgradeInProgress(String),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

/// Errors that travel between nodes on the forwarding RPCs.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    #[error("node {node} is not the leader")]
    NotLeader { node: u64 },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("quorum lost: {0}")]
    NoQuorum(String),
    #[error("{0}")]
    Raft(String),
    #[error("{0}")]
    UpgradeInProgress(String),
}

impl From<ForwardError> for RegistryError {
    fn from(e: ForwardError) -> Self {
        match e {
            ForwardError::Invalid { field, message } => {
                RegistryError::Invalid(FieldError { field, message })
            }
            ForwardError::Conflict(m) => RegistryError::Conflict(m),
            ForwardError::NotFound(m) => RegistryError::NotFound(m),
            ForwardError::UpgradeInProgress(m) => RegistryError::UpgradeInProgress(m),
            other => RegistryError::Internal(other.to_string()),
        }
    }
}

pub use state::MembershipChange;

/// Who a bearer token belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// An API token's id, or `jwt:ISSUER:SUBJECT` for a JWT caller (stable across the
    /// caller's token refreshes, so its sessions and idempotency keys survive them).
    pub token_id: String,
    pub role: Role,
    pub tenant: Option<String>,
    /// The scopes its credential is narrowed to (a JWT's `scope`, an API token's `scopes`);
    /// `None`: every scope of its role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// A JWT caller's groups (its issuer's groups claim), for policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// A caller that came with a trusted issuer's JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Box<JwtCaller>>,
}

/// What a verified JWT said about its caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtCaller {
    /// The registry name of the issuer.
    pub issuer: String,
    pub subject: String,
    /// Unix seconds (`exp`).
    pub expires_at: u64,
}

impl JwtCaller {
    /// The qualified id of a JWT caller, `jwt:ISSUER:SUBJECT` (its `Principal::token_id`).
    pub fn id(issuer: &str, subject: &str) -> String {
        format!("jwt:{issuer}:{subject}")
    }

    /// Whether `token_id` is this caller's qualified id.
    pub fn names(&self, token_id: &str) -> bool {
        token_id
            .strip_prefix("jwt:")
            .and_then(|r| r.strip_prefix(self.issuer.as_str()))
            .and_then(|r| r.strip_prefix(':'))
            == Some(self.subject.as_str())
    }
}

impl Principal {
    /// Whether this caller may use server `spec`: a global server, or one of its own tenant's.
    pub fn may_use(&self, spec: &mcpcp_proto::api::ServerSpec) -> bool {
        self.may_use_servers_of(spec.tenant.as_deref())
    }

    /// Whether this caller may use the servers of `tenant` (`None`: the global ones).
    pub fn may_use_servers_of(&self, tenant: Option<&str>) -> bool {
        match self.role {
            Role::ClusterAdmin => true,
            Role::TenantAdmin | Role::User => tenant.is_none() || tenant == self.tenant.as_deref(),
            Role::Operator | Role::Viewer | Role::Metrics => false,
        }
    }

    /// Whether the caller's credential carries `scope`: a JWT the ones it lists, an API token
    /// the ones it was narrowed to, or else every scope of its role.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes
            .as_ref()
            .is_none_or(|s| s.iter().any(|s| s == scope))
    }

    /// Whether a tenant-scoped caller may touch an object of `tenant` (`None`: global). A
    /// caller of no tenant (cluster-wide roles) may; the surface's role list decides the rest.
    pub fn owns(&self, tenant: Option<&str>) -> bool {
        !self.role.is_tenant_scoped() || (tenant.is_some() && tenant == self.tenant.as_deref())
    }

    /// Whether a tenant-scoped caller may see an object of `tenant`: its own and global ones.
    pub fn sees(&self, tenant: Option<&str>) -> bool {
        tenant.is_none() || self.owns(tenant)
    }
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh request id for a write.
pub fn new_request_id() -> String {
    let mut b = [0u8; 16];
    // A failed random source would only weaken de-duplication of retries; fall back to time.
    if getrandom::fill(&mut b).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = nanos.to_le_bytes();
    }
    hex::encode(b)
}

/// The registry handle of a node. Cheap to clone: one `Arc` (every MCP request clones it).
#[derive(Clone)]
pub struct Registry(std::sync::Arc<Handle>);

impl std::ops::Deref for Registry {
    type Target = Handle;

    fn deref(&self) -> &Handle {
        &self.0
    }
}

/// What a [`Registry`] holds.
pub struct Handle {
    pub id: u64,
    /// This run of the node: when it started, in ms since the epoch. A node's holds on its
    /// peers' servers carry it (`crate::call::Holder`).
    pub run: u64,
    pub me: Member,
    pub raft: Raft,
    proposer: propose::Proposer,
    sm: StateMachineStore,
    channels: PeerChannels,
    forwarders: forward::Forwarders,
    quorum_wait: Duration,
    membership_wait: Duration,
    /// API tokens this node authenticated, until reported (`token_use`).
    uses: std::sync::Arc<token_use::TokenUses>,
    /// The rate limits' buckets, used while this node leads (`lease::rate`).
    rate_buckets: std::sync::Arc<lease::rate::Buckets>,
    /// The concurrency limits' holdings, used while this node leads (`lease::slots`).
    slot_holdings: std::sync::Arc<lease::slots::Holdings>,
    /// The last time this node, leading, asked its quorum before a lease (`lease::quorum`).
    lease_confirmations: lease::quorum::Confirmations,
    /// The command formats members apply, as their pings say (`formats`).
    formats: std::sync::Arc<formats::MemberFormats>,
}

fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_millis(300))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Registry {
    pub fn new(
        me: Member,
        raft: Raft,
        sm: StateMachineStore,
        channels: PeerChannels,
        quorum_wait: Duration,
    ) -> Self {
        // Never 0, which on the wire means a node before runs (a clock before 1970 counts as 1).
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| (d.as_millis() as u64).max(1));
        Registry(std::sync::Arc::new(Handle {
            id: me.id,
            run,
            me,
            proposer: propose::Proposer::start(raft.clone()),
            raft,
            sm,
            forwarders: forward::Forwarders::new(channels.clone()),
            channels,
            quorum_wait,
            membership_wait: Duration::from_secs(60).max(quorum_wait),
            uses: std::sync::Arc::default(),
            rate_buckets: std::sync::Arc::default(),
            slot_holdings: std::sync::Arc::default(),
            lease_confirmations: lease::quorum::Confirmations::default(),
            formats: std::sync::Arc::default(),
        }))
    }

    /// Every member (voters and learners) of the current membership.
    pub fn members(&self) -> Vec<Member> {
        self.raft
            .server_metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(_, m)| m.clone())
            .collect()
    }

    pub fn quorum_wait(&self) -> Duration {
        self.quorum_wait
    }

    /// The applied state as this node has it (a stale read). Never hold across an `.await`.
    pub fn local(&self) -> RwLockReadGuard<'_, SmData> {
        self.sm.read()
    }

    /// Changes after `since`, then live.
    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        self.sm.subscribe(since)
    }

    fn cluster_client(
        &self,
        leader: &Member,
    ) -> Result<ClusterClient<tonic::transport::Channel>, String> {
        self.channels
            .get(&leader.grpc_addr)
            .map(ClusterClient::new)
            .map_err(|e| e.to_string())
    }

    /// Completes once this node no longer sees `leader` as the leader (an election started or
    /// ended): a request forwarded to it may never be answered.
    ///
    /// It watches openraft's server metrics, which change only with the vote, the role, the
    /// leader or the membership: the full metrics change with every entry, and would wake a
    /// forwarded write's task several times per write.
    async fn leader_changed_from(&self, leader: u64) {
        let mut rx = self.raft.server_metrics();
        loop {
            if rx.borrow_and_update().current_leader != Some(leader) {
                return;
            }
            if rx.changed().await.is_err() {
                // Raft stopped: the caller's own deadline ends the wait.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Where to forward a write when the metrics already name another node as the leader.
    fn known_other_leader(&self) -> Option<ForwardToLeader> {
        let m = self.raft.server_metrics();
        let m = m.borrow();
        let leader = m.current_leader.filter(|l| *l != self.id)?;
        let node = m.membership_config.membership().get_node(&leader).cloned();
        Some(ForwardToLeader {
            leader_id: Some(leader),
            leader_node: node,
        })
    }

    fn leader_member(&self, f: &ForwardToLeader) -> Option<Member> {
        if let Some(n) = &f.leader_node {
            return Some(n.clone());
        }
        let id = f.leader_id?;
        self.raft
            .server_metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// Proposes `command` and waits for it to be applied, forwarding to the leader when this
    /// node is not it.
    pub async fn write(&self, command: Command) -> Result<Applied, RegistryError> {
        self.write_request(Request {
            request_id: new_request_id(),
            command,
            audit: None,
        })
        .await
    }

    /// Writes an admin command, recorded in the audit trail as `ctx` asked for it.
    pub async fn write_audited(
        &self,
        command: Command,
        ctx: state::AuditContext,
    ) -> Result<Applied, RegistryError> {
        self.write_request(Request {
            request_id: new_request_id(),
            command,
            audit: Some(ctx),
        })
        .await
    }

    /// Like [`Registry::write`], with the caller's request id (an `Idempotency-Key`).
    pub async fn write_request(&self, req: Request) -> Result<Applied, RegistryError> {
        let started = Instant::now();
        let label = req.command.label();
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            parent: crate::telemetry::parent(),
            "registry.write",
            op = label,
            node = self.id,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let result = self.write_inner(req, started).in_span(span.clone()).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(RegistryError::Apply(_)) => "rejected",
            Err(RegistryError::NoQuorum { .. }) => "no_quorum",
            Err(_) => "error",
        };
        metrics::histogram!("mcpd_registry_write_seconds", "op" => label, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        if matches!(result, Err(RegistryError::NoQuorum { .. })) {
            metrics::counter!("mcpd_registry_failed_proposals_total", "reason" => "no_quorum")
                .increment(1);
        }
        if result.is_err() {
            crate::telemetry::failed(&span, outcome);
        }
        result
    }

    async fn write_inner(&self, req: Request, started: Instant) -> Result<Applied, RegistryError> {
        let deadline = started + self.quorum_wait;
        let no_quorum = || RegistryError::NoQuorum {
            waited: started.elapsed(),
            what: "commit the write",
            maybe_applied: true,
        };
        let mut delays = retry_delays();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(no_quorum());
            }
            // A node that knows another node leads forwards at once; otherwise it proposes,
            // and Raft says where the leader is if it is not this node.
            let forward = match self.known_other_leader() {
                Some(f) => f,
                None => {
                    self.admit_format(&req.command)
                        .await
                        .map_err(RegistryError::UpgradeInProgress)?;
                    let attempt =
                        tokio::time::timeout(remaining, self.proposer.propose(req.clone())).await;
                    match attempt {
                        Err(_) => return Err(no_quorum()),
                        Ok(Err(propose::Stopped)) => return Err(RegistryError::ShuttingDown),
                        Ok(Ok(Ok(result))) => return result.map_err(RegistryError::Apply),
                        Ok(Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))))) => f,
                        Ok(Ok(Err(RaftError::APIError(
                            ClientWriteError::ChangeMembershipError(e),
                        )))) => return Err(RegistryError::Internal(e.to_string())),
                        Ok(Ok(Err(RaftError::Fatal(_)))) => {
                            return Err(RegistryError::ShuttingDown)
                        }
                    }
                }
            };
            if let Some(leader) = self.leader_member(&forward).filter(|l| l.id != self.id) {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let forwarded = tokio::select! {
                    r = tokio::time::timeout(remaining, self.forward_write(&leader, &req)) => r,
                    // A leader that was deposed (paused, partitioned) may never answer: send
                    // the write again to the next one. The request id makes that safe.
                    _ = self.leader_changed_from(leader.id) => {
                        tracing::debug!(old_leader = leader.id, "leader changed while a write was forwarded; sending it again");
                        continue;
                    }
                };
                match forwarded {
                    Err(_) => return Err(no_quorum()),
                    Ok(Ok(Ok(result))) => {
                        metrics::counter!("mcpd_registry_forwarded_writes_total").increment(1);
                        return result.map_err(RegistryError::Apply);
                    }
                    // Not to be retried: it waits for the operator, not for a leader.
                    Ok(Ok(Err(ForwardError::UpgradeInProgress(m)))) => {
                        return Err(RegistryError::UpgradeInProgress(m));
                    }
                    Ok(Ok(Err(e))) => {
                        tracing::debug!(leader = leader.id, error = %e, "forwarded write refused, retrying");
                    }
                    // An older leader cannot decode a newer command (its gRPC service says
                    // "bad payload"): that waits for the operator too, not for a retry.
                    Ok(Err(e))
                        if req.command.format() > formats::OLDEST && e.contains("bad payload") =>
                    {
                        return Err(RegistryError::UpgradeInProgress(format!(
                            "the leader, node {}, cannot read `{}` (command format {}): it runs an older release; upgrade it, then retry",
                            leader.id,
                            req.command.label(),
                            req.command.format()
                        )));
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(leader = leader.id, error = %e, "forwarding failed, retrying");
                    }
                }
            }
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_millis(100))).await;
        }
    }

    async fn forward_write(
        &self,
        leader: &Member,
        req: &Request,
    ) -> Result<Result<state::CommandResult, ForwardError>, String> {
        let command = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            parent: crate::telemetry::parent(),
            "registry.forward",
            otel.kind = "client",
            leader = leader.id,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let result = self
            .forwarders
            .call(&leader.grpc_addr, forward::Call::Write(command))
            .in_span(span.clone())
            .await
            .inspect_err(|_| crate::telemetry::failed(&span, "forward_failed"))?;
        metrics::histogram!("mcpd_registry_forward_seconds").record(started.elapsed());
        serde_json::from_slice(&result).map_err(|e| e.to_string())
    }

    /// Leader side of a forwarded write: propose here, never forward again.
    pub async fn write_as_leader(
        &self,
        req: Request,
    ) -> Result<state::CommandResult, ForwardError> {
        let timeout = self.quorum_wait;
        self.admit_format(&req.command)
            .await
            .map_err(ForwardError::UpgradeInProgress)?;
        match tokio::time::timeout(timeout, self.proposer.propose(req)).await {
            Err(_) => Err(ForwardError::NoQuorum(format!(
                "not committed within {timeout:?}"
            ))),
            Ok(Err(stopped)) => Err(ForwardError::Raft(stopped.to_string())),
            Ok(Ok(Ok(result))) => Ok(result),
            Ok(Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))))) => {
                Err(ForwardError::NotLeader { node: self.id })
            }
            Ok(Ok(Err(e))) => Err(ForwardError::Raft(e.to_string())),
        }
    }

    /// Waits until this node has applied everything committed before the call (ReadIndex):
    /// a read of the local state after it is linearizable.
    pub async fn barrier(&self) -> Result<(), RegistryError> {
        let started = Instant::now();
        let deadline = started + self.quorum_wait;
        let no_quorum = || RegistryError::NoQuorum {
            waited: started.elapsed(),
            what: "confirm its leadership for a linearizable read",
            maybe_applied: false,
        };
        let mut delays = retry_delays();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(no_quorum());
            }
            let forward =
                match tokio::time::timeout(remaining, self.raft.ensure_linearizable()).await {
                    Err(_) => return Err(no_quorum()),
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Some(f),
                    Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => None,
                    Ok(Err(RaftError::Fatal(_))) => return Err(RegistryError::ShuttingDown),
                };
            if let Some(leader) = forward
                .as_ref()
                .and_then(|f| self.leader_member(f))
                .filter(|l| l.id != self.id)
            {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let asked = tokio::select! {
                    r = tokio::time::timeout(remaining, self.read_index_from(&leader)) => r,
                    _ = self.leader_changed_from(leader.id) => continue,
                };
                match asked {
                    Err(_) => return Err(no_quorum()),
                    Ok(Ok(Ok(index))) => {
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        return self
                            .raft
                            .wait(Some(remaining))
                            .applied_index_at_least(index.map(|l| l.index), "linearizable read")
                            .await
                            .map(|_| ())
                            .map_err(|_| no_quorum());
                    }
                    Ok(Ok(Err(e))) => {
                        tracing::debug!(leader = leader.id, error = %e, "read index refused")
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(leader = leader.id, error = %e, "read index failed")
                    }
                }
            }
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_millis(100))).await;
        }
    }

    async fn read_index_from(
        &self,
        leader: &Member,
    ) -> Result<Result<Option<LogId>, ForwardError>, String> {
        let result = self
            .forwarders
            .call(&leader.grpc_addr, forward::Call::ReadIndex)
            .await?;
        serde_json::from_slice(&result).map_err(|e| e.to_string())
    }

    /// Leader side of a read barrier.
    pub async fn read_index_as_leader(&self) -> Result<Option<LogId>, ForwardError> {
        match tokio::time::timeout(self.quorum_wait, self.raft.ensure_linearizable()).await {
            Err(_) => Err(ForwardError::NoQuorum(
                "leadership not confirmed in time".into(),
            )),
            Ok(Ok(idx)) => Ok(idx),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                Err(ForwardError::NotLeader { node: self.id })
            }
            Ok(Err(e)) => Err(ForwardError::Raft(e.to_string())),
        }
    }

    /// Asks a peer how it is, within `timeout`.
    pub async fn ping(&self, peer: &Member, timeout: Duration) -> Result<PingReply, String> {
        let mut client = self.cluster_client(peer)?;
        let mut req = tonic::Request::new(PingRequest {});
        req.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.ping(req)).await {
            Err(_) => {
                self.formats.forget(peer.id);
                Err(format!("no answer within {timeout:?}"))
            }
            Ok(Err(status)) => {
                self.formats.forget(peer.id);
                Err(status.message().to_string())
            }
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                self.formats.note(peer.id, reply.state_format);
                Ok(reply)
            }
        }
    }

    /// While this node leads: `Err` when a member does not apply `command`'s format yet. A
    /// member not heard from lately (this leader is new, or the member is) is asked first,
    /// within a second, rather than counted as the oldest at once.
    async fn admit_format(&self, command: &Command) -> Result<(), String> {
        // Every member applies the oldest format: nothing to look up on the write path.
        if command.format() <= formats::OLDEST {
            return Ok(());
        }
        let membership = {
            let m = self.raft.metrics().borrow().clone();
            if m.current_leader != Some(self.id) {
                return Ok(()); // the leader decides
            }
            m.membership_config.membership().clone()
        };
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let readers = formats::readers(command, membership.nodes().map(|(id, _)| *id), &voters);
        if self.formats.admit(command, self.id, &readers).is_err() {
            let asks = self
                .formats
                .unheard(self.id, &readers)
                .into_iter()
                .filter_map(|id| membership.get_node(&id).cloned())
                .map(|member| async move { self.ping(&member, Duration::from_secs(1)).await });
            futures_util::future::join_all(asks).await;
        }
        self.formats.admit(command, self.id, &readers)
    }

    /// Checks a bearer token against the applied state.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let id = token::parse_id(token)?;
        let data = self.sm.read();
        let stored = data.state.tokens.get(id)?;
        if !token::matches(token, &stored.hash) {
            return None;
        }
        let now = now_unix();
        if stored.info.expires_at.is_some_and(|e| e <= now) {
            return None;
        }
        let principal = Principal {
            token_id: stored.info.id.clone(),
            role: stored.info.role,
            tenant: stored.info.tenant.clone(),
            scopes: stored.info.scopes.clone(),
            groups: Vec::new(),
            jwt: None,
        };
        // Noted after the state's read lock is gone: the two locks are never held together.
        drop(data);
        self.uses.note(&principal.token_id, now);
        Some(principal)
    }

    /// Notes a use of API token `id` (reported to the cluster in batches, `token_use`).
    pub fn note_use(&self, id: &str, now: u64) {
        self.uses.note(id, now);
    }

    /// When API token `id` expires (`None`: it does not, or there is no such token).
    pub fn token_expiry(&self, id: &str) -> Option<u64> {
        self.sm.read().state.tokens.get(id)?.info.expires_at
    }

    /// Whether `asserted`, a principal a peer forwards a call for, still holds here: its
    /// token exists, has not expired, and has the role and tenant the peer says. A token
    /// revoked on any node is refused by every node that has applied the revocation.
    ///
    /// A JWT caller cannot be verified again here (the peer keeps the token): its issuer must
    /// still be trusted, for the asserted tenant when the issuer is per-tenant, and its token
    /// not expired.
    pub fn still_holds(&self, asserted: &Principal) -> bool {
        let data = self.sm.read();
        if let Some(jwt) = &asserted.jwt {
            return data.state.issuers.get(&jwt.issuer).is_some_and(|i| {
                let tenant_ok = i.spec.tenant.is_none() || i.spec.tenant == asserted.tenant;
                let role_ok = i.spec.tenant.is_none() || asserted.role.is_tenant_scoped();
                tenant_ok
                    && role_ok
                    && jwt.names(&asserted.token_id)
                    && jwt.expires_at.saturating_add(i.spec.clock_skew_s) > now_unix()
            });
        }
        data.state.tokens.get(&asserted.token_id).is_some_and(|t| {
            t.info.role == asserted.role
                && t.info.tenant == asserted.tenant
                && t.info.expires_at.is_none_or(|e| e > now_unix())
        })
    }

    /// Bootstraps a cluster from this node and mints the first admin token.
    pub async fn init(
        &self,
        members: Vec<Member>,
    ) -> Result<(BTreeSet<u64>, String), RegistryError> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|_| RegistryError::ShuttingDown)?;
        let ids: BTreeSet<u64>;
        if initialized {
            // A bootstrap that initialised Raft but lost its bootstrap write may be completed;
            // once that write is in (the cluster has its session key) `init` is closed for
            // good, whatever tokens exist.
            self.barrier().await?;
            let data = self.sm.read();
            if data.state.session_key.is_some() {
                return Err(RegistryError::Apply(ApplyError::AlreadyInitialized));
            }
            ids = data.membership.voter_ids().collect();
        } else {
            let mut map = BTreeMap::new();
            if members.is_empty() {
                map.insert(self.id, self.me.clone());
            }
            for (i, m) in members.into_iter().enumerate() {
                if m.id == 0 {
                    return Err(FieldError::new(
                        format!("members[{i}].id"),
                        "must be greater than 0",
                    )
                    .into());
                }
                if m.http_addr.is_empty() || m.grpc_addr.is_empty() {
                    return Err(FieldError::new(
                        format!("members[{i}]"),
                        "http_addr and grpc_addr are required",
                    )
                    .into());
                }
                if map.insert(m.id, m.clone()).is_some() {
                    return Err(FieldError::new(
                        format!("members[{i}].id"),
                        format!("id {} appears twice", m.id),
                    )
                    .into());
                }
            }
            if !map.contains_key(&self.id) {
                return Err(FieldError::new(
                    "members",
                    format!(
                        "must include the node that receives the request (id {})",
                        self.id
                    ),
                )
                .into());
            }
            ids = map.keys().copied().collect();
            self.raft.initialize(map).await.map_err(|e| match e {
                RaftError::APIError(e) => RegistryError::Conflict(e.to_string()),
                RaftError::Fatal(_) => RegistryError::ShuttingDown,
            })?;
            tracing::info!(members = ?ids, "cluster initialised");
        }
        let minted = token::mint().map_err(|e| RegistryError::Internal(e.to_string()))?;
        let info = TokenInfo {
            id: minted.id,
            name: "bootstrap-admin".into(),
            role: Role::ClusterAdmin,
            tenant: None,
            created_at: now_unix(),
            expires_at: None,
            scopes: None,
            last_used_at: None,
        };
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| RegistryError::Internal(e.to_string()))?;
        let token_id = info.id.clone();
        let req = Request {
            request_id: new_request_id(),
            command: Command::Bootstrap {
                info,
                hash: minted.hash,
                session_key: hex::encode(key),
            },
            audit: Some(state::AuditContext::system("init", None)),
        };
        // The first election needs every initial member up: give it more than one quorum wait.
        // A re-sent request applies once (same request id).
        let mut last = None;
        for _ in 0..3 {
            match self.write_request(req.clone()).await {
                Ok(_) => {
                    tracing::warn!(token_id = %token_id, members = ?ids, "cluster bootstrapped: the first admin token was issued");
                    return Ok((ids, minted.secret));
                }
                Err(e @ RegistryError::NoQuorum { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(RegistryError::Internal("bootstrap not written".into())))
    }

    /// A single-use join token for node `node` (see `crate::join`), pinning `ca_fingerprint`.
    pub async fn create_join_token(
        &self,
        node: u64,
        ttl_seconds: u64,
        ca_fingerprint: &str,
        ctx: state::AuditContext,
    ) -> Result<(String, u64), RegistryError> {
        let (token, id, stored) = join_token::mint(node, ttl_seconds, ca_fingerprint)
            .map_err(|e| RegistryError::Internal(e.to_string()))?;
        let expires_at = stored.expires_at;
        self.write_audited(
            Command::CreateJoinToken {
                id: id.clone(),
                token: stored,
                now: now_unix(),
            },
            ctx,
        )
        .await?;
        tracing::info!(token_id = %id, node, expires_at, "join token created");
        Ok((token, expires_at))
    }

    /// Uses up `token` for node `node`: `Ok` once, for the node it names, before it expires.
    pub async fn redeem_join_token(&self, token: &str, node: u64) -> Result<(), RegistryError> {
        let refused = || RegistryError::Forbidden(join_token::JoinTokenError::Refused.to_string());
        let parsed = join_token::parse(token).map_err(|_| refused())?;
        let valid = |registry: &Registry| {
            let known = registry
                .sm
                .read()
                .state
                .join_tokens
                .get(&parsed.id)
                .cloned();
            known.is_some_and(|t| join_token::matches(&parsed, &t, node))
        };
        // Checked against this node's state first, so a stranger's guess costs no round trip
        // to the leader; then again after a read barrier.
        if !valid(self) {
            return Err(refused());
        }
        self.barrier().await?;
        if !valid(self) {
            return Err(refused());
        }
        match self
            .write_audited(
                Command::RedeemJoinToken {
                    id: parsed.id.clone(),
                },
                state::AuditContext::system("join", Some(format!("node {node}"))),
            )
            .await
        {
            Ok(_) => {
                tracing::warn!(token_id = %parsed.id, node, "join token used: the cluster CA and data key were handed to a joining node");
                Ok(())
            }
            // Used by a concurrent join in between: this one is refused.
            Err(RegistryError::Apply(ApplyError::NotFound { .. })) => Err(refused()),
            Err(e) => Err(e),
        }
    }

    /// Issues a new admin token for a recovery redeemed on this node (see `crate::recovery`).
    pub async fn recover_admin(&self) -> Result<(String, String), RegistryError> {
        let minted = token::mint().map_err(|e| RegistryError::Internal(e.to_string()))?;
        let info = TokenInfo {
            id: minted.id,
            name: format!("recovered-admin-node{}", self.id),
            role: Role::ClusterAdmin,
            tenant: None,
            created_at: now_unix(),
            expires_at: None,
            scopes: None,
            last_used_at: None,
        };
        let id = info.id.clone();
        self.write_audited(
            Command::RecoverAdmin {
                info,
                hash: minted.hash,
                node: self.id,
            },
            state::AuditContext::system(
                "recover-admin",
                Some(format!("the host of node {}", self.id)),
            ),
        )
        .await?;
        tracing::warn!(token_id = %id, node = self.id, "admin access recovered through this node's host: a new admin token was issued");
        Ok((id, minted.secret))
    }

    /// Adds a node (learner, then voter) or removes one, through the leader. The change is
    /// recorded in the audit trail first, as `ctx` asked for it: a change whose record cannot
    /// be written (no quorum, a member not upgraded yet) is not made.
    pub async fn change_membership(
        &self,
        change: MembershipChange,
        ctx: state::AuditContext,
    ) -> Result<(), RegistryError> {
        // A change the membership as this node knows it refuses is not recorded (the
        // leader checks again against its own).
        {
            let metrics = self.raft.metrics().borrow().clone();
            let membership = metrics.membership_config.membership();
            let voters: BTreeSet<u64> = membership.voter_ids().collect();
            let learners: BTreeSet<u64> = membership.learner_ids().collect();
            self.check_change(&change, &voters, &learners)?;
        }
        self.write_audited(
            Command::ChangeMembership {
                change: change.clone(),
            },
            ctx,
        )
        .await?;
        let started = Instant::now();
        let deadline = started + self.membership_wait;
        let mut delays = retry_delays();
        loop {
            match self.change_membership_as_leader(change.clone()).await {
                Ok(()) => return Ok(()),
                Err(ForwardError::NotLeader { .. }) => {}
                Err(ForwardError::NoQuorum(m)) => {
                    tracing::debug!(message = %m, "membership change waiting for quorum");
                }
                Err(e) => return Err(e.into()),
            }
            let leader = {
                let m = self.raft.metrics().borrow().clone();
                m.current_leader
                    .filter(|l| *l != self.id)
                    .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
            };
            if let Some(leader) = leader {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(remaining, self.forward_membership(&leader, &change))
                    .await
                {
                    Err(_) => break,
                    Ok(Ok(Ok(()))) => return Ok(()),
                    Ok(Ok(Err(ForwardError::NotLeader { .. } | ForwardError::NoQuorum(_)))) => {}
                    Ok(Ok(Err(e))) => return Err(e.into()),
                    Ok(Err(e)) => {
                        tracing::debug!(leader = leader.id, error = %e, "forwarding membership change failed")
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_millis(100))).await;
        }
        Err(RegistryError::NoQuorum {
            waited: started.elapsed(),
            what: "change the membership",
            maybe_applied: true,
        })
    }

    async fn forward_membership(
        &self,
        leader: &Member,
        change: &MembershipChange,
    ) -> Result<Result<(), ForwardError>, String> {
        let mut client = self.cluster_client(leader)?;
        let body = serde_json::to_vec(change).map_err(|e| e.to_string())?;
        let reply = client
            .change_membership(MembershipRequest { change: body })
            .await
            .map_err(|s| s.to_string())?;
        serde_json::from_slice(&reply.into_inner().result).map_err(|e| e.to_string())
    }

    /// Whether `change` may be made to a membership of `voters` and `learners`: checked by the
    /// leader, and first by the node that took the request, before it records it.
    fn check_change(
        &self,
        change: &MembershipChange,
        voters: &BTreeSet<u64>,
        learners: &BTreeSet<u64>,
    ) -> Result<(), ForwardError> {
        match change {
            MembershipChange::Add(req) => {
                if req.id == 0 {
                    return Err(ForwardError::Invalid {
                        field: "id".into(),
                        message: "must be greater than 0".into(),
                    });
                }
                if voters.contains(&req.id) {
                    return Err(ForwardError::Conflict(format!(
                        "node {} is already a voter",
                        req.id
                    )));
                }
                let used_before = self.sm.read().state.node_ids_ever.contains(&req.id);
                if used_before && !learners.contains(&req.id) {
                    return Err(ForwardError::Conflict(format!(
                        "node id {} was a member before; node ids are never reused: start the new node with a fresh id",
                        req.id
                    )));
                }
            }
            MembershipChange::Remove { id } => {
                if voters.contains(id) && voters.len() == 1 {
                    return Err(ForwardError::Conflict(format!(
                        "node {id} is the last voter; a cluster cannot remove its last voter"
                    )));
                }
                if !voters.contains(id) && !learners.contains(id) {
                    return Err(ForwardError::NotFound(format!("node {id} is not a member")));
                }
            }
        }
        Ok(())
    }

    /// Leader side of a membership change.
    pub async fn change_membership_as_leader(
        &self,
        change: MembershipChange,
    ) -> Result<(), ForwardError> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(self.id) {
            return Err(ForwardError::NotLeader { node: self.id });
        }
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners: BTreeSet<u64> = membership.learner_ids().collect();
        self.check_change(&change, &voters, &learners)?;
        let map_err = |e: RaftError<u64, ClientWriteError>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                ForwardError::NotLeader { node: self.id }
            }
            other => ForwardError::Raft(other.to_string()),
        };
        match change {
            MembershipChange::Add(req) => {
                let member = Member {
                    id: req.id,
                    http_addr: req.http_addr.clone(),
                    grpc_addr: req.grpc_addr.clone(),
                };
                if !learners.contains(&req.id) {
                    tokio::time::timeout(
                        self.membership_wait,
                        self.raft.add_learner(req.id, member, true),
                    )
                    .await
                    .map_err(|_| {
                        ForwardError::NoQuorum("the learner did not catch up in time".into())
                    })?
                    .map_err(map_err)?;
                    tracing::info!(node = req.id, "added learner");
                }
                if req.voter {
                    let ids: BTreeSet<u64> = [req.id].into();
                    tokio::time::timeout(
                        self.membership_wait,
                        self.raft
                            .change_membership(ChangeMembers::AddVoterIds(ids), false),
                    )
                    .await
                    .map_err(|_| {
                        ForwardError::NoQuorum("promotion to voter not committed in time".into())
                    })?
                    .map_err(map_err)?;
                    tracing::info!(node = req.id, "promoted to voter");
                }
                Ok(())
            }
            MembershipChange::Remove { id } => {
                let ids: BTreeSet<u64> = [id].into();
                let change = if voters.contains(&id) {
                    ChangeMembers::RemoveVoters(ids)
                } else {
                    ChangeMembers::RemoveNodes(ids)
                };
                tokio::time::timeout(
                    self.membership_wait,
                    self.raft.change_membership(change, false),
                )
                .await
                .map_err(|_| ForwardError::NoQuorum("removal not committed in time".into()))?
                .map_err(map_err)?;
                tracing::info!(node = id, "removed node");
                Ok(())
            }
        }
    }
}
