//! `chaos`: fault injection under load against real `mcpd` processes, with history checkers.
//!
//! `chaos run --profile smoke|full [--seed N] [--nodes 3] [--mcpd PATH] [--keep]` runs one
//! scenario per fault, each on a fresh cluster, under two workloads (the registry's clients,
//! and MCP clients calling the demo server over plain HTTP and through `mcp-bridge`), and
//! prints a table per scenario and a JSON summary as the last line; it exits non-zero when a
//! checker fails. `chaos self-test` runs the checkers on histories whose verdict is known.
//!
//! As root with a working `ip netns`, every node runs in its own network namespace on a bridge
//! the harness creates; otherwise nodes run on 127.0.0.1 and the network faults are skipped.
//! Everything the harness creates is removed at the end, on Ctrl-C/SIGTERM, and (for runs whose
//! harness died) at the start of the next run.

mod checker;
mod cluster;
mod faults;
mod history;
mod janitor;
mod mcp;
mod mcpload;
mod netns;
mod poll;
mod report;
mod sampler;
mod scenario;
mod selftest;
mod sys;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use crate::cluster::{NodeConfig, Placement};
use crate::faults::{Fault, Profile};
use crate::janitor::{CleanupGuard, Janitor};
use crate::mcpload::{McpConfig, McpLoad};
use crate::report::Summary;
use crate::scenario::{RunEnv, ScenarioReport, Timings};
use crate::workload::RegistryLoad;

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    version,
    about = "Fault injection under load with history checkers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the scenarios of a profile against real mcpd processes.
    Run(RunArgs),
    /// Check the checkers on histories whose verdict is known.
    SelfTest,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// smoke: kill leader, kill follower, pause leader, partition leader, rotate certificates;
    /// full: every fault.
    #[arg(long, value_enum, default_value = "smoke")]
    profile: Profile,
    /// Seed of every random choice (victims, workload); printed by every run to replay it.
    #[arg(long)]
    seed: Option<u64>,
    /// Voters per cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=9))]
    nodes: u64,
    /// The mcpd binary (default: $MCPD_BIN, else `mcpd` next to this binary).
    #[arg(long)]
    mcpd: Option<PathBuf>,
    /// The mcp-bridge binary of the MCP workload (default: $MCP_BRIDGE_BIN, else
    /// `mcp-bridge` next to this binary).
    #[arg(long)]
    bridge: Option<PathBuf>,
    /// Run the registry workload only (no MCP clients, no demo server).
    #[arg(long)]
    no_mcp: bool,
    /// Keep the run directory (node logs and data) after the run.
    #[arg(long)]
    keep: bool,
    /// Run only these scenarios (comma-separated names, e.g. `kill-leader,netem`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run nodes on 127.0.0.1 even when namespaces are available.
    #[arg(long)]
    no_netns: bool,
    /// Make the workload read with `?consistency=stale`: a deliberate bug, to see the checkers
    /// catch stale reads (run it with a partition; the run is expected to FAIL).
    #[arg(long)]
    stale_reads: bool,
    /// Seconds a fault is held under load.
    #[arg(long, default_value_t = 8)]
    hold_secs: u64,
}

/// A workspace binary: `arg`, else `$<var>`, else `name` next to this binary.
fn binary_path(arg: Option<PathBuf>, name: &str, var: &str, flag: &str) -> anyhow::Result<PathBuf> {
    let path = match arg {
        Some(p) => p,
        None => match std::env::var_os(var) {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe()
                .context("locating the chaos binary")?
                .parent()
                .context("the chaos binary has no directory")?
                .join(name),
        },
    };
    if !path.is_file() {
        bail!(
            "{name} not found at {} (build it with `cargo build -p {name}`, or pass {flag} / set {var})",
            path.display()
        );
    }
    path.canonicalize()
        .with_context(|| format!("resolving {}", path.display()))
}

fn self_test() -> anyhow::Result<bool> {
    let cases = selftest::cases();
    let mut wrong = 0;
    for c in &cases {
        let verdict = if c.check.passed { "PASS" } else { "FAIL" };
        let expected = if c.expect_pass { "PASS" } else { "FAIL" };
        let mark = if c.judged_right() { "ok " } else { "WRONG" };
        println!(
            "{mark} {:<75} checker says {verdict}, expected {expected} ({} ms)",
            c.name, c.millis
        );
        if !c.check.passed {
            println!("      {}", c.check.summary);
            for e in c.check.evidence.iter().take(6) {
                println!("      {e}");
            }
        }
        if !c.judged_right() {
            wrong += 1;
        }
    }
    println!(
        "self-test: {} cases, {} judged right, {wrong} misjudged",
        cases.len(),
        cases.len() - wrong
    );
    Ok(wrong == 0)
}

