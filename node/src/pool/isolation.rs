//! A server process's namespaces (Linux): no network, a read-only filesystem with chosen
//! writable paths, a private `/tmp`, hidden paths. [`Isolation`] is what `mcpd sandbox-exec`
//! is told; [`Isolation::enter`] does it to `sandbox-exec` itself, as root, before it sets
//! its limits, drops to the server's user and execs the server.
//!
//! The mount namespace is private (nothing propagates back to the node). Every mount in it is
//! remounted read-only and nosuid, keeping its nodev and noexec, except the kernel's own
//! filesystems under `/dev`, `/proc` and `/sys`, and `/dev/shm` gets a tmpfs of its own;
//! writable paths are bound onto themselves (with what is mounted below them, which stays
//! read-only) and made writable, nosuid and nodev after that; hidden paths are covered
//! last, so that a hidden path inside a writable one stays hidden. Any step that fails fails
//! the start: a process never runs with less isolation than asked for. `sandbox-exec` then
//! sets no_new_privs and drops to the server's user, which must be neither root nor mcpd's
//! own (either could undo the mounts or reach the node's files through `/proc/PID/root`).

use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, MountPropagationFlags};

/// The namespaces a process gets, as `sandbox-exec` takes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct Isolation {
    /// A network namespace of its own: no network.
    #[arg(long)]
    pub private_network: bool,
    /// Every mount read-only, but the writable paths and /dev, /proc, /sys.
    #[arg(long)]
    pub read_only: bool,
    /// A path that stays writable (repeat).
    #[arg(long = "writable")]
    pub writable: Vec<PathBuf>,
    /// A path covered: a directory by an empty, unreadable tmpfs, a file by /dev/null (repeat).
    #[arg(long = "hide")]
    pub hidden: Vec<PathBuf>,
    /// An empty tmpfs on /tmp.
    #[arg(long)]
    pub private_tmp: bool,
}

impl Isolation {
    pub fn private_mounts(&self) -> bool {
        self.read_only || self.private_tmp || !self.hidden.is_empty()
    }

    pub fn any(&self) -> bool {
        self.private_network || self.private_mounts()
    }

    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let flags = [
            (self.private_network, "--private-network"),
            (self.read_only, "--read-only"),
            (self.private_tmp, "--private-tmp"),
        ];
        args.extend(
            flags
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, f)| f.to_string()),
        );
        for (flag, paths) in [("--writable", &self.writable), ("--hide", &self.hidden)] {
            args.extend(paths.iter().map(|p| format!("{flag}={}", p.display())));
        }
        args
    }

    /// Makes the namespaces and mounts of this isolation for the calling process, which
    /// must be single-threaded (`sandbox-exec` before it execs).
    pub fn enter(&self) -> Result<(), IsolationError> {
        let mut flags = rustix::thread::UnshareFlags::empty();
        if self.private_network {
            flags |= rustix::thread::UnshareFlags::NEWNET;
        }
        if self.private_mounts() {
            flags |= rustix::thread::UnshareFlags::NEWNS;
        }
        if flags.is_empty() {
            return Ok(());
        }
        // `unshare_unsafe` is unsafe only for CLONE_FILES, which is not asked for; the
        // workspace forbids unsafe code, so the deprecated safe name is used.
        #[allow(deprecated)]
        rustix::thread::unshare(flags).map_err(|e| step("unshare", Path::new("/"), e))?;
        if !self.private_mounts() {
            return Ok(());
        }
        rustix::mount::mount_change(
            "/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )
        .map_err(|e| step("making mounts private", Path::new("/"), e))?;
        if self.read_only {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| step("reading", Path::new("/proc/self/mountinfo"), e))?;
            for (point, kept) in mounts.lines().filter_map(mount_of) {
                if KERNEL_OWN
                    .iter()
                    .any(|k| point == Path::new(k) || point.starts_with(k))
                {
                    continue;
                }
                match remount(&point, kept | MountFlags::RDONLY | MountFlags::NOSUID) {
                    // A mount whose point is gone (deleted, or moved away): no path reaches it.
                    Err(IsolationError::Step { source, .. })
                        if source.kind() == io::ErrorKind::NotFound => {}
                    other => other?,
                }
            }
            // Shared memory is a filesystem under /dev, shared with the node: one of its own.
            if Path::new("/dev/shm").is_dir() {
                rustix::mount::mount(
                    "tmpfs",
                    "/dev/shm",
                    "tmpfs",
                    MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                    c"mode=1777",
                )
                .map_err(|e| step("mounting a private /dev/shm on", Path::new("/dev/shm"), e))?;
            }
        }
        if self.private_tmp {
            rustix::mount::mount(
                "tmpfs",
                "/tmp",
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NODEV,
                c"mode=1777",
            )
            .map_err(|e| step("mounting a private /tmp on", Path::new("/tmp"), e))?;
        }
        for path in self.writable.iter().chain(&self.hidden) {
            refuse_symlinks(path)?;
        }
        for path in &self.writable {
            rustix::mount::mount_bind_recursive(path, path)
                .map_err(|e| step("binding the writable path", path, e))?;
            // A bind keeps the read-only flag of the mount it was taken from.
            remount(path, MountFlags::NOSUID | MountFlags::NODEV)?;
        }
        for path in &self.hidden {
            match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => rustix::mount::mount(
                    "tmpfs",
                    path,
                    "tmpfs",
                    MountFlags::RDONLY
                        | MountFlags::NOSUID
                        | MountFlags::NODEV
                        | MountFlags::NOEXEC,
                    c"mode=000,size=4k",
                ),
                Ok(_) => rustix::mount::mount_bind("/dev/null", path),
                // Nothing to hide.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(step("looking at the hidden path", path, e)),
            }
            .map_err(|e| step("hiding", path, e))?;
        }
        // The working directory was entered before the mounts: enter it again by its name,
        // so that it is seen through them.
        let cwd = std::env::current_dir().map_err(|e| step("finding", Path::new("."), e))?;
        std::env::set_current_dir(&cwd).map_err(|e| step("entering the working directory", &cwd, e))
    }
}

