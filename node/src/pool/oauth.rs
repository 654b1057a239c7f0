//! A remote server's access tokens, from its OAuth client (`ServerSpec::oauth`).
//!
//! - **The grant:** client credentials (RFC 6749 section 4.4) at the authorization server's
//!   token endpoint. The client authenticates with HTTP Basic, its id and secret
//!   form-encoded first (section 2.3.1), and asks for the server's URL (or `oauth.resource`)
//!   as the resource indicator (RFC 8707), as the MCP authorization spec asks of clients, so
//!   the token's audience is that server and no other.
//! - **Kept, not fetched per request:** a token is kept until a tenth of its life (at least
//!   5 s, at most a minute) before `expires_in` says it expires, or, without `expires_in`,
//!   until the server refuses it. A `401` from the server drops the token it was sent
//!   with, so the next request gets a new one (`pool::remote` sends a refused request once
//!   more: a `401` ran nothing). The concurrent requests of one connection fetch one token
//!   between them.
//! - **Reached apart from the server:** the token endpoint gets none of the server's static
//!   headers, and trusts `oauth.ca_file` or the system's roots (not the server's `ca_file`),
//!   through the same egress rules as the server (a tenant's: public addresses only).
//! - **A failed fetch** is the answer for `[pool] oauth_failure_hold_ms` (5 s), so the calls
//!   queued behind it fail at once.
//! - Fetches are counted in `mcpd_upstream_oauth_tokens_total{server, outcome}`; a token or
//!   a secret is never logged.

use std::time::{Duration, Instant};

use mcpcp_proto::api::{OAuthClient, ServerSpec};
use reqwest::header::{HeaderValue, ACCEPT};
use serde::Deserialize;

use super::remote_http::BodyError;

/// Largest token endpoint answer read.
const MAX_ANSWER: usize = 64 << 10;

/// Longest error text of the authorization server's kept (it reaches logs and callers).
const MAX_ERROR_TEXT: usize = 200;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("the authorization server refused the client credentials (HTTP {status}: {error})")]
    Refused { status: u16, error: String },
    #[error("the token endpoint is unreachable: {0}")]
    Unreachable(String),
    #[error("the token endpoint's answer is not a bearer token: {0}")]
    BadAnswer(String),
}

impl TokenError {
    fn outcome(&self) -> &'static str {
        match self {
            TokenError::Refused { .. } => "refused",
            TokenError::Unreachable(_) => "unreachable",
            TokenError::BadAnswer(_) => "bad_answer",
        }
    }
}

/// One connection's access tokens for a remote server. Clones share the kept token: the
/// attempts of one start (`server/discover`, a session's `initialize`, the legacy stream) fetch
/// one between them.
#[derive(Clone)]
pub struct Tokens {
    server: String,
    /// With its secret opened.
    client: OAuthClient,
    resource: String,
    http: reqwest::Client,
    timeout: Duration,
    /// One fetch at a time: the concurrent requests of a connection wait for it.
    current: std::sync::Arc<tokio::sync::Mutex<Kept>>,
    /// How long a failed fetch stands (`[pool] oauth_failure_hold_ms`).
    failure_hold: Duration,
}

/// What the last fetch left.
#[derive(Default)]
enum Kept {
    #[default]
    Nothing,
    Token(Token),
    Failed {
        error: TokenError,
        until: Instant,
    },
}

struct Token {
    /// `Bearer <token>`, marked sensitive.
    bearer: HeaderValue,
    /// When to fetch a new one; `None`: when the server refuses it.
    renew_at: Option<Instant>,
}

/// RFC 6749 section 5.1.
#[derive(Deserialize)]
struct Issued {
    access_token: String,
    token_type: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// RFC 6749 section 5.2.
#[derive(Deserialize)]
struct Refusal {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

impl Tokens {
    /// The tokens of `spec`'s OAuth client (its secret opened), if it has one.
    /// A failed fetch is the answer for `failure_hold`, so that while the token endpoint is
    /// down or refusing, a connection's queued calls fail at once instead of each waiting on
    /// a fetch of its own.
    pub fn for_spec(spec: &ServerSpec, failure_hold: Duration) -> Result<Option<Tokens>, String> {
        let Some(client) = &spec.oauth else {
            return Ok(None);
        };
        let http =
            super::remote_http::builder_for(spec, "oauth.ca_file", client.ca_file.as_deref())?
                .build()
                .map_err(|e| e.to_string())?;
        Ok(Some(Tokens {
            server: spec.name.clone(),
            client: (**client).clone(),
            resource: client
                .resource
                .clone()
                .or_else(|| spec.url.as_deref().map(without_query))
                .unwrap_or_default(),
            http,
            timeout: Duration::from_millis(spec.timeouts.startup_ms),
            current: Default::default(),
            failure_hold,
        }))
    }

    /// The `Authorization` value to send: the kept token, or a new one.
    pub async fn bearer(&self) -> Result<HeaderValue, TokenError> {
        let mut current = self.current.lock().await;
        let now = Instant::now();
        match &*current {
            Kept::Token(t) if t.renew_at.is_none_or(|at| now < at) => return Ok(t.bearer.clone()),
            Kept::Failed { error, until } if now < *until => return Err(error.clone()),
            _ => {}
        }
        let fetched = self.fetch().await;
        let outcome = fetched.as_ref().map_or_else(TokenError::outcome, |_| "ok");
        metrics::counter!("mcpd_upstream_oauth_tokens_total", "server" => self.server.clone(), "outcome" => outcome)
            .increment(1);
        match fetched {
            Ok(token) => {
                let bearer = token.bearer.clone();
                *current = Kept::Token(token);
                Ok(bearer)
            }
            Err(error) => {
                tracing::warn!(server = %self.server, error = %error, "no access token for the remote server");
                *current = Kept::Failed {
                    error: error.clone(),
                    until: Instant::now() + self.failure_hold,
                };
                Err(error)
            }
        }
    }

