//! Validation of a ClusterNetworkPolicy into typed rules, once, when it
//! arrives (`Model::add_cluster_policy`).
//!
//! What the API server's CRD validation would refuse (bad tier, priority
//! outside 0-1000, a subject or peer with two fields, an empty `from`/`to`,
//! a bad CIDR or port) rejects the whole object: it is reported and
//! contributes nothing (the API server would never have stored it).
//! What palisade does not understand fails closed as the API prescribes:
//! a rule with a peer or field it does not know (an unknown field, a
//! peer with no known field) matches nothing if it is an Accept, and
//! becomes "Deny everything" if it is a Deny or a Pass.
//! `nodes` peers select Node objects by label; the model resolves them to
//! those nodes' addresses. `domainNames` peers (Accept rules only) resolve
//! to the addresses learned from the cluster DNS's answers for the names
//! they match (`crate::fqdn`).
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use palisade_common::{DIR_EGRESS, DIR_INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::{
    cnp::{self, ClusterNetworkPolicy},
    fqdn::DomainPattern,
    selector::Selector,
};

/// The API's limits.
pub const MAX_PRIORITY: i64 = 1000;
pub const MAX_RULES: usize = 25;
pub const MAX_PEERS: usize = 25;
pub const MAX_RULE_NAME: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    Baseline,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Accept,
    Deny,
    Pass,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        })
    }
}

/// A ClusterNetworkPolicy as the model keeps it.
#[derive(Clone, Debug)]
pub enum ParsedClusterPolicy {
    Accepted(ClusterPolicy),
    /// Contributes nothing.
    Rejected {
        name: String,
        reason: String,
    },
}

impl ParsedClusterPolicy {
    pub fn parse(cnp: &ClusterNetworkPolicy) -> Self {
        let name = cnp.metadata.name.clone().unwrap_or_default();
        match parse(&name, cnp) {
            Ok(p) => Self::Accepted(p),
            Err(reason) => Self::Rejected { name, reason },
        }
    }

    pub fn rejected(&self) -> Option<&str> {
        match self {
            Self::Accepted(_) => None,
            Self::Rejected { reason, .. } => Some(reason),
        }
    }

