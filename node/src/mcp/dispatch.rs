//! Where a client request goes, whatever the protocol revision: to one server (the
//! transparent endpoint), or, on the aggregate endpoint, to the server that owns the tool,
//! prompt or resource, with names prefixed `{server}__` so that servers cannot collide.
//!
//! Every call to a server goes through [`Router::call`] (replicas, breakers, retries,
//! fallbacks) with an events channel, so progress, logging and the server's own requests flow
//! back to the caller as they happen.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use mcpcp_proto::mcp::{code, ErrorObject, Message};
use serde_json::{json, Value};

use super::target::Target;
use crate::call::{Affinity, Call, EventSink, FallbackGate};
use crate::call_audit::{describe_args, CallAudit, CallEvent};
use crate::pinning::{self, Held};
use crate::policy::{Access, Policies};
use crate::pool::catalogue::Catalogue;
use crate::registry::{Principal, Registry};
use crate::route::{Router, ServerInfo};
use mcpcp_proto::api::{Role, ServerSpec, Versioned, VirtualServerSpec};

/// The separator of aggregated names: `{server}__{tool}`. Server names cannot contain it.
pub const SEPARATOR: &str = "__";

/// The `_meta` key telling clients (`mcp-bridge`) that the registry lists a tool as safe to
/// run twice. Set by the gateway from the registry, never taken from the server.
pub const IDEMPOTENT_META: &str = "io.mcpcp/idempotent";

/// The request context the dispatcher needs (owned, so a call can run in its own task).
#[derive(Clone)]
pub struct Route {
    pub registry: Registry,
    pub router: Router,
    pub principal: Principal,
    pub target: Target,
    /// The downstream session, for servers that run a process per session.
    pub affinity: Option<Affinity>,
    /// What the caller may call.
    pub policies: Policies,
    /// The node's call log.
    pub calls: CallAudit,
    /// The node's recent figures per server, for the console.
    pub traffic: crate::traffic::Traffic,
    pub usage: crate::usage::Usage,
    /// Held tools this node reported already (`crate::pinning`).
    pub detections: pinning::Detections,
    /// What the policies decided for this request's call, for its log line.
    pub decided: Arc<Mutex<Option<Decided>>>,
}

/// How a call ended, as the call log names it: `ok`, `tool_error` (a result with
/// `isError`), `denied` (by a policy) or `error` (a JSON-RPC error, with its code).
fn outcome(result: &Result<Value, ErrorObject>) -> (&'static str, Option<i64>) {
    match result {
        Ok(v) if v["isError"] == json!(true) => ("tool_error", None),
        Ok(_) => ("ok", None),
        Err(e) if e.code == code::DENIED => ("denied", Some(e.code)),
        Err(e) => ("error", Some(e.code)),
    }
}

/// The policies' decision on a call: which server and item it reached, and the rule.
#[derive(Debug, Clone)]
pub struct Decided {
    server: String,
    item: String,
    rule: Option<String>,
}

fn invalid(message: impl Into<String>) -> ErrorObject {
    ErrorObject::new(code::INVALID_PARAMS, message)
}

impl Route {
    /// Whether the caller may use server `name` (exists, visible, enabled).
    pub fn check(&self, name: &str) -> Result<(), ErrorObject> {
        self.router.scope(&self.principal, name).map(|_| ())
    }

    /// Whether this endpoint's clients hear `message`, a notification of server `server`
    /// that belongs to no call (a list change, a resource update, a log message).
    pub fn hears(&self, server: &str, message: &Message) -> bool {
        match &self.target {
            // And that the tools of one of its fallbacks changed: its endpoint lists them while
            // it is down (told whether or not it is, which costs a client a list at most).
            Target::Server(t) => {
                t == server
                    || (message.method() == Some("notifications/tools/list_changed")
                        && (self.registry.local().state.servers.get(t))
                            .is_some_and(|s| s.spec.fallbacks.iter().any(|f| f == server)))
            }
            Target::Aggregate => self.check(server).is_ok(),
            // Only that the tools of one of its servers changed: its servers' other
            // notifications name their own tools and resources, not the curated ones.
            Target::Virtual(v) => {
                message.method() == Some("notifications/tools/list_changed")
                    && self
                        .virtual_server(v)
                        .is_ok_and(|spec| spec.tools.iter().any(|t| t.server == server))
            }
        }
    }

