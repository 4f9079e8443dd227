//! Case files (../shared/conformance/FORMAT.md): the cluster, the steps,
//! and the expected matrices, parsed and checked before anything is built.
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Deserializer};
use serde_yaml::Value;

use super::{
    family::{has_address_peer, Family},
    matrix::Matrix,
};

pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries, as on a real cluster.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            _ => bail!("protocol {s:?} is not TCP, UDP or SCTP"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Protocol::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn default_tcp() -> Protocol {
    Protocol::Tcp
}

/// Label values written as YAML numbers or booleans are taken as their text
/// (Kubernetes would insist on strings; a case should not fail on `v: 1`).
fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
    let raw: Option<BTreeMap<String, Value>> = Option::deserialize(d)?;
    raw.unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Null => String::new(),
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "label {k}: {other:?} is not a scalar"
                    )))
                }
            };
            Ok((k, v))
        })
        .collect()
}

fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NamespaceSpec {
    #[serde(default, deserialize_with = "labels")]
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct PortSpec {
    pub port: u16,
    #[serde(default = "default_tcp")]
    pub protocol: Protocol,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    #[serde(default, deserialize_with = "labels")]
    pub labels: Labels,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<PortSpec>,
    /// FORMAT v2: the node the pod runs on (else the runner spreads pods).
    #[serde(default)]
    pub node: Option<String>,
    /// FORMAT v2: a process in its node's namespace, at its node's address.
    #[serde(default, rename = "hostNetwork")]
    pub host_network: bool,
}

impl PodSpec {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn serves(&self, port: u16, protocol: Protocol) -> bool {
        self.ports
            .iter()
            .any(|p| p.port == port && p.protocol == protocol)
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClusterSpec {
    #[serde(default, deserialize_with = "null_as_default")]
    pub namespaces: BTreeMap<String, Option<NamespaceSpec>>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub pods: Vec<PodSpec>,
    /// FORMAT v2 `cluster.nodes`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub nodes: Vec<NodeSpec>,
    /// FORMAT v2 `cluster.dns`: the pod the runner runs the cluster DNS as.
    #[serde(default)]
    pub dns: Option<DnsSpec>,
    /// FORMAT v2 `cluster.external`: hosts outside the cluster.
    #[serde(default, deserialize_with = "null_as_default")]
    pub external: Vec<ExternalSpec>,
}

/// `cluster.dns`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct DnsSpec {
    pub namespace: String,
    pub name: String,
    #[serde(default, deserialize_with = "labels")]
    pub labels: Labels,
}

impl DnsSpec {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The agents' `--cluster-dns NAMESPACE/KEY=VALUE[,KEY=VALUE...]`
    /// (the DNS pod's namespace and labels), or None when their default
    /// (namespace kube-system, label k8s-app=kube-dns) finds this pod, so
    /// an agent without the flag still runs such cases.
    pub fn agent_flag(&self) -> Option<String> {
        let (k, v) = DEFAULT_DNS_LABEL;
        if self.namespace == DEFAULT_DNS_NAMESPACE
            && self.labels.get(k).map(String::as_str) == Some(v)
        {
            return None;
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        Some(format!("{}/{}", self.namespace, labels.join(",")))
    }
}

/// The DNS pod an agent looks for unless told otherwise (its
/// `--cluster-dns` default): namespace kube-system, label k8s-app=kube-dns.
pub const DEFAULT_DNS_NAMESPACE: &str = "kube-system";
pub const DEFAULT_DNS_LABEL: (&str, &str) = ("k8s-app", "kube-dns");

fn default_ttl() -> u32 {
    30
}

/// A `cluster.external` entry as written.
#[derive(Clone, Debug, Deserialize)]
pub struct ExternalSpec {
    pub name: String,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub cname: Option<String>,
}

/// What an external name is: a host with an address, or an alias.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExternalKind {
    Host {
        address: std::net::Ipv4Addr,
        ports: Vec<PortSpec>,
    },
    /// The target's name, normalized.
    Cname(String),
}

/// A `cluster.external` entry, checked; the name normalized (lower case,
/// no trailing dot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    pub name: String,
    pub ttl: u32,
    pub kind: ExternalKind,
}

/// The checked `cluster.external` list.
#[derive(Clone, Debug, Default)]
pub struct Externals(pub Vec<External>);

impl Externals {
    pub fn get(&self, name: &str) -> Option<&External> {
        let n = super::dns::normalize(name);
        self.0.iter().find(|e| e.name == n)
    }

    /// The host a name stands for, CNAMEs followed (None: not a name of
    /// the case, or a chain that ends nowhere).
    pub fn host(&self, name: &str) -> Option<(std::net::Ipv4Addr, &[PortSpec])> {
        let mut cur = self.get(name)?;
        for _ in 0..=self.0.len() {
            match &cur.kind {
                ExternalKind::Host { address, ports } => return Some((*address, ports)),
                ExternalKind::Cname(t) => cur = self.get(t)?,
            }
        }
        None
    }

    /// Every host: (name, address, ports).
    pub fn hosts(&self) -> impl Iterator<Item = (&str, std::net::Ipv4Addr, &[PortSpec])> {
        self.0.iter().filter_map(|e| match &e.kind {
            ExternalKind::Host { address, ports } => {
                Some((e.name.as_str(), *address, ports.as_slice()))
            }
            ExternalKind::Cname(_) => None,
        })
    }

    fn check(raw: Vec<ExternalSpec>) -> Result<Self> {
        let mut out: Vec<External> = Vec::new();
        for e in raw {
            let name = super::dns::normalize(&e.name);
            let what = format!("cluster.external {:?}", e.name);
            if name.is_empty()
                || name.contains('/')
                || name.split('.').any(|l| l.is_empty() || l.len() > 63)
                || name.chars().any(|c| c.is_whitespace())
            {
                bail!("{what}: not a domain name");
            }
            if out.iter().any(|o| o.name == name) {
                bail!("{what}: the name is listed twice");
            }
            let kind = match (e.address, e.cname) {
                (Some(a), None) => {
                    let address: std::net::Ipv4Addr = a
                        .parse()
                        .map_err(|_| anyhow!("{what}: address {a:?} is not an IPv4 address"))?;
                    if address.is_unspecified()
                        || address.is_loopback()
                        || address.is_multicast()
                        || address.is_broadcast()
                    {
                        bail!("{what}: address {address} cannot be a host's");
                    }
                    for p in &e.ports {
                        if p.port == 0 {
                            bail!("{what}: port 0");
                        }
                    }
                    ExternalKind::Host {
                        address,
                        ports: e.ports,
                    }
                }
                (None, Some(t)) => {
                    if !e.ports.is_empty() {
                        bail!("{what}: a cname has no ports (its target's apply)");
                    }
                    ExternalKind::Cname(super::dns::normalize(&t))
                }
                _ => bail!("{what}: give either address or cname"),
            };
            out.push(External {
                name,
                ttl: e.ttl,
                kind,
            });
        }
        let all = Self(out);
        for e in &all.0 {
            if let ExternalKind::Host { address, .. } = &e.kind {
                if let Some(o) = all.0.iter().find(|o| {
                    o.name != e.name
                        && matches!(&o.kind, ExternalKind::Host { address: a, .. } if a == address)
                }) {
                    bail!(
                        "cluster.external: {} and {} have the same address {address} (FORMAT: an address belongs to one host)",
                        e.name,
                        o.name
                    );
                }
            }
            if let ExternalKind::Cname(t) = &e.kind {
                if all.get(t).is_none() {
                    bail!(
                        "cluster.external {}: cname {t} is not a name of cluster.external",
                        e.name
                    );
                }
                if all.host(&e.name).is_none() {
                    bail!("cluster.external {}: the cname chain is a loop", e.name);
                }
            }
        }
        Ok(all)
    }
}

/// A node of `cluster.nodes`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default, deserialize_with = "labels")]
    pub labels: Labels,
}

