//! The demo server's tools: a few for the project's own tests, benchmarks and chaos runs
//! (`echo`, `add`, `sleep`, `fail`, `crash`, `counter_increment`), and the ones the MCP
//! conformance suite's server scenarios call (`test_*`, `json_schema_2020_12_tool`).
//!
//! Bad arguments are protocol errors (-32602 naming the field); a tool that runs and fails
//! answers a result with `isError: true`.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::content::{self, tool_error, tool_ok};
use super::rpc::{Params, RpcError};
use super::session::Session;

/// Upper bound on `sleep`'s `ms` (one hour).
const MAX_SLEEP_MS: u64 = 3_600_000;
/// Upper bound on `sleep`'s `steps`.
const MAX_STEPS: u64 = 10_000;
/// Exit status of the `crash` tool, the one a panicking Rust program exits with.
pub const CRASH_STATUS: i32 = 101;

fn tool(name: &str, description: &str, input_schema: Value) -> Value {
    json!({ "name": name, "description": description, "inputSchema": input_schema })
}

fn no_arguments() -> Value {
    json!({ "type": "object", "properties": {} })
}

/// What `tools/list` answers.
pub fn list() -> Value {
    let mut echo = tool(
        "echo",
        "Returns the message it is given.",
        json!({
            "type": "object",
            "properties": { "message": { "type": "string", "description": "Text to return" } },
            "required": ["message"],
        }),
    );
    echo["annotations"] = json!({ "readOnlyHint": true, "idempotentHint": true });
    let mut add = tool(
        "add",
        "Adds two numbers and returns the sum as text.",
        json!({
            "type": "object",
            "properties": { "a": { "type": "number" }, "b": { "type": "number" } },
            "required": ["a", "b"],
        }),
    );
    add["annotations"] = json!({ "readOnlyHint": true, "idempotentHint": true });
    let mut counter = tool(
        "counter_increment",
        "Increments this process's counter and appends a line to the ledger file named by \
         MCPD_DEMO_LEDGER (not idempotent: each call counts). Returns the new count.",
        no_arguments(),
    );
    counter["annotations"] = json!({ "readOnlyHint": false, "idempotentHint": false });
    let mut env_sha256 = tool(
        "env_sha256",
        "Returns the SHA-256 (hex) of environment variable `name` of this process, or an error \
         when it is unset: proves what a process received without showing it.",
        json!({
            "type": "object",
            "properties": { "name": { "type": "string" } },
            "required": ["name"],
        }),
    );
    env_sha256["annotations"] = json!({ "readOnlyHint": true, "idempotentHint": true });
    let mut tools = vec![
        echo,
        add,
        env_sha256,
        tool(
            "sleep",
            "Sleeps `ms` milliseconds, sending `steps` progress notifications when the request \
             carries a progress token.",
            json!({
                "type": "object",
                "properties": {
                    "ms": { "type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS },
                    "steps": {
                        "type": "integer", "minimum": 0, "maximum": MAX_STEPS, "default": 5,
                        "description": "Number of progress notifications",
                    },
                },
                "required": ["ms"],
            }),
        ),
        tool(
            "fail",
            "Always fails: returns an error result (isError: true) with the message.",
            json!({
                "type": "object",
                "properties": { "message": { "type": "string" } },
            }),
        ),
        tool(
            "crash",
            "Exits the server process at once with status 101, without answering.",
            no_arguments(),
        ),
        counter,
        tool(
            "test_simple_text",
            "Returns simple text content.",
            no_arguments(),
        ),
        tool("test_image_content", "Returns a PNG image.", no_arguments()),
        tool(
            "test_audio_content",
            "Returns a WAV audio clip.",
            no_arguments(),
        ),
        tool(
            "test_embedded_resource",
            "Returns an embedded text resource.",
            no_arguments(),
        ),
        tool(
            "test_multiple_content_types",
            "Returns text, image and resource content together.",
            no_arguments(),
        ),
        tool(
            "test_tool_with_logging",
            "Sends three info log notifications while it runs.",
            no_arguments(),
        ),
        tool(
            "test_tool_with_progress",
            "Reports progress 0, 50 and 100 of 100 when given a progress token.",
            no_arguments(),
        ),
        tool(
            "test_error_handling",
            "Always returns an error result.",
            no_arguments(),
        ),
        tool(
            "test_sampling",
            "Asks the client's LLM (sampling/createMessage) and returns its answer.",
            json!({
                "type": "object",
                "properties": {
                    "prompt": { "type": "string", "description": "The prompt to send to the LLM" },
                },
                "required": ["prompt"],
            }),
        ),
        tool(
            "test_elicitation",
            "Asks the user for a username and email (elicitation/create) and returns the answer.",
            json!({
                "type": "object",
                "properties": {
                    "message": { "type": "string", "description": "The message to show the user" },
                },
                "required": ["message"],
            }),
        ),
        tool(
            "test_missing_capability",
            "Needs the client's sampling capability (it asks the client's LLM); a 2026-07-28 \
             request that did not declare it is refused with -32021.",
            no_arguments(),
        ),
        tool(
            "test_streaming_elicitation",
            "Asks the user (elicitation/create) while it runs; a 2026-07-28 client gets the \
             question as an input_required result, never as a request on the stream.",
            no_arguments(),
        ),
        tool(
            "test_logging_tool",
            "Sends three info log notifications while it runs (none reach a 2026-07-28 \
             request without a logLevel).",
            no_arguments(),
        ),
        tool(
            "test_trigger_tool_change",
            "Announces a change of this server's tool list (notifications/tools/list_changed); \
             the list itself is fixed.",
            no_arguments(),
        ),
        tool(
            "test_trigger_prompt_change",
            "Announces a change of this server's prompt list \
             (notifications/prompts/list_changed); the list itself is fixed.",
            no_arguments(),
        ),
        tool(
            "test_elicitation_sep1034_defaults",
            "Elicits a form whose fields all have default values (SEP-1034).",
            no_arguments(),
        ),
        tool(
            "test_elicitation_sep1330_enums",
            "Elicits a form with the five enum schema variants (SEP-1330).",
            no_arguments(),
        ),
        tool(
            "json_schema_2020_12_tool",
            "Tool with JSON Schema 2020-12 features",
            json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "$defs": {
                    "address": {
                        "type": "object",
                        "properties": {
                            "street": { "type": "string" },
                            "city": { "type": "string" },
                        },
                    },
                },
                "properties": {
                    "name": { "type": "string" },
                    "address": { "$ref": "#/$defs/address" },
                },
                "additionalProperties": false,
            }),
        ),
        tool(
            "test_reconnection",
            "SSE polling test (SEP-1699). Over stdio there is no stream to close, so it just \
             answers after a short delay.",
            no_arguments(),
        ),
    ];
    tools.extend(super::asks::tools());
    json!({ "tools": tools })
}

