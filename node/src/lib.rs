//! `mcpd`: one node of the MCP control plane.
//!
//! - [`raft`]: replication of the registry (openraft over gRPC, redb storage).
//! - [`registry`]: the replicated state, its commands and the handle the rest of the node uses.
//! - [`api`]: the admin API, probes and metrics over HTTP (axum).
//! - [`shard`]: the data plane's threads (one single-threaded runtime each).
//! - [`app`]: assembling and running a node; [`config`]: its configuration.
//!
//! `ARCHITECTURE.md` at the repository root draws the paths a request takes through these.

pub mod api;
pub mod app;
pub mod audit_key;
pub mod call;
pub mod call_audit;
pub mod config;
pub mod console;
pub mod demo;
pub mod http;
pub mod identity;
pub mod join;
pub mod limits;
pub mod mcp;
pub mod metrics;
pub mod pinning;
pub mod policy;
pub mod pool;
pub mod raft;
pub mod recovery;
pub mod registry;
pub mod restore;
pub mod route;
pub mod seal;
pub mod shard;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod traffic;
pub mod usage;
