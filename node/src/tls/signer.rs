//! Certificates for a node that holds no CA key.
//!
//! A node that joined with a token ([`crate::join`]) has no `ca.key`: it cannot issue its own
//! certificates, so its renewals (and `rotate-certs`) ask a member that holds the key. The
//! request carries only certificate requests for keys the node made and keeps; the member
//! signs the peer certificate for the node id its mutual-TLS certificate names (never an id
//! the request chooses), so a member can renew itself and nobody else.
//!
//! This module holds both sides, without the transport: [`Signer`] is how a node asks (the
//! gRPC client, set once Raft runs, lives in `crate::raft::signing`), and
//! [`sign_for_member`] is what the member that holds the key does with a request.

use std::future::Future;
use std::pin::Pin;

use mcpcp_pki::{Ca, NodeIdentity};

use super::TlsError;

/// What a node without a CA key asks to have signed: a certificate request (PEM) for a new
/// peer certificate, for a new HTTPS certificate and the names it is to carry, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignRequest {
    pub peer_csr: Option<String>,
    pub edge: Option<EdgeRequest>,
}

/// A request for an HTTPS certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeRequest {
    pub csr: String,
    pub names: Vec<String>,
}

/// What came back: the certificates asked for (PEM; the HTTPS one with the CA after it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signed {
    pub peer_cert: Option<String>,
    pub edge_cert: Option<String>,
}

/// Most names an HTTPS certificate may carry, as at a join.
pub const MAX_EDGE_NAMES: usize = 32;

pub type SignFuture = Pin<Box<dyn Future<Output = Result<Signed, TlsError>> + Send>>;

/// Has a member that holds the CA key sign `SignRequest`s for this node.
pub trait Signer: Send + Sync {
    fn sign(&self, request: SignRequest) -> SignFuture;
}

/// Why a member refused to sign: the field at fault, named.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("this node holds no CA key")]
    NoCaKey,
    #[error("{field}: {message}")]
    Bad {
        field: &'static str,
        message: String,
    },
}

/// Signs `request` for `caller` (the identity its mutual-TLS certificate proved) with `ca`,
/// for `ttl`.
pub fn sign_for_member(
    ca: Option<&Ca>,
    caller: &NodeIdentity,
    request: &SignRequest,
    ttl: std::time::Duration,
) -> Result<Signed, SignError> {
    let ca = ca.ok_or(SignError::NoCaKey)?;
    let bad = |field| {
        move |e: mcpcp_pki::PkiError| SignError::Bad {
            field,
            message: e.to_string(),
        }
    };
    let peer_cert = match &request.peer_csr {
        Some(csr) => Some(
            ca.sign_node_request(csr, caller.node, ttl)
                .map_err(bad("peer_csr"))?,
        ),
        None => None,
    };
    let edge_cert = match &request.edge {
        Some(edge) => {
            if edge.names.is_empty() || edge.names.len() > MAX_EDGE_NAMES {
                return Err(SignError::Bad {
                    field: "edge_names",
                    message: format!("give 1 to {MAX_EDGE_NAMES} names"),
                });
            }
            let leaf = ca
                .sign_server_request(&edge.csr, &edge.names, ttl)
                .map_err(bad("edge_csr"))?;
            Some(format!("{leaf}{}", ca.cert_pem()))
        }
        None => None,
    };
    Ok(Signed {
        peer_cert,
        edge_cert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_peer_certificate_names_the_caller_whatever_the_request_holds() {
        let cluster = mcpcp_pki::ClusterId::new("t").expect("valid");
        let ca = Ca::create(&cluster).expect("ca");
        let caller = NodeIdentity {
            cluster: cluster.clone(),
            node: 4,
        };
        let (_key, csr) = mcpcp_pki::ca::key_and_request().expect("csr");
        let request = SignRequest {
            peer_csr: Some(csr.clone()),
            edge: Some(EdgeRequest {
                csr,
                names: vec!["127.0.0.1".into()],
            }),
        };
        let ttl = Duration::from_secs(600);
        let signed = sign_for_member(Some(&ca), &caller, &request, ttl).expect("signed");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(
            signed.peer_cert.expect("peer").as_bytes(),
        )
        .expect("pem");
        use rustls::pki_types::pem::PemObject;
        assert_eq!(NodeIdentity::from_cert(&der), Some(caller.clone()));
        assert!(signed
            .edge_cert
            .expect("edge")
            .contains(ca.cert_pem().trim()));

        assert!(matches!(
            sign_for_member(None, &caller, &request, ttl),
            Err(SignError::NoCaKey)
        ));
        let garbage = SignRequest {
            peer_csr: Some("not a request".into()),
            edge: None,
        };
        assert!(matches!(
            sign_for_member(Some(&ca), &caller, &garbage, ttl),
            Err(SignError::Bad {
                field: "peer_csr",
                ..
            })
        ));
        let no_names = SignRequest {
            peer_csr: None,
            edge: Some(EdgeRequest {
                csr: mcpcp_pki::ca::key_and_request().expect("csr").1,
                names: vec![],
            }),
        };
        assert!(matches!(
            sign_for_member(Some(&ca), &caller, &no_names, ttl),
            Err(SignError::Bad {
                field: "edge_names",
                ..
            })
        ));
    }
}
