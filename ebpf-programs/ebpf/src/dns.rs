//! Holding DNS answers for the agent (`palisade_common::dns`): a frame to
//! a pod with domain rules from a cluster DNS server is copied into
//! `DNS_HELD` and dropped; the agent sends the copy on once it has programmed
//! the addresses in it. Checked at the top of the to-pod program, after
//! the verdict, on the frame as the pod would get it (a Service reply is
//! already translated back to its ClusterIP, which `DNS_SERVERS` lists
//! beside the DNS pods).
use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP, helpers::generated::bpf_skb_load_bytes, programs::TcContext,
};
use palisade_common::{
    dns::{DnsHeld, DnsServerKey, DnsServerKey6, HELD_DATA},
    reason, EP_DNS_SNOOP, PROTO_TCP, PROTO_UDP,
};

use crate::{headers::*, verdict::count, DNS_ACTIVE, DNS_HELD, DNS_SERVERS, DNS_SERVERS6};

/// Whether the frame (to a pod, passed by the verdict, replies already
/// translated back) is a DNS answer to hold; if so it is copied and the
/// caller drops it. Frames to pods only pay an array read while no pod
/// on the node has domain rules (`DNS_ACTIVE`), and a hash lookup per
/// UDP or TCP packet while one has. A TCP segment without payload is
/// never held: only the answer bytes matter.
#[inline(always)]
pub fn held(ctx: &TcContext) -> bool {
    if !active() {
        return false;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return false;
    };
    let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let (ether_type, ver_ihl, tot_len, frag_off, protocol, saddr) = unsafe {
        (
            u16::from_be((*eth).ether_type_be),
            (*ip).ver_ihl,
            u16::from_be((*ip).tot_len_be) as usize,
            u16::from_be((*ip).frag_off_be),
            (*ip).protocol,
            (*ip).saddr,
        )
    };
    // Fragments are not held: their answer cannot be read from one frame.
    if ether_type != ETH_P_IP
        || frag_off & (IP_MF | IP_OFFSET_MASK) != 0
        || (protocol != PROTO_UDP && protocol != PROTO_TCP)
    {
        return false;
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    let Some(sport_be) = answer_sport(
        start,
        end,
        ETH_HLEN + ihl,
        tot_len.saturating_sub(ihl),
        protocol,
    ) else {
        return false;
    };
    let k = DnsServerKey {
        addr: saddr,
        port_be: sport_be,
        protocol,
        _pad: 0,
    };
    // SAFETY: only the presence of the entry is read.
    if unsafe { DNS_SERVERS.get(&k) }.is_none() {
        return false;
    }
    copy(ctx)
}

/// `held` for an IPv6 frame. Answers carry no extension headers: a frame
/// with one is not held (its answer goes on unlearned, failing closed).
/// A subprogram of its own: the IPv6 program's call chain is near the
/// 512-byte stack limit, and this runs after the verdict's chain returned.
#[inline(never)]
pub fn held6(ctx: &TcContext) -> bool {
    if !active() {
        return false;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(ip) = ptr_at::<Ipv6Hdr>(start, end, ETH_HLEN) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let (payload_len, protocol, saddr) = unsafe {
        (
            u16::from_be((*ip).payload_len_be) as usize,
            (*ip).next_header,
            (*ip).saddr,
        )
    };
    if protocol != PROTO_UDP && protocol != PROTO_TCP {
        return false;
    }
    let Some(sport_be) = answer_sport(start, end, ETH_HLEN + IPV6_HLEN, payload_len, protocol)
    else {
        return false;
    };
    let k = DnsServerKey6 {
        addr: saddr,
        port_be: sport_be,
        protocol,
        _pad: 0,
    };
    // SAFETY: only the presence of the entry is read.
    if unsafe { DNS_SERVERS6.get(&k) }.is_none() {
        return false;
    }
    copy(ctx)
}

/// Whether a pod of the node has domain rules (`DNS_ACTIVE`).
#[inline(always)]
fn active() -> bool {
    DNS_ACTIVE.get(0).is_some_and(|v| *v != 0)
}

/// The source port of a UDP datagram, or of a TCP segment that carries
/// payload, whose transport header starts `l4` bytes into the frame and
/// whose transport bytes are `l4_len`; None for anything else.
#[inline(always)]
fn answer_sport(start: usize, end: usize, l4: usize, l4_len: usize, protocol: u8) -> Option<u16> {
    let ports = ptr_at::<PortsHdr>(start, end, l4)?;
    if protocol == PROTO_TCP {
        let tcp = ptr_at::<TcpHdr>(start, end, l4)?;
        // SAFETY: bounds checked by ptr_at.
        let doff = unsafe { ((*tcp).doff_res >> 4) as usize } * 4;
        if l4_len <= doff {
            return None;
        }
    }
    // SAFETY: bounds checked by ptr_at.
    Some(unsafe { (*ports).sport_be })
}

/// The frame into `DNS_HELD` if its pod has domain rules; whether it was.
#[inline(always)]
fn copy(ctx: &TcContext) -> bool {
    let Some((ifindex, ep)) = crate::verdict::endpoint(ctx) else {
        return false;
    };
    if ep.flags & EP_DNS_SNOOP == 0 {
        return false;
    }
    let len = ctx.len();
    if len < 14 || len as usize > HELD_DATA {
        count::<false>(reason::DNS_TOO_LARGE);
        return false;
    }
    let Some(mut rec) = DNS_HELD.reserve::<DnsHeld>(0) else {
        count::<false>(reason::DNS_HOLD_FULL);
        return false;
    };
    let p = rec.as_mut_ptr();
    // Bounds the verifier can see for the copy's length: 1..=HELD_DATA,
    // and `len` itself (checked above). Read back through a volatile load
    // so the compiler cannot fold the mask into the check it proved.
    // SAFETY: a read of a local.
    let len = unsafe { core::ptr::read_volatile(&len) };
    let n = ((len - 1) & (HELD_DATA as u32 - 1)) + 1;
    // SAFETY: the record is reserved and `n` <= HELD_DATA bytes fit in it.
    let r = unsafe {
        (*p).ifindex = ifindex;
        (*p).len = n;
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            (*p).data.as_mut_ptr() as *mut _,
            n,
        )
    };
    if r != 0 {
        rec.discard(0);
        return false;
    }
    // Wake the agent for every answer: it is waiting on this one.
    rec.submit(BPF_RB_FORCE_WAKEUP as u64);
    count::<false>(reason::DNS_HELD);
    true
}
