//! A JWT access token turned into a caller, following RFC 9068 and RFC 8725: the issuer must
//! be trusted (its `iss` matches a registry issuer exactly), the algorithm must be one that
//! issuer allows (never `none` or an HMAC), the signature must verify with one of its keys,
//! `exp` and `nbf` must hold within its clock skew, and `aud` must name the resource called
//! (RFC 8707) or one of the issuer's configured audiences. Claims then give the subject, the
//! tenant and the role.

use base64::Engine;
use jsonwebtoken::{DecodingKey, Validation};
use mcpcp_proto::api::{IssuerSpec, Role};
use serde_json::{Map, Value};

use super::jwks::{JwksError, KeyCache};
use crate::registry::{JwtCaller, Principal};

/// Why a JWT was refused (shown to the caller as `error_description`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwtError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    #[error("the token's algorithm {alg} is not allowed for issuer {issuer:?}")]
    Algorithm { alg: String, issuer: String },
    #[error("issuer {issuer:?} has no key {kid:?}")]
    UnknownKey { issuer: String, kid: String },
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token is not an access token (typ {0:?}, not at+jwt)")]
    Type(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was not issued for this resource ({resource})")]
    Audience { resource: String },
    #[error("the token's claims are not acceptable: {0}")]
    Claims(String),
    #[error(transparent)]
    Keys(#[from] JwksError),
}

impl JwtError {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed",
            JwtError::UnknownIssuer(_) => "issuer",
            JwtError::Algorithm { .. } => "algorithm",
            JwtError::UnknownKey { .. } => "key",
            JwtError::Signature => "signature",
            JwtError::Type(_) => "type",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::Audience { .. } => "audience",
            JwtError::Claims(_) => "claims",
            JwtError::Keys(_) => "jwks",
        }
    }
}

/// Whether `token` is shaped like a JWT (API tokens are not).
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|b| *b == b'.').count() == 2
}

/// The trusted issuer whose `iss` the token names, read before the signature is checked only
/// to pick the keys to check it with.
pub fn claimed_issuer<'a, T: 'a>(
    token: &str,
    issuers: impl IntoIterator<Item = &'a T>,
    iss_of: impl Fn(&T) -> &str,
) -> Result<&'a T, JwtError> {
    let payload = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| JwtError::Malformed)?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or(JwtError::Malformed)?;
    issuers
        .into_iter()
        .find(|i| iss_of(i) == iss)
        .ok_or_else(|| JwtError::UnknownIssuer(iss.to_string()))
}

/// Verifies `token` from `issuer` for `resource`; on success, the caller it stands for.
pub async fn verify(
    token: &str,
    issuer: &IssuerSpec,
    resource: &str,
    keys: &KeyCache,
    tenants: impl Fn(&str) -> bool,
) -> Result<Principal, JwtError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
    let typ = header.typ.clone().unwrap_or_default();
    let typed =
        typ.eq_ignore_ascii_case("at+jwt") || typ.eq_ignore_ascii_case("application/at+jwt");
    if !typed && !issuer.accept_untyped {
        return Err(JwtError::Type(typ));
    }
    let alg_name = serde_json::to_value(header.alg)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    if !issuer.algorithms.contains(&alg_name) {
        return Err(JwtError::Algorithm {
            alg: alg_name,
            issuer: issuer.name.clone(),
        });
    }
    let candidates = keys.keys_for(issuer, header.kid.as_deref()).await?;
    if candidates.is_empty() {
        return Err(JwtError::UnknownKey {
            issuer: issuer.name.clone(),
            kid: header.kid.unwrap_or_default(),
        });
    }
    let mut validation = Validation::new(header.alg);
    validation.algorithms = vec![header.alg];
    validation.leeway = issuer.clock_skew_s;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.set_issuer(&[&issuer.issuer]);
    let mut audiences = vec![resource.to_string()];
    audiences.extend(issuer.audiences.iter().cloned());
    validation.set_audience(&audiences);
    let mut last = JwtError::Signature;
    for jwk in &candidates {
        // A key that says which algorithm it is for is used for that one only.
        if let Some(ka) = &jwk.common.key_algorithm {
            let ka = serde_json::to_value(ka).ok();
            if ka.as_ref().and_then(Value::as_str) != Some(alg_name.as_str()) {
                continue;
            }
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation) {
            Ok(data) => return principal(issuer, data.claims, tenants),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                last = match e.kind() {
                    K::InvalidSignature | K::InvalidAlgorithm | K::InvalidKeyFormat => {
                        JwtError::Signature
                    }
                    K::ExpiredSignature => return Err(JwtError::Expired),
                    K::ImmatureSignature => return Err(JwtError::NotYetValid),
                    K::InvalidAudience => {
                        return Err(JwtError::Audience {
                            resource: resource.to_string(),
                        })
                    }
                    K::InvalidIssuer => return Err(JwtError::UnknownIssuer(issuer.issuer.clone())),
                    K::MissingRequiredClaim(c) => {
                        return Err(JwtError::Claims(format!("no {c:?} claim")))
                    }
                    other => JwtError::Claims(format!("{other:?}")),
                };
            }
        }
    }
    Err(last)
}

