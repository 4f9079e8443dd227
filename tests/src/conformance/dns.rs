//! A minimal DNS (RFC 1035): the responder of the conformance runner's
//! cluster DNS pod (FORMAT v2 `cluster.dns` / `cluster.external`) and of the
//! demo's kube-dns pod, and the stub resolver the conformance probes use to
//! resolve a name column from inside the source pod.
//!
//! Responder ([`Zone`]): A records and CNAMEs, each with its TTL. A query
//! for a known name is answered with the whole chain (the CNAME records,
//! then the target's A, or AAAA when the zone serves IPv6: the mirror of
//! the A address, see [`super::family::mirror`]); NXDOMAIN for an unknown
//! name; an empty NOERROR answer for a known name without a record of the
//! asked type. Names compare case-insensitively, a trailing dot ignored;
//! the question is echoed as asked. Over UDP an answer longer than 512
//! bytes is replaced by the question with TC set (the client retries over
//! TCP); over TCP every message has the 2-byte length prefix of RFC 1035
//! §4.2.2, and a connection carries any number of queries.
//!
//! Anything that is not a standard query (the conformance probes'
//! datagrams) gets no answer here: the caller echoes it like every probe
//! server does.
//!
//! Hand-written rather than a DNS crate: it is the only DNS the project
//! serves or asks, in a test binary.
use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicU16, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use super::family::mirror;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
const TTL_S: u32 = 30;
pub const RCODE_NXDOMAIN: u8 = 3;
/// The largest UDP answer without EDNS (RFC 1035 §4.2.1).
pub const UDP_MAX: usize = 512;
/// How many CNAMEs a chain may have before the responder or the resolver
/// gives up (a loop the case validation would have refused anyway).
const MAX_CHAIN: usize = 16;

/// A name as compared: lower case, without the trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Data {
    A(Ipv4Addr),
    Cname(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    data: Data,
    ttl: u32,
}

/// The names a responder answers.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    records: BTreeMap<String, Record>,
    /// AAAA queries are answered with the mirror of the A address.
    pub ipv6: bool,
}

