//! The faults, one per scenario: what each does to the cluster, how it is healed, which nodes
//! it hits, and what it needs from the machine. Victims are chosen with the scenario's seeded
//! random generator, so `--seed` replays the same choices.
//!
//! A fault is injected, held for the scenario's hold time under load, then healed. Faults that
//! are a sequence of actions (rolling restart, replacing a node, a membership change) run the
//! whole sequence as their injection; killing every node kills at injection and restarts at
//! healing, so the hold time is the outage.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::checker::availability::Impairment;
use crate::cluster::{Cluster, ClusterError, Placement};
use crate::history::{Clock, Micros};
use crate::netns::NetError;
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The fault cannot run on this machine; the scenario is skipped.
    #[error("skipped: {0}")]
    Skip(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{0}")]
    Other(String),
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillLeader,
    KillFollower,
    PauseLeader,
    PartitionLeader,
    PartitionMajority,
    Netem,
    KillAllRestart,
    RollingRestart,
    WipeReplace,
    MembershipChange,
    DiskFull,
    RotateCerts,
}

/// Which faults a profile runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Kill the leader, kill a follower, pause the leader, partition the leader (with
    /// namespaces), rotate every node's certificates.
    Smoke,
    /// Every fault.
    Full,
}

impl Profile {
    pub fn faults(self) -> Vec<Fault> {
        match self {
            Profile::Smoke => vec![
                Fault::KillLeader,
                Fault::KillFollower,
                Fault::PauseLeader,
                Fault::PartitionLeader,
                Fault::RotateCerts,
            ],
            Profile::Full => Fault::ALL.to_vec(),
        }
    }
}

impl Fault {
    pub const ALL: [Fault; 12] = [
        Fault::KillLeader,
        Fault::KillFollower,
        Fault::PauseLeader,
        Fault::PartitionLeader,
        Fault::PartitionMajority,
        Fault::Netem,
        Fault::KillAllRestart,
        Fault::RollingRestart,
        Fault::WipeReplace,
        Fault::MembershipChange,
        Fault::DiskFull,
        Fault::RotateCerts,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillFollower => "kill-follower",
            Fault::PauseLeader => "pause-leader",
            Fault::PartitionLeader => "partition-leader",
            Fault::PartitionMajority => "partition-2-1",
            Fault::Netem => "netem",
            Fault::KillAllRestart => "kill-all-restart",
            Fault::RollingRestart => "rolling-restart",
            Fault::WipeReplace => "wipe-replace",
            Fault::MembershipChange => "membership-change",
            Fault::DiskFull => "disk-full",
            Fault::RotateCerts => "rotate-certs",
        }
    }

    pub fn by_name(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether the fault needs each node in its own network namespace.
    pub fn needs_netns(self) -> bool {
        matches!(
            self,
            Fault::PartitionLeader | Fault::PartitionMajority | Fault::Netem
        )
    }
}

/// What to undo at healing.
#[derive(Debug, Clone)]
enum Undo {
    Nothing,
    Restart(Vec<u64>),
    Resume(u64),
    HealNetwork,
    DiskFull {
        node: u64,
        data: PathBuf,
        saved: PathBuf,
        ballast: PathBuf,
    },
}

/// An injected fault.
#[derive(Debug, Clone)]
pub struct Injected {
    /// What was done, for the report.
    pub description: String,
    /// Nodes the fault hit.
    pub victims: Vec<u64>,
    /// Whether the fault removed or cut off the leader.
    pub disrupts_leader: bool,
    /// Stretches in which calls to a node may go unanswered.
    pub impairments: Vec<Impairment>,
    /// Nodes whose process may exit on its own because of the fault.
    pub may_crash: Vec<u64>,
    pub notes: Vec<String>,
    undo: Undo,
}

impl Injected {
    fn new(description: String, victims: Vec<u64>, disrupts_leader: bool, undo: Undo) -> Self {
        Injected {
            description,
            victims,
            disrupts_leader,
            impairments: Vec::new(),
            may_crash: Vec::new(),
            notes: Vec::new(),
            undo,
        }
    }

    fn impair(&mut self, node: u64, from: Micros, why: &str) {
        self.impairments.push(Impairment {
            node,
            from,
            to: None,
            why: why.to_string(),
        });
    }

    fn close_impairments(&mut self, node: Option<u64>, at: Micros) {
        for i in &mut self.impairments {
            if i.to.is_none() && node.is_none_or(|n| n == i.node) {
                i.to = Some(at);
            }
        }
    }
}

/// What a fault needs besides the cluster.
pub struct FaultEnv<'a> {
    pub rng: &'a mut fastrand::Rng,
    pub clock: Clock,
}

