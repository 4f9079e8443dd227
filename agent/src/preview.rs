//! `palisade-agent preview`: the effect of applying, changing or deleting
//! policy objects before doing it. The flow records of the flow log (the
//! new flows and drops this node's programs reported) are replayed through
//! the reference evaluator over two full compiles of a copy of the model:
//! as it is, and with the change. Flows whose verdict differs are grouped by
//! (source, destination, port) with the rule that decides after the change.
//! Nothing is programmed: the copy and its compiles are dropped.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_api::{PreviewGroup, PreviewReport, PreviewRequest};
use palisade_common::{reason, DIR_EGRESS, DIR_INGRESS, VERDICT_ALLOW};
use palisade_dataplane::{
    packet::{Packet, TCP_FLAG_SYN},
    reference::{Evaluator, Verdict},
};

use crate::{
    compiler::{Compiled, Compiler},
    flowlog::{FlowRecord, Peer},
    model::{convert, Model, ObjectKey},
};

/// Verdict reasons of new-flow policy decisions (the records worth
/// replaying; conntrack, host and malformed-packet verdicts are not
/// policy's).
const REPLAYED: [&str; 4] = ["policy-allow", "no-policy-match", "deny-rule", "unenforced"];

/// The flow log and its rotated files, oldest first (`flowlog::FlowLog`
/// keeps `path.1` .. `path.3`).
pub fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = (1..=9)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", path.display())))
        .filter(|p| p.exists())
        .collect();
    v.push(path.to_path_buf());
    v
}

/// Every record of the flow log at or after `since`.
pub fn read_records(path: &Path, since: Option<SystemTime>) -> Vec<FlowRecord> {
    let mut out = Vec::new();
    for f in log_files(path) {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines() {
            let Ok(r) = serde_json::from_str::<FlowRecord>(line) else {
                continue;
            };
            if let Some(since) = since {
                match humantime::parse_rfc3339_weak(&r.time) {
                    Ok(t) if t >= since => {}
                    _ => continue,
                }
            }
            out.push(r);
        }
    }
    out
}

/// The model with the request's policies applied and deleted; the
/// rejections among the applied ones ("ns/name: why").
pub fn changed_model(model: &Model, req: &PreviewRequest) -> Result<(Model, Vec<String>)> {
    let mut m = model.clone();
    let mut rejected = Vec::new();
    for (i, doc) in req.apply.iter().enumerate() {
        let v: serde_yaml::Value =
            serde_yaml::from_str(doc).with_context(|| format!("object {i}: not YAML"))?;
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        match kind {
            "NetworkPolicy" => {
                let np: NetworkPolicy = serde_yaml::from_value(v)
                    .with_context(|| format!("object {i}: not a NetworkPolicy"))?;
                let key = convert::key(&np.metadata).with_context(|| {
                    format!("object {i}: a NetworkPolicy without metadata.name")
                })?;
                let parsed = m.add_policy(key.clone(), &np);
                if let Some(why) = parsed.rejected() {
                    rejected.push(format!("{key}: {why}"));
                }
            }
            crate::cnp::KIND => {
                let cnp: crate::cnp::ClusterNetworkPolicy = serde_yaml::from_value(v)
                    .with_context(|| format!("object {i}: not a ClusterNetworkPolicy"))?;
                let name = cnp.metadata.name.clone().filter(|n| !n.is_empty());
                let name = name.with_context(|| {
                    format!("object {i}: a ClusterNetworkPolicy without metadata.name")
                })?;
                let parsed = m.add_cluster_policy(&cnp);
                if let Some(why) = parsed.rejected() {
                    rejected.push(format!("{}/{name}: {why}", crate::cnp::KIND));
                }
            }
            _ => bail!(
                "object {i}: kind {kind:?}: preview takes NetworkPolicy and ClusterNetworkPolicy objects"
            ),
        }
    }
    for d in &req.delete {
        if let Some(name) = d.strip_prefix("ClusterNetworkPolicy/") {
            if !m.remove_cluster_policy(name) {
                bail!("--delete {d}: no such ClusterNetworkPolicy");
            }
            continue;
        }
        let Some((ns, name)) = d.split_once('/') else {
            bail!("--delete {d:?}: expected namespace/name or ClusterNetworkPolicy/name");
        };
        if !m.remove_policy(&ObjectKey::new(ns, name)) {
            bail!("--delete {d}: no such NetworkPolicy");
        }
    }
    Ok((m, rejected))
}

