//! The compiler's semantics, end to end: a model in, the verdicts of the
//! reference evaluator over the compiled maps out.
use super::*;
use crate::model::{LocalEndpoint, Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_common::{reason, PROTO_ICMP};
use palisade_common::{
    PolicyKey, PolicyValue, ACTION_ALLOW, DIR_EGRESS, EP_AUDIT, EP_EGRESS_ENFORCED,
    EP_INGRESS_ENFORCED, IDENTITY_ANY, IDENTITY_ANY_POD, POLICY_PREFIX_FIXED, POLICY_PREFIX_PROTO,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};
use palisade_dataplane::{
    packet::{Packet, TCP_FLAG_SYN},
    reference::Evaluator,
};
use std::sync::Arc;

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
            ipv6: None,
            host_network: false,
            ports: Vec::new(),
        };
        let key = ObjectKey::new(ns, name);
        self.model.pods.insert(key.clone(), Arc::new(p));
        Arc::make_mut(self.model.pods.get_mut(&key).unwrap())
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
                ipv6: None,
                container_id: format!("c{id}"),
                mac: [0; 6],
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
        self.model.add_policy(key.clone(), &np);
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
    let net: ipnetwork::IpNetwork = cidr.parse().unwrap();
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

/// Adds `n` pods with distinct labels (so `n` more label identities) in
/// namespace `b`, not local.
fn many_identities(t: &mut T, n: u32) {
    for i in 0..n {
        let name = format!("extra{i}");
        let app = format!("app{i}");
        t.pod(
            "b",
            &name,
            &[("app", app.as_str())],
            &format!("10.0.2.{}", i + 1),
        );
    }
}

#[test]
fn an_any_pod_peer_is_one_entry_instead_of_one_per_identity() {
    const DNS: &str = "ports: [{port: 53, protocol: UDP}, {port: 53}]";
    let mut t = two_namespaces();
    many_identities(&mut t, 40);
    t.model.host_ips.push(ip("192.168.0.10"));
    t.pod("a", "node-agent", &[("app", "web")], "192.168.0.11")
        .host_network = true;
    // Every pod of every namespace: `namespaceSelector: {}` alone, or with
    // `podSelector: {}`.
    t.policy(&np(
        "a",
        "dns",
        &format!(
            "podSelector: {{matchLabels: {{app: db}}}}
policyTypes: [Egress]
egress:
- to: [{{namespaceSelector: {{}}}}]
  {DNS}"
        ),
    ));
    t.policy(&np(
        "a",
        "from-all",
        "podSelector: {matchLabels: {app: db}}
ingress:
- from: [{namespaceSelector: {}, podSelector: {}}, {ipBlock: {cidr: 192.0.2.0/24}}]
  ports: [{port: 5432}]",
    ));
    let c = t.compile();
    assert!(c.rejected.is_empty(), "{:?}", c.rejected);
    let labels = c
        .identities
        .values()
        .filter(|s| matches!(s, IdentitySource::Labels { .. }))
        .count();
    assert!(labels > 40, "{labels}");
    assert_eq!(
        c.identities[&IDENTITY_ANY_POD],
        IdentitySource::Reserved("any-pod")
    );
    let block = cidr_id(&c, "192.0.2.0/24");
    assert!(block >= palisade_common::IDENTITY_FIRST_CIDR);
    assert!(palisade_common::is_label_identity(label_id(
        &c,
        "a",
        &[("app", "web")]
    )));
    // One entry per (port, protocol) with the any-pod peer, not one per
    // label identity; the ipBlock peer of the same rule keeps its own.
    assert_eq!(
        entries_of(&c, 2),
        BTreeSet::from([
            (96, IDENTITY_ANY_POD, DIR_EGRESS, PROTO_UDP, 53),
            (96, IDENTITY_ANY_POD, DIR_EGRESS, PROTO_TCP, 53),
            (96, IDENTITY_ANY_POD, DIR_INGRESS, PROTO_TCP, 5432),
            (96, block, DIR_INGRESS, PROTO_TCP, 5432),
        ])
    );
    // Every pod, in every namespace, is a peer; nothing else is.
    for peer in [A_WEB, A_OTHER, B_WEB, B_DB, B_CLIENT, "10.0.2.7"] {
        assert!(allowed(&c, 2, DIR_EGRESS, peer, PROTO_UDP, 53), "{peer}");
        assert!(egress_ok(&c, 2, peer, 53), "{peer}");
        assert!(!egress_ok(&c, 2, peer, 54), "{peer}");
        assert!(ingress_ok(&c, 2, peer, 5432), "{peer}");
        assert!(!ingress_ok(&c, 2, peer, 5433), "{peer}");
    }
    // External addresses, also inside an ipBlock of another rule, and a
    // remote hostNetwork pod's address are no pods.
    for peer in ["8.8.8.8", "192.0.2.9", "192.168.0.11"] {
        assert!(!allowed(&c, 2, DIR_EGRESS, peer, PROTO_UDP, 53), "{peer}");
    }
    assert!(ingress_ok(&c, 2, "192.0.2.9", 5432), "the ipBlock peer");
    assert!(!ingress_ok(&c, 2, "198.51.100.1", 5432));
    assert!(!ingress_ok(&c, 2, "192.168.0.11", 5432));
    // The node itself: always allowed (host), never through any-pod.
    assert_eq!(
        decide(&c, 2, DIR_EGRESS, "192.168.0.10", PROTO_UDP, 53),
        V::Host
    );

    // A namespace selector that selects some namespaces (here all that
    // exist) is still resolved per identity: one entry per label identity.
    let mut t2 = two_namespaces();
    many_identities(&mut t2, 40);
    t2.policy(&np(
        "a",
        "dns",
        &format!(
            "podSelector: {{matchLabels: {{app: db}}}}
policyTypes: [Egress]
egress:
- to: [{{namespaceSelector: {{matchExpressions: [{{key: team, operator: Exists}}]}}}}]
  {DNS}"
        ),
    ));
    let c2 = t2.compile();
    assert_eq!(entries_of(&c2, 2).len(), 2 * labels);
    for peer in [A_WEB, B_CLIENT, "10.0.2.7"] {
        assert!(egress_ok(&c2, 2, peer, 53), "{peer}");
    }
}

