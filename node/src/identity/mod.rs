//! Who is calling: an API token from the registry, or a JWT access token from a trusted issuer
//! (a registry object, `mcpctl issuer`), checked against the part of the surface called
//! ([`surface`]): its roles and its OAuth scope. Refusals carry what an OAuth client needs to
//! find its way (RFC 9728): a `401` points at the resource's metadata, a `403` for a missing
//! scope names the scope.
//!
//! ```text
//! Authorization: Bearer T ─┬─ JWT-shaped ─▶ jwt::claimed_issuer ─▶ jwks::KeyCache ─▶ jwt::verify
//!                          └─ otherwise ──▶ Registry::authenticate (hashed API tokens)
//! Cookie: mcpd_session (admin API only) ──▶ session::Session::open ─▶ check_csrf ─▶ still_holds
//!                                 ─▶ Principal ─▶ Surface::ROLES ─▶ Surface::SCOPE
//! ```

pub mod config;
pub mod jwks;
pub mod jwt;
pub mod resource;
pub mod session;
pub mod surface;
pub mod verified;

use std::sync::Arc;

use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Uri};
use mcpcp_proto::api::IssuerSpec;

use crate::registry::{Principal, Registry};
use config::IdentityConfig;
use jwt::JwtError;
use resource::Base;
use surface::Surface;

