//! What the datapath and the DNS task need from the model: which pods'
//! answers are held and for which patterns, and where the cluster DNS
//! answers from. Pure functions of the model and the Services.
use std::collections::{BTreeMap, BTreeSet};

use std::net::IpAddr;

use palisade_common::{
    dns::{DnsServerKey, DnsServerKey6},
    DIR_EGRESS, PROTO_TCP, PROTO_UDP,
};

use super::DomainPattern;
use crate::{
    compiler::cluster::ClusterPeer,
    model::{Labels, Model},
    service::Frontend,
};

/// The cluster DNS: its pods' namespace and labels (`--cluster-dns`).
#[derive(Clone, Debug)]
pub struct ClusterDns {
    pub namespace: String,
    pub labels: Labels,
}

impl Default for ClusterDns {
    fn default() -> Self {
        Self {
            namespace: "kube-system".into(),
            labels: [("k8s-app".to_string(), "kube-dns".to_string())].into(),
        }
    }
}

impl std::str::FromStr for ClusterDns {
    type Err = String;
    /// `NAMESPACE/KEY=VALUE[,KEY=VALUE...]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (ns, labels) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected NAMESPACE/KEY=VALUE[,KEY=VALUE]"))?;
        if ns.is_empty() {
            return Err(format!("{s:?}: the namespace is empty"));
        }
        let mut l = Labels::new();
        for kv in labels.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?}: expected KEY=VALUE"))?;
            l.insert(k.to_string(), v.to_string());
        }
        if l.is_empty() {
            return Err(format!("{s:?}: at least one label is needed"));
        }
        Ok(Self {
            namespace: ns.to_string(),
            labels: l,
        })
    }
}

impl ClusterDns {
    fn selects(&self, namespace: &str, labels: &Labels) -> bool {
        namespace == self.namespace && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The DNS port, and the container port names CoreDNS and kube-dns use.
const DNS_PORT: u16 = 53;
const DNS_PORT_NAMES: [&str; 2] = ["dns", "dns-tcp"];

/// `DNS_SERVERS` and `DNS_SERVERS6`, both families in one set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Servers {
    pub v4: BTreeSet<DnsServerKey>,
    pub v6: BTreeSet<DnsServerKey6>,
}

impl Servers {
    fn insert(&mut self, addr: IpAddr, port: u16, protocol: u8) {
        match addr {
            IpAddr::V4(a) => {
                self.v4.insert(DnsServerKey::new(
                    u32::from_ne_bytes(a.octets()),
                    port,
                    protocol,
                ));
            }
            IpAddr::V6(a) => {
                self.v6.insert(DnsServerKey6::new(
                    palisade_dataplane::maps::ip6_words(a),
                    port,
                    protocol,
                ));
            }
        }
    }
}

/// Where cluster DNS answers come from: every cluster DNS pod's addresses
/// on port 53 (and its ports named dns/dns-tcp), UDP and TCP, and every
/// Service frontend with such a pod among its backends (the reply as
/// translated back).
pub fn servers(model: &Model, dns: &ClusterDns, frontends: &[Frontend]) -> Servers {
    let mut out = Servers::default();
    let mut pods: BTreeSet<IpAddr> = BTreeSet::new();
    // A local pod's addresses are known from its registration before the
    // source reports them.
    let local: BTreeMap<&crate::model::ObjectKey, &crate::model::LocalEndpoint> =
        model.endpoints.values().map(|e| (&e.key, e)).collect();
    for (key, p) in &model.pods {
        if p.host_network || !dns.selects(&p.namespace, &p.labels) {
            continue;
        }
        let ep = local.get(key);
        let v4 =
            p.ip.or_else(|| ep.map(|e| e.ipv4).filter(|a| !a.is_unspecified()));
        let v6 = p.ipv6.or_else(|| ep.and_then(|e| e.ipv6));
        for ip in v4.map(IpAddr::V4).into_iter().chain(v6.map(IpAddr::V6)) {
            pods.insert(ip);
            for proto in [PROTO_UDP, PROTO_TCP] {
                out.insert(ip, DNS_PORT, proto);
            }
            for cp in &p.ports {
                if cp
                    .name
                    .as_deref()
                    .is_some_and(|n| DNS_PORT_NAMES.contains(&n))
                {
                    if let Some(proto) = crate::compiler::parse::protocol_number(Some(&cp.protocol))
                    {
                        out.insert(ip, cp.port, proto);
                    }
                }
            }
        }
    }
    for f in frontends {
        if f.protocol != PROTO_UDP && f.protocol != PROTO_TCP {
            continue;
        }
        let mut any = false;
        for b in f.backends.iter().filter(|b| pods.contains(&b.address.ip())) {
            out.insert(b.address.ip(), b.address.port(), f.protocol);
            any = true;
        }
        if any {
            out.insert(f.ip(), f.address.port(), f.protocol);
        }
    }
    out
}

/// ifindex -> the `domainNames` patterns of the ClusterNetworkPolicy
/// egress rules that select the pod on it (only pods with some).
pub type Rules = BTreeMap<u32, Vec<DomainPattern>>;

pub fn rules(model: &Model) -> Rules {
    let cluster: Vec<_> = model
        .cluster_policies
        .values()
        .filter_map(|p| p.accepted())
        .filter(|p| p.has_domain_peers())
        .collect();
    let mut out = Rules::new();
    if cluster.is_empty() {
        return out;
    }
    for ep in model.endpoints.values() {
        let Some(pod) = model.pods.get(&ep.key) else {
            continue;
        };
        if pod.host_network {
            continue;
        }
        let nsl = crate::compiler::identities::namespace_labels(model, &ep.key.namespace);
        let mut pats: Vec<DomainPattern> = cluster
            .iter()
            .filter(|p| p.subject.matches(&nsl, &pod.labels))
            .flat_map(|p| &p.rules)
            .filter(|r| r.direction == DIR_EGRESS && r.unknown.is_none())
            .flat_map(|r| &r.peers)
            .flat_map(|p| match p {
                ClusterPeer::Domains { patterns, .. } => patterns.clone(),
                _ => Vec::new(),
            })
            .collect();
        if pats.is_empty() {
            continue;
        }
        pats.sort();
        pats.dedup();
        out.insert(ep.ifindex, pats);
    }
    out
}
