//! The verdict path shared by both tc programs: parse, anti-spoofing,
//! fragments, conntrack, ipcache + policy lookups, events and counters.
//! `Ok(true)` passes the packet, `Ok(false)` drops it.
//!
//! This file parses packets and touches the maps; every rule applied to
//! what it parsed or looked up lives in `palisade_common::decision`, which
//! the userspace reference evaluator calls too.
//!
//! `DRY` (the `pod_verify` program, run only through BPF_PROG_TEST_RUN by
//! `palisade-agent verify`) takes the same path against the same maps but
//! writes nothing: no conntrack or fragment entry, no event, no counter,
//! and it skips the conntrack lookup so every probe is judged as a new flow.
//! It does not translate Service traffic either (no rewrite, no
//! translation entry): a probe is judged on its own tuple, as the
//! reference evaluator judges it.

use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    maps::{lpm_trie::Key, HashMap, LruHashMap},
    programs::TcContext,
};
use palisade_common::{
    conntrack::{TCP_ESTABLISHED, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN},
    ct_budget::{self, CtCharge},
    decision::{
        arp_spoofed, ct_key, ct_live, ct_stale, ct_use, decide, decide_with,
        drop_if_enforced as enforced_drop, empty_key, first_fragment_verdict, foreign_destination,
        foreign_mac, hard_drop, key_of, later_fragment_verdict, new_ct_entry, own_node_checked,
        records_entry, rejudged, rejudged_entry, remote_addr, spoofed, track, unchecked_source,
        Addr, Decision, Reads, Tracked,
    },
    endpoint_slot, reason,
    reject::answerable,
    related::{is_error4, quoted4},
    service::{
        affinity_holds, backend_slot, policy_peer, reverse_key, translated, SvcAddr, SvcAffinity,
        SvcAffinityKey, SvcBackend, SvcBackendKey, SvcBackendOf, SvcFrontend, SvcFrontendKey,
        SvcNat, SvcNatOf, HAIRPIN_ADDR, HAIRPIN_PEER, NAT_HAIRPIN,
    },
    slot_read, CtKey, CtKeyOf, CtValue, EndpointInfo, EndpointKey, FragKey, FragValue,
    IpcacheValue, CT_SVC_FWD, CT_SVC_HAIRPIN, CT_SVC_NAT, CT_VIA_STACK, DIR_EGRESS, DIR_INGRESS,
    EP_VIA_STACK, IDENTITY_HOST, IDENTITY_REMOTE_NODE, POLICY_PREFIX_FULL, PROTO_ICMP, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP,
};

use crate::{
    deliver, headers::*, service, CONNTRACK, COUNTERS, CT_BUDGET, CT_CHARGE, ENDPOINTS,
    ENDPOINT_SLOTS, FRAGMENTS, IPCACHE, IPCACHE_EXACT, POLICY, POLICY_EXACT, PROGRAMS,
    SLOT_EGRESS6, SLOT_INGRESS6, SLOT_VERIFY6, SVC_AFFINITY, SVC_BACKENDS, SVC_FRONTENDS, SVC_NAT,
};

/// Bytes of headers the programs may need in the linear part of the skb:
/// Ethernet, the largest IPv4 header and a TCP header.
const PULL_LEN: u32 = (ETH_HLEN + 60 + TCP_MIN_HLEN) as u32;

/// What the verdict is about, for events.
pub(crate) struct Flow<A = u32> {
    pub(crate) key: CtKeyOf<A>,
    pub(crate) tcp_flags: u8,
    /// `SvcFrontend::service_id` of a translated flow, else 0.
    pub(crate) svc: u32,
    /// May be answered with an ICMP error (`palisade_common::reject`).
    pub(crate) answerable: bool,
}

/// What the verdict path needs of an address family: its conntrack table,
/// its pods by address, its ipcache, and how a stale entry is judged
/// again. `u32` is IPv4 (here), `Ip6` IPv6 (`verdict6`).
pub(crate) trait Family: SvcAddr {
    fn ct(k: &CtKeyOf<Self>) -> Option<*mut CtValue>;
    fn ct_insert(k: &CtKeyOf<Self>, v: &CtValue);
    fn ct_remove(k: &CtKeyOf<Self>);
    /// The endpoint id of the pod on this node with address `a`.
    fn endpoint_of(a: Self) -> Option<u32>;
    /// The ipcache's word on the remote end of a new flow.
    fn peer(dir: u8, remote: Self) -> IpcacheValue;
    /// The translation of a flow by its original tuple's entry `k`, with
    /// flags `ct_flags`: IPv4 reads it from the entry (`entry`, see
    /// [`entry_nat`]), IPv6 from `SVC_NAT6`.
    fn nat_of(k: &CtKeyOf<Self>, ct_flags: u8, entry: Option<&SvcNat>) -> Option<SvcNatOf<Self>>;
    /// `finish`, inlined or as a subprogram of its own (stack frames).
    fn report<const DRY: bool>(ep: &EndpointInfo, ifindex: u32, flow: &Flow<Self>, d: &Decision);
}

impl Family for u32 {
    #[inline(always)]
    fn report<const DRY: bool>(ep: &EndpointInfo, ifindex: u32, flow: &Flow, d: &Decision) {
        finish::<DRY>(ep, ifindex, flow, d);
    }
    #[inline(always)]
    fn ct(k: &CtKey) -> Option<*mut CtValue> {
        CONNTRACK.get_ptr_mut(k)
    }
    #[inline(always)]
    fn ct_insert(k: &CtKey, v: &CtValue) {
        let _ = CONNTRACK.insert(k, v, 0);
    }
    #[inline(always)]
    fn ct_remove(k: &CtKey) {
        let _ = CONNTRACK.remove(k);
    }
    #[inline(always)]
    fn endpoint_of(a: u32) -> Option<u32> {
        lookup(&ENDPOINTS, &EndpointKey::ipv4(a)).map(|src| src.endpoint_id)
    }
    #[inline(always)]
    fn peer(dir: u8, remote: u32) -> IpcacheValue {
        policy_peer(dir, remote, ipcache)
    }
    #[inline(always)]
    fn nat_of(_: &CtKey, ct_flags: u8, entry: Option<&SvcNat>) -> Option<SvcNat> {
        entry.copied().filter(|_| ct_flags & CT_SVC_FWD != 0)
    }
}

