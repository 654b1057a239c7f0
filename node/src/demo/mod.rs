//! `mcpd demo-server`: a small MCP server on stdin/stdout, so the dev cluster, the end-to-end
//! tests, the benchmarks and the chaos harness have a real stdio server to register and call
//! without depending on anything outside this repository.
//!
//! The wire is newline-delimited JSON-RPC 2.0: one JSON object per line each way. Logs go to
//! stderr only. Requests are served concurrently: each runs in its own task (so a slow `sleep`
//! does not hold up an `echo`), and every outgoing line goes through one writer thread, so lines
//! never interleave. `notifications/cancelled` aborts the task of the request it names, which
//! then gets no answer.
//!
//! - [`tools`], [`resources`], [`prompts`]: what the server offers, including what the MCP
//!   conformance suite's server scenarios call (see `CONFORMANCE.md` here).
//! - [`session`]: the state request tasks share; [`rpc`]: JSON-RPC framing and errors;
//!   [`content`]: MCP content blocks and fixtures.
//!
//! Environment: `MCPD_DEMO_LEDGER` names the file `counter_increment` appends to; `RUST_LOG`
//! sets the stderr log filter (default `info`).

mod asks;
mod content;
mod prompts;
mod resources;
mod round;
mod rpc;
mod session;
mod tools;

use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinError, JoinSet};

use round::{Round, STATELESS_VERSION};
use rpc::{Incoming, Params, RpcError};
use session::Session;

/// Session revisions this server speaks; a client asking for another gets [`LATEST_VERSION`].
/// It speaks 2026-07-28 too ([`round`]): each request that says so in its `_meta`.
const SUPPORTED_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];
const LATEST_VERSION: &str = "2025-11-25";
/// After stdin closes, how long requests still running get to finish and be answered.
const DRAIN: Duration = Duration::from_secs(5);
/// Lines read ahead of the dispatcher before the reader waits.
const READ_AHEAD: usize = 256;

/// Runs the demo server until stdin closes (or the `crash` tool is called).
pub async fn run() -> anyhow::Result<()> {
    init_logging();
    let ledger = std::env::var_os("MCPD_DEMO_LEDGER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    tracing::info!(pid = std::process::id(), ledger = ?ledger, "demo MCP server on stdio");
    let (line_tx, line_rx) = mpsc::channel(READ_AHEAD);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    // Plain threads for stdio: blocking reads and writes stay off the runtime's workers.
    std::thread::Builder::new()
        .name("demo-stdin".into())
        .spawn(move || read_stdin(&line_tx))?;
    let writer = std::thread::Builder::new()
        .name("demo-stdout".into())
        .spawn(move || write_stdout(out_rx))?;
    serve(line_rx, out_tx, ledger).await;
    // Every sender is gone now, so the writer empties its queue and ends.
    if writer.join().is_err() {
        anyhow::bail!("the stdout writer panicked");
    }
    tracing::info!("stdin closed; demo MCP server exiting");
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Fails only if a subscriber is already installed, which is then used instead.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Sends each line of stdin (without its line ending) until EOF.
fn read_stdin(lines: &mpsc::Sender<Vec<u8>>) {
    let mut stdin = std::io::stdin().lock();
    loop {
        let mut line = Vec::new();
        match stdin.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {
                while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    line.pop();
                }
                if lines.blocking_send(line).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!("reading stdin: {e}");
                return;
            }
        }
    }
}