impl NodeSpec {
    /// A node as the runner makes it: its labels plus the two every node
    /// carries.
    pub fn named(name: &str, labels: &Labels) -> Self {
        let mut labels = labels.clone();
        labels.insert("kubernetes.io/hostname".into(), name.into());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        Self {
            name: name.into(),
            labels,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind")]
pub enum Relabel {
    Namespace {
        name: String,
        #[serde(default, deserialize_with = "labels")]
        labels: Labels,
    },
    Pod {
        namespace: String,
        name: String,
        #[serde(default, deserialize_with = "labels")]
        labels: Labels,
    },
}

#[derive(Clone, Debug, Deserialize)]
pub struct ProbeSpec {
    pub port: u16,
    #[serde(default = "default_tcp")]
    pub protocol: Protocol,
    pub expect: String,
    /// FORMAT v2: `ipv4` or `ipv6` pins the probe to that family.
    #[serde(default)]
    pub family: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StepSpec {
    #[serde(default, deserialize_with = "null_as_default")]
    pub apply: Vec<Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub delete: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub relabel: Vec<Relabel>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub probes: Vec<ProbeSpec>,
}

#[derive(Clone, Debug, Deserialize)]
struct CaseFile {
    name: String,
    #[serde(default)]
    cluster: ClusterSpec,
    #[serde(default, deserialize_with = "null_as_default")]
    steps: Vec<StepSpec>,
}

/// A NetworkPolicy object of a step, with its namespace and name.
#[derive(Clone, Debug)]
pub struct PolicyDoc {
    pub namespace: String,
    pub name: String,
    /// The whole object, placeholders not yet substituted.
    pub doc: Value,
}

impl PolicyDoc {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
    pub expect: Matrix,
    /// Pinned to one family (FORMAT v2 `family:`).
    pub family: Option<Family>,
}

#[derive(Clone, Debug, Default)]
pub struct Step {
    pub apply: Vec<PolicyDoc>,
    /// `namespace/name`
    pub delete: Vec<(String, String)>,
    pub relabel: Vec<Relabel>,
    pub probes: Vec<Probe>,
}

/// A case, checked: every pod a matrix or a relabel names exists, every
/// policy has a name, every deletion names a policy applied before.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub file: PathBuf,
    /// Namespace -> labels, including namespaces only pods mention, each
    /// with its `kubernetes.io/metadata.name` label.
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: Vec<PodSpec>,
    /// `cluster.nodes` (each with the labels every node carries); empty
    /// when the runner decides the nodes.
    pub nodes: Vec<NodeSpec>,
    pub steps: Vec<Step>,
    /// A FORMAT version 2 feature the agent does not implement yet: the
    /// case is not run (nothing else of it is read), and the runner says so.
    pub unsupported: Option<String>,
    /// An applied object has an ipBlock or `networks` peer: under
    /// `--ip-family dual` the case is probed over IPv4 only (FORMAT).
    pub address_peers: bool,
    /// FORMAT v2 `cluster.dns`, with the labels its pod has (those of its
    /// `cluster.pods` entry when the case lists it there). Its pod is in
    /// `pods` too (added when the case does not list it), serving 53/UDP
    /// and 53/TCP.
    pub dns: Option<DnsSpec>,
    /// FORMAT v2 `cluster.external`.
    pub externals: Externals,
}

/// The FORMAT version 2 features this runner does not implement yet, each
/// with the issue that brings it; None when the case needs none of them
/// (today: every feature is implemented).
pub fn unsupported(_raw: &Value) -> Option<String> {
    None
}

impl Case {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let value: Value = serde_yaml::from_str(text).context("not a case file")?;
        if let Some(why) = unsupported(&value) {
            let name = value
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return Ok(Self {
                name: name.to_string(),
                file: file.to_path_buf(),
                namespaces: BTreeMap::new(),
                pods: Vec::new(),
                nodes: Vec::new(),
                steps: Vec::new(),
                unsupported: Some(why),
                address_peers: false,
                dns: None,
                externals: Externals::default(),
            });
        }
        let mut raw: CaseFile = serde_yaml::from_value(value).context("not a case file")?;
        let externals = Externals::check(std::mem::take(&mut raw.cluster.external))?;
        let mut dns = raw.cluster.dns.take();
        if dns.is_none() && !externals.0.is_empty() {
            bail!("cluster.external needs cluster.dns (the pods resolve the names there)");
        }
        if let Some(d) = &mut dns {
            let at = raw.cluster.pods.iter_mut().find(|p| p.key() == d.key());
            match at {
                // Listed as a pod too: that entry's labels; 53 served.
                Some(p) => {
                    if p.host_network {
                        bail!(
                            "cluster.dns {}: the DNS pod cannot be host-network",
                            d.key()
                        );
                    }
                    d.labels = p.labels.clone();
                    for proto in [Protocol::Udp, Protocol::Tcp] {
                        if !p.serves(53, proto) {
                            p.ports.push(PortSpec {
                                port: 53,
                                protocol: proto,
                                name: None,
                            });
                        }
                    }
                }
                None => raw.cluster.pods.push(PodSpec {
                    namespace: d.namespace.clone(),
                    name: d.name.clone(),
                    labels: d.labels.clone(),
                    ports: [Protocol::Udp, Protocol::Tcp]
                        .into_iter()
                        .map(|protocol| PortSpec {
                            port: 53,
                            protocol,
                            name: None,
                        })
                        .collect(),
                    node: None,
                    host_network: false,
                }),
            }
        }
        let mut namespaces: BTreeMap<String, Labels> = BTreeMap::new();
        for (name, spec) in raw.cluster.namespaces {
            namespaces.insert(name, spec.unwrap_or_default().labels);
        }
        for p in &raw.cluster.pods {
            namespaces.entry(p.namespace.clone()).or_default();
        }
        for (name, labels) in &mut namespaces {
            labels.insert(NAME_LABEL.into(), name.clone());
        }
        let mut pods: Vec<PodSpec> = Vec::new();
        for p in raw.cluster.pods {
            if pods.iter().any(|q| q.key() == p.key()) {
                bail!("pod {} is listed twice", p.key());
            }
            for port in &p.ports {
                if port.port == 0 {
                    bail!("pod {}: port 0", p.key());
                }
            }
            pods.push(p);
        }
        let has_pod = |key: &str| pods.iter().any(|p| p.key() == key);
        let mut nodes: Vec<NodeSpec> = Vec::new();
        for n in &raw.cluster.nodes {
            if n.name.is_empty() || nodes.iter().any(|m| m.name == n.name) {
                bail!(
                    "cluster.nodes: node {:?} is unnamed or listed twice",
                    n.name
                );
            }
            nodes.push(NodeSpec::named(&n.name, &n.labels));
        }
        for p in &pods {
            if let Some(n) = &p.node {
                if !nodes.is_empty() && !nodes.iter().any(|m| &m.name == n) {
                    bail!("pod {}: node {n} is not in cluster.nodes", p.key());
                }
            }
        }

        let mut applied: Vec<String> = Vec::new();
        let mut steps = Vec::new();
        for (i, s) in raw.steps.into_iter().enumerate() {
            let at = format!("step {}", i + 1);
            let mut step = Step::default();
            for d in &s.delete {
                let (ns, name) = d
                    .split_once('/')
                    .ok_or_else(|| anyhow!("{at}: delete {d:?}: expected namespace/name"))?;
                if !applied.contains(d) {
                    bail!("{at}: delete {d}: no earlier step applied that policy");
                }
                applied.retain(|a| a != d);
                step.delete.push((ns.to_string(), name.to_string()));
            }
            for (j, doc) in s.apply.into_iter().enumerate() {
                let p = policy_doc(doc).with_context(|| format!("{at}: apply[{j}]"))?;
                if !applied.contains(&p.key()) {
                    applied.push(p.key());
                }
                step.apply.push(p);
            }
            for r in s.relabel {
                match &r {
                    Relabel::Namespace { name, .. } if !namespaces.contains_key(name) => {
                        bail!("{at}: relabel of namespace {name}, which the cluster does not have")
                    }
                    Relabel::Pod {
                        namespace, name, ..
                    } if !has_pod(&format!("{namespace}/{name}")) => {
                        bail!("{at}: relabel of pod {namespace}/{name}, which the cluster does not have")
                    }
                    _ => step.relabel.push(r),
                }
            }
            for (j, p) in s.probes.into_iter().enumerate() {
                let what = format!("{at}: probe {} ({}/{})", j + 1, p.protocol, p.port);
                if p.port == 0 {
                    bail!("{what}: port 0");
                }
                let expect = Matrix::parse(&p.expect).with_context(|| what.clone())?;
                let family = p
                    .family
                    .as_deref()
                    .map(Family::parse)
                    .transpose()
                    .with_context(|| what.clone())?;
                // Columns: pods, or (FORMAT v2) names of hosts outside the
                // cluster, resolved through the cluster DNS; a name the
                // case does not list is asked for all the same (NXDOMAIN).
                if let Some(unknown) = expect.cols.iter().find(|k| {
                    if k.contains('/') {
                        !has_pod(k)
                    } else {
                        dns.is_none()
                    }
                }) {
                    if unknown.contains('/') {
                        bail!(
                            "{what}: the matrix names {unknown}, which is not a pod of the cluster"
                        );
                    }
                    bail!("{what}: the matrix names the host {unknown}, but the case has no cluster.dns to resolve it");
                }
                if let Some((unknown, _)) = expect.rows.iter().find(|(k, _)| !has_pod(k)) {
                    bail!("{what}: the matrix names {unknown} as a source, which is not a pod of the cluster");
                }
                step.probes.push(Probe {
                    port: p.port,
                    protocol: p.protocol,
                    expect,
                    family,
                });
            }
            steps.push(step);
        }
        let address_peers = steps
            .iter()
            .flat_map(|s| &s.apply)
            .any(|p| has_address_peer(&p.doc));
        Ok(Self {
            name: raw.name,
            file: file.to_path_buf(),
            namespaces,
            pods,
            nodes,
            steps,
            unsupported: None,
            address_peers,
            dns,
            externals,
        })
    }

    pub fn pod(&self, key: &str) -> Option<&PodSpec> {
        self.pods.iter().find(|p| p.key() == key)
    }

    /// How many probe cells the case has, and how many of them use `proto`.
    pub fn cells(&self) -> (usize, usize, usize) {
        let mut all = 0;
        let mut sctp = 0;
        for p in self.steps.iter().flat_map(|s| &s.probes) {
            let n = p.expect.cells().count();
            all += n;
            if p.protocol == Protocol::Sctp {
                sctp += n;
            }
        }
        (all, sctp, self.steps.len())
    }
}

/// The pseudo-namespace of ClusterNetworkPolicy documents: their key is
/// `ClusterNetworkPolicy/<name>`, as deletes name them (no namespace can be
/// called that: namespace names are lowercase).
pub const CLUSTER_POLICY: &str = "ClusterNetworkPolicy";

fn policy_doc(doc: Value) -> Result<PolicyDoc> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind != "NetworkPolicy" && kind != CLUSTER_POLICY {
        bail!("kind is {kind:?}, expected NetworkPolicy or ClusterNetworkPolicy");
    }
    let meta = doc.get("metadata").ok_or_else(|| anyhow!("no metadata"))?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("metadata.name is required"))?
        .to_string();
    let namespace = if kind == CLUSTER_POLICY {
        CLUSTER_POLICY.to_string()
    } else {
        meta.get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string()
    };
    for s in [&name, &namespace] {
        if s.is_empty() || s.contains(['/', '_']) || s.starts_with('.') {
            bail!("{s:?} is not a valid object name");
        }
    }
    Ok(PolicyDoc {
        namespace,
        name,
        doc,
    })
}

