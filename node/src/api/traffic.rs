//! `GET /v1/traffic`: this node's calls per server over its last minutes (`crate::traffic`),
//! for the console's charts. A tenant admin sees its own tenant's and global servers.

use axum::extract::State;
use axum::Json;
use mcpcp_proto::api::TrafficReport;

use super::extract::Authorized;
use super::AppState;
use crate::identity::surface::ObjectRead;

pub async fn get(
    State(state): State<AppState>,
    Authorized(caller, ObjectRead): Authorized<ObjectRead>,
) -> Json<TrafficReport> {
    // The names first, so the registry's lock is not held while the ring's is.
    let visible: std::collections::HashSet<String> = {
        let data = state.registry.local();
        data.state
            .servers
            .values()
            .filter(|s| caller.sees(s.spec.tenant.as_deref()))
            .map(|s| s.spec.name.clone())
            .collect()
    };
    Json(
        state
            .traffic
            .report(state.registry.id, crate::registry::now_unix(), |name| {
                visible.contains(name)
            }),
    )
}
