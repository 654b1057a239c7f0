//! Concurrency limits on this node: the slots it holds of each budget, and the calls running
//! on them.
//!
//! A call takes a free slot of those the node holds, without asking anyone; when none is free
//! the node asks the leader to hold one more (`registry::lease::slots`). A [`Slot`] is given
//! back to the node when the call ends. Every [`RENEW`] the node renews what it holds, at the
//! number of calls then running: free slots go back to the cluster within half a second. A
//! holding the leader did not renew lapses here [`SLOT_TTL`] after it was asked for, before it
//! lapses on the leader, so a node cut off from the leader starts no call on slots the leader
//! may have given to another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::call::CallError;
use crate::registry::lease::slots::{SlotAsk, RENEW, SLOT_TTL};
use crate::registry::lease::{LeaseAsk, LeaseGrant};
use crate::registry::Registry;

use super::{refused, unavailable, Counted, LEASE_TIMEOUT};

/// The slots this node holds, per budget.
pub struct Slots {
    registry: Registry,
    budgets: Mutex<HashMap<String, Arc<Holding>>>,
    /// The renewal task, started with the first slot taken.
    renewing: OnceLock<()>,
}

#[derive(Default)]
struct Holding {
    now: Mutex<Held>,
    /// Held while the node asks the leader, so that one call asks and the others wait for it.
    asking: tokio::sync::Mutex<()>,
}

#[derive(Default, Clone, Copy)]
struct Held {
    running: u32,
    held: u32,
    /// Until when `held` may be used (from when it was asked for).
    until: Option<Instant>,
    /// The leader refused more until then: calls are refused without asking again (a flood
    /// over the limit costs the leader one ask per budget and tenth of a second).
    refused_until: Option<Instant>,
}

/// A running call's slot: given back when dropped.
pub struct Slot(Arc<Holding>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut h = self.0.held();
        h.running = h.running.saturating_sub(1);
    }
}

impl Holding {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a free slot of those held, if one is.
    fn take_free(self: &Arc<Self>, now: Instant) -> Option<Slot> {
        let mut h = self.held();
        if h.running < h.held && h.until.is_some_and(|u| u > now) {
            h.running += 1;
            return Some(Slot(self.clone()));
        }
        None
    }
}

impl Slots {
    pub fn new(registry: Registry) -> Arc<Slots> {
        Arc::new(Slots {
            registry,
            budgets: Mutex::default(),
            renewing: OnceLock::new(),
        })
    }

    /// A slot for `counted`'s call, or its refusal (the budget is in use, or the leader could
    /// not be asked).
    pub async fn take(self: &Arc<Self>, counted: &Counted) -> Result<Slot, CallError> {
        self.renewing.get_or_init(|| {
            tokio::spawn(renew(Arc::downgrade(self)));
        });
        let holding = self.holding(&counted.bucket);
        if let Some(slot) = holding.take_free(Instant::now()) {
            return Ok(slot);
        }
        let _asking = holding.asking.lock().await;
        let now = Instant::now();
        if let Some(slot) = holding.take_free(now) {
            return Ok(slot);
        }
        if let Some(until) = holding.held().refused_until.filter(|u| *u > now) {
            return Err(refused(counted, "concurrency", until - now));
        }
        let running = holding.held().running;
        let grant = self
            .ask(&counted.bucket, &holding, running, running + 1)
            .await
            .map_err(|e| unavailable(counted, "concurrency limit", &e))?;
        if let Some(slot) = holding.take_free(Instant::now()) {
            return Ok(slot);
        }
        let wait = Duration::from_millis(grant.retry_after_ms.max(1));
        holding.held().refused_until = Some(Instant::now() + wait);
        Err(refused(counted, "concurrency", wait))
    }

    fn holding(&self, bucket: &str) -> Arc<Holding> {
        let mut map = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(bucket.to_string()).or_default().clone()
    }

    /// Asks the leader to hold `want` slots of `bucket` while `running` calls run, and keeps
    /// its answer.
    async fn ask(
        &self,
        bucket: &str,
        holding: &Holding,
        running: u32,
        want: u32,
    ) -> Result<crate::registry::lease::slots::SlotGrant, String> {
        let asked = Instant::now();
        let ask = LeaseAsk::Slots(SlotAsk {
            bucket: bucket.to_string(),
            node: self.registry.id,
            running,
            want,
        });
        let grant = match self.registry.lease(&ask, LEASE_TIMEOUT).await {
            Ok(LeaseGrant::Slots(g)) => g,
            Ok(other) => return Err(format!("the leader answered {other:?}")),
            Err(e) => return Err(e.to_string()),
        };
        let mut h = holding.held();
        h.held = grant.held;
        h.until = Some(asked + SLOT_TTL);
        Ok(grant)
    }

    /// Renews every holding at the calls running now; forgets the idle ones.
    async fn renew_all(&self) {
        let holdings: Vec<(String, Arc<Holding>)> = {
            let mut map = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, h| {
                let held = *h.held();
                Arc::strong_count(h) > 1 || held.running > 0 || held.held > 0
            });
            map.iter().map(|(b, h)| (b.clone(), h.clone())).collect()
        };
        for (bucket, holding) in holdings {
            let held = *holding.held();
            if held.held == 0 && held.running == 0 {
                continue;
            }
            let _asking = holding.asking.lock().await;
            let running = holding.held().running;
            if let Err(e) = self.ask(&bucket, &holding, running, running).await {
                // The holding lapses on its own; calls then ask, and are refused while the
                // leader cannot be reached.
                tracing::debug!(bucket, error = %e, "could not renew concurrency slots");
            }
        }
    }
}

/// Renews the node's holdings every [`RENEW`] while the limiter lives.
async fn renew(slots: Weak<Slots>) {
    let mut tick = tokio::time::interval(RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(slots) = slots.upgrade() else { return };
        slots.renew_all().await;
    }
}
