//! `trace --to svc/<namespace>/<name> --port P/PROTO`: a flow to a
//! Service's ClusterIP is translated to one backend per flow before any
//! policy runs, so the answer is one trace per backend (`trace::trace` to
//! the backend's address and target port), each step naming the backend,
//! and an overall verdict: ALLOW when every backend would be allowed, DROP
//! when none would, PARTIAL otherwise.
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use palisade_api::{TraceReport, TraceRequest, TraceStep};
use palisade_common::{reason, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use palisade_dataplane::MapState;

use crate::{compiler::Names, model::ObjectKey, service::Frontend, trace::trace};

/// The Service key of a `--to svc/<ns>/<name>`, if that is what it is.
pub fn service_target(to: &str) -> Option<Result<ObjectKey>> {
    let rest = to.strip_prefix("svc/")?;
    Some(match rest.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ObjectKey::new(ns, name))
        }
        _ => Err(anyhow::anyhow!(
            "--to {to:?}: expected svc/<namespace>/<name>"
        )),
    })
}

pub fn trace_service<N: Names + ?Sized>(
    names: &N,
    current: &MapState,
    services: &BTreeMap<u32, Frontend>,
    svc: &ObjectKey,
    t: &TraceRequest,
) -> Result<TraceReport> {
    let protocol = match t.protocol.as_str() {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        p => bail!("protocol {p}: expected TCP, UDP or SCTP"),
    };
    // `--family` picks the ClusterIP of a dual-stack Service; without it,
    // IPv4 where the Service has it.
    let want_v6 = match t.family.as_deref() {
        None => None,
        Some("ipv4") => Some(false),
        Some("ipv6") => Some(true),
        Some(f) => bail!("family {f:?}: expected ipv4 or ipv6"),
    };
    let ports: Vec<&Frontend> = services.values().filter(|f| f.service == *svc).collect();
    let mut of_port: Vec<&&Frontend> = ports
        .iter()
        .filter(|f| f.address.port() == t.port && f.protocol == protocol)
        .filter(|f| want_v6.is_none_or(|v6| f.address.is_ipv6() == v6))
        .collect();
    of_port.sort_by_key(|f| f.address.is_ipv6());
    let Some(f) = of_port.first() else {
        if ports.is_empty() {
            bail!("Service {svc} is not translated on this node (unknown, headless, or refused: see status)");
        }
        let have: Vec<String> = ports
            .iter()
            .map(|f| {
                format!(
                    "{}/{}",
                    f.address.port(),
                    crate::flowlog::protocol_name(f.protocol)
                )
            })
            .collect();
        bail!(
            "Service {svc} has no port {}/{}; its ports: {}",
            t.port,
            t.protocol,
            have.join(", ")
        );
    };
    if f.backends.is_empty() {
        return Ok(TraceReport {
            verdict: "DROP".into(),
            steps: vec![TraceStep {
                walk: Vec::new(),
                hop: format!("service {svc} ({})", f.address),
                verdict: "DROP".into(),
                reason: reason::name(reason::NO_SERVICE_BACKEND).into(),
                policies: Vec::new(),
                detail: "no ready endpoints: new flows are refused".into(),
            }],
        });
    }
    let mut steps = Vec::new();
    let mut allowed = 0;
    for b in &f.backends {
        let who = match &b.pod {
            Some(p) => format!("{p} ({})", b.address),
            None => b.address.to_string(),
        };
        let pod_ip = |p: &ObjectKey| match b.address.ip() {
            std::net::IpAddr::V4(_) => names.pod_address(p).flatten().map(std::net::IpAddr::V4),
            std::net::IpAddr::V6(_) => names.pod_address6(p).map(std::net::IpAddr::V6),
        };
        let to = match (&b.pod, b.address.ip()) {
            (Some(p), ip) if pod_ip(p) == Some(ip) => p.to_string(),
            (_, ip) => ip.to_string(),
        };
        let v6 = b.address.is_ipv6();
        let req = TraceRequest {
            from: t.from.clone(),
            to,
            port: b.address.port(),
            protocol: t.protocol.clone(),
            family: Some(if v6 { "ipv6" } else { "ipv4" }.into()),
        };
        match trace(names, current, &req) {
            Ok(r) => {
                if r.verdict != "DROP" {
                    allowed += 1;
                }
                steps.push(TraceStep {
                    walk: Vec::new(),
                    hop: format!("via {svc} ({}) -> backend {who}", f.address),
                    verdict: r.verdict.clone(),
                    reason: String::new(),
                    policies: Vec::new(),
                    detail: String::new(),
                });
                steps.extend(r.steps.into_iter().map(|mut s| {
                    s.hop = format!("  {}", s.hop);
                    s
                }));
            }
            Err(e) => bail!("backend {who}: {e:#}"),
        }
    }
    let verdict = match allowed {
        0 => "DROP",
        n if n == f.backends.len() => "ALLOW",
        _ => "PARTIAL",
    };
    Ok(TraceReport {
        verdict: verdict.into(),
        steps,
    })
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc};

    use k8s_openapi::api::networking::v1::NetworkPolicy;

    use super::*;
    use crate::{
        change::Change,
        compiler::Engine,
        model::{Labels, LocalEndpoint, Pod},
        service::Backend,
    };

    /// Pods a/web (app=web), a/db1 (app=db), a/db2 (app=cache), dual-stack
    /// at 10.0.0.i and fd00::i; a policy lets web reach app=db only; web
    /// is this node's endpoint.
    fn engine() -> Engine {
        let mut e = Engine::new(false, Vec::new());
        for (name, app, i) in [("web", "web", 1u8), ("db1", "db", 2), ("db2", "cache", 3)] {
            e.apply(Change::Pod(
                Pod {
                    namespace: "a".into(),
                    name: name.into(),
                    labels: Labels::from([("app".to_string(), app.to_string())]),
                    ip: Some(Ipv4Addr::new(10, 0, 0, i)),
                    ipv6: Some(format!("fd00::{i}").parse().unwrap()),
                    host_network: false,
                    ports: Vec::new(),
                }
                .into(),
            ));
        }
        let y = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: to-db, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: db}}}]\n";
        let np: NetworkPolicy = serde_yaml::from_str(y).unwrap();
        e.apply(Change::Policy(ObjectKey::new("a", "to-db"), Arc::new(np)));
        e.add_endpoint(LocalEndpoint {
            key: ObjectKey::new("a", "web"),
            endpoint_id: 1,
            ifindex: 11,
            host_ifname: "veth1".into(),
            ipv4: Ipv4Addr::new(10, 0, 0, 1),
            ipv6: Some("fd00::1".parse().unwrap()),
            container_id: "c1".into(),
            mac: [0; 6],
        });
        e
    }

    #[test]
    fn every_backend_is_traced_and_the_verdict_says_which_are_allowed() {
        let e = engine();
        let backend = |pod: &str, ip: &str| Backend {
            address: ip.parse().unwrap(),
            pod: Some(ObjectKey::new("a", pod)),
        };
        let mut f = Frontend {
            service: ObjectKey::new("a", "db"),
            port_name: String::new(),
            address: "10.96.0.5:5432".parse().unwrap(),
            protocol: PROTO_TCP,
            backends: vec![
                backend("db1", "10.0.0.2:5432"),
                backend("db2", "10.0.0.3:5432"),
            ],
            affinity_timeout_s: None,
        };
        let svc = ObjectKey::new("a", "db");
        let req = |port| TraceRequest {
            from: "a/web".into(),
            to: "svc/a/db".into(),
            port,
            protocol: "TCP".into(),
            family: None,
        };
        let services: BTreeMap<u32, Frontend> = [(1, f.clone())].into();
        let r = trace_service(&*e.view(), e.desired(), &services, &svc, &req(5432)).unwrap();
        assert_eq!(r.verdict, "PARTIAL", "{r:?}");
        let heads: Vec<(&str, &str)> = r
            .steps
            .iter()
            .filter(|s| s.hop.starts_with("via"))
            .map(|s| (s.hop.as_str(), s.verdict.as_str()))
            .collect();
        assert!(
            heads[0].0.ends_with("backend a/db1 (10.0.0.2:5432)") && heads[0].1 == "ALLOW",
            "{heads:?}"
        );
        assert!(
            heads[1].0.ends_with("backend a/db2 (10.0.0.3:5432)") && heads[1].1 == "DROP",
            "{heads:?}"
        );

        let e2 = trace_service(&*e.view(), e.desired(), &services, &svc, &req(80)).unwrap_err();
        assert!(e2.to_string().contains("its ports: 5432/TCP"), "{e2}");
        f.backends.clear();
        let services: BTreeMap<u32, Frontend> = [(1, f)].into();
        let r = trace_service(&*e.view(), e.desired(), &services, &svc, &req(5432)).unwrap();
        assert_eq!(
            (r.verdict.as_str(), r.steps[0].reason.as_str()),
            ("DROP", "no-service-backend")
        );
        assert!(service_target("svc/a").unwrap().is_err());
        assert_eq!(service_target("a/web").map(|r| r.is_ok()), None);
    }

    #[test]
    fn a_dual_stack_service_is_traced_over_the_family_asked_for() {
        let e = engine();
        let fe = |at: &str, b1: &str, b2: &str| Frontend {
            service: ObjectKey::new("a", "db"),
            port_name: String::new(),
            address: at.parse().unwrap(),
            protocol: PROTO_TCP,
            backends: [("db1", b1), ("db2", b2)]
                .into_iter()
                .map(|(pod, ip)| Backend {
                    address: ip.parse().unwrap(),
                    pod: Some(ObjectKey::new("a", pod)),
                })
                .collect(),
            affinity_timeout_s: None,
        };
        let services: BTreeMap<u32, Frontend> = [
            (1, fe("10.96.0.5:5432", "10.0.0.2:5432", "10.0.0.3:5432")),
            (
                2,
                fe("[fd00:96::5]:5432", "[fd00::2]:5432", "[fd00::3]:5432"),
            ),
        ]
        .into();
        let req = |family: Option<&str>| TraceRequest {
            from: "a/web".into(),
            to: "svc/a/db".into(),
            port: 5432,
            protocol: "TCP".into(),
            family: family.map(String::from),
        };
        let svc = ObjectKey::new("a", "db");
        let heads = |r: &TraceReport| -> Vec<String> {
            r.steps
                .iter()
                .filter(|s| s.hop.starts_with("via"))
                .map(|s| format!("{} {}", s.hop, s.verdict))
                .collect()
        };
        let v4 = trace_service(&*e.view(), e.desired(), &services, &svc, &req(None)).unwrap();
        assert!(
            heads(&v4)[0].contains("(10.96.0.5:5432)"),
            "{:?}",
            heads(&v4)
        );
        let v6 =
            trace_service(&*e.view(), e.desired(), &services, &svc, &req(Some("ipv6"))).unwrap();
        let h = heads(&v6);
        assert_eq!(v6.verdict, "PARTIAL", "{v6:?}");
        assert!(
            h[0].ends_with("backend a/db1 ([fd00::2]:5432) ALLOW")
                && h[1].ends_with("backend a/db2 ([fd00::3]:5432) DROP"),
            "{h:?}"
        );
        assert!(trace_service(&*e.view(), e.desired(), &services, &svc, &req(Some("v7"))).is_err());
    }
}
