//! The MCP front end's settings (`[mcp]`) and shared state, and its housekeeping.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use axum::http::HeaderMap;
use serde::Deserialize;

use super::dispatch::Route;
use super::parked::ParkedCalls;
use super::session::Sessions;
use super::target::Target;
use crate::pool::reconcile::Pools;
use crate::registry::{Principal, Registry};
use crate::route::Router;
use crate::shutdown::Shutdown;

/// `[mcp]` in mcpd.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// Origins (scheme://host[:port]) browsers may call from, besides loopback and this
    /// node's advertised host. Requests without an Origin header (non-browser clients) pass.
    pub allowed_origins: Vec<String>,
    /// A session with no request, no open stream and no call in flight for this long is
    /// dropped from this node's memory (`Sessions::expire`).
    pub session_idle_timeout_ms: u64,
    /// Live sessions one tenant (or one admin token) may hold on this node; more get 429.
    pub max_sessions_per_tenant: usize,
    /// Bytes of `clientInfo` and `capabilities` an `initialize` may carry (a session's signed
    /// id carries them).
    pub max_session_info_bytes: usize,
    /// Resources one session may subscribe to.
    pub max_subscriptions_per_session: usize,
    /// Longest resource URI a session may subscribe to.
    pub max_uri_bytes: usize,
    /// SSE streams (`GET`) one session may hold open at once on a node; more get 429.
    pub max_streams_per_session: usize,
    /// A session's changed subscriptions and log level are replicated at most this often
    /// (one Raft write per session per interval, however many calls changed them).
    pub session_state_interval_ms: u64,
    /// How long a client's answer (`resources/subscribe`, `logging/setLevel`) waits for the
    /// session's change to be replicated; then it is answered and the write goes on (a lost
    /// quorum would otherwise hold it for `api.quorum_wait_ms`).
    pub session_state_wait_ms: u64,
    /// How long a 2026-07-28 call that asked its client for input (`input_required`) waits,
    /// parked on this node, for the client's retry with the answers; then it is cancelled.
    pub parked_call_ttl_ms: u64,
    /// Calls one caller may have parked on this node at once; one more is cancelled and
    /// refused (-32029, 429).
    pub max_parked_calls_per_caller: usize,
    /// Once a server has asked the client something, how long further questions of the same
    /// call are waited for, so that questions asked together are answered in one round.
    pub input_gather_ms: u64,
    /// Most answers a first request may give ahead of the server's questions
    /// (`inputResponses` without `requestState`); more is refused (-32602).
    pub max_answers_ahead: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            allowed_origins: Vec::new(),
            session_idle_timeout_ms: 30 * 60 * 1000,
            max_sessions_per_tenant: 1000,
            max_session_info_bytes: 4096,
            max_subscriptions_per_session: 256,
            max_uri_bytes: 2048,
            max_streams_per_session: 4,
            session_state_interval_ms: 1000,
            session_state_wait_ms: 1000,
            parked_call_ttl_ms: 5 * 60 * 1000,
            max_parked_calls_per_caller: 64,
            input_gather_ms: 20,
            max_answers_ahead: 32,
        }
    }
}

/// State of the MCP front end: what its handlers share. Cheap to clone: one `Arc` (each
/// request's handler gets a clone).
#[derive(Clone)]
pub struct McpState(Arc<Shared>);

impl std::ops::Deref for McpState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What an [`McpState`] holds.
pub struct Shared {
    pub registry: Registry,
    pub pools: Pools,
    pub router: Router,
    pub sessions: Sessions,
    /// The sessions' hold operations in progress, in order (`super::holds`).
    pub hold_turns: super::holds::Turns,
    pub parked: ParkedCalls,
    pub origins: Arc<OriginPolicy>,
    /// The limits of `[mcp]`.
    pub config: Arc<McpConfig>,
    /// Who is calling (API tokens and trusted issuers' JWTs).
    pub identity: crate::identity::Identity,
    /// What each caller may call (`crate::policy`).
    pub policies: crate::policy::Policies,
    /// The log of every call (`crate::call_audit`).
    pub calls: crate::call_audit::CallAudit,
    /// This node's recent figures per server (`crate::traffic`).
    pub traffic: crate::traffic::Traffic,
    /// Usage accounting (`crate::usage`).
    pub usage: crate::usage::Usage,
    /// Held tools this node reported already (`crate::pinning`).
    pub detections: crate::pinning::Detections,
    /// Changes of the registry that alter what endpoints list (`super::listings`).
    pub listings: super::listings::Listings,
}

