//! Held frames as bytes: Ethernet / IPv4 or IPv6 / UDP or TCP headers
//! found, the DNS message read (through `simple-dns`), and the transport
//! checksum made whole again before the frame is sent on (a frame copied
//! at tc may carry only the partial checksum the sender's offload was to
//! finish).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use simple_dns::{rdata::RData, Packet, PacketFlag};

use super::pattern::normalize;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Where a held frame's payload is and whose flow it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// TCP sequence number of the payload's first byte (0 for UDP).
    pub seq: u32,
    /// Byte range of the transport header and of the payload in the frame.
    pub l4: usize,
    pub payload: std::ops::Range<usize>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The UDP or TCP segment of an IPv4 or IPv6 frame without extension
/// headers or fragmentation (what the datapath holds); None otherwise.
pub fn segment(f: &[u8]) -> Option<Segment> {
    let (src, dst, protocol, l4, end) = match be16(f, 12)? {
        ETH_P_IP => {
            let ihl = (*f.get(ETH_HLEN)? as usize & 0x0f) * 4;
            let tot = be16(f, ETH_HLEN + 2)? as usize;
            let src: [u8; 4] = f.get(ETH_HLEN + 12..ETH_HLEN + 16)?.try_into().ok()?;
            let dst: [u8; 4] = f.get(ETH_HLEN + 16..ETH_HLEN + 20)?.try_into().ok()?;
            if ihl < 20 || tot < ihl {
                return None;
            }
            (
                IpAddr::V4(Ipv4Addr::from(src)),
                IpAddr::V4(Ipv4Addr::from(dst)),
                *f.get(ETH_HLEN + 9)?,
                ETH_HLEN + ihl,
                ETH_HLEN + tot,
            )
        }
        ETH_P_IPV6 => {
            let plen = be16(f, ETH_HLEN + 4)? as usize;
            let src: [u8; 16] = f.get(ETH_HLEN + 8..ETH_HLEN + 24)?.try_into().ok()?;
            let dst: [u8; 16] = f.get(ETH_HLEN + 24..ETH_HLEN + 40)?.try_into().ok()?;
            (
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
                *f.get(ETH_HLEN + 6)?,
                ETH_HLEN + 40,
                ETH_HLEN + 40 + plen,
            )
        }
        _ => return None,
    };
    if end > f.len() {
        return None;
    }
    let (sport, dport) = (be16(f, l4)?, be16(f, l4 + 2)?);
    let (seq, start) = match protocol {
        PROTO_UDP => (0, l4 + 8),
        PROTO_TCP => (be32(f, l4 + 4)?, l4 + (*f.get(l4 + 12)? as usize >> 4) * 4),
        _ => return None,
    };
    if start > end {
        return None;
    }
    Some(Segment {
        src,
        dst,
        sport,
        dport,
        protocol,
        seq,
        l4,
        payload: start..end,
    })
}