/// One `tools/call`: what a tool may need besides its arguments.
struct Call<'a> {
    session: &'a Session,
    /// The JSON-RPC id as received.
    request_id: &'a Value,
    /// `params._meta`.
    meta: Option<&'a Value>,
    args: Params<'a>,
}

impl Call<'_> {
    fn progress(&self, progress: u64, total: u64, message: Option<String>) {
        let Some(token) = self.meta.and_then(|m| m.get("progressToken")) else {
            return;
        };
        let mut params = json!({ "progressToken": token, "progress": progress, "total": total });
        if let Some(message) = message {
            params["message"] = json!(message);
        }
        self.session.notify("notifications/progress", params);
    }
}

/// Runs `tools/call`.
pub async fn call(
    session: &Session,
    request_id: &Value,
    params: &Value,
) -> Result<Value, RpcError> {
    let p = Params::new(params, "");
    let name = p.str("name")?;
    let empty = json!({});
    let args = p.opt_object("arguments")?.unwrap_or(&empty);
    let call = Call {
        session,
        request_id,
        meta: p.opt_object("_meta")?,
        args: Params::new(args, "arguments."),
    };
    if let Some(answer) = super::asks::call(session, name, call.meta).await {
        return Ok(answer);
    }
    match name {
        "echo" => Ok(tool_ok(vec![content::text(call.args.str("message")?)])),
        "add" => add(&call),
        "sleep" => sleep(&call).await,
        "fail" => {
            let message = call.args.opt_str("message")?;
            Ok(tool_error(message.unwrap_or("failed, as asked")))
        }
        "crash" => {
            tracing::warn!("crash tool called: exiting with status {CRASH_STATUS}");
            std::process::exit(CRASH_STATUS)
        }
        "counter_increment" => Ok(counter_increment(&call)),
        "env_sha256" => {
            let name = call.args.str("name")?;
            Ok(match std::env::var(name) {
                Ok(v) => {
                    use sha2::Digest;
                    tool_ok(vec![content::text(hex::encode(sha2::Sha256::digest(v)))])
                }
                Err(_) => tool_error(format!("{name} is not set")),
            })
        }
        "test_simple_text" => Ok(tool_ok(vec![content::text(
            "This is a simple text response for testing.",
        )])),
        "test_image_content" => Ok(tool_ok(vec![content::image_png()])),
        "test_audio_content" => Ok(tool_ok(vec![content::audio_wav()])),
        "test_embedded_resource" => Ok(tool_ok(vec![content::resource_text(
            "test://embedded-resource",
            "text/plain",
            "This is an embedded resource content.",
        )])),
        "test_multiple_content_types" => Ok(tool_ok(vec![
            content::text("Multiple content types test:"),
            content::image_png(),
            content::resource_text(
                "test://mixed-content-resource",
                "application/json",
                r#"{"test":"data","value":123}"#,
            ),
        ])),
        "test_tool_with_logging" => Ok(with_logging(&call).await),
        "test_tool_with_progress" => Ok(with_progress(&call).await),
        "test_error_handling" => Ok(tool_error(
            "This tool intentionally returns an error for testing",
        )),
        "test_sampling" => sampling(&call, call.args.str("prompt")?).await,
        // The diagnostic tools of the conformance suite's 2026-07-28 stateless scenario.
        "test_missing_capability" => {
            // A 2026-07-28 request that did not declare it is refused before anything runs.
            if super::round::Round::client_supports("sampling") == Some(false) {
                return Err(RpcError {
                    code: super::round::MISSING_CAPABILITY,
                    message: "test_missing_capability needs the client's sampling capability"
                        .into(),
                    data: Some(json!({ "requiredCapabilities": { "sampling": {} } })),
                });
            }
            sampling(&call, "What is the capital of France?").await
        }
        "test_streaming_elicitation" => Ok(elicit(
            &call,
            "Please provide your information",
            user_info_schema(),
            "User response",
        )
        .await),
        "test_logging_tool" => Ok(with_logging(&call).await),
        "test_trigger_tool_change" => Ok(announce(&call, "tools")),
        "test_trigger_prompt_change" => Ok(announce(&call, "prompts")),
        "test_elicitation" => {
            let message = call.args.str("message")?;
            Ok(elicit(&call, message, user_info_schema(), "User response").await)
        }
        "test_elicitation_sep1034_defaults" => Ok(elicit(
            &call,
            "Please review and update the form fields with defaults",
            defaults_schema(),
            "Elicitation completed",
        )
        .await),
        "test_elicitation_sep1330_enums" => Ok(elicit(
            &call,
            "Please select options from the enum fields",
            enums_schema(),
            "Elicitation completed",
        )
        .await),
        "json_schema_2020_12_tool" => Ok(tool_ok(vec![content::text(format!("Received: {args}"))])),
        "test_reconnection" => {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(tool_ok(vec![content::text("Reconnection test completed")]))
        }
        other => Err(RpcError::invalid_params(
            "name",
            format!("names no tool: {other}"),
        )),
    }
}

