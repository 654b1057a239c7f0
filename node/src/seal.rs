//! Secrets sealed at rest: a server's `env` values are encrypted with the cluster's data key
//! (AES-256-GCM, `ring`) on the node that receives the write, before they are proposed, so
//! the Raft log, snapshots and redb only ever hold ciphertext. They are opened only where a
//! process is started (`pool::reconcile`), in memory. The data key comes from the node's TLS
//! directory (`data.key`, see `mcpcp_pki::datakey`), never from the replicated state.
//!
//! A sealed value is `sealed:v1:<base64url(nonce ‖ ciphertext ‖ tag)>`, its nonce random, and
//! its associated data the value's place (`<server>/env/<NAME>`), so a sealed value copied to
//! another server or variable does not open. A value without the prefix (written before
//! sealing existed) opens as itself and is sealed by the next write of its server.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use mcpcp_proto::api::ServerSpec;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::audit_key::AuditKey;

/// What a sealed value starts with.
pub const SEALED: &str = "sealed:v1:";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the data key: {0}")]
    Key(#[from] mcpcp_pki::PkiError),
    #[error("the operating system's random source failed")]
    Random,
    #[error("{place}: the sealed value does not open with this node's data key")]
    Open { place: String },
}

/// The cluster's data key, ready to seal and open, and the audit key derived from it. Cheap
/// to clone.
#[derive(Clone)]
pub struct DataKey(Arc<LessSafeKey>, AuditKey);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

fn place(server: &str, name: &str) -> String {
    format!("{server}/env/{name}")
}

impl DataKey {
    /// The key in `tls_dir/data.key`.
    pub fn load(tls_dir: &Path) -> Result<DataKey, SealError> {
        Ok(Self::from_bytes(&mcpcp_pki::datakey::load(tls_dir)?))
    }

    pub fn from_bytes(key: &[u8; 32]) -> DataKey {
        let unbound = UnboundKey::new(&AES_256_GCM, key)
            .unwrap_or_else(|_| unreachable!("a 32-byte key fits AES-256-GCM"));
        DataKey(Arc::new(LessSafeKey::new(unbound)), AuditKey::derive(key))
    }

    /// The key of the audit chain's MACs.
    pub fn audit_key(&self) -> &AuditKey {
        &self.1
    }

    pub fn seal(&self, place: &str, plain: &str) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut data = plain.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(place.as_bytes()),
                &mut data,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!(
            "{SEALED}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
        ))
    }

    pub fn open(&self, place: &str, value: &str) -> Result<String, SealError> {
        let Some(b64) = value.strip_prefix(SEALED) else {
            return Ok(value.to_string());
        };
        let bad = || SealError::Open {
            place: place.to_string(),
        };
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| bad())?;
        if raw.len() < NONCE_LEN {
            return Err(bad());
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut data = sealed.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(place.as_bytes()), &mut data)
            .map_err(|_| bad())?;
        String::from_utf8(plain.to_vec()).map_err(|_| bad())
    }

    /// Seals every secret of `spec` (its `env` and `headers` values, its OAuth client's
    /// secret) not sealed yet.
    pub fn seal_secrets(&self, spec: &mut ServerSpec) -> Result<(), SealError> {
        for (name, value) in spec.env.iter_mut() {
            if !value.starts_with(SEALED) {
                *value = self.seal(&place(&spec.name, name), value)?;
            }
        }
        for (name, value) in spec.headers.iter_mut() {
            if !value.starts_with(SEALED) {
                *value = self.seal(&header_place(&spec.name, name), value)?;
            }
        }
        if let Some(oauth) = &mut spec.oauth {
            if !oauth.client_secret.starts_with(SEALED) {
                oauth.client_secret = self.seal(&oauth_place(&spec.name), &oauth.client_secret)?;
            }
        }
        Ok(())
    }

    /// Opens every secret of `spec`, for the process or connection that needs them.
    pub fn open_secrets(&self, spec: &mut ServerSpec) -> Result<(), SealError> {
        for (name, value) in spec.env.iter_mut() {
            *value = self.open(&place(&spec.name, name), value)?;
        }
        for (name, value) in spec.headers.iter_mut() {
            *value = self.open(&header_place(&spec.name, name), value)?;
        }
        if let Some(oauth) = &mut spec.oauth {
            oauth.client_secret = self.open(&oauth_place(&spec.name), &oauth.client_secret)?;
        }
        Ok(())
    }
}

