//! The test network: one Linux network namespace per node, each joined by a veth pair to a
//! bridge in the root namespace that carries a private subnet the harness picks and creates
//! (`10.213.<x>.0/24`, an `<x>` no existing address or route uses). The bridge holds `.1`, the
//! harness's own address, so the harness reaches every node over the bridge; node `i` holds
//! `.(10 + i)` on its `eth0`. Nothing is routed anywhere else.
//!
//! Faults act inside a node's namespace only: firewall DROP rules (`iptables`, or `nft` when
//! only that is installed) for partitions, `tc netem` for delay and loss (or, on a kernel
//! without `sch_netem`, random DROP rules for loss alone).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::janitor::{netns_name, Janitor, LINK_PREFIX};
use crate::sys::{self, CmdError};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("{0}")]
    Unavailable(String),
}

/// The packet filter used inside namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firewall {
    Iptables,
    Nft,
}

impl Firewall {
    fn detect() -> Option<Firewall> {
        if sys::which("iptables").is_some() {
            Some(Firewall::Iptables)
        } else if sys::which("nft").is_some() {
            Some(Firewall::Nft)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Firewall::Iptables => "iptables",
            Firewall::Nft => "nft",
        }
    }
}

/// The highest node id the subnet has room for.
pub const MAX_NODE_ID: u64 = 240;

/// The test network of a run. Cheap to clone.
#[derive(Clone)]
pub struct Network {
    janitor: Janitor,
    /// `10.213.<x>`
    prefix: String,
    bridge: String,
    firewall: Option<Firewall>,
    nodes: Arc<Mutex<BTreeSet<u64>>>,
}

/// Why namespaces cannot be used here, if they cannot.
pub fn unavailable_reason(janitor: &Janitor) -> Option<String> {
    if !sys::is_root() {
        return Some("not running as root".into());
    }
    if sys::which("ip").is_none() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    let probe = format!("{}{}-probe", crate::janitor::NS_PREFIX, janitor.run_id());
    if let Err(e) = sys::run("ip", &["netns", "add", &probe]) {
        return Some(format!("`ip netns add` does not work here: {e}"));
    }
    let _ = sys::run("ip", &["netns", "del", &probe]);
    None
}

