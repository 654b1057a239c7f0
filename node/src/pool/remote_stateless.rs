//! A remote MCP server that speaks the stateless revision (2026-07-28), spoken to in that
//! revision: found by `server/discover` when the node connects (a server that answers it
//! with 2026-07-28 among its `supportedVersions`; any other answer falls back to the
//! `initialize` of `super::remote`, an unreachable server is no verdict).
//!
//! - **No session:** each request stands alone (`super::remote_request`, also for its
//!   multi-round trips); a restarted server is simply reached again.
//! - **List changes and resource updates** come on the server's `subscriptions/listen`
//!   stream (`super::listen`), which also carries the resources the connection's
//!   clients subscribed to (`resources/subscribe` of a 2025 client).
//! - Notifications from the client are not sent (cancelling is closing the request's
//!   stream, which dropping a call does).

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use mcpcp_proto::api::ServerSpec;
use mcpcp_proto::mcp::STATELESS_VERSION;
use serde_json::Value;
use tokio::sync::mpsc;

use super::events::PoolEvent;
use super::listen::{listen, Subscriptions};
use super::liveness::Liveness;
use super::oauth::Tokens;
use super::process::{ProcessError, StartOptions};
use super::remote::InFlight;
use super::remote_request::Link;
use crate::call::{CallError, EventSink};

/// A remote server spoken to in the stateless revision.
pub struct Stateless {
    link: Arc<Link>,
    /// The resources clients subscribed to through this connection, asked for on its listen
    /// stream.
    subscriptions: Arc<Subscriptions>,
    /// What `initialize` would have said (`super::Upstream::init`).
    pub(super) init: Value,
    pub(super) shard: Option<usize>,
    pub(super) in_flight: AtomicUsize,
    pub(super) liveness: Liveness,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Stateless {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Stateless {
    /// Asks the server at `spec.url` what it speaks: `Some` when it speaks 2026-07-28, `None`
    /// when it answered otherwise (the caller falls back to `initialize`), an error when it
    /// could not be asked.
    pub async fn discover(
        spec: &ServerSpec,
        client_init: &Value,
        pool_events: mpsc::Sender<PoolEvent>,
        options: &StartOptions,
        tokens: Option<Tokens>,
    ) -> Result<Option<Stateless>, ProcessError> {
        // The URL stays out of errors: they reach clients, and a URL can carry a secret.
        let failed = |e: String| ProcessError::Initialize(format!("the remote server: {e}"));
        let startup = Duration::from_millis(spec.timeouts.startup_ms);
        let link = Arc::new(Link::new(
            spec.name.clone(),
            super::remote_http::url_of(spec).map_err(failed)?,
            super::remote_http::client_for(spec).map_err(failed)?,
            tokens,
            client_init["capabilities"].clone(),
            options.max_questions,
        ));
        let asked = tokio::time::timeout(startup, link.discovered()).await;
        let discovered = match asked {
            Err(_) => return Err(ProcessError::StartupTimeout(startup)),
            Ok(Err(CallError::NotRun(e))) => return Err(failed(e)),
            Ok(Err(_)) | Ok(Ok(None)) => return Ok(None),
            Ok(Ok(Some(d))) => d,
        };
        let init = super::rounds::init_of(&discovered);
        tracing::info!(server = %spec.name, origin = %super::remote_http::origin(link.url.as_str()), protocol = STATELESS_VERSION, "remote server connected");
        let subscriptions = Arc::new(Subscriptions::default());
        let listener = tokio::spawn(listen(
            Arc::downgrade(&link),
            subscriptions.clone(),
            pool_events,
            options.listen,
        ));
        Ok(Some(Stateless {
            link,
            subscriptions,
            init,
            shard: crate::shard::current(),
            in_flight: AtomicUsize::new(0),
            liveness: Liveness::default(),
            listener,
        }))
    }

    /// Nothing to end but the listening stream: there is no session.
    pub async fn stop(&self) {
        self.liveness.close();
        self.listener.abort();
    }

    /// Sends a request, with as many rounds as the server's questions take (see the module
    /// docs).
    pub async fn call(
        &self,
        method: &str,
        params: Option<Value>,
        events: Option<EventSink>,
    ) -> Result<Value, CallError> {
        self.liveness.check(&self.link.server)?;
        let _counted = InFlight::enter(&self.in_flight);
        let answered = self
            .subscriptions
            .answer(&self.link.server, method, params.as_ref())
            .await;
        if let Some(answer) = answered {
            return answer;
        }
        super::rounds::call(self.link.as_ref(), method, params, events).await
    }
}
