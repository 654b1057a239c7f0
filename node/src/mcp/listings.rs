//! When what an endpoint lists changes in the registry rather than in a server: a server
//! added, changed, disabled or removed, its approved tools changed, a virtual server
//! changed, or a policy changed (what any caller may see). A server's own changes come as its
//! `notifications/*/list_changed` (and the first catalogue a server loads is announced by its
//! pool): this covers the rest.
//!
//! One task per node ([`watch`]) follows the registry and sends what changed, batched, to the
//! endpoints' listeners: a session's standalone stream (`super::http`) and a
//! `subscriptions/listen` stream (`super::stateless`). Each tells its client when the change
//! may alter its lists ([`Changed::concerns`]), with the three `list_changed` notifications.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use mcpcp_proto::api::{ObjectKind, WatchEvent};
use mcpcp_proto::mcp::Message;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::target::Target;
use crate::pool::catalogue::{list_changed, LISTS};
use crate::registry::{Principal, Registry};
use crate::shutdown::Shutdown;

/// What changed in one batch of registry changes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Changed {
    /// Servers added, changed or removed, with the tenants they belonged to, before and
    /// after (`None`: a global server).
    servers: BTreeMap<String, BTreeSet<Option<String>>>,
    /// Virtual servers added, changed or removed.
    virtuals: BTreeSet<String>,
    /// What any caller may see may have changed (a policy), or the watch fell behind.
    everything: bool,
}

impl Changed {
    fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.virtuals.is_empty() && !self.everything
    }

    /// Whether the lists `principal` reads on `target` may differ after this change.
    pub fn concerns(&self, principal: &Principal, target: &Target) -> bool {
        if self.everything {
            return true;
        }
        let sees = |tenants: &BTreeSet<Option<String>>| {
            tenants
                .iter()
                .any(|t| principal.may_use_servers_of(t.as_deref()))
        };
        match target {
            Target::Aggregate => self.servers.values().any(sees),
            Target::Server(name) => self.servers.contains_key(name),
            Target::Virtual(name) => {
                self.virtuals.contains(name) || self.servers.values().any(sees)
            }
        }
    }

    /// The notifications a client of a concerned list is sent.
    pub fn notifications() -> [Message; 3] {
        LISTS.map(list_changed)
    }
}

/// Where the node's listeners hear of [`Changed`]. Cheap to clone.
#[derive(Clone)]
pub struct Listings(broadcast::Sender<Arc<Changed>>);

impl Default for Listings {
    fn default() -> Self {
        Listings(broadcast::channel(64).0)
    }
}

impl Listings {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Changed>> {
        self.0.subscribe()
    }
}

/// How long after a change the changes that follow it join its batch: an operator's script
/// that adds ten servers makes each client list again once, not ten times.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

/// Follows the registry until `shutdown`, sending each batch of changes (those within
/// [`BATCH_WINDOW`] of its first) to the node's listeners.
pub async fn watch(registry: Registry, listings: Listings, shutdown: Shutdown) {
    let mut sub = registry.subscribe(None).live;
    let mut owners = tenants_of_servers(&registry);
    loop {
        let first = tokio::select! {
            ev = sub.recv() => ev,
            _ = shutdown.clone().wait() => return,
        };
        let mut changed = Changed::default();
        let window = tokio::time::Instant::now() + BATCH_WINDOW;
        let mut next = Some(first);
        while let Some(ev) = next.take() {
            match ev {
                Ok(ev) => {
                    if let WatchEvent::Reset { .. } = ev {
                        owners = tenants_of_servers(&registry);
                    }
                    add(&mut changed, &ev, &mut owners);
                }
                Err(RecvError::Lagged(_)) => changed.everything = true,
                Err(RecvError::Closed) => return,
            }
            next = tokio::time::timeout_at(window, sub.recv()).await.ok();
        }
        if changed.is_empty() {
            continue;
        }
        metrics::counter!("mcpd_mcp_list_changes_total").increment(1);
        let _ = listings.0.send(Arc::new(changed));
    }
}

/// Each server's tenant, as the registry has it now.
fn tenants_of_servers(registry: &Registry) -> BTreeMap<String, Option<String>> {
    let data = registry.local();
    data.state
        .servers
        .iter()
        .map(|(name, s)| (name.clone(), s.spec.tenant.clone()))
        .collect()
}