/// One's complement sum of `b` (as 16-bit words) added to `sum`.
fn sum16(mut sum: u32, b: &[u8]) -> u32 {
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes the whole UDP or TCP checksum of the frame's segment.
pub fn fix_checksum(f: &mut [u8], s: &Segment) {
    let at = s.l4 + if s.protocol == PROTO_UDP { 6 } else { 16 };
    let end = s.payload.end;
    if at + 2 > end {
        return;
    }
    f[at] = 0;
    f[at + 1] = 0;
    let len = (end - s.l4) as u32;
    let mut sum = match (s.src, s.dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => sum16(sum16(0, &a.octets()), &b.octets()),
        (IpAddr::V6(a), IpAddr::V6(b)) => sum16(sum16(0, &a.octets()), &b.octets()),
        _ => return,
    };
    sum += s.protocol as u32 + (len & 0xffff) + (len >> 16);
    sum = sum16(sum, &f[s.l4..end]);
    let mut c = fold(sum);
    if c == 0 && s.protocol == PROTO_UDP {
        // UDP sends a zero sum as all ones (zero means "no checksum").
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// What an answer says: the name asked for, the CNAME chain from it, and
/// the addresses at its end with their TTLs (the shortest TTL along the
/// chain: an alias expires with its CNAME).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// The question's name, then each CNAME target in order; normalized.
    pub names: Vec<String>,
    pub addresses: Vec<(IpAddr, u32)>,
}

/// Longest CNAME chain followed within one answer.
const MAX_CHAIN: usize = 16;

/// The answer in a DNS message; None if it is not a response with one
/// question (a query, a malformed message).
pub fn answer(msg: &[u8]) -> Option<Answer> {
    let p = Packet::parse(msg).ok()?;
    if !p.has_flags(PacketFlag::RESPONSE) || p.questions.len() != 1 {
        return None;
    }
    let mut names = vec![normalize(&p.questions[0].qname.to_string())];
    let mut chain_ttl = u32::MAX;
    // Follow the chain wherever its records sit in the answer section.
    while names.len() <= MAX_CHAIN {
        let last = names.last().expect("not empty").clone();
        let next = p.answers.iter().find_map(|rr| match &rr.rdata {
            RData::CNAME(c) if normalize(&rr.name.to_string()) == last => {
                Some((normalize(&c.0.to_string()), rr.ttl))
            }
            _ => None,
        });
        match next {
            Some((n, ttl)) if !names.contains(&n) => {
                names.push(n);
                chain_ttl = chain_ttl.min(ttl);
            }
            _ => break,
        }
    }
    let mut addresses = Vec::new();
    for rr in &p.answers {
        if !names.contains(&normalize(&rr.name.to_string())) {
            continue;
        }
        let a = match &rr.rdata {
            RData::A(a) => IpAddr::V4(Ipv4Addr::from(a.address)),
            RData::AAAA(a) => IpAddr::V6(Ipv6Addr::from(a.address)),
            _ => continue,
        };
        addresses.push((a, rr.ttl.min(chain_ttl)));
    }
    Some(Answer { names, addresses })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use simple_dns::{rdata, Name, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE};

    /// A response to `q` with `records` (name, ttl, rdata).
    pub(crate) fn response(q: &str, records: &[(&str, u32, RData<'static>)]) -> Vec<u8> {
        let mut p = Packet::new_reply(7);
        p.questions.push(Question::new(
            Name::new_unchecked(q).into_owned(),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        for (n, ttl, d) in records {
            p.answers.push(ResourceRecord::new(
                Name::new_unchecked(n).into_owned(),
                CLASS::IN,
                *ttl,
                d.clone(),
            ));
        }
        p.build_bytes_vec_compressed().unwrap()
    }

    pub(crate) fn a(ip: [u8; 4]) -> RData<'static> {
        RData::A(rdata::A {
            address: u32::from_be_bytes(ip),
        })
    }

    pub(crate) fn cname(to: &str) -> RData<'static> {
        RData::CNAME(rdata::CNAME(Name::new_unchecked(to).into_owned()))
    }

    #[test]
    fn a_cname_chain_is_followed_and_its_shortest_ttl_kept() {
        let m = response(
            "WWW.Example.org.",
            &[
                ("www.example.org", 20, cname("edge.example.net")),
                ("edge.example.net", 300, cname("api.example.com")),
                ("api.example.com", 60, a([192, 0, 2, 10])),
                ("other.example", 60, a([192, 0, 2, 99])),
            ],
        );
        let a = answer(&m).unwrap();
        assert_eq!(
            a.names,
            ["www.example.org", "edge.example.net", "api.example.com"]
        );
        assert_eq!(
            a.addresses,
            [(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 20)],
            "an address outside the chain is not taken"
        );
    }

    #[test]
    fn queries_and_garbage_are_not_answers() {
        let mut q = Packet::new_query(1);
        q.questions.push(Question::new(
            Name::new_unchecked("a.example").into_owned(),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        assert_eq!(answer(&q.build_bytes_vec().unwrap()), None);
        assert_eq!(answer(&[0xff; 7]), None);
        // A CNAME loop ends.
        let m = response(
            "a.example",
            &[
                ("a.example", 5, cname("b.example")),
                ("b.example", 5, cname("a.example")),
            ],
        );
        assert_eq!(answer(&m).unwrap().names, ["a.example", "b.example"]);
    }

    /// An IPv4/UDP frame from 10.0.0.10:53 to 10.0.0.2:40000 with `payload`.
    pub(crate) fn udp_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HLEN];
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let tot = 20 + 8 + payload.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0];
        ip[2..4].copy_from_slice(&(tot as u16).to_be_bytes());
        ip.extend([10, 0, 0, 10, 10, 0, 0, 2]);
        let c = fold(sum16(0, &ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend(ip);
        f.extend(53u16.to_be_bytes());
        f.extend(40000u16.to_be_bytes());
        f.extend(((8 + payload.len()) as u16).to_be_bytes());
        f.extend([0xab, 0xcd]);
        f.extend(payload);
        f
    }

    #[test]
    fn the_checksum_is_written_whole() {
        let mut f = udp_frame(b"hello dns");
        let s = segment(&f).unwrap();
        assert_eq!((s.sport, s.dport, s.protocol), (53, 40000, PROTO_UDP));
        assert_eq!(&f[s.payload.clone()], b"hello dns");
        fix_checksum(&mut f, &s);
        // A whole checksum sums (with the pseudo-header) to all ones.
        let len = (s.payload.end - s.l4) as u32;
        let sum = sum16(
            sum16(sum16(0, &[10, 0, 0, 10]), &[10, 0, 0, 2]) + PROTO_UDP as u32 + len,
            &f[s.l4..s.payload.end],
        );
        assert_eq!(fold(sum), 0);
    }
}
