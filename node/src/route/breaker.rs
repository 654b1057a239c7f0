//! Circuit breakers, one per (server, node): the route layer asks a server's breaker on a node
//! before it sends a call there, and tells it how the call went. When a node's copy of a server
//! keeps failing, its breaker *opens* and calls go to other nodes (or fail fast) instead of
//! piling onto it; after a pause a few *probe* calls test it, and enough of them succeeding
//! *closes* it again.
//!
//! ```text
//!          failure rate ≥ failure_rate over window_ms (once it holds min_calls calls),
//!          or consecutive_failures failures in a row
//!  Closed ──────────────────────────────────────────────▶ Open  (open_base_ms · 2^failed_rounds,
//!    ▲                                                     │      at most open_max_ms)
//!    │ successes_to_close probes succeed                   │ open time elapsed
//!    │                                                     ▼
//!    └─────────────────────────────────────────────── HalfOpen  (≤ probes calls at once)
//!                      any probe fails: Open again, for twice as long ──▶ Open
//! ```
//!
//! ```ignore
//! let breaker = breakers.get(&server, node);
//! let permit = breaker.try_acquire(Instant::now())?; // Rejected: try another node, or 503
//! let result = call(node, request).await;
//! permit.record(if result.is_ok() { Outcome::Success } else { Outcome::Failure }, Instant::now());
//! ```
//!
//! What counts as a failure is the caller's decision. Transport errors, timeouts and crashed
//! processes say something about the node; an error every node would give alike (a malformed
//! request, a tool refusing bad arguments) does not, and counted as a failure it would open
//! the server's breakers on every node at once. A permit dropped without a record (the client
//! went away, the retry budget said no) counts as neither.
//!
//! Time is an argument (`now`), so the tests drive it without sleeping. A breaker is plain
//! state behind a mutex that is held for a few arithmetic steps and never across an `.await`.
//! Open turns into half-open lazily, on the next `try_acquire`, `state` or `status`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::invalid::{invalid, InvalidConfig};
use super::window::Window;

/// Gauge `mcpd_breaker_state{server,node}`: 0 closed, 1 half-open, 2 open.
pub const STATE_GAUGE: &str = "mcpd_breaker_state";
/// Counter `mcpd_breaker_transitions_total{server,node,to}`.
pub const TRANSITIONS_TOTAL: &str = "mcpd_breaker_transitions_total";

/// When a breaker opens and how it recovers. Every field has a default.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Length of the rolling window the failure rate is measured over.
    pub window_ms: u64,
    /// Calls the window must hold before its failure rate can open the breaker, so that one
    /// failure out of two calls on a quiet server does not.
    pub min_calls: u32,
    /// Fraction of failed calls in the window (0 < rate ≤ 1) at or above which it opens.
    pub failure_rate: f64,
    /// Failures in a row that open it whatever the window holds.
    pub consecutive_failures: u32,
    /// How long it stays open the first time.
    pub open_base_ms: u64,
    /// Bound on the open time, which doubles with every failed probe round.
    pub open_max_ms: u64,
    /// Probe calls let through at the same time while half-open.
    pub probes: u32,
    /// Successful probes that close it.
    pub successes_to_close: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window_ms: 10_000,
            min_calls: 10,
            failure_rate: 0.5,
            consecutive_failures: 5,
            open_base_ms: 1_000,
            open_max_ms: 60_000,
            probes: 3,
            successes_to_close: 3,
        }
    }
}

