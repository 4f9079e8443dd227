//! Section 2: Through real veths: three identical nodes (a node namespace, a client
//! and a server pod, wired by the real `palisade` CNI binary), one per
//! enforcement kind, measured round by round in rotated order:
//!
//! * (a) no enforcement: a stub agent accepts the registrations, no
//!   program is attached;
//! * (b-N) the real agent enforcing `allow client -> server` on the
//!   measured ports, with N more policy entries (and N ipcache entries for
//!   their peers) written straight into its pinned maps for the server;
//! * (c-N) a stub agent, and in the node's FORWARD chain what an
//!   iptables-based enforcer installs: conntrack ESTABLISHED,RELATED accept,
//!   N per-peer/port accepts, the real allow, drop to the server;
//! * (d-N) a stub agent, and the best a non-eBPF enforcer does: an
//!   nftables forward chain with the conntrack shortcut, then one lookup in
//!   a set of `ip saddr . ip daddr . tcp dport` concatenations holding the
//!   N peer/port pairs and the real allows, then drop to the server.
//!
//! * (bt-N): (b) on a fourth node whose agent hooks the pod programs
//!   through TCX links (`--pod-hook tcx`) instead of `cls_bpf` filters,
//!   at the largest N: what the hook itself costs per packet;
//! * (bk-N): (b) on a fifth node whose agent leaves traffic between its
//!   pods to the node's IP stack (`--local-delivery stack`) instead of
//!   redirecting it from host veth to host veth, at the largest N: the
//!   programs' cost with the stack's routing as (a) has it;
//! * (a6), (b6-N): (a) and (b) over IPv6 between the same dual-stack pods
//!   (each node's CNI config has an IPv6 range beside the IPv4 one; the
//!   policy selects pods, so it admits the client's IPv6 as its IPv4), at
//!   the smallest and the largest N of (b).
//!
//! Measures: new connections per second (connect, 1-byte request, 1-byte
//! response, close; the server closes first and the client reads EOF so no
//! TIME_WAIT piles up on the client), 1-byte request/response transactions
//! per second on one connection, and TCP stream throughput (iperf3).
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use palisade_common::{
    reason, Ip6, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW, DIR_INGRESS, IDENTITY_WORLD,
    PROTO_TCP,
};

use palisade_dataplane::maps::ip6_words;

use crate::{
    node::{CniPod, Node},
    report::{ProgramCost, Veth, VethMeasure},
    stats::rotated,
    sys::{self, enter_thread, in_netns, ChildGuard},
};

const CRR_PORT: u16 = 7001;
const RR_PORT: u16 = 7002;
const IPERF_PORT: u16 = 7003;
const DENY_PORT: u16 = 7004;
const NAMESPACE: &str = "bench";
/// Client and server threads share one CPU in every configuration: on 2
/// vCPUs, letting the scheduler place them makes the rates bimodal (a
/// cross-CPU wakeup is an IPI, a VM exit here), which swamps the effect
/// measured. The other CPU is left to the agent and everything else.
const TRAFFIC_CPU: usize = 1;

pub struct Plan {
    pub rounds: usize,
    pub secs: f64,
    pub iperf_secs: u32,
    pub b_sizes: Vec<usize>,
    /// (b6-N) sizes: the smallest and the largest of `b_sizes`.
    pub b6_sizes: Vec<usize>,
    pub c_sizes: Vec<usize>,
    /// nftables rule counts (d-N).
    pub d_sizes: Vec<usize>,
}

/// The smallest and the largest size, once each.
fn ends(sizes: &[usize]) -> Vec<usize> {
    let mut v: Vec<usize> = [sizes.iter().min(), sizes.iter().max()]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    v.dedup();
    v
}

impl Plan {
    pub fn new(quick: bool, rounds: usize) -> Self {
        let mut p = Self::sizes(quick, rounds);
        p.b6_sizes = ends(&p.b_sizes);
        p
    }

    fn sizes(quick: bool, rounds: usize) -> Self {
        if quick {
            Self {
                rounds,
                secs: 0.5,
                iperf_secs: 1,
                b_sizes: vec![10_000],
                b6_sizes: Vec::new(),
                c_sizes: vec![10_000],
                d_sizes: vec![10_000],
            }
        } else {
            Self {
                rounds,
                secs: 1.5,
                iperf_secs: 2,
                b_sizes: vec![10, 1000, 10_000],
                b6_sizes: Vec::new(),
                c_sizes: vec![10, 1000, 10_000],
                d_sizes: vec![10, 1000, 10_000],
            }
        }
    }
}

