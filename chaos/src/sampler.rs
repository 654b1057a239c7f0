//! The leader sampler: through the whole scenario, every member's `/v1/cluster/status` is read
//! every 100 ms by a loop of its own (so a stopped node slows only its own samples; probes of
//! one node overlap, at most five at a time), and each answer becomes a [`LeaderSample`] for
//! the one-leader-per-term checker and the recovery figures.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::checker::leaders::LeaderSample;
use crate::cluster::{Target, Targets};
use crate::history::Clock;
use mcpctl::AdminClient;

/// Pause between two samples of one node.
const INTERVAL: Duration = Duration::from_millis(100);
/// Upper bound of samples per node and scenario.
const MAX_SAMPLES_PER_NODE: usize = 20_000;
/// Probes of one node that may be waiting for an answer at once.
const MAX_IN_FLIGHT: usize = 5;

/// A running sampler.
pub struct Sampler {
    samples: Arc<Mutex<Vec<LeaderSample>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling the members in `targets` (re-read as membership changes) until
    /// [`Sampler::finish`] or `deadline`.
    pub fn start(targets: Targets, clock: Clock, deadline: Instant) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(
            targets,
            clock,
            deadline,
            samples.clone(),
            stop_rx,
        ));
        Sampler {
            samples,
            stop,
            task,
        }
    }

    /// Stops sampling and returns every sample.
    pub async fn finish(self) -> Vec<LeaderSample> {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        let mut out = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        out.sort_by_key(|s| (s.at, s.node));
        out
    }
}

async fn supervise(
    targets: Targets,
    clock: Clock,
    deadline: Instant,
    samples: Arc<Mutex<Vec<LeaderSample>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut loops = JoinSet::new();
    let mut started: BTreeSet<u64> = BTreeSet::new();
    while !*stop.borrow() && Instant::now() < deadline {
        for t in targets.all() {
            if started.insert(t.id) {
                loops.spawn(sample_node(
                    t,
                    clock,
                    deadline,
                    samples.clone(),
                    stop.clone(),
                ));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => {}
        }
    }
    // Each loop sees the same stop signal; bound the wait for in-flight probes anyway.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while loops.join_next().await.is_some() {}
    })
    .await;
    loops.abort_all();
}

async fn sample_node(
    t: Target,
    clock: Clock,
    deadline: Instant,
    samples: Arc<Mutex<Vec<LeaderSample>>>,
    mut stop: watch::Receiver<bool>,
) {
    // A status answer can take a while (the node pings its peers, with a timeout): probes
    // overlap, so one slow answer does not thin out the samples.
    let mut in_flight = JoinSet::new();
    for _ in 0..MAX_SAMPLES_PER_NODE {
        if *stop.borrow() || Instant::now() >= deadline {
            break;
        }
        while in_flight.try_join_next().is_some() {}
        if in_flight.len() < MAX_IN_FLIGHT {
            in_flight.spawn(probe(t.probe.clone(), clock, samples.clone()));
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = stop.changed() => break,
        }
    }
    in_flight.abort_all();
}

/// One status probe. The node reads its Raft state when the request arrives, so the sample is
/// stamped with the time the probe was sent.
async fn probe(client: AdminClient, clock: Clock, samples: Arc<Mutex<Vec<LeaderSample>>>) {
    let at = clock.now();
    if let Ok(s) = client.cluster_status().await {
        let sample = LeaderSample {
            at,
            node: s.node_id,
            term: s.term,
            state: s.state,
            leader: s.leader,
        };
        samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sample);
    }
}
