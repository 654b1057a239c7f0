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

/// Runs until `shutdown`, letting go of each member's holds as it is removed.
pub async fn run(registry: Registry, pools: Pools, shutdown: Shutdown) {
    let mut metrics = registry.raft.server_metrics();
    let mut members = member_ids(&metrics.borrow_and_update());
    loop {
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                return;
            },
            _ = shutdown.clone().wait() => return,
        }
        let now = member_ids(&metrics.borrow_and_update());
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

/// The voters and learners of the membership `m` names (both sides of a joint one).
fn member_ids(
    m: &openraft::metrics::RaftServerMetrics<u64, mcpcp_proto::api::Member>,
) -> BTreeSet<u64> {
    m.membership_config
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect()
}