/// The verdict on a frame. IPv6 goes to programs of its own
/// (`verdict6`), by tail call: each program gets the verifier's whole
/// budget and its own 512-byte stack.
#[inline(always)]
pub fn process<const DRY: bool>(
    ctx: &TcContext,
    dir: u8,
    redirect: &mut Option<i32>,
) -> Result<bool, ()> {
    if is_ipv6(ctx) {
        let slot = if DRY {
            SLOT_VERIFY6
        } else if dir == DIR_EGRESS {
            SLOT_EGRESS6
        } else {
            SLOT_INGRESS6
        };
        // SAFETY: `ctx` is this program's context.
        unsafe { PROGRAMS.tail_call(ctx, slot) };
        // Only reached when the slot is empty (the loader fills it before
        // any program is attached): IPv6 cannot be judged, so it is
        // dropped, and counted.
        count::<DRY>(reason::IPV6_UNSUPPORTED);
        return Err(());
    }
    frame::<DRY>(ctx, dir, redirect)
}

/// The frame's interface and its endpoint. None: programs are attached
/// only to registered veths; an unknown one is being set up or torn down,
/// and fails closed.
#[inline(always)]
pub(crate) fn endpoint(ctx: &TcContext) -> Option<(u32, EndpointInfo)> {
    // SAFETY: the context pointer is valid for the program's whole run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Some((ifindex, interface_endpoint(ifindex)?))
}

/// The endpoint of host veth `ifindex`: its slot, else `ENDPOINTS`.
#[inline(always)]
pub(crate) fn interface_endpoint(ifindex: u32) -> Option<EndpointInfo> {
    if let Some(ep) = slot_endpoint(ifindex) {
        return Some(ep);
    }
    // SAFETY: map values stay valid while the program runs (RCU).
    Some(unsafe { *ENDPOINTS.get_ptr(EndpointKey::ifindex(ifindex))? })
}

/// `ifindex`'s endpoint from its `ENDPOINT_SLOTS` slot, if the slot holds
/// it whole (`palisade_common::slot_read`).
#[inline(always)]
pub(crate) fn slot_endpoint(ifindex: u32) -> Option<EndpointInfo> {
    let p = ENDPOINT_SLOTS.get_ptr(endpoint_slot(ifindex))?;
    // SAFETY: array values stay mapped while the program runs.
    unsafe { slot_read(p, ifindex) }
}

/// The frame's headers pulled into the linear part: (data, data_end).
/// They may sit in paged data; pulling them in is cheaper than a helper
/// call per field, and failure just means a short packet. (No `end -
/// start` here: pointer subtraction needs CAP_PERFMON.)
#[inline(always)]
pub(crate) fn pull(ctx: &TcContext) -> (usize, usize) {
    let (start, end) = (ctx.data(), ctx.data_end());
    let want = if ctx.len() < PULL_LEN {
        ctx.len()
    } else {
        PULL_LEN
    };
    if has_bytes(start, end, 0, want as usize) || tcp_headers_linear(start, end) {
        return (start, end);
    }
    let _ = ctx.pull_data(want);
    (ctx.data(), ctx.data_end())
}

/// Whether the frame is a TCP segment (IPv4 with no fragment offset, or
/// IPv6 with TCP as its first next header) whose headers, up to the TCP
/// header's first 20 bytes, are all in the linear part: all the programs
/// read of it. A segment a local socket sent keeps its payload in pages,
/// so a short one (a 1-byte request: 67 bytes) is under `PULL_LEN` and
/// not all linear. Pulling its payload in makes the skb writable, and
/// TCP's are clones (the socket keeps the original to retransmit): a new
/// head, the payload moved into it, on every such packet. A forwarded one
/// gets its head copied by `ip_forward` anyway (for the TTL), so what the
/// pull added is the rest (bench section 2 under `perf`, 1-byte
/// request/response: pull and forwarding took 3.4% of the CPU, forwarding
/// alone 2.3%); to the node, nothing else copies it.
#[inline(always)]
fn tcp_headers_linear(start: usize, end: usize) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type_be };
    if ether_type == ETH_P_IP.to_be() {
        let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let (ver_ihl, protocol, frag_off) =
            unsafe { ((*ip).ver_ihl, (*ip).protocol, (*ip).frag_off_be) };
        let ihl = ((ver_ihl & 0x0f) as usize) * 4;
        protocol == PROTO_TCP
            && u16::from_be(frag_off) & IP_OFFSET_MASK == 0
            && has_bytes(start, end, ETH_HLEN + ihl, TCP_MIN_HLEN)
    } else if ether_type == ETH_P_IPV6.to_be() {
        let Some(ip) = ptr_at::<Ipv6Hdr>(start, end, ETH_HLEN) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let next_header = unsafe { (*ip).next_header };
        next_header == PROTO_TCP && has_bytes(start, end, ETH_HLEN + IPV6_HLEN, TCP_MIN_HLEN)
    } else {
        false
    }
}

/// Whether the frame's ether type is IPv6.
#[inline(always)]
pub fn is_ipv6(ctx: &TcContext) -> bool {
    let eth = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0);
    // SAFETY: bounds checked by ptr_at.
    eth.is_some_and(|e| unsafe { (*e).ether_type_be } == ETH_P_IPV6.to_be())
}

/// Every frame but IPv6: IPv4, ARP, and the rest.
#[inline(always)]
pub fn frame<const DRY: bool>(
    ctx: &TcContext,
    dir: u8,
    redirect: &mut Option<i32>,
) -> Result<bool, ()> {
    let Some((ifindex, mut ep)) = endpoint(ctx) else {
        return Err(());
    };
    // A frame to the pod that did not come by local delivery: marked on
    // this copy of the entry, for the flow's conntrack entry.
    if !DRY && dir == DIR_INGRESS && deliver::arrived_via_stack(ctx) {
        ep.flags |= EP_VIA_STACK;
    }
    let (start, end) = pull(ctx);
    let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return Ok(drop_unchecked::<DRY>(&ep, dir, ifindex, reason::MALFORMED));
    };
    // SAFETY: bounds checked by ptr_at.
    let (src_mac, dst_mac, ether_type) =
        unsafe { ((*eth).src, (*eth).dst, u16::from_be((*eth).ether_type_be)) };
    // Layer 2 first: every frame from the pod carries its MAC.
    if let Some(d) = foreign_mac(&ep, dir, &src_mac, &dst_mac) {
        return Ok(report_drop::<DRY>(&ep, ifindex, dir, Some(d)));
    }
    let ep = &ep;
    match ether_type {
        ETH_P_IP => return Ok(ipv4::<DRY>(ctx, ep, dir, ifindex, redirect)),
        ETH_P_ARP => {
            if dir == DIR_EGRESS {
                let Some(a) = ptr_at::<ArpHdr>(start, end, ETH_HLEN) else {
                    return Ok(drop_unchecked::<DRY>(ep, dir, ifindex, reason::MALFORMED));
                };
                // SAFETY: bounds checked by ptr_at.
                let (lens, spa, sha) = unsafe {
                    (
                        ((*a).hlen, (*a).plen),
                        u32::from_ne_bytes((*a).spa),
                        (*a).sha,
                    )
                };
                if let Some(d) = arp_spoofed(ep, dir, lens, spa, &sha, &src_mac) {
                    return Ok(report_drop::<DRY>(ep, ifindex, dir, Some(d)));
                }
            }
            count::<DRY>(reason::NOT_IP);
            return Ok(true);
        }
        // (`process` sends IPv6 to its own path.)
        _ => {
            return Ok(drop_if_enforced::<DRY>(
                ep,
                dir,
                ifindex,
                reason::UNSUPPORTED_L3,
            ))
        }
    }
}

