//! `palisade-agent trace`: the verdict on a new flow, computed by the
//! reference evaluator over the exact map contents the agent last wrote to
//! the kernel (not over the policies themselves), hop by hop: the source
//! pod's egress program, then the destination pod's ingress program, each
//! where that pod is on this node.
use std::net::Ipv4Addr;

use anyhow::Result;
use palisade_api::{ErrorKind, TraceReport, TraceRequest, TraceStep};
use palisade_common::{
    decision::peer_or_world, reason, DIR_EGRESS, DIR_INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    VERDICT_ALLOW, VERDICT_AUDIT,
};
use palisade_dataplane::{
    packet::{Packet, TCP_FLAG_SYN},
    reference::{Evaluator, Verdict},
};

use palisade_dataplane::MapState;

use crate::{
    compiler::{IdentitySource, Names},
    daemon::Agent,
    error::refuse,
    model::{LocalEndpoint, ObjectKey},
};

/// A trace endpoint: a pod of the model, or a bare address.
struct Side {
    name: String,
    ip: Ipv4Addr,
    local: Option<LocalEndpoint>,
}

fn resolve<N: Names + ?Sized>(view: &N, s: &str, what: &str) -> Result<Side> {
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        let local = view.local_endpoint_at(ip).cloned();
        return Ok(Side {
            name: ip.to_string(),
            ip,
            local,
        });
    }
    let Some((ns, name)) = s.split_once('/') else {
        return Err(refuse(
            ErrorKind::InvalidRequest,
            format!("{what} {s:?}: expected namespace/pod or an IPv4 address"),
        ));
    };
    let key = ObjectKey::new(ns, name);
    let local = view.local_endpoint_of(&key).cloned();
    let ip = match (&local, view.pod_address(&key)) {
        (Some(le), _) => le.ipv4,
        (None, Some(Some(ip))) => ip,
        (None, Some(None)) => {
            return Err(refuse(
                ErrorKind::NotFound,
                format!("{what} {key} has no address yet"),
            ))
        }
        (None, None) => {
            return Err(refuse(
                ErrorKind::NotFound,
                format!("{what} {key}: no such pod"),
            ))
        }
    };
    Ok(Side {
        name: key.to_string(),
        ip,
        local,
    })
}

pub(crate) fn identity_text<N: Names + ?Sized>(c: &N, id: u32) -> String {
    match c.identity(id) {
        Some(IdentitySource::Reserved(r)) => format!("{id} ({r})"),
        Some(IdentitySource::Labels {
            namespace,
            pod_labels,
            ..
        }) => {
            let labels: Vec<String> = pod_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{id} ({namespace}: {})", labels.join(","))
        }
        Some(IdentitySource::Cidr(net)) => format!("{id} (cidr {net})"),
        None => id.to_string(),
    }
}

fn verdict_name(v: &Verdict) -> &'static str {
    match v.verdict {
        VERDICT_ALLOW => "ALLOW",
        VERDICT_AUDIT => "AUDIT",
        _ => "DROP",
    }
}

/// The peer identity of the policy entry that decided a new flow of `ep`
/// (the exact peer, its CIDR identity, any-pod or any peer), if one did.
/// `flow`: (remote address, protocol, destination port).
fn matched_peer(
    eval: &Evaluator,
    ep: &LocalEndpoint,
    dir: u8,
    flow: (Ipv4Addr, u8, u16),
    v: &Verdict,
) -> Option<u32> {
    if !matches!(v.reason, reason::POLICY_ALLOW | reason::DENY_RULE) {
        return None;
    }
    let (remote, protocol, port) = flow;
    let peer = peer_or_world(eval.ipcache_lookup(remote));
    eval.policy_match(ep.endpoint_id, peer, dir, protocol, port)
        .map(|m| m.peer_identity)
}

