//! The unique-key writes (tenants, each created once under a name no other operation uses):
//! - every acknowledged create is present on every node at the end (no lost write);
//! - a linearizable list never misses a create acknowledged before the list was invoked, and
//!   never shows a name that no create could have written by the time the list returned;
//! - a create answered `409 already_exists` ran twice (the client never retries, so the
//!   conflict can only come from a re-run inside the cluster).

use std::collections::{BTreeMap, BTreeSet};

use super::{describe, Check, Counts};
use crate::history::{Op, OpKind, OpResult, Outcome};

/// The tenants one node holds after the cluster settled (a stale read of its own state).
#[derive(Debug, Clone)]
pub struct NodeTenants {
    pub node: u64,
    /// `None`: the node could not be read.
    pub names: Option<BTreeSet<String>>,
}

fn creates(ops: &[Op]) -> BTreeMap<&str, &Op> {
    ops.iter()
        .filter_map(|op| match &op.kind {
            OpKind::CreateTenant { name } => Some((name.as_str(), op)),
            _ => None,
        })
        .collect()
}

/// Every acknowledged create is on every node.
pub fn lost_writes(ops: &[Op], nodes: &[NodeTenants]) -> Check {
    let acked: Vec<&Op> = ops
        .iter()
        .filter(|op| matches!(op.kind, OpKind::CreateTenant { .. }) && op.outcome.is_ok())
        .collect();
    let mut missing: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut evidence = Vec::new();
    for n in nodes {
        let Some(names) = &n.names else {
            evidence.push(format!("node {} could not be read at the end", n.node));
            continue;
        };
        for op in &acked {
            if let OpKind::CreateTenant { name } = &op.kind {
                if !names.contains(name) {
                    missing.entry(name).or_default().push(n.node);
                }
            }
        }
    }
    let unreadable = evidence.len();
    let by_name: BTreeMap<&str, &Op> = creates(ops);
    for (name, on) in missing.iter().take(20) {
        if let Some(op) = by_name.get(name) {
            evidence.push(format!("missing on nodes {on:?}: {}", describe(op)));
        }
    }
    if missing.len() > 20 {
        evidence.push(format!("... and {} more", missing.len() - 20));
    }
    let summary = format!(
        "{} acknowledged creates checked on {} nodes: {} missing{}",
        acked.len(),
        nodes.len(),
        missing.len(),
        if unreadable > 0 {
            format!(", {unreadable} nodes unreadable")
        } else {
            String::new()
        }
    );
    if missing.is_empty() && unreadable == 0 {
        Check::pass("acknowledged writes present", summary)
    } else {
        Check::fail(
            "acknowledged writes present",
            summary,
            evidence,
            Counts {
                lost_writes: missing.len(),
                ..Counts::default()
            },
        )
    }
}

/// List reads are linearizable with respect to the creates, and no create ran twice.
pub fn reads_and_duplicates(ops: &[Op], finals: &[NodeTenants]) -> Check {
    let by_name = creates(ops);
    // Acknowledged creates in the order their answers came.
    let mut acked: Vec<(u64, &str)> = by_name
        .iter()
        .filter(|(_, op)| op.outcome.is_ok())
        .map(|(n, op)| (op.complete, *n))
        .collect();
    acked.sort();
    let mut stale = Vec::new();
    let mut phantoms = Vec::new();
    let mut reads = 0usize;
    for op in ops {
        let (OpKind::ListTenants, Outcome::Ok(OpResult::Tenants { names })) =
            (&op.kind, &op.outcome)
        else {
            continue;
        };
        reads += 1;
        let seen: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        let before = acked.partition_point(|(t, _)| *t < op.invoke);
        let missed: Vec<&str> = acked[..before]
            .iter()
            .map(|(_, n)| *n)
            .filter(|n| !seen.contains(n))
            .collect();
        if !missed.is_empty() {
            stale.push(format!(
                "stale read: {} lacks {} creates acknowledged before it was invoked, e.g. {}",
                describe(op),
                missed.len(),
                by_name
                    .get(missed[0])
                    .map(|c| describe(c))
                    .unwrap_or_default()
            ));
        }
        for name in &seen {
            if let Some(p) = phantom(&by_name, name, op.complete) {
                phantoms.push(format!("{}: {p}", describe(op)));
            }
        }
    }
    for f in finals {
        for name in f.names.iter().flatten() {
            if let Some(p) = phantom(&by_name, name, u64::MAX) {
                phantoms.push(format!("final state of node {}: {p}", f.node));
            }
        }
    }
    let dups: Vec<String> = by_name
        .values()
        .filter(|op| matches!(&op.outcome, Outcome::Failed(f) if f.status == Some(409)))
        .map(|op| format!("duplicate execution: {}", describe(op)))
        .collect();
    let counts = Counts {
        linearizability_violations: stale.len() + phantoms.len(),
        duplicate_executions: dups.len(),
        ..Counts::default()
    };
    let summary = format!(
        "{reads} list reads, {} creates: {} stale, {} phantom, {} duplicate executions",
        by_name.len(),
        stale.len(),
        phantoms.len(),
        dups.len()
    );
    if counts == Counts::default() {
        Check::pass("tenant reads and creates", summary)
    } else {
        let evidence = stale
            .into_iter()
            .take(10)
            .chain(phantoms.into_iter().take(10))
            .chain(dups.into_iter().take(10))
            .collect();
        Check::fail("tenant reads and creates", summary, evidence, counts)
    }
}

