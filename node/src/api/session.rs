//! Console sign-in (`/v1/session`): a browser trades a token for a sealed session cookie
//! (`crate::identity::session`), asks who it is, and signs out. Any client may use these
//! routes; the console is one.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mcpcp_proto::api::{scope, ConsoleSession, SignInProvider, SignInProviders};

use super::error::ApiError;
use super::extract::{ApiQuery, Authorized};
use super::AppState;
use crate::identity::session::{self, clear_cookies, csrf_token, set_cookies};
use crate::identity::surface::ObjectRead;
use crate::registry::Principal;

fn answer(p: &Principal, expires_at: Option<u64>, csrf: String) -> ConsoleSession {
    ConsoleSession {
        subject: p.token_id.clone(),
        role: p.role,
        tenant: p.tenant.clone(),
        expires_at,
        csrf_token: csrf,
    }
}

fn with_cookies(mut resp: Response, cookies: [String; 2]) -> Response {
    for c in cookies {
        if let Ok(v) = c.parse() {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// `POST /v1/session`: signs the caller in with `Authorization: Bearer`. A session cannot
/// renew itself: `identity.session_ttl_s` is the most a sign-in lasts.
pub async fn create(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: HeaderMap,
    Authorized(caller, _): Authorized<ObjectRead>,
) -> Result<Response, ApiError> {
    if !headers.contains_key(header::AUTHORIZATION) {
        return Err(ApiError::bad_field(
            "Authorization",
            "sign in with a token (Authorization: Bearer); a session does not renew itself",
        ));
    }
    let (sealed, max_age) = state
        .identity
        .open_session(&caller)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::info!(subject = %caller.token_id, role = caller.role.as_str(), max_age_s = max_age, "console session opened");
    metrics::counter!("mcpd_console_sessions_total").increment(1);
    let body = answer(
        &caller,
        Some(crate::registry::now_unix() + max_age),
        csrf_token(&sealed),
    );
    Ok(with_cookies(
        (StatusCode::CREATED, Json(body)).into_response(),
        set_cookies(&sealed, max_age),
    ))
}

/// `GET /v1/session`: who the session (or token) belongs to. Never cached: it carries the
/// session's CSRF token.
pub async fn get(headers: HeaderMap, Authorized(caller, _): Authorized<ObjectRead>) -> Response {
    let csrf = session::cookie(&headers)
        .map(csrf_token)
        .unwrap_or_default();
    let mut resp = Json(answer(&caller, None, csrf)).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// Which sign-in page asks: `?tenant=NAME` for a tenant's people.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersQuery {
    tenant: Option<String>,
}

/// `GET /v1/session/providers[?tenant=NAME]`: where a person may sign in with single sign-on.
/// Public, and it names the same issuers as the protected-resource metadata: the cluster-wide
/// ones, and the tenants' unless `identity.tenant_issuers_in_shared_metadata` is off; with
/// `tenant`, that tenant's first and no other tenant's.
pub async fn providers(
    axum::extract::State(state): axum::extract::State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    ApiQuery(query): ApiQuery<ProvidersQuery>,
) -> Json<SignInProviders> {
    let providers = state
        .identity
        .listed_issuers(query.tenant.as_deref())
        .into_iter()
        .filter_map(|i| {
            Some(SignInProvider {
                client_id: i.console_client_id?,
                name: i.name,
                issuer: i.issuer,
            })
        })
        .collect();
    Json(SignInProviders {
        resource: state.identity.base(&headers, &uri).resource(""),
        scope: format!("openid {} {}", scope::ADMIN_READ, scope::ADMIN_WRITE),
        providers,
    })
}

/// `DELETE /v1/session`: clears the browser's cookies. The sealed value stays valid until it
/// expires (nothing is stored to forget); revoking the token ends it everywhere.
pub async fn delete() -> Response {
    with_cookies(StatusCode::NO_CONTENT.into_response(), clear_cookies())
}
