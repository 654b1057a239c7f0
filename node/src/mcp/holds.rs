//! A session's holds on the upstream subscriptions it made.
//!
//! A pool's shared processes keep a subscription while anyone holds it
//! (`crate::pool::subscriptions`). A session holds its URIs from each node that serves it: the
//! holder is `NODE.RUN/SESSION` (`crate::call::Holder`), so a session whose client moved to
//! another node holds from both, and one node letting go does not withdraw what the other
//! still serves.
//!
//! - A node that rebuilds a session from its signed id (its client moved here, or this node
//!   restarted) takes the session's holds again ([`retake`]), on whichever node runs each
//!   server.
//! - A node lets go of them ([`let_go`]) when the client ends the session, when the session
//!   leaves the node's memory after the idle timeout (a session with an open stream or a call
//!   in flight is not idle), and when the node stops ([`let_go_all`]). The session itself
//!   lives on: a client that comes back continues it, and its holds are taken again.
//! - A node that died without stopping lets go of nothing itself: when it comes back, its
//!   peers let go of what its earlier run held as soon as it asks them for their events
//!   (`crate::route::peer`), and the sessions it serves again take theirs again. A node
//!   removed from the cluster has all its holds let go by the others (`crate::pool::departed`).
//! - A subscribe the session does not keep, which the server may have taken, is withdrawn
//!   ([`disown`]): its client left before the answer, it failed (a hop that broke may follow
//!   a run), or the session's cap filled meanwhile. The pool records a subscribe that reached
//!   a process even when its caller is gone, or that may have run (it timed out, or the
//!   connection broke after it went) (`crate::pool`), so there is a hold to withdraw.
//!
//! Both go through the call's route, so a hold on a peer's pool is taken and let go there,
//! marked as the node's own ([`HoldOp`]): a server with nothing to do for one answers it at
//! once. They run in the background (the end of a session does not wait on its servers), and
//! a session's run one after the other in the order they began ([`Turns`]): a session dropped
//! as idle whose client comes back at that moment lets go, then takes again, never the other
//! way round.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use serde_json::json;
use tokio::sync::mpsc;

use super::dispatch::Route;
use super::session::{short, Session};
use super::state::McpState;
use crate::call::{Affinity, EventSink, HoldOp, Holder};

/// The hold operations of each session in progress, each to run after the one before it.
#[derive(Clone, Default)]
pub struct Turns(Arc<Mutex<HashMap<String, Shared<BoxFuture<'static, ()>>>>>);

impl Turns {
    /// `op`, to run once the operations of session `id` that began before it are done.
    fn after(
        &self,
        id: &str,
        op: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut turns = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let before = turns.remove(id);
        let this = async move {
            if let Some(before) = before {
                before.await;
            }
            op.await;
        }
        .boxed()
        .shared();
        turns.insert(id.to_string(), this.clone());
        let (all, id) = (self.clone(), id.to_string());
        async move {
            this.clone().await;
            let mut turns = all.0.lock().unwrap_or_else(|p| p.into_inner());
            // Forgotten unless a later operation took its place.
            if turns.get(&id).is_some_and(|last| last.ptr_eq(&this)) {
                turns.remove(&id);
            }
        }
    }
}

/// Why a node lets go of a session's holds (the `reason` label of the metric).
#[derive(Debug, Clone, Copy)]
pub enum LetGo {
    /// The client ended the session (DELETE).
    Ended,
    /// The session left this node's memory after the idle timeout.
    Idle,
    /// The node is stopping: a client that continues the session elsewhere (or here, after
    /// the restart) takes its holds again.
    Stopping,
    /// A subscribe the session does not keep, which the server may have taken: its client
    /// left before the answer.
    Abandoned,
    /// The same, answered with an error (a hop that broke may follow a run), or taken when
    /// the session's cap had filled meanwhile.
    NotKept,
}

impl LetGo {
    fn label(self) -> &'static str {
        match self {
            LetGo::Ended => "ended",
            LetGo::Idle => "idle",
            LetGo::Stopping => "stopping",
            LetGo::Abandoned => "abandoned",
            LetGo::NotKept => "not_kept",
        }
    }
}

/// The affinity of a call of `session`: its id, what its client said at `initialize`, its
/// subscriptions, and this node's hold.
pub fn affinity(state: &McpState, session: &Session) -> Affinity {
    affinity_for(state, session, None)
}

fn affinity_for(state: &McpState, session: &Session, hold: Option<HoldOp>) -> Affinity {
    Affinity {
        key: session.id.clone(),
        client_init: json!({
            "protocolVersion": session.protocol_version,
            "capabilities": session.client_capabilities,
            "clientInfo": session.client_info,
        }),
        subscriptions: session.subscribed(),
        holder: Some(Holder::of(
            state.registry.id,
            state.registry.run,
            &session.id,
        )),
        hold,
    }
}

fn route_of(state: &McpState, session: &Session, op: HoldOp) -> Route {
    let mut route = state.route(&session.principal, &session.target);
    route.affinity = Some(affinity_for(state, session, Some(op)));
    route
}