/// The case files of a directory (`*.yaml`, `*.yml`, in name order), or the
/// file itself.
pub fn case_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for e in std::fs::read_dir(path)
        .with_context(|| format!("reading the case directory {}", path.display()))?
    {
        let p = e?.path();
        if p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::matrix::Reach;

    const CASE: &str = r#"
name: example
source: ignored
cluster:
  namespaces:
    x: {labels: {ns: x}}
    y: {labels: {ns: y, kubernetes.io/metadata.name: y, v: 1}}
    z:
  pods:
    - namespace: x
      name: a
      labels: {pod: a}
      ports:
        - {port: 80, protocol: TCP, name: serve-80-tcp}
        - {port: 80, protocol: udp}
    - {namespace: y, name: b, labels: {pod: b}, ports: []}
    - {namespace: w, name: c, ports: null}
steps:
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-all, namespace: x}
        spec: {podSelector: {}, policyTypes: [Ingress]}
    probes:
      - port: 80
        protocol: TCP
        expect: |
          -    x/a y/b
          x/a  .   X
          y/b  X   .
  - delete: [x/deny-all]
    relabel:
      - {kind: Namespace, name: y, labels: {a: b}}
      - {kind: Pod, namespace: x, name: a, labels: {}}
    probes:
      - port: 80
        protocol: SCTP
        expect: "- x/a\nw/c .\n"
  - {}
