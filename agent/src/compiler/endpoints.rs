//! One local endpoint: the policies that select it, its flags and its
//! policy entries. The full compile and the engine both go through here.
use palisade_common::{DIR_EGRESS, DIR_INGRESS, EP_AUDIT, EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED};

use super::{
    emit::{emit_rule, Destinations, PolicyEntries, RuleInput},
    parse::ParsedPolicy,
    peers::PeerSet,
};
use crate::model::{ContainerPort, Labels, ObjectKey};

/// The pod of a local endpoint, as the compiler sees it.
pub(crate) struct EndpointPod<'a> {
    pub(crate) labels: &'a Labels,
    pub(crate) ports: &'a [ContainerPort],
    pub(crate) host_network: bool,
}

/// What the policies make of one endpoint (its entries go to the caller's
/// map).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct EndpointPolicy {
    pub(crate) flags: u32,
    /// Sorted.
    pub(crate) selected_by: Vec<ObjectKey>,
    /// By direction, sorted; empty where not enforced.
    pub(crate) isolating: [Vec<ObjectKey>; 2],
}

/// `policies`: those of the endpoint's namespace; `rule(policy, i)`: the
/// cookie and peers of the i-th rule of an accepted policy.
pub(crate) fn compile_endpoint<'a, 'b, F>(
    endpoint_id: u32,
    pod: &EndpointPod,
    audit: bool,
    policies: impl Iterator<Item = (&'a ObjectKey, &'a ParsedPolicy)>,
    rule: F,
    dest: &dyn Destinations,
    entries: &mut PolicyEntries,
) -> EndpointPolicy
where
    F: Fn(&ObjectKey, usize) -> (u32, &'b PeerSet),
{
    let mut out = EndpointPolicy::default();
    if audit {
        out.flags |= EP_AUDIT;
    }
    if pod.host_network {
        return out;
    }
    for (key, pp) in policies {
        let Some((ingress, egress)) = pp.selection(pod.labels) else {
            continue;
        };
        out.selected_by.push(key.clone());
        if ingress {
            out.flags |= EP_INGRESS_ENFORCED;
            out.isolating[DIR_INGRESS as usize].push(key.clone());
        }
        if egress {
            out.flags |= EP_EGRESS_ENFORCED;
            out.isolating[DIR_EGRESS as usize].push(key.clone());
        }
        if let ParsedPolicy::Accepted(p) = pp {
            for (i, r) in p.rules.iter().enumerate() {
                let (cookie, peers) = rule(key, i);
                let input = RuleInput {
                    direction: r.direction,
                    cookie,
                    peers,
                    ports: &r.ports,
                };
                emit_rule(entries, endpoint_id, pod.ports, &input, dest);
            }
        }
    }
    out.selected_by.sort();
    for v in &mut out.isolating {
        v.sort();
    }
    out
}
