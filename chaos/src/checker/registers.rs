//! The shared registers (servers written with `PUT` + `If-Match`) checked for linearizability,
//! key by key, through [`super::linearizable`], plus the bookkeeping the register's unique
//! values make possible: a value seen at two revisions, or a compare-and-set answered `412`
//! whose value is seen anyway, means a write ran twice.

use std::collections::{BTreeMap, BTreeSet};

use super::linearizable::{self, Budget, Operation, Register, RegisterOp, Verdict};
use super::{describe, secs, Check, Counts};
use crate::history::{Micros, Op, OpKind, OpResult, Outcome};

/// A register and the value it held before the workload started.
#[derive(Debug, Clone)]
pub struct RegisterKey {
    pub key: String,
    pub initial: u64,
}

/// A read of a register on one node after the cluster settled.
#[derive(Debug, Clone)]
pub struct FinalRead {
    pub key: String,
    pub node: u64,
    pub value: u64,
    pub revision: u64,
    pub invoke: Micros,
    pub complete: Micros,
}

/// What the operations of the history say about register `key`, as the checker's input.
/// Returns the operations and, for each, the history op it came from (`None`: a final read).
fn key_history(
    ops: &[Op],
    key: &str,
    finals: &[FinalRead],
) -> (Vec<Operation<RegisterOp>>, Vec<Option<usize>>) {
    let mut out = Vec::new();
    let mut origin = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let input = match (&op.kind, &op.outcome) {
            (OpKind::ReadRegister { key: k }, Outcome::Ok(OpResult::Register { value, .. }))
                if k == key =>
            {
                Some((RegisterOp::Read(*value), true))
            }
            (
                OpKind::CasRegister {
                    key: k, from, to, ..
                },
                outcome,
            ) if k == key => {
                match outcome {
                    Outcome::Ok(_) => Some((
                        RegisterOp::Cas {
                            from: *from,
                            to: *to,
                        },
                        true,
                    )),
                    Outcome::Failed(f) if f.status == Some(412) => {
                        Some((RegisterOp::CasRejected { from: *from }, true))
                    }
                    // Definitely not applied, and says nothing about the register.
                    Outcome::Failed(_) => None,
                    Outcome::Unknown { .. } => Some((
                        RegisterOp::Cas {
                            from: *from,
                            to: *to,
                        },
                        false,
                    )),
                }
            }
            _ => None,
        };
        if let Some((input, known)) = input {
            out.push(Operation {
                call: op.invoke,
                ret: known.then_some(op.complete),
                input,
            });
            origin.push(Some(i));
        }
    }
    for f in finals.iter().filter(|f| f.key == key) {
        out.push(Operation {
            call: f.invoke,
            ret: Some(f.complete),
            input: RegisterOp::Read(f.value),
        });
        origin.push(None);
    }
    (out, origin)
}

fn describe_input(
    ops: &[Op],
    hist: &[Operation<RegisterOp>],
    origin: &[Option<usize>],
    finals: &[FinalRead],
    key: &str,
    i: usize,
) -> String {
    match origin.get(i).copied().flatten() {
        Some(o) => describe(&ops[o]),
        None => {
            let h = &hist[i];
            let node = finals
                .iter()
                .find(|f| f.key == key && f.invoke == h.call)
                .map(|f| f.node)
                .unwrap_or(0);
            format!(
                "final stale read of {key} on node {node} [{} .. {}]: {:?}",
                secs(h.call),
                secs(h.ret.unwrap_or(h.call)),
                h.input
            )
        }
    }
}

