//! Pools of MCP server processes: for each enabled server, `pool_size` stdio processes that
//! many downstream sessions share.
//!
//! - [`process`]: one process, spoken to as an MCP client.
//! - [`Pool`]: the processes of one server, each kept alive by a supervisor that restarts it
//!   with exponential backoff and jitter and reports a crash loop; admission with a bounded
//!   queue; the server's catalogue (tools, resources, templates, prompts).
//! - [`reconcile`]: keeps the set of pools equal to what the replicated registry says.

pub mod catalogue;
pub mod departed;
pub mod egress;
pub mod events;
pub mod fair;
mod handshake;
pub mod isolation;
pub mod legacy_sse;
mod listen;
pub mod liveness;
pub mod oauth;
pub mod process;
pub mod reconcile;
pub mod remote;
pub mod remote_http;
mod remote_request;
pub mod remote_stateless;
pub mod report;
mod rounds;
pub mod sandbox;
mod subscriptions;
pub mod upstream;
mod withdraw;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use mcpcp_proto::api::{ServerSpec, Versioned};
use mcpcp_proto::mcp::Message;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;

use crate::call::{Affinity, CallError, EventSink, HoldOp};
use crate::shard::{self, ShardHandles};
use crate::shutdown::{self, Shutdown, Trigger};
use crate::telemetry::InSpanExt;
use catalogue::Catalogue;
use events::PoolEvent;
use fair::{FairQueue, Share};
use upstream::Upstream;

/// Node-wide pool settings (`[pool]` in mcpd.toml).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Calls that may wait for a free process, per server; beyond it calls are refused at once
    /// (or push out the newest call of the tenant with the longest backlog; see `pool::fair`).
    pub queue_size: usize,
    /// Calls of one tenant that may wait for a free process, per server (callers of no
    /// tenant are bounded by `queue_size` only).
    pub queue_size_per_tenant: usize,
    /// Calls one process serves at the same time.
    pub max_concurrency_per_process: usize,
    /// Interval of the `ping` health check.
    pub health_interval_ms: u64,
    /// Time a process has to answer a health `ping`.
    pub health_timeout_ms: u64,
    /// Time a stopping process gets after stdin closes, and again after SIGTERM.
    pub stop_grace_ms: u64,
    /// Restarts within a minute that make a crash loop.
    pub crash_loop_restarts: u32,
    /// How long a call that is the only one this node waits on polls for its server's answer
    /// before letting its thread sleep, in µs (0: never poll). Saves a thread wake-up per call
    /// at low load; costs at most this much CPU per call, and nothing under load.
    pub answer_spin_us: u64,
    /// The variables of `mcpd`'s own environment a server process inherits (when set, and
    /// not set by the server's `env`); nothing else of it reaches the process.
    pub inherit_env: Vec<String>,
    /// Most questions a server of 2026-07-28 may ask its client in one `input_required`
    /// round; a larger round ends the call with an error naming this setting.
    pub max_input_questions: usize,
    /// How long a 2026-07-28 server's `subscriptions/listen` stream may take to be taken and
    /// acknowledged before it is tried again (`pool::listen`).
    pub listen_open_timeout_ms: u64,
    /// The pause between tries of a listen stream doubles from 0.5 s up to this.
    pub listen_backoff_max_ms: u64,
    /// How long a remote server's failed OAuth token fetch is the answer for the calls that
    /// follow (they fail at once instead of each asking the token endpoint again); 0: never.
    pub oauth_failure_hold_ms: u64,
    /// The node's own data and TLS directories, hidden from servers with a private
    /// filesystem (set at start, not read from the file).
    #[serde(skip)]
    pub node_paths: sandbox::NodePaths,
}

impl PoolConfig {
    fn answer_spin(&self) -> Duration {
        Duration::from_micros(self.answer_spin_us)
    }

    fn listen_timing(&self) -> listen::ListenTiming {
        listen::ListenTiming {
            open_within: Duration::from_millis(self.listen_open_timeout_ms),
            backoff_max: Duration::from_millis(self.listen_backoff_max_ms),
        }
    }

    fn oauth_failure_hold(&self) -> Duration {
        Duration::from_millis(self.oauth_failure_hold_ms)
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            queue_size: 256,
            queue_size_per_tenant: 128,
            max_concurrency_per_process: 32,
            health_interval_ms: 15_000,
            health_timeout_ms: 5_000,
            stop_grace_ms: 2_000,
            crash_loop_restarts: 5,
            answer_spin_us: 100,
            inherit_env: ["PATH", "HOME", "LANG", "TMPDIR"].map(String::from).into(),
            max_input_questions: rounds::MAX_QUESTIONS,
            listen_open_timeout_ms: 10_000,
            listen_backoff_max_ms: 30_000,
            oauth_failure_hold_ms: 5_000,
            node_paths: sandbox::NodePaths::default(),
        }
    }
}

/// Most dedicated processes one pool runs on one node.
const MAX_DEDICATED: usize = 128;

/// A session's own process: set once started and initialised. The pool's map holds it while
/// it starts, so that calls of other sessions do not wait for this one's start.
struct Dedicated {
    process: tokio::sync::OnceCell<Arc<dyn Upstream>>,
    last_used: Mutex<Instant>,
}

