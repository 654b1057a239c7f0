//! The demo server's prompts (the four the MCP conformance suite gets) and `completion/complete`
//! for their arguments and for the resource template's `{id}`.

use serde_json::{json, Value};

use super::content;
use super::resources;
use super::rpc::{Params, RpcError};

/// What `prompts/list` answers.
pub fn list() -> Value {
    let arg = |name: &str, description: &str| json!({ "name": name, "description": description, "required": true });
    json!({ "prompts": [
        {
            "name": "test_simple_prompt",
            "description": "A simple prompt without arguments",
        },
        {
            "name": "test_prompt_with_arguments",
            "description": "A prompt with two required arguments",
            "arguments": [arg("arg1", "First test argument"), arg("arg2", "Second test argument")],
        },
        {
            "name": "test_prompt_with_embedded_resource",
            "description": "A prompt that embeds a resource",
            "arguments": [arg("resourceUri", "URI of the resource to embed")],
        },
        {
            "name": "test_prompt_with_image",
            "description": "A prompt with an image",
        },
        super::asks::prompt_entry(),
    ]})
}

fn user(content: Value) -> Value {
    json!({ "role": "user", "content": content })
}

/// Runs `prompts/get`.
pub fn get(params: &Value) -> Result<Value, RpcError> {
    let p = Params::new(params, "");
    let name = p.str("name")?;
    let empty = json!({});
    let args = Params::new(p.opt_object("arguments")?.unwrap_or(&empty), "arguments.");
    let messages = match name {
        "test_simple_prompt" => vec![user(content::text("This is a simple prompt for testing."))],
        "test_prompt_with_arguments" => {
            let (arg1, arg2) = (args.str("arg1")?, args.str("arg2")?);
            vec![user(content::text(format!(
                "Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"
            )))]
        }
        "test_prompt_with_embedded_resource" => vec![
            user(content::resource_text(
                args.str("resourceUri")?,
                "text/plain",
                "Embedded resource content for testing.",
            )),
            user(content::text("Please process the embedded resource above.")),
        ],
        "test_prompt_with_image" => vec![
            user(content::image_png()),
            user(content::text("Please analyze the image above.")),
        ],
        other => {
            return Err(RpcError::invalid_params(
                "name",
                format!("names no prompt: {other}"),
            ))
        }
    };
    let description = list()["prompts"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .map(|p| p["description"].clone())
        .unwrap_or(Value::Null);
    Ok(json!({ "description": description, "messages": messages }))
}

/// Runs `completion/complete`: candidates starting with the typed prefix.
pub fn complete(params: &Value) -> Result<Value, RpcError> {
    let p = Params::new(params, "");
    let reference = Params::new(p.object("ref")?, "ref.");
    let argument = Params::new(p.object("argument")?, "argument.");
    let (arg_name, prefix) = (argument.str("name")?, argument.str("value")?);
    let candidates: Vec<String> = match reference.str("type")? {
        "ref/prompt" => match reference.str("name")? {
            "test_prompt_with_arguments" => ["paris", "park", "party", "hello", "world", "test"]
                .map(String::from)
                .to_vec(),
            "test_prompt_with_embedded_resource" if arg_name == "resourceUri" => resources::uris(),
            "test_prompt_with_embedded_resource"
            | "test_simple_prompt"
            | "test_prompt_with_image" => Vec::new(),
            other => {
                return Err(RpcError::invalid_params(
                    "ref.name",
                    format!("names no prompt: {other}"),
                ))
            }
        },
        "ref/resource" => match reference.str("uri")? {
            "test://template/{id}/data" if arg_name == "id" => {
                ["1", "2", "3", "42", "123"].map(String::from).to_vec()
            }
            "test://template/{id}/data" => Vec::new(),
            other => {
                return Err(RpcError::invalid_params(
                    "ref.uri",
                    format!("names no resource template: {other}"),
                ))
            }
        },
        other => {
            return Err(RpcError::invalid_params(
                "ref.type",
                format!("must be ref/prompt or ref/resource, not {other}"),
            ))
        }
    };
    let values: Vec<String> = candidates
        .into_iter()
        .filter(|c| c.starts_with(prefix))
        .collect();
    Ok(json!({ "completion": { "values": values, "total": values.len(), "hasMore": false } }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_substitute_arguments() {
        let r = get(
            &json!({"name": "test_prompt_with_arguments", "arguments": {"arg1": "hello", "arg2": "world"}}),
        );
        let text = r.map(|r| r["messages"][0]["content"]["text"].clone());
        assert_eq!(
            text,
            Ok(json!("Prompt with arguments: arg1='hello', arg2='world'"))
        );
        let r = get(&json!({"name": "test_prompt_with_arguments", "arguments": {"arg1": "x"}}));
        assert_eq!(
            r.err().and_then(|e| e.data),
            Some(json!({"field": "arguments.arg2"}))
        );
        let r = get(
            &json!({"name": "test_prompt_with_embedded_resource", "arguments": {"resourceUri": "test://x"}}),
        );
        assert_eq!(
            r.map(|r| r["messages"][0]["content"]["resource"]["uri"].clone()),
            Ok(json!("test://x"))
        );
        assert!(get(&json!({"name": "nope"})).is_err());
    }

    #[test]
    fn completes_by_prefix() {
        let r = complete(&json!({
            "ref": {"type": "ref/prompt", "name": "test_prompt_with_arguments"},
            "argument": {"name": "arg1", "value": "par"},
        }));
        assert_eq!(
            r.map(|r| r["completion"]["values"].clone()),
            Ok(json!(["paris", "park", "party"]))
        );
        let r = complete(&json!({
            "ref": {"type": "ref/resource", "uri": "test://template/{id}/data"},
            "argument": {"name": "id", "value": "1"},
        }));
        assert_eq!(
            r.map(|r| r["completion"]["values"].clone()),
            Ok(json!(["1", "123"]))
        );
        let r = complete(
            &json!({"ref": {"type": "ref/other"}, "argument": {"name": "a", "value": ""}}),
        );
        assert_eq!(
            r.err().and_then(|e| e.data),
            Some(json!({"field": "ref.type"}))
        );
    }
}
