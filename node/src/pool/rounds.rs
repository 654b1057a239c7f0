//! One request to a server that speaks the stateless revision (2026-07-28), round after
//! round, whatever carries the rounds: a POST each (`super::remote_request::Link`) or a line
//! on a process's stdin (`super::process`).
//!
//! - Each round carries the revision and the client's capabilities in the request's `_meta`
//!   (the caller's own for a 2026-07-28 client, else the gateway's; the caller's log level is
//!   in it already when it gave one).
//! - An `input_required` result's questions (at most `[pool] max_input_questions` a round) go to the
//!   call's client as the server's own requests, under the server's input keys (a 2025 client
//!   gets them as sampling, elicitation or roots requests on its stream, a 2026 client in its
//!   own `input_required`). Their answers go back with the server's `requestState` in the
//!   next round, until the result is complete. The call's timeout bounds the rounds.
//! - Whether a server speaks the revision is its `server/discover` answer ([`speaks`]), and
//!   what `initialize` would have said is drawn from it ([`init_of`]).

use futures_util::future::BoxFuture;
use mcpcp_proto::mcp::{code, ErrorObject, Message, RequestId, STATELESS_VERSION};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::call::{CallError, CallEvent, EventSink, Responder};

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPS: &str = "io.modelcontextprotocol/clientCapabilities";
const META_SERVER: &str = "io.modelcontextprotocol/serverInfo";
/// Most questions one `input_required` result may ask by default (each reaches the client;
/// `[pool] max_input_questions`).
pub const MAX_QUESTIONS: usize = 64;

/// What carries the rounds of a request to one server.
pub trait Carrier: Sync {
    /// The server's name, for errors.
    fn server(&self) -> &str;
    /// Most questions one round may ask (`[pool] max_input_questions`).
    fn max_questions(&self) -> usize;
    /// The client capabilities a request carries when its caller gave none (the gateway's,
    /// or a dedicated session's client's).
    fn capabilities(&self) -> &Value;
    /// Sends one round (`method` with `params` as they are now, under a new id) and returns
    /// its result; a JSON-RPC error is `CallError::Answered`. The server's notifications
    /// during it go to `events`.
    fn round<'a>(
        &'a self,
        method: &'a str,
        params: &'a Option<Value>,
        events: Option<&'a EventSink>,
    ) -> BoxFuture<'a, Result<Value, CallError>>;
}

/// Sends a request in this revision, round after round (see the module docs), with its
/// `_meta`. `ping`, which the revision has not, is a `server/discover`; `logging/setLevel`
/// is refused as a method the server has not (a request's `_meta` carries its log level).
pub async fn call<C: Carrier + ?Sized>(
    carrier: &C,
    method: &str,
    params: Option<Value>,
    events: Option<EventSink>,
) -> Result<Value, CallError> {
    let server = carrier.server();
    match method {
        "ping" => {
            let params = with_meta(None, carrier.capabilities());
            return match carrier.round("server/discover", &params, None).await {
                Ok(found) if speaks(&found) => Ok(json!({})),
                Ok(_) | Err(CallError::Answered(_)) => Err(CallError::Crashed(format!(
                    "server {server:?} no longer answers server/discover with {STATELESS_VERSION}"
                ))),
                Err(e) => Err(e),
            };
        }
        "logging/setLevel" => {
            return Err(CallError::Answered(ErrorObject::new(
                code::METHOD_NOT_FOUND,
                format!(
                    "logging/setLevel: server {server:?} speaks {STATELESS_VERSION}, which has no such method"
                ),
            )))
        }
        _ => {}
    }
    let mut params = with_meta(params, carrier.capabilities());
    let mut first = true;
    loop {
        let mut result = match carrier.round(method, &params, events.as_ref()).await {
            Ok(result) => result,
            // A later round's request did not run, but the first did (and its client was
            // asked): the call may have run, and is not to be sent again elsewhere.
            Err(CallError::NotRun(why)) if !first => {
                return Err(CallError::Crashed(format!(
                    "{why} (a later round of a request that had run; it may or may not have run)"
                )))
            }
            Err(e) => return Err(e),
        };
        first = false;
        if result["resultType"] != "input_required" {
            if let Some(r) = result.as_object_mut() {
                r.remove("resultType");
            }
            return Ok(result);
        }
        metrics::counter!("mcpd_upstream_input_required_total", "server" => carrier.server().to_string())
            .increment(1);
        let answers = ask(carrier, &result["inputRequests"], events.as_ref()).await?;
        // The next round's params are this round's with the answers (changed in place).
        let p = params
            .get_or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| {
                CallError::Answered(ErrorObject::new(
                    code::INVALID_PARAMS,
                    "params: must be an object",
                ))
            })?;
        p.insert("inputResponses".into(), Value::Object(answers));
        match result.get_mut("requestState").map(Value::take) {
            Some(state) => p.insert("requestState".into(), state),
            None => p.remove("requestState"),
        };
    }
}

/// `params` with this revision's `_meta`: its version, and the caller's client capabilities
/// or else `capabilities` (the gateway's).
pub fn with_meta(params: Option<Value>, capabilities: &Value) -> Option<Value> {
    let mut params = match params {
        Some(Value::Object(p)) => p,
        None => Map::new(),
        other => return other,
    };
    let meta = params
        .entry("_meta")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(meta) = meta {
        meta.insert(META_VERSION.into(), json!(STATELESS_VERSION));
        if !meta.get(META_CAPS).is_some_and(Value::is_object) {
            meta.insert(META_CAPS.into(), capabilities.clone());
        }
    }
    Some(Value::Object(params))
}

