//! `[route]`: placement between nodes, and the resilience around each call (breakers, retry
//! budget, backoff), validated once at load.

use serde::Deserialize;

use super::breaker::BreakerConfig;
use super::budget::{BackoffConfig, BudgetConfig};
use super::invalid::InvalidConfig;

/// `[route]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// How long a node may be unreachable before the leader moves its servers elsewhere.
    pub placement_grace_ms: u64,
    /// Attempts per call, the first included (retries go to other replicas).
    pub max_attempts: u32,
    /// How long after a server's pool starts on this node (the server added or changed, or
    /// the node started) a list (`tools/list`, `prompts/list`, `resources/list` of `/mcp` or a
    /// virtual server) waits for it while it is still on its first start (also at most the
    /// server's own start timeout); a list after that goes without it, and its clients are
    /// told with `notifications/*/list_changed` when it comes up. At most 10 s.
    pub list_wait_ms: u64,
    /// `[route.breaker]`: when a (server, node) breaker opens and how it recovers.
    pub breaker: BreakerConfig,
    /// `[route.retry_budget]`: how much retrying may add to a server's load.
    pub retry_budget: BudgetConfig,
    /// `[route.backoff]`: the wait before each retry.
    pub backoff: BackoffConfig,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            placement_grace_ms: 10_000,
            max_attempts: 3,
            list_wait_ms: 3_000,
            breaker: BreakerConfig::default(),
            retry_budget: BudgetConfig::default(),
            backoff: BackoffConfig::default(),
        }
    }
}

impl RouteConfig {
    /// Checks every setting; the error names the key (`route.breaker.min_calls`).
    pub fn validate(&self) -> Result<(), (String, &'static str)> {
        fn within(section: &'static str) -> impl Fn(InvalidConfig) -> (String, &'static str) {
            move |e| (format!("route.{section}.{}", e.field), e.message)
        }
        if !(1..=10).contains(&self.max_attempts) {
            return Err(("route.max_attempts".into(), "must be from 1 to 10"));
        }
        if self.list_wait_ms > 10_000 {
            return Err(("route.list_wait_ms".into(), "must be at most 10000"));
        }
        self.breaker.validate().map_err(within("breaker"))?;
        self.retry_budget
            .validate()
            .map_err(within("retry_budget"))?;
        self.backoff.validate().map_err(within("backoff"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sections_load_with_defaults_and_a_bad_value_is_named_by_its_key() {
        let cfg: RouteConfig = toml::from_str(
            "max_attempts = 2\nlist_wait_ms = 500\n[breaker]\nmin_calls = 20\n[backoff]\nbase_ms = 10\n",
        )
        .expect("parses");
        assert_eq!(cfg.max_attempts, 2);
        assert_eq!(cfg.list_wait_ms, 500);
        assert_eq!(cfg.breaker.min_calls, 20);
        assert_eq!(cfg.breaker.window_ms, BreakerConfig::default().window_ms);
        assert_eq!(cfg.backoff.base_ms, 10);
        assert_eq!(cfg.retry_budget, BudgetConfig::default());
        assert!(cfg.validate().is_ok());

        let bad: RouteConfig = toml::from_str("[retry_budget]\nratio = 2.0\n").expect("parses");
        assert_eq!(
            bad.validate().unwrap_err().0,
            "route.retry_budget.ratio".to_string()
        );
        assert!(toml::from_str::<RouteConfig>("[breaker]\nnope = 1\n").is_err());
        let long: RouteConfig = toml::from_str("list_wait_ms = 10001\n").expect("parses");
        assert_eq!(long.validate().unwrap_err().0, "route.list_wait_ms");
    }
}
