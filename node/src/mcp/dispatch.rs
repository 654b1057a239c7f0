//! Where a client request goes, whatever the protocol revision: to one server's pool (the
//! transparent endpoint), or, on the aggregate endpoint, to the server that owns the tool,
//! prompt or resource, with names prefixed `{server}__` so that servers cannot collide.
//!
//! Every call that reaches a process runs through [`Pool::call`] with an events channel, so
//! progress, logging and the server's own requests flow back to the caller as they happen.

use std::sync::Arc;
use std::time::Duration;

use mcpcp_proto::api::{Role, ServerSpec, Versioned};
use mcpcp_proto::mcp::{code, ErrorObject};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::session::Target;
use crate::pool::process::CallEvent;
use crate::pool::reconcile::Pools;
use crate::pool::Pool;
use crate::registry::{Principal, Registry};

/// The separator of aggregated names: `{server}__{tool}`. Server names cannot contain it.
pub const SEPARATOR: &str = "__";

/// Longest wait for a catalogue while listing the aggregate.
const LIST_WAIT: Duration = Duration::from_secs(10);

/// Whether `principal` may use server `spec`: a global server, or one of its own tenant's.
pub fn visible(principal: &Principal, spec: &ServerSpec) -> bool {
    principal.role == Role::Admin || spec.tenant.is_none() || spec.tenant == principal.tenant
}

/// The request context the dispatcher needs (owned, so a call can run in its own task).
#[derive(Clone)]
pub struct Route {
    pub registry: Registry,
    pub pools: Pools,
    pub principal: Principal,
    pub target: Target,
}

fn invalid(message: impl Into<String>) -> ErrorObject {
    ErrorObject::new(code::INVALID_PARAMS, message)
}

impl Route {
    /// The pool of a visible, enabled server; errors say which of those it is not.
    pub fn pool(&self, name: &str) -> Result<Arc<Pool>, ErrorObject> {
        let spec: Option<Versioned<ServerSpec>> =
            self.registry.local().state.servers.get(name).cloned();
        match spec {
            Some(s) if visible(&self.principal, &s.spec) => {
                if !s.spec.enabled {
                    return Err(ErrorObject::new(
                        code::UNAVAILABLE,
                        format!("server {name:?} is disabled"),
                    ));
                }
                self.pools.get(name).ok_or_else(|| {
                    ErrorObject::new(
                        code::UNAVAILABLE,
                        format!("server {name:?} is not running on this node yet"),
                    )
                })
            }
            _ => Err(invalid(format!("unknown server {name:?}"))),
        }
    }

    /// Pools of every server this caller may use, by name.
    fn visible_pools(&self) -> Vec<Arc<Pool>> {
        let servers = self.registry.local().state.servers.clone();
        self.pools
            .all()
            .into_iter()
            .filter(|p| {
                servers
                    .get(&p.name)
                    .is_some_and(|s| visible(&self.principal, &s.spec))
            })
            .collect()
    }

    /// Runs `method` for the client.
    pub async fn dispatch(
        &self,
        method: &str,
        params: Option<Value>,
        events: mpsc::Sender<CallEvent>,
    ) -> Result<Value, ErrorObject> {
        match &self.target {
            Target::Server(name) => {
                let pool = self.pool(name)?;
                let mut result = pool.call(method, params, Some(events)).await?;
                if method == "tools/list" {
                    if let Some(tools) = result["tools"].as_array_mut() {
                        for tool in tools {
                            mark_idempotent(tool, &pool.spec.spec.idempotent_tools, None);
                        }
                    }
                }
                Ok(result)
            }
            Target::Aggregate => self.aggregate(method, params, events).await,
        }
    }

