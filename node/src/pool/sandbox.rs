//! A local server's sandbox: the user its processes run as and the resources each may use
//! ([`SandboxSpec`]).
//!
//! - **User.** `run_as` sets the process's user and group and drops every supplementary group,
//!   so that it cannot read another user's files, or another server's `/proc/PID/environ`.
//!   mcpd needs root (or CAP_SETUID and CAP_SETGID); a `run_as` it cannot honour fails the
//!   start with a clear error, never runs the process as mcpd's own user.
//! - **Limits** are rlimits, set by `mcpd sandbox-exec` on itself before it execs the server
//!   (so they hold from the server's first instruction), and inherited by whatever it starts: CPU seconds (`RLIMIT_CPU`: SIGXCPU past it, reported as
//!   `killed: CPU limit`), open files, processes of the user, and private memory
//!   (`RLIMIT_DATA`, at 1.25 × `memory_mb`, a hard backstop).
//! - **Memory** is watched as well: the resident memory of the process is read every
//!   [`MEMORY_POLL`], and the proportional share (Pss) of the rest of its process group (the
//!   children it started, `npx` → `node`) every [`GROUP_SCAN`]; past `memory_mb` in total, the group is killed and
//!   reported as `killed: memory limit`. A process that allocates faster than the poll sees
//!   an allocation fail at the backstop instead. A child that leaves the group (`setsid`)
//!   leaves the watch too.
//!
//! - **Isolation** (Linux, root or CAP_SYS_ADMIN): `private_network` gives the process a
//!   network namespace of its own (a loopback that is down, nothing else); `read_only`,
//!   `private_tmp` and `hidden_paths` a mount namespace of its own, where every mount is
//!   read-only but `writable_paths` (and `/dev`, `/proc`, `/sys`), `/tmp` is an empty tmpfs, and
//!   hidden paths are covered (a directory by an empty, unreadable tmpfs; a file by
//!   `/dev/null`). mcpd's own data and TLS directories are always hidden there. Mounts do not
//!   propagate back to the node. `sandbox-exec` does it as root, then drops to `run_as`.
//!
//! [`capabilities`] says what this node can enforce, for `GET /v1/node`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mcpcp_proto::api::{SandboxCapabilities, SandboxSpec};

pub use super::isolation::Isolation;
use rustix::process::{Resource, Rlimit};

/// How often a process's resident memory is compared with its limit.
pub const MEMORY_POLL: Duration = Duration::from_millis(50);

/// How often the other processes of its group (the children it started) are found and
/// their resident memory added: a scan of `/proc`, so slower than [`MEMORY_POLL`].
pub const GROUP_SCAN: Duration = Duration::from_millis(500);

/// Why a sandbox cannot be honoured on this node.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("run_as {0:?}: no such user on this node")]
    NoSuchUser(String),
    #[error("run_as {0:?}: no such group on this node")]
    NoSuchGroup(String),
    #[error(
        "run_as {0:?} needs mcpd to run as root or with CAP_SETUID and CAP_SETGID; it does not"
    )]
    CannotSetUid(String),
    #[error(
        "{0} needs mcpd to run as root or with CAP_SYS_ADMIN (a namespace of its own); it does not"
    )]
    CannotIsolate(&'static str),
    #[error("run_as {0:?} is root or mcpd's own user, which could undo namespaces or reach the node's files through /proc; give the server a user of its own")]
    IsolatedAsPrivileged(String),
}

/// What the node can enforce, detected once.
pub fn capabilities() -> &'static SandboxCapabilities {
    static DETECTED: std::sync::OnceLock<SandboxCapabilities> = std::sync::OnceLock::new();
    DETECTED.get_or_init(detect)
}

fn detect() -> SandboxCapabilities {
    SandboxCapabilities {
        run_as: can_set_ids(),
        rlimits: true,
        cgroup_v2: delegated_cgroup_v2(),
        namespaces: can_unshare(),
    }
}

/// Bits of `CapEff` (linux/capability.h).
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SYS_ADMIN: u32 = 21;