// ---- servers ----------------------------------------------------------------

/// A TCP server thread in a pod; stopped (listener shut down) on drop.
struct Server {
    fd: i32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _listener: Arc<TcpListener>,
}

#[derive(Clone, Copy)]
enum Kind {
    /// Read 1 byte, answer 1 byte, close.
    Crr,
    /// Answer each byte with a byte until EOF.
    Rr,
    /// Accept and close.
    Accept,
}

impl Server {
    /// Listening on `at` (the IPv4 wildcard, or the pod's IPv6 address:
    /// a second socket on the same port, as the IPv6 wildcard would clash
    /// with the IPv4 one).
    fn start(pod: &CniPod, at: IpAddr, port: u16, kind: Kind) -> Result<Self> {
        let path = pod.ns.path();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            sys::pin_thread(TRAFFIC_CPU);
            let l = match enter_thread(&path).and_then(|_| Ok(TcpListener::bind((at, port))?)) {
                Ok(l) => Arc::new(l),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(l.clone()));
            for conn in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                let _ = c.set_nodelay(true);
                let mut b = [0u8; 1];
                match kind {
                    Kind::Crr => {
                        if c.read_exact(&mut b).is_ok() {
                            let _ = c.write_all(&b);
                        }
                    }
                    Kind::Rr => {
                        let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                        while !s.load(Ordering::Relaxed) && c.read_exact(&mut b).is_ok() {
                            if c.write_all(&b).is_err() {
                                break;
                            }
                        }
                    }
                    Kind::Accept => {}
                }
            }
        });
        let listener = rx.recv().context("server thread")??;
        Ok(Self {
            fd: listener.as_raw_fd(),
            stop,
            thread: Some(thread),
            _listener: listener,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: our own listening socket; shutdown wakes a blocked accept.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- clients ----------------------------------------------------------------

/// (completed, failed, seconds)
fn crr(pod: &CniPod, to: IpAddr, secs: f64) -> Result<(u64, u64, f64)> {
    in_netns(&pod.ns.path(), move || {
        sys::pin_thread(TRAFFIC_CPU);
        let addr = SocketAddr::from((to, CRR_PORT));
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let t = Instant::now();
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut buf = [0u8; 8];
        while Instant::now() < end && !sys::interrupted() && ok < 1_000_000 {
            let mut one = || -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                s.write_all(&[1])?;
                s.read_exact(&mut buf[..1])?;
                // The server closes first: wait for its FIN, so the
                // TIME_WAIT stays on its side.
                let _ = s.read(&mut buf);
                Ok(())
            };
            match one() {
                Ok(()) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed, t.elapsed().as_secs_f64())
    })
}

/// (transactions, seconds)
fn rr(pod: &CniPod, to: IpAddr, secs: f64) -> Result<(u64, f64)> {
    in_netns(&pod.ns.path(), move || -> Result<(u64, f64)> {
        sys::pin_thread(TRAFFIC_CPU);
        let mut s = TcpStream::connect_timeout(&(to, RR_PORT).into(), Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut b = [0u8; 1];
        // Warm the connection up (handshake, first verdicts) untimed.
        for _ in 0..100 {
            s.write_all(&b)?;
            s.read_exact(&mut b)?;
        }
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let t = Instant::now();
        let mut n = 0u64;
        while !sys::interrupted() {
            // Check the clock every 64 transactions.
            for _ in 0..64 {
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
            }
            n += 64;
            if Instant::now() >= end {
                break;
            }
        }
        Ok((n, t.elapsed().as_secs_f64()))
    })?
}

/// Gbit/s received, from iperf3's JSON.
fn stream(pod: &CniPod, to: IpAddr, secs: u32) -> Result<f64> {
    let out = in_netns(&pod.ns.path(), move || {
        Command::new("iperf3")
            .args(["-c", &to.to_string(), "-p", &IPERF_PORT.to_string()])
            .args(["-t", &secs.to_string(), "-J"])
            .args(["-A", &format!("{TRAFFIC_CPU},{TRAFFIC_CPU}")])
            .stdin(Stdio::null())
            .output()
    })??;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

fn connects(pod: &CniPod, to: IpAddr, port: u16) -> Result<bool> {
    in_netns(&pod.ns.path(), move || {
        TcpStream::connect_timeout(&(to, port).into(), Duration::from_millis(400)).is_ok()
    })
}

// ---- iptables -----------------------------------------------------------------

/// The IPv6 twin of `filler_peer`, for IPCACHE6.
fn filler_peer6(k: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x251, 0, 0, 0, 0, 0, 1)) + k as u128)
}

/// A filler peer address (only a match criterion; nothing is sent there).
fn filler_peer(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 251, 0, 1)) + k as u32)
}

