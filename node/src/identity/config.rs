//! `[identity]`: how this node names itself to OAuth clients and how it keeps trusted
//! issuers' signing keys.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// The URL clients reach the cluster at (`https://mcp.example.com`, with a path prefix if a
    /// proxy adds one). It names the protected resources: `{public_url}/mcp` is the resource
    /// a token for `/mcp` must be minted for (RFC 8707). Unset: `https://` + the request's
    /// `Host` (which the Host check has already matched against this node's names).
    pub public_url: Option<String>,
    /// Build resource URLs from `X-Forwarded-Proto`, `X-Forwarded-Host` and
    /// `X-Forwarded-Prefix` when `public_url` is unset. Only behind a proxy that sets them:
    /// a client that can send them chooses which resource its token must be for.
    pub trust_forwarded_headers: bool,
    /// A trusted issuer's keys are fetched again after this long (seconds), and at once when
    /// a token names a key id not among them, but not more often than
    /// `jwks_min_refresh_interval_ms` per issuer (a flood of made-up key ids cannot make the
    /// node hammer the issuer).
    pub jwks_max_age_s: u64,
    pub jwks_min_refresh_interval_ms: u64,
    /// Bound on one discovery or JWKS fetch.
    pub jwks_fetch_timeout_ms: u64,
    /// Verified JWTs this node remembers (`identity::verified`), so that a token is checked
    /// once rather than at every call; past it the cache starts over.
    pub verified_tokens: usize,
    /// How long a console sign-in lasts (seconds), at most: a session ends sooner when the
    /// token it was opened with expires, and at once when that token is revoked.
    pub session_ttl_s: u64,
    /// Whether the protected-resource metadata of the shared resources (the admin API, `/mcp`,
    /// and servers of no tenant) lists tenants' issuers after the cluster-wide ones. Off: only
    /// the cluster-wide ones, so an unauthenticated caller cannot learn which identity
    /// providers the tenants use; a tenant's users then find theirs at their tenant's own
    /// servers.
    pub tenant_issuers_in_shared_metadata: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            public_url: None,
            trust_forwarded_headers: false,
            jwks_max_age_s: 3600,
            jwks_min_refresh_interval_ms: 10_000,
            jwks_fetch_timeout_ms: 5_000,
            verified_tokens: 10_000,
            session_ttl_s: 8 * 3600,
            tenant_issuers_in_shared_metadata: true,
        }
    }
}

impl IdentityConfig {
    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(u) = &self.public_url {
            let url = reqwest::Url::parse(u)
                .map_err(|e| ("identity.public_url", format!("not a URL: {e}")))?;
            if !matches!(url.scheme(), "https" | "http") || url.query().is_some() {
                return Err((
                    "identity.public_url",
                    "must be an http(s) URL without a query".into(),
                ));
            }
        }
        if self.jwks_max_age_s == 0 {
            return Err(("identity.jwks_max_age_s", "must be greater than 0".into()));
        }
        if self.jwks_min_refresh_interval_ms < 1000 {
            return Err((
                "identity.jwks_min_refresh_interval_ms",
                "must be at least 1000: made-up key ids would make the node fetch an issuer's keys at their rate".into(),
            ));
        }
        if !(1..=1_000_000).contains(&self.verified_tokens) {
            return Err(("identity.verified_tokens", "must be 1 to 1000000".into()));
        }
        if !(60..=7 * 24 * 3600).contains(&self.session_ttl_s) {
            return Err((
                "identity.session_ttl_s",
                "must be 60 to 604800 (a week)".into(),
            ));
        }
        if self.jwks_fetch_timeout_ms == 0 {
            return Err((
                "identity.jwks_fetch_timeout_ms",
                "must be greater than 0".into(),
            ));
        }
        Ok(())
    }

    /// `public_url` without a trailing slash.
    pub fn public_base(&self) -> Option<&str> {
        self.public_url.as_deref().map(|u| u.trim_end_matches('/'))
    }
}