    /// The `initialize` answer and catalogue of what answers on `name`'s own endpoint: the
    /// server, or the fallback (named) that stands in for it.
    pub async fn serving(&self, name: &str) -> (ServerInfo, Option<String>) {
        self.router.serving(&self.principal, name).await
    }

    /// The server's `initialize` answer and catalogue.
    pub async fn info(&self, name: &str) -> ServerInfo {
        self.router.info(&self.principal, name).await
    }

    /// The server's catalogue for a list of several servers' items, which waits for a
    /// server on its first start only so long (`Router::listing`).
    async fn listing(&self, name: &str) -> ServerInfo {
        self.router.listing(&self.principal, name).await
    }

    /// Sends one request to server `name` through the router; the router's typed failure
    /// becomes the JSON-RPC error the client sees here, at the edge.
    async fn send(
        &self,
        name: &str,
        method: &str,
        params: Option<Value>,
        events: EventSink,
    ) -> Result<Value, ErrorObject> {
        let gate = self.fallback_gate(method);
        let call = Call {
            principal: self.principal.clone(),
            server: name.to_string(),
            method: method.to_string(),
            params,
            affinity: self.affinity.clone(),
            events,
            fallback_gate: gate,
        };
        self.router.call(&call).await.map_err(|e| e.into_rpc())
    }

    /// Lets go of the session's subscription to `uri` on the server that has it (the
    /// endpoint's, or the aggregate's owner of the URI), for a session that ended or left
    /// this node's memory (`super::holds`). Not checked against the policies again: letting
    /// go of a subscription is never refused.
    pub async fn withdraw(&self, uri: &str, events: EventSink) -> Result<Value, ErrorObject> {
        let server = match &self.target {
            Target::Server(name) => name.clone(),
            Target::Aggregate => self.owner_of_uri(uri).await.ok_or_else(|| {
                ErrorObject::new(
                    code::RESOURCE_NOT_FOUND,
                    format!("resource not found: {uri}"),
                )
            })?,
            // A virtual server serves tools only: nothing was subscribed through it.
            Target::Virtual(_) => return Ok(json!({})),
        };
        let params = Some(json!({ "uri": uri }));
        self.send(&server, "resources/unsubscribe", params, events)
            .await
    }

    /// Names of every enabled server this caller may use.
    fn visible_servers(&self) -> Vec<(String, Vec<String>)> {
        self.registry
            .local()
            .state
            .servers
            .values()
            .filter(|s| s.spec.enabled && self.principal.may_use(&s.spec))
            .map(|s| (s.spec.name.clone(), s.spec.idempotent_tools.clone()))
            .collect()
    }

