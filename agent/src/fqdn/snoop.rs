//! The DNS task: takes the answers the datapath holds (`DNS_HELD`), learns
//! the addresses they give for names a rule of the pod names, has the
//! owner program them, then sends the answer on to the pod. Its own thread:
//! a held answer waits for nothing but its own learning.
//!
//! TCP answers come as segments: each stream (pod, server, ports) keeps the
//! bytes since its last whole message, so an answer split over several
//! segments, or several answers in one, are all read; the segment that
//! completes a message waits for its learning, the others go on at once.
//! A segment out of order (a gap: one went unheld) resets its stream.
use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use palisade_dataplane::dns::{Held, HeldReader};
use tracing::{debug, warn};

use super::{
    cache::{Cache, Learned, Limits},
    rules::Rules,
    wire::{answer, fix_checksum, segment, Segment},
};
use crate::{metrics::Metrics, owner::Handle};

pub type SharedRules = Arc<RwLock<Rules>>;
pub type SharedCache = Arc<Mutex<Cache>>;

/// What the task needs besides the ring.
pub struct Config {
    pub limits: Limits,
    /// Longest an answer waits for its addresses to be programmed.
    pub hold_timeout: Duration,
    /// The learned addresses survive a restart here.
    pub state_file: PathBuf,
    /// Kept this much longer (then asked again) while a connection uses an
    /// expired address.
    pub in_use_grace: Duration,
}