impl Zone {
    pub fn new(ipv6: bool) -> Self {
        Self {
            records: BTreeMap::new(),
            ipv6,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn add_a(&mut self, name: &str, addr: Ipv4Addr, ttl: u32) {
        self.records.insert(
            normalize(name),
            Record {
                data: Data::A(addr),
                ttl,
            },
        );
    }

    pub fn add_cname(&mut self, name: &str, target: &str, ttl: u32) {
        self.records.insert(
            normalize(name),
            Record {
                data: Data::Cname(normalize(target)),
                ttl,
            },
        );
    }

    /// The UDP answer to `query` (see the module documentation); None when
    /// it is not a standard query.
    pub fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.respond(query, UDP_MAX)
    }

    /// The answer to `query`, at most `max` bytes long (else the question
    /// with TC set).
    pub fn respond(&self, query: &[u8], max: usize) -> Option<Vec<u8>> {
        let q = parse_query(query)?;
        let mut answers: Vec<Vec<u8>> = Vec::new();
        let asked = normalize(&q.name);
        let mut rcode = 0;
        if q.qclass != CLASS_IN && q.qclass != TYPE_ANY {
            // Another class: nothing here, but the name is not ours to deny.
        } else if !self.records.contains_key(&asked) {
            rcode = RCODE_NXDOMAIN;
        } else {
            let mut cur = asked.clone();
            for hop in 0..MAX_CHAIN {
                // The first owner is the question's name: a pointer to it.
                let owner = if hop == 0 {
                    vec![0xc0, 12]
                } else {
                    encode_name(&cur)
                };
                let Some(r) = self.records.get(&cur) else {
                    // A dangling CNAME: the chain so far, and NXDOMAIN.
                    rcode = RCODE_NXDOMAIN;
                    break;
                };
                match &r.data {
                    Data::Cname(target) => {
                        answers.push(rr(&owner, TYPE_CNAME, r.ttl, &encode_name(target)));
                        if q.qtype == TYPE_CNAME {
                            break;
                        }
                        cur = target.clone();
                    }
                    Data::A(a) => {
                        if matches!(q.qtype, TYPE_A | TYPE_ANY) {
                            answers.push(rr(&owner, TYPE_A, r.ttl, &a.octets()));
                        }
                        if self.ipv6 && matches!(q.qtype, TYPE_AAAA | TYPE_ANY) {
                            answers.push(rr(&owner, TYPE_AAAA, r.ttl, &mirror(*a).octets()));
                        }
                        break;
                    }
                }
            }
        }
        let mut out = header(query, rcode, false, answers.len());
        out.extend_from_slice(&q.question);
        for a in &answers {
            out.extend_from_slice(a);
        }
        if out.len() > max {
            let mut t = header(query, rcode, true, 0);
            t.extend_from_slice(&q.question);
            return Some(t);
        }
        Some(out)
    }
}

/// A response header for `query`: its ID, QR, AA, RD as asked, RA; one
/// question, `an` answers.
fn header(query: &[u8], rcode: u8, tc: bool, an: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(512);
    h.extend_from_slice(&query[..2]);
    let rd = query[2] & 0x01;
    h.push(0x84 | rd | if tc { 0x02 } else { 0 });
    h.push(0x80 | rcode);
    for n in [1u16, an as u16, 0, 0] {
        h.extend_from_slice(&n.to_be_bytes());
    }
    h
}

/// One resource record, class IN.
fn rr(owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut r = owner.to_vec();
    r.extend_from_slice(&rtype.to_be_bytes());
    r.extend_from_slice(&CLASS_IN.to_be_bytes());
    r.extend_from_slice(&ttl.to_be_bytes());
    r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    r.extend_from_slice(rdata);
    r
}

/// A name in wire form, uncompressed (labels as given, case kept).
pub fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for l in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        let l = &l.as_bytes()[..l.len().min(63)];
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
    out
}

/// The dotted name at `off` (compression pointers followed, case kept) and
/// the offset just after it where it starts.
pub fn read_name(m: &[u8], mut off: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *m.get(off)? as usize;
        match len & 0xc0 {
            0xc0 => {
                let ptr = ((len & 0x3f) << 8) | *m.get(off + 1)? as usize;
                end.get_or_insert(off + 2);
                jumps += 1;
                // Pointers must go backwards; a loop is refused.
                if jumps > 32 || ptr >= off {
                    return None;
                }
                off = ptr;
            }
            0x00 => {
                off += 1;
                if len == 0 {
                    break;
                }
                let l = m.get(off..off + len)?;
                labels.push(String::from_utf8_lossy(l).into_owned());
                off += len;
                if labels.len() > 127 {
                    return None;
                }
            }
            _ => return None,
        }
    }
    Some((labels.join("."), end.unwrap_or(off)))
}

struct Query {
    name: String,
    qtype: u16,
    qclass: u16,
    /// The question as it goes back: the name re-encoded (case kept), type, class.
    question: Vec<u8>,
}

/// A standard query with one question; None for anything else.
fn parse_query(m: &[u8]) -> Option<Query> {
    if m.len() < 12 {
        return None;
    }
    let flags = u16::from_be_bytes([m[2], m[3]]);
    let qdcount = u16::from_be_bytes([m[4], m[5]]);
    let ancount = u16::from_be_bytes([m[6], m[7]]);
    // QR = 0 (a query), opcode 0 (standard), one question, no answers.
    if flags & 0xf800 != 0 || qdcount != 1 || ancount != 0 {
        return None;
    }
    let (name, end) = read_name(m, 12)?;
    let t = m.get(end..end + 4)?;
    let (qtype, qclass) = (
        u16::from_be_bytes([t[0], t[1]]),
        u16::from_be_bytes([t[2], t[3]]),
    );
    let mut question = encode_name(&name);
    question.extend_from_slice(t);
    Some(Query {
        name,
        qtype,
        qclass,
        question,
    })
}

