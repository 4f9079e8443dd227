//! What flow logs, trace and status read: rule and identity names, the
//! policies that isolate an endpoint, pods by address. The engine keeps
//! one [`View`] up to date in persistent maps (`im`), so publishing it
//! after a change is a handful of reference-count increments, not a copy.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use super::{Compiled, IdentitySource, RuleRef};
use crate::model::{Labels, LocalEndpoint, Model, Namespace, Node, ObjectKey};

/// A pod as the flow log names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodRef<'a> {
    pub key: &'a ObjectKey,
    pub labels: &'a Labels,
}

/// The questions the flow log and trace ask of a compiled state.
pub trait Names {
    /// The rule a cookie stands for.
    fn cookie(&self, cookie: u32) -> Option<&RuleRef>;
    fn identity(&self, id: u32) -> Option<&IdentitySource>;
    /// The policies that isolate `endpoint_id` in `direction` (sorted).
    fn isolating(&self, endpoint_id: u32, direction: u8) -> &[ObjectKey];
    /// The pod the ipcache gives an address to (not hostNetwork pods).
    fn pod_at(&self, ip: Ipv4Addr) -> Option<PodRef<'_>>;
    /// The pod ipcache6 gives an IPv6 address to.
    fn pod_at6(&self, ip: std::net::Ipv6Addr) -> Option<PodRef<'_>>;
    /// `None`: no such pod; `Some(None)`: a pod without an address yet.
    fn pod_address(&self, key: &ObjectKey) -> Option<Option<Ipv4Addr>>;
    fn endpoint_by_id(&self, endpoint_id: u32) -> Option<&LocalEndpoint>;
    fn local_endpoint_at(&self, ip: Ipv4Addr) -> Option<&LocalEndpoint>;
    fn local_endpoint_of(&self, key: &ObjectKey) -> Option<&LocalEndpoint>;
    /// A pod's IPv6 address, where ipcache6 has it.
    fn pod_address6(&self, _key: &ObjectKey) -> Option<std::net::Ipv6Addr> {
        None
    }
    fn is_host_ip(&self, ip: Ipv4Addr) -> bool;
    /// The other node an address belongs to (`remote-node` identity).
    fn remote_node_name(&self, _ip: Ipv4Addr) -> Option<&str> {
        None
    }
    /// This node's name, if the agent was given one.
    fn node_name(&self) -> Option<&str> {
        None
    }
    /// The node whose pod range (spec.podCIDRs) holds a pod address.
    fn pod_node_name(&self, _ip: Ipv4Addr) -> Option<&str> {
        None
    }
    /// The ClusterNetworkPolicy rule a cookie stands for.
    fn cluster_cookie(&self, _cookie: u32) -> Option<&super::tiers::ClusterRuleRef> {
        None
    }
    /// The Pass rules a recorded flow went through before the rule with
    /// `cookie` decided (`tier_walk::passed_for_record`).
    fn cluster_passed(
        &self,
        _endpoint_id: u32,
        _direction: u8,
        _remote: Ipv4Addr,
        _proto_port: (u8, u16),
        _cookie: u32,
    ) -> Vec<super::tiers::ClusterRuleRef> {
        Vec::new()
    }
}

