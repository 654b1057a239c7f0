//! Usage accounting: per tenant, subject, server and tool, the calls, errors, time and bytes of
//! every tool call, resource read and prompt get, for billing and cost attribution.
//!
//! - Each node adds its calls up in memory, per UTC hour, and proposes what it added every
//!   `usage.flush_interval_s` (`Command::AddUsage`): hourly aggregates live in the replicated
//!   state, survive restarts, and are dropped after `usage.retention_hours`. What a node had
//!   not flushed when it was killed is lost (at most one interval). A flush that fails is
//!   sent again as it was, with the same request id, before anything newer: a flush that was
//!   applied though its answer was lost (a timeout) is then not counted twice.
//! - `GET /v1/usage` (and `mcpctl usage`) sums the hours asked for.
//! - A name the server does not list (callers make names up) is counted as tool `other`, in
//!   the rows and the labels; when the node does not know the server's list yet, only its first
//!   `usage.max_tools_per_server` names are kept. Rows stay bounded by what servers offer.
//! - Prometheus counters (`mcpd_usage_*`) carry tenant, server and tool; the tools of a server
//!   are its first `usage.max_tools_per_server` seen, the rest `other`, so that the label set
//!   stays bounded. Subjects are not labels (there may be any number); the API has them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mcpcp_proto::api::UsageRow;
use serde::Deserialize;

use crate::registry::new_request_id;
use crate::registry::state::{Command, Request};
use crate::registry::{Registry, RegistryError};
use crate::shutdown::Shutdown;

/// `[usage]`: how calls are accounted for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// How often a node sends what it counted to the replicated state, seconds (1 to 3600).
    pub flush_interval_s: u64,
    /// Hours of aggregates the state keeps (1 to 8784).
    pub retention_hours: u64,
    /// Tools per server named in the Prometheus labels; further ones count as `other`.
    pub max_tools_per_server: usize,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            flush_interval_s: 15,
            retention_hours: 24 * 31,
            max_tools_per_server: 20,
        }
    }
}

impl UsageConfig {
    /// Checks the section; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=3600).contains(&self.flush_interval_s) {
            return Err(("usage.flush_interval_s", "must be 1 to 3600".into()));
        }
        if !(1..=8784).contains(&self.retention_hours) {
            return Err(("usage.retention_hours", "must be 1 to 8784".into()));
        }
        if !(1..=1000).contains(&self.max_tools_per_server) {
            return Err(("usage.max_tools_per_server", "must be 1 to 1000".into()));
        }
        Ok(())
    }
}

/// Rows a node keeps unflushed at most; further calls of new keys are counted in
/// `mcpd_usage_unrecorded_total` only.
const MAX_PENDING_ROWS: usize = 50_000;

/// One call, as accounted.
#[derive(Debug, Clone)]
pub struct CallUsage<'a> {
    pub tenant: Option<&'a str>,
    pub subject: &'a str,
    pub server: &'a str,
    /// The tool or prompt; `resources/read` for a resource (URIs are unbounded).
    pub tool: &'a str,
    /// Whether the server lists `tool`, when the node knows: a name it does not list is
    /// counted as `other` (callers make names up; each would be a row and a label).
    pub listed: Option<bool>,
    pub error: bool,
    pub duration_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Unix seconds when it ended.
    pub at: u64,
}

/// This node's counts not yet flushed, and the tool labels in use. Cheap to clone.
#[derive(Clone)]
pub struct Usage {
    cfg: UsageConfig,
    pending: Arc<Mutex<BTreeMap<Key, UsageRow>>>,
    /// A flush whose outcome is not known: sent again as it is.
    unsent: Arc<tokio::sync::Mutex<Option<Request>>>,
    labelled: Arc<Mutex<HashMap<String, HashSet<String>>>>,
}

/// The tool of calls counted together: a name the server does not list, or one beyond
/// `max_tools_per_server`.
const OTHER: &str = "other";

/// (hour, tenant, subject, server, tool).
type Key = (u64, String, String, String, String);

impl Usage {
    pub fn new(cfg: UsageConfig) -> Usage {
        Usage {
            cfg,
            pending: Arc::default(),
            unsent: Arc::default(),
            labelled: Arc::default(),
        }
    }

