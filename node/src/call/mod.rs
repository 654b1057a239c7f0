//! The contract of one call through the node, below the front end, the router and the pools:
//!
//! - [`Call`]: who asks which server for what, for which session, and where the server's
//!   messages for the call go. It passes down whole: front end → router → pool or peer.
//! - [`events`]: those messages ([`CallEvent`]) and the answers to the server's requests.
//! - [`error`]: how an attempt failed ([`CallError`]), typed; wire codes are made at the edge.
//! - [`affinity`]: the downstream session, for servers that run a process per session.
//! - [`holder`]: who holds a session's subscriptions on shared processes, and whose holds go
//!   when a node departs.

pub mod affinity;
pub mod error;
pub mod events;
pub mod holder;

use std::sync::Arc;

use serde_json::Value;

pub use affinity::{Affinity, HoldOp};
pub use error::CallError;
pub use events::{CallEvent, EventSink, Responder};
pub use holder::{Departed, Holder};

use crate::registry::Principal;

/// One request on its way to a server.
#[derive(Debug, Clone)]
pub struct Call {
    /// Who asks (scope, tenant, and the token id a peer re-checks).
    pub principal: Principal,
    /// The server's registry name.
    pub server: String,
    pub method: String,
    pub params: Option<Value>,
    /// The downstream session, for servers in `session_mode = dedicated`.
    pub affinity: Option<Affinity>,
    /// Where progress, logging and the server's own requests for this call go.
    pub events: EventSink,
    /// Which other servers (fallbacks) the call may be sent to, as the front end's policies
    /// decide; `None`: any the router would pick.
    pub fallback_gate: Option<FallbackGate>,
}

/// The front end's verdict on sending a call to another server than the one it named.
#[derive(Clone)]
pub struct FallbackGate(pub Arc<GateFn>);

/// Whether the call, with these params, may go to this server.
pub type GateFn = dyn Fn(&str, Option<&Value>) -> bool + Send + Sync;

impl std::fmt::Debug for FallbackGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FallbackGate")
    }
}

impl Call {
    /// The tool a `tools/call` names (empty for other methods).
    pub fn tool(&self) -> &str {
        self.params
            .as_ref()
            .and_then(|p| p["name"].as_str())
            .unwrap_or_default()
    }

    /// Whether the call may go to `server` in place of its own (see [`Call::fallback_gate`]).
    pub fn may_fall_back_to(&self, server: &str) -> bool {
        self.fallback_gate
            .as_ref()
            .is_none_or(|g| (g.0)(server, self.params.as_ref()))
    }

    /// The same call sent to another server (a fallback).
    pub fn to(&self, server: &str) -> Call {
        Call {
            server: server.to_string(),
            ..self.clone()
        }
    }
}
