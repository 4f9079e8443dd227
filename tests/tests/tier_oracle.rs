//! The kernel against an independent ClusterNetworkPolicy oracle: random
//! clusters (the NetworkPolicy oracle's namespaces, pods and policies, other
//! nodes, and ClusterNetworkPolicies of both tiers with Accept, Deny and
//! Pass, colliding priorities, `namespaces`, `pods`, `networks`, `nodes`
//! and `domainNames` peers, port numbers, ranges and named ports) go
//! through the agent's incremental engine into the real maps; new-flow
//! packets run through the real tc programs (BPF_PROG_TEST_RUN) and every
//! verdict must be what `palisade_tests::oracle_tiers` derives from the
//! objects with the API's tiered semantics. Then each cluster is changed
//! in place a few times as the API server would report it (a priority
//! moved, a rule order reversed, an action changed, a policy deleted, a
//! pod, namespace or node relabelled) and the engine's incremental result
//! is judged again after every change.
//!
//! Defaults: 150 clusters x 80 flows, 4 changes each, fixed seed.
//! Environment: `PALISADE_TIER_ORACLE_SEED`, `PALISADE_TIER_ORACLE_CLUSTERS`,
//! `PALISADE_TIER_ORACLE_FLOWS`, `PALISADE_TIER_ORACLE_ONLY`. A
//! disagreement on a fresh cluster is shrunk (fewer policies, rules, peers,
//! ports, pods) and printed with the objects and the compiled entries.
use std::{fmt::Write as _, net::Ipv4Addr, sync::Arc, time::Instant};

use anyhow::{bail, Context, Result};
use palisade_agent::{
    change::Change,
    compiler::{tiers, Engine},
    model::{self, LocalEndpoint, ObjectKey},
};
use palisade_common::{
    conntrack::TCP_FLAG_SYN, programs, DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP,
};
use palisade_dataplane::{
    packet::Packet,
    testrun::{run_tc, TC_ACT_OK},
    Datapath, DatapathConfig, MapSizes, MapState, Maps,
};
use palisade_tests::{
    env_num,
    oracle::{Dir, Flow, Labels},
    oracle_tiers::{self, evaluate, Action, TieredCluster},
    require_root, NetNs, PinRoot,
};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

const DEFAULT_SEED: u64 = 0x71e5_50ac_1e00_0014;
const DEFAULT_CLUSTERS: usize = 150;
const DEFAULT_FLOWS: usize = 80;
const CHANGES: usize = 4;
const VETH_PAIRS: usize = 2;

fn cluster_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

// ---------------------------------------------------------------- the agent's side

fn node_object(name: &str, labels: &Labels, ip: Ipv4Addr) -> model::Node {
    model::Node {
        name: name.into(),
        labels: labels.clone(),
        addresses: vec![ip],
        pod_cidrs: Vec::new(),
        ..Default::default()
    }
}

fn pod_object(p: &palisade_tests::oracle::Pod) -> Arc<model::Pod> {
    Arc::new(model::Pod {
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
    })
}

fn cnp_change(p: &oracle_tiers::CPolicy) -> Result<Change> {
    let c = serde_json::from_value(p.manifest())
        .with_context(|| format!("manifest of ClusterNetworkPolicy {}", p.name))?;
    Ok(Change::ClusterPolicy(Arc::new(c)))
}

/// The agent's engine fed with `c` as its sources would: this node (n1)
/// and the others, namespaces, pods, policies, then the local endpoints.
fn engine_of(c: &TieredCluster) -> Result<Engine> {
    let b = &c.base;
    let mut e = Engine::new(false, b.host_ips.clone());
    e.set_node_name(Some("n1".into()));
    let own = palisade_tests::oracle_tiers::own_node_labels();
    e.apply(Change::Node(node_object("n1", &own, b.host_ips[0])));
    for n in &c.nodes {
        e.apply(Change::Node(node_object(&n.name, &n.labels, n.ip)));
    }
    for n in &b.namespaces {
        e.apply(Change::Namespace(model::Namespace {
            name: n.name.clone(),
            labels: n.labels(),
            audit: false,
        }));
    }
    for p in &b.pods {
        e.apply(Change::Pod(pod_object(p)));
    }
    for p in &b.policies {
        let np = serde_json::from_value(p.manifest())
            .with_context(|| format!("manifest of {}/{}", p.namespace, p.name))?;
        e.apply(Change::Policy(
            ObjectKey::new(&p.namespace, &p.name),
            Arc::new(np),
        ));
    }
    for p in &c.policies {
        e.apply(cnp_change(p)?);
    }
    for p in &b.pods {
        if let Some((endpoint_id, ifindex)) = p.local {
            e.add_endpoint(LocalEndpoint {
                key: ObjectKey::new(&p.namespace, &p.name),
                endpoint_id,
                ifindex,
                host_ifname: format!("veth{ifindex}"),
                ipv4: p.ip,
                ipv6: None,
                container_id: format!("c-{}-{}", p.namespace, p.name),
                mac: [0; 6],
            });
        }
    }
    Ok(e)
}

