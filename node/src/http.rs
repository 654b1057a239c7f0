//! A node's HTTP surface, built in one place so every route and layer reads top to bottom:
//! the probes; then, behind the Host check, the console (`crate::console`), the admin API
//! (`crate::api`) and the MCP endpoints (`crate::mcp`); and around all of them the body read timeout, the request
//! metrics and the body size limit.

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;

use crate::api::{self, error::ApiError, host, request_body, AppState};
use crate::mcp::{self, McpState};

/// The limits every request passes.
pub struct Layers {
    pub max_body_bytes: usize,
    pub body_timeout: request_body::BodyTimeout,
    pub hosts: host::HostPolicy,
}

/// Every route of the node.
pub fn router(admin: AppState, mcp: McpState, layers: Layers) -> Router {
    let checked = Router::new()
        .merge(crate::console::router(
            admin.registry.clone(),
            admin.tls != crate::tls::edge::EdgeTlsMode::Off,
        ))
        .merge(api::router(admin.clone()))
        .merge(mcp::router(mcp))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(layers.hosts, host::check));
    Router::new()
        .merge(api::probes(admin))
        .merge(checked)
        .layer(middleware::from_fn_with_state(
            layers.body_timeout,
            request_body::limit,
        ))
        .layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(layers.max_body_bytes))
}

/// Counts and times every request by route template and status.
async fn observe(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    // Bounded label: an unknown method (`curl -X FOO`) must not create a series.
    let method = match req.method().as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("mcpd_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("mcpd_http_request_seconds", "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    resp
}