/// Adds one registry event to `changed`; `owners` keeps each server's tenant, which a
/// removal no longer shows (after a reset, the caller reads them all again).
fn add(changed: &mut Changed, ev: &WatchEvent, owners: &mut BTreeMap<String, Option<String>>) {
    let (kind, name, value) = match ev {
        WatchEvent::Put {
            kind, name, value, ..
        } => (*kind, name, Some(value)),
        WatchEvent::Delete { kind, name, .. } => (*kind, name, None),
        WatchEvent::Reset { .. } => {
            changed.everything = true;
            return;
        }
    };
    match kind {
        ObjectKind::Server => {
            let before = owners.remove(name);
            // The tenant this change gave it (a later change has an event of its own).
            let after = value.map(|v| v["spec"]["tenant"].as_str().map(String::from));
            if let Some(tenant) = &after {
                owners.insert(name.clone(), tenant.clone());
            }
            let tenants = changed.servers.entry(name.clone()).or_default();
            tenants.extend(before);
            tenants.extend(after);
        }
        // Approved tools: what the server's lists hold back changed.
        ObjectKind::ToolPins => {
            let tenant = owners.get(name).cloned();
            changed
                .servers
                .entry(name.clone())
                .or_default()
                .extend(tenant);
        }
        ObjectKind::VirtualServer => {
            changed.virtuals.insert(name.clone());
        }
        ObjectKind::Policy => changed.everything = true,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcpcp_proto::api::Role;
    use serde_json::json;

    fn put(kind: ObjectKind, name: &str, value: serde_json::Value) -> WatchEvent {
        WatchEvent::Put {
            revision: 1,
            kind,
            name: name.into(),
            value,
        }
    }

    #[test]
    fn a_removed_server_is_credited_to_the_tenant_it_had_and_approved_tools_to_their_server() {
        let mut owners = BTreeMap::new();
        let mut added = Changed::default();
        let spec = json!({ "revision": 1, "created_revision": 1, "spec": { "tenant": "acme" } });
        add(
            &mut added,
            &put(ObjectKind::Server, "db", spec),
            &mut owners,
        );
        assert_eq!(owners.get("db"), Some(&Some("acme".to_string())));

        let mut removed = Changed::default();
        let delete = WatchEvent::Delete {
            revision: 2,
            kind: ObjectKind::Server,
            name: "db".into(),
        };
        add(&mut removed, &delete, &mut owners);
        assert!(owners.is_empty());
        let (acme, globex) = (
            caller(Role::User, Some("acme")),
            caller(Role::User, Some("globex")),
        );
        assert!(removed.concerns(&acme, &Target::Aggregate));
        assert!(!removed.concerns(&globex, &Target::Aggregate));

        owners.insert("time".into(), None);
        let mut pins = Changed::default();
        add(
            &mut pins,
            &put(ObjectKind::ToolPins, "time", json!({})),
            &mut owners,
        );
        assert!(pins.concerns(&globex, &Target::Server("time".into())));
        assert!(!pins.concerns(&globex, &Target::Server("db".into())));
        assert!(!pins.everything);
    }

    fn caller(role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            token_id: "t".into(),
            role,
            tenant: tenant.map(String::from),
            scopes: None,
            groups: Vec::new(),
            jwt: None,
        }
    }

    fn server(name: &str, tenant: Option<&str>) -> Changed {
        let mut changed = Changed::default();
        changed
            .servers
            .insert(name.into(), [tenant.map(String::from)].into());
        changed
    }

    #[test]
    fn a_tenants_server_concerns_its_tenant_and_the_cluster_admins_lists_only() {
        let acme = server("acme-db", Some("acme"));
        let (acme_user, other_user) = (
            caller(Role::User, Some("acme")),
            caller(Role::User, Some("globex")),
        );
        assert!(acme.concerns(&acme_user, &Target::Aggregate));
        assert!(!acme.concerns(&other_user, &Target::Aggregate));
        assert!(acme.concerns(&caller(Role::ClusterAdmin, None), &Target::Aggregate));
        assert!(acme.concerns(&acme_user, &Target::Virtual("v".into())));
        assert!(!acme.concerns(&acme_user, &Target::Server("other".into())));
        assert!(acme.concerns(&acme_user, &Target::Server("acme-db".into())));

        let global = server("time", None);
        assert!(global.concerns(&other_user, &Target::Aggregate));
    }

    #[test]
    fn a_policy_change_concerns_every_list_and_a_virtual_server_only_its_own() {
        let user = caller(Role::User, Some("acme"));
        let everything = Changed {
            everything: true,
            ..Changed::default()
        };
        for target in [
            Target::Aggregate,
            Target::Server("x".into()),
            Target::Virtual("v".into()),
        ] {
            assert!(everything.concerns(&user, &target));
        }
        let mut v = Changed::default();
        v.virtuals.insert("v".into());
        assert!(v.concerns(&user, &Target::Virtual("v".into())));
        assert!(!v.concerns(&user, &Target::Virtual("w".into())));
        assert!(!v.concerns(&user, &Target::Aggregate));
    }
}
