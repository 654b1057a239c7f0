//! One round of a 2026-07-28 request: the revision has no session, so a request carries its
//! client's capabilities and log level in `_meta`, and a server that must ask its client
//! something answers with an `input_required` result instead of sending a request of its own.
//! The client asks again with the answers (`inputResponses`) and the server's `requestState`.
//!
//! The demo's tools are written once, for both revisions: they ask through
//! `Session::request_client(_named)`. Inside a round ([`Round::run`], a task-local) such a
//! question is answered from the round's answers when it has one, else recorded and failed
//! with [`NEEDS_INPUT`]; when the tool returns, the questions it recorded make the round's
//! result `input_required`, and the answers so far travel in `requestState`, so each round
//! replays the tool up to its first unanswered question (and what it does before that, again).
//! A tool's questions therefore need keys that are the same in every round: the names the
//! conformance suite gives them, or, for an unnamed question, its method and its place among
//! the round's unnamed questions, which is stable only when the tool asks those one after
//! another (questions asked at once must be named, as `asks.rs` does).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use base64::Engine;
use serde_json::{json, Map, Value};

use super::rpc::RpcError;

/// The revision whose requests stand alone.
pub const STATELESS_VERSION: &str = mcpcp_proto::mcp::STATELESS_VERSION;
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPS: &str = "io.modelcontextprotocol/clientCapabilities";
const META_LOG_LEVEL: &str = "io.modelcontextprotocol/logLevel";

/// MissingRequiredClientCapability: a request whose client did not declare what it needs.
pub const MISSING_CAPABILITY: i64 = -32021;

/// The error code of a question recorded for the round's `input_required` result (it never
/// reaches the client: the result replaces it).
pub const NEEDS_INPUT: i64 = -32099;

tokio::task_local! {
    static ROUND: Round;
}

/// What a 2026-07-28 request brought, and the questions its tool asked.
pub struct Round {
    /// The answers of earlier rounds (`requestState`) and of this one (`inputResponses`).
    answers: Map<String, Value>,
    capabilities: Value,
    log_level: Option<String>,
    asked: Mutex<Map<String, Value>>,
    unnamed: AtomicUsize,
}

impl Round {
    /// The round of a request whose `_meta` names 2026-07-28; `None` for a session's request.
    pub fn of(params: &Value) -> Result<Option<Round>, RpcError> {
        let meta = &params["_meta"];
        if meta[META_VERSION] != STATELESS_VERSION {
            return Ok(None);
        }
        let mut answers = match params.get("requestState") {
            None | Some(Value::Null) => Map::new(),
            Some(state) => decode(state)?,
        };
        if let Some(responses) = params.get("inputResponses").and_then(Value::as_object) {
            answers.extend(responses.clone());
        }
        Ok(Some(Round {
            answers,
            capabilities: meta[META_CAPS].clone(),
            log_level: meta[META_LOG_LEVEL].as_str().map(String::from),
            asked: Mutex::default(),
            unnamed: AtomicUsize::new(0),
        }))
    }

    /// Runs `handler` in this round: its result, marked complete, or, when it asked its
    /// client something, the `input_required` result with its questions.
    pub async fn run(
        self,
        handler: impl Future<Output = Result<Value, RpcError>>,
    ) -> Result<Value, RpcError> {
        let (outcome, round) = ROUND
            .scope(self, async {
                let outcome = handler.await;
                (outcome, ROUND.with(Round::take))
            })
            .await;
        let (asked, answers) = round;
        if !asked.is_empty() {
            return Ok(json!({
                "resultType": "input_required",
                "inputRequests": asked,
                "requestState": encode(&answers),
            }));
        }
        let mut result = outcome?;
        if let Some(r) = result.as_object_mut() {
            r.insert("resultType".into(), json!("complete"));
        }
        Ok(result)
    }

    fn take(&self) -> (Map<String, Value>, Map<String, Value>) {
        let asked = std::mem::take(&mut *self.asked.lock().unwrap_or_else(|p| p.into_inner()));
        (asked, self.answers.clone())
    }

    /// Whether the request's client declared `capability`; `None` outside a round.
    pub fn client_supports(capability: &str) -> Option<bool> {
        ROUND
            .try_with(|r| r.capabilities.get(capability).is_some_and(|v| !v.is_null()))
            .ok()
    }

