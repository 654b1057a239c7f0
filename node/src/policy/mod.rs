//! Authorization of MCP calls by the replicated policy rules (`PolicySpec`, `/v1/policies`),
//! decided on the node that receives the call, with no extra hop: the rules are compiled once
//! per change of the registry's policies (globs as they are, CEL conditions parsed) and read
//! from memory for every call.
//!
//! Rules run in `order` (then name); the first whose targets, callers and condition match
//! decides. None matching: allowed. A list (`tools/list`...) shows an item unless a rule
//! without a condition denies it first (a rule with a condition may allow some calls, so the
//! item stays listed and each call is decided with its arguments).

pub mod condition;
pub mod glob;

use std::sync::{Arc, RwLock};

use mcpcp_proto::api::{Effect, PolicySpec, PolicyVerdict};
use serde_json::{json, Value};

use crate::registry::{Principal, Registry};
use condition::{Condition, Facts};

/// What a call reaches.
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    Tool { server: &'a str, name: &'a str },
    Prompt { server: &'a str, name: &'a str },
    Resource { server: &'a str, uri: &'a str },
}

impl Access<'_> {
    /// The target names rules match: `server:S` and the item's own.
    fn targets(&self) -> [String; 2] {
        match self {
            Access::Tool { server, name } => {
                [format!("server:{server}"), format!("tool:{server}__{name}")]
            }
            Access::Prompt { server, name } => [
                format!("server:{server}"),
                format!("prompt:{server}__{name}"),
            ],
            Access::Resource { server, uri } => {
                [format!("server:{server}"), format!("resource:{uri}")]
            }
        }
    }

    /// The tool's or prompt's name, or the resource's URI.
    pub fn item(&self) -> &str {
        match *self {
            Access::Tool { name, .. } | Access::Prompt { name, .. } => name,
            Access::Resource { uri, .. } => uri,
        }
    }

    /// What kind of item it is, for messages.
    pub fn noun(&self) -> &'static str {
        match self {
            Access::Tool { .. } => "tool",
            Access::Prompt { .. } => "prompt",
            Access::Resource { .. } => "resource",
        }
    }

    fn facts(&self) -> (&str, &str, &str) {
        match *self {
            Access::Tool { server, name } | Access::Prompt { server, name } => (server, name, ""),
            Access::Resource { server, uri } => (server, "", uri),
        }
    }
}

/// A rule ready to evaluate.
struct Rule {
    /// The servers its targets can reach, when each names one without a glob: a call to
    /// another server skips the rule without matching a glob. `None`: any server.
    servers: Option<Vec<String>>,
    spec: PolicySpec,
    /// `Err`: it did not compile (refused at write; kept failing closed if it ever is).
    condition: Option<Result<Condition, String>>,
}

struct Compiled {
    version: u64,
    rules: Vec<Rule>,
}

/// The node's compiled rules, recompiled when the registry's policies change.
#[derive(Clone)]
pub struct Policies {
    registry: Registry,
    compiled: Arc<RwLock<Arc<Compiled>>>,
}

impl Policies {
    pub fn new(registry: Registry) -> Policies {
        Policies {
            registry,
            compiled: Arc::new(RwLock::new(Arc::new(Compiled {
                version: u64::MAX,
                rules: Vec::new(),
            }))),
        }
    }

    fn rules(&self) -> Arc<Compiled> {
        let version = self.registry.local().state.policies_version;
        {
            let c = self.compiled.read().unwrap_or_else(|e| e.into_inner());
            if c.version == version {
                return c.clone();
            }
        }
        let mut specs: Vec<PolicySpec> = {
            let data = self.registry.local();
            data.state
                .policies
                .values()
                .map(|v| v.spec.clone())
                .collect()
        };
        specs.sort_by(|a, b| (a.order, &a.name).cmp(&(b.order, &b.name)));
        let rules = specs
            .into_iter()
            .map(|spec| Rule {
                servers: literal_servers(&spec.targets),
                condition: spec.condition.as_deref().map(Condition::compile),
                spec,
            })
            .collect();
        let fresh = Arc::new(Compiled { version, rules });
        *self.compiled.write().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        metrics::gauge!("mcpd_policy_rules").set(fresh.rules.len() as f64);
        fresh
    }

    /// Whether `who` may make this call with `args`, and the rule that said so.
    pub fn decide(&self, who: &Principal, access: &Access<'_>, args: &Value) -> PolicyVerdict {
        let verdict = decide(&self.rules().rules, who, access, args);
        let effect = if verdict.allowed { "allow" } else { "deny" };
        metrics::counter!("mcpd_policy_decisions_total", "effect" => effect).increment(1);
        verdict
    }

    /// [`Policies::decide`] without counting it (a test of the rules, not a call).
    pub fn decide_only(&self, who: &Principal, access: &Access<'_>, args: &Value) -> PolicyVerdict {
        decide(&self.rules().rules, who, access, args)
    }

