//! One MCP server process, spoken to over stdio as an MCP client, in the revision its start
//! agreed (`super::handshake`): a 2025-11-25 session, or 2026-07-28 requests that stand alone
//! (`super::rounds`; `ping` is a `server/discover` then).
//!
//! A [`Process`] owns a child (its own process group, killed with it), its stdin (calls write
//! their requests directly; a writer task writes everything else and closes it), a reader task
//! parsing its stdout, and a task logging its stderr under the server's name. Many downstream
//! calls share it: each call gets a fresh numeric upstream id, and the reader routes the
//! answer back by that id ([`Process::call`]). Progress tokens are rewritten to
//! `mcpd-p-<upstream id>` so progress finds its call without another table.
//!
//! Messages the server starts (sampling, elicitation, roots requests, logging, progress) go to
//! the call they belong to when that can be told (a progress token names it; otherwise the
//! oldest call in flight that can take server requests), and the rest (list_changed,
//! resources/updated) to the pool's event channel. In 2026-07-28 the process holds a
//! `subscriptions/listen` open when its server announces changes (`super::listen`): the
//! messages marked with that request's id go to its stream.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mcpcp_proto::api::ServerSpec;
use mcpcp_proto::mcp::{code, ErrorObject, Message, RequestId};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};

use super::events::PoolEvent;
use super::handshake::{settle, Handshake, Probe, Restart, RevisionHint, Settled};
use super::listen::{ListenTiming, Listened, Stream, Subscriptions};
use super::report::SlotReport;
use super::sandbox::{Launch, NodePaths, Sandbox};
use crate::call::{CallError, CallEvent, EventSink, Responder};

/// Longest line accepted from a server (a defence against a runaway process).
const MAX_LINE: usize = 16 << 20;
/// Notifications of a listen stream not yet passed on before more are dropped.
const LISTEN_BACKLOG: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("spawning {command:?}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("initialize failed: {0}")]
    Initialize(String),
    #[error("no answer to initialize within {0:?}")]
    StartupTimeout(Duration),
    #[error("sandbox: {0}")]
    Sandbox(#[from] super::sandbox::SandboxError),

    /// A remote server that refused a Streamable HTTP `initialize` (tried next: the legacy
    /// HTTP+SSE transport).
    #[error("the server refused a Streamable HTTP initialize (HTTP {0})")]
    NotStreamableHttp(u16),
}

struct Pending {
    reply: oneshot::Sender<Result<Value, CallError>>,
    events: Option<EventSink>,
    /// The downstream session the call belongs to (`None`: a session-less call, which
    /// shares with nobody).
    owner: Option<Arc<str>>,
    /// The caller's progress token, restored on the way back.
    progress_token: Option<Value>,
}

struct Shared {
    server: String,
    pending: Mutex<BTreeMap<u64, Pending>>,
    next_id: AtomicU64,
    alive: AtomicBool,
    pool_events: mpsc::Sender<PoolEvent>,
    /// `mcpd_pool_calls_in_flight` of the server.
    in_flight: metrics::Gauge,
    /// How long a lone call polls for its answer (see [`wait_answer`]).
    answer_spin: Duration,
    /// Where its exit status goes, for `server status`.
    report: Option<SlotReport>,
    /// Its user and limits.
    sandbox: Sandbox,
    /// The limit mcpd killed it for, once it did (reported in place of its exit status).
    killed_for: Mutex<Option<String>>,
    /// Whether its exit is the slot's to report yet (see [`Exit`]).
    exit: Mutex<Exit>,
    /// The `subscriptions/listen` request open on it (2026-07-28): its id, and where its
    /// messages go (`super::listen`).
    listen: Mutex<Option<(u64, mpsc::Sender<Message>)>>,
}

/// When a process's exit is reported as its slot's.
enum Exit {
    /// During its start: kept (the exit status, once it exited), and reported only if the
    /// start ends with this process, started or failed; a process its start replaced (the
    /// probe ended it, or another revision is tried) is not reported.
    Starting(Option<String>),
    /// Started: reported when it exits.
    Started,
}

impl Shared {
    fn fail_all(&self, error: CallError) {
        // The listen stream ends with the process.
        self.listen.lock().unwrap_or_else(|p| p.into_inner()).take();
        let drained = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, p) in drained {
            let _ = p.reply.send(Err(error.clone()));
        }
    }
}

/// The write end of a server's stdin, shared by the calls (which write their requests
/// themselves, without a hop through a task) and the writer task (answers to the server's
/// requests, cancellations, the close). `None` once closed.
type Pipe = Arc<tokio::sync::Mutex<Option<tokio::process::ChildStdin>>>;

/// A running server process. Dropping it kills the process group.
pub struct Process {
    shared: Arc<Shared>,
    /// Lines for the writer task (an empty one closes stdin).
    stdin: mpsc::Sender<Vec<u8>>,
    pipe: Pipe,
    pid: Option<u32>,
    /// The data-plane shard whose runtime drives its I/O (`None`: the main runtime).
    shard: Option<usize>,
    exited: watch::Receiver<bool>,
    /// The server's answer to `initialize` (or what it would have said, in the stateless
    /// revision).
    pub init: Value,
    /// The revision it is spoken to in.
    speaks: Speaks,
    /// In 2026-07-28, the resources its clients subscribed to, asked for on the
    /// `subscriptions/listen` the process holds open, and the task that holds it
    /// ([`Process::hold_listen`]; none for a server that announces nothing).
    subscriptions: Arc<Subscriptions>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    listen_timing: ListenTiming,
}

