//! DNS-rebinding protection: a request is served only when its `Host` names this node as it
//! is configured to be reached: `localhost`, a loopback address, the host it advertises or
//! listens on, or one of `[api] tls_names` (a VIP, a load balancer's name). Anything else gets
//! `421 Misdirected Request`, with or without an `Origin`, as the MCP security guidance asks:
//! a page on `evil.example.com` whose name an attacker points at the node's address reaches it
//! with `Host: evil.example.com` and is refused before any handler runs. The port is not
//! compared: a node behind a balancer is reached on the balancer's port.
//!
//! Refusals count in `mcpd_http_requests_refused_total{reason="host"}`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The names this node answers to (a handful: compared in place, nothing allocated per
/// request).
#[derive(Debug, Clone)]
pub struct HostPolicy(Arc<[String]>);

impl HostPolicy {
    /// `names`: DNS names and IP addresses (IPv6 without brackets), any case.
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        HostPolicy(names.into_iter().collect())
    }

    /// Whether a `Host` header value (`name`, `name:port`, `[v6]:port`) names this node.
    pub fn allows(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split_once(']').map(|(h, _)| h).unwrap_or(v6),
            None => host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host),
        };
        let name = name.trim_end_matches('.');
        self.0.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// The middleware: refuses a request whose `Host` (or, in HTTP/2 terms, authority) does not
/// name this node.
pub async fn check(State(policy): State<HostPolicy>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    match host {
        Some(h) if policy.allows(h) => next.run(req).await,
        other => {
            metrics::counter!("mcpd_http_requests_refused_total", "reason" => "host").increment(1);
            tracing::debug!(host = ?other, "refused a request for a host this node is not");
            ApiError::MisdirectedHost(format!(
                "Host {:?} is not a name of this node; add it to api.tls_names if clients reach the node by it",
                other.unwrap_or("")
            ))
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_matched_by_name_whatever_the_port() {
        let p =
            HostPolicy::new(["localhost", "127.0.0.1", "::1", "MCP.example.com"].map(String::from));
        for ok in [
            "localhost",
            "localhost:7400",
            "127.0.0.1:1",
            "[::1]:7400",
            "mcp.example.com",
            "mcp.EXAMPLE.com.:443",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example.com",
            "evil.example.com:7400",
            "127.0.0.2",
            "[::2]:1",
            "",
            "localhost.evil.com",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
    }
}