    /// Runs `method` for the client; a tool call, resource read or prompt get leaves a line in
    /// the call log and a sample in the traffic ring.
    pub async fn dispatch(
        &self,
        method: &str,
        params: Option<Value>,
        events: EventSink,
    ) -> Result<Value, ErrorObject> {
        if !matches!(method, "tools/call" | "resources/read" | "prompts/get") {
            return self.route_request(method, params, events).await;
        }
        let started = Instant::now();
        let bytes_in = params.as_ref().map_or(0, crate::usage::json_size);
        // The tool or prompt, or the resource's URI: for the usage figures and the call log.
        let named = params
            .as_ref()
            .and_then(|p| p.get("name").or_else(|| p.get("uri")))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        // Described before the request moves on (routing does not change the arguments).
        let described = self.calls.enabled().then(|| {
            describe_args(
                params.as_ref().and_then(|p| p.get("arguments")),
                self.calls.include_arguments(),
            )
        });
        let result = self.route_request(method, params, events).await;
        let (outcome, error_code) = outcome(&result);
        let decided = self
            .decided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let server = match (&decided, &self.target) {
            (Some(d), _) => d.server.as_str(),
            (None, Target::Server(s)) => s.as_str(),
            (None, Target::Aggregate | Target::Virtual(_)) => "",
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let duration_ms = started.elapsed().as_secs_f64() * 1e3;
        if !server.is_empty() {
            self.traffic
                .observe(server, outcome != "ok", duration_ms, now.as_secs());
            let tool = match (&decided, method) {
                (_, "resources/read") => "resources/read",
                (Some(d), _) => d.item.as_str(),
                (None, _) => named.as_str(),
            };
            self.usage.record(&crate::usage::CallUsage {
                tenant: self.principal.tenant.as_deref(),
                subject: &self.principal.token_id,
                server,
                tool,
                listed: self.router.lists(server, method, tool),
                error: outcome != "ok",
                duration_ms,
                bytes_in,
                bytes_out: result.as_ref().map_or(0, crate::usage::json_size),
                at: now.as_secs(),
            });
        }
        if let Some((args_bytes, args_sha256, args)) = described {
            let (server, name, policy) = match decided {
                Some(d) => (d.server, d.item, d.rule),
                None => (server.to_string(), named, None),
            };
            self.calls.record(CallEvent {
                at_ms: now.as_millis() as u64,
                node: self.registry.id,
                tenant: self.principal.tenant.clone(),
                subject: self.principal.token_id.clone(),
                role: self.principal.role.as_str(),
                server,
                method: method.to_string(),
                name,
                args_bytes,
                args_sha256,
                args,
                outcome,
                error_code,
                duration_ms,
                session: self.affinity.as_ref().map(|a| a.key.clone()),
                policy,
                trace: crate::telemetry::propagate::current_traceparent(),
            });
        }
        result
    }

    /// Sends the request where it goes: one server, or the aggregate's owner of the item.
    async fn route_request(
        &self,
        method: &str,
        params: Option<Value>,
        events: EventSink,
    ) -> Result<Value, ErrorObject> {
        match &self.target {
            Target::Server(name) => {
                let policy = tracing::info_span!(
                    target: crate::telemetry::TARGET,
                    parent: crate::telemetry::parent(),
                    "mcp.policy",
                    otel.status_code = tracing::field::Empty,
                    error.type = tracing::field::Empty,
                );
                // No spans are made under the policy's (it is never current), and it ends
                // when the decision is made.
                let decided = async {
                    self.authorize(name, method, params.as_ref())?;
                    self.approved(name, method, params.as_ref()).await
                }
                .await;
                if decided.is_err() {
                    crate::telemetry::failed(&policy, "denied");
                }
                drop(policy);
                decided?;
                let mut result = self.send(name, method, params, events).await?;
                self.filter_list(name, method, &mut result);
                if method == "tools/list" {
                    // A fallback's tools are marked by the fallback's own registry entry.
                    let lister = result["_meta"][crate::route::FALLBACK_META]["fallback"]
                        .as_str()
                        .unwrap_or(name)
                        .to_string();
                    let idempotent = self
                        .router
                        .scope(&self.principal, &lister)
                        .map(|s| s.spec.idempotent_tools)
                        .unwrap_or_default();
                    if let Some(tools) = result["tools"].as_array_mut() {
                        for tool in tools {
                            mark_idempotent(tool, &idempotent, None);
                        }
                    }
                }
                Ok(result)
            }
            Target::Aggregate => self.aggregate(method, params, events).await,
            Target::Virtual(v) => self.virtual_request(v, method, params, events).await,
        }
    }

    /// Virtual server `name`, if this caller may use it (another tenant's does not exist).
    pub fn virtual_server(&self, name: &str) -> Result<VirtualServerSpec, ErrorObject> {
        let data = self.registry.local();
        data.state
            .virtual_servers
            .get(name)
            .filter(|v| {
                self.principal.role == Role::ClusterAdmin || {
                    let t = v.spec.tenant.as_deref();
                    t.is_none() || t == self.principal.tenant.as_deref()
                }
            })
            .map(|v| v.spec.clone())
            .ok_or_else(|| {
                ErrorObject::new(code::INVALID_REQUEST, format!("no virtual server {name:?}"))
            })
    }

    /// A request to virtual server `v`: its tools, each the one of its server under the name
    /// the virtual server gives it, listed and called through the same checks as on the
    /// server's own endpoint (the caller may use the server, policies, tool pins).
    async fn virtual_request(
        &self,
        v: &str,
        method: &str,
        params: Option<Value>,
        events: EventSink,
    ) -> Result<Value, ErrorObject> {
        let spec = self.virtual_server(v)?;
        match method {
            "ping" => Ok(json!({})),
            "tools/list" => {
                // Each server the caller may use, read once and all at once.
                let mut names: Vec<&str> = spec.tools.iter().map(|t| t.server.as_str()).collect();
                names.sort_unstable();
                names.dedup();
                let usable: Vec<_> = names
                    .into_iter()
                    .filter_map(|n| self.router.scope(&self.principal, n).ok())
                    .collect();
                let infos = futures_util::future::join_all(
                    usable.iter().map(|s| self.listing(&s.spec.name)),
                )
                .await;
                let servers: std::collections::HashMap<&str, (&Versioned<ServerSpec>, ServerInfo)> =
                    usable
                        .iter()
                        .zip(infos)
                        .map(|(s, i)| (s.spec.name.as_str(), (s, i)))
                        .collect();
                let mut out = Vec::new();
                for t in &spec.tools {
                    let Some((server, info)) = servers.get(t.server.as_str()) else {
                        continue;
                    };
                    let Some(tool) = info
                        .catalogue
                        .tools
                        .iter()
                        .find(|x| x["name"] == t.tool.as_str())
                    else {
                        continue;
                    };
                    let mut one = vec![tool.clone()];
                    self.hold_back(&t.server, &mut one);
                    let Some(mut tool) = one.pop() else { continue };
                    if self.policies.any() && !self.listable(&t.server, &tool) {
                        continue;
                    }
                    // Safe to retry only as the registry says, never as the server does.
                    mark_idempotent(&mut tool, &server.spec.idempotent_tools, Some(&t.tool));
                    tool["name"] = json!(t.exposed());
                    out.push(tool);
                }
                Ok(json!({ "tools": out }))
            }
            "tools/call" => {
                let mut params = params.ok_or_else(|| invalid("params: required"))?;
                let shown = params["name"]
                    .as_str()
                    .ok_or_else(|| invalid("params.name: required"))?
                    .to_string();
                let t = spec
                    .tools
                    .iter()
                    .find(|t| t.exposed() == shown)
                    .ok_or_else(|| invalid(format!("unknown tool {shown:?}")))?;
                self.check(&t.server)?;
                params["name"] = json!(t.tool);
                self.authorize(&t.server, method, Some(&params))?;
                self.approved(&t.server, method, Some(&params)).await?;
                self.send(&t.server, method, Some(params), events).await
            }
            "prompts/list" => Ok(json!({ "prompts": [] })),
            "resources/list" => Ok(json!({ "resources": [] })),
            "resources/templates/list" => Ok(json!({ "resourceTemplates": [] })),
            other => Err(ErrorObject::new(
                code::METHOD_NOT_FOUND,
                format!("method not found: {other} (a virtual server offers tools only)"),
            )),
        }
    }

    async fn aggregate(
        &self,
        method: &str,
        params: Option<Value>,
        events: EventSink,
    ) -> Result<Value, ErrorObject> {
        match method {
            "ping" => Ok(json!({})),
            "tools/list" => Ok(json!({ "tools": self.list(|c| &c.tools, true, true).await })),
            "prompts/list" => Ok(json!({ "prompts": self.list(|c| &c.prompts, true, false).await })),
            "resources/list" => Ok(json!({ "resources": self.list(|c| &c.resources, false, false).await })),
            "resources/templates/list" => {
                Ok(json!({ "resourceTemplates": self.list(|c| &c.resource_templates, false, false).await }))
            }
            "tools/call" | "prompts/get" => {
                let mut params = params.ok_or_else(|| invalid("params: required"))?;
                let full = params["name"]
                    .as_str()
                    .ok_or_else(|| invalid("params.name: required"))?
                    .to_string();
                let (server, name) = full.split_once(SEPARATOR).ok_or_else(|| {
                    invalid(format!("unknown {} {full:?}: names here are server{SEPARATOR}name", noun(method)))
                })?;
                if let Err(e) = self.check(server) {
                    return Err(if e.code == code::INVALID_PARAMS {
                        invalid(format!("unknown {} {full:?}", noun(method)))
                    } else {
                        e
                    });
                }
                params["name"] = json!(name);
                self.authorize(server, method, Some(&params))?;
                self.approved(server, method, Some(&params)).await?;
                self.send(server, method, Some(params), events).await
            }
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                let uri = params
                    .as_ref()
                    .and_then(|p| p["uri"].as_str())
                    .ok_or_else(|| invalid("params.uri: required"))?
                    .to_string();
                let server = self.owner_of_uri(&uri).await.ok_or_else(|| {
                    ErrorObject::new(code::RESOURCE_NOT_FOUND, format!("resource not found: {uri}"))
                        .with_data(json!({ "uri": uri }))
                })?;
                self.authorize(&server, method, params.as_ref())?;
                self.send(&server, method, params, events).await
            }
            "completion/complete" => {
                let mut params = params.ok_or_else(|| invalid("params: required"))?;
                let reference = params["ref"].clone();
                let server = match reference["type"].as_str() {
                    Some("ref/prompt") => {
                        let full = reference["name"].as_str().unwrap_or_default().to_string();
                        let (server, name) = full
                            .split_once(SEPARATOR)
                            .ok_or_else(|| invalid(format!("unknown prompt {full:?}")))?;
                        params["ref"]["name"] = json!(name);
                        server.to_string()
                    }
                    Some("ref/resource") => {
                        let uri = reference["uri"].as_str().unwrap_or_default().to_string();
                        self.owner_of_uri(&uri)
                            .await
                            .ok_or_else(|| invalid(format!("unknown resource {uri:?}")))?
                    }
                    _ => return Err(invalid("params.ref.type: must be ref/prompt or ref/resource")),
                };
                self.authorize(&server, method, Some(&params))?;
                self.send(&server, method, Some(params), events).await
            }
            other => Err(ErrorObject::new(
                code::METHOD_NOT_FOUND,
                format!("method not found: {other} (the aggregate endpoint does not relay it; use /servers/{{name}}/mcp)"),
            )),
        }
    }

