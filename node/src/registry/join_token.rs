//! Join tokens: `mcpj_<id>_<secret>.<sha256 of the CA certificate>`, for one node id, for a
//! short time, once. The registry keeps the secret's hash ([`super::state::JoinToken`]); how a
//! node uses a token to join is [`crate::join`].

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::now_unix;
use super::state::JoinToken;

const PREFIX: &str = "mcpj_";

#[derive(Debug, thiserror::Error)]
pub enum JoinTokenError {
    #[error("the join token is malformed (expected mcpj_<id>_<secret>.<CA fingerprint>)")]
    Malformed,
    #[error("the join token is unknown, used already, expired, or for another node id")]
    Refused,
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

/// A join token's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub id: String,
    pub secret: String,
    /// Hex SHA-256 of the CA certificate (DER).
    pub ca_sha256: String,
}

/// Parses `mcpj_<id>_<secret>.<hex>`.
pub fn parse(token: &str) -> Result<Parsed, JoinTokenError> {
    let rest = token
        .trim()
        .strip_prefix(PREFIX)
        .ok_or(JoinTokenError::Malformed)?;
    let (credential, fingerprint) = rest.rsplit_once('.').ok_or(JoinTokenError::Malformed)?;
    let (id, secret) = credential
        .split_once('_')
        .ok_or(JoinTokenError::Malformed)?;
    let hex_ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex_ok(id, 12) || !hex_ok(secret, 64) || !hex_ok(fingerprint, 64) {
        return Err(JoinTokenError::Malformed);
    }
    Ok(Parsed {
        id: id.to_string(),
        secret: secret.to_string(),
        ca_sha256: fingerprint.to_ascii_lowercase(),
    })
}

fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new token for `node`, valid for `ttl_seconds`, pinning the CA whose fingerprint is
/// `ca_fingerprint` (`sha256:<hex>`): the string to hand out, its id, and what the registry
/// keeps.
pub fn mint(
    node: u64,
    ttl_seconds: u64,
    ca_fingerprint: &str,
) -> Result<(String, String, JoinToken), JoinTokenError> {
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    getrandom::fill(&mut id).map_err(|e| JoinTokenError::Random(e.to_string()))?;
    getrandom::fill(&mut secret).map_err(|e| JoinTokenError::Random(e.to_string()))?;
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    let fp = ca_fingerprint.trim_start_matches("sha256:");
    let token = format!("{PREFIX}{id}_{secret}.{fp}");
    let stored = JoinToken {
        hash: digest(&secret),
        node,
        expires_at: now_unix() + ttl_seconds,
    };
    Ok((token, id, stored))
}

/// Whether `token` is the stored join token `stored`, for `node`, still valid.
pub fn matches(token: &Parsed, stored: &JoinToken, node: u64) -> bool {
    let same: bool = digest(&token.secret)
        .as_bytes()
        .ct_eq(stored.hash.as_bytes())
        .into();
    same && stored.node == node && stored.expires_at > now_unix()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_match_only_their_node_and_secret() {
        let (short, _, stored) = mint(4, 60, "sha256:ab").expect("mint");
        assert!(parse(&short).is_err(), "a short fingerprint is malformed");
        let fp = format!("sha256:{}", "a".repeat(64));
        let (token, id2, stored2) = mint(4, 60, &fp).expect("mint");
        let p = parse(&token).expect("parses");
        assert_eq!(p.id, id2);
        assert_eq!(p.ca_sha256, "a".repeat(64));
        assert!(matches(&p, &stored2, 4));
        assert!(!matches(&p, &stored2, 5), "another node id");
        assert!(!matches(&p, &stored, 4), "another token's hash");
        let expired = JoinToken {
            expires_at: 0,
            ..stored2
        };
        assert!(!matches(&p, &expired, 4));
        for bad in ["", "mcpj_x", "mcpt_abc_def.ghi", &token.replace('.', "")] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
