//! `[tracing]`: OpenTelemetry traces, exported over OTLP/gRPC to a collector. Off unless an
//! endpoint is set.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The collector's OTLP/gRPC endpoint, `http://HOST:PORT` (a collector agent on this host,
    /// which forwards over TLS); unset: no spans are made at all.
    pub otlp_endpoint: Option<String>,
    /// Share of requests traced when the caller sent no trace context (0 to 1). A caller's
    /// own decision (the sampled flag of its `traceparent`) is followed.
    pub sample_ratio: f64,
    /// `service.name` of the spans; `service.instance.id` is the node id.
    pub service_name: String,
    /// One export to the collector gives up after this (ms, 100 to 60000).
    pub export_timeout_ms: u64,
    /// Spans waiting for export at most (64 to 1,000,000); more are dropped, never waited
    /// for (`mcpd_otlp_queued_total` minus exported minus failed).
    pub max_queued_spans: usize,
    /// Spans sent in one export at most (1 to `max_queued_spans`).
    pub max_export_batch: usize,
    /// How long a span waits for its batch to fill before it is sent anyway (ms, 10 to 60000).
    pub export_delay_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "mcpd".to_string(),
            export_timeout_ms: 10_000,
            max_queued_spans: 2048,
            max_export_batch: 512,
            export_delay_ms: 1000,
        }
    }
}

impl TracingConfig {
    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(endpoint) = &self.otlp_endpoint {
            check_endpoint("tracing.otlp_endpoint", endpoint)?;
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(("tracing.sample_ratio", "must be 0 to 1".into()));
        }
        if self.service_name.trim().is_empty() {
            return Err(("tracing.service_name", "must not be empty".into()));
        }
        if !(100..=60_000).contains(&self.export_timeout_ms) {
            return Err(("tracing.export_timeout_ms", "must be 100 to 60000".into()));
        }
        if !(64..=1_000_000).contains(&self.max_queued_spans) {
            return Err(("tracing.max_queued_spans", "must be 64 to 1000000".into()));
        }
        if self.max_export_batch == 0 || self.max_export_batch > self.max_queued_spans {
            return Err((
                "tracing.max_export_batch",
                "must be 1 to max_queued_spans".into(),
            ));
        }
        if !(10..=60_000).contains(&self.export_delay_ms) {
            return Err(("tracing.export_delay_ms", "must be 10 to 60000".into()));
        }
        Ok(())
    }
}

/// Checks an OTLP/gRPC collector address: `http://HOST:PORT`. The error names `field`.
pub fn check_endpoint(field: &'static str, endpoint: &str) -> Result<(), (&'static str, String)> {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return Err((
            field,
            format!("{endpoint:?}: must be http://HOST:PORT (send to a collector agent on this host; it forwards over TLS)"),
        ));
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains(['/', '?', '#', '@'])
        || authority
            .rsplit_once(':')
            .is_none_or(|(host, p)| host.is_empty() || p.parse::<u16>().is_err())
    {
        return Err((field, format!("{endpoint:?}: must be http://HOST:PORT")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut TracingConfig)) -> Result<(), (&'static str, String)> {
        let mut c = TracingConfig::default();
        f(&mut c);
        c.validate()
    }

    #[test]
    fn off_by_default_and_valid() {
        assert!(TracingConfig::default().otlp_endpoint.is_none());
        assert!(with(|_| {}).is_ok());
        assert!(with(|c| c.otlp_endpoint = Some("http://127.0.0.1:4317".into())).is_ok());
    }

    #[test]
    fn bad_values_name_their_field() {
        for (field, bad) in [
            (
                "tracing.otlp_endpoint",
                with(|c| c.otlp_endpoint = Some("https://collector:4317".into())),
            ),
            (
                "tracing.otlp_endpoint",
                with(|c| c.otlp_endpoint = Some("http://collector".into())),
            ),
            (
                "tracing.otlp_endpoint",
                with(|c| c.otlp_endpoint = Some("http://collector:4317/v1".into())),
            ),
            ("tracing.sample_ratio", with(|c| c.sample_ratio = 1.5)),
            (
                "tracing.service_name",
                with(|c| c.service_name = " ".into()),
            ),
            (
                "tracing.export_timeout_ms",
                with(|c| c.export_timeout_ms = 5),
            ),
            ("tracing.max_queued_spans", with(|c| c.max_queued_spans = 1)),
            (
                "tracing.max_export_batch",
                with(|c| c.max_export_batch = 4096),
            ),
            ("tracing.export_delay_ms", with(|c| c.export_delay_ms = 0)),
        ] {
            assert_eq!(bad.unwrap_err().0, field);
        }
    }
}