/// The IPv4 path.
#[inline(always)]
fn ipv4<const DRY: bool>(
    ctx: &TcContext,
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    redirect: &mut Option<i32>,
) -> bool {
    let (start, end) = (ctx.data(), ctx.data_end());

    let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN) else {
        return drop_unchecked::<DRY>(ep, dir, ifindex, reason::MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let (ver_ihl, tot_len, id_be, frag_off, protocol, saddr, daddr) = unsafe {
        (
            (*ip).ver_ihl,
            u16::from_be((*ip).tot_len_be),
            (*ip).id_be,
            u16::from_be((*ip).frag_off_be),
            (*ip).protocol,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    // Anti-spoofing first: it holds for every frame from a registered pod,
    // enforced or not, well-formed or not (the source field is there).
    if let Some(d) = spoofed(ep, dir, saddr) {
        let flow = Flow {
            key: ct_key(ep.endpoint_id, saddr, daddr, 0, 0, protocol, dir),
            tcp_flags: 0,
            svc: 0,
            answerable: false,
        };
        finish::<DRY>(ep, ifindex, &flow, &d);
        return d.pass;
    }
    // And every frame to a pod is addressed to it: no other tuple's state
    // is made or used on its veth.
    if let Some(d) = foreign_destination(ep, dir, daddr) {
        let flow = Flow {
            key: ct_key(ep.endpoint_id, saddr, daddr, 0, 0, protocol, dir),
            tcp_flags: 0,
            svc: 0,
            answerable: false,
        };
        finish::<DRY>(ep, ifindex, &flow, &d);
        return d.pass;
    }

    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    // The whole header, options included, must be in the frame: a header
    // cut short (found by the fuzz target) was judged on its protocol alone.
    if ver_ihl >> 4 != 4
        || ihl < 20
        || (tot_len as usize) < ihl
        || !has_bytes(start, end, ETH_HLEN, ihl)
    {
        return drop_if_enforced::<DRY>(ep, dir, ifindex, reason::MALFORMED);
    }

    let frag_key = FragKey {
        saddr,
        daddr,
        id_be,
        protocol,
        scope: dir,
        endpoint_id: ep.endpoint_id,
    };
    let offset = frag_off & IP_OFFSET_MASK;
    if offset != 0 {
        return later_fragment::<DRY>(ep, dir, ifindex, &frag_key, saddr, daddr, protocol);
    }

    let l4 = ETH_HLEN + ihl;
    // Bytes of the datagram after the IP header. The transport header must
    // lie inside the datagram, not merely inside the frame: the receiving
    // stack trims the frame to the total length, so a header that only a
    // trailer completes (RFC 1858 tiny first fragment) would be judged on
    // bytes the pod never sees, e.g. TCP flags the next fragment replaces.
    let l4_room = tot_len as usize - ihl;
    let mut flow = Flow {
        key: ct_key(ep.endpoint_id, saddr, daddr, 0, 0, protocol, dir),
        tcp_flags: 0,
        svc: 0,
        answerable: false,
    };
    let mut icmp_type = 0xff;
    let parsed = match protocol {
        PROTO_TCP => match ptr_at::<TcpHdr>(start, end, l4) {
            // SAFETY: bounds checked by ptr_at.
            Some(h) if TCP_MIN_HLEN <= l4_room => unsafe {
                flow.key.sport_be = (*h).sport_be;
                flow.key.dport_be = (*h).dport_be;
                flow.tcp_flags = (*h).flags;
                ((*h).doff_res >> 4) >= 5
            },
            _ => false,
        },
        PROTO_UDP | PROTO_SCTP => {
            let need = if protocol == PROTO_SCTP {
                SCTP_COMMON_HLEN
            } else {
                8
            };
            match ptr_at::<PortsHdr>(start, end, l4) {
                // SAFETY: bounds checked by ptr_at.
                Some(h) if has_bytes(start, end, l4, need) && need <= l4_room => unsafe {
                    flow.key.sport_be = (*h).sport_be;
                    flow.key.dport_be = (*h).dport_be;
                    true
                },
                _ => false,
            }
        }
        PROTO_ICMP => match ptr_at::<IcmpHdr>(start, end, l4) {
            // SAFETY: bounds checked by ptr_at.
            Some(h) if core::mem::size_of::<IcmpHdr>() <= l4_room => unsafe {
                let t = (*h).icmp_type;
                icmp_type = t;
                if t == ICMP_ECHO_REQUEST || t == ICMP_ECHO_REPLY {
                    // Both ports carry the echo id so the reply's reversed
                    // tuple finds the request's entry.
                    flow.key.sport_be = (*h).id_be;
                    flow.key.dport_be = (*h).id_be;
                }
                true
            },
            _ => false,
        },
        _ => true,
    };
    flow.answerable = answerable(ihl, frag_off, flow.tcp_flags & TCP_FLAG_RST != 0);
    if !parsed {
        return drop_if_enforced::<DRY>(ep, dir, ifindex, reason::MALFORMED);
    }

    let pass =
        if !DRY && protocol == PROTO_ICMP && is_error4(icmp_type) && related4(ctx, ep, dir, l4) {
            count::<DRY>(reason::RELATED);
            true
        } else {
            track_and_decide::<DRY>(ctx, ep, dir, ifindex, &mut flow, l4, redirect)
        };
    if !DRY && frag_off & IP_MF != 0 {
        // First fragment: the rest of the datagram inherits this verdict,
        // if its endpoint may keep one more record.
        if charge(ep, dir, saddr, 1, true) {
            let (expires_ns, verdict) = first_fragment_verdict(pass, ct_now());
            let v = FragValue {
                expires_ns,
                verdict,
                _pad: 0,
            };
            let _ = FRAGMENTS.insert(&frag_key, &v, 0);
        } else {
            count::<DRY>(reason::CT_BUDGET_UNTRACKED);
        }
    }
    pass
}

/// An ICMP error about a flow `ep` tracks (`palisade_common::related`).
#[inline(always)]
fn related4(ctx: &TcContext, ep: &EndpointInfo, dir: u8, l4: usize) -> bool {
    let q = quoted4(|off: usize| ctx.load::<u8>(l4 + off).ok());
    q.ok && related_flow::<u32>(ep, dir, &q, ct_now())
}

/// Conntrack first (known flows and replies pass without a policy lookup),
/// then, for a new flow leaving a pod, Service translation (`service_flow`),
/// then policy for a new flow, which is recorded when admitted.
#[inline(always)]
fn track_and_decide<const DRY: bool>(
    ctx: &TcContext,
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    flow: &mut Flow,
    l4: usize,
    redirect: &mut Option<i32>,
) -> bool {
    let now = ct_now();
    let mut ct_flags = 0;
    let mut ct_state = 0;
    // The translation the matched entry holds, copied only from an entry
    // that has one: `None` is one store, where a zeroed `SvcNat` is a
    // memset (bpf-linker has LLVM call one for it) on every packet.
    let mut nat = None;
    let mut dead = false;
    let known = if DRY {
        None
    } else {
        ct_track_with(
            ep,
            &flow.key,
            dir,
            flow.tcp_flags,
            now,
            &mut ct_flags,
            &mut ct_state,
            &mut dead,
            |ct| {
                if ct.flags & CT_SVC_NAT != 0 {
                    nat = Some(entry_nat(ct));
                }
            },
        )
    };
    if let Some(t) = known {
        let why = t.why;
        if t.stale && !rejudge(ep, ifindex, flow, &t, ct_flags, nat.as_ref(), now) {
            return false;
        }
        if dir == DIR_EGRESS && ct_flags & CT_SVC_FWD != 0 {
            // A later packet of a translated flow, by its original tuple:
            // to the backend its entry holds (`CT_SVC_FWD` comes with
            // `CT_SVC_NAT`, so the translation was copied).
            let Some(n) = nat else {
                return false;
            };
            count::<DRY>(why);
            // The translated tuple's entry (replies are matched
            // against it) follows the handshake and the close; an
            // established TCP flow's plain segments leave it to the
            // replies, which refresh it (TCP always answers), so they
            // cost one conntrack lookup, not two.
            if t.stale || !translated_entry_idle(flow.key.protocol, ct_state, flow.tcp_flags) {
                // (A stale original entry was judged on the translated
                // tuple: that entry is brought up to date, or cut, too.)
                let tk = translated(&flow.key, n.addr, n.port_be);
                let (mut f, mut st) = (0, 0);
                if let Some(tt) =
                    ct_track(ep, &tk, DIR_EGRESS, flow.tcp_flags, now, &mut f, &mut st)
                {
                    if tt.stale {
                        let mut tf = Flow {
                            key: tk,
                            tcp_flags: flow.tcp_flags,
                            svc: n.service_id,
                            answerable: false,
                        };
                        if !rejudge(ep, ifindex, &mut tf, &tt, f, None, now) {
                            let _ = CONNTRACK.remove(&flow.key);
                            return false;
                        }
                    }
                }
            }
            let orig = flow.key;
            return translate(ctx, &orig, &n, l4, ifindex, redirect);
        } else {
            count::<DRY>(why);
            // An answer of a flow that came in through the node's stack
            // leaves through it (`palisade_common::local`).
            if dir == DIR_EGRESS && ct_flags & CT_VIA_STACK != 0 {
                *redirect = Some(aya_ebpf::bindings::TC_ACT_OK as i32);
            }
            // A reply of a translated flow met the translated tuple's
            // entry, which holds the ClusterIP:port it must come from.
            let reverse = nat.as_ref().filter(|_| ct_flags & CT_SVC_FWD == 0);
            return known_flow(ctx, dir, &flow.key, reverse, l4, ifindex, redirect);
        }
    }

    if !DRY
        && dir == DIR_EGRESS
        && (flow.key.protocol == PROTO_TCP || flow.key.protocol == PROTO_UDP)
    {
        let mut fk = SvcFrontendKey {
            addr: flow.key.daddr,
            port_be: flow.key.dport_be,
            protocol: flow.key.protocol,
            _pad: 0,
        };
        let fe = match lookup(&SVC_FRONTENDS, &fk) {
            Some(fe) => Some(fe),
            None => {
                // A NodePort: its frontend is at 0.0.0.0, for every address
                // of every node (this one's, as `host`, and the others').
                // One hash miss for other flows; the ipcache only on a hit.
                fk.addr = 0;
                lookup(&SVC_FRONTENDS, &fk).filter(|_| node_address(flow.key.daddr))
            }
        };
        if let Some(fe) = fe {
            return service_flow(ctx, ep, ifindex, flow, &fe, l4, now, redirect);
        }
    }

    new_flow::<DRY, u32>(ep, dir, ifindex, flow, now, dead)
}

/// A new flow (no Service translation): policy, and an entry when it is
/// admitted and its endpoint may keep one more. `dead`: the tuple has an
/// entry that no longer carries a flow (`ct_track_with`).
#[inline(always)]
pub(crate) fn new_flow<const DRY: bool, A: Family>(
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    flow: &Flow<A>,
    now: u64,
    dead: bool,
) -> bool {
    let mut d = new_flow_policy(ep, dir, &flow.key);
    if !DRY && records_entry(&d, flow.key.protocol, flow.tcp_flags) {
        let v = new_ct_entry(ep, &d, flow.key.protocol, flow.tcp_flags, now);
        // (One that starts closing, picked up at its FIN or RST, is free.)
        if !ct_budget::charged(flow.key.protocol, v.tcp_state)
            || charge(ep, dir, flow.key.saddr, 1, false)
        {
            record(&flow.key, &v, dead);
        } else if ct_budget::needed(ep, dir, d.reason) {
            d = hard_drop(ep, reason::CT_BUDGET, dir);
        } else {
            count::<DRY>(reason::CT_BUDGET_UNTRACKED);
        }
    }
    A::report::<DRY>(ep, ifindex, flow, &d);
    d.pass
}

/// Records a new flow's entry `v`. A dead entry of the same tuple (a port
/// reused, a connection reopened after its close) is written over in
/// place: an LRU map's update takes a free element and releases the old
/// one, about a quarter of a new flow's cost. Looked up again here, not
/// kept from conntrack's lookup: an evicted element may carry another
/// tuple's entry by now.
#[inline(always)]
fn record<A: Family>(k: &CtKeyOf<A>, v: &CtValue, dead: bool) {
    if dead {
        if let Some(p) = A::ct(k) {
            // SAFETY: valid map value pointer; a concurrent packet of the
            // tuple races as with `refresh`.
            unsafe { *p = *v };
            return;
        }
    }
    A::ct_insert(k, v);
}

/// The endpoint a new entry of `ep` in `scope` from `saddr` is charged to
/// (`palisade_common::ct_budget`): `ep` for its egress, for ingress the
/// sending pod when it is on this node, else `ep`.
#[inline(always)]
fn charged_to<A: Family>(ep: &EndpointInfo, scope: u8, saddr: A) -> u32 {
    ct_budget::charged_to(ep.endpoint_id, scope, saddr, A::endpoint_of)
}

/// Gives back the charge of entry `k` (its TCP connection closed).
#[inline(always)]
fn release<A: Family>(ep: &EndpointInfo, k: &CtKeyOf<A>) {
    let id = charged_to(ep, k.scope, k.saddr);
    if let Some(c) = CT_CHARGE.get_ptr_mut(&id) {
        // SAFETY: valid map value pointer, changed atomically only.
        let field = unsafe { &raw mut (*c).entries };
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(field) } != 0 {
            // Adding u64::MAX subtracts one (see `ct_budget::fits` on a
            // race to below zero).
            atomic_add(field, u64::MAX);
        }
    }
}

/// `*p += n`, atomically, the result unused (BPF_ATOMIC BPF_ADD): the BPF
/// target has no read-modify-write atomics in `core::sync::atomic`.
#[inline(always)]
fn atomic_add(p: *mut u64, n: u64) {
    // SAFETY (both): callers pass an aligned u64 in a map value.
    #[cfg(target_arch = "bpf")]
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, n,
        )
    };
    #[cfg(not(target_arch = "bpf"))]
    unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }
        .fetch_add(n, core::sync::atomic::Ordering::Relaxed);
}

