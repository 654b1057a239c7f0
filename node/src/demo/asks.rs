//! Tools (and a prompt) that ask the client before they answer, named and shaped as the MCP
//! conformance suite's 2026-07-28 `input-required-result-*` scenarios want them. Each question
//! has the input key the scenario names: in 2026-07-28 it is part of the request's
//! `input_required` result (`super::round`); in a session it is a request of the server's own
//! with that id, which the gateway turns into an `input_required` result for a 2026-07-28
//! client (`mcp::stateless`).

use serde_json::{json, Value};

use super::content::{self, tool_error, tool_ok};
use super::rpc::RpcError;
use super::session::Session;

/// The prompt that asks first.
pub const PROMPT: &str = "test_input_required_result_prompt";

/// `tools/list` entries.
pub fn tools() -> Vec<Value> {
    let none = json!({ "type": "object", "properties": {} });
    [
        ("test_input_required_result_elicitation", "Asks the user's name (elicitation, key user_name), then greets them."),
        ("test_input_required_result_sampling", "Asks the client's LLM the capital of France (sampling, key capital_question)."),
        ("test_input_required_result_list_roots", "Asks the client's roots (roots/list, key client_roots) and lists them."),
        ("test_input_required_result_request_state", "Asks for a confirmation (elicitation, key confirm)."),
        ("test_input_required_result_tampered_state", "Asks for a confirmation (elicitation, key confirm)."),
        ("test_input_required_result_multiple_inputs", "Asks three things at once: a name, a greeting from the LLM and the roots."),
        ("test_input_required_result_multi_round", "Asks a name (step1), then a favourite colour (step2)."),
        ("test_input_required_result_capabilities", "Asks the LLM and the user, each only if the request's client capabilities have it."),
    ]
    .into_iter()
    .map(|(name, description)| json!({ "name": name, "description": description, "inputSchema": none }))
    .collect()
}

/// The `prompts/list` entry.
pub fn prompt_entry() -> Value {
    json!({ "name": PROMPT, "description": "Asks the user what context to use (elicitation, key user_context) first" })
}

fn form(message: &str, field: &str, kind: &str) -> Value {
    json!({
        "message": message,
        "requestedSchema": {
            "type": "object",
            "properties": { field: { "type": kind } },
            "required": [field],
        },
    })
}

fn sampling(question: &str, max_tokens: u64) -> Value {
    json!({
        "messages": [{ "role": "user", "content": { "type": "text", "text": question } }],
        "maxTokens": max_tokens,
    })
}

/// The field of an accepted elicitation, or why there is none.
fn accepted(answer: &Value, field: &str) -> Result<String, String> {
    match answer["action"].as_str() {
        Some("accept") => answer["content"][field]
            .as_str()
            .map(String::from)
            .or_else(|| answer["content"][field].as_bool().map(|b| b.to_string()))
            .ok_or_else(|| format!("the answer has no {field}")),
        Some(other) => Err(format!("the user chose {other}")),
        None => Err("the answer has no action".into()),
    }
}

/// The text of a sampling answer.
fn sampled(answer: &Value) -> String {
    match &answer["content"] {
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        block => block["text"].as_str().unwrap_or_default().to_string(),
    }
}

/// Asks the client `method` under the input key `key`, if it declared the capability.
async fn ask(session: &Session, key: &str, method: &str, params: Value) -> Result<Value, String> {
    let capability = match method {
        "elicitation/create" => "elicitation",
        "sampling/createMessage" => "sampling",
        _ => "roots",
    };
    if !session.client_supports(capability) {
        return Err(format!(
            "the client did not declare the {capability} capability"
        ));
    }
    session
        .request_client_named(key, method, params)
        .await
        .map_err(|e| e.message)
}

async fn elicit(
    session: &Session,
    key: &str,
    message: &str,
    field: &str,
    kind: &str,
) -> Result<String, String> {
    let answer = ask(
        session,
        key,
        "elicitation/create",
        form(message, field, kind),
    )
    .await?;
    accepted(&answer, field)
}

