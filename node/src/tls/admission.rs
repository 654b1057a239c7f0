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

use std::task::{Context, Poll};

use mcpcp_pki::ClusterId;

use super::members::Members;
use super::peer::PeerInfo;

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