    /// Whether a list shows the item to `who` (see the module's comment).
    pub fn may_list(&self, who: &Principal, access: &Access<'_>) -> bool {
        may_list(&self.rules().rules, who, access)
    }

    /// Whether any rule exists (lists skip the filtering when none does).
    pub fn any(&self) -> bool {
        !self.rules().rules.is_empty()
    }
}

/// The caller as conditions see it (`principal.*`).
pub fn principal_facts(who: &Principal) -> Value {
    // `subject` is qualified (`jwt:ISSUER:SUB`, or an API token's id): a bare `sub` could be
    // minted by any trusted issuer, a tenant's own included.
    json!({
        "subject": who.token_id,
        "token_id": who.token_id,
        "tenant": who.tenant,
        "role": who.role.as_str(),
        "groups": who.groups,
        "issuer": who.jwt.as_ref().map(|j| j.issuer.as_str()),
    })
}

/// The one server each target names, when none has a glob in its server part (`resource:`
/// targets name none: the rule is for any server).
fn literal_servers(targets: &[String]) -> Option<Vec<String>> {
    if targets.is_empty() {
        return None;
    }
    targets
        .iter()
        .map(|t| {
            let server = match t.split_once(':')? {
                ("server", s) => s,
                ("tool" | "prompt", rest) => rest.split_once("__")?.0,
                _ => return None,
            };
            (!server.contains('*')).then(|| server.to_string())
        })
        .collect()
}

impl Rule {
    /// Whether the rule may cover a call to `server` at all.
    fn may_reach(&self, server: &str) -> bool {
        self.servers
            .as_ref()
            .is_none_or(|s| s.iter().any(|x| x == server))
    }
}

fn any_glob(patterns: &[String], value: &str) -> bool {
    patterns.iter().any(|p| glob::matches(p, value))
}

/// Whether the rule's callers and targets (`access.targets()`, made once per decision) cover
/// this call (not its condition).
fn covers(spec: &PolicySpec, who: &Principal, targets: &[String; 2]) -> bool {
    (spec.targets.is_empty() || targets.iter().any(|t| any_glob(&spec.targets, t)))
        && (spec.roles.is_empty() || spec.roles.contains(&who.role))
        && (spec.tenants.is_empty()
            || who
                .tenant
                .as_deref()
                .is_some_and(|t| any_glob(&spec.tenants, t)))
        && (spec.subjects.is_empty() || any_glob(&spec.subjects, &who.token_id))
        && (spec.groups.is_empty() || who.groups.iter().any(|g| any_glob(&spec.groups, g)))
}

fn decide(rules: &[Rule], who: &Principal, access: &Access<'_>, args: &Value) -> PolicyVerdict {
    let (server, name, uri) = access.facts();
    let targets = access.targets();
    // Converted once, when the first rule with a condition needs them.
    let mut facts: Option<Option<Facts<'_>>> = None;
    for rule in rules {
        if !rule.may_reach(server) || !covers(&rule.spec, who, &targets) {
            continue;
        }
        let holds = match &rule.condition {
            None => Some(true),
            Some(Ok(c)) => facts
                .get_or_insert_with(|| Facts::new(args, &principal_facts(who), server, name, uri))
                .as_ref()
                .and_then(|f| c.eval(f)),
            Some(Err(_)) => None,
        };
        let decided = match (holds, rule.spec.effect) {
            (Some(true), effect) => Some(effect),
            (Some(false), _) => None,
            // A condition that fails counts against the caller.
            (None, Effect::Deny) => Some(Effect::Deny),
            (None, Effect::Allow) => None,
        };
        if let Some(effect) = decided {
            return PolicyVerdict {
                allowed: effect == Effect::Allow,
                rule: Some(rule.spec.name.clone()),
            };
        }
    }
    PolicyVerdict {
        allowed: true,
        rule: None,
    }
}

