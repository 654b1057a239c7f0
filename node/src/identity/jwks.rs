//! Trusted issuers' signing keys, fetched from their JWKS endpoints and cached per issuer.
//! Keys are fetched on first use, again when older than `jwks_max_age_s`, and at once when a
//! token names a key id the cache lacks (the issuer rotated its keys), at most once per
//! `jwks_min_refresh_interval_ms` per issuer. While an issuer cannot be reached, the keys last
//! fetched keep working.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use jsonwebtoken::jwk::Jwk;
use mcpcp_proto::api::IssuerSpec;
use serde_json::Value;

use super::config::IdentityConfig;

/// A discovery document or JWKS larger than this is refused.
const MAX_DOCUMENT: usize = 256 * 1024;

/// Why an issuer's keys could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    #[error("issuer {issuer:?}: {message}")]
    Fetch { issuer: String, message: String },
}

/// One issuer's keys as last fetched.
struct Keys {
    /// The spec they were fetched for: a changed spec (another JWKS URL) fetches afresh.
    spec: IssuerSpec,
    keys: Arc<Vec<Jwk>>,
    fetched: Option<Instant>,
    tried: Option<Instant>,
    /// One fetch of this issuer at a time; callers that waited read what it fetched. Other
    /// issuers are not held up by a slow one.
    fetching: Arc<tokio::sync::Mutex<()>>,
}

impl Keys {
    fn new(spec: &IssuerSpec) -> Keys {
        Keys {
            spec: spec.clone(),
            keys: Arc::default(),
            fetched: None,
            tried: None,
            fetching: Arc::default(),
        }
    }
}

/// The cache of every trusted issuer's keys.
#[derive(Clone)]
pub struct KeyCache {
    inner: Arc<Inner>,
}

struct Inner {
    config: IdentityConfig,
    issuers: Mutex<HashMap<String, Keys>>,
}

impl KeyCache {
    pub fn new(config: IdentityConfig) -> KeyCache {
        KeyCache {
            inner: Arc::new(Inner {
                config,
                issuers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The keys of `spec` that may verify a token naming `kid` (every key when it names none).
    /// A key already known is used at once, also when the keys are due for a refresh (which
    /// then runs in the background); an unknown key id waits for a fetch, at most one per
    /// `jwks_min_refresh_interval_ms`.
    pub async fn keys_for(
        &self,
        spec: &IssuerSpec,
        kid: Option<&str>,
    ) -> Result<Vec<Jwk>, JwksError> {
        let max_age = Duration::from_secs(self.inner.config.jwks_max_age_s);
        let (found, fresh) = self.with(spec, |k| {
            let fresh = k.fetched.is_some_and(|f| f.elapsed() < max_age);
            (matching(&k.keys, kid), fresh)
        });
        if !found.is_empty() {
            if !fresh && self.may_try(spec) {
                let cache = self.clone();
                let spec = spec.clone();
                tokio::spawn(async move { cache.refresh(&spec).await });
            }
            return Ok(found);
        }
        self.refresh(spec).await?;
        Ok(self.with(spec, |k| matching(&k.keys, kid)))
    }

    /// Whether a fetch of `spec` may start now (not within the minimum interval of the last).
    fn may_try(&self, spec: &IssuerSpec) -> bool {
        let min_interval = Duration::from_millis(self.inner.config.jwks_min_refresh_interval_ms);
        self.with(spec, |k| {
            k.tried.is_none_or(|t| t.elapsed() >= min_interval)
        })
    }

    /// Fetches `spec`'s keys, unless another caller just did or the interval has not passed.
    /// An error only when no keys were ever fetched.
    async fn refresh(&self, spec: &IssuerSpec) -> Result<(), JwksError> {
        let lock = self.with(spec, |k| k.fetching.clone());
        let _one = lock.lock().await;
        if self.may_try(spec) {
            self.with(spec, |k| k.tried = Some(Instant::now()));
            match self.fetch(spec).await {
                Ok(keys) => {
                    metrics::counter!("mcpd_jwks_fetches_total", "outcome" => "ok").increment(1);
                    tracing::info!(issuer = %spec.name, keys = keys.len(), "trusted issuer's keys fetched");
                    self.with(spec, |k| {
                        k.keys = Arc::new(keys);
                        k.fetched = Some(Instant::now());
                    });
                }
                Err(e) => {
                    metrics::counter!("mcpd_jwks_fetches_total", "outcome" => "error").increment(1);
                    tracing::warn!(issuer = %spec.name, error = %e, "trusted issuer's keys could not be fetched; the last ones fetched stay in use");
                    if self.with(spec, |k| k.fetched.is_none()) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn with<T>(&self, spec: &IssuerSpec, f: impl FnOnce(&mut Keys) -> T) -> T {
        let mut map = self.inner.issuers.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map
            .entry(spec.name.clone())
            .or_insert_with(|| Keys::new(spec));
        if entry.spec != *spec {
            *entry = Keys::new(spec);
        }
        f(entry)
    }

    async fn fetch(&self, spec: &IssuerSpec) -> Result<Vec<Jwk>, JwksError> {
        let fail = |message: String| JwksError::Fetch {
            issuer: spec.name.clone(),
            message,
        };
        let client = client(spec, &self.inner.config).map_err(fail)?;
        let url = match &spec.jwks_url {
            Some(u) => u.clone(),
            None => discover(&client, &spec.issuer).await.map_err(fail)?,
        };
        let doc = get_json(&client, &url).await.map_err(fail)?;
        let Some(keys) = doc.get("keys").and_then(Value::as_array) else {
            return Err(fail(format!("{url}: not a JWKS (no \"keys\" list)")));
        };
        // A key of a type this node cannot use is skipped, not fatal to the others.
        Ok(keys
            .iter()
            .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
            .collect())
    }
}

/// The keys a token naming `kid` may be verified with.
fn matching(keys: &[Jwk], kid: Option<&str>) -> Vec<Jwk> {
    use jsonwebtoken::jwk::PublicKeyUse;
    keys.iter()
        // A key published for encryption never verifies a signature.
        .filter(|k| !matches!(k.common.public_key_use, Some(PublicKeyUse::Encryption)))
        .filter(|k| kid.is_none() || k.common.key_id.as_deref() == kid)
        .cloned()
        .collect()
}

fn client(spec: &IssuerSpec, config: &IdentityConfig) -> Result<reqwest::Client, String> {
    let tls = mcpcp_pki::trust::client_config(
        spec.ca_file.as_deref().map(std::path::Path::new),
        &[b"http/1.1"],
    )
    .map_err(|e| format!("ca_file: {e}"))?;
    let timeout = Duration::from_millis(config.jwks_fetch_timeout_ms);
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())
}

/// The `jwks_uri` of the issuer's OpenID or OAuth discovery document.
async fn discover(client: &reqwest::Client, issuer: &str) -> Result<String, String> {
    let base = issuer.trim_end_matches('/');
    let mut last = String::new();
    for well_known in [
        "/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server",
    ] {
        let url = format!("{base}{well_known}");
        match get_json(client, &url).await {
            Ok(doc) => match doc.get("jwks_uri").and_then(Value::as_str) {
                Some(jwks) => return Ok(jwks.to_string()),
                None => last = format!("{url}: no jwks_uri"),
            },
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let resp = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("{url}: {}", e.without_url()))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("{url}: {}", e.without_url()))?;
        if body.len() + chunk.len() > MAX_DOCUMENT {
            return Err(format!("{url}: larger than {MAX_DOCUMENT} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
}
