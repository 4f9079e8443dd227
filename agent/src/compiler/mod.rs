//! NetworkPolicy compiler: from the model to the desired map contents.
//!
//! Two ways to the same result: [`Compiler::compile`], a deterministic
//! function of the whole model (plus the allocation tables that keep
//! identities and cookies stable across compiles), kept as the oracle; and
//! [`engine::Engine`], which owns the model and keeps the same map state
//! up to date change by change (a property test holds the two equal after
//! every change).
//!
//! Modules, by phase: [`parse`] (a NetworkPolicy into typed rules, once,
//! on arrival), [`identities`] (label and CIDR identities), [`peers`]
//! (selectors → identity sets), [`emit`] (a rule's policy entries),
//! [`endpoints`] (one endpoint's selection, flags and entries),
//! [`ipcache`] (addresses → identities), [`engine`] (incremental) and
//! [`view`] (what flow logs, trace and status read).
//!
//! # What it produces
//!
//! * **Identities.** `host` (1), `world` (2) and `any-pod` (3, a policy
//!   peer only, see below) are reserved. Every distinct
//!   (namespace, namespace labels, pod labels) set of a non-hostNetwork pod
//!   gets a label identity; every distinct ipBlock prefix (`cidr` and each
//!   `except`) of an accepted policy gets a CIDR identity, except
//!   `0.0.0.0/0`, which is `world`; and every pod address inside an
//!   ipBlock of an egress rule with a named port gets the CIDR identity of
//!   its /32 (see named ports below). Label identities are numbered from
//!   `IDENTITY_FIRST_DYNAMIC` (256), CIDR identities from
//!   `IDENTITY_FIRST_CIDR` (0x0080_0000): disjoint ranges, so the kernel
//!   tells a pod peer from an address by its number. Numbers come from one
//!   [`Allocator`] per range and stay the same as long as their key is in
//!   use.
//! * **ipcache.** `0.0.0.0/0` → world; every ipBlock prefix → its CIDR
//!   identity; every non-hostNetwork pod address (/32) → its label identity,
//!   with `cidr_identity` = the identity of the longest ipBlock prefix that
//!   contains it (world if none); every node address (/32) → host. On the
//!   same /32, a node address beats a pod, a local pod beats a remote one,
//!   and a pod beats an ipBlock prefix (whose identity then becomes the
//!   pod's `cidr_identity`).
//! * **Endpoints.** One entry per local endpoint, with the enforced flags of
//!   the policies that select it and the audit flag.
//! * **Policy.** For every local endpoint, the union of the allow entries of
//!   every accepted policy that selects it, in the directions of the
//!   policy's effective `policyTypes`. A rule without peers allows
//!   `IDENTITY_ANY`; a rule one of whose peers matches every pod of the
//!   cluster (see "any pod" below) allows `IDENTITY_ANY_POD` once instead of
//!   every label identity.
//!
//! # Decisions on points the API leaves open
//!
//! * `policyTypes` absent or empty: `Ingress`, plus `Egress` when
//!   `spec.egress` has at least one rule (as the API server's defaulting:
//!   `egress: []` does not count). Rules of a direction that is not in the
//!   effective `policyTypes` are validated but ignored.
//! * A policy that fails validation is listed in [`Compiled::rejected`] and
//!   contributes no allow entry, no cookie and no ipBlock prefix. It still
//!   **isolates** the pods it selects in its `policyTypes` directions (fail
//!   closed: a broken policy never opens traffic that the cluster meant to
//!   restrict, nor silently drops an isolation). If the `podSelector` itself
//!   is invalid it isolates every pod of its namespace; unknown
//!   `policyTypes` values make it isolate both directions.
//! * Each family's ipBlocks match addresses of that family only, as the
//!   API says: IPv6 prefixes are CIDR identities in ipcache6 like IPv4 ones
//!   in the ipcache, and each family has its own world (`0.0.0.0/0` is
//!   `world`, `::/0` is `world-ipv6`, `IDENTITY_WORLD6`), so an IPv4 block
//!   (`0.0.0.0/0` included) never admits an IPv6 address nor the reverse.
//!   A pod's IPv6 address carries the longest IPv6 prefix containing it as
//!   its `cidr_identity`. Not yet for IPv6: the per-address CIDR identity
//!   of a pod inside a named-port egress ipBlock (such a rule admits no
//!   IPv6 pod: closed, not open).
//! * Non-canonical CIDRs (`10.0.0.1/8`) are accepted and masked, as Go's
//!   `net.ParseCIDR` does. An `except` must be a strict subset of `cidr`.
//! * A local endpoint whose pod is not in the model (yet) is treated as a
//!   pod with no labels and no container ports in the endpoint's namespace:
//!   it gets the label identity of that empty label set, it is a peer of
//!   selectors that match no labels, and it is selected (and so isolated) by
//!   policies whose `podSelector` matches an empty label set (`{}`,
//!   `NotIn`, `DoesNotExist`). For a local pod, the endpoint's address is
//!   authoritative over `status.podIP`.
//! * A local endpoint whose pod is hostNetwork (should not happen: the CNI
//!   plugin is not called for them) is never selected and carries the host
//!   identity.
//! * Namespace labels always include `kubernetes.io/metadata.name: <name>`
//!   (as the API server guarantees), also for namespaces the model does not
//!   know yet.
//! * Named ports: an ingress rule resolves the name (and protocol) against
//!   the selected local pod's own container ports. An egress rule resolves
//!   it per destination: for every peer label identity, the ports of that
//!   name on the pods holding that identity, keyed by the identity. A named
//!   port in an egress rule *without* peers resolves over every pod of the
//!   cluster (what upstream's "egress on one named port" e2e test expects).
//!   On an ipBlock peer it resolves on the destination pod when the
//!   destination is a pod address (as kube-network-policies does), and to
//!   nothing for other addresses: every (non-hostNetwork, non-node) pod
//!   address inside `cidr` and outside `except` of such a block gets a CIDR
//!   identity of its own /32, which becomes its `cidr_identity` and which
//!   every ipBlock peer containing the address includes; the rule allows
//!   that identity on that pod's own number for the name. A label identity is keyed by
//!   the pod's named container ports too, so pods with the same labels but
//!   a name mapped to different numbers get different identities, and each
//!   only its own port. An unresolvable name produces no entry (not an error).
//! * **Any pod.** A peer with `namespaceSelector` present and empty (`{}`)
//!   and `podSelector` absent or empty matches every non-hostNetwork pod of
//!   the cluster, decided syntactically (not by looking at which label
//!   identities exist). A rule with such a peer gets the peer identity
//!   `IDENTITY_ANY_POD` (plus the CIDR identities of its ipBlock peers; its
//!   other pod peers add nothing): one entry per (endpoint, port) instead of
//!   one per label identity, so a pod's CNI ADD writes a handful of entries
//!   for "allow DNS to every pod" rather than one per identity. The kernel
//!   looks `IDENTITY_ANY_POD` up after the exact peer and its CIDR identity
//!   missed, only for a peer whose identity is a label identity: host,
//!   world, node addresses and other addresses (CIDR identities) never
//!   match it, exactly as they never were label identities. Egress named
//!   ports of such a rule still resolve per destination: they keep one
//!   entry per label identity (and port number), as a rule without peers
//!   does; ingress named ports resolve on the selected pod, so one entry.
//!   When the exact peer also has an entry for the port, it decides (first
//!   hit), so the rule reported for a flow may be another allowing rule
//!   than with per-identity entries (which kept the lowest cookie); the
//!   verdict is the same.
//! * Two rules producing the same (prefix, key) keep the lowest cookie.
//! * Policies are parsed when they enter the model ([`Model::add_policy`]);
//!   the model keeps the typed result, never the API object.
//! * Two local endpoints of one pod (a sandbox replaced before the old one
//!   is deleted): the one with the greatest container id gives the pod its
//!   address; each keeps its own entries. Endpoint ids are unique per node.
pub mod cluster;
pub mod emit;
pub mod endpoints;
pub mod engine;
pub mod identities;
pub mod ipcache;
pub mod parse;
pub mod peers;
pub mod tier_walk;
pub mod tiers;
pub mod view;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnetwork::IpNetwork;
use palisade_common::{
    EndpointInfo, IpcacheValue, DIR_INGRESS, IDENTITY_ANY_POD, IDENTITY_HOST, IDENTITY_REMOTE_NODE,
    IDENTITY_WORLD, IDENTITY_WORLD6,
};
use palisade_dataplane::MapState;

