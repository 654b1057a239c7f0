//! Which downstream session a call belongs to.

use serde_json::Value;

/// Which downstream session a call belongs to, for servers in `session_mode = dedicated`: the
/// session gets a process of its own, initialised with the client's own parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Affinity {
    /// The downstream session id.
    pub key: String,
    /// The client's `initialize` params (protocolVersion, capabilities, clientInfo).
    pub client_init: Value,
    /// Resource subscriptions to restore on a new process.
    pub subscriptions: Vec<String>,
    /// Who holds the session's subscriptions on shared processes: the session on the node
    /// that serves it (`crate::mcp::holds`). `None` (a node before holders): the session id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Set on a subscribe or unsubscribe the node makes for the session itself, not one its
    /// client sent (`crate::mcp::holds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldOp>,
}

/// A subscribe or unsubscribe the node makes for a session: a server with nothing to do for
/// it (a dedicated process not running, a URI its pool does not know) answers it at once,
/// without starting a process or waiting for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HoldOp {
    /// The session's subscriptions, taken again by a node that rebuilt it.
    Retake,
    /// The session's subscriptions, let go.
    Withdraw,
}

impl Affinity {
    /// The holder of this session's subscriptions on a pool's shared processes.
    pub fn holder(&self) -> &str {
        self.holder.as_deref().unwrap_or(&self.key)
    }

    /// A loggable prefix of the session id (ids are long and signed).
    pub fn short_key(&self) -> &str {
        short(&self.key)
    }
}

/// A loggable prefix of a (long, signed) session id.
pub fn short(id: &str) -> &str {
    let end = id.len().min(16);
    id.get(..end).unwrap_or(id)
}
