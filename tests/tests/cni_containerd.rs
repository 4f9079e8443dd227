//! The kubelet's path: Debian's containerd (its built-in CRI plugin) runs
//! pod sandboxes on a palisade network, driven over its socket with the
//! CRI API exactly as the kubelet drives it. containerd runs in the test's
//! node namespace with its own root, state, socket and CNI directories; the
//! conflist is written by `palisade-agent install-cni`; the sandbox image is
//! the local pause image `cargo xtask setup` builds (nothing is pulled).
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, security_profile::ProfileType, Capability,
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, Int64Value, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount,
    MountPropagation, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    SecurityProfile, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use palisade_api::{Request, Response};
use palisade_tests::{
    agent::write_manifest,
    cni::{allocations, bin, links, BpfFs, CniNode},
    enter_thread, require_root, run,
};
use tonic::transport::{Channel, Endpoint};

const PAUSE_REF: &str = "localhost/palisade/pause:1";
const PORT: u16 = 8080;

/// A containerd of the test's own, in the node namespace, killed by PID.
struct Containerd {
    dir: PathBuf,
    node: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// With `conflist`, installs the plugin and conflist from the host's
    /// binaries first (what the init container does in image mode).
    fn start(n: &CniNode, conflist: Option<&str>) -> Result<Self> {
        let dir = n.dir.path().join("containerd");
        for d in ["root", "state", "cni-bin", "cni-conf", "logs"] {
            fs::create_dir_all(dir.join(d))?;
        }
        if let Some(conflist) = conflist {
            // The DaemonSet's init container: plugin binary and conflist.
            let src = dir.join("src.conflist");
            fs::write(&src, conflist)?;
            run(Command::new(bin("palisade-agent")?)
                .arg("install-cni")
                .arg("--bin-src")
                .arg(bin("palisade")?)
                .arg("--bin-dir")
                .arg(dir.join("cni-bin"))
                .arg("--conf-dir")
                .arg(dir.join("cni-conf"))
                .arg("--conflist")
                .arg(&src))?;
        }
        // Chained mode needs the reference plugins beside palisade.
        for p in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(
                Path::new("/usr/lib/cni").join(p),
                dir.join("cni-bin").join(p),
            )?;
        }
        // containerd 1.6: config version 2, `sandbox_image`; netns mounts
        // under the state dir so nothing lands in /var/run/netns.
        let d = dir.display();
        let restrict_oom = !has_sys_resource();
        fs::write(
            dir.join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_REF}"
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = {restrict_oom}
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
"#
            ),
        )?;
        let mut c = Self {
            dir,
            node: n.node.path(),
            child: None,
        };
        c.spawn()?;
        let archive = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/images/pause.tar");
        ensure!(
            archive.exists(),
            "{} missing: run `cargo xtask setup`",
            archive.display()
        );
        c.import(&archive)?;
        Ok(c)
    }

    fn import(&self, archive: &Path) -> Result<()> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive))?;
        Ok(())
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.node.display()))
            .arg("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("containerd (run `cargo xtask setup`)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket().exists() {
            ensure!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The socket comes before the CRI plugin: until it has loaded its
        // state, every call answers "server is not initialized yet".
        let rt = tokio::runtime::Runtime::new()?;
        let sock = self.socket();
        loop {
            let ready = rt.block_on(async {
                let mut c = client(&sock).await?;
                c.version(k8s_cri::v1::VersionRequest::default()).await?;
                anyhow::Ok(())
            });
            match ready {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    anyhow::bail!("containerd's CRI is not ready: {e:#}\n{}", self.log())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // nsenter execs containerd: this PID is containerd's.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_file(self.socket());
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Sandboxes' shims outlive containerd: remove the sandboxes first
        // (CNI DEL, shim exit), then stop containerd, then unmount what is
        // left under its dirs.
        if self.child.is_some() {
            if let Ok(rt) = tokio::runtime::Runtime::new() {
                let sock = self.socket();
                let _ = rt.block_on(async move {
                    let mut c = client(&sock).await?;
                    let list = c
                        .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest::default())
                        .await?
                        .into_inner();
                    for s in list.items {
                        let _ = c
                            .stop_pod_sandbox(StopPodSandboxRequest {
                                pod_sandbox_id: s.id.clone(),
                            })
                            .await;
                        let _ = c
                            .remove_pod_sandbox(RemovePodSandboxRequest {
                                pod_sandbox_id: s.id,
                            })
                            .await;
                    }
                    anyhow::Ok(())
                });
            }
        }
        self.stop();
        if let Ok(mounts) = fs::read_to_string("/proc/mounts") {
            let prefix = self.dir.display().to_string();
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&prefix))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for m in points {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
}

/// The CRI plugin gives the pause container oomScoreAdj -998; lowering a
/// process's OOM score needs CAP_SYS_RESOURCE, and runc's nsexec dies on
/// the write ("failed to update /proc/self/oom_score_adj: Permission
/// denied", seen by containerd as "can't get final child's PID from pipe:
/// EOF"). Where the capability is not in our bounding set (some sandboxed
/// VMs), `restrict_oom_score_adj` clamps the score at containerd's own.
fn has_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

async fn client(sock: &Path) -> Result<RuntimeServiceClient<Channel>> {
    let sock = sock.to_path_buf();
    // The URI is ignored: every connection goes to the unix socket.
    let ch = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
            }
        }))
        .await?;
    Ok(RuntimeServiceClient::new(ch))
}

