//! What the end-to-end tests and benchmarks (`mcpcp-tests`) and the chaos harness
//! (`mcpcp-chaos`) share, so that each is written once:
//! - [`mcp_http`]: a plain Streamable HTTP MCP client, what a curl user does, with every
//!   outcome of a request classified ([`Reply`]) and a session on top ([`McpSession`]);
//! - starting `mcpd` nodes: `mcpctl::launch`, which `mcpctl dev up` uses too.
//!
//! The benchmark's load generator (`mcp-bench`) keeps its own raw hyper client: it measures
//! the gateway's cost per call, and reqwest's own overhead would be counted in it.

pub mod mcp_http;

pub use mcp_http::{HttpMcp, McpSession, Reply, PROTOCOL_VERSION};
