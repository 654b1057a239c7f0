//! The stateless revision (2026-07-28) on the same endpoints: no `initialize`, no session;
//! each request carries its protocol version and client capabilities in `_meta`, echoed in the
//! `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` headers.
//!
//! - `server/discover` answers what this endpoint offers.
//! - A server's own request during `tools/call`, `prompts/get` or `resources/read` (sampling,
//!   elicitation, roots) becomes a multi-round-trip `input_required` result. The upstream call
//!   stays parked on this node under an opaque `requestState`; the client's retry with
//!   `inputResponses` resumes it. Requests the server makes together (within
//!   `mcp.input_gather_ms` of each other) are asked together. An input key is the server's own string id
//!   of its request when it gave one (so a server names its keys in either era), else `rN`;
//!   answers given for keys not asked yet (a first request may carry them) answer those
//!   requests when they come. The client's capabilities of the request reach the server in
//!   `_meta`, so it can ask only for what the client has; a request for one the client did
//!   not declare ends the call with -32021.
//! - `subscriptions/listen` streams list changes and resource updates.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Instant;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use futures_util::StreamExt;
use mcpcp_proto::mcp::{code, versions, ErrorObject, Message, RequestId, STATELESS_VERSION};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::call::{CallHandle, Running, Step};
use super::coalesce::ListChanges;
use super::listings::Changed;
use super::parked::Parked;
use super::state::McpState;
use super::target::Target;
use super::wire::{
    endpoint_label, header_str, method_label, rpc_error, sse, sse_event, Measure, VERSION_HEADER,
};
use crate::call::CallEvent;
use crate::registry::Principal;
use crate::telemetry::InSpanExt;

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPS: &str = "io.modelcontextprotocol/clientCapabilities";
const META_LOG: &str = "io.modelcontextprotocol/logLevel";
const META_SERVER: &str = "io.modelcontextprotocol/serverInfo";
const META_SUB: &str = "io.modelcontextprotocol/subscriptionId";

/// 2026 error codes.
const HEADER_MISMATCH: i64 = -32020;
const MISSING_CAPABILITY: i64 = -32021;
const UNSUPPORTED_VERSION: i64 = -32022;

/// HTTP status of a JSON-RPC error in this revision.
fn status_of(code: i64) -> StatusCode {
    match code {
        code::METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        code::PARSE_ERROR | code::INVALID_REQUEST | code::INVALID_PARAMS => StatusCode::BAD_REQUEST,
        -32022..=-32020 => StatusCode::BAD_REQUEST,
        // The whole request (one call) was refused by a rate limit or quota.
        code::RATE_LIMITED => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::OK,
    }
}

fn error(id: RequestId, e: ErrorObject) -> Response {
    rpc_error(status_of(e.code), Some(id), e)
}

/// Decodes the `=?base64?...?=` form of a header value.
fn decode_header(v: &str) -> Option<String> {
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .ok()
            .and_then(|b| String::from_utf8(b).ok()),
        None => Some(v.to_string()),
    }
}

/// Checks `_meta` and the routing headers against the body.
fn validate(headers: &HeaderMap, method: &str, params: &Option<Value>) -> Result<(), ErrorObject> {
    let meta = params
        .as_ref()
        .map(|p| &p["_meta"])
        .filter(|m| m.is_object());
    let Some(meta) = meta else {
        return Err(ErrorObject::new(
            code::INVALID_PARAMS,
            "params._meta: required in protocol revision 2026-07-28",
        ));
    };
    let Some(version) = meta[META_VERSION].as_str() else {
        return Err(ErrorObject::new(
            code::INVALID_PARAMS,
            format!("params._meta[\"{META_VERSION}\"]: required"),
        ));
    };
    if !meta[META_CAPS].is_object() {
        return Err(ErrorObject::new(
            code::INVALID_PARAMS,
            format!("params._meta[\"{META_CAPS}\"]: required (an object)"),
        ));
    }
    let mismatch = |what: &str, header: Option<&str>, body: &str| {
        ErrorObject::new(
            HEADER_MISMATCH,
            format!(
                "Header mismatch: {what} header value {:?} does not match body value {body:?}",
                header.unwrap_or("")
            ),
        )
    };
    let hv = header_str(headers, VERSION_HEADER);
    if hv != Some(version) {
        return Err(mismatch("MCP-Protocol-Version", hv, version));
    }
    let hm = header_str(headers, "mcp-method");
    if hm != Some(method) {
        return Err(mismatch("Mcp-Method", hm, method));
    }
    let name_field = match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    };
    if let Some(field) = name_field {
        if let Some(body) = params.as_ref().and_then(|p| p[field].as_str()) {
            let raw = header_str(headers, "mcp-name");
            if raw.and_then(decode_header).as_deref() != Some(body) {
                return Err(mismatch("Mcp-Name", raw, body));
            }
        }
    }
    if version != STATELESS_VERSION {
        return Err(
            ErrorObject::new(UNSUPPORTED_VERSION, "Unsupported protocol version")
                .with_data(json!({ "supported": versions(), "requested": version })),
        );
    }
    Ok(())
}

