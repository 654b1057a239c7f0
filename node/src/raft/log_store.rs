//! The Raft log and vote, durable in a `redb` file (`<data_dir>/raft-log.redb`).
//!
//! Every write is a redb transaction committed with `Durability::Immediate` (fsync) before
//! openraft is told it happened: a vote is never forgotten and an acknowledged entry is never
//! lost by a crash. redb work is synchronous, so it runs on the blocking pool and never stalls
//! the async workers.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::typ::{Entry, LogId, StorageError, Vote};
use super::TypeConfig;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// The log store. Cheap to clone: openraft takes one copy as the store and hands out others
/// as readers.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn open(path: &Path) -> Result<Self, redb::Error> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(LOGS)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(LogStore { db: Arc::new(db) })
    }

    /// Runs `f` on the blocking pool with the database.
    async fn blocking<T, F>(&self, f: F) -> Result<T, redb::Error>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| redb::Error::Io(std::io::Error::other(e)))?
    }

    async fn read_meta<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, redb::Error> {
        let bytes = self
            .blocking(move |db| {
                let tx = db.begin_read()?;
                let t = tx.open_table(META)?;
                Ok(t.get(key)?.map(|v| v.value().to_vec()))
            })
            .await?;
        match bytes {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| redb::Error::Io(std::io::Error::other(e))),
        }
    }

    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
    ) -> Result<(), redb::Error> {
        let bytes =
            serde_json::to_vec(value).map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            tx.open_table(META)?.insert(key, bytes.as_slice())?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

fn range_bounds(range: &impl RangeBounds<u64>) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let bounds = range_bounds(&range);
        let raw = self
            .blocking(move |db| {
                let tx = db.begin_read()?;
                let t = tx.open_table(LOGS)?;
                let mut out = Vec::new();
                for item in t.range::<u64>(bounds)? {
                    let (_, v) = item?;
                    out.push(v.value().to_vec());
                }
                Ok(out)
            })
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?;
        raw.iter()
            .map(|b| serde_json::from_slice(b).map_err(|e| StorageIOError::read_logs(&e).into()))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self
            .read_meta(KEY_PURGED)
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last = self
            .blocking(|db| {
                let tx = db.begin_read()?;
                let t = tx.open_table(LOGS)?;
                let last = t.last()?.map(|(_, v)| v.value().to_vec());
                Ok(last)
            })
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last_log_id = match last {
            Some(b) => {
                let entry: Entry =
                    serde_json::from_slice(&b).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(KEY_VOTE, vote)
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(KEY_VOTE)
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    /// The commit index is written durably. It is more than a start-up hint: a leader that
    /// restarts takes its term back without an election (openraft 0.9) and serves linearizable
    /// reads from the commit index it recovers, so a lost index would let it answer reads that
    /// miss acknowledged writes (found by the chaos harness's kill-all-restart scenario).
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(KEY_COMMITTED, &committed)
            .await
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let c: Option<Option<LogId>> = self
            .read_meta(KEY_COMMITTED)
            .await
            .map_err(|e| StorageIOError::read(&e))?;
        Ok(c.flatten())
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
        let mut rows = Vec::new();
        for e in entries {
            let b = serde_json::to_vec(&e).map_err(|err| StorageIOError::write_logs(&err))?;
            rows.push((e.log_id.index, b));
        }
        let res = self
            .blocking(move |db| {
                let tx = db.begin_write()?;
                {
                    let mut t = tx.open_table(LOGS)?;
                    for (i, b) in &rows {
                        t.insert(*i, b.as_slice())?;
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let io = std::io::Error::other(e.to_string());
                callback.log_io_completed(Err(io));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = log_id.index;
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            tx.open_table(LOGS)?.retain_in(from.., |_, _| false)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let upto = log_id.index;
        let purged = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            tx.open_table(META)?.insert(KEY_PURGED, purged.as_slice())?;
            tx.open_table(LOGS)?.retain_in(..=upto, |_, _| false)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
