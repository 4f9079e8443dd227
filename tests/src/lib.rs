//! Helpers shared by the privileged integration tests: network namespaces
//! that clean up on drop (also when a test panics), a node-with-pods
//! topology wired like the CNI plugin wires it, and a private bpffs root.
//!
//! Every address used lives only inside namespaces these guards create.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context, Result};
use palisade_dataplane::Pins;

pub mod agent;
pub mod conformance;
pub mod fqdn;
pub mod oracle;
pub mod oracle_tiers;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A number from the environment (decimal or 0x-hex), for the seeds and
/// sizes of the randomized tests; a value that is not a number panics.
pub fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let n = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(n.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

/// A short name unique to this process and call, e.g. `pl12345-3`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Privileged tests need root (CI runs as root). Elsewhere they say so and
/// return early instead of failing on a missing capability.
pub fn require_root() -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root (netns, BPF)");
        return false;
    }
    true
}

pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

pub fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// A named network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> args…`
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self.cmd("sysctl").args(["-qw", &format!("{key}={value}")]))?;
        Ok(())
    }

    /// `n` veth pairs inside this namespace, `{prefix}a{i}` and
    /// `{prefix}b{i}`; their names, both ends of each pair in turn.
    pub fn veth_pairs(&self, prefix: &str, n: usize) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for i in 0..n {
            let (x, y) = (format!("{prefix}a{i}"), format!("{prefix}b{i}"));
            self.ip(&["link", "add", &x, "type", "veth", "peer", "name", &y])?;
            names.push(x);
            names.push(y);
        }
        Ok(names)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Run `f` on a fresh thread that has entered this namespace (setns
    /// affects only the calling thread, so the test's own thread stays put).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.path();
        std::thread::spawn(move || -> Result<T> {
            enter_thread(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }
}

/// Move the current thread into the namespace at `path`.
pub fn enter_thread(path: &std::path::Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: valid fd; CLONE_NEWNET only changes this thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A `tc` filter on one hook of an interface, as `tc -j filter show` lists
/// it: priority, handle, program name and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShownFilter {
    pub pref: u64,
    pub handle: u32,
    pub name: String,
    pub prog_id: u64,
}

/// The bpf filters on `ifname`'s `hook` ("ingress" or "egress") inside
/// `ns`; none when the interface has no clsact qdisc. An interface that
/// is not there is an error, never an empty list.
pub fn tc_filters(ns: &NetNs, ifname: &str, hook: &str) -> Result<Vec<ShownFilter>> {
    let out = run(ns
        .cmd("tc")
        .args(["-j", "filter", "show", "dev", ifname, hook]))?;
    if out.stdout.trim_ascii().is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("tc -j: {}", String::from_utf8_lossy(&out.stdout)))?;
    let mut shown = Vec::new();
    for f in v.as_array().into_iter().flatten() {
        // tc lists each priority's chain head without options: skip it.
        let Some(o) = f.get("options") else { continue };
        let handle = o
            .get("handle")
            .and_then(|h| h.as_str())
            .and_then(|h| u32::from_str_radix(h.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        shown.push(ShownFilter {
            pref: f.get("pref").and_then(|p| p.as_u64()).unwrap_or(0),
            handle,
            name: o
                .get("bpf_name")
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_string(),
            prog_id: o
                .get("prog")
                .and_then(|p| p.get("id"))
                .and_then(|i| i.as_u64())
                .unwrap_or(0),
        });
    }
    Ok(shown)
}

/// palisade's filters (its priority and handle) on `ifname`: those on tc
/// ingress (the pod's egress program), then on tc egress.
pub fn palisade_filters(ns: &NetNs, ifname: &str) -> Result<[Vec<ShownFilter>; 2]> {
    use palisade_dataplane::hooks::{FILTER_HANDLE, FILTER_PRIORITY};
    let ours = |hook| -> Result<Vec<ShownFilter>> {
        Ok(tc_filters(ns, ifname, hook)?
            .into_iter()
            .filter(|f| {
                f.pref == u64::from(FILTER_PRIORITY) && f.handle == u32::from(FILTER_HANDLE)
            })
            .collect())
    };
    Ok([ours("ingress")?, ours("egress")?])
}

/// One pod: its namespace, address and the host-side veth in the node.
pub struct Pod {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub host_if: String,
}

/// A node namespace that routes between pods attached by veth pairs, wired
/// as the CNI plugin wires them: pod /32 behind a gateway on the host veth.
pub struct Node {
    pub ns: NetNs,
    pub gateway: Ipv4Addr,
    pub pods: Vec<Pod>,
}

impl Node {
    pub fn new(gateway: Ipv4Addr) -> Result<Self> {
        let ns = NetNs::new("pnode")?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(Self {
            ns,
            gateway,
            pods: Vec::new(),
        })
    }

    pub fn add_pod(&mut self, ip: Ipv4Addr) -> Result<&Pod> {
        let ns = NetNs::new("ppod")?;
        let host_if = format!("h{}", unique(""));
        let host_if = host_if.chars().take(15).collect::<String>();
        let gw = format!("{}", self.gateway);
        self.ns.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.ns
            .ip(&["addr", "add", &format!("{gw}/32"), "dev", &host_if])?;
        self.ns.ip(&["link", "set", &host_if, "up"])?;
        self.ns
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if])?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
        self.pods.push(Pod { ns, ip, host_if });
        Ok(self.pods.last().expect("just pushed"))
    }
}

/// A private bpffs root for one test, removed (links first) on drop.
pub struct PinRoot {
    pub pins: Pins,
}

impl PinRoot {
    pub fn new() -> Result<Self> {
        ensure_bpffs()?;
        let pins = Pins::new(format!("/sys/fs/bpf/{}", unique("palisade-test-")));
        Ok(Self { pins })
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        if let Err(e) = palisade_dataplane::loader::remove_all(&self.pins) {
            eprintln!("cleanup of {}: {e}", self.pins.root().display());
        }
    }
}

pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// Try a TCP connection from inside `ns`; true when it was established.
pub fn tcp_connects(ns: &NetNs, to: Ipv4Addr, port: u16, timeout_ms: u64) -> Result<bool> {
    ns.enter(move || {
        std::net::TcpStream::connect_timeout(
            &(to, port).into(),
            std::time::Duration::from_millis(timeout_ms),
        )
        .is_ok()
    })
}

/// A TCP server in `ns` that accepts and echoes until the process ends.
pub fn tcp_echo_server(ns: &NetNs, port: u16) -> Result<()> {
    let listener =
        ns.enter(move || std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))??;
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Servers in `ns` on `port` of `addr`'s family that say who they are:
/// TCP sends `tag` on accept, then echoes; UDP answers every datagram
/// with `tag`. They run until the process ends.
pub fn ident_servers(ns: &NetNs, tag: u8, addr: IpAddr, port: u16) -> Result<()> {
    use std::io::{Read, Write};
    let (tcp, udp) = ns.enter(move || -> std::io::Result<_> {
        Ok((
            std::net::TcpListener::bind((addr, port))?,
            std::net::UdpSocket::bind((addr, port))?,
        ))
    })??;
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                if s.write_all(&[tag]).is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&[tag], from);
        }
    });
    Ok(())
}

