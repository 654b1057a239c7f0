//! The cluster's trust, in one crate that `mcpd`, `mcpctl`, `mcp-bridge`, the tests and the
//! chaos harness share:
//!
//! - [`ca`]: the cluster CA (a self-signed certificate naming the cluster, and its key), and
//!   what it issues: each node's peer certificate, naming the node as
//!   `spiffe://<cluster-id>/node/<id>`, and the HTTPS certificate of a node's edge.
//! - [`identity`]: reading a node's identity back from a certificate a peer presented.
//! - [`trust`]: the TLS client configuration of every HTTPS client (a CA file, or the system's
//!   roots).
//! - [`files`]: PEM files on disk, private keys readable by their owner only.
//!
//! Everything uses rustls with the `ring` provider and rcgen; nothing here is hand-rolled
//! cryptography.

pub mod ca;
pub mod datakey;
pub mod files;
pub mod identity;
pub mod keys;
pub mod trust;

pub use ca::{Ca, Issued};
pub use identity::{ClusterId, NodeIdentity};

/// What can go wrong making, reading or trusting certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("cluster id {0:?}: use 1 to 63 lowercase letters, digits and '-'")]
    BadClusterId(String),
    #[error("the CA certificate names no cluster (no spiffe:// URI)")]
    NoClusterInCa,
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The crypto provider every TLS configuration of the project is built with.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