/// A published state. Every part is a persistent map: cloning a `View` is
/// cheap and shares everything with the engine's copy. B-trees (`OrdMap`),
/// not HAMTs: at 10k pods a HAMT's sparse 32-slot nodes cost several times
/// the entries they hold.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub cookies: im::OrdMap<u32, RuleRef>,
    /// ClusterNetworkPolicy rule cookies (from `tiers::CLUSTER_COOKIE_BASE`).
    pub cluster_cookies: im::OrdMap<u32, super::tiers::ClusterRuleRef>,
    /// Every ClusterNetworkPolicy of the model, parsed (accepted or rejected).
    pub cluster_policies: im::OrdMap<String, std::sync::Arc<super::cluster::ParsedClusterPolicy>>,
    pub identities: im::OrdMap<u32, IdentitySource>,
    /// Every policy of the model, with the reason if rejected.
    pub policies: im::OrdMap<ObjectKey, Option<String>>,
    pub rejected: im::OrdMap<ObjectKey, String>,
    /// For every local pod (by pod key), the policies that select it.
    pub selected_by: im::OrdMap<ObjectKey, Vec<ObjectKey>>,
    /// (endpoint id, direction) -> the policies that isolate it.
    pub isolated_by: im::OrdMap<(u32, u8), Vec<ObjectKey>>,
    pub namespaces: im::OrdMap<String, Namespace>,
    /// Every pod's address (model pods, and the pods of local endpoints
    /// the model does not know). Pods themselves are not copied: their
    /// labels are their identity's.
    pub pod_addresses: im::OrdMap<ObjectKey, Option<Ipv4Addr>>,
    /// The pod the ipcache gives each pod address to, and its identity.
    pub pods_by_ip: im::OrdMap<Ipv4Addr, (ObjectKey, u32)>,
    /// The same for IPv6 pod addresses (ipcache6).
    pub pods_by_ip6: im::OrdMap<std::net::Ipv6Addr, (ObjectKey, u32)>,
    /// Local endpoints by container id.
    pub endpoints: im::OrdMap<String, LocalEndpoint>,
    pub endpoints_by_id: im::OrdMap<u32, String>,
    pub host_ips: Arc<Vec<Ipv4Addr>>,
    /// The cluster's nodes, and the addresses of the other ones.
    pub nodes: im::OrdMap<String, Node>,
    pub remote_node_ips: Arc<Vec<Ipv4Addr>>,
    /// This node's name.
    pub node_name: Option<Arc<str>>,
    pub audit: bool,
}

impl View {
    /// The node (other than this one) an address belongs to.
    pub fn remote_node_at(&self, ip: Ipv4Addr) -> Option<&Node> {
        if !self.remote_node_ips.contains(&ip) {
            return None;
        }
        self.nodes.values().find(|n| n.addresses.contains(&ip))
    }
}

impl View {
    /// The view of a full compile (the daemon's path before the engine).
    pub fn from_compiled(c: &Compiled, model: &Model) -> Self {
        // Model pods as the model has them; pods only an endpoint knows
        // at their (last) endpoint's address.
        let mut pod_addresses: im::OrdMap<ObjectKey, Option<Ipv4Addr>> = im::OrdMap::new();
        for ep in model.endpoints.values() {
            pod_addresses.insert(ep.key.clone(), Some(ep.ipv4));
        }
        for (k, p) in &model.pods {
            pod_addresses.insert(k.clone(), p.ip);
        }
        // As the compiler does: a local pod's address is its (last)
        // endpoint's; on one address a local pod beats a remote one, then
        // the first by key.
        let mut local: BTreeMap<&ObjectKey, Ipv4Addr> = BTreeMap::new();
        for ep in model.endpoints.values() {
            if !model.pods.get(&ep.key).is_some_and(|p| p.host_network) {
                local.insert(&ep.key, ep.ipv4);
            }
        }
        let mut by_ip: HashMap<Ipv4Addr, &ObjectKey> = HashMap::new();
        for (k, ip) in &local {
            by_ip.entry(*ip).or_insert(k);
        }
        for (k, p) in &model.pods {
            if let Some(ip) = p.ip.filter(|_| !p.host_network && !local.contains_key(k)) {
                by_ip.entry(ip).or_insert(k);
            }
        }
        // IPv6: the same rules over the registrations' and pods' IPv6
        // addresses, checked against ipcache6.
        let mut local6: BTreeMap<&ObjectKey, Option<std::net::Ipv6Addr>> = BTreeMap::new();
        for ep in model.endpoints.values() {
            if !model.pods.get(&ep.key).is_some_and(|p| p.host_network) {
                local6.insert(&ep.key, ep.ipv6);
            }
        }
        let mut by_ip6: HashMap<std::net::Ipv6Addr, &ObjectKey> = HashMap::new();
        for (k, ip) in &local6 {
            if let Some(ip) = ip {
                by_ip6.entry(*ip).or_insert(k);
            }
        }
        for (k, p) in &model.pods {
            if let Some(ip) = p
                .ipv6
                .filter(|_| !p.host_network && !local6.contains_key(k))
            {
                by_ip6.entry(ip).or_insert(k);
            }
        }
        let pods_by_ip6 = by_ip6
            .into_iter()
            .filter_map(|(ip, k)| {
                let v = c.maps.ipcache6.get(&(ip, 128))?;
                // A node's address is the node's, whatever pod claims it.
                let node = model.host_ips6.contains(&ip) || model.remote_node_ips6.contains(&ip);
                (!node).then(|| (ip, (k.clone(), v.identity)))
            })
            .collect();
        let pods_by_ip = by_ip
            .into_iter()
            .filter_map(|(ip, k)| {
                let v = c.maps.ipcache.get(&(ip, 32))?;
                let labels = matches!(
                    c.identities.get(&v.identity),
                    Some(IdentitySource::Labels { .. })
                );
                labels.then(|| (ip, (k.clone(), v.identity)))
            })
            .collect();
        Self {
            cookies: c.cookies.iter().map(|(k, v)| (*k, v.clone())).collect(),
            cluster_cookies: c
                .cluster_cookies
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            cluster_policies: model
                .cluster_policies
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            identities: c.identities.iter().map(|(k, v)| (*k, v.clone())).collect(),
            policies: model
                .policies
                .iter()
                .filter(|(k, _)| **k != super::tiers::cluster_addresses_key())
                .map(|(k, p)| (k.clone(), p.rejected().map(str::to_string)))
                .collect(),
            rejected: c
                .rejected
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            selected_by: c
                .selected_by
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            isolated_by: c.isolated_by.iter().map(|(k, v)| (*k, v.clone())).collect(),
            namespaces: model
                .namespaces
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            pod_addresses,
            pods_by_ip,
            pods_by_ip6,
            endpoints: model
                .endpoints
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            endpoints_by_id: model
                .endpoints
                .iter()
                .map(|(k, v)| (v.endpoint_id, k.clone()))
                .collect(),
            host_ips: Arc::new(model.host_ips.clone()),
            nodes: model
                .nodes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            remote_node_ips: Arc::new(model.remote_node_ips.clone()),
            node_name: None,
            audit: model.audit,
        }
    }
}

