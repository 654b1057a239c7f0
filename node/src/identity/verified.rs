//! JWTs this node has verified, so that a client sending the same token call after call pays
//! for the signature once (as Envoy's `jwt_authn` caches): keyed by the token's SHA-256 and the
//! resource it was checked for, each entry kept until the token expires, and only while its
//! issuer's spec is the one it was verified under (a changed or removed issuer, or a removed
//! tenant, takes effect at the next call).

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::registry::Principal;

/// Entries kept at most; past it the cache starts over (tokens are re-verified once).
const CAPACITY: usize = 10_000;

struct Entry {
    resource: String,
    /// The registry revision of the issuer's spec it was verified under.
    issuer_revision: u64,
    /// Unix seconds after which it is checked again (`exp` plus the issuer's skew).
    until: u64,
    principal: Principal,
}

#[derive(Default)]
pub struct Verified {
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

/// The cache key of a token.
pub fn key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Verified {
    /// The caller of a token verified before for `resource` under the issuer's current spec.
    pub fn get(
        &self,
        key: &[u8; 32],
        resource: &str,
        issuer_revision: impl Fn(&str) -> Option<u64>,
        now: u64,
    ) -> Option<Principal> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let e = entries.get(key)?;
        let issuer = e.principal.jwt.as_ref()?.issuer.as_str();
        (e.resource == resource
            && now < e.until
            && issuer_revision(issuer) == Some(e.issuer_revision))
        .then(|| e.principal.clone())
    }

    pub fn put(
        &self,
        key: [u8; 32],
        resource: &str,
        issuer_revision: u64,
        until: u64,
        principal: &Principal,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(
            key,
            Entry {
                resource: resource.to_string(),
                issuer_revision,
                until,
                principal: principal.clone(),
            },
        );
    }
}