fn side(p: &Peer) -> String {
    match (&p.namespace, &p.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => format!("{} ({})", p.ip, p.kind),
    }
}

/// The first packet of a recorded flow, of its family (None: a protocol
/// the replay does not build, counted as skipped).
fn packet(r: &FlowRecord) -> Option<Packet> {
    use std::net::IpAddr::{V4, V6};
    let (sp, dp) = (r.src.port.unwrap_or(0), r.dst.port.unwrap_or(0));
    Some(match (r.src.ip, r.dst.ip, r.protocol.as_str()) {
        (V4(s), V4(d), "TCP") => Packet::tcp(s, sp, d, dp, TCP_FLAG_SYN),
        (V4(s), V4(d), "UDP") => Packet::udp(s, sp, d, dp),
        (V4(s), V4(d), "SCTP") => Packet::sctp(s, sp, d, dp),
        (V4(s), V4(d), "ICMP") => Packet::icmp_echo(s, d, 0, 1),
        (V6(s), V6(d), "TCP") => Packet::ipv6_tcp(s, sp, d, dp, TCP_FLAG_SYN),
        (V6(s), V6(d), "UDP") => Packet::ipv6_udp(s, sp, d, dp),
        (V6(s), V6(d), "SCTP") => Packet::ipv6_sctp(s, sp, d, dp),
        // An echo request (128).
        (V6(s), V6(d), "ICMPv6") => Packet::icmpv6_echo(s, d, 128, 0),
        _ => return None,
    })
}

/// Policy's answer (ALLOW, or not: DROP, or AUDIT where audit mode would
/// have dropped it).
fn allowed(v: &Verdict) -> bool {
    v.verdict == VERDICT_ALLOW
}

/// What decides `v` in `c`: the rule, or the policies that isolate.
fn responsible(c: &Compiled, endpoint_id: u32, dir: u8, v: &Verdict) -> String {
    if let Some(r) = c.cookies.get(&v.cookie) {
        return r.to_string();
    }
    if let Some(r) = c.cluster_cookies.get(&v.cookie) {
        return r.to_string();
    }
    if v.cookie == crate::compiler::tiers::COOKIE_DEFAULT_ALLOW {
        return "baseline default (no tier decided)".into();
    }
    match v.reason {
        reason::NO_POLICY_MATCH => {
            let by: Vec<String> = c
                .isolating(endpoint_id, dir)
                .iter()
                .map(|k| k.to_string())
                .collect();
            format!("isolated by {}, no rule matches", by.join(", "))
        }
        r => reason::name(r).to_string(),
    }
}

/// Replays `records` against `before` and `after` (full compiles of the
/// model without and with the change).
pub fn replay(
    model: &Model,
    before: &Compiled,
    after: &Compiled,
    records: &[FlowRecord],
) -> PreviewReport {
    let mut eb = Evaluator::new(&before.maps);
    let mut ea = Evaluator::new(&after.maps);
    let endpoints: BTreeMap<String, (u32, u32)> = model
        .endpoints
        .values()
        .map(|e| (e.key.to_string(), (e.ifindex, e.endpoint_id)))
        .collect();
    let mut report = PreviewReport::default();
    // (source, destination, port) -> (flows, rule after the change)
    let mut dropped: BTreeMap<(String, String, String), (usize, String)> = BTreeMap::new();
    let mut allowed_now: BTreeMap<(String, String, String), (usize, String)> = BTreeMap::new();
    for r in records {
        let hop = (
            endpoints.get(&r.endpoint),
            packet(r),
            match r.direction.as_str() {
                "egress" => Some(DIR_EGRESS),
                "ingress" => Some(DIR_INGRESS),
                _ => None,
            },
        );
        let (Some(&(ifindex, endpoint_id)), Some(pkt), Some(dir)) = hop else {
            if REPLAYED.contains(&r.reason.as_str()) {
                report.skipped += 1;
            }
            continue;
        };
        if !REPLAYED.contains(&r.reason.as_str()) {
            continue;
        }
        report.replayed += 1;
        eb.clear_tracking();
        ea.clear_tracking();
        // (Frames carry the pod's MAC: the replay is about policy.)
        let mac =
            |s: &palisade_dataplane::MapState| s.endpoints.get(&ifindex).map_or([0; 6], |e| e.mac);
        let vb = eb.evaluate(
            ifindex,
            dir,
            &pkt.clone().at_pod_mac(mac(&before.maps), dir),
        );
        let va = ea.evaluate(ifindex, dir, &pkt.clone().at_pod_mac(mac(&after.maps), dir));
        if allowed(&vb) == allowed(&va) {
            continue;
        }
        let port = match r.dst.port {
            Some(p) => format!("{p}/{}", r.protocol),
            None => r.protocol.clone(),
        };
        let key = (side(&r.src), side(&r.dst), port);
        let rule = responsible(after, endpoint_id, dir, &va);
        let groups = if allowed(&vb) {
            &mut dropped
        } else {
            &mut allowed_now
        };
        let g = groups.entry(key).or_insert((0, rule));
        g.0 += 1;
    }
    let list = |m: BTreeMap<(String, String, String), (usize, String)>| {
        let mut v: Vec<PreviewGroup> = m
            .into_iter()
            .map(
                |((source, destination, port), (flows, rule))| PreviewGroup {
                    source,
                    destination,
                    port,
                    flows,
                    rule,
                },
            )
            .collect();
        v.sort_by_key(|g| std::cmp::Reverse(g.flows));
        v
    };
    report.newly_dropped = list(dropped);
    report.newly_allowed = list(allowed_now);
    report
}

