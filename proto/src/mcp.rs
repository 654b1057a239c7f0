//! The MCP JSON-RPC envelope, as the gateway sees it: enough structure to route (id, method,
//! params, result, error) while every other field passes through untouched.
//!
//! We keep `params` and `result` as `serde_json::Value` on purpose. A gateway relays three
//! protocol revisions between clients and servers that each may add fields; parsing them into
//! fixed types (rmcp's model, for instance) would drop or reject what a newer peer sends.
//! Where the gateway itself needs a field (a tool's name, a progress token), it reads it from
//! the `Value` at that spot.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The two shapes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Era {
    /// An `initialize` handshake, then `Mcp-Session-Id` on every request.
    Session,
    /// No handshake: each request carries its revision and capabilities in `_meta`.
    Stateless,
}

/// One protocol revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revision {
    pub version: &'static str,
    pub era: Era,
}

/// Every protocol revision the gateway serves, newest first: the one table that negotiation,
/// era detection, `server/discover` and the errors naming supported versions read.
pub const REVISIONS: &[Revision] = &[
    Revision {
        version: "2026-07-28",
        era: Era::Stateless,
    },
    Revision {
        version: "2025-11-25",
        era: Era::Session,
    },
    Revision {
        version: "2025-06-18",
        era: Era::Session,
    },
    Revision {
        version: "2025-03-26",
        era: Era::Session,
    },
];

/// The newest session-based revision (initialize handshake, `Mcp-Session-Id`).
pub const LATEST_SESSION_VERSION: &str = "2025-11-25";
/// The stateless revision: no initialize, per-request `_meta`.
pub const STATELESS_VERSION: &str = "2026-07-28";

/// The era of a revision this gateway serves (`None`: one it does not).
pub fn era_of(version: &str) -> Option<Era> {
    REVISIONS
        .iter()
        .find(|r| r.version == version)
        .map(|r| r.era)
}

/// Every revision served, newest first.
pub fn versions() -> Vec<&'static str> {
    REVISIONS.iter().map(|r| r.version).collect()
}

/// MCP log levels (`logging/setLevel`, `notifications/message`), least severe first.
pub const LOG_LEVELS: [&str; 8] = [
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
];

/// JSON-RPC and MCP error codes.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// MCP: a resource URI nobody serves.
    pub const RESOURCE_NOT_FOUND: i64 = -32002;
    /// Gateway: the server has no process that can take the call (starting, crash-looping,
    /// removed). The call did not run.
    pub const UNAVAILABLE: i64 = -32050;
    /// Gateway: the server's queue is full. The call did not run.
    pub const QUEUE_FULL: i64 = -32051;
    /// Gateway: no answer within the server's request timeout. The call may have run.
    pub const TIMEOUT: i64 = -32052;
    /// Gateway: the process died while the call was in flight. The call may have run.
    pub const CRASHED: i64 = -32053;
    /// A policy of the gateway refused the call (`data.policy` names the rule).
    pub const DENIED: i64 = -32054;
    /// A rate limit or quota of the gateway refused the call (`data.limit` names it,
    /// `data.retryAfterMs` says when to try again). The call did not run. The code most MCP
    /// gateways use for it; the specification reserves none.
    pub const RATE_LIMITED: i64 = -32029;
}

/// A JSON-RPC id: a number or a string, compared exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Num(i64),
    Str(String),
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestId::Num(n) => write!(f, "{n}"),
            RequestId::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorObject {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        ErrorObject {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }
}

/// One JSON-RPC message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Request {
        id: RequestId,
        method: String,
        params: Option<Value>,
    },
    Notification {
        method: String,
        params: Option<Value>,
    },
    Response {
        id: RequestId,
        outcome: Result<Value, ErrorObject>,
    },
}

/// Why bytes are not a JSON-RPC message, with the error code to answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidMessage {
    pub code: i64,
    pub message: String,
    /// The id, when one could be read (the error answer must carry it).
    pub id: Option<RequestId>,
}

/// A message as it is written, borrowing its parts.
#[derive(Serialize, Default)]
struct Wire<'a> {
    jsonrpc: Jsonrpc,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RequestId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ErrorObject>,
}

/// `"2.0"`.
#[derive(Default)]
struct Jsonrpc;

impl Serialize for Jsonrpc {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("2.0")
    }
}