    /// One kind of catalogue item across visible servers; `prefix` renames items
    /// `server__name` (tools, prompts), resources keep their URIs.
    async fn list(
        &self,
        pick: impl Fn(&Catalogue) -> &Vec<Value>,
        prefix: bool,
        tools: bool,
    ) -> Vec<Value> {
        let servers = self.visible_servers();
        let infos =
            futures_util::future::join_all(servers.iter().map(|(name, _)| self.listing(name)))
                .await;
        let mut out = Vec::new();
        let filtering = self.policies.any();
        for ((server, idempotent), info) in servers.iter().zip(infos) {
            let listed = pick(&info.catalogue);
            let pinned = tools && self.registry.local().state.tool_pins.contains_key(server);
            let kept;
            let items = if pinned {
                let mut tools = listed.clone();
                self.hold_back(server, &mut tools);
                kept = tools;
                &kept
            } else {
                listed
            };
            for item in items {
                if filtering && !self.listable(server, item) {
                    continue;
                }
                let mut item = item.clone();
                if tools {
                    mark_idempotent(&mut item, idempotent, None);
                }
                if prefix {
                    if let Some(n) = item["name"].as_str() {
                        item["name"] = json!(format!("{server}{SEPARATOR}{n}"));
                    }
                }
                out.push(item);
            }
        }
        out
    }

