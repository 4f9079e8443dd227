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
//!
//! IPv6 pod ranges (`spec.podCIDRs`' IPv6 entries) are routed the same
//! way: natively via the node's IPv6 address, or through the same VXLAN
//! device (IPv6 inside, the IPv4 underlay outside) via an IPv6 VTEP
//! address. A node is a peer through its IPv4 address; IPv6-only nodes
//! are reported, not routed.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

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

/// One other node: its addresses and the pod ranges routed to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub address: Ipv4Addr,
    /// Its first IPv6 address (native routing of its IPv6 ranges).
    pub address6: Option<Ipv6Addr>,
    pub pod_cidrs: Vec<Ipv4Network>,
    pub pod_cidrs6: Vec<Ipv6Network>,
}

impl Peer {
    /// The VTEP address standing for this node on the vxlan device: the
    /// network address of its first pod range (never a pod's: .0 is not
    /// handed out), so routes need no extra address plan.
    pub fn vtep(&self) -> Option<Ipv4Addr> {
        self.pod_cidrs.first().map(|c| c.network())
    }

    /// The same for its IPv6 ranges (the subnet-router anycast address,
    /// never a pod's either).
    pub fn vtep6(&self) -> Option<Ipv6Addr> {
        self.pod_cidrs6.first().map(|c| c.network())
    }

    /// Where `dst` (one of its ranges) goes: natively its address of that
    /// family, over VXLAN its VTEP address of that family.
    pub fn gateway(&self, dst: &IpNetwork, vxlan: bool) -> Option<IpAddr> {
        match (dst, vxlan) {
            (IpNetwork::V4(_), false) => Some(self.address.into()),
            (IpNetwork::V4(_), true) => self.vtep().map(IpAddr::V4),
            (IpNetwork::V6(_), false) => self.address6.map(IpAddr::V6),
            (IpNetwork::V6(_), true) => self.vtep6().map(IpAddr::V6),
        }
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
    pub local_cidrs6: Vec<Ipv6Network>,
    /// Other nodes with an address and at least one usable pod range.
    pub peers: Vec<Peer>,
    /// Nodes (or ranges) left out and why: shown in `status`, logged.
    pub problems: Vec<String>,
}

impl Desired {
    /// Every remote pod range (IPv4 first) and the peer it goes to.
    pub fn routes(&self) -> impl Iterator<Item = (IpNetwork, &Peer)> {
        let v4 = self
            .peers
            .iter()
            .flat_map(|p| p.pod_cidrs.iter().map(move |c| (IpNetwork::V4(*c), p)));
        let v6 = self
            .peers
            .iter()
            .flat_map(|p| p.pod_cidrs6.iter().map(move |c| (IpNetwork::V6(*c), p)));
        v4.chain(v6)
    }
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
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
        d.local_cidrs6 = n.pod_cidrs6.clone();
    }
    let local: Vec<IpNetwork> = (d.local_cidrs.iter().map(|c| IpNetwork::V4(*c)))
        .chain(d.local_cidrs6.iter().map(|c| IpNetwork::V6(*c)))
        .collect();
    let mut claimed: BTreeMap<IpNetwork, String> = BTreeMap::new();
    for n in model.nodes.values().filter(|n| n.name != me) {
        let Some(address) = n.addresses.first().copied() else {
            if !n.pod_cidrs.is_empty() || !n.pod_cidrs6.is_empty() {
                d.problems.push(format!(
                    "node {}: no IPv4 address, its pods are not routed",
                    n.name
                ));
            }
            continue;
        };
        let address6 = n.addresses6.first().copied();
        let ranges = (n.pod_cidrs.iter().map(|c| IpNetwork::V4(*c)))
            .chain(n.pod_cidrs6.iter().map(|c| IpNetwork::V6(*c)));
        let mut peer = Peer {
            node: n.name.clone(),
            address,
            address6,
            pod_cidrs: Vec::new(),
            pod_cidrs6: Vec::new(),
        };
        for c in ranges {
            if local.iter().any(|l| overlaps(l, &c)) {
                d.problems.push(format!(
                    "node {}: pod range {c} overlaps this node's own; not routed",
                    n.name
                ));
            } else if let Some((_, other)) = claimed.iter().find(|(k, _)| overlaps(k, &c)) {
                d.problems.push(format!(
                    "node {}: pod range {c} overlaps node {other}'s; not routed",
                    n.name
                ));
            } else if c.is_ipv6() && address6.is_none() && mode == Mode::Native {
                d.problems.push(format!(
                    "node {}: no IPv6 address, its pod range {c} is not routed (native routing goes via the node's address of the range's family)",
                    n.name
                ));
            } else {
                claimed.insert(c, n.name.clone());
                match c {
                    IpNetwork::V4(c) => peer.pod_cidrs.push(c),
                    IpNetwork::V6(c) => peer.pod_cidrs6.push(c),
                }
            }
        }
        if !peer.pod_cidrs.is_empty() || !peer.pod_cidrs6.is_empty() {
            d.peers.push(peer);
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
            addresses: addr
                .split(',')
                .filter(|a| !a.contains(':'))
                .filter_map(|a| a.parse().ok())
                .collect(),
            addresses6: addr
                .split(',')
                .filter(|a| a.contains(':'))
                .map(|a| a.parse().unwrap())
                .collect(),
            pod_cidrs: cidrs
                .iter()
                .filter(|c| !c.contains(':'))
                .map(|c| c.parse().unwrap())
                .collect(),
            pod_cidrs6: cidrs
                .iter()
                .filter(|c| c.contains(':'))
                .map(|c| c.parse().unwrap())
                .collect(),
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

    #[test]
    fn ipv6_ranges_go_via_the_nodes_ipv6_address_or_the_ipv6_vtep() {
        let m = model(vec![
            node(
                "n1",
                "192.0.2.1,2001:db8::1",
                &["10.1.0.0/24", "fd00:1::/64"],
            ),
            node(
                "n2",
                "192.0.2.2,2001:db8::2",
                &["10.1.1.0/24", "fd00:2::/64"],
            ),
            node("n3", "192.0.2.3", &["fd00:3::/64"]),
            node("n4", "192.0.2.4,2001:db8::4", &["fd00:1::8000/113"]),
        ]);
        let text = |d: &Desired, vxlan: bool| -> Vec<String> {
            d.routes()
                .map(|(c, p)| format!("{c} via {:?}", p.gateway(&c, vxlan)))
                .collect()
        };
        let d = desired(&m, Some("n1"), Mode::Native);
        assert_eq!(
            text(&d, false),
            [
                "10.1.1.0/24 via Some(192.0.2.2)",
                "fd00:2::/64 via Some(2001:db8::2)"
            ]
        );
        // n3 has no IPv6 address to route its range via; n4's overlaps ours.
        assert_eq!(d.problems.len(), 2, "{:?}", d.problems);
        assert!(d
            .problems
            .iter()
            .any(|p| p.contains("n3") && p.contains("no IPv6 address")));
        assert!(d
            .problems
            .iter()
            .any(|p| p.contains("n4") && p.contains("overlaps this node's own")));
        // Over VXLAN every range goes through the tunnel, IPv6 ones via
        // their IPv6 VTEP (the range's network address).
        let d = desired(&m, Some("n1"), Mode::Vxlan);
        assert_eq!(
            text(&d, true),
            [
                "10.1.1.0/24 via Some(10.1.1.0)",
                "fd00:2::/64 via Some(fd00:2::)",
                "fd00:3::/64 via Some(fd00:3::)"
            ]
        );
    }
}
