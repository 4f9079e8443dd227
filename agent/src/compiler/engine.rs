//! The incremental compiler. The engine owns the model and keeps the
//! desired map state equal to what [`super::Compiler::compile`] would make
//! of it (number for number, given the same numbering), touching only what
//! a change can affect:
//!
//! * **Label identities** are refcounted by their [`LabelSet`]; a pod
//!   change releases one and acquires another. An identity that appears is
//!   matched against every rule with pod peers (except "any pod" rules,
//!   whose peer is `IDENTITY_ANY_POD` whatever identities exist); one that
//!   disappears leaves the rules that held it (`id_rules`). Label and CIDR
//!   identities come from two pools with disjoint ranges.
//! * **CIDR identities** are refcounted by the accepted rules' ipBlock
//!   prefixes, plus the pod addresses that need their own /32 (named ports
//!   on ipBlock egress peers). One that appears or disappears changes the
//!   peer sets of the rules with blocks and the `cidr_identity` of the pod
//!   addresses inside it only.
//! * **Rules** keep their peer set (identities) and their cookie; a change
//!   of a rule's peers marks the endpoints its policy selects (`selects`).
//! * **Endpoints** are recompiled one by one when marked (their own pod
//!   changed, a policy selecting them changed, a rule selecting them
//!   changed CIDR peers); their entries are diffed against what they had,
//!   and the keys that changed are recorded in [`Touched`] for
//!   [`crate::sync::apply_touched`]. A label identity that appears or
//!   disappears does not recompile anything: on every other endpoint, the
//!   entries whose peer it is are added (its selecting rules' entries,
//!   restricted to it) or removed.
//! * **ipcache** keys are recomputed when marked (a pod address, a CIDR
//!   identity, a node address).
//!
//! Numbers released by a change are reused only after [`Engine::take_touched`]
//! (the caller syncs the maps right after), so one sync never sees a number
//! stand for two things.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnetwork::IpNetwork;
use palisade_common::{
    EndpointInfo, IpcacheValue, PolicyKey, DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY_POD,
    IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, IDENTITY_WORLD6,
};
use palisade_dataplane::MapState;

use super::{
    emit::{emit_rule, Destinations, PolicyEntries, RuleInput},
    endpoints::{compile_endpoint, EndpointPod, EndpointPolicy},
    identities::{namespace_labels, LabelSet},
    ipcache::{longest_cidr, net6_of, net_of, worlds},
    parse::{ParsedPolicy, Peer, Port, Rule},
    peers::{
        host6_net, host_net, named_block6_contains, named_block_contains, rule_matches_cidr,
        rule_matches_labels, PeerSet,
    },
    view::View,
    IdentitySource, RuleRef,
};
use crate::{
    change::Change,
    identity::Pool,
    model::{Labels, LocalEndpoint, Model, ObjectKey},
};

/// Map keys that may have changed since the last [`Engine::take_touched`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub policy: HashSet<(u32, PolicyKey)>,
    pub ipcache: HashSet<(Ipv4Addr, u32)>,
    pub ipcache6: HashSet<(Ipv6Addr, u32)>,
    /// By ifindex.
    pub endpoints: HashSet<u32>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.policy.len() + self.ipcache.len() + self.ipcache6.len() + self.endpoints.len()
    }

    /// Adds the keys of `other` (e.g. a sync that failed, to retry).
    pub fn merge(&mut self, other: Touched) {
        self.policy.extend(other.policy);
        self.ipcache.extend(other.ipcache);
        self.ipcache6.extend(other.ipcache6);
        self.endpoints.extend(other.endpoints);
    }
}

/// (identity key, number) and (rule, cookie) pairs.
#[cfg(test)]
type Numbering = (
    Vec<(super::identities::IdentityKey, u32)>,
    Vec<(RuleRef, u32)>,
);

/// A pod as the engine sees it (model pod and/or local endpoint).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Eff {
    /// None for hostNetwork pods.
    label_id: Option<u32>,
    ip: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
    local: bool,
}

struct LabelEntry {
    set: Arc<LabelSet>,
    refs: usize,
}

struct RuleState {
    policy: ObjectKey,
    rule_ref: RuleRef,
    rule: Rule,
    peers: PeerSet,
}

struct EpState {
    ep: LocalEndpoint,
    keys: Vec<(u32, PolicyKey)>,
    result: EndpointPolicy,
}

static NO_LABELS: Labels = Labels::new();

pub struct Engine {
    model: Model,
    configured_host_ips: Vec<Ipv4Addr>,
    source_host_ips: Vec<Ipv4Addr>,
    /// This node's name: its Node object's addresses are `host`.
    node_name: Option<String>,
    /// Addresses the host veths carry (the pods' gateway): the node's own
    /// source towards its pods (kubelet probes), so `host`.
    gateway_ips: Vec<Ipv4Addr>,
    /// The same of IPv6 (the IPv6 gateways on the host veths).
    gateway_ips6: Vec<Ipv6Addr>,
    /// The node's IPv6 addresses from the configuration (`--host-ip`).
    configured_host_ips6: Vec<Ipv6Addr>,
    /// Host protection: the node's open ports (protocol, port; None: every
    /// port of the protocol), or None when it is off.
    host_protection: Option<Vec<(u8, Option<u16>)>>,

    /// Label identities and CIDR identities: disjoint ranges.
    label_pool: Pool,
    cidr_pool: Pool,
    cookie_pool: Pool,
    label_ids: HashMap<Arc<LabelSet>, u32>,
    labels: HashMap<u32, LabelEntry>,
    /// Prefix -> number of accepted rules' block prefixes naming it.
    cidr_refs: HashMap<IpNetwork, usize>,
    /// While a policy is replaced: prefixes whose last reference its old
    /// rules dropped, settled after its new rules are in. A prefix the new
    /// rules keep keeps its CIDR identity (and so its kernel entries):
    /// replacing the hidden addresses policy for one more learned address
    /// rewrites one address, not all of them.
    deferred_cidrs: Option<Vec<IpNetwork>>,
    /// Pod addresses that need a CIDR identity of their own.
    addr_need: HashSet<Ipv4Addr>,
    addr_need6: HashSet<Ipv6Addr>,
    cidr_ids: HashMap<IpNetwork, u32>,
    cidr_by_id: HashMap<u32, IpNetwork>,

    eff: HashMap<ObjectKey, Eff>,
    /// Address -> (remote, pod): the first holds the ipcache entry.
    /// (Sorted; nearly always one pod, so a vector.)
    by_ip: BTreeMap<Ipv4Addr, Vec<(bool, ObjectKey)>>,
    /// The same for IPv6 pod addresses (their only ipcache6 entries).
    by_ip6: BTreeMap<Ipv6Addr, Vec<(bool, ObjectKey)>>,

    rules: HashMap<u32, RuleState>,
    rule_cookies: HashMap<ObjectKey, Vec<u32>>,
    id_rules: HashMap<u32, BTreeSet<u32>>,
    /// Rules with pod peers, with ipBlock peers, any-peer rules with egress
    /// named ports, rules with egress named ports and ipBlock peers.
    label_rules: BTreeSet<u32>,
    block_rules: BTreeSet<u32>,
    any_named: BTreeSet<u32>,
    named_blocks: BTreeSet<u32>,

    eps: BTreeMap<String, EpState>,
    eps_by_key: HashMap<ObjectKey, BTreeSet<String>>,
    eps_by_ifindex: HashMap<u32, BTreeSet<String>>,
    /// Policy -> the local endpoints it selects.
    selects: HashMap<ObjectKey, BTreeSet<String>>,

    desired: MapState,
    /// While any ClusterNetworkPolicy is accepted: `desired` with the tier
    /// stage applied (what the kernel gets). Recomputed from `desired` after
    /// every change (see `settle_tiers`).
    tiered: Option<MapState>,
    /// The hidden addresses policy last put (Debug form), to skip putting
    /// an identical one.
    hidden_addresses: Option<String>,
    touched: Touched,
    dirty_eps: BTreeSet<String>,
    /// Label identities that appeared / disappeared: their entries are
    /// added / removed on the endpoints not recompiled whole.
    new_ids: Vec<u32>,
    gone_ids: Vec<u32>,
    dirty_ips: BTreeSet<Ipv4Addr>,
    dirty_ips6: BTreeSet<Ipv6Addr>,
    dirty_ipcache: HashSet<(Ipv4Addr, u32)>,
    dirty_ipcache6: HashSet<(Ipv6Addr, u32)>,
    dirty_ifindex: HashSet<u32>,

    view: View,
}

impl Destinations for Engine {
    fn named(&self, id: u32, name: &str, proto: u8, f: &mut dyn FnMut(u16)) {
        let id = match self.cidr_by_id.get(&id) {
            Some(IpNetwork::V4(net)) if net.prefix() == 32 && !self.is_node_ip(&net.ip()) => {
                match self.winner(net.ip()).and_then(|k| self.eff[k].label_id) {
                    Some(l) => l,
                    None => return,
                }
            }
            Some(IpNetwork::V6(net)) if net.prefix() == 128 && !self.is_node_ip6(&net.ip()) => {
                match self.pod6_at(net.ip()) {
                    Some((_, l)) => l,
                    None => return,
                }
            }
            _ => id,
        };
        if let Some(e) = self.labels.get(&id) {
            e.set.named(name, proto).for_each(f);
        }
    }

    fn each_label_id(&self, f: &mut dyn FnMut(u32)) {
        self.labels.keys().for_each(|id| f(*id));
    }
}

