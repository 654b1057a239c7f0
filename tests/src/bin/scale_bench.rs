//! `scale-bench`: what a large registry costs a node. Creates `--objects` tenants in a 3-node
//! cluster (from `--clients` concurrent writers through every node), then prints each node's
//! resident memory and data directory, the memory per object (over the same node before the
//! writes), how long a follower takes to restart and be ready with everything applied, and
//! how long a new node takes to join (it receives the registry as a snapshot).
//!
//! The benchmark prints figures and asserts nothing about them.
//!
//! ```text
//! scale-bench [--objects 300000] [--clients 128]
//! ```

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use mcpcp_tests::bench::run_until_stopped;
use mcpcp_tests::write::{send, System};
use mcpcp_tests::Cluster;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "scale-bench",
    about = "Memory, disk, restart and join of a large registry"
)]
struct Args {
    /// Tenants to create.
    #[arg(long, default_value_t = 300_000)]
    objects: u64,
    /// Concurrent writers, spread over the nodes.
    #[arg(long, default_value_t = 128)]
    clients: u64,
    /// A flag for every mcpd, e.g. `--mcpd-arg=--snapshot-every=1000` (repeat).
    #[arg(long = "mcpd-arg", allow_hyphen_values = true)]
    mcpd_args: Vec<String>,
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// Bytes of the files under `dir`.
fn du(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Writes `n` tenants; a write whose answer was lost and that finds its tenant made counts.
async fn fill(cluster: &Cluster, n: u64, clients: u64) -> anyhow::Result<Duration> {
    let http = mcpcp_tests::https();
    let system = Arc::new(System::Mcpd {
        token: cluster.admin_token.clone(),
    });
    let urls: Arc<Vec<String>> =
        Arc::new(cluster.nodes.keys().map(|id| cluster.url(*id)).collect());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (http, system, urls, next) = (http.clone(), system.clone(), urls.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let url = &urls[(c as usize + seq as usize) % urls.len()];
                let mut tries = 0;
                loop {
                    match send(system.request(&http, url, seq)).await {
                        Ok(()) => break,
                        Err(e) if e.starts_with("409") => break,
                        Err(e) if tries < 5 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            let _ = e;
                        }
                        Err(e) => bail!("write {seq}: {e}"),
                    }
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

/// Waits until node `id` answers `/readyz` 200 and has applied the leader's revision.
async fn ready_with(cluster: &Cluster, id: u64, revision: u64) -> anyhow::Result<()> {
    let http = mcpcp_tests::https();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ready = http
            .get(format!("{}/readyz", cluster.url(id)))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ready {
            if let Ok(s) = cluster.node_client(id).cluster_status().await {
                if s.revision >= revision {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("node {id} not ready at revision {revision} within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let extra: Vec<&str> = args.mcpd_args.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start_with(3, &extra).await;
    let leader = cluster.wait_leader().await;
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    let pid = |c: &Cluster, id: u64| c.nodes[&id].pid().context("running");
    let before: Vec<u64> = ids
        .iter()
        .map(|id| rss(pid(&cluster, *id)?))
        .collect::<anyhow::Result<_>>()?;
    eprintln!(
        "writing {} tenants from {} clients",
        args.objects, args.clients
    );
    let took = fill(&cluster, args.objects, args.clients).await?;
    let revision = cluster.node_client(leader).cluster_status().await?.revision;
    for id in &ids {
        ready_with(&cluster, *id, revision).await?;
    }
    println!(
        "{} objects written in {:.1} s ({:.0}/s); revision {revision}",
        args.objects,
        took.as_secs_f64(),
        args.objects as f64 / took.as_secs_f64()
    );
    println!(
        "{:<6} {:>10} {:>10} {:>12} {:>10}",
        "node", "rss MiB", "before", "B/object", "data MiB"
    );
    let mut rows = Vec::new();
    for (id, base) in ids.iter().zip(&before) {
        let now = rss(pid(&cluster, *id)?)?;
        let data = du(&cluster.nodes[id].data_dir);
        let per = now.saturating_sub(*base) as f64 / args.objects as f64;
        println!(
            "{id:<6} {:>10.1} {:>10.1} {per:>12.0} {:>10.1}",
            mib(now),
            mib(*base),
            mib(data)
        );
        rows.push(
            json!({"node": id, "rss_bytes": now, "rss_before_bytes": base,
                         "rss_bytes_per_object": per.round(), "data_bytes": data}),
        );
    }

    // A follower restarts: its snapshot loaded, its log re-applied, ready.
    let follower = cluster.other_than(leader);
    cluster.kill(follower).await;
    let t = Instant::now();
    cluster.restart(follower).await;
    ready_with(&cluster, follower, revision).await?;
    let restart = t.elapsed();
    let restarted_rss = rss(pid(&cluster, follower)?)?;
    println!(
        "restart of node {follower} to ready with revision {revision}: {:.2} s; then {:.1} MiB RSS ({:.0} B/object over a node before the writes)",
        restart.as_secs_f64(),
        mib(restarted_rss),
        restarted_rss.saturating_sub(before[0]) as f64 / args.objects as f64
    );

    // A new node joins: the leader sends it the registry as a snapshot.
    let t = Instant::now();
    let member = cluster.spawn(4).await;
    cluster.add_member(&member).await;
    ready_with(&cluster, 4, revision).await?;
    let join = t.elapsed();
    let joined_rss = rss(pid(&cluster, 4)?)?;
    println!(
        "a new node joins and is ready with revision {revision}: {:.2} s; then {:.1} MiB RSS",
        join.as_secs_f64(),
        mib(joined_rss)
    );
    println!(
        "{}",
        json!({"scale": {"objects": args.objects, "write_seconds": took.as_secs_f64(), "nodes": rows,
                          "restart_seconds": restart.as_secs_f64(), "restarted_rss_bytes": restarted_rss,
                          "join_seconds": join.as_secs_f64(), "joined_rss_bytes": joined_rss}})
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    run_until_stopped("scale-bench", run(Args::parse())).await
}
