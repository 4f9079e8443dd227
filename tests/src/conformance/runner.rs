//! Runs cases: builds the cluster of each, applies its steps through the
//! manifest directory, probes every cell for real, compares.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    case::{case_files, Case, ExternalKind, Labels, Probe, Protocol, Relabel, Step, NAME_LABEL},
    cluster::{Cluster, Tools},
    dns,
    family::{self, Family, IpFamily},
    flows::{Flow, Tail},
    matrix::Reach,
    nodes,
    placeholder::Addresses,
    probe::{self, Job},
    services, signal,
};

/// The range pod addresses come from, in every case's own namespaces.
pub const SUBNET: &str = "10.213.0.0/24";

/// A case's cluster, built and running, with the labels as they are now.
pub struct Live<'a> {
    pub case: &'a Case,
    pub cluster: Cluster,
    pub namespaces: BTreeMap<String, Labels>,
    pub pod_labels: BTreeMap<String, Labels>,
    pub addresses: Addresses,
    /// Policy rejections the agent reported, already noted.
    pub rejected: BTreeMap<String, String>,
    /// `--via-services`: probes go to pods' ClusterIPs.
    pub via_services: bool,
    /// `--via-services`: (pod, family) -> its Service's ClusterIP of that
    /// family (probes over that family go there).
    pub service_ips: BTreeMap<(String, Family), IpAddr>,
    /// FORMAT v2 `cluster.dns`: where a name probe over a family sends its
    /// query (the DNS pod's address, or via services the kube-dns
    /// ClusterIP of that family).
    pub dns_servers: BTreeMap<Family, IpAddr>,
}

impl<'a> Live<'a> {
    /// Manifests for namespaces and pods, the agent, CNI ADD of every pod,
    /// pod addresses written back (as the kubelet would), servers, Sync.
    pub fn start(
        case: &'a Case,
        tools: &Tools,
        pin_parent: &Path,
        keep: Option<PathBuf>,
        via_services: bool,
    ) -> Result<Self> {
        Self::start_on(
            case,
            tools,
            pin_parent,
            keep,
            &Options {
                via_services,
                ..Options::default()
            },
        )
    }