/// Why a caller was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization: Bearer <token>")]
    Missing,
    #[error("{0}")]
    Malformed(&'static str),
    #[error("the bearer token is unknown, revoked or expired")]
    UnknownToken,
    #[error("{0}")]
    Jwt(#[from] JwtError),
    /// The caller's role may not use this part of the surface.
    #[error("{0}")]
    Role(&'static str),
    /// The JWT lacks the scope this part of the surface needs.
    #[error("the token lacks scope {0:?}")]
    Scope(&'static str),
    #[error("this node is not part of a cluster yet: run `mcpctl cluster init`")]
    NotInitialized,
    /// A console session cookie that does not hold (`session`).
    #[error("{0}")]
    Session(#[from] session::SessionError),
}

/// A refusal, with the challenge its answer carries.
pub struct Refusal {
    pub error: AuthError,
    /// `WWW-Authenticate` for the answer.
    pub challenge: String,
}

/// The node's authenticator, shared by the admin API and the MCP endpoints.
#[derive(Clone)]
pub struct Identity {
    registry: Registry,
    keys: jwks::KeyCache,
    /// Tokens verified already (`verified`).
    verified: Arc<verified::Verified>,
    config: Arc<IdentityConfig>,
    /// Whether the edge speaks TLS (the scheme of resource URLs without `public_url`).
    tls: bool,
    /// Seals and opens console sessions (`session`).
    data_key: crate::seal::DataKey,
}

impl Identity {
    pub fn new(
        registry: Registry,
        config: IdentityConfig,
        tls: bool,
        data_key: crate::seal::DataKey,
    ) -> Identity {
        Identity {
            data_key,
            registry,
            keys: jwks::KeyCache::new(config.clone()),
            verified: Arc::new(verified::Verified::new(config.verified_tokens)),
            config: Arc::new(config),
            tls,
        }
    }

    /// The cluster's base URL as the caller of a request sees it.
    pub fn base(&self, headers: &HeaderMap, uri: &Uri) -> Base {
        Base::of(headers, uri, &self.config, self.tls)
    }

    /// Every trusted issuer.
    pub fn issuers(&self) -> Vec<IssuerSpec> {
        let data = self.registry.local();
        data.state
            .issuers
            .values()
            .map(|v| v.spec.clone())
            .collect()
    }

    /// The issuers the protected-resource metadata of a resource names, the first a client
    /// should try first: for a tenant's resource (`owner`), that tenant's, then the
    /// cluster-wide ones, and no other tenant's; for a shared one, the cluster-wide ones, then
    /// every tenant's unless `identity.tenant_issuers_in_shared_metadata` is off.
    pub fn metadata_issuers(&self, owner: Option<&str>) -> Vec<String> {
        self.listed_issuers(owner)
            .into_iter()
            .map(|i| i.issuer)
            .collect()
    }

    /// The issuers a resource or page of `owner` (a tenant; `None`: shared) names, in the
    /// order [`Identity::metadata_issuers`] gives.
    pub fn listed_issuers(&self, owner: Option<&str>) -> Vec<IssuerSpec> {
        listed_issuers(
            self.issuers(),
            owner,
            self.config.tenant_issuers_in_shared_metadata,
        )
    }

    /// The caller of `parts`, if it may use surface `S`. `path` is the resource's path
    /// (`""` for the admin API).
    pub async fn authorize<S: Surface>(
        &self,
        parts: &Parts,
        path: &str,
    ) -> Result<Principal, Refusal> {
        let base = self.base(&parts.headers, &parts.uri);
        // The metadata's URL is made for a refusal only.
        let refuse = |error: AuthError| {
            let challenge = challenge(&error, &base.metadata_url(path), S::SCOPE);
            Refusal { error, challenge }
        };
        // A browser's session cookie stands for a token on the admin API only: an MCP client
        // always sends its token, and a cookie must not make a page of another site an MCP
        // client of this one.
        // The path as the client sent it (a router nested at `/v1` sees it without the prefix).
        let full_path = parts
            .extensions
            .get::<axum::extract::OriginalUri>()
            .map_or(parts.uri.path(), |o| o.0.path());
        let by_cookie = match session::cookie(&parts.headers) {
            Some(c)
                if path.is_empty()
                    && full_path.starts_with("/v1/")
                    && !parts.headers.contains_key(header::AUTHORIZATION) =>
            {
                Some(c)
            }
            _ => None,
        };
        let authenticated = match by_cookie {
            Some(cookie) => self.session(parts, cookie),
            None => self.authenticate(parts, &base.resource(path)).await,
        };
        let principal = authenticated.map_err(|e| {
            match &e {
                AuthError::Jwt(j) => {
                    metrics::counter!("mcpd_jwt_refused_total", "reason" => j.reason())
                        .increment(1);
                }
                AuthError::NotInitialized => {}
                _ => metrics::counter!("mcpd_auth_failures_total").increment(1),
            }
            refuse(e)
        })?;
        if !S::ROLES.contains(&principal.role) {
            return Err(refuse(AuthError::Role(S::NEEDS)));
        }
        if !principal.has_scope(S::SCOPE) {
            metrics::counter!("mcpd_jwt_refused_total", "reason" => "scope").increment(1);
            return Err(refuse(AuthError::Scope(S::SCOPE)));
        }
        Ok(principal)
    }

    /// The console session of a cookie, if it opens, has not expired, still holds (its token,
    /// its tenant, its issuer unchanged) and, for a write, came with its CSRF token.
    fn session(&self, parts: &Parts, cookie: &str) -> Result<Principal, AuthError> {
        let now = crate::registry::now_unix();
        let s = session::Session::open(&self.data_key, &self.cluster(), cookie, now)?;
        session::check_csrf(parts, cookie)?;
        let p = s.principal;
        let unchanged = {
            let data = self.registry.local();
            let st = &data.state;
            let issuer = p
                .jwt
                .as_ref()
                .is_none_or(|j| st.issuers.get(&j.issuer).map(|i| i.revision) == s.issuer_revision);
            issuer
                && p.tenant
                    .as_deref()
                    .is_none_or(|t| st.tenants.contains_key(t))
        };
        if !unchanged || !self.registry.still_holds(&p) {
            return Err(session::SessionError::Invalid.into());
        }
        if p.jwt.is_none() {
            self.registry.note_use(&p.token_id, now);
        }
        Ok(p)
    }

    /// What names this cluster in a session's seal: a hash of its replicated session key.
    fn cluster(&self) -> String {
        use sha2::Digest;
        let data = self.registry.local();
        let key = data.state.session_key.as_deref().unwrap_or_default();
        hex::encode(&sha2::Sha256::digest(format!("mcpd-console\0{key}").as_bytes())[..8])
    }

    /// A console session for `principal`, sealed for its cookie, and how long it lasts: the
    /// configured time, or less when the caller's credential ends sooner.
    pub fn open_session(
        &self,
        principal: &Principal,
    ) -> Result<(String, u64), crate::seal::SealError> {
        let now = crate::registry::now_unix();
        let mut until = now.saturating_add(self.config.session_ttl_s);
        if let Some(j) = &principal.jwt {
            until = until.min(j.expires_at);
        }
        if let Some(e) = self.registry.token_expiry(&principal.token_id) {
            until = until.min(e);
        }
        let issuer_revision = principal.jwt.as_ref().and_then(|j| {
            let data = self.registry.local();
            data.state.issuers.get(&j.issuer).map(|i| i.revision)
        });
        let sealed = session::Session {
            principal: Principal {
                groups: Vec::new(),
                ..principal.clone()
            },
            expires_at: until,
            issuer_revision,
        }
        .seal(&self.data_key, &self.cluster())?;
        Ok((sealed, until.saturating_sub(now)))
    }

    async fn authenticate(&self, parts: &Parts, resource: &str) -> Result<Principal, AuthError> {
        let token = bearer(parts)?;
        if jwt::looks_like_jwt(token) {
            let registry = &self.registry;
            let key = verified::key(token);
            let now = crate::registry::now_unix();
            // One read of the registry: the issuer's spec unchanged, the caller's tenant still
            // there.
            let (hit, claimed) = {
                let data = registry.local();
                let state = &data.state;
                let hit = self
                    .verified
                    .get(
                        &key,
                        resource,
                        |name| state.issuers.get(name).map(|i| i.revision),
                        now,
                    )
                    .filter(|p| {
                        p.tenant
                            .as_deref()
                            .is_none_or(|t| state.tenants.contains_key(t))
                    });
                let claimed = match hit {
                    Some(_) => None,
                    None => Some(
                        jwt::claimed_issuer(token, state.issuers.values(), |i| {
                            i.spec.issuer.as_str()
                        })
                        .map(|v| (v.spec.clone(), v.revision)),
                    ),
                };
                (hit, claimed)
            };
            if let Some(p) = hit {
                return Ok(p);
            }
            let (issuer, revision) = claimed.unwrap_or(Err(JwtError::Malformed))?;
            let exists = |t: &str| registry.local().state.tenants.contains_key(t);
            let p = jwt::verify(token, &issuer, resource, &self.keys, exists).await?;
            metrics::counter!("mcpd_jwt_accepted_total", "issuer" => issuer.name.clone())
                .increment(1);
            if let Some(j) = &p.jwt {
                let until = j.expires_at.saturating_add(issuer.clock_skew_s);
                self.verified.put(key, resource, revision, until, &p);
            }
            return Ok(p);
        }
        if let Some(p) = self.registry.authenticate(token) {
            return Ok(p);
        }
        let initialized = self
            .registry
            .local()
            .membership
            .membership()
            .voter_ids()
            .next()
            .is_some();
        Err(if initialized {
            AuthError::UnknownToken
        } else {
            AuthError::NotInitialized
        })
    }
}

fn bearer(parts: &Parts) -> Result<&str, AuthError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Malformed("the Authorization header is not ASCII"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(AuthError::Malformed(
            "Authorization must use the Bearer scheme",
        ))?;
    Ok(token.trim())
}

/// The `WWW-Authenticate` of a refusal (RFC 6750 §3, RFC 9728 §5.1).
fn challenge(error: &AuthError, metadata: &str, scope: &str) -> String {
    let quoted = |s: &str| s.replace(['"', '\\'], "'");
    match error {
        AuthError::Missing => format!("Bearer resource_metadata=\"{metadata}\""),
        AuthError::Scope(_) => format!(
            "Bearer error=\"insufficient_scope\", scope=\"{scope}\", resource_metadata=\"{metadata}\""
        ),
        AuthError::Role(m) => format!(
            "Bearer error=\"insufficient_scope\", error_description=\"{}\", resource_metadata=\"{metadata}\"",
            quoted(m)
        ),
        other => format!(
            "Bearer error=\"invalid_token\", error_description=\"{}\", resource_metadata=\"{metadata}\"",
            quoted(&other.to_string())
        ),
    }
}

/// [`Identity::metadata_issuers`] of `issuers`.
fn listed_issuers(
    mut issuers: Vec<IssuerSpec>,
    owner: Option<&str>,
    shared_lists_tenants: bool,
) -> Vec<IssuerSpec> {
    issuers.retain(|i| match (owner, i.tenant.as_deref()) {
        (_, None) => true,
        (Some(owner), Some(t)) => t == owner,
        (None, Some(_)) => shared_lists_tenants,
    });
    issuers.sort_by_key(|i| match &i.tenant {
        Some(_) if owner.is_some() => 0,
        None => 1,
        Some(_) => 2,
    });
    issuers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(url: &str, tenant: Option<&str>) -> IssuerSpec {
        serde_json::from_value(serde_json::json!({
            "name": url.trim_start_matches("https://"),
            "issuer": url,
            "tenant": tenant,
        }))
        .expect("an issuer spec")
    }

    fn listed_issuers(issuers: Vec<IssuerSpec>, owner: Option<&str>, shared: bool) -> Vec<String> {
        super::listed_issuers(issuers, owner, shared)
            .into_iter()
            .map(|i| i.issuer)
            .collect()
    }

    fn all() -> Vec<IssuerSpec> {
        vec![
            issuer("https://acme.example", Some("acme")),
            issuer("https://corp.example", None),
            issuer("https://globex.example", Some("globex")),
        ]
    }

    #[test]
    fn a_tenants_resource_names_its_issuers_first_and_no_other_tenants() {
        assert_eq!(
            listed_issuers(all(), Some("globex"), true),
            ["https://globex.example", "https://corp.example"]
        );
        assert_eq!(
            listed_issuers(all(), Some("globex"), false),
            ["https://globex.example", "https://corp.example"],
            "the setting is about shared resources only"
        );
    }

    #[test]
    fn a_shared_resource_lists_tenants_issuers_only_when_the_setting_allows() {
        assert_eq!(
            listed_issuers(all(), None, true),
            [
                "https://corp.example",
                "https://acme.example",
                "https://globex.example"
            ]
        );
        assert_eq!(listed_issuers(all(), None, false), ["https://corp.example"]);
    }
}
