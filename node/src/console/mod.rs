//! The web console (`/ui`): static assets built into the binary (`node/console/`, plain ES
//! modules and CSS, and uPlot vendored from npm by `node/console/vendor.sh`), served with a
//! Content-Security-Policy that forbids inline script and lets the page reach only this
//! cluster's nodes. The page speaks the public admin API only (`/v1/...`), signs in through
//! `/v1/session`, and moves to another member when the node it came from stops answering
//! (`crate::api::cors` lets it).
//!
//! ```text
//! GET /ui ──▶ index.html ──▶ app.js ──▶ /v1/session, /v1/cluster/status, /v1/servers, ...
//! GET /ui/ASSET ──▶ ASSETS (include_bytes!) ──▶ security headers
//! ```

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::registry::Registry;

/// One built-in file.
struct Asset {
    path: &'static str,
    mime: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $mime:expr) => {
        Asset {
            path: $path,
            mime: $mime,
            body: include_bytes!(concat!("../../console/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file the console is made of (checked against `node/console/` by a test).
static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("view.js", JS),
    asset!("sso.js", JS),
    asset!("pages/cluster.js", JS),
    asset!("pages/servers.js", JS),
    asset!("pages/tokens.js", JS),
    asset!("pages/policies.js", JS),
    asset!("pages/audit.js", JS),
    asset!("pages/traffic.js", JS),
    asset!("pages/bridge.js", JS),
    asset!("vendor/uPlot.iife.min.js", JS),
    asset!("vendor/uPlot.min.css", "text/css; charset=utf-8"),
];

/// `/ui` and its assets.
pub fn router<S: Clone + Send + Sync + 'static>(registry: Registry, tls: bool) -> Router<S> {
    let state = Console { registry, tls };
    Router::new()
        .route("/ui", get(to_folder))
        .route("/ui/", get(index))
        .route("/ui/{*path}", get(file))
        .with_state(state)
}

#[derive(Clone)]
struct Console {
    registry: Registry,
    tls: bool,
}

/// `/ui` → `ui/`: the page's files are named relative to its folder (which keeps them right
/// behind a proxy's path prefix), and so is the SSO redirect URI.
async fn to_folder() -> Response {
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, HeaderValue::from_static("ui/"))],
    )
        .into_response()
}

async fn index(State(c): State<Console>) -> Response {
    serve(&c, "index.html")
}

async fn file(State(c): State<Console>, Path(path): Path<String>) -> Response {
    serve(&c, &path)
}

fn serve(c: &Console, path: &str) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return (StatusCode::NOT_FOUND, "no such console file").into_response();
    };
    let mut resp = asset.body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.mime));
    // Small files, changed with the binary: revalidated at every load.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Never without a policy: should an origin not fit a header, the page keeps to its node.
    let csp = HeaderValue::from_str(&policy(&connect_origins(c)))
        .or_else(|_| HeaderValue::from_str(&policy(&[])))
        .unwrap_or(HeaderValue::from_static("default-src 'none'"));
    h.insert(header::CONTENT_SECURITY_POLICY, csp);
    resp
}

/// The origins the page may send requests to besides its own: the cluster's members (it moves
/// to one when its node dies) and the issuers it signs in with (discovery and token requests).
fn connect_origins(c: &Console) -> Vec<String> {
    let scheme = if c.tls { "https" } else { "http" };
    let mut origins: Vec<String> = c
        .registry
        .members()
        .into_iter()
        .map(|m| format!("{scheme}://{}", m.http_addr))
        .collect();
    let data = c.registry.local();
    for i in data.state.issuers.values() {
        if i.spec.console_client_id.is_none() {
            continue;
        }
        if let Ok(url) = reqwest::Url::parse(&i.spec.issuer) {
            origins.push(url.origin().ascii_serialization());
        }
    }
    origins
}

/// The Content-Security-Policy: script, style and images from this node only (no inline
/// script or style), requests to this node and the other members, no framing, no plugins.
fn policy(members: &[String]) -> String {
    let connect: String = members
        .iter()
        .filter(|o| !o.contains([';', ',', ' ', '\'']) && !o.chars().any(char::is_control))
        .map(|o| format!(" {o}"))
        .collect();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_console_is_built_in() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
        let mut on_disk = Vec::new();
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if matches!(
                    p.extension().and_then(|x| x.to_str()),
                    Some("js" | "css" | "html")
                ) {
                    on_disk.push(p.strip_prefix(&dir).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        let mut built: Vec<String> = ASSETS.iter().map(|a| a.path.to_string()).collect();
        built.sort();
        assert_eq!(on_disk, built);
    }

    #[test]
    fn the_policy_forbids_inline_script_and_names_the_members() {
        let p = policy(&[
            "https://10.0.0.2:8080".into(),
            "https://x'; script-src *".into(),
        ]);
        assert!(p.contains("script-src 'self';"));
        assert!(!p.contains("unsafe-inline"));
        assert!(p.contains("connect-src 'self' https://10.0.0.2:8080;"));
        assert!(!p.contains("script-src *"));
        assert!(p.contains("frame-ancestors 'none'"));
    }
}
