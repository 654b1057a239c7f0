//! Request extractors that turn every malformed input into an [`ApiError`] naming the field:
//! JSON bodies, query strings, the caller (`crate::identity`), `If-Match` and `Idempotency-Key`.

use axum::extract::{FromRef, FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::identity::surface::Surface;
use crate::identity::Identity;
use crate::registry::state::Precondition;
use crate::registry::Principal;

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

/// The caller, authenticated (API token or trusted JWT) and allowed to use surface `S`
/// (`crate::identity::surface`): its roles, and for a JWT its scope. Handlers narrow a
/// tenant-scoped caller to its own tenant's objects. The marker reads at the call site:
/// `Authorized(caller, ObjectWrite)`.
pub struct Authorized<S>(pub Principal, pub S);

impl<St, S> FromRequestParts<St> for Authorized<S>
where
    St: Send + Sync,
    Identity: FromRef<St>,
    S: Surface,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &St) -> Result<Self, ApiError> {
        let identity = Identity::from_ref(state);
        // MCP endpoints are resources of their own; the admin API is the base URL.
        let path = if S::SCOPE == mcpcp_proto::api::scope::MCP {
            parts.uri.path()
        } else {
            ""
        };
        match identity.authorize::<S>(parts, path).await {
            Ok(p) => Ok(Authorized(p, S::default())),
            Err(refusal) => Err(ApiError::from(refusal)),
        }
    }
}

/// The address a request came from (the TCP peer, which `listener` records), for the audit
/// trail; `None` when the request did not come through the listener.
pub struct RemoteAddr(pub Option<std::net::SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for RemoteAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(RemoteAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// Refuses a body that names another object than its path (`PUT /v1/servers/a` of `b`).
pub fn same_name(body: &str, path: &str) -> Result<(), ApiError> {
    if body == path {
        return Ok(());
    }
    Err(crate::registry::validate::FieldError::new(
        "name",
        format!("{body:?} does not match the path's {path:?}"),
    )
    .into())
}

/// The precondition of a write whose rights were checked on `current` (its revision, or
/// `None`: it did not exist): the write lands only on what was checked.
pub fn as_checked(current: Option<u64>) -> Precondition {
    current.map_or(Precondition::Absent, Precondition::Revision)
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
