//! Operator CLI helpers: argument types, filters and human-readable output.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use palisade_api::{
    CoverageReport, PreviewReport, PreviewRequest, StatusReport, TraceReport, VerifyReport,
    DEFAULT_SOCKET,
};

use crate::flowlog::{FlowRecord, Peer};

#[derive(Args, Debug)]
pub struct ObserveArgs {
    #[arg(long, default_value = DEFAULT_SOCKET, env = "PALISADE_SOCKET")]
    pub socket: PathBuf,
    /// Either side in this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Either side is this pod (name, or namespace/name).
    #[arg(long)]
    pub pod: Option<String>,
    /// Either side has this label (key=value); repeatable, all must hold.
    #[arg(long = "label", short = 'l')]
    pub labels: Vec<String>,
    /// ALLOW, DROP or AUDIT.
    #[arg(long)]
    pub verdict: Option<String>,
    /// Destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// TCP, UDP, SCTP, ICMP.
    #[arg(long)]
    pub protocol: Option<String>,
    /// Flows sent to this Service's ClusterIP (namespace/name).
    #[arg(long, visible_alias = "to-service")]
    pub service: Option<String>,
    /// Flows whose source is on this node (a pod of it, its address, or
    /// the node itself).
    #[arg(long)]
    pub from_node: Option<String>,
    /// Flows to an address learned for this domain name (egress by domain
    /// name; case-insensitive, a trailing dot ignored).
    #[arg(long)]
    pub domain: Option<String>,
    /// Flows of one address family: ipv4 or ipv6.
    #[arg(long, value_parser = ["ipv4", "ipv6"])]
    pub family: Option<String>,
    /// Keep streaming new flows.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Only flows recorded since: a duration ago (10m, 2h) or an RFC 3339
    /// time (read from the flow log files, not only the recent history).
    #[arg(long)]
    pub since: Option<String>,
    /// Summary: the N busiest dropped (source, destination, port) triples.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "10", conflicts_with = "follow")]
    pub top: Option<usize>,
}

/// One row of `observe --top`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TopDrop {
    pub source: String,
    pub destination: String,
    /// e.g. 5432/TCP
    pub port: String,
    pub drops: usize,
    /// The policies the drops were attributed to.
    pub policies: Vec<String>,
}

fn workload(p: &Peer) -> String {
    match (&p.namespace, &p.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => format!("{}({})", p.ip, p.kind),
    }
}

/// The `n` busiest dropped (source, destination, port) triples of
/// `records` (DROP verdicts, and AUDIT: drops audit mode let through).
pub fn top_drops<'a>(records: impl IntoIterator<Item = &'a FlowRecord>, n: usize) -> Vec<TopDrop> {
    let mut by: std::collections::BTreeMap<(String, String, String), TopDrop> = Default::default();
    for r in records {
        if r.verdict != "DROP" && r.verdict != "AUDIT" {
            continue;
        }
        // Drops without an IPv4 flow (IPv6, malformed frames) are named by
        // their reason instead.
        let port = match r.dst.port {
            Some(p) => format!("{p}/{}", r.protocol),
            None if r.protocol == "none" => r.reason.clone(),
            None => r.protocol.clone(),
        };
        let key = (workload(&r.src), workload(&r.dst), port);
        let e = by.entry(key.clone()).or_insert_with(|| TopDrop {
            source: key.0,
            destination: key.1,
            port: key.2,
            drops: 0,
            policies: Vec::new(),
        });
        e.drops += 1;
        for p in &r.policies {
            if !e.policies.contains(p) {
                e.policies.push(p.clone());
            }
        }
    }
    let mut v: Vec<TopDrop> = by.into_values().collect();
    v.sort_by(|a, b| b.drops.cmp(&a.drops).then_with(|| a.source.cmp(&b.source)));
    v.truncate(n);
    v
}

pub fn render_top(rows: &[TopDrop]) -> String {
    let mut s = format!(
        "{:>7}  {:<32} {:<32} {:<10} POLICIES\n",
        "DROPS", "SOURCE", "DESTINATION", "PORT"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:>7}  {:<32} {:<32} {:<10} {}",
            r.drops,
            r.source,
            r.destination,
            r.port,
            r.policies.join(", ")
        );
    }
    s
}

