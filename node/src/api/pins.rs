//! Tool pinning (`crate::pinning`): `GET /v1/servers/{name}/diff` shows a server's tools now
//! against the approved ones; `PUT /v1/servers/{name}/pins` approves a set of tool definitions
//! (what `mcpctl server approve` saw in the diff, so a tool that changed in between stays
//! held); `DELETE` stops checking the server's tools. A tenant admin approves its own tenant's
//! servers.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use mcpcp_proto::api::{ToolDiff, ToolPins, WriteAck};

use super::error::ApiError;
use super::extract::{precondition, ApiJson, Authorized, RemoteAddr};
use super::objects::{stored, write};
use super::AppState;
use crate::identity::surface::{ObjectRead, ObjectWrite};
use crate::registry::state::{Command, Precondition};
use crate::registry::{validate, Principal};

/// The server `name`, if `caller` may approve its tools.
fn approvable(state: &AppState, caller: &Principal, name: &str) -> Result<(), ApiError> {
    let spec = stored(state, caller, name)
        .ok_or_else(|| ApiError::NotFound(format!("server {name:?} not found")))?;
    if !caller.owns(spec.spec.tenant.as_deref()) {
        return Err(ApiError::Forbidden(format!(
            "a {} approves the tools of its own tenant's servers only",
            caller.role
        )));
    }
    Ok(())
}

pub async fn diff(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(name): Path<String>,
) -> Result<Json<ToolDiff>, ApiError> {
    let spec = stored(&state, &caller, &name)
        .ok_or_else(|| ApiError::NotFound(format!("server {name:?} not found")))?;
    let info = state.router.info_of(&spec).await;
    let pins = state.registry.local().state.tool_pins.get(&name).cloned();
    Ok(Json(ToolDiff {
        server: name,
        pinned: pins.is_some(),
        loaded: info.catalogue.loaded,
        revision: pins.as_ref().map(|p| p.revision),
        tools: crate::pinning::diff(pins.as_ref().map(|p| &p.spec), &info.catalogue.tools),
    }))
}

pub async fn put(
    State(state): State<AppState>,
    Authorized(caller, ObjectWrite): Authorized<ObjectWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(pins): ApiJson<ToolPins>,
) -> Result<Json<WriteAck>, ApiError> {
    approvable(&state, &caller, &name)?;
    validate::tool_pins(&pins)?;
    let command = Command::PutToolPins {
        server: name,
        pins,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Authorized(caller, ObjectWrite): Authorized<ObjectWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WriteAck>, ApiError> {
    approvable(&state, &caller, &name)?;
    let command = Command::DeleteToolPins {
        server: name,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}
