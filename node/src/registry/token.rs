//! Bearer tokens: `mcpt_<id>_<secret>`.
//!
//! The id (12 hex characters) is public and names the token in listings and revocations. The
//! secret is 256 random bits, shown once at creation. The replicated state keeps only
//! `sha256(token)`: a fast hash is right for a high-entropy secret (there is nothing to brute
//! force), and the comparison is constant-time.

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "mcpt_";

/// A freshly minted token: the full secret string (to hand to the caller once) and what is stored.
pub struct Minted {
    pub id: String,
    pub secret: String,
    pub hash: String,
}

#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomError(String);

pub fn mint() -> Result<Minted, RandomError> {
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    getrandom::fill(&mut id).map_err(|e| RandomError(e.to_string()))?;
    getrandom::fill(&mut secret).map_err(|e| RandomError(e.to_string()))?;
    let id = hex::encode(id);
    let secret = format!(
        "{PREFIX}{id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let hash = hash(&secret);
    Ok(Minted { id, secret, hash })
}

/// The stored form of a token string.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The id part of a well-formed token string, or `None` when it is not one of ours.
pub fn parse_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
        return None;
    }
    Some(id)
}

/// Constant-time check of a presented token against a stored hash.
pub fn matches(token: &str, stored_hash: &str) -> bool {
    let presented = hash(token);
    presented.as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_parse_and_match_only_their_hash() {
        let a = mint().expect("random");
        let b = mint().expect("random");
        assert_ne!(a.secret, b.secret);
        assert_eq!(parse_id(&a.secret), Some(a.id.as_str()));
        assert!(matches(&a.secret, &a.hash));
        assert!(!matches(&b.secret, &a.hash));
        assert!(!a.hash.contains(&a.secret));
    }

    #[test]
    fn malformed_tokens_have_no_id() {
        assert_eq!(parse_id("Bearer x"), None);
        assert_eq!(parse_id("mcpt_zz_abc"), None);
        assert_eq!(parse_id("mcpt_0123456789ab_"), None);
        assert_eq!(parse_id("mcpt_0123456789ab"), None);
    }
}