/// Mounts of the kernel's own filesystems, left as they are by `read_only`.
const KERNEL_OWN: [&str; 3] = ["/dev", "/proc", "/sys"];

/// A line of `/proc/self/mountinfo`: the mount point and the flags of it that a read-only
/// remount keeps (nosuid, nodev, noexec).
fn mount_of(line: &str) -> Option<(PathBuf, MountFlags)> {
    let fields: Vec<&str> = line.split(' ').collect();
    let point = unescape(fields.get(4)?);
    let mut kept = MountFlags::empty();
    for option in fields.get(5)?.split(',') {
        kept |= match option {
            "nosuid" => MountFlags::NOSUID,
            "nodev" => MountFlags::NODEV,
            "noexec" => MountFlags::NOEXEC,
            _ => MountFlags::empty(),
        };
    }
    Some((PathBuf::from(point), kept))
}

/// A mount point as the kernel writes it: space, tab, newline and backslash in octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Refuses a path through a symbolic link: mounted as root, it would make writable or hide
/// where the link points, which the server's user may have chosen.
fn refuse_symlinks(path: &Path) -> Result<(), IsolationError> {
    match std::fs::canonicalize(path) {
        Ok(real) if real != path => Err(IsolationError::Symlink {
            path: path.to_path_buf(),
            to: real,
        }),
        Ok(_) => Ok(()),
        // Nothing there: nothing to hide, and a missing writable path fails its bind.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(step("resolving", path, e)),
    }
}

/// Remounts the mount at `path` with `flags` (a bind remount: per mount, not the filesystem).
fn remount(path: &Path, flags: MountFlags) -> Result<(), IsolationError> {
    rustix::mount::mount_remount(path, MountFlags::BIND | flags, "")
        .map_err(|e| step("remounting", path, e))
}

/// An error of one step, naming it and its path.
fn step(what: &'static str, path: &Path, e: impl Into<io::Error>) -> IsolationError {
    IsolationError::Step {
        what,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Why a process's namespaces could not be made: its start fails.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("{what} {}: {source}", path.display())]
    Step {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} goes through a symbolic link (to {}): refused", path.display(), to.display())]
    Symlink { path: PathBuf, to: PathBuf },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_the_point_and_the_flags_kept() {
        let line = "36 35 98:0 /mnt1 /mnt/with\\040space rw,nosuid,noexec,relatime shared:1 - ext3 /dev/root rw";
        let (point, kept) = mount_of(line).expect("a mount");
        assert_eq!(point, PathBuf::from("/mnt/with space"));
        assert_eq!(kept, MountFlags::NOSUID | MountFlags::NOEXEC);
    }

    #[test]
    fn the_arguments_name_every_choice() {
        let iso = Isolation {
            private_network: true,
            read_only: true,
            writable: vec!["/srv/out".into()],
            hidden: vec!["/etc/secret".into()],
            private_tmp: false,
        };
        assert_eq!(
            iso.args(),
            [
                "--private-network",
                "--read-only",
                "--writable=/srv/out",
                "--hide=/etc/secret"
            ]
        );
        assert!(iso.any() && iso.private_mounts());
        assert!(!Isolation::default().any());
    }
}
