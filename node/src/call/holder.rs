//! Who holds a session's subscriptions on a pool's shared processes ([`Holder`]), and whose
//! holds are left to nobody when a node departs ([`Departed`]).

/// Who holds a session's subscriptions on shared processes: the session on one run of the node
/// that serves it, written `NODE.RUN/SESSION` (`RUN`: when that run started, in ms). A node
/// that comes back after dying without stopping has a new run, so its peers let go of what
/// its last run held ([`Departed`]); the sessions it serves again take theirs
/// again under the new one.
pub struct Holder;

impl Holder {
    /// The holder of `session` on run `run` of node `node`.
    pub fn of(node: u64, run: u64, session: &str) -> String {
        format!("{node}.{run}/{session}")
    }

    /// The node and run `holder` names: `NODE.RUN/SESSION`, or `NODE/SESSION` (a build before
    /// runs: no run); `None` for a bare session id (the oldest builds), which is nobody's.
    fn parse(holder: &str) -> Option<(u64, Option<u64>)> {
        let (who, _) = holder.split_once('/')?;
        let (node, run) = match who.split_once('.') {
            Some((n, r)) => (n, r.parse::<u64>().ok()),
            None => (who, None),
        };
        Some((node.parse().ok()?, run))
    }
}

/// A node whose sessions' holds a peer lets go of, since they are nobody's now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departed {
    /// The node came back after dying without stopping, in run `run`: what its earlier runs
    /// held (a run that stopped let go itself). A later run's are kept: a request of a run
    /// that died in the meantime, handled late, takes nothing from the run after it.
    Restarted { node: u64, run: u64 },
    /// The node was removed from the cluster: everything it held.
    Removed { node: u64 },
    /// Every other member runs a build that names its holders (each named its run): the
    /// holds under a bare session id, which only the oldest builds took, have no one left to
    /// let go of them.
    Unattributed,
}

impl Departed {
    /// The node whose holds go; `None`: holds that name no node.
    pub fn node(self) -> Option<u64> {
        match self {
            Departed::Restarted { node, .. } | Departed::Removed { node } => Some(node),
            Departed::Unattributed => None,
        }
    }

    /// The `reason` label of `mcpd_pool_subscription_holds_dropped_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Departed::Restarted { .. } => "restarted",
            Departed::Removed { .. } => "removed",
            Departed::Unattributed => "unattributed",
        }
    }

    /// Whether `holder` ([`Holder`]) is one of the holds this departure leaves to nobody.
    pub fn left(self, holder: &str) -> bool {
        let Some((node, run)) = Holder::parse(holder) else {
            return self == Departed::Unattributed;
        };
        match self {
            Departed::Restarted { node: n, run: r } => node == n && run.is_none_or(|h| h < r),
            Departed::Removed { node: n } => node == n,
            Departed::Unattributed => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Departed, Holder};

    #[test]
    fn a_node_back_from_a_crash_lets_go_only_of_its_earlier_runs_holds() {
        let now = Holder::of(2, 1_700_000_000_123, "s1.abc");
        assert_eq!(now, "2.1700000000123/s1.abc");
        let back = |run| Departed::Restarted { node: 2, run };
        assert!(!back(1_700_000_000_123).left(&now), "this run's");
        assert!(back(1_700_000_999_000).left(&now), "an earlier run's");
        assert!(
            !back(1_699_000_000_000).left(&now),
            "a later run's, when an earlier run's request comes late"
        );
        let other = Departed::Restarted { node: 12, run: 1 };
        assert!(!other.left(&now), "another node's");
        assert!(back(5).left("2/s1.abc"), "a build before runs");
        assert!(!back(5).left("s1.abc"), "a bare session id");
    }

    #[test]
    fn a_node_removed_from_the_cluster_leaves_every_run_s_holds() {
        let removed = Departed::Removed { node: 2 };
        assert!(removed.left(&Holder::of(2, 7, "s1.abc")));
        assert!(removed.left("2/s1.abc"), "a build before runs");
        assert!(!removed.left(&Holder::of(3, 7, "s1.abc")), "another node's");
        assert!(!removed.left("s1.abc"), "a bare session id");
    }

    #[test]
    fn holds_that_name_no_node_go_only_as_unattributed() {
        let nobody = Departed::Unattributed;
        assert!(nobody.left("s1.abc"), "a bare session id");
        assert!(!nobody.left(&Holder::of(2, 7, "s1.abc")), "a run's");
        assert!(!nobody.left("2/s1.abc"), "a build before runs");
    }
}
