//! A 3-member etcd cluster on loopback, for the benchmarks that put `mcpd` side by side with
//! etcd: started, killed and restarted member by member, its leader found, its logs dumped.
//! The `etcd` binary comes from the system (Debian's `etcd-server`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::bench::root_cause;

/// How long to wait for etcd to become healthy.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// Free loopback ports: all bound at once (so they differ), released when returned.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("binding a free loopback port")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

pub struct EtcdMember {
    pub name: String,
    pub client_url: String,
    log: PathBuf,
    child: Option<Child>,
    /// Its command line, to start it again on its data after a kill.
    args: Vec<String>,
}

/// A 3-member etcd cluster in a temporary directory. Dropping it kills the members and removes
/// the directory; [`EtcdCluster::stop`] does the same and waits for the processes to exit.
pub struct EtcdCluster {
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    pub members: Vec<EtcdMember>,
}

impl EtcdCluster {
    pub async fn start(bin: &Path, n: usize, tls: bool) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("mcpcp-bench-etcd-")
            .tempdir()
            .context("etcd temp dir")?;
        let ports = free_ports(2 * n)?;
        let names: Vec<String> = (1..=n).map(|i| format!("etcd{i}")).collect();
        let scheme = if tls { "https" } else { "http" };
        let peer_url = |i: usize| format!("{scheme}://127.0.0.1:{}", ports[2 * i]);
        let client_url = |i: usize| format!("{scheme}://127.0.0.1:{}", ports[2 * i + 1]);
        let tls_args = if tls {
            etcd_tls_args(dir.path())?
        } else {
            Vec::new()
        };
        let initial_cluster = (0..n)
            .map(|i| format!("{}={}", names[i], peer_url(i)))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("mcpcp-bench-{}", std::process::id());
        let mut cluster = EtcdCluster {
            dir: None,
            bin: bin.to_path_buf(),
            members: Vec::new(),
        };
        for (i, name) in names.iter().enumerate() {
            let data = dir.path().join(name);
            let log = dir.path().join(format!("{name}.log"));
            let mut args: Vec<String> = vec!["--name".into(), name.clone(), "--data-dir".into()];
            args.push(data.display().to_string());
            for (flag, value) in [
                ("--listen-peer-urls", peer_url(i)),
                ("--initial-advertise-peer-urls", peer_url(i)),
                ("--listen-client-urls", client_url(i)),
                ("--advertise-client-urls", client_url(i)),
                ("--initial-cluster", initial_cluster.clone()),
                ("--initial-cluster-token", token.clone()),
                ("--initial-cluster-state", "new".into()),
                ("--logger", "zap".into()),
                ("--log-level", "warn".into()),
            ] {
                args.push(flag.into());
                args.push(value);
            }
            args.extend(tls_args.iter().cloned());
            let child = spawn(bin, &args, &log)?;
            cluster.members.push(EtcdMember {
                name: name.clone(),
                client_url: client_url(i),
                log,
                child: Some(child),
                args,
            });
        }
        cluster.dir = Some(dir);
        Ok(cluster)
    }

    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Polls `GET /health` of every member until each says `{"health":"true"}`.
    pub async fn wait_healthy(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let mut healthy = 0;
            let mut last = String::new();
            for m in &mut self.members {
                if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    bail!("{} exited at start-up with {status}", m.name);
                }
                let answer = async {
                    let resp = http
                        .get(format!("{}/health", m.client_url))
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await
                        .map_err(|e| root_cause(&e))?;
                    let v: serde_json::Value = resp.json().await.map_err(|e| root_cause(&e))?;
                    match v["health"].as_str() {
                        Some("true") => Ok(()),
                        _ => Err(v.to_string()),
                    }
                };
                match answer.await {
                    Ok(()) => healthy += 1,
                    Err(e) => last = format!("{}: {e}", m.name),
                }
            }
            if healthy == self.members.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd not healthy within {READY_WITHIN:?}; last answer {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn dump_logs(&self) {
        for m in &self.members {
            let text = std::fs::read_to_string(&m.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("----- {} ({}) -----", m.name, m.log.display());
            for l in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("{l}");
            }
        }
    }

    /// Kills every member, waits for it to exit, and removes the directory.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                c.kill()
                    .await
                    .with_context(|| format!("killing {}", m.name))?;
            }
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            dir.close()
                .with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }
}

/// Starts one member with `args`, its output appended to `log`.
fn spawn(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .context("etcd log file")?;
    let err = out.try_clone().context("etcd log handle")?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))
}

impl EtcdCluster {
    /// SIGKILL of member `i`; returns once it has exited.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.members[i].child.take() {
            c.kill().await.context("killing an etcd member")?;
        }
        Ok(())
    }

    /// Starts a killed member again on its data.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        m.child = Some(spawn(&self.bin, &m.args, &m.log)?);
        Ok(())
    }

    /// The index of the member that leads, as a running member reports it.
    pub async fn leader(&self, http: &reqwest::Client) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for m in &self.members {
            let status: Option<serde_json::Value> = async {
                http.post(format!("{}/v3/maintenance/status", m.client_url))
                    .json(&serde_json::json!({}))
                    .timeout(Duration::from_millis(500))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()
            }
            .await;
            let id = status
                .as_ref()
                .and_then(|s| s["header"]["member_id"].as_str().map(String::from));
            if let Some(l) = status.as_ref().and_then(|s| s["leader"].as_str()) {
                leader = Some(l.to_string());
            }
            ids.push(id);
        }
        let leader = leader?;
        ids.iter()
            .position(|id| id.as_deref() == Some(leader.as_str()))
    }
}

impl Drop for EtcdCluster {
    /// On an early return, a panic or a signal: kill, give the processes a moment to exit (so
    /// they write no more into the directory), then the directory is removed with `dir`.
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(c) = m.child.as_mut() {
                let _ = c.start_kill();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for m in &mut self.members {
            if let Some(c) = m.child.as_mut() {
                while !matches!(c.try_wait(), Ok(Some(_)) | Err(_)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// etcd's TLS flags: HTTPS for clients with a certificate for 127.0.0.1 from the test CA
/// (written into `dir`), and TLS between members with etcd's own self-signed certificates
/// (`--peer-auto-tls`: etcd checks a member's client certificate for the client-auth key usage,
/// which the test CA's server certificates do not carry). Every byte is encrypted as between
/// mcpd's nodes; only who checks whose certificate at the handshake differs, which kept-alive
/// connections pay once.
fn etcd_tls_args(dir: &Path) -> anyhow::Result<Vec<String>> {
    let ca = mcpcp_pki::Ca::load(crate::test_ca()).context("the test CA")?;
    let names = ["127.0.0.1".to_string(), "localhost".to_string()];
    let issued = ca
        .issue_server(&names, Duration::from_secs(24 * 3600))
        .context("etcd's certificate")?;
    let cert = dir.join("etcd.pem");
    let key = dir.join("etcd.key");
    mcpcp_pki::files::write_public(&cert, &issued.cert_pem)?;
    mcpcp_pki::files::write_private(&key, &issued.key_pem)?;
    let path = |p: &Path| p.display().to_string();
    Ok(vec![
        "--cert-file".into(),
        path(&cert),
        "--key-file".into(),
        path(&key),
        "--peer-auto-tls".into(),
    ])
}
