//! Election safety: at most one leader per term. Every node's `/v1/cluster/status` is sampled
//! through the scenario; a sample says which term the node is in, whether it is the leader, and
//! which node it believes leads that term. Two different ids claimed or believed for one term
//! is a violation.

use std::collections::{BTreeMap, BTreeSet};

use super::{secs, Check, Counts};
use crate::history::Micros;

/// One node's view, sampled at `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderSample {
    pub at: Micros,
    pub node: u64,
    pub term: u64,
    /// `leader`, `follower`, `candidate`, `learner`, `shutdown`.
    pub state: String,
    /// Who the node believes leads `term`.
    pub leader: Option<u64>,
}

impl LeaderSample {
    pub fn is_leader(&self) -> bool {
        self.state == "leader"
    }
}

/// Checks that no term had two leaders.
pub fn one_leader_per_term(samples: &[LeaderSample]) -> Check {
    let mut by_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for s in samples {
        let ids = by_term.entry(s.term).or_default();
        if s.is_leader() {
            ids.insert(s.node);
        }
        if let Some(l) = s.leader {
            ids.insert(l);
        }
    }
    let bad: Vec<(u64, &BTreeSet<u64>)> = by_term
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(t, ids)| (*t, ids))
        .collect();
    let terms = by_term.keys().copied().collect::<Vec<_>>();
    let range = match (terms.first(), terms.last()) {
        (Some(a), Some(b)) => format!("terms {a}..{b}"),
        _ => "no terms".to_string(),
    };
    let summary = format!(
        "{} samples, {range}: {} terms with two leaders",
        samples.len(),
        bad.len()
    );
    if bad.is_empty() {
        return Check::pass("one leader per term", summary);
    }
    let mut evidence = Vec::new();
    for (term, ids) in &bad {
        evidence.push(format!("term {term} had leaders {ids:?}:"));
        for s in samples
            .iter()
            .filter(|s| s.term == *term && (s.is_leader() || s.leader.is_some()))
            .take(8)
        {
            evidence.push(format!(
                "    at {} node {} ({}) says leader {:?}",
                secs(s.at),
                s.node,
                s.state,
                s.leader
            ));
        }
    }
    Check::fail(
        "one leader per term",
        summary,
        evidence,
        Counts {
            leader_conflicts: bad.len(),
            ..Counts::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: u64, node: u64, term: u64, state: &str, leader: Option<u64>) -> LeaderSample {
        LeaderSample {
            at,
            node,
            term,
            state: state.into(),
            leader,
        }
    }

    #[test]
    fn successive_leaders_in_successive_terms_pass() {
        let samples = [
            s(0, 1, 1, "leader", Some(1)),
            s(0, 2, 1, "follower", Some(1)),
            s(5, 2, 2, "candidate", None),
            s(9, 2, 2, "leader", Some(2)),
            s(9, 1, 1, "leader", Some(1)), // a deposed leader that has not heard yet
            s(12, 3, 2, "follower", Some(2)),
        ];
        assert!(one_leader_per_term(&samples).passed);
    }

    #[test]
    fn two_leaders_in_one_term_fail() {
        let samples = [
            s(0, 1, 3, "leader", Some(1)),
            s(1, 2, 3, "follower", Some(2)),
        ];
        let c = one_leader_per_term(&samples);
        assert!(!c.passed);
        assert!(c.evidence[0].contains("term 3"));
    }
}
