//! The IPv6 verdict path: IPv4's stages (`verdict.rs`) with the same rules
//! (`palisade_common::decision`, generic over the address) and the same
//! policy map, over the IPv6 tables `ENDPOINTS6`, `IPCACHE6`, `CONNTRACK6`
//! and `FRAGMENTS6`. Before anything else, the link's own control messages
//! (neighbour discovery, MLD) are held to the link
//! (`ipv6::link_control`). Service translation is `service6`'s.
//!
//! Headers: the fixed header, and a transport header right behind it, are
//! read in place (the common case, and so the established flow's path);
//! extension headers are walked through `bpf_skb_load_bytes`, whose
//! offsets need no verifier proof (`ipv6::upper_layer`).

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use palisade_common::{
    conntrack::TCP_FLAG_RST,
    decision::{
        drop_if_enforced as enforced_drop, first_fragment_verdict, foreign_destination,
        foreign_mac, hard_drop, key_of, spoofed, unchecked_source, Decision,
    },
    endpoint_slot,
    ipv6::{self, Transport, Upper, IPPROTO_ICMPV6, UPPER_AT, UPPER_LATER_FRAGMENT, UPPER_UNKNOWN},
    reason,
    service::{policy_peer, SvcBackend6, SvcNat6, HAIRPIN_ADDR6},
    slot_copy, CtKey6, CtValue, EndpointInfo, EndpointKey, FragKey6, FragValue, Ip6, IpcacheValue,
    CT_SVC_NAT, CT_VIA_STACK, DIR_EGRESS, DIR_INGRESS, EP_VIA_STACK, IDENTITY_HOST, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP,
};

use crate::{
    deliver,
    headers::{ptr_at, EthHdr, Ipv6Hdr, ETH_HLEN, IPV6_HLEN},
    service6,
    verdict::{
        charge, count, ct_now, ct_track_with, finish, later_fragment_of, lookup, new_flow, pull,
        rejudge, related_flow, report_drop_of, Family, Flow,
    },
    CONNTRACK6, ENDPOINTS, ENDPOINTS6, ENDPOINT_SLOTS, FRAGMENTS6, IPCACHE6, IPCACHE6_EXACT,
    SCRATCH6, SVC_NAT6,
};

impl Family for Ip6 {
    #[inline(always)]
    fn ct(k: &CtKey6) -> Option<*mut CtValue> {
        CONNTRACK6.get_ptr_mut(k)
    }
    #[inline(always)]
    fn ct_insert(k: &CtKey6, v: &CtValue) {
        let _ = CONNTRACK6.insert(k, v, 0);
    }
    #[inline(always)]
    fn ct_remove(k: &CtKey6) {
        let _ = CONNTRACK6.remove(k);
    }
    #[inline(always)]
    fn endpoint_of(a: Ip6) -> Option<u32> {
        lookup(&ENDPOINTS6, &a)
    }
    #[inline(always)]
    fn peer(dir: u8, remote: Ip6) -> IpcacheValue {
        policy_peer(dir, remote, ipcache6)
    }
    #[inline(always)]
    fn nat_of(k: &CtKey6, _: u8, _: Option<&palisade_common::service::SvcNat>) -> Option<SvcNat6> {
        lookup(&SVC_NAT6, k)
    }
    /// Deferred: recorded in the scratch slot and reported by `frame` once
    /// the verdict is reached, so the event code's stack frame is never
    /// stacked on a stage's.
    #[inline(always)]
    fn report<const DRY: bool>(_ep: &EndpointInfo, _ifindex: u32, flow: &Flow<Ip6>, d: &Decision) {
        if let Some(s) = SCRATCH6.get_ptr_mut(0) {
            // SAFETY: this CPU's slot (see `Scratch6`).
            unsafe {
                (*s).report = Flow { ..*flow };
                (*s).decision = *d;
                (*s).pending = true;
            }
        }
    }
}

