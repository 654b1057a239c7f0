//! Joining a node with a single-use join token, the way kubeadm's bootstrap tokens pin the
//! cluster CA: the operator never copies a key by hand.
//!
//! 1. `mcpctl cluster join-token --id N` (admin) makes a token for node id `N` only, valid for
//!    a short time (default 15 min): `mcpj_<id>_<secret>.<sha256 of the CA certificate>`. The
//!    registry keeps the secret's hash (`Command::CreateJoinToken`).
//! 2. The new node starts with `--join https://<any node> --join-token <token>` and an empty
//!    TLS directory. It connects to that node's HTTPS and accepts it only if the CA in the
//!    certificate chain it presents has the token's fingerprint ([`crate::tls::verify::ServerCheck::pinned`]), then sends the
//!    token and its id to `POST /v1/cluster/join`.
//! 3. That node checks the token (hash in constant time, node id, expiry), uses it up through
//!    Raft (`Command::RedeemJoinToken`: of two redeems, the second finds nothing), and signs
//!    the two certificate requests the new node sent (its keys never leave it): a peer
//!    certificate for exactly the node id the token names, and an HTTPS certificate for the
//!    names the node is reached by. It answers with them, the CA certificate (not its key) and
//!    the data key. The new node writes them into its TLS directory (keys 0600) and starts;
//!    `mcpctl cluster add-node` then makes it a member.
//!
//! The token itself (its form, minting, checking) is the registry's
//! ([`crate::registry::join_token`]). A joined node holds no CA key: it cannot mint
//! certificates for other ids, and a member that holds the key signs its renewals
//! ([`crate::tls::signer`]).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::registry::join_token::parse;
use crate::tls::verify::ServerCheck;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Token(#[from] crate::registry::join_token::JoinTokenError),
    #[error("joining through {url}: {message}")]
    Failed { url: String, message: String },
    #[error("writing {what}: {source}")]
    Write {
        what: &'static str,
        source: mcpcp_pki::PkiError,
    },
    #[error("{path}: {message} (a join left it half done? empty the TLS directory and use a new join token)")]
    Unreadable { path: String, message: String },
}

/// `POST /v1/cluster/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    pub node_id: u64,
    /// A certificate request for the node's peer key (PEM).
    pub peer_csr: String,
    /// A certificate request for the node's HTTPS key (PEM).
    pub edge_csr: String,
    /// The names and addresses the node's HTTPS certificate is to carry.
    pub edge_names: Vec<String>,
}

/// What a joining node receives: its certificates, the CA certificate, the data key, and
/// who the members are.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinMaterial {
    pub ca_pem: String,
    /// The peer certificate for the requested node id (PEM).
    pub node_cert_pem: String,
    /// The HTTPS certificate, chain included (PEM).
    pub edge_cert_pem: String,
    /// Hex.
    pub data_key: String,
    /// The members when the token was redeemed: until the joined node has a membership of its
    /// own, only they may call it (see `crate::tls::admission`).
    pub members: Vec<u64>,
}

/// The file in a joined node's TLS directory that names the members it was told about.
pub const MEMBERS_FILE: &str = "join-members.json";

