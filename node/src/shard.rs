//! The data plane's threads: one single-threaded runtime per shard (by default one per CPU).
//!
//! The HTTP listener's connections are dealt out to the shards, and so are the MCP server
//! processes of the pools (they take the shards in turn, slot after slot): a connection's requests, the calls
//! they make and the I/O of a process on the same shard all run on one thread, which polls one
//! I/O driver. At low load a call then costs no wake-up between threads: the thread that wrote
//! the request to the server is the one that reads its answer (see `pool::process`), and the
//! one that reads the client's next request (see `api::listener`). A multi-threaded runtime
//! cannot promise that: its idle workers take turns on the driver and wake each other to share
//! work. Under load the shards share it out by construction, and a call may still use any
//! process of its pool (a process on the caller's own shard is preferred when it is as idle).
//!
//! The main runtime keeps Raft, gRPC, the pools' supervisors and other background work.

use std::cell::Cell;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// The shard this thread runs, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The shard the calling thread runs (`None` on the main runtime's threads).
pub fn current() -> Option<usize> {
    CURRENT.with(|c| c.get())
}

#[derive(Debug, thiserror::Error)]
#[error("starting data-plane thread {index}: {source}")]
pub struct ShardError {
    index: usize,
    source: std::io::Error,
}

/// The running shards, owned by `main`: dropping them (once the main runtime is gone) stops
/// their runtimes, and the tasks on them, and joins their threads.
pub struct Shards {
    handles: ShardHandles,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    /// The index of each shard whose runtime has been dropped.
    stopped: std::sync::mpsc::Receiver<usize>,
}

/// Where to spawn on the shards; what the rest of the node holds (not the [`Shards`], so that
/// nothing a shard runs keeps them from stopping).
#[derive(Clone)]
pub struct ShardHandles(Arc<[Handle]>);

impl ShardHandles {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The runtime of shard `index mod n`.
    pub fn get(&self, index: usize) -> &Handle {
        &self.0[index % self.0.len()]
    }
}

impl Shards {
    /// Starts `n` shards (at least one).
    pub fn start(n: usize) -> Result<Shards, ShardError> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        for index in 0..n {
            let stopped_tx = stopped_tx.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("mcpd-shard-{index}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(rt) => {
                            CURRENT.with(|c| c.set(Some(index)));
                            let _ = ready_tx.send(Ok(rt.handle().clone()));
                            let _ = rt.block_on(stop_rx);
                            drop(rt);
                            let _ = stopped_tx.send(index);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|source| ShardError { index, source })?;
            let handle = ready_rx
                .recv()
                .map_err(|_| ShardError {
                    index,
                    source: std::io::Error::other("the thread ended before its runtime started"),
                })?
                .map_err(|source| ShardError { index, source })?;
            handles.push(handle);
            stops.push(stop_tx);
            threads.push(thread);
        }
        Ok(Shards {
            handles: ShardHandles(handles.into()),
            stops,
            threads,
            stopped,
        })
    }

    pub fn handles(&self) -> ShardHandles {
        self.handles.clone()
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        // Each thread drops its own runtime; a shard cannot join itself. A shard stuck in a
        // task that never yields (a bug) must not keep the process from exiting.
        if current().is_some() {
            return;
        }
        let deadline = std::time::Instant::now() + STOP_WITHIN;
        let mut stopped = vec![false; self.threads.len()];
        while stopped.contains(&false) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stopped.recv_timeout(left) {
                Ok(index) => stopped[index] = true,
                Err(_) => break,
            }
        }
        for (thread, stopped) in self.threads.drain(..).zip(stopped) {
            if stopped {
                let _ = thread.join();
            } else {
                tracing::error!(thread = ?thread.thread().name(), "a data-plane thread did not stop within {STOP_WITHIN:?}; exiting without it");
            }
        }
    }
}

/// How long stopping the shards may take before `main` exits without them.
const STOP_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_run_tasks_on_their_own_threads_and_know_their_index() {
        let shards = Shards::start(2).expect("starts");
        let handles = shards.handles();
        assert_eq!(handles.len(), 2);
        assert_eq!(current(), None);
        for i in 0..4 {
            let (tx, rx) = std::sync::mpsc::channel();
            handles.get(i).spawn(async move {
                let _ = tx.send(current());
            });
            assert_eq!(rx.recv().expect("the task ran"), Some(i % 2));
        }
        // Dropping them stops the runtimes, with a task still pending on them, and joins the
        // threads (the test would hang otherwise).
        handles.get(0).spawn(std::future::pending::<()>());
        drop(shards);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        drop(handles.get(1).spawn(async move {
            let _ = tx.send(());
        }));
        assert!(rx.recv().is_err(), "a stopped shard ran a task");
    }
}
