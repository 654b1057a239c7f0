//! One registry write, the same on `mcpd` and on etcd, for the benchmarks that compare them:
//! for `mcpd` the creation of a tenant with a unique name (`POST /v1/tenants`), for etcd a put of
//! a unique key through its v3 JSON gateway (`POST /v3/kv/put`) whose value is the same JSON body.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::json;

use crate::bench::root_cause;

/// The system under load and how one of its writes is made.
pub enum System {
    Mcpd { token: String },
    Etcd,
}

impl System {
    pub fn name(&self) -> &'static str {
        match self {
            System::Mcpd { .. } => "mcpd",
            System::Etcd => "etcd",
        }
    }

    /// Write number `seq` to the node at `base`. Both systems get the same JSON document: the
    /// body of a tenant creation.
    pub fn request(&self, http: &reqwest::Client, base: &str, seq: u64) -> reqwest::RequestBuilder {
        let name = format!("bench-{seq}");
        match self {
            System::Mcpd { token } => http
                .post(format!("{base}/v1/tenants"))
                .bearer_auth(token)
                .json(&json!({ "name": name })),
            System::Etcd => {
                let value = json!({ "name": name }).to_string();
                http.post(format!("{base}/v3/kv/put")).json(&json!({
                    "key": B64.encode(format!("bench/{seq}")),
                    "value": B64.encode(value),
                }))
            }
        }
    }
}

/// Sends one write and reads its whole answer (so the connection is reused).
pub async fn send(req: reqwest::RequestBuilder) -> Result<(), String> {
    let resp = req.send().await.map_err(|e| root_cause(&e))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| root_cause(&e))?;
    if status.is_success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.chars().take(200).collect();
        Err(format!("{status}: {text}"))
    }
}