/// The ruleset an iptables-based enforcer installs for "allow client to
/// server on `ports`" with `n` other allowed peer/port pairs ahead of it.
pub fn iptables_rules(n: usize, client: Ipv4Addr, server: Ipv4Addr, ports: &[u16]) -> String {
    let mut s = String::with_capacity(100 * (n + 8));
    s.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    s.push_str("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    for k in 0..n {
        s.push_str(&format!(
            "-A FORWARD -s {}/32 -d {server}/32 -p tcp -m tcp --dport {} -j ACCEPT\n",
            filler_peer(k),
            20000 + (k % 10000)
        ));
    }
    for p in ports {
        s.push_str(&format!(
            "-A FORWARD -s {client}/32 -d {server}/32 -p tcp -m tcp --dport {p} -j ACCEPT\n"
        ));
    }
    s.push_str(&format!("-A FORWARD -d {server}/32 -j DROP\nCOMMIT\n"));
    s
}

fn iptables_restore(node: &Node, rules: String) -> Result<f64> {
    load_rules(node, "iptables-restore", &[], rules)
}

/// Feed `rules` to `program` (with `args`) in the node's namespace; the
/// seconds it took.
fn load_rules(
    node: &Node,
    program: &'static str,
    args: &'static [&'static str],
    rules: String,
) -> Result<f64> {
    let t = Instant::now();
    let out = node.ns.enter(move || -> Result<std::process::Output> {
        let mut c = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {program} (cargo xtask setup installs it)"))?;
        c.stdin
            .take()
            .context("stdin")?
            .write_all(rules.as_bytes())?;
        Ok(c.wait_with_output()?)
    })??;
    if !out.status.success() {
        bail!("{program}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(t.elapsed().as_secs_f64())
}

// ---- nftables -----------------------------------------------------------------

/// The same allows as `iptables_rules` as an nftables enforcer at its best
/// writes them: the conntrack shortcut first, then one hash lookup of the
/// (source, destination, port) concatenation in a set, whatever `n` is.
/// Replaces the whole ruleset of the node's namespace (only this table
/// lives there).
pub fn nft_rules(n: usize, client: Ipv4Addr, server: Ipv4Addr, ports: &[u16]) -> String {
    let mut s = String::with_capacity(40 * (n + 8));
    s.push_str(
        "flush ruleset
table inet palisade_bench {
",
    );
    s.push_str(
        "  set allowed {
    type ipv4_addr . ipv4_addr . inet_service
",
    );
    let mut elems: Vec<String> = (0..n)
        .map(|k| format!("{} . {server} . {}", filler_peer(k), 20000 + (k % 10000)))
        .collect();
    elems.extend(ports.iter().map(|p| format!("{client} . {server} . {p}")));
    s.push_str(&format!(
        "    elements = {{ {} }}
  }}
",
        elems.join(", ")
    ));
    s.push_str(
        "  chain forward {
    type filter hook forward priority filter; policy accept;
",
    );
    s.push_str(
        "    ct state established,related accept
",
    );
    s.push_str(&format!(
        "    ip daddr {server} ip saddr . ip daddr . tcp dport @allowed accept
"
    ));
    s.push_str(&format!(
        "    ip daddr {server} drop
  }}
}}
"
    ));
    s
}

fn nft_load(node: &Node, rules: String) -> Result<f64> {
    load_rules(node, "nft", &["-f", "-"], rules)
}

// ---- palisade extra entries -------------------------------------------------

/// Entries written where the agent writes them: full-length ones (all of
/// these) into the hash maps (`palisade_common::maps::POLICY_EXACT`, ...).
struct Extras {
    policy_exact: HashMap<MapData, PolicyKey, PolicyValue>,
    ipcache_exact: HashMap<MapData, u32, IpcacheValue>,
    ipcache6_exact: HashMap<MapData, Ip6, IpcacheValue>,
    counters: PerCpuArray<MapData, u64>,
    endpoint_id: u32,
    installed: usize,
}

fn extra_key(endpoint_id: u32, k: usize) -> PolicyKey {
    PolicyKey {
        endpoint_id,
        peer_identity: 0x4000_0000 + k as u32,
        direction: DIR_INGRESS,
        protocol: PROTO_TCP,
        dport_be: (20000 + (k % 10000) as u16).to_be(),
    }
}