/// A standard query for `name` of `qtype`, recursion desired.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(&encode_name(name));
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// The data of an answer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// The target, normalized.
    Cname(String),
    Other(u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Normalized.
    pub name: String,
    pub ttl: u32,
    pub data: RData,
}

/// A response as the resolver reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub id: u16,
    pub rcode: u8,
    pub truncated: bool,
    pub answers: Vec<Answer>,
}

/// A response (QR set); None when `m` is not one.
pub fn parse_reply(m: &[u8]) -> Option<Reply> {
    if m.len() < 12 || m[2] & 0x80 == 0 {
        return None;
    }
    let id = u16::from_be_bytes([m[0], m[1]]);
    let count = |i: usize| u16::from_be_bytes([m[i], m[i + 1]]) as usize;
    let (qd, an) = (count(4), count(6));
    let mut off = 12;
    for _ in 0..qd {
        off = read_name(m, off)?.1 + 4;
    }
    let mut answers = Vec::with_capacity(an);
    for _ in 0..an {
        let (name, end) = read_name(m, off)?;
        let f = m.get(end..end + 10)?;
        let rtype = u16::from_be_bytes([f[0], f[1]]);
        let ttl = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
        let len = u16::from_be_bytes([f[8], f[9]]) as usize;
        let start = end + 10;
        let rdata = m.get(start..start + len)?;
        let data = match (rtype, len) {
            (TYPE_A, 4) => RData::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            (TYPE_AAAA, 16) => RData::Aaaa(Ipv6Addr::from(<[u8; 16]>::try_from(rdata).ok()?)),
            (TYPE_CNAME, _) => RData::Cname(normalize(&read_name(m, start)?.0)),
            (t, _) => RData::Other(t),
        };
        answers.push(Answer {
            name: normalize(&name),
            ttl,
            data,
        });
        off = start + len;
    }
    Some(Reply {
        id,
        rcode: m[3] & 0x0f,
        truncated: m[2] & 0x02 != 0,
        answers,
    })
}

impl Reply {
    /// The address of `qtype` for `name`, following the CNAME chain in
    /// the answer.
    pub fn address(&self, name: &str, qtype: u16) -> Option<IpAddr> {
        let mut cur = normalize(name);
        for _ in 0..MAX_CHAIN {
            let mine = self.answers.iter().filter(|a| a.name == cur);
            let mut next = None;
            for a in mine {
                match (&a.data, qtype) {
                    (RData::A(ip), TYPE_A) => return Some((*ip).into()),
                    (RData::Aaaa(ip), TYPE_AAAA) => return Some((*ip).into()),
                    (RData::Cname(t), _) => next = Some(t.clone()),
                    _ => {}
                }
            }
            cur = next?;
        }
        None
    }
}

/// `msg` with its 2-byte length prefix (DNS over TCP).
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    out
}

/// Reads one length-prefixed message; None at the end of the stream or on
/// an error (a timeout included).
pub fn read_framed(s: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).ok()?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut msg).ok()?;
    Some(msg)
}

/// Serves one TCP connection: length-prefixed queries answered in turn
/// until the client closes, goes quiet for `idle`, or sends something
/// that is not a query (then the connection is closed, as the other probe
/// servers close theirs).
pub fn serve_tcp(zone: &Zone, mut s: TcpStream, idle: Duration) {
    if s.set_nonblocking(false).is_err() || s.set_read_timeout(Some(idle)).is_err() {
        return;
    }
    while let Some(q) = read_framed(&mut s) {
        let Some(a) = respond_merged(zone, &q, usize::from(u16::MAX)) else {
            return;
        };
        if s.write_all(&frame(&a)).is_err() {
            return;
        }
    }
}

static NEXT_ID: AtomicU16 = AtomicU16::new(0x5eed);

