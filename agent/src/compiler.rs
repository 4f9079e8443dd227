//! NetworkPolicy compiler: a deterministic function from the model (plus
//! the allocation tables that keep identities and cookies stable across
//! compiles) to the desired map contents.
//!
//! # What it produces
//!
//! * **Identities.** `host` (1) and `world` (2) are reserved. Every distinct
//!   (namespace, namespace labels, pod labels) set of a non-hostNetwork pod
//!   gets a label identity; every distinct ipBlock prefix (`cidr` and each
//!   `except`) of an accepted policy gets a CIDR identity, except
//!   `0.0.0.0/0`, which is `world`. Numbers come from one [`Allocator`] and
//!   stay the same as long as their key is in use.
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
//!   policy's effective `policyTypes`.
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
//! * IPv6 ipBlocks are validated (syntax, `except` inside `cidr`) and then
//!   skipped: the peer matches nothing (the datapath drops IPv6 to enforced
//!   pods anyway). A rule whose only peers are IPv6 blocks therefore allows
//!   nothing; it does not turn into "any peer".
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
//!   cluster (what upstream's "egress on one named port" e2e test expects);
//!   on an ipBlock peer it resolves to nothing. A label identity is keyed by
//!   the pod's named container ports too, so pods with the same labels but
//!   a name mapped to different numbers get different identities, and each
//!   only its own port. An unresolvable name produces no entry (not an error).
//! * Two rules producing the same (prefix, key) keep the lowest cookie.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use ipnetwork::{Ipv4Network, Ipv6Network};
use k8s_openapi::{
    api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};
use palisade_common::{
    EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW, DIR_EGRESS, DIR_INGRESS,
    EP_AUDIT, EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD,
    POLICY_PREFIX_FIXED, POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};
use palisade_dataplane::MapState;

use crate::{
    identity::Allocator,
    model::{ContainerPort, Labels, Model, ObjectKey},
    selector::Selector,
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
    Cidr(Ipv4Network),
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub maps: MapState,
    /// Every cookie of every rule of every accepted policy (whether or not
    /// the rule produced entries on this node).
    pub cookies: HashMap<u32, RuleRef>,
    /// Every identity in use: host, world, label and CIDR identities.
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

/// Label identity key. The named container ports are part of it: egress
/// named ports resolve per destination pod, and the kernel only sees
/// identities (replicas of one workload share their ports, so this rarely
/// adds identities).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LabelSet {
    namespace: String,
    namespace_labels: Labels,
    pod_labels: Labels,
    /// (name, protocol number, port)
    named_ports: BTreeSet<(String, u8, u16)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum IdentityKey {
    Labels(LabelSet),
    Cidr(Ipv4Network),
}

/// Keeps identity and cookie numbers stable across compiles, so that a
/// change touches only the entries it really changes.
#[derive(Debug)]
pub struct Compiler {
    identities: Allocator<IdentityKey>,
    cookies: Allocator<RuleRef>,
}

impl Default for Compiler {
    fn default() -> Self {
        Self {
            identities: Allocator::identities(),
            cookies: Allocator::cookies(),
        }
    }
}

// ---------------------------------------------------------------------------
// Validated policy form.

#[derive(Clone, Debug)]
struct Policy {
    key: ObjectKey,
    selector: Selector,
    ingress: bool,
    egress: bool,
    /// The rules of the effective directions only.
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
struct Rule {
    direction: u8,
    index: usize,
    /// None: no `from`/`to` (or an empty list): any peer.
    peers: Option<Vec<Peer>>,
    /// Empty: all traffic.
    ports: Vec<Port>,
}

#[derive(Clone, Debug)]
enum Peer {
    /// `namespaces: None` = the policy's namespace; `pods: None` = all pods.
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    Block {
        cidr: Ipv4Network,
        except: Vec<Ipv4Network>,
    },
    /// Valid but unsupported (IPv6 ipBlock): matches nothing.
    Nothing,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Port {
    /// All ports of one protocol.
    Proto(u8),
    Range {
        proto: u8,
        start: u16,
        end: u16,
    },
    Named {
        proto: u8,
        name: String,
    },
}

/// What a rejected policy still does: isolate.
#[derive(Clone, Debug)]
struct Isolation {
    /// None: the selector is invalid: every pod of the namespace.
    selector: Option<Selector>,
    ingress: bool,
    egress: bool,
}

impl Isolation {
    fn selects(&self, labels: &Labels) -> bool {
        self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }
}

fn protocol_number(name: Option<&str>) -> Option<u8> {
    match name {
        None | Some("TCP") => Some(PROTO_TCP),
        Some("UDP") => Some(PROTO_UDP),
        Some("SCTP") => Some(PROTO_SCTP),
        Some(_) => None,
    }
}

/// IANA_SVC_NAME, as Kubernetes validates port names.
fn valid_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cidr {
    V4(Ipv4Network),
    V6(Ipv6Network),
}

/// Parses `addr/len`, masking host bits.
fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not in CIDR notation"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?}: invalid address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{s:?}: invalid prefix length"))?;
    match addr {
        IpAddr::V4(a) => {
            let n =
                Ipv4Network::new(a, len).map_err(|_| format!("{s:?}: invalid prefix length"))?;
            Ok(Cidr::V4(Ipv4Network::new(n.network(), len).expect("valid")))
        }
        IpAddr::V6(a) => {
            let n =
                Ipv6Network::new(a, len).map_err(|_| format!("{s:?}: invalid prefix length"))?;
            Ok(Cidr::V6(Ipv6Network::new(n.network(), len).expect("valid")))
        }
    }
}

/// `a` ⊆ `b`.
fn v4_subset(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.prefix() >= b.prefix() && b.contains(a.network())
}

fn parse_ip_block(b: &IPBlock, at: &str) -> Result<Peer, String> {
    let cidr = parse_cidr(&b.cidr).map_err(|e| format!("{at}.cidr: {e}"))?;
    let mut except = Vec::new();
    for (i, e) in b.except.iter().flatten().enumerate() {
        let eat = format!("{at}.except[{i}]");
        let x = parse_cidr(e).map_err(|err| format!("{eat}: {err}"))?;
        let strict = match (cidr, x) {
            (Cidr::V4(c), Cidr::V4(x)) => {
                except.push(x);
                x.prefix() > c.prefix() && c.contains(x.network())
            }
            (Cidr::V6(c), Cidr::V6(x)) => x.prefix() > c.prefix() && c.contains(x.network()),
            _ => return Err(format!("{eat}: {e:?} is not of the address family of cidr")),
        };
        if !strict {
            return Err(format!(
                "{eat}: {e:?} is not a strict subset of cidr {:?}",
                b.cidr
            ));
        }
    }
    Ok(match cidr {
        Cidr::V4(cidr) => Peer::Block { cidr, except },
        Cidr::V6(_) => Peer::Nothing,
    })
}

fn parse_peer(p: &NetworkPolicyPeer, at: &str) -> Result<Peer, String> {
    if let Some(b) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err(format!(
                "{at}: ipBlock cannot be combined with podSelector or namespaceSelector"
            ));
        }
        return parse_ip_block(b, &format!("{at}.ipBlock"));
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        return Err(format!(
            "{at}: must specify podSelector, namespaceSelector or ipBlock"
        ));
    }
    let namespaces = p
        .namespace_selector
        .as_ref()
        .map(|s| Selector::parse(s).map_err(|e| format!("{at}.namespaceSelector.{e}")))
        .transpose()?;
    let pods = p
        .pod_selector
        .as_ref()
        .map(|s| Selector::parse(s).map_err(|e| format!("{at}.podSelector.{e}")))
        .transpose()?;
    Ok(Peer::Pods { namespaces, pods })
}

fn parse_port(p: &NetworkPolicyPort, at: &str) -> Result<Port, String> {
    let proto = protocol_number(p.protocol.as_deref()).ok_or_else(|| {
        format!(
            "{at}.protocol: unsupported protocol {:?} (TCP, UDP or SCTP)",
            p.protocol.as_deref().unwrap_or_default()
        )
    })?;
    match (&p.port, p.end_port) {
        (None, None) => Ok(Port::Proto(proto)),
        (None, Some(_)) => Err(format!("{at}.endPort: requires a numeric port")),
        (Some(IntOrString::String(_)), Some(_)) => {
            Err(format!("{at}.endPort: cannot be used with a named port"))
        }
        (Some(IntOrString::String(name)), None) => {
            if valid_port_name(name) {
                Ok(Port::Named {
                    proto,
                    name: name.clone(),
                })
            } else {
                Err(format!(
                    "{at}.port: {name:?} is not a valid port number or name"
                ))
            }
        }
        (Some(IntOrString::Int(port)), end) => {
            let port = *port;
            if !(1..=65535).contains(&port) {
                return Err(format!("{at}.port: {port} is out of range 1-65535"));
            }
            let end = end.unwrap_or(port);
            if !(port..=65535).contains(&end) {
                return Err(format!("{at}.endPort: {end} must be within {port}-65535"));
            }
            Ok(Port::Range {
                proto,
                start: port as u16,
                end: end as u16,
            })
        }
    }
}

