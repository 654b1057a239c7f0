//! The leader's table of concurrency slots.
//!
//! A concurrency limit's budget is the cluster's: at most `concurrency` of the calls it counts
//! run at once, wherever they came in. The leader keeps, per budget (`LIMIT/BUDGET`), how many
//! slots each node holds; a node asks to hold more when a call finds none free, and renews
//! what it holds every [`RENEW`] while calls run, giving back the free ones
//! (`crate::limits::slots`).
//!
//! - A node's holding lapses [`SLOT_TTL`] after its last renewal, on the leader and, counted
//!   from when it asked, on the node, which then starts no call on it: the slots of a node
//!   that died or was cut off come back to the others after [`SLOT_TTL`].
//! - A holding never drops below the calls the node says are running: a running call is not
//!   stopped, it is counted.
//! - An ask that finds every slot held waits up to [`WAIT`] for another node's renewal to give
//!   back a free one (slots a node holds but does not use come back within [`RENEW`]): calls
//!   that come one after another on different nodes never meet the limit.
//! - A new leader starts with an empty table. It grants no more than a node already runs until
//!   every node has renewed ([`SETTLE`] after its first ask of the term): asks in that time
//!   are answered when it ends. Calls that a node cut off from the new leader runs on slots of
//!   the old one are not counted while they run (at most [`SLOT_TTL`] more).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::LeaseError;
use crate::registry::Registry;

/// How long a holding lasts without renewal.
pub const SLOT_TTL: Duration = Duration::from_secs(2);

/// How often a node renews what it holds.
pub const RENEW: Duration = Duration::from_millis(500);

/// How long a new leader waits for every node's renewal before granting more.
pub const SETTLE: Duration = Duration::from_millis(750);

/// How long an ask waits at the leader, settling included, for slots to come back.
pub const WAIT: Duration = Duration::from_millis(800);

/// When a node whose call found no free slot may try again.
pub const RETRY_AFTER: Duration = Duration::from_millis(100);

/// A node's holding of budget `bucket`: `running` calls now, and `want` slots in all (at least
/// `running`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotAsk {
    pub bucket: String,
    pub node: u64,
    pub running: u32,
    pub want: u32,
}

/// The slots the node now holds (at least its running calls; fewer than it wanted when the
/// budget is spent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotGrant {
    pub held: u32,
    pub retry_after_ms: u64,
}

/// The leader's holdings, for the term it leads in.
pub struct Holdings {
    table: Mutex<Table>,
    /// Woken when a holding shrinks or lapses.
    freed: tokio::sync::Notify,
}

struct Table {
    term: u64,
    /// This term's first ask.
    since: Instant,
    /// Budget -> node -> (slots, renewed at).
    budgets: HashMap<String, HashMap<u64, (u32, Instant)>>,
}

impl Default for Holdings {
    fn default() -> Self {
        Holdings {
            table: Mutex::new(Table {
                term: 0,
                since: Instant::now(),
                budgets: HashMap::new(),
            }),
            freed: tokio::sync::Notify::new(),
        }
    }
}

impl Holdings {
    /// How long the table of `term` still settles at `now` (zero once settled).
    pub fn settling(&self, term: u64, now: Instant) -> Duration {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.term != term {
            t.term = term;
            t.since = now;
            t.budgets.clear();
        }
        SETTLE.saturating_sub(now.duration_since(t.since))
    }

    /// Sets `ask.node`'s holding of `ask.bucket`: what it wants, within `limit` less what the
    /// other nodes hold; never below its running calls. Before the table settled, no more
    /// than those.
    pub fn hold(&self, ask: &SlotAsk, limit: u32, now: Instant) -> SlotGrant {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let settled = now.duration_since(t.since) >= SETTLE;
        if t.budgets.len() > 1024 {
            t.budgets.retain(|_, nodes| {
                nodes.retain(|_, (_, at)| now.duration_since(*at) < SLOT_TTL);
                !nodes.is_empty()
            });
        }
        let nodes = t.budgets.entry(ask.bucket.clone()).or_default();
        let before = nodes.len();
        nodes.retain(|_, (_, at)| now.duration_since(*at) < SLOT_TTL);
        let mut freed = nodes.len() < before;
        let others: u32 = nodes
            .iter()
            .filter(|(n, _)| **n != ask.node)
            .map(|(_, (held, _))| *held)
            .sum();
        let room = if settled {
            limit.saturating_sub(others)
        } else {
            0
        };
        let held = ask.want.min(room).max(ask.running);
        let had = if held == 0 {
            nodes.remove(&ask.node)
        } else {
            nodes.insert(ask.node, (held, now))
        };
        freed |= had.is_some_and(|(h, _)| h > held);
        drop(t);
        if freed {
            self.freed.notify_waiters();
        }
        SlotGrant {
            held,
            retry_after_ms: if held < ask.want {
                RETRY_AFTER.as_millis() as u64
            } else {
                0
            },
        }
    }
}