impl BreakerConfig {
    /// Checks the settings once, at load.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.window_ms == 0 {
            return invalid("window_ms", "must be greater than 0");
        }
        if self.min_calls == 0 {
            return invalid("min_calls", "must be greater than 0");
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return invalid("failure_rate", "must be greater than 0 and at most 1");
        }
        if self.consecutive_failures == 0 {
            return invalid("consecutive_failures", "must be greater than 0");
        }
        if self.open_base_ms == 0 {
            return invalid("open_base_ms", "must be greater than 0");
        }
        if self.open_max_ms < self.open_base_ms {
            return invalid("open_max_ms", "must be at least open_base_ms");
        }
        if self.probes == 0 {
            return invalid("probes", "must be greater than 0");
        }
        if self.successes_to_close == 0 {
            return invalid("successes_to_close", "must be greater than 0");
        }
        Ok(())
    }

    /// Open time after `failed_rounds` failed probe rounds: base · 2^rounds, capped.
    fn open_time(&self, failed_rounds: u32) -> Duration {
        let factor = 1u64.checked_shl(failed_rounds).unwrap_or(u64::MAX);
        Duration::from_millis(
            self.open_base_ms
                .saturating_mul(factor)
                .min(self.open_max_ms),
        )
    }
}

/// Where a breaker is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow; outcomes are counted.
    Closed,
    /// A few probe calls test whether the node recovered.
    HalfOpen,
    /// Calls are refused until the open time has passed.
    Open,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// The value of [`STATE_GAUGE`].
    pub fn as_gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// How a call let through by a [`Permit`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// Why a breaker refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Open: no call goes through before `retry_after` has passed.
    #[error("circuit open for another {retry_after:?}")]
    Open { retry_after: Duration },
    /// Half-open with every probe slot taken; there is no time to promise, a probe may end
    /// at any moment.
    #[error("circuit half-open with all {limit} probes in flight")]
    ProbesBusy { limit: u32 },
}

impl Rejected {
    /// When calling again can succeed, if the breaker knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Rejected::Open { retry_after } => Some(*retry_after),
            Rejected::ProbesBusy { .. } => None,
        }
    }
}

/// A breaker's counters, for `mcpctl server status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerStatus {
    pub server: String,
    pub node: u64,
    pub state: BreakerState,
    /// Calls in the rolling window (while open: the ones that opened it, ageing out).
    pub calls: u64,
    /// Failed calls in the rolling window.
    pub failures: u64,
    pub consecutive_failures: u32,
    /// Failed probe rounds since it last closed; the open time doubles with each.
    pub failed_rounds: u32,
    /// While open: how long until it lets probes through.
    pub retry_after_ms: Option<u64>,
}

/// Leave to send one call. Report how it went with [`Permit::record`]; dropping the permit
/// instead counts as neither success nor failure and frees its probe slot.
#[must_use = "record the call's outcome on the permit; dropping it counts as neither"]
#[derive(Debug)]
pub struct Permit {
    /// `None` once recorded, so `Drop` knows there is nothing left to release.
    shared: Option<Arc<Shared>>,
    /// The breaker's generation when the permit was given; outcomes from an older generation
    /// (the breaker changed state while the call ran) are ignored.
    generation: u64,
    probe: bool,
}

/// The breaker of one server on one node. Cheap to clone: clones share the state.
#[derive(Debug, Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    server: String,
    node: u64,
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Bumped on every transition; see [`Permit::generation`].
    generation: u64,
    window: Window,
    consecutive_failures: u32,
    failed_rounds: u32,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { since: Instant, open_for: Duration },
    HalfOpen { in_flight: u32, successes: u32 },
}

