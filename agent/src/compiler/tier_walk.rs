//! The tier walk of one flow, step by step, for people: which
//! ClusterNetworkPolicy rules were considered in order, what each did
//! (no match, Accept, Deny, Pass), whether NetworkPolicy decided, and which
//! step decided. `trace` prints it; flow records take the Pass chain from
//! it. The kernel's maps hold only the walk's result (tiers.rs); this is
//! the same walk ([`tiers::walk`]) kept step by step, tested to reach the
//! same decision.
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::Ipv4Network;
use palisade_common::{
    is_label_identity, IpcacheValue, PolicyValue, DIR_INGRESS, EP_EGRESS_ENFORCED,
    EP_INGRESS_ENFORCED,
};
use palisade_dataplane::MapState;

use super::{
    cluster::{Action, ClusterPolicy, ClusterPort, Tier},
    tiers::{self, PeerRep, TierRule, COOKIE_DEFAULT_ALLOW, COOKIE_NP_ISOLATION},
    view::Names,
};
use crate::model::{ContainerPort, Labels, LocalEndpoint, Model};

/// What one considered rule did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleOutcome {
    NoMatch,
    /// Matched: its (effective) action applies.
    Matched(Action),
    /// Depends on a container port the caller does not know (a
    /// `destinationNamedPort` rule, in a flow record): the walk stops.
    Unresolved,
}

/// The NetworkPolicy step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpOutcome {
    /// No NetworkPolicy isolates the pod in this direction: on to Baseline.
    NotIsolated,
    /// Allowed by the rule with this cookie.
    Allowed(u32),
    /// Isolated and no rule matched.
    Denied,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A ClusterNetworkPolicy rule (by cookie) considered.
    Rule {
        cookie: u32,
        outcome: RuleOutcome,
    },
    NetworkPolicy(NpOutcome),
    /// No tier decided: allowed.
    Default,
}

/// The steps in order; the last one decided (unless it is unresolved).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    pub steps: Vec<Step>,
}

impl Walk {
    /// The decision, as the policy map holds it (None: unresolved).
    pub fn decision(&self) -> Option<PolicyValue> {
        let allow = |cookie| PolicyValue {
            action: palisade_common::ACTION_ALLOW,
            cookie,
        };
        let deny = |cookie| PolicyValue {
            action: palisade_common::ACTION_DENY,
            cookie,
        };
        match self.steps.last()? {
            Step::Rule {
                cookie,
                outcome: RuleOutcome::Matched(Action::Accept),
            } => Some(allow(*cookie)),
            Step::Rule {
                cookie,
                outcome: RuleOutcome::Matched(Action::Deny),
            } => Some(deny(*cookie)),
            Step::Rule { .. } => None,
            Step::NetworkPolicy(NpOutcome::Allowed(c)) => Some(allow(*c)),
            Step::NetworkPolicy(NpOutcome::Denied) => Some(deny(COOKIE_NP_ISOLATION)),
            Step::NetworkPolicy(NpOutcome::NotIsolated) => None,
            Step::Default => Some(allow(COOKIE_DEFAULT_ALLOW)),
        }
    }

    /// Cookies of the Pass rules the flow went through, in order.
    pub fn passed(&self) -> Vec<u32> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Rule {
                    cookie,
                    outcome: RuleOutcome::Matched(Action::Pass),
                } => Some(*cookie),
                _ => None,
            })
            .collect()
    }

    /// One line per step, named through `names`; the deciding one marked.
    pub fn lines<N: Names + ?Sized>(
        &self,
        names: &N,
        endpoint_id: u32,
        direction: u8,
    ) -> Vec<String> {
        let rule = |c: u32| match names.cluster_cookie(c) {
            Some(r) => format!(
                "{} ClusterNetworkPolicy/{} (priority {}) rule {} [{}]",
                r.tier, r.policy, r.priority, r.label, r.action
            ),
            None => format!("ClusterNetworkPolicy rule #{c:#x}"),
        };
        let last = self.steps.len().saturating_sub(1);
        self.steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let decided = if i == last && self.decision().is_some() {
                    "  => decides"
                } else {
                    ""
                };
                let text = match s {
                    Step::Rule { cookie, outcome } => {
                        let what = match outcome {
                            RuleOutcome::NoMatch => "no match".to_string(),
                            RuleOutcome::Matched(Action::Pass) => {
                                "matched: Pass, rest of the tier skipped".to_string()
                            }
                            RuleOutcome::Matched(a) => format!("matched: {a}"),
                            RuleOutcome::Unresolved => {
                                "depends on a named port not known here".to_string()
                            }
                        };
                        format!("{}: {what}", rule(*cookie))
                    }
                    Step::NetworkPolicy(NpOutcome::NotIsolated) => {
                        "NetworkPolicy: none isolates the pod in this direction".to_string()
                    }
                    Step::NetworkPolicy(NpOutcome::Allowed(c)) => match names.cookie(*c) {
                        Some(r) => format!("NetworkPolicy: allowed by {r}"),
                        None => "NetworkPolicy: allowed".to_string(),
                    },
                    Step::NetworkPolicy(NpOutcome::Denied) => {
                        let by: Vec<String> = names
                            .isolating(endpoint_id, direction)
                            .iter()
                            .map(|k| k.to_string())
                            .collect();
                        format!(
                            "NetworkPolicy: isolated by {}, no rule matches: Deny",
                            by.join(", ")
                        )
                    }
                    Step::Default => "no tier decided: allowed (baseline default)".to_string(),
                };
                format!("{}. {text}{decided}", i + 1)
            })
            .collect()
    }
}

