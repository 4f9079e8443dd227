//! The agent's core: one `Agent` value owns the datapath, the model and the
//! compiled state. Every change (a source update, a registration) goes
//! through `reprogram`: model -> compile -> sync the difference into the
//! kernel -> bump the programmed generation. Changes are serialized by the
//! lock around the `Agent`.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use anyhow::{anyhow, Context, Result};
use log::{error, info, warn};
use palisade_api::{EndpointStatus, MapFill, PolicyStatus, Registration, StatusReport};
use palisade_common::{EP_AUDIT, EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED};
use palisade_dataplane::{loader, Datapath, DatapathConfig, MapState, Maps, Pins};
use tokio::sync::watch;

use crate::{
    compiler::{Compiled, Compiler},
    endpoints::{Entry, Registry},
    metrics::Metrics,
    model::{LocalEndpoint, Model, Namespace, ObjectKey, Pod},
    source::Snapshot,
    sync,
};

#[derive(Clone, Debug)]
pub struct Config {
    pub socket: PathBuf,
    pub pins: Pins,
    pub state_dir: PathBuf,
    pub manifests: Option<PathBuf>,
    pub kubernetes: bool,
    pub node_name: Option<String>,
    pub flow_log: PathBuf,
    pub flow_log_max_bytes: u64,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub audit: bool,
    pub host_ips: Vec<Ipv4Addr>,
    /// Node uplinks that get the XDP prefilter.
    pub xdp_uplinks: Vec<String>,
    /// Source prefixes the prefilter drops.
    pub xdp_deny: Vec<ipnetwork::Ipv4Network>,
    /// Map sizes (entries). Maps already pinned keep the size they have.
    pub map_sizes: palisade_dataplane::loader::MapSizes,
}

pub const METRICS_DEFAULT_ADDR: &str = "0.0.0.0:9962";

/// What the flow log needs to turn identities and cookies into names.
/// Replaced whole after every reprogram.
#[derive(Debug, Default)]
pub struct View {
    pub compiled: Arc<Compiled>,
    pub model: Arc<Model>,
    /// Pod by address (not host-network pods: their address is the node's).
    pub pods_by_ip: HashMap<Ipv4Addr, ObjectKey>,
}

impl View {
    fn new(compiled: Arc<Compiled>, model: Arc<Model>) -> Self {
        let pods_by_ip = model
            .pods
            .iter()
            .filter(|(_, p)| !p.host_network)
            .filter_map(|(k, p)| Some((p.ip?, k.clone())))
            .collect();
        Self {
            compiled,
            model,
            pods_by_ip,
        }
    }
}

pub struct Agent {
    dp: Datapath,
    pub maps: Maps,
    /// Mirror of what the kernel maps hold.
    current: MapState,
    compiler: Compiler,
    compiled: Arc<Compiled>,
    /// The last snapshot from the source (before local endpoints are laid on).
    snapshot: Snapshot,
    model: Arc<Model>,
    registry: Registry,
    audit: bool,
    host_ips: Vec<Ipv4Addr>,
    programmed: u64,
    model_generation: u64,
    generation_tx: watch::Sender<u64>,
    pub metrics: Arc<Metrics>,
    pub view: Arc<RwLock<View>>,
    /// Set once the first full sync reached the kernel (readiness).
    pub ready: bool,
}

pub type Shared = Arc<Mutex<Agent>>;

