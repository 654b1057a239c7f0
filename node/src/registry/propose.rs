//! Proposing writes to Raft in batches.
//!
//! Every write the node proposes goes through one [`Proposer`]. While fewer than
//! [`MAX_IN_FLIGHT`] proposals are on their way through Raft, a write is proposed at once, as
//! an entry of its own, so a lone client waits for nothing extra. When that many are in flight,
//! writes that arrive meanwhile wait for the next slot and then go together as one entry: one
//! log append, one fsync per node, one replication message and one commit for all of them,
//! which is what lets the registry keep up with many concurrent clients. Each write still gets
//! its own result; the state machine applies the writes of an entry in order, each as if it had
//! its own entry.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::telemetry::InSpanExt;

use super::state::{CommandResult, Proposal, Request};
use crate::raft::typ::ClientWriteError;
use crate::raft::Raft;
use crate::telemetry::Parent;

/// Proposals on their way through Raft at once, before writes start to share entries.
pub const MAX_IN_FLIGHT: usize = 2;
/// Most writes in one entry.
pub const MAX_BATCH: usize = 512;

/// What a proposed write came to: its own result, or the Raft error of its entry.
pub type ProposeResult = Result<CommandResult, openraft::error::RaftError<u64, ClientWriteError>>;

struct Pending {
    request: Request,
    /// The write's span, when traced.
    trace: Option<Parent>,
    done: oneshot::Sender<ProposeResult>,
}

/// The handle writes are proposed through. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    raft: Raft,
    slots: Arc<Semaphore>,
    queue: mpsc::UnboundedSender<Pending>,
}

/// The proposer's task has ended (the node is shutting down).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the proposer has stopped")]
pub struct Stopped;

impl Proposer {
    /// Starts the batching task for `raft`. It ends when every handle is dropped.
    pub fn start(raft: Raft) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        tokio::spawn(run(raft.clone(), slots.clone(), rx));
        Proposer { raft, slots, queue }
    }

    /// Proposes `request` and waits for its result. Dropping the future abandons the wait,
    /// not the write.
    pub async fn propose(&self, request: Request) -> Result<ProposeResult, Stopped> {
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            parent: crate::telemetry::parent(),
            "raft.propose"
        );
        self.propose_traced(request).in_span(span).await
    }

    async fn propose_traced(&self, request: Request) -> Result<ProposeResult, Stopped> {
        let trace = crate::telemetry::propagate::current_parent();
        // A free slot (the semaphore is fair: none is free while writes queue for one) means
        // no batch is forming: propose from here, without a hop through the batching task.
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            let mut answers =
                propose_entry(&self.raft, vec![request], trace.into_iter().collect()).await;
            drop(slot);
            return answers.pop().unwrap_or(Err(Stopped));
        }
        let (done, result) = oneshot::channel();
        self.queue
            .send(Pending {
                request,
                trace,
                done,
            })
            .map_err(|_| Stopped)?;
        result.await.map_err(|_| Stopped)
    }
}

async fn run(raft: Raft, slots: Arc<Semaphore>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // A write whose caller stopped waiting (its bound passed while slots were busy, e.g.
        // without quorum) was answered 503 already: it is not proposed late.
        let mut batch: Vec<Pending> = Vec::new();
        for p in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            if !p.done.is_closed() {
                batch.push(p);
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
        }
        if batch.is_empty() {
            continue;
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let traces = batch.iter().filter_map(|p| p.trace.clone()).collect();
            let (requests, waiters): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.request, p.done)).unzip();
            let answers = propose_entry(&raft, requests, traces).await;
            drop(slot);
            for (done, answer) in waiters.into_iter().zip(answers) {
                // A missing answer drops the waiter, who then sees the proposer as stopped.
                if let Ok(answer) = answer {
                    let _ = done.send(answer);
                }
            }
        });
    }
}

/// Proposes `requests` as one entry and returns one answer per request, in order. The state
/// machine answers every write of an entry; were answers missing, those writes get `Stopped`
/// (the caller hears the same as when the proposer is gone), never a made-up answer.
async fn propose_entry(
    raft: &Raft,
    requests: Vec<Request>,
    traces: Vec<Parent>,
) -> Vec<Result<ProposeResult, Stopped>> {
    let n = requests.len();
    metrics::histogram!("mcpd_registry_proposal_writes").record(n as f64);
    let traces = crate::telemetry::Traces(traces);
    match raft.client_write(Proposal { requests, traces }).await {
        Err(e) => vec![Ok(Err(e)); n],
        Ok(resp) => {
            if resp.data.len() != n {
                tracing::error!(
                    writes = n,
                    answers = resp.data.len(),
                    "an entry was applied with another number of answers than writes"
                );
            }
            let mut answers: Vec<_> = resp.data.into_iter().take(n).map(|r| Ok(Ok(r))).collect();
            answers.resize_with(n, || Err(Stopped));
            answers
        }
    }
}
