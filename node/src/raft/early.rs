//! Early replication: a leader sends its new entries to its followers while its own fsync of
//! them runs.
//!
//! openraft 0.9 waits for the leader's own log flush before it hands new entries to its
//! replication tasks, so a write pays two fsyncs one after the other: the leader's, then a
//! follower's. Raft does not need that order (the leader may send entries before they are
//! durable on its own disk, as long as it counts itself towards a commit only once they are,
//! which openraft still does), and etcd does not pay it.
//!
//! So when the log store takes an append as the leader, it also hands the entries here, and
//! this module sends them at once, as an ordinary `AppendEntries` of the leader's vote, to
//! every voter known to be in step (its log reaches at least where these entries begin). The
//! follower's openraft checks and appends them as it would any `AppendEntries`, fsync
//! included. When openraft's own replication of the same entries arrives a moment later,
//! the follower already holds them and answers at once, with no second write. The two
//! fsyncs overlap.
//!
//! A follower's `Success` to an early append is published to [`super::network::EarlyAcks`]:
//! it proves the follower holds the leader's log, durably, up to that entry under that vote,
//! so openraft's own append of those entries can be answered from it without waiting for the
//! follower's reply (see `PeerClient::append_over_stream`). Nothing else is taken from early
//! appends: one that fails, arrives out of order or is refused costs nothing but the message,
//! and the follower's own checks decide what it appends, as for any `AppendEntries`.
//!
//! **What makes it safe.** A follower may now hold entries the leader has not made durable. A
//! leader that crashes loses those, and were it to lead again *under the same vote*, it would
//! reuse their log ids for other entries, which followers holding the early copies would take
//! for the same ones. That never happens: `LogStore::open` hands a restarting leader its vote
//! back uncommitted, so it must win a new election (a new vote, new log ids) before it leads
//! again (tested by `a_restarted_leader_gets_its_vote_back_uncommitted`). Node ids are never
//! reused, and a follower's early acknowledgements are forgotten when it leaves the voters.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::network::{RPCOption, RaftNetwork};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use tokio::sync::mpsc;

use super::network::{EarlyAck, EarlyAcks, NetworkFactory, PeerClient};
use super::typ::{Entry, LogId, RaftMetrics, Vote};
use super::{NodeId, Raft};

/// How long an early append may take before it is given up (openraft's own replication
/// carries the entries anyway).
const EARLY_TTL: Duration = Duration::from_secs(1);
/// Early appends queued for one follower while one is on its way; further ones are skipped.
const PER_PEER_QUEUE: usize = 1;

/// Entries a leader is appending to its log, as the log store saw them.
#[derive(Debug, Clone)]
pub struct EarlyAppend {
    /// The leader's vote (committed, this node's).
    pub vote: Vote,
    /// The log id just before the first entry.
    pub prev: Option<LogId>,
    pub entries: Vec<Entry>,
    /// The commit index the leader knew (never ahead of the real one).
    pub committed: Option<LogId>,
}

impl EarlyAppend {
    fn last(&self) -> Option<LogId> {
        self.entries.last().map(|e| e.log_id).or(self.prev)
    }
}

/// The followers' early-append queues, as the log store reaches them: it puts a leader's
/// append straight into each, with no task in between. Cheap to clone.
#[derive(Clone, Default)]
pub struct EarlyPeers(Arc<RwLock<Vec<mpsc::Sender<Arc<EarlyAppend>>>>>);

impl EarlyPeers {
    /// Queues `append` for every voter; a follower whose queue already holds one (behind the
    /// one on its way) skips this one: openraft's replication carries it, and a longer queue
    /// would only build a backlog that replication overtakes.
    pub fn send(&self, append: EarlyAppend) {
        let append = Arc::new(append);
        let queues = self.0.read().unwrap_or_else(|p| p.into_inner());
        for q in queues.iter() {
            if q.try_send(append.clone()).is_err() {
                metrics::counter!("mcpd_raft_early_appends_total", "outcome" => "skipped")
                    .increment(1);
            }
        }
    }

    fn set(&self, queues: Vec<mpsc::Sender<Arc<EarlyAppend>>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = queues;
    }
}

