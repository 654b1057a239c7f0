//! What the audit trail records of each admin command: its kind, the object it touched, and
//! the change with every secret taken out (env and header values, token and join-token
//! hashes, the session key). The node's own commands (placement, session state, token uses)
//! are not admin changes and record nothing.

use std::net::SocketAddr;

use mcpcp_proto::api::ServerSpec;
use mcpcp_proto::audit::Actor;
use serde_json::{json, Value};

use super::state::{AuditContext, AuditSummary, Command, MembershipChange};
use super::{now_unix, Principal};

impl AuditContext {
    /// A change asked for by `caller` from `from`, now.
    pub fn of(caller: &Principal, from: Option<SocketAddr>) -> AuditContext {
        AuditContext {
            actor: Actor {
                token_id: caller.token_id.clone(),
                role: Some(caller.role),
                tenant: caller.tenant.clone(),
                issuer: caller.jwt.as_ref().map(|j| j.issuer.clone()),
                subject: caller.jwt.as_ref().map(|j| j.subject.clone()),
            },
            from: from.map(|a| a.to_string()),
            at: now_unix(),
        }
    }

    /// A change the cluster makes on a proof of its own (`init`, `join`, `recover-admin`).
    pub fn system(what: &str, from: Option<String>) -> AuditContext {
        AuditContext {
            actor: Actor {
                token_id: format!("system:{what}"),
                role: None,
                tenant: None,
                issuer: None,
                subject: None,
            },
            from,
            at: now_unix(),
        }
    }
}

impl Command {
    /// The audit summary of an admin command; `None` for the node's own commands.
    pub fn audit_summary(&self) -> Option<AuditSummary> {
        let of = |object: &str, detail: Value| {
            Some(AuditSummary {
                kind: self.label(),
                object: Some(object.to_string()),
                detail,
            })
        };
        match self {
            Command::PutServer { spec, precondition } => of(
                &spec.name,
                json!({ "spec": ServerSpec::redacted(spec), "precondition": precondition }),
            ),
            Command::DeleteServer { name, .. }
            | Command::DeleteTenant { name, .. }
            | Command::DeleteIssuer { name, .. }
            | Command::DeletePolicy { name, .. } => of(name, json!({})),
            Command::PutTenant { spec, .. } => of(&spec.name, json!({ "spec": spec })),
            Command::PutIssuer { spec, .. } => of(&spec.name, json!({ "spec": spec })),
            Command::PutPolicy { spec, .. } => of(&spec.name, json!({ "spec": spec })),
            Command::CreateToken { info, .. } | Command::Bootstrap { info, .. } => {
                of(&info.id, json!({ "info": info }))
            }
            Command::RecoverAdmin { info, node, .. } => {
                of(&info.id, json!({ "info": info, "node": node }))
            }
            Command::RevokeToken { id } | Command::RedeemJoinToken { id } => of(id, json!({})),
            Command::CreateJoinToken { id, token, .. } => of(
                id,
                json!({ "node": token.node, "expires_at": token.expires_at }),
            ),
            Command::SetAuditRetention { events } => of("audit", json!({ "events": events })),
            Command::ChangeMembership { change } => {
                let (id, detail) = match change {
                    MembershipChange::Add(req) => (
                        req.id,
                        json!({ "change": "add", "http_addr": req.http_addr, "grpc_addr": req.grpc_addr, "voter": req.voter }),
                    ),
                    MembershipChange::Remove { id } => (*id, json!({ "change": "remove" })),
                };
                of(&format!("node {id}"), detail)
            }
            // The approved tools by name and fingerprint (their text is in the pins).
            Command::PutToolPins { server, pins, .. } => of(
                server,
                json!({ "tools": pins.tools.iter()
                    .map(|(n, t)| (n.clone(), json!(crate::pinning::fingerprint(t))))
                    .collect::<serde_json::Map<_, _>>() }),
            ),
            Command::DeleteToolPins { server, .. } => of(server, json!({})),
            Command::NoteToolChange {
                server,
                tool,
                change,
                fingerprint,
            } => of(
                server,
                json!({ "tool": tool, "change": change, "fingerprint": fingerprint }),
            ),
            Command::PutVirtualServer { spec, .. } => of(&spec.name, json!({ "spec": spec })),
            Command::PutApprovedCommand { spec, .. } => of(&spec.name, json!({ "spec": spec })),
            Command::DeleteApprovedCommand { name, .. } | Command::DeleteLimit { name, .. } => {
                of(name, json!({}))
            }
            Command::PutLimit { spec, .. } => of(&spec.name, json!({ "spec": spec })),
            Command::DeleteVirtualServer { name, .. } => of(name, json!({})),
            Command::SetPlacement { .. }
            | Command::SetSessionKey { .. }
            | Command::PutSessionState { .. }
            // Quota counting is traffic, not a change of the registry.
            | Command::ConsumeQuota { .. }
            | Command::AddUsage { .. }
            | Command::TouchTokens { .. } => None,
        }
    }
}
