//! A server process's stdout, read line by line by whoever polls it: its reader task, or the
//! one call this node waits on while it polls for its answer (see `process::wait_answer`).
//!
//! Letting that call read the pipe itself saves a hop per call at low load: without it the
//! server's answer wakes the reader task, which hands the answer to the waiting call, and with
//! two tasks ready at once the runtime wakes a second worker thread to share them. The reader
//! task stays the owner: the call reads only while the task is idle, takes only answers
//! (`Response`s) and leaves anything else, and everything after it, to the task, in order.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use mcpcp_proto::mcp::Message;
use tokio::io::{AsyncBufRead, BufReader};
use tokio::process::ChildStdout;

/// Longest line accepted from a server (a defence against a runaway process).
pub const MAX_LINE: usize = 16 << 20;

/// What a poll of the pipe gave.
pub enum Read {
    /// One line, with its newline.
    Line(Vec<u8>),
    /// The pipe ended: closed (`None`), failed or overran [`MAX_LINE`] (the reason).
    End(Option<String>),
}

/// The pipe, the line being assembled, and the messages a call read but left to the task.
pub struct Lines {
    out: BufReader<ChildStdout>,
    line: Vec<u8>,
    /// Read by a waiting call and left, in order, to the reader task.
    pub left: VecDeque<Message>,
    /// Set once the pipe has ended (and why); every later poll says so again.
    ended: Option<Option<String>>,
}

impl Lines {
    pub fn new(out: ChildStdout) -> Lines {
        Lines {
            out: BufReader::new(out),
            line: Vec::new(),
            left: VecDeque::new(),
            ended: None,
        }
    }

    /// The next whole line, registering `cx` for wake-up when there is none yet. A line cut
    /// short by the end of the pipe is dropped.
    pub fn poll_line(&mut self, cx: &mut Context<'_>) -> Poll<Read> {
        loop {
            if let Some(reason) = &self.ended {
                return Poll::Ready(Read::End(reason.clone()));
            }
            let available = match Pin::new(&mut self.out).poll_fill_buf(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    self.ended = Some(Some(e.to_string()));
                    continue;
                }
                Poll::Ready(Ok(b)) => b,
            };
            if available.is_empty() {
                self.ended = Some(None);
                continue;
            }
            let (take, whole) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            self.line.extend_from_slice(&available[..take]);
            Pin::new(&mut self.out).consume(take);
            if self.line.len() > MAX_LINE {
                self.line = Vec::new();
                self.ended = Some(Some(format!("wrote a line over {MAX_LINE} bytes")));
                continue;
            }
            if whole {
                return Poll::Ready(Read::Line(std::mem::take(&mut self.line)));
            }
        }
    }
}

/// The pipe as shared by the reader task and a waiting call.
pub struct Stdout {
    /// The server's name, for the log.
    server: String,
    lines: Mutex<Lines>,
    /// The reader task, to wake when a call stops reading (the pipe wakes only the last task
    /// that polled it).
    task: Mutex<Option<Waker>>,
    /// Set while the reader task routes a message: a call must not read past it.
    routing: AtomicBool,
}

/// What the reader task gets next.
pub enum Next {
    /// A message a call read and left to it.
    Left(Message),
    Read(Read),
}

impl Stdout {
    pub fn new(server: &str, out: ChildStdout) -> Stdout {
        Stdout {
            server: server.to_owned(),
            lines: Mutex::new(Lines::new(out)),
            task: Mutex::new(None),
            routing: AtomicBool::new(false),
        }
    }

