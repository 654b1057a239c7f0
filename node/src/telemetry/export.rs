//! The OTLP exporter, counted: every batch the collector took or refused shows in the node's
//! metrics (`mcpd_trace_spans_exported_total`, `mcpd_trace_export_failures_total`).

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

/// Wraps the exporter that sends to the collector.
#[derive(Debug)]
pub struct Counted<E>(pub E);

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.0.export(batch).await;
        match &result {
            Ok(()) => metrics::counter!("mcpd_trace_spans_exported_total").increment(n),
            Err(e) => {
                metrics::counter!("mcpd_trace_export_failures_total").increment(1);
                tracing::warn!(spans = n, error = %e, "could not export spans to the collector");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource)
    }
}
