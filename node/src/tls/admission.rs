//! Who may call this node's gRPC services: a node of this cluster that is a member now.
//!
//! The handshake ([`super::peer`]) proved the caller holds a certificate of the cluster CA;
//! this layer checks, on every call, what the certificate names: this cluster, and a node id
//! that the membership holds (voter or learner). A removed node is refused from the moment its
//! removal reaches this node's membership. A node that has no membership yet (never
//! initialised, or about to be added) admits any node of its cluster: that is how the first
//! election and a joining learner's first append reach it.
//!
//! Refusals answer `PERMISSION_DENIED`, count in
//! `mcpd_grpc_refused_total{reason}` and are logged with the caller's address and identity.

use std::sync::Arc;
use std::task::{Context, Poll};

use mcpcp_pki::ClusterId;

use super::peer::PeerInfo;

/// Whether node `id` is a member (voter or learner) of the membership this node knows, or
/// this node knows none yet.
pub type MembersCheck = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// The membership check, set once Raft runs (the channels that dial peers are made before
/// it). Until it is set, any node of the cluster is taken: that is start-up only.
#[derive(Clone, Default)]
pub struct Members(Arc<std::sync::OnceLock<MembersCheck>>);

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Members(..)")
    }
}

impl Members {
    /// Sets the check; a second call changes nothing.
    pub fn set(&self, check: MembersCheck) {
        let _ = self.0.set(check);
    }

    /// Whether node `id` is a member (or the check is not set yet).
    pub fn admits(&self, id: u64) -> bool {
        self.0.get().is_none_or(|check| check(id))
    }
}

/// The tower layer that admits members only.
#[derive(Clone)]
pub struct MembersOnly {
    cluster: ClusterId,
    members: Members,
}

impl MembersOnly {
    pub fn new(cluster: ClusterId, members: Members) -> Self {
        MembersOnly { cluster, members }
    }

    /// `Err(reason)` when the caller must be refused.
    fn check(&self, info: Option<&PeerInfo>) -> Result<(), &'static str> {
        let identity = info
            .ok_or("no TLS peer")?
            .identity
            .as_ref()
            .ok_or("certificate names no node")?;
        if identity.cluster != self.cluster {
            return Err("another cluster");
        }
        if !self.members.admits(identity.node) {
            return Err("not a member");
        }
        Ok(())
    }
}

impl<S> tower::Layer<S> for MembersOnly {
    type Service = Admitted<S>;

    fn layer(&self, inner: S) -> Admitted<S> {
        Admitted {
            inner,
            gate: self.clone(),
        }
    }
}

/// A gRPC service behind [`MembersOnly`].
#[derive(Clone)]
pub struct Admitted<S> {
    inner: S,
    gate: MembersOnly,
}

impl<S, B> tower::Service<http::Request<B>> for Admitted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures_util::future::Either<S::Future, std::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let info = req.extensions().get::<PeerInfo>();
        match self.gate.check(info) {
            Ok(()) => futures_util::future::Either::Left(self.inner.call(req)),
            Err(reason) => {
                metrics::counter!("mcpd_grpc_refused_total", "reason" => reason).increment(1);
                tracing::warn!(
                    remote = ?info.map(|i| i.remote),
                    identity = ?info.and_then(|i| i.identity.as_ref()).map(|i| i.uri()),
                    path = %req.uri().path(),
                    reason,
                    "refused a gRPC call"
                );
                let status = tonic::Status::permission_denied(format!(
                    "refused: {reason} (gRPC between nodes admits current members of this cluster only)"
                ));
                futures_util::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
