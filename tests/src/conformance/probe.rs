//! Servers and probes on real sockets inside pod namespaces.
//!
//! Each pod gets one server thread that enters the pod's namespace, binds
//! every port the pod serves (TCP: accept and close; UDP: echo; SCTP:
//! accept and close) and polls them until stopped. A probe is a real
//! connection attempt made by a thread that entered the source pod's
//! namespace; a step's probes all run at once on a pool of such threads.
use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use super::{case::Protocol, dns::Zone};
use crate::enter_thread;

/// TCP and SCTP: how long a connection may take to be established.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// UDP: datagrams sent, and how long to wait for each echo.
pub const UDP_TRIES: u32 = 3;
pub const UDP_WAIT: Duration = Duration::from_millis(300);

/// Whether this kernel can open an SCTP socket at all (no `sctp` module:
/// EPROTONOSUPPORT). Probes it cannot carry are reported as skipped.
pub fn sctp_supported() -> bool {
    // SAFETY: plain socket(2); the fd is closed right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd was just returned by socket(2) and is owned here.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    true
}

/// A socket address of either family, as the C calls take it.
enum RawAddr {
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
}

impl RawAddr {
    fn family(&self) -> libc::c_int {
        match self {
            Self::V4(_) => libc::AF_INET,
            Self::V6(_) => libc::AF_INET6,
        }
    }

