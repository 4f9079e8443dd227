//! A one-node cluster made for real: a "node" network namespace, the
//! `palisade-agent` running in it in standalone mode on a manifest
//! directory, and pods that are network namespaces wired by the `palisade`
//! CNI binary, invoked exactly like a container runtime would (CNI_*
//! environment, network configuration on stdin, from the node's namespace).
//!
//! Several nodes (FORMAT v2 `--nodes N`, `cluster.nodes`): one namespace
//! per node, each with its own agent (pin root, socket, state directory,
//! flow log, metrics port), CNI configuration and pod range, joined by a
//! fabric: a bridge in a namespace of its own, each node attached by an
//! uplink veth carrying the node's address. Every agent reads the same
//! manifest directory (Node objects with addresses and podCIDRs included)
//! and routes to the other nodes' pod ranges itself.
//!
//! Everything is torn down in reverse on drop, also after a failure: server
//! threads, CNI DEL of each pod, the pod namespaces, the agents (by PID),
//! their pinned objects, the node namespaces, the fabric, the scratch
//! directory.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use palisade_api::{call, Request, Response, StatusReport};
use serde_yaml::{Mapping, Value};

use super::{
    case::{Labels, PodSpec, Protocol},
    family::{self, Family, IpFamily},
    probe::Servers,
    signal,
};
use crate::{agent::TempDir, unique, NetNs};

/// The agent and CNI binaries.
#[derive(Clone, Debug)]
pub struct Tools {
    pub agent: PathBuf,
    pub cni: PathBuf,
}

impl Tools {
    /// `PALISADE_AGENT_BIN` / `PALISADE_CNI_BIN`, else the binaries next to
    /// this executable (`cargo build` puts them in the same directory).
    pub fn locate() -> Result<Self> {
        let here = std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let find = |var: &str, name: &str| -> Result<PathBuf> {
            let p = std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| here.join(name));
            if !p.is_file() {
                bail!(
                    "{} not found (set {var}, or build it: cargo build -p palisade-agent -p palisade-cni)",
                    p.display()
                );
            }
            Ok(p)
        };
        Ok(Self {
            agent: find("PALISADE_AGENT_BIN", "palisade-agent")?,
            cni: find("PALISADE_CNI_BIN", "palisade")?,
        })
    }
}

/// A pod: its network namespace, the attachment the CNI plugin made.
pub struct PodNet {
    pub namespace: String,
    pub name: String,
    pub netns: Option<NetNs>,
    pub container_id: String,
    /// Its IPv4 address; unspecified for an IPv6-only pod.
    pub ip: Ipv4Addr,
    /// Its IPv6 address (`--ip-family ipv6|dual`).
    pub ip6: Option<Ipv6Addr>,
    /// The host-side interface, from the CNI result.
    pub host_if: String,
    /// The index of its node in [`Cluster::nodes`].
    pub node: usize,
    /// A host-network pod: its node's namespace (no CNI attachment).
    pub host_ns: Option<PathBuf>,
}

impl PodNet {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn netns_path(&self) -> PathBuf {
        if let Some(p) = &self.host_ns {
            return p.clone();
        }
        self.netns.as_ref().map(NetNs::path).unwrap_or_default()
    }
}

/// The agent process; stopped by PID.
pub struct AgentProc {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub flow_log: PathBuf,
}

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: kill(2) of the child this process started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!(
            "the agent (pid {}) ignored SIGTERM for 5 s and was killed",
            self.child.id()
        )
    }
}

/// One node: its namespace, agent, pin root and pod range.
pub struct SimNode {
    pub name: String,
    pub labels: Labels,
    pub netns: Option<NetNs>,
    /// Its agent's socket, state, IPAM and logs.
    pub dir: PathBuf,
    pub pin_root: PathBuf,
    pub agent: Option<AgentProc>,
    /// The range its pods' addresses come from (its podCIDR).
    pub subnet: String,
    /// Its address on the fabric (several nodes only).
    pub address: Option<Ipv4Addr>,
    /// Its IPv6 address on the fabric (several nodes, `--ip-family
    /// ipv6|dual`): the mirror of `address` (see [`family`]).
    pub address6: Option<Ipv6Addr>,
    /// Its IPv6 pod range (`--ip-family ipv6|dual`): the mirror of
    /// `subnet` (see [`family`]).
    pub subnet6: Option<String>,
    /// IPv6 addresses handed out so far (the next pod's is the mirror of
    /// the `subnet` address `2 + handed6`).
    pub handed6: u32,
}

/// The fabric's addresses: node `i` is `10.212.0.(i+1)`.
pub const FABRIC_PREFIX: &str = "10.212.0";

/// Where a cluster lives and what it is made of.
pub struct Cluster {
    pub name: String,
    /// The range every pod address comes from (`{{subnet}}`).
    pub subnet: String,
    pub tools: Tools,
    dir: Option<TempDir>,
    pub nodes: Vec<SimNode>,
    /// The namespace holding the fabric bridge (several nodes only).
    fabric: Option<NetNs>,
    /// `--routing` for the agents (several nodes only).
    pub routing: String,
    pub pods: Vec<PodNet>,
    /// Pod `namespace/name` -> node index (written as `spec.nodeName`).
    pub placement: BTreeMap<String, usize>,
    servers: Servers,
    torn_down: bool,
    /// Copy logs and manifests here before the scratch dir goes.
    pub keep: Option<PathBuf>,
    /// Which addresses pods get (`--ip-family`); see [`Cluster::set_family`].
    pub family: IpFamily,
    /// The IPv6 range every pod address comes from (`{{subnet}}` over
    /// IPv6), when pods get IPv6.
    pub subnet6: Option<String>,
    /// The hosts outside the cluster (FORMAT v2 `cluster.external`), see
    /// [`Cluster::add_external`].
    external: Option<NetNs>,
    /// `--cluster-dns` for the agents (`NAMESPACE/KEY=VALUE,...`): given
    /// only when the case's DNS pod is not the agents' default one.
    pub cluster_dns: Option<String>,
}

/// The link between a single node and the external namespace: the node
/// end, the external end (IPv4 /30 and IPv6 /64, inside the test only).
pub const EXTERNAL_LINK: (Ipv4Addr, Ipv4Addr) =
    (Ipv4Addr::new(10, 214, 0, 1), Ipv4Addr::new(10, 214, 0, 2));
pub const EXTERNAL_LINK6: (Ipv6Addr, Ipv6Addr) = (
    Ipv6Addr::new(0xfd00, 0x214, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfd00, 0x214, 0, 0, 0, 0, 0, 2),
);
/// The external namespace's address on the fabric (several nodes).
pub const EXTERNAL_FABRIC: Ipv4Addr = Ipv4Addr::new(10, 212, 0, 254);

