//! IPv6 Service translation: `verdict.rs`'s `service_flow`, `known_flow`
//! and the translated branch of its conntrack stage, over the IPv6 maps
//! (`SVC_FRONTENDS6`, `SVC_BACKENDS6`, `SVC_NAT6`, `SVC_AFFINITY6`) with
//! the same rules (`palisade_common::service`, generic over the address).
//! Headers are edited through helpers at the transport offset the
//! extension-header walk found, so a flow with extension headers is
//! translated like any other.
//!
//! Each stage is a BPF subprogram taking at most five arguments; the rest
//! of what it needs (interface, clock, transport offset, the redirect it
//! may ask for) travels in the per-CPU scratch slot (`Scratch6`).

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use palisade_common::{
    decision::{decide, hard_drop, new_ct_entry, refresh, Decision},
    reason,
    reject::{port_unreachable6, ANSWER6_LEN, QUOTE6_LEN},
    service::{
        affinity_holds, reverse_key, translated, SvcAffinity6, SvcAffinityKey6, SvcFrontend,
        SvcFrontendKey6, SvcNat6, HAIRPIN_ADDR6, HAIRPIN_PEER, NAT_HAIRPIN,
    },
    CtKey6, CtValue, EndpointInfo, Ip6, CT_SVC_NAT, DIR_EGRESS, DIR_INGRESS, IDENTITY_HOST,
    IDENTITY_REMOTE_NODE, PROTO_TCP, PROTO_UDP,
};

use crate::{
    headers::ETH_HLEN,
    service::{l4_csum, set_port, swap_macs, BPF_F_PSEUDO_HDR},
    verdict::{
        charge, count, ct_track, lookup, pick_slot, policy, rejudge, translated_entry_idle, Family,
    },
    verdict6::Scratch6,
    CONNTRACK6, SVC_AFFINITY6, SVC_BACKENDS6, SVC_FRONTENDS6, SVC_NAT6,
};

const IP6_SADDR_OFF: usize = ETH_HLEN + 8;
const IP6_DADDR_OFF: usize = ETH_HLEN + 24;
/// `known`'s answers.
pub const KNOWN_NEW: u8 = 0;
pub const KNOWN_PASS: u8 = 1;
pub const KNOWN_DROP: u8 = 2;

/// The frontend a new flow leaving a pod is addressed to, into `s.fe`: a
/// ClusterIP, external or load-balancer address, else a NodePort (its
/// frontend at `::`, served on every node address: `host` and
/// `remote-node`). When there is one, `s.orig` holds the flow's tuple,
/// and `s.nat` the flow's translation if one lives on (its original
/// tuple's conntrack entry was evicted): then `s.flow.key` is the
/// translated tuple, for the caller to track (`track6`) and
/// `resume`.
#[inline(never)]
pub fn frontend(s: *mut Scratch6) -> u8 {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    let k = &sc.flow.key;
    if k.protocol != PROTO_TCP && k.protocol != PROTO_UDP {
        return FRONTEND_NONE;
    }
    let mut fk = SvcFrontendKey6 {
        addr: k.daddr,
        port_be: k.dport_be,
        protocol: k.protocol,
        _pad: 0,
    };
    let fe = match lookup(&SVC_FRONTENDS6, &fk) {
        Some(fe) => fe,
        None => {
            fk.addr = [0; 4];
            let Some(fe) = lookup(&SVC_FRONTENDS6, &fk) else {
                return FRONTEND_NONE;
            };
            let node = crate::verdict6::ipcache6(k.daddr)
                .is_some_and(|v| v.identity == IDENTITY_HOST || v.identity == IDENTITY_REMOTE_NODE);
            if !node {
                return FRONTEND_NONE;
            }
            fe
        }
    };
    sc.fe = fe;
    sc.orig = sc.flow.key;
    sc.flow.svc = fe.service_id;
    match SVC_NAT6.get_ptr(&sc.orig) {
        Some(n) => {
            // SAFETY: a valid map value pointer (RCU), copied at once.
            sc.nat = unsafe { *n };
            sc.flow.key = translated(&sc.orig, sc.nat.addr, sc.nat.port_be);
            FRONTEND_LIVE
        }
        None => FRONTEND_NEW,
    }
}

