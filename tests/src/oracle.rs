//! An independent oracle for NetworkPolicy: random clusters (namespaces,
//! pods, policies) as plain data, their Kubernetes manifests, and a direct
//! evaluation of the NetworkPolicy semantics over those objects, written
//! from the API documentation (`networking.k8s.io/v1` NetworkPolicy,
//! `metav1.LabelSelector`), not from the agent's compiler, its maps or the
//! reference evaluator. `tests/tests/policy_oracle.rs` holds the kernel's
//! verdicts (programs fed with what the compiler made of the same cluster)
//! to it.
//!
//! Semantics implemented (the API's, plus the project decisions documented
//! in `agent/src/compiler.rs` on points the API leaves open):
//!
//! * A pod is isolated for ingress (egress) when a policy of its namespace
//!   selects it (`podSelector`) and has `Ingress` (`Egress`) in its
//!   effective `policyTypes`. Absent or empty `policyTypes`: `Ingress`, plus
//!   `Egress` when `spec.egress` has at least one rule.
//! * A connection is allowed in a direction when the pod is not isolated
//!   in it, or when at least one rule of that direction of one of the
//!   policies isolating it matches (union; order and count do not matter).
//! * A rule matches when one of its peers matches (absent or empty
//!   `from`/`to`: every peer) and one of its ports matches (absent or empty
//!   `ports`: every port of every protocol).
//! * A selector peer matches pods only: the namespace is the policy's own
//!   unless `namespaceSelector` is given (matched against the namespace's
//!   labels, which always include `kubernetes.io/metadata.name`); absent
//!   `podSelector` means every pod of the selected namespaces. An `ipBlock`
//!   matches the address when it is in `cidr` and in no `except`, pod
//!   addresses included (project decision).
//! * A port matches on protocol (default TCP) and number: none (every
//!   port), one, `port..=endPort`, or a name. A name resolves on the pod
//!   receiving the traffic: the selected pod for ingress, the destination
//!   pod for egress, whatever the rule's peers are (so an egress rule with
//!   an `ipBlock` peer and a named port allows, to a pod address inside the
//!   block, only that pod's own number for the name); to an address that is
//!   no pod's, a name matches nothing. ICMP only passes rules without ports.
//! * Traffic between a pod and its own node is always allowed.
//! * An invalid policy (what the API server's validation refuses) allows
//!   nothing and still isolates what it selects in its `policyTypes`
//!   directions; with an invalid `podSelector`, every pod of its namespace;
//!   with an invalid `policyTypes`, both directions (project decisions).
use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::Ipv4Addr,
};

use palisade_common::{PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use rand::{rngs::StdRng, seq::SliceRandom, Rng};
use serde_json::{json, Value};

pub type Labels = BTreeMap<String, String>;

pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

// ---------------------------------------------------------------- objects

#[derive(Clone, Debug)]
pub struct Namespace {
    pub name: String,
    /// Without the name label (the API server adds it; see `labels`).
    pub labels: Labels,
}

impl Namespace {
    /// The labels selectors see: always with `kubernetes.io/metadata.name`.
    pub fn labels(&self) -> Labels {
        let mut l = self.labels.clone();
        l.insert(NAME_LABEL.into(), self.name.clone());
        l
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    /// "TCP", "UDP" or "SCTP"
    pub protocol: &'static str,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    pub ports: Vec<ContainerPort>,
    /// On this node: (endpoint id, host-side ifindex).
    pub local: Option<(u32, u32)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expr {
    pub key: String,
    pub operator: String,
    pub values: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: Option<Labels>,
    pub match_expressions: Option<Vec<Expr>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: String,
    pub except: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub pod_selector: Option<Selector>,
    pub namespace_selector: Option<Selector>,
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortValue {
    Number(i32),
    Name(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Port {
    pub protocol: Option<String>,
    pub port: Option<PortValue>,
    pub end_port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// `from` (ingress) or `to` (egress).
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<Port>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub policy_types: Option<Vec<String>>,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<Policy>,
    /// This node's addresses.
    pub host_ips: Vec<Ipv4Addr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    Ingress,
    Egress,
}

impl fmt::Display for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dir::Ingress => "ingress",
            Dir::Egress => "egress",
        })
    }
}

/// The first packet of a connection as one local pod's veth sees it: for
/// `Egress` the pod sends to `peer`, for `Ingress` `peer` sends to the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Index into `Cluster::pods` (a local pod).
    pub pod: usize,
    pub dir: Dir,
    pub peer: Ipv4Addr,
    pub protocol: u8,
    /// Destination port (the echo id for ICMP, which policy ignores).
    pub dport: u16,
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

fn rule_json(r: &Rule, field: &str) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(peers) = &r.peers {
        let v: Vec<Value> = peers
            .iter()
            .map(|p| {
                let mut o = serde_json::Map::new();
                if let Some(s) = &p.pod_selector {
                    o.insert("podSelector".into(), selector_json(s));
                }
                if let Some(s) = &p.namespace_selector {
                    o.insert("namespaceSelector".into(), selector_json(s));
                }
                if let Some(b) = &p.ip_block {
                    let mut bo = json!({"cidr": b.cidr});
                    if let Some(e) = &b.except {
                        bo["except"] = json!(e);
                    }
                    o.insert("ipBlock".into(), bo);
                }
                Value::Object(o)
            })
            .collect();
        m.insert(field.into(), Value::Array(v));
    }
    if let Some(ports) = &r.ports {
        let v: Vec<Value> = ports
            .iter()
            .map(|p| {
                let mut o = serde_json::Map::new();
                if let Some(pr) = &p.protocol {
                    o.insert("protocol".into(), json!(pr));
                }
                match &p.port {
                    Some(PortValue::Number(n)) => {
                        o.insert("port".into(), json!(n));
                    }
                    Some(PortValue::Name(n)) => {
                        o.insert("port".into(), json!(n));
                    }
                    None => {}
                }
                if let Some(e) = p.end_port {
                    o.insert("endPort".into(), json!(e));
                }
                Value::Object(o)
            })
            .collect();
        m.insert("ports".into(), Value::Array(v));
    }
    Value::Object(m)
}

impl Policy {
    /// The `networking.k8s.io/v1` object, as the API serves it.
    pub fn manifest(&self) -> Value {
        let mut spec = serde_json::Map::new();
        spec.insert("podSelector".into(), selector_json(&self.pod_selector));
        if let Some(t) = &self.policy_types {
            spec.insert("policyTypes".into(), json!(t));
        }
        if let Some(rs) = &self.ingress {
            let v: Vec<Value> = rs.iter().map(|r| rule_json(r, "from")).collect();
            spec.insert("ingress".into(), Value::Array(v));
        }
        if let Some(rs) = &self.egress {
            let v: Vec<Value> = rs.iter().map(|r| rule_json(r, "to")).collect();
            spec.insert("egress".into(), Value::Array(v));
        }
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": Value::Object(spec),
        })
    }
}