/// Where a header value lives (its associated data).
fn header_place(server: &str, header: &str) -> String {
    format!("{server}/headers/{header}")
}

/// Where an OAuth client's secret lives.
fn oauth_place(server: &str) -> String {
    format!("{server}/oauth/client_secret")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, env: &[(&str, &str)]) -> ServerSpec {
        let mut s: ServerSpec =
            serde_json::from_value(serde_json::json!({"name": name, "command": "x"}))
                .expect("spec");
        s.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s
    }

    #[test]
    fn sealed_values_open_only_with_their_key_in_their_place() {
        let key = DataKey::from_bytes(&[7; 32]);
        let mut s = spec("git", &[("TOKEN", "hunter2"), ("LANG", "C")]);
        key.seal_secrets(&mut s).expect("seal");
        assert!(s
            .env
            .values()
            .all(|v| v.starts_with(SEALED) && !v.contains("hunter2")));
        let sealed = s.clone();
        // Sealing again leaves sealed values alone.
        key.seal_secrets(&mut s).expect("seal");
        assert_eq!(s, sealed);
        key.open_secrets(&mut s).expect("open");
        assert_eq!(s.env["TOKEN"], "hunter2");

        // Another key, another server, or another variable: it does not open.
        let mut other = sealed.clone();
        assert!(DataKey::from_bytes(&[8; 32])
            .open_secrets(&mut other)
            .is_err());
        let mut moved = sealed.clone();
        moved.name = "time".into();
        assert!(key.open_secrets(&mut moved).is_err());
        let mut swapped = sealed.clone();
        let token = swapped.env["TOKEN"].clone();
        swapped.env.insert("LANG".into(), token);
        assert!(key.open_secrets(&mut swapped).is_err());

        // A value from before sealing opens as itself.
        let mut plain = spec("git", &[("A", "b")]);
        key.open_secrets(&mut plain).expect("open");
        assert_eq!(plain.env["A"], "b");
    }

    #[test]
    fn an_oauth_clients_secret_is_sealed_and_opens_only_for_its_server() {
        let key = DataKey::from_bytes(&[7; 32]);
        let mut s = spec("mail", &[]);
        s.oauth = Some(Box::new(mcpcp_proto::api::OAuthClient {
            client_secret: "hunter2".into(),
            ..Default::default()
        }));
        key.seal_secrets(&mut s).expect("seal");
        let sealed = s.oauth.as_ref().expect("oauth").client_secret.clone();
        assert!(sealed.starts_with(SEALED) && !sealed.contains("hunter2"));
        let mut moved = s.clone();
        moved.name = "other".into();
        assert!(key.open_secrets(&mut moved).is_err());
        key.open_secrets(&mut s).expect("open");
        assert_eq!(s.oauth.expect("oauth").client_secret, "hunter2");
    }

    #[test]
    fn header_values_are_sealed_and_open_only_in_their_place() {
        let key = DataKey::from_bytes(&[7; 32]);
        let mut s = spec("remote", &[]);
        s.headers
            .insert("Authorization".into(), "Bearer s3cret".into());
        key.seal_secrets(&mut s).expect("seal");
        let sealed = s.headers["Authorization"].clone();
        assert!(sealed.starts_with(SEALED) && !sealed.contains("s3cret"));
        let mut moved = s.clone();
        moved.env.insert("Authorization".into(), sealed);
        moved.headers.clear();
        assert!(
            key.open_secrets(&mut moved).is_err(),
            "a header value opened as env"
        );
        key.open_secrets(&mut s).expect("open");
        assert_eq!(s.headers["Authorization"], "Bearer s3cret");
    }
}
