//! The tier stage against a direct evaluator of the objects (Admin rules in
//! order → NetworkPolicy → Baseline → allow), through the kernel's own
//! lookups on the compiled maps (the reference evaluator).
use std::net::Ipv4Addr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_common::{IpcacheValue, DIR_EGRESS, DIR_INGRESS, PROTO_TCP, PROTO_UDP};
use palisade_dataplane::reference::Evaluator;
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;
use crate::{
    cnp::ClusterNetworkPolicy,
    compiler::{
        parse::{ParsedPolicy, Peer, Port},
        peers::block_contains,
        Compiled, Compiler,
    },
    model::{LocalEndpoint, Namespace, ObjectKey, Pod},
};

fn labels(s: &[(&str, &str)]) -> Labels {
    s.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What the kernel decides, from the compiled maps: allowed?
fn kernel(
    c: &Compiled,
    ep: &LocalEndpoint,
    dir: u8,
    peer: Ipv4Addr,
    proto: u8,
    port: u16,
) -> (bool, u32) {
    let info = c.maps.endpoints[&ep.ifindex];
    let flag = if dir == DIR_INGRESS {
        EP_INGRESS_ENFORCED
    } else {
        EP_EGRESS_ENFORCED
    };
    if info.flags & flag == 0 {
        return (true, 0);
    }
    let ev = Evaluator::new(&c.maps);
    let v = ev.ipcache_lookup(peer).unwrap_or(IpcacheValue {
        identity: palisade_common::IDENTITY_WORLD,
        cidr_identity: palisade_common::IDENTITY_WORLD,
    });
    if v.identity == IDENTITY_HOST {
        return (true, 0);
    }
    match ev.policy_match(info.endpoint_id, v, dir, proto, port) {
        Some(m) => (m.value.action == ACTION_ALLOW, m.value.cookie),
        None => (false, 0),
    }
}

/// The direct evaluator: the objects of the model, walked for one flow.
fn direct(
    model: &Model,
    c: &Compiled,
    ep: &LocalEndpoint,
    dir: u8,
    peer: Ipv4Addr,
    proto: u8,
    port: u16,
) -> (bool, u32) {
    let pod = &model.pods[&ep.key];
    let nsl = super::super::identities::namespace_labels(model, &ep.key.namespace);
    let peer_pod = model
        .pods
        .values()
        .find(|p| p.ip == Some(peer) && !p.host_network);
    let peer_nsl =
        peer_pod.map(|p| super::super::identities::namespace_labels(model, &p.namespace));
    let cluster = ordered(model.cluster_policies.values().filter_map(|p| p.accepted()));
    let cookie_of = |p: &ClusterPolicy, r: &ClusterRule| {
        c.cluster_cookies
            .iter()
            .find(|(_, rr)| {
                rr.policy == p.name && rr.direction == r.direction && rr.rule == r.index
            })
            .map(|(k, _)| *k)
            .unwrap()
    };
    let rep = PeerRep {
        pod: peer_pod.map(|p| (peer_nsl.as_ref().unwrap(), &p.labels, p.ports.as_slice())),
        net: ipnetwork::IpNetwork::V4(Ipv4Network::new(peer, 32).unwrap()),
        identity: 0,
        cidr_identity: 0,
    };
    for tier in [Tier::Admin, Tier::Baseline] {
        if tier == Tier::Baseline {
            // NetworkPolicy, from the parsed objects.
            let isolating: Vec<_> = model
                .policies
                .iter()
                .filter(|(k, _)| k.namespace == ep.key.namespace)
                .filter_map(|(_, p)| match &**p {
                    ParsedPolicy::Accepted(p) if p.selector.matches(&pod.labels) => Some(p),
                    _ => None,
                })
                .filter(|p| {
                    if dir == DIR_INGRESS {
                        p.ingress
                    } else {
                        p.egress
                    }
                })
                .collect();
            if !isolating.is_empty() {
                let ok = isolating.iter().any(|p| {
                    p.rules.iter().filter(|r| r.direction == dir).any(|r| {
                        let peer_ok = match &r.peers {
                            None => true,
                            Some(peers) => peers.iter().any(|pe| match pe {
                                Peer::Pods { namespaces, pods } => peer_pod.is_some_and(|pp| {
                                    let ns_ok = match namespaces {
                                        None => *pp.namespace == *p.key.namespace,
                                        Some(s) => s.matches(peer_nsl.as_ref().unwrap()),
                                    };
                                    ns_ok && pods.as_ref().is_none_or(|s| s.matches(&pp.labels))
                                }),
                                Peer::Block { cidr, except } => block_contains(
                                    *cidr,
                                    except,
                                    Ipv4Network::new(peer, 32).unwrap(),
                                ),
                                Peer::Block6 { .. } => false,
                            }),
                        };
                        let dest_ports = if dir == DIR_INGRESS {
                            Some(pod.ports.as_slice())
                        } else {
                            peer_pod.map(|p| p.ports.as_slice())
                        };
                        let port_ok = r.ports.is_empty()
                            || r.ports.iter().any(|pt| match pt {
                                Port::Proto(p) => *p == proto,
                                Port::Range {
                                    proto: p,
                                    start,
                                    end,
                                } => *p == proto && (*start..=*end).contains(&port),
                                Port::Named { proto: p, name } => {
                                    *p == proto
                                        && dest_ports.is_some_and(|d| {
                                            named_port_matches(d, name, proto, port)
                                        })
                                }
                            });
                        peer_ok && port_ok
                    })
                });
                return (ok, 0);
            }
        }
        'tier: for p in cluster
            .iter()
            .filter(|p| p.tier == tier && p.subject.matches(&nsl, &pod.labels))
        {
            for r in p.rules.iter().filter(|r| r.direction == dir) {
                if rule_matches(r, &pod.ports, &rep, proto, port) {
                    match r.effective_action() {
                        Action::Accept => return (true, cookie_of(p, r)),
                        Action::Deny => return (false, cookie_of(p, r)),
                        Action::Pass => break 'tier,
                    }
                }
            }
        }
    }
    (true, COOKIE_DEFAULT_ALLOW)
}

struct M {
    model: Model,
}

impl M {
    fn new() -> Self {
        Self {
            model: Model::default(),
        }
    }
    fn ns(&mut self, name: &str, l: &[(&str, &str)]) {
        self.model.namespaces.insert(
            name.into(),
            Namespace {
                name: name.into(),
                labels: labels(l),
                audit: false,
            },
        );
    }
    fn pod(
        &mut self,
        ns: &str,
        name: &str,
        l: &[(&str, &str)],
        addr: Ipv4Addr,
        ports: &[(&str, u16)],
    ) {
        let ports = ports
            .iter()
            .map(|(n, p)| crate::model::ContainerPort {
                name: Some(n.to_string()),
                port: *p,
                protocol: "TCP".into(),
            })
            .collect();
        self.model.pods.insert(
            ObjectKey::new(ns, name),
            Pod {
                namespace: ns.into(),
                name: name.into(),
                labels: labels(l),
                ip: Some(addr),
                ipv6: None,
                host_network: false,
                ports,
            }
            .into(),
        );
    }
    fn local(&mut self, ns: &str, name: &str, id: u32) {
        let key = ObjectKey::new(ns, name);
        let ipv4 = self.model.pods[&key].ip.unwrap();
        self.model.endpoints.insert(
            format!("c{id}"),
            LocalEndpoint {
                key,
                endpoint_id: id,
                ifindex: id,
                host_ifname: format!("v{id}"),
                ipv4,
                ipv6: None,
                container_id: format!("c{id}"),
                mac: [0; 6],
            },
        );
    }
    fn np(&mut self, yaml: &str) {
        let np: NetworkPolicy = serde_yaml::from_str(yaml).unwrap();
        let key = ObjectKey::new(
            np.metadata.namespace.clone().unwrap(),
            np.metadata.name.clone().unwrap(),
        );
        self.model.add_policy(key, &np);
    }
    fn cnp(&mut self, yaml: &str) {
        let c: ClusterNetworkPolicy = serde_yaml::from_str(yaml).unwrap();
        self.model.add_cluster_policy(&c);
    }
}

fn ep<'a>(m: &'a Model, ns: &str, name: &str) -> &'a LocalEndpoint {
    m.endpoints
        .values()
        .find(|e| e.key == ObjectKey::new(ns, name))
        .unwrap()
}

