//! Authorization rules for MCP calls (`/v1/policies`), and `POST /v1/policies/test`: would
//! this caller be allowed this call, and by which rule, without making it. A tenant admin
//! reads and writes only rules that apply to its tenant alone (`tenants: [its tenant]`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use mcpcp_proto::api::{Effect, List, PolicySpec, PolicyTest, PolicyVerdict, Versioned, WriteAck};

use super::error::ApiError;
use super::extract::{
    as_checked, precondition, read_barrier, same_name, ApiJson, ApiQuery, Authorized, ReadParams,
    RemoteAddr,
};
use super::objects::write;
use super::visible::{found, listed};
use super::AppState;
use crate::identity::surface::{ObjectRead, ObjectWrite};
use crate::policy::condition::Condition;
use crate::policy::Access;
use crate::registry::state::{Command, Precondition};
use crate::registry::{validate, Principal};

/// Rules the cluster holds at most: every call on every node walks them.
const MAX_RULES: usize = 1000;

/// Refuses a new rule past [`MAX_RULES`].
fn room_for_a_rule(state: &AppState) -> Result<(), ApiError> {
    if state.registry.local().state.policies.len() < MAX_RULES {
        return Ok(());
    }
    Err(ApiError::Conflict {
        code: "too_many",
        message: format!("the cluster holds {MAX_RULES} rules already; remove some first"),
    })
}

/// Whether `caller` may see or write `spec`: a tenant admin, its own tenant's rules only.
fn owns(caller: &Principal, spec: &PolicySpec) -> bool {
    !caller.role.is_tenant_scoped()
        || (spec.tenants.len() == 1 && caller.tenant.as_deref() == Some(spec.tenants[0].as_str()))
}

/// Validates a rule, its condition compiled.
fn checked(caller: &Principal, spec: &PolicySpec) -> Result<(), ApiError> {
    validate::policy_spec(spec)?;
    if let Some(c) = &spec.condition {
        Condition::compile(c).map_err(|e| {
            validate::FieldError::new("condition", format!("does not compile: {e}"))
        })?;
    }
    if !owns(caller, spec) {
        return Err(ApiError::Forbidden(format!(
            "a {} writes rules of its own tenant only: set \"tenants\": [{:?}]",
            caller.role,
            caller.tenant.as_deref().unwrap_or("")
        )));
    }
    // The first matching rule decides, so a tenant's allow rule placed first would undo a
    // cluster admin's deny: a tenant admin's rules can only narrow.
    if caller.role.is_tenant_scoped() && spec.effect == Effect::Allow {
        return Err(ApiError::Forbidden(format!(
            "a {} writes deny rules only: its rules narrow what the cluster's rules allow",
            caller.role
        )));
    }
    Ok(())
}

pub async fn list(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<List<Versioned<PolicySpec>>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    let mut list = listed(data.state.revision, &data.state.policies, |p| {
        owns(&caller, p)
    });
    list.items
        .sort_by(|a, b| (a.spec.order, &a.spec.name).cmp(&(b.spec.order, &b.spec.name)));
    Ok(Json(list))
}

pub async fn get(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Json<Versioned<PolicySpec>>, ApiError> {
    read_barrier(&state, params.consistency).await?;
    let data = state.registry.local();
    found(&data.state.policies, &name, "policy", |p| owns(&caller, p)).map(Json)
}

pub async fn create(
    State(state): State<AppState>,
    Authorized(caller, ObjectWrite): Authorized<ObjectWrite>,
    from: RemoteAddr,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<(StatusCode, Json<WriteAck>), ApiError> {
    checked(&caller, &spec)?;
    room_for_a_rule(&state)?;
    let command = Command::PutPolicy {
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
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<Json<WriteAck>, ApiError> {
    same_name(&spec.name, &name)?;
    checked(&caller, &spec)?;
    let current = state.registry.local().state.policies.get(&name).cloned();
    if current.as_ref().is_some_and(|c| !owns(&caller, &c.spec)) {
        return Err(ApiError::Conflict {
            code: "already_exists",
            message: format!("policy name {name:?} is taken"),
        });
    }
    if current.is_none() {
        room_for_a_rule(&state)?;
    }
    // A tenant admin writes onto exactly the rule it was allowed to (or onto none).
    let default = if caller.role.is_tenant_scoped() {
        as_checked(current.as_ref().map(|c| c.revision))
    } else {
        Precondition::None
    };
    let command = Command::PutPolicy {
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
    let current = state.registry.local().state.policies.get(&name).cloned();
    let mut default = Precondition::None;
    if caller.role.is_tenant_scoped() {
        let own = current
            .filter(|c| owns(&caller, &c.spec))
            .ok_or_else(|| ApiError::NotFound(format!("policy {name:?} not found")))?;
        default = Precondition::Revision(own.revision);
    }
    let command = Command::DeletePolicy {
        name,
        precondition: precondition(&headers, default)?,
    };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}

/// Decides a call as the node would, without making it.
pub async fn test(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
    ApiJson(t): ApiJson<PolicyTest>,
) -> Result<Json<PolicyVerdict>, ApiError> {
    if caller.role.is_tenant_scoped() && t.tenant != caller.tenant {
        return Err(ApiError::Forbidden(format!(
            "a {} tests its own tenant's callers only",
            caller.role
        )));
    }
    let who = Principal {
        token_id: t.subject.clone().unwrap_or_else(|| "policy-test".into()),
        role: t.role,
        tenant: t.tenant.clone(),
        scopes: None,
        groups: t.groups.clone(),
        jwt: None,
    };
    let access = parse_target(&t.target)?;
    Ok(Json(state.policies.decide_only(&who, &access, &t.args)))
}

/// `tool:SERVER__TOOL`, `prompt:SERVER__PROMPT`, `resource:SERVER:URI`.
fn parse_target(target: &str) -> Result<Access<'_>, ApiError> {
    let bad = || {
        ApiError::bad_field(
            "target",
            "must be tool:SERVER__TOOL, prompt:SERVER__PROMPT or resource:SERVER:URI",
        )
    };
    let (kind, rest) = target.split_once(':').ok_or_else(bad)?;
    match kind {
        "tool" | "prompt" => {
            let (server, name) = rest.split_once("__").ok_or_else(bad)?;
            Ok(if kind == "tool" {
                Access::Tool { server, name }
            } else {
                Access::Prompt { server, name }
            })
        }
        "resource" => {
            let (server, uri) = rest.split_once(':').ok_or_else(bad)?;
            Ok(Access::Resource { server, uri })
        }
        _ => Err(bad()),
    }
}
