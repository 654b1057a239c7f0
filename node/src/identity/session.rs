//! Console sessions: what a browser holds instead of the caller's token.
//!
//! `POST /v1/session` with a token (API or JWT) answers with two cookies:
//! - `mcpd_session`: the caller's [`Principal`] and an expiry, sealed with the cluster's data
//!   key (`crate::seal`, AES-256-GCM), `HttpOnly; Secure; SameSite=Strict`. Script never sees
//!   it, and the token itself is never in it. Every node opens it, so a page that moves to
//!   another node stays signed in, and no node writes anything to sign a browser in.
//! - `mcpd_csrf`: the SHA-256 of the session cookie, readable by script. A write that is
//!   authenticated by the cookie must repeat it in `X-CSRF-Token` (a double submit: a page of
//!   another site can neither read the cookie nor compute its hash).
//!
//! Each use re-checks the principal against the registry (`Registry::still_holds`): revoking
//! the token, removing its tenant, or removing or changing a JWT's issuer ends its sessions at
//! once on every node. The seal's associated data names the cluster (a hash of its replicated
//! session key), so a cookie of another cluster built from the same CA directory does not open.
//! Both cookies carry the `__Host-` prefix: only this host, over TLS, at `/`, may set them, so a
//! sibling subdomain cannot plant one.

use axum::http::{header, request::Parts, HeaderMap, Method};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::registry::Principal;
use crate::seal::{DataKey, SEALED};

/// The cookie that carries the sealed session.
pub const SESSION_COOKIE: &str = "__Host-mcpd_session";
/// The cookie whose value a cookie-authenticated write repeats in [`CSRF_HEADER`].
pub const CSRF_COOKIE: &str = "__Host-mcpd_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The associated data of a session sealed for `cluster`: it opens as nothing else, and nothing
/// else (a server's env value, another cluster's session) opens as a session.
fn place(cluster: &str) -> String {
    format!("console/session/{cluster}")
}

/// What the session cookie holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// The caller, without its groups (the admin API does not read them; they would only
    /// grow the cookie past what browsers keep).
    pub principal: Principal,
    /// Unix seconds.
    pub expires_at: u64,
    /// For a JWT caller: its issuer's revision at sign-in. A changed issuer (its role or
    /// tenant mapping) ends the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_revision: Option<u64>,
}

/// Why a session cookie was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("the console session is not valid on this cluster; sign in again")]
    Invalid,
    #[error("the console session has expired; sign in again")]
    Expired,
    #[error("a write with a session cookie needs the X-CSRF-Token header (the mcpd_csrf cookie)")]
    Csrf,
}

impl Session {
    /// The cookie value of this session, for `cluster`.
    pub fn seal(&self, key: &DataKey, cluster: &str) -> Result<String, crate::seal::SealError> {
        let plain = serde_json::to_string(self).unwrap_or_default();
        key.seal(&place(cluster), &plain)
    }

    /// The session of a cookie value, if `cluster` sealed it and it has not expired.
    pub fn open(
        key: &DataKey,
        cluster: &str,
        cookie: &str,
        now: u64,
    ) -> Result<Session, SessionError> {
        if !cookie.starts_with(SEALED) {
            return Err(SessionError::Invalid);
        }
        let plain = key
            .open(&place(cluster), cookie)
            .map_err(|_| SessionError::Invalid)?;
        let session: Session = serde_json::from_str(&plain).map_err(|_| SessionError::Invalid)?;
        if session.expires_at <= now {
            return Err(SessionError::Expired);
        }
        Ok(session)
    }
}

/// The CSRF token that goes with a session cookie value.
pub fn csrf_token(cookie: &str) -> String {
    let digest = Sha256::digest(format!("mcpd-csrf\0{cookie}").as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
}

/// The session cookie of a request, if it sent exactly one (two are a planted cookie beside
/// the real one: neither is taken).
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    let mut found = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.trim());
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// Whether a cookie-authenticated request may go on: reads always, writes with the session's
/// CSRF token in [`CSRF_HEADER`].
pub fn check_csrf(parts: &Parts, cookie: &str) -> Result<(), SessionError> {
    if matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let sent = parts
        .headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or(SessionError::Csrf)?;
    // Both sides are public-length hashes of the secret cookie; comparing them leaks nothing
    // about the cookie itself.
    if sent == csrf_token(cookie) {
        Ok(())
    } else {
        Err(SessionError::Csrf)
    }
}