// ---------------------------------------------------------------- the kernel's side

struct Rig {
    dp: Datapath,
    maps: Maps,
    sport: u16,
}

impl Rig {
    /// Written as the agent writes them: through its map sync, so the
    /// endpoints carry the sync's "no entries" bits and the programs skip
    /// the lookups they allow (the verdicts must not change).
    fn load(&mut self, s: &MapState) -> Result<()> {
        self.maps.clear()?;
        let mut mirror = palisade_agent::sync::Mirror::default();
        palisade_agent::sync::apply(&mut self.maps, &mut mirror, s)?;
        Ok(())
    }

    /// Does the kernel pass the first packet of `flow`? Every packet gets
    /// a source port of its own, so no flow meets another's conntrack entry.
    fn passes(&mut self, c: &TieredCluster, flow: &Flow) -> Result<bool> {
        self.sport = if self.sport >= 60000 {
            10000
        } else {
            self.sport + 1
        };
        let sport = self.sport;
        let pod = &c.base.pods[flow.pod];
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

fn fmt_flow(c: &TieredCluster, f: &Flow) -> String {
    let pod = &c.base.pods[f.pod];
    let peer = match c.base.pod_at(f.peer) {
        Some(p) => format!("{} ({}/{})", f.peer, p.namespace, p.name),
        None if c.base.host_ips.contains(&f.peer) => format!("{} (this node)", f.peer),
        None => match c.nodes.iter().find(|n| n.ip == f.peer) {
            Some(n) => format!("{} (node {})", f.peer, n.name),
            None => format!("{} (world)", f.peer),
        },
    };
    let proto = match f.protocol {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        _ => "ICMP",
    };
    format!(
        "{} of {}/{} ({}) {} {peer}: {proto} port {}",
        f.dir,
        pod.namespace,
        pod.name,
        pod.ip,
        if f.dir == Dir::Egress { "to" } else { "from" },
        f.dport
    )
}

fn describe_cluster(c: &TieredCluster) -> String {
    let mut s = c.base.describe();
    for n in &c.nodes {
        let _ = writeln!(s, "node {} {} {:?}", n.name, n.ip, n.labels);
    }
    for p in &c.policies {
        let _ = writeln!(
            s,
            "{}",
            serde_yaml::to_string(&p.manifest()).unwrap_or_default()
        );
    }
    s
}

fn compiled_view(e: &Engine, c: &TieredCluster, flow: &Flow) -> String {
    let mut s = String::new();
    let Some((id, _)) = c.base.pods[flow.pod].local else {
        return s;
    };
    let m = e.desired();
    let dir = if flow.dir == Dir::Ingress {
        DIR_INGRESS
    } else {
        DIR_EGRESS
    };
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
    let mut pol: Vec<String> = m
        .policy
        .iter()
        .filter(|((_, k), _)| k.endpoint_id == id && k.direction == dir)
        .map(|((prefix, k), v)| {
            format!(
                "policy /{prefix} peer={} proto={} port={} -> action={} cookie={:#x}",
                k.peer_identity,
                k.protocol,
                u16::from_be(k.dport_be),
                v.action,
                v.cookie
            )
        })
        .collect();
    pol.sort();
    for l in pol {
        let _ = writeln!(s, "{l}");
    }
    s
}

/// The first flow whose kernel verdict differs from the oracle's.
fn first_disagreement(
    rig: &mut Rig,
    e: &Engine,
    c: &TieredCluster,
    flows: &[Flow],
) -> Result<Option<(Flow, bool)>> {
    // The rejections the API's validation makes.
    let status = tiers::cluster_status(e.model());
    for p in &c.policies {
        let rejected = status
            .iter()
            .find(|s| s.name == p.name)
            .is_some_and(|s| s.rejected.is_some());
        if rejected != p.invalid() {
            bail!(
                "ClusterNetworkPolicy {}: the API {} it, the agent {}",
                p.name,
                if p.invalid() { "refuses" } else { "accepts" },
                if rejected {
                    "rejected it"
                } else {
                    "accepted it"
                }
            );
        }
    }
    rig.load(e.desired())?;
    for f in flows {
        let kernel = rig.passes(c, f)?;
        if kernel != evaluate(c, f).allow {
            return Ok(Some((*f, kernel)));
        }
    }
    Ok(None)
}

fn fails(rig: &mut Rig, c: &TieredCluster, flow: &Flow) -> bool {
    match engine_of(c) {
        Ok(e) => matches!(first_disagreement(rig, &e, c, &[*flow]), Ok(Some(_))),
        Err(_) => false,
    }
}

/// Rules of one direction (0 ingress, 1 egress) of policy `i`.
fn rules_of(d: &mut TieredCluster, i: usize, dir: usize) -> &mut Vec<oracle_tiers::CRule> {
    if dir == 0 {
        &mut d.policies[i].ingress
    } else {
        &mut d.policies[i].egress
    }
}

/// Every cluster one simplification smaller (the flow's pod is kept; its
/// index follows the removals).
fn smaller(c: &TieredCluster, flow: &Flow) -> Vec<(TieredCluster, Flow)> {
    let mut out = Vec::new();
    for i in 0..c.policies.len() {
        let mut d = c.clone();
        d.policies.remove(i);
        out.push(d);
        for dir in 0..2 {
            let n = if dir == 0 {
                c.policies[i].ingress.len()
            } else {
                c.policies[i].egress.len()
            };
            for r in 0..n {
                let mut d = c.clone();
                rules_of(&mut d, i, dir).remove(r);
                out.push(d);
                let rule = rules_of(&mut c.clone(), i, dir)[r].clone();
                if rule.peers.len() > 1 {
                    for k in 0..rule.peers.len() {
                        let mut d = c.clone();
                        rules_of(&mut d, i, dir)[r].peers.remove(k);
                        out.push(d);
                    }
                }
                if let Some(ps) = &rule.ports {
                    let mut d = c.clone();
                    rules_of(&mut d, i, dir)[r].ports = None;
                    out.push(d);
                    if ps.len() > 1 {
                        for k in 0..ps.len() {
                            let mut d = c.clone();
                            if let Some(v) = rules_of(&mut d, i, dir)[r].ports.as_mut() {
                                v.remove(k);
                            }
                            out.push(d);
                        }
                    }
                }
            }
        }
    }
    for i in 0..c.base.policies.len() {
        let mut d = c.clone();
        d.base.policies.remove(i);
        out.push(d);
    }
    let mut pairs: Vec<(TieredCluster, Flow)> = out.into_iter().map(|d| (d, *flow)).collect();
    for i in (0..c.base.pods.len()).rev() {
        if i == flow.pod || c.base.pods[i].ip == flow.peer {
            continue;
        }
        let mut d = c.clone();
        d.base.pods.remove(i);
        let mut f = *flow;
        if f.pod > i {
            f.pod -= 1;
        }
        pairs.push((d, f));
    }
    pairs
}

fn shrink(rig: &mut Rig, c: &TieredCluster, flow: &Flow) -> (TieredCluster, Flow) {
    let (mut cur, mut f) = (c.clone(), *flow);
    while let Some(next) = smaller(&cur, &f)
        .into_iter()
        .find(|(d, g)| fails(rig, d, g))
    {
        (cur, f) = next;
    }
    (cur, f)
}

// ---------------------------------------------------------------- in-place changes

/// One change of `c` as the API server would report it: the changed
/// cluster (for the oracle), the engine changes and their description.
fn change(rng: &mut StdRng, c: &TieredCluster) -> Result<(TieredCluster, Vec<Change>, String)> {
    let mut d = c.clone();
    let pick = rng.gen_range(0..c.policies.len().max(1));
    let kind = rng.gen_range(0..7);
    match kind {
        0..=3 if !c.policies.is_empty() => {
            let p = &mut d.policies[pick];
            let what = match kind {
                0 => {
                    p.priority = *[0, 5, 10, 100, 1000].choose(rng).expect("prio");
                    format!("{}: priority {}", p.name, p.priority)
                }
                1 => {
                    p.ingress.reverse();
                    p.egress.reverse();
                    format!("{}: rule order reversed", p.name)
                }
                2 => {
                    let rules = if rng.gen_bool(0.5) && !p.ingress.is_empty() {
                        &mut p.ingress
                    } else {
                        &mut p.egress
                    };
                    match rules.choose_mut(rng) {
                        Some(r) => {
                            r.action = match r.action {
                                Action::Accept => Action::Deny,
                                Action::Deny => Action::Pass,
                                Action::Pass => Action::Accept,
                            };
                            format!("{}: a rule's action now {:?}", p.name, r.action)
                        }
                        None => format!("{}: unchanged", p.name),
                    }
                }
                _ => {
                    p.tier = match p.tier {
                        oracle_tiers::Tier::Admin => oracle_tiers::Tier::Baseline,
                        oracle_tiers::Tier::Baseline => oracle_tiers::Tier::Admin,
                    };
                    format!("{}: tier now {:?}", p.name, p.tier)
                }
            };
            let ch = cnp_change(&d.policies[pick])?;
            return Ok((d, vec![ch], what));
        }
        4 if !c.policies.is_empty() => {
            let p = d.policies.remove(pick);
            return Ok((
                d,
                vec![Change::ClusterPolicyDeleted(p.name.clone())],
                format!("{} deleted", p.name),
            ));
        }
        5 => {
            let n = d.nodes.choose_mut(rng).expect("nodes");
            if n.labels.remove("zone").is_none() {
                n.labels.insert("zone".into(), "z1".into());
            }
            let ch = Change::Node(node_object(&n.name, &n.labels, n.ip));
            let what = format!("node {} relabelled", n.name);
            return Ok((d, vec![ch], what));
        }
        _ => {
            if rng.gen_bool(0.5) {
                let n = d.base.namespaces.choose_mut(rng).expect("namespaces");
                if n.labels.remove("team").is_none() {
                    n.labels.insert("team".into(), "x".into());
                }
                let ch = Change::Namespace(model::Namespace {
                    name: n.name.clone(),
                    labels: n.labels(),
                    audit: false,
                });
                let what = format!("namespace {} relabelled", n.name);
                return Ok((d, vec![ch], what));
            }
        }
    }
    let i = rng.gen_range(0..d.base.pods.len());
    let p = &mut d.base.pods[i];
    let v = ["a", "b", "c"].choose(rng).expect("values").to_string();
    if p.labels.get("app") == Some(&v) {
        p.labels.remove("app");
    } else {
        p.labels.insert("app".into(), v);
    }
    let ch = Change::Pod(pod_object(p));
    let what = format!("pod {}/{} relabelled {:?}", p.namespace, p.name, p.labels);
    Ok((d, vec![ch], what))
}

// ---------------------------------------------------------------- the test

struct Report {
    clusters: usize,
    flows: usize,
    allowed: usize,
    by_admin: usize,
    by_baseline: usize,
    passed: usize,
    to_nodes: usize,
    failures: Vec<String>,
}

fn run_all(rig: &mut Rig, ifindexes: &[u32], seed: u64) -> Result<Report> {
    let clusters =
        env_num("PALISADE_TIER_ORACLE_CLUSTERS").map_or(DEFAULT_CLUSTERS, |n| n as usize);
    let flows_per = env_num("PALISADE_TIER_ORACLE_FLOWS").map_or(DEFAULT_FLOWS, |n| n as usize);
    let only = env_num("PALISADE_TIER_ORACLE_ONLY").map(|n| n as usize);
    let mut r = Report {
        clusters: 0,
        flows: 0,
        allowed: 0,
        by_admin: 0,
        by_baseline: 0,
        passed: 0,
        to_nodes: 0,
        failures: Vec::new(),
    };
    let replay = |index: usize| {
        format!(
            "PALISADE_TIER_ORACLE_SEED={seed:#x} PALISADE_TIER_ORACLE_ONLY={index} \
             cargo test -p palisade-tests --test tier_oracle"
        )
    };
    for index in 0..clusters.max(only.map_or(0, |o| o + 1)) {
        if only.is_some_and(|o| o != index) || r.failures.len() >= 3 {
            continue;
        }
        let mut rng = StdRng::seed_from_u64(cluster_seed(seed, index));
        let mut c = oracle_tiers::gen_cluster(&mut rng, ifindexes);
        let flows = oracle_tiers::gen_flows(&mut rng, &c, flows_per);
        let mut e = engine_of(&c)?;
        if let Some((flow, _)) = first_disagreement(rig, &e, &c, &flows)? {
            let (small, f) = shrink(rig, &c, &flow);
            let se = engine_of(&small)?;
            let kernel = first_disagreement(rig, &se, &small, &[f])?.map(|x| x.1);
            let want = evaluate(&small, &f);
            let text = format!(
                "tier oracle: disagreement in cluster {index}; replay with\n  {}\nshrunk cluster:\n{}\nflow: {}\nkernel: {}\noracle: {} ({})\n{}",
                replay(index),
                describe_cluster(&small),
                fmt_flow(&small, &f),
                match kernel {
                    Some(true) => "ALLOW",
                    Some(false) => "DROP",
                    None => "(agrees after shrinking?)",
                },
                if want.allow { "ALLOW" } else { "DROP" },
                want.why,
                compiled_view(&se, &small, &f)
            );
            eprintln!("{text}");
            r.failures.push(text);
            continue;
        }
        let mut history = Vec::new();
        for _ in 0..CHANGES {
            let (d, changes, what) = change(&mut rng, &c)?;
            for ch in changes {
                e.apply(ch);
            }
            history.push(what);
            c = d;
            if let Some((flow, kernel)) = first_disagreement(rig, &e, &c, &flows)? {
                let fresh = engine_of(&c)?;
                let fresh_ok = first_disagreement(rig, &fresh, &c, &[flow])?.is_none();
                let want = evaluate(&c, &flow);
                let text = format!(
                    "tier oracle: disagreement in cluster {index} after the changes {history:?}; replay with\n  {}\n\
                     cluster now:\n{}\nflow: {}\nkernel: {}\noracle: {} ({})\n\
                     a fresh engine on the changed cluster {}\n{}",
                    replay(index),
                    describe_cluster(&c),
                    fmt_flow(&c, &flow),
                    if kernel { "ALLOW" } else { "DROP" },
                    if want.allow { "ALLOW" } else { "DROP" },
                    want.why,
                    if fresh_ok {
                        "agrees with the oracle: the incremental update is wrong"
                    } else {
                        "disagrees too"
                    },
                    compiled_view(&e, &c, &flow)
                );
                eprintln!("{text}");
                r.failures.push(text);
                break;
            }
        }
        r.clusters += 1;
        r.flows += flows.len() * (CHANGES + 1);
        for f in &flows {
            let x = evaluate(&c, f);
            r.allowed += x.allow as usize;
            r.by_admin += x.why.contains(" Admin") as usize;
            r.by_baseline += x.why.contains(" Baseline") as usize;
            r.passed += x.why.contains("passed by") as usize;
            r.to_nodes += c.nodes.iter().any(|n| n.ip == f.peer) as usize;
        }
    }
    Ok(r)
}

#[test]
fn kernel_verdicts_match_the_cluster_network_policy_oracle() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let seed = env_num("PALISADE_TIER_ORACLE_SEED").unwrap_or(DEFAULT_SEED);
    eprintln!("tier oracle: seed {seed:#x} (set PALISADE_TIER_ORACLE_SEED to change)");
    let wall = Instant::now();
    let pins = PinRoot::new()?;
    let ns = NetNs::new("h14-tiers")?;
    let names = ns.veth_pairs("t", VETH_PAIRS)?;
    let cfg = DatapathConfig {
        pins: pins.pins.clone(),
        pod_hook: Default::default(),
        local_delivery: Default::default(),
        sizes: MapSizes {
            endpoints: 64,
            ipcache: 1024,
            policy: 65536,
            conntrack: 65536,
            fragments: 64,
            xdp_deny: 16,
            ..Default::default()
        },
    };
    let report = ns.enter(move || -> Result<Report> {
        let ifindexes: Vec<u32> = names
            .iter()
            .map(|n| palisade_dataplane::loader::ifindex(n))
            .collect::<Result<_, _>>()?;
        let mut dp = Datapath::load(&cfg)?;
        let maps = dp.take_maps()?;
        let mut rig = Rig {
            dp,
            maps,
            sport: 10000,
        };
        run_all(&mut rig, &ifindexes, seed)
    })??;
    eprintln!(
        "tier oracle: {} verdicts over {} clusters (each fresh and after {CHANGES} changes); \
         of the last state's: {} allowed, {} decided by an Admin rule, {} by a Baseline rule, \
         {} through a Pass, {} to other nodes; {:.2?}",
        report.flows,
        report.clusters,
        report.allowed,
        report.by_admin,
        report.by_baseline,
        report.passed,
        report.to_nodes,
        wall.elapsed()
    );
    assert!(
        report.failures.is_empty(),
        "{} disagreement(s) with the oracle:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
    assert!(report.clusters >= 1, "nothing ran");
    if only_default() {
        // The generator must keep reaching every kind of decision.
        assert!(report.by_admin > 0 && report.by_baseline > 0 && report.passed > 0);
        assert!(report.allowed > 0 && report.allowed < report.flows / (CHANGES + 1));
        assert!(report.to_nodes > 0);
    }
    Ok(())
}

fn only_default() -> bool {
    env_num("PALISADE_TIER_ORACLE_ONLY").is_none()
        && env_num("PALISADE_TIER_ORACLE_CLUSTERS").is_none_or(|n| n as usize >= DEFAULT_CLUSTERS)
}
