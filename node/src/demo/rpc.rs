//! JSON-RPC 2.0 for the demo server: the shape of the lines it writes, the errors it answers
//! with, and the helpers that pull typed parameters out of a request while naming the field that
//! is wrong. Kept apart from the MCP methods so that every handler fails the same way.

use serde_json::{json, Map, Value};

/// The JSON-RPC and MCP error codes, shared with the gateway.
pub use mcpcp_proto::mcp::code::{
    INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR,
    RESOURCE_NOT_FOUND,
};

/// A protocol error, answered as a JSON-RPC `error` object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    pub fn parse_error(detail: impl std::fmt::Display) -> Self {
        Self::new(PARSE_ERROR, format!("Parse error: {detail}"))
    }

    pub fn invalid_request(detail: impl Into<String>) -> Self {
        Self::new(
            INVALID_REQUEST,
            format!("Invalid request: {}", detail.into()),
        )
    }

    pub fn method_not_found(method: &str) -> Self {
        Self::new(METHOD_NOT_FOUND, format!("Method not found: {method}"))
            .with_data(json!({ "method": method }))
    }

    /// `field` is the path of the offending parameter, e.g. `arguments.ms`.
    pub fn invalid_params(field: &str, problem: impl std::fmt::Display) -> Self {
        Self::new(INVALID_PARAMS, format!("Invalid params: {field} {problem}"))
            .with_data(json!({ "field": field }))
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::new(INTERNAL_ERROR, format!("Internal error: {detail}"))
    }

    pub fn resource_not_found(uri: &str) -> Self {
        Self::new(RESOURCE_NOT_FOUND, format!("Resource not found: {uri}"))
            .with_data(json!({ "uri": uri }))
    }

    fn to_json(&self) -> Value {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let (Some(data), Some(obj)) = (&self.data, error.as_object_mut()) {
            obj.insert("data".into(), data.clone());
        }
        error
    }
}

/// The line answering request `id`.
pub fn response(id: &Value, outcome: Result<Value, RpcError>) -> Value {
    match outcome {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() }),
    }
}

/// A notification (no id, no answer expected).
pub fn notification(method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "method": method, "params": params })
}

/// A request from this server to the client.
pub fn request(id: &str, method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params })
}

/// One parsed line from the client.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Request {
        id: Value,
        method: String,
        params: Value,
    },
    Notification {
        method: String,
        params: Value,
    },
    /// The client's answer to one of this server's requests.
    Response {
        id: Value,
        outcome: Result<Value, RpcError>,
    },
}

/// Classifies one line. An `Err` carries the id to answer with (`null` when unknown).
pub fn parse_line(line: &[u8]) -> Result<Incoming, (Value, RpcError)> {
    let msg: Value =
        serde_json::from_slice(line).map_err(|e| (Value::Null, RpcError::parse_error(e)))?;
    let Value::Object(mut obj) = msg else {
        let what = if msg.is_array() {
            "batches are not supported"
        } else {
            "expected a JSON object"
        };
        return Err((Value::Null, RpcError::invalid_request(what)));
    };
    let id = obj.remove("id");
    let reply_id = id.clone().unwrap_or(Value::Null);
    if obj.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Err((
            reply_id,
            RpcError::invalid_request("jsonrpc must be \"2.0\""),
        ));
    }
    if let Some(id) = &id {
        if !(id.is_string() || id.is_i64() || id.is_u64()) {
            return Err((
                Value::Null,
                RpcError::invalid_request("id must be a string or an integer"),
            ));
        }
    }
    let params = obj.remove("params").unwrap_or(Value::Null);
    if !(params.is_null() || params.is_object()) {
        return Err((
            reply_id,
            RpcError::invalid_params("params", "must be an object"),
        ));
    }
    match (obj.remove("method"), id) {
        (Some(Value::String(method)), Some(id)) => Ok(Incoming::Request { id, method, params }),
        (Some(Value::String(method)), None) => Ok(Incoming::Notification { method, params }),
        (Some(_), _) => Err((
            reply_id,
            RpcError::invalid_request("method must be a string"),
        )),
        (None, Some(id)) => {
            let outcome = match (obj.remove("result"), obj.remove("error")) {
                (Some(result), None) => Ok(result),
                (None, Some(error)) => Err(RpcError {
                    code: error
                        .get("code")
                        .and_then(Value::as_i64)
                        .unwrap_or(INTERNAL_ERROR),
                    message: error
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("error without a message")
                        .to_string(),
                    data: error.get("data").cloned(),
                }),
                _ => {
                    return Err((
                        Value::Null,
                        RpcError::invalid_request("a response needs exactly one of result, error"),
                    ))
                }
            };
            Ok(Incoming::Response { id, outcome })
        }
        (None, None) => Err((Value::Null, RpcError::invalid_request("missing method"))),
    }
}