fn sandbox_config(ns: &str, name: &str, labels: &[(&str, &str)]) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            namespace: ns.into(),
            uid: format!("uid-{ns}-{name}"),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: String::new(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Sandbox {
    id: String,
    ip: Ipv4Addr,
    netns: PathBuf,
}

async fn run_sandbox(
    c: &mut RuntimeServiceClient<Channel>,
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<Sandbox> {
    let id = c
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config(ns, name, labels)),
            runtime_handler: String::new(),
        })
        .await
        .with_context(|| format!("RunPodSandbox {ns}/{name}"))?
        .into_inner()
        .pod_sandbox_id;
    status(c, &id).await
}

async fn status(c: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<Sandbox> {
    let st = c
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await?
        .into_inner();
    let ip: Ipv4Addr = st
        .status
        .as_ref()
        .and_then(|s| s.network.as_ref())
        .context("no network status")?
        .ip
        .parse()
        .context("sandbox ip")?;
    // The verbose info carries the pause process's PID.
    let info: serde_json::Value =
        serde_json::from_str(st.info.get("info").context("no verbose info")?)?;
    let pid = info["pid"].as_u64().context("no pid")?;
    Ok(Sandbox {
        id: id.into(),
        ip,
        netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
    })
}

/// A TCP connection from `from`'s network namespace to `to:PORT`, where a
/// listener runs in `to`'s namespace for the duration of the check.
fn connects(from: &Sandbox, to: &Sandbox) -> Result<bool> {
    let (tx, rx) = std::sync::mpsc::channel();
    let to_ns = to.netns.clone();
    let server = std::thread::spawn(move || -> Result<()> {
        enter_thread(&to_ns)?;
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT))?;
        l.set_nonblocking(true)?;
        tx.send(())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if l.accept().is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    });
    rx.recv()?;
    let from_ns = from.netns.clone();
    let addr = SocketAddr::from((to.ip, PORT));
    let ok = std::thread::spawn(move || -> Result<bool> {
        enter_thread(&from_ns)?;
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(ok)
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: web}
---
apiVersion: v1
kind: Namespace
metadata: {name: clients}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: web, labels: {app: server}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: good, namespace: clients, labels: {role: ok}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: bad, namespace: clients, labels: {role: no}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: web}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ok, namespace: web}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: ok}}}]
    ports: [{protocol: TCP, port: 8080}]
"#;

/// Where the agent runs: a process the test starts in the node namespace,
/// or the DaemonSet's containers from the agent image, run by the same
/// containerd through the CRI.
enum AgentRun {
    Process,
    Image(Box<ImageAgent>),
}

/// The agent's API over its socket (the same in both modes).
fn agent_call(n: &CniNode, req: &Request) -> Result<Response> {
    Ok(palisade_api::call(
        &n.socket(),
        req,
        Duration::from_secs(30),
    )?)
}

fn sync(n: &CniNode) -> Result<()> {
    match agent_call(n, &Request::Sync)? {
        Response::Ok { .. } => Ok(()),
        other => anyhow::bail!("sync: {other:?}"),
    }
}