impl Extras {
    /// The extras of `site`'s server, through its agent (`what` names the
    /// node in errors).
    fn of_server(site: &Site, what: &str) -> Result<Self> {
        let agent = site
            .node
            .agent()
            .with_context(|| format!("agent ({what})"))?;
        let server = agent
            .status()?
            .endpoints
            .into_iter()
            .find(|e| e.pod == "server")
            .with_context(|| format!("the {what} agent has no server endpoint"))?;
        Self::open(&agent.pin_root, server.endpoint_id)
    }

    fn open(pin_root: &std::path::Path, endpoint_id: u32) -> Result<Self> {
        let maps = pin_root.join("maps");
        let open = |name: &str| -> Result<MapData> {
            MapData::from_pin(maps.join(name)).with_context(|| format!("opening pinned {name}"))
        };
        Ok(Self {
            policy_exact: HashMap::try_from(Map::HashMap(open("POLICY_EXACT")?))?,
            ipcache_exact: HashMap::try_from(Map::HashMap(open("IPCACHE_EXACT")?))?,
            ipcache6_exact: HashMap::try_from(Map::HashMap(open("IPCACHE6_EXACT")?))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(open("COUNTERS")?))?,
            endpoint_id,
            installed: 0,
        })
    }

    /// Make exactly `n` extra entries present (their peers in both
    /// families' ipcaches, as dual-stack pods would be).
    fn set(&mut self, n: usize) -> Result<()> {
        for k in self.installed..n {
            let peer = u32::from_ne_bytes(filler_peer(k).octets());
            let v = IpcacheValue {
                identity: 0x4000_0000 + k as u32,
                cidr_identity: IDENTITY_WORLD,
            };
            let peer6 = ip6_words(filler_peer6(k));
            let rule = PolicyValue {
                action: ACTION_ALLOW,
                cookie: 0,
            };
            let pk = extra_key(self.endpoint_id, k);
            self.ipcache_exact.insert(peer, v, 0)?;
            self.ipcache6_exact.insert(peer6, v, 0)?;
            self.policy_exact.insert(pk, rule, 0)?;
        }
        for k in n..self.installed {
            let peer = u32::from_ne_bytes(filler_peer(k).octets());
            let peer6 = ip6_words(filler_peer6(k));
            let pk = extra_key(self.endpoint_id, k);
            self.policy_exact.remove(&pk)?;
            self.ipcache_exact.remove(&peer)?;
            self.ipcache6_exact.remove(&peer6)?;
        }
        self.installed = n;
        Ok(())
    }

    fn policy_allowed(&self) -> Result<u64> {
        Ok(self
            .counters
            .get(&(reason::POLICY_ALLOW as u32), 0)?
            .iter()
            .sum())
    }
}

/// The agent stopped with SIGSTOP until dropped (then SIGCONT).
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        if pid > 0 {
            // SAFETY: kill(2) of the agent process we started.
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        }
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.0 > 0 {
            // SAFETY: as above.
            unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
        }
    }
}

// ---- the section ------------------------------------------------------------

struct Site {
    node: Node,
    client: usize,
    server: usize,
    _servers: Vec<Server>,
    _iperf: ChildGuard,
}

impl Site {
    fn client(&self) -> &CniPod {
        &self.node.pods[self.client]
    }
    fn server_ip(&self) -> Ipv4Addr {
        self.node.pods[self.server].ip
    }
    /// The server's address in the family a configuration measures.
    fn server_at(&self, v6: bool) -> Result<IpAddr> {
        let pod = &self.node.pods[self.server];
        Ok(if v6 {
            IpAddr::V6(pod.ip6.context("the server pod has no IPv6 address")?)
        } else {
            IpAddr::V4(pod.ip)
        })
    }
}

/// An IPv6 configuration ("a6", "b6-N") measures over IPv6.
fn is_v6(config: &str) -> bool {
    config.split('-').next().is_some_and(|k| k.ends_with('6'))
}

fn manifests() -> Vec<(&'static str, String)> {
    let pod = |name: &str, app: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  labels:\n    app: {app}\nspec:\n  containers:\n  - name: main\n    image: bench\n"
        )
    };
    let policy = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-client\n  namespace: {NAMESPACE}\nspec:\n  podSelector:\n    matchLabels:\n      app: server\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: client\n    ports:\n    - {{protocol: TCP, port: {CRR_PORT}}}\n    - {{protocol: TCP, port: {RR_PORT}}}\n    - {{protocol: TCP, port: {IPERF_PORT}}}\n"
    );
    vec![(
        "bench.yaml",
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n{}{}{policy}",
            pod("client", "client"),
            pod("server", "server")
        ),
    )]
}