/// Strips the per-request keys before a request goes to a (session-era) server process
/// (`inputResponses` is taken out before, in [`post`]).
fn upstream_params(mut params: Option<Value>) -> Option<Value> {
    if let Some(p) = params.as_mut().and_then(Value::as_object_mut) {
        p.remove("requestState");
        if let Some(meta) = p.get_mut("_meta").and_then(Value::as_object_mut) {
            // The client's capabilities of this request go on (a server may ask the client
            // only for what it declared), and its log level (a 2026 server logs only to a
            // request that opted in).
            meta.retain(|k, _| {
                !k.starts_with("io.modelcontextprotocol/") || k == META_CAPS || k == META_LOG
            });
            if meta.is_empty() {
                p.remove("_meta");
            }
        }
    }
    params
}

fn server_info() -> Value {
    json!({ "name": "mcpd", "version": env!("CARGO_PKG_VERSION") })
}

/// Marks a result complete, with the hints this revision wants.
fn complete(method: &str, mut result: Value) -> Value {
    if let Some(o) = result.as_object_mut() {
        o.insert("resultType".into(), json!("complete"));
        if method.ends_with("/list") || method == "resources/read" {
            o.entry("ttlMs").or_insert(json!(0));
            o.entry("cacheScope").or_insert(json!("private"));
        }
        let meta = o.entry("_meta").or_insert(json!({}));
        if let Some(m) = meta.as_object_mut() {
            m.insert(META_SERVER.into(), server_info());
        }
    }
    result
}

