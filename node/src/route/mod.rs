//! Routing a call to a server's replicas, with the resilience around it.
//!
//! The path of one call, in the order [`Router::call`] applies it:
//!
//! 1. **scope**: the server must exist, be visible to the caller's tenant and be enabled;
//! 2. **route**: the replicas that run it, this node's pool first, then peers
//!    ([`placement`] decides where servers with `replicas` run);
//! 3. **breaker**: a circuit breaker per (server, node) skips replicas that keep failing
//!    ([`breaker`]);
//! 4. **retry**: the next replica is tried when the call provably did not run (refused
//!    connection, full queue, open breaker), or when it is safe to run twice (a read-only
//!    method, or a tool in the server's `idempotent_tools`) and nothing was sent to the
//!    client yet; retries back off with full jitter and are bounded by a retry budget
//!    ([`budget`]);
//! 5. **timeout**: each attempt is bounded by the server's request timeout (in the pool);
//! 6. **transport**: the local pool, or a peer over gRPC ([`peer`]);
//! 7. **fallback**: when no replica could take the call, the first healthy fallback server
//!    offering the same tool answers it, marked in the result's `_meta`.

pub mod breaker;
pub mod budget;
pub mod config;
pub mod invalid;
pub mod peer;
pub mod peer_catalogues;
pub mod placement;
pub mod window;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcpcp_proto::api::{Member, ServerSpec, Versioned};
use mcpcp_proto::mcp::{code, is_read_only, ErrorObject};
use serde_json::{json, Value};

use crate::call::{Call, CallError, EventSink};
use crate::limits::Limiter;
use crate::pool::catalogue::Catalogue;
use crate::pool::fair::Share;
use crate::pool::reconcile::Pools;
use crate::raft::network::PeerChannels;
use crate::registry::{Principal, Registry};
use crate::telemetry::InSpanExt;
use breaker::{Breakers, Outcome};
use budget::RetryBudget;

/// The methods a fallback answers when no replica of the primary could: its tools, listed
/// and called (on the aggregate endpoint the list comes from catalogues; on the primary's own
/// endpoint, `/servers/PRIMARY/mcp`, from the fallback itself).
const FALLS_BACK: &[&str] = &["tools/call", "tools/list"];

/// The `_meta` key that marks an answer a fallback gave in its primary's place.
pub const FALLBACK_META: &str = "io.mcpcp/fallback";

/// Marks `result` as answered by `fallback` in `primary`'s place, and why.
pub fn mark_fallback(result: &mut Value, primary: &str, fallback: &str, reason: &str) {
    if let Some(o) = result.as_object_mut() {
        let meta = o.entry("_meta").or_insert(json!({}));
        meta[FALLBACK_META] = json!({
            "server": primary,
            "fallback": fallback,
            "reason": reason,
        });
    }
}

/// What a fallback offers in its primary's place: its tools only, since only `tools/list` and
/// `tools/call` fall back.
pub fn fallback_capabilities(capabilities: &Value) -> Value {
    match capabilities.get("tools") {
        Some(tools) => json!({ "tools": tools }),
        None => json!({}),
    }
}

/// Where one attempt goes.
#[derive(Clone)]
enum Replica {
    Local,
    Peer(Member),
}

/// What a server offers and how it started, from this node's pool or a peer's.
#[derive(Clone, Default)]
pub struct ServerInfo {
    pub init: Option<Value>,
    pub catalogue: Arc<Catalogue>,
}

/// Whose call it is, for the fair queue of a shared pool: the caller's tenant and its weight.
pub fn share(registry: &Registry, principal: &Principal) -> Share {
    let Some(tenant) = &principal.tenant else {
        return Share::cluster();
    };
    let weight = registry
        .local()
        .state
        .tenants
        .get(tenant)
        .map_or(1, |t| t.spec.weight);
    Share {
        tenant: Arc::from(tenant.as_str()),
        weight,
    }
}

/// How long a caller asking what a server offers waits for a process of it (at most the
/// server's start timeout, and 10 s).
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// For a running process, even while one restarts: the caller needs its `initialize`
    /// answer (a session's or a discovery's, `Router::serving`).
    Running,
    /// Only while a process is on its first start: a caller that reads the catalogue, which
    /// outlives a restart, gets what is known of a server that is down at once, so that one
    /// such server does not hold up every aggregate list.
    FirstStart,
    /// As `FirstStart`, but only until `[route] list_wait_ms` after the server's start: a list
    /// goes without a server still starting after that, whose first catalogue is announced
    /// to the lists' clients (`notifications/*/list_changed`) when it comes.
    Listing,
}