/// Dual-stack pods on every node (the same wiring for all configurations).
fn site(mut node: Node, subnet: &str, subnet6: &str) -> Result<Site> {
    let net = node.network("bench", subnet, None).with_ipv6(subnet6)?;
    node.add_pod(&net, NAMESPACE, "client")?;
    node.add_pod(&net, NAMESPACE, "server")?;
    // One knob for both families' ephemeral ports.
    node.pods[0]
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    let server = &node.pods[1];
    let server6 = IpAddr::V6(server.ip6.with_context(|| {
        format!("the CNI result gave the server no IPv6 address (range {subnet6})")
    })?);
    let mut servers = Vec::new();
    for at in [IpAddr::V4(Ipv4Addr::UNSPECIFIED), server6] {
        servers.push(Server::start(server, at, CRR_PORT, Kind::Crr)?);
        servers.push(Server::start(server, at, RR_PORT, Kind::Rr)?);
        servers.push(Server::start(server, at, DENY_PORT, Kind::Accept)?);
    }
    let iperf = in_netns(&server.ns.path(), || {
        Command::new("iperf3")
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    })??;
    let iperf = ChildGuard(iperf);
    Ok(Site {
        node,
        client: 0,
        server: 1,
        _servers: servers,
        _iperf: iperf,
    })
}