/// Charges `n` new conntrack entries (or fragment records) to the endpoint
/// that caused them (`palisade_common::ct_budget`): `ep` for its egress,
/// for ingress the sending pod when it is on this node, else `ep`. False,
/// and nothing charged, when they do not fit its budget.
#[inline(always)]
pub(crate) fn charge<A: Family>(
    ep: &EndpointInfo,
    dir: u8,
    saddr: A,
    n: u64,
    fragments: bool,
) -> bool {
    let id = charged_to(ep, dir, saddr);
    let limit = match CT_BUDGET.get(0) {
        Some(b) => b.limit(fragments),
        None => ct_budget::CtBudget::default().limit(fragments),
    };
    match CT_CHARGE.get_ptr_mut(&id) {
        Some(c) => {
            // SAFETY: valid map value pointer; the field is only ever
            // changed atomically here (the agent's GC overwrites it whole).
            let field = unsafe {
                if fragments {
                    &raw mut (*c).fragments
                } else {
                    &raw mut (*c).entries
                }
            };
            // A plain read: several CPUs may pass the check at once, so the
            // budget may be overrun by a few entries, never by a flood.
            // SAFETY: as above.
            if !ct_budget::fits(unsafe { core::ptr::read_volatile(field) }, n, limit) {
                return false;
            }
            // SAFETY: as above; an aligned u64 in a map value.
            atomic_add(field, n);
        }
        None => {
            if !ct_budget::fits(0, n, limit) {
                return false;
            }
            let c = if fragments {
                CtCharge {
                    entries: 0,
                    fragments: n,
                }
            } else {
                CtCharge {
                    entries: n,
                    fragments: 0,
                }
            };
            // BPF_NOEXIST: another CPU's first charge stays.
            let _ = CT_CHARGE.insert(&id, &c, 1);
        }
    }
    true
}

