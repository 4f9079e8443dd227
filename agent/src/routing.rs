//! Routing between nodes when palisade is the cluster's CNI: what the
//! kernel's routing table must hold for every other node's pod range,
//! derived purely from the model's Node objects. `route_sync` writes it
//! through netlink; nothing here touches the kernel.
//!
//! - `native`: `podCIDR via <node address>` (the nodes share an L2/L3 path;
//!   pod source addresses cross unchanged).
//! - `vxlan`: the kernel's vxlan device, one route per remote pod range
//!   `via <its VTEP address> dev <vxlan> onlink`, a permanent neighbour
//!   entry for that VTEP address and a forwarding entry sending its MAC to
//!   the node's address. Inner packets keep their pod source addresses.
//! - `none`: routing is left alone (chained mode: the primary CNI routes).
use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use ipnetwork::Ipv4Network;

use crate::model::Model;

/// How pods of other nodes are reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Leave routing to someone else (chained mode).
    None,
    /// A route per remote pod range via the node's address.
    #[default]
    Native,
    /// A VXLAN overlay managed by the agent.
    Vxlan,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "off" => Ok(Self::None),
            "native" => Ok(Self::Native),
            "vxlan" => Ok(Self::Vxlan),
            _ => Err(format!(
                "routing mode {s:?}: expected native, vxlan or none"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Native => "native",
            Self::Vxlan => "vxlan",
        })
    }
}

/// The VXLAN device's settings (the same on every node of a cluster).
pub const VXLAN_DEVICE: &str = "palisade.vx";
pub const VXLAN_VNI: u32 = 0x50_4c; // "PL"
pub const VXLAN_PORT: u16 = 8472;
/// VXLAN over IPv4 costs 50 bytes per packet.
pub const VXLAN_OVERHEAD: u32 = 50;

/// One other node: its address and the pod ranges routed to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub address: Ipv4Addr,
    pub pod_cidrs: Vec<Ipv4Network>,
}

impl Peer {
    /// The VTEP address standing for this node on the vxlan device: the
    /// network address of its first pod range (never a pod's: .0 is not
    /// handed out), so routes need no extra address plan.
    pub fn vtep(&self) -> Option<Ipv4Addr> {
        self.pod_cidrs.first().map(|c| c.network())
    }
}

/// The MAC of a node's vxlan device, derived from its address so every
/// node knows every other's without exchanging anything (locally
/// administered, unicast).
pub fn vxlan_mac(node_address: Ipv4Addr) -> [u8; 6] {
    let o = node_address.octets();
    [0x0a, 0x50, o[0], o[1], o[2], o[3]]
}

/// What the routing table must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub mode: Mode,
    /// This node's address and pod ranges (VXLAN: the device's local end).
    pub local_address: Option<Ipv4Addr>,
    pub local_cidrs: Vec<Ipv4Network>,
    /// Other nodes with an address and at least one usable pod range.
    pub peers: Vec<Peer>,
    /// Nodes (or ranges) left out and why: shown in `status`, logged.
    pub problems: Vec<String>,
}

impl Desired {
    /// Every remote pod range and the peer it goes to.
    pub fn routes(&self) -> impl Iterator<Item = (Ipv4Network, &Peer)> {
        self.peers
            .iter()
            .flat_map(|p| p.pod_cidrs.iter().map(move |c| (*c, p)))
    }
}

