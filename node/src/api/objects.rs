//! CRUD of the registry's objects: servers, tenants and tokens (`/v1/servers`, `/v1/tenants`,
//! `/v1/tokens`). Every handler validates, turns the request into a [`Command`] and lets the
//! registry replicate it; reads are linearizable unless `?consistency=stale`.
//!
//! The extractor checks the caller's role against the surface; here a tenant-scoped caller
//! (a tenant admin) is narrowed to its own tenant: it sees its tenant's objects and global
//! servers, writes its tenant's tokens and remote servers only (an arbitrary command would
//! run on every node, so it stays with cluster admins), and another tenant's object does
//! not exist as far as it can tell.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use mcpcp_proto::api::{
    CreateTokenRequest, CreatedToken, List, ReplicaStatus, ServerPatch, ServerSpec, ServerStatus,
    TenantSpec, TokenInfo, Versioned, WriteAck, REDACTED,
};

use super::error::ApiError;
use super::extract::{
    as_checked, idempotency_key, precondition, read_barrier, same_name, ApiJson, ApiQuery,
    Authorized, ReadParams, RemoteAddr,
};
use super::AppState;
use crate::identity::surface::{ClusterWrite, ObjectRead, ObjectWrite, Operate};
use crate::registry::state::{AuditContext, Command, Precondition, Request};
use crate::registry::{new_request_id, now_unix, token, validate, Principal};

/// Replicates `command` for `caller`, de-duplicated by its `Idempotency-Key`.
pub(super) async fn write(
    state: &AppState,
    headers: &HeaderMap,
    (caller, from): (&Principal, &RemoteAddr),
    command: Command,
) -> Result<WriteAck, ApiError> {
    let request_id = idempotency_key(headers, caller)?.unwrap_or_else(new_request_id);
    let applied = state
        .registry
        .write_request(Request {
            request_id,
            command,
            audit: Some(AuditContext::of(caller, from.0)),
        })
        .await?;
    Ok(WriteAck {
        revision: applied.revision,
    })
}

// === servers ===

pub async fn list_servers(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
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
            .filter(|v| caller.sees(v.spec.tenant.as_deref()))
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
        keep_redacted_value(
            &format!("{section}.{name}"),
            value,
            stored.and_then(|c| c.get(name)),
        )?;
    }
    Ok(())
}

/// One secret (`field`): its stored value when sent as `"<redacted>"`, and no sealed-looking
/// value but the stored one.
fn keep_redacted_value(
    field: &str,
    value: &mut String,
    stored: Option<&String>,
) -> Result<(), ApiError> {
    if value.starts_with(crate::seal::SEALED) && stored != Some(value) {
        return Err(validate::FieldError::new(
            field,
            format!("a value may not start with {:?}", crate::seal::SEALED),
        )
        .into());
    }
    if value == REDACTED {
        *value = stored.cloned().ok_or_else(|| {
            validate::FieldError::new(
                field,
                format!("{REDACTED:?} stands for a value already stored; give the value"),
            )
        })?;
    }
    Ok(())
}

/// The server `name` as this node has it applied (sealed values and all), if `caller` may
/// see it.
/// Server `name`, if `caller` may see it.
pub(super) fn stored(
    state: &AppState,
    caller: &Principal,
    name: &str,
) -> Option<Versioned<ServerSpec>> {
    let data = state.registry.local();
    let v = data.state.servers.get(name)?;
    caller.sees(v.spec.tenant.as_deref()).then(|| v.clone())
}