impl Cluster {
    pub fn namespace(&self, name: &str) -> Namespace {
        self.namespaces
            .iter()
            .find(|n| n.name == name)
            .cloned()
            .unwrap_or_else(|| Namespace {
                name: name.into(),
                labels: Labels::new(),
            })
    }

    pub fn pod_at(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.pods.iter().find(|p| p.ip == ip)
    }

    /// A readable, replayable description: the objects as YAML-ish lines
    /// and every policy as its JSON manifest.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "node addresses: {:?}", self.host_ips);
        for n in &self.namespaces {
            let _ = writeln!(s, "namespace {} labels {:?}", n.name, n.labels);
        }
        for p in &self.pods {
            let ports: Vec<String> = p
                .ports
                .iter()
                .map(|c| {
                    format!(
                        "{}{}/{}",
                        c.name
                            .as_deref()
                            .map(|n| format!("{n}="))
                            .unwrap_or_default(),
                        c.port,
                        c.protocol
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "pod {}/{} {} {} labels {:?} ports [{}]",
                p.namespace,
                p.name,
                p.ip,
                match p.local {
                    Some((id, ifx)) => format!("local(endpoint {id}, ifindex {ifx})"),
                    None => "remote".into(),
                },
                p.labels,
                ports.join(", ")
            );
        }
        for p in &self.policies {
            let _ = writeln!(s, "{}", p.manifest());
        }
        s
    }
}

// ---------------------------------------------------------------- validation

fn parse_cidr(s: &str) -> Option<(u32, u8)> {
    let (a, l) = s.split_once('/')?;
    let a: Ipv4Addr = a.parse().ok()?;
    let l: u8 = l.parse().ok()?;
    if l > 32 {
        return None;
    }
    Some((u32::from(a) & mask(l), l))
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len)
    }
}

fn in_cidr(ip: Ipv4Addr, (net, len): (u32, u8)) -> bool {
    u32::from(ip) & mask(len) == net
}

fn selector_valid(s: &Selector) -> bool {
    s.match_labels.iter().flatten().all(|(k, _)| !k.is_empty())
        && s.match_expressions.iter().flatten().all(|e| {
            let n = e.values.as_ref().map_or(0, Vec::len);
            !e.key.is_empty()
                && match e.operator.as_str() {
                    "In" | "NotIn" => n > 0,
                    "Exists" | "DoesNotExist" => n == 0,
                    _ => false,
                }
        })
}

/// Kubernetes IANA_SVC_NAME.
fn port_name_valid(n: &str) -> bool {
    (1..=15).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && n.bytes().any(|b| b.is_ascii_lowercase())
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--")
}

fn protocol_number(p: Option<&str>) -> Option<u8> {
    match p {
        None | Some("TCP") => Some(PROTO_TCP),
        Some("UDP") => Some(PROTO_UDP),
        Some("SCTP") => Some(PROTO_SCTP),
        _ => None,
    }
}

fn peer_valid(p: &Peer) -> Result<(), String> {
    if let Some(b) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err("ipBlock combined with a selector".into());
        }
        let c = parse_cidr(&b.cidr).ok_or("bad cidr")?;
        for e in b.except.iter().flatten() {
            let x = parse_cidr(e).ok_or("bad except")?;
            if !(x.1 > c.1 && in_cidr(Ipv4Addr::from(x.0), c)) {
                return Err(format!("except {e} not strictly inside {}", b.cidr));
            }
        }
        return Ok(());
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        return Err("empty peer".into());
    }
    for s in [&p.pod_selector, &p.namespace_selector]
        .into_iter()
        .flatten()
    {
        if !selector_valid(s) {
            return Err("invalid peer selector".into());
        }
    }
    Ok(())
}

