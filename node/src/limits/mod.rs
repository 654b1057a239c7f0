//! Rate limits, quotas and concurrency limits on MCP calls, enforced for the whole cluster on
//! the node that takes the call, before it is routed.
//!
//! - **Which limit.** Of the limits whose `tenant`, `subject`, `server` and `tool` (a tool's
//!   or prompt's name) match the call, the most specific rate limit and the most specific
//!   quota count it (the most fields set; then the first by name): a rate limit on one tool
//!   does not lift a tenant's quota. A budget (`LIMIT/BUDGET`) is one for all calls, or one
//!   per tenant or per subject (`per`). A fallback's limits are not checked again.
//! - **Rate.** Tokens come from the leader's bucket for the budget
//!   (`registry::rate_lease`), a tenth of a second's worth at a time, and are spent here
//!   without asking anyone until they run out or [`LEASE_TTL`] passes. A refusal is remembered
//!   until the leader's `retry_after`, so an over-limit flood costs the leader nothing more.
//! - **Quota.** Calls are counted in the replicated state before they run
//!   (`Command::ConsumeQuota`, all or none), a hundredth of the quota at a time: a count
//!   survives the loss of every node, and the cluster never passes the quota. Calls counted
//!   but not used when a node stops, or when the period ends, are lost to the quota (at most a
//!   hundredth of it per node).
//! - **Concurrency.** A call runs on a slot the node holds of the budget (`slots`); the node
//!   holds slots from the leader's table, asking for one more when none is free, and gives
//!   back free ones every half second.
//! - **Refusals** are JSON-RPC `-32029` with `data.retryAfterMs` and `data.limit`; the call
//!   did not run. A node that cannot reach the leader or a quorum refuses limited calls as
//!   unavailable (fail closed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcpcp_proto::api::{LimitPer, LimitSpec, Quota, QuotaPeriod, RateLimit, Versioned};
use mcpcp_proto::mcp::{code, ErrorObject};
use serde_json::json;

use crate::call::{Call, CallError};
use crate::registry::lease::rate::RateAsk;
use crate::registry::lease::{LeaseAsk, LeaseGrant};
use crate::registry::state::{ApplyError, Command};
use crate::registry::{Registry, RegistryError};

mod slots;

pub use slots::Slot;

/// How long leased rate tokens may be spent.
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// How long a call waits for the leader's grant.
pub const LEASE_TIMEOUT: Duration = Duration::from_millis(1500);

/// The methods a limit counts: the ones that run something on a server.
const COUNTED: [&str; 3] = ["tools/call", "resources/read", "prompts/get"];

/// Budgets this node remembers; beyond it, the idle ones are forgotten.
const MAX_BUDGETS: usize = 10_000;

/// The node's side of the limits: what it has left of each budget.
pub struct Limiter {
    registry: Registry,
    rates: Budgets,
    quotas: Budgets,
    slots: Arc<slots::Slots>,
}

/// What admitted a call: the concurrency slot it runs on, if a limit counts it. Hold it until
/// the call ends.
#[must_use]
pub struct Admitted {
    _slot: Option<Slot>,
}

#[derive(Default)]
struct Budgets(Mutex<HashMap<String, Arc<Allowance>>>);

/// What this node may still spend of one budget.
#[derive(Default)]
struct Allowance {
    left: Mutex<Left>,
    /// Held while the node asks for more, so that one call asks and the others wait for it.
    asking: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Left {
    tokens: u64,
    /// Rate tokens: until when they may be spent. Quota calls: the period they count in.
    until: Option<Instant>,
    period: String,
    /// Refused until then (the budget is spent).
    refused_until: Option<Instant>,
    /// The quota of `period` is used up.
    exhausted: bool,
    /// The limit's revision these figures are of: a changed limit (a raised quota) starts
    /// afresh.
    revision: u64,
}

impl Budgets {
    fn of(&self, bucket: &str) -> Arc<Allowance> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = map.get(bucket) {
            return a.clone();
        }
        if map.len() >= MAX_BUDGETS {
            map.retain(|_, a| Arc::strong_count(a) > 1);
        }
        map.entry(bucket.to_string()).or_default().clone()
    }
}