    fn ptr(&self) -> (*const libc::sockaddr, libc::socklen_t) {
        match self {
            Self::V4(sa) => (
                (sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            Self::V6(sa) => (
                (sa as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            ),
        }
    }
}

fn sockaddr(ip: IpAddr, port: u16) -> RawAddr {
    match ip {
        IpAddr::V4(ip) => {
            // SAFETY: sockaddr_in is plain data; zero is a valid value.
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = port.to_be();
            sa.sin_addr = libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            };
            RawAddr::V4(sa)
        }
        IpAddr::V6(ip) => {
            // SAFETY: sockaddr_in6 is plain data; zero is a valid value.
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = port.to_be();
            sa.sin6_addr = libc::in6_addr {
                s6_addr: ip.octets(),
            };
            RawAddr::V6(sa)
        }
    }
}

/// A non-blocking socket of `family`.
fn socket(family: libc::c_int, kind: libc::c_int, proto: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            family,
            kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            proto,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: valid fd, value lives across the call, the length is its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A bound (and for stream sockets listening) socket on `ip`:`port`; an
/// IPv6 one is IPv6 only, so it sits beside the IPv4 one on the same port.
fn listen_on(
    ip: IpAddr,
    port: u16,
    kind: libc::c_int,
    proto: libc::c_int,
) -> std::io::Result<OwnedFd> {
    let sa = sockaddr(ip, port);
    let fd = socket(sa.family(), kind, proto)?;
    set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if ip.is_ipv6() {
        set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    let (ptr, len) = sa.ptr();
    // SAFETY: valid fd, sa lives across the call, len is its size.
    if unsafe { libc::bind(fd.as_raw_fd(), ptr, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: valid fd.
    if kind == libc::SOCK_STREAM && unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn sctp_listen(port: u16) -> std::io::Result<OwnedFd> {
    listen_on(
        Ipv4Addr::UNSPECIFIED.into(),
        port,
        libc::SOCK_STREAM,
        libc::IPPROTO_SCTP,
    )
}

/// Waits for `events` on one fd; false on timeout.
fn poll_one(fd: RawFd, events: libc::c_short, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis() as libc::c_int) };
        if n > 0 {
            return true;
        }
        if n == 0
            || std::io::Error::last_os_error().kind() != ErrorKind::Interrupted
            || left.is_zero()
        {
            return false;
        }
    }
}

/// An SCTP association established within the timeout.
pub fn sctp_connects(dst: impl Into<IpAddr>, port: u16, timeout: Duration) -> bool {
    let sa = sockaddr(dst.into(), port);
    let Ok(fd) = socket(sa.family(), libc::SOCK_STREAM, libc::IPPROTO_SCTP) else {
        return false;
    };
    let (ptr, len) = sa.ptr();
    // SAFETY: valid fd, sa lives across the call.
    let r = unsafe { libc::connect(fd.as_raw_fd(), ptr, len) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
        return false;
    }
    if r != 0 && !poll_one(fd.as_raw_fd(), libc::POLLOUT, timeout) {
        return false;
    }
    let mut err: libc::c_int = 0;
    let mut elen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, err/elen are valid out-pointers of the right size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut elen,
        )
    };
    r == 0 && err == 0
}

pub fn tcp_connects(dst: impl Into<IpAddr>, port: u16, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&SocketAddr::new(dst.into(), port), timeout).is_ok()
}

static NONCE: AtomicUsize = AtomicUsize::new(0);

/// A datagram whose echo comes back within the tries.
pub fn udp_echoes(dst: impl Into<IpAddr>, port: u16, tries: u32, wait: Duration) -> bool {
    let dst = dst.into();
    let any: IpAddr = match dst {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let Ok(s) = UdpSocket::bind((any, 0)) else {
        return false;
    };
    if s.connect((dst, port)).is_err() || s.set_read_timeout(Some(wait)).is_err() {
        return false;
    }
    let msg = format!(
        "palisade-probe {} {}",
        std::process::id(),
        NONCE.fetch_add(1, Ordering::Relaxed)
    );
    let mut buf = [0u8; 256];
    for _ in 0..tries {
        if s.send(msg.as_bytes()).is_err() {
            return false;
        }
        let deadline = Instant::now() + wait;
        loop {
            match s.recv(&mut buf) {
                Ok(n) if &buf[..n] == msg.as_bytes() => return true,
                // A late echo of nothing we sent: keep waiting.
                Ok(_) => {}
                // ICMP port unreachable: nobody serves the port.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return false,
                Err(_) => break,
            }
            if Instant::now() >= deadline {
                break;
            }
        }
    }
    false
}

/// A name probe's first half: the DNS query made from the source pod.
#[derive(Clone, Debug)]
pub struct Resolve {
    /// The name as the matrix writes it.
    pub name: String,
    /// The cluster DNS: the DNS pod's address, or the kube-dns ClusterIP.
    pub server: IpAddr,
    /// `dns::TYPE_A` or `dns::TYPE_AAAA`.
    pub qtype: u16,
}

/// DNS: how long to wait for an answer, and how many queries in all (the
/// datapath may hold an answer briefly while the agent learns addresses).
pub const DNS_WAIT: Duration = Duration::from_millis(1000);
pub const DNS_TRIES: u32 = 2;

/// One connection attempt, made from inside `src_netns`.
#[derive(Clone, Debug)]
pub struct Job {
    pub src_netns: PathBuf,
    /// IPv4 or IPv6: the probe's socket is of the destination's family.
    /// Unused (unspecified) when `resolve` gives the destination.
    pub dst: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// A name column (FORMAT v2): resolve first, then probe the address
    /// got; a failed resolution is a failed probe.
    pub resolve: Option<Resolve>,
}

impl Job {
    /// Runs in the caller's (already entered) namespace.
    pub fn attempt(&self) -> bool {
        self.attempt_to().0
    }

    /// As [`Job::attempt`], with the address probed, or why a name did
    /// not resolve.
    pub fn attempt_to(&self) -> (bool, Result<IpAddr, String>) {
        let dst = match &self.resolve {
            None => self.dst,
            Some(r) => match super::dns::resolve(r.server, &r.name, r.qtype, DNS_WAIT, DNS_TRIES) {
                Ok(a) => a,
                Err(e) => {
                    return (
                        false,
                        Err(format!("{} did not resolve via {}: {e}", r.name, r.server)),
                    )
                }
            },
        };
        let ok = match self.protocol {
            Protocol::Tcp => tcp_connects(dst, self.port, CONNECT_TIMEOUT),
            Protocol::Udp => udp_echoes(dst, self.port, UDP_TRIES, UDP_WAIT),
            Protocol::Sctp => sctp_connects(dst, self.port, CONNECT_TIMEOUT),
        };
        (ok, Ok(dst))
    }
}

/// What one job saw: connected or not, and the address probed (or why a
/// name did not resolve).
pub type Outcome = (bool, Result<IpAddr, String>);

/// A job's result: not run yet, what it saw, or why it could not run.
type Slot = Option<Result<Outcome, String>>;

/// Runs every job at once (at most `parallel` threads): true where the
/// connection succeeded. Each worker enters the namespace of the job's
/// source pod before the attempt.
pub fn run_all(jobs: &[Job], parallel: usize) -> Result<Vec<bool>> {
    Ok(run_all_detailed(jobs, parallel)?
        .into_iter()
        .map(|(ok, _)| ok)
        .collect())
}

/// As [`run_all`], with each job's [`Outcome`].
pub fn run_all_detailed(jobs: &[Job], parallel: usize) -> Result<Vec<Outcome>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let jobs: Arc<Vec<Job>> = Arc::new(jobs.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Slot>>> = Arc::new(Mutex::new(vec![None; jobs.len()]));
    let workers = parallel.clamp(1, jobs.len());
    let mut handles = Vec::with_capacity(workers);
    for w in 0..workers {
        let (jobs, next, results) = (jobs.clone(), next.clone(), results.clone());
        let h = std::thread::Builder::new()
            .name(format!("probe-{w}"))
            .spawn(move || {
                let mut entered: Option<PathBuf> = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let r = if entered.as_ref() != Some(&job.src_netns) {
                        enter_thread(&job.src_netns).map_err(|e| format!("{e:#}"))
                    } else {
                        Ok(())
                    };
                    let r = r.map(|()| {
                        entered = Some(job.src_netns.clone());
                        job.attempt_to()
                    });
                    results.lock().expect("results lock")[i] = Some(r);
                }
            })
            .context("spawning a probe thread")?;
        handles.push(h);
    }
    for h in handles {
        h.join().map_err(|_| anyhow!("a probe thread panicked"))?;
    }
    let results = std::mem::take(&mut *results.lock().expect("results lock"));
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| match r {
            Some(Ok(b)) => Ok(b),
            Some(Err(e)) => bail!("probe {i}: {e}"),
            None => bail!("probe {i} did not run"),
        })
        .collect()
}

