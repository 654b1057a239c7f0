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
use mcpcp_proto::mcp::{code, ErrorObject, Message, RequestId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use crate::call::Responder;
use crate::registry::Principal;

use super::target::Target;

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
    pub in_flight: Mutex<HashMap<RequestId, super::call::CallHandle>>,
    next_request: AtomicU64,
    /// The log stream of the standalone GET stream, once the client opened one.
    pub standalone: Mutex<Option<u64>>,
    /// Recent SSE events of this session's streams, for resumption with `Last-Event-ID`.
    pub log: Arc<EventLog>,
    /// Subscriptions or log level changed since they were last replicated.
    pub state_dirty: std::sync::atomic::AtomicBool,
    /// A replication of this session's state is under way (see `http::replicate_state`).
    pub state_pending: std::sync::atomic::AtomicBool,
    /// SSE streams (`GET`) open on this session on this node.
    pub open_streams: std::sync::atomic::AtomicUsize,
}

/// One of a session's open SSE streams; gives its place back when the stream ends.
pub struct StreamSlot(Arc<Session>);

impl StreamSlot {
    /// A place for one more stream, unless the session holds `max` already.
    pub fn take(session: &Arc<Session>, max: usize) -> Option<StreamSlot> {
        let open = session.open_streams.fetch_add(1, Ordering::AcqRel);
        if open >= max {
            session.open_streams.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics::gauge!("mcpd_mcp_session_streams").increment(1.0);
        Some(StreamSlot(session.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("mcpd_mcp_session_streams").decrement(1.0);
    }
}

/// Events stream `s` has sent, so a client that lost its connection can resume with
/// `Last-Event-ID: s-n` and get everything after event `n` of that stream (and, while the
/// stream is still running, what comes next). Bounded: the last [`LOG_EVENTS`] events of the
/// last [`LOG_STREAMS`] streams.
#[derive(Default)]
pub struct EventLog {
    streams: Mutex<std::collections::BTreeMap<u64, StreamLog>>,
    next_stream: AtomicU64,
    changed: tokio::sync::Notify,
}

const LOG_EVENTS: usize = 256;
const LOG_STREAMS: usize = 32;

#[derive(Default)]
struct StreamLog {
    events: std::collections::VecDeque<(u64, Message)>,
    next_seq: u64,
    done: bool,
}

impl EventLog {
    /// Starts a stream; returns its number.
    pub fn open(&self) -> u64 {
        let n = self.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams.insert(n, StreamLog::default());
        while streams.len() > LOG_STREAMS {
            let Some(oldest) = streams.keys().next().copied() else {
                break;
            };
            streams.remove(&oldest);
        }
        n
    }

    /// Appends an event to stream `n`.
    pub fn append(&self, n: u64, msg: Message) {
        {
            let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            let Some(log) = streams.get_mut(&n) else {
                return;
            };
            let seq = log.next_seq;
            log.next_seq += 1;
            log.events.push_back((seq, msg));
            while log.events.len() > LOG_EVENTS {
                log.events.pop_front();
            }
        }
        self.changed.notify_waiters();
    }

    /// Marks stream `n` as ended (its response was sent).
    pub fn finish(&self, n: u64) {
        if let Some(log) = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&n)
        {
            log.done = true;
        }
        self.changed.notify_waiters();
    }

    /// The sequence number of stream `n`'s last event.
    pub fn last_seq(&self, n: u64) -> Option<u64> {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&n)
            .and_then(|l| l.next_seq.checked_sub(1))
    }

    pub fn knows(&self, n: u64) -> bool {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&n)
    }

    /// Events of stream `n` after sequence `after` (all when `None`), and whether the stream
    /// has ended.
    fn since(&self, n: u64, after: Option<u64>) -> (Vec<(u64, Message)>, bool) {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        match streams.get(&n) {
            Some(log) => (
                log.events
                    .iter()
                    .filter(|(seq, _)| after.is_none_or(|a| *seq > a))
                    .cloned()
                    .collect(),
                log.done,
            ),
            None => (Vec::new(), true),
        }
    }

