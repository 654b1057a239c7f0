//! A remote MCP server, reached over Streamable HTTP (the session-based revisions, 2025-03-26
//! to 2025-11-25): one upstream session per connection, shared by the calls of many clients as
//! a stdio process is.
//!
//! - Each call is a POST. Its answer is JSON, or an SSE stream that carries the server's
//!   progress, logging and its own requests (sampling, elicitation, roots) for that call
//!   before the answer; the requests go to the call's client and their answers are POSTed
//!   back.
//! - Progress tokens are rewritten to `mcpd-p-<id>` (unique within the upstream session, whose
//!   calls come from many clients) and restored on the way back.
//! - A GET stream, when the server offers one, carries what belongs to no call (list_changed,
//!   resources/updated) to the pool's events.
//! - **A stream that breaks off** before its answer, or that the server closes (SSE polling),
//!   is resumed with `Last-Event-ID` when the server gave its events ids (2025-11-25
//!   resumability): nothing is sent again, the server replays what came after.
//! - **A session the server forgot** (404 on `Mcp-Session-Id`, a restarted server) is opened
//!   again transparently: the request was refused, not run, so it is sent again on the new
//!   session, after the subscriptions are replayed. A call whose stream breaks after the
//!   server took it, and cannot be resumed, may have run: it fails as `Crashed`, and only the router's retry rule
//!   (reads, idempotent tools) sends it again.
//! - Dropping a call's future (timeout, client gone) sends `notifications/cancelled`.
//! - **A server with an OAuth client** (`oauth`) gets each request with the connection's
//!   access token (`super::oauth`). A `401` ran nothing: the token goes, and the request is
//!   sent once more with a new one.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use mcpcp_proto::api::ServerSpec;
use mcpcp_proto::mcp::{Message, RequestId};
use mcpcp_proto::sse::SseParser;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::events::PoolEvent;
use super::liveness::Liveness;
use super::oauth::Tokens;
use super::process::ProcessError;
use crate::call::{CallError, CallEvent, EventSink, Responder};

const SESSION_HEADER: &str = "mcp-session-id";
const LAST_EVENT_ID: &str = "last-event-id";
/// Resumes of a call's stream the server may refuse in a row before the call fails.
const RESUME_ATTEMPTS: u32 = 3;
/// The longest a resume waits, whatever the server's `retry:` hint.
const MAX_RESUME_PAUSE: Duration = Duration::from_secs(30);
const VERSION_HEADER: &str = "mcp-protocol-version";
/// Largest answer body read from a remote server.
const MAX_BODY: usize = 16 << 20;

/// The session the server gave at `initialize`, and the revision it agreed to.
#[derive(Clone, Default)]
struct Session {
    id: Option<String>,
    version: String,
}

struct Shared {
    server: String,
    url: reqwest::Url,
    http: reqwest::Client,
    /// The access tokens of the server's OAuth client, if it has one.
    tokens: Option<Tokens>,
    /// What `initialize` is sent with, again when the session is renewed.
    client_init: Value,
    session: Mutex<Session>,
    /// Bumped on every renewal, so concurrent calls that all met a 404 renew it once.
    generation: AtomicU64,
    renewing: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    in_flight: AtomicUsize,
    liveness: Liveness,
    /// Resources subscribed on this session, replayed on a renewed one.
    subscriptions: Mutex<BTreeSet<String>>,
    pool_events: mpsc::Sender<PoolEvent>,
    /// A call's request timeout, for the POSTs that are not a call (answers, notifications).
    request_timeout: Duration,
    /// The bound of opening a session (at connect and on renewal).
    startup: Duration,
}

