//! The verdict path shared by both tc programs: parse, anti-spoofing,
//! fragments, conntrack, ipcache + policy lookups, events and counters.
//! `Ok(true)` passes the packet, `Ok(false)` drops it.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key, programs::TcContext};
use palisade_common::{
    conntrack::{tcp_next_state, tcp_reopens, timeout_ns},
    reason, CtKey, CtValue, EndpointInfo, EndpointKey, FlowEvent, FragKey, FragValue, IpcacheValue,
    PolicyKey, ACTION_ALLOW, CT_AUDIT, CT_SEEN_REPLY, DIR_EGRESS, DIR_INGRESS, EP_AUDIT,
    FRAG_TIMEOUT_NS, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, POLICY_PREFIX_FULL, PROTO_ICMP,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DROP,
};

use crate::{headers::*, CONNTRACK, COUNTERS, ENDPOINTS, EVENTS, FRAGMENTS, IPCACHE, POLICY};

/// Bytes of headers the programs may need in the linear part of the skb:
/// Ethernet, the largest IPv4 header and a TCP header.
const PULL_LEN: u32 = (ETH_HLEN + 60 + TCP_MIN_HLEN) as u32;

/// What the verdict is about, for events.
struct Flow {
    key: CtKey,
    tcp_flags: u8,
}

struct Decision {
    pass: bool,
    verdict: u8,
    reason: u8,
    cookie: u32,
    src_identity: u32,
    dst_identity: u32,
}

#[inline(always)]
pub fn process(ctx: &TcContext, dir: u8) -> Result<bool, ()> {
    // SAFETY: the context pointer is valid for the program's whole run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ep = match ENDPOINTS.get_ptr(EndpointKey::ifindex(ifindex)) {
        // SAFETY: map values stay valid while the program runs (RCU).
        Some(p) => unsafe { *p },
        // Programs are attached only to registered veths; an unknown one is
        // being set up or torn down, and fails closed.
        None => return Err(()),
    };

    let (mut start, mut end) = (ctx.data(), ctx.data_end());
    // Headers may sit in paged data; pulling them in is cheaper than a
    // helper call per field, and failure just means a short packet. (No
    // `end - start` here: pointer subtraction needs CAP_PERFMON.)
    let want = if ctx.len() < PULL_LEN {
        ctx.len()
    } else {
        PULL_LEN
    };
    if !has_bytes(start, end, 0, want as usize) {
        let _ = ctx.pull_data(want);
        start = ctx.data();
        end = ctx.data_end();
    }

    let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return Ok(drop_if_enforced(&ep, dir, ifindex, reason::MALFORMED));
    };
    // SAFETY: bounds checked by ptr_at.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type_be });
    match ether_type {
        ETH_P_IP => {}
        ETH_P_ARP => {
            count(reason::NOT_IP);
            return Ok(true);
        }
        ETH_P_IPV6 => return Ok(ipv6(&ep, dir, ifindex, start, end)),
        _ => return Ok(drop_if_enforced(&ep, dir, ifindex, reason::UNSUPPORTED_L3)),
    }

    let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN) else {
        return Ok(drop_if_enforced(&ep, dir, ifindex, reason::MALFORMED));
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
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 || (tot_len as usize) < ihl {
        return Ok(drop_if_enforced(&ep, dir, ifindex, reason::MALFORMED));
    }

    // Anti-spoofing holds for every registered pod, enforced or not.
    if dir == DIR_EGRESS && saddr != ep.ipv4 {
        let flow = Flow {
            key: ct_key(saddr, daddr, 0, 0, protocol, dir),
            tcp_flags: 0,
        };
        let d = drop_decision(&ep, reason::SPOOFED_SOURCE, 0, own_side(&ep, dir));
        finish(&ep, ifindex, &flow, &d);
        return Ok(false);
    }

    let frag_key = FragKey {
        saddr,
        daddr,
        id_be,
        protocol,
        scope: dir,
    };
    let offset = frag_off & IP_OFFSET_MASK;
    if offset != 0 {
        return Ok(later_fragment(
            &ep, dir, ifindex, &frag_key, saddr, daddr, protocol,
        ));
    }

    let l4 = ETH_HLEN + ihl;
    // Bytes of the datagram after the IP header. The transport header must
    // lie inside the datagram, not merely inside the frame: the receiving
    // stack trims the frame to the total length, so a header that only a
    // trailer completes (RFC 1858 tiny first fragment) would be judged on
    // bytes the pod never sees, e.g. TCP flags the next fragment replaces.
    let l4_room = tot_len as usize - ihl;
    let mut flow = Flow {
        key: ct_key(saddr, daddr, 0, 0, protocol, dir),
        tcp_flags: 0,
    };
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
    if !parsed {
        return Ok(drop_if_enforced(&ep, dir, ifindex, reason::MALFORMED));
    }

    let pass = track_and_decide(&ep, dir, ifindex, &flow);
    if frag_off & IP_MF != 0 {
        // First fragment: the rest of the datagram inherits this verdict.
        let v = FragValue {
            // SAFETY: helper without preconditions.
            expires_ns: unsafe { bpf_ktime_get_ns() } + FRAG_TIMEOUT_NS,
            verdict: if pass {
                VERDICT_ALLOW as u32
            } else {
                VERDICT_DROP as u32
            },
            _pad: 0,
        };
        let _ = FRAGMENTS.insert(&frag_key, &v, 0);
    }
    Ok(pass)
}

