//! What the sources tell the agent's owner task: typed changes to the
//! cluster view. A source never applies anything itself; it sends
//! [`SourceEvent`]s, and the owner feeds them to the compiler.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::{
    core::v1::Service, discovery::v1::EndpointSlice, networking::v1::NetworkPolicy,
};

use crate::{
    cnp::ClusterNetworkPolicy,
    model::{Namespace, Node, ObjectKey, Pod},
};

/// One object added, changed or deleted.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Namespace(Namespace),
    NamespaceDeleted(String),
    /// Shared with the source's view and the model: one copy of a pod's
    /// labels and ports however many views hold it.
    Pod(Arc<Pod>),
    PodDeleted(ObjectKey),
    /// The raw API object: the compiler parses and validates it once, on
    /// arrival.
    Policy(ObjectKey, Arc<NetworkPolicy>),
    PolicyDeleted(ObjectKey),
    /// This node's addresses as the source knows them (replaces the
    /// previous set; the agent's configured addresses are kept besides).
    NodeAddresses(Vec<Ipv4Addr>),
    /// A node of the cluster added or changed (this node's addresses are
    /// `host`, every other node's `remote-node`).
    Node(Node),
    NodeDeleted(String),
    /// A ClusterNetworkPolicy (cluster-scoped, by name), parsed on arrival.
    ClusterPolicy(Arc<ClusterNetworkPolicy>),
    ClusterPolicyDeleted(String),
    /// Services and EndpointSlices as the API gives them: resolved into
    /// frontends by `service_resolve`, which reports what it rejects.
    Service(ObjectKey, Arc<Service>),
    ServiceDeleted(ObjectKey),
    EndpointSlice(ObjectKey, Arc<EndpointSlice>),
    EndpointSliceDeleted(ObjectKey),
}

/// A complete view from one source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectKey, Arc<Pod>>,
    pub policies: BTreeMap<ObjectKey, Arc<NetworkPolicy>>,
    /// Node addresses the source knows (Kubernetes: this Node's InternalIPs).
    pub host_ips: Vec<Ipv4Addr>,
    /// The cluster's nodes, by name.
    pub nodes: BTreeMap<String, Node>,
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    /// Standalone mode: a selector Service without given EndpointSlices
    /// gets the ones the EndpointSlice controller would write (a cluster
    /// has that controller; its slices arrive through the source).
    pub derive_endpoint_slices: bool,
    /// Objects the source could not read; everything else is in the snapshot.
    pub errors: Vec<String>,
    /// ClusterNetworkPolicies by name.
    pub cluster_policies: BTreeMap<String, Arc<ClusterNetworkPolicy>>,
}

/// What a source sends to the owner.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// Changes, applied in order.
    Changes(Vec<Change>),
    /// A complete view (first list, re-list after a watch expired, manifest
    /// rescan): objects of the previous view that are not in it are deleted.
    Resync(Snapshot),
}

/// Adds, updates and deletes that turn `old` into `new` (deletes first, so
/// a key never names two objects at once).
fn diff_maps<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    deleted: impl Fn(&K) -> Change,
    upserted: impl Fn(&K, &V) -> Change,
    out: &mut Vec<Change>,
) {
    out.extend(old.keys().filter(|k| !new.contains_key(*k)).map(&deleted));
    out.extend(
        new.iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|(k, v)| upserted(k, v)),
    );
}