/// A remote server's session.
pub struct Remote {
    shared: Arc<Shared>,
    init: Value,
    shard: Option<usize>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// How one POST ended.
enum Posted {
    /// The JSON-RPC response to the request.
    Answer(Result<Value, mcpcp_proto::mcp::ErrorObject>),
    /// 202: accepted (a notification or a response).
    Accepted,
    /// 404 on a session: the server does not know it (any more).
    SessionGone,
    /// A 4xx without a JSON-RPC answer before any session: at `initialize`, a server of the
    /// legacy HTTP+SSE transport (`super::legacy_sse`).
    Refused(StatusCode),
}

/// Why `initialize` gave no session.
enum InitFailure {
    /// The server refused the POST (a legacy HTTP+SSE server).
    Refused(StatusCode),
    Failed(CallError),
}

impl From<CallError> for InitFailure {
    fn from(e: CallError) -> Self {
        InitFailure::Failed(e)
    }
}

impl InitFailure {
    fn into_call_error(self) -> CallError {
        match self {
            InitFailure::Refused(status) => CallError::NotRun(format!(
                "the remote server refused initialize (HTTP {status})"
            )),
            InitFailure::Failed(e) => e,
        }
    }
}

impl Remote {
    /// Opens a session with the server at `spec.url`: `initialize`, then `initialized`, with
    /// the access tokens of its OAuth client, if it has one.
    pub async fn connect(
        spec: &ServerSpec,
        pool_events: mpsc::Sender<PoolEvent>,
        client_init: Value,
        tokens: Option<Tokens>,
    ) -> Result<Remote, ProcessError> {
        // The URL stays out of errors: they reach clients, and a URL can carry a secret.
        let failed = |e: String| ProcessError::Initialize(format!("the remote server: {e}"));
        let url = super::remote_http::url_of(spec).map_err(failed)?;
        let startup = Duration::from_millis(spec.timeouts.startup_ms);
        let http = super::remote_http::client_for(spec).map_err(failed)?;
        let shared = Arc::new(Shared {
            server: spec.name.clone(),
            url: url.clone(),
            http,
            tokens,
            client_init,
            session: Mutex::new(Session::default()),
            generation: AtomicU64::new(0),
            renewing: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            liveness: Liveness::default(),
            subscriptions: Mutex::new(BTreeSet::new()),
            pool_events,
            request_timeout: Duration::from_millis(spec.timeouts.request_ms),
            startup,
        });
        let init = match tokio::time::timeout(startup, shared.initialize()).await {
            Err(_) => return Err(ProcessError::StartupTimeout(startup)),
            Ok(Err(InitFailure::Refused(status))) => {
                return Err(ProcessError::NotStreamableHttp(status.as_u16()))
            }
            Ok(Err(InitFailure::Failed(e))) => return Err(failed(e.to_string())),
            Ok(Ok(init)) => init,
        };
        let listener = tokio::spawn(listen(Arc::downgrade(&shared)));
        tracing::info!(server = %spec.name, origin = %super::remote_http::origin(url.as_str()), protocol = %shared.session().version, session = shared.session().id.is_some(), "remote server connected");
        Ok(Remote {
            shared,
            init,
            shard: crate::shard::current(),
            listener,
        })
    }

    pub fn init(&self) -> &Value {
        &self.init
    }

    pub fn shard(&self) -> Option<usize> {
        self.shard
    }

