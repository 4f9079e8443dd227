//! Section 3: Policy update latency: the agent's own pipeline, in process, into
//! real kernel maps. The synthetic cluster (10k pods, 1k policies, a few
//! hundred local endpoints on made-up ifindexes: the sync only uses them as
//! map keys, no program is attached) is fed to the incremental
//! [`Engine`] and synced once; then every change is timed from its
//! description to the last map write, as the agent's owner task runs it:
//! `Engine::apply` (or `add_endpoint` for a CNI ADD: that endpoint's entries
//! only), `Engine::take_touched`, `sync::apply_touched` (only the keys the
//! change touched).
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use palisade_agent::{
    change::Change,
    compiler::{Compiler, Engine},
    manifests,
    model::{LocalEndpoint, ObjectKey},
    sync,
};
use palisade_dataplane::{Datapath, DatapathConfig};

use crate::{
    cluster::{self, Spec},
    report::{Update, UpdateKind, UpdateSample},
    sys::{self, PinRoot},
};

pub struct Plan {
    pub spec: Spec,
    pub local: usize,
    pub changes: usize,
    pub max_per_kind: Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                spec: Spec::full(),
                local: 200,
                changes: 50,
                max_per_kind: Duration::from_secs(10),
            }
        } else {
            Self {
                spec: Spec::full(),
                local: 200,
                changes: 500,
                max_per_kind: Duration::from_secs(60),
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Pipeline {
    engine: Engine,
    current: sync::Mirror,
    maps: palisade_dataplane::Maps,
}

impl Pipeline {
    /// change -> engine -> touched keys -> sync.
    fn change(&mut self, started: Instant, f: impl FnOnce(&mut Engine)) -> Result<UpdateSample> {
        let t1 = Instant::now();
        f(&mut self.engine);
        let t2 = Instant::now();
        let touched = self.engine.take_touched();
        let writes = match sync::apply_touched(
            &mut self.maps,
            &mut self.current,
            self.engine.desired(),
            &touched,
        ) {
            Ok(n) => n,
            Err(e) => {
                self.engine.retouch(touched);
                return Err(e.into());
            }
        };
        let t3 = Instant::now();
        Ok(UpdateSample {
            build_ms: ms(t1 - started),
            compile_ms: ms(t2 - t1),
            apply_ms: ms(t3 - t2),
            total_ms: ms(t3 - started),
            writes,
        })
    }
}

/// What the same changes cost the previous pipeline (model clone, full
/// compile, full diff of the map states), printed for comparison: the map
/// writes are left out (they are the same few as the engine's).
fn baseline(model: &palisade_agent::model::Model, plan: &Plan, spec: &Spec) -> Result<()> {
    let mut model = model.clone();
    let mut compiler = Compiler::new();
    let mut prev = compiler.compile(&model).maps;
    let n = plan.changes.min(10);
    for kind in ["policy add", "pod label change", "pod add"] {
        let mut totals = Vec::new();
        for i in 0..n {
            sys::check()?;
            let started = Instant::now();
            match kind {
                "policy add" => {
                    let ns = cluster::ns_name(i % spec.namespaces);
                    let y =
                        cluster::policy_yaml(&format!("base-add-{i}"), &ns, i % spec.apps, i, spec);
                    let (key, np) = manifests::parse_str("change", &y)
                        .policies
                        .into_iter()
                        .next()
                        .context("generated policy")?;
                    model.add_policy(key, &np);
                }
                "pod label change" => {
                    let key = model.pods.keys().nth(i * 37).cloned().context("pod")?;
                    let pod = std::sync::Arc::make_mut(model.pods.get_mut(&key).context("pod")?);
                    let next = (i + 1) % spec.apps;
                    pod.labels.insert("app".into(), format!("app-{next}"));
                }
                _ => {
                    let ns = cluster::ns_name(i % spec.namespaces);
                    let name = format!("base-{i}");
                    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 1)) + i as u32);
                    model.pods.insert(
                        ObjectKey::new(&ns, &name),
                        cluster::model_pod(&ns, &name, i % spec.apps, ip).into(),
                    );
                }
            }
            let snapshot = model.clone();
            let compiled = compiler.compile(&snapshot);
            let d = sync::diff(&prev, &compiled.maps);
            std::hint::black_box(d.len());
            prev = compiled.maps;
            totals.push(ms(started.elapsed()));
        }
        eprintln!(
            "    before (clone + full compile + full diff): {kind}: {} changes, p50 {:.1} ms, p99 {:.1} ms",
            totals.len(),
            crate::stats::median(&totals).unwrap_or(f64::NAN),
            crate::stats::percentile(&totals, 99.0).unwrap_or(f64::NAN),
        );
    }
    Ok(())
}

