//! Routing and resilience against real nodes and real server processes: placement and
//! re-placement, peer forwarding, circuit breakers, fallbacks, sessions that outlive their
//! node, and no duplicate execution of a non-idempotent tool.

use std::collections::BTreeMap;
use std::time::Duration;

use mcpcp_tests::{demo_server, eventually, tool_text, Cluster, Mcp};
use mcpctl::CallOptions;
use serde_json::json;

const GRACE: &[&str] = &["--placement-grace-ms", "2000"];

fn mcp_url(c: &Cluster, node: u64, server: &str) -> String {
    format!("{}/servers/{server}/mcp", c.url(node))
}

async fn placement(c: &Cluster, server: &str) -> Vec<u64> {
    let client = c.client();
    eventually(
        &format!("a placement for {server}"),
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let server = server.to_string();
            async move {
                let st = client.server_status(&server).await.ok()?;
                (!st.placement.is_empty()).then_some(st.placement)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_one_node_is_reached_from_every_node_and_re_placed_when_its_node_dies() {
    let mut c = Cluster::start_with(3, GRACE).await;
    let ledger = c.dir.path().join("solo.jsonl");
    let mut spec = demo_server("solo", &ledger);
    spec.replicas = Some(1);
    c.client()
        .create_server(&spec, &CallOptions::default())
        .await
        .expect("register");
    let placed = placement(&c, "solo").await;
    assert_eq!(placed.len(), 1);
    let host = placed[0];
    let other = *c
        .running_ids()
        .iter()
        .find(|id| **id != host)
        .expect("another node");

    // Served through a node that does not run it (forwarded over gRPC).
    let session = eventually(
        "a session through a non-hosting node",
        Duration::from_secs(30),
        || {
            let url = mcp_url(&c, other, "solo");
            let token = c.admin_token.clone();
            async move { Mcp::open(&url, &token).await.ok() }
        },
    )
    .await;
    let r = session
        .call_tool("echo", json!({"message": "forwarded"}))
        .await
        .expect("call");
    assert_eq!(tool_text(&r).as_deref(), Some("forwarded"), "{r}");

    // Its node dies: the leader re-places it, and the same session keeps calling.
    c.kill(host).await;
    let r = eventually(
        "calls to work again after re-placement",
        Duration::from_secs(45),
        || {
            let s = &session;
            async move {
                let r = s
                    .call_tool("echo", json!({"message": "after"}))
                    .await
                    .ok()?;
                (tool_text(&r).as_deref() == Some("after")).then_some(r)
            }
        },
    )
    .await;
    assert!(r["error"].is_null());
    let now = placement(&c, "solo").await;
    assert!(
        !now.contains(&host),
        "still placed on the dead node {host}: {now:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_server_opens_its_breaker_and_closes_it_when_it_recovers() {
    let c = Cluster::start_with(3, GRACE).await;
    let ledger = c.dir.path().join("flaky.jsonl");
    let mut spec = demo_server("flaky", &ledger);
    spec.replicas = Some(1);
    c.client()
        .create_server(&spec, &CallOptions::default())
        .await
        .expect("register");
    let host = placement(&c, "flaky").await[0];
    let session = eventually("a session", Duration::from_secs(30), || {
        let url = mcp_url(&c, host, "flaky");
        let token = c.admin_token.clone();
        async move { Mcp::open(&url, &token).await.ok() }
    })
    .await;
    // The server itself fails (its process dies mid-call) until the breaker opens; then
    // calls short-circuit with a clear error.
    let opened = eventually("the breaker to open", Duration::from_secs(60), || {
        let s = &session;
        async move {
            let r = s.call_tool("crash", json!({})).await.ok()?;
            let msg = r["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            msg.contains("circuit").then_some(msg)
        }
    })
    .await;
    assert!(opened.contains("did not run"), "{opened}");
    let status = c
        .node_client(host)
        .server_status("flaky")
        .await
        .expect("status");
    assert!(
        status.breakers.iter().any(|b| b["state"] == "open"),
        "{:?}",
        status.breakers
    );
    // The server itself is fine: after the open time, probes go through and close it.
    eventually(
        "the breaker to close again",
        Duration::from_secs(30),
        || {
            let s = &session;
            async move {
                let r = s.call_tool("echo", json!({"message": "ok"})).await.ok()?;
                (tool_text(&r).as_deref() == Some("ok")).then_some(())
            }
        },
    )
    .await;
    let status = c
        .node_client(host)
        .server_status("flaky")
        .await
        .expect("status");
    let states: Vec<_> = status.breakers.iter().map(|b| b["state"].clone()).collect();
    assert!(states.iter().all(|s| s != "open"), "{states:?}");
}

/// Why a server is failing, where the operator looks: `mcpctl server status` (and its JSON)
/// gives each process slot's last error, how its last process ended and its last stderr lines,
/// not only `crash_loop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_status_says_why_a_server_is_failing() {
    let c = Cluster::start(1).await;
    let client = c.client();
    let mut missing = demo_server("missing", &c.dir.path().join("unused.jsonl"));
    missing.command = "uvx-is-not-installed".into();
    missing.args.clear();
    missing.pool_size = 1;
    let mut dying = demo_server("dying", &c.dir.path().join("unused.jsonl"));
    dying.command = "/bin/sh".into();
    dying.args = vec!["-c".into(), "echo 'fatal: no API key' >&2; exit 3".into()];
    dying.pool_size = 1;
    for spec in [&missing, &dying] {
        client
            .create_server(spec, &CallOptions::default())
            .await
            .expect("register");
    }
    let report = |name: &'static str| {
        let client = c.node_client(1);
        move || {
            let client = client.clone();
            async move {
                let st = client.server_status(name).await.ok()?;
                let p = st.replicas.first()?.details.first()?.clone();
                p.last_error.is_some().then_some(p)
            }
        }
    };
    let p = eventually(
        "the start error of missing",
        Duration::from_secs(30),
        report("missing"),
    )
    .await;
    let e = p.last_error.expect("an error");
    assert!(
        e.contains("uvx-is-not-installed") && e.contains("No such file or directory"),
        "{e}"
    );
    let p = eventually(
        "the exit and stderr of dying",
        Duration::from_secs(30),
        || {
            let f = report("dying");
            async move {
                f().await
                    .filter(|p| !p.stderr.is_empty() && p.last_exit.is_some())
            }
        },
    )
    .await;
    assert_eq!(p.last_exit.as_deref(), Some("exit status: 3"), "{p:?}");
    assert!(p.stderr.iter().any(|l| l == "fatal: no API key"), "{p:?}");

    // The text an operator reads says the same.
    let out = std::process::Command::new(mcpcp_tests::binary("mcpctl"))
        .args(["server", "status", "missing"])
        .env("MCPCTL_ENDPOINTS", c.url(1))
        .env("MCPCTL_TOKEN", &c.admin_token)
        .env("MCPCTL_CACERT", mcpcp_tests::test_ca_cert())
        .output()
        .expect("mcpctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("last error: spawning \"uvx-is-not-installed\""),
        "{text}"
    );
}

/// A breaker counts failures of the server itself only. One client whose tool calls the
/// server answers with errors, and who leaves the server's elicitation unanswered until each
/// call times out, does not open the breaker of a healthy server: its other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_client_cannot_open_a_healthy_server_s_breaker_for_others() {
    let c = Cluster::start(1).await;
    let ledger = c.dir.path().join("shared.jsonl");
    let mut spec = demo_server("shared", &ledger);
    spec.timeouts.request_ms = 1000;
    c.client()
        .create_server(&spec, &CallOptions::default())
        .await
        .expect("register");
    let url = mcp_url(&c, 1, "shared");
    let open = |capabilities: serde_json::Value| {
        let (url, token) = (url.clone(), c.admin_token.clone());
        move || {
            let (url, token, capabilities) = (url.clone(), token.clone(), capabilities.clone());
            async move { Mcp::open_declaring(&url, &token, capabilities).await.ok() }
        }
    };
    let rude = eventually(
        "a session that takes elicitation",
        Duration::from_secs(30),
        open(json!({"elicitation": {}})),
    )
    .await;
    let polite = eventually("a second session", Duration::from_secs(30), open(json!({}))).await;

    // More than the breaker's min_calls (10) and consecutive_failures (5) of each kind.
    for i in 0..12 {
        let r = rude
            .call_tool("fail", json!({"message": "boom"}))
            .await
            .expect("fail");
        assert_eq!(r["result"]["isError"], json!(true), "call {i}: {r}");
        let r = rude
            .call_tool("no_such_tool", json!({}))
            .await
            .expect("unknown");
        assert!(r["error"]["code"].is_i64(), "call {i}: {r}");
    }
    let parked: Vec<_> = (0..6)
        .map(|_| rude.call_tool("test_elicitation", json!({"message": "who are you?"})))
        .collect();
    for r in futures_util::future::join_all(parked).await {
        let r = r.expect("elicitation call");
        assert_eq!(
            r["error"]["code"],
            json!(-32052),
            "timed out waiting on the client: {r}"
        );
    }

    // The other client is served, and no breaker opened.
    let r = polite
        .call_tool("echo", json!({"message": "still served"}))
        .await
        .expect("echo");
    assert_eq!(tool_text(&r).as_deref(), Some("still served"), "{r}");
    let status = c
        .node_client(1)
        .server_status("shared")
        .await
        .expect("status");
    assert!(
        status.breakers.iter().all(|b| b["state"] == "closed"),
        "{:?}",
        status.breakers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_server_is_answered_by_its_fallback_marked_in_meta_on_both_endpoints() {
    let c = Cluster::start_with(3, GRACE).await;
    let ledger = c.dir.path().join("backup.jsonl");
    let client = c.client();
    client
        .create_server(&demo_server("backup", &ledger), &CallOptions::default())
        .await
        .expect("backup");
    let mut primary = demo_server("primary", &ledger);
    primary.command = "/bin/false".into();
    primary.args.clear();
    primary.fallbacks = vec!["backup".into()];
    primary.timeouts.request_ms = 2000;
    client
        .create_server(&primary, &CallOptions::default())
        .await
        .expect("primary");
    let session = eventually("an aggregate session", Duration::from_secs(30), || {
        let url = format!("{}/mcp", c.url(1));
        let token = c.admin_token.clone();
        async move { Mcp::open(&url, &token).await.ok() }
    })
    .await;
    let r = eventually("the fallback to answer", Duration::from_secs(60), || {
        let s = &session;
        async move {
            let r = s
                .call_tool("primary__echo", json!({"message": "via fallback"}))
                .await
                .ok()?;
            (tool_text(&r).as_deref() == Some("via fallback")).then_some(r)
        }
    })
    .await;
    let meta = &r["result"]["_meta"]["io.mcpcp/fallback"];
    assert_eq!(meta["server"], "primary", "{r}");
    assert_eq!(meta["fallback"], "backup", "{r}");

    // A client configured with the primary's own URL is served by the fallback too, from
    // `initialize` on, each answer marked the same way.
    let own = Mcp::open(&format!("{}/servers/primary/mcp", c.url(2)), &c.admin_token)
        .await
        .expect("initialize on the primary's own endpoint");
    let marked = |r: &serde_json::Value| {
        let m = &r["result"]["_meta"]["io.mcpcp/fallback"];
        m["server"] == "primary" && m["fallback"] == "backup"
    };
    assert!(marked(&own.init), "initialize: {}", own.init);
    // Only its tools stand in for the primary's: nothing else falls back.
    let capabilities = &own.init["result"]["capabilities"];
    assert!(capabilities.get("tools").is_some(), "{capabilities}");
    assert!(capabilities.get("resources").is_none(), "{capabilities}");
    let tools = own
        .request("tools/list", json!({}))
        .await
        .expect("tools/list");
    assert!(marked(&tools), "tools/list: {tools}");
    assert!(
        tools["result"]["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "echo")),
        "{tools}"
    );
    let r = own
        .call_tool("echo", json!({"message": "via the primary's URL"}))
        .await
        .expect("tools/call");
    assert_eq!(
        tool_text(&r).as_deref(),
        Some("via the primary's URL"),
        "{r}"
    );
    assert!(marked(&r), "tools/call: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_session_id_keeps_working_on_another_node_after_its_node_is_killed() {
    let mut c = Cluster::start_with(3, GRACE).await;
    let ledger = c.dir.path().join("demo.jsonl");
    c.client()
        .create_server(&demo_server("demo", &ledger), &CallOptions::default())
        .await
        .expect("register");
    let first = c.running_ids()[0];
    let second = c.running_ids()[1];
    let session = eventually("a session", Duration::from_secs(30), || {
        let url = format!("{}/mcp", c.url(first));
        let token = c.admin_token.clone();
        async move { Mcp::open(&url, &token).await.ok() }
    })
    .await;
    let set = session
        .request("logging/setLevel", json!({"level": "error"}))
        .await
        .expect("setLevel");
    assert!(set["error"].is_null(), "{set}");
    let r = session
        .call_tool("demo__echo", json!({"message": "before"}))
        .await
        .expect("call");
    assert_eq!(tool_text(&r).as_deref(), Some("before"));
    c.kill(first).await;
    let moved = session.at(&format!("{}/mcp", c.url(second)));
    let r = moved
        .call_tool("demo__echo", json!({"message": "after"}))
        .await
        .expect("call on another node");
    assert_eq!(tool_text(&r).as_deref(), Some("after"), "{r}");
    // A session id that was not signed by the cluster is not accepted.
    let mut tampered = moved.at(&format!("{}/mcp", c.url(second)));
    tampered.session.push('x');
    let err = tampered
        .call_tool("demo__echo", json!({"message": "x"}))
        .await
        .expect_err("404");
    assert!(err.contains("404"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_idempotent_tool_never_runs_twice_across_a_node_kill() {
    let mut c = Cluster::start_with(3, GRACE).await;
    let ledger = c.dir.path().join("counter.jsonl");
    c.client()
        .create_server(&demo_server("counter", &ledger), &CallOptions::default())
        .await
        .expect("register");
    let ids = c.running_ids();
    let session = eventually("a session", Duration::from_secs(30), || {
        let url = format!("{}/servers/counter/mcp", c.url(ids[0]));
        let token = c.admin_token.clone();
        async move { Mcp::open(&url, &token).await.ok() }
    })
    .await;
    let mut outcomes = BTreeMap::new();
    let mut current = session;
    for i in 0..30 {
        if i == 10 {
            c.kill(ids[0]).await;
            current = current.at(&format!("{}/servers/counter/mcp", c.url(ids[1])));
        }
        let key = format!("k{i}");
        let args = json!({});
        let params = json!({"name": "counter_increment", "arguments": args, "_meta": {"mcpd/request-key": key}});
        let outcome = match current.request("tools/call", params).await {
            Ok(r) if r["error"].is_null() => "ok",
            Ok(_) => "error",
            Err(_) => "transport",
        };
        outcomes.insert(key, outcome);
    }
    let text = std::fs::read_to_string(&ledger).expect("ledger");
    let mut seen = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("ledger line");
        let key = v["key"].as_str().expect("key").to_string();
        *seen.entry(key).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    // Everything acknowledged as ok did run.
    for (k, o) in &outcomes {
        if *o == "ok" {
            assert_eq!(
                seen.get(k),
                Some(&1),
                "{k} answered ok but is not in the ledger"
            );
        }
    }
    let ok = outcomes.values().filter(|o| **o == "ok").count();
    assert!(
        ok >= 25,
        "too few calls succeeded across the kill: {outcomes:?}"
    );
}
