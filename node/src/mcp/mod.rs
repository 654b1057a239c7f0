//! The MCP data plane's front end: Streamable HTTP on every node.
//!
//! - `/mcp`: the aggregate of every server the caller's tenant may use (names `server__tool`).
//! - `/servers/{name}/mcp`: one server, names unchanged.
//!
//! Top to bottom:
//! - [`endpoint`] takes each POST and tells the eras apart; [`http`] serves the session-based
//!   revisions (2025-06-18, 2025-11-25), [`stateless`] the stateless one (2026-07-28), with
//!   its parked multi-round-trip calls in [`parked`].
//! - Both hand requests to [`call`], which runs a request as a stream of steps, and
//!   [`dispatch`], which names the server and hands a [`crate::call::Call`] to the router.
//! - [`session`], [`target`], [`wire`] and [`state`] are what they share; [`listings`] tells
//!   both eras' listeners when the registry changes what an endpoint lists.

pub mod call;
pub mod coalesce;
pub mod dispatch;
pub mod endpoint;
pub mod holds;
pub mod http;
pub mod listings;
pub mod parked;
pub mod session;
pub mod state;
pub mod stateless;
pub mod target;
pub mod wire;

use axum::routing::post;
use axum::Router as HttpRouter;

pub use state::{housekeeping, McpConfig, McpState};

/// The MCP routes, with their state.
pub fn router<S: Clone + Send + Sync + 'static>(state: McpState) -> HttpRouter<S> {
    HttpRouter::new()
        .route(
            "/mcp",
            post(endpoint::post).get(http::get).delete(http::delete),
        )
        .route(
            "/servers/{name}/mcp",
            post(endpoint::post).get(http::get).delete(http::delete),
        )
        .route(
            "/v/{vname}/mcp",
            post(endpoint::post).get(http::get).delete(http::delete),
        )
        .with_state(state)
}