#[test]
fn a_pod_selector_under_an_empty_namespace_selector_is_not_any_pod() {
    let mut t = two_namespaces();
    t.policy(&np(
        "a",
        "p",
        "podSelector: {matchLabels: {app: db}}
ingress:
- from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]",
    ));
    let c = t.compile();
    let a_web = label_id(&c, "a", &[("app", "web")]);
    let b_web = label_id(&c, "b", &[("app", "web")]);
    assert_eq!(
        entries_of(&c, 2),
        BTreeSet::from([
            (72, a_web, DIR_INGRESS, 0, 0),
            (72, b_web, DIR_INGRESS, 0, 0),
        ])
    );
    assert!(ingress_ok(&c, 2, B_WEB, 1));
    assert!(!ingress_ok(&c, 2, B_DB, 1));
}

#[test]
fn named_ports_of_an_any_pod_peer_still_resolve_per_destination() {
    let mut t = two_namespaces();
    with_named_ports(&mut t);
    t.policy(&np(
        "b",
        "p",
        "podSelector: {matchLabels: {app: client}}
policyTypes: [Egress]
egress:
- to: [{namespaceSelector: {}}]
  ports: [{port: http}, {port: 7000}]",
    ));
    t.policy(&np(
        "a",
        "q",
        "podSelector: {matchLabels: {app: web}}
ingress:
- from: [{namespaceSelector: {}}]
  ports: [{port: http}]",
    ));
    let c = t.compile();
    let a_web = label_id(&c, "a", &[("app", "web")]);
    let a_db = label_id(&c, "a", &[("app", "db")]);
    let b_web = label_id(&c, "b", &[("app", "web")]);
    // Egress: the named port per destination identity, the number once.
    assert_eq!(
        entries_of(&c, 6),
        BTreeSet::from([
            (96, a_web, DIR_EGRESS, PROTO_TCP, 8080),
            (96, a_db, DIR_EGRESS, PROTO_TCP, 9090),
            (96, b_web, DIR_EGRESS, PROTO_TCP, 80),
            (96, IDENTITY_ANY_POD, DIR_EGRESS, PROTO_TCP, 7000),
        ])
    );
    assert!(egress_ok(&c, 6, A_WEB, 8080));
    assert!(!egress_ok(&c, 6, A_WEB, 9090));
    assert!(egress_ok(&c, 6, A_DB, 9090));
    assert!(egress_ok(&c, 6, B_WEB, 80));
    assert!(!egress_ok(&c, 6, B_DB, 80));
    assert!(egress_ok(&c, 6, B_DB, 7000));
    assert!(!egress_ok(&c, 6, "8.8.8.8", 7000));
    // Ingress: the name resolves on the selected pod, so one entry.
    assert_eq!(
        entries_of(&c, 1),
        BTreeSet::from([(96, IDENTITY_ANY_POD, DIR_INGRESS, PROTO_TCP, 8080)])
    );
    assert!(ingress_ok(&c, 1, B_CLIENT, 8080));
    assert!(!ingress_ok(&c, 1, "8.8.8.8", 8080));
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

/// A CNI ADD can come before the pod's labels: where policy could select
/// the pod, it is held closed both ways until they arrive (a `matchLabels`
/// policy would not select it yet); elsewhere (no policy in its namespace,
/// no ClusterNetworkPolicy) it is open as any unselected pod. Either way
/// it is a peer with the empty label set of its namespace.
#[test]
fn local_endpoint_without_a_pod_is_held_closed_where_policy_could_apply() {
    let mut t = two_namespaces();
    t.local("c", "new", 6);
    let c = t.compile();
    assert_eq!(flags(&c, 6), 0, "no policy in c: open");
    t.local("a", "new", 7);
    t.local("b", "new", 8);
    t.policy(&np("a", "deny", "podSelector: {}"));
    t.policy(&np(
        "b",
        "web-only",
        "podSelector: {matchLabels: {app: web}}",
    ));
    let c = t.compile();
    let both = EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED;
    assert_eq!((flags(&c, 7), flags(&c, 8)), (both, both));
    assert_eq!(flags(&c, 6), 0);
    assert!(!c.maps.policy.keys().any(|(_, k)| k.endpoint_id == 8));
    let pending = vec![super::endpoints::labels_pending_key()];
    assert_eq!(c.isolating(8, DIR_INGRESS), pending.as_slice());
    assert_eq!(c.isolating(8, DIR_EGRESS), pending.as_slice());
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
    let both = EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED;
    assert_eq!((flags(&c, 7), flags(&c, 8)), (both, both), "held closed");
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
    // The node's address is `host`, with the CIDR identity of the longest
    // prefix holding it (here none but 0.0.0.0/0: world).
    let host = IpcacheValue {
        identity: IDENTITY_HOST,
        cidr_identity: IDENTITY_WORLD,
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
    // host, world, world-ipv6, any-pod, remote-node + 6 label + 2 CIDR
    // identities.
    assert_eq!(c.identities.len(), 5 + 6 + 2);
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
    t.policy(&np(
        "b",
        "q",
        "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{ipBlock: {cidr: 10.0.1.2/32}}]",
    ));
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

/// An IPv6 ipBlock admits IPv6 addresses (pods' included) inside its
/// `cidr` and outside its `except`s, and nothing of IPv4; an IPv4 block,
/// `0.0.0.0/0` included, nothing of IPv6.
#[test]
fn ipv6_blocks_are_cidr_identities_of_their_own_family() {
    let mut t = two_namespaces();
    t.model.endpoints.get_mut("c1").unwrap().ipv6 = Some(ip6("fd00:1::1"));
    t.model.endpoints.get_mut("c2").unwrap().ipv6 = Some(ip6("fd00:2::2"));
    t.model.endpoints.get_mut("c3").unwrap().ipv6 = Some(ip6("fd01::3"));
    t.policy(&np("a", "p", "podSelector: {matchLabels: {app: web}}\ningress:\n- from: [{ipBlock: {cidr: 'fd00::/8', except: ['fd00:2::/32']}}]"));
    t.policy(&np(
        "a",
        "q",
        "podSelector: {matchLabels: {app: db}}\ningress:\n- from: [{ipBlock: {cidr: 0.0.0.0/0}}]",
    ));
    let c = t.compile();
    assert!(c.rejected.is_empty(), "{:?}", c.rejected);
    assert_eq!(flags(&c, 1), EP_INGRESS_ENFORCED);
    // a/web (ifindex 1) from IPv6 inside fd00::/8 but not fd00:2::/32.
    assert!(ingress6_ok(&c, 1, "fd77::9", 1));
    assert!(ingress6_ok(&c, 1, "fd01::3", 1), "a pod inside the block");
    assert!(
        !ingress6_ok(&c, 1, "fd00:2::2", 1),
        "a pod in the except hole"
    );
    assert!(!ingress6_ok(&c, 1, "fd00:2::77", 1), "the except hole");
    assert!(!ingress6_ok(&c, 1, "2001:db8::1", 1), "the IPv6 world");
    assert!(!ingress_ok(&c, 1, A_DB, 1));
    assert!(!ingress_ok(&c, 1, "8.8.8.8", 1));
    // a/db (ifindex 2): 0.0.0.0/0 is IPv4's world only.
    assert!(ingress_ok(&c, 2, "8.8.8.8", 1));
    assert!(!ingress6_ok(&c, 2, "2001:db8::1", 1));
    assert!(!ingress6_ok(&c, 2, "fd00:1::1", 1));
    // The prefixes are in ipcache6 as CIDR identities; pods carry the
    // longest one containing them.
    let v6 = &c.maps.ipcache6;
    let slash8 = cidr_id(&c, "fd00::/8");
    assert_eq!(v6[&(ip6("fd00::"), 8)].identity, slash8);
    assert_eq!(
        v6[&(ip6("fd00:2::"), 32)].identity,
        cidr_id(&c, "fd00:2::/32")
    );
    assert_eq!(v6[&(ip6("::"), 0)].identity, IDENTITY_WORLD6);
    assert_eq!(v6[&(ip6("fd01::3"), 128)].cidr_identity, slash8);
}

/// The verdict on a TCP SYN between the endpoint on `ifindex` and an IPv6
/// peer, at the ingress program.
fn ingress6_ok(c: &Compiled, ifindex: u32, from: &str, port: u16) -> bool {
    let me = palisade_dataplane::maps::from_ip6_words(c.maps.endpoints[&ifindex].ipv6);
    let packet = Packet::ipv6_tcp(ip6(from), 40000, me, port, TCP_FLAG_SYN);
    let v = Evaluator::new(&c.maps).evaluate(ifindex, DIR_INGRESS, &packet);
    matches!(v.reason, reason::POLICY_ALLOW | reason::UNENFORCED)
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
    Arc::make_mut(t.model.pods.get_mut(&ObjectKey::new("a", "web")).unwrap()).ports =
        vec![cp("http", 8080, "TCP"), cp("dns", 5353, "UDP")];
    Arc::make_mut(t.model.pods.get_mut(&ObjectKey::new("a", "db")).unwrap()).ports =
        vec![cp("http", 9090, "TCP")];
    Arc::make_mut(t.model.pods.get_mut(&ObjectKey::new("b", "web")).unwrap()).ports =
        vec![cp("http", 80, "TCP")];
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
    // The ipBlock peer resolves the name on every pod address it
    // contains, each through the CIDR identity of its own /32.
    assert_eq!(
        entries_of(&c, 6),
        BTreeSet::from([
            (96, a_web, DIR_EGRESS, PROTO_TCP, 8080),
            (96, b_web, DIR_EGRESS, PROTO_TCP, 80),
            (96, cidr_id(&c, "10.0.0.1/32"), DIR_EGRESS, PROTO_TCP, 8080),
            (96, cidr_id(&c, "10.0.0.2/32"), DIR_EGRESS, PROTO_TCP, 9090),
            (96, cidr_id(&c, "10.0.1.1/32"), DIR_EGRESS, PROTO_TCP, 80),
        ])
    );
    assert!(egress_ok(&c, 6, A_WEB, 8080));
    assert!(!egress_ok(&c, 6, A_WEB, 80));
    assert!(egress_ok(&c, 6, B_WEB, 80));
    assert!(!egress_ok(&c, 6, B_WEB, 8080));
    // a/db (http=9090) is not selected by the pod peer, but its address
    // is in the ipBlock peer, which resolves the name on it. (Before the
    // named-port correction an ipBlock resolved names to nothing.)
    assert!(egress_ok(&c, 6, A_DB, 9090));
    assert!(!egress_ok(&c, 6, A_DB, 8080));
    // Addresses that are no pod's resolve no name.
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
    Arc::make_mut(t.model.pods.get_mut(&ObjectKey::new("a", "web")).unwrap()).ports = http(80);
    // a/db gets a/web's labels but maps `web` to 81.
    let db = Arc::make_mut(t.model.pods.get_mut(&ObjectKey::new("a", "db")).unwrap());
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
        (
            "ingress:\n- ports: [{protocol: ICMP}]",
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            "ingress:\n- ports: [{port: 0}]",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "ingress:\n- ports: [{port: 70000}]",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "ingress:\n- ports: [{port: 90, endPort: 80}]",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "ingress:\n- ports: [{port: 90, endPort: 65536}]",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "ingress:\n- ports: [{port: http, endPort: 80}]",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "ingress:\n- ports: [{endPort: 80}]",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "ingress:\n- ports: [{port: 'Bad_Name'}]",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0}}]",
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "ingress:\n- from: [{ipBlock: {cidr: 10.0.0.0/33}}]",
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "ingress:\n- from: [{ipBlock: {cidr: banana/8}}]",
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
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
        (
            "policyTypes: [Ingress]\negress:\n- ports: [{protocol: GRE}]",
            "spec.egress[0].ports[0].protocol",
        ),
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
    Arc::make_mut(t.model.pods.get_mut(&ObjectKey::new("b", "web")).unwrap()).labels =
        labels(&[("app", "api")]);
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
    Arc::make_mut(t.model.pods.get_mut(&ObjectKey::new("b", "web")).unwrap()).labels =
        labels(&[("app", "web")]);
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

/// The named-port correction: an ipBlock egress peer resolves a named
/// port on the destination pod, exactly: only pod addresses inside
/// `cidr` and outside `except`, each pod on its own number.
fn ip_block_named_port_world() -> T {
    use crate::model::ContainerPort as Cp;
    let http = |port| {
        vec![Cp {
            name: Some("http".into()),
            port,
            protocol: "TCP".into(),
        }]
    };
    let mut t = T::new();
    t.ns("a", &[]);
    t.ns("b", &[]);
    t.pod("a", "client", &[("app", "client")], "10.1.0.9");
    t.local("a", "client", 1);
    // Same labels and ports (one label identity), inside and outside
    // the block.
    t.pod("b", "in", &[("app", "web")], "10.0.0.5").ports = http(8080);
    t.pod("b", "out", &[("app", "web")], "10.0.1.5").ports = http(8080);
    // In the block's except.
    t.pod("b", "excepted", &[("app", "db")], "10.0.0.200").ports = http(9090);
    // In the block, another number for the name.
    t.pod("b", "other", &[("app", "api")], "10.0.0.6").ports = http(80);
    t.policy(&np(
            "a",
            "to-block",
            "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.128/25]}}]\n  ports: [{port: http}]",
        ));
    t
}

#[test]
fn named_port_on_an_ip_block_resolves_on_the_destination_pod() {
    let mut t = ip_block_named_port_world();
    let c = t.compile();
    assert!(egress_ok(&c, 1, "10.0.0.5", 8080));
    assert!(
        !egress_ok(&c, 1, "10.0.0.5", 80),
        "not another pod's number"
    );
    assert!(egress_ok(&c, 1, "10.0.0.6", 80));
    assert!(!egress_ok(&c, 1, "10.0.0.6", 8080));
    // Same label identity as 10.0.0.5, but outside the block.
    assert!(!egress_ok(&c, 1, "10.0.1.5", 8080));
    // Inside the except.
    assert!(!egress_ok(&c, 1, "10.0.0.200", 9090));
    // An address in the block that is no pod's resolves nothing.
    assert!(!egress_ok(&c, 1, "10.0.0.7", 8080));
    // Only the pods inside the block (and outside except) got their
    // own identity; it is their ipcache CIDR identity.
    let own = cidr_id(&c, "10.0.0.5/32");
    assert_eq!(ipcache_lookup(&c, ip("10.0.0.5")).cidr_identity, own);
    assert!(c.identities.values().all(|s| *s
        != IdentitySource::Cidr("10.0.1.5/32".parse().unwrap())
        && *s != IdentitySource::Cidr("10.0.0.200/32".parse().unwrap())));
    assert_eq!(
        entries_of(&c, 1),
        BTreeSet::from([
            (96, own, DIR_EGRESS, PROTO_TCP, 8080),
            (96, cidr_id(&c, "10.0.0.6/32"), DIR_EGRESS, PROTO_TCP, 80),
        ])
    );
}

#[test]
fn other_ip_blocks_containing_a_pod_address_still_match_it() {
    let mut t = ip_block_named_port_world();
    // Numeric ports on blocks that contain 10.0.0.5: its cidr_identity
    // is now its own /32, which these peers must include.
    t.policy(&np(
            "a",
            "wide",
            "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress:\n- to: [{ipBlock: {cidr: 10.0.0.0/16}}]\n  ports: [{port: 443}]\n- to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/29]}}]\n  ports: [{port: 22}]",
        ));
    let c = t.compile();
    assert!(egress_ok(&c, 1, "10.0.0.5", 443));
    assert!(egress_ok(&c, 1, "10.0.0.5", 8080));
    // 10.0.0.5 is in the except of the second block: not matched.
    assert!(!egress_ok(&c, 1, "10.0.0.5", 22));
    assert!(egress_ok(&c, 1, "10.0.0.200", 22));
    assert!(egress_ok(&c, 1, "10.0.1.5", 443));
}

#[test]
fn a_pod_moving_out_of_the_block_loses_the_named_port() {
    let mut t = ip_block_named_port_world();
    Arc::make_mut(t.model.pods.get_mut(&ObjectKey::new("b", "in")).unwrap()).ip =
        Some(ip("10.0.2.5"));
    let c = t.compile();
    assert!(!egress_ok(&c, 1, "10.0.2.5", 8080));
    assert!(c
        .identities
        .values()
        .all(|s| *s != IdentitySource::Cidr("10.0.0.5/32".parse().unwrap())));
}

// -- IPv6 (issue 15) ----------------------------------------------------

fn ip6(s: &str) -> std::net::Ipv6Addr {
    s.parse().unwrap()
}

/// Pods' IPv6 addresses are in ipcache6 under their label identity (a
/// local one from its registration, a remote one from the pod), the
/// endpoint map carries a local pod's IPv6 address, and an IPv6-only
/// endpoint claims no IPv4 address.
#[test]
fn ipv6_pod_addresses_resolve_to_their_label_identity() {
    let mut t = two_namespaces();
    let set_v6 = |t: &mut T, cid: &str, v6: &str| {
        t.model.endpoints.get_mut(cid).unwrap().ipv6 = Some(ip6(v6));
    };
    set_v6(&mut t, "c1", "fd00::1");
    // IPv6-only local pod (a/db).
    set_v6(&mut t, "c2", "fd00::2");
    t.model.endpoints.get_mut("c2").unwrap().ipv4 = Ipv4Addr::UNSPECIFIED;
    // A remote pod with both families, one with IPv6 only, and a
    // host-network pod (never a pod address).
    t.pod("b", "remote", &[("app", "db")], "10.0.2.1").ipv6 = Some(ip6("fd00:2::1"));
    t.pod("b", "remote6", &[("app", "web")], "").ipv6 = Some(ip6("fd00:2::2"));
    let h = t.pod("b", "hostnet", &[("app", "x")], "192.168.0.9");
    h.ipv6 = Some(ip6("fd00:9::9"));
    h.host_network = true;
    let c = t.compile();

    let v6 = &c.maps.ipcache6;
    let at = |a: &str| v6.get(&(ip6(a), 128)).copied();
    assert_eq!(
        at("fd00::1").unwrap().identity,
        label_id(&c, "a", &[("app", "web")])
    );
    assert_eq!(
        at("fd00::2").unwrap().identity,
        label_id(&c, "a", &[("app", "db")])
    );
    assert_eq!(
        at("fd00:2::1").unwrap().identity,
        label_id(&c, "b", &[("app", "db")])
    );
    assert_eq!(
        at("fd00:2::2").unwrap().identity,
        label_id(&c, "b", &[("app", "web")])
    );
    // Inside no IPv6 ipBlock: the IPv6 world is its CIDR identity (IPv4
    // ipBlocks, 0.0.0.0/0 included, never match it).
    assert_eq!(at("fd00::1").unwrap().cidr_identity, IDENTITY_WORLD6);
    assert_eq!(at("fd00:9::9"), None, "host network");
    // Four pods and ::/0.
    assert_eq!(v6.len(), 5, "{v6:?}");

    let words = palisade_dataplane::maps::ip6_words;
    assert_eq!(c.maps.endpoints[&1].ipv6, words(ip6("fd00::1")));
    assert_eq!(c.maps.endpoints[&2].ipv6, words(ip6("fd00::2")));
    assert_eq!(c.maps.endpoints[&3].ipv6, [0; 4], "no IPv6 address");
    assert_eq!(c.maps.endpoints[&2].ipv4, 0, "IPv6-only");
    assert!(!c.maps.ipcache.contains_key(&(Ipv4Addr::UNSPECIFIED, 32)));
    assert!(
        !c.maps.ipcache.contains_key(&(ip(A_DB), 32)),
        "the IPv6-only endpoint's pod address in the model is not its"
    );
    // The IPv4 side is untouched by the IPv6 addresses.
    assert_eq!(
        c.maps.ipcache[&(ip(A_WEB), 32)].identity,
        label_id(&c, "a", &[("app", "web")])
    );
}