fn step<N: Names + ?Sized>(
    c: &N,
    hop: String,
    ep: &LocalEndpoint,
    dir: u8,
    v: &Verdict,
    matched: Option<u32>,
) -> TraceStep {
    let policies = if let Some(r) = c.cookie(v.cookie) {
        vec![r.to_string()]
    } else if v.reason == reason::NO_POLICY_MATCH {
        c.isolating(ep.endpoint_id, dir)
            .iter()
            .map(|k| format!("{k} (isolates, no rule matches)"))
            .collect()
    } else {
        Vec::new()
    };
    let peer = if dir == DIR_EGRESS {
        v.dst_identity
    } else {
        v.src_identity
    };
    TraceStep {
        walk: Vec::new(),
        hop,
        verdict: verdict_name(v).into(),
        reason: reason::name(v.reason).into(),
        policies,
        detail: match matched.filter(|m| *m != peer) {
            Some(m) => format!(
                "peer identity {}, matched the entry for {}",
                identity_text(c, peer),
                identity_text(c, m)
            ),
            None => format!("peer identity {}", identity_text(c, peer)),
        },
    }
}

impl Agent {
    pub fn trace(&self, t: &TraceRequest) -> Result<TraceReport> {
        if let Some(svc) = crate::trace_service::service_target(&t.to) {
            let services = self.services.read().unwrap_or_else(|p| p.into_inner());
            return crate::trace_service::trace_service(
                &*self.view(),
                self.current(),
                &services,
                &svc?,
                t,
            );
        }
        let view = self.view();
        let walk = |ep: &LocalEndpoint, dir: u8, remote: Ipv4Addr, proto: u8, port: u16| {
            self.engine()
                .tier_walk(ep.endpoint_id, dir, remote, proto, port)
                .map(|w| w.lines(&*view, ep.endpoint_id, dir))
                .unwrap_or_default()
        };
        trace_with(&*view, self.current(), t, &walk)
    }
}

/// How a caller that knows the model explains a hop's tier walk (lines;
/// empty when no ClusterNetworkPolicy selects the pod there).
pub type WalkFn<'a> = dyn Fn(&LocalEndpoint, u8, Ipv4Addr, u8, u16) -> Vec<String> + 'a;

/// The verdict on `t` over the map contents `current` (what the kernel
/// holds), named through `names` (the engine's view, or a full compile's).
pub fn trace<N: Names + ?Sized>(
    names: &N,
    current: &MapState,
    t: &TraceRequest,
) -> Result<TraceReport> {
    trace_with(names, current, t, &|_, _, _, _, _| Vec::new())
}