    /// Refuses a call the policies deny, naming the rule, and notes the decision for the
    /// call's log line. Calls that reach no tool, prompt or resource (lists, `ping`,
    /// `initialize`...) pass; lists are filtered instead.
    fn authorize(
        &self,
        server: &str,
        method: &str,
        params: Option<&Value>,
    ) -> Result<(), ErrorObject> {
        let Some((access, args)) = reached(server, method, params) else {
            return Ok(());
        };
        let verdict = self.policies.decide(&self.principal, &access, args);
        *self.decided.lock().unwrap_or_else(|e| e.into_inner()) = Some(Decided {
            server: server.to_string(),
            item: access.item().to_string(),
            rule: verdict.rule.clone(),
        });
        if verdict.allowed {
            return Ok(());
        }
        let rule = verdict.rule.unwrap_or_default();
        metrics::counter!("mcpd_policy_denials_total", "policy" => rule.clone()).increment(1);
        Err(ErrorObject::new(
            code::DENIED,
            format!(
                "denied by policy {rule:?}: this caller may not use {} {:?} of server {server:?}",
                access.noun(),
                access.item()
            ),
        )
        .with_data(json!({ "policy": rule })))
    }

    /// The policies' verdict on the same call sent to a fallback server instead, while rules
    /// exist: a test of the rules, neither counted nor logged (the fallback, if taken, is
    /// the call's own server for neither).
    fn fallback_gate(&self, method: &str) -> Option<FallbackGate> {
        if !self.policies.any() {
            return None;
        }
        let (policies, principal, method) = (
            self.policies.clone(),
            self.principal.clone(),
            method.to_string(),
        );
        Some(FallbackGate(std::sync::Arc::new(
            move |server: &str, params: Option<&Value>| {
                reached(server, &method, params).is_none_or(|(access, args)| {
                    policies.decide_only(&principal, &access, args).allowed
                })
            },
        )))
    }