#[inline(always)]
fn ct_key(saddr: u32, daddr: u32, sport_be: u16, dport_be: u16, protocol: u8, scope: u8) -> CtKey {
    CtKey {
        saddr,
        daddr,
        sport_be,
        dport_be,
        protocol,
        scope,
        _pad: 0,
    }
}

#[inline(always)]
fn opposite(dir: u8) -> u8 {
    if dir == DIR_EGRESS {
        DIR_INGRESS
    } else {
        DIR_EGRESS
    }
}

/// Conntrack first (known flows and replies pass without a policy lookup),
/// then policy for a new flow, which is recorded when admitted.
#[inline(always)]
fn track_and_decide(ep: &EndpointInfo, dir: u8, ifindex: u32, flow: &Flow) -> bool {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = &flow.key;
    let is_tcp = key.protocol == PROTO_TCP;

    if let Some(p) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: valid map value pointer; concurrent updates of these
        // fields race benignly (last writer wins on a timestamp).
        let ct = unsafe { &mut *p };
        if ct.expires_ns > now && !(is_tcp && tcp_reopens(ct.tcp_state, flow.tcp_flags)) {
            refresh(ct, key.protocol, flow.tcp_flags, false, now);
            count(reason::ESTABLISHED);
            return true;
        }
    }
    if let Some(p) = CONNTRACK.get_ptr_mut(&key.reversed(opposite(dir))) {
        // SAFETY: as above.
        let ct = unsafe { &mut *p };
        // A SYN from the peer on a closed tuple is a new connection too.
        if ct.expires_ns > now && !(is_tcp && tcp_reopens(ct.tcp_state, flow.tcp_flags)) {
            refresh(ct, key.protocol, flow.tcp_flags, true, now);
            ct.flags |= CT_SEEN_REPLY;
            count(reason::REPLY);
            return true;
        }
    }

    let d = decide(ep, dir, key);
    if d.pass {
        let state = if is_tcp {
            tcp_next_state(0, flow.tcp_flags, false)
        } else {
            0
        };
        let v = CtValue {
            expires_ns: now + timeout_ns(key.protocol, state),
            cookie: d.cookie,
            tcp_state: state,
            flags: if d.verdict == VERDICT_AUDIT {
                CT_AUDIT
            } else {
                0
            },
            _pad: 0,
        };
        let _ = CONNTRACK.insert(key, &v, 0);
    }
    finish(ep, ifindex, flow, &d);
    d.pass
}