/// Typed access to an object of parameters (a request's `params`, or a tool's `arguments`),
/// with errors that name the field as `<prefix><name>`.
#[derive(Clone, Copy)]
pub struct Params<'a> {
    prefix: &'a str,
    obj: Option<&'a Map<String, Value>>,
}

impl<'a> Params<'a> {
    /// `prefix` is prepended to field names in errors, e.g. `"arguments."`.
    pub fn new(value: &'a Value, prefix: &'a str) -> Self {
        Self {
            prefix,
            obj: value.as_object(),
        }
    }

    fn field(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.and_then(|o| o.get(name)).filter(|v| !v.is_null())
    }

    fn missing(&self, name: &str) -> RpcError {
        RpcError::invalid_params(&self.field(name), "is required")
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<&'a str>, RpcError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(RpcError::invalid_params(
                &self.field(name),
                "must be a string",
            )),
        }
    }

    pub fn str(&self, name: &str) -> Result<&'a str, RpcError> {
        self.opt_str(name)?.ok_or_else(|| self.missing(name))
    }

    pub fn number(&self, name: &str) -> Result<&'a serde_json::Number, RpcError> {
        match self.get(name) {
            None => Err(self.missing(name)),
            Some(Value::Number(n)) => Ok(n),
            Some(_) => Err(RpcError::invalid_params(
                &self.field(name),
                "must be a number",
            )),
        }
    }

    /// A non-negative integer no larger than `max`.
    pub fn opt_u64(&self, name: &str, max: u64) -> Result<Option<u64>, RpcError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        // Accept 5.0 as 5: some clients send every number as a float.
        let n = v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
                .map(|f| f as u64)
        });
        match n {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(RpcError::invalid_params(
                &self.field(name),
                format!("must be an integer between 0 and {max}"),
            )),
        }
    }

    pub fn u64(&self, name: &str, max: u64) -> Result<u64, RpcError> {
        self.opt_u64(name, max)?.ok_or_else(|| self.missing(name))
    }

    /// An object-valued field; absent means empty.
    pub fn opt_object(&self, name: &str) -> Result<Option<&'a Value>, RpcError> {
        match self.get(name) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(v)),
            Some(_) => Err(RpcError::invalid_params(
                &self.field(name),
                "must be an object",
            )),
        }
    }

    pub fn object(&self, name: &str) -> Result<&'a Value, RpcError> {
        self.opt_object(name)?.ok_or_else(|| self.missing(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_requests_notifications_and_responses() {
        assert_eq!(
            parse_line(br#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#),
            Ok(Incoming::Request {
                id: json!(7),
                method: "ping".into(),
                params: Value::Null
            })
        );
        assert_eq!(
            parse_line(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            Ok(Incoming::Notification {
                method: "notifications/initialized".into(),
                params: Value::Null
            })
        );
        assert_eq!(
            parse_line(br#"{"jsonrpc":"2.0","id":"demo-1","result":{"a":1}}"#),
            Ok(Incoming::Response {
                id: json!("demo-1"),
                outcome: Ok(json!({"a": 1}))
            })
        );
    }

    #[test]
    fn rejects_what_is_not_json_rpc() {
        let code = |line: &str| parse_line(line.as_bytes()).err().map(|(_, e)| e.code);
        assert_eq!(code("{not json"), Some(PARSE_ERROR));
        let not_utf8 = parse_line(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"\xff\"}");
        assert_eq!(not_utf8.err().map(|(_, e)| e.code), Some(PARSE_ERROR));
        assert_eq!(code("[1,2]"), Some(INVALID_REQUEST));
        assert_eq!(code(r#"{"id":1,"method":"ping"}"#), Some(INVALID_REQUEST));
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#),
            Some(INVALID_REQUEST)
        );
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}"#),
            Some(INVALID_PARAMS)
        );
    }

    #[test]
    fn params_name_the_offending_field() {
        let args = json!({"message": 3, "ms": -1, "steps": 2.0});
        let p = Params::new(&args, "arguments.");
        let e = p.str("message").err().map(|e| e.message);
        assert_eq!(
            e.as_deref(),
            Some("Invalid params: arguments.message must be a string")
        );
        let e = p.str("absent").err().map(|e| e.message);
        assert_eq!(
            e.as_deref(),
            Some("Invalid params: arguments.absent is required")
        );
        assert!(p.u64("ms", 10).is_err());
        assert_eq!(p.opt_u64("steps", 10), Ok(Some(2)));
    }
}
