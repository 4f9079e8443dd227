//! What ClusterNetworkPolicies add to coverage: the pods and namespaces
//! they constrain, their default denies, DNS through the whole tier walk,
//! and rules (NetworkPolicy or ClusterNetworkPolicy) that an Admin-tier
//! decision above them makes dead.
//!
//! Shadowing is judged on today's cluster, like the empty-selector check:
//! subjects and pod peers are the model's pods now, every port a rule
//! names is sampled at each boundary the deciding rules distinguish, and
//! non-pod addresses (ipBlocks, `networks`) by CIDR containment alone,
//! conservatively. A rule is reported only when every flow it matches
//! today is provably decided above it.
use std::collections::{BTreeSet, HashMap, HashSet};

use ipnetwork::Ipv4Network;
use palisade_api::Finding;
use palisade_common::{DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use super::{dir_name, finding, kind, pods, selector_covers};
use crate::{
    compiler::{
        cluster::{Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, Subject, Tier},
        parse::{protocol_number, v4_subset, Peer, Policy, Port, Rule},
        tiers::{ordered, rule_matches, PeerRep},
    },
    model::{ContainerPort, Labels, Model, ObjectKey, Pod},
};

static NO_LABELS: Labels = Labels::new();

/// The accepted ClusterNetworkPolicies, in evaluation order.
pub(super) fn policies(m: &Model) -> Vec<&ClusterPolicy> {
    ordered(m.cluster_policies.values().filter_map(|p| p.accepted()))
}

pub(super) fn title(p: &ClusterPolicy) -> String {
    format!("ClusterNetworkPolicy/{}", p.name)
}

fn ns_labels<'a>(m: &'a Model, ns: &str) -> &'a Labels {
    m.namespaces.get(ns).map_or(&NO_LABELS, |n| &n.labels)
}

fn applies(m: &Model, p: &ClusterPolicy, pod: &Pod) -> bool {
    !pod.host_network && p.subject.matches(ns_labels(m, &pod.namespace), &pod.labels)
}

/// The policies that can deny `pod`'s traffic in direction `d` (a rule
/// there denies): the cluster-wide counterpart of isolation.
pub(super) fn constraining(m: &Model, pod: &Pod, d: u8) -> Vec<String> {
    policies(m)
        .into_iter()
        .filter(|p| {
            p.rules
                .iter()
                .any(|r| r.direction == d && r.effective_action() == Action::Deny)
                && applies(m, p, pod)
        })
        .map(title)
        .collect()
}

/// A Deny of every peer on every port.
fn denies_everything(r: &ClusterRule) -> bool {
    if r.effective_action() != Action::Deny {
        return false;
    }
    if let Some(all) = r.fail_closed_matches() {
        return all;
    }
    r.ports.is_none()
        && r.peers.iter().any(|p| match p {
            ClusterPeer::Namespaces(s) => s.is_everything(),
            ClusterPeer::Pods { namespaces, pods } => {
                namespaces.is_everything() && pods.is_everything()
            }
            ClusterPeer::Networks(n) => n.iter().any(|n| n.prefix() == 0),
            ClusterPeer::Networks6(n) => n.iter().any(|n| n.prefix() == 0),
            ClusterPeer::Nodes { .. } | ClusterPeer::Domains { .. } => false,
        })
}

/// Policies whose subject is every pod of `ns` and that deny every peer
/// in direction `d`: a cluster-wide default deny for the namespace.
pub(super) fn default_denies(m: &Model, ns: &str, d: u8) -> Vec<String> {
    let labels = ns_labels(m, ns);
    policies(m)
        .into_iter()
        .filter(|p| match &p.subject {
            Subject::Namespaces(s) => s.matches(labels),
            Subject::Pods { namespaces, pods } => {
                namespaces.matches(labels) && pods.is_everything()
            }
        })
        .filter(|p| {
            p.rules
                .iter()
                .any(|r| r.direction == d && denies_everything(r))
        })
        .map(title)
        .collect()
}

