//! A connection to one MCP server that carries calls and the server's own messages: a local
//! process over stdio ([`super::process`]), or a remote server over Streamable HTTP
//! ([`super::remote`]; in the stateless revision, [`super::remote_stateless`]) or the legacy
//! HTTP+SSE transport ([`super::legacy_sse`]). The pool, its supervisors, the catalogue and the router work on this
//! trait; only [`connect`] knows which transport a server uses.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use mcpcp_proto::api::ServerSpec;
use serde_json::Value;
use tokio::sync::mpsc;

use super::events::PoolEvent;
use super::legacy_sse::LegacySse;
use super::oauth::Tokens;
use super::process::{Process, ProcessError, StartOptions};
use super::remote::Remote;
use super::remote_stateless::Stateless;
use crate::call::{CallError, EventSink};

/// One ready connection to a server, initialised.
pub trait Upstream: Send + Sync {
    /// The server's answer to `initialize` (server info, capabilities, instructions).
    fn init(&self) -> &Value;
    /// The transport, for logs and metrics: `stdio` or `http`.
    fn transport(&self) -> &'static str;
    /// The process id of a local server.
    fn pid(&self) -> Option<u32>;
    /// The data-plane shard whose runtime drives its I/O (`None`: the main runtime).
    fn shard(&self) -> Option<usize>;
    /// Whether it can take calls.
    fn is_alive(&self) -> bool;
    /// Calls in flight on it.
    fn in_flight(&self) -> usize;
    /// Completes when it can take no more calls (the process exited, the connection closed).
    fn exited(&self) -> BoxFuture<'_, ()>;
    /// Sends a request for downstream session `owner` and waits for the answer; `events`
    /// receives the server's messages that belong to the call. Dropping the future cancels
    /// the call upstream.
    fn call_owned<'a>(
        &'a self,
        method: &'a str,
        params: Option<Value>,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
    ) -> BoxFuture<'a, Result<Value, CallError>>;
    /// Sends a notification.
    fn notify<'a>(&'a self, method: &'a str, params: Option<Value>) -> BoxFuture<'a, ()>;
    /// Ends it: a process is asked to exit (then signalled after `grace`), a remote
    /// session is deleted.
    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()>;
}

impl dyn Upstream + '_ {
    /// A request that belongs to no downstream session.
    pub async fn call(
        &self,
        method: &str,
        params: Option<Value>,
        events: Option<EventSink>,
    ) -> Result<Value, CallError> {
        self.call_owned(method, params, events, None).await
    }
}

/// Connects to the server `spec` names, initialised with `client_init` (a dedicated
/// session's own parameters) or the gateway's own.
pub async fn connect(
    spec: &ServerSpec,
    pool_events: mpsc::Sender<PoolEvent>,
    options: StartOptions,
    client_init: Option<Value>,
) -> Result<Arc<dyn Upstream>, ProcessError> {
    let client_init = client_init.unwrap_or_else(gateway_init);
    if spec.is_remote() {
        // One OAuth client's tokens for every attempt below: one token between them.
        let tokens = Tokens::for_spec(spec, options.oauth_failure_hold)
            .map_err(|e| ProcessError::Initialize(format!("the remote server: {e}")))?;
        // The newest revision the server speaks: 2026-07-28 if `server/discover` says so.
        let discovered = Stateless::discover(
            spec,
            &client_init,
            pool_events.clone(),
            &options,
            tokens.clone(),
        )
        .await?;
        if let Some(stateless) = discovered {
            return Ok(Arc::new(stateless));
        }
        let init = client_init.clone();
        return match Remote::connect(spec, pool_events.clone(), init, tokens.clone()).await {
            Ok(remote) => Ok(Arc::new(remote)),
            // Refused with a 4xx: a server of the legacy HTTP+SSE transport, maybe.
            Err(ProcessError::NotStreamableHttp(_)) => {
                let legacy = LegacySse::connect(spec, pool_events, client_init, tokens).await?;
                Ok(Arc::new(legacy))
            }
            Err(e) => Err(e),
        };
    }
    let process = Arc::new(Process::start_as(spec, pool_events, options, client_init).await?);
    process.hold_listen();
    Ok(process)
}

/// The gateway's own `initialize` parameters, for a connection no client owns.
pub fn gateway_init() -> Value {
    serde_json::json!({
        "protocolVersion": mcpcp_proto::mcp::LATEST_SESSION_VERSION,
        "capabilities": {
            "sampling": {},
            "elicitation": {},
            "roots": { "listChanged": true },
        },
        "clientInfo": { "name": "mcpd", "version": env!("CARGO_PKG_VERSION") },
    })
}

