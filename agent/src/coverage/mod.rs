//! `palisade-agent coverage`: what policy covers, from the workloads' side
//! rather than the object count, and the classic mistakes. Pure: a
//! function of the model (every pod and namespace of the cluster, every
//! parsed policy), so it answers for the whole cluster from any node.
//!
//! Findings are produced by independent checks (`CHECKS`), each a function
//! of the model. ClusterNetworkPolicies count everywhere (`cluster`): they
//! constrain pods, give namespaces a default deny, take part in the DNS
//! walk, and an Admin decision above a rule can make it dead.
use std::collections::BTreeMap;

mod cluster;

use ipnetwork::{IpNetwork, Ipv4Network};
use palisade_api::{CoverageReport, Finding, NamespaceCoverage, PodCoverage};
use palisade_common::{DIR_EGRESS, DIR_INGRESS, PROTO_TCP, PROTO_UDP};

use crate::{
    compiler::parse::{ParsedPolicy, Peer, Policy, Port, Rule},
    model::{convert::NAME_LABEL, Labels, Model, ObjectKey, Pod},
    selector::{Requirement, Selector},
};

/// Finding kinds (the `kind` field), and what `--require` checks.
pub mod kind {
    pub const UNSELECTED_POD: &str = "unselected-pod";
    pub const NO_DEFAULT_DENY_INGRESS: &str = "no-default-deny-ingress";
    pub const NO_DEFAULT_DENY_EGRESS: &str = "no-default-deny-egress";
    pub const NO_DNS: &str = "no-dns";
    pub const EMPTY_SELECTOR: &str = "empty-selector";
    pub const SHADOWED_RULE: &str = "shadowed-rule";
    pub const IPBLOCK_CONTAINS_PODS: &str = "ipblock-contains-pods";
    pub const UNGOVERNED_NAMESPACE_LABEL: &str = "ungoverned-namespace-label";
}

/// `--require NAME`: the finding kinds that make it fail.
pub const REQUIREMENTS: &[(&str, &[&str])] = &[
    (
        "default-deny",
        &[kind::NO_DEFAULT_DENY_INGRESS, kind::NO_DEFAULT_DENY_EGRESS],
    ),
    ("default-deny-ingress", &[kind::NO_DEFAULT_DENY_INGRESS]),
    ("default-deny-egress", &[kind::NO_DEFAULT_DENY_EGRESS]),
    ("dns", &[kind::NO_DNS]),
    ("selected", &[kind::UNSELECTED_POD]),
    ("no-empty-selectors", &[kind::EMPTY_SELECTOR]),
    ("no-shadowed-rules", &[kind::SHADOWED_RULE]),
    ("no-ipblock-pods", &[kind::IPBLOCK_CONTAINS_PODS]),
    (
        "governed-namespace-labels",
        &[kind::UNGOVERNED_NAMESPACE_LABEL],
    ),
];

type Check = fn(&Model, &mut Vec<Finding>);

/// Every check, in report order.
const CHECKS: &[Check] = &[
    unselected_pods,
    default_deny,
    dns,
    empty_selectors,
    shadowed_rules,
    cluster::shadowed_cluster_rules,
    ipblocks_with_pods,
    ungoverned_namespace_labels,
    cluster::selector_findings,
];

fn finding(kind: &str, subject: impl ToString, detail: impl Into<String>) -> Finding {
    Finding {
        kind: kind.into(),
        subject: subject.to_string(),
        detail: detail.into(),
    }
}

fn dir_name(d: u8) -> &'static str {
    if d == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// Pods policy can apply to (hostNetwork pods are the node's).
fn pods(m: &Model) -> impl Iterator<Item = &Pod> {
    m.pods.values().map(|p| &**p).filter(|p| !p.host_network)
}

/// Accepted NetworkPolicies (not the compiler's own policy for
/// ClusterNetworkPolicy addresses).
fn accepted(m: &Model) -> impl Iterator<Item = (&ObjectKey, &Policy)> {
    let internal = crate::compiler::tiers::cluster_addresses_key();
    m.policies
        .iter()
        .filter(move |(k, _)| **k != internal)
        .filter_map(|(k, p)| match &**p {
            ParsedPolicy::Accepted(p) => Some((k, p)),
            ParsedPolicy::Rejected { .. } => None,
        })
}