pub async fn post(
    state: McpState,
    principal: Principal,
    target: Target,
    headers: HeaderMap,
    msg: Message,
) -> Response {
    let (id, method, params) = match msg {
        Message::Request { id, method, params } => (id, method, params),
        Message::Notification { .. } => return StatusCode::ACCEPTED.into_response(),
        Message::Response { id, .. } => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                Some(id),
                ErrorObject::new(code::INVALID_REQUEST, "clients send no responses in 2026-07-28: answer input requests with inputResponses"),
            )
        }
    };
    if let Err(e) = validate(&headers, &method, &params) {
        return error(id, e);
    }
    let m = Measure {
        labels: [
            ("method", method_label(&method)),
            ("endpoint", endpoint_label(&target)),
        ],
        started: Instant::now(),
    };
    let caps = params
        .as_ref()
        .map(|p| p["_meta"][META_CAPS].clone())
        .unwrap_or(Value::Null);
    let log_level = params
        .as_ref()
        .and_then(|p| p["_meta"][META_LOG].as_str())
        .map(String::from);
    match method.as_str() {
        "server/discover" => {
            // (primary, fallback) when a fallback stands in for the server this endpoint names.
            let mut served_by: Option<(String, String)> = None;
            let capabilities = match &target {
                Target::Aggregate => json!({
                    "tools": { "listChanged": true },
                    "prompts": { "listChanged": true },
                    "resources": { "subscribe": true, "listChanged": true },
                    "completions": {},
                }),
                Target::Virtual(v) => {
                    if let Err(e) = state.route(&principal, &target).virtual_server(v) {
                        return error(id, e);
                    }
                    json!({ "tools": {} })
                }
                Target::Server(name) => {
                    let r = state.route(&principal, &target);
                    if let Err(e) = r.check(name) {
                        return error(id, e);
                    }
                    let (info, fallback) = r.serving(name).await;
                    let caps = info
                        .init
                        .map(|i| i["capabilities"].clone())
                        .unwrap_or(json!({}));
                    match fallback {
                        Some(fb) => {
                            served_by = Some((name.clone(), fb));
                            crate::route::fallback_capabilities(&caps)
                        }
                        None => caps,
                    }
                }
            };
            let mut result = json!({
                "resultType": "complete",
                "supportedVersions": versions(),
                "capabilities": capabilities,
                "ttlMs": 60_000,
                "cacheScope": "private",
                "_meta": { META_SERVER: server_info() },
            });
            if let Some((primary, fallback)) = &served_by {
                let reason = format!("server {primary:?} has no running process on any node");
                crate::route::mark_fallback(&mut result, primary, fallback, &reason);
            }
            m.finish(&Ok(result.clone()));
            Json(Message::result(id, result).to_value()).into_response()
        }
        "subscriptions/listen" => listen(state, principal, target, id, params),
        "initialize"
        | "ping"
        | "logging/setLevel"
        | "resources/subscribe"
        | "resources/unsubscribe" => error(
            id,
            ErrorObject::new(
                code::METHOD_NOT_FOUND,
                format!("{method} does not exist in protocol revision 2026-07-28"),
            ),
        ),
        _ => {
            // Taken out of the params: the answers are the gateway's, never the server's.
            let mut params = params;
            let given = params
                .as_mut()
                .and_then(Value::as_object_mut)
                .and_then(|p| p.remove("inputResponses"));
            let answers = match given {
                None => serde_json::Map::new(),
                Some(Value::Object(answers)) => {
                    if let Some(key) = answers.iter().find(|(_, a)| !a.is_object()).map(|(k, _)| k)
                    {
                        return error(id, ErrorObject::new(code::INVALID_PARAMS, format!("params.inputResponses.{key}: must be an object (the result of the request asked under that key)")));
                    }
                    answers
                }
                Some(_) => {
                    return error(
                        id,
                        ErrorObject::new(
                            code::INVALID_PARAMS,
                            "params.inputResponses: must be an object of answers by input key",
                        ),
                    );
                }
            };
            let resume = params
                .as_ref()
                .and_then(|p| p["requestState"].as_str())
                .map(String::from);
            let parked = match resume {
                Some(token) => match state.parked.take(&token, &principal.token_id) {
                    Some(mut p) => {
                        // A call that ended while parked (its request timed out upstream) has
                        // no question left to answer: an answer written now could reach a
                        // later question of the same id on that process, another caller's.
                        let ended = p.running.handle().is_finished();
                        let mut answers = answers;
                        for (key, responder) in std::mem::take(&mut p.pending) {
                            match answers.remove(&key) {
                                Some(_) if ended => {}
                                Some(a) => {
                                    p.asks.remove(&key);
                                    responder.respond(Ok(a)).await;
                                }
                                None => {
                                    p.pending.insert(key, responder);
                                }
                            }
                        }
                        // Answers for questions not asked yet count on a first request only.
                        p
                    }
                    None => {
                        return error(
                            id,
                            ErrorObject::new(code::INVALID_PARAMS, "params.requestState: unknown or expired (start the request again without it)"),
                        )
                    }
                },
                None if answers.len() > state.config.max_answers_ahead => {
                    metrics::counter!("mcpd_mcp_input_refused_total", "reason" => "answers_ahead").increment(1);
                    return error(
                        id,
                        ErrorObject::new(code::INVALID_PARAMS, format!("params.inputResponses: {} answers ahead of the server's questions, at most {} (mcp.max_answers_ahead)", answers.len(), state.config.max_answers_ahead)),
                    );
                }
                None => Parked {
                    principal: principal.token_id.clone(),
                    running: Running::start(state.route(&principal, &target), method.clone(), upstream_params(params)),
                    pending: HashMap::new(),
                    asks: HashMap::new(),
                    answers,
                    used: Default::default(),
                    next_key: 0,
                    created: Instant::now(),
                },
            };
            drive(state, id, method, parked, caps, log_level, m).await
        }
    }
}