/// The shared conformance case 06, step by step, in the compiler.
#[test]
fn admin_deny_pass_and_baseline_as_case_06() {
    let mut m = M::new();
    m.ns("store", &[("env", "prod")]);
    m.ns("tools", &[("env", "dev")]);
    let pods = [
        ("store", "web", 1),
        ("store", "db", 2),
        ("store", "cache", 3),
        ("tools", "debug", 4),
        ("tools", "ci", 5),
    ];
    for (ns, name, i) in pods {
        m.pod(
            ns,
            name,
            &[("app", name)],
            Ipv4Addr::new(10, 1, 0, i as u8),
            &[("http", 80)],
        );
        m.local(ns, name, i);
    }
    m.cnp("metadata: {name: protect-db}\nspec: {tier: Admin, priority: 10, subject: {pods: {namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: db}}}}, ingress: [{name: no-dev-into-db, action: Deny, from: [{namespaces: {matchLabels: {env: dev}}}]}]}");
    m.np("metadata: {name: db-open, namespace: store}\nspec: {podSelector: {matchLabels: {app: db}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {}}]}]}");
    let mut compiler = Compiler::new();
    let c = compiler.compile(&m.model);
    let eps = Model {
        endpoints: m.model.endpoints.clone(),
        ..Model::default()
    };
    let ing = |c: &Compiled, from: u8, to: (&str, &str)| {
        kernel(
            c,
            ep(&eps, to.0, to.1),
            DIR_INGRESS,
            Ipv4Addr::new(10, 1, 0, from),
            PROTO_TCP,
            80,
        )
    };
    assert!(
        !ing(&c, 4, ("store", "db")).0,
        "admin deny beats the NetworkPolicy"
    );
    assert!(
        ing(&c, 1, ("store", "db")).0,
        "the NetworkPolicy allows web"
    );
    assert!(ing(&c, 4, ("store", "web")).0, "no policy: allowed");
    let deny_cookie = ing(&c, 5, ("store", "db")).1;
    assert_eq!(c.cluster_cookies[&deny_cookie].label, "no-dev-into-db");

    m.cnp("metadata: {name: defer-dev}\nspec: {tier: Admin, priority: 20, subject: {namespaces: {matchLabels: {env: prod}}}, ingress: [{action: Pass, from: [{namespaces: {matchLabels: {env: dev}}}]}]}");
    m.cnp("metadata: {name: prod-baseline}\nspec: {tier: Baseline, priority: 10, subject: {namespaces: {matchLabels: {env: prod}}}, ingress: [{action: Deny, from: [{namespaces: {matchLabels: {env: dev}}}]}]}");
    m.np("metadata: {name: web-from-ci, namespace: store}\nspec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: ci}}}]}]}");
    let c = compiler.compile(&m.model);
    assert!(
        ing(&c, 5, ("store", "web")).0,
        "passed to the NetworkPolicy, which allows ci"
    );
    assert!(
        !ing(&c, 4, ("store", "web")).0,
        "passed to the NetworkPolicy, which isolates"
    );
    assert_eq!(ing(&c, 4, ("store", "web")).1, COOKIE_NP_ISOLATION);
    assert!(
        !ing(&c, 4, ("store", "cache")).0,
        "passed, no NetworkPolicy: baseline deny"
    );
    assert!(!ing(&c, 5, ("store", "db")).0, "protect-db comes first");
    assert!(!ing(&c, 2, ("store", "web")).0, "web is isolated");
    assert!(
        ing(&c, 1, ("store", "cache")).0,
        "baseline does not match prod"
    );

    // A priority change: defer-dev before protect-db now passes ci into db
    // (the NetworkPolicy allows every namespace).
    m.cnp("metadata: {name: defer-dev}\nspec: {tier: Admin, priority: 5, subject: {namespaces: {matchLabels: {env: prod}}}, ingress: [{action: Pass, from: [{namespaces: {matchLabels: {env: dev}}}]}]}");
    let c = compiler.compile(&m.model);
    assert!(ing(&c, 5, ("store", "db")).0);
    assert!(c.cluster_warnings.is_empty());
    // Equal priorities: a warning, name order.
    m.cnp("metadata: {name: aaa}\nspec: {tier: Admin, priority: 5, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {matchLabels: {env: dev}}}]}]}");
    let c = compiler.compile(&m.model);
    assert!(!ing(&c, 5, ("store", "db")).0, "aaa before defer-dev");
    assert!(c.cluster_warnings["defer-dev"].contains("aaa"));
}