    /// Counts one call.
    pub fn record(&self, call: &CallUsage<'_>) {
        let tenant = call.tenant.unwrap_or_default();
        // The row's tool: a listed one by its name; one the server does not list as `other`;
        // when the node does not know, its name while the server's names are few.
        let (row_tool, tool) = match call.listed {
            Some(false) => (OTHER, OTHER.to_string()),
            Some(true) => (call.tool, self.label_of(call.server, call.tool)),
            None => {
                let label = self.label_of(call.server, call.tool);
                (if label == OTHER { OTHER } else { call.tool }, label)
            }
        };
        let labels = [
            ("tenant", tenant.to_string()),
            ("server", call.server.to_string()),
            ("tool", tool),
        ];
        metrics::counter!("mcpd_usage_calls_total", &labels).increment(1);
        if call.error {
            metrics::counter!("mcpd_usage_errors_total", &labels).increment(1);
        }
        metrics::counter!("mcpd_usage_duration_milliseconds_total", &labels)
            .increment(call.duration_ms.max(0.0).round() as u64);
        metrics::counter!(
            "mcpd_usage_bytes_total",
            &[
                labels[0].clone(),
                labels[1].clone(),
                ("direction", "in".to_string())
            ]
        )
        .increment(call.bytes_in);
        metrics::counter!(
            "mcpd_usage_bytes_total",
            &[
                labels[0].clone(),
                labels[1].clone(),
                ("direction", "out".to_string())
            ]
        )
        .increment(call.bytes_out);
        let key: Key = (
            call.at / 3600 * 3600,
            tenant.to_string(),
            call.subject.to_string(),
            call.server.to_string(),
            row_tool.chars().take(128).collect(),
        );
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.contains_key(&key) && pending.len() >= MAX_PENDING_ROWS {
            metrics::counter!("mcpd_usage_unrecorded_total").increment(1);
            return;
        }
        let row = pending.entry(key).or_insert_with_key(|k| UsageRow {
            hour: k.0,
            tenant: k.1.clone(),
            subject: k.2.clone(),
            server: k.3.clone(),
            tool: k.4.clone(),
            ..UsageRow::default()
        });
        row.calls += 1;
        row.errors += u64::from(call.error);
        row.duration_ms += call.duration_ms.max(0.0).round() as u64;
        row.bytes_in += call.bytes_in;
        row.bytes_out += call.bytes_out;
    }

    /// The tool's Prometheus label: itself while the server has fewer than the bound, else
    /// `other`.
    fn label_of(&self, server: &str, tool: &str) -> String {
        let mut labelled = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        let tools = labelled.entry(server.to_string()).or_default();
        if tools.contains(tool) {
            return tool.to_string();
        }
        if tools.len() < self.cfg.max_tools_per_server {
            tools.insert(tool.to_string());
            return tool.to_string();
        }
        OTHER.into()
    }

    /// Sends what was counted, every `flush_interval_s`, until `shutdown` (then once more).
    pub async fn flush_loop(self, registry: Registry, shutdown: Shutdown) {
        let every = Duration::from_secs(self.cfg.flush_interval_s);
        let stopping = shutdown.wait();
        tokio::pin!(stopping);
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(every) => false,
                _ = &mut stopping => true,
            };
            self.flush(&registry).await;
            if stop {
                return;
            }
        }
    }

    /// Proposes the pending rows, after a flush that failed (sent again with its request id,
    /// so that the state applies it once).
    pub async fn flush(&self, registry: &Registry) {
        let mut unsent = self.unsent.lock().await;
        if let Some(request) = unsent.take() {
            match self.send(registry, request).await {
                Ok(()) => {}
                Err(request) => {
                    *unsent = Some(request);
                    return;
                }
            }
        }
        let rows: Vec<UsageRow> = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *pending).into_values().collect()
        };
        if rows.is_empty() {
            return;
        }
        let request = Request {
            request_id: new_request_id(),
            command: Command::AddUsage {
                rows,
                retention_hours: self.cfg.retention_hours,
            },
            audit: None,
        };
        if let Err(request) = self.send(registry, request).await {
            *unsent = Some(request);
        }
    }

    /// One flush; the request back when it may not have been applied and can be sent again.
    async fn send(&self, registry: &Registry, request: Request) -> Result<(), Request> {
        match registry.write_request(request.clone()).await {
            Ok(_) => {
                metrics::counter!("mcpd_usage_flushes_total", "outcome" => "ok").increment(1);
                Ok(())
            }
            Err(
                e @ (RegistryError::NoQuorum { .. }
                | RegistryError::NotInitialized
                | RegistryError::ShuttingDown
                | RegistryError::Internal(_)),
            ) => {
                metrics::counter!("mcpd_usage_flushes_total", "outcome" => "failed").increment(1);
                tracing::warn!(error = %e, "usage not flushed; sent again with the next flush");
                Err(request)
            }
            Err(e) => {
                // The state refused the rows themselves: sending them again cannot help.
                metrics::counter!("mcpd_usage_flushes_total", "outcome" => "refused").increment(1);
                tracing::error!(error = %e, "usage refused by the state; dropped");
                Ok(())
            }
        }
    }
}

