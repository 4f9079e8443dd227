//! The kernel against an independent NetworkPolicy oracle: random clusters
//! (namespaces, local and remote pods with labels and named ports, the
//! node, random and some invalid NetworkPolicies) go through the agent's
//! model and compiler into the real maps; new-flow packets in both
//! directions between local pods, remote pods, the node and the world run
//! through the real tc programs (BPF_PROG_TEST_RUN); every verdict must be
//! what `palisade_tests::oracle` derives from the objects themselves with
//! the Kubernetes semantics. The oracle shares no code with the compiler,
//! the maps or the reference evaluator, so a rule both the compiler and
//! the kernel get wrong fails here (differential.rs cannot see that).
//!
//! Defaults: 300 clusters x 100 flows, fixed seed (a few seconds).
//! Environment: `PALISADE_ORACLE_SEED` (decimal or 0x-hex),
//! `PALISADE_ORACLE_CLUSTERS`, `PALISADE_ORACLE_FLOWS`,
//! `PALISADE_ORACLE_ONLY` (replay one cluster). A disagreement is shrunk
//! (fewer policies, rules, peers, ports, pods) and printed with the objects,
//! the flow and the command line that reproduces it.
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use palisade_agent::{
    compiler::{Compiled, Compiler},
    model::{self, LocalEndpoint, Model, ObjectKey},
};
use palisade_common::{
    conntrack::TCP_FLAG_SYN, programs, DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP,
};
use palisade_dataplane::{
    packet::Packet,
    testrun::{run_tc, TC_ACT_OK},
    Datapath, DatapathConfig, MapSizes, Maps,
};
use palisade_tests::{
    env_num,
    oracle::{self, evaluate, evaluate_with, Cluster, Dir, Flow, Semantics},
    require_root, NetNs, PinRoot,
};
use rand::{rngs::StdRng, SeedableRng};

const DEFAULT_SEED: u64 = 0x0_2ac1_e5ee_d000_0001;
const DEFAULT_CLUSTERS: usize = 300;
const DEFAULT_FLOWS: usize = 100;
const VETH_PAIRS: usize = 2;

/// Each cluster has its own seed, so one can be replayed alone.
fn cluster_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

// ---------------------------------------------------------------- the agent's side

/// The agent's model of `c`: policies only through `Model::add_policy`,
/// from their Kubernetes manifests.
fn model_of(c: &Cluster) -> Result<Model> {
    let mut m = Model::default();
    for n in &c.namespaces {
        m.namespaces.insert(
            n.name.clone(),
            model::Namespace {
                name: n.name.clone(),
                labels: n.labels(),
                audit: false,
            },
        );
    }
    for p in &c.pods {
        let key = ObjectKey::new(&p.namespace, &p.name);
        m.pods.insert(
            key.clone(),
            model::Pod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                labels: p.labels.clone(),
                ip: Some(p.ip),
                ipv6: None,
                host_network: false,
                ports: p
                    .ports
                    .iter()
                    .map(|cp| model::ContainerPort {
                        name: cp.name.clone(),
                        port: cp.port,
                        protocol: cp.protocol.into(),
                    })
                    .collect(),
            }
            .into(),
        );
        if let Some((endpoint_id, ifindex)) = p.local {
            let container_id = format!("c-{}-{}", p.namespace, p.name);
            m.endpoints.insert(
                container_id.clone(),
                LocalEndpoint {
                    key,
                    endpoint_id,
                    ifindex,
                    host_ifname: format!("veth{ifindex}"),
                    ipv4: p.ip,
                    ipv6: None,
                    container_id,
                    mac: [0; 6],
                },
            );
        }
    }
    for p in &c.policies {
        let np = serde_json::from_value(p.manifest())
            .with_context(|| format!("manifest of {}/{}", p.namespace, p.name))?;
        m.add_policy(ObjectKey::new(&p.namespace, &p.name), &np);
    }
    m.host_ips = c.host_ips.clone();
    Ok(m)
}

fn compile(c: &Cluster) -> Result<Compiled> {
    Ok(Compiler::new().compile(&model_of(c)?))
}

// ---------------------------------------------------------------- the kernel's side

struct Rig {
    dp: Datapath,
    maps: Maps,
}

