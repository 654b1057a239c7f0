//! The call log: one structured event per tool call, resource read and prompt get on this
//! node (who, which server and tool, the arguments' size and hash, the outcome, how long, the
//! policy rule that decided), as JSON lines in `<data_dir>/audit/calls.jsonl`, rotated by size.
//!
//! A call hands its event to a bounded queue and goes on ([`CallAudit::record`]); one writer
//! thread drains it every `flush_interval_ms`, so a call wakes no thread and the file gets one
//! write per interval, not one per call. A full queue drops the event and counts it
//! (`mcpd_call_audit_dropped_total`), so a slow disk slows no call and loses nothing silently.
//! With `otlp_endpoint` set, the writer also hands each event to an OpenTelemetry log
//! exporter ([`otlp`]).

pub mod config;
pub mod otlp;
pub mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use config::CallAuditConfig;
use otlp::OtlpCalls;
use writer::Writer;

/// One call, as the log keeps it.
#[derive(Debug, Serialize)]
pub struct CallEvent {
    /// Unix milliseconds when the call ended.
    pub at_ms: u64,
    pub node: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The caller's qualified id (an API token's id, or `jwt:ISSUER:SUB`).
    pub subject: String,
    pub role: &'static str,
    pub server: String,
    /// `tools/call`, `resources/read`, `prompts/get`.
    pub method: String,
    /// The tool or prompt, or the resource's URI.
    pub name: String,
    /// The size of that serialization.
    pub args_bytes: usize,
    /// Hex SHA-256 of the arguments as this node serializes them (object keys sorted), so
    /// equal arguments hash alike whatever order the client sent; absent without arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// `ok`, `error` (a JSON-RPC error, `error_code` says which), `tool_error` (a result
    /// with `isError`), or `denied` (by `policy`).
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i64>,
    pub duration_ms: f64,
    /// The downstream session, when the server runs one process per session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The policy rule that allowed or denied the call (absent: no rule matched).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The `traceparent` of the call's span on this node, when the call was traced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// The arguments' size, hash, and (when the config asks) the arguments themselves.
pub fn describe_args(
    args: Option<&Value>,
    include: bool,
) -> (usize, Option<String>, Option<Value>) {
    let Some(args) = args else {
        return (0, None, None);
    };
    let bytes = serde_json::to_vec(args).unwrap_or_default();
    let hash = hex::encode(Sha256::digest(&bytes));
    (bytes.len(), Some(hash), include.then(|| args.clone()))
}

/// Why the call log could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("call_audit.otlp_endpoint: {0}")]
    Otlp(#[from] crate::telemetry::TracingError),
}

/// The node's handle on its call log (cheap to clone).
#[derive(Clone)]
pub struct CallAudit {
    tx: Option<SyncSender<CallEvent>>,
    include_arguments: bool,
    /// The writer thread, joined by [`CallAudit::close`].
    writer: Arc<Writing>,
}

/// The writer thread and the flag that ends it.
#[derive(Default)]
struct Writing {
    closing: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl CallAudit {
    /// Starts the writer thread on `<data_dir>/audit` (or the configured directory); a log
    /// that cannot be opened is an error at start, not a silent gap.
    pub fn start(
        config: &CallAuditConfig,
        data_dir: &Path,
        source: &crate::telemetry::Source,
    ) -> Result<CallAudit, StartError> {
        if !config.enabled {
            if config.otlp_endpoint.is_some() {
                tracing::warn!("call_audit.otlp_endpoint is set but call_audit.enabled is false: no call events are exported");
            }
            return Ok(CallAudit::off());
        }
        let dir = config.dir.clone().unwrap_or_else(|| data_dir.join("audit"));
        let writer = Writer::open(&dir, config)?;
        let otlp = match &config.otlp_endpoint {
            Some(endpoint) => {
                tracing::info!(endpoint = %endpoint, "call log: exporting each event as an OpenTelemetry log");
                Some(OtlpCalls::start(endpoint, config, source)?)
            }
            None => None,
        };
        let (tx, rx) = sync_channel(config.buffer);
        let writing = Arc::new(Writing::default());
        let shared = writing.clone();
        let every = Duration::from_millis(config.flush_interval_ms);
        let thread = std::thread::Builder::new()
            .name("call-audit".into())
            .spawn(move || drain(rx, writer, otlp, &shared.closing, every))?;
        *writing.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        tracing::info!(dir = %dir.display(), "call log: one line per tool call, resource read and prompt get");
        Ok(CallAudit {
            tx: Some(tx),
            include_arguments: config.include_arguments,
            writer: writing,
        })
    }

    /// A log that records nothing (`call_audit.enabled = false`).
    pub fn off() -> CallAudit {
        CallAudit {
            tx: None,
            include_arguments: false,
            writer: Arc::default(),
        }
    }

    pub fn include_arguments(&self) -> bool {
        self.include_arguments
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands `event` to the writer without waiting.
    pub fn record(&self, event: CallEvent) {
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("mcpd_call_audit_dropped_total", "reason" => "full").increment(1)
            }
            Err(TrySendError::Disconnected(_)) => {
                metrics::counter!("mcpd_call_audit_dropped_total", "reason" => "writer_gone")
                    .increment(1)
            }
        }
    }
}

impl CallAudit {
    /// At shutdown: writes what is queued, sends the last events to the OTLP collector (while
    /// the runtime its connection runs on is still there), and ends the writer thread. Blocks;
    /// events recorded after it are dropped.
    pub fn close(&self) {
        self.writer.closing.store(true, Ordering::Relaxed);
        let thread = self
            .writer
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// Every `every`, writes what is queued and flushes it, until every sender is gone or the log
/// is closed (then what was queued before is written too); hands each event to the OTLP
/// exporter as well, when there is one. It sleeps in between rather than waiting on the queue,
/// so that handing over an event never wakes it.
fn drain(
    rx: Receiver<CallEvent>,
    mut writer: Writer,
    otlp: Option<OtlpCalls>,
    closing: &AtomicBool,
    every: Duration,
) {
    loop {
        let last = closing.load(Ordering::Relaxed);
        let mut wrote = false;
        let gone = loop {
            match rx.try_recv() {
                Ok(event) => {
                    write(&mut writer, otlp.as_ref(), &event);
                    wrote = true;
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if wrote {
            if let Err(e) = writer.flush() {
                tracing::error!(error = %e, "call log: flush failed");
            }
        }
        if gone || last {
            break;
        }
        std::thread::park_timeout(every);
    }
    let _ = writer.flush();
    if let Some(otlp) = otlp {
        otlp.shutdown();
    }
}

/// One event to the file, and to the exporter.
fn write(writer: &mut Writer, otlp: Option<&OtlpCalls>, event: &CallEvent) {
    match serde_json::to_vec(event) {
        Ok(line) => {
            match writer.append(&line) {
                Ok(()) => metrics::counter!("mcpd_call_audit_events_total").increment(1),
                Err(e) => {
                    metrics::counter!("mcpd_call_audit_dropped_total", "reason" => "io")
                        .increment(1);
                    tracing::error!(error = %e, "call log: an event could not be written");
                }
            }
            if let Some(otlp) = otlp {
                otlp.emit(event, &line);
            }
        }
        Err(_) => {
            metrics::counter!("mcpd_call_audit_dropped_total", "reason" => "encode").increment(1)
        }
    }
}
