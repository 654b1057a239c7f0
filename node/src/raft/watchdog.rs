//! A prompt election when the leader goes silent.
//!
//! openraft 0.9 lets a follower stand for election only after the leader's lease
//! (`election_timeout_max`) and then its own election timeout, a random draw in
//! `[election_timeout_min, election_timeout_max]` made once per process. So a dead leader costs
//! at least the lease plus the shorter draw, and two followers whose draws are close stand at
//! once, split the vote, and (their draws being fixed) may split it again.
//!
//! This watchdog runs on every voter. Once nothing has come from the leader for the lease and
//! one heartbeat more, the followers stand in an order they agree on without talking: by node
//! id among the voters other than the silent leader, one [`STAGGER`] apart. The first one's vote
//! requests arrive after every other follower's lease has run out, so they are granted; the
//! next one stands only if the first failed (a follower that granted a vote knows no leader
//! and stays quiet). openraft's own timer remains as the fallback.
//!
//! It stands only after it has heard from a leader in this process, so a node that restarts
//! does not disturb a healthy cluster; a learner never stands.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;

use super::Raft;
use crate::shutdown::Shutdown;

/// Between one follower's turn and the next.
pub const STAGGER: Duration = Duration::from_millis(100);

/// When this node last heard from a leader (an append it took, heartbeats included).
#[derive(Clone)]
pub struct LeaderContact {
    since: Instant,
    /// Milliseconds after `since` of the last contact, plus one (0: none yet).
    last: Arc<AtomicU64>,
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact {
            since: Instant::now(),
            last: Arc::default(),
        }
    }
}

impl LeaderContact {
    /// A leader's append was taken just now.
    pub fn heard(&self) {
        let ms = self.since.elapsed().as_millis() as u64 + 1;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// How long since the last contact; `None` before the first.
    fn silent_for(&self) -> Option<Duration> {
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.since
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }
}

/// Watches for a silent leader until shutdown.
pub async fn run(raft: Raft, contact: LeaderContact, shutdown: Shutdown) {
    let config = raft.config().clone();
    let tick = Duration::from_millis(config.heartbeat_interval);
    let lease = Duration::from_millis(config.election_timeout_max);
    let mut stood_at: Option<Instant> = None;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let Some(silent) = contact.silent_for() else {
            continue;
        };
        let turn = {
            let m = raft.metrics();
            let m = m.borrow();
            let Some(leader) = m
                .current_leader
                .filter(|_| m.state == ServerState::Follower)
            else {
                continue;
            };
            let others = m
                .membership_config
                .membership()
                .voter_ids()
                .filter(|id| *id != leader);
            let Some(rank) = others.into_iter().position(|id| id == m.id) else {
                continue;
            };
            (leader, rank)
        };
        let (leader, rank) = turn;
        if silent < lease + tick + STAGGER * rank as u32 {
            continue;
        }
        // One attempt per turn: openraft's own timer takes over if it fails.
        if stood_at.is_some_and(|t| t.elapsed() < lease + STAGGER * 3) {
            continue;
        }
        stood_at = Some(Instant::now());
        tracing::info!(
            leader,
            silent_ms = silent.as_millis() as u64,
            rank,
            "the leader is silent past its lease: standing for election"
        );
        metrics::counter!("mcpd_raft_prompt_elections_total").increment(1);
        if raft.trigger().elect().await.is_err() {
            return;
        }
    }
}