impl Engine {
    pub fn new(audit: bool, configured_host_ips: Vec<Ipv4Addr>) -> Self {
        let mut e = Self {
            model: Model {
                audit,
                ..Default::default()
            },
            configured_host_ips,
            source_host_ips: Vec::new(),
            node_name: None,
            gateway_ips: Vec::new(),
            gateway_ips6: Vec::new(),
            configured_host_ips6: Vec::new(),
            host_protection: None,
            label_pool: Pool::label_identities(),
            cidr_pool: Pool::cidr_identities(),
            cookie_pool: Pool::new(1),
            label_ids: HashMap::new(),
            labels: HashMap::new(),
            cidr_refs: HashMap::new(),
            deferred_cidrs: None,
            addr_need: HashSet::new(),
            addr_need6: HashSet::new(),
            cidr_ids: HashMap::from(worlds()),
            cidr_by_id: HashMap::new(),
            eff: HashMap::new(),
            by_ip: BTreeMap::new(),
            by_ip6: BTreeMap::new(),
            rules: HashMap::new(),
            rule_cookies: HashMap::new(),
            id_rules: HashMap::new(),
            label_rules: BTreeSet::new(),
            block_rules: BTreeSet::new(),
            any_named: BTreeSet::new(),
            named_blocks: BTreeSet::new(),
            eps: BTreeMap::new(),
            eps_by_key: HashMap::new(),
            eps_by_ifindex: HashMap::new(),
            selects: HashMap::new(),
            desired: MapState::default(),
            tiered: None,
            hidden_addresses: None,
            touched: Touched::default(),
            dirty_eps: BTreeSet::new(),
            new_ids: Vec::new(),
            gone_ids: Vec::new(),
            dirty_ips: BTreeSet::new(),
            dirty_ips6: BTreeSet::new(),
            dirty_ipcache: HashSet::new(),
            dirty_ipcache6: HashSet::new(),
            dirty_ifindex: HashSet::new(),
            view: View {
                audit,
                ..Default::default()
            },
        };
        e.view
            .identities
            .insert(IDENTITY_HOST, IdentitySource::Reserved("host"));
        e.view
            .identities
            .insert(IDENTITY_WORLD, IdentitySource::Reserved("world"));
        e.view
            .identities
            .insert(IDENTITY_WORLD6, IdentitySource::Reserved("world-ipv6"));
        e.view
            .identities
            .insert(IDENTITY_ANY_POD, IdentitySource::Reserved("any-pod"));
        e.view.identities.insert(
            IDENTITY_REMOTE_NODE,
            IdentitySource::Reserved("remote-node"),
        );
        // Room for a cluster of ~10k pods without rehashing the desired
        // state in the middle of a change (a rehash of 30k entries is a
        // few ms; the memory is ~3 MiB).
        e.desired.policy.reserve(1 << 16);
        e.desired.ipcache.reserve(1 << 14);
        e.dirty_ipcache.insert((Ipv4Addr::UNSPECIFIED, 0));
        e.dirty_ipcache6.insert((Ipv6Addr::UNSPECIFIED, 0));
        e.set_host_ips();
        e.settle();
        e
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Names this node: the addresses of its Node object become `host`,
    /// every other node's `remote-node`.
    pub fn set_node_name(&mut self, name: Option<String>) {
        self.view.node_name = name.as_deref().map(Arc::from);
        self.node_name = name;
        self.set_host_ips();
        self.settle();
    }

    /// The addresses the host-side veths carry (replaces the previous set):
    /// `host`, since the node uses them as its source towards its pods.
    pub fn set_gateway_ips(&mut self, mut ips: Vec<Ipv4Addr>) {
        ips.sort();
        ips.dedup();
        if ips != self.gateway_ips {
            self.gateway_ips = ips;
            self.set_host_ips();
            self.settle();
        }
    }

    /// The node's configured IPv6 addresses (`host`), beside the IPv4 ones
    /// given to [`Engine::new`].
    pub fn with_host_ips6(mut self, ips: Vec<Ipv6Addr>) -> Self {
        self.configured_host_ips6 = ips;
        self.set_host_ips();
        self.settle();
        self
    }

    /// The IPv6 addresses the host-side veths carry: `host`, as
    /// [`Engine::set_gateway_ips`].
    pub fn set_gateway_ips6(&mut self, mut ips: Vec<Ipv6Addr>) {
        ips.sort();
        ips.dedup();
        if ips != self.gateway_ips6 {
            self.gateway_ips6 = ips;
            self.set_host_ips();
            self.settle();
        }
    }

    /// Host protection (`palisade_common::decision::host_protected`): with
    /// `Some(ports)`, what pods send to their own node passes only on these
    /// (protocol, port; None: every port); None turns it off. Sets
    /// `EP_HOST_PROTECTED` on every endpoint and the open ports as policy
    /// entries of `HOST_PORTS_ENDPOINT`.
    pub fn set_host_protection(&mut self, ports: Option<Vec<(u8, Option<u16>)>>) {
        if ports == self.host_protection {
            return;
        }
        let key = |(protocol, port): (u8, Option<u16>)| {
            let prefix = if port.is_some() {
                palisade_common::POLICY_PREFIX_FULL
            } else {
                palisade_common::POLICY_PREFIX_PROTO
            };
            let k = PolicyKey {
                endpoint_id: palisade_common::HOST_PORTS_ENDPOINT,
                peer_identity: IDENTITY_HOST,
                direction: palisade_common::DIR_EGRESS,
                protocol,
                dport_be: port.unwrap_or(0).to_be(),
            };
            (prefix, k)
        };
        for p in self.host_protection.iter().flatten() {
            let k = key(*p);
            self.desired.policy.remove(&k);
            self.touched.policy.insert(k);
        }
        for p in ports.iter().flatten() {
            let k = key(*p);
            let v = palisade_common::PolicyValue {
                action: palisade_common::ACTION_ALLOW,
                cookie: 0,
            };
            self.desired.policy.insert(k, v);
            self.touched.policy.insert(k);
        }
        self.host_protection = ports;
        self.dirty_ifindex
            .extend(self.eps_by_ifindex.keys().copied());
        self.settle();
    }

    /// Always equal to `Compiler::compile(self.model()).maps`, modulo
    /// numbering (and host protection, which only the engine applies).
    pub fn desired(&self) -> &MapState {
        self.tiered.as_ref().unwrap_or(&self.desired)
    }

    /// The keys possibly changed since the last call. Numbers released
    /// since then become reusable: call it right before syncing.
    pub fn take_touched(&mut self) -> Touched {
        self.label_pool.flush();
        self.cidr_pool.flush();
        self.cookie_pool.flush();
        std::mem::take(&mut self.touched)
    }

    /// Puts back keys a sync could not write, for the next one.
    pub fn retouch(&mut self, t: Touched) {
        self.touched.merge(t);
    }

    /// The published view: cheap (persistent maps), share it freely.
    pub fn view(&self) -> Arc<View> {
        Arc::new(self.view.clone())
    }

    pub fn apply(&mut self, c: Change) {
        match c {
            Change::Namespace(ns) => {
                let name = ns.name.clone();
                self.view.namespaces.insert(name.clone(), ns.clone());
                let old = self.model.namespaces.insert(name.clone(), ns);
                self.namespace_changed(&name, old);
            }
            Change::NamespaceDeleted(name) => {
                self.view.namespaces.remove(&name);
                if let Some(old) = self.model.namespaces.remove(&name) {
                    self.namespace_changed(&name, Some(old));
                }
            }
            Change::Pod(p) => {
                let key = ObjectKey::new(&p.namespace, &p.name);
                self.model.pods.insert(key.clone(), p);
                self.refresh_pod(&key);
            }
            Change::PodDeleted(key) => {
                if self.model.pods.remove(&key).is_some() {
                    self.refresh_pod(&key);
                }
            }
            Change::Policy(key, np) => {
                let parsed = Arc::new(ParsedPolicy::parse(&key, &np));
                self.put_policy(key, Some(parsed));
            }
            Change::PolicyDeleted(key) => {
                if self.model.policies.contains_key(&key) {
                    self.put_policy(key, None);
                }
            }
            Change::NodeAddresses(ips) => {
                self.source_host_ips = ips;
                self.set_host_ips();
            }
            Change::Node(n) => {
                self.view.nodes.insert(n.name.clone(), n.clone());
                self.model.nodes.insert(n.name.clone(), n);
                self.set_host_ips();
                if self.model.resolve_node_peers() {
                    self.cluster_policies_changed();
                }
            }
            Change::NodeDeleted(name) => {
                self.view.nodes.remove(&name);
                if self.model.nodes.remove(&name).is_some() {
                    self.set_host_ips();
                    if self.model.resolve_node_peers() {
                        self.cluster_policies_changed();
                    }
                }
            }
            Change::ClusterPolicy(c) => {
                self.model.add_cluster_policy(&c);
                self.cluster_policies_changed();
            }
            Change::ClusterPolicyDeleted(name) => {
                if self.model.remove_cluster_policy(&name) {
                    self.cluster_policies_changed();
                }
            }
            // Services are resolved beside the engine (service_resolve):
            // policy is judged on the backend, never on a ClusterIP.
            Change::Service(..)
            | Change::ServiceDeleted(_)
            | Change::EndpointSlice(..)
            | Change::EndpointSliceDeleted(_) => {}
        }
        self.settle();
    }

    /// The addresses learned from DNS answers, by name, as they are now
    /// (`crate::fqdn`): the `domainNames` peers follow them.
    pub fn set_learned(
        &mut self,
        learned: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    ) {
        if self.model.set_learned(learned) {
            self.cluster_policies_changed();
        }
        self.settle();
    }

    /// The hidden addresses policy follows the accepted
    /// ClusterNetworkPolicies; the view lists them.
    /// Marks the endpoints without a pod in the model (of `ns`, or all).
    fn dirty_unknown_endpoints(&mut self, ns: Option<&str>) {
        let unknown: Vec<String> = self
            .eps
            .iter()
            .filter(|(_, s)| ns.is_none_or(|n| *s.ep.key.namespace == *n))
            .filter(|(_, s)| !self.model.pods.contains_key(&s.ep.key))
            .map(|(c, _)| c.clone())
            .collect();
        self.dirty_eps.extend(unknown);
    }

    fn cluster_policies_changed(&mut self) {
        self.dirty_unknown_endpoints(None);
        let key = super::tiers::cluster_addresses_key();
        let hidden = self.model.cluster_addresses();
        // It depends only on the set of `networks`/`nodes` prefixes: most
        // changes leave it as it was, and replacing it would re-resolve
        // its peers over every pod address.
        let now = hidden.as_ref().map(|h| format!("{h:?}"));
        if now != self.hidden_addresses {
            self.hidden_addresses = now;
            self.put_policy(key.clone(), hidden);
        }
        self.view.policies.remove(&key);
        let cluster: Vec<_> = self
            .model
            .cluster_policies
            .values()
            .filter_map(|p| p.accepted())
            .collect();
        let cluster = super::tiers::ordered(cluster.into_iter());
        self.view.cluster_cookies = super::tiers::cluster_rule_refs(&cluster)
            .into_iter()
            .collect();
        self.view.cluster_policies = self.model.cluster_policies.clone().into_iter().collect();
    }

    /// The tier walk of a flow of a local endpoint, step by step (for
    /// `trace`); None if no ClusterNetworkPolicy selects it in `direction`
    /// (or no such endpoint).
    pub fn tier_walk(
        &self,
        endpoint_id: u32,
        direction: u8,
        remote: impl Into<std::net::IpAddr>,
        proto: u8,
        port: u16,
    ) -> Option<super::tier_walk::Walk> {
        let ep = self
            .model
            .endpoints
            .values()
            .find(|e| e.endpoint_id == endpoint_id)?;
        let labels = &self.labels;
        let lookup = |id: u32| {
            labels
                .get(&id)
                .map(|e| (&e.set.namespace_labels, &e.set.pod_labels))
        };
        super::tier_walk::walk_of(
            &self.model,
            &self.desired,
            &lookup,
            ep,
            direction,
            remote.into(),
            proto,
            port,
        )
    }

    /// The tier stage over the NetworkPolicy state: a full pass over the
    /// selected endpoints (the kernel's maps stay one decision per lookup;
    /// see tiers.rs), touching the keys whose value changed.
    fn settle_tiers(&mut self) {
        let cluster: Vec<_> = self
            .model
            .cluster_policies
            .values()
            .filter_map(|p| p.accepted())
            .collect();
        if cluster.is_empty() && self.tiered.is_none() {
            return;
        }
        let cluster = super::tiers::ordered(cluster.into_iter());
        let next = (!cluster.is_empty()).then(|| {
            let mut maps = self.desired.clone();
            let labels = &self.labels;
            let lookup = |id: u32| {
                labels
                    .get(&id)
                    .map(|e| (&e.set.namespace_labels, &e.set.pod_labels))
            };
            super::tiers::apply_tiers(&self.model, &mut maps, &lookup, &cluster);
            maps
        });
        let old = self.tiered.as_ref().unwrap_or(&self.desired);
        let new = next.as_ref().unwrap_or(&self.desired);
        for (k, v) in &new.policy {
            if old.policy.get(k) != Some(v) {
                self.touched.policy.insert(*k);
            }
        }
        for k in old.policy.keys() {
            if !new.policy.contains_key(k) {
                self.touched.policy.insert(*k);
            }
        }
        for (k, v) in &new.endpoints {
            if old.endpoints.get(k) != Some(v) {
                self.touched.endpoints.insert(*k);
            }
        }
        self.tiered = next;
    }

    /// A policy already parsed (e.g. kept by a source).
    pub fn apply_parsed(&mut self, key: ObjectKey, parsed: Arc<ParsedPolicy>) {
        self.put_policy(key, Some(parsed));
        self.settle();
    }

    /// CNI ADD: replaces an endpoint of the same container id.
    pub fn add_endpoint(&mut self, ep: LocalEndpoint) {
        let replaced = self
            .eps
            .contains_key(&ep.container_id)
            .then(|| self.drop_endpoint(&ep.container_id.clone()));
        let cid = ep.container_id.clone();
        let key = ep.key.clone();
        self.model.endpoints.insert(cid.clone(), ep.clone());
        self.view.endpoints.insert(cid.clone(), ep.clone());
        self.view
            .endpoints_by_id
            .insert(ep.endpoint_id, cid.clone());
        self.eps_by_key
            .entry(key.clone())
            .or_default()
            .insert(cid.clone());
        self.eps_by_ifindex
            .entry(ep.ifindex)
            .or_default()
            .insert(cid.clone());
        self.dirty_ifindex.insert(ep.ifindex);
        self.eps.insert(
            cid.clone(),
            EpState {
                ep,
                keys: Vec::new(),
                result: EndpointPolicy::default(),
            },
        );
        self.dirty_eps.insert(cid);
        if let Some(old) = replaced.filter(|k| *k != key) {
            self.refresh_pod(&old);
        }
        self.refresh_pod(&key);
        self.settle();
    }

    pub fn remove_endpoint(&mut self, container_id: &str) {
        if self.eps.contains_key(container_id) {
            let key = self.drop_endpoint(container_id);
            self.refresh_pod(&key);
            self.settle();
        }
    }

    pub fn set_audit(&mut self, on: bool) {
        if self.model.audit != on {
            self.model.audit = on;
            self.view.audit = on;
            self.dirty_eps.extend(self.eps.keys().cloned());
            self.settle();
        }
    }

    /// (identity key, number) and (rule, cookie) of everything numbered:
    /// seeds a full compile that numbers as the engine does.
    #[cfg(test)]
    pub(crate) fn numbering(&self) -> Numbering {
        use super::identities::IdentityKey;
        let mut ids: Vec<(IdentityKey, u32)> = self
            .labels
            .iter()
            .map(|(id, e)| (IdentityKey::Labels((*e.set).clone()), *id))
            .collect();
        ids.extend(
            self.cidr_by_id
                .iter()
                .map(|(id, net)| (IdentityKey::Cidr(*net), *id)),
        );
        let cookies = self
            .rules
            .iter()
            .map(|(c, r)| (r.rule_ref.clone(), *c))
            .collect();
        (ids, cookies)
    }

    // -- pods and identities ------------------------------------------------

    fn winner(&self, ip: Ipv4Addr) -> Option<&ObjectKey> {
        self.by_ip.get(&ip).and_then(|s| s.first()).map(|(_, k)| k)
    }

    fn namespace_changed(&mut self, name: &str, old: Option<crate::model::Namespace>) {
        let new = self.model.namespaces.get(name);
        let (old_labels, old_audit) = old.map_or((None, false), |n| (Some(n.labels), n.audit));
        let labels_changed = old_labels.as_ref() != new.map(|n| &n.labels)
            && old_labels.unwrap_or_default() != new.map(|n| n.labels.clone()).unwrap_or_default();
        let audit_changed = old_audit != new.is_some_and(|n| n.audit);
        let in_ns: Vec<String> = self
            .eps
            .iter()
            .filter(|(_, s)| *s.ep.key.namespace == *name)
            .map(|(c, _)| c.clone())
            .collect();
        if audit_changed {
            self.dirty_eps.extend(in_ns.iter().cloned());
        }
        if labels_changed {
            let mut keys: BTreeSet<ObjectKey> = self
                .model
                .pods
                .range(ObjectKey::new(name, "")..)
                .take_while(|(k, _)| *k.namespace == *name)
                .map(|(k, _)| k.clone())
                .collect();
            keys.extend(in_ns.iter().map(|c| self.eps[c].ep.key.clone()));
            for k in keys {
                self.refresh_pod(&k);
            }
        }
    }

    /// The engine's view of a pod from the model and the local endpoints.
    fn compute_eff(&self, key: &ObjectKey) -> Option<(Eff, Option<LabelSet>)> {
        let pod = self.model.pods.get(key);
        let ep = self
            .eps_by_key
            .get(key)
            .and_then(|s| s.last())
            .map(|c| &self.eps[c].ep);
        if pod.is_none() && ep.is_none() {
            return None;
        }
        let host_network = pod.is_some_and(|p| p.host_network);
        let (ip, ip6, local) = match ep {
            // An IPv6-only endpoint has no IPv4 address to claim.
            Some(ep) if !host_network => (
                Some(ep.ipv4).filter(|ip| !ip.is_unspecified()),
                ep.ipv6,
                true,
            ),
            _ => (pod.and_then(|p| p.ip), pod.and_then(|p| p.ipv6), false),
        };
        let set = (!host_network).then(|| {
            LabelSet::new(
                &key.namespace,
                namespace_labels(&self.model, &key.namespace),
                pod.map_or(&NO_LABELS, |p| &p.labels),
                pod.map_or(&[], |p| &p.ports),
            )
        });
        Some((
            Eff {
                label_id: None,
                ip,
                ip6,
                local,
            },
            set,
        ))
    }

    /// `by_ip6` and the dirty IPv6 addresses after a pod's change.
    fn refresh_pod_ip6(&mut self, key: &ObjectKey, old: &Option<Eff>, new: &Option<Eff>) {
        let addr = |e: &Option<Eff>| {
            e.as_ref()
                .filter(|e| e.label_id.is_some())
                .and_then(|e| Some((e.ip6?, !e.local)))
        };
        let (old_addr, new_addr) = (addr(old), addr(new));
        let label = |e: &Option<Eff>| e.as_ref().and_then(|e| e.label_id);
        if old_addr == new_addr {
            if label(old) != label(new) {
                self.dirty_ips6.extend(new_addr.map(|(ip, _)| ip));
            }
            return;
        }
        if let Some((ip, remote)) = old_addr {
            if let Some(s) = self.by_ip6.get_mut(&ip) {
                s.retain(|(r, k)| !(*r == remote && k == key));
                if s.is_empty() {
                    self.by_ip6.remove(&ip);
                }
            }
            self.dirty_ips6.insert(ip);
        }
        if let Some((ip, remote)) = new_addr {
            let s = self.by_ip6.entry(ip).or_default();
            let entry = (remote, key.clone());
            if let Err(at) = s.binary_search(&entry) {
                s.insert(at, entry);
            }
            self.dirty_ips6.insert(ip);
        }
    }

    /// The pod holding an IPv6 address, with its label identity.
    fn pod6_at(&self, ip: Ipv6Addr) -> Option<(&ObjectKey, u32)> {
        let (_, key) = self.by_ip6.get(&ip)?.first()?;
        Some((key, self.eff[key].label_id?))
    }

    /// The ipcache6 entry of a key: a pod's /128 -> its label identity,
    /// with the longest IPv6 ipBlock prefix containing it as its CIDR
    /// identity (as in the full compile: no IPv4 ipBlock matches an IPv6
    /// pod); an IPv6 CIDR identity's own prefix.
    fn ipcache6_value(&self, (ip, len): (Ipv6Addr, u32)) -> Option<IpcacheValue> {
        if len == 128 {
            // A node's address is the node's, whatever pod claims it.
            let node = if self.model.host_ips6.contains(&ip) {
                Some(IDENTITY_HOST)
            } else if self.model.remote_node_ips6.contains(&ip) {
                Some(IDENTITY_REMOTE_NODE)
            } else {
                None
            };
            if let Some(identity) = node.or_else(|| self.pod6_at(ip).map(|(_, id)| id)) {
                return Some(IpcacheValue {
                    identity,
                    cidr_identity: longest_cidr(&self.cidr_ids, ip),
                });
            }
        }
        self.prefix_value(IpNetwork::V6(net6_of(ip, len as u8)), ip.into())
    }

    /// The entry of a prefix key (`net`, keyed at `ip`): its CIDR
    /// identity, also as its `cidr_identity`, if it is one.
    fn prefix_value(&self, net: IpNetwork, ip: std::net::IpAddr) -> Option<IpcacheValue> {
        (net.ip() == ip)
            .then(|| self.cidr_ids.get(&net))
            .flatten()
            .map(|id| IpcacheValue {
                identity: *id,
                cidr_identity: *id,
            })
    }

    /// The named-port ipBlock rules that resolve on the address of the
    /// host-prefix CIDR identity `net`, if it has one, are recompiled.
    fn named_rules_dirty(&mut self, net: IpNetwork) {
        if let Some(id) = self.cidr_ids.get(&net) {
            for c in self.id_rules.get(id).cloned().unwrap_or_default() {
                if self.named_blocks.contains(&c) {
                    self.rule_dirty(c);
                }
            }
        }
    }

    /// The ipcache6 entries marked dirty, and the view of the IPv6
    /// addresses marked dirty.
    fn settle_ip6(&mut self) {
        while let Some(ip) = self.dirty_ips6.pop_first() {
            let node = self.is_node_ip6(&ip);
            // Its own /128 CIDR identity while a named-port egress ipBlock
            // holds it (as `settle` for IPv4).
            let need = !node
                && self.pod6_at(ip).is_some()
                && self
                    .named_blocks
                    .iter()
                    .any(|c| named_block6_contains(&self.rules[c].rule, ip));
            if need != self.addr_need6.contains(&ip) {
                if need {
                    self.addr_need6.insert(ip);
                } else {
                    self.addr_need6.remove(&ip);
                }
                self.refresh_cidr(IpNetwork::V6(host6_net(ip)));
            }
            self.named_rules_dirty(IpNetwork::V6(host6_net(ip)));
            match self
                .pod6_at(ip)
                .filter(|_| !node)
                .map(|(k, id)| (k.clone(), id))
            {
                Some(held) => {
                    self.view.pods_by_ip6.insert(ip, held);
                }
                None => {
                    self.view.pods_by_ip6.remove(&ip);
                }
            }
            self.dirty_ipcache6.insert((ip, 128));
        }
        for k in std::mem::take(&mut self.dirty_ipcache6) {
            let want = self.ipcache6_value(k);
            if self.desired.ipcache6.get(&k) != want.as_ref() {
                match want {
                    Some(v) => self.desired.ipcache6.insert(k, v),
                    None => self.desired.ipcache6.remove(&k),
                };
                self.touched.ipcache6.insert(k);
            }
        }
    }

    fn refresh_pod(&mut self, key: &ObjectKey) {
        // The model's key where the pod is known: `eff`, `by_ip` and the
        // view keep the key they are given, and a registration's own copy
        // would stay behind in them after it goes (two strings per pod).
        let key = &match self.model.pods.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => key.clone(),
        };
        let old = self.eff.remove(key);
        let new = self.compute_eff(key).map(|(mut eff, set)| {
            eff.label_id = set.map(|s| self.acquire(s));
            eff
        });
        if let Some(id) = old.as_ref().and_then(|e| e.label_id) {
            self.release(id);
        }
        let addr = |e: &Option<Eff>| {
            e.as_ref()
                .filter(|e| e.label_id.is_some())
                .and_then(|e| Some((e.ip?, !e.local)))
        };
        let (old_addr, new_addr) = (addr(&old), addr(&new));
        self.refresh_pod_ip6(key, &old, &new);
        if old_addr != new_addr {
            if let Some((ip, remote)) = old_addr {
                if let Some(s) = self.by_ip.get_mut(&ip) {
                    s.retain(|(r, k)| !(*r == remote && k == key));
                    if s.is_empty() {
                        self.by_ip.remove(&ip);
                    }
                }
                self.dirty_ips.insert(ip);
            }
            if let Some((ip, remote)) = new_addr {
                let s = self.by_ip.entry(ip).or_default();
                let entry = (remote, key.clone());
                if let Err(at) = s.binary_search(&entry) {
                    s.insert(at, entry);
                }
                self.dirty_ips.insert(ip);
            }
        } else if old.as_ref().and_then(|e| e.label_id) != new.as_ref().and_then(|e| e.label_id) {
            if let Some((ip, _)) = new_addr {
                self.dirty_ips.insert(ip);
            }
        }
        match (self.model.pods.get(key), self.eps_by_key.get(key)) {
            (Some(p), _) => {
                self.view.pod_addresses.insert(key.clone(), p.ip);
            }
            (None, Some(cids)) if !cids.is_empty() => {
                let ep = &self.eps[cids.last().expect("non-empty")].ep;
                self.view.pod_addresses.insert(key.clone(), Some(ep.ipv4));
            }
            _ => {
                self.view.pod_addresses.remove(key);
            }
        }
        if let Some(cids) = self.eps_by_key.get(key) {
            self.dirty_eps.extend(cids.iter().cloned());
        }
        if let Some(e) = new {
            self.eff.insert(key.clone(), e);
        }
    }

