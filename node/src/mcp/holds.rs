//! A session's holds on the upstream subscriptions it made.
//!
//! A pool's shared processes keep a subscription while anyone holds it
//! (`crate::pool::subscriptions`). A session holds its URIs from each node that serves it: the
//! holder is `NODE/SESSION`, so a session whose client moved to another node holds from both,
//! and one node letting go does not withdraw what the other still serves.
//!
//! - A node that rebuilds a session from its signed id (its client moved here, or this node
//!   restarted) takes the session's holds again ([`retake`]), on whichever node runs each
//!   server.
//! - A node lets go of them ([`let_go`]) when the client ends the session, when the session
//!   leaves the node's memory after the idle timeout (a session with an open stream or a call
//!   in flight is not idle), and when the node stops ([`let_go_all`]). The session itself
//!   lives on: a client that comes back continues it, and its holds are taken again. A node
//!   that dies without stopping leaves its holds until the servers' processes end.
//!
//! Both go through the call's route, so a hold on a peer's pool is taken and let go there.
//! They run in the background: the end of a session does not wait on its servers.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;

use super::dispatch::Route;
use super::session::{short, Session};
use super::state::McpState;
use crate::call::{Affinity, EventSink};

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
}

impl LetGo {
    fn label(self) -> &'static str {
        match self {
            LetGo::Ended => "ended",
            LetGo::Idle => "idle",
            LetGo::Stopping => "stopping",
        }
    }
}

/// The holder of `session`'s subscriptions from node `node`.
pub fn holder(node: u64, session: &str) -> String {
    format!("{node}/{session}")
}

/// The affinity of a call of `session`: its id, what its client said at `initialize`, its
/// subscriptions, and this node's hold.
pub fn affinity(state: &McpState, session: &Session) -> Affinity {
    Affinity {
        key: session.id.clone(),
        client_init: json!({
            "protocolVersion": session.protocol_version,
            "capabilities": session.client_capabilities,
            "clientInfo": session.client_info,
        }),
        subscriptions: session
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect(),
        holder: Some(holder(state.registry.id, &session.id)),
    }
}

fn route_of(state: &McpState, session: &Session) -> Route {
    let mut route = state.route(&session.principal, &session.target);
    route.affinity = Some(affinity(state, session));
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
    let uris: Vec<String> = session
        .subscriptions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    if uris.is_empty() {
        return;
    }
    let (state, session) = (state.clone(), session.clone());
    tokio::spawn(async move {
        let route = route_of(&state, &session);
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
    });
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
    let uris: Vec<String> = session
        .subscriptions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    if uris.is_empty() {
        return None;
    }
    let (state, session) = (state.clone(), session.clone());
    Some(async move {
        let route = route_of(&state, &session);
        let releases = uris.iter().map(|uri| {
            let (route, session) = (&route, &session);
            async move {
                let outcome = route.withdraw(uri, quiet_sink()).await;
                count("released", why.label(), outcome.is_ok());
                if let Err(e) = outcome {
                    tracing::info!(session = %short(&session.id), %uri, error = %e.message, reason = why.label(), "a session's subscription was not withdrawn");
                }
            }
        });
        futures_util::future::join_all(releases).await;
    })
}

fn count(action: &'static str, reason: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!("mcpd_mcp_subscription_holds_total", "action" => action, "reason" => reason, "outcome" => outcome)
        .increment(1);
}