const CAPITAL: &str = "What is the capital of France?";

/// Runs one of [`tools`]; `None` for another tool.
pub async fn call(session: &Session, name: &str, meta: Option<&Value>) -> Option<Value> {
    let outcome = match name {
        "test_input_required_result_elicitation" => {
            elicit(session, "user_name", "What is your name?", "name", "string")
                .await
                .map(|name| format!("Hello, {name}!"))
        }
        "test_input_required_result_sampling" => {
            let params = sampling(CAPITAL, 100);
            ask(
                session,
                "capital_question",
                "sampling/createMessage",
                params,
            )
            .await
            .map(|a| format!("The LLM said: {}", sampled(&a)))
        }
        "test_input_required_result_list_roots" => {
            ask(session, "client_roots", "roots/list", json!({}))
                .await
                .map(|a| format!("roots: {}", a["roots"]))
        }
        "test_input_required_result_request_state"
        | "test_input_required_result_tampered_state" => {
            elicit(session, "confirm", "Please confirm", "ok", "boolean")
                .await
                .map(|ok| format!("state-ok: confirmed {ok}"))
        }
        "test_input_required_result_multiple_inputs" => {
            let greeting = sampling("Generate a greeting", 50);
            let (name, greeting, roots) = tokio::join!(
                elicit(session, "user_name", "What is your name?", "name", "string"),
                ask(session, "greeting", "sampling/createMessage", greeting),
                ask(session, "client_roots", "roots/list", json!({})),
            );
            match (name, greeting, roots) {
                (Ok(name), Ok(greeting), Ok(roots)) => Ok(format!(
                    "{} {name} (roots: {})",
                    sampled(&greeting),
                    roots["roots"]
                )),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e),
            }
        }
        "test_input_required_result_multi_round" => {
            match elicit(
                session,
                "step1",
                "Step 1: What is your name?",
                "name",
                "string",
            )
            .await
            {
                Ok(name) => {
                    let question = "Step 2: What is your favorite color?";
                    elicit(session, "step2", question, "color", "string")
                        .await
                        .map(|color| format!("{name} likes {color}"))
                }
                Err(e) => Err(e),
            }
        }
        "test_input_required_result_capabilities" => {
            // The client's capabilities of this very request, which the gateway passes on.
            let caps = meta
                .and_then(|m| m.get("io.modelcontextprotocol/clientCapabilities"))
                .cloned()
                .unwrap_or(Value::Null);
            let mut said = Vec::new();
            if caps.get("sampling").is_some() {
                let params = sampling(CAPITAL, 100);
                match ask(
                    session,
                    "capital_question",
                    "sampling/createMessage",
                    params,
                )
                .await
                {
                    Ok(a) => said.push(format!("the LLM said {}", sampled(&a))),
                    Err(e) => said.push(format!("sampling failed: {e}")),
                }
            }
            if caps.get("elicitation").is_some() {
                match elicit(session, "user_name", "What is your name?", "name", "string").await {
                    Ok(name) => said.push(format!("the user is {name}")),
                    Err(e) => said.push(format!("elicitation failed: {e}")),
                }
            }
            if said.is_empty() {
                said.push("the client can be asked nothing".into());
            }
            Ok(said.join("; "))
        }
        _ => return None,
    };
    Some(match outcome {
        Ok(text) => tool_ok(vec![content::text(text)]),
        Err(why) => tool_error(why),
    })
}

/// `prompts/get` of [`PROMPT`]: asks the user for the context first.
pub async fn prompt(session: &Session) -> Result<Value, RpcError> {
    let context = elicit(
        session,
        "user_context",
        "What context should the prompt use?",
        "context",
        "string",
    )
    .await
    .map_err(|why| RpcError::invalid_params("inputResponses", why))?;
    Ok(json!({
        "description": "A prompt made with the user's context",
        "messages": [{ "role": "user", "content": content::text(format!("Use this context: {context}")) }],
    }))
}