    /// As [`Live::start`], on the nodes `opts` and the case call for.
    pub fn start_on(
        case: &'a Case,
        tools: &Tools,
        pin_parent: &Path,
        keep: Option<PathBuf>,
        opts: &Options,
    ) -> Result<Self> {
        let via_services = opts.via_services;
        let layout = nodes::Layout::of(case, opts.nodes)?;
        let mut cluster = match &layout {
            None => Cluster::new(&case.name, tools.clone(), pin_parent, SUBNET)?,
            Some(l) => Cluster::with_nodes(
                &case.name,
                tools.clone(),
                pin_parent,
                nodes::SUBNET,
                &l.nodes,
                &l.subnets,
                &opts.routing,
            )?,
        };
        if let Some(l) = &layout {
            cluster.placement = l.placement.clone();
        }
        cluster.keep = keep;
        cluster.set_family(opts.ip_family)?;
        let pod_labels: BTreeMap<String, Labels> = case
            .pods
            .iter()
            .map(|p| (p.key(), p.labels.clone()))
            .collect();
        cluster.cluster_dns = case.dns.as_ref().and_then(|d| d.agent_flag());
        for (name, labels) in &case.namespaces {
            cluster.write_namespace(name, labels)?;
        }
        cluster.write_nodes()?;
        for p in &case.pods {
            cluster.write_pod(p, &p.labels, None)?;
        }
        cluster.start_agent()?;
        for p in &case.pods {
            let node = cluster.placement.get(&p.key()).copied().unwrap_or(0);
            if p.host_network {
                cluster.add_host_pod(node, &p.namespace, &p.name)?;
            } else {
                cluster.add_pod_on(node, &p.namespace, &p.name)?;
            }
        }
        let addresses = Addresses {
            pods: cluster.addresses(),
            subnet: cluster.subnet.clone(),
            nodes: cluster.node_addresses(),
            nodes6: cluster.node_addresses6(),
            pods6: cluster.addresses6(),
            subnet6: cluster.subnet6.clone().unwrap_or_default(),
            family: opts.ip_family.placeholders(),
        };
        let sctp = probe::sctp_supported();
        for p in &case.pods {
            cluster.write_pod(p, &p.labels, Some(addresses.pods[&p.key()]))?;
            let mut ports: Vec<(u16, Protocol)> = p
                .ports
                .iter()
                .map(|q| (q.port, q.protocol))
                .filter(|(_, proto)| *proto != Protocol::Sctp || sctp)
                .collect();
            ports.sort();
            ports.dedup();
            if case.dns.as_ref().is_some_and(|d| d.key() == p.key()) {
                cluster.serve_dns(&p.key(), ports, Arc::new(zone(case, opts.ip_family)))?;
            } else {
                cluster.serve(&p.key(), ports)?;
            }
        }
        let hosts: Vec<(Ipv4Addr, Vec<(u16, Protocol)>)> = case
            .externals
            .hosts()
            .map(|(_, a, ports)| {
                let ports = ports
                    .iter()
                    .map(|q| (q.port, q.protocol))
                    .filter(|(_, proto)| *proto != Protocol::Sctp || sctp)
                    .collect();
                (a, ports)
            })
            .collect();
        cluster.add_external(&hosts)?;
        let mut dns_servers = BTreeMap::new();
        if let Some(d) = &case.dns {
            for f in [Family::V4, Family::V6] {
                if !opts.ip_family.has(f) {
                    continue;
                }
                let ip = match f {
                    Family::V4 => IpAddr::from(addresses.pods[&d.key()]),
                    Family::V6 => addresses
                        .pods6
                        .get(&d.key())
                        .copied()
                        .ok_or_else(|| anyhow!("the DNS pod {} has no IPv6 address", d.key()))?
                        .into(),
                };
                dns_servers.insert(f, ip);
            }
        }
        let mut service_ips = BTreeMap::new();
        if via_services {
            // The run's families, IPv4 first (a dual-stack Service's
            // primary family, as the API server orders `clusterIPs`).
            let families: Vec<Family> = [Family::V4, Family::V6]
                .into_iter()
                .filter(|f| opts.ip_family.has(*f))
                .collect();
            let mut ports: BTreeMap<Family, Vec<services::ServicePort>> = BTreeMap::new();
            for (i, p) in case.pods.iter().enumerate() {
                if p.host_network {
                    continue; // FORMAT: no Service; probed at its node's address
                }
                // (family, ClusterIP, the pod's address of that family)
                let mut per_family: Vec<(Family, IpAddr, IpAddr)> = Vec::new();
                for &f in &families {
                    let pod_ip = match f {
                        Family::V4 => IpAddr::from(addresses.pods[&p.key()]),
                        Family::V6 => addresses
                            .pods6
                            .get(&p.key())
                            .copied()
                            .ok_or_else(|| anyhow!("pod {} has no IPv6 address", p.key()))?
                            .into(),
                    };
                    per_family.push((f, services::cluster_ip_of(f, i), pod_ip));
                }
                let ips: Vec<IpAddr> = per_family.iter().map(|(_, ip, _)| *ip).collect();
                let Some(svc) = services::service_manifest(p, &ips) else {
                    continue; // serves nothing: no Service (probes to it fail either way)
                };
                let file = format!("svc-{}-{}.yaml", p.namespace, p.name);
                cluster.write_object(&file, &svc)?;
                for (f, ip, pod_ip) in per_family {
                    let slice = services::endpoint_slice_manifest(p, pod_ip)
                        .expect("a pod with a Service serves a port");
                    let file = match f {
                        Family::V4 => format!("eps-{}-{}.yaml", p.namespace, p.name),
                        Family::V6 => format!("eps6-{}-{}.yaml", p.namespace, p.name),
                    };
                    cluster.write_object(&file, &slice)?;
                    ports.entry(f).or_default().extend(services::service_ports(
                        p,
                        ip,
                        Some(pod_ip),
                    ));
                    service_ips.insert((p.key(), f), ip);
                }
            }
            // The cluster DNS's Service, kube-system/kube-dns, in front of
            // the DNS pod: name probes send their queries there.
            if let Some(dns) = &case.dns {
                let pod = case.pod(&dns.key()).expect("the DNS pod is a pod");
                let ips: Vec<IpAddr> = families.iter().map(|f| services::kube_dns_ip(*f)).collect();
                cluster.write_object(
                    "svc-kube-system-kube-dns.yaml",
                    &services::kube_dns_service(&ips),
                )?;
                for &f in &families {
                    let pod_ip = dns_servers[&f];
                    let file = match f {
                        Family::V4 => "eps-kube-system-kube-dns.yaml",
                        Family::V6 => "eps6-kube-system-kube-dns.yaml",
                    };
                    cluster.write_object(file, &services::kube_dns_slice(pod, pod_ip))?;
                    let ip = services::kube_dns_ip(f);
                    ports
                        .entry(f)
                        .or_default()
                        .extend(services::kube_dns_ports(ip, pod_ip));
                    dns_servers.insert(f, ip);
                }
            }
            for f in families {
                let range = match f {
                    Family::V4 => services::SERVICE_RANGE,
                    Family::V6 => services::SERVICE_RANGE6,
                };
                let rules = services::kube_proxy_rules(f, ports.get(&f).map_or(&[], Vec::as_slice));
                cluster.install_node_rules(f, &rules, range)?;
            }
        }
        if opts.ip_family != IpFamily::Ipv4 {
            cluster.wait_ipv6_ready(Duration::from_secs(10))?;
        }
        cluster.sync()?;
        cluster.wait_routes(Duration::from_secs(15))?;
        let mut endpoints = 0;
        for i in 0..cluster.nodes.len() {
            endpoints += cluster.status_on(i)?.endpoints.len();
        }
        let attached = case.pods.iter().filter(|p| !p.host_network).count();
        if endpoints != attached {
            bail!(
                "the agents know {endpoints} endpoints after {attached} CNI ADDs:\n{}",
                cluster.agent_log_tail(20)
            );
        }
        Ok(Self {
            case,
            cluster,
            namespaces: case.namespaces.clone(),
            pod_labels,
            addresses,
            rejected: BTreeMap::new(),
            via_services,
            service_ips,
            dns_servers,
        })
    }