fn port_valid(p: &Port) -> Result<(), String> {
    protocol_number(p.protocol.as_deref()).ok_or("bad protocol")?;
    match (&p.port, p.end_port) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err("endPort without port".into()),
        (Some(PortValue::Name(_)), Some(_)) => Err("endPort with a named port".into()),
        (Some(PortValue::Name(n)), None) if port_name_valid(n) => Ok(()),
        (Some(PortValue::Name(n)), None) => Err(format!("bad port name {n:?}")),
        (Some(PortValue::Number(n)), end) => {
            if !(1..=65535).contains(n) {
                return Err("port out of range".into());
            }
            match end {
                Some(e) if !(*n..=65535).contains(&e) => Err("endPort below port".into()),
                _ => Ok(()),
            }
        }
    }
}

fn types_valid(p: &Policy) -> bool {
    p.policy_types
        .iter()
        .flatten()
        .all(|t| t == "Ingress" || t == "Egress")
}

/// Why the API server would refuse the policy, if it would.
pub fn invalid(p: &Policy) -> Option<String> {
    if !selector_valid(&p.pod_selector) {
        return Some("invalid podSelector".into());
    }
    if !types_valid(p) {
        return Some("unknown policyTypes".into());
    }
    for r in p.ingress.iter().chain(p.egress.iter()).flatten() {
        for peer in r.peers.iter().flatten() {
            if let Err(e) = peer_valid(peer) {
                return Some(e);
            }
        }
        for port in r.ports.iter().flatten() {
            if let Err(e) = port_valid(port) {
                return Some(e);
            }
        }
    }
    None
}

/// Effective (ingress, egress) policyTypes.
pub fn effective_types(p: &Policy) -> (bool, bool) {
    if !types_valid(p) {
        return (true, true);
    }
    match p.policy_types.as_deref() {
        None | Some([]) => (true, p.egress.as_ref().is_some_and(|e| !e.is_empty())),
        Some(t) => (
            t.iter().any(|x| x == "Ingress"),
            t.iter().any(|x| x == "Egress"),
        ),
    }
}

// ---------------------------------------------------------------- matching

/// `metav1.LabelSelector` semantics: every `matchLabels` pair and every
/// requirement must hold; `{}` matches everything. Only for valid selectors.
pub fn selector_matches(s: &Selector, labels: &Labels) -> bool {
    s.match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && s.match_expressions.iter().flatten().all(|e| {
            let vals = e.values.as_deref().unwrap_or_default();
            let got = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => got.is_some_and(|v| vals.contains(v)),
                "NotIn" => got.is_none_or(|v| !vals.contains(v)),
                "Exists" => got.is_some(),
                "DoesNotExist" => got.is_none(),
                _ => false,
            }
        })
}

/// Does `p` select `pod` for isolation (valid or not)?
fn selects(p: &Policy, pod: &Pod) -> bool {
    p.namespace == pod.namespace
        && (!selector_valid(&p.pod_selector) || selector_matches(&p.pod_selector, &pod.labels))
}

fn peer_matches(c: &Cluster, policy: &Policy, peer: &Peer, addr: Ipv4Addr) -> bool {
    if let Some(b) = &peer.ip_block {
        let Some(cidr) = parse_cidr(&b.cidr) else {
            return false;
        };
        return in_cidr(addr, cidr)
            && !b
                .except
                .iter()
                .flatten()
                .filter_map(|e| parse_cidr(e))
                .any(|e| in_cidr(addr, e));
    }
    let Some(pod) = c.pod_at(addr) else {
        return false;
    };
    let ns_ok = match &peer.namespace_selector {
        None => pod.namespace == policy.namespace,
        Some(s) => selector_matches(s, &c.namespace(&pod.namespace).labels()),
    };
    ns_ok
        && peer
            .pod_selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, &pod.labels))
}

fn port_matches(port: &Port, target: Option<&Pod>, protocol: u8, dport: u16) -> bool {
    if protocol_number(port.protocol.as_deref()) != Some(protocol) {
        return false;
    }
    match &port.port {
        None => true,
        Some(PortValue::Number(n)) => {
            let end = port.end_port.unwrap_or(*n);
            (*n..=end).contains(&(dport as i32))
        }
        Some(PortValue::Name(name)) => target.is_some_and(|t| {
            t.ports.iter().any(|cp| {
                cp.name.as_deref() == Some(name.as_str())
                    && protocol_number(Some(cp.protocol)) == Some(protocol)
                    && cp.port == dport
            })
        }),
    }
}

/// The oracle's answer, with the reason in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub allow: bool,
    pub why: String,
}

/// Would Kubernetes allow `flow`?
pub fn evaluate(c: &Cluster, flow: &Flow) -> Expected {
    evaluate_with(c, flow, Semantics::Kubernetes)
}

/// Which reading of the one point where the agent is known to differ
/// (being fixed): only used to label a disagreement, never to pass one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Semantics {
    /// As documented in the module docs.
    Kubernetes,
    /// A named port in an egress rule matches nothing through an `ipBlock`
    /// peer (the compiler's behaviour before the fix).
    NamedPortNeverOnIpBlock,
}

