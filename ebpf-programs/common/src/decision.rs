//! The verdict rules of the tc programs, as plain functions over keys,
//! flags, states and identities: written once, called by the kernel
//! (`ebpf-programs/ebpf/src/verdict.rs`, with its maps) and by the userspace
//! reference evaluator (`palisade-dataplane::reference`, with its copies of
//! the maps). Packet parsing and map access stay with each caller; every
//! decision taken on what was parsed or looked up is made here.
//!
//! Everything is `#[inline(always)]` and takes or returns small `Copy`
//! values, so the kernel's code is what it was when these lived in
//! `verdict.rs`: no extra map lookups, no extra helper calls. Map lookups
//! are passed in as closures where the order of lookups is itself a rule
//! ([`policy_lookups`]).

use crate::{
    conntrack::{tcp_next_state, tcp_opens, tcp_reopens, timeout_ns},
    entry_class, is_label_identity, no_entries_bit, reason, CtKey, CtKeyOf, CtValue, EndpointInfo,
    FlowEvent, FlowEvent4, Ip6, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW, CT_AUDIT,
    CT_SEEN_REPLY, CT_VIA_STACK, DIR_EGRESS, DIR_INGRESS, EP_AUDIT, EP_VIA_STACK, FRAG_TIMEOUT_NS,
    IDENTITY_ANY, IDENTITY_ANY_POD, IDENTITY_HOST, IDENTITY_WORLD, IDENTITY_WORLD6,
    POLICY_PREFIX_FULL, PROTO_SCTP, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_AUDIT,
    VERDICT_DROP,
};

/// An address family's address as the programs keep it: `u32` (IPv4) or
/// [`Ip6`]. The rules below are written once for both.
pub trait Addr: Copy + PartialEq {
    /// `FlowEvent::family`.
    const FAMILY: u32;
    const ZERO: Self;
    /// The pod's own address of this family (zero when it has none).
    fn own(ep: &EndpointInfo) -> Self;
    /// The addresses of an event being written (`write_flow_event`).
    ///
    /// # Safety
    /// `ev` is valid for writes.
    unsafe fn set_event(ev: *mut FlowEvent, saddr: Self, daddr: Self);
    /// Broadcast or multicast: a destination many share.
    fn group(&self) -> bool;
    /// The address as IPv4 (`FlowEvent4`); zero for IPv6.
    fn v4(&self) -> u32;
}

impl Addr for u32 {
    const FAMILY: u32 = 4;
    const ZERO: Self = 0;
    #[inline(always)]
    fn own(ep: &EndpointInfo) -> Self {
        ep.ipv4
    }
    #[inline(always)]
    unsafe fn set_event(ev: *mut FlowEvent, saddr: Self, daddr: Self) {
        // SAFETY: as the caller promised.
        unsafe {
            (*ev).saddr = saddr;
            (*ev).daddr = daddr;
        }
    }
    #[inline(always)]
    fn group(&self) -> bool {
        // Network order: the first octet is the low byte.
        let first = (u32::from_be(*self) >> 24) as u8;
        *self == u32::MAX || (224..240).contains(&first)
    }
    #[inline(always)]
    fn v4(&self) -> u32 {
        *self
    }
}

impl Addr for Ip6 {
    const FAMILY: u32 = 6;
    const ZERO: Self = [0; 4];
    #[inline(always)]
    fn own(ep: &EndpointInfo) -> Self {
        ep.ipv6
    }
    #[inline(always)]
    unsafe fn set_event(ev: *mut FlowEvent, saddr: Self, daddr: Self) {
        // SAFETY: as the caller promised.
        unsafe {
            (*ev).saddr6 = saddr;
            (*ev).daddr6 = daddr;
        }
    }
    #[inline(always)]
    fn group(&self) -> bool {
        crate::ipv6::is_multicast(self)
    }
    #[inline(always)]
    fn v4(&self) -> u32 {
        0
    }
}

/// A verdict with what the event about it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// TC_ACT_OK (true) or TC_ACT_SHOT (false).
    pub pass: bool,
    /// `VERDICT_ALLOW`, `VERDICT_DROP` or `VERDICT_AUDIT`.
    pub verdict: u8,
    pub reason: u8,
    pub cookie: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
}

/// A conntrack key (also the event 5-tuple) for a packet seen by the
/// program of direction `scope` on the veth of endpoint `endpoint_id`.
#[inline(always)]
pub fn ct_key(
    endpoint_id: u32,
    saddr: u32,
    daddr: u32,
    sport_be: u16,
    dport_be: u16,
    protocol: u8,
    scope: u8,
) -> CtKey {
    CtKey {
        saddr,
        daddr,
        sport_be,
        dport_be,
        protocol,
        scope,
        _pad: 0,
        endpoint_id,
    }
}

/// The key events carry when the packet could not be parsed (malformed,
/// IPv6, unsupported L3): a zero 5-tuple in the program's scope.
#[inline(always)]
pub fn empty_key<A: Addr>(dir: u8) -> CtKeyOf<A> {
    key_of(0, A::ZERO, A::ZERO, 0, 0, 0, dir)
}

/// [`ct_key`] of either family.
#[inline(always)]
pub fn key_of<A>(
    endpoint_id: u32,
    saddr: A,
    daddr: A,
    sport_be: u16,
    dport_be: u16,
    protocol: u8,
    scope: u8,
) -> CtKeyOf<A> {
    CtKeyOf {
        saddr,
        daddr,
        sport_be,
        dport_be,
        protocol,
        scope,
        _pad: 0,
        endpoint_id,
    }
}

#[inline(always)]
pub fn opposite(dir: u8) -> u8 {
    if dir == DIR_EGRESS {
        DIR_INGRESS
    } else {
        DIR_EGRESS
    }
}

/// Only the pod itself may send from its veth: anything else is spoofed
/// and dropped (reported; never audited through). Holds for every
/// registered pod, enforced or not.
#[inline(always)]
pub fn spoofed<A: Addr>(ep: &EndpointInfo, dir: u8, saddr: A) -> Option<Decision> {
    // A pod without an address of this family has no source to send from.
    let own = A::own(ep);
    if dir == DIR_EGRESS && (saddr != own || own == A::ZERO) {
        Some(drop_decision(
            ep,
            reason::SPOOFED_SOURCE,
            0,
            own_side(ep, dir),
        ))
    } else {
        None
    }
}

/// A frame on its way to a pod must be addressed to that pod (or be
/// broadcast or multicast, which policy judges as usual): anything else
/// was sent to the pod's MAC by someone else (e.g. hairpinned back by a
/// bridge) and could plant conntrack state for a tuple that is not the
/// pod's. Dropped for every registered pod, enforced or not, never
/// audited through.
#[inline(always)]
pub fn foreign_destination<A: Addr>(ep: &EndpointInfo, dir: u8, daddr: A) -> Option<Decision> {
    if dir == DIR_INGRESS && (daddr != A::own(ep) || daddr == A::ZERO) && !daddr.group() {
        Some(hard_drop(ep, reason::NOT_OWN_DESTINATION, dir))
    } else {
        None
    }
}

