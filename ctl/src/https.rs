//! The HTTPS client every tool of the workspace reaches nodes with (`mcpctl`, the tests, the
//! chaos harness, the benchmarks): rustls, trusting the CA file given (`--cacert`,
//! `MCPCTL_CACERT`) or else the system's roots.

use std::path::Path;

use crate::ClientError;

/// A `reqwest` builder with the workspace's TLS: `cacert` (the cluster's `ca.pem`) or the
/// system's roots.
pub fn client_builder(cacert: Option<&Path>) -> Result<reqwest::ClientBuilder, ClientError> {
    let tls = mcpcp_pki::trust::client_config(cacert, &[b"http/1.1"])
        .map_err(|e| ClientError::Usage(format!("--cacert: {e}")))?;
    Ok(reqwest::Client::builder().tls_backend_preconfigured(tls))
}

/// A plain client with the workspace's TLS and no other settings.
pub fn client(cacert: Option<&Path>) -> Result<reqwest::Client, ClientError> {
    client_builder(cacert)?
        .build()
        .map_err(|e| ClientError::Usage(e.to_string()))
}