#[derive(Debug, Default)]
pub struct Filter {
    namespace: Option<String>,
    pod: Option<(Option<String>, String)>,
    labels: Vec<(String, String)>,
    verdict: Option<String>,
    port: Option<u16>,
    protocol: Option<String>,
    service: Option<String>,
    from_node: Option<String>,
    domain: Option<String>,
    /// true: IPv6 flows only; false: IPv4 only.
    ipv6: Option<bool>,
}

impl ObserveArgs {
    pub fn filter(&self) -> Result<Filter> {
        let labels = self
            .labels
            .iter()
            .map(|l| match l.split_once('=') {
                Some((k, v)) => Ok((k.to_string(), v.to_string())),
                None => bail!("--label {l}: expected key=value"),
            })
            .collect::<Result<_>>()?;
        let pod = self.pod.as_ref().map(|p| match p.split_once('/') {
            Some((ns, name)) => (Some(ns.to_string()), name.to_string()),
            None => (None, p.clone()),
        });
        Ok(Filter {
            namespace: self.namespace.clone(),
            pod,
            labels,
            verdict: self.verdict.as_ref().map(|v| v.to_uppercase()),
            port: self.port,
            protocol: self.protocol.as_ref().map(|p| p.to_uppercase()),
            service: self.service.clone(),
            from_node: self.from_node.clone(),
            domain: self.domain.as_deref().map(crate::fqdn::pattern::normalize),
            ipv6: self.family.as_deref().map(|f| f == "ipv6"),
        })
    }
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let sides = [&r.src, &r.dst];
        let any = |f: &dyn Fn(&Peer) -> bool| sides.iter().any(|p| f(p));
        if let Some(ns) = &self.namespace {
            if !any(&|p| p.namespace.as_deref() == Some(ns)) {
                return false;
            }
        }
        if let Some((ns, name)) = &self.pod {
            if !any(&|p| p.pod.as_deref() == Some(name) && (ns.is_none() || p.namespace == *ns)) {
                return false;
            }
        }
        if !self.labels.is_empty()
            && !any(&|p| self.labels.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        {
            return false;
        }
        if self.verdict.as_ref().is_some_and(|v| *v != r.verdict) {
            return false;
        }
        if self.port.is_some() && self.port != r.dst.port {
            return false;
        }
        if self.protocol.as_ref().is_some_and(|p| *p != r.protocol) {
            return false;
        }
        if self.service.is_some() && self.service != r.service {
            return false;
        }
        if self.from_node.is_some() && self.from_node != r.src.node {
            return false;
        }
        if self.domain.as_ref().is_some_and(|d| !r.domains.contains(d)) {
            return false;
        }
        if self.ipv6.is_some_and(|v6| v6 != r.src.ip.is_ipv6()) {
            return false;
        }
        true
    }
}

fn side(p: &Peer) -> String {
    let who = match (&p.namespace, &p.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => format!("{}({})", p.ip, p.kind),
    };
    match p.port {
        Some(port) => format!("{who}:{port}"),
        None => who,
    }
}

pub fn render_flow(r: &FlowRecord) -> String {
    let mut s = format!(
        "{} {:<5} {} -> {} {} {} [{}]",
        r.time,
        r.verdict,
        side(&r.src),
        side(&r.dst),
        r.protocol,
        r.direction,
        r.reason
    );
    if !r.passed.is_empty() {
        let _ = write!(s, " passed by: {};", r.passed.join(", then "));
    }
    if !r.policies.is_empty() {
        let _ = write!(s, " policies: {}", r.policies.join(", "));
    }
    if !r.domains.is_empty() {
        let _ = write!(s, " domain: {}", r.domains.join(", "));
    }
    if let Some(svc) = &r.service {
        let _ = write!(s, " service: {svc}");
        if let Some(a) = &r.service_address {
            let _ = write!(s, " ({a})");
        }
    }
    s
}