    /// The log level the request asked for (`None` inside it: no logs); `None` outside a round.
    pub fn log_level() -> Option<Option<String>> {
        ROUND.try_with(|r| r.log_level.clone()).ok()
    }

    /// Inside a round: the answer to the question `method` under `key` (an unnamed one keyed
    /// by its method and place), or the question recorded and [`NEEDS_INPUT`]. `None` outside
    /// a round.
    pub fn ask(key: Option<&str>, method: &str, params: &Value) -> Option<Result<Value, RpcError>> {
        ROUND
            .try_with(|r| {
                let key = match key {
                    Some(k) => k.to_string(),
                    None => {
                        let n = r.unnamed.fetch_add(1, Ordering::Relaxed);
                        format!("{}-{n}", method.replace('/', "-"))
                    }
                };
                if let Some(answer) = r.answers.get(&key) {
                    return Ok(answer.clone());
                }
                r.asked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), json!({ "method": method, "params": params }));
                Err(RpcError {
                    code: NEEDS_INPUT,
                    message: format!("{key}: waiting for the client's answer"),
                    data: None,
                })
            })
            .ok()
    }
}

fn encode(answers: &Map<String, Value>) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Value::Object(answers.clone()).to_string())
}

fn decode(state: &Value) -> Result<Map<String, Value>, RpcError> {
    let bad = || RpcError::invalid_params("requestState", "not a state this server gave");
    let text = state.as_str().ok_or_else(bad)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| bad())?;
    match serde_json::from_slice(&raw) {
        Ok(Value::Object(answers)) => Ok(answers),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: Value) -> Value {
        let mut params = json!({ "_meta": { META_VERSION: STATELESS_VERSION, META_CAPS: { "elicitation": {} } } });
        if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        params
    }

    /// Asks `first`, then `second`, as a tool of two steps would.
    async fn two_steps() -> Result<Value, RpcError> {
        let a = Round::ask(Some("first"), "elicitation/create", &json!({}))
            .unwrap_or_else(|| Err(RpcError::internal("not in a round")))?;
        let b = Round::ask(None, "roots/list", &json!({}))
            .unwrap_or_else(|| Err(RpcError::internal("not in a round")))?;
        Ok(json!({ "got": [a, b] }))
    }

    #[tokio::test]
    async fn a_tool_is_replayed_round_after_round_until_every_question_is_answered() {
        assert!(
            Round::of(&json!({})).unwrap().is_none(),
            "a session's request"
        );
        let one = Round::of(&request(json!({}))).unwrap().unwrap();
        let r1 = one.run(two_steps()).await.unwrap();
        assert_eq!(r1["resultType"], "input_required");
        assert_eq!(r1["inputRequests"]["first"]["method"], "elicitation/create");
        let state = r1["requestState"].clone();

        let two = request(json!({ "inputResponses": { "first": 1 }, "requestState": state }));
        let r2 = Round::of(&two)
            .unwrap()
            .unwrap()
            .run(two_steps())
            .await
            .unwrap();
        assert_eq!(
            r2["inputRequests"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["roots-list-0"]
        );

        let three = request(
            json!({ "inputResponses": { "roots-list-0": 2 }, "requestState": r2["requestState"] }),
        );
        let r3 = Round::of(&three)
            .unwrap()
            .unwrap()
            .run(two_steps())
            .await
            .unwrap();
        assert_eq!(r3, json!({ "got": [1, 2], "resultType": "complete" }));

        let tampered = request(json!({ "requestState": "%%" }));
        assert_eq!(Round::of(&tampered).err().map(|e| e.code), Some(-32602));
    }

    #[tokio::test]
    async fn capabilities_and_log_level_are_the_requests_own() {
        assert_eq!(
            Round::client_supports("elicitation"),
            None,
            "outside a round"
        );
        let round = Round::of(&request(json!({}))).unwrap().unwrap();
        let seen = round
            .run(async {
                Ok(json!({
                    "elicitation": Round::client_supports("elicitation"),
                    "sampling": Round::client_supports("sampling"),
                    "level": Round::log_level(),
                }))
            })
            .await
            .unwrap();
        assert_eq!(seen["elicitation"], true);
        assert_eq!(seen["sampling"], false);
        assert_eq!(seen["level"], Value::Null, "no logs asked for");
    }
}