/// Whether any ClusterNetworkPolicy applies to `pod` in direction `d`.
pub(super) fn applies_in(m: &Model, pod: &Pod, d: u8) -> bool {
    policies(m)
        .iter()
        .any(|p| p.rules.iter().any(|r| r.direction == d) && applies(m, p, pod))
}

/// Rules of one tier and direction that apply to a subject, in order.
type TierRules<'a> = Vec<(&'a ClusterPolicy, &'a ClusterRule)>;

fn tier_rules<'a>(
    m: &Model,
    cnps: &[&'a ClusterPolicy],
    s: &Pod,
    tier: Tier,
    d: u8,
    above: &dyn Fn(&ClusterPolicy) -> bool,
) -> TierRules<'a> {
    cnps.iter()
        .filter(|p| p.tier == tier && above(p) && applies(m, p, s))
        .flat_map(|p| p.rules.iter().map(move |r| (*p, r)))
        .filter(|(_, r)| r.direction == d)
        .collect()
}

fn pod_peer<'a>(m: &'a Model, q: &'a Pod) -> Option<PeerRep<'a>> {
    Some(PeerRep {
        pod: Some((ns_labels(m, &q.namespace), &q.labels, &q.ports)),
        net: ipnetwork::IpNetwork::V4(Ipv4Network::new(q.ip?, 32).ok()?),
        identity: 0,
        cidr_identity: 0,
    })
}

/// The first decision of `rules` for one flow; a Pass ends the tier
/// undecided.
fn decide<'a>(
    rules: &TierRules<'a>,
    own_ports: &[ContainerPort],
    peer: &PeerRep,
    proto: u8,
    port: u16,
) -> Option<(&'a ClusterPolicy, &'a ClusterRule)> {
    let (p, r) = rules
        .iter()
        .find(|(_, r)| rule_matches(r, own_ports, peer, proto, port))?;
    (r.effective_action() != Action::Pass).then_some((*p, *r))
}

/// The ports a rule matches: every protocol and port, or these.
enum Ports {
    Any,
    Items(Vec<PortItem>),
}

enum PortItem {
    Range(u8, u16, u16),
    /// A container port name of the destination (None: any protocol).
    Named(Option<u8>, String),
}

/// (protocol, first port, last port).
type Interval = (u8, u16, u16);

fn has_name<'a>(ports: &'a [ContainerPort], name: &'a str) -> impl Iterator<Item = (u8, u16)> + 'a {
    ports
        .iter()
        .filter(move |cp| cp.name.as_deref() == Some(name))
        .filter_map(|cp| Some((protocol_number(Some(&cp.protocol))?, cp.port)))
}

/// The port intervals of `ports` towards a destination with `dest` ports
/// (None: not a pod, so named ports match nothing). Other protocols than
/// TCP/UDP/SCTP are the ICMP interval.
fn intervals(ports: &Ports, dest: Option<&[ContainerPort]>) -> Vec<Interval> {
    match ports {
        Ports::Any => vec![
            (PROTO_TCP, 1, u16::MAX),
            (PROTO_UDP, 1, u16::MAX),
            (PROTO_SCTP, 1, u16::MAX),
            (PROTO_ICMP, 0, 0),
        ],
        Ports::Items(items) => items
            .iter()
            .flat_map(|i| match i {
                PortItem::Range(p, a, b) => vec![(*p, *a, *b)],
                PortItem::Named(proto, name) => has_name(dest.unwrap_or_default(), name)
                    .filter(|(p, _)| proto.is_none_or(|x| x == *p))
                    .map(|(p, port)| (p, port, port))
                    .collect(),
            })
            .collect(),
    }
}

/// The ports of `iv` where the decision of `rules` can change.
fn samples(rules: &TierRules, dest: &[ContainerPort], iv: Interval) -> BTreeSet<u16> {
    let (proto, lo, hi) = iv;
    let mut out = BTreeSet::from([lo]);
    let mut add = |x: u32| {
        if x > u32::from(lo) && x <= u32::from(hi) {
            out.insert(x as u16);
        }
    };
    for (_, r) in rules {
        for p in r.ports.iter().flatten() {
            if let ClusterPort::Range {
                proto: q,
                start,
                end,
            } = p
            {
                if *q == proto {
                    add(u32::from(*start));
                    add(u32::from(*end) + 1);
                }
            }
        }
    }
    for cp in dest {
        add(u32::from(cp.port));
        add(u32::from(cp.port) + 1);
    }
    out
}

