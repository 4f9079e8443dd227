//! Runs cases: builds the cluster of each, applies its steps through the
//! manifest directory, probes every cell for real, compares.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    case::{case_files, Case, Labels, Probe, Protocol, Relabel, Step, NAME_LABEL},
    cluster::{Cluster, Tools},
    flows::{Flow, Tail},
    matrix::Reach,
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
    /// `--via-services`: pod -> its Service's ClusterIP (probes go there).
    pub service_ips: BTreeMap<String, Ipv4Addr>,
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
        let mut cluster = Cluster::new(&case.name, tools.clone(), pin_parent, SUBNET)?;
        cluster.keep = keep;
        let pod_labels: BTreeMap<String, Labels> = case
            .pods
            .iter()
            .map(|p| (p.key(), p.labels.clone()))
            .collect();
        for (name, labels) in &case.namespaces {
            cluster.write_namespace(name, labels)?;
        }
        for p in &case.pods {
            cluster.write_pod(p, &p.labels, None)?;
        }
        cluster.start_agent()?;
        for p in &case.pods {
            cluster.add_pod(&p.namespace, &p.name)?;
        }
        let addresses = Addresses {
            pods: cluster.addresses(),
            subnet: SUBNET.to_string(),
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
            cluster.serve(&p.key(), ports)?;
        }
        let mut service_ips = BTreeMap::new();
        if via_services {
            let mut ports = Vec::new();
            for (i, p) in case.pods.iter().enumerate() {
                let ip = services::cluster_ip(i);
                let pod_ip = addresses.pods[&p.key()];
                let (Some(svc), Some(slice)) = (
                    services::service_manifest(p, ip),
                    services::endpoint_slice_manifest(p, pod_ip),
                ) else {
                    continue; // serves nothing: no Service (probes to it fail either way)
                };
                let file = format!("svc-{}-{}.yaml", p.namespace, p.name);
                cluster.write_object(&file, &svc)?;
                cluster.write_object(&format!("eps-{}-{}.yaml", p.namespace, p.name), &slice)?;
                ports.extend(services::service_ports(p, ip, Some(pod_ip)));
                service_ips.insert(p.key(), ip);
            }
            cluster
                .install_node_rules(&services::kube_proxy_rules(&ports), services::SERVICE_RANGE)?;
        }
        cluster.sync()?;
        let status = cluster.status()?;
        if status.endpoints.len() != case.pods.len() {
            bail!(
                "the agent knows {} endpoints after {} CNI ADDs:\n{}",
                status.endpoints.len(),
                case.pods.len(),
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
            service_ips,
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

    pub fn job(&self, src: &str, dst: &str, port: u16, protocol: Protocol) -> Result<Job> {
        let s = self
            .cluster
            .pod(src)
            .ok_or_else(|| anyhow!("no pod {src}"))?;
        // Via services: the pod's ClusterIP; a pod without a Service (it
        // serves no port) is probed at the range, which the node refuses.
        let to = if self.service_ips.is_empty() {
            self.ip(dst)
        } else {
            self.service_ips
                .get(dst)
                .copied()
                .unwrap_or(services::cluster_ip(65000))
        };
        Ok(Job {
            src_netns: s.netns_path(),
            dst: to,
            port,
            protocol,
        })
    }
}

/// One observed cell of a step.
#[derive(Clone, Debug)]
pub struct Cell {
    pub probe: usize,
    pub src: String,
    pub dst: String,
    pub expected: Reach,
    /// None: skipped (protocol not available).
    pub saw: Option<Reach>,
}

/// Probes every cell of a step's probes at once. SCTP cells are skipped
/// when the kernel has no SCTP.
pub fn probe_step(live: &Live, probes: &[Probe], sctp: bool, parallel: usize) -> Result<Vec<Cell>> {
    let mut cells = Vec::new();
    let mut jobs = Vec::new();
    let mut index = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        for (src, dst, expected) in p.expect.cells() {
            if p.protocol == Protocol::Sctp && !sctp {
                cells.push(Cell {
                    probe: i,
                    src: src.into(),
                    dst: dst.into(),
                    expected,
                    saw: None,
                });
                continue;
            }
            index.push(cells.len());
            jobs.push(live.job(src, dst, p.port, p.protocol)?);
            cells.push(Cell {
                probe: i,
                src: src.into(),
                dst: dst.into(),
                expected,
                saw: None,
            });
        }
    }
    let results = probe::run_all(&jobs, parallel)?;
    for (i, ok) in index.into_iter().zip(results) {
        cells[i].saw = Some(Reach::from_bool(ok));
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
            self.probes - self.skipped,
            self.elapsed.as_secs_f64()
        );
        if self.skipped > 0 {
            let _ = write!(
                summary,
                "; {} SCTP probes skipped: this kernel cannot open SCTP sockets",
                self.skipped
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
}

impl Options {
    /// The first line a run prints (FORMAT: the options it ran with).
    pub fn line(&self) -> String {
        format!(
            "conformance options: parallel={} via-services={} skip-unsupported={}{}",
            self.parallel,
            self.via_services,
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
        }
    }
}

/// How the flow log explains one mismatching cell.
fn explain(
    flows: &[Flow],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    proto: Protocol,
) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for f in flows
        .iter()
        .filter(|f| f.is(src, dst, port, proto.as_str()))
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
    let (all, sctp_cells, steps) = case.cells();
    let skipped = if sctp { 0 } else { sctp_cells };
    let mut report = Report {
        name: case.name.clone(),
        outcome: Outcome::Pass,
        lines: Vec::new(),
        steps,
        probes: all,
        skipped,
        elapsed: Duration::ZERO,
    };
    if all > 0 && skipped == all {
        report.outcome = Outcome::Skip;
        return report;
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
        let l = live.insert(Live::start(
            case,
            tools,
            pin_parent,
            keep,
            opts.via_services,
        )?);
        for (i, step) in case.steps.iter().enumerate() {
            signal::check()?;
            let mut tail = l.cluster.agent.as_ref().map(|a| Tail::new(&a.flow_log));
            let notes = l.apply(step).with_context(|| format!("step {}", i + 1))?;
            report.lines.extend(
                notes
                    .into_iter()
                    .map(|n| format!("step {}: note: {n}", i + 1)),
            );
            signal::check()?;
            let cells = probe_step(l, &step.probes, sctp, opts.parallel)?;
            let bad: Vec<&Cell> = cells
                .iter()
                .filter(|c| c.saw.is_some_and(|s| s != c.expected))
                .collect();
            if bad.is_empty() {
                continue;
            }
            report.outcome = Outcome::Fail;
            // The records of the mismatching connections, for the reader.
            let flows = tail
                .as_mut()
                .map(|t| {
                    t.gather(Duration::from_secs(2), |fs| {
                        bad.iter().all(|c| {
                            let p = &step.probes[c.probe];
                            fs.iter().any(|f| {
                                f.is(l.ip(&c.src), l.ip(&c.dst), p.port, p.protocol.as_str())
                            })
                        })
                    })
                })
                .unwrap_or_default();
            for c in bad {
                let p = &step.probes[c.probe];
                report.lines.push(format!(
                    "step {} {}/{} {} -> {}: expected {}, saw {}",
                    i + 1,
                    p.protocol,
                    p.port,
                    c.src,
                    c.dst,
                    c.expected,
                    c.saw.expect("probed")
                ));
                for e in explain(&flows, l.ip(&c.src), l.ip(&c.dst), p.port, p.protocol) {
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
}

impl Totals {
    pub fn line(&self) -> String {
        let mut l = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 || self.skipped_probes > 0 {
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
            if let Some(why) = &case.unsupported {
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
    }
}
