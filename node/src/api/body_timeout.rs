//! A bound on reading a request's body: the whole body must arrive within
//! `api.body_read_timeout_ms` of its headers, so a client that sends its headers and then
//! trickles (or never sends) the body cannot hold a connection and a handler forever. Past the
//! bound the body ends with an error: the handler answers 400 (a truncated body) and hyper
//! closes the connection. Counted in `mcpd_http_body_timeouts_total`.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// The timeout of a body, as middleware state.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?} (api.body_read_timeout_ms)")]
pub struct BodyTooSlow(Duration);

/// A body that fails once its deadline passes.
struct Timed {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    /// The deadline passed: the body has ended with its error.
    expired: bool,
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
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired = true;
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

/// The middleware: every request's body gets the deadline.
pub async fn limit(
    State(BodyTimeout(limit)): State<BodyTimeout>,
    req: Request,
    next: Next,
) -> Response {
    let req = req.map(|inner| {
        if inner.is_end_stream() {
            return inner;
        }
        Body::new(Timed {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
            expired: false,
        })
    });
    next.run(req).await
}
