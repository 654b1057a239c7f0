//! The Raft state machine: applies committed entries to the in-memory [`State`] and persists
//! snapshots of it in `redb` (`<data_dir>/state.redb`).
//!
//! Durability comes from the log, not from the state machine: what survives a crash is the
//! latest snapshot (fsynced in redb before openraft may purge the log behind it) plus the log,
//! which openraft re-applies up to the saved commit index at start-up. So applying an entry is
//! a memory operation, and the only fsyncs on the write path are the log's.
//!
//! Applied changes are published to watchers (the data plane, `GET /v1/watch`) through a
//! broadcast channel, with a bounded history so a watcher can resume from a revision.

use std::collections::VecDeque;
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use mcpcp_proto::api::WatchEvent;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::typ::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership};
use super::TypeConfig;
use crate::audit_key::AuditKey;
use crate::registry::state::{CommandResult, State};

const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
const KEY_META: &str = "meta";
const KEY_DATA: &str = "data";

/// redb's page cache for the snapshot file.
const STORE_CACHE_BYTES: usize = 8 << 20;

/// How many applied changes are kept for watchers resuming from a revision.
const WATCH_HISTORY: usize = 4096;

/// Everything the state machine holds; serialised whole as a snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: State,
}

struct Shared {
    db: Database,
    data: RwLock<SmData>,
    /// Recent events, oldest first; sends to `events` happen under this lock so a watcher
    /// that copies the history and subscribes under it sees every event exactly once.
    history: Mutex<VecDeque<WatchEvent>>,
    events: broadcast::Sender<WatchEvent>,
    snapshot_seq: AtomicU64,
    /// Keys the MAC of each audit event the state appends.
    audit_key: AuditKey,
}

/// The state machine. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

/// A watcher's starting point: the events after the requested revision that are still in
/// the history, and a receiver for everything after them.
pub struct Subscription {
    pub backlog: Vec<WatchEvent>,
    pub live: broadcast::Receiver<WatchEvent>,
}

impl StateMachineStore {
    /// Opens the store and restores the latest snapshot, if any. `audit_key` keys the audit
    /// events applied from now on.
    pub fn open(path: &Path, audit_key: AuditKey) -> Result<Self, redb::Error> {
        // The state lives in memory; the file holds its latest snapshot, written whole and read
        // whole at start: redb's page cache would only keep a second copy of it (its default
        // is 1 GiB).
        let db = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOT)?;
        tx.commit()?;
        let mut data: SmData = match read_snapshot(&db)? {
            Some((_, bytes)) => serde_json::from_slice(&bytes)
                .map_err(|e| redb::Error::Io(std::io::Error::other(e)))?,
            None => SmData::default(),
        };
        data.state.reindex();
        let (events, _) = broadcast::channel(1024);
        Ok(StateMachineStore {
            shared: Arc::new(Shared {
                db,
                data: RwLock::new(data),
                history: Mutex::new(VecDeque::new()),
                events,
                snapshot_seq: AtomicU64::new(0),
                audit_key,
            }),
        })
    }

    /// Read access to the applied state. Never hold the guard across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, SmData> {
        self.shared
            .data
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Subscribes to changes after `since` (all retained history when `None`). When `since` is
    /// older than the history, the backlog starts with a `Reset` telling the watcher to re-read.
    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        let history = self
            .shared
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let live = self.shared.events.subscribe();
        let mut backlog = Vec::new();
        if let Some(since) = since {
            let current = self.read().state.revision;
            let oldest = history.front().map(|e| e.revision());
            let covered = since >= current || oldest.is_some_and(|o| o <= since + 1);
            if !covered {
                backlog.push(WatchEvent::Reset { revision: current });
            } else {
                backlog.extend(history.iter().filter(|e| e.revision() > since).cloned());
            }
        }
        Subscription { backlog, live }
    }

    fn publish(&self, events: Vec<WatchEvent>) {
        if events.is_empty() {
            return;
        }
        let mut history = self
            .shared
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for ev in events {
            if matches!(ev, WatchEvent::Reset { .. }) {
                history.clear();
            }
            history.push_back(ev.clone());
            while history.len() > WATCH_HISTORY {
                history.pop_front();
            }
            // No receivers is fine: nobody is watching.
            let _ = self.shared.events.send(ev);
        }
    }

    /// Replaces the whole state with `data` (a restored snapshot, before Raft starts), made
    /// durable as this node's snapshot at `data.last_applied`.
    pub async fn restore(&self, mut data: SmData) -> Result<(), StorageError> {
        let bytes =
            serde_json::to_vec(&data).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let meta = SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.membership.clone(),
            snapshot_id: format!(
                "restored-{}",
                data.last_applied.map(|l| l.index).unwrap_or_default()
            ),
        };
        self.persist_snapshot(&meta, bytes).await?;
        data.state.reindex();
        *self.shared.data.write().unwrap_or_else(|p| p.into_inner()) = data;
        Ok(())
    }

    async fn persist_snapshot(
        &self,
        meta: &SnapshotMeta,
        data: Vec<u8>,
    ) -> Result<(), StorageError> {
        let meta_bytes = serde_json::to_vec(meta)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let shared = self.shared.clone();
        let sig = meta.signature();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let tx = shared.db.begin_write()?;
            {
                let mut t = tx.open_table(SNAPSHOT)?;
                t.insert(KEY_META, meta_bytes.as_slice())?;
                t.insert(KEY_DATA, data.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), &e))?
        .map_err(|e| StorageIOError::write_snapshot(Some(sig), &e).into())
    }
}

