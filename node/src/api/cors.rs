//! Cross-origin requests between the cluster's own nodes: the console loaded from one node
//! carries on against another when its node dies, so a node answers a request whose `Origin`
//! is another member's address (`https://` + its advertised HTTP address), with credentials.
//! Any other origin gets no CORS headers, and the browser keeps the answer from its page.
//!
//! The session cookie is host-wide (cookies ignore ports), so nodes reached by one host name
//! share a sign-in; nodes reached by different names need one each (or a VIP, the usual way).

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::registry::Registry;

/// What the layer needs: the registry (for the members) and the scheme they are reached by.
#[derive(Clone)]
pub struct Members {
    pub registry: Registry,
    pub tls: bool,
}

impl Members {
    /// Whether `origin` is one of the members' addresses.
    fn allows(&self, origin: &str) -> bool {
        let scheme = if self.tls { "https://" } else { "http://" };
        let Some(addr) = origin.strip_prefix(scheme) else {
            return false;
        };
        self.registry
            .members()
            .iter()
            .any(|m| m.http_addr.eq_ignore_ascii_case(addr))
    }
}

/// The middleware: answers a member's preflight, and marks a member's answers readable.
pub async fn members(State(m): State<Members>, req: Request, next: Next) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .filter(|o| m.allows(o))
        .and_then(|o| HeaderValue::from_str(o).ok());
    let Some(origin) = origin else {
        let mut resp = next.run(req).await;
        // A shared cache must not serve a member's answer (with its CORS headers) to others.
        resp.headers_mut()
            .append(header::VARY, HeaderValue::from_static("Origin"));
        return resp;
    };
    let mut resp = if req.method() == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("content-type, x-csrf-token, if-match, idempotency-key"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    resp
}