"#;

    #[test]
    fn version_two_features_not_implemented_yet_are_named() {
        let cnp = "name: t\ncluster: {pods: [{namespace: x, name: a}]}\nsteps:\n  - apply:\n      - {apiVersion: policy.networking.k8s.io/v1alpha2, kind: ClusterNetworkPolicy, metadata: {name: p}}\n";
        let c = Case::parse(cnp, Path::new("t.yaml")).unwrap();
        assert_eq!(c.unsupported, None, "ClusterNetworkPolicy is supported");
        assert_eq!(c.steps[0].apply[0].key(), "ClusterNetworkPolicy/p");
        let v6 = "name: t\ncluster:\n  nodes: [{name: n1}]\n  pods: [{namespace: x, name: a, hostNetwork: true}]\nsteps:\n  - probes: [{port: 80, family: ipv6, expect: \"- x/a\\nx/a .\"}]\n";
        let c = Case::parse(v6, Path::new("t.yaml")).unwrap();
        assert_eq!(c.unsupported, None, "IPv6 probes are supported");
        assert_eq!(c.steps[0].probes[0].family, Some(Family::V6));
        assert!(!c.address_peers);
        let bad = v6.replace("family: ipv6", "family: ipv5");
        assert!(
            format!("{:#}", Case::parse(&bad, Path::new("t.yaml")).unwrap_err())
                .contains("family \"ipv5\" is not ipv4 or ipv6")
        );
        let nodes = "name: t\ncluster:\n  nodes: [{name: n1, labels: {zone: a}}, {name: n2}]\n  pods: [{namespace: x, name: a, node: n2}, {namespace: x, name: h, hostNetwork: true}]\n";
        let c = Case::parse(nodes, Path::new("t.yaml")).unwrap();
        assert_eq!(c.unsupported, None);
        assert_eq!(c.nodes[0].labels["kubernetes.io/hostname"], "n1");
        assert_eq!(c.nodes[0].labels["zone"], "a");
        assert_eq!(c.pods[0].node.as_deref(), Some("n2"));
        assert!(c.pods[1].host_network);
        let bad = nodes.replace("node: n2", "node: n3");
        assert!(
            format!("{:#}", Case::parse(&bad, Path::new("t.yaml")).unwrap_err())
                .contains("n3 is not in cluster.nodes")
        );
        // A version-1 case needs nothing.
        let v1 = "name: t\ncluster: {pods: [{namespace: x, name: a, ports: [{port: 80}]}]}\nsteps:\n  - probes: [{port: 80, expect: \"- x/a\\nx/a .\"}]\n";
        assert_eq!(
            Case::parse(v1, Path::new("t.yaml")).unwrap().unsupported,
            None
        );
    }

    #[test]
    fn cluster_dns_and_external_hosts() {
        let text = "name: t
cluster:
  pods: [{namespace: x, name: a, ports: [{port: 80}]}]
  dns: {namespace: kube-system, name: coredns, labels: {k8s-app: kube-dns}}
  external:
    - {name: API.example.com., address: 198.51.100.10, ports: [{port: 443}, {port: 53, protocol: UDP}]}
    - {name: www.example.org, cname: api.example.com, ttl: 5}
    - {name: old.example.org, cname: WWW.example.org}
steps:
  - probes:
      - port: 443
        expect: |
          -    api.example.com  old.example.org  nowhere.example  kube-system/coredns
          x/a  .                .                X                .
";
        let c = Case::parse(text, Path::new("t.yaml")).unwrap();
        assert_eq!(c.unsupported, None);
        let dns = c.dns.as_ref().unwrap();
        assert_eq!(dns.key(), "kube-system/coredns");
        let pod = c.pod("kube-system/coredns").expect("the DNS pod is a pod");
        assert!(pod.serves(53, Protocol::Udp) && pod.serves(53, Protocol::Tcp));
        assert_eq!(pod.labels["k8s-app"], "kube-dns");
        assert_eq!(c.namespaces["kube-system"][NAME_LABEL], "kube-system");
        let e = &c.externals;
        assert_eq!(e.0[0].name, "api.example.com");
        assert_eq!(e.0[0].ttl, 30, "the default TTL");
        assert_eq!(e.0[1].ttl, 5);
        let (addr, ports) = e.host("OLD.example.org.").unwrap();
        assert_eq!(addr, std::net::Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(ports.len(), 2);
        assert_eq!(e.hosts().count(), 1);
        assert!(e.host("nowhere.example").is_none());

        // Listed as a pod too: that entry's labels, 53 added to its ports.
        let listed = text.replace(
            "pods: [{namespace: x, name: a, ports: [{port: 80}]}]",
            "pods: [{namespace: x, name: a, ports: [{port: 80}]}, {namespace: kube-system, name: coredns, labels: {k8s-app: kube-dns, tier: dns}, ports: [{port: 9153}]}]",
        );
        let c = Case::parse(&listed, Path::new("t.yaml")).unwrap();
        assert_eq!(c.pods.len(), 2);
        assert_eq!(c.dns.as_ref().unwrap().labels["tier"], "dns");
        let p = c.pod("kube-system/coredns").unwrap();
        assert!(p.serves(9153, Protocol::Tcp) && p.serves(53, Protocol::Udp));

        let bad = |from: &str, to: &str, why: &str| {
            let e = err(&text.replace(from, to));
            assert!(e.contains(why), "{e}");
        };
        bad(
            "cname: api.example.com,",
            "cname: nope.example.com,",
            "cname nope.example.com is not a name",
        );
        bad(
            "{name: old.example.org, cname: WWW.example.org}",
            "{name: old.example.org, address: 198.51.100.10}",
            "the same address 198.51.100.10",
        );
        bad(
            "{name: old.example.org, cname: WWW.example.org}",
            "{name: old.example.org}",
            "either address or cname",
        );
        bad(
            "{name: old.example.org, cname: WWW.example.org}",
            "{name: api.example.com, cname: www.example.org}",
            "listed twice",
        );
        bad(
            "address: 198.51.100.10",
            "address: 198.51.100",
            "not an IPv4 address",
        );
        bad(
            "cname: api.example.com, ttl: 5",
            "cname: old.example.org",
            "loop",
        );
        bad(
            "  dns: {namespace: kube-system, name: coredns, labels: {k8s-app: kube-dns}}\n",
            "",
            "needs cluster.dns",
        );
        bad(
            "          x/a  .",
            "          api.example.com  .",
            "as a source",
        );

        // The agents' flag only when their default does not find the pod.
        assert_eq!(c.dns.as_ref().unwrap().agent_flag(), None);
        let other = DnsSpec {
            namespace: "dns".into(),
            name: "resolver".into(),
            labels: [
                ("app".to_string(), "dns".to_string()),
                ("tier".to_string(), "infra".to_string()),
            ]
            .into(),
        };
        assert_eq!(
            other.agent_flag().as_deref(),
            Some("dns/app=dns,tier=infra")
        );
        let elsewhere = DnsSpec {
            namespace: "dns".into(),
            ..c.dns.clone().unwrap()
        };
        assert_eq!(
            elsewhere.agent_flag().as_deref(),
            Some("dns/k8s-app=kube-dns,tier=dns")
        );
    }

    #[test]
    fn parses_the_format() {
        let c = Case::parse(CASE, Path::new("t.yaml")).unwrap();
        assert_eq!(c.name, "example");
        assert_eq!(c.namespaces["x"]["ns"], "x");
        assert_eq!(c.namespaces["x"][NAME_LABEL], "x");
        assert_eq!(c.namespaces["y"]["v"], "1");
        assert_eq!(c.namespaces["z"].len(), 1);
        assert_eq!(
            c.namespaces["w"][NAME_LABEL], "w",
            "namespaces of pods are added"
        );
        let a = c.pod("x/a").unwrap();
        assert_eq!(
            a.ports[1],
            PortSpec {
                port: 80,
                protocol: Protocol::Udp,
                name: None
            }
        );
        assert!(a.serves(80, Protocol::Udp) && !a.serves(81, Protocol::Tcp));
        assert!(c.pod("w/c").unwrap().ports.is_empty());
        assert_eq!(c.steps.len(), 3);
        assert_eq!(c.steps[0].apply[0].key(), "x/deny-all");
        assert_eq!(
            c.steps[0].probes[0].expect.rows[1].1,
            [Reach::Fail, Reach::Pass]
        );
        assert_eq!(
            c.steps[1].delete,
            [("x".to_string(), "deny-all".to_string())]
        );
        assert_eq!(
            c.steps[1].relabel[0],
            Relabel::Namespace {
                name: "y".into(),
                labels: [("a".into(), "b".into())].into()
            }
        );
        assert_eq!(c.steps[1].probes[0].protocol, Protocol::Sctp);
        assert_eq!(c.cells(), (5, 1, 3));
    }

    fn err(text: &str) -> String {
        format!("{:#}", Case::parse(text, Path::new("t.yaml")).unwrap_err())
    }

    #[test]
    fn rejects_inconsistent_cases() {
        let base = "name: n\ncluster: {pods: [{namespace: x, name: a}]}\nsteps:\n";
        assert!(err(&format!(
            "{base}  - probes: [{{port: 80, expect: \"- x/b\\nx/a .\"}}]"
        ))
        .contains("names x/b"));
        assert!(err(&format!("{base}  - delete: [x/p]")).contains("no earlier step applied"));
        assert!(err(&format!("{base}  - delete: [p]")).contains("namespace/name"));
        assert!(err(&format!(
            "{base}  - relabel: [{{kind: Pod, namespace: x, name: b}}]"
        ))
        .contains("pod x/b"));
        assert!(err(&format!(
            "{base}  - relabel: [{{kind: Namespace, name: q}}]"
        ))
        .contains("namespace q"));
        assert!(err(&format!("{base}  - relabel: [{{kind: Node, name: q}}]")).contains("Node"));
        assert!(err(&format!(
            "{base}  - apply: [{{kind: Pod, metadata: {{name: p}}}}]"
        ))
        .contains("expected NetworkPolicy"));
        assert!(err(&format!(
            "{base}  - apply: [{{kind: NetworkPolicy, metadata: {{}}}}]"
        ))
        .contains("metadata.name"));
        assert!(err(&format!(
            "{base}  - probes: [{{port: 80, protocol: ICMP, expect: \"- x/a\\nx/a .\"}}]"
        ))
        .contains("ICMP"));
        assert!(err(&format!(
            "{base}  - probes: [{{port: 80, expect: \"- x/a\\nx/a\"}}]"
        ))
        .contains("0 cells"));
        assert!(err(
            "name: n\ncluster: {pods: [{namespace: x, name: a}, {namespace: x, name: a}]}"
        )
        .contains("twice"));
        assert!(err("cluster: {}").contains("name"));
    }

    #[test]
    fn deleting_and_reapplying_is_tracked() {
        let text = "name: n
cluster: {pods: [{namespace: x, name: a}]}
steps:
  - apply: [{kind: NetworkPolicy, metadata: {name: p, namespace: x}}]
  - delete: [x/p]
    apply: [{kind: NetworkPolicy, metadata: {name: p, namespace: x}}]
  - delete: [x/p]
";
        let c = Case::parse(text, Path::new("t.yaml")).unwrap();
        assert_eq!(c.steps[2].delete.len(), 1);
        let twice = format!("{text}  - delete: [x/p]\n");
        assert!(err(&twice).contains("step 4: delete x/p"));
    }

    #[test]
    fn the_shared_and_own_corpora_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in [
            root.join("conformance"),
            root.join("conformance-dns"),
            root.join("../../shared/conformance/cases"),
        ] {
            let Ok(files) = case_files(&dir) else {
                continue;
            };
            for f in files {
                let c = Case::load(&f).unwrap_or_else(|e| panic!("{}: {e:#}", f.display()));
                assert!(
                    c.unsupported.is_some() || !c.steps.is_empty(),
                    "{}: a case with no steps",
                    f.display()
                );
            }
        }
    }
}
