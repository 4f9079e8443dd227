//! A userspace model of the tc verdict path (`ebpf-programs/ebpf/src/verdict.rs`):
//! the same parse, the same map semantics (hash lookups, longest-prefix
//! match over the ipcache and over the 96-bit policy key, conntrack and
//! fragment tables with expiry), the same events and counters. The
//! differential test holds it to the kernel packet by packet, and
//! `palisade-agent trace` uses it to explain what the datapath would do.
//!
//! The decision rules themselves (spoofing, audit, host and unenforced
//! passes, the order of the policy lookups, conntrack liveness and refresh,
//! fragment verdicts, event fields) are not copied here: both sides call
//! `palisade_common::decision`. What this file models is the rest: the
//! parse of the frame and the maps (hash, LPM, LRU tables with expiry). So
//! the differential test checks the kernel's parse and map use against
//! this model; whether the shared rules implement NetworkPolicy is checked
//! against an independent oracle (tests/tests/policy_oracle.rs).
//!
//! It mirrors the kernel, quirks included; where the kernel is silent (no
//! event, no counter) the model still says why a packet passed or dropped.
//! Kernel behaviour worth knowing when reading a verdict:
//!
//! * The three policy lookups stop at the first hit (exact peer, then CIDR
//!   identity, then any peer), allow or deny; the longest prefix decides
//!   only within one lookup. The policy key's identities are host-order
//!   `u32`s, so prefixes shorter than 64 bits cover their low bytes first.
//! * Packets of known flows (`ESTABLISHED`, `REPLY`) and allowed later
//!   fragments (`FRAG_ALLOWED`) are counted but not reported; a
//!   malformed, non-IP or later-fragment packet in an unenforced direction
//!   is neither (reason `UNENFORCED` here); an interface with no endpoint
//!   drops silently (reason `NONE`).
//! * A TCP SYN on a FIN_WAIT/CLOSE entry, in either scope, is a new flow
//!   and goes to policy; a reopen that policy denies leaves the old entry
//!   in place (it expires on its close timeout).
//! * The reply lookup is the exact reversed tuple in the other scope; an
//!   ICMP echo's id is both "ports" and the type is not part of the key,
//!   so every non-echo ICMP message between two addresses is one flow.
//! * Malformed, IPv6 and unsupported-L3 events carry a zero 5-tuple;
//!   spoofed-source and untracked-fragment events carry addresses and
//!   protocol but no ports. IPv6 drops when either direction is enforced,
//!   malformed and unsupported-L3 only when this one is.
//! * Conntrack and fragment tables are LRU maps in the kernel; eviction is
//!   not modelled.
//!
//! ```ignore
//! let mut ev = Evaluator::new(&state);
//! let v = ev.evaluate(ifindex, DIR_INGRESS, &Packet::tcp(a, 40000, b, 80, TCP_FLAG_SYN));
//! println!("{} {} cookie={}", v.pass, reason::name(v.reason), v.cookie);
//! ```
use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use palisade_common::{
    decision::{
        self, arp_spoofed, ct_key, ct_use, empty_key, first_fragment_verdict, flow_event,
        foreign_destination, foreign_mac, hard_drop, later_fragment_verdict, new_ct_entry,
        policy_key, policy_lookups, rejudged, rejudged_entry, remote_addr, spoofed, track,
        Decision,
    },
    ipv6::{self as v6, IPPROTO_ICMPV6},
    reason,
    related::quoted4,
    service::HAIRPIN_PEER,
    CtKey, CtKey6, CtKeyOf, CtValue, EndpointInfo, FlowEvent, FragKey, FragKey6, FragValue, Ip6,
    IpcacheValue, PolicyKey, PolicyValue, DIR_EGRESS, POLICY_PREFIX_FULL, PROTO_ICMP, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_DROP,
};

use crate::{
    maps::ct_clock_ns,
    packet::{
        Packet, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
        IPV4_HLEN, SCTP_HLEN, TCP_HLEN, UDP_HLEN,
    },
    state::MapState,
};

/// The verdict on one packet, with everything the kernel makes observable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// TC_ACT_OK (true) or TC_ACT_SHOT (false).
    pub pass: bool,
    /// `VERDICT_ALLOW`, `VERDICT_DROP` or `VERDICT_AUDIT` (a drop that audit
    /// mode let through).
    pub verdict: u8,
    /// Why (`palisade_common::reason`). Also set where the kernel counts
    /// nothing, e.g. `UNENFORCED` for a malformed packet in an unenforced
    /// direction, `NONE` for an interface with no endpoint.
    pub reason: u8,
    /// The policy entry's cookie, or the conntrack entry's for a packet of
    /// a known flow (the kernel reports neither for those).
    pub cookie: u32,
    /// Identities as the kernel reports them (0 where it does not look).
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The `COUNTERS` slot the kernel increments, if any.
    pub counter: Option<u8>,
    /// The ring-buffer event the kernel emits, if any (`ts_ns` is 0).
    pub event: Option<FlowEvent>,
}

impl Verdict {
    /// The tc action the program returns.
    pub fn tc_action(&self) -> u32 {
        if self.pass {
            crate::testrun::TC_ACT_OK
        } else {
            crate::testrun::TC_ACT_SHOT
        }
    }