/// `frontend`'s answers.
pub const FRONTEND_NONE: u8 = 0;
/// A new flow to `s.fe`: `new_flow`.
pub const FRONTEND_NEW: u8 = 1;
/// A flow whose translation lives on: `track6` the translated tuple,
/// then `resume` (tracked) or `new_flow` (not).
pub const FRONTEND_LIVE: u8 = 2;

/// A new flow to frontend `s.fe`: a backend, policy on it, the
/// translation entries, the rewrite. Without a ready backend it is
/// dropped with its own reason and answered as kube-proxy answers (ICMPv6
/// port unreachable). Split in subprograms, each with a small stack
/// frame: the frames of a chain of calls share 512 bytes.
#[inline(never)]
pub fn new_flow(ctx: &TcContext, ep: &EndpointInfo, s: *mut Scratch6) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    sc.flow.key = sc.orig;
    if !pick_backend(s) {
        return no_backend(ctx, ep, s);
    }
    judge(ep, s) && commit(ctx, ep, s)
}

/// A flow whose translation lived on and whose translated tuple is
/// tracked (`frontend`, `track6`): its original tuple's entry again, the
/// rewrite to the backend it had.
#[inline(never)]
pub fn resume(ctx: &TcContext, ep: &EndpointInfo, s: *mut Scratch6) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    sc.flow.key = sc.orig;
    let mut v = CtValue {
        expires_ns: 0,
        cookie: sc.cookie,
        tcp_state: 0,
        flags: CT_SVC_NAT,
        generation: ep.generation,
        ..CtValue::default()
    };
    refresh(&mut v, sc.orig.protocol, sc.flow.tcp_flags, false, sc.now);
    let _ = CONNTRACK6.insert(&sc.orig, &v, 0);
    translate(ctx, s)
}

/// No ready backend: dropped with its own reason, answered when it may be.
#[inline(never)]
fn no_backend(ctx: &TcContext, ep: &EndpointInfo, s: *mut Scratch6) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    let d = hard_drop(ep, reason::NO_SERVICE_BACKEND, DIR_EGRESS);
    Ip6::report::<false>(ep, sc.ifindex, &sc.flow, &d);
    if sc.flow.answerable {
        if let Ok(act) = reject(ctx, s) {
            sc.redirect = act;
            return true;
        }
    }
    false
}

/// Policy on the flow to its backend (`s.backend`); the flow's key
/// becomes the translated tuple. Reports a denial.
#[inline(never)]
fn judge(ep: &EndpointInfo, s: *mut Scratch6) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let s = unsafe { &mut *s };
    let hairpin = s.backend.addr == ep.ipv6;
    s.flow.key = translated(&s.orig, s.backend.addr, s.backend.port_be);
    let d: Decision = if hairpin {
        decide(ep, DIR_EGRESS, &s.flow.key, &HAIRPIN_PEER, |_, _| None)
    } else {
        policy(ep, DIR_EGRESS, &s.flow.key)
    };
    s.judged = d;
    if !d.pass {
        Ip6::report::<false>(ep, s.ifindex, &s.flow, &d);
    }
    d.pass
}