pub fn evaluate_with(c: &Cluster, flow: &Flow, sem: Semantics) -> Expected {
    let pod = &c.pods[flow.pod];
    let yes = |why: String| Expected { allow: true, why };
    if c.host_ips.contains(&flow.peer) {
        return yes("the pod's own node".into());
    }
    let isolating: Vec<&Policy> = c
        .policies
        .iter()
        .filter(|p| {
            let (i, e) = effective_types(p);
            let in_dir = match flow.dir {
                Dir::Ingress => i,
                Dir::Egress => e,
            };
            in_dir && selects(p, pod)
        })
        .collect();
    if isolating.is_empty() {
        return yes(format!("not isolated for {}", flow.dir));
    }
    // The pod that receives the traffic: named ports resolve on it.
    let target = match flow.dir {
        Dir::Ingress => Some(pod),
        Dir::Egress => c.pod_at(flow.peer),
    };
    for p in &isolating {
        if invalid(p).is_some() {
            continue;
        }
        let rules = match flow.dir {
            Dir::Ingress => &p.ingress,
            Dir::Egress => &p.egress,
        };
        for (i, r) in rules.iter().flatten().enumerate() {
            let ports_ok = |names: bool| match &r.ports {
                None => true,
                Some(v) if v.is_empty() => true,
                Some(v) => v.iter().any(|port| {
                    (names || !matches!(port.port, Some(PortValue::Name(_))))
                        && port_matches(port, target, flow.protocol, flow.dport)
                }),
            };
            let matched = match &r.peers {
                None => ports_ok(true),
                Some(v) if v.is_empty() => ports_ok(true),
                Some(v) => v.iter().any(|peer| {
                    let names = sem == Semantics::Kubernetes
                        || flow.dir == Dir::Ingress
                        || peer.ip_block.is_none();
                    peer_matches(c, p, peer, flow.peer) && ports_ok(names)
                }),
            };
            if matched {
                return yes(format!("{}/{} {}[{i}]", p.namespace, p.name, flow.dir));
            }
        }
    }
    let names: Vec<String> = isolating
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    Expected {
        allow: false,
        why: format!("isolated by {} and no rule matches", names.join(", ")),
    }
}

// ---------------------------------------------------------------- generation

/// Namespace names, pod-label and namespace-label vocabularies: small, so
/// random selectors often match.
pub const NAMESPACES: [&str; 3] = ["alpha", "beta", "gamma"];
const POD_KEYS: [&str; 3] = ["app", "tier", "role"];
const POD_VALUES: [&str; 3] = ["a", "b", "c"];
const NS_KEYS: [&str; 2] = ["team", "env"];
const NS_VALUES: [&str; 2] = ["x", "y"];

/// Named container ports: (name, protocol, the numbers pods may give it).
const NAMED: [(&str, &str, [u16; 2]); 4] = [
    ("http", "TCP", [80, 8080]),
    ("dns", "UDP", [53, 5353]),
    ("metrics", "TCP", [9090, 9091]),
    ("sig", "SCTP", [7777, 7778]),
];

/// Destination ports packets use: every number the generator can put in a
/// policy or a container port, and neighbours of the range edges.
pub const DPORTS: [u16; 22] = [
    53, 80, 81, 443, 5353, 7777, 7778, 8080, 8081, 8082, 9090, 9091, 1000, 1023, 1024, 999, 22, 1,
    65535, 3000, 3001, 12345,
];

/// Addresses that are no pod's and not the node's.
pub const WORLD: [Ipv4Addr; 7] = [
    Ipv4Addr::new(192, 168, 1, 5),
    Ipv4Addr::new(192, 168, 200, 1),
    Ipv4Addr::new(8, 8, 8, 8),
    Ipv4Addr::new(1, 1, 1, 1),
    Ipv4Addr::new(10, 1, 0, 200),
    Ipv4Addr::new(10, 2, 0, 1),
    Ipv4Addr::new(172, 16, 0, 9),
];

pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 255, 254);

/// ipBlocks: (cidr, excepts it may carry).
const BLOCKS: [(&str, &[&str]); 9] = [
    (
        "10.1.0.0/16",
        &["10.1.0.0/28", "10.1.1.0/24", "10.1.0.8/29"],
    ),
    ("10.1.0.0/24", &["10.1.0.4/30", "10.1.0.200/32"]),
    ("10.1.0.0/28", &["10.1.0.2/31"]),
    ("192.168.0.0/16", &["192.168.200.0/24"]),
    ("0.0.0.0/0", &["10.0.0.0/8", "192.168.1.0/24"]),
    ("8.8.8.8/32", &[]),
    ("10.1.1.0/24", &["10.1.1.4/30"]),
    // Not canonical: accepted and masked (Go's net.ParseCIDR; project
    // decision), so 10.1.0.0/29 and 10.1.1.0/30.
    ("10.1.0.5/29", &["10.1.0.6/31"]),
    ("10.1.1.3/30", &[]),
];

fn pick<T: Copy>(rng: &mut StdRng, v: &[T]) -> T {
    *v.choose(rng).expect("non-empty")
}

fn gen_labels(rng: &mut StdRng, keys: &[&str], values: &[&str], p: f64) -> Labels {
    let mut l = Labels::new();
    for k in keys {
        if rng.gen_bool(p) {
            l.insert(k.to_string(), pick(rng, values).to_string());
        }
    }
    l
}