/// Checks every register's history (and the final reads) for linearizability and for writes
/// that ran twice.
pub fn check(ops: &[Op], keys: &[RegisterKey], finals: &[FinalRead], budget: Budget) -> Check {
    let mut evidence = Vec::new();
    let mut counts = Counts::default();
    let mut inconclusive = Vec::new();
    let mut checked = 0usize;
    for k in keys {
        let (hist, origin) = key_history(ops, &k.key, finals);
        checked += hist.len();
        match linearizable::check(&Register { initial: k.initial }, &hist, budget) {
            Verdict::Linearizable => {}
            Verdict::Inconclusive { steps } => {
                inconclusive.push(format!(
                    "{}: search gave up after {steps} steps ({} ops)",
                    k.key,
                    hist.len()
                ));
            }
            Verdict::Violation(e) => {
                counts.linearizability_violations += 1;
                evidence.push(format!(
                    "register {} is not linearizable: the longest linearizable prefix has {} ops and leaves the value {}; this op cannot follow it:",
                    k.key,
                    e.prefix.len(),
                    e.state
                ));
                evidence.push(format!(
                    "    {}",
                    describe_input(ops, &hist, &origin, finals, &k.key, e.stuck)
                ));
                if !e.prefix.is_empty() {
                    evidence.push("  the last ops of that prefix:".to_string());
                }
                for i in e.prefix.iter().rev().take(6).rev() {
                    evidence.push(format!(
                        "    {}",
                        describe_input(ops, &hist, &origin, finals, &k.key, *i)
                    ));
                }
                if !e.pending.is_empty() {
                    evidence.push("  ops still pending at that point:".to_string());
                    for i in e.pending.iter().take(8) {
                        evidence.push(format!(
                            "    {}",
                            describe_input(ops, &hist, &origin, finals, &k.key, *i)
                        ));
                    }
                }
            }
        }
    }
    let dup = duplicates(ops, finals);
    counts.duplicate_executions += dup.len();
    evidence.extend(dup);
    let summary = format!(
        "{} registers, {checked} ops: {} non-linearizable, {} duplicate executions{}",
        keys.len(),
        counts.linearizability_violations,
        counts.duplicate_executions,
        if inconclusive.is_empty() {
            String::new()
        } else {
            format!(", {} inconclusive", inconclusive.len())
        }
    );
    evidence.extend(inconclusive.iter().cloned());
    // A run in which no register operation completed has checked nothing: that is a broken
    // workload (for example a register value the API no longer shows), not a pass.
    let vacuous = !keys.is_empty() && checked == 0;
    if vacuous {
        evidence.push(
            "no register read or compare-and-set completed: the check had nothing to judge"
                .to_string(),
        );
    }
    if counts == Counts::default() && inconclusive.is_empty() && !vacuous {
        Check::pass("linearizable registers", summary)
    } else {
        Check::fail("linearizable registers", summary, evidence, counts)
    }
}