#[test]
fn networks_split_the_pods_of_one_identity_by_address() {
    let mut m = M::new();
    m.ns("a", &[]);
    m.pod("a", "x", &[("app", "x")], Ipv4Addr::new(10, 1, 0, 1), &[]);
    m.pod("a", "y1", &[("app", "y")], Ipv4Addr::new(10, 1, 0, 2), &[]);
    m.pod("a", "y2", &[("app", "y")], Ipv4Addr::new(10, 2, 0, 2), &[]);
    m.local("a", "x", 1);
    m.cnp("metadata: {name: n}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{action: Deny, to: [{networks: [10.2.0.0/16]}]}, {action: Accept, to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: y}}}}]}]}");
    let c = Compiler::new().compile(&m.model);
    let e = ep(&m.model, "a", "x");
    assert!(kernel(&c, e, DIR_EGRESS, Ipv4Addr::new(10, 1, 0, 2), PROTO_TCP, 1).0);
    assert!(!kernel(&c, e, DIR_EGRESS, Ipv4Addr::new(10, 2, 0, 2), PROTO_TCP, 1).0);
    assert!(!kernel(&c, e, DIR_EGRESS, Ipv4Addr::new(10, 2, 9, 9), PROTO_TCP, 1).0);
    assert!(kernel(&c, e, DIR_EGRESS, Ipv4Addr::new(8, 8, 8, 8), PROTO_TCP, 1).0);
}

const SELS: [&str; 5] = [
    "{}",
    "{matchLabels: {app: a}}",
    "{matchLabels: {app: b}}",
    "{matchLabels: {env: prod}}",
    "{matchExpressions: [{key: app, operator: NotIn, values: [a]}]}",
];
const NETS: [&str; 5] = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.0.3/32",
    "192.0.2.0/24",
    "0.0.0.0/0",
];

fn pick<'a>(rng: &mut StdRng, xs: &[&'a str]) -> &'a str {
    xs[rng.gen_range(0..xs.len())]
}

fn random_protocols(rng: &mut StdRng, named_ok: bool) -> String {
    match rng.gen_range(0..5) {
        0 | 1 => String::new(),
        2 => format!(", protocols: [{{tcp: {{destinationPort: {{number: {}}}}}}}]", [80, 81, 443][rng.gen_range(0..3)]),
        3 => ", protocols: [{udp: {destinationPort: {range: {start: 50, end: 90}}}}, {tcp: {destinationPort: {range: {start: 79, end: 81}}}}]".into(),
        _ if named_ok => ", protocols: [{destinationNamedPort: http}]".into(),
        _ => String::new(),
    }
}