pub use self::{
    emit::split_port_range,
    engine::{Engine, Touched},
    parse::ParsedPolicy,
    view::{Names, View},
};
use self::{
    emit::Destinations,
    endpoints::{compile_endpoint, EndpointPod},
    identities::{namespace_labels, IdentityKey, LabelSet},
    ipcache::{longest_cidr, worlds},
    parse::Policy,
    peers::{
        host6_net, host_net, named_block6_contains, named_block_contains, resolve_peers, PeerSet,
    },
};
use crate::{
    identity::Allocator,
    model::{ContainerPort, Labels, Model, ObjectKey},
};

/// The label every namespace carries, with its name as value.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Which policy rule a cookie in a policy entry stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy: ObjectKey,
    /// palisade_common::DIR_INGRESS / DIR_EGRESS
    pub direction: u8,
    /// Index in spec.ingress / spec.egress.
    pub rule: usize,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = if self.direction == DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        };
        write!(f, "{} {dir}[{}]", self.policy, self.rule)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    Reserved(&'static str),
    /// A distinct (namespace labels, pod labels) set.
    Labels {
        namespace: String,
        namespace_labels: Labels,
        pod_labels: Labels,
    },
    Cidr(IpNetwork),
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub maps: MapState,
    /// Every cookie of every rule of every accepted policy (whether or not
    /// the rule produced entries on this node).
    pub cookies: HashMap<u32, RuleRef>,
    /// Every identity in use: host, world, any-pod, label and CIDR
    /// identities.
    pub identities: HashMap<u32, IdentitySource>,
    /// Policies that could not be compiled, with the reason. Every other
    /// policy is compiled and enforced as usual.
    pub rejected: BTreeMap<ObjectKey, String>,
    /// For every local pod (by pod key), the policies that select it,
    /// accepted and rejected (a rejected one only isolates).
    pub selected_by: BTreeMap<ObjectKey, Vec<ObjectKey>>,
    /// (endpoint id, direction) -> the policies (accepted and rejected)
    /// that isolate the endpoint in that direction, sorted. Only enforced
    /// directions have an entry.
    pub isolated_by: BTreeMap<(u32, u8), Vec<ObjectKey>>,
    /// Every cookie of every rule of every accepted ClusterNetworkPolicy
    /// (from `tiers::CLUSTER_COOKIE_BASE`).
    pub cluster_cookies: HashMap<u32, tiers::ClusterRuleRef>,
    /// ClusterNetworkPolicies that could not be compiled, with the reason
    /// (they contribute nothing).
    pub cluster_rejected: BTreeMap<String, String>,
    /// Accepted ClusterNetworkPolicies sharing a tier and priority with
    /// another: the warning.
    pub cluster_warnings: BTreeMap<String, String>,
}

