//! The answer to a new flow for a Service without a ready backend, as
//! kube-proxy's iptables `REJECT` gives it: an ICMP destination
//! unreachable (port unreachable) from the ClusterIP, quoting the
//! offending packet's IP header and first 8 transport bytes (RFC 792), so
//! the client's socket fails at once (TCP connect() and connected UDP
//! sockets get ECONNREFUSED) instead of timing out.
//!
//! Built whole in a buffer here (plain code, tested on the host); the
//! kernel program writes it over the packet and hands it back to the pod.

/// Bytes quoted from the offending packet: a 20-byte IP header (packets
/// with IP options are not answered) and 8 bytes of its transport header.
pub const QUOTE_LEN: usize = 28;
/// The answer after the Ethernet header: IP (20) + ICMP (8) + the quote.
pub const ANSWER_LEN: usize = 20 + 8 + QUOTE_LEN;

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
const PROTO_ICMP: u8 = 1;
const TTL: u8 = 64;

/// Whether a new flow's first packet may be answered: never a fragment
/// (the answer would quote a part of a datagram, and a first fragment's
/// verdict is inherited by the rest), never a packet with IP options (the
/// quote is fixed-size), never a TCP reset (kube-proxy's REJECT answers it,
/// but nothing listens for an answer to a reset). Only TCP and UDP reach
/// Service translation, so ICMP errors are never answered.
#[inline(always)]
pub fn answerable(ihl: usize, frag_off: u16, tcp_rst: bool) -> bool {
    ihl == 20 && frag_off & 0x3fff == 0 && !tcp_rst
}

/// The one's complement sum of big-endian 16-bit words, folded.
#[inline(always)]
fn csum(bytes: &[u8]) -> u16 {
    fold(sum(bytes, 0))
}

