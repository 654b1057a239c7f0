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
//! A server's change concerns the endpoints of the servers that name it as their fallback
//! too: they list its tools while they are down.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use mcpcp_proto::api::{ObjectKind, WatchEvent};
use mcpcp_proto::mcp::Message;
use serde::Deserialize;
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
    let mut known = known_servers(&registry);
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
                        known = known_servers(&registry);
                    }
                    add(&mut changed, &ev, &mut known);
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

/// What the watch keeps of a server: its tenant (`None`: a global server), which its removal
/// no longer shows, and the fallbacks it names, whose changes alter what its own endpoint
/// lists while it is down.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(default)]
struct Known {
    tenant: Option<String>,
    fallbacks: Vec<String>,
}

/// Each server as the registry has it now.
fn known_servers(registry: &Registry) -> BTreeMap<String, Known> {
    let data = registry.local();
    data.state
        .servers
        .iter()
        .map(|(name, s)| {
            let known = Known {
                tenant: s.spec.tenant.clone(),
                fallbacks: s.spec.fallbacks.clone(),
            };
            (name.clone(), known)
        })
        .collect()
}

/// Adds one registry event to `changed`; `known` keeps what the watch knows of each server
/// (after a reset, the caller reads them all again). A change of a server concerns the
/// servers that name it as their fallback too.
fn add(changed: &mut Changed, ev: &WatchEvent, known: &mut BTreeMap<String, Known>) {
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
            let before = known.remove(name);
            // What this change made it (a later change has an event of its own).
            let after = value.map(|v| Known::deserialize(&v["spec"]).unwrap_or_default());
            if let Some(now) = &after {
                known.insert(name.clone(), now.clone());
            }
            let tenants = changed.servers.entry(name.clone()).or_default();
            tenants.extend(before.map(|k| k.tenant));
            tenants.extend(after.map(|k| k.tenant));
            served_by(changed, name, known);
        }
        // Approved tools: what the server's lists hold back changed.
        ObjectKind::ToolPins => {
            let tenant = known.get(name).map(|k| k.tenant.clone());
            changed
                .servers
                .entry(name.clone())
                .or_default()
                .extend(tenant);
            served_by(changed, name, known);
        }
        ObjectKind::VirtualServer => {
            changed.virtuals.insert(name.clone());
        }
        ObjectKind::Policy => changed.everything = true,
        _ => {}
    }
}

/// Counts as changed each server that names `fallback` as its fallback: its own endpoint
/// lists `fallback`'s tools while it is down.
fn served_by(changed: &mut Changed, fallback: &str, known: &BTreeMap<String, Known>) {
    for (primary, it) in known {
        if it.fallbacks.iter().any(|f| f == fallback) {
            changed
                .servers
                .entry(primary.clone())
                .or_default()
                .insert(it.tenant.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcpcp_proto::api::Role;
    use serde_json::json;

    fn delete(kind: ObjectKind, name: &str) -> WatchEvent {
        WatchEvent::Delete {
            revision: 2,
            kind,
            name: name.into(),
        }
    }

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
        let mut known = BTreeMap::new();
        let mut added = Changed::default();
        let spec = json!({ "revision": 1, "created_revision": 1, "spec": { "tenant": "acme" } });
        add(&mut added, &put(ObjectKind::Server, "db", spec), &mut known);
        assert_eq!(
            known.get("db").map(|k| k.tenant.as_deref()),
            Some(Some("acme"))
        );

        let mut removed = Changed::default();
        add(&mut removed, &delete(ObjectKind::Server, "db"), &mut known);
        assert!(known.is_empty());
        let (acme, globex) = (
            caller(Role::User, Some("acme")),
            caller(Role::User, Some("globex")),
        );
        assert!(removed.concerns(&acme, &Target::Aggregate));
        assert!(!removed.concerns(&globex, &Target::Aggregate));

        known.insert("time".into(), Known::default());
        let mut pins = Changed::default();
        add(
            &mut pins,
            &put(ObjectKind::ToolPins, "time", json!({})),
            &mut known,
        );
        assert!(pins.concerns(&globex, &Target::Server("time".into())));
        assert!(!pins.concerns(&globex, &Target::Server("db".into())));
        assert!(!pins.everything);
    }

    #[test]
    fn a_change_of_a_fallback_concerns_the_endpoints_of_the_servers_it_stands_in_for() {
        let mut known = BTreeMap::new();
        let primary = json!({ "spec": { "tenant": "acme", "fallbacks": ["spare"] } });
        add(
            &mut Changed::default(),
            &put(ObjectKind::Server, "db", primary),
            &mut known,
        );
        let spare = json!({ "spec": { "tenant": null } });
        let user = caller(Role::User, Some("acme"));
        let on = |name: &str| Target::Server(name.into());

        let mut put_spare = Changed::default();
        add(
            &mut put_spare,
            &put(ObjectKind::Server, "spare", spare),
            &mut known,
        );
        assert!(put_spare.concerns(&user, &on("db")));
        assert!(put_spare.concerns(&user, &on("spare")));
        assert!(!put_spare.concerns(&user, &on("other")));

        let mut pins = Changed::default();
        add(
            &mut pins,
            &put(ObjectKind::ToolPins, "spare", json!({})),
            &mut known,
        );
        assert!(pins.concerns(&user, &on("db")));

        let mut removed = Changed::default();
        add(
            &mut removed,
            &delete(ObjectKind::Server, "spare"),
            &mut known,
        );
        assert!(removed.concerns(&user, &on("db")));

        // A server that no longer names it is not told of it.
        let alone = json!({ "spec": { "tenant": "acme", "fallbacks": [] } });
        add(
            &mut Changed::default(),
            &put(ObjectKind::Server, "db", alone),
            &mut known,
        );
        let mut again = Changed::default();
        add(
            &mut again,
            &put(ObjectKind::ToolPins, "spare", json!({})),
            &mut known,
        );
        assert!(!again.concerns(&user, &on("db")));
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
