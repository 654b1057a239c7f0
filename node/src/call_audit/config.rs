//! `[call_audit]`: where each node writes one JSON line per tool call, resource read and
//! prompt get, and how much it keeps.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallAuditConfig {
    /// Write the call log at all.
    pub enabled: bool,
    /// Its directory (default `<data_dir>/audit`); the current file is `calls.jsonl`.
    pub dir: Option<PathBuf>,
    /// A file past this size is rotated (`calls.jsonl.1`, `.2`...); at least 4096.
    pub max_file_bytes: u64,
    /// Rotated files kept besides the current one (1 to 1000).
    pub max_files: u32,
    /// Events waiting for the writer at most (at least 16). A call never waits for the log: when
    /// the buffer is full the event is dropped and counted in
    /// `mcpd_call_audit_dropped_total`.
    pub buffer: usize,
    /// How often the writer thread takes what is queued, writes it and flushes (1 to 10000
    /// ms). A call hands its event over without waking the thread, so a line reaches the file
    /// up to this long after its call, and a node killed meanwhile loses what was queued.
    pub flush_interval_ms: u64,
    /// Also write each call's arguments (else only their size and SHA-256).
    pub include_arguments: bool,
    /// Also export each event as an OpenTelemetry log over OTLP/gRPC to this collector
    /// (`http://HOST:PORT`); unset: the file only.
    pub otlp_endpoint: Option<String>,
    /// Events waiting for export at most (64 to 1,000,000); more are dropped from the export
    /// (the file has them) and counted in `mcpd_otlp_dropped_total{signal="calls"}`.
    pub otlp_max_queued: usize,
    /// How long one export to the collector may take before it is given up (100 to 300000
    /// ms); the events of a batch given up are counted in `mcpd_otlp_export_failed_total`.
    /// Shutdown waits for the last export this long, and a second.
    pub otlp_export_timeout_ms: u64,
}

impl Default for CallAuditConfig {
    fn default() -> Self {
        CallAuditConfig {
            enabled: true,
            dir: None,
            max_file_bytes: 64 << 20,
            max_files: 8,
            buffer: 16_384,
            flush_interval_ms: 100,
            include_arguments: false,
            otlp_endpoint: None,
            otlp_max_queued: 8192,
            otlp_export_timeout_ms: 10_000,
        }
    }
}

impl CallAuditConfig {
    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_file_bytes < 4096 {
            return Err(("call_audit.max_file_bytes", "must be at least 4096".into()));
        }
        if !(1..=1000).contains(&self.max_files) {
            return Err(("call_audit.max_files", "must be 1 to 1000".into()));
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            crate::telemetry::config::check_endpoint("call_audit.otlp_endpoint", endpoint)?;
        }
        if !(64..=1_000_000).contains(&self.otlp_max_queued) {
            return Err((
                "call_audit.otlp_max_queued",
                "must be from 64 to 1000000".into(),
            ));
        }
        if !(100..=300_000).contains(&self.otlp_export_timeout_ms) {
            return Err((
                "call_audit.otlp_export_timeout_ms",
                "must be from 100 to 300000".into(),
            ));
        }
        if self.buffer < 16 {
            return Err(("call_audit.buffer", "must be at least 16".into()));
        }
        if !(1..=10_000).contains(&self.flush_interval_ms) {
            return Err((
                "call_audit.flush_interval_ms",
                "must be from 1 to 10000".into(),
            ));
        }
        Ok(())
    }
}