/// Whether this process may change its user and group ids.
fn can_set_ids() -> bool {
    has_capabilities(&[CAP_SETGID, CAP_SETUID])
}

/// Whether this process may make mount and network namespaces.
fn can_unshare() -> bool {
    Path::new("/proc/self/ns/mnt").exists() && has_capabilities(&[CAP_SYS_ADMIN])
}

/// Whether this process is root or has every capability of `bits` (in `CapEff`).
fn has_capabilities(bits: &[u32]) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| bits.iter().all(|b| caps & (1 << b) != 0))
}

/// Whether mcpd's own cgroup is on a pure cgroup v2 hierarchy and writable by it.
fn delegated_cgroup_v2() -> bool {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    let root = Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        return false;
    }
    // Opened for writing (and closed at once, unwritten): a cgroup mcpd could configure.
    let dir = root.join(path.trim_start_matches('/'));
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.subtree_control"))
        .is_ok()
}

/// A sandbox resolved on this node: ids looked up, limits in the units the kernel takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Resident memory past which the process is killed, in bytes.
    pub memory_bytes: Option<u64>,
    cpu_seconds: Option<u64>,
    open_files: Option<u64>,
    processes: Option<u64>,
    isolation: Isolation,
}

/// Where the node keeps what its servers must never read (its data and TLS directories):
/// hidden from every process with a mount namespace of its own.
#[derive(Debug, Clone, Default)]
pub struct NodePaths(pub Vec<PathBuf>);

impl NodePaths {
    /// The data and TLS directories and the edge key of `cfg`, as absolute paths (a server
    /// starts elsewhere than mcpd: a relative path would hide nothing).
    pub fn of(cfg: &crate::config::Config) -> NodePaths {
        let paths = [
            Some(cfg.data_dir.clone()),
            Some(cfg.tls_dir()),
            cfg.api.tls_key_file.clone(),
        ];
        NodePaths(
            paths
                .into_iter()
                .flatten()
                .map(|p| {
                    std::fs::canonicalize(&p)
                        .unwrap_or_else(|_| std::path::absolute(&p).unwrap_or(p))
                })
                .collect(),
        )
    }
}

impl Sandbox {
    /// Looks the spec's user and group up on this node (names in `/etc/passwd` and
    /// `/etc/group`, or numbers) and checks that it can switch to them and make the
    /// namespaces asked for.
    pub fn resolve(spec: &SandboxSpec, node: &NodePaths) -> Result<Sandbox, SandboxError> {
        let mut sandbox = Sandbox {
            memory_bytes: spec.memory_mb.map(|mb| mb << 20),
            cpu_seconds: spec.cpu_seconds,
            open_files: spec.open_files,
            processes: spec.processes,
            ..Sandbox::default()
        };
        if spec.isolated() {
            if !capabilities().namespaces {
                let what = if spec.private_network {
                    "private_network"
                } else {
                    "a private filesystem (read_only, private_tmp, hidden_paths)"
                };
                return Err(SandboxError::CannotIsolate(what));
            }
            let mut hidden: Vec<PathBuf> = spec.hidden_paths.iter().map(PathBuf::from).collect();
            if spec.private_mounts() {
                hidden.extend(node.0.iter().cloned());
            }
            sandbox.isolation = Isolation {
                private_network: spec.private_network,
                read_only: spec.read_only,
                writable: spec.writable_paths.iter().map(PathBuf::from).collect(),
                hidden,
                private_tmp: spec.private_tmp,
            };
        }
        if let Some(run_as) = &spec.run_as {
            if !can_set_ids() {
                return Err(SandboxError::CannotSetUid(run_as.clone()));
            }
            let (user, group) = match run_as.split_once(':') {
                Some((u, g)) => (u, Some(g)),
                None => (run_as.as_str(), None),
            };
            let (uid, primary_gid) =
                lookup_user(user).ok_or_else(|| SandboxError::NoSuchUser(run_as.clone()))?;
            let gid = match group {
                Some(g) => {
                    lookup_group(g).ok_or_else(|| SandboxError::NoSuchGroup(run_as.clone()))?
                }
                None => primary_gid,
            };
            sandbox.uid = Some(uid);
            sandbox.gid = Some(gid);
            let own = rustix::process::geteuid().as_raw();
            if sandbox.isolation.any() && (uid == 0 || uid == own) {
                return Err(SandboxError::IsolatedAsPrivileged(run_as.clone()));
            }
        }
        Ok(sandbox)
    }

