//! One client request running against the servers, as a stream of steps: the messages the
//! server sends while it works (progress, logging, its own requests), then the outcome.
//!
//! The call runs in its own task so that the HTTP side can answer with plain JSON when the
//! outcome comes first, switch to SSE when a message comes first, park the call between the
//! rounds of a 2026 multi-round-trip request, or abort it on cancellation (which cancels the
//! request upstream).

use std::time::Duration;

use mcpcp_proto::mcp::ErrorObject;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::dispatch::Route;
use crate::pool::process::CallEvent;

/// Longest wait, once a call has its answer, for the events sent before it to arrive.
const LATE_EVENTS: Duration = Duration::from_secs(2);

/// One step of a running call.
#[derive(Debug)]
pub enum Step {
    Event(CallEvent),
    Done(Result<Value, ErrorObject>),
}

/// A running call: its steps and the task that drives it. Dropping it leaves the call running
/// to completion (a 2025 client's disconnection is not a cancellation); abort `task` to cancel.
pub struct Running {
    pub steps: mpsc::Receiver<Step>,
    pub task: JoinHandle<()>,
}

impl Running {
    /// Starts `method` for the client.
    pub fn start(route: Route, method: String, params: Option<Value>) -> Running {
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            let (ev_tx, mut ev_rx) = mpsc::channel(64);
            let call = route.dispatch(&method, params, ev_tx);
            tokio::pin!(call);
            loop {
                tokio::select! {
                    outcome = &mut call => {
                        // Events sent before the answer still go first. Some may still be on
                        // their way (relayed by another task, or from a peer node): take them
                        // until every sender is gone, for a bounded time.
                        let deadline = tokio::time::Instant::now() + LATE_EVENTS;
                        while let Ok(Some(ev)) =
                            tokio::time::timeout_at(deadline, ev_rx.recv()).await
                        {
                            let _ = tx.send(Step::Event(ev)).await;
                        }
                        let _ = tx.send(Step::Done(outcome)).await;
                        return;
                    }
                    Some(ev) = ev_rx.recv() => {
                        if tx.send(Step::Event(ev)).await.is_err() {
                            // Nobody is listening any more: dropping the call cancels it upstream.
                            return;
                        }
                    }
                }
            }
        });
        Running { steps: rx, task }
    }
}
