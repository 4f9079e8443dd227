//! A one-node cluster made for real: a "node" network namespace, the
//! `palisade-agent` running in it in standalone mode on a manifest
//! directory, and pods that are network namespaces wired by the `palisade`
//! CNI binary, invoked exactly like a container runtime would (CNI_*
//! environment, network configuration on stdin, from the node's namespace).
//!
//! Everything is torn down in reverse on drop, also after a failure: server
//! threads, CNI DEL of each pod, the pod namespaces, the agent (by PID), its
//! pinned objects, the node namespace, the scratch directory.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
    net::Ipv4Addr,
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
    pub ip: Ipv4Addr,
    /// The host-side interface, from the CNI result.
    pub host_if: String,
}

impl PodNet {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn netns_path(&self) -> PathBuf {
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

/// Where a one-node cluster lives and what it is made of.
pub struct Cluster {
    pub name: String,
    pub subnet: String,
    pub tools: Tools,
    dir: Option<TempDir>,
    pub node: Option<NetNs>,
    pub pin_root: PathBuf,
    pub agent: Option<AgentProc>,
    pub pods: Vec<PodNet>,
    servers: Servers,
    torn_down: bool,
    /// Copy logs and manifests here before the scratch dir goes.
    pub keep: Option<PathBuf>,
}

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

/// The Pod manifest: one container with the pod's ports; the address once
/// the pod has one (as the kubelet reports it after the CNI ADD).
pub fn pod_manifest(pod: &PodSpec, labels: &Labels, ip: Option<Ipv4Addr>) -> Value {
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
    if let Some(ip) = ip {
        doc.push((
            "status",
            map(vec![
                ("phase", "Running".into()),
                ("podIP", ip.to_string().into()),
            ]),
        ));
    }
    map(doc)
}

impl Cluster {
    /// The scratch directory, the node namespace and the manifest
    /// directory; `pin_parent` holds this cluster's pin root.
    pub fn new(name: &str, tools: Tools, pin_parent: &Path, subnet: &str) -> Result<Self> {
        let dir = TempDir::new(signal::PIN_PREFIX)?;
        let mut c = Self {
            name: name.to_string(),
            subnet: subnet.to_string(),
            tools,
            pin_root: pin_parent.join(
                dir.path()
                    .file_name()
                    .expect("named")
                    .to_string_lossy()
                    .as_ref(),
            ),
            dir: Some(dir),
            node: None,
            agent: None,
            pods: Vec::new(),
            servers: Servers::default(),
            torn_down: false,
            keep: None,
        };
        for d in ["manifests", "state", "ipam"] {
            fs::create_dir_all(c.dir().join(d))?;
        }
        let node = NetNs::new(signal::NETNS_PREFIX)?;
        c.node = Some(node);
        c.node()?.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(c)
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

    pub fn node(&self) -> Result<&NetNs> {
        self.node
            .as_ref()
            .ok_or_else(|| anyhow!("the node namespace is gone"))
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

    /// `iptables-restore --noflush` of `rules` in the node namespace (as
    /// kube-proxy writes its rules), and an unreachable route for
    /// `unreachable` so nothing meant for it leaves the node.
    pub fn install_node_rules(&self, rules: &str, unreachable: &str) -> Result<()> {
        use std::io::Write as _;
        let node = self.node()?;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &node.name, "iptables-restore", "--noflush"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running iptables-restore in the node namespace")?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "iptables-restore (kube-proxy's rules) failed: {}\n{rules}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        crate::ip(&[
            "-n",
            &node.name,
            "route",
            "replace",
            "unreachable",
            unreachable,
        ])?;
        Ok(())
    }

    pub fn write_namespace(&self, name: &str, labels: &Labels) -> Result<()> {
        self.write(&namespace_file(name), &namespace_manifest(name, labels))
    }

    pub fn write_pod(&self, pod: &PodSpec, labels: &Labels, ip: Option<Ipv4Addr>) -> Result<()> {
        self.write(
            &pod_file(&pod.namespace, &pod.name),
            &pod_manifest(pod, labels, ip),
        )
    }

    pub fn write_policy(&self, namespace: &str, name: &str, doc: &Value) -> Result<()> {
        self.write(&policy_file(namespace, name), doc)
    }

    pub fn delete_policy(&self, namespace: &str, name: &str) -> Result<()> {
        let p = self.manifests().join(policy_file(namespace, name));
        fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }

    /// `palisade-agent run` in the node namespace, standalone on the
    /// manifest directory; returns once it answers on its socket.
    pub fn start_agent(&mut self) -> Result<()> {
        let dir = self.dir().to_path_buf();
        let log = dir.join("agent.log");
        let socket = dir.join("agent.sock");
        let flow_log = dir.join("flows.jsonl");
        let mut cmd = Command::new(&self.tools.agent);
        cmd.arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-root")
            .arg(&self.pin_root)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--manifests")
            .arg(self.manifests())
            .arg("--flow-log")
            .arg(&flow_log)
            .args(["--metrics-addr", "off"])
            .env(
                "RUST_LOG",
                std::env::var("PALISADE_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let child = spawn_in(&self.node()?.path(), &mut cmd)?;
        self.agent = Some(AgentProc {
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
            let a = self.agent.as_mut().expect("just set");
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

    fn agent(&self) -> Result<&AgentProc> {
        self.agent
            .as_ref()
            .ok_or_else(|| anyhow!("the agent is not running"))
    }

    pub fn request(&self, req: &Request) -> Result<Response> {
        Ok(call(&self.agent()?.socket, req, Duration::from_secs(60))?)
    }

    /// Re-read the manifests now; returns the programmed generation that
    /// includes them (the agent answers only once it is in the kernel).
    pub fn sync(&self) -> Result<u64> {
        match self.request(&Request::Sync)? {
            Response::Ok { generation, .. } => Ok(generation),
            Response::Error { message, .. } => bail!("agent Sync failed: {message}"),
            other => bail!("agent Sync: unexpected answer {other:?}"),
        }
    }

    pub fn status(&self) -> Result<StatusReport> {
        match self.request(&Request::Status)? {
            Response::Status(s) => Ok(*s),
            other => bail!("agent Status: unexpected answer {other:?}"),
        }
    }

    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .and_then(|a| fs::read_to_string(&a.log).ok())
            .unwrap_or_default()
    }

    /// How the agent ended, if it is no longer running.
    pub fn agent_exit(&mut self) -> Option<String> {
        let a = self.agent.as_mut()?;
        match a.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    pub fn agent_log_tail(&self, n: usize) -> String {
        let log = self.agent_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| format!("    | {l}\n"))
            .collect()
    }

    fn cni_config(&self) -> String {
        let agent_socket = self.dir().join("agent.sock");
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "palisade-conformance",
            "type": "palisade",
            "agentSocket": agent_socket,
            "agentTimeoutMs": 30000,
            "ipam": {"type": "palisade", "subnet": self.subnet, "dataDir": self.dir().join("ipam")},
        })
        .to_string()
    }

    /// Runs the CNI binary as a runtime does, from the node's namespace.
    fn cni(
        &self,
        command: &str,
        container_id: &str,
        netns: &Path,
        namespace: &str,
        pod: &str,
    ) -> Result<String> {
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
        let child = spawn_in(&self.node()?.path(), &mut cmd)?;
        let (ok, out, err) =
            wait_output(child, self.cni_config().as_bytes(), Duration::from_secs(60))
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

    /// A pod namespace, attached by CNI ADD. The pod is recorded before
    /// the ADD, so a failed ADD is still followed by a DEL.
    pub fn add_pod(&mut self, namespace: &str, name: &str) -> Result<&PodNet> {
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
            host_if: String::new(),
        });
        let out = self.cni("ADD", &container_id, &path, namespace, name)?;
        let result: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("CNI ADD result of {namespace}/{name}: {out}"))?;
        let addr = result["ips"][0]["address"].as_str().ok_or_else(|| {
            anyhow!("CNI ADD result of {namespace}/{name} has no ips[0].address: {out}")
        })?;
        let ip: Ipv4Addr = addr
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("CNI ADD result of {namespace}/{name}: address {addr:?}"))?;
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
        pod.host_if = host_if;
        Ok(pod)
    }

