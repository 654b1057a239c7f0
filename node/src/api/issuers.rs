//! Trusted JWT issuers (`/v1/issuers`): written by cluster admins, read by every admin role (a
//! tenant admin: its own tenant's). See `crate::identity` for how a token of one is checked.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use mcpcp_proto::api::{IssuerSpec, List, Versioned, WriteAck};

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
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<Versioned<IssuerSpec>>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    Ok(Json(listed(
        data.state.revision,
        &data.state.issuers,
        |i| caller.owns(i.tenant.as_deref()),
    )))
}

pub async fn get(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<Versioned<IssuerSpec>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    found(&data.state.issuers, &name, "issuer", |i| {
        caller.owns(i.tenant.as_deref())
    })
    .map(Json)
}

pub async fn create(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<IssuerSpec>,
) -> Result<(StatusCode, Json<WriteAck>), ApiError> {
    validate::issuer_spec(&spec)?;
    let command = Command::PutIssuer {
        spec,
        precondition: Precondition::Absent,
    };
    Ok((
        StatusCode::CREATED,
        Json(write(&state, &headers, (&caller, &from), command).await?),
    ))
}

pub async fn put(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<IssuerSpec>,
) -> Result<Json<WriteAck>, ApiError> {
    same_name(&spec.name, &name)?;
    validate::issuer_spec(&spec)?;
    let command = Command::PutIssuer {
        spec,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WriteAck>, ApiError> {
    let command = Command::DeleteIssuer {
        name,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}
