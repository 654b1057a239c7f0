//! Starting one `mcpd` on a node directory and waiting until it reports its addresses: what
//! `mcpctl dev up`, the end-to-end tests and benchmarks (`mcpcp-tests`) and the chaos harness
//! share. Each keeps its own way of owning the process (`dev up` lets it go, the tests kill it
//! on drop, chaos hands it to its janitor); the directory layout, the command line and the
//! wait for start-up are this module's.
//!
//! A node directory holds `data/` (the node's data directory, with the cluster CA in its
//! `tls/`) and `mcpd.log` (its stdout and stderr, appended to across restarts). The node binds
//! the addresses it is given (`127.0.0.1:0` for any free port) and reports the ones it got in
//! `data/endpoints.json`, so there is no port race.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mcpcp_proto::api::Member;

/// Why a node could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// It exited during its start, or did not report its addresses in time.
    #[error("{0}")]
    Start(String),
    #[error("no program to start mcpd with")]
    NoProgram,
    #[error("cluster CA: {0}")]
    Pki(#[from] mcpcp_pki::PkiError),
}

/// How long a node has to report its addresses.
pub const START_WITHIN: Duration = Duration::from_secs(30);

/// One `mcpd` to start.
#[derive(Debug, Clone)]
pub struct Launch {
    pub id: u64,
    /// The node directory (`data/` and `mcpd.log` inside).
    pub node_dir: PathBuf,
    /// The program and what comes before `mcpd`'s own arguments: `[mcpd]`, or
    /// `[ip, netns, exec, NS, mcpd]` for a node in a network namespace.
    pub program: Vec<OsString>,
    /// The cluster CA's directory, put into the node's TLS directory; `None` for a node that
    /// fetches it itself (`--join`) or already has it.
    pub ca_dir: Option<PathBuf>,
    /// The addresses to listen on (`127.0.0.1:0`: any free port).
    pub http_addr: String,
    pub grpc_addr: String,
    /// `mcpd`'s further flags.
    pub args: Vec<String>,
    /// Its own process group, so that a Ctrl-C at the terminal does not reach it (for a
    /// cluster that outlives the command, or one its owner stops itself).
    pub own_group: bool,
}

/// A started process's files.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Launch {
    /// `mcpd` at `node_dir`, on any free ports, with the CA of `ca_dir`.
    pub fn new(mcpd: &Path, id: u64, node_dir: &Path, ca_dir: &Path) -> Launch {
        Launch {
            id,
            node_dir: node_dir.to_path_buf(),
            program: vec![mcpd.as_os_str().to_owned()],
            ca_dir: Some(ca_dir.to_path_buf()),
            http_addr: "127.0.0.1:0".into(),
            grpc_addr: "127.0.0.1:0".into(),
            args: Vec::new(),
            own_group: false,
        }
    }

    /// Lays out the node directory (the CA installed, the last run's `endpoints.json` gone,
    /// the log opened for appending) and returns the command that starts the node, ready to
    /// spawn, and where its files are.
    pub fn prepare(&self) -> Result<(Command, NodeFiles), LaunchError> {
        let data = self.node_dir.join("data");
        std::fs::create_dir_all(&data).map_err(io(format!("creating {}", data.display())))?;
        let _ = std::fs::remove_file(data.join("endpoints.json"));
        if let Some(ca) = &self.ca_dir {
            install_ca(ca, &data)?;
        }
        let log = self.node_dir.join("mcpd.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("opening {}", log.display())))?;
        let err = out.try_clone().map_err(io("cloning the log handle"))?;
        let (program, before) = self
            .program
            .split_first()
            .ok_or_else(|| LaunchError::NoProgram)?;
        let mut cmd = Command::new(program);
        cmd.args(before)
            .arg("--id")
            .arg(self.id.to_string())
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--http-addr",
                &self.http_addr,
                "--grpc-addr",
                &self.grpc_addr,
            ])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        #[cfg(unix)]
        if self.own_group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        Ok((
            cmd,
            NodeFiles {
                data_dir: data,
                log,
            },
        ))
    }
}

/// Waits until node `id`, started as `pid`, reports its addresses in its data directory;
/// `exited` says whether (and how) the process ended meanwhile. An exit or no report within
/// [`START_WITHIN`] is an error with the end of its log.
pub async fn wait_started(
    id: u64,
    files: &NodeFiles,
    pid: u32,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<Member, LaunchError> {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Some(member) = read_endpoints(&files.data_dir, pid) {
            return Ok(member);
        }
        if let Some(status) = exited() {
            return Err(LaunchError::Start(format!(
                "node {id} exited during start-up ({status}); last lines of {}:\n{}",
                files.log.display(),
                log_tail(&files.log, 8)
            )));
        }
        if Instant::now() > deadline {
            return Err(LaunchError::Start(format!(
                "node {id} did not report its addresses within {} s (see {})",
                START_WITHIN.as_secs(),
                files.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let what = what.into();
    move |source| LaunchError::Io { what, source }
}

/// Puts the CA and the data key of `ca_dir` into the TLS directory of the node whose data is
/// `data_dir` (`<data_dir>/tls`), as an operator does before a node's first start; the node
/// issues its own certificates from the CA.
pub fn install_ca(ca_dir: &Path, data_dir: &Path) -> Result<(), LaunchError> {
    use mcpcp_pki::datakey::DATA_KEY;
    let tls = data_dir.join("tls");
    if !tls.join(mcpcp_pki::ca::CA_CERT).exists() {
        mcpcp_pki::Ca::load(ca_dir)?.write(&tls)?;
    }
    if !tls.join(DATA_KEY).exists() {
        mcpcp_pki::datakey::write(&tls, &mcpcp_pki::datakey::load(ca_dir)?)?;
    }
    Ok(())
}

/// The addresses a node started with pid `pid` reported in `<data_dir>/endpoints.json`.
pub fn read_endpoints(data_dir: &Path, pid: u32) -> Option<Member> {
    last_endpoints(data_dir)
        .filter(|(_, p)| *p == pid)
        .map(|(m, _)| m)
}

/// The addresses a node last reported in `<data_dir>/endpoints.json`, and its pid then.
pub(crate) fn last_endpoints(data_dir: &Path) -> Option<(Member, u32)> {
    let text = std::fs::read_to_string(data_dir.join("endpoints.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pid = u32::try_from(v["pid"].as_u64()?).ok()?;
    let member = Member {
        id: v["id"].as_u64()?,
        http_addr: v["http_addr"].as_str()?.to_string(),
        grpc_addr: v["grpc_addr"].as_str()?.to_string(),
    };
    Some((member, pid))
}
