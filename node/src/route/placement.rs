//! Where servers with `replicas` run. The leader decides and writes the answer into the
//! registry (`SetPlacement`), so every node reads the same placement and nobody has to agree
//! on health by itself.
//!
//! Every second the leader pings the members. A placed node that has not answered for the
//! grace period loses its placements; free slots go to healthy members with the fewest
//! placements (ties broken by rendezvous hashing, so the choice is stable). Servers without
//! `replicas` run on every node and need no placement.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use crate::registry::state::Command;
use crate::registry::Registry;
use crate::shutdown::Shutdown;

/// Rendezvous score of `node` for `server`: the highest scores win ties.
fn score(server: &str, node: u64) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    server.hash(&mut h);
    node.hash(&mut h);
    h.finish()
}

/// The nodes that should run `server`.
///
/// `current` is kept where its nodes are still members and not `dead`; extra nodes are shed
/// when `replicas` shrank; missing ones are filled from `healthy` members, least loaded first.
pub fn place(
    server: &str,
    replicas: usize,
    current: &[u64],
    members: &BTreeSet<u64>,
    healthy: &BTreeSet<u64>,
    dead: &BTreeSet<u64>,
    load: &BTreeMap<u64, usize>,
) -> Vec<u64> {
    let load_of = |n: &u64| load.get(n).copied().unwrap_or(0);
    let mut keep: Vec<u64> = current
        .iter()
        .copied()
        .filter(|n| members.contains(n) && !dead.contains(n))
        .collect();
    keep.dedup();
    while keep.len() > replicas {
        // Shed the most loaded (lowest score on ties).
        let Some((i, _)) = keep
            .iter()
            .enumerate()
            .max_by_key(|(_, n)| (load_of(n), std::cmp::Reverse(score(server, **n))))
        else {
            break;
        };
        keep.remove(i);
    }
    let mut candidates: Vec<u64> = healthy
        .iter()
        .copied()
        .filter(|n| members.contains(n) && !keep.contains(n))
        .collect();
    candidates.sort_by_key(|n| (load_of(n), std::cmp::Reverse(score(server, *n))));
    for n in candidates {
        if keep.len() >= replicas {
            break;
        }
        keep.push(n);
    }
    keep.sort_unstable();
    keep
}

