//! Local delivery: an allowed packet from a pod to another pod of the same
//! node goes from the sender's `pod_egress` straight to the egress of the
//! receiver's host veth (`bpf_redirect`), where its `pod_ingress` judges it
//! as always, instead of through the node's IP stack.
//!
//! The stack does for such a packet what a router does, at several times
//! the cost (bench section 2 under `perf`): `ip_rcv`, netfilter's
//! PREROUTING, FORWARD and POSTROUTING hooks, a route lookup, `ip_forward`
//! (which copies the head of every cloned skb, i.e. every TCP segment,
//! to write the TTL) and the neighbour output. The programs do the same
//! router's work in place: the TTL (hop limit) one less, the receiver's MAC
//! as destination, the address the sender sent to as source.
//!
//! `LOCAL_PODS` (`LOCAL_PODS6`) maps a pod address to its host veth. An
//! entry is only a hint: the receiver's endpoint entry (by that interface)
//! must hold the address and a MAC (`LocalPod::accepts`), so an entry left
//! behind by a deleted pod, or one whose interface number was reused,
//! delivers nothing. Everything else takes the stack: the node itself,
//! other nodes, a TTL that ends here (the stack sends the ICMP error), a
//! frame addressed to the receiver's own MAC (pods bridged at layer 2,
//! e.g. palisade chained behind a bridge CNI: not routed, so not ours to
//! route).
//!
//! The other way round, a pod's answer to a flow that reached it through
//! the stack goes back through the stack: netfilter may have translated
//! that flow (kube-proxy's NodePort or a Service palisade leaves to it,
//! a hostPort), and only its conntrack can undo that. A delivered frame
//! carries `LOCAL_MARK` from the sender's program to the receiver's
//! (the mark is cleared there, and would be when the frame enters the
//! pod's namespace anyway); an ingress entry recorded for a frame without
//! it gets `CT_VIA_STACK`, and its flow's answers are left to the stack.
use crate::EndpointInfo;

/// `skb->mark` of a frame delivered by `pod_egress` to a pod of the node,
/// for the receiver's `pod_ingress` ("pali").
pub const LOCAL_MARK: u32 = 0x7061_6c69;

/// Ethernet header plus the IPv4 header up to its checksum: what a routed
/// IPv4 frame has rewritten.
pub const IPV4_REWRITE_LEN: usize = 14 + 12;
/// Ethernet header plus the fixed IPv6 header up to its hop limit.
pub const IPV6_REWRITE_LEN: usize = 14 + 8;
const IPV4_TTL: usize = 14 + 8;
const IPV4_CHECK: usize = 14 + 10;
const IPV6_HOP_LIMIT: usize = 14 + 7;

/// The receiving end of a local delivery, as its endpoint entry has it.
pub struct LocalPod<'a> {
    pub info: &'a EndpointInfo,
}

impl LocalPod<'_> {
    /// Whether a frame sent to `frame_dst` (its destination MAC) for
    /// `addr_matches` (the receiver's entry holds the packet's destination
    /// address) may be delivered to this pod past the stack: routed to the
    /// node (a unicast MAC, not the receiver's), the receiver's MAC known.
    #[inline(always)]
    pub fn accepts(&self, frame_dst: &[u8; 6], addr_matches: bool) -> bool {
        addr_matches
            && self.info.mac != [0; 6]
            && *frame_dst != self.info.mac
            && frame_dst[0] & 1 == 0
    }
}

/// The first `IPV4_REWRITE_LEN` bytes of a routed IPv4 frame, `hdr` as it
/// arrived, delivered to `mac`: None when its TTL ends here.
#[inline(always)]
pub fn ipv4_routed(hdr: &[u8; IPV4_REWRITE_LEN], mac: &[u8; 6]) -> Option<[u8; IPV4_REWRITE_LEN]> {
    let ttl = hdr[IPV4_TTL];
    if ttl <= 1 {
        return None;
    }
    let mut out = *hdr;
    macs(&mut out, hdr, mac);
    out[IPV4_TTL] = ttl - 1;
    // RFC 1624: the 16-bit word holding the TTL went down by 0x0100, so
    // the checksum goes up by it, end-around carry included (as the
    // kernel's `ip_decrease_ttl`).
    let check = u16::from_be_bytes([hdr[IPV4_CHECK], hdr[IPV4_CHECK + 1]]) as u32 + 0x0100;
    let check = (check + (check >> 16)) as u16;
    out[IPV4_CHECK..IPV4_CHECK + 2].copy_from_slice(&check.to_be_bytes());
    Some(out)
}