    /// Deletions, then applications, then label changes, written to the
    /// manifest directory; then Sync. Returns notes (policies the agent
    /// rejected).
    pub fn apply(&mut self, step: &Step) -> Result<Vec<String>> {
        for (ns, name) in &step.delete {
            self.cluster.delete_policy(ns, name)?;
        }
        for p in &step.apply {
            let doc = self
                .addresses
                .substitute(&p.doc)
                .with_context(|| format!("policy {}", p.key()))?;
            self.cluster.write_policy(&p.namespace, &p.name, &doc)?;
        }
        for r in &step.relabel {
            match r {
                Relabel::Namespace { name, labels } => {
                    let mut labels = labels.clone();
                    // Set by the API server on every namespace; a label
                    // change cannot remove it.
                    labels.insert(NAME_LABEL.into(), name.clone());
                    self.cluster.write_namespace(name, &labels)?;
                    self.namespaces.insert(name.clone(), labels);
                }
                Relabel::Pod {
                    namespace,
                    name,
                    labels,
                } => {
                    let key = format!("{namespace}/{name}");
                    let spec = self.case.pod(&key).ok_or_else(|| anyhow!("no pod {key}"))?;
                    self.cluster
                        .write_pod(spec, labels, Some(self.addresses.pods[&key]))?;
                    self.pod_labels.insert(key, labels.clone());
                }
            }
        }
        self.cluster.sync()?;
        let mut notes = Vec::new();
        let status = self.cluster.status()?;
        let cluster = status.cluster_policies.into_iter().map(|c| {
            (
                format!("{}/{}", super::case::CLUSTER_POLICY, c.name),
                c.rejected,
            )
        });
        let namespaced = status
            .policies
            .into_iter()
            .map(|p| (format!("{}/{}", p.namespace, p.name), p.rejected));
        for (key, rejected) in namespaced.chain(cluster) {
            match rejected {
                Some(why) if self.rejected.get(&key) != Some(&why) => {
                    notes.push(format!("the agent rejected policy {key}: {why}"));
                    self.rejected.insert(key, why);
                }
                Some(_) => {}
                None => {
                    self.rejected.remove(&key);
                }
            }
        }
        Ok(notes)
    }

    pub fn ip(&self, key: &str) -> Ipv4Addr {
        self.addresses.pods[key]
    }

