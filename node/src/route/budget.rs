//! Retry budgets and retry backoff: how much a node may retry a server, and how long it waits
//! before each retry.
//!
//! Retrying a failed call is right when one node is sick and wrong when the whole server is:
//! then every call turns into several and the retries finish what the overload started. A
//! [`RetryBudget`] (as in Finagle and Envoy) lets retries add at most `ratio` extra load over
//! a sliding window, with a floor of `min_retries_per_sec` so that a quiet server, whose few
//! calls would earn almost no budget, can still retry. One budget per server, shared by all
//! of its calls on this node:
//!
//! ```ignore
//! budget.record_request(Instant::now());            // every original call, once
//! // ... the call failed in a way worth retrying ...
//! match budget.try_retry(Instant::now()) {
//!     Ok(()) => { sleep(backoff.backoff(attempt)).await; /* call another node */ }
//!     Err(_) => {
//!         metrics::counter!(EXHAUSTED_TOTAL, "server" => name).increment(1);
//!         /* return the original failure */
//!     }
//! }
//! ```
//!
//! Finagle adds the floor to what the ratio earns; here the budget is the larger of the two,
//! so under load retries stay within `ratio` exactly and the floor only matters when it is
//! quiet. The floor is measured over the window too, so a quiet server may spend it in a
//! burst (`min_retries_per_sec · window` retries at once).
//!
//! [`BackoffConfig::backoff`] spaces retries with exponential backoff and *full* jitter:
//! uniformly random in `[0, min(cap, base · 2^attempt)]`, which spreads clients' retries out
//! best (AWS Architecture Blog, "Exponential Backoff and Jitter"). It does not use `backon`:
//! its `with_jitter` adds a random part to the delay, `[d, 2d)`, rather than drawing it from
//! `[0, d]`, and without its `std` feature it seeds that randomness with a constant, so every
//! process would jitter alike. The random numbers come from a per-thread xorshift64 seeded
//! from std's `RandomState` (whose keys come from the OS) and the clock: spreading retries
//! needs no cryptographic quality and no extra dependency.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::invalid::{invalid, InvalidConfig};
use super::window::Window;

/// Counter `mcpd_retry_budget_exhausted_total{server}`: retries refused by the budget. The
/// caller, which knows the server, increments it when [`RetryBudget::try_retry`] fails.
pub const EXHAUSTED_TOTAL: &str = "mcpd_retry_budget_exhausted_total";

/// How much retrying a server's calls may add. Every field has a default.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Retries allowed per original call in the window (0.2: at most 20% extra load).
    pub ratio: f64,
    /// Length of the sliding window requests and retries are counted over.
    pub window_ms: u64,
    /// Retries per second allowed however few calls there are.
    pub min_retries_per_sec: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            window_ms: 10_000,
            min_retries_per_sec: 3,
        }
    }
}

/// How long to wait before each retry. Every field has a default (Envoy's: 25 ms, 250 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// The largest wait before the first retry; it doubles with each further one.
    pub base_ms: u64,
    /// Bound on the largest wait.
    pub cap_ms: u64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base_ms: 25,
            cap_ms: 250,
        }
    }
}

impl BudgetConfig {
    /// Checks the settings once, at load.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if !(0.0..=1.0).contains(&self.ratio) {
            return invalid("ratio", "must be between 0 and 1");
        }
        if self.window_ms == 0 {
            return invalid("window_ms", "must be greater than 0");
        }
        Ok(())
    }
}

impl BackoffConfig {
    /// Checks the settings once, at load.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.cap_ms < self.base_ms {
            return invalid("cap_ms", "must be at least base_ms");
        }
        Ok(())
    }

    /// The longest wait before retry `attempt` (0 for the first): `min(cap, base · 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u64.checked_shl(attempt).unwrap_or(u64::MAX);
        Duration::from_millis(self.base_ms.saturating_mul(factor).min(self.cap_ms))
    }

    /// The wait before retry `attempt` (0 for the first): uniformly random in
    /// `[0, ceiling(attempt)]`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        full_jitter(self.ceiling(attempt), random_u64())
    }
}

/// Maps a uniformly random `u64` onto `[0, ceiling]`, to the nanosecond.
fn full_jitter(ceiling: Duration, random: u64) -> Duration {
    let span = u128::from(u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX)) + 1;
    // Multiply-shift instead of `%`: no bias worth the name, and `random = u64::MAX` reaches
    // the ceiling itself.
    let nanos = (u128::from(random) * span) >> 64;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The next number of this thread's xorshift64 generator.
fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

fn seed() -> u64 {
    let clock = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // xorshift never leaves zero, so keep one bit set.
    RandomState::new().hash_one(clock) | 1
}