enum Sock {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Sctp(OwnedFd),
}

impl Sock {
    fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(l) => l.as_raw_fd(),
            Sock::Udp(s) => s.as_raw_fd(),
            Sock::Sctp(fd) => fd.as_raw_fd(),
        }
    }

    /// Handle what is ready without blocking. With a zone (the cluster
    /// DNS pod) UDP queries are answered from it and TCP connections to
    /// port 53 are served as DNS over TCP, each on a thread of its own.
    fn serve(&self, zone: Option<&Arc<Zone>>) {
        match self {
            Sock::Tcp(l) => {
                let dns_port = zone.is_some() && l.local_addr().is_ok_and(|a| a.port() == 53);
                while let Ok((c, _)) = l.accept() {
                    if let (true, Some(z)) = (dns_port, zone) {
                        let z = z.clone();
                        std::thread::Builder::new()
                            .name("dns-tcp".into())
                            .spawn(move || super::dns::serve_tcp(&z, c, DNS_TCP_IDLE))
                            .ok();
                    }
                }
            }
            Sock::Udp(s) => {
                let mut buf = [0u8; 2048];
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    // A DNS query, when this pod is the cluster DNS or the
                    // demo serves names (`dns`); else the echo the probes
                    // wait for.
                    let a = match zone {
                        Some(z) => super::dns::respond_merged(z, &buf[..n], super::dns::UDP_MAX),
                        None => super::dns::answer(&buf[..n]),
                    };
                    match a {
                        Some(a) => s.send_to(&a, from),
                        None => s.send_to(&buf[..n], from),
                    }
                    .ok();
                }
            }
            Sock::Sctp(fd) => loop {
                // SAFETY: valid listening fd; no address is asked for.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c < 0 {
                    break;
                }
                // SAFETY: c was just returned by accept4 and is owned here.
                drop(unsafe { OwnedFd::from_raw_fd(c) });
            },
        }
    }
}