/// An admitted translated flow: charged, its translation and conntrack
/// entries written, its affinity noted, reported, rewritten.
#[inline(never)]
fn commit(ctx: &TcContext, ep: &EndpointInfo, s: *mut Scratch6) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    if !charge(ep, DIR_EGRESS, sc.orig.saddr, 2, false) {
        let d = hard_drop(ep, reason::CT_BUDGET, DIR_EGRESS);
        Ip6::report::<false>(ep, sc.ifindex, &sc.flow, &d);
        return false;
    }
    let hairpin = sc.backend.addr == ep.ipv6;
    let flags = if hairpin { NAT_HAIRPIN } else { 0 };
    sc.nat = SvcNat6 {
        addr: sc.backend.addr,
        port_be: sc.backend.port_be,
        flags,
        _pad: 0,
        service_id: sc.fe.service_id,
    };
    if SVC_NAT6.insert(&sc.orig, &sc.nat, 0).is_err() || !reverse_entry(s) {
        let d = hard_drop(ep, reason::SVC_NAT_FAILED, DIR_EGRESS);
        Ip6::report::<false>(ep, sc.ifindex, &sc.flow, &d);
        return false;
    }
    // As IPv4: the translated tuple's entry (policy's verdict, replies)
    // and the original tuple's, which says "translate".
    let mut v = new_ct_entry(ep, &sc.judged, sc.orig.protocol, sc.flow.tcp_flags, sc.now);
    v.flags |= CT_SVC_NAT;
    let _ = CONNTRACK6.insert(&sc.flow.key, &v, 0);
    let _ = CONNTRACK6.insert(&sc.orig, &v, 0);
    if sc.fe.affinity_s != 0 {
        let a = SvcAffinity6 {
            last_ns: sc.now,
            slot: sc.slot,
            port_be: sc.backend.port_be,
            _pad: 0,
            addr: sc.backend.addr,
        };
        let _ = SVC_AFFINITY6.insert(&affinity_key(&sc.orig, &sc.fe), &a, 0);
    }
    count::<false>(reason::SVC_TRANSLATED);
    let d = sc.judged;
    Ip6::report::<false>(ep, sc.ifindex, &sc.flow, &d);
    translate(ctx, s)
}

/// The reverse translation entry of a new flow (`s.orig` to `s.backend`,
/// forward translation `s.nat`).
#[inline(never)]
fn reverse_entry(s: *mut Scratch6) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    let hairpin = sc.nat.flags & NAT_HAIRPIN != 0;
    let rev = SvcNat6 {
        addr: sc.orig.daddr,
        port_be: sc.orig.dport_be,
        flags: sc.nat.flags,
        _pad: 0,
        service_id: sc.nat.service_id,
    };
    let rk = reverse_key(&sc.orig, sc.backend.addr, sc.backend.port_be, hairpin);
    SVC_NAT6.insert(&rk, &rev, 0).is_ok()
}

/// `track6`'s answers.
pub const TRACK_NONE: u8 = 0;
pub const TRACK_PASS: u8 = 1;
pub const TRACK_DROP: u8 = 2;

/// Conntrack of `s.flow.key` in `dir`, a stale entry judged again
/// (`rejudge`); the entry's cookie into `s.cookie`.
#[inline(never)]
pub fn track6(ep: &EndpointInfo, s: *mut Scratch6, dir: u8) -> u8 {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    let (mut f, mut st) = (0, 0);
    let Some(t) = ct_track(
        ep,
        &sc.flow.key,
        dir,
        sc.flow.tcp_flags,
        sc.now,
        &mut f,
        &mut st,
    ) else {
        return TRACK_NONE;
    };
    sc.cookie = t.cookie;
    if t.stale && !rejudge(ep, sc.ifindex, &mut sc.flow, &t, f, None, sc.now) {
        return TRACK_DROP;
    }
    count::<false>(t.why);
    TRACK_PASS
}

/// A packet conntrack passed, of a flow whose entry has flags `s.ct_flags`:
/// a translated flow's later packets go to their backend (the translated
/// tuple's entry following the handshake and the close), its replies come
/// back from the ClusterIP, a hairpin's replies turn back into the pod.
/// `KNOWN_NEW`: the translation was evicted, a new flow again.
#[inline(never)]
pub fn known(ctx: &TcContext, s: *mut Scratch6, dir: u8) -> u8 {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    let Some(n) = SVC_NAT6.get_ptr(&sc.flow.key) else {
        // An evicted forward entry: a new flow again. An evicted reverse
        // one: the client drops a reply from the backend's address anyway.
        return if dir == DIR_EGRESS && sc.ct_flags & CT_SVC_NAT != 0 {
            KNOWN_NEW
        } else {
            KNOWN_PASS
        };
    };
    // SAFETY: a valid map value pointer (RCU), copied at once.
    sc.nat = unsafe { *n };
    let l4 = sc.l4 as usize;
    if sc.ct_flags & CT_SVC_NAT == 0 {
        // A hairpin's reply (to `HAIRPIN_ADDR6`, at the pod's egress).
        return match hairpin_reply(ctx, s, l4) {
            Ok(act) => {
                sc.redirect = act;
                KNOWN_PASS
            }
            Err(()) => KNOWN_DROP,
        };
    }
    if dir == DIR_INGRESS {
        return pass_if(reverse(ctx, s, l4).is_ok());
    }
    KNOWN_FORWARD
}