    /// How to start `command` in this sandbox, with `env` as its whole environment.
    ///
    /// - With namespaces: `mcpd sandbox-exec` runs as root (only root can make them) with an
    ///   empty environment, reads the server's on its stdin's first line (so that no
    ///   `LD_PRELOAD` of a spec ever runs as root), makes the namespaces, sets the limits, drops
    ///   to the user and execs the command.
    /// - With limits only: `sandbox-exec` is started as the user with the environment, sets
    ///   the limits on itself (no privilege needed to lower them) and execs the command.
    /// - Otherwise: the command itself, started as the user (std drops the supplementary
    ///   groups when it sets the user as root).
    ///
    /// Either way the limits and namespaces hold from the command's first instruction.
    pub fn launch(&self, command: &str, args: &[String], env: &BTreeMap<String, String>) -> Launch {
        let limits: Vec<String> = self
            .rlimits()
            .into_iter()
            .flatten()
            .map(|(resource, soft, hard)| format!("--limit={}:{soft}:{hard}", name_of(resource)))
            .collect();
        let isolated = self.isolation.any();
        let mut cmd = if limits.is_empty() && !isolated {
            let mut cmd = tokio::process::Command::new(command);
            cmd.args(args);
            cmd
        } else {
            // This very binary, resolved in the child: it works after the file was replaced
            // by an upgrade, and never falls back to running the command without its sandbox.
            let mut cmd = tokio::process::Command::new("/proc/self/exe");
            cmd.arg("sandbox-exec")
                .args(limits)
                .args(self.isolation.args());
            if isolated {
                cmd.arg("--env-on-stdin");
                for (flag, id) in [("--uid", self.uid), ("--gid", self.gid)] {
                    if let Some(id) = id {
                        cmd.arg(format!("{flag}={id}"));
                    }
                }
            }
            cmd.arg("--").arg(command).args(args);
            cmd
        };
        cmd.env_clear();
        if isolated {
            if self.isolation.private_mounts() {
                // Not mcpd's own working directory, which may be hidden: the spec's `cwd`,
                // set after this, or the root.
                cmd.current_dir("/");
            }
            let mut line = serde_json::to_vec(env).unwrap_or_default();
            line.push(b'\n');
            return Launch {
                cmd,
                stdin_first: Some(line),
            };
        }
        cmd.envs(env);
        if let Some(gid) = self.gid {
            cmd.gid(gid);
        }
        if let Some(uid) = self.uid {
            cmd.uid(uid);
        }
        Launch {
            cmd,
            stdin_first: None,
        }
    }

    /// The rlimits to set: (resource, soft, hard).
    fn rlimits(&self) -> [Option<(Resource, u64, u64)>; 4] {
        let backstop = |b: u64| b + b / 4;
        [
            // SIGXCPU at the soft limit; SIGKILL a second later if it is caught.
            self.cpu_seconds.map(|s| (Resource::Cpu, s, s + 1)),
            self.open_files.map(|n| (Resource::Nofile, n, n)),
            self.processes.map(|n| (Resource::Nproc, n, n)),
            self.memory_bytes
                .map(|b| (Resource::Data, backstop(b), backstop(b))),
        ]
    }

    /// Why a process of this sandbox ended, when a limit ended it (from its exit status).
    pub fn limit_that_ended(&self, status: &std::process::ExitStatus) -> Option<&'static str> {
        use std::os::unix::process::ExitStatusExt;
        // The memory watch reports its own kills; SIGXCPU comes only from the CPU limit.
        let xcpu = rustix::process::Signal::XCPU.as_raw();
        (self.cpu_seconds.is_some() && status.signal()? == xcpu).then_some("CPU limit")
    }
}

