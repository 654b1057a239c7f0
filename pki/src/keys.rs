//! PEM certificates and keys turned into what rustls presents and signs with.

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::PkiError;

/// A certificate chain (leaf first) and its private key, both PEM, checked to match.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, PkiError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| rustls::Error::General(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(rustls::Error::General("no certificate in the PEM text".into()).into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| rustls::Error::General(format!("private key: {e}")))?;
    Ok(CertifiedKey::from_der(chain, key, &crate::provider())?)
}
