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

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key, programs::TcContext};
use palisade_common::{
    decision::{
        ct_key, ct_use, decide, drop_if_enforced as enforced_drop, empty_key,
        first_fragment_verdict, flow_event, hard_drop, is_neighbour_discovery,
        later_fragment_verdict, new_ct_entry, peer_or_world, remote_addr, spoofed, track, Decision,
    },
    reason, CtKey, EndpointInfo, EndpointKey, FlowEvent, FragKey, FragValue, POLICY_PREFIX_FULL,
    PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
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

#[inline(always)]
pub fn process<const DRY: bool>(ctx: &TcContext, dir: u8) -> Result<bool, ()> {
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
        return Ok(drop_if_enforced::<DRY>(
            &ep,
            dir,
            ifindex,
            reason::MALFORMED,
        ));
    };
    // SAFETY: bounds checked by ptr_at.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type_be });
    match ether_type {
        ETH_P_IP => {}
        ETH_P_ARP => {
            count::<DRY>(reason::NOT_IP);
            return Ok(true);
        }
        ETH_P_IPV6 => return Ok(ipv6::<DRY>(&ep, dir, ifindex, start, end)),
        _ => {
            return Ok(drop_if_enforced::<DRY>(
                &ep,
                dir,
                ifindex,
                reason::UNSUPPORTED_L3,
            ))
        }
    }

    let Some(ip) = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN) else {
        return Ok(drop_if_enforced::<DRY>(
            &ep,
            dir,
            ifindex,
            reason::MALFORMED,
        ));
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
        return Ok(drop_if_enforced::<DRY>(
            &ep,
            dir,
            ifindex,
            reason::MALFORMED,
        ));
    }

    // Anti-spoofing holds for every registered pod, enforced or not.
    if let Some(d) = spoofed(&ep, dir, saddr) {
        let flow = Flow {
            key: ct_key(saddr, daddr, 0, 0, protocol, dir),
            tcp_flags: 0,
        };
        finish::<DRY>(&ep, ifindex, &flow, &d);
        return Ok(d.pass);
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
        return Ok(later_fragment::<DRY>(
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
        return Ok(drop_if_enforced::<DRY>(
            &ep,
            dir,
            ifindex,
            reason::MALFORMED,
        ));
    }

    let pass = track_and_decide::<DRY>(&ep, dir, ifindex, &flow);
    if !DRY && frag_off & IP_MF != 0 {
        // First fragment: the rest of the datagram inherits this verdict.
        // SAFETY: helper without preconditions.
        let (expires_ns, verdict) = first_fragment_verdict(pass, unsafe { bpf_ktime_get_ns() });
        let v = FragValue {
            expires_ns,
            verdict,
            _pad: 0,
        };
        let _ = FRAGMENTS.insert(&frag_key, &v, 0);
    }
    Ok(pass)
}

/// Conntrack first (known flows and replies pass without a policy lookup),
/// then policy for a new flow, which is recorded when admitted.
#[inline(always)]
fn track_and_decide<const DRY: bool>(
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    flow: &Flow,
) -> bool {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = &flow.key;

    let known = if DRY {
        None
    } else {
        track(key, dir, |k, reply| {
            let p = CONNTRACK.get_ptr_mut(k)?;
            // SAFETY: valid map value pointer; concurrent updates of these
            // fields race benignly (last writer wins on a timestamp).
            let ct = unsafe { &mut *p };
            ct_use(ct, k.protocol, flow.tcp_flags, reply, now).then_some(ct.cookie)
        })
    };
    if let Some((why, _)) = known {
        count::<DRY>(why);
        return true;
    }

    let peer = peer_or_world(IPCACHE.get(Key::new(32, remote_addr(key, dir))).copied());
    let d = decide(ep, dir, key, &peer, |pk| {
        POLICY.get(&Key::new(POLICY_PREFIX_FULL, *pk)).copied()
    });
    if d.pass && !DRY {
        let v = new_ct_entry(&d, key.protocol, flow.tcp_flags, now);
        let _ = CONNTRACK.insert(key, &v, 0);
    }
    finish::<DRY>(ep, ifindex, flow, &d);
    d.pass
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
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(p) = FRAGMENTS.get_ptr(key) {
        // SAFETY: valid map value pointer.
        let v = unsafe { *p };
        match later_fragment_verdict(v.expires_ns, v.verdict, now) {
            Some(true) => {
                count::<DRY>(reason::FRAG_ALLOWED);
                return true;
            }
            Some(false) => {
                // Every drop is reported, fragments of a denied datagram too.
                let d = hard_drop(ep, reason::FRAG_DENIED, dir);
                finish::<DRY>(ep, ifindex, &frag_flow(saddr, daddr, protocol, dir), &d);
                return false;
            }
            None => {}
        }
    }
    let Some(d) = enforced_drop(ep, dir, reason::FRAG_UNTRACKED) else {
        return true;
    };
    finish::<DRY>(ep, ifindex, &frag_flow(saddr, daddr, protocol, dir), &d);
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
fn ipv6<const DRY: bool>(
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    start: usize,
    end: usize,
) -> bool {
    if !ep.enforced_any() {
        return true;
    }
    let nd = match (
        ptr_at::<u8>(start, end, ETH_HLEN + 6),
        ptr_at::<u8>(start, end, ETH_HLEN + IPV6_HLEN),
    ) {
        // SAFETY: bounds checked by ptr_at.
        (Some(nh), Some(t)) => unsafe { is_neighbour_discovery(*nh, *t) },
        _ => false,
    };
    if nd {
        count::<DRY>(reason::NOT_IP);
        return true;
    }
    let flow = Flow {
        key: empty_key(dir),
        tcp_flags: 0,
    };
    // Audit mode does not open an IPv6 bypass either.
    let d = hard_drop(ep, reason::IPV6_UNSUPPORTED, dir);
    finish::<DRY>(ep, ifindex, &flow, &d);
    false
}

#[inline(always)]
fn drop_if_enforced<const DRY: bool>(ep: &EndpointInfo, dir: u8, ifindex: u32, why: u8) -> bool {
    let Some(d) = enforced_drop(ep, dir, why) else {
        return true;
    };
    let flow = Flow {
        key: empty_key(dir),
        tcp_flags: 0,
    };
    finish::<DRY>(ep, ifindex, &flow, &d);
    d.pass
}

/// Count the verdict and report it: one event per new flow or drop.
#[inline(always)]
fn finish<const DRY: bool>(ep: &EndpointInfo, ifindex: u32, flow: &Flow, d: &Decision) {
    if DRY {
        return;
    }
    count::<DRY>(d.reason);
    match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut e) => {
            e.write(flow_event(
                // SAFETY: helper without preconditions.
                unsafe { bpf_ktime_get_ns() },
                ep.endpoint_id,
                ifindex,
                &flow.key,
                d,
            ));
            e.submit(wakeup_flags());
        }
        None => count::<DRY>(reason::EVENTS_LOST),
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
fn count<const DRY: bool>(r: u8) {
    if DRY {
        return;
    }
    if let Some(c) = COUNTERS.get_ptr_mut(r as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