    /// A pod's address of family `f` (unspecified when it has none).
    pub fn ip_of(&self, key: &str, f: Family) -> IpAddr {
        match f {
            Family::V4 => self.ip(key).into(),
            Family::V6 => self
                .addresses
                .pods6
                .get(key)
                .copied()
                .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED)
                .into(),
        }
    }

    /// The probe of `dst` from `src` over family `f`.
    pub fn job_over(
        &self,
        src: &str,
        dst: &str,
        port: u16,
        protocol: Protocol,
        f: Family,
    ) -> Result<Job> {
        if is_name(dst) {
            return self.name_job(src, dst, port, protocol, f);
        }
        if f == Family::V4 {
            return self.job(src, dst, port, protocol);
        }
        // Host-network pods are refused with IPv6 at start.
        let s = self
            .cluster
            .pod(src)
            .ok_or_else(|| anyhow!("no pod {src}"))?;
        let to = match self.service_ip(dst, f) {
            Some(ip) => ip,
            None => self
                .addresses
                .pods6
                .get(dst)
                .copied()
                .ok_or_else(|| anyhow!("pod {dst} has no IPv6 address to probe"))?
                .into(),
        };
        Ok(Job {
            src_netns: s.netns_path(),
            dst: to,
            port,
            protocol,
            resolve: None,
        })
    }

    /// Where a probe over `f` to `dst` goes via services: the pod's
    /// ClusterIP of that family; for a pod without a Service (it serves no
    /// port) an address in the range that no rule serves, which the node
    /// refuses. None without `--via-services` and for a host-network pod
    /// (probed at its node's address).
    pub fn service_ip(&self, dst: &str, f: Family) -> Option<IpAddr> {
        let host_network = self.case.pod(dst).is_some_and(|p| p.host_network);
        if !self.via_services || host_network {
            return None;
        }
        Some(
            self.service_ips
                .get(&(dst.to_string(), f))
                .copied()
                .unwrap_or(services::cluster_ip_of(f, 65000)),
        )
    }

    /// The probe of the host named `name` from `src` over family `f`:
    /// the name resolved from inside `src` (A or AAAA), then the address.
    pub fn name_job(
        &self,
        src: &str,
        name: &str,
        port: u16,
        protocol: Protocol,
        f: Family,
    ) -> Result<Job> {
        let s = self
            .cluster
            .pod(src)
            .ok_or_else(|| anyhow!("no pod {src}"))?;
        let server = *self
            .dns_servers
            .get(&f)
            .ok_or_else(|| anyhow!("{name}: no cluster DNS over {f}"))?;
        Ok(Job {
            src_netns: s.netns_path(),
            dst: match f {
                Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
                Family::V6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
            },
            port,
            protocol,
            resolve: Some(probe::Resolve {
                name: name.to_string(),
                server,
                qtype: match f {
                    Family::V4 => dns::TYPE_A,
                    Family::V6 => dns::TYPE_AAAA,
                },
            }),
        })
    }

    /// The addresses a probe over `f` to `dst` is known by: the pod's,
    /// and via services the ClusterIP it went to; for a name, the host's
    /// address (none for a name the case does not list).
    pub fn probed(&self, dst: &str, f: Family) -> Vec<IpAddr> {
        if is_name(dst) {
            return self
                .case
                .externals
                .host(dst)
                .map(|(a, _)| match f {
                    Family::V4 => IpAddr::from(a),
                    Family::V6 => family::mirror(a).into(),
                })
                .into_iter()
                .collect();
        }
        let mut out = vec![self.ip_of(dst, f)];
        out.extend(self.service_ip(dst, f));
        out
    }

    pub fn job(&self, src: &str, dst: &str, port: u16, protocol: Protocol) -> Result<Job> {
        let s = self
            .cluster
            .pod(src)
            .ok_or_else(|| anyhow!("no pod {src}"))?;
        let to = self
            .service_ip(dst, Family::V4)
            .unwrap_or_else(|| self.ip(dst).into());
        Ok(Job {
            src_netns: s.netns_path(),
            dst: to,
            port,
            protocol,
            resolve: None,
        })
    }
}

/// A matrix column that names a host outside the cluster (FORMAT v2: no
/// `/`), not a pod.
pub fn is_name(dst: &str) -> bool {
    !dst.contains('/')
}

/// The cluster DNS's names: every `cluster.external` entry, AAAA (the
/// mirror) too when the run gives pods IPv6.
pub fn zone(case: &Case, run: IpFamily) -> dns::Zone {
    let mut z = dns::Zone::new(run != IpFamily::Ipv4);
    for e in &case.externals.0 {
        match &e.kind {
            ExternalKind::Host { address, .. } => z.add_a(&e.name, *address, e.ttl),
            ExternalKind::Cname(t) => z.add_cname(&e.name, t, e.ttl),
        }
    }
    z
}

/// One observed cell of a step, over one family.
#[derive(Clone, Debug)]
pub struct Cell {
    pub probe: usize,
    pub src: String,
    pub dst: String,
    pub expected: Reach,
    /// None: skipped (protocol not available).
    pub saw: Option<Reach>,
    pub family: Family,
    /// A name column: why the name did not resolve (None: it did, or the
    /// column is a pod).
    pub unresolved: Option<String>,
}

