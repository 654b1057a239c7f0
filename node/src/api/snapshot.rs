//! `GET /v1/snapshot`: the whole registry as one file (`mcpcp_proto::snapshot`), for
//! `mcpctl snapshot save`.
//!
//! The state is taken at a linearizable point: after a read barrier (`Registry::barrier`, the
//! ReadIndex protocol), the node's applied state holds every write acknowledged before the
//! request arrived. It is serialised once, off the data plane's threads, so its length and
//! checksum lead the stream; the body then goes out in chunks with a `Content-Length`, which
//! lets `mcpctl` show progress. A backup holds every token's hash and every sealed secret, so
//! only a cluster-admin may take one; each is logged with who took it.

use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use mcpcp_proto::snapshot::SnapshotHeader;

use super::error::ApiError;
use super::extract::Authorized;
use super::AppState;
use crate::identity::surface::ClusterWrite;

/// This node's applied state as a snapshot: its header and the state it describes. Serialised
/// off the data plane's threads; consistent as of whatever the node has applied (a caller that
/// needs a linearizable point runs a read barrier first).
pub async fn capture(state: &AppState) -> Result<(SnapshotHeader, Vec<u8>), ApiError> {
    let registry = state.registry.clone();
    let me = registry.id;
    let leader = registry.raft.metrics().borrow().current_leader == Some(me);
    let cluster = state.certs.node.identity.cluster.to_string();
    tokio::task::spawn_blocking(move || {
        let d = registry.local();
        let data = serde_json::to_vec(&*d)?;
        let header = SnapshotHeader {
            cluster,
            revision: d.state.revision,
            last_log_index: d.last_applied.map(|l| l.index).unwrap_or_default(),
            last_log_term: d.last_applied.map(|l| l.leader_id.term).unwrap_or_default(),
            node: me,
            leader,
            taken_at: crate::registry::now_unix(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            data_bytes: 0,
            sha256: String::new(),
        }
        .describe(&data);
        Ok::<_, serde_json::Error>((header, data))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(format!("serialising the state: {e}")))
}

/// The size of each chunk of the body.
const CHUNK: usize = 1 << 20;

pub async fn save(
    State(state): State<AppState>,
    Authorized(caller, _): Authorized<ClusterWrite>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    state.registry.barrier().await?;
    let (header, data) = capture(&state).await?;
    let head = Bytes::from(header.encode());
    let length = head.len() + data.len();
    let data = Bytes::from(data);
    let chunks = std::iter::once(head).chain(
        (0..data.len())
            .step_by(CHUNK)
            .map(move |at| data.slice(at..(at + CHUNK).min(data.len()))),
    );
    let body = Body::from_stream(futures_util::stream::iter(
        chunks.map(Ok::<_, std::convert::Infallible>),
    ));
    metrics::counter!("mcpd_snapshot_saves_total").increment(1);
    metrics::histogram!("mcpd_snapshot_save_prepare_seconds")
        .record(started.elapsed().as_secs_f64());
    tracing::info!(
        actor = %caller.token_id,
        revision = header.revision,
        bytes = length,
        sha256 = %header.sha256,
        "snapshot taken"
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, length.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"mcpd-{}-rev{}.snapshot\"",
                    header.cluster, header.revision
                ),
            ),
        ],
        body,
    )
        .into_response())
}