/// [`trace`], with each hop's tier walk from `walk`.
pub fn trace_with<N: Names + ?Sized>(
    names: &N,
    current: &MapState,
    t: &TraceRequest,
    walk: &WalkFn,
) -> Result<TraceReport> {
    {
        let compiled = names;
        let from = resolve(names, &t.from, "--from")?;
        let to = resolve(names, &t.to, "--to")?;
        let (packet, protocol) = match t.protocol.as_str() {
            "TCP" => (
                Packet::tcp(from.ip, 40000, to.ip, t.port, TCP_FLAG_SYN),
                PROTO_TCP,
            ),
            "UDP" => (Packet::udp(from.ip, 40000, to.ip, t.port), PROTO_UDP),
            "SCTP" => (Packet::sctp(from.ip, 40000, to.ip, t.port), PROTO_SCTP),
            p => {
                return Err(refuse(
                    ErrorKind::InvalidRequest,
                    format!("protocol {p}: expected TCP, UDP or SCTP"),
                ))
            }
        };
        if from.local.is_none() && to.local.is_none() {
            // Nothing on this node enforces the flow: the endpoint the
            // trace needs is not here.
            return Err(refuse(
                ErrorKind::NotFound,
                format!(
                    "neither {} nor {} is a pod on this node: no palisade program sees this flow here",
                    from.name, to.name
                ),
            ));
        }
        // One evaluator for both hops, as in the kernel: the egress hop's
        // conntrack entry is scoped and cannot admit the ingress hop.
        let mut eval = Evaluator::new(current);
        let mut steps = Vec::new();
        let mut verdicts = Vec::new();
        if let Some(ep) = &from.local {
            // (Frames carry the pod's MAC: the trace is about policy.)
            let frame = packet.clone().at_pod_mac(ep.mac, DIR_EGRESS);
            let v = eval.evaluate(ep.ifindex, DIR_EGRESS, &frame);
            let m = matched_peer(&eval, ep, DIR_EGRESS, (to.ip, protocol, t.port), &v);
            let mut st = step(
                compiled,
                format!("egress of {}", from.name),
                ep,
                DIR_EGRESS,
                &v,
                m,
            );
            st.walk = walk(ep, DIR_EGRESS, to.ip, protocol, t.port);
            steps.push(st);
            verdicts.push(v);
        }
        if verdicts.iter().all(|v| v.pass) {
            if let Some(ep) = &to.local {
                let frame = packet.clone().at_pod_mac(ep.mac, DIR_INGRESS);
                let v = eval.evaluate(ep.ifindex, DIR_INGRESS, &frame);
                let m = matched_peer(&eval, ep, DIR_INGRESS, (from.ip, protocol, t.port), &v);
                let mut st = step(
                    compiled,
                    format!("ingress of {}", to.name),
                    ep,
                    DIR_INGRESS,
                    &v,
                    m,
                );
                st.walk = walk(ep, DIR_INGRESS, from.ip, protocol, t.port);
                steps.push(st);
                verdicts.push(v);
            }
        }
        let verdict = if verdicts.iter().any(|v| !v.pass) {
            "DROP"
        } else if verdicts.iter().any(|v| v.verdict == VERDICT_AUDIT) {
            "AUDIT"
        } else {
            "ALLOW"
        };
        Ok(TraceReport {
            verdict: verdict.into(),
            steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::networking::v1::NetworkPolicy;

    use super::*;
    use crate::{
        change::Change,
        compiler::Engine,
        model::{Labels, Pod},
    };

    #[test]
    fn trace_names_the_any_pod_entry_that_decided() {
        let mut e = Engine::new(false, Vec::new());
        for (ns, name, app, ip) in [
            ("a", "web", "web", [10, 0, 0, 1]),
            ("b", "db", "db", [10, 0, 1, 2]),
        ] {
            e.apply(Change::Pod(
                Pod {
                    namespace: ns.into(),
                    name: name.into(),
                    labels: Labels::from([("app".to_string(), app.to_string())]),
                    ip: Some(Ipv4Addr::from(ip)),
                    ipv6: None,
                    host_network: false,
                    ports: Vec::new(),
                }
                .into(),
            ));
        }
        let y = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: dns, namespace: a}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {}}]\n    ports: [{port: 53, protocol: UDP}]\n";
        let np: NetworkPolicy = serde_yaml::from_str(y).unwrap();
        e.apply(Change::Policy(ObjectKey::new("a", "dns"), Arc::new(np)));
        e.add_endpoint(LocalEndpoint {
            key: ObjectKey::new("a", "web"),
            endpoint_id: 1,
            ifindex: 11,
            host_ifname: "veth1".into(),
            ipv4: Ipv4Addr::new(10, 0, 0, 1),
            ipv6: None,
            container_id: "c1".into(),
            mac: [0; 6],
        });
        let req = |to: &str| TraceRequest {
            from: "a/web".into(),
            to: to.into(),
            port: 53,
            protocol: "UDP".into(),
        };
        let r = trace(&*e.view(), e.desired(), &req("b/db")).unwrap();
        assert_eq!(r.verdict, "ALLOW");
        let d = &r.steps[0].detail;
        assert!(d.contains("(b: app=db)"), "{d}");
        assert!(
            d.contains(&format!(
                "matched the entry for {} (any-pod)",
                palisade_common::IDENTITY_ANY_POD
            )),
            "{d}"
        );
        assert_eq!(r.steps[0].policies, vec!["a/dns egress[0]".to_string()]);
        // An external address is no pod.
        let r = trace(&*e.view(), e.desired(), &req("192.0.2.1")).unwrap();
        assert_eq!(r.verdict, "DROP");
        // Errors carry the kind the caller acts on.
        use crate::error::kind_of;
        let kind = |t: &TraceRequest| kind_of(&trace(&*e.view(), e.desired(), t).unwrap_err());
        assert_eq!(kind(&req("b/nope")), ErrorKind::NotFound);
        assert_eq!(kind(&req("10.0.0.999")), ErrorKind::InvalidRequest);
        assert_eq!(kind(&req("no-slash")), ErrorKind::InvalidRequest);
        let mut bad_proto = req("b/db");
        bad_proto.protocol = "ICMP".into();
        assert_eq!(kind(&bad_proto), ErrorKind::InvalidRequest);
        let remote = TraceRequest {
            from: "b/db".into(),
            to: "192.0.2.1".into(),
            port: 53,
            protocol: "UDP".into(),
        };
        assert_eq!(kind(&remote), ErrorKind::NotFound);
    }
}
