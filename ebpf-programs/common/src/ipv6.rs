//! IPv6 headers as far as palisade reads them today: a bounded walk over
//! the extension headers to the upper-layer header, and the neighbour
//! discovery rule. Shared by the kernel (reading through
//! `bpf_skb_load_bytes`, whose offsets need no verifier proof) and the
//! userspace reference (reading a slice).

use crate::{reason, DIR_EGRESS};

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

pub const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
pub const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
pub const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
pub const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
pub const ICMPV6_REDIRECT: u8 = 137;

/// The upper-layer header of an IPv6 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upper {
    /// Its protocol number and offset from the start of the IPv6 header.
    At { protocol: u8, offset: usize },
    /// A non-first fragment: the upper-layer header is in another packet.
    LaterFragment,
    /// Truncated, or more extension headers than [`MAX_EXT_HEADERS`].
    Unknown,
}

/// Walks from the fixed header's next-header field. `read(off)` is the
/// byte `off` bytes into the IPv6 header, `None` past the packet's end.
#[inline(always)]
pub fn upper_layer(read: impl Fn(usize) -> Option<u8>) -> Upper {
    let Some(mut nh) = read(6) else {
        return Upper::Unknown;
    };
    let mut off = IPV6_HLEN;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match nh {
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => match read(off + 1) {
                Some(l) => (l as usize + 1) * 8,
                None => return Upper::Unknown,
            },
            NH_AUTH => match read(off + 1) {
                Some(l) => (l as usize + 2) * 4,
                None => return Upper::Unknown,
            },
            NH_FRAGMENT => {
                // Fragment offset: the top 13 bits of bytes 2..4.
                match (read(off + 2), read(off + 3)) {
                    (Some(hi), Some(lo)) if (hi as u16) << 5 | (lo as u16) >> 3 != 0 => {
                        return Upper::LaterFragment
                    }
                    (Some(_), Some(_)) => 8,
                    _ => return Upper::Unknown,
                }
            }
            protocol => {
                return Upper::At {
                    protocol,
                    offset: off,
                }
            }
        };
        nh = match read(off) {
            Some(n) => n,
            None => return Upper::Unknown,
        };
        off += len;
    }
    Upper::Unknown
}

/// What neighbour discovery may do, whatever else is enforced. `None`: the
/// packet is not neighbour discovery (and an `Upper::Unknown` from a pod is
/// answered with a drop by the caller's rule, [`unknown_upper`]).
///
/// From a pod, router advertisements and redirects are dropped: a pod is
/// never a router, and on a shared bridge (chained mode) its RAs would
/// reconfigure its neighbours. Every ND message must carry hop limit 255
/// (RFC 4861 receivers ignore the rest), so one that does not is dropped
/// rather than waved through as ND. `Some(NOT_IP)`: pass, as addressing
/// needs it.
#[inline(always)]
pub fn neighbour_discovery(dir: u8, icmp_type: u8, hop_limit: u8) -> Option<u8> {
    if !(ICMPV6_ROUTER_SOLICITATION..=ICMPV6_REDIRECT).contains(&icmp_type) {
        return None;
    }
    let router_only = icmp_type == ICMPV6_ROUTER_ADVERTISEMENT || icmp_type == ICMPV6_REDIRECT;
    if (dir == DIR_EGRESS && router_only) || hop_limit != 255 {
        return Some(reason::ND_FORBIDDEN);
    }
    Some(reason::NOT_IP)
}

/// From a pod, a packet whose upper-layer header cannot be found is
/// dropped even where IPv6 is not enforced: it could be a router
/// advertisement behind a chain of extension headers.
#[inline(always)]
pub fn unknown_upper(dir: u8, upper: Upper) -> bool {
    dir == DIR_EGRESS && upper == Upper::Unknown
}

/// The verdict on an IPv6 packet while IPv6 is not enforced (it never
/// reaches or leaves a pod enforced in either direction), apart from the
/// neighbour discovery addressing needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V6 {
    /// Passed; the counter to bump, if any.
    Pass(Option<u8>),
    /// Dropped and reported with this reason; audit mode does not pass it.
    Drop(u8),
}