/// What a running call does next, as far as the client's answer is concerned.
enum Next {
    /// A notification for the client (progress, logging) before the outcome.
    Note(Message),
    /// The call ended.
    Outcome(Result<Value, ErrorObject>),
    /// The server asked the client something: answer `input_required` and park the call.
    InputRequired,
}

/// Aborts a running call when dropped armed: in this revision a client that closes its
/// response stream has cancelled the request, so the call is cancelled upstream too.
struct AbortOnDrop(Option<CallHandle>);

impl AbortOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            if !task.is_finished() {
                task.abort();
                metrics::counter!("mcpd_mcp_cancellations_total").increment(1);
            }
        }
    }
}

/// One call of this revision between its steps and the client's answer.
struct Drive {
    state: McpState,
    id: RequestId,
    method: String,
    parked: Parked,
    caps: Value,
    log_level: Option<String>,
    m: Measure,
    mrtr: bool,
    abort: AbortOnDrop,
    /// Until when further questions are waited for, once the first is asked.
    gather_until: Option<tokio::time::Instant>,
    /// How long that is (`mcp.input_gather_ms`).
    gather: std::time::Duration,
}

impl Drive {
    /// Waits for the next step that matters to the client.
    async fn next(&mut self) -> Next {
        loop {
            // The window opens with the first question and does not move with later events.
            let step = match self.gather_until {
                None => self.parked.running.next().await,
                Some(until) => {
                    match tokio::time::timeout_at(until, self.parked.running.next()).await {
                        Ok(step) => step,
                        Err(_) => return Next::InputRequired,
                    }
                }
            };
            match step {
                Some(Step::Done(o)) => return Next::Outcome(o),
                None => {
                    return Next::Outcome(Err(ErrorObject::new(
                        code::INTERNAL_ERROR,
                        "request cancelled",
                    )))
                }
                Some(Step::Event(CallEvent::Notify(msg))) => {
                    // A log line only for a request that opted in, at or above its level.
                    let passes = msg.method() != Some("notifications/message")
                        || self
                            .log_level
                            .as_deref()
                            .is_some_and(|min| super::wire::log_passes(&msg, min));
                    if passes {
                        return Next::Note(msg);
                    }
                }
                Some(Step::Event(CallEvent::Request {
                    method: asked,
                    params,
                    responder,
                })) => {
                    let cap = match asked.as_str() {
                        "sampling/createMessage" => "sampling",
                        "elicitation/create" => "elicitation",
                        "roots/list" => "roots",
                        _ => "",
                    };
                    if !self.mrtr || cap.is_empty() {
                        let why = format!("{asked}: not available to this request");
                        responder
                            .respond(Err(ErrorObject::new(code::METHOD_NOT_FOUND, why)))
                            .await;
                        continue;
                    }
                    if self.caps.get(cap).is_none() && cap == "roots" {
                        // A server of the session revisions asks for roots when it connects
                        // or hears they changed, not for the call that happens to be in
                        // flight on its shared connection: it is told no, and the call goes on.
                        let why = format!("{asked}: this request's client declared no roots");
                        responder
                            .respond(Err(ErrorObject::new(code::METHOD_NOT_FOUND, why)))
                            .await;
                        continue;
                    }
                    if self.caps.get(cap).is_none() {
                        // The call needs what the client did not declare: the server refuses
                        // the request (SEP-2575), so the call upstream is cancelled (its
                        // question answered first, so that it is not left waiting).
                        let why = format!(
                            "{asked}: the client did not declare the {cap} capability for this request"
                        );
                        responder
                            .respond(Err(ErrorObject::new(code::METHOD_NOT_FOUND, why.clone())))
                            .await;
                        self.parked.running.handle().abort();
                        return Next::Outcome(Err(ErrorObject::new(MISSING_CAPABILITY, why)
                            .with_data(json!({ "requiredCapabilities": { cap: {} } }))));
                    }
                    let named = responder
                        .name()
                        .filter(|n| {
                            !n.is_empty() && n.len() <= 128 && !self.parked.used.contains(*n)
                        })
                        .map(String::from);
                    let key = match named {
                        Some(n) => {
                            // Answered ahead, under the server's own name: no round trip.
                            if let Some(answer) = self.parked.answers.remove(&n) {
                                self.parked.used.insert(n);
                                responder.respond(Ok(answer)).await;
                                continue;
                            }
                            n
                        }
                        None => loop {
                            let k = format!("r{}", self.parked.next_key);
                            self.parked.next_key += 1;
                            if !self.parked.used.contains(&k) {
                                break k;
                            }
                        },
                    };
                    self.parked.used.insert(key.clone());
                    self.parked
                        .asks
                        .insert(key.clone(), json!({ "method": asked, "params": params }));
                    self.parked.pending.insert(key, responder);
                    self.gather_until
                        .get_or_insert_with(|| tokio::time::Instant::now() + self.gather);
                }
            }
        }
    }

