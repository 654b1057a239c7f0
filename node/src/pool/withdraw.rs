//! Withdrawing a subscription from the process that has it, once its last holder let go.
//!
//! The unsubscribe goes to the process in the pool's subscription turn. When it fails
//! without an answer (it timed out and was cancelled, the connection broke, or it never got
//! there), the process may still hold the URI, and nothing else would ever withdraw it: the
//! pool's books no longer name it, so the process would go on sending updates no one reads
//! until it ends. So the pool keeps it in [`Retries`], and one task per pool sends every
//! pending one again, side by side in one turn (which it holds for one request timeout at
//! most), after 1 s, then twice as long each time up to a minute. A URI leaves the retries
//! when its process answers (or ends), or when it is subscribed again on that process (then
//! it is wanted); the task ends when none is left, or when the pool closes. A failure that
//! comes while the task runs joins its current wait (up to a minute).
//!
//! `mcpd_pool_subscription_withdrawals_total{server,outcome}` counts each attempt: `ok`, an
//! `answered` error (the process said no: it holds nothing to withdraw), or `failed`;
//! `mcpd_pool_subscription_withdrawals_pending{server}` the URIs waiting to be sent again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::Value;

use super::upstream::Upstream;
use super::Pool;
use crate::call::{CallError, EventSink};

/// The first wait before an unsubscribe that failed is sent again; it doubles each time.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const RETRY_MOST: Duration = Duration::from_secs(60);

/// One subscription to withdraw: the URI and the process that has it.
pub struct Withdrawal {
    pub uri: String,
    pub process: Arc<dyn Upstream>,
}

/// A pool's unsubscribes to send again.
#[derive(Default)]
pub struct Retries(Mutex<Pending>);

#[derive(Default)]
struct Pending {
    /// By URI and process: a pool of several processes may have one URI to withdraw from
    /// more than one.
    uris: HashMap<(String, usize), Weak<dyn Upstream>>,
    /// Whether the pool's retry task runs.
    running: bool,
}

/// What tells one process from another in [`Pending`].
fn address(process: &Weak<dyn Upstream>) -> usize {
    process.as_ptr() as *const () as usize
}

impl Retries {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `w` to send again: `true` when the retry task must be started.
    fn add(&self, w: &Withdrawal) -> bool {
        let process = Arc::downgrade(&w.process);
        let mut p = self.lock();
        p.uris.insert((w.uri.clone(), address(&process)), process);
        !std::mem::replace(&mut p.running, true)
    }

    /// Takes every pending URI out, to be sent again.
    fn take(&self) -> Vec<(String, Weak<dyn Upstream>)> {
        let mut p = self.lock();
        p.uris
            .drain()
            .map(|((uri, _), process)| (uri, process))
            .collect()
    }

    /// Puts back the URIs still to withdraw (one that failed again meanwhile is there
    /// already); `false` when none is left, and the task ends.
    fn keep(&self, failed: Vec<(String, Weak<dyn Upstream>)>) -> bool {
        let mut p = self.lock();
        for (uri, process) in failed {
            p.uris.entry((uri, address(&process))).or_insert(process);
        }
        p.running = !p.uris.is_empty();
        p.running
    }

    /// The task ended without [`Retries::keep`] saying so (it panicked): the next failure
    /// starts another.
    fn stopped(&self) {
        self.lock().running = false;
    }

    fn len(&self) -> usize {
        self.lock().uris.len()
    }
}

impl Pool {
    /// Sends `resources/unsubscribe` for `w` to its process (the caller holds the turn); one
    /// that fails without an answer is kept in the retries. The first attempt's outcome is
    /// returned.
    pub(super) async fn withdraw(
        self: &Arc<Self>,
        w: &Withdrawal,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
    ) -> Result<Value, CallError> {
        let outcome = self.unsubscribe_on(w, events, owner).await;
        if unanswered(&outcome) {
            if self.withdrawals.add(w) {
                tokio::spawn(again(Arc::downgrade(self)));
            }
            self.count_pending();
        }
        outcome
    }

    async fn unsubscribe_on(
        &self,
        w: &Withdrawal,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
    ) -> Result<Value, CallError> {
        let timeout = Duration::from_millis(self.spec.spec.timeouts.request_ms);
        let params = Some(serde_json::json!({ "uri": w.uri }));
        let method = "resources/unsubscribe";
        let outcome = self
            .upstream_call(
                &w.process,
                method,
                params,
                events,
                owner,
                (timeout, timeout),
            )
            .await;
        let label = match &outcome {
            Ok(_) => "ok",
            _ if unanswered(&outcome) => "failed",
            Err(_) => "answered",
        };
        metrics::counter!("mcpd_pool_subscription_withdrawals_total", "server" => self.name.clone(), "outcome" => label)
            .increment(1);
        outcome
    }

    fn count_pending(&self) {
        metrics::gauge!("mcpd_pool_subscription_withdrawals_pending", "server" => self.name.clone())
            .set(self.withdrawals.len() as f64);
    }
}

/// Whether an unsubscribe failed without the process's answer, so the process may still
/// hold the URI.
fn unanswered(outcome: &Result<Value, CallError>) -> bool {
    matches!(outcome, Err(e) if !matches!(e, CallError::Answered(_)))
}

/// The pool's retry task: every pending unsubscribe again, side by side in one turn, backing
/// off, until none is left or the pool closes.
async fn again(pool: Weak<Pool>) {
    let _stopped = Stopped(pool.clone());
    let mut wait = RETRY_FIRST;
    loop {
        tokio::time::sleep(wait).await;
        let Some(pool) = pool.upgrade().filter(|p| !p.closed.load(Ordering::Relaxed)) else {
            return;
        };
        let turn = pool.subscriptions.turn.lock().await;
        // A process that ended took the subscription with it; one subscribed again wants it.
        let due: Vec<Withdrawal> = pool
            .withdrawals
            .take()
            .into_iter()
            .filter_map(|(uri, process)| {
                let process = process.upgrade().filter(|p| p.is_alive())?;
                let wanted = pool.subscriptions.held_on(&uri, &process);
                (!wanted).then_some(Withdrawal { uri, process })
            })
            .collect();
        let sent = due.iter().map(|w| pool.unsubscribe_on(w, None, None));
        let outcomes = futures_util::future::join_all(sent).await;
        drop(turn);
        let failed: Vec<_> = due
            .into_iter()
            .zip(outcomes)
            .filter(|(_, o)| unanswered(o))
            .map(|(w, _)| (w.uri, Arc::downgrade(&w.process)))
            .collect();
        let (newer, still) = (pool.withdrawals.len(), failed.len());
        let more = pool.withdrawals.keep(failed);
        pool.count_pending();
        if !more {
            tracing::info!(server = %pool.name, "no failed unsubscribe left to send again");
            return;
        }
        wait = (wait * 2).min(RETRY_MOST);
        tracing::warn!(server = %pool.name, failed = still, newer, retry_in_ms = wait.as_millis() as u64, "unsubscribes failed again; the server may keep sending updates for them");
    }
}

/// Resets the pool's `running` flag if its retry task unwinds.
struct Stopped(Weak<Pool>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(pool) = self.0.upgrade() {
                pool.withdrawals.stopped();
            }
        }
    }
}
