//! Every wire format of the MCP control plane in one crate, so that `mcpd`, `mcpctl`,
//! `mcp-bridge`, the chaos harness and the end-to-end tests agree on them by construction:
//!
//! - [`raft`] and [`cluster`]: the gRPC services between nodes, generated from `proto/*.proto`.
//! - [`api`]: the JSON bodies of the admin API (`/v1/...`).
//! - [`audit`]: the audit trail's events and their hash chain (the node writes it, `mcpctl`
//!   verifies it).
//! - [`mcp`]: the MCP JSON-RPC envelope, error codes and protocol revisions.
//! - [`sse`]: reading the server-sent-event streams of Streamable HTTP.
//! - [`snapshot`]: the registry snapshot file (`mcpctl snapshot save|restore`).

pub mod api;
pub mod audit;
pub mod mcp;
pub mod snapshot;
pub mod sse;

/// Raft transport between nodes (`proto/raft.proto`).
pub mod raft {
    tonic::include_proto!("mcpcp.raft.v1");
}

/// Write forwarding and read barriers between nodes (`proto/cluster.proto`).
pub mod cluster {
    tonic::include_proto!("mcpcp.cluster.v1");
}

/// MCP calls forwarded to the node that runs the server (`proto/peer.proto`).
pub mod peer {
    tonic::include_proto!("mcpcp.peer.v1");
}
