//! The span pipeline: the `tracing-opentelemetry` layer, a batch span processor, and the
//! OTLP/gRPC exporter, as `[tracing]` describes them.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;

use super::export::{Counted, Queued};
use super::TracingConfig;

/// Why an OTLP exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("the OTLP exporter: {0}")]
pub struct TracingError(#[from] pub opentelemetry_otlp::ExporterBuildError);

/// The `tracing` layer that makes OpenTelemetry spans of [`super::TARGET`]'s spans.
pub type SpanLayer<S> =
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>;

/// What every exported span and log says of its source: `service.name`, the node id as
/// `service.instance.id`, and the build's version.
#[derive(Debug, Clone)]
pub struct Source {
    pub service_name: String,
    pub node_id: u64,
}

impl Source {
    pub fn resource(&self) -> Resource {
        Resource::builder()
            .with_service_name(self.service_name.clone())
            .with_attributes([
                KeyValue::new("service.instance.id", self.node_id.to_string()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build()
    }
}

/// The exporting pipeline; [`Exporter::shutdown`] sends what is still queued.
pub struct Exporter {
    provider: SdkTracerProvider,
    /// The longest shutdown waits for the last export.
    shutdown_within: Duration,
}

impl Exporter {
    /// Starts the pipeline `cfg` describes (`None`: tracing is off), and the layer that feeds
    /// it. Must run inside the Tokio runtime that the exporter's connection then uses.
    pub fn start<S>(
        cfg: &TracingConfig,
        source: &Source,
    ) -> Result<Option<(Exporter, SpanLayer<S>)>, TracingError>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let Some(endpoint) = &cfg.otlp_endpoint else {
            return Ok(None);
        };
        let timeout = Duration::from_millis(cfg.export_timeout_ms);
        let otlp = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(timeout)
            .build()?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(cfg.max_queued_spans)
            .with_max_export_batch_size(cfg.max_export_batch)
            .with_scheduled_delay(Duration::from_millis(cfg.export_delay_ms))
            .build();
        let exporter = Counted {
            inner: otlp,
            signal: "spans",
            in_flight: None,
        };
        let processor = Queued::new(BatchSpanProcessor::new(exporter, batch), "spans");
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(source.resource())
            .build();
        // Only what the spans say: no busy/idle timing and no OpenTelemetry context switch
        // (no span is ever entered, `telemetry::in_span`; the node reads contexts from the
        // spans themselves, `propagate`), no thread, source-location or target attributes.
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("mcpd"))
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false);
        super::set_enabled(true);
        Ok(Some((
            Exporter {
                provider,
                shutdown_within: timeout + Duration::from_secs(1),
            },
            layer,
        )))
    }

    /// Sends the spans still queued (waiting at most the export timeout and a second) and
    /// stops.
    pub fn shutdown(self) {
        super::set_enabled(false);
        if let Err(e) = self.provider.shutdown_with_timeout(self.shutdown_within) {
            tracing::warn!(error = %e, "spans still queued at shutdown may be lost");
        }
    }
}
