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
//! Silence is measured as openraft measures it for the lease: from the last change of this
//! node's vote or the last append it took from the leader (`vote_last_modified`), and checked
//! again just before it stands. A learner never stands, nor a node the membership no longer
//! names.

use std::time::{Duration, Instant};

use openraft::ServerState;

use super::Raft;
use crate::shutdown::Shutdown;

/// Between one follower's turn and the next.
pub const STAGGER: Duration = Duration::from_millis(100);

/// Watches for a silent leader until shutdown.
pub async fn run(raft: Raft, shutdown: Shutdown) {
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
        let Some((leader, rank)) = turn(&raft) else {
            continue;
        };
        let due = lease + tick + STAGGER * rank as u32;
        let Ok(Some(silent)) = silence(&raft).await else {
            continue;
        };
        if silent < due {
            continue;
        }
        // One attempt per turn: openraft's own timer takes over if it fails.
        if stood_at.is_some_and(|t| t.elapsed() < lease + STAGGER * 3) {
            continue;
        }
        // Still a follower of the same silent leader, still silent: stand.
        if turn(&raft) != Some((leader, rank))
            || !matches!(silence(&raft).await, Ok(Some(s)) if s >= due)
        {
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

/// The leader this node follows and its turn among the voters that are not the leader, when
/// it is a follower and a voter.
fn turn(raft: &Raft) -> Option<(u64, usize)> {
    let m = raft.metrics();
    let m = m.borrow();
    let leader = m
        .current_leader
        .filter(|_| m.state == ServerState::Follower)?;
    let rank = m
        .membership_config
        .membership()
        .voter_ids()
        .filter(|id| *id != leader)
        .position(|id| id == m.id)?;
    Some((leader, rank))
}

/// How long since this node's vote changed or its leader's last append arrived.
async fn silence(raft: &Raft) -> Result<Option<Duration>, ()> {
    raft.with_raft_state(|s| s.vote_last_modified().map(|t| t.elapsed()))
        .await
        .map_err(|_| ())
}