    /// Serve `ports` in the pod `key`.
    pub fn serve(&mut self, key: &str, ports: Vec<(u16, Protocol)>) -> Result<()> {
        let path = self
            .pod(key)
            .ok_or_else(|| anyhow!("no pod {key}"))?
            .netns_path();
        self.servers.serve(path, ports)
    }

    /// Pod addresses by `namespace/name`.
    pub fn addresses(&self) -> BTreeMap<String, Ipv4Addr> {
        self.pods.iter().map(|p| (p.key(), p.ip)).collect()
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
            let path = pod.netns_path();
            if self.node.is_some() {
                if let Err(e) = self.cni("DEL", &pod.container_id, &path, &pod.namespace, &pod.name)
                {
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
        if let Some(mut a) = self.agent.take() {
            if let Err(e) = a.stop() {
                errs.push(format!("{e:#}"));
            }
        }
        if let Err(e) =
            palisade_dataplane::loader::remove_all(&palisade_dataplane::Pins::new(&self.pin_root))
        {
            errs.push(format!("removing pins {}: {e}", self.pin_root.display()));
        }
        if let Some(node) = self.node.take() {
            let path = node.path();
            drop(node);
            if path.exists() {
                errs.push(format!("node namespace {} is still there", path.display()));
            }
        }
        drop(self.dir.take());
        errs
    }
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
}
