//! When each API token was last used, without a Raft write per call: a node notes the tokens
//! it authenticates in memory ([`TokenUses::note`]), and [`report`] writes the ones whose
//! recorded time is more than [`GRANULARITY_S`] old in one `TouchTokens` command every
//! [`REPORT_EVERY`]. A cluster under load thus writes at most one entry per node per interval,
//! and `last_used_at` is right to within about a minute.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use super::state::Command;
use super::Registry;
use crate::shutdown::Shutdown;

/// How often a node reports the tokens it saw.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);

/// A use is reported when the registry's time for the token is older than this (seconds).
pub const GRANULARITY_S: u64 = 60;

/// The uses this node saw, by token id (Unix seconds of the latest).
#[derive(Default)]
pub struct TokenUses {
    seen: Mutex<HashMap<String, u64>>,
}

impl TokenUses {
    pub fn note(&self, id: &str, now: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get_mut(id) {
            Some(at) => *at = (*at).max(now),
            None => {
                seen.insert(id.to_string(), now);
            }
        }
    }

    /// The uses the registry does not know to within [`GRANULARITY_S`]; forgets tokens that
    /// no longer exist.
    fn due(&self, recorded: impl Fn(&str) -> Option<Option<u64>>) -> BTreeMap<String, u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut due = BTreeMap::new();
        seen.retain(|id, at| match recorded(id) {
            None => false,
            Some(last) => {
                if last.is_none_or(|r| r.saturating_add(GRANULARITY_S) < *at) {
                    due.insert(id.clone(), *at);
                }
                true
            }
        });
        due
    }
}

/// Reports this node's token uses until shutdown.
pub async fn report(registry: Registry, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPORT_EVERY) => {}
            _ = shutdown.clone().wait() => return,
        }
        let due = {
            let data = registry.local();
            registry
                .uses
                .due(|id| data.state.tokens.get(id).map(|t| t.info.last_used_at))
        };
        if due.is_empty() {
            continue;
        }
        let n = due.len();
        match registry.write(Command::TouchTokens { used: due }).await {
            Ok(_) => {
                metrics::counter!("mcpd_token_use_reports_total", "outcome" => "ok").increment(1)
            }
            Err(e) => {
                metrics::counter!("mcpd_token_use_reports_total", "outcome" => "error")
                    .increment(1);
                tracing::debug!(tokens = n, error = %e, "token uses not reported; next time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_use_is_due_once_the_registry_lags_it_by_the_granularity() {
        let uses = TokenUses::default();
        uses.note("a", 1_000);
        uses.note("b", 1_000);
        uses.note("gone", 1_000);
        let recorded = |id: &str| match id {
            "a" => Some(Some(1_000 - GRANULARITY_S + 1)),
            "b" => Some(Some(1_000 - GRANULARITY_S - 1)),
            _ => None,
        };
        assert_eq!(uses.due(recorded).keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(
            uses.due(|_| Some(None)).len(),
            2,
            "forgot the removed token"
        );
    }
}