fn gen_selector(rng: &mut StdRng, keys: &[&str], values: &[&str]) -> Selector {
    let mut s = Selector::default();
    match rng.gen_range(0..10) {
        0..=3 => {} // {}: everything
        4..=6 => {
            s.match_labels = Some(gen_labels(rng, &keys[..1], values, 1.0));
            if rng.gen_bool(0.3) {
                let extra = gen_labels(rng, keys, values, 0.4);
                s.match_labels.as_mut().expect("set").extend(extra);
            }
        }
        _ => {
            let n = rng.gen_range(1..=2);
            let exprs = (0..n)
                .map(|_| {
                    let key = pick(rng, keys).to_string();
                    let operator = pick(rng, &["In", "NotIn", "Exists", "DoesNotExist"]);
                    let values = match operator {
                        "In" | "NotIn" => {
                            let mut v: Vec<String> = values
                                .iter()
                                .filter(|_| rng.gen_bool(0.5))
                                .map(|s| s.to_string())
                                .collect();
                            if v.is_empty() {
                                v.push(pick(rng, values).to_string());
                            }
                            Some(v)
                        }
                        _ => None,
                    };
                    Expr {
                        key,
                        operator: operator.into(),
                        values,
                    }
                })
                .collect();
            s.match_expressions = Some(exprs);
            if rng.gen_bool(0.3) {
                s.match_labels = Some(gen_labels(rng, keys, values, 0.5));
            }
        }
    }
    s
}

fn gen_peer(rng: &mut StdRng) -> Peer {
    match rng.gen_range(0..10) {
        0..=2 => Peer {
            pod_selector: Some(gen_selector(rng, &POD_KEYS, &POD_VALUES)),
            ..Peer::default()
        },
        3..=4 => Peer {
            namespace_selector: Some(if rng.gen_bool(0.3) {
                let mut l = Labels::new();
                l.insert(NAME_LABEL.into(), pick(rng, &NAMESPACES).into());
                Selector {
                    match_labels: Some(l),
                    ..Selector::default()
                }
            } else {
                gen_selector(rng, &NS_KEYS, &NS_VALUES)
            }),
            ..Peer::default()
        },
        5..=6 => Peer {
            pod_selector: Some(gen_selector(rng, &POD_KEYS, &POD_VALUES)),
            namespace_selector: Some(gen_selector(rng, &NS_KEYS, &NS_VALUES)),
            ..Peer::default()
        },
        _ => {
            let (cidr, excepts) = pick(rng, &BLOCKS);
            let except: Vec<String> = excepts
                .iter()
                .filter(|_| rng.gen_bool(0.5))
                .map(|s| s.to_string())
                .collect();
            Peer {
                ip_block: Some(IpBlock {
                    cidr: cidr.into(),
                    except: (!except.is_empty()).then_some(except),
                }),
                ..Peer::default()
            }
        }
    }
}

fn gen_port(rng: &mut StdRng) -> Port {
    let protocol = match rng.gen_range(0..10) {
        0..=2 => None,
        3..=5 => Some("TCP"),
        6..=7 => Some("UDP"),
        _ => Some("SCTP"),
    };
    let proto_name = protocol.unwrap_or("TCP");
    let (port, end_port) = match rng.gen_range(0..10) {
        0 => (None, None),
        1..=4 => (Some(PortValue::Number(pick(rng, &DPORTS) as i32)), None),
        5..=6 => {
            let (s, e) = pick(
                rng,
                &[
                    (8080, 8081),
                    (1000, 1023),
                    (80, 443),
                    (3000, 3001),
                    (1, 65535),
                ],
            );
            (Some(PortValue::Number(s)), Some(e))
        }
        _ => {
            // Mostly a name that exists for this protocol, sometimes one
            // that exists only for another protocol, or nowhere.
            let name = if rng.gen_bool(0.8) {
                NAMED
                    .iter()
                    .filter(|n| n.1 == proto_name)
                    .map(|n| n.0)
                    .collect::<Vec<_>>()
                    .choose(rng)
                    .copied()
                    .unwrap_or("nowhere")
            } else {
                pick(rng, &["http", "dns", "nowhere"])
            };
            (Some(PortValue::Name(name.into())), None)
        }
    };
    Port {
        protocol: protocol.map(String::from),
        port,
        end_port,
    }
}

fn gen_rule(rng: &mut StdRng) -> Rule {
    let peers = match rng.gen_range(0..10) {
        0 => None,
        1 => Some(Vec::new()),
        _ => Some((0..rng.gen_range(1..=2)).map(|_| gen_peer(rng)).collect()),
    };
    let ports = match rng.gen_range(0..10) {
        0..=2 => None,
        3 => Some(Vec::new()),
        _ => Some((0..rng.gen_range(1..=2)).map(|_| gen_port(rng)).collect()),
    };
    Rule { peers, ports }
}

fn gen_rules(rng: &mut StdRng) -> Option<Vec<Rule>> {
    match rng.gen_range(0..10) {
        0..=2 => None,
        3 => Some(Vec::new()),
        _ => Some((0..rng.gen_range(1..=3)).map(|_| gen_rule(rng)).collect()),
    }
}

