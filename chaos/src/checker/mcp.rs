//! The MCP workload's checks: every MCP request answered (a result or a clear JSON-RPC error)
//! within its deadline, and the demo server's ledger against the answers: no
//! `counter_increment` executed twice, every one answered ok executed exactly once, none
//! answered "did not run" executed at all.
//!
//! The ledger is the file `mcpd demo-server` appends a JSON line to for each
//! `counter_increment` it runs (`MCPD_DEMO_LEDGER`), with the `mcpd/request-key` the client put
//! in the call's `_meta`; every call of the workload has its own key.

use std::collections::BTreeMap;
use std::time::Duration;

use super::availability::Impairment;
use super::{describe, short, Check, Counts};
use crate::history::{Failure, McpMethod, Op, OpKind, Outcome, Via};

/// One line of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// 1-based line number.
    pub line: usize,
    /// The call's `mcpd/request-key` (`None`: no key, or not a JSON line).
    pub key: Option<String>,
    /// The demo-server process that ran the call.
    pub pid: Option<u64>,
    pub raw: String,
}

/// Parses the ledger's text.
pub fn parse_ledger(text: &str) -> Vec<LedgerEntry> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: Option<serde_json::Value> = serde_json::from_str(l).ok();
            LedgerEntry {
                line: i + 1,
                key: v.as_ref().and_then(|v| v["key"].as_str()).map(String::from),
                pid: v.as_ref().and_then(|v| v["pid"].as_u64()),
                raw: l.to_string(),
            }
        })
        .collect()
}

/// JSON-RPC codes of the gateway that say the call did not run: unavailable (no process
/// could take it), queue full, and the protocol's own refusals.
const NOT_RUN_CODES: [&str; 5] = ["-32050", "-32051", "-32600", "-32601", "-32602"];

/// Whether a call that failed this way certainly did not run: a refused connection, an HTTP
/// refusal before dispatch (4xx, e.g. an unknown session), a gateway error that says so, or
/// a tool error (`counter_increment` reports one only when it did not count).
pub fn did_not_run(f: &Failure) -> bool {
    f.code == "connect"
        || f.code == "tool_error"
        || f.status.is_some_and(|s| (400..500).contains(&s))
        || NOT_RUN_CODES.contains(&f.code.as_str())
}

/// Whether the request got a clear answer: a result, or a JSON-RPC / HTTP error. A refused
/// connection is no answer (the node was not there), nor is a timeout or a lost connection.
pub fn answered(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Ok(_) => true,
        Outcome::Failed(f) => f.code != "connect",
        Outcome::Unknown { .. } => false,
    }
}

fn mcp_ops(ops: &[Op]) -> impl Iterator<Item = (&Op, Via, McpMethod, &str)> {
    ops.iter().filter_map(|op| match &op.kind {
        OpKind::McpCall { via, method, key } => Some((op, *via, *method, key.as_str())),
        _ => None,
    })
}

/// Every MCP request answered within `deadline` (the clients give up then and record a
/// timeout). A plain-HTTP request to a node the fault stopped, paused or cut off during the
/// request is excused: the client cannot know before sending, and moves to another node
/// after. Requests through `mcp-bridge` are never excused: the bridge fails over itself.
pub fn answered_within(ops: &[Op], impairments: &[Impairment], deadline: Duration) -> Check {
    let mut total = 0;
    let mut via_bridge = 0;
    let mut excused = 0;
    let mut bad: Vec<&Op> = Vec::new();
    let mut bad_bridge = 0;
    for (op, via, _, _) in mcp_ops(ops) {
        total += 1;
        if matches!(via, Via::Bridge(_)) {
            via_bridge += 1;
        }
        if answered(&op.outcome) {
            continue;
        }
        let impaired = impairments
            .iter()
            .any(|i| i.node == op.node && i.overlaps(op.invoke, op.complete));
        match via {
            Via::Http if impaired => excused += 1,
            Via::Http => bad.push(op),
            Via::Bridge(_) => {
                bad_bridge += 1;
                bad.push(op);
            }
        }
    }
    let summary = format!(
        "{total} MCP requests ({} plain HTTP, {via_bridge} through mcp-bridge), deadline {}s: {} unanswered ({bad_bridge} through the bridge), {excused} more sent straight to a node the fault stopped",
        total - via_bridge,
        deadline.as_secs(),
        bad.len()
    );
    const NAME: &str = "every MCP call answered";
    if bad.is_empty() {
        Check::pass(NAME, summary)
    } else {
        Check::fail(
            NAME,
            summary,
            bad.iter().take(12).map(|op| describe(op)).collect(),
            Counts {
                unanswered_calls: bad.len(),
                ..Counts::default()
            },
        )
    }
}