/// `known`'s answer for a later packet of a translated flow: `follow`.
pub const KNOWN_FORWARD: u8 = 3;

/// A later packet of a translated flow, by its original tuple (`s.nat`
/// its translation): true when the translated tuple's entry must follow
/// it (the handshake and the close, or a stale entry; an established TCP
/// flow's plain segments leave it to the replies, which refresh it), and
/// then `s.flow.key` is that tuple, for the caller to `track6`.
#[inline(never)]
pub fn follow(s: *mut Scratch6) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    sc.orig = sc.flow.key;
    if sc.ct_stale || !translated_entry_idle(sc.orig.protocol, sc.ct_state, sc.flow.tcp_flags) {
        sc.flow.key = translated(&sc.orig, sc.nat.addr, sc.nat.port_be);
        sc.flow.svc = sc.nat.service_id;
        return true;
    }
    false
}

/// After `follow` (and `track6` with its answer `tracked`): the rewrite
/// to the backend, or, when the translated flow was judged again and
/// denied, the drop of its original tuple's entry too.
#[inline(never)]
pub fn forward(ctx: &TcContext, s: *mut Scratch6, tracked: u8) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    sc.flow.key = sc.orig;
    if tracked == TRACK_DROP {
        let _ = CONNTRACK6.remove(&sc.orig);
        return false;
    }
    translate(ctx, s)
}

#[inline(always)]
fn pass_if(ok: bool) -> u8 {
    if ok {
        KNOWN_PASS
    } else {
        KNOWN_DROP
    }
}

/// The backend of a new flow (`verdict.rs`'s `pick_backend`), into
/// `s.slot` and `s.backend`; false when the frontend has none.
#[inline(never)]
fn pick_backend(s: *mut Scratch6) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let s = unsafe { &mut *s };
    let fe = s.fe;
    let pinned = if fe.affinity_s != 0 {
        lookup(&SVC_AFFINITY6, &affinity_key(&s.orig, &fe))
            .filter(|a| affinity_holds(a.last_ns, fe.affinity_s, s.now))
            .map(|a| (a.slot, a.addr, a.port_be))
    } else {
        None
    };
    match pick_slot(&s.orig, &fe, pinned, |k| lookup(&SVC_BACKENDS6, k)) {
        Some((slot, b)) => {
            s.slot = slot;
            s.backend = b;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn affinity_key(orig: &CtKey6, fe: &SvcFrontend) -> SvcAffinityKey6 {
    SvcAffinityKey6 {
        client: orig.saddr,
        service_id: fe.service_id,
    }
}

/// Rewrites an admitted packet (`s.orig`) to its backend (`s.nat`); a
/// hairpin goes back out towards the pod (`s.redirect`).
#[inline(always)]
fn translate(ctx: &TcContext, s: *mut Scratch6) -> bool {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    if rewrite(ctx, &sc.orig, &sc.nat, sc.l4 as usize).is_err() {
        return false;
    }
    if sc.nat.flags & NAT_HAIRPIN != 0 {
        if swap_macs(ctx).is_err() {
            return false;
        }
        // SAFETY: helper without preconditions.
        sc.redirect = unsafe { bpf_redirect(sc.ifindex, 0) } as i32;
    }
    true
}

/// Replaces a 16-byte address, fixing the transport checksum (its
/// pseudo-header) word by word; IPv6 has no header checksum.
#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    off: usize,
    csum: (usize, u64),
    old: &Ip6,
    new: &Ip6,
) -> Result<(), ()> {
    let mut i = 0;
    while i < 4 {
        ctx.l4_csum_replace(
            csum.0,
            old[i] as u64,
            new[i] as u64,
            csum.1 | BPF_F_PSEUDO_HDR | 4,
        )
        .map_err(|_| ())?;
        i += 1;
    }
    ctx.store(off, new, 0).map_err(|_| ())
}

/// Client -> ClusterIP:port becomes client -> backend:port (and, for a
/// hairpin, `HAIRPIN_ADDR6` -> the pod itself).
#[inline(never)]
fn rewrite(ctx: &TcContext, orig: &CtKey6, nat: &SvcNat6, l4: usize) -> Result<(), ()> {
    let csum = l4_csum(orig.protocol, l4).ok_or(())?;
    set_addr(ctx, IP6_DADDR_OFF, csum, &orig.daddr, &nat.addr)?;
    set_port(ctx, l4 + 2, csum, orig.dport_be, nat.port_be)?;
    if nat.flags & NAT_HAIRPIN != 0 {
        set_addr(ctx, IP6_SADDR_OFF, csum, &orig.saddr, &HAIRPIN_ADDR6)?;
    }
    Ok(())
}

/// A reply backend:port -> client (`s.flow.key`) becomes ClusterIP:port
/// -> client (`s.nat`).
#[inline(never)]
fn reverse(ctx: &TcContext, s: *mut Scratch6, l4: usize) -> Result<(), ()> {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &*s };
    let (key, nat) = (&sc.flow.key, &sc.nat);
    let csum = l4_csum(key.protocol, l4).ok_or(())?;
    set_addr(ctx, IP6_SADDR_OFF, csum, &key.saddr, &nat.addr)?;
    set_port(ctx, l4, csum, key.sport_be, nat.port_be)
}

