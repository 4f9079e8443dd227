//! Section 8: traffic to a Service ClusterIP through real veths. One node
//! namespace with a client and a server pod (veth pairs wired as the CNI
//! plugin wires them), palisade's programs on both host veths, policy
//! enforced on the client's egress and the server's ingress (allow client
//! -> server on the measured ports). Three destinations, measured round by
//! round in rotated order, on the same pods and programs:
//!
//! * `direct`: the server pod's address;
//! * `clusterip`: a ClusterIP translated by palisade (tc DNAT before
//!   conntrack and policy, reverse translation of replies);
//! * `iptables`: a second ClusterIP that palisade does not translate,
//!   DNATed by kube-proxy-style rules in the node's nat PREROUTING chain
//!   (one KUBE-SERVICES-like jump per Service, one DNAT per endpoint). So
//!   that palisade's policy admits it at all (it judges the packet before
//!   the node's DNAT, as before issue 12), that ClusterIP is given the
//!   server's identity in the ipcache and the client's egress admits the
//!   Service ports too: the same lookups, no translation.
//!
//! Measures new connections per second (connect, 1-byte request, 1-byte
//! response, close) and 1-byte request/response transactions per second.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use palisade_common::{
    service::{SvcBackend, SvcBackendKey, SvcFrontend, SvcFrontendKey},
    EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW, DIR_EGRESS, DIR_INGRESS,
    EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED, IDENTITY_WORLD, POLICY_PREFIX_FULL, PROTO_TCP,
};
use palisade_dataplane::{maps::be, Datapath, DatapathConfig, Maps};
use palisade_tests::{link_mac, Node, PinRoot};
use serde::Serialize;

use crate::{
    stats::{median, paired_ratios, rotated},
    sys::{self, enter_thread, in_netns},
};

const GW: Ipv4Addr = Ipv4Addr::new(10, 93, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 93, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 93, 0, 3);
const VIP_PALISADE: Ipv4Addr = Ipv4Addr::new(10, 92, 0, 10);
const VIP_IPTABLES: Ipv4Addr = Ipv4Addr::new(10, 92, 0, 11);
/// Server ports, one pair per configuration: connections of different
/// configurations never meet the same server-side tuple (whose TIME_WAIT
/// remembers the other path's TCP timestamps and would stall new SYNs).
const CRR_PORT: u16 = 7101;
const RR_PORT: u16 = 7102;
const CRR_PORT_SVC: u16 = 7111;
const RR_PORT_SVC: u16 = 7112;
const CRR_PORT_IPT: u16 = 7121;
const RR_PORT_IPT: u16 = 7122;
/// The Service ports (translated to CRR_PORT / RR_PORT).
const SVC_CRR: u16 = 80;
const SVC_RR: u16 = 81;
const TRAFFIC_CPU: usize = 1;

