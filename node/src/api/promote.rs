//! `POST /v1/cluster/promote` with `force_new_cluster`: a node whose voters are lost (the
//! standby site's learner after the main site is gone) becomes a one-node cluster of its own
//! state, as etcd's `--force-new-cluster` does; the operator then grows it with `cluster
//! add-node`.
//!
//! The node writes its applied state and a plan naming itself the only member into its data
//! directory (the same files `mcpctl snapshot restore` lays out, `crate::restore`), answers,
//! and starts again in place; at that start it sets its Raft log aside and starts from the
//! state. It refuses while any voter answers it: a cluster whose voters live is changed with
//! `add-node` and `remove-node`, never split in two. A voter it cannot reach but that lives (a
//! partition between the sites) is the operator's to fence first, as with etcd.

use std::path::Path;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use mcpcp_proto::api::{PromoteRequest, PromoteResponse};
use mcpcp_proto::snapshot::{RestorePlan, RESTORE_PLAN, RESTORE_SNAPSHOT};

use super::error::ApiError;
use super::extract::{ApiJson, Authorized};
use super::AppState;
use crate::identity::surface::ClusterWrite;

/// How long each voter is given to answer before it counts as lost.
const PROBE: Duration = Duration::from_secs(2);

pub async fn promote(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<ClusterWrite>,
    ApiJson(req): ApiJson<PromoteRequest>,
) -> Result<(StatusCode, Json<PromoteResponse>), ApiError> {
    if !req.force_new_cluster {
        return Err(ApiError::bad_field(
            "force_new_cluster",
            "must be true: a learner of a healthy cluster becomes a voter with `mcpctl cluster add-node`",
        ));
    }
    let registry = &state.registry;
    let Some(me) = registry.members().into_iter().find(|m| m.id == registry.id) else {
        return Err(ApiError::Conflict {
            code: "not_member",
            message: "this node is not a member of a cluster: there is no state to promote".into(),
        });
    };
    // Any voter that answers means the old site is not gone: promoting now would make two
    // clusters. Each is asked directly, not through a leader.
    let voters: Vec<_> = {
        let m = registry.raft.metrics().borrow().clone();
        let ids: std::collections::BTreeSet<u64> =
            m.membership_config.membership().voter_ids().collect();
        registry
            .members()
            .into_iter()
            .filter(|n| ids.contains(&n.id) && n.id != registry.id)
            .collect()
    };
    let answers =
        futures_util::future::join_all(voters.iter().map(|v| registry.ping(v, PROBE))).await;
    let alive: Vec<String> = voters
        .iter()
        .zip(answers)
        .filter(|(_, a)| a.is_ok())
        .map(|(v, _)| format!("node {} ({})", v.id, v.grpc_addr))
        .collect();
    if !alive.is_empty() {
        return Err(ApiError::Conflict {
            code: "voters_alive",
            message: format!(
                "{} still answer: --force-new-cluster is for a site whose voters are lost; stop them (fence the old site) first, or, while the cluster is healthy, make this node a voter with `mcpctl cluster add-node`",
                alive.join(", ")
            ),
        });
    }
    let (header, data) = super::snapshot::capture(&state).await?;
    let plan = RestorePlan {
        node: me.id,
        members: vec![me],
        force_new_cluster: true,
        // The node's own trail, as it holds it: what it already accepted.
        allow_unkeyed_audit: true,
    };
    let dir = state.data_dir.clone();
    let mut file = header.encode();
    file.extend_from_slice(&data);
    tokio::task::spawn_blocking(move || write_plan(&dir, &file, &plan))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("writing the restore plan: {e}")))?;
    tracing::warn!(
        actor = %caller.token_id,
        revision = header.revision,
        "forcing a new cluster of this node alone: restarting in place"
    );
    // The answer is written before the node stops: shutdown lets open requests finish.
    state.restart.request();
    Ok((
        StatusCode::ACCEPTED,
        Json(PromoteResponse {
            node: registry.id,
            revision: header.revision,
        }),
    ))
}

/// The snapshot file, then the plan that makes the next start use it (the commit point), each
/// written privately and renamed into place, so that a crash leaves either no plan or a whole
/// one.
fn write_plan(dir: &Path, snapshot: &[u8], plan: &RestorePlan) -> Result<(), String> {
    let plan = serde_json::to_vec_pretty(plan).map_err(|e| e.to_string())?;
    for (name, bytes) in [
        (RESTORE_SNAPSHOT, snapshot),
        (RESTORE_PLAN, plan.as_slice()),
    ] {
        mcpcp_pki::files::write_private_bytes(&dir.join(name), bytes).map_err(|e| e.to_string())?;
    }
    mcpcp_pki::files::sync_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))
}
