//! What one server offers: its tools, resources, resource templates and prompts, read from a
//! ready process (following pagination) and reloaded when the server says a list changed.
//! The aggregate endpoint lists and routes from it without asking the server each time.

use mcpcp_proto::mcp::Message;
use serde_json::{json, Value};

use super::upstream::Upstream;
use crate::call::CallError;

/// Most pages followed for one list (a guard against a server that never ends its cursor).
const MAX_PAGES: usize = 100;

#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    pub tools: Vec<Value>,
    pub resources: Vec<Value>,
    pub resource_templates: Vec<Value>,
    pub prompts: Vec<Value>,
    /// Whether it was loaded from a ready process (an empty default is not).
    pub loaded: bool,
}

/// The lists a server offers, as `notifications/{list}/list_changed` names them.
pub const LISTS: [&str; 3] = ["tools", "prompts", "resources"];

/// The list a `notifications/{list}/list_changed` names, when it is one of [`LISTS`].
pub fn list_of(method: &str) -> Option<&'static str> {
    let list = method
        .strip_prefix("notifications/")?
        .strip_suffix("/list_changed")?;
    LISTS.into_iter().find(|l| *l == list)
}

/// The notification that a server's `list` changed.
pub fn list_changed(list: &str) -> Message {
    Message::notification(format!("notifications/{list}/list_changed"), None)
}

impl Catalogue {
    /// The lists (`tools`, `prompts`, `resources`) this catalogue has something in.
    pub fn lists_offered(&self) -> Vec<&'static str> {
        [
            ("tools", self.tools.is_empty()),
            ("prompts", self.prompts.is_empty()),
            (
                "resources",
                self.resources.is_empty() && self.resource_templates.is_empty(),
            ),
        ]
        .into_iter()
        .filter_map(|(list, empty)| (!empty).then_some(list))
        .collect()
    }

    pub fn has_tool(&self, name: &str) -> bool {
        self.tools.iter().any(|t| t["name"].as_str() == Some(name))
    }

    pub fn has_prompt(&self, name: &str) -> bool {
        self.prompts
            .iter()
            .any(|p| p["name"].as_str() == Some(name))
    }

    /// Whether `item` is one this catalogue lists for `method` (a tool for `tools/call`, a
    /// prompt for `prompts/get`); `None` for other methods or before it was loaded.
    pub fn lists(&self, method: &str, item: &str) -> Option<bool> {
        if !self.loaded {
            return None;
        }
        match method {
            "tools/call" => Some(self.has_tool(item)),
            "prompts/get" => Some(self.has_prompt(item)),
            _ => None,
        }
    }

    /// Whether `uri` is one of the listed resources or matches a template's fixed prefix.
    pub fn serves_uri(&self, uri: &str) -> bool {
        self.resources.iter().any(|r| r["uri"] == json!(uri))
            || self.resource_templates.iter().any(|t| {
                t["uriTemplate"]
                    .as_str()
                    .map(|tpl| {
                        let prefix = tpl.split('{').next().unwrap_or(tpl);
                        !prefix.is_empty() && uri.starts_with(prefix)
                    })
                    .unwrap_or(false)
            })
    }
}

async fn list_all(
    process: &dyn Upstream,
    method: &str,
    key: &str,
) -> Result<Vec<Value>, CallError> {
    let mut out = Vec::new();
    let mut cursor: Option<Value> = None;
    for _ in 0..MAX_PAGES {
        let params = cursor.take().map(|c| json!({ "cursor": c }));
        let page = process.call(method, params, None).await?;
        if let Some(items) = page[key].as_array() {
            out.extend(items.iter().cloned());
        }
        match page.get("nextCursor") {
            Some(c) if !c.is_null() => cursor = Some(c.clone()),
            _ => break,
        }
    }
    Ok(out)
}

/// Loads the catalogue of the server behind `process`, for what its capabilities declare.
pub async fn load(process: &dyn Upstream, server: &str) -> Catalogue {
    let caps = &process.init()["capabilities"];
    let mut cat = Catalogue {
        loaded: true,
        ..Default::default()
    };
    let lists: [(&str, &str, &str, &mut Vec<Value>); 4] = [
        ("tools", "tools/list", "tools", &mut cat.tools),
        (
            "resources",
            "resources/list",
            "resources",
            &mut cat.resources,
        ),
        (
            "resources",
            "resources/templates/list",
            "resourceTemplates",
            &mut cat.resource_templates,
        ),
        ("prompts", "prompts/list", "prompts", &mut cat.prompts),
    ];
    for (cap, method, key, into) in lists {
        if caps.get(cap).is_none() {
            continue;
        }
        match list_all(process, method, key).await {
            Ok(items) => *into = items,
            Err(e) => {
                tracing::warn!(server, method, error = %e, "listing the catalogue failed")
            }
        }
    }
    tracing::info!(
        server,
        tools = cat.tools.len(),
        resources = cat.resources.len(),
        templates = cat.resource_templates.len(),
        prompts = cat.prompts.len(),
        "catalogue loaded"
    );
    cat
}
