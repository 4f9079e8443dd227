//! IPv6 headers as far as palisade reads them today: a bounded walk over
//! the extension headers to the upper-layer header, and the neighbour
//! discovery rule. Shared by the kernel (reading through
//! `bpf_skb_load_bytes`, whose offsets need no verifier proof) and the
//! userspace reference (reading a slice).

use crate::{reason, Ip6, DIR_EGRESS};

pub const IPV6_HLEN: usize = 40;
pub const IPPROTO_ICMPV6: u8 = 58;
const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_AUTH: u8 = 51;
const NH_DEST_OPTS: u8 = 60;

/// Extension headers walked before giving up. Real traffic carries at most
/// two or three (hop-by-hop for MLD, a fragment header, destination
/// options); a chain longer than this from a pod is dropped, since what it
/// hides cannot be known.
pub const MAX_EXT_HEADERS: usize = 6;

pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAM_PROBLEM: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
pub const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
pub const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
pub const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
pub const ICMPV6_REDIRECT: u8 = 137;

/// The upper-layer header of an IPv6 packet. A plain struct rather than
/// an enum with payloads: the kernel copies values of this type, and the
/// verifier refuses a copy of an enum variant's undefined payload bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upper {
    /// `UPPER_AT`, `UPPER_LATER_FRAGMENT` or `UPPER_UNKNOWN`.
    pub kind: u8,
    /// At: its protocol number and offset from the start of the IPv6 header.
    pub protocol: u8,
    pub offset: usize,
    /// A fragment header was crossed: at `UPPER_AT`, the packet is the
    /// first fragment of datagram `frag_id` (offset 0, M set); at
    /// `UPPER_LATER_FRAGMENT`, a later one (its header is in another packet).
    pub fragmented: bool,
    pub frag_id: u32,
}

pub const UPPER_AT: u8 = 1;
pub const UPPER_LATER_FRAGMENT: u8 = 2;
/// Truncated, or more extension headers than [`MAX_EXT_HEADERS`].
pub const UPPER_UNKNOWN: u8 = 3;

impl Upper {
    pub const UNKNOWN: Upper = Upper {
        kind: UPPER_UNKNOWN,
        protocol: 0,
        offset: 0,
        fragmented: false,
        frag_id: 0,
    };

    #[inline(always)]
    pub const fn at(protocol: u8, offset: usize) -> Self {
        Upper {
            kind: UPPER_AT,
            protocol,
            offset,
            fragmented: false,
            frag_id: 0,
        }
    }
}

/// Walks from the fixed header's next-header field. `read(off)` is the
/// byte `off` bytes into the IPv6 header, `None` past the packet's end.
#[inline(always)]
pub fn upper_layer(read: impl Fn(usize) -> Option<u8>) -> Upper {
    let Some(mut nh) = read(6) else {
        return Upper::UNKNOWN;
    };
    let mut off = IPV6_HLEN;
    let (mut fragmented, mut frag_id) = (false, 0u32);
    for _ in 0..MAX_EXT_HEADERS {
        let len = match nh {
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => match read(off + 1) {
                Some(l) => (l as usize + 1) * 8,
                None => return Upper::UNKNOWN,
            },
            NH_AUTH => match read(off + 1) {
                Some(l) => (l as usize + 2) * 4,
                None => return Upper::UNKNOWN,
            },
            NH_FRAGMENT => {
                // Fragment offset: the top 13 bits of bytes 2..4; M: the
                // low bit of byte 3; identification: bytes 4..8.
                let (Some(hi), Some(lo)) = (read(off + 2), read(off + 3)) else {
                    return Upper::UNKNOWN;
                };
                let mut id = 0u32;
                for i in 4..8 {
                    match read(off + i) {
                        Some(b) => id = id << 8 | b as u32,
                        None => return Upper::UNKNOWN,
                    }
                }
                if (hi as u16) << 5 | (lo as u16) >> 3 != 0 {
                    return Upper {
                        kind: UPPER_LATER_FRAGMENT,
                        protocol: 0,
                        offset: 0,
                        fragmented: true,
                        frag_id: id,
                    };
                }
                if lo & 1 != 0 {
                    (fragmented, frag_id) = (true, id);
                }
                8
            }
            protocol => {
                let mut u = Upper::at(protocol, off);
                (u.fragmented, u.frag_id) = (fragmented, frag_id);
                return u;
            }
        };
        nh = match read(off) {
            Some(n) => n,
            None => return Upper::UNKNOWN,
        };
        off += len;
    }
    Upper::UNKNOWN
}