/// The addresses of a `networks` or `nodes` peer (those match by address).
fn address_peers(p: &ClusterPeer) -> Option<&Vec<Ipv4Network>> {
    match p {
        ClusterPeer::Networks(n)
        | ClusterPeer::Nodes { addresses: n, .. }
        | ClusterPeer::Domains { addresses: n, .. } => Some(n),
        _ => None,
    }
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// The rule of `rules` deciding every non-pod address of `cidr` minus
/// `except` on every port of `iv`, if one does before any rule that could
/// match part of it: CIDR containment only, so never a false positive.
fn block_decided<'a>(
    rules: &TierRules<'a>,
    own_ports: &[ContainerPort],
    d: u8,
    (cidr, except): (Ipv4Network, &[Ipv4Network]),
    iv: Interval,
) -> Option<(&'a ClusterPolicy, &'a ClusterRule)> {
    let (proto, lo, hi) = iv;
    for (p, r) in rules {
        match r.fail_closed_matches() {
            Some(true) => return Some((*p, *r)),
            Some(false) => continue,
            None => {}
        }
        let nets: Vec<Ipv4Network> = r
            .peers
            .iter()
            .filter_map(address_peers)
            .flatten()
            .copied()
            .filter(|n| overlaps(*n, cidr) && !except.iter().any(|e| v4_subset(*n, *e)))
            .collect();
        if nets.is_empty() {
            continue;
        }
        // Named ports name the destination: the subject on ingress.
        let named = |name: &str| {
            let mut v = Vec::new();
            if d == DIR_INGRESS {
                v.extend(has_name(own_ports, name).filter(|(q, _)| *q == proto));
            }
            v
        };
        let (some, all) = match &r.ports {
            None => (true, true),
            Some(ports) => {
                let mut some = false;
                let mut all = false;
                for pt in ports {
                    match pt {
                        ClusterPort::Range {
                            proto: q,
                            start,
                            end,
                        } if *q == proto => {
                            some |= *start <= hi && lo <= *end;
                            all |= *start <= lo && hi <= *end;
                        }
                        ClusterPort::Range { .. } => {}
                        ClusterPort::Named(name) => {
                            for (_, port) in named(name) {
                                some |= (lo..=hi).contains(&port);
                                all |= lo == port && hi == port;
                            }
                        }
                    }
                }
                (some, all)
            }
        };
        if !some {
            continue;
        }
        let whole = nets.iter().any(|n| v4_subset(cidr, *n));
        return (whole && all && r.effective_action() != Action::Pass).then_some((*p, *r));
    }
    None
}

/// The flows a rule matches today.
struct Matched<'a> {
    direction: u8,
    subjects: Vec<&'a Pod>,
    pod_peers: Vec<&'a Pod>,
    /// Non-pod address sets: (cidr, except).
    blocks: Vec<(Ipv4Network, Vec<Ipv4Network>)>,
    ports: Ports,
}

/// Pods that decide alike: same namespace, labels and ports (their
/// address matters only to `networks` peers).
type Kind<'a> = (&'a str, &'a Labels, Vec<(Option<&'a str>, u16, &'a str)>);

fn same_kind<'a>(seen: &mut HashSet<Kind<'a>>, p: &'a Pod) -> bool {
    let ports = p
        .ports
        .iter()
        .map(|cp| (cp.name.as_deref(), cp.port, cp.protocol.as_str()))
        .collect();
    !seen.insert((&p.namespace, &p.labels, ports))
}