/// The objects that isolate `pod` in each direction: NetworkPolicies of
/// its namespace, then ClusterNetworkPolicies that can deny it there.
fn isolating(m: &Model, pod: &Pod) -> (Vec<String>, Vec<String>) {
    let (mut ing, mut eg) = np_isolating(m, pod);
    ing.extend(cluster::constraining(m, pod, DIR_INGRESS));
    eg.extend(cluster::constraining(m, pod, DIR_EGRESS));
    (ing, eg)
}

/// The NetworkPolicies of `pod`'s namespace that isolate it.
fn np_isolating(m: &Model, pod: &Pod) -> (Vec<String>, Vec<String>) {
    let (mut ing, mut eg) = (Vec::new(), Vec::new());
    for (k, p) in m
        .policies
        .iter()
        .filter(|(k, _)| *k.namespace == *pod.namespace)
    {
        if let Some((i, e)) = p.selection(&pod.labels) {
            if i {
                ing.push(k.to_string());
            }
            if e {
                eg.push(k.to_string());
            }
        }
    }
    (ing, eg)
}

fn namespace_labels<'a>(m: &'a Model, ns: &str) -> Option<&'a Labels> {
    m.namespaces.get(ns).map(|n| &n.labels)
}

/// The pods a rule peer matches today (policy in namespace `ns`).
fn peer_pods<'a>(m: &'a Model, ns: &str, peer: &Peer) -> Vec<&'a Pod> {
    match peer {
        Peer::Pods {
            namespaces,
            pods: sel,
        } => pods(m)
            .filter(|p| match namespaces {
                None => p.namespace == ns,
                Some(s) => namespace_labels(m, &p.namespace).is_some_and(|l| s.matches(l)),
            })
            .filter(|p| sel.as_ref().is_none_or(|s| s.matches(&p.labels)))
            .collect(),
        Peer::Block { cidr, except } => pods(m)
            .filter(|p| p.ip.is_some_and(|ip| in_block(*cidr, except, ip)))
            .collect(),
        Peer::Block6 { cidr, except } => pods(m)
            .filter(|p| {
                p.ipv6
                    .is_some_and(|ip| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)))
            })
            .collect(),
    }
}

fn in_block(cidr: Ipv4Network, except: &[Ipv4Network], ip: std::net::Ipv4Addr) -> bool {
    cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
}

fn unselected_pods(m: &Model, out: &mut Vec<Finding>) {
    for p in pods(m) {
        let (i, e) = isolating(m, p);
        if i.is_empty() && e.is_empty() {
            out.push(finding(
                kind::UNSELECTED_POD,
                ObjectKey::new(&p.namespace, &p.name),
                "no NetworkPolicy or ClusterNetworkPolicy selects this pod: all its traffic is allowed",
            ));
        }
    }
}

/// Accepted policies of `ns` that select every pod and allow nothing in
/// direction `d`, then ClusterNetworkPolicies denying every peer of every
/// pod of `ns` there.
fn default_denies(m: &Model, ns: &str, d: u8) -> Vec<String> {
    let mut out = np_default_denies(m, ns, d);
    out.extend(cluster::default_denies(m, ns, d));
    out
}

fn np_default_denies(m: &Model, ns: &str, d: u8) -> Vec<String> {
    accepted(m)
        .filter(|(k, p)| *k.namespace == *ns && p.selector.is_everything())
        .filter(|(_, p)| {
            let on = if d == DIR_INGRESS {
                p.ingress
            } else {
                p.egress
            };
            on && !p.rules.iter().any(|r| r.direction == d)
        })
        .map(|(k, _)| k.to_string())
        .collect()
}

fn default_deny(m: &Model, out: &mut Vec<Finding>) {
    for ns in m.namespaces.keys() {
        for (d, kind) in [
            (DIR_INGRESS, kind::NO_DEFAULT_DENY_INGRESS),
            (DIR_EGRESS, kind::NO_DEFAULT_DENY_EGRESS),
        ] {
            if default_denies(m, ns, d).is_empty() {
                out.push(finding(
                    kind,
                    ns,
                    format!(
                        "no policy selects every pod of the namespace with no {} rule (nor a ClusterNetworkPolicy denying every peer): a new pod is open until a policy selects it",
                        dir_name(d)
                    ),
                ));
            }
        }
    }
}

