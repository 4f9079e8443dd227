//! Section 9: traffic between nodes. Two simulated nodes (node namespaces
//! on a fabric bridge, the real agent and CNI plugin on each, as the
//! conformance runner builds them with `--nodes 2`), a client pod on n1
//! and a server pod on n2, routed by the agents themselves: natively (a
//! route per node) and over their VXLAN overlay. Per routing mode, two
//! configurations alternate round by round on the same pods, programs and
//! routes:
//!
//! * `policy`: the client's egress admits only the server's measured
//!   ports, the server's ingress only the client (enforced at both ends);
//! * `none`: no NetworkPolicy (nothing enforced; the programs stay).
//!
//! Measures new connections per second (connect, 1-byte request, 1-byte
//! response, close) and 1-byte request/response transactions per second.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use palisade_tests::conformance::{
    case::Case,
    cluster::Tools,
    runner::{Live, Options},
    signal::RunPins,
};
use serde::Serialize;

use crate::{
    stats::{median, paired_ratios, rotated},
    sys::{self, enter_thread, in_netns},
};

const CRR_PORT: u16 = 7201;
const RR_PORT: u16 = 7202;
const TRAFFIC_CPU: usize = 1;
pub const MODES: [&str; 2] = ["native", "vxlan"];
pub const CONFIGS: [&str; 2] = ["policy", "none"];
/// policy / none, per mode and measure.
pub const FLOOR: f64 = 0.95;

const CASE: &str = r#"
name: bench-nodes
cluster:
  nodes: [{name: n1}, {name: n2}]
  namespaces: {bench: {}}
  pods:
    - {namespace: bench, name: client, node: n1, labels: {role: client}}
    - {namespace: bench, name: server, node: n2, labels: {role: server}}
"#;

fn policies() -> Vec<(&'static str, String)> {
    vec![
        (
            "server-ingress",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-ingress, namespace: bench}\nspec: {podSelector: {matchLabels: {role: server}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]}\n".into(),
        ),
        (
            "client-egress",
            format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: client-egress, namespace: bench}}\nspec: {{podSelector: {{matchLabels: {{role: client}}}}, policyTypes: [Egress], egress: [{{to: [{{podSelector: {{matchLabels: {{role: server}}}}}}], ports: [{{port: {CRR_PORT}}}, {{port: {RR_PORT}}}]}}]}}\n"),
        ),
    ]
}

pub struct Plan {
    pub rounds: usize,
    pub secs: f64,
}

