//! Availability: calls that never got an answer from a node that could have given one (every
//! wait in a node is bounded, so a healthy node answers, if only with `503`), and the recovery
//! figures of a fault: time to a new leader, time until writes succeed again, and the longest
//! stretch without a successful write.

use super::leaders::LeaderSample;
use super::{describe, Check, Counts};
use crate::history::{Micros, Op, Outcome, UnknownCause};

/// A stretch of time in which calls to `node` may legitimately go unanswered (it is stopped,
/// killed, or its link drops packets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impairment {
    pub node: u64,
    pub from: Micros,
    /// `None`: until the end of the scenario.
    pub to: Option<Micros>,
    pub why: String,
}

impl Impairment {
    /// Whether the impairment was in force at any time during `[from, to]`.
    pub(crate) fn overlaps(&self, from: Micros, to: Micros) -> bool {
        self.from <= to && self.to.is_none_or(|t| t >= from)
    }
}

/// Calls that timed out on a node that was not impaired at any time during the call.
pub fn unanswered(ops: &[Op], impairments: &[Impairment]) -> Check {
    let bad: Vec<&Op> = ops
        .iter()
        .filter(|op| {
            matches!(
                op.outcome,
                Outcome::Unknown {
                    cause: UnknownCause::Timeout,
                    ..
                }
            )
        })
        .filter(|op| {
            !impairments
                .iter()
                .any(|i| i.node == op.node && i.overlaps(op.invoke, op.complete))
        })
        .collect();
    let timeouts = ops
        .iter()
        .filter(|op| {
            matches!(
                op.outcome,
                Outcome::Unknown {
                    cause: UnknownCause::Timeout,
                    ..
                }
            )
        })
        .count();
    let summary = format!(
        "{timeouts} calls timed out, {} of them on a node that was not stopped, killed or cut off from the client",
        bad.len()
    );
    if bad.is_empty() {
        Check::pass("every call answered", summary)
    } else {
        Check::fail(
            "every call answered",
            summary,
            bad.iter().take(10).map(|op| describe(op)).collect(),
            Counts {
                unanswered_calls: bad.len(),
                ..Counts::default()
            },
        )
    }
}

/// How a fault relates to the leader, for the recovery figure.
#[derive(Debug, Clone, Default)]
pub struct LeaderImpact {
    /// The fault removed or cut off the leader: recovery is a leader on a node outside
    /// `victims` (a node restarted with its vote may lead again in the same term, so terms
    /// alone do not tell a new leader).
    pub disrupts_leader: bool,
    pub victims: Vec<u64>,
}

/// Recovery figures of one scenario, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// From the fault to the first sample showing a leader (outside the victims, where the
    /// fault hit the leader).
    pub leader_ms: Option<u64>,
    /// From the fault to the first successful write invoked after it.
    pub writes_ms: Option<u64>,
    /// The longest stretch of the load phase without a successful write completing.
    pub longest_pause_ms: u64,
}

/// Computes the recovery figures. `load` is the load phase `[start, end]`.
pub fn recovery(
    ops: &[Op],
    samples: &[LeaderSample],
    fault_at: Micros,
    impact: &LeaderImpact,
    load: (Micros, Micros),
) -> Recovery {
    let leader_at = samples
        .iter()
        .filter(|s| s.at >= fault_at && s.is_leader())
        .filter(|s| !impact.disrupts_leader || !impact.victims.contains(&s.node))
        .map(|s| s.at)
        .min();
    let writes_at = ops
        .iter()
        .filter(|op| op.kind.is_write() && op.invoke >= fault_at && op.outcome.is_ok())
        .map(|op| op.complete)
        .min();
    let mut oks: Vec<Micros> = ops
        .iter()
        .filter(|op| op.kind.is_write() && op.outcome.is_ok())
        .map(|op| op.complete.clamp(load.0, load.1))
        .collect();
    oks.push(load.0);
    oks.push(load.1);
    oks.sort_unstable();
    let longest = oks.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    Recovery {
        leader_ms: leader_at.map(|t| (t - fault_at) / 1000),
        writes_ms: writes_at.map(|t| (t - fault_at) / 1000),
        longest_pause_ms: longest / 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{OpKind, OpResult};

    fn write(invoke: u64, complete: u64, ok: bool, node: u64) -> Op {
        Op {
            id: 0,
            worker: 0,
            node,
            kind: OpKind::CreateTenant { name: "x".into() },
            invoke,
            complete,
            outcome: if ok {
                Outcome::Ok(OpResult::Written { revision: 1 })
            } else {
                Outcome::Unknown {
                    cause: UnknownCause::Timeout,
                    detail: String::new(),
                }
            },
        }
    }

    #[test]
    fn timeouts_count_only_on_healthy_nodes() {
        let ops = [write(0, 5_000, false, 1), write(0, 5_000, false, 2)];
        let imp = [Impairment {
            node: 1,
            from: 1_000,
            to: Some(2_000),
            why: "paused".into(),
        }];
        let c = unanswered(&ops, &imp);
        assert_eq!(c.counts.unanswered_calls, 1);
        assert!(c.evidence[0].contains("node 2"));
    }

    #[test]
    fn recovery_figures() {
        let ops = [
            write(0, 1_000_000, true, 1),
            write(2_000_000, 3_000_000, false, 1),
            write(3_500_000, 4_000_000, true, 2),
        ];
        let samples = [
            LeaderSample {
                at: 2_100_000,
                node: 1,
                term: 1,
                state: "leader".into(),
                leader: Some(1),
            },
            LeaderSample {
                at: 2_900_000,
                node: 2,
                term: 2,
                state: "leader".into(),
                leader: Some(2),
            },
        ];
        let r = recovery(
            &ops,
            &samples,
            2_000_000,
            &LeaderImpact {
                disrupts_leader: true,
                victims: vec![1],
            },
            (0, 5_000_000),
        );
        assert_eq!(r.leader_ms, Some(900));
        assert_eq!(r.writes_ms, Some(2_000));
        assert_eq!(r.longest_pause_ms, 3_000);
    }
}
