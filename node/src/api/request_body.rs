//! A request's body at the edge, two rules:
//!
//! - **A bound on reading it:** the whole body must arrive within `api.body_read_timeout_ms` of
//!   its headers, so a client that sends its headers and then trickles (or never sends) the body
//!   cannot hold a connection and a handler forever. Past the bound the body ends with an error:
//!   the handler answers 400 (a truncated body) and hyper closes the connection. Counted in
//!   `mcpd_http_body_timeouts_total`.
//! - **An answer given before it was read says `Connection: close`:** a refusal (a `401` to a
//!   caller without a token, a `404`, a `415`) answers without reading the body. hyper then
//!   drains what has already arrived and, when the rest has not, closes the connection after the
//!   response, which said nothing of it: a client that sends its next request on that
//!   connection (the SDK's OAuth client fetching the resource metadata right after the `401`)
//!   loses it to a reset. So such an answer carries `Connection: close` and the client opens a
//!   new connection. Counted in `mcpd_http_connections_closed_total{reason="unread_body"}`.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Version};
use axum::middleware::Next;
use axum::response::Response;

/// The timeout of a body, as middleware state.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?} (api.body_read_timeout_ms)")]
pub struct BodyTooSlow(Duration);

/// A body that fails once its deadline passes, and tells whether it was read to its end.
struct Timed {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    /// The deadline passed: the body has ended with its error.
    expired: bool,
    /// The handler read the body to its end (or to its error, after which hyper closes anyway).
    read: Arc<AtomicBool>,
}

impl HttpBody for Timed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if self.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            if !matches!(frame, Some(Ok(_))) || self.inner.is_end_stream() {
                self.read.store(true, Ordering::Relaxed);
            }
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired = true;
            self.read.store(true, Ordering::Relaxed);
            metrics::counter!("mcpd_http_body_timeouts_total").increment(1);
            let limit = self.limit;
            return Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow(limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The middleware: every request's body gets the deadline, and an answer given before the body
/// was read closes the connection.
pub async fn limit(
    State(BodyTimeout(limit)): State<BodyTimeout>,
    req: Request,
    next: Next,
) -> Response {
    let read = Arc::new(AtomicBool::new(false));
    let mut has_body = false;
    let http1 = req.version() <= Version::HTTP_11;
    let req = req.map(|inner| {
        if inner.is_end_stream() {
            return inner;
        }
        has_body = true;
        Body::new(Timed {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
            expired: false,
            read: read.clone(),
        })
    });
    let mut resp = next.run(req).await;
    if http1 && has_body && !read.load(Ordering::Relaxed) {
        metrics::counter!("mcpd_http_connections_closed_total", "reason" => "unread_body")
            .increment(1);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
