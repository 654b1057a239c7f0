//! OAuth 2.0 Protected Resource Metadata (RFC 9728), which the MCP authorization spec has a
//! client read after a `401`: at `/.well-known/oauth-protected-resource` for the admin API and
//! at the path-suffixed form for `/mcp` and each `/servers/NAME/mcp`. Public, like any
//! discovery document; it names the resource (behind `identity.public_url` or trusted
//! forwarded headers, as the client sees it) and the trusted issuers that mint tokens for it.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::Json;
use mcpcp_proto::api::scope;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::identity::resource::is_resource;

pub async fn root(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    document(&state, &headers, &uri, "")
}

pub async fn suffixed(
    State(state): State<AppState>,
    Path(suffix): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    document(&state, &headers, &uri, &format!("/{suffix}"))
}

fn document(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    suffix: &str,
) -> Result<Json<Value>, ApiError> {
    let base = state.identity.base(headers, uri);
    let path = base.local_path(suffix);
    if !is_resource(path) {
        return Err(ApiError::NotFound(format!(
            "no protected resource at {path:?}"
        )));
    }
    let scopes: &[&str] = if path.is_empty() {
        &[scope::ADMIN_READ, scope::ADMIN_WRITE]
    } else {
        &[scope::MCP]
    };
    // The tenant whose server (or virtual server) this is, if any.
    let owner = {
        let data = state.registry.local();
        let st = &data.state;
        let named = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|p| p.strip_suffix("/mcp"))
        };
        match (named("/servers/"), named("/v/")) {
            (Some(name), _) => st.servers.get(name).and_then(|s| s.spec.tenant.clone()),
            (_, Some(name)) => st
                .virtual_servers
                .get(name)
                .and_then(|v| v.spec.tenant.clone()),
            _ => None,
        }
    };
    let servers = state.identity.metadata_issuers(owner.as_deref());
    Ok(Json(json!({
        "resource": base.resource(path),
        "authorization_servers": servers,
        "scopes_supported": scopes,
        "bearer_methods_supported": ["header"],
        "resource_name": "mcpd",
    })))
}