impl Agent {
    /// Load (or adopt) the datapath and the registry, and move every pinned
    /// link onto this instance's programs. Nothing is detached: a restarted
    /// agent takes over without a gap in enforcement.
    pub fn start(
        cfg: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<(
        Self,
        palisade_dataplane::events::EventReader,
        watch::Receiver<u64>,
    )> {
        let mut dp = Datapath::load(&DatapathConfig {
            pins: cfg.pins.clone(),
            sizes: cfg.map_sizes.clone(),
        })
        .context("loading the datapath")?;
        let mut maps = dp.take_maps().context("opening the maps")?;
        let events = palisade_dataplane::events::EventReader::new(
            maps.events
                .take()
                .ok_or_else(|| anyhow!("events map missing"))?,
        );
        let adopted = dp.adopt_links().context("adopting pinned links")?;
        let current = sync::read_back(&maps);
        let registry = Registry::open(&cfg.state_dir)
            .with_context(|| format!("opening endpoint registry in {}", cfg.state_dir.display()))?;
        info!(
            "datapath ready: {} pinned interfaces adopted, {} endpoints registered, {} policy entries in the kernel",
            adopted.len(),
            registry.len(),
            current.policy.len()
        );
        // Interfaces gone while we were down: drop their registration.
        let (tx, rx) = watch::channel(0);
        let mut agent = Self {
            dp,
            maps,
            current,
            compiler: Compiler::new(),
            compiled: Arc::default(),
            snapshot: Snapshot::default(),
            model: Arc::default(),
            registry,
            audit: cfg.audit,
            host_ips: cfg.host_ips.clone(),
            programmed: 0,
            model_generation: 0,
            generation_tx: tx,
            metrics,
            view: Arc::default(),
            ready: false,
        };
        agent.forget_vanished_endpoints();
        agent.prefilter(&cfg.xdp_uplinks, &cfg.xdp_deny)?;
        Ok((agent, events, rx))
    }

    /// Attach the XDP prefilter to the uplinks and make its deny list
    /// exactly `deny` (entries from an earlier configuration are removed).
    fn prefilter(&mut self, uplinks: &[String], deny: &[ipnetwork::Ipv4Network]) -> Result<()> {
        let want: std::collections::HashSet<(Ipv4Addr, u32)> = deny
            .iter()
            .map(|n| (n.network(), n.prefix() as u32))
            .collect();
        let have: Vec<(Ipv4Addr, u32)> = self
            .maps
            .xdp_deny
            .keys()
            .filter_map(Result::ok)
            .map(|k| (palisade_dataplane::maps::from_be(k.data()), k.prefix_len()))
            .collect();
        for (addr, prefix) in have.iter().filter(|k| !want.contains(k)) {
            self.maps.allow_source(*addr, *prefix)?;
        }
        for (i, (addr, prefix)) in want.iter().enumerate() {
            self.maps.deny_source(*addr, *prefix, i as u32 + 1)?;
        }
        for up in uplinks {
            self.dp
                .attach_xdp(up)
                .with_context(|| format!("attaching the XDP prefilter to {up}"))?;
            info!("XDP prefilter on {up}: {} deny-listed prefixes", want.len());
        }
        Ok(())
    }

    fn forget_vanished_endpoints(&mut self) {
        let gone: Vec<Entry> = self
            .registry
            .iter()
            .filter(|e| loader::ifindex(&e.registration.host_ifname).ok() != Some(e.ifindex))
            .cloned()
            .collect();
        for e in gone {
            warn!(
                "endpoint {}/{} ({}) vanished while the agent was down; forgetting it",
                e.registration.namespace, e.registration.pod, e.registration.host_ifname
            );
            let _ = self.dp.detach_pod(e.ifindex);
            if let Err(err) = self.registry.remove(&e.registration.container_id) {
                error!("updating registry: {err}");
            }
        }
    }

    pub fn programmed_generation(&self) -> u64 {
        self.programmed
    }

    /// A new view of the cluster from the source.
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> Result<u64> {
        for e in &snap.errors {
            warn!("source: {e}");
        }
        self.metrics.source_errors.add(snap.errors.len() as u64);
        self.snapshot = snap;
        self.reprogram()
    }

    /// Build the model: the source's view with the local endpoints laid on.
    /// A registered pod takes labels and ports from the source object of the
    /// same namespace/name and its address from the registration.
    fn build_model(&self) -> Model {
        let mut m = Model {
            namespaces: self.snapshot.namespaces.clone(),
            pods: self.snapshot.pods.clone(),
            policies: self.snapshot.policies.clone(),
            endpoints: BTreeMap::new(),
            host_ips: {
                let mut ips = self.host_ips.clone();
                ips.extend(
                    self.snapshot
                        .host_ips
                        .iter()
                        .filter(|ip| !self.host_ips.contains(ip)),
                );
                ips
            },
            audit: self.audit,
        };
        for e in self.registry.iter() {
            let r = &e.registration;
            let key = ObjectKey::new(&r.namespace, &r.pod);
            m.namespaces
                .entry(r.namespace.clone())
                .or_insert_with(|| Namespace {
                    name: r.namespace.clone(),
                    labels: [(
                        "kubernetes.io/metadata.name".to_string(),
                        r.namespace.clone(),
                    )]
                    .into(),
                    audit: false,
                });
            m.pods
                .entry(key.clone())
                .and_modify(|p| p.ip = Some(r.ipv4))
                .or_insert_with(|| Pod {
                    namespace: r.namespace.clone(),
                    name: r.pod.clone(),
                    labels: Default::default(),
                    ip: Some(r.ipv4),
                    host_network: false,
                    ports: Vec::new(),
                });
            m.endpoints.insert(
                r.container_id.clone(),
                LocalEndpoint {
                    key,
                    endpoint_id: e.endpoint_id,
                    ifindex: e.ifindex,
                    host_ifname: r.host_ifname.clone(),
                    ipv4: r.ipv4,
                    container_id: r.container_id.clone(),
                },
            );
        }
        m
    }

    /// model -> compile -> sync. A failed sync (e.g. a full map) is reported
    /// and counted; what was written stays consistent with `current`, and the
    /// next change retries the rest.
    pub fn reprogram(&mut self) -> Result<u64> {
        self.model_generation += 1;
        let model = Arc::new(self.build_model());
        let t = Instant::now();
        let compiled = Arc::new(self.compiler.compile(&model));
        self.metrics
            .compile_seconds
            .observe(t.elapsed().as_secs_f64());
        for (k, why) in &compiled.rejected {
            if !self.compiled.rejected.contains_key(k) {
                error!("policy {k} rejected: {why}; every other policy stays enforced");
                self.metrics.policy_rejections.inc();
            }
        }
        self.metrics
            .policies_rejected
            .set(compiled.rejected.len() as u64);

        let t = Instant::now();
        let r = sync::apply(&mut self.maps, &mut self.current, &compiled.maps);
        self.metrics.sync_seconds.observe(t.elapsed().as_secs_f64());
        self.compiled = compiled;
        self.model = model;
        *self.view.write().expect("view lock") =
            View::new(self.compiled.clone(), self.model.clone());
        match r {
            Ok(_) => {
                self.programmed += 1;
                self.ready = true;
                self.generation_tx.send_replace(self.programmed);
                self.metrics.programmed_generation.set(self.programmed);
                Ok(self.programmed)
            }
            Err(e) => {
                if let palisade_dataplane::Error::MapFull { name, .. } = &e.source {
                    self.metrics.map_full.inc_label(name);
                }
                self.metrics.sync_errors.inc();
                error!("{e}");
                Err(e.into())
            }
        }
    }

    /// CNI ADD: index the pod, write its entries, then attach the programs.
    /// Returns only when the pod's policy is in the kernel.
    pub fn register(&mut self, r: Registration) -> Result<(u32, u64)> {
        let ifindex = loader::ifindex(&r.host_ifname).with_context(|| {
            format!(
                "host interface {} of {}/{}",
                r.host_ifname, r.namespace, r.pod
            )
        })?;
        let endpoint_id = self.registry.id_for(&r.container_id);
        let previous = self.registry.get(&r.container_id).cloned();
        let entry = Entry {
            registration: r.clone(),
            endpoint_id,
            ifindex,
        };
        self.registry
            .insert(entry)
            .context("saving endpoint registry")?;

        let t0 = Instant::now();
        let mut t_attach = t0;
        let programmed = self.reprogram().and_then(|g| {
            // The endpoint entry must be in the kernel before a program that
            // would otherwise fail closed runs for it.
            if !self.current.endpoints.contains_key(&ifindex) {
                return Err(anyhow!(
                    "endpoint entry for {} was not written",
                    r.host_ifname
                ));
            }
            t_attach = Instant::now();
            self.dp
                .attach_pod(&r.host_ifname)
                .context("attaching programs")?;
            Ok(g)
        });
        match programmed {
            Ok(g) => {
                info!(
                    "registered {}/{} ({}, {}) as endpoint {endpoint_id} in {:?} (program {:?}, attach {:?})",
                    r.namespace,
                    r.pod,
                    r.ipv4,
                    r.host_ifname,
                    t0.elapsed(),
                    t_attach - t0,
                    t_attach.elapsed()
                );
                Ok((endpoint_id, g))
            }
            Err(e) => {
                // Leave nothing behind; the CNI plugin tears the pod down.
                let _ = self.dp.detach_pod(ifindex);
                let _ = match previous {
                    Some(p) => self.registry.insert(p),
                    None => self.registry.remove(&r.container_id).map(|_| ()),
                };
                let _ = self.reprogram();
                Err(e)
            }
        }
    }

    /// CNI DEL: detach first (the interface may already be gone), then drop
    /// the entries. Unknown containers are fine.
    pub fn deregister(&mut self, container_id: &str) -> Result<u64> {
        let Some(e) = self.registry.get(container_id).cloned() else {
            return Ok(self.programmed);
        };
        if let Err(err) = self.dp.detach_pod(e.ifindex) {
            warn!("detaching from {}: {err}", e.registration.host_ifname);
        }
        self.registry
            .remove(container_id)
            .context("saving endpoint registry")?;
        info!(
            "deregistered {}/{} (endpoint {})",
            e.registration.namespace, e.registration.pod, e.endpoint_id
        );
        self.reprogram()
    }

    pub fn status(&self) -> StatusReport {
        let endpoints = self
            .model
            .endpoints
            .values()
            .map(|le| {
                let info = self.current.endpoints.get(&le.ifindex).copied().unwrap_or(
                    palisade_common::EndpointInfo {
                        endpoint_id: le.endpoint_id,
                        identity: 0,
                        ipv4: 0,
                        flags: 0,
                    },
                );
                EndpointStatus {
                    namespace: le.key.namespace.clone(),
                    pod: le.key.name.clone(),
                    endpoint_id: le.endpoint_id,
                    ipv4: le.ipv4,
                    host_ifname: le.host_ifname.clone(),
                    identity: info.identity,
                    ingress_enforced: info.flags & EP_INGRESS_ENFORCED != 0,
                    egress_enforced: info.flags & EP_EGRESS_ENFORCED != 0,
                    audit: info.flags & EP_AUDIT != 0,
                }
            })
            .collect();
        let policies = self
            .model
            .policies
            .keys()
            .map(|k| PolicyStatus {
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                rejected: self.compiled.rejected.get(k).cloned(),
            })
            .collect();
        StatusReport {
            programmed_generation: self.programmed,
            model_generation: self.model_generation,
            endpoints,
            identities: self.compiled.identities.len(),
            policies,
            maps: self.map_fill(),
            audit: self.audit,
        }
    }

    pub fn map_fill(&self) -> Vec<MapFill> {
        let s = &self.maps.sizes;
        let ct = self.maps.conntrack.keys().count() as u64;
        vec![
            fill(
                "endpoints",
                self.current.endpoints.len() as u64 * 2,
                s.endpoints,
            ),
            fill("ipcache", self.current.ipcache.len() as u64, s.ipcache),
            fill("policy", self.current.policy.len() as u64, s.policy),
            fill("conntrack", ct, s.conntrack),
        ]
    }

    pub fn current(&self) -> &MapState {
        &self.current
    }

    pub fn compiled(&self) -> Arc<Compiled> {
        self.compiled.clone()
    }

    pub fn model(&self) -> Arc<Model> {
        self.model.clone()
    }
}

fn fill(name: &str, entries: u64, max: u32) -> MapFill {
    MapFill {
        name: name.into(),
        entries,
        max_entries: max as u64,
    }
}
