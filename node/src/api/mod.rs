//! The admin API of a node (axum): `/v1/`, `/metrics`, the probes and the protected-resource
//! metadata, and the extractors that authorize every caller through `crate::identity`
//! ([`extract`]), which the MCP front end uses too. `crate::http` puts these
//! routes and the MCP endpoints behind one set of layers.

pub mod approved_commands;
pub mod audit;
pub mod catalogue;
pub mod cluster;
pub mod cors;
pub mod error;
pub mod extract;
pub mod health;
pub mod host;
pub mod issuers;
pub mod limits;
pub mod listener;
pub mod objects;
pub mod pins;
pub mod policies;
pub mod promote;
pub mod request_body;
pub mod resource_metadata;
pub mod session;
pub mod snapshot;
pub mod traffic;
pub mod usage;
pub mod virtual_servers;
pub mod visible;

use axum::extract::FromRef;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::registry::Registry;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    /// Asks the node to stop and start again in place (`cluster promote --force-new-cluster`).
    pub restart: crate::shutdown::Restart,
    pub metrics: PrometheusHandle,
    /// The data plane's router (its peer channels ask peers for their pools' status).
    pub router: crate::route::Router,
    /// The edge's TLS mode, reported by `/readyz`.
    pub tls: crate::tls::edge::EdgeTlsMode,
    /// The node's data directory (a pending admin recovery is read from it).
    pub data_dir: std::path::PathBuf,
    /// Seals server `env` values before they are written (see `crate::seal`).
    pub data_key: crate::seal::DataKey,
    /// This node's certificates, for rotation.
    pub certs: crate::tls::Certificates,
    /// Who is calling (API tokens and trusted issuers' JWTs).
    pub identity: crate::identity::Identity,
    /// The compiled policy rules (for `POST /v1/policies/test`).
    pub policies: crate::policy::Policies,
    /// This node's recent figures per server (`GET /v1/traffic`).
    pub traffic: crate::traffic::Traffic,
}

impl FromRef<AppState> for crate::identity::Identity {
    fn from_ref(state: &AppState) -> crate::identity::Identity {
        state.identity.clone()
    }
}

impl FromRef<AppState> for Registry {
    fn from_ref(state: &AppState) -> Registry {
        state.registry.clone()
    }
}

/// The admin routes and `/metrics` (behind the Host check `crate::http` adds).
pub fn router<S: Clone + Send + Sync + 'static>(state: AppState) -> Router<S> {
    use cluster as c;
    use objects as o;
    let v1 = Router::new()
        .route("/node", get(c::node_info))
        .route("/node/rotate-certs", post(c::rotate_certs))
        .route("/cluster/init", post(c::init))
        .route("/cluster/recover-admin", post(c::recover_admin))
        .route("/cluster/join-tokens", post(c::create_join_token))
        .route("/cluster/join", post(c::join))
        .route("/cluster/status", get(c::status))
        .route("/cluster/promote", post(promote::promote))
        .route("/snapshot", get(snapshot::save))
        .route("/cluster/nodes", post(c::add_node))
        .route("/cluster/nodes/{id}", axum::routing::delete(c::remove_node))
        .route("/watch", get(c::watch))
        .route("/servers", get(o::list_servers).post(o::create_server))
        .route(
            "/servers/{name}",
            get(o::get_server)
                .put(o::put_server)
                .patch(o::patch_server)
                .delete(o::delete_server),
        )
        .route("/servers/{name}/status", get(o::server_status))
        .route("/servers/{name}/catalogue", get(catalogue::get))
        .route("/servers/{name}/diff", get(pins::diff))
        .route(
            "/servers/{name}/pins",
            axum::routing::put(pins::put).delete(pins::delete),
        )
        .route("/tenants", get(o::list_tenants).post(o::create_tenant))
        .route(
            "/tenants/{name}",
            get(o::get_tenant).delete(o::delete_tenant),
        )
        .route("/tokens", get(o::list_tokens).post(o::create_token))
        .route("/tokens/{id}", get(o::get_token).delete(o::revoke_token))
        .route("/policies", get(policies::list).post(policies::create))
        .route("/policies/test", post(policies::test))
        .route(
            "/policies/{name}",
            get(policies::get)
                .put(policies::put)
                .delete(policies::delete),
        )
        .route(
            "/session",
            get(session::get)
                .post(session::create)
                .delete(session::delete),
        )
        .route("/session/providers", get(session::providers))
        .route("/traffic", get(traffic::get))
        .route("/usage", get(usage::get))
        .route(
            "/approved-commands",
            get(approved_commands::list).post(approved_commands::create),
        )
        .route(
            "/approved-commands/{name}",
            get(approved_commands::get)
                .put(approved_commands::put)
                .delete(approved_commands::delete),
        )
        .route("/limits", get(limits::list).post(limits::create))
        .route(
            "/limits/{name}",
            get(limits::get).put(limits::put).delete(limits::delete),
        )
        .route("/limits/{name}/usage", get(limits::usage))
        .route(
            "/virtual-servers",
            get(virtual_servers::list).post(virtual_servers::create),
        )
        .route(
            "/virtual-servers/{name}",
            get(virtual_servers::get)
                .put(virtual_servers::put)
                .delete(virtual_servers::delete),
        )
        .route("/audit", get(audit::list))
        .route("/audit/retention", axum::routing::put(audit::set_retention))
        .route("/audit/verify", axum::routing::post(audit::verify))
        .route("/issuers", get(issuers::list).post(issuers::create))
        .route(
            "/issuers/{name}",
            get(issuers::get).put(issuers::put).delete(issuers::delete),
        );
    let v1 = v1.layer(axum::middleware::from_fn_with_state(
        cors::Members {
            registry: state.registry.clone(),
            tls: state.tls != crate::tls::edge::EdgeTlsMode::Off,
        },
        cors::members,
    ));
    use crate::identity::resource::METADATA_PATH;
    Router::new()
        .nest("/v1", v1)
        .route(METADATA_PATH, get(resource_metadata::root))
        .route(
            &format!("{METADATA_PATH}/{{*suffix}}"),
            get(resource_metadata::suffixed),
        )
        .route("/metrics", get(health::metrics))
        .with_state(state)
}

/// The probes: no Host check, since a load balancer or kubelet probes a node by whatever
/// address it has.
pub fn probes<S: Clone + Send + Sync + 'static>(state: AppState) -> Router<S> {
    Router::new()
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .with_state(state)
}