impl Dedicated {
    /// Whether the process has started and since exited.
    fn dead(&self) -> bool {
        self.process.get().is_some_and(|p| !p.is_alive())
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

type DedicatedMap = HashMap<String, Arc<Dedicated>>;

/// A server's notification that belongs to no call, tagged with the server's name.
#[derive(Debug, Clone)]
pub struct ServerEvent {
    pub server: String,
    pub message: Message,
    /// The node whose process sent it (`None`: this node).
    pub origin: Option<u64>,
}

/// State of one process slot, as shown by `mcpctl server status` and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    Starting,
    Ready,
    Restarting,
    CrashLoop,
    Stopped,
}

impl SlotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Starting => "starting",
            SlotState::Ready => "ready",
            SlotState::Restarting => "restarting",
            SlotState::CrashLoop => "crash_loop",
            SlotState::Stopped => "stopped",
        }
    }
}

struct Slot {
    process: watch::Receiver<Option<Arc<dyn Upstream>>>,
    state: watch::Receiver<SlotState>,
    report: report::SlotReport,
}

/// The processes of one server.
pub struct Pool {
    pub name: String,
    pub spec: Versioned<ServerSpec>,
    slots: Vec<Slot>,
    /// Who gets the next free process (fair between tenants).
    admission: Arc<FairQueue>,
    /// Calls that had to wait for a process (`mcpd_pool_queued_total`).
    queued: metrics::Counter,
    closed: AtomicBool,
    /// What the server offers, as last read from one of its processes.
    catalogue: watch::Sender<Arc<Catalogue>>,
    /// When the pool was started (its processes' first start began).
    started: Instant,
    /// Server notifications that belong to no call (list_changed, resources/updated), to
    /// the node-wide hub every session listens to.
    events: broadcast::Sender<ServerEvent>,
    stop: Trigger,
    tasks: std::sync::Mutex<JoinSet<()>>,
    cfg: PoolConfig,
    /// `session_mode = dedicated`: a process per downstream session.
    dedicated: Mutex<DedicatedMap>,
    /// The resources subscribed on the shared processes, and who holds each.
    subscriptions: Arc<subscriptions::SharedSubscriptions>,
    /// Unsubscribes that failed without an answer, sent again (`withdraw`).
    withdrawals: withdraw::Retries,
    /// What the pool learned of its server's revision (its dedicated processes' starts too).
    revision: handshake::RevisionHint,
    pool_events: mpsc::Sender<PoolEvent>,
}

impl Pool {
    /// Starts the pool's supervisors; processes come up in the background.
    pub fn start(
        spec: Versioned<ServerSpec>,
        cfg: PoolConfig,
        events: broadcast::Sender<ServerEvent>,
        shards: Option<ShardHandles>,
    ) -> Arc<Pool> {
        let size = spec.spec.pool_size.max(1) as usize;
        // Each pool starts where the last one stopped, so the shards share the processes.
        let first_shard = PLACED.fetch_add(size, Ordering::Relaxed);
        let (trigger, stop) = shutdown::channel();
        let (pool_tx, pool_rx) = mpsc::channel(1024);
        let mut tasks = JoinSet::new();
        let mut slots = Vec::with_capacity(size);
        let revision = handshake::RevisionHint::default();
        for index in 0..size {
            let (ptx, prx) = watch::channel(None);
            let (stx, srx) = watch::channel(SlotState::Starting);
            let report = report::SlotReport::default();
            let place = Place {
                index,
                shard: shards
                    .as_ref()
                    .map(|s| s.get(first_shard.wrapping_add(index)).clone()),
                report: report.clone(),
                revision: revision.clone(),
            };
            tasks.spawn(supervise(
                place,
                spec.spec.clone(),
                ptx,
                stx,
                pool_tx.clone(),
                stop.clone(),
                cfg.clone(),
            ));
            slots.push(Slot {
                process: prx,
                state: srx,
                report,
            });
        }
        let active = size * cfg.max_concurrency_per_process.max(1);
        let depth = metrics::gauge!("mcpd_pool_queue_depth", "server" => spec.spec.name.clone());
        let queued =
            metrics::counter!("mcpd_pool_queued_total", "server" => spec.spec.name.clone());
        let pool = Arc::new(Pool {
            name: spec.spec.name.clone(),
            subscriptions: Arc::new(subscriptions::SharedSubscriptions::new(&spec.spec.name)),
            withdrawals: withdraw::Retries::default(),
            revision,
            spec,
            slots,
            admission: FairQueue::new(
                fair::Bounds {
                    slots: active,
                    queue: cfg.queue_size,
                    queue_per_tenant: cfg.queue_size_per_tenant,
                },
                depth,
            ),
            queued,
            closed: AtomicBool::new(false),
            catalogue: watch::Sender::new(Arc::new(Catalogue::default())),
            started: Instant::now(),
            events,
            stop: trigger,
            tasks: std::sync::Mutex::new(JoinSet::new()),
            cfg,
            dedicated: Mutex::new(HashMap::new()),
            pool_events: pool_tx.clone(),
        });
        let mut t = pool.tasks.lock().unwrap_or_else(|p| p.into_inner());
        *t = tasks;
        t.spawn(watch_catalogue(
            Arc::downgrade(&pool),
            pool_rx,
            stop.clone(),
        ));
        if pool.spec.spec.session_mode == mcpcp_proto::api::SessionMode::Dedicated {
            t.spawn(reap_dedicated(Arc::downgrade(&pool), stop));
        }
        drop(t);
        pool
    }

    /// Slot states, in slot order.
    pub fn states(&self) -> Vec<SlotState> {
        self.slots.iter().map(|s| *s.state.borrow()).collect()
    }