/// A rule's match, where the destination's container ports may be unknown
/// (`None`).
fn outcome(
    rule: &super::cluster::ClusterRule,
    own_ports: Option<&[ContainerPort]>,
    peer: &PeerRep,
    peer_ports: bool,
    proto: u8,
    port: u16,
) -> RuleOutcome {
    let act = RuleOutcome::Matched(rule.effective_action());
    let named = rule
        .ports
        .iter()
        .flatten()
        .any(|p| matches!(p, ClusterPort::Named(_)));
    let ports_known = if rule.direction == DIR_INGRESS {
        own_ports.is_some()
    } else {
        peer_ports
    };
    if tiers::rule_matches(rule, own_ports.unwrap_or(&[]), peer, proto, port) {
        return act;
    }
    if !named || ports_known || rule.fail_closed_matches().is_some() {
        return RuleOutcome::NoMatch;
    }
    // Not matched with no ports: does the peer alone match?
    let mut any_port = rule.clone();
    any_port.ports = None;
    if tiers::rule_matches(&any_port, &[], peer, proto, port) {
        RuleOutcome::Unresolved
    } else {
        RuleOutcome::NoMatch
    }
}

/// The walk of [`tiers::walk`], step by step. `rules`: the endpoint's
/// rules of the direction, in evaluation order. `np` is asked only if the
/// walk reaches NetworkPolicy. `peer_ports`: whether `peer`'s container
/// ports are known.
#[allow(clippy::too_many_arguments)]
pub(crate) fn explain(
    rules: &[TierRule],
    own_ports: Option<&[ContainerPort]>,
    peer: &PeerRep,
    peer_ports: bool,
    proto: u8,
    port: u16,
    np: &mut dyn FnMut() -> NpOutcome,
) -> Walk {
    let mut w = Walk::default();
    for tier in [Tier::Admin, Tier::Baseline] {
        if tier == Tier::Baseline {
            let o = np();
            w.steps.push(Step::NetworkPolicy(o));
            if o != NpOutcome::NotIsolated {
                return w;
            }
        }
        for r in rules.iter().filter(|r| r.tier == tier) {
            let o = outcome(r.rule, own_ports, peer, peer_ports, proto, port);
            w.steps.push(Step::Rule {
                cookie: r.cookie,
                outcome: o,
            });
            match o {
                RuleOutcome::NoMatch => continue,
                RuleOutcome::Matched(Action::Pass) => break,
                _ => return w,
            }
        }
    }
    w.steps.push(Step::Default);
    w
}

/// The endpoint's rules in a direction, in evaluation order (empty: no
/// ClusterNetworkPolicy selects it there). `cluster`: accepted policies,
/// ordered ([`tiers::ordered`]).
pub(crate) fn rules_of<'a>(
    cluster: &[&'a ClusterPolicy],
    namespace_labels: &Labels,
    pod_labels: &Labels,
    direction: u8,
) -> Vec<TierRule<'a>> {
    let numbers = tiers::cluster_cookie_numbers(cluster);
    cluster
        .iter()
        .filter(|p| p.subject.matches(namespace_labels, pod_labels))
        .flat_map(|p| {
            let numbers = &numbers;
            p.rules
                .iter()
                .filter(move |r| r.direction == direction)
                .map(move |r| TierRule {
                    tier: p.tier,
                    cookie: numbers[&(p.name.clone(), r.direction, r.index)],
                    rule: r,
                })
        })
        .collect()
}

/// Longest-prefix match in a map state's ipcache of `addr`'s family; a
/// miss is that family's world.
fn ipcache_lookup(maps: &MapState, addr: IpAddr) -> IpcacheValue {
    let hit = match addr {
        IpAddr::V4(a) => (0..=32u8).rev().find_map(|len| {
            let net = Ipv4Network::new(a, len).ok()?;
            maps.ipcache.get(&(net.network(), len as u32))
        }),
        IpAddr::V6(a) => (0..=128u8).rev().find_map(|len| {
            let net = super::ipcache::net6_of(a, len);
            maps.ipcache6.get(&(net.network(), len as u32))
        }),
    };
    match addr {
        IpAddr::V4(_) => palisade_common::decision::peer_or_world(hit.copied()),
        IpAddr::V6(_) => palisade_common::decision::peer_or_world6(hit.copied()),
    }
}

