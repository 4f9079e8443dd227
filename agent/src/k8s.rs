//! The Kubernetes source: kube-rs reflectors over every Pod (remote pod
//! addresses feed the ipcache), Namespace, NetworkPolicy, Service and
//! EndpointSlice of the cluster, every Node, and ClusterNetworkPolicy (if the
//! CRD is installed), merged into one stream of typed events for the
//! owner's channel. It never applies anything itself.
//!
//! - Each watch event becomes [`Change`]s (Apply → upsert, Delete →
//!   deleted), once a kind-specific predicate ([`Watch::relevant`], a kube
//!   runtime predicate over exactly what the agent reads) says it changed
//!   something: a pod's status heartbeat never reaches the owner.
//! - After every kind's initial list, and after any re-list (the watch
//!   expired, 410 Gone: `Init` … `InitDone`), a [`SourceEvent::Resync`] built
//!   from all the reflector stores; the owner diffs it against its view. The
//!   first event sent is always that first Resync.
//! - Adding a kind is an `impl Watch` and one `kinds.watch::<K>(…)` line in
//!   [`spawn`]; [`WATCHED`] (checked against deploy/'s RBAC) stays the one
//!   list of what is read, and `watch` refuses a kind that is not in it.
use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    marker::PhantomData,
    sync::Arc,
};

use anyhow::{ensure, Context, Result};
use futures::{stream::BoxStream, StreamExt};
use k8s_openapi::{
    api::{
        core::v1::{
            Container, Namespace, Node, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus, Service,
            ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointSlice},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    runtime::{
        reflector::{self, Store},
        watcher, Predicate, WatchStreamExt,
    },
    Api, Client, Resource,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    change::{Change, Snapshot, SourceEvent},
    cnp::ClusterNetworkPolicy,
    model::{convert, ObjectKey, AUDIT_ANNOTATION},
};

mod cluster_policy;

/// What the agent reads from the API server. deploy/'s ClusterRole is
/// checked against this table (deploy/tests), and `spawn` refuses
/// a kind that is not in it.
pub struct Watched {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

pub const WATCHED: &[Watched] = &[
    Watched {
        group: "",
        resource: "pods",
        verbs: &["get", "list", "watch"],
    },
    Watched {
        group: "",
        resource: "namespaces",
        verbs: &["get", "list", "watch"],
    },
    Watched {
        group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: &["get", "list", "watch"],
    },
    Watched {
        group: "",
        resource: "nodes",
        verbs: &["get", "list", "watch"],
    },
    Watched {
        group: "",
        resource: "services",
        verbs: &["get", "list", "watch"],
    },
    Watched {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["get", "list", "watch"],
    },
    // The network-policy-api CRD (v0.2.0); watched only if installed.
    Watched {
        group: "policy.networking.k8s.io",
        resource: "clusternetworkpolicies",
        verbs: &["get", "list", "watch"],
    },
];

/// This node's spec.podCIDR (for `install-cni --kubernetes`).
pub async fn node_pod_cidr(node: &str) -> Result<String> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let n = Api::<Node>::all(client)
        .get(node)
        .await
        .with_context(|| format!("reading node {node}"))?;
    n.spec.and_then(|s| s.pod_cidr).with_context(|| {
        format!(
            "node {node} has no spec.podCIDR (is the controller manager allocating node CIDRs?)"
        )
    })
}

/// Starts watching the cluster (this node's addresses too, given its
/// name). Events go to `tx`: first a Resync once every kind is listed, then
/// Changes and, after a re-list, Resyncs. The task ends when `tx` closes.
pub async fn spawn(
    client: Client,
    node: Option<String>,
    tx: mpsc::Sender<SourceEvent>,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut kinds = Kinds::default();
    kinds.watch(Api::<Pod>::all(client.clone()), watcher::Config::default())?;
    kinds.watch(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )?;
    kinds.watch(
        Api::<NetworkPolicy>::all(client.clone()),
        watcher::Config::default(),
    )?;
    kinds.watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )?;
    kinds.watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    )?;
    // Every node: the agent tells its own by name (`Engine::set_node_name`).
    kinds.watch(Api::<Node>::all(client.clone()), watcher::Config::default())?;
    // A cluster without the CRD has no ClusterNetworkPolicy to enforce; it
    // is asked once, here (installing the CRD later needs an agent restart).
    let cnps = Api::<ClusterNetworkPolicy>::all(client);
    if cluster_policy::installed(&cnps).await? {
        kinds.watch(cnps, watcher::Config::default())?;
    } else {
        warn!(
            "the ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) is not installed: \
             ClusterNetworkPolicies are not read (install it, then restart the agent; deploy/README.md)"
        );
    }
    info!(node = ?node, "watching the Kubernetes API");
    Ok(tokio::spawn(kinds.run(tx)))
}

