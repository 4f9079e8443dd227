//! Section 6: Packets passed unenforced at pod start. The target pod's namespace
//! has a default-deny ingress policy before the pod exists. A flooder pod
//! sends UDP datagrams and TCP SYNs at the address the new pod will get
//! (its network's pool holds exactly that one address) from before CNI ADD
//! until after it returned. Inside the new pod, created before ADD as a
//! runtime does, a receiver counts every IPv4 packet from the flooder that
//! reaches any of its interfaces (an AF_PACKET socket, which also sees the
//! interface the plugin creates later), plus UDP datagrams read and TCP
//! connections accepted. With the policy in force from the first packet,
//! every counted packet passed unenforced. A last trial in a namespace
//! without policy is the control: it must count packets.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    cluster::{self, Spec},
    node::Node,
    report::{Podstart, PodstartTrial},
    sys::{self, enter_thread, NetNs},
};

const UDP_PORT: u16 = 7101;
const TCP_PORT: u16 = 7102;
const TARGET: Ipv4Addr = Ipv4Addr::new(10, 203, 1, 50);

pub struct Plan {
    pub trials: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        Self {
            trials: if quick { 2 } else { 5 },
        }
    }
}

fn manifests() -> Vec<(&'static str, String)> {
    vec![(
        "podstart.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: locked\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: open\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: src\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: default-deny\n  namespace: locked\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n"
            .into(),
    )]
}

#[derive(Default)]
struct Counts {
    packets: AtomicU64,
    udp: AtomicU64,
    tcp: AtomicU64,
    /// ns after the receiver started that the first / last UDP datagram
    /// from the flooder was seen (u64::MAX / 0 when none).
    first_udp_ns: AtomicU64,
    last_udp_ns: AtomicU64,
}

/// What the receiver saw; times in ms relative to a given instant.
struct Seen {
    packets: u64,
    udp: u64,
    tcp: u64,
    first_udp_ms: Option<f64>,
    last_udp_ms: Option<f64>,
}

