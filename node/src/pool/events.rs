//! What a server says outside any call, on its way from an upstream (a process, a remote
//! server's streams, a listen stream) to the pool, which passes it to the sessions it
//! concerns.

use mcpcp_proto::mcp::Message;

/// A message from the server that belongs to no call.
#[derive(Debug, Clone)]
pub enum PoolEvent {
    /// `notifications/*/list_changed`, `notifications/resources/updated`, stray logging.
    Notify(Message),
}
