//! Answering peers: the gRPC services a node serves on its gRPC address.
//!
//! - `Raft`: openraft's append-entries, vote and snapshot chunks, JSON in and out.
//! - `Cluster`: writes, read barriers and membership changes forwarded by followers; each is
//!   handled as the leader or refused with `NotLeader`, never forwarded a second time. And
//!   certificates signed for a member that holds no CA key ([`super::signing`]).

use mcpcp_proto::cluster::cluster_server::Cluster;
use mcpcp_proto::cluster::{
    forwarded_answer, forwarded_call, ForwardWriteReply, ForwardWriteRequest, ForwardedAnswer,
    ForwardedCall, LeaseReply, LeaseRequest, MembershipReply, MembershipRequest, PingReply,
    PingRequest, ReadIndexReply, ReadIndexRequest, SignReply, SignRequest,
};
use mcpcp_proto::raft::raft_server;
use mcpcp_proto::raft::RaftPayload;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use super::Raft;
use crate::registry::{ForwardError, MembershipChange, Registry};
use crate::shutdown::Shutdown;
use crate::telemetry::InSpanExt;

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes).map_err(|e| Status::invalid_argument(format!("bad payload: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(value).map_err(|e| Status::internal(format!("encoding reply: {e}")))
}

/// The Raft service.
pub struct RaftService {
    pub raft: Raft,
}

/// The answers of an `AppendEntriesStream`, one per request.
pub type AppendAnswers = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    type AppendEntriesStreamStream = AppendAnswers;

    /// Answers each request of the stream in turn. The answers are produced as the response
    /// stream is polled, so no task of its own sits between the connection and Raft.
    async fn append_entries_stream(
        &self,
        req: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
        let inbound = req.into_inner();
        let raft = self.raft.clone();
        let answers =
            futures_util::stream::unfold((inbound, raft), |(mut inbound, raft)| async move {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    // The leader closed the stream, or it broke: nothing more to answer.
                    Ok(None) | Err(_) => return None,
                };
                let answer = match decode(&msg.data) {
                    Ok(rpc) => {
                        let res = raft.append_entries(rpc).await;
                        encode(&res).map(|data| RaftPayload { data })
                    }
                    Err(status) => Err(status),
                };
                Some((answer, (inbound, raft)))
            });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(&req.into_inner().data)?;
        let res = self.raft.append_entries(rpc).await;
        Ok(Response::new(RaftPayload {
            data: encode(&res)?,
        }))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(&req.into_inner().data)?;
        let res = self.raft.vote(rpc).await;
        Ok(Response::new(RaftPayload {
            data: encode(&res)?,
        }))
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(&req.into_inner().data)?;
        let res = self.raft.install_snapshot(rpc).await;
        Ok(Response::new(RaftPayload {
            data: encode(&res)?,
        }))
    }
}

/// The forwarding service.
pub struct ClusterService {
    pub registry: Registry,
    /// Signs for members without the CA key, when this node holds it.
    pub tls: Arc<crate::tls::NodeTls>,
    /// Ends the `Forward` streams' intake when the node stops.
    pub shutdown: Shutdown,
}

/// The answers of a `Forward` stream, in the order the calls finish.
pub type ForwardAnswers =
    Pin<Box<dyn Stream<Item = Result<ForwardedAnswer, Status>> + Send + 'static>>;

/// Calls of one `Forward` stream running at once; more are refused as busy (the follower
/// retries them after a pause). A follower sends one per write or read waiting on it.
pub const MAX_FORWARDED_IN_FLIGHT: usize = 1024;

/// A call of a `Forward` stream, decoded.
#[derive(Debug)]
enum Forwarded {
    /// A write, and the `traceparent` of the forwarding node's span.
    Write(Box<crate::registry::state::Request>, String),
    ReadIndex,
}

/// Decodes a call; `Err`: why it is refused.
fn decode_forwarded(call: Option<forwarded_call::Call>) -> Result<Forwarded, String> {
    match call {
        Some(forwarded_call::Call::Write(w)) => decode(&w.command)
            .map(|r| Forwarded::Write(Box::new(r), w.traceparent))
            .map_err(|s| s.message().to_string()),
        Some(forwarded_call::Call::ReadIndex(_)) => Ok(Forwarded::ReadIndex),
        None => Err("call: not set".into()),
    }
}

/// The leader's span of a forwarded write, a child of the forwarding node's.
fn forwarded_write_span(traceparent: &str) -> tracing::Span {
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        parent: None,
        "registry.write",
        otel.kind = "server",
        forwarded = true,
    );
    crate::telemetry::adopt(
        &span,
        crate::telemetry::propagate::from_traceparent(traceparent),
    );
    span
}