/// The Admin rules above that decide every flow `t` matches today, named;
/// None if some flow is left to later steps (or it matches none today).
fn decided_above(
    m: &Model,
    cnps: &[&ClusterPolicy],
    t: &Matched,
    above: &dyn Fn(&ClusterPolicy) -> bool,
) -> Option<BTreeSet<String>> {
    let d = t.direction;
    let mut by = BTreeSet::new();
    let mut flows = 0usize;
    let mut seen_subjects = HashSet::new();
    for s in &t.subjects {
        if same_kind(&mut seen_subjects, s) {
            continue;
        }
        let rules = tier_rules(m, cnps, s, Tier::Admin, d, above);
        if rules.is_empty() {
            return None;
        }
        let by_address = rules
            .iter()
            .any(|(_, r)| r.peers.iter().any(|p| address_peers(p).is_some()));
        let mut seen_peers = HashSet::new();
        let mut name = |(p, r): (&ClusterPolicy, &ClusterRule)| {
            by.insert(format!(
                "{} rule {} ({}, {})",
                title(p),
                r.label(),
                p.tier,
                r.effective_action()
            ));
        };
        for q in &t.pod_peers {
            if !by_address && same_kind(&mut seen_peers, q) {
                continue;
            }
            let Some(peer) = pod_peer(m, q) else {
                continue;
            };
            let dest: &[ContainerPort] = if d == DIR_INGRESS { &s.ports } else { &q.ports };
            for iv in intervals(&t.ports, Some(dest)) {
                for port in samples(&rules, dest, iv) {
                    flows += 1;
                    name(decide(&rules, &s.ports, &peer, iv.0, port)?);
                }
            }
        }
        for (cidr, except) in &t.blocks {
            let dest = (d == DIR_INGRESS).then_some(&s.ports[..]);
            for iv in intervals(&t.ports, dest) {
                flows += 1;
                name(block_decided(&rules, &s.ports, d, (*cidr, except), iv)?);
            }
        }
    }
    (flows > 0).then_some(by)
}

fn np_matched<'a>(m: &'a Model, ns: &str, pol: &Policy, r: &Rule) -> Matched<'a> {
    let mut pod_peers = Vec::new();
    let mut blocks = Vec::new();
    match &r.peers {
        None => {
            pod_peers.extend(pods(m));
            blocks.push((
                Ipv4Network::new([0, 0, 0, 0].into(), 0).unwrap(),
                Vec::new(),
            ));
        }
        Some(peers) => {
            for peer in peers {
                pod_peers.extend(super::peer_pods(m, ns, peer));
                if let Peer::Block { cidr, except } = peer {
                    blocks.push((*cidr, except.clone()));
                }
            }
        }
    }
    let ports = if r.ports.is_empty() {
        Ports::Any
    } else {
        Ports::Items(
            r.ports
                .iter()
                .map(|p| match p {
                    Port::Proto(p) => PortItem::Range(*p, 1, u16::MAX),
                    Port::Range { proto, start, end } => PortItem::Range(*proto, *start, *end),
                    Port::Named { proto, name } => PortItem::Named(Some(*proto), name.clone()),
                })
                .collect(),
        )
    };
    Matched {
        direction: r.direction,
        subjects: pods(m)
            .filter(|p| p.namespace == ns && pol.selector.matches(&p.labels))
            .collect(),
        pod_peers,
        blocks,
        ports,
    }
}

fn cluster_peer_pods<'a>(m: &'a Model, peer: &ClusterPeer) -> Vec<&'a Pod> {
    pods(m)
        .filter(|q| {
            let nsl = ns_labels(m, &q.namespace);
            match peer {
                ClusterPeer::Namespaces(s) => s.matches(nsl),
                ClusterPeer::Pods { namespaces, pods } => {
                    namespaces.matches(nsl) && pods.matches(&q.labels)
                }
                ClusterPeer::Networks(nets) => {
                    q.ip.is_some_and(|ip| nets.iter().any(|n| n.contains(ip)))
                }
                ClusterPeer::Networks6(nets) => {
                    q.ipv6.is_some_and(|ip| nets.iter().any(|n| n.contains(ip)))
                }
                // Node addresses are never a (non-host-network) pod's.
                ClusterPeer::Nodes { .. } | ClusterPeer::Domains { .. } => false,
            }
        })
        .collect()
}