/// Layer 2 of a frame on a pod's veth, where the CNI told the pod's MAC
/// (`EndpointInfo::mac`): from the pod, the source must be that MAC (one
/// sent as another MAC poisons a bridge's forwarding table and draws other
/// pods' frames, chained behind a bridge CNI); to the pod, a unicast
/// destination must be it. Dropped enforced or not, never audited through.
#[inline(always)]
pub fn foreign_mac(ep: &EndpointInfo, dir: u8, src: &[u8; 6], dst: &[u8; 6]) -> Option<Decision> {
    if ep.mac == [0; 6] {
        return None;
    }
    if dir == DIR_EGRESS {
        if *src != ep.mac {
            return Some(hard_drop(ep, reason::SPOOFED_MAC, dir));
        }
    } else if dst[0] & 1 == 0 && *dst != ep.mac {
        return Some(hard_drop(ep, reason::NOT_OWN_DESTINATION, dir));
    }
    None
}

/// An ARP packet from a pod speaks for the pod only: Ethernet/IPv4 ARP
/// (`hlen` 6, `plen` 4, else `malformed-header`), its sender protocol
/// address the pod's (or 0.0.0.0, an RFC 5227 probe) and its sender
/// hardware address the frame's source. Otherwise (an ARP reply or
/// gratuitous ARP claiming another pod's address) it is dropped as
/// `spoofed-mac`, enforced or not. ARP to the pod passes as before.
#[inline(always)]
pub fn arp_spoofed(
    ep: &EndpointInfo,
    dir: u8,
    (hlen, plen): (u8, u8),
    spa: u32,
    sha: &[u8; 6],
    src: &[u8; 6],
) -> Option<Decision> {
    if dir != DIR_EGRESS {
        return None;
    }
    if hlen != 6 || plen != 4 {
        return Some(hard_drop(ep, reason::MALFORMED, dir));
    }
    if (spa != ep.ipv4 && spa != 0) || sha != src {
        return Some(hard_drop(ep, reason::SPOOFED_MAC, dir));
    }
    None
}

/// UDP ports on which nodes decapsulate tunnelled packets: VXLAN (IANA
/// 4789, and 8472, Linux's default, palisade's and flannel's), Geneve.
pub const TUNNEL_PORTS: [u16; 3] = [4789, 6081, 8472];

/// A pod's UDP to a node's tunnel port: the node would decapsulate it and
/// forward the inner packet with whatever source it claims, past the pod's
/// anti-spoofing and policy (to this node's pods, or another node's). Not
/// traffic with its node that NetworkPolicy lets pass: dropped whatever is
/// enforced, never audited through.
#[inline(always)]
pub fn tunnel_from_pod<A>(
    ep: &EndpointInfo,
    dir: u8,
    key: &CtKeyOf<A>,
    peer: &IpcacheValue,
) -> Option<Decision> {
    let node = peer.identity == IDENTITY_HOST || peer.identity == crate::IDENTITY_REMOTE_NODE;
    let port = u16::from_be(key.dport_be);
    if dir == DIR_EGRESS
        && key.protocol == PROTO_UDP
        && node
        && (port == TUNNEL_PORTS[0] || port == TUNNEL_PORTS[1] || port == TUNNEL_PORTS[2])
    {
        let mut d = hard_drop(ep, reason::TUNNEL_FROM_POD, dir);
        d.dst_identity = peer.identity;
        Some(d)
    } else {
        None
    }
}

/// Host protection (`EP_HOST_PROTECTED`, off by default): a new flow from
/// the pod to its own node passes only on a port the node lists (a policy
/// entry of `HOST_PORTS_ENDPOINT`; one of its protocol with prefix
/// `POLICY_PREFIX_PROTO` opens every port), whatever is enforced and
/// whatever NetworkPolicy allows; otherwise it is dropped as
/// `host-protected`, never audited through. Replies to the node's own
/// flows (kubelet probes) ride on their conntrack entries; a hairpin (the
/// pod to itself through a Service) is not node traffic.
#[inline(always)]
pub fn host_protected<A: Addr>(
    ep: &EndpointInfo,
    dir: u8,
    key: &CtKeyOf<A>,
    peer: &IpcacheValue,
    mut lookup: impl FnMut(&PolicyKey, Reads) -> Option<PolicyValue>,
) -> Option<Decision> {
    if dir != DIR_EGRESS
        || ep.flags & crate::EP_HOST_PROTECTED == 0
        || peer.identity != IDENTITY_HOST
        || key.daddr == A::own(ep)
    {
        return None;
    }
    // The flow's own key (ports only where the protocol has them), under
    // the node's reserved endpoint.
    let mut pk = policy_key(ep, dir, key, peer);
    pk.endpoint_id = crate::HOST_PORTS_ENDPOINT;
    match lookup(&pk, Reads::ALL) {
        Some(v) if v.action == crate::ACTION_ALLOW => None,
        _ => {
            let mut d = hard_drop(ep, reason::HOST_PROTECTED, dir);
            d.dst_identity = IDENTITY_HOST;
            Some(d)
        }
    }
}

/// Whether the policy entry a pod's new flow to its own node hits first
/// denies it: NetworkPolicy never restricts that traffic, but a
/// ClusterNetworkPolicy can (a `nodes` or `networks` peer covering the
/// node, admin tier, or baseline where no NetworkPolicy decides). Such a
/// deny is any deny but the one the tier overlay writes for "isolated by
/// a NetworkPolicy, no rule matched" (`COOKIE_NP_ISOLATION`). Without
/// ClusterNetworkPolicies the map holds no denies: nothing changes.
#[inline(always)]
pub fn own_node_denied(v: &PolicyValue) -> bool {
    v.action != ACTION_ALLOW && v.cookie != crate::COOKIE_NP_ISOLATION
}

/// Identities for a verdict reached before the peer was looked up.
#[inline(always)]
pub fn own_side(ep: &EndpointInfo, dir: u8) -> (u32, u32) {
    if dir == DIR_EGRESS {
        (ep.identity, 0)
    } else {
        (0, ep.identity)
    }
}

/// The address the policy is about: the destination of what the pod sends,
/// the source of what it receives.
#[inline(always)]
pub fn remote_addr<A: Copy>(key: &CtKeyOf<A>, dir: u8) -> A {
    if dir == DIR_EGRESS {
        key.daddr
    } else {
        key.saddr
    }
}

/// An IPv4 address the ipcache has no prefix for is the outside world.
#[inline(always)]
pub fn peer_or_world(hit: Option<IpcacheValue>) -> IpcacheValue {
    peer_or(hit, IDENTITY_WORLD)
}

/// The same for IPv6: the IPv6 world ([`IDENTITY_WORLD6`]).
#[inline(always)]
pub fn peer_or_world6(hit: Option<IpcacheValue>) -> IpcacheValue {
    peer_or(hit, IDENTITY_WORLD6)
}

#[inline(always)]
fn peer_or(hit: Option<IpcacheValue>, world: u32) -> IpcacheValue {
    match hit {
        Some(v) => v,
        None => IpcacheValue {
            identity: world,
            cidr_identity: world,
        },
    }
}

/// (source, destination) identities of a flow of `ep` with `peer`.
#[inline(always)]
pub fn flow_identities(ep: &EndpointInfo, dir: u8, peer: u32) -> (u32, u32) {
    if dir == DIR_EGRESS {
        (ep.identity, peer)
    } else {
        (peer, ep.identity)
    }
}

