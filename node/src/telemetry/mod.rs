//! Distributed tracing: OpenTelemetry spans of MCP calls and registry writes, exported over
//! OTLP/gRPC to a collector (`[tracing]`; off by default).
//!
//! Spans are `tracing` spans of target [`TARGET`]; the `tracing-opentelemetry` layer turns
//! them into OpenTelemetry spans. While tracing is off that target is disabled for every
//! layer, so their callsites are never enabled: a span costs one relaxed load of the
//! callsite's interest, and no context is read or written ([`propagate`]).
//!
//! The span tree of one MCP call (`ARCHITECTURE.md` draws it):
//! `mcp.request` (the HTTP edge; parent: the caller's context) → `mcp.policy` →
//! `mcp.route` → `route.attempt` per replica → either `peer.call` (client) → `peer.serve`
//! (server, on the peer, parent from gRPC metadata), or directly → `pool.queue` →
//! `upstream.call` (client; its context goes to the server in `_meta`).
//! A registry write: `registry.write` → `registry.forward` (client) → `registry.write` on
//! the leader → `raft.propose` → `raft.fsync` and `raft.apply` of its entry.

pub mod config;
pub mod export;
pub mod propagate;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use config::TracingConfig;

/// The `tracing` target of every span that is exported.
pub const TARGET: &str = "mcpd::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are made and exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("tracing.otlp_endpoint: {0}")]
pub struct TracingError(String);

/// The `tracing` layer that makes OpenTelemetry spans of [`TARGET`]'s spans.
pub type SpanLayer<S> =
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>;

/// The exporting pipeline; [`Exporter::shutdown`] sends what is still queued.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts the pipeline `cfg` describes (`None`: tracing is off), and the layer that feeds
    /// it. Must run inside the Tokio runtime that the exporter's connection then uses.
    pub fn start<S>(
        cfg: &TracingConfig,
        node_id: u64,
    ) -> Result<Option<(Exporter, SpanLayer<S>)>, TracingError>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let Some(endpoint) = &cfg.otlp_endpoint else {
            return Ok(None);
        };
        let otlp = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_millis(cfg.export_timeout_ms))
            .build()
            .map_err(|e| TracingError(e.to_string()))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(cfg.max_queued_spans)
            .with_max_export_batch_size(cfg.max_export_batch)
            .with_scheduled_delay(Duration::from_millis(cfg.export_delay_ms))
            .build();
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attributes([
                KeyValue::new("service.instance.id", node_id.to_string()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::new(export::Counted(otlp), batch))
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("mcpd"))
            .with_threads(false)
            .with_location(false);
        ENABLED.store(true, Ordering::Relaxed);
        tracing::info!(endpoint = %endpoint, sample_ratio = cfg.sample_ratio, "exporting traces over OTLP");
        Ok(Some((Exporter { provider }, layer)))
    }

    /// Sends the spans still queued (bounded by the export timeout) and stops.
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "spans still queued at shutdown may be lost");
        }
    }
}

/// A span context to parent spans made elsewhere: in another task, on the Raft log's writer
/// thread, in the state machine. Never compared, never serialized.
#[derive(Clone, Debug)]
pub struct Parent(pub opentelemetry::Context);

impl PartialEq for Parent {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Parent {
    /// Makes `span` a child of this context.
    pub fn adopt(&self, span: &tracing::Span) {
        let _ = span.set_parent(self.0.clone());
    }
}

/// Makes `span` a child of `cx`, the caller's context, when there is one.
pub fn adopt(span: &tracing::Span, cx: Option<opentelemetry::Context>) {
    if let Some(cx) = cx {
        let _ = span.set_parent(cx);
    }
}

/// Marks `span` failed with `error`, for spans declared with `otel.status_code` and
/// `error.type` fields.
pub fn failed(span: &tracing::Span, kind: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", kind);
}
