//! Section 5: Agent resident memory: the real `palisade-agent` process reading the
//! synthetic cluster (10k pods, 1k policies) from a manifest directory, in
//! a node namespace. VmRSS after the first sync, then again with local
//! endpoints registered through the real CNI plugin (pods of the manifests,
//! so policies select them and the policy map fills); ADD/DEL of those
//! pods are timed too (CNI latency against a big model).
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{
    cluster::{self, Spec},
    cni::{phase, Job},
    node::Node,
    report::{CniRunSet, Memory},
    stats::Rng,
    sys::{self, rss_kib, NetNs},
};

pub struct Plan {
    pub spec: Spec,
    pub local: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        Self {
            spec: Spec::full(),
            local: if quick { 10 } else { 50 },
        }
    }
}

fn fill(st: &palisade_api::StatusReport, name: &str) -> u64 {
    st.maps
        .iter()
        .find(|m| m.name == name)
        .map_or(0, |m| m.entries)
}

struct Measured {
    startup_s: f64,
    rss_sync: u64,
    rss_eps: u64,
    hwm: u64,
    breakdown: Vec<(String, u64)>,
    status: palisade_api::StatusReport,
    adds: (Vec<f64>, usize, f64),
    dels: (Vec<f64>, usize, f64),
}

/// Start the agent on the cluster, register `plan.local` manifest pods
/// through the CNI, measure, deregister them.
fn measure(plan: &Plan, c: &cluster::Cluster, env: &[(&str, &str)]) -> Result<Measured> {
    let files: Vec<(&str, String)> = c
        .files
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let node = Node::with_agent_env("pbmem", &files, env)?;
    let agent = node.agent().context("agent")?;
    let st = agent.status()?;
    anyhow::ensure!(
        st.policies.len() == plan.spec.policies,
        "the agent knows {} policies, not {}",
        st.policies.len(),
        plan.spec.policies
    );
    sys::sleep(Duration::from_secs(1));
    let (rss_sync, _) = rss_kib(agent.pid())?;

    // Local endpoints: pods of the manifests, spread over namespaces/apps.
    let net = node.network("mem", "10.202.0.0/16", None);
    let pods: Vec<NetNs> = (0..plan.local)
        .map(|_| NetNs::new("pbmp"))
        .collect::<Result<_>>()?;
    let mut rng = Rng::new(7);
    let jobs: Vec<Job> = pods
        .iter()
        .map(|p| {
            let m = &c.pods[rng.below(c.pods.len() as u64) as usize];
            (
                sys::unique("mem-"),
                p.path(),
                m.namespace.clone(),
                m.name.clone(),
            )
        })
        .collect();
    let adds = phase(&node, &net, "ADD", &jobs, 1)?;
    let status = agent.status()?;
    sys::sleep(Duration::from_secs(1));
    let (rss_eps, _) = rss_kib(agent.pid())?;
    let breakdown = sys::rss_breakdown(agent.pid())?;
    let dels = phase(&node, &net, "DEL", &jobs, 1)?;
    let (_, hwm) = rss_kib(agent.pid())?;
    let m = Measured {
        startup_s: agent.startup.as_secs_f64(),
        rss_sync,
        rss_eps,
        hwm,
        breakdown,
        status,
        adds,
        dels,
    };
    drop(pods);
    Ok(m)
}

pub fn run(plan: &Plan) -> Result<(Memory, CniRunSet)> {
    let c = cluster::generate(&plan.spec);
    let m = measure(plan, &c, &[])?;
    let st2 = &m.status;
    eprintln!(
        "    agent ready in {:.1} s, VmRSS {:.1} MiB; with {} endpoints ({} policy entries) {:.1} MiB, peak {:.1} MiB",
        m.startup_s,
        m.rss_sync as f64 / 1024.0,
        st2.endpoints.len(),
        fill(st2, "policy"),
        m.rss_eps as f64 / 1024.0,
        m.hwm as f64 / 1024.0
    );
    // Diagnostic: the same with one malloc arena (glibc gives each thread
    // that allocates its own arena; the agent compiles on blocking-pool
    // threads).
    sys::check()?;
    let one = measure(plan, &c, &[("MALLOC_ARENA_MAX", "1")])?;
    eprintln!(
        "    with MALLOC_ARENA_MAX=1: {:.1} MiB after sync, {:.1} MiB with endpoints",
        one.rss_sync as f64 / 1024.0,
        one.rss_eps as f64 / 1024.0
    );
    let mem = Memory {
        pods: plan.spec.pods,
        policies: plan.spec.policies,
        namespaces: plan.spec.namespaces,
        manifest_bytes: c.bytes(),
        startup_s: m.startup_s,
        policy_entries: fill(st2, "policy"),
        ipcache_entries: fill(st2, "ipcache"),
        identities: st2.identities,
        rss_kib_after_sync: m.rss_sync,
        local_endpoints: st2.endpoints.len(),
        rss_kib_with_endpoints: m.rss_eps,
        hwm_kib: m.hwm,
        rss_breakdown_kib: m.breakdown.clone(),
        one_arena_rss_kib: Some((one.rss_sync, one.rss_eps)),
    };
    let run = CniRunSet {
        name: "sequential".into(),
        model: format!(
            "{}k pods, {}k policies",
            plan.spec.pods / 1000,
            plan.spec.policies as f64 / 1000.0
        ),
        concurrency: 1,
        add_ms: m.adds.0,
        del_ms: m.dels.0,
        add_wall_s: m.adds.2,
        del_wall_s: m.dels.2,
        failures: m.adds.1 + m.dels.1,
    };
    Ok((mem, run))
}
