//! The node's current span: a future runs inside its span without entering it.
//!
//! A call's future is polled through every layer of the call path. A span entered with
//! `.instrument(span)` is entered and left on every poll, and for an exported span that is a
//! registry look-up per layer and filter, a lock and a clock read each time. The node's spans
//! are never entered: [`InSpan`] lends its span to a thread-local slot for the length of each
//! poll (a move: no reference count, no look-up), the spans made under it name it as their
//! parent ([`parent`]), and work that goes on elsewhere takes a handle to it ([`current`]).
//! A span that is current already (a request's call, polled under its handler) is not lent
//! again.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    /// The span an [`InSpan`] on this thread's stack lent last.
    static CURRENT: RefCell<Option<tracing::Span>> = const { RefCell::new(None) };
}

pin_project_lite::pin_project! {
    /// `inner`, polled inside `span` (see the module docs).
    pub struct InSpan<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
    }
}

/// Runs a future inside a span (`InSpan`).
pub trait InSpanExt: Future + Sized {
    #[must_use = "a future does nothing unless polled"]
    fn in_span(self, span: tracing::Span) -> InSpan<Self> {
        InSpan { inner: self, span }
    }
}

impl<F: Future> InSpanExt for F {}

/// The parent of a span made now, for `tracing::info_span!(parent: ..)`: the current span,
/// else none (a root). Read only while the span's callsite is enabled (tracing is on).
pub fn parent() -> Option<tracing::Id> {
    CURRENT.with(|c| c.borrow().as_ref().and_then(tracing::Span::id))
}

/// A handle to the current span while tracing is on, for work that goes on in another task;
/// while it is off, none (and no look-up).
pub fn current() -> tracing::Span {
    with_current(tracing::Span::clone).unwrap_or_else(tracing::Span::none)
}

/// `f` of the current span, borrowed where it is (no handle is made), while tracing is on
/// and a span is current. `f` must not poll a future.
pub fn with_current<R>(f: impl FnOnce(&tracing::Span) -> R) -> Option<R> {
    if !super::enabled() {
        return None;
    }
    CURRENT.with(|c| c.borrow().as_ref().map(f))
}

/// A span lent for one poll: gives it back to its [`InSpan`], and the slot back to the span
/// lent before, when the poll ends (or unwinds).
struct Lent<'a> {
    home: &'a mut tracing::Span,
    outer: Option<tracing::Span>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let outer = self.outer.take();
        if let Some(span) = CURRENT.with(|c| c.replace(outer)) {
            *self.home = span;
        }
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(id) = this.span.id() else {
            return this.inner.poll(cx);
        };
        if parent() == Some(id) {
            return this.inner.poll(cx);
        }
        let span = std::mem::replace(this.span, tracing::Span::none());
        let outer = CURRENT.with(|c| c.replace(Some(span)));
        let _lent = Lent {
            home: this.span,
            outer,
        };
        this.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
    use tracing_subscriber::Layer;

    /// Records each span entered, by name.
    #[derive(Clone, Default)]
    struct Enters(Arc<Mutex<Vec<&'static str>>>);

    impl<S> Layer<S> for Enters
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        fn on_enter(&self, id: &tracing::span::Id, ctx: LayerContext<'_, S>) {
            if let Some(span) = ctx.span(id) {
                self.0.lock().unwrap().push(span.name());
            }
        }
    }

    #[test]
    fn a_span_is_current_while_its_future_is_polled_and_never_entered() {
        let enters = Enters::default();
        let subscriber = tracing_subscriber::registry().with(enters.clone());
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!("request");
            let id = Some(request.id().expect("the span is enabled"));
            // Pending once, then done: the span is lent for each poll and comes back after.
            let mut polls = 0;
            let seen = futures_util::future::poll_fn(move |cx| {
                polls += 1;
                if polls == 1 {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(parent())
            });
            let mut call = Box::pin(seen.in_span(request));
            let waker = futures_util::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            assert!(call.as_mut().poll(&mut cx).is_pending());
            assert_eq!(parent(), None, "nothing is current between polls");
            assert_eq!(call.as_mut().poll(&mut cx), Poll::Ready(id));
            assert!(enters.0.lock().unwrap().is_empty(), "no span was entered");
        });
    }

    #[test]
    fn a_span_polled_from_elsewhere_is_current_and_the_outer_one_comes_back() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!("request");
            let route = tracing::info_span!("route");
            let (request_id, route_id) = (
                Some(request.id().expect("the span is enabled")),
                Some(route.id().expect("the span is enabled")),
            );
            // The request's call finished by a task of its own, under another span: the
            // request's span is current inside it, and the route's again after it.
            let call = async { parent() }.in_span(request);
            let elsewhere = async move { (call.await, parent()) }.in_span(route);
            let seen = elsewhere.now_or_never();
            assert_eq!(seen, Some((request_id, route_id)));
            assert_eq!(parent(), None, "nothing is left current once polls end");
        });
    }
}