fn network(cluster: &Cluster) -> Result<crate::netns::Network, FaultError> {
    match cluster.placement() {
        Placement::Netns(net) => Ok(net.clone()),
        Placement::Loopback => Err(FaultError::Skip(
            "needs network namespaces (root and `ip netns`)".into(),
        )),
    }
}

fn pick(rng: &mut fastrand::Rng, from: &[u64]) -> Result<u64, FaultError> {
    if from.is_empty() {
        return Err(FaultError::Other("no node to pick from".into()));
    }
    Ok(from[rng.usize(..from.len())])
}

/// How long a node may take to stop on SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Fault {
    /// Injects the fault into `cluster`, whose current leader is `leader`.
    pub async fn inject(
        self,
        cluster: &mut Cluster,
        leader: u64,
        env: FaultEnv<'_>,
    ) -> Result<Injected, FaultError> {
        let clock = env.clock;
        let members = cluster.members();
        let followers: Vec<u64> = members.iter().copied().filter(|m| *m != leader).collect();
        match self {
            Fault::KillLeader => {
                let mut inj = Injected::new(
                    format!("kill -9 the leader (node {leader})"),
                    vec![leader],
                    true,
                    Undo::Restart(vec![leader]),
                );
                inj.impair(leader, clock.now(), "killed");
                cluster.kill(leader).await?;
                Ok(inj)
            }
            Fault::KillFollower => {
                let v = pick(env.rng, &followers)?;
                let mut inj = Injected::new(
                    format!("kill -9 a follower (node {v})"),
                    vec![v],
                    false,
                    Undo::Restart(vec![v]),
                );
                inj.impair(v, clock.now(), "killed");
                cluster.kill(v).await?;
                Ok(inj)
            }
            Fault::PauseLeader => {
                let mut inj = Injected::new(
                    format!("SIGSTOP the leader (node {leader})"),
                    vec![leader],
                    true,
                    Undo::Resume(leader),
                );
                inj.impair(leader, clock.now(), "paused");
                if !cluster.pause(leader)? {
                    return Err(FaultError::Other(format!(
                        "could not SIGSTOP node {leader}"
                    )));
                }
                Ok(inj)
            }
            Fault::PartitionLeader => {
                let net = network(cluster)?;
                net.partition(&[vec![leader], followers.clone()])?;
                Ok(Injected::new(
                    format!(
                        "isolate the leader (node {leader}) from {followers:?} with {} DROP rules",
                        net.firewall().map(|f| f.name()).unwrap_or("?")
                    ),
                    vec![leader],
                    true,
                    Undo::HealNetwork,
                ))
            }
            Fault::PartitionMajority => {
                let net = network(cluster)?;
                let mut shuffled = members.clone();
                env.rng.shuffle(&mut shuffled);
                let minority_len = (members.len().saturating_sub(1)) / 2;
                let (minority, majority) = shuffled.split_at(minority_len.max(1));
                net.partition(&[minority.to_vec(), majority.to_vec()])?;
                Ok(Injected::new(
                    format!(
                        "partition {}|{}: {majority:?} | {minority:?} (leader was {leader})",
                        majority.len(),
                        minority.len()
                    ),
                    minority.to_vec(),
                    minority.contains(&leader),
                    Undo::HealNetwork,
                ))
            }
            Fault::Netem => {
                let net = network(cluster)?;
                let v = pick(env.rng, &members)?;
                let applied = net.degrade(v)?;
                let mut inj = Injected::new(
                    format!("degrade node {v}'s link"),
                    vec![v],
                    false,
                    Undo::HealNetwork,
                );
                inj.notes.push(applied);
                // Lost packets can stall a call past the client's timeout.
                inj.impair(v, clock.now(), "lossy link");
                Ok(inj)
            }
            Fault::KillAllRestart => {
                let mut inj = Injected::new(
                    format!("kill -9 every node {members:?}, restart them after the hold"),
                    members.clone(),
                    true,
                    Undo::Restart(members.clone()),
                );
                // The leader after the restart is a new one: any node counts.
                inj.victims.clear();
                for m in &members {
                    inj.impair(*m, clock.now(), "killed");
                    cluster.kill(*m).await?;
                }
                Ok(inj)
            }
            Fault::RollingRestart => {
                let mut inj = Injected::new(
                    format!("rolling restart (SIGTERM, start, catch up) of {members:?}"),
                    members.clone(),
                    false,
                    Undo::Nothing,
                );
                for m in &members {
                    inj.impair(*m, clock.now(), "restarting");
                    let clean = cluster.stop(*m, STOP_GRACE).await?;
                    if !clean {
                        inj.notes.push(format!(
                            "node {m} did not stop within {STOP_GRACE:?} of SIGTERM"
                        ));
                    }
                    cluster.spawn(*m).await?;
                    wait_caught_up(cluster, *m, Duration::from_secs(30)).await?;
                    inj.close_impairments(Some(*m), clock.now());
                }
                Ok(inj)
            }
            Fault::WipeReplace => {
                let v = pick(env.rng, &followers)?;
                let mut inj = Injected::new(String::new(), vec![v], false, Undo::Nothing);
                inj.impair(v, clock.now(), "killed and wiped");
                cluster.kill(v).await?;
                cluster.wipe(v)?;
                cluster.remove_member(v).await?;
                let new = cluster.allocate_id();
                cluster.spawn(new).await?;
                cluster.add_member(new).await?;
                inj.description = format!(
                    "kill -9 follower {v}, wipe its data, remove-node {v}, start node {new} and add-node {new}"
                );
                Ok(inj)
            }
            Fault::MembershipChange => {
                let new = cluster.allocate_id();
                cluster.spawn(new).await?;
                cluster.add_member(new).await?;
                let r = pick(env.rng, &members)?;
                let mut inj = Injected::new(
                    format!("add-node {new}, then remove-node {r} (leader was {leader})"),
                    vec![r],
                    r == leader,
                    Undo::Nothing,
                );
                cluster.remove_member(r).await?;
                inj.impair(r, clock.now(), "removed");
                cluster.stop(r, STOP_GRACE).await?;
                Ok(inj)
            }
            Fault::DiskFull => {
                let v = pick(env.rng, &members)?;
                disk_full(cluster, v, leader, clock).await
            }
            Fault::RotateCerts => {
                // What `mcpctl cluster rotate-certs` does, three times over, under the load:
                // every member takes new peer and HTTPS certificates in place.
                for _ in 0..3 {
                    for m in &members {
                        cluster
                            .client_of(*m, Duration::from_secs(10))?
                            .rotate_certs()
                            .await
                            .map_err(|e| {
                                FaultError::Other(format!("rotating node {m}'s certificates: {e}"))
                            })?;
                    }
                }
                Ok(Injected::new(
                    format!("rotate every member's certificates three times ({members:?})"),
                    Vec::new(),
                    false,
                    Undo::Nothing,
                ))
            }
        }
    }

    /// Undoes the fault; afterwards every member's process runs.
    pub async fn heal(
        self,
        cluster: &mut Cluster,
        inj: &mut Injected,
        clock: Clock,
    ) -> Result<(), FaultError> {
        match inj.undo.clone() {
            Undo::Nothing => {}
            Undo::Restart(ids) => {
                for id in ids {
                    cluster.spawn(id).await?;
                }
            }
            Undo::Resume(id) => cluster.resume(id)?,
            Undo::HealNetwork => {
                let net = network(cluster)?;
                let problems = net.heal_all();
                if !problems.is_empty() {
                    return Err(FaultError::Other(problems.join("; ")));
                }
            }
            Undo::DiskFull {
                node,
                data,
                saved,
                ballast,
            } => {
                let log = cluster.node(node)?.log.clone();
                let enospc = count_lines(&log, &["No space left", "os error 28", "StorageFull"]);
                inj.notes.push(format!(
                    "node {node}'s log has {enospc} lines about a full disk by the time of healing"
                ));
                // Stopped again to move its data back (closed below, once it runs).
                inj.impair(node, clock.now(), "restarting on its own disk");
                cluster.kill(node).await?;
                let _ = std::fs::remove_file(&ballast);
                copy_dir(&data, &saved)
                    .map_err(|e| FaultError::Other(format!("saving the tmpfs data: {e}")))?;
                unmount(&data)?;
                cluster.untrack_mount(&data);
                clear_dir(&data)
                    .map_err(|e| FaultError::Other(format!("clearing {}: {e}", data.display())))?;
                copy_dir(&saved, &data)
                    .map_err(|e| FaultError::Other(format!("restoring the data: {e}")))?;
                let _ = std::fs::remove_dir_all(&saved);
                cluster.spawn(node).await?;
            }
        }
        inj.close_impairments(None, clock.now());
        Ok(())
    }
}