    /// Refuses a tool call to a tool held back since its server changed it (or added it)
    /// after an admin approved the server's tools (`crate::pinning`). Servers without pins,
    /// and calls other than `tools/call`, pass.
    async fn approved(
        &self,
        server: &str,
        method: &str,
        params: Option<&Value>,
    ) -> Result<(), ErrorObject> {
        if method != "tools/call" {
            return Ok(());
        }
        let tool = params.and_then(|p| p["name"].as_str()).unwrap_or_default();
        // The approved tool's fingerprint, read under the lock (the pins are not copied).
        let approved = {
            let data = self.registry.local();
            let Some(pins) = data.state.tool_pins.get(server) else {
                return Ok(());
            };
            pins.spec.tools.get(tool).map(pinning::fingerprint)
        };
        let held = match approved {
            None => Some(Held::New),
            Some(approved) => {
                // As the server lists it now; a tool it does not list is its own to refuse.
                let info = self.info(server).await;
                if !info.catalogue.loaded {
                    // Not read yet: the call cannot be checked, so it does not run.
                    return Err(ErrorObject::new(
                        code::UNAVAILABLE,
                        format!("server {server:?} has not listed its tools yet, so tool {tool:?} cannot be checked against its approval; the call did not run, retry"),
                    ));
                }
                info.catalogue
                    .tools
                    .iter()
                    .find(|t| t["name"] == tool)
                    .filter(|t| pinning::fingerprint(t) != approved)
                    .map(|_| Held::Changed)
            }
        };
        let Some(held) = held else {
            return Ok(());
        };
        self.held_back(server, None, held);
        Err(ErrorObject::new(
            code::DENIED,
            format!(
                "tool {tool:?} of server {server:?} is held back: it {} since an admin approved the server's tools (mcpctl server diff {server})",
                match held {
                    Held::Changed => "changed",
                    Held::New => "was added",
                }
            ),
        )
        .with_data(json!({ "held": held.as_str(), "server": server, "tool": tool })))
    }

    /// Counts a tool held back from a list or a call; the first time this node sees a held
    /// tool (as listed), it proposes the change for the audit trail, which records it once.
    fn held_back(&self, server: &str, tool: Option<&Value>, held: Held) {
        metrics::counter!("mcpd_tools_held_total", "server" => server.to_string(), "change" => held.as_str())
            .increment(1);
        let Some(tool) = tool else { return };
        let name = pinning::recorded_name(tool["name"].as_str().unwrap_or_default());
        let fingerprint = pinning::fingerprint(tool);
        if !self.detections.first(server, &name, &fingerprint) {
            return;
        }
        tracing::warn!(server, tool = %name, change = held.as_str(), "a pinned server offers a tool other than approved: held back until approved (mcpctl server diff)");
        let registry = self.registry.clone();
        let detections = self.detections.clone();
        let (server, tool) = (server.to_string(), name);
        let command = crate::registry::state::Command::NoteToolChange {
            server: server.clone(),
            tool: tool.clone(),
            change: held.as_str().to_string(),
            fingerprint: fingerprint.clone(),
        };
        let ctx = crate::registry::state::AuditContext::system(
            "pinning",
            Some(format!("node {}", registry.id)),
        );
        tokio::spawn(async move {
            // Refused when another node recorded it first (the trail holds it once) or past
            // the bound; tried again at a later list when the cluster could not be asked.
            use crate::registry::state::ApplyError;
            use crate::registry::RegistryError;
            match registry.write_audited(command, ctx).await {
                Ok(_) | Err(RegistryError::Apply(ApplyError::AlreadyExists { .. })) => {}
                // Past the bound of changes kept until the next approval.
                Err(RegistryError::Apply(_)) => {
                    metrics::counter!("mcpd_tool_changes_unrecorded_total", "server" => server.clone())
                        .increment(1);
                }
                Err(_) => detections.forget(&server, &tool, &fingerprint),
            }
        });
    }

    /// Drops the tools of `server` held back since an admin approved its tools.
    fn hold_back(&self, server: &str, tools: &mut Vec<Value>) {
        let data = self.registry.local();
        let Some(pins) = data.state.tool_pins.get(server) else {
            return;
        };
        let mut held = Vec::new();
        tools.retain(|t| match pinning::held(Some(&pins.spec), t) {
            None => true,
            Some(h) => {
                held.push((t.clone(), h));
                false
            }
        });
        drop(data);
        for (tool, h) in held {
            self.held_back(server, Some(&tool), h);
        }
    }

