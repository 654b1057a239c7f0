//! Withdrawing a subscription from the process that has it, once its last holder let go.
//!
//! The unsubscribe goes to the process in the pool's subscription turn. When it fails
//! without an answer (it timed out and was cancelled, the connection broke, or it never got
//! there), the process may still hold the URI, and nothing else would ever withdraw it: the
//! pool's books no longer name it, so the process would go on sending updates no one reads
//! until it ends. So it is sent again in the background, in the turn each time, after 1 s,
//! then twice as long each time up to a minute, until the process answers, ends, or the URI
//! is subscribed again (then it is wanted).
//!
//! `mcpd_pool_subscription_withdrawals_total{server,outcome}` counts each attempt: `ok`, an
//! `answered` error (the process said no: it holds nothing to withdraw), or `failed`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
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

impl Pool {
    /// Sends `resources/unsubscribe` for `w` to its process (the caller holds the turn), and
    /// again later while it fails without an answer; the first attempt's outcome is returned.
    pub(super) async fn withdraw(
        self: &Arc<Self>,
        w: Withdrawal,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
    ) -> Result<Value, CallError> {
        let params = Some(serde_json::json!({ "uri": w.uri }));
        let outcome = self.unsubscribe_on(&w.process, params, events, owner).await;
        if matches!(&outcome, Err(e) if !matches!(e, CallError::Answered(_))) {
            let again = again(Arc::downgrade(self), w.uri, Arc::downgrade(&w.process));
            tokio::spawn(again);
        }
        outcome
    }

    async fn unsubscribe_on(
        &self,
        process: &Arc<dyn Upstream>,
        params: Option<Value>,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
    ) -> Result<Value, CallError> {
        let timeout = Duration::from_millis(self.spec.spec.timeouts.request_ms);
        let method = "resources/unsubscribe";
        let outcome = self
            .upstream_call(process, method, params, events, owner, (timeout, timeout))
            .await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(CallError::Answered(_)) => "answered",
            Err(_) => "failed",
        };
        metrics::counter!("mcpd_pool_subscription_withdrawals_total", "server" => self.name.clone(), "outcome" => label)
            .increment(1);
        outcome
    }
}

/// Sends the unsubscribe of `uri` again, backing off, until the process answers or ends, the
/// pool closes, or the URI is subscribed again.
async fn again(pool: Weak<Pool>, uri: String, process: Weak<dyn Upstream>) {
    let mut wait = RETRY_FIRST;
    loop {
        tokio::time::sleep(wait).await;
        let Some(pool) = pool.upgrade().filter(|p| !p.closed.load(Ordering::Relaxed)) else {
            return;
        };
        let _turn = pool.subscriptions.turn.lock().await;
        let Some(process) = process.upgrade().filter(|p| p.is_alive()) else {
            return;
        };
        if pool.subscriptions.held(&uri) {
            return;
        }
        let params = Some(serde_json::json!({ "uri": uri }));
        match pool.unsubscribe_on(&process, params, None, None).await {
            Ok(_) | Err(CallError::Answered(_)) => {
                tracing::info!(server = %pool.name, %uri, "a subscription whose unsubscribe had failed is withdrawn");
                return;
            }
            Err(e) => {
                tracing::warn!(server = %pool.name, %uri, error = %e, retry_in_ms = (wait * 2).min(RETRY_MOST).as_millis() as u64, "a subscription's unsubscribe failed again");
            }
        }
        wait = (wait * 2).min(RETRY_MOST);
    }
}
