//! How an attempt to run a call on a server failed, typed, so that the router's retry,
//! failover and breaker decisions match on what happened instead of decoding wire codes. The
//! JSON-RPC error a client sees is made from it at the edge ([`CallError::into_rpc`]).

use mcpcp_proto::mcp::{code, ErrorObject};
use serde::{Deserialize, Serialize};

/// The failure of one call on one server (or of every replica the router tried).
///
/// | variant    | did it run?        | against the server's breaker?                   |
/// |------------|--------------------|-------------------------------------------------|
/// | `Busy`     | no                 | no: the callers' own overload                   |
/// | `NotRun`   | no                 | yes: no process, node unreachable, removed      |
/// | `Refused`  | no                 | no: a peer refused the caller, not the server   |
/// | `Crashed`  | may or may not     | yes                                             |
/// | `TimedOut` | may or may not     | yes, unless the call waited on its own client   |
/// | `Answered` | yes, it answered   | no: an answer is the server working             |
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallError {
    /// No room: a full queue, no free process in time, too many dedicated processes.
    #[error("{0}")]
    Busy(String),
    /// The server could not take it: no running process, removed, its node unreachable, its
    /// breaker open.
    #[error("{0}")]
    NotRun(String),
    /// A peer refused the caller's credential (a token it has not applied yet, or revoked,
    /// or a JWT caller whose issuer it no longer trusts): the server was never asked.
    #[error("{0}")]
    Refused(String),
    /// It reached the server, which then died or whose connection broke.
    #[error("{0}")]
    Crashed(String),
    /// No answer within the server's request timeout; the call was cancelled.
    #[error("{0}")]
    TimedOut(String),
    /// An error answer (the server's own, or the gateway's verdict on the request).
    #[error("{}", .0.message)]
    Answered(ErrorObject),
}

impl CallError {
    /// Whether the call provably did not run, so another replica may take it.
    pub fn did_not_run(&self) -> bool {
        matches!(
            self,
            CallError::Busy(_) | CallError::NotRun(_) | CallError::Refused(_)
        )
    }

    /// Whether the call reached the server and may have run (re-sending it is safe only for
    /// a read or an idempotent tool).
    pub fn may_have_run(&self) -> bool {
        matches!(self, CallError::Crashed(_) | CallError::TimedOut(_))
    }

    /// The JSON-RPC error a client sees.
    pub fn into_rpc(self) -> ErrorObject {
        match self {
            CallError::Busy(m) => ErrorObject::new(code::QUEUE_FULL, m),
            CallError::NotRun(m) | CallError::Refused(m) => ErrorObject::new(code::UNAVAILABLE, m),
            CallError::Crashed(m) => ErrorObject::new(code::CRASHED, m),
            CallError::TimedOut(m) => ErrorObject::new(code::TIMEOUT, m),
            CallError::Answered(e) => e,
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CallError::Busy(_) => "queue_full",
            CallError::NotRun(_) => "unavailable",
            CallError::Refused(_) => "refused",
            CallError::Crashed(_) => "crashed",
            CallError::TimedOut(_) => "timeout",
            CallError::Answered(_) => "error",
        }
    }
}

impl From<ErrorObject> for CallError {
    /// An error object is an answer.
    fn from(e: ErrorObject) -> Self {
        CallError::Answered(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_maps_to_its_wire_code_and_says_whether_it_ran() {
        let cases = [
            (CallError::Busy("b".into()), code::QUEUE_FULL, true, false),
            (
                CallError::NotRun("n".into()),
                code::UNAVAILABLE,
                true,
                false,
            ),
            (CallError::Crashed("c".into()), code::CRASHED, false, true),
            (CallError::TimedOut("t".into()), code::TIMEOUT, false, true),
            (
                CallError::Answered(ErrorObject::new(code::INVALID_PARAMS, "x")),
                code::INVALID_PARAMS,
                false,
                false,
            ),
        ];
        for (e, wire, not_run, maybe) in cases {
            assert_eq!(e.did_not_run(), not_run, "{e:?}");
            assert_eq!(e.may_have_run(), maybe, "{e:?}");
            let json = serde_json::to_string(&e).expect("serializes");
            assert_eq!(serde_json::from_str::<CallError>(&json).expect("parses"), e);
            assert_eq!(e.into_rpc().code, wire);
        }
    }
}
