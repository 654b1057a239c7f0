//! Which revision a stdio server is spoken to in, learned when its process starts
//! (`super::process::Process::start_as`).
//!
//! A start writes a `server/discover` of 2026-07-28 and the `initialize` of the session
//! revision together ([`Probe::Both`]) and goes by the first answer that settles it:
//!
//! - `initialize` accepted (before any discovery): a 2025-11-25 session (the discovery, if
//!   still unanswered, is cancelled);
//! - a discovery naming 2026-07-28: that revision. A server that announces list changes or
//!   resource subscriptions sends them only on a `subscriptions/listen` request, so one is
//!   asked for at once ([`Settled::Listen`]): acknowledged, the server is spoken to in
//!   2026-07-28 and the process holds such a request open (`super::listen`). Refused (as the
//!   Python SDK's servers do over stdio), the same process is kept in a session if it
//!   accepted `initialize` too; if it refused that, it is started again with
//!   [`Probe::SessionsOnly`] ([`Handshake::WantsSession`]), and a server that refuses a
//!   session then is spoken to in 2026-07-28 after all ([`Probe::StatelessOnly`]), without
//!   its list changes.
//!
//! A start whose probe failed (a server that exits on any request before `initialize`, as
//! some SDKs' servers do) is tried once more with `initialize` alone. What a pool learns this
//! way is kept for its later processes ([`RevisionHint`]), so each is spawned once.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use mcpcp_proto::mcp::{code, ErrorObject, STATELESS_VERSION};
use serde_json::Value;

use crate::call::CallError;

/// What a start asks the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `server/discover` and `initialize`, written together.
    Both,
    /// `initialize` alone.
    SessionsOnly,
    /// `server/discover` alone.
    StatelessOnly,
}

/// What a server told of itself when it was started.
pub enum Handshake {
    /// It accepted `initialize` (its answer).
    Sessions(Value),
    /// It speaks 2026-07-28: what `initialize` would have said, and the client capabilities
    /// its requests carry when their caller gave none.
    Stateless { init: Value, capabilities: Value },
    /// It speaks 2026-07-28, announces list changes, and refused `initialize` on this
    /// process (its revision was settled by the discovery): start it again for a session.
    WantsSession,
}

/// Why a start spawns its server again (`mcpd_pool_revision_restarts_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// The probe ended the process (a server that exits on any request before
    /// `initialize`): `initialize` alone next.
    ProbeFailed,
    /// A 2026-07-28 server that announces list changes refused `initialize`: a session next.
    AnnouncesChanges,
    /// Then it refused a session too: 2026-07-28 after all, without its list changes.
    SessionsRefused,
}

impl Restart {
    /// What the next process is asked.
    pub fn probe(self) -> Probe {
        match self {
            Restart::ProbeFailed | Restart::AnnouncesChanges => Probe::SessionsOnly,
            Restart::SessionsRefused => Probe::StatelessOnly,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Restart::ProbeFailed => "probe_failed",
            Restart::AnnouncesChanges => "announces_changes",
            Restart::SessionsRefused => "sessions_refused",
        }
    }
}

/// What a pool learned of the revision its stdio server speaks, shared by the pool's
/// processes (their starts begin with [`RevisionHint::probe`]).
#[derive(Debug, Clone, Default)]
pub struct RevisionHint(Arc<AtomicU8>);

const UNKNOWN: u8 = 0;
const SESSIONS: u8 = 1;
const STATELESS: u8 = 2;

impl RevisionHint {
    /// What the next start asks.
    pub fn probe(&self) -> Probe {
        match self.0.load(Ordering::Relaxed) {
            SESSIONS => Probe::SessionsOnly,
            STATELESS => Probe::StatelessOnly,
            _ => Probe::Both,
        }
    }

    /// Remembers what a start that needed more than one process found.
    pub fn learned(&self, probe: Probe) {
        let v = match probe {
            Probe::SessionsOnly => SESSIONS,
            Probe::StatelessOnly => STATELESS,
            Probe::Both => UNKNOWN,
        };
        self.0.store(v, Ordering::Relaxed);
    }
}

/// Where a start stands after an answer.
pub enum Settled {
    /// What the server speaks (or why the start failed).
    Done(Result<Handshake, CallError>),
    /// Not yet: wait for the other answer.
    Wait,
    /// A 2026-07-28 server that announces changes: whether it takes a `subscriptions/listen`
    /// decides (ask it, or wait for its verdict).
    Listen,
}

/// An answer come so far (`None`: not yet, or not asked).
pub type Answer<'a> = Option<&'a Result<Value, CallError>>;

