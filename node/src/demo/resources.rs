//! The demo server's resources: the fixed ones and the template the MCP conformance suite reads
//! (`test://static-text`, `test://static-binary`, `test://watched-resource`,
//! `test://template/{id}/data`), and `demo://status`, which tells a test which process answered.

use serde_json::{json, Value};

use super::content::RED_PIXEL_PNG_BASE64;
use super::rpc::{Params, RpcError};
use super::session::Session;

const STATIC_TEXT: &str = "This is the content of the static text resource.";
const TEMPLATE: &str = "test://template/{id}/data";
const TEMPLATE_PREFIX: &str = "test://template/";
const TEMPLATE_SUFFIX: &str = "/data";

/// What `resources/list` answers: the direct resources (templates are listed apart).
pub fn list() -> Value {
    json!({ "resources": [
        {
            "uri": "test://static-text",
            "name": "static-text",
            "description": "A static text resource",
            "mimeType": "text/plain",
        },
        {
            "uri": "test://static-binary",
            "name": "static-binary",
            "description": "A static binary resource (a 1x1 PNG)",
            "mimeType": "image/png",
        },
        {
            "uri": "test://watched-resource",
            "name": "watched-resource",
            "description": "A resource clients may subscribe to",
            "mimeType": "text/plain",
        },
        {
            "uri": "demo://status",
            "name": "status",
            "description": "This process: its pid, counter and subscriptions",
            "mimeType": "application/json",
        },
    ]})
}

/// What `resources/templates/list` answers.
pub fn templates() -> Value {
    json!({ "resourceTemplates": [{
        "uriTemplate": TEMPLATE,
        "name": "template-data",
        "description": "Data for the id in the URI",
        "mimeType": "application/json",
    }]})
}

/// The `{id}` of a URI matching [`TEMPLATE`].
fn template_id(uri: &str) -> Option<&str> {
    let id = uri
        .strip_prefix(TEMPLATE_PREFIX)?
        .strip_suffix(TEMPLATE_SUFFIX)?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

pub(super) fn exists(uri: &str) -> bool {
    list()["resources"]
        .as_array()
        .is_some_and(|rs| rs.iter().any(|r| r["uri"] == uri))
        || template_id(uri).is_some()
}

/// The URIs `completion/complete` offers for an argument naming a resource.
pub fn uris() -> Vec<String> {
    list()["resources"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter_map(|r| r["uri"].as_str())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `resources/read`.
pub fn read(session: &Session, params: &Value) -> Result<Value, RpcError> {
    let uri = Params::new(params, "").str("uri")?;
    let content = match uri {
        "test://static-text" => {
            json!({ "uri": uri, "mimeType": "text/plain", "text": STATIC_TEXT })
        }
        "test://static-binary" => {
            json!({ "uri": uri, "mimeType": "image/png", "blob": RED_PIXEL_PNG_BASE64 })
        }
        "test://watched-resource" => json!({
            "uri": uri,
            "mimeType": "text/plain",
            "text": "This resource does not change; subscribing to it is accepted.",
        }),
        "demo://status" => {
            let status = json!({
                "pid": std::process::id(),
                "count": session.count(),
                "subscriptions": session.subscriptions(),
            });
            json!({ "uri": uri, "mimeType": "application/json", "text": status.to_string() })
        }
        _ => match template_id(uri) {
            Some(id) => {
                let data =
                    json!({ "id": id, "templateTest": true, "data": format!("Data for ID: {id}") });
                json!({ "uri": uri, "mimeType": "application/json", "text": data.to_string() })
            }
            None => return Err(RpcError::resource_not_found(uri)),
        },
    };
    Ok(json!({ "contents": [content] }))
}

/// Runs `resources/subscribe`. Resources here never change, so no update is ever sent; the
/// subscription is recorded (and shown by `demo://status`).
pub fn subscribe(session: &Session, params: &Value) -> Result<Value, RpcError> {
    let uri = Params::new(params, "").str("uri")?;
    if !exists(uri) {
        return Err(RpcError::resource_not_found(uri));
    }
    session.subscribe(uri);
    Ok(json!({}))
}

/// Runs `resources/unsubscribe` (of a URI not subscribed to is not an error).
pub fn unsubscribe(session: &Session, params: &Value) -> Result<Value, RpcError> {
    let uri = Params::new(params, "").str("uri")?;
    session.unsubscribe(uri);
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[test]
    fn reads_fixed_and_templated_resources() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let s = Session::new(tx, None);
        let r = read(&s, &json!({"uri": "test://static-text"}));
        assert_eq!(
            r.map(|r| r["contents"][0]["text"].clone()),
            Ok(json!(STATIC_TEXT))
        );
        let r = read(&s, &json!({"uri": "test://template/123/data"}));
        let text = r.map(|r| r["contents"][0]["text"].as_str().unwrap_or("").to_string());
        let data: Option<Value> = text.ok().and_then(|t| serde_json::from_str(&t).ok());
        let want = json!({"id": "123", "templateTest": true, "data": "Data for ID: 123"});
        assert_eq!(data, Some(want));
        let r = read(&s, &json!({"uri": "test://nope"}));
        assert_eq!(r.err().map(|e| e.code), Some(-32002));
        assert_eq!(
            read(&s, &json!({})).err().map(|e| e.data),
            Some(Some(json!({"field": "uri"})))
        );
    }

    #[test]
    fn subscriptions_are_tracked() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let s = Session::new(tx, None);
        let uri = json!({"uri": "test://watched-resource"});
        assert_eq!(subscribe(&s, &uri), Ok(json!({})));
        assert_eq!(s.subscriptions(), ["test://watched-resource"]);
        assert_eq!(unsubscribe(&s, &uri), Ok(json!({})));
        assert!(s.subscriptions().is_empty());
        assert!(subscribe(&s, &json!({"uri": "test://nope"})).is_err());
        assert_eq!(template_id("test://template//data"), None);
    }
}
