//! The protected resources this node serves, as OAuth names them (RFC 8707, RFC 9728): the
//! admin API at the cluster's base URL, and each MCP endpoint at its own URL. A token must be
//! minted for the resource it is used at; a client learns which from the metadata document
//! the `401`'s `WWW-Authenticate` points to.

use axum::http::{header, HeaderMap, Uri};

use super::config::IdentityConfig;

/// Where the metadata documents are, under the origin.
pub const METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// The cluster's base URL as a client sees it: an origin and an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// `https://host[:port]`.
    pub origin: String,
    /// `""`, or a prefix a proxy adds in front of every path (`/mcpd`).
    pub prefix: String,
}

impl Base {
    /// The base of a request: `public_url` when set, else the forwarded headers when trusted,
    /// else the scheme of the listener and the request's `Host`.
    pub fn of(headers: &HeaderMap, uri: &Uri, config: &IdentityConfig, tls: bool) -> Base {
        if let Some(url) = config.public_base() {
            return Base::parse(url);
        }
        if config.trust_forwarded_headers {
            if let Some(host) = text(headers, "x-forwarded-host") {
                let proto = text(headers, "x-forwarded-proto").unwrap_or("https");
                let prefix = text(headers, "x-forwarded-prefix").unwrap_or("");
                return Base {
                    origin: format!("{proto}://{}", first(host)),
                    prefix: prefix.trim_end_matches('/').to_string(),
                };
            }
        }
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
            .or_else(|| uri.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| "localhost".into());
        Base {
            origin: format!("{}://{host}", if tls { "https" } else { "http" }),
            prefix: String::new(),
        }
    }

    fn parse(url: &str) -> Base {
        let after_scheme = url.find("://").map_or(0, |i| i + 3);
        match url[after_scheme..].find('/') {
            Some(i) => Base {
                origin: url[..after_scheme + i].to_string(),
                prefix: url[after_scheme + i..].trim_end_matches('/').to_string(),
            },
            None => Base {
                origin: url.to_string(),
                prefix: String::new(),
            },
        }
    }

    /// The resource served at `path` of this node (`""` for the admin API, `/mcp`,
    /// `/servers/NAME/mcp`).
    pub fn resource(&self, path: &str) -> String {
        format!("{}{}{path}", self.origin, self.prefix)
    }

    /// Where the metadata of the resource at `path` is (RFC 9728 §3.1: the well-known path
    /// goes between the origin and the resource's path).
    pub fn metadata_url(&self, path: &str) -> String {
        format!("{}{METADATA_PATH}{}{path}", self.origin, self.prefix)
    }

    /// The local path of a metadata request's suffix (after [`METADATA_PATH`]): the prefix
    /// taken off when a client kept it.
    pub fn local_path<'a>(&self, suffix: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            return suffix;
        }
        suffix.strip_prefix(self.prefix.as_str()).unwrap_or(suffix)
    }
}

fn text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// The first of a comma-separated list (a chain of proxies appends).
fn first(v: &str) -> &str {
    v.split(',').next().unwrap_or(v).trim()
}

/// Whether `path` is a resource this node serves (what a metadata request may ask about).
pub fn is_resource(path: &str) -> bool {
    if path.is_empty() || path == "/mcp" {
        return true;
    }
    ["/servers/", "/v/"].iter().any(|prefix| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("/mcp"))
            .is_some_and(|name| !name.is_empty() && !name.contains('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(headers: &[(&str, &str)], config: &IdentityConfig) -> Base {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Base::of(&map, &Uri::from_static("/mcp"), config, true)
    }

    #[test]
    fn a_public_url_with_a_prefix_names_every_resource() {
        let config = IdentityConfig {
            public_url: Some("https://gw.example.com/mcpd/".into()),
            ..IdentityConfig::default()
        };
        let base = base(&[("host", "10.0.0.1:7000")], &config);
        assert_eq!(base.resource("/mcp"), "https://gw.example.com/mcpd/mcp");
        assert_eq!(base.resource(""), "https://gw.example.com/mcpd");
        assert_eq!(
            base.metadata_url("/servers/time/mcp"),
            "https://gw.example.com/.well-known/oauth-protected-resource/mcpd/servers/time/mcp"
        );
        assert_eq!(
            base.local_path("/mcpd/servers/time/mcp"),
            "/servers/time/mcp"
        );
    }

    #[test]
    fn forwarded_headers_count_only_when_trusted() {
        let forwarded = [
            ("host", "10.0.0.1:7000"),
            ("x-forwarded-host", "mcp.example.com, inner"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-prefix", "/p"),
        ];
        let untrusted = base(&forwarded, &IdentityConfig::default());
        assert_eq!(untrusted.resource("/mcp"), "https://10.0.0.1:7000/mcp");
        let config = IdentityConfig {
            trust_forwarded_headers: true,
            ..IdentityConfig::default()
        };
        let trusted = base(&forwarded, &config);
        assert_eq!(trusted.resource("/mcp"), "https://mcp.example.com/p/mcp");
    }

    #[test]
    fn only_served_paths_are_resources() {
        assert!(is_resource(""));
        assert!(is_resource("/mcp"));
        assert!(is_resource("/servers/time/mcp"));
        assert!(!is_resource("/servers//mcp"));
        assert!(!is_resource("/v1/servers"));
        assert!(!is_resource("/servers/a/b/mcp"));
        assert!(is_resource("/v/kit/mcp"));
        assert!(!is_resource("/v//mcp"));
    }
}