/// Writes each message as one line, flushing whenever the queue is momentarily empty.
fn write_stdout(mut messages: mpsc::UnboundedReceiver<Value>) {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    while let Some(mut msg) = messages.blocking_recv() {
        loop {
            // serde_json escapes control characters inside strings, so a message is one line.
            let written = serde_json::to_writer(&mut out, &msg)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            if let Err(e) = written {
                stdout_gone(&e);
            }
            match messages.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        if let Err(e) = out.flush() {
            stdout_gone(&e);
        }
    }
}

/// Nobody reads our answers any more: nothing useful is left to do.
fn stdout_gone(e: &std::io::Error) -> ! {
    tracing::error!("writing stdout: {e}; exiting");
    std::process::exit(1)
}

/// Serves the lines from `lines` until it closes, writing every outgoing message to `out`.
/// Then gives the requests still running [`DRAIN`] to finish.
async fn serve(
    mut lines: mpsc::Receiver<Vec<u8>>,
    out: mpsc::UnboundedSender<Value>,
    ledger: Option<PathBuf>,
) {
    let session = Arc::new(Session::new(out, ledger));
    let mut inflight = InFlight::default();
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(line) => on_line(&session, &mut inflight, &line),
                None => break,
            },
            Some(done) = inflight.tasks.join_next_with_id() => inflight.reap(&session, done),
        }
    }
    // No answer to a request of ours can arrive any more: the tools waiting for one give up.
    session.fail_pending();
    let drained = tokio::time::timeout(DRAIN, async {
        while let Some(done) = inflight.tasks.join_next_with_id().await {
            inflight.reap(&session, done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "{} request(s) still running {}s after stdin closed; abandoned unanswered",
            inflight.tasks.len(),
            DRAIN.as_secs()
        );
        inflight.tasks.shutdown().await;
    }
}

/// The request tasks running, by task and by request id (its JSON text, so `1` and `"1"` differ).
#[derive(Default)]
struct InFlight {
    tasks: JoinSet<()>,
    by_request: HashMap<String, AbortHandle>,
    by_task: HashMap<tokio::task::Id, String>,
}

impl InFlight {
    fn start(&mut self, session: &Arc<Session>, id: Value, method: String, params: Value) {
        let key = id.to_string();
        let session = session.clone();
        let handle = self.tasks.spawn(async move {
            let outcome = handle_request(&session, &id, &method, &params).await;
            if let Err(e) = &outcome {
                tracing::debug!(%method, %id, code = e.code, "{}", e.message);
            }
            session.send(rpc::response(&id, outcome));
        });
        self.by_task.insert(handle.id(), key.clone());
        // A client reusing an id still in flight: both run; a cancel reaches the newest.
        self.by_request.insert(key, handle);
    }

    fn cancel(&mut self, request_id: &Value) {
        match self.by_request.remove(&request_id.to_string()) {
            Some(task) => {
                tracing::debug!(%request_id, "request cancelled by the client");
                task.abort();
            }
            None => tracing::debug!(%request_id, "cancel for a request not in flight"),
        }
    }

    /// Forgets a finished task. A task that panicked is answered with an internal error.
    fn reap(&mut self, session: &Session, done: Result<(tokio::task::Id, ()), JoinError>) {
        let task = match &done {
            Ok((task, ())) => *task,
            Err(e) => e.id(),
        };
        let Some(key) = self.by_task.remove(&task) else {
            return;
        };
        if self.by_request.get(&key).is_some_and(|h| h.id() == task) {
            self.by_request.remove(&key);
        }
        if let Err(e) = done {
            if e.is_panic() {
                tracing::error!(request_id = %key, "request task panicked");
                let id = serde_json::from_str(&key).unwrap_or(Value::Null);
                session.send(rpc::response(
                    &id,
                    Err(RpcError::internal("the handler panicked")),
                ));
            }
        }
    }
}

fn on_line(session: &Arc<Session>, inflight: &mut InFlight, line: &[u8]) {
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    match rpc::parse_line(line) {
        Err((id, e)) => {
            tracing::warn!("bad line from the client: {}", e.message);
            session.send(rpc::response(&id, Err(e)));
        }
        // The handshake is answered in the order it came (a client that sends `server/discover`
        // and `initialize` together goes by the first answer), the rest each in its own task.
        Ok(Incoming::Request { id, method, .. }) if method == "server/discover" => {
            session.send(rpc::response(&id, Ok(discover())));
        }
        Ok(Incoming::Request { id, method, params }) if method == "initialize" => {
            session.send(rpc::response(&id, initialize(session, &params)));
        }
        Ok(Incoming::Request { id, method, params }) => inflight.start(session, id, method, params),
        Ok(Incoming::Notification { method, params }) => match method.as_str() {
            "notifications/cancelled" => match params.get("requestId") {
                Some(id) => inflight.cancel(id),
                None => tracing::warn!("notifications/cancelled without requestId"),
            },
            "notifications/initialized" => tracing::debug!("client initialized"),
            other => tracing::debug!(method = other, "notification ignored"),
        },
        Ok(Incoming::Response { id, outcome }) => {
            if !session.resolve(&id, outcome) {
                tracing::warn!(%id, "answer to no request of ours in flight");
            }
        }
    }
}

async fn handle_request(
    session: &Session,
    id: &Value,
    method: &str,
    params: &Value,
) -> Result<Value, RpcError> {
    if method == "subscriptions/listen" {
        return listen(session, id, params).await;
    }
    match Round::of(params)? {
        Some(round) => round.run(handle(session, id, method, params)).await,
        None => handle(session, id, method, params).await,
    }
}

/// A request of either revision (in 2026-07-28, inside its [`Round`]).
async fn handle(
    session: &Session,
    id: &Value,
    method: &str,
    params: &Value,
) -> Result<Value, RpcError> {
    match method {
        "ping" => Ok(json!({})),
        "tools/list" => Ok(tools::list()),
        "tools/call" => tools::call(session, id, params).await,
        "resources/list" => Ok(resources::list()),
        "resources/templates/list" => Ok(resources::templates()),
        "resources/read" => resources::read(session, params),
        "resources/subscribe" => resources::subscribe(session, params),
        "resources/unsubscribe" => resources::unsubscribe(session, params),
        "prompts/list" => Ok(prompts::list()),
        "prompts/get" if params["name"] == asks::PROMPT => asks::prompt(session).await,
        "prompts/get" => prompts::get(params),
        "completion/complete" => prompts::complete(params),
        "logging/setLevel" => {
            let level = Params::new(params, "").str("level")?;
            if !session.set_log_level(level) {
                return Err(RpcError::invalid_params(
                    "level",
                    format!("must be one of {}", session::LOG_LEVELS.join(", ")),
                ));
            }
            Ok(json!({}))
        }
        other => Err(RpcError::method_not_found(other)),
    }
}

/// What the server offers, in either revision.
fn capabilities() -> Value {
    json!({
        "tools": { "listChanged": true },
        "resources": { "subscribe": true, "listChanged": true },
        "prompts": { "listChanged": true },
        "logging": {},
        "completions": {},
    })
}

const INSTRUCTIONS: &str = "Demo MCP server of the mcpd control plane: echo, add, sleep, fail, \
                            crash, counter_increment, and the MCP conformance suite's test tools.";

/// `server/discover` (2026-07-28): every revision it speaks, newest first, and what it offers.
fn discover() -> Value {
    let mut versions = vec![STATELESS_VERSION];
    versions.extend(SUPPORTED_VERSIONS);
    json!({
        "supportedVersions": versions,
        "capabilities": capabilities(),
        "instructions": INSTRUCTIONS,
        "_meta": { "io.modelcontextprotocol/serverInfo": server_info() },
        "resultType": "complete",
    })
}

fn server_info() -> Value {
    json!({ "name": "mcpd-demo", "version": env!("CARGO_PKG_VERSION") })
}

/// `subscriptions/listen` (2026-07-28): acknowledged, then held until the client cancels it;
/// the list changes and resource updates it asked for go out marked with its id.
async fn listen(session: &Session, id: &Value, params: &Value) -> Result<Value, RpcError> {
    if !params["notifications"].is_object() {
        return Err(RpcError::invalid_params(
            "notifications",
            "required (an object)",
        ));
    }
    struct Open<'a>(&'a Session, &'a Value);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            self.0.close_listen(self.1);
        }
    }
    let asked = &params["notifications"];
    let lists = session::LISTS
        .iter()
        .filter(|(key, _)| asked[*key] == true)
        .map(|(_, list)| *list)
        .collect();
    // Only resources it has (as `resources/subscribe` refuses any other).
    let uris = asked["resourceSubscriptions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter(|u| resources::exists(u))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let granted = session.open_listen(id, lists, uris);
    let _open = Open(session, id);
    tracing::debug!(%id, %granted, "subscriptions/listen open");
    // Held until cancelled (the task is aborted) or stdin closes (then it ends, answered).
    session.closed().await;
    Ok(json!({}))
}