async fn run(args: RunArgs, janitor: Janitor) -> anyhow::Result<bool> {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    println!(
        "chaos run: profile {:?}, seed {seed} (replay with --seed {seed}), {} nodes, run {} in {}",
        args.profile,
        args.nodes,
        janitor.run_id(),
        janitor.dir().display()
    );
    let mcpd = binary_path(args.mcpd.clone(), "mcpd", "MCPD_BIN", "--mcpd")?;
    let mcp = if args.no_mcp {
        None
    } else {
        Some(McpConfig {
            mcpd: mcpd.clone(),
            bridge: binary_path(
                args.bridge.clone(),
                "mcp-bridge",
                "MCP_BRIDGE_BIN",
                "--bridge",
            )?,
            load: McpLoad::default(),
        })
    };
    let reason = if args.no_netns {
        Some("--no-netns".to_string())
    } else {
        netns::unavailable_reason(&janitor)
    };
    let placement =
        match reason {
            None => {
                let net = netns::Network::create(&janitor).context("creating the test network")?;
                println!(
                "network: a namespace per node on bridge subnet {} (harness at {}), firewall: {}",
                net.subnet(),
                net.bridge_ip(),
                net.firewall().map(|f| f.name()).unwrap_or("none (partitions skipped)")
            );
                Placement::Netns(net)
            }
            Some(why) => {
                println!(
                    "network: nodes on 127.0.0.1 ({why}); faults that need namespaces are skipped"
                );
                Placement::Loopback
            }
        };
    let mut faults = args.profile.faults();
    if !args.only.is_empty() {
        let mut chosen = Vec::new();
        for name in &args.only {
            match Fault::by_name(name) {
                Some(f) => chosen.push(f),
                None => bail!(
                    "unknown scenario {name:?}; known: {}",
                    Fault::ALL.map(|f| f.name()).join(", ")
                ),
            }
        }
        faults = chosen;
    }
    let env = RunEnv {
        janitor: janitor.clone(),
        placement,
        node: NodeConfig {
            mcpd,
            quorum_wait_ms: 2_000,
            snapshot_every: 500,
        },
        nodes: args.nodes,
        timings: Timings {
            hold: Duration::from_secs(args.hold_secs),
            ..Timings::default()
        },
        load: RegistryLoad {
            stale_reads: args.stale_reads,
            ..RegistryLoad::default()
        },
        mcp,
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut reports: Vec<ScenarioReport> = Vec::new();
    let total = faults.len();
    for (i, fault) in faults.into_iter().enumerate() {
        let scenario_seed = rng.u64(..);
        println!("\n--- scenario {}/{total}: {} ...", i + 1, fault.name());
        let r = scenario::run(&env, i, fault, scenario_seed).await;
        println!("{}", report::scenario(&r, total));
        reports.push(r);
    }
    let summary = Summary::of(&reports, seed);
    println!("{}", report::summary_table(&reports));
    println!(
        "{} of {} scenarios passed, {} skipped; seed {seed}",
        summary.passed, summary.scenarios, summary.skipped
    );
    println!("{}", summary.json());
    Ok(summary.ok())
}

/// Resolves when the process gets SIGINT or SIGTERM, with the signal's name and number.
async fn interrupted() -> (&'static str, i32) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return ("SIGINT", 2);
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => ("SIGINT", 2),
        _ = term.recv() => ("SIGTERM", 15),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before any thread starts: the admin client must never go through a proxy, since every
    // node is on loopback or on the harness's own subnet.
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        std::env::remove_var(var);
    }
    let ok = match cli.command {
        Cmd::SelfTest => self_test()?,
        Cmd::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let base = janitor::base_dir();
            let janitor =
                Janitor::create(&base, args.keep).context("creating the run directory")?;
            for line in janitor::sweep_leftovers(&base, janitor.run_id()) {
                println!("leftover: {line}");
            }
            let guard = CleanupGuard(janitor.clone());
            let outcome = runtime.block_on(async {
                tokio::select! {
                    r = run(args, janitor.clone()) => Ok(r),
                    (name, number) = interrupted() => {
                        eprintln!("chaos: {name}: stopping nodes and removing namespaces, links and mounts");
                        Err(number)
                    }
                }
            });
            // Processes, namespaces, links, mounts, directory: on every way out.
            drop(guard);
            drop(runtime);
            match outcome {
                Ok(r) => r?,
                // The shell's convention: 128 + the signal's number.
                Err(signal) => std::process::exit(128 + signal),
            }
        }
    };
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
