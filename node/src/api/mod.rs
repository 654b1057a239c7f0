//! The HTTP surface of a node (axum): the admin API under `/v1/`, probes and `/metrics`.
//! The router is built in one place, [`router`], so every route and layer reads top to bottom.

pub mod body_timeout;
pub mod cluster;
pub mod error;
pub mod extract;
pub mod health;
pub mod host;
pub mod listener;
pub mod objects;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::registry::Registry;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub metrics: PrometheusHandle,
    pub mcp: crate::mcp::McpState,
    /// The edge's TLS mode, reported by `/readyz`.
    pub tls: crate::tls::edge::EdgeTlsMode,
    /// The node's data directory (a pending admin recovery is read from it).
    pub data_dir: std::path::PathBuf,
    /// Seals server `env` values before they are written (see `crate::seal`).
    pub data_key: crate::seal::DataKey,
    /// This node's certificates, for rotation.
    pub certs: crate::tls::Certificates,
}

/// Counts and times every request by route template and status.
async fn observe(State(_): State<AppState>, req: Request, next: Next) -> Response {
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

/// Every route, behind the Host check (probes excepted: a load balancer or kubelet probes a
/// node by whatever address it has) and the request metrics.
pub fn router(
    state: AppState,
    max_body_bytes: usize,
    body_timeout: body_timeout::BodyTimeout,
    hosts: host::HostPolicy,
) -> Router {
    use cluster as c;
    use objects as o;
    let v1 = Router::new()
        .route("/node", get(c::node_info))
        .route("/node/rotate-certs", post(c::rotate_certs))
        .route("/cluster/init", post(c::init))
        .route("/cluster/recover-admin", post(c::recover_admin))
        .route("/cluster/join-tokens", post(c::create_join_token))
        .route("/cluster/join", post(c::join))
        .route("/cluster/status", get(c::status))
        .route("/cluster/nodes", post(c::add_node))
        .route("/cluster/nodes/{id}", axum::routing::delete(c::remove_node))
        .route("/watch", get(c::watch))
        .route("/servers", get(o::list_servers).post(o::create_server))
        .route(
            "/servers/{name}",
            get(o::get_server)
                .put(o::put_server)
                .patch(o::patch_server)
                .delete(o::delete_server),
        )
        .route("/servers/{name}/status", get(o::server_status))
        .route("/tenants", get(o::list_tenants).post(o::create_tenant))
        .route(
            "/tenants/{name}",
            get(o::get_tenant).delete(o::delete_tenant),
        )
        .route("/tokens", get(o::list_tokens).post(o::create_token))
        .route("/tokens/{id}", get(o::get_token).delete(o::revoke_token));
    let checked = Router::new()
        .nest("/v1", v1)
        .merge(crate::mcp::router())
        .route("/metrics", get(health::metrics))
        .fallback(|| async { error::ApiError::NotFound("no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(hosts, host::check));
    Router::new()
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .merge(checked)
        .layer(middleware::from_fn_with_state(
            body_timeout,
            body_timeout::limit,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}
