//! Forwarding a call to the node that runs the server, over one bidirectional gRPC stream
//! per call (`proto/peer.proto`).
//!
//! The caller's node sends `Start`; the serving node runs the call on its pool and streams
//! back `Notify` (progress, logging) and `Ask` (the server's own requests), then `Done`. The
//! caller's node relays the client's answers to `Ask` as `Answer`. Closing the stream early
//! drops the call on the serving node, which cancels it upstream.

use std::collections::HashMap;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use mcpcp_proto::api::Member;
use mcpcp_proto::mcp::{code, ErrorObject, Message, RequestId};
use mcpcp_proto::peer::peer_client::PeerClient;
use mcpcp_proto::peer::peer_server::Peer;
use mcpcp_proto::peer::{EventsRequest, Frame as WireFrame, ServerInfoReply, ServerInfoRequest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::call::{Affinity, Call, CallError, CallEvent, EventSink, Responder};
use crate::pool::reconcile::Pools;
use crate::raft::network::PeerChannels;
use crate::registry::{Principal, Registry};
use crate::telemetry::InSpanExt;

/// One message on a call's stream.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame {
    Start {
        server: String,
        method: String,
        params: Option<Value>,
        principal: Principal,
        /// The downstream session, for servers with dedicated processes.
        #[serde(default)]
        affinity: Option<Box<Affinity>>,
    },
    Notify {
        message: Value,
    },
    Ask {
        key: i64,
        method: String,
        params: Option<Value>,
        /// The server's own string id of the request (older peers leave it out).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    Answer {
        key: i64,
        outcome: Result<Value, ErrorObject>,
    },
    Done {
        outcome: Result<Value, CallError>,
    },
}

impl Frame {
    fn wire(&self) -> WireFrame {
        WireFrame {
            json: serde_json::to_vec(self).unwrap_or_default(),
        }
    }

    fn parse(w: &WireFrame) -> Result<Frame, String> {
        serde_json::from_slice(&w.json).map_err(|e| e.to_string())
    }
}

/// The serving side of peer calls.
pub struct PeerService {
    pub registry: Registry,
    pub pools: Pools,
    /// The peers' open event streams, by whether they named their run
    /// (`crate::pool::departed::RunsNamed`).
    pub runs: std::sync::Arc<crate::pool::departed::RunsNamed>,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<WireFrame, Status>> + Send>>;

fn done(outcome: Result<Value, CallError>) -> FrameStream {
    let frame = Frame::Done { outcome }.wire();
    Box::pin(futures_util::stream::iter([Ok(frame)]))
}

#[tonic::async_trait]
impl Peer for PeerService {
    type CallStream = FrameStream;
    type EventsStream = FrameStream;