impl Compiled {
    /// The policies that isolate `endpoint_id` in `direction`: what a
    /// NO_POLICY_MATCH drop is attributed to.
    pub fn isolating(&self, endpoint_id: u32, direction: u8) -> &[ObjectKey] {
        self.isolated_by
            .get(&(endpoint_id, direction))
            .map_or(&[], Vec::as_slice)
    }
}

/// Keeps identity and cookie numbers stable across compiles, so that a
/// change touches only the entries it really changes.
#[derive(Debug)]
pub struct Compiler {
    /// Label identities, from `IDENTITY_FIRST_DYNAMIC`.
    label_ids: Allocator<IdentityKey>,
    /// CIDR identities, from `IDENTITY_FIRST_CIDR`.
    cidr_ids: Allocator<IdentityKey>,
    cookies: Allocator<RuleRef>,
}

impl Default for Compiler {
    fn default() -> Self {
        Self {
            label_ids: Allocator::label_identities(),
            cidr_ids: Allocator::cidr_identities(),
            cookies: Allocator::cookies(),
        }
    }
}

static NO_LABELS: Labels = Labels::new();

/// A pod as the compiler sees it (model pods plus unknown local endpoints).
struct PodView<'a> {
    labels: &'a Labels,
    ip: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
    host_network: bool,
    ports: &'a [ContainerPort],
    local: bool,
}

/// Named ports of the full compile's identities.
struct FullDestinations<'a> {
    labels_by_id: &'a BTreeMap<u32, LabelSet>,
    /// CIDR identity of a pod address -> the label identity of that pod.
    addresses: HashMap<u32, u32>,
}

impl Destinations for FullDestinations<'_> {
    fn named(&self, id: u32, name: &str, proto: u8, f: &mut dyn FnMut(u16)) {
        let id = self.addresses.get(&id).copied().unwrap_or(id);
        if let Some(set) = self.labels_by_id.get(&id) {
            set.named(name, proto).for_each(f);
        }
    }

    fn each_label_id(&self, f: &mut dyn FnMut(u32)) {
        self.labels_by_id.keys().for_each(|id| f(*id));
    }
}

