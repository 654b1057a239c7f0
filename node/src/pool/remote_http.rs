//! The HTTP client a node reaches one remote server with, whatever its transport: rustls with
//! the spec's CA file or the system's roots, no redirects (a redirect would carry the spec's
//! secret headers to another host), the spec's headers, marked sensitive, sent with every
//! request as the client's defaults (no copy per request), and for a tenant's server a
//! resolver that keeps the nodes' own addresses out (`super::egress`). The server's OAuth
//! client (`super::oauth`) reaches its token endpoint with the same rules but its own trust
//! and none of the headers.

use std::time::Duration;

use mcpcp_proto::api::ServerSpec;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// The client of every request to the server `spec` names.
pub fn client_for(spec: &ServerSpec) -> Result<reqwest::Client, String> {
    let mut headers = HeaderMap::new();
    for (k, v) in &spec.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("headers.{k}: not a header name"))?;
        let mut value =
            HeaderValue::from_str(v).map_err(|_| format!("headers.{k}: not a header value"))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    builder_for(spec, "ca_file", spec.ca_file.as_deref())?
        .default_headers(headers)
        .build()
        .map_err(|e| e.to_string())
}

/// The server's URL, parsed once (a request given a string would parse it each time).
pub fn url_of(spec: &ServerSpec) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(spec.url.as_deref().unwrap_or_default())
        .map_err(|e| format!("url: not a URL ({e})"))
}

/// A client for requests made on behalf of the server `spec` names (to it, or to its
/// authorization server): TLS trusting `ca_file` (the setting `field`) or the system's
/// roots, no redirects, the connect timeout, and the egress rules of a tenant's server.
pub fn builder_for(
    spec: &ServerSpec,
    field: &str,
    ca_file: Option<&str>,
) -> Result<reqwest::ClientBuilder, String> {
    let tls = mcpcp_pki::trust::client_config(ca_file.map(std::path::Path::new), &[b"http/1.1"])
        .map_err(|e| format!("{field}: {e}"))?;
    let mut builder = reqwest::Client::builder();
    if spec.tenant.is_some() {
        // Through a proxy the proxy's name would be resolved, not the server's.
        builder = builder
            .dns_resolver(std::sync::Arc::new(super::egress::PublicOnly))
            .no_proxy();
    }
    Ok(builder
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_millis(spec.timeouts.startup_ms))
        .redirect(reqwest::redirect::Policy::none()))
}

/// A request to `server` that got no answer: not run when the server was not reached, maybe
/// run when the exchange broke after it was sent.
pub fn send_failed(server: &str, e: reqwest::Error) -> crate::call::CallError {
    use crate::call::CallError;
    let e = e.without_url();
    if e.is_connect() {
        CallError::NotRun(format!(
            "remote server {server:?} is unreachable ({e}); the call did not run"
        ))
    } else {
        CallError::Crashed(format!(
            "remote server {server:?}: {e}; it may or may not have run"
        ))
    }
}

/// Whether `resp` is an SSE stream.
pub fn is_event_stream(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The JSON-RPC message of a whole (JSON) answer of `server`, at most `max` bytes; `None`
/// when the body is not one. A body that breaks off may have followed a run.
pub async fn read_message(
    resp: reqwest::Response,
    max: usize,
    server: &str,
) -> Result<Option<mcpcp_proto::mcp::Message>, crate::call::CallError> {
    let body = read_body(resp, max).await.map_err(|e| {
        crate::call::CallError::Crashed(format!(
            "remote server {server:?}: {e}; it may or may not have run"
        ))
    })?;
    Ok(mcpcp_proto::mcp::Message::parse(&body).ok())
}

/// Reads a request's SSE stream until its JSON-RPC answer, at most `max` bytes; the other
/// messages on it (notifications, the server's requests) go to `other` as they come.
pub async fn read_answer<F: std::future::Future<Output = ()>>(
    resp: reqwest::Response,
    max: usize,
    server: &str,
    other: impl FnMut(mcpcp_proto::mcp::Message) -> F,
) -> Result<Result<serde_json::Value, mcpcp_proto::mcp::ErrorObject>, crate::call::CallError> {
    let mut parser = mcpcp_proto::sse::SseParser::default();
    let mut budget = max;
    match read_stream(resp, &mut parser, &mut budget, other).await {
        StreamEnd::Answer(outcome) => Ok(outcome),
        StreamEnd::Cut(why) => Err(stream_broke(server, &why)),
        StreamEnd::TooLarge => Err(stream_broke(
            server,
            &format!("streamed over {max} bytes without an answer"),
        )),
    }
}

/// A call whose stream ended without its answer: the server took it, so it may have run.
pub fn stream_broke(server: &str, why: &str) -> crate::call::CallError {
    crate::call::CallError::Crashed(format!(
        "remote server {server:?} {why}; it may or may not have run"
    ))
}

/// How reading one SSE stream of a request ended.
pub enum StreamEnd {
    Answer(Result<serde_json::Value, mcpcp_proto::mcp::ErrorObject>),
    /// Closed, or broken, before the answer (why).
    Cut(String),
    /// Over the bytes left to read.
    TooLarge,
}

/// Reads one SSE stream of a request with `parser` until the request's answer, taking what
/// it reads off `budget`; the other messages go to `other` as they come.
pub async fn read_stream<F: std::future::Future<Output = ()>>(
    resp: reqwest::Response,
    parser: &mut mcpcp_proto::sse::SseParser,
    budget: &mut usize,
    mut other: impl FnMut(mcpcp_proto::mcp::Message) -> F,
) -> StreamEnd {
    use futures_util::StreamExt;
    use mcpcp_proto::mcp::Message;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return StreamEnd::Cut(format!("broke its stream ({})", e.without_url())),
        };
        let Some(left) = budget.checked_sub(chunk.len()) else {
            return StreamEnd::TooLarge;
        };
        *budget = left;
        for event in parser.feed(&chunk) {
            match Message::parse(event.data.as_bytes()) {
                Ok(Message::Response { outcome, .. }) => return StreamEnd::Answer(outcome),
                Ok(msg) => other(msg).await,
                Err(_) => {}
            }
        }
    }
    StreamEnd::Cut("ended the stream without an answer".into())
}

/// Why an answer's body was not read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    Broken(String),
    #[error("an answer over {0} bytes")]
    TooLarge(usize),
}

/// The whole body of `resp`, at most `max` bytes.
pub async fn read_body(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| BodyError::Broken(e.without_url().to_string()))?
    {
        if out.len() + chunk.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The scheme, host and port of `url`, for logs: its path and query may carry a secret.
pub fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn logs_show_only_the_origin_of_a_url() {
        assert_eq!(
            super::origin("https://h:8443/mcp?key=s3cret"),
            "https://h:8443"
        );
        assert_eq!(super::origin("http://h"), "http://h");
    }
}