/// Per-CPU working memory of the IPv6 path (`SCRATCH6`), off the stack:
/// its stages are subprograms with stack frames of their own, and the
/// frames of a chain of calls share 512 bytes. Valid for one program run
/// (programs run with migration disabled: nothing else uses it meanwhile).
pub(crate) struct Scratch6 {
    /// The packet's endpoint, when read from its `ENDPOINT_SLOTS` slot.
    pub(crate) ep: EndpointInfo,
    /// The packet's flow.
    pub(crate) flow: Flow<Ip6>,
    /// The packet's interface, clock reading and transport header offset
    /// (from the frame's start), for `service6`'s stages.
    pub(crate) ifindex: u32,
    pub(crate) l4: u32,
    pub(crate) now: u64,
    /// The conntrack entry's flags and TCP state before this packet
    /// (`known`).
    pub(crate) ct_flags: u8,
    pub(crate) ct_state: u8,
    pub(crate) ct_stale: bool,
    /// The tuple has an entry that no longer carries a flow (`known`), for
    /// the new flow's entry to take over (`verdict::record`).
    pub(crate) ct_dead: bool,
    /// A tc action that replaces the verdict's (a hairpin or an answer
    /// handed back into the pod); 0: none.
    pub(crate) redirect: i32,
    /// An answer of a flow that came in through the node's stack
    /// (`CT_VIA_STACK`): it leaves through the stack too.
    pub(crate) via_stack: bool,
    /// A new translated flow (`service6`): its original tuple, the
    /// backend chosen and its slot, policy's verdict.
    pub(crate) orig: CtKey6,
    pub(crate) backend: SvcBackend6,
    pub(crate) slot: u32,
    pub(crate) judged: Decision,
    /// The flow's translation (`SVC_NAT6`), and the cookie of the
    /// conntrack entry last tracked.
    pub(crate) nat: palisade_common::service::SvcNat6,
    pub(crate) cookie: u32,
    /// The frontend of a new flow leaving the pod.
    pub(crate) fe: palisade_common::service::SvcFrontend,
    /// `service6::reject`'s buffers: the quote and the answer.
    pub(crate) quote: [u8; palisade_common::reject::QUOTE6_LEN],
    pub(crate) answer: [u8; palisade_common::reject::ANSWER6_LEN],
    /// The verdict to report, if `pending` (`Family::report`).
    report: Flow<Ip6>,
    decision: Decision,
    pending: bool,
}

/// `finish` as a BPF subprogram (these programs tail-call nothing, so
/// they may have some): the IPv6 path reports from many places, and
/// inlined copies would each take stack of their own.
#[inline(never)]
fn report6<const DRY: bool>(ep: &EndpointInfo, ifindex: u32, flow: &Flow<Ip6>, d: &Decision) {
    finish::<DRY>(ep, ifindex, flow, d);
}

