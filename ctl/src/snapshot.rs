//! `mcpctl snapshot save|status|restore`: backups of the registry and new clusters made from
//! them, as `etcdctl snapshot save` and `etcdutl snapshot restore` do for etcd.
//!
//! - **save** asks the leader (any node when the leader cannot be found) for `GET
//!   /v1/snapshot`, writes it to `FILE.part` (0600), checks its length and checksum, syncs it
//!   and only then links it to `FILE`: a file named `FILE` is always a whole, checked snapshot,
//!   and never one that was there before.
//! - **status** checks a file and prints its header.
//! - **restore** checks a file and lays out one new node's data directory: a copy of the file,
//!   and the plan (this node, every member of the new cluster). `mcpd` builds its
//!   stores from them at its first start (`mcpd/src/restore.rs`), after it checked the file
//!   again and that its data key opens the snapshot's secrets. Run it once per member, as
//!   `etcdutl snapshot restore` is.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use mcpcp_proto::snapshot::{
    self, RestorePlan, SnapshotError, SnapshotHeader, RESTORE_PLAN, RESTORE_SNAPSHOT,
};
use serde::Deserialize;

use crate::{AdminClient, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotCmdError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: SnapshotError,
    },
    #[error("{0}")]
    Write(#[from] mcpcp_pki::PkiError),
    #[error("{0}")]
    Usage(String),
}

impl SnapshotCmdError {
    pub fn exit_code(&self) -> i32 {
        match self {
            SnapshotCmdError::Client(e) => e.exit_code(),
            SnapshotCmdError::Usage(_) => 2,
            _ => 1,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotCmdError + '_ {
    move |source| SnapshotCmdError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a snapshot was saved from.
pub struct Saved {
    pub header: SnapshotHeader,
    pub from: String,
    pub bytes: u64,
}

/// Saves a snapshot into `file`, calling `progress(received, total)` as bytes arrive.
pub async fn save(
    client: &AdminClient,
    file: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Saved, SnapshotCmdError> {
    if file.exists() {
        return Err(SnapshotCmdError::Usage(format!(
            "{} exists; a snapshot is never written over another file",
            file.display()
        )));
    }
    let part = PathBuf::from(format!("{}.part", file.display()));
    let saved = download(client, file, &part, progress).await;
    if saved.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    let (header, from, received) = saved?;
    Ok(Saved {
        header,
        from,
        bytes: received,
    })
}

/// Downloads into `part` (a new file, 0600: it holds token hashes and sealed secrets), checks
/// it, and names it `file` without ever replacing a file of that name.
async fn download(
    client: &AdminClient,
    file: &Path,
    part: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<(SnapshotHeader, String, u64), SnapshotCmdError> {
    // The leader, as addressed by the cluster; the given endpoints when that address is not
    // reachable from here (a port-forward, a VIP, NAT): any node's snapshot follows a read
    // barrier too.
    let mut resp = match leader_of(client).await.download("/v1/snapshot").await {
        Err(ClientError::Unavailable(_)) => client.download("/v1/snapshot").await?,
        other => other?,
    };
    let total = resp.content_length();
    let from = resp.url().origin().ascii_serialization();
    let mut out = new_private_file(part)?;
    let mut received = 0u64;
    progress(0, total);
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        ClientError::Unavailable(format!(
            "{from}: the snapshot broke off after {received} bytes: {e}"
        ))
    })? {
        out.write_all(&chunk).map_err(io(part))?;
        received += chunk.len() as u64;
        progress(received, total);
    }
    out.sync_all().map_err(io(part))?;
    drop(out);
    let header = check(part)?;
    // A hard link fails if `file` appeared meanwhile, where a rename would replace it.
    std::fs::hard_link(part, file).map_err(io(file))?;
    std::fs::remove_file(part).map_err(io(part))?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        mcpcp_pki::files::sync_dir(dir).map_err(io(dir))?;
    }
    Ok((header, from, received))
}

#[cfg(unix)]
fn new_private_file(path: &Path) -> Result<std::fs::File, SnapshotCmdError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

#[cfg(not(unix))]
fn new_private_file(path: &Path) -> Result<std::fs::File, SnapshotCmdError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))
}

/// The leader's address when the cluster can tell, else the client as it is.
async fn leader_of(client: &AdminClient) -> AdminClient {
    let Ok(status) = client.cluster_status().await else {
        return client.clone();
    };
    status
        .leader
        .and_then(|id| status.members.iter().find(|m| m.id == id))
        .map(|m| client.for_endpoint(&m.http_addr))
        .unwrap_or_else(|| client.clone())
}

/// Checks a snapshot file whole and returns its header.
pub fn check(file: &Path) -> Result<SnapshotHeader, SnapshotCmdError> {
    let f = std::fs::File::open(file).map_err(io(file))?;
    snapshot::verify(f).map_err(|source| SnapshotCmdError::File {
        path: file.to_path_buf(),
        source,
    })
}

/// What `restore` lays out.
pub struct Restore<'a> {
    pub file: &'a Path,
    pub data_dir: &'a Path,
    pub plan: RestorePlan,
}

/// The node ids the snapshot's cluster ever had (the state's `node_ids_ever`).
#[derive(Deserialize)]
struct Ever {
    state: EverState,
}

#[derive(Deserialize)]
struct EverState {
    #[serde(default)]
    node_ids_ever: BTreeSet<u64>,
}

/// Checks the file and the plan, and lays out the data directory for `mcpd`'s first start.
pub fn restore(r: &Restore) -> Result<SnapshotHeader, SnapshotCmdError> {
    let plan = &r.plan;
    let f = std::fs::File::open(r.file).map_err(io(r.file))?;
    let (header, data) = snapshot::read(f).map_err(|source| SnapshotCmdError::File {
        path: r.file.to_path_buf(),
        source,
    })?;
    let ever: Ever = serde_json::from_slice(&data).map_err(|e| SnapshotCmdError::File {
        path: r.file.to_path_buf(),
        source: SnapshotError::State(e.to_string()),
    })?;
    plan.check(&ever.state.node_ids_ever)
        .map_err(SnapshotCmdError::Usage)?;
    prepare_dir(r.data_dir)?;
    // The file as read and checked, then the plan that makes mcpd's first start use it; mcpd
    // claims the directory for the plan's node itself (`node_id`).
    let mut file = header.encode();
    file.extend_from_slice(&data);
    let plan_text = serde_json::to_vec_pretty(plan).unwrap_or_default();
    for (name, bytes) in [
        (RESTORE_SNAPSHOT, file.as_slice()),
        (RESTORE_PLAN, &plan_text),
    ] {
        mcpcp_pki::files::write_private_bytes(&r.data_dir.join(name), bytes)?;
    }
    Ok(header)
}

/// A new data directory: missing, or empty but for a `tls` directory the operator filled.
fn prepare_dir(dir: &Path) -> Result<(), SnapshotCmdError> {
    if dir.exists() {
        let entries = std::fs::read_dir(dir).map_err(io(dir))?;
        for e in entries {
            let name = e.map_err(io(dir))?.file_name();
            if name != "tls" {
                return Err(SnapshotCmdError::Usage(format!(
                    "{} is not empty (it holds {}): a restore goes into a new data directory",
                    dir.display(),
                    name.to_string_lossy()
                )));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    private_dir(dir)
}

#[cfg(unix)]
fn private_dir(path: &Path) -> Result<(), SnapshotCmdError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))
}

#[cfg(not(unix))]
fn private_dir(_: &Path) -> Result<(), SnapshotCmdError> {
    Ok(())
}
