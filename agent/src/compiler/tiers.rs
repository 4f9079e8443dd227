//! ClusterNetworkPolicy tiers, resolved by the compiler into the policy
//! map the kernel already reads (see the README, "ClusterNetworkPolicy").
//!
//! The kernel makes one decision per new flow: the first hit of the chain
//! exact peer → the peer's CIDR identity → any-pod → any, each one
//! longest-prefix match on (protocol, port). For an endpoint that a
//! ClusterNetworkPolicy selects in a direction, this stage replaces the
//! NetworkPolicy entries of that direction by the *final* decision of the
//! whole walk (Admin rules in order → NetworkPolicy → Baseline rules →
//! allow) for every peer class, as a complete table over (protocol, port):
//! an entry at the fixed prefix for "anything else" plus the protocol and
//! port-block entries that differ from it. Because every written table is
//! complete, a hit on a narrower peer key stops the chain with the answer
//! the broader keys would have given for that peer folded in; a table equal
//! to what the chain would reach anyway (the `any` table) is not written.
//!
//! Peer classes: every CIDR identity (non-pod addresses, by their longest
//! prefix, world included) and every label identity. A ClusterNetworkPolicy
//! `networks` peer (and a NetworkPolicy ipBlock) can split the pods of one
//! label identity by address; then the identity gets no entry and each of
//! its pods is decided by the CIDR identity of its own /32 (which the
//! compiler gives every pod address while any ClusterNetworkPolicy exists).
//!
//! Deny decisions carry ACTION_DENY and the cookie of the deciding rule:
//! a ClusterNetworkPolicy rule's (from `CLUSTER_COOKIE_BASE`),
//! [`COOKIE_NP_ISOLATION`] (a NetworkPolicy isolates the pod and none of
//! its rules matched) or, for allows, a NetworkPolicy rule's cookie or
//! [`COOKIE_DEFAULT_ALLOW`] (no tier decided: the Kubernetes default).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use palisade_common::{
    is_label_identity, PolicyKey, PolicyValue, ACTION_ALLOW, ACTION_DENY, DIR_EGRESS, DIR_INGRESS,
    EP_DNS_SNOOP, EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED, IDENTITY_ANY, IDENTITY_ANY_POD,
    IDENTITY_HOST, POLICY_PREFIX_FIXED, POLICY_PREFIX_PROTO, PROTO_ICMP, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP,
};

use super::{
    cluster::{Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, Tier},
    emit::{split_port_range, PolicyEntries},
    parse::{protocol_number, v4_subset},
    IdentitySource,
};
use palisade_dataplane::MapState;

use crate::model::{ContainerPort, Labels, Model};

/// Cookies of ClusterNetworkPolicy rules start here (NetworkPolicy rule
/// cookies count up from 1).
pub const CLUSTER_COOKIE_BASE: u32 = 0x4000_0000;
/// A deny: a NetworkPolicy isolates the pod in this direction and none of
/// its rules matched.
pub const COOKIE_NP_ISOLATION: u32 = palisade_common::COOKIE_NP_ISOLATION;
/// An allow: no tier decided (the "baseline default").
pub const COOKIE_DEFAULT_ALLOW: u32 = 0xffff_ffff;

/// Which ClusterNetworkPolicy rule a cookie stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterRuleRef {
    pub policy: String,
    pub tier: Tier,
    pub priority: u32,
    pub direction: u8,
    /// Index in spec.ingress / spec.egress.
    pub rule: usize,
    /// The rule's name, or "ingress[i]" / "egress[i]".
    pub label: String,
    /// What it does when it matches (a failing-closed Pass denies).
    pub action: Action,
}

impl std::fmt::Display for ClusterRuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClusterNetworkPolicy/{} rule {} ({} tier, {})",
            self.policy, self.label, self.tier, self.action
        )
    }
}

/// Cookies of ClusterNetworkPolicy rules: numbered in evaluation order
/// from `CLUSTER_COOKIE_BASE`, a function of the accepted policies alone
/// (so the full compile and the engine agree without sharing a table; a
/// change of order renumbers the rules after it, whose entries change
/// anyway).
pub(crate) fn cluster_cookie_numbers(
    cluster: &[&ClusterPolicy],
) -> HashMap<(String, u8, usize), u32> {
    let mut out = HashMap::new();
    let mut next = CLUSTER_COOKIE_BASE;
    for p in cluster {
        for r in &p.rules {
            out.insert((p.name.clone(), r.direction, r.index), next);
            next += 1;
        }
    }
    out
}

/// What every cookie of `cluster` stands for.
pub fn cluster_rule_refs(cluster: &[&ClusterPolicy]) -> HashMap<u32, ClusterRuleRef> {
    let numbers = cluster_cookie_numbers(cluster);
    let mut out = HashMap::new();
    for p in cluster {
        for r in &p.rules {
            out.insert(
                numbers[&(p.name.clone(), r.direction, r.index)],
                ClusterRuleRef {
                    policy: p.name.clone(),
                    tier: p.tier,
                    priority: p.priority,
                    direction: r.direction,
                    rule: r.index,
                    label: r.label(),
                    action: r.effective_action(),
                },
            );
        }
    }
    out
}