    fn silent(pass: bool, why: u8, counter: Option<u8>) -> Self {
        Self {
            pass,
            verdict: if pass { VERDICT_ALLOW } else { VERDICT_DROP },
            reason: why,
            cookie: 0,
            src_identity: 0,
            dst_identity: 0,
            counter,
            event: None,
        }
    }
}

/// What the verdict is about (the kernel's `Flow`).
#[derive(Clone, Copy)]
struct Flow<A = u32> {
    key: CtKeyOf<A>,
    tcp_flags: u8,
}

/// The kernel's `verdict::Family`: the tables of one address family.
trait Family: decision::Addr + std::hash::Hash + Eq {
    fn conntrack(e: &mut Evaluator) -> &mut HashMap<CtKeyOf<Self>, CtValue>;
    fn peer(e: &Evaluator, dir: u8, remote: Self) -> IpcacheValue;
}

impl Family for u32 {
    fn conntrack(e: &mut Evaluator) -> &mut HashMap<CtKey, CtValue> {
        &mut e.conntrack
    }
    fn peer(e: &Evaluator, dir: u8, remote: u32) -> IpcacheValue {
        palisade_common::service::policy_peer(dir, remote, |a| {
            e.ipcache_lookup(Ipv4Addr::from(a.to_ne_bytes()))
        })
    }
}

impl Family for Ip6 {
    fn conntrack(e: &mut Evaluator) -> &mut HashMap<CtKey6, CtValue> {
        &mut e.conntrack6
    }
    fn peer(e: &Evaluator, dir: u8, remote: Ip6) -> IpcacheValue {
        palisade_common::service::policy_peer(dir, remote, |a| {
            e.ipcache6_lookup(crate::maps::from_ip6_words(a))
        })
    }
}

/// Which of the three policy lookups matched, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyMatch {
    /// The peer identity of the lookup that hit (exact, CIDR,
    /// `IDENTITY_ANY_POD` or `IDENTITY_ANY`).
    pub peer_identity: u32,
    /// Prefix length and key of the matching entry.
    pub prefix: u32,
    pub key: PolicyKey,
    pub value: PolicyValue,
}

/// The model. Owns copies of the policy maps (from a [`MapState`]) and its
/// own conntrack and fragment tables, which persist across `evaluate` calls
/// exactly as the kernel's LRU maps do (eviction is not modelled).
#[derive(Clone, Debug, Default)]
pub struct Evaluator {
    endpoints: HashMap<u32, EndpointInfo>,
    /// (prefix, masked network-order address bytes, value), longest first.
    ipcache: Vec<(u32, [u8; 4], IpcacheValue)>,
    /// (prefix, masked key bytes as laid out in memory, key, value), longest first.
    policy: Vec<(u32, [u8; 12], PolicyKey, PolicyValue)>,
    conntrack: HashMap<CtKey, CtValue>,
    fragments: HashMap<FragKey, FragValue>,
    /// As `ipcache`, over 16 address bytes (`IPCACHE6`).
    ipcache6: Vec<(u32, [u8; 16], IpcacheValue)>,
    conntrack6: HashMap<CtKey6, CtValue>,
    fragments6: HashMap<FragKey6, FragValue>,
}

impl Evaluator {
    pub fn new(state: &MapState) -> Self {
        let mut e = Self::default();
        e.set_maps(state);
        e
    }

