//! The audit trail (`/v1/audit`): admin changes as the registry recorded them, each with who,
//! from where, what and the revision it produced, chained by hash (`mcpcp_proto::audit`).
//! `GET /v1/watch` streams new events as objects of kind `audit`. `POST /v1/audit/verify`
//! checks their MACs, which only the cluster's key makes.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use mcpcp_proto::api::WriteAck;
use mcpcp_proto::audit::{AuditPage, AuditRetention, AuditVerdict, AuditVerify};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{read_barrier, ApiJson, ApiQuery, Authorized, Consistency, RemoteAddr};
use super::objects::write;
use super::AppState;
use crate::identity::surface::{ClusterRead, ClusterWrite};
use crate::registry::state::Command;

/// Events one page holds at most.
const MAX_PAGE: usize = 10_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Events after this sequence number.
    #[serde(default)]
    since: u64,
    /// Only this actor's (a token id, `jwt:ISSUER:SUBJECT`, or a JWT subject).
    #[serde(default)]
    actor: Option<String>,
    /// Only this kind (`put_server`, `revoke_token`...).
    #[serde(default)]
    kind: Option<String>,
    /// At most this many (default and maximum 10,000).
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    consistency: Consistency,
}

pub async fn list(
    State(state): State<AppState>,
    _caller: Authorized<ClusterRead>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    if q.limit == Some(0) {
        return Err(ApiError::bad_field("limit", "must be greater than 0"));
    }
    read_barrier(&state, q.consistency).await?;
    let limit = q.limit.unwrap_or(MAX_PAGE).min(MAX_PAGE);
    let data = state.registry.local();
    let s = &data.state;
    let items = s
        .audit
        .iter()
        .filter(|e| e.seq > q.since)
        .filter(|e| {
            q.actor
                .as_deref()
                .is_none_or(|a| e.actor.token_id == a || e.actor.subject.as_deref() == Some(a))
        })
        .filter(|e| q.kind.as_deref().is_none_or(|k| e.kind == k))
        .take(limit)
        .cloned()
        .collect();
    Ok(Json(AuditPage {
        revision: s.revision,
        first_kept: s.audit.front().map_or(s.audit_seq + 1, |e| e.seq),
        head_seq: s.audit_seq,
        head_hash: s.audit_head.clone(),
        items,
    }))
}

pub async fn set_retention(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    headers: HeaderMap,
    ApiJson(req): ApiJson<AuditRetention>,
) -> Result<Json<WriteAck>, ApiError> {
    if !(100..=1_000_000).contains(&req.events) {
        return Err(ApiError::bad_field("events", "must be 100 to 1000000"));
    }
    let command = Command::SetAuditRetention { events: req.events };
    Ok(Json(
        write(&state, &headers, (&caller, &from), command).await?,
    ))
}

/// Checks the MACs (and the hash chain) of the events this node holds, or of an exported
/// file's, with the cluster's audit key: whether the trail was written by the cluster, not
/// only whether it is internally consistent.
pub async fn verify(
    State(state): State<AppState>,
    _caller: Authorized<ClusterRead>,
    ApiJson(mut req): ApiJson<AuditVerify>,
) -> Result<Json<AuditVerdict>, ApiError> {
    let (source, events) = match req.events.take() {
        Some(events) => ("posted", events),
        None => (
            "held",
            state.registry.local().state.audit.iter().cloned().collect(),
        ),
    };
    // A hash, a serialisation and an HMAC per event: off the runtime's threads.
    let key = state.data_key.audit_key().clone();
    let rule = req.rule();
    let verdict =
        tokio::task::spawn_blocking(move || AuditVerdict::of(&events, |e| key.checks(e), rule))
            .await
            .map_err(|e| ApiError::Internal(format!("verifying the audit trail: {e}")))?;
    if let Some(broken) = &verdict.broken {
        metrics::counter!("mcpd_audit_chain_broken_total", "source" => source).increment(1);
        tracing::warn!(source, first = verdict.first, last = verdict.last, %broken, "audit chain does not verify");
    }
    Ok(Json(verdict))
}