/// Keeps one early sender per voter other than `me`, following the membership, until Raft
/// stops. Each publishes what its follower acknowledged in `acks`.
pub async fn run(
    me: NodeId,
    raft: Raft,
    network: NetworkFactory,
    peers: EarlyPeers,
    acks: EarlyAcks,
) {
    let mut senders: HashMap<NodeId, (String, mpsc::Sender<Arc<EarlyAppend>>)> = HashMap::new();
    let mut server = raft.server_metrics();
    loop {
        let targets: Vec<(NodeId, mcpcp_proto::api::Member)> = {
            let m = server.borrow_and_update();
            let membership = m.membership_config.membership();
            membership
                .voter_ids()
                .filter(|id| *id != me)
                .filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone())))
                .collect()
        };
        senders.retain(|id, (addr, _)| {
            let keep = targets.iter().any(|(t, m)| t == id && m.grpc_addr == *addr);
            if !keep {
                // What a former voter acknowledged says nothing about whoever comes back under
                // its id or address.
                acks.sender(*id).send_replace(None);
            }
            keep
        });
        for (id, member) in targets {
            senders.entry(id).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PER_PEER_QUEUE);
                let client = network.client_for(id, &member).for_early();
                tokio::spawn(send_loop(id, client, raft.metrics(), acks.sender(id), rx));
                (member.grpc_addr.clone(), tx)
            });
        }
        peers.set(senders.values().map(|(_, tx)| tx.clone()).collect());
        if server.changed().await.is_err() {
            peers.set(Vec::new());
            return;
        }
    }
}

/// Sends early appends to one follower, one at a time, in order.
async fn send_loop(
    target: NodeId,
    mut client: PeerClient,
    metrics: tokio::sync::watch::Receiver<RaftMetrics>,
    acks: tokio::sync::watch::Sender<EarlyAck>,
    mut appends: mpsc::Receiver<Arc<EarlyAppend>>,
) {
    while let Some(append) = appends.recv().await {
        let matched = metrics
            .borrow()
            .replication
            .as_ref()
            .and_then(|r| r.get(&target).copied());
        if !in_step(&append, matched, *acks.borrow()) {
            metrics::counter!("mcpd_raft_early_appends_total", "outcome" => "skipped").increment(1);
            continue;
        }
        let rpc = AppendEntriesRequest {
            vote: append.vote,
            prev_log_id: append.prev,
            entries: append.entries.clone(),
            leader_commit: append.committed,
        };
        let outcome = client.append_entries(rpc, RPCOption::new(EARLY_TTL)).await;
        let label = match outcome {
            Ok(AppendEntriesResponse::Success) => {
                if let Some(last) = append.last() {
                    acks.send_replace(Some((append.vote, last)));
                }
                "accepted"
            }
            Ok(_) => "refused",
            Err(e) => {
                tracing::debug!(peer = target, error = %e, "early append failed");
                "failed"
            }
        };
        metrics::counter!("mcpd_raft_early_appends_total", "outcome" => label).increment(1);
    }
}

/// Whether the follower holds the leader's log up to `append`'s start, so that the append
/// continues it: openraft's replication has matched at least that far (`matched` is the
/// follower's entry in the leader's metrics, which are this leader's), or the follower
/// acknowledged an early append of the same vote that did (`acked`; a refused or failed one
/// later does not undo that: what it holds durably, it keeps). After a skipped append, the next
/// one sent is the first whose start replication has reached.
fn in_step(append: &EarlyAppend, matched: Option<Option<LogId>>, acked: EarlyAck) -> bool {
    matched.is_some_and(|m| m >= append.prev)
        || acked.is_some_and(|(v, l)| v == append.vote && Some(l) >= append.prev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::blank_ent;

    fn append(vote: Vote, prev: Option<u64>) -> EarlyAppend {
        let at = |i| blank_ent::<super::super::TypeConfig>(1, 1, i).log_id;
        let first = prev.map_or(0, |p| p + 1);
        EarlyAppend {
            vote,
            prev: prev.map(at),
            entries: vec![blank_ent(1, 1, first)],
            committed: None,
        }
    }

    #[test]
    fn an_append_goes_early_only_to_a_follower_whose_log_reaches_where_it_begins() {
        let v = Vote::new_committed(1, 1);
        let id = |i| blank_ent::<super::super::TypeConfig>(1, 1, i).log_id;
        let at = |i| Some(id(i));
        let a = append(v, Some(4));
        assert!(
            in_step(&a, Some(at(4)), None),
            "replication matched up to 4"
        );
        assert!(!in_step(&a, Some(at(3)), None), "the follower lacks 4");
        assert!(
            in_step(&a, Some(at(6)), None),
            "replication went past 4 (an append skipped earlier)"
        );
        assert!(!in_step(&a, None, None), "nothing known of the follower");
        assert!(
            in_step(&a, Some(at(3)), Some((v, id(4)))),
            "an early append of the same vote ended at 4"
        );
        assert!(
            !in_step(&a, Some(at(3)), Some((Vote::new_committed(0, 2), id(4)))),
            "what another leader's append reached proves nothing"
        );
        assert!(in_step(&append(v, None), Some(None), None), "an empty log");
    }

    #[test]
    fn the_end_of_an_append_is_its_last_entry() {
        let a = append(Vote::new_committed(1, 1), Some(4));
        assert_eq!(a.last().map(|l| l.index), Some(5));
    }
}
