//! The one mapping from what went wrong to an HTTP status and a JSON body that names the field.
//! Handlers return `Result<_, ApiError>` and never build an error response by hand.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mcpcp_proto::api::{ErrorBody, ErrorDetail};

use crate::registry::state::ApplyError;
use crate::registry::validate::FieldError;
use crate::registry::RegistryError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request: bad JSON, unknown or missing field, wrong type, bad query.
    #[error("{message}")]
    BadRequest {
        message: String,
        field: Option<String>,
    },
    /// Well-formed but invalid value.
    #[error("{0}")]
    Invalid(FieldError),
    #[error("{0}")]
    Forbidden(String),
    /// A caller refused by `crate::identity`, with the challenge that tells an OAuth client
    /// where to go (`WWW-Authenticate`).
    #[error("{message}")]
    Refused {
        status: StatusCode,
        code: &'static str,
        message: String,
        challenge: String,
    },
    /// The request's `Host` is not a name of this node (DNS rebinding).
    #[error("{0}")]
    MisdirectedHost(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// `If-Match` named a revision the object is not at.
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No quorum, not initialised, shutting down: try again later (or elsewhere).
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: String,
        retry_after_s: u64,
    },
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn bad_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            field: Some(field.into()),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<String>) {
        match self {
            ApiError::BadRequest { field, .. } => {
                (StatusCode::BAD_REQUEST, "bad_request", field.clone())
            }
            ApiError::Invalid(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                Some(e.field.clone()),
            ),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", None),
            ApiError::Refused { status, code, .. } => (*status, code, None),
            ApiError::MisdirectedHost(_) => (
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected_host",
                Some("Host".into()),
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code, None),
            ApiError::PreconditionFailed(_) => (
                StatusCode::PRECONDITION_FAILED,
                "revision_mismatch",
                Some("If-Match".into()),
            ),
            ApiError::PayloadTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None)
            }
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                None,
            ),
            ApiError::Unavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, code, None),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = self.parts();
        match &self {
            ApiError::Internal(detail) => tracing::error!(error = %detail, "internal error"),
            ApiError::Forbidden(_) | ApiError::Refused { .. } => {
                tracing::warn!(status = status.as_u16(), error = %self, "request refused")
            }
            ApiError::Unavailable { .. } => tracing::info!(error = %self, "unavailable"),
            _ => tracing::debug!(status = status.as_u16(), error = %self, "request failed"),
        }
        let message = match &self {
            ApiError::Invalid(e) => e.message.clone(),
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message,
                field,
            },
        };
        let mut resp = (status, Json(body)).into_response();
        match &self {
            ApiError::Refused { challenge, .. } => {
                if let Ok(v) = HeaderValue::from_str(challenge) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            ApiError::Unavailable { retry_after_s, .. } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            _ => {}
        }
        resp
    }
}

