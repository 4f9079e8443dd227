//! The agent's core: one `Agent` value owns the datapath, the model and the
//! compiled state. Every change (a source update, a registration) goes
//! through `reprogram`: model -> compile -> sync the difference into the
//! kernel -> bump the programmed generation. Changes are serialized by the
//! lock around the `Agent`.
use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Instant,
};

use anyhow::{anyhow, Context, Result};
use palisade_api::{EndpointStatus, ErrorKind, MapFill, PolicyStatus, Registration, StatusReport};
use palisade_common::{EP_AUDIT, EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED};
use palisade_dataplane::{ConntrackGc, DatapathConfig, MapState, Pins, StatsReader};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    change::SourceEvent,
    compiler::{Engine, View},
    dataplane::{ConntrackFill, Dataplane, KernelDataplane},
    endpoints::{Entry, Registry},
    error::refuse,
    metrics::Metrics,
    model::{LocalEndpoint, Model, ObjectKey},
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
    /// The node's own IPv6 addresses (`--host-ip` of IPv6).
    pub host_ips6: Vec<std::net::Ipv6Addr>,
    /// Node uplinks that get the XDP prefilter.
    pub xdp_uplinks: Vec<String>,
    /// Source prefixes the prefilter drops.
    pub xdp_deny: Vec<ipnetwork::Ipv4Network>,
    /// Map sizes (entries). Maps already pinned keep the size they have.
    pub map_sizes: palisade_dataplane::loader::MapSizes,
    /// How pod programs hook their interface (a `cls_bpf` filter or TCX).
    pub pod_hook: palisade_dataplane::PodHook,
    /// How traffic between pods of the node is delivered once allowed.
    pub local_delivery: palisade_dataplane::LocalDelivery,
    /// Run `verify` this often in the agent (None: only on request).
    pub verify_interval: Option<std::time::Duration>,
    /// /readyz fails while the last verify run found mismatches.
    pub verify_readiness: bool,
    /// Routing between nodes (native, vxlan, none).
    pub routing: crate::routing::Mode,
    /// How often endpoints whose interface is gone are forgotten.
    pub endpoint_check_interval: std::time::Duration,
    /// Conntrack entries and fragment records each endpoint may hold.
    pub conntrack_budget: palisade_common::ct_budget::CtBudget,
    /// Host protection: the node ports pods may reach (protocol, port;
    /// None: every port), or None (off, the default).
    pub host_protection: Option<Vec<(u8, Option<u16>)>>,
    /// Egress by domain name: where the cluster DNS is, and how learned
    /// addresses live (`crate::fqdn`).
    pub dns: DnsConfig,
}

#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub cluster_dns: crate::fqdn::rules::ClusterDns,
    pub limits: crate::fqdn::cache::Limits,
    /// Longest a DNS answer is held while its addresses are programmed.
    pub hold_timeout: std::time::Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            cluster_dns: Default::default(),
            limits: Default::default(),
            hold_timeout: std::time::Duration::from_millis(500),
        }
    }
}