pub(crate) fn random_cnp(rng: &mut StdRng, i: usize) -> String {
    let tier = if rng.gen_bool(0.5) {
        "Admin"
    } else {
        "Baseline"
    };
    let subject = if rng.gen_bool(0.5) {
        format!("{{namespaces: {}}}", pick(rng, &SELS))
    } else {
        format!(
            "{{pods: {{namespaceSelector: {}, podSelector: {}}}}}",
            pick(rng, &SELS),
            pick(rng, &SELS)
        )
    };
    let rules = |field: &str, dir_peer: &str, rng: &mut StdRng| {
        let n = rng.gen_range(0..3);
        (0..n)
            .map(|_| {
                let action = ["Accept", "Deny", "Pass"][rng.gen_range(0..3)];
                let (peer, named_ok) = match rng.gen_range(0..5) {
                    0 => (format!("{{namespaces: {}}}", pick(rng, &SELS)), true),
                    1 | 2 => (
                        format!(
                            "{{pods: {{namespaceSelector: {}, podSelector: {}}}}}",
                            pick(rng, &SELS),
                            pick(rng, &SELS)
                        ),
                        true,
                    ),
                    3 if dir_peer == "to" => {
                        (format!("{{networks: [{}]}}", pick(rng, &NETS)), false)
                    }
                    _ => ("{future: {}}".to_string(), true),
                };
                format!(
                    "{{action: {action}, {dir_peer}: [{peer}]{}}}",
                    random_protocols(rng, named_ok)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
            .pipe(|s| format!("{field}: [{s}]"))
    };
    let ingress = rules("ingress", "from", rng);
    let egress = rules("egress", "to", rng);
    format!(
        "metadata: {{name: c{i}}}\nspec: {{tier: {tier}, priority: {}, subject: {subject}, {ingress}, {egress}}}",
        rng.gen_range(0..4)
    )
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

fn random_np(rng: &mut StdRng, ns: &str, i: usize) -> String {
    let from = match rng.gen_range(0..4) {
        0 => String::new(),
        1 => format!("from: [{{podSelector: {}}}]", pick(rng, &SELS)),
        2 => format!("from: [{{namespaceSelector: {}}}]", pick(rng, &SELS)),
        _ => format!("from: [{{ipBlock: {{cidr: {}}}}}]", pick(rng, &NETS)),
    };
    let to = from.replace("from", "to");
    let ports = match rng.gen_range(0..3) {
        0 => "",
        1 => "ports: [{port: 80}]",
        _ => "ports: [{port: http}]",
    };
    let join = |a: &str, b: &str| {
        [a, b]
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (ingress, egress) = (join(&from, ports), join(&to, ports));
    format!(
        "metadata: {{name: np{i}, namespace: {ns}}}\nspec: {{podSelector: {}, policyTypes: [Ingress, Egress], ingress: [{{{ingress}}}], egress: [{{{egress}}}]}}",
        pick(rng, &SELS)
    )
}

/// Random clusters, random policies of both kinds: the kernel's verdict on
/// the compiled maps equals the direct walk for every local endpoint, peer,
/// direction and a set of ports; the deciding ClusterNetworkPolicy rule too.
#[test]
fn tiered_verdicts_equal_the_direct_walk() {
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut m = M::new();
        m.ns("a", &[("env", "prod")]);
        m.ns("b", &[]);
        let mut peers = vec![
            Ipv4Addr::new(192, 0, 2, 7),
            Ipv4Addr::new(8, 8, 8, 8),
            Ipv4Addr::new(10, 3, 0, 1),
        ];
        for i in 0..6u8 {
            let ns = if i % 2 == 0 { "a" } else { "b" };
            let app = ["a", "b", "c"][rng.gen_range(0..3)];
            let addr = Ipv4Addr::new(10, 1 + (i % 2), 0, 1 + i);
            let ports: &[(&str, u16)] = if rng.gen_bool(0.5) {
                &[("http", 80)]
            } else {
                &[("http", 81)]
            };
            m.pod(ns, &format!("p{i}"), &[("app", app)], addr, ports);
            if i < 4 {
                m.local(ns, &format!("p{i}"), i as u32 + 1);
            }
            peers.push(addr);
        }
        for i in 0..rng.gen_range(0..3) {
            let ns = if rng.gen_bool(0.5) { "a" } else { "b" };
            let y = random_np(&mut rng, ns, i);
            m.np(&y);
        }
        for i in 0..rng.gen_range(1..5) {
            let y = random_cnp(&mut rng, i);
            m.cnp(&y);
        }
        let c = Compiler::new().compile(&m.model);
        for e in m.model.endpoints.values() {
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                for peer in &peers {
                    if *peer == e.ipv4 {
                        continue;
                    }
                    for (proto, port) in [
                        (PROTO_TCP, 80),
                        (PROTO_TCP, 81),
                        (PROTO_TCP, 443),
                        (PROTO_UDP, 60),
                        (PROTO_UDP, 80),
                        (1, 0),
                    ] {
                        let k = kernel(&c, e, dir, *peer, proto, port);
                        let d = direct(&m.model, &c, e, dir, *peer, proto, port);
                        let what = || {
                            format!("seed {seed} ep {} dir {dir} peer {peer} {proto}/{port}: kernel {k:?} direct {d:?}\n{:#?}", e.key, m.model.cluster_policies)
                        };
                        assert_eq!(k.0, d.0, "{}", what());
                        if d.1 != 0 && k.1 != 0 {
                            assert_eq!(k.1, d.1, "{}", what());
                        }
                    }
                }
            }
        }
    }
}

/// The model without its ClusterNetworkPolicies, compiled: the
/// NetworkPolicy-only state the tier walk explains against.
fn np_only(model: &Model) -> Compiled {
    let mut m = model.clone();
    m.cluster_policies.clear();
    Compiler::new().compile(&m)
}

/// The explained walk reaches the kernel's decision (same allow/deny; the
/// same deciding ClusterNetworkPolicy rule or sentinel), on random
/// clusters; with no container ports known (a flow record's view), it
/// either agrees or says it cannot tell.
#[test]
fn the_explained_walk_reaches_the_kernels_decision() {
    use super::super::tier_walk::{explain, rules_of, walk_of, NpOutcome};
    let mut checked = 0;
    for seed in 100..130u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut m = M::new();
        m.ns("a", &[("env", "prod")]);
        m.ns("b", &[]);
        let mut peers = vec![Ipv4Addr::new(192, 0, 2, 7), Ipv4Addr::new(10, 3, 0, 1)];
        for i in 0..6u8 {
            let ns = if i % 2 == 0 { "a" } else { "b" };
            let app = ["a", "b", "c"][rng.gen_range(0..3)];
            let addr = Ipv4Addr::new(10, 1 + (i % 2), 0, 1 + i);
            m.pod(ns, &format!("p{i}"), &[("app", app)], addr, &[("http", 80)]);
            if i < 4 {
                m.local(ns, &format!("p{i}"), i as u32 + 1);
            }
            peers.push(addr);
        }
        for i in 0..rng.gen_range(0..3) {
            let ns = if rng.gen_bool(0.5) { "a" } else { "b" };
            let y = random_np(&mut rng, ns, i);
            m.np(&y);
        }
        for i in 0..rng.gen_range(1..5) {
            let y = random_cnp(&mut rng, i);
            m.cnp(&y);
        }
        let c = Compiler::new().compile(&m.model);
        let np = np_only(&m.model);
        let label_sets = labels_of(&np.identities);
        let cluster = ordered(
            m.model
                .cluster_policies
                .values()
                .filter_map(|p| p.accepted()),
        );
        for e in m.model.endpoints.values() {
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                for peer in peers.iter().filter(|p| **p != e.ipv4) {
                    for (proto, port) in [(PROTO_TCP, 80), (PROTO_TCP, 443), (PROTO_UDP, 53)] {
                        let Some(w) = walk_of(
                            &m.model,
                            &np.maps,
                            &label_sets,
                            e,
                            dir,
                            (*peer).into(),
                            proto,
                            port,
                        ) else {
                            continue;
                        };
                        let k = kernel(&c, e, dir, *peer, proto, port);
                        let d = w.decision().expect("the exact walk always decides");
                        let what = || {
                            format!("seed {seed} {} dir {dir} {peer} {proto}/{port}: {w:?} kernel {k:?}", e.key)
                        };
                        assert_eq!(d.action == ACTION_ALLOW, k.0, "{}", what());
                        if k.1 >= CLUSTER_COOKIE_BASE {
                            assert_eq!(d.cookie, k.1, "{}", what());
                        }
                        checked += 1;
                        // Without container ports: agrees, or unresolved.
                        let pod = &m.model.pods[&e.key];
                        let nsl =
                            super::super::identities::namespace_labels(&m.model, &e.key.namespace);
                        let rules = rules_of(&cluster, &nsl, &pod.labels, dir);
                        let peer_pod = m.model.pods.values().find(|p| p.ip == Some(*peer));
                        let peer_nsl = peer_pod.map(|p| {
                            super::super::identities::namespace_labels(&m.model, &p.namespace)
                        });
                        let rep = PeerRep {
                            pod: peer_pod.map(|p| (peer_nsl.as_ref().unwrap(), &p.labels, &[][..])),
                            net: ipnetwork::IpNetwork::V4(Ipv4Network::new(*peer, 32).unwrap()),
                            identity: 0,
                            cidr_identity: 0,
                        };
                        let np_step = w.steps.iter().find_map(|s| match s {
                            super::super::tier_walk::Step::NetworkPolicy(o) => Some(*o),
                            _ => None,
                        });
                        let mut np_fn = || np_step.unwrap_or(NpOutcome::NotIsolated);
                        let blind = explain(&rules, None, &rep, false, proto, port, &mut np_fn);
                        if let Some(b) = blind.decision() {
                            assert_eq!(b, d, "{}", what());
                            assert_eq!(blind.passed(), w.passed(), "{}", what());
                        }
                    }
                }
            }
        }
    }
    assert!(
        checked > 500,
        "only {checked} flows had a ClusterNetworkPolicy"
    );
}

/// The walk of case 06's Pass chain, as `trace` prints it.
#[test]
fn the_walk_names_the_pass_and_the_deciding_step() {
    let mut m = M::new();
    m.ns("store", &[("env", "prod")]);
    m.ns("tools", &[("env", "dev")]);
    for (ns, name, i) in [("store", "web", 1), ("tools", "ci", 5)] {
        m.pod(ns, name, &[("app", name)], Ipv4Addr::new(10, 1, 0, i), &[]);
        m.local(ns, name, i as u32);
    }
    let cnps = [
        "metadata: {name: protect-db}\nspec: {tier: Admin, priority: 10, subject: {namespaces: {matchLabels: {env: prod}}}, ingress: [{name: no-dev-into-db, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]}]}",
        "metadata: {name: defer-dev}\nspec: {tier: Admin, priority: 20, subject: {namespaces: {matchLabels: {env: prod}}}, ingress: [{name: to-np, action: Pass, from: [{namespaces: {matchLabels: {env: dev}}}]}]}",
    ];
    m.np("metadata: {name: web-from-ci, namespace: store}\nspec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: ci}}}]}]}");
    let mut e = crate::compiler::Engine::new(false, Vec::new());
    for (_, p) in m.model.pods.clone() {
        e.apply(crate::change::Change::Pod(p));
    }
    for n in m.model.namespaces.values() {
        e.apply(crate::change::Change::Namespace(n.clone()));
    }
    for ep in m.model.endpoints.values() {
        e.add_endpoint(ep.clone());
    }
    e.apply_parsed(
        ObjectKey::new("store", "web-from-ci"),
        m.model.policies[&ObjectKey::new("store", "web-from-ci")].clone(),
    );
    for y in cnps {
        let c: ClusterNetworkPolicy = serde_yaml::from_str(y).unwrap();
        e.apply(crate::change::Change::ClusterPolicy(std::sync::Arc::new(c)));
    }
    let web = e
        .model()
        .endpoints
        .values()
        .find(|x| &*x.key.name == "web")
        .unwrap()
        .clone();
    let w = e
        .tier_walk(
            web.endpoint_id,
            DIR_INGRESS,
            Ipv4Addr::new(10, 1, 0, 5),
            PROTO_TCP,
            80,
        )
        .expect("selected");
    let lines = w.lines(&*e.view(), web.endpoint_id, DIR_INGRESS);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(
        lines[0].contains("ClusterNetworkPolicy/protect-db") && lines[0].contains("no match"),
        "{lines:#?}"
    );
    assert!(
        lines[1].contains("rule to-np [Pass]")
            && lines[1].contains("Pass, rest of the tier skipped"),
        "{lines:#?}"
    );
    assert!(
        lines[2].starts_with("3. NetworkPolicy: allowed by store/web-from-ci")
            && lines[2].ends_with("=> decides"),
        "{lines:#?}"
    );

    // The flow record of that flow: decided by the NetworkPolicy, passed by
    // the Admin rule; the metric counts both.
    let ev_for = |from: u8, port: u16| {
        let remote = Ipv4Addr::new(10, 1, 0, from);
        let ev = Evaluator::new(e.desired());
        let v = ev.ipcache_lookup(remote).unwrap();
        let m = ev
            .policy_match(web.endpoint_id, v, DIR_INGRESS, PROTO_TCP, port)
            .unwrap();
        palisade_common::FlowEvent {
            saddr: u32::from_ne_bytes(remote.octets()),
            daddr: u32::from_ne_bytes(web.ipv4.octets()),
            src_identity: v.identity,
            endpoint_id: web.endpoint_id,
            direction: DIR_INGRESS,
            protocol: PROTO_TCP,
            verdict: if m.value.action == ACTION_ALLOW { 1 } else { 2 },
            reason: if m.value.action == ACTION_ALLOW {
                palisade_common::reason::POLICY_ALLOW
            } else {
                palisade_common::reason::DENY_RULE
            },
            ts_ns: 0,
            ifindex: web.ifindex,
            sport_be: 40000u16.to_be(),
            dport_be: port.to_be(),
            dst_identity: 0,
            cookie: m.value.cookie,
            service_id: 0,
            suppressed_drops: 0,
            suppressed_flows: 0,
            suppressed_reasons: 0,
            family: 4,
            _pad: 0,
            saddr6: [0; 4],
            daddr6: [0; 4],
        }
    };
    let r = crate::flowlog::record(&*e.view(), &ev_for(5, 80));
    assert_eq!(r.policies, ["store/web-from-ci".to_string()], "{r:?}");
    assert_eq!(
        r.passed,
        ["ClusterNetworkPolicy/defer-dev rule to-np (Admin tier, Pass)".to_string()]
    );
    assert_eq!(
        (r.tier.as_deref(), r.action.as_deref()),
        (Some("NetworkPolicy"), Some("Accept"))
    );
    let metrics = crate::metrics::Metrics::default();
    metrics.policy_decisions.count(&r);
    assert_eq!(metrics.policy_decisions.get("Admin", "Pass"), 1);
    assert_eq!(metrics.policy_decisions.get("NetworkPolicy", "Accept"), 1);
    assert!(metrics
        .render(&crate::metrics::KernelStats::default())
        .contains("palisade_policy_decisions_total{tier=\"Admin\",action=\"Pass\"} 1"));

    // Not selected in egress: no walk.
    assert!(e
        .tier_walk(
            web.endpoint_id,
            palisade_common::DIR_EGRESS,
            Ipv4Addr::new(10, 1, 0, 5),
            PROTO_TCP,
            80
        )
        .is_none());
}

/// `nodes` peers: resolved to the selected nodes' addresses, followed as
/// nodes come, change labels and go; other nodes' addresses are decided
/// apart (each by its own CIDR identity once a peer tells them apart).
#[test]
fn nodes_peers_follow_the_node_objects() {
    use crate::{change::Change, model::Node};
    let node = |name: &str, role: &str, ip: [u8; 4]| {
        Change::Node(Node {
            name: name.into(),
            labels: labels(&[("role", role)]),
            addresses: vec![Ipv4Addr::from(ip)],
            pod_cidrs: Vec::new(),
            ..Default::default()
        })
    };
    let mut e = crate::compiler::Engine::new(false, Vec::new());
    e.set_node_name(Some("n1".into()));
    e.apply(node("n1", "worker", [192, 0, 2, 1]));
    e.apply(node("n2", "control-plane", [192, 0, 2, 2]));
    e.apply(node("n3", "worker", [192, 0, 2, 3]));
    e.apply(Change::Pod(
        Pod {
            namespace: "a".into(),
            name: "web".into(),
            labels: labels(&[("app", "web")]),
            ip: Some(Ipv4Addr::new(10, 1, 0, 1)),
            ipv6: None,
            host_network: false,
            ports: Vec::new(),
        }
        .into(),
    ));
    e.add_endpoint(LocalEndpoint {
        key: ObjectKey::new("a", "web"),
        endpoint_id: 1,
        ifindex: 1,
        host_ifname: "v1".into(),
        ipv4: Ipv4Addr::new(10, 1, 0, 1),
        ipv6: None,
        container_id: "c1".into(),
        mac: [0; 6],
    });
    let y = "metadata: {name: no-control-plane}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{name: cp, action: Deny, to: [{nodes: {matchLabels: {role: control-plane}}}]}, {name: nodes-6443, action: Accept, to: [{nodes: {}}], protocols: [{tcp: {destinationPort: {number: 6443}}}]}]}";
    let c: ClusterNetworkPolicy = serde_yaml::from_str(y).unwrap();
    e.apply(Change::ClusterPolicy(std::sync::Arc::new(c)));
    // Baseline: everything else to nodes denied.
    let y = "metadata: {name: nodes-baseline}\nspec: {tier: Baseline, priority: 1, subject: {namespaces: {}}, egress: [{action: Deny, to: [{nodes: {}}]}]}";
    let c: ClusterNetworkPolicy = serde_yaml::from_str(y).unwrap();
    e.apply(Change::ClusterPolicy(std::sync::Arc::new(c)));
    let allowed = |e: &crate::compiler::Engine, ip: [u8; 4], port: u16| {
        let ev = Evaluator::new(e.desired());
        let v = ev
            .ipcache_lookup(Ipv4Addr::from(ip))
            .unwrap_or(IpcacheValue {
                identity: palisade_common::IDENTITY_WORLD,
                cidr_identity: palisade_common::IDENTITY_WORLD,
            });
        if v.identity == IDENTITY_HOST {
            return true;
        }
        ev.policy_match(1, v, DIR_EGRESS, PROTO_TCP, port)
            .is_some_and(|m| m.value.action == ACTION_ALLOW)
    };
    assert!(
        !allowed(&e, [192, 0, 2, 2], 6443),
        "control plane: Deny first"
    );
    assert!(allowed(&e, [192, 0, 2, 3], 6443), "another node on 6443");
    assert!(!allowed(&e, [192, 0, 2, 3], 22), "baseline deny to nodes");
    assert!(allowed(&e, [192, 0, 2, 1], 22), "this node is host: always");
    assert!(allowed(&e, [198, 51, 100, 1], 22), "not a node");
    // The walk names it.
    let w = e
        .tier_walk(1, DIR_EGRESS, Ipv4Addr::new(192, 0, 2, 2), PROTO_TCP, 6443)
        .unwrap();
    assert_eq!(w.steps.len(), 1, "{w:?}");
    // Relabel n3 as control plane; n2 leaves.
    e.apply(node("n3", "control-plane", [192, 0, 2, 3]));
    e.apply(Change::NodeDeleted("n2".into()));
    assert!(
        !allowed(&e, [192, 0, 2, 3], 6443),
        "n3 is control plane now"
    );
    assert!(allowed(&e, [192, 0, 2, 2], 22), "n2's address is no node's");
    // The full compile agrees with the engine.
    let full = Compiler::new().compile(e.model());
    for (ip, port) in [
        ([192, 0, 2, 3], 6443),
        ([192, 0, 2, 2], 22),
        ([192, 0, 2, 3], 22),
    ] {
        let ev = Evaluator::new(&full.maps);
        let v = ev
            .ipcache_lookup(Ipv4Addr::from(ip))
            .unwrap_or(IpcacheValue {
                identity: palisade_common::IDENTITY_WORLD,
                cidr_identity: palisade_common::IDENTITY_WORLD,
            });
        let f = ev
            .policy_match(1, v, DIR_EGRESS, PROTO_TCP, port)
            .is_some_and(|m| m.value.action == ACTION_ALLOW);
        assert_eq!(f, allowed(&e, ip, port), "{ip:?}:{port}");
    }
}

/// A `nodes` peer covers the selected nodes' IPv6 addresses too: an
/// IPv6-only pod's flow to a control-plane node's IPv6 address is denied
/// as its IPv4 one is.
#[test]
fn nodes_peers_cover_the_nodes_ipv6_addresses() {
    use crate::{change::Change, model::Node};
    use std::net::Ipv6Addr;
    let node = |name: &str, role: &str, i: u8| {
        Change::Node(Node {
            name: name.into(),
            labels: labels(&[("role", role)]),
            addresses: vec![Ipv4Addr::new(192, 0, 2, i)],
            addresses6: vec![Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i.into())],
            ..Default::default()
        })
    };
    let mut e = crate::compiler::Engine::new(false, Vec::new());
    e.set_node_name(Some("n1".into()));
    e.apply(node("n1", "worker", 1));
    e.apply(node("n2", "control-plane", 2));
    e.apply(node("n3", "worker", 3));
    let web6 = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
    e.apply(Change::Pod(
        Pod {
            namespace: "a".into(),
            name: "web".into(),
            labels: labels(&[("app", "web")]),
            ip: None,
            ipv6: Some(web6),
            host_network: false,
            ports: Vec::new(),
        }
        .into(),
    ));
    e.add_endpoint(LocalEndpoint {
        key: ObjectKey::new("a", "web"),
        endpoint_id: 1,
        ifindex: 1,
        host_ifname: "v1".into(),
        ipv4: Ipv4Addr::UNSPECIFIED,
        ipv6: Some(web6),
        container_id: "c1".into(),
        mac: [0; 6],
    });
    let y = "metadata: {name: no-control-plane}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{name: cp, action: Deny, to: [{nodes: {matchLabels: {role: control-plane}}}]}]}";
    let c: ClusterNetworkPolicy = serde_yaml::from_str(y).unwrap();
    e.apply(Change::ClusterPolicy(std::sync::Arc::new(c)));
    let allowed = |e: &crate::compiler::Engine, i: u16| {
        let ev = Evaluator::new(e.desired());
        let v = ev
            .ipcache6_lookup(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i))
            .unwrap_or(IpcacheValue {
                identity: palisade_common::IDENTITY_WORLD6,
                cidr_identity: palisade_common::IDENTITY_WORLD6,
            });
        ev.policy_match(1, v, DIR_EGRESS, PROTO_TCP, 6443)
            .is_none_or(|m| m.value.action == ACTION_ALLOW)
    };
    assert!(!allowed(&e, 2), "the control plane's IPv6 address: Deny");
    assert!(allowed(&e, 3), "another node's IPv6 address");
    e.apply(node("n3", "control-plane", 3));
    assert!(!allowed(&e, 3), "n3 relabelled");
}