impl Names for View {
    fn cookie(&self, cookie: u32) -> Option<&RuleRef> {
        self.cookies.get(&cookie)
    }
    fn identity(&self, id: u32) -> Option<&IdentitySource> {
        self.identities.get(&id)
    }
    fn isolating(&self, endpoint_id: u32, direction: u8) -> &[ObjectKey] {
        self.isolated_by
            .get(&(endpoint_id, direction))
            .map_or(&[], Vec::as_slice)
    }
    fn pod_at6(&self, ip: std::net::Ipv6Addr) -> Option<PodRef<'_>> {
        let (key, id) = self.pods_by_ip6.get(&ip)?;
        match self.identities.get(id)? {
            IdentitySource::Labels { pod_labels, .. } => Some(PodRef {
                key,
                labels: pod_labels,
            }),
            _ => None,
        }
    }
    fn pod_at(&self, ip: Ipv4Addr) -> Option<PodRef<'_>> {
        let (key, id) = self.pods_by_ip.get(&ip)?;
        match self.identities.get(id)? {
            IdentitySource::Labels { pod_labels, .. } => Some(PodRef {
                key,
                labels: pod_labels,
            }),
            _ => None,
        }
    }
    fn pod_address(&self, key: &ObjectKey) -> Option<Option<Ipv4Addr>> {
        self.pod_addresses.get(key).copied()
    }
    fn endpoint_by_id(&self, endpoint_id: u32) -> Option<&LocalEndpoint> {
        self.endpoints_by_id
            .get(&endpoint_id)
            .and_then(|c| self.endpoints.get(c))
    }
    fn local_endpoint_at(&self, ip: Ipv4Addr) -> Option<&LocalEndpoint> {
        self.endpoints.values().find(|e| e.ipv4 == ip)
    }
    fn local_endpoint_of(&self, key: &ObjectKey) -> Option<&LocalEndpoint> {
        self.endpoints.values().rev().find(|e| e.key == *key)
    }
    fn pod_address6(&self, key: &ObjectKey) -> Option<std::net::Ipv6Addr> {
        self.pods_by_ip6
            .iter()
            .find(|(_, (k, _))| k == key)
            .map(|(ip, _)| *ip)
    }
    fn is_host_ip(&self, ip: Ipv4Addr) -> bool {
        self.host_ips.contains(&ip)
    }
    fn remote_node_name(&self, ip: Ipv4Addr) -> Option<&str> {
        self.remote_node_at(ip).map(|n| n.name.as_str())
    }
    fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }
    fn pod_node_name(&self, ip: Ipv4Addr) -> Option<&str> {
        self.nodes
            .values()
            .find(|n| n.pod_cidrs.iter().any(|c| c.contains(ip)))
            .map(|n| n.name.as_str())
    }
    fn cluster_cookie(&self, cookie: u32) -> Option<&super::tiers::ClusterRuleRef> {
        self.cluster_cookies.get(&cookie)
    }
    fn cluster_passed(
        &self,
        endpoint_id: u32,
        direction: u8,
        remote: Ipv4Addr,
        (proto, port): (u8, u16),
        cookie: u32,
    ) -> Vec<super::tiers::ClusterRuleRef> {
        super::tier_walk::passed_for_record(
            self,
            endpoint_id,
            direction,
            remote,
            proto,
            port,
            cookie,
        )
    }
}