impl Rig {
    /// Written as the agent writes them: through its map sync, so the
    /// endpoints carry the sync's "no entries" bits and the programs skip
    /// the lookups they allow (the verdicts must not change).
    fn load(&mut self, compiled: &Compiled) -> Result<()> {
        self.maps.clear()?;
        let mut mirror = palisade_agent::sync::Mirror::default();
        palisade_agent::sync::apply(&mut self.maps, &mut mirror, &compiled.maps)?;
        Ok(())
    }

    /// Does the kernel pass the first packet of `flow`? `sport` is unique
    /// per flow of a load, so no flow meets another's conntrack entry.
    fn passes(&mut self, c: &Cluster, flow: &Flow, sport: u16) -> Result<bool> {
        let pod = &c.pods[flow.pod];
        let (ifindex, name) = match (pod.local, flow.dir) {
            (Some((_, i)), Dir::Egress) => (i, programs::POD_EGRESS),
            (Some((_, i)), Dir::Ingress) => (i, programs::POD_INGRESS),
            (None, _) => bail!("flow on remote pod {}", pod.name),
        };
        let (src, dst) = match flow.dir {
            Dir::Egress => (pod.ip, flow.peer),
            Dir::Ingress => (flow.peer, pod.ip),
        };
        let packet = match flow.protocol {
            PROTO_TCP => Packet::tcp(src, sport, dst, flow.dport, TCP_FLAG_SYN),
            PROTO_UDP => Packet::udp(src, sport, dst, flow.dport),
            PROTO_SCTP => Packet::sctp(src, sport, dst, flow.dport),
            PROTO_ICMP => Packet::icmp_echo(src, dst, sport, 1),
            p => bail!("protocol {p}"),
        };
        let r = run_tc(self.dp.classifier(name)?, &packet.bytes(), ifindex, 1)
            .with_context(|| format!("test_run of {packet}"))?;
        Ok(r.action == TC_ACT_OK)
    }
}

// ---------------------------------------------------------------- comparing

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        PROTO_ICMP => "ICMP",
        _ => "?",
    }
}

fn fmt_flow(c: &Cluster, f: &Flow) -> String {
    let pod = &c.pods[f.pod];
    let peer = match c.pod_at(f.peer) {
        Some(p) => format!(
            "{} ({}/{}, {})",
            f.peer,
            p.namespace,
            p.name,
            if p.local.is_some() { "local" } else { "remote" }
        ),
        None if c.host_ips.contains(&f.peer) => format!("{} (node)", f.peer),
        None => format!("{} (world)", f.peer),
    };
    let port = if f.protocol == PROTO_ICMP {
        String::new()
    } else {
        format!(" port {}", f.dport)
    };
    match f.dir {
        Dir::Egress => format!(
            "egress of {}/{} ({}) to {peer}: {}{port}",
            pod.namespace,
            pod.name,
            pod.ip,
            proto_name(f.protocol)
        ),
        Dir::Ingress => format!(
            "ingress of {}/{} ({}) from {peer}: {}{port}",
            pod.namespace,
            pod.name,
            pod.ip,
            proto_name(f.protocol)
        ),
    }
}

#[derive(Clone, Debug)]
enum Problem {
    /// The kernel's verdict differs from the oracle's.
    Verdict { flow: Flow, kernel: bool },
    /// The compiler accepted a policy the API refuses, or the reverse.
    Rejection { policy: String, oracle: bool },
}

/// The first problem of `c` over `flows`, if any.
fn check(rig: &mut Rig, c: &Cluster, flows: &[Flow]) -> Result<Option<Problem>> {
    let compiled = compile(c)?;
    for p in &c.policies {
        let key = ObjectKey::new(&p.namespace, &p.name);
        let oracle = oracle::invalid(p).is_some();
        if compiled.rejected.contains_key(&key) != oracle {
            return Ok(Some(Problem::Rejection {
                policy: key.to_string(),
                oracle,
            }));
        }
    }
    rig.load(&compiled)?;
    for (i, f) in flows.iter().enumerate() {
        let kernel = rig.passes(c, f, 20_000 + i as u16)?;
        if kernel != evaluate(c, f).allow {
            return Ok(Some(Problem::Verdict { flow: *f, kernel }));
        }
    }
    Ok(None)
}

