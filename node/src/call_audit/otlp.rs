//! The call log's events as OpenTelemetry logs, exported over OTLP/gRPC
//! (`call_audit.otlp_endpoint`), beside the JSON lines. The writer thread emits them after
//! writing each line; the SDK's batch processor sends them from its own thread, so neither a
//! call nor the file waits for the collector. A full export queue drops events (the JSON file
//! still has them); the exports and failures are counted with `signal="calls"`.
//!
//! Each record is the event's JSON line as its body, its fields as attributes, event name
//! `mcp.call`, and the call's trace context when the call was traced (`telemetry`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::logs::{AnyValue, LogRecord, Logger, LoggerProvider, Severity};
use opentelemetry::trace::{SpanId, TraceFlags, TraceId};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::logs::{
    BatchConfigBuilder, BatchLogProcessor, SdkLogger, SdkLoggerProvider,
};

use super::CallEvent;
use crate::telemetry::{export::Counted, TracingError};

/// Events waiting for export at most; more are dropped (they are in the file).
const MAX_QUEUED: usize = 8192;
/// One export gives up after this.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The pipeline; [`OtlpCalls::shutdown`] sends what is still queued.
pub struct OtlpCalls {
    provider: SdkLoggerProvider,
    logger: SdkLogger,
}

impl OtlpCalls {
    /// Starts exporting to `endpoint`. Must run inside the Tokio runtime the exporter's
    /// connection then uses.
    pub fn start(
        endpoint: &str,
        source: &crate::telemetry::Source,
    ) -> Result<OtlpCalls, TracingError> {
        let otlp = opentelemetry_otlp::LogExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.to_string())
            .with_timeout(EXPORT_TIMEOUT)
            .build()?;
        let processor = BatchLogProcessor::builder(Counted {
            inner: otlp,
            signal: "calls",
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUED)
                .build(),
        )
        .build();
        let provider = SdkLoggerProvider::builder()
            .with_log_processor(processor)
            .with_resource(source.resource())
            .build();
        let logger = provider.logger("mcpd.call_audit");
        Ok(OtlpCalls { provider, logger })
    }

    /// Hands `event` (and its JSON line) to the exporter without waiting.
    pub fn emit(&self, event: &CallEvent, line: &[u8]) {
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
            .shutdown_with_timeout(EXPORT_TIMEOUT + Duration::from_secs(1))
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