/// The revision a process is spoken to in.
enum Speaks {
    /// A session of 2025-11-25 or earlier, opened by `initialize`.
    Sessions,
    /// 2026-07-28: each request stands alone (`super::rounds`); `capabilities` are the
    /// client's its requests carry when their caller gave none; a round asks at most
    /// `max_questions`.
    Stateless {
        capabilities: Value,
        max_questions: usize,
    },
}

/// Calls on this node waiting for a server's answer, over every process.
static AWAITING: AtomicUsize = AtomicUsize::new(0);

/// Counts a call in [`AWAITING`] and in its server's `mcpd_pool_calls_in_flight` while it
/// lives.
struct Awaiting<'a>(&'a metrics::Gauge);

impl Awaiting<'_> {
    fn start(in_flight: &metrics::Gauge) -> Awaiting<'_> {
        AWAITING.fetch_add(1, Ordering::Relaxed);
        in_flight.increment(1.0);
        Awaiting(in_flight)
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        AWAITING.fetch_sub(1, Ordering::Relaxed);
        self.0.decrement(1.0);
    }
}

/// Waits for a call's answer. When it is the only call this node waits on, it first polls for
/// up to `spin` (`[pool] answer_spin_us`; zero: never), yielding to the runtime between polls
/// (which also lets the worker poll the I/O driver): a local server answers in tens of µs, and
/// catching its answer awake saves the wake-up of a sleeping worker thread, which on a virtual
/// machine costs about as much again. Under load other calls are in flight and nothing polls;
/// an idle node never does. `None`: the answer's sender is gone (the process ended).
async fn wait_answer<T>(mut rx: oneshot::Receiver<T>, spin: Duration) -> Option<T> {
    if spin.is_zero() || AWAITING.load(Ordering::Relaxed) > 1 {
        return rx.await.ok();
    }
    let until = std::time::Instant::now() + spin;
    loop {
        match rx.try_recv() {
            Ok(answer) => {
                metrics::counter!("mcpd_pool_answer_polls_total", "outcome" => "answered")
                    .increment(1);
                return Some(answer);
            }
            Err(oneshot::error::TryRecvError::Closed) => return None,
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        if std::time::Instant::now() >= until || AWAITING.load(Ordering::Relaxed) > 1 {
            metrics::counter!("mcpd_pool_answer_polls_total", "outcome" => "slept").increment(1);
            return rx.await.ok();
        }
        tokio::task::yield_now().await;
    }
}

impl Shared {
    /// How a call ends when the process gives no answer: it exited, or mcpd killed it at a
    /// limit of its sandbox.
    fn crashed(&self) -> CallError {
        let server = &self.server;
        match &*self.killed_for.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(why) => CallError::Crashed(format!(
                "server {server:?} was killed at its {why} while the call was in flight; it may or may not have run"
            )),
            None => CallError::Crashed(format!(
                "server {server:?} exited while the call was in flight; it may or may not have run"
            )),
        }
    }
}

/// How a process is run, besides its spec.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// A call that is the only one the node waits on polls this long for its answer
    /// ([`wait_answer`]).
    pub answer_spin: Duration,
    /// Where its stderr lines and exit status go (its slot's), for `server status`.
    pub report: Option<SlotReport>,
    /// What a private filesystem hides of the node's own.
    pub node_paths: NodePaths,
    /// What the pool learned of the revision its server speaks.
    pub revision: RevisionHint,
    /// Most questions a server of 2026-07-28 may ask in one round (`[pool]
    /// max_input_questions`).
    pub max_questions: usize,
    /// How its `subscriptions/listen` stream is opened again (`[pool] listen_*`).
    pub listen: ListenTiming,
    /// How long a failed OAuth token fetch stands (a remote server's; `[pool]
    /// oauth_failure_hold_ms`).
    pub oauth_failure_hold: Duration,
}