    /// Each slot's state, last failure and stderr lines, for `server status`.
    pub fn reports(&self) -> Vec<mcpcp_proto::api::ProcessReport> {
        self.slots
            .iter()
            .map(|s| s.report.snapshot(s.state.borrow().as_str()))
            .collect()
    }

    pub fn catalogue(&self) -> Arc<Catalogue> {
        self.catalogue.borrow().clone()
    }

    /// The catalogue once it has been read from a process (up to `within`; what there is
    /// then, otherwise).
    pub async fn catalogue_loaded(&self, within: Duration) -> Arc<Catalogue> {
        let now = self.catalogue();
        if now.loaded {
            return now;
        }
        let mut rx = self.catalogue.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|c| c.loaded)).await;
        self.catalogue()
    }

    /// Calls waiting for a process.
    pub fn queue_depth(&self) -> usize {
        self.admission.queued()
    }

    /// The `initialize` answer of a ready process (server info, capabilities, instructions).
    pub fn init_result(&self) -> Option<Value> {
        self.slots
            .iter()
            .find_map(|s| s.process.borrow().as_ref().map(|p| p.init().clone()))
    }

    /// Waits (up to `within`) until some process is ready; `None` when none became ready or
    /// every slot is crash-looping.
    pub async fn ready(&self, within: Duration) -> Option<Arc<dyn Upstream>> {
        let deadline = tokio::time::Instant::now() + within;
        let here = shard::current();
        // Each slot's process as this wait has seen it: a wait is for a change after that
        // (a fresh copy of the slot's receiver would take every earlier change as new, and
        // the wait would never sleep).
        let mut watches: Vec<_> = self.slots.iter().map(|s| s.process.clone()).collect();
        loop {
            let best = watches
                .iter_mut()
                .filter_map(|w| w.borrow_and_update().clone())
                .filter(|p| p.is_alive())
                // Of the least busy, one on the caller's own shard (no hop between threads).
                .min_by_key(|p| (p.in_flight(), p.shard() != here));
            if best.is_some() {
                return best;
            }
            if self
                .slots
                .iter()
                .all(|s| *s.state.borrow() == SlotState::CrashLoop)
            {
                return None;
            }
            let any_change = futures_util::future::select_all(
                watches.iter_mut().map(|rx| Box::pin(rx.changed())),
            );
            let changed = tokio::time::timeout_at(deadline, any_change)
                .await
                .map(|(changed, _, _)| changed);
            // The deadline, or a slot's supervisor ended (the pool is stopping): no process is
            // coming. (Its closed channel would answer every wait at once.)
            if !matches!(changed, Ok(Ok(()))) {
                return None;
            }
        }
    }

    /// Whether a process of this pool is still on its first start, so that one may come up
    /// soon. One whose processes all failed since (restarting, crash-looping) is not waited
    /// for by a caller that only asks what the server offers (`crate::route`'s `info_of`).
    pub fn first_starting(&self) -> bool {
        self.slots
            .iter()
            .any(|s| *s.state.borrow() == SlotState::Starting)
    }

    /// Whether a process of it is ready now.
    fn serving(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.process.borrow().as_ref().is_some_and(|p| p.is_alive()))
    }

    /// Its endpoint's lists passed to its fallback (its last process went) or came back
    /// (`serving`): counted and logged. The lists whose clients are to be told: each it
    /// offers, and the tools, which the fallback offers in its place.
    fn handover(&self, serving: bool) -> Vec<&'static str> {
        let to = if serving { "server" } else { "fallback" };
        tracing::info!(server = %self.name, to, "its endpoint's lists pass to the server or its fallback; its clients are told");
        metrics::counter!("mcpd_pool_fallback_handovers_total", "server" => self.name.clone(), "to" => to).increment(1);
        let mut lists = self.catalogue.borrow().lists_offered();
        if !lists.contains(&"tools") {
            lists.push("tools");
        }
        lists
    }

    /// Sends a notification of the server that belongs to no call to the node's hub.
    fn announce(&self, message: Message) {
        let _ = self.events.send(ServerEvent {
            server: self.name.clone(),
            message,
            origin: None,
        });
    }

    /// What is left of `within`, counted from the pool's start, while a process is still on
    /// its first start; zero once none is.
    pub fn first_start_left(&self, within: Duration) -> Duration {
        if !self.first_starting() {
            return Duration::ZERO;
        }
        within.saturating_sub(self.started.elapsed())
    }

    /// Runs one request on a process of this pool, for a caller of no tenant.
    pub async fn call(
        &self,
        method: &str,
        params: Option<Value>,
        events: Option<EventSink>,
    ) -> Result<Value, CallError> {
        self.call_routed(method, params, events, None, &Share::cluster())
            .await
            .answer()
    }

    /// Runs one request for a downstream session: on its own process when the server is in
    /// `session_mode = dedicated` (started on first use, reaped when idle), else as [`Pool::call`],
    /// queued fairly with the other tenants' calls (`share`).
    pub async fn call_for(
        self: &Arc<Self>,
        affinity: Option<&Affinity>,
        share: &Share,
        method: &str,
        params: Option<Value>,
        events: Option<EventSink>,
    ) -> Result<Value, CallError> {
        let dedicated = self.spec.spec.session_mode == mcpcp_proto::api::SessionMode::Dedicated;
        let uri = subscription_uri(method, params.as_ref());
        let Some(affinity) = affinity.filter(|_| dedicated) else {
            let owner = affinity.map(|a| Arc::<str>::from(a.holder()));
            if let Some(uri) = uri {
                let withdrawing = affinity.and_then(|a| a.hold) == Some(HoldOp::Withdraw);
                let asked = Subscription {
                    method,
                    uri,
                    owner,
                    withdrawing,
                };
                return self.subscription(asked, params, events, share).await;
            }
            return self
                .call_routed(method, params, events, owner, share)
                .await
                .answer();
        };
        let own = method == "resources/unsubscribe" || affinity.hold.is_some();
        if own && uri.is_some() && !self.has_dedicated(&affinity.key) {
            // Nothing is subscribed on a process that is not running, and a process started
            // later subscribes to the session's URIs itself: none is started for this.
            return Ok(serde_json::json!({}));
        }
        let process = self.dedicated_process(affinity).await?;
        let timeout = Duration::from_millis(self.spec.spec.timeouts.request_ms);
        self.upstream_call(&process, method, params, events, None, (timeout, timeout))
            .await
    }

    /// A `resources/subscribe` or `resources/unsubscribe` of `owner` on the shared processes:
    /// only the first subscriber's reaches a process, and only the last holder's unsubscribe
    /// (`subscriptions`).
    ///
    /// A subscribe sent to a process runs to its end even when its caller goes (a client that
    /// gave up, a peer's stream cancelled): the process may have taken it, so it is recorded,
    /// held by `owner`, for the node that made the call to withdraw
    /// (`crate::mcp::holds::disown`); that withdrawal waits for the pool's turn, so it comes
    /// after. So is one that may have run (it timed out, or the connection broke after it was
    /// sent): the process may hold it, and the session, which got an error, withdraws it.
    async fn subscription(
        self: &Arc<Self>,
        asked: Subscription<'_>,
        params: Option<Value>,
        events: Option<EventSink>,
        share: &Share,
    ) -> Result<Value, CallError> {
        let Subscription {
            method,
            uri,
            owner,
            withdrawing,
        } = asked;
        let subs = &self.subscriptions;
        let turn = subs.turn.clone().lock_owned().await;
        if method == "resources/subscribe" {
            if subs.join(&uri, owner.as_ref()) {
                return Ok(serde_json::json!({}));
            }
            let (pool, share) = (self.clone(), share.clone());
            let method = method.to_string();
            // Its spans stay in the caller's trace (a task starts with no current span).
            let subscribe = tokio::spawn(
                async move {
                    let _turn = turn;
                    let reached = pool
                        .call_routed(&method, params, events, owner.clone(), &share)
                        .await;
                    let (process, outcome) = match reached {
                        Reached::Nowhere(e) => return Err(e),
                        Reached::Process(process, outcome) => (process, outcome),
                    };
                    // Taken, or maybe taken: it timed out, or the connection broke after it went.
                    if outcome
                        .as_ref()
                        .map_or_else(CallError::may_have_run, |_| true)
                    {
                        pool.subscriptions
                            .subscribed(&uri, owner.as_ref(), &process);
                    }
                    outcome
                }
                .in_span(crate::telemetry::current()),
            );
            return subscribe.await.unwrap_or_else(|e| {
                Err(CallError::Crashed(format!(
                    "server {:?}: the subscribe ended unexpectedly ({e}); it may or may not have run",
                    self.name
                )))
            });
        }
        match subs.leave(&uri, owner.as_ref()) {
            subscriptions::Unsubscribe::Kept => Ok(serde_json::json!({})),
            // In its own task, holding the turn: the books no longer name the URI, so it
            // must reach the process (or its retries) even when its caller goes.
            subscriptions::Unsubscribe::Release(process) => {
                let (pool, w) = (self.clone(), withdraw::Withdrawal { uri, process });
                let withdrawal = tokio::spawn(
                    async move {
                        let _turn = turn;
                        pool.withdraw(&w, events, owner).await
                    }
                    .in_span(crate::telemetry::current()),
                );
                withdrawal.await.unwrap_or_else(|e| {
                    Err(CallError::Crashed(format!(
                        "server {:?}: the unsubscribe ended unexpectedly ({e}); it may or may not have run",
                        self.name
                    )))
                })
            }
            // The node letting go for a session: no process has the URI (its process ended,
            // and the subscription with it), so nothing is left to withdraw.
            subscriptions::Unsubscribe::Unknown if withdrawing => Ok(serde_json::json!({})),
            subscriptions::Unsubscribe::Unknown => self
                .call_routed(method, params, events, owner, share)
                .await
                .answer(),
        }
    }

    /// Lets go of the subscriptions that sessions of a departed node held
    /// (`crate::call::Departed`). What no one else holds is unsubscribed on its process, in
    /// the pool's subscription turn, all URIs at once.
    pub async fn let_go_of(self: &Arc<Self>, departed: crate::call::Departed) {
        let _turn = self.subscriptions.turn.lock().await;
        let subscriptions::LeftAll { released, dropped } =
            self.subscriptions.leave_all(|holder| departed.left(holder));
        if dropped == 0 {
            return;
        }
        metrics::counter!("mcpd_pool_subscription_holds_dropped_total", "server" => self.name.clone(), "reason" => departed.reason())
            .increment(dropped as u64);
        tracing::info!(server = %self.name, node = ?departed.node(), reason = departed.reason(), holds = dropped, unsubscribed = released.len(), "a departed node's subscriptions let go");
        // Side by side: the turn is held for one request timeout at most, not one per URI.
        let each = released.into_iter().map(|(uri, process)| async move {
            let w = withdraw::Withdrawal { uri, process };
            if let Err(e) = self.withdraw(&w, None, None).await {
                tracing::info!(server = %self.name, uri = %w.uri, error = %e, "a departed node's subscription was not withdrawn");
            }
        });
        futures_util::future::join_all(each).await;
    }

    fn dedicated_map(&self) -> std::sync::MutexGuard<'_, DedicatedMap> {
        self.dedicated.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether session `key` has a dedicated process started.
    fn has_dedicated(&self, key: &str) -> bool {
        self.dedicated_map()
            .get(key)
            .is_some_and(|d| d.process.get().is_some() && !d.dead())
    }

    /// Sets `mcpd_pool_dedicated_processes` to the processes started and not released.
    fn count_dedicated(&self, map: &DedicatedMap) {
        let started = map.values().filter(|d| d.process.get().is_some()).count();
        metrics::gauge!("mcpd_pool_dedicated_processes", "server" => self.name.clone())
            .set(started as f64);
    }

    /// The session's own process, started on its first call. Only that session's calls wait
    /// for the start.
    async fn dedicated_process(&self, affinity: &Affinity) -> Result<Arc<dyn Upstream>, CallError> {
        let slot = {
            let mut map = self.dedicated_map();
            match map.get(&affinity.key) {
                Some(d) if !d.dead() => d.clone(),
                _ => {
                    if map.remove(&affinity.key).is_some() {
                        self.count_dedicated(&map);
                    }
                    if self.closed.load(Ordering::Relaxed) {
                        return Err(CallError::NotRun(format!(
                            "server {:?} was removed or changed; retry",
                            self.name
                        )));
                    }
                    if map.len() >= MAX_DEDICATED {
                        return Err(CallError::Busy(format!(
                            "server {:?} already runs {MAX_DEDICATED} dedicated processes on this node; the call did not run",
                            self.name
                        )));
                    }
                    let d = Arc::new(Dedicated {
                        process: tokio::sync::OnceCell::new(),
                        last_used: Mutex::new(Instant::now()),
                    });
                    map.insert(affinity.key.clone(), d.clone());
                    d
                }
            }
        };
        slot.touch();
        if let Some(process) = slot.process.get() {
            return Ok(process.clone());
        }
        match slot
            .process
            .get_or_try_init(|| self.start_dedicated(affinity))
            .await
        {
            Ok(process) => {
                // Counted once the process is started, not on every call of the session.
                self.count_dedicated(&self.dedicated_map());
                Ok(process.clone())
            }
            Err(e) => {
                // The next call of the session tries again.
                let mut map = self.dedicated_map();
                if map
                    .get(&affinity.key)
                    .is_some_and(|d| Arc::ptr_eq(d, &slot))
                {
                    map.remove(&affinity.key);
                }
                Err(e)
            }
        }
    }

    /// Starts a process initialised with the session's own `initialize` parameters, and
    /// restores the session's resource subscriptions on it.
    async fn start_dedicated(&self, affinity: &Affinity) -> Result<Arc<dyn Upstream>, CallError> {
        let mut init = affinity.client_init.clone();
        if !init.is_object() {
            init = serde_json::json!({});
        }
        if init.get("protocolVersion").is_none() {
            init["protocolVersion"] = serde_json::json!(mcpcp_proto::mcp::LATEST_SESSION_VERSION);
        }
        if init.get("capabilities").is_none() {
            init["capabilities"] = serde_json::json!({});
        }
        if init.get("clientInfo").is_none() {
            init["clientInfo"] =
                serde_json::json!({ "name": "mcpd", "version": env!("CARGO_PKG_VERSION") });
        }
        let process = upstream::connect(
            &self.spec.spec,
            self.pool_events.clone(),
            process::StartOptions {
                answer_spin: self.cfg.answer_spin(),
                report: None,
                node_paths: self.cfg.node_paths.clone(),
                revision: self.revision.clone(),
                max_questions: self.cfg.max_input_questions,
                listen: self.cfg.listen_timing(),
                oauth_failure_hold: self.cfg.oauth_failure_hold(),
            },
            Some(init),
        )
        .await
        .map_err(|e| {
            CallError::NotRun(format!("server {:?}: {e}; the call did not run", self.name))
        })?;
        // A session that moved here from another node keeps its subscriptions.
        for uri in &affinity.subscriptions {
            let _ = process
                .call(
                    "resources/subscribe",
                    Some(serde_json::json!({ "uri": uri })),
                    None,
                )
                .await;
        }
        tracing::info!(server = %self.name, session = %affinity.short_key(), pid = process.pid().unwrap_or(0), "dedicated process started");
        Ok(process)
    }

    /// Stops the dedicated process of a session that ended or went idle. (What it held on the
    /// shared processes it lets go of through its route, `crate::mcp::holds`.)
    pub async fn release(&self, key: &str) {
        let d = {
            let mut map = self.dedicated_map();
            let d = map.remove(key);
            self.count_dedicated(&map);
            d
        };
        // One still starting is stopped when its caller drops it.
        if let Some(process) = d.as_ref().and_then(|d| d.process.get()) {
            process
                .stop(Duration::from_millis(self.cfg.stop_grace_ms))
                .await;
        }
    }

    /// A call on the shared processes: queued for a slot, sent to a ready process; like
    /// [`Pool::call`], also saying which process it reached (a subscribe is recorded there).
    pub async fn call_routed(
        &self,
        method: &str,
        params: Option<Value>,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
        share: &Share,
    ) -> Reached {
        let started = Instant::now();
        let timeout = Duration::from_millis(self.spec.spec.timeouts.request_ms);
        if self.closed.load(Ordering::Relaxed) {
            return Reached::Nowhere(CallError::NotRun(format!(
                "server {:?} was removed or changed; retry",
                self.name
            )));
        }
        // A free slot is taken at once; otherwise the call waits in its tenant's queue until it
        // gets one, gives up, or is dropped (a cancelled call). The queue's span and the
        // upstream call's have no children: they are made under the caller's span and never
        // made current.
        let queue = tracing::info_span!(
            target: crate::telemetry::TARGET,
            parent: crate::telemetry::parent(),
            "pool.queue",
            mcp.server = %self.name,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let slot = self
            .admission
            .acquire(share, timeout, || self.queued.increment(1))
            .await;
        let _running = match slot {
            Ok(slot) => slot,
            Err(fair::Refused::Closed) => {
                crate::telemetry::failed(&queue, "closed");
                return Reached::Nowhere(CallError::NotRun(format!(
                    "server {:?} was removed or changed; retry",
                    self.name
                )));
            }
            // Busy, not broken: the callers' own overload.
            Err(refused) => {
                crate::telemetry::failed(&queue, refused.reason());
                metrics::counter!("mcpd_pool_queue_rejections_total",
                    "server" => self.name.clone(), "reason" => refused.reason())
                .increment(1);
                return Reached::Nowhere(CallError::Busy(format!(
                    "server {:?} is busy: {refused}; the call did not run, retry later",
                    self.name
                )));
            }
        };
        let remaining = timeout.saturating_sub(started.elapsed());
        let Some(process) = self.ready(remaining).await else {
            crate::telemetry::failed(&queue, "no_process");
            let states: Vec<&str> = self.states().iter().map(|s| s.as_str()).collect();
            return Reached::Nowhere(CallError::NotRun(format!(
                "server {:?} has no running process (processes: {}); the call did not run",
                self.name,
                states.join(", ")
            )));
        };
        drop(queue);
        let remaining = timeout.saturating_sub(started.elapsed());
        let outcome = self
            .upstream_call(
                &process,
                method,
                params,
                events,
                owner,
                (remaining, timeout),
            )
            .await;
        Reached::Process(process, outcome)
    }

    /// Sends a call to `process`, in a span of its own (`upstream.call`) whose context the
    /// server receives in the request's `_meta`; gives up (cancelling it upstream) after
    /// `within`, the part left of the request timeout `timeout`.
    async fn upstream_call(
        &self,
        process: &Arc<dyn Upstream>,
        method: &str,
        mut params: Option<Value>,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
        (within, timeout): (Duration, Duration),
    ) -> Result<Value, CallError> {
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            parent: crate::telemetry::parent(),
            "upstream.call",
            otel.kind = "client",
            mcp.server = %self.name,
            mcp.method.name = %method,
            network.transport = process.transport(),
            process.pid = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        if let Some(pid) = process.pid() {
            span.record("process.pid", pid);
        }
        crate::telemetry::propagate::into_meta(&mut params, &span);
        let call = process.call_owned(method, params, events, owner);
        let outcome = match tokio::time::timeout(within, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(CallError::TimedOut(format!(
                "server {:?} did not answer {method} within {timeout:?}; it was cancelled and may or may not have run",
                self.name
            ))),
        };
        if let Err(e) = &outcome {
            crate::telemetry::failed(&span, e.label());
        }
        outcome
    }

    /// Stops taking calls, lets in-flight ones finish (up to `drain`), then stops the
    /// processes.
    pub async fn shutdown(&self, drain: Duration) {
        self.closed.store(true, Ordering::Relaxed);
        self.admission.close();
        let dedicated: Vec<String> = self.dedicated_map().keys().cloned().collect();
        for key in dedicated {
            self.release(&key).await;
        }
        let _ = tokio::time::timeout(drain, self.admission.idle()).await;
        self.stop.fire();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let grace = Duration::from_millis(self.cfg.stop_grace_ms) * 3;
        if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tasks.abort_all();
        }
        metrics::gauge!("mcpd_pool_queue_depth", "server" => self.name.clone()).set(0.0);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.fire();
    }
}