#[inline(always)]
fn refresh(ct: &mut CtValue, protocol: u8, tcp_flags: u8, reply: bool, now: u64) {
    if protocol == PROTO_TCP {
        ct.tcp_state = tcp_next_state(ct.tcp_state, tcp_flags, reply);
    }
    ct.expires_ns = now + timeout_ns(protocol, ct.tcp_state);
}

/// Policy verdict for the first packet of a flow.
#[inline(always)]
fn decide(ep: &EndpointInfo, dir: u8, key: &CtKey) -> Decision {
    let remote = if dir == DIR_EGRESS {
        key.daddr
    } else {
        key.saddr
    };
    let peer = match IPCACHE.get(Key::new(32, remote)) {
        Some(v) => *v,
        None => IpcacheValue {
            identity: IDENTITY_WORLD,
            cidr_identity: IDENTITY_WORLD,
        },
    };
    let (src_identity, dst_identity) = if dir == DIR_EGRESS {
        (ep.identity, peer.identity)
    } else {
        (peer.identity, ep.identity)
    };
    let allow = |reason, cookie| Decision {
        pass: true,
        verdict: VERDICT_ALLOW,
        reason,
        cookie,
        src_identity,
        dst_identity,
    };

    if !ep.enforced(dir) {
        return allow(reason::UNENFORCED, 0);
    }
    // NetworkPolicy: traffic between a pod and its own node is always allowed.
    if peer.identity == IDENTITY_HOST {
        return allow(reason::HOST, 0);
    }

    let dport_be = match key.protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => key.dport_be,
        _ => 0,
    };
    let mut pk = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey {
            endpoint_id: ep.endpoint_id,
            peer_identity: peer.identity,
            direction: dir,
            protocol: key.protocol,
            dport_be,
        },
    );
    // Exact peer, then the peer's CIDR identity (ipBlock), then any peer.
    let mut hit = POLICY.get(&pk).copied();
    if hit.is_none() && peer.cidr_identity != peer.identity && peer.cidr_identity != IDENTITY_ANY {
        pk.data.peer_identity = peer.cidr_identity;
        hit = POLICY.get(&pk).copied();
    }
    if hit.is_none() {
        pk.data.peer_identity = IDENTITY_ANY;
        hit = POLICY.get(&pk).copied();
    }
    match hit {
        Some(v) if v.action == ACTION_ALLOW => allow(reason::POLICY_ALLOW, v.cookie),
        Some(v) => drop_decision(
            ep,
            reason::DENY_RULE,
            v.cookie,
            (src_identity, dst_identity),
        ),
        None => drop_decision(ep, reason::NO_POLICY_MATCH, 0, (src_identity, dst_identity)),
    }
}

/// Identities for a verdict reached before the peer was looked up.
#[inline(always)]
fn own_side(ep: &EndpointInfo, dir: u8) -> (u32, u32) {
    if dir == DIR_EGRESS {
        (ep.identity, 0)
    } else {
        (0, ep.identity)
    }
}

/// A drop, or in audit mode a pass that is reported as AUDIT.
#[inline(always)]
fn drop_decision(ep: &EndpointInfo, why: u8, cookie: u32, ids: (u32, u32)) -> Decision {
    let (src_identity, dst_identity) = ids;
    let audit = ep.flags & EP_AUDIT != 0 && why != reason::SPOOFED_SOURCE;
    Decision {
        pass: audit,
        verdict: if audit { VERDICT_AUDIT } else { VERDICT_DROP },
        reason: why,
        cookie,
        src_identity,
        dst_identity,
    }
}

/// Non-first fragments carry no ports: they get their first fragment's verdict.
#[inline(always)]
fn later_fragment(
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    key: &FragKey,
    saddr: u32,
    daddr: u32,
    protocol: u8,
) -> bool {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(p) = FRAGMENTS.get_ptr(key) {
        // SAFETY: valid map value pointer.
        let v = unsafe { *p };
        if v.expires_ns > now {
            if v.verdict == VERDICT_ALLOW as u32 {
                count(reason::FRAG_ALLOWED);
                return true;
            }
            // Every drop is reported, fragments of a denied datagram too.
            let mut d = drop_decision(ep, reason::FRAG_DENIED, 0, own_side(ep, dir));
            d.pass = false;
            d.verdict = VERDICT_DROP;
            finish(ep, ifindex, &frag_flow(saddr, daddr, protocol, dir), &d);
            return false;
        }
    }
    if !ep.enforced(dir) {
        return true;
    }
    let d = drop_decision(ep, reason::FRAG_UNTRACKED, 0, own_side(ep, dir));
    finish(ep, ifindex, &frag_flow(saddr, daddr, protocol, dir), &d);
    d.pass
}