impl Process {
    /// Spawns the server, learns the newest revision it speaks (`super::handshake`:
    /// `server/discover`, and `initialize` with `client_init`, the gateway's own params or a
    /// dedicated session's client's) and returns once it is ready. Each process it spawns
    /// has `startup_ms` to answer.
    pub async fn start_as(
        spec: &ServerSpec,
        pool_events: mpsc::Sender<PoolEvent>,
        options: StartOptions,
        client_init: Value,
    ) -> Result<Process, ProcessError> {
        let startup = Duration::from_millis(spec.timeouts.startup_ms);
        let hint = options.revision.clone();
        let mut probe = hint.probe();
        // Why the last process was started again (`None`: the first).
        let mut again_for: Option<Restart> = None;
        // At most three processes: the probe, a session, then the stateless revision.
        for _ in 0..3 {
            let mut process = Process::spawn(spec, pool_events.clone(), options.clone()).await?;
            let shaken =
                tokio::time::timeout(startup, process.handshake(client_init.clone(), probe))
                    .await
                    .map_err(|_| ProcessError::StartupTimeout(startup))?;
            let restart = match (shaken, probe) {
                (Ok(Handshake::Sessions(init)), _) => {
                    process.init = init;
                    None
                }
                (Ok(Handshake::Stateless { init, capabilities }), _) => {
                    process.init = init;
                    process.speaks = Speaks::Stateless {
                        capabilities,
                        max_questions: options.max_questions,
                    };
                    None
                }
                (Ok(Handshake::WantsSession), _) => Some(Restart::AnnouncesChanges),
                // The probe itself ended it: a server that exits on any request before
                // `initialize`. (An answered error is the server's own verdict.)
                (Err(e @ CallError::Crashed(_)), Probe::Both) => {
                    tracing::info!(server = %spec.name, error = %e, "server/discover and initialize together failed; trying initialize alone");
                    Some(Restart::ProbeFailed)
                }
                // It speaks 2026-07-28 only: its list changes will not be heard.
                (Err(e), Probe::SessionsOnly) if again_for == Some(Restart::AnnouncesChanges) => {
                    tracing::warn!(server = %spec.name, error = %e, "server speaks 2026-07-28, announces list changes and refuses a session; speaking 2026-07-28 to it without hearing its list changes");
                    Some(Restart::SessionsRefused)
                }
                (Err(e), _) => {
                    // The start ends with this process: its exit, if that is why, is the
                    // slot's to see (once it came, within a moment).
                    let _ = tokio::time::timeout(EXIT_AFTER_EOF, process.exited()).await;
                    process.end_start();
                    return Err(ProcessError::Initialize(e.to_string()));
                }
            };
            let Some(restart) = restart else {
                if again_for.is_some() {
                    hint.learned(probe);
                }
                process.end_start();
                return Ok(process);
            };
            let reason = restart.label();
            metrics::counter!("mcpd_pool_revision_restarts_total", "server" => spec.name.clone(), "reason" => reason)
                .increment(1);
            tracing::info!(server = %spec.name, pid = process.pid.unwrap_or(0), reason, "starting the server again to speak another revision");
            // Dropped, it is killed with its process group.
            drop(process);
            probe = restart.probe();
            again_for = Some(restart);
        }
        Err(ProcessError::Initialize(
            "no revision could be agreed with the server".into(),
        ))
    }