impl Upstream for Process {
    fn init(&self) -> &Value {
        &self.init
    }
    fn transport(&self) -> &'static str {
        "stdio"
    }
    fn pid(&self) -> Option<u32> {
        Process::pid(self)
    }
    fn shard(&self) -> Option<usize> {
        Process::shard(self)
    }
    fn is_alive(&self) -> bool {
        Process::is_alive(self)
    }
    fn in_flight(&self) -> usize {
        Process::in_flight(self)
    }
    fn exited(&self) -> BoxFuture<'_, ()> {
        Box::pin(Process::exited(self))
    }
    fn call_owned<'a>(
        &'a self,
        method: &'a str,
        params: Option<Value>,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
    ) -> BoxFuture<'a, Result<Value, CallError>> {
        Box::pin(Process::call_owned(self, method, params, events, owner))
    }
    fn notify<'a>(&'a self, method: &'a str, params: Option<Value>) -> BoxFuture<'a, ()> {
        Box::pin(Process::notify(self, method, params))
    }
    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(Process::stop(self, grace))
    }
}

impl Upstream for Remote {
    fn init(&self) -> &Value {
        Remote::init(self)
    }
    fn transport(&self) -> &'static str {
        "http"
    }
    fn pid(&self) -> Option<u32> {
        None
    }
    fn shard(&self) -> Option<usize> {
        Remote::shard(self)
    }
    fn is_alive(&self) -> bool {
        Remote::is_alive(self)
    }
    fn in_flight(&self) -> usize {
        Remote::in_flight(self)
    }
    fn exited(&self) -> BoxFuture<'_, ()> {
        Box::pin(Remote::exited(self))
    }
    fn call_owned<'a>(
        &'a self,
        method: &'a str,
        params: Option<Value>,
        events: Option<EventSink>,
        _owner: Option<Arc<str>>,
    ) -> BoxFuture<'a, Result<Value, CallError>> {
        // Each call has its own stream: the server's messages need no owner to find it.
        Box::pin(Remote::call(self, method, params, events))
    }
    fn notify<'a>(&'a self, method: &'a str, params: Option<Value>) -> BoxFuture<'a, ()> {
        Box::pin(Remote::notify(self, method, params))
    }
    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(Remote::stop(self, grace))
    }
}

impl Upstream for LegacySse {
    fn init(&self) -> &Value {
        LegacySse::init(self)
    }
    fn transport(&self) -> &'static str {
        "sse"
    }
    fn pid(&self) -> Option<u32> {
        None
    }
    fn shard(&self) -> Option<usize> {
        LegacySse::shard(self)
    }
    fn is_alive(&self) -> bool {
        LegacySse::is_alive(self)
    }
    fn in_flight(&self) -> usize {
        LegacySse::in_flight(self)
    }
    fn exited(&self) -> BoxFuture<'_, ()> {
        Box::pin(LegacySse::exited(self))
    }
    fn call_owned<'a>(
        &'a self,
        method: &'a str,
        params: Option<Value>,
        events: Option<EventSink>,
        _owner: Option<Arc<str>>,
    ) -> BoxFuture<'a, Result<Value, CallError>> {
        Box::pin(LegacySse::call(self, method, params, events))
    }
    fn notify<'a>(&'a self, method: &'a str, params: Option<Value>) -> BoxFuture<'a, ()> {
        Box::pin(LegacySse::notify(self, method, params))
    }
    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(LegacySse::stop(self, grace))
    }
}

impl Upstream for Stateless {
    fn init(&self) -> &Value {
        &self.init
    }
    fn transport(&self) -> &'static str {
        "http"
    }
    fn pid(&self) -> Option<u32> {
        None
    }
    fn shard(&self) -> Option<usize> {
        self.shard
    }
    fn is_alive(&self) -> bool {
        self.liveness.is_alive()
    }
    fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn exited(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.liveness.closed())
    }
    fn call_owned<'a>(
        &'a self,
        method: &'a str,
        params: Option<Value>,
        events: Option<EventSink>,
        _owner: Option<Arc<str>>,
    ) -> BoxFuture<'a, Result<Value, CallError>> {
        // Each request is an exchange of its own: nothing to attribute.
        Box::pin(Stateless::call(self, method, params, events))
    }
    fn notify<'a>(&'a self, _method: &'a str, _params: Option<Value>) -> BoxFuture<'a, ()> {
        // This revision has no notifications from the client (cancelling a request is
        // closing its stream, which dropping the call does).
        Box::pin(async {})
    }
    fn stop(&self, _grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(Stateless::stop(self))
    }
}
