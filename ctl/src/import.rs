//! `mcpctl import`: server definitions from the formats users already have.
//!
//! - The single-node prototype's YAML (`mcp_servers: [{id, name, type, command: [..], enabled}]`).
//! - Claude Desktop's `claude_desktop_config.json` (`mcpServers: {name: {command, args, env}}`),
//!   which Cursor's `mcp.json` shares.
//!
//! Names are turned into valid server names (lowercase, `-` for other characters); what cannot be
//! imported is reported as a warning, never dropped silently.

use std::collections::BTreeMap;

use mcpcp_proto::api::ServerSpec;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// What an import produced.
#[derive(Debug, Default)]
pub struct Imported {
    pub servers: Vec<ServerSpec>,
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
struct SeedConfig {
    #[serde(default)]
    mcp_servers: Vec<SeedServer>,
    #[serde(default)]
    auth_tokens: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    #[allow(dead_code)]
    server: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize)]
struct SeedServer {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    command: SeedCommand,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SeedCommand {
    List(Vec<String>),
    Line(String),
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaudeConfig {
    mcp_servers: BTreeMap<String, ClaudeServer>,
}

#[derive(Deserialize)]
struct ClaudeServer {
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    url: Option<String>,
    /// A remote server's headers (Cursor, VS Code and Claude Code write them).
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    disabled: bool,
}

/// A valid server name made from an arbitrary label.
pub fn server_name(label: &str) -> String {
    let mut out = String::new();
    for c in label.trim().chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-').to_string();
    let mut out: String = out.chars().take(32).collect();
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        "server".into()
    } else {
        out
    }
}

fn spec(
    name: String,
    command: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    enabled: bool,
) -> ServerSpec {
    ServerSpec {
        name,
        tenant: None,
        command,
        args,
        env,
        cwd,
        enabled,
        pool_size: 2,
        replicas: None,
        fallbacks: Vec::new(),
        timeouts: Default::default(),
        idempotent_tools: Vec::new(),
        session_mode: Default::default(),
        sandbox: None,
        url: None,
        headers: BTreeMap::new(),
        ca_file: None,
        oauth: None,
    }
}

/// Parses either format, telling them apart by content.
pub fn parse(text: &str) -> Result<Imported, ImportError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        if let Ok(c) = serde_json::from_str::<ClaudeConfig>(text) {
            return Ok(from_claude(c));
        }
        let e = serde_json::from_str::<ClaudeConfig>(text).err();
        return Err(ImportError::Parse(format!(
            "not a Claude Desktop config (mcpServers): {}",
            e.map(|e| e.to_string()).unwrap_or_default()
        )));
    }
    let seed: SeedConfig = serde_yaml_ng::from_str(text)
        .map_err(|e| ImportError::Parse(format!("not a control-plane YAML config: {e}")))?;
    from_seed(seed)
}

fn from_claude(c: ClaudeConfig) -> Imported {
    let mut out = Imported::default();
    for (label, s) in c.mcp_servers {
        let name = server_name(&label);
        match (s.command, s.url) {
            (Some(command), _) => {
                if name != label {
                    out.warnings
                        .push(format!("{label:?} is registered as {name:?}"));
                }
                out.servers
                    .push(spec(name, command, s.args, s.env, s.cwd, !s.disabled));
            }
            (None, Some(url)) => {
                if name != label {
                    out.warnings
                        .push(format!("{label:?} is registered as {name:?}"));
                }
                let mut remote = spec(
                    name,
                    String::new(),
                    Vec::new(),
                    BTreeMap::new(),
                    None,
                    !s.disabled,
                );
                remote.url = Some(url);
                remote.headers = s.headers;
                out.servers.push(remote);
            }
            (None, None) => out
                .warnings
                .push(format!("{label:?} has no command; skipped")),
        }
    }
    out
}

fn from_seed(seed: SeedConfig) -> Result<Imported, ImportError> {
    let mut out = Imported::default();
    if !seed.auth_tokens.is_empty() {
        out.warnings.push(format!(
            "{} static auth_tokens were not imported: the cluster stores only hashes of tokens it mints; create new ones with `mcpctl token create`",
            seed.auth_tokens.len()
        ));
    }
    for (i, s) in seed.mcp_servers.into_iter().enumerate() {
        let mut words = match s.command {
            SeedCommand::List(v) => v,
            SeedCommand::Line(l) => l.split_whitespace().map(String::from).collect(),
        };
        if words.is_empty() {
            return Err(ImportError::Invalid {
                field: format!("mcp_servers[{i}].command"),
                message: "is empty".into(),
            });
        }
        let command = words.remove(0);
        let name = server_name(&s.id);
        if name != s.id {
            out.warnings
                .push(format!("{:?} is registered as {name:?}", s.id));
        }
        if let Some(kind) = &s.kind {
            if ![
                "npx", "python", "uvx", "uv", "node", "stdio", "docker", "binary",
            ]
            .contains(&kind.as_str())
            {
                out.warnings.push(format!(
                    "{name}: type {kind:?} is treated as a stdio command"
                ));
            }
        }
        let _ = s.name;
        out.servers
            .push(spec(name, command, words, s.env, s.cwd, s.enabled));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_yaml_imports() {
        let text = r#"
server:
  host: "0.0.0.0"
  port: 8444
auth_tokens:
  - "your-secure-token-here"
mcp_servers:
  - id: "filesystem"
    name: "Filesystem Server"
    type: "npx"
    command: ["npx", "@modelcontextprotocol/server-filesystem", "/path"]
    enabled: true
  - id: "My DB"
    command: "python db.py --ro"
    enabled: false
"#;
        let out = parse(text).expect("parses");
        assert_eq!(out.servers.len(), 2);
        assert_eq!(out.servers[0].name, "filesystem");
        assert_eq!(out.servers[0].command, "npx");
        assert_eq!(
            out.servers[0].args,
            vec!["@modelcontextprotocol/server-filesystem", "/path"]
        );
        assert_eq!(out.servers[1].name, "my-db");
        assert!(!out.servers[1].enabled);
        assert_eq!(out.servers[1].args, vec!["db.py", "--ro"]);
        assert!(out.warnings.iter().any(|w| w.contains("auth_tokens")));
    }

    #[test]
    fn claude_json_imports() {
        let text = r#"{"mcpServers": {
            "time": {"command": "uvx", "args": ["mcp-server-time"]},
            "Git Repo": {"command": "uvx", "args": ["mcp-server-git"], "env": {"A": "1"}},
            "remote": {"url": "https://example.invalid/mcp", "headers": {"Authorization": "Bearer x"}}
        }}"#;
        let out = parse(text).expect("parses");
        let names: Vec<_> = out.servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["git-repo", "remote", "time"]);
        assert_eq!(out.servers[0].env["A"], "1");
        let remote = &out.servers[1];
        assert_eq!(remote.url.as_deref(), Some("https://example.invalid/mcp"));
        assert_eq!(remote.headers["Authorization"], "Bearer x");
        assert!(remote.command.is_empty());
    }

    #[test]
    fn names_are_made_valid() {
        assert_eq!(server_name("Filesystem Server"), "filesystem-server");
        assert_eq!(server_name("__x__"), "x");
        assert_eq!(server_name("!!!"), "server");
    }
}
