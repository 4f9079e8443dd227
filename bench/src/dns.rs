//! Section 11: egress by domain name (issue 16). A pod that a
//! `domainNames` rule selects resolves a fresh name (a new address each
//! time: the agent learns and programs it before the answer goes on) and
//! connects at once; a pod no domain rule selects resolves the same names
//! through the same DNS pod (its answers are not held). Reported: the
//! lookup latency of both (p50, p99) and the connections made right after
//! a lookup that were dropped.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{bail, Context, Result};
use palisade_api::{call, Request, Response};
use palisade_tests::{
    agent::{metric, registration, write_manifest},
    fqdn::{dns_server, lookup_and_connect, Rec, Zone, NAMESPACES},
    tcp_echo_server, NetNs, Node,
};
use serde::Serialize;

use crate::{
    node::AgentProc,
    stats::{median, percentile},
    sys::{self, TempDir},
};

/// The issue's floors.
pub const ADDED_P99_MS: f64 = 5.0;
pub const DROPPED_MAX: usize = 0;

const GW: Ipv4Addr = Ipv4Addr::new(10, 96, 60, 1);
const SUBJECT: Ipv4Addr = Ipv4Addr::new(10, 96, 60, 2);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 60, 3);
const PLAIN: Ipv4Addr = Ipv4Addr::new(10, 96, 60, 4);
/// External hosts: every address of 10.201.0.0/20 is local to one
/// namespace behind the node (AnyIP), each name resolving to its own.
const EXT_GW: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
const EXT_LINK: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
const EXT_NET: &str = "10.201.0.0/20";
const PORT: u16 = 443;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: lab}
spec: {containers: [{name: c}]}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: shop-egress}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: shop}}}
  egress:
    - name: dns
      action: Accept
      to: [{pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}}]
      protocols: [{udp: {destinationPort: {number: 53}}}]
    - name: cdn
      action: Accept
      to: [{domainNames: ["*.cdn.example"]}]
      protocols: [{tcp: {destinationPort: {number: 443}}}]
    - {name: rest, action: Deny, to: [{networks: [0.0.0.0/0]}]}
"#;