/// Answers one call of a `Forward` stream as the leader.
async fn answer_forwarded(registry: &Registry, call: ForwardedCall) -> ForwardedAnswer {
    use forwarded_answer::Answer;
    let answer = match decode_forwarded(call.call) {
        Ok(Forwarded::Write(request, traceparent)) => {
            let written = registry
                .write_as_leader(*request)
                .in_span(forwarded_write_span(&traceparent))
                .await;
            encode(&written).map(|result| Answer::Write(ForwardWriteReply { result }))
        }
        Ok(Forwarded::ReadIndex) => encode(&registry.read_index_as_leader().await)
            .map(|result| Answer::ReadIndex(ReadIndexReply { result })),
        Err(why) => Ok(Answer::Refused(why)),
    };
    ForwardedAnswer {
        id: call.id,
        answer: Some(answer.unwrap_or_else(|s| Answer::Refused(s.message().into()))),
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    type ForwardStream = ForwardAnswers;

    /// Runs each call of the stream in a task of its own (a write waits for its commit, and
    /// the calls behind it must not wait for that), at most [`MAX_FORWARDED_IN_FLIGHT`] at
    /// once, and streams the answers back as they come. The stream ends once the follower
    /// closes it (or the node stops) and the calls already running are answered.
    async fn forward(
        &self,
        req: Request<Streaming<ForwardedCall>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = req.into_inner();
        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_FORWARDED_IN_FLIGHT));
            let stopping = shutdown.wait();
            tokio::pin!(stopping);
            loop {
                let call = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(call)) => call,
                        // The follower closed the stream, or it broke.
                        Ok(None) | Err(_) => break,
                    },
                    _ = &mut stopping => break,
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    let _ = tx.send(Ok(ForwardedAnswer {
                        id: call.id,
                        answer: Some(forwarded_answer::Answer::Refused(format!(
                            "busy: {MAX_FORWARDED_IN_FLIGHT} forwarded calls running on this stream"
                        ))),
                    }));
                    continue;
                };
                let registry = registry.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(Ok(answer_forwarded(&registry, call).await));
                    drop(slot);
                });
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn forward_write(
        &self,
        req: Request<ForwardWriteRequest>,
    ) -> Result<Response<ForwardWriteReply>, Status> {
        let req = req.into_inner();
        let request = decode(&req.command)?;
        let res = self
            .registry
            .write_as_leader(request)
            .in_span(forwarded_write_span(&req.traceparent))
            .await;
        Ok(Response::new(ForwardWriteReply {
            result: encode(&res)?,
        }))
    }

    async fn read_index(
        &self,
        _req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        let res = self.registry.read_index_as_leader().await;
        Ok(Response::new(ReadIndexReply {
            result: encode(&res)?,
        }))
    }

    async fn change_membership(
        &self,
        req: Request<MembershipRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let change: MembershipChange = decode(&req.into_inner().change)?;
        let res: Result<(), ForwardError> = self.registry.change_membership_as_leader(change).await;
        Ok(Response::new(MembershipReply {
            result: encode(&res)?,
        }))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        let ask: crate::registry::lease::LeaseAsk = decode(&req.into_inner().json)?;
        let res = self.registry.lease_as_leader(&ask).await;
        Ok(Response::new(LeaseReply {
            json: encode(&res)?,
        }))
    }

    async fn ping(&self, _req: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        let m = self.registry.raft.metrics().borrow().clone();
        Ok(Response::new(PingReply {
            node_id: m.id,
            term: m.current_term,
            applied_index: m.last_applied.map(|l| l.index),
            leader: m.current_leader,
            state_format: Some(crate::registry::state::STATE_FORMAT),
            restored_as: self.registry.local().state.restored_as.clone(),
        }))
    }

    /// Signs for the node the caller's mutual-TLS certificate names (the admission layer has
    /// checked it is a current member); the request cannot choose another id.
    async fn sign_certificates(
        &self,
        req: Request<SignRequest>,
    ) -> Result<Response<SignReply>, Status> {
        let caller = req
            .extensions()
            .get::<crate::tls::peer::PeerInfo>()
            .and_then(|i| i.identity.clone())
            .ok_or_else(|| Status::permission_denied("the caller's certificate names no node"))?;
        let request = super::signing::from_wire_request(req.into_inner());
        let result = crate::tls::signer::sign_for_member(
            self.tls.ca.as_ref(),
            &caller,
            &request,
            self.tls.ttl(),
        );
        let outcome = match &result {
            Ok(_) => "signed",
            Err(crate::tls::signer::SignError::NoCaKey) => "no_ca_key",
            Err(_) => "bad_request",
        };
        metrics::counter!("mcpd_tls_signed_for_members_total", "outcome" => outcome).increment(1);
        tracing::info!(caller = %caller, outcome, peer = request.peer_csr.is_some(), edge = ?request.edge.as_ref().map(|e| &e.names), "certificate request from a member");
        super::signing::reply(result).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_call_that_cannot_be_read_is_refused_naming_why() {
        assert_eq!(decode_forwarded(None).unwrap_err(), "call: not set");
        let bad = forwarded_call::Call::Write(ForwardWriteRequest {
            command: b"{not json".to_vec(),
            traceparent: String::new(),
        });
        let why = decode_forwarded(Some(bad)).unwrap_err();
        assert!(why.starts_with("bad payload"), "{why}");
        let read = forwarded_call::Call::ReadIndex(ReadIndexRequest {});
        assert!(matches!(
            decode_forwarded(Some(read)),
            Ok(Forwarded::ReadIndex)
        ));
    }
}
