//! Distributed tracing: OpenTelemetry spans of MCP calls and registry writes, exported over
//! OTLP/gRPC to a collector (`[tracing]`; off by default).
//!
//! Spans are `tracing` spans of target [`TARGET`]; the `tracing-opentelemetry` layer turns
//! them into OpenTelemetry spans ([`pipeline`]). While tracing is off that target is disabled
//! for every layer, so their callsites are never enabled: a span costs one relaxed load of
//! the callsite's interest, and no context is read or written ([`propagate`]).
//!
//! The span tree of one MCP call (`ARCHITECTURE.md` draws it): the edge span
//! (`"METHOD TARGET"`; parent: the caller's context), then `mcp.policy` and `mcp.route` (its
//! attempts and the node that answered as attributes); under the route, per peer tried,
//! `peer.call` (client) → `peer.serve` (server, on the peer, parent from gRPC metadata); on
//! the serving node `pool.queue` and `upstream.call` (client; its context goes to the server
//! in `_meta`).
//! A registry write: `registry.write` → `registry.forward` (client) → `registry.write` on
//! the leader → `raft.propose` → `raft.fsync` and `raft.apply` of its entry.

pub mod config;
pub mod export;
pub mod in_span;
pub mod pipeline;
pub mod propagate;
pub mod span;

use std::sync::atomic::{AtomicBool, Ordering};

pub use config::TracingConfig;
pub use in_span::{current, parent, with_current, InSpanExt};
pub use pipeline::{Exporter, Source, SpanLayer, TracingError};
pub use span::{adopt, failed, Parent, Traces};

/// The `tracing` target of every span that is exported.
pub const TARGET: &str = "mcpd::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are made and exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}
