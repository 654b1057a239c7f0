//! The history of one scenario: every operation a client invoked, with the time it was invoked,
//! the time its answer (or the lack of one) came back, and what it says about the cluster's
//! state. Checkers only ever read this record; they never talk to the cluster themselves.
//!
//! Times are microseconds since the scenario's start ([`Clock`]), taken from a monotonic clock.
//! An operation's outcome is one of three things:
//! - [`Outcome::Ok`]: the cluster acknowledged it;
//! - [`Outcome::Failed`]: it definitely did not take effect (a 4xx, a refused connection, a
//!   503 whose body says nothing was proposed);
//! - [`Outcome::Unknown`]: it may or may not have taken effect, now or later (a 503 on a write
//!   that was proposed, a timeout, a connection lost after the request was sent).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Microseconds since the scenario started.
pub type Micros = u64;

/// The scenario's time base.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
        }
    }

    /// Now, in microseconds since the start.
    pub fn now(&self) -> Micros {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// What an operation asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Create a tenant with a name no other operation uses.
    CreateTenant { name: String },
    /// Linearizable list of the tenants.
    ListTenants,
    /// Linearizable read of a shared register (a server).
    ReadRegister { key: String },
    /// Compare-and-set of a shared register: `PUT` with `If-Match: if_match`, which is the
    /// revision at which the register held `from`; on success it holds `to` (unique).
    CasRegister {
        key: String,
        from: u64,
        to: u64,
        if_match: u64,
    },
    /// An MCP request of the MCP workload (`key` is unique per call: the echoed message, or
    /// the counter's `mcpd/request-key`).
    McpCall {
        via: Via,
        method: McpMethod,
        key: String,
    },
}

/// How an MCP request reached the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Plain HTTP (Streamable HTTP with `Mcp-Session-Id`) to the op's node.
    Http,
    /// Through `mcp-bridge` number `n`, which picks the node itself (the op's node is 0).
    Bridge(usize),
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Http => write!(f, "http"),
            Via::Bridge(n) => write!(f, "bridge {n}"),
        }
    }
}

/// What an MCP request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McpMethod {
    Initialize,
    ListTools,
    /// `tools/call` of the demo server's `echo` (idempotent).
    Echo,
    /// `tools/call` of the demo server's `counter_increment` (not idempotent, ledger).
    Counter,
}

impl McpMethod {
    pub fn name(self) -> &'static str {
        match self {
            McpMethod::Initialize => "initialize",
            McpMethod::ListTools => "tools/list",
            McpMethod::Echo => "echo",
            McpMethod::Counter => "counter_increment",
        }
    }

    pub fn is_tool_call(self) -> bool {
        matches!(self, McpMethod::Echo | McpMethod::Counter)
    }
}

impl OpKind {
    /// Whether the operation changes the registry.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            OpKind::CreateTenant { .. } | OpKind::CasRegister { .. }
        )
    }
}

/// What an acknowledged operation returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// A write's registry revision.
    Written { revision: u64 },
    /// A register's value and the revision of its last change.
    Register { value: u64, revision: u64 },
    /// The tenant names a list returned (only the ones this workload created).
    Tenants { names: Vec<String> },
    /// An MCP request's result (a tool's first text block, or a short description).
    Answer { text: String },
}

/// A definite failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// HTTP status, when a node answered.
    pub status: Option<u16>,
    /// The API's error code (`revision_mismatch`, `already_exists`, ...) or a short cause.
    pub code: String,
    pub message: String,
}

/// Why an operation's effect is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownCause {
    /// No answer within the client's timeout.
    Timeout,
    /// The connection broke after the request was sent.
    ConnectionLost,
    /// The node answered that the write may still be applied (503) or failed oddly (5xx).
    ServerUnsure,
    /// An answer that could not be understood.
    Garbled,
    /// No answer was recorded: the client was stopped while the call was in flight.
    InFlight,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(OpResult),
    Failed(Failure),
    Unknown { cause: UnknownCause, detail: String },
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
}

/// One operation of the history.
#[derive(Debug, Clone)]
pub struct Op {
    pub id: usize,
    /// The client (worker) that ran it; a worker runs one operation at a time.
    pub worker: usize,
    /// The node it was sent to.
    pub node: u64,
    pub kind: OpKind,
    pub invoke: Micros,
    /// When the answer (or the client's giving up) came back. For an unknown outcome the
    /// operation's effect may still happen after this.
    pub complete: Micros,
    pub outcome: Outcome,
}

