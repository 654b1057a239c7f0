//! The holds of nodes removed from the cluster. A session holds its subscriptions on the node
//! that runs the server from the node that serves it (`crate::mcp::holds`); a removed node never
//! comes back to let go, so when a member leaves the membership this node's pools let go of
//! what that node's sessions held on them (`crate::call::Departed::Removed`). A node back after
//! dying without stopping is the other departure; its event stream tells (`crate::route::peer`).
//! Holds under a bare session id, which only the oldest builds took, go once every other
//! member's event stream has named its run ([`RunsNamed`], `Departed::Unattributed`).

use std::collections::BTreeSet;

use super::reconcile::Pools;
use crate::call::Departed;
use crate::registry::Registry;
use crate::shutdown::Shutdown;

/// Runs until `shutdown`, letting go of each member's holds once its removal is committed.
pub async fn run(registry: Registry, pools: Pools, shutdown: Shutdown) {
    let mut server = registry.raft.server_metrics();
    let mut members = applied_members(&registry);
    loop {
        tokio::select! {
            changed = server.changed() => if changed.is_err() {
                return;
            },
            _ = shutdown.clone().wait() => return,
        }
        // The membership Raft uses may not be committed yet (a leader that loses it before
        // then takes it back); the one this node applied is.
        let at = server
            .borrow_and_update()
            .membership_config
            .log_id()
            .map(|l| l.index);
        let applied = registry.raft.wait(None);
        tokio::select! {
            applied = applied.applied_index_at_least(at, "the membership applied") => if applied.is_err() {
                return;
            },
            _ = shutdown.clone().wait() => return,
        }
        let now = applied_members(&registry);
        for &node in members.difference(&now) {
            if node != registry.id {
                tracing::info!(
                    node,
                    "a node left the cluster: letting go of its sessions' subscriptions"
                );
                pools.let_go_of(Departed::Removed { node }).await;
            }
        }
        members = now;
    }
}

/// The voters and learners of the membership this node applied (both sides of a joint one).
pub fn applied_members(registry: &Registry) -> BTreeSet<u64> {
    registry
        .local()
        .membership
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect()
}

/// The peers whose event streams named their run, as last heard: each runs a build that names
/// its holders. A stream without a run (a build before runs, one rolled back) takes its node
/// off again.
#[derive(Default)]
pub struct RunsNamed(std::sync::Mutex<BTreeSet<u64>>);

impl RunsNamed {
    /// Records what `node`'s event stream said (`run`: 0 when it names none); `true` when
    /// every member of `members` but `me` has named its run, so no one is left to let go of
    /// holds under a bare session id.
    pub fn heard(&self, node: u64, run: u64, members: &BTreeSet<u64>, me: u64) -> bool {
        let mut named = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if run == 0 {
            named.remove(&node);
            return false;
        }
        named.insert(node);
        members.iter().all(|m| *m == me || named.contains(m))
    }
}

#[cfg(test)]
mod tests {
    use super::RunsNamed;

    #[test]
    fn bare_holds_go_once_every_other_member_has_named_its_run() {
        let members = [1, 2, 3].into_iter().collect();
        let runs = RunsNamed::default();
        assert!(!runs.heard(2, 10, &members, 1), "node 3 has not named one");
        assert!(
            !runs.heard(3, 0, &members, 1),
            "node 3 runs a build before runs"
        );
        assert!(
            runs.heard(3, 11, &members, 1),
            "upgraded: every other member named one"
        );
        assert!(
            !runs.heard(2, 0, &members, 1),
            "node 2 rolled back to a build before runs"
        );
        assert!(!runs.heard(3, 11, &members, 1), "node 2 still runs it");
        assert!(runs.heard(2, 12, &members, 1), "and upgraded again");
        let grown = [1, 2, 3, 4].into_iter().collect();
        assert!(
            !runs.heard(3, 11, &grown, 1),
            "a new member has not named one yet"
        );
    }
}
