//! Recovering admin access when every admin token is lost, the way Consul's ACL bootstrap
//! reset and Vault's generate-root do it: by proving access to a node's host, not by holding a
//! credential of the cluster.
//!
//! 1. `mcpd recover-admin --data-dir DIR`, run on a node's host (whoever can write the node's
//!    data directory already controls the node), writes a one-time code's SHA-256 and expiry
//!    into `DIR/recover-admin.json` (mode 0600) and sends the code to that node's
//!    `POST /v1/cluster/recover-admin` over its own HTTPS (trusting `DIR/tls/ca.pem`).
//! 2. The node checks the code against the file (constant time, not expired), deletes the
//!    file (the code works once), and writes a `RecoverAdmin` command through Raft: a new
//!    admin token, recorded in the replicated state with the time and the node
//!    (`State::recoveries`), and logged at `warn` on the node.
//!
//! The cluster must have quorum: a recovery is a replicated write like any other.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::registry::now_unix;

/// The file in a node's data directory that holds a pending recovery.
pub const FILE: &str = "recover-admin.json";

/// Why a recovery code was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(
        "no recovery is pending on this node (run `mcpd recover-admin --data-dir ...` on its host)"
    )]
    NonePending,
    #[error("the recovery code does not match the one pending on this node")]
    WrongCode,
    #[error("the pending recovery expired; run `mcpd recover-admin` again")]
    Expired,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    /// Hex SHA-256 of the code.
    code_sha256: String,
    /// Unix seconds.
    expires_at: u64,
}

fn digest(code: &str) -> String {
    hex::encode(Sha256::digest(code.as_bytes()))
}

/// Writes a new pending recovery into `data_dir`, valid for `ttl`; returns its code.
pub fn begin(data_dir: &Path, ttl: Duration) -> Result<String, RecoveryError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| RecoveryError::Random(e.to_string()))?;
    let code = hex::encode(raw);
    let pending = Pending {
        code_sha256: digest(&code),
        expires_at: now_unix() + ttl.as_secs(),
    };
    let path = data_dir.join(FILE);
    let io = |source| RecoveryError::Io {
        path: path.clone(),
        source,
    };
    let text = serde_json::to_vec(&pending).map_err(|e| io(std::io::Error::other(e)))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    opts.open(&path)
        .and_then(|mut f| f.write_all(&text))
        .map_err(io)?;
    Ok(code)
}

/// Checks `code` against the recovery pending in `data_dir` and, when it matches, removes it
/// (a code works once).
pub fn redeem(data_dir: &Path, code: &str) -> Result<(), RecoveryError> {
    let path = data_dir.join(FILE);
    // Claimed by a rename first: of two requests at once, only one holds the file.
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| RecoveryError::Random(e.to_string()))?;
    let claimed = data_dir.join(format!(".{FILE}.{}", hex::encode(nonce)));
    match std::fs::rename(&path, &claimed) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RecoveryError::NonePending)
        }
        Err(source) => return Err(RecoveryError::Io { path, source }),
    }
    let text = std::fs::read(&claimed);
    let pending: Option<Pending> = text.ok().and_then(|t| serde_json::from_slice(&t).ok());
    let Some(pending) = pending else {
        let _ = std::fs::remove_file(&claimed);
        return Err(RecoveryError::NonePending);
    };
    let matches: bool = digest(code)
        .as_bytes()
        .ct_eq(pending.code_sha256.as_bytes())
        .into();
    if !matches {
        // A wrong guess does not use the code up: put it back.
        let _ = std::fs::rename(&claimed, &path);
        return Err(RecoveryError::WrongCode);
    }
    let _ = std::fs::remove_file(&claimed);
    if pending.expires_at <= now_unix() {
        return Err(RecoveryError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once_and_only_its_own() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(matches!(
            redeem(dir.path(), "x"),
            Err(RecoveryError::NonePending)
        ));
        let code = begin(dir.path(), Duration::from_secs(60)).expect("begin");
        assert!(matches!(
            redeem(dir.path(), "not-it"),
            Err(RecoveryError::WrongCode)
        ));
        redeem(dir.path(), &code).expect("redeemed");
        assert!(matches!(
            redeem(dir.path(), &code),
            Err(RecoveryError::NonePending)
        ));
        let stale = begin(dir.path(), Duration::ZERO).expect("begin");
        assert!(matches!(
            redeem(dir.path(), &stale),
            Err(RecoveryError::Expired)
        ));
    }
}

/// What the node answered a redeemed code with.
#[derive(Debug, Deserialize)]
pub struct Recovered {
    pub token_id: String,
    pub admin_token: String,
}

/// Sends `code` to the node at `http_addr` (its own HTTPS, trusting `ca_file`) and returns the
/// admin token it issued. Used by `mcpd recover-admin` on the node's host.
pub async fn send(http_addr: &str, ca_file: &Path, code: &str) -> anyhow::Result<Recovered> {
    // A node listening on every address is reached on loopback from its own host.
    let addr = http_addr
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "[::1]:");
    let tls = mcpcp_pki::trust::client_config(Some(ca_file), &[b"http/1.1"])?;
    let (status, body) = crate::tls::https::post_json(
        &format!("https://{addr}/v1/cluster/recover-admin"),
        std::sync::Arc::new(tls),
        &serde_json::json!({ "code": code }),
    )
    .await?;
    anyhow::ensure!(
        status.is_success(),
        "the node refused the recovery ({status}): {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice(&body)?)
}
