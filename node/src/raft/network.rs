//! Calling peers over gRPC: the Raft RPCs openraft sends, through one cached channel per peer.
//!
//! Failures are reported the way openraft expects: `Unreachable` when the peer cannot be
//! connected to (openraft backs off), `Network` when a call failed on the way, and
//! `RemoteError` when the peer answered with a Raft error.

use std::collections::HashMap;
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
use tonic::transport::{Channel, Endpoint};

use super::typ::{RPCError, RaftError};
use super::{NodeId, TypeConfig};

/// One lazily connected channel per peer address, shared by Raft and forwarding.
#[derive(Clone)]
pub struct PeerChannels {
    inner: Arc<Mutex<HashMap<String, Channel>>>,
    connect_timeout: Duration,
}

impl PeerChannels {
    pub fn new(connect_timeout: Duration) -> Self {
        PeerChannels {
            inner: Arc::default(),
            connect_timeout,
        }
    }

    /// The channel to `grpc_addr`, created on first use. Connection happens lazily and is
    /// re-established by tonic after failures.
    pub fn get(&self, grpc_addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = map.get(grpc_addr) {
            return Ok(ch.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{grpc_addr}"))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        map.insert(grpc_addr.to_string(), ch.clone());
        Ok(ch)
    }
}

/// Creates per-peer Raft clients for openraft.
#[derive(Clone)]
pub struct NetworkFactory {
    pub channels: PeerChannels,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        PeerClient {
            target,
            addr: node.grpc_addr.clone(),
            channel: self
                .channels
                .get(&node.grpc_addr)
                .map_err(|e| e.to_string()),
        }
    }
}

/// The Raft client of one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    channel: Result<Channel, String>,
}

/// Whether a tonic status means the request never reached the peer's Raft.
fn is_unreachable(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable)
}

impl PeerClient {
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
        let channel = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(format!("bad address {}: {e}", self.addr)),
                )))
            }
        };
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(option.hard_ttl());
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let started = std::time::Instant::now();
        let reply = match rpc {
            "append_entries" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        metrics::histogram!("mcpd_raft_rpc_seconds", "rpc" => rpc)
            .record(started.elapsed().as_secs_f64());
        let reply = reply.map_err(|status| {
            metrics::counter!("mcpd_raft_rpc_failures_total", "rpc" => rpc).increment(1);
            if is_unreachable(&status) {
                RPCError::Unreachable(Unreachable::new(&status))
            } else {
                RPCError::Network(NetworkError::new(&status))
            }
        })?;
        let result: Result<Resp, RaftError<E>> =
            serde_json::from_slice(&reply.into_inner().data)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError> {
        self.call("append_entries", &rpc, &option).await
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
