//! `chaos self-test`: the checkers judged on histories whose verdict is known, so that a run's
//! PASS means something. Hand-written cases (a lost update, a stale read, a rejected
//! compare-and-set that did apply, a stale list, two leaders in a term) and generated ones: a
//! long concurrent register history built to be linearizable (each operation takes effect at a
//! random instant inside its call), and the same history with one read made stale, which must
//! fail. The MCP checkers: a call through the bridge never answered, a non-idempotent call
//! executed twice, an acknowledged one missing from the ledger, one answered "did not run" that
//! ran.

use std::time::{Duration, Instant};

use crate::checker::availability::Impairment;
use crate::checker::leaders::{self, LeaderSample};
use crate::checker::linearizable::Budget;
use crate::checker::mcp::{self as mcp_checks, parse_ledger};
use crate::checker::registers::{self, RegisterKey};
use crate::checker::tenants;
use crate::checker::Check;
use crate::history::{Failure, McpMethod, Op, OpKind, OpResult, Outcome, UnknownCause, Via};

/// One case: a name, the expected verdict, and the checker's.
pub struct Case {
    pub name: String,
    pub expect_pass: bool,
    pub check: Check,
    pub millis: u128,
}

impl Case {
    pub fn judged_right(&self) -> bool {
        self.check.passed == self.expect_pass
    }
}

fn op(id: usize, worker: usize, invoke: u64, complete: u64, kind: OpKind, outcome: Outcome) -> Op {
    Op {
        id,
        worker,
        node: 1 + (worker as u64 % 3),
        kind,
        invoke,
        complete,
        outcome,
    }
}

fn cas(from: u64, to: u64) -> OpKind {
    OpKind::CasRegister {
        key: "reg-0".into(),
        from,
        to,
        if_match: from,
    }
}

fn read() -> OpKind {
    OpKind::ReadRegister {
        key: "reg-0".into(),
    }
}

fn written() -> Outcome {
    Outcome::Ok(OpResult::Written { revision: 0 })
}

fn value(v: u64) -> Outcome {
    Outcome::Ok(OpResult::Register {
        value: v,
        revision: 0,
    })
}

fn rejected() -> Outcome {
    Outcome::Failed(Failure {
        status: Some(412),
        code: "revision_mismatch".into(),
        message: String::new(),
    })
}

fn unknown() -> Outcome {
    Outcome::Unknown {
        cause: UnknownCause::ServerUnsure,
        detail: "503 no_quorum".into(),
    }
}

fn keys() -> Vec<RegisterKey> {
    vec![RegisterKey {
        key: "reg-0".into(),
        initial: 1,
    }]
}

fn registers_case(name: &str, expect_pass: bool, ops: &[Op]) -> Case {
    let started = Instant::now();
    let check = registers::check(ops, &keys(), &[], Budget::default());
    Case {
        name: name.into(),
        expect_pass,
        check,
        millis: started.elapsed().as_millis(),
    }
}

/// A concurrent register history that is linearizable by construction: `workers` clients
/// each read then compare-and-set with what they read; every operation takes effect at a
/// random instant inside its call (unknown ones: at a random instant, or not at all).
/// Revisions are left at 0 (the register's unique values carry the order).
pub fn generated_history(seed: u64, workers: usize, ops_per_worker: usize) -> Vec<Op> {
    let mut rng = fastrand::Rng::with_seed(seed);
    struct Planned {
        worker: usize,
        invoke: u64,
        at: u64,
        complete: u64,
        is_read: bool,
        unknown: bool,
    }
    let mut planned = Vec::new();
    for w in 0..workers {
        let mut t = rng.u64(0..1_000);
        for i in 0..ops_per_worker {
            let len = rng.u64(200..5_000);
            planned.push(Planned {
                worker: w,
                invoke: t,
                at: t + rng.u64(0..=len),
                complete: t + len,
                is_read: i % 2 == 0,
                unknown: rng.u8(0..20) == 0,
            });
            t += len + rng.u64(0..2_000);
        }
    }
    // Apply in the order the operations take effect.
    planned.sort_by_key(|p| p.at);
    let mut state = 1u64;
    let mut next = 2u64;
    let mut last_read = vec![1u64; workers];
    let mut ops = Vec::new();
    for (id, p) in planned.iter().enumerate() {
        if p.is_read {
            last_read[p.worker] = state;
            ops.push(op(id, p.worker, p.invoke, p.complete, read(), value(state)));
        } else {
            let from = last_read[p.worker];
            let to = next;
            next += 1;
            let outcome = if p.unknown {
                if from == state && rng.bool() {
                    state = to;
                }
                unknown()
            } else if from == state {
                state = to;
                written()
            } else {
                rejected()
            };
            ops.push(op(
                id,
                p.worker,
                p.invoke,
                p.complete,
                cas(from, to),
                outcome,
            ));
        }
    }
    ops
}

