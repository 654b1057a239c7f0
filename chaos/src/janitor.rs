//! Everything the harness creates on the machine, and its removal on every way out.
//!
//! A run has an id (`run`, four hex digits) and a directory `<tmp>/mcpcp-chaos/<run>/` holding
//! an `owner` file with the harness's pid. Every name the run gives the machine carries the id:
//! network namespaces `chaos-<run>-n<node>`, links `chaos<run>br` (the bridge) and
//! `chaos<run>h<node>` (veth ends), tmpfs mounts under the run directory. The [`Janitor`] keeps
//! the child processes (so it can kill and reap them) and the names it created, and
//! [`Janitor::cleanup`] removes them all: at the end of a run, from the Ctrl-C/SIGTERM handler,
//! and from `Drop` when a run ends early. [`sweep_leftovers`] removes what a run whose harness
//! is gone (killed with -9, machine rebooted) left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::process::Child;

use crate::{poll, sys};

/// Prefix of every network namespace a run creates.
pub const NS_PREFIX: &str = "chaos-";
/// Prefix of every link (bridge, veth) a run creates.
pub const LINK_PREFIX: &str = "chaos";

#[derive(Debug, thiserror::Error)]
pub enum JanitorError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("process {0} is not one of ours")]
    UnknownPid(u32),
}

/// The name of node `id`'s network namespace in run `run`.
pub fn netns_name(run: &str, id: u64) -> String {
    format!("{NS_PREFIX}{run}-n{id}")
}

/// The base directory of every run's directory.
pub fn base_dir() -> PathBuf {
    std::env::temp_dir().join("mcpcp-chaos")
}

#[derive(Default)]
struct Owned {
    children: BTreeMap<u32, Child>,
    netns: BTreeSet<String>,
    links: BTreeSet<String>,
    mounts: BTreeSet<PathBuf>,
}

/// The owner of a run's processes, namespaces, links, mounts and directory. Cheap to clone.
#[derive(Clone)]
pub struct Janitor {
    run: String,
    dir: PathBuf,
    keep: bool,
    owned: Arc<Mutex<Owned>>,
}

impl Janitor {
    /// Creates a run directory under `base` with a fresh run id. With `keep`, the directory
    /// (node logs and data) survives [`Janitor::cleanup`].
    pub fn create(base: &Path, keep: bool) -> Result<Janitor, JanitorError> {
        std::fs::create_dir_all(base).map_err(|source| JanitorError::Io {
            what: format!("creating {}", base.display()),
            source,
        })?;
        let mut rng = fastrand::Rng::new();
        let (run, dir) = (0..1000)
            .map(|_| format!("{:04x}", rng.u16(..)))
            .find_map(|run| {
                let dir = base.join(&run);
                std::fs::create_dir(&dir).ok().map(|_| (run, dir))
            })
            .ok_or_else(|| JanitorError::Io {
                what: format!("creating a run directory in {}", base.display()),
                source: std::io::Error::other("no free run id after 1000 tries"),
            })?;
        std::fs::write(dir.join("owner"), format!("{}\n", std::process::id())).map_err(
            |source| JanitorError::Io {
                what: format!("writing {}/owner", dir.display()),
                source,
            },
        )?;
        Ok(Janitor {
            run,
            dir,
            keep,
            owned: Arc::new(Mutex::new(Owned::default())),
        })
    }

