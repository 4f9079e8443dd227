//! An independent oracle for ClusterNetworkPolicy
//! (`policy.networking.k8s.io/v1alpha2`, network-policy-api v0.2.0) on top
//! of the NetworkPolicy oracle ([`crate::oracle`]): random ClusterNetworkPolicies
//! of both tiers and other nodes as plain data, their manifests, and a
//! direct walk of the tiered semantics over the objects, written from the
//! API's documentation and issue 14's summary of it, not from the agent's
//! compiler (`agent/src/compiler/tiers.rs`), its maps or the reference
//! evaluator. `tests/tests/tier_oracle.rs` holds the kernel's verdicts to it.
//!
//! Semantics, for one direction of one connection of a (non host-network)
//! pod:
//!
//! * Traffic between a pod and its own node is always allowed (as for
//!   NetworkPolicy; project decision).
//! * The policies whose `subject` selects the pod (`namespaces`: a selector
//!   on the pod's namespace labels; `pods`: namespace and pod selector) are
//!   walked Admin tier first, by `priority` (lower first; equal priorities
//!   by name, the project's deterministic order), each policy's rules of
//!   the direction in the order written. The first rule that matches
//!   decides: `Accept` allows, `Deny` denies, `Pass` ends the tier's walk.
//! * Then NetworkPolicy: if one isolates the pod in this direction, it
//!   decides (allowed by a rule, else denied), by [`crate::oracle::evaluate`].
//! * Then the Baseline tier, as the Admin one; then allow.
//! * A rule matches when one of its peers matches the other end and its
//!   `protocols` (absent: every protocol and port, ICMP included) match.
//!   Peers: `namespaces` (pods of matching namespaces), `pods` (namespace
//!   and pod selector), and for egress `networks` (the address is in a
//!   CIDR, pod addresses included) and `nodes` (the address is one of a
//!   matching node's). Protocols: `tcp`/`udp`/`sctp` with a
//!   `destinationPort` number or range (inclusive), or a
//!   `destinationNamedPort` resolved on the destination pod (ingress: the
//!   subject; egress: the peer, if it is a pod) to its container port of
//!   that name, whose protocol must be the packet's.
//! * A `domainNames` peer (issue 16) matches the addresses learned from
//!   DNS answers for its names; these clusters resolve no names, so it
//!   matches nothing. The API allows it only in Accept rules: an object
//!   with one in a Deny or a Pass rule is refused.
//! * An object the CRD's validation refuses (here: a priority above 1000,
//!   `domainNames` outside an Accept rule) does nothing.
use std::net::Ipv4Addr;

use palisade_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use rand::{rngs::StdRng, seq::SliceRandom, Rng};
use serde_json::{json, Value};

