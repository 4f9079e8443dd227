//! Running the real `palisade-agent` inside a test's node namespace.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use palisade_api::{call, Registration, Request, Response, StatusReport};

use crate::{unique, NetNs, Pod};

/// A binary of this workspace, next to the test executable's directory
/// (`<target>/debug/deps/test-…` -> `<target>/debug/<name>`).
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join(name)
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(unique(prefix));
        fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What an agent test needs around it: a private bpffs root, a scratch
/// directory and a manifests directory in it. Declare it first so it is
/// dropped last (after the agent and the namespaces).
pub struct Scratch {
    pub dir: TempDir,
    pub manifests: PathBuf,
    pub pins: crate::PinRoot,
}

impl Scratch {
    /// With `files` (name, YAML) written into the manifests directory.
    pub fn new(prefix: &str, files: &[(&str, &str)]) -> Result<Self> {
        let pins = crate::PinRoot::new()?;
        let dir = TempDir::new(prefix)?;
        let manifests = dir.path().join("manifests");
        fs::create_dir_all(&manifests)?;
        for (name, yaml) in files {
            write_manifest(&manifests, name, yaml)?;
        }
        Ok(Self {
            dir,
            manifests,
            pins,
        })
    }

    /// Start an agent in `node` on these files, with extra `run` arguments.
    pub fn agent(&self, node: &NetNs, extra: &[&str]) -> Result<Agent> {
        Agent::start_with(
            node,
            self.dir.path(),
            self.pins.pins.root(),
            &self.manifests,
            extra,
        )
    }
}

/// A running agent; killed (by PID) on drop.
pub struct Agent {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    pub manifests: PathBuf,
    pub flow_log: PathBuf,
    netns: String,
    log: PathBuf,
    extra: Vec<String>,
}

impl Agent {
    /// Start `palisade-agent run` in `node`'s namespace with its files under
    /// `dir`, and wait until it answers.
    pub fn start(node: &NetNs, dir: &Path, pin_root: &Path, manifests: &Path) -> Result<Self> {
        Self::start_with(node, dir, pin_root, manifests, &["--metrics-addr", "off"])
    }

    /// As `start`, with extra `run` arguments.
    pub fn start_with(
        node: &NetNs,
        dir: &Path,
        pin_root: &Path,
        manifests: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let mut a = Self {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            socket: dir.join("agent.sock"),
            pin_root: pin_root.to_path_buf(),
            state_dir: dir.join("state"),
            manifests: manifests.to_path_buf(),
            flow_log: dir.join("flows.jsonl"),
            netns: node.name.clone(),
            log: dir.join("agent.log"),
        };
        a.spawn()?;
        Ok(a)
    }

    /// (Re)start the process with the same files.
    pub fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        // Only the network namespace: `ip netns exec` would also remount
        // /sys and hide bpffs, where the agent pins its state.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(target_bin("palisade-agent"))
            .arg("run")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-root")
            .arg(&self.pin_root)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--manifests")
            .arg(&self.manifests)
            .arg("--flow-log")
            .arg(&self.flow_log)
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting palisade-agent")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Response::Status(_)) =
                call(&self.socket, &Request::Status, Duration::from_secs(2))
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("palisade-agent exited ({st}):\n{}", self.log_text());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "palisade-agent not ready after {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run the CLI (`palisade-agent <args> --socket …`); (success, stdout
    /// followed by stderr).
    pub fn cli(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new(target_bin("palisade-agent"))
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, no cleanup: what a crash looks like.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // nsenter execs the agent, so this PID is the agent's.
            // SAFETY: plain kill(2) of a child we started.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then wait up to `timeout` for the exit; the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("the agent is not running");
        };
        // SAFETY: plain kill(2) of a child we started (nsenter execs the agent).
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!(
                    "palisade-agent did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn request(&self, req: &Request) -> Result<Response> {
        Ok(call(&self.socket, req, Duration::from_secs(30))?)
    }

    pub fn status(&self) -> Result<StatusReport> {
        match self.request(&Request::Status)? {
            Response::Status(s) => Ok(*s),
            other => bail!("status: {other:?}"),
        }
    }

    /// Re-read the manifests and wait until the result is in the kernel.
    pub fn sync(&self) -> Result<u64> {
        match self.request(&Request::Sync)? {
            Response::Ok { generation, .. } => Ok(generation),
            other => bail!("sync: {other:?}"),
        }
    }

    /// Register a pod wired by the test harness, as the CNI plugin would.
    pub fn register(&self, namespace: &str, name: &str, pod: &Pod) -> Result<u32> {
        match self.request(&Request::Register(registration(namespace, name, pod)))? {
            Response::Ok {
                endpoint_id: Some(id),
                ..
            } => Ok(id),
            other => bail!("register {namespace}/{name}: {other:?}"),
        }
    }
}

/// What the CNI plugin would send the agent for `pod`, wired by the test
/// harness, as `namespace`/`name`.
pub fn registration(namespace: &str, name: &str, pod: &Pod) -> Registration {
    Registration {
        container_id: format!("{namespace}-{name}-{}", pod.host_if),
        ifname: "eth0".into(),
        netns: pod.ns.path().display().to_string(),
        namespace: namespace.into(),
        pod: name.into(),
        ipv4: Some(pod.ip),
        host_ifname: pod.host_if.clone(),
        mac: None,
        ipv6: None,
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Write a manifest atomically (the agent may be reading the directory).
pub fn write_manifest(dir: &Path, name: &str, yaml: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, yaml)?;
    fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

impl Agent {
    /// The first record of this agent's flow log with `pred`, waiting up to
    /// 5 s for it.
    pub fn wait_flow(
        &self,
        pred: impl Fn(&palisade_agent::flowlog::FlowRecord) -> bool,
    ) -> Result<palisade_agent::flowlog::FlowRecord> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = fs::read_to_string(&self.flow_log).unwrap_or_default();
            if let Some(r) = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .find(|r| pred(r))
            {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("no matching flow record in:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The value of the unlabelled series `series` in a Prometheus text
/// exposition (0 when it is absent).
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// One HTTP/1.1 GET to `addr` from inside `node`: the whole response.
pub fn http_get(node: &NetNs, addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let (addr, path) = (addr.parse::<std::net::SocketAddr>()?, path.to_string());
    node.enter(move || -> Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?
}