    /// The last message of the answer: the outcome, or (`None`) `input_required`, which
    /// parks the call for the client's retry.
    fn finish(mut self, outcome: Option<Result<Value, ErrorObject>>) -> Message {
        self.abort.disarm();
        match outcome {
            Some(outcome) => {
                self.m.finish(&outcome);
                let method = self.method;
                let outcome = outcome.map(|r| complete(&method, r)).map_err(|mut e| {
                    if e.code == code::RESOURCE_NOT_FOUND {
                        e.code = code::INVALID_PARAMS;
                    }
                    e
                });
                Message::Response {
                    id: self.id,
                    outcome,
                }
            }
            None => {
                let asks: serde_json::Map<String, Value> = self
                    .parked
                    .pending
                    .keys()
                    .filter_map(|k| self.parked.asks.get(k).map(|a| (k.clone(), a.clone())))
                    .collect();
                // Nobody polls a parked call: it goes on in its own task until the retry.
                self.parked.running.detach();
                let questions = asks.len() as u64;
                match self.state.parked.put(self.parked) {
                    Ok(token) => {
                        metrics::counter!("mcpd_mcp_input_required_total").increment(1);
                        metrics::counter!("mcpd_mcp_input_questions_total").increment(questions);
                        Message::result(
                            self.id,
                            json!({ "resultType": "input_required", "inputRequests": asks, "requestState": token }),
                        )
                    }
                    Err(refused) => {
                        metrics::counter!("mcpd_mcp_input_refused_total", "reason" => "parked_per_caller").increment(1);
                        let retry_after_ms = refused.retry_after.as_millis().max(1) as u64;
                        let e = ErrorObject::new(code::RATE_LIMITED, refused.to_string())
                            .with_data(json!({
                                "limit": "mcp.max_parked_calls_per_caller",
                                "kind": "concurrency",
                                "retryAfterMs": retry_after_ms,
                            }));
                        let outcome = Err(e);
                        self.m.finish(&outcome);
                        Message::Response {
                            id: self.id,
                            outcome,
                        }
                    }
                }
            }
        }
    }
}

/// A complete answer as JSON, with the HTTP status of its error if it is one (and for a
/// rate limit's refusal, `Retry-After` in whole seconds).
fn json_answer(answer: Message) -> Response {
    let (status, retry_after) = match &answer {
        Message::Response {
            outcome: Err(e), ..
        } => (status_of(e.code), retry_after_s(e)),
        _ => (StatusCode::OK, None),
    };
    let mut response = (status, Json(answer.to_value())).into_response();
    if let Some(s) = retry_after {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, s.into());
    }
    response
}

/// The seconds a rate limit's refusal asks the client to wait (`data.retryAfterMs`, rounded up).
fn retry_after_s(e: &ErrorObject) -> Option<u64> {
    if e.code != code::RATE_LIMITED {
        return None;
    }
    let ms = e.data.as_ref()?["retryAfterMs"].as_u64()?;
    Some(ms.div_ceil(1000).max(1))
}