fn cnp_matched<'a>(m: &'a Model, p: &ClusterPolicy, r: &ClusterRule) -> Matched<'a> {
    let mut pod_peers = Vec::new();
    let mut blocks = Vec::new();
    for peer in &r.peers {
        pod_peers.extend(cluster_peer_pods(m, peer));
        if let Some(nets) = address_peers(peer) {
            blocks.extend(nets.iter().map(|n| (*n, Vec::new())));
        }
    }
    let ports = match &r.ports {
        None => Ports::Any,
        Some(ports) => Ports::Items(
            ports
                .iter()
                .map(|p| match p {
                    ClusterPort::Range { proto, start, end } => {
                        PortItem::Range(*proto, *start, *end)
                    }
                    ClusterPort::Named(name) => PortItem::Named(None, name.clone()),
                })
                .collect(),
        ),
    };
    Matched {
        direction: r.direction,
        subjects: pods(m).filter(|q| applies(m, p, q)).collect(),
        pod_peers,
        blocks,
        ports,
    }
}

fn shadow_detail(by: &BTreeSet<String>) -> String {
    let mut names: Vec<&str> = by.iter().map(String::as_str).take(3).collect();
    if by.len() > 3 {
        names.push("...");
    }
    format!(
        "every flow it matches today is decided first by {}: it has no effect",
        names.join(", ")
    )
}

/// NetworkPolicy rule `r` of `k`, dead under the Admin tier.
pub(super) fn np_rule_shadowed(
    m: &Model,
    cnps: &[&ClusterPolicy],
    k: &ObjectKey,
    pol: &Policy,
    r: &Rule,
) -> Option<String> {
    if !cnps.iter().any(|p| p.tier == Tier::Admin) {
        return None;
    }
    let t = np_matched(m, &k.namespace, pol, r);
    decided_above(m, cnps, &t, &|_| true).map(|by| shadow_detail(&by))
}

fn cluster_peer_covers(a: &ClusterPeer, b: &ClusterPeer) -> bool {
    use ClusterPeer::*;
    match (a, b) {
        (Networks(x), Networks(y)) => y.iter().all(|n| x.iter().any(|o| v4_subset(*n, *o))),
        (Nodes { selector: x, .. }, Nodes { selector: y, .. }) => selector_covers(x, y),
        (Nodes { .. }, _) => false,
        // Learned addresses change with every answer: nothing is covered
        // for good, and a domain peer covers nothing but itself.
        (Domains { patterns: x, .. }, Domains { patterns: y, .. }) => x == y,
        (Domains { .. }, _) | (_, Domains { .. }) => false,
        // Nodes' addresses, whichever nodes the selector matches later.
        (Networks(x), Nodes { .. }) => x.iter().any(|n| n.prefix() == 0),
        // `networks` match pod addresses too.
        (Networks(x), _) => x.iter().any(|n| n.prefix() == 0),
        (Namespaces(x), Namespaces(y)) => selector_covers(x, y),
        (Namespaces(x), Pods { namespaces: y, .. }) => selector_covers(x, y),
        (
            Pods {
                namespaces: xn,
                pods: xp,
            },
            Pods {
                namespaces: yn,
                pods: yp,
            },
        ) => selector_covers(xn, yn) && selector_covers(xp, yp),
        (
            Pods {
                namespaces: xn,
                pods: xp,
            },
            Namespaces(y),
        ) => xp.is_everything() && selector_covers(xn, y),
        _ => false,
    }
}

/// Rule `a` matches every flow rule `b` matches, in every cluster state.
fn cluster_rule_covers(a: &ClusterRule, b: &ClusterRule) -> bool {
    if let Some(all) = a.fail_closed_matches() {
        return all;
    }
    if b.unknown.is_some() {
        return false;
    }
    let peers = b
        .peers
        .iter()
        .all(|y| a.peers.iter().any(|x| cluster_peer_covers(x, y)));
    let ports = match (&a.ports, &b.ports) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pa), Some(pb)) => pb.iter().all(|y| {
            pa.iter().any(|x| match (x, y) {
                (
                    ClusterPort::Range { proto, start, end },
                    ClusterPort::Range {
                        proto: q,
                        start: s,
                        end: e,
                    },
                ) => proto == q && start <= s && e <= end,
                (x, y) => x == y,
            })
        }),
    };
    peers && ports
}