pub struct Plan {
    pub lookups: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        Self {
            lookups: if quick { 300 } else { 1000 },
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DnsCost {
    pub lookups: usize,
    /// Lookup latency (ms), pod with a domain rule (answers held).
    pub subject_ms: Vec<f64>,
    /// The same names from a pod without one (answers not held).
    pub plain_ms: Vec<f64>,
    /// The subject's lookups of the same names again (addresses known:
    /// held, but nothing to program).
    pub known_ms: Vec<f64>,
    /// Connections right after a lookup that failed (subject pod).
    pub dropped: usize,
    /// Held answers the agent sent on before programming (its metric).
    pub hold_timeouts: u64,
}

impl DnsCost {
    pub fn p(&self, subject: bool, q: f64) -> f64 {
        let s = if subject {
            &self.subject_ms
        } else {
            &self.plain_ms
        };
        if q == 50.0 {
            median(s).unwrap_or(f64::NAN)
        } else {
            percentile(s, q).unwrap_or(f64::NAN)
        }
    }
    /// The added p99: subject's p99 over the unheld pod's.
    pub fn added_p99(&self) -> f64 {
        self.p(true, 99.0) - self.p(false, 99.0)
    }
}

/// Names `h<i>.cdn.example` -> 10.201.<i/256>.<i%256> (i from 1).
fn zone(n: usize) -> Zone {
    let v: Vec<(&'static str, u32, Rec)> = (1..=n)
        .map(|i| {
            let name: &'static str = Box::leak(format!("h{i}.cdn.example").into_boxed_str());
            let a = Ipv4Addr::new(10, 201, (i / 256) as u8, (i % 256) as u8);
            (name, 300, Rec::A(a))
        })
        .collect();
    Box::leak(v.into_boxed_slice())
}

fn external(node: &NetNs) -> Result<NetNs> {
    let ext = NetNs::new("bext")?;
    let host_if: String = format!("x{}", palisade_tests::unique(""))
        .chars()
        .take(15)
        .collect();
    node.ip(&[
        "link", "add", &host_if, "type", "veth", "peer", "name", "up0", "netns", &ext.name,
    ])?;
    node.ip(&["addr", "add", &format!("{EXT_GW}/30"), "dev", &host_if])?;
    node.ip(&["link", "set", &host_if, "up"])?;
    node.ip(&["route", "add", EXT_NET, "via", &EXT_LINK.to_string()])?;
    ext.ip(&["addr", "add", &format!("{EXT_LINK}/30"), "dev", "up0"])?;
    ext.ip(&["link", "set", "up0", "up"])?;
    ext.ip(&["link", "set", "lo", "up"])?;
    ext.ip(&["route", "add", "local", EXT_NET, "dev", "lo"])?;
    ext.ip(&["route", "add", "default", "via", &EXT_GW.to_string()])?;
    tcp_echo_server(&ext, PORT)?;
    Ok(ext)
}

fn register(
    socket: &std::path::Path,
    ns: &str,
    name: &str,
    pod: &palisade_tests::Pod,
) -> Result<()> {
    let r = registration(ns, name, pod);
    match call(socket, &Request::Register(r), Duration::from_secs(30))? {
        Response::Ok { .. } => Ok(()),
        other => bail!("register {ns}/{name}: {other:?}"),
    }
}

pub fn run(plan: &Plan) -> Result<DnsCost> {
    let dir = TempDir::new("palisade-bench-dns-")?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    write_manifest(&manifests, "namespaces.yaml", NAMESPACES)?;
    write_manifest(&manifests, "cluster.yaml", CLUSTER)?;
    let mut node = Node::new(GW)?;
    for ip in [SUBJECT, DNS, PLAIN] {
        node.add_pod(ip)?;
    }
    let _ext = external(&node.ns)?;
    let zone = zone(plan.lookups);
    dns_server(&node.pods[1].ns, zone)?;
    let metrics_addr = "127.0.0.1:19981";
    let agent = AgentProc::start_with_metrics(&node.ns, dir.path(), &manifests, &[], metrics_addr)?;
    register(&agent.socket, "shop", "client", &node.pods[0])?;
    register(&agent.socket, "kube-system", "coredns", &node.pods[1])?;
    register(&agent.socket, "lab", "client", &node.pods[2])?;

    let mut out = DnsCost {
        lookups: plan.lookups,
        ..Default::default()
    };
    // The unheld pod first, name by name; then the subject, alternating
    // would let one pod's lookups warm the other's path.
    for &(name, _, _) in zone {
        sys::check()?;
        let plain = lookup_and_connect(&node.pods[2].ns, DNS, name, false, PORT)
            .with_context(|| format!("lab/client resolving {name}"))?;
        out.plain_ms.push(plain.took.as_secs_f64() * 1e3);
        let held = lookup_and_connect(&node.pods[0].ns, DNS, name, false, PORT)
            .with_context(|| format!("shop/client resolving {name}"))?;
        out.subject_ms.push(held.took.as_secs_f64() * 1e3);
        if !held.connected {
            out.dropped += 1;
        }
    }
    for &(name, _, _) in zone {
        sys::check()?;
        let again = lookup_and_connect(&node.pods[0].ns, DNS, name, false, PORT)
            .with_context(|| format!("shop/client resolving {name} again"))?;
        out.known_ms.push(again.took.as_secs_f64() * 1e3);
        if !again.connected {
            out.dropped += 1;
        }
    }
    let text = palisade_tests::agent::http_get(&node.ns, metrics_addr, "/metrics")?;
    out.hold_timeouts = metric(&text, "palisade_dns_hold_timeouts_total");
    drop(agent);
    Ok(out)
}
