//! The admin API client behind `mcpctl`, reused by the end-to-end tests, the benchmark and the
//! chaos harness so that all of them speak to a cluster the way an operator does.
//!
//! [`AdminClient`] holds a list of node endpoints and tries them in order: a node that cannot
//! be reached is skipped, any node that answers is authoritative (every node serves every call).

pub mod dev;
pub mod https;
pub mod import;
pub mod launch;
pub mod snapshot;

use std::path::Path;
use std::time::Duration;

use mcpcp_proto::api::{
    AddNodeRequest, ClusterStatus, CreateTokenRequest, CreatedToken, ErrorBody, InitRequest,
    InitResponse, IssuerSpec, List, Member, NodeInfo, PolicySpec, PolicyTest, PolicyVerdict,
    ServerPatch, ServerSpec, TenantSpec, TokenInfo, Versioned, WriteAck,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What an admin call can end in. [`ClientError::exit_code`] maps each to `mcpctl`'s exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No endpoint could be reached, or the cluster answered 503 (no quorum, not initialised).
    #[error("{0}")]
    Unavailable(String),
    /// The node answered with an error.
    #[error("{status}: {}{}", .body.error.message, .body.error.field.as_ref().map(|f| format!(" (field: {f})")).unwrap_or_default())]
    Api { status: u16, body: ErrorBody },
    #[error("{0}")]
    Usage(String),
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl ClientError {
    /// 1: error, 2: usage, 3: unavailable (no quorum or no reachable node).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Unavailable(_) => 3,
            ClientError::Api { status: 503, .. } => 3,
            ClientError::Usage(_) => 2,
            _ => 1,
        }
    }

    /// The API's error code (`not_found`, `no_quorum`, ...), when the node answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => Some(&body.error.code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// `host:port` or a URL, as a base URL without a trailing slash. A bare `host:port` is
/// HTTPS, as every node serves unless it sits behind a TLS-terminating load balancer.
pub fn normalize_endpoint(e: &str) -> String {
    let e = e.trim().trim_end_matches('/');
    if e.starts_with("http://") || e.starts_with("https://") {
        e.to_string()
    } else {
        format!("https://{e}")
    }
}

/// Extra headers of one call.
#[derive(Debug, Default, Clone)]
pub struct CallOptions {
    pub if_match: Option<u64>,
    pub idempotency_key: Option<String>,
}

#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    endpoints: Vec<String>,
    token: Option<String>,
}

impl AdminClient {
    /// A client of `endpoints` that trusts `cacert` (the cluster's `ca.pem`), or the system's
    /// roots without one.
    pub fn new(
        endpoints: &[String],
        token: Option<String>,
        cacert: Option<&Path>,
    ) -> Result<Self, ClientError> {
        Self::with_timeout(endpoints, token, cacert, Duration::from_secs(30))
    }