/// An operation that was invoked and has not completed yet (its index in the history).
#[derive(Debug)]
pub struct Pending {
    index: usize,
}

/// The shared, append-only record of a scenario's operations. An operation is recorded when
/// it is invoked, so one whose client is stopped mid-call still appears (as unknown).
#[derive(Debug, Clone)]
pub struct History {
    clock: Clock,
    /// Each op with whether it completed.
    ops: Arc<Mutex<Vec<(Op, bool)>>>,
}

impl History {
    pub fn new(clock: Clock) -> Self {
        History {
            clock,
            ops: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(Op, bool)>> {
        // A panicking worker cannot leave a half-written op: pushes are single calls.
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an operation about to be sent, with its invocation time.
    pub fn invoke(&self, worker: usize, node: u64, kind: OpKind) -> Pending {
        let mut ops = self.lock();
        let index = ops.len();
        let invoke = self.clock.now();
        ops.push((
            Op {
                id: index,
                worker,
                node,
                kind,
                invoke,
                complete: invoke,
                outcome: Outcome::Unknown {
                    cause: UnknownCause::InFlight,
                    detail: "no answer recorded".into(),
                },
            },
            false,
        ));
        Pending { index }
    }

    /// Records the completion of `pending`.
    pub fn complete(&self, pending: Pending, outcome: Outcome) {
        let complete = self.clock.now();
        let mut ops = self.lock();
        if let Some((op, done)) = ops.get_mut(pending.index) {
            op.complete = complete;
            op.outcome = outcome;
            *done = true;
        }
    }

    /// Whether an op recorded so far (completed or not) satisfies `pred`, without copying them.
    pub fn any(&self, pred: impl Fn(&Op) -> bool) -> bool {
        self.lock().iter().any(|(op, _)| pred(op))
    }

    /// A copy of every operation, in invocation order; one still in flight is unknown and
    /// ends now.
    pub fn snapshot(&self) -> Vec<Op> {
        let now = self.clock.now();
        self.lock()
            .iter()
            .map(|(op, done)| {
                let mut op = op.clone();
                if !done {
                    op.complete = now;
                }
                op
            })
            .collect()
    }
}

/// Counts of a history's outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
}

impl Tally {
    pub fn of(ops: &[Op]) -> Tally {
        let mut t = Tally::default();
        for op in ops {
            match op.outcome {
                Outcome::Ok(_) => t.ok += 1,
                Outcome::Failed(_) => t.failed += 1,
                Outcome::Unknown { .. } => t.unknown += 1,
            }
        }
        t
    }
}

/// Latency percentiles of the acknowledged operations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(ops: &[Op]) -> Latency {
        let mut l: Vec<u64> = ops
            .iter()
            .filter(|o| o.outcome.is_ok())
            .map(|o| (o.complete - o.invoke) / 1000)
            .collect();
        if l.is_empty() {
            return Latency::default();
        }
        l.sort_unstable();
        let at = |q: usize| l[(l.len() - 1) * q / 100];
        Latency {
            p50: at(50),
            p99: at(99),
            max: at(100),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_get_ids_in_invocation_order_and_in_flight_ones_are_unknown() {
        let h = History::new(Clock::new());
        let a = h.invoke(0, 1, OpKind::ListTenants);
        let b = h.invoke(1, 2, OpKind::ListTenants);
        h.complete(b, Outcome::Ok(OpResult::Tenants { names: vec![] }));
        h.complete(
            a,
            Outcome::Unknown {
                cause: UnknownCause::Timeout,
                detail: "t".into(),
            },
        );
        let _in_flight = h.invoke(2, 3, OpKind::ListTenants);
        let ops = h.snapshot();
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[0].worker, 0);
        assert_eq!(ops[1].id, 1);
        assert!(matches!(
            ops[2].outcome,
            Outcome::Unknown {
                cause: UnknownCause::InFlight,
                ..
            }
        ));
        assert!(ops.iter().all(|o| o.invoke <= o.complete));
        assert_eq!(
            Tally::of(&ops),
            Tally {
                ok: 1,
                failed: 0,
                unknown: 2
            }
        );
    }
}