/// Process slots placed so far, over every pool: where the next pool's first slot goes.
static PLACED: AtomicUsize = AtomicUsize::new(0);

/// Starts a process on `shard`'s runtime (its I/O is driven there), or on this one. Dropped
/// (the pool stops), it aborts the start too (the `JoinSet`), and whatever child it had
/// spawned is killed.
async fn start_on(
    shard: Option<&tokio::runtime::Handle>,
    spec: &ServerSpec,
    pool_events: mpsc::Sender<PoolEvent>,
    options: process::StartOptions,
) -> Result<Arc<dyn Upstream>, process::ProcessError> {
    let Some(shard) = shard else {
        return upstream::connect(spec, pool_events, options, None).await;
    };
    let spec = spec.clone();
    let mut start = JoinSet::new();
    start.spawn_on(
        async move { upstream::connect(&spec, pool_events, options, None).await },
        shard,
    );
    match start.join_next().await {
        Some(Ok(started)) => started,
        Some(Err(e)) => Err(process::ProcessError::Initialize(format!(
            "the start was abandoned: {e}"
        ))),
        None => Err(process::ProcessError::Initialize(
            "the start was never run".into(),
        )),
    }
}

/// The slot a supervisor keeps, the shard its processes run on, and what it reports.
struct Place {
    index: usize,
    shard: Option<tokio::runtime::Handle>,
    report: report::SlotReport,
    /// What the pool learned of its server's revision (every slot's starts share it).
    revision: handshake::RevisionHint,
}

