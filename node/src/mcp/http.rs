//! Streamable HTTP on `/mcp` and `/servers/{name}/mcp`: the session-based revisions
//! (2025-06-18, 2025-11-25) here, the stateless 2026-07-28 revision in [`super::stateless`],
//! told apart per request as the 2026 spec's dual-era rules say.
//!
//! - POST a request: JSON when the answer comes first; SSE when the server sends progress,
//!   logging or its own requests (sampling, elicitation, roots) before answering.
//! - POST a notification or a response (to a server request): 202.
//! - GET: the session's standalone SSE stream (list_changed, resources/updated).
//! - DELETE: end the session.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use mcpcp_proto::mcp::{
    code, era_of, versions, Era, ErrorObject, Message, RequestId, LATEST_SESSION_VERSION,
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::call::{Running, Step};
use super::coalesce::ListChanges;
use super::dispatch::Route;
use super::listings::Changed;
use super::session::Session;
use super::state::McpState;
use super::target::Target;
use super::wire::{
    accepts_sse, endpoint_label, header_str, method_label, rpc_error, sse, sse_event, Measure,
    SESSION_HEADER, VERSION_HEADER,
};
use crate::api::extract::Authorized;
use crate::call::CallEvent;
use crate::identity::surface::Mcp;
use crate::pool::ServerEvent;

/// DNS-rebinding protection: a 403 for a browser Origin that is not allowed.
pub fn foreign_origin(state: &McpState, headers: &HeaderMap) -> Option<Response> {
    (!state.origins.allows(headers)).then(|| {
        rpc_error(
            StatusCode::FORBIDDEN,
            None,
            ErrorObject::new(code::INVALID_REQUEST, "Origin not allowed"),
        )
    })
}

/// The cluster's session-signing key.
fn session_key(registry: &crate::registry::Registry) -> Option<Vec<u8>> {
    registry
        .local()
        .state
        .session_key
        .as_deref()
        .and_then(|k| hex::decode(k).ok())
}

/// Replicates a session's changed subscriptions and log level, at most once per
/// `mcp.session_state_interval_ms`: the first change is written at once (before the client's
/// answer), later ones within the interval are coalesced into one write after it. So a client
/// that calls `logging/setLevel` or `resources/subscribe` in a loop costs one Raft write per
/// interval, not one per call (`mcpd_mcp_session_state_writes_total{outcome}`). The answer
/// waits for the first write at most `mcp.session_state_wait_ms`; without a quorum it is
/// answered unconfirmed (`outcome="unconfirmed"`) while the write goes on, which commits if
/// the quorum comes back in time and is otherwise lost, logged, unless a later change writes
/// the state again.
async fn replicate_state(state: &McpState, session: &Arc<Session>) {
    use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
    session.state_dirty.store(true, Release);
    if session.state_pending.swap(true, AcqRel) {
        metrics::counter!("mcpd_mcp_session_state_writes_total", "outcome" => "coalesced")
            .increment(1);
        return;
    }
    let interval = std::time::Duration::from_millis(state.config.session_state_interval_ms);
    let wait = std::time::Duration::from_millis(state.config.session_state_wait_ms);
    let (first_written, written) = tokio::sync::oneshot::channel::<bool>();
    let (state, task_session) = (state.clone(), session.clone());
    // The writer: the first write at once, then one per interval while changes come in; it
    // ends once an interval passes without one. It runs on its own, so a request dropped
    // mid-write (its client went away) cannot leave the session's writes stranded.
    tokio::spawn(async move {
        let session = task_session;
        session.state_dirty.store(false, Release);
        let committed = replicate(&state, &session).await;
        let _ = first_written.send(committed);
        loop {
            tokio::time::sleep(interval).await;
            if session.state_dirty.swap(false, AcqRel) {
                replicate(&state, &session).await;
                continue;
            }
            session.state_pending.store(false, Release);
            // A change that came in between saw the write under way and left it to us.
            if session.state_dirty.load(Acquire) && !session.state_pending.swap(true, AcqRel) {
                continue;
            }
            break;
        }
    });
    // The client's answer waits for the first write, as before coalescing existed, but not
    // for as long as a lost quorum would hold it.
    if wait.is_zero() {
        return;
    }
    match tokio::time::timeout(wait, written).await {
        Ok(Ok(true)) => return,
        // It failed, and `replicate` logged why.
        Ok(_) => {}
        Err(_) => {
            tracing::warn!(session = %super::session::short(&session.id), waited_ms = wait.as_millis() as u64, "answered before the session's state was replicated (no quorum?); the write goes on");
        }
    }
    metrics::counter!("mcpd_mcp_session_state_writes_total", "outcome" => "unconfirmed")
        .increment(1);
}