/// A retry the budget refused, with the counts that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("retry budget exhausted: {retries} retries for {requests} requests in the window")]
pub struct Exhausted {
    pub requests: u64,
    pub retries: u64,
}

/// The retry budget of one server. Shared by the server's calls (`&self` methods; the lock is
/// held for a few arithmetic steps, never across an `.await`).
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a retry each request earns.
    ratio_milli: u64,
    /// Thousandths of a retry the window always holds.
    floor_milli: u64,
    window: Mutex<Window>,
}

impl RetryBudget {
    pub fn new(cfg: BudgetConfig) -> RetryBudget {
        RetryBudget {
            // An `as` cast from f64 saturates: a negative or NaN ratio earns nothing.
            ratio_milli: (cfg.ratio * 1000.0).round() as u64,
            // Retries per second × milliseconds = thousandths of a retry per window.
            floor_milli: u64::from(cfg.min_retries_per_sec).saturating_mul(cfg.window_ms),
            window: Mutex::new(Window::new(Duration::from_millis(cfg.window_ms))),
        }
    }

    /// Counts an original call (not a retry) made at `now`.
    pub fn record_request(&self, now: Instant) {
        self.lock().add(now, 1, 0);
    }

    /// Takes one retry from the budget at `now`, if the window has one left.
    pub fn try_retry(&self, now: Instant) -> Result<(), Exhausted> {
        let mut window = self.lock();
        let (requests, retries) = window.counts(now);
        if retries < self.allowed(requests) {
            window.add(now, 0, 1);
            Ok(())
        } else {
            Err(Exhausted { requests, retries })
        }
    }

    /// Retries left in the window at `now`.
    pub fn remaining(&self, now: Instant) -> u64 {
        let (requests, retries) = self.lock().counts(now);
        self.allowed(requests).saturating_sub(retries)
    }