/// (namespace/pod, ipv4, host_ifname) of every endpoint the agent knows.
fn endpoints(n: &CniNode) -> Result<Vec<(String, Ipv4Addr, String)>> {
    match agent_call(n, &Request::Status)? {
        Response::Status(s) => Ok(s
            .endpoints
            .into_iter()
            .map(|e| (format!("{}/{}", e.namespace, e.pod), e.ipv4, e.host_ifname))
            .collect()),
        other => anyhow::bail!("status: {other:?}"),
    }
}

/// The agent image: built by the same code as `cargo xtask image`, from
/// the debug binaries this test run uses (stripped: the image is copied by
/// the native snapshotter).
#[path = "../../xtask/src/oci_archive.rs"]
#[allow(dead_code)]
mod oci_archive;

const AGENT_IMAGE: &str = "localhost/palisade:test";
const METRICS: u16 = 9962;

fn build_agent_image(work: &Path) -> Result<PathBuf> {
    fs::create_dir_all(work)?;
    let stripped = work.join("bin");
    fs::create_dir_all(&stripped)?;
    for b in ["palisade-agent", "palisade"] {
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(stripped.join(b))
            .arg(bin(b)?))?;
    }
    let rootfs = work.join("rootfs");
    oci_archive::agent_rootfs(
        &rootfs,
        &stripped.join("palisade-agent"),
        &stripped.join("palisade"),
    )?;
    let out = work.join("palisade.tar");
    oci_archive::pack(work, &rootfs, oci_archive::AGENT_CONFIG, AGENT_IMAGE, &out)?;
    let _ = fs::remove_dir_all(&rootfs);
    Ok(out)
}

/// deploy/kubernetes/30-daemonset.yaml's pod, run through the CRI as the
/// kubelet runs it: a hostNetwork sandbox, the install-cni init container
/// into the node's CNI directories, then the agent with the manifest's
/// mounts and security context. Differences, because there is no API
/// server here: `--manifests` instead of `--kubernetes`, a conflist
/// written from the test instead of the ConfigMap, and the probes sent by
/// the test instead of the kubelet. (mount-bpffs is not run: it is
/// privileged, and the test mounts a bpffs of its own.)
struct ImageAgent {
    pod: String,
    sandbox: PodSandboxConfig,
    container: Option<String>,
    attempt: u32,
    /// Host directories behind the DaemonSet's hostPath volumes.
    run_dir: PathBuf,
    flow_dir: PathBuf,
    tmp_dir: PathBuf,
    manifests: PathBuf,
    bpffs: BpfFs,
}

fn node_ns() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        ..Default::default()
    }
}

fn mount(container: &str, host: &Path, readonly: bool, propagation: MountPropagation) -> Mount {
    Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly,
        propagation: propagation as i32,
        ..Default::default()
    }
}