impl Snapshot {
    /// Applies one change to this view.
    pub fn apply(&mut self, c: &Change) {
        match c {
            Change::Namespace(n) => {
                self.namespaces.insert(n.name.clone(), n.clone());
            }
            Change::NamespaceDeleted(name) => {
                self.namespaces.remove(name);
            }
            Change::Pod(p) => {
                self.pods
                    .insert(ObjectKey::new(&p.namespace, &p.name), p.clone());
            }
            Change::PodDeleted(k) => {
                self.pods.remove(k);
            }
            Change::Policy(k, np) => {
                self.policies.insert(k.clone(), np.clone());
            }
            Change::PolicyDeleted(k) => {
                self.policies.remove(k);
            }
            Change::NodeAddresses(ips) => self.host_ips = ips.clone(),
            Change::Node(n) => {
                self.nodes.insert(n.name.clone(), n.clone());
            }
            Change::NodeDeleted(name) => {
                self.nodes.remove(name);
            }
            Change::ClusterPolicy(c) => {
                let name = c.metadata.name.clone().unwrap_or_default();
                self.cluster_policies.insert(name, c.clone());
            }
            Change::ClusterPolicyDeleted(name) => {
                self.cluster_policies.remove(name);
            }
            Change::Service(k, s) => {
                self.services.insert(k.clone(), s.clone());
            }
            Change::ServiceDeleted(k) => {
                self.services.remove(k);
            }
            Change::EndpointSlice(k, s) => {
                self.endpoint_slices.insert(k.clone(), s.clone());
            }
            Change::EndpointSliceDeleted(k) => {
                self.endpoint_slices.remove(k);
            }
        }
    }

    /// The changes that turn this view into `next`. Namespaces come first
    /// and policies last, so pods and policies meet the namespace labels
    /// they belong with.
    pub fn changes_to(&self, next: &Snapshot) -> Vec<Change> {
        let mut out = Vec::new();
        diff_maps(
            &self.namespaces,
            &next.namespaces,
            |k| Change::NamespaceDeleted(k.clone()),
            |_, v| Change::Namespace(v.clone()),
            &mut out,
        );
        diff_maps(
            &self.pods,
            &next.pods,
            |k| Change::PodDeleted(k.clone()),
            |_, v| Change::Pod(v.clone()),
            &mut out,
        );
        diff_maps(
            &self.policies,
            &next.policies,
            |k| Change::PolicyDeleted(k.clone()),
            |k, v| Change::Policy(k.clone(), v.clone()),
            &mut out,
        );
        diff_maps(
            &self.nodes,
            &next.nodes,
            |k| Change::NodeDeleted(k.clone()),
            |_, v| Change::Node(v.clone()),
            &mut out,
        );
        diff_maps(
            &self.cluster_policies,
            &next.cluster_policies,
            |k| Change::ClusterPolicyDeleted(k.clone()),
            |_, v| Change::ClusterPolicy(v.clone()),
            &mut out,
        );
        diff_maps(
            &self.services,
            &next.services,
            |k| Change::ServiceDeleted(k.clone()),
            |k, v| Change::Service(k.clone(), v.clone()),
            &mut out,
        );
        diff_maps(
            &self.endpoint_slices,
            &next.endpoint_slices,
            |k| Change::EndpointSliceDeleted(k.clone()),
            |k, v| Change::EndpointSlice(k.clone(), v.clone()),
            &mut out,
        );
        if self.host_ips != next.host_ips {
            out.push(Change::NodeAddresses(next.host_ips.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, app: &str) -> Pod {
        Pod {
            namespace: "ns".into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ip: None,
            ipv6: None,
            host_network: false,
            ports: Vec::new(),
        }
    }

    #[test]
    fn a_resync_becomes_the_changes_between_two_views() {
        let mut a = Snapshot::default();
        a.pods
            .insert(ObjectKey::new("ns", "x"), pod("x", "1").into());
        a.pods
            .insert(ObjectKey::new("ns", "y"), pod("y", "1").into());
        let mut b = a.clone();
        assert!(a.changes_to(&b).is_empty(), "same view, no change");

        b.pods.remove(&ObjectKey::new("ns", "x"));
        b.pods
            .insert(ObjectKey::new("ns", "y"), pod("y", "2").into());
        b.host_ips = vec![Ipv4Addr::new(192, 0, 2, 1)];
        let changes = a.changes_to(&b);
        let mut replayed = a.clone();
        for c in &changes {
            replayed.apply(c);
        }
        assert_eq!(replayed, b, "applying the changes gives the new view");
        assert_eq!(
            changes,
            vec![
                Change::PodDeleted(ObjectKey::new("ns", "x")),
                Change::Pod(pod("y", "2").into()),
                Change::NodeAddresses(vec![Ipv4Addr::new(192, 0, 2, 1)]),
            ]
        );
    }
}