    /// Spawns the server with its pipes and tasks, not yet spoken to.
    async fn spawn(
        spec: &ServerSpec,
        pool_events: mpsc::Sender<PoolEvent>,
        options: StartOptions,
    ) -> Result<Process, ProcessError> {
        let StartOptions {
            answer_spin,
            report,
            node_paths,
            revision: _,
            max_questions: _,
            listen,
            oauth_failure_hold: _,
        } = options;
        let sandbox = match &spec.sandbox {
            Some(s) => Sandbox::resolve(s, &node_paths)?,
            None => Sandbox::default(),
        };
        let memory_limit = sandbox.memory_bytes;
        // Only what the spec says: `pool::reconcile` put the inherited variables into it.
        let Launch {
            mut cmd,
            stdin_first,
        } = sandbox.launch(&spec.command, &spec.args, &spec.env);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        // Its own process group, so stopping it reaches the children it spawns (npx → node).
        cmd.process_group(0);
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            command: spec.command.clone(),
            source,
        })?;
        let pid = child.id();
        let shared = Arc::new(Shared {
            server: spec.name.clone(),
            pending: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            pool_events,
            in_flight: metrics::gauge!("mcpd_pool_calls_in_flight", "server" => spec.name.clone()),
            answer_spin,
            report: report.clone(),
            sandbox,
            killed_for: Mutex::new(None),
            exit: Mutex::new(Exit::Starting(None)),
            listen: Mutex::new(None),
        });
        let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>(256);
        let (exited_tx, exited_rx) = watch::channel(false);
        let mut stdin = child.stdin.take();
        if let (Some(first), Some(pipe)) = (stdin_first, stdin.as_mut()) {
            pipe.write_all(&first)
                .await
                .map_err(|source| ProcessError::Spawn {
                    command: spec.command.clone(),
                    source,
                })?;
        }
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let pipe: Pipe = Arc::new(tokio::sync::Mutex::new(stdin));
        tokio::spawn(write_loop(pipe.clone(), stdin_rx));
        if let Some(stderr) = stderr {
            let server = spec.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(target: "mcpd::server_stderr", server = %server, pid, "{line}");
                    if let Some(r) = &report {
                        r.stderr_line(&line);
                    }
                }
            });
        }
        if let Some(stdout) = stdout {
            tokio::spawn(read_loop(
                stdout,
                shared.clone(),
                stdin_tx.clone(),
                exited_rx.clone(),
            ));
        }
        if let (Some(limit), Some(pid)) = (memory_limit, pid) {
            tokio::spawn(watch_memory(pid, limit, shared.clone(), exited_rx.clone()));
        }
        tokio::spawn(reap(child, shared.clone(), exited_tx));

        Ok(Process {
            shared,
            stdin: stdin_tx,
            pipe,
            pid,
            shard: crate::shard::current(),
            exited: exited_rx,
            init: Value::Null,
            speaks: Speaks::Sessions,
            subscriptions: Arc::default(),
            listener: Mutex::new(None),
            listen_timing: listen,
        })
    }

    /// The start ends with this process: its exit is reported from now on (and now, if it
    /// came already).
    fn end_start(&self) {
        let mut exit = self.shared.exit.lock().unwrap_or_else(|p| p.into_inner());
        if let (Exit::Starting(Some(status)), Some(r)) = (&*exit, &self.shared.report) {
            r.exited(status);
        }
        *exit = Exit::Started;
    }

    /// Asks the server what `probe` says and goes by the first answer that settles it
    /// (`super::handshake`); the other request, if still unanswered, is cancelled.
    async fn handshake(&self, client_init: Value, probe: Probe) -> Result<Handshake, CallError> {
        let capabilities = client_init["capabilities"].clone();
        let (mut discover, mut discovering) = (pending(), false);
        if probe != Probe::SessionsOnly {
            let params = super::rounds::with_meta(None, &capabilities);
            let sent = self.send("server/discover", params, None, None).await?;
            (discover, discovering) = (Box::pin(sent.answer()), true);
        }
        let (mut initialize, mut initializing) = (pending(), false);
        if probe != Probe::StatelessOnly {
            let sent = self
                .send("initialize", Some(client_init), None, None)
                .await?;
            (initialize, initializing) = (Box::pin(sent.answer()), true);
        }
        let (mut discovered, mut initialized) = (None, None);
        // Whether the server takes a `subscriptions/listen` (asked of a 2026-07-28 server
        // that announces changes), and the wait for its verdict.
        let (mut listen, mut listening, mut asked) = (pending(), None, false);
        loop {
            tokio::select! {
                // Answers that come together: the discovery's first, as the server wrote it.
                biased;
                d = &mut discover, if discovering => (discovered, discovering) = (Some(d), false),
                i = &mut initialize, if initializing => (initialized, initializing) = (Some(i), false),
                l = &mut listen, if asked && listening.is_none() => listening = Some(l),
            }
            let settled = settle(
                probe,
                (discovered.as_ref(), initialized.as_ref()),
                (discovering, initializing),
                listening,
                &capabilities,
            );
            match settled {
                Settled::Wait => continue,
                Settled::Listen if asked => continue,
                Settled::Listen => {
                    asked = true;
                    let stream = self
                        .open_listen(json!({ "toolsListChanged": true }), &capabilities)
                        .await?;
                    // As long as a listen may take later (`[pool] listen_open_timeout_ms`);
                    // silence is a refusal.
                    let within = self.listen_timing.open_within;
                    listen = Box::pin(async move {
                        tokio::time::timeout(within, taken(stream))
                            .await
                            .unwrap_or(false)
                    });
                }
                Settled::Done(Ok(Handshake::Sessions(init))) => {
                    // Written before the start returns, so no request overtakes it.
                    let note = Message::notification("notifications/initialized", None);
                    write_line(&self.pipe, &note.to_line())
                        .await
                        .map_err(|_| self.shared.crashed())?;
                    return Ok(Handshake::Sessions(init));
                }
                Settled::Done(done) => return done,
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The data-plane shard whose runtime drives its I/O (`None`: the main runtime).
    pub fn shard(&self) -> Option<usize> {
        self.shard
    }

    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Relaxed)
    }

    /// Calls in flight on this process.
    pub fn in_flight(&self) -> usize {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Completes when the process has exited.
    pub async fn exited(&self) {
        let mut rx = self.exited.clone();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// Sends a request and waits for its answer. `events` receives the server's messages that
    /// belong to this call. A call that outlives `timeout` (when given) is cancelled upstream.
    pub async fn call(
        &self,
        method: &str,
        params: Option<Value>,
        events: Option<EventSink>,
    ) -> Result<Value, CallError> {
        self.call_owned(method, params, events, None).await
    }

    /// Like [`Process::call`], for a call of downstream session `owner`: the server's own
    /// requests and logs during it can only be attributed when every call in flight on the
    /// process belongs to one session. In the stateless revision a request goes through
    /// `super::rounds` (round after round, a line each).
    pub async fn call_owned(
        &self,
        method: &str,
        params: Option<Value>,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
    ) -> Result<Value, CallError> {
        let Speaks::Stateless {
            capabilities,
            max_questions,
        } = &self.speaks
        else {
            return self.request(method, params, events, owner).await;
        };
        if self.listening() {
            // Asked for on the listen stream (`super::listen`), not sent as requests.
            let answered = self
                .subscriptions
                .answer(&self.shared.server, method, params.as_ref())
                .await;
            if let Some(answer) = answered {
                return answer;
            }
        }
        let rounds = Rounds {
            process: self,
            owner,
            capabilities,
            max_questions: *max_questions,
        };
        super::rounds::call(&rounds, method, params, events).await
    }

    /// Sends one request and waits for its answer.
    async fn request(
        &self,
        method: &str,
        params: Option<Value>,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
    ) -> Result<Value, CallError> {
        self.send(method, params, events, owner)
            .await?
            .answer()
            .await
    }

    /// Writes one request to the server; its answer is still to come.
    pub(super) async fn send(
        &self,
        method: &str,
        mut params: Option<Value>,
        events: Option<EventSink>,
        owner: Option<Arc<str>>,
    ) -> Result<Sent<'_>, CallError> {
        if !self.is_alive() {
            return Err(CallError::NotRun(format!(
                "server {:?} is not running; the call did not run",
                self.shared.server
            )));
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let progress_token = crate::call::events::substitute_progress_token(&mut params, id);
        let (tx, rx) = oneshot::channel();
        let awaiting = Awaiting::start(&self.shared.in_flight);
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Pending {
                    reply: tx,
                    events,
                    owner,
                    progress_token,
                },
            );
        let line = Message::request_line(&RequestId::Num(id as i64), method, params.as_ref());
        if write_line(&self.pipe, &line).await.is_err() {
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(self.shared.crashed());
        }
        Ok(Sent {
            rx,
            cancel: CancelOnDrop {
                process: self,
                id,
                armed: true,
            },
            _awaiting: awaiting,
        })
    }

    /// Writes a `subscriptions/listen` asking for `notifications`, with `capabilities` in its
    /// `_meta`: the one open on the process from now on. Its messages (notifications marked
    /// with its id, then the answer that ends it) come on the stream; dropping the stream
    /// cancels it at the server.
    pub(super) async fn open_listen(
        &self,
        notifications: Value,
        capabilities: &Value,
    ) -> Result<Stream, CallError> {
        if !self.is_alive() {
            return Err(self.shared.crashed());
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LISTEN_BACKLOG);
        *self.shared.listen.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, tx));
        let guard = ListenOpen {
            shared: Arc::downgrade(&self.shared),
            stdin: self.stdin.clone(),
            id,
        };
        let params = json!({ "notifications": notifications });
        let params = super::rounds::with_meta(Some(params), capabilities);
        let line = Message::request_line(
            &RequestId::Num(id as i64),
            "subscriptions/listen",
            params.as_ref(),
        );
        // Through the writer's queue, after the cancel of a listen before it (queued by its
        // guard), and whole even if this future is dropped.
        self.stdin
            .send(line)
            .await
            .map_err(|_| self.shared.crashed())?;
        let stream = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            let msg = rx.recv().await?;
            Some((msg, (rx, guard)))
        });
        Ok(Box::pin(stream))
    }

    /// Holds a `subscriptions/listen` open on a process of 2026-07-28 whose server announces
    /// list changes or resource subscriptions (`super::listen`), for as long as the process
    /// lives; nothing for any other.
    pub fn hold_listen(self: &Arc<Self>) {
        if !matches!(self.speaks, Speaks::Stateless { .. })
            || !super::handshake::announces(&self.init)
        {
            return;
        }
        let task = tokio::spawn(super::listen::listen(
            Arc::downgrade(self),
            self.subscriptions.clone(),
            self.shared.pool_events.clone(),
            self.listen_timing,
        ));
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Whether the process holds a `subscriptions/listen` open.
    fn listening(&self) -> bool {
        self.listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Sends a notification.
    pub async fn notify(&self, method: &str, params: Option<Value>) {
        let _ = self
            .stdin
            .send(Message::notification(method, params).to_line())
            .await;
    }

    /// Asks the process to exit: close its stdin, then SIGTERM the group after `grace`, then
    /// SIGKILL after another `grace`. Whatever the server started in its process group is
    /// stopped too, even when the server itself exited at once.
    pub async fn stop(&self, grace: Duration) {
        // An empty buffer tells the writer to close stdin (other senders may still exist).
        let _ = self.stdin.send(Vec::new()).await;
        let mut rx = self.exited.clone();
        if tokio::time::timeout(grace, rx.wait_for(|e| *e))
            .await
            .is_err()
        {
            signal_group(self.pid, rustix::process::Signal::TERM);
            if tokio::time::timeout(grace, rx.wait_for(|e| *e))
                .await
                .is_err()
            {
                tracing::warn!(server = %self.shared.server, pid = self.pid.unwrap_or(0), "server ignored SIGTERM; killing it");
            }
        }
        // The leader is gone (or going): end its children, which stdin EOF does not reach.
        signal_group(self.pid, rustix::process::Signal::KILL);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(task) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
        // The child itself is killed by `kill_on_drop`; its own children by the group kill.
        signal_group(self.pid, rustix::process::Signal::KILL);
    }
}

/// Sends `sig` to the process group led by `pid`.
fn signal_group(pid: Option<u32>, sig: rustix::process::Signal) {
    if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process_group(pid, sig);
    }
}