/// Label sets of the compiled identities, for [`apply_tiers`].
pub(crate) fn labels_of<'a>(
    identities: &'a HashMap<u32, IdentitySource>,
) -> impl Fn(u32) -> Option<(&'a Labels, &'a Labels)> + 'a {
    move |id| match identities.get(&id) {
        Some(IdentitySource::Labels {
            namespace_labels,
            pod_labels,
            ..
        }) => Some((namespace_labels, pod_labels)),
        _ => None,
    }
}

/// The key of the hidden NetworkPolicy that carries what the tiers need
/// from the identity phase while any ClusterNetworkPolicy exists: CIDR
/// identities for every `networks` prefix, and a /32 CIDR identity for
/// every pod address (through an egress named-port ipBlock 0.0.0.0/0
/// rule, the mechanism named ports already use). Its namespace is empty,
/// so it selects no endpoint and emits no entry.
pub fn cluster_addresses_key() -> crate::model::ObjectKey {
    crate::model::ObjectKey::new("", "clusternetworkpolicy-addresses")
}

/// The hidden policy for the accepted `cluster` policies (None if none).
pub(crate) fn cluster_addresses_policy(cluster: &[&ClusterPolicy]) -> Option<super::parse::Policy> {
    use super::parse::{Peer, Policy, Port, Rule};
    if cluster.is_empty() {
        return None;
    }
    let mut nets: BTreeSet<Ipv4Network> = cluster.iter().flat_map(|p| p.networks()).collect();
    nets.insert(Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid"));
    // `::/0` too: every IPv6 pod address gets its /128 CIDR identity.
    let mut nets6: BTreeSet<Ipv6Network> = cluster.iter().flat_map(|p| p.networks6()).collect();
    nets6.insert(Ipv6Network::new(Ipv6Addr::UNSPECIFIED, 0).expect("valid"));
    Some(Policy {
        key: cluster_addresses_key(),
        selector: crate::selector::Selector::everything(),
        ingress: false,
        egress: true,
        rules: vec![Rule {
            direction: DIR_EGRESS,
            index: 0,
            peers: Some(
                nets.into_iter()
                    .map(|cidr| Peer::Block {
                        cidr,
                        except: Vec::new(),
                    })
                    .chain(nets6.into_iter().map(|cidr| Peer::Block6 {
                        cidr,
                        except: Vec::new(),
                    }))
                    .collect(),
            ),
            ports: vec![Port::Named {
                proto: PROTO_TCP,
                name: "tiers".into(),
            }],
        }],
    })
}

/// One rule in evaluation order.
#[derive(Clone, Copy)]
pub(crate) struct TierRule<'a> {
    pub(crate) tier: Tier,
    pub(crate) cookie: u32,
    pub(crate) rule: &'a ClusterRule,
}

/// The accepted policies in evaluation order: tier, priority, then name
/// (the API leaves equal priorities to the implementation).
pub(crate) fn ordered<'a>(
    policies: impl Iterator<Item = &'a ClusterPolicy>,
) -> Vec<&'a ClusterPolicy> {
    let mut v: Vec<_> = policies.collect();
    v.sort_by(|a, b| (a.tier, a.priority, &a.name).cmp(&(b.tier, b.priority, &b.name)));
    v
}

