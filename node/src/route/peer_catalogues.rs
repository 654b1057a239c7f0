//! What peers said the servers they run offer: their `initialize` answer and catalogue, kept a
//! few seconds so that a list of several servers does not ask a peer each time.
//!
//! - An answer with a catalogue is kept [`KEPT`]; one without (the server is still starting
//!   there) only [`KEPT_UNLOADED`], so the list that follows its first catalogue reads it.
//! - A server's `list_changed` relayed from a peer, and a peer's stream of them opening again,
//!   drop what is kept of it ([`PeerCatalogues::forget`]) before the clients are told.
//! - An answer asked for before a drop and received after it is not kept: it may be the
//!   old lists ([`PeerCatalogues::generation`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::ServerInfo;

/// How long a peer's answer with a catalogue is used.
const KEPT: Duration = Duration::from_secs(5);
/// How long a peer's answer that a server has no catalogue yet is used.
const KEPT_UNLOADED: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct PeerCatalogues {
    kept: Mutex<HashMap<String, (Instant, ServerInfo)>>,
    /// Bumped by every drop.
    drops: AtomicU64,
}

impl PeerCatalogues {
    /// What is kept of `server`, while it is fresh.
    pub fn get(&self, server: &str) -> Option<ServerInfo> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let (at, info) = kept.get(server)?;
        let fresh = if info.catalogue.loaded {
            KEPT
        } else {
            KEPT_UNLOADED
        };
        (at.elapsed() < fresh).then(|| info.clone())
    }

    /// What is kept of `server`, however old (never a call).
    pub fn last(&self, server: &str) -> Option<ServerInfo> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.get(server).map(|(_, info)| info.clone())
    }

    /// To be read before asking a peer, and given to [`PeerCatalogues::keep`] with its answer.
    pub fn generation(&self) -> u64 {
        self.drops.load(Ordering::Acquire)
    }

    /// Keeps a peer's answer for `server`, asked for at `generation`, unless something was
    /// dropped since.
    pub fn keep(&self, server: &str, info: ServerInfo, generation: u64) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if self.drops.load(Ordering::Acquire) == generation {
            kept.insert(server.to_string(), (Instant::now(), info));
        }
    }

    /// Drops what is kept of `server`: its lists changed.
    pub fn forget(&self, server: &str) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        self.drops.fetch_add(1, Ordering::AcqRel);
        kept.remove(server);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_asked_for_before_a_drop_is_not_kept() {
        let kept = PeerCatalogues::default();
        let asked = kept.generation();
        kept.forget("time");
        kept.keep("time", ServerInfo::default(), asked);
        assert!(kept.get("time").is_none(), "an answer older than the drop");

        let asked = kept.generation();
        kept.keep("time", ServerInfo::default(), asked);
        assert!(kept.last("time").is_some());
        kept.forget("time");
        assert!(kept.last("time").is_none());
    }
}