/// The policy verdict on the flow of stale entry `k` (with flags
/// `ct_flags`), judged again as the new flow it once was: a translated
/// flow's original tuple (client -> ClusterIP) as traffic to its backend,
/// a hairpin (the pod reaching itself through its own Service) as the pod
/// talking to itself.
#[inline(always)]
fn rejudge_decision<A: Family>(
    ep: &EndpointInfo,
    k: &CtKeyOf<A>,
    ct_flags: u8,
    entry: Option<&SvcNat>,
) -> Decision {
    let mut judged = *k;
    if k.scope == DIR_EGRESS && ct_flags & CT_SVC_NAT != 0 {
        if let Some(n) = A::nat_of(k, ct_flags, entry) {
            judged = translated(k, n.addr, n.port_be);
        }
    }
    if judged.scope == DIR_EGRESS && judged.daddr == A::own(ep) {
        decide(ep, DIR_EGRESS, &judged, &HAIRPIN_PEER, |_, _| None)
    } else {
        // Every lookup made (`decision::decide_with`).
        let dir = judged.scope;
        let peer = A::peer(dir, remote_addr(&judged, dir));
        decide_with(ep, dir, &judged, &peer, 0, policy_entry)
    }
}

/// A tracked flow whose entry is stale (`decision::ct_stale`): judged
/// again as the new flow it once was, in the entry's own scope. Admitted:
/// the entry is brought up to date and the packet goes on as a known
/// flow's (true). Denied: the entry is deleted, the packet dropped and
/// reported (`reason::POLICY_CHANGED`). Only on the first packet after a
/// change, so it may cost what a new flow costs. `entry`: the IPv4
/// translation the entry holds (`entry_nat`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rejudge<A: Family>(
    ep: &EndpointInfo,
    ifindex: u32,
    flow: &mut Flow<A>,
    t: &Tracked<A>,
    ct_flags: u8,
    entry: Option<&SvcNat>,
    now: u64,
) -> bool {
    let k = t.key;
    let d = rejudged(rejudge_decision(ep, &k, ct_flags, entry));
    if !d.pass {
        A::ct_remove(&k);
        A::report::<false>(ep, ifindex, flow, &d);
        return false;
    }
    if let Some(p) = A::ct(&k) {
        // SAFETY: valid map value pointer (see `ct_track`).
        let ct = unsafe { &mut *p };
        let reply = t.why == reason::REPLY;
        rejudged_entry(ct, ep, &d, flow.tcp_flags, reply, now, k.protocol);
    }
    true
}