#[test]
fn domain_peers_follow_the_learned_addresses() {
    use crate::change::Change;
    let mut e = crate::compiler::Engine::new(false, Vec::new());
    let web = Ipv4Addr::new(10, 0, 0, 2);
    e.apply(Change::Pod(
        Pod {
            namespace: "shop".into(),
            name: "web".into(),
            labels: labels(&[("app", "web")]),
            ip: Some(web),
            ipv6: None,
            host_network: false,
            ports: Vec::new(),
        }
        .into(),
    ));
    e.add_endpoint(LocalEndpoint {
        key: ObjectKey::new("shop", "web"),
        endpoint_id: 1,
        ifindex: 7,
        host_ifname: "v1".into(),
        ipv4: web,
        ipv6: None,
        container_id: "c1".into(),
        mac: [0; 6],
    });
    for y in [
        "metadata: {name: names}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{name: partners, action: Accept, to: [{domainNames: [api.example.com, '*.cdn.example']}], protocols: [{tcp: {destinationPort: {number: 443}}}]}]}",
        "metadata: {name: rest}\nspec: {tier: Baseline, priority: 1, subject: {namespaces: {}}, egress: [{name: rest, action: Deny, to: [{networks: [0.0.0.0/0]}]}]}",
    ] {
        let c: ClusterNetworkPolicy = serde_yaml::from_str(y).unwrap();
        e.apply(Change::ClusterPolicy(std::sync::Arc::new(c)));
    }
    let allowed = |e: &crate::compiler::Engine, to: [u8; 4], port: u16| {
        let ev = Evaluator::new(e.desired());
        let v = ev
            .ipcache_lookup(Ipv4Addr::from(to))
            .expect("0.0.0.0/0 is known");
        ev.policy_match(1, v, DIR_EGRESS, PROTO_TCP, port)
            .is_none_or(|m| m.value.action == ACTION_ALLOW)
    };
    let snoops = |e: &crate::compiler::Engine| {
        e.desired().endpoints[&7].flags & palisade_common::EP_DNS_SNOOP != 0
    };
    assert!(
        snoops(&e),
        "a subject of a domain rule has its answers held"
    );
    assert!(!allowed(&e, [192, 0, 2, 10], 443), "nothing learned yet");
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    e.set_learned(
        [
            ("api.example.com".to_string(), vec![ip("192.0.2.10")]),
            ("img.cdn.example".to_string(), vec![ip("192.0.2.30")]),
            ("ads.example".to_string(), vec![ip("192.0.2.20")]),
        ]
        .into(),
    );
    assert!(allowed(&e, [192, 0, 2, 10], 443));
    assert!(allowed(&e, [192, 0, 2, 30], 443), "the wildcard");
    assert!(!allowed(&e, [192, 0, 2, 10], 80), "the rule's port only");
    assert!(
        !allowed(&e, [192, 0, 2, 20], 443),
        "a name no pattern matches"
    );
    assert!(!allowed(&e, [192, 0, 2, 11], 443));
    let rules = crate::fqdn::rules::rules(e.model());
    assert_eq!(rules[&7].len(), 2);
    // Expired: closed again at once.
    e.set_learned([("img.cdn.example".to_string(), vec![ip("192.0.2.30")])].into());
    assert!(!allowed(&e, [192, 0, 2, 10], 443), "forgotten");
    assert!(allowed(&e, [192, 0, 2, 30], 443));
    // The policy deleted: no longer held, nothing allowed by name.
    e.apply(Change::ClusterPolicyDeleted("names".into()));
    assert!(!snoops(&e));
    assert!(!allowed(&e, [192, 0, 2, 30], 443));
}

