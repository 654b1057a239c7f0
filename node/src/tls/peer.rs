//! Mutual TLS between nodes, for every gRPC service (Raft, Cluster, Peer).
//!
//! - **Accepting** ([`incoming`]): each TCP connection gets its own handshake task, bounded by
//!   [`HandshakeLimits`], so a slow or silent client holds up nobody. The server requires a
//!   client certificate that chains to the cluster CA; a connection that presents none, or
//!   one of another CA, never reaches tonic. What the certificate names is kept with the
//!   connection ([`PeerInfo`]) for [`super::admission`] to check on every call.
//! - **Dialing** ([`PeerConnector`]): tonic's channels connect through it; it presents this
//!   node's certificate and accepts a server only with a certificate of the cluster CA for the
//!   cluster's peer server name. rustls resumes sessions, so a reconnect costs less than a
//!   full handshake.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mcpcp_pki::NodeIdentity;
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;

use super::members::Members;
use super::verify::ServerCheck;
use super::{NodeTls, TlsError};
use crate::shutdown::Shutdown;

/// Bounds on the TLS handshakes of the gRPC listener (`[tls] peer_handshake_timeout_ms`,
/// `max_peer_handshakes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// How long a peer may take to complete its handshake; then the connection is closed.
    pub timeout: Duration,
    /// Handshakes under way at once; a connection past it is closed at once, so a scanner
    /// cannot hold the descriptors Raft and the server processes need.
    pub max_pending: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            timeout: Duration::from_secs(10),
            max_pending: 256,
        }
    }
}

/// The TLS configuration of the gRPC server: a client certificate of the cluster CA required.
pub fn server_config(tls: &NodeTls) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), mcpcp_pki::provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(mcpcp_pki::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(tls.peer_cert.clone()));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS configuration of this node's gRPC clients: its own certificate; a server is
/// accepted with a certificate of the cluster CA for the peer name that names a current
/// member (so a removed node, or a stranger with a cluster certificate, answering at a
/// member's address is refused).
pub fn client_config(tls: &NodeTls, members: Members) -> Result<Arc<ClientConfig>, TlsError> {
    let check = ServerCheck::member(tls.roots.clone(), tls.identity.cluster.clone(), members)?;
    let mut config = ClientConfig::builder_with_provider(mcpcp_pki::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(check))
        .with_client_cert_resolver(Arc::new(tls.peer_cert.clone()));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Who is at the other end of a gRPC connection, as its certificate says.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The node its certificate names (`None`: a CA-signed certificate naming no node).
    pub identity: Option<NodeIdentity>,
    pub remote: SocketAddr,
}

/// A gRPC connection whose handshake succeeded.
pub struct PeerConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for PeerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The gRPC server's incoming connections: accepted on `listener` until `shutdown`, each
/// handed over once its mutual-TLS handshake has succeeded.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: HandshakeLimits,
    shutdown: Shutdown,
) -> ReceiverStream<io::Result<PeerConn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let pending = Arc::new(tokio::sync::Semaphore::new(limits.max_pending));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = shutdown.clone().wait() => return,
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                refused(remote, "busy", "too many handshakes under way");
                continue;
            };
            // Small Raft and forwarding replies must not wait for delayed ACKs (~40 ms).
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            // Bounded by the handshake timeout; it owns nothing but the connection.
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(limits.timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => {
                        let identity = io
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| NodeIdentity::from_cert(c));
                        let info = PeerInfo { identity, remote };
                        let _ = tx.send(Ok(PeerConn { io, info })).await;
                    }
                    Ok(Err(e)) => refused(remote, "failed", &e.to_string()),
                    Err(_) => refused(remote, "timeout", "handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn refused(remote: SocketAddr, reason: &'static str, why: &str) {
    metrics::counter!("mcpd_tls_handshake_failures_total", "listener" => "grpc", "reason" => reason)
        .increment(1);
    // Debug, not warn: anyone who can reach the port can make these (the metric counts them).
    tracing::debug!(%remote, reason = why, "refused a gRPC connection: TLS handshake failed");
}

/// Dials peers for tonic: TCP, then TLS with this node's certificate.
#[derive(Clone)]
pub struct PeerConnector {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl PeerConnector {
    /// Dials as the node `tls` names, accepting current `members` only.
    pub fn new(tls: &NodeTls, members: Members) -> Result<Self, TlsError> {
        Self::with_config(client_config(tls, members)?, &tls.identity.cluster)
    }

    /// Dials with `config` (what it presents and trusts) a node of `cluster`.
    pub fn with_config(
        config: Arc<ClientConfig>,
        cluster: &mcpcp_pki::ClusterId,
    ) -> Result<Self, TlsError> {
        let server_name = ServerName::try_from(cluster.peer_server_name())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(PeerConnector {
            connector: TlsConnector::from(config),
            server_name,
        })
    }
}

type Connecting = Pin<
    Box<
        dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
    >,
>;

impl tower::Service<http::Uri> for PeerConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no peer address"))?
                .to_string();
            let tcp = TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            let tls = this.connector.connect(this.server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
