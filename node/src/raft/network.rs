//! Calling peers over gRPC: the Raft RPCs openraft sends, through one cached channel per peer.
//!
//! Failures are reported the way openraft expects: `Unreachable` when the peer cannot be
//! connected to (openraft backs off), `Network` when a call failed on the way, and
//! `RemoteError` when the peer answered with a Raft error.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mcpcp_proto::api::Member;
use mcpcp_proto::raft::raft_client::RaftClient;
use mcpcp_proto::raft::RaftPayload;
use openraft::error::{InstallSnapshotError, NetworkError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::tls::peer::PeerConnector;

use super::typ::{LogId, RPCError, RaftError, Vote};
use super::{NodeId, TypeConfig};

/// One lazily connected channel per peer address, shared by Raft and forwarding.
#[derive(Clone)]
pub struct PeerChannels {
    inner: Arc<Mutex<HashMap<String, Channel>>>,
    connect_timeout: Duration,
    /// Mutual TLS with this node's certificate (there is no plaintext gRPC).
    connector: PeerConnector,
    /// The runtime the channels' connection tasks run on (the one they were made for),
    /// whichever thread first asks for a channel (a data-plane shard, say).
    runtime: Option<tokio::runtime::Handle>,
}

impl PeerChannels {
    /// Channels whose tasks run on the calling runtime, dialing through `connector`.
    pub fn new(connect_timeout: Duration, connector: PeerConnector) -> Self {
        PeerChannels {
            inner: Arc::default(),
            connect_timeout,
            connector,
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Spawns `task` on the channels' runtime (or the caller's, when there is none).
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.runtime {
            Some(rt) => rt.spawn(task),
            None => tokio::spawn(task),
        }
    }

    /// The channel to `grpc_addr`, created on first use. Connection happens lazily and is
    /// re-established by tonic after failures.
    pub fn get(&self, grpc_addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = map.get(grpc_addr) {
            return Ok(ch.clone());
        }
        let _on_channels_runtime = self.runtime.as_ref().map(|rt| rt.enter());
        let ch = Endpoint::from_shared(format!("http://{grpc_addr}"))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(self.connector.clone());
        map.insert(grpc_addr.to_string(), ch.clone());
        Ok(ch)
    }
}

/// Creates per-peer Raft clients for openraft.
#[derive(Clone)]
pub struct NetworkFactory {
    pub channels: PeerChannels,
    /// Set when early replication is on: what early appends proved each follower holds.
    pub early_acks: Option<EarlyAcks>,
}

/// What early appends (see [`super::early`]) proved a follower holds: its log matched the
/// leader's, durably, up to this log id, under this vote.
pub type EarlyAck = Option<(Vote, LogId)>;

/// Each follower's latest [`EarlyAck`], written by its early sender and watched by openraft's
/// client of it. Cheap to clone.
#[derive(Clone, Default)]
pub struct EarlyAcks(Arc<Mutex<HashMap<NodeId, watch::Sender<EarlyAck>>>>);

impl EarlyAcks {
    /// Where `target`'s early acknowledgements are published.
    pub fn sender(&self, target: NodeId) -> watch::Sender<EarlyAck> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(target)
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        self.client_for(target, node)
    }
}

impl NetworkFactory {
    /// The client of peer `target` at `node`'s gRPC address, on the cached channel.
    pub fn client_for(&self, target: NodeId, node: &Member) -> PeerClient {
        PeerClient {
            target,
            addr: node.grpc_addr.clone(),
            channel: self
                .channels
                .get(&node.grpc_addr)
                .map_err(|e| e.to_string()),
            stream: None,
            pending: None,
            stream_unsupported: Arc::new(AtomicBool::new(false)),
            append_rpc: "append_entries",
            early_acked: self
                .early_acks
                .as_ref()
                .map(|a| a.sender(target).subscribe()),
        }
    }
}

/// The Raft client of one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    channel: Result<Channel, String>,
    /// The open `AppendEntriesStream`, between calls.
    stream: Option<AppendStream>,
    /// A round whose append was answered from an early acknowledgement before the peer's own
    /// answer came: it still holds the stream, and is finished before the next round. (In a
    /// mutex only because openraft wants its clients `Sync`; it is never contended.)
    pending: Option<Mutex<Round>>,
    /// The peer answered `Unimplemented` to the stream (an older mcpd, during a rolling
    /// upgrade): this session uses the unary `AppendEntries` instead.
    stream_unsupported: Arc<AtomicBool>,
    /// The `rpc` label of its appends in the metrics: `append_entries` for openraft's
    /// replication, `early_append` for [`super::early`]'s (see [`PeerClient::for_early`]).
    append_rpc: &'static str,
    /// The peer's early acknowledgements, for openraft's client of it when early replication
    /// is on.
    early_acked: Option<watch::Receiver<EarlyAck>>,
}

