//! Section 3: Policy update latency: the agent's own pipeline, in process, into
//! real kernel maps. A model of the synthetic cluster (10k pods, 1k
//! policies, a few hundred local endpoints on made-up ifindexes: the sync
//! only uses them as map keys, no program is attached) is compiled and
//! synced once; then every change is timed from the model edit to the last
//! map write: model clone (what the daemon's `build_model` does for every
//! change), `Compiler::compile`, `sync::apply`.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use palisade_agent::{
    compiler::Compiler,
    manifests,
    model::{Model, ObjectKey},
    sync,
};
use palisade_dataplane::{Datapath, DatapathConfig, MapState};

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
                changes: 15,
                max_per_kind: Duration::from_secs(10),
            }
        } else {
            Self {
                spec: Spec::full(),
                local: 200,
                changes: 200,
                max_per_kind: Duration::from_secs(60),
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Pipeline {
    compiler: Compiler,
    current: MapState,
    maps: palisade_dataplane::Maps,
}

impl Pipeline {
    /// model (edited) -> clone -> compile -> sync.
    fn change(&mut self, model: &Model, started: Instant) -> Result<UpdateSample> {
        let t0 = Instant::now();
        let snapshot = model.clone();
        let t1 = Instant::now();
        let compiled = self.compiler.compile(&snapshot);
        let t2 = Instant::now();
        let writes = sync::apply(&mut self.maps, &mut self.current, &compiled.maps)?;
        let t3 = Instant::now();
        Ok(UpdateSample {
            build_ms: ms(t1 - t0),
            compile_ms: ms(t2 - t1),
            apply_ms: ms(t3 - t2),
            total_ms: ms(t3 - started),
            writes,
        })
    }
}

pub fn run(plan: &Plan) -> Result<Update> {
    let t = Instant::now();
    let c = cluster::generate(&plan.spec);
    let mut model = c.model(plan.local)?;
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
    let mut p = Pipeline {
        compiler: Compiler::new(),
        current: MapState::default(),
        maps,
    };
    let t0 = Instant::now();
    let compiled = p.compiler.compile(&model);
    let t1 = Instant::now();
    sync::apply(&mut p.maps, &mut p.current, &compiled.maps)?;
    let t2 = Instant::now();
    let mut out = Update {
        pods: model.pods.len(),
        namespaces: model.namespaces.len(),
        policies: model.policies.len(),
        local_endpoints: model.endpoints.len(),
        identities: compiled.identities.len(),
        policy_entries: compiled.maps.policy.len(),
        ipcache_entries: compiled.maps.ipcache.len(),
        initial_compile_ms: ms(t1 - t0),
        initial_apply_ms: ms(t2 - t1),
        kinds: Vec::new(),
    };
    eprintln!(
        "    initial: {} identities, {} policy entries, {} ipcache entries; compile {:.0} ms, sync {:.0} ms",
        out.identities,
        out.policy_entries,
        out.ipcache_entries,
        out.initial_compile_ms,
        out.initial_apply_ms
    );
    drop(compiled);

    let locals: Vec<ObjectKey> = model.endpoints.values().map(|e| e.key.clone()).collect();
    let remotes: Vec<ObjectKey> = model
        .pods
        .keys()
        .filter(|k| !locals.contains(k))
        .take(1000)
        .cloned()
        .collect();
    let spec = plan.spec.clone();

    for kind in ["policy add", "pod label change", "pod add"] {
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
            // (parsing a policy's YAML), its application to the model is.
            // Every other added policy selects the app of a local pod, so
            // that it has entries to write on this node.
            let new_policy = (kind == "policy add").then(|| {
                let (ns, app) = if i % 2 == 0 {
                    let key = &locals[(i / 2) % locals.len()];
                    let app = model.pods[key].labels["app"]
                        .trim_start_matches("app-")
                        .parse()
                        .unwrap_or(0);
                    (key.namespace.clone(), app)
                } else {
                    (cluster::ns_name(i % spec.namespaces), i % spec.apps)
                };
                let y = cluster::policy_yaml(&format!("bench-add-{i}"), &ns, app, i, &spec);
                manifests::parse_str("change", &y)
                    .policies
                    .into_iter()
                    .next()
            });
            let started = Instant::now();
            match kind {
                "policy add" => {
                    let (key, np) = new_policy.flatten().context("generated policy")?;
                    model.policies.insert(key, np);
                }
                "pod label change" => {
                    // Alternate local and remote pods; the app label moves
                    // the pod to another identity.
                    let key = if i % 2 == 0 {
                        &locals[(i / 2) % locals.len()]
                    } else {
                        &remotes[(i / 2) % remotes.len()]
                    };
                    let pod = model.pods.get_mut(key).context("pod")?;
                    let app: usize = pod.labels["app"]
                        .trim_start_matches("app-")
                        .parse()
                        .unwrap_or(0);
                    let next = (app + 1 + i % 3) % spec.apps;
                    pod.labels.insert("app".into(), format!("app-{next}"));
                    pod.labels
                        .insert("tier".into(), ["web", "api", "db"][next % 3].into());
                }
                _ => {
                    let ns = cluster::ns_name(i % spec.namespaces);
                    let name = format!("added-{i}");
                    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 80, 0, 1)) + i as u32);
                    model.pods.insert(
                        ObjectKey::new(&ns, &name),
                        cluster::model_pod(&ns, &name, i % spec.apps, ip),
                    );
                }
            }
            k.samples.push(p.change(&model, started)?);
        }
        let tot: Vec<f64> = k.totals();
        eprintln!(
            "    {kind}: {} changes, p50 {:.1} ms, p99 {:.1} ms",
            tot.len(),
            crate::stats::median(&tot).unwrap_or(f64::NAN),
            crate::stats::percentile(&tot, 99.0).unwrap_or(f64::NAN)
        );
        out.kinds.push(k);
    }
    drop(p);
    drop(dp);
    drop(pins);
    Ok(out)
}
