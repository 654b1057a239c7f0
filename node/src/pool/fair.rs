//! Admission to a pool's processes, fair between tenants.
//!
//! A pool has a fixed number of slots (its processes × the calls each serves at once). A call
//! that finds a slot free and nobody waiting takes it at once. Otherwise it waits in its
//! tenant's queue, and a slot that frees goes to the tenants in turn: each tenant in the ring
//! gets up to its weight of slots, then the next tenant's turn comes (weighted round-robin).
//!
//! The wait is bounded twice: per tenant (`queue_size_per_tenant`; callers of no tenant have
//! no bound of their own) and in total (`queue_size`). When the total bound is reached, a call whose tenant has a shorter backlog
//! than the longest one pushes the newest call of the longest backlog out: one tenant's flood
//! never keeps another tenant's call from queueing. Every refusal is the callers' own
//! overload ([`Refused`]), never a failure of the server.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

/// Whose call it is, for fairness: its tenant (empty for cluster-wide callers) and the
/// tenant's weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tenant: Arc<str>,
    /// Slots the tenant gets per turn when several tenants wait (at least 1).
    pub weight: u32,
}

impl Share {
    /// Callers of no tenant (cluster-wide tokens, the node's own calls).
    pub fn cluster() -> Share {
        Share {
            tenant: Arc::from(""),
            weight: 1,
        }
    }
}

/// Why a call got no slot. None of these ran the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{queued} calls are queued already")]
    QueueFull { queued: usize },
    #[error("{queued} calls of tenant {tenant:?} are queued already")]
    TenantQueueFull { tenant: String, queued: usize },
    #[error("it was pushed out of the queue by another tenant's call (its own tenant has the longest backlog)")]
    PushedOut,
    #[error("no slot came free within {0:?}")]
    TimedOut(Duration),
    #[error("the pool is stopping")]
    Closed,
}

impl Refused {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::QueueFull { .. } => "queue_full",
            Refused::TenantQueueFull { .. } => "tenant_queue_full",
            Refused::PushedOut => "pushed_out",
            Refused::TimedOut(_) => "timed_out",
            Refused::Closed => "closed",
        }
    }
}

/// The bounds of one pool's admission.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Calls that run at once.
    pub slots: usize,
    /// Calls that may wait, in total.
    pub queue: usize,
    /// Calls of one tenant that may wait.
    pub queue_per_tenant: usize,
}

/// One pool's slots and the tenants' queues.
pub struct FairQueue {
    bounds: Bounds,
    state: Mutex<State>,
    /// Told each time a slot is released with nobody waiting (for [`FairQueue::idle`]).
    freed: Notify,
    /// The calls waiting, set under the lock at every change (`mcpd_pool_queue_depth`).
    depth: metrics::Gauge,
}

struct State {
    free: usize,
    queued: usize,
    closed: bool,
    next_id: u64,
    tenants: HashMap<Arc<str>, Backlog>,
    /// Tenants with calls waiting, in the order their turns come.
    ring: VecDeque<Arc<str>>,
    /// Slots the tenant at the ring's front got in its current turn.
    served_in_turn: u32,
}

struct Backlog {
    weight: u32,
    waiters: VecDeque<Waiter>,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Result<Slot, Refused>>,
}

/// A slot of the pool, held while the call runs; dropped, it goes to the next caller.
pub struct Slot {
    queue: Option<Arc<FairQueue>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            queue.release();
        }
    }
}