/// Writes a session's subscriptions and log level to the registry, so another node can
/// continue it; `true` once committed.
async fn replicate(state: &McpState, session: &Session) -> bool {
    let st = crate::registry::state::SessionState {
        subscriptions: session
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        log_level: session
            .log_level
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        ended: false,
        expires_at: crate::registry::now_unix() + crate::registry::state::SESSION_STATE_TTL,
    };
    let cmd = crate::registry::state::Command::PutSessionState {
        id: session.id.clone(),
        state: Some(st),
    };
    metrics::counter!("mcpd_mcp_session_state_writes_total", "outcome" => "written").increment(1);
    match state.registry.write(cmd).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(session = %super::session::short(&session.id), error = %e, "session state not replicated; it will not survive this node");
            false
        }
    }
}

/// The session a request names, checked against the caller and the endpoint. One this node
/// does not have in memory is rebuilt from the registry once this node has applied what was
/// committed before the request (a node just restarted, or behind, would miss the session's
/// latest subscriptions or its end); without quorum, from what it has.
async fn session_of(
    state: &McpState,
    headers: &HeaderMap,
    principal: &crate::registry::Principal,
    target: &Target,
) -> Result<Arc<Session>, Response> {
    let mcp = state;
    let Some(id) = header_str(headers, SESSION_HEADER) else {
        return Err(rpc_error(
            StatusCode::BAD_REQUEST,
            None,
            ErrorObject::new(
                code::INVALID_REQUEST,
                "Mcp-Session-Id header required (send initialize first)",
            ),
        ));
    };
    // Not in memory: a signed id is looked up in what is committed (a forged one costs no
    // round to the leader; it is a 404 below; a node without the key yet catches up first).
    let in_memory = mcp.sessions.get(id);
    if in_memory.is_none()
        && session_key(&state.registry).is_none_or(|k| super::session::Sessions::is_signed(&k, id))
    {
        if let Err(e) = state.registry.barrier().await {
            tracing::warn!(session = %super::session::short(id), error = %e, "continuing a session from this node's registry as it is");
        }
    }
    let replicated = state.registry.local().state.sessions.get(id).cloned();
    if replicated.as_ref().is_some_and(|s| s.ended) {
        // Ended by its client on some node: over everywhere, and what it held from here goes.
        if let Some(ended) = mcp.sessions.remove(id) {
            super::holds::let_go(state, &ended, super::holds::LetGo::Ended);
        }
        return Err(rpc_error(
            StatusCode::NOT_FOUND,
            None,
            ErrorObject::new(code::INVALID_REQUEST, "session ended: initialize again"),
        ));
    }
    let found = in_memory.or_else(|| {
        // Opened on another node (or before a restart): rebuild it from its signed id, and
        // hold its subscriptions from here too.
        let key = session_key(&state.registry)?;
        let continued = mcp
            .sessions
            .recover(&key, id, principal, target, replicated)?;
        Some(match continued {
            super::session::Continued::Rebuilt(session) => {
                super::holds::retake(state, &session);
                session
            }
            super::session::Continued::Found(session) => session,
        })
    });
    match found {
        // A session is bound to the token and endpoint that opened it; anything else is not it.
        Some(s) if s.principal.token_id == principal.token_id && s.target == *target => Ok(s),
        _ => Err(rpc_error(
            StatusCode::NOT_FOUND,
            None,
            ErrorObject::new(
                code::INVALID_REQUEST,
                "session not found (expired or ended): initialize again",
            ),
        )),
    }
}

