//! Local delivery (`palisade_common::local`): an allowed frame from a pod to
//! another pod of this node, rewritten as a router would and redirected to
//! the egress of the receiver's host veth, where `pod_ingress` judges it.
//! `None` everywhere here means "the stack forwards it", never a drop.
use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use palisade_common::{
    local::{ipv4_routed, ipv6_routed, LocalPod, IPV4_REWRITE_LEN, IPV6_REWRITE_LEN, LOCAL_MARK},
    EndpointInfo, EndpointKey, Ip6,
};

use crate::{
    headers::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
    verdict::slot_endpoint,
    ENDPOINTS, LOCAL_PODS, LOCAL_PODS6,
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
    let info = receiver(ifindex)?;
    let hdr = ptr_at::<[u8; IPV4_REWRITE_LEN]>(start, end, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { *hdr };
    let frame_dst: [u8; 6] = [hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5]];
    if !(LocalPod { info: &info }).accepts(&frame_dst, info.ipv4 == daddr) {
        return None;
    }
    let out = ipv4_routed(&hdr, &info.mac)?;
    redirect(ctx, &out, ifindex)
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
    let info = receiver(ifindex)?;
    let hdr = ptr_at::<[u8; IPV6_REWRITE_LEN]>(start, end, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { *hdr };
    let frame_dst: [u8; 6] = [hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5]];
    if !(LocalPod { info: &info }).accepts(&frame_dst, info.ipv6 == daddr) {
        return None;
    }
    let out = ipv6_routed(&hdr, &info.mac)?;
    redirect(ctx, &out, ifindex)
}

/// The endpoint entry of host veth `ifindex` (its slot, else `ENDPOINTS`).
#[inline(always)]
fn receiver(ifindex: u32) -> Option<EndpointInfo> {
    if let Some(info) = slot_endpoint(ifindex) {
        return Some(info);
    }
    // SAFETY: map values stay valid while the program runs (RCU).
    Some(unsafe { *ENDPOINTS.get_ptr(EndpointKey::ifindex(ifindex))? })
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

/// Writes the rewritten headers (one store: the skb's own header area,
/// which a TCP clone may write without a copy), marks the frame as
/// delivered and redirects.
#[inline(always)]
fn redirect<const N: usize>(ctx: &TcContext, out: &[u8; N], ifindex: u32) -> Option<i32> {
    ctx.store(0, out, 0).ok()?;
    ctx.set_mark(LOCAL_MARK);
    // SAFETY: helper without preconditions.
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