/// The verdict on an IPv6 frame (the programs `pod_egress6`,
/// `pod_ingress6`, `pod_verify6`, tail-called by the IPv4 ones); a frame
/// turned back into its pod leaves its tc action for [`redirect`].
#[inline(always)]
pub fn frame<const DRY: bool>(ctx: &TcContext, dir: u8) -> Result<bool, ()> {
    // SAFETY: the context pointer is valid for the program's whole run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(s) = SCRATCH6.get_ptr_mut(0) else {
        return Err(());
    };
    // The endpoint is not copied onto the stack: its slot's copy goes to
    // this CPU's scratch; else the hash entry is read in place (the agent
    // replaces an entry whole: a hash map update swaps elements under
    // RCU, so the one this run sees stays consistent).
    let slot = ENDPOINT_SLOTS.get_ptr(endpoint_slot(ifindex));
    // SAFETY: array values stay mapped while the program runs; `s` is
    // this CPU's scratch.
    let mut ep = if slot.is_some_and(|p| unsafe { slot_copy(p, ifindex, &raw mut (*s).ep) }) {
        // SAFETY: as above.
        unsafe { &(*s).ep }
    } else {
        let Some(ep) = ENDPOINTS.get_ptr(EndpointKey::ifindex(ifindex)) else {
            return Err(());
        };
        // SAFETY: map values stay valid while the program runs (RCU).
        unsafe { &*ep }
    };
    // A frame to the pod that did not come by local delivery: marked on a
    // copy of the entry, for the flow's conntrack entry.
    if !DRY && dir == DIR_INGRESS && deliver::arrived_via_stack(ctx) {
        // SAFETY: this CPU's slot (see `Scratch6`); `ep` is it, or a map
        // value valid while the program runs.
        unsafe {
            if !core::ptr::eq(ep, &raw const (*s).ep) {
                (*s).ep = *ep;
            }
            (*s).ep.flags |= EP_VIA_STACK;
            ep = &(*s).ep;
        }
    }
    // SAFETY: this CPU's slot (see `Scratch6`).
    unsafe {
        (*s).pending = false;
        (*s).redirect = 0;
        (*s).via_stack = false;
        (*s).ifindex = ifindex;
    }
    let pass = checked::<DRY>(ctx, ep, dir, ifindex, s);
    // Whatever the verdict's stage deferred (`Family::report`).
    // SAFETY: as above.
    unsafe {
        if (*s).pending {
            report6::<DRY>(ep, ifindex, &(*s).report, &(*s).decision);
        }
    }
    Ok(pass)
}

/// The tc action of a frame `frame` turned back into its pod (a hairpin
/// or an answer), if it did.
#[inline(always)]
pub fn redirect() -> Option<i32> {
    let s = SCRATCH6.get_ptr(0)?;
    // SAFETY: this CPU's slot (see `Scratch6`).
    let act = unsafe { (*s).redirect };
    (act != 0).then_some(act)
}

/// Whether the frame `frame` passed answers a flow that came in through
/// the node's stack (`CT_VIA_STACK`): then it is not delivered past it.
#[inline(always)]
pub fn via_stack() -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    SCRATCH6
        .get_ptr(0)
        .is_some_and(|s| unsafe { (*s).via_stack })
}

/// Layer 2 checked, then `process`.
#[inline(always)]
fn checked<const DRY: bool>(
    ctx: &TcContext,
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    scratch: *mut Scratch6,
) -> bool {
    let (start, end) = pull(ctx);
    let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        let d = unchecked_source(ep, dir, reason::MALFORMED);
        return report_drop_of::<DRY, Ip6>(ep, ifindex, dir, d);
    };
    // SAFETY: bounds checked by ptr_at.
    let (src_mac, dst_mac) = unsafe { ((*eth).src, (*eth).dst) };
    // Layer 2 first: every frame from the pod carries its MAC.
    if let Some(d) = foreign_mac(ep, dir, &src_mac, &dst_mac) {
        return report_drop_of::<DRY, Ip6>(ep, ifindex, dir, Some(d));
    }
    process::<DRY>(ctx, ep, dir, ifindex, (start, end), scratch)
}

