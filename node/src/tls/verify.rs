//! How this node checks a server's certificate when it is the client: a chain to a trust
//! anchor for the name dialed (rustls' WebPKI verification), then what the leaf must name.
//!
//! - Dialing a peer over gRPC: the cluster CA, and a leaf that names a current member
//!   ([`ServerCheck::member`]), so a removed node or a stranger with a cluster certificate
//!   answering at a member's address is refused.
//! - Joining: the CA whose SHA-256 the join token pins, found among the certificates the node
//!   presents ([`ServerCheck::pinned`]), before this node holds any CA.

use std::sync::Arc;

use mcpcp_pki::{ClusterId, NodeIdentity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use super::members::Members;

/// What the chain must lead to.
#[derive(Debug)]
enum Anchor {
    /// Fixed roots (the cluster CA).
    Roots(Arc<WebPkiServerVerifier>),
    /// The presented certificate with this SHA-256 (hex).
    Pinned(String),
}

/// What the leaf must name.
#[derive(Debug)]
enum Leaf {
    Any,
    Member {
        cluster: ClusterId,
        members: Members,
    },
}

/// A server certificate check (see the module documentation).
#[derive(Debug)]
pub struct ServerCheck {
    anchor: Anchor,
    leaf: Leaf,
    provider: Arc<CryptoProvider>,
}

fn verifier(
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
    WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))
}

impl ServerCheck {
    /// A chain to `roots`, and a leaf that names a current member of `cluster`.
    pub fn member(
        roots: Arc<RootCertStore>,
        cluster: ClusterId,
        members: Members,
    ) -> Result<ServerCheck, rustls::Error> {
        let provider = mcpcp_pki::provider();
        Ok(ServerCheck {
            anchor: Anchor::Roots(verifier(roots, provider.clone())?),
            leaf: Leaf::Member { cluster, members },
            provider,
        })
    }

    /// A chain to the presented CA whose SHA-256 is `sha256` (hex).
    pub fn pinned(sha256: &str) -> ServerCheck {
        ServerCheck {
            anchor: Anchor::Pinned(sha256.to_ascii_lowercase()),
            leaf: Leaf::Any,
            provider: mcpcp_pki::provider(),
        }
    }
}

impl ServerCertVerifier for ServerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned_roots;
        let chain = match &self.anchor {
            Anchor::Roots(v) => v,
            Anchor::Pinned(sha256) => {
                let ca = intermediates
                    .iter()
                    .find(|c| hex::encode(Sha256::digest(c.as_ref())) == *sha256)
                    .ok_or_else(|| {
                        rustls::Error::General(
                            "the node presented no CA with the join token's fingerprint".into(),
                        )
                    })?;
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone().into_owned())?;
                pinned_roots = verifier(Arc::new(roots), self.provider.clone())?;
                &pinned_roots
            }
        };
        let verified =
            chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        match &self.leaf {
            Leaf::Any => Ok(verified),
            Leaf::Member { cluster, members } => match NodeIdentity::from_cert(end_entity) {
                Some(id) if id.cluster == *cluster && members.admits(id.node) => Ok(verified),
                other => {
                    metrics::counter!("mcpd_grpc_refused_total", "reason" => "peer_not_a_member")
                        .increment(1);
                    Err(rustls::Error::General(format!(
                        "the peer's certificate names {}, not a current member of this cluster",
                        other.map_or("no node".to_string(), |i| i.uri())
                    )))
                }
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
