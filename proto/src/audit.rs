//! The audit trail of admin changes: one event per change, in the Raft log itself (so every
//! node holds the same trail), chained by hash. Each event's `hash` is SHA-256 over the hash of
//! the event before it and the event's own JSON without its `hash`; a removed, reordered or
//! edited event breaks the chain from there on, which [`verify`] reports.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::Role;

/// The `prev_hash` of the first event of a cluster.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who made a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The API token's id, `jwt:ISSUER:SUBJECT`, or `system:WHAT` for a change the cluster
    /// made on a proof of its own (`system:init`, `system:join`, `system:recover-admin`).
    pub token_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// For a JWT caller: the registry name of its issuer, and its subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// One admin change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// 1, 2, 3... over the cluster's life.
    pub seq: u64,
    /// Unix seconds, by the clock of the node that took the request.
    pub at: u64,
    pub actor: Actor,
    /// The caller's address, as the node that took the request saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// What was done (`put_server`, `revoke_token`...).
    pub kind: String,
    /// The object it touched (a server's name, a token's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// The change itself, secrets redacted (env and header values, token hashes).
    pub detail: serde_json::Value,
    /// The registry revision the change produced.
    pub revision: u64,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEvent {
    /// The hash this event must carry: over `prev_hash` and the event without `hash`.
    pub fn digest(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.hash = String::new();
        let body = serde_json::to_vec(&unsealed).unwrap_or_default();
        let mut h = Sha256::new();
        h.update(self.prev_hash.as_bytes());
        h.update(b"\n");
        h.update(&body);
        hex::encode(h.finalize())
    }
}

/// `GET /v1/audit`: the events asked for, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditPage {
    /// The registry revision the page was read at.
    pub revision: u64,
    /// The oldest event the cluster still keeps (older ones were compacted away).
    pub first_kept: u64,
    /// The last event's sequence number and hash: the chain's head.
    pub head_seq: u64,
    pub head_hash: String,
    pub items: Vec<AuditEvent>,
}

/// `PUT /v1/audit/retention`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRetention {
    /// How many events the cluster keeps, 100 to 1,000,000.
    pub events: u64,
}

/// Where a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("event {seq}: its hash does not match its content (edited)")]
    Edited { seq: u64 },
    #[error("event {seq}: it does not follow event {before} (an event was removed or reordered)")]
    Broken { seq: u64, before: u64 },
    #[error("event 1 does not start the chain")]
    BadStart,
}

/// Checks that `events` (in order) form an unbroken chain. The first one's `prev_hash` is
/// taken as given (older events may have been compacted), unless it is event 1.
pub fn verify(events: &[AuditEvent]) -> Result<(), ChainError> {
    for (i, e) in events.iter().enumerate() {
        if e.digest() != e.hash {
            return Err(ChainError::Edited { seq: e.seq });
        }
        match i.checked_sub(1).map(|p| &events[p]) {
            Some(before) if e.prev_hash != before.hash || e.seq != before.seq + 1 => {
                return Err(ChainError::Broken {
                    seq: e.seq,
                    before: before.seq,
                })
            }
            None if e.seq == 1 && e.prev_hash != GENESIS => return Err(ChainError::BadStart),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditEvent> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let mut e = AuditEvent {
                    seq,
                    at: 1_700_000_000 + seq,
                    actor: Actor {
                        token_id: "t".into(),
                        role: Some(Role::ClusterAdmin),
                        tenant: None,
                        issuer: None,
                        subject: None,
                    },
                    from: Some("127.0.0.1:5000".into()),
                    kind: "put_tenant".into(),
                    object: Some(format!("t{seq}")),
                    detail: serde_json::json!({"name": format!("t{seq}")}),
                    revision: seq + 10,
                    prev_hash: prev.clone(),
                    hash: String::new(),
                };
                e.hash = e.digest();
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    #[test]
    fn an_untouched_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(()));
        assert_eq!(
            verify(&chain(5)[2..]),
            Ok(()),
            "a compacted chain starts anywhere"
        );
    }

    #[test]
    fn an_edited_removed_or_reordered_event_is_found() {
        let mut edited = chain(5);
        edited[2].actor.token_id = "someone-else".into();
        assert_eq!(verify(&edited), Err(ChainError::Edited { seq: 3 }));
        let mut removed = chain(5);
        removed.remove(2);
        assert_eq!(
            verify(&removed),
            Err(ChainError::Broken { seq: 4, before: 2 })
        );
        let mut resealed = chain(5);
        resealed[2].detail = serde_json::json!({"name": "forged"});
        resealed[2].hash = resealed[2].digest();
        assert_eq!(
            verify(&resealed),
            Err(ChainError::Broken { seq: 4, before: 3 })
        );
    }
}
