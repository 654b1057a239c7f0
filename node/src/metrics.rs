//! Prometheus metrics of a node. Every moving part records through the `metrics` crate; this
//! module installs the exporter, declares the histogram buckets, describes each metric once,
//! and mirrors openraft's own metrics into gauges.
//!
//! Names follow `mcpd_<area>_<what>_<unit>`; `deploy/METRICS.md` lists them all.

use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::raft::Raft;

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Installs the global recorder. Call once per process.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!("mcpd_build_info", "Always 1; labels carry the version");
    describe_gauge!("mcpd_raft_term", "Current Raft term");
    describe_gauge!("mcpd_raft_is_leader", "1 when this node is the Raft leader");
    describe_gauge!("mcpd_raft_has_leader", "1 when this node knows a leader");
    describe_gauge!("mcpd_raft_last_log_index", "Index of the last log entry");
    describe_gauge!("mcpd_raft_applied_index", "Index of the last applied entry");
    describe_gauge!(
        "mcpd_raft_apply_lag",
        "Entries appended but not yet applied"
    );
    describe_gauge!(
        "mcpd_raft_snapshot_index",
        "Last index included in the latest snapshot"
    );
    describe_gauge!("mcpd_raft_members", "Voters in the current membership");
    describe_gauge!(
        "mcpd_raft_leader_id",
        "Id of the leader this node knows (0: none)"
    );
    describe_counter!(
        "mcpd_raft_leader_changes_total",
        "Times this node saw the leader change"
    );
    describe_counter!("mcpd_raft_snapshot_builds_total", "Snapshots built");
    describe_counter!(
        "mcpd_raft_snapshot_installs_total",
        "Snapshots installed from a leader"
    );
    describe_histogram!(
        "mcpd_raft_rpc_seconds",
        Unit::Seconds,
        "Raft RPC latency to peers, by rpc"
    );
    describe_counter!(
        "mcpd_raft_rpc_failures_total",
        "Failed Raft RPCs to peers, by rpc"
    );
    describe_counter!(
        "mcpd_raft_appends_answered_early_total",
        "Appends of openraft's replication answered from an early acknowledgement"
    );
    describe_counter!(
        "mcpd_raft_early_appends_total",
        "Appends the leader sent (or skipped) to a follower during its own fsync, by outcome"
    );
    describe_histogram!(
        "mcpd_registry_forward_seconds",
        Unit::Seconds,
        "Time of a write forwarded to the leader, from sending it to its answer"
    );
    describe_histogram!(
        "mcpd_registry_write_seconds",
        Unit::Seconds,
        "Registry write latency (propose to applied), by op and outcome"
    );
    describe_counter!(
        "mcpd_registry_forwarded_writes_total",
        "Writes forwarded to the leader"
    );
    describe_counter!(
        "mcpd_registry_failed_proposals_total",
        "Writes that failed, by reason"
    );
    describe_counter!(
        "mcpd_http_requests_total",
        "HTTP requests by route, method and status"
    );
    describe_histogram!(
        "mcpd_http_request_seconds",
        Unit::Seconds,
        "HTTP request latency by route"
    );
    describe_counter!(
        "mcpd_auth_failures_total",
        "Requests with a missing, unknown, revoked or expired token"
    );
}

/// Mirrors openraft's metrics into gauges until the Raft stops.
pub async fn export_raft(raft: Raft) {
    gauge!("mcpd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let mut rx = raft.metrics();
    let mut last_leader = None;
    loop {
        {
            let m = rx.borrow_and_update().clone();
            gauge!("mcpd_raft_term").set(m.current_term as f64);
            gauge!("mcpd_raft_is_leader").set(if m.current_leader == Some(m.id) {
                1.0
            } else {
                0.0
            });
            gauge!("mcpd_raft_has_leader").set(if m.current_leader.is_some() { 1.0 } else { 0.0 });
            gauge!("mcpd_raft_leader_id").set(m.current_leader.unwrap_or(0) as f64);
            let last = m.last_log_index.unwrap_or(0);
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            gauge!("mcpd_raft_last_log_index").set(last as f64);
            gauge!("mcpd_raft_applied_index").set(applied as f64);
            gauge!("mcpd_raft_apply_lag").set(last.saturating_sub(applied) as f64);
            gauge!("mcpd_raft_snapshot_index").set(m.snapshot.map(|l| l.index).unwrap_or(0) as f64);
            gauge!("mcpd_raft_members")
                .set(m.membership_config.membership().voter_ids().count() as f64);
            if m.current_leader != last_leader {
                if m.current_leader.is_some() {
                    metrics::counter!("mcpd_raft_leader_changes_total").increment(1);
                    tracing::info!(
                        leader = m.current_leader.unwrap_or(0),
                        term = m.current_term,
                        "leader changed"
                    );
                }
                last_leader = m.current_leader;
            }
        }
        // Coalesce bursts: at most ten updates a second.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if rx.changed().await.is_err() {
            return;
        }
    }
}