pub fn run(plan: &Plan) -> Result<Veth> {
    let a = site(Node::with_stub("pbna")?, "10.200.1.0/24", "fd00:200:1::/64")?;
    let c = site(Node::with_stub("pbnc")?, "10.200.2.0/24", "fd00:200:2::/64")?;
    let b = site(
        Node::with_agent("pbnb", &manifests())?,
        "10.200.3.0/24",
        "fd00:200:3::/64",
    )?;
    let d = site(Node::with_stub("pbnd")?, "10.200.4.0/24", "fd00:200:4::/64")?;
    let t = site(
        Node::with_agent_env("pbnt", &manifests(), &[("PALISADE_POD_HOOK", "tcx")])?,
        "10.200.5.0/24",
        "fd00:200:5::/64",
    )?;
    let k = site(
        Node::with_agent_env(
            "pbnk",
            &manifests(),
            &[("PALISADE_LOCAL_DELIVERY", "stack")],
        )?,
        "10.200.6.0/24",
        "fd00:200:6::/64",
    )?;
    sys::sleep(Duration::from_millis(300)); // iperf3 servers listening

    let agent = b.node.agent().context("agent")?;
    let st = agent.status()?;
    let server_ep = st
        .endpoints
        .iter()
        .find(|e| e.pod == "server")
        .context("the agent has no server endpoint")?;
    anyhow::ensure!(
        server_ep.ingress_enforced,
        "the server is not enforced: {st:?}"
    );
    anyhow::ensure!(
        server_ep.ipv6.is_some() && server_ep.ipv6 == b.node.pods[b.server].ip6,
        "the agent does not hold the server's IPv6 address {:?}: {server_ep:?}",
        b.node.pods[b.server].ip6
    );
    let mut extras = Extras::open(&agent.pin_root, server_ep.endpoint_id)?;
    let mut t_extras = Extras::of_server(&t, "tcx")?;
    let mut k_extras = Extras::of_server(&k, "stack delivery")?;

    let mut out = Veth {
        rounds: plan.rounds,
        seconds_per_sample: plan.secs,
        ..Default::default()
    };
    let mut configs = vec!["a".to_string()];
    configs.extend(plan.b_sizes.iter().map(|n| format!("b-{n}")));
    // Diagnostic: (b) with the agent stopped (SIGSTOP): the programs and
    // maps work on, the flow events are not read and pile up in the ring
    // (woken once when the backlog passes the threshold, records refused
    // once the ring is full): what a stalled agent costs the datapath.
    if let Some(n) = plan.b_sizes.iter().max() {
        configs.push(format!("bs-{n}"));
        configs.push(format!("bt-{n}"));
        configs.push(format!("bk-{n}"));
    }
    configs.push("a6".into());
    configs.extend(plan.b6_sizes.iter().map(|n| format!("b6-{n}")));
    configs.extend(plan.c_sizes.iter().map(|n| format!("c-{n}")));
    configs.extend(plan.d_sizes.iter().map(|n| format!("d-{n}")));
    out.configs = configs.clone();

    // Checks: enforcement really is off in (a) and on in (b) and (c).
    let (cip, sip) = (c.client().ip, c.server_ip());
    let first_c = plan.c_sizes.first().copied().unwrap_or(10);
    let ports = [CRR_PORT, RR_PORT, IPERF_PORT];
    out.iptables_load_s.push((
        first_c,
        iptables_restore(&c.node, iptables_rules(first_c, cip, sip, &ports))?,
    ));
    let mut c_loaded = first_c;
    let (dcip, dsip) = (d.client().ip, d.server_ip());
    let first_d = plan.d_sizes.first().copied().unwrap_or(10);
    out.nft_load_s.push((
        first_d,
        nft_load(&d.node, nft_rules(first_d, dcip, dsip, &ports))?,
    ));
    let mut d_loaded = first_d;
    for (name, s, want_denied) in [
        ("(a)", &a, false),
        ("(b)", &b, true),
        ("(bt)", &t, true),
        ("(bk)", &k, true),
        ("(c)", &c, true),
        ("(d)", &d, true),
        ("(a6) over IPv6", &a, false),
        ("(b6) over IPv6", &b, true),
    ] {
        let to = s.server_at(name.contains("IPv6"))?;
        let allowed = connects(s.client(), to, CRR_PORT)?;
        let denied_port = connects(s.client(), to, DENY_PORT)?;
        out.checks.push(format!(
            "{name}: allowed port connects: {allowed}; port {DENY_PORT} (no rule) connects: {denied_port}"
        ));
        if !allowed || denied_port == want_denied {
            bail!("enforcement check failed: {}", out.checks.join("; "));
        }
    }
    // Warm-up, untimed.
    for (s, v6) in [
        (&a, false),
        (&b, false),
        (&t, false),
        (&k, false),
        (&c, false),
        (&d, false),
        (&a, true),
        (&b, true),
    ] {
        crr(s.client(), s.server_at(v6)?, 0.3)?;
        rr(s.client(), s.server_at(v6)?, 0.2)?;
    }

    let mut crr_m = VethMeasure {
        name: "crr".into(),
        unit: "conn/s".into(),
        samples: configs.iter().map(|c| (c.clone(), Vec::new())).collect(),
    };
    let mut rr_m = VethMeasure {
        name: "rr".into(),
        unit: "trans/s".into(),
        samples: crr_m.samples.clone(),
    };
    let mut st_m = VethMeasure {
        name: "stream".into(),
        unit: "Gbit/s".into(),
        samples: crr_m.samples.clone(),
    };
    let push = |m: &mut VethMeasure, cfg: &str, v: f64| {
        if let Some((_, s)) = m.samples.iter_mut().find(|(c, _)| c == cfg) {
            s.push(v);
        }
    };
    let mut checked: Vec<String> = Vec::new();
    for round in 0..plan.rounds {
        for cfg in rotated(&configs, round) {
            sys::check()?;
            let (kind, n) = match cfg.split_once('-') {
                Some((k, n)) => (k, n.parse::<usize>()?),
                None => (cfg.as_str(), 0),
            };
            // (b) and (b6) are the agent enforcing, over each family.
            let enforced = matches!(kind, "b" | "b6");
            let agent_pid = b.node.agent().map_or(0, |a| a.pid());
            let _stopped = (kind == "bs").then(|| Stopped::new(agent_pid));
            let s = match kind {
                "a" | "a6" => &a,
                "b" | "bs" | "b6" => {
                    extras.set(n)?;
                    &b
                }
                "bt" => {
                    t_extras.set(n)?;
                    &t
                }
                "bk" => {
                    k_extras.set(n)?;
                    &k
                }
                "d" => {
                    if d_loaded != n {
                        let t = nft_load(&d.node, nft_rules(n, dcip, dsip, &ports))?;
                        out.nft_load_s.push((n, t));
                        d_loaded = n;
                    }
                    &d
                }
                _ => {
                    if c_loaded != n {
                        let t = iptables_restore(&c.node, iptables_rules(n, cip, sip, &ports))?;
                        out.iptables_load_s.push((n, t));
                        c_loaded = n;
                    }
                    &c
                }
            };
            let to = s.server_at(is_v6(&cfg))?;
            let before = if enforced {
                extras.policy_allowed()?
            } else {
                0
            };
            let cpu0 = enforced.then(|| sys::cpu_seconds(agent_pid)).transpose()?;
            let t0 = Instant::now();
            let (ok, failed, secs) = crr(s.client(), to, plan.secs)?;
            if enforced && !checked.iter().any(|k| k == kind) {
                let admitted = extras.policy_allowed()? - before;
                out.checks.push(format!(
                    "({kind}): {ok} connections to {to}, {admitted} new flows admitted by the policy rule (POLICY_ALLOW counter)"
                ));
                checked.push(kind.to_string());
            }
            let crr_rate = if failed > ok / 100 + 5 {
                eprintln!("    {cfg}: {failed} failed connections; sample dropped");
                f64::NAN
            } else {
                ok as f64 / secs
            };
            push(&mut crr_m, &cfg, crr_rate);
            let rr_rate = match rr(s.client(), to, plan.secs) {
                Ok((n, secs)) => n as f64 / secs,
                Err(e) => {
                    eprintln!("    {cfg}: rr failed: {e:#}");
                    f64::NAN
                }
            };
            push(&mut rr_m, &cfg, rr_rate);
            let gbps = match stream(s.client(), to, plan.iperf_secs) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("    {cfg}: iperf3 failed: {e:#}");
                    f64::NAN
                }
            };
            push(&mut st_m, &cfg, gbps);
            if let Some(c0) = cpu0 {
                let used = sys::cpu_seconds(agent_pid)? - c0;
                out.agent_cpu
                    .push((cfg.clone(), used / t0.elapsed().as_secs_f64()));
            }
            eprintln!(
                "    round {}/{} {cfg:>8}: {:>7.0} conn/s {:>7.0} trans/s {:>6.2} Gbit/s",
                round + 1,
                plan.rounds,
                crr_rate,
                rr_rate,
                gbps
            );
        }
    }
    out.measures = vec![crr_m, rr_m, st_m];
    out.program_ns = program_costs(plan, &b, &agent.pin_root, &mut extras)?;
    Ok(out)
}

