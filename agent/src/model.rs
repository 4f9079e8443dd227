//! The agent's view of the cluster, fed by a source (Kubernetes or the
//! standalone manifest directory) and by the CNI plugin's registrations.
//! Sources only ever produce this; the compiler only ever reads it.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::compiler::{cluster::ParsedClusterPolicy, ParsedPolicy};

pub type Labels = BTreeMap<String, String>;

/// namespace/name. Shared strings: a key is held by several maps (the
/// source, the model, the engine's indexes, the published view), and a
/// clone is a reference count, not two allocations.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        Self {
            namespace: Arc::from(namespace.as_ref()),
            name: Arc::from(name.as_ref()),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Annotation that puts a namespace in audit mode: drops are reported as
/// AUDIT and the packets pass.
pub const AUDIT_ANNOTATION: &str = "palisade.dev/audit";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    /// From AUDIT_ANNOTATION == "true".
    pub audit: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    /// "TCP", "UDP" or "SCTP"
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// None until the pod has an address.
    pub ip: Option<Ipv4Addr>,
    /// The pod's IPv6 address (`status.podIPs`), if it has one.
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub host_network: bool,
    pub ports: Vec<ContainerPort>,
}

/// A node of the cluster (Kubernetes Node object, or `kind: Node` manifest).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: Labels,
    /// InternalIP and ExternalIP addresses (IPv4).
    pub addresses: Vec<Ipv4Addr>,
    /// The IPv6 ones (dual-stack or IPv6 nodes).
    pub addresses6: Vec<std::net::Ipv6Addr>,
    /// spec.podCIDRs (or spec.podCIDR), IPv4.
    pub pod_cidrs: Vec<ipnetwork::Ipv4Network>,
    /// The IPv6 ones of spec.podCIDRs (dual-stack or IPv6 nodes); only the
    /// registration check reads them so far.
    pub pod_cidrs6: Vec<ipnetwork::Ipv6Network>,
}

/// A pod on this node, wired by the CNI plugin and registered with the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub key: ObjectKey,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub host_ifname: String,
    pub ipv4: Ipv4Addr,
    /// The pod's IPv6 address (dual-stack or IPv6-only pods; with
    /// `ipv4` unspecified for IPv6-only ones).
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub container_id: String,
    /// The pod interface's MAC (all zero: not known, not checked).
    pub mac: [u8; 6],
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    pub namespaces: BTreeMap<String, Namespace>,
    /// All pods of the cluster (remote ones matter for identities),
    /// shared with the source's view (see [`crate::change::Change::Pod`]).
    pub pods: BTreeMap<ObjectKey, Arc<Pod>>,
    /// Parsed and validated once, when they enter the model (through
    /// [`Model::add_policy`]).
    pub policies: BTreeMap<ObjectKey, Arc<ParsedPolicy>>,
    /// Pods of this node, by container id.
    pub endpoints: BTreeMap<String, LocalEndpoint>,
    /// The node's own addresses (reserved `host` identity).
    pub host_ips: Vec<Ipv4Addr>,
    /// The nodes of the cluster, by name.
    pub nodes: BTreeMap<String, Node>,
    /// Other nodes' addresses (reserved `remote-node` identity): every
    /// address of `nodes` except this node's and `host_ips`.
    pub remote_node_ips: Vec<Ipv4Addr>,
    /// The same of IPv6: this node's addresses (its Node object's and the
    /// IPv6 gateways its pods' host veths carry) and other nodes'.
    pub host_ips6: Vec<std::net::Ipv6Addr>,
    pub remote_node_ips6: Vec<std::net::Ipv6Addr>,
    /// Global audit mode.
    pub audit: bool,
    /// ClusterNetworkPolicies by name, parsed and validated on arrival
    /// ([`Model::add_cluster_policy`]).
    pub cluster_policies: BTreeMap<String, Arc<ParsedClusterPolicy>>,
    /// Addresses learned from the cluster DNS's answers, by name
    /// (normalized): what `domainNames` peers resolve to (`crate::fqdn`).
    pub learned: BTreeMap<String, Vec<std::net::IpAddr>>,
}