    /// Replace the policy maps (endpoints, ipcache, policy) and keep the
    /// conntrack and fragment tables, as a map sync does in the kernel.
    ///
    /// LPM entries are identified by their prefix bits only: the kernel
    /// keeps one entry for keys that differ beyond their prefix (the last
    /// one written). A `MapState` holding such aliases is ambiguous; here
    /// the numerically largest key wins. Prefixes the kernel would refuse
    /// (> 32 for the ipcache, > 96 for policy) are ignored.
    pub fn set_maps(&mut self, state: &MapState) {
        self.endpoints = state.endpoints.clone();

        // (prefix, masked, raw, ...): longest prefix first, and within one
        // (prefix, masked) the largest raw key first, which dedup keeps.
        let mut ipc: Vec<_> = state
            .ipcache
            .iter()
            .filter(|((_, prefix), _)| *prefix <= 32)
            .map(|(&(addr, prefix), v)| (prefix, mask(&addr.octets(), prefix), addr.octets(), *v))
            .collect();
        ipc.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)));
        ipc.dedup_by(|later, first| (later.0, later.1) == (first.0, first.1));
        self.ipcache = ipc.into_iter().map(|(p, m, _, v)| (p, m, v)).collect();

        let mut ipc6: Vec<_> = state
            .ipcache6
            .iter()
            .filter(|((_, prefix), _)| *prefix <= 128)
            .map(|(&(addr, prefix), v)| (prefix, mask(&addr.octets(), prefix), addr.octets(), *v))
            .collect();
        ipc6.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)));
        ipc6.dedup_by(|later, first| (later.0, later.1) == (first.0, first.1));
        self.ipcache6 = ipc6.into_iter().map(|(p, m, _, v)| (p, m, v)).collect();

        let mut pol: Vec<_> = state
            .policy
            .iter()
            .filter(|((prefix, _), _)| *prefix <= POLICY_PREFIX_FULL)
            .map(|(&(prefix, k), v)| {
                let raw = policy_bytes(&k);
                (prefix, mask(&raw, prefix), raw, k, *v)
            })
            .collect();
        pol.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)));
        pol.dedup_by(|later, first| (later.0, later.1) == (first.0, first.1));
        self.policy = pol
            .into_iter()
            .map(|(p, m, _, k, v)| (p, m, k, v))
            .collect();
    }

    pub fn conntrack(&self) -> &HashMap<CtKey, CtValue> {
        &self.conntrack
    }

    /// E.g. to seed the model with the kernel's live table.
    pub fn conntrack_mut(&mut self) -> &mut HashMap<CtKey, CtValue> {
        &mut self.conntrack
    }

    pub fn fragments(&self) -> &HashMap<FragKey, FragValue> {
        &self.fragments
    }

    pub fn fragments_mut(&mut self) -> &mut HashMap<FragKey, FragValue> {
        &mut self.fragments
    }

    /// Forget all conntrack and fragment state.
    pub fn clear_tracking(&mut self) {
        self.conntrack.clear();
        self.fragments.clear();
        self.conntrack6.clear();
        self.fragments6.clear();
    }

    pub fn conntrack6(&self) -> &HashMap<CtKey6, CtValue> {
        &self.conntrack6
    }

    pub fn conntrack6_mut(&mut self) -> &mut HashMap<CtKey6, CtValue> {
        &mut self.conntrack6
    }

    /// The IPv6 ipcache's longest-prefix match for `addr`, if any.
    pub fn ipcache6_lookup(&self, addr: Ipv6Addr) -> Option<IpcacheValue> {
        let a = addr.octets();
        self.ipcache6
            .iter()
            .find(|(p, m, _)| prefix_eq(&a, m, *p))
            .map(|(_, _, v)| *v)
    }

    pub fn endpoint(&self, ifindex: u32) -> Option<&EndpointInfo> {
        self.endpoints.get(&ifindex)
    }

    /// The ipcache's longest-prefix match for `addr`, if any (the kernel
    /// treats a miss as `IDENTITY_WORLD`).
    pub fn ipcache_lookup(&self, addr: Ipv4Addr) -> Option<IpcacheValue> {
        let a = addr.octets();
        self.ipcache
            .iter()
            .find(|(p, m, _)| prefix_eq(&a, m, *p))
            .map(|(_, _, v)| *v)
    }

    /// One LPM lookup of the policy map with a full (96-bit) key.
    pub fn policy_lookup(&self, key: &PolicyKey) -> Option<(u32, PolicyKey, PolicyValue)> {
        let k = policy_bytes(key);
        self.policy
            .iter()
            .find(|(p, m, _, _)| prefix_eq(&k, m, *p))
            .map(|(p, _, key, v)| (*p, *key, *v))
    }

    /// The kernel's lookups for a new flow (exact peer, the peer's CIDR
    /// identity, any pod if the peer is a pod, any peer); the first hit.
    pub fn policy_match(
        &self,
        endpoint_id: u32,
        peer: IpcacheValue,
        dir: u8,
        protocol: u8,
        dport: u16,
    ) -> Option<PolicyMatch> {
        let ep = EndpointInfo {
            endpoint_id,
            identity: 0,
            ipv4: 0,
            flags: 0,
            generation: 0,
            mac: [0; 6],
            _pad: [0; 2],
            ipv6: [0; 4],
        };
        let flow = ct_key(endpoint_id, 0, 0, 0, dport.to_be(), protocol, dir);
        let mut k = policy_key(&ep, dir, &flow, &peer);
        policy_lookups(&mut k, &peer, ep.flags, |k, _| {
            self.policy_lookup(k)
                .map(|(prefix, key, value)| PolicyMatch {
                    peer_identity: k.peer_identity,
                    prefix,
                    key,
                    value,
                })
        })
    }

    /// The verdict on `packet` arriving at the program of direction `dir`
    /// on interface `ifindex`, now (the programs' conntrack clock,
    /// `maps::ct_clock_ns`).
    pub fn evaluate(&mut self, ifindex: u32, dir: u8, packet: &Packet) -> Verdict {
        self.evaluate_frame_at(ct_clock_ns(), ifindex, dir, &packet.bytes())
    }

    /// As `evaluate`, at time `now_ns`.
    pub fn evaluate_at(&mut self, now_ns: u64, ifindex: u32, dir: u8, packet: &Packet) -> Verdict {
        self.evaluate_frame_at(now_ns, ifindex, dir, &packet.bytes())
    }

    /// The verdict on a raw Ethernet frame: `process()` in verdict.rs.
    pub fn evaluate_frame_at(&mut self, now: u64, ifindex: u32, dir: u8, f: &[u8]) -> Verdict {
        let Some(mut ep) = self.endpoints.get(&ifindex).copied() else {
            // Err(()) in the kernel: TC_ACT_SHOT, nothing counted or reported.
            return Verdict::silent(false, reason::NONE, None);
        };
        // A frame evaluated here carries no local delivery mark: to the
        // pod, it came through the node's stack (`palisade_common::local`).
        if dir == palisade_common::DIR_INGRESS {
            ep.flags |= palisade_common::EP_VIA_STACK;
        }

        if f.len() < ETH_HLEN {
            return drop_unchecked(&ep, dir, ifindex, reason::MALFORMED);
        }
        let mac = |o: usize| -> [u8; 6] { f[o..o + 6].try_into().expect("6 bytes") };
        let (dst_mac, src_mac) = (mac(0), mac(6));
        // Layer 2 first: every frame from the pod carries its MAC. (The
        // IPv6 programs report with an IPv6 event.)
        if let Some(d) = foreign_mac(&ep, dir, &src_mac, &dst_mac) {
            if be16(f, 12) == ETH_P_IPV6 {
                let flow = Flow::<Ip6> {
                    key: decision::empty_key(dir),
                    tcp_flags: 0,
                };
                return finish(&ep, ifindex, &flow, &d);
            }
            return report_drop(&ep, dir, ifindex, Some(d));
        }
        match be16(f, 12) {
            ETH_P_IP => {}
            ETH_P_ARP => {
                if dir == DIR_EGRESS {
                    // The kernel's ArpHdr: 18 bytes up to the sender's addresses.
                    if f.len() < ETH_HLEN + 18 {
                        return drop_unchecked(&ep, dir, ifindex, reason::MALFORMED);
                    }
                    let a = &f[ETH_HLEN..];
                    let spa = ne32(a, 14);
                    let sha: [u8; 6] = a[8..14].try_into().expect("6 bytes");
                    if let Some(d) = arp_spoofed(&ep, dir, (a[4], a[5]), spa, &sha, &src_mac) {
                        return report_drop(&ep, dir, ifindex, Some(d));
                    }
                }
                return Verdict::silent(true, reason::NOT_IP, Some(reason::NOT_IP));
            }
            ETH_P_IPV6 => return self.ipv6(now, &ep, dir, ifindex, f),
            _ => return drop_if_enforced(&ep, dir, ifindex, reason::UNSUPPORTED_L3),
        }

        if f.len() < ETH_HLEN + IPV4_HLEN {
            return drop_unchecked(&ep, dir, ifindex, reason::MALFORMED);
        }
        let ip = &f[ETH_HLEN..];
        let ver_ihl = ip[0];
        let tot_len = be16(ip, 2) as usize;
        let id_be = ne16(ip, 4);
        let frag_off = be16(ip, 6);
        let protocol = ip[9];
        let saddr = ne32(ip, 12);
        let daddr = ne32(ip, 16);
        // Anti-spoofing first, for every frame from a registered pod,
        // enforced or not, well-formed or not.
        if let Some(d) = spoofed(&ep, dir, saddr) {
            let flow = Flow {
                key: ct_key(ep.endpoint_id, saddr, daddr, 0, 0, protocol, dir),
                tcp_flags: 0,
            };
            return finish(&ep, ifindex, &flow, &d);
        }
        // Every frame to a pod is addressed to it.
        if let Some(d) = foreign_destination(&ep, dir, daddr) {
            let flow = Flow {
                key: ct_key(ep.endpoint_id, saddr, daddr, 0, 0, protocol, dir),
                tcp_flags: 0,
            };
            return finish(&ep, ifindex, &flow, &d);
        }

        let ihl = (ver_ihl & 0x0f) as usize * 4;
        // The whole header, options included, must be in the frame.
        if ver_ihl >> 4 != 4 || ihl < IPV4_HLEN || tot_len < ihl || ETH_HLEN + ihl > f.len() {
            return drop_if_enforced(&ep, dir, ifindex, reason::MALFORMED);
        }

        let frag_key = FragKey {
            saddr,
            daddr,
            id_be,
            protocol,
            scope: dir,
            endpoint_id: ep.endpoint_id,
        };
        if frag_off & 0x1fff != 0 {
            return self.later_fragment(now, &ep, dir, ifindex, &frag_key);
        }

        let l4 = ETH_HLEN + ihl;
        // The transport header must lie inside the frame and inside the
        // datagram (total length).
        let l4_room = tot_len - ihl;
        let fits = |len: usize| l4 + len <= f.len() && len <= l4_room;
        let mut flow = Flow {
            key: ct_key(ep.endpoint_id, saddr, daddr, 0, 0, protocol, dir),
            tcp_flags: 0,
        };
        let mut icmp_type = 0xff;
        let parsed = match protocol {
            PROTO_TCP if fits(TCP_HLEN) => {
                flow.key.sport_be = ne16(f, l4);
                flow.key.dport_be = ne16(f, l4 + 2);
                flow.tcp_flags = f[l4 + 13];
                f[l4 + 12] >> 4 >= 5
            }
            PROTO_UDP | PROTO_SCTP => {
                let need = if protocol == PROTO_SCTP {
                    SCTP_HLEN
                } else {
                    UDP_HLEN
                };
                if fits(need) {
                    flow.key.sport_be = ne16(f, l4);
                    flow.key.dport_be = ne16(f, l4 + 2);
                    true
                } else {
                    false
                }
            }
            PROTO_ICMP if fits(8) => {
                let t = f[l4];
                icmp_type = t;
                if t == ICMP_ECHO_REQUEST || t == ICMP_ECHO_REPLY {
                    let id = ne16(f, l4 + 4);
                    flow.key.sport_be = id;
                    flow.key.dport_be = id;
                }
                true
            }
            PROTO_TCP | PROTO_ICMP => false,
            _ => true,
        };
        if !parsed {
            return drop_if_enforced(&ep, dir, ifindex, reason::MALFORMED);
        }

        let error = protocol == PROTO_ICMP && palisade_common::related::is_error4(icmp_type);
        let v = if error && self.related(now, &ep, dir, &quoted4(|o| f.get(l4 + o).copied())) {
            Verdict::silent(true, reason::RELATED, Some(reason::RELATED))
        } else {
            self.track_and_decide(now, &ep, dir, ifindex, &flow)
        };
        if frag_off & 0x2000 != 0 {
            // First fragment: the rest of the datagram inherits this verdict.
            let (expires_ns, verdict) = first_fragment_verdict(v.pass, now);
            let fv = FragValue {
                expires_ns,
                verdict,
                _pad: 0,
            };
            self.fragments.insert(frag_key, fv);
        }
        v
    }

    fn track_and_decide<A: Family>(
        &mut self,
        now: u64,
        ep: &EndpointInfo,
        dir: u8,
        ifindex: u32,
        flow: &Flow<A>,
    ) -> Verdict {
        let key = flow.key;

        let conntrack = A::conntrack(self);
        let known = track(&key, dir, flow.tcp_flags, |k, reply| {
            let ct = conntrack.get_mut(k)?;
            let stale = ct_use(ct, ep, k.protocol, flow.tcp_flags, reply, now)?;
            Some((ct.cookie, stale))
        });
        if let Some(t) = known {
            let mut cookie = t.cookie;
            if t.stale {
                // `rejudge` in verdict.rs.
                let k = t.key;
                let d = rejudged(self.rejudge_decision(ep, &k));
                if !d.pass {
                    A::conntrack(self).remove(&k);
                    return finish(ep, ifindex, flow, &d);
                }
                if let Some(ct) = A::conntrack(self).get_mut(&k) {
                    let reply = t.why == reason::REPLY;
                    rejudged_entry(ct, ep, &d, flow.tcp_flags, reply, now, k.protocol);
                }
                cookie = d.cookie;
            }
            let mut v = Verdict::silent(true, t.why, Some(t.why));
            v.cookie = cookie;
            return v;
        }

        let d = self.decide_new_flow(ep, dir, &key);
        if decision::records_entry(&d, key.protocol, flow.tcp_flags) {
            A::conntrack(self).insert(key, new_ct_entry(ep, &d, key.protocol, flow.tcp_flags, now));
        }
        finish(ep, ifindex, flow, &d)
    }

    /// The kernel's `new_flow_policy`: `decide`, then a
    /// ClusterNetworkPolicy's deny of the pod's own node.
    fn decide_new_flow<A: Family>(&self, ep: &EndpointInfo, dir: u8, key: &CtKeyOf<A>) -> Decision {
        let peer = A::peer(self, dir, remote_addr(key, dir));
        // One map: every lookup reads it whole (`decision::Reads`).
        let lookup = |k: &PolicyKey, _| self.policy_lookup(k).map(|(_, _, v)| v);
        let d = decision::decide(ep, dir, key, &peer, lookup);
        decision::own_node_checked(ep, dir, key, &peer, d, lookup)
    }

    /// `decision::decide` over this model's maps, with the same lookups.
    /// The verdict a stale entry `k` is judged on again: the entry's own
    /// flow, in its own scope, as a new flow (no Services in this model); a
    /// hairpin is the pod talking to itself.
    fn rejudge_decision<A: Family>(&self, ep: &EndpointInfo, k: &CtKeyOf<A>) -> Decision {
        if k.scope == DIR_EGRESS && k.daddr == A::own(ep) {
            decision::decide(ep, DIR_EGRESS, k, &HAIRPIN_PEER, |_, _| None)
        } else {
            self.decide(ep, k.scope, k)
        }
    }

    fn decide<A: Family>(&self, ep: &EndpointInfo, dir: u8, key: &CtKeyOf<A>) -> Decision {
        decision::decide(
            ep,
            dir,
            key,
            &A::peer(self, dir, remote_addr(key, dir)),
            |k, _| self.policy_lookup(k).map(|(_, _, v)| v),
        )
    }

    fn later_fragment(
        &self,
        now: u64,
        ep: &EndpointInfo,
        dir: u8,
        ifindex: u32,
        key: &FragKey,
    ) -> Verdict {
        if let Some(v) = self.fragments.get(key) {
            match later_fragment_verdict(v.expires_ns, v.verdict, now) {
                Some(true) => {
                    return Verdict::silent(true, reason::FRAG_ALLOWED, Some(reason::FRAG_ALLOWED))
                }
                Some(false) => {
                    let d = hard_drop(ep, reason::FRAG_DENIED, dir);
                    return finish(ep, ifindex, &frag_flow(key, dir), &d);
                }
                None => {}
            }
        }
        match decision::drop_if_enforced(ep, dir, reason::FRAG_UNTRACKED) {
            None => Verdict::silent(true, reason::UNENFORCED, None),
            Some(d) => finish(ep, ifindex, &frag_flow(key, dir), &d),
        }
    }

    /// The kernel's `verdict6::process`.
    fn ipv6(&mut self, now: u64, ep: &EndpointInfo, dir: u8, ifindex: u32, f: &[u8]) -> Verdict {
        let hdr = ETH_HLEN + v6::IPV6_HLEN;
        if f.len() < hdr {
            return drop_unchecked(ep, dir, ifindex, reason::MALFORMED);
        }
        let ip = &f[ETH_HLEN..];
        let read = |off: usize| ip.get(off).copied();
        let words = |at: usize| -> Ip6 { std::array::from_fn(|i| ne32(ip, at + 4 * i)) };
        let (payload_len, hop_limit, saddr, daddr) =
            (be16(ip, 4) as usize, ip[7], words(8), words(24));
        let upper = v6::upper_layer(read);
        let report6 = |d: Option<Decision>| match d {
            None => Verdict::silent(true, reason::UNENFORCED, None),
            Some(d) => finish(
                ep,
                ifindex,
                &Flow::<Ip6> {
                    key: decision::empty_key(dir),
                    tcp_flags: 0,
                },
                &d,
            ),
        };
        if v6::unknown_upper(dir, &upper) {
            return report6(Some(hard_drop(ep, reason::MALFORMED, dir)));
        }
        let (protocol, offset) = (upper.protocol, upper.offset);
        // The kernel reads the frame as far as it goes: bytes past the
        // frame are missing, past the payload length cut by `room`.
        let room = (payload_len + v6::IPV6_HLEN).saturating_sub(offset);
        let t = v6::transport(protocol, offset, room, read);
        if protocol == IPPROTO_ICMPV6 && upper.kind == v6::UPPER_AT && t.ok {
            let node = |a: &Ip6| {
                self.ipcache6_lookup(crate::maps::from_ip6_words(*a))
                    .is_some_and(|v| v.identity == palisade_common::IDENTITY_HOST)
            };
            match v6::link_control(dir, t.icmp_type, hop_limit, &saddr, &daddr, &ep.ipv6, node) {
                Some(reason::NOT_IP) => {
                    return Verdict::silent(true, reason::NOT_IP, Some(reason::NOT_IP))
                }
                Some(r) => return report6(Some(hard_drop(ep, r, dir))),
                None => {}
            }
        }
        let bare = Flow {
            key: decision::key_of(ep.endpoint_id, saddr, daddr, 0, 0, protocol, dir),
            tcp_flags: 0,
        };
        if let Some(d) = spoofed(ep, dir, saddr).or_else(|| foreign_destination(ep, dir, daddr)) {
            return finish(ep, ifindex, &bare, &d);
        }
        if ip[0] >> 4 != 6 || upper.kind == v6::UPPER_UNKNOWN {
            return report6(decision::drop_if_enforced(ep, dir, reason::MALFORMED));
        }
        let frag_key = |id: u32| FragKey6 {
            saddr,
            daddr,
            id,
            protocol: 0,
            scope: dir,
            _pad: 0,
            endpoint_id: ep.endpoint_id,
        };
        if upper.kind == v6::UPPER_LATER_FRAGMENT {
            let first = self.fragments6.get(&frag_key(upper.frag_id)).copied();
            let flow = Flow {
                key: decision::key_of(0, saddr, daddr, 0, 0, 0, dir),
                tcp_flags: 0,
            };
            return later_fragment_of(now, ep, dir, ifindex, first, &flow);
        }
        if !t.ok {
            return report6(decision::drop_if_enforced(ep, dir, reason::MALFORMED));
        }
        let flow = Flow {
            key: decision::key_of(
                ep.endpoint_id,
                saddr,
                daddr,
                t.sport_be,
                t.dport_be,
                protocol,
                dir,
            ),
            tcp_flags: t.tcp_flags,
        };
        let error = protocol == IPPROTO_ICMPV6 && v6::is_error(t.icmp_type);
        let v = if error && self.related(now, ep, dir, &v6::quoted(offset, read)) {
            Verdict::silent(true, reason::RELATED, Some(reason::RELATED))
        } else {
            self.track_and_decide(now, ep, dir, ifindex, &flow)
        };
        if upper.fragmented {
            let (expires_ns, verdict) = first_fragment_verdict(v.pass, now);
            self.fragments6.insert(
                frag_key(upper.frag_id),
                FragValue {
                    expires_ns,
                    verdict,
                    _pad: 0,
                },
            );
        }
        v
    }

    /// The kernel's `verdict::related_flow`.
    fn related<A: Family>(
        &mut self,
        now: u64,
        ep: &EndpointInfo,
        dir: u8,
        q: &palisade_common::related::Quote<A>,
    ) -> bool {
        if !q.ok {
            return false;
        }
        let (own, rev) = q.keys(ep.endpoint_id, dir);
        let table = A::conntrack(self);
        let live = |k: &CtKeyOf<A>| {
            table.get(k).is_some_and(|ct| {
                decision::ct_live(ct, q.protocol, 0, now) && !decision::ct_stale(ct, ep)
            })
        };
        live(&own) || live(&rev)
    }
}

