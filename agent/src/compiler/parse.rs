//! Validation of a NetworkPolicy into typed rules, once, when it arrives
//! (`Model::add_policy`). A policy either becomes [`Policy`] (its selector
//! and the rules of its effective directions) or is rejected with the
//! reason and the [`Isolation`] it still imposes.
use std::net::IpAddr;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use k8s_openapi::{
    api::networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};
use palisade_common::{DIR_EGRESS, DIR_INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::{
    model::{Labels, ObjectKey},
    selector::Selector,
};

/// A policy as the model keeps it: parsed and validated once.
#[derive(Clone, Debug)]
pub enum ParsedPolicy {
    Accepted(Policy),
    /// Contributes no allow entry, cookie or prefix; still isolates.
    Rejected {
        reason: String,
        isolation: Isolation,
    },
}

impl ParsedPolicy {
    pub fn parse(key: &ObjectKey, np: &NetworkPolicy) -> Self {
        match parse_policy(key, np) {
            Ok(p) => Self::Accepted(p),
            Err((reason, isolation)) => Self::Rejected { reason, isolation },
        }
    }

    /// Why the policy was rejected, if it was.
    pub fn rejected(&self) -> Option<&str> {
        match self {
            Self::Accepted(_) => None,
            Self::Rejected { reason, .. } => Some(reason),
        }
    }

    /// Whether the policy selects (and so isolates) a pod of its namespace
    /// with these labels, and in which directions (ingress, egress).
    pub(crate) fn selection(&self, labels: &Labels) -> Option<(bool, bool)> {
        match self {
            Self::Accepted(p) => p.selector.matches(labels).then_some((p.ingress, p.egress)),
            Self::Rejected { isolation, .. } => isolation
                .selects(labels)
                .then_some((isolation.ingress, isolation.egress)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub(crate) key: ObjectKey,
    pub(crate) selector: Selector,
    pub(crate) ingress: bool,
    pub(crate) egress: bool,
    /// The rules of the effective directions only.
    pub(crate) rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub(crate) direction: u8,
    pub(crate) index: usize,
    /// None: no `from`/`to` (or an empty list): any peer.
    pub(crate) peers: Option<Vec<Peer>>,
    /// Empty: all traffic.
    pub(crate) ports: Vec<Port>,
}

#[derive(Clone, Debug)]
pub enum Peer {
    /// `namespaces: None` = the policy's namespace; `pods: None` = all pods.
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    Block {
        cidr: Ipv4Network,
        except: Vec<Ipv4Network>,
    },
    /// An IPv6 ipBlock: matches IPv6 addresses only, as a `Block` matches
    /// IPv4 ones (each family's world is its own identity).
    Block6 {
        cidr: Ipv6Network,
        except: Vec<Ipv6Network>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Port {
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
pub struct Isolation {
    /// None: the selector is invalid: every pod of the namespace.
    pub(crate) selector: Option<Selector>,
    pub(crate) ingress: bool,
    pub(crate) egress: bool,
}

impl Isolation {
    pub(crate) fn selects(&self, labels: &Labels) -> bool {
        self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }
}

pub(crate) fn protocol_number(name: Option<&str>) -> Option<u8> {
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
pub(crate) fn v4_subset(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.prefix() >= b.prefix() && b.contains(a.network())
}

fn parse_ip_block(b: &IPBlock, at: &str) -> Result<Peer, String> {
    let cidr = parse_cidr(&b.cidr).map_err(|e| format!("{at}.cidr: {e}"))?;
    let mut except = Vec::new();
    let mut except6 = Vec::new();
    for (i, e) in b.except.iter().flatten().enumerate() {
        let eat = format!("{at}.except[{i}]");
        let x = parse_cidr(e).map_err(|err| format!("{eat}: {err}"))?;
        let strict = match (cidr, x) {
            (Cidr::V4(c), Cidr::V4(x)) => {
                except.push(x);
                x.prefix() > c.prefix() && c.contains(x.network())
            }
            (Cidr::V6(c), Cidr::V6(x)) => {
                except6.push(x);
                x.prefix() > c.prefix() && c.contains(x.network())
            }
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
        Cidr::V6(cidr) => Peer::Block6 {
            cidr,
            except: except6,
        },
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
pub(crate) fn parse_policy(
    key: &ObjectKey,
    np: &NetworkPolicy,
) -> Result<Policy, (String, Isolation)> {
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

impl Rule {
    /// An egress rule with a named port: its ipBlock peers resolve the name
    /// on the pods whose addresses they contain.
    pub(crate) fn has_named_egress(&self) -> bool {
        self.direction == DIR_EGRESS && self.ports.iter().any(|p| matches!(p, Port::Named { .. }))
    }

    /// Whether one of the rule's peers matches every pod of the cluster,
    /// syntactically: `namespaceSelector: {}` with `podSelector` absent or
    /// `{}`. Its peers are then "any pod" (`IDENTITY_ANY_POD`) instead of
    /// every label identity (the other pod peers add nothing).
    pub(crate) fn any_pod(&self) -> bool {
        self.peers.iter().flatten().any(|p| match p {
            Peer::Pods {
                namespaces: Some(ns),
                pods,
            } => ns.is_everything() && pods.as_ref().is_none_or(|s| s.is_everything()),
            _ => false,
        })
    }

    /// The IPv4 ipBlock peers of the rule.
    pub(crate) fn blocks(&self) -> impl Iterator<Item = (Ipv4Network, &[Ipv4Network])> {
        self.peers.iter().flatten().filter_map(|p| match p {
            Peer::Block { cidr, except } => Some((*cidr, except.as_slice())),
            _ => None,
        })
    }

    /// The IPv6 ipBlock peers of the rule.
    pub(crate) fn blocks6(&self) -> impl Iterator<Item = (Ipv6Network, &[Ipv6Network])> {
        self.peers.iter().flatten().filter_map(|p| match p {
            Peer::Block6 { cidr, except } => Some((*cidr, except.as_slice())),
            _ => None,
        })
    }

    /// Every prefix the rule's ipBlocks name (`cidr`s and `except`s), of
    /// both families: each is a CIDR identity.
    pub(crate) fn prefixes(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        let v4 = self
            .blocks()
            .flat_map(|(c, x)| std::iter::once(c).chain(x.iter().copied()))
            .map(IpNetwork::V4);
        let v6 = self
            .blocks6()
            .flat_map(|(c, x)| std::iter::once(c).chain(x.iter().copied()))
            .map(IpNetwork::V6);
        v4.chain(v6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> ParsedPolicy {
        let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        let y = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: a}}\nspec:\n{spec}"
        );
        let np: NetworkPolicy = serde_yaml::from_str(&y).unwrap();
        ParsedPolicy::parse(&ObjectKey::new("a", "p"), &np)
    }

    #[test]
    fn rules_of_the_effective_directions_are_kept_typed() {
        let ParsedPolicy::Accepted(p) = parse(
            "podSelector: {}\ningress:\n- from: [{ipBlock: {cidr: 10.0.0.1/8, except: [10.1.0.0/16]}}]\n  ports: [{port: http}, {port: 80, endPort: 90, protocol: UDP}]\negress:\n- {}",
        ) else {
            panic!("rejected")
        };
        assert!(p.ingress && p.egress, "egress rules imply Egress");
        assert_eq!(p.rules.len(), 2);
        let r = &p.rules[0];
        assert_eq!(
            r.blocks().collect::<Vec<_>>(),
            vec![(
                "10.0.0.0/8".parse().unwrap(),
                &["10.1.0.0/16".parse().unwrap()][..]
            )]
        );
        assert_eq!(
            r.ports,
            vec![
                Port::Named {
                    proto: PROTO_TCP,
                    name: "http".into()
                },
                Port::Range {
                    proto: PROTO_UDP,
                    start: 80,
                    end: 90
                }
            ]
        );
        assert!(!r.has_named_egress(), "an ingress rule");
        assert!(p.rules[1].peers.is_none() && p.rules[1].ports.is_empty());
    }

    #[test]
    fn a_rejected_policy_keeps_the_reason_and_its_isolation() {
        let p = parse(
            "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress:\n- ports: [{port: 0}]",
        );
        assert_eq!(
            p.rejected(),
            Some("spec.egress[0].ports[0].port: 0 is out of range 1-65535")
        );
        let web: Labels = [("app".to_string(), "web".to_string())].into();
        assert_eq!(p.selection(&web), Some((false, true)));
        assert_eq!(p.selection(&Labels::new()), None);
        // An invalid selector isolates the whole namespace, both ways for
        // unknown policy types.
        let p = parse(
            "podSelector: {matchExpressions: [{key: a, operator: Bogus}]}\npolicyTypes: [Sideways]",
        );
        assert!(p.rejected().is_some());
        assert_eq!(p.selection(&Labels::new()), Some((true, true)));
    }
}