pub fn render_status(r: &StatusReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "programmed generation {} (model generation {}){}",
        r.programmed_generation,
        r.model_generation,
        if r.audit { ", AUDIT MODE" } else { "" }
    );
    let _ = writeln!(s, "\nENDPOINTS ({})", r.endpoints.len());
    let _ = writeln!(
        s,
        "  {:<32} {:>4} {:<15} {:<15} {:>8}  ingress  egress",
        "POD", "ID", "IP", "INTERFACE", "IDENTITY"
    );
    for e in &r.endpoints {
        let on = |b: bool| if b { "enforced" } else { "open" };
        let _ = writeln!(
            s,
            "  {:<32} {:>4} {:<15} {:<15} {:>8}  {:<8} {}{}",
            format!("{}/{}", e.namespace, e.pod),
            e.endpoint_id,
            e.ipv4,
            e.host_ifname,
            e.identity,
            on(e.ingress_enforced),
            on(e.egress_enforced),
            if e.audit { " audit" } else { "" }
        );
        if let (Some(v6), Some(what)) = (e.ipv6, &e.ipv6_datapath) {
            let _ = writeln!(s, "  {:<32}      IPv6 {v6}: {what}", "");
        }
    }
    let _ = writeln!(s, "\nIDENTITIES {}", r.identities);
    let _ = writeln!(s, "\nPOLICIES ({})", r.policies.len());
    for p in &r.policies {
        match &p.rejected {
            None => {
                let _ = writeln!(s, "  {}/{}  enforced", p.namespace, p.name);
            }
            Some(why) => {
                let _ = writeln!(s, "  {}/{}  REJECTED: {why}", p.namespace, p.name);
            }
        }
    }
    let _ = writeln!(s, "\nCLUSTER POLICIES ({})", r.cluster_policies.len());
    for c in &r.cluster_policies {
        match &c.rejected {
            None => {
                let _ = writeln!(
                    s,
                    "  {:<32} {:<8} priority {:<5} {} subjects{}",
                    c.name,
                    c.tier,
                    c.priority.map_or("-".to_string(), |p| p.to_string()),
                    c.subjects,
                    c.warning
                        .as_ref()
                        .map_or(String::new(), |w| format!("  WARNING: {w}"))
                );
            }
            Some(why) => {
                let _ = writeln!(s, "  {:<32} REJECTED: {why}", c.name);
            }
        }
    }
    let _ = writeln!(s, "\nSERVICES ({})", r.services.len());
    for svc in &r.services {
        for f in &svc.frontends {
            let name = if f.port_name.is_empty() {
                String::new()
            } else {
                format!(" ({})", f.port_name)
            };
            let _ = writeln!(
                s,
                "  {}/{}  {}{name}  {} backends",
                svc.namespace, svc.name, f.frontend, f.backends
            );
        }
    }
    if let Some(e) = &r.services_error {
        let _ = writeln!(s, "  NOT PROGRAMMED: {e}");
    }
    for why in &r.service_rejections {
        let _ = writeln!(s, "  REJECTED: {why}");
    }
    crate::node_status::render(&mut s, r);
    let _ = writeln!(s, "\nMAPS");
    for m in &r.maps {
        let pct = if m.max_entries > 0 {
            m.entries as f64 * 100.0 / m.max_entries as f64
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "  {:<10} {:>8} / {:<8} ({pct:.1}%)",
            m.name, m.entries, m.max_entries
        );
    }
    if !r.domains.is_empty() {
        let _ = writeln!(s, "\nLEARNED DOMAIN NAMES ({})", r.domains.len());
        for d in &r.domains {
            let addrs: Vec<String> = d
                .addresses
                .iter()
                .map(|(a, left)| format!("{a} (expires in {left}s)"))
                .collect();
            let _ = writeln!(s, "  {:<40} {}", d.name, addrs.join(", "));
        }
    }
    s
}