#[inline(always)]
pub fn allow_decision(why: u8, cookie: u32, ids: (u32, u32)) -> Decision {
    Decision {
        pass: true,
        verdict: VERDICT_ALLOW,
        reason: why,
        cookie,
        src_identity: ids.0,
        dst_identity: ids.1,
    }
}

/// A drop, or in audit mode a pass that is reported as AUDIT. A spoofed
/// source is never audited through.
#[inline(always)]
pub fn drop_decision(ep: &EndpointInfo, why: u8, cookie: u32, ids: (u32, u32)) -> Decision {
    let audit = ep.flags & EP_AUDIT != 0 && why != reason::SPOOFED_SOURCE;
    Decision {
        pass: audit,
        verdict: if audit { VERDICT_AUDIT } else { VERDICT_DROP },
        reason: why,
        cookie,
        src_identity: ids.0,
        dst_identity: ids.1,
    }
}

/// A drop that audit mode does not turn into a pass: IPv6 to or from an
/// enforced pod, and the later fragments of a datagram whose first
/// fragment was denied (or audited).
#[inline(always)]
pub fn hard_drop(ep: &EndpointInfo, why: u8, dir: u8) -> Decision {
    let mut d = drop_decision(ep, why, 0, own_side(ep, dir));
    d.pass = false;
    d.verdict = VERDICT_DROP;
    d
}

/// The verdict on a packet this program cannot judge (malformed, an
/// unsupported L3, a later fragment without a valid first-fragment record):
/// `None` passes it silently in an unenforced direction, otherwise the drop
/// (reported; audit mode lets it through).
#[inline(always)]
pub fn drop_if_enforced(ep: &EndpointInfo, dir: u8, why: u8) -> Option<Decision> {
    if !ep.enforced(dir) {
        return None;
    }
    Some(drop_decision(ep, why, 0, own_side(ep, dir)))
}

/// A frame whose IPv4 source cannot be read (shorter than an IPv4
/// header): from a pod it never passes, enforced or not, audit or not,
/// since anti-spoofing cannot hold for it; towards a pod, dropped where
/// enforced as any malformed header.
#[inline(always)]
pub fn unchecked_source(ep: &EndpointInfo, dir: u8, why: u8) -> Option<Decision> {
    if dir == DIR_EGRESS {
        Some(hard_drop(ep, why, dir))
    } else {
        drop_if_enforced(ep, dir, why)
    }
}

/// The verdict before any policy lookup, if there is one: an unenforced
/// direction passes, and so does traffic between a pod and its own node
/// (NetworkPolicy never restricts it).
#[inline(always)]
pub fn pre_policy(ep: &EndpointInfo, dir: u8, peer: &IpcacheValue) -> Option<Decision> {
    let ids = flow_identities(ep, dir, peer.identity);
    if !ep.enforced(dir) {
        return Some(allow_decision(reason::UNENFORCED, 0, ids));
    }
    if peer.identity == IDENTITY_HOST {
        return Some(allow_decision(reason::HOST, 0, ids));
    }
    None
}

/// The full (96-bit) policy key of a new flow for the exact peer. Ports
/// count for TCP, UDP and SCTP only; other protocols look up port 0.
#[inline(always)]
pub fn policy_key<A>(
    ep: &EndpointInfo,
    dir: u8,
    key: &CtKeyOf<A>,
    peer: &IpcacheValue,
) -> PolicyKey {
    let dport_be = match key.protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => key.dport_be,
        _ => 0,
    };
    PolicyKey {
        endpoint_id: ep.endpoint_id,
        peer_identity: peer.identity,
        direction: dir,
        protocol: key.protocol,
        dport_be,
    }
}

/// Which parts of the policy map one lookup reads: the hash of one-port
/// entries (`POLICY_EXACT`), the trie of wider ones, or both (the hash
/// first: a hit there is the longest match). A part is left out when the
/// endpoint has no entry there that the lookup could hit
/// ([`crate::entry_class`]); a caller with one map reads it regardless.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reads {
    pub exact: bool,
    pub trie: bool,
}

impl Reads {
    pub const ALL: Self = Self {
        exact: true,
        trie: true,
    };
}

/// The policy lookups of a new flow, in order, stopping at the first hit
/// (allow or deny): the exact peer, then the peer's CIDR identity (so
/// ipBlock rules match pod addresses too), then any pod (only when the
/// peer is a pod: its identity is a label identity, see
/// [`is_label_identity`]), then any peer. `lookup` is one longest-prefix
/// match of the policy map with the given full key, reading the parts
/// [`Reads`] names. Parts `flags` (the endpoint's) say hold no entry of
/// the lookup's class in this direction ([`crate::no_entries_bit`]) are
/// not read, and a lookup with nothing to read is skipped: it could not
/// hit.
#[inline(always)]
pub fn policy_lookups<T>(
    pk: &mut PolicyKey,
    peer: &IpcacheValue,
    flags: u32,
    mut lookup: impl FnMut(&PolicyKey, Reads) -> Option<T>,
) -> Option<T> {
    let dir = pk.direction;
    let reads = |id: u32| Reads {
        exact: flags & no_entries_bit(dir, entry_class(POLICY_PREFIX_FULL, id)) == 0,
        trie: flags & no_entries_bit(dir, entry_class(0, id)) == 0,
    };
    let some = |r: Reads| r.exact || r.trie;
    let mut hit = None;
    let r = reads(peer.identity);
    if some(r) {
        pk.peer_identity = peer.identity;
        hit = lookup(pk, r);
    }
    let r = reads(peer.cidr_identity);
    if hit.is_none()
        && peer.cidr_identity != peer.identity
        && peer.cidr_identity != IDENTITY_ANY
        && some(r)
    {
        pk.peer_identity = peer.cidr_identity;
        hit = lookup(pk, r);
    }
    let r = reads(IDENTITY_ANY_POD);
    if hit.is_none() && is_label_identity(peer.identity) && some(r) {
        pk.peer_identity = IDENTITY_ANY_POD;
        hit = lookup(pk, r);
    }
    let r = reads(IDENTITY_ANY);
    if hit.is_none() && some(r) {
        pk.peer_identity = IDENTITY_ANY;
        hit = lookup(pk, r);
    }
    hit
}

/// The verdict on a new flow once the policy lookups are done.
#[inline(always)]
pub fn policy_decision(
    ep: &EndpointInfo,
    dir: u8,
    peer: &IpcacheValue,
    hit: Option<PolicyValue>,
) -> Decision {
    let ids = flow_identities(ep, dir, peer.identity);
    match hit {
        Some(v) if v.action == ACTION_ALLOW => allow_decision(reason::POLICY_ALLOW, v.cookie, ids),
        Some(v) => drop_decision(ep, reason::DENY_RULE, v.cookie, ids),
        None => drop_decision(ep, reason::NO_POLICY_MATCH, 0, ids),
    }
}

/// The policy verdict on the first packet of a flow of `ep` with `peer`
/// (its ipcache value, or [`peer_or_world`] of a miss). `lookup` is one
/// longest-prefix match of the policy map.
#[inline(always)]
pub fn decide<A: Addr>(
    ep: &EndpointInfo,
    dir: u8,
    key: &CtKeyOf<A>,
    peer: &IpcacheValue,
    lookup: impl FnMut(&PolicyKey, Reads) -> Option<PolicyValue>,
) -> Decision {
    decide_with(ep, dir, key, peer, ep.flags, lookup)
}

