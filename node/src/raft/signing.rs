//! A node without the CA key asks the members, one after another, to sign its certificates
//! (`Cluster.SignCertificates`, see [`crate::tls::signer`]); the first that holds the key
//! answers. The call rides the same mutual-TLS channels as Raft, so the member it reaches
//! knows from the handshake which node is asking.

use std::sync::Arc;
use std::time::Duration;

use mcpcp_proto::cluster::cluster_client::ClusterClient;
use mcpcp_proto::cluster::{SignReply, SignRequest as WireRequest};
use tonic::Code;

use super::network::PeerChannels;
use crate::registry::Registry;
use crate::tls::signer::{EdgeRequest, SignError, SignFuture, SignRequest, Signed, Signer};
use crate::tls::TlsError;

/// How long one member has to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the current members (never this node) in turn.
pub struct MemberSigner {
    pub registry: Registry,
    pub channels: PeerChannels,
}

impl Signer for MemberSigner {
    fn sign(&self, request: SignRequest) -> SignFuture {
        let me = self.registry.id;
        let members: Vec<_> = self
            .registry
            .members()
            .into_iter()
            .filter(|m| m.id != me)
            .collect();
        let channels = self.channels.clone();
        Box::pin(async move {
            let wire = to_wire(&request);
            let mut why = Vec::new();
            for member in members {
                let channel = match channels.get(&member.grpc_addr) {
                    Ok(c) => c,
                    Err(e) => {
                        why.push(format!("node {}: {e}", member.id));
                        continue;
                    }
                };
                let mut client = ClusterClient::new(channel);
                let call = client.sign_certificates(wire.clone());
                match tokio::time::timeout(ASK_TIMEOUT, call).await {
                    Ok(Ok(reply)) => {
                        metrics::counter!("mcpd_tls_sign_requests_total", "outcome" => "signed")
                            .increment(1);
                        return Ok(from_wire(reply.into_inner()));
                    }
                    Ok(Err(status)) if status.code() == Code::FailedPrecondition => {
                        why.push(format!("node {}: holds no CA key", member.id));
                    }
                    Ok(Err(status)) => {
                        why.push(format!("node {}: {}", member.id, status.message()));
                    }
                    Err(_) => why.push(format!("node {}: no answer in {ASK_TIMEOUT:?}", member.id)),
                }
            }
            metrics::counter!("mcpd_tls_sign_requests_total", "outcome" => "unsigned").increment(1);
            if why.is_empty() {
                why.push("no other member".into());
            }
            Err(TlsError::NotSigned(why.join("; ")))
        })
    }
}

/// Wraps a [`MemberSigner`] for [`crate::tls::NodeTls::set_signer`].
pub fn signer(registry: Registry, channels: PeerChannels) -> Arc<dyn Signer> {
    Arc::new(MemberSigner { registry, channels })
}

fn to_wire(request: &SignRequest) -> WireRequest {
    let (edge_csr, edge_names) = match &request.edge {
        Some(e) => (e.csr.clone(), e.names.clone()),
        None => (String::new(), Vec::new()),
    };
    WireRequest {
        peer_csr: request.peer_csr.clone().unwrap_or_default(),
        edge_csr,
        edge_names,
    }
}

/// The request as the member that received it reads it (empty fields: not asked for).
pub fn from_wire_request(wire: WireRequest) -> SignRequest {
    SignRequest {
        peer_csr: (!wire.peer_csr.is_empty()).then_some(wire.peer_csr),
        edge: (!wire.edge_csr.is_empty()).then_some(EdgeRequest {
            csr: wire.edge_csr,
            names: wire.edge_names,
        }),
    }
}

fn from_wire(reply: SignReply) -> Signed {
    Signed {
        peer_cert: (!reply.peer_cert.is_empty()).then_some(reply.peer_cert),
        edge_cert: (!reply.edge_cert.is_empty()).then_some(reply.edge_cert),
    }
}

/// The reply to send, or the status that says why not.
pub fn reply(result: Result<Signed, SignError>) -> Result<SignReply, tonic::Status> {
    match result {
        Ok(s) => Ok(SignReply {
            peer_cert: s.peer_cert.unwrap_or_default(),
            edge_cert: s.edge_cert.unwrap_or_default(),
        }),
        Err(e @ SignError::NoCaKey) => Err(tonic::Status::failed_precondition(e.to_string())),
        Err(e @ SignError::Bad { .. }) => Err(tonic::Status::invalid_argument(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_cross_the_wire_unchanged() {
        for request in [
            SignRequest {
                peer_csr: Some("p".into()),
                edge: None,
            },
            SignRequest {
                peer_csr: None,
                edge: Some(EdgeRequest {
                    csr: "e".into(),
                    names: vec!["a".into(), "b".into()],
                }),
            },
        ] {
            assert_eq!(from_wire_request(to_wire(&request)), request);
        }
    }
}
