//! The holds of nodes removed from the cluster. A session holds its subscriptions on the node
//! that runs the server from the node that serves it (`crate::mcp::holds`); a removed node never
//! comes back to let go, so when a member leaves the membership this node's pools let go of
//! what that node's sessions held on them (`crate::call::Departed::Removed`). A node back after
//! dying without stopping is the other departure; its event stream tells (`crate::route::peer`).
//! Holds under a bare session id, which only the oldest builds took, go once every other
//! member has an event stream open that named its run ([`RunsNamed`],
//! `Departed::Unattributed`): checked when a stream opens and when the membership changes.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::reconcile::Pools;
use crate::call::Departed;
use crate::registry::Registry;
use crate::shutdown::Shutdown;

/// Runs until `shutdown`, letting go of each member's holds once its removal is committed.
pub async fn run(registry: Registry, pools: Pools, runs: Arc<RunsNamed>, shutdown: Shutdown) {
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
        // The last member of the oldest builds may have left rather than been upgraded.
        if now != members {
            let_go_of_unattributed(&runs, &pools, &now, registry.id).await;
        }
        members = now;
    }
}

/// Lets go of the holds under a bare session id once every member of `members` but `me` has
/// an event stream open that named its run ([`RunsNamed::every_run_named`]).
pub async fn let_go_of_unattributed(
    runs: &RunsNamed,
    pools: &Pools,
    members: &BTreeSet<u64>,
    me: u64,
) {
    if runs.every_run_named(members, me) {
        pools.let_go_of(Departed::Unattributed).await;
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

/// The peers' open event streams, by whether they named their run (a build that names its
/// holders) or not (a build before runs, or one rolled back to it). A stream counts while it
/// is open ([`OpenStream`]), so a node that went away, or came back on an older build, is not
/// counted on its last word.
#[derive(Default)]
pub struct RunsNamed(std::sync::Mutex<std::collections::HashMap<u64, Streams>>);

#[derive(Default, Clone, Copy)]
struct Streams {
    named: u32,
    unnamed: u32,
}

impl Streams {
    /// The count of open streams that named their run, or of those that did not.
    fn of(&mut self, named: bool) -> &mut u32 {
        if named {
            &mut self.named
        } else {
            &mut self.unnamed
        }
    }
}

/// One open event stream of a peer, counted in [`RunsNamed`] until dropped.
pub struct OpenStream {
    runs: Arc<RunsNamed>,
    node: u64,
    named: bool,
}

impl RunsNamed {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Streams>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an event stream `node` opened (`run`: 0 when it named none).
    pub fn opened(self: &Arc<Self>, node: u64, run: u64) -> OpenStream {
        let named = run != 0;
        *self.lock().entry(node).or_default().of(named) += 1;
        OpenStream {
            runs: self.clone(),
            node,
            named,
        }
    }

    /// Whether every member of `members` but `me` (one at least) has an event stream open
    /// that named its run, and none that did not: no node is left to let go of holds under a
    /// bare session id.
    pub fn every_run_named(&self, members: &BTreeSet<u64>, me: u64) -> bool {
        let streams = self.lock();
        let mut others = members.iter().filter(|m| **m != me).peekable();
        others.peek().is_some()
            && others.all(|m| {
                streams
                    .get(m)
                    .is_some_and(|s| s.named > 0 && s.unnamed == 0)
            })
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut streams = self.runs.lock();
        if let Some(s) = streams.get_mut(&self.node) {
            let open = s.of(self.named);
            *open = open.saturating_sub(1);
            if s.named == 0 && s.unnamed == 0 {
                streams.remove(&self.node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::RunsNamed;

    #[test]
    fn bare_holds_go_once_every_other_member_has_a_stream_open_that_named_its_run() {
        let members = [1, 2, 3].into_iter().collect();
        let runs = Arc::new(RunsNamed::default());
        assert!(
            !runs.every_run_named(&[1].into_iter().collect(), 1),
            "no other member"
        );
        let two = runs.opened(2, 10);
        assert!(
            !runs.every_run_named(&members, 1),
            "node 3 has no stream open"
        );
        let three_old = runs.opened(3, 0);
        assert!(
            !runs.every_run_named(&members, 1),
            "node 3 runs a build before runs"
        );
        drop(three_old);
        let three = runs.opened(3, 11);
        assert!(
            runs.every_run_named(&members, 1),
            "upgraded: every other member named one"
        );
        drop(two);
        assert!(
            !runs.every_run_named(&members, 1),
            "node 2's stream closed: it may come back older"
        );
        let _two_old = runs.opened(2, 0);
        assert!(
            !runs.every_run_named(&members, 1),
            "node 2 rolled back to a build before runs"
        );
        let _two = runs.opened(2, 12);
        assert!(
            !runs.every_run_named(&members, 1),
            "its old stream is still open"
        );
        drop(_two_old);
        assert!(
            runs.every_run_named(&members, 1),
            "and now only its new one"
        );
        let grown = [1, 2, 3, 4].into_iter().collect();
        assert!(
            !runs.every_run_named(&grown, 1),
            "a new member has no stream open yet"
        );
        drop(three);
    }
}