pub fn render_trace(r: &TraceReport) -> String {
    let mut s = String::new();
    for st in &r.steps {
        let _ = writeln!(
            s,
            "{:<28} {:<5} [{}] {}",
            st.hop, st.verdict, st.reason, st.detail
        );
        for p in &st.policies {
            let _ = writeln!(s, "    policy {p}");
        }
        if !st.walk.is_empty() {
            let _ = writeln!(s, "    tier walk:");
            for l in &st.walk {
                let _ = writeln!(s, "      {l}");
            }
        }
    }
    let _ = writeln!(s, "verdict: {}", r.verdict);
    s
}

/// `-o json` or `-o text` (the default, for people).
#[derive(Args, Debug, Clone)]
pub struct OutputArg {
    #[arg(short = 'o', long = "output", default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

impl OutputArg {
    pub fn json(&self) -> bool {
        self.output == "json"
    }

    pub fn print<T: serde::Serialize>(&self, v: &T, text: impl Fn(&T) -> String) -> Result<()> {
        if self.json() {
            println!("{}", serde_json::to_string_pretty(v)?);
        } else {
            print!("{}", text(v));
        }
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct CoverageArgs {
    #[arg(long, default_value = DEFAULT_SOCKET, env = "PALISADE_SOCKET")]
    pub socket: PathBuf,
    /// Only this namespace (its pods, policies and findings).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Fail (exit 1) when a check finds something: default-deny,
    /// default-deny-ingress, default-deny-egress, dns, selected,
    /// no-empty-selectors, no-shadowed-rules, no-ipblock-pods,
    /// governed-namespace-labels. Comma-separated or repeated.
    #[arg(long, value_delimiter = ',')]
    pub require: Vec<String>,
    #[command(flatten)]
    pub o: OutputArg,
}

/// The report restricted to one namespace (subjects are `ns`, `ns/...`).
pub fn coverage_in(mut r: CoverageReport, ns: Option<&str>) -> CoverageReport {
    let Some(ns) = ns else { return r };
    let prefix = format!("{ns}/");
    r.namespaces.retain(|n| n.namespace == ns);
    r.pods.retain(|p| p.namespace == ns);
    r.findings
        .retain(|f| f.subject == ns || f.subject.starts_with(&prefix));
    r
}

pub fn render_coverage(r: &CoverageReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "NAMESPACES");
    let _ = writeln!(
        s,
        "  {:<24} {:>5} {:>9} {:>9}  default deny (ingress | egress)",
        "NAMESPACE", "PODS", "INGRESS", "EGRESS"
    );
    let list = |v: &[String]| {
        if v.is_empty() {
            "NONE".to_string()
        } else {
            v.join(",")
        }
    };
    for n in &r.namespaces {
        let _ = writeln!(
            s,
            "  {:<24} {:>5} {:>9} {:>9}  {} | {}",
            n.namespace,
            n.pods,
            format!("{}/{}", n.ingress_isolated_pods, n.pods),
            format!("{}/{}", n.egress_isolated_pods, n.pods),
            list(&n.default_deny_ingress),
            list(&n.default_deny_egress)
        );
    }
    let _ = writeln!(s, "\nPODS (isolated by)");
    for p in &r.pods {
        let by = |v: &[String]| {
            if v.is_empty() {
                "open".to_string()
            } else {
                v.join(",")
            }
        };
        let _ = writeln!(
            s,
            "  {:<40} ingress: {}  egress: {}",
            format!("{}/{}", p.namespace, p.pod),
            by(&p.ingress),
            by(&p.egress)
        );
    }
    let _ = writeln!(s, "\nFINDINGS ({})", r.findings.len());
    for f in &r.findings {
        let _ = writeln!(s, "  [{}] {}: {}", f.kind, f.subject, f.detail);
    }
    s
}

#[derive(Args, Debug)]
pub struct PreviewArgs {
    #[arg(long, default_value = DEFAULT_SOCKET, env = "PALISADE_SOCKET")]
    pub socket: PathBuf,
    /// YAML files of NetworkPolicies and ClusterNetworkPolicies to apply
    /// (or replace); repeatable,
    /// several documents per file allowed.
    #[arg(short = 'f', long = "filename", num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// namespace/name of a NetworkPolicy, or ClusterNetworkPolicy/name, to
    /// delete; repeatable.
    #[arg(long)]
    pub delete: Vec<String>,
    /// Only flows recorded since: a duration ago (10m, 2h) or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    #[command(flatten)]
    pub o: OutputArg,
}

/// `--since`: "10m" (ago) or an RFC 3339 time, as seconds since the epoch.
pub fn since_unix(s: &str) -> Result<u64> {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = match humantime::parse_duration(s) {
        Ok(ago) => SystemTime::now()
            .checked_sub(ago)
            .context("--since: too long ago")?,
        Err(_) => humantime::parse_rfc3339_weak(s).with_context(|| {
            format!("--since {s:?}: expected a duration (10m) or an RFC 3339 time")
        })?,
    };
    Ok(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

impl PreviewArgs {
    pub fn request(&self) -> Result<PreviewRequest> {
        if self.files.is_empty() && self.delete.is_empty() {
            bail!("nothing to preview: pass -f FILE and/or --delete NAMESPACE/NAME");
        }
        let mut apply = Vec::new();
        for f in &self.files {
            let text = fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
                let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
                    .with_context(|| format!("{} document {i}", f.display()))?;
                if v.is_null() {
                    continue;
                }
                apply.push(serde_yaml::to_string(&v)?);
            }
        }
        Ok(PreviewRequest {
            apply,
            delete: self.delete.clone(),
            since_unix: self.since.as_deref().map(since_unix).transpose()?,
        })
    }
}

pub fn render_preview(r: &PreviewReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "replayed {} flow records ({} not replayable: their pod is no longer on this node)",
        r.replayed, r.skipped
    );
    for why in &r.rejected {
        let _ = writeln!(
            s,
            "REJECTED {why} (it would isolate what it selects and allow nothing)"
        );
    }
    for (title, groups) in [
        ("NEWLY DROPPED", &r.newly_dropped),
        ("NEWLY ALLOWED", &r.newly_allowed),
    ] {
        let _ = writeln!(s, "\n{title} ({})", groups.len());
        if groups.is_empty() {
            let _ = writeln!(s, "  none");
        }
        for g in groups {
            let _ = writeln!(
                s,
                "  {:>6}  {} -> {} {}  ({})",
                g.flows, g.source, g.destination, g.port, g.rule
            );
        }
    }
    s
}

pub fn render_verify(r: &VerifyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "generation {}: {} probes over {} endpoints ({} distinguished by policy entries, the rest sampled){} in {} ms",
        r.generation,
        r.probes,
        r.endpoints,
        r.distinguished,
        if r.truncated { ", TRUNCATED at the cap" } else { "" },
        r.duration_ms
    );
    if r.mismatches.is_empty() {
        let _ = writeln!(s, "OK: every kernel verdict matches the model");
        return s;
    }
    let _ = writeln!(s, "{} MISMATCHES", r.mismatches.len());
    for m in &r.mismatches {
        let _ = writeln!(
            s,
            "  {} {}: {}\n    peer {}; kernel {}, model {} ({}){}",
            m.endpoint,
            m.direction,
            m.packet,
            m.peer,
            m.kernel,
            m.model,
            m.model_reason,
            m.rule
                .as_deref()
                .map(|r| format!(", {r}"))
                .unwrap_or_default()
        );
    }
    s
}

/// "8080/TCP", "53/udp" or "80" (TCP).
pub fn parse_port(s: &str) -> Result<(u16, String)> {
    let (p, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 = p.parse().with_context(|| format!("port {p:?}"))?;
    let proto = proto.to_uppercase();
    if !["TCP", "UDP", "SCTP"].contains(&proto.as_str()) {
        bail!("protocol {proto:?}: expected TCP, UDP or SCTP");
    }
    Ok((port, proto))
}

#[derive(Args, Debug)]
pub struct InstallCniArgs {
    /// The plugin binary to install.
    #[arg(long, default_value = "/usr/local/bin/palisade")]
    pub bin_src: PathBuf,
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The conflist to install.
    #[arg(long)]
    pub conflist: PathBuf,
    /// Name of the installed conflist. It must sort before other networks'
    /// conflists (e.g. 10-flannel.conflist): runtimes use the first one.
    #[arg(long, default_value = "05-palisade.conflist")]
    pub conf_name: String,
    /// Replace `__POD_CIDR__` in the conflist with this.
    #[arg(long, env = "POD_CIDR")]
    pub pod_cidr: Option<String>,
    /// Read the pod CIDR from this node's spec.podCIDR (in-cluster config),
    /// only when the conflist has the placeholder.
    #[arg(long)]
    pub kubernetes: bool,
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
}

/// The conflist needs the node's pod CIDR.
pub fn needs_pod_cidr(a: &InstallCniArgs) -> Result<bool> {
    let conf = fs::read_to_string(&a.conflist)
        .with_context(|| format!("reading {}", a.conflist.display()))?;
    Ok(conf.contains("__POD_CIDR__"))
}

/// Copy to a temporary name in the target directory, then rename: the
/// kubelet never sees half a binary or half a conflist.
fn install_atomic(data: &[u8], dir: &Path, name: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, dir.join(name))
        .with_context(|| format!("installing {}", dir.join(name).display()))
}

pub fn install_cni(a: &InstallCniArgs) -> Result<()> {
    let bin = fs::read(&a.bin_src).with_context(|| format!("reading {}", a.bin_src.display()))?;
    install_atomic(&bin, &a.bin_dir, "palisade", 0o755)?;
    let mut conf = fs::read_to_string(&a.conflist)
        .with_context(|| format!("reading {}", a.conflist.display()))?;
    if conf.contains("__POD_CIDR__") {
        let Some(cidr) = &a.pod_cidr else {
            bail!("the conflist needs the node's pod CIDR: pass --pod-cidr or set POD_CIDR");
        };
        conf = conf.replace("__POD_CIDR__", cidr);
    }
    serde_json::from_str::<serde_json::Value>(&conf).context("the conflist is not valid JSON")?;
    install_atomic(conf.as_bytes(), &a.conf_dir, &a.conf_name, 0o644)?;
    println!(
        "installed {} and {}",
        a.bin_dir.join("palisade").display(),
        a.conf_dir.join(&a.conf_name).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> FlowRecord {
        FlowRecord {
            verdict: "DROP".into(),
            protocol: "TCP".into(),
            src: Peer {
                namespace: Some("x".into()),
                pod: Some("a".into()),
                labels: [("app".to_string(), "web".to_string())].into(),
                ..Default::default()
            },
            dst: Peer {
                namespace: Some("y".into()),
                pod: Some("b".into()),
                port: Some(80),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn args(f: impl FnOnce(&mut ObserveArgs)) -> Filter {
        let mut a = ObserveArgs {
            socket: "/x".into(),
            namespace: None,
            pod: None,
            labels: vec![],
            verdict: None,
            port: None,
            protocol: None,
            service: None,
            from_node: None,
            domain: None,
            family: None,
            follow: false,
            json: false,
            since: None,
            top: None,
        };
        f(&mut a);
        a.filter().unwrap()
    }

    #[test]
    fn filters_match_either_side() {
        let r = rec();
        assert!(args(|a| a.namespace = Some("y".into())).matches(&r));
        assert!(!args(|a| a.namespace = Some("z".into())).matches(&r));
        assert!(args(|a| a.pod = Some("x/a".into())).matches(&r));
        assert!(!args(|a| a.pod = Some("y/a".into())).matches(&r));
        assert!(args(|a| a.labels = vec!["app=web".into()]).matches(&r));
        assert!(!args(|a| a.labels = vec!["app=db".into()]).matches(&r));
        assert!(args(|a| a.verdict = Some("drop".into())).matches(&r));
        assert!(!args(|a| a.verdict = Some("ALLOW".into())).matches(&r));
        assert!(args(|a| a.port = Some(80)).matches(&r));
        assert!(!args(|a| a.protocol = Some("udp".into())).matches(&r));
        assert!(!args(|a| a.service = Some("y/svc".into())).matches(&r));
        let mut via = rec();
        via.service = Some("y/svc".into());
        via.service_address = Some("10.96.0.1:80".into());
        assert!(args(|a| a.service = Some("y/svc".into())).matches(&via));
        assert!(!args(|a| a.service = Some("y/other".into())).matches(&via));
        assert!(render_flow(&via).ends_with(" service: y/svc (10.96.0.1:80)"));
        assert!(!args(|a| a.from_node = Some("n1".into())).matches(&r));
        let mut from_n1 = rec();
        from_n1.src.node = Some("n1".into());
        assert!(args(|a| a.from_node = Some("n1".into())).matches(&from_n1));
        assert!(!args(|a| a.from_node = Some("n2".into())).matches(&from_n1));
        let mut to_n1 = rec();
        to_n1.dst.node = Some("n1".into());
        assert!(!args(|a| a.from_node = Some("n1".into())).matches(&to_n1));
        assert!(args(|a| a.family = Some("ipv4".into())).matches(&r));
        assert!(!args(|a| a.family = Some("ipv6".into())).matches(&r));
        let mut v6 = rec();
        v6.src.ip = "fd00::1".parse().unwrap();
        v6.dst.ip = "fd00::2".parse().unwrap();
        assert!(args(|a| a.family = Some("ipv6".into())).matches(&v6));
        assert!(!args(|a| a.family = Some("ipv4".into())).matches(&v6));
    }

    #[test]
    fn top_counts_drops_by_triple() {
        let mut a = rec();
        a.policies = vec!["y/deny".into()];
        let mut other_port = rec();
        other_port.dst.port = Some(81);
        let mut allowed = rec();
        allowed.verdict = "ALLOW".into();
        let recs = [a.clone(), a.clone(), a, other_port, allowed];
        let top = top_drops(&recs, 10);
        assert_eq!(top.len(), 2);
        assert_eq!(
            (
                top[0].source.as_str(),
                top[0].destination.as_str(),
                top[0].port.as_str(),
                top[0].drops
            ),
            ("x/a", "y/b", "80/TCP", 3)
        );
        assert_eq!(top[0].policies, vec!["y/deny".to_string()]);
        assert_eq!((top[1].port.as_str(), top[1].drops), ("81/TCP", 1));
        assert_eq!(top_drops(&recs, 1).len(), 1);
        assert!(since_unix("10m").unwrap() > 1_700_000_000);
        assert_eq!(since_unix("2026-01-01T00:00:00Z").unwrap(), 1_767_225_600);
        assert!(since_unix("yesterday").is_err());
    }

    #[test]
    fn port_arguments() {
        assert_eq!(parse_port("8080/tcp").unwrap(), (8080, "TCP".into()));
        assert_eq!(parse_port("53/UDP").unwrap(), (53, "UDP".into()));
        assert_eq!(parse_port("80").unwrap(), (80, "TCP".into()));
        assert!(parse_port("80/ICMP").is_err());
        assert!(parse_port("99999").is_err());
    }

    #[test]
    fn install_cni_is_atomic_and_fills_the_pod_cidr() {
        let dir = std::env::temp_dir().join(format!("palisade-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("bin"), b"\x7fELF").unwrap();
        fs::write(dir.join("c.conflist"), r#"{"subnet":"__POD_CIDR__"}"#).unwrap();
        let mut a = InstallCniArgs {
            bin_src: dir.join("bin"),
            bin_dir: dir.join("opt"),
            conf_dir: dir.join("net.d"),
            conflist: dir.join("c.conflist"),
            conf_name: "05-palisade.conflist".into(),
            pod_cidr: None,
            kubernetes: false,
            node_name: None,
        };
        assert!(install_cni(&a)
            .unwrap_err()
            .to_string()
            .contains("pod CIDR"));
        a.pod_cidr = Some("10.1.2.0/24".into());
        install_cni(&a).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("net.d/05-palisade.conflist")).unwrap(),
            r#"{"subnet":"10.1.2.0/24"}"#
        );
        assert_eq!(
            fs::read_dir(dir.join("net.d")).unwrap().count(),
            1,
            "no temp file left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