/// One append round over the stream: the stream back, with the peer's answer.
type Round = Pin<Box<dyn Future<Output = Result<(AppendStream, RaftPayload), RPCError>> + Send>>;

/// An `AppendEntriesStream` to the peer: requests go in, one answer per request comes out.
struct AppendStream {
    requests: mpsc::Sender<RaftPayload>,
    answers: tonic::Streaming<RaftPayload>,
}

/// A failed call as openraft wants it: `Unreachable` when the request never reached the
/// peer's Raft (openraft backs off), `Network` otherwise.
fn status_error<E: std::error::Error>(status: &tonic::Status) -> RPCError<E> {
    if status.code() == tonic::Code::Unavailable {
        RPCError::Unreachable(Unreachable::new(status))
    } else {
        RPCError::Network(NetworkError::new(status))
    }
}

impl PeerClient {
    /// This client for early appends (see [`super::early`]): its own stream, apart from
    /// openraft's replication, so that neither waits for the other; counted as `early_append`.
    pub fn for_early(mut self) -> Self {
        self.append_rpc = "early_append";
        self.early_acked = None;
        self
    }

    async fn call<Req, Resp, E>(
        &mut self,
        rpc: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut client = self.client()?;
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(option.hard_ttl());
        let started = std::time::Instant::now();
        let reply = match rpc {
            "append_entries" | "early_append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        metrics::histogram!("mcpd_raft_rpc_seconds", "rpc" => rpc)
            .record(started.elapsed().as_secs_f64());
        let reply = reply.map_err(|status| {
            metrics::counter!("mcpd_raft_rpc_failures_total", "rpc" => rpc).increment(1);
            status_error(&status)
        })?;
        self.decode_reply(&reply.into_inner().data)
    }

    fn decode_reply<Resp, E>(&self, data: &[u8]) -> Result<Resp, RPCError<E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<E>> =
            serde_json::from_slice(data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// A Raft client on the peer's channel (no size limit: snapshot chunks and batches are
    /// bounded by openraft's own settings).
    fn client<E: std::error::Error>(&self) -> Result<RaftClient<Channel>, RPCError<E>> {
        let channel = self.channel.clone().map_err(|e| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
                "bad address {}: {e}",
                self.addr
            ))))
        })?;
        Ok(RaftClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// Starts one append round over the stream (opened if need be), bounded by `ttl`. The
    /// stream is out of `self` while the round runs: a round that fails or times out takes it
    /// along, so a late answer can never be read as the next round's.
    fn start_round(&mut self, data: Vec<u8>, ttl: Duration) -> Round {
        let current = self.stream.take();
        let opener = self
            .client()
            .map(|client| (client, self.stream_unsupported.clone()));
        Box::pin(async move {
            let round = async {
                let mut stream = match current {
                    Some(s) => s,
                    None => {
                        let (client, unsupported) = opener?;
                        open_stream(client, &unsupported).await?
                    }
                };
                let broken =
                    |why: String| RPCError::Network(NetworkError::new(&std::io::Error::other(why)));
                stream
                    .requests
                    .send(RaftPayload { data })
                    .await
                    .map_err(|_| broken("the append stream closed".into()))?;
                match stream.answers.message().await {
                    Ok(Some(answer)) => Ok((stream, answer)),
                    Ok(None) => Err(broken("the peer closed the append stream".into())),
                    Err(status) => Err(broken(status.to_string())),
                }
            };
            match tokio::time::timeout(ttl, round).await {
                Ok(r) => r,
                Err(_) => Err(RPCError::Network(NetworkError::new(
                    &std::io::Error::other(format!("no answer within {ttl:?}")),
                ))),
            }
        })
    }

    /// One append-entries round over the stream, within `ttl`.
    ///
    /// With early replication, an append of entries is answered `Success` as soon as an early
    /// acknowledgement of the same vote covers its last entry (the follower holds them,
    /// durably, and its log matches the leader's up to there), even when the follower's own
    /// answer to this round has not arrived yet: it would say the same. The round goes on
    /// (it carries the commit index) and is finished before the next one.
    async fn append_over_stream(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError> {
        let started = std::time::Instant::now();
        if let Some(pending) = self.pending.take() {
            // Its answer normally follows the early acknowledgement within a millisecond. A peer
            // slow to give it (a slow disk: its core answers in order, after the fsyncs queued
            // before) does not hold this round up for long: the stream is dropped with it and
            // this round opens a new one.
            let pending = pending.into_inner().unwrap_or_else(|p| p.into_inner());
            match tokio::time::timeout(ttl / 4, pending).await {
                Ok(Ok((stream, answer))) => {
                    self.stream = Some(stream);
                    let late: Result<AppendEntriesResponse<NodeId>, RPCError> =
                        self.decode_reply(&answer.data);
                    if !matches!(late, Ok(AppendEntriesResponse::Success)) {
                        // The next rounds hear the same (a higher vote, a conflict) again.
                        tracing::debug!(peer = self.target, answer = ?late, "an append answered early got another answer from the peer");
                    }
                }
                Ok(Err(e)) => {
                    metrics::counter!("mcpd_raft_rpc_failures_total", "rpc" => self.append_rpc)
                        .increment(1);
                    tracing::debug!(peer = self.target, error = %e, "an append answered early failed afterwards");
                }
                Err(_) => {
                    tracing::debug!(
                        peer = self.target,
                        "the answer to an append answered early is late; opening a new stream"
                    );
                }
            }
        }
        let ttl = ttl.saturating_sub(started.elapsed());
        let data = serde_json::to_vec(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut round = self.start_round(data, ttl);
        let covers = rpc.entries.last().map(|e| (rpc.vote, e.log_id));
        let answered_early = match (covers, self.early_acked.as_mut()) {
            (Some((vote, last)), Some(acked)) => {
                tokio::select! {
                    biased;
                    outcome = &mut round => Err(outcome),
                    Ok(_) = acked.wait_for(|a| {
                        matches!(a, Some((v, l)) if *v == vote && l.index >= last.index)
                    }) => Ok(()),
                }
            }
            _ => Err(round.as_mut().await),
        };
        metrics::histogram!("mcpd_raft_rpc_seconds", "rpc" => self.append_rpc)
            .record(started.elapsed().as_secs_f64());
        let outcome = match answered_early {
            Ok(()) => {
                metrics::counter!("mcpd_raft_appends_answered_early_total").increment(1);
                self.pending = Some(Mutex::new(round));
                return Ok(AppendEntriesResponse::Success);
            }
            Err(outcome) => outcome,
        };
        let (stream, answer) = outcome.inspect_err(|_| {
            metrics::counter!("mcpd_raft_rpc_failures_total", "rpc" => self.append_rpc)
                .increment(1);
        })?;
        self.stream = Some(stream);
        self.decode_reply(&answer.data)
    }
}

/// Opens an `AppendEntriesStream`; a peer that does not know it sets `unsupported`.
async fn open_stream(
    mut client: RaftClient<Channel>,
    unsupported: &AtomicBool,
) -> Result<AppendStream, RPCError> {
    let (requests, rx) = mpsc::channel(1);
    let answers = client
        .append_entries_stream(ReceiverStream::new(rx))
        .await
        .map_err(|status| {
            if status.code() == tonic::Code::Unimplemented {
                unsupported.store(true, Ordering::Relaxed);
            }
            status_error(&status)
        })?
        .into_inner();
    Ok(AppendStream { requests, answers })
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError> {
        if !self.stream_unsupported.load(Ordering::Relaxed) {
            let streamed = self.append_over_stream(&rpc, option.hard_ttl()).await;
            if !self.stream_unsupported.load(Ordering::Relaxed) {
                return streamed;
            }
            tracing::info!(
                peer = self.target,
                "peer has no AppendEntriesStream (an older mcpd?); using unary AppendEntries"
            );
        }
        self.call(self.append_rpc, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<InstallSnapshotError>> {
        self.call("install_snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError> {
        self.call("vote", &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use mcpcp_proto::raft::raft_server::{self, RaftServer};
    use openraft::Vote;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::raft::service::AppendAnswers;

    /// A peer that answers every append with success, counting which RPC carried it; with
    /// `streams: false` it is an older mcpd that does not know `AppendEntriesStream`.
    #[derive(Clone)]
    struct Peer {
        streams: bool,
        unary: Arc<AtomicUsize>,
        streamed: Arc<AtomicUsize>,
        /// What it answers every streamed append with.
        answer: fn() -> Vec<u8>,
        /// Streamed answers wait for a permit each.
        gate: Arc<tokio::sync::Semaphore>,
    }

    /// A peer's encoded answer.
    fn reply(r: AppendEntriesResponse<NodeId>) -> Vec<u8> {
        serde_json::to_vec(&Ok::<_, RaftError>(r)).unwrap()
    }

    fn success() -> Vec<u8> {
        reply(AppendEntriesResponse::Success)
    }

    fn conflict() -> Vec<u8> {
        reply(AppendEntriesResponse::Conflict)
    }

    #[tonic::async_trait]
    impl raft_server::Raft for Peer {
        type AppendEntriesStreamStream = AppendAnswers;

        async fn append_entries_stream(
            &self,
            req: Request<Streaming<RaftPayload>>,
        ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("unknown method AppendEntriesStream"));
            }
            let streamed = self.streamed.clone();
            let (answer, gate) = (self.answer, self.gate.clone());
            let answers = futures_util::stream::unfold(req.into_inner(), move |mut inbound| {
                let streamed = streamed.clone();
                let gate = gate.clone();
                async move {
                    inbound.message().await.ok().flatten()?;
                    streamed.fetch_add(1, Ordering::Relaxed);
                    gate.acquire().await.ok()?.forget();
                    Some((Ok(RaftPayload { data: answer() }), inbound))
                }
            });
            Ok(Response::new(Box::pin(answers)))
        }

        async fn append_entries(
            &self,
            _req: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            self.unary.fetch_add(1, Ordering::Relaxed);
            Ok(Response::new(RaftPayload { data: success() }))
        }

        async fn vote(&self, _req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn install_snapshot(
            &self,
            _req: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// Serves `peer` on a loopback port and returns a client of it, as the leader makes one.
    async fn client_of(peer: Peer) -> PeerClient {
        client_with(peer, None).await
    }

    async fn client_with(peer: Peer, early_acks: Option<EarlyAcks>) -> PeerClient {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServer::new(peer))
                .serve_with_incoming(crate::tls::testing::incoming(listener)),
        );
        let mut factory = NetworkFactory {
            channels: crate::tls::testing::channels(),
            early_acks,
        };
        let member = Member {
            id: 2,
            grpc_addr: addr,
            ..Member::default()
        };
        factory.new_client(2, &member).await
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: Vec::new(),
        }
    }

    fn peer(streams: bool) -> Peer {
        Peer {
            streams,
            unary: Arc::default(),
            streamed: Arc::default(),
            answer: success,
            gate: Arc::new(tokio::sync::Semaphore::new(1 << 20)),
        }
    }

    /// Sends three appends to a peer that does (or does not) know the stream; returns how many
    /// arrived (unary, streamed).
    async fn three_appends(streams: bool) -> (usize, usize) {
        let p = peer(streams);
        let mut client = client_of(p.clone()).await;
        for _ in 0..3 {
            let r = client
                .append_entries(heartbeat(), RPCOption::new(Duration::from_secs(5)))
                .await;
            assert!(matches!(r, Ok(AppendEntriesResponse::Success)), "{r:?}");
        }
        (
            p.unary.load(Ordering::Relaxed),
            p.streamed.load(Ordering::Relaxed),
        )
    }

    #[tokio::test]
    async fn appends_go_over_one_stream() {
        assert_eq!(three_appends(true).await, (0, 3));
    }

    #[tokio::test]
    async fn an_older_peer_without_the_stream_gets_unary_appends() {
        assert_eq!(three_appends(false).await, (3, 0));
    }

    /// An append is answered from an early acknowledgement only when one of the same vote
    /// covers its last entry; otherwise the peer's own answer counts. The peer here answers
    /// `Conflict` to everything, so a `Success` can only come from the acknowledgement.
    #[tokio::test]
    async fn an_append_is_answered_early_only_when_an_early_ack_of_its_vote_covers_it() {
        let mut p = peer(true);
        p.answer = conflict;
        p.gate = Arc::new(tokio::sync::Semaphore::new(0));
        let acks = EarlyAcks::default();
        let mut client = client_with(p.clone(), Some(acks.clone())).await;
        let leader = Vote::new_committed(1, 1);
        let ent = |index| openraft::testing::blank_ent::<TypeConfig>(1, 1, index);
        let append = |vote, index| AppendEntriesRequest {
            vote,
            prev_log_id: Some(ent(index - 1).log_id),
            leader_commit: None,
            entries: vec![ent(index)],
        };
        let ttl = || RPCOption::new(Duration::from_secs(10));
        acks.sender(2).send_replace(Some((leader, ent(3).log_id)));

        // Covered: answered while the peer still holds its own answer back.
        let r = client.append_entries(append(leader, 3), ttl()).await;
        assert!(matches!(r, Ok(AppendEntriesResponse::Success)), "{r:?}");
        p.gate.add_permits(1 << 20);

        // Past the acknowledged entry, another leader's vote, no entries: the peer's answer.
        for (vote, req) in [
            (leader, append(leader, 4)),
            (
                Vote::new_committed(2, 3),
                append(Vote::new_committed(2, 3), 3),
            ),
            (leader, heartbeat()),
        ] {
            let r = client.append_entries(req, ttl()).await;
            assert!(
                matches!(r, Ok(AppendEntriesResponse::Conflict)),
                "vote {vote}: {r:?}"
            );
        }
        // Every append reached the peer, the one answered early included, over one stream.
        assert_eq!(p.streamed.load(Ordering::Relaxed), 4);
    }
}
