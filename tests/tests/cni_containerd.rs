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
    runtime_service_client::RuntimeServiceClient, LinuxPodSandboxConfig, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StopPodSandboxRequest,
};
use palisade_tests::{
    agent::write_manifest,
    cni::{allocations, bin, links, CniNode},
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
    fn start(n: &CniNode, conflist: &str) -> Result<Self> {
        let dir = n.dir.path().join("containerd");
        for d in ["root", "state", "cni-bin", "cni-conf"] {
            fs::create_dir_all(dir.join(d))?;
        }
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
        run(Command::new("ctr")
            .arg("--address")
            .arg(c.socket())
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&archive))?;
        Ok(c)
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

/// The whole kubelet lifecycle on one conflist.
fn lifecycle(conflist: &str, host_if: &str, ipam_sub: &str) -> Result<()> {
    let mut n = CniNode::with_agent()?;
    let ipam = &n.dir.path().join(ipam_sub);
    let agent = n.agent.as_ref().expect("agent");
    write_manifest(&agent.manifests, "cluster.yaml", CLUSTER)?;
    agent.sync()?;
    let conflist = conflist
        .replace("@SOCKET@", &n.socket().display().to_string())
        .replace(
            "@IPAM_DIR@",
            &n.dir.path().join("ipam").display().to_string(),
        );
    let mut cd = Containerd::start(&n, &conflist)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut c = rt.block_on(client(&cd.socket()))?;

    let server = rt.block_on(run_sandbox(&mut c, "web", "server", &[("app", "server")]))?;
    let good = rt.block_on(run_sandbox(&mut c, "clients", "good", &[("role", "ok")]))?;
    let bad = rt.block_on(run_sandbox(&mut c, "clients", "bad", &[("role", "no")]))?;

    // containerd passed K8S_POD_NAMESPACE / K8S_POD_NAME: the agent knows
    // each sandbox by its pod.
    let eps = n.endpoints()?;
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

    let pins = pod_link_pins(&n)?;
    ensure!(pins.len() >= 6, "two TCX links per pod pinned: {pins:?}");

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
        !n.endpoints()?.iter().any(|e| e.0 == "clients/bad"),
        "{:?}",
        n.endpoints()?
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
    let mut agent = n.agent.take().expect("agent");
    agent.terminate(Duration::from_secs(10))?;
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
    agent.spawn()?;
    n.agent = Some(agent);

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
        rt.block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: s.id.clone(),
        }))?;
        rt.block_on(c.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: s.id,
        }))?;
    }
    ensure!(
        n.endpoints()?.is_empty(),
        "leaked endpoints {:?}",
        n.endpoints()?
    );
    let left = allocations(ipam);
    ensure!(left.is_empty(), "leaked addresses {left:?}");
    let ifs: Vec<String> = links(&n.node)?
        .into_iter()
        .filter(|l| l.starts_with(host_if))
        .collect();
    ensure!(ifs.is_empty(), "leaked interfaces {ifs:?}");
    let pins = pod_link_pins(&n)?;
    ensure!(pins.is_empty(), "leaked link pins {pins:?}");
    drop(c);
    drop(cd);
    Ok(())
}

/// The pod-side TCX link pins under the agent's pin root
/// (`links/<ifindex>-ingress|egress`; uplink XDP pins are not pods').
fn pod_link_pins(n: &CniNode) -> Result<Vec<String>> {
    let agent = n.agent.as_ref().context("no agent")?;
    let dir = agent.pin_root.join("links");
    let mut v: Vec<String> = fs::read_dir(&dir)
        .with_context(|| dir.display().to_string())?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with("-ingress") || n.ends_with("-egress"))
        .collect();
    v.sort();
    Ok(v)
}

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
    let conflist = r#"{"cniVersion":"1.0.0","name":"palisade","plugins":[
        {"type":"palisade","mtu":1450,"agentSocket":"@SOCKET@","agentTimeoutMs":30000,
         "ipam":{"type":"palisade","subnet":"10.213.0.0/24","dataDir":"@IPAM_DIR@"}}]}"#;
    lifecycle(conflist, "pal", "ipam")
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
    lifecycle(&conflist, "veth", "ipam/chain")
}
