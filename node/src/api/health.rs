//! Probes and metrics: `/livez` (the process answers), `/readyz` (it can serve: member of a
//! cluster with a known leader and its applied state caught up; it also says the edge's TLS
//! mode), `/metrics` (Prometheus; a metrics or admin token).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::extract::Authorized;
use super::AppState;
use crate::identity::surface::MetricsRead;

/// Entries a node may have appended but not yet applied and still call itself ready.
const READY_APPLY_LAG: u64 = 64;

/// How long a leader may go without a quorum's acknowledgement and still call itself ready.
const LEADER_QUORUM_ACK_MS: u64 = 3000;

pub async fn livez() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let m = state.registry.raft.metrics().borrow().clone();
    let member = m.membership_config.membership().get_node(&m.id).is_some();
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    let apply_lag = m.last_log_index.unwrap_or(0).saturating_sub(applied);
    // A leader that has not heard from a quorum lately cannot commit anything. (A leader just
    // elected has no acknowledgement yet, but a quorum voted for it a moment ago.)
    let leader_without_quorum = m.current_leader == Some(m.id)
        && m.membership_config.membership().voter_ids().count() > 1
        && m.millis_since_quorum_ack
            .is_some_and(|ms| ms > LEADER_QUORUM_ACK_MS);
    let reason = if !member {
        Some("not a member of an initialised cluster")
    } else if m.current_leader.is_none() {
        Some("no known leader")
    } else if leader_without_quorum {
        Some("leader without quorum")
    } else if apply_lag > READY_APPLY_LAG {
        Some("applied state is catching up")
    } else {
        None
    };
    let body = json!({
        "ready": reason.is_none(),
        "reason": reason,
        "node_id": m.id,
        "leader": m.current_leader,
        "apply_lag": apply_lag,
        "tls": state.tls.as_str(),
    });
    let status = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

pub async fn metrics(
    State(state): State<AppState>,
    _reader: Authorized<MetricsRead>,
) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