    async fn aggregate(
        &self,
        method: &str,
        params: Option<Value>,
        events: mpsc::Sender<CallEvent>,
    ) -> Result<Value, ErrorObject> {
        match method {
            "ping" => Ok(json!({})),
            "tools/list" => Ok(json!({ "tools": self.list(|c| &c.tools, "name").await })),
            "prompts/list" => Ok(json!({ "prompts": self.list(|c| &c.prompts, "name").await })),
            "resources/list" => Ok(json!({ "resources": self.list(|c| &c.resources, "").await })),
            "resources/templates/list" => {
                Ok(json!({ "resourceTemplates": self.list(|c| &c.resource_templates, "").await }))
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
                let pool = self.pool(server).map_err(|e| {
                    if e.code == code::INVALID_PARAMS {
                        invalid(format!("unknown {} {full:?}", noun(method)))
                    } else {
                        e
                    }
                })?;
                params["name"] = json!(name);
                pool.call(method, Some(params), Some(events)).await
            }
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                let uri = params
                    .as_ref()
                    .and_then(|p| p["uri"].as_str())
                    .ok_or_else(|| invalid("params.uri: required"))?
                    .to_string();
                let pool = self.owner_of_uri(&uri).await.ok_or_else(|| {
                    ErrorObject::new(code::RESOURCE_NOT_FOUND, format!("resource not found: {uri}"))
                        .with_data(json!({ "uri": uri }))
                })?;
                pool.call(method, params, Some(events)).await
            }
            "completion/complete" => {
                let mut params = params.ok_or_else(|| invalid("params: required"))?;
                let reference = params["ref"].clone();
                let pool = match reference["type"].as_str() {
                    Some("ref/prompt") => {
                        let full = reference["name"].as_str().unwrap_or_default().to_string();
                        let (server, name) = full
                            .split_once(SEPARATOR)
                            .ok_or_else(|| invalid(format!("unknown prompt {full:?}")))?;
                        params["ref"]["name"] = json!(name);
                        self.pool(server)?
                    }
                    Some("ref/resource") => {
                        let uri = reference["uri"].as_str().unwrap_or_default().to_string();
                        self.owner_of_uri(&uri)
                            .await
                            .ok_or_else(|| invalid(format!("unknown resource {uri:?}")))?
                    }
                    _ => return Err(invalid("params.ref.type: must be ref/prompt or ref/resource")),
                };
                pool.call(method, Some(params), Some(events)).await
            }
            other => Err(ErrorObject::new(
                code::METHOD_NOT_FOUND,
                format!("method not found: {other} (the aggregate endpoint does not relay it; use /servers/{{name}}/mcp)"),
            )),
        }
    }

    /// Lists one kind of catalogue item across visible servers; `rename` names the field that
    /// gets the `server__` prefix (empty: none, as for resources that keep their URIs).
    async fn list(
        &self,
        pick: impl Fn(&crate::pool::catalogue::Catalogue) -> &Vec<Value>,
        rename: &str,
    ) -> Vec<Value> {
        let pools = self.visible_pools();
        futures_util::future::join_all(pools.iter().map(|p| p.ready(LIST_WAIT))).await;
        let mut out = Vec::new();
        for pool in pools {
            let cat = pool.catalogue();
            for item in pick(&cat) {
                let mut item = item.clone();
                if item.get("inputSchema").is_some() {
                    let original = item["name"].as_str().map(String::from);
                    mark_idempotent(
                        &mut item,
                        &pool.spec.spec.idempotent_tools,
                        original.as_deref(),
                    );
                }
                if !rename.is_empty() {
                    if let Some(n) = item[rename].as_str() {
                        item[rename] = json!(format!("{}{SEPARATOR}{n}", pool.name));
                    }
                }
                out.push(item);
            }
        }
        out
    }

    /// The visible server that lists `uri` (or a template it matches).
    async fn owner_of_uri(&self, uri: &str) -> Option<Arc<Pool>> {
        let pools = self.visible_pools();
        let exact = pools.iter().find(|p| {
            p.catalogue()
                .resources
                .iter()
                .any(|r| r["uri"] == json!(uri))
        });
        if let Some(p) = exact {
            return Some(p.clone());
        }
        pools.into_iter().find(|p| p.catalogue().serves_uri(uri))
    }
}

/// The `_meta` key telling clients (`mcp-bridge`) that the registry lists a tool as safe to
/// run twice. Set by the gateway from the registry, never taken from the server.
pub const IDEMPOTENT_META: &str = "io.mcpcp/idempotent";

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

fn noun(method: &str) -> &'static str {
    if method == "tools/call" {
        "tool"
    } else {
        "prompt"
    }
}
