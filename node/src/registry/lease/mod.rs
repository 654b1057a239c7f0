//! Leases from the leader: the part of a limit's cluster-wide budget a node may spend without
//! asking anyone (`crate::limits` spends them).
//!
//! - [`rate`]: tokens of a rate limit's bucket, spent until they run out or expire.
//! - [`slots`]: slots of a concurrency limit, held while calls run and renewed.
//!
//! Both live only in the leader's memory, and only a leader that heard from a quorum within
//! half the election timeout grants: no other node can have been elected since, so a leader
//! cut off from its peers stops granting before the majority's new leader starts (the budget
//! would be granted twice); when the last acknowledgement is older, it asks its quorum again
//! before it refuses ([`quorum`]). A node that cannot reach such a leader gets nothing: its
//! limited calls are refused until it can (fail closed, like a write without quorum).

pub mod quorum;
pub mod rate;
pub mod slots;

use std::time::Duration;

use mcpcp_proto::cluster::LeaseRequest;
use serde::{Deserialize, Serialize};

use super::Registry;

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