fn spawn_in(netns: &Path, cmd: &mut Command) -> Result<Child> {
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let fd = ns.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (setns, setpgid, prctl); `ns` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Its own process group: a Ctrl-C at the terminal reaches only
            // the runner, which then stops the child in order.
            libc::setpgid(0, 0);
            // Dies with the runner even if the runner is killed outright.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    drop(ns);
    Ok(child)
}

fn wait_output(
    mut child: Child,
    stdin: &[u8],
    timeout: Duration,
) -> Result<(bool, String, String)> {
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin)?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            let out = child.wait_with_output()?;
            return Ok((
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no answer within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Manifest file names: one object per file, so a change rewrites one file.
fn namespace_file(name: &str) -> String {
    format!("ns_{name}.yaml")
}
fn pod_file(namespace: &str, name: &str) -> String {
    format!("pod_{namespace}_{name}.yaml")
}
fn policy_file(namespace: &str, name: &str) -> String {
    format!("np_{namespace}_{name}.yaml")
}

fn labels_value(labels: &Labels) -> Value {
    Value::Mapping(
        labels
            .iter()
            .map(|(k, v)| (Value::from(k.as_str()), Value::from(v.as_str())))
            .collect(),
    )
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Mapping(
        entries
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect::<Mapping>(),
    )
}

/// The Namespace manifest.
pub fn namespace_manifest(name: &str, labels: &Labels) -> Value {
    map(vec![
        ("apiVersion", "v1".into()),
        ("kind", "Namespace".into()),
        (
            "metadata",
            map(vec![
                ("name", name.into()),
                ("labels", labels_value(labels)),
            ]),
        ),
    ])
}

/// The Pod manifest on a node: `spec.nodeName` and, for a host-network
/// pod, `spec.hostNetwork` (several nodes).
pub fn pod_manifest_on(
    pod: &PodSpec,
    labels: &Labels,
    ip: Option<Ipv4Addr>,
    node: Option<&str>,
) -> Value {
    let mut doc = pod_manifest(pod, labels, ip);
    if let Some(n) = node {
        doc["spec"]["nodeName"] = n.into();
    }
    if pod.host_network {
        doc["spec"]["hostNetwork"] = true.into();
    }
    doc
}

/// The Node manifest: labels, podCIDR(s), the InternalIP.
pub fn node_manifest(node: &SimNode) -> Value {
    let mut doc = map(vec![
        ("apiVersion", "v1".into()),
        ("kind", "Node".into()),
        (
            "metadata",
            map(vec![
                ("name", node.name.as_str().into()),
                ("labels", labels_value(&node.labels)),
            ]),
        ),
        (
            "spec",
            map(vec![
                ("podCIDR", node.subnet.as_str().into()),
                (
                    "podCIDRs",
                    Value::Sequence(
                        std::iter::once(&node.subnet)
                            .chain(node.subnet6.as_ref())
                            .map(|c| c.as_str().into())
                            .collect(),
                    ),
                ),
            ]),
        ),
    ]);
    let addresses: Vec<Value> = (node.address.map(IpAddr::V4).into_iter())
        .chain(node.address6.map(IpAddr::V6))
        .map(|a| {
            map(vec![
                ("type", "InternalIP".into()),
                ("address", a.to_string().into()),
            ])
        })
        .collect();
    if !addresses.is_empty() {
        doc["status"] = map(vec![("addresses", Value::Sequence(addresses))]);
    }
    doc
}

/// The Pod manifest: one container with the pod's ports; the address once
/// the pod has one (as the kubelet reports it after the CNI ADD).
pub fn pod_manifest(pod: &PodSpec, labels: &Labels, ip: Option<Ipv4Addr>) -> Value {
    let ips: Vec<IpAddr> = ip.into_iter().map(IpAddr::from).collect();
    pod_manifest_ips(pod, labels, &ips)
}

/// The Pod manifest with every address of the pod: `podIP` the first,
/// and `podIPs` all of them when one is IPv6 (an IPv4-only pod's manifest
/// is the one it always was).
pub fn pod_manifest_ips(pod: &PodSpec, labels: &Labels, ips: &[IpAddr]) -> Value {
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            let mut e = vec![
                ("containerPort", Value::from(p.port)),
                ("protocol", p.protocol.as_str().into()),
            ];
            if let Some(n) = &p.name {
                e.insert(0, ("name", n.as_str().into()));
            }
            map(e)
        })
        .collect();
    let mut doc = vec![
        ("apiVersion", "v1".into()),
        ("kind", "Pod".into()),
        (
            "metadata",
            map(vec![
                ("name", pod.name.as_str().into()),
                ("namespace", pod.namespace.as_str().into()),
                ("labels", labels_value(labels)),
            ]),
        ),
        (
            "spec",
            map(vec![(
                "containers",
                Value::Sequence(vec![map(vec![
                    ("name", "main".into()),
                    ("image", "palisade.dev/conformance-server".into()),
                    ("ports", Value::Sequence(ports)),
                ])]),
            )]),
        ),
    ];
    if let Some(ip) = ips.first() {
        let mut status = vec![
            ("phase", "Running".into()),
            ("podIP", ip.to_string().into()),
        ];
        if ips.iter().any(IpAddr::is_ipv6) {
            let all = ips
                .iter()
                .map(|i| map(vec![("ip", i.to_string().into())]))
                .collect();
            status.push(("podIPs", Value::Sequence(all)));
        }
        doc.push(("status", map(status)));
    }
    map(doc)
}

impl Cluster {
    /// The scratch directory, the node namespace and the manifest
    /// directory; `pin_parent` holds this cluster's pin root.
    pub fn new(name: &str, tools: Tools, pin_parent: &Path, subnet: &str) -> Result<Self> {
        let mut c = Self::empty(name, tools, subnet)?;
        let dir = c.dir().to_path_buf();
        for d in ["state", "ipam"] {
            fs::create_dir_all(dir.join(d))?;
        }
        let node = NetNs::new(signal::NETNS_PREFIX)?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        c.nodes.push(SimNode {
            name: String::new(),
            labels: Labels::new(),
            netns: Some(node),
            pin_root: pin_parent.join(dir.file_name().expect("named").to_string_lossy().as_ref()),
            dir,
            agent: None,
            subnet: subnet.to_string(),
            address: None,
            subnet6: None,
            address6: None,
            handed6: 0,
        });
        Ok(c)
    }