fn parse_rule(
    direction: u8,
    index: usize,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> Result<Rule, String> {
    let (dir, field) = if direction == DIR_INGRESS {
        ("ingress", "from")
    } else {
        ("egress", "to")
    };
    let at = format!("spec.{dir}[{index}]");
    let peers = match peers {
        None => None,
        Some(v) if v.is_empty() => None,
        Some(v) => Some(
            v.iter()
                .enumerate()
                .map(|(i, p)| parse_peer(p, &format!("{at}.{field}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let ports = ports
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| parse_port(p, &format!("{at}.ports[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule {
        direction,
        index,
        peers,
        ports,
    })
}

/// Effective policyTypes (ingress, egress).
fn policy_types(
    spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec,
) -> Result<(bool, bool), String> {
    match spec.policy_types.as_deref() {
        None | Some([]) => Ok((true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))),
        Some(types) => {
            let (mut ingress, mut egress) = (false, false);
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => {
                        let why = format!("unknown policy type {other:?} (Ingress or Egress)");
                        return Err(format!("spec.policyTypes[{i}]: {why}"));
                    }
                }
            }
            Ok((ingress, egress))
        }
    }
}

/// Validates a policy; on failure, the reason and what it still isolates.
fn parse_policy(key: &ObjectKey, np: &NetworkPolicy) -> Result<Policy, (String, Isolation)> {
    let default_spec = Default::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let selector = Selector::parse_opt(spec.pod_selector.as_ref())
        .map_err(|e| format!("spec.podSelector.{e}"));
    let types = policy_types(spec);
    let isolation = || Isolation {
        selector: selector.clone().ok(),
        ingress: types.as_ref().map_or(true, |t| t.0),
        egress: types.as_ref().map_or(true, |t| t.1),
    };
    let fail = |reason: String| (reason, isolation());

    let sel = selector.clone().map_err(fail)?;
    let (ingress, egress) = types.clone().map_err(fail)?;
    let mut rules = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let rule = parse_rule(DIR_INGRESS, i, r.from.as_ref(), r.ports.as_ref()).map_err(fail)?;
        if ingress {
            rules.push(rule);
        }
    }
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let rule = parse_rule(DIR_EGRESS, i, r.to.as_ref(), r.ports.as_ref()).map_err(fail)?;
        if egress {
            rules.push(rule);
        }
    }
    Ok(Policy {
        key: key.clone(),
        selector: sel,
        ingress,
        egress,
        rules,
    })
}

/// Splits `[start, end]` into the fewest aligned power-of-two blocks, as
/// (policy prefix length, first port).
pub fn split_port_range(start: u16, end: u16) -> Vec<(u32, u16)> {
    let mut out = Vec::new();
    let (mut s, e) = (start as u32, end as u32);
    while s <= e {
        let mut size: u32 = if s == 0 {
            1 << 16
        } else {
            1 << s.trailing_zeros().min(16)
        };
        while s + size - 1 > e {
            size >>= 1;
        }
        out.push((POLICY_PREFIX_PROTO + 16 - size.trailing_zeros(), s as u16));
        s += size;
    }
    out
}

// ---------------------------------------------------------------------------
// Compilation.

static NO_LABELS: Labels = Labels::new();

/// A pod as the compiler sees it (model pods plus unknown local endpoints).
struct PodView<'a> {
    labels: &'a Labels,
    ip: Option<Ipv4Addr>,
    host_network: bool,
    ports: &'a [ContainerPort],
    local: bool,
}

/// Per label identity: its label set and the named ports of its pods.
struct LabelInfo {
    set: LabelSet,
    /// (name, protocol) -> port numbers.
    named_ports: BTreeMap<(String, u8), BTreeSet<u16>>,
}

enum PeerSet {
    Any,
    Ids(BTreeSet<u32>),
}

struct Resolved {
    direction: u8,
    cookie: u32,
    peers: PeerSet,
    ports: Vec<Port>,
}

fn insert_entry(
    policy: &mut HashMap<(u32, PolicyKey), PolicyValue>,
    prefix: u32,
    key: PolicyKey,
    cookie: u32,
) {
    policy
        .entry((prefix, key))
        .and_modify(|v| v.cookie = v.cookie.min(cookie))
        .or_insert(PolicyValue {
            action: ACTION_ALLOW,
            cookie,
        });
}

impl Compiler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn compile(&mut self, model: &Model) -> Compiled {
        let mut out = Compiled::default();

        // Namespace labels, always with the name label.
        let mut ns_labels: BTreeMap<String, Labels> = BTreeMap::new();
        let mut ns_labels_of = |name: &str| -> Labels {
            ns_labels
                .entry(name.to_string())
                .or_insert_with(|| {
                    let mut l = model
                        .namespaces
                        .get(name)
                        .map(|n| n.labels.clone())
                        .unwrap_or_default();
                    l.insert(NAMESPACE_NAME_LABEL.into(), name.into());
                    l
                })
                .clone()
        };

        // Pods, with the local endpoints' view applied.
        let mut pods: BTreeMap<ObjectKey, PodView> = model
            .pods
            .iter()
            .map(|(k, p)| {
                let view = PodView {
                    labels: &p.labels,
                    ip: p.ip,
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
                host_network: false,
                ports: &[],
                local: true,
            });
            if !view.host_network {
                view.ip = Some(ep.ipv4);
                view.local = true;
            }
        }

        // Policies.
        let mut accepted = Vec::new();
        let mut isolations: Vec<(ObjectKey, Isolation)> = Vec::new();
        for (key, np) in &model.policies {
            match parse_policy(key, np) {
                Ok(p) => accepted.push(p),
                Err((reason, iso)) => {
                    out.rejected.insert(key.clone(), reason);
                    isolations.push((key.clone(), iso));
                }
            }
        }

        // Label identities.
        let mut pod_identity: BTreeMap<&ObjectKey, u32> = BTreeMap::new();
        let mut labels_by_id: BTreeMap<u32, LabelInfo> = BTreeMap::new();
        for (key, view) in &pods {
            if view.host_network {
                continue;
            }
            let set = LabelSet {
                namespace: key.namespace.clone(),
                namespace_labels: ns_labels_of(&key.namespace),
                pod_labels: view.labels.clone(),
                named_ports: view
                    .ports
                    .iter()
                    .filter_map(|cp| {
                        Some((
                            cp.name.clone()?,
                            protocol_number(Some(&cp.protocol))?,
                            cp.port,
                        ))
                    })
                    .collect(),
            };
            let id = self.identities.assign(&IdentityKey::Labels(set.clone()));
            pod_identity.insert(key, id);
            let info = labels_by_id.entry(id).or_insert_with(|| LabelInfo {
                set,
                named_ports: BTreeMap::new(),
            });
            for cp in view.ports {
                if let (Some(name), Some(proto)) = (&cp.name, protocol_number(Some(&cp.protocol))) {
                    info.named_ports
                        .entry((name.clone(), proto))
                        .or_default()
                        .insert(cp.port);
                }
            }
        }

        // CIDR identities: every prefix of every accepted policy.
        let world = Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid");
        let mut prefixes: BTreeSet<Ipv4Network> = BTreeSet::new();
        for p in &accepted {
            for r in &p.rules {
                for peer in r.peers.iter().flatten() {
                    if let Peer::Block { cidr, except } = peer {
                        prefixes.insert(*cidr);
                        prefixes.extend(except.iter().copied());
                    }
                }
            }
        }
        let mut cidr_ids: BTreeMap<Ipv4Network, u32> = BTreeMap::new();
        cidr_ids.insert(world, IDENTITY_WORLD);
        for net in &prefixes {
            if *net != world {
                cidr_ids.insert(*net, self.identities.assign(&IdentityKey::Cidr(*net)));
            }
        }
        self.identities.finish_round();

        out.identities
            .insert(IDENTITY_HOST, IdentitySource::Reserved("host"));
        out.identities
            .insert(IDENTITY_WORLD, IdentitySource::Reserved("world"));
        for (id, info) in &labels_by_id {
            out.identities.insert(
                *id,
                IdentitySource::Labels {
                    namespace: info.set.namespace.clone(),
                    namespace_labels: info.set.namespace_labels.clone(),
                    pod_labels: info.set.pod_labels.clone(),
                },
            );
        }
        for (net, id) in &cidr_ids {
            if *id != IDENTITY_WORLD {
                out.identities.insert(*id, IdentitySource::Cidr(*net));
            }
        }

        // ipcache, lowest precedence first.
        let mut by_length: Vec<(Ipv4Network, u32)> =
            cidr_ids.iter().map(|(n, i)| (*n, *i)).collect();
        by_length.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix()));
        let longest_cidr = |ip: Ipv4Addr| {
            by_length
                .iter()
                .find(|(n, _)| n.contains(ip))
                .map_or(IDENTITY_WORLD, |(_, id)| *id)
        };
        let ipcache = &mut out.maps.ipcache;
        for (net, id) in &cidr_ids {
            ipcache.insert(
                (net.network(), net.prefix() as u32),
                IpcacheValue {
                    identity: *id,
                    cidr_identity: *id,
                },
            );
        }
        let mut pod_ips = BTreeSet::new();
        for local in [true, false] {
            for (key, view) in pods
                .iter()
                .filter(|(_, v)| v.local == local && !v.host_network)
            {
                let Some(ip) = view.ip else { continue };
                if pod_ips.insert(ip) {
                    ipcache.insert(
                        (ip, 32),
                        IpcacheValue {
                            identity: pod_identity[key],
                            cidr_identity: longest_cidr(ip),
                        },
                    );
                }
            }
        }
        for ip in &model.host_ips {
            ipcache.insert(
                (*ip, 32),
                IpcacheValue {
                    identity: IDENTITY_HOST,
                    cidr_identity: IDENTITY_HOST,
                },
            );
        }

        // Cookies.
        let mut cookie_of: HashMap<(usize, usize), u32> = HashMap::new();
        for (pi, p) in accepted.iter().enumerate() {
            for (ri, r) in p.rules.iter().enumerate() {
                let rr = RuleRef {
                    policy: p.key.clone(),
                    direction: r.direction,
                    rule: r.index,
                };
                let c = self.cookies.assign(&rr);
                cookie_of.insert((pi, ri), c);
                out.cookies.insert(c, rr);
            }
        }
        self.cookies.finish_round();

        // Resolve every rule's peers once.
        let resolved: Vec<Vec<Resolved>> = accepted
            .iter()
            .enumerate()
            .map(|(pi, p)| {
                p.rules
                    .iter()
                    .enumerate()
                    .map(|(ri, r)| Resolved {
                        direction: r.direction,
                        cookie: cookie_of[&(pi, ri)],
                        peers: resolve_peers(&p.key.namespace, r, &labels_by_id, &cidr_ids),
                        ports: r.ports.clone(),
                    })
                    .collect()
            })
            .collect();

        // Endpoints and their policy entries.
        for ep in model.endpoints.values() {
            let view = &pods[&ep.key];
            let mut flags = 0;
            if model.audit
                || model
                    .namespaces
                    .get(&ep.key.namespace)
                    .is_some_and(|n| n.audit)
            {
                flags |= EP_AUDIT;
            }
            let identity = if view.host_network {
                IDENTITY_HOST
            } else {
                pod_identity[&ep.key]
            };
            let mut selected_by = Vec::new();
            let mut isolating: [Vec<ObjectKey>; 2] = Default::default();
            if !view.host_network {
                for (pi, p) in accepted.iter().enumerate() {
                    if p.key.namespace != ep.key.namespace || !p.selector.matches(view.labels) {
                        continue;
                    }
                    selected_by.push(p.key.clone());
                    if p.ingress {
                        flags |= EP_INGRESS_ENFORCED;
                        isolating[DIR_INGRESS as usize].push(p.key.clone());
                    }
                    if p.egress {
                        flags |= EP_EGRESS_ENFORCED;
                        isolating[DIR_EGRESS as usize].push(p.key.clone());
                    }
                    for r in &resolved[pi] {
                        emit_rule(&mut out.maps.policy, ep.endpoint_id, view, r, &labels_by_id);
                    }
                }
                for (key, iso) in &isolations {
                    if key.namespace != ep.key.namespace || !iso.selects(view.labels) {
                        continue;
                    }
                    selected_by.push(key.clone());
                    if iso.ingress {
                        flags |= EP_INGRESS_ENFORCED;
                        isolating[DIR_INGRESS as usize].push(key.clone());
                    }
                    if iso.egress {
                        flags |= EP_EGRESS_ENFORCED;
                        isolating[DIR_EGRESS as usize].push(key.clone());
                    }
                }
            }
            selected_by.sort();
            out.selected_by.insert(ep.key.clone(), selected_by);
            for (dir, mut keys) in isolating.into_iter().enumerate() {
                if !keys.is_empty() {
                    keys.sort();
                    out.isolated_by.insert((ep.endpoint_id, dir as u8), keys);
                }
            }
            out.maps.endpoints.insert(
                ep.ifindex,
                EndpointInfo {
                    endpoint_id: ep.endpoint_id,
                    identity,
                    ipv4: u32::from_ne_bytes(ep.ipv4.octets()),
                    flags,
                },
            );
        }
        out
    }
}