/// Does `c` still show a problem of the same kind?
fn still_fails(rig: &mut Rig, c: &Cluster, p: &Problem) -> bool {
    match p {
        Problem::Verdict { flow, .. } => {
            matches!(check(rig, c, &[*flow]), Ok(Some(Problem::Verdict { .. })))
        }
        Problem::Rejection { policy, .. } => matches!(
            check(rig, c, &[]),
            Ok(Some(Problem::Rejection { policy: q, .. })) if q == *policy
        ),
    }
}

/// Every (cluster, problem) one simplification smaller than `c`: a policy,
/// rule, peer, port, selector term, label or container port less, or a pod
/// less (never the flow's own; the flow's index follows the removal).
fn smaller(c: &Cluster, p: &Problem) -> Vec<(Cluster, Problem)> {
    let mut out: Vec<Cluster> = Vec::new();
    for i in 0..c.policies.len() {
        let mut d = c.clone();
        d.policies.remove(i);
        out.push(d);
    }
    for (pi, pol) in c.policies.iter().enumerate() {
        for (dir, rules) in [(0, &pol.ingress), (1, &pol.egress)] {
            for (ri, r) in rules.iter().flatten().enumerate() {
                let mut d = c.clone();
                rules_of(&mut d, pi, dir).remove(ri);
                out.push(d);
                for k in 0..r.peers.as_ref().map_or(0, Vec::len) {
                    let mut d = c.clone();
                    rules_of(&mut d, pi, dir)[ri]
                        .peers
                        .as_mut()
                        .expect("peers")
                        .remove(k);
                    out.push(d);
                }
                for k in 0..r.ports.as_ref().map_or(0, Vec::len) {
                    let mut d = c.clone();
                    rules_of(&mut d, pi, dir)[ri]
                        .ports
                        .as_mut()
                        .expect("ports")
                        .remove(k);
                    out.push(d);
                }
            }
        }
        for k in 0..pol
            .pod_selector
            .match_expressions
            .as_ref()
            .map_or(0, Vec::len)
        {
            let mut d = c.clone();
            let e = d.policies[pi].pod_selector.match_expressions.as_mut();
            e.expect("expressions").remove(k);
            out.push(d);
        }
        for key in pol
            .pod_selector
            .match_labels
            .iter()
            .flatten()
            .map(|(k, _)| k)
        {
            let mut d = c.clone();
            let l = d.policies[pi].pod_selector.match_labels.as_mut();
            l.expect("labels").remove(key);
            out.push(d);
        }
    }
    for (ni, n) in c.namespaces.iter().enumerate() {
        for key in n.labels.keys() {
            let mut d = c.clone();
            d.namespaces[ni].labels.remove(key);
            out.push(d);
        }
    }
    for (qi, q) in c.pods.iter().enumerate() {
        for key in q.labels.keys() {
            let mut d = c.clone();
            d.pods[qi].labels.remove(key);
            out.push(d);
        }
        for k in 0..q.ports.len() {
            let mut d = c.clone();
            d.pods[qi].ports.remove(k);
            out.push(d);
        }
    }
    let mut pairs: Vec<(Cluster, Problem)> = out.into_iter().map(|d| (d, p.clone())).collect();
    for i in (0..c.pods.len()).rev() {
        let mut q = p.clone();
        if let Problem::Verdict { flow, .. } = &mut q {
            if flow.pod == i {
                continue;
            }
            if flow.pod > i {
                flow.pod -= 1;
            }
        }
        let mut d = c.clone();
        d.pods.remove(i);
        pairs.push((d, q));
    }
    pairs
}

/// Rules of one direction (0 ingress, 1 egress) of policy `pi`.
fn rules_of(d: &mut Cluster, pi: usize, dir: u8) -> &mut Vec<oracle::Rule> {
    let rs = if dir == 0 {
        &mut d.policies[pi].ingress
    } else {
        &mut d.policies[pi].egress
    };
    rs.as_mut().expect("rules")
}

/// Greedy: take the first smaller case that still fails, until none does.
fn shrink(rig: &mut Rig, c: &Cluster, p: &Problem) -> (Cluster, Problem) {
    let (mut cur, mut prob) = (c.clone(), p.clone());
    while let Some(next) = smaller(&cur, &prob)
        .into_iter()
        .find(|(d, q)| still_fails(rig, d, q))
    {
        (cur, prob) = next;
    }
    (cur, prob)
}

