//! Downstream sessions of the session-based revisions (2025-06-18, 2025-11-25): what the
//! client told us at `initialize`, what it subscribed to, and the requests in flight between
//! it and the server processes (to route answers and cancellations).
//!
//! A session survives the node that created it. Its id is self-contained and signed with a
//! key the cluster replicates (`s1.<claims>.<hmac>`: token id, endpoint, protocol version,
//! client info and capabilities), so any node can verify it and rebuild the session; what
//! changes later (subscriptions, log level) is replicated through the registry when it
//! changes, which is rare. Sessions are cached in each node's memory and dropped from it
//! after an idle timeout. The 2026-07-28 revision has no sessions at all.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use mcpcp_proto::mcp::{Message, RequestId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
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

/// What a signed session id says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Claims {
    /// Token id of the principal that opened it.
    tok: String,
    /// `None`: the aggregate endpoint; else the server's name.
    tgt: Option<String>,
    ver: String,
    ci: Value,
    cc: Value,
    /// Random, so two sessions of one client differ.
    n: String,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn mac(key: &[u8], payload: &[u8]) -> Option<Vec<u8>> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).ok()?;
    m.update(payload);
    Some(m.finalize().into_bytes().to_vec())
}

fn sign(key: &[u8], claims: &Claims) -> Option<String> {
    let payload = B64.encode(serde_json::to_vec(claims).ok()?);
    let sig = B64.encode(mac(key, payload.as_bytes())?);
    Some(format!("s1.{payload}.{sig}"))
}

fn verify(key: &[u8], id: &str) -> Option<Claims> {
    let rest = id.strip_prefix("s1.")?;
    let (payload, sig) = rest.split_once('.')?;
    let mut m = Hmac::<Sha256>::new_from_slice(key).ok()?;
    m.update(payload.as_bytes());
    m.verify_slice(&B64.decode(sig).ok()?).ok()?;
    serde_json::from_slice(&B64.decode(payload).ok()?).ok()
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

    /// Opens a session; with the cluster's `key` its id is signed (and so portable).
    pub fn create(
        &self,
        key: Option<&[u8]>,
        principal: Principal,
        target: Target,
        protocol_version: String,
        client_info: Value,
        client_capabilities: Value,
    ) -> Arc<Session> {
        let nonce = crate::registry::new_request_id();
        let claims = Claims {
            tok: principal.token_id.clone(),
            tgt: match &target {
                Target::Aggregate => None,
                Target::Server(n) => Some(n.clone()),
            },
            ver: protocol_version.clone(),
            ci: client_info.clone(),
            cc: client_capabilities.clone(),
            n: nonce.clone(),
        };
        let id = key.and_then(|k| sign(k, &claims)).unwrap_or(nonce);
        self.insert(
            id,
            principal,
            target,
            protocol_version,
            client_info,
            client_capabilities,
        )
    }

    /// Rebuilds a session another node opened, from its signed id, for the same caller and
    /// endpoint; `state` is what the registry holds of its subscriptions and log level.
    pub fn recover(
        &self,
        key: &[u8],
        id: &str,
        principal: &Principal,
        target: &Target,
        state: Option<crate::registry::state::SessionState>,
    ) -> Option<Arc<Session>> {
        let claims = verify(key, id)?;
        let tgt = match target {
            Target::Aggregate => None,
            Target::Server(n) => Some(n.clone()),
        };
        if claims.tok != principal.token_id || claims.tgt != tgt {
            return None;
        }
        let session = self.insert(
            id.to_string(),
            principal.clone(),
            target.clone(),
            claims.ver,
            claims.ci,
            claims.cc,
        );
        if let Some(st) = state {
            *session
                .subscriptions
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = st.subscriptions;
            *session.log_level.lock().unwrap_or_else(|p| p.into_inner()) = st.log_level;
        }
        metrics::counter!("mcpd_mcp_sessions_recovered_total").increment(1);
        tracing::info!(session = %short(id), "session continued from another node");
        Some(session)
    }

    fn insert(
        &self,
        id: String,
        principal: Principal,
        target: Target,
        protocol_version: String,
        client_info: Value,
        client_capabilities: Value,
    ) -> Arc<Session> {
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

    /// Drops sessions idle longer than the timeout from this node's memory. Returns how many.
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

/// A loggable prefix of a (long, signed) session id.
pub fn short(id: &str) -> &str {
    let end = id.len().min(16);
    id.get(..end).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            tok: "abc".into(),
            tgt: Some("time".into()),
            ver: "2025-11-25".into(),
            ci: serde_json::json!({"name": "c"}),
            cc: serde_json::json!({}),
            n: "n1".into(),
        }
    }

    #[test]
    fn signed_ids_verify_only_with_the_key_and_untouched() {
        let id = sign(b"k1", &claims()).expect("signs");
        assert_eq!(verify(b"k1", &id), Some(claims()));
        assert_eq!(verify(b"k2", &id), None);
        let (head, sig) = id.rsplit_once('.').expect("dot");
        let mut forged = claims();
        forged.tok = "other".into();
        let payload = B64.encode(serde_json::to_vec(&forged).expect("json"));
        assert_eq!(verify(b"k1", &format!("s1.{payload}.{sig}")), None);
        assert_eq!(verify(b"k1", head), None);
        assert_eq!(verify(b"k1", "deadbeef"), None);
    }
}