/// The kernel's `later_fragment_of`, for IPv6 (the IPv4 one above reads
/// its own table).
fn later_fragment_of(
    now: u64,
    ep: &EndpointInfo,
    dir: u8,
    ifindex: u32,
    first: Option<FragValue>,
    flow: &Flow<Ip6>,
) -> Verdict {
    if let Some(v) = first {
        match later_fragment_verdict(v.expires_ns, v.verdict, now) {
            Some(true) => {
                return Verdict::silent(true, reason::FRAG_ALLOWED, Some(reason::FRAG_ALLOWED))
            }
            Some(false) => {
                return finish(ep, ifindex, flow, &hard_drop(ep, reason::FRAG_DENIED, dir))
            }
            None => {}
        }
    }
    match decision::drop_if_enforced(ep, dir, reason::FRAG_UNTRACKED) {
        None => Verdict::silent(true, reason::UNENFORCED, None),
        Some(d) => finish(ep, ifindex, flow, &d),
    }
}

/// Fragments carry no ports after the first.
fn frag_flow(key: &FragKey, dir: u8) -> Flow {
    Flow {
        key: ct_key(0, key.saddr, key.daddr, 0, 0, key.protocol, dir),
        tcp_flags: 0,
    }
}

fn drop_if_enforced(ep: &EndpointInfo, dir: u8, ifindex: u32, why: u8) -> Verdict {
    report_drop(ep, dir, ifindex, decision::drop_if_enforced(ep, dir, why))
}