/// Whether `caller` may write `spec` (and, when it exists, the server it replaces).
fn may_write_server(
    state: &AppState,
    caller: &Principal,
    spec: &ServerSpec,
    current: Option<&ServerSpec>,
) -> Result<(), ApiError> {
    if !caller.role.is_tenant_scoped() {
        return Ok(());
    }
    let own = |s: &ServerSpec| caller.owns(s.tenant.as_deref());
    if !own(spec) || current.is_some_and(|c| !own(c)) {
        return Err(ApiError::Forbidden(format!(
            "a {} may write servers of tenant {:?} only (set \"tenant\")",
            caller.role,
            caller.tenant.as_deref().unwrap_or("")
        )));
    }
    // Whose user a process runs as decides whose files and processes it can reach, and its
    // limits protect the nodes: the sandbox is a cluster admin's, kept as it is.
    if spec.sandbox.as_ref() != current.and_then(|c| c.sandbox.as_ref()) {
        let field = if spec
            .sandbox
            .as_ref()
            .and_then(|s| s.run_as.as_ref())
            .is_some()
        {
            "sandbox.run_as"
        } else {
            "sandbox"
        };
        return Err(validate::FieldError::new(
            field,
            "the user and limits a server's processes run under are a cluster admin's setting",
        )
        .into());
    }
    if !spec.is_remote() {
        // A command runs on every node as mcpd's user: only as a cluster admin approved it.
        let data = state.registry.local();
        if data
            .state
            .approved_commands
            .values()
            .any(|a| a.spec.allows(spec))
        {
            return Ok(());
        }
        return Err(ApiError::Forbidden(format!(
            "a {} may add remote servers (\"url\"), or local ones that run an approved command as approved (mcpctl command list: its arguments, the environment variables it allows, no cwd); {:?} is not one",
            caller.role, spec.command
        )));
    }
    // The nodes' own files and the addresses only they can reach are a cluster admin's: the
    // server's and its OAuth client's alike.
    let oauth = spec.oauth.as_deref();
    for (field, file) in [
        ("ca_file", spec.ca_file.as_deref()),
        ("oauth.ca_file", oauth.and_then(|o| o.ca_file.as_deref())),
    ] {
        if file.is_some() {
            return Err(validate::FieldError::new(
                field,
                "names a file on the nodes: a cluster admin's setting",
            )
            .into());
        }
    }
    for (field, url) in [
        ("url", spec.url.as_deref()),
        ("oauth.token_url", oauth.map(|o| o.token_url.as_str())),
    ] {
        if url.is_some_and(reaches_the_nodes_only) {
            return Err(validate::FieldError::new(
                field,
                "a loopback, link-local or unspecified address is reachable from the nodes only: a cluster admin's setting",
            )
            .into());
        }
    }
    Ok(())
}