/// Diagnostic, after the rounds: what (b)'s programs cost per run in this
/// traffic, from the kernel's own run statistics (`BPF_ENABLE_STATS`, on
/// for this pass only: it adds two clock reads to every run of every
/// program), for crr and rr at the largest N over each family. The
/// throughput ratios move by a few percent between runs; this figure
/// shows a change of a few ns per packet, which is how builds are
/// compared. (It is the programs' own time: work they leave to the stack,
/// e.g. a head copy `ip_forward` then makes, is not in it.)
fn program_costs(
    plan: &Plan,
    b: &Site,
    pin_root: &std::path::Path,
    extras: &mut Extras,
) -> Result<Vec<ProgramCost>> {
    let ids = pod_programs(pin_root)?;
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run statistics")?;
    let mut out = Vec::new();
    let runs = [
        (plan.b_sizes.iter().max(), "b", false),
        (plan.b6_sizes.iter().max(), "b6", true),
    ];
    for (n, kind, v6) in runs {
        let Some(&n) = n else { continue };
        extras.set(n)?;
        let to = b.server_at(v6)?;
        for measure in ["crr", "rr"] {
            let before = program_stats(&ids)?;
            if measure == "crr" {
                crr(b.client(), to, plan.secs)?;
            } else {
                rr(b.client(), to, plan.secs)?;
            }
            let after = program_stats(&ids)?;
            for ((program, c0, t0), (_, c1, t1)) in before.into_iter().zip(after) {
                let runs = c1.saturating_sub(c0);
                // No runs counted (statistics not kept): no figure, not 0 ns.
                let ns_per_run = if runs == 0 {
                    f64::NAN
                } else {
                    t1.saturating_sub(t0).as_nanos() as f64 / runs as f64
                };
                out.push(ProgramCost {
                    config: format!("{kind}-{n}"),
                    measure: measure.into(),
                    program,
                    runs,
                    ns_per_run,
                });
            }
        }
    }
    Ok(out)
}

/// The ids of `pod_egress` and `pod_ingress` as the agent with pins under
/// `pin_root` loaded them: the programs that use its pinned COUNTERS map
/// (every node's agent loads programs of the same names).
fn pod_programs(pin_root: &std::path::Path) -> Result<Vec<(String, u32)>> {
    let counters = MapData::from_pin(pin_root.join("maps").join("COUNTERS"))
        .context("opening pinned COUNTERS")?;
    let map = counters.info()?.id();
    let mut out = Vec::new();
    for p in aya::programs::loaded_programs() {
        let p = p?;
        let name = p.name_as_str().unwrap_or_default();
        if matches!(name, "pod_egress" | "pod_ingress")
            && p.map_ids()?.is_some_and(|m| m.contains(&map))
        {
            out.push((name.to_string(), p.id()));
        }
    }
    out.sort();
    anyhow::ensure!(
        out.len() == 2,
        "expected the agent's pod_egress and pod_ingress, found {out:?}"
    );
    Ok(out)
}