/// [`decide`] skipping the lookups `flags` says cannot hit
/// ([`policy_lookups`]): `ep.flags`, or 0 to make every lookup. (A tracked
/// flow judged again makes them all: that path is rare, and a copy of the
/// skip checks inlined there took the IPv6 stages past their stack limit.)
#[inline(always)]
pub fn decide_with<A: Addr>(
    ep: &EndpointInfo,
    dir: u8,
    key: &CtKeyOf<A>,
    peer: &IpcacheValue,
    flags: u32,
    lookup: impl FnMut(&PolicyKey, Reads) -> Option<PolicyValue>,
) -> Decision {
    if let Some(d) = tunnel_from_pod(ep, dir, key, peer) {
        return d;
    }
    let mut lookup = lookup;
    if let Some(d) = host_protected(ep, dir, key, peer, &mut lookup) {
        return d;
    }
    if let Some(d) = pre_policy(ep, dir, peer) {
        return d;
    }
    let mut pk = policy_key(ep, dir, key, peer);
    // The hit travels through the lookups as a non-zero integer rather
    // than an `Option<PolicyValue>`: LLVM may copy a `None`'s undefined
    // payload ahead of the check, and the verifier refuses a program that
    // reads an uninitialised register (seen once the programs grew).
    match policy_lookups(&mut pk, peer, flags, |k, r| lookup(k, r).map(pack_hit)) {
        Some(h) => policy_decision(ep, dir, peer, Some(unpack_hit(h))),
        None => policy_decision(ep, dir, peer, None),
    }
}

/// A new flow's decision `d` (from [`decide`]) where it passed as traffic
/// from the pod to its own node: unless a ClusterNetworkPolicy denies it
/// ([`own_node_denied`], the first policy entry the flow hits). Applied to
/// a pod's new flows, not when a tracked flow is judged again (the
/// verifier's budget: the programs inline `decide` at every call site).
#[inline(always)]
pub fn own_node_checked<A>(
    ep: &EndpointInfo,
    dir: u8,
    key: &CtKeyOf<A>,
    peer: &IpcacheValue,
    d: Decision,
    mut lookup: impl FnMut(&PolicyKey, Reads) -> Option<PolicyValue>,
) -> Decision {
    if d.reason != reason::HOST || dir != DIR_EGRESS {
        return d;
    }
    let mut pk = policy_key(ep, dir, key, peer);
    // (The hit stays packed until it is known to be one: see `decide`.)
    match policy_lookups(&mut pk, peer, ep.flags, |k, r| lookup(k, r).map(pack_hit)) {
        Some(h) => {
            let v = unpack_hit(h);
            if own_node_denied(&v) {
                policy_decision(ep, dir, peer, Some(v))
            } else {
                d
            }
        }
        None => d,
    }
}

#[inline(always)]
fn pack_hit(v: PolicyValue) -> core::num::NonZeroU64 {
    let bits = 1 << 63 | (v.action as u64 & 0x7fff_ffff) << 32 | v.cookie as u64;
    // The top bit is set: never zero.
    core::num::NonZeroU64::new(bits).unwrap_or(core::num::NonZeroU64::MAX)
}

#[inline(always)]
fn unpack_hit(h: core::num::NonZeroU64) -> PolicyValue {
    let bits = h.get();
    PolicyValue {
        action: (bits >> 32) as u32 & 0x7fff_ffff,
        cookie: bits as u32,
    }
}

/// True when a conntrack entry still carries its flow for a packet with
/// `tcp_flags`: not expired, and not a TCP SYN on a closing or closed
/// entry (a new connection, which goes to policy again).
#[inline(always)]
pub fn ct_live(ct: &CtValue, protocol: u8, tcp_flags: u8, now: u64) -> bool {
    ct.expires_ns > now && !(protocol == PROTO_TCP && tcp_reopens(ct.tcp_state, tcp_flags))
}

/// Advance an entry on a packet of its flow (`reply`: against the
/// direction that opened it) and push its expiry out.
///
/// Only what changes is written, and the expiry only once it would move
/// by more than 1/64 of its timeout (an entry may so end that much
/// early): packets of one flow run on several CPUs, and a store per
/// packet would bounce the entry's cache line between them.
#[inline(always)]
pub fn refresh(ct: &mut CtValue, protocol: u8, tcp_flags: u8, reply: bool, now: u64) {
    let before = ct.tcp_state;
    if protocol == PROTO_TCP {
        let state = tcp_next_state(before, tcp_flags, reply);
        if state != before {
            ct.tcp_state = state;
        }
    }
    let timeout = timeout_ns(protocol, ct.tcp_state);
    // (Without a state change the expiry only moves out: `now` only grows.)
    if ct.tcp_state != before || now + timeout > ct.expires_ns + (timeout >> 6) {
        ct.expires_ns = now + timeout;
    }
    if reply && ct.flags & CT_SEEN_REPLY == 0 {
        ct.flags |= CT_SEEN_REPLY;
    }
}

/// Whether an entry must be judged again before it passes anything: it
/// was judged under an older generation of its endpoint's policy
/// (`EndpointInfo::generation`), or admitted in audit mode that has ended.
#[inline(always)]
pub fn ct_stale(ct: &CtValue, ep: &EndpointInfo) -> bool {
    ct.generation != ep.generation || (ct.flags & CT_AUDIT != 0 && ep.flags & EP_AUDIT == 0)
}

/// A packet of the flow of entry `ct`, if the entry still carries it
/// ([`ct_live`]): `Some(false)` when it is current, refreshed, and the
/// packet passes; `Some(true)` when it is stale ([`ct_stale`], not
/// refreshed): the flow must be judged again ([`rejudged`]).
#[inline(always)]
pub fn ct_use(
    ct: &mut CtValue,
    ep: &EndpointInfo,
    protocol: u8,
    tcp_flags: u8,
    reply: bool,
    now: u64,
) -> Option<bool> {
    if !ct_live(ct, protocol, tcp_flags, now) {
        return None;
    }
    if ct_stale(ct, ep) {
        return Some(true);
    }
    refresh(ct, protocol, tcp_flags, reply, now);
    Some(false)
}

/// The verdict on a tracked flow judged again: an admitted flow keeps its
/// entry (now of the current generation: [`rejudged_entry`]); a denied one
/// is cut with its own reason, the rule's cookie kept.
#[inline(always)]
pub fn rejudged(mut d: Decision) -> Decision {
    if d.verdict != VERDICT_ALLOW {
        d.reason = reason::POLICY_CHANGED;
    }
    d
}

/// An entry that passed its re-judging ([`rejudged`] with `d.pass`):
/// stamped with the current generation, audit flag as `d` says, refreshed.
#[inline(always)]
pub fn rejudged_entry(
    ct: &mut CtValue,
    ep: &EndpointInfo,
    d: &Decision,
    tcp_flags: u8,
    reply: bool,
    now: u64,
    protocol: u8,
) {
    ct.generation = ep.generation;
    ct.cookie = d.cookie;
    if d.verdict == VERDICT_AUDIT {
        ct.flags |= CT_AUDIT;
    } else {
        ct.flags &= !CT_AUDIT;
    }
    refresh(ct, protocol, tcp_flags, reply, now);
}