    /// Follows stream `n` from after `after`: the stored events, then new ones as they come,
    /// until it ends. Items are (`"n-seq"` event id, message).
    pub fn follow(
        self: Arc<Self>,
        n: u64,
        after: Option<u64>,
    ) -> impl futures_util::Stream<Item = (String, Message)> + Send + 'static {
        futures_util::stream::unfold(
            (self, after, Vec::new()),
            move |(log, mut after, mut pending)| async move {
                loop {
                    if let Some((seq, msg)) = pending.pop() {
                        after = Some(seq);
                        return Some(((format!("{n}-{seq}"), msg), (log, after, pending)));
                    }
                    let (events, ended) = log.since(n, after);
                    if !events.is_empty() {
                        pending = events.into_iter().rev().collect();
                        continue;
                    }
                    if ended {
                        return None;
                    }
                    {
                        let notified = log.changed.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        // Re-check after registering, so an event appended in between is not missed.
                        let (again, ended) = log.since(n, after);
                        if again.is_empty() && !ended {
                            notified.await;
                        }
                    }
                }
            },
        )
    }
}

/// Parses a `Last-Event-ID` of ours (`stream-seq`).
pub fn parse_event_id(id: &str) -> Option<(u64, u64)> {
    let (s, n) = id.trim().split_once('-')?;
    Some((s.parse().ok()?, n.parse().ok()?))
}

/// What a session is opened with: who, on which endpoint, and the client's `initialize`.
pub struct Opening {
    pub principal: Principal,
    pub target: Target,
    pub protocol_version: String,
    pub client_info: Value,
    pub client_capabilities: Value,
}

impl Session {
    fn new(id: String, opening: Opening) -> Arc<Session> {
        let Opening {
            principal,
            target,
            protocol_version,
            client_info,
            client_capabilities,
        } = opening;
        let now = Instant::now();
        Arc::new(Session {
            id,
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
            standalone: Mutex::new(None),
            log: Arc::default(),
            state_dirty: Default::default(),
            state_pending: Default::default(),
            open_streams: Default::default(),
        })
    }

    /// Whether the session may subscribe to `uri` with at most `cap` subscriptions (one it
    /// already holds always may); the refusal names the field and the setting.
    pub fn room_for_subscription(&self, uri: &str, cap: usize) -> Result<(), ErrorObject> {
        let subs = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        if subs.contains(uri) || subs.len() < cap {
            return Ok(());
        }
        Err(ErrorObject::new(
            code::INVALID_PARAMS,
            format!(
                "params.uri: this session already has {} subscriptions, the most it may (mcp.max_subscriptions_per_session)",
                subs.len()
            ),
        ))
    }

    /// Whether the session has an open stream or a call in flight on this node.
    fn busy(&self) -> bool {
        self.open_streams.load(Ordering::Acquire) > 0
            || !self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
    }

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