    fn acquire(&mut self, set: LabelSet) -> u32 {
        if let Some(&id) = self.label_ids.get(&set) {
            self.labels.get_mut(&id).expect("label entry").refs += 1;
            return id;
        }
        let id = self.label_pool.take();
        let set = Arc::new(set);
        self.label_ids.insert(set.clone(), id);
        self.view.identities.insert(id, set.source());
        for c in self.label_rules.clone() {
            let r = &self.rules[&c];
            if rule_matches_labels(&r.policy.namespace, &r.rule, &set) {
                self.add_peer(c, id, false);
            }
        }
        self.labels.insert(id, LabelEntry { set, refs: 1 });
        // Its entries are added endpoint by endpoint in `settle`.
        self.new_ids.push(id);
        id
    }

    fn release(&mut self, id: u32) {
        let e = self.labels.get_mut(&id).expect("label entry");
        e.refs -= 1;
        if e.refs > 0 {
            return;
        }
        let e = self.labels.remove(&id).expect("label entry");
        self.label_ids.remove(&e.set);
        self.view.identities.remove(&id);
        // Its entries go endpoint by endpoint in `settle`.
        self.identity_gone(id, false);
        self.gone_ids.push(id);
        self.label_pool.release(id);
    }

    fn add_peer(&mut self, c: u32, id: u32, mark: bool) {
        if let Some(r) = self.rules.get_mut(&c) {
            if let PeerSet::Ids(ids) = &mut r.peers {
                ids.insert(id);
            }
        }
        self.id_rules.entry(id).or_default().insert(c);
        if mark {
            self.rule_dirty(c);
        }
    }