/// The whole preview: the change on a copy of `model`, the flow log at
/// `flow_log` replayed.
pub fn preview(model: &Model, req: &PreviewRequest, flow_log: &Path) -> Result<PreviewReport> {
    let (changed, rejected) = changed_model(model, req)?;
    // One compiler: the same numbering for both compiles.
    let mut c = Compiler::new();
    let before = c.compile(model);
    let after = c.compile(&changed);
    let since = req
        .since_unix
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
    let records = read_records(flow_log, since);
    let mut r = replay(model, &before, &after, &records);
    r.rejected = rejected;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// An address no pod has: a peer from outside.
    const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
    use crate::model::{Labels, LocalEndpoint, Namespace, Pod};

    fn model() -> Model {
        let mut m = Model::default();
        m.namespaces.insert(
            "app".into(),
            Namespace {
                name: "app".into(),
                labels: Labels::from([(convert::NAME_LABEL.into(), "app".into())]),
                audit: false,
            },
        );
        for (name, ip) in [("web", 1), ("db", 2)] {
            m.pods.insert(
                ObjectKey::new("app", name),
                Pod {
                    namespace: "app".into(),
                    name: name.into(),
                    labels: Labels::from([("app".to_string(), name.to_string())]),
                    ip: Some(Ipv4Addr::new(10, 0, 0, ip)),
                    ipv6: None,
                    host_network: false,
                    ports: Vec::new(),
                }
                .into(),
            );
            m.endpoints.insert(
                format!("c-{name}"),
                LocalEndpoint {
                    key: ObjectKey::new("app", name),
                    endpoint_id: ip as u32,
                    ifindex: 10 + ip as u32,
                    host_ifname: format!("veth{ip}"),
                    ipv4: Ipv4Addr::new(10, 0, 0, ip),
                    ipv6: None,
                    container_id: format!("c-{name}"),
                    mac: [0; 6],
                },
            );
        }
        m
    }

    fn rec(src: (&str, u8), dst: (&str, u8), port: u16, endpoint: &str, dir: &str) -> FlowRecord {
        let peer = |(name, ip): (&str, u8), port: Option<u16>| Peer {
            ip: if ip == 0 {
                std::net::IpAddr::V4(OUTSIDE)
            } else {
                std::net::IpAddr::V4(Ipv4Addr::new(10, 0, 0, ip))
            },
            port,
            kind: if ip == 0 { "world" } else { "pod" }.into(),
            namespace: (ip != 0).then(|| "app".into()),
            pod: (ip != 0).then(|| name.into()),
            ..Default::default()
        };
        FlowRecord {
            time: "2026-01-01T00:00:00Z".into(),
            verdict: "ALLOW".into(),
            reason: "unenforced".into(),
            direction: dir.into(),
            protocol: "TCP".into(),
            src: peer(src, Some(40000)),
            dst: peer(dst, Some(port)),
            endpoint: endpoint.into(),
            ..Default::default()
        }
    }

    const DB_POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: app}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 5432}]\n";

    /// IPv6 flows are replayed over their own family, by the same rules.
    #[test]
    fn ipv6_flows_are_replayed_too() {
        let mut m = model();
        for (i, (name, ip)) in [("web", "fd00::1"), ("db", "fd00::2")]
            .into_iter()
            .enumerate()
        {
            let key = ObjectKey::new("app", name);
            let mut pod = (*m.pods[&key]).clone();
            pod.ipv6 = Some(ip.parse().unwrap());
            m.pods.insert(key, pod.into());
            m.endpoints.get_mut(&format!("c-{name}")).unwrap().ipv6 = Some(ip.parse().unwrap());
            assert_eq!(m.endpoints[&format!("c-{name}")].endpoint_id, i as u32 + 1);
        }
        let six = |mut r: FlowRecord, src: &str, dst: &str| {
            r.src.ip = src.parse().unwrap();
            r.dst.ip = dst.parse().unwrap();
            r
        };
        let records = vec![
            six(
                rec(("web", 1), ("db", 2), 5432, "app/db", "ingress"),
                "fd00::1",
                "fd00::2",
            ),
            six(
                rec(("web", 1), ("db", 2), 22, "app/db", "ingress"),
                "fd00::1",
                "fd00::2",
            ),
            six(
                rec(("x", 0), ("db", 2), 5432, "app/db", "ingress"),
                "2001:db8::7",
                "fd00::2",
            ),
        ];
        let req = PreviewRequest {
            apply: vec![DB_POLICY.into()],
            delete: vec![],
            since_unix: None,
        };
        let (changed, _) = changed_model(&m, &req).unwrap();
        let mut c = Compiler::new();
        let (before, after) = (c.compile(&m), c.compile(&changed));
        let r = replay(&m, &before, &after, &records);
        assert_eq!((r.replayed, r.skipped), (3, 0));
        let dropped: Vec<(&str, &str, usize)> = r
            .newly_dropped
            .iter()
            .map(|g| (g.source.as_str(), g.port.as_str(), g.flows))
            .collect();
        assert_eq!(
            dropped,
            vec![
                ("2001:db8::7 (world)", "5432/TCP", 1),
                ("app/web", "22/TCP", 1)
            ]
        );
    }

    #[test]
    fn a_new_policy_drops_what_it_does_not_allow_and_names_why() {
        let m = model();
        let records = vec![
            rec(("web", 1), ("db", 2), 5432, "app/db", "ingress"),
            rec(("web", 1), ("db", 2), 5432, "app/db", "ingress"),
            rec(("web", 1), ("db", 2), 22, "app/db", "ingress"),
            rec(("x", 0), ("db", 2), 5432, "app/db", "ingress"),
            rec(("x", 0), ("db", 2), 5432, "app/db", "ingress"),
            rec(("x", 0), ("db", 2), 5432, "app/db", "ingress"),
            // Egress of web is not affected.
            rec(("web", 1), ("db", 2), 22, "app/web", "egress"),
            // A pod gone from this node: not replayable.
            rec(("web", 1), ("db", 2), 22, "app/gone", "ingress"),
        ];
        let req = PreviewRequest {
            apply: vec![DB_POLICY.into()],
            delete: vec![],
            since_unix: None,
        };
        let (changed, rejected) = changed_model(&m, &req).unwrap();
        assert!(rejected.is_empty());
        let mut c = Compiler::new();
        let (before, after) = (c.compile(&m), c.compile(&changed));
        let r = replay(&m, &before, &after, &records);
        assert_eq!((r.replayed, r.skipped), (7, 1));
        assert!(r.newly_allowed.is_empty());
        let groups: Vec<(&str, &str, &str, usize)> = r
            .newly_dropped
            .iter()
            .map(|g| {
                (
                    g.source.as_str(),
                    g.destination.as_str(),
                    g.port.as_str(),
                    g.flows,
                )
            })
            .collect();
        assert_eq!(
            groups,
            vec![
                ("192.0.2.7 (world)", "app/db", "5432/TCP", 3),
                ("app/web", "app/db", "22/TCP", 1)
            ]
        );
        assert_eq!(
            r.newly_dropped[0].rule,
            "isolated by app/db, no rule matches"
        );

        // Deleting it again: the inverse, named by the rule that no longer
        // decides... after the change nothing isolates: unenforced.
        let mut with = m.clone();
        let np: NetworkPolicy = serde_yaml::from_str(DB_POLICY).unwrap();
        with.add_policy(ObjectKey::new("app", "db"), &np);
        let req = PreviewRequest {
            apply: vec![],
            delete: vec!["app/db".into()],
            since_unix: None,
        };
        let (changed, _) = changed_model(&with, &req).unwrap();
        let mut c = Compiler::new();
        let (before, after) = (c.compile(&with), c.compile(&changed));
        let r = replay(&with, &before, &after, &records);
        assert!(r.newly_dropped.is_empty());
        assert_eq!(r.newly_allowed.len(), 2);
        assert_eq!(r.newly_allowed[0].rule, "unenforced");

        // Bad input is a clear error.
        for (apply, delete, want) in [
            (
                vec!["kind: Pod\nmetadata: {name: x}".to_string()],
                vec![],
                "NetworkPolicy objects",
            ),
            (
                vec![],
                vec!["app/none".to_string()],
                "no such NetworkPolicy",
            ),
            (vec![], vec!["nonamespace".to_string()], "namespace/name"),
        ] {
            let req = PreviewRequest {
                apply,
                delete,
                since_unix: None,
            };
            let e = changed_model(&with, &req).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{e:#}");
        }
    }

    const ADMIN_DENY: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: no-db}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress:\n  - name: web-to-db\n    action: Deny\n    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}]\n    protocols: [{tcp: {destinationPort: {number: 5432}}}]\n";

    #[test]
    fn cluster_network_policies_are_previewed_and_deleted_by_name() {
        let mut m = model();
        let np: NetworkPolicy = serde_yaml::from_str(DB_POLICY).unwrap();
        m.add_policy(ObjectKey::new("app", "db"), &np);
        let records = vec![
            rec(("web", 1), ("db", 2), 5432, "app/db", "ingress"),
            rec(("web", 1), ("db", 2), 5432, "app/db", "ingress"),
        ];
        let req = PreviewRequest {
            apply: vec![ADMIN_DENY.into()],
            delete: vec![],
            since_unix: None,
        };
        let (changed, rejected) = changed_model(&m, &req).unwrap();
        assert!(rejected.is_empty(), "{rejected:?}");
        let mut c = Compiler::new();
        let (before, after) = (c.compile(&m), c.compile(&changed));
        let r = replay(&m, &before, &after, &records);
        assert_eq!(r.newly_dropped.len(), 1, "{r:?}");
        assert_eq!(r.newly_dropped[0].flows, 2);
        assert_eq!(
            r.newly_dropped[0].rule,
            "ClusterNetworkPolicy/no-db rule web-to-db (Admin tier, Deny)"
        );

        // Deleting it by name: the NetworkPolicy decides again.
        let req = PreviewRequest {
            apply: vec![],
            delete: vec!["ClusterNetworkPolicy/no-db".into()],
            since_unix: None,
        };
        let (back, _) = changed_model(&changed, &req).unwrap();
        let mut c = Compiler::new();
        let (before, after) = (c.compile(&changed), c.compile(&back));
        let r = replay(&changed, &before, &after, &records);
        assert_eq!(r.newly_allowed.len(), 1, "{r:?}");
        assert_eq!(r.newly_allowed[0].rule, "app/db ingress[0]");
        let e = changed_model(
            &back,
            &PreviewRequest {
                apply: vec![],
                delete: vec!["ClusterNetworkPolicy/no-db".into()],
                since_unix: None,
            },
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("no such ClusterNetworkPolicy"));

        // A rejected one is reported, not applied.
        let bad = ADMIN_DENY.replace("priority: 1", "priority: 5000");
        let (_, rejected) = changed_model(
            &m,
            &PreviewRequest {
                apply: vec![bad],
                delete: vec![],
                since_unix: None,
            },
        )
        .unwrap();
        assert_eq!(rejected.len(), 1);
        assert!(
            rejected[0].starts_with("ClusterNetworkPolicy/no-db: "),
            "{rejected:?}"
        );
    }
}
