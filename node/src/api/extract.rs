//! Request extractors that turn every malformed input into an [`ApiError`] naming the field:
//! JSON bodies, query strings, the bearer token, `If-Match` and `Idempotency-Key`.

use axum::extract::{FromRef, FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use mcpcp_proto::api::Role;
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::registry::state::Precondition;
use crate::registry::{Principal, Registry};

/// `axum::Json` with our error format.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `axum::extract::Query` with our error format.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Read consistency, `?consistency=linearizable|stale`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Reflects every write acknowledged before the read began (the default).
    #[default]
    Linearizable,
    /// This node's applied state, served even without quorum.
    Stale,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    #[serde(default)]
    pub consistency: Consistency,
}

/// The caller of MCP, authenticated by `Authorization: Bearer <token>`: an admin or a tenant
/// (a metrics token is refused).
pub struct Caller(pub Principal);

/// A reader of `/metrics`: a metrics or an admin token.
pub struct MetricsReader;

/// The caller, authenticated and holding the admin role.
pub struct Admin(pub Principal);

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer <token>".into()))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("Authorization header is not ASCII".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::Unauthorized("Authorization must use the Bearer scheme".into()))?;
    Ok(token.trim())
}

/// The principal of the request's bearer token, whatever its role.
fn authenticate(parts: &Parts, registry: &Registry) -> Result<Principal, ApiError> {
    let token = bearer(parts)?;
    match registry.authenticate(token) {
        Some(p) => Ok(p),
        None => {
            metrics::counter!("mcpd_auth_failures_total").increment(1);
            let initialized = registry
                .local()
                .membership
                .membership()
                .voter_ids()
                .next()
                .is_some();
            if !initialized {
                return Err(ApiError::Unavailable {
                    code: "not_initialized",
                    message: "this node is not part of a cluster yet: run `mcpctl cluster init`"
                        .into(),
                    retry_after_s: 5,
                });
            }
            Err(ApiError::Unauthorized(
                "the bearer token is unknown, revoked or expired".into(),
            ))
        }
    }
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    Registry: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let p = authenticate(parts, &Registry::from_ref(state))?;
        if p.role == Role::Metrics {
            return Err(ApiError::Forbidden(
                "a metrics token may only read /metrics".into(),
            ));
        }
        Ok(Caller(p))
    }
}

impl<S> FromRequestParts<S> for MetricsReader
where
    S: Send + Sync,
    Registry: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match authenticate(parts, &Registry::from_ref(state))?.role {
            Role::Metrics | Role::Admin => Ok(MetricsReader),
            Role::Tenant => Err(ApiError::Forbidden(
                "/metrics needs a metrics or admin token (mcpctl token create --role metrics)"
                    .into(),
            )),
        }
    }
}

impl<S> FromRequestParts<S> for Admin
where
    S: Send + Sync,
    Registry: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let p = authenticate(parts, &Registry::from_ref(state))?;
        if p.role != Role::Admin {
            return Err(ApiError::Forbidden(
                "this endpoint needs an admin token; a tenant token may only use MCP endpoints, a metrics token only /metrics"
                    .into(),
            ));
        }
        Ok(Admin(p))
    }
}

/// `If-Match: <revision>` (quotes allowed, as for an ETag) as a precondition.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v
        .to_str()
        .map_err(|_| ApiError::bad_field("If-Match", "must be ASCII"))?
        .trim()
        .trim_matches('"');
    text.parse::<u64>()
        .map(Some)
        .map_err(|_| ApiError::bad_field("If-Match", format!("{text:?} is not a revision number")))
}

pub fn precondition(
    headers: &HeaderMap,
    otherwise: Precondition,
) -> Result<Precondition, ApiError> {
    Ok(match if_match(headers)? {
        Some(rev) => Precondition::Revision(rev),
        None => otherwise,
    })
}

/// `Idempotency-Key`, scoped to the caller's token so two clients cannot collide.
pub fn idempotency_key(
    headers: &HeaderMap,
    caller: &Principal,
) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .map_err(|_| ApiError::bad_field("Idempotency-Key", "must be ASCII"))?;
    if key.is_empty() || key.len() > 128 {
        return Err(ApiError::bad_field(
            "Idempotency-Key",
            "must be 1 to 128 characters",
        ));
    }
    Ok(Some(format!("{}:{key}", caller.token_id)))
}

/// Parses `?consistency=` and, for linearizable reads, waits for the read barrier.
pub async fn read_barrier(state: &AppState, consistency: Consistency) -> Result<(), ApiError> {
    if consistency == Consistency::Linearizable {
        state.registry.barrier().await?;
    }
    Ok(())
}