/// What the conntrack stage found for a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked<A = u32> {
    /// `reason::ESTABLISHED` or `reason::REPLY`.
    pub why: u8,
    pub cookie: u32,
    /// The entry must be judged again first ([`ct_stale`]).
    pub stale: bool,
    /// The key of the entry that matched (the reversed tuple for a reply).
    pub key: CtKeyOf<A>,
}

/// The conntrack stage, before any policy: the packet's own tuple in its
/// own scope (`ESTABLISHED`), then the reversed tuple in the opposite scope
/// (`REPLY`), each looked up only if the previous one did not pass.
/// `lookup_use(key, reply)` finds the entry and applies [`ct_use`] to it,
/// returning the entry's cookie and whether it is stale when it carries
/// the packet's flow. `None`: a new flow, for policy.
///
/// A TCP SYN without ACK opens a connection: its own tuple only (a
/// retransmitted SYN finds its handshake there). The one reversed entry
/// it could pass on is the other direction's handshake, a simultaneous
/// open, which it leaves to policy as the connection of its own it also
/// is. The lookup saved misses on a bucket nothing of the flow has
/// touched: the costliest read of a new connection (bench section 1).
#[inline(always)]
pub fn track<A: Copy>(
    key: &CtKeyOf<A>,
    dir: u8,
    tcp_flags: u8,
    mut lookup_use: impl FnMut(&CtKeyOf<A>, bool) -> Option<(u32, bool)>,
) -> Option<Tracked<A>> {
    if let Some((cookie, stale)) = lookup_use(key, false) {
        return Some(Tracked {
            why: reason::ESTABLISHED,
            cookie,
            stale,
            key: *key,
        });
    }
    if key.protocol == PROTO_TCP && tcp_opens(tcp_flags) {
        return None;
    }
    // Anything else may be the peer's side of a tracked flow.
    let rk = key.reversed(opposite(dir));
    if let Some((cookie, stale)) = lookup_use(&rk, true) {
        return Some(Tracked {
            why: reason::REPLY,
            cookie,
            stale,
            key: rk,
        });
    }
    None
}

/// Whether a new flow that `d` admitted is recorded in conntrack. A TCP
/// segment passed in an unenforced direction is recorded only if it opens
/// a connection (a SYN): one picked up mid-stream passes unrecorded, so
/// it cannot revive, as "replies" admitted by its entry, a connection the
/// enforced direction refused or cut (`reason::POLICY_CHANGED`). Every
/// other admitted flow is recorded (also unenforced and host flows: their
/// entry is what keeps their later packets from being reported as new).
#[inline(always)]
pub fn records_entry(d: &Decision, protocol: u8, tcp_flags: u8) -> bool {
    if d.reason == reason::UNENFORCED && protocol == PROTO_TCP {
        return tcp_opens(tcp_flags);
    }
    d.pass
}

/// The entry recorded for a new flow of `ep` that `d` admitted.
#[inline(always)]
pub fn new_ct_entry(
    ep: &EndpointInfo,
    d: &Decision,
    protocol: u8,
    tcp_flags: u8,
    now: u64,
) -> CtValue {
    let state = if protocol == PROTO_TCP {
        tcp_next_state(0, tcp_flags, false)
    } else {
        0
    };
    CtValue {
        expires_ns: now + timeout_ns(protocol, state),
        cookie: d.cookie,
        tcp_state: state,
        flags: if d.verdict == VERDICT_AUDIT {
            CT_AUDIT
        } else {
            0
        } | if ep.flags & EP_VIA_STACK != 0 {
            CT_VIA_STACK
        } else {
            0
        },
        generation: ep.generation,
        ..CtValue::default()
    }
}

/// The verdict later fragments of a datagram inherit from its first one:
/// (expiry, `VERDICT_ALLOW` or `VERDICT_DROP` as stored in `FragValue`).
#[inline(always)]
pub fn first_fragment_verdict(pass: bool, now: u64) -> (u64, u32) {
    let v = if pass { VERDICT_ALLOW } else { VERDICT_DROP };
    (now + FRAG_TIMEOUT_NS, v as u32)
}

/// What a later fragment gets from a recorded first-fragment verdict, if
/// the record is still valid: `Some(true)` pass, `Some(false)` drop.
#[inline(always)]
pub fn later_fragment_verdict(expires_ns: u64, verdict: u32, now: u64) -> Option<bool> {
    if expires_ns > now {
        Some(verdict == VERDICT_ALLOW as u32)
    } else {
        None
    }
}

/// The ring-buffer record of a verdict.
#[inline(always)]
pub fn flow_event<A: Addr>(
    ts_ns: u64,
    endpoint_id: u32,
    ifindex: u32,
    key: &CtKeyOf<A>,
    d: &Decision,
    service_id: u32,
) -> FlowEvent {
    let mut ev = core::mem::MaybeUninit::<FlowEvent>::uninit();
    // SAFETY: `write_flow_event` writes every field.
    unsafe {
        write_flow_event(
            ev.as_mut_ptr(),
            ts_ns,
            endpoint_id,
            ifindex,
            key,
            d,
            service_id,
        );
        ev.assume_init()
    }
}

/// The IPv4 path's record ([`FlowEvent4`], the first 64 bytes of what
/// [`flow_event`] makes of the same verdict).
#[inline(always)]
pub fn flow_event4<A: Addr>(
    ts_ns: u64,
    endpoint_id: u32,
    ifindex: u32,
    key: &CtKeyOf<A>,
    d: &Decision,
    service_id: u32,
) -> FlowEvent4 {
    FlowEvent4 {
        ts_ns,
        endpoint_id,
        ifindex,
        saddr: key.saddr.v4(),
        daddr: key.daddr.v4(),
        sport_be: key.sport_be,
        dport_be: key.dport_be,
        protocol: key.protocol,
        direction: key.scope,
        verdict: d.verdict,
        reason: d.reason,
        src_identity: d.src_identity,
        dst_identity: d.dst_identity,
        cookie: d.cookie,
        service_id,
        // Filled in by the kernel's event budget (`event_limit`).
        suppressed_drops: 0,
        suppressed_flows: 0,
        suppressed_reasons: 0,
    }
}

