//! One HTTPS request from `mcpd` itself to a node's edge, for the commands that act before a
//! node has (or without) an admin token: `mcpd recover-admin` and a join.

use std::sync::Arc;

use http_body_util::BodyExt;

/// POSTs `body` as JSON to `url` (`https://host:port/path`) with the TLS client `tls`, and
/// returns the status and the body of the answer.
pub async fn post_json(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    body: &serde_json::Value,
) -> anyhow::Result<(http::StatusCode, bytes::Bytes)> {
    // A node that accepts and then stalls must not hold a start-up or a recovery forever.
    tokio::time::timeout(std::time::Duration::from_secs(30), post(url, tls, body))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within 30 s"))?
}

async fn post(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    body: &serde_json::Value,
) -> anyhow::Result<(http::StatusCode, bytes::Bytes)> {
    use anyhow::Context;
    let uri: http::Uri = url.parse().with_context(|| format!("{url}: not a URL"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("https"),
        "{url}: nodes serve https://"
    );
    let authority = uri.authority().context("the URL has no host")?.clone();
    let host = authority.host().trim_matches(['[', ']']).to_string();
    let port = authority.port_u16().unwrap_or(443);
    let name = rustls::pki_types::ServerName::try_from(host.clone())?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with {authority}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::post(uri.path())
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            serde_json::to_vec(body)?,
        )))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}