/// A packet conntrack passed: replies of translated flows are turned back
/// into ClusterIP:port (at the client's ingress; a hairpin's at the pod's
/// own egress, then handed back into the pod), all else passes as it is.
#[inline(always)]
fn known_flow(
    ctx: &TcContext,
    dir: u8,
    key: &CtKey,
    reverse: Option<&SvcNat>,
    l4: usize,
    ifindex: u32,
    redirect: &mut Option<i32>,
) -> bool {
    if dir == DIR_INGRESS {
        if let Some(n) = reverse {
            return service::reverse(ctx, key, n, l4).is_ok();
        }
    }
    if dir == DIR_EGRESS && key.daddr == HAIRPIN_ADDR {
        if let Some(n) = lookup(&SVC_NAT, key) {
            return match service::hairpin_reply(ctx, key, &n, l4, ifindex) {
                Ok(act) => {
                    *redirect = Some(act);
                    true
                }
                Err(()) => false,
            };
        }
    }
    true
}

/// Whether a packet of an established translated TCP flow may leave the
/// translated tuple's conntrack entry alone: no SYN, FIN or RST, and the
/// original tuple's entry was established before it.
#[inline(always)]
pub(crate) fn translated_entry_idle(protocol: u8, state_before: u8, tcp_flags: u8) -> bool {
    protocol == PROTO_TCP
        && state_before == TCP_ESTABLISHED
        && tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST) == 0
}

/// The clock of conntrack, fragment and affinity entries: CLOCK_MONOTONIC
/// at tick granularity. Entries live for seconds to hours, and the precise
/// clock reads the clocksource on every packet. (Userspace reads it as
/// CLOCK_MONOTONIC_COARSE, `maps::ct_clock_ns`.)
#[inline(always)]
pub(crate) fn ct_now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Conntrack lookup of `key` (and its reply direction); `flags` and
/// `state` receive the flags and the TCP state (before this packet) of the
/// entry that matched. A stale entry (another generation of `ep`'s policy)
/// is reported as such, untouched, for `rejudge`.
#[inline(always)]
pub(crate) fn ct_track<A: Family>(
    ep: &EndpointInfo,
    key: &CtKeyOf<A>,
    dir: u8,
    tcp_flags: u8,
    now: u64,
    flags: &mut u8,
    state: &mut u8,
) -> Option<Tracked<A>> {
    let mut dead = false;
    ct_track_with(
        ep,
        key,
        dir,
        tcp_flags,
        now,
        flags,
        state,
        &mut dead,
        |_| {},
    )
}

/// [`ct_track`], and `seen` given the entry that matched; `dead` set when
/// `key` has an entry that no longer carries its flow.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn ct_track_with<A: Family>(
    ep: &EndpointInfo,
    key: &CtKeyOf<A>,
    dir: u8,
    tcp_flags: u8,
    now: u64,
    flags: &mut u8,
    state: &mut u8,
    dead: &mut bool,
    mut seen: impl FnMut(&CtValue),
) -> Option<Tracked<A>> {
    let t = track(key, dir, tcp_flags, |k, reply| {
        let p = A::ct(k)?;
        // SAFETY: valid map value pointer; concurrent updates of these
        // fields race benignly (last writer wins on a timestamp).
        let ct = unsafe { &mut *p };
        *flags = ct.flags;
        *state = ct.tcp_state;
        let Some(stale) = ct_use(ct, ep, k.protocol, tcp_flags, reply, now) else {
            // `key`'s own entry, expired or reopened: a new flow on the
            // tuple may take it over (`record`).
            if !reply {
                *dead = true;
            }
            return None;
        };
        seen(ct);
        Some((ct.cookie, stale))
    });
    // A FIN or RST moves a refreshed TCP entry to a closing state
    // (`conntrack::tcp_next_state`): it no longer holds its endpoint's
    // budget. (Decided here, not in the closure, which the two lookups
    // share as a function call of its own: its stack adds to the
    // program's.)
    if key.protocol == PROTO_TCP
        && tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0
        && ct_budget::charged(PROTO_TCP, *state)
    {
        if let Some(t) = &t {
            if !t.stale {
                release(ep, &t.key);
            }
        }
    }
    t
}

/// The translation an IPv4 entry of a translated flow holds
/// (`CtValue::nat_addr`): its backend, or for the translated tuple's
/// entry the ClusterIP:port.
#[inline(always)]
fn entry_nat(ct: &CtValue) -> SvcNat {
    SvcNat {
        addr: ct.nat_addr,
        port_be: ct.nat_port_be,
        flags: if ct.flags & CT_SVC_HAIRPIN != 0 {
            NAT_HAIRPIN
        } else {
            0
        },
        _pad: 0,
        service_id: ct.service_id,
    }
}

/// Whether `addr` is a node's (the ipcache says `host` or `remote-node`).
#[inline(always)]
fn node_address(addr: u32) -> bool {
    ipcache(addr).is_some_and(|v| v.identity == IDENTITY_HOST || v.identity == IDENTITY_REMOTE_NODE)
}

/// `policy`, and for a pod's new flow to its own node, a
/// ClusterNetworkPolicy's deny (`decision::own_node_checked`).
#[inline(always)]
pub(crate) fn new_flow_policy<A: Family>(ep: &EndpointInfo, dir: u8, key: &CtKeyOf<A>) -> Decision {
    let peer = A::peer(dir, remote_addr(key, dir));
    let d = decide(ep, dir, key, &peer, policy_entry);
    own_node_checked(ep, dir, key, &peer, d, policy_entry)
}

/// The policy verdict on a new flow.
#[inline(always)]
pub(crate) fn policy<A: Family>(ep: &EndpointInfo, dir: u8, key: &CtKeyOf<A>) -> Decision {
    decide(
        ep,
        dir,
        key,
        &A::peer(dir, remote_addr(key, dir)),
        policy_entry,
    )
}

/// The ipcache's longest match for `a`: its /32 entry from the hash,
/// else a walk of the trie of shorter prefixes (`IPCACHE_EXACT`).
#[inline(always)]
pub(crate) fn ipcache(a: u32) -> Option<IpcacheValue> {
    lookup(&IPCACHE_EXACT, &a).or_else(|| IPCACHE.get(Key::new(32, a)).copied())
}

