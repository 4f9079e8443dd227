//! Servers and probes on real sockets inside pod namespaces.
//!
//! Each pod gets one server thread that enters the pod's namespace, binds
//! every port the pod serves (TCP: accept and close; UDP: echo; SCTP:
//! accept and close) and polls them until stopped. A probe is a real
//! connection attempt made by a thread that entered the source pod's
//! namespace; a step's probes all run at once on a pool of such threads.
use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
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

use super::case::Protocol;
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

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = port.to_be();
    sa.sin_addr = libc::in_addr {
        s_addr: u32::from(ip).to_be(),
    };
    sa
}

fn sctp_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sctp_listen(port: u16) -> std::io::Result<OwnedFd> {
    let fd = sctp_socket()?;
    let sa = sockaddr(Ipv4Addr::UNSPECIFIED, port);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid fd, sa lives across the call, len is its size.
    if unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_in).cast(), len) } != 0
        // SAFETY: valid fd.
        || unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
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
pub fn sctp_connects(dst: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    let Ok(fd) = sctp_socket() else { return false };
    let sa = sockaddr(dst, port);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid fd, sa lives across the call.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            len,
        )
    };
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

pub fn tcp_connects(dst: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&SocketAddrV4::new(dst, port).into(), timeout).is_ok()
}

static NONCE: AtomicUsize = AtomicUsize::new(0);

/// A datagram whose echo comes back within the tries.
pub fn udp_echoes(dst: Ipv4Addr, port: u16, tries: u32, wait: Duration) -> bool {
    let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
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

/// One connection attempt, made from inside `src_netns`.
#[derive(Clone, Debug)]
pub struct Job {
    pub src_netns: PathBuf,
    pub dst: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Job {
    /// Runs in the caller's (already entered) namespace.
    pub fn attempt(&self) -> bool {
        match self.protocol {
            Protocol::Tcp => tcp_connects(self.dst, self.port, CONNECT_TIMEOUT),
            Protocol::Udp => udp_echoes(self.dst, self.port, UDP_TRIES, UDP_WAIT),
            Protocol::Sctp => sctp_connects(self.dst, self.port, CONNECT_TIMEOUT),
        }
    }
}

/// A job's result: not run yet, connected or not, or why it could not run.
type Slot = Option<Result<bool, String>>;

/// Runs every job at once (at most `parallel` threads): true where the
/// connection succeeded. Each worker enters the namespace of the job's
/// source pod before the attempt.
pub fn run_all(jobs: &[Job], parallel: usize) -> Result<Vec<bool>> {
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
                        job.attempt()
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

    /// Handle what is ready without blocking.
    fn serve(&self) {
        match self {
            Sock::Tcp(l) => while l.accept().is_ok() {},
            Sock::Udp(s) => {
                let mut buf = [0u8; 2048];
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    // A DNS query, when the demo serves names (`dns`);
                    // else the echo the probes wait for.
                    match super::dns::answer(&buf[..n]) {
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
        if ports.is_empty() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let stop = self.stop.clone();
        let name = netns.display().to_string();
        let h = std::thread::Builder::new()
            .name("pod-server".into())
            .spawn(move || {
                let socks = enter_thread(&netns).and_then(|()| {
                    ports
                        .iter()
                        .map(|(port, proto)| {
                            bind(*port, *proto).with_context(|| format!("binding {proto}/{port}"))
                        })
                        .collect::<Result<Vec<Sock>>>()
                });
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
                            s.serve();
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
}
