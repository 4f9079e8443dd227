//! Selector → identity sets: which label and CIDR identities a rule's
//! peers match.
use std::{collections::BTreeSet, net::Ipv4Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use palisade_common::IDENTITY_ANY_POD;

use super::{
    identities::LabelSet,
    parse::{v4_subset, Peer, Rule},
};

/// The peers of one rule, as identities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PeerSet {
    /// No `from`/`to`: any peer.
    Any,
    /// Label and CIDR identities; `IDENTITY_ANY_POD` (then with no label
    /// identity) when a peer matches every pod ([`Rule::any_pod`]).
    Ids(BTreeSet<u32>),
}

impl PeerSet {
    /// Every pod is a peer: no `from`/`to`, or an "any pod" peer.
    pub(crate) fn all_pods(&self) -> bool {
        match self {
            PeerSet::Any => true,
            PeerSet::Ids(ids) => ids.contains(&IDENTITY_ANY_POD),
        }
    }
}

/// Whether a label identity is a peer of `rule` (of a policy in `policy_ns`).
pub(crate) fn rule_matches_labels(policy_ns: &str, rule: &Rule, set: &LabelSet) -> bool {
    rule.peers.iter().flatten().any(|peer| match peer {
        Peer::Pods { namespaces, pods } => {
            let ns_ok = match namespaces {
                None => set.namespace == policy_ns,
                Some(sel) => sel.matches(&set.namespace_labels),
            };
            ns_ok && pods.as_ref().is_none_or(|s| s.matches(&set.pod_labels))
        }
        _ => false,
    })
}

/// Whether a CIDR identity (an ipBlock prefix, `0.0.0.0/0` or `::/0` for
/// each family's world, or a pod address's /32) is a peer of `rule`: inside
/// a `cidr` of its family, outside its `except`s.
pub(crate) fn rule_matches_cidr(rule: &Rule, net: IpNetwork) -> bool {
    match net {
        IpNetwork::V4(net) => rule
            .blocks()
            .any(|(cidr, except)| block_contains(cidr, except, net)),
        IpNetwork::V6(net) => rule
            .blocks6()
            .any(|(cidr, except)| block6_contains(cidr, except, net)),
    }
}

fn block6_contains(cidr: Ipv6Network, except: &[Ipv6Network], net: Ipv6Network) -> bool {
    let subset =
        |a: Ipv6Network, b: Ipv6Network| a.prefix() >= b.prefix() && b.contains(a.network());
    subset(net, cidr) && !except.iter().any(|e| subset(net, *e))
}

pub(crate) fn block_contains(cidr: Ipv4Network, except: &[Ipv4Network], net: Ipv4Network) -> bool {
    v4_subset(net, cidr) && !except.iter().any(|e| v4_subset(net, *e))
}

/// Whether a pod address falls in an ipBlock of an egress rule with a named
/// port: such an address gets its own CIDR identity (see the module doc).
pub(crate) fn named_block_contains(rule: &Rule, ip: Ipv4Addr) -> bool {
    rule.has_named_egress()
        && rule
            .blocks()
            .any(|(cidr, except)| block_contains(cidr, except, host_net(ip)))
}

/// The same for an IPv6 pod address (its /128).
pub(crate) fn named_block6_contains(rule: &Rule, ip: std::net::Ipv6Addr) -> bool {
    rule.has_named_egress()
        && rule
            .blocks6()
            .any(|(cidr, except)| block6_contains(cidr, except, host6_net(ip)))
}

/// `ip/128`.
pub(crate) fn host6_net(ip: std::net::Ipv6Addr) -> Ipv6Network {
    Ipv6Network::new(ip, 128).expect("valid")
}

/// `ip/32`.
pub(crate) fn host_net(ip: Ipv4Addr) -> Ipv4Network {
    Ipv4Network::new(ip, 32).expect("valid")
}

/// A rule's peer set over the given identities (the full compile).
pub(crate) fn resolve_peers<'a>(
    policy_ns: &str,
    rule: &Rule,
    labels: impl Iterator<Item = (u32, &'a LabelSet)>,
    cidrs: impl Iterator<Item = (IpNetwork, u32)>,
) -> PeerSet {
    if rule.peers.is_none() {
        return PeerSet::Any;
    }
    let mut ids: BTreeSet<u32> = if rule.any_pod() {
        BTreeSet::from([IDENTITY_ANY_POD])
    } else {
        labels
            .filter(|(_, set)| rule_matches_labels(policy_ns, rule, set))
            .map(|(id, _)| id)
            .collect()
    };
    ids.extend(
        cidrs
            .filter(|(net, _)| rule_matches_cidr(rule, *net))
            .map(|(_, id)| id),
    );
    PeerSet::Ids(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn a_block_contains_its_subsets_outside_its_excepts() {
        let except = [net("10.0.0.128/25")];
        let c = net("10.0.0.0/24");
        assert!(block_contains(c, &except, net("10.0.0.0/24")));
        assert!(block_contains(c, &except, net("10.0.0.5/32")));
        assert!(!block_contains(c, &except, net("10.0.0.200/32")));
        assert!(!block_contains(c, &except, net("10.0.0.128/25")));
        assert!(
            !block_contains(c, &except, net("10.0.0.0/16")),
            "a superset"
        );
        assert!(!block_contains(c, &except, net("10.0.1.5/32")));
    }

    #[test]
    fn an_ipv6_block_matches_ipv6_prefixes_only() {
        let n6 = |s: &str| s.parse::<Ipv6Network>().unwrap();
        assert!(block6_contains(
            n6("fd00::/16"),
            &[n6("fd00:1::/32")],
            n6("fd00:2::1/128")
        ));
        assert!(!block6_contains(
            n6("fd00::/16"),
            &[n6("fd00:1::/32")],
            n6("fd00:1::1/128")
        ));
        assert!(!block6_contains(n6("fd00::/16"), &[], n6("fd01::/128")));
        let parsed = |y: &str| {
            let np: k8s_openapi::api::networking::v1::NetworkPolicy =
                serde_yaml::from_str(y).unwrap();
            let key = crate::model::ObjectKey::new("a", "p");
            match super::super::parse::parse_policy(&key, &np) {
                Ok(p) => p.rules.into_iter().next().unwrap(),
                Err((e, _)) => panic!("{e}"),
            }
        };
        let r = parsed("metadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: '::/0'}}, {ipBlock: {cidr: 10.0.0.0/8}}]\n  policyTypes: [Egress]\n");
        assert!(rule_matches_cidr(&r, "fd00::1/128".parse().unwrap()));
        assert!(rule_matches_cidr(&r, "10.1.0.0/16".parse().unwrap()));
        assert!(
            !rule_matches_cidr(&r, "0.0.0.0/0".parse().unwrap()),
            "IPv4 world"
        );
        assert!(!rule_matches_cidr(&r, "11.0.0.1/32".parse().unwrap()));
    }
}