    /// Drops the items of a transparent list the policies hide from this caller, and the
    /// tools held back (`crate::pinning`).
    fn filter_list(&self, server: &str, method: &str, result: &mut Value) {
        let key = match method {
            "tools/list" => "tools",
            "prompts/list" => "prompts",
            "resources/list" => "resources",
            _ => return,
        };
        if key == "tools" {
            if let Some(tools) = result["tools"].as_array_mut() {
                self.hold_back(server, tools);
            }
        }
        if !self.policies.any() {
            return;
        }
        if let Some(items) = result[key].as_array_mut() {
            items.retain(|item| self.listable(server, item));
        }
    }

    /// Whether a catalogue item (a tool, prompt or resource of `server`) is listed.
    fn listable(&self, server: &str, item: &Value) -> bool {
        let id = |key: &str| item[key].as_str().unwrap_or_default();
        let access = if item.get("uri").is_some() {
            Access::Resource {
                server,
                uri: id("uri"),
            }
        } else if item.get("inputSchema").is_some() {
            Access::Tool {
                server,
                name: id("name"),
            }
        } else if item.get("uriTemplate").is_some() {
            return true;
        } else {
            Access::Prompt {
                server,
                name: id("name"),
            }
        };
        self.policies.may_list(&self.principal, &access)
    }

    /// The visible server that lists `uri` (or a template it matches).
    async fn owner_of_uri(&self, uri: &str) -> Option<String> {
        let servers = self.visible_servers();
        let infos =
            futures_util::future::join_all(servers.iter().map(|(name, _)| self.info(name))).await;
        let pairs: Vec<(String, ServerInfo)> =
            servers.into_iter().map(|(n, _)| n).zip(infos).collect();
        let exact = pairs
            .iter()
            .find(|(_, i)| i.catalogue.resources.iter().any(|r| r["uri"] == json!(uri)));
        if let Some((n, _)) = exact {
            return Some(n.clone());
        }
        pairs
            .into_iter()
            .find(|(_, i)| i.catalogue.serves_uri(uri))
            .map(|(n, _)| n)
    }
}

fn mark_idempotent(tool: &mut Value, idempotent: &[String], name: Option<&str>) {
    let name = name
        .or_else(|| tool["name"].as_str())
        .unwrap_or_default()
        .to_string();
    let Some(obj) = tool.as_object_mut() else {
        return;
    };
    let meta = obj.entry("_meta").or_insert(json!({}));
    if let Some(m) = meta.as_object_mut() {
        // Whatever the server claimed, only the registry decides.
        m.remove(IDEMPOTENT_META);
        if idempotent.contains(&name) {
            m.insert(IDEMPOTENT_META.into(), json!(true));
        }
        if m.is_empty() {
            obj.remove("_meta");
        }
    }
}

/// What a call of `method` with `params` on `server` reaches, and its arguments; `None` for
/// a call that reaches no tool, prompt or resource.
fn reached<'a>(
    server: &'a str,
    method: &str,
    params: Option<&'a Value>,
) -> Option<(Access<'a>, &'a Value)> {
    static EMPTY: Value = Value::Null;
    let params = params.unwrap_or(&EMPTY);
    let text = |v: &'a Value| v.as_str().unwrap_or_default();
    let args = params.get("arguments").unwrap_or(&EMPTY);
    Some(match method {
        "tools/call" => (
            Access::Tool {
                server,
                name: text(&params["name"]),
            },
            args,
        ),
        "prompts/get" => (
            Access::Prompt {
                server,
                name: text(&params["name"]),
            },
            args,
        ),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => (
            Access::Resource {
                server,
                uri: text(&params["uri"]),
            },
            &EMPTY,
        ),
        "completion/complete" => match params["ref"]["type"].as_str() {
            Some("ref/prompt") => (
                Access::Prompt {
                    server,
                    name: text(&params["ref"]["name"]),
                },
                &EMPTY,
            ),
            Some("ref/resource") => (
                Access::Resource {
                    server,
                    uri: text(&params["ref"]["uri"]),
                },
                &EMPTY,
            ),
            _ => return None,
        },
        _ => return None,
    })
}

fn noun(method: &str) -> &'static str {
    if method == "tools/call" {
        "tool"
    } else {
        "prompt"
    }
}