/// How a server is reached, for metrics: a local process (`stdio`) or over the network
/// (`remote`: Streamable HTTP or legacy HTTP+SSE, told apart in `server status`).
fn transport_label(spec: &ServerSpec) -> &'static str {
    if spec.is_remote() {
        "remote"
    } else {
        "stdio"
    }
}

/// Keeps one process slot running.
async fn supervise(
    place: Place,
    spec: ServerSpec,
    process_tx: watch::Sender<Option<Arc<dyn Upstream>>>,
    state_tx: watch::Sender<SlotState>,
    pool_events: mpsc::Sender<PoolEvent>,
    stop: Shutdown,
    cfg: PoolConfig,
) {
    let Place {
        index,
        shard,
        report,
        revision,
    } = place;
    let server = spec.name.clone();
    let transport = transport_label(&spec);
    let set_state = |s: SlotState| {
        let old = *state_tx.borrow();
        if old != s {
            metrics::gauge!("mcpd_pool_processes", "server" => server.clone(), "transport" => transport, "state" => old.as_str()).decrement(1.0);
            metrics::gauge!("mcpd_pool_processes", "server" => server.clone(), "transport" => transport, "state" => s.as_str()).increment(1.0);
            let _ = state_tx.send(s);
        }
    };
    metrics::gauge!("mcpd_pool_processes", "server" => server.clone(), "transport" => transport, "state" => "starting")
        .increment(1.0);
    let mut recent_failures: Vec<Instant> = Vec::new();
    let mut delays = backoff();
    let health_every = Duration::from_millis(cfg.health_interval_ms);
    let health_timeout = Duration::from_millis(cfg.health_timeout_ms);
    let grace = Duration::from_millis(cfg.stop_grace_ms);
    loop {
        let started = Instant::now();
        let attempt = tokio::select! {
            r = start_on(shard.as_ref(), &spec, pool_events.clone(), process::StartOptions {
                answer_spin: cfg.answer_spin(),
                report: Some(report.clone()),
                node_paths: cfg.node_paths.clone(),
                revision: revision.clone(),
                max_questions: cfg.max_input_questions,
                listen: cfg.listen_timing(),
                oauth_failure_hold: cfg.oauth_failure_hold(),
            }) => r,
            _ = stop.clone().wait() => break,
        };
        match attempt {
            Ok(p) => {
                tracing::info!(server = %server, slot = index, pid = p.pid().unwrap_or(0), transport = p.transport(), "server process ready");
                report.started(p.pid(), p.transport(), p.init()["protocolVersion"].as_str());
                let _ = process_tx.send(Some(p.clone()));
                set_state(SlotState::Ready);
                let reason = loop {
                    tokio::select! {
                        _ = p.exited() => break "exited",
                        _ = stop.clone().wait() => {
                            let _ = process_tx.send(None);
                            p.stop(grace).await;
                            set_state(SlotState::Stopped);
                            return;
                        }
                        _ = tokio::time::sleep(health_every) => {
                            let ping = tokio::time::timeout(health_timeout, p.call("ping", None, None)).await;
                            if !matches!(ping, Ok(Ok(_))) {
                                break "did not answer ping";
                            }
                        }
                    }
                };
                let _ = process_tx.send(None);
                report.failed(format!("the process {reason}"));
                tracing::warn!(server = %server, slot = index, pid = p.pid().unwrap_or(0), reason, "server process lost; restarting");
                p.stop(grace).await;
                if started.elapsed() > Duration::from_secs(60) {
                    delays = backoff();
                }
            }
            Err(e) => {
                tracing::warn!(server = %server, slot = index, error = %e, "server process failed to start");
                report.failed(e.to_string());
            }
        }
        metrics::counter!("mcpd_pool_restarts_total", "server" => server.clone(), "transport" => transport).increment(1);
        report.restarting();
        let now = Instant::now();
        recent_failures.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        recent_failures.push(now);
        if recent_failures.len() as u32 >= cfg.crash_loop_restarts {
            if *state_tx.borrow() != SlotState::CrashLoop {
                tracing::error!(server = %server, slot = index, restarts = recent_failures.len(), "server is crash-looping");
            }
            set_state(SlotState::CrashLoop);
        } else {
            set_state(SlotState::Restarting);
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.clone().wait() => break,
        }
    }
    set_state(SlotState::Stopped);
}

