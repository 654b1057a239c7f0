//! Who the members are, as the trust boundary asks it: one check, set once Raft runs, that
//! both the admitting side ([`super::admission`]) and the dialing side ([`super::verify`])
//! consult.

use std::sync::Arc;

/// Whether node `id` is a member (voter or learner) of the membership this node knows, or
/// this node knows none yet.
pub type MembersCheck = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// The membership check, set once Raft runs (the channels that dial peers are made before
/// it). Until it is set, any node of the cluster is taken: that is start-up only.
#[derive(Clone, Default)]
pub struct Members(Arc<std::sync::OnceLock<MembersCheck>>);

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Members(..)")
    }
}

impl Members {
    /// Sets the check; a second call changes nothing.
    pub fn set(&self, check: MembersCheck) {
        let _ = self.0.set(check);
    }

    /// Whether node `id` is a member (or the check is not set yet).
    pub fn admits(&self, id: u64) -> bool {
        self.0.get().is_none_or(|check| check(id))
    }
}
