//! A 2026-07-28 server's `subscriptions/listen` stream, kept open while the connection to it
//! lives, over whatever carries it ([`Listens`]): a POST whose answer is an event stream
//! (`super::remote_request::Link`, of `super::remote_stateless`), or a request on a stdio
//! process's pipe, its messages marked with its id (`super::process`). What the server says
//! outside any call (list changes, resource updates) goes to the pool's events, as a session
//! server's does.
//!
//! - It asks for every list change, and for the resources the connection's clients
//!   subscribed to (`resources/subscribe` of a 2025 client, counted per URI: a URI leaves
//!   the set with its last subscription): a change of that set opens the stream again at
//!   once with the new set, and a subscription is answered when the server acknowledged it
//!   (or refused, and taken back, when it did not take the URI or the caller gave up).
//! - A stream that breaks, ends, or is not taken and acknowledged within `[pool]
//!   listen_open_timeout_ms` (10 s) is opened again after a pause (0.5 s, doubling to
//!   `listen_backoff_max_ms`, 30 s, afresh only after a stream that lived 5 s); once it is back
//!   the lists are announced changed, for what changed meanwhile.
//! - A server that has no stream (refuses it before acknowledging) is left alone: its list
//!   changes are not heard, and subscriptions to it are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use mcpcp_proto::mcp::{code, ErrorObject, Message};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::events::PoolEvent;
use crate::call::CallError;

/// Where a listen stream's messages carry its id.
pub const META_SUB: &str = "io.modelcontextprotocol/subscriptionId";
/// A stream that lived this long starts the pause before the next one afresh.
const LIVED: Duration = Duration::from_secs(5);
/// The first pause before a stream is opened again.
const FIRST_PAUSE: Duration = Duration::from_millis(500);

/// How long a stream may take to open, and the longest pause between tries (`[pool]
/// listen_open_timeout_ms`, `listen_backoff_max_ms`).
#[derive(Debug, Clone, Copy)]
pub struct ListenTiming {
    /// The longest wait for the server to take the stream and acknowledge it.
    pub open_within: Duration,
    /// The pause between tries doubles up to this.
    pub backoff_max: Duration,
}

/// One open stream's messages from the server, as they come; it ends when the stream does.
pub type Stream = BoxStream<'static, Message>;

/// What carries `subscriptions/listen` streams to one server.
pub trait Listens: Send + Sync + 'static {
    /// The server's name, for logs.
    fn server(&self) -> &str;
    /// Sends `subscriptions/listen` asking for `notifications`; its messages once the server
    /// took the request. An error says whether to try again (`Ended`) or not (`Refused`).
    fn open(&self, notifications: Value) -> BoxFuture<'_, Result<Stream, Listened>>;
}

/// The resources subscribed through one connection, each with the number of its
/// subscriptions (one client's unsubscribe leaves another's), and what the server last
/// acknowledged.
pub struct Subscriptions {
    uris: Mutex<BTreeMap<String, usize>>,
    /// Bumped on every change of the set of URIs: the stream is opened again with it.
    wanted: watch::Sender<u64>,
    /// The generation the server last acknowledged and the URIs it took then (`u64::MAX`:
    /// the server has no stream, it takes none).
    honored: watch::Sender<(u64, BTreeSet<String>)>,
}

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            uris: Mutex::default(),
            wanted: watch::channel(0).0,
            honored: watch::channel((0, BTreeSet::new())).0,
        }
    }
}

/// Takes back one subscription to a URI unless the server acknowledged it (a refused or
/// abandoned `resources/subscribe`).
struct Pending<'a> {
    subs: &'a Subscriptions,
    uri: &'a str,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.subs.unsubscribe(self.uri);
        }
    }
}

impl Subscriptions {
    /// Counts one more subscription to `uri`; the generation of the set that has it.
    fn add(&self, uri: &str) -> u64 {
        let mut uris = self.uris.lock().unwrap_or_else(|p| p.into_inner());
        let n = uris.entry(uri.to_string()).or_default();
        *n += 1;
        if *n == 1 {
            self.wanted.send_modify(|g| *g += 1);
        }
        *self.wanted.borrow()
    }