/// Fragments carry no ports after the first.
#[inline(always)]
fn frag_flow(saddr: u32, daddr: u32, protocol: u8, dir: u8) -> Flow {
    Flow {
        key: ct_key(saddr, daddr, 0, 0, protocol, dir),
        tcp_flags: 0,
    }
}

/// IPv6 is not enforced yet, so it never reaches or leaves an enforced pod,
/// except neighbour discovery (ICMPv6 133..=137), which addressing needs.
#[inline(always)]
fn ipv6(ep: &EndpointInfo, dir: u8, ifindex: u32, start: usize, end: usize) -> bool {
    if !ep.enforced_any() {
        return true;
    }
    let nd = match (
        ptr_at::<u8>(start, end, ETH_HLEN + 6),
        ptr_at::<u8>(start, end, ETH_HLEN + IPV6_HLEN),
    ) {
        // SAFETY: bounds checked by ptr_at.
        (Some(nh), Some(t)) => unsafe { *nh == IPPROTO_ICMPV6 && (133..=137).contains(&*t) },
        _ => false,
    };
    if nd {
        count(reason::NOT_IP);
        return true;
    }
    let flow = Flow {
        key: ct_key(0, 0, 0, 0, 0, dir),
        tcp_flags: 0,
    };
    let mut d = drop_decision(ep, reason::IPV6_UNSUPPORTED, 0, own_side(ep, dir));
    // Audit mode does not open an IPv6 bypass either.
    d.pass = false;
    d.verdict = VERDICT_DROP;
    finish(ep, ifindex, &flow, &d);
    false
}

#[inline(always)]
fn drop_if_enforced(ep: &EndpointInfo, dir: u8, ifindex: u32, why: u8) -> bool {
    if !ep.enforced(dir) {
        return true;
    }
    let flow = Flow {
        key: ct_key(0, 0, 0, 0, 0, dir),
        tcp_flags: 0,
    };
    let d = drop_decision(ep, why, 0, own_side(ep, dir));
    finish(ep, ifindex, &flow, &d);
    d.pass
}

/// Count the verdict and report it: one event per new flow or drop.
#[inline(always)]
fn finish(ep: &EndpointInfo, ifindex: u32, flow: &Flow, d: &Decision) {
    count(d.reason);
    match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut e) => {
            e.write(FlowEvent {
                // SAFETY: helper without preconditions.
                ts_ns: unsafe { bpf_ktime_get_ns() },
                endpoint_id: ep.endpoint_id,
                ifindex,
                saddr: flow.key.saddr,
                daddr: flow.key.daddr,
                sport_be: flow.key.sport_be,
                dport_be: flow.key.dport_be,
                protocol: flow.key.protocol,
                direction: flow.key.scope,
                verdict: d.verdict,
                reason: d.reason,
                src_identity: d.src_identity,
                dst_identity: d.dst_identity,
                cookie: d.cookie,
                _pad: 0,
            });
            e.submit(wakeup_flags());
        }
        None => count(reason::EVENTS_LOST),
    }
}

/// Waking the reader on every record costs microseconds per new flow; the
/// agent polls the ring on a short interval instead, and is woken only when
/// a backlog builds up (bpf_ringbuf_query(BPF_RB_AVAIL_DATA)).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
const WAKEUP_BACKLOG: u64 = 64 * 1024;

#[inline(always)]
fn wakeup_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BACKLOG {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
fn count(r: u8) {
    if let Some(c) = COUNTERS.get_ptr_mut(r as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
