//! Multi-round-trip calls of the stateless revision (2026-07-28) that wait, parked on this
//! node under an opaque `requestState`, for the client's answers to the server's requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use super::call::Running;
use crate::call::Responder;

/// A call waiting for the client's answers to the server's requests.
pub struct Parked {
    pub principal: String,
    pub running: Running,
    /// The server's requests the client has not answered yet, by input key.
    pub pending: HashMap<String, Responder>,
    /// What each input key asks (`{method, params}`), to ask again if unanswered.
    pub asks: HashMap<String, Value>,
    /// Answers the client's first request gave for keys the server had not asked yet, under
    /// the server's own names: each answers the question of that name once, when it comes.
    pub answers: serde_json::Map<String, Value>,
    /// Every input key this call has issued: none is issued twice.
    pub used: std::collections::HashSet<String>,
    pub next_key: usize,
    pub created: Instant,
}

/// A call that could not be parked: its caller has as many waiting as it may
/// (`mcp.max_parked_calls_per_caller`). The call was cancelled upstream.
#[derive(Debug, thiserror::Error)]
#[error("this caller has {held} calls waiting for its input on this node, the most it may (mcp.max_parked_calls_per_caller); answer or abandon them, or retry later")]
pub struct ParkRefused {
    pub held: usize,
    /// Until the caller's oldest parked call expires.
    pub retry_after: Duration,
}

/// Parked calls by `requestState`, each kept for `ttl` at most, `max_per_caller` per caller.
#[derive(Clone)]
pub struct ParkedCalls {
    inner: Arc<Mutex<HashMap<String, Parked>>>,
    ttl: Duration,
    max_per_caller: usize,
}

impl ParkedCalls {
    pub fn new(ttl: Duration, max_per_caller: usize) -> ParkedCalls {
        ParkedCalls {
            inner: Default::default(),
            ttl,
            max_per_caller,
        }
    }

    /// Parks `parked` under a new opaque token, unless its caller holds its most already:
    /// then the call is cancelled upstream and refused.
    pub fn put(&self, mut parked: Parked) -> Result<String, ParkRefused> {
        // Each wait for the client is `ttl` long, from when it starts.
        parked.created = Instant::now();
        let mut b = [0u8; 24];
        let token = match getrandom::fill(&mut b) {
            Ok(()) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
            Err(_) => crate::registry::new_request_id(),
        };
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.drop_expired(&mut map);
        let mut held = 0;
        let mut oldest: Option<Instant> = None;
        // A call that ended while parked (its request timed out upstream) holds nothing.
        let waiting = map
            .values()
            .filter(|p| p.principal == parked.principal && !p.running.handle().is_finished());
        for p in waiting {
            held += 1;
            oldest = Some(oldest.map_or(p.created, |o| o.min(p.created)));
        }
        if held >= self.max_per_caller {
            parked.running.handle().abort();
            let retry_after = oldest
                .map(|o| self.ttl.saturating_sub(o.elapsed()))
                .unwrap_or_default();
            return Err(ParkRefused { held, retry_after });
        }
        map.insert(token.clone(), parked);
        metrics::gauge!("mcpd_mcp_parked_calls").set(map.len() as f64);
        Ok(token)
    }

    /// The call parked under `token`, if `principal` parked it (another's stays).
    pub fn take(&self, token: &str, principal: &str) -> Option<Parked> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(token).is_some_and(|p| p.principal != principal) {
            return None;
        }
        let p = map.remove(token);
        metrics::gauge!("mcpd_mcp_parked_calls").set(map.len() as f64);
        match p {
            Some(p) if p.created.elapsed() >= self.ttl => {
                p.running.handle().abort();
                metrics::counter!("mcpd_mcp_parked_calls_expired_total").increment(1);
                None
            }
            p => p,
        }
    }

    /// Drops parked calls whose client never came back (aborting them upstream).
    pub fn expire(&self) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.drop_expired(&mut map);
        metrics::gauge!("mcpd_mcp_parked_calls").set(map.len() as f64);
    }

    fn drop_expired(&self, map: &mut HashMap<String, Parked>) {
        map.retain(|_, p| {
            let keep = p.created.elapsed() < self.ttl;
            if !keep {
                p.running.handle().abort();
                metrics::counter!("mcpd_mcp_parked_calls_expired_total").increment(1);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(principal: &str) -> (Parked, super::super::call::CallHandle) {
        let mut running = Running::waiting();
        // Parked calls are detached: their own task polls them, so a cancellation ends them.
        running.detach();
        let handle = running.handle();
        let p = Parked {
            principal: principal.into(),
            running,
            pending: HashMap::new(),
            asks: HashMap::new(),
            answers: Default::default(),
            used: Default::default(),
            next_key: 0,
            created: Instant::now(),
        };
        (p, handle)
    }

    async fn ends(handle: &super::super::call::CallHandle) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handle.is_finished() && Instant::now() < deadline {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        handle.is_finished()
    }

    #[tokio::test]
    async fn only_the_caller_that_parked_a_call_takes_it() {
        let calls = ParkedCalls::new(Duration::from_secs(60), 4);
        let token = calls.put(parked("alice").0).expect("parks");
        assert!(calls.take(&token, "mallory").is_none());
        assert!(
            calls.take(&token, "alice").is_some(),
            "mallory's try left it"
        );
        assert!(calls.take(&token, "alice").is_none(), "taken once");
    }

    #[tokio::test]
    async fn a_caller_with_its_most_parked_is_refused_and_its_call_cancelled() {
        let calls = ParkedCalls::new(Duration::from_secs(60), 2);
        let mut held = Vec::new();
        for _ in 0..2 {
            let (p, h) = parked("alice");
            calls.put(p).expect("within the bound");
            held.push(h);
        }
        let (p, refused) = parked("alice");
        let err = calls.put(p).expect_err("a third is refused");
        assert_eq!(err.held, 2);
        assert!(err.retry_after > Duration::from_secs(50), "{err:?}");
        assert!(err.to_string().contains("mcp.max_parked_calls_per_caller"));
        assert!(
            ends(&refused).await,
            "the refused call is cancelled upstream"
        );
        assert!(
            held.iter().all(|h| !h.is_finished()),
            "the parked ones wait on"
        );
        // Another caller is not held to alice's count.
        calls.put(parked("bob").0).expect("bob parks");
    }

    #[tokio::test]
    async fn a_call_that_ended_while_parked_holds_no_place() {
        let calls = ParkedCalls::new(Duration::from_secs(60), 1);
        let (p, ended) = parked("alice");
        ended.abort();
        assert!(ends(&ended).await);
        calls.put(p).expect("parks");
        calls
            .put(parked("alice").0)
            .expect("the ended one does not count");
        calls
            .put(parked("alice").0)
            .expect_err("the waiting one does");
    }

    #[tokio::test]
    async fn an_expired_call_is_cancelled_and_cannot_be_resumed() {
        let calls = ParkedCalls::new(Duration::ZERO, 4);
        let (p, handle) = parked("alice");
        let token = calls.put(p).expect("parks");
        calls.expire();
        assert!(
            ends(&handle).await,
            "the expired call is cancelled upstream"
        );
        assert!(calls.take(&token, "alice").is_none());
    }
}
