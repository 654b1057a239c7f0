//! Server processes as an operator sees them from outside: no process outlives its node.

use std::time::Duration;

use mcpcp_tests::{binary, demo_server, eventually, tool_text, Cluster, Mcp};
use mcpctl::CallOptions;
use serde_json::json;

/// Pids whose command line (NUL-separated arguments) contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(marker) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_process_or_its_children_outlive_a_stopped_node() {
    let mut c = Cluster::start(3).await;
    // A server that spawns a child of its own (as `npx` does), with a marker to find both.
    let marker = format!(
        "{}.{}",
        3000 + std::process::id() % 1000,
        fastrand::u32(100..999)
    );
    let ledger = c.dir.path().join("ledger.jsonl");
    let mut spec = demo_server("forky", &ledger);
    spec.command = "/bin/sh".into();
    spec.args = vec![
        "-c".into(),
        format!(
            "sleep {marker} & exec {} demo-server",
            binary("mcpd").display()
        ),
    ];
    spec.pool_size = 2;
    c.client()
        .create_server(&spec, &CallOptions::default())
        .await
        .expect("register");
    let session = eventually("the server to answer", Duration::from_secs(30), || {
        let url = format!("{}/servers/forky/mcp", c.url(1));
        let token = c.admin_token.clone();
        async move { Mcp::open(&url, &token).await.ok() }
    })
    .await;
    let r = session
        .call_tool("echo", json!({"message": "hi"}))
        .await
        .expect("call");
    assert_eq!(tool_text(&r).as_deref(), Some("hi"));
    let before = eventually(
        "the marked children of every node's pool",
        Duration::from_secs(30),
        || {
            let found = processes_with(&marker);
            async move { (found.len() >= 6).then_some(found) }
        },
    )
    .await;
    assert!(before.len() >= 6, "{before:?}");
    for id in c.running_ids() {
        let status = c.terminate(id).await;
        assert!(status.success(), "node {id} exited with {status}");
    }
    let left = processes_with(&marker);
    assert!(
        left.is_empty(),
        "orphaned processes after every node stopped: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_mode_gives_each_session_its_own_process() {
    let c = Cluster::start(3).await;
    let ledger = c.dir.path().join("ledger.jsonl");
    let mut spec = demo_server("ded", &ledger);
    spec.session_mode = mcpcp_proto::api::SessionMode::Dedicated;
    spec.pool_size = 1;
    c.client()
        .create_server(&spec, &CallOptions::default())
        .await
        .expect("register");
    let open = || {
        let url = format!("{}/servers/ded/mcp", c.url(1));
        let token = c.admin_token.clone();
        async move { Mcp::open(&url, &token).await.ok() }
    };
    let a = eventually("session a", Duration::from_secs(30), open).await;
    let b = eventually("session b", Duration::from_secs(30), open).await;
    // The demo counts per process: a session with its own process counts from 1.
    let count = |r: serde_json::Value| tool_text(&r).unwrap_or_default();
    assert_eq!(
        count(
            a.call_tool("counter_increment", json!({}))
                .await
                .expect("a1")
        ),
        "1"
    );
    assert_eq!(
        count(
            a.call_tool("counter_increment", json!({}))
                .await
                .expect("a2")
        ),
        "2"
    );
    assert_eq!(
        count(
            b.call_tool("counter_increment", json!({}))
                .await
                .expect("b1")
        ),
        "1"
    );
    let pids: std::collections::BTreeSet<u64> = std::fs::read_to_string(&ledger)
        .expect("ledger")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("line")["pid"]
                .as_u64()
                .expect("pid")
        })
        .collect();
    assert_eq!(pids.len(), 2, "two sessions, two processes: {pids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sse_stream_resumes_with_last_event_id() {
    let c = Cluster::start(1).await;
    let ledger = c.dir.path().join("ledger.jsonl");
    c.client()
        .create_server(&demo_server("demo", &ledger), &CallOptions::default())
        .await
        .expect("register");
    let url = format!("{}/servers/demo/mcp", c.url(1));
    let session = eventually("a session", Duration::from_secs(30), || {
        let (url, token) = (url.clone(), c.admin_token.clone());
        async move { Mcp::open(&url, &token).await.ok() }
    })
    .await;
    let http = mcpcp_tests::https();
    let req = |b: reqwest::RequestBuilder| {
        b.bearer_auth(&c.admin_token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &session.session)
            .header("mcp-protocol-version", "2025-06-18")
    };
    let call = json!({"jsonrpc": "2.0", "id": 42, "method": "tools/call",
        "params": {"name": "sleep", "arguments": {"ms": 900, "steps": 3}, "_meta": {"progressToken": "p"}}});
    // Read the first event, then drop the connection.
    let mut resp = req(http.post(&url)).json(&call).send().await.expect("post");
    let mut first = String::new();
    while !first.contains("\n\n") {
        let chunk = resp.chunk().await.expect("stream").expect("a first event");
        first.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(resp);
    let last_id = first
        .lines()
        .find_map(|l| l.strip_prefix("id:"))
        .map(|s| s.trim().to_string())
        .expect("events carry ids");
    let rest = req(http.get(&url))
        .header("last-event-id", &last_id)
        .send()
        .await
        .expect("resume")
        .text()
        .await
        .expect("rest of the stream");
    assert!(
        rest.contains("\"id\":42"),
        "the answer arrives on the resumed stream: {rest}"
    );
    assert!(
        !rest.contains(&format!("id: {last_id}\n")),
        "no event is sent twice: {rest}"
    );
    assert!(rest.contains("slept 900 ms"), "{rest}");
}

/// Kills the processes whose command line holds a marker, also when the test fails.
struct KillMarked(String);

impl Drop for KillMarked {
    fn drop(&mut self) {
        for pid in processes_with(&self.0) {
            if let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedicated_process_slow_to_start_holds_up_only_its_own_session() {
    let c = Cluster::start(1).await;
    let ledger = c.dir.path().join("ledger.jsonl");
    let slow = c.dir.path().join("slow-start");
    // Started while `slow` exists, the server first sleeps (a marked `sleep`, to find it).
    let marker = format!(
        "{}.{}",
        3000 + std::process::id() % 1000,
        fastrand::u32(100..999)
    );
    let _cleanup = KillMarked(marker.clone());
    let mut spec = demo_server("slowded", &ledger);
    spec.session_mode = mcpcp_proto::api::SessionMode::Dedicated;
    spec.pool_size = 1;
    spec.command = "/bin/sh".into();
    spec.args = vec![
        "-c".into(),
        format!(
            "if [ -e '{}' ]; then sleep {marker}; fi; exec {} demo-server",
            slow.display(),
            binary("mcpd").display()
        ),
    ];
    c.client()
        .create_server(&spec, &CallOptions::default())
        .await
        .expect("register");
    let url = format!("{}/servers/slowded/mcp", c.url(1));
    let open = || {
        let (url, token) = (url.clone(), c.admin_token.clone());
        async move { Mcp::open(&url, &token).await.ok() }
    };
    let a = eventually("session a", Duration::from_secs(30), open).await;
    let r = a
        .call_tool("echo", json!({"message": "a1"}))
        .await
        .expect("a1");
    assert_eq!(tool_text(&r).as_deref(), Some("a1"));

    // Session b's process now hangs in its start.
    std::fs::write(&slow, b"").expect("flag");
    let b = tokio::spawn({
        let (url, token) = (url.clone(), c.admin_token.clone());
        async move {
            let b = Mcp::open(&url, &token).await?;
            b.call_tool("echo", json!({"message": "b1"})).await
        }
    });
    eventually(
        "session b's process to be starting",
        Duration::from_secs(30),
        || {
            let found = processes_with(&marker);
            async move { (!found.is_empty()).then_some(()) }
        },
    )
    .await;

    // Session a's calls go on meanwhile (before, they waited for b's start to end).
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        a.call_tool("echo", json!({"message": "a2"})),
    )
    .await
    .expect("session a's call waited for session b's process to start")
    .expect("a2");
    assert_eq!(tool_text(&r).as_deref(), Some("a2"));
    assert!(!b.is_finished(), "session b's call ended: {:?}", b.await);
    b.abort();
}
