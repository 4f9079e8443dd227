//! Policy entries: one rule's allow entries for one endpoint.
use std::collections::{BTreeSet, HashMap};

use palisade_common::{
    PolicyKey, PolicyValue, ACTION_ALLOW, DIR_INGRESS, IDENTITY_ANY, IDENTITY_ANY_POD,
    POLICY_PREFIX_FIXED, POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO,
};

use super::{
    parse::{protocol_number, Port},
    peers::PeerSet,
};
use crate::model::ContainerPort;

/// (prefix length, key) -> value: a policy map's contents.
pub type PolicyEntries = HashMap<(u32, PolicyKey), PolicyValue>;

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

/// Adds an allow entry; two rules producing the same (prefix, key) keep
/// the lowest cookie.
pub(crate) fn insert_entry(policy: &mut PolicyEntries, prefix: u32, key: PolicyKey, cookie: u32) {
    policy
        .entry((prefix, key))
        .and_modify(|v| v.cookie = v.cookie.min(cookie))
        .or_insert(PolicyValue {
            action: ACTION_ALLOW,
            cookie,
        });
}

/// What an egress named port resolves against.
pub(crate) trait Destinations {
    /// The numbers of port `name`/`proto` on the pods behind identity `id`:
    /// a label identity, or the CIDR identity of a pod's own address.
    fn named(&self, id: u32, name: &str, proto: u8, f: &mut dyn FnMut(u16));
    /// Every label identity (an egress named port without peers).
    fn each_label_id(&self, f: &mut dyn FnMut(u32));
}

/// One accepted rule, resolved.
pub(crate) struct RuleInput<'a> {
    pub(crate) direction: u8,
    pub(crate) cookie: u32,
    pub(crate) peers: &'a PeerSet,
    pub(crate) ports: &'a [Port],
}

/// The entries of rule `r` for the endpoint `endpoint_id`, whose pod has
/// the container ports `own_ports` (ingress named ports resolve there).
pub(crate) fn emit_rule(
    policy: &mut PolicyEntries,
    endpoint_id: u32,
    own_ports: &[ContainerPort],
    r: &RuleInput,
    dest: &dyn Destinations,
) {
    let peers: Vec<u32> = match r.peers {
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
    for port in r.ports {
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
                let numbers: BTreeSet<u16> = own_ports
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
                // Egress: per destination identity, also when every pod is
                // a peer (no peers, or an "any pod" peer).
                let mut emit_for = |id: u32| {
                    dest.named(id, name, *proto, &mut |n| {
                        insert_entry(policy, POLICY_PREFIX_FULL, key(id, *proto, n), r.cookie)
                    });
                };
                if r.peers.all_pods() {
                    let mut ids = Vec::new();
                    dest.each_label_id(&mut |id| ids.push(id));
                    for id in ids {
                        emit_for(id);
                    }
                }
                if let PeerSet::Ids(ids) = r.peers {
                    for &id in ids.iter().filter(|id| **id != IDENTITY_ANY_POD) {
                        emit_for(id);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