/// Why `name` should not be visible by `by`, if it should not.
fn phantom(by_name: &BTreeMap<&str, &Op>, name: &str, by: u64) -> Option<String> {
    match by_name.get(name) {
        None => Some(format!("{name} was never created")),
        Some(c) if c.invoke > by => Some(format!(
            "{name} is visible before its create was invoked: {}",
            describe(c)
        )),
        Some(c) => match &c.outcome {
            Outcome::Failed(f) if f.status != Some(409) => Some(format!(
                "{name} is visible although its create definitely failed: {}",
                describe(c)
            )),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Failure, UnknownCause};

    fn create(id: usize, name: &str, invoke: u64, complete: u64, outcome: Outcome) -> Op {
        Op {
            id,
            worker: 0,
            node: 1,
            kind: OpKind::CreateTenant { name: name.into() },
            invoke,
            complete,
            outcome,
        }
    }

    fn list(id: usize, invoke: u64, complete: u64, names: &[&str]) -> Op {
        Op {
            id,
            worker: 1,
            node: 2,
            kind: OpKind::ListTenants,
            invoke,
            complete,
            outcome: Outcome::Ok(OpResult::Tenants {
                names: names.iter().map(|s| s.to_string()).collect(),
            }),
        }
    }

    fn ok() -> Outcome {
        Outcome::Ok(OpResult::Written { revision: 1 })
    }

    fn all(names: &[&str]) -> Option<BTreeSet<String>> {
        Some(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn acknowledged_creates_must_be_on_every_node() {
        let ops = vec![
            create(0, "a", 0, 10, ok()),
            create(
                1,
                "b",
                0,
                10,
                Outcome::Unknown {
                    cause: UnknownCause::Timeout,
                    detail: String::new(),
                },
            ),
        ];
        let good = [
            NodeTenants {
                node: 1,
                names: all(&["a"]),
            },
            NodeTenants {
                node: 2,
                names: all(&["a", "b"]),
            },
        ];
        assert!(lost_writes(&ops, &good).passed);
        let bad = [NodeTenants {
            node: 3,
            names: all(&["b"]),
        }];
        let c = lost_writes(&ops, &bad);
        assert!(!c.passed);
        assert_eq!(c.counts.lost_writes, 1);
    }

    #[test]
    fn stale_and_phantom_reads_and_409s_are_caught() {
        let ops = vec![
            create(0, "a", 0, 10, ok()),
            list(1, 5, 8, &[]),      // concurrent: may miss a
            list(2, 20, 30, &["a"]), // fine
            create(3, "b", 40, 50, ok()),
            list(4, 60, 70, &["a"]),            // stale: misses b
            list(5, 80, 90, &["a", "b", "zz"]), // phantom zz
            create(
                6,
                "c",
                100,
                110,
                Outcome::Failed(Failure {
                    status: Some(409),
                    code: "already_exists".into(),
                    message: String::new(),
                }),
            ),
        ];
        let c = reads_and_duplicates(&ops, &[]);
        assert!(!c.passed);
        assert_eq!(c.counts.linearizability_violations, 2, "{c:?}");
        assert_eq!(c.counts.duplicate_executions, 1);
        let good = &ops[..3];
        assert!(reads_and_duplicates(good, &[]).passed);
    }
}