    /// Adds a subscription to `uri` and waits until the server acknowledged a set with it
    /// (the call's timeout bounds the wait).
    pub async fn subscribe(&self, server: &str, uri: &str) -> Result<Value, CallError> {
        let generation = self.add(uri);
        let mut pending = Pending {
            subs: self,
            uri,
            armed: true,
        };
        let mut honored = self.honored.subscribe();
        let taken = honored
            .wait_for(|(g, _)| *g >= generation)
            .await
            .map(|h| h.1.contains(uri))
            .unwrap_or(false);
        if taken {
            pending.armed = false;
            return Ok(json!({}));
        }
        // A server takes a subscription to each resource it has: one it did not take is
        // one it does not know.
        Err(CallError::Answered(ErrorObject::new(
            code::RESOURCE_NOT_FOUND,
            format!("params.uri: server {server:?} did not take a subscription to {uri:?}"),
        )))
    }

    /// A 2025 client's `resources/subscribe` or `resources/unsubscribe` (`method`) to a server
    /// whose subscriptions are asked for on its listen stream: answered here; `None` for any
    /// other method.
    pub async fn answer(
        &self,
        server: &str,
        method: &str,
        params: Option<&Value>,
    ) -> Option<Result<Value, CallError>> {
        if !matches!(method, "resources/subscribe" | "resources/unsubscribe") {
            return None;
        }
        let Some(uri) = params.and_then(|p| p["uri"].as_str()) else {
            return Some(Err(CallError::Answered(ErrorObject::new(
                code::INVALID_PARAMS,
                "params.uri: required (a string)",
            ))));
        };
        Some(if method == "resources/subscribe" {
            self.subscribe(server, uri).await
        } else {
            self.unsubscribe(uri);
            Ok(json!({}))
        })
    }

    /// Takes back one subscription to `uri`; the last one leaves the set.
    pub fn unsubscribe(&self, uri: &str) {
        let mut uris = self.uris.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = uris.get_mut(uri) else { return };
        *n -= 1;
        if *n == 0 {
            uris.remove(uri);
            self.wanted.send_modify(|g| *g += 1);
        }
    }

    fn snapshot(&self) -> (u64, Vec<String>) {
        let uris = self.uris.lock().unwrap_or_else(|p| p.into_inner());
        (*self.wanted.borrow(), uris.keys().cloned().collect())
    }
}

/// How a stream ended.
pub enum Listened {
    /// The server has none (an error answer): nothing to listen to.
    Refused,
    /// It broke or ended: open it again after a pause.
    Ended,
    /// The subscriptions changed: open it again now.
    Changed,
}

/// Keeps the stream open while the connection lives (see the module docs).
pub async fn listen<C: Listens>(
    carrier: Weak<C>,
    subscriptions: Arc<Subscriptions>,
    pool_events: mpsc::Sender<PoolEvent>,
    timing: ListenTiming,
) {
    let Some(server) = carrier.upgrade().map(|c| c.server().to_string()) else {
        return;
    };
    let mut pause = FIRST_PAUSE;
    let mut broke = false;
    let mut wanted = subscriptions.wanted.subscribe();
    loop {
        let Some(l) = carrier.upgrade() else { return };
        // Marked seen before the set is read: a change in between opens the stream again.
        wanted.mark_unchanged();
        let (generation, uris) = subscriptions.snapshot();
        let opened = tokio::select! {
            opened = tokio::time::timeout(timing.open_within, l.open(asked(&uris))) => {
                opened.unwrap_or(Err(Listened::Ended))
            }
            _ = wanted.changed() => Err(Listened::Changed),
        };
        drop(l);
        let ended = match opened {
            Ok(stream) => {
                let since = std::time::Instant::now();
                if broke {
                    for list in ["tools", "prompts", "resources"] {
                        let changed = Message::notification(
                            format!("notifications/{list}/list_changed"),
                            None,
                        );
                        let _ = pool_events.try_send(PoolEvent::Notify(changed));
                    }
                }
                let acked = (subscriptions.as_ref(), generation);
                let ended = relay(
                    (&carrier, &server),
                    stream,
                    &pool_events,
                    acked,
                    (&mut wanted, timing.open_within),
                )
                .await;
                // A stream that lived a while starts the pause afresh; one the server ends at
                // once keeps backing off (no reopen, and reload, twice a second).
                if since.elapsed() >= LIVED {
                    pause = FIRST_PAUSE;
                }
                ended
            }
            Err(e) => e,
        };
        match ended {
            Listened::Refused => {
                subscriptions
                    .honored
                    .send_replace((u64::MAX, BTreeSet::new()));
                return;
            }
            Listened::Changed => broke = false,
            Listened::Ended => {
                broke = true;
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = wanted.changed() => {}
                }
                pause = (pause * 2).min(timing.backoff_max.max(FIRST_PAUSE));
            }
        }
    }
}