/// Whether `port` admits DNS (53/UDP or 53/TCP) to some pod (for named
/// ports: a pod that names port 53 so).
fn admits_dns(m: &Model, port: &Port) -> bool {
    let dns = |proto: u8| proto == PROTO_UDP || proto == PROTO_TCP;
    match port {
        Port::Proto(p) => dns(*p),
        Port::Range { proto, start, end } => dns(*proto) && (*start..=*end).contains(&53),
        Port::Named { proto, name } => {
            dns(*proto)
                && pods(m).any(|p| {
                    p.ports
                        .iter()
                        .any(|cp| cp.port == 53 && cp.name.as_deref() == Some(name.as_str()))
                })
        }
    }
}

/// A rule with a peer that matches something today (or any peer).
fn rule_reaches_something(m: &Model, ns: &str, r: &Rule) -> bool {
    match &r.peers {
        None => true,
        Some(peers) => peers.iter().any(|p| match p {
            Peer::Block { .. } | Peer::Block6 { .. } => true,
            pods_peer => !peer_pods(m, ns, pods_peer).is_empty(),
        }),
    }
}

fn dns(m: &Model, out: &mut Vec<Finding>) {
    for p in pods(m) {
        let (_, eg) = isolating(m, p);
        if eg.is_empty() {
            continue;
        }
        if cluster::applies_in(m, p, DIR_EGRESS) {
            let np_isolated = !np_isolating(m, p).1.is_empty();
            if !cluster::dns_reachable(m, p, np_isolated) {
                out.push(finding(
                    kind::NO_DNS,
                    ObjectKey::new(&p.namespace, &p.name),
                    format!(
                        "egress is constrained (by {}) and the tier walk admits 53/UDP and 53/TCP to nothing: name resolution fails",
                        eg.join(", ")
                    ),
                ));
            }
            continue;
        }
        let allowed = accepted(m)
            .filter(|(k, pol)| {
                *k.namespace == *p.namespace && pol.egress && pol.selector.matches(&p.labels)
            })
            .flat_map(|(k, pol)| pol.rules.iter().map(move |r| (k, r)))
            .filter(|(_, r)| r.direction == DIR_EGRESS)
            .any(|(k, r)| {
                (r.ports.is_empty() || r.ports.iter().any(|port| admits_dns(m, port)))
                    && rule_reaches_something(m, &k.namespace, r)
            });
        if !allowed {
            out.push(finding(
                kind::NO_DNS,
                ObjectKey::new(&p.namespace, &p.name),
                format!(
                    "egress is isolated (by {}) and no rule allows 53/UDP or 53/TCP to anything: name resolution fails",
                    eg.join(", ")
                ),
            ));
        }
    }
}

fn empty_selectors(m: &Model, out: &mut Vec<Finding>) {
    for (k, pol) in accepted(m) {
        if !pods(m).any(|p| *p.namespace == *k.namespace && pol.selector.matches(&p.labels)) {
            out.push(finding(
                kind::EMPTY_SELECTOR,
                k,
                "spec.podSelector matches no pod today",
            ));
        }
        for r in &pol.rules {
            for (i, peer) in r.peers.iter().flatten().enumerate() {
                let Peer::Pods { namespaces, .. } = peer else {
                    continue;
                };
                let at = format!("{k} {}[{}] peer {i}", dir_name(r.direction), r.index);
                if let Some(s) = namespaces {
                    if !m.namespaces.values().any(|n| s.matches(&n.labels)) {
                        out.push(finding(
                            kind::EMPTY_SELECTOR,
                            &at,
                            "namespaceSelector matches no namespace today",
                        ));
                        continue;
                    }
                }
                if peer_pods(m, &k.namespace, peer).is_empty() {
                    out.push(finding(
                        kind::EMPTY_SELECTOR,
                        &at,
                        "the peer selects no pod today",
                    ));
                }
            }
        }
    }
}

/// Whether selector `a` matches every label set `b` matches (structurally:
/// every requirement of `a` is one of `b`'s).
fn selector_covers(a: &Selector, b: &Selector) -> bool {
    a.requirements()
        .iter()
        .all(|r| b.requirements().contains(r))
}