/// Why a resolution failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveError {
    Timeout,
    Refused(String),
    NxDomain,
    Rcode(u8),
    NoAddress,
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => f.write_str("no answer"),
            Self::Refused(e) => write!(f, "{e}"),
            Self::NxDomain => f.write_str("NXDOMAIN"),
            Self::Rcode(r) => write!(f, "rcode {r}"),
            Self::NoAddress => f.write_str("no address in the answer"),
        }
    }
}

/// Resolves `name` (`qtype` A or AAAA) as a stub resolver does, from the
/// calling thread's namespace: a UDP query to `server`:53, `wait` for the
/// answer, `tries` queries in all; over TCP when the answer is truncated.
pub fn resolve(
    server: IpAddr,
    name: &str,
    qtype: u16,
    wait: Duration,
    tries: u32,
) -> Result<IpAddr, ResolveError> {
    let any: IpAddr = match server {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let refused = |e: std::io::Error| ResolveError::Refused(e.to_string());
    let s = UdpSocket::bind((any, 0)).map_err(refused)?;
    s.connect((server, 53)).map_err(refused)?;
    s.set_read_timeout(Some(wait)).map_err(refused)?;
    let mut buf = [0u8; 4096];
    for _ in 0..tries {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        s.send(&query(id, name, qtype)).map_err(refused)?;
        let deadline = Instant::now() + wait;
        loop {
            match s.recv(&mut buf) {
                Ok(n) => {
                    if let Some(r) = parse_reply(&buf[..n]).filter(|r| r.id == id) {
                        if r.truncated {
                            return resolve_tcp(server, name, qtype, wait);
                        }
                        return judge(&r, name, qtype);
                    }
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Err(refused(e)),
                Err(_) => break,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
                break;
            }
        }
        s.set_read_timeout(Some(wait)).map_err(refused)?;
    }
    Err(ResolveError::Timeout)
}

/// One query over TCP to `server`:53.
pub fn resolve_tcp(
    server: IpAddr,
    name: &str,
    qtype: u16,
    wait: Duration,
) -> Result<IpAddr, ResolveError> {
    let refused = |e: std::io::Error| ResolveError::Refused(e.to_string());
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(server, 53), wait).map_err(|e| {
        if e.kind() == ErrorKind::TimedOut {
            ResolveError::Timeout
        } else {
            refused(e)
        }
    })?;
    s.set_read_timeout(Some(wait)).map_err(refused)?;
    s.set_write_timeout(Some(wait)).map_err(refused)?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    s.write_all(&frame(&query(id, name, qtype)))
        .map_err(refused)?;
    let msg = read_framed(&mut s).ok_or(ResolveError::Timeout)?;
    let r = parse_reply(&msg)
        .filter(|r| r.id == id)
        .ok_or(ResolveError::Timeout)?;
    judge(&r, name, qtype)
}

fn judge(r: &Reply, name: &str, qtype: u16) -> Result<IpAddr, ResolveError> {
    match r.rcode {
        0 => r.address(name, qtype).ok_or(ResolveError::NoAddress),
        RCODE_NXDOMAIN => Err(ResolveError::NxDomain),
        c => Err(ResolveError::Rcode(c)),
    }
}

// The demo's kube-dns: one process-wide zone of A records, answered on
// every pod's UDP probe server (`probe::Servers`).

fn records() -> &'static Mutex<Zone> {
    static R: OnceLock<Mutex<Zone>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The names (without the trailing dot, any case) this process answers on
/// every pod's UDP server (the demo).
pub fn set_records(r: impl IntoIterator<Item = (String, Ipv4Addr)>) {
    let mut z = Zone::new(false);
    for (name, addr) in r {
        z.add_a(&name, addr, TTL_S);
    }
    *records().lock().expect("dns records") = z;
}

/// The answer of the process-wide zone ([`set_records`]) to `query`; None
/// when it has no records or `query` is not a standard query.
pub fn answer(query: &[u8]) -> Option<Vec<u8>> {
    let z = records().lock().ok()?;
    if z.is_empty() {
        return None;
    }
    z.answer(query)
}

/// The cluster DNS pod's answer to `query`, at most `max` bytes long: from
/// `zone` (the case's `cluster.external` names), except for a name that
/// only the process-wide zone ([`set_records`]) knows, which that zone
/// answers. The demo's kube-dns is the case's DNS pod and answers both its
/// cluster-local names and its external ones; a conformance run never sets
/// the process-wide zone, so its DNS pod answers from the case's alone.
pub fn respond_merged(zone: &Zone, query: &[u8], max: usize) -> Option<Vec<u8>> {
    if let Some(q) = parse_query(query) {
        let asked = normalize(&q.name);
        if !zone.records.contains_key(&asked) {
            if let Ok(z) = records().lock() {
                if z.records.contains_key(&asked) {
                    return z.respond(query, max);
                }
            }
        }
    }
    zone.respond(query, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_known_names_and_leaves_other_datagrams_alone() {
        set_records([(
            "Backend.app.svc.cluster.local".to_string(),
            Ipv4Addr::new(10, 1, 2, 3),
        )]);
        let q = query(0xbeef, "backend.APP.svc.cluster.local", TYPE_A);
        let a = answer(&q).expect("answered");
        assert_eq!(&a[..2], &[0xbe, 0xef]);
        assert_eq!(a[2] & 0x80, 0x80, "a response");
        assert_eq!(a[3] & 0x0f, 0, "NOERROR");
        assert_eq!(&a[4..12], &[0, 1, 0, 1, 0, 0, 0, 0]);
        assert_eq!(&a[12..q.len()], &q[12..], "the question");
        assert_eq!(&a[a.len() - 4..], &[10, 1, 2, 3]);

        let aaaa = answer(&query(1, "backend.app.svc.cluster.local", 28)).unwrap();
        assert_eq!((aaaa[3] & 0x0f, &aaaa[6..8]), (0, &[0u8, 0][..]), "no data");
        let nx = answer(&query(2, "nope.app.svc.cluster.local", TYPE_A)).unwrap();
        assert_eq!((nx[3] & 0x0f, &nx[6..8]), (3, &[0u8, 0][..]), "NXDOMAIN");

        assert_eq!(answer(b"palisade-probe 123 4"), None, "a probe: echoed");
        let mut reply = q.clone();
        reply[2] |= 0x80;
        assert_eq!(answer(&reply), None, "never answers a response");
        assert_eq!(answer(&q[..20]), None, "truncated");
        set_records([]);
        assert_eq!(answer(&q), None, "no records: plain echo");
        merged_answers_the_process_wide_names_next_to_the_zone();
    }

    /// Called by the test above: both change the process-wide zone, so
    /// they must not run at once.
    fn merged_answers_the_process_wide_names_next_to_the_zone() {
        let z = zone(false);
        let q = query(11, "backend.demo.svc.cluster.local", TYPE_A);
        let api = query(12, "api.example.com", TYPE_A);
        // Without process-wide names: the zone's answers alone.
        assert_eq!(respond_merged(&z, &api, UDP_MAX), z.answer(&api));
        assert_eq!(respond_merged(&z, &q, UDP_MAX), z.answer(&q));
        set_records([(
            "backend.demo.svc.cluster.local".to_string(),
            Ipv4Addr::new(10, 1, 2, 4),
        )]);
        let r = parse_reply(&respond_merged(&z, &q, UDP_MAX).unwrap()).unwrap();
        assert_eq!(
            r.address("backend.demo.svc.cluster.local", TYPE_A),
            Some(Ipv4Addr::new(10, 1, 2, 4).into())
        );
        assert_eq!(respond_merged(&z, &api, UDP_MAX), z.answer(&api));
        let nx = query(13, "nope.example.com", TYPE_A);
        assert_eq!(respond_merged(&z, &nx, UDP_MAX), z.answer(&nx));
        set_records([]);
    }

    fn zone(ipv6: bool) -> Zone {
        let mut z = Zone::new(ipv6);
        z.add_a("API.example.com.", Ipv4Addr::new(198, 51, 100, 10), 30);
        z.add_cname("www.example.org", "api.example.com", 60);
        z.add_cname("old.example.org", "www.example.org.", 5);
        z
    }

    #[test]
    fn a_and_aaaa_with_ttls_case_and_trailing_dot() {
        let z = zone(false);
        let r = parse_reply(&z.answer(&query(7, "Api.Example.COM.", TYPE_A)).unwrap()).unwrap();
        assert_eq!((r.id, r.rcode, r.truncated), (7, 0, false));
        assert_eq!(
            r.answers,
            [Answer {
                name: "api.example.com".into(),
                ttl: 30,
                data: RData::A(Ipv4Addr::new(198, 51, 100, 10))
            }]
        );
        assert_eq!(
            r.address("api.example.com", TYPE_A),
            Some(Ipv4Addr::new(198, 51, 100, 10).into())
        );
        // The question comes back as asked.
        let q = query(7, "Api.Example.COM", TYPE_A);
        let a = z.answer(&q).unwrap();
        assert_eq!(&a[12..q.len()], &q[12..]);
        // No IPv6: a known name, no data.
        let r = parse_reply(&z.answer(&query(8, "api.example.com", TYPE_AAAA)).unwrap()).unwrap();
        assert_eq!((r.rcode, r.answers.len()), (0, 0));
        assert_eq!(r.address("api.example.com", TYPE_AAAA), None);
        // IPv6: the mirror.
        let z6 = zone(true);
        let r = parse_reply(&z6.answer(&query(9, "api.example.com", TYPE_AAAA)).unwrap()).unwrap();
        let want = mirror(Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(r.answers[0].data, RData::Aaaa(want));
        assert_eq!(r.address("API.example.com.", TYPE_AAAA), Some(want.into()));
    }

    #[test]
    fn cname_chain_in_one_answer() {
        let z = zone(true);
        let r = parse_reply(&z.answer(&query(1, "old.example.org", TYPE_A)).unwrap()).unwrap();
        let got: Vec<(String, u32, RData)> = r
            .answers
            .iter()
            .map(|a| (a.name.clone(), a.ttl, a.data.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "old.example.org".into(),
                    5,
                    RData::Cname("www.example.org".into())
                ),
                (
                    "www.example.org".into(),
                    60,
                    RData::Cname("api.example.com".into())
                ),
                (
                    "api.example.com".into(),
                    30,
                    RData::A(Ipv4Addr::new(198, 51, 100, 10))
                ),
            ]
        );
        assert_eq!(
            r.address("OLD.example.org", TYPE_A),
            Some(Ipv4Addr::new(198, 51, 100, 10).into())
        );
        let r6 = parse_reply(&z.answer(&query(1, "www.example.org", TYPE_AAAA)).unwrap()).unwrap();
        assert_eq!(r6.answers.len(), 2);
        assert!(r6.address("www.example.org", TYPE_AAAA).is_some());
        // Asked for the CNAME itself: that record only.
        let rc = parse_reply(&z.answer(&query(1, "www.example.org", TYPE_CNAME)).unwrap()).unwrap();
        assert_eq!(rc.answers.len(), 1);
        // A chain the resolver cannot finish has no address.
        let mut broken = rc.clone();
        broken.answers.truncate(1);
        assert_eq!(broken.address("www.example.org", TYPE_A), None);
    }

    #[test]
    fn nxdomain_and_non_queries() {
        let z = zone(false);
        let r = parse_reply(&z.answer(&query(3, "example.com", TYPE_A)).unwrap()).unwrap();
        assert_eq!((r.rcode, r.answers.len()), (RCODE_NXDOMAIN, 0));
        assert_eq!(
            judge(&r, "example.com", TYPE_A),
            Err(ResolveError::NxDomain)
        );
        assert_eq!(z.answer(b"palisade-probe 1 2"), None);
        assert_eq!(z.answer(&[0u8; 11]), None);
        let mut resp = query(3, "api.example.com", TYPE_A);
        resp[2] |= 0x80;
        assert_eq!(z.answer(&resp), None, "a response is not a query");
    }

    #[test]
    fn compression_pointers_are_followed_and_loops_refused() {
        // "api" + a pointer back to the name at offset 12.
        let mut m = query(5, "example.com", TYPE_A);
        let at = m.len();
        m.extend_from_slice(b"\x03api\xc0\x0c");
        assert_eq!(read_name(&m, at), Some(("api.example.com".into(), at + 6)));
        // A pointer that does not go backwards, and a loop, are refused.
        let mut fwd = m[..12].to_vec();
        fwd.extend_from_slice(b"\xc0\x0c");
        assert_eq!(read_name(&fwd, 12), None);
        let mut ring = m[..12].to_vec();
        ring.extend_from_slice(b"\x03api\xc0\x0c");
        assert_eq!(read_name(&ring, 12), None);
        // Answers point at the question's name; the reader follows that.
        let z = zone(false);
        let a = z.answer(&query(6, "api.example.com", TYPE_A)).unwrap();
        let q_len = query(6, "api.example.com", TYPE_A).len();
        assert_eq!(&a[q_len..q_len + 2], &[0xc0, 12]);
        assert_eq!(parse_reply(&a).unwrap().answers[0].name, "api.example.com");
    }

    #[test]
    fn long_answers_are_truncated_over_udp_only() {
        let mut z = Zone::new(false);
        // A chain of long names: more than 512 bytes in all.
        let names: Vec<String> = (0..8)
            .map(|i| format!("{}.n{i}.example", "l".repeat(60)))
            .collect();
        for w in names.windows(2) {
            z.add_cname(&w[0], &w[1], 30);
        }
        z.add_a(&names[7], Ipv4Addr::new(192, 0, 2, 9), 30);
        let q = query(4, &names[0], TYPE_A);
        let udp = parse_reply(&z.answer(&q).unwrap()).unwrap();
        assert!(udp.truncated && udp.answers.is_empty());
        let tcp = parse_reply(&z.respond(&q, 65535).unwrap()).unwrap();
        assert!(!tcp.truncated);
        assert_eq!(
            tcp.address(&names[0], TYPE_A),
            Some(Ipv4Addr::new(192, 0, 2, 9).into())
        );
    }

    #[test]
    fn tcp_framing_several_queries_per_connection() {
        use std::net::TcpListener;
        // Loopback of the test's own namespace: nothing leaves this host.
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let z = zone(false);
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            serve_tcp(&z, s, Duration::from_secs(2));
        });
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // Two queries in one write, each framed.
        let mut both = frame(&query(1, "api.example.com", TYPE_A));
        both.extend(frame(&query(2, "nope.example.com", TYPE_A)));
        c.write_all(&both).unwrap();
        let a = parse_reply(&read_framed(&mut c).unwrap()).unwrap();
        assert_eq!((a.id, a.rcode, a.answers.len()), (1, 0, 1));
        let b = parse_reply(&read_framed(&mut c).unwrap()).unwrap();
        assert_eq!((b.id, b.rcode), (2, RCODE_NXDOMAIN));
        // A third, after the first two were answered.
        c.write_all(&frame(&query(3, "www.example.org", TYPE_A)))
            .unwrap();
        let r = parse_reply(&read_framed(&mut c).unwrap()).unwrap();
        assert_eq!(r.answers.len(), 2);
        // Not DNS: the server closes the connection.
        c.write_all(b"\x00\x05hello").unwrap();
        assert_eq!(read_framed(&mut c), None);
        server.join().unwrap();
        assert_eq!(frame(b"ab"), [0, 2, b'a', b'b']);
    }
}