fn read_snapshot(db: &Database) -> Result<Option<(SnapshotMeta, Vec<u8>)>, redb::Error> {
    let tx = db.begin_read()?;
    let t = tx.open_table(SNAPSHOT)?;
    let (Some(meta), Some(data)) = (t.get(KEY_META)?, t.get(KEY_DATA)?) else {
        return Ok(None);
    };
    let meta: SnapshotMeta = serde_json::from_slice(meta.value())
        .map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
    Ok(Some((meta, data.value().to_vec())))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (bytes, last_applied, membership) = {
            let d = self.read();
            let bytes =
                serde_json::to_vec(&*d).map_err(|e| StorageIOError::read_state_machine(&e))?;
            (bytes, d.last_applied, d.membership.clone())
        };
        let seq = self.shared.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id.term, l.index),
            None => format!("0-0-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        self.persist_snapshot(&meta, bytes.clone()).await?;
        metrics::counter!("mcpd_raft_snapshot_builds_total").increment(1);
        tracing::info!(snapshot = %meta.snapshot_id, bytes = bytes.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let d = self.read();
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<CommandResult>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut events = Vec::new();
        // The traced writes' spans (empty while tracing is off).
        let mut spans: Vec<tracing::Span> = Vec::new();
        {
            let mut d = self.shared.data.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                d.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(Vec::new()),
                    EntryPayload::Normal(proposal) => {
                        // Closed once the lock is released (closing one exports it).
                        spans.extend(proposal.traces.iter().map(|parent| {
                            let span = tracing::info_span!(
                                target: crate::telemetry::TARGET,
                                parent: None,
                                "raft.apply",
                                index = entry.log_id.index,
                                writes = proposal.requests.len(),
                            );
                            parent.adopt(&span);
                            span
                        }));
                        let mut answers = Vec::with_capacity(proposal.requests.len());
                        for req in proposal.requests {
                            let (res, changes) = d.state.apply(req, &self.shared.audit_key);
                            events.extend(changes.iter().map(|c| d.state.event_for(c)));
                            answers.push(res);
                        }
                        results.push(answers);
                    }
                    EntryPayload::Membership(m) => {
                        let ids: Vec<u64> = m.nodes().map(|(id, _)| *id).collect();
                        d.state.node_ids_ever.extend(ids);
                        d.membership = StoredMembership::new(Some(entry.log_id), m);
                        results.push(Vec::new());
                    }
                }
            }
        }
        drop(spans);
        self.publish(events);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let mut data: SmData = serde_json::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        data.last_applied = meta.last_log_id;
        data.membership = meta.last_membership.clone();
        data.state.reindex();
        self.persist_snapshot(meta, bytes).await?;
        let revision = data.state.revision;
        {
            let mut d = self.shared.data.write().unwrap_or_else(|p| p.into_inner());
            *d = data;
        }
        metrics::counter!("mcpd_raft_snapshot_installs_total").increment(1);
        tracing::info!(snapshot = %meta.snapshot_id, revision, "installed snapshot");
        self.publish(vec![WatchEvent::Reset { revision }]);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let shared = self.shared.clone();
        let found = tokio::task::spawn_blocking(move || read_snapshot(&shared.db))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(found.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