impl<'a> Wire<'a> {
    fn request(id: &'a RequestId, method: &'a str, params: Option<&'a Value>) -> Wire<'a> {
        Wire {
            id: Some(id),
            method: Some(method),
            params,
            ..Wire::default()
        }
    }

    fn line(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec(self).unwrap_or_default();
        b.push(b'\n');
        b
    }
}

impl Message {
    pub fn request(id: RequestId, method: impl Into<String>, params: Option<Value>) -> Self {
        Message::Request {
            id,
            method: method.into(),
            params,
        }
    }

    pub fn notification(method: impl Into<String>, params: Option<Value>) -> Self {
        Message::Notification {
            method: method.into(),
            params,
        }
    }

    pub fn result(id: RequestId, result: Value) -> Self {
        Message::Response {
            id,
            outcome: Ok(result),
        }
    }

    pub fn error(id: RequestId, error: ErrorObject) -> Self {
        Message::Response {
            id,
            outcome: Err(error),
        }
    }

    /// Parses one message from bytes.
    pub fn parse(bytes: &[u8]) -> Result<Message, InvalidMessage> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| InvalidMessage {
            code: code::PARSE_ERROR,
            message: format!("parse error: {e}"),
            id: None,
        })?;
        Message::from_value(v)
    }

    /// Reads a message from a JSON value.
    pub fn from_value(v: Value) -> Result<Message, InvalidMessage> {
        let Value::Object(mut o) = v else {
            return Err(invalid(
                None,
                "a JSON-RPC message must be an object (batches are not supported)",
            ));
        };
        let id = match o.remove("id") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => Some(RequestId::Num(i)),
                None => return Err(invalid(None, "id: must be an integer or a string")),
            },
            Some(Value::String(s)) => Some(RequestId::Str(s)),
            Some(_) => return Err(invalid(None, "id: must be an integer or a string")),
        };
        if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err(invalid(id, "jsonrpc: must be \"2.0\""));
        }
        let params = o.remove("params");
        if let Some(p) = &params {
            if !(p.is_object() || p.is_array()) {
                return Err(invalid(id, "params: must be an object"));
            }
        }
        match o.remove("method") {
            Some(Value::String(method)) => Ok(match id {
                Some(id) => Message::Request { id, method, params },
                None => Message::Notification { method, params },
            }),
            Some(_) => Err(invalid(id, "method: must be a string")),
            None => {
                let Some(id) = id else {
                    return Err(invalid(None, "a message needs a method or an id"));
                };
                if let Some(err) = o.remove("error") {
                    let err: ErrorObject = serde_json::from_value(err)
                        .map_err(|e| invalid(Some(id.clone()), &format!("error: {e}")))?;
                    Ok(Message::Response {
                        id,
                        outcome: Err(err),
                    })
                } else if let Some(result) = o.remove("result") {
                    Ok(Message::Response {
                        id,
                        outcome: Ok(result),
                    })
                } else {
                    Err(invalid(Some(id), "a response needs result or error"))
                }
            }
        }
    }

    pub fn to_value(&self) -> Value {
        let mut o = Map::new();
        o.insert("jsonrpc".into(), json!("2.0"));
        match self {
            Message::Request { id, method, params } => {
                o.insert("id".into(), json!(id));
                o.insert("method".into(), json!(method));
                if let Some(p) = params {
                    o.insert("params".into(), p.clone());
                }
            }
            Message::Notification { method, params } => {
                o.insert("method".into(), json!(method));
                if let Some(p) = params {
                    o.insert("params".into(), p.clone());
                }
            }
            Message::Response { id, outcome } => {
                o.insert("id".into(), json!(id));
                match outcome {
                    Ok(r) => o.insert("result".into(), r.clone()),
                    Err(e) => o.insert("error".into(), json!(e)),
                };
            }
        }
        Value::Object(o)
    }

    /// One line of newline-delimited JSON (serde_json never emits raw newlines), written
    /// from the message's parts without copying them.
    pub fn to_line(&self) -> Vec<u8> {
        let wire = match self {
            Message::Request { id, method, params } => Wire::request(id, method, params.as_ref()),
            Message::Notification { method, params } => Wire {
                method: Some(method),
                params: params.as_ref(),
                ..Wire::default()
            },
            Message::Response { id, outcome } => Wire {
                id: Some(id),
                result: outcome.as_ref().ok(),
                error: outcome.as_ref().err(),
                ..Wire::default()
            },
        };
        wire.line()
    }

    /// The line of a request, from borrowed parts.
    pub fn request_line(id: &RequestId, method: &str, params: Option<&Value>) -> Vec<u8> {
        Wire::request(id, method, params).line()
    }

    pub fn method(&self) -> Option<&str> {
        match self {
            Message::Request { method, .. } | Message::Notification { method, .. } => Some(method),
            Message::Response { .. } => None,
        }
    }
}