/// Whether the answers so far settle which revision to speak (see the module docs):
/// `discovered` and `initialized` are the answers come so far; `discovering` and
/// `initializing` whether one is still to come; `listening` whether the server took a
/// `subscriptions/listen` (`None`: not known yet). `capabilities`: the client's, for a
/// stateless outcome.
pub fn settle(
    probe: Probe,
    (discovered, initialized): (Answer<'_>, Answer<'_>),
    (discovering, initializing): (bool, bool),
    listening: Option<bool>,
    capabilities: &Value,
) -> Settled {
    let stateless = discovered
        .and_then(|d| d.as_ref().ok())
        .filter(|d| super::rounds::speaks(d));
    if let Some(d) = stateless {
        if !announces(d) || probe == Probe::StatelessOnly || listening == Some(true) {
            return Settled::Done(Ok(Handshake::Stateless {
                init: super::rounds::init_of(d),
                capabilities: capabilities.clone(),
            }));
        }
        if listening.is_none() {
            return Settled::Listen;
        }
    }
    if let Some(Ok(init)) = initialized {
        return Settled::Done(Ok(Handshake::Sessions(init.clone())));
    }
    if stateless.is_some() {
        // It announces changes it cannot send here: kept in a session if it accepts the
        // `initialize` too, else started again.
        return match initializing {
            true => Settled::Wait,
            false => Settled::Done(Ok(Handshake::WantsSession)),
        };
    }
    if discovering || initializing {
        return Settled::Wait;
    }
    // Neither settled it: the `initialize`'s error says why, else the discovery's.
    Settled::Done(Err(match (initialized, discovered) {
        (Some(Err(e)), _) | (_, Some(Err(e))) => e.clone(),
        _ => CallError::Answered(ErrorObject::new(
            code::INTERNAL_ERROR,
            format!("the server does not speak {STATELESS_VERSION}"),
        )),
    }))
}

/// Whether a discovery's (or `initialize`'s) capabilities announce list changes or resource
/// subscriptions.
pub fn announces(discovered: &Value) -> bool {
    let caps = &discovered["capabilities"];
    ["tools", "prompts", "resources"]
        .iter()
        .any(|k| caps[k]["listChanged"] == true)
        || caps["resources"]["subscribe"] == true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn discovery(announcing: bool) -> Result<Value, CallError> {
        Ok(json!({
            "supportedVersions": [STATELESS_VERSION],
            "capabilities": { "tools": { "listChanged": announcing } },
            "_meta": { "io.modelcontextprotocol/serverInfo": { "name": "s" } },
        }))
    }

    fn refused() -> Result<Value, CallError> {
        Err(CallError::Answered(ErrorObject::new(-32601, "no")))
    }

    fn outcome(s: Settled) -> Option<Result<&'static str, String>> {
        match s {
            Settled::Wait => None,
            Settled::Listen => Some(Ok("ask for a listen")),
            Settled::Done(Ok(Handshake::Sessions(_))) => Some(Ok("sessions")),
            Settled::Done(Ok(Handshake::Stateless { .. })) => Some(Ok("stateless")),
            Settled::Done(Ok(Handshake::WantsSession)) => Some(Ok("wants session")),
            Settled::Done(Err(e)) => Some(Err(e.to_string())),
        }
    }

    #[test]
    fn the_first_answer_that_settles_the_revision_wins() {
        let caps = json!({});
        let both = Probe::Both;
        let accepted = Ok(json!({ "protocolVersion": "2025-11-25" }));
        let settled = |probe, d: Option<&_>, i: Option<&_>, pending, listening| {
            outcome(settle(probe, (d, i), pending, listening, &caps))
        };
        // A session server: its discovery refused, its initialize accepted.
        assert_eq!(
            settled(both, Some(&refused()), None, (false, true), None),
            None
        );
        assert_eq!(
            settled(
                both,
                Some(&refused()),
                Some(&accepted),
                (false, false),
                None
            ),
            Some(Ok("sessions"))
        );
        // An initialize accepted first: a session, the discovery no longer waited for.
        assert_eq!(
            settled(both, None, Some(&accepted), (true, false), None),
            Some(Ok("sessions"))
        );
        // A 2026 server that announces nothing: settled by its discovery alone.
        assert_eq!(
            settled(both, Some(&discovery(false)), None, (false, true), None),
            Some(Ok("stateless"))
        );
        // One that announces list changes is asked for a listen, whatever initialize says...
        let announcing = discovery(true);
        assert_eq!(
            settled(both, Some(&announcing), None, (false, true), None),
            Some(Ok("ask for a listen"))
        );
        assert_eq!(
            settled(
                both,
                Some(&announcing),
                Some(&accepted),
                (false, false),
                None
            ),
            Some(Ok("ask for a listen"))
        );
        // ...and spoken to in 2026 when it takes one.
        assert_eq!(
            settled(
                both,
                Some(&announcing),
                Some(&accepted),
                (false, false),
                Some(true)
            ),
            Some(Ok("stateless"))
        );
        // Refused: kept in a session if it accepts one...
        assert_eq!(
            settled(both, Some(&announcing), None, (false, true), Some(false)),
            None
        );
        assert_eq!(
            settled(
                both,
                Some(&announcing),
                Some(&accepted),
                (false, false),
                Some(false)
            ),
            Some(Ok("sessions"))
        );
        // ...started again for one if it refused it, and spoken to in 2026 if asked only that.
        assert_eq!(
            settled(
                both,
                Some(&announcing),
                Some(&refused()),
                (false, false),
                Some(false)
            ),
            Some(Ok("wants session"))
        );
        assert_eq!(
            settled(
                Probe::StatelessOnly,
                Some(&announcing),
                None,
                (false, false),
                None
            ),
            Some(Ok("stateless"))
        );
        // Neither: the initialize's error.
        let failed = settled(
            both,
            Some(&refused()),
            Some(&refused()),
            (false, false),
            None,
        );
        assert!(
            matches!(failed, Some(Err(ref e)) if e.contains("no")),
            "{failed:?}"
        );
    }
}
