//! The POST of both eras: the client's message is parsed, a server the caller may not see is
//! a 404, and the request goes to the era it belongs to, as the 2026 spec's dual-era rules say:
//! a stateless (2026-07-28) request to [`super::stateless`], the rest to [`super::http`].

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use mcpcp_proto::mcp::{code, era_of, Era, ErrorObject, Message};

use super::state::McpState;
use super::target::Target;
use super::wire::{header_str, rpc_error, SESSION_HEADER, VERSION_HEADER};
use crate::api::extract::Authorized;
use crate::identity::surface::Mcp;
use crate::telemetry::InSpanExt;

/// Which era a POST belongs to: a revision header of no session-based revision (older than
/// any, 2024-11-05, excepted) is stateless; so is a request other than `initialize` that
/// carries its revision in `_meta` and no session.
fn era_of_request(headers: &HeaderMap, msg: &Message) -> Era {
    let header = header_str(headers, VERSION_HEADER);
    if header.is_some_and(|v| era_of(v) != Some(Era::Session) && v != "2024-11-05") {
        return Era::Stateless;
    }
    if let Message::Request {
        params: Some(p),
        method,
        ..
    } = msg
    {
        if method != "initialize"
            && p["_meta"]
                .get("io.modelcontextprotocol/protocolVersion")
                .is_some()
            && header_str(headers, SESSION_HEADER).is_none()
        {
            return Era::Stateless;
        }
    }
    Era::Session
}

/// POST: one JSON-RPC message from the client.
pub async fn post(
    State(state): State<McpState>,
    Authorized(principal, Mcp): Authorized<Mcp>,
    target: Target,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = super::http::foreign_origin(&state, &headers) {
        return refused;
    }
    let msg = match Message::parse(&body) {
        Ok(m) => m,
        Err(e) => {
            metrics::counter!("mcpd_mcp_malformed_total").increment(1);
            return rpc_error(
                StatusCode::BAD_REQUEST,
                e.id,
                ErrorObject::new(e.code, e.message),
            );
        }
    };
    if let Target::Server(name) = &target {
        // Another tenant's server does not exist, as far as this caller can tell.
        let route = state.route(&principal, &target);
        if let Err(e) = route.check(name) {
            if e.code == code::INVALID_PARAMS {
                return rpc_error(
                    StatusCode::NOT_FOUND,
                    None,
                    ErrorObject::new(code::INVALID_REQUEST, format!("no server {name:?}")),
                );
            }
        }
    }
    if let Target::Virtual(name) = &target {
        if let Err(e) = state.route(&principal, &target).virtual_server(name) {
            return rpc_error(StatusCode::NOT_FOUND, None, e);
        }
    }
    let era = era_of_request(&headers, &msg);
    let span = request_span(&headers, &msg, &target, era, &principal);
    match era {
        Era::Stateless => {
            super::stateless::post(state, principal, target, headers, msg)
                .in_span(span)
                .await
        }
        Era::Session => {
            super::http::post_session(state, principal, target, headers, msg)
                .in_span(span)
                .await
        }
    }
}

/// The root span of a client's request on this node (`mcp.request`), a child of the
/// caller's trace when it sent one; a disabled span while tracing is off.
fn request_span(
    headers: &HeaderMap,
    msg: &Message,
    target: &Target,
    era: Era,
    principal: &crate::registry::Principal,
) -> tracing::Span {
    let Message::Request { method, params, id } = msg else {
        return tracing::Span::none();
    };
    // The target of the span's name, as the OpenTelemetry MCP conventions have it: a tool or
    // a prompt (a resource's URI is an attribute only: it may name anything).
    let named = |key: &str| {
        params
            .as_ref()
            .and_then(|p| p.get(key))
            .and_then(serde_json::Value::as_str)
    };
    let (tool, prompt, uri) = match method.as_str() {
        "tools/call" => (named("name"), None, None),
        "prompts/get" => (None, named("name"), None),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            (None, None, named("uri"))
        }
        _ => (None, None, None),
    };
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        parent: None,
        "mcp.request",
        otel.name = %match tool.or(prompt) {
            Some(target) => format!("{method} {target}"),
            None => method.clone(),
        },
        otel.kind = "server",
        mcp.method.name = %method,
        mcp.endpoint = %super::wire::endpoint_label(target),
        mcp.era = ?era,
        jsonrpc.request.id = %id,
        gen_ai.tool.name = tool,
        gen_ai.prompt.name = prompt,
        mcp.resource.uri = uri,
        tenant = principal.tenant.as_deref().unwrap_or(""),
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        rpc.response.status_code = tracing::field::Empty,
    );
    crate::telemetry::adopt(
        &span,
        crate::telemetry::propagate::from_request(headers, params.as_ref()),
    );
    span
}