/// `acc` plus the big-endian 16-bit words of `bytes` (an even length).
#[inline(always)]
fn sum(bytes: &[u8], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// IPv6: the quote is the fixed header and 8 transport bytes (packets
/// with extension headers are not answered).
pub const QUOTE6_LEN: usize = 48;
/// IPv6 (40) + ICMPv6 (8) + the quote.
pub const ANSWER6_LEN: usize = 40 + 8 + QUOTE6_LEN;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PORT_UNREACH: u8 = 4;
const PROTO_ICMPV6: u8 = 58;

/// IPv6's [`port_unreachable`]: ICMPv6 destination unreachable (port
/// unreachable, RFC 4443) from the address the packet was sent to,
/// quoting it; its checksum covers the pseudo-header. Written into `a`
/// (zeroed first): the kernel program keeps both buffers off its stack.
#[inline(always)]
pub fn port_unreachable6(quote: &[u8; QUOTE6_LEN], a: &mut [u8; ANSWER6_LEN]) {
    const ICMP_LEN: usize = ANSWER6_LEN - 40;
    *a = [0u8; ANSWER6_LEN];
    a[0] = 0x60;
    a[4..6].copy_from_slice(&(ICMP_LEN as u16).to_be_bytes());
    a[6] = PROTO_ICMPV6;
    a[7] = TTL;
    a[8..24].copy_from_slice(&quote[24..40]);
    a[24..40].copy_from_slice(&quote[8..24]);
    a[40] = ICMPV6_DEST_UNREACH;
    a[41] = ICMPV6_PORT_UNREACH;
    a[48..].copy_from_slice(quote);
    // Pseudo-header: the addresses, the ICMPv6 length, the next header.
    let acc = sum(&a[8..40], ICMP_LEN as u32 + PROTO_ICMPV6 as u32);
    let icmp = fold(sum(&a[40..], acc));
    a[42..44].copy_from_slice(&icmp.to_be_bytes());
}

/// IP + ICMP port unreachable quoting `quote` (the offending packet from
/// its IP header on), from the address it was sent to, back to its source.
#[inline(always)]
pub fn port_unreachable(quote: &[u8; QUOTE_LEN]) -> [u8; ANSWER_LEN] {
    let mut a = [0u8; ANSWER_LEN];
    a[0] = 0x45;
    a[2..4].copy_from_slice(&(ANSWER_LEN as u16).to_be_bytes());
    a[8] = TTL;
    a[9] = PROTO_ICMP;
    a[12..16].copy_from_slice(&quote[16..20]);
    a[16..20].copy_from_slice(&quote[12..16]);
    let ip = csum(&a[..20]);
    a[10..12].copy_from_slice(&ip.to_be_bytes());
    a[20] = ICMP_DEST_UNREACH;
    a[21] = ICMP_PORT_UNREACH;
    a[28..].copy_from_slice(quote);
    let icmp = csum(&a[20..]);
    a[22..24].copy_from_slice(&icmp.to_be_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folds_to_zero(b: &[u8]) -> bool {
        csum(b) == 0
    }

    #[test]
    fn answer_is_a_valid_icmp_port_unreachable_from_the_clusterip() {
        // 10.0.0.2:40000 -> 10.96.0.10:53 UDP, its header as sent.
        let mut q = [0u8; QUOTE_LEN];
        q[0] = 0x45;
        q[2..4].copy_from_slice(&29u16.to_be_bytes());
        q[8] = 64;
        q[9] = 17;
        q[12..16].copy_from_slice(&[10, 0, 0, 2]);
        q[16..20].copy_from_slice(&[10, 96, 0, 10]);
        q[20..22].copy_from_slice(&40000u16.to_be_bytes());
        q[22..24].copy_from_slice(&53u16.to_be_bytes());
        q[24..26].copy_from_slice(&9u16.to_be_bytes());
        q[26..28].copy_from_slice(&[0xab, 0xcd]);
        let a = port_unreachable(&q);
        assert_eq!(a[0], 0x45);
        assert_eq!(u16::from_be_bytes([a[2], a[3]]) as usize, ANSWER_LEN);
        assert_eq!(
            (a[9], &a[12..16], &a[16..20]),
            (1, &[10, 96, 0, 10][..], &[10, 0, 0, 2][..])
        );
        assert!(folds_to_zero(&a[..20]), "IP header checksum");
        assert_eq!((a[20], a[21]), (3, 3));
        assert_eq!(&a[24..28], &[0; 4], "unused");
        assert_eq!(&a[28..], &q[..], "the quote, untouched");
        assert!(folds_to_zero(&a[20..]), "ICMP checksum");
    }

    #[test]
    fn ipv6_answer_is_a_valid_icmpv6_port_unreachable_from_the_clusterip() {
        let (client, vip) = ([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], {
            let mut v = [0u8; 16];
            v[0] = 0xfd;
            v[15] = 0x10;
            v
        });
        let mut q = [0u8; QUOTE6_LEN];
        q[0] = 0x60;
        q[4..6].copy_from_slice(&9u16.to_be_bytes());
        q[6] = 17;
        q[7] = 64;
        q[8..24].copy_from_slice(&client);
        q[24..40].copy_from_slice(&vip);
        q[40..42].copy_from_slice(&40000u16.to_be_bytes());
        q[42..44].copy_from_slice(&53u16.to_be_bytes());
        let mut a = [0xffu8; ANSWER6_LEN];
        port_unreachable6(&q, &mut a);
        assert_eq!(a[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([a[4], a[5]]) as usize, ANSWER6_LEN - 40);
        assert_eq!((a[6], &a[8..24], &a[24..40]), (58, &vip[..], &client[..]));
        assert_eq!((a[40], a[41]), (1, 4));
        assert_eq!(&a[48..], &q[..], "the quote, untouched");
        // The checksum over pseudo-header + message folds to zero.
        let mut pseudo = [0u8; 32 + 8 + ANSWER6_LEN - 40];
        pseudo[..32].copy_from_slice(&a[8..40]);
        pseudo[32..36].copy_from_slice(&((ANSWER6_LEN - 40) as u32).to_be_bytes());
        pseudo[36..40].copy_from_slice(&[0, 0, 0, 58]);
        pseudo[40..].copy_from_slice(&a[40..]);
        assert!(folds_to_zero(&pseudo), "ICMPv6 checksum");
    }

    #[test]
    fn only_whole_unoptioned_packets_are_answered() {
        assert!(answerable(20, 0, false));
        assert!(answerable(20, 0x4000, false), "DF is fine");
        assert!(!answerable(24, 0, false));
        assert!(!answerable(20, 0x2000, false), "first fragment");
        assert!(!answerable(20, 0x0010, false), "later fragment");
        assert!(!answerable(20, 0, true), "a reset");
    }
}