    pub fn is_alive(&self) -> bool {
        self.shared.liveness.is_alive()
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    pub async fn exited(&self) {
        self.shared.liveness.closed().await
    }

    /// Sends a request and waits for its answer (see the module docs).
    pub async fn call(
        &self,
        method: &str,
        mut params: Option<Value>,
        events: Option<EventSink>,
    ) -> Result<Value, CallError> {
        let shared = &self.shared;
        shared.liveness.check(&shared.server)?;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let progress_token = crate::call::events::substitute_progress_token(&mut params, id);
        let _counted = InFlight::enter(&shared.in_flight);
        let mut cancel = CancelOnDrop {
            shared: shared.clone(),
            id,
            armed: true,
        };
        let request = Message::request(RequestId::Num(id as i64), method, params);
        let relay = Relay {
            events,
            progress_token,
        };
        let mut renewed = false;
        let outcome = loop {
            let generation = shared.generation.load(Ordering::Acquire);
            match shared.post(&request, Some(&relay)).await {
                Ok(Posted::Answer(outcome)) => break outcome.map_err(CallError::Answered),
                Ok(Posted::Accepted) => {
                    break Err(CallError::Crashed(format!(
                        "remote server {:?} accepted {method} without an answer; it may or may not have run",
                        shared.server
                    )))
                }
                Ok(Posted::SessionGone) if !renewed => {
                    // Refused, not run: renew the session and send it again.
                    renewed = true;
                    if let Err(e) = shared.renew(generation).await {
                        break Err(CallError::NotRun(format!(
                            "remote server {:?} forgot the session and a new one failed ({e}); the call did not run",
                            shared.server
                        )));
                    }
                }
                Ok(Posted::Refused(status)) => {
                    break Err(CallError::NotRun(format!(
                        "remote server {:?} refused the request (HTTP {status}); the call did not run",
                        shared.server
                    )))
                }
                Ok(Posted::SessionGone) => {
                    break Err(CallError::NotRun(format!(
                        "remote server {:?} refused the renewed session too; the call did not run",
                        shared.server
                    )))
                }
                Err(e) => break Err(e),
            }
        };
        cancel.armed = false;
        if outcome.is_ok() {
            shared.remember_subscription(method, &request);
        }
        outcome
    }

    /// Sends a notification.
    pub async fn notify(&self, method: &str, params: Option<Value>) {
        let shared = &self.shared;
        let _ = shared
            .send_note(&shared.session(), &Message::notification(method, params))
            .await;
    }

    /// Ends the session (`DELETE`, within `grace`).
    pub async fn stop(&self, grace: Duration) {
        let shared = &self.shared;
        shared.liveness.close();
        let session = shared.session();
        if session.id.is_some() {
            let ended = tokio::time::timeout(grace, async {
                let out = shared.request(reqwest::Method::DELETE, &session).await?;
                out.request
                    .timeout(grace)
                    .send()
                    .await
                    .map_err(|e| CallError::NotRun(e.without_url().to_string()))
            });
            let _ = ended.await;
        }
    }
}

/// A request ready to send, and the access token it carries (to drop if the server refuses
/// it: [`Shared::refused`]).
struct Outgoing {
    request: reqwest::RequestBuilder,
    bearer: Option<HeaderValue>,
}

/// Where the server's messages for one call go.
struct Relay {
    events: Option<EventSink>,
    progress_token: Option<Value>,
}

impl Shared {
    fn session(&self) -> Session {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `initialize` and `initialized` on a new session, which then replaces the current one;
    /// returns the server's answer.
    async fn initialize(self: &Arc<Self>) -> Result<Value, InitFailure> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = Message::request(
            RequestId::Num(id as i64),
            "initialize",
            Some(self.client_init.clone()),
        );
        let (posted, session_id) = self.post_on(&Session::default(), &request, None).await?;
        let init = match posted {
            Posted::Answer(Ok(v)) => v,
            Posted::Answer(Err(e)) => return Err(CallError::Answered(e).into()),
            Posted::Refused(status) => return Err(InitFailure::Refused(status)),
            Posted::Accepted | Posted::SessionGone => {
                return Err(CallError::NotRun("initialize got no answer".into()).into())
            }
        };
        let session = Session {
            id: session_id,
            version: init["protocolVersion"]
                .as_str()
                .unwrap_or(mcpcp_proto::mcp::LATEST_SESSION_VERSION)
                .to_string(),
        };
        let initialized = Message::notification("notifications/initialized", None);
        self.send_note(&session, &initialized).await?;
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = session;
        Ok(init)
    }

    /// Opens a new session in place of one the server forgot (once for every call that met
    /// the 404 on session `generation`), and replays the subscriptions on it. It runs as a
    /// task of its own, so a caller that gives up does not cut the replay short.
    async fn renew(self: &Arc<Self>, generation: u64) -> Result<(), CallError> {
        let shared = self.clone();
        tokio::spawn(async move { shared.renew_now(generation).await })
            .await
            .unwrap_or_else(|e| Err(CallError::NotRun(format!("the renewal was abandoned: {e}"))))
    }

    async fn renew_now(self: &Arc<Self>, generation: u64) -> Result<(), CallError> {
        let _one = self.renewing.lock().await;
        if self.generation.load(Ordering::Acquire) != generation {
            return Ok(());
        }
        tracing::warn!(server = %self.server, "the remote server forgot the session; opening a new one");
        metrics::counter!("mcpd_upstream_sessions_renewed_total", "server" => self.server.clone())
            .increment(1);
        tokio::time::timeout(self.startup, self.initialize())
            .await
            .map_err(|_| CallError::NotRun(format!("no new session within {:?}", self.startup)))?
            .map_err(InitFailure::into_call_error)?;
        self.generation.fetch_add(1, Ordering::AcqRel);
        let uris: Vec<String> = self
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for uri in uris {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let request = Message::request(
                RequestId::Num(id as i64),
                "resources/subscribe",
                Some(json!({ "uri": uri })),
            );
            let replayed =
                tokio::time::timeout(self.request_timeout, self.post(&request, None)).await;
            if !matches!(replayed, Ok(Ok(Posted::Answer(Ok(_))))) {
                tracing::warn!(server = %self.server, uri = %uri, "a subscription was not replayed on the new session");
            }
        }
        Ok(())
    }

