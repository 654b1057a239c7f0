//! Multi-round-trip calls of the stateless revision (2026-07-28) that wait, parked on this
//! node under an opaque `requestState`, for the client's answers to the server's requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use super::call::Running;
use crate::call::Responder;

/// How long a parked multi-round-trip call waits for the client's retry.
const PARK_TTL: Duration = Duration::from_secs(300);

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

/// Parked calls by `requestState`.
#[derive(Clone, Default)]
pub struct ParkedCalls {
    inner: Arc<Mutex<HashMap<String, Parked>>>,
}

impl ParkedCalls {
    pub fn put(&self, parked: Parked) -> String {
        let mut b = [0u8; 24];
        let token = match getrandom::fill(&mut b) {
            Ok(()) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
            Err(_) => crate::registry::new_request_id(),
        };
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, p| p.created.elapsed() < PARK_TTL);
        map.insert(token.clone(), parked);
        metrics::gauge!("mcpd_mcp_parked_calls").set(map.len() as f64);
        token
    }

    /// The call parked under `token`, if `principal` parked it (another's stays).
    pub fn take(&self, token: &str, principal: &str) -> Option<Parked> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(token).is_some_and(|p| p.principal != principal) {
            return None;
        }
        let p = map.remove(token);
        metrics::gauge!("mcpd_mcp_parked_calls").set(map.len() as f64);
        p.filter(|p| p.created.elapsed() < PARK_TTL)
    }

    /// Drops parked calls whose client never came back (aborting them upstream).
    pub fn expire(&self) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, p| {
            let keep = p.created.elapsed() < PARK_TTL;
            if !keep {
                p.running.handle().abort();
            }
            keep
        });
    }
}
