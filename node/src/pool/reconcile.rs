//! Keeps the node's pools equal to the registry: a server added, changed, disabled or removed
//! takes effect without a restart.
//!
//! The reconciler never trusts a single event: every change (or a `reset`, or falling behind
//! the watch) triggers a full diff of the desired set (enabled servers) against the running
//! pools, so a missed event cannot leave a pool behind. A changed server gets a new pool at
//! once; the old one drains (in-flight calls finish, up to the request timeout) in the
//! background.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mcpcp_proto::api::{ObjectKind, ServerSpec, Versioned, WatchEvent};

use crate::seal::DataKey;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;

use super::{Pool, PoolConfig, ServerEvent};
use crate::registry::Registry;
use crate::shard::ShardHandles;
use crate::shutdown::Shutdown;

/// The running pools by server name, shared with the MCP front end, and the hub of their
/// notifications.
#[derive(Clone)]
pub struct Pools {
    inner: Arc<RwLock<HashMap<String, Arc<Pool>>>>,
    hub: broadcast::Sender<ServerEvent>,
    /// Where the processes run (pools take the shards in turn, slot after slot); `None`: on
    /// the caller's runtime.
    shards: Option<ShardHandles>,
}

impl Default for Pools {
    fn default() -> Self {
        Pools {
            inner: Arc::default(),
            hub: broadcast::channel(4096).0,
            shards: None,
        }
    }
}

impl Pools {
    /// Pools whose processes run on `shards`.
    pub fn on(shards: ShardHandles) -> Pools {
        Pools {
            shards: Some(shards),
            ..Pools::default()
        }
    }

    /// Every pool's notifications that belong to no call, tagged with the server.
    pub fn subscribe(&self) -> broadcast::Receiver<ServerEvent> {
        self.hub.subscribe()
    }

    /// Republishes a notification of a server that runs on another node.
    pub fn publish(&self, event: ServerEvent) {
        let _ = self.hub.send(event);
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pool>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self
            .inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Lets go, on every pool, of the subscriptions that sessions of a departed node held
    /// (`crate::call::Departed`).
    pub async fn let_go_of(&self, departed: crate::call::Departed) {
        let all = self.all();
        let each = all.iter().map(|p| p.let_go_of(departed));
        futures_util::future::join_all(each).await;
    }

    fn replace(&self, name: &str, pool: Option<Arc<Pool>>) -> Option<Arc<Pool>> {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match pool {
            Some(p) => map.insert(name.to_string(), p),
            None => map.remove(name),
        }
    }
}

/// The servers this node should run: enabled ones without `replicas` (they run everywhere)
/// and those the leader placed here.
fn desired(registry: &Registry) -> BTreeMap<String, Versioned<ServerSpec>> {
    let data = registry.local();
    data.state
        .servers
        .iter()
        .filter(|(n, s)| {
            s.spec.enabled
                && (s.spec.replicas.is_none()
                    || data
                        .state
                        .placements
                        .get(*n)
                        .is_some_and(|p| p.contains(&registry.id)))
        })
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect()
}

/// Starts, replaces and stops pools so that they match [`desired`]. A server's sealed `env`
/// and `headers` values and OAuth client secret are opened here, for its processes or
/// connections only (see `crate::seal`).
fn reconcile(
    registry: &Registry,
    pools: &Pools,
    cfg: &PoolConfig,
    key: &DataKey,
    draining: &mut JoinSet<()>,
) {
    let want = desired(registry);
    for (name, spec) in &want {
        let current = pools.get(name);
        if current
            .as_ref()
            .is_some_and(|p| p.spec.revision == spec.revision)
        {
            continue;
        }
        let mut opened = spec.clone();
        if let Err(e) = key.open_secrets(&mut opened.spec) {
            metrics::counter!("mcpd_pool_start_refusals_total", "reason" => "sealed_env")
                .increment(1);
            tracing::error!(server = %name, error = %e, "not starting the server: its sealed env, headers or OAuth client secret do not open with this node's data key (is data.key the cluster's?)");
            continue;
        }
        for inherited in &cfg.inherit_env {
            if let (false, Ok(v)) = (
                opened.spec.env.contains_key(inherited),
                std::env::var(inherited),
            ) {
                opened.spec.env.insert(inherited.clone(), v);
            }
        }
        tracing::info!(server = %name, revision = spec.revision, replacing = current.is_some(), "starting pool");
        let old = pools.replace(
            name,
            Some(Pool::start(
                opened,
                cfg.clone(),
                pools.hub.clone(),
                pools.shards.clone(),
            )),
        );
        if let Some(old) = old {
            let drain = Duration::from_millis(old.spec.spec.timeouts.request_ms);
            draining.spawn(async move { old.shutdown(drain).await });
        }
    }
    for pool in pools.all() {
        if !want.contains_key(&pool.name) {
            tracing::info!(server = %pool.name, "stopping pool (server removed or disabled)");
            pools.replace(&pool.name, None);
            let drain = Duration::from_millis(pool.spec.spec.timeouts.request_ms);
            draining.spawn(async move { pool.shutdown(drain).await });
        }
    }
    metrics::gauge!("mcpd_pools").set(pools.all().len() as f64);
}

/// Runs until `shutdown`, then stops every pool.
pub async fn run(
    registry: Registry,
    pools: Pools,
    cfg: PoolConfig,
    key: DataKey,
    shutdown: Shutdown,
) {
    let mut sub = registry.subscribe(None).live;
    let mut draining = JoinSet::new();
    reconcile(&registry, &pools, &cfg, &key, &mut draining);
    loop {
        tokio::select! {
            ev = sub.recv() => match ev {
                Ok(WatchEvent::Put { kind: ObjectKind::Server | ObjectKind::Placement, .. })
                | Ok(WatchEvent::Delete { kind: ObjectKind::Server | ObjectKind::Placement, .. })
                | Ok(WatchEvent::Reset { .. })
                | Err(RecvError::Lagged(_)) => reconcile(&registry, &pools, &cfg, &key, &mut draining),
                Ok(_) => {}
                Err(RecvError::Closed) => break,
            },
            Some(_) = draining.join_next(), if !draining.is_empty() => {}
            _ = shutdown.clone().wait() => break,
        }
    }
    for pool in pools.all() {
        pools.replace(&pool.name, None);
        draining.spawn(async move { pool.shutdown(Duration::from_secs(2)).await });
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while draining.join_next().await.is_some() {}
    })
    .await;
}