/// Counts what reaches the pod until stopped.
struct Receiver {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    started: Instant,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Receiver {
    fn start(pod: &NetNs, from: Ipv4Addr) -> Result<Self> {
        let path = pod.path();
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        counts.first_udp_ns.store(u64::MAX, Ordering::SeqCst);
        let started = Instant::now();
        let (s, c) = (stop.clone(), counts.clone());
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::spawn(move || -> Result<()> {
            let setup = (|| -> Result<_> {
                enter_thread(&path)?;
                // SAFETY: plain socket(2); the fd is owned below.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_DGRAM,
                        (libc::ETH_P_IP as u16).to_be() as i32,
                    )
                };
                if fd < 0 {
                    bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
                }
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 20_000,
                };
                // SAFETY: valid fd and option value.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        &tv as *const _ as *const libc::c_void,
                        std::mem::size_of::<libc::timeval>() as u32,
                    )
                };
                let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_PORT))?;
                udp.set_nonblocking(true)?;
                let tcp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, TCP_PORT))?;
                tcp.set_nonblocking(true)?;
                Ok((fd, udp, tcp))
            })();
            let (fd, udp, tcp) = match setup {
                Ok(x) => {
                    let _ = tx.send(Ok(()));
                    x
                }
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            let mut buf = [0u8; 2048];
            let want = from.octets();
            while !s.load(Ordering::SeqCst) {
                // SAFETY: zeroed sockaddr_ll is a valid out parameter.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: valid buffer and address pointers.
                let n = unsafe {
                    libc::recvfrom(
                        fd,
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        0,
                        &mut sll as *mut _ as *mut libc::sockaddr,
                        &mut len,
                    )
                };
                if n >= 20 && sll.sll_pkttype != libc::PACKET_OUTGOING && buf[12..16] == want {
                    c.packets.fetch_add(1, Ordering::Relaxed);
                    if buf[9] == 17 {
                        let at = started.elapsed().as_nanos() as u64;
                        c.first_udp_ns.fetch_min(at, Ordering::Relaxed);
                        c.last_udp_ns.fetch_max(at, Ordering::Relaxed);
                    }
                }
                let mut b = [0u8; 64];
                while udp.recv(&mut b).is_ok() {
                    c.udp.fetch_add(1, Ordering::Relaxed);
                }
                while tcp.accept().is_ok() {
                    c.tcp.fetch_add(1, Ordering::Relaxed);
                }
            }
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
            Ok(())
        });
        rx.recv().context("receiver thread")??;
        Ok(Self {
            stop,
            counts,
            started,
            thread: Some(thread),
        })
    }

    /// Counts, with the UDP times relative to `origin`.
    fn finish(mut self, origin: Instant) -> Result<Seen> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        }
        let c = &self.counts;
        let shift = origin.duration_since(self.started).as_secs_f64() * 1000.0;
        let rel = |ns: u64| ns as f64 / 1e6 - shift;
        let (first, last) = (
            c.first_udp_ns.load(Ordering::SeqCst),
            c.last_udp_ns.load(Ordering::SeqCst),
        );
        Ok(Seen {
            packets: c.packets.load(Ordering::SeqCst),
            udp: c.udp.load(Ordering::SeqCst),
            tcp: c.tcp.load(Ordering::SeqCst),
            first_udp_ms: (first != u64::MAX).then(|| rel(first)),
            last_udp_ms: (last != 0).then(|| rel(last)),
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// UDP and TCP SYNs at `to` from inside `pod`, until stopped.
struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<(AtomicU64, AtomicU64)>,
    threads: Vec<JoinHandle<()>>,
}

impl Flood {
    fn start(pod: &NetNs, to: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent: Arc<(AtomicU64, AtomicU64)> = Arc::default();
        let mut threads = Vec::new();
        for tcp in [false, true] {
            let (path, s, n) = (pod.path(), stop.clone(), sent.clone());
            threads.push(std::thread::spawn(move || {
                if enter_thread(&path).is_err() {
                    return;
                }
                let addr = SocketAddr::from((to, if tcp { TCP_PORT } else { UDP_PORT }));
                if tcp {
                    while !s.load(Ordering::Relaxed) && !sys::interrupted() {
                        // One SYN per attempt; the socket is dropped at once.
                        let _ = TcpStream::connect_timeout(&addr, Duration::from_micros(200));
                        n.1.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    let Ok(u) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                        return;
                    };
                    while !s.load(Ordering::Relaxed) && !sys::interrupted() {
                        for _ in 0..10 {
                            let _ = u.send_to(b"podstart", addr);
                        }
                        n.0.fetch_add(10, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }));
        }
        Self {
            stop,
            sent,
            threads,
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.sent.0.load(Ordering::SeqCst),
            self.sent.1.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `trials` pod starts in the default-deny namespace (and, with
/// `control`, one in the namespace without policy) on a node whose agent
/// reads `manifests`.
fn trials(
    manifests: &[(&str, String)],
    model: &str,
    trials: usize,
    control: bool,
) -> Result<Vec<PodstartTrial>> {
    let mut node = Node::with_agent("pbps", manifests)?;
    let src_net = node.network("src", "10.203.0.0/24", None);
    let target_net = node.network("target", "10.203.1.0/24", Some((TARGET, TARGET)));
    node.add_pod(&src_net, "src", "flooder")?;
    let flooder_ip = node.pods[0].ip;
    let mut out = Vec::new();
    let policies: Vec<&str> = std::iter::repeat_n("locked", trials)
        .chain(control.then_some("open"))
        .collect();
    for (t, ns_name) in policies.into_iter().enumerate() {
        sys::check()?;
        let pod = NetNs::new("pbtg")?;
        let rx = Receiver::start(&pod, flooder_ip)?;
        let flood = Flood::start(&node.pods[0].ns, TARGET);
        sys::sleep(Duration::from_millis(200));
        let cid = sys::unique("podstart-");
        let name = format!("target-{t}");
        let t0 = Instant::now();
        let add = node.cni(&target_net, "ADD", &cid, &pod.path(), ns_name, &name)?;
        let add_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let add = add.ok()?;
        let (ip, _) = crate::node::parse_add(&add.json()?)?;
        if ip != TARGET {
            bail!("the pod got {ip}, not {TARGET}");
        }
        sys::sleep(Duration::from_millis(300));
        let (udp_sent, syns) = flood.finish();
        sys::sleep(Duration::from_millis(100));
        let seen = rx.finish(t0)?;
        let (packets, udp, tcp) = (seen.packets, seen.udp, seen.tcp);
        node.cni(&target_net, "DEL", &cid, &pod.path(), ns_name, &name)?
            .ok()?;
        drop(pod);
        let trial = PodstartTrial {
            policy: if ns_name == "locked" {
                "default-deny".into()
            } else {
                "no policy (control)".into()
            },
            model: model.into(),
            udp_sent,
            tcp_syns_sent: syns,
            packets_received: packets,
            udp_received: udp,
            tcp_accepted: tcp,
            add_ms,
            first_udp_ms: seen.first_udp_ms,
            last_udp_ms: seen.last_udp_ms,
        };
        eprintln!(
            "    {model}, trial {} ({}): sent {udp_sent} UDP + {syns} SYNs, seen {packets} packets, {udp} UDP, {tcp} TCP; ADD {add_ms:.1} ms; UDP seen {} .. {} ms after ADD started",
            t + 1,
            trial.policy,
            fmt_ms(trial.first_udp_ms),
            fmt_ms(trial.last_udp_ms)
        );
        out.push(trial);
    }
    Ok(out)
}

fn fmt_ms(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.1}"))
}

pub fn run(plan: &Plan) -> Result<Podstart> {
    let mut out = Podstart::default();
    // A small model: registration takes a few milliseconds.
    out.trials.extend(trials(
        &manifests(),
        "3 namespaces, 1 policy",
        plan.trials,
        true,
    )?);
    // The synthetic cluster (10k pods, 1k policies) as well: registration
    // then recompiles a big model, so the pod waits longer for its
    // programs.
    let c = cluster::generate(&Spec::full());
    let mut files: Vec<(&str, String)> = c
        .files
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    files.extend(manifests());
    out.trials
        .extend(trials(&files, "10k pods, 1k policies", plan.trials, false)?);
    Ok(out)
}