fn add(call: &Call<'_>) -> Result<Value, RpcError> {
    let (a, b) = (call.args.number("a")?, call.args.number("b")?);
    // Integers stay exact; anything else is added as f64.
    let sum = match (a.as_i64(), b.as_i64()) {
        (Some(a), Some(b)) if a.checked_add(b).is_some() => (a + b).to_string(),
        _ => {
            let sum = a.as_f64().unwrap_or(f64::NAN) + b.as_f64().unwrap_or(f64::NAN);
            if !sum.is_finite() {
                return Ok(tool_error(format!("{a} + {b} is not a finite number")));
            }
            sum.to_string()
        }
    };
    Ok(tool_ok(vec![content::text(sum)]))
}

async fn sleep(call: &Call<'_>) -> Result<Value, RpcError> {
    let ms = call.args.u64("ms", MAX_SLEEP_MS)?;
    let steps = call.args.opt_u64("steps", MAX_STEPS)?.unwrap_or(5);
    if steps == 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    // Step i ends at ms*i/steps, so the steps add up to exactly ms.
    let mut slept = 0;
    for i in 1..=steps {
        let until = ms * i / steps;
        tokio::time::sleep(Duration::from_millis(until - slept)).await;
        slept = until;
        call.progress(i, steps, Some(format!("slept {slept} of {ms} ms")));
    }
    Ok(tool_ok(vec![content::text(format!("slept {ms} ms"))]))
}