/// [`flow_event`] written in place, field by field (the kernel writes it
/// straight into its ring-buffer slot: a 104-byte record built on the
/// stack first would not fit the programs' 512 bytes). The suppressed
/// counts are left zero, for the kernel's event budget (`event_limit`).
///
/// # Safety
/// `p` is valid for writes of a `FlowEvent`.
#[inline(always)]
pub unsafe fn write_flow_event<A: Addr>(
    p: *mut FlowEvent,
    ts_ns: u64,
    endpoint_id: u32,
    ifindex: u32,
    key: &CtKeyOf<A>,
    d: &Decision,
    service_id: u32,
) {
    use core::ptr::addr_of_mut as at;
    // SAFETY: as the caller promised; every write is to a field of `*p`.
    unsafe {
        at!((*p).ts_ns).write(ts_ns);
        at!((*p).endpoint_id).write(endpoint_id);
        at!((*p).ifindex).write(ifindex);
        at!((*p).saddr).write(0);
        at!((*p).daddr).write(0);
        at!((*p).sport_be).write(key.sport_be);
        at!((*p).dport_be).write(key.dport_be);
        at!((*p).protocol).write(key.protocol);
        at!((*p).direction).write(key.scope);
        at!((*p).verdict).write(d.verdict);
        at!((*p).reason).write(d.reason);
        at!((*p).src_identity).write(d.src_identity);
        at!((*p).dst_identity).write(d.dst_identity);
        at!((*p).cookie).write(d.cookie);
        at!((*p).service_id).write(service_id);
        at!((*p).suppressed_drops).write(0);
        at!((*p).suppressed_flows).write(0);
        at!((*p).suppressed_reasons).write(0);
        at!((*p).family).write(A::FAMILY);
        at!((*p)._pad).write(0);
        at!((*p).saddr6).write([0; 4]);
        at!((*p).daddr6).write([0; 4]);
        A::set_event(p, key.saddr, key.daddr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ACTION_DENY, EP_INGRESS_ENFORCED};

    const EP: EndpointInfo = EndpointInfo {
        endpoint_id: 7,
        identity: 1000,
        ipv4: 0x0100_000a,
        flags: EP_INGRESS_ENFORCED,
        generation: 0,
        mac: [0; 6],
        _pad: [0; 2],
        ipv6: [0; 4],
    };

    #[test]
    fn macs_are_checked_only_where_known_and_arp_speaks_for_the_pod() {
        let (own, other, bcast) = ([2, 0xaa, 0, 0, 0, 5], [2, 0xbb, 0, 0, 0, 7], [0xff; 6]);
        let known = EndpointInfo { mac: own, ..EP };
        let why = |d: Option<Decision>| d.map(|d| (d.pass, d.reason));
        assert_eq!(why(foreign_mac(&EP, DIR_EGRESS, &other, &bcast)), None);
        assert_eq!(why(foreign_mac(&known, DIR_EGRESS, &own, &other)), None);
        assert_eq!(
            why(foreign_mac(&known, DIR_EGRESS, &other, &own)),
            Some((false, reason::SPOOFED_MAC))
        );
        assert_eq!(why(foreign_mac(&known, DIR_INGRESS, &other, &own)), None);
        assert_eq!(why(foreign_mac(&known, DIR_INGRESS, &other, &bcast)), None);
        let multicast = [0x01, 0, 0x5e, 0, 0, 1];
        assert_eq!(
            why(foreign_mac(&known, DIR_INGRESS, &other, &multicast)),
            None
        );
        assert_eq!(
            why(foreign_mac(&known, DIR_INGRESS, &own, &other)),
            Some((false, reason::NOT_OWN_DESTINATION))
        );
        // Audit mode lets none of it through.
        let audited = EndpointInfo {
            flags: EP_AUDIT | EP_INGRESS_ENFORCED,
            ..known
        };
        assert!(
            !foreign_mac(&audited, DIR_EGRESS, &other, &own)
                .unwrap()
                .pass
        );

        let arp = |ep: &EndpointInfo, dir, lens, spa, sha: [u8; 6]| {
            why(arp_spoofed(ep, dir, lens, spa, &sha, &own))
        };
        assert_eq!(arp(&EP, DIR_EGRESS, (6, 4), EP.ipv4, own), None);
        assert_eq!(arp(&EP, DIR_EGRESS, (6, 4), 0, own), None);
        assert_eq!(
            arp(&EP, DIR_EGRESS, (6, 4), 0x0200_000a, own),
            Some((false, reason::SPOOFED_MAC))
        );
        assert_eq!(
            arp(&EP, DIR_EGRESS, (6, 4), EP.ipv4, other),
            Some((false, reason::SPOOFED_MAC))
        );
        assert_eq!(
            arp(&EP, DIR_EGRESS, (16, 4), EP.ipv4, own),
            Some((false, reason::MALFORMED))
        );
        assert_eq!(arp(&EP, DIR_INGRESS, (6, 4), 0x0200_000a, other), None);
    }

    #[test]
    fn lookups_stop_at_first_hit_in_order() {
        let peer = IpcacheValue {
            identity: 1001,
            cidr_identity: 3000,
        };
        let key = ct_key(7, 1, 2, 3, 80u16.to_be(), PROTO_TCP, DIR_INGRESS);
        let mut seen = [0u32; 4];
        let mut n = 0;
        let d = decide(&EP, DIR_INGRESS, &key, &peer, |k, _| {
            seen[n] = k.peer_identity;
            n += 1;
            (k.peer_identity == IDENTITY_ANY).then_some(PolicyValue {
                action: ACTION_DENY,
                cookie: 5,
            })
        });
        assert_eq!(seen, [1001, 3000, IDENTITY_ANY_POD, IDENTITY_ANY]);
        assert_eq!((d.pass, d.reason, d.cookie), (false, reason::DENY_RULE, 5));
        assert_eq!((d.src_identity, d.dst_identity), (1001, 1000));
    }

    #[test]
    fn lookups_read_only_the_parts_holding_entries_of_their_class() {
        let peer = IpcacheValue {
            identity: 1001,
            cidr_identity: crate::IDENTITY_FIRST_CIDR + 4,
        };
        // (identity, parts read) of each lookup made.
        let lookups = |flags: u32, dir: u8| {
            let ep = EndpointInfo {
                flags: flags | crate::EP_EGRESS_ENFORCED | EP_INGRESS_ENFORCED,
                ..EP
            };
            let key = ct_key(7, 1, 2, 3, 80u16.to_be(), PROTO_TCP, dir);
            let mut seen = [(u32::MAX, Reads::ALL); 4];
            let mut n = 0;
            let d = decide(&ep, dir, &key, &peer, |k, r| {
                seen[n] = (k.peer_identity, r);
                n += 1;
                None
            });
            assert!(!d.pass);
            seen
        };
        const N: (u32, Reads) = (u32::MAX, Reads::ALL);
        let both = |id| (id, Reads::ALL);
        let (ingress, egress) = (DIR_INGRESS, DIR_EGRESS);
        let cidr = peer.cidr_identity;
        let every = [
            both(1001),
            both(cidr),
            both(IDENTITY_ANY_POD),
            both(IDENTITY_ANY),
        ];
        assert_eq!(lookups(0, ingress), every);
        let bit = |dir, class| crate::no_entries_bit(dir, class);
        // Both entry classes of a peer class: one port, and wider.
        let class = |dir, c: u32| bit(dir, 2 * c) | bit(dir, 2 * c + 1);
        let (l, o, p, a) = (
            crate::PEER_CLASS_LABEL,
            crate::PEER_CLASS_OTHER,
            crate::PEER_CLASS_ANY_POD,
            crate::PEER_CLASS_ANY,
        );
        // Each peer class alone, and every class: only its lookups go.
        assert_eq!(
            lookups(class(ingress, o), ingress),
            [both(1001), both(IDENTITY_ANY_POD), both(IDENTITY_ANY), N]
        );
        assert_eq!(
            lookups(class(ingress, l), ingress),
            [both(cidr), both(IDENTITY_ANY_POD), both(IDENTITY_ANY), N]
        );
        let three = class(ingress, o) | class(ingress, p) | class(ingress, a);
        assert_eq!(lookups(three, ingress), [both(1001), N, N, N]);
        assert_eq!(lookups(three | class(ingress, l), ingress), [N; 4]);
        // Half a peer class: only the part holding its entries is read.
        let exact = Reads {
            exact: true,
            trie: false,
        };
        let trie = Reads {
            exact: false,
            trie: true,
        };
        assert_eq!(
            lookups(three | bit(ingress, 2 * l + 1), ingress),
            [(1001, exact), N, N, N]
        );
        assert_eq!(
            lookups(three | bit(ingress, 2 * l), ingress),
            [(1001, trie), N, N, N]
        );
        // The other direction's bits change nothing.
        let egress_all = (0..crate::ENTRY_CLASSES).fold(0, |b, c| b | bit(egress, c));
        assert_eq!(lookups(egress_all, ingress), every);
        assert_eq!(lookups(three, egress), every);
        // Sixteen distinct bits, inside the mask, apart from the other flags.
        let mut bits = 0;
        for class in 0..crate::ENTRY_CLASSES {
            for dir in [egress, ingress] {
                assert_eq!(bits & bit(dir, class), 0);
                bits |= bit(dir, class);
            }
        }
        assert_eq!(bits, crate::EP_NO_ENTRIES_MASK);
        assert_eq!(bits & 0xff, 0);
        // Every identity's class, and every length's.
        assert_eq!(crate::peer_class(IDENTITY_ANY), a);
        assert_eq!(crate::peer_class(IDENTITY_ANY_POD), p);
        assert_eq!(crate::peer_class(crate::IDENTITY_FIRST_DYNAMIC), l);
        for id in [IDENTITY_HOST, IDENTITY_WORLD, IDENTITY_WORLD6, cidr] {
            assert_eq!(crate::peer_class(id), o, "{id}");
        }
        assert_eq!(crate::entry_class(crate::POLICY_PREFIX_FULL, 1001), 2 * l);
        assert_eq!(
            crate::entry_class(crate::POLICY_PREFIX_PROTO, 1001),
            2 * l + 1
        );
        assert_eq!(crate::entry_class(90, IDENTITY_ANY), 2 * a + 1);
        assert_eq!(
            crate::entry_class(crate::POLICY_PREFIX_FIXED, cidr),
            2 * o + 1
        );
    }

    #[test]
    fn any_pod_is_looked_up_for_pod_peers_only() {
        let key = ct_key(7, 1, 2, 3, 80u16.to_be(), PROTO_TCP, DIR_INGRESS);
        let lookups = |identity, cidr_identity| {
            let peer = IpcacheValue {
                identity,
                cidr_identity,
            };
            let mut seen = [u32::MAX; 4];
            let mut n = 0;
            let d = decide(&EP, DIR_INGRESS, &key, &peer, |k, _| {
                seen[n] = k.peer_identity;
                n += 1;
                (k.peer_identity == IDENTITY_ANY_POD).then_some(PolicyValue {
                    action: ACTION_ALLOW,
                    cookie: 9,
                })
            });
            (seen, d.pass)
        };
        let cidr = crate::IDENTITY_FIRST_CIDR + 4;
        // A pod (label identity), with or without a CIDR identity: hit.
        let (seen, pass) = lookups(1001, cidr);
        assert_eq!(
            (&seen[..3], pass),
            (&[1001, cidr, IDENTITY_ANY_POD][..], true)
        );
        let (seen, pass) = lookups(1001, IDENTITY_WORLD);
        assert_eq!(
            (&seen[..3], pass),
            (&[1001, IDENTITY_WORLD, IDENTITY_ANY_POD][..], true)
        );
        // A CIDR identity, world (and host, before any lookup) are no pods.
        for (id, c) in [
            (cidr, cidr),
            (IDENTITY_WORLD, IDENTITY_WORLD),
            (cidr, IDENTITY_WORLD),
        ] {
            let (seen, pass) = lookups(id, c);
            assert!(!seen.contains(&IDENTITY_ANY_POD), "{id}: {seen:?}");
            assert!(!pass);
        }
        assert!(is_label_identity(crate::IDENTITY_FIRST_DYNAMIC));
        assert!(is_label_identity(crate::IDENTITY_FIRST_CIDR - 1));
        assert!(!is_label_identity(crate::IDENTITY_FIRST_CIDR));
        for id in [
            IDENTITY_ANY,
            IDENTITY_HOST,
            IDENTITY_WORLD,
            IDENTITY_ANY_POD,
        ] {
            assert!(!is_label_identity(id));
        }
    }

    #[test]
    fn host_and_unenforced_skip_policy() {
        let host = IpcacheValue {
            identity: IDENTITY_HOST,
            cidr_identity: IDENTITY_WORLD,
        };
        let key = ct_key(7, 1, 2, 3, 4, PROTO_UDP, DIR_INGRESS);
        let d = decide(&EP, DIR_INGRESS, &key, &host, |_, _| unreachable!());
        assert_eq!((d.pass, d.reason), (true, reason::HOST));
        let world = peer_or_world(None);
        let d = decide(&EP, DIR_EGRESS, &key, &world, |_, _| unreachable!());
        assert_eq!((d.pass, d.reason), (true, reason::UNENFORCED));
    }

    #[test]
    fn audit_passes_drops_but_not_spoofing_or_hard_drops() {
        let ep = EndpointInfo {
            flags: EP_INGRESS_ENFORCED | EP_AUDIT,
            ..EP
        };
        let d = drop_decision(&ep, reason::NO_POLICY_MATCH, 0, (1, 2));
        assert_eq!((d.pass, d.verdict), (true, VERDICT_AUDIT));
        assert!(!drop_decision(&ep, reason::SPOOFED_SOURCE, 0, (1, 2)).pass);
        let d = spoofed(&ep, DIR_EGRESS, 0x0200_000a).expect("spoofed");
        assert_eq!((d.pass, d.src_identity), (false, 1000));
        assert!(spoofed(&ep, DIR_EGRESS, EP.ipv4).is_none());
        assert!(spoofed(&ep, DIR_INGRESS, 0x0200_000a).is_none());
        let d = hard_drop(&ep, reason::IPV6_UNSUPPORTED, DIR_INGRESS);
        assert_eq!(
            (d.pass, d.verdict, d.dst_identity),
            (false, VERDICT_DROP, 1000)
        );
        assert_eq!(
            new_ct_entry(&EP, &allow_decision(1, 0, (0, 0)), PROTO_UDP, 0, 0).flags,
            0
        );
    }

    #[test]
    fn ports_only_for_port_protocols() {
        let peer = peer_or_world(None);
        let icmp = ct_key(7, 1, 2, 9, 9, crate::PROTO_ICMP, DIR_INGRESS);
        assert_eq!(policy_key(&EP, DIR_INGRESS, &icmp, &peer).dport_be, 0);
        let sctp = ct_key(7, 1, 2, 9, 9, PROTO_SCTP, DIR_INGRESS);
        assert_eq!(policy_key(&EP, DIR_INGRESS, &sctp, &peer).dport_be, 9);
    }
}

#[cfg(test)]
mod ct_tests {
    extern crate std;
    use super::*;
    use crate::{
        conntrack::{TCP_FLAG_ACK, TCP_FLAG_SYN},
        EP_INGRESS_ENFORCED, PROTO_ICMP,
    };
    use std::{vec, vec::Vec};

    const EP: EndpointInfo = EndpointInfo {
        endpoint_id: 7,
        identity: 1000,
        ipv4: 0x0100_000a,
        flags: EP_INGRESS_ENFORCED,
        generation: 3,
        mac: [0; 6],
        _pad: [0; 2],
        ipv6: [0; 4],
    };

    /// The keys `track` looks up, in order, for a packet with `flags`,
    /// with entries under `present` (each passing), and what it returns.
    fn track_with(
        protocol: u8,
        flags: u8,
        present: &[CtKey],
    ) -> (Vec<(CtKey, bool)>, Option<Tracked>) {
        let key = ct_key(7, 1, 2, 1000, 80, protocol, DIR_EGRESS);
        let mut asked = Vec::new();
        let t = track(&key, DIR_EGRESS, flags, |k, reply| {
            asked.push((*k, reply));
            present.contains(k).then_some((k.saddr, false))
        });
        (asked, t)
    }

    #[test]
    fn a_syn_is_looked_up_on_its_own_tuple_only() {
        use crate::conntrack::{TCP_FLAG_FIN, TCP_FLAG_RST};
        let own = ct_key(7, 1, 2, 1000, 80, PROTO_TCP, DIR_EGRESS);
        let rev = own.reversed(DIR_INGRESS);
        let (syn, ack) = (TCP_FLAG_SYN, TCP_FLAG_ACK);
        // Nothing recorded: a SYN asks its own tuple alone (a SYN+FIN
        // too), every other segment its own, then the reversed one.
        for (flags, want) in [
            (syn, vec![(own, false)]),
            (syn | TCP_FLAG_FIN, vec![(own, false)]),
            (syn | ack, vec![(own, false), (rev, true)]),
            (ack, vec![(own, false), (rev, true)]),
            (TCP_FLAG_FIN | ack, vec![(own, false), (rev, true)]),
            (TCP_FLAG_RST, vec![(own, false), (rev, true)]),
            (0, vec![(own, false), (rev, true)]),
        ] {
            assert_eq!(
                track_with(PROTO_TCP, flags, &[]),
                (want, None),
                "{flags:#x}"
            );
        }
        // A retransmitted SYN finds its own handshake.
        let (_, t) = track_with(PROTO_TCP, syn, &[own]);
        assert_eq!(t.map(|t| (t.why, t.key)), Some((reason::ESTABLISHED, own)));
        // A SYN meeting the other direction's handshake (a simultaneous
        // open) is a new flow, for policy; its SYN-ACK is a reply.
        assert_eq!(track_with(PROTO_TCP, syn, &[rev]).1, None);
        let (_, t) = track_with(PROTO_TCP, syn | ack, &[rev]);
        assert_eq!(t.map(|t| (t.why, t.key)), Some((reason::REPLY, rev)));
    }

    #[test]
    fn other_protocols_always_ask_both_tuples() {
        // UDP and ICMP carry no TCP flags, whatever the caller passes.
        for protocol in [PROTO_UDP, PROTO_ICMP] {
            let own = ct_key(7, 1, 2, 1000, 80, protocol, DIR_EGRESS);
            let rev = own.reversed(DIR_INGRESS);
            let (asked, t) = track_with(protocol, TCP_FLAG_SYN, &[rev]);
            assert_eq!(asked, vec![(own, false), (rev, true)]);
            assert_eq!(t.map(|t| t.why), Some(reason::REPLY));
        }
    }

    #[test]
    fn refresh_writes_the_expiry_only_when_it_moves_past_the_slack() {
        use crate::conntrack::{TCP_FLAG_FIN, TIMEOUT_UDP_NS};
        let d = allow_decision(reason::POLICY_ALLOW, 4, (1, 2));
        let mut ct = new_ct_entry(&EP, &d, PROTO_UDP, 0, 1_000);
        let first = ct.expires_ns;
        assert_eq!(first, 1_000 + TIMEOUT_UDP_NS);
        let slack = TIMEOUT_UDP_NS >> 6;
        // Within the slack: nothing written.
        refresh(&mut ct, PROTO_UDP, 0, false, 1_000 + slack);
        assert_eq!(ct.expires_ns, first);
        // Past it: pushed out to a full timeout again.
        refresh(&mut ct, PROTO_UDP, 0, false, 1_001 + slack);
        assert_eq!(ct.expires_ns, 1_001 + slack + TIMEOUT_UDP_NS);
        // A reply is remembered at once.
        refresh(&mut ct, PROTO_UDP, 0, true, 1_002 + slack);
        assert_ne!(ct.flags & CT_SEEN_REPLY, 0);
        // A TCP state change always rewrites the expiry, also to a sooner
        // one (established -> closing).
        let mut t = new_ct_entry(&EP, &d, PROTO_TCP, TCP_FLAG_SYN, 0);
        t.tcp_state = crate::conntrack::TCP_ESTABLISHED;
        t.expires_ns = 10 + crate::conntrack::TIMEOUT_TCP_ESTABLISHED_NS;
        refresh(&mut t, PROTO_TCP, TCP_FLAG_FIN, false, 20);
        assert_ne!(t.tcp_state, crate::conntrack::TCP_ESTABLISHED);
        assert!(t.expires_ns < 10 + crate::conntrack::TIMEOUT_TCP_ESTABLISHED_NS);
        assert_eq!(t.expires_ns, 20 + timeout_ns(PROTO_TCP, t.tcp_state));
    }

    #[test]
    fn entries_of_another_generation_or_ended_audit_are_stale() {
        let d = allow_decision(reason::POLICY_ALLOW, 4, (1, 2));
        let mut ct = new_ct_entry(&EP, &d, PROTO_ICMP, 0, 0);
        assert_eq!(ct_use(&mut ct, &EP, PROTO_ICMP, 0, false, 1), Some(false));
        let bumped = EndpointInfo {
            generation: 4,
            ..EP
        };
        let before = ct;
        assert_eq!(
            ct_use(&mut ct, &bumped, PROTO_ICMP, 0, false, 2),
            Some(true)
        );
        assert_eq!(ct, before, "a stale entry is not refreshed");
        rejudged_entry(&mut ct, &bumped, &d, 0, false, 3, PROTO_ICMP);
        assert_eq!(
            ct_use(&mut ct, &bumped, PROTO_ICMP, 0, false, 4),
            Some(false)
        );
        // Audit mode ended: an audited entry is judged again.
        ct.flags |= CT_AUDIT;
        assert_eq!(
            ct_use(&mut ct, &bumped, PROTO_ICMP, 0, false, 5),
            Some(true)
        );
        let audit = EndpointInfo {
            flags: EP_INGRESS_ENFORCED | EP_AUDIT,
            ..bumped
        };
        assert_eq!(
            ct_use(&mut ct, &audit, PROTO_ICMP, 0, false, 6),
            Some(false)
        );
        let denied = rejudged(drop_decision(&bumped, reason::NO_POLICY_MATCH, 0, (1, 2)));
        assert_eq!(
            (denied.pass, denied.reason),
            (false, reason::POLICY_CHANGED)
        );
    }

    #[test]
    fn frames_to_a_pod_must_be_addressed_to_it() {
        let other = 0x0200_000a;
        let d = foreign_destination(&EP, DIR_INGRESS, other).expect("foreign");
        assert_eq!((d.pass, d.reason), (false, reason::NOT_OWN_DESTINATION));
        assert!(foreign_destination(&EP, DIR_INGRESS, EP.ipv4).is_none());
        assert!(foreign_destination(&EP, DIR_EGRESS, other).is_none());
        assert!(foreign_destination(&EP, DIR_INGRESS, u32::MAX).is_none());
        let mcast = u32::from_ne_bytes([224, 0, 0, 251]);
        assert!(foreign_destination(&EP, DIR_INGRESS, mcast).is_none());
    }
}
