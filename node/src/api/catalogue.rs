//! `GET /v1/servers/{name}/catalogue`: a server's tools, resources and prompts as it lists them
//! (`crate::route::Router::info_of`: this node's pool, or a peer's that runs it), for the
//! console and `mcpctl`. Policies that hide items from MCP clients do not apply here: this is
//! the operator's view of the server.

use axum::extract::{Path, State};
use axum::Json;
use mcpcp_proto::api::ServerCatalogue;

use super::error::ApiError;
use super::extract::Authorized;
use super::AppState;
use crate::identity::surface::ObjectRead;

pub async fn get(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(name): Path<String>,
) -> Result<Json<ServerCatalogue>, ApiError> {
    let spec = super::objects::stored(&state, &caller, &name)
        .ok_or_else(|| ApiError::NotFound(format!("server {name:?} not found")))?;
    let info = state.router.info_of(&spec).await;
    let c = &info.catalogue;
    Ok(Json(ServerCatalogue {
        name,
        loaded: c.loaded,
        tools: c.tools.clone(),
        resources: c.resources.clone(),
        resource_templates: c.resource_templates.clone(),
        prompts: c.prompts.clone(),
    }))
}
