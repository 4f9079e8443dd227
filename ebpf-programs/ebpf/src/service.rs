//! Packet rewriting for Service translation: the forward DNAT of a flow to
//! a ClusterIP (and the hairpin source), the reverse translation of its
//! replies, and the hairpin turn-around. Which backend, and whether the
//! flow may exist at all, is decided in `verdict.rs` with the rules of
//! `palisade_common::service`; this file only edits headers and fixes their
//! checksums (incrementally, so CHECKSUM_PARTIAL packets from the pod stay
//! valid).
use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_skb_change_tail},
    programs::TcContext,
};
use palisade_common::{
    reject::{port_unreachable, ANSWER_LEN, QUOTE_LEN},
    service::{SvcNat, HAIRPIN_ADDR, NAT_HAIRPIN},
    CtKey, PROTO_TCP, PROTO_UDP,
};

use crate::headers::ETH_HLEN;

const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SADDR_OFF: usize = ETH_HLEN + 12;
const IP_DADDR_OFF: usize = ETH_HLEN + 16;
/// bpf_l4_csum_replace flags (linux/bpf.h).
pub(crate) const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Where the L4 checksum sits, and the flags its updates need (a UDP
/// checksum of 0 means "none" and stays 0).
#[inline(always)]
pub(crate) fn l4_csum(protocol: u8, l4: usize) -> Option<(usize, u64)> {
    match protocol {
        PROTO_TCP => Some((l4 + 16, 0)),
        PROTO_UDP => Some((l4 + 6, BPF_F_MARK_MANGLED_0)),
        _ => None,
    }
}

#[inline(always)]
fn set_addr(ctx: &TcContext, off: usize, csum: (usize, u64), old: u32, new: u32) -> Result<(), ()> {
    ctx.l4_csum_replace(
        csum.0,
        old as u64,
        new as u64,
        csum.1 | BPF_F_PSEUDO_HDR | 4,
    )
    .map_err(|_| ())?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

#[inline(always)]
pub(crate) fn set_port(
    ctx: &TcContext,
    off: usize,
    csum: (usize, u64),
    old: u16,
    new: u16,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(csum.0, old as u64, new as u64, csum.1 | 2)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

/// Client -> ClusterIP:port becomes client -> backend:port (and, for a
/// hairpin, HAIRPIN_ADDR -> the pod itself).
#[inline(always)]
pub fn forward(ctx: &TcContext, orig: &CtKey, nat: &SvcNat, l4: usize) -> Result<(), ()> {
    let csum = l4_csum(orig.protocol, l4).ok_or(())?;
    set_addr(ctx, IP_DADDR_OFF, csum, orig.daddr, nat.addr)?;
    set_port(ctx, l4 + 2, csum, orig.dport_be, nat.port_be)?;
    if nat.flags & NAT_HAIRPIN != 0 {
        set_addr(ctx, IP_SADDR_OFF, csum, orig.saddr, HAIRPIN_ADDR)?;
    }
    Ok(())
}

/// A reply backend:port -> client becomes ClusterIP:port -> client.
#[inline(always)]
pub fn reverse(ctx: &TcContext, key: &CtKey, nat: &SvcNat, l4: usize) -> Result<(), ()> {
    let csum = l4_csum(key.protocol, l4).ok_or(())?;
    set_addr(ctx, IP_SADDR_OFF, csum, key.saddr, nat.addr)?;
    set_port(ctx, l4, csum, key.sport_be, nat.port_be)
}

/// A hairpinned reply (pod -> HAIRPIN_ADDR, at the pod's own egress)
/// becomes ClusterIP:port -> pod and goes straight back into the pod:
/// the node has no route to HAIRPIN_ADDR, and the pod's ingress already
/// admitted the flow. Returns the tc action (TC_ACT_REDIRECT on success).
#[inline(always)]
pub fn hairpin_reply(
    ctx: &TcContext,
    key: &CtKey,
    nat: &SvcNat,
    l4: usize,
    ifindex: u32,
) -> Result<i32, ()> {
    reverse(ctx, key, nat, l4)?;
    let csum = l4_csum(key.protocol, l4).ok_or(())?;
    set_addr(ctx, IP_DADDR_OFF, csum, HAIRPIN_ADDR, key.saddr)?;
    swap_macs(ctx)?;
    // SAFETY: helper called from tc ingress, as it requires.
    Ok(unsafe { bpf_redirect_peer(ifindex, 0) } as i32)
}

/// A hairpinned request (already rewritten by `forward`) goes out of the
/// same host veth towards the pod, through the pod's ingress program,
/// without the node's routing: no reverse-path filter sees a
/// HAIRPIN_ADDR source arrive from a pod, and no ICMP redirect is sent.
#[inline(always)]
pub fn hairpin_request(ctx: &TcContext, ifindex: u32) -> Result<i32, ()> {
    swap_macs(ctx)?;
    // SAFETY: helper without preconditions.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// A new flow to a Service without a ready backend, answered as
/// kube-proxy's REJECT answers it: the packet becomes an ICMP port
/// unreachable from the ClusterIP quoting its own first bytes
/// (`palisade_common::reject`), handed straight back into the pod (as a
/// hairpin reply is, so the pod's ingress program and the node's routing
/// never see it). The caller checked `reject::answerable` (a 20-byte IP
/// header, no fragment). Returns the tc action.
#[inline(always)]
pub fn reject(ctx: &TcContext, ifindex: u32) -> Result<i32, ()> {
    let quote: [u8; QUOTE_LEN] = ctx.load(ETH_HLEN).map_err(|_| ())?;
    let answer = port_unreachable(&quote);
    // SAFETY: the context pointer is valid for the program's whole run;
    // the helper grows or trims the frame to the answer's length.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + ANSWER_LEN) as u32, 0) } != 0 {
        return Err(());
    }
    ctx.store(ETH_HLEN, &answer, 0).map_err(|_| ())?;
    swap_macs(ctx)?;
    // SAFETY: helper called from tc ingress, as it requires.
    Ok(unsafe { bpf_redirect_peer(ifindex, 0) } as i32)
}

/// The frame was addressed to the node; turned back into the pod it must
/// be addressed to the pod.
#[inline(always)]
pub(crate) fn swap_macs(ctx: &TcContext) -> Result<(), ()> {
    let dst: [u8; 6] = ctx.load(0).map_err(|_| ())?;
    let src: [u8; 6] = ctx.load(6).map_err(|_| ())?;
    ctx.store(0, &src, 0).map_err(|_| ())?;
    ctx.store(6, &dst, 0).map_err(|_| ())
}
