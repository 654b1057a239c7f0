//! The Raft log and vote, durable in a `redb` file (`<data_dir>/raft-log.redb`).
//!
//! The store is split the way openraft's storage contract asks for (`RaftLogStorage::append`:
//! "return immediately after saving the entries in memory, call the callback once they are on
//! disk"):
//!
//! - **Memory** holds every log entry not yet purged, the vote and the commit index. Readers
//!   (the replication tasks, the state machine) read from it. openraft 0.9 hands a leader's
//!   entries to its replication tasks only once this store reports them flushed; entries
//!   appended as the leader are also handed to [`super::early`], which sends them to the
//!   followers while this store's fsync of them runs.
//! - **One writer thread** owns the redb file. Every write (append, vote, truncate, purge,
//!   commit index) is queued to it in order and it drains the queue in batches: one redb
//!   transaction and one fsync (`Durability::Immediate`) for everything queued while the
//!   previous fsync ran (group commit). Only after that commit returns are appends
//!   acknowledged to openraft and votes reported saved: a vote is never forgotten and an
//!   acknowledged entry is never lost by a crash. One queue keeps the writes in the order
//!   openraft issued them, which its contract requires.
//!
//! The commit index is written without its own transaction: it goes, and becomes durable, with
//! the next batch that carries an append or a vote (or when the store closes). It is only a hint at start-up (entries up to it are
//! re-applied at once); an index that is a little behind after a crash is caught up by the
//! leader. What it must never do is let a restarted leader serve linearizable reads from a
//! stale index, and that is why [`LogStore::open`] hands openraft a vote that is not
//! committed when the node was the leader: the node then wins its leadership back through an
//! election, whose new blank entry every linearizable read waits for.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::early::{EarlyAppend, EarlyPeers};
use super::typ::{Entry, LogId, StorageError, Vote};
use super::{NodeId, TypeConfig};
use crate::telemetry::Parent;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// Most queued writes folded into one transaction.
const MAX_BATCH: usize = 1024;

/// How often, at most, the commit index is written (see `write_loop`).
const COMMITTED_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// The log store. Cheap to clone: openraft takes one copy as the store and hands out others
/// as readers; all share the memory and the writer.
#[derive(Clone)]
pub struct LogStore {
    me: NodeId,
    mem: Arc<Mutex<Mem>>,
    writer: Arc<Writer>,
    /// Where appends made as the leader also go, to be sent before they are durable here
    /// (see [`super::early`]).
    early: Option<EarlyPeers>,
}

/// The queue to the writer thread. Dropping the last handle closes the queue and waits for
/// the thread to finish what was queued and close the file.
struct Writer {
    queue: Option<mpsc::Sender<Write>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the store knows, ahead of (or equal to) the disk.
#[derive(Default)]
struct Mem {
    logs: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

impl Mem {
    /// The id of the last entry: the last one held, else the last one purged.
    fn last_log_id(&self) -> Option<LogId> {
        self.logs
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(self.last_purged)
    }
}

/// One queued write. Rows are serialized by the caller so that the writer thread only does
/// disk work.
enum Write {
    Append {
        rows: Vec<(u64, Vec<u8>)>,
        /// The traced writes of these entries (see `crate::telemetry`).
        traces: Vec<Parent>,
        /// Always set, except by tests, which cannot build one (see `append_unobserved`).
        done: Option<LogFlushed<TypeConfig>>,
    },
    Vote {
        bytes: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Committed {
        bytes: Vec<u8>,
    },
    Truncate {
        from: u64,
    },
    Purge {
        upto: u64,
        bytes: Vec<u8>,
    },
}

impl Write {
    /// Whether the batch holding this write must reach the disk before it is reported done.
    fn needs_fsync(&self) -> bool {
        matches!(
            self,
            Write::Append { .. } | Write::Vote { .. } | Write::Truncate { .. }
        )
    }
}

fn io_err(e: impl std::fmt::Display) -> redb::Error {
    redb::Error::Io(std::io::Error::other(e.to_string()))
}

/// redb's page cache for the log file.
const STORE_CACHE_BYTES: usize = 16 << 20;

impl LogStore {
    /// Opens (or creates) the log of node `me`, loads it into memory and starts the writer.
    pub fn open(path: &Path, me: NodeId) -> Result<Self, redb::Error> {
        // Every entry is in memory too (`mem`), so redb's page cache only speeds up the
        // writer's own B-tree updates: a small one does (its default is 1 GiB).
        let db = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(LOGS)?;
        tx.open_table(META)?;
        tx.commit()?;

        let mut mem = Mem::default();
        {
            let tx = db.begin_read()?;
            let meta = tx.open_table(META)?;
            let get = |key: &str| -> Result<Option<Vec<u8>>, redb::Error> {
                Ok(meta.get(key)?.map(|v| v.value().to_vec()))
            };
            if let Some(b) = get(KEY_VOTE)? {
                mem.vote = Some(serde_json::from_slice(&b).map_err(io_err)?);
            }
            if let Some(b) = get(KEY_COMMITTED)? {
                let c: Option<LogId> = serde_json::from_slice(&b).map_err(io_err)?;
                mem.committed = c;
            }
            if let Some(b) = get(KEY_PURGED)? {
                mem.last_purged = Some(serde_json::from_slice(&b).map_err(io_err)?);
            }
            let logs = tx.open_table(LOGS)?;
            for item in logs.iter()? {
                let (k, v) = item?;
                let entry: Entry = serde_json::from_slice(v.value()).map_err(io_err)?;
                mem.logs.insert(k.value(), entry);
            }
        }
        // A leader that restarts comes back as a candidate of the same term (see the module
        // documentation): openraft would otherwise resume leading at once with whatever commit
        // index survived, and answer linearizable reads from it. Early replication relies on
        // it too (see `super::early`): a leader must never lead again under a vote whose
        // not-yet-durable entries it may have lost, or it would reuse their log ids.
        if let Some(v) = mem.vote.as_mut() {
            if v.is_committed() && v.leader_id().voted_for() == Some(me) {
                *v = Vote::new(v.leader_id().get_term(), me);
            }
        }

        let (sender, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(db, queue))
            .map_err(redb::Error::Io)?;
        Ok(LogStore {
            me,
            early: None,
            mem: Arc::new(Mutex::new(mem)),
            writer: Arc::new(Writer {
                queue: Some(sender),
                thread: Some(thread),
            }),
        })
    }