/// One of the ways a policy gets refused by validation.
fn break_policy(rng: &mut StdRng, p: &mut Policy) {
    let bad_rule = |port: Option<Port>, peer: Option<Peer>| Rule {
        peers: peer.map(|x| vec![x]),
        ports: port.map(|x| vec![x]),
    };
    match rng.gen_range(0..10) {
        7 => p.egress.get_or_insert_with(Vec::new).push(bad_rule(
            None,
            Some(Peer {
                ip_block: Some(IpBlock {
                    cidr: "10.1.0.0/24".into(),
                    except: Some(vec!["10.1.0.0/24".into()]),
                }),
                ..Peer::default()
            }),
        )),
        8 => p.ingress.get_or_insert_with(Vec::new).push(bad_rule(
            Some(Port {
                protocol: Some(pick(rng, &["tcp", "TCP"]).into()),
                port: Some(PortValue::Number(pick(rng, &[0, 65536, -1]))),
                end_port: None,
            }),
            None,
        )),
        9 => p.ingress.get_or_insert_with(Vec::new).push(bad_rule(
            None,
            Some(Peer {
                pod_selector: Some(Selector::default()),
                ip_block: Some(IpBlock {
                    cidr: "10.1.0.0/24".into(),
                    except: None,
                }),
                ..Peer::default()
            }),
        )),
        0 => {
            p.pod_selector = Selector {
                match_expressions: Some(vec![Expr {
                    key: "app".into(),
                    operator: "In".into(),
                    values: None,
                }]),
                ..Selector::default()
            }
        }
        1 => p.policy_types = Some(vec!["Ingress".into(), "Sideways".into()]),
        2 => p.ingress.get_or_insert_with(Vec::new).push(bad_rule(
            Some(Port {
                protocol: None,
                port: Some(PortValue::Number(9000)),
                end_port: Some(8000),
            }),
            None,
        )),
        3 => p.egress.get_or_insert_with(Vec::new).push(bad_rule(
            None,
            Some(Peer {
                ip_block: Some(IpBlock {
                    cidr: "10.1.0.0/24".into(),
                    except: Some(vec!["10.2.0.0/24".into()]),
                }),
                ..Peer::default()
            }),
        )),
        4 => p.ingress.get_or_insert_with(Vec::new).push(bad_rule(
            Some(Port {
                protocol: Some("ICMP".into()),
                port: None,
                end_port: None,
            }),
            None,
        )),
        5 => p.ingress.get_or_insert_with(Vec::new).push(bad_rule(
            None,
            Some(Peer {
                pod_selector: Some(Selector {
                    match_expressions: Some(vec![Expr {
                        key: "app".into(),
                        operator: "Matches".into(),
                        values: Some(vec!["a".into()]),
                    }]),
                    ..Selector::default()
                }),
                ..Peer::default()
            }),
        )),
        _ => p.egress.get_or_insert_with(Vec::new).push(bad_rule(
            Some(Port {
                protocol: Some("TCP".into()),
                port: Some(PortValue::Name("HTTP_Port".into())),
                end_port: None,
            }),
            None,
        )),
    }
}

fn gen_policy(rng: &mut StdRng, i: usize, local_namespaces: &[&str]) -> Policy {
    // Mostly where the local pods are: only their verdicts are observed.
    let namespace = if rng.gen_bool(0.75) {
        pick(rng, local_namespaces)
    } else {
        pick(rng, &NAMESPACES)
    };
    let mut p = Policy {
        namespace: namespace.into(),
        name: format!("np{i}"),
        pod_selector: gen_selector(rng, &POD_KEYS, &POD_VALUES),
        policy_types: None,
        ingress: gen_rules(rng),
        egress: gen_rules(rng),
    };
    p.policy_types = match rng.gen_range(0..10) {
        0..=3 => None,
        4 => Some(Vec::new()),
        5..=6 => Some(vec!["Ingress".into()]),
        7 => Some(vec!["Egress".into()]),
        _ => Some(vec!["Ingress".into(), "Egress".into()]),
    };
    if rng.gen_bool(0.08) {
        // Selects nothing (no pod has this label).
        p.pod_selector = Selector {
            match_labels: Some(Labels::from([("app".into(), "nobody".into())])),
            ..Selector::default()
        };
    }
    if rng.gen_bool(0.07) {
        break_policy(rng, &mut p);
    }
    p
}

/// A random cluster. Local pods get the given ifindexes (endpoint ids
/// count from 1); the node has `HOST_IP`.
pub fn gen_cluster(rng: &mut StdRng, ifindexes: &[u32]) -> Cluster {
    let namespaces = NAMESPACES
        .iter()
        .map(|n| Namespace {
            name: n.to_string(),
            labels: gen_labels(rng, &NS_KEYS, &NS_VALUES, 0.6),
        })
        .collect();
    let n_local = rng.gen_range(1..=ifindexes.len().min(4));
    let n_remote = rng.gen_range(1..=5);
    let mut ifs = ifindexes.to_vec();
    ifs.shuffle(rng);
    let mut ips = pod_pool();
    ips.shuffle(rng);
    let mut pods = Vec::new();
    for i in 0..n_local + n_remote {
        let mut ports = Vec::new();
        for (name, proto, nums) in NAMED {
            if rng.gen_bool(0.5) {
                ports.push(ContainerPort {
                    name: Some(name.into()),
                    port: pick(rng, &nums),
                    protocol: proto,
                });
            }
        }
        if rng.gen_bool(0.3) {
            ports.push(ContainerPort {
                name: None,
                port: 3000,
                protocol: "TCP",
            });
        }
        pods.push(Pod {
            // Now and then a namespace the model has no object for (its
            // labels are then only the name label).
            namespace: if rng.gen_bool(0.05) {
                "delta".into()
            } else {
                pick(rng, &NAMESPACES).into()
            },
            name: format!("pod{i}"),
            labels: gen_labels(rng, &POD_KEYS, &POD_VALUES, 0.6),
            ip: ips[i],
            ports,
            local: (i < n_local).then(|| (i as u32 + 1, ifs[i])),
        });
    }
    let n_policies = rng.gen_range(0..=8);
    let local_namespaces: Vec<&str> = pods[..n_local]
        .iter()
        .map(|p: &Pod| p.namespace.as_str())
        .collect();
    let policies = (0..n_policies)
        .map(|i| gen_policy(rng, i, &local_namespaces))
        .collect();
    Cluster {
        namespaces,
        pods,
        policies,
        host_ips: vec![HOST_IP],
    }
}

