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
}

/// The cache of every trusted issuer's keys.
#[derive(Clone)]
pub struct KeyCache {
    inner: Arc<Inner>,
}

struct Inner {
    config: IdentityConfig,
    issuers: Mutex<HashMap<String, Keys>>,
    /// One fetch at a time; callers that waited read what it fetched.
    fetching: tokio::sync::Mutex<()>,
}

impl KeyCache {
    pub fn new(config: IdentityConfig) -> KeyCache {
        KeyCache {
            inner: Arc::new(Inner {
                config,
                issuers: Mutex::new(HashMap::new()),
                fetching: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The keys of `spec` that may verify a token naming `kid` (every key when it names none).
    pub async fn keys_for(
        &self,
        spec: &IssuerSpec,
        kid: Option<&str>,
    ) -> Result<Vec<Jwk>, JwksError> {
        let max_age = Duration::from_secs(self.inner.config.jwks_max_age_s);
        let min_interval = Duration::from_millis(self.inner.config.jwks_min_refresh_interval_ms);
        if let Some(found) = self.cached(spec, kid, max_age) {
            return Ok(found);
        }
        let _one = self.inner.fetching.lock().await;
        // Another caller may have fetched while this one waited.
        if let Some(found) = self.cached(spec, kid, max_age) {
            return Ok(found);
        }
        let recently_tried = self.with(spec, |k| {
            k.tried.is_some_and(|t| t.elapsed() < min_interval)
        });
        if !recently_tried {
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
        Ok(self.with(spec, |k| matching(&k.keys, kid)))
    }

    /// The cached keys for `kid`, when they are fresh and hold it.
    fn cached(&self, spec: &IssuerSpec, kid: Option<&str>, max_age: Duration) -> Option<Vec<Jwk>> {
        self.with(spec, |k| {
            let fresh = k.fetched.is_some_and(|f| f.elapsed() < max_age);
            let found = matching(&k.keys, kid);
            (fresh && !found.is_empty()).then_some(found)
        })
    }

    fn with<T>(&self, spec: &IssuerSpec, f: impl FnOnce(&mut Keys) -> T) -> T {
        let mut map = self.inner.issuers.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(spec.name.clone()).or_insert_with(|| Keys {
            spec: spec.clone(),
            keys: Arc::default(),
            fetched: None,
            tried: None,
        });
        if entry.spec != *spec {
            *entry = Keys {
                spec: spec.clone(),
                keys: Arc::default(),
                fetched: None,
                tried: None,
            };
        }
        f(entry)
    }

    /// Drops issuers no longer trusted.
    pub fn retain(&self, names: &[&str]) {
        let mut map = self.inner.issuers.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|name, _| names.contains(&name.as_str()));
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
    keys.iter()
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