/// The members a joined node was told about (`None`: it did not join). A file that is there
/// but unreadable is an error, never "not joined": that would admit any node.
pub fn told_members(tls_dir: &Path) -> Result<Option<std::collections::BTreeSet<u64>>, JoinError> {
    let path = tls_dir.join(MEMBERS_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(JoinError::Unreadable {
                path: path.display().to_string(),
                message: e.to_string(),
            })
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| JoinError::Unreadable {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// Joins through the node at `url` (`https://host:port`) with `token` as node `node`, whose
/// HTTPS certificate is to name `edge_names`, and writes what it receives into `tls_dir`.
pub async fn join(
    url: &str,
    token: &str,
    node: u64,
    edge_names: &[String],
    tls_dir: &Path,
) -> Result<(), JoinError> {
    let parsed = parse(token)?;
    let failed = |message: String| JoinError::Failed {
        url: url.to_string(),
        message,
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(mcpcp_pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerCheck::pinned(&parsed.ca_sha256)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let write_err = |what| move |source| JoinError::Write { what, source };
    let (peer_key, peer_csr) = mcpcp_pki::ca::key_and_request().map_err(write_err("a key"))?;
    let (edge_key, edge_csr) = mcpcp_pki::ca::key_and_request().map_err(write_err("a key"))?;
    let body = serde_json::to_value(JoinRequest {
        token: token.trim().to_string(),
        node_id: node,
        peer_csr,
        edge_csr,
        edge_names: edge_names.to_vec(),
    })
    .map_err(|e| failed(e.to_string()))?;
    let endpoint = format!("{}/v1/cluster/join", url.trim_end_matches('/'));
    let (status, answer) = crate::tls::https::post_json(&endpoint, Arc::new(tls), &body)
        .await
        .map_err(|e| failed(format!("{e:#}")))?;
    if !status.is_success() {
        return Err(failed(format!(
            "{status}: {}",
            String::from_utf8_lossy(&answer)
        )));
    }
    let material: JoinMaterial =
        serde_json::from_slice(&answer).map_err(|e| failed(e.to_string()))?;
    // The CA it handed over is the one the token pins (and the one that signed its HTTPS).
    let der = CertificateDer::from_pem_slice(material.ca_pem.as_bytes())
        .map_err(|e| failed(format!("CA certificate: {e}")))?;
    if hex::encode(Sha256::digest(der.as_ref())) != parsed.ca_sha256 {
        return Err(failed(
            "the CA handed over is not the one the token pins".into(),
        ));
    }
    let cluster = mcpcp_pki::identity::cluster_of_ca(der.as_ref())
        .map_err(|e| failed(format!("the CA handed over: {e}")))?;
    let key: [u8; 32] = hex::decode(&material.data_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| failed("the data key handed over is not 32 bytes".into()))?;
    // The members first (the mark of a join, so a half-written directory fails closed), the
    // CA certificate last (its presence means "joined": the join is not tried again).
    use mcpcp_pki::files::{write_private, write_public};
    let members = serde_json::to_string(&material.members).map_err(|e| failed(e.to_string()))?;
    write_private(&tls_dir.join(MEMBERS_FILE), &members).map_err(write_err("the members"))?;
    mcpcp_pki::datakey::write(tls_dir, &key).map_err(write_err("the data key"))?;
    write_private(&tls_dir.join(crate::tls::NODE_KEY), &peer_key).map_err(write_err("node.key"))?;
    write_public(
        &tls_dir.join(crate::tls::NODE_CERT),
        &material.node_cert_pem,
    )
    .map_err(write_err("node.pem"))?;
    write_private(&tls_dir.join(crate::tls::EDGE_KEY), &edge_key).map_err(write_err("edge.key"))?;
    write_public(
        &tls_dir.join(crate::tls::EDGE_CERT),
        &material.edge_cert_pem,
    )
    .map_err(write_err("edge.pem"))?;
    write_public(&tls_dir.join(mcpcp_pki::ca::CA_CERT), &material.ca_pem)
        .map_err(write_err("ca.pem"))?;
    tracing::info!(node, %cluster, via = url, "joined: certificates, the CA certificate and the data key are in the TLS directory (no CA key)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem")
    }

    #[test]
    fn the_pinned_ca_must_sign_the_chain_for_the_name_dialed() {
        let id = mcpcp_pki::ClusterId::new("t").expect("valid");
        let (a, b) = (
            mcpcp_pki::Ca::create(&id).expect("ca"),
            mcpcp_pki::Ca::create(&id).expect("ca"),
        );
        let ttl = std::time::Duration::from_secs(600);
        let verifier = ServerCheck::pinned(a.fingerprint().trim_start_matches("sha256:"));
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let verify = |leaf: &str, chain: &[&str]| {
            let chain: Vec<_> = chain.iter().map(|c| der(c)).collect();
            verifier.verify_server_cert(&der(leaf), &chain, &name, &[], UnixTime::now())
        };
        let leaf_a = a.issue_server(&["127.0.0.1".into()], ttl).expect("leaf");
        assert!(verify(&leaf_a.cert_pem, &[a.cert_pem()]).is_ok());
        // Another CA's leaf next to the pinned CA's certificate: refused.
        let leaf_b = b.issue_server(&["127.0.0.1".into()], ttl).expect("leaf");
        assert!(verify(&leaf_b.cert_pem, &[a.cert_pem()]).is_err());
        // The pinned CA's leaf for another name: refused.
        let other = a
            .issue_server(&["other.example".into()], ttl)
            .expect("leaf");
        assert!(verify(&other.cert_pem, &[a.cert_pem()]).is_err());
        // The CA's own certificate as the leaf, or no CA in the chain: refused.
        assert!(verify(a.cert_pem(), &[a.cert_pem()]).is_err());
        assert!(verify(&leaf_a.cert_pem, &[]).is_err());
    }
}