/// Routes calls to replicas. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    registry: Registry,
    pools: Pools,
    channels: PeerChannels,
    pub breakers: Arc<Breakers>,
    config: config::RouteConfig,
    budgets: Arc<Mutex<HashMap<String, Arc<RetryBudget>>>>,
    /// What peers said the servers they run offer.
    peer_catalogues: Arc<peer_catalogues::PeerCatalogues>,
    /// Rate limits, quotas and concurrency limits, checked once per call on the node that
    /// takes it.
    limiter: Arc<Limiter>,
}

impl Router {
    pub fn new(
        registry: Registry,
        pools: Pools,
        channels: PeerChannels,
        config: config::RouteConfig,
    ) -> Router {
        Router {
            pools,
            channels,
            breakers: Arc::new(Breakers::new(config.breaker)),
            config,
            budgets: Arc::default(),
            peer_catalogues: Arc::default(),
            limiter: Arc::new(Limiter::new(registry.clone())),
            registry,
        }
    }

    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    pub fn channels(&self) -> &PeerChannels {
        &self.channels
    }

    fn budget(&self, server: &str) -> Arc<RetryBudget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = budgets.get(server) {
            return b.clone();
        }
        budgets
            .entry(server.to_string())
            .or_insert_with(|| Arc::new(RetryBudget::new(self.config.retry_budget)))
            .clone()
    }

    /// The spec of a server the caller may use, or the error to answer.
    pub fn scope(
        &self,
        principal: &Principal,
        server: &str,
    ) -> Result<Versioned<ServerSpec>, ErrorObject> {
        let spec = self.registry.local().state.servers.get(server).cloned();
        match spec {
            Some(s) if principal.may_use(&s.spec) => {
                if s.spec.enabled {
                    Ok(s)
                } else {
                    Err(ErrorObject::new(
                        code::UNAVAILABLE,
                        format!("server {server:?} is disabled"),
                    ))
                }
            }
            _ => Err(ErrorObject::new(
                code::INVALID_PARAMS,
                format!("unknown server {server:?}"),
            )),
        }
    }

    /// The replicas of `server`, this node first.
    fn replicas(&self, spec: &Versioned<ServerSpec>) -> Vec<Replica> {
        let name = &spec.spec.name;
        let me = self.registry.id;
        let placed: Option<Vec<u64>> = spec.spec.replicas.map(|_| {
            self.registry
                .local()
                .state
                .placements
                .get(name)
                .cloned()
                .unwrap_or_default()
        });
        let runs_on = |id: u64| placed.as_ref().is_none_or(|p| p.contains(&id));
        let mut out = Vec::new();
        if runs_on(me) && self.pools.get(name).is_some() {
            out.push(Replica::Local);
        }
        let mut peers: Vec<Member> = self
            .registry
            .members()
            .into_iter()
            .filter(|m| m.id != me && runs_on(m.id))
            .collect();
        // Spread load over peers; a closed breaker goes before a half-open one.
        fastrand_shuffle(&mut peers);
        peers.sort_by_key(|m| {
            self.breakers
                .get(name, m.id)
                .state(Instant::now())
                .as_gauge() as u8
        });
        out.extend(peers.into_iter().map(Replica::Peer));
        out
    }

    /// Runs `call` through the steps in the module docs.
    pub async fn call(&self, call: &Call) -> Result<Value, CallError> {
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            parent: crate::telemetry::parent(),
            "mcp.route",
            mcp.server = %call.server,
            mcp.method.name = %call.method,
            attempts = tracing::field::Empty,
            node = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let outcome = self.route(call).in_span(span.clone()).await;
        if let Err(e) = &outcome {
            crate::telemetry::failed(&span, e.label());
        }
        outcome
    }

    async fn route(&self, call: &Call) -> Result<Value, CallError> {
        let spec = self.scope(&call.principal, &call.server)?;
        // Held until the call ends: a concurrency limit's slot.
        let _admitted = self.limiter.admit(call).await?;
        match self.call_replicas(&spec, call).await {
            Ok(v) => Ok(v),
            Err(e)
                if e.did_not_run()
                    && FALLS_BACK.contains(&call.method.as_str())
                    && !spec.spec.fallbacks.is_empty() =>
            {
                self.fallback(&spec, call, e).await
            }
            Err(e) => Err(e),
        }
    }

    /// Tries the replicas of `spec`. A `NotRun` or `Busy` error means no replica ran it.
    async fn call_replicas(
        &self,
        spec: &Versioned<ServerSpec>,
        call: &Call,
    ) -> Result<Value, CallError> {
        let server = spec.spec.name.as_str();
        let safe = is_read_only(&call.method)
            || (call.method == "tools/call"
                && spec.spec.idempotent_tools.iter().any(|t| t == call.tool()));
        let budget = self.budget(server);
        budget.record_request(Instant::now());
        let replicas = self.replicas(spec);
        let mut last: Option<CallError> = None;
        let mut attempts: u32 = 0;
        for replica in replicas {
            if attempts >= self.config.max_attempts {
                break;
            }
            let node = match &replica {
                Replica::Local => self.registry.id,
                Replica::Peer(m) => m.id,
            };
            let breaker = self.breakers.get(server, node);
            let permit = match breaker.try_acquire(Instant::now()) {
                Ok(p) => p,
                Err(rejected) => {
                    metrics::counter!("mcpd_breaker_short_circuits_total", "server" => server.to_string()).increment(1);
                    if !last.as_ref().is_some_and(CallError::may_have_run) {
                        last = Some(CallError::NotRun(format!(
                            "server {server:?} on node {node} is failing ({rejected}); the call did not run"
                        )));
                    }
                    continue;
                }
            };
            if attempts > 0 {
                if budget.try_retry(Instant::now()).is_err() {
                    metrics::counter!("mcpd_retry_budget_exhausted_total", "server" => server.to_string()).increment(1);
                    break;
                }
                metrics::counter!("mcpd_retries_total", "server" => server.to_string())
                    .increment(1);
                tokio::time::sleep(self.config.backoff.backoff(attempts - 1)).await;
            }
            attempts += 1;
            // The route's span says how many attempts it took and which node answered last (a
            // peer's attempt has a span of its own, `peer.call`).
            crate::telemetry::with_current(|route| {
                route.record("attempts", attempts);
                route.record("node", node);
            });
            let outcome = self.attempt(&replica, server, call).await;
            let failed = counts_against_the_server(&outcome, &call.events);
            permit.record(
                if failed {
                    Outcome::Failure
                } else {
                    Outcome::Success
                },
                Instant::now(),
            );
            match outcome {
                Ok(v) => return Ok(v),
                Err(e @ CallError::Answered(_)) => return Err(e),
                Err(e) if e.did_not_run() => {
                    // A failure that may have run stays the one reported: "it did not run"
                    // would be untrue once any replica may have run it.
                    if !last.as_ref().is_some_and(CallError::may_have_run) {
                        last = Some(e);
                    }
                }
                Err(e) => {
                    // Once anything reached the client, a retry could show it twice.
                    if !safe || call.events.any_sent() {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            CallError::NotRun(format!(
                "server {server:?} has no replica that can take the call; it did not run"
            ))
        }))
    }

    /// One attempt on one replica.
    async fn attempt(
        &self,
        replica: &Replica,
        server: &str,
        call: &Call,
    ) -> Result<Value, CallError> {
        match replica {
            Replica::Local => match self.pools.get(server) {
                Some(pool) => {
                    pool.call_for(
                        call.affinity.as_ref(),
                        &share(&self.registry, &call.principal),
                        &call.method,
                        call.params.clone(),
                        Some(call.events.clone()),
                    )
                    .await
                }
                None => Err(CallError::NotRun(format!(
                    "server {server:?} is not running here; the call did not run"
                ))),
            },
            Replica::Peer(m) => peer::call(&self.channels, m, server, call).await,
        }
    }

    /// Sends a tools/call whose server has no replica left to its first healthy fallback that
    /// offers the same tool, marking the answer.
    async fn fallback(
        &self,
        primary: &Versioned<ServerSpec>,
        call: &Call,
        primary_error: CallError,
    ) -> Result<Value, CallError> {
        let tool = call.tool();
        for fb in &primary.spec.fallbacks {
            let Ok(spec) = self.scope(&call.principal, fb) else {
                continue;
            };
            // The caller's policies decide on the fallback as on the server it named.
            if !call.may_fall_back_to(fb) {
                continue;
            }
            let info = self.info(&call.principal, fb).await;
            if call.method == "tools/call"
                && info.catalogue.loaded
                && !info.catalogue.has_tool(tool)
            {
                continue;
            }
            let to_fallback = call.to(fb);
            // The fallback server's own limits count the call too (the caller's were taken).
            let _admitted = match self.limiter.admit_fallback(call, &to_fallback).await {
                Ok(admitted) => admitted,
                Err(e) => {
                    tracing::debug!(fallback = %fb, error = %e, "fallback refused by its limits");
                    continue;
                }
            };
            match self.call_replicas(&spec, &to_fallback).await {
                Ok(mut v) => {
                    metrics::counter!("mcpd_fallbacks_total", "server" => primary.spec.name.clone(), "fallback" => fb.clone()).increment(1);
                    tracing::warn!(server = %primary.spec.name, fallback = %fb, method = %call.method, tool = %tool, "answered by a fallback server");
                    mark_fallback(&mut v, &primary.spec.name, fb, &primary_error.to_string());
                    return Ok(v);
                }
                Err(e) => {
                    tracing::debug!(fallback = %fb, error = %e, "fallback failed")
                }
            }
        }
        Err(primary_error)
    }

    /// What answers for `server` on its own endpoint: the server itself when a process of it
    /// started somewhere, else its first fallback that did (named, for the `_meta` mark).
    pub async fn serving(
        &self,
        principal: &Principal,
        server: &str,
    ) -> (ServerInfo, Option<String>) {
        let info = self.info_waiting(principal, server, Wait::Running).await;
        if info.init.is_some() {
            return (info, None);
        }
        let fallbacks = self
            .scope(principal, server)
            .map(|s| s.spec.fallbacks)
            .unwrap_or_default();
        for fb in fallbacks {
            let fb_info = self.info_waiting(principal, &fb, Wait::Running).await;
            if fb_info.init.is_some() {
                return (fb_info, Some(fb));
            }
        }
        (info, None)
    }

    /// What `server` offers (initialize answer and catalogue), from this node's pool or, for a
    /// server placed elsewhere, from a peer that runs it (cached briefly).
    /// Waits for a process only while the server is on its first start ([`Wait::FirstStart`]).
    pub async fn info(&self, principal: &Principal, server: &str) -> ServerInfo {
        self.info_waiting(principal, server, Wait::FirstStart).await
    }

    /// What `server` offers, for a list of several servers' items: as [`Router::info`], but a
    /// server on its first start is waited for only until [`Wait::Listing`]'s bound.
    pub async fn listing(&self, principal: &Principal, server: &str) -> ServerInfo {
        self.info_waiting(principal, server, Wait::Listing).await
    }

    async fn info_waiting(&self, principal: &Principal, server: &str, wait: Wait) -> ServerInfo {
        let Ok(spec) = self.scope(principal, server) else {
            return ServerInfo::default();
        };
        self.info_of_waiting(&spec, wait).await
    }

    /// Whether server `server` lists `item` for `method`, from what this node knows already
    /// (its own pool's catalogue, or a peer's last answer): never a call. `None` when it does
    /// not know.
    pub fn lists(&self, server: &str, method: &str, item: &str) -> Option<bool> {
        if let Some(pool) = self.pools.get(server) {
            if let Some(known) = pool.catalogue().lists(method, item) {
                return Some(known);
            }
        }
        self.peer_catalogues
            .last(server)
            .and_then(|info| info.catalogue.lists(method, item))
    }

    /// Takes every list of the servers that run on peer `node` and not here as changed, and
    /// tells their clients: the peer's stream of announcements (re)opened, and what it sent
    /// while none was open is lost; or it ended, and what those servers offer here with it.
    fn lists_changed_on(&self, node: u64) {
        let specs: Vec<Versioned<ServerSpec>> = self
            .registry
            .local()
            .state
            .servers
            .values()
            .cloned()
            .collect();
        for spec in specs {
            let replicas = self.replicas(&spec);
            let there = replicas
                .iter()
                .any(|r| matches!(r, Replica::Peer(m) if m.id == node));
            if !there || replicas.iter().any(|r| matches!(r, Replica::Local)) {
                continue;
            }
            self.peer_catalogues.forget(&spec.spec.name);
            for list in crate::pool::catalogue::LISTS {
                self.pools.publish(crate::pool::ServerEvent {
                    server: spec.spec.name.clone(),
                    message: crate::pool::catalogue::list_changed(list),
                    origin: Some(node),
                });
            }
        }
    }

    /// What the server of `spec` offers, for a caller whose right to see it was checked
    /// already (the admin API's catalogue).
    pub async fn info_of(&self, spec: &Versioned<ServerSpec>) -> ServerInfo {
        self.info_of_waiting(spec, Wait::FirstStart).await
    }

    async fn info_of_waiting(&self, spec: &Versioned<ServerSpec>, wait: Wait) -> ServerInfo {
        let server = spec.spec.name.as_str();
        let local = self
            .replicas(spec)
            .into_iter()
            .any(|r| matches!(r, Replica::Local));
        if local {
            if let Some(pool) = self.pools.get(server) {
                let start_bound = Duration::from_millis(spec.spec.timeouts.startup_ms)
                    .min(Duration::from_secs(10));
                let within = match wait {
                    Wait::FirstStart if !pool.first_starting() => Duration::ZERO,
                    Wait::FirstStart | Wait::Running => start_bound,
                    Wait::Listing => pool.first_start_left(
                        Duration::from_millis(self.config.list_wait_ms).min(start_bound),
                    ),
                };
                let starting = pool.first_starting() && pool.init_result().is_none();
                let ready = pool.ready(within).await.is_some();
                if matches!(wait, Wait::Listing) && starting {
                    list_waited(server, ready);
                }
                // The first catalogue load follows readiness closely; give it a moment.
                let init = pool.init_result();
                let catalogue = if init.is_some() {
                    pool.catalogue_loaded(Duration::from_secs(2)).await
                } else {
                    pool.catalogue()
                };
                return ServerInfo { init, catalogue };
            }
        }
        if let Some(info) = self.peer_catalogues.get(server) {
            return info;
        }
        // The first peer's answer with a catalogue; else the last without one.
        let generation = self.peer_catalogues.generation();
        let mut starting = None;
        for replica in self.replicas(spec) {
            let Replica::Peer(m) = replica else { continue };
            let Ok(v) = peer::server_info(&self.channels, &m, server).await else {
                continue;
            };
            if v.is_null() {
                continue;
            }
            let list = |k: &str| v["catalogue"][k].as_array().cloned().unwrap_or_default();
            let info = ServerInfo {
                init: Some(v["init"].clone()).filter(|i| !i.is_null()),
                catalogue: Arc::new(Catalogue {
                    tools: list("tools"),
                    resources: list("resources"),
                    resource_templates: list("resourceTemplates"),
                    prompts: list("prompts"),
                    loaded: v["catalogue"]["loaded"].as_bool().unwrap_or(false),
                }),
            };
            if info.catalogue.loaded {
                self.peer_catalogues.keep(server, info.clone(), generation);
                return info;
            }
            starting = Some(info);
        }
        if let Some(info) = starting {
            self.peer_catalogues.keep(server, info.clone(), generation);
            return info;
        }
        ServerInfo::default()
    }
}