/// Runs a call until it answers or needs the client's input (an `input_required` result; the
/// call stays parked for the retry). The answer is JSON when the outcome comes first, and an
/// SSE stream when notifications (progress, logging) come first, each sent as it happens.
/// A client that goes away before the end cancels the call upstream.
async fn drive(
    state: McpState,
    id: RequestId,
    method: String,
    parked: Parked,
    caps: Value,
    log_level: Option<String>,
    m: Measure,
) -> Response {
    let mrtr = matches!(
        method.as_str(),
        "tools/call" | "prompts/get" | "resources/read"
    );
    let abort = AbortOnDrop(Some(parked.running.handle()));
    let gather = std::time::Duration::from_millis(state.config.input_gather_ms);
    let mut d = Drive {
        state,
        id,
        method,
        parked,
        caps,
        log_level,
        m,
        mrtr,
        abort,
        gather_until: None,
        gather,
    };
    let first = match d.next().await {
        Next::Note(msg) => msg,
        Next::Outcome(o) => return json_answer(d.finish(Some(o))),
        Next::InputRequired => return json_answer(d.finish(None)),
    };
    // Notifications first: stream them as they come, then the last message. Dropping the
    // stream (the client disconnected) drops `d`, whose armed guard cancels the call.
    let stream = futures_util::stream::unfold((Some(first), Some(d)), |(pending, d)| async move {
        if let Some(msg) = pending {
            return Some((msg, (None, d)));
        }
        let mut d = d?;
        match d.next().await {
            Next::Note(msg) => Some((msg, (None, Some(d)))),
            Next::Outcome(o) => Some((d.finish(Some(o)), (None, None))),
            Next::InputRequired => Some((d.finish(None), (None, None))),
        }
    })
    .map(|msg| Ok::<_, Infallible>(sse_event(&msg)));
    sse(stream)
}

/// `subscriptions/listen`: an SSE stream of the notifications the client asked for.
fn listen(
    state: McpState,
    principal: Principal,
    target: Target,
    id: RequestId,
    params: Option<Value>,
) -> Response {
    let wanted = params
        .as_ref()
        .map(|p| p["notifications"].clone())
        .unwrap_or(Value::Null);
    let flag = |k: &str| wanted[k].as_bool().unwrap_or(false);
    let (tools, prompts, resources) = (
        flag("toolsListChanged"),
        flag("promptsListChanged"),
        flag("resourcesListChanged"),
    );
    let uris: Vec<String> = wanted["resourceSubscriptions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    // Each URI may be held on the servers' processes as long as they run: as bounded as a
    // session's subscriptions.
    let limits = &state.config;
    if uris.len() > limits.max_subscriptions_per_session {
        metrics::counter!("mcpd_mcp_subscriptions_refused_total", "reason" => "per_listen")
            .increment(1);
        let e = ErrorObject::new(
            code::INVALID_PARAMS,
            format!(
                "params.notifications.resourceSubscriptions: {} URIs, at most {} (mcp.max_subscriptions_per_session)",
                uris.len(),
                limits.max_subscriptions_per_session
            ),
        );
        return error(id, e);
    }
    if let Some(long) = uris.iter().find(|u| u.len() > limits.max_uri_bytes) {
        metrics::counter!("mcpd_mcp_subscriptions_refused_total", "reason" => "uri_length")
            .increment(1);
        let e = ErrorObject::new(
            code::INVALID_PARAMS,
            format!(
                "params.notifications.resourceSubscriptions: a URI of {} bytes, at most {} (mcp.max_uri_bytes)",
                long.len(),
                limits.max_uri_bytes
            ),
        );
        return error(id, e);
    }
    let mut granted = serde_json::Map::new();
    for (k, on) in [
        ("toolsListChanged", tools),
        ("promptsListChanged", prompts),
        ("resourcesListChanged", resources),
    ] {
        if on {
            granted.insert(k.into(), json!(true));
        }
    }
    let sub_id = json!(id);
    let r = state.route(&principal, &target);
    let (tx, rx) = mpsc::channel::<Message>(256);
    // Listening to the hub before subscribing upstream: no update can fall in between.
    let mut hub = state.pools.subscribe();
    let mut listings = state.listings.subscribe();
    // The subscriptions upstream belong to this request's trace; the stream that follows does
    // not keep its span open.
    let request_span = crate::telemetry::current();
    tokio::spawn(async move {
        // The servers send `notifications/resources/updated` only for what they were asked to
        // watch: subscribe upstream, and honor the URIs whose server accepted.
        let uris = subscribe_upstream(&r, uris).in_span(request_span).await;
        if !uris.is_empty() {
            granted.insert("resourceSubscriptions".into(), json!(uris));
        }
        let ack = Message::notification(
            "notifications/subscriptions/acknowledged",
            Some(json!({ "_meta": { META_SUB: sub_id }, "notifications": granted })),
        );
        if tx.send(ack).await.is_err() {
            return;
        }
        let wanted = Wanted {
            tools,
            prompts,
            resources,
            uris,
        };
        metrics::gauge!("mcpd_mcp_listen_streams").increment(1.0);
        let mut changes = ListChanges::default();
        'stream: loop {
            use tokio::sync::broadcast::error::RecvError;
            let due = changes.next_due();
            let messages = tokio::select! {
                ev = hub.recv() => match ev {
                    Ok(ev) if r.hears(&ev.server, &ev.message) => vec![ev.message],
                    Ok(_) => continue,
                    // What it missed may have been a change of a list: it lists again.
                    Err(RecvError::Lagged(_)) => Changed::notifications().to_vec(),
                    Err(RecvError::Closed) => break,
                },
                changed = listings.recv() => match changed {
                    Ok(c) if !c.concerns(&r.principal, &r.target) => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => Changed::notifications().to_vec(),
                    Err(RecvError::Closed) => break,
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    changes.due(tokio::time::Instant::now())
                }
                _ = tx.closed() => break,
            };
            for message in messages {
                if !wanted.passes(&message) || !changes.admit(&message, tokio::time::Instant::now())
                {
                    continue;
                }
                if !relay(&tx, message, &wanted, &sub_id).await {
                    break 'stream;
                }
            }
        }
        metrics::gauge!("mcpd_mcp_listen_streams").decrement(1.0);
    });
    let stream =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(|m| Ok::<_, Infallible>(sse_event(&m)));
    sse(stream)
}