pub async fn post_session(
    state: McpState,
    principal: crate::registry::Principal,
    target: Target,
    headers: HeaderMap,
    msg: Message,
) -> Response {
    if let Some(v) = header_str(&headers, VERSION_HEADER) {
        if era_of(v) != Some(Era::Session) && v != "2024-11-05" {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                None,
                ErrorObject::new(
                    code::INVALID_REQUEST,
                    format!("unsupported MCP-Protocol-Version {v:?}"),
                )
                .with_data(json!({ "supported": versions() })),
            );
        }
    }
    if let Message::Request { id, method, params } = &msg {
        if method == "initialize" {
            return initialize(&state, principal, target, id.clone(), params.clone()).await;
        }
    }
    let session = match session_of(&state, &headers, &principal, &target).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match msg {
        Message::Notification { method, params } => {
            if method == "notifications/cancelled" {
                let id = params
                    .as_ref()
                    .and_then(|p| serde_json::from_value::<RequestId>(p["requestId"].clone()).ok());
                if let Some(handle) = id.and_then(|id| {
                    session
                        .in_flight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id)
                }) {
                    handle.abort();
                    metrics::counter!("mcpd_mcp_cancellations_total").increment(1);
                }
            }
            StatusCode::ACCEPTED.into_response()
        }
        Message::Response { id, outcome } => {
            if let Some(responder) = session.take_server_request(&id) {
                responder.respond(outcome).await;
            }
            StatusCode::ACCEPTED.into_response()
        }
        Message::Request { id, method, params } => {
            request(
                state, principal, target, session, &headers, id, method, params,
            )
            .await
        }
    }
}

