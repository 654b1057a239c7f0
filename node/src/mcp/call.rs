//! One client request running against the servers, as a stream of steps: the messages the
//! server sends while it works (progress, logging, its own requests), then the outcome.
//!
//! A call starts *inline*: the HTTP handler that waits for it polls it, so the common case (a
//! plain JSON answer, no messages before it) costs no task of its own and no hop between
//! tasks. It moves into its own task when it has to outlive its caller: a 2025 call switched to
//! SSE is driven by the task that logs its stream ([`Running::next`] from there), a 2026
//! multi-round-trip call is [`Running::detach`]ed while parked between rounds, and a call
//! whose caller goes away is finished in the background (a 2025 client's disconnection is not
//! a cancellation). Cancellation goes through the [`CallHandle`], whichever task polls the
//! call: the call is dropped, which cancels it upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{AbortHandle, Abortable};
use mcpcp_proto::mcp::{code, ErrorObject};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::dispatch::Route;
use crate::call::{CallEvent, EventSink};
use crate::telemetry::InSpanExt;

/// Longest wait, once a call has its answer, for the events sent before it to arrive.
const LATE_EVENTS: Duration = Duration::from_secs(2);

/// One step of a running call.
#[derive(Debug)]
pub enum Step {
    Event(CallEvent),
    Done(Result<Value, ErrorObject>),
}

type Outcome = Result<Value, ErrorObject>;
type CallFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Cancels a running call, from anywhere; tells whether it has ended.
#[derive(Clone, Debug)]
pub struct CallHandle {
    abort: AbortHandle,
    finished: Arc<AtomicBool>,
}

impl CallHandle {
    /// Cancels the call (upstream too) unless it has ended.
    pub fn abort(&self) {
        self.abort.abort();
    }

    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }
}

/// A running call. Dropping it before the end lets the call finish in the background; cancel
/// it through [`Running::handle`].
pub struct Running {
    mode: Mode,
    handle: CallHandle,
}

enum Mode {
    /// Polled by whoever calls [`Running::next`].
    Inline(Inline),
    /// Driven by its own task, which passes the steps on.
    Detached(mpsc::Receiver<Step>),
    /// Both ended (the outcome was taken).
    Over,
}

struct Inline {
    /// `None` once the call has answered.
    call: Option<CallFuture>,
    events: mpsc::Receiver<CallEvent>,
    outcome: Option<Outcome>,
    /// Until when, after the answer, events still on their way are waited for.
    late_until: Option<Instant>,
}

fn cancelled() -> Outcome {
    Err(ErrorObject::new(code::INTERNAL_ERROR, "request cancelled"))
}

impl Inline {
    async fn next(&mut self) -> Option<Step> {
        if let Some(call) = self.call.as_mut() {
            let events = &mut self.events;
            tokio::select! {
                // Events sent before the answer go first.
                biased;
                Some(ev) = events.recv() => return Some(Step::Event(ev)),
                outcome = call => {
                    self.call = None;
                    self.outcome = Some(outcome);
                }
            }
        }
        // Answered: pass on what is still queued. Every sender normally went with the call (the
        // pool drops a call's sink before its answer); one still held elsewhere gets a bounded
        // wait rather than an unbounded one.
        match self.events.try_recv() {
            Ok(ev) => return Some(Step::Event(ev)),
            Err(mpsc::error::TryRecvError::Disconnected) => {}
            Err(mpsc::error::TryRecvError::Empty) => {
                let until = *self
                    .late_until
                    .get_or_insert_with(|| Instant::now() + LATE_EVENTS);
                if let Ok(Some(ev)) = tokio::time::timeout_at(until, self.events.recv()).await {
                    return Some(Step::Event(ev));
                }
            }
        }
        self.outcome.take().map(Step::Done)
    }
}

impl Running {
    /// Starts `method` for the client (inline: nothing runs until [`Running::next`]).
    pub fn start(route: Route, method: String, params: Option<Value>) -> Running {
        let (tx, events) = mpsc::channel(64);
        let sink = EventSink::new(tx);
        // The call keeps the request's span wherever it is polled from (its own task, or
        // finished in the background; inline, under the handler, it is current already:
        // `telemetry::in_span`); while tracing is off there is none to look up.
        let span = crate::telemetry::current();
        let outcome_span = span.clone();
        let call = async move {
            let outcome = route.dispatch(&method, params, sink).await;
            if let Err(e) = &outcome {
                crate::telemetry::failed(&outcome_span, "jsonrpc_error");
                outcome_span.record("rpc.response.status_code", e.code);
            }
            outcome
        }
        .in_span(span);
        Running::inline(call, events)
    }

    /// A call that runs `call` (inline), its events coming from `events`.
    fn inline(
        call: impl Future<Output = Outcome> + Send + 'static,
        events: mpsc::Receiver<CallEvent>,
    ) -> Running {
        let (abort, registration) = AbortHandle::new_pair();
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        let call = Abortable::new(call, registration);
        let call: CallFuture = Box::pin(async move {
            let outcome = call.await.unwrap_or_else(|_| cancelled());
            done.store(true, Ordering::Relaxed);
            outcome
        });
        Running {
            mode: Mode::Inline(Inline {
                call: Some(call),
                events,
                outcome: None,
                late_until: None,
            }),
            handle: CallHandle { abort, finished },
        }
    }

    /// A call that never answers by itself (it ends when cancelled), for tests of what holds
    /// running calls.
    #[cfg(test)]
    pub fn waiting() -> Running {
        let (_, events) = mpsc::channel(1);
        Running::inline(std::future::pending(), events)
    }

    pub fn handle(&self) -> CallHandle {
        self.handle.clone()
    }

    /// The next step; `None` after the outcome.
    pub async fn next(&mut self) -> Option<Step> {
        let step = match &mut self.mode {
            Mode::Inline(inline) => inline.next().await,
            Mode::Detached(steps) => steps.recv().await,
            Mode::Over => None,
        };
        if matches!(step, None | Some(Step::Done(_))) {
            self.mode = Mode::Over;
        }
        step
    }

    /// Moves the call into its own task, so that it goes on while nobody polls it.
    /// A call detached already (parked a second time, in a third round) stays as it is.
    pub fn detach(&mut self) {
        let mode = std::mem::replace(&mut self.mode, Mode::Over);
        let Mode::Inline(mut inline) = mode else {
            self.mode = mode;
            return;
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(step) = inline.next().await {
                if tx.send(step).await.is_err() {
                    // Nobody takes the steps any more: the call finishes unobserved.
                    if let Some(call) = inline.call.take() {
                        let _ = call.await;
                    }
                    return;
                }
            }
        });
        self.mode = Mode::Detached(rx);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A caller that stopped waiting did not cancel the call: it finishes in the background
        // (cancelling is [`CallHandle::abort`]'s job).
        if let Mode::Inline(inline) = &mut self.mode {
            if let Some(call) = inline.call.take() {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(call);
                }
            }
        }
    }
}