/// What a stream asks for: every list change, and the resources in `uris`.
fn asked(uris: &[String]) -> Value {
    let mut notifications = json!({
        "toolsListChanged": true,
        "promptsListChanged": true,
        "resourcesListChanged": true,
    });
    if !uris.is_empty() {
        notifications["resourceSubscriptions"] = json!(uris);
    }
    notifications
}

/// Passes a stream's notifications on until it ends or the subscriptions change; its
/// acknowledgment says which URIs of `generation` the server took. An error answer before
/// the acknowledgment is the server's refusal of the stream.
async fn relay<C>(
    (carrier, server): (&Weak<C>, &str),
    mut stream: Stream,
    pool_events: &mpsc::Sender<PoolEvent>,
    (subscriptions, generation): (&Subscriptions, u64),
    (wanted, open_within): (&mut watch::Receiver<u64>, Duration),
) -> Listened {
    let mut acknowledged = false;
    loop {
        // The acknowledgment comes first, within the open's time (a stdio request is "open"
        // once written); after it, the stream may be quiet for as long as it lives.
        let within = if acknowledged {
            Duration::MAX
        } else {
            open_within
        };
        let msg = tokio::select! {
            msg = tokio::time::timeout(within, stream.next()) => msg.unwrap_or(None),
            _ = wanted.changed() => return Listened::Changed,
        };
        let Some(msg) = msg else {
            return Listened::Ended;
        };
        if carrier.strong_count() == 0 {
            return Listened::Refused;
        }
        match msg {
            Message::Notification { method, params }
                if method == "notifications/subscriptions/acknowledged" =>
            {
                acknowledged = true;
                let taken: BTreeSet<String> = params
                    .as_ref()
                    .and_then(|p| p["notifications"]["resourceSubscriptions"].as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|u| u.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                subscriptions.honored.send_replace((generation, taken));
            }
            Message::Notification { method, mut params } => {
                if let Some(meta) = params
                    .as_mut()
                    .and_then(|p| p.get_mut("_meta"))
                    .and_then(Value::as_object_mut)
                {
                    meta.remove(META_SUB);
                }
                let msg = Message::Notification { method, params };
                let _ = pool_events.try_send(PoolEvent::Notify(msg));
            }
            // A server without the method: no stream. (Any other error, e.g. for one URI of
            // the set it does not take, ends this stream only: it is opened again.)
            Message::Response {
                outcome: Err(e), ..
            } if !acknowledged && e.code == code::METHOD_NOT_FOUND => {
                tracing::info!(server, error = %e.message, "the server has no subscriptions/listen; its list changes are not heard");
                return Listened::Refused;
            }
            // The stream's end: the server stopped it (an error) or ended it (a result);
            // opened again after the pause.
            Message::Response { .. } => return Listened::Ended,
            Message::Request { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Acknowledges every set the listener would open the stream with.
    fn server_that_takes_all(subs: &Arc<Subscriptions>) -> tokio::task::JoinHandle<()> {
        let subs = subs.clone();
        tokio::spawn(async move {
            let mut wanted = subs.wanted.subscribe();
            loop {
                wanted.mark_unchanged();
                let (generation, uris) = subs.snapshot();
                subs.honored
                    .send_replace((generation, uris.into_iter().collect()));
                if wanted.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    #[tokio::test]
    async fn a_uri_stays_while_any_subscription_to_it_does() {
        let subs = Arc::new(Subscriptions::default());
        let server = server_that_takes_all(&subs);
        subs.subscribe("s", "a://1").await.expect("taken");
        subs.subscribe("s", "a://1").await.expect("taken");
        subs.unsubscribe("a://1");
        assert_eq!(subs.snapshot().1, ["a://1"], "the other client's stays");
        subs.unsubscribe("a://1");
        assert!(subs.snapshot().1.is_empty());
        server.abort();
    }

    #[tokio::test]
    async fn a_subscription_not_taken_or_given_up_is_taken_back() {
        let subs = Subscriptions::default();
        // Nobody acknowledges: the caller gives up (its call timed out).
        let gave_up = tokio::time::timeout(Duration::from_millis(20), subs.subscribe("s", "b://2"));
        assert!(gave_up.await.is_err());
        assert!(subs.snapshot().1.is_empty());
        // The server has no stream: refused at once, naming the field.
        subs.honored.send_replace((u64::MAX, BTreeSet::new()));
        let refused = subs.subscribe("s", "c://3").await.expect_err("refused");
        assert!(format!("{refused:?}").contains("params.uri"), "{refused:?}");
        assert!(subs.snapshot().1.is_empty());
    }
}
