//! The audit trail of admin changes: one event per change, in the Raft log itself (so every
//! node holds the same trail), chained by hash. Each event's `hash` is SHA-256 over the hash of
//! the event before it and the event's own JSON without its `hash`; a removed, reordered or
//! edited event breaks the chain from there on, which [`verify`] reports.
//!
//! A hash chain alone is rewritten whole by anyone who holds the data: edit an event, hash
//! every later one again. So each event also carries a `mac`: HMAC-SHA256 of its `hash` under
//! a key derived from the cluster's data key, which lives in each node's TLS directory, not in
//! the data directory, its snapshots or its backups. Only a node can make or check one
//! ([`verify_macs`] with the node's check); the hash chain stays checkable by anyone.

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
    /// HMAC-SHA256 (hex) of `hash` under the cluster's audit key; absent on events written
    /// before the chain was keyed. Not part of `hash`, so nodes of either kind agree on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl AuditEvent {
    /// The hash this event must carry: over `prev_hash` and the event without `hash`.
    pub fn digest(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.hash = String::new();
        unsealed.mac = None;
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
    #[error(
        "event {seq}: its MAC does not match (written or rewritten without the cluster's key)"
    )]
    BadMac { seq: u64 },
    #[error("event {seq}: it carries no MAC, but an event before it does (its MAC was taken off)")]
    MacRemoved { seq: u64 },
    #[error("events {first} to {last} carry no MAC: written before the chain was keyed, or their MACs were taken off (`audit verify --allow-unkeyed` and `snapshot restore --allow-unkeyed-audit` accept them)")]
    Unkeyed { first: u64, last: u64 },
}

/// What [`verify_macs`] found in a chain whose every MAC checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MacReport {
    /// Events that carry a MAC (all checked).
    pub keyed: u64,
    /// Events before the first keyed one that carry none (accepted only when asked).
    pub unkeyed: u64,
}

/// Which events without a MAC a check accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MacRule {
    /// Those before the first keyed event (written by an older release).
    pub allow_unkeyed: bool,
    /// The events checked follow keyed ones (a later batch of one trail): none may lack one.
    pub after_keyed: bool,
}

/// Checks each event's MAC with `mac_ok` (a node's key). An event without one is accepted only
/// before the first that has one, and only as `rule` says: a chain keyed from some event on
/// stays keyed, so taking MACs off is found.
pub fn verify_macs(
    events: &[AuditEvent],
    mac_ok: impl Fn(&AuditEvent) -> bool,
    rule: MacRule,
) -> Result<MacReport, ChainError> {
    let mut report = MacReport::default();
    let mut keyed_before = rule.after_keyed;
    for e in events {
        match &e.mac {
            Some(_) if !mac_ok(e) => return Err(ChainError::BadMac { seq: e.seq }),
            Some(_) => {
                report.keyed += 1;
                keyed_before = true;
            }
            None if keyed_before => return Err(ChainError::MacRemoved { seq: e.seq }),
            None => report.unkeyed += 1,
        }
    }
    if report.unkeyed > 0 && !rule.allow_unkeyed {
        let first = events.first().map_or(0, |e| e.seq);
        return Err(ChainError::Unkeyed {
            first,
            last: first + report.unkeyed - 1,
        });
    }
    Ok(report)
}

/// `POST /v1/audit/verify`: check MACs with the cluster's key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditVerify {
    /// The events to check (an exported file); absent: the events the node holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<AuditEvent>>,
    /// Accept events without a MAC before the first that has one.
    #[serde(default)]
    pub allow_unkeyed: bool,
    /// The events follow keyed ones (a later batch of one file): none may lack a MAC.
    #[serde(default)]
    pub after_keyed: bool,
}

impl AuditVerify {
    pub fn rule(&self) -> MacRule {
        MacRule {
            allow_unkeyed: self.allow_unkeyed,
            after_keyed: self.after_keyed,
        }
    }
}

/// The answer to [`AuditVerify`]: what was checked, and where the chain breaks, if it does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditVerdict {
    /// The first and last event checked (0 when there were none).
    pub first: u64,
    pub last: u64,
    #[serde(flatten)]
    pub macs: MacReport,
    /// Where the hash chain or a MAC breaks; absent when everything checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<String>,
}

impl AuditVerdict {
    /// Checks `events`' hash chain, then their MACs with `mac_ok`.
    pub fn of(
        events: &[AuditEvent],
        mac_ok: impl Fn(&AuditEvent) -> bool,
        rule: MacRule,
    ) -> AuditVerdict {
        let checked = verify(events).and_then(|()| verify_macs(events, mac_ok, rule));
        AuditVerdict {
            first: events.first().map_or(0, |e| e.seq),
            last: events.last().map_or(0, |e| e.seq),
            macs: checked.clone().unwrap_or_default(),
            broken: checked.err().map(|e| e.to_string()),
        }
    }
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
                    mac: None,
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

    /// A stand-in for a node's key: the MAC is the hash reversed.
    fn keyed(mut events: Vec<AuditEvent>, from: usize) -> Vec<AuditEvent> {
        for e in &mut events[from..] {
            e.mac = Some(e.hash.chars().rev().collect());
        }
        events
    }

    fn mac_ok(e: &AuditEvent) -> bool {
        e.mac.as_deref() == Some(&e.hash.chars().rev().collect::<String>())
    }

    #[test]
    fn macs_are_checked_and_cannot_be_taken_off() {
        let upgraded_ok = MacRule {
            allow_unkeyed: true,
            after_keyed: false,
        };
        let all = keyed(chain(5), 0);
        assert_eq!(
            verify_macs(&all, mac_ok, MacRule::default()),
            Ok(MacReport {
                keyed: 5,
                unkeyed: 0
            })
        );
        assert_eq!(verify(&all), Ok(()), "the MAC is not part of the hash");
        let mut forged = all.clone();
        forged[2].mac = Some("00".into());
        assert_eq!(
            verify_macs(&forged, mac_ok, upgraded_ok),
            Err(ChainError::BadMac { seq: 3 })
        );
        let mut stripped = all.clone();
        stripped[3].mac = None;
        assert_eq!(
            verify_macs(&stripped, mac_ok, upgraded_ok),
            Err(ChainError::MacRemoved { seq: 4 })
        );
        // Events from before the chain was keyed pass only when the caller accepts them.
        let upgraded = keyed(chain(5), 2);
        assert_eq!(
            verify_macs(&upgraded, mac_ok, MacRule::default()),
            Err(ChainError::Unkeyed { first: 1, last: 2 })
        );
        let later_batch = MacRule {
            allow_unkeyed: true,
            after_keyed: true,
        };
        assert_eq!(
            verify_macs(&chain(2), mac_ok, later_batch),
            Err(ChainError::MacRemoved { seq: 1 }),
            "a batch that follows keyed ones"
        );
        assert_eq!(
            verify_macs(&upgraded, mac_ok, upgraded_ok),
            Ok(MacReport {
                keyed: 3,
                unkeyed: 2
            })
        );
    }
}