fn bind(port: u16, protocol: Protocol) -> Result<Sock> {
    let any = (Ipv4Addr::UNSPECIFIED, port);
    Ok(match protocol {
        Protocol::Tcp => {
            let l = TcpListener::bind(any)?;
            l.set_nonblocking(true)?;
            Sock::Tcp(l)
        }
        Protocol::Udp => {
            let s = UdpSocket::bind(any)?;
            s.set_nonblocking(true)?;
            Sock::Udp(s)
        }
        Protocol::Sctp => Sock::Sctp(sctp_listen(port)?),
    })
}

/// The same port on `[::]`, IPv6 only (beside [`bind`]'s IPv4 socket).
fn bind6(port: u16, protocol: Protocol) -> Result<Sock> {
    let any = Ipv6Addr::UNSPECIFIED.into();
    Ok(match protocol {
        Protocol::Tcp => Sock::Tcp(TcpListener::from(listen_on(
            any,
            port,
            libc::SOCK_STREAM,
            0,
        )?)),
        Protocol::Udp => Sock::Udp(UdpSocket::from(listen_on(any, port, libc::SOCK_DGRAM, 0)?)),
        Protocol::Sctp => Sock::Sctp(listen_on(any, port, libc::SOCK_STREAM, libc::IPPROTO_SCTP)?),
    })
}

/// How long a DNS-over-TCP connection may stay quiet.
const DNS_TCP_IDLE: Duration = Duration::from_secs(3);

/// The same port on one address (a host outside the cluster serves only
/// its own address); an IPv6 address's socket is IPv6 only.
fn bind_at(ip: IpAddr, port: u16, protocol: Protocol) -> Result<Sock> {
    Ok(match protocol {
        Protocol::Tcp => Sock::Tcp(TcpListener::from(listen_on(
            ip,
            port,
            libc::SOCK_STREAM,
            0,
        )?)),
        Protocol::Udp => Sock::Udp(UdpSocket::from(listen_on(ip, port, libc::SOCK_DGRAM, 0)?)),
        Protocol::Sctp => Sock::Sctp(listen_on(ip, port, libc::SOCK_STREAM, libc::IPPROTO_SCTP)?),
    })
}