/// Probes every cell of a step's probes at once, over each family the
/// run and the case call for ([`family::probe_families`]): a cell holds
/// when it holds over every family probed. SCTP cells are skipped when
/// the kernel has no SCTP; a probe pinned to a family the run lacks
/// yields no cell (it is counted as skipped by [`plan`]).
pub fn probe_step(live: &Live, probes: &[Probe], sctp: bool, parallel: usize) -> Result<Vec<Cell>> {
    probe_step_over(live, probes, sctp, parallel, IpFamily::Ipv4)
}

pub fn probe_step_over(
    live: &Live,
    probes: &[Probe],
    sctp: bool,
    parallel: usize,
    run: IpFamily,
) -> Result<Vec<Cell>> {
    let mut cells = Vec::new();
    let mut jobs = Vec::new();
    let mut index = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        for f in family::probe_families(run, p.family, live.case.address_peers) {
            for (src, dst, expected) in p.expect.cells() {
                let cell = Cell {
                    probe: i,
                    src: src.into(),
                    dst: dst.into(),
                    expected,
                    saw: None,
                    family: f,
                    unresolved: None,
                };
                if p.protocol == Protocol::Sctp && !sctp {
                    cells.push(cell);
                    continue;
                }
                index.push(cells.len());
                jobs.push(live.job_over(src, dst, p.port, p.protocol, f)?);
                cells.push(cell);
            }
        }
    }
    let results = probe::run_all_detailed(&jobs, parallel)?;
    for (i, (ok, to)) in index.into_iter().zip(results) {
        cells[i].saw = Some(Reach::from_bool(ok));
        cells[i].unresolved = to.err();
    }
    Ok(cells)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// Every probe of the case needs what this kernel lacks (SCTP).
    Skip,
}

#[derive(Debug)]
pub struct Report {
    pub name: String,
    pub outcome: Outcome,
    /// Mismatches, errors, notes: printed under the verdict line.
    pub lines: Vec<String>,
    pub steps: usize,
    pub probes: usize,
    pub skipped: usize,
    pub elapsed: Duration,
    /// Probes pinned to a family this run gives pods no address of.
    pub skipped_family: usize,
    pub ip_family: IpFamily,
}

impl Report {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let verdict = match self.outcome {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        };
        let _ = writeln!(out, "{verdict} {}", self.name);
        for l in &self.lines {
            let _ = writeln!(out, "  {l}");
        }
        let mut summary = format!(
            "  ({} steps, {} probes, {:.1} s",
            self.steps,
            self.probes - self.skipped - self.skipped_family,
            self.elapsed.as_secs_f64()
        );
        if self.skipped > 0 {
            let _ = write!(
                summary,
                "; {} SCTP probes skipped: this kernel cannot open SCTP sockets",
                self.skipped
            );
        }
        if self.skipped_family > 0 {
            let _ = write!(
                summary,
                "; {}",
                family_skips(self.skipped_family, self.ip_family)
            );
        }
        out.push_str(&summary);
        out.push_str(")\n");
        out
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub parallel: usize,
    /// Copy each case's logs and manifests below this directory.
    pub keep: Option<PathBuf>,
    /// Print the agent's warnings under failures.
    pub verbose: bool,
    /// Cases that need a FORMAT version 2 feature not implemented yet are
    /// reported as skipped (with what they need) instead of failed.
    pub skip_unsupported: bool,
    /// Probe every pod through its own ClusterIP Service (FORMAT v2).
    pub via_services: bool,
    /// `--nodes N` (FORMAT v2): simulated nodes when the case does not
    /// list its own.
    pub nodes: usize,
    /// How the agents route between nodes: native or vxlan.
    pub routing: String,
    /// `--ip-family` (FORMAT v2): which addresses pods get and which
    /// families probes run over.
    pub ip_family: IpFamily,
}

impl Options {
    /// The first line a run prints (FORMAT: the options it ran with).
    pub fn line(&self) -> String {
        format!(
            "conformance options: parallel={} via-services={} nodes={} routing={} ip-family={} skip-unsupported={}{}",
            self.parallel,
            self.via_services,
            self.nodes,
            self.routing,
            self.ip_family,
            self.skip_unsupported,
            self.keep
                .as_ref()
                .map(|k| format!(" keep={}", k.display()))
                .unwrap_or_default()
        )
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            parallel: 96,
            keep: None,
            verbose: false,
            skip_unsupported: false,
            via_services: false,
            nodes: 1,
            routing: "native".into(),
            ip_family: IpFamily::Ipv4,
        }
    }
}

