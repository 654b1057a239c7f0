//! The HTTP listener: connections are accepted on the main runtime and dealt out to the
//! data-plane shards (see `crate::shard`), each served there with `TCP_NODELAY` and a short
//! poll for the client's next request after each answer.
//!
//! A client that calls back to back (an agent running tools in sequence, a benchmark) sends
//! its next request tens of µs after our answer. If the worker thread has gone to sleep by
//! then, the kernel must wake it, which on a virtual machine costs about as much again. So,
//! for `api.next_request_spin_us` after writing, a connection whose read would block yields to
//! the runtime instead of letting it park: the worker keeps polling the I/O driver (without
//! blocking) and the request is read as soon as it lands.
//!
//! The poll is bounded three ways: in time (the setting, 0 turns it off), in scope (only one
//! connection on the node polls at a time: one worker at most stays awake for it), and by work
//! (a yield lets every other task run first, so a busy node loses nothing). Outcomes are counted
//! in `mcpd_http_next_request_polls_total{outcome}`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::shard::ShardHandles;
use crate::shutdown::Shutdown;
use crate::tls::edge::EdgeTls;

/// Taken by the one connection that polls for its next request.
static POLLING: AtomicBool = AtomicBool::new(false);

/// How the edge serves each connection: TLS or not, and the limits that hold under abuse.
#[derive(Clone)]
pub struct EdgeSettings {
    /// HTTPS when set (see `crate::tls::edge`); plain HTTP behind a TLS-terminating balancer.
    pub tls: Option<EdgeTls>,
    /// After answering, how long a connection polls for its client's next request.
    pub next_request_spin: Duration,
    /// The TLS handshake and each request's headers must arrive within this; it also closes
    /// a kept-alive connection that sends no next request in time.
    pub header_read_timeout: Duration,
    /// Open connections at once; more are closed on accept, not queued.
    pub max_connections: usize,
}

/// A connection on its way to a shard, holding its place under `max_connections`.
type Handover = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

/// Accepts connections on `listener` and deals them out, in turn, to the shards, where each
/// is served by `router` until `shutdown`; returns once every shard's server has finished
/// its connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shards: ShardHandles,
    edge: EdgeSettings,
    shutdown: Shutdown,
) {
    let slots = Arc::new(Semaphore::new(edge.max_connections));
    metrics::gauge!("mcpd_http_max_connections").set(edge.max_connections as f64);
    let mut feeds = Vec::with_capacity(shards.len());
    let mut servers = FuturesUnordered::new();
    for index in 0..shards.len() {
        let (tx, rx) = mpsc::unbounded_channel();
        feeds.push(tx);
        let shard = ShardServer {
            rx,
            router: router.clone(),
            tls: edge
                .tls
                .as_ref()
                .map(|t| TlsAcceptor::from(t.config.clone())),
            spin: edge.next_request_spin,
            header_read_timeout: edge.header_read_timeout,
            open: metrics::gauge!("mcpd_http_open_connections", "shard" => index.to_string()),
        };
        let shutdown = shutdown.clone();
        let server = shards.get(index).spawn(shard.run(shutdown));
        servers.push(async move { (index, server.await) });
    }
    let mut turn = 0usize;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.clone().wait() => break,
            Some((shard, ended)) = servers.next() => {
                if shutdown.fired() {
                    // It drained first; the others still get their turn below.
                    break;
                }
                // A shard's server only ends on shutdown: one that ended early (failed or
                // panicked) would silently lose its share of connections. Stop the node.
                tracing::error!(shard, outcome = ?ended, "a data-plane HTTP server ended early");
                return;
            }
            a = listener.accept() => a,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: back off instead of spinning on it.
                tracing::error!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Full: closed now rather than queued, so a flood costs the node a socket for
            // microseconds, not a slot for minutes.
            metrics::counter!("mcpd_http_connections_refused_total", "reason" => "max_connections")
                .increment(1);
            tracing::debug!(%addr, "refused an HTTP connection: api.max_connections reached");
            drop(tcp);
            continue;
        };
        // Small JSON answers must not wait for Nagle and the client's delayed ACK (40 ms).
        let _ = tcp.set_nodelay(true);
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, %addr, "could not hand over an HTTP connection");
                continue;
            }
        };
        let shard = turn % feeds.len();
        turn = turn.wrapping_add(1);
        if feeds[shard].send((std, addr, permit)).is_err() {
            tracing::error!(shard, %addr, "a data-plane HTTP server is gone; connection dropped");
        }
    }
    drop(feeds);
    while let Some((shard, ended)) = servers.next().await {
        if let Err(e) = ended {
            tracing::error!(shard, error = %e, "data-plane HTTP server failed");
        }
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One shard's HTTP server: the connections dealt to it, each served on a task of its own on
/// the shard's runtime (its TLS handshake included, so a slow client delays only itself).
struct ShardServer {
    rx: mpsc::UnboundedReceiver<Handover>,
    router: axum::Router,
    tls: Option<TlsAcceptor>,
    spin: Duration,
    header_read_timeout: Duration,
    /// `mcpd_http_open_connections` of this shard.
    open: metrics::Gauge,
}

impl ShardServer {
    /// Serves until `shutdown`, then lets open requests finish (connections close once idle).
    async fn run(mut self, shutdown: Shutdown) {
        let graceful = GracefulShutdown::new();
        loop {
            let handover = tokio::select! {
                biased;
                _ = shutdown.clone().wait() => break,
                h = self.rx.recv() => h,
            };
            let Some((std, addr, permit)) = handover else {
                // The accept loop has stopped (shutdown): wait for the signal itself.
                shutdown.clone().wait().await;
                break;
            };
            let tcp = match TcpStream::from_std(std) {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, %addr, "could not take over an HTTP connection");
                    continue;
                }
            };
            let conn = Conn::new(tcp, self.spin, self.open.clone());
            tokio::spawn(self.serve_one(conn, addr, permit, graceful.watcher()));
        }
        graceful.shutdown().await;
    }

    /// One connection, from its TLS handshake to its close.
    fn serve_one(
        &self,
        conn: Conn<TcpStream>,
        addr: SocketAddr,
        permit: OwnedSemaphorePermit,
        watcher: Watcher,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let tls = self.tls.clone();
        // Every request knows its peer's address (the audit trail records it).
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            self.router.clone(),
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(addr));
                req
            },
        ));
        let limit = self.header_read_timeout;
        async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limit)
                .keep_alive(true);
            let served = match tls {
                None => {
                    watcher
                        .watch(http.serve_connection(TokioIo::new(conn), service))
                        .await
                }
                Some(acceptor) => match tokio::time::timeout(limit, acceptor.accept(conn)).await {
                    Ok(Ok(tls)) => {
                        watcher
                            .watch(http.serve_connection(TokioIo::new(tls), service))
                            .await
                    }
                    // Closed without a word (a TCP probe such as keepalived's
                    // watch_mcpd.sh, a port scan): told apart from a handshake that failed.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return handshake_failed(addr, "closed", &e.to_string())
                    }
                    Ok(Err(e)) => return handshake_failed(addr, "failed", &e.to_string()),
                    Err(_) => return handshake_failed(addr, "timeout", "timed out"),
                },
            };
            if let Err(e) = served {
                if e.is_timeout() {
                    metrics::counter!("mcpd_http_connections_closed_total", "reason" => "header_read_timeout")
                        .increment(1);
                }
                tracing::debug!(%addr, error = %e, "HTTP connection ended with an error");
            }
        }
    }
}