    /// Removes `id` from every rule's peers.
    /// `mark`: recompile the endpoints of the rules that held it (else the
    /// caller removes its entries).
    fn identity_gone(&mut self, id: u32, mark: bool) {
        for c in self.id_rules.remove(&id).unwrap_or_default() {
            if let Some(r) = self.rules.get_mut(&c) {
                if let PeerSet::Ids(ids) = &mut r.peers {
                    ids.remove(&id);
                }
            }
            if mark {
                self.rule_dirty(c);
            }
        }
    }

    fn rule_dirty(&mut self, c: u32) {
        if let Some(r) = self.rules.get(&c) {
            if let Some(cids) = self.selects.get(&r.policy) {
                self.dirty_eps.extend(cids.iter().cloned());
            }
        }
    }

    /// Creates or drops the CIDR identity of `net` as its uses say.
    fn refresh_cidr(&mut self, net: IpNetwork) {
        if worlds().iter().any(|(w, _)| *w == net) {
            return;
        }
        let want = self.cidr_refs.get(&net).is_some_and(|n| *n > 0)
            || matches!(net, IpNetwork::V4(n) if n.prefix() == 32 && self.addr_need.contains(&n.ip()))
            || matches!(net, IpNetwork::V6(n) if n.prefix() == 128 && self.addr_need6.contains(&n.ip()));
        match (want, self.cidr_ids.get(&net).copied()) {
            (true, None) => {
                let id = self.cidr_pool.take();
                self.cidr_ids.insert(net, id);
                self.cidr_by_id.insert(id, net);
                self.view.identities.insert(id, IdentitySource::Cidr(net));
                for c in self.block_rules.clone() {
                    if rule_matches_cidr(&self.rules[&c].rule, net) {
                        self.add_peer(c, id, true);
                    }
                }
                self.cidr_moved(net);
            }
            (false, Some(id)) => {
                self.cidr_ids.remove(&net);
                self.cidr_by_id.remove(&id);
                self.view.identities.remove(&id);
                self.identity_gone(id, true);
                self.cidr_pool.release(id);
                self.cidr_moved(net);
            }
            _ => {}
        }
    }

    /// The ipcache keys a CIDR identity's change can affect: its own and
    /// the `cidr_identity` of the pod addresses inside it.
    fn cidr_moved(&mut self, net: IpNetwork) {
        let net = match net {
            IpNetwork::V4(net) => net,
            IpNetwork::V6(net) => {
                self.dirty_ipcache6
                    .insert((net.network(), u32::from(net.prefix())));
                let ips: Vec<Ipv6Addr> = self
                    .by_ip6
                    .range(net.network()..=net.broadcast())
                    .map(|(ip, _)| *ip)
                    .collect();
                self.dirty_ipcache6
                    .extend(ips.into_iter().map(|ip| (ip, 128)));
                for ip in self
                    .model
                    .remote_node_ips6
                    .iter()
                    .chain(&self.model.host_ips6)
                {
                    if net.contains(*ip) {
                        self.dirty_ipcache6.insert((*ip, 128));
                    }
                }
                return;
            }
        };
        self.dirty_ipcache
            .insert((net.network(), u32::from(net.prefix())));
        let ips: Vec<Ipv4Addr> = self
            .by_ip
            .range(net.network()..=net.broadcast())
            .map(|(ip, _)| *ip)
            .collect();
        for ip in ips {
            self.dirty_ipcache.insert((ip, 32));
        }
        for ip in self
            .model
            .remote_node_ips
            .iter()
            .chain(&self.model.host_ips)
        {
            if net.contains(*ip) {
                self.dirty_ipcache.insert((*ip, 32));
            }
        }
    }