    pub fn run_id(&self) -> &str {
        &self.run
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, Owned> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes ownership of a started child process; returns its pid.
    pub fn adopt(&self, child: Child) -> Option<u32> {
        let pid = child.id()?;
        self.lock().children.insert(pid, child);
        Some(pid)
    }

    /// Whether our child `pid` has exited; if so it is reaped and its status returned.
    pub fn exited(&self, pid: u32) -> Option<String> {
        let mut owned = self.lock();
        let child = owned.children.get_mut(&pid)?;
        match child.try_wait() {
            Ok(Some(status)) => {
                owned.children.remove(&pid);
                Some(status.to_string())
            }
            Ok(None) => None,
            Err(e) => {
                owned.children.remove(&pid);
                Some(format!("unknown ({e})"))
            }
        }
    }

    /// Polls until child `pid` has exited (and is reaped), for at most `within`.
    async fn reap(&self, pid: u32, within: Duration) -> bool {
        poll::until(within, Duration::from_millis(20), || async {
            (!self.lock().children.contains_key(&pid) || self.exited(pid).is_some()).then_some(())
        })
        .await
        .is_some()
    }

    /// kill -9 and reap.
    pub async fn kill(&self, pid: u32) -> Result<(), JanitorError> {
        {
            let mut owned = self.lock();
            let child = owned
                .children
                .get_mut(&pid)
                .ok_or(JanitorError::UnknownPid(pid))?;
            let _ = child.start_kill();
        }
        self.reap(pid, Duration::from_secs(10)).await;
        Ok(())
    }

    /// SIGKILL to our child `pid`, without waiting (for `Drop`): it stays ours, reaped by
    /// [`Janitor::exited`] or at cleanup. Returns whether it was one of ours.
    pub fn kill_now(&self, pid: u32) -> bool {
        match self.lock().children.get_mut(&pid) {
            Some(child) => {
                let _ = child.start_kill();
                true
            }
            None => false,
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. Returns whether it exited by
    /// itself.
    pub async fn terminate(&self, pid: u32, grace: Duration) -> Result<bool, JanitorError> {
        if !self.lock().children.contains_key(&pid) {
            return Err(JanitorError::UnknownPid(pid));
        }
        sys::signal(pid, "CONT");
        sys::signal(pid, "TERM");
        if self.reap(pid, grace).await {
            return Ok(true);
        }
        self.kill(pid).await?;
        Ok(false)
    }

    pub fn track_netns(&self, name: &str) {
        self.lock().netns.insert(name.to_string());
    }

    pub fn track_link(&self, name: &str) {
        self.lock().links.insert(name.to_string());
    }

    pub fn track_mount(&self, path: &Path) {
        self.lock().mounts.insert(path.to_path_buf());
    }

    pub fn untrack_mount(&self, path: &Path) {
        self.lock().mounts.remove(path);
    }

    /// Removes everything this run created. Synchronous (it also runs from a signal handler's
    /// task and from `Drop`), idempotent, bounded: each wait is a deadline. Returns one line per
    /// thing that could not be removed.
    pub fn cleanup(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let (children, netns, links, mounts) = {
            let mut owned = self.lock();
            (
                std::mem::take(&mut owned.children),
                std::mem::take(&mut owned.netns),
                std::mem::take(&mut owned.links),
                std::mem::take(&mut owned.mounts),
            )
        };
        for (pid, mut child) in children {
            let _ = child.start_kill();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        problems.push(format!("process {pid} did not exit after SIGKILL"));
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        // Mounts tracked, and any other mount under the run directory.
        let mut all_mounts: BTreeSet<PathBuf> = mounts;
        all_mounts.extend(sys::mounts_under(&self.dir));
        let mut all_mounts: Vec<PathBuf> = all_mounts.into_iter().collect();
        all_mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in all_mounts {
            problems.extend(unmount(&m));
        }
        for ns in netns {
            problems.extend(delete_netns(&ns));
        }
        for link in links {
            problems.extend(delete_link(&link));
        }
        if self.keep {
            let _ = std::fs::remove_file(self.dir.join("owner"));
            let _ = std::fs::write(self.dir.join("kept"), "kept with --keep\n");
        } else if self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                problems.push(format!("removing {}: {e}", self.dir.display()));
            }
        }
        problems
    }
}

fn unmount(path: &Path) -> Option<String> {
    let p = path.to_string_lossy();
    if sys::run("umount", &[&p]).is_ok() || sys::run("umount", &["-l", &p]).is_ok() {
        None
    } else {
        Some(format!("could not unmount {p}"))
    }
}

fn link_exists(name: &str) -> bool {
    sys::run("ip", &["link", "show", "dev", name]).is_ok()
}

fn delete_link(name: &str) -> Option<String> {
    if !link_exists(name) {
        return None;
    }
    match sys::run("ip", &["link", "del", "dev", name]) {
        Ok(_) => None,
        Err(_) if !link_exists(name) => None,
        Err(e) => Some(format!("could not delete link {name}: {e}")),
    }
}

/// Kills whatever still runs in namespace `ns`, then deletes it.
fn delete_netns(ns: &str) -> Option<String> {
    if let Ok(pids) = sys::run("ip", &["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            sys::signal(pid, "KILL");
        }
    }
    match sys::run("ip", &["netns", "del", ns]) {
        Ok(_) => None,
        Err(e) if e.stderr().contains("No such file") => None,
        Err(e) => Some(format!("could not delete namespace {ns}: {e}")),
    }
}

/// Whether run `run`'s harness is still running (its `owner` pid is a live `chaos`).
fn run_alive(base: &Path, run: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(base.join(run).join("owner")) else {
        return false;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return false;
    };
    pid != std::process::id()
        && sys::pid_exists(pid)
        && sys::comm(pid).is_some_and(|c| c.starts_with("chaos"))
}

/// Removes what earlier runs whose harness is gone left behind: their processes (found by
/// their run directory on the command line), mounts, directories, namespaces and links.
/// Runs still owned by a live harness are left alone. Returns one line per thing removed or
/// not removable.
pub fn sweep_leftovers(base: &Path, own_run: &str) -> Vec<String> {
    let mut report = Vec::new();
    let dead = |run: &str| run != own_run && !run_alive(base, run);
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            let run = e.file_name().to_string_lossy().to_string();
            if !dead(&run) {
                continue;
            }
            let dir = e.path();
            let needle = format!("{}/", dir.display());
            for pid in sys::all_pids() {
                if sys::cmdline(pid).is_some_and(|c| c.contains(&needle))
                    && pid != std::process::id()
                {
                    sys::signal(pid, "KILL");
                    report.push(format!("killed leftover process {pid} of run {run}"));
                }
            }
            for m in sys::mounts_under(&dir) {
                match unmount(&m) {
                    None => report.push(format!("unmounted leftover {}", m.display())),
                    Some(p) => report.push(p),
                }
            }
            if dir.join("kept").exists() {
                continue;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => report.push(format!("removed leftover {}", dir.display())),
                Err(err) => report.push(format!("removing {}: {err}", dir.display())),
            }
        }
    }
    if let Ok(list) = sys::run("ip", &["netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = ns.strip_prefix(NS_PREFIX) else {
                continue;
            };
            let run = rest.split('-').next().unwrap_or_default();
            if dead(run) {
                match delete_netns(ns) {
                    None => report.push(format!("deleted leftover namespace {ns}")),
                    Some(p) => report.push(p),
                }
            }
        }
    }
    if let Ok(list) = sys::run("ip", &["-o", "link", "show"]) {
        for line in list.lines() {
            // "12: chaos1a2bbr: <...>" or "13: chaos1a2bh1@if2: <...>"
            let Some(name) = line.split(':').nth(1).map(str::trim) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            let Some(rest) = name.strip_prefix(LINK_PREFIX) else {
                continue;
            };
            let run = rest.get(..4).unwrap_or_default();
            if run.len() == 4 && run.chars().all(|c| c.is_ascii_hexdigit()) && dead(run) {
                match delete_link(name) {
                    None => report.push(format!("deleted leftover link {name}")),
                    Some(p) => report.push(p),
                }
            }
        }
    }
    report
}

/// Runs [`Janitor::cleanup`] when dropped, so an early return or a panic still cleans up.
pub struct CleanupGuard(pub Janitor);

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        for p in self.0.cleanup() {
            eprintln!("cleanup: {p}");
        }
    }
}
