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
use std::time::{Duration, Instant};

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

    /// The [`Instant`] of a timestamp of this clock.
    pub fn instant(&self, at: Micros) -> Instant {
        self.start + Duration::from_micros(at)
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

    pub fn is_unknown(&self) -> bool {
        matches!(self, Outcome::Unknown { .. })
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

/// An operation that was invoked and has not completed yet.
#[derive(Debug)]
pub struct Pending {
    worker: usize,
    node: u64,
    kind: OpKind,
    invoke: Micros,
}

/// The shared, append-only record of a scenario's operations.
#[derive(Debug, Clone)]
pub struct History {
    clock: Clock,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl History {
    pub fn new(clock: Clock) -> Self {
        History {
            clock,
            ops: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Op>> {
        // A panicking worker cannot leave a half-written op: pushes are single calls.
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the invocation time of an operation about to be sent.
    pub fn invoke(&self, worker: usize, node: u64, kind: OpKind) -> Pending {
        Pending {
            worker,
            node,
            kind,
            invoke: self.clock.now(),
        }
    }

    /// Records the completion of `pending`.
    pub fn complete(&self, pending: Pending, outcome: Outcome) {
        let complete = self.clock.now();
        let mut ops = self.lock();
        let id = ops.len();
        ops.push(Op {
            id,
            worker: pending.worker,
            node: pending.node,
            kind: pending.kind,
            invoke: pending.invoke,
            complete,
            outcome,
        });
    }

    /// A copy of every completed operation, in completion order.
    pub fn snapshot(&self) -> Vec<Op> {
        self.lock().clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_get_ids_in_completion_order_and_times_are_ordered() {
        let h = History::new(Clock::new());
        let a = h.invoke(0, 1, OpKind::ListTenants);
        let b = h.invoke(1, 2, OpKind::ListTenants);
        h.complete(
            b,
            Outcome::Ok(OpResult::Tenants { names: vec![] }),
        );
        h.complete(
            a,
            Outcome::Unknown {
                cause: UnknownCause::Timeout,
                detail: "t".into(),
            },
        );
        let ops = h.snapshot();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].worker, 1);
        assert_eq!(ops[1].id, 1);
        assert!(ops.iter().all(|o| o.invoke <= o.complete));
        assert_eq!(
            Tally::of(&ops),
            Tally {
                ok: 1,
                failed: 0,
                unknown: 1
            }
        );
    }
}
