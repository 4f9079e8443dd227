//! Section 4: CNI ADD and DEL latency: the real `palisade` binary, run the way a
//! runtime runs it (a process started inside the node namespace, config on
//! stdin), against the real agent in that node. Each operation is timed
//! from spawn to exit. The pod namespaces exist beforehand (a runtime
//! creates the sandbox first); creating them is not timed.
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use anyhow::{Context, Result};

use crate::{
    node::{exec_cni, Network, Node},
    report::{Cni, CniRunSet},
    sys::{self, enter_thread, NetNs},
};

pub struct Plan {
    pub pods: usize,
    pub concurrency: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                pods: 40,
                concurrency: 8,
            }
        } else {
            Self {
                pods: 200,
                concurrency: 20,
            }
        }
    }
}

const NAMESPACE: &str = "cni";

fn manifests() -> Vec<(&'static str, String)> {
    vec![(
        "cni.yaml",
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: default-deny\n  namespace: {NAMESPACE}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-same-namespace\n  namespace: {NAMESPACE}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from:\n    - podSelector: {{}}\n    ports:\n    - {{protocol: TCP, port: 8080}}\n"
        ),
    )]
}

/// (job index, ms, success, error output) of one plugin run.
type Outcome = (usize, f64, bool, String);

/// One pod to ADD/DEL: (container id, netns path, k8s namespace, pod name).
pub type Job = (String, PathBuf, String, String);

/// Run `command` for every job with `workers` threads inside the node;
/// per-operation milliseconds (in job order), failures, and wall seconds.
pub fn phase(
    node: &Node,
    net: &Network,
    command: &str,
    jobs: &[Job],
    workers: usize,
) -> Result<(Vec<f64>, usize, f64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let jobs: Arc<Vec<Job>> = Arc::new(jobs.to_vec());
    let path = node.ns.path();
    let t = Instant::now();
    let handles: Vec<_> = (0..workers.max(1))
        .map(|_| {
            let (next, results, jobs, path) =
                (next.clone(), results.clone(), jobs.clone(), path.clone());
            let (plugin, conf, command) = (
                node.plugin().to_path_buf(),
                net.conf.clone(),
                command.to_string(),
            );
            std::thread::spawn(move || -> Result<()> {
                enter_thread(&path)?;
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= jobs.len() || sys::interrupted() {
                        return Ok(());
                    }
                    let (cid, netns, ns, pod) = &jobs[i];
                    let r = exec_cni(&plugin, &conf, &command, cid, netns, ns, pod)?;
                    let ok = r.output.status.success();
                    let why = if ok {
                        String::new()
                    } else {
                        String::from_utf8_lossy(&r.output.stdout).trim().to_string()
                    };
                    results.lock().expect("results").push((
                        i,
                        r.elapsed.as_secs_f64() * 1000.0,
                        ok,
                        why,
                    ));
                }
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("CNI worker panicked"))??;
    }
    let wall = t.elapsed().as_secs_f64();
    sys::check()?;
    let mut r = std::mem::take(&mut *results.lock().expect("results"));
    r.sort_by_key(|x| x.0);
    let failures: Vec<&String> = r.iter().filter(|x| !x.2).map(|x| &x.3).collect();
    if let Some(first) = failures.first() {
        eprintln!("    {command}: {} failed, first: {first}", failures.len());
    }
    let nfail = failures.len();
    Ok((
        r.into_iter().filter(|x| x.2).map(|x| x.1).collect(),
        nfail,
        wall,
    ))
}

/// ADD then DEL of `plan.pods` fresh pods with `workers` at once.
fn measure(
    node: &Node,
    net: &Network,
    plan: &Plan,
    name: String,
    model: &str,
    workers: usize,
) -> Result<CniRunSet> {
    sys::check()?;
    let pods: Vec<NetNs> = (0..plan.pods)
        .map(|_| NetNs::new("pbcp"))
        .collect::<Result<_>>()
        .context("creating pod namespaces")?;
    let jobs: Vec<Job> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                sys::unique("cni-"),
                p.path(),
                NAMESPACE.to_string(),
                format!("pod-{workers}-{i}"),
            )
        })
        .collect();
    let (add_ms, add_fail, add_wall) = phase(node, net, "ADD", &jobs, workers)?;
    if let Some(agent) = node.agent() {
        eprintln!(
            "    {name}: {} ADDs ok, agent has {} endpoints",
            add_ms.len(),
            agent.status()?.endpoints.len()
        );
    }
    let (del_ms, del_fail, del_wall) = phase(node, net, "DEL", &jobs, workers)?;
    let run = CniRunSet {
        name,
        model: model.into(),
        concurrency: workers,
        add_ms,
        del_ms,
        add_wall_s: add_wall,
        del_wall_s: del_wall,
        failures: add_fail + del_fail,
    };
    eprintln!(
        "    {} ({}): ADD p50 {:.1} ms p99 {:.1} ms, DEL p50 {:.1} ms p99 {:.1} ms",
        run.name,
        run.model,
        crate::stats::median(&run.add_ms).unwrap_or(f64::NAN),
        crate::stats::percentile(&run.add_ms, 99.0).unwrap_or(f64::NAN),
        crate::stats::median(&run.del_ms).unwrap_or(f64::NAN),
        crate::stats::percentile(&run.del_ms, 99.0).unwrap_or(f64::NAN)
    );
    Ok(run)
}

/// The model of the runs against the stub agent.
pub const STUB_MODEL: &str = "stub agent: the plugin alone";
/// The model of the context run whose agent hooks pods through TCX.
pub const TCX_MODEL: &str = "1 namespace, 2 policies, TCX hooks (context)";

pub fn run(plan: &Plan) -> Result<Cni> {
    let node = Node::with_agent("pbcn", &manifests())?;
    let net = node.network("cni", "10.201.0.0/16", None);
    let mut out = Cni::default();
    let model = "1 namespace, 2 policies";
    for (name, workers) in [
        ("sequential".to_string(), 1),
        (format!("{} concurrent", plan.concurrency), plan.concurrency),
    ] {
        out.runs
            .push(measure(&node, &net, plan, name, model, workers)?);
    }
    drop(node);

    // The same with the agent hooking pods through TCX links (the hook
    // before `cls_bpf` filters): what the attach itself costs.
    let node = Node::with_agent_env("pbct", &manifests(), &[("PALISADE_POD_HOOK", "tcx")])?;
    let net = node.network("cni", "10.201.0.0/16", None);
    out.runs.push(measure(
        &node,
        &net,
        plan,
        "sequential".into(),
        TCX_MODEL,
        1,
    )?);
    drop(node);

    // The plugin alone: the same ADD/DEL against the stub agent, which
    // answers at once and attaches nothing. The difference to the runs
    // above is the agent's share (registration: model, compile, sync,
    // attach).
    let stub = Node::with_stub("pbcs")?;
    let net = stub.network("cni", "10.201.0.0/16", None);
    for (name, workers) in [
        ("sequential".to_string(), 1),
        (format!("{} concurrent", plan.concurrency), plan.concurrency),
    ] {
        out.runs
            .push(measure(&stub, &net, plan, name, STUB_MODEL, workers)?);
    }
    Ok(out)
}
