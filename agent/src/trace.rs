//! `palisade-agent trace`: the verdict on a new flow, computed by the
//! reference evaluator over the exact map contents the agent last wrote to
//! the kernel (not over the policies themselves), hop by hop: the source
//! pod's egress program, then the destination pod's ingress program, each
//! where that pod is on this node.
use std::net::{IpAddr, Ipv6Addr};

use anyhow::Result;
use palisade_api::{ErrorKind, TraceReport, TraceRequest, TraceStep};
use palisade_common::{
    decision::{peer_or_world, peer_or_world6},
    reason, DIR_EGRESS, DIR_INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW,
    VERDICT_AUDIT,
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
    ip: IpAddr,
    local: Option<LocalEndpoint>,
}

/// The family of a trace: as asked, else IPv6 when an end is an IPv6
/// address.
fn family(t: &TraceRequest) -> Result<bool> {
    match t.family.as_deref() {
        Some("ipv4" | "IPv4") => Ok(false),
        Some("ipv6" | "IPv6") => Ok(true),
        Some(f) => Err(refuse(
            ErrorKind::InvalidRequest,
            format!("family {f:?}: expected ipv4 or ipv6"),
        )),
        None => Ok([&t.from, &t.to]
            .iter()
            .any(|s| s.parse::<Ipv6Addr>().is_ok())),
    }
}

fn resolve<N: Names + ?Sized>(view: &N, s: &str, what: &str, v6: bool) -> Result<Side> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        if ip.is_ipv6() != v6 {
            return Err(refuse(
                ErrorKind::InvalidRequest,
                format!("{what} {ip} is not of the trace's family"),
            ));
        }
        let local = match ip {
            IpAddr::V4(a) => view.local_endpoint_at(a).cloned(),
            IpAddr::V6(a) => view
                .pod_at6(a)
                .and_then(|p| view.local_endpoint_of(p.key))
                .filter(|e| e.ipv6 == Some(a))
                .cloned(),
        };
        return Ok(Side {
            name: ip.to_string(),
            ip,
            local,
        });
    }
    let Some((ns, name)) = s.split_once('/') else {
        return Err(refuse(
            ErrorKind::InvalidRequest,
            format!("{what} {s:?}: expected namespace/pod or an IPv4 or IPv6 address"),
        ));
    };
    let key = ObjectKey::new(ns, name);
    let local = view.local_endpoint_of(&key).cloned();
    let known = local.is_some() || view.pod_address(&key).is_some();
    let ip = match (&local, v6) {
        (Some(le), false) => Some(le.ipv4)
            .filter(|a| !a.is_unspecified())
            .map(IpAddr::V4),
        (Some(le), true) => le.ipv6.map(IpAddr::V6),
        (None, false) => view.pod_address(&key).flatten().map(IpAddr::V4),
        (None, true) => view.pod_address6(&key).map(IpAddr::V6),
    };
    let Some(ip) = ip else {
        let family = if v6 { "IPv6 " } else { "" };
        let why = if known {
            format!("{what} {key} has no {family}address yet")
        } else {
            format!("{what} {key}: no such pod")
        };
        return Err(refuse(ErrorKind::NotFound, why));
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
    flow: (IpAddr, u8, u16),
    v: &Verdict,
) -> Option<u32> {
    if !matches!(v.reason, reason::POLICY_ALLOW | reason::DENY_RULE) {
        return None;
    }
    let (remote, protocol, port) = flow;
    let peer = match remote {
        IpAddr::V4(a) => peer_or_world(eval.ipcache_lookup(a)),
        IpAddr::V6(a) => peer_or_world6(eval.ipcache6_lookup(a)),
    };
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
        let walk = |ep: &LocalEndpoint, dir: u8, remote: IpAddr, proto: u8, port: u16| {
            self.engine()
                .tier_walk(ep.endpoint_id, dir, remote, proto, port)
                .map(|w| w.lines(&*view, ep.endpoint_id, dir))
                .unwrap_or_default()
        };
        trace_with(&*view, self.current(), t, &walk)
    }
}

/// The first packet of the traced flow (a SYN for TCP).
fn first_packet(from: IpAddr, to: IpAddr, protocol: u8, port: u16) -> Packet {
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => match protocol {
            PROTO_TCP => Packet::tcp(s, 40000, d, port, TCP_FLAG_SYN),
            PROTO_UDP => Packet::udp(s, 40000, d, port),
            _ => Packet::sctp(s, 40000, d, port),
        },
        (IpAddr::V6(s), IpAddr::V6(d)) => match protocol {
            PROTO_TCP => Packet::ipv6_tcp(s, 40000, d, port, TCP_FLAG_SYN),
            PROTO_UDP => Packet::ipv6_udp(s, 40000, d, port),
            _ => Packet::ipv6_sctp(s, 40000, d, port),
        },
        _ => unreachable!("both ends resolve in the trace's family"),
    }
}

