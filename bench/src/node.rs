//! A node as the benchmarks use it: a network namespace whose pods are
//! wired by the real `palisade` CNI binary, with either the real
//! `palisade-agent` (enforcing) or a stub agent that accepts registrations
//! and attaches nothing (the "no enforcement" and iptables baselines, so
//! that every configuration has byte-for-byte the same wiring).
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use palisade_api::{call, ErrorKind, Request, Response, StatusReport};
use serde_json::Value;

use crate::sys::{self, in_netns, ChildGuard, NetNs, PinRoot, TempDir};

/// The real agent, run in a node's namespace. Killed (by PID) on drop,
/// then its pins go (links first, so the programs detach).
pub struct AgentProc {
    child: Option<ChildGuard>,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub pin_root: PathBuf,
    /// Time from spawn until the API answered (includes the first sync).
    pub startup: Duration,
    _pins: PinRoot,
}

impl AgentProc {
    /// Started in `node`, reading `manifests`, serving /metrics, /healthz
    /// and /readyz on `metrics_addr` (an address inside the node namespace,
    /// or "off").
    pub fn start_with_metrics(
        node: &NetNs,
        dir: &Path,
        manifests: &Path,
        env: &[(&str, &str)],
        metrics_addr: &str,
    ) -> Result<Self> {
        let pins = PinRoot::new()?;
        let agent = sys::bin("palisade-agent")?;
        let socket = dir.join("agent.sock");
        let log = dir.join("agent.log");
        let logf = fs::File::create(&log)?;
        let mut cmd = Command::new(agent);
        cmd.arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-root")
            .arg(pins.pins.root())
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--manifests")
            .arg(manifests)
            .arg("--flow-log")
            .arg(dir.join("flows.jsonl"))
            .args(["--metrics-addr", metrics_addr])
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        let t = Instant::now();
        // Spawned from a thread inside the node: the agent starts there,
        // with the host's /sys (and so bpffs) untouched.
        let child =
            in_netns(&node.path(), move || cmd.spawn())?.context("starting palisade-agent")?;
        let mut a = Self {
            child: Some(ChildGuard(child)),
            socket,
            log,
            pin_root: pins.pins.root().to_path_buf(),
            startup: Duration::ZERO,
            _pins: pins,
        };
        a.wait_ready(Duration::from_secs(180))?;
        a.startup = t.elapsed();
        Ok(a)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            sys::check()?;
            if self.socket.exists() {
                if let Ok(Response::Status(_)) =
                    call(&self.socket, &Request::Status, Duration::from_secs(5))
                {
                    return Ok(());
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.0.try_wait()? {
                    bail!("palisade-agent exited ({st}):\n{}", self.log_tail());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "palisade-agent not ready after {timeout:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.pid())
    }

    pub fn log_tail(&self) -> String {
        let t = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn status(&self) -> Result<StatusReport> {
        match call(&self.socket, &Request::Status, Duration::from_secs(60))? {
            Response::Status(s) => Ok(*s),
            other => bail!("status: {other:?}"),
        }
    }
}

/// Answers the agent API like an agent that enforces nothing: every
/// registration succeeds at once, no program is attached.
pub struct StubAgent {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StubAgent {
    pub fn start(socket: PathBuf) -> Result<Self> {
        let _ = fs::remove_file(&socket);
        let l =
            UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ids = Arc::new(AtomicU32::new(1));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let ids = ids.clone();
                std::thread::spawn(move || {
                    let _ = serve_stub(conn, &ids);
                });
            }
        });
        Ok(Self {
            socket,
            stop,
            thread: Some(thread),
        })
    }
}

fn serve_stub(conn: UnixStream, ids: &AtomicU32) -> Result<()> {
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Register(_)) => Response::Ok {
            generation: 1,
            endpoint_id: Some(ids.fetch_add(1, Ordering::Relaxed)),
        },
        Ok(Request::Deregister { .. }) => Response::Ok {
            generation: 1,
            endpoint_id: None,
        },
        Ok(Request::Status) => Response::Status(Box::default()),
        _ => Response::error(
            ErrorKind::InvalidRequest,
            "the benchmark's stub agent does not do that",
        ),
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    (&conn).write_all(&out)?;
    Ok(())
}

impl Drop for StubAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

/// A CNI network (conflist entry) of the `palisade` plugin.
#[derive(Clone, Debug)]
pub struct Network {
    pub conf: String,
}

impl Network {
    pub fn new(
        name: &str,
        socket: &Path,
        ipam_dir: &Path,
        subnet: &str,
        range: Option<(Ipv4Addr, Ipv4Addr)>,
    ) -> Self {
        let range = range
            .map(|(a, b)| format!(r#","rangeStart":"{a}","rangeEnd":"{b}""#))
            .unwrap_or_default();
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"{name}","type":"palisade","agentSocket":"{}","agentTimeoutMs":120000,"ipam":{{"type":"palisade","subnet":"{subnet}"{range},"dataDir":"{}"}}}}"#,
            socket.display(),
            ipam_dir.display()
        );
        Self { conf }
    }

