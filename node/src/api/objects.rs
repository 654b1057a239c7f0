//! CRUD of the registry's objects: servers, tenants and tokens (`/v1/servers`, `/v1/tenants`,
//! `/v1/tokens`). Every handler validates, turns the request into a [`Command`] and lets the
//! registry replicate it; reads are linearizable unless `?consistency=stale`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use mcpcp_proto::api::{
    CreateTokenRequest, CreatedToken, List, ReplicaStatus, ServerPatch, ServerSpec, ServerStatus,
    TenantSpec, TokenInfo, Versioned, WriteAck, REDACTED,
};

use super::error::ApiError;
use super::extract::{
    idempotency_key, precondition, read_barrier, Admin, ApiJson, ApiQuery, ReadParams,
};
use super::AppState;
use crate::registry::state::{Command, Precondition, Request};
use crate::registry::{new_request_id, now_unix, token, validate, Principal};

async fn write(
    state: &AppState,
    headers: &HeaderMap,
    caller: &Principal,
    command: Command,
) -> Result<WriteAck, ApiError> {
    let request_id = idempotency_key(headers, caller)?.unwrap_or_else(new_request_id);
    let applied = state
        .registry
        .write_request(Request {
            request_id,
            command,
        })
        .await?;
    Ok(WriteAck {
        revision: applied.revision,
    })
}

// === servers ===

pub async fn list_servers(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<Versioned<ServerSpec>>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    Ok(Json(List {
        revision: data.state.revision,
        items: data
            .state
            .servers
            .values()
            .map(Versioned::redacted)
            .collect(),
    }))
}

/// In one map of secrets (`section`: `env` or `headers`), puts back the stored value of every
/// one sent as `"<redacted>"`, and refuses a sealed-looking value that is not the stored one.
fn keep_redacted(
    section: &str,
    values: &mut std::collections::BTreeMap<String, String>,
    stored: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<(), ApiError> {
    for (name, value) in values.iter_mut() {
        let stored_value = stored.and_then(|c| c.get(name));
        if value.starts_with(crate::seal::SEALED) && stored_value != Some(value) {
            return Err(validate::FieldError::new(
                format!("{section}.{name}"),
                format!("a value may not start with {:?}", crate::seal::SEALED),
            )
            .into());
        }
        if value == REDACTED {
            *value = stored_value.cloned().ok_or_else(|| {
                validate::FieldError::new(
                    format!("{section}.{name}"),
                    format!("{REDACTED:?} stands for a value already stored; give the value"),
                )
            })?;
        }
    }
    Ok(())
}

/// The server `name` as this node has it applied (sealed values and all).
fn stored(state: &AppState, name: &str) -> Option<Versioned<ServerSpec>> {
    state.registry.local().state.servers.get(name).cloned()
}

/// Readies a spec for writing: a secret (`env` or `headers` value) sent back as
/// `"<redacted>"` keeps the value already stored (`current`); then the spec is validated and
/// every secret sealed.
fn sealed(
    state: &AppState,
    mut spec: ServerSpec,
    current: Option<&ServerSpec>,
) -> Result<ServerSpec, ApiError> {
    keep_redacted("env", &mut spec.env, current.map(|c| &c.env))?;
    keep_redacted("headers", &mut spec.headers, current.map(|c| &c.headers))?;
    validate::server_spec(&spec)?;
    state
        .data_key
        .seal_secrets(&mut spec)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(spec)
}

pub async fn get_server(
    State(state): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<Versioned<ServerSpec>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    data.state
        .servers
        .get(&name)
        .map(|v| Json(v.redacted()))
        .ok_or_else(|| ApiError::NotFound(format!("server {name:?} not found")))
}

/// Where a server runs and how its replicas are doing (pool states from each node, breakers
/// as this node sees them).
pub async fn server_status(
    State(state): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<ServerStatus>, ApiError> {
    let (spec, placed) = {
        let data = state.registry.local();
        let spec = data
            .state
            .servers
            .get(&name)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("server {name:?} not found")))?;
        (spec, data.state.placements.get(&name).cloned())
    };
    let members = state.registry.members();
    let placement: Vec<u64> = match (&spec.spec.replicas, placed) {
        (Some(_), Some(p)) => p,
        (Some(_), None) => Vec::new(),
        (None, _) => members.iter().map(|m| m.id).collect(),
    };
    let channels = state.router.channels().clone();
    let replicas = futures_util::future::join_all(placement.iter().map(|id| {
        let member = members.iter().find(|m| m.id == *id).cloned();
        let channels = channels.clone();
        let name = name.clone();
        async move {
            let info = match member {
                Some(m) => crate::route::peer::server_info(&channels, &m, &name)
                    .await
                    .ok(),
                None => None,
            };
            ReplicaStatus {
                node: *id,
                reachable: info.is_some(),
                processes: info
                    .as_ref()
                    .and_then(|v| v["slots"].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect(),
                queue_depth: info.as_ref().and_then(|v| v["queue_depth"].as_u64()),
                details: info
                    .as_ref()
                    .and_then(|v| serde_json::from_value(v["processes"].clone()).ok())
                    .unwrap_or_default(),
            }
        }
    }))
    .await;
    let breakers = state
        .router
        .breakers
        .snapshot(std::time::Instant::now())
        .into_iter()
        .filter(|b| b.server == name)
        .filter_map(|b| serde_json::to_value(b).ok())
        .collect();
    Ok(Json(ServerStatus {
        name,
        revision: spec.revision,
        enabled: spec.spec.enabled,
        placement,
        replicas,
        breakers,
    }))
}

pub async fn create_server(
    State(state): State<AppState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<ServerSpec>,
) -> Result<(StatusCode, Json<WriteAck>), ApiError> {
    let spec = sealed(&state, spec, None)?;
    let command = Command::PutServer {
        spec,
        precondition: Precondition::Absent,
    };
    let ack = write(&state, &headers, &caller, command).await?;
    Ok((StatusCode::CREATED, Json(ack)))
}

pub async fn put_server(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<ServerSpec>,
) -> Result<Json<WriteAck>, ApiError> {
    if spec.name != name {
        return Err(validate::FieldError::new(
            "name",
            format!("{:?} does not match the path's {name:?}", spec.name),
        )
        .into());
    }
    // A "<redacted>" value stands for the stored one: read it linearizably, and write only
    // onto the revision it was read at, so a racing write is not silently reverted.
    let keeps = spec
        .env
        .values()
        .chain(spec.headers.values())
        .any(|v| v == REDACTED);
    if keeps {
        state.registry.barrier().await?;
    }
    let current = stored(&state, &name);
    let default = match (&current, keeps) {
        (Some(c), true) => Precondition::Revision(c.revision),
        _ => Precondition::None,
    };
    let spec = sealed(&state, spec, current.as_ref().map(|c| &c.spec))?;
    let command = Command::PutServer {
        spec,
        precondition: precondition(&headers, default)?,
    };
    Ok(Json(write(&state, &headers, &caller, command).await?))
}

/// Merges the present fields into the current spec and writes it back, as a compare-and-set
/// on the revision it read (or on `If-Match`, when given).
pub async fn patch_server(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(patch): ApiJson<ServerPatch>,
) -> Result<Json<WriteAck>, ApiError> {
    state.registry.barrier().await?;
    let current = stored(&state, &name)
        .ok_or_else(|| ApiError::NotFound(format!("server {name:?} not found")))?;
    let mut spec = current.spec.clone();
    patch.apply_to(&mut spec);
    let spec = sealed(&state, spec, Some(&current.spec))?;
    let command = Command::PutServer {
        spec,
        precondition: precondition(&headers, Precondition::Revision(current.revision))?,
    };
    Ok(Json(write(&state, &headers, &caller, command).await?))
}

pub async fn delete_server(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WriteAck>, ApiError> {
    let command = Command::DeleteServer {
        name,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(write(&state, &headers, &caller, command).await?))
}

// === tenants ===

pub async fn list_tenants(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<Versioned<TenantSpec>>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    Ok(Json(List {
        revision: data.state.revision,
        items: data.state.tenants.values().cloned().collect(),
    }))
}

pub async fn get_tenant(
    State(state): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<Versioned<TenantSpec>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    data.state
        .tenants
        .get(&name)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("tenant {name:?} not found")))
}

