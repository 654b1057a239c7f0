//! The cluster's data key: 32 random bytes that seal secrets (server `env` values) in the
//! Raft log, snapshots and redb. It is made with the CA (`mcpctl cluster ca create`) but is
//! not derived from it: a CA rotation does not touch sealed data, and a copy of one key does
//! not give the other. It lives beside the CA key in each node's TLS directory (`data.key`,
//! mode 0600, hex) and is never written into the replicated state.

use std::path::Path;

use crate::files::{read_text, write_private};
use crate::PkiError;

/// The data key's file name in a TLS directory.
pub const DATA_KEY: &str = "data.key";

/// A new random data key, as written to `data.key`.
pub fn generate() -> Result<[u8; 32], PkiError> {
    let mut key = [0u8; 32];
    crate::provider()
        .secure_random
        .fill(&mut key)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
    Ok(key)
}

/// Writes `key` into `dir/data.key` (0600).
pub fn write(dir: &Path, key: &[u8; 32]) -> Result<(), PkiError> {
    write_private(&dir.join(DATA_KEY), &(hex::encode(key) + "\n"))
}

/// Writes a new random key into `dir/data.key` (0600) unless a key is there already.
pub fn write_new(dir: &Path) -> Result<(), PkiError> {
    let path = dir.join(DATA_KEY);
    if path.exists() {
        return Ok(());
    }
    write(dir, &generate()?)
}

/// Reads `dir/data.key`.
pub fn load(dir: &Path) -> Result<[u8; 32], PkiError> {
    let path = dir.join(DATA_KEY);
    let text = read_text(&path)?;
    let bytes = hex::decode(text.trim()).map_err(|e| PkiError::BadFile {
        path: path.clone(),
        message: e.to_string(),
    })?;
    bytes.try_into().map_err(|_| PkiError::BadFile {
        path,
        message: "a data key is 32 bytes (64 hex digits)".into(),
    })
}