impl ImageAgent {
    async fn start(n: &CniNode, cd: &Containerd, bpffs: BpfFs, conflist: &str) -> Result<Self> {
        let archive = build_agent_image(&n.dir.path().join("image"))?;
        cd.import(&archive)?;
        // HostToContainer is rslave: containerd requires the host side to
        // be a shared (or slave) mount, as /sys/fs/bpf is under systemd.
        run(Command::new("mount").arg("--make-shared").arg(&bpffs.path))?;
        let d = n.dir.path();
        let cni_dir = d.join("cni-config");
        fs::create_dir_all(&cni_dir)?;
        fs::write(cni_dir.join("standalone.conflist"), conflist)?;
        let run_dir = d.join("agent");
        let flow_dir = d.join("flows");
        let tmp_dir = d.join("agent-tmp");
        for p in [&run_dir, &flow_dir, &tmp_dir] {
            fs::create_dir_all(p)?;
        }
        let sandbox = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "palisade-agent-node1".into(),
                namespace: "palisade-system".into(),
                uid: "uid-palisade-agent".into(),
                attempt: 0,
            }),
            // Host network means the host's UTS namespace: runc refuses a
            // hostname there ("unable to set hostname without a private
            // UTS namespace").
            hostname: String::new(),
            log_directory: cd.dir.join("logs").display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(node_ns()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = client(&cd.socket()).await?;
        let pod = c
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox.clone()),
                runtime_handler: String::new(),
            })
            .await
            .context("the agent's hostNetwork sandbox")?
            .into_inner()
            .pod_sandbox_id;
        let mut a = Self {
            pod,
            sandbox,
            container: None,
            attempt: 0,
            run_dir,
            flow_dir,
            tmp_dir,
            manifests: d.join("manifests"),
            bpffs,
        };
        // install-cni: root, no capabilities, read-only root filesystem.
        let init = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "install-cni".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: AGENT_IMAGE.into(),
                ..Default::default()
            }),
            command: [
                "palisade-agent",
                "install-cni",
                "--bin-src",
                "/usr/local/bin/palisade",
                "--bin-dir",
                "/host/opt/cni/bin",
                "--conf-dir",
                "/host/etc/cni/net.d",
                "--conflist",
                "/etc/palisade/cni/standalone.conflist",
                "--conf-name",
                "05-palisade.conflist",
            ]
            .map(String::from)
            .to_vec(),
            mounts: vec![
                mount(
                    "/host/opt/cni/bin",
                    &cd.dir.join("cni-bin"),
                    false,
                    MountPropagation::PropagationPrivate,
                ),
                mount(
                    "/host/etc/cni/net.d",
                    &cd.dir.join("cni-conf"),
                    false,
                    MountPropagation::PropagationPrivate,
                ),
                mount(
                    "/etc/palisade/cni",
                    &cni_dir,
                    true,
                    MountPropagation::PropagationPrivate,
                ),
            ],
            log_path: "install-cni.log".into(),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    capabilities: Some(Capability {
                        drop_capabilities: vec!["ALL".into()],
                        ..Default::default()
                    }),
                    run_as_user: Some(Int64Value { value: 0 }),
                    readonly_rootfs: true,
                    no_new_privs: true,
                    namespace_options: Some(node_ns()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = a.create(&mut c, init).await?;
        c.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = c
                .container_status(ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .context("install-cni status")?;
            if st.state == ContainerState::ContainerExited as i32 {
                ensure!(
                    st.exit_code == 0,
                    "install-cni exited {}: {}",
                    st.exit_code,
                    fs::read_to_string(cd.dir.join("logs/install-cni.log")).unwrap_or_default()
                );
                break;
            }
            ensure!(Instant::now() < deadline, "install-cni did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            cd.dir.join("cni-bin/palisade").is_file()
                && cd.dir.join("cni-conf/05-palisade.conflist").is_file(),
            "install-cni wrote nothing"
        );
        a.start_agent(&mut c, n).await?;
        Ok(a)
    }

    async fn create(
        &self,
        c: &mut RuntimeServiceClient<Channel>,
        config: ContainerConfig,
    ) -> Result<String> {
        Ok(c.create_container(CreateContainerRequest {
            pod_sandbox_id: self.pod.clone(),
            config: Some(config),
            sandbox_config: Some(self.sandbox.clone()),
        })
        .await?
        .into_inner()
        .container_id)
    }

    /// The agent container (a new attempt each time, as the kubelet
    /// restarts it), then the probes: /healthz and /readyz on the host
    /// network's metrics port, the CNI socket, and its capabilities.
    async fn start_agent(
        &mut self,
        c: &mut RuntimeServiceClient<Channel>,
        n: &CniNode,
    ) -> Result<()> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "agent".into(),
                attempt: self.attempt,
            }),
            image: Some(ImageSpec {
                image: AGENT_IMAGE.into(),
                ..Default::default()
            }),
            command: [
                "palisade-agent",
                "run",
                "--manifests",
                "/etc/palisade/manifests",
                "--socket",
                "/run/palisade/agent.sock",
                "--pin-root",
                "/sys/fs/bpf/palisade",
                "--state-dir",
                "/run/palisade",
                "--flow-log",
                "/var/log/palisade/flows.jsonl",
                "--metrics-addr",
                "0.0.0.0:9962",
            ]
            .map(String::from)
            .to_vec(),
            envs: vec![
                KeyValue {
                    key: "NODE_NAME".into(),
                    value: "node1".into(),
                },
                KeyValue {
                    key: "RUST_LOG".into(),
                    value: "info".into(),
                },
            ],
            mounts: vec![
                mount(
                    "/sys/fs/bpf",
                    &self.bpffs.path,
                    false,
                    MountPropagation::PropagationHostToContainer,
                ),
                mount(
                    "/run/palisade",
                    &self.run_dir,
                    false,
                    MountPropagation::PropagationPrivate,
                ),
                mount(
                    "/var/log/palisade",
                    &self.flow_dir,
                    false,
                    MountPropagation::PropagationPrivate,
                ),
                mount(
                    "/tmp",
                    &self.tmp_dir,
                    false,
                    MountPropagation::PropagationPrivate,
                ),
                mount(
                    "/etc/palisade/manifests",
                    &self.manifests,
                    true,
                    MountPropagation::PropagationPrivate,
                ),
            ],
            log_path: format!("agent-{}.log", self.attempt),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    capabilities: Some(Capability {
                        add_capabilities: ["BPF", "NET_ADMIN", "PERFMON", "NET_RAW"]
                            .map(String::from)
                            .to_vec(),
                        drop_capabilities: vec!["ALL".into()],
                        ..Default::default()
                    }),
                    privileged: false,
                    run_as_user: Some(Int64Value { value: 0 }),
                    readonly_rootfs: true,
                    no_new_privs: true,
                    namespace_options: Some(node_ns()),
                    seccomp: Some(SecurityProfile {
                        profile_type: ProfileType::RuntimeDefault as i32,
                        ..Default::default()
                    }),
                    apparmor: Some(SecurityProfile {
                        profile_type: ProfileType::Unconfined as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.attempt += 1;
        let id = self.create(c, config).await?;
        c.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await?;
        self.container = Some(id.clone());
        let log = self.log_path();
        // The startup/readiness probes: /healthz, then /readyz (programs
        // loaded and the first sync in the kernel).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http_get(&n.node.path(), "/healthz")? == Some(200)
                && http_get(&n.node.path(), "/readyz")? == Some(200)
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the agent container is not ready: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Exactly the DaemonSet's four capabilities, no privilege escalation.
        let st = c
            .container_status(ContainerStatusRequest {
                container_id: id,
                verbose: true,
            })
            .await?
            .into_inner();
        let info: serde_json::Value =
            serde_json::from_str(st.info.get("info").context("no verbose info")?)?;
        let pid = info["pid"].as_u64().context("no pid")?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        const CAP_NET_ADMIN: u32 = 12;
        const CAP_NET_RAW: u32 = 13;
        const CAP_PERFMON: u32 = 38;
        const CAP_BPF: u32 = 39;
        let want =
            (1u64 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW) | (1 << CAP_PERFMON) | (1 << CAP_BPF);
        let eff = u64::from_str_radix(&field("CapEff:"), 16)?;
        let bnd = u64::from_str_radix(&field("CapBnd:"), 16)?;
        ensure!(
            eff == want && bnd == want,
            "agent caps eff {eff:x} bnd {bnd:x}"
        );
        ensure!(field("NoNewPrivs:") == "1", "no_new_privs not set");
        ensure!(field("Seccomp:") == "2", "not under a seccomp filter");
        Ok(())
    }

    /// The container log of the latest agent attempt (CRI log format).
    fn log_path(&self) -> PathBuf {
        self.run_dir
            .parent()
            .expect("parent")
            .join(format!("containerd/logs/agent-{}.log", self.attempt - 1))
    }

    /// StopContainer (SIGTERM, as on a rollout) and RemoveContainer.
    async fn stop_agent(&mut self, c: &mut RuntimeServiceClient<Channel>) -> Result<()> {
        let id = self.container.take().context("the agent is not running")?;
        c.stop_container(StopContainerRequest {
            container_id: id.clone(),
            timeout: 10,
        })
        .await?;
        c.remove_container(RemoveContainerRequest { container_id: id })
            .await?;
        Ok(())
    }
}