/// A request written to a server, its answer still to come. Dropped unanswered, the
/// request is cancelled.
pub(super) struct Sent<'a> {
    rx: oneshot::Receiver<Result<Value, CallError>>,
    cancel: CancelOnDrop<'a>,
    _awaiting: Awaiting<'a>,
}

impl Sent<'_> {
    pub(super) async fn answer(self) -> Result<Value, CallError> {
        let shared = &self.cancel.process.shared;
        let outcome = wait_answer(self.rx, shared.answer_spin)
            .await
            .unwrap_or_else(|| Err(shared.crashed()));
        self.cancel.disarm();
        outcome
    }
}

/// The rounds of one request of downstream session `owner` to a process of the stateless
/// revision: a line each.
struct Rounds<'a> {
    process: &'a Process,
    owner: Option<Arc<str>>,
    capabilities: &'a Value,
    max_questions: usize,
}

impl super::rounds::Carrier for Rounds<'_> {
    fn server(&self) -> &str {
        &self.process.shared.server
    }

    fn max_questions(&self) -> usize {
        self.max_questions
    }

    fn capabilities(&self) -> &Value {
        self.capabilities
    }

    fn round<'a>(
        &'a self,
        method: &'a str,
        params: &'a Option<Value>,
        events: Option<&'a EventSink>,
    ) -> futures_util::future::BoxFuture<'a, Result<Value, CallError>> {
        // A copy each round: the progress token in it is rewritten for the round's own id.
        let sent =
            self.process
                .request(method, params.clone(), events.cloned(), self.owner.clone());
        Box::pin(sent)
    }
}