/// ClusterNetworkPolicy rules that never decide: an earlier rule of the
/// same policy matches all they match, or Admin rules of policies before
/// them decide every flow they match today.
pub(super) fn shadowed_cluster_rules(m: &Model, out: &mut Vec<Finding>) {
    let cnps = policies(m);
    let rank: HashMap<&str, usize> = cnps
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    for (i, p) in cnps.iter().enumerate() {
        for (j, b) in p.rules.iter().enumerate() {
            let subject = format!("{} {}[{}]", title(p), dir_name(b.direction), b.index);
            let earlier = p.rules[..j]
                .iter()
                .find(|a| a.direction == b.direction && cluster_rule_covers(a, b));
            if let Some(a) = earlier {
                out.push(finding(
                    kind::SHADOWED_RULE,
                    subject,
                    format!(
                        "rule {} of the same policy comes first and matches everything this rule does: it never decides",
                        a.label()
                    ),
                ));
                continue;
            }
            if b.unknown.is_some() {
                continue;
            }
            let above = |q: &ClusterPolicy| rank.get(q.name.as_str()).is_some_and(|r| *r < i);
            if !cnps[..i].iter().any(|q| q.tier == Tier::Admin) {
                continue;
            }
            let t = cnp_matched(m, p, b);
            if let Some(by) = decided_above(m, &cnps, &t, &above) {
                out.push(finding(kind::SHADOWED_RULE, subject, shadow_detail(&by)));
            }
        }
    }
}

/// NetworkPolicy egress of `pod` admits `peer` (the pod `q`, if one) on
/// (proto, port).
fn np_admits(m: &Model, pod: &Pod, q: Option<&Pod>, peer: &PeerRep, proto: u8, port: u16) -> bool {
    let addr = peer.net.ip();
    super::accepted(m)
        .filter(|(k, pol)| {
            *k.namespace == *pod.namespace && pol.egress && pol.selector.matches(&pod.labels)
        })
        .flat_map(|(k, pol)| pol.rules.iter().map(move |r| (k, r)))
        .filter(|(_, r)| r.direction == DIR_EGRESS)
        .any(|(k, r)| {
            let peer_ok = match &r.peers {
                None => true,
                Some(peers) => peers.iter().any(|x| match (x, q) {
                    (Peer::Pods { namespaces, pods }, Some(q)) => {
                        let ns_ok = match namespaces {
                            None => *q.namespace == *k.namespace,
                            Some(s) => s.matches(ns_labels(m, &q.namespace)),
                        };
                        ns_ok && pods.as_ref().is_none_or(|s| s.matches(&q.labels))
                    }
                    (Peer::Block { cidr, except }, _) => match addr {
                        std::net::IpAddr::V4(a) => super::in_block(*cidr, except, a),
                        std::net::IpAddr::V6(_) => false,
                    },
                    _ => false,
                }),
            };
            let port_ok = r.ports.is_empty()
                || r.ports.iter().any(|p| match p {
                    Port::Proto(x) => *x == proto,
                    Port::Range {
                        proto: x,
                        start,
                        end,
                    } => *x == proto && (*start..=*end).contains(&port),
                    Port::Named { proto: x, name } => {
                        *x == proto
                            && q.is_some_and(|q| {
                                has_name(&q.ports, name).any(|y| y == (proto, port))
                            })
                    }
                });
            peer_ok && port_ok
        })
}