pub const MLD_QUERY: u8 = 130;
pub const MLD_REPORT: u8 = 131;
pub const MLD_DONE: u8 = 132;
pub const MLD2_REPORT: u8 = 143;

/// `fe80::/10`.
#[inline(always)]
pub fn is_link_local(a: &Ip6) -> bool {
    let b = a[0].to_ne_bytes();
    b[0] == 0xfe && b[1] & 0xc0 == 0x80
}

/// `ff02::/16`: link-scope multicast (all nodes, all routers,
/// solicited-node, MLDv2 routers).
#[inline(always)]
pub fn is_link_multicast(a: &Ip6) -> bool {
    let b = a[0].to_ne_bytes();
    b[0] == 0xff && b[1] == 0x02
}

/// `ff00::/8`.
#[inline(always)]
pub fn is_multicast(a: &Ip6) -> bool {
    a[0].to_ne_bytes()[0] == 0xff
}

/// What neighbour discovery and MLD (the link's own control messages) may
/// do, whatever else is enforced. `None`: the packet is neither (and an
/// `Upper::Unknown` from a pod is answered with a drop by the caller's
/// rule, [`unknown_upper`]). `Some(NOT_IP)`: pass, as addressing needs it;
/// `Some(ND_FORBIDDEN)`: drop.
///
/// From a pod, router advertisements and redirects are dropped: a pod is
/// never a router, and on a shared bridge (chained mode) its RAs would
/// reconfigure its neighbours. Every ND message must carry hop limit 255
/// (RFC 4861 receivers ignore the rest), so one that does not is dropped
/// rather than waved through as ND. And these messages stay on the link:
/// from a pod, the source is its own address, link-local or unspecified,
/// and the destination link-local, link-scope multicast or its node
/// (`node(dst)`: unicast neighbour unreachability probes of the gateway);
/// towards a pod, the source is link-local, unspecified or its node.
/// Anything else is a packet dressed as ND to pass the policy.
#[inline(always)]
pub fn link_control(
    dir: u8,
    icmp_type: u8,
    hop_limit: u8,
    src: &Ip6,
    dst: &Ip6,
    own: &Ip6,
    node: impl FnOnce(&Ip6) -> bool,
) -> Option<u8> {
    let nd = (ICMPV6_ROUTER_SOLICITATION..=ICMPV6_REDIRECT).contains(&icmp_type);
    let mld = (MLD_QUERY..=MLD_DONE).contains(&icmp_type) || icmp_type == MLD2_REPORT;
    if !nd && !mld {
        return None;
    }
    let router_only = icmp_type == ICMPV6_ROUTER_ADVERTISEMENT
        || icmp_type == ICMPV6_REDIRECT
        || icmp_type == MLD_QUERY;
    if (dir == DIR_EGRESS && router_only) || (nd && hop_limit != 255) {
        return Some(reason::ND_FORBIDDEN);
    }
    let unspecified = |a: &Ip6| *a == [0; 4];
    // ND's hop limit 255 already keeps it on the link (a router forwards
    // it at 254, which every receiver ignores), so a unicast ND address on
    // the far side is harmless: the node's global gateway address is one.
    let _ = node;
    let nd_unicast = |a: &Ip6| nd && !is_multicast(a);
    let on_link = if dir == DIR_EGRESS {
        (src == own || is_link_local(src) || unspecified(src))
            && (is_link_local(dst) || is_link_multicast(dst) || nd_unicast(dst))
    } else {
        (is_link_local(src) || unspecified(src) || nd_unicast(src))
            && (dst == own || is_link_local(dst) || is_link_multicast(dst))
    };
    if on_link {
        Some(reason::NOT_IP)
    } else {
        Some(reason::ND_FORBIDDEN)
    }
}