/// Cancels the upstream request when the caller stops waiting (timeout, client gone).
struct CancelOnDrop<'a> {
    process: &'a Process,
    id: u64,
    armed: bool,
}

impl CancelOnDrop<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let removed = self
            .process
            .shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        if removed.is_some() {
            let note = crate::call::events::cancelled(self.id);
            let _ = self.process.stdin.try_send(note.to_line());
        }
    }
}

/// Writes one whole line to the server's stdin (the lock keeps lines from interleaving).
async fn write_line(pipe: &Pipe, line: &[u8]) -> std::io::Result<()> {
    let mut stdin = pipe.lock().await;
    let Some(w) = stdin.as_mut() else {
        return Err(std::io::ErrorKind::BrokenPipe.into());
    };
    let written = w.write_all(line).await;
    if written.is_err() {
        // A broken pipe stays broken: close it so later writers fail at once.
        *stdin = None;
    }
    written
}

async fn write_loop(pipe: Pipe, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(line) = rx.recv().await {
        if line.is_empty() || write_line(&pipe, &line).await.is_err() {
            break;
        }
    }
    // Dropping stdin closes the pipe: the server's signal to exit.
    pipe.lock().await.take();
}

async fn reap(mut child: Child, shared: Arc<Shared>, exited: watch::Sender<bool>) {
    let status = child.wait().await;
    shared.alive.store(false, Ordering::Relaxed);
    let killed_for = shared
        .killed_for
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let limit = status
        .as_ref()
        .ok()
        .and_then(|s| shared.sandbox.limit_that_ended(s));
    let status = match &status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    };
    let status = match (killed_for, limit) {
        (Some(why), _) => format!("killed: {why}"),
        (None, Some(limit)) => {
            killed_metric(&shared.server, "cpu");
            *shared.killed_for.lock().unwrap_or_else(|p| p.into_inner()) = Some(limit.to_string());
            tracing::warn!(server = %shared.server, %status, "server process killed at its CPU limit");
            format!("killed: {limit} ({status})")
        }
        (None, None) => status,
    };
    tracing::info!(server = %shared.server, %status, "server process exited");
    {
        let mut exit = shared.exit.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *exit {
            Exit::Started => {
                if let Some(r) = &shared.report {
                    r.exited(&status);
                }
            }
            Exit::Starting(kept) => *kept = Some(status),
        }
    }
    shared.fail_all(shared.crashed());
    let _ = exited.send(true);
}

fn killed_metric(server: &str, limit: &'static str) {
    metrics::counter!("mcpd_server_processes_killed_total",
        "server" => server.to_string(), "limit" => limit)
    .increment(1);
}

/// Kills the process group of `pid` once its resident memory passes `limit` bytes (its
/// sandbox's `memory_mb`), and says so in place of its exit status.
async fn watch_memory(
    pid: u32,
    limit: u64,
    shared: Arc<Shared>,
    mut exited: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(super::sandbox::MEMORY_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The rest of the group, as last scanned.
    let (mut others, mut scanned) = (0, None::<tokio::time::Instant>);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = exited.wait_for(|e| *e) => return,
        }
        let Some(own) = super::sandbox::resident_bytes(pid) else {
            return;
        };
        if scanned.is_none_or(|at| at.elapsed() >= super::sandbox::GROUP_SCAN) {
            others = tokio::task::spawn_blocking(move || super::sandbox::group_resident_bytes(pid))
                .await
                .unwrap_or(others);
            scanned = Some(tokio::time::Instant::now());
        }
        let resident = own + others;
        if resident <= limit {
            continue;
        }
        let why = format!(
            "memory limit (resident {} MiB > {} MiB)",
            resident >> 20,
            limit >> 20
        );
        tracing::warn!(server = %shared.server, pid, %why, "killing a server process at its memory limit");
        killed_metric(&shared.server, "memory");
        *shared.killed_for.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        signal_group(Some(pid), rustix::process::Signal::KILL);
        return;
    }
}