fn initialize(session: &Session, params: &Value) -> Result<Value, RpcError> {
    let p = Params::new(params, "");
    let asked = p.str("protocolVersion")?;
    let client_capabilities = p.opt_object("capabilities")?.cloned().unwrap_or(json!({}));
    let client = p.opt_object("clientInfo")?.cloned().unwrap_or(Value::Null);
    let version = SUPPORTED_VERSIONS
        .into_iter()
        .find(|v| *v == asked)
        .unwrap_or(LATEST_VERSION);
    tracing::info!(%client, capabilities = %client_capabilities, asked, version, "initialize");
    session.set_client_capabilities(client_capabilities);
    Ok(json!({
        "protocolVersion": version,
        "capabilities": capabilities(),
        "serverInfo": server_info(),
        "instructions": INSTRUCTIONS,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server fed through channels, as the stdio threads would.
    struct Harness {
        input: Option<mpsc::Sender<Vec<u8>>>,
        output: mpsc::UnboundedReceiver<Value>,
        server: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        fn start() -> Self {
            let (input, lines) = mpsc::channel(16);
            let (out, output) = mpsc::unbounded_channel();
            let server = tokio::spawn(serve(lines, out, None));
            Self {
                input: Some(input),
                output,
                server,
            }
        }

        async fn send(&self, line: &str) {
            if let Some(input) = &self.input {
                assert!(input.send(line.as_bytes().to_vec()).await.is_ok());
            }
        }

        async fn recv(&mut self) -> Value {
            let got = tokio::time::timeout(Duration::from_secs(5), self.output.recv()).await;
            got.ok().flatten().unwrap_or(Value::Null)
        }

        /// Closes stdin and returns everything written until the server ended.
        async fn finish(mut self) -> Vec<Value> {
            self.input = None;
            let ended = tokio::time::timeout(Duration::from_secs(5), &mut self.server).await;
            assert!(ended.is_ok(), "server did not end after stdin closed");
            let mut rest = Vec::new();
            while let Ok(msg) = self.output.try_recv() {
                rest.push(msg);
            }
            rest
        }
    }

    /// Sends `lines`, closes stdin, returns all output.
    async fn exchange(lines: &[&str]) -> Vec<Value> {
        let h = Harness::start();
        for line in lines {
            h.send(line).await;
        }
        h.finish().await
    }

    #[tokio::test]
    async fn initialize_negotiates_the_version() {
        let out = exchange(&[
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","id":2,"method":"initialize","params":{"protocolVersion":"1999-01-01"}}"#,
        ])
        .await;
        assert_eq!(out.len(), 2, "{out:?}");
        let by_id = |id: i64| {
            out.iter()
                .find(|m| m["id"] == id)
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(by_id(1)["result"]["protocolVersion"], "2025-06-18");
        assert_eq!(by_id(1)["result"]["serverInfo"]["name"], "mcpd-demo");
        assert_eq!(
            by_id(1)["result"]["capabilities"]["resources"]["subscribe"],
            true
        );
        assert_eq!(by_id(2)["result"]["protocolVersion"], LATEST_VERSION);
    }

    #[tokio::test]
    async fn protocol_errors() {
        let out = exchange(&[
            "{oops",
            "",
            r#"{"jsonrpc":"2.0","id":"u","method":"tools/frobnicate"}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"logging/setLevel","params":{"level":"loud"}}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"ping"}"#,
        ])
        .await;
        assert_eq!(out.len(), 4, "{out:?}");
        let find = |id: Value| {
            out.iter()
                .find(|m| m["id"] == id)
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(find(Value::Null)["error"]["code"], -32700);
        let unknown = find(json!("u"));
        assert_eq!(unknown["error"]["code"], -32601);
        assert!(unknown["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tools/frobnicate")));
        assert_eq!(find(json!(3))["error"]["code"], -32602);
        assert_eq!(find(json!(3))["error"]["data"]["field"], "level");
        assert_eq!(
            find(json!(4)),
            json!({"jsonrpc": "2.0", "id": 4, "result": {}})
        );
    }

    #[tokio::test]
    async fn a_slow_request_does_not_block_others() {
        let mut h = Harness::start();
        h.send(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"sleep","arguments":{"ms":300}}}"#).await;
        h.send(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"message":"fast"}}}"#).await;
        let first = h.recv().await;
        assert_eq!(first["id"], 2);
        assert_eq!(first["result"]["content"][0]["text"], "fast");
        let second = h.recv().await;
        assert_eq!(second["id"], 1);
        assert_eq!(second["result"]["content"][0]["text"], "slept 300 ms");
        assert!(h.finish().await.is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_request_gets_no_answer() {
        let started = std::time::Instant::now();
        let out = exchange(&[
            r#"{"jsonrpc":"2.0","id":"slow","method":"tools/call","params":{"name":"sleep","arguments":{"ms":60000}}}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"slow","reason":"test"}}"#,
            r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#,
        ])
        .await;
        assert_eq!(out, [json!({"jsonrpc": "2.0", "id": 2, "result": {}})]);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn sampling_round_trips_through_the_client() {
        let mut h = Harness::start();
        h.send(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"sampling":{}}}}"#).await;
        assert_eq!(h.recv().await["id"], 1);
        h.send(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"test_sampling","arguments":{"prompt":"hi"}}}"#).await;
        let ask = h.recv().await;
        assert_eq!(ask["method"], "sampling/createMessage");
        assert_eq!(ask["params"]["messages"][0]["content"]["text"], "hi");
        let answer = json!({
            "jsonrpc": "2.0",
            "id": ask["id"],
            "result": {"role": "assistant", "content": {"type": "text", "text": "hello"}, "model": "m"},
        });
        h.send(&answer.to_string()).await;
        let result = h.recv().await;
        assert_eq!(result["id"], 2);
        assert_eq!(
            result["result"]["content"][0]["text"],
            "LLM response: hello"
        );
        assert!(h.finish().await.is_empty());
    }

    #[tokio::test]
    async fn closing_stdin_fails_waiting_client_requests() {
        let mut h = Harness::start();
        h.send(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"elicitation":{}}}}"#).await;
        assert_eq!(h.recv().await["id"], 1);
        h.send(r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"test_elicitation","arguments":{"message":"m"}}}"#).await;
        assert_eq!(h.recv().await["method"], "elicitation/create");
        let rest = h.finish().await;
        assert_eq!(rest.len(), 1, "{rest:?}");
        assert_eq!(rest[0]["id"], 2);
        assert_eq!(rest[0]["result"]["isError"], true);
    }

    #[tokio::test]
    async fn in_2026_07_28_questions_are_results_and_list_changes_reach_a_listen() {
        let mut h = Harness::start();
        let meta = json!({
            "io.modelcontextprotocol/protocolVersion": STATELESS_VERSION,
            "io.modelcontextprotocol/clientCapabilities": { "elicitation": {} },
        });
        let request = |id: i64, method: &str, mut params: Value| {
            params["_meta"] = meta.clone();
            json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string()
        };
        h.send(&request(1, "server/discover", json!({}))).await;
        let found = h.recv().await;
        assert_eq!(found["result"]["supportedVersions"][0], STATELESS_VERSION);

        h.send(&request(
            2,
            "subscriptions/listen",
            json!({ "notifications": { "toolsListChanged": true } }),
        ))
        .await;
        let ack = h.recv().await;
        assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
        assert_eq!(
            ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
            2
        );
        assert_eq!(ack["params"]["notifications"]["promptsListChanged"], false);
        let trigger = json!({ "name": "test_trigger_tool_change" });
        h.send(&request(3, "tools/call", trigger)).await;
        let heard = h.recv().await;
        assert_eq!(heard["method"], "notifications/tools/list_changed");
        assert_eq!(
            heard["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
            2
        );
        assert_eq!(h.recv().await["result"]["resultType"], "complete");

        // Two questions, one round each: the second comes with the first's answer.
        let tool = json!({ "name": "test_input_required_result_multi_round" });
        h.send(&request(4, "tools/call", tool.clone())).await;
        let first = h.recv().await["result"].clone();
        assert_eq!(first["resultType"], "input_required");
        assert!(first["inputRequests"]["step1"].is_object(), "{first}");
        let answer =
            |field: &str, value: &str| json!({ "action": "accept", "content": { field: value } });
        let mut again = tool.clone();
        again["inputResponses"] = json!({ "step1": answer("name", "Ada") });
        again["requestState"] = first["requestState"].clone();
        h.send(&request(5, "tools/call", again)).await;
        let second = h.recv().await["result"].clone();
        assert!(second["inputRequests"]["step2"].is_object(), "{second}");
        let mut last = tool;
        last["inputResponses"] = json!({ "step2": answer("color", "green") });
        last["requestState"] = second["requestState"].clone();
        h.send(&request(6, "tools/call", last)).await;
        let done = h.recv().await["result"].clone();
        assert_eq!(done["content"][0]["text"], "Ada likes green", "{done}");

        // A request that did not declare sampling is refused for the tool that needs it.
        h.send(&request(
            7,
            "tools/call",
            json!({ "name": "test_missing_capability" }),
        ))
        .await;
        let refused = h.recv().await;
        assert_eq!(refused["error"]["code"], -32021, "{refused}");
        assert_eq!(
            refused["error"]["data"]["requiredCapabilities"],
            json!({ "sampling": {} })
        );
        // Cancelled, the listen hears nothing more; with none open, a change goes out as is.
        h.send(r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":2}}"#)
            .await;
        h.send(r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"test_trigger_tool_change"}}"#).await;
        let plain = h.recv().await;
        assert_eq!(plain["method"], "notifications/tools/list_changed");
        assert!(plain["params"]["_meta"].is_null(), "{plain}");
        assert_eq!(h.recv().await["id"], 8);
        assert!(h.finish().await.is_empty());
    }

    #[tokio::test]
    async fn closing_stdin_ends_an_open_listen_at_once() {
        let mut h = Harness::start();
        h.send(r#"{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{"notifications":{"toolsListChanged":true}}}"#).await;
        assert_eq!(
            h.recv().await["method"],
            "notifications/subscriptions/acknowledged"
        );
        let started = std::time::Instant::now();
        let rest = h.finish().await;
        assert!(started.elapsed() < DRAIN / 2, "{:?}", started.elapsed());
        assert_eq!(rest, [json!({"jsonrpc": "2.0", "id": 1, "result": {}})]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discover_and_initialize_sent_together_are_answered_in_order() {
        let mut h = Harness::start();
        for round in 0..50 {
            let (d, i) = (2 * round, 2 * round + 1);
            h.send(&format!(
                r#"{{"jsonrpc":"2.0","id":{d},"method":"server/discover"}}"#
            ))
            .await;
            h.send(&format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"initialize","params":{{"protocolVersion":"2025-11-25"}}}}"#)).await;
            assert_eq!(h.recv().await["id"], d);
            assert_eq!(h.recv().await["id"], i);
        }
        assert!(h.finish().await.is_empty());
    }
}
