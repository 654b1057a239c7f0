//! A node's first start from a snapshot: the other half of `mcpctl snapshot restore` (and of
//! `mcpctl cluster promote --force-new-cluster`).
//!
//! `mcpctl` leaves a plan and a copy of the snapshot file in the new data directory
//! (`mcpcp_proto::snapshot::RESTORE_PLAN`, `RESTORE_SNAPSHOT`); it knows nothing of the stores.
//! Before Raft starts, this module checks the file again, checks that this node's data key
//! opens the snapshot's sealed secrets, and writes the state as this node's Raft snapshot, with
//! the plan's members as the membership, at the snapshot's log index. openraft then starts from
//! that snapshot with an empty log, as a node does after installing one from a leader, and the
//! members elect a leader among themselves.
//!
//! The restored cluster is a new cluster: its members take node ids the snapshot's cluster
//! never had, so its members and the old cluster's refuse each other's calls (admission is by
//! membership, `tls::admission`) even when both hold certificates of the same CA.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mcpcp_proto::snapshot::{self, RestorePlan, SnapshotError, RESTORE_PLAN, RESTORE_SNAPSHOT};
use openraft::{CommittedLeaderId, Membership};

use crate::raft::state_machine::{SmData, StateMachineStore};
use crate::raft::typ::{LogId, StoredMembership};
use crate::seal::DataKey;

/// Where the log store of a node that is made a new cluster by force is set aside.
const SET_ASIDE: &str = "raft-log.redb.before-force-new-cluster";

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Plan { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Snapshot {
        path: PathBuf,
        source: SnapshotError,
    },
    #[error("the restore plan is for node {planned}, this is node {me}: give each node the data directory restored for it")]
    WrongNode { planned: u64, me: u64 },
    #[error("{0}")]
    Members(String),
    #[error("this data directory already holds a Raft log ({0}): a restore goes into a new, empty data directory")]
    NotEmpty(PathBuf),
    #[error("{0}: a restored node needs the data.key of the cluster the snapshot was taken from in its TLS directory")]
    NoDataKey(crate::seal::SealError),
    #[error("the snapshot's secrets do not open with this node's data key (server {server}): put the data.key of the cluster the snapshot was taken from into the TLS directory")]
    DataKey { server: String },
    #[error("the snapshot's audit trail does not check with this node's data key ({0}): the snapshot was rewritten, or the data.key in the TLS directory is another cluster's")]
    AuditTrail(mcpcp_proto::audit::ChainError),
    #[error("restore.snapshot: its state is unreadable: {0}")]
    State(String),
    #[error("writing the restored state: {0}")]
    Store(String),
}

/// What a restore did, for the start-up log.
#[derive(Debug)]
pub struct Restored {
    pub revision: u64,
    pub from_cluster: String,
    pub members: Vec<mcpcp_proto::api::Member>,
    /// What every member of this restore shares (`RestorePlan::fingerprint`).
    pub fingerprint: String,
}

/// Builds this node's stores from a waiting restore, if there is one. Called before the log
/// store is opened; `log_path` is where it lives.
pub async fn apply_pending(
    data_dir: &Path,
    log_path: &Path,
    me: u64,
    tls_dir: &Path,
    sm: &StateMachineStore,
) -> Result<Option<Restored>, RestoreError> {
    let plan_path = data_dir.join(RESTORE_PLAN);
    let text = match std::fs::read_to_string(&plan_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RestoreError::Io {
                path: plan_path,
                source,
            })
        }
    };
    let plan: RestorePlan = serde_json::from_str(&text).map_err(|e| RestoreError::Plan {
        path: plan_path.clone(),
        message: e.to_string(),
    })?;
    if plan.node != me {
        return Err(RestoreError::WrongNode {
            planned: plan.node,
            me,
        });
    }
    if log_path.exists() && !plan.force_new_cluster {
        return Err(RestoreError::NotEmpty(log_path.to_path_buf()));
    }
    let snap_path = data_dir.join(RESTORE_SNAPSHOT);
    let file = std::fs::File::open(&snap_path).map_err(|source| RestoreError::Io {
        path: snap_path.clone(),
        source,
    })?;
    let (header, bytes) = snapshot::read(file).map_err(|source| RestoreError::Snapshot {
        path: snap_path.clone(),
        source,
    })?;
    let mut data: SmData =
        serde_json::from_slice(&bytes).map_err(|e| RestoreError::State(e.to_string()))?;
    if data.state.revision != header.revision {
        return Err(RestoreError::State(format!(
            "it holds revision {}, its header says {}",
            data.state.revision, header.revision
        )));
    }
    plan.check(&data.state.node_ids_ever)
        .map_err(RestoreError::Members)?;
    let data_key = DataKey::load(tls_dir).map_err(RestoreError::NoDataKey)?;
    check_data_key(&data, &data_key, plan.allow_unkeyed_audit)?;

    // The log position from the checksummed state, not the header.
    let index = data.last_applied.map_or(0, |l| l.index);
    let log_id = LogId::new(CommittedLeaderId::new(0, 0), index);
    let voters: BTreeSet<u64> = plan.members.iter().map(|m| m.id).collect();
    let nodes: BTreeMap<u64, _> = plan.members.iter().map(|m| (m.id, m.clone())).collect();
    data.last_applied = Some(log_id);
    data.membership = StoredMembership::new(Some(log_id), Membership::new(vec![voters], nodes));
    data.state
        .node_ids_ever
        .extend(plan.members.iter().map(|m| m.id));
    // What the old cluster's leader had placed on its nodes; the new leader places again.
    data.state.placements.clear();
    let fingerprint = plan.fingerprint(&header.sha256);
    data.state.restored_as = Some(fingerprint.clone());
    if log_path.exists() {
        // Every check passed: the node's own log goes aside, not away (the state it applied
        // is in the plan's snapshot; the rest stays for a post-mortem).
        let aside = data_dir.join(SET_ASIDE);
        std::fs::rename(log_path, &aside).map_err(|source| RestoreError::Io {
            path: aside,
            source,
        })?;
        sync_dir(data_dir)?;
    }
    sm.restore(data)
        .await
        .map_err(|e| RestoreError::Store(e.to_string()))?;
    // The plan first: without it the next start is an ordinary one, whatever is left.
    for done in [&plan_path, &snap_path] {
        std::fs::remove_file(done).map_err(|source| RestoreError::Io {
            path: done.clone(),
            source,
        })?;
    }
    sync_dir(data_dir)?;
    if plan.force_new_cluster {
        metrics::counter!("mcpd_cluster_force_new_total").increment(1);
    }
    let restored = Restored {
        revision: header.revision,
        from_cluster: header.cluster,
        members: plan.members.clone(),
        fingerprint,
    };
    metrics::counter!("mcpd_snapshot_restores_total").increment(1);
    Ok(Some(restored))
}