#[inline(always)]
fn process<const DRY: bool>(
    ctx: &TcContext,
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    (start, end): (usize, usize),
    scratch: *mut Scratch6,
) -> bool {
    let Some(ip) = ptr_at::<Ipv6Hdr>(start, end, ETH_HLEN) else {
        let d = unchecked_source(ep, dir, reason::MALFORMED);
        return report_drop_of::<DRY, Ip6>(ep, ifindex, dir, d);
    };
    // SAFETY: bounds checked by ptr_at.
    let (vtf, payload_len, nh, hop_limit, saddr, daddr) = unsafe {
        (
            (*ip).ver_tc_flow,
            u16::from_be((*ip).payload_len_be) as usize,
            (*ip).next_header,
            (*ip).hop_limit,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    let upper = match nh {
        PROTO_TCP | PROTO_UDP | IPPROTO_ICMPV6 | PROTO_SCTP => Upper::at(nh, IPV6_HLEN),
        _ => walk(ctx),
    };
    // From a pod, what cannot be followed is dropped enforced or not: it
    // could hide a router advertisement.
    if ipv6::unknown_upper(dir, &upper) {
        let d = hard_drop(ep, reason::MALFORMED, dir);
        return report_drop_of::<DRY, Ip6>(ep, ifindex, dir, Some(d));
    }
    let (protocol, offset) = (upper.protocol, upper.offset);
    // The transport header: in place right behind the fixed header, else
    // through the helper.
    let room = (payload_len + IPV6_HLEN).saturating_sub(offset);
    let transport = if offset == IPV6_HLEN {
        ipv6::transport(protocol, IPV6_HLEN, room, |off| {
            // SAFETY: bounds checked by ptr_at.
            ptr_at::<u8>(start, end, ETH_HLEN + off).map(|p| unsafe { *p })
        })
    } else {
        transport_at(ctx, protocol, offset, room)
    };

    // The flow lives in a per-CPU scratch slot, not on the stack: the
    // stages below are subprograms (stack frames of their own), and the
    // frames of a chain of calls share 512 bytes.
    // SAFETY: this CPU's slot (see `Scratch6`).
    let flow = unsafe { &mut (*scratch).flow };
    flow.key = key_of(ep.endpoint_id, saddr, daddr, 0, 0, protocol, dir);
    flow.tcp_flags = 0;
    flow.svc = 0;
    flow.answerable = false;

    // Neighbour discovery and MLD: on the link only, enforced or not.
    if protocol == IPPROTO_ICMPV6 && upper.kind == UPPER_AT && transport.ok {
        match link(ep, dir, flow, transport.icmp_type, hop_limit) {
            reason::NONE => {}
            reason::NOT_IP => {
                count::<DRY>(reason::NOT_IP);
                return true;
            }
            r => {
                let d = hard_drop(ep, r, dir);
                return report_drop_of::<DRY, Ip6>(ep, ifindex, dir, Some(d));
            }
        }
    }

    // Anti-spoofing, then frames to the pod addressed to it.
    if let Some(d) = spoofed(ep, dir, saddr).or_else(|| foreign_destination(ep, dir, daddr)) {
        Ip6::report::<DRY>(ep, ifindex, flow, &d);
        return d.pass;
    }
    if vtf.to_ne_bytes()[0] >> 4 != 6 || upper.kind == UPPER_UNKNOWN {
        let d = enforced_drop(ep, dir, reason::MALFORMED);
        return report_drop_of::<DRY, Ip6>(ep, ifindex, dir, d);
    }
    if upper.kind == UPPER_LATER_FRAGMENT {
        return later_fragment::<DRY>(ep, dir, ifindex, flow, upper.frag_id);
    }
    let t = transport;
    if !t.ok {
        let d = enforced_drop(ep, dir, reason::MALFORMED);
        return report_drop_of::<DRY, Ip6>(ep, ifindex, dir, d);
    }
    flow.key.sport_be = t.sport_be;
    flow.key.dport_be = t.dport_be;
    flow.tcp_flags = t.tcp_flags;
    // Answered when refused for want of a Service backend: only a whole
    // packet without extension headers, never a reset (`reject`).
    flow.answerable = offset == IPV6_HLEN && !upper.fragmented && t.tcp_flags & TCP_FLAG_RST == 0;
    let now = ct_now();
    // SAFETY: this CPU's slot (see `Scratch6`).
    unsafe {
        (*scratch).now = now;
        (*scratch).l4 = (ETH_HLEN + offset) as u32;
    }
    let error = protocol == IPPROTO_ICMPV6 && ipv6::is_error(t.icmp_type);
    let pass = if !DRY && error && related(ctx, ep, dir, offset, now) {
        count::<DRY>(reason::RELATED);
        true
    } else {
        // Service translation (`service6`) in stages called from here,
        // never from each other where a stage tracks: the frames of a
        // chain of calls share 512 bytes.
        let mut k = known::<DRY>(ep, dir, scratch);
        if k == KNOWN_SERVICE {
            k = service6::known(ctx, scratch, dir);
            if k == service6::KNOWN_FORWARD {
                let tracked = if service6::follow(scratch) {
                    service6::track6(ep, scratch, DIR_EGRESS)
                } else {
                    service6::TRACK_PASS
                };
                k = if service6::forward(ctx, scratch, tracked) {
                    KNOWN_PASS
                } else {
                    KNOWN_DROP
                };
            }
        }
        match k {
            KNOWN_PASS => true,
            KNOWN_DROP => false,
            _ if DRY || dir != DIR_EGRESS => new::<DRY>(ep, dir, ifindex, flow, now, scratch),
            _ => match service6::frontend(scratch) {
                service6::FRONTEND_NONE => new::<DRY>(ep, dir, ifindex, flow, now, scratch),
                service6::FRONTEND_LIVE => match service6::track6(ep, scratch, DIR_EGRESS) {
                    service6::TRACK_NONE => service6::new_flow(ctx, ep, scratch),
                    service6::TRACK_PASS => service6::resume(ctx, ep, scratch),
                    _ => false,
                },
                _ => service6::new_flow(ctx, ep, scratch),
            },
        }
    };
    if !DRY && upper.fragmented {
        first_fragment(ep, dir, flow, upper.frag_id, pass);
    }
    pass
}

/// The IPv6 ipcache's longest match for `a`, as `verdict::ipcache`: the
/// /128 from the hash, else a walk of the trie of shorter prefixes.
#[inline(always)]
pub(crate) fn ipcache6(a: Ip6) -> Option<IpcacheValue> {
    lookup(&IPCACHE6_EXACT, &a).or_else(|| IPCACHE6.get(Key::new(128, a)).copied())
}

/// `ipv6::link_control` on the flow's addresses (`reason::NONE`: not
/// neighbour discovery or MLD).
#[inline(never)]
fn link(ep: &EndpointInfo, dir: u8, flow: &Flow<Ip6>, icmp_type: u8, hop_limit: u8) -> u8 {
    let node = |a: &Ip6| ipcache6(*a).is_some_and(|v| v.identity == IDENTITY_HOST);
    // Volatile reads: LLVM would otherwise pass the 16-byte addresses
    // themselves as arguments, and BPF calls take five registers at most.
    // SAFETY: valid references.
    let (s, d, own) = unsafe {
        (
            core::ptr::read_volatile(&flow.key.saddr),
            core::ptr::read_volatile(&flow.key.daddr),
            core::ptr::read_volatile(&ep.ipv6),
        )
    };
    ipv6::link_control(dir, icmp_type, hop_limit, &s, &d, &own, node).unwrap_or(reason::NONE)
}

use service6::{KNOWN_DROP, KNOWN_PASS};
/// `known`: conntrack passed a packet of a translated flow, or a reply
/// to a hairpin: `service6::known` finishes it.
const KNOWN_SERVICE: u8 = 4;

/// Conntrack: a known flow or reply passes without a policy lookup (a
/// stale entry is judged again first), translated as its flow was
/// (`service6::known`). 0: not tracked, a new flow.
#[inline(never)]
fn known<const DRY: bool>(ep: &EndpointInfo, dir: u8, scratch: *mut Scratch6) -> u8 {
    if DRY {
        return 0;
    }
    // SAFETY: this CPU's slot (see `Scratch6`).
    let s = unsafe { &mut *scratch };
    let (ifindex, now) = (s.ifindex, s.now);
    let (mut flags, mut state) = (0, 0);
    s.ct_dead = false;
    // (`ct_dead` written in place: a local would take the stack past 512
    // bytes.)
    let Some(t) = ct_track_with(
        ep,
        &s.flow.key,
        dir,
        s.flow.tcp_flags,
        now,
        &mut flags,
        &mut state,
        &mut s.ct_dead,
        |_| {},
    ) else {
        return 0;
    };
    let stale = t.stale;
    if stale && !rejudge(ep, ifindex, &mut s.flow, &t, flags, None, now) {
        return KNOWN_DROP;
    }
    count::<DRY>(t.why);
    s.via_stack = dir == DIR_EGRESS && flags & CT_VIA_STACK != 0;
    let hairpin_reply = dir == DIR_EGRESS && s.flow.key.daddr == HAIRPIN_ADDR6;
    if flags & CT_SVC_NAT != 0 || hairpin_reply {
        s.ct_flags = flags;
        s.ct_state = state;
        s.ct_stale = stale;
        return KNOWN_SERVICE;
    }
    KNOWN_PASS
}

/// Policy for a new flow, recorded when admitted.
#[inline(never)]
fn new<const DRY: bool>(
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    flow: &Flow<Ip6>,
    now: u64,
    scratch: *const Scratch6,
) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`); `known` set it (a dry run
    // records nothing).
    let dead = !DRY && unsafe { (*scratch).ct_dead };
    new_flow::<DRY, Ip6>(ep, dir, ifindex, flow, now, dead)
}

/// A later fragment: its first fragment's verdict.
#[inline(never)]
fn later_fragment<const DRY: bool>(
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    flow: &Flow<Ip6>,
    id: u32,
) -> bool {
    let (saddr, daddr) = (flow.key.saddr, flow.key.daddr);
    let first = lookup(&FRAGMENTS6, &frag_key(ep, dir, saddr, daddr, id));
    later_fragment_of::<DRY, Ip6>(ep, dir, ifindex, first, saddr, daddr, 0)
}

/// A first fragment: the rest of the datagram inherits this verdict, if
/// its endpoint may keep one more record.
#[inline(never)]
fn first_fragment(ep: &EndpointInfo, dir: u8, flow: &Flow<Ip6>, id: u32, pass: bool) {
    let (saddr, daddr) = (flow.key.saddr, flow.key.daddr);
    if charge(ep, dir, saddr, 1, true) {
        let now = ct_now();
        let (expires_ns, verdict) = first_fragment_verdict(pass, now);
        let v = FragValue {
            expires_ns,
            verdict,
            _pad: 0,
        };
        let _ = FRAGMENTS6.insert(&frag_key(ep, dir, saddr, daddr, id), &v, 0);
    } else {
        count::<false>(reason::CT_BUDGET_UNTRACKED);
    }
}

/// The extension-header walk (`ipv6::upper_layer`), through the helper:
/// a subprogram, so its reads take no room in the caller's stack frame.
#[inline(never)]
fn walk(ctx: &TcContext) -> Upper {
    ipv6::upper_layer(|off: usize| ctx.load::<u8>(ETH_HLEN + off).ok())
}

/// A transport header behind extension headers, through the helper.
#[inline(never)]
fn transport_at(ctx: &TcContext, protocol: u8, offset: usize, room: usize) -> Transport {
    ipv6::transport(protocol, offset, room, |off: usize| {
        ctx.load::<u8>(ETH_HLEN + off).ok()
    })
}

/// An ICMPv6 error about a flow this endpoint tracks (the quoted packet is
/// one the receiver of the error sent): passes with that flow, as path MTU
/// discovery needs (RFC 8201). Only looked up, never refreshed.
#[inline(never)]
fn related(ctx: &TcContext, ep: &EndpointInfo, dir: u8, offset: usize, now: u64) -> bool {
    let read = |off: usize| ctx.load::<u8>(ETH_HLEN + off).ok();
    let q = ipv6::quoted(offset, read);
    q.ok && related_flow::<Ip6>(ep, dir, &q, now)
}

#[inline(always)]
fn frag_key(ep: &EndpointInfo, dir: u8, saddr: Ip6, daddr: Ip6, id: u32) -> FragKey6 {
    // The protocol is left out: a later fragment does not say it where the
    // walk stops, and (source, destination, id) names the datagram.
    FragKey6 {
        saddr,
        daddr,
        id,
        protocol: 0,
        scope: dir,
        _pad: 0,
        endpoint_id: ep.endpoint_id,
    }
}