/// Pod addresses: 10.1.0.1-16 (some inside the ipBlocks' excepts) and
/// 10.1.1.1-8 (another node's range).
fn pod_pool() -> Vec<Ipv4Addr> {
    (1..=16)
        .map(|i| Ipv4Addr::new(10, 1, 0, i))
        .chain((1..=8).map(|i| Ipv4Addr::new(10, 1, 1, i)))
        .collect()
}

/// Every address a flow's peer is drawn from: all pods, the node, the world.
pub fn peer_addresses(c: &Cluster) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = c.pods.iter().map(|p| p.ip).collect();
    v.extend(c.host_ips.iter().copied());
    v.extend(WORLD);
    // Addresses of the pod ranges that no pod holds are the world too.
    for a in pod_pool() {
        if !v.contains(&a) {
            v.push(a);
        }
    }
    v
}

/// New-flow packets for every local pod, both directions, over every kind
/// of peer; `n` of them.
pub fn gen_flows(rng: &mut StdRng, c: &Cluster, n: usize) -> Vec<Flow> {
    let locals: Vec<usize> = (0..c.pods.len())
        .filter(|&i| c.pods[i].local.is_some())
        .collect();
    let peers = peer_addresses(c);
    let mut ports: Vec<u16> = c
        .pods
        .iter()
        .flat_map(|p| p.ports.iter().map(|cp| cp.port))
        .collect();
    for p in &c.policies {
        for r in p.ingress.iter().chain(p.egress.iter()).flatten() {
            for port in r.ports.iter().flatten() {
                if let Some(PortValue::Number(n)) = port.port {
                    let end = port.end_port.unwrap_or(n);
                    for x in [n - 1, n, end, end + 1] {
                        if let Ok(x) = u16::try_from(x) {
                            ports.push(x);
                        }
                    }
                }
            }
        }
    }
    ports.retain(|&p| p != 0);
    ports.push(80);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        if rng.gen_bool(0.4) {
            if let Some(f) = targeted_flow(rng, c, &locals, &peers) {
                out.push(f);
            }
            continue;
        }
        let pod = pick(rng, &locals);
        let peer = pick(rng, &peers);
        if peer == c.pods[pod].ip {
            continue;
        }
        let protocol = match rng.gen_range(0..20) {
            0..=8 => PROTO_TCP,
            9..=14 => PROTO_UDP,
            15..=17 => PROTO_SCTP,
            _ => PROTO_ICMP,
        };
        // Mostly the ports this cluster's policies and pods name (and
        // their neighbours), sometimes any.
        let dport = match rng.gen_range(0..10) {
            0..=5 => pick(rng, &ports),
            6..=8 => pick(rng, &DPORTS),
            _ => rng.gen_range(1..=65535),
        };
        out.push(Flow {
            pod,
            dir: if rng.gen_bool(0.5) {
                Dir::Ingress
            } else {
                Dir::Egress
            },
            peer,
            protocol,
            dport,
        });
    }
    out
}