/// What every call leaves behind: a line in the call log, a sample in the traffic ring, and
/// its count in the usage figures.
pub struct Records {
    pub calls: crate::call_audit::CallAudit,
    pub traffic: crate::traffic::Traffic,
    pub usage: crate::usage::Usage,
}

impl McpState {
    pub fn new(
        registry: Registry,
        router: Router,
        identity: crate::identity::Identity,
        records: Records,
        cfg: &McpConfig,
        advertised_http: &str,
    ) -> McpState {
        let Records {
            calls,
            traffic,
            usage,
        } = records;
        McpState(Arc::new(Shared {
            policies: crate::policy::Policies::new(registry.clone()),
            registry,
            pools: router.pools().clone(),
            router,
            sessions: Sessions::new(Duration::from_millis(cfg.session_idle_timeout_ms)),
            hold_turns: Default::default(),
            parked: ParkedCalls::new(
                Duration::from_millis(cfg.parked_call_ttl_ms),
                cfg.max_parked_calls_per_caller,
            ),
            origins: Arc::new(OriginPolicy::new(cfg, advertised_http)),
            config: Arc::new(cfg.clone()),
            identity,
            calls,
            traffic,
            usage,
            detections: Default::default(),
            listings: Default::default(),
        }))
    }

    /// What the dispatcher needs to run `principal`'s requests to `target`.
    pub fn route(&self, principal: &Principal, target: &Target) -> Route {
        Route {
            registry: self.registry.clone(),
            router: self.router.clone(),
            principal: principal.clone(),
            target: target.clone(),
            affinity: None,
            policies: self.policies.clone(),
            calls: self.calls.clone(),
            traffic: self.traffic.clone(),
            usage: self.usage.clone(),
            detections: self.detections.clone(),
            decided: Default::default(),
        }
    }
}

/// DNS-rebinding protection: which hosts a browser's `Origin` may name.
pub struct OriginPolicy {
    hosts: Vec<String>,
}

impl OriginPolicy {
    /// Loopback, this node's advertised host, and the configured origins.
    pub fn new(cfg: &McpConfig, advertised_http: &str) -> OriginPolicy {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some((host, _)) = advertised_http.rsplit_once(':') {
            hosts.push(host.trim_matches(['[', ']']).to_string());
        }
        for o in &cfg.allowed_origins {
            hosts.push(origin_host(o).unwrap_or(o).to_string());
        }
        OriginPolicy { hosts }
    }

    /// Requests without an Origin (non-browser clients) pass; others must name an allowed host.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers
            .get(axum::http::header::ORIGIN)
            .and_then(|v| v.to_str().ok())
        else {
            return true;
        };
        match origin_host(origin) {
            Some(host) => self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)),
            None => false,
        }
    }
}

/// The host of an Origin (`http://host:port` → `host`, `http://[::1]:80` → `::1`).
fn origin_host(origin: &str) -> Option<&str> {
    let rest = origin.split_once("://")?.1;
    let hostport = rest.split('/').next()?;
    if let Some(v6) = hostport.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h);
    }
    Some(
        hostport
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(hostport),
    )
}

impl FromRef<McpState> for crate::identity::Identity {
    fn from_ref(state: &McpState) -> crate::identity::Identity {
        state.identity.clone()
    }
}

impl FromRef<McpState> for Registry {
    fn from_ref(state: &McpState) -> Registry {
        state.registry.clone()
    }
}

/// Expires idle sessions and abandoned multi-round-trip calls until shutdown.
pub async fn housekeeping(state: McpState, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(state.sessions.sweep_every()) => {}
            _ = shutdown.clone().wait() => return,
        }
        let expired = state.sessions.expire();
        if !expired.is_empty() {
            metrics::counter!("mcpd_mcp_sessions_expired_total").increment(expired.len() as u64);
            tracing::info!(expired = expired.len(), "idle sessions dropped");
        }
        for session in &expired {
            super::holds::let_go(&state, session, super::holds::LetGo::Idle);
        }

        state.parked.expire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_by_host() {
        let policy = OriginPolicy::new(&McpConfig::default(), "10.0.0.5:7400");
        let check = |o: &str| {
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::ORIGIN, o.parse().expect("header"));
            policy.allows(&h)
        };
        assert!(check("http://localhost:3000"));
        assert!(check("http://127.0.0.1"));
        assert!(check("http://[::1]:8080"));
        assert!(check("https://10.0.0.5"));
        assert!(!check("http://evil.example.com"));
        assert!(!check("null"));
        assert!(policy.allows(&HeaderMap::new()));
    }
}
