//! The CEL condition of a policy rule (the `cel` crate, the Common Expression Language):
//! compiled once when the rules change, evaluated with the call's `args`, the `principal`,
//! `server`, `name` and `uri`. An expression that does not give a boolean, or fails (a missing
//! field, a wrong type), counts against the caller: an allow rule does not match, a deny rule
//! does.

use std::sync::{Arc, OnceLock};

use cel::{Context, Env, Program, Value};
use serde_json::Value as Json;

/// CEL's standard functions, built once (a context of its own per call would rebuild them).
fn stdlib() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

/// A compiled condition.
pub struct Condition {
    program: Program,
}

/// What a condition sees of a call, converted once per decision.
pub struct Facts<'a> {
    args: Value,
    principal: Value,
    server: &'a str,
    name: &'a str,
    uri: &'a str,
}

impl<'a> Facts<'a> {
    /// `None` when the arguments or the principal cannot be turned into CEL values.
    pub fn new(
        args: &Json,
        principal: &Json,
        server: &'a str,
        name: &'a str,
        uri: &'a str,
    ) -> Option<Facts<'a>> {
        Some(Facts {
            args: cel::to_value(args).ok()?,
            principal: cel::to_value(principal).ok()?,
            server,
            name,
            uri,
        })
    }
}

/// Comprehension macros a condition may use: each walks a list the caller sends, and nested
/// ones multiply, so a condition holds at most one.
const COMPREHENSIONS: [&str; 5] = [".all(", ".exists(", ".exists_one(", ".map(", ".filter("];

impl Condition {
    /// Compiles `source`; the error says where it does not parse.
    pub fn compile(source: &str) -> Result<Condition, String> {
        if source.len() > 4096 {
            return Err("longer than 4096 characters".into());
        }
        let walks: usize = COMPREHENSIONS
            .iter()
            .map(|m| source.matches(m).count())
            .sum();
        if walks > 1 {
            return Err(format!(
                "uses {walks} comprehensions ({}); at most one",
                COMPREHENSIONS.join(" ")
            ));
        }
        Program::compile(source)
            .map(|program| Condition { program })
            .map_err(|e| e.to_string())
    }

    /// `Some(true|false)` for a boolean answer; `None` when it failed or gave another type.
    pub fn eval(&self, facts: &Facts<'_>) -> Option<bool> {
        let mut ctx = Context::with_env(stdlib());
        ctx.add_variable_from_value("args", facts.args.clone());
        ctx.add_variable_from_value("principal", facts.principal.clone());
        ctx.add_variable_from_value("server", facts.server);
        ctx.add_variable_from_value("name", facts.name);
        ctx.add_variable_from_value("uri", facts.uri);
        match self.program.execute(&ctx) {
            Ok(Value::Bool(b)) => Some(b),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(source: &str, args: Json) -> Option<bool> {
        let principal =
            json!({"tenant": "acme", "subject": "alice", "role": "user", "groups": ["eng"]});
        let facts = Facts::new(&args, &principal, "files", "read_text_file", "").unwrap();
        Condition::compile(source).unwrap().eval(&facts)
    }

    #[test]
    fn a_condition_reads_the_arguments_and_the_principal() {
        let rule = r#"args.path.startsWith("/srv/" + principal.tenant)"#;
        assert_eq!(eval(rule, json!({"path": "/srv/acme/a.txt"})), Some(true));
        assert_eq!(eval(rule, json!({"path": "/etc/passwd"})), Some(false));
        assert_eq!(
            eval(
                r#""eng" in principal.groups && server == "files""#,
                json!({})
            ),
            Some(true)
        );
    }

    #[test]
    fn a_failing_or_non_boolean_condition_is_no_answer() {
        assert_eq!(
            eval("args.path.startsWith('/srv')", json!({})),
            None,
            "no such field"
        );
        assert_eq!(eval("1 + 1", json!({})), None, "not a boolean");
        assert!(Condition::compile("args.path.startsWith(").is_err());
        assert!(
            Condition::compile("args.a.all(x, args.b.all(y, x == y))").is_err(),
            "nested walks"
        );
        assert!(Condition::compile("args.a.all(x, x > 0)").is_ok());
    }
}