fn may_list(rules: &[Rule], who: &Principal, access: &Access<'_>) -> bool {
    let targets = access.targets();
    let server = access.facts().0;
    for rule in rules {
        if !rule.may_reach(server) || !covers(&rule.spec, who, &targets) {
            continue;
        }
        match (&rule.condition, rule.spec.effect) {
            (None, effect) => return effect == Effect::Allow,
            (Some(_), Effect::Allow) => return true,
            (Some(_), Effect::Deny) => continue,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcpcp_proto::api::Role;

    fn rule(
        name: &str,
        order: u32,
        effect: Effect,
        targets: &[&str],
        condition: Option<&str>,
    ) -> Rule {
        let spec = PolicySpec {
            name: name.into(),
            order,
            effect,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            tenants: vec![],
            roles: vec![],
            subjects: vec![],
            groups: vec![],
            condition: condition.map(String::from),
            description: None,
        };
        Rule {
            servers: literal_servers(&spec.targets),
            condition: spec.condition.as_deref().map(Condition::compile),
            spec,
        }
    }

    #[test]
    fn rules_are_indexed_by_the_servers_they_name() {
        let t = |v: &[&str]| literal_servers(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            t(&["tool:files__read_*", "server:git"]),
            Some(vec!["files".into(), "git".into()])
        );
        assert_eq!(t(&["tool:*__delete"]), None);
        assert_eq!(t(&["resource:file:///srv/*"]), None);
        assert_eq!(t(&[]), None);
    }

    fn alice() -> Principal {
        Principal {
            token_id: "tok".into(),
            role: Role::User,
            tenant: Some("acme".into()),
            scopes: None,
            groups: vec!["eng".into()],
            jwt: None,
        }
    }

    const READ: Access<'static> = Access::Tool {
        server: "files",
        name: "read_text_file",
    };
    const WRITE: Access<'static> = Access::Tool {
        server: "files",
        name: "write_file",
    };

    #[test]
    fn the_first_matching_rule_decides_and_none_allows() {
        let rules = vec![
            rule(
                "no-writes",
                10,
                Effect::Deny,
                &["tool:files__write_*"],
                None,
            ),
            rule("files", 20, Effect::Allow, &["server:files"], None),
            rule("rest", 100, Effect::Deny, &[], None),
        ];
        let v = decide(&rules, &alice(), &WRITE, &json!({}));
        assert_eq!((v.allowed, v.rule.as_deref()), (false, Some("no-writes")));
        let v = decide(&rules, &alice(), &READ, &json!({}));
        assert_eq!((v.allowed, v.rule.as_deref()), (true, Some("files")));
        let other = Access::Tool {
            server: "git",
            name: "log",
        };
        assert_eq!(
            decide(&rules, &alice(), &other, &json!({})).rule.as_deref(),
            Some("rest")
        );
        assert_eq!(
            decide(&[], &alice(), &other, &json!({})),
            PolicyVerdict {
                allowed: true,
                rule: None
            }
        );
    }

    #[test]
    fn a_condition_reads_the_arguments_and_a_failing_one_counts_against_the_caller() {
        let own = r#"args.path.startsWith("/srv/" + principal.tenant)"#;
        let rules = vec![
            rule("own-dir", 10, Effect::Allow, &["tool:files__*"], Some(own)),
            rule("rest", 100, Effect::Deny, &["tool:files__*"], None),
        ];
        assert!(decide(&rules, &alice(), &READ, &json!({"path": "/srv/acme/a"})).allowed);
        let v = decide(&rules, &alice(), &READ, &json!({"path": "/etc/passwd"}));
        assert_eq!((v.allowed, v.rule.as_deref()), (false, Some("rest")));
        // No `path` at all: the allow rule's condition fails, so it does not allow.
        assert!(!decide(&rules, &alice(), &READ, &json!({})).allowed);
        let deny_on_error = vec![rule("guard", 10, Effect::Deny, &[], Some("args.n > 3"))];
        assert!(!decide(&deny_on_error, &alice(), &READ, &json!({})).allowed);
        assert!(decide(&deny_on_error, &alice(), &READ, &json!({"n": 1})).allowed);
    }

    #[test]
    fn callers_are_matched_by_role_tenant_subject_and_group() {
        let mut r = rule("eng-only", 10, Effect::Deny, &[], None);
        r.spec.groups = vec!["ops*".into()];
        assert!(
            decide(std::slice::from_ref(&r), &alice(), &READ, &json!({})).allowed,
            "not in ops"
        );
        r.spec.groups = vec!["e*".into()];
        assert!(!decide(std::slice::from_ref(&r), &alice(), &READ, &json!({})).allowed);
        r.spec.tenants = vec!["globex".into()];
        assert!(decide(std::slice::from_ref(&r), &alice(), &READ, &json!({})).allowed);
        r.spec.tenants = vec![];
        r.spec.roles = vec![Role::ClusterAdmin];
        assert!(decide(std::slice::from_ref(&r), &alice(), &READ, &json!({})).allowed);
    }

    #[test]
    fn a_list_hides_only_what_no_call_could_reach() {
        let own = r#"args.path.startsWith("/srv/")"#;
        let rules = vec![
            rule("writes", 5, Effect::Deny, &["tool:files__write_*"], None),
            rule(
                "own-dir",
                10,
                Effect::Allow,
                &["tool:files__read_*"],
                Some(own),
            ),
            rule("rest", 100, Effect::Deny, &["tool:files__*"], None),
        ];
        assert!(!may_list(&rules, &alice(), &WRITE));
        assert!(
            may_list(&rules, &alice(), &READ),
            "some arguments are allowed"
        );
        let dir = Access::Tool {
            server: "files",
            name: "list_directory",
        };
        assert!(!may_list(&rules, &alice(), &dir));
    }
}
