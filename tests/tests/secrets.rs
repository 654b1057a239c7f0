//! Server `env` values are secrets: sealed in the Raft log, snapshots and redb, never shown by
//! the API or the watch stream or written to a log, and still given to the server's process.
//! A process gets its own `env` and an allowlist of `mcpd`'s environment, nothing else.

use std::path::Path;
use std::time::Duration;

use mcpcp_proto::api::REDACTED;
use mcpcp_tests::{demo_server, eventually, https, tool_text, Cluster, Mcp};
use mcpctl::CallOptions;
use serde_json::json;

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s))
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_value_is_sealed_at_rest_never_shown_and_still_reaches_the_process() {
    // Snapshots every few entries, so the secret also passes through state.redb.
    let c = Cluster::start_with(3, &["--snapshot-every", "5", "--keep-logs", "2"]).await;
    let secret = format!("s3cr3t-{}", fastrand::u64(..));
    let ledger = c.dir.path().join("ledger.jsonl");
    let mut spec = demo_server("vault", &ledger);
    spec.env.insert("API_KEY".into(), secret.clone());
    let admin = c.client();
    let mut watch = https()
        .get(format!("{}/v1/watch", c.url(2)))
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .expect("watch");
    admin
        .create_server(&spec, &CallOptions::default())
        .await
        .expect("register");

    // The API and the watch stream show the names, never the values.
    let shown = admin.get_server("vault", false).await.expect("get");
    assert!(
        shown.spec.env.values().all(|v| v == REDACTED),
        "{:?}",
        shown.spec.env
    );
    assert!(shown.spec.env.contains_key("API_KEY"));
    let listed =
        serde_json::to_string(&admin.list_servers(false).await.expect("list").items).expect("json");
    assert!(!listed.contains(&secret), "{listed}");
    // The watch stream's next lines, read until the new server's event (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut event = String::new();
    while !event.contains("vault") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let chunk = tokio::time::timeout(left, watch.chunk())
            .await
            .expect("the watch event of the new server within 10 s")
            .expect("watch stream")
            .expect("watch stream open");
        event.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        event.contains(REDACTED) && !event.contains(&secret),
        "{event}"
    );

    // The process received the value (its digest matches), its ledger path too; and of
    // mcpd's own environment only the allowlist: PATH, not the RUST_LOG mcpd runs with.
    let url = format!("{}/servers/vault/mcp", c.url(1));
    let session = eventually("the server to answer", Duration::from_secs(30), || {
        let (url, token) = (url.clone(), c.admin_token.clone());
        async move { Mcp::open(&url, &token).await.ok() }
    })
    .await;
    let digest = |name: &str| {
        let session = &session;
        let name = name.to_string();
        async move {
            let r = session
                .call_tool("env_sha256", json!({ "name": name }))
                .await
                .expect("call");
            (r["result"]["isError"] != true)
                .then(|| tool_text(&r))
                .flatten()
        }
    };
    assert_eq!(digest("API_KEY").await, Some(sha256_hex(&secret)));
    assert!(digest("PATH").await.is_some(), "PATH is inherited");
    assert_eq!(
        digest("RUST_LOG").await,
        None,
        "mcpd's RUST_LOG reached the process"
    );
    let r = session
        .call_tool("counter_increment", json!({}))
        .await
        .expect("call");
    assert_eq!(tool_text(&r).as_deref(), Some("1"), "{r}");
    assert!(ledger.exists(), "the process did not get MCPD_DEMO_LEDGER");

    // Writing the spec back as read (values "<redacted>") keeps the stored values.
    let mut back = shown.spec.clone();
    back.pool_size = 1;
    admin
        .put_server(&back, &CallOptions::default())
        .await
        .expect("put back");
    let r = eventually(
        "the re-registered server to answer",
        Duration::from_secs(30),
        || {
            let (url, token) = (url.clone(), c.admin_token.clone());
            async move {
                let s = Mcp::open(&url, &token).await.ok()?;
                s.call_tool("counter_increment", json!({})).await.ok()
            }
        },
    )
    .await;
    assert!(tool_text(&r).is_some(), "{r}");
    assert_eq!(
        std::fs::read_to_string(&ledger)
            .expect("ledger")
            .lines()
            .count(),
        2,
        "the second process did not get the kept value"
    );
    // A "<redacted>" for a name that has no stored value is refused, naming it.
    let mut bad = back.clone();
    bad.env.insert("NEW".into(), REDACTED.into());
    let err = admin
        .put_server(&bad, &CallOptions::default())
        .await
        .expect_err("a redacted value with nothing stored");
    assert_eq!(err.status(), Some(422), "{err}");
    assert!(err.to_string().contains("env.NEW"), "{err}");

    // Nothing at rest or in a log holds the value: not the Raft log, not a snapshot, not
    // redb, not a node's log.
    for n in c.nodes.values() {
        let dir = n.data_dir.parent().expect("node dir");
        let leaks = files_containing(dir, &secret);
        assert!(leaks.is_empty(), "node {}: {leaks:?}", n.id);
    }
}