/// The names `sandbox-exec` takes.
const RESOURCES: [(&str, Resource); 4] = [
    ("cpu", Resource::Cpu),
    ("nofile", Resource::Nofile),
    ("nproc", Resource::Nproc),
    ("data", Resource::Data),
];

fn name_of(resource: Resource) -> &'static str {
    RESOURCES
        .iter()
        .find(|(_, r)| *r == resource)
        .map_or("?", |(n, _)| n)
}

/// A server process, ready to spawn.
pub struct Launch {
    pub cmd: tokio::process::Command,
    /// Written to its stdin before anything else (the environment, for `sandbox-exec`).
    pub stdin_first: Option<Vec<u8>>,
}

/// The longest environment `sandbox-exec` reads on its stdin.
const MAX_ENV_LINE: usize = 1 << 20;

/// What `mcpd sandbox-exec` is told to do before it becomes the command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ExecPlan {
    /// NAME:SOFT:HARD, NAME one of cpu, nofile, nproc, data (repeat).
    #[arg(long = "limit")]
    pub limits: Vec<String>,
    #[command(flatten)]
    pub isolation: Isolation,
    /// The user id the command runs as.
    #[arg(long)]
    pub uid: Option<u32>,
    /// The group id the command runs as.
    #[arg(long)]
    pub gid: Option<u32>,
    /// The command's environment is the first line of stdin (a JSON object), read before it
    /// runs: sandbox-exec itself runs with none.
    #[arg(long)]
    pub env_on_stdin: bool,
}

/// `mcpd sandbox-exec [PLAN] -- COMMAND ARGS...`: makes the namespaces, sets the limits on
/// this process, then becomes the command as the plan's user. Returns only if that failed.
pub fn exec(plan: &ExecPlan, command: &[String]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let env = match plan.env_on_stdin.then(env_from_stdin).transpose() {
        Ok(env) => env,
        Err(e) => return e,
    };
    if let Err(e) = plan.isolation.enter() {
        return std::io::Error::other(e);
    }
    for limit in &plan.limits {
        let parsed = limit.split(':').collect::<Vec<_>>();
        let resource = RESOURCES.iter().find(|(n, _)| Some(n) == parsed.first());
        let (Some((_, resource)), [_, soft, hard]) = (resource, parsed.as_slice()) else {
            return std::io::Error::other(format!("--limit {limit:?}: not NAME:SOFT:HARD"));
        };
        let (Ok(soft), Ok(hard)) = (soft.parse(), hard.parse()) else {
            return std::io::Error::other(format!("--limit {limit:?}: not numbers"));
        };
        let set = rustix::process::setrlimit(
            *resource,
            Rlimit {
                current: Some(soft),
                maximum: Some(hard),
            },
        );
        if let Err(e) = set {
            return std::io::Error::other(format!("--limit {limit:?}: {e}"));
        }
    }
    let Some((program, args)) = command.split_first() else {
        return std::io::Error::other("no command to run");
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    if let Some(env) = env {
        cmd.env_clear().envs(env);
    }
    if plan.isolation.any() {
        // Nothing it runs gains privileges (setuid binaries, file capabilities).
        if let Err(e) = rustix::thread::set_no_new_privs(true) {
            return std::io::Error::other(format!("setting no_new_privs: {e}"));
        }
    }
    if let Some(gid) = plan.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = plan.uid {
        cmd.uid(uid);
    }
    let e = cmd.exec();
    std::io::Error::new(e.kind(), format!("running {program:?}: {e}"))
}

/// The environment on stdin's first line, read a byte at a time: what follows is the
/// server's (the MCP traffic), and must stay unread.
fn env_from_stdin() -> std::io::Result<BTreeMap<String, String>> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match rustix::io::read(stdin.as_fd(), &mut byte) {
            Ok(0) => return Err(std::io::Error::other("stdin ended before the environment")),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_ENV_LINE => line.push(byte[0]),
            Ok(_) => return Err(std::io::Error::other("the environment is too long")),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    serde_json::from_slice(&line)
        .map_err(|e| std::io::Error::other(format!("the environment on stdin: {e}")))
}

/// A user's id and primary group, by name (in `/etc/passwd`) or number.
fn lookup_user(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let by_name = passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == user).then_some(())?;
        let uid = fields.nth(1)?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    });
    // A number need not name a user; its group is then its own id.
    by_name.or_else(|| user.parse::<u32>().ok().map(|uid| (uid, uid)))
}

