//! The state one demo-server process shares between its request tasks: the line writer, what
//! the client said about itself at `initialize`, the log level, resource subscriptions, the
//! counter, and the server-to-client requests (sampling, elicitation) still waiting for an answer.
//!
//! Every task writes through [`Session::send`], which queues a whole JSON message for the single
//! writer, so lines from concurrent tasks never interleave.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::round::Round;
use super::rpc::{self, RpcError};

/// How long a tool waits for the client to answer a sampling or elicitation request.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub use mcpcp_proto::mcp::LOG_LEVELS;

fn level_index(level: &str) -> Option<u8> {
    LOG_LEVELS
        .iter()
        .position(|l| *l == level)
        .and_then(|i| u8::try_from(i).ok())
}

/// Locks a mutex; a panicking holder cannot leave these maps half-updated, so poison is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Requests waiting for the client's answer, by id, each with the number that tells a request
/// from a later one that took over its id.
type Pending = HashMap<String, (u64, oneshot::Sender<Result<Value, RpcError>>)>;

pub struct Session {
    out: mpsc::UnboundedSender<Value>,
    /// `capabilities` from the client's `initialize`, once received.
    client_capabilities: Mutex<Option<Value>>,
    /// Index into [`LOG_LEVELS`] of the least severe level sent to the client.
    log_level: AtomicU8,
    subscriptions: Mutex<BTreeSet<String>>,
    /// `counter_increment`'s count; the lock also orders ledger appends.
    counter: Mutex<u64>,
    /// `MCPD_DEMO_LEDGER`: where `counter_increment` appends a line per call.
    pub ledger: Option<PathBuf>,
    next_request: AtomicU64,
    pending: Mutex<Pending>,
    /// The open `subscriptions/listen` requests of 2026-07-28, by request id (JSON text).
    listens: Mutex<BTreeMap<String, Listen>>,
    /// Set once stdin closed: what waits for the client (a listen) ends.
    closed: tokio::sync::watch::Sender<bool>,
}

/// What one `subscriptions/listen` asked for (and was granted).
struct Listen {
    id: Value,
    /// `tools`, `prompts`, `resources`: the lists whose changes it hears.
    lists: BTreeSet<&'static str>,
    uris: BTreeSet<String>,
}

/// The list changes a listen can ask for, by their key in its `notifications`.
pub const LISTS: [(&str, &str); 3] = [
    ("toolsListChanged", "tools"),
    ("promptsListChanged", "prompts"),
    ("resourcesListChanged", "resources"),
];

impl Session {
    pub fn new(out: mpsc::UnboundedSender<Value>, ledger: Option<PathBuf>) -> Self {
        Self {
            out,
            client_capabilities: Mutex::new(None),
            log_level: AtomicU8::new(1), // info
            subscriptions: Mutex::new(BTreeSet::new()),
            counter: Mutex::new(0),
            ledger,
            next_request: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            listens: Mutex::new(BTreeMap::new()),
            closed: tokio::sync::watch::channel(false).0,
        }
    }

    /// Queues one message for stdout. After the writer is gone there is no one to tell.
    pub fn send(&self, msg: Value) {
        if self.out.send(msg).is_err() {
            tracing::debug!("stdout writer gone; message dropped");
        }
    }

    /// Sends a notification. A list change or resource update goes to each open
    /// `subscriptions/listen` that asked for it, marked with its id; with none open (a
    /// session's client), it goes out as it is.
    pub fn notify(&self, method: &str, params: Value) {
        let list = method
            .strip_prefix("notifications/")
            .and_then(|m| m.strip_suffix("/list_changed"));
        let updated = (method == "notifications/resources/updated")
            .then(|| params["uri"].as_str().unwrap_or_default().to_string());
        if list.is_none() && updated.is_none() {
            return self.send(rpc::notification(method, params));
        }
        let targets: Vec<Value> = {
            let listens = lock(&self.listens);
            if listens.is_empty() {
                drop(listens);
                return self.send(rpc::notification(method, params));
            }
            listens
                .values()
                .filter(|l| {
                    list.is_some_and(|k| l.lists.contains(k))
                        || updated.as_ref().is_some_and(|u| l.uris.contains(u))
                })
                .map(|l| l.id.clone())
                .collect()
        };
        for id in targets {
            let mut tagged = params.clone();
            tagged["_meta"]["io.modelcontextprotocol/subscriptionId"] = id;
            self.send(rpc::notification(method, tagged));
        }
    }

