//! The leader's token buckets for rate limits, and the nodes' leases from them.
//!
//! A rate limit's budget is the cluster's: one token bucket per budget (`LIMIT/BUDGET`), held
//! by the leader, in memory. A node that runs out of tokens for a budget asks the leader for
//! a few more ([`LeaseAsk`]); the leader takes them out of its bucket ([`Grant`]) and the node
//! spends them on calls until they run out or expire (`crate::limits`). The cluster as a whole
//! thus never passes the limit's rate plus its burst, wherever the calls come in.
//!
//! - Buckets live only on the leader: a new leader starts each one full, so a change of
//!   leader can let one extra burst through.
//! - A node that cannot reach a leader gets no tokens: its limited calls are refused until it
//!   can (fail closed, like a write without quorum).
//! - A bucket idle for [`IDLE_BUCKET`] is dropped (it would be full again anyway).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mcpcp_proto::cluster::LeaseRateRequest;
use serde::{Deserialize, Serialize};

use super::Registry;

/// How long a bucket that granted nothing is kept.
pub const IDLE_BUCKET: Duration = Duration::from_secs(60);

/// A node's request for tokens of budget `bucket` (`LIMIT/BUDGET`) at the limit's `revision`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseAsk {
    pub bucket: String,
    pub revision: u64,
    pub want: u32,
}

/// The leader's answer: `granted` tokens (maybe 0), and when to ask again when 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub granted: u32,
    pub retry_after_ms: u64,
}

/// Why no grant came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LeaseError {
    #[error("node {0} is not the leader")]
    NotLeader(u64),
    #[error("no leader is known")]
    NoLeader,
    #[error("the leader has not heard from a quorum lately (last: {0:?} ms ago)")]
    NoQuorum(Option<u64>),
    #[error("limit {0:?} is not known to the leader (yet)")]
    UnknownLimit(String),
    #[error("the leader could not be asked: {0}")]
    Unreachable(String),
}

/// The leader's buckets.
#[derive(Default)]
pub struct Buckets(Mutex<HashMap<String, Bucket>>);

struct Bucket {
    revision: u64,
    tokens: f64,
    at: Instant,
}

impl Buckets {
    /// Takes up to `want` tokens from `bucket`, refilled at `per_second` up to `burst`.
    pub fn take(&self, ask: &LeaseAsk, per_second: u32, burst: u32, now: Instant) -> Grant {
        let mut buckets = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 1024 {
            buckets.retain(|_, b| now.duration_since(b.at) < IDLE_BUCKET);
        }
        let b = buckets.entry(ask.bucket.clone()).or_insert(Bucket {
            revision: ask.revision,
            tokens: f64::from(burst),
            at: now,
        });
        if b.revision != ask.revision {
            // The limit changed: its budget starts again, full.
            *b = Bucket {
                revision: ask.revision,
                tokens: f64::from(burst),
                at: now,
            };
        }
        let rate = f64::from(per_second.max(1));
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(f64::from(burst));
        b.at = now;
        let granted = b.tokens.floor().min(f64::from(ask.want)) as u32;
        b.tokens -= f64::from(granted);
        let retry_after_ms = if granted > 0 {
            0
        } else {
            (((1.0 - b.tokens) / rate) * 1000.0).ceil().max(1.0) as u64
        };
        Grant {
            granted,
            retry_after_ms,
        }
    }
}

impl Registry {
    /// Tokens of a rate limit's budget: from this node's own buckets when it leads, else from
    /// the leader's, within `timeout`.
    pub async fn lease_rate(&self, ask: &LeaseAsk, timeout: Duration) -> Result<Grant, LeaseError> {
        let leader = self.raft.metrics().borrow().current_leader;
        let Some(leader) = leader else {
            return Err(LeaseError::NoLeader);
        };
        if leader == self.id {
            return self.lease_rate_as_leader(ask);
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
        let reply = tokio::time::timeout(timeout, client.lease_rate(LeaseRateRequest { json }))
            .await
            .map_err(|_| LeaseError::Unreachable(format!("no answer within {timeout:?}")))?
            .map_err(|s| LeaseError::Unreachable(s.message().to_string()))?;
        serde_json::from_slice::<Result<Grant, LeaseError>>(&reply.into_inner().json)
            .map_err(|e| LeaseError::Unreachable(e.to_string()))?
    }

    /// Leader side of [`Registry::lease_rate`]: the limit as this node's state has it.
    ///
    /// Only a leader that heard from a quorum within half the election timeout grants: no
    /// other node can have been elected since, so a leader cut off from its peers stops
    /// granting before the majority's new leader starts (its budget would be granted twice).
    pub fn lease_rate_as_leader(&self, ask: &LeaseAsk) -> Result<Grant, LeaseError> {
        let (leader, quorum_ack_ms) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.current_leader, m.millis_since_quorum_ack)
        };
        if leader != Some(self.id) {
            return Err(LeaseError::NotLeader(self.id));
        }
        let within = self.raft.config().election_timeout_min / 2;
        if quorum_ack_ms.is_none_or(|ms| ms > within) {
            return Err(LeaseError::NoQuorum(quorum_ack_ms));
        }
        let limit = ask.bucket.split('/').next().unwrap_or_default();
        let rate = {
            let data = self.local();
            let spec = data.state.limits.get(limit);
            spec.and_then(|s| s.spec.rate.map(|r| (s.revision, r)))
        };
        let Some((revision, rate)) = rate else {
            return Err(LeaseError::UnknownLimit(limit.to_string()));
        };
        // A node that read an older or newer revision still draws from the current budget.
        let ask = LeaseAsk {
            revision,
            ..ask.clone()
        };
        metrics::counter!("mcpd_limit_leases_total").increment(1);
        Ok(self
            .rate_buckets
            .take(&ask, rate.per_second, rate.burst, Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(want: u32) -> LeaseAsk {
        LeaseAsk {
            bucket: "l/t".into(),
            revision: 1,
            want,
        }
    }

    #[test]
    fn a_bucket_grants_its_burst_then_refills_at_its_rate() {
        let b = Buckets::default();
        let t0 = Instant::now();
        assert_eq!(b.take(&ask(8), 10, 5, t0).granted, 5, "at most the burst");
        let empty = b.take(&ask(1), 10, 5, t0);
        assert_eq!(empty.granted, 0);
        assert_eq!(empty.retry_after_ms, 100, "one token takes 1/10 s");
        let later = t0 + Duration::from_millis(300);
        assert_eq!(b.take(&ask(10), 10, 5, later).granted, 3);
        let much_later = t0 + Duration::from_secs(60);
        assert_eq!(
            b.take(&ask(10), 10, 5, much_later).granted,
            5,
            "never past the burst"
        );
    }

    #[test]
    fn a_changed_limit_starts_a_full_budget() {
        let b = Buckets::default();
        let t0 = Instant::now();
        assert_eq!(b.take(&ask(5), 1, 5, t0).granted, 5);
        let changed = LeaseAsk {
            revision: 2,
            ..ask(5)
        };
        assert_eq!(b.take(&changed, 1, 5, t0).granted, 5);
    }
}