    fn set_host_ips(&mut self) {
        let mut ips = self.configured_host_ips.clone();
        let own = self
            .node_name
            .as_ref()
            .and_then(|n| self.model.nodes.get(n))
            .map(|n| n.addresses.clone())
            .unwrap_or_default();
        for ip in self
            .source_host_ips
            .iter()
            .chain(&own)
            .chain(&self.gateway_ips)
        {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        let mut remote: Vec<Ipv4Addr> = self
            .model
            .nodes
            .values()
            .filter(|n| Some(&n.name) != self.node_name.as_ref())
            .flat_map(|n| n.addresses.iter().copied())
            .filter(|ip| !ips.contains(ip))
            .collect();
        remote.sort();
        remote.dedup();
        let old: HashSet<Ipv4Addr> = self.model.host_ips.iter().copied().collect();
        let new: HashSet<Ipv4Addr> = ips.iter().copied().collect();
        let old_remote: HashSet<Ipv4Addr> = self.model.remote_node_ips.iter().copied().collect();
        let new_remote: HashSet<Ipv4Addr> = remote.iter().copied().collect();
        for ip in old
            .symmetric_difference(&new)
            .chain(old_remote.symmetric_difference(&new_remote))
        {
            self.dirty_ips.insert(*ip);
            self.dirty_ipcache.insert((*ip, 32));
        }
        self.view.host_ips = Arc::new(ips.clone());
        self.view.remote_node_ips = Arc::new(remote.clone());
        self.model.host_ips = ips;
        self.model.remote_node_ips = remote;
        self.set_host_ips6();
        // Named egress ports on a node address's identity.
        if old != new || old_remote != new_remote {
            for c in self.named_blocks.clone() {
                self.rule_dirty(c);
            }
        }
    }

    /// `set_host_ips` of IPv6: this node's Node object's IPv6 addresses and
    /// the IPv6 gateways are `host`, other nodes' `remote-node`.
    fn set_host_ips6(&mut self) {
        let own_node = self
            .node_name
            .as_ref()
            .and_then(|n| self.model.nodes.get(n));
        let mut ips: Vec<Ipv6Addr> = own_node
            .map(|n| n.addresses6.clone())
            .unwrap_or_default()
            .into_iter()
            .chain(self.gateway_ips6.iter().copied())
            .chain(self.configured_host_ips6.iter().copied())
            .collect();
        ips.sort();
        ips.dedup();
        let mut remote: Vec<Ipv6Addr> = self
            .model
            .nodes
            .values()
            .filter(|n| Some(&n.name) != self.node_name.as_ref())
            .flat_map(|n| n.addresses6.iter().copied())
            .filter(|ip| ips.binary_search(ip).is_err())
            .collect();
        remote.sort();
        remote.dedup();
        for ip in self
            .model
            .host_ips6
            .iter()
            .chain(&self.model.remote_node_ips6)
            .chain(&ips)
            .chain(&remote)
        {
            self.dirty_ips6.insert(*ip);
        }
        let changed = self.model.host_ips6 != ips || self.model.remote_node_ips6 != remote;
        self.model.host_ips6 = ips;
        self.model.remote_node_ips6 = remote;
        if changed {
            for c in self.named_blocks.clone() {
                self.rule_dirty(c);
            }
        }
    }

    /// A node's address (this node's or another's): a pod claiming it does
    /// not make it a pod address.
    fn is_node_ip6(&self, ip: &Ipv6Addr) -> bool {
        self.model.host_ips6.contains(ip) || self.model.remote_node_ips6.contains(ip)
    }

    fn is_node_ip(&self, ip: &Ipv4Addr) -> bool {
        self.model.host_ips.contains(ip) || self.model.remote_node_ips.contains(ip)
    }

    // -- policies -----------------------------------------------------------

    fn put_policy(&mut self, key: ObjectKey, parsed: Option<Arc<ParsedPolicy>>) {
        let mut reuse: HashMap<RuleRef, u32> = HashMap::new();
        if let Some(cids) = self.selects.get(&key) {
            self.dirty_eps.extend(cids.iter().cloned());
        }
        // Whether the namespace's endpoints without pods are held closed
        // may change with its first or last policy.
        self.dirty_unknown_endpoints(Some(&key.namespace));
        self.deferred_cidrs = Some(Vec::new());
        for c in self.rule_cookies.remove(&key).unwrap_or_default() {
            let st = self.drop_rule(c);
            reuse.insert(st.rule_ref, c);
        }
        match &parsed {
            Some(p) => {
                self.model.policies.insert(key.clone(), p.clone());
                self.view
                    .policies
                    .insert(key.clone(), p.rejected().map(str::to_string));
                match p.rejected() {
                    Some(why) => {
                        self.view.rejected.insert(key.clone(), why.to_string());
                    }
                    None => {
                        self.view.rejected.remove(&key);
                    }
                }
            }
            None => {
                self.model.policies.remove(&key);
                self.view.policies.remove(&key);
                self.view.rejected.remove(&key);
            }
        }
        if let Some(ParsedPolicy::Accepted(p)) = parsed.as_deref() {
            let mut cookies = Vec::with_capacity(p.rules.len());
            for r in &p.rules {
                let rr = RuleRef {
                    policy: key.clone(),
                    direction: r.direction,
                    rule: r.index,
                };
                let c = reuse.remove(&rr).unwrap_or_else(|| self.cookie_pool.take());
                cookies.push(c);
                self.add_rule(c, &key, rr, r.clone());
            }
            self.rule_cookies.insert(key.clone(), cookies);
        }
        for net in self.deferred_cidrs.take().unwrap_or_default() {
            self.refresh_cidr(net);
        }
        for (_, c) in reuse {
            self.view.cookies.remove(&c);
            self.cookie_pool.release(c);
        }
        // Endpoints it selects now (those it selected are marked above).
        if let Some(p) = parsed.as_deref() {
            let now: Vec<String> = self
                .eps
                .iter()
                .filter(|(_, s)| s.ep.key.namespace == key.namespace)
                .filter(|(_, s)| {
                    let pod = self.model.pods.get(&s.ep.key);
                    !pod.is_some_and(|p| p.host_network)
                        && p.selection(pod.map_or(&NO_LABELS, |p| &p.labels)).is_some()
                })
                .map(|(c, _)| c.clone())
                .collect();
            self.dirty_eps.extend(now);
        }
    }

    fn prefixes(rule: &Rule) -> Vec<IpNetwork> {
        rule.prefixes().collect()
    }

    fn named_block_ips6(&self, rule: &Rule) -> Vec<Ipv6Addr> {
        if !rule.has_named_egress() {
            return Vec::new();
        }
        rule.blocks6()
            .flat_map(|(cidr, _)| {
                self.by_ip6
                    .range(cidr.network()..=cidr.broadcast())
                    .map(|(ip, _)| *ip)
            })
            .collect()
    }

    fn named_block_ips(&self, rule: &Rule) -> Vec<Ipv4Addr> {
        if !rule.has_named_egress() {
            return Vec::new();
        }
        rule.blocks()
            .flat_map(|(cidr, _)| {
                self.by_ip
                    .range(cidr.network()..=cidr.broadcast())
                    .map(|(ip, _)| *ip)
            })
            .collect()
    }

    fn add_rule(&mut self, c: u32, key: &ObjectKey, rule_ref: RuleRef, rule: Rule) {
        let any_pod = rule.any_pod();
        let peers = if rule.peers.is_none() {
            PeerSet::Any
        } else {
            let mut ids: BTreeSet<u32> = if any_pod {
                BTreeSet::from([IDENTITY_ANY_POD])
            } else {
                self.labels
                    .iter()
                    .filter(|(_, e)| rule_matches_labels(&key.namespace, &rule, &e.set))
                    .map(|(id, _)| *id)
                    .collect()
            };
            ids.extend(
                self.cidr_ids
                    .iter()
                    .filter(|(net, _)| rule_matches_cidr(&rule, **net))
                    .map(|(_, id)| *id),
            );
            PeerSet::Ids(ids)
        };
        if let PeerSet::Ids(ids) = &peers {
            for id in ids {
                self.id_rules.entry(*id).or_default().insert(c);
            }
        }
        let peers_of = |f: fn(&Peer) -> bool| rule.peers.iter().flatten().any(f);
        // An "any pod" rule holds no label identity: nothing to match.
        if !any_pod && peers_of(|p| matches!(p, Peer::Pods { .. })) {
            self.label_rules.insert(c);
        }
        let has_blocks = peers_of(|p| matches!(p, Peer::Block { .. } | Peer::Block6 { .. }));
        if has_blocks {
            self.block_rules.insert(c);
        }
        if rule.peers.is_none() && rule.has_named_egress() {
            self.any_named.insert(c);
        }
        if has_blocks && rule.has_named_egress() {
            self.named_blocks.insert(c);
        }
        let prefixes = Self::prefixes(&rule);
        let named_ips = self.named_block_ips(&rule);
        let named_ips6 = self.named_block_ips6(&rule);
        self.view.cookies.insert(c, rule_ref.clone());
        self.rules.insert(
            c,
            RuleState {
                policy: key.clone(),
                rule_ref,
                rule,
                peers,
            },
        );
        for net in prefixes {
            *self.cidr_refs.entry(net).or_default() += 1;
            self.refresh_cidr(net);
        }
        self.dirty_ips.extend(named_ips);
        self.dirty_ips6.extend(named_ips6);
    }

    fn drop_rule(&mut self, c: u32) -> RuleState {
        let st = self.rules.remove(&c).expect("rule");
        if let PeerSet::Ids(ids) = &st.peers {
            for id in ids {
                if let Some(s) = self.id_rules.get_mut(id) {
                    s.remove(&c);
                    if s.is_empty() {
                        self.id_rules.remove(id);
                    }
                }
            }
        }
        self.label_rules.remove(&c);
        self.block_rules.remove(&c);
        self.any_named.remove(&c);
        self.named_blocks.remove(&c);
        let named_ips = self.named_block_ips(&st.rule);
        self.dirty_ips.extend(named_ips);
        let named_ips6 = self.named_block_ips6(&st.rule);
        self.dirty_ips6.extend(named_ips6);
        for net in Self::prefixes(&st.rule) {
            let n = self.cidr_refs.get_mut(&net).expect("prefix refcount");
            *n -= 1;
            if *n == 0 {
                self.cidr_refs.remove(&net);
            }
            match self.deferred_cidrs.as_mut() {
                Some(d) => d.push(net),
                None => self.refresh_cidr(net),
            }
        }
        st
    }

    // -- endpoints ----------------------------------------------------------

    /// Forgets an endpoint and its entries; the pod's key.
    fn drop_endpoint(&mut self, cid: &str) -> ObjectKey {
        let st = self.eps.remove(cid).expect("endpoint");
        self.model.endpoints.remove(cid);
        self.view.endpoints.remove(cid);
        if self
            .view
            .endpoints_by_id
            .get(&st.ep.endpoint_id)
            .map(String::as_str)
            == Some(cid)
        {
            self.view.endpoints_by_id.remove(&st.ep.endpoint_id);
        }
        let key = st.ep.key.clone();
        if let Some(s) = self.eps_by_key.get_mut(&key) {
            s.remove(cid);
            if s.is_empty() {
                self.eps_by_key.remove(&key);
            }
        }
        if let Some(s) = self.eps_by_ifindex.get_mut(&st.ep.ifindex) {
            s.remove(cid);
            if s.is_empty() {
                self.eps_by_ifindex.remove(&st.ep.ifindex);
            }
        }
        self.dirty_ifindex.insert(st.ep.ifindex);
        for k in st.keys {
            self.desired.policy.remove(&k);
            self.touched.policy.insert(k);
        }
        for p in &st.result.selected_by {
            if let Some(s) = self.selects.get_mut(p) {
                s.remove(cid);
                if s.is_empty() {
                    self.selects.remove(p);
                }
            }
        }
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            self.view.isolated_by.remove(&(st.ep.endpoint_id, dir));
        }
        self.dirty_eps.remove(cid);
        self.publish_selected(&key);
        key
    }

    fn publish_selected(&mut self, key: &ObjectKey) {
        match self.eps_by_key.get(key).and_then(|s| s.last()) {
            Some(c) => {
                let v = self.eps[c].result.selected_by.clone();
                self.view.selected_by.insert(key.clone(), v);
            }
            None => {
                self.view.selected_by.remove(key);
            }
        }
    }