/// The server threads of a cluster; stopped and joined on drop.
#[derive(Default)]
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Serves `ports` inside `netns` until stopped; returns once every port
    /// is bound (or with the error of the first that is not).
    pub fn serve(&mut self, netns: PathBuf, ports: Vec<(u16, Protocol)>) -> Result<()> {
        self.serve_on(netns, ports, false)
    }

    /// As [`Servers::serve`], and on IPv6 too when `ipv6`.
    pub fn serve_on(
        &mut self,
        netns: PathBuf,
        ports: Vec<(u16, Protocol)>,
        ipv6: bool,
    ) -> Result<()> {
        self.serve_dns(netns, ports, ipv6, None)
    }

    /// As [`Servers::serve_on`]; with a zone, the pod is a DNS server too
    /// (answers on its UDP sockets, DNS over TCP on its TCP port 53).
    pub fn serve_dns(
        &mut self,
        netns: PathBuf,
        ports: Vec<(u16, Protocol)>,
        ipv6: bool,
        zone: Option<Arc<Zone>>,
    ) -> Result<()> {
        if ports.is_empty() {
            return Ok(());
        }
        self.spawn(
            netns,
            move || {
                let mut socks = Vec::new();
                for (port, proto) in &ports {
                    socks.push(
                        bind(*port, *proto).with_context(|| format!("binding {proto}/{port}"))?,
                    );
                    if ipv6 {
                        socks.push(
                            bind6(*port, *proto)
                                .with_context(|| format!("binding {proto}/{port} on IPv6"))?,
                        );
                    }
                }
                Ok(socks)
            },
            zone,
        )
    }

    /// Serves each (address, port, protocol) inside `netns` (the hosts
    /// outside the cluster: each serves its own ports on its own address).
    pub fn serve_at(&mut self, netns: PathBuf, at: Vec<(IpAddr, u16, Protocol)>) -> Result<()> {
        if at.is_empty() {
            return Ok(());
        }
        self.spawn(
            netns,
            move || {
                at.iter()
                    .map(|(ip, port, proto)| {
                        bind_at(*ip, *port, *proto)
                            .with_context(|| format!("binding {proto}/{port} on {ip}"))
                    })
                    .collect()
            },
            None,
        )
    }

    /// A server thread in `netns` polling the sockets `bind` makes there.
    fn spawn(
        &mut self,
        netns: PathBuf,
        bind: impl FnOnce() -> Result<Vec<Sock>> + Send + 'static,
        zone: Option<Arc<Zone>>,
    ) -> Result<()> {
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let stop = self.stop.clone();
        let name = netns.display().to_string();
        let h = std::thread::Builder::new()
            .name("pod-server".into())
            .spawn(move || {
                let socks = enter_thread(&netns).and_then(|()| bind());
                let socks = match socks {
                    Ok(s) => {
                        let _ = tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                let mut fds: Vec<libc::pollfd> = socks
                    .iter()
                    .map(|s| libc::pollfd {
                        fd: s.fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: fds is a valid array of pollfd for its length.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
                    if n <= 0 {
                        continue;
                    }
                    for (p, s) in fds.iter_mut().zip(&socks) {
                        if p.revents != 0 {
                            s.serve(zone.as_ref());
                            p.revents = 0;
                        }
                    }
                }
            })
            .context("spawning a server thread")?;
        self.threads.push(h);
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("serving in {name}: {e}"),
            Err(_) => bail!("the server thread for {name} died"),
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Loopback in the test's own namespace: no packets leave this host.
    #[test]
    fn probes_see_served_and_unserved_ports() {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let tport = tcp.local_addr().unwrap().port();
        assert!(tcp_connects(Ipv4Addr::LOCALHOST, tport, CONNECT_TIMEOUT));
        drop(tcp);
        assert!(!tcp_connects(Ipv4Addr::LOCALHOST, tport, CONNECT_TIMEOUT));

        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let uport = udp.local_addr().unwrap().port();
        let echo = std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let (n, from) = udp.recv_from(&mut buf).unwrap();
            udp.send_to(&buf[..n], from).unwrap();
        });
        assert!(udp_echoes(Ipv4Addr::LOCALHOST, uport, UDP_TRIES, UDP_WAIT));
        echo.join().unwrap();
        let t = Instant::now();
        assert!(!udp_echoes(Ipv4Addr::LOCALHOST, uport, UDP_TRIES, UDP_WAIT));
        assert!(
            t.elapsed() < UDP_WAIT * UDP_TRIES,
            "a refused port fails fast"
        );
    }

    // IPv6 loopback of the test's own namespace, IPv6-only sockets beside
    // IPv4 ones on the same port (as pods serve under --ip-family dual).
    #[test]
    fn ipv6_probes_and_servers() {
        let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = v4.local_addr().unwrap().port();
        let lo6: IpAddr = Ipv6Addr::LOCALHOST.into();
        assert!(
            !tcp_connects(lo6, port, CONNECT_TIMEOUT),
            "nothing on IPv6 yet"
        );
        let v6 = TcpListener::from(listen_on(lo6, port, libc::SOCK_STREAM, 0).unwrap());
        assert!(v6.local_addr().unwrap().is_ipv6());
        assert!(tcp_connects(lo6, port, CONNECT_TIMEOUT));
        assert!(tcp_connects(Ipv4Addr::LOCALHOST, port, CONNECT_TIMEOUT));
        drop(v4);
        assert!(
            !tcp_connects(Ipv4Addr::LOCALHOST, port, CONNECT_TIMEOUT),
            "IPv6 only"
        );
        assert!(tcp_connects(lo6, port, CONNECT_TIMEOUT));

        let udp = UdpSocket::from(listen_on(lo6, 0, libc::SOCK_DGRAM, 0).unwrap());
        udp.set_nonblocking(false).unwrap();
        let uport = udp.local_addr().unwrap().port();
        let echo = std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let (n, from) = udp.recv_from(&mut buf).unwrap();
            udp.send_to(&buf[..n], from).unwrap();
        });
        assert!(udp_echoes(lo6, uport, UDP_TRIES, UDP_WAIT));
        echo.join().unwrap();
        assert!(!udp_echoes(lo6, uport, UDP_TRIES, UDP_WAIT));
        assert!(!udp_echoes(Ipv4Addr::LOCALHOST, uport, UDP_TRIES, UDP_WAIT));
    }
}