pub async fn create_tenant(
    State(state): State<AppState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<TenantSpec>,
) -> Result<(StatusCode, Json<WriteAck>), ApiError> {
    validate::tenant_spec(&spec)?;
    let command = Command::PutTenant {
        spec,
        precondition: Precondition::Absent,
    };
    let ack = write(&state, &headers, &caller, command).await?;
    Ok((StatusCode::CREATED, Json(ack)))
}

pub async fn delete_tenant(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WriteAck>, ApiError> {
    let command = Command::DeleteTenant {
        name,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(write(&state, &headers, &caller, command).await?))
}

// === tokens ===

pub async fn list_tokens(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<TokenInfo>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    Ok(Json(List {
        revision: data.state.revision,
        items: data.state.tokens.values().map(|t| t.info.clone()).collect(),
    }))
}

pub async fn get_token(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<TokenInfo>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    data.state
        .tokens
        .get(&id)
        .map(|t| Json(t.info.clone()))
        .ok_or_else(|| ApiError::NotFound(format!("token {id:?} not found")))
}

/// Mints a token. The secret is in this answer only; the registry keeps its hash.
/// `Idempotency-Key` is not honoured here: a retried request must mint a new secret, since the
/// first answer's secret cannot be shown again.
pub async fn create_token(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let role = validate::token_request(&req)?;
    let minted = token::mint().map_err(|e| ApiError::Internal(e.to_string()))?;
    let created_at = now_unix();
    let info = TokenInfo {
        id: minted.id,
        name: req.name,
        role,
        tenant: req.tenant,
        created_at,
        expires_at: req.ttl_seconds.map(|ttl| created_at.saturating_add(ttl)),
    };
    let applied = state
        .registry
        .write(Command::CreateToken {
            info: info.clone(),
            hash: minted.hash,
        })
        .await?;
    tracing::info!(token_id = %info.id, role = ?info.role, tenant = info.tenant.as_deref().unwrap_or(""), "token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: minted.secret,
            info,
            revision: applied.revision,
        }),
    ))
}

pub async fn revoke_token(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WriteAck>, ApiError> {
    // The state machine refuses to revoke the only admin token; here, with the clock, an
    // expired admin token does not count either, so the cluster keeps a working one.
    {
        let data = state.registry.local();
        let now = now_unix();
        let is_admin =
            |t: &crate::registry::state::StoredToken| t.info.role == mcpcp_proto::api::Role::Admin;
        let working = |t: &&crate::registry::state::StoredToken| {
            is_admin(t) && t.info.expires_at.is_none_or(|e| e > now)
        };
        let tokens = &data.state.tokens;
        if tokens.get(&id).is_some_and(is_admin)
            && !tokens.values().filter(working).any(|t| t.info.id != id)
        {
            return Err(ApiError::Conflict {
                code: "in_use",
                message: format!(
                    "token {id} is the cluster's last working admin token; create another admin token first"
                ),
            });
        }
    }
    let ack = write(
        &state,
        &headers,
        &caller,
        Command::RevokeToken { id: id.clone() },
    )
    .await?;
    tracing::info!(token_id = %id, "token revoked");
    Ok(Json(ack))
}