    fn recompile_endpoint(&mut self, cid: &str) {
        let Some(st) = self.eps.get(cid) else { return };
        let ep = st.ep.clone();
        let pod = self.model.pods.get(&ep.key);
        let view = EndpointPod {
            labels: pod.map_or(&NO_LABELS, |p| &p.labels),
            ports: pod.map_or(&[], |p| &p.ports),
            host_network: pod.is_some_and(|p| p.host_network),
            labels_pending: super::endpoints::labels_pending(
                &self.model,
                &ep.key.namespace,
                pod.is_some(),
            ),
        };
        let audit = self.model.audit
            || self
                .model
                .namespaces
                .get(&*ep.key.namespace)
                .is_some_and(|n| n.audit);
        let ns = &ep.key.namespace;
        let in_ns = self
            .model
            .policies
            .range(ObjectKey::new(&**ns, "")..)
            .take_while(|(k, _)| k.namespace == *ns)
            .map(|(k, p)| (k, &**p));
        let mut entries = PolicyEntries::new();
        let res = compile_endpoint(
            ep.endpoint_id,
            &view,
            audit,
            in_ns,
            |k, i| {
                let c = self.rule_cookies[k][i];
                (c, &self.rules[&c].peers)
            },
            self,
            &mut entries,
        );
        let st = self.eps.get_mut(cid).expect("endpoint");
        let old_keys = std::mem::take(&mut st.keys);
        let old_sel = std::mem::replace(&mut st.result, res.clone());
        st.keys = entries.keys().copied().collect();
        for k in old_keys {
            if !entries.contains_key(&k) {
                self.desired.policy.remove(&k);
                self.touched.policy.insert(k);
            }
        }
        for (k, v) in entries {
            if self.desired.policy.get(&k) != Some(&v) {
                self.desired.policy.insert(k, v);
                self.touched.policy.insert(k);
            }
        }
        if old_sel.selected_by != res.selected_by {
            for p in &old_sel.selected_by {
                if let Some(s) = self.selects.get_mut(p) {
                    s.remove(cid);
                    if s.is_empty() {
                        self.selects.remove(p);
                    }
                }
            }
            for p in &res.selected_by {
                self.selects
                    .entry(p.clone())
                    .or_default()
                    .insert(cid.to_string());
            }
        }
        for (dir, keys) in res.isolating.iter().enumerate() {
            let k = (ep.endpoint_id, dir as u8);
            if keys.is_empty() {
                self.view.isolated_by.remove(&k);
            } else if self.view.isolated_by.get(&k) != Some(keys) {
                self.view.isolated_by.insert(k, keys.clone());
            }
        }
        self.publish_selected(&ep.key);
        self.dirty_ifindex.insert(ep.ifindex);
    }

    /// A label identity that appeared or disappeared changes, on an
    /// endpoint that is otherwise unchanged, only the entries whose peer it
    /// is: those are added (the rules holding it, and any-peer rules with
    /// egress named ports, restricted to it) or removed, instead of
    /// recompiling the endpoint.
    fn identity_deltas(&mut self) {
        let gone = std::mem::take(&mut self.gone_ids);
        let new: Vec<u32> = std::mem::take(&mut self.new_ids)
            .into_iter()
            .filter(|id| self.labels.contains_key(id))
            .collect();
        if gone.is_empty() && new.is_empty() {
            return;
        }
        let gone: HashSet<u32> = gone.into_iter().collect();
        let cids: Vec<String> = self
            .eps
            .keys()
            .filter(|c| !self.dirty_eps.contains(*c))
            .cloned()
            .collect();
        for cid in cids {
            let mut added = PolicyEntries::new();
            if !new.is_empty() {
                let st = &self.eps[&cid];
                let pod = self.model.pods.get(&st.ep.key);
                let own_ports = pod.map_or(&[][..], |p| &p.ports[..]);
                for key in &st.result.selected_by {
                    let Some(cookies) = self.rule_cookies.get(key) else {
                        continue;
                    };
                    for c in cookies {
                        let r = &self.rules[c];
                        // Every pod is a peer (no peers, or "any pod"):
                        // only egress named ports are per identity.
                        let named_only = r.peers.all_pods();
                        if named_only && !r.rule.has_named_egress() {
                            continue;
                        }
                        let ports: Vec<Port> = r
                            .rule
                            .ports
                            .iter()
                            .filter(|p| !named_only || matches!(p, Port::Named { .. }))
                            .cloned()
                            .collect();
                        for id in &new {
                            if let PeerSet::Ids(ids) = &r.peers {
                                if !named_only && !ids.contains(id) {
                                    continue;
                                }
                            }
                            let only = PeerSet::Ids(BTreeSet::from([*id]));
                            let input = RuleInput {
                                direction: r.rule.direction,
                                cookie: *c,
                                peers: &only,
                                ports: &ports,
                            };
                            emit_rule(&mut added, st.ep.endpoint_id, own_ports, &input, self);
                        }
                    }
                }
            }
            let st = self.eps.get_mut(&cid).expect("endpoint");
            if !gone.is_empty() {
                let (desired, touched) = (&mut self.desired.policy, &mut self.touched.policy);
                st.keys.retain(|k| {
                    if gone.contains(&k.1.peer_identity) {
                        desired.remove(k);
                        touched.insert(*k);
                        false
                    } else {
                        true
                    }
                });
            }
            for (k, v) in added {
                let cur = self.desired.policy.entry(k).or_insert_with(|| {
                    st.keys.push(k);
                    v
                });
                cur.cookie = cur.cookie.min(v.cookie);
                self.touched.policy.insert(k);
            }
        }
    }

    fn endpoint_value(&self, ifindex: u32) -> Option<EndpointInfo> {
        let cid = self.eps_by_ifindex.get(&ifindex)?.last()?;
        let st = &self.eps[cid];
        let identity = self
            .eff
            .get(&st.ep.key)
            .and_then(|e| e.label_id)
            .unwrap_or(IDENTITY_HOST);
        Some(EndpointInfo {
            endpoint_id: st.ep.endpoint_id,
            identity,
            ipv4: u32::from_ne_bytes(st.ep.ipv4.octets()),
            flags: st.result.flags
                | if self.host_protection.is_some() {
                    palisade_common::EP_HOST_PROTECTED
                } else {
                    0
                },
            generation: 0,
            mac: st.ep.mac,
            _pad: [0; 2],
            ipv6: super::ipcache::endpoint_ipv6(&st.ep),
        })
    }

    fn ipcache_value(&self, (ip, len): (Ipv4Addr, u32)) -> Option<IpcacheValue> {
        if len == 32 {
            if self.model.host_ips.contains(&ip) {
                // The CIDR identity lets a ClusterNetworkPolicy `nodes` or
                // `networks` peer deny a pod's egress to its own node
                // (`decision::own_node_checked`).
                return Some(IpcacheValue {
                    identity: IDENTITY_HOST,
                    cidr_identity: longest_cidr(&self.cidr_ids, ip),
                });
            }
            if self.model.remote_node_ips.contains(&ip) {
                return Some(IpcacheValue {
                    identity: IDENTITY_REMOTE_NODE,
                    cidr_identity: longest_cidr(&self.cidr_ids, ip),
                });
            }
            if let Some(id) = self.winner(ip).and_then(|k| self.eff[k].label_id) {
                return Some(IpcacheValue {
                    identity: id,
                    cidr_identity: longest_cidr(&self.cidr_ids, ip),
                });
            }
        }
        self.prefix_value(IpNetwork::V4(net_of(ip, len as u8)), ip.into())
    }