    /// The server refused `sent`: the next request gets a new token (unless another request
    /// got one already).
    pub async fn refused(&self, sent: &HeaderValue) {
        let mut current = self.current.lock().await;
        if matches!(&*current, Kept::Token(t) if t.bearer == *sent) {
            tracing::info!(server = %self.server, "the remote server refused its access token; getting a new one");
            *current = Kept::Nothing;
        }
    }

    async fn fetch(&self) -> Result<Token, TokenError> {
        let asked = Instant::now();
        let mut form = vec![
            ("grant_type", "client_credentials".to_string()),
            ("resource", self.resource.clone()),
        ];
        if !self.client.scopes.is_empty() {
            form.push(("scope", self.client.scopes.join(" ")));
        }
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let resp = self
            .http
            .post(&self.client.token_url)
            .basic_auth(
                encode(&self.client.client_id),
                Some(encode(&self.client.client_secret)),
            )
            .header(ACCEPT, "application/json")
            .form(&form)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| TokenError::Unreachable(e.without_url().to_string()))?;
        let status = resp.status();
        let body = super::remote_http::read_body(resp, MAX_ANSWER)
            .await
            .map_err(|e| match e {
                BodyError::Broken(e) => TokenError::Unreachable(e),
                too_large => TokenError::BadAnswer(too_large.to_string()),
            })?;
        if !status.is_success() {
            let mut error = serde_json::from_slice::<Refusal>(&body).map_or_else(
                |_| "no OAuth error in the answer".to_string(),
                |r| match r.error_description {
                    Some(d) => format!("{}: {d}", r.error),
                    None => r.error,
                },
            );
            if let Some((cut, _)) = error.char_indices().nth(MAX_ERROR_TEXT) {
                error.truncate(cut);
                error.push('…');
            }
            return Err(TokenError::Refused {
                status: status.as_u16(),
                error,
            });
        }
        let issued: Issued =
            serde_json::from_slice(&body).map_err(|e| TokenError::BadAnswer(e.to_string()))?;
        if !issued.token_type.eq_ignore_ascii_case("bearer") {
            return Err(TokenError::BadAnswer(format!(
                "token_type {:?}",
                issued.token_type
            )));
        }
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", issued.access_token))
            .map_err(|_| TokenError::BadAnswer("the access token is not a header value".into()))?;
        bearer.set_sensitive(true);
        Ok(Token {
            bearer,
            renew_at: issued
                .expires_in
                .map(|s| asked + lifetime(Duration::from_secs(s))),
        })
    }
}

/// `url` without its query and fragment (which may carry a secret): the resource a token is
/// asked for, sent to another host.
fn without_query(url: &str) -> String {
    if !url.contains(['?', '#']) {
        return url.to_string();
    }
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// How long a token that lives `life` is used: all but a tenth of it, the margin at least 5 s
/// and at most a minute.
fn lifetime(life: Duration) -> Duration {
    let margin = (life / 10).clamp(Duration::from_secs(5), Duration::from_secs(60));
    life.saturating_sub(margin)
}

/// Puts the connection's access token (if the server has an OAuth client) on `req`; returns
/// the request and the token it carries (to drop if the server refuses it).
pub async fn with_bearer(
    req: reqwest::RequestBuilder,
    tokens: Option<&Tokens>,
    server: &str,
) -> Result<(reqwest::RequestBuilder, Option<HeaderValue>), crate::call::CallError> {
    let Some(tokens) = tokens else {
        return Ok((req, None));
    };
    let bearer = tokens.bearer().await.map_err(|e| {
        crate::call::CallError::NotRun(format!(
            "remote server {server:?}: {e}; the call did not run"
        ))
    })?;
    Ok((
        req.header(reqwest::header::AUTHORIZATION, bearer.clone()),
        Some(bearer),
    ))
}

/// Sends the request `build` makes, with the connection's access token when the server has
/// an OAuth client. A `401` to a token ran nothing: the token is dropped and the request sent
/// once more with a new one. The outer error is no access token; the inner one the
/// transport's. The last answer, a `401` too maybe, is the caller's to read.
pub async fn send_authorized(
    tokens: Option<&Tokens>,
    server: &str,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Result<reqwest::Response>, crate::call::CallError> {
    let mut resent = false;
    loop {
        let (req, bearer) = with_bearer(build(), tokens, server).await?;
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => return Ok(Err(e)),
        };
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED && !resent {
            if let (Some(tokens), Some(sent)) = (tokens, &bearer) {
                tokens.refused(sent).await;
                resent = true;
                continue;
            }
        }
        return Ok(Ok(resp));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_renewed_a_tenth_of_its_life_early_within_five_seconds_and_a_minute() {
        let s = Duration::from_secs;
        assert_eq!(lifetime(s(300)), s(270));
        assert_eq!(lifetime(s(30)), s(25), "at least 5 s early");
        assert_eq!(lifetime(s(3600)), s(3540), "at most a minute early");
        assert_eq!(
            lifetime(s(3)),
            s(0),
            "a token shorter than the margin is fetched each time"
        );
    }
}