/// Whether peer `a` matches everything peer `b` matches, for every cluster
/// state (not only today's).
fn peer_covers(a: &Peer, b: &Peer) -> bool {
    match (a, b) {
        (
            Peer::Pods {
                namespaces: na,
                pods: pa,
            },
            Peer::Pods {
                namespaces: nb,
                pods: pb,
            },
        ) => {
            let ns = match (na, nb) {
                (None, None) => true,
                (Some(a), Some(b)) => selector_covers(a, b),
                // `a` is any namespace: it covers the policy's own.
                (Some(a), None) => a.is_everything(),
                (None, Some(_)) => false,
            };
            let pods = match (pa, pb) {
                (None, _) => true,
                (Some(a), None) => a.is_everything(),
                (Some(a), Some(b)) => selector_covers(a, b),
            };
            ns && pods
        }
        (
            Peer::Block {
                cidr: ca,
                except: ea,
            },
            Peer::Block {
                cidr: cb,
                except: eb,
            },
        ) => block_covers((*ca).into(), &nets(ea), (*cb).into(), &nets(eb)),
        (
            Peer::Block6 {
                cidr: ca,
                except: ea,
            },
            Peer::Block6 {
                cidr: cb,
                except: eb,
            },
        ) => block_covers((*ca).into(), &nets(ea), (*cb).into(), &nets(eb)),
        _ => false,
    }
}

fn nets<T: Copy + Into<IpNetwork>>(v: &[T]) -> Vec<IpNetwork> {
    v.iter().map(|x| (*x).into()).collect()
}

/// Whether block `a` (cidr, except) matches everything block `b` does:
/// `b` inside `a`, and every hole of `a` overlapping `b` a hole of `b` too.
fn block_covers(ca: IpNetwork, ea: &[IpNetwork], cb: IpNetwork, eb: &[IpNetwork]) -> bool {
    let within = |x: IpNetwork, y: IpNetwork| y.prefix() <= x.prefix() && y.contains(x.network());
    within(cb, ca)
        && ea.iter().all(|x| {
            !(x.contains(cb.network()) || cb.contains(x.network()))
                || eb.iter().any(|y| within(*x, *y))
        })
}

fn port_covers(a: &Port, b: &Port) -> bool {
    match (a, b) {
        (Port::Proto(p), b) => {
            *p == match b {
                Port::Proto(q) | Port::Range { proto: q, .. } | Port::Named { proto: q, .. } => *q,
            }
        }
        (
            Port::Range { proto, start, end },
            Port::Range {
                proto: q,
                start: s,
                end: e,
            },
        ) => proto == q && start <= s && e <= end,
        (a @ Port::Named { .. }, b) => a == b,
        _ => false,
    }
}

/// Rule `a` admits everything rule `b` admits.
fn rule_covers(a: &Rule, b: &Rule) -> bool {
    let peers = match (&a.peers, &b.peers) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pa), Some(pb)) => pb.iter().all(|y| pa.iter().any(|x| peer_covers(x, y))),
    };
    let ports = a.ports.is_empty()
        || (!b.ports.is_empty()
            && b.ports
                .iter()
                .all(|y| a.ports.iter().any(|x| port_covers(x, y))));
    peers && ports
}

fn shadowed_rules(m: &Model, out: &mut Vec<Finding>) {
    let cnps = cluster::policies(m);
    for (k, pol) in accepted(m) {
        for (j, b) in pol.rules.iter().enumerate() {
            // The first rule that covers `b` (for identical rules, the
            // earlier one shadows the later).
            let by = pol.rules.iter().enumerate().find(|(i, a)| {
                *i != j
                    && a.direction == b.direction
                    && rule_covers(a, b)
                    && (!rule_covers(b, a) || *i < j)
            });
            if let Some((_, a)) = by {
                out.push(finding(
                    kind::SHADOWED_RULE,
                    format!("{k} {}[{}]", dir_name(b.direction), b.index),
                    format!(
                        "{}[{}] of the same policy admits everything this rule does: it has no effect",
                        dir_name(a.direction),
                        a.index
                    ),
                ));
            } else if let Some(detail) = cluster::np_rule_shadowed(m, &cnps, k, pol, b) {
                out.push(finding(
                    kind::SHADOWED_RULE,
                    format!("{k} {}[{}]", dir_name(b.direction), b.index),
                    detail,
                ));
            }
        }
    }
}