/// Makes one read return the value a compare-and-set that completed before the read began had
/// replaced: impossible in any linearization, since values never come back.
pub fn make_stale(ops: &[Op]) -> Option<Vec<Op>> {
    let mut ops = ops.to_vec();
    for c in 0..ops.len() {
        let (OpKind::CasRegister { from, .. }, Outcome::Ok(_)) = (&ops[c].kind, &ops[c].outcome)
        else {
            continue;
        };
        let (from, done) = (*from, ops[c].complete);
        // The first successful compare-and-set with a read after it (a later one may have one
        // where this one has none).
        let Some(r) = ops.iter().position(|o| {
            matches!(o.kind, OpKind::ReadRegister { .. })
                && o.outcome.is_ok()
                && o.invoke > done + 1_000
        }) else {
            continue;
        };
        ops[r].outcome = value(from);
        return Some(ops);
    }
    None
}

/// Runs every case.
pub fn cases() -> Vec<Case> {
    let mut out = vec![
        registers_case(
            "register: sequential read, cas, rejected cas, read",
            true,
            &[
                op(0, 0, 0, 10, read(), value(1)),
                op(1, 0, 20, 30, cas(1, 2), written()),
                op(2, 1, 40, 50, cas(1, 3), rejected()),
                op(3, 1, 60, 70, read(), value(2)),
            ],
        ),
        registers_case(
            "register: unknown cas observed later, concurrent reads",
            true,
            &[
                op(0, 0, 0, 100, cas(1, 2), unknown()),
                op(1, 1, 10, 20, read(), value(1)),
                op(2, 2, 150, 160, read(), value(2)),
                op(3, 2, 170, 180, read(), value(2)),
            ],
        ),
        registers_case(
            "register (known bad): lost update, two cas from the same value both ok",
            false,
            &[
                op(0, 0, 0, 10, cas(1, 2), written()),
                op(1, 1, 2, 12, cas(1, 3), written()),
            ],
        ),
        registers_case(
            "register (known bad): stale read after an acknowledged cas",
            false,
            &[
                op(0, 0, 0, 10, cas(1, 2), written()),
                op(1, 1, 20, 30, read(), value(1)),
            ],
        ),
        registers_case(
            "register (known bad): rejected cas whose value shows up",
            false,
            &[
                op(0, 0, 0, 10, cas(1, 2), rejected()),
                op(1, 1, 20, 30, read(), value(2)),
            ],
        ),
    ];
    let long = generated_history(42, 6, 400);
    out.push(registers_case(
        &format!(
            "register: generated linearizable history ({} ops)",
            long.len()
        ),
        true,
        &long,
    ));
    // A generator that stopped producing the stale read must fail the self-test, not shrink it.
    let bad = make_stale(&long).expect("the generated history has a read after a compare-and-set");
    out.push(registers_case(
        &format!(
            "register (known bad): generated history with one stale read ({} ops)",
            bad.len()
        ),
        false,
        &bad,
    ));
    let create = |id, name: &str, i, c| {
        op(
            id,
            0,
            i,
            c,
            OpKind::CreateTenant { name: name.into() },
            written(),
        )
    };
    let list = |id, i, c, names: &[&str]| {
        op(
            id,
            1,
            i,
            c,
            OpKind::ListTenants,
            Outcome::Ok(OpResult::Tenants {
                names: names.iter().map(|s| s.to_string()).collect(),
            }),
        )
    };
    let started = Instant::now();
    out.push(Case {
        name: "tenants: list reads see every earlier acknowledged create".into(),
        expect_pass: true,
        check: tenants::reads_and_duplicates(
            &[
                create(0, "a", 0, 10),
                list(1, 5, 8, &[]),
                list(2, 20, 30, &["a"]),
            ],
            &[],
        ),
        millis: started.elapsed().as_millis(),
    });
    let started = Instant::now();
    out.push(Case {
        name: "tenants (known bad): a list misses an acknowledged create".into(),
        expect_pass: false,
        check: tenants::reads_and_duplicates(&[create(0, "a", 0, 10), list(1, 20, 30, &[])], &[]),
        millis: started.elapsed().as_millis(),
    });
    let sample = |at, node, term, state: &str, leader| LeaderSample {
        at,
        node,
        term,
        state: state.into(),
        leader,
    };
    let started = Instant::now();
    out.push(Case {
        name: "leaders (known bad): two leaders in term 4".into(),
        expect_pass: false,
        check: leaders::one_leader_per_term(&[
            sample(0, 1, 4, "leader", Some(1)),
            sample(5, 2, 4, "leader", Some(2)),
        ]),
        millis: started.elapsed().as_millis(),
    });
    out.extend(mcp_cases());
    out
}

