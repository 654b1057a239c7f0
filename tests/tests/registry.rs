//! End-to-end tests of the replicated registry against real `mcpd` processes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mcpcp_proto::api::{AddNodeRequest, ServerSpec, TenantSpec};
use mcpcp_proto::cluster::cluster_client::ClusterClient;
use mcpcp_proto::cluster::{ForwardWriteRequest, ReadIndexRequest};
use mcpcp_tests::{eventually, https, Cluster};
use mcpctl::{AdminClient, CallOptions, ClientError};

fn server(name: &str) -> ServerSpec {
    serde_json::from_value(serde_json::json!({
        "name": name, "command": "uvx", "args": ["mcp-server-time"],
    }))
    .expect("spec")
}

fn tenant(name: &str) -> TenantSpec {
    TenantSpec {
        name: name.into(),
        description: None,
        weight: 1,
    }
}

async fn server_names(client: &AdminClient, stale: bool) -> Result<BTreeSet<String>, ClientError> {
    Ok(client
        .list_servers(stale)
        .await?
        .items
        .into_iter()
        .map(|s| s.spec.name)
        .collect())
}

/// The tenant names `client`'s node lists, read linearizably.
async fn tenant_names(client: &AdminClient) -> BTreeSet<String> {
    client
        .list_tenants(false)
        .await
        .expect("read")
        .items
        .into_iter()
        .map(|t| t.spec.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_on_follower_is_visible_on_every_node() {
    let c = Cluster::start(3).await;
    let follower = c.follower().await;
    let ack = c
        .node_client(follower)
        .create_server(&server("time"), &CallOptions::default())
        .await
        .expect("write through a follower");
    assert!(ack.revision > 0);
    for id in c.running_ids() {
        // Linearizable (the default): must see the acknowledged write at once, no polling.
        let s = c
            .node_client(id)
            .get_server("time", false)
            .await
            .expect("read");
        assert_eq!(s.revision, ack.revision, "node {id}");
        assert_eq!(s.spec.args, vec!["mcp-server-time"]);
    }
}

/// The leader hands each new entry to the followers before its own fsync of it is done
/// (`raft::early`), in-step followers accept it, and openraft's own appends get answered from
/// those acknowledgements. Were the early appends refused or never sent, writes would still
/// work, only slower, so this is checked here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_sends_new_entries_to_followers_during_its_own_fsync() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let client = c.node_client(leader);
    let url = c.url(leader);
    let early = |outcome: &str| format!("mcpd_raft_early_appends_total{{outcome=\"{outcome}\"}}");
    // Which of a follower's two answers comes first is a race, so write until both show,
    // at most 200 times.
    let mut writes = 0;
    loop {
        client
            .create_server(&server(&format!("s{writes}")), &CallOptions::default())
            .await
            .expect("write");
        writes += 1;
        let (accepted, _) = c.scrape_sum(&url, &early("accepted")).await;
        let (answered, metrics) = c
            .scrape_sum(&url, "mcpd_raft_appends_answered_early_total")
            .await;
        if accepted >= 5.0 && answered >= 1.0 {
            break;
        }
        assert!(
            writes < 200,
            "after {writes} writes: {accepted} early appends accepted, {answered} appends answered early:\n{metrics}"
        );
    }
    let (refused, metrics) = c.scrape_sum(&url, &early("refused")).await;
    assert_eq!(refused, 0.0, "followers refused early appends:\n{metrics}");
    // Every acknowledged write is on every node.
    for id in c.running_ids() {
        let names = server_names(&c.node_client(id), false).await.expect("read");
        assert_eq!(names.len(), writes, "node {id}");
    }
}

/// During a rolling upgrade an older follower still forwards with the unary calls
/// (`ForwardWrite`, `ReadIndex`) rather than the `Forward` stream; the leader must serve them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_still_serves_an_older_follower_s_unary_forwarding() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let follower = c.other_than(leader);
    let channel = c
        .peer_channel(&c.nodes[&leader].member.grpc_addr, follower)
        .await
        .expect("connect as the follower");
    let mut client = ClusterClient::new(channel);
    // What an older follower sends: a registry `Request`, as JSON.
    let request = serde_json::json!({
        "request_id": "older-follower-1",
        "command": { "PutTenant": {
            "spec": { "name": "from-older", "description": null },
            "precondition": "Absent",
        } },
    });
    let reply = client
        .forward_write(ForwardWriteRequest {
            command: serde_json::to_vec(&request).unwrap(),
            traceparent: String::new(),
        })
        .await
        .expect("ForwardWrite")
        .into_inner();
    let result: serde_json::Value = serde_json::from_slice(&reply.result).expect("JSON");
    assert!(result.get("Ok").is_some(), "{result}");
    let index = client
        .read_index(ReadIndexRequest {})
        .await
        .expect("ReadIndex")
        .into_inner();
    let index: serde_json::Value = serde_json::from_slice(&index.result).expect("JSON");
    assert!(index["Ok"]["index"].as_u64().is_some(), "{index}");
    for id in c.running_ids() {
        let names = tenant_names(&c.node_client(id)).await;
        assert!(names.contains("from-older"), "node {id}: {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_read_after_write_from_another_node() {
    let c = Cluster::start(3).await;
    let ids = c.running_ids();
    for round in 0..10 {
        let writer = ids[round % 3];
        let reader = ids[(round + 1) % 3];
        let name = format!("t{round}");
        c.node_client(writer)
            .create_tenant(&tenant(&name), &CallOptions::default())
            .await
            .expect("write");
        let seen = tenant_names(&c.node_client(reader)).await;
        assert!(
            seen.contains(&name),
            "node {reader} missed {name} written on {writer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_writes_survive_leader_kill_and_the_node_catches_up() {
    let mut c = Cluster::start(3).await;
    let client = c.client();
    let mut acked = BTreeSet::new();
    for i in 0..20 {
        let name = format!("s{i}");
        client
            .create_server(&server(&name), &CallOptions::default())
            .await
            .expect("write");
        acked.insert(name);
    }
    let old_leader = c.wait_leader().await;
    c.kill(old_leader).await;
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, old_leader);
    let client = c.client();
    assert_eq!(server_names(&client, false).await.expect("read"), acked);
    let status = client.cluster_status().await.expect("status");
    let dead = status
        .members
        .iter()
        .find(|m| m.id == old_leader)
        .expect("still a member");
    assert_eq!(dead.health, "unreachable", "{status:?}");
    assert!(status
        .members
        .iter()
        .filter(|m| m.id != old_leader)
        .all(|m| m.health == "healthy"));
    for i in 20..25 {
        let name = format!("s{i}");
        client
            .create_server(&server(&name), &CallOptions::default())
            .await
            .expect("write after failover");
        acked.insert(name);
    }
    c.restart(old_leader).await;
    let back = c.node_client(old_leader);
    let expected = acked.clone();
    eventually(
        "the restarted node to catch up",
        Duration::from_secs(30),
        || {
            let back = back.clone();
            let expected = expected.clone();
            async move { (server_names(&back, true).await.ok()? == expected).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_node_with_new_id_catches_up_by_snapshot() {
    let mut c = Cluster::start_with(3, &["--snapshot-every", "20", "--keep-logs", "5"]).await;
    let client = c.client();
    let mut acked = BTreeSet::new();
    for i in 0..60 {
        let name = format!("s{i}");
        client
            .create_server(&server(&name), &CallOptions::default())
            .await
            .expect("write");
        acked.insert(name);
    }
    let leader = c.wait_leader().await;
    let status = eventually(
        "a snapshot and a purged log on the leader",
        Duration::from_secs(30),
        || {
            let lc = c.node_client(leader);
            async move {
                let s = lc.cluster_status().await.ok()?;
                (s.snapshot_index.is_some() && s.purged_index.is_some()).then_some(s)
            }
        },
    )
    .await;
    assert!(status.purged_index.unwrap_or(0) > 0);

    // Replace a follower: wipe it, remove it, bring in a new node with a new id.
    let victim = *c
        .running_ids()
        .iter()
        .find(|id| **id != leader)
        .expect("follower");
    c.wipe(victim).await;
    client
        .remove_node(victim)
        .await
        .expect("remove the wiped node");
    let member = c.spawn(4).await;
    c.add_member(&member).await;
    let n4 = c.node_client(4);
    let expected = acked.clone();
    eventually(
        "node 4 to have every acknowledged write",
        Duration::from_secs(30),
        || {
            let n4 = n4.clone();
            let expected = expected.clone();
            async move { (server_names(&n4, true).await.ok()? == expected).then_some(()) }
        },
    )
    .await;
    let (installs, metrics) = c
        .scrape_sum(&c.url(4), "mcpd_raft_snapshot_installs_total")
        .await;
    assert!(
        installs >= 1.0,
        "node 4 caught up without installing a snapshot:\n{metrics}"
    );

    // The wiped node's id is never reused.
    let err = c
        .client()
        .add_node(&AddNodeRequest {
            id: victim,
            http_addr: "127.0.0.1:1".into(),
            grpc_addr: "127.0.0.1:2".into(),
            voter: true,
        })
        .await
        .expect_err("a used id is refused");
    assert_eq!(err.status(), Some(409), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_fail_within_the_bound_and_stale_reads_answer() {
    let mut c = Cluster::start_with(3, &["--quorum-wait-ms", "2000"]).await;
    c.client()
        .create_server(&server("time"), &CallOptions::default())
        .await
        .expect("write");
    let survivor = c.follower().await;
    for id in c.running_ids() {
        if id != survivor {
            c.kill(id).await;
        }
    }
    let client = c.node_client(survivor);
    let started = Instant::now();
    let err = client
        .create_server(&server("late"), &CallOptions::default())
        .await
        .expect_err("no quorum");
    // Not a speed assertion: the bound is 2 s, this only proves the call does not hang.
    assert!(started.elapsed() < Duration::from_secs(20), "write hung");
    assert_eq!(err.status(), Some(503), "{err}");
    assert_eq!(err.code(), Some("no_quorum"));
    assert_eq!(err.exit_code(), 3);

    // The raw answer carries Retry-After.
    let resp = https()
        .post(format!("{}/v1/tenants", c.url(survivor)))
        .bearer_auth(&c.admin_token)
        .json(&serde_json::json!({"name": "x"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));

    let err = client
        .list_servers(false)
        .await
        .expect_err("linearizable read needs quorum");
    assert_eq!(err.status(), Some(503));
    let stale = server_names(&client, true).await.expect("stale read");
    assert!(stale.contains("time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_fourth_node_remove_one_and_keep_serving() {
    let mut c = Cluster::start(3).await;
    let member = c.spawn(4).await;
    c.client()
        .add_node(&AddNodeRequest {
            id: 4,
            http_addr: member.http_addr,
            grpc_addr: member.grpc_addr,
            voter: true,
        })
        .await
        .expect("add node 4");
    let s = c.client().cluster_status().await.expect("status");
    let voters: BTreeSet<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3, 4]));

    let leader = c.wait_leader().await;
    let gone = *c
        .running_ids()
        .iter()
        .find(|id| **id != leader)
        .expect("follower");
    c.client().remove_node(gone).await.expect("remove");
    c.kill(gone).await;
    c.client()
        .create_tenant(&tenant("after"), &CallOptions::default())
        .await
        .expect("write after removal");
    let s = c.client().cluster_status().await.expect("status");
    let voters: BTreeSet<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert_eq!(voters.len(), 3);
    assert!(!voters.contains(&gone));
    let names = tenant_names(&c.node_client(4)).await;
    assert!(names.contains("after"));
}

/// Concurrent writes share Raft entries (the leader batches them); each must still get its
/// own answer: one create of a name wins, the other is told it already exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_each_get_their_own_answer() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let follower = c.follower().await;
    const NAMES: usize = 40;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..NAMES {
        // Each name twice: once through the leader, once through a follower (forwarded).
        for node in [leader, follower] {
            let client = c.node_client(node);
            tasks.spawn(async move {
                let r = client
                    .create_tenant(&tenant(&format!("t{i}")), &CallOptions::default())
                    .await;
                (i, r.map(|a| a.revision).map_err(|e| e.status()))
            });
        }
    }
    let mut created: Vec<Vec<u64>> = vec![Vec::new(); NAMES];
    let mut refused = [0; NAMES];
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined.expect("task");
        match r {
            Ok(rev) => created[i].push(rev),
            Err(Some(409)) => refused[i] += 1,
            Err(other) => panic!("t{i}: unexpected answer {other:?}"),
        }
    }
    let mut revisions = BTreeSet::new();
    for (i, (won, lost)) in created.iter().zip(refused).enumerate() {
        assert_eq!(
            (won.len(), lost),
            (1, 1),
            "t{i}: one create wins, one is refused"
        );
        assert!(revisions.insert(won[0]), "t{i}: a revision answered twice");
    }
    let listed = c.client().list_tenants(false).await.expect("list").items;
    for (i, won) in created.iter().enumerate() {
        let t = listed
            .iter()
            .find(|t| t.spec.name == format!("t{i}"))
            .unwrap_or_else(|| panic!("t{i} missing"));
        assert_eq!(t.revision, won[0], "t{i}: the winner's revision");
    }
    // The follower forwarded its writes, all at once, over a shared stream to the leader
    // (`registry::forward`), not one stream each.
    let url = c.url(follower);
    let (forwarded, _) = c
        .scrape_sum(&url, "mcpd_registry_forwarded_writes_total")
        .await;
    let (opened, metrics) = c
        .scrape_sum(
            &url,
            "mcpd_registry_forward_streams_total{event=\"opened\"}",
        )
        .await;
    assert!(forwarded >= NAMES as f64, "forwarded writes:\n{metrics}");
    assert!(
        (1.0..=2.0).contains(&opened),
        "forward streams opened:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_and_idempotent_retries() {
    let c = Cluster::start(3).await;
    let client = c.client();
    let first = client
        .create_server(&server("cas"), &CallOptions::default())
        .await
        .expect("create");
    let mut changed = server("cas");
    changed.pool_size = 4;
    let stale_rev = CallOptions {
        if_match: Some(first.revision + 100),
        ..Default::default()
    };
    let err = client
        .put_server(&changed, &stale_rev)
        .await
        .expect_err("wrong revision");
    assert_eq!(err.status(), Some(412));
    let right_rev = CallOptions {
        if_match: Some(first.revision),
        ..Default::default()
    };
    let second = client.put_server(&changed, &right_rev).await.expect("cas");
    assert!(second.revision > first.revision);

    // The same Idempotency-Key twice applies once and answers the same revision.
    let keyed = CallOptions {
        idempotency_key: Some("create-acme-1".into()),
        ..Default::default()
    };
    let a = client
        .create_tenant(&tenant("acme"), &keyed)
        .await
        .expect("first");
    let b = client
        .create_tenant(&tenant("acme"), &keyed)
        .await
        .expect("retry answers the first outcome");
    assert_eq!(a.revision, b.revision);
    let unkeyed = client
        .create_tenant(&tenant("acme"), &CallOptions::default())
        .await
        .expect_err("a new request is a duplicate");
    assert_eq!(unkeyed.status(), Some(409));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_node_stays_up() {
    let c = Cluster::start(3).await;
    let http = https();
    let url = c.url(1);
    let admin = &c.admin_token;
    let post = |path: &str, body: &str, token: &str| {
        http.post(format!("{url}{path}"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    async fn error_of(resp: reqwest::Response) -> (u16, serde_json::Value) {
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.expect("JSON error body");
        (status, body["error"].clone())
    }

    let (s, e) = error_of(
        post("/v1/servers", "{not json", admin)
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("malformed JSON"),
        "{e}"
    );

    let (s, e) = error_of(
        post(
            "/v1/servers",
            r#"{"name":"a","command":"x","pool_sise":3}"#,
            admin,
        )
        .await
        .expect("answer"),
    )
    .await;
    assert_eq!((s, e["field"].as_str()), (400, Some("pool_sise")), "{e}");

    let (s, e) = error_of(
        post("/v1/servers", r#"{"command":"x"}"#, admin)
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!((s, e["field"].as_str()), (400, Some("name")), "{e}");

    let (s, e) = error_of(
        post("/v1/servers", r#"{"name":"Bad Name","command":"x"}"#, admin)
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!((s, e["field"].as_str()), (422, Some("name")), "{e}");

    let first = post("/v1/servers", r#"{"name":"dup","command":"x"}"#, admin)
        .await
        .expect("answer");
    assert_eq!(first.status(), 201);
    let (s, e) = error_of(
        post("/v1/servers", r#"{"name":"dup","command":"x"}"#, admin)
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str()),
        (409, Some("already_exists")),
        "{e}"
    );

    let (s, e) = error_of(
        post(
            "/v1/servers",
            r#"{"name":"t","command":"x","tenant":"nope"}"#,
            admin,
        )
        .await
        .expect("answer"),
    )
    .await;
    assert_eq!((s, e["field"].as_str()), (422, Some("tenant")), "{e}");

    let (s, e) = error_of(
        post("/v1/tokens", r#"{"name":"t","tenant":"nope"}"#, admin)
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!((s, e["field"].as_str()), (422, Some("tenant")), "{e}");

    // Bad token: 401 with WWW-Authenticate.
    let resp = post(
        "/v1/servers",
        r#"{"name":"x","command":"x"}"#,
        "mcpt_000000000000_nope",
    )
    .await
    .expect("answer");
    assert!(resp.headers().contains_key("www-authenticate"));
    assert_eq!(resp.status(), 401);
    let resp = http
        .get(format!("{url}/v1/servers"))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 401);

    // A tenant token may not use the admin API; a revoked token may not use anything.
    let client = c.client();
    client
        .create_tenant(&tenant("acme"), &CallOptions::default())
        .await
        .expect("tenant");
    let created = client
        .create_token(&mcpcp_proto::api::CreateTokenRequest {
            name: "alice".into(),
            role: None,
            tenant: Some("acme".into()),
            ttl_seconds: None,
            scopes: None,
        })
        .await
        .expect("token");
    let resp = http
        .get(format!("{url}/v1/servers"))
        .bearer_auth(&created.token)
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 403);
    let admin2 = client
        .create_token(&mcpcp_proto::api::CreateTokenRequest {
            name: "ops".into(),
            role: Some(mcpcp_proto::api::Role::ClusterAdmin),
            tenant: None,
            ttl_seconds: None,
            scopes: None,
        })
        .await
        .expect("admin token");
    let resp = http
        .get(format!("{url}/v1/servers"))
        .bearer_auth(&admin2.token)
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 200);
    client.revoke_token(&admin2.info.id).await.expect("revoke");
    for id in c.running_ids() {
        // Revocation is applied before the revoke call returns on the node that took it, and
        // within a moment everywhere.
        let u = c.url(id);
        let tok = admin2.token.clone();
        eventually(
            "revocation to reach every node",
            Duration::from_secs(5),
            || {
                let http = http.clone();
                let u = u.clone();
                let tok = tok.clone();
                async move {
                    let r = http
                        .get(format!("{u}/v1/servers"))
                        .bearer_auth(&tok)
                        .send()
                        .await
                        .ok()?;
                    (r.status() == 401).then_some(())
                }
            },
        )
        .await;
    }

    // Unknown query parameter and unknown endpoint.
    let resp = http
        .get(format!("{url}/v1/servers?consistency=sometimes"))
        .bearer_auth(admin)
        .send()
        .await
        .expect("answer");
    let (s, e) = error_of(resp).await;
    assert_eq!(s, 400, "{e}");
    let resp = http
        .get(format!("{url}/v1/nothing"))
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 404);

    // Still up and serving.
    let live = http
        .get(format!("{url}/livez"))
        .send()
        .await
        .expect("livez");
    assert_eq!(live.status(), 200);
    let ready = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_holds_no_token_secret() {
    let c = Cluster::start_with(3, &["--snapshot-every", "5", "--keep-logs", "1"]).await;
    let client = c.client();
    client
        .create_tenant(&tenant("acme"), &CallOptions::default())
        .await
        .expect("tenant");
    let mut secrets = vec![c.admin_token.clone()];
    for i in 0..8 {
        let t = client
            .create_token(&mcpcp_proto::api::CreateTokenRequest {
                name: format!("t{i}"),
                role: None,
                tenant: Some("acme".into()),
                ttl_seconds: Some(3600),
                scopes: None,
            })
            .await
            .expect("token");
        secrets.push(t.token);
    }
    let leader = c.wait_leader().await;
    eventually("a snapshot on the leader", Duration::from_secs(20), || {
        let lc = c.node_client(leader);
        async move { lc.cluster_status().await.ok()?.snapshot_index.map(|_| ()) }
    })
    .await;
    let mut files = 0;
    for dir in c.data_dirs() {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
                let p = entry.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let bytes = std::fs::read(&p).expect("read file");
                files += 1;
                for s in &secrets {
                    // The random part alone must not appear either.
                    // `mcpt_<12 hex>_<secret>`; the secret's own alphabet includes '_'.
                    let random = &s["mcpt_".len() + 12 + 1..];
                    assert!(random.len() >= 40, "{s}");
                    assert!(
                        !bytes.windows(random.len()).any(|w| w == random.as_bytes()),
                        "{} contains a token secret",
                        p.display()
                    );
                }
            }
        }
    }
    assert!(files >= 9, "expected the nodes' data files, found {files}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_changes_from_a_revision() {
    let c = Cluster::start(3).await;
    let client = c.client();
    let first = client
        .create_tenant(&tenant("a"), &CallOptions::default())
        .await
        .expect("write");
    client
        .create_tenant(&tenant("b"), &CallOptions::default())
        .await
        .expect("write");
    let follower = c.follower().await;
    let mut resp = https()
        .get(format!(
            "{}/v1/watch?since={}",
            c.url(follower),
            first.revision - 1
        ))
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .expect("watch");
    assert_eq!(resp.status(), 200);
    client
        .delete_tenant("a", &CallOptions::default())
        .await
        .expect("delete");
    // Each change also streams its audit event (kind "audit"), which an object watcher skips.
    let mut buf = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let objects = |buf: &str| -> Vec<serde_json::Value> {
        buf.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .filter(|e| e["kind"] != "audit")
            .collect()
    };
    while objects(&buf).len() < 3 || buf.lines().count() < 6 {
        let chunk = tokio::time::timeout_at(deadline.into(), resp.chunk())
            .await
            .expect("watch events in time")
            .expect("stream")
            .expect("open stream");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events = objects(&buf);
    let audited: Vec<String> = buf
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|e| e["kind"] == "audit")
        .map(|e| e["value"]["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(audited, ["put_tenant", "put_tenant", "delete_tenant"]);
    assert_eq!(events[0]["type"], "put");
    assert_eq!(events[0]["name"], "a");
    assert_eq!(events[1]["name"], "b");
    assert_eq!(events[2]["type"], "delete");
    assert_eq!(events[2]["name"], "a");
    assert!(events[0]["revision"].as_u64() < events[2]["revision"].as_u64());
}