/// The caller a verified token's claims stand for.
fn principal(
    issuer: &IssuerSpec,
    claims: Map<String, Value>,
    tenant_exists: impl Fn(&str) -> bool,
) -> Result<Principal, JwtError> {
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .ok_or_else(|| JwtError::Claims("\"sub\" must be a string of 1 to 256 characters".into()))?
        .to_string();
    let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    let named_roles = strings(claims.get(&issuer.roles_claim));
    let mut roles: Vec<Role> = named_roles.iter().filter_map(|r| Role::parse(r)).collect();
    // A per-tenant issuer speaks for its tenant only: it cannot make a cluster-wide role.
    if issuer.tenant.is_some() {
        roles.retain(|r| r.is_tenant_scoped());
    }
    roles.retain(|r| *r != Role::Metrics);
    let default = match issuer.default_role {
        // Refused at write; clamped here too, should a stored spec ever say otherwise.
        r if issuer.tenant.is_some() && !r.is_tenant_scoped() => Role::User,
        r => r,
    };
    let role = roles.into_iter().min().unwrap_or(default);
    let tenant = match &issuer.tenant {
        Some(t) => Some(t.clone()),
        None => claims
            .get(&issuer.tenant_claim)
            .and_then(Value::as_str)
            .map(String::from),
    };
    let tenant = if role.is_tenant_scoped() {
        let t = tenant.ok_or_else(|| {
            JwtError::Claims(format!(
                "a {role} needs a tenant, and the token has no {:?} claim",
                issuer.tenant_claim
            ))
        })?;
        if !tenant_exists(&t) {
            return Err(JwtError::Claims(format!("tenant {t:?} does not exist")));
        }
        Some(t)
    } else {
        None
    };
    let scopes = match claims.get("scope").or_else(|| claims.get("scp")) {
        Some(v) => strings(Some(v)),
        None => Vec::new(),
    };
    Ok(Principal {
        token_id: JwtCaller::id(&issuer.name, &subject),
        role,
        tenant,
        scopes: Some(scopes),
        // A tenant's issuer names its own groups: `ISSUER:group`, so that it cannot claim a
        // group a cluster-wide rule was written for.
        groups: strings(claims.get(&issuer.groups_claim))
            .into_iter()
            .take(256)
            .map(|g| match &issuer.tenant {
                Some(_) => format!("{}:{g}", issuer.name),
                None => g,
            })
            .collect(),
        jwt: Some(Box::new(JwtCaller {
            issuer: issuer.name.clone(),
            subject,
            expires_at,
        })),
    })
}

/// A claim that is a list of strings or one space-separated string.
fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s.split_whitespace().map(String::from).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(tenant: Option<&str>) -> IssuerSpec {
        IssuerSpec {
            name: "idp".into(),
            issuer: "https://idp".into(),
            audiences: vec![],
            jwks_url: None,
            algorithms: vec!["RS256".into()],
            clock_skew_s: 60,
            tenant: tenant.map(String::from),
            tenant_claim: "tenant".into(),
            roles_claim: "roles".into(),
            default_role: Role::User,
            groups_claim: "groups".into(),
            accept_untyped: false,
            console_client_id: None,
            ca_file: None,
        }
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn the_most_powerful_named_role_counts() {
        let p = principal(
            &issuer(None),
            claims(serde_json::json!({"sub": "alice", "roles": ["user", "operator", "bogus"], "exp": 9})),
            |_| true,
        )
        .unwrap();
        assert_eq!(p.role, Role::Operator);
        assert_eq!(p.tenant, None);
        assert_eq!(p.token_id, "jwt:idp:alice");
    }

    #[test]
    fn a_per_tenant_issuer_cannot_make_a_cluster_admin() {
        let p = principal(
            &issuer(Some("acme")),
            claims(
                serde_json::json!({"sub": "mallory", "roles": "cluster-admin", "tenant": "other"}),
            ),
            |_| true,
        )
        .unwrap();
        assert_eq!(p.role, Role::User);
        assert_eq!(p.tenant.as_deref(), Some("acme"));
        let mut lax = issuer(Some("acme"));
        lax.default_role = Role::ClusterAdmin;
        let p = principal(
            &lax,
            claims(serde_json::json!({"sub": "m", "groups": ["sre"]})),
            |_| true,
        )
        .unwrap();
        assert_eq!(
            p.role,
            Role::User,
            "a stored default cannot escape the tenant"
        );
        assert_eq!(p.groups, ["idp:sre"], "its groups are its own");
    }

    #[test]
    fn a_tenant_role_needs_an_existing_tenant() {
        let no_claim = principal(
            &issuer(None),
            claims(serde_json::json!({"sub": "bob"})),
            |_| true,
        );
        assert!(matches!(no_claim, Err(JwtError::Claims(_))));
        let unknown = principal(
            &issuer(None),
            claims(serde_json::json!({"sub": "bob", "tenant": "ghost"})),
            |t| t == "acme",
        );
        assert!(matches!(unknown, Err(JwtError::Claims(_))));
        let scoped = principal(
            &issuer(None),
            claims(serde_json::json!({"sub": "bob", "tenant": "acme", "scope": "mcp admin:read"})),
            |t| t == "acme",
        )
        .unwrap();
        assert_eq!(scoped.scopes.unwrap(), ["mcp", "admin:read"]);
    }

    #[test]
    fn only_jwt_shaped_tokens_go_to_the_verifier() {
        assert!(looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"));
        assert!(!looks_like_jwt("mcp_0123456789abcdef.secretpart"));
        assert!(matches!(
            claimed_issuer(
                "eyJhbGciOiJub25lIn0.eyJpc3MiOiJodHRwczovL2V2aWwifQ.",
                &[issuer(None)],
                |i| i.issuer.as_str()
            ),
            Err(JwtError::UnknownIssuer(i)) if i == "https://evil"
        ));
    }
}