impl From<crate::identity::Refusal> for ApiError {
    fn from(r: crate::identity::Refusal) -> Self {
        use crate::identity::AuthError as A;
        let (status, code) = match &r.error {
            A::NotInitialized => {
                return ApiError::Unavailable {
                    code: "not_initialized",
                    message: r.error.to_string(),
                    retry_after_s: 5,
                }
            }
            A::Role(_) => (StatusCode::FORBIDDEN, "forbidden"),
            A::Scope(_) => (StatusCode::FORBIDDEN, "insufficient_scope"),
            A::Jwt(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            A::Session(crate::identity::session::SessionError::Csrf) => {
                (StatusCode::FORBIDDEN, "csrf")
            }
            A::Session(_) => (StatusCode::UNAUTHORIZED, "session"),
            A::Missing | A::Malformed(_) | A::UnknownToken => {
                (StatusCode::UNAUTHORIZED, "unauthorized")
            }
        };
        ApiError::Refused {
            status,
            code,
            message: r.error.to_string(),
            challenge: r.challenge,
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Invalid(e)
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match &e {
            ApplyError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            ApplyError::AlreadyExists { .. } => ApiError::Conflict {
                code: "already_exists",
                message: e.to_string(),
            },
            ApplyError::RevisionMismatch { .. } => ApiError::PreconditionFailed(e.to_string()),
            ApplyError::InUse { .. } => ApiError::Conflict {
                code: "in_use",
                message: e.to_string(),
            },
            ApplyError::MissingReference { field, .. } => {
                ApiError::Invalid(FieldError::new(field.clone(), e.to_string()))
            }
            ApplyError::QuotaExhausted { .. } => ApiError::Conflict {
                code: "quota_exhausted",
                message: e.to_string(),
            },
            ApplyError::AlreadyInitialized => ApiError::Conflict {
                code: "already_initialized",
                message: e.to_string(),
            },
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Apply(a) => a.into(),
            RegistryError::Invalid(f) => ApiError::Invalid(f),
            RegistryError::Conflict(m) => ApiError::Conflict {
                code: "conflict",
                message: m,
            },
            RegistryError::NotFound(m) => ApiError::NotFound(m),
            RegistryError::NoQuorum { maybe_applied, .. } => {
                let mut message = e.to_string();
                if maybe_applied {
                    message.push_str(
                        "; the write may still be applied: re-read before retrying, or retry with the same Idempotency-Key",
                    );
                }
                ApiError::Unavailable {
                    code: "no_quorum",
                    message,
                    retry_after_s: 1,
                }
            }
            RegistryError::NotInitialized => ApiError::Unavailable {
                code: "not_initialized",
                message: e.to_string(),
                retry_after_s: 5,
            },
            RegistryError::UpgradeInProgress(m) => ApiError::Unavailable {
                code: "upgrade_in_progress",
                message: m,
                retry_after_s: 5,
            },
            RegistryError::ShuttingDown => ApiError::Unavailable {
                code: "shutting_down",
                message: e.to_string(),
                retry_after_s: 1,
            },
            RegistryError::Internal(m) => ApiError::Internal(m),
            RegistryError::Forbidden(m) => ApiError::Forbidden(m),
        }
    }
}

/// Pulls the field name out of serde's messages (`unknown field `x``, `missing field `x``)
/// and prefixes the path axum reports (`timeouts.request_ms: invalid type ...`).
fn field_of(text: &str) -> Option<String> {
    let text = text
        .strip_prefix("Failed to deserialize the JSON body into the target type: ")
        .unwrap_or(text);
    let (path, rest) = match text.split_once(": ") {
        Some((p, r)) if !p.contains(' ') => (Some(p), r),
        _ => (None, text),
    };
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|pat| {
            let start = rest.find(pat)? + pat.len();
            let len = rest[start..].find('`')?;
            Some(rest[start..start + len].to_string())
        });
    match (path.filter(|p| *p != "."), named) {
        // serde_path_to_error already ends the path with an unknown field's name.
        (Some(p), Some(n)) if p == n || p.ends_with(&format!(".{n}")) => Some(p.to_string()),
        (Some(p), Some(n)) => Some(format!("{p}.{n}")),
        (None, Some(n)) => Some(n),
        (Some(p), None) => Some(p.to_string()),
        (None, None) => None,
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let text = r.body_text();
        match r {
            JsonRejection::JsonDataError(_) => ApiError::BadRequest {
                field: field_of(&text),
                message: text,
            },
            JsonRejection::JsonSyntaxError(_) => ApiError::BadRequest {
                message: format!("malformed JSON: {text}"),
                field: None,
            },
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::UnsupportedMediaType("expected Content-Type: application/json".into())
            }
            JsonRejection::BytesRejection(_) => ApiError::PayloadTooLarge(text),
            _ => ApiError::BadRequest {
                message: text,
                field: None,
            },
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        let text = r.body_text();
        ApiError::BadRequest {
            field: field_of(&text),
            message: text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::field_of;

    #[test]
    fn fields_are_found_in_serde_messages() {
        assert_eq!(
            field_of("Failed to deserialize the JSON body into the target type: pool_sise: unknown field `pool_sise`, expected one of `name` at line 1 column 42").as_deref(),
            Some("pool_sise")
        );
        assert_eq!(
            field_of("Failed to deserialize the JSON body into the target type: unknown field `pool_sise`, expected one of `name` at line 1 column 12").as_deref(),
            Some("pool_sise")
        );
        assert_eq!(
            field_of("Failed to deserialize the JSON body into the target type: missing field `name` at line 1 column 2").as_deref(),
            Some("name")
        );
        assert_eq!(
            field_of("Failed to deserialize the JSON body into the target type: timeouts.request_ms: invalid type: string \"x\", expected u64 at line 1 column 9").as_deref(),
            Some("timeouts.request_ms")
        );
        assert_eq!(
            field_of("Failed to deserialize the JSON body into the target type: timeouts: unknown field `foo`, expected `request_ms`").as_deref(),
            Some("timeouts.foo")
        );
    }
}