fn sync_dir(dir: &Path) -> Result<(), RestoreError> {
    mcpcp_pki::files::sync_dir(dir).map_err(|source| RestoreError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Every sealed secret of the snapshot opens with `key`, and its audit trail chains and carries
/// the MACs of `key` (a snapshot rewritten by someone without the key is refused), events
/// without one only before the first that has one, and only when the plan accepts them.
fn check_data_key(data: &SmData, key: &DataKey, allow_unkeyed: bool) -> Result<(), RestoreError> {
    for (name, server) in &data.state.servers {
        let mut spec = server.spec.clone();
        if key.open_secrets(&mut spec).is_err() {
            return Err(RestoreError::DataKey {
                server: name.clone(),
            });
        }
    }
    let trail: Vec<_> = data.state.audit.iter().cloned().collect();
    let ends_at_head = trail
        .last()
        .is_none_or(|last| last.seq == data.state.audit_seq && last.hash == data.state.audit_head);
    if !ends_at_head {
        return Err(RestoreError::AuditTrail(
            mcpcp_proto::audit::ChainError::Broken {
                seq: data.state.audit_seq,
                before: trail.last().map_or(0, |e| e.seq),
            },
        ));
    }
    mcpcp_proto::audit::verify(&trail)
        .and_then(|()| {
            let rule = mcpcp_proto::audit::MacRule {
                allow_unkeyed,
                after_keyed: false,
            };
            mcpcp_proto::audit::verify_macs(&trail, |e| key.audit_key().checks(e), rule)
        })
        .map(|_| ())
        .map_err(RestoreError::AuditTrail)
}

/// How often a restored node asks its fellow members how they were restored.
const ASK_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// The first start after a restore: this node stands for election only once a majority of the
/// plan's members (itself included) say they were restored by the same plan and snapshot, and
/// none that answers says otherwise. Members given different member lists, or different
/// snapshots, would otherwise elect leaders among themselves and form clusters side by side;
/// this way no two of them form one: a member that differs from those that answer never
/// stands (it says why, every 10 s, until the operator restores it again), and the others
/// stand only when a majority of them agree and none they hear from differs. The caller turned
/// elections off as it started Raft; this turns them on.
pub async fn hold_first_election(
    registry: crate::registry::Registry,
    restored: Restored,
    shutdown: crate::shutdown::Shutdown,
) {
    let others: Vec<_> = restored
        .members
        .iter()
        .filter(|m| m.id != registry.id)
        .cloned()
        .collect();
    let majority = restored.members.len() / 2 + 1;
    let mut warned: Option<std::time::Instant> = None;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let answers =
            futures_util::future::join_all(others.iter().map(|m| registry.ping(m, ASK_EVERY * 5)))
                .await;
        let mut agree = 1; // this node
        let mut differ = Vec::new();
        for (m, a) in others.iter().zip(answers) {
            match a.map(|r| r.restored_as) {
                Ok(Some(f)) if f == restored.fingerprint => agree += 1,
                Ok(other) => differ.push(format!(
                    "node {} ({})",
                    m.id,
                    other.as_deref().unwrap_or("not restored")
                )),
                Err(_) => {}
            }
        }
        if differ.is_empty() && agree >= majority {
            registry.raft.runtime_config().elect(true);
            tracing::info!(agree, members = restored.members.len(), fingerprint = %restored.fingerprint, "the restored members agree: elections on");
            return;
        }
        if !differ.is_empty() && warned.is_none_or(|t| t.elapsed().as_secs() >= 10) {
            warned = Some(std::time::Instant::now());
            tracing::error!(
                fingerprint = %restored.fingerprint,
                differ = %differ.join(", "),
                "members were restored from another member list or snapshot: no election until every member is restored with the same `--member` list and file"
            );
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(ASK_EVERY) => {}
        }
    }
}