/// `read(off)`: the byte `off` bytes into the IPv6 header.
#[inline(always)]
pub fn verdict(dir: u8, enforced_any: bool, read: impl Fn(usize) -> Option<u8>) -> V6 {
    let upper = upper_layer(&read);
    if unknown_upper(dir, upper) {
        return V6::Drop(reason::MALFORMED);
    }
    if let Upper::At {
        protocol: IPPROTO_ICMPV6,
        offset,
    } = upper
    {
        if let (Some(t), Some(hop_limit)) = (read(offset), read(7)) {
            match neighbour_discovery(dir, t, hop_limit) {
                Some(reason::NOT_IP) => return V6::Pass(Some(reason::NOT_IP)),
                Some(r) => return V6::Drop(r),
                None => {}
            }
        }
    }
    if !enforced_any {
        return V6::Pass(None);
    }
    V6::Drop(reason::IPV6_UNSUPPORTED)
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
        assert_eq!(
            walk(&p),
            Upper::At {
                protocol: 58,
                offset: 40
            }
        );
        // hop-by-hop (8 bytes) -> destination options (16 bytes) -> UDP
        p = header(NH_HOP_BY_HOP);
        p.extend_from_slice(&[NH_DEST_OPTS, 0, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&[17, 1]);
        p.resize(64, 0);
        assert_eq!(
            walk(&p),
            Upper::At {
                protocol: 17,
                offset: 64
            }
        );
        // A first fragment leads on; a later one stops.
        p = header(NH_FRAGMENT);
        p.extend_from_slice(&[IPPROTO_ICMPV6, 0, 0, 1, 0, 0, 0, 9]);
        assert_eq!(
            walk(&p),
            Upper::At {
                protocol: 58,
                offset: 48
            }
        );
        p[42..44].copy_from_slice(&[0, 8 << 3]);
        assert_eq!(walk(&p), Upper::LaterFragment);
        // Authentication header: (len + 2) * 4 bytes.
        p = header(NH_AUTH);
        p.extend_from_slice(&[6, 1]);
        p.resize(52, 0);
        assert_eq!(
            walk(&p),
            Upper::At {
                protocol: 6,
                offset: 52
            }
        );
    }

    #[test]
    fn truncated_or_endless_chains_are_unknown() {
        assert_eq!(walk(&header(58)[..6]), Upper::Unknown);
        let mut p = header(NH_HOP_BY_HOP);
        p.push(NH_DEST_OPTS);
        assert_eq!(walk(&p), Upper::Unknown, "length byte missing");
        let mut p = header(NH_DEST_OPTS);
        for _ in 0..MAX_EXT_HEADERS {
            p.extend_from_slice(&[NH_DEST_OPTS, 0, 0, 0, 0, 0, 0, 0]);
        }
        assert_eq!(walk(&p), Upper::Unknown, "too many headers");
        assert!(unknown_upper(DIR_EGRESS, Upper::Unknown));
        assert!(!unknown_upper(DIR_INGRESS, Upper::Unknown));
        assert!(!unknown_upper(DIR_EGRESS, Upper::LaterFragment));
    }

    #[test]
    fn pods_never_advertise_routes_and_nd_needs_hop_limit_255() {
        use reason::{ND_FORBIDDEN, NOT_IP};
        let nd = neighbour_discovery;
        assert_eq!(
            nd(DIR_EGRESS, ICMPV6_ROUTER_ADVERTISEMENT, 255),
            Some(ND_FORBIDDEN)
        );
        assert_eq!(nd(DIR_EGRESS, ICMPV6_REDIRECT, 255), Some(ND_FORBIDDEN));
        assert_eq!(
            nd(DIR_INGRESS, ICMPV6_ROUTER_ADVERTISEMENT, 255),
            Some(NOT_IP)
        );
        for t in [133, 135, 136] {
            assert_eq!(nd(DIR_EGRESS, t, 255), Some(NOT_IP));
            assert_eq!(nd(DIR_EGRESS, t, 64), Some(ND_FORBIDDEN));
            assert_eq!(nd(DIR_INGRESS, t, 254), Some(ND_FORBIDDEN));
        }
        assert_eq!(nd(DIR_EGRESS, 128, 64), None, "echo is not ND");
        assert_eq!(nd(DIR_EGRESS, 138, 255), None);
    }

    #[test]
    fn unenforced_pods_keep_ipv6_but_not_router_advertisements() {
        let mut ra = header(IPPROTO_ICMPV6);
        ra.push(ICMPV6_ROUTER_ADVERTISEMENT);
        let read = |p: &[u8]| {
            let p = p.to_vec();
            move |i: usize| p.get(i).copied()
        };
        assert_eq!(
            verdict(DIR_EGRESS, false, read(&ra)),
            V6::Drop(reason::ND_FORBIDDEN)
        );
        assert_eq!(
            verdict(DIR_INGRESS, false, read(&ra)),
            V6::Pass(Some(reason::NOT_IP))
        );
        // Behind a hop-by-hop header too.
        let mut hidden = header(NH_HOP_BY_HOP);
        hidden.extend_from_slice(&[IPPROTO_ICMPV6, 0, 0, 0, 0, 0, 0, 0]);
        hidden.push(ICMPV6_REDIRECT);
        assert_eq!(
            verdict(DIR_EGRESS, false, read(&hidden)),
            V6::Drop(reason::ND_FORBIDDEN)
        );
        let mut udp = header(17);
        udp.resize(48, 0);
        assert_eq!(verdict(DIR_EGRESS, false, read(&udp)), V6::Pass(None));
        assert_eq!(
            verdict(DIR_EGRESS, true, read(&udp)),
            V6::Drop(reason::IPV6_UNSUPPORTED)
        );
        // From a pod, a chain that cannot be followed is dropped.
        assert_eq!(
            verdict(DIR_EGRESS, false, read(&udp[..6])),
            V6::Drop(reason::MALFORMED)
        );
        assert_eq!(verdict(DIR_INGRESS, false, read(&udp[..6])), V6::Pass(None));
    }
}