    /// Keeps the session's subscriptions, to replay them on a renewed session.
    fn remember_subscription(&self, method: &str, request: &Message) {
        let Message::Request {
            params: Some(p), ..
        } = request
        else {
            return;
        };
        let Some(uri) = p["uri"].as_str() else {
            return;
        };
        let mut subs = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        match method {
            "resources/subscribe" => {
                subs.insert(uri.to_string());
            }
            "resources/unsubscribe" => {
                subs.remove(uri);
            }
            _ => {}
        }
    }

    /// A request on `session`, without its access token.
    fn on_session(&self, method: reqwest::Method, session: &Session) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, self.url.clone())
            .header(ACCEPT, "application/json, text/event-stream");
        if let Some(id) = &session.id {
            req = req.header(SESSION_HEADER, id);
        }
        if !session.version.is_empty() {
            req = req.header(VERSION_HEADER, &session.version);
        }
        req
    }

    /// A request on `session`, with the connection's access token when the server has an
    /// OAuth client.
    async fn request(
        &self,
        method: reqwest::Method,
        session: &Session,
    ) -> Result<Outgoing, CallError> {
        let (req, bearer) = super::oauth::with_bearer(
            self.on_session(method, session),
            self.tokens.as_ref(),
            &self.server,
        )
        .await?;
        Ok(Outgoing {
            request: req,
            bearer,
        })
    }

    /// The server answered `401` to a request sent with `bearer`: the token goes, for the
    /// next request to get a new one.
    async fn refused(&self, bearer: Option<&HeaderValue>) {
        if let (Some(tokens), Some(sent)) = (&self.tokens, bearer) {
            tokens.refused(sent).await;
        }
    }