/// Waits until node `id` has applied what the leader had committed when it was asked.
async fn wait_caught_up(cluster: &Cluster, id: u64, within: Duration) -> Result<(), FaultError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(leader) = cluster.agreed_leader().await {
            if let (Ok(ls), Ok(ns)) = (cluster.status(leader).await, cluster.status(id).await) {
                if let (Some(c), Some(a)) = (ls.committed_index, ns.applied_index) {
                    if a >= c {
                        return Ok(());
                    }
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(FaultError::Other(format!(
                "node {id} did not catch up with the leader within {within:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Moves node `v`'s data onto a tmpfs only slightly larger than the data, and restarts it.
async fn disk_full(
    cluster: &mut Cluster,
    v: u64,
    leader: u64,
    clock: Clock,
) -> Result<Injected, FaultError> {
    if !sys::is_root() || sys::which("mount").is_none() {
        return Err(FaultError::Skip(
            "mounting a tmpfs needs root and `mount`".into(),
        ));
    }
    let node = cluster.node(v)?.clone();
    let data = node.data_dir.clone();
    let saved = node.dir.join("data.saved");
    // From the kill on, until it runs again on the small disk.
    let stopped_at = clock.now();
    cluster.kill(v).await?;
    let used = dir_size(&data);
    // Room for a few hundred more log entries, then ENOSPC.
    let size_kib = used / 1024 + 256;
    let _ = std::fs::remove_dir_all(&saved);
    copy_dir(&data, &saved).map_err(|e| FaultError::Other(format!("saving the data: {e}")))?;
    let target = data.to_string_lossy().to_string();
    if let Err(e) = sys::run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size_kib}k"),
            "tmpfs",
            &target,
        ],
    ) {
        let _ = std::fs::remove_dir_all(&saved);
        cluster.spawn(v).await?;
        return Err(FaultError::Skip(format!("cannot mount a tmpfs here: {e}")));
    }
    cluster.track_mount(&data);
    copy_dir(&saved, &data).map_err(|e| FaultError::Other(format!("filling the tmpfs: {e}")))?;
    let ballast = data.join("chaos-ballast");
    let mut inj = Injected::new(
        format!(
            "node {v} (leader: {}) restarted on a {size_kib} KiB tmpfs (data was {} KiB), then the free space filled",
            v == leader,
            used / 1024
        ),
        vec![v],
        // Restarted at once with its vote, it may lead again: any leader counts.
        false,
        Undo::DiskFull {
            node: v,
            data: data.clone(),
            saved,
            ballast: ballast.clone(),
        },
    );
    inj.may_crash.push(v);
    inj.impair(v, stopped_at, "restarting on a small disk");
    match cluster.spawn(v).await {
        Ok(_) => inj.close_impairments(Some(v), clock.now()),
        Err(e) => inj
            .notes
            .push(format!("node {v} does not start on the small disk: {e}")),
    }
    match fill(&ballast, size_kib * 1024) {
        Ok(n) => inj
            .notes
            .push(format!("{} KiB of ballast left the tmpfs full", n / 1024)),
        Err(e) => inj.notes.push(format!("could not fill the tmpfs: {e}")),
    }
    Ok(inj)
}

/// Writes zeros to `path` until the filesystem is full (or `max` bytes). Returns the bytes
/// written.
fn fill(path: &Path, max: u64) -> std::io::Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    while written < max {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// How many lines of the file at `path` contain any of `needles`.
fn count_lines(path: &Path, needles: &[&str]) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .count()
}

fn unmount(path: &Path) -> Result<(), FaultError> {
    let p = path.to_string_lossy();
    sys::run("umount", &[&p])
        .or_else(|_| sys::run("umount", &["-l", &p]))
        .map(|_| ())
        .map_err(|e| FaultError::Other(e.to_string()))
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Copies the contents of `from` into `to` (created if missing), recursively.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

/// Removes the contents of `dir`, keeping `dir`.
fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(e.path())?;
        } else {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_and_names() {
        assert_eq!(Profile::Smoke.faults().len(), 5);
        assert_eq!(Profile::Full.faults().len(), Fault::ALL.len());
        for f in Fault::ALL {
            assert_eq!(Fault::by_name(f.name()), Some(f));
        }
    }

    #[test]
    fn copying_and_clearing_directories() {
        let base = std::env::temp_dir().join(format!("chaos-copy-test-{}", std::process::id()));
        let a = base.join("a");
        std::fs::create_dir_all(a.join("sub")).unwrap();
        std::fs::write(a.join("x"), b"12345").unwrap();
        std::fs::write(a.join("sub/y"), b"6").unwrap();
        let b = base.join("b");
        copy_dir(&a, &b).unwrap();
        assert_eq!(dir_size(&b), 6);
        clear_dir(&b).unwrap();
        assert!(b.exists());
        assert_eq!(dir_size(&b), 0);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