async fn initialize(
    state: &McpState,
    principal: crate::registry::Principal,
    target: Target,
    id: RequestId,
    params: Option<Value>,
) -> Response {
    let params = params.unwrap_or(Value::Null);
    let asked = params["protocolVersion"].as_str().unwrap_or_default();
    let version = if era_of(asked) == Some(Era::Session) {
        asked
    } else {
        LATEST_SESSION_VERSION
    }
    .to_string();
    // (primary, fallback) when a fallback stands in for the server this endpoint names.
    let mut served_by: Option<(String, String)> = None;
    let (server_info, capabilities, instructions) = match &target {
        Target::Aggregate => (
            json!({ "name": "mcpd", "title": "MCP control plane (aggregate)", "version": env!("CARGO_PKG_VERSION") }),
            json!({
                "tools": { "listChanged": true },
                "prompts": { "listChanged": true },
                "resources": { "subscribe": true, "listChanged": true },
                "logging": {},
                "completions": {},
            }),
            Some(format!(
                "Tools and prompts of every server you may use, named server{}name.",
                super::dispatch::SEPARATOR
            )),
        ),
        Target::Virtual(v) => {
            let spec = match state.route(&principal, &target).virtual_server(v) {
                Ok(s) => s,
                Err(e) => return rpc_error(StatusCode::OK, Some(id), e),
            };
            (
                json!({ "name": v, "title": format!("{v} (virtual server)"), "version": env!("CARGO_PKG_VERSION") }),
                json!({ "tools": {} }),
                spec.description,
            )
        }
        Target::Server(name) => {
            let r = state.route(&principal, &target);
            if let Err(e) = r.check(name) {
                return rpc_error(StatusCode::OK, Some(id), e);
            }
            let (info, fallback) = r.serving(name).await;
            let Some(init) = info.init else {
                return rpc_error(
                    StatusCode::OK,
                    Some(id),
                    ErrorObject::new(
                        code::UNAVAILABLE,
                        format!("server {name:?} has no running process on any node"),
                    ),
                );
            };
            let capabilities = match &fallback {
                Some(_) => crate::route::fallback_capabilities(&init["capabilities"]),
                None => init["capabilities"].clone(),
            };
            served_by = fallback.map(|fb| (name.clone(), fb));
            (
                init["serverInfo"].clone(),
                capabilities,
                init["instructions"].as_str().map(String::from),
            )
        }
    };
    let limits = &state.config;
    let carried = params["clientInfo"].to_string().len() + params["capabilities"].to_string().len();
    if carried > limits.max_session_info_bytes {
        metrics::counter!("mcpd_mcp_sessions_refused_total", "reason" => "info_size").increment(1);
        return rpc_error(
            StatusCode::BAD_REQUEST,
            Some(id),
            ErrorObject::new(
                code::INVALID_PARAMS,
                format!(
                    "params.clientInfo and params.capabilities: {carried} bytes, at most {} (mcp.max_session_info_bytes)",
                    limits.max_session_info_bytes
                ),
            ),
        );
    }
    if state.sessions.count_for(&principal) >= limits.max_sessions_per_tenant {
        metrics::counter!("mcpd_mcp_sessions_refused_total", "reason" => "per_tenant").increment(1);
        let mut resp = rpc_error(
            StatusCode::TOO_MANY_REQUESTS,
            Some(id),
            ErrorObject::new(
                code::INVALID_REQUEST,
                format!(
                    "this tenant holds {} live sessions on this node, the most it may (mcp.max_sessions_per_tenant); end unused sessions (DELETE) or retry later",
                    limits.max_sessions_per_tenant
                ),
            ),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return resp;
    }
    let key = session_key(&state.registry);
    let opening = super::session::Opening {
        principal,
        target,
        protocol_version: version.clone(),
        client_info: params["clientInfo"].clone(),
        client_capabilities: params["capabilities"].clone(),
    };
    let session = state.sessions.create(key.as_deref(), opening);
    tracing::info!(session = %super::session::short(&session.id), protocol = %version, client = %params["clientInfo"]["name"], "session opened");
    let mut result = json!({ "protocolVersion": version, "capabilities": capabilities, "serverInfo": server_info });
    if let Some(i) = instructions {
        result["instructions"] = json!(i);
    }
    if let Some((primary, fallback)) = &served_by {
        let reason = format!("server {primary:?} has no running process on any node");
        crate::route::mark_fallback(&mut result, primary, fallback, &reason);
    }
    let mut resp = Json(Message::result(id, result).to_value()).into_response();
    if let Ok(v) = HeaderValue::from_str(&session.id) {
        resp.headers_mut().insert(SESSION_HEADER, v);
    }
    resp
}

#[allow(clippy::too_many_arguments)]
async fn request(
    state: McpState,
    principal: crate::registry::Principal,
    target: Target,
    session: Arc<Session>,
    headers: &HeaderMap,
    id: RequestId,
    method: String,
    params: Option<Value>,
) -> Response {
    let started = std::time::Instant::now();
    let reply = |outcome: Result<Value, ErrorObject>| {
        Json(
            Message::Response {
                id: id.clone(),
                outcome,
            }
            .to_value(),
        )
        .into_response()
    };
    let mut subscribed = None;
    match method.as_str() {
        "ping" => return reply(Ok(json!({}))),
        "logging/setLevel" => {
            let level = params
                .as_ref()
                .and_then(|p| p["level"].as_str())
                .unwrap_or_default();
            if !super::wire::LEVELS.contains(&level) {
                return reply(Err(ErrorObject::new(
                    code::INVALID_PARAMS,
                    format!(
                        "params.level: {level:?} is not one of {:?}",
                        super::wire::LEVELS
                    ),
                )));
            }
            let changed = session
                .log_level
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(level.to_string())
                .as_deref()
                != Some(level);
            if changed {
                replicate_state(&state, &session).await;
            }
            return reply(Ok(json!({})));
        }
        "resources/subscribe" => {
            if let Some(uri) = params.as_ref().and_then(|p| p["uri"].as_str()) {
                let limits = &state.config;
                if uri.len() > limits.max_uri_bytes {
                    metrics::counter!("mcpd_mcp_subscriptions_refused_total", "reason" => "uri_length").increment(1);
                    return reply(Err(ErrorObject::new(
                        code::INVALID_PARAMS,
                        format!(
                            "params.uri: {} bytes, at most {} (mcp.max_uri_bytes)",
                            uri.len(),
                            limits.max_uri_bytes
                        ),
                    )));
                }
                if let Err(e) =
                    session.room_for_subscription(uri, limits.max_subscriptions_per_session)
                {
                    metrics::counter!("mcpd_mcp_subscriptions_refused_total", "reason" => "per_session").increment(1);
                    return reply(Err(e));
                }
                // Kept (and replicated) only once the server has taken it: a URI no server
                // has costs no Raft write.
                subscribed = Some(uri.to_string());
            }
        }
        "resources/unsubscribe" => {
            if let Some(uri) = params.as_ref().and_then(|p| p["uri"].as_str()) {
                let removed = session
                    .subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(uri);
                if removed {
                    replicate_state(&state, &session).await;
                }
            }
        }
        _ => {}
    }
    let mut r = state.route(&principal, &target);
    r.affinity = Some(super::holds::affinity(&state, &session));
    let running = Running::start(r, method.clone(), with_log_level(params, &session));
    let ending = Ending {
        in_flight: InFlight::enter(&session, &id, &running),
        measure: Measure {
            labels: [
                ("method", method_label(&method)),
                ("endpoint", endpoint_label(&target)),
            ],
            started,
        },
        subscribing: subscribed.map(|uri| Subscribing {
            uri,
            state: state.clone(),
            session: session.clone(),
            kept: false,
        }),
    };
    respond(session, id, running, accepts_sse(headers), ending).await
}

/// What is done when a call of a session ends: its metrics, and what the session keeps of it.
struct Ending {
    /// Taken off the session's calls in flight when the call ends, or when its handler is
    /// dropped before.
    in_flight: InFlight,
    measure: Measure,
    /// A `resources/subscribe` the session keeps, and replicates, if the server took it.
    subscribing: Option<Subscribing>,
}

/// A `resources/subscribe` of a session in flight. The session keeps it (and replicates it)
/// when the server took it and the session has room. Otherwise, and when the call ends
/// without its outcome (its client left), the hold the server may have taken is withdrawn
/// (`holds::disown`).
struct Subscribing {
    uri: String,
    state: McpState,
    session: Arc<Session>,
    kept: bool,
}

impl Subscribing {
    /// Keeps the subscription or lets it go; a kept one is replicated before the client's
    /// answer, as `logging/setLevel` is, so that a node killed right after still has it
    /// taken again where the session continues. Only the first change within
    /// `mcp.session_state_interval_ms` waits: later ones are coalesced into one write after
    /// it (`replicate_state`), so a node killed in that window loses them.
    async fn settle(mut self, outcome: &Result<Value, ErrorObject>) {
        if outcome.is_err() {
            return self.disown(super::holds::LetGo::NotKept);
        }
        let cap = self.state.config.max_subscriptions_per_session;
        // Checked again: subscribes of one session that ran side by side share the cap.
        if self.session.room_for_subscription(&self.uri, cap).is_err() {
            return self.disown(super::holds::LetGo::NotKept);
        }
        self.kept = true;
        let added = self
            .session
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.uri.clone());
        if added {
            replicate_state(&self.state, &self.session).await;
        }
    }

    fn disown(mut self, why: super::holds::LetGo) {
        self.kept = true;
        let uri = std::mem::take(&mut self.uri);
        super::holds::disown(&self.state, &self.session, uri, why);
    }
}

