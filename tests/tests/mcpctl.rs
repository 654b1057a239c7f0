//! The `mcpctl` binary as an operator runs it: `dev up`/`dev down`, exit codes, import.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use mcpcp_tests::binary;

fn mcpctl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(binary("mcpctl"));
    cmd.args(args)
        .env_remove("MCPCTL_ENDPOINTS")
        .env_remove("MCPCTL_TOKEN")
        .env_remove("MCPCTL_CACERT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run mcpctl")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Reads `export K='V'` lines of the env file `dev up` writes.
fn env_file(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("env"))
        .expect("env file")
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

/// Polls `check` every `every` until it returns `Ok`, failing with its last `Err` once `within`
/// has passed.
fn poll_until(within: Duration, every: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + within;
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if std::time::Instant::now() >= deadline => {
                panic!("not within {within:?}: {why}")
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// `dev up` on a directory that holds a cluster with stopped nodes: it succeeds and says which
/// it starts again.
fn dev_up_again(d: &str, mcpd: &str, says: &str) {
    let up = mcpctl(&["dev", "up", "--dir", d, "--mcpd", mcpd], &[]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(
        String::from_utf8_lossy(&up.stderr).contains(says),
        "{}",
        text(&up)
    );
}

/// Stops the dev cluster even when an assertion fails.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let dir = self.0.to_string_lossy().to_string();
        let _ = mcpctl(&["dev", "down", "--dir", &dir], &[]);
    }
}

#[test]
fn dev_up_serves_a_cluster_and_dev_down_stops_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("dev");
    let d = dir.to_string_lossy().to_string();
    let mcpd = binary("mcpd");
    let mcpd = mcpd.to_string_lossy().to_string();
    let _down = Down(&dir);
    let up = mcpctl(
        &["dev", "up", "--nodes", "3", "--dir", &d, "--mcpd", &mcpd],
        &[],
    );
    assert!(up.status.success(), "{}", text(&up));

    let env = env_file(&dir);
    let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "MCPCTL_ENDPOINTS",
            "MCPCTL_TOKEN",
            "MCPCTL_CACERT",
            "MCP_BRIDGE_URL",
            "MCP_BRIDGE_TOKEN",
            "MCP_BRIDGE_CACERT",
            "PATH"
        ]
    );
    let value = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    // TLS by default: https endpoints, the CA in DIR, and the binaries first on PATH.
    assert!(
        value("MCPCTL_ENDPOINTS").is_some_and(|e| e.split(',').all(|u| u.starts_with("https://")))
    );
    assert_eq!(
        value("MCPCTL_CACERT"),
        Some(
            dir.canonicalize()
                .expect("dir")
                .join("ca.pem")
                .to_string_lossy()
                .to_string()
        )
    );
    assert_eq!(value("MCP_BRIDGE_CACERT"), value("MCPCTL_CACERT"));
    let bin = binary("mcpctl").canonicalize().expect("mcpctl");
    assert!(
        value("PATH")
            .is_some_and(|p| p.starts_with(&*bin.parent().expect("dir").to_string_lossy())),
        "{env:?}"
    );
    // PATH is `'<dir>':"$PATH"` for the shell; the tests pass variables themselves.
    let env: Vec<(&str, &str)> = env
        .iter()
        .filter(|(k, _)| k != "PATH")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Without the CA, the nodes' certificates are not trusted: nothing is sent in clear.
    let untrusted = mcpctl(
        &["server", "list"],
        &env.iter()
            .copied()
            .filter(|(k, _)| *k != "MCPCTL_CACERT")
            .collect::<Vec<_>>(),
    );
    assert_eq!(untrusted.status.code(), Some(3), "{}", text(&untrusted));
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("certificate"),
        "{}",
        text(&untrusted)
    );
    for n in 1..=3 {
        assert!(dir.join(format!("node{n}/mcpd.pid")).exists());
        assert!(dir.join(format!("node{n}/mcpd.log")).exists());
    }

    let list = mcpctl(&["server", "list", "-o", "json"], &env);
    assert!(list.status.success(), "{}", text(&list));
    let servers: serde_json::Value = serde_json::from_slice(&list.stdout).expect("JSON");
    assert_eq!(servers[0]["spec"]["name"], "demo");

    // A second `dev up` on a running directory is a usage error.
    let again = mcpctl(&["dev", "up", "--dir", &d, "--mcpd", &mcpd], &[]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    // A killed node: `dev up` brings it back on its old addresses; it serves again.
    let pid = |n: u32| -> u32 {
        std::fs::read_to_string(dir.join(format!("node{n}/mcpd.pid")))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    };
    let killed = pid(2);
    assert!(mcpctl::dev::signal(killed, "KILL"));
    poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || match mcpctl::dev::alive(killed) {
            true => Err(format!("node 2 (pid {killed}) still runs after SIGKILL")),
            false => Ok(()),
        },
    );
    dev_up_again(&d, &mcpd, "node(s) 2 stopped");
    assert_ne!(pid(2), killed);
    let node2 = env_file(&dir)
        .into_iter()
        .find(|(k, _)| k == "MCPCTL_ENDPOINTS")
        .map(|(_, v)| v.split(',').nth(1).unwrap_or_default().to_string())
        .expect("endpoints");
    let admin_token = env
        .iter()
        .find(|(k, _)| *k == "MCPCTL_TOKEN")
        .map(|(_, v)| *v)
        .expect("MCPCTL_TOKEN");
    // It catches up (its own state answers, the admin token included) within a bound.
    poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let direct = mcpctl(
            &["server", "list", "--stale", "-o", "json"],
            &[
                ("MCPCTL_ENDPOINTS", &node2),
                ("MCPCTL_TOKEN", admin_token),
                ("MCPCTL_CACERT", &value("MCPCTL_CACERT").expect("CA")),
            ],
        );
        match direct.status.success() && String::from_utf8_lossy(&direct.stdout).contains("demo") {
            true => Ok(()),
            false => Err(format!("node 2 has not caught up: {}", text(&direct))),
        }
    });

    // `token create` prints only the token.
    let tok = mcpctl(
        &["token", "create", "--tenant", "default", "--name", "t"],
        &env,
    );
    assert!(tok.status.success(), "{}", text(&tok));
    let out = String::from_utf8_lossy(&tok.stdout);
    assert_eq!(out.lines().count(), 1);
    assert!(out.starts_with("mcpt_"));

    // Import the prototype's YAML.
    let yaml = tmp.path().join("control_plane.yaml");
    std::fs::write(
        &yaml,
        "auth_tokens: [\"x\"]\nmcp_servers:\n  - id: files\n    type: npx\n    command: [\"npx\", \"-y\", \"@modelcontextprotocol/server-filesystem\", \"/tmp\"]\n    enabled: true\n",
    )
    .expect("yaml");
    let imp = mcpctl(&["import", &yaml.to_string_lossy()], &env);
    assert!(imp.status.success(), "{}", text(&imp));
    let get = mcpctl(&["server", "get", "files", "-o", "json"], &env);
    assert!(get.status.success(), "{}", text(&get));
    let files: serde_json::Value = serde_json::from_slice(&get.stdout).expect("JSON");
    assert_eq!(files["spec"]["command"], "npx");

    // Errors: usage is 2, a refused write is 1.
    let bad = mcpctl(
        &["server", "add", "x", "--pool-size", "0", "--", "true"],
        &env,
    );
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("pool_size"));

    let down = mcpctl(&["dev", "down", "--dir", &d], &[]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(mcpctl::dev::running_pids(&dir).is_empty());

    // Nothing answers any more: exit code 3.
    let gone = mcpctl(&["server", "list"], &env);
    assert_eq!(gone.status.code(), Some(3), "{}", text(&gone));

    // `dev up` on the stopped cluster starts it again: same addresses and tokens (the env
    // file still works), same data.
    let before = std::fs::read_to_string(dir.join("env")).expect("env file");
    dev_up_again(&d, &mcpd, "1, 2, 3 stopped: starting them again");
    assert_eq!(
        std::fs::read_to_string(dir.join("env")).expect("env file"),
        before
    );
    let get = mcpctl(&["server", "get", "files", "-o", "json"], &env);
    assert!(get.status.success(), "{}", text(&get));
    // Writes work: the restarted nodes elected a leader among themselves.
    let add = mcpctl(&["tenant", "add", "after-restart"], &env);
    assert!(add.status.success(), "{}", text(&add));

    // Output to a reader that went away (`mcpctl tenant list | head -1`) ends the command
    // quietly, not with a panic.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut cmd = std::process::Command::new(binary("mcpctl"));
    cmd.args(["tenant", "list"])
        .envs(env.iter().copied())
        .stdout(writer);
    let closed = cmd.output().expect("run mcpctl");
    assert_eq!(closed.status.code(), Some(0), "{}", text(&closed));
    assert!(
        !String::from_utf8_lossy(&closed.stderr).contains("panicked"),
        "{}",
        text(&closed)
    );
}