    /// The same network dual-stack: `subnet6` as an IPv6 range beside the
    /// IPv4 one (host-local's `ranges` form beside `subnet`).
    pub fn with_ipv6(self, subnet6: &str) -> Result<Self> {
        let mut v: Value = serde_json::from_str(&self.conf)?;
        v["ipam"]["ranges"] = serde_json::json!([[{ "subnet": subnet6 }]]);
        Ok(Self {
            conf: v.to_string(),
        })
    }
}

/// A pod wired by the plugin.
pub struct CniPod {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    /// The IPv6 address of a dual-stack pod, from the ADD result.
    pub ip6: Option<Ipv6Addr>,
}

/// One plugin run: how long it took (spawn to exit) and what it printed.
pub struct CniRun {
    pub elapsed: Duration,
    pub output: Output,
}

impl CniRun {
    pub fn ok(self) -> Result<Self> {
        if !self.output.status.success() {
            bail!(
                "CNI failed ({}): {}\n{}",
                self.output.status,
                String::from_utf8_lossy(&self.output.stdout).trim(),
                String::from_utf8_lossy(&self.output.stderr).trim()
            );
        }
        Ok(self)
    }

    pub fn json(&self) -> Result<Value> {
        Ok(serde_json::from_slice(&self.output.stdout)?)
    }
}

/// Run the plugin as a runtime would: from inside the node namespace,
/// config on stdin, CNI_* in the environment. Call from a thread that is
/// already in the node (see `NetNs::enter`) or use `Node::cni`.
pub fn exec_cni(
    plugin: &Path,
    conf: &str,
    command: &str,
    container_id: &str,
    pod_netns: &Path,
    namespace: &str,
    pod: &str,
) -> Result<CniRun> {
    let t = Instant::now();
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", pod_netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"),
        )
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", plugin.display()))?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(conf.as_bytes());
    }
    let output = child.wait_with_output()?;
    Ok(CniRun {
        elapsed: t.elapsed(),
        output,
    })
}

pub enum Enforcer {
    Agent(AgentProc),
    Stub(StubAgent),
}

/// A node namespace with its scratch directory, its agent (real or stub)
/// and its pods. Dropped in field order: pods, agent, node, directory.
pub struct Node {
    pub pods: Vec<CniPod>,
    pub enforcer: Enforcer,
    pub ns: NetNs,
    pub dir: TempDir,
    plugin: PathBuf,
}

impl Node {
    /// With the real agent reading `manifests` (YAML files written before
    /// the start are programmed before this returns).
    pub fn with_agent(prefix: &str, manifests: &[(&str, String)]) -> Result<Self> {
        Self::with_agent_env(prefix, manifests, &[])
    }

    /// As `with_agent`, with extra environment for the agent process.
    pub fn with_agent_env(
        prefix: &str,
        manifests: &[(&str, String)],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::with_agent_metrics(prefix, manifests, env, "off")
    }

    /// As `with_agent_env`, the agent serving HTTP on `metrics_addr` inside
    /// the node (reach it from a thread in `self.ns`).
    pub fn with_agent_metrics(
        prefix: &str,
        manifests: &[(&str, String)],
        env: &[(&str, &str)],
        metrics_addr: &str,
    ) -> Result<Self> {
        let dir = TempDir::new("palisade-bench-")?;
        let ns = NetNs::new(prefix)?;
        let mdir = dir.path().join("manifests");
        fs::create_dir_all(&mdir)?;
        for (name, text) in manifests {
            fs::write(mdir.join(name), text)?;
        }
        let agent = AgentProc::start_with_metrics(&ns, dir.path(), &mdir, env, metrics_addr)?;
        Ok(Self {
            pods: Vec::new(),
            enforcer: Enforcer::Agent(agent),
            ns,
            dir,
            plugin: sys::bin("palisade")?,
        })
    }

    /// With the stub agent: pods are wired, nothing is attached.
    pub fn with_stub(prefix: &str) -> Result<Self> {
        let dir = TempDir::new("palisade-bench-")?;
        let ns = NetNs::new(prefix)?;
        let stub = StubAgent::start(dir.path().join("agent.sock"))?;
        Ok(Self {
            pods: Vec::new(),
            enforcer: Enforcer::Stub(stub),
            ns,
            dir,
            plugin: sys::bin("palisade")?,
        })
    }

    pub fn agent(&self) -> Option<&AgentProc> {
        match &self.enforcer {
            Enforcer::Agent(a) => Some(a),
            Enforcer::Stub(_) => None,
        }
    }

    pub fn socket(&self) -> PathBuf {
        match &self.enforcer {
            Enforcer::Agent(a) => a.socket.clone(),
            Enforcer::Stub(s) => s.socket.clone(),
        }
    }