    /// Brings everything marked up to date.
    fn settle(&mut self) {
        // Pod addresses: their own CIDR identity, the rules that resolve
        // named ports on them, their ipcache entry.
        while let Some(ip) = self.dirty_ips.pop_first() {
            let winner = self.winner(ip).cloned();
            let need = winner.is_some()
                && !self.is_node_ip(&ip)
                && self
                    .named_blocks
                    .iter()
                    .any(|c| named_block_contains(&self.rules[c].rule, ip));
            if need != self.addr_need.contains(&ip) {
                if need {
                    self.addr_need.insert(ip);
                } else {
                    self.addr_need.remove(&ip);
                }
                self.refresh_cidr(IpNetwork::V4(host_net(ip)));
            }
            self.named_rules_dirty(IpNetwork::V4(host_net(ip)));
            self.dirty_ipcache.insert((ip, 32));
            // A node address is the node's, whatever pod claims it.
            match winner.filter(|_| !self.is_node_ip(&ip)) {
                Some(k) => {
                    let id = self.eff[&k]
                        .label_id
                        .expect("a pod address has a label identity");
                    self.view.pods_by_ip.insert(ip, (k, id));
                }
                None => {
                    self.view.pods_by_ip.remove(&ip);
                }
            }
        }
        self.settle_ip6();
        for k in std::mem::take(&mut self.dirty_ipcache) {
            let want = self.ipcache_value(k);
            if self.desired.ipcache.get(&k) != want.as_ref() {
                match want {
                    Some(v) => self.desired.ipcache.insert(k, v),
                    None => self.desired.ipcache.remove(&k),
                };
                self.touched.ipcache.insert(k);
            }
        }
        self.identity_deltas();
        while let Some(cid) = self.dirty_eps.pop_first() {
            self.recompile_endpoint(&cid);
        }
        for ifindex in std::mem::take(&mut self.dirty_ifindex) {
            let want = self.endpoint_value(ifindex);
            if self.desired.endpoints.get(&ifindex) != want.as_ref() {
                match want {
                    Some(v) => self.desired.endpoints.insert(ifindex, v),
                    None => self.desired.endpoints.remove(&ifindex),
                };
                self.touched.endpoints.insert(ifindex);
            }
        }
        self.settle_tiers();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

    use super::*;
    use crate::{
        compiler::{Compiled, Compiler},
        model::{ContainerPort, Namespace, Pod},
        sync,
    };

    /// Writes nothing: the mirror alone tells what a sync would do.
    struct Null;

    impl sync::MapWriter for Null {
        fn upsert_policy(
            &mut self,
            _: u32,
            _: PolicyKey,
            _: palisade_common::PolicyValue,
        ) -> Result<(), palisade_dataplane::Error> {
            Ok(())
        }
        fn remove_policy(&mut self, _: u32, _: PolicyKey) -> Result<(), palisade_dataplane::Error> {
            Ok(())
        }
        fn upsert_ipcache(
            &mut self,
            _: Ipv4Addr,
            _: u32,
            _: IpcacheValue,
        ) -> Result<(), palisade_dataplane::Error> {
            Ok(())
        }
        fn remove_ipcache(&mut self, _: Ipv4Addr, _: u32) -> Result<(), palisade_dataplane::Error> {
            Ok(())
        }
        fn upsert_ipcache6(
            &mut self,
            _: Ipv6Addr,
            _: u32,
            _: IpcacheValue,
        ) -> Result<(), palisade_dataplane::Error> {
            Ok(())
        }
        fn remove_ipcache6(
            &mut self,
            _: Ipv6Addr,
            _: u32,
        ) -> Result<(), palisade_dataplane::Error> {
            Ok(())
        }
        fn upsert_endpoint(
            &mut self,
            _: u32,
            _: EndpointInfo,
        ) -> Result<(), palisade_dataplane::Error> {
            Ok(())
        }
        fn remove_endpoint(&mut self, _: u32, _: u32) -> Result<(), palisade_dataplane::Error> {
            Ok(())
        }
    }

    /// The full compile of the engine's model, numbered as the engine numbers.
    fn oracle(e: &Engine) -> Compiled {
        let (ids, cookies) = e.numbering();
        Compiler::seeded(ids, cookies).compile(e.model())
    }

    fn check(e: &mut Engine, mirror: &mut sync::Mirror, what: &str) {
        let full = oracle(e);
        assert_eq!(
            e.desired().endpoints,
            full.maps.endpoints,
            "{what}: endpoints"
        );
        assert_eq!(e.desired().ipcache, full.maps.ipcache, "{what}: ipcache");
        assert_eq!(e.desired().ipcache6, full.maps.ipcache6, "{what}: ipcache6");
        if e.desired().policy != full.maps.policy {
            let a: BTreeMap<_, _> = e
                .desired()
                .policy
                .iter()
                .map(|((p, k), v)| {
                    (
                        (
                            *p,
                            k.endpoint_id,
                            k.peer_identity,
                            k.direction,
                            k.protocol,
                            u16::from_be(k.dport_be),
                        ),
                        v.cookie,
                    )
                })
                .collect();
            let b: BTreeMap<_, _> = full
                .maps
                .policy
                .iter()
                .map(|((p, k), v)| {
                    (
                        (
                            *p,
                            k.endpoint_id,
                            k.peer_identity,
                            k.direction,
                            k.protocol,
                            u16::from_be(k.dport_be),
                        ),
                        v.cookie,
                    )
                })
                .collect();
            let only_engine: Vec<_> = a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).collect();
            let only_full: Vec<_> = b.iter().filter(|(k, v)| a.get(*k) != Some(*v)).collect();
            panic!("{what}: policy differs\n engine only: {only_engine:?}\n full only: {only_full:?}\n identities: {:?}", full.identities);
        }
        let v = e.view();
        let map =
            |m: &im::OrdMap<ObjectKey, String>| m.clone().into_iter().collect::<BTreeMap<_, _>>();
        assert_eq!(map(&v.rejected), full.rejected, "{what}: rejected");
        assert_eq!(
            v.isolated_by
                .clone()
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            full.isolated_by,
            "{what}: isolated_by"
        );
        assert_eq!(
            v.selected_by
                .clone()
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            full.selected_by,
            "{what}: selected_by"
        );
        assert_eq!(
            v.cookies.clone().into_iter().collect::<HashMap<_, _>>(),
            full.cookies,
            "{what}: cookies"
        );
        assert_eq!(
            v.identities.clone().into_iter().collect::<HashMap<_, _>>(),
            full.identities,
            "{what}: identities"
        );
        // Flow-log names: the same pods at the same addresses as a view
        // built from the full compile.
        let fv = View::from_compiled(&full, e.model());
        assert_eq!(
            v.pods_by_ip.clone().into_iter().collect::<BTreeMap<_, _>>(),
            fv.pods_by_ip.into_iter().collect::<BTreeMap<_, _>>(),
            "{what}: pods_by_ip"
        );
        assert_eq!(
            v.pods_by_ip6
                .clone()
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            fv.pods_by_ip6.into_iter().collect::<BTreeMap<_, _>>(),
            "{what}: pods_by_ip6"
        );
        assert_eq!(
            v.pod_addresses
                .clone()
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            fv.pod_addresses.into_iter().collect::<BTreeMap<_, _>>(),
            "{what}: pod_addresses"
        );
        // The touched keys are enough to bring a mirror of the kernel up to date.
        let t = e.take_touched();
        sync::apply_touched(&mut Null, mirror, e.desired(), &t).unwrap();
        assert_eq!(
            sync::without_generations(mirror),
            *e.desired(),
            "{what}: touched keys miss a change"
        );
    }

    const NS: [&str; 3] = ["a", "b", "c"];

    fn ip(rng: &mut StdRng) -> Ipv4Addr {
        let pool = [
            "10.0.0.3",
            "10.0.0.4",
            "10.0.0.5",
            "10.0.0.6",
            "10.0.0.200",
            "10.0.1.5",
            "10.0.1.1",
            "192.168.0.1",
            "10.0.0.1",
        ];
        pool.choose(rng).unwrap().parse().unwrap()
    }

    /// Few addresses, so pods and endpoints share them as the IPv4 ones.
    fn ip6(rng: &mut StdRng) -> Option<Ipv6Addr> {
        let pool = ["fd00::3", "fd00::4", "fd00::5", "fd00:1::5"];
        rng.gen_bool(0.5)
            .then(|| pool.choose(rng).unwrap().parse().unwrap())
    }

    fn some<T: Clone>(rng: &mut StdRng, xs: &[T]) -> Vec<T> {
        xs.iter().filter(|_| rng.gen_bool(0.4)).cloned().collect()
    }

    fn namespace(rng: &mut StdRng) -> Namespace {
        let name = NS.choose(rng).unwrap().to_string();
        let mut labels: Labels = some(rng, &[("team", "x"), ("env", "prod")])
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if rng.gen_bool(0.3) {
            labels.insert("team".into(), "y".into());
        }
        Namespace {
            name,
            labels,
            audit: rng.gen_bool(0.2),
        }
    }

    fn pod(rng: &mut StdRng) -> Pod {
        let cp = |name: Option<&str>, port, protocol: &str| ContainerPort {
            name: name.map(str::to_string),
            port,
            protocol: protocol.into(),
        };
        let ports = some(
            rng,
            &[
                cp(Some("http"), 80, "TCP"),
                cp(Some("http"), 8080, "TCP"),
                cp(Some("dns"), 53, "UDP"),
                cp(None, 9000, "TCP"),
            ],
        );
        let mut labels = Labels::new();
        if rng.gen_bool(0.7) {
            labels.insert(
                "app".into(),
                ["web", "db", "api"].choose(rng).unwrap().to_string(),
            );
        }
        if rng.gen_bool(0.3) {
            labels.insert("tier".into(), "f".into());
        }
        Pod {
            namespace: NS.choose(rng).unwrap().to_string(),
            name: format!("p{}", rng.gen_range(0..8)),
            labels,
            ip: rng.gen_bool(0.85).then(|| ip(rng)),
            ipv6: ip6(rng),
            host_network: rng.gen_bool(0.08),
            ports,
        }
    }

    fn peer(rng: &mut StdRng) -> String {
        let sel = |rng: &mut StdRng| {
            [
                "{}",
                "{matchLabels: {app: web}}",
                "{matchLabels: {app: db}}",
                "{matchExpressions: [{key: tier, operator: DoesNotExist}]}",
                "{matchExpressions: [{key: app, operator: In, values: [web, api]}]}",
            ]
            .choose(rng)
            .unwrap()
            .to_string()
        };
        let block = [
            "{cidr: 10.0.0.0/16}",
            "{cidr: 10.0.0.0/24, except: [10.0.0.128/25]}",
            "{cidr: 10.0.0.4/30, except: [10.0.0.4/31]}",
            "{cidr: 10.0.0.5/32}",
            "{cidr: 0.0.0.0/0, except: [10.0.1.0/24]}",
            "{cidr: 0.0.0.0/0}",
            "{cidr: 10.0.0.0/24, except: [10.1.0.0/24]}",
            "{cidr: 'fd00::/8'}",
            "{cidr: '::/0', except: ['fd00::4/128']}",
            "{cidr: 'fd00::/16', except: ['fd00:0:0:1::/64']}",
            "{cidr: 'fd00:1::/32'}",
        ];
        match rng.gen_range(0..5) {
            0 => format!("{{podSelector: {}}}", sel(rng)),
            1 => format!(
                "{{namespaceSelector: {{matchLabels: {{team: x}}}}, podSelector: {}}}",
                sel(rng)
            ),
            2 => [
                "{namespaceSelector: {}}",
                "{namespaceSelector: {}, podSelector: {}}",
                "{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}",
            ]
            .choose(rng)
            .unwrap()
            .to_string(),
            _ => format!("{{ipBlock: {}}}", block.choose(rng).unwrap()),
        }
    }

    fn rule(rng: &mut StdRng, field: &str) -> String {
        let mut s = String::from("- ");
        if rng.gen_bool(0.8) {
            let peers: Vec<String> = (0..rng.gen_range(1..3)).map(|_| peer(rng)).collect();
            s.push_str(&format!("{field}: [{}]\n  ", peers.join(", ")));
        }
        let ports = [
            "{port: 80}",
            "{port: http}",
            "{port: dns, protocol: UDP}",
            "{port: 9000, endPort: 9010}",
            "{protocol: UDP}",
            "{port: 8080}",
        ];
        let mut chosen: Vec<&str> = (0..rng.gen_range(0..3))
            .map(|_| *ports.choose(rng).unwrap())
            .collect();
        if rng.gen_bool(0.03) {
            chosen.push("{port: 0}");
        }
        s.push_str(&format!("ports: [{}]\n", chosen.join(", ")));
        s
    }