fn resolve_peers(
    policy_ns: &str,
    rule: &Rule,
    labels_by_id: &BTreeMap<u32, LabelInfo>,
    cidr_ids: &BTreeMap<Ipv4Network, u32>,
) -> PeerSet {
    let Some(peers) = &rule.peers else {
        return PeerSet::Any;
    };
    let mut ids = BTreeSet::new();
    for peer in peers {
        match peer {
            Peer::Pods { namespaces, pods } => {
                for (id, info) in labels_by_id {
                    let ns_ok = match namespaces {
                        None => info.set.namespace == policy_ns,
                        Some(sel) => sel.matches(&info.set.namespace_labels),
                    };
                    if ns_ok
                        && pods
                            .as_ref()
                            .is_none_or(|s| s.matches(&info.set.pod_labels))
                    {
                        ids.insert(*id);
                    }
                }
            }
            Peer::Block { cidr, except } => {
                for (net, id) in cidr_ids {
                    if v4_subset(*net, *cidr) && !except.iter().any(|e| v4_subset(*net, *e)) {
                        ids.insert(*id);
                    }
                }
            }
            Peer::Nothing => {}
        }
    }
    PeerSet::Ids(ids)
}

fn emit_rule(
    policy: &mut HashMap<(u32, PolicyKey), PolicyValue>,
    endpoint_id: u32,
    view: &PodView,
    r: &Resolved,
    labels_by_id: &BTreeMap<u32, LabelInfo>,
) {
    let peers: Vec<u32> = match &r.peers {
        PeerSet::Any => vec![IDENTITY_ANY],
        PeerSet::Ids(ids) => ids.iter().copied().collect(),
    };
    let key = |peer_identity, protocol, port: u16| PolicyKey {
        endpoint_id,
        peer_identity,
        direction: r.direction,
        protocol,
        dport_be: port.to_be(),
    };
    if r.ports.is_empty() {
        for &p in &peers {
            insert_entry(policy, POLICY_PREFIX_FIXED, key(p, 0, 0), r.cookie);
        }
        return;
    }
    for port in &r.ports {
        match port {
            Port::Proto(proto) => {
                for &p in &peers {
                    insert_entry(policy, POLICY_PREFIX_PROTO, key(p, *proto, 0), r.cookie);
                }
            }
            Port::Range { proto, start, end } => {
                for (prefix, first) in split_port_range(*start, *end) {
                    for &p in &peers {
                        insert_entry(policy, prefix, key(p, *proto, first), r.cookie);
                    }
                }
            }
            Port::Named { proto, name } if r.direction == DIR_INGRESS => {
                let numbers: BTreeSet<u16> = view
                    .ports
                    .iter()
                    .filter(|cp| {
                        cp.name.as_deref() == Some(name.as_str())
                            && protocol_number(Some(&cp.protocol)) == Some(*proto)
                    })
                    .map(|cp| cp.port)
                    .collect();
                for n in numbers {
                    for &p in &peers {
                        insert_entry(policy, POLICY_PREFIX_FULL, key(p, *proto, n), r.cookie);
                    }
                }
            }
            Port::Named { proto, name } => {
                let lookup = (name.clone(), *proto);
                let mut emit_for = |id: u32, info: &LabelInfo| {
                    for &n in info.named_ports.get(&lookup).into_iter().flatten() {
                        insert_entry(policy, POLICY_PREFIX_FULL, key(id, *proto, n), r.cookie);
                    }
                };
                match &r.peers {
                    PeerSet::Any => {
                        for (id, info) in labels_by_id {
                            emit_for(*id, info);
                        }
                    }
                    PeerSet::Ids(ids) => {
                        for id in ids {
                            if let Some(info) = labels_by_id.get(id) {
                                emit_for(*id, info);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LocalEndpoint, Namespace, Pod};
    use palisade_common::{reason, PROTO_ICMP};
    use palisade_dataplane::{
        packet::{Packet, TCP_FLAG_SYN},
        reference::Evaluator,
    };

    // -- harness ------------------------------------------------------------

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[derive(Default)]
    struct T {
        model: Model,
        compiler: Compiler,
    }

    impl T {
        fn new() -> Self {
            Self::default()
        }

        fn ns(&mut self, name: &str, l: &[(&str, &str)]) -> &mut Self {
            let ns = Namespace {
                name: name.into(),
                labels: labels(l),
                audit: false,
            };
            self.model.namespaces.insert(name.into(), ns);
            self
        }

        fn pod(&mut self, ns: &str, name: &str, l: &[(&str, &str)], addr: &str) -> &mut Pod {
            let p = Pod {
                namespace: ns.into(),
                name: name.into(),
                labels: labels(l),
                ip: (!addr.is_empty()).then(|| ip(addr)),
                host_network: false,
                ports: Vec::new(),
            };
            let key = ObjectKey::new(ns, name);
            self.model.pods.insert(key.clone(), p);
            self.model.pods.get_mut(&key).unwrap()
        }

        /// Registers a pod of the model as a local endpoint with endpoint
        /// id and ifindex `id`.
        fn local(&mut self, ns: &str, name: &str, id: u32) -> &mut Self {
            let key = ObjectKey::new(ns, name);
            let addr = self
                .model
                .pods
                .get(&key)
                .and_then(|p| p.ip)
                .unwrap_or(Ipv4Addr::new(10, 9, 0, id as u8));
            self.model.endpoints.insert(
                format!("c{id}"),
                LocalEndpoint {
                    key,
                    endpoint_id: id,
                    ifindex: id,
                    host_ifname: format!("veth{id}"),
                    ipv4: addr,
                    container_id: format!("c{id}"),
                },
            );
            self
        }

        fn policy(&mut self, yaml: &str) -> ObjectKey {
            let np: NetworkPolicy = serde_yaml::from_str(yaml).expect("test policy yaml");
            let key = ObjectKey::new(
                np.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                np.metadata.name.clone().unwrap(),
            );
            self.model.policies.insert(key.clone(), np);
            key
        }

        fn compile(&mut self) -> Compiled {
            self.compiler.compile(&self.model)
        }
    }

    /// A policy in `ns` named `name` with the given spec (YAML, indented by
    /// two spaces under `spec:`).
    fn np(ns: &str, name: &str, spec: &str) -> String {
        let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
        )
    }

    // -- the kernel's verdict, through the reference evaluator ---------------
    // (palisade_dataplane::reference, held to the kernel by the differential
    // test), on the compiled map contents.

    #[derive(Debug, PartialEq, Eq)]
    enum V {
        Unenforced,
        Host,
        Allow(u32),
        Drop,
    }

    fn ipcache_lookup(c: &Compiled, addr: Ipv4Addr) -> IpcacheValue {
        Evaluator::new(&c.maps)
            .ipcache_lookup(addr)
            .unwrap_or(IpcacheValue {
                identity: IDENTITY_WORLD,
                cidr_identity: IDENTITY_WORLD,
            })
    }

    /// The verdict on the first packet of a flow between the endpoint on
    /// `ifindex` and `peer`, at the program of direction `dir`.
    fn decide(c: &Compiled, ifindex: u32, dir: u8, peer: &str, proto: u8, port: u16) -> V {
        let me = palisade_dataplane::maps::from_be(c.maps.endpoints[&ifindex].ipv4);
        let (src, dst) = if dir == DIR_EGRESS {
            (me, ip(peer))
        } else {
            (ip(peer), me)
        };
        let packet = match proto {
            PROTO_TCP => Packet::tcp(src, 40000, dst, port, TCP_FLAG_SYN),
            PROTO_UDP => Packet::udp(src, 40000, dst, port),
            PROTO_SCTP => Packet::sctp(src, 40000, dst, port),
            PROTO_ICMP => Packet::icmp_echo(src, dst, 7, 1),
            p => Packet::ipv4_proto(src, dst, p),
        };
        let v = Evaluator::new(&c.maps).evaluate(ifindex, dir, &packet);
        match v.reason {
            reason::UNENFORCED => V::Unenforced,
            reason::HOST => V::Host,
            reason::POLICY_ALLOW => V::Allow(v.cookie),
            _ => V::Drop,
        }
    }

    fn allowed(c: &Compiled, ifindex: u32, dir: u8, peer: &str, proto: u8, port: u16) -> bool {
        matches!(
            decide(c, ifindex, dir, peer, proto, port),
            V::Allow(_) | V::Unenforced | V::Host
        )
    }

    fn ingress_ok(c: &Compiled, ifindex: u32, from: &str, port: u16) -> bool {
        allowed(c, ifindex, DIR_INGRESS, from, PROTO_TCP, port)
    }

    fn egress_ok(c: &Compiled, ifindex: u32, to: &str, port: u16) -> bool {
        allowed(c, ifindex, DIR_EGRESS, to, PROTO_TCP, port)
    }

    fn flags(c: &Compiled, ifindex: u32) -> u32 {
        c.maps.endpoints[&ifindex].flags
    }

    fn label_id(c: &Compiled, ns: &str, l: &[(&str, &str)]) -> u32 {
        let want = labels(l);
        let found: Vec<u32> = c
            .identities
            .iter()
            .filter(|(_, s)| {
                matches!(s, IdentitySource::Labels { namespace, pod_labels, .. }
                    if namespace == ns && *pod_labels == want)
            })
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(found.len(), 1, "identity of {ns} {l:?}: {found:?}");
        found[0]
    }

    fn cidr_id(c: &Compiled, cidr: &str) -> u32 {
        let net: Ipv4Network = cidr.parse().unwrap();
        *c.identities
            .iter()
            .find(|(_, s)| **s == IdentitySource::Cidr(net))
            .unwrap_or_else(|| panic!("no identity for {cidr}"))
            .0
    }

    /// Two namespaces with three pods each, all local; pod ids:
    /// a/web=1 a/db=2 a/other=3 b/web=4 b/db=5 b/client=6.
    fn two_namespaces() -> T {
        let mut t = T::new();
        t.ns("a", &[("team", "alpha"), ("env", "prod")]);
        t.ns("b", &[("team", "beta"), ("env", "dev")]);
        t.pod("a", "web", &[("app", "web")], "10.0.0.1");
        t.pod("a", "db", &[("app", "db")], "10.0.0.2");
        t.pod("a", "other", &[("app", "other"), ("tier", "x")], "10.0.0.3");
        t.pod("b", "web", &[("app", "web")], "10.0.1.1");
        t.pod("b", "db", &[("app", "db")], "10.0.1.2");
        t.pod("b", "client", &[("app", "client")], "10.0.1.3");
        for (i, (ns, n)) in [
            ("a", "web"),
            ("a", "db"),
            ("a", "other"),
            ("b", "web"),
            ("b", "db"),
            ("b", "client"),
        ]
        .into_iter()
        .enumerate()
        {
            t.local(ns, n, i as u32 + 1);
        }
        t
    }

    const A_WEB: &str = "10.0.0.1";
    const A_DB: &str = "10.0.0.2";
    const A_OTHER: &str = "10.0.0.3";
    const B_WEB: &str = "10.0.1.1";
    const B_DB: &str = "10.0.1.2";
    const B_CLIENT: &str = "10.0.1.3";

    // -- no policy, selection, isolation -----------------------------------

    #[test]
    fn without_policies_nothing_is_enforced() {
        let mut t = two_namespaces();
        let c = t.compile();
        assert_eq!(c.maps.endpoints.len(), 6);
        assert!(c.maps.policy.is_empty());
        assert!(c.maps.endpoints.values().all(|e| e.flags == 0));
        assert_eq!(
            decide(&c, 1, DIR_INGRESS, B_WEB, PROTO_TCP, 80),
            V::Unenforced
        );
        let e = c.maps.endpoints[&1];
        assert_eq!(e.endpoint_id, 1);
        assert_eq!(e.ipv4, u32::from_ne_bytes([10, 0, 0, 1]));
        assert_eq!(e.identity, label_id(&c, "a", &[("app", "web")]));
    }

    #[test]
    fn default_deny_isolates_only_the_selected_direction() {
        let mut t = two_namespaces();
        t.policy(&np("a", "deny", "podSelector: {}"));
        let c = t.compile();
        for id in 1..=3 {
            assert_eq!(flags(&c, id), EP_INGRESS_ENFORCED);
            assert!(!ingress_ok(&c, id, B_CLIENT, 80));
            assert!(egress_ok(&c, id, B_CLIENT, 80));
        }
        for id in 4..=6 {
            assert_eq!(flags(&c, id), 0);
        }
        assert!(c.maps.policy.is_empty());
        assert_eq!(c.isolating(1, DIR_INGRESS), &[ObjectKey::new("a", "deny")]);
        assert!(c.isolating(1, DIR_EGRESS).is_empty());
        assert_eq!(
            c.selected_by[&ObjectKey::new("a", "web")],
            vec![ObjectKey::new("a", "deny")]
        );
    }

    #[test]
    fn egress_only_policy_isolates_egress_only() {
        let mut t = two_namespaces();
        t.policy(&np(
            "a",
            "deny-egress",
            "podSelector: {}\npolicyTypes: [Egress]\ningress:\n- {}",
        ));
        let c = t.compile();
        assert_eq!(flags(&c, 1), EP_EGRESS_ENFORCED);
        // The ingress rule is ignored: Ingress is not in policyTypes.
        assert!(c.maps.policy.is_empty());
        assert!(c.cookies.is_empty());
        assert!(!egress_ok(&c, 1, B_WEB, 80));
        assert_eq!(
            decide(&c, 1, DIR_INGRESS, B_WEB, PROTO_TCP, 80),
            V::Unenforced
        );
    }

    #[test]
    fn policy_types_default_from_the_egress_field() {
        let mut t = two_namespaces();
        // Egress rules present, no policyTypes: both directions.
        t.policy(&np(
            "a",
            "both",
            "podSelector: {matchLabels: {app: web}}\negress:\n- to: [{podSelector: {}}]",
        ));
        // egress: [] does not count: ingress only.
        t.policy(&np(
            "a",
            "ingress-only",
            "podSelector: {matchLabels: {app: db}}\negress: []",
        ));
        // policyTypes: [] is treated as absent.
        t.policy(&np(
            "a",
            "empty-types",
            "podSelector: {matchLabels: {app: other}}\npolicyTypes: []",
        ));
        let c = t.compile();
        assert_eq!(flags(&c, 1), EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED);
        assert_eq!(flags(&c, 2), EP_INGRESS_ENFORCED);
        assert_eq!(flags(&c, 3), EP_INGRESS_ENFORCED);
        assert!(egress_ok(&c, 1, A_DB, 80));
        assert!(!egress_ok(&c, 1, B_DB, 80));
        assert!(!ingress_ok(&c, 1, A_DB, 80));
    }

    #[test]
    fn pod_selector_selects_within_the_policy_namespace_only() {
        let mut t = two_namespaces();
        t.policy(&np("a", "web", "podSelector: {matchLabels: {app: web}}"));
        t.policy(&np(
            "b",
            "not-web",
            "podSelector:\n  matchExpressions: [{key: app, operator: NotIn, values: [web]}]",
        ));
        let c = t.compile();
        assert_eq!(flags(&c, 1), EP_INGRESS_ENFORCED);
        assert_eq!(flags(&c, 2), 0);
        assert_eq!(flags(&c, 3), 0);
        assert_eq!(flags(&c, 4), 0);
        assert_eq!(flags(&c, 5), EP_INGRESS_ENFORCED);
        assert_eq!(flags(&c, 6), EP_INGRESS_ENFORCED);
    }

    // -- peers ----------------------------------------------------------------

    #[test]
    fn rule_without_peers_or_ports_allows_everything() {
        let mut t = two_namespaces();
        let k = t.policy(&np(
            "a",
            "all",
            "podSelector: {matchLabels: {app: web}}\ningress:\n- {}",
        ));
        t.policy(&np(
            "a",
            "all2",
            "podSelector: {matchLabels: {app: db}}\ningress:\n- from: []\n  ports: []",
        ));
        let c = t.compile();
        let cookie = *c.cookies.iter().find(|(_, r)| r.policy == k).unwrap().0;
        let key = PolicyKey {
            endpoint_id: 1,
            peer_identity: IDENTITY_ANY,
            direction: DIR_INGRESS,
            protocol: 0,
            dport_be: 0,
        };
        assert_eq!(
            c.maps.policy.get(&(POLICY_PREFIX_FIXED, key)),
            Some(&PolicyValue {
                action: ACTION_ALLOW,
                cookie
            })
        );
        assert_eq!(c.maps.policy.len(), 2);
        assert_eq!(
            decide(&c, 1, DIR_INGRESS, "8.8.8.8", PROTO_UDP, 53),
            V::Allow(cookie)
        );
        assert!(allowed(&c, 1, DIR_INGRESS, B_CLIENT, PROTO_ICMP, 0));
        assert!(ingress_ok(&c, 2, "1.2.3.4", 1));
    }

    #[test]
    fn pod_selector_peer_is_limited_to_the_policy_namespace() {
        let mut t = two_namespaces();
        t.policy(&np("a", "p", "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{podSelector: {matchLabels: {app: web}}}]"));
        let c = t.compile();
        assert!(ingress_ok(&c, 2, A_WEB, 5432));
        assert!(!ingress_ok(&c, 2, B_WEB, 5432));
        assert!(!ingress_ok(&c, 2, A_OTHER, 5432));
        assert!(!ingress_ok(&c, 2, "192.0.2.1", 5432));
        // Exactly one entry: a/web's identity.
        assert_eq!(c.maps.policy.len(), 1);
        let (&(prefix, key), _) = c.maps.policy.iter().next().unwrap();
        assert_eq!(prefix, POLICY_PREFIX_FIXED);
        assert_eq!(key.peer_identity, label_id(&c, "a", &[("app", "web")]));
    }

    #[test]
    fn empty_pod_selector_peer_is_every_pod_of_the_namespace() {
        let mut t = two_namespaces();
        t.policy(&np(
            "a",
            "p",
            "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{podSelector: {}}]",
        ));
        let c = t.compile();
        assert!(ingress_ok(&c, 2, A_WEB, 1));
        assert!(ingress_ok(&c, 2, A_OTHER, 1));
        assert!(ingress_ok(&c, 2, A_DB, 1));
        assert!(!ingress_ok(&c, 2, B_WEB, 1));
        assert!(!ingress_ok(&c, 2, "198.51.100.1", 1));
    }

    #[test]
    fn empty_namespace_selector_peer_is_every_pod_of_the_cluster() {
        let mut t = two_namespaces();
        t.policy(&np(
            "a",
            "p",
            "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{namespaceSelector: {}}]",
        ));
        let c = t.compile();
        for peer in [A_WEB, A_OTHER, B_WEB, B_DB, B_CLIENT] {
            assert!(ingress_ok(&c, 2, peer, 1), "{peer}");
        }
        assert!(!ingress_ok(&c, 2, "198.51.100.1", 1));
    }

    #[test]
    fn namespace_selector_matches_namespace_labels() {
        let mut t = two_namespaces();
        t.policy(&np("a", "p", "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {team: beta}}}]"));
        t.policy(&np("b", "q", "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: a}}}]"));
        let c = t.compile();
        assert!(ingress_ok(&c, 2, B_WEB, 1));
        assert!(ingress_ok(&c, 2, B_CLIENT, 1));
        assert!(!ingress_ok(&c, 2, A_WEB, 1));
        // The implicit name label works, and matchExpressions on it too.
        assert!(ingress_ok(&c, 5, A_WEB, 1));
        assert!(!ingress_ok(&c, 5, B_WEB, 1));
    }

    #[test]
    fn namespace_selector_expressions() {
        let mut t = two_namespaces();
        t.ns("c", &[("team", "gamma")]);
        t.pod("c", "x", &[], "10.0.2.1");
        t.policy(&np(
            "a",
            "p",
            "podSelector: {matchLabels: {app: db}}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions:\n      - {key: env, operator: Exists}\n      - {key: team, operator: In, values: [beta, gamma]}",
        ));
        let c = t.compile();
        assert!(ingress_ok(&c, 2, B_WEB, 1));
        // c has no env label.
        assert!(!ingress_ok(&c, 2, "10.0.2.1", 1));
        assert!(!ingress_ok(&c, 2, A_WEB, 1));
    }

    #[test]
    fn selectors_in_one_peer_are_anded_separate_peers_ored() {
        let mut t = two_namespaces();
        // AND: web pods in namespaces with team=beta.
        t.policy(&np(
            "a",
            "and",
            "podSelector: {matchLabels: {app: db}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: beta}}\n    podSelector: {matchLabels: {app: web}}",
        ));
        // OR: any pod of team=beta, or web pods of the policy's namespace.
        t.policy(&np(
            "a",
            "or",
            "podSelector: {matchLabels: {app: other}}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: beta}}\n  - podSelector: {matchLabels: {app: web}}",
        ));
        let c = t.compile();
        assert!(ingress_ok(&c, 2, B_WEB, 1));
        assert!(!ingress_ok(&c, 2, B_CLIENT, 1));
        assert!(!ingress_ok(&c, 2, A_WEB, 1));

        assert!(ingress_ok(&c, 3, B_WEB, 1));
        assert!(ingress_ok(&c, 3, B_CLIENT, 1));
        assert!(ingress_ok(&c, 3, A_WEB, 1));
        assert!(!ingress_ok(&c, 3, A_DB, 1));
    }

    #[test]
    fn pod_selector_expressions_in_peers() {
        let mut t = two_namespaces();
        t.policy(&np(
            "a",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress:\n- from:\n  - podSelector:\n      matchExpressions:\n      - {key: tier, operator: DoesNotExist}\n      - {key: app, operator: NotIn, values: [web]}",
        ));
        let c = t.compile();
        assert!(ingress_ok(&c, 1, A_DB, 1));
        assert!(!ingress_ok(&c, 1, A_OTHER, 1)); // has tier
        assert!(!ingress_ok(&c, 1, A_WEB, 1)); // app=web
    }

    #[test]
    fn pods_without_an_address_still_have_identities() {
        let mut t = two_namespaces();
        t.pod("a", "pending", &[("app", "pending")], "");
        t.policy(&np("a", "p", "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{podSelector: {matchLabels: {app: pending}}}]"));
        let c = t.compile();
        let id = label_id(&c, "a", &[("app", "pending")]);
        assert!(c.maps.policy.keys().any(|(_, k)| k.peer_identity == id));
        assert!(!c.maps.ipcache.values().any(|v| v.identity == id));
    }

    #[test]
    fn egress_peers_and_union_of_two_policies() {
        let mut t = two_namespaces();
        t.policy(&np("b", "to-db", "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress:\n- to: [{podSelector: {matchLabels: {app: db}}}]\n  ports: [{port: 5432}]"));
        t.policy(&np("b", "to-web", "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress:\n- to: [{podSelector: {matchLabels: {app: web}}}]\n  ports: [{port: 80}]"));
        let c = t.compile();
        assert_eq!(flags(&c, 6), EP_EGRESS_ENFORCED);
        assert!(egress_ok(&c, 6, B_DB, 5432));
        assert!(egress_ok(&c, 6, B_WEB, 80));
        assert!(!egress_ok(&c, 6, B_DB, 80));
        assert!(!egress_ok(&c, 6, B_WEB, 5432));
        assert!(!egress_ok(&c, 6, A_DB, 5432));
        assert_eq!(
            c.isolating(6, DIR_EGRESS),
            &[ObjectKey::new("b", "to-db"), ObjectKey::new("b", "to-web")]
        );
        // Each allow names its own rule.
        let V::Allow(c1) = decide(&c, 6, DIR_EGRESS, B_DB, PROTO_TCP, 5432) else {
            panic!()
        };
        let V::Allow(c2) = decide(&c, 6, DIR_EGRESS, B_WEB, PROTO_TCP, 80) else {
            panic!()
        };
        assert_eq!(
            c.cookies[&c1],
            RuleRef {
                policy: ObjectKey::new("b", "to-db"),
                direction: DIR_EGRESS,
                rule: 0
            }
        );
        assert_eq!(
            c.cookies[&c2],
            RuleRef {
                policy: ObjectKey::new("b", "to-web"),
                direction: DIR_EGRESS,
                rule: 0
            }
        );
    }

    #[test]
    fn a_policy_that_allows_one_direction_does_not_isolate_the_other_union() {
        let mut t = two_namespaces();
        t.policy(&np("a", "ing", "podSelector: {matchLabels: {app: web}}\ningress:\n- from: [{podSelector: {matchLabels: {app: db}}}]"));
        t.policy(&np("a", "ing2", "podSelector: {}\ningress:\n- from: [{namespaceSelector: {matchLabels: {team: beta}}, podSelector: {matchLabels: {app: client}}}]"));
        let c = t.compile();
        // Union of two ingress policies on a/web.
        assert!(ingress_ok(&c, 1, A_DB, 1));
        assert!(ingress_ok(&c, 1, B_CLIENT, 1));
        assert!(!ingress_ok(&c, 1, A_OTHER, 1));
        // a/db only has the second.
        assert!(!ingress_ok(&c, 2, A_WEB, 1));
        assert!(ingress_ok(&c, 2, B_CLIENT, 1));
        // Egress untouched.
        assert!(egress_ok(&c, 1, "1.1.1.1", 443));
    }

    #[test]
    fn identical_entries_keep_the_lowest_cookie() {
        let mut t = two_namespaces();
        t.policy(&np("a", "p1", "podSelector: {matchLabels: {app: web}}\ningress:\n- from: [{podSelector: {matchLabels: {app: db}}}]\n- from: [{podSelector: {matchLabels: {app: db}}}]"));
        t.policy(&np("a", "p2", "podSelector: {matchLabels: {app: web}}\ningress:\n- from: [{podSelector: {matchLabels: {app: db}}}]"));
        let c = t.compile();
        assert_eq!(c.maps.policy.len(), 1);
        assert_eq!(c.cookies.len(), 3);
        let v = c.maps.policy.values().next().unwrap();
        assert_eq!(v.cookie, *c.cookies.keys().min().unwrap());
        assert_eq!(c.cookies[&v.cookie].policy, ObjectKey::new("a", "p1"));
    }

    // -- hostNetwork, unknown endpoints ---------------------------------------

    #[test]
    fn host_network_pods_are_never_selected_nor_peers() {
        let mut t = two_namespaces();
        t.model.host_ips.push(ip("192.168.0.10"));
        let h = t.pod("a", "agent", &[("app", "web")], "192.168.0.10");
        h.host_network = true;
        t.pod("a", "remote-host", &[("app", "web")], "192.168.0.11")
            .host_network = true;
        t.policy(&np(
            "a",
            "p",
            "podSelector: {}\ningress:\n- from: [{namespaceSelector: {}}]",
        ));
        let c = t.compile();
        // No identity for the hostNetwork pods' labels beyond a/web's own.
        let a_web = label_id(&c, "a", &[("app", "web")]);
        assert_eq!(
            ipcache_lookup(&c, ip("192.168.0.10")).identity,
            IDENTITY_HOST
        );
        assert_eq!(
            ipcache_lookup(&c, ip("192.168.0.11")).identity,
            IDENTITY_WORLD
        );
        assert!(!c.maps.ipcache.contains_key(&(ip("192.168.0.11"), 32)));
        assert_ne!(ipcache_lookup(&c, ip("192.168.0.11")).identity, a_web);
        // Node traffic passes (host), a remote node's does not match pod peers.
        assert_eq!(
            decide(&c, 1, DIR_INGRESS, "192.168.0.10", PROTO_TCP, 1),
            V::Host
        );
        assert!(!ingress_ok(&c, 1, "192.168.0.11", 1));
        // A hostNetwork pod registered as a local endpoint is never selected.
        t.local("a", "agent", 9);
        let c = t.compile();
        assert_eq!(flags(&c, 9), 0);
        assert_eq!(c.maps.endpoints[&9].identity, IDENTITY_HOST);
        assert!(!c.maps.policy.keys().any(|(_, k)| k.endpoint_id == 9));
    }

    #[test]
    fn local_endpoint_without_a_pod_gets_the_empty_label_identity() {
        let mut t = two_namespaces();
        t.local("a", "new", 7);
        t.local("b", "new", 8);
        t.policy(&np("a", "deny", "podSelector: {}"));
        t.policy(&np(
            "b",
            "web-only",
            "podSelector: {matchLabels: {app: web}}",
        ));
        t.policy(&np("b", "from-unlabelled", "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{podSelector: {matchExpressions: [{key: app, operator: DoesNotExist}]}}]"));
        let c = t.compile();
        assert_eq!(flags(&c, 7), EP_INGRESS_ENFORCED);
        assert_eq!(flags(&c, 8), 0);
        let id = label_id(&c, "b", &[]);
        assert_eq!(c.maps.endpoints[&8].identity, id);
        assert_eq!(ipcache_lookup(&c, ip("10.9.0.8")).identity, id);
        assert!(ingress_ok(&c, 5, "10.9.0.8", 1));
        assert!(!ingress_ok(&c, 5, B_WEB, 1));
    }

    #[test]
    fn the_endpoint_address_wins_for_local_pods() {
        let mut t = two_namespaces();
        t.pod("a", "late", &[("app", "late")], "");
        t.local("a", "late", 9);
        let c = t.compile();
        let id = label_id(&c, "a", &[("app", "late")]);
        assert_eq!(c.maps.ipcache[&(ip("10.9.0.9"), 32)].identity, id);
    }

    // -- ipBlock ------------------------------------------------------------

    #[test]
    fn ipcache_contents() {
        let mut t = two_namespaces();
        t.model.host_ips = vec![ip("192.168.0.10")];
        t.policy(&np("a", "p", "podSelector: {}\negress:\n- to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}, {ipBlock: {cidr: 0.0.0.0/0}}]"));
        let c = t.compile();
        let world = IpcacheValue {
            identity: IDENTITY_WORLD,
            cidr_identity: IDENTITY_WORLD,
        };
        assert_eq!(c.maps.ipcache[&(ip("0.0.0.0"), 0)], world);
        let host = IpcacheValue {
            identity: IDENTITY_HOST,
            cidr_identity: IDENTITY_HOST,
        };
        assert_eq!(c.maps.ipcache[&(ip("192.168.0.10"), 32)], host);
        let c16 = cidr_id(&c, "10.0.0.0/16");
        let c24 = cidr_id(&c, "10.0.1.0/24");
        assert!(
            c16 >= palisade_common::IDENTITY_FIRST_DYNAMIC
                && c24 >= palisade_common::IDENTITY_FIRST_DYNAMIC
        );
        assert_eq!(
            c.maps.ipcache[&(ip("10.0.0.0"), 16)],
            IpcacheValue {
                identity: c16,
                cidr_identity: c16
            }
        );
        assert_eq!(
            c.maps.ipcache[&(ip("10.0.1.0"), 24)],
            IpcacheValue {
                identity: c24,
                cidr_identity: c24
            }
        );
        let a_web = label_id(&c, "a", &[("app", "web")]);
        assert_eq!(
            c.maps.ipcache[&(ip(A_WEB), 32)],
            IpcacheValue {
                identity: a_web,
                cidr_identity: c16
            }
        );
        let b_web = label_id(&c, "b", &[("app", "web")]);
        assert_eq!(
            c.maps.ipcache[&(ip(B_WEB), 32)],
            IpcacheValue {
                identity: b_web,
                cidr_identity: c24
            }
        );
        // 0.0.0.0/0 is world, not a CIDR identity of its own.
        assert!(!c
            .identities
            .values()
            .any(|s| *s == IdentitySource::Cidr("0.0.0.0/0".parse().unwrap())));
        // prefixes (3) + host + 6 pods.
        assert_eq!(c.maps.ipcache.len(), 3 + 1 + 6);
        assert_eq!(c.identities.len(), 2 + 6 + 2);
    }

    #[test]
    fn pod_outside_every_block_has_world_as_cidr_identity() {
        let mut t = two_namespaces();
        t.policy(&np(
            "a",
            "p",
            "podSelector: {}\negress:\n- to: [{ipBlock: {cidr: 172.16.0.0/12}}]",
        ));
        let c = t.compile();
        assert_eq!(
            c.maps.ipcache[&(ip(A_WEB), 32)].cidr_identity,
            IDENTITY_WORLD
        );
    }

    #[test]
    fn ip_block_with_except_external_addresses() {
        let mut t = two_namespaces();
        t.policy(&np("a", "p", "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}]"));
        // Another policy's prefix inside the except and one straddling it.
        t.policy(&np("b", "q", "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 203.0.113.192/26}}, {ipBlock: {cidr: 203.0.113.0/30}}, {ipBlock: {cidr: 203.0.0.0/16}}]"));
        let c = t.compile();
        assert!(egress_ok(&c, 1, "203.0.113.1", 443)); // in the /30 of the other policy
        assert!(egress_ok(&c, 1, "203.0.113.100", 443));
        assert!(!egress_ok(&c, 1, "203.0.113.129", 443)); // except
        assert!(!egress_ok(&c, 1, "203.0.113.200", 443)); // except (in the other /26)
        assert!(!egress_ok(&c, 1, "203.0.114.1", 443)); // in the other /16 only
        assert!(!egress_ok(&c, 1, "8.8.8.8", 443));
        // b's /16 covers everything in it, excepts of a do not apply.
        assert!(egress_ok(&c, 4, "203.0.113.129", 1));
        assert!(egress_ok(&c, 4, "203.0.114.1", 1));
    }

    #[test]
    fn ip_block_except_applies_to_pod_addresses() {
        let mut t = two_namespaces();
        // 10.0.0.0/16 except 10.0.1.0/24: a's pods in, b's pods out.
        t.policy(&np("a", "p", "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}]"));
        t.policy(&np("b", "q", "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{ipBlock: {cidr: 10.0.1.2/32}}]"));
        let c = t.compile();
        assert!(ingress_ok(&c, 2, A_WEB, 1));
        assert!(ingress_ok(&c, 2, A_OTHER, 1));
        assert!(!ingress_ok(&c, 2, B_WEB, 1));
        assert!(!ingress_ok(&c, 2, B_CLIENT, 1));
        assert!(ingress_ok(&c, 2, "10.0.200.1", 1));
        // A /32 block on a pod address: the pod entry keeps its label
        // identity and gets the /32 as CIDR identity.
        let v = c.maps.ipcache[&(ip(B_DB), 32)];
        assert_eq!(v.identity, label_id(&c, "b", &[("app", "db")]));
        assert_eq!(v.cidr_identity, cidr_id(&c, "10.0.1.2/32"));
        assert!(ingress_ok(&c, 5, B_DB, 1));
        assert!(!ingress_ok(&c, 5, B_WEB, 1));
    }

    #[test]
    fn ip_block_everything_except() {
        let mut t = two_namespaces();
        t.policy(&np("a", "p", "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]"));
        let c = t.compile();
        assert!(egress_ok(&c, 1, "8.8.8.8", 53));
        assert!(!egress_ok(&c, 1, "10.200.0.1", 53));
        assert!(!egress_ok(&c, 1, B_WEB, 53));
        // The world entry is the allowed prefix for 0.0.0.0/0.
        assert!(c
            .maps
            .policy
            .keys()
            .any(|(_, k)| k.peer_identity == IDENTITY_WORLD));
    }

    #[test]
    fn ipv6_blocks_are_skipped_and_do_not_mean_any() {
        let mut t = two_namespaces();
        t.policy(&np("a", "p", "podSelector: {matchLabels: {app: web}}\ningress:\n- from: [{ipBlock: {cidr: 'fd00::/8', except: ['fd00::/16']}}]"));
        let c = t.compile();
        assert!(c.rejected.is_empty(), "{:?}", c.rejected);
        assert_eq!(flags(&c, 1), EP_INGRESS_ENFORCED);
        assert!(c.maps.policy.is_empty());
        assert!(!ingress_ok(&c, 1, A_DB, 1));
        assert!(!ingress_ok(&c, 1, "8.8.8.8", 1));
    }

    #[test]
    fn non_canonical_cidrs_are_masked() {
        let mut t = two_namespaces();
        t.policy(&np("a", "p", "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 198.51.100.77/24}}]"));
        let c = t.compile();
        assert!(c.rejected.is_empty());
        cidr_id(&c, "198.51.100.0/24");
        assert!(egress_ok(&c, 1, "198.51.100.1", 1));
    }

    // -- ports --------------------------------------------------------------

    fn entries_of(c: &Compiled, endpoint_id: u32) -> BTreeSet<(u32, u32, u8, u8, u16)> {
        c.maps
            .policy
            .keys()
            .filter(|(_, k)| k.endpoint_id == endpoint_id)
            .map(|(p, k)| {
                (
                    *p,
                    k.peer_identity,
                    k.direction,
                    k.protocol,
                    u16::from_be(k.dport_be),
                )
            })
            .collect()
    }

    #[test]
    fn port_range_split() {
        assert_eq!(split_port_range(8000, 8002), vec![(95, 8000), (96, 8002)]);
        assert_eq!(split_port_range(80, 80), vec![(96, 80)]);
        assert_eq!(split_port_range(1024, 2047), vec![(86, 1024)]);
        assert_eq!(split_port_range(32768, 65535), vec![(81, 32768)]);
        let all = split_port_range(1, 65535);
        assert_eq!(all.len(), 16);
        // The blocks tile the range exactly.
        let mut next = 1u32;
        for (prefix, first) in split_port_range(3, 1030).into_iter().chain(all) {
            let size = 1u32 << (96 - prefix);
            assert_eq!(first as u32 % size, 0, "aligned");
            if first as u32 == 1 {
                next = 1;
            }
            assert_eq!(first as u32, next.max(first as u32));
            next = first as u32 + size;
        }
        assert_eq!(next, 65536);
        let blocks = split_port_range(3, 1030);
        let covered: u32 = blocks.iter().map(|(p, _)| 1u32 << (96 - p)).sum();
        assert_eq!(covered, 1028);
        assert_eq!(blocks.first(), Some(&(96, 3)));
    }

    #[test]
    fn numeric_ports_protocols_and_ranges() {
        let mut t = two_namespaces();
        t.policy(&np(
            "a",
            "p",
            "podSelector: {matchLabels: {app: web}}\ningress:\n- ports:\n  - {port: 80}\n  - {protocol: UDP, port: 53}\n  - {protocol: SCTP, port: 9999}\n  - {protocol: TCP, port: 8000, endPort: 8002}\n  - {protocol: UDP}",
        ));
        let c = t.compile();
        let e = entries_of(&c, 1);
        let tcp = PROTO_TCP;
        assert_eq!(
            e,
            BTreeSet::from([
                (96, 0, DIR_INGRESS, tcp, 80),
                (96, 0, DIR_INGRESS, PROTO_UDP, 53),
                (96, 0, DIR_INGRESS, PROTO_SCTP, 9999),
                (95, 0, DIR_INGRESS, tcp, 8000),
                (96, 0, DIR_INGRESS, tcp, 8002),
                (80, 0, DIR_INGRESS, PROTO_UDP, 0),
            ])
        );
        assert!(ingress_ok(&c, 1, B_WEB, 80));
        assert!(!ingress_ok(&c, 1, B_WEB, 81));
        assert!(!ingress_ok(&c, 1, B_WEB, 53));
        assert!(allowed(&c, 1, DIR_INGRESS, B_WEB, PROTO_UDP, 53));
        assert!(allowed(&c, 1, DIR_INGRESS, B_WEB, PROTO_UDP, 12345));
        assert!(allowed(&c, 1, DIR_INGRESS, B_WEB, PROTO_SCTP, 9999));
        assert!(!allowed(&c, 1, DIR_INGRESS, B_WEB, PROTO_SCTP, 80));
        for p in 8000..=8002 {
            assert!(ingress_ok(&c, 1, B_WEB, p));
        }
        assert!(!ingress_ok(&c, 1, B_WEB, 7999));
        assert!(!ingress_ok(&c, 1, B_WEB, 8003));
        assert!(!allowed(&c, 1, DIR_INGRESS, B_WEB, PROTO_ICMP, 0));
    }

    #[test]
    fn protocol_without_port_and_empty_port_entry() {
        let mut t = two_namespaces();
        t.policy(&np("a", "p", "podSelector: {matchLabels: {app: web}}\ningress:\n- ports: [{}]\n  from: [{podSelector: {}}]"));
        let c = t.compile();
        assert!(ingress_ok(&c, 1, A_DB, 1));
        assert!(ingress_ok(&c, 1, A_DB, 65535));
        assert!(!allowed(&c, 1, DIR_INGRESS, A_DB, PROTO_UDP, 1));
        assert!(entries_of(&c, 1)
            .iter()
            .all(|e| e.0 == POLICY_PREFIX_PROTO && e.3 == PROTO_TCP && e.4 == 0));
    }

    fn with_named_ports(t: &mut T) {
        use crate::model::ContainerPort as Cp;
        let cp = |name: &str, port, proto: &str| Cp {
            name: Some(name.into()),
            port,
            protocol: proto.into(),
        };
        t.model
            .pods
            .get_mut(&ObjectKey::new("a", "web"))
            .unwrap()
            .ports = vec![cp("http", 8080, "TCP"), cp("dns", 5353, "UDP")];
        t.model
            .pods
            .get_mut(&ObjectKey::new("a", "db"))
            .unwrap()
            .ports = vec![cp("http", 9090, "TCP")];
        t.model
            .pods
            .get_mut(&ObjectKey::new("b", "web"))
            .unwrap()
            .ports = vec![cp("http", 80, "TCP")];
    }

    #[test]
    fn named_ports_on_ingress_resolve_against_the_selected_pod() {
        let mut t = two_namespaces();
        with_named_ports(&mut t);
        t.policy(&np("a", "p", "podSelector: {}\ningress:\n- ports: [{port: http}, {port: dns, protocol: UDP}, {port: dns}]"));
        let c = t.compile();
        assert!(c.rejected.is_empty(), "{:?}", c.rejected);
        assert_eq!(
            entries_of(&c, 1),
            BTreeSet::from([
                (96, 0, DIR_INGRESS, PROTO_TCP, 8080),
                (96, 0, DIR_INGRESS, PROTO_UDP, 5353)
            ])
        );
        assert_eq!(
            entries_of(&c, 2),
            BTreeSet::from([(96, 0, DIR_INGRESS, PROTO_TCP, 9090)])
        );
        // a/other has no such ports: isolated with nothing allowed.
        assert!(entries_of(&c, 3).is_empty());
        assert_eq!(flags(&c, 3), EP_INGRESS_ENFORCED);
        assert!(ingress_ok(&c, 1, B_CLIENT, 8080));
        assert!(!ingress_ok(&c, 1, B_CLIENT, 9090));
        assert!(ingress_ok(&c, 2, B_CLIENT, 9090));
    }

    #[test]
    fn named_ports_on_egress_resolve_per_destination() {
        let mut t = two_namespaces();
        with_named_ports(&mut t);
        t.policy(&np(
            "b",
            "p",
            "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress:\n- to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}, {ipBlock: {cidr: 0.0.0.0/0}}]\n  ports: [{port: http}]",
        ));
        let c = t.compile();
        let a_web = label_id(&c, "a", &[("app", "web")]);
        let b_web = label_id(&c, "b", &[("app", "web")]);
        assert_eq!(
            entries_of(&c, 6),
            BTreeSet::from([
                (96, a_web, DIR_EGRESS, PROTO_TCP, 8080),
                (96, b_web, DIR_EGRESS, PROTO_TCP, 80)
            ])
        );
        assert!(egress_ok(&c, 6, A_WEB, 8080));
        assert!(!egress_ok(&c, 6, A_WEB, 80));
        assert!(egress_ok(&c, 6, B_WEB, 80));
        assert!(!egress_ok(&c, 6, B_WEB, 8080));
        // a/db has http=9090 but is not selected.
        assert!(!egress_ok(&c, 6, A_DB, 9090));
        // ipBlock peers do not resolve named ports.
        assert!(!egress_ok(&c, 6, "8.8.8.8", 80));
    }

    #[test]
    fn same_labels_with_different_named_port_numbers_resolve_per_pod() {
        use crate::model::ContainerPort as Cp;
        let mut t = two_namespaces();
        let http = |port| {
            vec![Cp {
                name: Some("web".into()),
                port,
                protocol: "TCP".into(),
            }]
        };
        t.model
            .pods
            .get_mut(&ObjectKey::new("a", "web"))
            .unwrap()
            .ports = http(80);
        // a/db gets a/web's labels but maps `web` to 81.
        let db = t.model.pods.get_mut(&ObjectKey::new("a", "db")).unwrap();
        db.labels = [("app".to_string(), "web".to_string())].into();
        db.ports = http(81);
        t.policy(&np(
            "b",
            "p",
            "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress:\n- to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]\n  ports: [{port: web}]",
        ));
        let c = t.compile();
        assert!(egress_ok(&c, 6, A_WEB, 80));
        assert!(
            !egress_ok(&c, 6, A_WEB, 81),
            "81 is `web` only on the other pod"
        );
        assert!(egress_ok(&c, 6, A_DB, 81));
        assert!(!egress_ok(&c, 6, A_DB, 80));
    }

    #[test]
    fn named_port_egress_without_peers_resolves_over_every_pod() {
        let mut t = two_namespaces();
        with_named_ports(&mut t);
        t.policy(&np("b", "p", "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: http}]"));
        let c = t.compile();
        assert!(egress_ok(&c, 6, A_WEB, 8080));
        assert!(egress_ok(&c, 6, A_DB, 9090));
        assert!(egress_ok(&c, 6, B_WEB, 80));
        assert!(!egress_ok(&c, 6, A_WEB, 9090));
        assert!(!egress_ok(&c, 6, "8.8.8.8", 80));
        assert_eq!(entries_of(&c, 6).len(), 3);
    }

    // -- rejection ------------------------------------------------------------

    #[test]
    fn invalid_policies_are_rejected_with_the_field_and_still_isolate() {
        let cases = [
            ("ingress:\n- ports: [{protocol: ICMP}]", "spec.ingress[0].ports[0].protocol"),
            ("ingress:\n- ports: [{port: 0}]", "spec.ingress[0].ports[0].port"),
            ("ingress:\n- ports: [{port: 70000}]", "spec.ingress[0].ports[0].port"),
            ("ingress:\n- ports: [{port: 90, endPort: 80}]", "spec.ingress[0].ports[0].endPort"),
            ("ingress:\n- ports: [{port: 90, endPort: 65536}]", "spec.ingress[0].ports[0].endPort"),
            ("ingress:\n- ports: [{port: http, endPort: 80}]", "spec.ingress[0].ports[0].endPort"),
            ("ingress:\n- ports: [{endPort: 80}]", "spec.ingress[0].ports[0].endPort"),
            ("ingress:\n- ports: [{port: 'Bad_Name'}]", "spec.ingress[0].ports[0].port"),
            ("ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0}}]", "spec.ingress[0].from[0].ipBlock.cidr"),
            ("ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0/33}}]", "spec.ingress[0].from[0].ipBlock.cidr"),
            ("ingress:\n- from: [{ipBlock: {cidr: banana/8}}]", "spec.ingress[0].from[0].ipBlock.cidr"),
            (
                "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]",
                "spec.ingress[0].from[0].ipBlock.except[0]",
            ),
            (
                "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]",
                "spec.ingress[0].from[0].ipBlock.except[0]",
            ),
            (
                "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/16']}}]",
                "spec.ingress[0].from[0].ipBlock.except[0]",
            ),
            (
                "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]",
                "spec.ingress[0].from[0]",
            ),
            ("ingress:\n- from: [{}]", "spec.ingress[0].from[0]"),
            (
                "ingress:\n- from: [{podSelector: {matchExpressions: [{key: a, operator: Is}]}}]",
                "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator",
            ),
            (
                "ingress:\n- from: [{namespaceSelector: {matchExpressions: [{key: a, operator: In}]}}]",
                "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
            ),
            ("policyTypes: [Ingress]\negress:\n- ports: [{protocol: GRE}]", "spec.egress[0].ports[0].protocol"),
        ];
        for (spec, field) in cases {
            let mut t = two_namespaces();
            let bad = t.policy(&np(
                "a",
                "bad",
                &format!("podSelector: {{matchLabels: {{app: web}}}}\n{spec}"),
            ));
            let good = t.policy(&np(
                "a",
                "good",
                "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{podSelector: {}}]",
            ));
            let c = t.compile();
            let why = c
                .rejected
                .get(&bad)
                .unwrap_or_else(|| panic!("{spec}: not rejected"));
            assert!(why.starts_with(field), "{spec}: {why}");
            assert_eq!(c.rejected.len(), 1);
            // Fail closed: the selected pod is isolated, nothing is allowed.
            assert_eq!(flags(&c, 1), EP_INGRESS_ENFORCED, "{spec}");
            assert!(entries_of(&c, 1).is_empty(), "{spec}");
            assert!(!ingress_ok(&c, 1, A_DB, 80));
            assert!(c.cookies.values().all(|r| r.policy != bad));
            assert_eq!(c.isolating(1, DIR_INGRESS), std::slice::from_ref(&bad));
            // The other policy is unaffected.
            assert_eq!(flags(&c, 2), EP_INGRESS_ENFORCED);
            assert!(ingress_ok(&c, 2, A_WEB, 80));
            assert!(c.cookies.values().any(|r| r.policy == good));
        }
    }

    #[test]
    fn rejected_policy_isolates_in_its_policy_types_and_adds_no_prefixes() {
        let mut t = two_namespaces();
        t.policy(&np(
            "a",
            "bad",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]\n- to: [{ipBlock: {cidr: 172.16.0.0/12}}]",
        ));
        let c = t.compile();
        assert_eq!(flags(&c, 1), EP_EGRESS_ENFORCED);
        assert_eq!(c.maps.ipcache.len(), 1 + 6);
        assert!(!c
            .identities
            .values()
            .any(|s| matches!(s, IdentitySource::Cidr(_))));
    }

    #[test]
    fn rejected_policy_with_a_bad_pod_selector_isolates_its_whole_namespace() {
        let mut t = two_namespaces();
        let bad = t.policy(&np("a", "bad", "podSelector: {matchExpressions: [{key: app, operator: Equals, values: [web]}]}\npolicyTypes: [Ingress, Egress]"));
        let c = t.compile();
        assert!(c.rejected[&bad].starts_with("spec.podSelector.matchExpressions[0].operator"));
        for id in 1..=3 {
            assert_eq!(flags(&c, id), EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED);
        }
        for id in 4..=6 {
            assert_eq!(flags(&c, id), 0);
        }
    }

    #[test]
    fn rejected_policy_with_unknown_policy_types_isolates_both_directions() {
        let mut t = two_namespaces();
        let bad = t.policy(&np(
            "a",
            "bad",
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Ingres]",
        ));
        let c = t.compile();
        assert!(c.rejected[&bad].starts_with("spec.policyTypes[0]"));
        assert_eq!(flags(&c, 1), EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED);
        assert_eq!(flags(&c, 2), 0);
    }

    #[test]
    fn policy_without_spec_is_default_deny_ingress_for_all() {
        let mut t = two_namespaces();
        t.policy("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: b}\n");
        let c = t.compile();
        assert_eq!(flags(&c, 4), EP_INGRESS_ENFORCED);
        assert_eq!(flags(&c, 1), 0);
    }

    // -- audit ----------------------------------------------------------------

    #[test]
    fn audit_flags() {
        let mut t = two_namespaces();
        t.model.namespaces.get_mut("b").unwrap().audit = true;
        t.policy(&np("b", "deny", "podSelector: {}"));
        let c = t.compile();
        assert_eq!(flags(&c, 1), 0);
        assert_eq!(flags(&c, 4), EP_INGRESS_ENFORCED | EP_AUDIT);
        t.model.audit = true;
        let c = t.compile();
        assert_eq!(flags(&c, 1), EP_AUDIT);
        assert_eq!(flags(&c, 5), EP_INGRESS_ENFORCED | EP_AUDIT);
    }

    // -- stability ------------------------------------------------------------

    type Diff<K> = (Vec<K>, Vec<K>, Vec<K>);

    /// (removed, added, changed) keys.
    fn diff<K: Clone + std::hash::Hash + Eq, V: PartialEq>(
        a: &HashMap<K, V>,
        b: &HashMap<K, V>,
    ) -> Diff<K> {
        let removed = a.keys().filter(|k| !b.contains_key(k)).cloned().collect();
        let added = b.keys().filter(|k| !a.contains_key(k)).cloned().collect();
        let changed = a
            .iter()
            .filter(|(k, v)| b.get(k).is_some_and(|w| w != *v))
            .map(|(k, _)| k.clone())
            .collect();
        (removed, added, changed)
    }

    fn stability_world() -> T {
        let mut t = two_namespaces();
        t.policy(&np("a", "to-db", "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]\n  ports: [{port: 5432}]"));
        t.policy(&np("b", "client", "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress:\n- to: [{podSelector: {matchLabels: {app: web}}}]\n- to: [{ipBlock: {cidr: 192.0.2.0/24}}]"));
        t
    }

    #[test]
    fn recompiling_the_same_model_changes_nothing() {
        let mut t = stability_world();
        let c1 = t.compile();
        let c2 = t.compile();
        assert_eq!(c1.maps, c2.maps);
        assert_eq!(c1.identities, c2.identities);
        assert_eq!(c1.cookies, c2.cookies);
        // A fresh compiler on the same model gives the same numbers too.
        let c3 = Compiler::new().compile(&t.model);
        assert_eq!(c1.maps, c3.maps);
    }

    #[test]
    fn a_label_change_touches_only_the_expected_entries() {
        let mut t = stability_world();
        let c1 = t.compile();
        let old_id = label_id(&c1, "b", &[("app", "web")]);
        // b/web stops being "web".
        t.model
            .pods
            .get_mut(&ObjectKey::new("b", "web"))
            .unwrap()
            .labels = labels(&[("app", "api")]);
        let c2 = t.compile();
        let new_id = label_id(&c2, "b", &[("app", "api")]);
        assert_ne!(
            old_id, new_id,
            "a freed number is not reused in the same compile"
        );
        // Every other identity and every cookie kept its number.
        for (id, src) in &c1.identities {
            if *id != old_id {
                assert_eq!(c2.identities.get(id), Some(src));
            }
        }
        assert_eq!(c1.cookies, c2.cookies);
        // Endpoints: only b/web's identity changed.
        let (r, a, ch) = diff(&c1.maps.endpoints, &c2.maps.endpoints);
        assert!(r.is_empty() && a.is_empty());
        assert_eq!(ch, vec![4]);
        // ipcache: only b/web's /32.
        let (r, a, ch) = diff(&c1.maps.ipcache, &c2.maps.ipcache);
        assert!(r.is_empty() && a.is_empty());
        assert_eq!(ch, vec![(ip(B_WEB), 32)]);
        // policy: the entries naming the old identity are gone, none added.
        let (r, a, ch) = diff(&c1.maps.policy, &c2.maps.policy);
        assert!(a.is_empty() && ch.is_empty());
        assert_eq!(r.len(), 2, "{r:?}"); // a/db ingress, b/client egress
        assert!(r.iter().all(|(_, k)| k.peer_identity == old_id));

        // Back to "web": a new number, and the freed one may be reused now.
        t.model
            .pods
            .get_mut(&ObjectKey::new("b", "web"))
            .unwrap()
            .labels = labels(&[("app", "web")]);
        let c3 = t.compile();
        let back = label_id(&c3, "b", &[("app", "web")]);
        assert_ne!(back, new_id);
        assert_eq!(back, old_id, "lowest free number");
        assert_eq!(c3.maps.policy, c1.maps.policy);
    }

    #[test]
    fn adding_a_policy_keeps_existing_cookies_and_identities() {
        let mut t = stability_world();
        let c1 = t.compile();
        t.policy(&np(
            "a",
            "aaa-first",
            "podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 100.64.0.0/10}}]",
        ));
        let c2 = t.compile();
        for (cookie, r) in &c1.cookies {
            assert_eq!(c2.cookies.get(cookie), Some(r));
        }
        for (id, s) in &c1.identities {
            assert_eq!(c2.identities.get(id), Some(s));
        }
        // The old entries are all still there with the same values.
        for (k, v) in &c1.maps.policy {
            assert_eq!(c2.maps.policy.get(k), Some(v));
        }
        // Removing it again gives the first state back.
        t.model.policies.remove(&ObjectKey::new("a", "aaa-first"));
        let c3 = t.compile();
        assert_eq!(c3.maps, c1.maps);
    }
}
