//! Whether the leader may grant a lease now: only while a quorum acknowledged it within half
//! the election timeout, so that no other node can have been elected since.
//!
//! The last acknowledgement comes from openraft's metrics. When it is older than that (a
//! heartbeat late on a loaded machine, more often than a lost quorum), the leader asks its
//! quorum again (ReadIndex) for at most [`CONFIRM_AT_MOST`] before it refuses. One ask at a
//! time does so: the asks waiting behind it take its answer, a confirmation while it is recent
//! enough, a refusal that came after they asked.

use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, RaftError};

use super::LeaseError;
use crate::registry::Registry;

/// The longest a leader asks its quorum again before it refuses a lease (the election timeout,
/// when shorter). A node that asks the leader waits `crate::limits::LEASE_TIMEOUT` (1.5 s) for
/// the answer, and a slot ask may then wait `super::slots::WAIT` (0.8 s) for a free slot: the
/// asking node normally gets the leader's answer, not a timeout.
pub const CONFIRM_AT_MOST: Duration = Duration::from_millis(500);

/// The pause before asking again when no quorum answered (a refused connection answers at
/// once; a peer that is slow or stopped took a heartbeat interval already).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The last time the quorum was asked, shared by every lease ask of this node.
#[derive(Default)]
pub struct Confirmations {
    /// The turn to ask: one ask of the quorum at a time (the others wait for its answer).
    asking: tokio::sync::Mutex<()>,
    last: std::sync::Mutex<Last>,
}

impl Confirmations {
    fn last(&self) -> std::sync::MutexGuard<'_, Last> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Last {
    /// A term the quorum confirmed, and when the heartbeats it answered were sent.
    confirmed: Option<(u64, Instant)>,
    /// When the last ask of the quorum was refused.
    refused_at: Option<Instant>,
}

impl Registry {
    /// This node's term when it leads and a quorum acknowledged it within half the election
    /// timeout: lately, as the metrics say, or when asked now.
    pub(super) async fn leading_with_quorum(&self) -> Result<u64, LeaseError> {
        let asked = Instant::now();
        let within = self.half_election_timeout();
        let (term, last_ack_ms) = self.last_quorum_ack()?;
        if last_ack_ms.is_some_and(|ms| Duration::from_millis(ms) <= within) {
            return Ok(term);
        }
        let confirmations = &self.lease_confirmations;
        let _turn = confirmations.asking.lock().await;
        {
            // Another ask may have settled it while this one waited for its turn.
            let last = confirmations.last();
            if last
                .confirmed
                .is_some_and(|(t, sent)| t == term && sent.elapsed() <= within)
            {
                return Ok(term);
            }
            if last.refused_at.is_some_and(|at| at >= asked) {
                return Err(LeaseError::NoQuorum(last_ack_ms));
            }
        }
        let answer = self.confirm_quorum(term, last_ack_ms).await;
        let outcome = {
            let mut last = confirmations.last();
            match &answer {
                Ok(sent) => {
                    last.confirmed = Some((term, *sent));
                    "confirmed"
                }
                Err(LeaseError::NotLeader(_)) => "not_leader",
                Err(LeaseError::Unreachable(_)) => "stopped",
                Err(_) => {
                    last.refused_at = Some(Instant::now());
                    "no_quorum"
                }
            }
        };
        metrics::counter!("mcpd_limit_lease_quorum_confirmations_total", "outcome" => outcome)
            .increment(1);
        answer.map(|_| term)
    }

    /// This node's term and how long ago a quorum last acknowledged it, when it leads.
    fn last_quorum_ack(&self) -> Result<(u64, Option<u64>), LeaseError> {
        let m = self.raft.metrics();
        let m = m.borrow();
        if m.current_leader != Some(self.id) {
            return Err(LeaseError::NotLeader(self.id));
        }
        Ok((m.current_term, m.millis_since_quorum_ack))
    }

    fn half_election_timeout(&self) -> Duration {
        Duration::from_millis(self.raft.config().election_timeout_min / 2)
    }

    /// Asks the quorum whether this node still leads in `term`, again while no quorum answers
    /// in time (openraft gives each peer a heartbeat interval) or the answer comes too late to
    /// lean on, until [`CONFIRM_AT_MOST`] or the election timeout. Returns when the heartbeats
    /// the quorum answered were sent: no other node can be elected before that instant plus
    /// the election timeout.
    async fn confirm_quorum(
        &self,
        term: u64,
        last_ack_ms: Option<u64>,
    ) -> Result<Instant, LeaseError> {
        let config = self.raft.config();
        let within = self.half_election_timeout();
        let bound = CONFIRM_AT_MOST.min(Duration::from_millis(config.election_timeout_min));
        let deadline = Instant::now() + bound;
        let no_quorum = || LeaseError::NoQuorum(last_ack_ms);
        loop {
            let sent = Instant::now();
            let left = deadline.saturating_duration_since(sent);
            if left.is_zero() {
                return Err(no_quorum());
            }
            let answer = tokio::time::timeout(left, self.raft.get_read_log_id())
                .await
                .map_err(|_| no_quorum())?
                .map_err(|e| match e {
                    RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)) => None,
                    RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)) => {
                        Some(LeaseError::NotLeader(self.id))
                    }
                    RaftError::Fatal(e) => Some(LeaseError::Unreachable(e.to_string())),
                });
            match answer {
                Ok(_) if sent.elapsed() > within => continue,
                Ok(_) => {
                    return match self.last_quorum_ack()? {
                        (now, _) if now == term => Ok(sent),
                        _ => Err(LeaseError::NotLeader(self.id)),
                    }
                }
                Err(Some(refused)) => return Err(refused),
                Err(None) => {
                    // Each peer had a heartbeat interval to answer; it may yet, within the bound.
                    let pause = RETRY_PAUSE.min(Duration::from_millis(config.heartbeat_interval));
                    tokio::time::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
            }
        }
    }
}
