//! The leader's token buckets for rate limits.
//!
//! A rate limit's budget is the cluster's: one token bucket per budget (`LIMIT/BUDGET`), held
//! by the leader, in memory. A node that runs out of tokens for a budget asks the leader for
//! a few more ([`RateAsk`]); the leader takes them out of its bucket ([`Grant`]) and the node
//! spends them on calls until they run out or expire (`crate::limits`). The cluster as a whole
//! thus never passes the limit's rate plus its burst, wherever the calls come in.
//!
//! - A new leader starts each bucket full, so a change of leader can let one extra burst
//!   through.
//! - A bucket idle for [`IDLE_BUCKET`] is dropped (it would be full again anyway).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::LeaseError;
use crate::registry::Registry;

/// How long a bucket that granted nothing is kept.
pub const IDLE_BUCKET: Duration = Duration::from_secs(60);

/// A node's request for tokens of budget `bucket` (`LIMIT/BUDGET`) at the limit's `revision`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateAsk {
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
    pub fn take(&self, ask: &RateAsk, per_second: u32, burst: u32, now: Instant) -> Grant {
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
    /// Leader side of a rate lease: the limit as this node's state has it.
    pub(super) fn rate_as_leader(&self, ask: &RateAsk) -> Result<Grant, LeaseError> {
        let limit = self.limit_of(&ask.bucket)?;
        let Some(rate) = limit.spec.rate else {
            return Err(LeaseError::UnknownLimit(limit.spec.name));
        };
        // A node that read an older or newer revision still draws from the current budget.
        let ask = RateAsk {
            revision: limit.revision,
            ..ask.clone()
        };
        Ok(self
            .rate_buckets
            .take(&ask, rate.per_second, rate.burst, Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(want: u32) -> RateAsk {
        RateAsk {
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
        let changed = RateAsk {
            revision: 2,
            ..ask(5)
        };
        assert_eq!(b.take(&changed, 1, 5, t0).granted, 5);
    }
}