async fn read_loop(
    stdout: tokio::process::ChildStdout,
    shared: Arc<Shared>,
    stdin: mpsc::Sender<Vec<u8>>,
    mut exited: watch::Receiver<bool>,
) {
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if buf.len() > MAX_LINE {
            tracing::warn!(server = %shared.server, "server wrote a line over {MAX_LINE} bytes; stopping it");
            break;
        }
        let line = buf.trim_ascii();
        if line.is_empty() {
            continue;
        }
        match Message::parse(line) {
            Ok(msg) => route(&shared, &stdin, msg).await,
            Err(e) => {
                tracing::warn!(server = %shared.server, error = %e, "server wrote a line that is not JSON-RPC");
            }
        }
    }
    shared.alive.store(false, Ordering::Relaxed);
    // Its stdout closed: it is likely exiting. Its exit status may say why (a limit of its
    // sandbox), for the calls' errors; a process that only closed stdout is not waited for.
    let _ = tokio::time::timeout(EXIT_AFTER_EOF, exited.wait_for(|e| *e)).await;
    shared.fail_all(shared.crashed());
}

/// How long calls in flight wait, once the process's stdout closed, for its exit status.
const EXIT_AFTER_EOF: Duration = Duration::from_millis(200);

/// Where one message from the server goes.
async fn route(shared: &Shared, stdin: &mpsc::Sender<Vec<u8>>, msg: Message) {
    let Some(msg) = to_listen(shared, msg) else {
        return;
    };
    match msg {
        Message::Response { id, outcome } => {
            let key = match &id {
                RequestId::Num(n) => u64::try_from(*n).ok(),
                RequestId::Str(_) => None,
            };
            let pending = key.and_then(|k| {
                shared
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&k)
            });
            match pending {
                Some(p) => {
                    // The call's event sink goes first, so its reader finds the channel closed
                    // as it takes the answer instead of waiting for the sender to go.
                    let Pending { reply, events, .. } = p;
                    drop(events);
                    let _ = reply.send(outcome.map_err(CallError::Answered));
                }
                None => {
                    tracing::debug!(server = %shared.server, %id, "answer to no pending call (cancelled or timed out)")
                }
            }
        }
        Message::Notification { method, mut params } if method == "notifications/progress" => {
            let call = params
                .as_ref()
                .and_then(|p| p.get("progressToken"))
                .and_then(Value::as_str)
                .and_then(|t| t.strip_prefix("mcpd-p-"))
                .and_then(|n| n.parse::<u64>().ok());
            let target = call.and_then(|id| {
                let pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
                let p = pending.get(&id)?;
                Some((p.events.clone()?, p.progress_token.clone()?))
            });
            if let Some((events, token)) = target {
                if let Some(p) = params.as_mut().and_then(Value::as_object_mut) {
                    p.insert("progressToken".into(), token);
                }
                let _ =
                    events.try_send(CallEvent::Notify(Message::Notification { method, params }));
            }
        }
        Message::Notification { method, params } => {
            let for_call = method == "notifications/message";
            let msg = Message::Notification { method, params };
            if for_call {
                match listener(shared) {
                    Listener::One(events) => {
                        let _ = events.try_send(CallEvent::Notify(msg));
                    }
                    // A log line while several sessions' calls run could belong to any of
                    // them: it goes to this node's log, never to another session.
                    Listener::Ambiguous => {
                        tracing::info!(server = %shared.server, message = ?msg.to_value(), "server log during calls of several sessions (not relayed)");
                    }
                    Listener::None => {
                        let _ = shared.pool_events.try_send(PoolEvent::Notify(msg));
                    }
                }
                return;
            }
            let _ = shared.pool_events.try_send(PoolEvent::Notify(msg));
        }
        Message::Request { id, method, params } => {
            if method == "ping" {
                let _ = stdin.send(Message::result(id, json!({})).to_line()).await;
                return;
            }
            match listener(shared) {
                Listener::One(events) => {
                    let ev = CallEvent::Request {
                        method,
                        params,
                        responder: Responder::new(stdin.clone(), id.clone()),
                    };
                    if events.send(ev).await.is_err() {
                        let err = ErrorObject::new(
                            code::INTERNAL_ERROR,
                            "the client of this call is gone",
                        );
                        let _ = stdin.send(Message::error(id, err).to_line()).await;
                    }
                }
                Listener::Ambiguous => {
                    metrics::counter!("mcpd_pool_unattributable_requests_total", "server" => shared.server.clone()).increment(1);
                    let err = ErrorObject::new(
                        code::INTERNAL_ERROR,
                        format!(
                            "{method}: calls of several client sessions are in flight on this shared process, so the gateway cannot tell which client to ask; run this server with session_mode = dedicated"
                        ),
                    );
                    let _ = stdin.send(Message::error(id, err).to_line()).await;
                }
                Listener::None => {
                    let err = ErrorObject::new(
                        code::METHOD_NOT_FOUND,
                        format!("{method}: no client session is attached to this server process right now"),
                    );
                    let _ = stdin.send(Message::error(id, err).to_line()).await;
                }
            }
        }
    }
}

