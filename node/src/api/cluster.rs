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
use super::extract::{ApiJson, ApiQuery, Authorized, RemoteAddr};
use super::AppState;
use crate::identity::surface::{ClusterRead, ClusterWrite};
use crate::registry::state::AuditContext;
use crate::registry::MembershipChange;

/// Lag (entries) beyond which a member is reported as `lagging`.
const LAGGING_ENTRIES: u64 = 100;

/// How long `cluster status` waits for each member's answer.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

pub async fn node_info(State(state): State<AppState>) -> Json<NodeInfo> {
    let me = &state.registry.me;
    let initialized = state.registry.raft.is_initialized().await.unwrap_or(false);
    Json(NodeInfo {
        id: me.id,
        http_addr: me.http_addr.clone(),
        grpc_addr: me.grpc_addr.clone(),
        initialized,
        version: env!("CARGO_PKG_VERSION").to_string(),
        peer_cert_expires_at: state.certs.node.peer_cert.not_after().map(unix),
        edge_cert_expires_at: state
            .certs
            .edge
            .as_ref()
            .and_then(|e| e.not_after())
            .map(unix),
        sandbox: crate::pool::sandbox::capabilities().clone(),
    })
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Bootstraps a cluster. Open without a token on purpose (there is none yet); closed for good
/// once the cluster has an admin token.
pub async fn init(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<InitRequest>,
) -> Result<(StatusCode, Json<InitResponse>), ApiError> {
    let joined = crate::join::told_members(state.certs.node.dir())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if joined.is_some() {
        return Err(ApiError::Conflict {
            code: "joined",
            message: "this node joined an existing cluster with a join token; it waits for `mcpctl cluster add-node`, not init".into(),
        });
    }
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

/// `POST /v1/node/rotate-certs`: this node issues itself new certificates now (peer and
/// edge), without a restart; `mcpctl cluster rotate-certs` calls it on every member.
pub async fn rotate_certs(
    State(state): State<AppState>,
    _caller: Authorized<ClusterWrite>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // An operator's rare call: its key generation and two small fsyncs hold this shard for a
    // few milliseconds; a node without the CA key waits on a member's answer, not the shard.
    let (peer, edge) = state.certs.rotate().await.map_err(|e| match e {
        crate::tls::TlsError::NotSigned(why) => ApiError::Unavailable {
            code: "not_signed",
            message: format!("no member that holds the CA key signed the certificates: {why}"),
            retry_after_s: 5,
        },
        other => ApiError::Internal(other.to_string()),
    })?;
    let unix = |t: Option<std::time::SystemTime>| {
        t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    };
    tracing::info!(node = state.registry.id, "certificates rotated on request");
    Ok(Json(serde_json::json!({
        "node": state.registry.id,
        "peer_not_after": unix(peer),
        "edge_not_after": unix(edge),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// The id of the node the token lets join (never a member before).
    pub node_id: u64,
    /// How long the token stays valid (default 900 s, at most a day).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

/// `POST /v1/cluster/join-tokens` (admin): a single-use join token for one node id.
pub async fn create_join_token(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    ApiJson(req): ApiJson<JoinTokenRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    if req.node_id == 0 {
        return Err(ApiError::bad_field("node_id", "must be greater than 0"));
    }
    let ttl = req.ttl_seconds.unwrap_or(900);
    if ttl == 0 || ttl > 86_400 {
        return Err(ApiError::bad_field(
            "ttl_seconds",
            "must be from 1 to 86400",
        ));
    }
    let Some(ca) = &state.certs.node.ca else {
        return Err(ApiError::Conflict {
            code: "no_ca_key",
            message: "this node holds no CA key, so it cannot let a node join; ask one that does"
                .into(),
        });
    };
    let (token, expires_at) = state
        .registry
        .create_join_token(
            req.node_id,
            ttl,
            &ca.fingerprint(),
            AuditContext::of(&caller, from.0),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "token": token,
            "node_id": req.node_id,
            "expires_at": expires_at,
        })),
    ))
}

/// `POST /v1/cluster/join`: a joining node redeems its token for the cluster CA and the data
/// key (see `crate::join`). No bearer token: the join token is the credential, and the
/// joining node pinned this node's CA before sending it.
pub async fn join(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<crate::join::JoinRequest>,
) -> Result<Json<crate::join::JoinMaterial>, ApiError> {
    let Some(ca) = &state.certs.node.ca else {
        return Err(ApiError::Conflict {
            code: "no_ca_key",
            message: "this node holds no CA key; join through one that does".into(),
        });
    };
    if state.tls == crate::tls::edge::EdgeTlsMode::Off {
        // The data key would cross the balancer's last hop in clear text.
        return Err(ApiError::Conflict {
            code: "plain_http",
            message: "this node serves plain HTTP (api.tls = off); join through a node's own HTTPS"
                .into(),
        });
    }
    if req.edge_names.is_empty() || req.edge_names.len() > 32 {
        return Err(ApiError::bad_field("edge_names", "give 1 to 32 names"));
    }
    // Everything that can fail comes before the token is used up.
    let dir = state.certs.node.dir().to_path_buf();
    let key = tokio::task::spawn_blocking(move || mcpcp_pki::datakey::load(&dir))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let ttl = state.certs.node.ttl();
    let node_cert = ca
        .sign_node_request(&req.peer_csr, req.node_id, ttl)
        .map_err(|e| ApiError::bad_field("peer_csr", e.to_string()))?;
    let edge_cert = ca
        .sign_server_request(&req.edge_csr, &req.edge_names, ttl)
        .map_err(|e| ApiError::bad_field("edge_csr", e.to_string()))?;
    if let Err(e) = state
        .registry
        .redeem_join_token(&req.token, req.node_id)
        .await
    {
        metrics::counter!("mcpd_join_tokens_redeemed_total", "outcome" => "refused").increment(1);
        return Err(e.into());
    }
    metrics::counter!("mcpd_join_tokens_redeemed_total", "outcome" => "joined").increment(1);
    Ok(Json(crate::join::JoinMaterial {
        ca_pem: ca.cert_pem().to_string(),
        node_cert_pem: node_cert,
        edge_cert_pem: format!("{edge_cert}{}", ca.cert_pem()),
        data_key: hex::encode(key),
        members: state.registry.members().iter().map(|m| m.id).collect(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// The code `mcpd recover-admin` wrote for this node.
    pub code: String,
}

/// `POST /v1/cluster/recover-admin`: redeems a recovery code that `mcpd recover-admin` left
/// in this node's data directory (see `crate::recovery`) for a new admin token. No bearer
/// token: the code proves access to the node's host.
pub async fn recover_admin(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RecoverRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let dir = state.data_dir.clone();
    let redeemed = tokio::task::spawn_blocking(move || crate::recovery::redeem(&dir, &req.code))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Err(e) = redeemed {
        metrics::counter!("mcpd_admin_recoveries_total", "outcome" => "refused").increment(1);
        tracing::warn!(error = %e, "refused an admin recovery");
        return Err(match e {
            crate::recovery::RecoveryError::Io { .. }
            | crate::recovery::RecoveryError::Random(_) => ApiError::Internal(e.to_string()),
            _ => ApiError::Forbidden(e.to_string()),
        });
    }
    let (id, token) = state.registry.recover_admin().await?;
    metrics::counter!("mcpd_admin_recoveries_total", "outcome" => "issued").increment(1);
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "token_id": id, "admin_token": token })),
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

/// The cluster as this node sees it, with every member pinged (in parallel, bounded) so that
/// any node can tell which members answer. Replication lag is known on the leader only;
/// `mcpctl cluster status` asks the leader for it.
pub async fn status(
    State(state): State<AppState>,
    _caller: Authorized<ClusterRead>,
) -> Json<ClusterStatus> {
    let m = state.registry.raft.metrics().borrow().clone();
    let revision = state.registry.local().state.revision;
    let membership = m.membership_config.membership().clone();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let nodes: Vec<Member> = membership.nodes().map(|(_, n)| n.clone()).collect();
    let pings = futures_util::future::join_all(nodes.iter().map(|n| {
        let registry = state.registry.clone();
        let n = n.clone();
        async move {
            if n.id == registry.id {
                return Ok(None);
            }
            registry.ping(&n, PING_TIMEOUT).await.map(Some)
        }
    }))
    .await;
    let last = m.last_log_index.unwrap_or(0);
    let members = nodes
        .iter()
        .zip(pings)
        .map(|(node, ping)| {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&node.id).cloned().flatten())
                .map(|l| l.index);
            let (matched_index, applied_index) = if node.id == m.id {
                (m.last_log_index, m.last_applied.map(|l| l.index))
            } else {
                (
                    matched,
                    ping.as_ref()
                        .ok()
                        .and_then(|p| p.as_ref())
                        .and_then(|p| p.applied_index),
                )
            };
            let lag = matched_index
                .filter(|_| m.replication.is_some() || node.id == m.id)
                .map(|i| last.saturating_sub(i));
            let health = match (&ping, lag) {
                (Err(_), _) => "unreachable",
                (Ok(_), Some(l)) if l > LAGGING_ENTRIES => "lagging",
                (Ok(_), _) => "healthy",
            };
            MemberStatus {
                id: node.id,
                http_addr: node.http_addr.clone(),
                grpc_addr: node.grpc_addr.clone(),
                voter: voters.contains(&node.id),
                matched_index,
                lag,
                applied_index,
                health: health.to_string(),
            }
        })
        .collect();
    // On the leader: the highest index a quorum of voters holds.
    let committed_index = m.replication.as_ref().and_then(|rep| {
        let mut held: Vec<u64> = voters
            .iter()
            .map(|id| {
                if *id == m.id {
                    last
                } else {
                    rep.get(id).cloned().flatten().map(|l| l.index).unwrap_or(0)
                }
            })
            .collect();
        held.sort_unstable_by(|a, b| b.cmp(a));
        held.get(voters.len() / 2).copied()
    });
    Json(ClusterStatus {
        node_id: m.id,
        leader: m.current_leader,
        term: m.current_term,
        state: role_name(m.state).to_string(),
        last_log_index: m.last_log_index,
        committed_index,
        applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        revision,
        members,
    })
}

pub async fn add_node(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
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
        .change_membership(
            MembershipChange::Add(req),
            AuditContext::of(&caller, from.0),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(member)))
}

pub async fn remove_node(
    State(state): State<AppState>,
    Authorized(caller, ClusterWrite): Authorized<ClusterWrite>,
    from: RemoteAddr,
    Path(id): Path<u64>,
) -> Result<StatusCode, ApiError> {
    state
        .registry
        .change_membership(
            MembershipChange::Remove { id },
            AuditContext::of(&caller, from.0),
        )
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
    _caller: Authorized<ClusterRead>,
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