impl Drop for Subscribing {
    fn drop(&mut self) {
        if !self.kept {
            let uri = std::mem::take(&mut self.uri);
            super::holds::disown(
                &self.state,
                &self.session,
                uri,
                super::holds::LetGo::Abandoned,
            );
        }
    }
}

/// A call among its session's calls in flight (to cancel on `notifications/cancelled`, and
/// keeping the session from expiring), until it ends however it ends: with its outcome, or
/// dropped with its handler when the client went away before the answer.
struct InFlight {
    session: Arc<Session>,
    id: RequestId,
}

impl InFlight {
    fn enter(session: &Arc<Session>, id: &RequestId, running: &Running) -> InFlight {
        session
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), running.handle());
        InFlight {
            session: session.clone(),
            id: id.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The call's end is the session's last sign of life, not its start: a call longer
        // than the idle timeout does not leave its session to be dropped (letting go of what
        // the call just kept) at the next sweep. Seen before it leaves, so the sweep never
        // finds it neither busy nor fresh.
        self.session.touch();
        self.session
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

async fn end(ending: Ending, outcome: &Result<Value, ErrorObject>) {
    let Ending {
        in_flight,
        measure,
        subscribing,
    } = ending;
    drop(in_flight);
    measure.finish(outcome);
    if let Some(subscribing) = subscribing {
        subscribing.settle(outcome).await;
    }
}

fn cancelled() -> Result<Value, ErrorObject> {
    Err(ErrorObject::new(code::INTERNAL_ERROR, "request cancelled"))
}

/// Turns the call's steps into the HTTP answer: JSON if the outcome comes first, else SSE.
async fn respond(
    session: Arc<Session>,
    id: RequestId,
    mut running: Running,
    sse_ok: bool,
    ending: Ending,
) -> Response {
    let first = loop {
        match running.next().await {
            Some(Step::Event(ev)) if !sse_ok => {
                // A client that cannot take SSE gets no intermediate messages; answer server
                // requests for it so the call can go on.
                if let CallEvent::Request {
                    responder, method, ..
                } = ev
                {
                    let e = ErrorObject::new(
                        code::METHOD_NOT_FOUND,
                        format!("{method}: the client cannot receive requests (no SSE)"),
                    );
                    responder.respond(Err(e)).await;
                }
            }
            other => break other,
        }
    };
    let ev = match first {
        Some(Step::Event(ev)) => ev,
        done => {
            let outcome = match done {
                Some(Step::Done(o)) => o,
                _ => cancelled(),
            };
            end(ending, &outcome).await;
            return Json(Message::Response { id, outcome }.to_value()).into_response();
        }
    };
    // From here the call's messages go through the session's event log: the client reads
    // them live, and a client whose connection dropped resumes with Last-Event-ID. The call
    // goes on when the connection drops (that is not a cancellation in this revision).
    let log = session.log.clone();
    let n = log.open();
    if let Some(msg) = event_message(&session, ev) {
        log.append(n, msg);
    }
    tokio::spawn(async move {
        let outcome = loop {
            match running.next().await {
                Some(Step::Event(ev)) => {
                    if let Some(msg) = event_message(&session, ev) {
                        session.log.append(n, msg);
                    }
                }
                Some(Step::Done(o)) => break o,
                None => break cancelled(),
            }
        };
        end(ending, &outcome).await;
        session.log.append(n, Message::Response { id, outcome });
        session.log.finish(n);
    });
    sse(log
        .follow(n, None)
        .map(|(eid, m)| Ok::<_, Infallible>(sse_event(&m).id(eid))))
}

/// What the client sees of a server message during its call (`None`: filtered out).
fn event_message(session: &Session, ev: CallEvent) -> Option<Message> {
    match ev {
        CallEvent::Notify(msg) => {
            if msg.method() == Some("notifications/message") && !level_passes(session, &msg) {
                return None;
            }
            Some(msg)
        }
        CallEvent::Request {
            method,
            params,
            responder,
        } => {
            let id = session.register_server_request(responder);
            Some(Message::Request { id, method, params })
        }
    }
}

/// The session's log level (`logging/setLevel`) in the request's `_meta`, where a server of
/// the stateless revision reads it (one of the session era ignores it and logs as it does).
fn with_log_level(mut params: Option<Value>, session: &Session) -> Option<Value> {
    let level = session
        .log_level
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let (Some(level), Some(Value::Object(p))) = (level, params.as_mut()) {
        if let Some(meta) = p
            .entry("_meta")
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            meta.insert("io.modelcontextprotocol/logLevel".into(), json!(level));
        }
    }
    params
}