/// Ledger entries per key.
fn by_key(ledger: &[LedgerEntry]) -> BTreeMap<&str, Vec<&LedgerEntry>> {
    let mut m: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
    for e in ledger {
        if let Some(k) = &e.key {
            m.entry(k.as_str()).or_default().push(e);
        }
    }
    m
}

fn entries(es: &[&LedgerEntry]) -> String {
    es.iter()
        .map(|e| format!("line {} pid {}", e.line, e.pid.unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// No non-idempotent call executed twice: every key appears at most once in the ledger.
/// `duplicate_executions` counts the keys that appear more than once.
pub fn no_duplicates(ops: &[Op], ledger: &[LedgerEntry]) -> Check {
    let keys = by_key(ledger);
    let calls: BTreeMap<&str, Vec<&Op>> = mcp_ops(ops)
        .filter(|(_, _, m, _)| *m == McpMethod::Counter)
        .fold(BTreeMap::new(), |mut m, (op, _, _, key)| {
            m.entry(key).or_insert_with(Vec::new).push(op);
            m
        });
    let twice: Vec<(&str, &Vec<&LedgerEntry>)> = keys
        .iter()
        .filter(|(_, es)| es.len() > 1)
        .map(|(k, es)| (*k, es))
        .collect();
    let summary = format!(
        "{} counter_increment calls, {} ledger lines: {} keys executed more than once",
        calls.values().map(Vec::len).sum::<usize>(),
        ledger.len(),
        twice.len()
    );
    const NAME: &str = "no MCP call executed twice (ledger)";
    if twice.is_empty() {
        return Check::pass(NAME, summary);
    }
    let mut evidence = Vec::new();
    for (k, es) in twice.iter().take(8) {
        evidence.push(format!(
            "key {k} executed {} times ({})",
            es.len(),
            entries(es)
        ));
        for op in calls.get(k).into_iter().flatten() {
            evidence.push(format!("  {}", describe(op)));
        }
    }
    Check::fail(
        NAME,
        summary,
        evidence,
        Counts {
            duplicate_executions: twice.len(),
            ..Counts::default()
        },
    )
}

/// The answers agree with the ledger: every `counter_increment` answered ok appears exactly
/// once (a missing one is an acknowledged effect lost, counted in `lost_writes`), none
/// answered "did not run" appears, and every line carries a key some call sent.
pub fn answers_match(ops: &[Op], ledger: &[LedgerEntry]) -> Check {
    let keys = by_key(ledger);
    let mut ok = 0;
    let mut missing: Vec<&Op> = Vec::new();
    let mut not_run = 0;
    let mut ran_anyway: Vec<&Op> = Vec::new();
    let mut unsure = 0;
    let mut unsure_ran = 0;
    let mut sent: BTreeMap<&str, ()> = BTreeMap::new();
    for (op, _, method, key) in mcp_ops(ops) {
        if method != McpMethod::Counter {
            continue;
        }
        sent.insert(key, ());
        let n = keys.get(key).map_or(0, Vec::len);
        match &op.outcome {
            Outcome::Ok(_) => {
                ok += 1;
                if n == 0 {
                    missing.push(op);
                }
            }
            Outcome::Failed(f) if did_not_run(f) => {
                not_run += 1;
                if n > 0 {
                    ran_anyway.push(op);
                }
            }
            _ => {
                unsure += 1;
                if n > 0 {
                    unsure_ran += 1;
                }
            }
        }
    }
    let phantom: Vec<&LedgerEntry> = ledger
        .iter()
        .filter(|e| e.key.as_deref().is_none_or(|k| !sent.contains_key(k)))
        .collect();
    let summary = format!(
        "{ok} counter calls answered ok: {} missing from the ledger; {not_run} answered as not run: {} ran anyway; {unsure} failed with the effect unknown: {unsure_ran} ran; {} ledger lines with no key of ours",
        missing.len(),
        ran_anyway.len(),
        phantom.len()
    );
    const NAME: &str = "MCP answers match the ledger";
    if missing.is_empty() && ran_anyway.is_empty() && phantom.is_empty() {
        return Check::pass(NAME, summary);
    }
    let mut evidence = Vec::new();
    for op in missing.iter().take(6) {
        evidence.push(format!("answered ok, not in the ledger: {}", describe(op)));
    }
    for op in ran_anyway.iter().take(6) {
        let key = match &op.kind {
            OpKind::McpCall { key, .. } => key.as_str(),
            _ => "",
        };
        let es = keys.get(key).cloned().unwrap_or_default();
        evidence.push(format!(
            "answered as not run, but in the ledger ({}): {}",
            entries(&es),
            describe(op)
        ));
    }
    for e in phantom.iter().take(6) {
        evidence.push(format!(
            "ledger line {} has no key any call sent: {}",
            e.line,
            short(&e.raw, 160)
        ));
    }
    Check::fail(
        NAME,
        summary,
        evidence,
        Counts {
            lost_writes: missing.len(),
            ..Counts::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{OpResult, UnknownCause};

    fn call(id: usize, node: u64, via: Via, method: McpMethod, key: &str, outcome: Outcome) -> Op {
        Op {
            id,
            worker: 0,
            node,
            kind: OpKind::McpCall {
                via,
                method,
                key: key.into(),
            },
            invoke: 1_000,
            complete: 2_000,
            outcome,
        }
    }

    fn ok() -> Outcome {
        Outcome::Ok(OpResult::Answer { text: "1".into() })
    }

    fn timeout() -> Outcome {
        Outcome::Unknown {
            cause: UnknownCause::Timeout,
            detail: "no answer".into(),
        }
    }

    fn failed(status: Option<u16>, code: &str) -> Outcome {
        Outcome::Failed(Failure {
            status,
            code: code.into(),
            message: String::new(),
        })
    }

    fn ledger(keys: &[&str]) -> Vec<LedgerEntry> {
        parse_ledger(
            &keys
                .iter()
                .map(|k| format!("{{\"ts\":1,\"request_id\":3,\"pid\":42,\"key\":\"{k}\"}}\n"))
                .collect::<String>(),
        )
    }

    #[test]
    fn the_ledger_is_parsed_with_keys_and_pids() {
        let l = parse_ledger("{\"pid\":7,\"key\":\"a\"}\n\nnot json\n{\"pid\":8,\"key\":null}\n");
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].key.as_deref(), Some("a"));
        assert_eq!(l[0].pid, Some(7));
        assert_eq!(l[1].line, 3);
        assert_eq!(l[1].key, None);
        assert_eq!(l[2].key, None);
    }

    #[test]
    fn unanswered_http_calls_to_a_stopped_node_are_excused_bridge_calls_never() {
        let imp = [Impairment {
            node: 1,
            from: 0,
            to: Some(5_000),
            why: "killed".into(),
        }];
        let ops = [
            call(0, 1, Via::Http, McpMethod::Echo, "e0", timeout()),
            call(1, 2, Via::Http, McpMethod::Echo, "e1", ok()),
            call(
                2,
                2,
                Via::Http,
                McpMethod::Echo,
                "e2",
                failed(Some(200), "-32053"),
            ),
        ];
        let c = answered_within(&ops, &imp, Duration::from_secs(15));
        assert!(c.passed, "{c:?}");
        let ops = [
            call(0, 2, Via::Http, McpMethod::Echo, "e0", timeout()),
            call(1, 0, Via::Bridge(0), McpMethod::Counter, "k1", timeout()),
            call(
                2,
                1,
                Via::Http,
                McpMethod::Echo,
                "e2",
                failed(None, "connect"),
            ),
        ];
        let c = answered_within(&ops, &imp, Duration::from_secs(15));
        assert!(!c.passed);
        assert_eq!(c.counts.unanswered_calls, 2);
    }

    #[test]
    fn duplicates_in_the_ledger_are_counted_per_key() {
        let ops = [
            call(0, 1, Via::Http, McpMethod::Counter, "k0", ok()),
            call(
                1,
                0,
                Via::Bridge(1),
                McpMethod::Counter,
                "k1",
                failed(None, "-32053"),
            ),
        ];
        assert!(no_duplicates(&ops, &ledger(&["k0", "k1"])).passed);
        let c = no_duplicates(&ops, &ledger(&["k0", "k1", "k1", "k0", "k1"]));
        assert!(!c.passed);
        assert_eq!(c.counts.duplicate_executions, 2);
        assert!(
            c.evidence[0].contains("k0 executed 2 times"),
            "{:?}",
            c.evidence
        );
    }

    #[test]
    fn answers_must_match_the_ledger() {
        let ops = [
            call(0, 1, Via::Http, McpMethod::Counter, "k0", ok()),
            call(
                1,
                1,
                Via::Http,
                McpMethod::Counter,
                "k1",
                failed(Some(200), "-32050"),
            ),
            call(2, 0, Via::Bridge(0), McpMethod::Counter, "k2", timeout()),
            call(3, 0, Via::Bridge(0), McpMethod::Echo, "e3", ok()),
        ];
        // k2's effect is unknown: in the ledger or not, both are fine.
        assert!(answers_match(&ops, &ledger(&["k0", "k2"])).passed);
        assert!(answers_match(&ops, &ledger(&["k0"])).passed);
        let c = answers_match(&ops, &ledger(&[]));
        assert!(!c.passed);
        assert_eq!(c.counts.lost_writes, 1);
        let c = answers_match(&ops, &ledger(&["k0", "k1"]));
        assert!(!c.passed);
        assert!(c.evidence[0].contains("not run"), "{:?}", c.evidence);
        let c = answers_match(&ops, &ledger(&["k0", "zz"]));
        assert!(!c.passed);
        assert!(c.evidence[0].contains("no key"), "{:?}", c.evidence);
    }
}