/// What the compiler made of the flow's side: the endpoint, the peer's
/// ipcache entries and the endpoint's policy entries in that direction.
fn compiled_view(c: &Cluster, flow: &Flow) -> String {
    let mut s = String::new();
    let Ok(compiled) = compile(c) else {
        return s;
    };
    let Some((id, ifindex)) = c.pods[flow.pod].local else {
        return s;
    };
    let m = &compiled.maps;
    let _ = writeln!(s, "compiled endpoint: {:?}", m.endpoints.get(&ifindex));
    let mut ipc: Vec<_> = m
        .ipcache
        .iter()
        .filter(|((net, len), _)| {
            let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(flow.peer) & mask == u32::from(*net)
        })
        .collect();
    ipc.sort_by_key(|((_, len), _)| std::cmp::Reverse(*len));
    for ((net, len), v) in ipc {
        let _ = writeln!(s, "ipcache {net}/{len}: {v:?}");
    }
    let dir = match flow.dir {
        Dir::Ingress => DIR_INGRESS,
        Dir::Egress => DIR_EGRESS,
    };
    let mut pol: Vec<_> = m
        .policy
        .iter()
        .filter(|((_, k), _)| k.endpoint_id == id && k.direction == dir)
        .map(|((prefix, k), v)| {
            format!(
                "policy /{prefix} peer={} proto={} port={} -> action={} cookie={} ({})",
                k.peer_identity,
                k.protocol,
                u16::from_be(k.dport_be),
                v.action,
                v.cookie,
                compiled
                    .cookies
                    .get(&v.cookie)
                    .map_or_else(String::new, ToString::to_string)
            )
        })
        .collect();
    pol.sort();
    for l in pol {
        let _ = writeln!(s, "{l}");
    }
    s
}

fn describe(seed: u64, index: usize, c: &Cluster, p: &Problem) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "policy oracle: disagreement in cluster {index} (seed {seed:#x}); replay with\n  \
         PALISADE_ORACLE_SEED={seed:#x} PALISADE_ORACLE_ONLY={index} \
         cargo test -p palisade-tests --test policy_oracle\nshrunk cluster:\n{}",
        c.describe()
    );
    match p {
        Problem::Verdict { flow, kernel } => {
            let want = evaluate(c, flow);
            let _ = writeln!(
                s,
                "flow: {}\nkernel: {}\noracle: {} ({})",
                fmt_flow(c, flow),
                if *kernel { "ALLOW" } else { "DROP" },
                if want.allow { "ALLOW" } else { "DROP" },
                want.why
            );
            s.push_str(&compiled_view(c, flow));
            let legacy = evaluate_with(c, flow, Semantics::NamedPortNeverOnIpBlock);
            if legacy.allow == *kernel {
                let _ = writeln!(
                    s,
                    "note: the kernel follows the compiler's old reading of a named port in \
                     an egress rule with an ipBlock peer (resolves to nothing); Kubernetes \
                     resolves it on the destination pod"
                );
            }
        }
        Problem::Rejection { policy, oracle } => {
            let _ = writeln!(
                s,
                "policy {policy}: the API {} it, the compiler {}",
                if *oracle { "refuses" } else { "accepts" },
                if *oracle {
                    "accepted it"
                } else {
                    "rejected it"
                }
            );
        }
    }
    s
}

struct Report {
    clusters: usize,
    flows: usize,
    allowed: usize,
    /// Flows the oracle allows by a rule (not by isolation or the node).
    by_rule: usize,
    /// Flows decided by a named port reached through an egress ipBlock peer.
    named_on_block: usize,
    rejected: usize,
    kernel: Duration,
    failures: Vec<String>,
}