impl Model {
    /// Adds (or replaces) a NetworkPolicy, parsing and validating it: the
    /// model keeps the typed rules (or the rejection and what it still
    /// isolates), never the API object. Everything that builds a model
    /// goes through here.
    pub fn add_policy(&mut self, key: ObjectKey, np: &NetworkPolicy) -> Arc<ParsedPolicy> {
        let parsed = Arc::new(ParsedPolicy::parse(&key, np));
        self.policies.insert(key, parsed.clone());
        parsed
    }

    /// Adds (or replaces) a ClusterNetworkPolicy, parsing and validating it.
    pub fn add_cluster_policy(
        &mut self,
        cnp: &crate::cnp::ClusterNetworkPolicy,
    ) -> Arc<ParsedClusterPolicy> {
        let mut parsed = ParsedClusterPolicy::parse(cnp);
        if let ParsedClusterPolicy::Accepted(p) = &mut parsed {
            p.resolve_nodes(&self.nodes);
            p.resolve_domains(&self.learned);
        }
        let parsed = Arc::new(parsed);
        let name = cnp.metadata.name.clone().unwrap_or_default();
        self.cluster_policies.insert(name, parsed.clone());
        self.refresh_cluster_addresses();
        parsed
    }

    /// Re-resolves the `nodes` peers of every ClusterNetworkPolicy against
    /// the model's nodes (after a node change); whether any changed.
    pub fn resolve_node_peers(&mut self) -> bool {
        let mut changed = false;
        for p in self.cluster_policies.values_mut() {
            if let ParsedClusterPolicy::Accepted(c) = &**p {
                if c.has_node_peers() {
                    let mut c = c.clone();
                    if c.resolve_nodes(&self.nodes) {
                        *p = Arc::new(ParsedClusterPolicy::Accepted(c));
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.refresh_cluster_addresses();
        }
        changed
    }

    /// Replaces the learned addresses and re-resolves the `domainNames`
    /// peers; whether any changed.
    pub fn set_learned(&mut self, learned: BTreeMap<String, Vec<std::net::IpAddr>>) -> bool {
        self.learned = learned;
        let mut changed = false;
        for p in self.cluster_policies.values_mut() {
            if let ParsedClusterPolicy::Accepted(c) = &**p {
                if c.has_domain_peers() {
                    let mut c = c.clone();
                    if c.resolve_domains(&self.learned) {
                        *p = Arc::new(ParsedClusterPolicy::Accepted(c));
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.refresh_cluster_addresses();
        }
        changed
    }

    /// Removes a ClusterNetworkPolicy; whether it was there.
    pub fn remove_cluster_policy(&mut self, name: &str) -> bool {
        let was = self.cluster_policies.remove(name).is_some();
        self.refresh_cluster_addresses();
        was
    }

    /// The hidden policy the tiers need (see
    /// `compiler::tiers::cluster_addresses_key`), as it should be now.
    pub fn cluster_addresses(&self) -> Option<Arc<ParsedPolicy>> {
        let cluster: Vec<_> = self
            .cluster_policies
            .values()
            .filter_map(|p| p.accepted())
            .collect();
        crate::compiler::tiers::cluster_addresses_policy(&cluster)
            .map(|p| Arc::new(ParsedPolicy::Accepted(p)))
    }

    fn refresh_cluster_addresses(&mut self) {
        let key = crate::compiler::tiers::cluster_addresses_key();
        match self.cluster_addresses() {
            Some(p) => self.policies.insert(key, p),
            None => self.policies.remove(&key),
        };
    }

    /// Removes a policy; whether it was there.
    pub fn remove_policy(&mut self, key: &ObjectKey) -> bool {
        self.policies.remove(key).is_some()
    }
}

/// Kubernetes objects -> model, shared by both sources.
pub mod convert {
    use k8s_openapi::api::core::v1 as core;

    use super::{ContainerPort, Namespace, ObjectKey, Pod, AUDIT_ANNOTATION};

    pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

    pub fn namespace(ns: &core::Namespace) -> Option<Namespace> {
        let name = ns.metadata.name.clone()?;
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        // Always present on a real cluster; selectors rely on it.
        labels.insert(NAME_LABEL.into(), name.clone());
        let audit = ns
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(AUDIT_ANNOTATION))
            .is_some_and(|v| v == "true");
        Some(Namespace {
            name,
            labels,
            audit,
        })
    }

    /// Pods that finished (Succeeded/Failed) hold no address any more.
    pub fn pod(p: &core::Pod) -> Option<Pod> {
        let namespace = p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = p.metadata.name.clone()?;
        let spec = p.spec.as_ref();
        let status = p.status.as_ref();
        let finished = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
        // status.podIP and status.podIPs (dual-stack: one per family, the
        // first of each family counts).
        let addrs: Vec<std::net::IpAddr> = status
            .filter(|_| !finished)
            .map(|s| {
                s.pod_ip
                    .iter()
                    .chain(s.pod_ips.iter().flatten().map(|p| &p.ip))
                    .filter_map(|ip| ip.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let ip = addrs.iter().find_map(|a| match a {
            std::net::IpAddr::V4(a) => Some(*a),
            _ => None,
        });
        let ipv6 = addrs.iter().find_map(|a| match a {
            std::net::IpAddr::V6(a) => Some(*a),
            _ => None,
        });
        let mut ports: Vec<ContainerPort> = spec
            .map(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .filter_map(|cp| {
                        Some(ContainerPort {
                            name: cp.name.clone(),
                            port: u16::try_from(cp.container_port).ok()?,
                            protocol: cp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Collected through flat_map, the Vec has room for four; at 10k
        // pods the slack is megabytes.
        ports.shrink_to_fit();
        Some(Pod {
            namespace,
            name,
            labels: p.metadata.labels.clone().unwrap_or_default(),
            ip,
            ipv6,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ports,
        })
    }

    /// A Node: name, labels, InternalIP/ExternalIP IPv4 addresses and pod
    /// CIDRs of each family (podCIDRs, falling back to podCIDR).
    pub fn node(n: &core::Node) -> Option<super::Node> {
        let name = n.metadata.name.clone()?;
        let node_ips = || {
            n.status
                .iter()
                .flat_map(|st| st.addresses.iter().flatten())
                .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        };
        let addresses = node_ips().filter_map(|a| a.address.parse().ok()).collect();
        let addresses6 = node_ips().filter_map(|a| a.address.parse().ok()).collect();
        let spec = n.spec.as_ref();
        let cidrs: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
            Some(v) if !v.is_empty() => v.iter().collect(),
            _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
        };
        let pod_cidrs = cidrs.iter().filter_map(|c| c.parse().ok()).collect();
        let pod_cidrs6 = cidrs.iter().filter_map(|c| c.parse().ok()).collect();
        Some(super::Node {
            name,
            labels: n.metadata.labels.clone().unwrap_or_default(),
            addresses,
            addresses6,
            pod_cidrs,
            pod_cidrs6,
        })
    }

    pub fn key(
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Option<ObjectKey> {
        Some(ObjectKey::new(
            meta.namespace.clone().unwrap_or_else(|| "default".into()),
            meta.name.clone()?,
        ))
    }
}

#[cfg(test)]
mod ip_family_tests {
    use k8s_openapi::api::core::v1 as core;

    fn pod(status: serde_json::Value) -> super::Pod {
        let p: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "a"},
            "status": status,
        }))
        .unwrap();
        super::convert::pod(&p).unwrap()
    }

    /// status.podIPs of both families (issue 15): the first of each.
    #[test]
    fn pod_addresses_of_both_families() {
        let p = pod(serde_json::json!({"podIP": "10.0.0.5",
            "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}, {"ip": "fd00::6"}]}));
        assert_eq!(p.ip, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(p.ipv6, Some("fd00::5".parse().unwrap()));
        // IPv6-only (podIP is the IPv6 one).
        let p = pod(serde_json::json!({"podIP": "fd00::7", "podIPs": [{"ip": "fd00::7"}]}));
        assert_eq!((p.ip, p.ipv6), (None, Some("fd00::7".parse().unwrap())));
        // Finished: no address of either family.
        let p = pod(
            serde_json::json!({"phase": "Succeeded", "podIP": "10.0.0.5",
            "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}),
        );
        assert_eq!((p.ip, p.ipv6), (None, None));
    }
}