/// Whether a `server/discover` result names this revision among the server's versions.
pub fn speaks(discovered: &Value) -> bool {
    discovered["supportedVersions"]
        .as_array()
        .is_some_and(|v| v.iter().any(|v| v == STATELESS_VERSION))
}

/// What `initialize` would have said, as far as a `server/discover` result says it.
pub fn init_of(discovered: &Value) -> Value {
    let mut init = json!({
        "protocolVersion": STATELESS_VERSION,
        "capabilities": discovered["capabilities"],
        "serverInfo": discovered["_meta"][META_SERVER],
    });
    if let Some(text) = discovered["instructions"].as_str() {
        init["instructions"] = json!(text);
    }
    init
}

/// Asks the call's client the server's questions (`inputRequests`, by input key), all at
/// once, and returns the answers by key.
async fn ask<C: Carrier + ?Sized>(
    carrier: &C,
    questions: &Value,
    events: Option<&EventSink>,
) -> Result<Map<String, Value>, CallError> {
    let server = carrier.server();
    let unanswerable =
        |why: String| CallError::Answered(ErrorObject::new(code::INTERNAL_ERROR, why));
    let Some(questions) = questions.as_object().filter(|q| !q.is_empty()) else {
        return Err(unanswerable(format!(
            "server {server:?} asked for input without inputRequests"
        )));
    };
    let max = carrier.max_questions();
    if questions.len() > max {
        metrics::counter!("mcpd_upstream_input_refused_total", "server" => server.to_string(), "reason" => "too_many_questions")
            .increment(1);
        return Err(unanswerable(format!(
            "server {server:?} asked {} questions in one round, more than {max} (pool.max_input_questions)",
            questions.len()
        )));
    }
    let Some(events) = events else {
        return Err(unanswerable(format!(
            "server {server:?} asked for input, and no client is attached to this request"
        )));
    };
    let mut waiting = Vec::with_capacity(questions.len());
    for (key, question) in questions {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1);
        let method = question["method"].as_str().unwrap_or_default().to_string();
        let responder = Responder::new(tx, RequestId::Str(key.clone()));
        let asked = CallEvent::Request {
            method: method.clone(),
            params: question.get("params").cloned(),
            responder,
        };
        if events.send(asked).await.is_err() {
            return Err(unanswerable(format!(
                "{method}: the client of this request is gone"
            )));
        }
        waiting.push(async move { (key.clone(), method, rx.recv().await) });
    }
    let mut answers = Map::new();
    for (key, method, line) in futures_util::future::join_all(waiting).await {
        let outcome = match line.as_deref().map(Message::parse) {
            Some(Ok(Message::Response { outcome, .. })) => outcome,
            _ => return Err(unanswerable(format!("{method}: the client gave no answer"))),
        };
        answers.insert(key, outcome.map_err(CallError::Answered)?);
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A carrier whose server answers every round with `answer` and records what it got.
    struct Recorded {
        answer: Value,
        got: Mutex<Vec<(String, Option<Value>)>>,
        capabilities: Value,
    }

    impl Carrier for Recorded {
        fn server(&self) -> &str {
            "s"
        }
        fn max_questions(&self) -> usize {
            MAX_QUESTIONS
        }
        fn capabilities(&self) -> &Value {
            &self.capabilities
        }
        fn round<'a>(
            &'a self,
            method: &'a str,
            params: &'a Option<Value>,
            _events: Option<&'a EventSink>,
        ) -> BoxFuture<'a, Result<Value, CallError>> {
            self.got
                .lock()
                .unwrap()
                .push((method.into(), params.clone()));
            Box::pin(std::future::ready(Ok(self.answer.clone())))
        }
    }

    fn recorded(answer: Value) -> Recorded {
        Recorded {
            answer,
            got: Mutex::default(),
            capabilities: json!({ "sampling": {} }),
        }
    }

    #[tokio::test]
    async fn ping_is_a_discovery_and_set_level_is_refused() {
        let speaking = recorded(json!({ "supportedVersions": [STATELESS_VERSION] }));
        assert_eq!(
            call(&speaking, "ping", None, None).await.unwrap(),
            json!({})
        );
        assert_eq!(speaking.got.lock().unwrap()[0].0, "server/discover");
        let other = recorded(json!({ "supportedVersions": ["2025-11-25"] }));
        assert!(matches!(
            call(&other, "ping", None, None).await,
            Err(CallError::Crashed(_))
        ));
        let refused = call(&speaking, "logging/setLevel", None, None).await;
        assert!(
            matches!(refused, Err(CallError::Answered(ref e)) if e.code == code::METHOD_NOT_FOUND)
        );
        assert_eq!(
            speaking.got.lock().unwrap().len(),
            1,
            "setLevel sent nothing"
        );
    }

    #[tokio::test]
    async fn a_request_carries_the_revision_and_the_callers_own_capabilities() {
        let server = recorded(json!({ "content": [], "resultType": "complete" }));
        let own = json!({ "name": "t", "_meta": { META_CAPS: { "elicitation": {} } } });
        let result = call(&server, "tools/call", Some(own), None).await.unwrap();
        assert_eq!(
            result,
            json!({ "content": [] }),
            "resultType is the revision's own"
        );
        call(&server, "tools/list", None, None).await.unwrap();
        let got = server.got.lock().unwrap();
        let meta = |i: usize| got[i].1.as_ref().unwrap()["_meta"].clone();
        assert_eq!(meta(0)[META_VERSION], STATELESS_VERSION);
        assert_eq!(meta(0)[META_CAPS], json!({ "elicitation": {} }));
        assert_eq!(
            meta(1)[META_CAPS],
            json!({ "sampling": {} }),
            "else the gateway's"
        );
    }
}