impl FairQueue {
    pub fn new(bounds: Bounds, depth: metrics::Gauge) -> Arc<FairQueue> {
        Arc::new(FairQueue {
            bounds,
            state: Mutex::new(State {
                free: bounds.slots.max(1),
                queued: 0,
                closed: false,
                next_id: 0,
                tenants: HashMap::new(),
                ring: VecDeque::new(),
                served_in_turn: 0,
            }),
            freed: Notify::new(),
            depth,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls waiting for a slot.
    pub fn queued(&self) -> usize {
        self.lock().queued
    }

    /// Waits (up to `wait`) for a slot for a call of `share`. `on_queue` is told whether the
    /// call had to queue, so that the caller can count it.
    pub async fn acquire(
        self: &Arc<Self>,
        share: &Share,
        wait: Duration,
        on_queue: impl FnOnce(),
    ) -> Result<Slot, Refused> {
        let (id, rx) = {
            let mut st = self.lock();
            if st.closed {
                return Err(Refused::Closed);
            }
            if st.free > 0 && st.queued == 0 {
                st.free -= 1;
                return Ok(self.slot());
            }
            let own = st.tenants.get(&share.tenant).map_or(0, |b| b.waiters.len());
            // Callers of no tenant (a single-tenant install, cluster admins) have the whole
            // queue: the push-out below still keeps them from crowding a tenant out.
            if !share.tenant.is_empty() && own >= self.bounds.queue_per_tenant {
                return Err(Refused::TenantQueueFull {
                    tenant: share.tenant.to_string(),
                    queued: own,
                });
            }
            if st.queued >= self.bounds.queue && !st.push_out_longer_than(own) {
                return Err(Refused::QueueFull { queued: st.queued });
            }
            st.next_id += 1;
            let id = st.next_id;
            let (tx, rx) = oneshot::channel();
            let backlog = st.tenants.entry(share.tenant.clone()).or_insert(Backlog {
                weight: 1,
                waiters: VecDeque::new(),
            });
            backlog.weight = share.weight.max(1);
            backlog.waiters.push_back(Waiter { id, tx });
            if backlog.waiters.len() == 1 {
                st.ring.push_back(share.tenant.clone());
            }
            st.queued += 1;
            self.depth.set(st.queued as f64);
            (id, rx)
        };
        on_queue();
        let waiting = Waiting {
            queue: self,
            tenant: &share.tenant,
            id,
        };
        let outcome = tokio::time::timeout(wait, rx).await;
        drop(waiting);
        match outcome {
            Ok(Ok(granted)) => granted,
            Ok(Err(_)) => Err(Refused::Closed),
            Err(_) => Err(Refused::TimedOut(wait)),
        }
    }

    /// Refuses every waiting call and every new one.
    pub fn close(&self) {
        let waiters: Vec<Waiter> = {
            let mut st = self.lock();
            st.closed = true;
            st.queued = 0;
            self.depth.set(0.0);
            st.ring.clear();
            st.tenants
                .drain()
                .flat_map(|(_, b)| b.waiters.into_iter())
                .collect()
        };
        for w in waiters {
            let _ = w.tx.send(Err(Refused::Closed));
        }
    }

    /// Completes when no call holds a slot.
    pub async fn idle(&self) {
        loop {
            let freed = self.freed.notified();
            if self.lock().free >= self.bounds.slots.max(1) {
                return;
            }
            freed.await;
        }
    }

    fn slot(self: &Arc<Self>) -> Slot {
        Slot {
            queue: Some(self.clone()),
        }
    }

    /// A slot came free: to the tenant whose turn it is, else back to the free count.
    fn release(self: Arc<Self>) {
        let mut slot = self.slot();
        let mut st = self.lock();
        while let Some(waiter) = st.next_waiter() {
            self.depth.set(st.queued as f64);
            match waiter.tx.send(Ok(slot)) {
                Ok(()) => return,
                // Its caller gave up in the meantime: the next one.
                Err(returned) => match returned {
                    Ok(s) => slot = s,
                    Err(_) => unreachable!("a slot was sent"),
                },
            }
        }
        // Nobody waits: the slot is free again, and it must not release itself twice.
        slot.queue = None;
        st.free += 1;
        drop(st);
        self.freed.notify_waiters();
    }
}

impl State {
    /// The next waiter in turn, taken out of its queue.
    fn next_waiter(&mut self) -> Option<Waiter> {
        let tenant = self.ring.front()?.clone();
        let backlog = self.tenants.get_mut(&tenant)?;
        let waiter = backlog.waiters.pop_front()?;
        self.queued -= 1;
        self.served_in_turn += 1;
        if backlog.waiters.is_empty() {
            self.tenants.remove(&tenant);
            self.ring.pop_front();
            self.served_in_turn = 0;
        } else if self.served_in_turn >= backlog.weight {
            self.ring.rotate_left(1);
            self.served_in_turn = 0;
        }
        Some(waiter)
    }

    /// Pushes the newest call of the longest backlog out, if that backlog is longer than
    /// `own` + 1 (so that the two would not just trade places). Whether room was made.
    fn push_out_longer_than(&mut self, own: usize) -> bool {
        let Some((tenant, len)) = self
            .tenants
            .iter()
            .map(|(t, b)| (t.clone(), b.waiters.len()))
            .max_by_key(|(_, len)| *len)
        else {
            return false;
        };
        if len <= own + 1 {
            return false;
        }
        let Some(victim) = self
            .tenants
            .get_mut(&tenant)
            .and_then(|b| b.waiters.pop_back())
        else {
            return false;
        };
        self.queued -= 1;
        let _ = victim.tx.send(Err(Refused::PushedOut));
        true
    }

    /// Takes a call that gave up out of its tenant's queue (if it is still there).
    fn forget(&mut self, tenant: &Arc<str>, id: u64) {
        let Some(backlog) = self.tenants.get_mut(tenant) else {
            return;
        };
        let Some(at) = backlog.waiters.iter().position(|w| w.id == id) else {
            return;
        };
        backlog.waiters.remove(at);
        self.queued -= 1;
        if backlog.waiters.is_empty() {
            self.tenants.remove(tenant);
            if let Some(i) = self.ring.iter().position(|t| t == tenant) {
                self.ring.remove(i);
                if i == 0 {
                    self.served_in_turn = 0;
                }
            }
        }
    }
}

/// A call in a tenant's queue; dropped (given up, cancelled, or served), it leaves the queue.
struct Waiting<'a> {
    queue: &'a FairQueue,
    tenant: &'a Arc<str>,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.queue.lock();
        st.forget(self.tenant, self.id);
        self.queue.depth.set(st.queued as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(t: &str, weight: u32) -> Share {
        Share {
            tenant: Arc::from(t),
            weight,
        }
    }

    fn bounds(slots: usize, queue: usize, per_tenant: usize) -> Bounds {
        Bounds {
            slots,
            queue,
            queue_per_tenant: per_tenant,
        }
    }

    const LONG: Duration = Duration::from_secs(30);

    /// Queues `n` calls of `tenant`, each recording its tenant when it gets the slot and then
    /// holding it until told.
    async fn queue_calls(
        q: &Arc<FairQueue>,
        tenant: &str,
        weight: u32,
        n: usize,
        order: &Arc<Mutex<Vec<String>>>,
        tasks: &mut tokio::task::JoinSet<Result<(), Refused>>,
    ) {
        for _ in 0..n {
            let (q, order, share) = (q.clone(), order.clone(), share(tenant, weight));
            let (queued_tx, queued_rx) = oneshot::channel();
            tasks.spawn(async move {
                let slot = q
                    .acquire(&share, LONG, || {
                        let _ = queued_tx.send(());
                    })
                    .await?;
                order.lock().unwrap().push(share.tenant.to_string());
                drop(slot);
                Ok(())
            });
            queued_rx.await.expect("the call queued");
        }
    }

    #[tokio::test]
    async fn a_free_slot_is_taken_at_once_and_given_back_on_drop() {
        let q = FairQueue::new(bounds(2, 4, 4), metrics::Gauge::noop());
        let a = q.acquire(&share("a", 1), LONG, || panic!("queued")).await;
        let b = q.acquire(&share("a", 1), LONG, || panic!("queued")).await;
        assert!(a.is_ok() && b.is_ok());
        drop(a);
        let c = q.acquire(&share("b", 1), LONG, || panic!("queued")).await;
        assert!(c.is_ok());
        drop((b, c));
        tokio::time::timeout(Duration::from_secs(5), q.idle())
            .await
            .expect("idle once every slot is back");
    }

    #[tokio::test]
    async fn freed_slots_go_to_the_tenants_in_turn_by_weight() {
        let q = FairQueue::new(bounds(1, 64, 64), metrics::Gauge::noop());
        let holder = q.acquire(&share("x", 1), LONG, || {}).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        // The flood queued first; the quiet tenant (weight 2) after it.
        queue_calls(&q, "flood", 1, 6, &order, &mut tasks).await;
        queue_calls(&q, "quiet", 2, 4, &order, &mut tasks).await;
        assert_eq!(q.queued(), 10);
        drop(holder);
        while let Some(done) = tasks.join_next().await {
            done.unwrap().unwrap();
        }
        let order = order.lock().unwrap().join(",");
        assert_eq!(
            order,
            "flood,quiet,quiet,flood,quiet,quiet,flood,flood,flood,flood"
        );
        assert_eq!(q.queued(), 0);
    }

    #[tokio::test]
    async fn a_tenant_is_refused_past_its_own_bound_while_others_still_queue() {
        let q = FairQueue::new(bounds(1, 64, 2), metrics::Gauge::noop());
        let _holder = q.acquire(&share("x", 1), LONG, || {}).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        queue_calls(&q, "flood", 1, 2, &order, &mut tasks).await;
        let third = q.acquire(&share("flood", 1), LONG, || {}).await;
        assert!(
            matches!(third, Err(Refused::TenantQueueFull { ref tenant, queued: 2 }) if tenant == "flood"),
            "{:?}",
            third.err()
        );
        queue_calls(&q, "quiet", 1, 1, &order, &mut tasks).await;
        assert_eq!(q.queued(), 3);
    }

    #[tokio::test]
    async fn callers_of_no_tenant_have_the_whole_queue() {
        let q = FairQueue::new(bounds(1, 4, 2), metrics::Gauge::noop());
        let _holder = q.acquire(&Share::cluster(), LONG, || {}).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        queue_calls(&q, "", 1, 4, &order, &mut tasks).await;
        assert_eq!(q.queued(), 4);
        let fifth = q.acquire(&Share::cluster(), LONG, || {}).await;
        assert!(
            matches!(fifth, Err(Refused::QueueFull { queued: 4 })),
            "{:?}",
            fifth.err()
        );
        // A tenant's call still queues, pushing out the newest of theirs.
        queue_calls(&q, "acme", 1, 1, &order, &mut tasks).await;
        assert_eq!(q.queued(), 4);
    }

    #[tokio::test]
    async fn a_full_queue_pushes_out_the_longest_backlog_not_the_quiet_tenant() {
        let q = FairQueue::new(bounds(1, 4, 4), metrics::Gauge::noop());
        let holder = q.acquire(&share("x", 1), LONG, || {}).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        queue_calls(&q, "flood", 1, 4, &order, &mut tasks).await;
        // The queue is full of the flood; the quiet tenant's call still queues.
        queue_calls(&q, "quiet", 1, 1, &order, &mut tasks).await;
        assert_eq!(q.queued(), 4);
        // The flood cannot push out a call of its own kind of backlog.
        let more = q.acquire(&share("flood", 1), LONG, || {}).await;
        assert!(
            matches!(more, Err(Refused::QueueFull { queued: 4 })),
            "{:?}",
            more.err()
        );
        drop(holder);
        let mut pushed_out = 0;
        while let Some(done) = tasks.join_next().await {
            match done.unwrap() {
                Ok(()) => {}
                Err(Refused::PushedOut) => pushed_out += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(pushed_out, 1);
        let order = order.lock().unwrap().clone();
        assert_eq!(order.iter().filter(|t| *t == "quiet").count(), 1);
        assert_eq!(order.len(), 4);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_leaves_the_queue_and_loses_no_slot() {
        let q = FairQueue::new(bounds(1, 4, 4), metrics::Gauge::noop());
        let holder = q.acquire(&share("x", 1), LONG, || {}).await.unwrap();
        let gave_up = q
            .acquire(&share("a", 1), Duration::from_millis(20), || {})
            .await;
        assert!(matches!(gave_up, Err(Refused::TimedOut(_))));
        assert_eq!(q.queued(), 0);
        // A cancelled wait (the future dropped) leaves no trace either.
        let q2 = q.clone();
        let cancelled = tokio::spawn(async move { q2.acquire(&share("a", 1), LONG, || {}).await });
        while q.queued() == 0 {
            tokio::task::yield_now().await;
        }
        cancelled.abort();
        let _ = cancelled.await;
        assert_eq!(q.queued(), 0);
        drop(holder);
        let again = q.acquire(&share("b", 1), LONG, || panic!("queued")).await;
        assert!(again.is_ok(), "the slot came back");
    }

    #[tokio::test]
    async fn closing_refuses_the_waiting_and_the_new() {
        let q = FairQueue::new(bounds(1, 4, 4), metrics::Gauge::noop());
        let _holder = q.acquire(&share("x", 1), LONG, || {}).await.unwrap();
        let q2 = q.clone();
        let waiting = tokio::spawn(async move { q2.acquire(&share("a", 1), LONG, || {}).await });
        while q.queued() == 0 {
            tokio::task::yield_now().await;
        }
        q.close();
        assert_eq!(waiting.await.unwrap().err(), Some(Refused::Closed));
        let late = q.acquire(&share("a", 1), LONG, || {}).await;
        assert_eq!(late.err(), Some(Refused::Closed));
    }
}
