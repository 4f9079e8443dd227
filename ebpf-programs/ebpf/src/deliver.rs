//! Local delivery (`palisade_common::local`): an allowed frame from a pod to
//! another pod of this node, rewritten as a router would and redirected to
//! the egress of the receiver's host veth, where `pod_ingress` judges it.
//! `None` everywhere here means "the stack forwards it", never a drop.
use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use palisade_common::{
    local::{ipv4_routed, ipv6_routed, LocalPod, LOCAL_MARK},
    EndpointInfo, Ip6,
};

use crate::{
    headers::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
    verdict::interface_endpoint,
    LOCAL_PODS, LOCAL_PODS6,
};

/// The tc action delivering the IPv4 frame in `ctx` to a pod of this node.
#[inline(always)]
pub fn local4(ctx: &TcContext) -> Option<i32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(start, end, 0)?;
    let ip = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (ether_type, daddr) = unsafe { ((*eth).ether_type_be, (*ip).daddr) };
    if ether_type != ETH_P_IP.to_be() {
        return None;
    }
    // SAFETY: map values stay valid while the program runs (RCU).
    let ifindex = unsafe { *LOCAL_PODS.get(&daddr)? };
    deliver(ctx, ifindex, |info| info.ipv4 == daddr, ipv4_routed)
}

/// `local4` for IPv6.
#[inline(always)]
pub fn local6(ctx: &TcContext) -> Option<i32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(start, end, 0)?;
    let ip = ptr_at::<Ipv6Hdr>(start, end, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (ether_type, daddr): (u16, Ip6) = unsafe { ((*eth).ether_type_be, (*ip).daddr) };
    if ether_type != ETH_P_IPV6.to_be() {
        return None;
    }
    // SAFETY: map values stay valid while the program runs (RCU).
    let ifindex = unsafe { *LOCAL_PODS6.get(&daddr)? };
    deliver(ctx, ifindex, |info| info.ipv6 == daddr, ipv6_routed)
}

/// The frame to host veth `ifindex`, if its endpoint `holds` the
/// destination address and `accepts` the frame: its first `N` bytes
/// rewritten by `routed` (one store: the skb's own header area, which a
/// TCP clone may write without a copy), marked as delivered, redirected.
#[inline(always)]
fn deliver<const N: usize>(
    ctx: &TcContext,
    ifindex: u32,
    holds: impl Fn(&EndpointInfo) -> bool,
    routed: fn(&[u8; N], &[u8; 6]) -> Option<[u8; N]>,
) -> Option<i32> {
    let info = interface_endpoint(ifindex)?;
    let hdr = ptr_at::<[u8; N]>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { *hdr };
    let frame_dst: [u8; 6] = [hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5]];
    if !(LocalPod { info: &info }).accepts(&frame_dst, holds(&info)) {
        return None;
    }
    let out = routed(&hdr, &info.mac)?;
    ctx.store(0, &out, 0).ok()?;
    ctx.set_mark(LOCAL_MARK);
    // SAFETY: helper without preconditions.
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Whether the frame at a pod's `pod_ingress` came through the node's
/// stack rather than by local delivery, whose mark is cleared here.
#[inline(always)]
pub fn arrived_via_stack(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer is valid for the program's whole run.
    if unsafe { (*ctx.skb.skb).mark } != LOCAL_MARK {
        return true;
    }
    ctx.set_mark(0);
    false
}