    /// A network whose pool is `subnet` (optionally a sub-range).
    pub fn network(
        &self,
        name: &str,
        subnet: &str,
        range: Option<(Ipv4Addr, Ipv4Addr)>,
    ) -> Network {
        Network::new(
            name,
            &self.socket(),
            &self.dir.path().join(format!("ipam-{name}")),
            subnet,
            range,
        )
    }

    pub fn plugin(&self) -> &Path {
        &self.plugin
    }

    /// Run the plugin inside the node.
    pub fn cni(
        &self,
        net: &Network,
        command: &str,
        container_id: &str,
        pod_netns: &Path,
        namespace: &str,
        pod: &str,
    ) -> Result<CniRun> {
        let (plugin, conf) = (self.plugin.clone(), net.conf.clone());
        let (command, cid, netns, namespace, pod) = (
            command.to_string(),
            container_id.to_string(),
            pod_netns.to_path_buf(),
            namespace.to_string(),
            pod.to_string(),
        );
        self.ns
            .enter(move || exec_cni(&plugin, &conf, &command, &cid, &netns, &namespace, &pod))?
    }

    /// Create a pod namespace and ADD it; the pod is kept in `self.pods`.
    pub fn add_pod(&mut self, net: &Network, namespace: &str, name: &str) -> Result<&CniPod> {
        let ns = NetNs::new("pbpod")?;
        let container_id = sys::unique("bench-");
        let run = self
            .cni(net, "ADD", &container_id, &ns.path(), namespace, name)?
            .ok()?;
        let v = run.json()?;
        let (ip, _host_if) = parse_add(&v)?;
        let ip6 = parse_add_ip6(&v);
        self.pods.push(CniPod { ns, ip, ip6 });
        Ok(self.pods.last().expect("just pushed"))
    }
}

/// (pod address, host interface) from an ADD result.
pub fn parse_add(v: &Value) -> Result<(Ipv4Addr, String)> {
    let addr = v["ips"][0]["address"]
        .as_str()
        .context("ADD result without ips[0].address")?;
    let ip = addr.split('/').next().unwrap_or_default().parse()?;
    let host_if = v["interfaces"][0]["name"]
        .as_str()
        .context("ADD result without interfaces[0].name")?
        .to_string();
    Ok((ip, host_if))
}

/// The pod's IPv6 address from an ADD result, if it has one.
pub fn parse_add_ip6(v: &Value) -> Option<Ipv6Addr> {
    v["ips"]
        .as_array()?
        .iter()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_conf_is_valid_json_with_the_range() {
        let n = Network::new(
            "n1",
            Path::new("/tmp/s.sock"),
            Path::new("/tmp/ipam"),
            "10.200.0.0/24",
            Some((Ipv4Addr::new(10, 200, 0, 50), Ipv4Addr::new(10, 200, 0, 50))),
        );
        let v: Value = serde_json::from_str(&n.conf).unwrap();
        assert_eq!(v["type"], "palisade");
        assert_eq!(v["ipam"]["rangeStart"], "10.200.0.50");
        assert_eq!(v["agentSocket"], "/tmp/s.sock");
    }

    #[test]
    fn add_result_gives_address_and_host_interface() {
        let v: Value = serde_json::from_str(
            r#"{"ips":[{"address":"10.200.0.7/24"}],"interfaces":[{"name":"pal0123"},{"name":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(
            parse_add(&v).unwrap(),
            (Ipv4Addr::new(10, 200, 0, 7), "pal0123".to_string())
        );
        assert!(parse_add(&serde_json::json!({})).is_err());
    }

    #[test]
    fn dual_stack_conf_and_result() {
        let n = Network::new(
            "n1",
            Path::new("/tmp/s.sock"),
            Path::new("/tmp/ipam"),
            "10.200.0.0/24",
            None,
        )
        .with_ipv6("fd00:200::/64")
        .unwrap();
        let v: Value = serde_json::from_str(&n.conf).unwrap();
        assert_eq!(v["ipam"]["subnet"], "10.200.0.0/24");
        assert_eq!(v["ipam"]["ranges"][0][0]["subnet"], "fd00:200::/64");
        assert_eq!(v["ipam"]["dataDir"], "/tmp/ipam");
        let r: Value = serde_json::from_str(
            r#"{"ips":[{"address":"10.200.0.7/24"},{"address":"fd00:200::7/64"}]}"#,
        )
        .unwrap();
        assert_eq!(parse_add_ip6(&r), Some("fd00:200::7".parse().unwrap()));
        let v4only: Value =
            serde_json::from_str(r#"{"ips":[{"address":"10.200.0.7/24"}]}"#).unwrap();
        assert_eq!(parse_add_ip6(&v4only), None);
        assert_eq!(parse_add_ip6(&serde_json::json!({})), None);
    }
}
