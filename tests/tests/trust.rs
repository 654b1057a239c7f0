//! The cluster's trust boundary, tried from outside as an attacker on the network would:
//! every gRPC service refuses a caller without TLS, without a client certificate, with a
//! certificate of another CA, with a certificate of the cluster's CA that names no member, and
//! with the certificate of a node removed from the membership; a member's succeeds. What the
//! issue found injectable (a `CreateToken` or `PutServer` forwarded by anyone) is refused
//! before it reaches Raft.

use std::sync::Arc;
use std::time::Duration;

use mcpcp_pki::{Ca, ClusterId};
use mcpcp_proto::cluster::cluster_client::ClusterClient;
use mcpcp_proto::cluster::{ForwardWriteRequest, PingRequest};
use mcpcp_proto::raft::raft_client::RaftClient;
use mcpcp_proto::raft::RaftPayload;
use mcpcp_tests::{eventually, test_ca, test_ca_cert, Cluster};
use mcpd::tls::peer::PeerConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Channel, Endpoint};

/// A gRPC channel to `addr` whose TLS client trusts the cluster's CA (so the server's
/// certificate is accepted and any refusal is the server's) and presents `client` (a PEM
/// certificate and key), or nothing.
async fn dial(
    addr: &str,
    client: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let roots = mcpcp_pki::trust::roots(Some(&test_ca_cert())).expect("roots");
    let builder = rustls::ClientConfig::builder_with_provider(mcpcp_pki::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let cluster = ClusterId::new("e2e").expect("valid");
    let connector = PeerConnector::with_config(Arc::new(config), &cluster).expect("connector");
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
}

/// What the issue injected: an admin token whose hash the attacker chose.
fn create_token(id: &str) -> ForwardWriteRequest {
    let request = serde_json::json!({
        "request_id": format!("injected-{id}"),
        "command": { "CreateToken": {
            "info": { "id": id, "name": id, "role": "admin", "tenant": null,
                      "created_at": 0, "expires_at": null },
            "hash": "0000000000000000000000000000000000000000000000000000000000000000",
        } },
    });
    ForwardWriteRequest {
        command: serde_json::to_vec(&request).expect("json"),
        traceparent: String::new(),
    }
}

/// A ping, a write and a Raft vote over `channel`; each result's error code, or `Ok`.
async fn try_every_service(channel: Channel) -> Vec<Result<(), tonic::Code>> {
    let mut cluster = ClusterClient::new(channel.clone());
    let mut raft = RaftClient::new(channel);
    let ping = cluster.ping(PingRequest {}).await.map(|_| ());
    let write = cluster
        .forward_write(create_token("evil"))
        .await
        .map(|_| ());
    // A made-up vote with a high term: the issue's way to depose the leader.
    let vote = serde_json::json!({
        "vote": { "leader_id": { "term": 1000, "node_id": 99 }, "committed": false },
        "last_log_id": null,
    });
    let vote = raft
        .vote(RaftPayload {
            data: serde_json::to_vec(&vote).expect("json"),
        })
        .await
        .map(|_| ());
    [ping, write, vote]
        .into_iter()
        .map(|r| r.map_err(|s| s.code()))
        .collect()
}

fn all_refused(what: &str, results: &[Result<(), tonic::Code>]) {
    assert!(
        results.iter().all(|r| r.is_err()),
        "{what}: a call went through: {results:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_current_member_reaches_a_node_s_grpc_services() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let addr = c.nodes[&leader].member.grpc_addr.clone();
    let term_before = c.client().cluster_status().await.expect("status").term;

    // No TLS at all: the handshake never happens, nothing reaches a service.
    match Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        Err(_) => {}
        Ok(plain) => all_refused("plaintext", &try_every_service(plain).await),
    }

    // TLS, but no client certificate.
    match dial(&addr, None).await {
        Err(_) => {}
        Ok(ch) => all_refused("no client certificate", &try_every_service(ch).await),
    }

    // A certificate of another CA (same cluster name, another key).
    let other = Ca::create(&ClusterId::new("e2e").expect("valid")).expect("another CA");
    let forged = other.issue_node(1, Duration::from_secs(600)).expect("cert");
    match dial(&addr, Some((&forged.cert_pem, &forged.key_pem))).await {
        Err(_) => {}
        Ok(ch) => all_refused("another CA", &try_every_service(ch).await),
    }

    // The cluster's CA, but a node id that is no member: the handshake passes, every call is
    // refused with PERMISSION_DENIED.
    let ca = Ca::load(test_ca()).expect("the cluster CA");
    let stranger = ca.issue_node(99, Duration::from_secs(600)).expect("cert");
    let ch = dial(&addr, Some((&stranger.cert_pem, &stranger.key_pem)))
        .await
        .expect("a CA-signed certificate completes the handshake");
    let results = try_every_service(ch).await;
    assert!(
        results
            .iter()
            .all(|r| *r == Err(tonic::Code::PermissionDenied)),
        "{results:?}"
    );

    // A member succeeds (the control: the refusals above are about identity, not the calls).
    let follower = c.other_than(leader);
    let member = c
        .peer_channel(&addr, follower)
        .await
        .expect("connect as a member");
    let mut as_member = ClusterClient::new(member);
    as_member
        .ping(PingRequest {})
        .await
        .expect("a member's ping is served");
    // The same write from a member is applied: the refused one was well-formed.
    as_member
        .forward_write(create_token("by-member"))
        .await
        .expect("a member's forwarded write");

    // Nothing from outside was injected and the leader was not deposed.
    let tokens = c.client().list_tokens(false).await.expect("tokens");
    let ids: Vec<&str> = tokens.items.iter().map(|t| t.id.as_str()).collect();
    assert!(
        ids.contains(&"by-member") && !ids.contains(&"evil"),
        "{ids:?}"
    );
    let status = c.client().cluster_status().await.expect("status");
    assert_eq!(status.term, term_before, "a forged vote changed the term");
    assert_eq!(status.leader, Some(leader));

    // A removed node's certificate is refused once its removal is in the membership.
    let removed = c
        .nodes
        .keys()
        .copied()
        .find(|id| *id != leader && *id != follower)
        .expect("a third node");
    let removed_cert = ca
        .issue_node(removed, Duration::from_secs(600))
        .expect("cert");
    let as_removed = dial(&addr, Some((&removed_cert.cert_pem, &removed_cert.key_pem)))
        .await
        .expect("handshake");
    ClusterClient::new(as_removed.clone())
        .ping(PingRequest {})
        .await
        .expect("still a member: served");
    c.client().remove_node(removed).await.expect("remove node");
    c.kill(removed).await;
    eventually(
        "the removed node's certificate to be refused",
        Duration::from_secs(10),
        || {
            let ch = as_removed.clone();
            async move {
                match ClusterClient::new(ch).ping(PingRequest {}).await {
                    Err(s) if s.code() == tonic::Code::PermissionDenied => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;
}

/// Bootstrap happens once, ever; the last admin token cannot be revoked; and when every admin
/// token is lost anyway (here: the last one expired), access comes back only through a node's
/// host (`mcpd recover-admin`), never through `init`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_initialised_once_and_admin_access_is_recovered_through_a_host() {
    let mut c = Cluster::start(3).await;
    let admin = c.client();
    let first = admin.list_tokens(false).await.expect("tokens").items;
    assert_eq!(first.len(), 1, "{first:?}");
    let bootstrap_id = first[0].id.clone();

    // The last admin token cannot be revoked.
    let err = admin
        .revoke_token(&bootstrap_id)
        .await
        .expect_err("revoking the last admin token");
    assert_eq!(err.code(), Some("in_use"), "{err}");

    // With a second (short-lived) admin token it can; then the short-lived one expires and
    // no admin token works any more.
    let short = admin
        .create_token(&mcpcp_proto::api::CreateTokenRequest {
            name: "short".into(),
            role: Some(mcpcp_proto::api::Role::ClusterAdmin),
            tenant: None,
            ttl_seconds: Some(2),
            scopes: None,
        })
        .await
        .expect("a second admin token");
    admin
        .revoke_token(&bootstrap_id)
        .await
        .expect("revoke the first");
    c.admin_token = short.token.clone();
    eventually(
        "the short-lived admin token to expire",
        Duration::from_secs(10),
        || {
            let client = c.client();
            async move {
                match client.list_tokens(false).await {
                    Err(e) if e.status() == Some(401) => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;

    // `init` on the initialised cluster is refused, whatever tokens exist, on every node.
    for id in c.running_ids() {
        let anon =
            mcpctl::AdminClient::new(&[c.url(id)], None, Some(&test_ca_cert())).expect("client");
        let err = anon
            .init(c.nodes.values().map(|n| n.member.clone()).collect())
            .await
            .expect_err("a second init");
        assert_eq!(err.code(), Some("already_initialized"), "node {id}: {err}");
    }

    // Recovery on node 2's host: a new admin token, usable on every node, recorded by name.
    let out = tokio::process::Command::new(mcpcp_tests::binary("mcpd"))
        .args(["recover-admin", "--data-dir"])
        .arg(&c.nodes[&2].data_dir)
        .output()
        .await
        .expect("run mcpd recover-admin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.admin_token = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    let tokens = c
        .node_client(3)
        .list_tokens(false)
        .await
        .expect("the recovered token works");
    assert!(
        tokens
            .items
            .iter()
            .any(|t| t.name == "recovered-admin-node2"),
        "{:?}",
        tokens.items
    );
    // The code worked once: it is gone from the data directory.
    assert!(!c.nodes[&2].data_dir.join(mcpd::recovery::FILE).exists());
}

/// `mcpctl cluster rotate-certs` under load: every node takes new certificates (peer and
/// HTTPS) while writes and reads go on, and none of them fails; new connections use the new
/// certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let c = Cluster::start(3).await;
    let before: Vec<Vec<u8>> = c
        .nodes
        .values()
        .map(|n| std::fs::read(n.data_dir.join("tls/node.pem")).expect("node.pem"))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let client = c.client();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut done = 0u32;
            // Bounded: stops when told, or after 2000 writes.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && done < 2000 {
                let spec = mcpcp_proto::api::TenantSpec {
                    name: format!("load-{done}"),
                    description: None,
                    weight: 1,
                };
                client
                    .create_tenant(&spec, &mcpctl::CallOptions::default())
                    .await
                    .map_err(|e| format!("write {done} failed during rotation: {e}"))?;
                client
                    .list_tenants(false)
                    .await
                    .map_err(|e| e.to_string())?;
                done += 1;
            }
            Ok::<u32, String>(done)
        })
    };
    for round in 0..3 {
        for id in c.running_ids() {
            c.node_client(id)
                .rotate_certs()
                .await
                .unwrap_or_else(|e| panic!("round {round}, node {id}: {e}"));
        }
    }
    // Fresh connections (a new client) handshake with the new certificates.
    c.client()
        .cluster_status()
        .await
        .expect("status over a new connection");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = load.await.expect("load task").expect("no request failed");
    assert!(writes > 0);
    let after: Vec<Vec<u8>> = c
        .nodes
        .values()
        .map(|n| std::fs::read(n.data_dir.join("tls/node.pem")).expect("node.pem"))
        .collect();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_ne!(b, a, "node {} kept its peer certificate", i + 1);
    }
    // Replication still works between the nodes with their new certificates.
    let leader = c.wait_leader().await;
    let follower = c
        .running_ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("follower");
    c.node_client(follower)
        .create_tenant(
            &mcpcp_proto::api::TenantSpec {
                name: "after-rotation".into(),
                description: None,
                weight: 1,
            },
            &mcpctl::CallOptions::default(),
        )
        .await
        .expect("a forwarded write after rotation");
}

/// A new node joins with a single-use join token and an empty TLS directory: it pins the CA
/// the token names, has its own certificate requests signed (its keys never leave it, and it
/// gets no CA key), receives the data key, and becomes a member; nothing is copied by hand. The token works once, for its node id only, and a node given a token that
/// pins another CA refuses the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_a_single_use_token_and_nothing_copied_by_hand() {
    let mut c = Cluster::start(3).await;
    let admin = c.client();
    let created = admin.create_join_token(4, None).await.expect("join token");
    let token = created["token"].as_str().expect("token").to_string();
    let via = c.url(1);

    // A join request as a node makes one: the token, its id, two certificate requests.
    let join_body = |node_id: u64| {
        let (_, peer_csr) = mcpcp_pki::ca::key_and_request().expect("csr");
        let (_, edge_csr) = mcpcp_pki::ca::key_and_request().expect("csr");
        serde_json::json!({ "token": token, "node_id": node_id, "peer_csr": peer_csr,
                            "edge_csr": edge_csr, "edge_names": ["127.0.0.1"] })
    };
    // For another node id, the token is refused (and not used up).
    let wrong_node = mcpcp_tests::https()
        .post(format!("{via}/v1/cluster/join"))
        .json(&join_body(5))
        .send()
        .await
        .expect("join as another id");
    assert_eq!(wrong_node.status().as_u16(), 403);

    // A token that pins another CA: the joining side refuses the node before sending it.
    let other = Ca::create(&ClusterId::new("e2e").expect("valid")).expect("another CA");
    let (prefix, _) = token.rsplit_once('.').expect("token");
    let misplaced = format!(
        "{prefix}.{}",
        other.fingerprint().trim_start_matches("sha256:")
    );
    let dir = tempfile::tempdir().expect("dir");
    let names = vec!["127.0.0.1".to_string()];
    let err = mcpd::join::join(&via, &misplaced, 4, &names, dir.path())
        .await
        .expect_err("a token pinning another CA");
    assert!(err.to_string().contains("fingerprint"), "{err}");
    assert!(!dir.path().join("ca.key").exists());

    // The node joins with the right token and an empty TLS directory.
    let member = c.spawn_joining(4, &via, &token).await;
    let tls = c.nodes[&4].data_dir.join("tls");
    // Its own keys stay with it; it holds no CA key, so it can mint no certificate.
    assert!(
        !tls.join("ca.key").exists(),
        "a joined node received the CA key"
    );
    for (file, mode) in [
        ("data.key", 0o600),
        ("node.key", 0o600),
        ("edge.key", 0o600),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(tls.join(file))
            .expect(file)
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{file}");
    }
    // Before it is a member, node 4 admits over gRPC only the members it was told about when
    // it joined (not any holder of a cluster certificate), and refuses `init`.
    let ca = Ca::load(test_ca()).expect("the cluster CA");
    let stranger = ca.issue_node(99, Duration::from_secs(600)).expect("cert");
    let ch = dial(
        &member.grpc_addr,
        Some((&stranger.cert_pem, &stranger.key_pem)),
    )
    .await
    .expect("handshake");
    let refused = ClusterClient::new(ch)
        .ping(PingRequest {})
        .await
        .expect_err("a stranger");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let anon = mcpctl::AdminClient::new(&[c.url(4)], None, Some(&test_ca_cert())).expect("client");
    let err = anon
        .init(vec![member.clone()])
        .await
        .expect_err("init on a joined node");
    assert_eq!(err.code(), Some("joined"), "{err}");
    c.add_member(&member).await;
    // It is a member that replicates, and it opens the cluster's sealed secrets (same data key).
    let mut spec = mcpcp_tests::demo_server("sealed", &c.dir.path().join("ledger.jsonl"));
    spec.env.insert("API_KEY".into(), "joined-secret".into());
    admin
        .create_server(&spec, &mcpctl::CallOptions::default())
        .await
        .expect("register");
    let url = format!("{}/servers/sealed/mcp", c.url(4));
    let session = eventually(
        "node 4 to run the sealed server",
        Duration::from_secs(30),
        || {
            let (url, token) = (url.clone(), c.admin_token.clone());
            async move { mcpcp_tests::Mcp::open(&url, &token).await.ok() }
        },
    )
    .await;
    let r = session
        .call_tool("env_sha256", serde_json::json!({ "name": "API_KEY" }))
        .await
        .expect("call");
    use sha2::Digest;
    assert_eq!(
        mcpcp_tests::tool_text(&r),
        Some(hex::encode(sha2::Sha256::digest("joined-secret"))),
        "{r}"
    );

    // The token is used up.
    let again = mcpcp_tests::https()
        .post(format!("{via}/v1/cluster/join"))
        .json(&join_body(4))
        .send()
        .await
        .expect("join again");
    assert_eq!(again.status().as_u16(), 403);
}

/// A joined node holds no CA key, so it cannot issue its own certificates: its renewals (and
/// `rotate-certs`) are signed by a member that holds the key, over mutual TLS, for the node id
/// its certificate names. The new certificates are installed in place and on disk, and the
/// node restarts on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_renews_its_certificates_through_a_member_that_holds_the_ca_key() {
    let mut c = Cluster::start(3).await;
    let admin = c.client();
    let created = admin.create_join_token(4, None).await.expect("join token");
    let token = created["token"].as_str().expect("token").to_string();
    let via = c.url(1);
    let member = c.spawn_joining(4, &via, &token).await;
    c.add_member(&member).await;
    let tls = c.nodes[&4].data_dir.join("tls");
    let read = |file: &str| std::fs::read_to_string(tls.join(file)).expect(file);
    let (peer_before, edge_before) = (read("node.pem"), read("edge.pem"));

    // The operator rotates node 4's certificates; it has a member sign new ones.
    let answer = c
        .node_client(4)
        .rotate_certs()
        .await
        .expect("rotate on node 4");
    assert!(answer["peer_not_after"].as_u64().is_some(), "{answer}");
    let (peer_after, edge_after) = (read("node.pem"), read("edge.pem"));
    assert_ne!(peer_before, peer_after, "node.pem was not renewed");
    assert_ne!(edge_before, edge_after, "edge.pem was not renewed");
    assert!(
        !tls.join("ca.key").exists(),
        "a joined node received the CA key"
    );
    // The new peer certificate names node 4 of this cluster, and the cluster CA signed it.
    let der = CertificateDer::from_pem_slice(peer_after.as_bytes()).expect("node.pem");
    let identity = mcpcp_pki::NodeIdentity::from_cert(&der).expect("names a node");
    assert_eq!((identity.cluster.as_str(), identity.node), ("e2e", 4));
    let mut signed = 0.0;
    for id in [1, 2, 3] {
        let (n, _) = c
            .scrape_sum(
                &c.url(id),
                "mcpd_tls_signed_for_members_total{outcome=\"signed\"}",
            )
            .await;
        signed += n;
    }
    assert!(
        signed >= 2.0,
        "peer and HTTPS certificates signed: {signed}"
    );

    // Node 4 restarts on the renewed files: a new HTTPS connection trusts its new certificate,
    // and a write through it (forwarded over its new peer certificate) is applied.
    c.kill(4).await;
    c.restart(4).await;
    let through_4 = c.node_client(4);
    eventually(
        "a write through the restarted node 4",
        Duration::from_secs(30),
        || {
            let through_4 = through_4.clone();
            async move {
                let spec = mcpcp_proto::api::TenantSpec {
                    name: "after-renewal".into(),
                    description: None,
                    weight: 1,
                };
                through_4
                    .create_tenant(&spec, &mcpctl::CallOptions::default())
                    .await
                    .ok()
            }
        },
    )
    .await;

    // A stranger with a cluster certificate that is not a member gets nothing signed.
    let ca = Ca::load(test_ca()).expect("the cluster CA");
    let stranger = ca.issue_node(99, Duration::from_secs(600)).expect("cert");
    let ch = dial(
        &c.nodes[&1].member.grpc_addr,
        Some((&stranger.cert_pem, &stranger.key_pem)),
    )
    .await
    .expect("handshake");
    let (_, csr) = mcpcp_pki::ca::key_and_request().expect("csr");
    let refused = ClusterClient::new(ch)
        .sign_certificates(mcpcp_proto::cluster::SignRequest {
            peer_csr: csr,
            ..Default::default()
        })
        .await
        .expect_err("a stranger");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
}

/// The gRPC address bounds what a caller without a finished handshake can hold: a connection
/// that says nothing is closed after `tls.peer_handshake_timeout_ms`, and past
/// `tls.max_peer_handshakes` under way a new connection is closed at once. Members are served
/// again as soon as the silent ones are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_cut_off_and_handshakes_past_the_cap_are_refused() {
    use tokio::io::AsyncReadExt;
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(
        config.path(),
        "[tls]\npeer_handshake_timeout_ms = 1500\nmax_peer_handshakes = 2\n",
    )
    .expect("write config");
    let config_path = config.path().display().to_string();
    let c = Cluster::start_with(1, &["--config", &config_path]).await;
    let grpc = c.nodes[&1].member.grpc_addr.clone();
    let url = c.url(1);
    let series = |reason: &str| {
        format!("mcpd_tls_handshake_failures_total{{listener=\"grpc\",reason=\"{reason}\"}}")
    };
    let (busy_before, _) = c.scrape_sum(&url, &series("busy")).await;

    // Two connections that never start their handshake fill the cap.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(
            tokio::net::TcpStream::connect(&grpc)
                .await
                .expect("connect"),
        );
    }
    // The node counts a refusal of the third: retried until the two are surely in the
    // handshake stage (the accept loop takes them in order).
    let refused = eventually(
        "a third connection to be closed as busy",
        Duration::from_secs(10),
        || {
            let (grpc, c, url, series) = (grpc.clone(), &c, url.clone(), series("busy"));
            async move {
                let mut third = tokio::net::TcpStream::connect(&grpc).await.ok()?;
                let mut buf = [0u8; 1];
                // Closed at once: the read ends (EOF or reset) well before the timeout.
                let _ = tokio::time::timeout(Duration::from_millis(1000), third.read(&mut buf))
                    .await
                    .ok()?;
                let (n, _) = c.scrape_sum(&url, &series).await;
                (n > busy_before).then_some(n)
            }
        },
    )
    .await;
    assert!(refused > busy_before);

    // The silent ones are closed once their handshake time is up.
    for mut conn in silent {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("a silent connection is closed within its handshake timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    let (timeouts, _) = c.scrape_sum(&url, &series("timeout")).await;
    assert!(timeouts >= 2.0, "timed-out handshakes counted: {timeouts}");

    // A member is served again.
    let ch = c
        .peer_channel(&grpc, 1)
        .await
        .expect("a member's handshake");
    ClusterClient::new(ch)
        .ping(PingRequest {})
        .await
        .expect("a member's ping after the silent connections are gone");
}

/// The dialing side checks whom it reached: a node whose certificate names another id than a
/// member's (here node 99, registered under the address of new member 4) is refused, so a
/// removed node or a stranger with a cluster certificate cannot answer at a member's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_at_a_member_s_address_with_another_identity_is_refused() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader().await;
    let impostor = c.spawn(99).await;
    let added = c
        .client()
        .add_node(&mcpcp_proto::api::AddNodeRequest {
            id: 4,
            http_addr: impostor.http_addr.clone(),
            grpc_addr: impostor.grpc_addr.clone(),
            voter: false,
        })
        .await;
    let url = c.url(leader);
    let (refused, metrics) = eventually(
        "the leader to refuse node 99's certificate at node 4's address",
        Duration::from_secs(20),
        || {
            let c = &c;
            let url = url.clone();
            async move {
                let (n, text) = c
                    .scrape_sum(
                        &url,
                        "mcpd_grpc_refused_total{reason=\"peer_not_a_member\"}",
                    )
                    .await;
                (n > 0.0).then_some((n, text))
            }
        },
    )
    .await;
    assert!(refused > 0.0, "{metrics}");
    let _ = added; // the add waits for a learner that never catches up; its answer is moot
}