pub fn level_passes(session: &Session, msg: &Message) -> bool {
    let min = session
        .log_level
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    min.is_none_or(|min| super::wire::log_passes(msg, &min))
}

/// GET: the session's standalone stream of server notifications, or the resumption of a
/// stream with `Last-Event-ID`.
pub async fn get(
    State(state): State<McpState>,
    Authorized(principal, Mcp): Authorized<Mcp>,
    target: Target,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = foreign_origin(&state, &headers) {
        return refused;
    }
    if !accepts_sse(&headers) {
        return rpc_error(
            StatusCode::NOT_ACCEPTABLE,
            None,
            ErrorObject::new(code::INVALID_REQUEST, "GET needs Accept: text/event-stream"),
        );
    }
    let session = match session_of(&state, &headers, &principal, &target).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let max = state.config.max_streams_per_session;
    let Some(slot) = super::session::StreamSlot::take(&session, max) else {
        metrics::counter!("mcpd_mcp_streams_refused_total").increment(1);
        let mut resp = rpc_error(
            StatusCode::TOO_MANY_REQUESTS,
            None,
            ErrorObject::new(
                code::INVALID_REQUEST,
                format!("this session holds {max} open streams, the most it may (mcp.max_streams_per_session); close one first"),
            ),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    };
    let log = session.log.clone();
    // Resuming a stream the client lost: a POST's (its answer included) or the standalone one.
    if let Some((n, seq)) =
        header_str(&headers, "last-event-id").and_then(super::session::parse_event_id)
    {
        if log.knows(n) {
            metrics::counter!("mcpd_mcp_stream_resumptions_total").increment(1);
            return sse(log.follow(n, Some(seq)).map(move |(eid, m)| {
                let _held = &slot;
                Ok::<_, Infallible>(sse_event(&m).id(eid))
            }));
        }
    }
    let n = {
        let mut standalone = session.standalone.lock().unwrap_or_else(|p| p.into_inner());
        match *standalone {
            Some(n) if log.knows(n) => n,
            _ => {
                let n = log.open();
                *standalone = Some(n);
                let heard = Heard {
                    hub: state.pools.subscribe(),
                    listings: state.listings.subscribe(),
                };
                let r = state.route(&principal, &target);
                tokio::spawn(forward_hub(heard, Arc::downgrade(&session), n, r));
                n
            }
        }
    };
    let after = log.last_seq(n);
    // The slot lives as long as the stream: it goes back when the client disconnects.
    sse(log.follow(n, after).map(move |(eid, m)| {
        let _held = &slot;
        Ok::<_, Infallible>(sse_event(&m).id(eid))
    }))
}

/// What a session's standalone stream hears: the servers' notifications, and the registry's
/// changes of what endpoints list.
struct Heard {
    hub: broadcast::Receiver<ServerEvent>,
    listings: broadcast::Receiver<Arc<Changed>>,
}

/// Relays the servers' notifications a session cares about into its standalone stream's log
/// (from which every GET on it reads, and a reconnecting client resumes), and tells it when
/// a change of the registry alters its lists (`super::listings`). Ends with the session.
async fn forward_hub(mut heard: Heard, session: std::sync::Weak<Session>, n: u64, r: Route) {
    use broadcast::error::RecvError;
    let mut changes = ListChanges::default();
    loop {
        let due = changes.next_due();
        // What it hears: a server's notification; all three list changes when every list
        // may have changed for this session; or the list changes held until now.
        let messages = tokio::select! {
            ev = heard.hub.recv() => match ev {
                Ok(ev) if r.hears(&ev.server, &ev.message) => vec![ev.message],
                // Nothing for it, but a turn to see whether its session is still there.
                Ok(_) => Vec::new(),
                Err(RecvError::Lagged(missed)) => {
                    // What it missed may have been a change of a list: it lists again.
                    tracing::warn!(missed, "session stream fell behind");
                    Changed::notifications().to_vec()
                }
                Err(RecvError::Closed) => return,
            },
            changed = heard.listings.recv() => match changed {
                Ok(c) if !c.concerns(&r.principal, &r.target) => continue,
                Ok(_) | Err(RecvError::Lagged(_)) => Changed::notifications().to_vec(),
                Err(RecvError::Closed) => return,
            },
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                changes.due(tokio::time::Instant::now())
            }
        };
        let Some(session) = session.upgrade() else {
            return;
        };
        if !session.log.knows(n) {
            // The stream's log was let go (a later GET opens another, with its own relay).
            return;
        }
        for message in messages {
            let wanted = match (&message, message.method()) {
                (Message::Notification { params, .. }, Some("notifications/resources/updated")) => {
                    params
                        .as_ref()
                        .and_then(|p| p["uri"].as_str())
                        .is_some_and(|uri| session.is_subscribed(uri))
                }
                (_, Some(m)) if m.ends_with("/list_changed") => true,
                (_, Some("notifications/message")) => level_passes(&session, &message),
                _ => false,
            };
            if wanted && changes.admit(&message, tokio::time::Instant::now()) {
                session.log.append(n, message);
            }
        }
    }
}

/// DELETE: the client ends its session.
pub async fn delete(
    State(state): State<McpState>,
    Authorized(principal, Mcp): Authorized<Mcp>,
    target: Target,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = foreign_origin(&state, &headers) {
        return refused;
    }
    match session_of(&state, &headers, &principal, &target).await {
        Ok(s) => {
            state.sessions.remove(&s.id);
            super::holds::let_go(&state, &s, super::holds::LetGo::Ended);
            for pool in state.pools.all() {
                pool.release(&s.id).await;
            }
            // A tombstone, so that no node continues it from its signed id any more.
            let cmd = crate::registry::state::Command::PutSessionState {
                id: s.id.clone(),
                state: Some(crate::registry::state::SessionState {
                    ended: true,
                    expires_at: crate::registry::now_unix()
                        + crate::registry::state::SESSION_STATE_TTL,
                    ..Default::default()
                }),
            };
            if let Err(e) = state.registry.write(cmd).await {
                tracing::warn!(session = %super::session::short(&s.id), error = %e, "the end of the session was not replicated; other nodes may still continue it");
            }
            tracing::info!(session = %super::session::short(&s.id), "session ended by the client");
            StatusCode::OK.into_response()
        }
        Err(r) => r,
    }
}