/// Whether the whole walk (Admin → NetworkPolicy → Baseline → allow) lets
/// `pod` resolve names: 53/UDP or 53/TCP to some pod, or to an address a
/// rule names.
pub(super) fn dns_reachable(m: &Model, pod: &Pod, np_isolated: bool) -> bool {
    let cnps = policies(m);
    let admin = tier_rules(m, &cnps, pod, Tier::Admin, DIR_EGRESS, &|_| true);
    let baseline = tier_rules(m, &cnps, pod, Tier::Baseline, DIR_EGRESS, &|_| true);
    let allowed = |(q, peer): &(Option<&Pod>, PeerRep), proto: u8| {
        if let Some((_, r)) = decide(&admin, &pod.ports, peer, proto, 53) {
            return r.effective_action() == Action::Accept;
        }
        if np_isolated {
            return np_admits(m, pod, *q, peer, proto, 53);
        }
        decide(&baseline, &pod.ports, peer, proto, 53)
            .is_none_or(|(_, r)| r.effective_action() == Action::Accept)
    };
    // Addresses rules name, each by its first address outside the holes.
    let mut nets: Vec<Ipv4Network> = cnps
        .iter()
        .flat_map(|p| p.rules.iter())
        .flat_map(|r| r.peers.iter())
        .filter_map(address_peers)
        .flatten()
        .copied()
        .collect();
    for (k, pol) in super::accepted(m) {
        if *k.namespace != *pod.namespace {
            continue;
        }
        for r in &pol.rules {
            for x in r.peers.iter().flatten() {
                if let Peer::Block { cidr, except } = x {
                    if !except.iter().any(|e| e.contains(cidr.network())) {
                        nets.push(*cidr);
                    }
                }
            }
        }
    }
    // Lazily: the first admitted candidate ends the search.
    let addresses = nets.into_iter().filter_map(|n| {
        let net = Ipv4Network::new(n.network(), 32).ok()?;
        Some((
            None,
            PeerRep {
                pod: None,
                net: ipnetwork::IpNetwork::V4(net),
                identity: 0,
                cidr_identity: 0,
            },
        ))
    });
    pods(m)
        .filter_map(|q| Some((Some(q), pod_peer(m, q)?)))
        .chain(addresses)
        .any(|c| allowed(&c, PROTO_UDP) || allowed(&c, PROTO_TCP))
}

/// Selectors of ClusterNetworkPolicies that match nothing today, and
/// namespace selectors on labels nobody governs.
pub(super) fn selector_findings(m: &Model, out: &mut Vec<Finding>) {
    for p in policies(m) {
        let subject_ns = match &p.subject {
            Subject::Namespaces(s) => s,
            Subject::Pods { namespaces, .. } => namespaces,
        };
        if !pods(m).any(|q| applies(m, p, q)) {
            out.push(finding(
                kind::EMPTY_SELECTOR,
                format!("{} subject", title(p)),
                "the subject selects no pod today",
            ));
        }
        super::ungoverned(subject_ns, format!("{} subject", title(p)), out);
        for r in &p.rules {
            for (i, peer) in r.peers.iter().enumerate() {
                let at = format!(
                    "{} {}[{}] peer {i}",
                    title(p),
                    dir_name(r.direction),
                    r.index
                );
                let ns = match peer {
                    ClusterPeer::Namespaces(s) => s,
                    ClusterPeer::Pods { namespaces, .. } => namespaces,
                    ClusterPeer::Networks(_)
                    | ClusterPeer::Networks6(_)
                    | ClusterPeer::Domains { .. } => continue,
                    ClusterPeer::Nodes {
                        addresses,
                        addresses6,
                        ..
                    } => {
                        if addresses.is_empty() && addresses6.is_empty() {
                            out.push(finding(
                                kind::EMPTY_SELECTOR,
                                at,
                                "the nodes selector matches no node today",
                            ));
                        }
                        continue;
                    }
                };
                super::ungoverned(ns, at.clone(), out);
                if !m.namespaces.values().any(|n| ns.matches(&n.labels)) {
                    out.push(finding(
                        kind::EMPTY_SELECTOR,
                        at,
                        "the namespaces selector matches no namespace today",
                    ));
                } else if cluster_peer_pods(m, peer).is_empty() {
                    out.push(finding(
                        kind::EMPTY_SELECTOR,
                        at,
                        "the peer selects no pod today",
                    ));
                }
            }
        }
    }
}