/// The kernel's `drop_unchecked`: a frame whose source cannot be read.
fn drop_unchecked(ep: &EndpointInfo, dir: u8, ifindex: u32, why: u8) -> Verdict {
    report_drop(ep, dir, ifindex, decision::unchecked_source(ep, dir, why))
}

fn report_drop(ep: &EndpointInfo, dir: u8, ifindex: u32, d: Option<Decision>) -> Verdict {
    match d {
        None => Verdict::silent(true, reason::UNENFORCED, None),
        Some(d) => {
            let flow = Flow {
                key: empty_key::<u32>(dir),
                tcp_flags: 0,
            };
            finish(ep, ifindex, &flow, &d)
        }
    }
}

/// Counted and reported: the kernel's `finish`.
fn finish<A: decision::Addr>(
    ep: &EndpointInfo,
    ifindex: u32,
    flow: &Flow<A>,
    d: &Decision,
) -> Verdict {
    Verdict {
        pass: d.pass,
        verdict: d.verdict,
        reason: d.reason,
        cookie: d.cookie,
        src_identity: d.src_identity,
        dst_identity: d.dst_identity,
        counter: Some(d.reason),
        event: Some(flow_event(0, ep.endpoint_id, ifindex, &flow.key, d, 0)),
    }
}

/// A policy key's bytes as the LPM trie sees them: the struct's memory, so
/// the u32 identities are in host byte order and the port in network order.
pub fn policy_bytes(k: &PolicyKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&k.endpoint_id.to_ne_bytes());
    b[4..8].copy_from_slice(&k.peer_identity.to_ne_bytes());
    b[8] = k.direction;
    b[9] = k.protocol;
    b[10..12].copy_from_slice(&k.dport_be.to_ne_bytes());
    b
}

