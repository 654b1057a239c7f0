//! What a run prints: a table per scenario (the fault, the operations' outcomes, every
//! checker's verdict with its evidence on failure, the recovery figures), a summary table, and
//! as the last line a JSON summary for machines.

use std::fmt::Write as _;

use crate::checker::Counts;
use crate::history::{Latency, Tally};
use crate::scenario::{ScenarioOutcome, ScenarioReport};

fn ms(v: Option<u64>) -> String {
    v.map(|v| format!("{v} ms"))
        .unwrap_or_else(|| "none".into())
}

fn latency(l: &Latency) -> String {
    format!("p50 {} ms, p99 {} ms, max {} ms", l.p50, l.p99, l.max)
}

fn tally(t: &Tally) -> String {
    format!("{} ok, {} failed, {} unknown", t.ok, t.failed, t.unknown)
}

/// Renders rows as an ASCII table with a header.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::from("|");
        for (i, c) in cells.iter().enumerate().take(cols) {
            let pad = width[i] - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s
    };
    let sep = format!(
        "+{}+",
        width
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
    );
    let mut out = vec![
        sep.clone(),
        line(header.iter().map(|h| h.to_string()).collect()),
        sep.clone(),
    ];
    for r in rows {
        out.push(line(r.clone()));
    }
    out.push(sep);
    out.join("\n")
}

/// The table of one scenario.
pub fn scenario(r: &ScenarioReport, total: usize) -> String {
    let title = format!(
        "scenario {}/{total}: {} (scenario seed {})",
        r.index + 1,
        r.fault.name(),
        r.seed
    );
    match &r.outcome {
        ScenarioOutcome::Skipped(why) => format!("{title}\n  SKIPPED: {why}\n"),
        ScenarioOutcome::Error { message, logs } => {
            let mut s = format!("{title}\n  ERROR: {message}\n");
            for l in logs {
                let _ = writeln!(s, "{l}");
            }
            s
        }
        ScenarioOutcome::Ran(ran) => {
            let mut rows = vec![
                vec!["fault".into(), ran.description.clone()],
                vec!["workload".into(), ran.workload.clone()],
                vec!["registry ops".into(), tally(&ran.tally)],
                vec!["writes".into(), tally(&ran.writes)],
                vec!["ok write latency".into(), latency(&ran.write_latency)],
                vec!["ok read latency".into(), latency(&ran.read_latency)],
            ];
            for f in &ran.others {
                for (k, v) in &f.rows {
                    rows.push(vec![k.clone(), v.clone()]);
                }
            }
            rows.extend([
                vec!["leader recovery".into(), ms(ran.recovery.leader_ms)],
                vec!["writes ok again".into(), ms(ran.recovery.writes_ms)],
                vec![
                    "longest write pause".into(),
                    format!("{} ms", ran.recovery.longest_pause_ms),
                ],
                vec![
                    "duration".into(),
                    format!("{:.1} s", ran.duration.as_secs_f64()),
                ],
            ]);
            for c in &ran.checks {
                rows.push(vec![
                    format!("{} {}", if c.passed { "PASS" } else { "FAIL" }, c.name),
                    c.summary.clone(),
                ]);
            }
            let mut s = format!("{title}\n{}\n", table(&["item", "value"], &rows));
            for c in ran.checks.iter().filter(|c| !c.passed) {
                let _ = writeln!(s, "  evidence for FAIL {}:", c.name);
                for e in &c.evidence {
                    let _ = writeln!(s, "    {e}");
                }
            }
            for n in &ran.notes {
                let _ = writeln!(s, "  note: {n}");
            }
            s
        }
    }
}

/// The totals of a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub scenarios: usize,
    pub passed: usize,
    pub skipped: usize,
    pub counts: Counts,
    pub max_leader_recovery_ms: Option<u64>,
    /// MCP tool calls made (every scenario's MCP workload).
    pub mcp_calls: usize,
    pub seed: u64,
}