impl Compiler {
    pub fn new() -> Self {
        Self::default()
    }

    /// A compiler that numbers as the given tables do (for comparing a full
    /// compile with the engine's state number for number).
    #[cfg(test)]
    pub(crate) fn seeded(
        identities: impl IntoIterator<Item = (IdentityKey, u32)>,
        cookies: impl IntoIterator<Item = (RuleRef, u32)>,
    ) -> Self {
        let (cidrs, labels): (Vec<_>, Vec<_>) = identities
            .into_iter()
            .partition(|(k, _)| matches!(k, IdentityKey::Cidr(_)));
        Self {
            label_ids: Allocator::seeded(palisade_common::IDENTITY_FIRST_DYNAMIC, labels),
            cidr_ids: Allocator::seeded(palisade_common::IDENTITY_FIRST_CIDR, cidrs),
            cookies: Allocator::seeded(1, cookies),
        }
    }

    pub fn compile(&mut self, model: &Model) -> Compiled {
        let mut out = Compiled::default();

        // Pods, with the local endpoints' view applied.
        let mut pods: BTreeMap<ObjectKey, PodView> = model
            .pods
            .iter()
            .map(|(k, p)| {
                let view = PodView {
                    labels: &p.labels,
                    ip: p.ip,
                    ip6: p.ipv6,
                    host_network: p.host_network,
                    ports: &p.ports,
                    local: false,
                };
                (k.clone(), view)
            })
            .collect();
        for ep in model.endpoints.values() {
            let view = pods.entry(ep.key.clone()).or_insert(PodView {
                labels: &NO_LABELS,
                ip: None,
                ip6: None,
                host_network: false,
                ports: &[],
                local: true,
            });
            if !view.host_network {
                // An IPv6-only endpoint has no IPv4 address to claim.
                view.ip = Some(ep.ipv4).filter(|ip| !ip.is_unspecified());
                // The registration's addresses are the local pod's, as for IPv4.
                view.ip6 = ep.ipv6;
                view.local = true;
            }
        }

        // Policies (parsed when they entered the model).
        let mut accepted: Vec<&Policy> = Vec::new();
        for (key, pp) in &model.policies {
            match &**pp {
                ParsedPolicy::Accepted(p) => accepted.push(p),
                ParsedPolicy::Rejected { reason, .. } => {
                    out.rejected.insert(key.clone(), reason.clone());
                }
            }
        }

        // ClusterNetworkPolicies (parsed when they entered the model), in
        // evaluation order.
        for (name, cp) in &model.cluster_policies {
            if let Some(reason) = cp.rejected() {
                out.cluster_rejected
                    .insert(name.clone(), reason.to_string());
            }
        }
        let cluster = tiers::ordered(model.cluster_policies.values().filter_map(|p| p.accepted()));
        out.cluster_warnings = tiers::equal_priority_warnings(cluster.iter().copied());

        // Label identities.
        let mut ns_labels: HashMap<&str, Labels> = HashMap::new();
        let mut pod_identity: BTreeMap<&ObjectKey, u32> = BTreeMap::new();
        let mut labels_by_id: BTreeMap<u32, LabelSet> = BTreeMap::new();
        for (key, view) in &pods {
            if view.host_network {
                continue;
            }
            let nsl = ns_labels
                .entry(&key.namespace)
                .or_insert_with(|| namespace_labels(model, &key.namespace))
                .clone();
            let set = LabelSet::new(&key.namespace, nsl, view.labels, view.ports);
            let id = self.label_ids.assign(&IdentityKey::Labels(set.clone()));
            pod_identity.insert(key, id);
            labels_by_id.entry(id).or_insert(set);
        }

        // Pod addresses: on one address a local pod beats a remote one,
        // then the first by key.
        let mut pod_at: BTreeMap<Ipv4Addr, &ObjectKey> = BTreeMap::new();
        let mut pod_at6: BTreeMap<Ipv6Addr, &ObjectKey> = BTreeMap::new();
        for local in [true, false] {
            for (key, view) in pods
                .iter()
                .filter(|(_, v)| v.local == local && !v.host_network)
            {
                if let Some(ip) = view.ip {
                    pod_at.entry(ip).or_insert(key);
                }
                if let Some(ip) = view.ip6 {
                    pod_at6.entry(ip).or_insert(key);
                }
            }
        }

        // CIDR identities: every prefix of every accepted policy, and the
        // /32 of every pod address in a named-port egress ipBlock.
        let mut prefixes: BTreeSet<IpNetwork> = BTreeSet::new();
        for p in &accepted {
            for r in &p.rules {
                prefixes.extend(r.prefixes());
            }
        }
        let node_ip =
            |ip: &Ipv4Addr| model.host_ips.contains(ip) || model.remote_node_ips.contains(ip);
        for ip in pod_at.keys() {
            if !node_ip(ip)
                && accepted
                    .iter()
                    .any(|p| p.rules.iter().any(|r| named_block_contains(r, *ip)))
            {
                prefixes.insert(IpNetwork::V4(host_net(*ip)));
            }
        }
        let node_ip6 =
            |ip: &Ipv6Addr| model.host_ips6.contains(ip) || model.remote_node_ips6.contains(ip);
        for ip in pod_at6.keys() {
            if !node_ip6(ip)
                && accepted
                    .iter()
                    .any(|p| p.rules.iter().any(|r| named_block6_contains(r, *ip)))
            {
                prefixes.insert(IpNetwork::V6(host6_net(*ip)));
            }
        }
        let mut cidr_ids: HashMap<IpNetwork, u32> = HashMap::from(worlds());
        for net in &prefixes {
            if !cidr_ids.contains_key(net) {
                cidr_ids.insert(*net, self.cidr_ids.assign(&IdentityKey::Cidr(*net)));
            }
        }
        self.label_ids.finish_round();
        self.cidr_ids.finish_round();

        out.identities
            .insert(IDENTITY_HOST, IdentitySource::Reserved("host"));
        out.identities
            .insert(IDENTITY_WORLD, IdentitySource::Reserved("world"));
        out.identities
            .insert(IDENTITY_WORLD6, IdentitySource::Reserved("world-ipv6"));
        out.identities
            .insert(IDENTITY_ANY_POD, IdentitySource::Reserved("any-pod"));
        out.identities.insert(
            IDENTITY_REMOTE_NODE,
            IdentitySource::Reserved("remote-node"),
        );
        for (id, set) in &labels_by_id {
            out.identities.insert(*id, set.source());
        }
        for (net, id) in &cidr_ids {
            if *id != IDENTITY_WORLD && *id != IDENTITY_WORLD6 {
                out.identities.insert(*id, IdentitySource::Cidr(*net));
            }
        }

        // ipcache, lowest precedence first.
        for (net, id) in &cidr_ids {
            let v = IpcacheValue {
                identity: *id,
                cidr_identity: *id,
            };
            match net {
                IpNetwork::V4(n) => out.maps.ipcache.insert((n.network(), n.prefix().into()), v),
                IpNetwork::V6(n) => out
                    .maps
                    .ipcache6
                    .insert((n.network(), n.prefix().into()), v),
            };
        }
        let ipcache = &mut out.maps.ipcache;
        for (ip, key) in &pod_at {
            ipcache.insert(
                (*ip, 32),
                IpcacheValue {
                    identity: pod_identity[key],
                    cidr_identity: longest_cidr(&cidr_ids, *ip),
                },
            );
        }
        // IPv6 pod addresses, with the longest IPv6 ipBlock prefix that
        // contains them (`world-ipv6` if none): an IPv4 ipBlock, `0.0.0.0/0`
        // included, never matches an IPv6 pod address, nor the reverse.
        for (ip, key) in &pod_at6 {
            out.maps.ipcache6.insert(
                (*ip, 128),
                IpcacheValue {
                    identity: pod_identity[key],
                    cidr_identity: longest_cidr(&cidr_ids, *ip),
                },
            );
        }
        // Nodes' IPv6 addresses, as their IPv4 ones below.
        for (ips, identity) in [
            (&model.remote_node_ips6, IDENTITY_REMOTE_NODE),
            (&model.host_ips6, IDENTITY_HOST),
        ] {
            for ip in ips {
                out.maps.ipcache6.insert(
                    (*ip, 128),
                    IpcacheValue {
                        identity,
                        cidr_identity: longest_cidr(&cidr_ids, *ip),
                    },
                );
            }
        }
        // Another node's address is that node's, whatever pod claims it
        // (host-network pods of that node): only ipBlocks match it.
        for ip in &model.remote_node_ips {
            ipcache.insert(
                (*ip, 32),
                IpcacheValue {
                    identity: IDENTITY_REMOTE_NODE,
                    cidr_identity: longest_cidr(&cidr_ids, *ip),
                },
            );
        }
        // This node's addresses: `host`, with the CIDR identity a
        // ClusterNetworkPolicy's deny of them is found under
        // (`decision::own_node_checked`).
        for ip in &model.host_ips {
            ipcache.insert(
                (*ip, 32),
                IpcacheValue {
                    identity: IDENTITY_HOST,
                    cidr_identity: longest_cidr(&cidr_ids, *ip),
                },
            );
        }

        // Cookies, and every rule's peers, resolved once.
        let mut rules: HashMap<ObjectKey, Vec<(u32, PeerSet)>> = HashMap::new();
        for p in &accepted {
            for r in &p.rules {
                let rr = RuleRef {
                    policy: p.key.clone(),
                    direction: r.direction,
                    rule: r.index,
                };
                let c = self.cookies.assign(&rr);
                out.cookies.insert(c, rr);
                let peers = resolve_peers(
                    &p.key.namespace,
                    r,
                    labels_by_id.iter().map(|(id, s)| (*id, s)),
                    cidr_ids.iter().map(|(n, id)| (*n, *id)),
                );
                rules.entry(p.key.clone()).or_default().push((c, peers));
            }
        }
        self.cookies.finish_round();

        // Endpoints and their policy entries.
        let addresses = cidr_ids
            .iter()
            .filter_map(|(net, id)| match net {
                IpNetwork::V4(n) if n.prefix() == 32 && !node_ip(&n.ip()) => {
                    Some((*id, pod_identity[pod_at.get(&n.ip())?]))
                }
                IpNetwork::V6(n) if n.prefix() == 128 && !node_ip6(&n.ip()) => {
                    Some((*id, pod_identity[pod_at6.get(&n.ip())?]))
                }
                _ => None,
            })
            .collect();
        let dest = FullDestinations {
            labels_by_id: &labels_by_id,
            addresses,
        };
        for ep in model.endpoints.values() {
            let view = &pods[&ep.key];
            let audit = model.audit
                || model
                    .namespaces
                    .get(&*ep.key.namespace)
                    .is_some_and(|n| n.audit);
            let ns = &ep.key.namespace;
            let in_ns = model
                .policies
                .range(ObjectKey::new(&**ns, "")..)
                .take_while(|(k, _)| k.namespace == *ns)
                .map(|(k, p)| (k, &**p));
            let pod = EndpointPod {
                labels: view.labels,
                ports: view.ports,
                host_network: view.host_network,
                labels_pending: endpoints::labels_pending(
                    model,
                    ns,
                    model.pods.contains_key(&ep.key),
                ),
            };
            let res = compile_endpoint(
                ep.endpoint_id,
                &pod,
                audit,
                in_ns,
                |k, i| {
                    let (c, p) = &rules[k][i];
                    (*c, p)
                },
                &dest,
                &mut out.maps.policy,
            );
            let identity = if view.host_network {
                IDENTITY_HOST
            } else {
                pod_identity[&ep.key]
            };
            out.selected_by.insert(ep.key.clone(), res.selected_by);
            for (dir, keys) in res.isolating.into_iter().enumerate() {
                if !keys.is_empty() {
                    out.isolated_by.insert((ep.endpoint_id, dir as u8), keys);
                }
            }
            out.maps.endpoints.insert(
                ep.ifindex,
                EndpointInfo {
                    endpoint_id: ep.endpoint_id,
                    identity,
                    ipv4: u32::from_ne_bytes(ep.ipv4.octets()),
                    flags: res.flags,
                    generation: 0,
                    mac: ep.mac,
                    _pad: [0; 2],
                    ipv6: ipcache::endpoint_ipv6(ep),
                },
            );
        }

        // ClusterNetworkPolicy tiers over the NetworkPolicy result (the
        // identities they need come from the hidden policy
        // `tiers::cluster_addresses_key`, which the model keeps).
        out.cluster_cookies = tiers::cluster_rule_refs(&cluster);
        let identities = std::mem::take(&mut out.identities);
        tiers::apply_tiers(
            model,
            &mut out.maps,
            &tiers::labels_of(&identities),
            &cluster,
        );
        out.identities = identities;
        out
    }
}

#[cfg(test)]
mod nodes_tests;
#[cfg(test)]
mod tests;