pub const CONFIGS: [&str; 3] = ["direct", "clusterip", "iptables"];
/// clusterip / direct
pub const FLOOR_DIRECT: f64 = 0.95;
/// clusterip / iptables
pub const FLOOR_IPTABLES: f64 = 1.0;

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
pub struct Services {
    pub rounds: usize,
    pub secs: f64,
    /// Per measure ("connections/s", "request/response/s"), per config,
    /// one rate per round.
    pub measures: Vec<ServiceMeasure>,
    /// Per packet of an established flow, direct and translated
    /// (`services_testrun`): (scenario, median ns).
    pub per_packet: Vec<(String, f64)>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ServiceMeasure {
    pub name: String,
    /// (config, per-round rates)
    pub samples: Vec<(String, Vec<f64>)>,
}

impl ServiceMeasure {
    fn of(&self, config: &str) -> &[f64] {
        self.samples
            .iter()
            .find(|(c, _)| c == config)
            .map_or(&[][..], |(_, v)| &v[..])
    }
    pub fn median(&self, config: &str) -> f64 {
        median(self.of(config)).unwrap_or(f64::NAN)
    }
    /// Median of the per-round ratios num/den.
    pub fn ratio(&self, num: &str, den: &str) -> f64 {
        median(&paired_ratios(self.of(num), self.of(den))).unwrap_or(f64::NAN)
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
    fn start(node: &Node, port: u16, crr: bool) -> Result<Self> {
        let path = node.pods[1].ns.path();
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

fn crr(node: &Node, to: SocketAddr, secs: f64) -> Result<f64> {
    let (ok, failed, t) = in_netns(&node.pods[0].ns.path(), move || {
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

fn rr(node: &Node, to: SocketAddr, secs: f64) -> Result<f64> {
    in_netns(&node.pods[0].ns.path(), move || -> Result<f64> {
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

fn target(config: &str, crr: bool) -> SocketAddr {
    match (config, crr) {
        ("direct", true) => (SERVER, CRR_PORT).into(),
        ("direct", false) => (SERVER, RR_PORT).into(),
        ("clusterip", true) => (VIP_PALISADE, SVC_CRR).into(),
        ("clusterip", false) => (VIP_PALISADE, SVC_RR).into(),
        (_, true) => (VIP_IPTABLES, SVC_CRR).into(),
        (_, false) => (VIP_IPTABLES, SVC_RR).into(),
    }
}

/// kube-proxy (iptables mode) for the untranslated ClusterIP: a jump per
/// Service from KUBE-SERVICES, a per-endpoint DNAT chain.
fn kube_proxy_rules() -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-CRR - [0:0]\n:KUBE-SVC-RR - [0:0]\n:KUBE-SEP-CRR - [0:0]\n:KUBE-SEP-RR - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n");
    for (chain, sport, tport) in [("CRR", SVC_CRR, CRR_PORT_IPT), ("RR", SVC_RR, RR_PORT_IPT)] {
        r += &format!(
            "-A KUBE-SERVICES -d {VIP_IPTABLES}/32 -p tcp -m tcp --dport {sport} -j KUBE-SVC-{chain}\n\
             -A KUBE-SVC-{chain} -j KUBE-SEP-{chain}\n\
             -A KUBE-SEP-{chain} -p tcp -m tcp -j DNAT --to-destination {SERVER}:{tport}\n"
        );
    }
    r + "COMMIT\n"
}

fn setup(maps: &mut Maps) -> Result<()> {
    let ip = |identity| IpcacheValue {
        identity,
        cidr_identity: IDENTITY_WORLD,
    };
    maps.set_ipcache(Ipv4Addr::UNSPECIFIED, 0, ip(IDENTITY_WORLD))?;
    maps.set_ipcache(CLIENT, 32, ip(1001))?;
    maps.set_ipcache(SERVER, 32, ip(1002))?;
    // See the module comment: the untranslated ClusterIP as the server,
    // on its Service ports (the client's egress sees them before the DNAT).
    maps.set_ipcache(VIP_IPTABLES, 32, ip(1002))?;
    let mut rules = vec![
        (SVC_CRR, 1, 1002, DIR_EGRESS),
        (SVC_RR, 1, 1002, DIR_EGRESS),
    ];
    for port in [
        CRR_PORT,
        RR_PORT,
        CRR_PORT_SVC,
        RR_PORT_SVC,
        CRR_PORT_IPT,
        RR_PORT_IPT,
    ] {
        rules.push((port, 1, 1002, DIR_EGRESS));
        rules.push((port, 2, 1001, DIR_INGRESS));
    }
    {
        for (port, ep, peer, dir) in rules {
            maps.set_policy(
                POLICY_PREFIX_FULL,
                PolicyKey {
                    endpoint_id: ep,
                    peer_identity: peer,
                    direction: dir,
                    protocol: PROTO_TCP,
                    dport_be: port.to_be(),
                },
                PolicyValue {
                    action: ACTION_ALLOW,
                    cookie: 1,
                },
            )?;
        }
    }
    for (id, sport, tport) in [(1, SVC_CRR, CRR_PORT_SVC), (2, SVC_RR, RR_PORT_SVC)] {
        maps.set_backend(
            SvcBackendKey {
                service_id: id,
                slot: 0,
            },
            SvcBackend {
                addr: be(SERVER),
                port_be: tport.to_be(),
                _pad: 0,
            },
        )?;
        maps.set_frontend(
            SvcFrontendKey {
                addr: be(VIP_PALISADE),
                port_be: sport.to_be(),
                protocol: PROTO_TCP,
                _pad: 0,
            },
            SvcFrontend {
                service_id: id,
                backends: 1,
                affinity_s: 0,
            },
        )?;
    }
    Ok(())
}

pub fn run(plan: &Plan) -> Result<Services> {
    let pins = PinRoot::new()?;
    let mut node = Node::new(GW)?;
    node.add_pod(CLIENT)?;
    node.add_pod(SERVER)?;
    let cfg = DatapathConfig {
        pins: pins.pins.clone(),
        ..Default::default()
    };
    // With their MACs, as the CNI plugin registers pods: traffic between
    // them is delivered past the node's stack (`palisade_common::local`),
    // except the `iptables` path's answers, which its DNAT needs undone.
    let ifs: Vec<(String, Ipv4Addr, u32, u32, [u8; 6])> = vec![
        (
            node.pods[0].host_if.clone(),
            CLIENT,
            1,
            EP_EGRESS_ENFORCED,
            link_mac(&node.pods[0].ns, "eth0")?,
        ),
        (
            node.pods[1].host_if.clone(),
            SERVER,
            2,
            EP_INGRESS_ENFORCED,
            link_mac(&node.pods[1].ns, "eth0")?,
        ),
    ];
    let (_dp, mut maps) = in_netns(&node.ns.path(), move || -> Result<(Datapath, Maps)> {
        let mut dp = Datapath::load(&cfg)?;
        let mut maps = dp.take_maps()?;
        for (ifname, ip, ep, flags, mac) in ifs {
            let ifindex = palisade_dataplane::loader::ifindex(&ifname)?;
            maps.upsert_endpoint(
                ifindex,
                EndpointInfo {
                    endpoint_id: ep,
                    identity: 1000 + ep,
                    ipv4: be(ip),
                    flags,
                    generation: 0,
                    mac,
                    _pad: [0; 2],
                    ipv6: [0; 4],
                },
            )?;
            dp.attach_pod(&ifname)?;
        }
        Ok((dp, maps))
    })??;
    setup(&mut maps)?;
    let mut restore = node.ns.cmd("iptables-restore");
    restore
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    let mut child = restore.spawn().context("iptables-restore")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(kube_proxy_rules().as_bytes())?;
    if !child.wait()?.success() {
        bail!("iptables-restore of the kube-proxy rules failed");
    }
    let mut _servers = Vec::new();
    for (port, crr) in [
        (CRR_PORT, true),
        (RR_PORT, false),
        (CRR_PORT_SVC, true),
        (RR_PORT_SVC, false),
        (CRR_PORT_IPT, true),
        (RR_PORT_IPT, false),
    ] {
        _servers.push(Server::start(&node, port, crr)?);
    }

    let mut out = Services {
        rounds: plan.rounds,
        secs: plan.secs,
        measures: ["connections/s", "request/response/s"]
            .iter()
            .map(|n| ServiceMeasure {
                name: n.to_string(),
                samples: CONFIGS
                    .iter()
                    .map(|c| (c.to_string(), Vec::new()))
                    .collect(),
            })
            .collect(),
        per_packet: crate::services_testrun::run(if plan.secs < 1.0 { 2000 } else { 20000 })?,
    };
    // Every path works before anything is timed.
    for c in CONFIGS {
        crr(&node, target(c, true), 0.05).with_context(|| format!("{c}: warm-up"))?;
    }
    for round in 0..plan.rounds {
        for c in rotated(&CONFIGS, round) {
            sys::check()?;
            let a = crr(&node, target(c, true), plan.secs).with_context(|| c.to_string())?;
            let b = rr(&node, target(c, false), plan.secs).with_context(|| c.to_string())?;
            for (m, v) in out.measures.iter_mut().zip([a, b]) {
                if let Some((_, s)) = m.samples.iter_mut().find(|(n, _)| n == c) {
                    s.push(v);
                }
            }
            eprintln!("    round {round} {c:<10} {a:>8.0} conn/s {b:>8.0} rr/s");
        }
    }
    let translated = maps.counter(palisade_common::reason::SVC_TRANSLATED)?;
    if translated == 0 {
        bail!("no flow was translated by palisade: the clusterip configuration measured nothing");
    }
    Ok(out)
}
