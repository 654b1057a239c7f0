//! The call log's events as OpenTelemetry logs, exported over OTLP/gRPC
//! (`call_audit.otlp_endpoint`), beside the JSON lines. The writer thread emits them after
//! writing each line; the SDK's batch processor sends them from its own thread, so neither a
//! call nor the file waits for the collector. A full export queue (`otlp_max_queued` events
//! neither exported nor failed yet) drops events (the JSON file still has them); the drops,
//! exports and failures are counted with `signal="calls"`.
//!
//! Each record is the event's JSON line as its body, its fields as attributes, event name
//! `mcp.call`, and the call's trace context when the call was traced (`telemetry`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::logs::{AnyValue, LogRecord, Logger, LoggerProvider, Severity};
use opentelemetry::trace::{SpanId, TraceFlags, TraceId};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::logs::{
    BatchConfigBuilder, BatchLogProcessor, SdkLogger, SdkLoggerProvider,
};

use super::CallEvent;
use crate::telemetry::{export::Counted, TracingError};

/// The pipeline; [`OtlpCalls::shutdown`] sends what is still queued.
pub struct OtlpCalls {
    provider: SdkLoggerProvider,
    logger: SdkLogger,
    /// Events handed to the exporter and not exported or failed yet (the exporter takes its
    /// batches off), and the most there may be.
    in_flight: Arc<AtomicUsize>,
    max_queued: usize,
    /// One export gives up after this (`call_audit.otlp_export_timeout_ms`).
    export_timeout: Duration,
}

impl OtlpCalls {
    /// Starts exporting to `endpoint`. Must run inside the Tokio runtime the exporter's
    /// connection then uses.
    pub fn start(
        endpoint: &str,
        config: &super::config::CallAuditConfig,
        source: &crate::telemetry::Source,
    ) -> Result<OtlpCalls, TracingError> {
        let max_queued = config.otlp_max_queued;
        let export_timeout = Duration::from_millis(config.otlp_export_timeout_ms);
        let otlp = opentelemetry_otlp::LogExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.to_string())
            .with_timeout(export_timeout)
            .build()?;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let processor = BatchLogProcessor::builder(Counted {
            inner: otlp,
            signal: "calls",
            in_flight: Some(in_flight.clone()),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                // Never the processor's own silent drop: ours, counted, comes first.
                .with_max_queue_size(max_queued + 1)
                .build(),
        )
        .build();
        let provider = SdkLoggerProvider::builder()
            .with_log_processor(processor)
            .with_resource(source.resource())
            .build();
        let logger = provider.logger("mcpd.call_audit");
        Ok(OtlpCalls {
            provider,
            logger,
            in_flight,
            max_queued,
            export_timeout,
        })
    }

    /// Hands `event` (and its JSON line) to the exporter without waiting.
    pub fn emit(&self, event: &CallEvent, line: &[u8]) {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max_queued {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("mcpd_otlp_dropped_total", "signal" => "calls").increment(1);
            return;
        }
        let mut record = self.logger.create_log_record();
        record.set_event_name("mcp.call");
        record.set_timestamp(UNIX_EPOCH + Duration::from_millis(event.at_ms));
        record.set_observed_timestamp(SystemTime::now());
        let (severity, text) = match event.outcome {
            "ok" => (Severity::Info, "INFO"),
            "denied" => (Severity::Warn, "WARN"),
            _ => (Severity::Error, "ERROR"),
        };
        record.set_severity_number(severity);
        record.set_severity_text(text);
        record.set_body(AnyValue::from(String::from_utf8_lossy(line).into_owned()));
        record.add_attribute("mcp.node", event.node as i64);
        if let Some(t) = &event.tenant {
            record.add_attribute("mcp.tenant", t.clone());
        }
        record.add_attribute("mcp.subject", event.subject.clone());
        record.add_attribute("mcp.role", event.role);
        record.add_attribute("mcp.server", event.server.clone());
        record.add_attribute("mcp.method.name", event.method.clone());
        record.add_attribute("mcp.name", event.name.clone());
        record.add_attribute("mcp.outcome", event.outcome);
        if let Some(code) = event.error_code {
            record.add_attribute("rpc.response.status_code", code);
        }
        record.add_attribute("mcp.duration_ms", event.duration_ms);
        record.add_attribute("mcp.args_bytes", event.args_bytes as i64);
        if let Some(h) = &event.args_sha256 {
            record.add_attribute("mcp.args_sha256", h.clone());
        }
        if let Some(p) = &event.policy {
            record.add_attribute("mcp.policy", p.clone());
        }
        if let Some((trace, span)) = event.trace.as_ref().and_then(|t| ids(t)) {
            record.set_trace_context(trace, span, Some(TraceFlags::SAMPLED));
        }
        metrics::counter!("mcpd_otlp_queued_total", "signal" => "calls").increment(1);
        self.logger.emit(record);
    }

    /// Sends what is queued (waiting at most the export timeout and a second) and stops.
    pub fn shutdown(self) {
        if let Err(e) = self
            .provider
            .shutdown_with_timeout(self.export_timeout + Duration::from_secs(1))
        {
            tracing::warn!(error = %e, "call events still queued for OTLP at shutdown may be lost");
        }
    }
}

/// The trace and span ids of a `traceparent`.
fn ids(traceparent: &str) -> Option<(TraceId, SpanId)> {
    let mut parts = traceparent.split('-');
    let (_, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    Some((TraceId::from_hex(trace).ok()?, SpanId::from_hex(span).ok()?))
}