/// Names of policies sharing a (tier, priority) with another one.
pub fn equal_priority_warnings<'a>(
    policies: impl Iterator<Item = &'a ClusterPolicy>,
) -> BTreeMap<String, String> {
    let mut groups: BTreeMap<(Tier, u32), Vec<&str>> = BTreeMap::new();
    for p in policies {
        groups
            .entry((p.tier, p.priority))
            .or_default()
            .push(&p.name);
    }
    let mut out = BTreeMap::new();
    for ((tier, prio), mut names) in groups {
        if names.len() > 1 {
            names.sort();
            for n in &names {
                out.insert(
                    n.to_string(),
                    format!(
                        "{tier} priority {prio} shared with {}: evaluated in name order",
                        names
                            .iter()
                            .filter(|m| *m != n)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
    }
    out
}

/// `status` rows: every ClusterNetworkPolicy with its subject count,
/// rejection and equal-priority warning.
pub fn cluster_status(model: &Model) -> Vec<palisade_api::ClusterPolicyStatus> {
    let accepted = model.cluster_policies.values().filter_map(|p| p.accepted());
    let warnings = equal_priority_warnings(accepted);
    model
        .cluster_policies
        .iter()
        .map(|(name, p)| {
            let (tier, priority, subjects) = match p.accepted() {
                Some(c) => {
                    let n = model
                        .pods
                        .values()
                        .filter(|pod| !pod.host_network)
                        .filter(|pod| {
                            let nsl = super::identities::namespace_labels(model, &pod.namespace);
                            c.subject.matches(&nsl, &pod.labels)
                        })
                        .count();
                    (c.tier.to_string(), Some(c.priority), n)
                }
                None => (String::new(), None, 0),
            };
            palisade_api::ClusterPolicyStatus {
                name: name.clone(),
                tier,
                priority,
                subjects,
                rejected: p.rejected().map(str::to_string),
                warning: warnings.get(name).cloned(),
            }
        })
        .collect()
}

/// A peer of a new flow as the tier walk sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerRep<'a> {
    /// (namespace labels, pod labels, container ports) of a pod peer.
    pub(crate) pod: Option<(&'a Labels, &'a Labels, &'a [ContainerPort])>,
    /// The address (a pod's /32 or /128) or the prefix of a CIDR identity.
    pub(crate) net: IpNetwork,
    pub(crate) identity: u32,
    pub(crate) cidr_identity: u32,
}

/// `a` ⊆ `b` (never across families).
pub(crate) fn inside(a: IpNetwork, b: IpNetwork) -> bool {
    match (a, b) {
        (IpNetwork::V4(a), IpNetwork::V4(b)) => v4_subset(a, b),
        (IpNetwork::V6(a), IpNetwork::V6(b)) => a.prefix() >= b.prefix() && b.contains(a.network()),
        _ => false,
    }
}

fn named_port_matches(ports: &[ContainerPort], name: &str, proto: u8, port: u16) -> bool {
    ports.iter().any(|cp| {
        cp.name.as_deref() == Some(name)
            && cp.port == port
            && protocol_number(Some(&cp.protocol)) == Some(proto)
    })
}

/// Whether one of `rule`'s peers is `peer` (ports and failing closed aside).
fn rule_peer_matches(rule: &ClusterRule, peer: &PeerRep) -> bool {
    rule.peers.iter().any(|p| match (p, &peer.pod) {
        (ClusterPeer::Namespaces(ns), Some((nsl, _, _))) => ns.matches(nsl),
        (ClusterPeer::Pods { namespaces, pods }, Some((nsl, pl, _))) => {
            namespaces.matches(nsl) && pods.matches(pl)
        }
        (ClusterPeer::Networks(nets), _) => nets.iter().any(|n| inside(peer.net, (*n).into())),
        (ClusterPeer::Networks6(nets), _) => nets.iter().any(|n| inside(peer.net, (*n).into())),
        (
            ClusterPeer::Nodes {
                addresses,
                addresses6,
                ..
            }
            | ClusterPeer::Domains {
                addresses,
                addresses6,
                ..
            },
            _,
        ) => {
            addresses.iter().any(|n| inside(peer.net, (*n).into()))
                || addresses6.iter().any(|n| inside(peer.net, (*n).into()))
        }
        _ => false,
    })
}

/// Whether `rule` matches a flow with `peer` to/from an endpoint whose pod
/// has `own_ports`, on (proto, port).
pub(crate) fn rule_matches(
    rule: &ClusterRule,
    own_ports: &[ContainerPort],
    peer: &PeerRep,
    proto: u8,
    port: u16,
) -> bool {
    if let Some(m) = rule.fail_closed_matches() {
        return m;
    }
    if !rule_peer_matches(rule, peer) {
        return false;
    }
    let Some(ports) = &rule.ports else {
        return true;
    };
    ports.iter().any(|p| match p {
        ClusterPort::Range {
            proto: pr,
            start,
            end,
        } => *pr == proto && (*start..=*end).contains(&port),
        ClusterPort::Named(name) => {
            let dest = if rule.direction == DIR_INGRESS {
                Some(own_ports)
            } else {
                peer.pod.map(|(_, _, ports)| ports)
            };
            dest.is_some_and(|d| named_port_matches(d, name, proto, port))
        }
    })
}

/// The NetworkPolicy tier of one endpoint and direction: None if no
/// NetworkPolicy isolates it, else its allow entries (chain semantics).
pub(crate) type NpLayer<'a> = Option<&'a [(u32, PolicyKey, PolicyValue)]>;

fn np_lookup(
    entries: &[(u32, PolicyKey, PolicyValue)],
    peer: u32,
    proto: u8,
    port: u16,
) -> Option<PolicyValue> {
    entries
        .iter()
        .filter(|(prefix, k, _)| {
            k.peer_identity == peer
                && match *prefix {
                    p if p <= POLICY_PREFIX_FIXED => true,
                    p if p <= POLICY_PREFIX_PROTO => k.protocol == proto,
                    p => {
                        let bits = p - POLICY_PREFIX_PROTO;
                        let mask: u16 = if bits >= 16 {
                            u16::MAX
                        } else {
                            !(u16::MAX >> bits)
                        };
                        k.protocol == proto && u16::from_be(k.dport_be) == port & mask
                    }
                }
        })
        .max_by_key(|(prefix, _, _)| *prefix)
        .map(|(_, _, v)| *v)
}

/// The kernel's chain over NetworkPolicy entries (exact, CIDR, any-pod, any).
pub(crate) fn np_chain(
    entries: &[(u32, PolicyKey, PolicyValue)],
    peer: &PeerRep,
    proto: u8,
    port: u16,
) -> Option<PolicyValue> {
    chain_keys(peer)
        .into_iter()
        .find_map(|k| np_lookup(entries, k, proto, port))
}

/// The peer keys the kernel looks up for `peer`, in order.
fn chain_keys(peer: &PeerRep) -> Vec<u32> {
    let mut keys = vec![peer.identity];
    if peer.cidr_identity != peer.identity && peer.cidr_identity != IDENTITY_ANY {
        keys.push(peer.cidr_identity);
    }
    if is_label_identity(peer.identity) {
        keys.push(IDENTITY_ANY_POD);
    }
    keys.push(IDENTITY_ANY);
    keys
}

const fn allow(cookie: u32) -> PolicyValue {
    PolicyValue {
        action: ACTION_ALLOW,
        cookie,
    }
}
const fn deny(cookie: u32) -> PolicyValue {
    PolicyValue {
        action: ACTION_DENY,
        cookie,
    }
}

/// The walk for one flow: Admin rules in order, NetworkPolicy, Baseline
/// rules, allow. `rules` are those of the endpoint's direction, ordered.
pub(crate) fn walk(
    rules: &[TierRule],
    np: NpLayer,
    own_ports: &[ContainerPort],
    peer: &PeerRep,
    proto: u8,
    port: u16,
) -> PolicyValue {
    for tier in [Tier::Admin, Tier::Baseline] {
        if tier == Tier::Baseline {
            if let Some(entries) = np {
                return np_chain(entries, peer, proto, port)
                    .map_or(deny(COOKIE_NP_ISOLATION), |v| allow(v.cookie));
            }
        }
        // A Pass ends this tier's walk (the `break`).
        for r in rules.iter().filter(|r| r.tier == tier) {
            if !rule_matches(r.rule, own_ports, peer, proto, port) {
                continue;
            }
            match r.rule.effective_action() {
                Action::Accept => return allow(r.cookie),
                Action::Deny => return deny(r.cookie),
                Action::Pass => break,
            }
        }
    }
    allow(COOKIE_DEFAULT_ALLOW)
}

/// A complete decision table over (protocol, port).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Table {
    /// Protocols other than TCP, UDP and SCTP.
    other: PolicyValue,
    /// Per TCP, UDP, SCTP: maximal segments [start, end] with one value.
    protos: [Vec<(u16, u16, PolicyValue)>; 3],
}

const PROTOS: [u8; 3] = [PROTO_TCP, PROTO_UDP, PROTO_SCTP];

fn table(boundaries: &[BTreeSet<u32>; 3], f: &dyn Fn(u8, u16) -> PolicyValue) -> Table {
    let other = f(PROTO_ICMP, 0);
    let protos = std::array::from_fn(|i| {
        let proto = PROTOS[i];
        let b: Vec<u32> = boundaries[i].iter().copied().collect();
        let mut segs: Vec<(u16, u16, PolicyValue)> = Vec::new();
        for w in b.windows(2) {
            let (s, e) = (w[0] as u16, (w[1] - 1) as u16);
            let v = f(proto, s);
            match segs.last_mut() {
                Some(last) if last.2 == v => last.1 = e,
                _ => segs.push((s, e, v)),
            }
        }
        segs
    });
    Table { other, protos }
}

fn write_table(t: &Table, endpoint_id: u32, direction: u8, peer: u32, out: &mut PolicyEntries) {
    let key = |protocol, port: u16| PolicyKey {
        endpoint_id,
        peer_identity: peer,
        direction,
        protocol,
        dport_be: port.to_be(),
    };
    out.insert((POLICY_PREFIX_FIXED, key(0, 0)), t.other);
    for (i, segs) in t.protos.iter().enumerate() {
        let proto = PROTOS[i];
        // The value covering the most ports is the protocol's default.
        let mut cover: Vec<(PolicyValue, u32)> = Vec::new();
        for (s, e, v) in segs {
            let n = *e as u32 - *s as u32 + 1;
            match cover.iter_mut().find(|(w, _)| w == v) {
                Some(c) => c.1 += n,
                None => cover.push((*v, n)),
            }
        }
        let default = cover
            .iter()
            .max_by_key(|(v, n)| (*n, *v == t.other))
            .map_or(t.other, |(v, _)| *v);
        if default != t.other {
            out.insert((POLICY_PREFIX_PROTO, key(proto, 0)), default);
        }
        for (s, e, v) in segs.iter().filter(|(_, _, v)| *v != default) {
            for (prefix, first) in split_port_range(*s, *e) {
                out.insert((prefix, key(proto, first)), *v);
            }
        }
    }
}

/// Ports where a decision can change: rule ranges, named container ports,
/// NetworkPolicy port blocks.
fn boundaries(
    rules: &[TierRule],
    np: NpLayer,
    port_lists: &[&[ContainerPort]],
) -> [BTreeSet<u32>; 3] {
    std::array::from_fn(|i| {
        let proto = PROTOS[i];
        let mut b = BTreeSet::from([0u32, 1, 65536]);
        for r in rules {
            for p in r.rule.ports.iter().flatten() {
                if let ClusterPort::Range {
                    proto: pr,
                    start,
                    end,
                } = p
                {
                    if *pr == proto {
                        b.insert(*start as u32);
                        b.insert(*end as u32 + 1);
                    }
                }
            }
        }
        for list in port_lists {
            for cp in list.iter() {
                b.insert(cp.port as u32);
                b.insert(cp.port as u32 + 1);
            }
        }
        for (prefix, k, _) in np.into_iter().flatten() {
            if *prefix > POLICY_PREFIX_PROTO && k.protocol == proto {
                let start = u16::from_be(k.dport_be) as u32;
                b.insert(start);
                b.insert(start + (1u32 << (96 - *prefix)));
            }
        }
        b
    })
}

/// Runs the tier stage over a NetworkPolicy compile (`out`): see the
/// module doc. `cluster` are the accepted policies in evaluation order.
pub(crate) fn apply_tiers<'a>(
    model: &'a Model,
    maps: &mut MapState,
    label_sets: &dyn Fn(u32) -> Option<(&'a Labels, &'a Labels)>,
    cluster: &[&'a ClusterPolicy],
) {
    if cluster.is_empty() {
        return;
    }
    let cookies = &cluster_cookie_numbers(cluster);
    // Peers: pods (by address) and CIDR identities, from the ipcache.
    let mut ports_at: HashMap<IpAddr, &[ContainerPort]> = HashMap::new();
    for p in model.pods.values().filter(|p| !p.host_network) {
        for ip in
            p.ip.map(IpAddr::V4)
                .into_iter()
                .chain(p.ipv6.map(IpAddr::V6))
        {
            ports_at.entry(ip).or_insert(&p.ports);
        }
    }
    let mut pods: BTreeMap<u32, Vec<PeerRep>> = BTreeMap::new();
    let mut cidrs: Vec<PeerRep> = Vec::new();
    // Other nodes' addresses share the remote-node identity; `nodes` and
    // `networks` peers can tell them apart (each then by its CIDR identity).
    let mut remote_nodes: Vec<PeerRep> = Vec::new();
    // Both families: an IPv6 pod address is a peer of its own (IPv6-only
    // pods have nothing else), of the same label identity.
    let mut ipcache: Vec<(IpNetwork, &palisade_common::IpcacheValue)> = maps
        .ipcache
        .iter()
        .map(|((ip, len), v)| {
            let n = Ipv4Network::new(*ip, *len as u8).expect("valid prefix");
            (IpNetwork::V4(n), v)
        })
        .chain(maps.ipcache6.iter().map(|((ip, len), v)| {
            let n = Ipv6Network::new(*ip, *len as u8).expect("valid prefix");
            (IpNetwork::V6(n), v)
        }))
        .collect();
    ipcache.sort_by_key(|(net, _)| *net);
    for (net, v) in ipcache {
        let ip = &net.ip();
        if is_label_identity(v.identity) {
            let Some((namespace_labels, pod_labels)) = label_sets(v.identity) else {
                continue;
            };
            let ports = ports_at.get(ip).copied().unwrap_or(&[]);
            pods.entry(v.identity).or_default().push(PeerRep {
                pod: Some((namespace_labels, pod_labels, ports)),
                net,
                identity: v.identity,
                cidr_identity: v.cidr_identity,
            });
        } else if v.identity == palisade_common::IDENTITY_REMOTE_NODE {
            remote_nodes.push(PeerRep {
                pod: None,
                net,
                identity: v.identity,
                cidr_identity: v.cidr_identity,
            });
        } else if v.identity != IDENTITY_HOST {
            cidrs.push(PeerRep {
                pod: None,
                net,
                identity: v.identity,
                cidr_identity: v.cidr_identity,
            });
        } else if v.cidr_identity >= palisade_common::IDENTITY_FIRST_CIDR
            && cluster.iter().any(|p| {
                p.networks().any(|n| IpNetwork::V4(n) == net)
                    || p.networks6().any(|n| IpNetwork::V6(n) == net)
            })
        {
            // This node's address as a prefix of its own (a `nodes` peer's,
            // or a /32 `networks`): a class under that CIDR identity (only
            // this address has it), so that a
            // ClusterNetworkPolicy can deny a pod's egress to its own node
            // (the kernel honours such a deny for `host`:
            // `decision::own_node_denied`).
            cidrs.push(PeerRep {
                pod: None,
                net,
                identity: v.cidr_identity,
                cidr_identity: v.cidr_identity,
            });
        }
    }

    // Every peer class a table may be written for: the world (index 0),
    // the CIDR identities, one pod per class of each label identity (see
    // `RepClass`), the other nodes.
    let world = cidrs
        .iter()
        .find(|c| c.net.prefix() == 0 && c.net.is_ipv4())
        .copied()
        .unwrap_or(PeerRep {
            pod: None,
            net: IpNetwork::V4(Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid")),
            identity: palisade_common::IDENTITY_WORLD,
            cidr_identity: palisade_common::IDENTITY_WORLD,
        });
    let prefixes: Vec<IpNetwork> = {
        let mut v: Vec<IpNetwork> = cluster
            .iter()
            .flat_map(|p| {
                p.networks()
                    .map(IpNetwork::V4)
                    .chain(p.networks6().map(IpNetwork::V6))
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let np_peers: HashSet<u32> = maps.policy.keys().map(|(_, k)| k.peer_identity).collect();
    // Container port lists, interned (pods of one app share theirs).
    let mut port_lists: Vec<&[ContainerPort]> = vec![&[]];
    let mut port_id = |ports: &'a [ContainerPort]| -> u32 {
        match port_lists.iter().position(|p| *p == ports) {
            Some(i) => i as u32,
            None => {
                port_lists.push(ports);
                (port_lists.len() - 1) as u32
            }
        }
    };
    let mut cands: Vec<(PeerRep, u32)> = vec![(world, 0)];
    cands.extend(cidrs.iter().map(|c| (*c, 0)));
    // (label identity, [(candidate index, the class's pods)])
    let mut pod_classes: Vec<(u32, Vec<PodClass>)> = Vec::new();
    for (id, reps) in &pods {
        let mut groups: Vec<(RepClass, Vec<PeerRep>)> = Vec::new();
        for rep in reps {
            let key = RepClass {
                ports: port_id(rep.pod.map_or(&[][..], |(_, _, p)| p)),
                inside: prefixes.iter().map(|n| inside(rep.net, *n)).collect(),
                own: np_peers
                    .contains(&rep.cidr_identity)
                    .then_some(rep.cidr_identity),
            };
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => g.push(*rep),
                None => groups.push((key, vec![*rep])),
            }
        }
        let mut cls = Vec::new();
        for (key, g) in groups {
            cands.push((g[0], key.ports));
            cls.push((cands.len() - 1, g));
        }
        pod_classes.push((*id, cls));
    }
    let first_remote = cands.len();
    for r in &remote_nodes {
        cands.push((*r, 0));
    }
    // Each candidate's lookup chain (at most 4 keys).
    let chains: Vec<([u32; 4], usize)> = cands
        .iter()
        .map(|(c, _)| {
            let mut a = [0u32; 4];
            let keys = chain_keys(c);
            a[..keys.len()].copy_from_slice(&keys);
            (a, keys.len())
        })
        .collect();
    // Which rules' peers each candidate matches, by rule set: endpoints
    // selected by the same policies share it. Interned into group ids.
    let mut matched_by_rules: HashMap<Vec<u32>, std::rc::Rc<RuleSetView>> = HashMap::new();
    // Candidates by the peer keys of their chain that a NetworkPolicy entry
    // may name (their identity, their CIDR identity).
    let mut cands_by_key: HashMap<u32, Vec<usize>> = HashMap::new();
    for (ci, (keys, n)) in chains.iter().enumerate() {
        for k in &keys[..*n] {
            if *k != IDENTITY_ANY_POD && *k != IDENTITY_ANY {
                cands_by_key.entry(*k).or_default().push(ci);
            }
        }
    }

    // Endpoints the policies select.
    let mut by_id: HashMap<u32, &crate::model::LocalEndpoint> = HashMap::new();
    for ep in model.endpoints.values() {
        by_id.insert(ep.endpoint_id, ep);
    }
    let no_labels = Labels::new();
    let mut np_entries: HashMap<u32, Vec<(u32, PolicyKey, PolicyValue)>> = HashMap::new();
    for ((prefix, k), v) in &maps.policy {
        np_entries
            .entry(k.endpoint_id)
            .or_default()
            .push((*prefix, *k, *v));
    }
    let mut infos: Vec<_> = maps.endpoints.iter_mut().collect();
    infos.sort_by_key(|(ifindex, _)| **ifindex);
    for (_, info) in infos {
        let Some(ep) = by_id.get(&info.endpoint_id) else {
            continue;
        };
        // No pod yet: held closed both ways (endpoints::labels_pending).
        let Some(pod) = model.pods.get(&ep.key) else {
            continue;
        };
        if pod.host_network {
            continue;
        }
        let pod = Some(pod);
        let nsl = super::identities::namespace_labels(model, &ep.key.namespace);
        let labels = pod.map_or(&no_labels, |p| &p.labels);
        let own_ports: &[ContainerPort] = pod.map_or(&[], |p| &p.ports);
        let selecting: Vec<&ClusterPolicy> = cluster
            .iter()
            .copied()
            .filter(|p| p.subject.matches(&nsl, labels))
            .collect();
        for dir in [DIR_EGRESS, DIR_INGRESS] {
            let rules: Vec<TierRule> = selecting
                .iter()
                .flat_map(|p| {
                    p.rules
                        .iter()
                        .filter(move |r| r.direction == dir)
                        .map(move |r| TierRule {
                            tier: p.tier,
                            cookie: cookies[&(p.name.clone(), r.direction, r.index)],
                            rule: r,
                        })
                })
                .collect();
            if rules.is_empty() {
                continue;
            }
            let flag = if dir == DIR_INGRESS {
                EP_INGRESS_ENFORCED
            } else {
                EP_EGRESS_ENFORCED
            };
            let mine: Vec<(u32, PolicyKey, PolicyValue)> = np_entries
                .get(&info.endpoint_id)
                .into_iter()
                .flatten()
                .filter(|(_, k, _)| k.direction == dir)
                .copied()
                .collect();
            let np: NpLayer = (info.flags & flag != 0).then_some(mine.as_slice());
            for (prefix, k, _) in &mine {
                maps.policy.remove(&(*prefix, *k));
            }
            info.flags |= flag;
            // Its DNS answers are held until what they name is learned.
            if rules
                .iter()
                .any(|r| r.rule.unknown.is_none() && r.rule.has_domain_peers())
            {
                info.flags |= EP_DNS_SNOOP;
            }
            let id = info.endpoint_id;
            let entries = &mut maps.policy;

            let matched = matched_by_rules
                .entry(rules.iter().map(|r| r.cookie).collect())
                .or_insert_with(|| {
                    let mut seen: HashMap<Vec<bool>, u32> = HashMap::new();
                    let ids: Vec<u32> = cands
                        .iter()
                        .map(|(c, _)| {
                            let bits: Vec<bool> = rules
                                .iter()
                                .map(|r| {
                                    r.rule.fail_closed_matches().is_none()
                                        && rule_peer_matches(r.rule, c)
                                })
                                .collect();
                            let n = seen.len() as u32;
                            *seen.entry(bits).or_insert(n)
                        })
                        .collect();
                    // Pod classes with the same matches, ports and chain
                    // length get the same table unless a NetworkPolicy entry
                    // names one of them (checked per endpoint).
                    let mut groups: HashMap<(u32, u32, usize), u32> = HashMap::new();
                    let group: Vec<u32> = (0..cands.len())
                        .map(|ci| {
                            let n = groups.len() as u32;
                            *groups
                                .entry((ids[ci], cands[ci].1, chains[ci].1))
                                .or_insert(n)
                        })
                        .collect();
                    std::rc::Rc::new(RuleSetView {
                        groups: groups.len(),
                        matched: ids,
                        group,
                    })
                })
                .clone();
            // Candidates a NetworkPolicy entry of this endpoint names.
            let mut special = vec![false; cands.len()];
            for (_, k, _) in np.into_iter().flatten() {
                for ci in cands_by_key.get(&k.peer_identity).into_iter().flatten() {
                    special[*ci] = true;
                }
            }
            // NetworkPolicy entries by peer key, interned: what `np_chain`
            // can see of a peer.
            let mut np_by_peer: HashMap<u32, Vec<(u32, u8, u16, PolicyValue)>> = HashMap::new();
            for (prefix, k, v) in np.into_iter().flatten() {
                np_by_peer
                    .entry(k.peer_identity)
                    .or_default()
                    .push((*prefix, k.protocol, k.dport_be, *v));
            }
            let mut lists: Vec<Vec<(u32, u8, u16, PolicyValue)>> = Vec::new();
            let mut np_list: HashMap<u32, u32> = HashMap::new();
            for (peer, mut v) in np_by_peer {
                v.sort_by_key(|(prefix, proto, port, _)| (*prefix, *proto, *port));
                let i = match lists.iter().position(|l| *l == v) {
                    Some(i) => i,
                    None => {
                        lists.push(v);
                        lists.len() - 1
                    }
                };
                np_list.insert(peer, i as u32);
            }
            let base_bounds = boundaries(&rules, np, &[own_ports]);
            // Tables by everything the walk reads of a peer (`PeerSig`),
            // each distinct table once (equal indexes = equal tables).
            let mut memo: HashMap<PeerSig, usize> = HashMap::new();
            let mut tables: Vec<Table> = Vec::new();
            let mut table_of = |ci: usize| -> usize {
                let (peer, ports) = &cands[ci];
                let (keys, n) = &chains[ci];
                let mut np_ids = [u32::MAX; 4];
                if !np_list.is_empty() {
                    for (slot, k) in np_ids.iter_mut().zip(&keys[..*n]) {
                        *slot = np_list.get(k).copied().unwrap_or(u32::MAX - 1);
                    }
                }
                let sig = PeerSig {
                    matched: matched.matched[ci],
                    ports: *ports,
                    np: np_ids,
                    chain: *n as u8,
                };
                *memo.entry(sig).or_insert_with(|| {
                    let extra: &[ContainerPort] = peer.pod.map_or(&[], |(_, _, p)| p);
                    let b = if extra.is_empty() {
                        base_bounds.clone()
                    } else {
                        boundaries(&rules, np, &[own_ports, extra])
                    };
                    let t = table(&b, &|proto, port| {
                        walk(&rules, np, own_ports, peer, proto, port)
                    });
                    match tables.iter().position(|u| *u == t) {
                        Some(i) => i,
                        None => {
                            tables.push(t);
                            tables.len() - 1
                        }
                    }
                })
            };
            // `any`: the world table (every peer not written below lands there).
            let any = table_of(0);
            let mut writes: Vec<(usize, u32)> = vec![(any, IDENTITY_ANY)];
            for (i, c) in cidrs.iter().enumerate() {
                let t = table_of(1 + i);
                if t != any {
                    writes.push((t, c.identity));
                }
            }
            // Pods: one table per class; the most common table of the
            // uniform label identities goes to `any-pod` (pods only), so
            // a policy over every pod costs one table, not one per identity.
            let mut group_table: Vec<Option<usize>> = vec![None; matched.groups];
            let pod_tables: Vec<(u32, Vec<ClassTable>)> = pod_classes
                .iter()
                .map(|(label_id, cls)| {
                    let ts = cls
                        .iter()
                        .map(|(ci, reps)| {
                            let t = if special[*ci] {
                                table_of(*ci)
                            } else {
                                let g = matched.group[*ci] as usize;
                                *group_table[g].get_or_insert_with(|| table_of(*ci))
                            };
                            (t, reps)
                        })
                        .collect();
                    (*label_id, ts)
                })
                .collect();
            let mut counts: HashMap<usize, usize> = HashMap::new();
            for (_, cls) in &pod_tables {
                if let [(t, _)] = cls.as_slice() {
                    *counts.entry(*t).or_default() += 1;
                }
            }
            let any_pod = counts
                .iter()
                .max_by_key(|(t, n)| (**n, **t == any, std::cmp::Reverse(**t)))
                .map_or(any, |(t, _)| *t);
            if any_pod != any {
                writes.push((any_pod, IDENTITY_ANY_POD));
            }
            for (label_id, cls) in &pod_tables {
                if let [(t, _)] = cls.as_slice() {
                    if *t != any_pod {
                        writes.push((*t, *label_id));
                    }
                } else {
                    for (t, reps) in cls {
                        if *t != any_pod {
                            writes.extend(reps.iter().map(|rep| (*t, rep.cidr_identity)));
                        }
                    }
                }
            }
            if !remote_nodes.is_empty() {
                let ts: Vec<usize> = (first_remote..cands.len()).map(&mut table_of).collect();
                if ts.windows(2).all(|w| w[0] == w[1]) {
                    if ts[0] != any {
                        writes.push((ts[0], palisade_common::IDENTITY_REMOTE_NODE));
                    }
                } else {
                    // A node a peer names has its own /32 CIDR identity (the
                    // hidden addresses policy); another one's table is its
                    // longest prefix's, written above or equal to `any`.
                    for (rep, t) in remote_nodes.iter().zip(&ts) {
                        if *t != any {
                            writes.push((*t, rep.cidr_identity));
                        }
                    }
                }
            }
            for (t, peer) in writes {
                write_table(&tables[t], id, dir, peer, entries);
            }
        }
    }
}

/// A class of pods of one label identity: (candidate index, its pods).
type PodClass<'a> = (usize, Vec<PeerRep<'a>>);
/// A class's table (index) and its pods.
type ClassTable<'b, 'a> = (usize, &'b Vec<PeerRep<'a>>);

/// The candidates as one set of rules sees them.
struct RuleSetView {
    /// Per candidate: which rules' peers match it (interned).
    matched: Vec<u32>,
    /// Per candidate: (matched, ports, chain length) interned; equal groups
    /// get equal tables when no NetworkPolicy entry names either.
    group: Vec<u32>,
    groups: usize,
}

/// What makes pods of one label identity differ for the tier walk.
#[derive(PartialEq, Eq)]
struct RepClass {
    /// Interned container ports.
    ports: u32,
    /// Inside each `networks`/`nodes` prefix of any policy.
    inside: Vec<bool>,
    /// Its /32 CIDR identity, if some NetworkPolicy entry names it.
    own: Option<u32>,
}

/// Everything `walk` and `boundaries` read of a peer, for one endpoint and
/// direction: two peers with equal signatures get equal tables.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PeerSig {
    /// Which rules' peers match it (interned per rule set).
    matched: u32,
    /// Its container ports (named ports of egress rules), interned.
    ports: u32,
    /// The NetworkPolicy entries of each key of its lookup chain, interned
    /// (MAX - 1: none).
    np: [u32; 4],
    chain: u8,
}

#[cfg(test)]
#[path = "tiers_tests.rs"]
pub(crate) mod tests;