fn counter_increment(call: &Call<'_>) -> Value {
    let key = call
        .meta
        .and_then(|m| m.get("mcpd/request-key"))
        .cloned()
        .unwrap_or(Value::Null);
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let line = json!({
        "ts": ts,
        "request_id": call.request_id,
        "pid": std::process::id(),
        "key": key,
    });
    let ledger = call.session.ledger.as_deref();
    let outcome = call.session.increment(|| match ledger {
        Some(path) => append_line(path, &line),
        None => Ok(()),
    });
    match outcome {
        Ok(count) => tool_ok(vec![content::text(count.to_string())]),
        Err(e) => tool_error(format!("counter not incremented: {e}")),
    }
}

/// Appends `line` and a newline with one `write` on an `O_APPEND` file, so lines from several
/// processes sharing a ledger do not interleave. The file has no user-space buffer: once this
/// returns the line is in the kernel and survives the process being killed.
fn append_line(path: &Path, line: &Value) -> Result<(), String> {
    let mut bytes = serde_json::to_vec(line).map_err(|e| e.to_string())?;
    bytes.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("opening the ledger {}: {e}", path.display()))?;
    file.write_all(&bytes)
        .and_then(|()| file.flush())
        .map_err(|e| format!("appending to the ledger {}: {e}", path.display()))
}

async fn with_logging(call: &Call<'_>) -> Value {
    let log = |msg: &str| call.session.log("info", json!(msg));
    log("Tool execution started");
    tokio::time::sleep(Duration::from_millis(50)).await;
    log("Tool processing data");
    tokio::time::sleep(Duration::from_millis(50)).await;
    log("Tool execution completed");
    tool_ok(vec![content::text(
        "Tool with logging executed successfully",
    )])
}

/// Sends `notifications/{list}/list_changed`: what a server does when its list changes, for
/// the suite to see it reach a `subscriptions/listen` stream through the gateway.
fn announce(call: &Call<'_>, list: &str) -> Value {
    call.session
        .notify(&format!("notifications/{list}/list_changed"), json!({}));
    tool_ok(vec![content::text(format!(
        "announced a change of the {list} list"
    ))])
}

async fn with_progress(call: &Call<'_>) -> Value {
    call.progress(0, 100, None);
    tokio::time::sleep(Duration::from_millis(50)).await;
    call.progress(50, 100, None);
    tokio::time::sleep(Duration::from_millis(50)).await;
    call.progress(100, 100, None);
    tool_ok(vec![content::text(
        "Tool with progress executed successfully",
    )])
}