impl Network {
    /// Creates the bridge and its subnet.
    pub fn create(janitor: &Janitor) -> Result<Network, NetError> {
        let run = janitor.run_id().to_string();
        let used = format!(
            "{}\n{}",
            sys::run("ip", &["-4", "-o", "addr", "show"]).unwrap_or_default(),
            sys::run("ip", &["-4", "route", "show", "table", "all"]).unwrap_or_default()
        );
        let start = u16::from_str_radix(&run, 16).unwrap_or(0) as usize;
        let x = (0..254)
            .map(|i| (start + i) % 254 + 1)
            .find(|x| !used.contains(&format!("10.213.{x}.")))
            .ok_or_else(|| NetError::Unavailable("every 10.213.x.0/24 subnet is in use".into()))?;
        let net = Network {
            janitor: janitor.clone(),
            prefix: format!("10.213.{x}"),
            bridge: format!("{LINK_PREFIX}{run}br"),
            firewall: Firewall::detect(),
            nodes: Arc::new(Mutex::new(BTreeSet::new())),
        };
        sys::run("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        janitor.track_link(&net.bridge);
        sys::run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", net.bridge_ip()),
                "dev",
                &net.bridge,
            ],
        )?;
        sys::run("ip", &["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.prefix)
    }

    pub fn bridge_ip(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// Node `id`'s address.
    pub fn ip(&self, id: u64) -> String {
        format!("{}.{}", self.prefix, 10 + id)
    }

    /// Node `id`'s namespace.
    pub fn ns(&self, id: u64) -> String {
        netns_name(self.janitor.run_id(), id)
    }

    pub fn firewall(&self) -> Option<Firewall> {
        self.firewall
    }

    /// Creates node `id`'s namespace and its link to the bridge, once.
    pub fn ensure_node(&self, id: u64) -> Result<(), NetError> {
        if id == 0 || id > MAX_NODE_ID {
            return Err(NetError::Unavailable(format!(
                "node id {id} does not fit the subnet (1..={MAX_NODE_ID})"
            )));
        }
        if self.lock().contains(&id) {
            return Ok(());
        }
        let run = self.janitor.run_id();
        let ns = self.ns(id);
        let host = format!("{LINK_PREFIX}{run}h{id}");
        let peer = format!("{LINK_PREFIX}{run}p{id}");
        sys::run("ip", &["netns", "add", &ns])?;
        self.janitor.track_netns(&ns);
        sys::run(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &peer],
        )?;
        self.janitor.track_link(&host);
        sys::run("ip", &["link", "set", &peer, "netns", &ns])?;
        sys::run("ip", &["-n", &ns, "link", "set", &peer, "name", "eth0"])?;
        sys::run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.ip(id)),
                "dev",
                "eth0",
            ],
        )?;
        sys::run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        sys::run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        sys::run("ip", &["link", "set", &host, "master", &self.bridge])?;
        sys::run("ip", &["link", "set", &host, "up"])?;
        self.lock().insert(id);
        Ok(())
    }

    fn require_firewall(&self) -> Result<Firewall, NetError> {
        self.firewall.ok_or_else(|| {
            NetError::Unavailable(
                "neither iptables nor nft is installed (apt-get install -y iptables)".into(),
            )
        })
    }

    fn nft_table(&self, ns: &str) -> Result<(), NetError> {
        sys::run_in(ns, "nft", &["add", "table", "inet", "chaos"])?;
        for (chain, hook) in [("input", "input"), ("output", "output")] {
            sys::run_in(
                ns,
                "nft",
                &[
                    "add", "chain", "inet", "chaos", chain, "{", "type", "filter", "hook", hook,
                    "priority", "0", ";", "policy", "accept", ";", "}",
                ],
            )?;
        }
        Ok(())
    }

    /// Drops every packet between nodes of different `groups` (rules on both sides). The
    /// harness's own address is not affected: a cut-off node still answers the client.
    pub fn partition(&self, groups: &[Vec<u64>]) -> Result<(), NetError> {
        let fw = self.require_firewall()?;
        for (gi, group) in groups.iter().enumerate() {
            let others: Vec<u64> = groups
                .iter()
                .enumerate()
                .filter(|(gj, _)| *gj != gi)
                .flat_map(|(_, g)| g.iter().copied())
                .collect();
            for a in group {
                let ns = self.ns(*a);
                if fw == Firewall::Nft {
                    self.nft_table(&ns)?;
                }
                for b in &others {
                    let ip = self.ip(*b);
                    match fw {
                        Firewall::Iptables => {
                            sys::run_in(
                                &ns,
                                "iptables",
                                &["-w", "-A", "INPUT", "-s", &ip, "-j", "DROP"],
                            )?;
                            sys::run_in(
                                &ns,
                                "iptables",
                                &["-w", "-A", "OUTPUT", "-d", &ip, "-j", "DROP"],
                            )?;
                        }
                        Firewall::Nft => {
                            sys::run_in(
                                &ns,
                                "nft",
                                &[
                                    "add", "rule", "inet", "chaos", "input", "ip", "saddr", &ip,
                                    "drop",
                                ],
                            )?;
                            sys::run_in(
                                &ns,
                                "nft",
                                &[
                                    "add", "rule", "inet", "chaos", "output", "ip", "daddr", &ip,
                                    "drop",
                                ],
                            )?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes node `id`'s link slow and lossy: `netem` delay 80±20 ms and 5% loss; without
    /// `sch_netem` in the kernel, 5% random loss by firewall rules (no delay). Returns what was
    /// applied.
    pub fn degrade(&self, id: u64) -> Result<String, NetError> {
        let ns = self.ns(id);
        let netem = sys::run_in(
            &ns,
            "tc",
            &[
                "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "80ms", "20ms",
                "loss", "5%",
            ],
        );
        match netem {
            Ok(_) => return Ok("tc netem delay 80ms 20ms loss 5% on eth0".into()),
            Err(e) if !e.stderr().contains("unknown") && !e.stderr().contains("Unknown") => {
                return Err(e.into())
            }
            Err(_) => {}
        }
        let fw = self.require_firewall().map_err(|_| {
            NetError::Unavailable(
                "the kernel has no sch_netem and no firewall tool is installed".into(),
            )
        })?;
        match fw {
            Firewall::Iptables => {
                for chain in ["INPUT", "OUTPUT"] {
                    sys::run_in(
                        &ns,
                        "iptables",
                        &[
                            "-w",
                            "-A",
                            chain,
                            "-m",
                            "statistic",
                            "--mode",
                            "random",
                            "--probability",
                            "0.05",
                            "-j",
                            "DROP",
                        ],
                    )?;
                }
            }
            Firewall::Nft => {
                self.nft_table(&ns)?;
                for chain in ["input", "output"] {
                    sys::run_in(
                        &ns,
                        "nft",
                        &[
                            "add", "rule", "inet", "chaos", chain, "numgen", "random", "mod",
                            "100", "<", "5", "drop",
                        ],
                    )?;
                }
            }
        }
        Ok(format!(
            "this kernel has no sch_netem (tc: unknown qdisc): 5% random loss with {} instead, no added delay",
            fw.name()
        ))
    }

    /// Removes every fault from every node's namespace. Returns what could not be removed.
    pub fn heal_all(&self) -> Vec<String> {
        let ids: Vec<u64> = self.lock().iter().copied().collect();
        let mut problems = Vec::new();
        for id in ids {
            let ns = self.ns(id);
            match self.firewall {
                Some(Firewall::Iptables) => {
                    for chain in ["INPUT", "OUTPUT"] {
                        if let Err(e) = sys::run_in(&ns, "iptables", &["-w", "-F", chain]) {
                            problems.push(e.to_string());
                        }
                    }
                }
                Some(Firewall::Nft) => {
                    // Absent when no rule was ever added.
                    let _ = sys::run_in(&ns, "nft", &["delete", "table", "inet", "chaos"]);
                }
                None => {}
            }
            // Absent unless netem was applied.
            let _ = sys::run_in(&ns, "tc", &["qdisc", "del", "dev", "eth0", "root"]);
        }
        problems
    }
}