impl Allowance {
    fn left(&self) -> std::sync::MutexGuard<'_, Left> {
        self.left.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The limits of each kind that count a call, if any.
struct Counting {
    rate: Option<(Counted, RateLimit)>,
    quota: Option<(Counted, Quota)>,
    concurrency: Option<Counted>,
}

/// The limit that counts a call, and the budget it draws from.
struct Counted {
    spec: Versioned<LimitSpec>,
    bucket: String,
}

impl Limiter {
    pub fn new(registry: Registry) -> Limiter {
        Limiter {
            slots: slots::Slots::new(registry.clone()),
            registry,
            rates: Budgets::default(),
            quotas: Budgets::default(),
        }
    }

    /// Lets `call` run, or refuses it (a spent budget, or one that could not be asked for).
    /// A slot is taken first and given back when a rate or a quota refuses: a refused call
    /// spends neither rate tokens nor quota for nothing when no slot is free.
    pub async fn admit(&self, call: &Call) -> Result<Admitted, CallError> {
        if !COUNTED.contains(&call.method.as_str()) {
            return Ok(Admitted { _slot: None });
        }
        self.take(self.counting(call)).await
    }

    /// Admits `fallback`, the call `primary` (admitted already) sent to a fallback server, by
    /// the limits that count it and did not count `primary` (the fallback server's own):
    /// a tenant's or a subject's limit counts the call once, wherever it ran.
    pub async fn admit_fallback(
        &self,
        primary: &Call,
        fallback: &Call,
    ) -> Result<Admitted, CallError> {
        if !COUNTED.contains(&fallback.method.as_str()) {
            return Ok(Admitted { _slot: None });
        }
        let counted = self.counting(primary);
        let mut counting = self.counting(fallback);
        let same = |a: Option<&Counted>, b: Option<&Counted>| {
            a.zip(b).is_some_and(|(a, b)| a.bucket == b.bucket)
        };
        if same(
            counting.rate.as_ref().map(|r| &r.0),
            counted.rate.as_ref().map(|r| &r.0),
        ) {
            counting.rate = None;
        }
        if same(
            counting.quota.as_ref().map(|q| &q.0),
            counted.quota.as_ref().map(|q| &q.0),
        ) {
            counting.quota = None;
        }
        if same(counting.concurrency.as_ref(), counted.concurrency.as_ref()) {
            counting.concurrency = None;
        }
        self.take(counting).await
    }

    /// Takes a slot, a rate token and a quota call, each where `counting` has a limit.
    async fn take(&self, counting: Counting) -> Result<Admitted, CallError> {
        let slot = match &counting.concurrency {
            Some(counted) => Some(self.slots.take(counted).await?),
            None => None,
        };
        if let Some((counted, rate)) = counting.rate {
            self.take_rate(&counted, rate).await?;
        }
        if let Some((counted, quota)) = counting.quota {
            self.take_quota(&counted, quota).await?;
        }
        Ok(Admitted { _slot: slot })
    }

    /// The most specific limit of each kind that matches the call (a limit of several kinds
    /// may count it for any of them).
    fn counting(&self, call: &Call) -> Counting {
        let rate = self.most_specific(call, |l| l.rate.is_some());
        let quota = self.most_specific(call, |l| l.quota.is_some());
        let concurrency = self.most_specific(call, |l| l.concurrency.is_some());
        Counting {
            rate: rate.and_then(|c| c.spec.spec.rate.map(|r| (c, r))),
            quota: quota.and_then(|c| c.spec.spec.quota.map(|q| (c, q))),
            concurrency,
        }
    }