/// A future that never completes, for a `select!` branch not taken yet.
fn pending<'a, T: 'a>() -> futures_util::future::BoxFuture<'a, T> {
    Box::pin(std::future::pending())
}

/// Whether the server acknowledged the listen of `stream` (its first message), or refused
/// or ended it. The stream is dropped, and the listen cancelled, either way: the node holds
/// its own once the process is started (`super::listen`).
async fn taken(mut stream: Stream) -> bool {
    use futures_util::StreamExt;
    matches!(
        stream.next().await,
        Some(Message::Notification { method, .. }) if method == "notifications/subscriptions/acknowledged"
    )
}

/// A `subscriptions/listen` open on a process, for as long as its stream is held: dropped,
/// it is forgotten (later messages marked with its id are dropped) and cancelled at the
/// server.
struct ListenOpen {
    shared: std::sync::Weak<Shared>,
    stdin: mpsc::Sender<Vec<u8>>,
    id: u64,
}

impl Drop for ListenOpen {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut listen = shared.listen.lock().unwrap_or_else(|p| p.into_inner());
        if listen.as_ref().is_some_and(|(open, _)| *open == self.id) {
            listen.take();
            let _ = self
                .stdin
                .try_send(crate::call::events::cancelled(self.id).to_line());
        }
    }
}

impl super::listen::Listens for Process {
    fn server(&self) -> &str {
        &self.shared.server
    }

    fn open(
        &self,
        notifications: Value,
    ) -> futures_util::future::BoxFuture<'_, Result<Stream, Listened>> {
        Box::pin(async move {
            let capabilities = match &self.speaks {
                Speaks::Stateless { capabilities, .. } => capabilities,
                Speaks::Sessions => &Value::Null,
            };
            self.open_listen(notifications, capabilities)
                .await
                .map_err(|_| Listened::Refused)
        })
    }
}

/// Takes the messages of the `subscriptions/listen` open on the process (its notifications,
/// marked with its id, and its answer, which ends it) to its stream; the rest are given back.
/// A notification marked for a listen no longer open is dropped.
fn to_listen(shared: &Shared, msg: Message) -> Option<Message> {
    let listen_id = |id: &RequestId| match id {
        RequestId::Num(n) => u64::try_from(*n).ok(),
        RequestId::Str(_) => None,
    };
    let marked = match &msg {
        Message::Notification { params, .. } => match params
            .as_ref()
            .map(|p| &p["_meta"][super::listen::META_SUB])
        {
            Some(Value::Null) | None => return Some(msg),
            Some(id) => id.as_u64(),
        },
        Message::Response { id, .. } => listen_id(id),
        Message::Request { .. } => return Some(msg),
    };
    let mut listen = shared.listen.lock().unwrap_or_else(|p| p.into_inner());
    let ours = matches!((&*listen, marked), (Some((open, _)), Some(id)) if *open == id);
    match (&msg, ours) {
        (Message::Response { .. }, false) => Some(msg),
        (Message::Response { .. }, true) => {
            if let Some((_, stream)) = listen.take() {
                let _ = stream.try_send(msg);
            }
            None
        }
        (_, true) => {
            if let Some((_, stream)) = listen.as_ref() {
                if stream.try_send(msg).is_err() {
                    metrics::counter!("mcpd_pool_listen_dropped_total", "server" => shared.server.clone())
                        .increment(1);
                    tracing::warn!(server = %shared.server, "listen stream behind; a notification dropped");
                }
            }
            None
        }
        (_, false) => None,
    }
}

/// Who a message the server started (a request, a log line) can go to.
enum Listener {
    /// The oldest call in flight, when every call in flight belongs to one session.
    One(EventSink),
    /// Calls of several sessions (or several session-less calls) are in flight: it cannot be
    /// attributed without risking showing one client another's data.
    Ambiguous,
    None,
}

fn listener(shared: &Shared) -> Listener {
    let pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
    let listening: Vec<&Pending> = pending.values().filter(|p| p.events.is_some()).collect();
    let Some(first) = listening.first() else {
        return Listener::None;
    };
    let one_owner = listening.len() == 1
        || (first.owner.is_some() && listening.iter().all(|p| p.owner == first.owner));
    match (&first.events, one_owner) {
        (Some(e), true) => Listener::One(e.clone()),
        _ => Listener::Ambiguous,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_polled_answer_arrives_whether_it_comes_during_the_poll_or_after_it() {
        let spin = Duration::from_micros(500);
        // During the poll: sent by a task that runs while the waiter yields.
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move { tx.send(1).unwrap() });
        assert_eq!(wait_answer(rx, spin).await, Some(1));
        // After it: the waiter stops polling and sleeps until the answer comes.
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(2).unwrap()
        });
        assert_eq!(wait_answer(rx, spin).await, Some(2));
        // No answer ever: the sender's end is reported, not waited on.
        let (tx, rx) = oneshot::channel::<u8>();
        drop(tx);
        assert_eq!(wait_answer(rx, spin).await, None);
    }
}