    /// `timeout` bounds a whole call to one endpoint (the server bounds its own quorum wait).
    pub fn with_timeout(
        endpoints: &[String],
        token: Option<String>,
        cacert: Option<&Path>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| normalize_endpoint(e))
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::Usage(
                "no endpoints: pass --endpoints or set MCPCTL_ENDPOINTS".into(),
            ));
        }
        let http = https::client_builder(cacert)?
            .connect_timeout(Duration::from_secs(2))
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        Ok(AdminClient {
            http,
            endpoints,
            token,
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client for one of this client's endpoints (or another node), same token.
    pub fn for_endpoint(&self, endpoint: &str) -> AdminClient {
        AdminClient {
            http: self.http.clone(),
            endpoints: vec![normalize_endpoint(endpoint)],
            token: self.token.clone(),
        }
    }

    /// Sends one call, trying endpoints in order while they cannot be reached.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        opts: &CallOptions,
    ) -> Result<T, ClientError> {
        decode(self.send(method, path, body, opts).await?).await
    }

    /// A `GET` whose body the caller reads as it arrives (a snapshot): the answer once its
    /// status says success, else the API's error.
    pub async fn download(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let resp = self
            .send::<()>(Method::GET, path, None, &CallOptions::default())
            .await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(decode::<serde_json::Value>(resp)
            .await
            .err()
            .unwrap_or_else(|| ClientError::Decode("an error without a body".into())))
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        opts: &CallOptions,
    ) -> Result<reqwest::Response, ClientError> {
        let mut failures = Vec::new();
        for base in &self.endpoints {
            let mut req = self.http.request(method.clone(), format!("{base}{path}"));
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some(rev) = opts.if_match {
                req = req.header("If-Match", rev.to_string());
            }
            if let Some(k) = &opts.idempotency_key {
                req = req.header("Idempotency-Key", k);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() || (e.is_timeout() && !e.is_body()) => {
                    failures.push(format!("{base}: {}", root_cause(&e)));
                    continue;
                }
                Err(e) => {
                    return Err(ClientError::Unavailable(format!(
                        "{base}: {}",
                        root_cause(&e)
                    )))
                }
            };
            return Ok(resp);
        }
        Err(ClientError::Unavailable(format!(
            "no node could be reached: {}",
            failures.join("; ")
        )))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None, &CallOptions::default())
            .await
    }

    pub async fn node_info(&self) -> Result<NodeInfo, ClientError> {
        self.get("/v1/node").await
    }

    pub async fn init(&self, members: Vec<Member>) -> Result<InitResponse, ClientError> {
        let body = InitRequest { members };
        self.call(
            Method::POST,
            "/v1/cluster/init",
            Some(&body),
            &CallOptions::default(),
        )
        .await
    }

    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        self.get("/v1/cluster/status").await
    }

    pub async fn add_node(&self, req: &AddNodeRequest) -> Result<Member, ClientError> {
        self.call(
            Method::POST,
            "/v1/cluster/nodes",
            Some(req),
            &CallOptions::default(),
        )
        .await
    }

    /// A single-use join token for node `node_id`, valid `ttl_seconds` (default 900).
    pub async fn create_join_token(
        &self,
        node_id: u64,
        ttl_seconds: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::json!({ "node_id": node_id, "ttl_seconds": ttl_seconds });
        self.call(
            Method::POST,
            "/v1/cluster/join-tokens",
            Some(&body),
            &CallOptions::default(),
        )
        .await
    }

    /// Asks the node this client reaches first to issue itself new certificates now.
    pub async fn rotate_certs(&self) -> Result<serde_json::Value, ClientError> {
        self.call::<(), serde_json::Value>(
            Method::POST,
            "/v1/node/rotate-certs",
            None,
            &CallOptions::default(),
        )
        .await
    }

    /// Makes the node this client talks to a one-node cluster of its own state (its voters
    /// are lost); it answers, then restarts in place.
    pub async fn promote_force_new_cluster(
        &self,
    ) -> Result<mcpcp_proto::api::PromoteResponse, ClientError> {
        let req = mcpcp_proto::api::PromoteRequest {
            force_new_cluster: true,
        };
        self.call(
            Method::POST,
            "/v1/cluster/promote",
            Some(&req),
            &CallOptions::default(),
        )
        .await
    }

    pub async fn remove_node(&self, id: u64) -> Result<(), ClientError> {
        self.call::<(), Empty>(
            Method::DELETE,
            &format!("/v1/cluster/nodes/{id}"),
            None,
            &CallOptions::default(),
        )
        .await
        .map(|_| ())
    }

    pub async fn list_servers(
        &self,
        stale: bool,
    ) -> Result<List<Versioned<ServerSpec>>, ClientError> {
        self.get(&format!("/v1/servers{}", consistency(stale)))
            .await
    }

    pub async fn get_server(
        &self,
        name: &str,
        stale: bool,
    ) -> Result<Versioned<ServerSpec>, ClientError> {
        self.get(&format!("/v1/servers/{name}{}", consistency(stale)))
            .await
    }

    pub async fn approved_commands(
        &self,
    ) -> Result<mcpcp_proto::api::List<Versioned<mcpcp_proto::api::ApprovedCommand>>, ClientError>
    {
        self.get("/v1/approved-commands").await
    }

    pub async fn put_approved_command(
        &self,
        spec: &mcpcp_proto::api::ApprovedCommand,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/approved-commands/{}", spec.name),
            Some(spec),
            opts,
        )
        .await
    }

    pub async fn delete_approved_command(
        &self,
        name: &str,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/approved-commands/{name}"),
            None,
            opts,
        )
        .await
    }

    /// Usage per tenant, subject, server and tool over the last `since` (`24h`, `7d`, …).
    pub async fn usage(
        &self,
        since: &str,
        tenant: Option<&str>,
        server: Option<&str>,
    ) -> Result<mcpcp_proto::api::List<mcpcp_proto::api::UsageRow>, ClientError> {
        // Names are letters, digits, `-`, `_` and `.` (validated), spans like `24h`: nothing
        // to escape.
        let mut query = format!("since={since}");
        for (k, v) in [("tenant", tenant), ("server", server)] {
            if let Some(v) = v {
                query.push_str(&format!("&{k}={v}"));
            }
        }
        self.get(&format!("/v1/usage?{query}")).await
    }

    pub async fn limits(
        &self,
    ) -> Result<mcpcp_proto::api::List<Versioned<mcpcp_proto::api::LimitSpec>>, ClientError> {
        self.get("/v1/limits").await
    }

    pub async fn limit_usage(
        &self,
        name: &str,
    ) -> Result<mcpcp_proto::api::List<mcpcp_proto::api::QuotaUsage>, ClientError> {
        self.get(&format!("/v1/limits/{name}/usage")).await
    }

    pub async fn put_limit(
        &self,
        spec: &mcpcp_proto::api::LimitSpec,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/limits/{}", spec.name),
            Some(spec),
            opts,
        )
        .await
    }

    pub async fn delete_limit(
        &self,
        name: &str,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/limits/{name}"), None, opts)
            .await
    }

    pub async fn virtual_servers(
        &self,
    ) -> Result<mcpcp_proto::api::List<Versioned<mcpcp_proto::api::VirtualServerSpec>>, ClientError>
    {
        self.get("/v1/virtual-servers").await
    }

    pub async fn put_virtual_server(
        &self,
        spec: &mcpcp_proto::api::VirtualServerSpec,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/virtual-servers/{}", spec.name),
            Some(spec),
            opts,
        )
        .await
    }

    pub async fn delete_virtual_server(
        &self,
        name: &str,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/virtual-servers/{name}"),
            None,
            opts,
        )
        .await
    }

    pub async fn tool_diff(&self, name: &str) -> Result<mcpcp_proto::api::ToolDiff, ClientError> {
        self.get(&format!("/v1/servers/{name}/diff")).await
    }

    pub async fn put_tool_pins(
        &self,
        name: &str,
        pins: &mcpcp_proto::api::ToolPins,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/servers/{name}/pins"),
            Some(pins),
            opts,
        )
        .await
    }

    pub async fn delete_tool_pins(
        &self,
        name: &str,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/servers/{name}/pins"),
            None,
            opts,
        )
        .await
    }

    pub async fn server_status(
        &self,
        name: &str,
    ) -> Result<mcpcp_proto::api::ServerStatus, ClientError> {
        self.get(&format!("/v1/servers/{name}/status")).await
    }

    pub async fn create_server(
        &self,
        spec: &ServerSpec,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call(Method::POST, "/v1/servers", Some(spec), opts)
            .await
    }

    pub async fn put_server(
        &self,
        spec: &ServerSpec,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/servers/{}", spec.name),
            Some(spec),
            opts,
        )
        .await
    }

    pub async fn patch_server(
        &self,
        name: &str,
        patch: &ServerPatch,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call(
            Method::PATCH,
            &format!("/v1/servers/{name}"),
            Some(patch),
            opts,
        )
        .await
    }

    pub async fn delete_server(
        &self,
        name: &str,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/servers/{name}"), None, opts)
            .await
    }

    pub async fn list_tenants(
        &self,
        stale: bool,
    ) -> Result<List<Versioned<TenantSpec>>, ClientError> {
        self.get(&format!("/v1/tenants{}", consistency(stale)))
            .await
    }

    pub async fn create_tenant(
        &self,
        spec: &TenantSpec,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call(Method::POST, "/v1/tenants", Some(spec), opts)
            .await
    }

    pub async fn delete_tenant(
        &self,
        name: &str,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/tenants/{name}"), None, opts)
            .await
    }

    pub async fn list_issuers(
        &self,
        stale: bool,
    ) -> Result<List<Versioned<IssuerSpec>>, ClientError> {
        self.get(&format!("/v1/issuers{}", consistency(stale)))
            .await
    }

    pub async fn create_issuer(
        &self,
        spec: &IssuerSpec,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call(Method::POST, "/v1/issuers", Some(spec), opts)
            .await
    }

    pub async fn delete_issuer(
        &self,
        name: &str,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/issuers/{name}"), None, opts)
            .await
    }

    pub async fn list_policies(
        &self,
        stale: bool,
    ) -> Result<List<Versioned<PolicySpec>>, ClientError> {
        self.get(&format!("/v1/policies{}", consistency(stale)))
            .await
    }

    /// Creates or replaces a rule.
    pub async fn put_policy(
        &self,
        spec: &PolicySpec,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/policies/{}", spec.name),
            Some(spec),
            opts,
        )
        .await
    }

    pub async fn delete_policy(
        &self,
        name: &str,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/policies/{name}"), None, opts)
            .await
    }

    pub async fn test_policy(&self, test: &PolicyTest) -> Result<PolicyVerdict, ClientError> {
        self.call(
            Method::POST,
            "/v1/policies/test",
            Some(test),
            &CallOptions::default(),
        )
        .await
    }

    /// One page of the audit trail: events after `since`, of `actor` and `kind` when given.
    pub async fn audit_page(
        &self,
        since: u64,
        actor: Option<&str>,
        kind: Option<&str>,
    ) -> Result<mcpcp_proto::audit::AuditPage, ClientError> {
        let mut q =
            reqwest::Url::parse("https://q/").map_err(|e| ClientError::Usage(e.to_string()))?;
        q.query_pairs_mut().append_pair("since", &since.to_string());
        if let Some(a) = actor {
            q.query_pairs_mut().append_pair("actor", a);
        }
        if let Some(k) = kind {
            q.query_pairs_mut().append_pair("kind", k);
        }
        self.get(&format!("/v1/audit?{}", q.query().unwrap_or_default()))
            .await
    }

    /// Every event the cluster keeps, oldest first, with the chain's head hash and the first
    /// event the cluster says it keeps.
    pub async fn audit_all(
        &self,
    ) -> Result<(Vec<mcpcp_proto::audit::AuditEvent>, String, u64), ClientError> {
        let mut events = Vec::new();
        let mut since = 0;
        let mut first_kept = None;
        loop {
            let page = self.audit_page(since, None, None).await?;
            let first = *first_kept.get_or_insert(page.first_kept);
            let Some(last) = page.items.last() else {
                return Ok((events, page.head_hash, first));
            };
            since = last.seq;
            events.extend(page.items);
        }
    }

    /// Asks the cluster to check MACs (and the hash chain) with its key: of `req.events`, or
    /// of the events the node holds.
    pub async fn verify_audit(
        &self,
        req: &mcpcp_proto::audit::AuditVerify,
    ) -> Result<mcpcp_proto::audit::AuditVerdict, ClientError> {
        self.call(
            Method::POST,
            "/v1/audit/verify",
            Some(req),
            &CallOptions::default(),
        )
        .await
    }

    pub async fn set_audit_retention(
        &self,
        events: u64,
        opts: &CallOptions,
    ) -> Result<WriteAck, ClientError> {
        let body = mcpcp_proto::audit::AuditRetention { events };
        self.call(Method::PUT, "/v1/audit/retention", Some(&body), opts)
            .await
    }

    pub async fn list_tokens(&self, stale: bool) -> Result<List<TokenInfo>, ClientError> {
        self.get(&format!("/v1/tokens{}", consistency(stale))).await
    }

    pub async fn create_token(
        &self,
        req: &CreateTokenRequest,
    ) -> Result<CreatedToken, ClientError> {
        self.call(
            Method::POST,
            "/v1/tokens",
            Some(req),
            &CallOptions::default(),
        )
        .await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<WriteAck, ClientError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/tokens/{id}"),
            None,
            &CallOptions::default(),
        )
        .await
    }
}

fn consistency(stale: bool) -> &'static str {
    if stale {
        "?consistency=stale"
    } else {
        ""
    }
}

/// An answer with no body we care about.
#[derive(Debug, serde::Deserialize)]
struct Empty {}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| ClientError::Unavailable(format!("reading the answer: {}", root_cause(&e))))?;
    if status.is_success() {
        let bytes: &[u8] = if bytes.is_empty() || status == StatusCode::NO_CONTENT {
            b"{}"
        } else {
            &bytes
        };
        return serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(e.to_string()));
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => Err(ClientError::Api {
            status: status.as_u16(),
            body,
        }),
        Err(_) => Err(ClientError::Decode(format!(
            "{status}: {}",
            String::from_utf8_lossy(&bytes)
        ))),
    }
}