/// Names through a smart pointer or a lock guard (`&*guard` works too).
macro_rules! forward_names {
    ($($t:ty),*) => {$(
        impl<T: Names + ?Sized> Names for $t {
            fn cookie(&self, cookie: u32) -> Option<&RuleRef> {
                (**self).cookie(cookie)
            }
            fn identity(&self, id: u32) -> Option<&IdentitySource> {
                (**self).identity(id)
            }
            fn isolating(&self, endpoint_id: u32, direction: u8) -> &[ObjectKey] {
                (**self).isolating(endpoint_id, direction)
            }
            fn pod_at(&self, ip: Ipv4Addr) -> Option<PodRef<'_>> {
                (**self).pod_at(ip)
            }
            fn pod_at6(&self, ip: std::net::Ipv6Addr) -> Option<PodRef<'_>> {
                (**self).pod_at6(ip)
            }
            fn pod_address(&self, key: &ObjectKey) -> Option<Option<Ipv4Addr>> {
                (**self).pod_address(key)
            }
            fn endpoint_by_id(&self, endpoint_id: u32) -> Option<&LocalEndpoint> {
                (**self).endpoint_by_id(endpoint_id)
            }
            fn local_endpoint_at(&self, ip: Ipv4Addr) -> Option<&LocalEndpoint> {
                (**self).local_endpoint_at(ip)
            }
            fn local_endpoint_of(&self, key: &ObjectKey) -> Option<&LocalEndpoint> {
                (**self).local_endpoint_of(key)
            }
            fn is_host_ip(&self, ip: Ipv4Addr) -> bool {
                (**self).is_host_ip(ip)
            }
            fn remote_node_name(&self, ip: Ipv4Addr) -> Option<&str> {
                (**self).remote_node_name(ip)
            }
            fn node_name(&self) -> Option<&str> {
                (**self).node_name()
            }
            fn pod_node_name(&self, ip: Ipv4Addr) -> Option<&str> {
                (**self).pod_node_name(ip)
            }
            fn cluster_cookie(&self, cookie: u32) -> Option<&super::tiers::ClusterRuleRef> {
                (**self).cluster_cookie(cookie)
            }
            fn cluster_passed(
                &self,
                endpoint_id: u32,
                direction: u8,
                remote: Ipv4Addr,
                proto_port: (u8, u16),
                cookie: u32,
            ) -> Vec<super::tiers::ClusterRuleRef> {
                (**self).cluster_passed(endpoint_id, direction, remote, proto_port, cookie)
            }
        }
    )*};
}

forward_names!(
    Arc<T>,
    std::sync::RwLockReadGuard<'_, T>,
    std::sync::MutexGuard<'_, T>
);