/// What a `subscriptions/listen` stream asked to hear: the list changes it named, and the
/// updates of the URIs whose server took its subscription.
struct Wanted {
    tools: bool,
    prompts: bool,
    resources: bool,
    uris: Vec<String>,
}

impl Wanted {
    fn passes(&self, message: &Message) -> bool {
        match message.method().unwrap_or_default() {
            "notifications/tools/list_changed" => self.tools,
            "notifications/prompts/list_changed" => self.prompts,
            "notifications/resources/list_changed" => self.resources,
            "notifications/resources/updated" => match message {
                Message::Notification {
                    params: Some(p), ..
                } => p["uri"]
                    .as_str()
                    .is_some_and(|u| self.uris.iter().any(|x| x == u)),
                _ => false,
            },
            _ => false,
        }
    }
}

/// Sends one notification down a `subscriptions/listen` stream if it was asked for, marked
/// with the stream's id; `false` once the stream is gone.
async fn relay(
    tx: &mpsc::Sender<Message>,
    message: Message,
    wanted: &Wanted,
    sub_id: &Value,
) -> bool {
    if !wanted.passes(&message) {
        return true;
    }
    let Message::Notification { method, params } = message else {
        return true;
    };
    let mut params = params.unwrap_or(json!({}));
    params["_meta"][META_SUB] = sub_id.clone();
    tx.send(Message::notification(method, Some(params)))
        .await
        .is_ok()
}

/// Sends `resources/subscribe` for each URI to the server that owns it; returns the URIs
/// whose server accepted. Upstream subscriptions are not withdrawn when the stream closes
/// (other listeners and sessions may share them); the hub filters per stream.
async fn subscribe_upstream(r: &super::dispatch::Route, uris: Vec<String>) -> Vec<String> {
    let calls = uris.into_iter().map(|uri| async move {
        let (events, _ignored) = mpsc::channel(1);
        let params = json!({ "uri": uri });
        match r
            .dispatch(
                "resources/subscribe",
                Some(params),
                crate::call::EventSink::new(events),
            )
            .await
        {
            Ok(_) => Some(uri),
            Err(e) => {
                tracing::info!(%uri, error = %e.message, "resource subscription not honored");
                None
            }
        }
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}