    async fn events(&self, req: Request<EventsRequest>) -> Result<Response<FrameStream>, Status> {
        let caller = req
            .extensions()
            .get::<crate::tls::peer::PeerInfo>()
            .and_then(|i| i.identity.as_ref())
            .map(|i| i.node);
        let EventsRequest {
            from_node: from,
            run,
        } = req.into_inner();
        let mut open = None;
        if run != 0 && caller != Some(from) {
            tracing::warn!(peer = from, certificate = ?caller, "an event stream asked for node {from} by a caller whose certificate does not name it: its holds are kept");
        } else {
            // Counted while the stream is open: the guard goes with the response stream.
            open = Some(self.runs.opened(from, run));
            let (pools, runs, registry) =
                (self.pools.clone(), self.runs.clone(), self.registry.clone());
            tokio::spawn(async move {
                if run != 0 {
                    // A peer asks at each start and after each break: what its earlier runs
                    // held on this node's servers is nobody's now (a run that stopped let go
                    // itself).
                    let back = crate::call::Departed::Restarted { node: from, run };
                    pools.let_go_of(back).await;
                }
                let members = crate::pool::departed::applied_members(&registry);
                crate::pool::departed::let_go_of_unattributed(&runs, &pools, &members, registry.id)
                    .await;
            });
        }
        let mut hub = self.pools.subscribe();
        let (tx, rx) = mpsc::channel::<Result<WireFrame, Status>>(256);
        tracing::debug!(peer = from, "relaying server notifications to a peer");
        tokio::spawn(async move {
            loop {
                let ev = match hub.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        // Ended: the peer opens it again, and takes every list of this node's
                        // servers as changed (`relay_from`).
                        tracing::warn!(
                            peer = from,
                            missed = n,
                            "notification relay fell behind; ending it"
                        );
                        return;
                    }
                    Err(_) => return,
                };
                // Only what this node's own processes said: no echoes between peers.
                if ev.origin.is_some() {
                    continue;
                }
                let json = json!({ "server": ev.server, "message": ev.message.to_value() });
                let frame = WireFrame {
                    json: serde_json::to_vec(&json).unwrap_or_default(),
                };
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
        let frames = ReceiverStream::new(rx).map(move |frame| {
            let _counted = &open;
            frame
        });
        Ok(Response::new(Box::pin(frames)))
    }

    async fn call(
        &self,
        req: Request<Streaming<WireFrame>>,
    ) -> Result<Response<FrameStream>, Status> {
        let caller = crate::telemetry::propagate::from_metadata(req.metadata());
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty call stream"))?;
        let Ok(Frame::Start {
            server,
            method,
            params,
            principal,
            affinity,
        }) = Frame::parse(&first)
        else {
            return Err(Status::invalid_argument("a call stream starts with Start"));
        };
        // The peer is a member (mutual TLS, `crate::tls::admission`); the principal it asserts
        // is checked again against this node's own token table.
        if !self.registry.still_holds(&principal) {
            metrics::counter!("mcpd_peer_calls_refused_total", "reason" => "principal")
                .increment(1);
            return Err(Status::permission_denied(format!(
                "token {} is unknown, revoked, expired or not of the asserted role and tenant",
                principal.token_id
            )));
        }
        let allowed = self
            .registry
            .local()
            .state
            .servers
            .get(&server)
            .is_some_and(|s| principal.may_use(&s.spec));
        if !allowed {
            return Ok(Response::new(done(Err(CallError::Answered(
                ErrorObject::new(code::INVALID_PARAMS, format!("unknown server {server:?}")),
            )))));
        }
        let Some(pool) = self.pools.get(&server) else {
            return Ok(Response::new(done(Err(CallError::NotRun(format!(
                "server {server:?} is not running on node {}; the call did not run",
                self.registry.id
            ))))));
        };
        metrics::counter!("mcpd_peer_calls_served_total", "server" => server.clone()).increment(1);
        let share = super::share(&self.registry, &principal);
        let (tx, rx) = mpsc::channel::<Result<WireFrame, Status>>(64);
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            parent: None,
            "peer.serve",
            otel.kind = "server",
            node = self.registry.id,
            mcp.server = %server,
            mcp.method.name = %method,
        );
        crate::telemetry::adopt(&span, caller);
        let serve = async move {
            let (ev_tx, mut ev_rx) = mpsc::channel(64);
            let call = pool.call_for(
                affinity.as_deref(),
                &share,
                &method,
                params,
                Some(EventSink::new(ev_tx)),
            );
            tokio::pin!(call);
            let mut responders: HashMap<i64, Responder> = HashMap::new();
            let mut next_key = 0i64;
            let mut client_open = true;
            loop {
                tokio::select! {
                    outcome = &mut call => {
                        let _ = tx.send(Ok(Frame::Done { outcome }.wire())).await;
                        return;
                    }
                    Some(ev) = ev_rx.recv() => {
                        let frame = match ev {
                            CallEvent::Notify(m) => Frame::Notify { message: m.to_value() },
                            CallEvent::Request { method, params, responder } => {
                                next_key += 1;
                                let name = responder.name().map(String::from);
                                responders.insert(next_key, responder);
                                Frame::Ask { key: next_key, method, params, name }
                            }
                        };
                        if tx.send(Ok(frame.wire())).await.is_err() {
                            return; // the caller is gone: dropping the call cancels it
                        }
                    }
                    msg = inbound.message(), if client_open => match msg {
                        Ok(Some(w)) => {
                            if let Ok(Frame::Answer { key, outcome }) = Frame::parse(&w) {
                                if let Some(r) = responders.remove(&key) {
                                    r.respond(outcome).await;
                                }
                            }
                        }
                        // The caller half-closed its side; the answer may still be wanted.
                        Ok(None) => client_open = false,
                        Err(_) => return,
                    },
                }
            }
        };
        tokio::spawn(serve.in_span(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn server_info(
        &self,
        req: Request<ServerInfoRequest>,
    ) -> Result<Response<ServerInfoReply>, Status> {
        let name = req.into_inner().server;
        let info = match self.pools.get(&name) {
            Some(pool) => {
                let cat = pool.catalogue();
                json!({
                    "init": pool.init_result(),
                    "slots": pool.states().iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                    "processes": pool.reports(),
                    "queue_depth": pool.queue_depth(),
                    "catalogue": {
                        "loaded": cat.loaded,
                        "tools": cat.tools,
                        "resources": cat.resources,
                        "resourceTemplates": cat.resource_templates,
                        "prompts": cat.prompts,
                    },
                })
            }
            None => Value::Null,
        };
        Ok(Response::new(ServerInfoReply {
            json: serde_json::to_vec(&info).unwrap_or_default(),
        }))
    }
}

/// Forwards `call` to `peer`, where it runs on the pool of `server`, relaying its events.
/// A peer that cannot be reached, or refuses the caller's token, did not run it; a stream
/// that breaks after the call started may have.
pub async fn call(
    channels: &PeerChannels,
    peer: &Member,
    server: &str,
    call: &Call,
) -> Result<Value, CallError> {
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        parent: crate::telemetry::parent(),
        "peer.call",
        otel.kind = "client",
        peer.node = peer.id,
        mcp.server = %server,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    let outcome = forward(channels, peer, server, call)
        .in_span(span.clone())
        .await;
    if let Err(e) = &outcome {
        crate::telemetry::failed(&span, e.label());
    }
    outcome
}

async fn forward(
    channels: &PeerChannels,
    peer: &Member,
    server: &str,
    call: &Call,
) -> Result<Value, CallError> {
    let not_reached = |e: &dyn std::fmt::Display| {
        CallError::NotRun(format!(
            "node {} is unreachable ({e}); the call did not run",
            peer.id
        ))
    };
    let broken = |e: &dyn std::fmt::Display| {
        CallError::Crashed(format!(
            "the call failed on node {} ({e}); it may or may not have run",
            peer.id
        ))
    };
    let channel = channels.get(&peer.grpc_addr).map_err(|e| not_reached(&e))?;
    let (out_tx, out_rx) = mpsc::channel::<WireFrame>(16);
    let start = Frame::Start {
        server: server.to_string(),
        method: call.method.clone(),
        params: call.params.clone(),
        principal: call.principal.clone(),
        affinity: call.affinity.clone().map(Box::new),
    };
    let _ = out_tx.send(start.wire()).await;
    let mut client = PeerClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut request = Request::new(ReceiverStream::new(out_rx));
    crate::telemetry::propagate::into_metadata(request.metadata_mut());
    let mut inbound = match client.call(request).await {
        Ok(r) => r.into_inner(),
        // Refused before it ran: the peer is unreachable, or does not yet know (or no longer
        // honours) the caller's token. Either way the call provably did not run there; only
        // the first is the replica's failure (a refused caller must not open its breaker).
        Err(s) if s.code() == tonic::Code::Unavailable => return Err(not_reached(&s.message())),
        Err(s) if s.code() == tonic::Code::PermissionDenied => {
            return Err(CallError::Refused(format!(
                "node refused the caller: {}; the call did not run",
                s.message()
            )))
        }
        Err(s) => return Err(broken(&s.message())),
    };
    metrics::counter!("mcpd_peer_forwards_total", "server" => server.to_string()).increment(1);
    let events = &call.events;
    let (ans_tx, mut ans_rx) = mpsc::channel::<Vec<u8>>(16);
    loop {
        tokio::select! {
            frame = inbound.message() => match frame {
                Ok(Some(w)) => match Frame::parse(&w) {
                    Ok(Frame::Done { outcome }) => return outcome,
                    Ok(Frame::Notify { message }) => {
                        if let Ok(m) = Message::from_value(message) {
                            let _ = events.send(CallEvent::Notify(m)).await;
                        }
                    }
                    Ok(Frame::Ask { key, method, params, name }) => {
                        let responder = Responder::new(ans_tx.clone(), RequestId::Num(key)).named(name);
                        let _ = events.send(CallEvent::Request { method, params, responder }).await;
                    }
                    Ok(_) => {}
                    Err(e) => return Err(broken(&format!("a bad frame: {e}"))),
                },
                Ok(None) => return Err(broken(&"it closed the call without an answer")),
                Err(s) => return Err(broken(&s.message())),
            },
            Some(line) = ans_rx.recv() => {
                if let Ok(Message::Response { id: RequestId::Num(key), outcome }) = Message::parse(&line) {
                    let _ = out_tx.send(Frame::Answer { key, outcome }.wire()).await;
                }
            }
        }
    }
}

/// What a peer says about its pool of `server` (`Value::Null` when it runs none).
pub async fn server_info(
    channels: &PeerChannels,
    peer: &Member,
    server: &str,
) -> Result<Value, String> {
    let channel = channels.get(&peer.grpc_addr).map_err(|e| e.to_string())?;
    let mut req = Request::new(ServerInfoRequest {
        server: server.to_string(),
    });
    req.set_timeout(std::time::Duration::from_secs(2));
    let reply = PeerClient::new(channel)
        .server_info(req)
        .await
        .map_err(|s| s.message().to_string())?;
    serde_json::from_slice(&reply.into_inner().json).map_err(|e| e.to_string())
}

/// Keeps one notification stream open from every peer and republishes what arrives into this
/// node's hub, so a session here receives `resources/updated` and `list_changed` of servers
/// that run elsewhere. Each stream is asked for with this node's run, so that a peer lets go of
/// the subscriptions this node's earlier runs held there. Runs until `shutdown`.
pub async fn relay_events(router: super::Router, shutdown: crate::shutdown::Shutdown) {
    let registry = &router.registry;
    let mut streams: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let mut members = registry.members();
        members.retain(|m| m.id != registry.id);
        streams.retain(|id, h| {
            let keep = members.iter().any(|m| m.id == *id) && !h.is_finished();
            if !keep {
                h.abort();
            }
            keep
        });
        for m in members {
            if streams.contains_key(&m.id) {
                continue;
            }
            let router = router.clone();
            let me = EventsRequest {
                from_node: registry.id,
                run: registry.run,
            };
            streams.insert(
                m.id,
                tokio::spawn(async move { relay_from(me, m, router).await }),
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = shutdown.clone().wait() => break,
        }
    }
    for (_, h) in streams {
        h.abort();
    }
}

async fn relay_from(me: EventsRequest, peer: Member, router: super::Router) {
    let Ok(channel) = router.channels.get(&peer.grpc_addr) else {
        return;
    };
    let mut client = PeerClient::new(channel);
    let Ok(resp) = client.events(Request::new(me)).await else {
        return; // retried by the supervisor loop
    };
    let mut stream = resp.into_inner();
    // What the peer announced while no stream was open is lost.
    router.lists_changed_on(peer.id);
    while let Ok(Some(frame)) = stream.message().await {
        let Ok(v) = serde_json::from_slice::<Value>(&frame.json) else {
            continue;
        };
        let (Some(server), Ok(message)) = (
            v["server"].as_str(),
            Message::from_value(v["message"].clone()),
        ) else {
            continue;
        };
        if message
            .method()
            .is_some_and(|m| m.ends_with("/list_changed"))
        {
            // Before the clients hear it: a list they ask for next is read again.
            router.peer_catalogues.forget(server);
        }
        router.pools.publish(crate::pool::ServerEvent {
            server: server.to_string(),
            message,
            origin: Some(peer.id),
        });
    }
    // The peer died, or the stream broke: what the servers only it runs offered is gone from
    // the lists here (their endpoints' lists pass to their fallbacks) until they are placed
    // elsewhere or it is back. (A peer removed from the membership has its task aborted.)
    router.lists_changed_on(peer.id);
}