async fn sampling(call: &Call<'_>, prompt: &str) -> Result<Value, RpcError> {
    if !call.session.client_supports("sampling") {
        return Ok(tool_error(
            "the client did not declare the sampling capability",
        ));
    }
    let params = json!({
        "messages": [{ "role": "user", "content": { "type": "text", "text": prompt } }],
        "maxTokens": 100,
    });
    let answer = match call
        .session
        .request_client("sampling/createMessage", params)
        .await
    {
        Ok(answer) => answer,
        Err(e) => return Ok(tool_error(format!("sampling failed: {}", e.message))),
    };
    // `content` is one block, or (since 2025-11-25) a list of blocks.
    let blocks = match &answer["content"] {
        Value::Array(blocks) => blocks.clone(),
        block => vec![block.clone()],
    };
    let text: Vec<&str> = blocks.iter().filter_map(|b| b["text"].as_str()).collect();
    let text = if text.is_empty() {
        answer["content"].to_string()
    } else {
        text.join("")
    };
    Ok(tool_ok(vec![content::text(format!(
        "LLM response: {text}"
    ))]))
}

async fn elicit(call: &Call<'_>, message: &str, schema: Value, label: &str) -> Value {
    if !call.session.client_supports("elicitation") {
        return tool_error("the client did not declare the elicitation capability");
    }
    let params = json!({ "message": message, "requestedSchema": schema });
    match call
        .session
        .request_client("elicitation/create", params)
        .await
    {
        Ok(answer) => {
            let action = answer["action"].as_str().unwrap_or("unknown");
            let content = answer.get("content").cloned().unwrap_or(Value::Null);
            tool_ok(vec![content::text(format!(
                "{label}: action={action}, content={content}"
            ))])
        }
        Err(e) => tool_error(format!("elicitation failed: {}", e.message)),
    }
}

fn user_info_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "username": { "type": "string", "description": "User's response" },
            "email": { "type": "string", "description": "User's email address" },
        },
        "required": ["username", "email"],
    })
}

fn defaults_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": { "type": "string", "description": "User name", "default": "John Doe" },
            "age": { "type": "integer", "description": "User age", "default": 30 },
            "score": { "type": "number", "description": "User score", "default": 95.5 },
            "status": {
                "type": "string",
                "description": "User status",
                "enum": ["active", "inactive", "pending"],
                "default": "active",
            },
            "verified": { "type": "boolean", "description": "Verification status", "default": true },
        },
    })
}

