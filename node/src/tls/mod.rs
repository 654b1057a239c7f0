//! The node's side of the cluster's trust boundary.
//!
//! - **Identity** ([`NodeTls`]): the cluster CA (`ca.pem`, and `ca.key` where this node signs)
//!   in the node's TLS directory (`[tls] dir`, default `<data_dir>/tls`), and the node's peer
//!   certificate `spiffe://<cluster-id>/node/<id>`, which the node issues itself from the CA
//!   key and renews before it expires ([`NodeTls::renew`]). A node without the CA key (one
//!   that joined with a token) has a member that holds it sign its renewals ([`signer`]).
//! - **Between nodes** ([`peer`], [`admission`]): every gRPC connection is mutual TLS with
//!   certificates of the cluster CA, and every call is admitted only when the caller's
//!   certificate names a current member (voter or learner) of this cluster.
//! - **The edge** ([`edge`]): HTTPS for the admin API and MCP, with a certificate the node
//!   issues from the CA for the configured names, or the operator's own files (reloaded when
//!   they change), or none behind a TLS-terminating load balancer.
//!
//! Certificates are swapped in place ([`CertSlot`]): a renewed certificate is used by the next
//! handshake, and connections already open stay up.

pub mod admission;
pub mod edge;
pub mod https;
pub mod members;
pub mod peer;
pub mod signer;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use mcpcp_pki::ca::{not_after, CA_CERT, CA_KEY};
use mcpcp_pki::{Ca, ClusterId, NodeIdentity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use serde::Deserialize;

use crate::shutdown::Shutdown;

/// The node's peer certificate in its TLS directory.
pub const NODE_CERT: &str = "node.pem";
/// The node's peer key in its TLS directory (mode 0600).
pub const NODE_KEY: &str = "node.key";
/// The HTTPS certificate (chain) and key of a node without the CA key, in its TLS directory:
/// signed at its join, then at each renewal, by a member that holds the key.
pub const EDGE_CERT: &str = "edge.pem";
pub const EDGE_KEY: &str = "edge.key";

/// `[tls]`: the node's identity between nodes.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Holds `ca.pem` and `ca.key` (the cluster CA, from `mcpctl cluster ca create` or a join),
    /// and the node's own `node.pem` and `node.key`. Default: `<data_dir>/tls`.
    pub dir: Option<PathBuf>,
    /// Lifetime of the peer certificate the node issues itself; it is renewed when a third of
    /// it is left.
    pub node_cert_ttl_hours: u64,
    /// A node of the cluster to join through (`https://host:port`), when the TLS directory is
    /// still empty (see `crate::join`).
    pub join_url: Option<String>,
    /// The join token `mcpctl cluster join-token` gave for this node (single use).
    pub join_token: Option<String>,
    /// How long a peer may take to complete its TLS handshake on the gRPC address.
    pub peer_handshake_timeout_ms: u64,
    /// TLS handshakes under way at once on the gRPC address; a connection past it is closed.
    pub max_peer_handshakes: usize,
}

impl TlsConfig {
    /// The bounds of the gRPC listener's handshakes.
    pub fn handshakes(&self) -> peer::HandshakeLimits {
        peer::HandshakeLimits {
            timeout: Duration::from_millis(self.peer_handshake_timeout_ms),
            max_pending: self.max_peer_handshakes,
        }
    }
}

/// The join token is a credential: never printed.
impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("dir", &self.dir)
            .field("node_cert_ttl_hours", &self.node_cert_ttl_hours)
            .field("join_url", &self.join_url)
            .field("peer_handshake_timeout_ms", &self.peer_handshake_timeout_ms)
            .field("max_peer_handshakes", &self.max_peer_handshakes)
            .field(
                "join_token",
                &self.join_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            dir: None,
            node_cert_ttl_hours: 720,
            join_url: None,
            join_token: None,
            peer_handshake_timeout_ms: peer::HandshakeLimits::default().timeout.as_millis() as u64,
            max_peer_handshakes: peer::HandshakeLimits::default().max_pending,
        }
    }
}

