//! What each part of the node's HTTP surface asks of its caller: the roles that may use it and
//! the OAuth scope a JWT must carry for it. One table, read by the extractors in
//! `crate::api::extract` and printed in `deploy/README.md` ("Roles"); handlers narrow a
//! tenant-scoped role to its own tenant's objects.

use mcpcp_proto::api::{scope, Role};

/// A part of the surface.
pub trait Surface: Default + Send {
    /// Roles that may call it.
    const ROLES: &'static [Role];
    /// The scope a JWT caller's token must carry.
    const SCOPE: &'static str;
    /// What the refusal tells a caller of another role.
    const NEEDS: &'static str;
}

/// MCP endpoints: `/mcp`, `/servers/NAME/mcp`.
#[derive(Debug, Default)]
pub struct Mcp;

/// Reading the cluster itself: members, status, the watch stream.
#[derive(Debug, Default)]
pub struct ClusterRead;

/// Changing the cluster itself: members, join tokens, certificates, tenants, issuers.
#[derive(Debug, Default)]
pub struct ClusterWrite;

/// Reading servers, tenants, tokens and issuers (a tenant admin: its own tenant's); signing in
/// to the console.
#[derive(Debug, Default)]
pub struct ObjectRead;

/// Writing servers and tokens (a tenant admin: its own tenant's, remote servers only).
#[derive(Debug, Default)]
pub struct ObjectWrite;

/// Enabling and disabling servers, besides what [`ObjectWrite`] allows.
#[derive(Debug, Default)]
pub struct Operate;

/// `/metrics`.
#[derive(Debug, Default)]
pub struct MetricsRead;

impl Surface for Mcp {
    const ROLES: &'static [Role] = &[Role::ClusterAdmin, Role::TenantAdmin, Role::User];
    const SCOPE: &'static str = scope::MCP;
    const NEEDS: &'static str = "MCP needs a cluster-admin, tenant-admin or user token";
}

impl Surface for ClusterRead {
    const ROLES: &'static [Role] = &[Role::ClusterAdmin, Role::Operator, Role::Viewer];
    const SCOPE: &'static str = scope::ADMIN_READ;
    const NEEDS: &'static str = "this endpoint needs a cluster-admin, operator or viewer token";
}

impl Surface for ClusterWrite {
    const ROLES: &'static [Role] = &[Role::ClusterAdmin];
    const SCOPE: &'static str = scope::ADMIN_WRITE;
    const NEEDS: &'static str = "this endpoint needs a cluster-admin token";
}

impl Surface for ObjectRead {
    const ROLES: &'static [Role] = &[
        Role::ClusterAdmin,
        Role::TenantAdmin,
        Role::Operator,
        Role::Viewer,
    ];
    const SCOPE: &'static str = scope::ADMIN_READ;
    const NEEDS: &'static str =
        "this endpoint needs a cluster-admin, tenant-admin, operator or viewer token";
}

impl Surface for ObjectWrite {
    const ROLES: &'static [Role] = &[Role::ClusterAdmin, Role::TenantAdmin];
    const SCOPE: &'static str = scope::ADMIN_WRITE;
    const NEEDS: &'static str = "this endpoint needs a cluster-admin or tenant-admin token";
}

impl Surface for Operate {
    const ROLES: &'static [Role] = &[Role::ClusterAdmin, Role::TenantAdmin, Role::Operator];
    const SCOPE: &'static str = scope::ADMIN_WRITE;
    const NEEDS: &'static str =
        "this endpoint needs a cluster-admin, tenant-admin or operator token";
}

impl Surface for MetricsRead {
    const ROLES: &'static [Role] = &[
        Role::ClusterAdmin,
        Role::Operator,
        Role::Viewer,
        Role::Metrics,
    ];
    const SCOPE: &'static str = scope::ADMIN_READ;
    const NEEDS: &'static str =
        "/metrics needs a metrics, viewer, operator or cluster-admin token (mcpctl token create --role metrics)";
}