/// A flow aimed at one rule of one policy: from or to a local pod the
/// policy selects, with a peer and a port the rule names (so rules, not
/// only isolation, decide many flows). The oracle still judges it whole.
fn targeted_flow(
    rng: &mut StdRng,
    c: &Cluster,
    locals: &[usize],
    peers: &[Ipv4Addr],
) -> Option<Flow> {
    let policy = c.policies.choose(rng)?;
    let dir = if rng.gen_bool(0.5) {
        Dir::Ingress
    } else {
        Dir::Egress
    };
    let rules = match dir {
        Dir::Ingress => &policy.ingress,
        Dir::Egress => &policy.egress,
    };
    let rule = rules.as_ref()?.choose(rng)?;
    let selected: Vec<usize> = locals
        .iter()
        .copied()
        .filter(|&i| selects(policy, &c.pods[i]))
        .collect();
    let pod = *selected.choose(rng)?;
    let candidates: Vec<Ipv4Addr> = match rule.peers.as_deref() {
        None | Some([]) => peers.to_vec(),
        Some(ps) => {
            let peer = ps.choose(rng)?;
            peers
                .iter()
                .copied()
                .filter(|a| peer_matches(c, policy, peer, *a))
                .collect()
        }
    };
    let candidates: Vec<Ipv4Addr> = candidates
        .into_iter()
        .filter(|a| *a != c.pods[pod].ip)
        .collect();
    let peer = *candidates.choose(rng)?;
    let port = rule.ports.as_deref().and_then(|ps| ps.choose(rng));
    let protocol = port.map_or_else(
        || pick(rng, &[PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP]),
        |p| protocol_number(p.protocol.as_deref()).unwrap_or(PROTO_TCP),
    );
    let target = match dir {
        Dir::Ingress => Some(&c.pods[pod]),
        Dir::Egress => c.pod_at(peer),
    };
    let dport = match port.and_then(|p| p.port.as_ref()) {
        None => pick(rng, &DPORTS),
        Some(PortValue::Number(n)) => {
            let end = port.and_then(|p| p.end_port).unwrap_or(*n).max(*n);
            u16::try_from(rng.gen_range(*n..=end)).unwrap_or(80)
        }
        Some(PortValue::Name(name)) => target
            .and_then(|t| {
                t.ports
                    .iter()
                    .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            })
            .map_or_else(|| pick(rng, &DPORTS), |cp| cp.port),
    };
    Some(Flow {
        pod,
        dir,
        peer,
        protocol,
        dport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cluster() -> Cluster {
        Cluster {
            namespaces: vec![Namespace {
                name: "alpha".into(),
                labels: labels(&[("team", "x")]),
            }],
            pods: vec![
                Pod {
                    namespace: "alpha".into(),
                    name: "server".into(),
                    labels: labels(&[("app", "a")]),
                    ip: Ipv4Addr::new(10, 1, 0, 1),
                    ipv6: None,
                    ports: vec![ContainerPort {
                        name: Some("http".into()),
                        port: 8080,
                        protocol: "TCP",
                    }],
                    local: Some((1, 10)),
                },
                Pod {
                    namespace: "beta".into(),
                    name: "client".into(),
                    labels: labels(&[("app", "b")]),
                    ip: Ipv4Addr::new(10, 1, 1, 1),
                    ipv6: None,
                    ports: vec![ContainerPort {
                        name: Some("http".into()),
                        port: 80,
                        protocol: "TCP",
                    }],
                    local: None,
                },
            ],
            policies: vec![],
            host_ips: vec![HOST_IP],
        }
    }

    fn flow(dir: Dir, peer: Ipv4Addr, dport: u16) -> Flow {
        Flow {
            pod: 0,
            dir,
            peer,
            protocol: PROTO_TCP,
            dport,
        }
    }

    #[test]
    fn named_ports_resolve_on_the_receiving_pod() {
        let mut c = cluster();
        let client = Ipv4Addr::new(10, 1, 1, 1);
        c.policies.push(Policy {
            namespace: "alpha".into(),
            name: "p".into(),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![Rule {
                peers: None,
                ports: Some(vec![Port {
                    port: Some(PortValue::Name("http".into())),
                    ..Port::default()
                }]),
            }]),
            egress: Some(vec![Rule {
                peers: Some(vec![Peer {
                    ip_block: Some(IpBlock {
                        cidr: "10.1.0.0/16".into(),
                        except: None,
                    }),
                    ..Peer::default()
                }]),
                ports: Some(vec![Port {
                    port: Some(PortValue::Name("http".into())),
                    ..Port::default()
                }]),
            }]),
            ..Policy::default()
        });
        assert!(evaluate(&c, &flow(Dir::Ingress, client, 8080)).allow);
        assert!(!evaluate(&c, &flow(Dir::Ingress, client, 80)).allow);
        // Egress to the client pod: its own number for "http" (80).
        assert!(evaluate(&c, &flow(Dir::Egress, client, 80)).allow);
        assert!(!evaluate(&c, &flow(Dir::Egress, client, 8080)).allow);
        // No pod at the address: a name matches nothing.
        assert!(!evaluate(&c, &flow(Dir::Egress, Ipv4Addr::new(10, 1, 0, 200), 80)).allow);
        // The node is always allowed.
        assert!(evaluate(&c, &flow(Dir::Egress, HOST_IP, 1)).allow);
    }

    #[test]
    fn invalid_policies_isolate_without_allowing() {
        let mut c = cluster();
        let mut p = Policy {
            namespace: "alpha".into(),
            name: "bad".into(),
            ingress: Some(vec![Rule::default()]),
            ..Policy::default()
        };
        assert!(evaluate(&c, &flow(Dir::Ingress, WORLD[0], 1)).allow);
        c.policies.push(p.clone());
        assert!(evaluate(&c, &flow(Dir::Ingress, WORLD[0], 1)).allow);
        p.policy_types = Some(vec!["Sideways".into()]);
        c.policies[0] = p;
        assert!(invalid(&c.policies[0]).is_some());
        assert!(!evaluate(&c, &flow(Dir::Ingress, WORLD[0], 1)).allow);
        assert!(!evaluate(&c, &flow(Dir::Egress, WORLD[0], 1)).allow);
    }

    #[test]
    fn selectors_follow_label_selector_semantics() {
        let l = labels(&[("app", "a"), ("tier", "x")]);
        let e = |op: &str, vals: Option<&[&str]>| Selector {
            match_expressions: Some(vec![Expr {
                key: "app".into(),
                operator: op.into(),
                values: vals.map(|v| v.iter().map(|s| s.to_string()).collect()),
            }]),
            ..Selector::default()
        };
        assert!(selector_matches(&Selector::default(), &l));
        assert!(selector_matches(&e("In", Some(&["a", "b"])), &l));
        assert!(!selector_matches(&e("NotIn", Some(&["a"])), &l));
        assert!(selector_matches(&e("NotIn", Some(&["a"])), &Labels::new()));
        assert!(selector_matches(&e("Exists", None), &l));
        assert!(selector_matches(&e("DoesNotExist", None), &Labels::new()));
        assert!(!selector_valid(&e("In", None)));
        assert!(!selector_valid(&e("Exists", Some(&["a"]))));
    }
}
