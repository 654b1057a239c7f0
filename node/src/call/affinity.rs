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

/// Who holds a session's subscriptions on shared processes: the session on one run of the node
/// that serves it, written `NODE.RUN/SESSION` (`RUN`: when that run started, in ms). A node
/// that comes back after dying without stopping has a new run, so its peers let go of what
/// its last run held ([`Holder::of_another_run`]); the sessions it serves again take theirs
/// again under the new one.
pub struct Holder;

impl Holder {
    /// The holder of `session` on run `run` of node `node`.
    pub fn of(node: u64, run: u64, session: &str) -> String {
        format!("{node}.{run}/{session}")
    }

    /// Whether `holder` is a session on node `node` in a run other than `run`: one of its
    /// earlier runs, or a build before runs (`NODE/SESSION`). A holder of the oldest builds (a
    /// bare session id) is nobody's.
    pub fn of_another_run(holder: &str, node: u64, run: u64) -> bool {
        let Some((who, _)) = holder.split_once('/') else {
            return false;
        };
        let (held_by, held_in) = match who.split_once('.') {
            Some((n, r)) => (n, r.parse::<u64>().ok()),
            None => (who, None),
        };
        held_by.parse::<u64>().ok() == Some(node) && held_in != Some(run)
    }
}

/// A loggable prefix of a (long, signed) session id.
pub fn short(id: &str) -> &str {
    let end = id.len().min(16);
    id.get(..end).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::Holder;

    #[test]
    fn a_node_back_from_a_crash_lets_go_only_of_its_earlier_runs_holds() {
        let now = Holder::of(2, 1_700_000_000_123, "s1.abc");
        assert_eq!(now, "2.1700000000123/s1.abc");
        assert!(
            !Holder::of_another_run(&now, 2, 1_700_000_000_123),
            "this run's"
        );
        assert!(
            Holder::of_another_run(&now, 2, 1_700_000_999_000),
            "an earlier run's"
        );
        assert!(!Holder::of_another_run(&now, 12, 1), "another node's");
        assert!(
            Holder::of_another_run("2/s1.abc", 2, 5),
            "a build before runs"
        );
        assert!(!Holder::of_another_run("s1.abc", 2, 5), "a bare session id");
    }
}