    /// The most specific limit of those `kind` accepts that match the call.
    fn most_specific(&self, call: &Call, kind: impl Fn(&LimitSpec) -> bool) -> Option<Counted> {
        let data = self.registry.local();
        if data.state.limits.is_empty() {
            return None;
        }
        let p = &call.principal;
        // A tool's or a prompt's name; a resource read names neither.
        let tool = (call.method != "resources/read").then(|| call.tool());
        let matches = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        let spec = data
            .state
            .limits
            .values()
            .filter(|l| {
                let s = &l.spec;
                kind(s)
                    && matches(&s.tenant, p.tenant.as_deref())
                    && matches(&s.subject, Some(&p.token_id))
                    && matches(&s.server, Some(&call.server))
                    && matches(&s.tool, tool)
            })
            // The most fields set; the first by name among equals (max_by_key keeps the last).
            .rev()
            .max_by_key(|l| {
                let s = &l.spec;
                [&s.tenant, &s.subject, &s.server, &s.tool]
                    .iter()
                    .filter(|f| f.is_some())
                    .count()
            })?
            .clone();
        let budget = match spec.spec.per {
            LimitPer::All => "",
            LimitPer::Tenant => p.tenant.as_deref().unwrap_or_default(),
            LimitPer::Subject => p.token_id.as_str(),
        };
        let bucket = format!("{}/{budget}", spec.spec.name);
        Some(Counted { spec, bucket })
    }

    async fn take_rate(&self, counted: &Counted, rate: RateLimit) -> Result<(), CallError> {
        let allowance = self.rates.of(&counted.bucket);
        if let Some(verdict) = spend_rate(&allowance, counted, Instant::now()) {
            return verdict;
        }
        let _asking = allowance.asking.lock().await;
        // Another call may have refilled it while this one waited.
        if let Some(verdict) = spend_rate(&allowance, counted, Instant::now()) {
            return verdict;
        }
        let ask = LeaseAsk::Rate(RateAsk {
            bucket: counted.bucket.clone(),
            revision: counted.spec.revision,
            want: (rate.per_second / 10).clamp(1, rate.burst.max(1)),
        });
        let grant = match self.registry.lease(&ask, LEASE_TIMEOUT).await {
            Ok(LeaseGrant::Rate(g)) => Ok(g),
            Ok(other) => Err(format!("the leader answered {other:?}")),
            Err(e) => Err(e.to_string()),
        }
        .map_err(|e| unavailable(counted, "rate limit", &e))?;
        let now = Instant::now();
        let mut left = allowance.left();
        if grant.granted == 0 {
            let wait = Duration::from_millis(grant.retry_after_ms);
            left.refused_until = Some(now + wait);
            left.tokens = 0;
            left.revision = counted.spec.revision;
            drop(left);
            return Err(refused(counted, "rate", wait));
        }
        left.tokens = u64::from(grant.granted) - 1;
        left.until = Some(now + LEASE_TTL);
        left.refused_until = None;
        left.revision = counted.spec.revision;
        Ok(())
    }