    /// Whole retries allowed in a window that holds `requests` calls.
    fn allowed(&self, requests: u64) -> u64 {
        self.ratio_milli
            .saturating_mul(requests)
            .max(self.floor_milli)
            / 1000
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        // The lock guards counters only; a panicking holder cannot leave them incoherent.
        self.window
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde::de::value::{Error as ValueError, MapDeserializer};

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn budget() -> RetryBudget {
        RetryBudget::new(BudgetConfig::default())
    }

    /// Retries taken at `now` until the budget refuses one.
    fn drain(b: &RetryBudget, now: Instant) -> u64 {
        let mut n = 0;
        while b.try_retry(now).is_ok() {
            n += 1;
        }
        n
    }

    #[test]
    fn the_ratio_caps_retries_under_load() {
        let b = budget();
        let t0 = Instant::now();
        for _ in 0..1000 {
            b.record_request(t0);
        }
        assert_eq!(b.remaining(t0), 200);
        assert_eq!(drain(&b, t0), 200);
        assert_eq!(
            b.try_retry(t0),
            Err(Exhausted {
                requests: 1000,
                retries: 200
            })
        );
        assert_eq!(b.remaining(t0), 0);
    }

    #[test]
    fn steady_load_retries_at_the_ratio() {
        // 100 calls a second for a minute, every one failing and asking to retry.
        let b = budget();
        let t0 = Instant::now();
        let (mut requests, mut retries) = (0u64, 0u64);
        for ms in (0..60_000).step_by(10) {
            let now = t0 + Duration::from_millis(ms);
            b.record_request(now);
            requests += 1;
            if b.try_retry(now).is_ok() {
                retries += 1;
            }
        }
        let ratio = retries as f64 / requests as f64;
        // The first window also spends the floor, hence a little over 20%.
        assert!(
            (0.19..=0.21).contains(&ratio),
            "{retries}/{requests} = {ratio}"
        );
    }

    #[test]
    fn the_floor_lets_a_quiet_server_retry() {
        let b = budget();
        let t0 = Instant::now();
        b.record_request(t0);
        // One call earns 0.2 retries; the floor gives 3/s over 10 s.
        assert_eq!(drain(&b, t0), 30);
        assert_eq!(
            b.try_retry(t0),
            Err(Exhausted {
                requests: 1,
                retries: 30
            })
        );
    }

    #[test]
    fn a_zero_floor_and_ratio_refuse_every_retry() {
        let b = RetryBudget::new(BudgetConfig {
            ratio: 0.0,
            min_retries_per_sec: 0,
            ..BudgetConfig::default()
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            b.record_request(t0);
        }
        assert!(b.try_retry(t0).is_err());
    }

    #[test]
    fn the_window_slides() {
        let b = budget();
        let t0 = Instant::now();
        for _ in 0..1000 {
            b.record_request(t0);
        }
        assert_eq!(drain(&b, t0), 200);
        for _ in 0..500 {
            b.record_request(t0 + secs(5.0));
        }
        // 1500 requests earn 300 retries, 200 of them spent.
        assert_eq!(b.remaining(t0 + secs(5.0)), 100);
        // A window after t0, its requests and retries are both forgotten: 500 requests earn
        // 100 retries, none spent.
        assert_eq!(b.remaining(t0 + secs(10.5)), 100);
        // Later still, only the floor.
        assert_eq!(b.remaining(t0 + secs(16.0)), 30);
    }

    #[test]
    fn retries_taken_late_in_the_window_are_still_counted() {
        let b = budget();
        let t0 = Instant::now();
        for _ in 0..1000 {
            b.record_request(t0);
        }
        assert_eq!(drain(&b, t0 + secs(9.5)), 200);
        assert!(b.try_retry(t0 + secs(9.9)).is_err());
    }

    #[test]
    fn the_backoff_ceiling_doubles_up_to_the_cap() {
        let cfg = BackoffConfig::default();
        let ceilings: Vec<u64> = (0..7)
            .map(|a| u64::try_from(cfg.ceiling(a).as_millis()).expect("small"))
            .collect();
        assert_eq!(ceilings, [25, 50, 100, 200, 250, 250, 250]);
        assert_eq!(cfg.ceiling(63), Duration::from_millis(250));
        assert_eq!(cfg.ceiling(u32::MAX), Duration::from_millis(250));
    }

    #[test]
    fn jitter_stays_within_the_ceiling_and_spreads_over_it() {
        let cfg = BackoffConfig::default();
        for attempt in 0..6 {
            let ceiling = cfg.ceiling(attempt);
            let samples: Vec<Duration> = (0..2000).map(|_| cfg.backoff(attempt)).collect();
            let (min, max) = (
                samples.iter().min().expect("samples"),
                samples.iter().max().expect("samples"),
            );
            assert!(*max <= ceiling, "attempt {attempt}: {max:?} > {ceiling:?}");
            // Full jitter reaches down towards zero and up towards the ceiling.
            assert!(*min < ceiling / 10, "attempt {attempt}: min {min:?}");
            assert!(*max > ceiling * 9 / 10, "attempt {attempt}: max {max:?}");
        }
    }

    #[test]
    fn full_jitter_maps_the_extremes_to_the_bounds() {
        let ceiling = Duration::from_millis(250);
        assert_eq!(full_jitter(ceiling, 0), Duration::ZERO);
        assert_eq!(full_jitter(ceiling, u64::MAX), ceiling);
        assert_eq!(full_jitter(ceiling, u64::MAX / 2), ceiling / 2);
        assert_eq!(full_jitter(Duration::ZERO, u64::MAX), Duration::ZERO);
        assert_eq!(
            full_jitter(Duration::MAX, u64::MAX),
            Duration::from_nanos(u64::MAX)
        );
    }

    #[test]
    fn threads_draw_different_jitter() {
        let draw = || (0..4).map(|_| random_u64()).collect::<Vec<_>>();
        let here = draw();
        let there = std::thread::spawn(draw).join().expect("thread ran");
        assert_ne!(here, there);
    }

    #[test]
    fn configs_have_defaults_refuse_unknown_fields_and_validate() {
        let budget: BudgetConfig = BudgetConfig::deserialize(
            MapDeserializer::<_, ValueError>::new([("min_retries_per_sec", 5u32)].into_iter()),
        )
        .expect("parses");
        assert_eq!(
            budget,
            BudgetConfig {
                min_retries_per_sec: 5,
                ..BudgetConfig::default()
            }
        );
        assert_eq!(budget.validate(), Ok(()));
        let err = BackoffConfig::deserialize(MapDeserializer::<_, ValueError>::new(
            [("base", 5u64)].into_iter(),
        ))
        .expect_err("unknown field");
        assert!(err.to_string().contains("base"), "{err}");

        let bad_ratio = BudgetConfig {
            ratio: 1.5,
            ..BudgetConfig::default()
        };
        assert_eq!(bad_ratio.validate().map_err(|e| e.field), Err("ratio"));
        let nan_ratio = BudgetConfig {
            ratio: f64::NAN,
            ..BudgetConfig::default()
        };
        assert_eq!(nan_ratio.validate().map_err(|e| e.field), Err("ratio"));
        let bad_cap = BackoffConfig {
            base_ms: 100,
            cap_ms: 10,
        };
        assert_eq!(bad_cap.validate().map_err(|e| e.field), Err("cap_ms"));
        assert_eq!(BackoffConfig::default().validate(), Ok(()));
    }
}
