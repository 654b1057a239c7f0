//! HTTPS on the node's edge: the admin API, MCP, probes and metrics.
//!
//! `[api] tls` chooses where the certificate comes from:
//! - `cluster` (default): the node issues it from the cluster CA, for `localhost`,
//!   `127.0.0.1`, `::1`, the host it advertises and listens on, and `[api] tls_names` (a VIP,
//!   a load balancer's name). Clients trust the cluster's `ca.pem`. It is renewed like the
//!   peer certificate, in memory: its key never touches the disk. A node without the CA key
//!   has a member that holds it sign a new one ([`super::signer`]), kept in its TLS directory
//!   (`edge.pem`, `edge.key`) for its next start.
//! - `files`: the operator's own certificate chain and key (`tls_cert_file`, `tls_key_file`),
//!   re-read when either file changes, so a renewal by an outside tool (certbot, cert-manager)
//!   needs no restart.
//! - `off`: plain HTTP, only for a TLS-terminating load balancer in front; the node warns at
//!   start and `/readyz` says so.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use serde::{Deserialize, Serialize};

use super::signer::{EdgeRequest, SignRequest};
use super::{CertSlot, NodeTls, TlsError};
use crate::shutdown::Shutdown;

/// `[api] tls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EdgeTlsMode {
    #[default]
    Cluster,
    Files,
    Off,
}

impl EdgeTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeTlsMode::Cluster => "cluster",
            EdgeTlsMode::Files => "files",
            EdgeTlsMode::Off => "off",
        }
    }
}

/// Where the edge's certificate comes from, as configured.
#[derive(Debug, Clone)]
pub enum EdgeSource {
    /// Issued by this node from the cluster CA for these names.
    Cluster { names: Vec<String>, ttl: Duration },
    /// The operator's files.
    Files { cert: PathBuf, key: PathBuf },
}

/// The edge's TLS: the rustls configuration every connection's handshake uses, and the
/// certificate in it, which [`EdgeTls::keep_fresh`] replaces in place.
#[derive(Clone)]
pub struct EdgeTls {
    pub config: Arc<ServerConfig>,
    slot: CertSlot,
    source: EdgeSource,
}

fn io_error(path: &std::path::Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Bad {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn load(source: &EdgeSource, node: &NodeTls) -> Result<rustls::sign::CertifiedKey, TlsError> {
    match source {
        EdgeSource::Cluster { names, ttl } => {
            let Some(ca) = &node.ca else {
                // A joined node: the certificate the cluster signed for it at its join.
                let cert = node.dir().join(super::EDGE_CERT);
                let key = node.dir().join(super::EDGE_KEY);
                if !cert.exists() {
                    return Err(TlsError::Bad {
                        path: cert,
                        message: "missing: api.tls = \"cluster\" needs the CA key (ca.key) in the node's TLS directory, or the certificate a join gave; use tls = \"files\" otherwise".into(),
                    });
                }
                return load(&EdgeSource::Files { cert, key }, node);
            };
            let issued = ca.issue_server(names, *ttl)?;
            metrics::counter!("mcpd_tls_certificates_issued_total", "kind" => "edge").increment(1);
            // The CA follows the leaf: a joining node that knows only the CA's fingerprint
            // (from its join token) finds the CA in the chain and pins it.
            let chain = format!("{}{}", issued.cert_pem, ca.cert_pem());
            Ok(mcpcp_pki::keys::certified_key(&chain, &issued.key_pem)?)
        }
        EdgeSource::Files { cert, key } => {
            let cert_pem = std::fs::read_to_string(cert).map_err(|e| io_error(cert, e))?;
            let key_pem = std::fs::read_to_string(key).map_err(|e| io_error(key, e))?;
            mcpcp_pki::keys::certified_key(&cert_pem, &key_pem).map_err(|e| io_error(cert, e))
        }
    }
}

/// A new certificate from `source`: as [`load`], except that a node without the CA key has a
/// member that holds it sign one for a new key (written to its TLS directory, for its next
/// start); with nobody to ask yet, it keeps the one on disk.
async fn fresh(
    source: &EdgeSource,
    node: &NodeTls,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let EdgeSource::Cluster { names, .. } = source else {
        return load(source, node);
    };
    if node.ca.is_some() {
        return load(source, node);
    }
    let (key_pem, csr) = mcpcp_pki::ca::key_and_request()?;
    let request = SignRequest {
        peer_csr: None,
        edge: Some(EdgeRequest {
            csr,
            names: names.clone(),
        }),
    };
    let Some(signed) = node.sign_remotely(request).await else {
        return load(source, node);
    };
    let chain = signed?
        .edge_cert
        .ok_or_else(|| TlsError::NotSigned("the answer holds no HTTPS certificate".into()))?;
    let key = mcpcp_pki::keys::certified_key(&chain, &key_pem)?;
    mcpcp_pki::files::write_private(&node.dir().join(super::EDGE_KEY), &key_pem)?;
    mcpcp_pki::files::write_public(&node.dir().join(super::EDGE_CERT), &chain)?;
    metrics::counter!("mcpd_tls_certificates_issued_total", "kind" => "edge").increment(1);
    Ok(key)
}

fn modified(source: &EdgeSource) -> Option<(SystemTime, SystemTime)> {
    let EdgeSource::Files { cert, key } = source else {
        return None;
    };
    let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

impl EdgeTls {
    pub fn new(source: EdgeSource, node: &NodeTls) -> Result<EdgeTls, TlsError> {
        let slot = CertSlot::new(load(&source, node)?);
        let mut config = ServerConfig::builder_with_provider(mcpcp_pki::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(slot.clone()));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(EdgeTls {
            config: Arc::new(config),
            slot,
            source,
        })
    }

    /// Issues (or re-reads) the certificate now; a cluster-issued one gets a fresh key.
    pub async fn renew_now(&self, node: &NodeTls) -> Result<(), TlsError> {
        self.slot.replace(fresh(&self.source, node).await?);
        Ok(())
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.slot.not_after()
    }

    /// Until `shutdown`: renews a cluster-issued certificate when a third of its life is
    /// left; re-reads the operator's files when they change (a bad new pair is logged and the
    /// old one kept). Exports `mcpd_tls_certificate_expiry_seconds{kind="edge"}` and
    /// `mcpd_tls_reloads_total{outcome}`.
    pub async fn keep_fresh(self, node: Arc<NodeTls>, shutdown: Shutdown) {
        let mut seen = modified(&self.source);
        loop {
            let expiry = self.slot.not_after();
            if let Some(t) = expiry {
                let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                metrics::gauge!("mcpd_tls_certificate_expiry_seconds", "kind" => "edge")
                    .set(left.as_secs_f64());
            }
            let due = match &self.source {
                EdgeSource::Cluster { ttl, .. } => {
                    expiry.is_some_and(|t| super::needs_renewal(t, *ttl))
                }
                EdgeSource::Files { .. } => {
                    let now = modified(&self.source);
                    let changed = now.is_some() && now != seen;
                    seen = now.or(seen);
                    changed
                }
            };
            if due {
                match fresh(&self.source, &node).await {
                    Ok(key) => {
                        self.slot.replace(key);
                        metrics::counter!("mcpd_tls_reloads_total", "outcome" => "ok").increment(1);
                        tracing::info!(source = ?self.source, "the HTTPS certificate was replaced");
                    }
                    Err(e) => {
                        metrics::counter!("mcpd_tls_reloads_total", "outcome" => "error")
                            .increment(1);
                        tracing::error!(error = %e, "could not replace the HTTPS certificate; keeping the current one");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.clone().wait() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
}