/// Whether `url` names the nodes themselves or their link (loopback, link-local such as the
/// cloud metadata address, unspecified). A DNS name that resolves to such an address is
/// caught when a node connects (`crate::pool::egress`).
fn reaches_the_nodes_only(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let host = u.host_str().unwrap_or("").trim_matches(['[', ']']);
    if host.eq_ignore_ascii_case("localhost") || host.ends_with(".localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(crate::pool::egress::node_only)
}

/// Readies a spec for writing: a secret (`env` or `headers` value, the OAuth client's secret)
/// sent back as `"<redacted>"` keeps the value already stored (`current`), a header's only for
/// the same origin and the client secret only for the same token endpoint and client; then
/// the spec is validated and every secret sealed.
fn sealed(
    state: &AppState,
    mut spec: ServerSpec,
    current: Option<&ServerSpec>,
) -> Result<ServerSpec, ApiError> {
    keep_redacted("env", &mut spec.env, current.map(|c| &c.env))?;
    // Stored header values (credentials) go only to the origin they went to.
    fn origin(s: &ServerSpec) -> Option<&str> {
        s.url.as_deref().map(crate::pool::remote_http::origin)
    }
    let same_origin = current.is_some_and(|c| origin(c) == origin(&spec));
    keep_redacted(
        "headers",
        &mut spec.headers,
        current.filter(|_| same_origin).map(|c| &c.headers),
    )?;
    if let Some(oauth) = &mut spec.oauth {
        // The stored secret goes only where it went: to the same token endpoint, as the same
        // client. Pointing the client elsewhere takes the secret again.
        let stored = current
            .and_then(|c| c.oauth.as_deref())
            .filter(|o| o.token_url == oauth.token_url && o.client_id == oauth.client_id)
            .map(|o| &o.client_secret);
        keep_redacted_value("oauth.client_secret", &mut oauth.client_secret, stored)?;
    }
    validate::server_spec(&spec)?;
    state
        .data_key
        .seal_secrets(&mut spec)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(spec)
}

pub async fn get_server(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<Versioned<ServerSpec>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    stored(&state, &caller, &name)
        .map(|v| Json(v.redacted()))
        .ok_or_else(|| ApiError::NotFound(format!("server {name:?} not found")))
}

/// Where a server runs and how its replicas are doing (pool states from each node, breakers
/// as this node sees them).
pub async fn server_status(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(name): Path<String>,
) -> Result<Json<ServerStatus>, ApiError> {
    let spec = stored(&state, &caller, &name)
        .ok_or_else(|| ApiError::NotFound(format!("server {name:?} not found")))?;
    let placed = state.registry.local().state.placements.get(&name).cloned();
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
    Authorized(caller, ObjectWrite): Authorized<ObjectWrite>,
    from: RemoteAddr,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<ServerSpec>,
) -> Result<(StatusCode, Json<WriteAck>), ApiError> {
    may_write_server(&state, &caller, &spec, None)?;
    let spec = sealed(&state, spec, None)?;
    let command = Command::PutServer {
        spec,
        precondition: Precondition::Absent,
    };
    let ack = write(&state, &headers, (&caller, &from), command).await?;
    Ok((StatusCode::CREATED, Json(ack)))
}

pub async fn put_server(
    State(state): State<AppState>,
    Authorized(caller, ObjectWrite): Authorized<ObjectWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<ServerSpec>,
) -> Result<Json<WriteAck>, ApiError> {
    same_name(&spec.name, &name)?;
    // A "<redacted>" value stands for the stored one: read it linearizably, and write only
    // onto the revision it was read at, so a racing write is not silently reverted.
    let keeps = spec
        .env
        .values()
        .chain(spec.headers.values())
        .chain(spec.oauth.as_ref().map(|o| &o.client_secret))
        .any(|v| v == REDACTED);
    if keeps {
        state.registry.barrier().await?;
    }
    // The name may be another tenant's server, hidden from this caller: it is taken, not
    // free to overwrite.
    let existing = state.registry.local().state.servers.get(&name).cloned();
    let current = existing
        .clone()
        .filter(|v| caller.sees(v.spec.tenant.as_deref()));
    if existing.is_some() && current.is_none() {
        return Err(ApiError::Conflict {
            code: "already_exists",
            message: format!("server name {name:?} is taken"),
        });
    }
    may_write_server(&state, &caller, &spec, current.as_ref().map(|c| &c.spec))?;
    // A tenant-scoped caller writes onto exactly what it was allowed to (or onto nothing),
    // so a concurrent change cannot slip another tenant's server under its write.
    let default = if keeps || caller.role.is_tenant_scoped() {
        as_checked(current.as_ref().map(|c| c.revision))
    } else {
        Precondition::None
    };
    let spec = sealed(&state, spec, current.as_ref().map(|c| &c.spec))?;
    let command = Command::PutServer {
        spec,
        precondition: precondition(&headers, default)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}

/// Merges the present fields into the current spec and writes it back, as a compare-and-set
/// on the revision it read (or on `If-Match`, when given).
///
/// An operator may send `enabled` only: it turns servers on and off, and changes nothing else.
pub async fn patch_server(
    State(state): State<AppState>,
    Authorized(caller, Operate): Authorized<Operate>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(patch): ApiJson<ServerPatch>,
) -> Result<Json<WriteAck>, ApiError> {
    let only_enabled = serde_json::to_value(&patch)
        .ok()
        .and_then(|v| v.as_object().map(|o| o.keys().all(|k| k == "enabled")))
        .unwrap_or(false);
    if caller.role == mcpcp_proto::api::Role::Operator && !only_enabled {
        return Err(ApiError::Forbidden(
            "an operator may change \"enabled\" only".into(),
        ));
    }
    state.registry.barrier().await?;
    let current = stored(&state, &caller, &name)
        .ok_or_else(|| ApiError::NotFound(format!("server {name:?} not found")))?;
    let mut spec = current.spec.clone();
    patch.apply_to(&mut spec);
    may_write_server(&state, &caller, &spec, Some(&current.spec))?;
    let spec = sealed(&state, spec, Some(&current.spec))?;
    let command = Command::PutServer {
        spec,
        precondition: precondition(&headers, Precondition::Revision(current.revision))?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}

pub async fn delete_server(
    State(state): State<AppState>,
    Authorized(caller, ObjectWrite): Authorized<ObjectWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WriteAck>, ApiError> {
    let mut default = Precondition::None;
    if caller.role.is_tenant_scoped() {
        let own = stored(&state, &caller, &name)
            .filter(|v| caller.owns(v.spec.tenant.as_deref()))
            .ok_or_else(|| ApiError::NotFound(format!("server {name:?} not found")))?;
        default = Precondition::Revision(own.revision);
    }
    let command = Command::DeleteServer {
        name,
        precondition: precondition(&headers, default)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}

// === tenants ===

pub async fn list_tenants(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<Versioned<TenantSpec>>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    Ok(Json(List {
        revision: data.state.revision,
        items: data
            .state
            .tenants
            .values()
            .filter(|t| caller.owns(Some(&t.spec.name)))
            .cloned()
            .collect(),
    }))
}

pub async fn get_tenant(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<Versioned<TenantSpec>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    data.state
        .tenants
        .get(&name)
        .filter(|t| caller.owns(Some(&t.spec.name)))
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("tenant {name:?} not found")))
}

pub async fn create_tenant(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<TenantSpec>,
) -> Result<(StatusCode, Json<WriteAck>), ApiError> {
    validate::tenant_spec(&spec)?;
    let command = Command::PutTenant {
        spec,
        precondition: Precondition::Absent,
    };
    let ack = write(&state, &headers, (&caller, &from), command).await?;
    Ok((StatusCode::CREATED, Json(ack)))
}

pub async fn delete_tenant(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WriteAck>, ApiError> {
    let command = Command::DeleteTenant {
        name,
        precondition: precondition(&headers, Precondition::None)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}

// === tokens ===

pub async fn list_tokens(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<TokenInfo>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    Ok(Json(List {
        revision: data.state.revision,
        items: data
            .state
            .tokens
            .values()
            .filter(|t| caller.owns(t.info.tenant.as_deref()))
            .map(|t| t.info.clone())
            .collect(),
    }))
}

pub async fn get_token(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<TokenInfo>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    data.state
        .tokens
        .get(&id)
        .filter(|t| caller.owns(t.info.tenant.as_deref()))
        .map(|t| Json(t.info.clone()))
        .ok_or_else(|| ApiError::NotFound(format!("token {id:?} not found")))
}

/// The longest life of an API token a JWT caller mints.
const MAX_TTL_FROM_A_JWT: u64 = 90 * 24 * 3600;

/// Mints a token. The secret is in this answer only; the registry keeps its hash.
/// `Idempotency-Key` is not honoured here: a retried request must mint a new secret, since the
/// first answer's secret cannot be shown again.
pub async fn create_token(
    State(state): State<AppState>,
    Authorized(caller, ObjectWrite): Authorized<ObjectWrite>,
    from: RemoteAddr,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let role = validate::token_request(&req)?;
    // A token minted by a narrowed credential is as narrow: its scopes are among the
    // caller's, and a JWT caller (whose identity the issuer may withdraw) mints tokens that
    // expire.
    if let Some(mine) = &caller.scopes {
        let within = req
            .scopes
            .as_ref()
            .is_some_and(|s| s.iter().all(|x| mine.contains(x)));
        if !within {
            return Err(validate::FieldError::new(
                "scopes",
                format!("must be among the caller's own: {mine:?}"),
            )
            .into());
        }
    }
    if caller.jwt.is_some() && req.ttl_seconds.is_none_or(|t| t > MAX_TTL_FROM_A_JWT) {
        return Err(validate::FieldError::new(
            "ttl_seconds",
            format!("a JWT caller mints tokens of at most {MAX_TTL_FROM_A_JWT} s (90 days)"),
        )
        .into());
    }
    if caller.role.is_tenant_scoped()
        && !(role.is_tenant_scoped() && caller.owns(req.tenant.as_deref()))
    {
        return Err(ApiError::Forbidden(format!(
            "a {} may create user and tenant-admin tokens of tenant {:?} only",
            caller.role,
            caller.tenant.as_deref().unwrap_or("")
        )));
    }
    let minted = token::mint().map_err(|e| ApiError::Internal(e.to_string()))?;
    let created_at = now_unix();
    let info = TokenInfo {
        id: minted.id,
        name: req.name,
        role,
        tenant: req.tenant,
        created_at,
        expires_at: req.ttl_seconds.map(|ttl| created_at.saturating_add(ttl)),
        scopes: req.scopes,
        last_used_at: None,
    };
    let applied = state
        .registry
        .write_audited(
            Command::CreateToken {
                info: info.clone(),
                hash: minted.hash,
            },
            AuditContext::of(&caller, from.0),
        )
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
    Authorized(caller, ObjectWrite): Authorized<ObjectWrite>,
    from: RemoteAddr,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<WriteAck>, ApiError> {
    if caller.role.is_tenant_scoped() {
        let data = state.registry.local();
        let own = data
            .state
            .tokens
            .get(&id)
            .is_some_and(|t| caller.owns(t.info.tenant.as_deref()));
        if !own {
            return Err(ApiError::NotFound(format!("token {id:?} not found")));
        }
    }
    // The state machine refuses to revoke the only admin token; here, with the clock, an
    // expired admin token does not count either, so the cluster keeps a working one.
    {
        let data = state.registry.local();
        let now = now_unix();
        let is_admin = |t: &crate::registry::state::StoredToken| {
            t.info.role == mcpcp_proto::api::Role::ClusterAdmin
        };
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
        (&caller, &from),
        Command::RevokeToken { id: id.clone() },
    )
    .await?;
    tracing::info!(token_id = %id, "token revoked");
    Ok(Json(ack))
}
