//! The messages of one call that flow back while it runs: the server's notifications and its
//! own requests (sampling, elicitation, roots), and the answers to those requests.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use mcpcp_proto::mcp::{ErrorObject, Message, RequestId};
use serde_json::Value;
use tokio::sync::mpsc;

/// A message from the server that belongs to one downstream call.
#[derive(Debug)]
pub enum CallEvent {
    /// A notification to relay (progress with the caller's token restored, logging).
    Notify(Message),
    /// A request from the server (sampling, elicitation, roots), answered through `responder`.
    Request {
        method: String,
        params: Option<Value>,
        responder: Responder,
    },
}

/// Where the messages of one call go, and whether any went: once something reached the
/// client, re-running the call elsewhere could show it twice, so the router stops retrying.
/// It also knows whether the call waits on its own client (a request of the server that the
/// client has not answered yet): a call that times out then is not the server's failure.
/// Clones share both.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: mpsc::Sender<CallEvent>,
    sent: Arc<AtomicBool>,
    /// Requests of the server passed to the client and not answered (or dropped) yet.
    waiting: Arc<AtomicUsize>,
}

impl EventSink {
    pub fn new(tx: mpsc::Sender<CallEvent>) -> Self {
        EventSink {
            tx,
            sent: Arc::default(),
            waiting: Arc::default(),
        }
    }

    pub async fn send(&self, ev: CallEvent) -> Result<(), mpsc::error::SendError<CallEvent>> {
        self.tx.send(self.track(ev)).await?;
        self.sent.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub fn try_send(&self, ev: CallEvent) -> Result<(), mpsc::error::TrySendError<CallEvent>> {
        self.tx.try_send(self.track(ev))?;
        self.sent.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// A request for the client counts as waiting until its responder answers or is dropped.
    fn track(&self, mut ev: CallEvent) -> CallEvent {
        if let CallEvent::Request { responder, .. } = &mut ev {
            self.waiting.fetch_add(1, Ordering::AcqRel);
            responder.waiting = Some(Arc::new(Waiting(self.waiting.clone())));
        }
        ev
    }

    /// Whether any message of the call was passed on.
    pub fn any_sent(&self) -> bool {
        self.sent.load(Ordering::Relaxed)
    }

    /// Whether the call waits on its own client now: a request of the server (sampling,
    /// elicitation, roots) reached the client and is not answered yet.
    pub fn waiting_on_client(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }
}

/// One request of the server that its call's client has not answered; counted down when the
/// last clone of its responder goes.
#[derive(Debug)]
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers one request a server process sent.
#[derive(Debug, Clone)]
pub struct Responder {
    stdin: mpsc::Sender<Vec<u8>>,
    upstream_id: RequestId,
    /// The server's own id of the request when it is a string, also across a peer hop: the
    /// input key a 2026-07-28 client sees it under (`mcp::stateless`).
    name: Option<String>,
    /// Set while the request waits on a client (see [`EventSink::waiting_on_client`]).
    waiting: Option<Arc<Waiting>>,
}

impl Responder {
    /// A responder that writes the answer, as a JSON-RPC response line with `upstream_id`,
    /// to `tx` (a process's stdin, or a peer stream's answer channel).
    pub fn new(tx: mpsc::Sender<Vec<u8>>, upstream_id: RequestId) -> Self {
        let name = match &upstream_id {
            RequestId::Str(s) => Some(s.clone()),
            RequestId::Num(_) => None,
        };
        Responder {
            stdin: tx,
            upstream_id,
            name,
            waiting: None,
        }
    }

    /// The same, for a request the server named `name` (a peer's, which carries it).
    pub fn named(mut self, name: Option<String>) -> Self {
        self.name = name;
        self
    }

    /// The server's own string id of the request, if it gave one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub async fn respond(self, outcome: Result<Value, ErrorObject>) {
        let msg = Message::Response {
            id: self.upstream_id,
            outcome,
        };
        let _ = self.stdin.send(msg.to_line()).await;
    }
}

/// Puts the gateway's own progress token (`mcpd-p-<id>`, unique within one upstream
/// connection, which calls of many clients share) in place of the client's, and returns the
/// client's, to restore on the way back.
pub fn substitute_progress_token(params: &mut Option<Value>, id: u64) -> Option<Value> {
    let meta = params
        .as_mut()
        .and_then(|p| p.get_mut("_meta"))
        .and_then(|m| m.as_object_mut())?;
    let original = meta.remove("progressToken")?;
    meta.insert(
        "progressToken".into(),
        Value::String(format!("mcpd-p-{id}")),
    );
    Some(original)
}

/// Puts the client's own progress token back into a progress notification of its call.
pub fn restore_progress_token(params: &mut Option<Value>, token: Option<Value>) {
    if let (Some(p), Some(token)) = (params.as_mut().and_then(|p| p.as_object_mut()), token) {
        p.insert("progressToken".into(), token);
    }
}

/// `notifications/cancelled` for upstream request `id`, whose caller stopped waiting.
pub fn cancelled(id: u64) -> Message {
    Message::notification(
        "notifications/cancelled",
        Some(serde_json::json!({ "requestId": id, "reason": "the client stopped waiting" })),
    )
}
