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
}

impl Affinity {
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