fn run_all(rig: &mut Rig, ifindexes: &[u32], seed: u64) -> Result<Report> {
    let clusters = env_num("PALISADE_ORACLE_CLUSTERS").map_or(DEFAULT_CLUSTERS, |n| n as usize);
    let flows_per = env_num("PALISADE_ORACLE_FLOWS").map_or(DEFAULT_FLOWS, |n| n as usize);
    let only = env_num("PALISADE_ORACLE_ONLY").map(|n| n as usize);
    let mut r = Report {
        clusters: 0,
        flows: 0,
        allowed: 0,
        by_rule: 0,
        named_on_block: 0,
        rejected: 0,
        kernel: Duration::ZERO,
        failures: Vec::new(),
    };
    for index in 0..clusters.max(only.map_or(0, |o| o + 1)) {
        if only.is_some_and(|o| o != index) {
            continue;
        }
        let mut rng = StdRng::seed_from_u64(cluster_seed(seed, index));
        let c = oracle::gen_cluster(&mut rng, ifindexes);
        let flows = oracle::gen_flows(&mut rng, &c, flows_per);
        let t = Instant::now();
        let problem = check(rig, &c, &flows)?;
        r.kernel += t.elapsed();
        r.clusters += 1;
        r.flows += flows.len();
        for f in &flows {
            let e = evaluate(&c, f);
            r.allowed += e.allow as usize;
            r.by_rule += (e.allow
                && !e.why.starts_with("not isolated")
                && !e.why.starts_with("the pod's own node")) as usize;
            r.named_on_block += (e.allow
                != evaluate_with(&c, f, Semantics::NamedPortNeverOnIpBlock).allow)
                as usize;
        }
        r.rejected += c
            .policies
            .iter()
            .filter(|p| oracle::invalid(p).is_some())
            .count();
        if let Some(p) = problem {
            let (small, p) = shrink(rig, &c, &p);
            // The kernel's verdict on the shrunk cluster, for the report.
            let p = match &p {
                Problem::Verdict { flow, .. } => match check(rig, &small, &[*flow])? {
                    Some(q) => q,
                    None => p,
                },
                Problem::Rejection { .. } => p,
            };
            let text = describe(seed, index, &small, &p);
            eprintln!("{text}");
            r.failures.push(text);
            if r.failures.len() >= 3 {
                break;
            }
        }
    }
    Ok(r)
}

#[test]
fn kernel_verdicts_match_the_networkpolicy_oracle() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let seed = env_num("PALISADE_ORACLE_SEED").unwrap_or(DEFAULT_SEED);
    eprintln!("policy oracle: seed {seed:#x} (set PALISADE_ORACLE_SEED to change)");
    let wall = Instant::now();
    let pins = PinRoot::new()?;
    let ns = NetNs::new("h2-oracle")?;
    let names = ns.veth_pairs("o", VETH_PAIRS)?;
    let cfg = DatapathConfig {
        pins: pins.pins.clone(),
        pod_hook: Default::default(),
        local_delivery: Default::default(),
        sizes: MapSizes {
            endpoints: 64,
            ipcache: 1024,
            policy: 16384,
            conntrack: 65536,
            fragments: 64,
            xdp_deny: 16,
            ..Default::default()
        },
    };
    // test_run resolves the ifindex in the caller's namespace: run there.
    let report = ns.enter(move || -> Result<Report> {
        let ifindexes: Vec<u32> = names
            .iter()
            .map(|n| palisade_dataplane::loader::ifindex(n))
            .collect::<Result<_, _>>()?;
        let mut dp = Datapath::load(&cfg)?;
        let maps = dp.take_maps()?;
        let mut rig = Rig { dp, maps };
        run_all(&mut rig, &ifindexes, seed)
    })??;
    eprintln!(
        "policy oracle: {} flows over {} clusters ({} allowed, {} of them by a rule, {} by a \
         named port through an ipBlock; {} invalid policies); {:.2?} compiling and running, \
         {:.2?} total",
        report.flows,
        report.clusters,
        report.allowed,
        report.by_rule,
        report.named_on_block,
        report.rejected,
        report.kernel,
        wall.elapsed()
    );
    assert!(
        report.failures.is_empty(),
        "{} disagreement(s) with the oracle:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
    assert!(report.flows >= 1, "nothing ran");
    // Both verdicts must be exercised, or the comparison proves little.
    assert!(report.by_rule > 0 && report.allowed < report.flows);
    if report.clusters >= DEFAULT_CLUSTERS {
        // The generator must keep reaching the subtle named-port case.
        assert!(
            report.named_on_block > 0,
            "no flow decided by a named port via ipBlock"
        );
    }
    Ok(())
}
