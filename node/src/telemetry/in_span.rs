//! A future that runs inside its span, without entering it again when the poll that reaches
//! it is already inside that span.
//!
//! A call's future is polled through every layer of the call path, and each layer's
//! `.instrument(span)` enters and leaves its span on every poll: for an exported span that is
//! a registry look-up per layer and filter, a lock and a clock read. The request's span is
//! both the HTTP handler's and the running call's (which must keep it when it moves to a task
//! of its own, `mcp::call`); nested under the handler, the call's own enter would repeat what
//! is already so. [`InSpan`] remembers, per thread, the span it entered last and skips the
//! repeat.

use std::cell::Cell;
use std::future::Future;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    /// The span an [`InSpan`] on this thread's stack entered last (its id).
    static INSIDE: Cell<Option<NonZeroU64>> = const { Cell::new(None) };
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

/// Puts back the span an outer [`InSpan`] entered, when this poll ends (or unwinds).
struct Restore(Option<NonZeroU64>);

impl Drop for Restore {
    fn drop(&mut self) {
        INSIDE.with(|inside| inside.set(self.0));
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(id) = this.span.id().map(|id| id.into_non_zero_u64()) else {
            return this.inner.poll(cx);
        };
        if INSIDE.with(Cell::get) == Some(id) {
            return this.inner.poll(cx);
        }
        let _entered = this.span.enter();
        let _restore = Restore(INSIDE.with(|inside| inside.replace(Some(id))));
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

    /// Counts each span's enters, by name.
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

    fn current_name() -> Option<&'static str> {
        tracing::Span::current().metadata().map(|m| m.name())
    }

    #[test]
    fn a_span_already_entered_by_the_poll_above_is_not_entered_again() {
        let enters = Enters::default();
        let subscriber = tracing_subscriber::registry().with(enters.clone());
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!("request");
            let call = async { current_name() }.in_span(request.clone());
            let seen = call.in_span(request).now_or_never();
            assert_eq!(
                seen,
                Some(Some("request")),
                "the inner future runs inside the span"
            );
            assert_eq!(
                *enters.0.lock().unwrap(),
                ["request"],
                "entered once, by the outer"
            );
        });
    }

    #[test]
    fn a_span_polled_from_elsewhere_is_entered_and_the_outer_one_comes_back() {
        let enters = Enters::default();
        let subscriber = tracing_subscriber::registry().with(enters.clone());
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!("request");
            let route = tracing::info_span!("route");
            // The request's call finished by a task of its own, under another span: it enters
            // the request's span, and the route's is current again after it.
            let call = async { current_name() }.in_span(request);
            let elsewhere = async move { (call.await, current_name()) }.in_span(route);
            let seen = elsewhere.now_or_never();
            assert_eq!(seen, Some((Some("request"), Some("route"))));
            assert_eq!(*enters.0.lock().unwrap(), ["route", "request"]);
            assert_eq!(
                INSIDE.with(Cell::get),
                None,
                "nothing is left marked once polls end"
            );
        });
    }
}