    /// POSTs `msg` on `session` (with `timeout`, if any), once more with a new access token
    /// after a `401` (`oauth::send_authorized`). The outer error is no access token; the
    /// inner one the transport's.
    async fn post_message(
        &self,
        session: &Session,
        msg: &Message,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Result<reqwest::Response>, CallError> {
        // Shared, not copied, by a request sent again after a `401`.
        let body = bytes::Bytes::from(msg.to_line());
        super::oauth::send_authorized(self.tokens.as_ref(), &self.server, || {
            let request = self
                .on_session(reqwest::Method::POST, session)
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
            match timeout {
                Some(t) => request.timeout(t),
                None => request,
            }
        })
        .await
    }

    /// POSTs a notification or a response on `session`: the server accepts it (202) or not.
    async fn send_note(&self, session: &Session, msg: &Message) -> Result<(), CallError> {
        let resp = self
            .post_message(session, msg, Some(self.request_timeout))
            .await?
            .map_err(|e| {
                CallError::NotRun(format!(
                    "remote server {:?}: {}",
                    self.server,
                    e.without_url()
                ))
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        Err(CallError::NotRun(format!(
            "remote server {:?} answered HTTP {status}",
            self.server
        )))
    }

    /// POSTs one request on the current session.
    async fn post(
        self: &Arc<Self>,
        msg: &Message,
        relay: Option<&Relay>,
    ) -> Result<Posted, CallError> {
        let session = self.session();
        self.post_on(&session, msg, relay).await.map(|(p, _)| p)
    }

    /// POSTs one request on `session`; its answer is read from JSON or from its SSE
    /// stream, whose other messages go to `relay`. Also returns the session id the server
    /// gave (at `initialize`).
    async fn post_on(
        self: &Arc<Self>,
        session: &Session,
        msg: &Message,
        relay: Option<&Relay>,
    ) -> Result<(Posted, Option<String>), CallError> {
        let resp = self
            .post_message(session, msg, None)
            .await?
            .map_err(|e| super::remote_http::send_failed(&self.server, e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(CallError::NotRun(format!(
                "remote server {:?} refused the credentials it was sent (HTTP {status}); the call did not run",
                self.server
            )));
        }
        let given = resp
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        if status == StatusCode::NOT_FOUND && session.id.is_some() {
            return Ok((Posted::SessionGone, given));
        }
        if status == StatusCode::ACCEPTED {
            return Ok((Posted::Accepted, given));
        }
        if session.id.is_none()
            && matches!(
                status,
                StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
            )
        {
            return Ok((Posted::Refused(status), given));
        }
        if resp.status().is_success() && super::remote_http::is_event_stream(&resp) {
            return self
                .read_stream(session, resp, relay)
                .await
                .map(|p| (p, given));
        }
        match super::remote_http::read_message(resp, MAX_BODY, &self.server).await? {
            Some(Message::Response { outcome, .. }) => Ok((Posted::Answer(outcome), given)),
            _ => Err(CallError::Crashed(format!(
                "remote server {:?} answered HTTP {status} without a JSON-RPC answer; it may or may not have run",
                self.server
            ))),
        }
    }

    /// Reads a call's SSE stream until its answer; its other messages go to `relay`.
    ///
    /// A stream that closes or breaks before the answer, once the server has given its events
    /// ids (the resumability of 2025-11-25), is resumed: a GET with `Last-Event-ID` asks the
    /// server for the rest, after its `retry:` hint. A server that closes a stream on purpose
    /// (polling) is followed the same way. It goes on while the call's time lasts (the caller's
    /// timeout), and until the server refuses [`RESUME_ATTEMPTS`] resumes in a row.
    async fn read_stream(
        self: &Arc<Self>,
        session: &Session,
        mut resp: reqwest::Response,
        relay: Option<&Relay>,
    ) -> Result<Posted, CallError> {
        use super::remote_http::{stream_broke, StreamEnd};
        let mut parser = SseParser::default();
        let mut budget = MAX_BODY;
        let mut resumed = 0u32;
        loop {
            let end = super::remote_http::read_stream(resp, &mut parser, &mut budget, |msg| {
                self.relay(msg, relay)
            })
            .await;
            let why = match end {
                StreamEnd::Answer(outcome) => return Ok(Posted::Answer(outcome)),
                StreamEnd::TooLarge => {
                    let why = format!("streamed over {MAX_BODY} bytes without an answer");
                    return Err(stream_broke(&self.server, &why));
                }
                StreamEnd::Cut(why) => why,
            };
            let Some(last) = parser.last_event_id().map(String::from) else {
                return Err(stream_broke(&self.server, &why));
            };
            parser.resume();
            // The server's hint, else at once the first time; from the second on at least
            // 100 ms, whatever the hint (a server that closes every stream at once, even with
            // `retry: 0`, is not asked in a busy loop).
            let mut pause = Duration::from_millis(parser.retry_ms().unwrap_or(0));
            if resumed > 0 {
                pause = pause.max(Duration::from_millis(100));
            }
            let mut attempts = 0;
            resp = loop {
                tokio::time::sleep(pause.min(MAX_RESUME_PAUSE)).await;
                attempts += 1;
                match self.resume_stream(session, &last).await {
                    Ok(r) => break r,
                    Err(refused) => {
                        metrics::counter!("mcpd_remote_stream_resumptions_total", "server" => self.server.clone(), "outcome" => "refused").increment(1);
                        tracing::info!(server = %self.server, last_event_id = %last, error = %refused, "a call's stream was not resumed");
                        if attempts >= RESUME_ATTEMPTS {
                            let why = format!("{why}, and did not resume it ({refused})");
                            return Err(stream_broke(&self.server, &why));
                        }
                        pause = (pause * 2).max(Duration::from_millis(100));
                    }
                }
            };
            resumed += 1;
            metrics::counter!("mcpd_remote_stream_resumptions_total", "server" => self.server.clone(), "outcome" => "resumed").increment(1);
            tracing::debug!(server = %self.server, last_event_id = %last, resumed, "a call's stream resumed");
        }
    }

    /// Asks the server for the events of a stream after `last` (`Last-Event-ID`).
    async fn resume_stream(
        &self,
        session: &Session,
        last: &str,
    ) -> Result<reqwest::Response, String> {
        let resp = self.open_stream(session, Some(last)).await?;
        let status = resp.status();
        if !status.is_success() || !super::remote_http::is_event_stream(&resp) {
            return Err(format!("HTTP {status}"));
        }
        Ok(resp)
    }

    /// A GET for an event stream on `session`: the standalone one, or with `Last-Event-ID`
    /// the rest of a call's. A `401` lets the access token go, for the next request to get a
    /// new one; the answer is returned whatever its status.
    async fn open_stream(
        &self,
        session: &Session,
        last: Option<&str>,
    ) -> Result<reqwest::Response, String> {
        let out = self
            .request(reqwest::Method::GET, session)
            .await
            .map_err(|e| e.to_string())?;
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        if let Some(last) = last {
            let id = HeaderValue::from_str(last)
                .map_err(|_| "an event id that is not a header value")?;
            headers.insert(LAST_EVENT_ID, id);
        }
        let resp = out
            .request
            .headers(headers)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            self.refused(out.bearer.as_ref()).await;
        }
        Ok(resp)
    }

    /// A message of the server during a call: to the call's client when it has one, with its
    /// progress token restored; a request no client can take is refused.
    async fn relay(self: &Arc<Self>, msg: Message, relay: Option<&Relay>) {
        let sink = relay.and_then(|r| r.events.as_ref());
        match msg {
            Message::Notification { method, mut params } => {
                if method == "notifications/progress" {
                    crate::call::events::restore_progress_token(
                        &mut params,
                        relay.and_then(|r| r.progress_token.clone()),
                    );
                }
                let msg = Message::Notification { method, params };
                match sink {
                    Some(events) => {
                        let _ = events.send(CallEvent::Notify(msg)).await;
                    }
                    None => {
                        let _ = self.pool_events.try_send(PoolEvent::Notify(msg));
                    }
                }
            }
            Message::Request { id, method, params } => {
                let (tx, rx) = mpsc::channel::<Vec<u8>>(1);
                tokio::spawn(answer(self.clone(), rx));
                let responder = Responder::new(tx, id);
                match sink {
                    Some(events) => {
                        let _ = events
                            .send(CallEvent::Request {
                                method,
                                params,
                                responder,
                            })
                            .await;
                    }
                    None => {
                        responder
                            .respond(Err(mcpcp_proto::mcp::ErrorObject::new(
                                mcpcp_proto::mcp::code::METHOD_NOT_FOUND,
                                format!("{method}: no client is attached to this request"),
                            )))
                            .await
                    }
                }
            }
            Message::Response { .. } => {}
        }
    }
}

/// POSTs the client's answer to one request of the server (a line written by a
/// [`Responder`]); a responder dropped unanswered sends nothing.
async fn answer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Vec<u8>>) {
    let Some(line) = rx.recv().await else {
        return;
    };
    let Ok(msg) = Message::parse(&line) else {
        return;
    };
    if let Err(e) = shared.send_note(&shared.session(), &msg).await {
        tracing::warn!(server = %shared.server, error = %e, "an answer to the remote server's request was not delivered");
    }
}

/// The standalone GET stream: what the server says outside any call, to the pool's events.
/// A server without one (405) is left alone; a broken stream is opened again after a pause.
async fn listen(shared: std::sync::Weak<Shared>) {
    let mut pause = Duration::from_millis(500);
    loop {
        let Some(s) = shared.upgrade() else { return };
        if !s.liveness.is_alive() {
            return;
        }
        // No access token yet, or no answer: tried again after the pause.
        let resp = s.open_stream(&s.session(), None).await.ok();
        match resp {
            Some(r) if r.status() == StatusCode::METHOD_NOT_ALLOWED => return,
            // The token went (`open_stream`): a new one next time.
            Some(r) if r.status() == StatusCode::UNAUTHORIZED => drop(s),
            // The server forgot the session: renew it now, not at the next call.
            Some(r) if r.status() == StatusCode::NOT_FOUND && s.session().id.is_some() => {
                let generation = s.generation.load(Ordering::Acquire);
                match s.renew(generation).await {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::warn!(server = %s.server, error = %e, "the session could not be renewed")
                    }
                }
            }
            Some(r) if r.status().is_success() => {
                pause = Duration::from_millis(500);
                let mut parser = SseParser::default();
                let mut body = r.bytes_stream();
                drop(s);
                while let Some(Ok(chunk)) = body.next().await {
                    let Some(s) = shared.upgrade() else { return };
                    if parser.pending() > MAX_BODY {
                        tracing::warn!(server = %s.server, "the remote server's event stream sent an event over {MAX_BODY} bytes; reopening it");
                        break;
                    }
                    for event in parser.feed(&chunk) {
                        if let Ok(msg) = Message::parse(event.data.as_bytes()) {
                            s.relay(msg, None).await;
                        }
                    }
                }
            }
            _ => drop(s),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Counts a call in flight while it lives (also `super::remote_stateless`'s calls).
pub(super) struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    pub(super) fn enter(n: &'a AtomicUsize) -> InFlight<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tells the server a call was abandoned (its future dropped before the answer).
struct CancelOnDrop {
    shared: Arc<Shared>,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let shared = self.shared.clone();
        let note = crate::call::events::cancelled(self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = shared.send_note(&shared.session(), &note).await;
            });
        }
    }
}