    fn empty(name: &str, tools: Tools, subnet: &str) -> Result<Self> {
        let dir = TempDir::new(signal::PIN_PREFIX)?;
        let c = Self {
            name: name.to_string(),
            subnet: subnet.to_string(),
            tools,
            dir: Some(dir),
            nodes: Vec::new(),
            fabric: None,
            routing: "native".into(),
            pods: Vec::new(),
            placement: BTreeMap::new(),
            servers: Servers::default(),
            torn_down: false,
            keep: None,
            family: IpFamily::Ipv4,
            subnet6: None,
            external: None,
            cluster_dns: None,
        };
        fs::create_dir_all(c.manifests())?;
        Ok(c)
    }

    /// Several nodes joined by a fabric: node `i` gets the pod range
    /// `subnets[i]` and the address `10.212.0.(i+1)` on its uplink; its
    /// agent routes with `routing` (native or vxlan).
    pub fn with_nodes(
        name: &str,
        tools: Tools,
        pin_parent: &Path,
        subnet: &str,
        nodes: &[super::case::NodeSpec],
        subnets: &[String],
        routing: &str,
    ) -> Result<Self> {
        if nodes.is_empty() || nodes.len() > 250 || subnets.len() < nodes.len() {
            bail!("a cluster needs 1 to 250 nodes, each with a pod range");
        }
        let mut c = Self::empty(name, tools, subnet)?;
        c.routing = routing.to_string();
        let fabric = NetNs::new(signal::NETNS_PREFIX)?;
        fabric.ip(&["link", "add", "fab0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "fab0", "up"])?;
        c.fabric = Some(fabric);
        let base = c.dir().to_path_buf();
        let stem = base
            .file_name()
            .expect("named")
            .to_string_lossy()
            .into_owned();
        for (i, spec) in nodes.iter().enumerate() {
            let dir = base.join(format!("node-{}", spec.name));
            for d in ["state", "ipam"] {
                fs::create_dir_all(dir.join(d))?;
            }
            let ns = NetNs::new(signal::NETNS_PREFIX)?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            let address: Ipv4Addr = format!("{FABRIC_PREFIX}.{}", i + 1).parse()?;
            let fab = c.fabric.as_ref().expect("just made");
            let port = format!("fp{i}");
            fab.ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "up0", "netns", &ns.name,
            ])?;
            fab.ip(&["link", "set", &port, "master", "fab0", "up"])?;
            ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "up0"])?;
            ns.ip(&["link", "set", "up0", "up"])?;
            c.nodes.push(SimNode {
                name: spec.name.clone(),
                labels: spec.labels.clone(),
                netns: Some(ns),
                dir,
                pin_root: pin_parent.join(format!("{stem}-{i}")),
                agent: None,
                subnet: subnets[i].clone(),
                address: Some(address),
                subnet6: None,
                address6: None,
                handed6: 0,
            });
        }
        Ok(c)
    }

    /// Which addresses pods get; before any pod is added. Each node's IPv6
    /// range mirrors its IPv4 one.
    pub fn set_family(&mut self, f: IpFamily) -> Result<()> {
        if !self.pods.is_empty() {
            bail!("the IP family is set before pods are added");
        }
        self.family = f;
        let v6 = f != IpFamily::Ipv4;
        self.subnet6 = if v6 {
            Some(family::mirror_cidr(&self.subnet)?)
        } else {
            None
        };
        // The fabric's IPv6 prefix: the mirror of its IPv4 /24.
        let fabric6 = family::mirror_cidr(&format!("{FABRIC_PREFIX}.0/24"))?;
        let len = fabric6
            .split_once('/')
            .map_or("128", |(_, l)| l)
            .to_string();
        for n in &mut self.nodes {
            n.subnet6 = if v6 {
                Some(family::mirror_cidr(&n.subnet)?)
            } else {
                None
            };
            // Several nodes: each gets the mirror of its fabric address,
            // routes IPv6 itself and says so in its Node object.
            let (Some(a), Some(ns), true) = (n.address, &n.netns, v6) else {
                continue;
            };
            let a6 = family::mirror(a);
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a6}/{len}"),
                "dev",
                "up0",
                "nodad",
            ])?;
            n.address6 = Some(a6);
        }
        Ok(())
    }

    /// More than the classic one node (Node objects, node names, uplinks).
    pub fn multi(&self) -> bool {
        self.fabric.is_some()
    }

    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("scratch dir lives until teardown")
            .path()
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir().join("manifests")
    }

    /// The first node's namespace.
    pub fn node(&self) -> Result<&NetNs> {
        self.node_ns(0)
    }

    pub fn node_ns(&self, i: usize) -> Result<&NetNs> {
        self.nodes
            .get(i)
            .and_then(|n| n.netns.as_ref())
            .ok_or_else(|| anyhow!("the node namespace is gone"))
    }

    /// The first node's agent.
    pub fn agent(&self) -> Option<&AgentProc> {
        self.nodes.first().and_then(|n| n.agent.as_ref())
    }

    /// Every running agent's flow log.
    pub fn flow_logs(&self) -> Vec<PathBuf> {
        self.nodes
            .iter()
            .filter_map(|n| n.agent.as_ref().map(|a| a.flow_log.clone()))
            .collect()
    }

    pub fn pod(&self, key: &str) -> Option<&PodNet> {
        self.pods.iter().find(|p| p.key() == key)
    }

    fn write(&self, file: &str, doc: &Value) -> Result<()> {
        let text = serde_yaml::to_string(doc)?;
        crate::agent::write_manifest(&self.manifests(), file, &text)
            .with_context(|| format!("writing manifest {file}"))
    }

    /// Any other object, as `file` in the manifest directory.
    pub fn write_object(&self, file: &str, doc: &Value) -> Result<()> {
        self.write(file, doc)
    }

    /// `iptables-restore --noflush` (IPv4) or `ip6tables-restore
    /// --noflush` (IPv6) of `rules` in every node namespace (as kube-proxy's
    /// proxier of family `f` writes its rules), and a route for
    /// `unreachable` (a range of that family) that keeps it inside the
    /// test: unreachable on a single node, the fabric when there are
    /// several.
    pub fn install_node_rules(&self, f: Family, rules: &str, unreachable: &str) -> Result<()> {
        use std::io::Write as _;
        let restore = match f {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        };
        for i in 0..self.nodes.len() {
            let node = self.node_ns(i)?;
            let mut child = std::process::Command::new("ip")
                .args(["netns", "exec", &node.name, restore, "--noflush"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("running {restore} in the node namespace"))?;
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(rules.as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!(
                    "{restore} (kube-proxy's rules) failed: {}\n{rules}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if self.nodes[i].address.is_some() {
                // A node with an uplink: its own processes (host-network
                // pods) must get past the route lookup at connect() for
                // kube-proxy's OUTPUT DNAT to apply, as on a node with a
                // default route; what no rule translates goes onto the
                // fabric, where no node answers for it.
                crate::ip(&[
                    "-n",
                    &node.name,
                    "route",
                    "replace",
                    unreachable,
                    "dev",
                    "up0",
                ])?;
            } else {
                crate::ip(&[
                    "-n",
                    &node.name,
                    "route",
                    "replace",
                    "unreachable",
                    unreachable,
                ])?;
            }
        }
        Ok(())
    }

    pub fn write_namespace(&self, name: &str, labels: &Labels) -> Result<()> {
        self.write(&namespace_file(name), &namespace_manifest(name, labels))
    }

    /// Every node's Node object (several nodes only).
    pub fn write_nodes(&self) -> Result<()> {
        if !self.multi() {
            return Ok(());
        }
        for n in &self.nodes {
            self.write(&format!("node_{}.yaml", n.name), &node_manifest(n))?;
        }
        Ok(())
    }

    pub fn write_pod(&self, pod: &PodSpec, labels: &Labels, ip: Option<Ipv4Addr>) -> Result<()> {
        // Once it has an address: the IPv6 one too, and only that of an
        // IPv6-only pod.
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(ip) = ip {
            if !ip.is_unspecified() {
                ips.push(ip.into());
            }
            if let Some(v6) = self.pod(&pod.key()).and_then(|p| p.ip6) {
                ips.push(v6.into());
            }
        }
        let node = if self.multi() {
            self.placement
                .get(&pod.key())
                .and_then(|i| self.nodes.get(*i))
                .map(|n| n.name.as_str())
        } else {
            None
        };
        let mut doc = pod_manifest_ips(pod, labels, &ips);
        if let Some(n) = node {
            doc["spec"]["nodeName"] = n.into();
        }
        if pod.host_network {
            doc["spec"]["hostNetwork"] = true.into();
        }
        self.write(&pod_file(&pod.namespace, &pod.name), &doc)
    }

    pub fn write_policy(&self, namespace: &str, name: &str, doc: &Value) -> Result<()> {
        self.write(&policy_file(namespace, name), doc)
    }

    pub fn delete_policy(&self, namespace: &str, name: &str) -> Result<()> {
        let p = self.manifests().join(policy_file(namespace, name));
        fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }

    /// `palisade-agent run` in every node namespace, standalone on the
    /// manifest directory; returns once each answers on its socket.
    pub fn start_agent(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.start_agent_on(i)?;
        }
        Ok(())
    }

    fn start_agent_on(&mut self, i: usize) -> Result<()> {
        let multi = self.multi();
        let manifests = self.manifests();
        let routing = self.routing.clone();
        let node = &self.nodes[i];
        let dir = node.dir.clone();
        let log = dir.join("agent.log");
        let socket = dir.join("agent.sock");
        let flow_log = dir.join("flows.jsonl");
        let mut cmd = Command::new(&self.tools.agent);
        cmd.arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-root")
            .arg(&node.pin_root)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--manifests")
            .arg(manifests)
            .arg("--flow-log")
            .arg(&flow_log)
            .env(
                "RUST_LOG",
                std::env::var("PALISADE_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        if let Some(d) = &self.cluster_dns {
            cmd.args(["--cluster-dns", d]);
        }
        if multi {
            // Each node is a namespace of its own: the same port on each
            // node's loopback, as on real nodes.
            cmd.args(["--node-name", &node.name])
                .args(["--routing", &routing])
                .args(["--metrics-addr", "127.0.0.1:9962"]);
        } else {
            cmd.args(["--metrics-addr", "off"]);
        }
        let child = spawn_in(&self.node_ns(i)?.path(), &mut cmd)?;
        self.nodes[i].agent = Some(AgentProc {
            child,
            socket: socket.clone(),
            log,
            flow_log,
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            signal::check()?;
            if let Ok(Response::Status(_)) = call(&socket, &Request::Status, Duration::from_secs(2))
            {
                return Ok(());
            }
            let a = self.nodes[i].agent.as_mut().expect("just set");
            if let Some(st) = a.child.try_wait()? {
                bail!(
                    "palisade-agent exited ({st}) during startup:\n{}",
                    self.agent_log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "palisade-agent did not answer within 60 s:\n{}",
                    self.agent_log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn agent_on(&self, i: usize) -> Result<&AgentProc> {
        self.nodes
            .get(i)
            .and_then(|n| n.agent.as_ref())
            .ok_or_else(|| anyhow!("the agent is not running"))
    }

    /// A request to the first node's agent.
    pub fn request(&self, req: &Request) -> Result<Response> {
        self.request_on(0, req)
    }

    pub fn request_on(&self, i: usize, req: &Request) -> Result<Response> {
        Ok(call(
            &self.agent_on(i)?.socket,
            req,
            Duration::from_secs(60),
        )?)
    }

    /// Re-read the manifests now, on every node; returns the first node's
    /// programmed generation that includes them (each agent answers only
    /// once it is in the kernel).
    pub fn sync(&self) -> Result<u64> {
        let mut first = 0;
        for i in 0..self.nodes.len() {
            let g = match self.request_on(i, &Request::Sync)? {
                Response::Ok { generation, .. } => generation,
                Response::Error { message, .. } => bail!("agent Sync failed: {message}"),
                other => bail!("agent Sync: unexpected answer {other:?}"),
            };
            if i == 0 {
                first = g;
            }
        }
        Ok(first)
    }

    pub fn status(&self) -> Result<StatusReport> {
        self.status_on(0)
    }

    pub fn status_on(&self, i: usize) -> Result<StatusReport> {
        match self.request_on(i, &Request::Status)? {
            Response::Status(s) => Ok(*s),
            other => bail!("agent Status: unexpected answer {other:?}"),
        }
    }

    /// Waits until every agent has routed every other node's pod range
    /// (the route sync runs beside the map sync).
    pub fn wait_routes(&self, timeout: Duration) -> Result<()> {
        if !self.multi() {
            return Ok(());
        }
        // A route per other node and family of pod ranges.
        let families = 1 + usize::from(self.nodes.iter().any(|n| n.subnet6.is_some()));
        let want = (self.nodes.len() - 1) * families;
        let deadline = Instant::now() + timeout;
        for i in 0..self.nodes.len() {
            loop {
                let st = self.status_on(i)?;
                let r = st.routing.clone().unwrap_or_default();
                if r.routes.len() == want && r.error.is_none() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "node {}: its agent routed {} of {want} other nodes within {timeout:?}: {r:?}",
                        self.nodes[i].name,
                        r.routes.len()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Waits until no IPv6 address in the node and pod namespaces is
    /// tentative. The CNI plugin adds pod and gateway addresses without
    /// duplicate address detection, but the veths' link-local addresses go
    /// through it (about 1.5 s after the link comes up), and until the host
    /// end's is usable the node sends no neighbour solicitation for a pod
    /// address it forwards to: the first IPv6 probes would fail for a
    /// reason that is not policy.
    pub fn wait_ipv6_ready(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let mut spaces: Vec<(String, &NetNs)> = Vec::new();
        for n in &self.nodes {
            if let Some(ns) = &n.netns {
                spaces.push((format!("node {}", n.name), ns));
            }
        }
        for p in &self.pods {
            if let (Some(ns), Some(_)) = (&p.netns, p.ip6) {
                spaces.push((format!("pod {}", p.key()), ns));
            }
        }
        let deadline = started + timeout;
        for (what, ns) in spaces {
            loop {
                signal::check()?;
                let out = ns.ip(&["-6", "-o", "addr", "show", "tentative"])?;
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if text.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{what}: IPv6 addresses still tentative after {timeout:?}:\n{text}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(started.elapsed())
    }

    /// Every agent's log (prefixed by node when there are several).
    pub fn agent_log(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let log = n
                .agent
                .as_ref()
                .and_then(|a| fs::read_to_string(&a.log).ok())
                .unwrap_or_default();
            if self.multi() {
                for l in log.lines() {
                    out.push_str(&format!("[{}] {l}\n", n.name));
                }
            } else {
                out.push_str(&log);
            }
        }
        out
    }

    /// How an agent ended, if one is no longer running.
    pub fn agent_exit(&mut self) -> Option<String> {
        let multi = self.multi();
        for n in &mut self.nodes {
            let Some(a) = n.agent.as_mut() else { continue };
            if let Ok(Some(st)) = a.child.try_wait() {
                return Some(if multi {
                    format!("{st}, node {}", n.name)
                } else {
                    st.to_string()
                });
            }
        }
        None
    }

    pub fn agent_log_tail(&self, n: usize) -> String {
        let log = self.agent_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| format!("    | {l}\n"))
            .collect()
    }

    /// The network configuration; with IPv6, the plugin's `ranges` form
    /// (IPv4 and/or IPv6), the IPv6 range narrowed to `pin6` for an ADD
    /// (the runner's choice of address, see [`family`]).
    fn cni_config(&self, node: usize, pin6: Option<Ipv6Addr>) -> String {
        let n = &self.nodes[node];
        let ipam = match (&n.subnet6, self.family) {
            (Some(v6), f) if f != IpFamily::Ipv4 => {
                let mut range6 = serde_json::json!({"subnet": v6});
                if let Ok(gw) = family_gateway6(&n.subnet) {
                    range6["gateway"] = gw.to_string().into();
                }
                if let Some(a) = pin6 {
                    range6["rangeStart"] = a.to_string().into();
                    range6["rangeEnd"] = a.to_string().into();
                }
                let mut ranges = Vec::new();
                if f == IpFamily::Dual {
                    ranges.push(serde_json::json!([{"subnet": n.subnet}]));
                }
                ranges.push(serde_json::json!([range6]));
                serde_json::json!({"type": "palisade", "ranges": ranges, "dataDir": n.dir.join("ipam")})
            }
            _ => {
                serde_json::json!({"type": "palisade", "subnet": n.subnet, "dataDir": n.dir.join("ipam")})
            }
        };
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "palisade-conformance",
            "type": "palisade",
            "agentSocket": n.dir.join("agent.sock"),
            "agentTimeoutMs": 30000,
            "ipam": ipam,
        })
        .to_string()
    }

    /// The IPv6 address node `node`'s next pod gets: the mirror of the
    /// IPv4 address it would get from a fresh range (`.2`, `.3`, ...).
    fn next_ip6(&mut self, node: usize) -> Result<Ipv6Addr> {
        let n = &mut self.nodes[node];
        let (net, len) = parse_v4_cidr(&n.subnet)?;
        let k = 2 + n.handed6;
        if len < 31 && u64::from(k) >= (1u64 << (32 - len)) - 1 {
            bail!("node {}: no IPv6 address left in {}", n.name, n.subnet);
        }
        n.handed6 += 1;
        Ok(family::mirror(Ipv4Addr::from(u32::from(net) + k)))
    }

    /// Runs the CNI binary as a runtime does, from the node's namespace.
    fn cni(
        &self,
        node: usize,
        call: CniCall,
        container_id: &str,
        netns: &Path,
        namespace: &str,
        pod: &str,
    ) -> Result<String> {
        let (command, pin6) = match call {
            CniCall::Add { pin6 } => ("ADD", pin6),
            CniCall::Del => ("DEL", None),
        };
        let cni_dir = self
            .tools
            .cni
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut cmd = Command::new(&self.tools.cni);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id}"),
            )
            .env("CNI_PATH", cni_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = spawn_in(&self.node_ns(node)?.path(), &mut cmd)?;
        let (ok, out, err) = wait_output(
            child,
            self.cni_config(node, pin6).as_bytes(),
            Duration::from_secs(60),
        )
        .with_context(|| format!("CNI {command} of {namespace}/{pod}"))?;
        if !ok {
            bail!(
                "CNI {command} of {namespace}/{pod} failed: {}\n    stderr: {}",
                out.trim(),
                err.trim()
            );
        }
        Ok(out)
    }

    /// A pod namespace on the first node, attached by CNI ADD.
    pub fn add_pod(&mut self, namespace: &str, name: &str) -> Result<&PodNet> {
        self.add_pod_on(0, namespace, name)
    }

    /// A pod namespace on node `node`, attached by that node's CNI ADD.
    /// The pod is recorded before the ADD, so a failed ADD is still
    /// followed by a DEL.
    pub fn add_pod_on(&mut self, node: usize, namespace: &str, name: &str) -> Result<&PodNet> {
        signal::check()?;
        let netns = NetNs::new(signal::NETNS_PREFIX)?;
        let container_id = format!("conf-{}", unique(""));
        let path = netns.path();
        self.pods.push(PodNet {
            namespace: namespace.into(),
            name: name.into(),
            netns: Some(netns),
            container_id: container_id.clone(),
            ip: Ipv4Addr::UNSPECIFIED,
            ip6: None,
            host_if: String::new(),
            node,
            host_ns: None,
        });
        let pin6 = match self.family {
            IpFamily::Ipv4 => None,
            IpFamily::Ipv6 | IpFamily::Dual => Some(self.next_ip6(node)?),
        };
        let out = self
            .cni(
                node,
                CniCall::Add { pin6 },
                &container_id,
                &path,
                namespace,
                name,
            )
            .map_err(|e| match self.family {
                // The agent refuses what it cannot enforce (code 111).
                IpFamily::Ipv6 => {
                    e.context("--ip-family ipv6: IPv6-only pods need an agent that enforces them")
                }
                _ => e,
            })?;
        let result: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("CNI ADD result of {namespace}/{name}: {out}"))?;
        let (ip4, ip6) = result_addresses(&result)
            .with_context(|| format!("CNI ADD result of {namespace}/{name}: {out}"))?;
        let what = |fam: &str| {
            format!(
                "CNI ADD result of {namespace}/{name} has no {fam} address (--ip-family {}): {out}",
                self.family
            )
        };
        let ip = match (self.family, ip4) {
            (IpFamily::Ipv6, _) => Ipv4Addr::UNSPECIFIED,
            (_, Some(ip)) => ip,
            (_, None) => bail!("{}", what("IPv4")),
        };
        let ip6 = match (pin6, ip6) {
            (None, _) => None,
            (Some(want), Some(got)) if want == got => Some(got),
            (Some(want), Some(got)) => {
                bail!("CNI ADD of {namespace}/{name} gave {got}, not the asked-for {want}")
            }
            (Some(_), None) => bail!("{}", what("IPv6")),
        };
        let host_if = result["interfaces"]
            .as_array()
            .and_then(|ifs| {
                ifs.iter()
                    .find(|i| i["sandbox"].as_str().unwrap_or_default().is_empty())
            })
            .and_then(|i| i["name"].as_str())
            .unwrap_or_default()
            .to_string();
        let pod = self.pods.last_mut().expect("just pushed");
        pod.ip = ip;
        pod.ip6 = ip6;
        pod.host_if = host_if;
        Ok(pod)
    }

    /// A host-network pod of node `node`: its node's namespace and
    /// address, no CNI attachment.
    pub fn add_host_pod(&mut self, node: usize, namespace: &str, name: &str) -> Result<&PodNet> {
        let n = self
            .nodes
            .get(node)
            .ok_or_else(|| anyhow!("no node {node}"))?;
        let ip = n.address.ok_or_else(|| {
            anyhow!("{namespace}/{name}: a host-network pod needs a node with an address")
        })?;
        let ip6 = n.address6;
        let host_ns = self.node_ns(node)?.path();
        self.pods.push(PodNet {
            namespace: namespace.into(),
            name: name.into(),
            netns: None,
            container_id: String::new(),
            ip,
            ip6,
            host_if: String::new(),
            node,
            host_ns: Some(host_ns),
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Deletes a pod as the kubelet and API server would: CNI DEL on its
    /// node, its namespace, its manifest.
    pub fn remove_pod(&mut self, key: &str) -> Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.key() == key)
            .ok_or_else(|| anyhow!("no pod {key}"))?;
        let mut pod = self.pods.remove(i);
        if pod.host_ns.is_none() {
            let path = pod.netns_path();
            self.cni(
                pod.node,
                CniCall::Del,
                &pod.container_id,
                &path,
                &pod.namespace,
                &pod.name,
            )?;
            drop(pod.netns.take());
        }
        let f = self.manifests().join(pod_file(&pod.namespace, &pod.name));
        fs::remove_file(&f).with_context(|| format!("removing {}", f.display()))
    }

    /// Serve `ports` in the pod `key`.
    pub fn serve(&mut self, key: &str, ports: Vec<(u16, Protocol)>) -> Result<()> {
        let path = self
            .pod(key)
            .ok_or_else(|| anyhow!("no pod {key}"))?
            .netns_path();
        let ipv6 = self.pod(key).is_some_and(|p| p.ip6.is_some());
        self.servers.serve_on(path, ports, ipv6)
    }

    /// Serve `ports` in the pod `key`, which is the cluster DNS: its UDP
    /// sockets answer queries from `zone`, its TCP port 53 speaks DNS over
    /// TCP; anything else is served as by every pod.
    pub fn serve_dns(
        &mut self,
        key: &str,
        ports: Vec<(u16, Protocol)>,
        zone: std::sync::Arc<super::dns::Zone>,
    ) -> Result<()> {
        let path = self
            .pod(key)
            .ok_or_else(|| anyhow!("no pod {key}"))?
            .netns_path();
        let ipv6 = self.pod(key).is_some_and(|p| p.ip6.is_some());
        self.servers.serve_dns(path, ports, ipv6, Some(zone))
    }

    /// The hosts outside the cluster (FORMAT v2 `cluster.external`): one
    /// network namespace behind the node's uplink holding every host's
    /// address (IPv4, and its mirror under `--ip-family ipv6|dual`) on
    /// its loopback, each host serving its own ports on its own address.
    ///
    /// One node: a veth from the node (`ext0`, [`EXTERNAL_LINK`]) to the
    /// namespace, a route per host address in the node via it, a default
    /// route back in the namespace. Several nodes: the namespace is
    /// attached to the fabric like another node ([`EXTERNAL_FABRIC`] and
    /// its mirror), every node routes the host addresses there, and the
    /// namespace routes each node's pod ranges to that node. Pod traffic
    /// is not translated on its way out (the hosts see pod addresses).
    pub fn add_external(&mut self, hosts: &[(Ipv4Addr, Vec<(u16, Protocol)>)]) -> Result<()> {
        if hosts.is_empty() {
            return Ok(());
        }
        let v6 = self.family != IpFamily::Ipv4;
        let ext = NetNs::new(signal::NETNS_PREFIX)?;
        let name = ext.name.clone();
        // Recorded at once: torn down whatever fails below.
        self.external = Some(ext);
        let ext = self.external.as_ref().expect("just set");
        for (a, _) in hosts {
            ext.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
            if v6 {
                let m = family::mirror(*a);
                ext.ip(&["-6", "addr", "add", &format!("{m}/128"), "dev", "lo"])?;
            }
        }
        // (host route target, IPv4 next hop, IPv6 next hop) for the nodes.
        let (via, via6, dev) = if let Some(fab) = &self.fabric {
            fab.ip(&[
                "link", "add", "fpext", "type", "veth", "peer", "name", "up0", "netns", &name,
            ])?;
            if v6 {
                ext.sysctl("net.ipv6.conf.up0.accept_dad", "0")?;
            }
            fab.ip(&["link", "set", "fpext", "master", "fab0", "up"])?;
            ext.ip(&[
                "addr",
                "add",
                &format!("{EXTERNAL_FABRIC}/24"),
                "dev",
                "up0",
            ])?;
            ext.ip(&["link", "set", "up0", "up"])?;
            let fabric6 = family::mirror_cidr(&format!("{FABRIC_PREFIX}.0/24"))?;
            let len = fabric6.split_once('/').map_or("128", |(_, l)| l);
            let e6 = family::mirror(EXTERNAL_FABRIC);
            if v6 {
                ext.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{e6}/{len}"),
                    "dev",
                    "up0",
                    "nodad",
                ])?;
            }
            for n in &self.nodes {
                let a = n
                    .address
                    .ok_or_else(|| anyhow!("node {} has no fabric address", n.name))?;
                ext.ip(&["route", "add", &n.subnet, "via", &a.to_string()])?;
                if let (true, Some(s6), Some(a6)) = (v6, &n.subnet6, n.address6) {
                    ext.ip(&["-6", "route", "add", s6, "via", &a6.to_string()])?;
                }
            }
            (EXTERNAL_FABRIC, e6, "up0")
        } else {
            let node = self.node_ns(0)?;
            node.ip(&[
                "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", &name,
            ])?;
            let (n4, e4) = EXTERNAL_LINK;
            let (n6, e6) = EXTERNAL_LINK6;
            if v6 {
                node.sysctl("net.ipv6.conf.ext0.accept_dad", "0")?;
                ext.sysctl("net.ipv6.conf.eth0.accept_dad", "0")?;
                node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            }
            node.ip(&["addr", "add", &format!("{n4}/30"), "dev", "ext0"])?;
            node.ip(&["link", "set", "ext0", "up"])?;
            ext.ip(&["addr", "add", &format!("{e4}/30"), "dev", "eth0"])?;
            ext.ip(&["link", "set", "eth0", "up"])?;
            ext.ip(&["route", "add", "default", "via", &n4.to_string()])?;
            if v6 {
                node.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{n6}/64"),
                    "dev",
                    "ext0",
                    "nodad",
                ])?;
                ext.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{e6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
                ext.ip(&["-6", "route", "add", "default", "via", &n6.to_string()])?;
            }
            (e4, e6, "ext0")
        };
        for i in 0..self.nodes.len() {
            let node = self.node_ns(i)?;
            for (a, _) in hosts {
                node.ip(&[
                    "route",
                    "replace",
                    &format!("{a}/32"),
                    "via",
                    &via.to_string(),
                    "dev",
                    dev,
                ])?;
                if v6 {
                    node.ip(&[
                        "-6",
                        "route",
                        "replace",
                        &format!("{}/128", family::mirror(*a)),
                        "via",
                        &via6.to_string(),
                        "dev",
                        dev,
                    ])?;
                }
            }
        }
        let mut at: Vec<(IpAddr, u16, Protocol)> = Vec::new();
        for (a, ports) in hosts {
            for (port, proto) in ports {
                at.push(((*a).into(), *port, *proto));
                if v6 {
                    at.push((family::mirror(*a).into(), *port, *proto));
                }
            }
        }
        at.sort();
        at.dedup();
        let path = ext.path();
        self.servers.serve_at(path, at)
    }

    /// Pod addresses by `namespace/name`.
    pub fn addresses(&self) -> BTreeMap<String, Ipv4Addr> {
        self.pods.iter().map(|p| (p.key(), p.ip)).collect()
    }

    /// IPv6 pod addresses by `namespace/name` (pods that have one).
    pub fn addresses6(&self) -> BTreeMap<String, Ipv6Addr> {
        self.pods
            .iter()
            .filter_map(|p| Some((p.key(), p.ip6?)))
            .collect()
    }

    /// Node addresses by name (several nodes).
    pub fn node_addresses(&self) -> BTreeMap<String, Ipv4Addr> {
        self.nodes
            .iter()
            .filter_map(|n| Some((n.name.clone(), n.address?)))
            .collect()
    }

    /// Node IPv6 addresses by name (several nodes, IPv6 runs).
    pub fn node_addresses6(&self) -> BTreeMap<String, Ipv6Addr> {
        self.nodes
            .iter()
            .filter_map(|n| Some((n.name.clone(), n.address6?)))
            .collect()
    }

    /// Everything, in reverse; keeps going after errors and returns them.
    pub fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errs = Vec::new();
        self.servers.stop();
        if let (Some(keep), Some(dir)) = (&self.keep, &self.dir) {
            if let Err(e) = copy_dir(dir.path(), keep) {
                errs.push(format!("keeping logs in {}: {e:#}", keep.display()));
            }
        }
        while let Some(mut pod) = self.pods.pop() {
            if pod.host_ns.is_some() {
                continue;
            }
            let path = pod.netns_path();
            if self.nodes.get(pod.node).is_some_and(|n| n.netns.is_some()) {
                if let Err(e) = self.cni(
                    pod.node,
                    CniCall::Del,
                    &pod.container_id,
                    &path,
                    &pod.namespace,
                    &pod.name,
                ) {
                    errs.push(format!("{e:#}"));
                }
            }
            drop(pod.netns.take());
            if path.exists() {
                errs.push(format!(
                    "network namespace {} of {} is still there",
                    path.display(),
                    pod.key()
                ));
            }
        }
        for n in &mut self.nodes {
            if let Some(mut a) = n.agent.take() {
                if let Err(e) = a.stop() {
                    errs.push(format!("{e:#}"));
                }
            }
        }
        for n in &mut self.nodes {
            if let Err(e) =
                palisade_dataplane::loader::remove_all(&palisade_dataplane::Pins::new(&n.pin_root))
            {
                errs.push(format!("removing pins {}: {e}", n.pin_root.display()));
            }
            if let Some(node) = n.netns.take() {
                let path = node.path();
                drop(node);
                if path.exists() {
                    errs.push(format!("node namespace {} is still there", path.display()));
                }
            }
        }
        if let Some(ext) = self.external.take() {
            let path = ext.path();
            drop(ext);
            if path.exists() {
                errs.push(format!(
                    "external namespace {} is still there",
                    path.display()
                ));
            }
        }
        drop(self.fabric.take());
        drop(self.dir.take());
        errs
    }
}

/// A CNI command; an ADD may narrow the IPv6 range to the runner's choice.
#[derive(Clone, Copy, Debug)]
enum CniCall {
    Add { pin6: Option<Ipv6Addr> },
    Del,
}

/// An IPv4 CIDR's network and length.
fn parse_v4_cidr(cidr: &str) -> Result<(Ipv4Addr, u32)> {
    let (ip, len) = cidr
        .split_once('/')
        .ok_or_else(|| anyhow!("{cidr:?} is not a CIDR"))?;
    let len: u32 = len.parse().context(format!("{cidr:?}"))?;
    if len > 32 {
        bail!("{cidr:?} is not an IPv4 CIDR");
    }
    Ok((ip.parse().context(format!("{cidr:?}"))?, len))
}

/// The IPv6 gateway of a node's pods: the mirror of its IPv4 one (the
/// range's first address).
fn family_gateway6(subnet: &str) -> Result<Ipv6Addr> {
    let (net, _) = parse_v4_cidr(subnet)?;
    Ok(family::mirror(Ipv4Addr::from(u32::from(net) + 1)))
}

/// The IPv4 and IPv6 address of a CNI result (`ips[].address`).
fn result_addresses(result: &serde_json::Value) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let ips = result["ips"].as_array().ok_or_else(|| anyhow!("no ips"))?;
    let (mut v4, mut v6) = (None, None);
    for i in ips {
        let addr = i["address"]
            .as_str()
            .ok_or_else(|| anyhow!("an ips entry has no address"))?;
        let ip: IpAddr = addr
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("address {addr:?}"))?;
        match ip {
            IpAddr::V4(a) if v4.is_none() => v4 = Some(a),
            IpAddr::V6(a) if v6.is_none() => v6 = Some(a),
            _ => {}
        }
    }
    if v4.is_none() && v6.is_none() {
        bail!("no ips[].address");
    }
    Ok((v4, v6))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else if t.is_file() {
            fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("cleanup: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::case::PortSpec;

    #[test]
    fn manifests_are_kubernetes_objects() {
        let pod = PodSpec {
            namespace: "x".into(),
            name: "a".into(),
            labels: [("pod".to_string(), "a".to_string())].into(),
            ports: vec![
                PortSpec {
                    port: 80,
                    protocol: Protocol::Tcp,
                    name: Some("http".into()),
                },
                PortSpec {
                    port: 53,
                    protocol: Protocol::Udp,
                    name: None,
                },
            ],
            node: None,
            host_network: false,
        };
        let text = serde_yaml::to_string(&pod_manifest(
            &pod,
            &pod.labels,
            Some(Ipv4Addr::new(10, 213, 0, 2)),
        ))
        .unwrap();
        assert_eq!(
            text,
            "apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: x
  labels:
    pod: a
spec:
  containers:
  - name: main
    image: palisade.dev/conformance-server
    ports:
    - name: http
      containerPort: 80
      protocol: TCP
    - containerPort: 53
      protocol: UDP
status:
  phase: Running
  podIP: 10.213.0.2
"
        );
        // With an IPv6 address: podIPs lists both, podIP is the first.
        let v6: Ipv6Addr = "fd00:212:213:0:ad50:20::".parse().unwrap();
        let dual = pod_manifest_ips(
            &pod,
            &pod.labels,
            &[Ipv4Addr::new(10, 213, 0, 2).into(), v6.into()],
        );
        assert_eq!(dual["status"]["podIP"].as_str(), Some("10.213.0.2"));
        assert_eq!(
            dual["status"]["podIPs"][1]["ip"].as_str(),
            Some("fd00:212:213:0:ad50:20::")
        );
        let only6 = pod_manifest_ips(&pod, &pod.labels, &[v6.into()]);
        assert_eq!(
            only6["status"]["podIP"].as_str(),
            Some("fd00:212:213:0:ad50:20::")
        );
        let ns = serde_yaml::to_string(&namespace_manifest(
            "x",
            &[("a".to_string(), "1".to_string())].into(),
        ))
        .unwrap();
        assert_eq!(
            ns,
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n  labels:\n    a: '1'\n"
        );
    }

    #[test]
    fn ipam_configuration_per_family() {
        let tools = Tools {
            agent: "agent".into(),
            cni: "cni".into(),
        };
        let mut c = Cluster::empty("t", tools, "10.213.0.0/24").unwrap();
        let dir = c.dir().to_path_buf();
        c.nodes.push(SimNode {
            name: String::new(),
            labels: Labels::new(),
            netns: None,
            dir,
            pin_root: "/nonexistent".into(),
            agent: None,
            subnet: "10.213.0.0/24".into(),
            address: None,
            subnet6: None,
            address6: None,
            handed6: 0,
        });
        let ipam = |c: &Cluster, pin: Option<Ipv6Addr>| -> serde_json::Value {
            serde_json::from_str::<serde_json::Value>(&c.cni_config(0, pin)).unwrap()["ipam"]
                .clone()
        };
        // IPv4: the configuration it always had.
        let v4 = ipam(&c, None);
        assert_eq!(v4["subnet"], "10.213.0.0/24");
        assert!(v4.get("ranges").is_none());

        c.set_family(IpFamily::Dual).unwrap();
        assert_eq!(c.subnet6.as_deref(), Some("fd00:212:213:0:ad50::/84"));
        let first = c.next_ip6(0).unwrap();
        assert_eq!(first.to_string(), "fd00:212:213:0:ad50:20::");
        assert_eq!(
            c.next_ip6(0).unwrap().to_string(),
            "fd00:212:213:0:ad50:30::"
        );
        let dual = ipam(&c, Some(first));
        assert!(dual.get("subnet").is_none(), "the ranges form only");
        assert_eq!(dual["ranges"][0][0]["subnet"], "10.213.0.0/24");
        let r6 = &dual["ranges"][1][0];
        assert_eq!(r6["subnet"], "fd00:212:213:0:ad50::/84");
        assert_eq!(r6["gateway"], "fd00:212:213:0:ad50:10::");
        assert_eq!(r6["rangeStart"], "fd00:212:213:0:ad50:20::");
        assert_eq!(r6["rangeEnd"], "fd00:212:213:0:ad50:20::");
        // DEL: the whole range (it releases by container).
        assert!(ipam(&c, None)["ranges"][1][0].get("rangeStart").is_none());

        c.set_family(IpFamily::Ipv6).unwrap();
        let only6 = ipam(&c, Some(first));
        assert_eq!(only6["ranges"].as_array().unwrap().len(), 1);
        assert_eq!(only6["ranges"][0][0]["subnet"], "fd00:212:213:0:ad50::/84");

        let result = serde_json::json!({"ips": [
            {"address": "10.213.0.2/24", "gateway": "10.213.0.1"},
            {"address": "fd00:212:213:0:ad50:20::/84"}]});
        assert_eq!(
            result_addresses(&result).unwrap(),
            (Some(Ipv4Addr::new(10, 213, 0, 2)), Some(first))
        );
        assert!(result_addresses(&serde_json::json!({"ips": []})).is_err());
    }
}