/// The skipped-probe note for probes pinned to a family `run` lacks.
fn family_skips(n: usize, run: IpFamily) -> String {
    format!("{n} probes skipped: pinned to a family --ip-family {run} gives pods no address of")
}

/// How many probe attempts a case makes under `run` (cells times the
/// families each is probed over), how many of them are SCTP ones the
/// kernel cannot carry, and how many cells are pinned to a family the
/// run lacks.
pub fn plan(case: &Case, run: IpFamily, sctp: bool) -> (usize, usize, usize) {
    let (mut all, mut sctp_skipped, mut family_skipped) = (0, 0, 0);
    for p in case.steps.iter().flat_map(|s| &s.probes) {
        let cells = p.expect.cells().count();
        let fams = family::probe_families(run, p.family, case.address_peers).len();
        if fams == 0 {
            all += cells;
            family_skipped += cells;
            continue;
        }
        all += cells * fams;
        if p.protocol == Protocol::Sctp && !sctp {
            sctp_skipped += cells * fams;
        }
    }
    (all, sctp_skipped, family_skipped)
}

/// How the flow log explains one mismatching cell (records to any of
/// `dsts`: the pod's address, and its ClusterIP via services, which the
/// source's egress may record before translation).
fn explain(
    flows: &[Flow],
    src: IpAddr,
    dsts: &[IpAddr],
    port: u16,
    proto: Protocol,
) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for f in flows
        .iter()
        .filter(|f| dsts.iter().any(|d| f.is(src, *d, port, proto.as_str())))
    {
        let d = f.describe();
        if !seen.contains(&d) {
            seen.push(d);
        }
    }
    if seen.is_empty() {
        seen.push("no flow record for this connection".into());
    }
    seen
}