/// The MCP checkers: answers within the deadline, and the demo server's ledger.
fn mcp_cases() -> Vec<Case> {
    let call = |id, node, via, method, key: &str, outcome| Op {
        id,
        worker: id,
        node,
        kind: OpKind::McpCall {
            via,
            method,
            key: key.into(),
        },
        invoke: 1_000_000,
        complete: 1_050_000,
        outcome,
    };
    let ok = || Outcome::Ok(OpResult::Answer { text: "1".into() });
    let error = |code: &str| {
        Outcome::Failed(Failure {
            status: None,
            code: code.into(),
            message: String::new(),
        })
    };
    let timeout = || Outcome::Unknown {
        cause: UnknownCause::Timeout,
        detail: "no answer within 15s".into(),
    };
    let killed = [Impairment {
        node: 1,
        from: 500_000,
        to: None,
        why: "killed".into(),
    }];
    let ledger = |keys: &[&str]| {
        parse_ledger(
            &keys
                .iter()
                .map(|k| format!("{{\"pid\":9,\"key\":\"{k}\"}}\n"))
                .collect::<String>(),
        )
    };
    let history = vec![
        call(0, 1, Via::Http, McpMethod::Echo, "e0", timeout()),
        call(1, 2, Via::Http, McpMethod::Counter, "k1", ok()),
        call(
            2,
            0,
            Via::Bridge(0),
            McpMethod::Counter,
            "k2",
            error("-32053"),
        ),
        call(
            3,
            0,
            Via::Bridge(0),
            McpMethod::Counter,
            "k3",
            error("-32050"),
        ),
    ];
    let timed = |name: &str, expect_pass: bool, f: &dyn Fn() -> Check| {
        let started = Instant::now();
        let check = f();
        Case {
            name: name.into(),
            expect_pass,
            check,
            millis: started.elapsed().as_millis(),
        }
    };
    let mut bridge_silent = history.clone();
    bridge_silent.push(call(4, 0, Via::Bridge(1), McpMethod::Echo, "e4", timeout()));
    vec![
        timed(
            "mcp: calls answered; a plain-HTTP call to the killed node is excused",
            true,
            &|| mcp_checks::answered_within(&history, &killed, Duration::from_secs(15)),
        ),
        timed(
            "mcp (known bad): a call through mcp-bridge never answered",
            false,
            &|| mcp_checks::answered_within(&bridge_silent, &killed, Duration::from_secs(15)),
        ),
        timed(
            "mcp: ledger holds the ok call once, the crashed one (may have run) once",
            true,
            &|| {
                let l = ledger(&["k1", "k2"]);
                merge(
                    mcp_checks::no_duplicates(&history, &l),
                    mcp_checks::answers_match(&history, &l),
                )
            },
        ),
        timed(
            "mcp (known bad): a counter call executed twice",
            false,
            &|| mcp_checks::no_duplicates(&history, &ledger(&["k1", "k2", "k2"])),
        ),
        timed(
            "mcp (known bad): a counter call answered ok is not in the ledger",
            false,
            &|| mcp_checks::answers_match(&history, &ledger(&["k2"])),
        ),
        timed(
            "mcp (known bad): a counter call answered `unavailable` (did not run) ran",
            false,
            &|| mcp_checks::answers_match(&history, &ledger(&["k1", "k3"])),
        ),
    ]
}

/// Both checks as one: passes when both do.
fn merge(a: Check, b: Check) -> Check {
    if a.passed && b.passed {
        Check::pass(a.name, format!("{}; {}", a.summary, b.summary))
    } else {
        let (mut failed, other) = if a.passed { (b, a) } else { (a, b) };
        failed.evidence.extend(other.evidence);
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_self_test_case_is_judged_right() {
        for c in cases() {
            assert!(c.judged_right(), "{}: {:?}", c.name, c.check);
        }
    }

    #[test]
    fn generated_histories_pass_and_their_stale_variants_fail() {
        for seed in 0..5 {
            let h = generated_history(seed, 4, 60);
            let good = registers::check(&h, &keys(), &[], Budget::default());
            assert!(good.passed, "seed {seed}: {good:?}");
            let bad = make_stale(&h).expect("a stale variant");
            let c = registers::check(&bad, &keys(), &[], Budget::default());
            assert!(!c.passed, "seed {seed}");
            assert_eq!(c.counts.linearizability_violations, 1);
        }
    }
}