/// The kubelet's httpGet probe, from the node's network namespace: the
/// status code, or None when nothing answers.
fn http_get(node: &Path, path: &str) -> Result<Option<u16>> {
    let node = node.to_path_buf();
    let path = path.to_string();
    std::thread::spawn(move || -> Result<Option<u16>> {
        use std::io::{Read, Write};
        enter_thread(&node)?;
        let Ok(mut s) = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS)),
            Duration::from_secs(2),
        ) else {
            return Ok(None);
        };
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        Ok(out.split_whitespace().nth(1).and_then(|c| c.parse().ok()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
}

/// The whole kubelet lifecycle on one conflist.
fn lifecycle(conflist: &str, host_if: &str, ipam_sub: &str, image: bool) -> Result<()> {
    let mut n = if image {
        CniNode::new()?
    } else {
        CniNode::with_agent()?
    };
    let ipam = &n.dir.path().join(ipam_sub);
    let manifests = n.dir.path().join("manifests");
    fs::create_dir_all(&manifests)?;
    write_manifest(&manifests, "cluster.yaml", CLUSTER)?;
    let conflist = conflist
        .replace("@SOCKET@", &n.socket().display().to_string())
        .replace(
            "@IPAM_DIR@",
            &n.dir.path().join("ipam").display().to_string(),
        );
    let rt = tokio::runtime::Runtime::new()?;
    // Dropped in reverse: containerd (and the agent's pod) first.
    let (mut agent, mut cd) = if image {
        // The node boots with no CNI config: the agent's hostNetwork pod
        // needs none, and its init container writes the conflist.
        let bpffs = BpfFs::new()?;
        let cd = Containerd::start(&n, None)?;
        let a = rt.block_on(ImageAgent::start(&n, &cd, bpffs, &conflist))?;
        (AgentRun::Image(Box::new(a)), cd)
    } else {
        (AgentRun::Process, Containerd::start(&n, Some(&conflist))?)
    };
    let pin_root = match &agent {
        AgentRun::Process => n.agent.as_ref().expect("agent").pin_root.clone(),
        AgentRun::Image(a) => a.bpffs.pin_root(),
    };
    sync(&n)?;
    let mut c = rt.block_on(client(&cd.socket()))?;

    let server = rt.block_on(run_sandbox(&mut c, "web", "server", &[("app", "server")]))?;
    let good = rt.block_on(run_sandbox(&mut c, "clients", "good", &[("role", "ok")]))?;
    let bad = rt.block_on(run_sandbox(&mut c, "clients", "bad", &[("role", "no")]))?;

    // containerd passed K8S_POD_NAMESPACE / K8S_POD_NAME: the agent knows
    // each sandbox by its pod.
    let eps = endpoints(&n)?;
    for (pod, s) in [
        ("web/server", &server),
        ("clients/good", &good),
        ("clients/bad", &bad),
    ] {
        let e = eps
            .iter()
            .find(|e| e.0 == pod)
            .with_context(|| format!("{pod} in {eps:?}"))?;
        assert_eq!(e.1, s.ip, "{pod}");
        assert!(e.2.starts_with(host_if), "{e:?}");
    }
    // Each pod's host veth carries palisade's filter on both hooks.
    for e in &eps {
        let [egress, ingress] = palisade_tests::palisade_filters(&n.node, &e.2)?;
        ensure!(
            egress.len() == 1 && ingress.len() == 1,
            "{e:?}: {egress:?} {ingress:?}"
        );
    }

    assert!(connects(&good, &server)?, "allowed by allow-ok");
    assert!(!connects(&bad, &server)?, "denied by default-deny");
    assert!(connects(&server, &good)?, "clients has no policy");

    // Stop + remove one sandbox: CNI DEL, the agent forgets it.
    rt.block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: bad.id.clone(),
    }))?;
    rt.block_on(c.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: bad.id.clone(),
    }))?;
    ensure!(
        !endpoints(&n)?.iter().any(|e| e.0 == "clients/bad"),
        "{:?}",
        endpoints(&n)?
    );

    // containerd restarts with sandboxes present: their network survives
    // and stays enforced.
    drop(c);
    cd.stop();
    cd.spawn()?;
    let mut c = rt.block_on(client(&cd.socket()))?;
    let server = rt.block_on(status(&mut c, &server.id))?;
    let good = rt.block_on(status(&mut c, &good.id))?;
    assert!(
        connects(&good, &server)?,
        "allowed after containerd restart"
    );
    let bad2 = rt.block_on(run_sandbox(&mut c, "clients", "bad", &[("role", "no")]))?;
    assert!(
        !connects(&bad2, &server)?,
        "denied after containerd restart"
    );

    // Agent stopped: CNI ADD fails, so the sandbox must not start.
    let mut process = None;
    match &mut agent {
        AgentRun::Process => {
            let mut a = n.agent.take().expect("agent");
            a.terminate(Duration::from_secs(10))?;
            process = Some(a);
        }
        AgentRun::Image(a) => rt.block_on(a.stop_agent(&mut c))?,
    }
    let failed = rt.block_on(c.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(sandbox_config("clients", "orphan", &[])),
        runtime_handler: String::new(),
    }));
    ensure!(failed.is_err(), "a sandbox started without the agent");
    let list = rt
        .block_on(c.list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest::default()))?
        .into_inner();
    ensure!(
        !list
            .items
            .iter()
            .any(|s| s.metadata.as_ref().is_some_and(|m| m.name == "orphan") && s.state == 0),
        "orphan sandbox is ready: {list:?}"
    );
    // The pods already running stayed enforced while the agent was gone.
    assert!(connects(&good, &server)?, "allowed, agent down");
    assert!(!connects(&bad2, &server)?, "denied, agent down");
    match &mut agent {
        AgentRun::Process => {
            let mut a = process.take().expect("agent");
            a.spawn()?;
            n.agent = Some(a);
        }
        // The kubelet's restart of the container: a new attempt.
        AgentRun::Image(a) => rt.block_on(a.start_agent(&mut c, &n))?,
    }
    assert!(connects(&good, &server)?, "allowed after agent restart");
    assert!(!connects(&bad2, &server)?, "denied after agent restart");

    let agent_pod = match &agent {
        AgentRun::Image(a) => Some(a.pod.clone()),
        AgentRun::Process => None,
    };
    for s in [&server, &good, &bad2] {
        rt.block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: s.id.clone(),
        }))?;
        rt.block_on(c.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: s.id.clone(),
        }))?;
    }
    // The failed sandbox too (containerd may keep it NOTREADY).
    let list = rt
        .block_on(c.list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest::default()))?
        .into_inner();
    for s in list.items {
        if Some(&s.id) == agent_pod.as_ref() {
            continue;
        }
        rt.block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: s.id.clone(),
        }))?;
        rt.block_on(c.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: s.id,
        }))?;
    }
    ensure!(
        endpoints(&n)?.is_empty(),
        "leaked endpoints {:?}",
        endpoints(&n)?
    );
    let left = allocations(ipam);
    ensure!(left.is_empty(), "leaked addresses {left:?}");
    let ifs: Vec<String> = links(&n.node)?
        .into_iter()
        .filter(|l| l.starts_with(host_if))
        .collect();
    ensure!(ifs.is_empty(), "leaked interfaces {ifs:?}");
    let pins = pod_link_pins(&pin_root)?;
    ensure!(pins.is_empty(), "leaked link pins {pins:?}");
    drop(c);
    // containerd (and with it the agent's pod) before the agent's bpffs.
    drop(cd);
    drop(agent);
    Ok(())
}