/// A sink for a call the node makes on its own: whatever the server sends while it runs is
/// read and dropped.
fn quiet_sink() -> EventSink {
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    EventSink::new(tx)
}

/// Takes the holds of `session`, rebuilt on this node with the subscriptions the registry
/// keeps of it, in the background. A URI the session let go of meanwhile is skipped.
pub fn retake(state: &McpState, session: &Arc<Session>) {
    let uris = session.subscribed();
    if uris.is_empty() {
        return;
    }
    let turns = state.hold_turns.clone();
    let (state, session, id) = (state.clone(), session.clone(), session.id.clone());
    let op = async move {
        let route = route_of(&state, &session, HoldOp::Retake);
        let takes = uris.iter().map(|uri| {
            let (route, session) = (&route, &session);
            async move {
                if !session.is_subscribed(uri) {
                    return;
                }
                let params = Some(json!({ "uri": uri }));
                let outcome = route
                    .dispatch("resources/subscribe", params, quiet_sink())
                    .await;
                count("taken", "continued", outcome.is_ok());
                if let Err(e) = outcome {
                    tracing::info!(session = %short(&session.id), %uri, error = %e.message, "a continued session's subscription was not taken again");
                }
            }
        });
        futures_util::future::join_all(takes).await;
    };
    tokio::spawn(turns.after(&id, op));
}

/// Lets go of the holds of `session` on every server that has them, in the background.
pub fn let_go(state: &McpState, session: &Arc<Session>, why: LetGo) {
    if let Some(releases) = releases(state, session, why) {
        tokio::spawn(releases);
    }
}

/// Lets go of the holds of every session in this node's memory, as the node stops, waiting
/// at most `within`: otherwise the servers on other nodes would keep them for sessions no
/// node serves.
pub async fn let_go_all(state: &McpState, within: std::time::Duration) {
    let all: Vec<_> = state
        .sessions
        .all()
        .iter()
        .filter_map(|s| releases(state, s, LetGo::Stopping))
        .collect();
    if all.is_empty() {
        return;
    }
    let n = all.len();
    if tokio::time::timeout(within, futures_util::future::join_all(all))
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = n,
            "not every session's subscriptions were withdrawn before the node stopped"
        );
    }
}

/// What letting go of `session`'s holds takes: one withdrawal per URI, all at once; `None`
/// when it holds none.
fn releases(
    state: &McpState,
    session: &Arc<Session>,
    why: LetGo,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let uris = session.subscribed();
    if uris.is_empty() {
        return None;
    }
    let turns = state.hold_turns.clone();
    let (state, session, id) = (state.clone(), session.clone(), session.id.clone());
    let op = async move {
        let route = route_of(&state, &session, HoldOp::Withdraw);
        let releases = uris.iter().map(|uri| withdraw(&route, &session, uri, why));
        futures_util::future::join_all(releases).await;
    };
    Some(turns.after(&id, op))
}

/// Withdraws the hold on `uri` that a subscribe of `session` may have taken and the session
/// does not keep (`why`), in the background, in the session's turn. Skipped if the session
/// holds the URI by then (another subscribe of it was kept).
pub fn disown(state: &McpState, session: &Arc<Session>, uri: String, why: LetGo) {
    let turns = state.hold_turns.clone();
    let (state, session, id) = (state.clone(), session.clone(), session.id.clone());
    let op = async move {
        if session.is_subscribed(&uri) {
            return;
        }
        let route = route_of(&state, &session, HoldOp::Withdraw);
        withdraw(&route, &session, &uri, why).await;
    };
    tokio::spawn(turns.after(&id, op));
}

async fn withdraw(route: &Route, session: &Session, uri: &str, why: LetGo) {
    let outcome = route.withdraw(uri, quiet_sink()).await;
    count("released", why.label(), outcome.is_ok());
    if let Err(e) = outcome {
        tracing::info!(session = %short(&session.id), %uri, error = %e.message, reason = why.label(), "a session's subscription was not withdrawn");
    }
}

fn count(action: &'static str, reason: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!("mcpd_mcp_subscription_holds_total", "action" => action, "reason" => reason, "outcome" => outcome)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sessions_operations_run_one_after_the_other_in_the_order_they_began() {
        let turns = Turns::default();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let mark = |n: u32| {
            let ran = ran.clone();
            move || ran.lock().unwrap().push(n)
        };
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (first_done, second_done, other_done) = (mark(1), mark(2), mark(3));
        let first = turns.after("s", async move {
            let _ = wait.await;
            first_done();
        });
        let second = turns.after("s", async move { second_done() });
        let other = turns.after("t", async move { other_done() });
        // The later one is started first, and another session's runs at once.
        let second = tokio::spawn(second);
        tokio::spawn(other).await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(*ran.lock().unwrap(), [3], "the second waits for the first");
        go.send(()).unwrap();
        tokio::spawn(first).await.unwrap();
        second.await.unwrap();
        assert_eq!(*ran.lock().unwrap(), [3, 1, 2]);
        assert!(turns.0.lock().unwrap().is_empty(), "forgotten once done");
    }
}