/// A kind the agent watches: what of it is kept, what matters, and the
/// typed changes it makes.
pub trait Watch:
    Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Drops what the agent never reads before the object reaches the
    /// reflector's cache (managed fields at least: often most of an
    /// object's size).
    fn trim(&mut self) {
        self.meta_mut().managed_fields = None;
    }

    /// A hash of what the agent reads of the object (a kube runtime
    /// [`Predicate`]): an update that leaves it unchanged is not sent.
    /// None: cannot tell, always sent.
    fn relevant(&self) -> Option<u64>;

    /// The object as it now is, as a change (None: nothing usable in it).
    fn applied(&self) -> Option<Change>;

    /// Its deletion.
    fn deleted(&self) -> Option<Change>;

    /// Adds every object of the kind (a complete list) to a view.
    fn fill(objects: &[Arc<Self>], view: &mut Snapshot);
}

fn hash_of(t: &impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// Name, namespace, uid and (if `labels`) labels: all the metadata the
/// agent reads of most kinds.
fn identity_meta(m: &ObjectMeta, labels: bool) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        labels: if labels { m.labels.clone() } else { None },
        ..Default::default()
    }
}

impl Watch for Pod {
    /// Every pod of the cluster is cached: keep labels, addresses, phase,
    /// hostNetwork and container ports, nothing else.
    fn trim(&mut self) {
        self.metadata = identity_meta(&self.metadata, true);
        self.spec = self.spec.take().map(|s| PodSpec {
            host_network: s.host_network,
            containers: s
                .containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        self.status = self.status.take().map(|s| PodStatus {
            phase: s.phase,
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            ..Default::default()
        });
    }

    /// Exactly the model's pod: labels, addresses (podIP(s), gone once the
    /// phase is Succeeded/Failed), hostNetwork, container ports.
    fn relevant(&self) -> Option<u64> {
        let p = convert::pod(self)?;
        let ports: Vec<_> = p
            .ports
            .iter()
            .map(|c| (&c.name, c.port, &c.protocol))
            .collect();
        Some(hash_of(&(
            &p.namespace,
            &p.name,
            &p.labels,
            p.ip,
            p.ipv6,
            p.host_network,
            ports,
        )))
    }

    fn applied(&self) -> Option<Change> {
        convert::pod(self).map(|p| Change::Pod(Arc::new(p)))
    }

    fn deleted(&self) -> Option<Change> {
        convert::key(&self.metadata).map(Change::PodDeleted)
    }

    fn fill(objects: &[Arc<Self>], view: &mut Snapshot) {
        for p in objects.iter().filter_map(|p| convert::pod(p)) {
            view.pods
                .insert(ObjectKey::new(&p.namespace, &p.name), Arc::new(p));
        }
    }
}

impl Watch for Namespace {
    fn trim(&mut self) {
        let audit = self
            .metadata
            .annotations
            .as_mut()
            .and_then(|a| a.remove(AUDIT_ANNOTATION));
        self.metadata = identity_meta(&self.metadata, true);
        self.metadata.annotations = audit.map(|v| [(AUDIT_ANNOTATION.to_string(), v)].into());
        self.spec = None;
        self.status = None;
    }

    fn relevant(&self) -> Option<u64> {
        let n = convert::namespace(self)?;
        Some(hash_of(&(&n.name, &n.labels, n.audit)))
    }

    fn applied(&self) -> Option<Change> {
        convert::namespace(self).map(Change::Namespace)
    }

    fn deleted(&self) -> Option<Change> {
        self.metadata.name.clone().map(Change::NamespaceDeleted)
    }

    fn fill(objects: &[Arc<Self>], view: &mut Snapshot) {
        for n in objects.iter().filter_map(|n| convert::namespace(n)) {
            view.namespaces.insert(n.name.clone(), n);
        }
    }
}

impl Watch for NetworkPolicy {
    /// The compiler reads the object itself: keep its identity and spec.
    fn trim(&mut self) {
        let generation = self.metadata.generation;
        self.metadata = identity_meta(&self.metadata, true);
        self.metadata.generation = generation;
    }

    /// Everything kept (name, labels, spec): an update that changes none of
    /// it (annotations, status) is not sent.
    fn relevant(&self) -> Option<u64> {
        let m = &self.metadata;
        let spec = serde_json::to_vec(&self.spec).ok()?;
        Some(hash_of(&(&m.namespace, &m.name, &m.labels, spec)))
    }

    fn applied(&self) -> Option<Change> {
        let key = convert::key(&self.metadata)?;
        Some(Change::Policy(key, Arc::new(self.clone())))
    }

    fn deleted(&self) -> Option<Change> {
        convert::key(&self.metadata).map(Change::PolicyDeleted)
    }

    fn fill(objects: &[Arc<Self>], view: &mut Snapshot) {
        for np in objects {
            if let Some(k) = convert::key(&np.metadata) {
                view.policies.insert(k, np.clone());
            }
        }
    }
}

impl Watch for Service {
    /// What resolution reads: identity, creation time (the older of two
    /// Services claiming one ClusterIP:port keeps it) and the spec fields
    /// of ClusterIPs, ports, selector and affinity; no status.
    fn trim(&mut self) {
        let created = self.metadata.creation_timestamp.take();
        self.metadata = identity_meta(&self.metadata, false);
        self.metadata.creation_timestamp = created;
        self.spec = self.spec.take().map(|s| ServiceSpec {
            type_: s.type_,
            cluster_ip: s.cluster_ip,
            cluster_ips: s.cluster_ips,
            ports: s.ports,
            selector: s.selector,
            session_affinity: s.session_affinity,
            session_affinity_config: s.session_affinity_config,
            ..Default::default()
        });
        self.status = None;
    }

    fn relevant(&self) -> Option<u64> {
        let m = &self.metadata;
        let spec = serde_json::to_vec(&self.spec).ok()?;
        Some(hash_of(&(&m.namespace, &m.name, spec)))
    }

    fn applied(&self) -> Option<Change> {
        let key = convert::key(&self.metadata)?;
        Some(Change::Service(key, Arc::new(self.clone())))
    }

    fn deleted(&self) -> Option<Change> {
        convert::key(&self.metadata).map(Change::ServiceDeleted)
    }

    fn fill(objects: &[Arc<Self>], view: &mut Snapshot) {
        for s in objects {
            if let Some(k) = convert::key(&s.metadata) {
                view.services.insert(k, s.clone());
            }
        }
    }
}

impl Watch for EndpointSlice {
    /// Identity, labels (the Service it belongs to), address type, ports
    /// and per endpoint its addresses, conditions and pod.
    fn trim(&mut self) {
        self.metadata = identity_meta(&self.metadata, true);
        for ep in &mut self.endpoints {
            *ep = Endpoint {
                addresses: std::mem::take(&mut ep.addresses),
                conditions: ep.conditions.take(),
                target_ref: ep.target_ref.take().map(|t| {
                    k8s_openapi::api::core::v1::ObjectReference {
                        kind: t.kind,
                        namespace: t.namespace,
                        name: t.name,
                        ..Default::default()
                    }
                }),
                ..Default::default()
            };
        }
    }

    fn relevant(&self) -> Option<u64> {
        let m = &self.metadata;
        let body = serde_json::to_vec(&(&self.address_type, &self.ports, &self.endpoints)).ok()?;
        Some(hash_of(&(&m.namespace, &m.name, &m.labels, body)))
    }

    fn applied(&self) -> Option<Change> {
        let key = convert::key(&self.metadata)?;
        Some(Change::EndpointSlice(key, Arc::new(self.clone())))
    }

    fn deleted(&self) -> Option<Change> {
        convert::key(&self.metadata).map(Change::EndpointSliceDeleted)
    }

    fn fill(objects: &[Arc<Self>], view: &mut Snapshot) {
        for s in objects {
            if let Some(k) = convert::key(&s.metadata) {
                view.endpoint_slices.insert(k, s.clone());
            }
        }
    }
}

impl Watch for Node {
    /// Every node of the cluster: this one's addresses are `host`, the
    /// others' `remote-node` (and their pod ranges are routed to them).
    fn trim(&mut self) {
        self.metadata = identity_meta(&self.metadata, true);
        self.spec = self.spec.take().map(|s| NodeSpec {
            pod_cidr: s.pod_cidr,
            pod_cidrs: s.pod_cidrs,
            ..Default::default()
        });
        self.status = self.status.take().map(|s| NodeStatus {
            addresses: s.addresses,
            ..Default::default()
        });
    }

    /// Exactly the model's node: name, labels, addresses, pod CIDRs (a
    /// heartbeat or condition update is not sent).
    fn relevant(&self) -> Option<u64> {
        let n = convert::node(self)?;
        Some(hash_of(&(
            &n.name,
            &n.labels,
            &n.addresses,
            &n.pod_cidrs,
            &n.pod_cidrs6,
        )))
    }

    fn applied(&self) -> Option<Change> {
        convert::node(self).map(Change::Node)
    }

    fn deleted(&self) -> Option<Change> {
        self.metadata.name.clone().map(Change::NodeDeleted)
    }

    fn fill(objects: &[Arc<Self>], view: &mut Snapshot) {
        for n in objects.iter().filter_map(|n| convert::node(n)) {
            view.nodes.insert(n.name.clone(), n);
        }
    }
}

fn resource_of<K: Resource<DynamicType = ()>>() -> (String, String) {
    (K::group(&()).to_string(), K::plural(&()).to_string())
}

fn is_watched<K: Resource<DynamicType = ()>>() -> bool {
    let (g, r) = resource_of::<K>();
    WATCHED.iter().any(|w| w.group == g && w.resource == r)
}

/// What one kind's watch contributes to the merged stream.
#[derive(Debug, PartialEq)]
enum Step {
    Changes(Vec<Change>),
    /// A complete list arrived (first list or re-list): the store is whole.
    Listed,
    Nothing,
}

/// Turns one kind's watch events into steps, dropping applies that the
/// predicate finds unchanged. kube's own `predicate_filter` works on
/// decoded objects, where a delete looks like an unchanged apply and would
/// be dropped too: this one sees the events, and never drops a delete.
struct EventFilter<K, P> {
    predicate: P,
    /// The predicate's value for every object seen.
    seen: HashMap<Key, u64>,
    /// During a re-list: the values of the objects listed so far.
    listing: Option<HashMap<Key, u64>>,
    kind: PhantomData<fn(&K)>,
}

/// (namespace, name)
type Key = (Option<String>, Option<String>);

fn key_of<K: Resource>(obj: &K) -> Key {
    let m = obj.meta();
    (m.namespace.clone(), m.name.clone())
}

impl<K: Watch, P: Predicate<K>> EventFilter<K, P> {
    fn new(predicate: P) -> Self {
        Self {
            predicate,
            seen: HashMap::new(),
            listing: None,
            kind: PhantomData,
        }
    }

    fn step(&mut self, ev: watcher::Event<K>) -> Step {
        match ev {
            watcher::Event::Apply(obj) => {
                let key = key_of(&obj);
                if let Some(h) = self.predicate.hash_property(&obj) {
                    if self.seen.insert(key, h) == Some(h) {
                        return Step::Nothing;
                    }
                }
                Step::Changes(obj.applied().into_iter().collect())
            }
            watcher::Event::Delete(obj) => {
                self.seen.remove(&key_of(&obj));
                Step::Changes(obj.deleted().into_iter().collect())
            }
            watcher::Event::Init => {
                self.listing = Some(HashMap::new());
                Step::Nothing
            }
            watcher::Event::InitApply(obj) => {
                if let Some(h) = self.predicate.hash_property(&obj) {
                    self.listing
                        .get_or_insert_with(HashMap::new)
                        .insert(key_of(&obj), h);
                }
                Step::Nothing
            }
            watcher::Event::InitDone => {
                self.seen = self.listing.take().unwrap_or_default();
                Step::Listed
            }
        }
    }
}

type Fill = Box<dyn Fn(&mut Snapshot) + Send + Sync>;

/// The watched kinds: one merged event stream, and how to build a whole
/// view from their stores.
#[derive(Default)]
struct Kinds {
    streams: Vec<BoxStream<'static, (usize, Step)>>,
    fills: Vec<Fill>,
}

impl Kinds {
    /// Adds a reflector over `api`.
    fn watch<K: Watch>(&mut self, api: Api<K>, cfg: watcher::Config) -> Result<()> {
        ensure!(
            is_watched::<K>(),
            "{:?} is not in WATCHED (the RBAC the agent is given)",
            resource_of::<K>()
        );
        let index = self.streams.len();
        let (store, writer): (Store<K>, _) = reflector::store();
        let mut filter = EventFilter::new(K::relevant);
        let plural = K::plural(&()).to_string();
        let stream = watcher(api, cfg)
            .default_backoff()
            .modify(K::trim)
            .reflect(writer)
            .map(move |ev| {
                let step = match ev {
                    Ok(ev) => filter.step(ev),
                    Err(e) => {
                        warn!("kubernetes watch of {plural}: {e} (retrying with backoff)");
                        Step::Nothing
                    }
                };
                (index, step)
            })
            .boxed();
        self.streams.push(stream);
        self.fills
            .push(Box::new(move |view| K::fill(&store.state(), view)));
        Ok(())
    }

    /// The whole view, from the stores.
    fn view(fills: &[Fill]) -> Snapshot {
        let mut view = Snapshot::default();
        for fill in fills {
            fill(&mut view);
        }
        view
    }

    /// Drives every watch and sends what they say. One task polls all the
    /// reflectors, so the stores hold exactly the events seen here: a Resync
    /// built from them never undoes a change sent before it.
    async fn run(self, tx: mpsc::Sender<SourceEvent>) {
        let Kinds { streams, fills } = self;
        let mut listed = vec![false; fills.len()];
        // Events that arrived together make one channel message.
        let mut events = futures::stream::select_all(streams).ready_chunks(256);
        while let Some(chunk) = events.next().await {
            let mut changes = Vec::new();
            let mut relisted = false;
            for (kind, step) in chunk {
                match step {
                    Step::Changes(c) => changes.extend(c),
                    Step::Listed => {
                        listed[kind] = true;
                        relisted = true;
                    }
                    Step::Nothing => {}
                }
            }
            // Until every kind is listed, the first Resync will carry it all;
            // a Resync also covers the changes that came with it (the stores
            // already hold them).
            let ev = if !listed.iter().all(|l| *l) {
                continue;
            } else if relisted {
                SourceEvent::Resync(Self::view(&fills))
            } else if changes.is_empty() {
                continue;
            } else {
                SourceEvent::Changes(changes)
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Recorded API-server responses through a tower-test mock service: the
    //! only mock in the project, because no API server runs on these
    //! machines. The event filter is also fed `watcher::Event`s directly, as
    //! kube-runtime's own tests do.
    use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};
    use tokio::sync::watch;
    use tower_test::mock::{self, Handle};

    use super::*;

    fn pod(name: &str, ip: &str, app: &str, rv: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}, "resourceVersion": rv,
                "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1"}]},
            "spec": {"containers": [{"name": "c", "image": "busybox", "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"podIP": ip, "phase": "Running"}})
    }

    /// A Node as the API server sends it (heartbeat fields included).
    fn node(name: &str, rv: &str, ip: &str, ready: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "resourceVersion": rv,
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
                "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1"}]},
            "spec": {"podCIDR": "10.0.9.0/24", "podCIDRs": ["10.0.9.0/24", "fd00:9::/64"], "providerID": "kind://x"},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name},
                {"type": "InternalIP", "address": "fd00::1"}],
                "conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": "2026-01-01T00:00:00Z"}],
                "nodeInfo": {"kubeletVersion": "v1.35.0"}}})
    }

    /// As `kubectl get svc -o json` shows one (status and all).
    fn service() -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default", "resourceVersion": "40",
                "creationTimestamp": "2026-01-01T00:00:00Z", "uid": "u1",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}],
                "selector": {"app": "web"}, "sessionAffinity": "None"},
            "status": {"loadBalancer": {}}})
    }

    /// As the EndpointSlice controller writes one.
    fn slice(rv: &str, ready: bool) -> Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abcde", "namespace": "default", "resourceVersion": rv,
                "generateName": "web-",
                "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u1"}]},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.0.1"],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": "n1", "zone": "z1",
                "targetRef": {"kind": "Pod", "namespace": "default", "name": "a", "uid": "p1"}}]})
    }

    /// A ClusterNetworkPolicy as the API server sends it (the CRD's
    /// status conditions, managed fields).
    fn cnp(name: &str, rv: &str, priority: i64, condition: &str) -> Value {
        json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name, "resourceVersion": rv, "generation": 1, "uid": format!("u-{name}"),
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"tier": "Admin", "priority": priority,
                "subject": {"namespaces": {"matchLabels": {"team": "x"}}},
                "ingress": [{"name": "deny-all", "action": "Deny",
                    "from": [{"namespaces": {}}]}]},
            "status": {"conditions": [{"type": "Ready", "status": condition, "reason": "r", "message": "m",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    }

    const CNP_PATH: &str = "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies";

    fn list(kind: &str, rv: &str, items: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv}, "items": items}))
            .unwrap()
    }

    fn events(lines: &[Value]) -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| {
                let mut v = serde_json::to_vec(l).unwrap();
                v.push(b'\n');
                v
            })
            .collect()
    }

    /// A scripted API server. Lists by resource (the pods list changes after
    /// the first one). The first pods and nodes watches answer once `go` is
    /// set (the test saw the first Resync), the pods one ending in 410 Gone;
    /// later watches stay open with nothing to say.
    async fn api_server(
        mut handle: Handle<Request<Body>, Response<Body>>,
        go: watch::Receiver<bool>,
        cnp_installed: bool,
    ) {
        let mut pod_lists = 0;
        let (mut pod_watches, mut node_watches, mut slice_watches) = (0, 0, 0);
        let mut cnp_watches = 0;
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let uri = req.uri().to_string();
            let watch = uri.contains("watch=true");
            if uri.starts_with(CNP_PATH) && !cnp_installed {
                // What an API server without the CRD answers.
                let body = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                    "message": "the server could not find the requested resource",
                    "reason": "NotFound", "details": {}, "code": 404});
                let mut r = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
                *r.status_mut() = http::StatusCode::NOT_FOUND;
                send.send_response(r);
                continue;
            }
            let script = if uri.starts_with(CNP_PATH) && watch && cnp_watches == 0 {
                cnp_watches += 1;
                Some(events(&[
                    // Only the status conditions changed: dropped.
                    json!({"type": "MODIFIED", "object": cnp("a", "51", 10, "False")}),
                    json!({"type": "MODIFIED", "object": cnp("a", "52", 20, "False")}),
                    json!({"type": "ADDED", "object": cnp("b", "53", 30, "True")}),
                    json!({"type": "DELETED", "object": cnp("a", "54", 20, "True")}),
                ]))
            } else if uri.starts_with("/api/v1/pods") && watch && pod_watches == 0 {
                pod_watches += 1;
                let mut status_only = pod("a", "10.0.0.1", "web", "11");
                status_only["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
                status_only["metadata"]["annotations"] = json!({"restartedAt": "now"});
                Some(events(&[
                    json!({"type": "ADDED", "object": pod("b", "10.0.0.2", "db", "12")}),
                    json!({"type": "MODIFIED", "object": status_only}),
                    json!({"type": "MODIFIED", "object": pod("a", "10.0.0.1", "web2", "13")}),
                    json!({"type": "DELETED", "object": pod("c", "10.0.0.3", "cache", "14")}),
                    json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure",
                        "code": 410, "reason": "Expired", "message": "too old resource version"}}),
                ]))
            } else if uri.starts_with("/apis/discovery.k8s.io/v1/endpointslices")
                && watch
                && slice_watches == 0
            {
                slice_watches += 1;
                let mut hint_only = slice("31", true);
                hint_only["endpoints"][0]["zone"] = json!("z2");
                Some(events(&[
                    // Only a topology field changed: dropped.
                    json!({"type": "MODIFIED", "object": hint_only}),
                    json!({"type": "MODIFIED", "object": slice("32", false)}),
                ]))
            } else if uri.starts_with("/api/v1/nodes") && watch && node_watches == 0 {
                node_watches += 1;
                Some(events(&[
                    // Only a condition changed: dropped.
                    json!({"type": "MODIFIED", "object": node("n1", "6", "192.0.2.10", "False")}),
                    json!({"type": "MODIFIED", "object": node("n1", "7", "192.0.2.11", "False")}),
                    json!({"type": "DELETED", "object": node("n2", "8", "192.0.2.20", "True")}),
                    json!({"type": "ADDED", "object": node("n3", "9", "192.0.2.30", "True")}),
                ]))
            } else {
                None
            };
            if let Some(body) = script {
                let mut go = go.clone();
                tokio::spawn(async move {
                    let _ = go.wait_for(|g| *g).await;
                    send.send_response(Response::new(Body::from(body)));
                });
                continue;
            }
            let body = if uri.starts_with("/api/v1/pods") && !watch {
                pod_lists += 1;
                if pod_lists == 1 {
                    list(
                        "PodList",
                        "10",
                        vec![
                            pod("a", "10.0.0.1", "web", "9"),
                            pod("c", "10.0.0.3", "cache", "8"),
                        ],
                    )
                } else {
                    // After 410 Gone: `a` was deleted while nobody watched.
                    list("PodList", "20", vec![pod("b", "10.0.0.2", "db", "12")])
                }
            } else if uri.starts_with("/api/v1/namespaces") && !watch {
                list(
                    "NamespaceList",
                    "3",
                    vec![json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": "default", "labels": {"team": "x"}}})],
                )
            } else if uri.starts_with("/apis/networking.k8s.io/v1/networkpolicies") && !watch {
                list(
                    "NetworkPolicyList",
                    "4",
                    vec![
                        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                        "metadata": {"name": "deny", "namespace": "default", "generation": 1, "resourceVersion": "4",
                            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                            "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
                        "spec": {"podSelector": {}}}),
                    ],
                )
            } else if uri.starts_with(CNP_PATH) && !watch {
                list(
                    "ClusterNetworkPolicyList",
                    "50",
                    vec![cnp("a", "50", 10, "True")],
                )
            } else if uri.starts_with("/api/v1/services") && !watch {
                list("ServiceList", "40", vec![service()])
            } else if uri.starts_with("/apis/discovery.k8s.io/v1/endpointslices") && !watch {
                list("EndpointSliceList", "30", vec![slice("30", true)])
            } else if uri.starts_with("/api/v1/nodes") && !watch {
                assert!(
                    !uri.contains("fieldSelector"),
                    "every node is listed: {uri}"
                );
                list(
                    "NodeList",
                    "5",
                    vec![
                        node("n1", "5", "192.0.2.10", "True"),
                        node("n2", "5", "192.0.2.20", "True"),
                    ],
                )
            } else {
                held.push(send);
                continue;
            };
            send.send_response(Response::new(Body::from(body)));
        }
    }

    fn names(s: &Snapshot) -> BTreeSet<String> {
        s.pods.keys().map(|k| k.name.to_string()).collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[tokio::test]
    async fn typed_events_follow_the_watch_and_a_relist_after_410_gone_resyncs() {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (go, go_rx) = watch::channel(false);
        tokio::spawn(api_server(handle, go_rx, true));
        let (tx, mut rx) = mpsc::channel(16);
        let task = spawn(Client::new(svc, "default"), Some("n1".into()), tx)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut recv = async || {
            tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("an event in time")
                .expect("the source runs")
        };

        // First: one Resync, once every kind is listed.
        let SourceEvent::Resync(first) = recv().await else {
            panic!("the first event is a Resync")
        };
        assert_eq!(names(&first), set(&["a", "c"]), "initial list");
        let ns = &first.namespaces["default"];
        assert_eq!(ns.labels["kubernetes.io/metadata.name"], "default");
        assert_eq!(ns.labels["team"], "x");
        let np = &first.policies[&ObjectKey::new("default", "deny")];
        assert_eq!(np.metadata.managed_fields, None, "managed fields stripped");
        assert_eq!(np.metadata.annotations, None);
        assert_eq!(np.metadata.generation, Some(1));
        assert_eq!(
            first.nodes.keys().collect::<Vec<_>>(),
            ["n1", "n2"],
            "every node, not only this one"
        );
        let n2 = &first.nodes["n2"];
        assert_eq!(
            n2.addresses,
            vec![Ipv4Addr::new(192, 0, 2, 20)],
            "IPv4 only"
        );
        assert_eq!(n2.pod_cidrs, vec!["10.0.9.0/24".parse().unwrap()]);
        assert_eq!(n2.labels["kubernetes.io/hostname"], "n2");
        let cnp_a = &first.cluster_policies["a"];
        assert_eq!(
            cnp_a.metadata.managed_fields, None,
            "managed fields stripped"
        );
        assert_eq!(cnp_a.metadata.annotations, None);
        assert_eq!(cnp_a.spec.priority, Some(10));
        assert!(cnp_a.spec.other.is_empty(), "{:?}", cnp_a.spec.other);
        // What the API served parses and validates.
        let parsed = crate::compiler::cluster::ParsedClusterPolicy::parse(cnp_a);
        assert_eq!(parsed.rejected(), None);
        let a = &first.pods[&ObjectKey::new("default", "a")];
        assert_eq!(a.ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(a.ports[0].name.as_deref(), Some("http"));
        let web = ObjectKey::new("default", "web");
        let svc = &first.services[&web];
        assert_eq!(svc.metadata.managed_fields, None);
        assert_eq!(svc.metadata.annotations, None);
        assert!(svc.metadata.creation_timestamp.is_some(), "kept: overlaps");
        assert!(svc.status.is_none());
        assert_eq!(svc.spec.as_ref().unwrap().ip_families, None);
        let es = &first.endpoint_slices[&ObjectKey::new("default", "web-abcde")];
        assert_eq!(es.endpoints[0].zone, None);
        assert_eq!(
            es.endpoints[0].target_ref.as_ref().unwrap().name.as_deref(),
            Some("a")
        );
        // What the API served resolves: the slice's pod behind the port.
        let resolved = crate::service_resolve::resolve(&first);
        assert!(resolved.rejections.is_empty(), "{:?}", resolved.rejections);
        assert_eq!(resolved.frontends.len(), 1);
        assert_eq!(
            resolved.frontends[0].backends[0].address,
            "10.0.0.1:80".parse().unwrap()
        );

        // Then the watch events, as typed changes; the status-only update
        // of `a` and the condition-only update of the node are not among
        // them.
        go.send(true).unwrap();
        let mut view = first.clone();
        let mut changes = Vec::new();
        let last = loop {
            match recv().await {
                SourceEvent::Changes(c) => {
                    c.iter().for_each(|c| view.apply(c));
                    changes.extend(c);
                }
                SourceEvent::Resync(s) => break s,
            }
        };
        let pod_changes: Vec<String> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Pod(p) => Some(format!("{} app={}", p.name, p.labels["app"])),
                Change::PodDeleted(k) => Some(format!("{} deleted", k.name)),
                _ => None,
            })
            .collect();
        assert_eq!(pod_changes, ["b app=db", "a app=web2", "c deleted"]);
        let node_changes: Vec<String> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Node(n) => Some(format!("{} {:?}", n.name, n.addresses)),
                Change::NodeDeleted(n) => Some(format!("{n} deleted")),
                _ => None,
            })
            .collect();
        assert_eq!(
            node_changes,
            ["n1 [192.0.2.11]", "n2 deleted", "n3 [192.0.2.30]"],
            "a condition-only update of n1 is not a change"
        );
        let slice_changes: Vec<bool> = changes
            .iter()
            .filter_map(|c| match c {
                Change::EndpointSlice(_, s) => s.endpoints[0].conditions.as_ref()?.ready,
                _ => None,
            })
            .collect();
        assert_eq!(slice_changes, [false], "the zone-only update is dropped");
        let cnp_changes: Vec<String> = changes
            .iter()
            .filter_map(|c| match c {
                Change::ClusterPolicy(c) => Some(format!(
                    "{} {:?}",
                    c.metadata.name.as_deref().unwrap_or(""),
                    c.spec.priority
                )),
                Change::ClusterPolicyDeleted(n) => Some(format!("{n} deleted")),
                _ => None,
            })
            .collect();
        assert_eq!(
            cnp_changes,
            ["a Some(20)", "b Some(30)", "a deleted"],
            "a status-only update is not a change"
        );
        assert_eq!(names(&view), set(&["a", "b"]));
        // Not ready any more: the frontend stays, with no backend.
        let resolved = crate::service_resolve::resolve(&view);
        assert!(resolved.frontends[0].backends.is_empty());

        // The re-list after 410 Gone: a Resync from every store, which the
        // owner diffs against its view (`a` went while nobody watched).
        assert_eq!(names(&last), set(&["b"]), "the re-list replaced the store");
        assert_eq!(last.nodes.keys().collect::<Vec<_>>(), ["n1", "n3"]);
        assert_eq!(
            last.nodes["n1"].addresses,
            vec![Ipv4Addr::new(192, 0, 2, 11)]
        );
        assert_eq!(last.policies.len(), 1);
        assert_eq!(
            last.cluster_policies.keys().collect::<Vec<_>>(),
            ["b"],
            "the Resync carries the ClusterNetworkPolicy store"
        );
        assert_eq!(
            view.changes_to(&last),
            [Change::PodDeleted(ObjectKey::new("default", "a"))]
        );
        drop(rx);
        task.abort();
    }

    #[tokio::test]
    async fn without_the_cluster_network_policy_crd_every_other_kind_is_still_read() {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (_go, go_rx) = watch::channel(false);
        tokio::spawn(api_server(handle, go_rx, false));
        let (tx, mut rx) = mpsc::channel(16);
        let task = spawn(Client::new(svc, "default"), Some("n1".into()), tx)
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a Resync although the CRD is missing")
            .unwrap();
        let SourceEvent::Resync(first) = first else {
            panic!("the first event is a Resync")
        };
        assert_eq!(names(&first), set(&["a", "c"]));
        assert!(first.cluster_policies.is_empty());
        task.abort();
    }

    fn pod_object(v: Value) -> Pod {
        let mut p: Pod = serde_json::from_value(v).unwrap();
        p.trim();
        p
    }

    #[test]
    fn the_predicate_passes_what_the_agent_reads_and_drops_the_rest() {
        let mut f = EventFilter::new(Pod::relevant);
        let base = pod("a", "10.0.0.1", "web", "1");
        let apply = |f: &mut EventFilter<Pod, _>, v: &Value| {
            f.step(watcher::Event::Apply(pod_object(v.clone())))
        };

        assert_eq!(f.step(watcher::Event::Init), Step::Nothing);
        assert_eq!(
            f.step(watcher::Event::InitApply(pod_object(base.clone()))),
            Step::Nothing
        );
        assert_eq!(f.step(watcher::Event::InitDone), Step::Listed);

        // Status-only, annotations, resourceVersion, image: nothing read.
        let mut v = base.clone();
        v["metadata"]["resourceVersion"] = json!("2");
        v["metadata"]["annotations"] = json!({"x": "y"});
        v["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        v["status"]["startTime"] = json!("2026-01-01T00:00:00Z");
        v["spec"]["containers"][0]["image"] = json!("busybox:2");
        assert_eq!(apply(&mut f, &v), Step::Nothing);

        // What the agent reads: each passes once.
        let mut cases = Vec::new();
        let mut v = base.clone();
        v["metadata"]["labels"]["tier"] = json!("1");
        cases.push(v.clone());
        v["status"]["podIP"] = json!("10.0.0.9");
        cases.push(v.clone());
        v["spec"]["hostNetwork"] = json!(true);
        cases.push(v.clone());
        v["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(81);
        cases.push(v.clone());
        v["status"]["phase"] = json!("Succeeded");
        cases.push(v.clone());
        for v in &cases {
            let Step::Changes(c) = apply(&mut f, v) else {
                panic!("{v} was dropped")
            };
            assert!(matches!(&c[..], [Change::Pod(_)]), "{c:?}");
            assert_eq!(apply(&mut f, v), Step::Nothing, "the same again");
        }

        // A delete always passes, though the object is unchanged.
        assert_eq!(
            f.step(watcher::Event::Delete(pod_object(cases[4].clone()))),
            Step::Changes(vec![Change::PodDeleted(ObjectKey::new("default", "a"))])
        );
        // ... and forgets the object: the same pod again is news.
        assert!(matches!(apply(&mut f, &cases[4]), Step::Changes(_)));
    }

    #[test]
    fn trimming_keeps_what_the_agent_reads() {
        let mut v = pod("a", "10.0.0.1", "web", "1");
        v["metadata"]["annotations"] = json!({"x": "y"});
        v["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "b"}]);
        let full: Pod = serde_json::from_value(v).unwrap();
        let mut trimmed = full.clone();
        trimmed.trim();
        assert_eq!(trimmed.metadata.managed_fields, None);
        assert_eq!(trimmed.metadata.annotations, None);
        assert_eq!(trimmed.spec.as_ref().unwrap().containers[0].env, None);
        assert_eq!(trimmed.spec.as_ref().unwrap().containers[0].image, None);
        assert_eq!(convert::pod(&trimmed), convert::pod(&full));

        let ns: Namespace = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "n", "labels": {"a": "b"}, "annotations": {"palisade.dev/audit": "true", "big": "x"},
                "managedFields": [{"manager": "m"}]}}))
        .unwrap();
        let mut t = ns.clone();
        t.trim();
        assert_eq!(t.metadata.annotations.as_ref().unwrap().len(), 1);
        assert_eq!(t.metadata.managed_fields, None);
        assert_eq!(convert::namespace(&t), convert::namespace(&ns));
    }

    #[test]
    fn every_watched_kind_is_in_the_rbac_table() {
        assert!(is_watched::<Pod>());
        assert!(is_watched::<Namespace>());
        assert!(is_watched::<NetworkPolicy>());
        assert!(is_watched::<Node>());
        assert!(is_watched::<Service>());
        assert!(is_watched::<EndpointSlice>());
        assert!(is_watched::<ClusterNetworkPolicy>());
        assert!(!is_watched::<k8s_openapi::api::core::v1::Secret>());
        assert_eq!(
            WATCHED.len(),
            7,
            "a resource in WATCHED that nothing watches"
        );
    }
}