/// The pod-side TCX link pins under the agent's pin root
/// (`links/<ifindex>-ingress|egress`; uplink XDP pins are not pods').
fn pod_link_pins(pin_root: &Path) -> Result<Vec<String>> {
    let dir = pin_root.join("links");
    let mut v: Vec<String> = fs::read_dir(&dir)
        .with_context(|| dir.display().to_string())?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with("-ingress") || n.ends_with("-egress"))
        .collect();
    v.sort();
    Ok(v)
}

const STANDALONE: &str = r#"{"cniVersion":"1.0.0","name":"palisade","plugins":[
    {"type":"palisade","mtu":1450,"agentSocket":"@SOCKET@","agentTimeoutMs":30000,
     "ipam":{"type":"palisade","subnet":"10.213.0.0/24","dataDir":"@IPAM_DIR@"}}]}"#;

fn containerd_here() -> bool {
    if !require_root() {
        return false;
    }
    if Command::new("containerd")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: containerd is not installed (run `cargo xtask setup`)");
        return false;
    }
    true
}

#[test]
fn containerd_cri_on_a_palisade_network() -> Result<()> {
    if !containerd_here() {
        return Ok(());
    }
    lifecycle(STANDALONE, "pal", "ipam", false)
}

#[test]
fn containerd_cri_chained_after_bridge_and_host_local() -> Result<()> {
    if !containerd_here() {
        return Ok(());
    }
    let conflist = format!(
        r#"{{"cniVersion":"1.0.0","name":"chain","plugins":[
        {{"type":"bridge","bridge":"crbr{}","isGateway":true,
          "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.214.0.0/24"}}]],
                   "routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"@IPAM_DIR@"}}}},
        {{"type":"palisade","chained":true,"agentSocket":"@SOCKET@","agentTimeoutMs":30000}}]}}"#,
        std::process::id() % 100_000
    );
    lifecycle(&conflist, "veth", "ipam/chain", false)
}

/// The agent from its image, run as the DaemonSet runs it (see
/// `ImageAgent`), on the standalone conflist.
#[test]
fn containerd_cri_agent_from_its_image() -> Result<()> {
    if !containerd_here() {
        return Ok(());
    }
    lifecycle(STANDALONE, "pal", "ipam", true)
}