impl Plan {
    pub fn new(quick: bool, rounds: usize) -> Self {
        Self {
            rounds,
            secs: if quick { 0.5 } else { 1.5 },
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Nodes {
    pub rounds: usize,
    pub secs: f64,
    /// Per mode and measure ("native connections/s", ...), per config, one
    /// rate per round.
    pub measures: Vec<NodeMeasure>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeMeasure {
    pub mode: String,
    pub name: String,
    pub samples: Vec<(String, Vec<f64>)>,
}

impl NodeMeasure {
    fn of(&self, config: &str) -> &[f64] {
        self.samples
            .iter()
            .find(|(c, _)| c == config)
            .map_or(&[][..], |(_, v)| &v[..])
    }
    pub fn median(&self, config: &str) -> f64 {
        median(self.of(config)).unwrap_or(f64::NAN)
    }
    /// Median of the per-round ratios policy / none.
    pub fn ratio(&self) -> f64 {
        median(&paired_ratios(self.of("policy"), self.of("none"))).unwrap_or(f64::NAN)
    }
}

struct Server {
    fd: i32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _l: Arc<TcpListener>,
}

impl Server {
    /// `crr`: read a byte, answer it, close; else answer bytes until EOF.
    fn start(ns: &Path, port: u16, crr: bool) -> Result<Self> {
        let path = ns.to_path_buf();
        let l = Arc::new(in_netns(&path, move || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        })??);
        let stop = Arc::new(AtomicBool::new(false));
        let (s, l2) = (stop.clone(), l.clone());
        let thread = std::thread::spawn(move || {
            sys::pin_thread(TRAFFIC_CPU);
            let _ = enter_thread(&path);
            for c in l2.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = c else { continue };
                let _ = c.set_nodelay(true);
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                let mut b = [0u8; 1];
                if crr {
                    if c.read_exact(&mut b).is_ok() {
                        let _ = c.write_all(&b);
                    }
                } else {
                    while !s.load(Ordering::Relaxed) && c.read_exact(&mut b).is_ok() {
                        if c.write_all(&b).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Self {
            fd: l.as_raw_fd(),
            stop,
            thread: Some(thread),
            _l: l,
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

fn crr(ns: PathBuf, to: SocketAddr, secs: f64) -> Result<f64> {
    let (ok, failed, t) = in_netns(&ns, move || {
        sys::pin_thread(TRAFFIC_CPU);
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let t = Instant::now();
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut buf = [0u8; 8];
        while Instant::now() < end && !sys::interrupted() {
            let mut one = || -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                s.write_all(&[1])?;
                s.read_exact(&mut buf[..1])?;
                let _ = s.read(&mut buf);
                Ok(())
            };
            match one() {
                Ok(()) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed, t.elapsed().as_secs_f64())
    })?;
    if failed > ok / 100 {
        bail!("{to}: {failed} failed connections ({ok} ok)");
    }
    Ok(ok as f64 / t)
}

fn rr(ns: PathBuf, to: SocketAddr, secs: f64) -> Result<f64> {
    in_netns(&ns, move || -> Result<f64> {
        sys::pin_thread(TRAFFIC_CPU);
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut b = [0u8; 1];
        for _ in 0..100 {
            s.write_all(&b)?;
            s.read_exact(&mut b)?;
        }
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let t = Instant::now();
        let mut n = 0u64;
        while !sys::interrupted() {
            for _ in 0..64 {
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
            }
            n += 64;
            if Instant::now() >= end {
                break;
            }
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    })?
}

/// Policies in (`policy`) or out (`none`), then Sync on both nodes.
fn configure(live: &Live, config: &str) -> Result<()> {
    for (name, doc) in policies() {
        let path = live
            .cluster
            .manifests()
            .join(format!("np_bench_{name}.yaml"));
        if config == "policy" {
            palisade_tests::agent::write_manifest(
                &live.cluster.manifests(),
                &format!("np_bench_{name}.yaml"),
                &doc,
            )?;
        } else if path.exists() {
            live.cluster.delete_policy("bench", name)?;
        }
    }
    live.cluster.sync()?;
    Ok(())
}

fn run_mode(plan: &Plan, mode: &str, out: &mut Nodes) -> Result<()> {
    let case = Case::parse(CASE, Path::new("bench-nodes.yaml"))?;
    let pins = RunPins::create()?;
    let tools = Tools::locate()?;
    let opts = Options {
        routing: mode.into(),
        ..Options::default()
    };
    let live = Live::start_on(&case, &tools, &pins.0, None, &opts)?;
    let client = live.cluster.pod("bench/client").expect("pod").netns_path();
    let server_ns = live.cluster.pod("bench/server").expect("pod").netns_path();
    let server = live.ip("bench/server");
    let _crr = Server::start(&server_ns, CRR_PORT, true)?;
    let _rr = Server::start(&server_ns, RR_PORT, false)?;
    let mut conn: Vec<(String, Vec<f64>)> =
        CONFIGS.iter().map(|c| (c.to_string(), vec![])).collect();
    let mut tr = conn.clone();
    // Enforcement really is on in `policy`: another port is refused.
    configure(&live, "policy")?;
    let blocked = in_netns(&client, move || {
        TcpStream::connect_timeout(&(server, 7299).into(), Duration::from_millis(300)).is_ok()
    })?;
    if blocked {
        bail!("{mode}: the client reached a port its egress policy does not admit");
    }
    for round in 0..plan.rounds {
        for c in rotated(&CONFIGS, round) {
            if sys::interrupted() {
                bail!("interrupted");
            }
            configure(&live, c)?;
            let i = CONFIGS.iter().position(|x| *x == c).expect("known");
            conn[i]
                .1
                .push(crr(client.clone(), (server, CRR_PORT).into(), plan.secs)?);
            tr[i]
                .1
                .push(rr(client.clone(), (server, RR_PORT).into(), plan.secs)?);
        }
    }
    out.measures.push(NodeMeasure {
        mode: mode.into(),
        name: "connections/s".into(),
        samples: conn,
    });
    out.measures.push(NodeMeasure {
        mode: mode.into(),
        name: "request/response/s".into(),
        samples: tr,
    });
    drop(live);
    drop(pins);
    Ok(())
}

pub fn run(plan: &Plan) -> Result<Nodes> {
    palisade_tests::ensure_bpffs()?;
    let mut out = Nodes {
        rounds: plan.rounds,
        secs: plan.secs,
        measures: Vec::new(),
    };
    for mode in MODES {
        run_mode(plan, mode, &mut out)?;
    }
    Ok(out)
}
