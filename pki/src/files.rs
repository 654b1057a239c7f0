//! Files on disk. A private key (or another private file) is written readable by its owner
//! only (0600), through a temporary file renamed into place, so a reader never sees half of it
//! and it is never, even briefly, readable by others.

use std::io::Write;
use std::path::Path;

use crate::PkiError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn read_text(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io(path))
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    // A temporary name of its own (never an existing file, whose mode `create` would keep),
    // so two writers of the same directory cannot mix their files.
    let mut unique = [0u8; 8];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut unique)
        .map_err(|_| PkiError::Tls(rustls::Error::FailedToGetRandomBytes))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("pem");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", hex::encode(unique)));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Writes a private key (mode 0600).
pub fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    write_mode(path, text.as_bytes(), 0o600)
}

/// Writes any other file only its owner may read (mode 0600) the same way: a backup of the
/// registry, a restore plan.
pub fn write_private_bytes(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_mode(path, bytes, 0o600)
}

/// Makes the names in `dir` durable: after a file was renamed or linked into it, a crash keeps
/// the new name.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes a certificate (mode 0644).
pub fn write_public(path: &Path, text: &str) -> Result<(), PkiError> {
    write_mode(path, text.as_bytes(), 0o644)
}