/// How a caller that knows the model explains a hop's tier walk (lines;
/// empty when no ClusterNetworkPolicy selects the pod there).
pub type WalkFn<'a> = dyn Fn(&LocalEndpoint, u8, IpAddr, u8, u16) -> Vec<String> + 'a;

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
        let v6 = family(t)?;
        let from = resolve(names, &t.from, "--from", v6)?;
        let to = resolve(names, &t.to, "--to", v6)?;
        let protocol = match t.protocol.as_str() {
            "TCP" => PROTO_TCP,
            "UDP" => PROTO_UDP,
            "SCTP" => PROTO_SCTP,
            p => {
                return Err(refuse(
                    ErrorKind::InvalidRequest,
                    format!("protocol {p}: expected TCP, UDP or SCTP"),
                ))
            }
        };
        let packet = first_packet(from.ip, to.ip, protocol, t.port);
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
    use std::{net::Ipv4Addr, sync::Arc};

    use k8s_openapi::api::networking::v1::NetworkPolicy;

    use super::*;
    use crate::{
        change::Change,
        compiler::Engine,
        model::{Labels, Pod},
    };

    /// Pods (namespace, name = its `app` label, IPv4, IPv6), a policy of
    /// namespace `a`, and a/web as the local endpoint (with `web_v6`).
    fn engine(
        pods: &[(&str, &str, [u8; 4], Option<&str>)],
        (policy, yaml): (&str, &str),
        web_v6: Option<&str>,
    ) -> Engine {
        let mut e = Engine::new(false, Vec::new());
        for (ns, name, v4, v6) in pods {
            e.apply(Change::Pod(
                Pod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    labels: Labels::from([("app".to_string(), name.to_string())]),
                    ip: Some(Ipv4Addr::from(*v4)),
                    ipv6: v6.map(|a| a.parse().unwrap()),
                    host_network: false,
                    ports: Vec::new(),
                }
                .into(),
            ));
        }
        let np: NetworkPolicy = serde_yaml::from_str(yaml).unwrap();
        e.apply(Change::Policy(ObjectKey::new("a", policy), Arc::new(np)));
        e.add_endpoint(LocalEndpoint {
            key: ObjectKey::new("a", "web"),
            endpoint_id: 1,
            ifindex: 11,
            host_ifname: "veth1".into(),
            ipv4: Ipv4Addr::new(10, 0, 0, 1),
            ipv6: web_v6.map(|a| a.parse().unwrap()),
            container_id: "c1".into(),
            mac: [0; 6],
        });
        e
    }

    #[test]
    fn trace_names_the_any_pod_entry_that_decided() {
        let y = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: dns, namespace: a}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {}}]\n    ports: [{port: 53, protocol: UDP}]\n";
        let e = engine(
            &[
                ("a", "web", [10, 0, 0, 1], None),
                ("b", "db", [10, 0, 1, 2], None),
            ],
            ("dns", y),
            None,
        );
        let req = |to: &str| TraceRequest {
            from: "a/web".into(),
            to: to.into(),
            port: 53,
            protocol: "UDP".into(),
            family: None,
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
            family: None,
        };
        assert_eq!(kind(&remote), ErrorKind::NotFound);
    }

    /// Over IPv6 (asked, or implied by an IPv6 address) the trace uses the
    /// pods' IPv6 addresses and ipcache6, with the same verdicts.
    #[test]
    fn ipv6_flows_are_traced_over_the_pods_ipv6_addresses() {
        let y = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: a}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}]\n";
        let e = engine(
            &[
                ("a", "web", [10, 0, 0, 1], Some("fd00::1")),
                ("b", "db", [10, 0, 1, 2], Some("fd00::2")),
                ("b", "v4only", [10, 0, 1, 3], None),
            ],
            ("db", y),
            Some("fd00::1"),
        );
        let req = |to: &str, family: Option<&str>| TraceRequest {
            from: "a/web".into(),
            to: to.into(),
            port: 5432,
            protocol: "TCP".into(),
            family: family.map(str::to_string),
        };
        let run = |t: &TraceRequest| trace(&*e.view(), e.desired(), t);
        let r = run(&req("b/db", Some("ipv6"))).unwrap();
        assert_eq!(r.verdict, "ALLOW", "{r:?}");
        assert_eq!(r.steps[0].policies, vec!["a/db egress[0]".to_string()]);
        assert!(r.steps[0].detail.contains("(b: app=db)"), "{r:?}");
        // The same pod by its IPv6 address; another IPv6 address is the
        // IPv6 world, which the policy does not admit.
        assert_eq!(run(&req("fd00::2", None)).unwrap().verdict, "ALLOW");
        let r = run(&req("2001:db8::1", None)).unwrap();
        assert_eq!(r.verdict, "DROP");
        assert!(r.steps[0].detail.contains("world-ipv6"), "{r:?}");
        // Ends of the wrong family, or without an address of it, are refused.
        use crate::error::kind_of;
        let kind = |t: &TraceRequest| kind_of(&run(t).unwrap_err());
        assert_eq!(
            kind(&req("fd00::2", Some("ipv4"))),
            ErrorKind::InvalidRequest
        );
        assert_eq!(kind(&req("b/v4only", Some("ipv6"))), ErrorKind::NotFound);
        assert_eq!(kind(&req("b/db", Some("ipv5"))), ErrorKind::InvalidRequest);
        // A ClusterNetworkPolicy Admin Deny of namespace b decides over
        // IPv6 too, and the walk says so.
        let mut e = e;
        let y = "metadata: {name: no-b}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{name: deny-b, action: Deny, to: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: b}}}]}]}";
        let c: crate::cnp::ClusterNetworkPolicy = serde_yaml::from_str(y).unwrap();
        e.apply(Change::ClusterPolicy(Arc::new(c)));
        let walk = |ep: &LocalEndpoint, dir: u8, remote: IpAddr, proto: u8, port: u16| {
            e.tier_walk(ep.endpoint_id, dir, remote, proto, port)
                .map(|w| w.lines(&*e.view(), ep.endpoint_id, dir))
                .unwrap_or_default()
        };
        let r = trace_with(&*e.view(), e.desired(), &req("b/db", Some("ipv6")), &walk).unwrap();
        assert_eq!(r.verdict, "DROP", "{r:?}");
        let lines = r.steps[0].walk.join("\n");
        assert!(lines.contains("deny-b"), "{lines}");
    }
}