fn handshake_failed(addr: SocketAddr, reason: &'static str, why: &str) {
    metrics::counter!("mcpd_tls_handshake_failures_total", "listener" => "http", "reason" => reason)
        .increment(1);
    tracing::debug!(%addr, reason = why, "HTTPS handshake failed");
}

/// One connection: the socket, and when it last wrote (the start of its poll window).
pub struct Conn<T> {
    io: T,
    spin: Duration,
    /// Set by a write, cleared when the next read is ready or the window has passed.
    wrote_at: Option<Instant>,
    /// Whether this connection holds [`POLLING`].
    polling: bool,
    /// The shard's open-connections gauge, counting this one while it lives.
    open: metrics::Gauge,
}

impl<T> Conn<T> {
    fn new(io: T, spin: Duration, open: metrics::Gauge) -> Self {
        open.increment(1.0);
        Conn {
            io,
            spin,
            open,
            wrote_at: None,
            polling: false,
        }
    }

    /// Opens the poll window when a write went out.
    fn note_write(&mut self, written: &Poll<io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) && !self.spin.is_zero() {
            self.wrote_at = Some(Instant::now());
        }
    }

    /// Whether this read, which would block, should keep the worker awake instead.
    fn keep_polling(&mut self) -> bool {
        let Some(at) = self.wrote_at else {
            return false;
        };
        if at.elapsed() >= self.spin {
            self.stop_polling("slept");
            return false;
        }
        if !self.polling {
            if POLLING
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                // Another connection polls; this one waits as usual.
                self.wrote_at = None;
                return false;
            }
            self.polling = true;
        }
        true
    }

    /// Ends this connection's window, counting its outcome if it polled.
    fn stop_polling(&mut self, outcome: &'static str) {
        self.wrote_at = None;
        if self.polling {
            self.polling = false;
            POLLING.store(false, Ordering::Release);
            metrics::counter!("mcpd_http_next_request_polls_total", "outcome" => outcome)
                .increment(1);
        }
    }
}

impl<T> Drop for Conn<T> {
    fn drop(&mut self) {
        self.open.decrement(1.0);
        if self.polling {
            POLLING.store(false, Ordering::Release);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Conn<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(outcome) = &read {
            if this.wrote_at.is_some() {
                let request = outcome.is_ok() && buf.filled().len() > before;
                this.stop_polling(if request { "caught" } else { "closed" });
            }
        } else if this.keep_polling() {
            // Deferred: the task runs again after the worker has polled the I/O driver
            // without blocking (and run whatever else is ready).
            let yielded = std::pin::pin!(tokio::task::yield_now());
            let _ = std::future::Future::poll(yielded, cx);
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Conn<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note_write(&written);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note_write(&written);
        written
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
