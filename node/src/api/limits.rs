//! Rate limits and quotas on MCP calls (`/v1/limits`): a cluster admin sets them; readers see
//! them and what each quota used (`/v1/limits/NAME/usage`). How they are enforced, cluster
//! wide, is `crate::limits`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use mcpcp_proto::api::{LimitSpec, List, QuotaUsage, Versioned, WriteAck};

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

/// A tenant admin sees its own tenant's limits and the cluster-wide ones.
pub async fn list(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<Versioned<LimitSpec>>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    Ok(Json(listed(data.state.revision, &data.state.limits, |l| {
        caller.sees(l.tenant.as_deref())
    })))
}

pub async fn get(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<Versioned<LimitSpec>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    found(&data.state.limits, &name, "limit", |l| {
        caller.sees(l.tenant.as_deref())
    })
    .map(Json)
}

/// What the quota of limit `name` used in each budget's current period. A tenant admin sees
/// only its own tenant's limits' (a cluster-wide limit's budgets are other tenants' too).
pub async fn usage(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<QuotaUsage>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    let limit = found(&data.state.limits, &name, "limit", |l| {
        caller.owns(l.tenant.as_deref())
    })?;
    let calls = limit.spec.quota.map_or(0, |q| q.calls);
    let prefix = format!("{name}/");
    let items = data
        .state
        .quota_use
        .iter()
        .filter_map(|(bucket, (period, used))| {
            Some(QuotaUsage {
                budget: bucket.strip_prefix(&prefix)?.to_string(),
                period: period.clone(),
                used: *used,
                calls,
            })
        })
        .collect();
    Ok(Json(List {
        revision: data.state.revision,
        items,
    }))
}

pub async fn create(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<LimitSpec>,
) -> Result<(StatusCode, Json<WriteAck>), ApiError> {
    validate::limit_spec(&spec)?;
    let command = Command::PutLimit {
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
    ApiJson(spec): ApiJson<LimitSpec>,
) -> Result<Json<WriteAck>, ApiError> {
    same_name(&spec.name, &name)?;
    validate::limit_spec(&spec)?;
    let command = Command::PutLimit {
        spec,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}

/// Removes the limit and what its quota counted.
pub async fn delete(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WriteAck>, ApiError> {
    let command = Command::DeleteLimit {
        name,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}