    fn policy(rng: &mut StdRng) -> (ObjectKey, NetworkPolicy) {
        let ns = *NS.choose(rng).unwrap();
        let name = format!("q{}", rng.gen_range(0..6));
        let selector = [
            "{}",
            "{matchLabels: {app: web}}",
            "{matchLabels: {app: db}}",
            "{matchExpressions: [{key: app, operator: NotIn, values: [api]}]}",
            "{matchExpressions: [{key: app, operator: Bogus}]}",
        ]
        .choose(rng)
        .unwrap();
        let types = [
            "",
            "policyTypes: [Ingress]\n",
            "policyTypes: [Egress]\n",
            "policyTypes: [Ingress, Egress]\n",
            "policyTypes: [Sideways]\n",
        ];
        let mut y = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  podSelector: {selector}\n"
        );
        let t = if rng.gen_bool(0.5) {
            types[0]
        } else {
            types.choose(rng).unwrap()
        };
        for l in t.lines() {
            y.push_str(&format!("  {l}\n"));
        }
        for (field, list) in [("from", "ingress"), ("to", "egress")] {
            let n = rng.gen_range(0..3);
            if n > 0 {
                y.push_str(&format!("  {list}:\n"));
                for _ in 0..n {
                    for l in rule(rng, field).lines() {
                        y.push_str(&format!("  {l}\n"));
                    }
                }
            }
        }
        let np: NetworkPolicy = serde_yaml::from_str(&y).unwrap_or_else(|e| panic!("{e}: {y}"));
        (ObjectKey::new(ns, name), np)
    }

    fn endpoint(rng: &mut StdRng) -> LocalEndpoint {
        let i = rng.gen_range(0..6u32);
        let mut ep = endpoint_dual(rng, i);
        // Some IPv6-only endpoints.
        if ep.ipv6.is_some() && rng.gen_bool(0.3) {
            ep.ipv4 = Ipv4Addr::UNSPECIFIED;
        }
        ep
    }

    fn endpoint_dual(rng: &mut StdRng, i: u32) -> LocalEndpoint {
        LocalEndpoint {
            key: ObjectKey::new(
                *NS.choose(rng).unwrap(),
                format!("p{}", rng.gen_range(0..9)),
            ),
            endpoint_id: i + 1,
            ifindex: 100 + i,
            host_ifname: format!("veth{i}"),
            ipv4: ip(rng),
            ipv6: ip6(rng),
            container_id: format!("c{i}"),
            mac: [0; 6],
        }
    }

    /// One random event; a description of it.
    fn event(rng: &mut StdRng, e: &mut Engine) -> String {
        match rng.gen_range(0..118) {
            106..=113 => {
                let i = rng.gen_range(0..4);
                let y = crate::compiler::tiers::tests::random_cnp(rng, i);
                let c: crate::cnp::ClusterNetworkPolicy = serde_yaml::from_str(&y).unwrap();
                e.apply(Change::ClusterPolicy(Arc::new(c)));
                format!("cluster policy {y}")
            }
            114..=117 => {
                let name = format!("c{}", rng.gen_range(0..4));
                e.apply(Change::ClusterPolicyDeleted(name.clone()));
                format!("cluster policy {name} deleted")
            }
            0..=9 => {
                let ns = namespace(rng);
                let d = format!("namespace {ns:?}");
                e.apply(Change::Namespace(ns));
                d
            }
            10..=12 => {
                let ns = NS.choose(rng).unwrap().to_string();
                e.apply(Change::NamespaceDeleted(ns.clone()));
                format!("namespace {ns} deleted")
            }
            13..=37 => {
                let p = pod(rng);
                let d = format!("pod {p:?}");
                e.apply(Change::Pod(p.into()));
                d
            }
            38..=44 => {
                let key = ObjectKey::new(
                    *NS.choose(rng).unwrap(),
                    format!("p{}", rng.gen_range(0..8)),
                );
                let d = format!("pod {key} deleted");
                e.apply(Change::PodDeleted(key));
                d
            }
            45..=69 => {
                let (key, np) = policy(rng);
                let d = format!("policy {key}: {}", serde_json::to_string(&np.spec).unwrap());
                e.apply(Change::Policy(key, Arc::new(np)));
                d
            }
            70..=76 => {
                let key = ObjectKey::new(
                    *NS.choose(rng).unwrap(),
                    format!("q{}", rng.gen_range(0..6)),
                );
                let d = format!("policy {key} deleted");
                e.apply(Change::PolicyDeleted(key));
                d
            }
            77..=88 => {
                let ep = endpoint(rng);
                let d = format!("endpoint {ep:?}");
                e.add_endpoint(ep);
                d
            }
            89..=93 => {
                let cid = format!("c{}", rng.gen_range(0..6));
                e.remove_endpoint(&cid);
                format!("endpoint {cid} removed")
            }
            94..=97 => {
                let ips = some(rng, &["10.0.0.1", "10.0.1.1", "10.0.0.5", "192.168.0.1"]);
                let ips: Vec<Ipv4Addr> = ips.iter().map(|s| s.parse().unwrap()).collect();
                let d = format!("node addresses {ips:?}");
                e.apply(Change::NodeAddresses(ips));
                d
            }
            100..=103 => {
                // n0 is this node: its addresses are host, the others'
                // remote-node, whatever pod or ipBlock claims them.
                let ips = some(rng, &["10.0.0.5", "10.0.1.5", "192.168.0.1", "10.0.0.200"]);
                let n = crate::model::Node {
                    name: format!("n{}", rng.gen_range(0..3)),
                    addresses: ips.iter().map(|s| s.parse().unwrap()).collect(),
                    addresses6: some(rng, &["fd00::5", "fd00:1::5", "fd00:9::1"])
                        .iter()
                        .map(|s| s.parse().unwrap())
                        .collect(),
                    ..Default::default()
                };
                let d = format!("node {n:?}");
                e.apply(Change::Node(n));
                d
            }
            104..=105 => {
                let name = format!("n{}", rng.gen_range(0..3));
                e.apply(Change::NodeDeleted(name.clone()));
                format!("node {name} deleted")
            }
            _ => {
                let on = rng.gen_bool(0.5);
                e.set_audit(on);
                format!("audit {on}")
            }
        }
    }

    fn run(seed: u64, steps: usize) {
        let mut rng = StdRng::seed_from_u64(seed);
        let configured = if rng.gen_bool(0.5) {
            vec!["10.0.0.1".parse().unwrap()]
        } else {
            Vec::new()
        };
        let mut e = Engine::new(rng.gen_bool(0.1), configured);
        e.set_node_name(Some("n0".into()));
        let mut mirror = sync::Mirror::default();
        check(&mut e, &mut mirror, &format!("seed {seed}, initial"));
        let mut log = Vec::new();
        for i in 0..steps {
            let d = event(&mut rng, &mut e);
            log.push(d);
            let what = format!(
                "seed {seed} (PALISADE_ENGINE_SEED={seed} to replay), step {i}; events:\n  {}\n",
                log.join("\n  ")
            );
            check(&mut e, &mut mirror, &what);
        }
    }

    #[test]
    fn the_engine_always_equals_a_full_compile() {
        if let Some(seed) = std::env::var("PALISADE_ENGINE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            run(seed, 300);
            return;
        }
        let base: u64 = rand::random::<u32>().into();
        for s in 0..40 {
            run(base + s, 150);
        }
    }

    #[test]
    fn a_cni_add_touches_only_that_endpoint() {
        let mut e = Engine::new(false, Vec::new());
        let (key, np) = {
            let y = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}}]\n";
            (
                ObjectKey::new("a", "p"),
                serde_yaml::from_str::<NetworkPolicy>(y).unwrap(),
            )
        };
        e.apply(Change::Policy(key, Arc::new(np)));
        let ep = |i: u32| LocalEndpoint {
            key: ObjectKey::new("a", format!("p{i}")),
            endpoint_id: i,
            ifindex: 100 + i,
            host_ifname: format!("veth{i}"),
            ipv4: Ipv4Addr::new(10, 0, 0, i as u8),
            ipv6: None,
            container_id: format!("c{i}"),
            mac: [0; 6],
        };
        for i in [1, 2] {
            e.apply(Change::Pod(
                Pod {
                    namespace: "a".into(),
                    name: format!("p{i}"),
                    labels: Labels::from([("app".to_string(), "x".to_string())]),
                    ip: None,
                    ipv6: None,
                    host_network: false,
                    ports: Vec::new(),
                }
                .into(),
            ));
        }
        e.add_endpoint(ep(1));
        e.take_touched();
        e.add_endpoint(ep(2));
        let t = e.take_touched();
        // Both pods have the same labels: one identity, so the new
        // endpoint's entries, its ipcache /32 and its endpoint entry only.
        assert_eq!(t.endpoints, HashSet::from([102]));
        assert_eq!(t.ipcache, HashSet::from([(Ipv4Addr::new(10, 0, 0, 2), 32)]));
        assert!(t.policy.iter().all(|(_, k)| k.endpoint_id == 2), "{t:?}");
        assert_eq!(t.policy.len(), 1);
    }

    #[test]
    fn a_deregistered_endpoint_leaves_no_copy_of_its_pod_key() {
        let mut e = Engine::new(false, Vec::new());
        e.apply(Change::Pod(
            Pod {
                namespace: "a".into(),
                name: "p".into(),
                labels: Labels::new(),
                ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
                ipv6: None,
                host_network: false,
                ports: Vec::new(),
            }
            .into(),
        ));
        e.add_endpoint(LocalEndpoint {
            key: ObjectKey::new("a", "p"),
            endpoint_id: 1,
            ifindex: 101,
            host_ifname: "veth1".into(),
            ipv4: Ipv4Addr::new(10, 0, 0, 1),
            ipv6: None,
            container_id: "c1".into(),
            mac: [0; 6],
        });
        e.remove_endpoint("c1");
        // Register/deregister churn must not leave a copy per registration.
        let (model, _) = e.model.pods.first_key_value().unwrap();
        let (held, _) = e.eff.iter().next().unwrap();
        assert!(Arc::ptr_eq(&model.name, &held.name));
        let (_, by_ip) = &e.by_ip[&Ipv4Addr::new(10, 0, 0, 1)][0];
        assert!(Arc::ptr_eq(&model.name, &by_ip.name));
    }

    fn block_policy(name: &str, cidr: &str) -> (ObjectKey, Arc<NetworkPolicy>) {
        let y = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: a}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: {cidr}}}}}]\n");
        (
            ObjectKey::new("a", name),
            Arc::new(serde_yaml::from_str(&y).unwrap()),
        )
    }

    fn cidr_number(e: &Engine, cidr: &str) -> Option<u32> {
        e.view()
            .identities
            .iter()
            .find(|(_, s)| **s == IdentitySource::Cidr(cidr.parse().unwrap()))
            .map(|(id, _)| *id)
    }

    #[test]
    fn a_released_number_is_not_reused_before_the_sync() {
        let mut e = Engine::new(false, Vec::new());
        let (k, np) = block_policy("p", "192.0.2.0/24");
        e.apply(Change::Policy(k.clone(), np));
        let first = cidr_number(&e, "192.0.2.0/24").unwrap();
        e.take_touched();
        e.apply(Change::PolicyDeleted(k));
        let (k2, np2) = block_policy("q", "198.51.100.0/24");
        e.apply(Change::Policy(k2.clone(), np2));
        let second = cidr_number(&e, "198.51.100.0/24").unwrap();
        assert_ne!(
            first, second,
            "one sync must not see a number mean two prefixes"
        );
        e.take_touched();
        e.apply(Change::PolicyDeleted(k2));
        let (k3, np3) = block_policy("r", "203.0.113.0/24");
        e.apply(Change::Policy(k3, np3));
        assert_eq!(
            cidr_number(&e, "203.0.113.0/24"),
            Some(first),
            "reused after a sync"
        );
    }

    #[test]
    fn a_changed_policy_keeps_the_cookies_of_its_rules() {
        let mut e = Engine::new(false, Vec::new());
        let (k, np) = block_policy("p", "192.0.2.0/24");
        e.apply(Change::Policy(k.clone(), np));
        let cookies = e.view().cookies.clone();
        let (_, np) = block_policy("p", "192.0.2.0/25");
        e.apply(Change::Policy(k, np));
        assert_eq!(e.view().cookies, cookies);
    }
}
