//! The audit chain's key: what makes the trail's hash chain keyed (`mcpcp_proto::audit`).
//! Derived with HKDF-SHA256 from the cluster's data key, so it lives where that key lives (each
//! node's TLS directory, and the operator's recovery copy), never in the data directory, its
//! snapshots or its backups. Whoever holds only the data can rewrite the hashes of the events
//! in a snapshot, not their MACs. (An event is keyed when it is applied, so the admin commands
//! still in a node's Raft log, after its last snapshot, are keyed again each time the node
//! replays them: those, a data directory's most recent, are as safe as the log itself.)

use mcpcp_proto::audit::AuditEvent;
use ring::{hkdf, hmac};

/// HKDF's salt and info: a key for this purpose only, never the data key itself.
const SALT: &[u8] = b"mcpcp audit chain";
const INFO: &[u8] = b"hmac-sha256 v1";

/// The cluster's audit key. Cheap to clone.
#[derive(Clone)]
pub struct AuditKey(hmac::Key);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

impl AuditKey {
    /// The audit key of the cluster whose data key is `data_key`.
    pub fn derive(data_key: &[u8; 32]) -> AuditKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(data_key);
        let okm = prk
            .expand(&[INFO], hmac::HMAC_SHA256)
            .unwrap_or_else(|_| unreachable!("one HMAC-SHA256 key is within HKDF's output limit"));
        AuditKey(hmac::Key::from(okm))
    }

    /// The MAC an event with this `hash` carries.
    pub fn mac(&self, hash: &str) -> String {
        hex::encode(hmac::sign(&self.0, hash.as_bytes()))
    }

    /// Whether `event`'s MAC is this key's for its hash (compared in constant time).
    pub fn checks(&self, event: &AuditEvent) -> bool {
        let Some(mac) = event.mac.as_deref().and_then(|m| hex::decode(m).ok()) else {
            return false;
        };
        hmac::verify(&self.0, event.hash.as_bytes(), &mac).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_data_key_makes_and_checks_a_mac() {
        let key = AuditKey::derive(&[7; 32]);
        let mac = key.mac("abc");
        assert_eq!(mac, key.mac("abc"), "deterministic: every node agrees");
        assert_ne!(mac, key.mac("abd"));
        assert_ne!(mac, AuditKey::derive(&[8; 32]).mac("abc"));
        assert_ne!(
            mac,
            hex::encode(hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]),
                b"abc"
            )),
            "derived, not the data key itself"
        );
    }
}
