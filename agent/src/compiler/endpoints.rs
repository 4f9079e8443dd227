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
    /// The model has no pod for the endpoint yet, and policy could select
    /// it once its labels are known (see [`labels_pending`]).
    pub(crate) labels_pending: bool,
}

/// What isolates an endpoint whose labels are not known yet (shown where
/// policies would be: flow records, status, trace).
pub fn labels_pending_key() -> ObjectKey {
    ObjectKey::new("", "pod-labels-not-known-yet")
}

/// Whether an endpoint of namespace `ns` without a pod in the model is
/// denied both ways until its pod arrives: a CNI ADD can reach the agent
/// before the pod's labels do, and a `matchLabels` policy would not select
/// an endpoint without labels, so it would start open. Only where policy
/// could apply (a NetworkPolicy in its namespace, or any
/// ClusterNetworkPolicy): pods of runtimes without pod objects (podman in
/// a namespace no policy names) keep working.
pub(crate) fn labels_pending(model: &crate::model::Model, ns: &str, pod_known: bool) -> bool {
    !pod_known
        && (!model.cluster_policies.is_empty()
            || model
                .policies
                .range(ObjectKey::new(ns, "")..)
                .take_while(|(k, _)| *k.namespace == *ns)
                .next()
                .is_some())
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
    if pod.labels_pending {
        out.flags |= EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED;
        out.isolating = [vec![labels_pending_key()], vec![labels_pending_key()]];
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