fn ipblocks_with_pods(m: &Model, out: &mut Vec<Finding>) {
    for (k, pol) in accepted(m) {
        for r in &pol.rules {
            for (i, peer) in r.peers.iter().flatten().enumerate() {
                let Peer::Block { cidr, .. } = peer else {
                    continue;
                };
                let inside = peer_pods(m, &k.namespace, peer);
                if inside.is_empty() {
                    continue;
                }
                let names: Vec<String> = inside
                    .iter()
                    .take(3)
                    .map(|p| {
                        format!(
                            "{}/{} ({})",
                            p.namespace,
                            p.name,
                            p.ip.expect("has an address")
                        )
                    })
                    .collect();
                out.push(finding(
                    kind::IPBLOCK_CONTAINS_PODS,
                    format!("{k} {}[{}] peer {i}", dir_name(r.direction), r.index),
                    format!(
                        "ipBlock {cidr} contains {} pod address(es), e.g. {}: pod addresses change; select pods by label",
                        inside.len(),
                        names.join(", ")
                    ),
                ));
            }
        }
    }
}

fn requirement_key(r: &Requirement) -> &str {
    match r {
        Requirement::In(k, _)
        | Requirement::NotIn(k, _)
        | Requirement::Exists(k)
        | Requirement::DoesNotExist(k) => k,
    }
}

/// A namespace selector on labels other than the name label: whoever can
/// label a namespace can join it.
fn ungoverned(s: &Selector, at: String, out: &mut Vec<Finding>) {
    let keys: Vec<&str> = s
        .requirements()
        .iter()
        .map(requirement_key)
        .filter(|k| *k != NAME_LABEL)
        .collect();
    if !keys.is_empty() {
        out.push(finding(
            kind::UNGOVERNED_NAMESPACE_LABEL,
            at,
            format!(
                "namespaceSelector on {}: whoever can label a namespace can join it; select on {NAME_LABEL}",
                keys.join(", ")
            ),
        ));
    }
}

fn ungoverned_namespace_labels(m: &Model, out: &mut Vec<Finding>) {
    for (k, pol) in accepted(m) {
        for r in &pol.rules {
            for (i, peer) in r.peers.iter().flatten().enumerate() {
                if let Peer::Pods {
                    namespaces: Some(s),
                    ..
                } = peer
                {
                    let at = format!("{k} {}[{}] peer {i}", dir_name(r.direction), r.index);
                    ungoverned(s, at, out);
                }
            }
        }
    }
}