impl Registry {
    /// Leader side of a slot lease, leading in `term`: waits for the table to settle first,
    /// then, while every slot is held, for one to come back, [`WAIT`] in all.
    pub(super) async fn slots_as_leader(
        &self,
        ask: &SlotAsk,
        term: u64,
    ) -> Result<SlotGrant, LeaseError> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let holdings = &self.slot_holdings;
        let settling = holdings.settling(term, Instant::now());
        if !settling.is_zero() {
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + settling)).await;
        }
        loop {
            // Still leading, with a quorum heard within half the election timeout, now that
            // this ask may have waited (a grant must follow the check closely).
            if self.leading_with_quorum().await? != term {
                return Err(LeaseError::NotLeader(self.id));
            }
            let limit = self.limit_of(&ask.bucket)?;
            let Some(concurrency) = limit.spec.concurrency else {
                return Err(LeaseError::UnknownLimit(limit.spec.name));
            };
            // Listening before looking: a slot freed in between still wakes this ask.
            let freed = holdings.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let grant = holdings.hold(ask, concurrency, Instant::now());
            if grant.held >= ask.want || tokio::time::Instant::now() >= deadline {
                return Ok(grant);
            }
            // A holding also lapses without a word: look again at least every RENEW.
            let _ =
                tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + RENEW), freed)
                    .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(node: u64, running: u32, want: u32) -> SlotAsk {
        SlotAsk {
            bucket: "l/t".into(),
            node,
            running,
            want,
        }
    }

    /// A table whose term settled at `t0`.
    fn settled(t0: Instant) -> Holdings {
        let h = Holdings::default();
        h.settling(1, t0 - SETTLE);
        h
    }

    #[test]
    fn nodes_share_the_limit_and_free_slots_come_back() {
        let t0 = Instant::now();
        let h = settled(t0);
        assert_eq!(h.hold(&ask(1, 0, 2), 3, t0).held, 2);
        let short = h.hold(&ask(2, 0, 2), 3, t0);
        assert_eq!(short.held, 1, "one slot is left for node 2");
        assert_eq!(short.retry_after_ms, RETRY_AFTER.as_millis() as u64);
        assert_eq!(h.hold(&ask(3, 0, 1), 3, t0).held, 0, "the budget is spent");
        // Node 1 gives back what it does not use.
        assert_eq!(h.hold(&ask(1, 0, 0), 3, t0).held, 0);
        assert_eq!(h.hold(&ask(3, 0, 1), 3, t0).held, 1);
    }

    #[test]
    fn a_silent_nodes_slots_lapse_but_running_calls_always_count() {
        let t0 = Instant::now();
        let h = settled(t0);
        assert_eq!(h.hold(&ask(1, 2, 2), 2, t0).held, 2);
        assert_eq!(h.hold(&ask(2, 0, 1), 2, t0).held, 0);
        // A lowered limit stops nothing that runs: node 2's call is counted beyond it.
        assert_eq!(h.hold(&ask(2, 1, 1), 2, t0).held, 1);
        let later = t0 + SLOT_TTL;
        assert_eq!(
            h.hold(&ask(3, 0, 2), 2, later).held,
            2,
            "nodes 1 and 2 lapsed"
        );
    }

    #[test]
    fn a_new_leader_grants_nothing_new_until_every_node_renewed() {
        let t0 = Instant::now();
        let h = Holdings::default();
        assert_eq!(h.settling(7, t0), SETTLE);
        assert_eq!(h.hold(&ask(1, 1, 2), 2, t0).held, 1, "only what runs");
        assert_eq!(h.hold(&ask(2, 0, 1), 2, t0).held, 0);
        let after = t0 + SETTLE;
        assert_eq!(h.settling(7, after), Duration::ZERO);
        assert_eq!(h.hold(&ask(2, 0, 1), 2, after).held, 1);
        assert_eq!(h.hold(&ask(3, 0, 1), 2, after).held, 0, "1 + 1 of 2 held");
        // Another term: the table starts again.
        assert_eq!(h.settling(8, after), SETTLE);
    }
}
