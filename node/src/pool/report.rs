//! What a process slot tells the operator who asks why a server is failing
//! (`mcpctl server status`): the last failure (a start error such as `spawning "uvx": No such
//! file or directory`, an exit status, a missed health ping), when it happened, how many times
//! the slot restarted, and the last lines its processes wrote to stderr. The same facts are in
//! the node's log; this puts them where the operator looks, on every node's answer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use mcpcp_proto::api::ProcessReport;

/// Lines of stderr kept per slot.
pub const STDERR_LINES: usize = 20;
/// Longest stderr line kept (bytes); longer ones are cut.
pub const STDERR_LINE_BYTES: usize = 512;

/// One slot's report, shared by its supervisor and the processes it starts. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct SlotReport(Arc<Mutex<Inner>>);

#[derive(Debug, Default)]
struct Inner {
    pid: Option<u32>,
    transport: Option<&'static str>,
    protocol: Option<String>,
    restarts: u64,
    last_error: Option<(u64, String)>,
    last_exit: Option<String>,
    stderr: VecDeque<String>,
}

impl SlotReport {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A line the process wrote to stderr.
    pub fn stderr_line(&self, line: &str) {
        let mut cut = line.len().min(STDERR_LINE_BYTES);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut inner = self.lock();
        if inner.stderr.len() == STDERR_LINES {
            inner.stderr.pop_front();
        }
        inner.stderr.push_back(line[..cut].to_string());
    }

    /// A process of the slot is ready, speaking revision `protocol` with its server.
    pub fn started(&self, pid: Option<u32>, transport: &'static str, protocol: Option<&str>) {
        let mut inner = self.lock();
        inner.pid = pid;
        inner.transport = Some(transport);
        inner.protocol = protocol.map(String::from);
    }

    /// The slot's process failed to start, or was lost: why.
    pub fn failed(&self, why: impl Into<String>) {
        let mut inner = self.lock();
        inner.pid = None;
        inner.last_error = Some((crate::registry::now_unix(), why.into()));
    }

    /// A process of the slot exited with `status`.
    pub fn exited(&self, status: &str) {
        let mut inner = self.lock();
        inner.pid = None;
        inner.last_exit = Some(status.to_string());
    }

    /// The slot starts another process.
    pub fn restarting(&self) {
        self.lock().restarts += 1;
    }

    /// What the slot reports, in state `state`.
    pub fn snapshot(&self, state: &str) -> ProcessReport {
        let inner = self.lock();
        ProcessReport {
            state: state.to_string(),
            pid: inner.pid,
            restarts: inner.restarts,
            last_error: inner.last_error.as_ref().map(|(_, e)| e.clone()),
            last_error_at: inner.last_error.as_ref().map(|(t, _)| *t),
            last_exit: inner.last_exit.clone(),
            stderr: inner.stderr.iter().cloned().collect(),
            transport: inner.transport.map(String::from),
            protocol: inner.protocol.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_cut_to_size_and_the_last_failure() {
        let r = SlotReport::default();
        for i in 0..(STDERR_LINES + 5) {
            r.stderr_line(&format!("line {i}"));
        }
        r.stderr_line(&"é".repeat(STDERR_LINE_BYTES));
        r.exited("exit status: 3");
        r.failed("spawning \"uvx\": No such file or directory (os error 2)");
        r.restarting();
        let s = r.snapshot("crash_loop");
        assert_eq!(s.stderr.len(), STDERR_LINES);
        assert_eq!(s.stderr[0], "line 6");
        assert!(s.stderr.last().expect("a line").len() <= STDERR_LINE_BYTES);
        assert_eq!(s.restarts, 1);
        assert!(s.last_error.expect("an error").contains("uvx"));
        assert_eq!(s.state, "crash_loop");
        assert_eq!(s.last_exit.as_deref(), Some("exit status: 3"));
    }
}