/// How many bytes `value` takes as JSON, without building the text.
pub fn json_size(value: &serde_json::Value) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(tool: &'a str, error: bool, at: u64) -> CallUsage<'a> {
        CallUsage {
            tenant: Some("acme"),
            subject: "tok1",
            server: "demo",
            tool,
            listed: Some(true),
            error,
            duration_ms: 2.4,
            bytes_in: 10,
            bytes_out: 20,
            at,
        }
    }

    #[test]
    fn calls_add_up_per_hour_and_key() {
        let u = Usage::new(UsageConfig::default());
        u.record(&call("echo", false, 7200 + 5));
        u.record(&call("echo", true, 7200 + 3599));
        u.record(&call("echo", false, 10800));
        let rows: Vec<UsageRow> = u.pending.lock().unwrap().values().cloned().collect();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].hour, rows[0].calls, rows[0].errors), (7200, 2, 1));
        assert_eq!(
            (rows[0].duration_ms, rows[0].bytes_in, rows[0].bytes_out),
            (4, 20, 40)
        );
        assert_eq!((rows[1].hour, rows[1].calls), (10800, 1));
    }

    #[test]
    fn a_servers_tool_labels_are_bounded() {
        let u = Usage::new(UsageConfig {
            max_tools_per_server: 2,
            ..UsageConfig::default()
        });
        assert_eq!(u.label_of("s", "a"), "a");
        assert_eq!(u.label_of("s", "b"), "b");
        assert_eq!(u.label_of("s", "c"), "other");
        assert_eq!(u.label_of("s", "a"), "a");
        assert_eq!(u.label_of("t", "c"), "c");
    }

    #[test]
    fn names_a_server_does_not_list_are_one_row() {
        let u = Usage::new(UsageConfig {
            max_tools_per_server: 2,
            ..UsageConfig::default()
        });
        let made_up = |name| CallUsage {
            listed: Some(false),
            ..call(name, true, 7200)
        };
        let unknown = |name| CallUsage {
            listed: None,
            ..call(name, true, 7200)
        };
        for name in ["x1", "x2", "x3"] {
            u.record(&made_up(name));
        }
        for name in ["echo", "y1", "y2", "y3"] {
            u.record(&unknown(name));
        }
        let tools: Vec<(String, u64)> = u
            .pending
            .lock()
            .unwrap()
            .values()
            .map(|r| (r.tool.clone(), r.calls))
            .collect();
        assert_eq!(
            tools,
            [("echo".into(), 1), ("other".into(), 5), ("y1".into(), 1)]
        );
        // A listed name is kept whatever the bound.
        u.record(&call("add", false, 7200));
        assert!(u.pending.lock().unwrap().values().any(|r| r.tool == "add"));
    }

    #[test]
    fn json_sizes_are_those_of_the_text() {
        let v = serde_json::json!({"a": [1, "two", null], "b": {"c": 1.5}});
        assert_eq!(json_size(&v), serde_json::to_vec(&v).unwrap().len() as u64);
    }
}