/// Counts a list's wait for a local server that has no process yet, on its first start:
/// `ready` (one came in time) or `gave_up` (the list goes without the server; its clients
/// hear when it comes up).
fn list_waited(server: &str, ready: bool) {
    let outcome = if ready { "ready" } else { "gave_up" };
    tracing::debug!(
        server,
        outcome,
        "a list waited for a server on its first start"
    );
    metrics::counter!("mcpd_route_list_waits_total", "server" => server.to_string(), "outcome" => outcome)
        .increment(1);
}

/// Whether an attempt's outcome is a failure of the server (or its node) itself, for its
/// breaker: it crashed, its connection broke, the node could not be reached, it has no running
/// process, or it gave no answer within its timeout. Not: any answer (a JSON-RPC error or a
/// tool result with `isError` is the server working), a full queue (load, which the queue
/// bound already sheds), a peer's refusal of the caller's credential, or a timeout while the call waited on its own client's answer to a
/// request of the server (elicitation, sampling): one slow or misbehaving client must not
/// open the breaker for every other client of a healthy server.
fn counts_against_the_server(outcome: &Result<Value, CallError>, events: &EventSink) -> bool {
    match outcome {
        Ok(_) | Err(CallError::Answered(_) | CallError::Busy(_) | CallError::Refused(_)) => false,
        Err(CallError::NotRun(_) | CallError::Crashed(_)) => true,
        Err(CallError::TimedOut(_)) => !events.waiting_on_client(),
    }
}

fn fastrand_shuffle<T>(v: &mut [T]) {
    fastrand::shuffle(v);
}
