//! The cluster CA and what it issues.
//!
//! The CA is a self-signed ECDSA P-256 certificate whose URI SAN names the cluster
//! (`spiffe://<cluster-id>`), valid for ten years. It issues two kinds of certificate, each
//! with a fresh key:
//! - a node's **peer certificate** (gRPC between nodes, both directions): the node's identity
//!   as a URI SAN and the cluster's [peer server name](ClusterId::peer_server_name) as a DNS
//!   SAN, for server and client authentication;
//! - an **HTTPS certificate** for a node's edge (admin API and MCP), for the names and
//!   addresses clients dial.
//!
//! Issued certificates start five minutes in the past, so that a peer whose clock is a little
//! behind does not refuse a certificate just made.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::files::{read_text, write_private, write_public};
use crate::identity::{cluster_of_ca, ClusterId, NodeIdentity};
use crate::PkiError;

/// The CA certificate's file name in a TLS directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name in a TLS directory (mode 0600).
pub const CA_KEY: &str = "ca.key";

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const BACKDATE: Duration = Duration::from_secs(300);

/// A certificate and its new key, as PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A cluster CA whose key is at hand.
pub struct Ca {
    cluster: ClusterId,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, ttl: Duration) -> SystemTime {
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - BACKDATE);
    params.not_after = OffsetDateTime::from(now + ttl);
    now + ttl
}

impl Ca {
    /// Makes a new CA for `cluster`.
    pub fn create(cluster: &ClusterId) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("mcpcp cluster CA {cluster}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(cluster.uri().try_into()?)];
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cluster: cluster.clone(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
        })
    }

    /// A CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| rustls::Error::General(format!("CA certificate: {e}")))?;
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Ca {
            cluster: cluster_of_ca(&cert_der)?,
            cert_pem: cert_pem.to_string(),
            cert_der,
            key,
        })
    }

    /// Reads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert = read_text(&dir.join(CA_CERT))?;
        let key = read_text(&dir.join(CA_KEY))?;
        Ca::from_pem(&cert, &key).map_err(|e| PkiError::BadFile {
            path: dir.join(CA_CERT),
            message: e.to_string(),
        })
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        write_public(&dir.join(CA_CERT), &self.cert_pem)?;
        write_private(&dir.join(CA_KEY), &self.key.serialize_pem())
    }

    pub fn cluster(&self) -> &ClusterId {
        &self.cluster
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (PEM), to hand to a joining node over pinned TLS.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The CA certificate's SHA-256 fingerprint, `sha256:<hex>`: what a join token pins.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Signs `params` (validity and key usage set here) for `public_key`.
    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
    ) -> Result<(String, SystemTime), PkiError> {
        let not_after = validity(&mut params, ttl);
        params.use_authority_key_identifier_extension = true;
        // ECDSA keys sign; they do not encipher (RFC 5480).
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        let cert = params.signed_by(public_key, &issuer)?;
        Ok((cert.pem(), not_after))
    }

    fn issue(&self, params: CertificateParams, ttl: Duration) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let (cert_pem, not_after) = self.sign(params, &key, ttl)?;
        Ok(Issued {
            cert_pem,
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    fn node_params(&self, node: u64) -> Result<CertificateParams, PkiError> {
        let id = NodeIdentity {
            cluster: self.cluster.clone(),
            node,
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("mcpd node {node}"));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::URI(id.uri().try_into()?),
            SanType::DnsName(self.cluster.peer_server_name().try_into()?),
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        Ok(params)
    }

    fn server_params(names: &[String]) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "mcpd");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        Ok(params)
    }

    /// A peer certificate for node `node` of this cluster, valid for `ttl`.
    pub fn issue_node(&self, node: u64, ttl: Duration) -> Result<Issued, PkiError> {
        self.issue(self.node_params(node)?, ttl)
    }

    /// An HTTPS server certificate for `names` (DNS names or IP addresses), valid for `ttl`.
    pub fn issue_server(&self, names: &[String], ttl: Duration) -> Result<Issued, PkiError> {
        self.issue(Self::server_params(names)?, ttl)
    }

    /// Signs a certificate request (PEM, its signature checked) as node `node`'s peer
    /// certificate: only the request's key is taken from it, never what it asks to be named.
    pub fn sign_node_request(
        &self,
        csr_pem: &str,
        node: u64,
        ttl: Duration,
    ) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        Ok(self.sign(self.node_params(node)?, &csr.public_key, ttl)?.0)
    }

    /// Signs a certificate request as an HTTPS certificate for `names`.
    pub fn sign_server_request(
        &self,
        csr_pem: &str,
        names: &[String],
        ttl: Duration,
    ) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        Ok(self
            .sign(Self::server_params(names)?, &csr.public_key, ttl)?
            .0)
    }
}

/// A new key and a certificate request for it (both PEM): what a joining node sends, keeping
/// the key.
pub fn key_and_request() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// `sha256:<hex>` of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// The `notAfter` of a DER certificate.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn a_node_certificate_names_its_node_and_chains_to_the_ca() {
        let ca = Ca::create(&ClusterId::new("test").expect("valid")).expect("ca");
        let issued = ca.issue_node(3, Duration::from_secs(3600)).expect("issued");
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("pem");
        assert_eq!(
            NodeIdentity::from_cert(&der).map(|i| i.uri()),
            Some("spiffe://test/node/3".to_string())
        );
        let left = not_after(&der)
            .expect("validity")
            .duration_since(SystemTime::now())
            .expect("in the future");
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));

        // The chain verifies against the CA, under the peer server name.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("pem"))
            .expect("root");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            crate::provider(),
        )
        .build()
        .expect("verifier");
        let name =
            rustls_pki_types::ServerName::try_from(ca.cluster().peer_server_name()).expect("name");
        verifier
            .verify_server_cert(&der, &[], &name, &[], rustls_pki_types::UnixTime::now())
            .expect("the node certificate verifies");

        // Reloaded from PEM, the CA is the same CA.
        let again = Ca::from_pem(ca.cert_pem(), &ca.key.serialize_pem()).expect("reload");
        assert_eq!(again.fingerprint(), ca.fingerprint());
        assert_eq!(again.cluster().as_str(), "test");
    }
}