/// One longest-prefix match of the policy map with a full key, over the
/// parts `r` names (`decision::Reads`): a one-port entry from the hash,
/// else a walk of the trie of wider entries.
#[inline(always)]
fn policy_entry(pk: &palisade_common::PolicyKey, r: Reads) -> Option<palisade_common::PolicyValue> {
    if r.exact {
        if let Some(v) = lookup(&POLICY_EXACT, pk) {
            return Some(v);
        }
    }
    if r.trie {
        return POLICY.get(&Key::new(POLICY_PREFIX_FULL, *pk)).copied();
    }
    None
}

/// A packet from a pod to a Service frontend. An open flow keeps the
/// backend it was given while its conntrack entry lives; a new one gets a
/// backend by the hash of its tuple and is judged by policy as traffic to
/// that backend. Only admitted flows are translated and recorded.
#[inline(always)]
fn service_flow(
    ctx: &TcContext,
    ep: &EndpointInfo,
    ifindex: u32,
    flow: &mut Flow,
    fe: &SvcFrontend,
    l4: usize,
    now: u64,
    redirect: &mut Option<i32>,
) -> bool {
    let orig = flow.key;
    flow.svc = fe.service_id;
    let Some((slot, b)) = pick_backend(&orig, fe, now) else {
        // Dropped with its own reason, and answered as kube-proxy's REJECT
        // answers it (ICMP port unreachable) so the client fails at once.
        let d = hard_drop(ep, reason::NO_SERVICE_BACKEND, DIR_EGRESS);
        finish::<false>(ep, ifindex, flow, &d);
        if flow.answerable {
            if let Ok(act) = service::reject(ctx, ifindex) {
                *redirect = Some(act);
                return true;
            }
        }
        return false;
    };
    let hairpin = b.addr == ep.ipv4;
    flow.key = translated(&orig, b.addr, b.port_be);
    let d = if hairpin {
        decide(ep, DIR_EGRESS, &flow.key, &HAIRPIN_PEER, |_, _| None)
    } else {
        policy(ep, DIR_EGRESS, &flow.key)
    };
    if !d.pass {
        finish::<false>(ep, ifindex, flow, &d);
        return false;
    }
    // Two conntrack entries (below): the translation needs both.
    if !charge(ep, DIR_EGRESS, orig.saddr, 2, false) {
        let d = hard_drop(ep, reason::CT_BUDGET, DIR_EGRESS);
        finish::<false>(ep, ifindex, flow, &d);
        return false;
    }
    if hairpin {
        // Its replies leave the pod towards HAIRPIN_ADDR and meet the
        // pod's own ingress entry, which knows nothing of the Service:
        // they are turned back through `SVC_NAT`.
        let rev = SvcNat {
            addr: orig.daddr,
            port_be: orig.dport_be,
            flags: NAT_HAIRPIN,
            _pad: 0,
            service_id: fe.service_id,
        };
        let rk = reverse_key(&orig, b.addr, b.port_be, true);
        if SVC_NAT.insert(&rk, &rev, 0).is_err() {
            let d = hard_drop(ep, reason::SVC_NAT_FAILED, DIR_EGRESS);
            finish::<false>(ep, ifindex, flow, &d);
            return false;
        }
    }
    // Two entries, each holding the other side of the translation: the
    // original tuple's (which later packets find first: the backend to
    // rewrite them to, one conntrack lookup and no frontend lookup) and
    // the translated tuple's (policy's verdict; replies are matched
    // against it: the ClusterIP:port to turn them back into).
    let mut v = new_ct_entry(ep, &d, flow.key.protocol, flow.tcp_flags, now);
    v.flags |= CT_SVC_NAT;
    v.service_id = fe.service_id;
    v.nat_addr = orig.daddr;
    v.nat_port_be = orig.dport_be;
    let _ = CONNTRACK.insert(&flow.key, &v, 0);
    v.flags |= CT_SVC_FWD | if hairpin { CT_SVC_HAIRPIN } else { 0 };
    v.nat_addr = b.addr;
    v.nat_port_be = b.port_be;
    let _ = CONNTRACK.insert(&orig, &v, 0);
    if fe.affinity_s != 0 {
        let a = SvcAffinity {
            last_ns: now,
            slot,
            addr: b.addr,
            port_be: b.port_be,
            _pad: [0; 6],
        };
        let _ = SVC_AFFINITY.insert(&affinity_key(&orig, fe), &a, 0);
    }
    count::<false>(reason::SVC_TRANSLATED);
    finish::<false>(ep, ifindex, flow, &d);
    translate(ctx, &orig, &entry_nat(&v), l4, ifindex, redirect)
}

/// The backend slot of a new flow: with `sessionAffinity: ClientIP`, the
/// one this client was last given while that still holds (and the slot
/// still holds that backend), else by the hash of the tuple.
#[inline(always)]
fn pick_backend(orig: &CtKey, fe: &SvcFrontend, now: u64) -> Option<(u32, SvcBackend)> {
    let pinned = if fe.affinity_s != 0 {
        lookup(&SVC_AFFINITY, &affinity_key(orig, fe))
            .filter(|a| affinity_holds(a.last_ns, fe.affinity_s, now))
            .map(|a| (a.slot, a.addr, a.port_be))
    } else {
        None
    };
    pick_slot(orig, fe, pinned, |k| lookup(&SVC_BACKENDS, k))
}

/// `pick_backend` for either family: `pinned` is the client's affinity
/// entry (slot, backend address and port) while it holds, `backend` reads
/// a slot of the family's backend map.
#[inline(always)]
pub(crate) fn pick_slot<A: SvcAddr>(
    orig: &CtKeyOf<A>,
    fe: &SvcFrontend,
    pinned: Option<(u32, A, u16)>,
    backend: impl Fn(&SvcBackendKey) -> Option<SvcBackendOf<A>>,
) -> Option<(u32, SvcBackendOf<A>)> {
    if fe.backends == 0 {
        return None;
    }
    if let Some((at, addr, port_be)) = pinned {
        // Where it was, else where the backend list moved it (the list is
        // rewritten in order when backends come and go).
        let mut i = 0;
        while i <= AFFINITY_SCAN && i <= fe.backends {
            let slot = if i == 0 { at } else { i - 1 };
            let bk = SvcBackendKey {
                service_id: fe.service_id,
                slot,
            };
            if slot < fe.backends {
                if let Some(b) = backend(&bk) {
                    if b.addr == addr && b.port_be == port_be {
                        return Some((slot, b));
                    }
                }
            }
            i += 1;
        }
    }
    let slot = backend_slot(orig, fe.backends);
    let bk = SvcBackendKey {
        service_id: fe.service_id,
        slot,
    };
    backend(&bk).map(|b| (slot, b))
}