/// `bytes` with every bit past the first `prefix` cleared.
fn mask<const N: usize>(bytes: &[u8; N], prefix: u32) -> [u8; N] {
    let mut out = *bytes;
    for (i, b) in out.iter_mut().enumerate() {
        let first = i as u32 * 8;
        if prefix <= first {
            *b = 0;
        } else if prefix < first + 8 {
            *b &= 0xffu8 << (8 - (prefix - first));
        }
    }
    out
}

/// True when the first `prefix` bits of `key` equal `masked` (already masked).
fn prefix_eq<const N: usize>(key: &[u8; N], masked: &[u8; N], prefix: u32) -> bool {
    mask(key, prefix) == *masked
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// Raw (network-order) 16 bits as the kernel's `u16` fields hold them.
fn ne16(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn ne32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{TCP_FLAG_ACK, TCP_FLAG_SYN};
    use palisade_common::{
        ACTION_ALLOW, ACTION_DENY, DIR_EGRESS, DIR_INGRESS, EP_INGRESS_ENFORCED, IDENTITY_WORLD,
        POLICY_PREFIX_FIXED, POLICY_PREFIX_PROTO,
    };

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn state() -> MapState {
        let mut s = MapState::default();
        s.endpoints.insert(
            7,
            EndpointInfo {
                endpoint_id: 2,
                identity: 1002,
                ipv4: u32::from_ne_bytes(B.octets()),
                flags: EP_INGRESS_ENFORCED,
                generation: 0,
                mac: [0; 6],
                _pad: [0; 2],
                ipv6: [0; 4],
            },
        );
        s.ipcache.insert(
            (A, 32),
            IpcacheValue {
                identity: 1001,
                cidr_identity: 300,
            },
        );
        s.ipcache.insert(
            (Ipv4Addr::new(10, 0, 0, 0), 8),
            IpcacheValue {
                identity: 300,
                cidr_identity: 300,
            },
        );
        s
    }

    fn key(peer: u32, proto: u8, port: u16) -> PolicyKey {
        PolicyKey {
            endpoint_id: 2,
            peer_identity: peer,
            direction: DIR_INGRESS,
            protocol: proto,
            dport_be: port.to_be(),
        }
    }

    #[test]
    fn masks_and_prefixes() {
        assert_eq!(mask(&[0xff, 0xff], 12), [0xff, 0xf0]);
        assert_eq!(mask(&[0xff, 0xff], 0), [0, 0]);
        assert_eq!(mask(&[0xab, 0xcd], 16), [0xab, 0xcd]);
        assert!(prefix_eq(&[10, 1, 2, 3], &[10, 0, 0, 0], 8));
        assert!(!prefix_eq(&[11, 1, 2, 3], &[10, 0, 0, 0], 8));
    }

    #[test]
    fn lookups_follow_lpm_and_order() {
        let mut s = state();
        // Ports 8080-8083 (a /94 port prefix) for the CIDR identity.
        s.policy.insert(
            (94, key(300, PROTO_TCP, 8080)),
            PolicyValue {
                action: ACTION_ALLOW,
                cookie: 1,
            },
        );
        s.policy.insert(
            (POLICY_PREFIX_PROTO, key(0, PROTO_TCP, 0)),
            PolicyValue {
                action: ACTION_DENY,
                cookie: 2,
            },
        );
        let ev = Evaluator::new(&s);
        let peer = ev.ipcache_lookup(A).unwrap();
        assert_eq!(peer.identity, 1001);
        assert_eq!(
            ev.ipcache_lookup(Ipv4Addr::new(10, 9, 9, 9))
                .unwrap()
                .identity,
            300
        );
        assert!(ev.ipcache_lookup(Ipv4Addr::new(11, 0, 0, 1)).is_none());
        let m = ev
            .policy_match(2, peer, DIR_INGRESS, PROTO_TCP, 8083)
            .unwrap();
        assert_eq!((m.peer_identity, m.value.cookie), (300, 1));
        let m = ev
            .policy_match(2, peer, DIR_INGRESS, PROTO_TCP, 8084)
            .unwrap();
        assert_eq!((m.peer_identity, m.value.cookie), (0, 2));
        assert!(ev
            .policy_match(2, peer, DIR_INGRESS, PROTO_UDP, 8080)
            .is_none());
    }

    #[test]
    fn lpm_entries_are_identified_by_their_prefix_bits() {
        let mut s = state();
        // Host bits past the prefix are ignored; of two aliases the
        // numerically larger key stands in for the kernel's last write.
        s.ipcache.insert(
            (Ipv4Addr::new(192, 0, 2, 1), 24),
            IpcacheValue {
                identity: 7,
                cidr_identity: 7,
            },
        );
        s.ipcache.insert(
            (Ipv4Addr::new(192, 0, 2, 9), 24),
            IpcacheValue {
                identity: 8,
                cidr_identity: 8,
            },
        );
        // A /32 policy prefix covers the endpoint id only: every peer,
        // direction, protocol and port. The u32 is in host byte order.
        s.policy.insert(
            (32, key(4242, 17, 9)),
            PolicyValue {
                action: ACTION_ALLOW,
                cookie: 3,
            },
        );
        let ev = Evaluator::new(&s);
        assert_eq!(
            ev.ipcache_lookup(Ipv4Addr::new(192, 0, 2, 200))
                .unwrap()
                .identity,
            8
        );
        let (prefix, _, v) = ev.policy_lookup(&key(1, PROTO_TCP, 443)).unwrap();
        assert_eq!((prefix, v.cookie), (32, 3));
        let other = PolicyKey {
            endpoint_id: 3,
            ..key(1, PROTO_TCP, 443)
        };
        assert!(ev.policy_lookup(&other).is_none());
        // A little-endian /8 covers the low byte of the endpoint id.
        let mut s = state();
        s.policy.insert(
            (
                8,
                PolicyKey {
                    endpoint_id: 0x0102,
                    ..key(0, 0, 0)
                },
            ),
            PolicyValue {
                action: ACTION_ALLOW,
                cookie: 4,
            },
        );
        let ev = Evaluator::new(&s);
        let low = PolicyKey {
            endpoint_id: 0x7702,
            ..key(1, PROTO_TCP, 1)
        };
        assert_eq!(ev.policy_lookup(&low).map(|e| e.2.cookie), Some(4));
        let high = PolicyKey {
            endpoint_id: 0x0103,
            ..key(1, PROTO_TCP, 1)
        };
        assert!(ev.policy_lookup(&high).is_none());
    }

    #[test]
    fn new_flow_then_established_then_reply() {
        let mut s = state();
        s.policy.insert(
            (POLICY_PREFIX_FIXED, key(1001, 0, 0)),
            PolicyValue {
                action: ACTION_ALLOW,
                cookie: 9,
            },
        );
        let mut ev = Evaluator::new(&s);
        let syn = Packet::tcp(A, 40000, B, 80, TCP_FLAG_SYN);
        let v = ev.evaluate_at(1, 7, DIR_INGRESS, &syn);
        assert!(v.pass);
        assert_eq!(
            (v.reason, v.cookie, v.src_identity, v.dst_identity),
            (reason::POLICY_ALLOW, 9, 1001, 1002)
        );
        assert!(v.event.is_some());
        let v = ev.evaluate_at(2, 7, DIR_INGRESS, &syn.clone().with_tcp_flags(TCP_FLAG_ACK));
        assert_eq!(
            (v.pass, v.reason, v.event),
            (true, reason::ESTABLISHED, None)
        );
        let v = ev.evaluate_at(3, 7, DIR_EGRESS, &syn.reply(TCP_FLAG_SYN | TCP_FLAG_ACK));
        assert_eq!((v.pass, v.reason), (true, reason::REPLY));
        let v = ev.evaluate_at(
            4,
            7,
            DIR_EGRESS,
            &Packet::udp(B, 5000, Ipv4Addr::new(192, 0, 2, 1), 53),
        );
        assert_eq!(
            (v.pass, v.reason, v.dst_identity),
            (true, reason::UNENFORCED, IDENTITY_WORLD)
        );
    }
}