fn enums_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "untitledSingle": {
                "type": "string",
                "description": "Choose an option",
                "enum": ["option1", "option2", "option3"],
            },
            "titledSingle": {
                "type": "string",
                "description": "Choose a titled option",
                "oneOf": [
                    { "const": "value1", "title": "First Option" },
                    { "const": "value2", "title": "Second Option" },
                    { "const": "value3", "title": "Third Option" },
                ],
            },
            "legacyEnum": {
                "type": "string",
                "description": "Choose a legacy option",
                "enum": ["opt1", "opt2", "opt3"],
                "enumNames": ["Option One", "Option Two", "Option Three"],
            },
            "untitledMulti": {
                "type": "array",
                "description": "Choose multiple options",
                "items": { "type": "string", "enum": ["option1", "option2", "option3"] },
            },
            "titledMulti": {
                "type": "array",
                "description": "Choose multiple titled options",
                "items": {
                    "anyOf": [
                        { "const": "value1", "title": "First Choice" },
                        { "const": "value2", "title": "Second Choice" },
                        { "const": "value3", "title": "Third Choice" },
                    ],
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn session() -> (Session, mpsc::UnboundedReceiver<Value>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Session::new(tx, None), rx)
    }

    async fn run(s: &Session, params: Value) -> Result<Value, RpcError> {
        call(s, &json!(1), &params).await
    }

    fn text_of(result: &Value) -> &str {
        result["content"][0]["text"].as_str().unwrap_or("")
    }

    #[tokio::test]
    async fn echo_and_add() {
        let (s, _rx) = session();
        let r = run(
            &s,
            json!({"name": "echo", "arguments": {"message": "hi\nthere"}}),
        )
        .await;
        assert_eq!(r.as_ref().map(text_of), Ok("hi\nthere"));
        let r = run(&s, json!({"name": "add", "arguments": {"a": 2, "b": 3}})).await;
        assert_eq!(r.as_ref().map(text_of), Ok("5"));
        let r = run(&s, json!({"name": "add", "arguments": {"a": 0.5, "b": 2}})).await;
        assert_eq!(r.as_ref().map(text_of), Ok("2.5"));
    }

    #[tokio::test]
    async fn bad_arguments_are_invalid_params_naming_the_field() {
        let (s, _rx) = session();
        let cases = [
            (
                json!({"name": "echo", "arguments": {}}),
                "arguments.message",
            ),
            (
                json!({"name": "add", "arguments": {"a": 1, "b": "2"}}),
                "arguments.b",
            ),
            (
                json!({"name": "sleep", "arguments": {"ms": -5}}),
                "arguments.ms",
            ),
            (
                json!({"name": "sleep", "arguments": {"ms": 1, "steps": 1.5}}),
                "arguments.steps",
            ),
            (json!({"name": "echo", "arguments": "hi"}), "arguments"),
            (json!({"arguments": {}}), "name"),
            (json!({"name": "no_such_tool"}), "name"),
        ];
        for (params, field) in cases {
            let err = run(&s, params.clone()).await.err();
            assert_eq!(err.as_ref().map(|e| e.code), Some(-32602), "{params}");
            assert_eq!(
                err.and_then(|e| e.data),
                Some(json!({ "field": field })),
                "{params}"
            );
        }
    }

    #[tokio::test]
    async fn fail_is_a_tool_error_not_a_protocol_error() {
        let (s, _rx) = session();
        let r = run(
            &s,
            json!({"name": "fail", "arguments": {"message": "boom"}}),
        )
        .await;
        assert_eq!(r.as_ref().map(|r| r["isError"].clone()), Ok(json!(true)));
        assert_eq!(r.as_ref().map(text_of), Ok("boom"));
    }

    #[tokio::test]
    async fn sleep_reports_progress_steps() {
        let (s, mut rx) = session();
        let params = json!({
            "name": "sleep",
            "arguments": {"ms": 3, "steps": 3},
            "_meta": {"progressToken": "p1"},
        });
        let r = run(&s, params).await;
        assert_eq!(r.as_ref().map(text_of), Ok("slept 3 ms"));
        let mut seen = Vec::new();
        while let Ok(n) = rx.try_recv() {
            assert_eq!(n["params"]["progressToken"], json!("p1"));
            seen.push(n["params"]["progress"].as_u64().unwrap_or(0));
        }
        assert_eq!(seen, [1, 2, 3]);
    }

    #[tokio::test]
    async fn counter_appends_to_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let (tx, _rx) = mpsc::unbounded_channel();
        let s = Session::new(tx, Some(path.clone()));
        for (i, id) in [json!(7), json!("x")].iter().enumerate() {
            let params = json!({"name": "counter_increment", "_meta": {"mcpd/request-key": "k"}});
            let r = call(&s, id, &params).await;
            assert_eq!(r.as_ref().map(text_of), Ok((i + 1).to_string().as_str()));
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["request_id"], json!(7));
        assert_eq!(lines[1]["request_id"], json!("x"));
        assert_eq!(lines[1]["key"], json!("k"));
        assert_eq!(lines[1]["pid"], json!(std::process::id()));
    }

    #[tokio::test]
    async fn sampling_needs_the_client_capability() {
        let (s, _rx) = session();
        let r = run(
            &s,
            json!({"name": "test_sampling", "arguments": {"prompt": "p"}}),
        )
        .await;
        assert_eq!(r.map(|r| r["isError"].clone()), Ok(json!(true)));
    }

    #[tokio::test]
    async fn every_listed_tool_is_dispatched() {
        let (s, _rx) = session();
        let listed = list();
        let names = listed["tools"].as_array().cloned().unwrap_or_default();
        assert!(names.len() >= 20);
        for tool in names {
            assert!(tool["description"].is_string() && tool["inputSchema"]["type"] == "object");
            let name = tool["name"].as_str().unwrap_or_default();
            if name == "crash" {
                continue;
            }
            // Missing arguments may be rejected, but never as an unknown tool.
            let err = run(&s, json!({"name": name, "arguments": {"ms": 0}}))
                .await
                .err();
            assert!(
                err.is_none_or(|e| e.data != Some(json!({"field": "name"}))),
                "{name}"
            );
        }
    }
}
