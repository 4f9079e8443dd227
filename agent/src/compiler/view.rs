//! What flow logs, trace and status read: rule and identity names, the
//! policies that isolate an endpoint, pods by address. The engine keeps
//! one [`View`] up to date in persistent maps (`im`), so publishing it
//! after a change is a handful of reference-count increments, not a copy.
use std::{net::Ipv4Addr, sync::Arc};

use super::{Compiled, IdentitySource, RuleRef};
use crate::model::{LocalEndpoint, Model, Namespace, ObjectKey, Pod};

/// The questions the flow log and trace ask of a compiled state.
pub trait Names {
    /// The rule a cookie stands for.
    fn cookie(&self, cookie: u32) -> Option<&RuleRef>;
    fn identity(&self, id: u32) -> Option<&IdentitySource>;
    /// The policies that isolate `endpoint_id` in `direction` (sorted).
    fn isolating(&self, endpoint_id: u32, direction: u8) -> &[ObjectKey];
    /// The pod holding an address (not hostNetwork pods).
    fn pod_at(&self, ip: Ipv4Addr) -> Option<&Pod>;
    fn pod(&self, key: &ObjectKey) -> Option<&Pod>;
    fn endpoint_by_id(&self, endpoint_id: u32) -> Option<&LocalEndpoint>;
    fn local_endpoint_at(&self, ip: Ipv4Addr) -> Option<&LocalEndpoint>;
    fn local_endpoint_of(&self, key: &ObjectKey) -> Option<&LocalEndpoint>;
    fn is_host_ip(&self, ip: Ipv4Addr) -> bool;
}

/// A published state. Every part is a persistent map: cloning a `View` is
/// cheap and shares everything with the engine's copy.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub cookies: im::HashMap<u32, RuleRef>,
    pub identities: im::HashMap<u32, IdentitySource>,
    /// Every policy of the model, with the reason if rejected.
    pub policies: im::OrdMap<ObjectKey, Option<String>>,
    pub rejected: im::OrdMap<ObjectKey, String>,
    /// For every local pod (by pod key), the policies that select it.
    pub selected_by: im::OrdMap<ObjectKey, Vec<ObjectKey>>,
    /// (endpoint id, direction) -> the policies that isolate it.
    pub isolated_by: im::OrdMap<(u32, u8), Vec<ObjectKey>>,
    pub namespaces: im::OrdMap<String, Namespace>,
    /// Model pods, and a label-less pod for local endpoints the model does
    /// not know.
    pub pods: im::OrdMap<ObjectKey, Arc<Pod>>,
    /// The pod the ipcache gives each pod address to.
    pub pods_by_ip: im::HashMap<Ipv4Addr, ObjectKey>,
    /// Local endpoints by container id.
    pub endpoints: im::OrdMap<String, LocalEndpoint>,
    pub endpoints_by_id: im::HashMap<u32, String>,
    pub host_ips: Arc<Vec<Ipv4Addr>>,
    pub audit: bool,
}

impl View {
    /// The view of a full compile (the daemon's path before the engine).
    pub fn from_compiled(c: &Compiled, model: &Model) -> Self {
        let mut pods: im::OrdMap<ObjectKey, Arc<Pod>> = model
            .pods
            .iter()
            .map(|(k, p)| (k.clone(), Arc::new(p.clone())))
            .collect();
        for ep in model.endpoints.values() {
            pods.entry(ep.key.clone())
                .or_insert_with(|| Arc::new(unknown_pod(ep)));
        }
        let mut pods_by_ip = im::HashMap::new();
        // Local first, as the ipcache does.
        for ep in model.endpoints.values() {
            if !model.pods.get(&ep.key).is_some_and(|p| p.host_network) {
                pods_by_ip.entry(ep.ipv4).or_insert_with(|| ep.key.clone());
            }
        }
        for (k, p) in &model.pods {
            if let Some(ip) = p.ip.filter(|_| !p.host_network) {
                pods_by_ip.entry(ip).or_insert_with(|| k.clone());
            }
        }
        Self {
            cookies: c.cookies.iter().map(|(k, v)| (*k, v.clone())).collect(),
            identities: c.identities.iter().map(|(k, v)| (*k, v.clone())).collect(),
            policies: model
                .policies
                .iter()
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
            pods,
            pods_by_ip,
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
            audit: model.audit,
        }
    }
}

/// The pod a local endpoint stands for when the model does not know it.
pub(crate) fn unknown_pod(ep: &LocalEndpoint) -> Pod {
    Pod {
        namespace: ep.key.namespace.clone(),
        name: ep.key.name.clone(),
        labels: Default::default(),
        ip: Some(ep.ipv4),
        host_network: false,
        ports: Vec::new(),
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
    fn pod_at(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.pods_by_ip
            .get(&ip)
            .and_then(|k| self.pods.get(k))
            .map(|p| &**p)
    }
    fn pod(&self, key: &ObjectKey) -> Option<&Pod> {
        self.pods.get(key).map(|p| &**p)
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
    fn is_host_ip(&self, ip: Ipv4Addr) -> bool {
        self.host_ips.contains(&ip)
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
            fn pod_at(&self, ip: Ipv4Addr) -> Option<&Pod> {
                (**self).pod_at(ip)
            }
            fn pod(&self, key: &ObjectKey) -> Option<&Pod> {
                (**self).pod(key)
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
        }
    )*};
}

forward_names!(
    Arc<T>,
    std::sync::RwLockReadGuard<'_, T>,
    std::sync::MutexGuard<'_, T>
);