/// From a pod, a packet whose upper-layer header cannot be found is
/// dropped even where IPv6 is not enforced: it could be a router
/// advertisement behind a chain of extension headers.
#[inline(always)]
pub fn unknown_upper(dir: u8, upper: &Upper) -> bool {
    dir == DIR_EGRESS && upper.kind == UPPER_UNKNOWN
}

/// What the programs read of a transport header, for the conntrack key
/// and the rules: ports in network order as read (`_be`), TCP flags, the
/// ICMPv6 type (with an echo's identifier in both ports, so the reply's
/// reversed tuple finds the request's entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transport {
    /// The header fits in the payload (else it is malformed).
    pub ok: bool,
    pub sport_be: u16,
    pub dport_be: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
}

/// Reads the transport header of `protocol` at `offset` (from the IPv6
/// header; `room`: the payload's bytes from there). `None`: it does not fit
/// in the payload (dropped as malformed where enforced). Protocols without
/// ports are keyed on addresses and protocol alone.
#[inline(always)]
pub fn transport(
    protocol: u8,
    offset: usize,
    room: usize,
    read: impl Fn(usize) -> Option<u8>,
) -> Transport {
    let bad = Transport::default();
    let need = match protocol {
        crate::PROTO_TCP => 20,
        crate::PROTO_UDP => 8,
        crate::PROTO_SCTP => 12,
        IPPROTO_ICMPV6 => 8,
        _ => return Transport { ok: true, ..bad },
    };
    if need > room {
        return bad;
    }
    let byte = |at: usize| read(offset + at).unwrap_or(0);
    let fits = read(offset + need - 1).is_some();
    let pair = |at: usize| u16::from_ne_bytes([byte(at), byte(at + 1)]);
    let mut t = Transport { ok: fits, ..bad };
    if protocol == IPPROTO_ICMPV6 {
        t.icmp_type = byte(0);
        if t.icmp_type == ICMPV6_ECHO_REQUEST || t.icmp_type == ICMPV6_ECHO_REPLY {
            t.sport_be = pair(4);
            t.dport_be = t.sport_be;
        }
        return t;
    }
    t.sport_be = pair(0);
    t.dport_be = pair(2);
    if protocol == crate::PROTO_TCP {
        // A data offset below 5 words is no TCP header.
        t.ok = t.ok && byte(12) >> 4 >= 5;
        t.tcp_flags = byte(13);
    }
    t
}

/// ICMPv6 errors that quote a packet of a flow (RFC 4443): destination
/// unreachable, packet too big, time exceeded, parameter problem.
#[inline(always)]
pub fn is_error(icmp_type: u8) -> bool {
    (ICMPV6_DEST_UNREACHABLE..=ICMPV6_PARAM_PROBLEM).contains(&icmp_type)
}

pub use crate::related::Quote;