/// A hairpinned reply (pod -> `HAIRPIN_ADDR6`, at the pod's own egress)
/// becomes ClusterIP:port -> pod and goes straight back into the pod.
#[inline(never)]
fn hairpin_reply(ctx: &TcContext, s: *mut Scratch6, l4: usize) -> Result<i32, ()> {
    reverse(ctx, s, l4)?;
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &*s };
    let csum = l4_csum(sc.flow.key.protocol, l4).ok_or(())?;
    set_addr(ctx, IP6_DADDR_OFF, csum, &HAIRPIN_ADDR6, &sc.flow.key.saddr)?;
    swap_macs(ctx)?;
    // SAFETY: helper called from tc ingress, as it requires.
    Ok(unsafe { bpf_redirect_peer(sc.ifindex, 0) } as i32)
}

/// kube-proxy's REJECT over IPv6: the packet becomes an ICMPv6 port
/// unreachable from the ClusterIP quoting its first bytes, handed back
/// into the pod. The caller checked that it may be answered (no extension
/// headers, no fragment, no reset). Both buffers live in the scratch slot.
#[inline(never)]
fn reject(ctx: &TcContext, s: *mut Scratch6) -> Result<i32, ()> {
    // SAFETY: this CPU's slot (see `Scratch6`).
    let sc = unsafe { &mut *s };
    // A constant length (the verifier refuses the wrapper's clamped one).
    // SAFETY: the destination is QUOTE6_LEN bytes of this CPU's slot.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            ETH_HLEN as u32,
            sc.quote.as_mut_ptr() as *mut _,
            QUOTE6_LEN as u32,
        )
    };
    if loaded != 0 {
        return Err(());
    }
    port_unreachable6(&sc.quote, &mut sc.answer);
    // SAFETY: the context pointer is valid for the program's whole run;
    // the helper grows or trims the frame to the answer's length.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + ANSWER6_LEN) as u32, 0) } != 0 {
        return Err(());
    }
    ctx.store(ETH_HLEN, &sc.answer, 0).map_err(|_| ())?;
    swap_macs(ctx)?;
    // SAFETY: helper called from tc ingress, as it requires.
    Ok(unsafe { bpf_redirect_peer(sc.ifindex, 0) } as i32)
}
