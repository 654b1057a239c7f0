//! Leases from the leader: the part of a limit's cluster-wide budget a node may spend without
//! asking anyone (`crate::limits` spends them).
//!
//! - [`rate`]: tokens of a rate limit's bucket, spent until they run out or expire.
//! - [`slots`]: slots of a concurrency limit, held while calls run and renewed.
//!
//! Both live only in the leader's memory, and only a leader that heard from a quorum within
//! half the election timeout grants: no other node can have been elected since, so a leader
//! cut off from its peers stops granting before the majority's new leader starts (the budget
//! would be granted twice). When the last acknowledgement is older than that (a heartbeat late
//! on a loaded machine), the leader asks a quorum again, for at most the election timeout (and
//! never longer than [`CONFIRM_AT_MOST`]), before it refuses. A node that cannot reach such a
//! leader gets nothing: its limited calls are refused until it can (fail closed, like a write
//! without quorum).

pub mod rate;
pub mod slots;

use std::time::{Duration, Instant};

use mcpcp_proto::cluster::LeaseRequest;
use openraft::error::{CheckIsLeaderError, RaftError};
use serde::{Deserialize, Serialize};

use super::Registry;

/// How long a leader whose last quorum acknowledgement is too old to lean on spends asking a
/// quorum again before it refuses a lease. A node asking the leader waits longer than this
/// (`crate::limits::LEASE_TIMEOUT`), so the refusal it gets is the leader's, not a timeout.
pub const CONFIRM_AT_MOST: Duration = Duration::from_secs(1);

/// What a node asks the leader for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseAsk {
    Rate(rate::RateAsk),
    Slots(slots::SlotAsk),
}

/// The leader's answer to a [`LeaseAsk`] of the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseGrant {
    Rate(rate::Grant),
    Slots(slots::SlotGrant),
}

/// Why no grant came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LeaseError {
    #[error("node {0} is not the leader")]
    NotLeader(u64),
    #[error("no leader is known")]
    NoLeader,
    #[error("the leader has not heard from a quorum lately (last acknowledgement: {})", ago(.0))]
    NoQuorum(Option<u64>),
    #[error("limit {0:?} is not known to the leader (yet)")]
    UnknownLimit(String),
    #[error("the leader could not be asked: {0}")]
    Unreachable(String),
}

/// How long ago a quorum's last acknowledgement came, in words.
fn ago(ms: &Option<u64>) -> String {
    match ms {
        Some(ms) => format!("{ms} ms ago"),
        None => "none".to_string(),
    }
}

impl Registry {
    /// A lease: from this node's own table when it leads, else from the leader's, within
    /// `timeout`.
    pub async fn lease(&self, ask: &LeaseAsk, timeout: Duration) -> Result<LeaseGrant, LeaseError> {
        let leader = self.raft.metrics().borrow().current_leader;
        let Some(leader) = leader else {
            return Err(LeaseError::NoLeader);
        };
        if leader == self.id {
            return self.lease_as_leader(ask).await;
        }
        let member = self
            .members()
            .into_iter()
            .find(|m| m.id == leader)
            .ok_or(LeaseError::NoLeader)?;
        let json = serde_json::to_vec(ask).map_err(|e| LeaseError::Unreachable(e.to_string()))?;
        let mut client = self
            .cluster_client(&member)
            .map_err(LeaseError::Unreachable)?;
        let reply = tokio::time::timeout(timeout, client.lease(LeaseRequest { json }))
            .await
            .map_err(|_| LeaseError::Unreachable(format!("no answer within {timeout:?}")))?
            .map_err(|s| LeaseError::Unreachable(s.message().to_string()))?;
        serde_json::from_slice::<Result<LeaseGrant, LeaseError>>(&reply.into_inner().json)
            .map_err(|e| LeaseError::Unreachable(e.to_string()))?
    }

