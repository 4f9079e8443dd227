//! ICMP errors about a tracked flow ("related"): destination unreachable
//! (fragmentation needed among them), time exceeded, parameter problem,
//! and ICMPv6's packet too big quote the start of a packet the error's
//! receiver sent. When that packet's flow is tracked for the endpoint,
//! the error passes with the flow (path MTU discovery needs it: RFC 1191,
//! RFC 8201), however the receiving direction is enforced. Parsing is
//! here; the conntrack lookups are the caller's.

use crate::{decision::key_of, CtKeyOf, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

/// The flow an ICMP or ICMPv6 error quotes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quote<A> {
    /// Found and followed (else the rest is zero).
    pub ok: bool,
    pub protocol: u8,
    pub saddr: A,
    pub daddr: A,
    pub sport_be: u16,
    pub dport_be: u16,
}

impl<A: Copy> Quote<A> {
    /// The conntrack keys the quoted packet's flow may have on endpoint
    /// `endpoint_id` whose program of direction `dir` sees the error: the
    /// quoted packet went the other way, so its own tuple in the opposite
    /// scope (a flow the error's receiver opened), then its reverse in
    /// this scope (a flow the error's sender opened).
    #[inline(always)]
    pub fn keys(&self, endpoint_id: u32, dir: u8) -> (CtKeyOf<A>, CtKeyOf<A>) {
        let scope = crate::decision::opposite(dir);
        let (s, d, sp, dp) = (self.saddr, self.daddr, self.sport_be, self.dport_be);
        let own = key_of(endpoint_id, s, d, sp, dp, self.protocol, scope);
        (own, own.reversed(dir))
    }
}

pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAM_PROBLEM: u8 = 12;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// ICMP (IPv4) errors that quote a packet.
#[inline(always)]
pub fn is_error4(icmp_type: u8) -> bool {
    icmp_type == ICMP_DEST_UNREACHABLE
        || icmp_type == ICMP_TIME_EXCEEDED
        || icmp_type == ICMP_PARAM_PROBLEM
}

/// The flow an ICMP error quotes; `read(off)` is the byte `off` bytes
/// into the ICMP header. The quote holds the IP header and at least 8
/// bytes after it (RFC 792): ports, or an echo's identifier.
#[inline(always)]
pub fn quoted4(read: impl Fn(usize) -> Option<u8>) -> Quote<u32> {
    let inner = 8;
    let byte = |at: usize| read(at).unwrap_or(0);
    let word = |at: usize| u32::from_ne_bytes([byte(at), byte(at + 1), byte(at + 2), byte(at + 3)]);
    let ver_ihl = byte(inner);
    let ihl = (ver_ihl & 0x0f) as usize * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Quote::default();
    }
    let protocol = byte(inner + 9);
    let echo = [ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY];
    let Some((sport_be, dport_be)) = quoted_ports(protocol, PROTO_ICMP, echo, inner + ihl, &read)
    else {
        return Quote::default();
    };
    Quote {
        ok: true,
        protocol,
        saddr: word(inner + 12),
        daddr: word(inner + 16),
        sport_be,
        dport_be,
    }
}

/// The ports of a quoted packet whose transport header is at `l4`: TCP,
/// UDP and SCTP ports, or an echo's identifier (`icmp`: the protocol's
/// number, `echo`: its request and reply types) in both. None for
/// anything else, or when the quote is cut before them.
#[inline(always)]
pub fn quoted_ports(
    protocol: u8,
    icmp: u8,
    echo: [u8; 2],
    l4: usize,
    read: impl Fn(usize) -> Option<u8>,
) -> Option<(u16, u16)> {
    let pair = |at: usize| Some(u16::from_ne_bytes([read(at)?, read(at + 1)?]));
    match protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => Some((pair(l4)?, pair(l4 + 2)?)),
        p if p == icmp && echo.contains(&read(l4)?) => {
            let id = pair(l4 + 4)?;
            Some((id, id))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::{DIR_EGRESS, DIR_INGRESS};
    use std::vec::Vec;

    #[test]
    fn a_fragmentation_needed_error_names_the_quoted_flow() {
        // ICMP 3/4 with MTU 1400, quoting 10.0.0.5:40000 -> 192.0.2.1:443.
        let mut e: Vec<u8> = std::vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
        let mut ip = std::vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&[10, 0, 0, 5, 192, 0, 2, 1]);
        e.extend_from_slice(&ip);
        e.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb, 0, 0, 0, 1]);
        let q = quoted4(|i| e.get(i).copied());
        assert!(q.ok && is_error4(3) && !is_error4(8));
        assert_eq!(q.saddr, u32::from_ne_bytes([10, 0, 0, 5]));
        assert_eq!(
            (u16::from_be(q.sport_be), u16::from_be(q.dport_be)),
            (40000, 443)
        );
        // At the pod's ingress: the pod's own egress entry, or the reply
        // entry of a flow the remote opened.
        let (own, rev) = q.keys(7, DIR_INGRESS);
        assert_eq!(
            (own.scope, own.saddr, own.endpoint_id),
            (DIR_EGRESS, q.saddr, 7)
        );
        assert_eq!(
            (rev.scope, rev.daddr, rev.sport_be),
            (DIR_INGRESS, q.saddr, q.dport_be)
        );
        let cut: Vec<u8> = e[..e.len() - 6].to_vec();
        assert!(!quoted4(|i| cut.get(i).copied()).ok, "ports cut off");
    }
}