/// Why the node's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path} is missing: a node needs the cluster CA (make it once with `mcpctl cluster ca create`, then put ca.pem, ca.key and data.key into every node's TLS directory)")]
    NoCa { path: PathBuf },
    #[error("{0}")]
    Pki(#[from] mcpcp_pki::PkiError),
    #[error("{path}: {message}")]
    Bad { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no member signed this node's certificates: {0}")]
    NotSigned(String),
}

/// A certificate that can be replaced while handshakes go on: rustls asks the slot for the
/// current one at every handshake.
#[derive(Debug, Clone)]
pub struct CertSlot(Arc<RwLock<Arc<CertifiedKey>>>);

impl CertSlot {
    pub fn new(key: CertifiedKey) -> Self {
        CertSlot(Arc::new(RwLock::new(Arc::new(key))))
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, key: CertifiedKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> Option<SystemTime> {
        not_after(self.current().end_entity_cert().ok()?)
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The node's trust material: the cluster CA and its own peer certificate.
pub struct NodeTls {
    pub identity: NodeIdentity,
    pub roots: Arc<RootCertStore>,
    /// The CA with its key, when this node holds it (it signs its own certificates then).
    pub ca: Option<Ca>,
    pub peer_cert: CertSlot,
    dir: PathBuf,
    ttl: Duration,
    /// Without a CA key: who signs this node's renewals (set once Raft runs).
    signer: std::sync::OnceLock<Arc<dyn signer::Signer>>,
    /// One renewal at a time (the renewal loop and `rotate-certs`): the key and the
    /// certificate on disk always belong together.
    renewing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("identity", &self.identity)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn bad(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::Bad {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

impl NodeTls {
    /// Loads the TLS directory of node `id`, issuing (or renewing) its peer certificate when
    /// it holds the CA key.
    pub fn load(dir: &Path, id: u64, ttl: Duration) -> Result<NodeTls, TlsError> {
        let ca_path = dir.join(CA_CERT);
        if !ca_path.exists() {
            return Err(TlsError::NoCa { path: ca_path });
        }
        let ca_pem = std::fs::read_to_string(&ca_path).map_err(|e| bad(&ca_path, e))?;
        let ca_der =
            CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| bad(&ca_path, e))?;
        let cluster: ClusterId = mcpcp_pki::identity::cluster_of_ca(&ca_der)?;
        let mut roots = RootCertStore::empty();
        roots.add(ca_der).map_err(|e| bad(&ca_path, e))?;
        let ca = match dir.join(CA_KEY).exists() {
            true => Some(Ca::load(dir)?),
            false => None,
        };
        let identity = NodeIdentity { cluster, node: id };
        let tls = NodeTls {
            peer_cert: CertSlot::new(Self::node_cert(dir, &identity, ca.as_ref(), ttl)?),
            identity,
            roots: Arc::new(roots),
            ca,
            dir: dir.to_path_buf(),
            ttl,
            signer: std::sync::OnceLock::new(),
            renewing: tokio::sync::Mutex::new(()),
        };
        Ok(tls)
    }

    /// The node's peer certificate: the one on disk while it names this node and has more
    /// than a third of its life left (or there is no CA key to make another), else a new one.
    fn node_cert(
        dir: &Path,
        identity: &NodeIdentity,
        ca: Option<&Ca>,
        ttl: Duration,
    ) -> Result<CertifiedKey, TlsError> {
        let (cert_path, key_path) = (dir.join(NODE_CERT), dir.join(NODE_KEY));
        let on_disk = std::fs::read_to_string(&cert_path)
            .ok()
            .zip(std::fs::read_to_string(&key_path).ok());
        if let Some((cert, key)) = &on_disk {
            let usable = mcpcp_pki::keys::certified_key(cert, key).ok().filter(|k| {
                let Ok(der) = k.end_entity_cert() else {
                    return false;
                };
                NodeIdentity::from_cert(der).as_ref() == Some(identity)
                    && not_after(der).is_some_and(|t| !needs_renewal(t, ttl))
            });
            match (usable, ca) {
                (Some(k), _) => return Ok(k),
                (None, None) => {
                    // No CA key to renew with: an operator-managed certificate is used as it is.
                    return mcpcp_pki::keys::certified_key(cert, key)
                        .map_err(|e| bad(&cert_path, e));
                }
                (None, Some(_)) => {}
            }
        }
        let Some(ca) = ca else {
            return Err(bad(
                &cert_path,
                "missing, and there is no ca.key to issue it with",
            ));
        };
        let issued = ca.issue_node(identity.node, ttl)?;
        mcpcp_pki::files::write_private(&key_path, &issued.key_pem)?;
        mcpcp_pki::files::write_public(&cert_path, &issued.cert_pem)?;
        tracing::info!(identity = %identity, not_after = ?issued.not_after, "issued this node's peer certificate");
        Ok(mcpcp_pki::keys::certified_key(
            &issued.cert_pem,
            &issued.key_pem,
        )?)
    }

    /// The node's TLS directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lifetime of the certificates this node issues.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Sets who signs this node's certificates when it holds no CA key; a second call
    /// changes nothing.
    pub fn set_signer(&self, signer: Arc<dyn signer::Signer>) {
        let _ = self.signer.set(signer);
    }

    /// Has a member that holds the CA key sign `request` (`None`: this node has nobody to
    /// ask yet, or holds the key itself).
    pub async fn sign_remotely(
        &self,
        request: signer::SignRequest,
    ) -> Option<Result<signer::Signed, TlsError>> {
        let signer = self.signer.get()?;
        Some(signer.sign(request).await)
    }

    /// Renews the peer certificate now: from the CA key, or, without one, by a member that
    /// holds it. `false` when neither is there (an operator-managed certificate).
    pub async fn renew_now(&self) -> Result<bool, TlsError> {
        let _one = self.renewing.lock().await;
        let (cert_pem, key_pem, by) = match &self.ca {
            Some(ca) => {
                let issued = ca.issue_node(self.identity.node, self.ttl)?;
                (issued.cert_pem, issued.key_pem, "self")
            }
            None => {
                let (key_pem, csr) = mcpcp_pki::ca::key_and_request()?;
                let request = signer::SignRequest {
                    peer_csr: Some(csr),
                    edge: None,
                };
                let Some(signed) = self.sign_remotely(request).await else {
                    return Ok(false);
                };
                let cert = signed?.peer_cert.ok_or_else(|| {
                    TlsError::NotSigned("the answer holds no peer certificate".into())
                })?;
                (cert, key_pem, "member")
            }
        };
        let key = mcpcp_pki::keys::certified_key(&cert_pem, &key_pem)?;
        // What a member signed must name this node: nothing else is installed.
        let names_me = key
            .end_entity_cert()
            .ok()
            .and_then(|der| NodeIdentity::from_cert(der))
            .is_some_and(|id| id == self.identity);
        if !names_me {
            return Err(TlsError::NotSigned(format!(
                "the certificate signed does not name {}",
                self.identity
            )));
        }
        mcpcp_pki::files::write_private(&self.dir.join(NODE_KEY), &key_pem)?;
        mcpcp_pki::files::write_public(&self.dir.join(NODE_CERT), &cert_pem)?;
        self.peer_cert.replace(key);
        metrics::counter!("mcpd_tls_certificates_issued_total", "kind" => "peer").increment(1);
        tracing::info!(identity = %self.identity, not_after = ?self.peer_cert.not_after(), signed_by = by, "renewed this node's peer certificate");
        Ok(true)
    }

    /// Keeps the peer certificate fresh until `shutdown`: checks every minute, renews when a
    /// third of its life is left. Exports `mcpd_tls_certificate_expiry_seconds{kind="peer"}`.
    pub async fn renew(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            if let Some(t) = self.peer_cert.not_after() {
                let left = t.duration_since(SystemTime::now()).unwrap_or_default();
                metrics::gauge!("mcpd_tls_certificate_expiry_seconds", "kind" => "peer")
                    .set(left.as_secs_f64());
                if needs_renewal(t, self.ttl) {
                    if let Err(e) = self.renew_now().await {
                        tracing::error!(error = %e, "renewing this node's peer certificate failed");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.clone().wait() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        }
    }
}

/// This node's certificates, for `POST /v1/node/rotate-certs`: the peer certificate and the
/// edge's, replaced in place (the next handshake uses the new ones; open connections stay).
#[derive(Clone)]
pub struct Certificates {
    pub node: Arc<NodeTls>,
    pub edge: Option<edge::EdgeTls>,
}

impl Certificates {
    /// Issues new certificates now (from the CA key, or signed by a member that holds it;
    /// the operator's files are re-read). Returns their new expiry times (peer, edge).
    pub async fn rotate(&self) -> Result<(Option<SystemTime>, Option<SystemTime>), TlsError> {
        self.node.renew_now().await?;
        if let Some(edge) = &self.edge {
            edge.renew_now(&self.node).await?;
        }
        Ok((
            self.node.peer_cert.not_after(),
            self.edge.as_ref().and_then(|e| e.not_after()),
        ))
    }
}

/// Whether a certificate of lifetime `ttl` that expires at `not_after` is due for renewal.
fn needs_renewal(not_after: SystemTime, ttl: Duration) -> bool {
    not_after
        .duration_since(SystemTime::now())
        .map_or(true, |left| left < ttl / 3)
}

/// Mutual TLS for unit tests: one CA for the test process, node certificates under it.
#[cfg(test)]
pub mod testing {
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    use super::NodeTls;
    use crate::raft::network::PeerChannels;

    fn pki() -> &'static tempfile::TempDir {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let ca = mcpcp_pki::Ca::create(&mcpcp_pki::ClusterId::new("test").expect("valid"))
                .expect("ca");
            ca.write(dir.path()).expect("write ca");
            dir
        })
    }

    /// Node `id` of the test cluster, with the CA key.
    pub fn node(id: u64) -> Arc<NodeTls> {
        let dir = pki().path().join(format!("node{id}-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("node dir");
        for f in [mcpcp_pki::ca::CA_CERT, mcpcp_pki::ca::CA_KEY] {
            std::fs::copy(pki().path().join(f), dir.join(f)).expect("copy ca");
        }
        Arc::new(NodeTls::load(&dir, id, Duration::from_secs(3600)).expect("node tls"))
    }

    /// A shutdown that never fires.
    fn never() -> crate::shutdown::Shutdown {
        let (trigger, shutdown) = crate::shutdown::channel();
        std::mem::forget(trigger);
        shutdown
    }

    /// Mutual-TLS connections on `listener`, served as node 1.
    pub fn incoming(
        listener: tokio::net::TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<super::peer::PeerConn>> {
        let config = super::peer::server_config(&node(1)).expect("server config");
        super::peer::incoming(listener, config, Default::default(), never())
    }

    /// Channels that dial as node 2.
    pub fn channels() -> PeerChannels {
        let members = super::members::Members::default();
        let connector = super::peer::PeerConnector::new(&node(2), members).expect("connector");
        PeerChannels::new(Duration::from_secs(2), connector)
    }
}