    /// Leader side of [`Registry::lease`].
    pub async fn lease_as_leader(&self, ask: &LeaseAsk) -> Result<LeaseGrant, LeaseError> {
        let term = self.leading_with_quorum().await?;
        metrics::counter!("mcpd_limit_leases_total", "kind" => match ask {
            LeaseAsk::Rate(_) => "rate",
            LeaseAsk::Slots(_) => "concurrency",
        })
        .increment(1);
        match ask {
            LeaseAsk::Rate(ask) => self.rate_as_leader(ask).map(LeaseGrant::Rate),
            LeaseAsk::Slots(ask) => self.slots_as_leader(ask, term).await.map(LeaseGrant::Slots),
        }
    }

    /// This node's term when it leads and heard from a quorum within half the election
    /// timeout: from the last acknowledgement when it is recent enough, else from a quorum
    /// asked now ([`Registry::confirm_quorum`]).
    async fn leading_with_quorum(&self) -> Result<u64, LeaseError> {
        let (leader, quorum_ack_ms, term) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.current_leader, m.millis_since_quorum_ack, m.current_term)
        };
        if leader != Some(self.id) {
            return Err(LeaseError::NotLeader(self.id));
        }
        if quorum_ack_ms.is_some_and(|ms| ms <= self.raft.config().election_timeout_min / 2) {
            return Ok(term);
        }
        let confirmed = self.confirm_quorum(quorum_ack_ms).await;
        metrics::counter!("mcpd_limit_lease_quorum_confirmations_total",
            "outcome" => if confirmed.is_ok() { "confirmed" } else { "refused" })
        .increment(1);
        confirmed
    }

    /// Asks a quorum whether this node still leads, again while no quorum answers in time
    /// (openraft gives each peer a heartbeat interval) or the answer comes too late to lean on
    /// (a quorum that answered a heartbeat sent at `sent` cannot elect anyone else before
    /// `sent` + the election timeout, so the grant must follow within half of it), for at most
    /// [`CONFIRM_AT_MOST`] or the election timeout, whichever is shorter.
    async fn confirm_quorum(&self, last_ack_ms: Option<u64>) -> Result<u64, LeaseError> {
        let config = self.raft.config();
        let within = Duration::from_millis(config.election_timeout_min / 2);
        let deadline = Instant::now()
            + CONFIRM_AT_MOST.min(Duration::from_millis(config.election_timeout_min));
        loop {
            let sent = Instant::now();
            let left = deadline.saturating_duration_since(sent);
            if left.is_zero() {
                return Err(LeaseError::NoQuorum(last_ack_ms));
            }
            match tokio::time::timeout(left, self.raft.get_read_log_id()).await {
                Err(_) => return Err(LeaseError::NoQuorum(last_ack_ms)),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                    return Err(LeaseError::NotLeader(self.id))
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                    // Each peer had a heartbeat's time to answer; it may yet, within the bound.
                    let pause = Duration::from_millis(config.heartbeat_interval);
                    tokio::time::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                Ok(Err(RaftError::Fatal(e))) => return Err(LeaseError::Unreachable(e.to_string())),
                Ok(Ok(_)) if sent.elapsed() <= within => {
                    let m = self.raft.metrics();
                    let m = m.borrow();
                    return match m.current_leader == Some(self.id) {
                        true => Ok(m.current_term),
                        false => Err(LeaseError::NotLeader(self.id)),
                    };
                }
                Ok(Ok(_)) => continue,
            }
        }
    }

    /// The limit named by a budget (`LIMIT/BUDGET`), at its revision.
    fn limit_of(
        &self,
        bucket: &str,
    ) -> Result<mcpcp_proto::api::Versioned<mcpcp_proto::api::LimitSpec>, LeaseError> {
        let limit = bucket.split('/').next().unwrap_or_default();
        self.local()
            .state
            .limits
            .get(limit)
            .cloned()
            .ok_or_else(|| LeaseError::UnknownLimit(limit.to_string()))
    }
}