/// Stops dedicated processes whose session has been idle longer than the server's `idle_ms`.
async fn reap_dedicated(pool: std::sync::Weak<Pool>, stop: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.clone().wait() => return,
        }
        let Some(pool) = pool.upgrade() else { return };
        let idle = Duration::from_millis(pool.spec.spec.timeouts.idle_ms);
        let expired: Vec<String> = pool
            .dedicated_map()
            .iter()
            .filter(|(_, d)| d.idle_for() > idle || d.dead())
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            tracing::info!(server = %pool.name, session = %crate::call::affinity::short(&key), "reaping an idle dedicated process");
            pool.release(&key).await;
        }
    }
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Refreshes the catalogue when a process becomes ready and when the server says a list
/// changed; relays the server's other notifications to the pool's subscribers. For a server
/// with fallbacks, announces its lists when its last process goes and, once the new one's
/// catalogue is read, when one is back ([`Pool::serving`], [`Pool::handover`]).
async fn watch_catalogue(
    pool: std::sync::Weak<Pool>,
    mut rx: mpsc::Receiver<PoolEvent>,
    stop: Shutdown,
) {
    let mut ready_rx = match pool.upgrade() {
        Some(p) => p
            .slots
            .iter()
            .map(|s| s.process.clone())
            .collect::<Vec<_>>(),
        None => return,
    };
    let mut loaded = false;
    let mut known = false;
    // The server's own list changes, sent on once the catalogue has been read again: a
    // client that lists when told must get the new lists.
    let mut held: Vec<Message> = Vec::new();
    // Whether a process was ready when last looked (for a server with fallbacks), from the
    // first catalogue on.
    let mut serving = false;
    // Back after a handover to the fallback, its catalogue not read again yet.
    let mut back = false;
    let has_fallbacks = pool
        .upgrade()
        .is_some_and(|p| !p.spec.spec.fallbacks.is_empty());
    loop {
        if !loaded {
            if let Some(p) = pool.upgrade() {
                if let Some(proc_) = p.ready(Duration::ZERO).await {
                    let cat = catalogue::load(proc_.as_ref(), &p.name).await;
                    // Read from a process that died meanwhile: not its catalogue (the next
                    // one's is read when it is ready).
                    if proc_.is_alive() {
                        let offered = cat.lists_offered();
                        p.catalogue.send_replace(Arc::new(cat));
                        loaded = true;
                        if !known || back {
                            // A list answered while the server was still starting went
                            // without it (`crate::route`'s list wait), and one answered while
                            // it was down went to its fallback: its clients hear that it is
                            // here, with what it offers now.
                            known = true;
                            serving = true;
                            back = false;
                            for list in offered {
                                hold(&mut held, catalogue::list_changed(list));
                            }
                        }
                    }
                    for message in held.drain(..) {
                        p.announce(message);
                    }
                }
            }
        }
        let follow = !ready_rx.is_empty() && (!loaded || (known && has_fallbacks));
        // Polled only when `follow` (`select_all` of no receiver would panic).
        let ready_change = async {
            let changes = ready_rx.iter_mut().map(|r| Box::pin(r.changed()));
            let (changed, slot, _) = futures_util::future::select_all(changes).await;
            changed.map_err(|_| slot)
        };
        // A slot whose supervisor is gone (the pool is stopping), no longer followed: its
        // watch would say so at once, each time.
        let mut gone = None;
        tokio::select! {
            // First: a pool that stops also loses its processes, which is no handover.
            biased;
            _ = stop.clone().wait() => return,
            changed = ready_change, if follow => match changed {
                Err(slot) => gone = Some(slot),
                Ok(()) => {
                    let Some(p) = pool.upgrade() else { return };
                    if known && has_fallbacks && p.serving() != serving {
                        serving = !serving;
                        let lists = p.handover(serving);
                        if serving {
                            // Back: a new process, whose catalogue is read before its
                            // clients are told to list.
                            loaded = false;
                            back = true;
                            for list in lists {
                                hold(&mut held, catalogue::list_changed(list));
                            }
                        } else {
                            for list in lists {
                                p.announce(catalogue::list_changed(list));
                            }
                        }
                    }
                }
            },
            ev = rx.recv() => {
                let Some(PoolEvent::Notify(msg)) = ev else { return };
                let Some(p) = pool.upgrade() else { return };
                if msg.method().is_some_and(|m| m.ends_with("/list_changed")) {
                    loaded = false;
                    hold(&mut held, msg);
                } else {
                    p.announce(msg);
                }
            }
        }
        if let Some(slot) = gone {
            ready_rx.swap_remove(slot);
        }
    }
}