/// Connects from `ns` to `to` (an `ident_servers` TCP server, directly or
/// through a Service): the server's tag and the open stream. The peer
/// address is checked: a reply through a translation must come back from
/// `to` itself, not from the backend.
pub fn tcp_tag(ns: &NetNs, to: std::net::SocketAddr) -> Result<(u8, std::net::TcpStream)> {
    use std::io::Read;
    ns.enter(move || -> Result<(u8, std::net::TcpStream)> {
        let mut c =
            std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_millis(1500))?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        let peer = c.peer_addr()?;
        anyhow::ensure!(peer == to, "peer {peer}");
        let mut tag = [0u8; 1];
        c.read_exact(&mut tag)?;
        Ok((tag[0], c))
    })?
}

/// Ten bytes of `byte` through an `ident_servers` TCP stream and back.
pub fn echo(c: &mut std::net::TcpStream, byte: u8) -> Result<()> {
    use std::io::{Read, Write};
    c.write_all(&[byte; 10])?;
    let mut buf = [0u8; 10];
    c.read_exact(&mut buf)?;
    anyhow::ensure!(buf == [byte; 10], "echo mismatch");
    Ok(())
}

/// An IPv6-only pod namespace with `ip`/128 behind `gw` on a host veth in
/// `node` (no duplicate address detection: usable at once), as the CNI
/// plugin wires an IPv6 pod. Returns the pod namespace and the host
/// veth's name.
pub fn add_pod6(node: &NetNs, gw: Ipv6Addr, ip: Ipv6Addr) -> Result<(NetNs, String)> {
    let ns = NetNs::new("p6pod")?;
    let host_if: String = format!("h{}", unique("")).chars().take(15).collect();
    node.ip(&[
        "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ])?;
    let gw_host = format!("{gw}/128");
    node.ip(&["-6", "addr", "add", &gw_host, "dev", &host_if, "nodad"])?;
    node.ip(&["link", "set", &host_if, "up"])?;
    node.ip(&["-6", "route", "add", &format!("{ip}/128"), "dev", &host_if])?;
    let own = format!("{ip}/128");
    ns.ip(&["-6", "addr", "add", &own, "dev", "eth0", "nodad"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    let gw = gw.to_string();
    ns.ip(&["-6", "route", "add", &gw, "dev", "eth0"])?;
    ns.ip(&["-6", "route", "add", "default", "via", &gw, "dev", "eth0"])?;
    Ok((ns, host_if))
}

/// Helpers of the CNI plugin tests (tests/tests/cni_*.rs): the `palisade`
/// binary run as a process, nodes with the real agent, and a
/// private bpffs for an agent started with `ip netns exec` (which mounts a
/// fresh /sys, hiding /sys/fs/bpf).
pub mod cni {
    use std::{
        io::Write,
        path::{Path, PathBuf},
        process::{Command, ExitStatus, Stdio},
    };

    use anyhow::{bail, Context, Result};

    use crate::{run, unique, NetNs};

    /// CNI results and errors are read as JSON values.
    pub use serde_json::Value as Json;

    /// One run of the plugin.
    #[derive(Debug)]
    pub struct Outcome {
        pub status: ExitStatus,
        pub stdout: String,
        pub stderr: String,
        /// stdout parsed (Null when empty).
        pub json: Json,
    }

    impl Outcome {
        /// The CNI error code, when the run failed with a CNI error.
        pub fn code(&self) -> Option<u64> {
            self.json["code"].as_u64()
        }
        /// Success, or an error naming everything the plugin said.
        pub fn ok(self) -> Result<Self> {
            if !self.status.success() {
                bail!(
                    "plugin failed ({}): {}\nstderr: {}",
                    self.status,
                    self.stdout.trim(),
                    self.stderr.trim()
                );
            }
            Ok(self)
        }
    }

    /// A workspace binary next to the test executable's directory.
    pub fn bin(name: &str) -> Result<PathBuf> {
        let p = crate::agent::target_bin(name);
        if !p.is_file() {
            bail!(
                "{} is not built (cargo build --workspace builds it)",
                p.display()
            );
        }
        Ok(p)
    }

    /// Runs the `palisade` plugin with `CNI_COMMAND=command`, the CNI_*
    /// variables in `env` and `stdin`, inside `node` when given (the plugin
    /// then sees the node's interfaces, like a kubelet on that node).
    pub fn exec(
        node: Option<&NetNs>,
        command: &str,
        env: &[(&str, &str)],
        stdin: &str,
    ) -> Result<Outcome> {
        let plugin = bin("palisade")?;
        let mut cmd = match node {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.name]).arg(&plugin);
                c
            }
            None => Command::new(&plugin),
        };
        for k in [
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_ARGS",
            "CNI_PATH",
        ] {
            cmd.env_remove(k);
        }
        if !command.is_empty() {
            cmd.env("CNI_COMMAND", command);
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", plugin.display()))?;
        let mut input = child.stdin.take().expect("piped");
        let _ = input.write_all(stdin.as_bytes());
        drop(input);
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = if stdout.trim().is_empty() {
            Json::Null
        } else {
            serde_json::from_str(stdout.trim())
                .with_context(|| format!("plugin output is not JSON: {stdout}"))?
        };
        Ok(Outcome {
            status: out.status,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            json,
        })
    }

    /// A bpffs instance of its own, mounted on a scratch directory, for an
    /// agent run with `ip netns exec` (mounts under /tmp stay visible
    /// there). Unmounting drops every pin, so the programs and maps go too.
    pub struct BpfFs {
        pub path: PathBuf,
    }

    impl BpfFs {
        pub fn new() -> Result<Self> {
            let path = std::env::temp_dir().join(unique("palisade-bpffs-"));
            std::fs::create_dir_all(&path)?;
            let fs = Self { path };
            run(Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&fs.path))?;
            Ok(fs)
        }

        /// A pin root inside the instance.
        pub fn pin_root(&self) -> PathBuf {
            self.path.join("palisade")
        }
    }

    impl Drop for BpfFs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).output();
            let _ = std::fs::remove_dir(&self.path);
        }
    }

    /// A node namespace for CNI tests with a scratch directory and,
    /// optionally, the real agent running in it. Dropped in field order:
    /// agent (killed), its bpffs, the node, the directory.
    pub struct CniNode {
        pub agent: Option<crate::agent::Agent>,
        _bpffs: Option<BpfFs>,
        pub node: NetNs,
        pub dir: crate::agent::TempDir,
    }

    impl CniNode {
        pub fn new() -> Result<Self> {
            let dir = crate::agent::TempDir::new("palisade-cni-")?;
            let node = NetNs::new("pcnode")?;
            std::fs::create_dir_all(dir.path().join("agent"))?;
            Ok(Self {
                agent: None,
                _bpffs: None,
                node,
                dir,
            })
        }

        /// With `palisade-agent run` in the node (standalone, no manifests).
        pub fn with_agent() -> Result<Self> {
            let mut n = Self::new()?;
            bin("palisade-agent")?;
            let fs = BpfFs::new()?;
            let manifests = n.dir.path().join("manifests");
            std::fs::create_dir_all(&manifests)?;
            let agent = crate::agent::Agent::start(
                &n.node,
                &n.dir.path().join("agent"),
                &fs.pin_root(),
                &manifests,
            )?;
            n.agent = Some(agent);
            n._bpffs = Some(fs);
            Ok(n)
        }

        /// The agent's socket (nothing listens there without an agent).
        pub fn socket(&self) -> PathBuf {
            self.dir.path().join("agent").join("agent.sock")
        }

        pub fn ipam_dir(&self) -> PathBuf {
            self.dir.path().join("ipam")
        }

        /// The endpoints the agent reports: (namespace/pod, ipv4, host_ifname).
        pub fn endpoints(&self) -> Result<Vec<(String, std::net::Ipv4Addr, String)>> {
            let agent = self.agent.as_ref().context("no agent")?;
            Ok(agent
                .status()?
                .endpoints
                .into_iter()
                .map(|e| (format!("{}/{}", e.namespace, e.pod), e.ipv4, e.host_ifname))
                .collect())
        }
    }

    /// Interface names in a namespace (`ip -o link`).
    pub fn links(ns: &NetNs) -> Result<Vec<String>> {
        let out = ns.ip(&["-o", "link", "show"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect())
    }

    /// The allocation files of the built-in IPAM in `dir` (address names,
    /// either family).
    pub fn allocations(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// The MAC of `ifname` in `ns`.
pub fn link_mac(ns: &NetNs, ifname: &str) -> Result<[u8; 6]> {
    let out = ns.ip(&["-o", "link", "show", ifname])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .and_then(palisade_api::parse_mac)
        .ok_or_else(|| anyhow::anyhow!("no MAC in {text}"))
}

/// A counter of `ns`'s IP statistics: `Ip` `name` from `snmp` (IPv4,
/// header and value lines) or `name` from `snmp6` (one per line).
/// (`thread-self`: `/proc/net` is the main thread's namespace.)
pub fn ip_counter(ns: &NetNs, ipv6: bool, name: &'static str) -> Result<u64> {
    let file = if ipv6 { "snmp6" } else { "snmp" };
    let text =
        ns.enter(move || std::fs::read_to_string(format!("/proc/thread-self/net/{file}")))??;
    let value = if ipv6 {
        text.lines()
            .filter_map(|l| l.split_once(char::is_whitespace))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.trim().to_string())
    } else {
        let mut ip = text.lines().filter(|l| l.starts_with("Ip: "));
        let (names, values) = (ip.next().unwrap_or(""), ip.next().unwrap_or(""));
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    };
    value
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/net/{file}"))
}

/// Closes `c` both ways and waits for the peer's FIN (read to EOF, or
/// until `c`'s read timeout), so no segment of the connection is still
/// crossing the node when a caller counts what the node forwards (only
/// the last ACK may be).
pub fn close_both_ways(c: &std::net::TcpStream) -> std::io::Result<()> {
    c.shutdown(std::net::Shutdown::Write)?;
    let _ = std::io::Read::read_to_end(&mut &*c, &mut Vec::new());
    Ok(())
}

/// A TCP listener in `ns` on `port` of `family`'s wildcard address that
/// takes no segment with a TTL (hop limit) under `min`: IP_MINTTL,
/// IPV6_MINHOPCOUNT.
pub fn listener_min_hops(
    ns: &NetNs,
    family: IpAddr,
    port: u16,
    min: i32,
) -> Result<std::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let any: IpAddr = match family {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let l = ns.enter(move || std::net::TcpListener::bind((any, port)))??;
    let (level, opt) = match family {
        IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MINTTL),
        IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT),
    };
    // SAFETY: a valid socket and an int option of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            level,
            opt,
            &min as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(rc == 0, "minimum TTL: {}", std::io::Error::last_os_error());
    Ok(l)
}

/// What kube-proxy's NodePort or a hostPort does in `node`: TCP to
/// `front`:`port` DNATed to `to` (nat PREROUTING, iptables or ip6tables
/// by family).
pub fn node_dnat(node: &NetNs, front: IpAddr, port: u16, to: std::net::SocketAddr) -> Result<()> {
    let tool = if front.is_ipv6() {
        "ip6tables"
    } else {
        "iptables"
    };
    run(node.cmd(tool).args([
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        &front.to_string(),
        "-p",
        "tcp",
        "--dport",
        &port.to_string(),
        "-j",
        "DNAT",
        "--to-destination",
        &to.to_string(),
    ]))?;
    Ok(())
}
