//! JWTs this node has verified, so that a client sending the same token call after call pays
//! for the signature once (as Envoy's `jwt_authn` caches): keyed by the token's SHA-256 and the
//! resource it was checked for, each entry kept until the token expires, and only while its
//! issuer's spec is the one it was verified under (a changed or removed issuer, or a removed
//! tenant, takes effect at the next call).

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::registry::Principal;

struct Entry {
    resource: String,
    /// The registry revision of the issuer's spec it was verified under.
    issuer_revision: u64,
    /// Unix seconds after which it is checked again (`exp` plus the issuer's skew).
    until: u64,
    principal: Principal,
}

pub struct Verified {
    entries: Mutex<HashMap<[u8; 32], Entry>>,
    /// Entries kept at most (`identity.verified_tokens`); past it the cache starts over
    /// (each token is verified once more).
    capacity: usize,
}

/// The cache key of a token.
pub fn key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Verified {
    pub fn new(capacity: usize) -> Verified {
        Verified {
            entries: Mutex::default(),
            capacity,
        }
    }

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
        if entries.len() >= self.capacity {
            entries.clear();
            metrics::counter!("mcpd_jwt_cache_resets_total").increment(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use mcpcp_proto::api::Role;

    fn caller() -> Principal {
        Principal {
            token_id: "jwt:idp:alice".into(),
            role: Role::User,
            tenant: Some("acme".into()),
            scopes: None,
            groups: vec![],
            jwt: Some(Box::new(crate::registry::JwtCaller {
                issuer: "idp".into(),
                subject: "alice".into(),
                expires_at: 100,
            })),
        }
    }

    #[test]
    fn a_verified_token_is_served_for_its_resource_until_it_expires_or_its_issuer_changes() {
        let cache = Verified::new(2);
        let rev = |r: u64| move |_: &str| Some(r);
        cache.put(key("t1"), "https://h/mcp", 7, 100, &caller());
        assert!(cache.get(&key("t1"), "https://h/mcp", rev(7), 99).is_some());
        assert!(
            cache
                .get(&key("t1"), "https://h/other", rev(7), 99)
                .is_none(),
            "another resource"
        );
        assert!(
            cache
                .get(&key("t1"), "https://h/mcp", rev(7), 100)
                .is_none(),
            "expired"
        );
        assert!(
            cache.get(&key("t1"), "https://h/mcp", rev(8), 99).is_none(),
            "issuer changed"
        );
        assert!(
            cache
                .get(&key("t1"), "https://h/mcp", |_: &str| None, 99)
                .is_none(),
            "issuer gone"
        );
        cache.put(key("t2"), "https://h/mcp", 7, 100, &caller());
        cache.put(key("t3"), "https://h/mcp", 7, 100, &caller());
        assert!(
            cache.get(&key("t1"), "https://h/mcp", rev(7), 99).is_none(),
            "the cap started it over"
        );
        assert!(cache.get(&key("t3"), "https://h/mcp", rev(7), 99).is_some());
    }
}