    /// Opens a `subscriptions/listen` of request `id` for the list changes of `lists` (`tools`,
    /// `prompts`, `resources`) and the updates of `uris`: heard from now on, and acknowledged
    /// first. Returns the notifications granted.
    pub fn open_listen(
        &self,
        id: &Value,
        lists: BTreeSet<&'static str>,
        uris: BTreeSet<String>,
    ) -> Value {
        let mut granted = json!({});
        for (key, list) in LISTS {
            granted[key] = json!(lists.contains(list));
        }
        granted["resourceSubscriptions"] = json!(uris);
        lock(&self.listens).insert(
            id.to_string(),
            Listen {
                id: id.clone(),
                lists,
                uris,
            },
        );
        self.send(rpc::notification(
            "notifications/subscriptions/acknowledged",
            json!({
                "notifications": granted.clone(),
                "_meta": { "io.modelcontextprotocol/subscriptionId": id },
            }),
        ));
        granted
    }

    /// Closes the `subscriptions/listen` of request `id` (cancelled, or the server ends).
    pub fn close_listen(&self, id: &Value) {
        lock(&self.listens).remove(&id.to_string());
    }

    pub fn set_client_capabilities(&self, caps: Value) {
        *lock(&self.client_capabilities) = Some(caps);
    }

    /// Whether the client declared `capability` (e.g. `sampling`): in the request's `_meta` in
    /// 2026-07-28, else at `initialize`.
    pub fn client_supports(&self, capability: &str) -> bool {
        if let Some(declared) = Round::client_supports(capability) {
            return declared;
        }
        lock(&self.client_capabilities)
            .as_ref()
            .and_then(|c| c.get(capability))
            .is_some_and(|v| !v.is_null())
    }