/// `--host-protection`: "53/UDP,10250/TCP,ICMP" (a protocol alone: every
/// port of it; "none": no port) as (protocol, port).
pub fn parse_host_ports(s: &str) -> anyhow::Result<Vec<(u8, Option<u16>)>> {
    let proto = |p: &str| match p.to_ascii_uppercase().as_str() {
        "TCP" => Ok(palisade_common::PROTO_TCP),
        "UDP" => Ok(palisade_common::PROTO_UDP),
        "SCTP" => Ok(palisade_common::PROTO_SCTP),
        "ICMP" => Ok(palisade_common::PROTO_ICMP),
        other => Err(anyhow!("{other:?} is not TCP, UDP, SCTP or ICMP")),
    };
    let mut out = Vec::new();
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(out);
    }
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once('/') {
            Some((port, p)) => {
                let n: u16 = port
                    .parse()
                    .ok()
                    .filter(|n| *n != 0)
                    .ok_or_else(|| anyhow!("{item:?}: {port:?} is not a port 1-65535"))?;
                let p = proto(p)?;
                if p == palisade_common::PROTO_ICMP {
                    anyhow::bail!("{item:?}: ICMP has no ports");
                }
                out.push((p, Some(n)));
            }
            None => out.push((proto(item)?, None)),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `--metrics-addr` by default: the node's address (see [`metrics_bind`]).
pub const METRICS_DEFAULT_ADDR: &str = "node";
pub const METRICS_PORT: u16 = 9962;

/// Where `/metrics`, `/healthz` and `/readyz` listen. `node` (the default)
/// binds the node's address from `NODE_IP` (the DaemonSet sets it from
/// `status.hostIP`), else loopback: never every address of the node by
/// default. `off` disables the endpoint; anything else is an address:port.
pub fn metrics_bind(
    arg: &str,
    node_ip: Option<&str>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    use anyhow::Context;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    Ok(match arg {
        "off" | "" => None,
        "node" => {
            let ip = match node_ip.filter(|s| !s.is_empty()) {
                Some(s) => s
                    .parse::<IpAddr>()
                    .with_context(|| format!("NODE_IP {s:?} is not an address"))?,
                None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            };
            Some(SocketAddr::new(ip, METRICS_PORT))
        }
        s => Some(s.parse().with_context(|| format!("--metrics-addr {s}"))?),
    })
}

/// What the flow log, trace and status read: the engine's published view,
/// swapped whole after every change (cheap: persistent maps).
pub type SharedView = Arc<RwLock<Arc<View>>>;
/// The Service each programmed frontend id stands for (flow records).
pub type SharedServices = Arc<RwLock<std::collections::BTreeMap<u32, crate::service::Frontend>>>;

pub struct Agent {
    /// The kernel (or, in tests, `dataplane::memory`).
    dp: Box<dyn Dataplane>,
    /// Conntrack fill as of the GC task's last pass.
    conntrack_fill: ConntrackFill,
    /// What the programs were told each endpoint may hold.
    conntrack_budget: palisade_common::ct_budget::CtBudget,
    /// Mirror of what the kernel maps hold.
    current: sync::Mirror,
    /// The model and the desired map state, kept up to date change by
    /// change (the full `Compiler::compile` is its test oracle).
    engine: Engine,
    /// The source's raw view, to turn a resync into changes.
    snapshot: Snapshot,
    registry: Registry,
    /// The first sync after start writes the whole difference: the kernel
    /// may hold entries an earlier agent wrote that this one never made.
    full_sync: bool,
    /// The last sync left changes unwritten: sync even without a change.
    unwritten: bool,
    programmed: u64,
    model_generation: u64,
    generation_tx: watch::Sender<u64>,
    pub metrics: Arc<Metrics>,
    pub view: SharedView,
    pub services: SharedServices,
    /// Set once the first full sync reached the kernel (readiness).
    pub ready: bool,
    /// The Services as last resolved from `snapshot`.
    resolved_services: crate::service_resolve::Resolved,
    /// Why the dataplane refused the last frontend list, if it did.
    services_error: Option<String>,
    /// Routes to other nodes' pod ranges (None: routing left alone).
    routes: Option<crate::route_sync::RouteSync>,
    routing_mode: crate::routing::Mode,
    node_name: Option<String>,
    /// The address each registered host veth carries (by ifindex), read
    /// once when it registers: the gateways the node talks to its pods from.
    gateways: HashMap<u32, (Option<Ipv4Addr>, Vec<std::net::Ipv6Addr>)>,
    /// Egress by domain name: the pods whose answers are held and their
    /// patterns (read by the DNS task), and the cluster DNS servers.
    pub fqdn_rules: crate::fqdn::snoop::SharedRules,
    cluster_dns: crate::fqdn::rules::ClusterDns,
    /// `DNS_SERVERS` (None: no kernel, e.g. tests on the memory dataplane).
    dns_servers: Option<palisade_dataplane::dns::DnsServers>,
    learned: Option<crate::fqdn::snoop::SharedCache>,
}

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
        let (mut dp, events) = KernelDataplane::load(&DatapathConfig {
            pins: cfg.pins.clone(),
            sizes: cfg.map_sizes.clone(),
            pod_hook: cfg.pod_hook,
            local_delivery: cfg.local_delivery,
        })
        .context("loading the datapath")?;
        dp.set_conntrack_budget(cfg.conntrack_budget)
            .context("setting the conntrack budget")?;
        let (agent, rx) = Self::with_dataplane(cfg, metrics, Box::new(dp))?;
        Ok((agent, events, rx))
    }

    /// `start` on a given dataplane: adopt its pinned links, read its maps
    /// back, open the registry and forget endpoints whose interface is gone.
    pub fn with_dataplane(
        cfg: &Config,
        metrics: Arc<Metrics>,
        mut dp: Box<dyn Dataplane>,
    ) -> Result<(Self, watch::Receiver<u64>)> {
        let adopted = dp.adopt_links().context("adopting pinned links")?;
        let current = sync::Mirror::new(dp.read_state());
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
            conntrack_fill: ConntrackFill::default(),
            conntrack_budget: cfg.conntrack_budget,
            current,
            engine: Engine::new(cfg.audit, cfg.host_ips.clone())
                .with_host_ips6(cfg.host_ips6.clone()),
            snapshot: Snapshot::default(),
            registry,
            full_sync: true,
            unwritten: false,
            programmed: 0,
            model_generation: 0,
            generation_tx: tx,
            metrics,
            view: Arc::default(),
            services: Arc::default(),
            ready: false,
            resolved_services: Default::default(),
            services_error: None,
            routes: None,
            routing_mode: cfg.routing,
            node_name: cfg.node_name.clone(),
            gateways: HashMap::new(),
            fqdn_rules: Default::default(),
            cluster_dns: cfg.dns.cluster_dns.clone(),
            dns_servers: None,
            learned: None,
        };
        if cfg.routing != crate::routing::Mode::None {
            agent.routes = Some(crate::route_sync::RouteSync::spawn(cfg.routing)?);
        }
        // Frontends adopted from an earlier agent name their flows too.
        *agent.services.write().unwrap_or_else(|p| p.into_inner()) = agent.dp.services();
        agent.forget_vanished_endpoints();
        agent.engine.set_node_name(cfg.node_name.clone());
        agent
            .engine
            .set_host_protection(cfg.host_protection.clone());
        agent.refresh_gateways();
        for e in agent.registry.iter() {
            agent.engine.add_endpoint(local_endpoint(e));
        }
        agent.prefilter(&cfg.xdp_uplinks, &cfg.xdp_deny)?;
        Ok((agent, rx))
    }

    /// The addresses the registered pods' host veths carry are `host`:
    /// the node's source towards its pods (kubelet probes). Read from the
    /// kernel, so a registration cannot claim one.
    fn refresh_gateways(&mut self) {
        let live: HashMap<u32, &str> = self
            .registry
            .iter()
            .map(|e| (e.ifindex, e.registration.host_ifname.as_str()))
            .collect();
        self.gateways
            .retain(|ifindex, _| live.contains_key(ifindex));
        for (ifindex, name) in live {
            if self.gateways.contains_key(&ifindex) {
                continue;
            }
            let v4 = crate::ifaddrs::primary_ipv4(name)
                .inspect_err(|e| warn!("reading the address of {name}: {e}"));
            let v6 = crate::ifaddrs::global_ipv6(name)
                .inspect_err(|e| warn!("reading the IPv6 addresses of {name}: {e}"));
            if let (Ok(v4), Ok(v6)) = (v4, v6) {
                self.gateways.insert(ifindex, (v4, v6));
            }
        }
        let ips = self.gateways.values().filter_map(|g| g.0).collect();
        let ips6 = self.gateways.values().flat_map(|g| g.1.clone()).collect();
        self.engine.set_gateway_ips(ips);
        self.engine.set_gateway_ips6(ips6);
    }

    /// Attach the XDP prefilter to the uplinks and make its deny list
    /// exactly `deny` (entries from an earlier configuration are removed).
    fn prefilter(&mut self, uplinks: &[String], deny: &[ipnetwork::Ipv4Network]) -> Result<()> {
        let want: std::collections::HashSet<(Ipv4Addr, u32)> = deny
            .iter()
            .map(|n| (n.network(), n.prefix() as u32))
            .collect();
        let have = self.dp.denied_sources();
        for (addr, prefix) in have.iter().filter(|k| !want.contains(k)) {
            self.dp.allow_source(*addr, *prefix)?;
        }
        for (i, (addr, prefix)) in want.iter().enumerate() {
            self.dp.deny_source(*addr, *prefix, i as u32 + 1)?;
        }
        for up in uplinks {
            self.dp
                .attach_xdp(up)
                .with_context(|| format!("attaching the XDP prefilter to {up}"))?;
            info!("XDP prefilter on {up}: {} deny-listed prefixes", want.len());
        }
        Ok(())
    }

    /// While running: endpoints whose host interface is gone (a CNI DEL
    /// whose deregistration failed or never came) are deregistered, so
    /// their address stops carrying their identity before it is reused;
    /// the others keep palisade's programs first on their interface.
    pub fn reap_vanished_endpoints(&mut self) -> Result<usize> {
        let gone = self.vanished();
        for e in &gone {
            warn!(
                "endpoint {}/{} ({}, {}): its interface is gone without a deregistration; forgetting it",
                e.registration.namespace,
                e.registration.pod,
                e.registration.addresses(),
                e.registration.host_ifname
            );
            self.deregister(&e.registration.container_id)?;
        }
        for e in self.registry.iter() {
            let ifname = &e.registration.host_ifname;
            match self.dp.keep_first(ifname) {
                Ok(false) => {}
                Ok(true) => warn!(
                    "{}/{}: a TCX program was attached to {ifname} after palisade's filter; \
                     palisade's programs now run first in its TCX chain",
                    e.registration.namespace, e.registration.pod
                ),
                Err(err) => error!(
                    "{}/{}: keeping palisade first on {ifname}: {err}",
                    e.registration.namespace, e.registration.pod
                ),
            }
        }
        Ok(gone.len())
    }

    fn forget_vanished_endpoints(&mut self) {
        for e in self.vanished() {
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

    /// Registered endpoints whose host interface is gone (or is another
    /// interface now, by ifindex).
    fn vanished(&self) -> Vec<Entry> {
        self.registry
            .iter()
            .filter(|e| !self.interface_live(e))
            .cloned()
            .collect()
    }

    fn interface_live(&self, e: &Entry) -> bool {
        self.dp.ifindex(&e.registration.host_ifname).ok() == Some(e.ifindex)
    }

    /// Make the kernel translate exactly these Service frontends (see
    /// `crate::service`); flows already translated keep their backend.
    /// Frontends the datapath cannot translate are refused in the error
    /// (each named); all others are programmed regardless.
    pub fn program_services(&mut self, frontends: Vec<crate::service::Frontend>) -> Result<()> {
        let r = self.dp.set_services(&frontends);
        if let Err(palisade_dataplane::Error::MapFull { name, .. }) = &r {
            self.metrics.map_full.inc_label(name);
        }
        *self.services.write().unwrap_or_else(|p| p.into_inner()) = self.dp.services();
        self.metrics
            .services_programmed
            .set(self.services.read().map_or(0, |s| s.len() as u64));
        r.context("programming Service frontends")
    }

    pub fn programmed_generation(&self) -> u64 {
        self.programmed
    }

    /// A new view of the cluster from the source.
    pub fn apply_snapshot(&mut self, snap: Snapshot) -> Result<u64> {
        self.apply_events(vec![SourceEvent::Resync(snap)])
    }

    /// Source events, in order: changes go to the engine as they are; a
    /// resync becomes the changes between the last view and the new one.
    /// Then one sync. Nothing changed: no sync (once the first one is done).
    pub fn apply_events(&mut self, events: Vec<SourceEvent>) -> Result<u64> {
        let t = Instant::now();
        let mut changed = false;
        let resynced = events.iter().any(|e| matches!(e, SourceEvent::Resync(_)));
        for ev in events {
            let changes = match ev {
                SourceEvent::Changes(cs) => {
                    for c in &cs {
                        self.snapshot.apply(c);
                    }
                    cs
                }
                SourceEvent::Resync(snap) => {
                    for e in &snap.errors {
                        warn!("source: {e}");
                    }
                    self.metrics.source_errors.add(snap.errors.len() as u64);
                    let cs = self.snapshot.changes_to(&snap);
                    self.snapshot = snap;
                    cs
                }
            };
            changed |= !changes.is_empty();
            for c in changes {
                self.engine.apply(c);
            }
        }
        if changed {
            self.resolve_services();
        }
        self.metrics
            .compile_seconds
            .observe(t.elapsed().as_secs_f64());
        if !changed && self.ready && !self.unwritten {
            return Ok(self.programmed);
        }
        let r = self.reprogram();
        if resynced {
            // A complete view replaced the last one: the old view, the
            // parse and the diff leave megabytes of freed heap that glibc
            // keeps mapped. Hand whole free pages back to the kernel.
            // SAFETY: malloc_trim only releases memory malloc owns.
            unsafe { libc::malloc_trim(0) };
        }
        r
    }

    /// Re-resolves the Services from the source view (cheap next to a
    /// compile; pods matter too: derived slices, unknown addresses), reports
    /// new rejections and hands a changed frontend list to the dataplane. A
    /// refusal is reported, never fatal: policy stays enforced.
    fn resolve_services(&mut self) {
        let next = crate::service_resolve::resolve(&self.snapshot);
        for r in &next.rejections {
            if !self.resolved_services.rejections.contains(r) {
                error!("{r}; every other Service keeps working");
                self.metrics.service_rejections.inc();
            }
        }
        self.metrics
            .services_rejected
            .set(next.rejections.len() as u64);
        let changed = next.frontends != self.resolved_services.frontends;
        self.resolved_services = next;
        if changed || self.services_error.is_some() {
            match self.program_services(self.resolved_services.frontends.clone()) {
                Ok(()) => self.services_error = None,
                Err(e) => {
                    if self.services_error.is_none() {
                        error!(
                            "{} Service frontends not programmed: {e}",
                            self.resolved_services.frontends.len()
                        );
                    }
                    self.services_error = Some(format!("{e:#}"));
                }
            }
        }
    }

    /// Hands the routes the model's nodes call for to the route sync
    /// thread (it compares with what it has; nodes rarely change).
    fn sync_routes(&mut self) {
        if let Some(r) = self.routes.as_mut() {
            r.want(crate::routing::desired(
                self.engine.model(),
                self.node_name.as_deref(),
                self.routing_mode,
            ));
        }
    }

    /// Writes `DNS_SERVERS` from then on (the kernel's, opened by the
    /// caller from the pins).
    pub fn set_dns_servers(&mut self, m: palisade_dataplane::dns::DnsServers) {
        self.dns_servers = Some(m);
        self.refresh_fqdn();
    }

    /// Publishes which pods' DNS answers are held and for which patterns,
    /// and writes where the cluster DNS answers from. The datapath's
    /// `EP_DNS_SNOOP` flags came with the sync just done.
    fn refresh_fqdn(&mut self) {
        let model = self.engine.model();
        let rules = crate::fqdn::rules::rules(model);
        let active = !rules.is_empty();
        *self.fqdn_rules.write().unwrap_or_else(|p| p.into_inner()) = rules;
        let Some(m) = self.dns_servers.as_mut() else {
            return;
        };
        // Where answers come from matters only while some are held (the
        // programs check `DNS_ACTIVE` first): no walk over every pod after
        // each sync on a node without domain rules.
        let want = if active {
            crate::fqdn::rules::servers(model, &self.cluster_dns, &self.resolved_services.frontends)
        } else {
            Default::default()
        };
        let r = m
            .set(&want.v4, &want.v6)
            .and_then(|()| m.set_active(active));
        if let Err(e) = r {
            error!("writing the cluster DNS servers: {e}");
        }
    }

    /// The addresses learned from DNS answers (`crate::fqdn`), as they are
    /// now: the `domainNames` peers follow them into the kernel. Returns
    /// once they are there.
    pub fn set_learned(
        &mut self,
        learned: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    ) -> Result<u64> {
        if learned == self.engine.model().learned {
            return Ok(self.programmed);
        }
        self.engine.set_learned(learned);
        self.reprogram()
    }

    /// The learned addresses an earlier agent left (before the first sync).
    pub fn preload_learned(
        &mut self,
        learned: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    ) {
        self.engine.set_learned(learned);
    }

    /// The resolved Services (frontends and rejections).
    pub fn resolved_services(&self) -> &crate::service_resolve::Resolved {
        &self.resolved_services
    }

    /// Writes what the engine changed into the kernel. A failed sync (e.g.
    /// a full map) is reported and counted; what was written stays
    /// consistent with `current`, and the next change retries the rest.
    pub fn reprogram(&mut self) -> Result<u64> {
        self.model_generation += 1;
        let view = self.engine.view();
        {
            let before = self.view.read().unwrap_or_else(|p| p.into_inner());
            for (k, why) in view.rejected.iter() {
                if !before.rejected.contains_key(k) {
                    error!("policy {k} rejected: {why}; every other policy stays enforced");
                    self.metrics.policy_rejections.inc();
                }
            }
            for (name, p) in view.cluster_policies.iter() {
                let Some(why) = p.rejected() else { continue };
                let was = before
                    .cluster_policies
                    .get(name)
                    .and_then(|b| b.rejected().map(str::to_string));
                if was.as_deref() != Some(why) {
                    error!(
                        "ClusterNetworkPolicy {name} rejected: {why}; every other policy stays enforced"
                    );
                    self.metrics.policy_rejections.inc();
                }
            }
        }
        let cluster_rejected = view
            .cluster_policies
            .values()
            .filter(|p| p.rejected().is_some())
            .count();
        self.metrics
            .policies_rejected
            .set((view.rejected.len() + cluster_rejected) as u64);

        let touched = self.engine.take_touched();
        let t = Instant::now();
        let r = if self.full_sync {
            sync::apply(&mut self.dp, &mut self.current, self.engine.desired())
        } else {
            sync::apply_touched(
                &mut self.dp,
                &mut self.current,
                self.engine.desired(),
                &touched,
            )
        };
        self.metrics.sync_seconds.observe(t.elapsed().as_secs_f64());
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
        self.sync_routes();
        self.refresh_fqdn();
        match r {
            Ok(_) => {
                self.full_sync = false;
                self.unwritten = false;
                self.programmed += 1;
                self.ready = true;
                self.generation_tx.send_replace(self.programmed);
                self.metrics.programmed_generation.set(self.programmed);
                Ok(self.programmed)
            }
            Err(e) => {
                // What was not written is tried again with the next change.
                self.engine.retouch(touched);
                self.unwritten = true;
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
    /// Returns only when the pod's policy is in the kernel. A refusal is
    /// logged and counted by kind (the CNI plugin gets the error).
    pub fn register(&mut self, r: Registration) -> Result<(u32, u64)> {
        let who = format!("{}/{} ({})", r.namespace, r.pod, r.addresses());
        let res = self.register_endpoint(r);
        if let Err(e) = &res {
            let kind = crate::error::kind_of(e);
            warn!("registration of {who} refused ({kind}): {e:#}");
            self.metrics.registration_refusals.inc(kind.as_str());
        }
        res
    }

    fn register_endpoint(&mut self, r: Registration) -> Result<(u32, u64)> {
        validate(&r)?;
        self.check_pool(&r)?;
        let ifindex = self.dp.ifindex(&r.host_ifname).with_context(|| {
            format!(
                "host interface {} of {}/{}",
                r.host_ifname, r.namespace, r.pod
            )
        })?;
        self.dp
            .check_pod_link(&r.host_ifname, &r.netns, &r.ifname)
            .map_err(|e| {
                refuse(
                    ErrorKind::InvalidRequest,
                    format!("{}/{}: {e:#}", r.namespace, r.pod),
                )
            })?;
        self.settle_claims(&r, ifindex)?;
        let endpoint_id = self.registry.id_for(&r.container_id);
        let previous = self.registry.get(&r.container_id).cloned();
        let entry = Entry {
            registration: r.clone(),
            endpoint_id,
            ifindex,
        };
        self.registry
            .insert(entry.clone())
            .context("saving endpoint registry")?;

        let t0 = Instant::now();
        let mut t_attach = t0;
        // A re-ADD may have given the interface another address.
        self.gateways.remove(&ifindex);
        self.refresh_gateways();
        self.engine.add_endpoint(local_endpoint(&entry));
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
        if programmed.is_ok() {
            self.metrics
                .registration_program_seconds
                .observe((t_attach - t0).as_secs_f64());
            self.metrics
                .registration_attach_seconds
                .observe(t_attach.elapsed().as_secs_f64());
        }
        match programmed {
            Ok(g) => {
                info!(
                    "registered {}/{} ({}, {}) as endpoint {endpoint_id} in {:?} (program {:?}, attach {:?})",
                    r.namespace,
                    r.pod,
                    r.addresses(),
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
                    Some(p) => {
                        self.engine.add_endpoint(local_endpoint(&p));
                        self.registry.insert(p)
                    }
                    None => {
                        self.engine.remove_endpoint(&r.container_id);
                        self.registry.remove(&r.container_id).map(|_| ())
                    }
                };
                let _ = self.reprogram();
                Err(e)
            }
        }
    }

    /// Another container's registration of the same address or interface.
    /// A stale one (its interface is gone or was recreated: a DEL that never
    /// arrived) is forgotten; a live one is a conflict, never overwritten,
    /// or one pod could take over another's address and its policy.
    /// Where this node's pod ranges are known (its Node object), a pod's
    /// address comes from them: a registration cannot claim another node's
    /// pod, a Service or a node address.
    /// Each address against the node's pod ranges of its family, where
    /// the Node object gives any.
    fn check_pool(&self, r: &Registration) -> Result<()> {
        let Some(node) = self
            .node_name
            .as_deref()
            .and_then(|n| self.engine.model().nodes.get(n))
        else {
            return Ok(());
        };
        let outside = |ip: String, ranges: Vec<String>| {
            Err(refuse(
                ErrorKind::InvalidRequest,
                format!(
                    "{}/{}: {ip} is outside node {}'s pod ranges {}",
                    r.namespace,
                    r.pod,
                    node.name,
                    ranges.join(", ")
                ),
            ))
        };
        let (v4, v6) = (&node.pod_cidrs, &node.pod_cidrs6);
        if let Some(ip) = r.ipv4 {
            if !v4.is_empty() && !v4.iter().any(|c| c.contains(ip)) {
                return outside(ip.to_string(), v4.iter().map(|c| c.to_string()).collect());
            }
        }
        if let Some(ip) = r.ipv6 {
            if !v6.is_empty() && !v6.iter().any(|c| c.contains(ip)) {
                return outside(ip.to_string(), v6.iter().map(|c| c.to_string()).collect());
            }
        }
        Ok(())
    }

    fn settle_claims(&mut self, r: &Registration, ifindex: u32) -> Result<()> {
        let others: Vec<Entry> = self
            .registry
            .iter()
            .filter(|e| e.registration.container_id != r.container_id)
            .filter(|e| {
                let o = &e.registration;
                (o.ipv4.is_some() && o.ipv4 == r.ipv4)
                    || (o.ipv6.is_some() && o.ipv6 == r.ipv6)
                    || e.registration.host_ifname == r.host_ifname
                    || e.ifindex == ifindex
            })
            .cloned()
            .collect();
        for e in others {
            let o = &e.registration;
            if self.interface_live(&e) {
                return Err(refuse(
                    ErrorKind::Conflict,
                    format!(
                        "{}/{} ({}, {}) is registered for container {} whose interface {} is still there",
                        o.namespace, o.pod, o.addresses(), o.host_ifname, o.container_id, o.host_ifname
                    ),
                ));
            }
            warn!(
                "forgetting stale endpoint {}/{} (container {}, {}): its interface is gone and {}/{} claims its address or interface",
                o.namespace, o.pod, o.container_id, o.host_ifname, r.namespace, r.pod
            );
            self.deregister(&o.container_id)?;
        }
        Ok(())
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
        self.engine.remove_endpoint(container_id);
        self.refresh_gateways();
        info!(
            "deregistered {}/{} (endpoint {})",
            e.registration.namespace, e.registration.pod, e.endpoint_id
        );
        self.reprogram()
    }

    pub fn status(&self) -> StatusReport {
        let view = self.engine.view();
        let gc = self.conntrack_fill.last();
        let charge = |id: u32| {
            let p = gc.as_ref()?;
            let c = p
                .charges
                .binary_search_by_key(&id, |(i, _)| *i)
                .map_or_else(|_| Default::default(), |i| p.charges[i].1);
            Some(palisade_api::ConntrackCharge {
                entries: c.entries,
                fragments: c.fragments,
                budget_spent: p.over_budget.iter().any(|(i, _)| *i == id),
            })
        };
        let endpoints = self
            .engine
            .model()
            .endpoints
            .values()
            .map(|le| {
                let info = self.current.endpoints.get(&le.ifindex).copied().unwrap_or(
                    palisade_common::EndpointInfo {
                        endpoint_id: le.endpoint_id,
                        identity: 0,
                        ipv4: 0,
                        flags: 0,
                        generation: 0,
                        mac: [0; 6],
                        _pad: [0; 2],
                        ipv6: [0; 4],
                    },
                );
                let ipv6 = self
                    .registry
                    .get(&le.container_id)
                    .and_then(|e| e.registration.ipv6);
                let ingress_enforced = info.flags & EP_INGRESS_ENFORCED != 0;
                let egress_enforced = info.flags & EP_EGRESS_ENFORCED != 0;
                EndpointStatus {
                    namespace: le.key.namespace.to_string(),
                    pod: le.key.name.to_string(),
                    endpoint_id: le.endpoint_id,
                    ipv4: le.ipv4,
                    host_ifname: le.host_ifname.clone(),
                    identity: info.identity,
                    ingress_enforced,
                    egress_enforced,
                    audit: info.flags & EP_AUDIT != 0,
                    conntrack: charge(le.endpoint_id),
                    ipv6,
                    ipv6_datapath: ipv6
                        .map(|_| ipv6_datapath(ingress_enforced || egress_enforced).to_string()),
                }
            })
            .collect();
        let policies = view
            .policies
            .iter()
            .map(|(k, rejected)| PolicyStatus {
                namespace: k.namespace.to_string(),
                name: k.name.to_string(),
                rejected: rejected.clone(),
            })
            .collect();
        StatusReport {
            programmed_generation: self.programmed,
            model_generation: self.model_generation,
            endpoints,
            identities: view.identities.len(),
            policies,
            maps: self.map_fill(),
            audit: view.audit,
            cluster_policies: crate::compiler::tiers::cluster_status(self.engine.model()),
            services: service_status(&self.resolved_services.frontends),
            service_rejections: self
                .resolved_services
                .rejections
                .iter()
                .map(|r| r.to_string())
                .collect(),
            services_error: self.services_error.clone(),
            nodes: crate::node_status::nodes(self.engine.model(), self.node_name.as_deref()),
            routing: self
                .routes
                .as_ref()
                .map(|r| r.status.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            domains: self.domain_status(),
        }
    }

    /// The learned names for `status`.
    fn domain_status(&self) -> Vec<palisade_api::DomainStatus> {
        let Some(c) = &self.learned else {
            return Vec::new();
        };
        let now = crate::fqdn::snoop::now_ms();
        let c = c.lock().unwrap_or_else(|p| p.into_inner());
        c.entries()
            .iter()
            .map(|(name, addrs)| palisade_api::DomainStatus {
                name: name.clone(),
                addresses: addrs
                    .iter()
                    .map(|(a, e)| (*a, e.saturating_sub(now) / 1000))
                    .collect(),
            })
            .collect()
    }

    /// The learned-address cache the DNS task keeps (for `status`).
    pub fn set_learned_cache(&mut self, c: crate::fqdn::snoop::SharedCache) {
        self.learned = Some(c);
    }

    /// Fill levels: endpoint, ipcache and policy from the mirror,
    /// conntrack from the GC task's last pass (no map walk here).
    pub fn map_fill(&self) -> Vec<MapFill> {
        let s = self.dp.sizes();
        let last = self.conntrack_fill.last();
        let (ct, ct_max) = last
            .as_ref()
            .map_or((0, s.conntrack), |p| (p.conntrack_entries, p.conntrack_max));
        let (frags, frags_max) = last
            .as_ref()
            .map_or((0, s.fragments), |p| (p.fragment_entries, p.fragment_max));
        vec![
            fill(
                "endpoints",
                self.current.endpoints.len() as u64 * 2,
                s.endpoints,
            ),
            fill("ipcache", self.current.ipcache.len() as u64, s.ipcache),
            fill("policy", self.current.policy.len() as u64, s.policy),
            fill("conntrack", ct, ct_max),
            fill("fragments", frags, frags_max),
        ]
    }

    /// A conntrack GC with map handles of its own, for a task of its own,
    /// and where it publishes each pass for `map_fill`.
    pub fn conntrack_gc(&self) -> Result<(ConntrackGc, ConntrackFill)> {
        let pins = self
            .dp
            .pins()
            .ok_or_else(|| anyhow!("this dataplane has no pinned maps"))?;
        let gc = ConntrackGc::open(pins)
            .context("opening the conntrack maps")?
            .with_budget(self.conntrack_budget);
        Ok((gc, self.conntrack_fill.clone()))
    }

    /// The conntrack fill as of the GC's last pass, readable without the
    /// agent.
    pub fn conntrack_fill(&self) -> ConntrackFill {
        self.conntrack_fill.clone()
    }

    /// The kernel counters, readable without the agent (for /metrics).
    pub fn stats_reader(&self) -> Option<StatsReader> {
        self.dp.stats_reader()
    }

    pub fn current(&self) -> &MapState {
        &self.current
    }

    /// The model as the engine holds it (source view plus local endpoints).
    pub fn model(&self) -> &Model {
        self.engine.model()
    }

    /// The published view (names for the flow log, trace and status).
    pub fn view(&self) -> Arc<View> {
        self.engine.view()
    }

    /// The engine (model and NetworkPolicy state), for explanations.
    pub(crate) fn engine(&self) -> &crate::compiler::Engine {
        &self.engine
    }
}

/// A registry entry as the engine's local endpoint.
/// Frontends grouped by Service, for `status`.
fn service_status(frontends: &[crate::service::Frontend]) -> Vec<palisade_api::ServiceStatus> {
    let mut by: std::collections::BTreeMap<&crate::model::ObjectKey, Vec<_>> = Default::default();
    for f in frontends {
        by.entry(&f.service)
            .or_default()
            .push(palisade_api::FrontendStatus {
                frontend: format!(
                    "{}/{}",
                    f.address,
                    crate::service_resolve::protocol_name(f.protocol)
                ),
                port_name: f.port_name.clone(),
                backends: f.backends.len(),
            });
    }
    by.into_iter()
        .map(|(k, frontends)| palisade_api::ServiceStatus {
            namespace: k.namespace.to_string(),
            name: k.name.to_string(),
            frontends,
        })
        .collect()
}

fn local_endpoint(e: &Entry) -> LocalEndpoint {
    let r = &e.registration;
    LocalEndpoint {
        key: ObjectKey::new(&r.namespace, &r.pod),
        endpoint_id: e.endpoint_id,
        ifindex: e.ifindex,
        host_ifname: r.host_ifname.clone(),
        // Unspecified for an IPv6-only pod (`validate` requires one of
        // the two).
        ipv4: r.ipv4.unwrap_or(Ipv4Addr::UNSPECIFIED),
        ipv6: r.ipv6,
        container_id: r.container_id.clone(),
        // (Checked by `validate` when it registered.)
        mac: r
            .mac
            .as_deref()
            .and_then(palisade_api::parse_mac)
            .unwrap_or_default(),
    }
}

/// What the datapath does with an endpoint's IPv6 (README, "IPv6
/// datapath"): the same policy as its IPv4.
pub(crate) fn ipv6_datapath(enforced: bool) -> &'static str {
    if enforced {
        "enforced as IPv4 (same rules; neighbour discovery on the link only)"
    } else {
        "not enforced (no policy selects the pod); source checked, router advertisements and redirects from it dropped"
    }
}

fn fill(name: &str, entries: u64, max: u32) -> MapFill {
    MapFill {
        name: name.into(),
        entries,
        max_entries: max as u64,
    }
}

#[cfg(test)]
mod tests;

/// Fields a registration must have before anything is looked up.
fn validate(r: &Registration) -> Result<()> {
    let bad = |why: String| Err(refuse(ErrorKind::InvalidRequest, why));
    let id_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 256
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    };
    if !id_ok(&r.container_id) {
        return bad(format!("invalid container id {:?}", r.container_id));
    }
    if r.namespace.is_empty() || r.pod.is_empty() {
        return bad("a registration needs the pod's namespace and name".into());
    }
    let ifname_ok = (1..=15).contains(&r.host_ifname.len())
        && !r
            .host_ifname
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control());
    if !ifname_ok {
        return bad(format!("invalid host interface name {:?}", r.host_ifname));
    }
    if let Some(ip) = r.ipv6 {
        let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || link_local {
            return bad(format!("{ip} cannot be a pod address"));
        }
    }
    match r.ipv4 {
        // IPv6-only: its endpoint has IPv4 address 0 (no by-address entry;
        // every IPv4 packet from it fails the source check) and its IPv6
        // address in the endpoint and ipcache6 maps.
        None if r.ipv6.is_none() => {
            return bad("a registration needs the pod's IPv4 or IPv6 address".into());
        }
        None => {}
        Some(ip)
            if ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || ip.is_broadcast() =>
        {
            return bad(format!("{ip} cannot be a pod address"));
        }
        Some(_) => {}
    }
    if let Some(m) = &r.mac {
        match palisade_api::parse_mac(m) {
            Some(b) if b != [0; 6] && b[0] & 1 == 0 => {}
            _ => return bad(format!("{m:?} is not a unicast MAC address")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod metrics_bind_tests {
    use super::metrics_bind;

    #[test]
    fn the_default_binds_the_node_address_or_loopback_never_everything() {
        let at = |arg, ip| metrics_bind(arg, ip).unwrap().map(|a| a.to_string());
        assert_eq!(
            at("node", Some("192.168.1.5")),
            Some("192.168.1.5:9962".into())
        );
        assert_eq!(at("node", None), Some("127.0.0.1:9962".into()));
        assert_eq!(at("node", Some("")), Some("127.0.0.1:9962".into()));
        assert_eq!(at("off", Some("192.168.1.5")), None);
        assert_eq!(at("0.0.0.0:9000", None), Some("0.0.0.0:9000".into()));
        assert!(metrics_bind("node", Some("nonsense")).is_err());
        assert!(metrics_bind("nonsense", None).is_err());
    }
}
