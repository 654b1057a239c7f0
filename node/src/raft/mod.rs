//! Raft plumbing: how the registry is replicated. Split as openraft's own examples split it:
//! [`log_store`] (the durable log and vote), [`state_machine`] (applying entries to the
//! registry), [`network`] (calling peers over gRPC) and [`service`] (answering peers).
//! Nothing here knows what a server or a token is beyond handing commands to
//! [`crate::registry::state::State`].

pub mod early;
pub mod log_store;
pub mod network;
pub mod service;
pub mod signing;
pub mod state_machine;
pub mod watchdog;

use std::io::Cursor;

use mcpcp_proto::api::Member;

use crate::registry::state::{CommandResult, Proposal};

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The Raft type configuration of the registry.
    pub TypeConfig:
        D = Proposal,
        R = Vec<CommandResult>,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of a node.
pub type Raft = openraft::Raft<TypeConfig>;

/// openraft's generic types pinned to [`TypeConfig`].
pub mod typ {
    use super::{NodeId, TypeConfig};
    use mcpcp_proto::api::Member;

    pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
    pub type RPCError<E = openraft::error::Infallible> =
        openraft::error::RPCError<NodeId, Member, RaftError<E>>;
    pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, Member>;
    pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, Member>;
    pub type ForwardToLeader = openraft::error::ForwardToLeader<NodeId, Member>;
    pub type InitializeError = openraft::error::InitializeError<NodeId, Member>;
    pub type LogId = openraft::LogId<NodeId>;
    pub type StorageError = openraft::StorageError<NodeId>;
    pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
    pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
    pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
    pub type Entry = openraft::Entry<TypeConfig>;
    pub type Vote = openraft::Vote<NodeId>;
    pub type RaftMetrics = openraft::RaftMetrics<NodeId, Member>;
}