impl State {
    fn kind(self) -> BreakerState {
        match self {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

// === impl Breaker ===

impl Breaker {
    /// A closed breaker for `server` on `node`; the names label its metrics and logs.
    pub fn new(server: impl Into<String>, node: u64, cfg: BreakerConfig) -> Breaker {
        let shared = Shared {
            server: server.into(),
            node,
            cfg,
            inner: Mutex::new(Inner {
                state: State::Closed,
                generation: 0,
                window: Window::new(Duration::from_millis(cfg.window_ms)),
                consecutive_failures: 0,
                failed_rounds: 0,
            }),
        };
        shared.set_gauge(BreakerState::Closed);
        Breaker {
            shared: Arc::new(shared),
        }
    }

    /// Asks to send one call at `now`.
    pub fn try_acquire(&self, now: Instant) -> Result<Permit, Rejected> {
        let shared = &self.shared;
        let mut inner = shared.lock();
        shared.advance(&mut inner, now);
        let probe = match &mut inner.state {
            State::Closed => false,
            State::Open { since, open_for } => {
                return Err(Rejected::Open {
                    retry_after: open_for.saturating_sub(now.saturating_duration_since(*since)),
                })
            }
            State::HalfOpen { in_flight, .. } => {
                // A zero in the config would wedge the breaker half-open; let one through.
                let limit = shared.cfg.probes.max(1);
                if *in_flight >= limit {
                    return Err(Rejected::ProbesBusy { limit });
                }
                *in_flight += 1;
                true
            }
        };
        Ok(Permit {
            shared: Some(Arc::clone(shared)),
            generation: inner.generation,
            probe,
        })
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        let mut inner = self.shared.lock();
        self.shared.advance(&mut inner, now);
        inner.state.kind()
    }

    /// The counters at `now`.
    pub fn status(&self, now: Instant) -> BreakerStatus {
        let shared = &self.shared;
        let mut inner = shared.lock();
        shared.advance(&mut inner, now);
        let (calls, failures) = inner.window.counts(now);
        let retry_after_ms = match inner.state {
            State::Open { since, open_for } => Some(millis(
                open_for.saturating_sub(now.saturating_duration_since(since)),
            )),
            State::Closed | State::HalfOpen { .. } => None,
        };
        BreakerStatus {
            server: shared.server.clone(),
            node: shared.node,
            state: inner.state.kind(),
            calls,
            failures,
            consecutive_failures: inner.consecutive_failures,
            failed_rounds: inner.failed_rounds,
            retry_after_ms,
        }
    }
}

// === impl Permit ===

impl Permit {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports the call's outcome at `now`.
    pub fn record(mut self, outcome: Outcome, now: Instant) {
        if let Some(shared) = self.shared.take() {
            shared.record(self.generation, self.probe, outcome, now);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.release(self.generation, self.probe);
        }
    }
}

// === impl Shared ===

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The lock guards arithmetic only; state left by a panicking holder is still coherent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies the one transition that time alone causes: open → half-open.
    fn advance(&self, inner: &mut Inner, now: Instant) {
        if let State::Open { since, open_for } = inner.state {
            if now.saturating_duration_since(since) >= open_for {
                let to = State::HalfOpen {
                    in_flight: 0,
                    successes: 0,
                };
                self.transition(inner, to, "open time elapsed");
            }
        }
    }

    fn record(&self, generation: u64, probe: bool, outcome: Outcome, now: Instant) {
        let mut inner = self.lock();
        if inner.generation != generation {
            // The call started before the last transition: it says nothing about this state.
            return;
        }
        match (inner.state, outcome) {
            (State::Closed, Outcome::Success) => {
                inner.consecutive_failures = 0;
                inner.window.add(now, 1, 0);
            }
            (State::Closed, Outcome::Failure) => {
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                inner.window.add(now, 1, 1);
                let (calls, failures) = inner.window.counts(now);
                if inner.consecutive_failures >= self.cfg.consecutive_failures {
                    self.open(&mut inner, now, "consecutive failures");
                } else if calls >= u64::from(self.cfg.min_calls)
                    && failures as f64 >= self.cfg.failure_rate * calls as f64
                {
                    self.open(&mut inner, now, "failure rate");
                }
            }
            (
                State::HalfOpen {
                    in_flight,
                    successes,
                },
                Outcome::Success,
            ) if probe => {
                let successes = successes.saturating_add(1);
                if successes >= self.cfg.successes_to_close {
                    inner.failed_rounds = 0;
                    inner.consecutive_failures = 0;
                    inner.window.clear();
                    self.transition(&mut inner, State::Closed, "probes succeeded");
                } else {
                    inner.state = State::HalfOpen {
                        in_flight: in_flight.saturating_sub(1),
                        successes,
                    };
                }
            }
            (State::HalfOpen { .. }, Outcome::Failure) if probe => {
                inner.failed_rounds = inner.failed_rounds.saturating_add(1);
                self.open(&mut inner, now, "probe failed");
            }
            // Open refuses every call, so a permit of this generation cannot exist; and a
            // non-probe permit cannot be of a half-open generation.
            (State::Open { .. } | State::HalfOpen { .. }, _) => {}
        }
    }

    /// A permit dropped without an outcome gives its probe slot back.
    fn release(&self, generation: u64, probe: bool) {
        if !probe {
            return;
        }
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if let State::HalfOpen { in_flight, .. } = &mut inner.state {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant, reason: &'static str) {
        let open_for = self.cfg.open_time(inner.failed_rounds);
        self.transition(
            inner,
            State::Open {
                since: now,
                open_for,
            },
            reason,
        );
    }

    fn transition(&self, inner: &mut Inner, to: State, reason: &'static str) {
        let from = inner.state.kind();
        inner.state = to;
        inner.generation += 1;
        let to_kind = to.kind();
        self.set_gauge(to_kind);
        metrics::counter!(
            TRANSITIONS_TOTAL,
            "server" => self.server.clone(),
            "node" => self.node.to_string(),
            "to" => to_kind.as_str()
        )
        .increment(1);
        match to {
            State::Open { open_for, .. } => tracing::warn!(
                server = %self.server,
                node = self.node,
                from = from.as_str(),
                reason,
                open_ms = millis(open_for),
                "circuit breaker opened"
            ),
            State::Closed | State::HalfOpen { .. } => tracing::info!(
                server = %self.server,
                node = self.node,
                from = from.as_str(),
                to = to_kind.as_str(),
                reason,
                "circuit breaker changed state"
            ),
        }
    }

    fn set_gauge(&self, state: BreakerState) {
        metrics::gauge!(
            STATE_GAUGE,
            "server" => self.server.clone(),
            "node" => self.node.to_string()
        )
        .set(state.as_gauge());
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// === impl Breakers ===

/// The breakers of every (server, node) this node routes to, created on first use.
#[derive(Debug)]
pub struct Breakers {
    cfg: BreakerConfig,
    by_server: RwLock<HashMap<String, HashMap<u64, Breaker>>>,
}

impl Breakers {
    pub fn new(cfg: BreakerConfig) -> Breakers {
        Breakers {
            cfg,
            by_server: RwLock::new(HashMap::new()),
        }
    }

    /// The breaker of `server` on `node`, closed if it is new.
    pub fn get(&self, server: &str, node: u64) -> Breaker {
        {
            let map = self.by_server.read().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = map.get(server).and_then(|nodes| nodes.get(&node)) {
                return b.clone();
            }
        }
        let mut map = self.by_server.write().unwrap_or_else(|p| p.into_inner());
        map.entry(server.to_owned())
            .or_default()
            .entry(node)
            .or_insert_with(|| Breaker::new(server, node, self.cfg))
            .clone()
    }

    /// Every breaker's counters at `now`, sorted by server then node.
    pub fn snapshot(&self, now: Instant) -> Vec<BreakerStatus> {
        let breakers: Vec<Breaker> = {
            let map = self.by_server.read().unwrap_or_else(|p| p.into_inner());
            map.values().flat_map(|n| n.values().cloned()).collect()
        };
        let mut out: Vec<BreakerStatus> = breakers.iter().map(|b| b.status(now)).collect();
        out.sort_by(|a, b| (&a.server, a.node).cmp(&(&b.server, b.node)));
        out
    }

    /// Forgets a removed server's breakers. Their gauges are set to closed (0): the metrics
    /// crate cannot delete a series, and a removed server's last "open" would alert forever.
    pub fn remove_server(&self, server: &str) {
        let removed = {
            let mut map = self.by_server.write().unwrap_or_else(|p| p.into_inner());
            map.remove(server)
        };
        for breaker in removed.into_iter().flat_map(|nodes| nodes.into_values()) {
            breaker.shared.set_gauge(BreakerState::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde::de::value::{Error as ValueError, MapDeserializer};

    use Outcome::{Failure as F, Success as S};

    fn breaker() -> Breaker {
        Breaker::new("fs", 1, BreakerConfig::default())
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// One call admitted at `now` with `outcome`.
    fn call(b: &Breaker, outcome: Outcome, now: Instant) {
        b.try_acquire(now)
            .expect("call admitted")
            .record(outcome, now);
    }

    fn calls(b: &Breaker, outcomes: &[Outcome], now: Instant) {
        for &o in outcomes {
            call(b, o, now);
        }
    }

    /// Opens a closed breaker with consecutive failures at `now`.
    fn trip(b: &Breaker, now: Instant) {
        calls(b, &[F; 5], now);
        assert_eq!(b.state(now), BreakerState::Open);
    }

    fn open_for(b: &Breaker, now: Instant) -> Duration {
        match b.try_acquire(now) {
            Err(Rejected::Open { retry_after }) => retry_after,
            other => panic!("expected open, got {other:?}"),
        }
    }

    #[test]
    fn stays_closed_below_thresholds() {
        let b = breaker();
        let t0 = Instant::now();
        // 40% failures, never more than 2 in a row, over 50 calls.
        for _ in 0..10 {
            calls(&b, &[F, S, F, S, S], t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        let st = b.status(t0);
        assert_eq!((st.calls, st.failures), (50, 20));
        // Four failures in a row stay under the consecutive threshold of five.
        calls(&b, &[F, F, F, F], t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
    }

    #[test]
    fn opens_on_failure_rate_only_after_min_calls() {
        let b = breaker();
        let t0 = Instant::now();
        // 67% failures over 9 calls: below min_calls (10), so no opinion yet.
        for _ in 0..3 {
            calls(&b, &[F, F, S], t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        call(&b, F, t0);
        assert_eq!(b.state(t0), BreakerState::Open);
    }

    #[test]
    fn exactly_the_failure_rate_opens() {
        let b = breaker();
        let t0 = Instant::now();
        for _ in 0..4 {
            calls(&b, &[S, F], t0);
        }
        call(&b, S, t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        call(&b, F, t0); // 5 of 10
        assert_eq!(b.state(t0), BreakerState::Open);
    }

    #[test]
    fn opens_on_consecutive_failures() {
        let b = breaker();
        let t0 = Instant::now();
        calls(&b, &[S; 20], t0);
        calls(&b, &[F; 4], t0);
        assert_eq!(
            b.state(t0),
            BreakerState::Closed,
            "4 of 24 is below the rate"
        );
        call(&b, F, t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.status(t0).consecutive_failures, 5);
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let b = breaker();
        let t0 = Instant::now();
        calls(&b, &[S; 20], t0);
        calls(&b, &[F, F, F, F, S, F, F, F, F], t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert_eq!(b.status(t0).consecutive_failures, 4);
    }

    #[test]
    fn old_failures_roll_out_of_the_window() {
        let t0 = Instant::now();
        let first = [F, F, F, F, S];
        let second = [S, F, F, F, F];

        // Inside the window the two batches add up: 8 of 10 failed.
        let b = breaker();
        calls(&b, &first, t0);
        calls(&b, &second, t0 + secs(9.5));
        assert_eq!(b.state(t0 + secs(9.5)), BreakerState::Open);

        // A window later the first batch is forgotten: 4 of 5, below min_calls.
        let b = breaker();
        calls(&b, &first, t0);
        calls(&b, &second, t0 + secs(11.0));
        assert_eq!(b.state(t0 + secs(11.0)), BreakerState::Closed);
        let st = b.status(t0 + secs(11.0));
        assert_eq!((st.calls, st.failures), (5, 4));
        assert_eq!(b.status(t0 + secs(30.0)).calls, 0);
    }

    #[test]
    fn open_refuses_until_the_open_time_then_goes_half_open() {
        let b = breaker();
        let t0 = Instant::now();
        trip(&b, t0);
        assert_eq!(open_for(&b, t0), secs(1.0));
        assert_eq!(open_for(&b, t0 + secs(0.4)), secs(0.6));
        assert_eq!(b.status(t0 + secs(0.4)).retry_after_ms, Some(600));
        assert_eq!(
            Rejected::Open {
                retry_after: secs(0.6)
            }
            .retry_after(),
            Some(secs(0.6))
        );

        assert_eq!(b.state(t0 + secs(1.0)), BreakerState::HalfOpen);
        let permit = b.try_acquire(t0 + secs(1.0)).expect("probe admitted");
        assert!(permit.is_probe());
        assert_eq!(b.status(t0 + secs(1.0)).retry_after_ms, None);
    }

    #[test]
    fn half_open_limits_concurrent_probes() {
        let b = breaker();
        let t0 = Instant::now();
        trip(&b, t0);
        let t1 = t0 + secs(1.0);
        let probes: Vec<Permit> = (0..3)
            .map(|_| b.try_acquire(t1).expect("probe admitted"))
            .collect();
        let refused = b.try_acquire(t1).expect_err("fourth probe refused");
        assert_eq!(refused, Rejected::ProbesBusy { limit: 3 });
        assert_eq!(refused.retry_after(), None);

        // A finished probe frees its slot.
        let mut probes = probes.into_iter();
        probes.next().expect("three probes").record(S, t1);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        let _fourth = b.try_acquire(t1).expect("slot freed by a recorded probe");
        assert!(b.try_acquire(t1).is_err());
    }

    #[test]
    fn dropped_probe_permits_free_their_slots_and_count_as_neither() {
        let b = breaker();
        let t0 = Instant::now();
        trip(&b, t0);
        let t1 = t0 + secs(1.0);
        for _ in 0..10 {
            let probes: Vec<Permit> = (0..3)
                .map(|_| b.try_acquire(t1).expect("probe admitted"))
                .collect();
            assert!(b.try_acquire(t1).is_err());
            drop(probes);
        }
        // Thirty dropped probes neither closed nor reopened it.
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        // And did not count towards closing: it still takes three successes.
        calls(&b, &[S, S], t1);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        call(&b, S, t1);
        assert_eq!(b.state(t1), BreakerState::Closed);
    }

    #[test]
    fn enough_successful_probes_close_it() {
        let b = breaker();
        let t0 = Instant::now();
        trip(&b, t0);
        let t1 = t0 + secs(1.0);
        let probes: Vec<Permit> = (0..3)
            .map(|_| b.try_acquire(t1).expect("probe admitted"))
            .collect();
        for p in probes {
            assert_eq!(b.state(t1), BreakerState::HalfOpen);
            p.record(S, t1);
        }
        assert_eq!(b.state(t1), BreakerState::Closed);
        let st = b.status(t1);
        assert_eq!((st.calls, st.failures, st.consecutive_failures), (0, 0, 0));
        // Closed again: calls flow and are not probes.
        let p = b.try_acquire(t1).expect("closed admits");
        assert!(!p.is_probe());
        p.record(S, t1);
    }

    #[test]
    fn a_failed_probe_reopens_it_for_twice_as_long() {
        let b = breaker();
        let t0 = Instant::now();
        trip(&b, t0);
        let t1 = t0 + secs(1.0);
        let other = b.try_acquire(t1).expect("probe admitted");
        call(&b, S, t1);
        call(&b, F, t1);
        assert_eq!(b.state(t1), BreakerState::Open);
        assert_eq!(open_for(&b, t1), secs(2.0));
        assert_eq!(b.status(t1).failed_rounds, 1);
        // The other probe of that round ends after the reopening: it changes nothing.
        other.record(S, t1);
        assert_eq!(open_for(&b, t1 + secs(1.999)), secs(0.001));

        let t2 = t1 + secs(2.0);
        call(&b, F, t2);
        assert_eq!(open_for(&b, t2), secs(4.0));
    }

    #[test]
    fn the_open_time_is_capped() {
        let b = breaker();
        let mut now = Instant::now();
        trip(&b, now);
        let mut seen = vec![open_for(&b, now)];
        for _ in 0..8 {
            now += *seen.last().expect("one open time");
            call(&b, F, now);
            seen.push(open_for(&b, now));
        }
        let expected: Vec<Duration> = [1, 2, 4, 8, 16, 32, 60, 60, 60]
            .into_iter()
            .map(Duration::from_secs)
            .collect();
        assert_eq!(seen, expected);
        // Far more rounds than fit in a u64 shift still saturate at the cap.
        assert_eq!(
            BreakerConfig::default().open_time(u32::MAX),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn the_open_time_resets_after_closing() {
        let b = breaker();
        let mut now = Instant::now();
        trip(&b, now);
        for _ in 0..3 {
            now += open_for(&b, now);
            call(&b, F, now);
        }
        assert_eq!(open_for(&b, now), secs(8.0));
        now += secs(8.0);
        calls(&b, &[S, S, S], now);
        assert_eq!(b.state(now), BreakerState::Closed);
        assert_eq!(b.status(now).failed_rounds, 0);
        trip(&b, now);
        assert_eq!(open_for(&b, now), secs(1.0));
    }

    #[test]
    fn outcomes_of_calls_from_before_a_transition_are_ignored() {
        let b = breaker();
        let t0 = Instant::now();
        let late_failure = b.try_acquire(t0).expect("closed admits");
        let late_success = b.try_acquire(t0).expect("closed admits");
        trip(&b, t0);
        // A failure from the closed era neither extends nor re-opens.
        late_failure.record(F, t0 + secs(0.5));
        assert_eq!(open_for(&b, t0 + secs(0.5)), secs(0.5));

        // A success from the closed era is not a probe's success.
        let t1 = t0 + secs(1.0);
        calls(&b, &[S, S], t1);
        late_success.record(S, t1);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        call(&b, S, t1);
        assert_eq!(b.state(t1), BreakerState::Closed);
    }

    #[test]
    fn a_late_clock_reading_counts_in_the_newest_bucket() {
        let b = breaker();
        let t0 = Instant::now();
        call(&b, S, t0 + secs(20.0));
        // Read before the call above but recorded after it: still counted.
        call(&b, F, t0);
        let st = b.status(t0 + secs(20.0));
        assert_eq!((st.calls, st.failures), (2, 1));
    }

    #[test]
    fn breakers_are_created_once_listed_and_removed() {
        let breakers = Breakers::new(BreakerConfig::default());
        let t0 = Instant::now();
        trip(&breakers.get("fs", 2), t0);
        assert_eq!(breakers.get("fs", 2).state(t0), BreakerState::Open);
        breakers.get("git", 1);
        breakers.get("fs", 1);

        let listed: Vec<(String, u64, BreakerState)> = breakers
            .snapshot(t0)
            .into_iter()
            .map(|s| (s.server, s.node, s.state))
            .collect();
        assert_eq!(
            listed,
            [
                ("fs".to_owned(), 1, BreakerState::Closed),
                ("fs".to_owned(), 2, BreakerState::Open),
                ("git".to_owned(), 1, BreakerState::Closed),
            ]
        );
        let fs2 = &breakers.snapshot(t0)[1];
        assert_eq!(
            (fs2.calls, fs2.failures, fs2.retry_after_ms),
            (5, 5, Some(1000))
        );

        breakers.remove_server("fs");
        assert_eq!(breakers.snapshot(t0).len(), 1);
        assert_eq!(breakers.get("fs", 2).state(t0), BreakerState::Closed);
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Breaker>();
        check::<Breakers>();
        check::<Permit>();
    }

    #[test]
    fn transitions_update_the_metrics() {
        let recorder = capture::Capture::default();
        metrics::with_local_recorder(&recorder, || {
            let b = Breaker::new("fs", 7, BreakerConfig::default());
            let t0 = Instant::now();
            trip(&b, t0);
            b.state(t0 + secs(1.0));
            calls(&b, &[S, S, S], t0 + secs(1.0));
        });
        let gauge = "mcpd_breaker_state{server=fs,node=7}";
        let to =
            |s: &str| format!("mcpd_breaker_transitions_total{{server=fs,node=7,to={s}}} += 1");
        assert_eq!(
            recorder.events(),
            [
                format!("{gauge} = 0"),
                format!("{gauge} = 2"),
                to("open"),
                format!("{gauge} = 1"),
                to("half_open"),
                format!("{gauge} = 0"),
                to("closed"),
            ]
        );
    }

    #[test]
    fn config_has_defaults_and_refuses_unknown_fields() {
        let parse = |pairs: Vec<(&'static str, u32)>| {
            BreakerConfig::deserialize(MapDeserializer::<_, ValueError>::new(pairs.into_iter()))
        };
        let cfg = parse(vec![("min_calls", 20)]).expect("parses");
        assert_eq!(
            cfg,
            BreakerConfig {
                min_calls: 20,
                ..BreakerConfig::default()
            }
        );
        assert_eq!(cfg.validate(), Ok(()));
        let err = parse(vec![("min_call", 20)]).expect_err("unknown field");
        assert!(err.to_string().contains("min_call"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let check = |change: fn(&mut BreakerConfig)| {
            let mut cfg = BreakerConfig::default();
            change(&mut cfg);
            cfg.validate().map_err(|e| e.field)
        };
        assert_eq!(check(|c| c.window_ms = 0), Err("window_ms"));
        assert_eq!(check(|c| c.min_calls = 0), Err("min_calls"));
        assert_eq!(check(|c| c.failure_rate = 1.5), Err("failure_rate"));
        assert_eq!(check(|c| c.failure_rate = f64::NAN), Err("failure_rate"));
        assert_eq!(
            check(|c| c.consecutive_failures = 0),
            Err("consecutive_failures")
        );
        assert_eq!(check(|c| c.open_max_ms = 10), Err("open_max_ms"));
        assert_eq!(check(|c| c.probes = 0), Err("probes"));
        assert_eq!(
            check(|c| c.successes_to_close = 0),
            Err("successes_to_close")
        );
        assert_eq!(check(|_| {}), Ok(()));
    }

    #[test]
    fn states_have_names_and_gauge_values() {
        let all = [
            BreakerState::Closed,
            BreakerState::HalfOpen,
            BreakerState::Open,
        ];
        let names: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        let values: Vec<f64> = all.iter().map(|s| s.as_gauge()).collect();
        assert_eq!(names, ["closed", "half_open", "open"]);
        assert_eq!(values, [0.0, 1.0, 2.0]);
    }

    /// A recorder that writes down every gauge set and counter increment, in order.
    mod capture {
        use std::sync::{Arc, Mutex};

        use metrics::{
            Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder,
            SharedString, Unit,
        };

        #[derive(Default)]
        pub struct Capture(Arc<Mutex<Vec<String>>>);

        impl Capture {
            pub fn events(&self) -> Vec<String> {
                self.0.lock().expect("not poisoned").clone()
            }

            fn handle(&self, key: &Key) -> Arc<Handle> {
                let labels: Vec<String> = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                Arc::new(Handle {
                    key: format!("{}{{{}}}", key.name(), labels.join(",")),
                    events: Arc::clone(&self.0),
                })
            }
        }

        struct Handle {
            key: String,
            events: Arc<Mutex<Vec<String>>>,
        }

        impl Handle {
            fn push(&self, what: String) {
                let event = format!("{} {what}", self.key);
                self.events.lock().expect("not poisoned").push(event);
            }
        }

        impl CounterFn for Handle {
            fn increment(&self, value: u64) {
                self.push(format!("+= {value}"));
            }
            fn absolute(&self, value: u64) {
                self.push(format!(":= {value}"));
            }
        }

        impl GaugeFn for Handle {
            fn increment(&self, value: f64) {
                self.push(format!("+= {value}"));
            }
            fn decrement(&self, value: f64) {
                self.push(format!("-= {value}"));
            }
            fn set(&self, value: f64) {
                self.push(format!("= {value}"));
            }
        }

        impl Recorder for Capture {
            fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
                Counter::from_arc(self.handle(key))
            }
            fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
                Gauge::from_arc(self.handle(key))
            }
            fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
                Histogram::noop()
            }
        }
    }
}