/// The `Set-Cookie` values that sign a browser in for `max_age_s`.
pub fn set_cookies(sealed: &str, max_age_s: u64) -> [String; 2] {
    [
        format!(
            "{SESSION_COOKIE}={sealed}; Path=/; Max-Age={max_age_s}; HttpOnly; Secure; SameSite=Strict"
        ),
        format!(
            "{CSRF_COOKIE}={}; Path=/; Max-Age={max_age_s}; Secure; SameSite=Strict",
            csrf_token(sealed)
        ),
    ]
}

/// The `Set-Cookie` values that sign a browser out.
pub fn clear_cookies() -> [String; 2] {
    [
        format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict"),
        format!("{CSRF_COOKIE}=; Path=/; Max-Age=0; Secure; SameSite=Strict"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcpcp_proto::api::Role;

    fn principal() -> Principal {
        Principal {
            token_id: "t1".into(),
            role: Role::Viewer,
            tenant: None,
            scopes: None,
            groups: Vec::new(),
            jwt: None,
        }
    }

    fn parts(method: Method, headers: &[(&str, &str)]) -> Parts {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri("/v1/servers");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_session_opens_with_the_key_that_sealed_it_until_it_expires() {
        let key = DataKey::from_bytes(&[7; 32]);
        let session = Session {
            principal: principal(),
            expires_at: 100,
            issuer_revision: None,
        };
        let sealed = session.seal(&key, "c1").unwrap();
        let open = Session::open(&key, "c1", &sealed, 99).unwrap();
        assert_eq!(open.principal, principal());
        let refused = |key: &DataKey, cluster: &str, value: &str, now: u64| {
            Session::open(key, cluster, value, now).unwrap_err()
        };
        assert_eq!(refused(&key, "c1", &sealed, 100), SessionError::Expired);
        let other = DataKey::from_bytes(&[8; 32]);
        assert_eq!(refused(&other, "c1", &sealed, 99), SessionError::Invalid);
        // Another cluster made from the same CA directory (the same data key) does not open it.
        assert_eq!(refused(&key, "c2", &sealed, 99), SessionError::Invalid);
        // A value that is not sealed is never taken as a session (the seal's plain-text
        // passthrough is for old env values only).
        let plain = serde_json::to_string(&session).unwrap();
        assert_eq!(refused(&key, "c1", &plain, 99), SessionError::Invalid);
        // A server's sealed env value does not open as a session.
        let env = key.seal("s/env/X", &plain).unwrap();
        assert_eq!(refused(&key, "c1", &env, 99), SessionError::Invalid);
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let p = parts(
            Method::GET,
            &[(
                "cookie",
                "a=b; __Host-mcpd_session=sealed:v1:xyz; __Host-mcpd_csrf=c",
            )],
        );
        assert_eq!(cookie(&p.headers), Some("sealed:v1:xyz"));
        assert_eq!(cookie(&parts(Method::GET, &[]).headers), None);
        // A second one (planted by a sibling host under another path) makes neither count.
        let two = parts(
            Method::GET,
            &[(
                "cookie",
                "__Host-mcpd_session=sealed:v1:a; __Host-mcpd_session=sealed:v1:b",
            )],
        );
        assert_eq!(cookie(&two.headers), None);
    }

    #[test]
    fn a_write_needs_the_session_csrf_token_and_a_read_does_not() {
        let c = "sealed:v1:abc";
        assert_eq!(check_csrf(&parts(Method::GET, &[]), c), Ok(()));
        assert_eq!(
            check_csrf(&parts(Method::POST, &[]), c),
            Err(SessionError::Csrf)
        );
        assert_eq!(
            check_csrf(&parts(Method::DELETE, &[(CSRF_HEADER, "nope")]), c),
            Err(SessionError::Csrf)
        );
        let good = csrf_token(c);
        assert_eq!(
            check_csrf(&parts(Method::PUT, &[(CSRF_HEADER, &good)]), c),
            Ok(())
        );
        assert_ne!(csrf_token("sealed:v1:abd"), good);
    }

    #[test]
    fn the_session_cookie_is_hidden_from_script_and_never_leaves_tls() {
        let [session, csrf] = set_cookies("sealed:v1:abc", 60);
        assert!(session.contains("HttpOnly") && session.contains("Secure"));
        assert!(session.contains("SameSite=Strict") && session.contains("Max-Age=60"));
        assert!(!csrf.contains("HttpOnly") && csrf.contains("Secure"));
        assert!(csrf.starts_with(&format!("{CSRF_COOKIE}={}", csrf_token("sealed:v1:abc"))));
    }
}
