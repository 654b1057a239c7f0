//! The data plane's threads: one single-threaded runtime per shard (by default one per CPU).
//!
//! The HTTP listener's connections are dealt out to the shards, and so are the MCP server
//! processes of each pool (slot `i` on shard `i mod n`): a connection's requests, the calls
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
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

/// The running shards. Dropping them stops their runtimes (and the tasks on them).
pub struct Shards {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next: AtomicUsize,
}

impl Shards {
    /// Starts `n` shards (at least one).
    pub fn start(n: usize) -> Result<Shards, ShardError> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for index in 0..n {
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
        tracing::info!(shards = n, "data-plane threads started");
        Ok(Shards {
            handles,
            stops,
            threads: Mutex::new(threads),
            next: AtomicUsize::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The runtime of shard `index mod n`.
    pub fn handle(&self, index: usize) -> &Handle {
        &self.handles[index % self.handles.len()]
    }

    /// The next shard in turn, for a new connection.
    pub fn next(&self) -> &Handle {
        self.handle(self.next.fetch_add(1, Ordering::Relaxed))
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        // A runtime cannot be dropped from within another one's worker; the threads drop
        // their own, and are left to finish if this runs on a shard.
        if current().is_none() {
            for t in self
                .threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
            {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_run_tasks_on_their_own_threads_and_know_their_index() {
        let shards = Shards::start(2).expect("starts");
        assert_eq!(shards.len(), 2);
        assert_eq!(current(), None);
        for i in 0..4 {
            let (tx, rx) = std::sync::mpsc::channel();
            shards.handle(i).spawn(async move {
                let _ = tx.send(current());
            });
            assert_eq!(rx.recv().expect("the task ran"), Some(i % 2));
        }
        let seen: Vec<usize> = (0..4)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::channel();
                shards.next().spawn(async move {
                    let _ = tx.send(current());
                });
                rx.recv().expect("ran").expect("on a shard")
            })
            .collect();
        assert_eq!(seen, vec![0, 1, 0, 1]);
        drop(shards);
    }
}