fn overlaps(a: &Ipv4Network, b: &Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// The routes for `model`'s nodes as seen from `node_name`. Without a node
/// name, the agent cannot tell which node is its own: nothing is routed.
/// A remote range that overlaps this node's own ranges, or one already
/// claimed by another node (names in order), is left out and reported:
/// routing it would steal local or someone else's pods.
pub fn desired(model: &Model, node_name: Option<&str>, mode: Mode) -> Desired {
    let mut d = Desired {
        mode,
        ..Default::default()
    };
    if mode == Mode::None {
        return d;
    }
    let Some(me) = node_name else {
        if !model.nodes.is_empty() {
            d.problems
                .push("no --node-name: this node cannot be told apart, nothing is routed".into());
        }
        return d;
    };
    if let Some(n) = model.nodes.get(me) {
        d.local_address = n.addresses.first().copied();
        d.local_cidrs = n.pod_cidrs.clone();
    }
    let mut claimed: BTreeMap<Ipv4Network, String> = BTreeMap::new();
    for n in model.nodes.values().filter(|n| n.name != me) {
        let Some(address) = n.addresses.first().copied() else {
            if !n.pod_cidrs.is_empty() {
                d.problems.push(format!(
                    "node {}: no address, its pods are not routed",
                    n.name
                ));
            }
            continue;
        };
        let mut cidrs = Vec::new();
        for c in &n.pod_cidrs {
            if d.local_cidrs.iter().any(|l| overlaps(l, c)) {
                d.problems.push(format!(
                    "node {}: pod range {c} overlaps this node's own; not routed",
                    n.name
                ));
            } else if let Some((_, other)) = claimed.iter().find(|(k, _)| overlaps(k, c)) {
                d.problems.push(format!(
                    "node {}: pod range {c} overlaps node {other}'s; not routed",
                    n.name
                ));
            } else {
                claimed.insert(*c, n.name.clone());
                cidrs.push(*c);
            }
        }
        if !cidrs.is_empty() {
            d.peers.push(Peer {
                node: n.name.clone(),
                address,
                pod_cidrs: cidrs,
            });
        }
    }
    if mode == Mode::Vxlan && d.local_address.is_none() && !d.peers.is_empty() {
        d.problems.push(format!(
            "vxlan: this node ({me}) has no Node address yet; the overlay waits for it"
        ));
        d.peers.clear();
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Node;

    fn node(name: &str, addr: &str, cidrs: &[&str]) -> Node {
        Node {
            name: name.into(),
            addresses: if addr.is_empty() {
                vec![]
            } else {
                vec![addr.parse().unwrap()]
            },
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            ..Default::default()
        }
    }

    fn model(nodes: Vec<Node>) -> Model {
        let mut m = Model::default();
        for n in nodes {
            m.nodes.insert(n.name.clone(), n);
        }
        m
    }

    #[test]
    fn every_other_node_range_via_its_address() {
        let m = model(vec![
            node("n1", "192.0.2.1", &["10.1.0.0/24"]),
            node("n2", "192.0.2.2", &["10.1.1.0/24", "10.9.0.0/24"]),
            node("n3", "192.0.2.3", &["10.1.2.0/24"]),
        ]);
        let d = desired(&m, Some("n2"), Mode::Native);
        assert_eq!(d.local_address, Some("192.0.2.2".parse().unwrap()));
        let r: Vec<String> = d
            .routes()
            .map(|(c, p)| format!("{c} via {} ({})", p.address, p.node))
            .collect();
        assert_eq!(
            r,
            [
                "10.1.0.0/24 via 192.0.2.1 (n1)",
                "10.1.2.0/24 via 192.0.2.3 (n3)"
            ]
        );
        assert!(d.problems.is_empty());
        assert_eq!(d.peers[0].vtep(), Some("10.1.0.0".parse().unwrap()));
    }

    #[test]
    fn nothing_without_a_node_name_or_in_none_mode() {
        let m = model(vec![node("n1", "192.0.2.1", &["10.1.0.0/24"])]);
        let d = desired(&m, None, Mode::Native);
        assert!(d.peers.is_empty());
        assert_eq!(d.problems.len(), 1);
        assert!(desired(&m, Some("n2"), Mode::None).peers.is_empty());
        assert_eq!(desired(&m, Some("n2"), Mode::Native).peers.len(), 1);
    }

    #[test]
    fn overlapping_or_unaddressed_ranges_are_left_out_and_reported() {
        let m = model(vec![
            node("a", "192.0.2.1", &["10.1.0.0/24"]),
            node("b", "192.0.2.2", &["10.1.0.128/25", "10.2.0.0/24"]),
            node("c", "192.0.2.3", &["10.2.0.0/16"]),
            node("d", "", &["10.3.0.0/24"]),
        ]);
        let d = desired(&m, Some("a"), Mode::Native);
        let r: Vec<String> = d.routes().map(|(c, p)| format!("{c} {}", p.node)).collect();
        assert_eq!(r, ["10.2.0.0/24 b"]);
        assert_eq!(d.problems.len(), 3, "{:?}", d.problems);
    }

    #[test]
    fn vxlan_waits_for_its_own_address_and_macs_are_derived() {
        let m = model(vec![node("b", "192.0.2.2", &["10.2.0.0/24"])]);
        let d = desired(&m, Some("a"), Mode::Vxlan);
        assert!(d.peers.is_empty());
        assert_eq!(d.problems.len(), 1);
        assert_eq!(
            vxlan_mac("192.0.2.2".parse().unwrap()),
            [0x0a, 0x50, 192, 0, 2, 2]
        );
        assert_eq!("vxlan".parse::<Mode>(), Ok(Mode::Vxlan));
        assert!("x".parse::<Mode>().is_err());
    }
}