/// VmRSS of this process, MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

pub fn run(plan: &Plan) -> Result<Update> {
    let t = Instant::now();
    let c = cluster::generate(&plan.spec);
    let model = c.model(plan.local)?;
    eprintln!(
        "    model: {} pods, {} policies, {} local endpoints ({:.1} s to generate and parse)",
        model.pods.len(),
        model.policies.len(),
        model.endpoints.len(),
        t.elapsed().as_secs_f64()
    );

    let pins = PinRoot::new()?;
    let mut dp = Datapath::load(&DatapathConfig {
        pins: pins.pins.clone(),
        ..Default::default()
    })
    .context("loading the datapath")?;
    let maps = dp.take_maps()?;
    let rss0 = rss_mib();
    let t0 = Instant::now();
    let engine = cluster::engine(&model);
    let t1 = Instant::now();
    let rss1 = rss_mib();
    let mut p = Pipeline {
        engine,
        current: sync::Mirror::default(),
        maps,
    };
    p.engine.take_touched();
    sync::apply(&mut p.maps, &mut p.current, p.engine.desired())?;
    let t2 = Instant::now();
    let view = p.engine.view();
    let mut out = Update {
        pods: model.pods.len(),
        namespaces: model.namespaces.len(),
        policies: model.policies.len(),
        local_endpoints: model.endpoints.len(),
        identities: view.identities.len(),
        policy_entries: p.engine.desired().policy.len(),
        ipcache_entries: p.engine.desired().ipcache.len(),
        initial_compile_ms: ms(t1 - t0),
        initial_apply_ms: ms(t2 - t1),
        kinds: Vec::new(),
    };
    drop(view);
    eprintln!(
        "    initial: {} identities, {} policy entries, {} ipcache entries; engine load {:.0} ms (+{:.1} MiB RSS, with the bench's own model copy), sync {:.0} ms",
        out.identities,
        out.policy_entries,
        out.ipcache_entries,
        out.initial_compile_ms,
        rss1 - rss0,
        out.initial_apply_ms
    );
    drop(model);

    let locals: Vec<ObjectKey> = p
        .engine
        .model()
        .endpoints
        .values()
        .map(|e| e.key.clone())
        .collect();
    let remotes: Vec<ObjectKey> = p
        .engine
        .model()
        .pods
        .keys()
        .filter(|k| !locals.contains(k))
        .take(1000)
        .cloned()
        .collect();
    let spec = plan.spec.clone();
    let first_free_endpoint = p
        .engine
        .model()
        .endpoints
        .values()
        .map(|e| e.endpoint_id)
        .max()
        .unwrap_or(0)
        + 1;

    for kind in [
        "policy add",
        "pod label change",
        "pod add",
        "pod add, new identity",
        "cni add",
        "cluster network policy change",
        // Every change pays the tier overlay while a ClusterNetworkPolicy
        // exists (the previous kind leaves `bench-cnp` in place).
        "pod label change, with a cluster network policy",
    ] {
        let mut k = UpdateKind {
            name: kind.into(),
            samples: Vec::new(),
        };
        let deadline = Instant::now() + plan.max_per_kind;
        for i in 0..plan.changes {
            sys::check()?;
            if Instant::now() > deadline {
                break;
            }
            // What a change costs the source to describe is not timed
            // (parsing a policy's YAML); its parsing and application are.
            // Every other added policy selects the app of a local pod, so
            // that it has entries to write on this node.
            let new_policy = (kind == "policy add").then(|| {
                let (ns, app) = if i % 2 == 0 {
                    let key = &locals[(i / 2) % locals.len()];
                    let app = p.engine.model().pods[key].labels["app"]
                        .trim_start_matches("app-")
                        .parse()
                        .unwrap_or(0);
                    (key.namespace.to_string(), app)
                } else {
                    (cluster::ns_name(i % spec.namespaces), i % spec.apps)
                };
                let y = cluster::policy_yaml(&format!("bench-add-{i}"), &ns, app, i, &spec);
                manifests::parse_str("change", &y)
                    .policies
                    .into_iter()
                    .next()
            });
            let sample = match kind {
                "policy add" => {
                    let (key, np) = new_policy.flatten().context("generated policy")?;
                    let started = Instant::now();
                    p.change(started, |e| e.apply(Change::Policy(key, np)))?
                }
                "pod label change" | "pod label change, with a cluster network policy" => {
                    // Alternate local and remote pods; the app label moves
                    // the pod to another identity.
                    let key = if i % 2 == 0 {
                        &locals[(i / 2) % locals.len()]
                    } else {
                        &remotes[(i / 2) % remotes.len()]
                    };
                    let started = Instant::now();
                    let mut pod = (**p.engine.model().pods.get(key).context("pod")?).clone();
                    let app: usize = pod.labels["app"]
                        .trim_start_matches("app-")
                        .parse()
                        .unwrap_or(0);
                    let next = (app + 1 + i % 3) % spec.apps;
                    pod.labels.insert("app".into(), format!("app-{next}"));
                    pod.labels
                        .insert("tier".into(), ["web", "api", "db"][next % 3].into());
                    p.change(started, |e| e.apply(Change::Pod(pod.into())))?
                }
                "pod add" => {
                    let ns = cluster::ns_name(i % spec.namespaces);
                    let name = format!("added-{i}");
                    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 80, 0, 1)) + i as u32);
                    let started = Instant::now();
                    let pod = cluster::model_pod(&ns, &name, i % spec.apps, ip);
                    p.change(started, |e| e.apply(Change::Pod(pod.into())))?
                }
                "pod add, new identity" => {
                    // Labels no pod had: a new identity, matched against
                    // every rule (namespace-wide peers take it in).
                    let ns = cluster::ns_name(i % spec.namespaces);
                    let name = format!("fresh-{i}");
                    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 85, 0, 1)) + i as u32);
                    let started = Instant::now();
                    let mut pod = cluster::model_pod(&ns, &name, i % spec.apps, ip);
                    pod.labels.insert("app".into(), format!("fresh-{i}"));
                    p.change(started, |e| e.apply(Change::Pod(pod.into())))?
                }
                "cluster network policy change" => {
                    // An Admin policy over every namespace whose priority
                    // and port move with each change (the first one adds
                    // it): the whole tier overlay is recomputed.
                    let y = format!(
                        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: bench-cnp}}\nspec:\n  tier: Admin\n  priority: {}\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - {{name: deny-port, action: Deny, from: [{{namespaces: {{}}}}], protocols: [{{tcp: {{destinationPort: {{number: {}}}}}}}]}}\n",
                        i % 1000,
                        1000 + i % 5000
                    );
                    let started = Instant::now();
                    let c = manifests::parse_str("change", &y)
                        .cluster_policies
                        .into_values()
                        .next()
                        .context("generated ClusterNetworkPolicy")?;
                    p.change(started, |e| e.apply(Change::ClusterPolicy(c)))?
                }
                _ => {
                    // A pod the API server already told about (no address
                    // yet), then its CNI ADD: what the agent does between
                    // the plugin's request and its answer.
                    let ns = cluster::ns_name(i % spec.namespaces);
                    let name = format!("cni-{i}");
                    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 90, 0, 1)) + i as u32);
                    let mut pod = cluster::model_pod(&ns, &name, i % spec.apps, ip);
                    pod.ip = None;
                    p.change(Instant::now(), |e| e.apply(Change::Pod(pod.into())))?;
                    let n = first_free_endpoint + i as u32;
                    let ep = LocalEndpoint {
                        key: ObjectKey::new(&ns, &name),
                        endpoint_id: n,
                        ifindex: 2_000_000 + n,
                        host_ifname: format!("fake-cni{i}"),
                        ipv4: ip,
                        ipv6: None,
                        container_id: format!("cni-{i}"),
                        mac: [0; 6],
                    };
                    let started = Instant::now();
                    p.change(started, |e| e.add_endpoint(ep))?
                }
            };
            k.samples.push(sample);
        }
        let tot: Vec<f64> = k.totals();
        let eng: Vec<f64> = k.phase(|s| s.compile_ms);
        eprintln!(
            "    {kind}: {} changes, p50 {:.2} ms, p99 {:.2} ms (engine p50 {:.2} ms, p99 {:.2} ms)",
            tot.len(),
            crate::stats::median(&tot).unwrap_or(f64::NAN),
            crate::stats::percentile(&tot, 99.0).unwrap_or(f64::NAN),
            crate::stats::median(&eng).unwrap_or(f64::NAN),
            crate::stats::percentile(&eng, 99.0).unwrap_or(f64::NAN),
        );
        out.kinds.push(k);
    }
    eprintln!(
        "    bench process RSS after the changes: {:.1} MiB",
        rss_mib()
    );
    baseline(p.engine.model(), plan, &spec)?;
    drop(p);
    drop(dp);
    drop(pins);
    Ok(out)
}
