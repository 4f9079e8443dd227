//! Section 10 (`--only cnp`): the per-packet cost of a new flow with 1k
//! ClusterNetworkPolicy rules (both tiers) against the same cluster with
//! NetworkPolicy only, through BPF_PROG_TEST_RUN as in section 1.
//!
//! Unlike section 1, whose maps are synthetic keys, both configurations
//! here are what the agent's own compiler (`Compiler::compile`) makes of a
//! cluster: the bench's synthetic cluster (namespaces, pods, NetworkPolicies)
//! plus a namespace `bench` with the measured pod `server` (local endpoint
//! on ifindex 1, ingress isolated by a NetworkPolicy that admits
//! `client-ok` on 80/TCP) and two peers, `client-ok` and `client-no`. The
//! `cnp` configuration adds 40 ClusterNetworkPolicies of 25 rules each (20
//! Admin, 20 Baseline; every one selects `server`; Accept, Deny and Pass;
//! pods, namespaces and networks peers; port numbers, ranges and a named
//! port). None of their rules names the bench pods except the last Admin
//! policy's last two: a Pass for `client-ok` (so the NetworkPolicy decides
//! after the whole Admin tier was walked) and a Deny for `client-no`.
//!
//! Scenarios (`pod_ingress` of `server`): established (an ACK on a tracked
//! flow), new flow allowed (`client-ok`, SYN+FIN reopened every run, as in
//! section 1), new flow denied (`client-no`: the NetworkPolicy's isolation
//! with NetworkPolicy only, the Admin Deny with tiers). Every sample checks
//! the verdict and that the reason found on the first run is counted once
//! per run.
use std::{fmt::Write as _, net::Ipv4Addr, time::Instant};

use anyhow::{ensure, Context, Result};
use aya::{maps::RingBuf, programs::SchedClassifier};
use palisade_agent::{
    compiler::Compiler,
    manifests,
    model::{LocalEndpoint, Model, ObjectKey},
};
use palisade_common::{programs, reason};
use palisade_dataplane::{
    packet::{Packet, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_SYN},
    testrun::{run_tc, TC_ACT_OK, TC_ACT_SHOT},
    Datapath, DatapathConfig, MapState, Maps,
};
use serde::Serialize;

use crate::{
    cluster::{self, Spec},
    report::Scenario,
    stats::Rng,
    sys::{self, PinRoot},
    testrun::Drainer,
};

const IFINDEX: u32 = 1;
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 81, 0, 10);
const CLIENT_OK: Ipv4Addr = Ipv4Addr::new(10, 81, 0, 11);
const CLIENT_NO: Ipv4Addr = Ipv4Addr::new(10, 81, 0, 12);

pub const POLICIES: usize = 40;
pub const RULES_PER_POLICY: usize = 25;

pub const SCENARIOS: [&str; 3] = ["established", "new flow allowed", "new flow denied"];

pub struct Plan {
    pub spec: Spec,
    pub rounds: usize,
    pub repeat: u32,
}