    /// Hands every append this node makes as the leader to `early` too (see [`super::early`]).
    pub fn send_early_to(&mut self, early: EarlyPeers) {
        self.early = Some(early);
    }

    /// `entries` as an early append, when this node appends them as the leader (its vote is
    /// its own, committed) at the end of its log.
    fn as_leader(&self, entries: &[Entry]) -> Option<EarlyAppend> {
        let mem = self.mem();
        let vote = mem
            .vote
            .filter(|v| v.is_committed() && v.leader_id().voted_for() == Some(self.me))?;
        let prev = mem.last_log_id();
        let first = entries.first()?.log_id.index;
        (first == prev.map_or(0, |p| p.index + 1)).then(|| EarlyAppend {
            vote,
            prev,
            entries: entries.to_vec(),
            committed: mem.committed,
        })
    }

    fn mem(&self) -> MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `entries` in memory (readable from now on) and queues them for the disk.
    fn queue_append(
        &self,
        entries: impl IntoIterator<Item = Entry>,
        done: Option<LogFlushed<TypeConfig>>,
    ) -> Result<(), StorageError> {
        let mut rows = Vec::new();
        let mut traces = Vec::new();
        {
            let mut mem = self.mem();
            for e in entries {
                if let EntryPayload::Normal(p) = &e.payload {
                    traces.extend(p.traces.iter().cloned());
                }
                let b = serde_json::to_vec(&e).map_err(|err| StorageIOError::write_logs(&err))?;
                rows.push((e.log_id.index, b));
                mem.logs.insert(e.log_id.index, e);
            }
        }
        self.queue(Write::Append { rows, traces, done })
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    fn queue(&self, w: Write) -> Result<(), std::io::Error> {
        self.writer
            .queue
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the raft log writer has stopped"))?
            .send(w)
            .map_err(|_| std::io::Error::other("the raft log writer has stopped"))
    }
}

/// The writer thread: drains the queue in batches, one transaction (and at most one fsync)
/// per batch, then reports every write of the batch done.
///
/// Commit-index updates never cost a transaction of their own: the latest is held back and
/// rides with a batch that has to reach the disk anyway, at most every [`COMMITTED_EVERY`] (and
/// once more when the store closes). Writing it with every append would add the meta table's
/// pages to every fsync; it is only a start-up hint (see the module documentation). A held
/// index always follows the appends it refers to, since it goes with a later batch.
/// Ends when every store handle is gone.
fn write_loop(db: Database, queue: mpsc::Receiver<Write>) {
    let mut held: Option<Write> = None;
    let mut committed_saved = Instant::now();
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::with_capacity(8);
        for w in std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok())) {
            match w {
                Write::Committed { .. } => held = Some(w),
                other => batch.push(other),
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
        }
        if batch.is_empty() {
            continue;
        }
        if held.is_some() && committed_saved.elapsed() >= COMMITTED_EVERY {
            batch.extend(held.take());
            committed_saved = Instant::now();
        }
        let durable = batch.iter().any(Write::needs_fsync);
        // One span per traced write in the batch, around the transaction and its fsync; made
        // before the clock starts and closed after openraft has heard, so that they cost
        // neither the fsync figure nor the write's latency.
        let spans: Vec<tracing::Span> = batch
            .iter()
            .flat_map(|w| match w {
                Write::Append { traces, .. } => traces.as_slice(),
                _ => &[],
            })
            .map(|parent| {
                let span = tracing::info_span!(
                    target: crate::telemetry::TARGET,
                    parent: None,
                    "raft.fsync",
                    writes = batch.len(),
                    durable = durable,
                );
                parent.adopt(&span);
                span
            })
            .collect();
        let started = Instant::now();
        let result = commit_batch(&db, &batch, durable).map_err(|e| e.to_string());
        if durable {
            metrics::histogram!("mcpd_raft_log_fsync_seconds").record(started.elapsed());
            metrics::histogram!("mcpd_raft_log_batch_writes").record(batch.len() as f64);
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = batch.len(), "raft log write failed");
        }
        for w in batch {
            match w {
                Write::Append {
                    done: Some(done), ..
                } => done.log_io_completed(result.clone().map_err(std::io::Error::other)),
                Write::Vote { done, .. } => {
                    let _ = done.send(result.clone());
                }
                Write::Append { done: None, .. }
                | Write::Committed { .. }
                | Write::Truncate { .. }
                | Write::Purge { .. } => {}
            }
        }
        drop(spans);
    }
    if let Some(last) = held {
        if let Err(e) = commit_batch(&db, &[last], true) {
            tracing::warn!(error = %e, "could not save the commit index at shutdown");
        }
    }
}

fn commit_batch(db: &Database, batch: &[Write], durable: bool) -> Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    if !durable {
        tx.set_durability(Durability::None).map_err(io_err)?;
    }
    {
        let mut logs = tx.open_table(LOGS)?;
        let mut meta = tx.open_table(META)?;
        for w in batch {
            match w {
                Write::Append { rows, .. } => {
                    for (i, b) in rows {
                        logs.insert(*i, b.as_slice())?;
                    }
                }
                Write::Vote { bytes, .. } => {
                    meta.insert(KEY_VOTE, bytes.as_slice())?;
                }
                Write::Committed { bytes } => {
                    meta.insert(KEY_COMMITTED, bytes.as_slice())?;
                }
                Write::Truncate { from } => {
                    logs.retain_in(*from.., |_, _| false)?;
                }
                Write::Purge { upto, bytes } => {
                    meta.insert(KEY_PURGED, bytes.as_slice())?;
                    logs.retain_in(..=*upto, |_, _| false)?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let mem = self.mem();
        Ok(mem.logs.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mem = self.mem();
        Ok(LogState {
            last_purged_log_id: mem.last_purged,
            last_log_id: mem.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        let (done, saved) = oneshot::channel();
        self.mem().vote = Some(*vote);
        self.queue(Write::Vote { bytes, done })
            .map_err(|e| StorageIOError::write_vote(&e))?;
        match saved.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StorageIOError::write_vote(&io_err(e)).into()),
            Err(e) => Err(StorageIOError::write_vote(&io_err(e)).into()),
        }
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.mem().vote)
    }

    /// Queued without an fsync of its own (see the module documentation).
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&committed).map_err(|e| StorageIOError::write(&e))?;
        self.mem().committed = committed;
        self.queue(Write::Committed { bytes })
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.mem().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(early) = &self.early {
            if let Some(append) = self.as_leader(&entries) {
                early.send(append);
            }
        }
        self.queue_append(entries, Some(callback))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = log_id.index;
        self.mem().logs.split_off(&from);
        self.queue(Write::Truncate { from })
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let upto = log_id.index;
        let bytes = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        {
            let mut mem = self.mem();
            let kept = mem.logs.split_off(&(upto + 1));
            mem.logs = kept;
            mem.last_purged = Some(log_id);
        }
        self.queue(Write::Purge { upto, bytes })
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::state_machine::StateMachineStore;
    use openraft::testing::{blank_ent, StoreBuilder, Suite};

    fn indexes(store: &LogStore) -> Vec<u64> {
        store.mem().logs.keys().copied().collect()
    }

    /// Appends without a callback (tests cannot build openraft's), then waits for the writer
    /// with a vote: writes are done in order, so the entries are on disk once the vote is.
    async fn append_and_flush(store: &mut LogStore, entries: Vec<Entry>, vote: Vote) {
        store.queue_append(entries, None).unwrap();
        store.save_vote(&vote).await.unwrap();
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().unwrap();
            let log = LogStore::open(&dir.path().join("log.redb"), 1).unwrap();
            let sm = StateMachineStore::open(
                &dir.path().join("sm.redb"),
                crate::audit_key::AuditKey::derive(&[7; 32]),
            )
            .unwrap();
            Ok((dir, log, sm))
        }
    }

    /// openraft's own conformance suite for storage implementations.
    #[test]
    fn passes_the_openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }

    #[tokio::test]
    async fn entries_vote_and_purge_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let ent = |term, index| blank_ent::<TypeConfig>(term, 1, index);
        {
            let mut s = LogStore::open(&path, 1).unwrap();
            append_and_flush(
                &mut s,
                (1..=10).map(|i| ent(1, i)).collect(),
                Vote::new(1, 1),
            )
            .await;
            s.truncate(ent(1, 8).log_id).await.unwrap();
            s.purge(ent(1, 3).log_id).await.unwrap();
            s.save_committed(Some(ent(1, 6).log_id)).await.unwrap();
            append_and_flush(&mut s, vec![ent(2, 8)], Vote::new_committed(2, 3)).await;
            assert_eq!(indexes(&s), vec![4, 5, 6, 7, 8]);
        }
        let mut s = LogStore::open(&path, 1).unwrap();
        assert_eq!(indexes(&s), vec![4, 5, 6, 7, 8]);
        let state = s.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(ent(1, 3).log_id));
        assert_eq!(state.last_log_id, Some(ent(2, 8).log_id));
        assert_eq!(
            s.read_vote().await.unwrap(),
            Some(Vote::new_committed(2, 3))
        );
        assert_eq!(s.read_committed().await.unwrap(), Some(ent(1, 6).log_id));
        let got = s.try_get_log_entries(5..7).await.unwrap();
        let got: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
        assert_eq!(got, vec![5, 6]);
    }

    #[tokio::test]
    async fn a_held_back_commit_index_is_written_when_the_store_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let committed = blank_ent::<TypeConfig>(1, 1, 3).log_id;
        {
            let mut s = LogStore::open(&path, 1).unwrap();
            s.save_committed(Some(committed)).await.unwrap();
        }
        let mut s = LogStore::open(&path, 1).unwrap();
        assert_eq!(s.read_committed().await.unwrap(), Some(committed));
    }

    /// Safety-critical: linearizable reads and early replication (`raft::early`) depend on it.
    #[tokio::test]
    async fn a_restarted_leader_gets_its_vote_back_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        {
            let mut s = LogStore::open(&path, 7).unwrap();
            s.save_vote(&Vote::new_committed(4, 7)).await.unwrap();
        }
        let mut s = LogStore::open(&path, 7).unwrap();
        assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(4, 7)));
        drop(s);
        // Another node's view of the same leader keeps the committed vote.
        let mut s = LogStore::open(&path, 8).unwrap();
        assert_eq!(
            s.read_vote().await.unwrap(),
            Some(Vote::new_committed(4, 7))
        );
    }

    #[tokio::test]
    async fn only_a_leader_s_appends_at_the_end_of_its_log_go_early() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogStore::open(&dir.path().join("log.redb"), 1).unwrap();
        let ent = |index| blank_ent::<TypeConfig>(2, 1, index);
        append_and_flush(&mut s, vec![ent(1), ent(2)], Vote::new(2, 1)).await;
        assert!(
            s.as_leader(&[ent(3)]).is_none(),
            "a candidate's vote is not a leader's"
        );

        s.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        s.save_committed(Some(ent(1).log_id)).await.unwrap();
        let early = s
            .as_leader(&[ent(3), ent(4)])
            .expect("the leader's append goes early");
        assert_eq!(early.vote, Vote::new_committed(2, 1));
        assert_eq!(early.prev, Some(ent(2).log_id));
        assert_eq!(early.committed, Some(ent(1).log_id));
        let sent: Vec<u64> = early.entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(sent, vec![3, 4]);
        assert!(
            s.as_leader(&[ent(5)]).is_none(),
            "entries that leave a gap are not sent"
        );

        s.save_vote(&Vote::new_committed(3, 2)).await.unwrap();
        assert!(
            s.as_leader(&[ent(3)]).is_none(),
            "a follower's appends are not sent"
        );
    }

    #[tokio::test]
    async fn appended_entries_are_readable_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LogStore::open(&dir.path().join("log.redb"), 1).unwrap();
        let entries = vec![blank_ent::<TypeConfig>(1, 1, 1), blank_ent(1, 1, 2)];
        s.queue_append(entries, None).unwrap();
        assert_eq!(s.try_get_log_entries(..).await.unwrap().len(), 2);
    }
}