/// Runs the placement loop on whichever node leads, until shutdown.
pub async fn run(registry: Registry, grace: Duration, shutdown: Shutdown) {
    let mut down_since: HashMap<u64, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.clone().wait() => return,
        }
        let metrics = registry.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(registry.id) {
            down_since.clear();
            continue;
        }
        let nodes = registry.members();
        let members: BTreeSet<u64> = nodes.iter().map(|n| n.id).collect();
        let pings = futures_util::future::join_all(nodes.iter().map(|n| {
            let registry = registry.clone();
            let n = n.clone();
            async move {
                let ok = n.id == registry.id
                    || registry.ping(&n, Duration::from_millis(500)).await.is_ok();
                (n.id, ok)
            }
        }))
        .await;
        let now = Instant::now();
        let mut healthy = BTreeSet::new();
        for (id, ok) in pings {
            if ok {
                down_since.remove(&id);
                healthy.insert(id);
            } else {
                down_since.entry(id).or_insert(now);
            }
        }
        down_since.retain(|id, _| members.contains(id));
        let dead: BTreeSet<u64> = down_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= grace)
            .map(|(id, _)| *id)
            .collect();
        let (servers, placements, has_key) = {
            let data = registry.local();
            (
                data.state.servers.clone(),
                data.state.placements.clone(),
                data.state.session_key.is_some(),
            )
        };
        if !has_key {
            // Clusters bootstrapped before session keys existed get one from their leader.
            let mut key = [0u8; 32];
            if getrandom::fill(&mut key).is_ok() {
                let _ = registry
                    .write(Command::SetSessionKey {
                        key: hex::encode(key),
                    })
                    .await;
            }
        }
        let mut load: BTreeMap<u64, usize> = BTreeMap::new();
        for nodes in placements.values() {
            for n in nodes {
                *load.entry(*n).or_default() += 1;
            }
        }
        for (name, s) in &servers {
            let Some(replicas) = s.spec.replicas else {
                continue;
            };
            let current = placements.get(name).cloned().unwrap_or_default();
            let next = place(
                name,
                replicas as usize,
                &current,
                &members,
                &healthy,
                &dead,
                &load,
            );
            if next == current {
                continue;
            }
            for n in &current {
                if let Some(l) = load.get_mut(n) {
                    *l = l.saturating_sub(1);
                }
            }
            for n in &next {
                *load.entry(*n).or_default() += 1;
            }
            tracing::info!(server = %name, from = ?current, to = ?next, "placing server");
            metrics::counter!("mcpd_placement_changes_total").increment(1);
            let cmd = Command::SetPlacement {
                server: name.clone(),
                nodes: next,
            };
            if let Err(e) = registry.write(cmd).await {
                tracing::warn!(server = %name, error = %e, "placement not written");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn fills_from_the_least_loaded_healthy_members() {
        let members = set(&[1, 2, 3]);
        let load = BTreeMap::from([(1, 3), (2, 0), (3, 1)]);
        let p = place("s", 2, &[], &members, &members, &set(&[]), &load);
        assert_eq!(p, vec![2, 3]);
    }

    #[test]
    fn keeps_current_placements_that_are_alive() {
        let members = set(&[1, 2, 3]);
        let p = place(
            "s",
            1,
            &[3],
            &members,
            &members,
            &set(&[]),
            &BTreeMap::new(),
        );
        assert_eq!(p, vec![3]);
    }

    #[test]
    fn replaces_a_dead_node_but_keeps_a_briefly_unreachable_one() {
        let members = set(&[1, 2, 3]);
        let healthy = set(&[1, 2]);
        // Node 3 unreachable but not past the grace period: kept.
        assert_eq!(
            place(
                "s",
                1,
                &[3],
                &members,
                &healthy,
                &set(&[]),
                &BTreeMap::new()
            ),
            vec![3]
        );
        // Past the grace period: re-placed on a healthy node.
        let p = place(
            "s",
            1,
            &[3],
            &members,
            &healthy,
            &set(&[3]),
            &BTreeMap::new(),
        );
        assert_eq!(p.len(), 1);
        assert_ne!(p[0], 3);
    }

    #[test]
    fn removed_members_lose_their_placements() {
        let p = place(
            "s",
            1,
            &[9],
            &set(&[1, 2]),
            &set(&[1, 2]),
            &set(&[]),
            &BTreeMap::new(),
        );
        assert!(p == vec![1] || p == vec![2]);
    }

    #[test]
    fn shrinks_when_replicas_drop() {
        let members = set(&[1, 2, 3]);
        let load = BTreeMap::from([(1, 5), (2, 1), (3, 1)]);
        let p = place("s", 2, &[1, 2, 3], &members, &members, &set(&[]), &load);
        assert_eq!(p, vec![2, 3]);
    }

    #[test]
    fn never_places_more_than_healthy_members_allow() {
        let members = set(&[1, 2, 3]);
        let p = place(
            "s",
            5,
            &[],
            &members,
            &set(&[1]),
            &set(&[]),
            &BTreeMap::new(),
        );
        assert_eq!(p, vec![1]);
    }

    #[test]
    fn ties_are_broken_the_same_way_every_time() {
        let members = set(&[1, 2, 3, 4]);
        let a = place(
            "srv",
            2,
            &[],
            &members,
            &members,
            &set(&[]),
            &BTreeMap::new(),
        );
        let b = place(
            "srv",
            2,
            &[],
            &members,
            &members,
            &set(&[]),
            &BTreeMap::new(),
        );
        assert_eq!(a, b);
    }
}
