//! Checkers: pure functions from what a scenario recorded (the operation history, the leader
//! samples, the final reads of every node, the fault timeline) to verdicts. None of them talks
//! to the cluster, so each can be unit-tested on hand-written records.
//!
//! - [`linearizable`]: the generic Wing & Gong / Lowe search and the register model;
//! - [`registers`]: the shared registers' histories (compare-and-set) through it;
//! - [`tenants`]: acknowledged creates present on every node, list reads not stale;
//! - [`leaders`]: at most one leader per term;
//! - [`availability`]: calls that never got an answer, and the recovery figures;
//! - [`mcp`]: MCP calls answered within their deadline, and the demo server's ledger (no
//!   non-idempotent call executed twice, every acknowledged one executed).

pub mod availability;
pub mod leaders;
pub mod linearizable;
pub mod mcp;
pub mod registers;
pub mod tenants;

use crate::history::{Micros, Op, OpKind, OpResult, Outcome};

/// What failing checks counted, summed into the run's JSON summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub lost_writes: usize,
    pub linearizability_violations: usize,
    pub duplicate_executions: usize,
    pub unanswered_calls: usize,
    /// Terms in which two different nodes led.
    pub leader_conflicts: usize,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.lost_writes += o.lost_writes;
        self.linearizability_violations += o.linearizability_violations;
        self.duplicate_executions += o.duplicate_executions;
        self.unanswered_calls += o.unanswered_calls;
        self.leader_conflicts += o.leader_conflicts;
    }
}

/// The verdict of one checker.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    /// One line: what was checked, and the result.
    pub summary: String,
    /// On failure: the operations or samples that show it.
    pub evidence: Vec<String>,
    pub counts: Counts,
}

impl Check {
    pub fn pass(name: &'static str, summary: impl Into<String>) -> Check {
        Check {
            name,
            passed: true,
            summary: summary.into(),
            evidence: Vec::new(),
            counts: Counts::default(),
        }
    }

    pub fn fail(
        name: &'static str,
        summary: impl Into<String>,
        evidence: Vec<String>,
        counts: Counts,
    ) -> Check {
        Check {
            name,
            passed: false,
            summary: summary.into(),
            evidence,
            counts,
        }
    }
}

/// Seconds with millisecond precision, for evidence lines.
pub fn secs(t: Micros) -> String {
    format!("{:.3}s", t as f64 / 1e6)
}

/// `s` cut to at most `max` characters (with an ellipsis when cut).
pub fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}...")
    }
}

/// One line describing an operation, for evidence.
pub fn describe(op: &Op) -> String {
    let what = match &op.kind {
        OpKind::CreateTenant { name } => format!("create tenant {name}"),
        OpKind::ListTenants => "list tenants".to_string(),
        OpKind::ReadRegister { key } => format!("read {key}"),
        OpKind::CasRegister {
            key,
            from,
            to,
            if_match,
        } => format!("cas {key} {from}->{to} (If-Match {if_match})"),
        OpKind::McpCall { via, method, key } => format!("mcp {} via {via} [{key}]", method.name()),
    };
    let outcome = match &op.outcome {
        Outcome::Ok(OpResult::Written { revision }) => format!("ok rev {revision}"),
        Outcome::Ok(OpResult::Register { value, revision }) => {
            format!("ok value {value} rev {revision}")
        }
        Outcome::Ok(OpResult::Tenants { names }) => format!("ok {} tenants", names.len()),
        Outcome::Ok(OpResult::Answer { text }) => format!("ok {text:?}"),
        Outcome::Failed(f) if matches!(op.kind, OpKind::McpCall { .. }) => format!(
            "failed {}{}: {}",
            f.status.map(|s| format!("HTTP {s} ")).unwrap_or_default(),
            f.code,
            short(&f.message, 160)
        ),
        Outcome::Failed(f) => format!(
            "failed {}{}",
            f.status.map(|s| format!("{s} ")).unwrap_or_default(),
            f.code
        ),
        Outcome::Unknown { cause, detail } => format!("unknown ({cause:?}: {detail})"),
    };
    let node = match &op.kind {
        OpKind::McpCall {
            via: crate::history::Via::Bridge(_),
            ..
        } => "the bridge's choice".to_string(),
        _ => format!("node {}", op.node),
    };
    format!(
        "#{} worker {} -> {node} [{} .. {}] {what}: {outcome}",
        op.id,
        op.worker,
        secs(op.invoke),
        secs(op.complete)
    )
}