/// Tells whether tracked connections use each address (conntrack).
pub type InUse = Box<dyn FnMut() -> std::collections::HashSet<IpAddr> + Send>;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sends frames out of a host veth towards its pod, past tc (so a frame
/// sent on is not held again).
pub struct Injector(OwnedFd);

impl Injector {
    pub fn open() -> std::io::Result<Self> {
        // SAFETY: plain socket(2); protocol 0: this socket receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with an int option.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    pub fn send(&self, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
        if frame.len() < 14 {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and address are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StreamKey {
    ifindex: u32,
    server: (IpAddr, u16),
    client: (IpAddr, u16),
}

/// A TCP stream's bytes since its last whole message.
struct Stream {
    next_seq: u32,
    buf: Vec<u8>,
    seen: Instant,
}

/// Longest a stream may buffer (a DNS message is at most 64 KiB + 2).
const STREAM_MAX: usize = 65_537;
const STREAM_IDLE: Duration = Duration::from_secs(30);

/// The messages a held segment completes (for UDP: its payload).
fn messages(
    streams: &mut HashMap<StreamKey, Stream>,
    ifindex: u32,
    s: &Segment,
    payload: &[u8],
) -> Vec<Vec<u8>> {
    if s.protocol != 6 {
        return vec![payload.to_vec()];
    }
    let key = StreamKey {
        ifindex,
        server: (s.src, s.sport),
        client: (s.dst, s.dport),
    };
    let st = streams.entry(key.clone()).or_insert_with(|| Stream {
        next_seq: s.seq,
        buf: Vec::new(),
        seen: Instant::now(),
    });
    st.seen = Instant::now();
    if s.seq != st.next_seq {
        // A retransmission of what was read, or a gap: start over at the
        // next segment (a gap's message cannot be read anyway).
        if s.seq.wrapping_sub(st.next_seq) < 1 << 31 {
            streams.remove(&key);
        }
        return Vec::new();
    }
    st.next_seq = s.seq.wrapping_add(payload.len() as u32);
    st.buf.extend_from_slice(payload);
    let mut out = Vec::new();
    loop {
        if st.buf.len() < 2 {
            break;
        }
        let len = u16::from_be_bytes([st.buf[0], st.buf[1]]) as usize;
        if st.buf.len() < 2 + len {
            break;
        }
        out.push(st.buf[2..2 + len].to_vec());
        st.buf.drain(..2 + len);
    }
    if st.buf.len() > STREAM_MAX {
        streams.remove(&key);
    }
    out
}

pub struct Snooper {
    pub reader: HeldReader,
    pub injector: Injector,
    pub rules: SharedRules,
    pub cache: SharedCache,
    pub cfg: Config,
    pub owner: Handle,
    pub rt: tokio::runtime::Handle,
    pub metrics: Arc<Metrics>,
    pub in_use: InUse,
    streams: HashMap<StreamKey, Stream>,
}

impl Snooper {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reader: HeldReader,
        injector: Injector,
        rules: SharedRules,
        cache: SharedCache,
        cfg: Config,
        owner: Handle,
        rt: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
        in_use: InUse,
    ) -> Self {
        Self {
            reader,
            injector,
            rules,
            cache,
            cfg,
            owner,
            rt,
            metrics,
            in_use,
            streams: HashMap::new(),
        }
    }

    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("dns-hold".into())
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let mut last_expiry = Instant::now();
        loop {
            self.reader.wait(Duration::from_millis(500));
            for h in self.reader.drain() {
                self.on_held(h);
            }
            if last_expiry.elapsed() >= Duration::from_secs(1) {
                last_expiry = Instant::now();
                self.expire();
                self.streams.retain(|_, s| s.seen.elapsed() < STREAM_IDLE);
            }
        }
    }

    /// One held frame: learn, program, send on. Whatever happens, the frame
    /// goes on (an answer whose addresses are not learned fails closed).
    fn on_held(&mut self, h: Held) {
        let t = Instant::now();
        self.metrics.dns.answers_held.inc();
        let mut frame = h.frame;
        let Some(seg) = segment(&frame) else {
            self.metrics.dns.unreadable.inc();
            self.send_on(h.ifindex, &frame);
            return;
        };
        let patterns = self
            .rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&h.ifindex)
            .cloned()
            .unwrap_or_default();
        let msgs = messages(
            &mut self.streams,
            h.ifindex,
            &seg,
            &frame[seg.payload.clone()],
        );
        let mut new = false;
        let now = now_ms();
        for m in &msgs {
            let Some(a) = answer(m) else {
                self.metrics.dns.unreadable.inc();
                continue;
            };
            let names: Vec<&String> = a
                .names
                .iter()
                .filter(|n| patterns.iter().any(|p| p.matches(n)))
                .collect();
            if names.is_empty() {
                continue;
            }
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for n in names {
                for (addr, ttl) in &a.addresses {
                    match cache.learn(n, *addr, *ttl, now, &self.cfg.limits) {
                        Learned::New => {
                            new = true;
                            self.metrics.dns.addresses_learned.inc();
                        }
                        Learned::Evicted => {
                            new = true;
                            self.metrics.dns.addresses_learned.inc();
                            self.metrics.dns.name_cap_evictions.inc();
                        }
                        Learned::NodeFull => self.metrics.dns.node_cap_refusals.inc(),
                        Learned::Refreshed => {}
                    }
                }
            }
            debug!("dns: learned {:?} for {:?}", a.addresses, a.names);
        }
        if new {
            self.program();
        }
        fix_checksum(&mut frame, &seg);
        self.send_on(h.ifindex, &frame);
        self.metrics
            .dns
            .hold_seconds
            .observe(t.elapsed().as_secs_f64());
        if new {
            self.save();
        }
    }

    /// Hands the learned addresses to the owner and waits (bounded) until
    /// they are in the kernel.
    fn program(&mut self) {
        let learned = {
            let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            self.metrics.dns.learned_addresses.set(c.len() as u64);
            c.addresses()
        };
        let owner = self.owner.clone();
        let wait = self.cfg.hold_timeout;
        let r = self.rt.block_on(async move {
            tokio::time::timeout(wait, owner.with(move |a| a.set_learned(learned))).await
        });
        match r {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => warn!("dns: programming learned addresses: {e:#}"),
            Ok(Err(e)) => warn!("dns: the agent did not take learned addresses: {e:#}"),
            Err(_) => {
                self.metrics.dns.hold_timeouts.inc();
                warn!("dns: an answer was sent on before its addresses were programmed (hold timeout {wait:?})");
            }
        }
    }

    fn send_on(&self, ifindex: u32, frame: &[u8]) {
        if let Err(e) = self.injector.send(ifindex, frame) {
            // The pod is gone, typically: its resolver retries otherwise.
            debug!("dns: sending a held answer on to ifindex {ifindex}: {e}");
        }
    }

    fn save(&self) {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = c.save(&self.cfg.state_file) {
            warn!(
                "dns: saving learned addresses to {}: {e}",
                self.cfg.state_file.display()
            );
        }
    }

    /// Forgets expired addresses (not those open connections still use)
    /// and names no rule matches any more.
    fn expire(&mut self) {
        let now = now_ms();
        let due = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .due(now);
        let all: Vec<super::DomainPattern> = self
            .rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flatten()
            .cloned()
            .collect();
        let in_use = if due {
            (self.in_use)()
        } else {
            Default::default()
        };
        let changed = {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let before = c.len();
            let mut changed = c.expire(now, self.cfg.in_use_grace.as_millis() as u64, &|a| {
                in_use.contains(&a)
            });
            self.metrics
                .dns
                .expired
                .add(before.saturating_sub(c.len()) as u64);
            changed |= c.retain_names(|n| all.iter().any(|p| p.matches(n)));
            changed
        };
        if changed {
            self.program();
            self.save();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, len: usize) -> Segment {
        Segment {
            src: "10.0.0.10".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            sport: 53,
            dport: 40000,
            protocol: 6,
            seq,
            l4: 0,
            payload: 0..len,
        }
    }

    #[test]
    fn tcp_messages_are_read_across_segments_and_several_per_segment() {
        let mut st = HashMap::new();
        let m1 = b"\x00\x05hello";
        let m2 = b"\x00\x03abc\x00\x02xy";
        // m1 split over two segments.
        assert!(messages(&mut st, 1, &seg(100, 3), &m1[..3]).is_empty());
        assert_eq!(
            messages(&mut st, 1, &seg(103, 4), &m1[3..]),
            [b"hello".to_vec()]
        );
        // Two messages in one segment.
        assert_eq!(
            messages(&mut st, 1, &seg(107, m2.len()), m2),
            [b"abc".to_vec(), b"xy".to_vec()]
        );
        // A retransmission reads nothing and keeps the stream.
        assert!(messages(&mut st, 1, &seg(103, 4), &m1[3..]).is_empty());
        assert_eq!(
            messages(&mut st, 1, &seg(107 + m2.len() as u32, 3), b"\x00\x01z"),
            [b"z".to_vec()]
        );
        // A gap resets it: the next segment starts a new stream.
        assert!(messages(&mut st, 1, &seg(5000, 3), b"\x00\x01q").is_empty());
        assert_eq!(
            messages(&mut st, 1, &seg(6000, 3), b"\x00\x01q"),
            [b"q".to_vec()]
        );
    }
}