/// (program, runs, run time) of each of `ids`, in order.
fn program_stats(ids: &[(String, u32)]) -> Result<Vec<(String, u64, Duration)>> {
    let all: Vec<aya::programs::ProgramInfo> =
        aya::programs::loaded_programs().collect::<Result<_, _>>()?;
    ids.iter()
        .map(|(name, id)| {
            let p = all
                .iter()
                .find(|p| p.id() == *id)
                .with_context(|| format!("{name} (id {id}) is no longer loaded"))?;
            Ok((name.clone(), p.run_count(), p.run_time()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_ruleset_has_the_shortcut_first_and_the_drop_last() {
        let c = Ipv4Addr::new(10, 200, 2, 2);
        let s = Ipv4Addr::new(10, 200, 2, 3);
        let r = iptables_rules(3, c, s, &[7001, 7002]);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "*filter");
        assert!(lines[4].contains("--ctstate RELATED,ESTABLISHED -j ACCEPT"));
        assert_eq!(lines.iter().filter(|l| l.contains("10.251.")).count(), 3);
        assert!(lines[8].starts_with("-A FORWARD -s 10.200.2.2/32 -d 10.200.2.3/32"));
        assert!(lines[8].ends_with("--dport 7001 -j ACCEPT"));
        assert_eq!(
            lines[lines.len() - 2],
            "-A FORWARD -d 10.200.2.3/32 -j DROP"
        );
        assert_eq!(lines[lines.len() - 1], "COMMIT");
    }

    #[test]
    fn nft_ruleset_is_one_set_lookup_after_the_shortcut() {
        let c = Ipv4Addr::new(10, 200, 4, 2);
        let s = Ipv4Addr::new(10, 200, 4, 3);
        let r = nft_rules(3, c, s, &[7001, 7002]);
        assert!(r.starts_with("flush ruleset\n"));
        assert!(r.contains("type ipv4_addr . ipv4_addr . inet_service"));
        assert!(r.contains("10.251.0.1 . 10.200.4.3 . 20000, "));
        assert!(r.contains("10.200.4.2 . 10.200.4.3 . 7002 }"));
        let chain: Vec<&str> = r
            .lines()
            .skip_while(|l| !l.contains("chain forward"))
            .map(str::trim)
            .collect();
        assert_eq!(chain[2], "ct state established,related accept");
        assert_eq!(
            chain[3],
            "ip daddr 10.200.4.3 ip saddr . ip daddr . tcp dport @allowed accept"
        );
        assert_eq!(chain[4], "ip daddr 10.200.4.3 drop");
    }

    #[test]
    fn filler_peers_are_distinct_and_outside_the_pod_subnets() {
        assert_eq!(filler_peer(0), Ipv4Addr::new(10, 251, 0, 1));
        assert_eq!(filler_peer(9999), Ipv4Addr::new(10, 251, 39, 16));
        assert_ne!(extra_key(5, 1), extra_key(5, 2));
    }

    #[test]
    fn ipv6_configs_run_at_the_ends_of_the_b_sizes() {
        assert_eq!(ends(&[10, 1000, 10_000]), vec![10, 10_000]);
        assert_eq!(ends(&[10_000]), vec![10_000]);
        assert!(ends(&[]).is_empty());
        assert_eq!(Plan::new(true, 2).b6_sizes, vec![10_000]);
        assert_eq!(Plan::new(false, 5).b6_sizes, vec![10, 10_000]);
        assert!(is_v6("a6") && is_v6("b6-10") && is_v6("b6-10000"));
        assert!(!is_v6("a") && !is_v6("b-10") && !is_v6("bs-10000") && !is_v6("c-10"));
        assert!(!is_v6("d-10000"));
    }

    #[test]
    fn ipv6_filler_peers_are_distinct_and_outside_the_pod_ranges() {
        assert_eq!(filler_peer6(0), "fd00:251::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            filler_peer6(9999),
            "fd00:251::2710".parse::<Ipv6Addr>().unwrap()
        );
    }
}