/// How many slots a client's pinned backend is looked for in when it is
/// no longer where it was; beyond that the client is given a backend anew.
const AFFINITY_SCAN: u32 = 32;

#[inline(always)]
fn affinity_key(orig: &CtKey, fe: &SvcFrontend) -> SvcAffinityKey {
    SvcAffinityKey {
        client: orig.saddr,
        service_id: fe.service_id,
    }
}

/// Rewrite an admitted packet to its backend; a hairpin is turned back
/// into the pod.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    orig: &CtKey,
    nat: &SvcNat,
    l4: usize,
    ifindex: u32,
    redirect: &mut Option<i32>,
) -> bool {
    if service::forward(ctx, orig, nat, l4).is_err() {
        return false;
    }
    if nat.flags & NAT_HAIRPIN != 0 {
        match service::hairpin_request(ctx, ifindex) {
            Ok(act) => *redirect = Some(act),
            Err(()) => return false,
        }
    }
    true
}

/// Whether the flow `q` quotes is one `ep` tracks, live and current
/// (`palisade_common::related`). Only looked up, never refreshed.
#[inline(always)]
pub(crate) fn related_flow<A: Family>(
    ep: &EndpointInfo,
    dir: u8,
    q: &palisade_common::related::Quote<A>,
    now: u64,
) -> bool {
    let (own, rev) = q.keys(ep.endpoint_id, dir);
    let live = |k: &CtKeyOf<A>| match A::ct(k) {
        // SAFETY: valid map value pointer (RCU).
        Some(p) => unsafe { ct_live(&*p, q.protocol, 0, now) && !ct_stale(&*p, ep) },
        None => false,
    };
    live(&own) || live(&rev)
}

/// A copy of a map value.
#[inline(always)]
pub(crate) fn lookup<K, V: Copy>(map: &impl Lookup<K, V>, k: &K) -> Option<V> {
    // SAFETY: map values stay valid while the program runs (RCU).
    map.ptr(k).map(|p| unsafe { *p })
}

pub(crate) trait Lookup<K, V> {
    fn ptr(&self, k: &K) -> Option<*const V>;
}

impl<K, V> Lookup<K, V> for HashMap<K, V> {
    #[inline(always)]
    fn ptr(&self, k: &K) -> Option<*const V> {
        self.get_ptr(k)
    }
}

impl<K, V> Lookup<K, V> for LruHashMap<K, V> {
    #[inline(always)]
    fn ptr(&self, k: &K) -> Option<*const V> {
        self.get_ptr(k)
    }
}

/// Non-first fragments carry no ports: they get their first fragment's verdict.
#[inline(always)]
fn later_fragment<const DRY: bool>(
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    key: &FragKey,
    saddr: u32,
    daddr: u32,
    protocol: u8,
) -> bool {
    let first = lookup(&FRAGMENTS, key);
    later_fragment_of::<DRY, u32>(ep, dir, ifindex, first, saddr, daddr, protocol)
}

/// A later fragment of a datagram whose first fragment's record is
/// `first`, if there is one.
#[inline(always)]
pub(crate) fn later_fragment_of<const DRY: bool, A: Family>(
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    first: Option<FragValue>,
    saddr: A,
    daddr: A,
    protocol: u8,
) -> bool {
    let now = ct_now();
    // Fragments carry no ports after the first.
    let flow = Flow {
        key: key_of(0, saddr, daddr, 0, 0, protocol, dir),
        tcp_flags: 0,
        svc: 0,
        answerable: false,
    };
    if let Some(v) = first {
        match later_fragment_verdict(v.expires_ns, v.verdict, now) {
            Some(true) => {
                count::<DRY>(reason::FRAG_ALLOWED);
                return true;
            }
            Some(false) => {
                // Every drop is reported, fragments of a denied datagram too.
                let d = hard_drop(ep, reason::FRAG_DENIED, dir);
                A::report::<DRY>(ep, ifindex, &flow, &d);
                return false;
            }
            None => {}
        }
    }
    let Some(d) = enforced_drop(ep, dir, reason::FRAG_UNTRACKED) else {
        return true;
    };
    A::report::<DRY>(ep, ifindex, &flow, &d);
    d.pass
}

#[inline(always)]
fn drop_if_enforced<const DRY: bool>(ep: &EndpointInfo, dir: u8, ifindex: u32, why: u8) -> bool {
    report_drop::<DRY>(ep, ifindex, dir, enforced_drop(ep, dir, why))
}

/// A frame whose source cannot be checked (see `decision::unchecked_source`).
#[inline(always)]
fn drop_unchecked<const DRY: bool>(ep: &EndpointInfo, dir: u8, ifindex: u32, why: u8) -> bool {
    report_drop::<DRY>(ep, ifindex, dir, unchecked_source(ep, dir, why))
}

/// Reports a drop decided before any flow was parsed (none: pass).
#[inline(always)]
fn report_drop<const DRY: bool>(
    ep: &EndpointInfo,
    ifindex: u32,
    dir: u8,
    d: Option<Decision>,
) -> bool {
    report_drop_of::<DRY, u32>(ep, ifindex, dir, d)
}

/// [`report_drop`] with an event of family `A`.
#[inline(always)]
pub(crate) fn report_drop_of<const DRY: bool, A: Family>(
    ep: &EndpointInfo,
    ifindex: u32,
    dir: u8,
    d: Option<Decision>,
) -> bool {
    let Some(d) = d else {
        return true;
    };
    let flow = Flow {
        key: empty_key::<A>(dir),
        tcp_flags: 0,
        svc: 0,
        answerable: false,
    };
    A::report::<DRY>(ep, ifindex, &flow, &d);
    d.pass
}

/// Count the verdict and report it: one event per new flow or drop, under
/// the endpoint's event budget (`events`).
#[inline(always)]
pub(crate) fn finish<const DRY: bool>(
    ep: &EndpointInfo,
    ifindex: u32,
    flow: &Flow<impl Addr>,
    d: &Decision,
) {
    if DRY {
        return;
    }
    count::<DRY>(d.reason);
    crate::events::report(ep, ifindex, &flow.key, d, flow.svc);
}

#[inline(always)]
pub(crate) fn count<const DRY: bool>(r: u8) {
    if DRY {
        return;
    }
    if let Some(c) = COUNTERS.get_ptr_mut(r as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