/// Keeps a list change to send once the catalogue has been read again (one per list).
fn hold(held: &mut Vec<Message>, change: Message) {
    if !held.iter().any(|m| m.method() == change.method()) {
        held.push(change);
    }
}

/// Where a call on the shared processes got to.
pub enum Reached {
    /// To no process: it did not run.
    Nowhere(CallError),
    /// To this process, with this outcome.
    Process(Arc<dyn Upstream>, Result<Value, CallError>),
}

impl Reached {
    /// The call's outcome, wherever it got.
    pub fn answer(self) -> Result<Value, CallError> {
        match self {
            Reached::Nowhere(e) => Err(e),
            Reached::Process(_, outcome) => outcome,
        }
    }
}

/// A `resources/subscribe` or `resources/unsubscribe` on a pool's shared processes.
struct Subscription<'a> {
    method: &'a str,
    uri: String,
    /// The holder (a session on a node; `None`: a listen stream).
    owner: Option<Arc<str>>,
    /// The node letting go for a session (`HoldOp::Withdraw`), not its client.
    withdrawing: bool,
}

/// The URI of a `resources/subscribe` or `resources/unsubscribe`.
fn subscription_uri(method: &str, params: Option<&Value>) -> Option<String> {
    match method {
        "resources/subscribe" | "resources/unsubscribe" => {
            params?.get("uri")?.as_str().map(String::from)
        }
        _ => None,
    }
}