/// One more learned address writes its own entries, not every learned
/// address's again: the hidden addresses policy is replaced, but the
/// prefixes it keeps keep their CIDR identities.
#[test]
fn one_more_learned_address_touches_only_its_own_entries() {
    use crate::change::Change;
    let mut e = crate::compiler::Engine::new(false, Vec::new());
    for (i, ns) in ["shop", "lab"].iter().enumerate() {
        let ip = Ipv4Addr::new(10, 0, 0, 2 + i as u8);
        e.apply(Change::Pod(
            Pod {
                namespace: ns.to_string(),
                name: "c".into(),
                labels: labels(&[]),
                ip: Some(ip),
                ipv6: None,
                host_network: false,
                ports: Vec::new(),
            }
            .into(),
        ));
        e.add_endpoint(LocalEndpoint {
            key: ObjectKey::new(ns, "c"),
            endpoint_id: 1 + i as u32,
            ifindex: 7 + i as u32,
            host_ifname: "v".into(),
            ipv4: ip,
            ipv6: None,
            container_id: format!("c{i}"),
            mac: [0; 6],
        });
    }
    let y = "metadata: {name: names}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: shop}}}, egress: [{name: partners, action: Accept, to: [{domainNames: ['*.cdn.example']}], protocols: [{tcp: {destinationPort: {number: 443}}}]}, {name: rest, action: Deny, to: [{networks: [0.0.0.0/0]}]}]}";
    let c: ClusterNetworkPolicy = serde_yaml::from_str(y).unwrap();
    e.apply(Change::ClusterPolicy(std::sync::Arc::new(c)));
    let mut learned = std::collections::BTreeMap::new();
    for i in 1..=60u8 {
        learned.insert(
            format!("h{i}.cdn.example"),
            vec![std::net::IpAddr::V4(Ipv4Addr::new(10, 201, 0, i))],
        );
        e.set_learned(learned.clone());
        let t = e.take_touched();
        if i > 1 {
            assert_eq!(t.ipcache.len(), 1, "address {i}");
            assert!(
                t.policy.len() <= 2,
                "address {i}: {} policy keys",
                t.policy.len()
            );
        }
    }
}
