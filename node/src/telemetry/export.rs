//! The OTLP pipelines, counted per signal (`spans`, the traces; `calls`, the call log's events
//! as OpenTelemetry logs):
//!
//! - `mcpd_otlp_queued_total{signal}`: handed to the batch processor;
//! - `mcpd_otlp_exported_total{signal}`: taken by the collector;
//! - `mcpd_otlp_export_failed_total{signal}`: in exports the collector did not take.
//!
//! What was queued and neither exported nor failed was dropped by a full queue (or is still
//! on its way). The call log bounds its own queue with `Counted::in_flight` and counts its
//! drops (`mcpd_otlp_dropped_total{signal="calls"}`, `call_audit::otlp`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{LogBatch, LogExporter};
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;

/// Wraps the exporter that sends one signal to the collector.
#[derive(Debug)]
pub struct Counted<E> {
    pub inner: E,
    pub signal: &'static str,
    /// Items handed to the exporter and not exported or failed yet, when the caller bounds
    /// them itself (`call_audit::otlp`): each export takes its batch off.
    pub in_flight: Option<Arc<AtomicUsize>>,
}

impl<E> Counted<E> {
    fn count(&self, n: usize, result: &OTelSdkResult) {
        if let Some(in_flight) = &self.in_flight {
            in_flight.fetch_sub(n, Ordering::Relaxed);
        }
        match result {
            Ok(()) => metrics::counter!("mcpd_otlp_exported_total", "signal" => self.signal)
                .increment(n as u64),
            Err(e) => {
                metrics::counter!("mcpd_otlp_export_failed_total", "signal" => self.signal)
                    .increment(n as u64);
                tracing::warn!(signal = self.signal, items = n, error = %e, "could not export to the OTLP collector");
            }
        }
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.count(n, &result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

impl<E: LogExporter> LogExporter for Counted<E> {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        let n = batch.iter().count();
        let result = self.inner.export(batch).await;
        self.count(n, &result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// Wraps a span processor, counting the spans handed to it.
#[derive(Debug)]
pub struct Queued<P> {
    inner: P,
    signal: &'static str,
    /// `mcpd_otlp_queued_total{signal}`, looked up at the first span rather than on every one
    /// (the recorder is installed after the pipeline starts).
    queued: OnceLock<metrics::Counter>,
}

impl<P> Queued<P> {
    pub fn new(inner: P, signal: &'static str) -> Queued<P> {
        Queued {
            inner,
            signal,
            queued: OnceLock::new(),
        }
    }
}

impl<P: SpanProcessor> SpanProcessor for Queued<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx)
    }

    fn on_end(&self, span: SpanData) {
        self.queued
            .get_or_init(|| metrics::counter!("mcpd_otlp_queued_total", "signal" => self.signal))
            .increment(1);
        self.inner.on_end(span)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}