/// A group's id, by name (in `/etc/group`) or number.
fn lookup_group(group: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let by_name = groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group).then_some(())?;
        fields.nth(1)?.parse().ok()
    });
    by_name.or_else(|| group.parse().ok())
}

/// Resident memory of process `pid`, in bytes (`None` once it is gone).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, "VmRSS:")
}

/// Memory of the processes of group `pgid` other than `pgid` itself, in bytes: their
/// proportional share (Pss), so that pages a forked child still shares with its parent are
/// not counted twice.
pub fn group_resident_bytes(pgid: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != pgid && group_of(pid) == Some(pgid))
        .filter_map(proportional_bytes)
        .sum()
}

/// Proportional resident memory (Pss) of process `pid`, in bytes.
fn proportional_bytes(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&rollup, "Pss:")
}

/// A `Name:   123 kB` line's value, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// The process group of `pid` (the fifth field of `/proc/PID/stat`, after the name).
fn group_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_are_found_by_name_and_number() {
        assert_eq!(lookup_user("root"), Some((0, 0)));
        assert_eq!(lookup_user("4242"), Some((4242, 4242)));
        assert_eq!(lookup_user("no-such-user-here"), None);
        assert_eq!(lookup_group("root"), Some(0));
        assert_eq!(lookup_group("4243"), Some(4243));
        assert_eq!(lookup_group("no-such-group-here"), None);
    }

    #[test]
    fn limits_become_rlimits_with_a_memory_backstop() {
        let s = Sandbox::resolve(
            &SandboxSpec {
                memory_mb: Some(64),
                cpu_seconds: Some(5),
                ..SandboxSpec::default()
            },
            &NodePaths::default(),
        )
        .expect("no user to look up");
        assert_eq!(s.memory_bytes, Some(64 << 20));
        let set = s.rlimits();
        assert_eq!(set[0], Some((Resource::Cpu, 5, 6)));
        assert_eq!(set[3], Some((Resource::Data, 80 << 20, 80 << 20)));
        assert!(set[1].is_none() && set[2].is_none());
    }

    #[test]
    fn an_unknown_user_is_refused_with_its_name() {
        let e = Sandbox::resolve(
            &SandboxSpec {
                run_as: Some("no-such-user-here".into()),
                ..SandboxSpec::default()
            },
            &NodePaths::default(),
        );
        let message = e.expect_err("refused").to_string();
        assert!(message.contains("no-such-user-here"), "{message}");
    }

    #[test]
    fn a_groups_other_processes_are_counted() {
        use std::os::unix::process::CommandExt;
        let me = std::process::id();
        assert_eq!(
            group_of(me),
            Some(rustix::process::getpgrp().as_raw_pid() as u32)
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("sleep runs");
        let pgid = child.id();
        let mut grandchild = std::process::Command::new("sleep")
            .arg("30")
            .process_group(pgid as i32)
            .spawn()
            .expect("sleep runs");
        let counted = group_resident_bytes(pgid);
        let _ = (
            child.kill(),
            grandchild.kill(),
            child.wait(),
            grandchild.wait(),
        );
        assert!(counted > 0, "the grandchild's memory is counted");
    }

    #[test]
    fn the_own_resident_memory_is_read() {
        let rss = resident_bytes(std::process::id()).expect("this process exists");
        assert!(rss > 0);
    }
}
