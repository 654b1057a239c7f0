//! The holds of nodes removed from the cluster. A session holds its subscriptions on the node
//! that runs the server from the node that serves it (`crate::mcp::holds`); a removed node never
//! comes back to let go, so when a member leaves the membership this node's pools let go of
//! what that node's sessions held on them (`crate::call::Departed::Removed`). A node back after
//! dying without stopping is the other departure; its event stream tells (`crate::route::peer`).

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
fn applied_members(registry: &Registry) -> BTreeSet<u64> {
    registry
        .local()
        .membership
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect()
}