use crate::oracle::{
    self, selector_matches, Cluster, Dir, Expected, Flow, Labels, Selector, NAME_LABEL,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Admin,
    Baseline,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Accept,
    Deny,
    Pass,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Namespaces(Selector),
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CPeer {
    Namespaces(Selector),
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    /// Egress only.
    Networks(Vec<String>),
    /// Egress only: node label selector.
    Nodes(Selector),
    /// Egress only; not understood (fails closed).
    DomainNames(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CPort {
    /// (protocol name "tcp"/"udp"/"sctp", port)
    Number(&'static str, u16),
    Range(&'static str, u16, u16),
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CRule {
    pub name: Option<String>,
    pub action: Action,
    pub peers: Vec<CPeer>,
    pub ports: Option<Vec<CPort>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CPolicy {
    pub name: String,
    pub tier: Tier,
    pub priority: u32,
    pub subject: Subject,
    pub ingress: Vec<CRule>,
    pub egress: Vec<CRule>,
}

/// Another node of the cluster (this node is `Cluster::host_ips`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
}

#[derive(Clone, Debug, Default)]
pub struct TieredCluster {
    pub base: Cluster,
    pub nodes: Vec<Node>,
    pub policies: Vec<CPolicy>,
}

// ---------------------------------------------------------------- manifests

fn selector_json(s: &Selector) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(l) = &s.match_labels {
        m.insert("matchLabels".into(), json!(l));
    }
    if let Some(es) = &s.match_expressions {
        let v: Vec<Value> = es
            .iter()
            .map(|e| {
                let mut o = json!({"key": e.key, "operator": e.operator});
                if let Some(vs) = &e.values {
                    o["values"] = json!(vs);
                }
                o
            })
            .collect();
        m.insert("matchExpressions".into(), Value::Array(v));
    }
    Value::Object(m)
}

fn peer_json(p: &CPeer) -> Value {
    match p {
        CPeer::Namespaces(s) => json!({"namespaces": selector_json(s)}),
        CPeer::Pods { namespaces, pods } => json!({"pods": {
            "namespaceSelector": selector_json(namespaces),
            "podSelector": selector_json(pods),
        }}),
        CPeer::Networks(n) => json!({ "networks": n }),
        CPeer::Nodes(s) => json!({"nodes": selector_json(s)}),
        CPeer::DomainNames(d) => json!({ "domainNames": d }),
    }
}

fn port_json(p: &CPort) -> Value {
    match p {
        CPort::Number(proto, n) => json!({ *proto: {"destinationPort": {"number": n}} }),
        CPort::Range(proto, s, e) => {
            json!({ *proto: {"destinationPort": {"range": {"start": s, "end": e}}} })
        }
        CPort::Named(n) => json!({ "destinationNamedPort": n }),
    }
}

fn rule_json(r: &CRule, field: &str) -> Value {
    let mut o = serde_json::Map::new();
    if let Some(n) = &r.name {
        o.insert("name".into(), json!(n));
    }
    o.insert("action".into(), json!(format!("{:?}", r.action)));
    o.insert(
        field.into(),
        Value::Array(r.peers.iter().map(peer_json).collect()),
    );
    if let Some(ps) = &r.ports {
        o.insert(
            "protocols".into(),
            Value::Array(ps.iter().map(port_json).collect()),
        );
    }
    Value::Object(o)
}

impl CPolicy {
    /// The `policy.networking.k8s.io/v1alpha2` object.
    pub fn manifest(&self) -> Value {
        let subject = match &self.subject {
            Subject::Namespaces(s) => json!({"namespaces": selector_json(s)}),
            Subject::Pods { namespaces, pods } => json!({"pods": {
                "namespaceSelector": selector_json(namespaces),
                "podSelector": selector_json(pods),
            }}),
        };
        let mut spec = json!({
            "tier": format!("{:?}", self.tier),
            "priority": self.priority,
            "subject": subject,
        });
        if !self.ingress.is_empty() {
            spec["ingress"] =
                Value::Array(self.ingress.iter().map(|r| rule_json(r, "from")).collect());
        }
        if !self.egress.is_empty() {
            spec["egress"] = Value::Array(self.egress.iter().map(|r| rule_json(r, "to")).collect());
        }
        json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": self.name},
            "spec": spec,
        })
    }

    /// What the CRD's validation refuses, of what the generator makes.
    pub fn invalid(&self) -> bool {
        self.priority > 1000
            || self.ingress.iter().chain(&self.egress).any(|r| {
                r.action != Action::Accept
                    && r.peers.iter().any(|p| matches!(p, CPeer::DomainNames(_)))
            })
    }
}

// ---------------------------------------------------------------- the walk

fn in_cidr(addr: Ipv4Addr, cidr: &str) -> bool {
    let Some((a, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(a), Ok(len)) = (a.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(addr) & mask == u32::from(a) & mask
}

fn proto_number(name: &str) -> u8 {
    match name {
        "tcp" | "TCP" => PROTO_TCP,
        "udp" | "UDP" => PROTO_UDP,
        _ => PROTO_SCTP,
    }
}

impl TieredCluster {
    fn ns_labels(&self, ns: &str) -> Labels {
        self.base.namespace(ns).labels()
    }

    fn subject_selects(&self, s: &Subject, pod: &oracle::Pod) -> bool {
        let nsl = self.ns_labels(&pod.namespace);
        match s {
            Subject::Namespaces(n) => selector_matches(n, &nsl),
            Subject::Pods { namespaces, pods } => {
                selector_matches(namespaces, &nsl) && selector_matches(pods, &pod.labels)
            }
        }
    }

    fn peer_matches(&self, p: &CPeer, addr: Ipv4Addr) -> bool {
        let pod = self.base.pod_at(addr);
        match p {
            CPeer::Namespaces(s) => {
                pod.is_some_and(|q| selector_matches(s, &self.ns_labels(&q.namespace)))
            }
            CPeer::Pods { namespaces, pods } => pod.is_some_and(|q| {
                selector_matches(namespaces, &self.ns_labels(&q.namespace))
                    && selector_matches(pods, &q.labels)
            }),
            CPeer::Networks(n) => n.iter().any(|c| in_cidr(addr, c)),
            CPeer::Nodes(s) => {
                self.nodes
                    .iter()
                    .any(|n| n.ip == addr && selector_matches(s, &n.labels))
                    // This node (n1, at the cluster's host address) too.
                    || (self.base.host_ips.contains(&addr) && selector_matches(s, &own_node_labels()))
            }
            CPeer::DomainNames(_) => false,
        }
    }

    /// Does `r` match `flow` (a rule of the flow's direction)?
    fn rule_matches(&self, r: &CRule, flow: &Flow) -> bool {
        if !r.peers.iter().any(|p| self.peer_matches(p, flow.peer)) {
            return false;
        }
        let Some(ports) = &r.ports else {
            return true;
        };
        let dest = match flow.dir {
            Dir::Ingress => Some(&self.base.pods[flow.pod]),
            Dir::Egress => self.base.pod_at(flow.peer),
        };
        ports.iter().any(|p| match p {
            CPort::Number(proto, n) => proto_number(proto) == flow.protocol && *n == flow.dport,
            CPort::Range(proto, s, e) => {
                proto_number(proto) == flow.protocol && (*s..=*e).contains(&flow.dport)
            }
            CPort::Named(name) => dest.is_some_and(|d| {
                d.ports.iter().any(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.port == flow.dport
                        && proto_number(cp.protocol) == flow.protocol
                })
            }),
        })
    }

    /// One tier's walk: Some(decision) or None (no rule decided, or Pass).
    fn tier(&self, tier: Tier, flow: &Flow, passed: &mut Vec<String>) -> Option<Expected> {
        let pod = &self.base.pods[flow.pod];
        let mut ps: Vec<&CPolicy> = self
            .policies
            .iter()
            .filter(|p| p.tier == tier && !p.invalid() && self.subject_selects(&p.subject, pod))
            .collect();
        ps.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        for p in ps {
            let rules = match flow.dir {
                Dir::Ingress => &p.ingress,
                Dir::Egress => &p.egress,
            };
            for (i, r) in rules.iter().enumerate() {
                if !self.rule_matches(r, flow) {
                    continue;
                }
                let at = format!("{}[{}] {:?}", p.name, i, tier);
                return match r.action {
                    Action::Pass => {
                        passed.push(at);
                        None
                    }
                    Action::Accept => Some(Expected {
                        allow: true,
                        why: format!("accepted by {at}"),
                    }),
                    _ => Some(Expected {
                        allow: false,
                        why: format!("denied by {at}"),
                    }),
                };
            }
        }
        None
    }
}

/// Would a cluster implementing ClusterNetworkPolicy allow `flow`?
pub fn evaluate(c: &TieredCluster, flow: &Flow) -> Expected {
    // Traffic with the pod's own node: NetworkPolicy never restricts it,
    // a ClusterNetworkPolicy can restrict the pod's egress to it (admin
    // tier; baseline where no NetworkPolicy isolates the pod).
    let own_node = c.base.host_ips.contains(&flow.peer);
    if own_node && flow.dir == Dir::Ingress {
        return Expected {
            allow: true,
            why: "the pod's own node".into(),
        };
    }
    let mut passed = Vec::new();
    let note = |e: Expected, passed: &[String]| {
        if passed.is_empty() {
            e
        } else {
            Expected {
                allow: e.allow,
                why: format!("{} (passed by {})", e.why, passed.join(", ")),
            }
        }
    };
    if let Some(e) = c.tier(Tier::Admin, flow, &mut passed) {
        return note(e, &passed);
    }
    if own_node {
        // Isolation does not depend on the peer: ask about any other one.
        let probe = Flow {
            peer: Ipv4Addr::new(192, 0, 2, 1),
            ..*flow
        };
        if !oracle::evaluate(&c.base, &probe)
            .why
            .starts_with("not isolated")
        {
            return note(
                Expected {
                    allow: true,
                    why: "NetworkPolicy: the pod's own node".into(),
                },
                &passed,
            );
        }
    }
    let np = oracle::evaluate(&c.base, flow);
    if !own_node && !np.why.starts_with("not isolated") {
        return note(
            Expected {
                allow: np.allow,
                why: format!("NetworkPolicy: {}", np.why),
            },
            &passed,
        );
    }
    if let Some(e) = c.tier(Tier::Baseline, flow, &mut passed) {
        return note(e, &passed);
    }
    note(
        Expected {
            allow: true,
            why: "no tier decided".into(),
        },
        &passed,
    )
}

// ---------------------------------------------------------------- generation

const POD_KEYS: [&str; 3] = ["app", "tier", "role"];
const POD_VALUES: [&str; 3] = ["a", "b", "c"];
const NS_KEYS: [&str; 2] = ["team", "env"];
const NS_VALUES: [&str; 2] = ["x", "y"];
const NODE_ZONES: [&str; 2] = ["z1", "z2"];

/// This node's labels (its name is n1; tier_oracle.rs gives the engine the
/// same Node object).
pub fn own_node_labels() -> Labels {
    Labels::from([("kubernetes.io/hostname".to_string(), "n1".to_string())])
}

/// Other nodes: one inside the pods' /16 (NetworkPolicy ipBlocks and
/// `networks` reach it), one far away.
pub fn gen_nodes(rng: &mut StdRng) -> Vec<Node> {
    [
        ("n2", Ipv4Addr::new(10, 1, 254, 2)),
        ("n3", Ipv4Addr::new(192, 168, 7, 3)),
        ("n4", Ipv4Addr::new(10, 1, 254, 4)),
    ]
    .iter()
    .map(|(name, ip)| {
        let mut labels = Labels::new();
        labels.insert("kubernetes.io/hostname".into(), name.to_string());
        if rng.gen_bool(0.7) {
            labels.insert(
                "zone".into(),
                NODE_ZONES.choose(rng).expect("zones").to_string(),
            );
        }
        Node {
            name: name.to_string(),
            labels,
            ip: *ip,
        }
    })
    .collect()
}

fn sel(rng: &mut StdRng, keys: &[&str], values: &[&str]) -> Selector {
    match rng.gen_range(0..10) {
        0..=3 => Selector::default(),
        4..=7 => {
            let k = keys.choose(rng).expect("keys");
            let v = values.choose(rng).expect("values");
            Selector {
                match_labels: Some(Labels::from([(k.to_string(), v.to_string())])),
                ..Selector::default()
            }
        }
        _ => {
            let k = keys.choose(rng).expect("keys").to_string();
            let (operator, values) = match rng.gen_range(0..4) {
                0 => ("In", Some(vec![values.choose(rng).expect("v").to_string()])),
                1 => (
                    "NotIn",
                    Some(vec![values.choose(rng).expect("v").to_string()]),
                ),
                2 => ("Exists", None),
                _ => ("DoesNotExist", None),
            };
            Selector {
                match_expressions: Some(vec![oracle::Expr {
                    key: k,
                    operator: operator.into(),
                    values,
                }]),
                ..Selector::default()
            }
        }
    }
}

fn ns_sel(rng: &mut StdRng) -> Selector {
    if rng.gen_bool(0.3) {
        Selector {
            match_labels: Some(Labels::from([(
                NAME_LABEL.to_string(),
                oracle::NAMESPACES.choose(rng).expect("ns").to_string(),
            )])),
            ..Selector::default()
        }
    } else {
        sel(rng, &NS_KEYS, &NS_VALUES)
    }
}

const NETWORKS: [&str; 9] = [
    "10.1.0.0/24",
    "10.1.0.0/28",
    "10.1.0.8/29",
    "10.1.1.0/24",
    "10.1.254.0/24",
    // The pods' /16 with the node's address in it.
    "10.1.0.0/16",
    "192.168.0.0/16",
    "8.8.8.8/32",
    "0.0.0.0/0",
];

fn gen_peer(rng: &mut StdRng, egress: bool) -> CPeer {
    match rng.gen_range(0..if egress { 10 } else { 6 }) {
        0..=1 => CPeer::Namespaces(ns_sel(rng)),
        2..=5 => CPeer::Pods {
            namespaces: ns_sel(rng),
            pods: sel(rng, &POD_KEYS, &POD_VALUES),
        },
        6..=7 => {
            let n = rng.gen_range(1..=2);
            CPeer::Networks(
                NETWORKS
                    .choose_multiple(rng, n)
                    .map(|s| s.to_string())
                    .collect(),
            )
        }
        8 => CPeer::Nodes(sel(
            rng,
            &["zone", "kubernetes.io/hostname"],
            &["z1", "z2", "n1", "n2", "n3"],
        )),
        _ => {
            if rng.gen_bool(0.15) {
                CPeer::DomainNames(vec!["example.com".into()])
            } else {
                CPeer::Nodes(Selector::default())
            }
        }
    }
}

fn gen_port(rng: &mut StdRng, named_ok: bool) -> CPort {
    let proto = *["tcp", "tcp", "udp", "sctp"].choose(rng).expect("protos");
    match rng.gen_range(0..10) {
        0..=4 => CPort::Number(proto, *oracle::DPORTS.choose(rng).expect("ports")),
        5..=7 => {
            let (s, e) = *[
                (8080, 8081),
                (1000, 1023),
                (80, 443),
                (3000, 3001),
                (1, 65535),
            ]
            .choose(rng)
            .expect("ranges");
            CPort::Range(proto, s, e)
        }
        _ if named_ok => CPort::Named(
            ["http", "dns", "metrics", "sig", "nowhere"]
                .choose(rng)
                .expect("names")
                .to_string(),
        ),
        _ => CPort::Number(proto, 80),
    }
}

fn gen_rule(rng: &mut StdRng, egress: bool, i: usize) -> CRule {
    let peers: Vec<CPeer> = (0..rng.gen_range(1..=2))
        .map(|_| gen_peer(rng, egress))
        .collect();
    // The API refuses named ports beside networks/nodes/domainNames peers.
    let named_ok = !peers.iter().any(|p| {
        matches!(
            p,
            CPeer::Networks(_) | CPeer::Nodes(_) | CPeer::DomainNames(_)
        )
    });
    let ports = rng.gen_bool(0.6).then(|| {
        (0..rng.gen_range(1..=2))
            .map(|_| gen_port(rng, named_ok))
            .collect()
    });
    CRule {
        name: rng.gen_bool(0.7).then(|| format!("r{i}")),
        action: *[Action::Accept, Action::Deny, Action::Pass]
            .choose(rng)
            .expect("actions"),
        peers,
        ports,
    }
}

fn gen_policy(rng: &mut StdRng, i: usize) -> CPolicy {
    let subject = if rng.gen_bool(0.5) {
        Subject::Namespaces(ns_sel(rng))
    } else {
        Subject::Pods {
            namespaces: ns_sel(rng),
            pods: sel(rng, &POD_KEYS, &POD_VALUES),
        }
    };
    let mut p = CPolicy {
        name: format!("cnp{i}"),
        tier: if rng.gen_bool(0.5) {
            Tier::Admin
        } else {
            Tier::Baseline
        },
        // Few values, so equal priorities (name order) happen.
        priority: *[0, 5, 10, 10, 100, 1000].choose(rng).expect("prio"),
        subject,
        ingress: (0..rng.gen_range(0..=3))
            .map(|r| gen_rule(rng, false, r))
            .collect(),
        egress: (0..rng.gen_range(0..=3))
            .map(|r| gen_rule(rng, true, r))
            .collect(),
    };
    if rng.gen_bool(0.03) {
        p.priority = 1001;
    }
    p
}

/// A random tiered cluster: the NetworkPolicy oracle's cluster (with fewer
/// NetworkPolicies), other nodes and 0-6 ClusterNetworkPolicies.
pub fn gen_cluster(rng: &mut StdRng, ifindexes: &[u32]) -> TieredCluster {
    let mut base = oracle::gen_cluster(rng, ifindexes);
    let keep = rng.gen_range(0..=base.policies.len().min(4));
    base.policies.truncate(keep);
    let nodes = gen_nodes(rng);
    let policies = (0..rng.gen_range(1..=6))
        .map(|i| gen_policy(rng, i))
        .collect();
    TieredCluster {
        base,
        nodes,
        policies,
    }
}

/// Flows: the NetworkPolicy oracle's, flows to other nodes, and flows aimed
/// at one ClusterNetworkPolicy rule (a subject pod, a matching peer, a port
/// the rule names).
pub fn gen_flows(rng: &mut StdRng, c: &TieredCluster, n: usize) -> Vec<Flow> {
    let mut out = oracle::gen_flows(rng, &c.base, n / 2);
    let locals: Vec<usize> = (0..c.base.pods.len())
        .filter(|&i| c.base.pods[i].local.is_some())
        .collect();
    let mut peers = oracle::peer_addresses(&c.base);
    peers.extend(c.nodes.iter().map(|n| n.ip));
    let mut guard = 0;
    while out.len() < n && guard < n * 20 {
        guard += 1;
        let pod = *locals.choose(rng).expect("a local pod");
        if rng.gen_bool(0.15) {
            let node = c.nodes.choose(rng).expect("nodes");
            out.push(Flow {
                pod,
                dir: if rng.gen_bool(0.7) {
                    Dir::Egress
                } else {
                    Dir::Ingress
                },
                peer: node.ip,
                protocol: *[PROTO_TCP, PROTO_UDP].choose(rng).expect("p"),
                dport: *oracle::DPORTS.choose(rng).expect("d"),
            });
            continue;
        }
        let Some(p) = c.policies.choose(rng) else {
            break;
        };
        if !c.subject_selects(&p.subject, &c.base.pods[pod]) {
            continue;
        }
        let dir = if rng.gen_bool(0.5) {
            Dir::Ingress
        } else {
            Dir::Egress
        };
        let rules = if dir == Dir::Ingress {
            &p.ingress
        } else {
            &p.egress
        };
        let Some(r) = rules.choose(rng) else {
            continue;
        };
        let own = c.base.pods[pod].ip;
        let cands: Vec<Ipv4Addr> = peers
            .iter()
            .copied()
            .filter(|a| *a != own && r.peers.iter().any(|x| c.peer_matches(x, *a)))
            .collect();
        let Some(&peer) = cands.choose(rng) else {
            continue;
        };
        let (protocol, dport) = match r.ports.as_ref().and_then(|ps| ps.choose(rng)) {
            None => (
                *[
                    PROTO_TCP,
                    PROTO_UDP,
                    PROTO_SCTP,
                    palisade_common::PROTO_ICMP,
                ]
                .choose(rng)
                .expect("p"),
                *oracle::DPORTS.choose(rng).expect("d"),
            ),
            Some(CPort::Number(pr, n)) => (proto_number(pr), *n),
            Some(CPort::Range(pr, s, e)) => (proto_number(pr), rng.gen_range(*s..=*e)),
            Some(CPort::Named(name)) => {
                let dest = if dir == Dir::Ingress {
                    Some(&c.base.pods[pod])
                } else {
                    c.base.pod_at(peer)
                };
                match dest.and_then(|d| {
                    d.ports
                        .iter()
                        .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                }) {
                    Some(cp) => (proto_number(cp.protocol), cp.port),
                    None => (PROTO_TCP, 80),
                }
            }
        };
        out.push(Flow {
            pod,
            dir,
            peer,
            protocol,
            dport,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::{ContainerPort, Namespace, Pod, HOST_IP};

    fn cluster(policies: Vec<CPolicy>) -> TieredCluster {
        let pod = |name: &str, app: &str, ip: [u8; 4], local: Option<(u32, u32)>| Pod {
            namespace: "alpha".into(),
            name: name.into(),
            labels: Labels::from([("app".to_string(), app.to_string())]),
            ip: Ipv4Addr::from(ip),
            ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: "TCP",
            }],
            local,
        };
        TieredCluster {
            base: Cluster {
                namespaces: vec![Namespace {
                    name: "alpha".into(),
                    labels: Labels::new(),
                }],
                pods: vec![
                    pod("server", "a", [10, 1, 0, 1], Some((1, 10))),
                    pod("client", "b", [10, 1, 0, 2], None),
                ],
                policies: vec![],
                host_ips: vec![HOST_IP],
            },
            nodes: vec![Node {
                name: "n2".into(),
                labels: Labels::from([("zone".to_string(), "z1".to_string())]),
                ip: Ipv4Addr::new(10, 1, 254, 2),
            }],
            policies,
        }
    }

    fn rule(action: Action, peers: Vec<CPeer>, ports: Option<Vec<CPort>>) -> CRule {
        CRule {
            name: None,
            action,
            peers,
            ports,
        }
    }

    fn policy(name: &str, tier: Tier, priority: u32, ingress: Vec<CRule>) -> CPolicy {
        CPolicy {
            name: name.into(),
            tier,
            priority,
            subject: Subject::Namespaces(Selector::default()),
            ingress,
            egress: vec![],
        }
    }

    fn all_pods() -> CPeer {
        CPeer::Namespaces(Selector::default())
    }

    fn from_client(port: u16) -> Flow {
        Flow {
            pod: 0,
            dir: Dir::Ingress,
            peer: Ipv4Addr::new(10, 1, 0, 2),
            protocol: PROTO_TCP,
            dport: port,
        }
    }

    #[test]
    fn admin_decides_first_then_networkpolicy_then_baseline() {
        let deny = policy(
            "d",
            Tier::Admin,
            10,
            vec![rule(Action::Deny, vec![all_pods()], None)],
        );
        let accept = policy(
            "a",
            Tier::Admin,
            5,
            vec![rule(
                Action::Accept,
                vec![all_pods()],
                Some(vec![CPort::Named("http".into())]),
            )],
        );
        let c = cluster(vec![deny.clone(), accept.clone()]);
        assert!(evaluate(&c, &from_client(8080)).allow);
        assert!(!evaluate(&c, &from_client(80)).allow);
        // Priority swap: the Deny now comes first.
        let mut d2 = deny.clone();
        d2.priority = 1;
        let c = cluster(vec![d2, accept]);
        assert!(!evaluate(&c, &from_client(8080)).allow);
        // Baseline Deny, no NetworkPolicy: denied; Admin Pass changes nothing.
        let base = policy(
            "b",
            Tier::Baseline,
            0,
            vec![rule(Action::Deny, vec![all_pods()], None)],
        );
        let pass = policy(
            "p",
            Tier::Admin,
            0,
            vec![rule(Action::Pass, vec![all_pods()], None)],
        );
        let c = cluster(vec![pass, deny, base]);
        let e = evaluate(&c, &from_client(80));
        assert!(!e.allow, "{}", e.why);
        assert!(e.why.contains("b[0] Baseline"), "{}", e.why);
    }

    #[test]
    fn nodes_and_networks_peers_match_addresses() {
        let mut p = policy("n", Tier::Admin, 0, vec![]);
        p.egress = vec![
            rule(
                Action::Deny,
                vec![CPeer::Nodes(Selector {
                    match_labels: Some(Labels::from([("zone".into(), "z1".into())])),
                    ..Selector::default()
                })],
                None,
            ),
            rule(
                Action::Deny,
                vec![CPeer::Networks(vec!["10.1.0.2/32".into()])],
                Some(vec![CPort::Range("udp", 50, 60)]),
            ),
        ];
        let c = cluster(vec![p]);
        let to = |peer: Ipv4Addr, protocol: u8, dport: u16| Flow {
            pod: 0,
            dir: Dir::Egress,
            peer,
            protocol,
            dport,
        };
        assert!(!evaluate(&c, &to(Ipv4Addr::new(10, 1, 254, 2), PROTO_TCP, 1)).allow);
        assert!(!evaluate(&c, &to(Ipv4Addr::new(10, 1, 0, 2), PROTO_UDP, 55)).allow);
        assert!(evaluate(&c, &to(Ipv4Addr::new(10, 1, 0, 2), PROTO_UDP, 61)).allow);
        assert!(evaluate(&c, &to(HOST_IP, PROTO_TCP, 1)).allow);
    }
}