/// The exact walk of a flow of a local endpoint, from the model and the
/// NetworkPolicy-only map state (`np_maps`: the engine's state before the
/// tier stage, whose identities `label_sets` names). None: no
/// ClusterNetworkPolicy selects the endpoint in that direction.
#[allow(clippy::too_many_arguments)]
pub fn walk_of<'a>(
    model: &'a Model,
    np_maps: &MapState,
    label_sets: &dyn Fn(u32) -> Option<(&'a Labels, &'a Labels)>,
    ep: &LocalEndpoint,
    direction: u8,
    remote: IpAddr,
    proto: u8,
    port: u16,
) -> Option<Walk> {
    let cluster = tiers::ordered(model.cluster_policies.values().filter_map(|p| p.accepted()));
    if cluster.is_empty() {
        return None;
    }
    let pod = model.pods.get(&ep.key);
    if pod.is_some_and(|p| p.host_network) {
        return None;
    }
    let no_labels = Labels::new();
    let nsl = super::identities::namespace_labels(model, &ep.key.namespace);
    let rules = rules_of(
        &cluster,
        &nsl,
        pod.map_or(&no_labels, |p| &p.labels),
        direction,
    );
    if rules.is_empty() {
        return None;
    }
    let own_ports: &[ContainerPort] = pod.map_or(&[], |p| &p.ports);
    let v = ipcache_lookup(np_maps, remote);
    let peer_pod_ports: &[ContainerPort] = model
        .pods
        .values()
        .find(|p| {
            let has = match remote {
                IpAddr::V4(a) => p.ip == Some(a),
                IpAddr::V6(a) => p.ipv6 == Some(a),
            };
            has && !p.host_network
        })
        .map_or(&[], |p| &p.ports);
    let peer = PeerRep {
        pod: is_label_identity(v.identity)
            .then(|| label_sets(v.identity))
            .flatten()
            .map(|(n, p)| (n, p, peer_pod_ports)),
        net: ipnetwork::IpNetwork::from(remote),
        identity: v.identity,
        cidr_identity: v.cidr_identity,
    };
    let flag = if direction == DIR_INGRESS {
        EP_INGRESS_ENFORCED
    } else {
        EP_EGRESS_ENFORCED
    };
    let isolated = np_maps
        .endpoints
        .get(&ep.ifindex)
        .is_some_and(|i| i.flags & flag != 0);
    let mut np = || {
        if !isolated {
            return NpOutcome::NotIsolated;
        }
        let entries: Vec<_> = np_maps
            .policy
            .iter()
            .filter(|((_, k), _)| k.endpoint_id == ep.endpoint_id && k.direction == direction)
            .map(|((prefix, k), v)| (*prefix, *k, *v))
            .collect();
        match tiers::np_chain(&entries, &peer, proto, port) {
            Some(v) => NpOutcome::Allowed(v.cookie),
            None => NpOutcome::Denied,
        }
    };
    Some(explain(
        &rules,
        Some(own_ports),
        &peer,
        true,
        proto,
        port,
        &mut np,
    ))
}

/// The Pass chain of a recorded flow, from the published view (which has
/// no container ports: a named-port rule on the way leaves it unresolved,
/// and then nothing is claimed). `cookie` is what the kernel decided; the
/// chain is returned only if the walk reaches that same decision.
pub fn passed_for_record(
    view: &super::view::View,
    endpoint_id: u32,
    direction: u8,
    remote: Ipv4Addr,
    proto: u8,
    port: u16,
    cookie: u32,
) -> Vec<super::tiers::ClusterRuleRef> {
    if view.cluster_policies.is_empty() {
        return Vec::new();
    }
    let labels = |ip: Ipv4Addr| {
        let (_, id) = view.pods_by_ip.get(&ip)?;
        match view.identities.get(id)? {
            super::IdentitySource::Labels {
                namespace_labels,
                pod_labels,
                ..
            } => Some((namespace_labels, pod_labels)),
            _ => None,
        }
    };
    let Some(ep) = view.endpoint_by_id(endpoint_id) else {
        return Vec::new();
    };
    let Some((nsl, pl)) = labels(ep.ipv4) else {
        return Vec::new();
    };
    let cluster = tiers::ordered(view.cluster_policies.values().filter_map(|p| p.accepted()));
    let rules = rules_of(&cluster, nsl, pl, direction);
    if rules.is_empty() {
        return Vec::new();
    }
    let peer = PeerRep {
        pod: labels(remote).map(|(n, p)| (n, p, &[][..])),
        net: ipnetwork::IpNetwork::V4(Ipv4Network::new(remote, 32).expect("valid")),
        identity: 0,
        cidr_identity: 0,
    };
    // The NetworkPolicy step as the kernel's decision tells it.
    let mut np = || {
        if view.cookies.contains_key(&cookie) {
            NpOutcome::Allowed(cookie)
        } else if cookie == COOKIE_NP_ISOLATION {
            NpOutcome::Denied
        } else {
            NpOutcome::NotIsolated
        }
    };
    let w = explain(&rules, None, &peer, false, proto, port, &mut np);
    if w.decision().map(|d| d.cookie) != Some(cookie) {
        return Vec::new();
    }
    w.passed()
        .into_iter()
        .filter_map(|c| view.cluster_cookie(c).cloned())
        .collect()
}
