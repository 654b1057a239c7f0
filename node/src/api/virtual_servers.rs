//! Virtual servers (`/v1/virtual-servers`): named, curated sets of tools from several servers,
//! served at `/v/NAME/mcp` (`crate::mcp::dispatch`). A tenant admin writes its own tenant's,
//! naming only servers its tenant may use; a caller reaches through one only what it may use
//! anyway.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use mcpcp_proto::api::{List, Versioned, VirtualServerSpec, WriteAck};

use super::error::ApiError;
use super::extract::{
    precondition, read_barrier, same_name, ApiJson, ApiQuery, Authorized, ReadParams, RemoteAddr,
};
use super::objects::write;
use super::visible::{found, listed};
use super::AppState;
use crate::identity::surface::{ObjectRead, ObjectWrite};
use crate::registry::state::{Command, Precondition};
use crate::registry::{validate, Principal};

/// Validates `spec` for `caller`: a tenant admin's own tenant, servers that tenant may use.
fn checked(state: &AppState, caller: &Principal, spec: &VirtualServerSpec) -> Result<(), ApiError> {
    validate::virtual_server_spec(spec)?;
    if !caller.owns(spec.tenant.as_deref()) {
        return Err(ApiError::Forbidden(format!(
            "a {} writes virtual servers of its own tenant only: set \"tenant\": {:?}",
            caller.role,
            caller.tenant.as_deref().unwrap_or("")
        )));
    }
    let data = state.registry.local();
    for (i, t) in spec.tools.iter().enumerate() {
        let usable = data.state.servers.get(&t.server).is_some_and(|s| {
            caller.sees(s.spec.tenant.as_deref())
                && (s.spec.tenant.is_none() || s.spec.tenant == spec.tenant)
        });
        if !usable {
            return Err(validate::FieldError::new(
                format!("tools[{i}].server"),
                format!(
                    "no server {:?} that the virtual server's callers may use",
                    t.server
                ),
            )
            .into());
        }
    }
    Ok(())
}

pub async fn list(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<Versioned<VirtualServerSpec>>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    Ok(Json(listed(
        data.state.revision,
        &data.state.virtual_servers,
        |v| caller.sees(v.tenant.as_deref()),
    )))
}

pub async fn get(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<Versioned<VirtualServerSpec>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    found(&data.state.virtual_servers, &name, "virtual server", |v| {
        caller.sees(v.tenant.as_deref())
    })
    .map(Json)
}

pub async fn create(
    State(state): State<AppState>,
    Authorized(caller, ObjectWrite): Authorized<ObjectWrite>,
    from: RemoteAddr,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<VirtualServerSpec>,
) -> Result<(StatusCode, Json<WriteAck>), ApiError> {
    checked(&state, &caller, &spec)?;
    let command = Command::PutVirtualServer {
        spec,
        precondition: Precondition::Absent,
    };
    let ack = write(&state, &headers, (&caller, &from), command).await?;
    Ok((StatusCode::CREATED, Json(ack)))
}

pub async fn put(
    State(state): State<AppState>,
    Authorized(caller, ObjectWrite): Authorized<ObjectWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<VirtualServerSpec>,
) -> Result<Json<WriteAck>, ApiError> {
    same_name(&spec.name, &name)?;
    checked(&state, &caller, &spec)?;
    let current = state
        .registry
        .local()
        .state
        .virtual_servers
        .get(&name)
        .cloned();
    if current
        .as_ref()
        .is_some_and(|c| !caller.owns(c.spec.tenant.as_deref()))
    {
        return Err(ApiError::Conflict {
            code: "already_exists",
            message: format!("virtual server name {name:?} is taken"),
        });
    }
    let default = super::extract::as_checked(current.map(|c| c.revision));
    let command = Command::PutVirtualServer {
        spec,
        precondition: precondition(&headers, default)?,
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
    let current = state
        .registry
        .local()
        .state
        .virtual_servers
        .get(&name)
        .filter(|v| caller.owns(v.spec.tenant.as_deref()))
        .map(|v| v.revision)
        .ok_or_else(|| ApiError::NotFound(format!("virtual server {name:?} not found")))?;
    let command = Command::DeleteVirtualServer {
        name,
        precondition: precondition(&headers, Precondition::Revision(current))?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}