/// Runs one case to its report. Errors while building the cluster or
/// applying a step fail the case with the error; cleanup always runs.
pub fn run_case(
    case: &Case,
    tools: &Tools,
    pin_parent: &Path,
    sctp: bool,
    opts: &Options,
) -> Report {
    let started = Instant::now();
    let run = opts.ip_family;
    let (all, skipped, skipped_family) = plan(case, run, sctp);
    let mut report = Report {
        name: case.name.clone(),
        outcome: Outcome::Pass,
        lines: Vec::new(),
        steps: case.steps.len(),
        probes: all,
        skipped,
        elapsed: Duration::ZERO,
        skipped_family,
        ip_family: run,
    };
    if all > 0 && skipped + skipped_family == all {
        report.outcome = Outcome::Skip;
        return report;
    }
    if run == IpFamily::Dual && case.address_peers {
        report.lines.push(
            "probed over IPv4 only: the case has an ipBlock or networks peer (FORMAT, --ip-family dual)".into(),
        );
    }
    let keep = opts.keep.as_ref().map(|k| {
        k.join(
            case.file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| case.name.clone()),
        )
    });
    let mut live = None;
    let r = (|| -> Result<()> {
        let l = live.insert(Live::start_on(case, tools, pin_parent, keep, opts)?);
        for (i, step) in case.steps.iter().enumerate() {
            signal::check()?;
            let mut tails: Vec<Tail> = l.cluster.flow_logs().iter().map(|f| Tail::new(f)).collect();
            let notes = l.apply(step).with_context(|| format!("step {}", i + 1))?;
            report.lines.extend(
                notes
                    .into_iter()
                    .map(|n| format!("step {}: note: {n}", i + 1)),
            );
            signal::check()?;
            let cells = probe_step_over(l, &step.probes, sctp, opts.parallel, run)?;
            let bad: Vec<&Cell> = cells
                .iter()
                .filter(|c| c.saw.is_some_and(|s| s != c.expected))
                .collect();
            if bad.is_empty() {
                continue;
            }
            report.outcome = Outcome::Fail;
            // The records of the mismatching connections, for the reader
            // (every node's flow log: a probe may be judged at both ends).
            let mut flows = Vec::new();
            let wait = Duration::from_millis(2000 / tails.len().max(1) as u64);
            for t in &mut tails {
                flows.extend(t.gather(wait, |fs| {
                    bad.iter().all(|c| {
                        let p = &step.probes[c.probe];
                        let (s, ds) = (l.ip_of(&c.src, c.family), l.probed(&c.dst, c.family));
                        fs.iter()
                            .any(|f| ds.iter().any(|d| f.is(s, *d, p.port, p.protocol.as_str())))
                    })
                }));
            }
            for c in bad {
                let p = &step.probes[c.probe];
                // Which family, whenever a run has more than IPv4.
                let over = if run == IpFamily::Ipv4 {
                    String::new()
                } else {
                    format!(" over {}", c.family)
                };
                report.lines.push(format!(
                    "step {} {}/{} {} -> {}: expected {}, saw {}{over}",
                    i + 1,
                    p.protocol,
                    p.port,
                    c.src,
                    c.dst,
                    c.expected,
                    c.saw.expect("probed")
                ));
                if let Some(why) = &c.unresolved {
                    report.lines.push(format!("    dns: {why}"));
                    // The queries' records (to the DNS pod, or its ClusterIP).
                    let s = l.ip_of(&c.src, c.family);
                    let mut ds: Vec<IpAddr> =
                        l.dns_servers.get(&c.family).copied().into_iter().collect();
                    if let Some(d) = &l.case.dns {
                        ds.push(l.ip_of(&d.key(), c.family));
                    }
                    for e in explain(&flows, s, &ds, 53, Protocol::Udp) {
                        report.lines.push(format!("    flow: {e}"));
                    }
                    continue;
                }
                let (s, ds) = (l.ip_of(&c.src, c.family), l.probed(&c.dst, c.family));
                for e in explain(&flows, s, &ds, p.port, p.protocol) {
                    report.lines.push(format!("    flow: {e}"));
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = r {
        report.outcome = Outcome::Fail;
        report.lines.push(format!("error: {e:#}"));
        if let Some(l) = live.as_mut() {
            if let Some(st) = l.cluster.agent_exit() {
                report
                    .lines
                    .push(format!("the agent exited ({st}); the end of its log:"));
                report
                    .lines
                    .extend(l.cluster.agent_log_tail(15).lines().map(str::to_string));
            }
        }
    }
    if let Some(l) = live.as_mut() {
        if report.outcome == Outcome::Fail && opts.verbose {
            let log = l.cluster.agent_log();
            let warn: Vec<&str> = log
                .lines()
                .filter(|x| x.contains("WARN") || x.contains("ERROR"))
                .collect();
            for w in &warn[warn.len().saturating_sub(20)..] {
                report.lines.push(format!("    agent: {w}"));
            }
        }
        for e in l.cluster.teardown() {
            report.lines.push(format!("cleanup: {e}"));
        }
    }
    report.elapsed = started.elapsed();
    report
}

/// What a whole run found.
#[derive(Debug, Default)]
pub struct Totals {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub skipped_probes: usize,
    pub interrupted: bool,
    /// Probes pinned to a family the run lacks.
    pub skipped_family_probes: usize,
}

impl Totals {
    pub fn line(&self) -> String {
        let mut l = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 || self.skipped_probes > 0 || self.skipped_family_probes > 0 {
            let _ = write!(l, ", {} skipped", self.skipped);
        }
        l
    }
}

/// Prints to stdout; when nobody reads any more (closed pipe), the run
/// stops as if interrupted, and still cleans up.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        signal::request_stop();
    }
}

/// Runs every case of every directory (or file) in `paths` whose name or
/// file contains one of `filters` (all when empty), printing as it goes;
/// the last line is `N passed, M failed[, K skipped]`.
pub fn run_paths(paths: &[PathBuf], filters: &[String], opts: &Options) -> Result<Totals> {
    say(&format!("{}\n", opts.line()));
    let tools = Tools::locate()?;
    crate::ensure_bpffs()?;
    for r in signal::reap_leftovers() {
        eprintln!("removed a leftover of an earlier, killed run: {r}");
    }
    let pins = signal::RunPins::create()?;
    let sctp = probe::sctp_supported();
    let mut totals = Totals::default();
    for dir in paths {
        let files = case_files(dir)?;
        if files.is_empty() {
            bail!("no case files (*.yaml) in {}", dir.display());
        }
        for f in files {
            if signal::interrupted() {
                totals.interrupted = true;
                return Ok(totals);
            }
            let case = match Case::load(&f) {
                Ok(c) => c,
                Err(e) => {
                    say(&format!("FAIL {}\n  cannot run: {e:#}\n", f.display()));
                    totals.failed += 1;
                    continue;
                }
            };
            let file = f.to_string_lossy();
            if !filters.is_empty()
                && !filters
                    .iter()
                    .any(|s| case.name.contains(s.as_str()) || file.contains(s.as_str()))
            {
                continue;
            }
            let why = case.unsupported.clone();
            if let Some(why) = &why {
                if opts.skip_unsupported {
                    say(&format!("SKIP {}\n  {why}\n", case.name));
                    totals.skipped += 1;
                } else {
                    say(&format!("FAIL {}\n  cannot run: {why}\n", case.name));
                    totals.failed += 1;
                }
                continue;
            }
            let report = run_case(&case, &tools, &pins.0, sctp, opts);
            if signal::interrupted() {
                totals.interrupted = true;
                say(&report.render().replacen("FAIL", "INTERRUPTED", 1));
                return Ok(totals);
            }
            say(&report.render());
            totals.skipped_probes += report.skipped;
            totals.skipped_family_probes += report.skipped_family;
            match report.outcome {
                Outcome::Pass => totals.passed += 1,
                Outcome::Fail => totals.failed += 1,
                Outcome::Skip => totals.skipped += 1,
            }
        }
    }
    drop(pins);
    if totals.skipped_probes > 0 {
        say(&format!(
            "{} SCTP probes skipped: this kernel cannot open SCTP sockets\n",
            totals.skipped_probes
        ));
    }
    if totals.skipped_family_probes > 0 {
        say(&format!(
            "{}\n",
            family_skips(totals.skipped_family_probes, opts.ip_family)
        ));
    }
    say(&format!("{}\n", totals.line()));
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_rendering() {
        let r = Report {
            name: "ports".into(),
            outcome: Outcome::Fail,
            lines: vec!["step 1 TCP/80 x/b -> y/a: expected X, saw .".into()],
            steps: 2,
            probes: 10,
            skipped: 2,
            elapsed: Duration::from_millis(2500),
            skipped_family: 0,
            ip_family: IpFamily::Ipv4,
        };
        assert_eq!(
            r.render(),
            "FAIL ports\n  step 1 TCP/80 x/b -> y/a: expected X, saw .\n  (2 steps, 8 probes, 2.5 s; 2 SCTP probes skipped: this kernel cannot open SCTP sockets)\n"
        );
        let t = Totals {
            passed: 3,
            failed: 1,
            ..Default::default()
        };
        assert_eq!(t.line(), "3 passed, 1 failed");
        let t = Totals {
            passed: 3,
            skipped: 1,
            ..Default::default()
        };
        assert_eq!(t.line(), "3 passed, 0 failed, 1 skipped");
        let v6 = Report {
            skipped: 0,
            skipped_family: 3,
            ip_family: IpFamily::Ipv4,
            lines: vec!["step 1 TCP/80 x/b -> y/a: expected X, saw . over IPv6".into()],
            ..r
        };
        assert!(v6.render().ends_with(
            "(2 steps, 7 probes, 2.5 s; 3 probes skipped: pinned to a family --ip-family ipv4 gives pods no address of)\n"
        ));
    }

    /// Attempts per family: the dual rule doubles the cells of a case
    /// without address peers, pinned probes count once or are skipped.
    #[test]
    fn plans_attempts_per_family() {
        let text = "name: t
cluster: {pods: [{namespace: x, name: a}, {namespace: x, name: b}]}
steps:
  - probes:
      - {port: 80, expect: \"- x/a x/b\\nx/a . .\\nx/b . .\"}
      - {port: 80, family: ipv6, expect: \"- x/a\\nx/b .\"}
      - {port: 9, protocol: SCTP, expect: \"- x/a\\nx/b .\"}
";
        let case = Case::parse(text, Path::new("t.yaml")).unwrap();
        assert_eq!(plan(&case, IpFamily::Ipv4, true), (6, 0, 1));
        assert_eq!(plan(&case, IpFamily::Ipv4, false), (6, 1, 1));
        assert_eq!(plan(&case, IpFamily::Ipv6, true), (6, 0, 0));
        assert_eq!(plan(&case, IpFamily::Dual, true), (11, 0, 0));
        assert_eq!(plan(&case, IpFamily::Dual, false), (11, 2, 0));
        let blocks = format!(
            "{text}    apply: [{{kind: NetworkPolicy, metadata: {{name: p, namespace: x}}, spec: {{ingress: [{{from: [{{ipBlock: {{cidr: '{{{{subnet}}}}'}}}}]}}]}}}}]\n"
        );
        let case = Case::parse(&blocks, Path::new("t.yaml")).unwrap();
        assert!(case.address_peers);
        assert_eq!(
            plan(&case, IpFamily::Dual, true),
            (6, 0, 0),
            "IPv4 only, pinned IPv6 kept"
        );
    }
}