impl Summary {
    pub fn of(reports: &[ScenarioReport], seed: u64) -> Summary {
        let mut s = Summary {
            seed,
            ..Summary::default()
        };
        for r in reports {
            if r.skipped() {
                s.skipped += 1;
                continue;
            }
            s.scenarios += 1;
            if r.passed() {
                s.passed += 1;
            }
            if let ScenarioOutcome::Ran(ran) = &r.outcome {
                for c in &ran.checks {
                    s.counts.add(&c.counts);
                }
                s.mcp_calls += ran
                    .others
                    .iter()
                    .filter(|f| f.workload == "mcp")
                    .map(|f| f.tally.ok + f.tally.failed + f.tally.unknown)
                    .sum::<usize>();
                if let Some(l) = ran.recovery.leader_ms {
                    s.max_leader_recovery_ms = Some(s.max_leader_recovery_ms.unwrap_or(0).max(l));
                }
            }
        }
        s
    }

    /// Whether the run passed: something ran and everything that ran passed.
    pub fn ok(&self) -> bool {
        self.scenarios > 0 && self.passed == self.scenarios
    }

    /// The JSON summary line (keys in a fixed order).
    pub fn json(&self) -> String {
        format!(
            "{{\"scenarios\":{},\"passed\":{},\"lost_writes\":{},\"linearizability_violations\":{},\"duplicate_executions\":{},\"unanswered_calls\":{},\"max_leader_recovery_ms\":{},\"leader_conflicts\":{},\"mcp_calls\":{},\"skipped\":{},\"seed\":{}}}",
            self.scenarios,
            self.passed,
            self.counts.lost_writes,
            self.counts.linearizability_violations,
            self.counts.duplicate_executions,
            self.counts.unanswered_calls,
            self.max_leader_recovery_ms
                .map(|v| v.to_string())
                .unwrap_or_else(|| "null".into()),
            self.counts.leader_conflicts,
            self.mcp_calls,
            self.skipped,
            self.seed
        )
    }
}

/// One line per scenario.
pub fn summary_table(reports: &[ScenarioReport]) -> String {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            let (ops, mcp, leader, writes, pause, verdict) = match &r.outcome {
                ScenarioOutcome::Ran(ran) => (
                    tally(&ran.tally),
                    ran.others
                        .iter()
                        .find(|f| f.workload == "mcp")
                        .map(|f| tally(&f.tally))
                        .unwrap_or_else(|| "-".into()),
                    ms(ran.recovery.leader_ms),
                    ms(ran.recovery.writes_ms),
                    format!("{} ms", ran.recovery.longest_pause_ms),
                    if r.passed() {
                        "PASS".to_string()
                    } else {
                        format!(
                            "FAIL ({})",
                            ran.checks
                                .iter()
                                .filter(|c| !c.passed)
                                .map(|c| c.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                ),
                ScenarioOutcome::Skipped(_) => (
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "SKIPPED".into(),
                ),
                ScenarioOutcome::Error { .. } => (
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "ERROR".into(),
                ),
            };
            vec![
                format!("{}", r.index + 1),
                r.fault.name().to_string(),
                ops,
                mcp,
                leader,
                writes,
                pause,
                verdict,
            ]
        })
        .collect();
    table(
        &[
            "#",
            "scenario",
            "registry ops",
            "mcp calls",
            "new leader",
            "writes ok",
            "longest pause",
            "verdict",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_keys_in_order() {
        let s = Summary {
            scenarios: 4,
            passed: 4,
            max_leader_recovery_ms: Some(1200),
            seed: 7,
            ..Summary::default()
        };
        let j = s.json();
        assert!(j.starts_with("{\"scenarios\":4,\"passed\":4,\"lost_writes\":0,"));
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["max_leader_recovery_ms"], 1200);
        assert!(s.ok());
    }

    #[test]
    fn tables_are_aligned() {
        let t = table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        let widths: Vec<usize> = t.lines().map(|l| l.len()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{t}");
    }
}
