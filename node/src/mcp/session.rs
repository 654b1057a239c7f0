//! Downstream sessions of the session-based revisions (2025-06-18, 2025-11-25): what the
//! client told us at `initialize`, what it subscribed to, and the requests in flight between
//! it and the server processes (to route answers and cancellations).
//!
//! Sessions live in this node's memory and expire after an idle timeout. The 2026-07-28
//! revision has no sessions; its requests carry everything in `_meta`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcpcp_proto::mcp::{Message, RequestId};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::pool::process::Responder;
use crate::registry::Principal;

/// Which servers a session talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/mcp`: every server the token's tenant may use, names prefixed `server__`.
    Aggregate,
    /// `/servers/{name}/mcp`: one server, names unchanged.
    Server(String),
}

pub struct Session {
    pub id: String,
    pub principal: Principal,
    pub target: Target,
    pub protocol_version: String,
    pub client_info: Value,
    pub client_capabilities: Value,
    pub created: Instant,
    last_seen: Mutex<Instant>,
    pub log_level: Mutex<Option<String>>,
    pub subscriptions: Mutex<BTreeSet<String>>,
    /// Server→client requests by the id the client saw.
    pub server_requests: Mutex<HashMap<RequestId, Responder>>,
    /// Client requests in flight, to cancel on `notifications/cancelled`.
    pub in_flight: Mutex<HashMap<RequestId, tokio::task::AbortHandle>>,
    next_request: AtomicU64,
    /// The standalone GET stream, when the client opened one.
    pub stream: Mutex<Option<mpsc::Sender<Message>>>,
}

impl Session {
    pub fn touch(&self) {
        *self.last_seen.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Registers a server→client request; returns the id to show the client.
    pub fn register_server_request(&self, responder: Responder) -> RequestId {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let id = RequestId::Str(format!("mcpd-s{n}"));
        self.server_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), responder);
        id
    }

    pub fn take_server_request(&self, id: &RequestId) -> Option<Responder> {
        self.server_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    pub fn is_subscribed(&self, uri: &str) -> bool {
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(uri)
    }

    /// Sends a message on the standalone stream, if one is open.
    pub fn push(&self, msg: Message) -> bool {
        let tx = self
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match tx {
            Some(tx) => tx.try_send(msg).is_ok(),
            None => false,
        }
    }
}

/// The sessions of this node.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, Arc<Session>>>>,
    idle_timeout: Duration,
}

impl Sessions {
    pub fn new(idle_timeout: Duration) -> Self {
        Sessions {
            inner: Arc::default(),
            idle_timeout,
        }
    }

    pub fn create(
        &self,
        principal: Principal,
        target: Target,
        protocol_version: String,
        client_info: Value,
        client_capabilities: Value,
    ) -> Arc<Session> {
        let mut b = [0u8; 16];
        let id = match getrandom::fill(&mut b) {
            Ok(()) => hex::encode(b),
            Err(_) => crate::registry::new_request_id(),
        };
        let now = Instant::now();
        let session = Arc::new(Session {
            id: id.clone(),
            principal,
            target,
            protocol_version,
            client_info,
            client_capabilities,
            created: now,
            last_seen: Mutex::new(now),
            log_level: Mutex::new(None),
            subscriptions: Mutex::new(BTreeSet::new()),
            server_requests: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            stream: Mutex::new(None),
        });
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(id, session.clone());
        metrics::gauge!("mcpd_mcp_sessions", "protocol" => session.protocol_version.clone())
            .increment(1.0);
        session
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let s = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()?;
        s.touch();
        Some(s)
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let s = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)?;
        metrics::gauge!("mcpd_mcp_sessions", "protocol" => s.protocol_version.clone())
            .decrement(1.0);
        Some(s)
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Drops sessions idle longer than the timeout. Returns how many.
    pub fn expire(&self) -> usize {
        let expired: Vec<String> = self
            .all()
            .into_iter()
            .filter(|s| s.idle_for() > self.idle_timeout)
            .map(|s| s.id.clone())
            .collect();
        for id in &expired {
            self.remove(id);
        }
        expired.len()
    }
}