fn invalid(id: Option<RequestId>, message: &str) -> InvalidMessage {
    InvalidMessage {
        code: code::INVALID_REQUEST,
        message: message.to_string(),
        id,
    }
}

/// Methods that change nothing: safe to retry and to serve from a cache.
pub fn is_read_only(method: &str) -> bool {
    matches!(
        method,
        "ping"
            | "tools/list"
            | "resources/list"
            | "resources/templates/list"
            | "resources/read"
            | "prompts/list"
            | "prompts/get"
            | "completion/complete"
            | "server/discover"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_told_apart() {
        let m = Message::parse(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#).expect("request");
        assert_eq!(m, Message::request(RequestId::Num(1), "ping", None));
        let m = Message::parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .expect("notification");
        assert!(matches!(m, Message::Notification { .. }));
        let m = Message::parse(br#"{"jsonrpc":"2.0","id":"a","result":{}}"#).expect("response");
        assert_eq!(m, Message::result(RequestId::Str("a".into()), json!({})));
        let m =
            Message::parse(br#"{"jsonrpc":"2.0","id":2,"error":{"code":-32601,"message":"x"}}"#)
                .expect("error");
        assert!(matches!(m, Message::Response { outcome: Err(ref e), .. } if e.code == -32601));
    }

    #[test]
    fn a_line_is_the_message_it_was_written_from() {
        let messages = [
            Message::request(
                RequestId::Num(7),
                "tools/call",
                Some(json!({"name": "echo"})),
            ),
            Message::request(RequestId::Str("s-1".into()), "ping", None),
            Message::notification("notifications/progress", Some(json!({"progress": 1}))),
            Message::notification("notifications/initialized", None),
            Message::result(RequestId::Num(3), json!({"content": []})),
            Message::result(RequestId::Num(4), Value::Null),
            Message::error(RequestId::Str("e".into()), ErrorObject::new(-32601, "nope")),
        ];
        for m in messages {
            let line = m.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(Message::parse(&line).expect("parses"), m);
            let value: Value = serde_json::from_slice(&line).expect("json");
            assert_eq!(value, m.to_value(), "the line says what to_value says");
        }
        let borrowed = Message::request_line(&RequestId::Num(9), "a", Some(&json!({"x": 1})));
        assert_eq!(
            borrowed,
            Message::request(RequestId::Num(9), "a", Some(json!({"x": 1}))).to_line()
        );
    }

    #[test]
    fn invalid_messages_get_the_right_code() {
        assert_eq!(
            Message::parse(b"{nope").unwrap_err().code,
            code::PARSE_ERROR
        );
        let e = Message::parse(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_REQUEST);
        let e = Message::parse(br#"{"jsonrpc":"1.0","id":7,"method":"ping"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.id),
            (code::INVALID_REQUEST, Some(RequestId::Num(7)))
        );
        let e = Message::parse(br#"{"jsonrpc":"2.0","id":7,"method":3}"#).unwrap_err();
        assert!(e.message.starts_with("method"));
        let e = Message::parse(br#"{"jsonrpc":"2.0","id":7,"method":"x","params":3}"#).unwrap_err();
        assert!(e.message.starts_with("params"));
    }

    #[test]
    fn round_trips_keep_unknown_fields_in_params() {
        let text = br#"{"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"name":"echo","arguments":{"m":1},"_meta":{"future":true}}}"#;
        let m = Message::parse(text).expect("parses");
        let back = Message::from_value(m.to_value()).expect("again");
        assert_eq!(m, back);
        assert_eq!(m.to_value()["params"]["_meta"]["future"], json!(true));
    }

    #[test]
    fn the_version_table_agrees_with_the_named_revisions() {
        assert_eq!(era_of(LATEST_SESSION_VERSION), Some(Era::Session));
        assert_eq!(era_of(STATELESS_VERSION), Some(Era::Stateless));
        let newest_session = REVISIONS.iter().find(|r| r.era == Era::Session);
        assert_eq!(
            newest_session.map(|r| r.version),
            Some(LATEST_SESSION_VERSION)
        );
        let mut sorted = versions();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(sorted, versions(), "newest first");
        assert_eq!(era_of("2024-11-05"), None);
    }
}