    pub fn accepted(&self) -> Option<&ClusterPolicy> {
        match self {
            Self::Accepted(p) => Some(p),
            Self::Rejected { .. } => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClusterPolicy {
    pub name: String,
    pub tier: Tier,
    pub priority: u32,
    pub subject: Subject,
    /// Ingress rules then egress rules, each in the order written.
    pub rules: Vec<ClusterRule>,
}

#[derive(Clone, Debug)]
pub enum Subject {
    Namespaces(Selector),
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
}

impl Subject {
    /// Host-network pods are never subjects; the caller checks that.
    pub fn matches(
        &self,
        namespace_labels: &crate::model::Labels,
        pod_labels: &crate::model::Labels,
    ) -> bool {
        match self {
            Subject::Namespaces(ns) => ns.matches(namespace_labels),
            Subject::Pods { namespaces, pods } => {
                namespaces.matches(namespace_labels) && pods.matches(pod_labels)
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClusterRule {
    pub direction: u8,
    /// Index in spec.ingress / spec.egress.
    pub index: usize,
    pub name: Option<String>,
    /// As written (see `effective_action`).
    pub action: Action,
    pub peers: Vec<ClusterPeer>,
    /// None: every protocol and port.
    pub ports: Option<Vec<ClusterPort>>,
    /// Why the rule fails closed, if it does (an unknown peer or field).
    pub unknown: Option<String>,
}

impl ClusterRule {
    /// An egress rule with a `domainNames` peer.
    pub fn has_domain_peers(&self) -> bool {
        self.peers
            .iter()
            .any(|p| matches!(p, ClusterPeer::Domains { .. }))
    }

    /// What the rule does when it matches: a failing-closed Pass denies.
    pub fn effective_action(&self) -> Action {
        match (self.unknown.is_some(), self.action) {
            (true, Action::Pass) => Action::Deny,
            (_, a) => a,
        }
    }

    /// A failing-closed rule: an Accept matches nothing, a Deny or Pass
    /// everything. None: the rule matches as written.
    pub fn fail_closed_matches(&self) -> Option<bool> {
        self.unknown.as_ref().map(|_| self.action != Action::Accept)
    }

    /// "name" or "ingress[i]".
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) if !n.is_empty() => n.clone(),
            _ => format!(
                "{}[{}]",
                if self.direction == DIR_INGRESS {
                    "ingress"
                } else {
                    "egress"
                },
                self.index
            ),
        }
    }
}

#[derive(Clone, Debug)]
pub enum ClusterPeer {
    Namespaces(Selector),
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    /// IPv4 networks.
    Networks(Vec<Ipv4Network>),
    /// Nodes by label (egress): the IPv4 addresses (/32) of the nodes the
    /// selector matches, resolved by the model ([`ClusterPolicy::resolve_nodes`])
    /// whenever nodes or the policy change.
    Nodes {
        selector: Selector,
        addresses: Vec<Ipv4Network>,
        /// The selected nodes' IPv6 addresses.
        addresses6: Vec<Ipv6Network>,
    },
    /// IPv6 networks (a `networks` list of both families is two peers).
    Networks6(Vec<Ipv6Network>),
    /// Domain names (egress, Accept only): the addresses (/32, /128)
    /// learned for names the patterns match, resolved by the model
    /// ([`ClusterPolicy::resolve_domains`]) whenever they change.
    Domains {
        patterns: Vec<DomainPattern>,
        addresses: Vec<Ipv4Network>,
        addresses6: Vec<Ipv6Network>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterPort {
    Range {
        proto: u8,
        start: u16,
        end: u16,
    },
    /// A container port name of the destination pod (any protocol).
    Named(String),
}

fn selector(
    s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    at: &str,
) -> Result<Selector, String> {
    Selector::parse(s).map_err(|e| format!("{at}.{e}"))
}

fn pods(p: &cnp::NamespacedPod, at: &str) -> Result<(Selector, Selector), String> {
    Ok((
        selector(&p.namespace_selector, &format!("{at}.namespaceSelector"))?,
        selector(&p.pod_selector, &format!("{at}.podSelector"))?,
    ))
}

fn unknown_fields(other: &cnp::Other, at: &str) -> Option<String> {
    other
        .keys()
        .next()
        .map(|k| format!("{at}.{k}: unknown field"))
}

/// A peer, or Err(reject) / Ok(Err(why it fails closed)).
fn parse_peer(
    p: &cnp::Peer,
    egress: bool,
    at: &str,
) -> Result<Result<Vec<ClusterPeer>, String>, String> {
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.networks.is_some(),
        p.nodes.is_some(),
        p.domain_names.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count()
        + p.other.len();
    if set > 1 {
        return Err(format!("{at}: exactly one field must be set, found {set}"));
    }
    if let Some(ns) = &p.namespaces {
        return Ok(Ok(vec![ClusterPeer::Namespaces(selector(
            ns,
            &format!("{at}.namespaces"),
        )?)]));
    }
    if let Some(pp) = &p.pods {
        let (namespaces, pods) = pods(pp, &format!("{at}.pods"))?;
        return Ok(Ok(vec![ClusterPeer::Pods { namespaces, pods }]));
    }
    if !egress && (p.networks.is_some() || p.nodes.is_some() || p.domain_names.is_some()) {
        return Ok(Err(format!("{at}: not a field of an ingress peer")));
    }
    if let Some(nets) = &p.networks {
        if nets.is_empty() || nets.len() > MAX_PEERS {
            return Err(format!("{at}.networks: 1 to {MAX_PEERS} CIDRs"));
        }
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (i, n) in nets.iter().enumerate() {
            match parse_cidr(n) {
                Some(IpNetwork::V4(net)) => v4.push(net),
                Some(IpNetwork::V6(net)) => v6.push(net),
                None => return Err(format!("{at}.networks[{i}]: {n:?} is not a valid CIDR")),
            }
        }
        // One peer per family (the peers of a rule are ORed).
        let mut out = Vec::new();
        if !v4.is_empty() {
            out.push(ClusterPeer::Networks(v4));
        }
        if !v6.is_empty() {
            out.push(ClusterPeer::Networks6(v6));
        }
        return Ok(Ok(out));
    }
    if let Some(nodes) = &p.nodes {
        return Ok(Ok(vec![ClusterPeer::Nodes {
            selector: selector(nodes, &format!("{at}.nodes"))?,
            addresses: Vec::new(),
            addresses6: Vec::new(),
        }]));
    }
    if let Some(names) = &p.domain_names {
        if names.is_empty() || names.len() > MAX_PEERS {
            return Err(format!("{at}.domainNames: 1 to {MAX_PEERS} names"));
        }
        let mut patterns = Vec::new();
        for (i, n) in names.iter().enumerate() {
            patterns
                .push(DomainPattern::parse(n).map_err(|e| format!("{at}.domainNames[{i}]: {e}"))?);
        }
        patterns.sort();
        patterns.dedup();
        return Ok(Ok(vec![ClusterPeer::Domains {
            patterns,
            addresses: Vec::new(),
            addresses6: Vec::new(),
        }]));
    }
    Ok(Err(
        unknown_fields(&p.other, at).unwrap_or_else(|| format!("{at}: no known peer field"))
    ))
}

/// A CIDR of either family, masked to its network; None if invalid.
fn parse_cidr(s: &str) -> Option<IpNetwork> {
    let (addr, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    match addr.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(a) => {
            let n = Ipv4Network::new(a, len).ok()?;
            Some(IpNetwork::V4(Ipv4Network::new(n.network(), len).ok()?))
        }
        std::net::IpAddr::V6(a) => {
            let n = Ipv6Network::new(a, len).ok()?;
            Some(IpNetwork::V6(Ipv6Network::new(n.network(), len).ok()?))
        }
    }
}

fn port_number(n: i64, at: &str) -> Result<u16, String> {
    if (1..=65535).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!("{at}: {n} is out of range 1-65535"))
    }
}

/// A protocol entry, or Err(reject) / Ok(Err(why it fails closed)).
fn parse_protocol(p: &cnp::Protocol, at: &str) -> Result<Result<ClusterPort, String>, String> {
    let set = [
        p.tcp.is_some(),
        p.udp.is_some(),
        p.sctp.is_some(),
        p.destination_named_port.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count()
        + p.other.len();
    if set != 1 {
        if set == 0 {
            return Err(format!("{at}: exactly one field must be set"));
        }
        return Err(format!("{at}: exactly one field must be set, found {set}"));
    }
    if let Some(name) = &p.destination_named_port {
        if name.is_empty() {
            return Err(format!("{at}.destinationNamedPort: empty"));
        }
        return Ok(Ok(ClusterPort::Named(name.clone())));
    }
    let (proto, pp, field) = match (&p.tcp, &p.udp, &p.sctp) {
        (Some(x), _, _) => (PROTO_TCP, x, "tcp"),
        (_, Some(x), _) => (PROTO_UDP, x, "udp"),
        (_, _, Some(x)) => (PROTO_SCTP, x, "sctp"),
        _ => {
            return Ok(Err(
                unknown_fields(&p.other, at).unwrap_or_else(|| format!("{at}: unknown protocol"))
            ))
        }
    };
    let at = format!("{at}.{field}");
    if let Some(u) = unknown_fields(&pp.other, &at) {
        return Ok(Err(u));
    }
    let Some(port) = &pp.destination_port else {
        return Err(format!("{at}: destinationPort is required"));
    };
    let at = format!("{at}.destinationPort");
    if let Some(u) = unknown_fields(&port.other, &at) {
        return Ok(Err(u));
    }
    match (port.number, &port.range) {
        (Some(n), None) => {
            let n = port_number(n, &format!("{at}.number"))?;
            Ok(Ok(ClusterPort::Range {
                proto,
                start: n,
                end: n,
            }))
        }
        (None, Some(r)) => {
            let start = port_number(r.start, &format!("{at}.range.start"))?;
            let end = port_number(r.end, &format!("{at}.range.end"))?;
            if start >= end {
                return Err(format!(
                    "{at}.range: start {start} must be less than end {end}"
                ));
            }
            Ok(Ok(ClusterPort::Range { proto, start, end }))
        }
        _ => Err(format!("{at}: exactly one of number or range must be set")),
    }
}

#[allow(clippy::too_many_arguments)]
fn parse_rule(
    direction: u8,
    index: usize,
    name: &Option<String>,
    action: &str,
    peers: &[cnp::Peer],
    protocols: &Option<Vec<cnp::Protocol>>,
    other: &cnp::Other,
) -> Result<ClusterRule, String> {
    let (dir, field) = if direction == DIR_INGRESS {
        ("ingress", "from")
    } else {
        ("egress", "to")
    };
    let at = format!("spec.{dir}[{index}]");
    if name.as_ref().is_some_and(|n| n.len() > MAX_RULE_NAME) {
        return Err(format!("{at}.name: longer than {MAX_RULE_NAME} characters"));
    }
    let action = match action {
        "Accept" => Action::Accept,
        "Deny" => Action::Deny,
        "Pass" => Action::Pass,
        other => {
            return Err(format!(
                "{at}.action: {other:?} is not Accept, Deny or Pass"
            ))
        }
    };
    if peers.is_empty() || peers.len() > MAX_PEERS {
        return Err(format!("{at}.{field}: 1 to {MAX_PEERS} peers"));
    }
    let mut unknown = unknown_fields(other, &at);
    let mut out_peers = Vec::new();
    let mut has_address_peer = false;
    for (i, p) in peers.iter().enumerate() {
        has_address_peer |= p.networks.is_some() || p.nodes.is_some() || p.domain_names.is_some();
        match parse_peer(p, direction == DIR_EGRESS, &format!("{at}.{field}[{i}]"))? {
            Ok(peers) => out_peers.extend(peers),
            Err(why) => unknown = unknown.or(Some(why)),
        }
    }
    let ports = match protocols {
        None => None,
        Some(list) => {
            if list.is_empty() || list.len() > MAX_RULES {
                return Err(format!("{at}.protocols: 1 to {MAX_RULES} entries"));
            }
            let mut v = Vec::new();
            for (i, p) in list.iter().enumerate() {
                match parse_protocol(p, &format!("{at}.protocols[{i}]"))? {
                    Ok(port) => v.push(port),
                    Err(why) => unknown = unknown.or(Some(why)),
                }
            }
            Some(v)
        }
    };
    if action != Action::Accept && peers.iter().any(|p| p.domain_names.is_some()) {
        return Err(format!(
            "{at}: domainNames peers are only allowed in Accept rules"
        ));
    }
    if direction == DIR_EGRESS
        && has_address_peer
        && ports
            .iter()
            .flatten()
            .any(|p| matches!(p, ClusterPort::Named(_)))
    {
        return Err(format!(
            "{at}: networks/nodes/domainNames peer cannot be set with namedPorts"
        ));
    }
    Ok(ClusterRule {
        direction,
        index,
        name: name.clone().filter(|n| !n.is_empty()),
        action,
        peers: out_peers,
        ports,
        unknown,
    })
}

fn parse(name: &str, cnp: &ClusterNetworkPolicy) -> Result<ClusterPolicy, String> {
    if name.is_empty() {
        return Err("metadata.name: required".into());
    }
    let spec = &cnp.spec;
    let tier = match spec.tier.as_str() {
        "Admin" => Tier::Admin,
        "Baseline" => Tier::Baseline,
        t => return Err(format!("spec.tier: {t:?} is not Admin or Baseline")),
    };
    let priority = match spec.priority {
        Some(p) if (0..=MAX_PRIORITY).contains(&p) => p as u32,
        Some(p) => {
            return Err(format!(
                "spec.priority: {p} is out of range 0-{MAX_PRIORITY}"
            ))
        }
        None => return Err("spec.priority: required".into()),
    };
    let s = &spec.subject;
    let set = s.namespaces.is_some() as usize + s.pods.is_some() as usize + s.other.len();
    if set != 1 {
        return Err(format!(
            "spec.subject: exactly one of namespaces or pods must be set, found {set}"
        ));
    }
    let subject = match (&s.namespaces, &s.pods) {
        (Some(ns), _) => Subject::Namespaces(selector(ns, "spec.subject.namespaces")?),
        (_, Some(p)) => {
            let (namespaces, pods) = pods(p, "spec.subject.pods")?;
            Subject::Pods { namespaces, pods }
        }
        // An unknown subject kind: selecting nobody could open traffic an
        // Admin Deny meant to close, selecting everybody could close what
        // an Accept meant to open; neither is safe, so refuse the object.
        _ => return Err(unknown_fields(&s.other, "spec.subject").unwrap_or_default()),
    };
    if let Some(u) = unknown_fields(&spec.other, "spec") {
        return Err(u);
    }
    if spec.ingress.len() > MAX_RULES || spec.egress.len() > MAX_RULES {
        return Err(format!(
            "spec: at most {MAX_RULES} ingress and {MAX_RULES} egress rules"
        ));
    }
    let mut rules = Vec::new();
    for (i, r) in spec.ingress.iter().enumerate() {
        rules.push(parse_rule(
            DIR_INGRESS,
            i,
            &r.name,
            &r.action,
            &r.from,
            &r.protocols,
            &r.other,
        )?);
    }
    for (i, r) in spec.egress.iter().enumerate() {
        rules.push(parse_rule(
            DIR_EGRESS,
            i,
            &r.name,
            &r.action,
            &r.to,
            &r.protocols,
            &r.other,
        )?);
    }
    Ok(ClusterPolicy {
        name: name.to_string(),
        tier,
        priority,
        subject,
        rules,
    })
}

impl ClusterPolicy {
    /// IPv4 networks of the policy's egress peers.
    pub fn networks(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        self.rules
            .iter()
            .flat_map(|r| {
                r.peers.iter().flat_map(|p| match p {
                    ClusterPeer::Networks(n) => n.as_slice(),
                    ClusterPeer::Nodes { addresses, .. }
                    | ClusterPeer::Domains { addresses, .. } => addresses.as_slice(),
                    _ => &[],
                })
            })
            .copied()
    }

    /// IPv6 networks of the policy's egress peers.
    pub fn networks6(&self) -> impl Iterator<Item = Ipv6Network> + '_ {
        self.rules
            .iter()
            .flat_map(|r| {
                r.peers.iter().flat_map(|p| match p {
                    ClusterPeer::Networks6(n) => n.as_slice(),
                    ClusterPeer::Nodes { addresses6, .. }
                    | ClusterPeer::Domains { addresses6, .. } => addresses6.as_slice(),
                    _ => &[],
                })
            })
            .copied()
    }

    pub fn has_node_peers(&self) -> bool {
        self.rules.iter().any(|r| {
            r.peers
                .iter()
                .any(|p| matches!(p, ClusterPeer::Nodes { .. }))
        })
    }

    /// Whether an egress rule of the policy names domains (its subjects'
    /// DNS answers are then held and learned from).
    pub fn has_domain_peers(&self) -> bool {
        self.rules.iter().any(ClusterRule::has_domain_peers)
    }

    /// The patterns of every `domainNames` peer of the policy.
    pub fn domain_patterns(&self) -> impl Iterator<Item = &DomainPattern> + '_ {
        self.rules.iter().flat_map(|r| {
            r.peers.iter().flat_map(|p| match p {
                ClusterPeer::Domains { patterns, .. } => patterns.as_slice(),
                _ => &[],
            })
        })
    }

    /// Resolves every `domainNames` peer to the addresses learned for the
    /// names its patterns match (`learned`: name -> addresses, names
    /// normalized); whether anything changed.
    pub fn resolve_domains(
        &mut self,
        learned: &std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    ) -> bool {
        let mut changed = false;
        for r in &mut self.rules {
            for p in &mut r.peers {
                if let ClusterPeer::Domains {
                    patterns,
                    addresses,
                    addresses6,
                } = p
                {
                    let (mut now, mut now6) = (Vec::new(), Vec::new());
                    for (_, addrs) in learned
                        .iter()
                        .filter(|(n, _)| patterns.iter().any(|p| p.matches(n)))
                    {
                        for a in addrs {
                            match a {
                                std::net::IpAddr::V4(a) => {
                                    now.push(Ipv4Network::new(*a, 32).expect("valid"))
                                }
                                std::net::IpAddr::V6(a) => {
                                    now6.push(Ipv6Network::new(*a, 128).expect("valid"))
                                }
                            }
                        }
                    }
                    now.sort();
                    now.dedup();
                    now6.sort();
                    now6.dedup();
                    if *addresses != now || *addresses6 != now6 {
                        *addresses = now;
                        *addresses6 = now6;
                        changed = true;
                    }
                }
            }
        }
        changed
    }

    /// Resolves every `nodes` peer to the addresses of the nodes it
    /// selects now; whether anything changed.
    pub fn resolve_nodes(
        &mut self,
        nodes: &std::collections::BTreeMap<String, crate::model::Node>,
    ) -> bool {
        let mut changed = false;
        for r in &mut self.rules {
            for p in &mut r.peers {
                if let ClusterPeer::Nodes {
                    selector,
                    addresses,
                    addresses6,
                } = p
                {
                    let selected = || nodes.values().filter(|n| selector.matches(&n.labels));
                    let mut now: Vec<Ipv4Network> = selected()
                        .flat_map(|n| n.addresses.iter())
                        .map(|ip| Ipv4Network::new(*ip, 32).expect("valid"))
                        .collect();
                    let mut now6: Vec<Ipv6Network> = selected()
                        .flat_map(|n| n.addresses6.iter())
                        .map(|ip| Ipv6Network::new(*ip, 128).expect("valid"))
                        .collect();
                    now.sort();
                    now.dedup();
                    now6.sort();
                    now6.dedup();
                    if *addresses != now || *addresses6 != now6 {
                        *addresses = now;
                        *addresses6 = now6;
                        changed = true;
                    }
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn cnp(yaml: &str) -> ClusterNetworkPolicy {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn parse_spec(spec: &str) -> ParsedClusterPolicy {
        let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        ParsedClusterPolicy::parse(&cnp(&format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        )))
    }

    #[test]
    fn a_valid_policy_is_typed() {
        let p = parse_spec(
            "tier: Admin\npriority: 5\nsubject: {namespaces: {}}\ningress:\n- {name: a, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: x}}}}], protocols: [{tcp: {destinationPort: {number: 80}}}, {udp: {destinationPort: {range: {start: 10, end: 20}}}}, {destinationNamedPort: http}]}\negress:\n- {action: Pass, to: [{networks: [10.0.0.1/8, 'fd00::/8']}]}",
        );
        let p = p.accepted().expect("accepted");
        assert_eq!((p.tier, p.priority), (Tier::Admin, 5));
        assert_eq!(p.rules.len(), 2);
        assert_eq!(
            p.rules[0].ports,
            Some(vec![
                ClusterPort::Range {
                    proto: PROTO_TCP,
                    start: 80,
                    end: 80
                },
                ClusterPort::Range {
                    proto: PROTO_UDP,
                    start: 10,
                    end: 20
                },
                ClusterPort::Named("http".into()),
            ])
        );
        assert_eq!(p.rules[0].label(), "a");
        assert_eq!(p.rules[1].label(), "egress[0]");
        assert_eq!(
            p.networks().collect::<Vec<_>>(),
            vec!["10.0.0.0/8".parse().unwrap()]
        );
        assert!(p.rules.iter().all(|r| r.unknown.is_none()));
    }

    #[test]
    fn invalid_objects_are_rejected_with_the_reason() {
        for (spec, why) in [
            ("tier: Middle\npriority: 1\nsubject: {namespaces: {}}", "spec.tier"),
            ("tier: Admin\npriority: 1001\nsubject: {namespaces: {}}", "spec.priority: 1001"),
            ("tier: Admin\nsubject: {namespaces: {}}", "spec.priority: required"),
            ("tier: Admin\npriority: 1\nsubject: {}", "spec.subject"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}, pods: {podSelector: {}}}", "found 2"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Deny, from: []}]", "spec.ingress[0].from"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress: [{action: Drop, from: [{namespaces: {}}]}]", "spec.ingress[0].action"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Deny, to: [{networks: [10.0.0.0/33]}]}]", "networks[0]"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Deny, to: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 0}}}]}]", "out of range"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Deny, to: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 9, end: 9}}}}]}]", "less than"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Deny, to: [{namespaces: {}, pods: {podSelector: {}}}]}]", "exactly one"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Deny, to: [{networks: [10.0.0.0/8]}], protocols: [{destinationNamedPort: http}]}]", "namedPorts"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {matchExpressions: [{key: a, operator: Bogus}]}}", "spec.subject.namespaces"),
        ] {
            let p = parse_spec(spec);
            let r = p.rejected().unwrap_or_else(|| panic!("accepted: {spec}"));
            assert!(r.contains(why), "{spec}: {r}");
        }
    }

    #[test]
    fn unknown_peers_and_fields_fail_closed_by_action() {
        let p = parse_spec(
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\ningress:\n- {action: Accept, from: [{networks: [10.0.0.0/8]}]}\n- {action: Pass, from: [{future: {}}]}\negress:\n- {action: Deny, to: [{nodes: {}}]}\n- {action: Accept, to: [{namespaces: {}}], protocols: [{icmp: {}}]}\n- {action: Accept, to: [{domainNames: [example.com]}]}",
        );
        let p = p.accepted().expect("accepted");
        let fc: Vec<_> = p
            .rules
            .iter()
            .map(|r| (r.fail_closed_matches(), r.effective_action()))
            .collect();
        assert_eq!(
            fc,
            vec![
                (Some(false), Action::Accept),
                (Some(true), Action::Deny),
                // `nodes` is understood (resolved against Node objects).
                (None, Action::Deny),
                (Some(false), Action::Accept),
                // `domainNames` too (resolved against learned addresses).
                (None, Action::Accept),
            ]
        );
    }

    #[test]
    fn domain_names_parse_only_in_accept_rules_and_resolve_to_learned_addresses() {
        for (spec, why) in [
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Deny, to: [{domainNames: [a.example.com]}]}]", "only allowed in Accept rules"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Pass, to: [{domainNames: [a.example.com]}]}]", "only allowed in Accept rules"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Accept, to: [{domainNames: [\"*.*.example.com\"]}]}]", "domainNames[0]"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Accept, to: [{domainNames: []}]}]", "1 to 25 names"),
            ("tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Accept, to: [{domainNames: [a.example.com]}], protocols: [{destinationNamedPort: http}]}]", "namedPorts"),
        ] {
            let p = parse_spec(spec);
            let r = p.rejected().unwrap_or_else(|| panic!("accepted: {spec}"));
            assert!(r.contains(why), "{spec}: {r}");
        }
        let p = parse_spec(
            "tier: Admin\npriority: 1\nsubject: {namespaces: {}}\negress: [{action: Accept, to: [{domainNames: [api.example.com, \"*.CDN.example\"]}]}]",
        );
        let mut p = p.accepted().expect("accepted").clone();
        assert!(p.has_domain_peers());
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let learned: std::collections::BTreeMap<String, Vec<std::net::IpAddr>> = [
            (
                "api.example.com".to_string(),
                vec![ip("192.0.2.10"), ip("2001:db8::10")],
            ),
            ("img.cdn.example".to_string(), vec![ip("192.0.2.30")]),
            ("cdn.example".to_string(), vec![ip("192.0.2.40")]),
            ("other.example".to_string(), vec![ip("192.0.2.50")]),
        ]
        .into();
        assert!(p.resolve_domains(&learned));
        assert!(!p.resolve_domains(&learned), "unchanged");
        let v4: Vec<String> = p.networks().map(|n| n.to_string()).collect();
        let v6: Vec<String> = p.networks6().map(|n| n.to_string()).collect();
        assert_eq!(
            v4,
            ["192.0.2.10/32", "192.0.2.30/32"],
            "not the apex, not others"
        );
        assert_eq!(v6, ["2001:db8::10/128"]);
        assert!(p.resolve_domains(&Default::default()));
        assert_eq!(p.networks().count(), 0, "forgotten addresses are gone");
    }
}