/// `ipv4_routed` for IPv6: the hop limit, no checksum.
#[inline(always)]
pub fn ipv6_routed(hdr: &[u8; IPV6_REWRITE_LEN], mac: &[u8; 6]) -> Option<[u8; IPV6_REWRITE_LEN]> {
    let hops = hdr[IPV6_HOP_LIMIT];
    if hops <= 1 {
        return None;
    }
    let mut out = *hdr;
    macs(&mut out, hdr, mac);
    out[IPV6_HOP_LIMIT] = hops - 1;
    Some(out)
}

/// Destination: the receiver; source: the node address the sender sent to.
#[inline(always)]
fn macs(out: &mut [u8], hdr: &[u8], mac: &[u8; 6]) {
    out[..6].copy_from_slice(mac);
    out[6..12].copy_from_slice(&hdr[..6]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv4 header checksum of `ip` computed from scratch.
    fn checksum(ip: &[u8; 20]) -> u16 {
        let mut sum = 0u32;
        for (i, w) in ip.chunks(2).enumerate() {
            if i != 5 {
                sum += u16::from_be_bytes([w[0], w[1]]) as u32;
            }
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn frame(ttl: u8, seed: u32) -> ([u8; IPV4_REWRITE_LEN], [u8; 20]) {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        for (i, b) in ip.iter_mut().enumerate().skip(1) {
            *b = (seed.wrapping_mul(2654435761).rotate_left(i as u32) >> 7) as u8;
        }
        ip[8] = ttl;
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = [0u8; IPV4_REWRITE_LEN];
        f[..6].copy_from_slice(&[0xee; 6]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14..].copy_from_slice(&ip[..12]);
        (f, ip)
    }

    #[test]
    fn the_ttl_goes_down_by_one_and_the_checksum_stays_right() {
        let mac = [0x02, 1, 2, 3, 4, 5];
        for seed in 0..5000u32 {
            let ttl = 2 + (seed % 254) as u8;
            let (f, mut ip) = frame(ttl, seed);
            let out = ipv4_routed(&f, &mac).expect("routed");
            assert_eq!(out[IPV4_TTL], ttl - 1);
            ip[..12].copy_from_slice(&out[14..]);
            let got = u16::from_be_bytes([ip[10], ip[11]]);
            ip[8] = ttl - 1;
            // The incremental form may give 0xffff where a full sum gives
            // 0x0000 (both are valid one's-complement zeros, RFC 1624).
            let want = checksum(&ip);
            assert!(got == want || (got, want) == (0xffff, 0), "seed {seed}");
            assert_eq!(&out[..6], &mac);
            assert_eq!(&out[6..12], &[0xee; 6], "source: where the pod sent it");
            assert_eq!(&out[12..14], &[0x08, 0x00]);
        }
    }

    #[test]
    fn a_ttl_that_ends_here_is_left_to_the_stack() {
        let mac = [0x02, 1, 2, 3, 4, 5];
        for ttl in [0, 1] {
            assert_eq!(ipv4_routed(&frame(ttl, 7).0, &mac), None);
            let mut f6 = [0u8; IPV6_REWRITE_LEN];
            f6[IPV6_HOP_LIMIT] = ttl;
            assert_eq!(ipv6_routed(&f6, &mac), None);
        }
        let mut f6 = [0u8; IPV6_REWRITE_LEN];
        f6[..6].copy_from_slice(&[0xee; 6]);
        f6[IPV6_HOP_LIMIT] = 64;
        let out = ipv6_routed(&f6, &mac).expect("routed");
        assert_eq!(
            (out[IPV6_HOP_LIMIT], &out[..6], &out[6..12]),
            (63, &mac[..], &[0xee; 6][..])
        );
    }

    #[test]
    fn only_a_routed_frame_to_a_known_address_and_mac_is_accepted() {
        let info = EndpointInfo {
            mac: [0x02, 1, 2, 3, 4, 5],
            ..Default::default()
        };
        let pod = LocalPod { info: &info };
        assert!(pod.accepts(&[0xee; 6], true));
        assert!(!pod.accepts(&[0xee; 6], false), "another pod's address");
        assert!(
            !pod.accepts(&info.mac, true),
            "bridged: sent to the pod's own MAC"
        );
        assert!(!pod.accepts(&[0xff; 6], true), "broadcast");
        assert!(!pod.accepts(&[0x33, 0x33, 0, 0, 0, 1], true), "multicast");
        let unknown = EndpointInfo::default();
        assert!(
            !LocalPod { info: &unknown }.accepts(&[0xee; 6], true),
            "no MAC known"
        );
    }
}