/// The whole report.
pub fn report(m: &Model) -> CoverageReport {
    let mut by_ns: BTreeMap<&str, NamespaceCoverage> = m
        .namespaces
        .keys()
        .map(|ns| {
            (
                ns.as_str(),
                NamespaceCoverage {
                    namespace: ns.clone(),
                    default_deny_ingress: default_denies(m, ns, DIR_INGRESS),
                    default_deny_egress: default_denies(m, ns, DIR_EGRESS),
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut pod_rows = Vec::new();
    for p in pods(m) {
        let (ingress, egress) = isolating(m, p);
        if let Some(n) = by_ns.get_mut(p.namespace.as_str()) {
            n.pods += 1;
            n.ingress_isolated_pods += usize::from(!ingress.is_empty());
            n.egress_isolated_pods += usize::from(!egress.is_empty());
        }
        pod_rows.push(PodCoverage {
            namespace: p.namespace.clone(),
            pod: p.name.clone(),
            ingress,
            egress,
        });
    }
    let mut findings = Vec::new();
    for check in CHECKS {
        check(m, &mut findings);
    }
    CoverageReport {
        namespaces: by_ns.into_values().collect(),
        pods: pod_rows,
        findings,
    }
}

/// The `--require` names that fail on `findings`, with how many findings
/// each; an unknown name is an error.
pub fn failed_requirements(
    findings: &[Finding],
    require: &[String],
) -> Result<Vec<(String, usize)>, String> {
    let mut failed = Vec::new();
    for name in require {
        let Some((_, kinds)) = REQUIREMENTS.iter().find(|(n, _)| n == name) else {
            let known: Vec<&str> = REQUIREMENTS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "--require {name}: unknown check (known: {})",
                known.join(", ")
            ));
        };
        let n = findings
            .iter()
            .filter(|f| kinds.contains(&f.kind.as_str()))
            .count();
        if n > 0 {
            failed.push((name.clone(), n));
        }
    }
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use k8s_openapi::api::networking::v1::NetworkPolicy;

    use super::*;
    use crate::model::{ContainerPort, Namespace};

    fn model(policies: &str) -> Model {
        let mut m = Model::default();
        for (ns, team) in [("app", "a"), ("kube-system", "sys")] {
            m.namespaces.insert(
                ns.into(),
                Namespace {
                    name: ns.into(),
                    labels: Labels::from([
                        (NAME_LABEL.to_string(), ns.to_string()),
                        ("team".to_string(), team.to_string()),
                    ]),
                    audit: false,
                },
            );
        }
        for (ns, name, app, ip) in [
            ("app", "web", "web", 1),
            ("app", "db", "db", 2),
            ("app", "stray", "stray", 3),
            ("kube-system", "dns", "dns", 10),
        ] {
            m.pods.insert(
                ObjectKey::new(ns, name),
                Pod {
                    namespace: ns.into(),
                    name: name.into(),
                    labels: Labels::from([("app".to_string(), app.to_string())]),
                    ip: Some(Ipv4Addr::new(10, 0, 0, ip)),
                    ipv6: None,
                    host_network: false,
                    ports: vec![ContainerPort {
                        name: Some("dns".into()),
                        port: 53,
                        protocol: "UDP".into(),
                    }],
                }
                .into(),
            );
        }
        for doc in policies.split("\n---\n") {
            let np: NetworkPolicy = serde_yaml::from_str(doc).unwrap();
            let key = crate::model::convert::key(&np.metadata).unwrap();
            m.add_policy(key, &np);
        }
        m
    }

    fn kinds(r: &CoverageReport, subject: &str) -> Vec<String> {
        r.findings
            .iter()
            .filter(|f| f.subject == subject)
            .map(|f| f.kind.clone())
            .collect()
    }

    const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: app}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-egress, namespace: app}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432}]
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432}, {port: 5433}]
  - to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.2/32]}}]
  - to: [{namespaceSelector: {matchLabels: {team: nobody}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-egress, namespace: app}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {team: sys}}}]
    ports: [{port: dns, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ghost, namespace: app}
spec: {podSelector: {matchLabels: {app: ghost}}, policyTypes: [Ingress]}
"#;

    #[test]
    fn coverage_names_isolation_and_every_mistake() {
        let m = model(POLICIES);
        let r = report(&m);
        let web = r.pods.iter().find(|p| p.pod == "web").unwrap();
        assert_eq!(web.ingress, vec!["app/deny-ingress"]);
        assert_eq!(web.egress, vec!["app/web-egress"]);
        let app = r.namespaces.iter().find(|n| n.namespace == "app").unwrap();
        assert_eq!(app.default_deny_ingress, vec!["app/deny-ingress"]);
        assert!(app.default_deny_egress.is_empty());
        assert_eq!(
            (
                app.pods,
                app.ingress_isolated_pods,
                app.egress_isolated_pods
            ),
            (3, 3, 2)
        );

        assert_eq!(kinds(&r, "kube-system/dns"), vec![kind::UNSELECTED_POD]);
        assert!(
            kinds(&r, "app/stray").is_empty(),
            "isolated by the default deny"
        );
        assert_eq!(
            kinds(&r, "app"),
            vec![kind::NO_DEFAULT_DENY_EGRESS.to_string()]
        );
        assert!(kinds(&r, "kube-system").contains(&kind::NO_DEFAULT_DENY_INGRESS.to_string()));
        // web: egress to the db and an ipBlock (all ports, all protocols),
        // so DNS to the pods in 10.0.0.0/24 is allowed; db: DNS by name to
        // kube-system.
        assert!(!kinds(&r, "app/web").contains(&kind::NO_DNS.to_string()));
        assert!(!kinds(&r, "app/db").contains(&kind::NO_DNS.to_string()));
        assert_eq!(kinds(&r, "app/ghost"), vec![kind::EMPTY_SELECTOR]);
        assert_eq!(
            kinds(&r, "app/web-egress egress[3] peer 0"),
            vec![kind::EMPTY_SELECTOR, kind::UNGOVERNED_NAMESPACE_LABEL]
        );
        assert_eq!(
            kinds(&r, "app/web-egress egress[0]"),
            vec![kind::SHADOWED_RULE],
            "5432 to the db is inside egress[1]"
        );
        assert!(kinds(&r, "app/web-egress egress[1]").is_empty());
        assert_eq!(
            kinds(&r, "app/web-egress egress[2] peer 0"),
            vec![kind::IPBLOCK_CONTAINS_PODS]
        );
        let f = r
            .findings
            .iter()
            .find(|f| f.kind == kind::IPBLOCK_CONTAINS_PODS)
            .unwrap();
        assert!(f.detail.contains("3 pod address"), "db is excepted: {f:?}");
        assert_eq!(
            kinds(&r, "app/db-egress egress[0] peer 0"),
            vec![kind::UNGOVERNED_NAMESPACE_LABEL]
        );
    }

    #[test]
    fn dns_missing_after_an_egress_deny_and_require() {
        let m = model(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-egress, namespace: app}\nspec: {podSelector: {}, policyTypes: [Egress]}\n",
        );
        let r = report(&m);
        for pod in ["app/web", "app/db", "app/stray"] {
            assert!(kinds(&r, pod).contains(&kind::NO_DNS.to_string()), "{pod}");
        }
        let failed =
            failed_requirements(&r.findings, &["dns".into(), "default-deny-egress".into()])
                .unwrap();
        // kube-system has no default deny; app has (egress).
        assert_eq!(
            failed,
            vec![
                ("dns".to_string(), 3),
                ("default-deny-egress".to_string(), 1)
            ]
        );
        assert!(failed_requirements(&r.findings, &["bogus".into()]).is_err());
    }

    fn with_cluster(m: &mut Model, docs: &str) {
        for doc in docs.split("\n---\n") {
            let c: crate::cnp::ClusterNetworkPolicy = serde_yaml::from_str(doc).unwrap();
            m.add_cluster_policy(&c);
        }
    }

    fn detail<'a>(r: &'a CoverageReport, subject: &str) -> &'a str {
        &r.findings
            .iter()
            .find(|f| f.subject == subject)
            .unwrap_or_else(|| panic!("no finding for {subject}: {:?}", r.findings))
            .detail
    }

    const ADMIN_DENY_DB: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-db-from-web}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: app}}}
  egress:
  - name: dns
    action: Accept
    to: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]
    protocols: [{udp: {destinationPort: {number: 53}}}]
  - name: db
    action: Deny
    to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]
  - name: db-again
    action: Accept
    to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]
    protocols: [{tcp: {destinationPort: {number: 5432}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: baseline}
spec:
  tier: Baseline
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - name: deny-all
    action: Deny
    from: [{namespaces: {}}]
  egress:
  - name: db-5432
    action: Accept
    to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]
    protocols: [{tcp: {destinationPort: {number: 5432}}}]
  - name: deny-all
    action: Deny
    to: [{networks: [0.0.0.0/0]}]
"#;

    #[test]
    fn cluster_policies_isolate_deny_by_default_and_shadow() {
        let mut m = model(POLICIES);
        with_cluster(&mut m, ADMIN_DENY_DB);
        let r = report(&m);
        // The Baseline deny isolates every pod, kube-system's included.
        let dns = r.pods.iter().find(|p| p.pod == "dns").unwrap();
        assert_eq!(dns.ingress, vec!["ClusterNetworkPolicy/baseline"]);
        assert_eq!(
            kinds(&r, "kube-system/dns"),
            vec![kind::NO_DNS],
            "denied by Baseline"
        );
        let sys = r
            .namespaces
            .iter()
            .find(|n| n.namespace == "kube-system")
            .unwrap();
        assert_eq!(
            sys.default_deny_ingress,
            vec!["ClusterNetworkPolicy/baseline"]
        );
        assert_eq!(
            sys.default_deny_egress,
            vec!["ClusterNetworkPolicy/baseline"]
        );
        assert!(!kinds(&r, "app").contains(&kind::NO_DEFAULT_DENY_EGRESS.to_string()));

        // web's NetworkPolicy rules to the db are dead under the Admin Deny;
        // the ipBlock rule (all ports to 10.0.0.0/24) is not: non-pod
        // addresses there are not denied above it.
        for rule in ["app/web-egress egress[0]", "app/web-egress egress[1]"] {
            assert_eq!(kinds(&r, rule), vec![kind::SHADOWED_RULE], "{rule}");
        }
        assert!(detail(&r, "app/web-egress egress[1]")
            .contains("ClusterNetworkPolicy/no-db-from-web rule db (Admin, Deny)"));
        assert!(!kinds(&r, "app/web-egress egress[2]").contains(&kind::SHADOWED_RULE.to_string()));
        // Inside the CNP: db-again comes after db, which covers it.
        assert!(detail(&r, "ClusterNetworkPolicy/no-db-from-web egress[2]")
            .contains("rule db of the same policy"),);
        // The Baseline accept to the db on 5432 is dead for app's pods (the
        // Admin Deny) but not for kube-system's: not reported.
        assert!(kinds(&r, "ClusterNetworkPolicy/baseline egress[0]").is_empty());
        // DNS: app's pods reach kube-system on 53/UDP through the Admin
        // accept; kube-system's dns pod is denied everything by Baseline.
        for pod in ["app/web", "app/db", "app/stray"] {
            assert!(!kinds(&r, pod).contains(&kind::NO_DNS.to_string()), "{pod}");
        }
        let dns_pod = m.pods.get(&ObjectKey::new("kube-system", "dns")).unwrap();
        assert!(!cluster::dns_reachable(&m, dns_pod, false));
    }

    #[test]
    fn admin_deny_everything_shadows_dns_and_governance_of_cluster_selectors() {
        let mut m = model(POLICIES);
        with_cluster(
            &mut m,
            r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: lockdown}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {team: a}}}
  egress:
  - action: Deny
    to: [{networks: [0.0.0.0/0]}]
  - action: Accept
    to: [{namespaces: {matchLabels: {team: sys}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: nobody}
spec:
  tier: Admin
  priority: 2
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: ghost}}}}
  ingress:
  - action: Accept
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: gone}}}]
"#,
        );
        let r = report(&m);
        // Every egress rule of app's policies is dead, the ipBlock one too
        // (0.0.0.0/0 covers it, pods and addresses alike).
        for rule in [
            "app/web-egress egress[0]",
            "app/web-egress egress[1]",
            "app/web-egress egress[2]",
            "app/db-egress egress[0]",
        ] {
            assert!(
                kinds(&r, rule).contains(&kind::SHADOWED_RULE.to_string()),
                "{rule}: {:?}",
                r.findings
            );
        }
        // The accept after the deny-everything never decides.
        assert_eq!(
            kinds(&r, "ClusterNetworkPolicy/lockdown egress[1]"),
            vec![kind::SHADOWED_RULE]
        );
        assert_eq!(
            kinds(&r, "ClusterNetworkPolicy/lockdown egress[1] peer 0"),
            vec![kind::UNGOVERNED_NAMESPACE_LABEL]
        );
        assert_eq!(
            kinds(&r, "ClusterNetworkPolicy/lockdown subject"),
            vec![kind::UNGOVERNED_NAMESPACE_LABEL]
        );
        for pod in ["app/web", "app/db", "app/stray"] {
            assert!(kinds(&r, pod).contains(&kind::NO_DNS.to_string()), "{pod}");
        }
        assert_eq!(
            kinds(&r, "ClusterNetworkPolicy/nobody subject"),
            vec![kind::EMPTY_SELECTOR]
        );
        assert_eq!(
            kinds(&r, "ClusterNetworkPolicy/nobody ingress[0] peer 0"),
            vec![kind::EMPTY_SELECTOR]
        );
        // Without the lockdown, nothing is shadowed by the tier.
        m.cluster_policies.remove("lockdown");
        let r = report(&m);
        assert!(kinds(&r, "app/web-egress egress[1]").is_empty());
        assert!(!kinds(&r, "app/web").contains(&kind::NO_DNS.to_string()));
    }
}