    async fn take_quota(&self, counted: &Counted, quota: Quota) -> Result<(), CallError> {
        let now = time::OffsetDateTime::now_utc();
        let (period, ends_in) = period_of(quota.period, now);
        let allowance = self.quotas.of(&counted.bucket);
        if let Some(verdict) = spend_quota(&allowance, counted, &period, ends_in) {
            return verdict;
        }
        let _asking = allowance.asking.lock().await;
        if let Some(verdict) = spend_quota(&allowance, counted, &period, ends_in) {
            return verdict;
        }
        let mut want = (quota.calls / 100).clamp(1, 1000);
        for _ in 0..3 {
            let consume = Command::ConsumeQuota {
                bucket: counted.bucket.clone(),
                period: period.clone(),
                calls: want,
                max: quota.calls,
            };
            metrics::counter!("mcpd_limit_quota_writes_total").increment(1);
            match self.registry.write(consume).await {
                Ok(_) => {
                    let mut left = allowance.left();
                    left.period = period;
                    left.tokens = want - 1;
                    left.exhausted = false;
                    left.revision = counted.spec.revision;
                    return Ok(());
                }
                Err(RegistryError::Apply(ApplyError::QuotaExhausted { used, max, .. }))
                    if used < max =>
                {
                    // Less is left than asked for: ask for what is left.
                    want = max - used;
                }
                Err(RegistryError::Apply(ApplyError::QuotaExhausted { .. })) => {
                    let mut left = allowance.left();
                    left.period = period;
                    left.tokens = 0;
                    left.exhausted = true;
                    left.revision = counted.spec.revision;
                    drop(left);
                    return Err(refused(counted, "quota", ends_in));
                }
                Err(e) => return Err(unavailable(counted, "quota", &e.to_string())),
            }
        }
        Err(refused(counted, "quota", ends_in))
    }
}

/// Spends a leased rate token: `Some(Ok)` when one was left, `Some(Err)` while the budget
/// is known to be spent, `None` when the leader must be asked.
fn spend_rate(a: &Allowance, counted: &Counted, now: Instant) -> Option<Result<(), CallError>> {
    let mut left = a.left();
    if left.revision != counted.spec.revision {
        return None;
    }
    if left.tokens > 0 && left.until.is_some_and(|u| u > now) {
        left.tokens -= 1;
        return Some(Ok(()));
    }
    let until = left.refused_until.filter(|u| *u > now)?;
    drop(left);
    Some(Err(refused(counted, "rate", until - now)))
}

/// Spends a counted quota call of `period`, like [`spend_rate`].
fn spend_quota(
    a: &Allowance,
    counted: &Counted,
    period: &str,
    ends_in: Duration,
) -> Option<Result<(), CallError>> {
    let mut left = a.left();
    if left.period != period || left.revision != counted.spec.revision {
        return None;
    }
    if left.tokens > 0 {
        left.tokens -= 1;
        return Some(Ok(()));
    }
    if !left.exhausted {
        return None;
    }
    drop(left);
    Some(Err(refused(counted, "quota", ends_in)))
}

/// The refusal of a call whose limit could not be checked (fail closed).
fn unavailable(counted: &Counted, what: &str, error: &str) -> CallError {
    metrics::counter!("mcpd_limit_unavailable_total").increment(1);
    CallError::NotRun(format!(
        "the {what} {:?} could not be checked ({error}); the call did not run",
        counted.spec.spec.name
    ))
}

/// The refusal of a call by a spent budget.
fn refused(counted: &Counted, kind: &'static str, retry_after: Duration) -> CallError {
    let name = &counted.spec.spec.name;
    metrics::counter!("mcpd_limit_refusals_total", "limit" => name.clone(), "kind" => kind)
        .increment(1);
    let retry_after_ms = retry_after.as_millis().max(1) as u64;
    let what = match kind {
        "rate" => "rate limit {name:?} is spent",
        "concurrency" => "concurrency limit {name:?} has every slot in use",
        _ => "quota {name:?} is spent",
    }
    .replace("{name:?}", &format!("{name:?}"));
    CallError::Answered(
        ErrorObject::new(
            code::RATE_LIMITED,
            format!("the {what}; retry in {retry_after_ms} ms (the call did not run)"),
        )
        .with_data(json!({
            "limit": name,
            "kind": kind,
            "retryAfterMs": retry_after_ms,
        })),
    )
}

/// The quota period `now` is in (`2026-12-05`, `2026-12`), and how long until it ends.
fn period_of(period: QuotaPeriod, now: time::OffsetDateTime) -> (String, Duration) {
    let date = now.date();
    let (name, next) = match period {
        QuotaPeriod::Day => (
            format!(
                "{:04}-{:02}-{:02}",
                date.year(),
                u8::from(date.month()),
                date.day()
            ),
            date.next_day(),
        ),
        QuotaPeriod::Month => {
            let next_month = date.month().next();
            let year = if next_month == time::Month::January {
                date.year() + 1
            } else {
                date.year()
            };
            (
                format!("{:04}-{:02}", date.year(), u8::from(date.month())),
                time::Date::from_calendar_date(year, next_month, 1).ok(),
            )
        }
    };
    let ends_in = next
        .map(|d| d.midnight().assume_utc() - now)
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(Duration::from_secs(3600));
    (name, ends_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_days_and_months_with_the_time_left() {
        let at = time::OffsetDateTime::from_unix_timestamp(1_798_758_000).unwrap();
        let (day, left) = period_of(QuotaPeriod::Day, at);
        assert_eq!(day, "2026-12-31");
        assert_eq!(left, Duration::from_secs(3600));
        let (month, left) = period_of(QuotaPeriod::Month, at);
        assert_eq!(month, "2026-12");
        assert_eq!(left, Duration::from_secs(3600));
        let mid = time::OffsetDateTime::from_unix_timestamp(1_770_681_600).unwrap();
        let (month, left) = period_of(QuotaPeriod::Month, mid);
        assert_eq!(month, "2026-02");
        assert_eq!(left, Duration::from_secs(19 * 86400));
    }
}
