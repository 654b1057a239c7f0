//! Cluster endpoints: who this node is, bootstrap, status, membership changes, and the watch
//! stream of registry changes.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use mcpcp_proto::api::{
    AddNodeRequest, ClusterStatus, InitRequest, InitResponse, Member, MemberStatus, NodeInfo,
    WatchEvent,
};
use serde::Deserialize;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use super::error::ApiError;
use super::extract::{Admin, ApiJson, ApiQuery};
use super::AppState;
use crate::registry::MembershipChange;

/// Lag (entries) beyond which a member is reported as `lagging`.
const LAGGING_ENTRIES: u64 = 100;

pub async fn node_info(State(state): State<AppState>) -> Json<NodeInfo> {
    let me = &state.registry.me;
    let initialized = state.registry.raft.is_initialized().await.unwrap_or(false);
    Json(NodeInfo {
        id: me.id,
        http_addr: me.http_addr.clone(),
        grpc_addr: me.grpc_addr.clone(),
        initialized,
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// Bootstraps a cluster. Open without a token on purpose (there is none yet); closed for good
/// once the cluster has an admin token.
pub async fn init(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<InitRequest>,
) -> Result<(StatusCode, Json<InitResponse>), ApiError> {
    let (members, admin_token) = state.registry.init(req.members).await?;
    let leader = state
        .registry
        .raft
        .metrics()
        .borrow()
        .current_leader
        .unwrap_or(state.registry.id);
    Ok((
        StatusCode::CREATED,
        Json(InitResponse {
            leader,
            members: members.into_iter().collect(),
            admin_token,
        }),
    ))
}

fn role_name(state: openraft::ServerState) -> &'static str {
    match state {
        openraft::ServerState::Leader => "leader",
        openraft::ServerState::Follower => "follower",
        openraft::ServerState::Candidate => "candidate",
        openraft::ServerState::Learner => "learner",
        openraft::ServerState::Shutdown => "shutdown",
    }
}

/// This node's view of the cluster. Member health and lag are known on the leader only;
/// `mcpctl cluster status` asks the leader for them.
pub async fn status(State(state): State<AppState>, _admin: Admin) -> Json<ClusterStatus> {
    let m = state.registry.raft.metrics().borrow().clone();
    let revision = state.registry.local().state.revision;
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id).cloned().flatten())
                .map(|l| l.index);
            let (matched_index, lag, health) = if *id == m.id {
                (m.last_log_index, Some(0), "healthy")
            } else if m.replication.is_some() {
                let last = m.last_log_index.unwrap_or(0);
                match matched {
                    Some(i) => {
                        let lag = last.saturating_sub(i);
                        (
                            Some(i),
                            Some(lag),
                            if lag > LAGGING_ENTRIES {
                                "lagging"
                            } else {
                                "healthy"
                            },
                        )
                    }
                    None => (None, None, "unreachable"),
                }
            } else {
                (None, None, "unknown")
            };
            MemberStatus {
                id: *id,
                http_addr: node.http_addr.clone(),
                grpc_addr: node.grpc_addr.clone(),
                voter: voters.contains(id),
                matched_index,
                lag,
                health: health.to_string(),
            }
        })
        .collect();
    Json(ClusterStatus {
        node_id: m.id,
        leader: m.current_leader,
        term: m.current_term,
        state: role_name(m.state).to_string(),
        last_log_index: m.last_log_index,
        committed_index: None,
        applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        revision,
        members,
    })
}

pub async fn add_node(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(req): ApiJson<AddNodeRequest>,
) -> Result<(StatusCode, Json<Member>), ApiError> {
    if req.http_addr.is_empty() {
        return Err(ApiError::bad_field("http_addr", "is required"));
    }
    if req.grpc_addr.is_empty() {
        return Err(ApiError::bad_field("grpc_addr", "is required"));
    }
    let member = Member {
        id: req.id,
        http_addr: req.http_addr.clone(),
        grpc_addr: req.grpc_addr.clone(),
    };
    state
        .registry
        .change_membership(MembershipChange::Add(req))
        .await?;
    Ok((StatusCode::CREATED, Json(member)))
}

pub async fn remove_node(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<u64>,
) -> Result<StatusCode, ApiError> {
    state
        .registry
        .change_membership(MembershipChange::Remove { id })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchParams {
    /// Stream changes after this revision; without it, only changes from now on.
    #[serde(default)]
    pub since: Option<u64>,
}

/// `GET /v1/watch?since=REV`: newline-delimited JSON [`WatchEvent`]s, kept open. A `reset`
/// event means the watcher missed changes (it fell behind, or a snapshot replaced the state)
/// and must re-read everything.
pub async fn watch(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(params): ApiQuery<WatchParams>,
) -> Response {
    let sub = state.registry.subscribe(params.since);
    let registry = state.registry.clone();
    let backlog = futures_util::stream::iter(sub.backlog);
    let live = BroadcastStream::new(sub.live).map(move |item| match item {
        Ok(ev) => ev,
        Err(BroadcastStreamRecvError::Lagged(_)) => WatchEvent::Reset {
            revision: registry.local().state.revision,
        },
    });
    let lines = backlog.chain(live).map(|ev| {
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, Infallible>(line)
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}