    /// The reader task's next message or line. It must call [`Stdout::routed`] once it has
    /// dealt with it.
    pub async fn next(&self) -> Next {
        std::future::poll_fn(|cx| {
            {
                let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
                if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *task = Some(cx.waker().clone());
                }
            }
            let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            let next = match lines.left.pop_front() {
                Some(msg) => Poll::Ready(Next::Left(msg)),
                None => lines.poll_line(cx).map(Next::Read),
            };
            if next.is_ready() {
                self.routing.store(true, Ordering::Release);
            }
            next
        })
        .await
    }

    /// The reader task is done with what [`Stdout::next`] gave it.
    pub fn routed(&self) {
        self.routing.store(false, Ordering::Release);
    }

    /// For a waiting call: reads what the pipe holds while the reader task is idle, gives each
    /// answer to `deliver` and leaves the first other message (and the rest) to the task. Never
    /// blocks.
    pub fn read_answers(&self, cx: &mut Context<'_>, mut deliver: impl FnMut(Message)) {
        if self.routing.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut lines) = self.lines.try_lock() else {
            return;
        };
        while lines.left.is_empty() {
            let Poll::Ready(Read::Line(line)) = lines.poll_line(cx) else {
                // Nothing yet, or the end, which is the task's to handle.
                return;
            };
            match parse(&self.server, &line) {
                Some(msg @ Message::Response { .. }) => deliver(msg),
                Some(msg) => lines.left.push_back(msg),
                None => {}
            }
        }
        drop(lines);
        // Something was left: the task takes over now, not when the call stops waiting.
        self.wake_task();
    }

    /// Wakes the reader task, so it polls the pipe again and is the one it wakes.
    pub fn wake_task(&self) {
        if let Some(w) = self.task.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            w.wake_by_ref();
        }
    }
}

/// A line as a message; `None` for a blank line, or one that is not JSON-RPC.
pub fn parse(server: &str, line: &[u8]) -> Option<Message> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return None;
    }
    match Message::parse(line) {
        Ok(msg) => Some(msg),
        Err(e) => {
            tracing::warn!(server, error = %e, "server wrote a line that is not JSON-RPC");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    use tokio::process::{Child, ChildStdin, Command};

    /// `cat`: what is written to its stdin comes back on its stdout.
    fn echo_process() -> (Child, ChildStdin, ChildStdout) {
        let mut child = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("cat runs");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        (child, stdin, stdout)
    }

    async fn next_line(lines: &mut Lines) -> Read {
        std::future::poll_fn(|cx| lines.poll_line(cx)).await
    }

    #[tokio::test]
    async fn lines_are_whole_however_the_pipe_cuts_them_and_the_end_is_sticky() {
        let (_child, mut stdin, stdout) = echo_process();
        let mut lines = Lines::new(stdout);
        stdin.write_all(b"{\"a\":").await.unwrap();
        stdin.flush().await.unwrap();
        stdin.write_all(b"1}\nsecond\n").await.unwrap();
        drop(stdin);
        assert!(matches!(next_line(&mut lines).await, Read::Line(l) if l == b"{\"a\":1}\n"));
        assert!(matches!(next_line(&mut lines).await, Read::Line(l) if l == b"second\n"));
        assert!(matches!(next_line(&mut lines).await, Read::End(None)));
        assert!(matches!(next_line(&mut lines).await, Read::End(None)));
    }

    #[tokio::test]
    async fn a_waiting_call_takes_answers_and_leaves_the_rest_in_order_to_the_task() {
        let (_child, mut stdin, stdout) = echo_process();
        let out = Stdout::new("cat", stdout);
        stdin
            .write_all(
                concat!(
                    "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n",
                    "not json\n",
                    "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}\n",
                    "{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{}}\n",
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        drop(stdin);
        // Poll until the call has read as far as it may: the first answer, then a
        // notification, which stops it.
        let mut delivered = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while out.lines.lock().unwrap().left.is_empty() {
            assert!(std::time::Instant::now() < deadline, "nothing was left");
            std::future::poll_fn(|cx| {
                out.read_answers(cx, |m| delivered.push(m));
                Poll::Ready(())
            })
            .await;
            tokio::task::yield_now().await;
        }
        assert_eq!(delivered.len(), 1);
        assert!(
            matches!(&delivered[0], Message::Response { id, .. } if *id == mcpcp_proto::mcp::RequestId::Num(1))
        );
        // The task gets the notification, then the answer after it, then the end.
        assert!(matches!(
            out.next().await,
            Next::Left(Message::Notification { .. })
        ));
        // While the task routes it, a call reads nothing (the answer after it would overtake it).
        std::future::poll_fn(|cx| {
            out.read_answers(cx, |m| delivered.push(m));
            Poll::Ready(())
        })
        .await;
        assert_eq!(delivered.len(), 1);
        out.routed();
        let Next::Read(Read::Line(line)) = out.next().await else {
            panic!("the answer after the notification is the task's")
        };
        assert!(matches!(
            parse("cat", &line),
            Some(Message::Response { .. })
        ));
        out.routed();
        assert!(matches!(out.next().await, Next::Read(Read::End(None))));
    }
}