    /// Sets the least severe level sent; `false` if `level` is not an MCP log level.
    pub fn set_log_level(&self, level: &str) -> bool {
        match level_index(level) {
            Some(i) => {
                self.log_level.store(i, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Sends a `notifications/message` if `level` passes the client's threshold: the
    /// request's own in 2026-07-28 (none asked for: no logs), else the session's.
    pub fn log(&self, level: &str, data: Value) {
        let at_least = match Round::log_level() {
            Some(Some(asked)) => level_index(&asked).unwrap_or(u8::MAX),
            Some(None) => return,
            None => self.log_level.load(Ordering::Relaxed),
        };
        if level_index(level).is_some_and(|i| i >= at_least) {
            self.notify(
                "notifications/message",
                json!({ "level": level, "logger": "mcpd-demo", "data": data }),
            );
        }
    }

    pub fn subscribe(&self, uri: &str) {
        lock(&self.subscriptions).insert(uri.to_string());
    }

    pub fn unsubscribe(&self, uri: &str) {
        lock(&self.subscriptions).remove(uri);
    }

    pub fn subscriptions(&self) -> Vec<String> {
        lock(&self.subscriptions).iter().cloned().collect()
    }

    /// Runs `append` (the ledger write) under the counter's lock and increments the count only
    /// if it succeeded, so the ledger and the count agree and ledger lines are in count order.
    pub fn increment<E>(&self, append: impl FnOnce() -> Result<(), E>) -> Result<u64, E> {
        let mut count = lock(&self.counter);
        append()?;
        *count += 1;
        Ok(*count)
    }

    pub fn count(&self) -> u64 {
        *lock(&self.counter)
    }

    /// Sends a request to the client and waits for its answer. The request ids are strings
    /// (`demo-1`, `demo-2`, ...), so they cannot collide with the client's own.
    pub async fn request_client(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        self.request_as(None, method, params).await
    }

    /// The same, with the request's id `name` (a 2026-07-28 client, through the gateway, sees
    /// the question under that key), or `name-N` while a request of that name waits: an id is
    /// never reused while its answer may still come, or that answer would reach another
    /// caller's question.
    pub async fn request_client_named(
        &self,
        name: &str,
        method: &str,
        params: Value,
    ) -> Result<Value, RpcError> {
        self.request_as(Some(name), method, params).await
    }

    async fn request_as(
        &self,
        name: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, RpcError> {
        // In 2026-07-28 the question is the round's result, not a request of ours.
        if let Some(answer) = Round::ask(name, method, &params) {
            return answer;
        }
        let (tx, rx) = oneshot::channel();
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let id = {
            let mut pending = lock(&self.pending);
            let id = match name {
                Some(name) if !pending.contains_key(name) => name.to_string(),
                Some(name) => format!("{name}-{n}"),
                None => format!("demo-{n}"),
            };
            pending.insert(id.clone(), (n, tx));
            id
        };
        // Removes the entry however this future ends, and tells the client when we gave up.
        let mut guard = PendingGuard {
            session: self,
            id: &id,
            n,
            answered: false,
        };
        self.send(rpc::request(&id, method, params));
        let outcome = tokio::time::timeout(CLIENT_REQUEST_TIMEOUT, rx).await;
        match outcome {
            Ok(Ok(answer)) => {
                guard.answered = true;
                answer
            }
            Ok(Err(_)) => {
                guard.answered = true;
                Err(RpcError::internal(format!(
                    "the client closed the connection before answering {method}"
                )))
            }
            Err(_) => Err(RpcError::internal(format!(
                "the client did not answer {method} within {}s",
                CLIENT_REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Hands the client's answer to the task waiting for it. `false` if none is.
    pub fn resolve(&self, id: &Value, outcome: Result<Value, RpcError>) -> bool {
        let Some(id) = id.as_str() else {
            return false;
        };
        match lock(&self.pending).remove(id) {
            Some((_, tx)) => tx.send(outcome).is_ok(),
            None => false,
        }
    }

    /// Fails every waiting server-to-client request and ends the listens (stdin is closed: no
    /// answer can come, and no cancel).
    pub fn fail_pending(&self) {
        lock(&self.pending).clear();
        self.closed.send_replace(true);
    }

    /// Completes once stdin closed.
    pub async fn closed(&self) {
        let _ = self.closed.subscribe().wait_for(|c| *c).await;
    }
}

struct PendingGuard<'a> {
    session: &'a Session,
    id: &'a str,
    /// Which request of that id this is: a later one with the same id stays.
    n: u64,
    answered: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let was_waiting = {
            let mut pending = lock(&self.session.pending);
            let ours = pending.get(self.id).is_some_and(|(n, _)| *n == self.n);
            ours && pending.remove(self.id).is_some()
        };
        if was_waiting && !self.answered {
            // Timed out, or the tool call was cancelled: the answer is no longer wanted.
            self.session.notify(
                "notifications/cancelled",
                json!({ "requestId": self.id, "reason": "no longer needed" }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_filters_notifications() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let s = Session::new(tx, None);
        s.log("debug", json!("hidden at the default level"));
        assert!(rx.try_recv().is_err());
        assert!(s.set_log_level("debug"));
        s.log("debug", json!("shown"));
        assert_eq!(
            rx.try_recv().ok().map(|m| m["params"]["data"].clone()),
            Some(json!("shown"))
        );
        assert!(!s.set_log_level("verbose"));
    }

    #[tokio::test]
    async fn client_answers_are_routed_by_id() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let s = std::sync::Arc::new(Session::new(tx, None));
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.request_client("sampling/createMessage", json!({})).await })
        };
        let sent = rx.recv().await.unwrap_or_default();
        assert_eq!(sent["id"], json!("demo-1"));
        assert!(!s.resolve(&json!("demo-9"), Ok(json!({}))));
        assert!(s.resolve(&json!("demo-1"), Ok(json!({"ok": true}))));
        let got = waiter.await.ok().and_then(Result::ok);
        assert_eq!(got, Some(json!({"ok": true})));
    }
}