/// Writes that ran twice: a unique value seen at two different revisions, or a
/// compare-and-set answered `412` whose value is observed anyway (its first run applied it,
/// a re-run was refused and that answer is the one the client got).
fn duplicates(ops: &[Op], finals: &[FinalRead]) -> Vec<String> {
    let mut revisions: BTreeMap<(String, u64), BTreeSet<u64>> = BTreeMap::new();
    let mut observed: BTreeSet<(String, u64)> = BTreeSet::new();
    for op in ops {
        match (&op.kind, &op.outcome) {
            (OpKind::ReadRegister { key }, Outcome::Ok(OpResult::Register { value, revision })) => {
                revisions
                    .entry((key.clone(), *value))
                    .or_default()
                    .insert(*revision);
                observed.insert((key.clone(), *value));
            }
            (OpKind::CasRegister { key, from, .. }, _) => {
                observed.insert((key.clone(), *from));
            }
            _ => {}
        }
        if let (OpKind::CasRegister { key, to, .. }, Outcome::Ok(OpResult::Written { revision })) =
            (&op.kind, &op.outcome)
        {
            revisions
                .entry((key.clone(), *to))
                .or_default()
                .insert(*revision);
        }
    }
    for f in finals {
        revisions
            .entry((f.key.clone(), f.value))
            .or_default()
            .insert(f.revision);
        observed.insert((f.key.clone(), f.value));
    }
    let mut out = Vec::new();
    for ((key, value), revs) in &revisions {
        if revs.len() > 1 {
            out.push(format!(
                "duplicate execution: {key} held value {value} at revisions {revs:?} (each value is written once)"
            ));
        }
    }
    for op in ops {
        if let (OpKind::CasRegister { key, to, .. }, Outcome::Failed(f)) = (&op.kind, &op.outcome) {
            if f.status == Some(412) && observed.contains(&(key.clone(), *to)) {
                out.push(format!(
                    "duplicate execution: answered 412 yet its value was observed: {}",
                    describe(op)
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Failure, UnknownCause};

    fn op(id: usize, invoke: Micros, complete: Micros, kind: OpKind, outcome: Outcome) -> Op {
        Op {
            id,
            worker: id,
            node: 1,
            kind,
            invoke,
            complete,
            outcome,
        }
    }

    fn cas(from: u64, to: u64) -> OpKind {
        OpKind::CasRegister {
            key: "k".into(),
            from,
            to,
            if_match: from,
        }
    }

    fn read() -> OpKind {
        OpKind::ReadRegister { key: "k".into() }
    }

    fn keys() -> Vec<RegisterKey> {
        vec![RegisterKey {
            key: "k".into(),
            initial: 0,
        }]
    }

    #[test]
    fn a_good_history_with_unknown_and_rejected_ops_passes() {
        let ops = vec![
            op(
                0,
                0,
                10,
                cas(0, 1),
                Outcome::Ok(OpResult::Written { revision: 5 }),
            ),
            op(
                1,
                5,
                20,
                cas(0, 2),
                Outcome::Failed(Failure {
                    status: Some(412),
                    code: "revision_mismatch".into(),
                    message: String::new(),
                }),
            ),
            op(
                2,
                30,
                40,
                cas(1, 3),
                Outcome::Unknown {
                    cause: UnknownCause::Timeout,
                    detail: String::new(),
                },
            ),
            op(
                3,
                50,
                60,
                read(),
                Outcome::Ok(OpResult::Register {
                    value: 3,
                    revision: 9,
                }),
            ),
        ];
        let finals = vec![FinalRead {
            key: "k".into(),
            node: 2,
            value: 3,
            revision: 9,
            invoke: 100,
            complete: 110,
        }];
        let c = check(&ops, &keys(), &finals, Budget::default());
        assert!(c.passed, "{c:?}");
    }

    #[test]
    fn a_run_whose_register_reads_all_came_back_unreadable_fails() {
        let ops = vec![op(
            0,
            0,
            10,
            read(),
            Outcome::Unknown {
                cause: UnknownCause::Garbled,
                detail: "k has no value".into(),
            },
        )];
        let c = check(&ops, &keys(), &[], Budget::default());
        assert!(!c.passed, "{c:?}");
        assert!(
            c.evidence.iter().any(|l| l.contains("nothing to judge")),
            "{c:?}"
        );
    }

    #[test]
    fn a_final_state_that_lost_an_acknowledged_write_fails() {
        let ops = vec![op(
            0,
            0,
            10,
            cas(0, 1),
            Outcome::Ok(OpResult::Written { revision: 5 }),
        )];
        let finals = vec![FinalRead {
            key: "k".into(),
            node: 3,
            value: 0,
            revision: 1,
            invoke: 100,
            complete: 110,
        }];
        let c = check(&ops, &keys(), &finals, Budget::default());
        assert!(!c.passed);
        assert_eq!(c.counts.linearizability_violations, 1);
        assert!(c.evidence.iter().any(|l| l.contains("node 3")), "{c:?}");
    }

    #[test]
    fn a_rejected_cas_whose_value_shows_up_is_a_duplicate() {
        let ops = vec![
            op(
                0,
                0,
                10,
                cas(0, 1),
                Outcome::Failed(Failure {
                    status: Some(412),
                    code: "revision_mismatch".into(),
                    message: String::new(),
                }),
            ),
            op(
                1,
                20,
                30,
                read(),
                Outcome::Ok(OpResult::Register {
                    value: 1,
                    revision: 4,
                }),
            ),
        ];
        let c = check(&ops, &keys(), &[], Budget::default());
        assert!(!c.passed);
        assert_eq!(c.counts.duplicate_executions, 1);
    }
}
