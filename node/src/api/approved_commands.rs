//! The catalogue of commands tenants' local servers may run (`/v1/approved-commands`): a
//! cluster admin approves them; a tenant admin reads them and adds a local server only by
//! running one as approved (`api::objects`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use mcpcp_proto::api::{ApprovedCommand, List, Versioned, WriteAck};

use super::error::ApiError;
use super::extract::{
    precondition, read_barrier, same_name, ApiJson, ApiQuery, Authorized, ReadParams, RemoteAddr,
};
use super::objects::write;
use super::visible::{found, listed};
use super::AppState;
use crate::identity::surface::{ClusterWrite, ObjectRead};
use crate::registry::state::{Command, Precondition};
use crate::registry::validate;

pub async fn list(
    State(state): State<AppState>,
    _caller: Authorized<ObjectRead>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<Versioned<ApprovedCommand>>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    Ok(Json(listed(
        data.state.revision,
        &data.state.approved_commands,
        |_| true,
    )))
}

pub async fn get(
    State(state): State<AppState>,
    _caller: Authorized<ObjectRead>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<Versioned<ApprovedCommand>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    found(
        &data.state.approved_commands,
        &name,
        "approved command",
        |_| true,
    )
    .map(Json)
}

pub async fn create(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<ApprovedCommand>,
) -> Result<(StatusCode, Json<WriteAck>), ApiError> {
    validate::approved_command(&spec)?;
    let command = Command::PutApprovedCommand {
        spec,
        precondition: Precondition::Absent,
    };
    let ack = write(&state, &headers, (&caller, &from), command).await?;
    Ok((StatusCode::CREATED, Json(ack)))
}

pub async fn put(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<ApprovedCommand>,
) -> Result<Json<WriteAck>, ApiError> {
    same_name(&spec.name, &name)?;
    validate::approved_command(&spec)?;
    let command = Command::PutApprovedCommand {
        spec,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}

/// Removing an approval stops new servers from using it; servers added with it keep running
/// until a cluster admin removes them.
pub async fn delete(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WriteAck>, ApiError> {
    let command = Command::DeleteApprovedCommand {
        name,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}