impl Plan {
    pub fn new(quick: bool, rounds: usize) -> Self {
        Self {
            spec: Spec {
                namespaces: 20,
                pods: if quick { 1000 } else { 2000 },
                policies: 100,
                apps: 10,
            },
            rounds,
            repeat: 1_000_000,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CnpConfig {
    /// "NetworkPolicy only" or "+ 1k ClusterNetworkPolicy rules".
    pub name: String,
    pub cluster_policy_rules: usize,
    pub policy_entries: usize,
    /// Entries of the measured endpoint.
    pub endpoint_entries: usize,
    pub ipcache_entries: usize,
    pub compile_ms: f64,
    pub empty: Vec<f64>,
    pub scenarios: Vec<Scenario>,
    /// The reason counted for each scenario (same order).
    pub reasons: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CnpCost {
    pub repeat: u32,
    pub rounds: usize,
    pub pods: usize,
    pub policies: usize,
    pub configs: Vec<CnpConfig>,
}

/// The `bench` namespace: the measured server, its two peers and the
/// NetworkPolicy isolating the server's ingress.
fn bench_namespace_yaml() -> String {
    let mut s = String::from(
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n  labels:\n    purpose: bench\n",
    );
    for (name, ip) in [
        ("server", SERVER),
        ("client-ok", CLIENT_OK),
        ("client-no", CLIENT_NO),
    ] {
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: bench\n  labels:\n    app: {name}\nspec:\n  containers:\n  - name: main\n    image: bench\n    ports:\n    - name: http\n      containerPort: 80\n      protocol: TCP\nstatus:\n  podIP: {ip}\n"
        );
    }
    s.push_str("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: server-in\n  namespace: bench\nspec:\n  podSelector:\n    matchLabels:\n      app: server\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: client-ok\n    ports:\n    - protocol: TCP\n      port: 80\n");
    s
}

const ACTIONS: [&str; 3] = ["Accept", "Deny", "Pass"];

/// One `protocols` list (a number, a range or a named port; sometimes none).
fn protocols(rng: &mut Rng, egress_address_peer: bool) -> String {
    const NUMBERS: [u16; 8] = [80, 443, 8080, 9090, 5432, 6379, 3306, 53];
    match rng.below(6) {
        0 => String::new(),
        1 => ", protocols: [{tcp: {destinationPort: {range: {start: 9000, end: 9100}}}}, {udp: {destinationPort: {range: {start: 30000, end: 32767}}}}]".into(),
        2 if !egress_address_peer => ", protocols: [{destinationNamedPort: http}]".into(),
        k => {
            let p = NUMBERS[rng.below(NUMBERS.len() as u64) as usize];
            let proto = ["tcp", "udp", "sctp"][(k % 3) as usize];
            format!(", protocols: [{{{proto}: {{destinationPort: {{number: {p}}}}}}}]")
        }
    }
}

/// A peer that never matches the bench pods: pods of a generated app,
/// namespaces of a team (the bench namespace has no team), or networks
/// outside every pod range (10.251.0.0/16, only map keys).
fn peer(rng: &mut Rng, egress: bool, spec: &Spec) -> (String, bool) {
    let app = rng.below(spec.apps as u64);
    let team = rng.below(10);
    match rng.below(if egress { 4 } else { 3 }) {
        0 => (
            format!("{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: app-{app}}}}}}}}}"),
            false,
        ),
        1 => (
            format!("{{pods: {{namespaceSelector: {{matchLabels: {{team: team-{team}}}}}, podSelector: {{matchLabels: {{tier: web}}}}}}}}"),
            false,
        ),
        2 => (
            format!("{{namespaces: {{matchLabels: {{team: team-{team}}}}}}}"),
            false,
        ),
        _ => (
            format!("{{networks: [10.251.{}.0/24]}}", rng.below(256)),
            true,
        ),
    }
}

/// The 40 ClusterNetworkPolicies (1k rules): see the module docs.
pub fn cluster_policies_yaml(spec: &Spec) -> String {
    let mut rng = Rng::new(0xc1a5_7e12);
    let mut s = String::new();
    for i in 0..POLICIES {
        let tier = if i < POLICIES / 2 {
            "Admin"
        } else {
            "Baseline"
        };
        let last_admin = i + 1 == POLICIES / 2;
        let priority = (i % (POLICIES / 2)) * 10;
        // Every policy selects the server: all namespaces, or every pod
        // but those of app-0.
        let subject = if i % 3 == 0 {
            "{pods: {namespaceSelector: {}, podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [app-0]}]}}}"
        } else {
            "{namespaces: {}}"
        };
        let _ = write!(
            s,
            "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata:\n  name: bench-{tier}-{i:02}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject: {subject}\n"
        );
        let ingress = RULES_PER_POLICY / 2 + 1;
        let egress = RULES_PER_POLICY - ingress;
        s.push_str("  ingress:\n");
        let generated = if last_admin { ingress - 2 } else { ingress };
        for r in 0..generated {
            let action = ACTIONS[rng.below(3) as usize];
            let (p, _) = peer(&mut rng, false, spec);
            let ports = protocols(&mut rng, false);
            let _ = writeln!(
                s,
                "  - {{name: in-{r}, action: {action}, from: [{p}]{ports}}}"
            );
        }
        if last_admin {
            s.push_str("  - {name: pass-client-ok, action: Pass, from: [{pods: {namespaceSelector: {matchLabels: {purpose: bench}}, podSelector: {matchLabels: {app: client-ok}}}}]}\n");
            s.push_str("  - {name: deny-client-no, action: Deny, from: [{pods: {namespaceSelector: {matchLabels: {purpose: bench}}, podSelector: {matchLabels: {app: client-no}}}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}\n");
        }
        s.push_str("  egress:\n");
        for r in 0..egress {
            let action = ACTIONS[rng.below(3) as usize];
            let (p, address) = peer(&mut rng, true, spec);
            let ports = protocols(&mut rng, address);
            let _ = writeln!(
                s,
                "  - {{name: out-{r}, action: {action}, to: [{p}]{ports}}}"
            );
        }
    }
    s
}

/// The agent's model: the synthetic cluster, the bench namespace, and the
/// ClusterNetworkPolicies if `tiers`.
fn model(spec: &Spec, tiers: bool) -> Result<Model> {
    let c = cluster::generate(spec);
    let mut m = manifests::Manifests::default();
    for (name, text) in &c.files {
        m.add_text(name, text);
    }
    m.add_text("30-bench.yaml", &bench_namespace_yaml());
    if tiers {
        m.add_text("40-cluster-policies.yaml", &cluster_policies_yaml(spec));
    }
    m.finish();
    ensure!(
        m.errors.is_empty(),
        "generated manifests do not parse: {:?}",
        &m.errors[..m.errors.len().min(3)]
    );
    let mut model = Model {
        host_ips: vec![Ipv4Addr::new(10, 255, 255, 1)],
        ..Default::default()
    };
    m.apply_to(&mut model);
    model.endpoints.insert(
        "server".into(),
        LocalEndpoint {
            key: ObjectKey::new("bench", "server"),
            endpoint_id: 1,
            ifindex: IFINDEX,
            host_ifname: "fake-server".into(),
            ipv4: SERVER,
            ipv6: None,
            container_id: "server".into(),
            mac: [0; 6],
        },
    );
    if tiers {
        let accepted = model
            .cluster_policies
            .values()
            .filter(|p| p.accepted().is_some())
            .count();
        ensure!(
            accepted == POLICIES,
            "{accepted} of {POLICIES} ClusterNetworkPolicies accepted: {:?}",
            model
                .cluster_policies
                .values()
                .filter_map(|p| p.rejected())
                .next()
        );
    }
    Ok(model)
}

struct Rig {
    config: CnpConfig,
    dp: Datapath,
    maps: Maps,
    /// Reason of each scenario, from its first run.
    reasons: Vec<Option<u8>>,
    _pins: PinRoot,
}

impl Rig {
    fn new(name: &str, spec: &Spec, tiers: bool) -> Result<(Self, RingBuf<aya::maps::MapData>)> {
        let model = model(spec, tiers)?;
        let t = Instant::now();
        let compiled = Compiler::new().compile(&model);
        let compile_ms = t.elapsed().as_secs_f64() * 1000.0;
        ensure!(
            compiled.rejected.is_empty(),
            "rejected policies: {:?}",
            compiled.rejected
        );
        let pins = PinRoot::new()?;
        let mut dp = Datapath::load(&DatapathConfig {
            pins: pins.pins.clone(),
            ..Default::default()
        })
        .context("loading the datapath")?;
        let mut maps = dp.take_maps()?;
        // Per-packet cost of the verdict path as it runs for a pod within its
        // budgets: a packet repeated 50k times would otherwise be measured
        // on the cheaper over-budget paths (events suppressed, flows unrecorded).
        crate::testrun::unlimited_budgets(&mut maps)?;
        let ring = maps.take_events().context("events map")?;
        let s: &MapState = &compiled.maps;
        for (ifindex, e) in &s.endpoints {
            maps.upsert_endpoint(*ifindex, *e)?;
        }
        for ((addr, prefix), v) in &s.ipcache {
            maps.set_ipcache(*addr, *prefix, *v)?;
        }
        for ((prefix, k), v) in &s.policy {
            maps.set_policy(*prefix, *k, *v)?;
        }
        let config = CnpConfig {
            name: name.into(),
            cluster_policy_rules: if tiers {
                POLICIES * RULES_PER_POLICY
            } else {
                0
            },
            policy_entries: s.policy.len(),
            endpoint_entries: s.policy.keys().filter(|(_, k)| k.endpoint_id == 1).count(),
            ipcache_entries: s.ipcache.len(),
            compile_ms,
            empty: Vec::new(),
            scenarios: SCENARIOS
                .iter()
                .map(|n| Scenario {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
            reasons: Vec::new(),
        };
        let rig = Self {
            config,
            dp,
            maps,
            reasons: vec![None; SCENARIOS.len()],
            _pins: pins,
        };
        Ok((rig, ring))
    }

    fn prog(&mut self) -> Result<&SchedClassifier> {
        Ok(&*self.dp.classifier(programs::POD_INGRESS)?)
    }

    /// One checked test_run: the verdict, and one count of the scenario's
    /// reason per run (the reason is learnt on the first call).
    fn measure(&mut self, k: usize, pkt: &[u8], repeat: u32, want: u32) -> Result<(f64, u64)> {
        let before = self.maps.counters()?;
        let r = run_tc(self.prog()?, pkt, IFINDEX, repeat)?;
        let after = self.maps.counters()?;
        ensure!(
            r.action == want,
            "{}: action {} instead of {want}",
            SCENARIOS[k],
            r.action
        );
        let counted = |why: u8| after.get(why) - before.get(why);
        let why = match self.reasons[k] {
            Some(w) => w,
            None => {
                let w = (0..reason::EVENTS_LOST)
                    .find(|w| counted(*w) == repeat as u64)
                    .with_context(|| format!("{}: no reason counted per run", SCENARIOS[k]))?;
                self.reasons[k] = Some(w);
                self.config.reasons.push(reason::name(w).to_string());
                w
            }
        };
        ensure!(
            counted(why) == repeat as u64,
            "{}: reason {} counted {} times in {repeat} runs",
            SCENARIOS[k],
            reason::name(why),
            counted(why)
        );
        Ok((r.per_run.as_nanos() as f64, counted(reason::EVENTS_LOST)))
    }
}

pub fn run(plan: &Plan) -> Result<CnpCost> {
    let empty_pins = PinRoot::new()?;
    let empty = palisade_dataplane::testrun::load_pass_all(empty_pins.pins.root())?;
    let mut rigs = Vec::new();
    let mut rings = Vec::new();
    for (name, tiers) in [
        ("NetworkPolicy only", false),
        ("+ 1k ClusterNetworkPolicy rules", true),
    ] {
        sys::check()?;
        let t = Instant::now();
        let (rig, ring) = Rig::new(name, &plan.spec, tiers)?;
        eprintln!(
            "    rig {name}: compiled in {:.0} ms, {} policy entries ({} for the server), loaded in {:.1} s",
            rig.config.compile_ms,
            rig.config.policy_entries,
            rig.config.endpoint_entries,
            t.elapsed().as_secs_f64()
        );
        rigs.push(rig);
        rings.push(ring);
    }
    let _drainer = Drainer::start(rings);
    let est = Packet::tcp(CLIENT_OK, 40000, SERVER, 80, TCP_FLAG_ACK).bytes();
    let new_ok = Packet::tcp(CLIENT_OK, 40001, SERVER, 80, TCP_FLAG_SYN | TCP_FLAG_FIN).bytes();
    let new_no = Packet::tcp(CLIENT_NO, 40002, SERVER, 80, TCP_FLAG_SYN).bytes();
    // Warm up: the established entry (a SYN first, the ACK then finds it)
    // and the FIN_WAIT entry the SYN+FIN reopens.
    for rig in &mut rigs {
        let syn = Packet::tcp(CLIENT_OK, 40000, SERVER, 80, TCP_FLAG_SYN).bytes();
        ensure!(run_tc(rig.prog()?, &syn, IFINDEX, 1)?.action == TC_ACT_OK);
        ensure!(run_tc(rig.prog()?, &est, IFINDEX, 1)?.action == TC_ACT_OK);
        ensure!(run_tc(rig.prog()?, &new_ok, IFINDEX, 1)?.action == TC_ACT_OK);
    }
    let order: Vec<usize> = (0..rigs.len()).collect();
    for round in 0..plan.rounds {
        for &ri in &crate::stats::rotated(&order, round) {
            sys::check()?;
            let rig = &mut rigs[ri];
            let e = run_tc(&empty, &est, IFINDEX, plan.repeat)?;
            rig.config.empty.push(e.per_run.as_nanos() as f64);
            for (k, (pkt, want)) in [
                (&est, TC_ACT_OK),
                (&new_ok, TC_ACT_OK),
                (&new_no, TC_ACT_SHOT),
            ]
            .into_iter()
            .enumerate()
            {
                let (ns, lost) = rig.measure(k, pkt, plan.repeat, want)?;
                let sc = &mut rig.config.scenarios[k];
                sc.ns.push(ns);
                if k > 0 {
                    sc.events += plan.repeat as u64;
                    sc.events_lost += lost;
                }
            }
        }
        eprintln!(
            "    round {}/{}: {}",
            round + 1,
            plan.rounds,
            rigs.iter()
                .map(|r| format!(
                    "[{}] empty {:.1}, {}",
                    r.config.name,
                    r.config.empty.last().copied().unwrap_or(f64::NAN),
                    r.config
                        .scenarios
                        .iter()
                        .map(|s| format!(
                            "{} {:.1}",
                            s.name,
                            s.ns.last().copied().unwrap_or(f64::NAN)
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(CnpCost {
        repeat: plan.repeat,
        rounds: plan.rounds,
        pods: plan.spec.pods + 3,
        policies: plan.spec.policies + 1,
        configs: rigs.into_iter().map(|r| r.config).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Spec {
        Spec {
            namespaces: 4,
            pods: 80,
            policies: 10,
            apps: 10,
        }
    }

    #[test]
    fn the_generated_cluster_policies_are_1k_accepted_rules_of_both_tiers() {
        let m = model(&small(), true).unwrap();
        let accepted: Vec<_> = m
            .cluster_policies
            .values()
            .filter_map(|p| p.accepted())
            .collect();
        assert_eq!(accepted.len(), POLICIES);
        let rules: usize = accepted.iter().map(|p| p.rules.len()).sum();
        assert_eq!(rules, 1000);
        use palisade_agent::compiler::cluster::{Action, Tier};
        for tier in [Tier::Admin, Tier::Baseline] {
            for action in [Action::Accept, Action::Deny, Action::Pass] {
                assert!(accepted
                    .iter()
                    .filter(|p| p.tier == tier)
                    .flat_map(|p| &p.rules)
                    .any(|r| r.action == action));
            }
        }
        assert!(accepted
            .iter()
            .flat_map(|p| &p.rules)
            .all(|r| r.unknown.is_none()));
    }

    #[test]
    fn the_measured_flows_get_the_verdicts_the_bench_expects() {
        use palisade_common::DIR_INGRESS;
        use palisade_dataplane::reference::Evaluator;
        for tiers in [false, true] {
            let m = model(&small(), tiers).unwrap();
            let c = Compiler::new().compile(&m);
            let mut ev = Evaluator::new(&c.maps);
            let ok = Packet::tcp(CLIENT_OK, 40001, SERVER, 80, TCP_FLAG_SYN);
            let no = Packet::tcp(CLIENT_NO, 40002, SERVER, 80, TCP_FLAG_SYN);
            assert_eq!(
                ev.evaluate(1, DIR_INGRESS, &ok).reason,
                reason::POLICY_ALLOW
            );
            let want = if tiers {
                reason::DENY_RULE
            } else {
                reason::NO_POLICY_MATCH
            };
            assert_eq!(
                ev.evaluate(1, DIR_INGRESS, &no).reason,
                want,
                "tiers {tiers}"
            );
        }
    }

    #[test]
    fn the_report_has_the_section_and_a_target_row_per_scenario() {
        let cfg = |name: &str, ns: f64| CnpConfig {
            name: name.into(),
            empty: vec![20.0, 22.0],
            scenarios: SCENARIOS
                .iter()
                .map(|n| Scenario {
                    name: n.to_string(),
                    ns: vec![ns, ns + 2.0],
                    ..Default::default()
                })
                .collect(),
            reasons: vec![
                "established".into(),
                "policy-allow".into(),
                "deny-rule".into(),
            ],
            ..Default::default()
        };
        let r = crate::report::Results {
            cnp: Some(CnpCost {
                repeat: 10,
                rounds: 2,
                pods: 3,
                policies: 1,
                configs: vec![cfg("NetworkPolicy only", 50.0), cfg("+ 1k", 60.0)],
            }),
            ..Default::default()
        };
        let md = crate::report::render(&r);
        assert!(md.contains("## 10. New-flow cost"), "{md}");
        let rows: Vec<_> = crate::report::targets(&r)
            .into_iter()
            .filter(|t| t.metric.contains("1k ClusterNetworkPolicy rules ("))
            .collect();
        assert_eq!(rows.len(), 3);
        // 60 - 20 = +40 with tiers, +30 without, 10 ns apart.
        assert!(
            rows[0]
                .measured
                .starts_with("+40.0 ns (+30.0 ns; difference 10.0 ns)"),
            "{:?}",
            rows[0]
        );
        assert_eq!(rows[0].met, Some(true));
    }
}