    /// The URIs the session is subscribed to.
    pub fn subscribed(&self) -> Vec<String> {
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn is_subscribed(&self, uri: &str) -> bool {
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(uri)
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

/// How a session not in memory was continued here.
pub enum Continued {
    /// Rebuilt from its signed id: its holds are to be taken again from here.
    Rebuilt(Arc<Session>),
    /// Another request of the session rebuilt it meanwhile.
    Found(Arc<Session>),
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
    pub fn create(&self, key: Option<&[u8]>, opening: Opening) -> Arc<Session> {
        let nonce = crate::registry::new_request_id();
        let claims = Claims {
            tok: opening.principal.token_id.clone(),
            tgt: opening.target.claim(),
            ver: opening.protocol_version.clone(),
            ci: opening.client_info.clone(),
            cc: opening.client_capabilities.clone(),
            n: nonce.clone(),
        };
        let id = key.and_then(|k| sign(k, &claims)).unwrap_or(nonce);
        let session = Session::new(id, opening);
        // A fresh id: nothing is there.
        self.insert(session.clone());
        session
    }

    /// Whether `id` is a session id this cluster signed (one worth looking up further).
    pub fn is_signed(key: &[u8], id: &str) -> bool {
        verify(key, id).is_some()
    }

    /// Rebuilds a session another node opened, from its signed id, for the same caller and
    /// endpoint; `state` is what the registry holds of its subscriptions and log level.
    /// Requests of one session that arrive together rebuild it once: the others get the
    /// session the first put here ([`Continued::Found`]).
    pub fn recover(
        &self,
        key: &[u8],
        id: &str,
        principal: &Principal,
        target: &Target,
        state: Option<crate::registry::state::SessionState>,
    ) -> Option<Continued> {
        let claims = verify(key, id)?;
        let tgt = target.claim();
        if claims.tok != principal.token_id || claims.tgt != tgt {
            return None;
        }
        let opening = Opening {
            principal: principal.clone(),
            target: target.clone(),
            protocol_version: claims.ver,
            client_info: claims.ci,
            client_capabilities: claims.cc,
        };
        let session = Session::new(id.to_string(), opening);
        if let Some(st) = state {
            *session
                .subscriptions
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = st.subscriptions;
            *session.log_level.lock().unwrap_or_else(|p| p.into_inner()) = st.log_level;
        }
        if let Some(there) = self.insert(session.clone()) {
            return Some(Continued::Found(there));
        }
        metrics::counter!("mcpd_mcp_sessions_recovered_total").increment(1);
        tracing::info!(session = %short(id), "session continued from another node");
        Some(Continued::Rebuilt(session))
    }

    /// Puts `session` in memory, unless a session of its id is there already: that one is
    /// returned, and kept.
    fn insert(&self, session: Arc<Session>) -> Option<Arc<Session>> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(there) = map.get(&session.id) {
            return Some(there.clone());
        }
        Self::count(&session);
        map.insert(session.id.clone(), session);
        None
    }

    /// `mcpd_mcp_sessions`: one more session of its revision in memory.
    fn count(session: &Session) {
        metrics::gauge!("mcpd_mcp_sessions", "protocol" => session.protocol_version.clone())
            .increment(1.0);
    }

    /// `mcpd_mcp_sessions`: one session of its revision fewer.
    fn uncount(session: &Session) {
        metrics::gauge!("mcpd_mcp_sessions", "protocol" => session.protocol_version.clone())
            .decrement(1.0);
    }

    /// The session `id` in memory, seen now. It is touched under the map's lock, so the sweep
    /// ([`Sessions::expire`]) either sees it touched or has taken it out first.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get(id)?.clone();
        s.touch();
        Some(s)
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let s = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)?;
        Self::uncount(&s);
        Some(s)
    }

    /// Live sessions on this node that count against `principal`'s tenant (an admin token
    /// counts on its own).
    pub fn count_for(&self, principal: &Principal) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| match &principal.tenant {
                Some(t) => s.principal.tenant.as_ref() == Some(t),
                None => s.principal.tenant.is_none() && s.principal.token_id == principal.token_id,
            })
            .count()
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Drops sessions idle longer than the timeout from this node's memory, and returns them.
    /// A session with an open stream or a call in flight is not idle: its client is still
    /// listening or waiting.
    ///
    /// Checked and taken out under the map's lock: a request that finds the session at that
    /// moment ([`Sessions::get`]) has either made it not idle, or finds it gone and continues
    /// it (a session dropped while a request used it would let go of what that request kept).
    pub fn expire(&self) -> Vec<Arc<Session>> {
        let expired: Vec<Arc<Session>> = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extract_if(|_, s| s.idle_for() > self.idle_timeout && !s.busy())
            .map(|(_, s)| s)
            .collect();
        for s in &expired {
            Self::uncount(s);
        }
        expired
    }

    /// How often [`Sessions::expire`] should run: a quarter of the idle timeout, at most every
    /// 30 s.
    pub fn sweep_every(&self) -> Duration {
        (self.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }
}

pub use crate::call::affinity::short;

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