/// The flow an ICMPv6 error at `offset` quotes: the quoted packet, which
/// the receiver of the error once sent. Only a quote without extension
/// headers, of TCP, UDP, SCTP or an echo, is followed; the quote is cut
/// where the error's size limit fell, so only its ports are read.
#[inline(always)]
pub fn quoted(offset: usize, read: impl Fn(usize) -> Option<u8>) -> Quote<Ip6> {
    let inner = offset + 8;
    let byte = |at: usize| read(at).unwrap_or(0);
    let word = |at: usize| u32::from_ne_bytes([byte(at), byte(at + 1), byte(at + 2), byte(at + 3)]);
    let addr = |at: usize| -> Ip6 { [word(at), word(at + 4), word(at + 8), word(at + 12)] };
    let protocol = byte(inner + 6);
    let echo = [ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY];
    let Some((sport_be, dport_be)) =
        crate::related::quoted_ports(protocol, IPPROTO_ICMPV6, echo, inner + 40, &read)
    else {
        return Quote::default();
    };
    Quote {
        ok: true,
        protocol,
        saddr: addr(inner + 8),
        daddr: addr(inner + 24),
        sport_be,
        dport_be,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::DIR_INGRESS;
    use std::{vec, vec::Vec};

    fn walk(p: &[u8]) -> Upper {
        upper_layer(|i| p.get(i).copied())
    }

    fn header(next: u8) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0, 0, 0, next, 255];
        h.resize(IPV6_HLEN, 0);
        h
    }

    #[test]
    fn the_walk_skips_extension_headers_to_the_transport() {
        let mut p = header(IPPROTO_ICMPV6);
        assert_eq!(walk(&p), Upper::at(58, 40));
        // hop-by-hop (8 bytes) -> destination options (16 bytes) -> UDP
        p = header(NH_HOP_BY_HOP);
        p.extend_from_slice(&[NH_DEST_OPTS, 0, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&[17, 1]);
        p.resize(64, 0);
        assert_eq!(walk(&p), Upper::at(17, 64));
        // A first fragment leads on; a later one stops.
        p = header(NH_FRAGMENT);
        p.extend_from_slice(&[IPPROTO_ICMPV6, 0, 0, 1, 0, 0, 0, 9]);
        assert_eq!(
            walk(&p),
            Upper {
                fragmented: true,
                frag_id: 9,
                ..Upper::at(58, 48)
            }
        );
        p[42..44].copy_from_slice(&[0, 8 << 3]);
        assert_eq!(
            walk(&p),
            Upper {
                kind: UPPER_LATER_FRAGMENT,
                protocol: 0,
                offset: 0,
                fragmented: true,
                frag_id: 9
            }
        );
        // Authentication header: (len + 2) * 4 bytes.
        p = header(NH_AUTH);
        p.extend_from_slice(&[6, 1]);
        p.resize(52, 0);
        assert_eq!(walk(&p), Upper::at(6, 52));
    }

    #[test]
    fn truncated_or_endless_chains_are_unknown() {
        assert_eq!(walk(&header(58)[..6]), Upper::UNKNOWN);
        let mut p = header(NH_HOP_BY_HOP);
        p.push(NH_DEST_OPTS);
        assert_eq!(walk(&p), Upper::UNKNOWN, "length byte missing");
        let mut p = header(NH_DEST_OPTS);
        for _ in 0..MAX_EXT_HEADERS {
            p.extend_from_slice(&[NH_DEST_OPTS, 0, 0, 0, 0, 0, 0, 0]);
        }
        assert_eq!(walk(&p), Upper::UNKNOWN, "too many headers");
        assert!(unknown_upper(DIR_EGRESS, &Upper::UNKNOWN));
        assert!(!unknown_upper(DIR_INGRESS, &Upper::UNKNOWN));
        assert!(!unknown_upper(
            DIR_EGRESS,
            &Upper {
                kind: UPPER_LATER_FRAGMENT,
                ..Upper::UNKNOWN
            }
        ));
    }

    fn a(s: &str) -> Ip6 {
        let ip: std::net::Ipv6Addr = s.parse().unwrap();
        let o = ip.octets();
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        [w(0), w(4), w(8), w(12)]
    }

    #[test]
    fn pods_never_advertise_routes_and_nd_stays_on_the_link() {
        use reason::{ND_FORBIDDEN, NOT_IP};
        let own = a("fd00::5");
        let (ll, peer, node) = (a("fe80::1"), a("fd00::9"), a("fd00::1"));
        let snm = a("ff02::1:ff00:1");
        let is_node = |x: &Ip6| *x == node;
        let lc = |dir, t, hl, s: Ip6, d: Ip6| link_control(dir, t, hl, &s, &d, &own, is_node);
        assert_eq!(
            lc(
                DIR_EGRESS,
                ICMPV6_ROUTER_ADVERTISEMENT,
                255,
                ll,
                a("ff02::1")
            ),
            Some(ND_FORBIDDEN)
        );
        assert_eq!(
            lc(DIR_EGRESS, ICMPV6_REDIRECT, 255, own, ll),
            Some(ND_FORBIDDEN)
        );
        assert_eq!(
            lc(
                DIR_INGRESS,
                ICMPV6_ROUTER_ADVERTISEMENT,
                255,
                ll,
                a("ff02::1")
            ),
            Some(NOT_IP)
        );
        for t in [133, 135, 136] {
            assert_eq!(lc(DIR_EGRESS, t, 255, own, snm), Some(NOT_IP));
            assert_eq!(lc(DIR_EGRESS, t, 64, own, snm), Some(ND_FORBIDDEN));
            assert_eq!(lc(DIR_INGRESS, t, 254, ll, own), Some(ND_FORBIDDEN));
        }
        // Unicast probes of the gateway; DAD from the unspecified address.
        assert_eq!(lc(DIR_EGRESS, 135, 255, own, node), Some(NOT_IP));
        assert_eq!(lc(DIR_EGRESS, 135, 255, [0; 4], snm), Some(NOT_IP));
        assert_eq!(lc(DIR_INGRESS, 136, 255, node, own), Some(NOT_IP));
        // ND from another source, to another pod's address, or to a
        // group beyond the link.
        assert_eq!(lc(DIR_EGRESS, 136, 255, peer, snm), Some(ND_FORBIDDEN));
        assert_eq!(lc(DIR_INGRESS, 135, 255, ll, peer), Some(ND_FORBIDDEN));
        assert_eq!(
            lc(DIR_EGRESS, 135, 255, own, a("ff05::2")),
            Some(ND_FORBIDDEN)
        );
        // MLD reports leave at hop limit 1; queries come only from routers.
        assert_eq!(
            lc(DIR_EGRESS, MLD2_REPORT, 1, ll, a("ff02::16")),
            Some(NOT_IP)
        );
        assert_eq!(lc(DIR_EGRESS, MLD2_REPORT, 1, ll, peer), Some(ND_FORBIDDEN));
        assert_eq!(
            lc(DIR_EGRESS, MLD_QUERY, 1, ll, a("ff02::1")),
            Some(ND_FORBIDDEN)
        );
        assert_eq!(lc(DIR_EGRESS, 128, 64, own, peer), None, "echo is not ND");
        assert_eq!(lc(DIR_EGRESS, 138, 255, own, peer), None);
    }

    #[test]
    fn transports_and_quotes_are_read_where_they_fit() {
        let mut p = header(6);
        p.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02]);
        p.resize(60, 0);
        let r = |p: &Vec<u8>| {
            let p = p.clone();
            move |i: usize| p.get(i).copied()
        };
        let t = transport(6, 40, 20, r(&p));
        assert!(t.ok);
        assert_eq!(
            (
                u16::from_be(t.sport_be),
                u16::from_be(t.dport_be),
                t.tcp_flags
            ),
            (40000, 80, 2)
        );
        assert!(!transport(6, 40, 19, r(&p)).ok, "cut by the payload length");
        assert!(
            !transport(6, 40, 20, r(&p[..59].to_vec())).ok,
            "cut by the frame"
        );
        p[52] = 0x40;
        assert!(!transport(6, 40, 20, r(&p)).ok, "data offset below 5");
        assert!(transport(47, 40, 0, r(&p)).ok);
        // A packet-too-big quoting a TCP segment.
        let mut e = header(IPPROTO_ICMPV6);
        e.extend_from_slice(&[ICMPV6_PACKET_TOO_BIG, 0, 0, 0, 0, 0, 5, 0xdc]);
        let mut q = header(6);
        q[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        q[24..40].copy_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        q.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        e.extend_from_slice(&q);
        let q = quoted(40, r(&e));
        assert!(q.ok);
        assert_eq!(
            (q.saddr, q.daddr, q.protocol),
            (a("fd00::5"), a("2001:db8::1"), 6)
        );
        assert_eq!(
            (u16::from_be(q.sport_be), u16::from_be(q.dport_be)),
            (40000, 443)
        );
        assert!(is_error(ICMPV6_PACKET_TOO_BIG) && !is_error(ICMPV6_ECHO_REQUEST));
        assert!(
            !quoted(40, r(&e[..e.len() - 2].to_vec())).ok,
            "ports cut off"
        );
    }
}
