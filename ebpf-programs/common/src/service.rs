//! Service translation maps and the rules shared by the kernel and the
//! reference evaluator.
//!
//! Layouts (all `#[repr(C)]`, padding-free, addresses and ports in network
//! order as read from the packet):
//! - `SVC_FRONTENDS` (hash): [`SvcFrontendKey`] (ClusterIP, port, protocol)
//!   -> [`SvcFrontend`] (service id, backend count, flags).
//! - `SVC_BACKENDS` (hash): [`SvcBackendKey`] (service id, slot
//!   `0..backends`) -> [`SvcBackend`] (pod address, target port).
//! - An IPv4 translated flow's translation lives in its two conntrack
//!   entries (`CtValue::nat_addr`): the original tuple's (client ->
//!   ClusterIP, scope egress, `CT_SVC_FWD`) holds the chosen backend, the
//!   translated tuple's the ClusterIP:port its replies must come from. A
//!   flow keeps its backend while its original tuple's entry lives,
//!   whatever happens to the backend list meanwhile.
//! - `SVC_NAT` (LRU hash): conntrack-style keys -> [`SvcNat`], for what
//!   the entries cannot carry: a hairpin's reverse translation, keyed by
//!   the reply as the pod's egress sees it (pod -> [`HAIRPIN_ADDR`]),
//!   whose conntrack entry is the pod's own ingress one.
//! - `SVC_AFFINITY` (LRU hash): [`SvcAffinityKey`] (client, service id) ->
//!   [`SvcAffinity`], for `sessionAffinity: ClientIP` frontends only.
//!
//! IPv6 has the same four maps (`SVC_FRONTENDS6`, `SVC_BACKENDS6`,
//! `SVC_NAT6`, `SVC_AFFINITY6`); `SVC_NAT6` holds both of a flow's
//! translations (forward, by its original tuple, and reverse, by its
//! reply), which 16-byte addresses leave no room for in `CtValue`. The
//! key and value types are generic over the address ([`SvcAddr`]), `*6`
//! aliases for IPv6. Backend slot keys and service ids are shared: one id
//! space, so a flow record's `service_id` names its Service whatever the
//! family.
use crate::{decision::Addr, CtKeyOf, Ip6, IpcacheValue, DIR_EGRESS, DIR_INGRESS};

/// Source address a hairpinned flow (a pod reaching its own Service and
/// chosen as its backend) carries towards the pod: the pod would drop a
/// packet from its own address arriving on eth0. Link-local, never a pod's
/// address; only palisade's translation produces it (pods cannot send from
/// it: anti-spoofing), so the pod's ingress judges it as the pod itself.
pub const HAIRPIN_ADDR: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

/// IPv6's [`HAIRPIN_ADDR`]: `100::42:1`, in the discard-only prefix
/// (RFC 6666), never a pod's address and reached from a pod through its
/// default route (a link-local source would need neighbour discovery).
pub const HAIRPIN_ADDR6: Ip6 = [
    u32::from_ne_bytes([0x01, 0, 0, 0]),
    0,
    0,
    u32::from_ne_bytes([0, 0x42, 0, 1]),
];

/// What Service translation needs of an address family beyond [`Addr`].
pub trait SvcAddr: Addr {
    /// The hairpin source ([`HAIRPIN_ADDR`], [`HAIRPIN_ADDR6`]).
    const HAIRPIN: Self;
    /// The address folded to 32 bits for [`backend_slot`] (IPv4: itself).
    fn fold(&self) -> u32;
    /// The outside world of this family, for an ipcache miss.
    fn peer_or_world(hit: Option<IpcacheValue>) -> IpcacheValue;
}

impl SvcAddr for u32 {
    const HAIRPIN: Self = HAIRPIN_ADDR;
    #[inline(always)]
    fn fold(&self) -> u32 {
        *self
    }
    #[inline(always)]
    fn peer_or_world(hit: Option<IpcacheValue>) -> IpcacheValue {
        crate::decision::peer_or_world(hit)
    }
}

impl SvcAddr for Ip6 {
    const HAIRPIN: Self = HAIRPIN_ADDR6;
    #[inline(always)]
    fn fold(&self) -> u32 {
        self[0] ^ self[1].rotate_left(8) ^ self[2].rotate_left(16) ^ self[3].rotate_left(24)
    }
    #[inline(always)]
    fn peer_or_world(hit: Option<IpcacheValue>) -> IpcacheValue {
        crate::decision::peer_or_world6(hit)
    }
}

/// `SvcNat::flags`: the reverse entry of a hairpinned flow (the reply
/// leaves the pod towards [`HAIRPIN_ADDR`] and is turned back into the pod).
pub const NAT_HAIRPIN: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcFrontendKeyOf<A> {
    pub addr: A,
    pub port_be: u16,
    pub protocol: u8,
    pub _pad: u8,
}

pub type SvcFrontendKey = SvcFrontendKeyOf<u32>;
pub type SvcFrontendKey6 = SvcFrontendKeyOf<Ip6>;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcFrontend {
    /// Stable while the frontend exists; also `FlowEvent::service_id`. Never 0.
    pub service_id: u32,
    /// Number of `SVC_BACKENDS` slots; 0 refuses new flows
    /// (`reason::NO_SERVICE_BACKEND`).
    pub backends: u32,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its backend
    /// after its last new flow (`SVC_AFFINITY`); 0 = no affinity.
    pub affinity_s: u32,
}

/// `SVC_AFFINITY` (LRU hash) key: a client of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcAffinityKeyOf<A> {
    pub client: A,
    pub service_id: u32,
}

pub type SvcAffinityKey = SvcAffinityKeyOf<u32>;
pub type SvcAffinityKey6 = SvcAffinityKeyOf<Ip6>;

/// The backend a client of a `sessionAffinity: ClientIP` frontend was last
/// given, and when. Valid while the slot still holds that backend (a
/// backend that left the Service releases its clients, as kube-proxy's
/// per-endpoint `recent` lists do) and the timeout has not run out since.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcAffinity {
    pub last_ns: u64,
    pub slot: u32,
    pub addr: u32,
    pub port_be: u16,
    pub _pad: [u8; 6],
}

/// IPv6's [`SvcAffinity`] (fields ordered so neither has padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcAffinity6 {
    pub last_ns: u64,
    pub slot: u32,
    pub port_be: u16,
    pub _pad: u16,
    pub addr: Ip6,
}

/// Whether an affinity entry written at `last_ns` still holds at `now`
/// (kube-proxy: `recent --rcheck --seconds T`, renewed by every new flow).
#[inline(always)]
pub fn affinity_holds(last_ns: u64, timeout_s: u32, now: u64) -> bool {
    timeout_s != 0 && now.wrapping_sub(last_ns) < timeout_s as u64 * 1_000_000_000
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcBackendKey {
    pub service_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcBackendOf<A> {
    pub addr: A,
    pub port_be: u16,
    pub _pad: u16,
}

pub type SvcBackend = SvcBackendOf<u32>;
pub type SvcBackend6 = SvcBackendOf<Ip6>;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcNatOf<A> {
    /// Forward: the backend. Reverse: the ClusterIP.
    pub addr: A,
    pub port_be: u16,
    /// `NAT_HAIRPIN`
    pub flags: u8,
    pub _pad: u8,
    pub service_id: u32,
}

pub type SvcNat = SvcNatOf<u32>;
pub type SvcNat6 = SvcNatOf<Ip6>;

/// The backend slot of a new flow: a hash of its original tuple (every
/// bit of it reaches every bit of the result: murmur3's finalizer), so a
/// retransmitted first packet picks the same backend and consecutive
/// client ports spread over all of them.
#[inline(always)]
pub fn backend_slot<A: SvcAddr>(key: &CtKeyOf<A>, backends: u32) -> u32 {
    let ports = (key.sport_be as u32) << 16 | key.dport_be as u32;
    let mut h = fmix32(key.saddr.fold() ^ 0x9e37_79b9);
    h = fmix32(h ^ key.daddr.fold());
    h = fmix32(h ^ ports ^ (key.protocol as u32) << 8);
    if backends == 0 {
        0
    } else {
        h % backends
    }
}

#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The tuple policy and conntrack see after translation.
#[inline(always)]
pub fn translated<A: Copy>(orig: &CtKeyOf<A>, backend: A, port_be: u16) -> CtKeyOf<A> {
    CtKeyOf {
        daddr: backend,
        dport_be: port_be,
        ..*orig
    }
}

/// The reverse entry's key: the reply as the program that turns it back
/// sees it. Normally the client's ingress (backend -> client); for a
/// hairpin the client's own egress (pod -> [`HAIRPIN_ADDR`]).
#[inline(always)]
pub fn reverse_key<A: SvcAddr>(
    orig: &CtKeyOf<A>,
    backend: A,
    port_be: u16,
    hairpin: bool,
) -> CtKeyOf<A> {
    if hairpin {
        CtKeyOf {
            saddr: backend,
            daddr: A::HAIRPIN,
            sport_be: port_be,
            dport_be: orig.sport_be,
            protocol: orig.protocol,
            scope: DIR_EGRESS,
            _pad: 0,
            endpoint_id: orig.endpoint_id,
        }
    } else {
        CtKeyOf {
            saddr: backend,
            daddr: orig.saddr,
            sport_be: port_be,
            dport_be: orig.sport_be,
            protocol: orig.protocol,
            scope: DIR_INGRESS,
            _pad: 0,
            endpoint_id: orig.endpoint_id,
        }
    }
}

/// A hairpinned flow (a pod reaching its own Service and given itself as
/// the backend) is the pod talking to itself: policy never judges that
/// (a pod's traffic to itself never leaves it when sent to its own
/// address), and under kube-proxy it is masqueraded to the node, which
/// NetworkPolicy always allows. So both of its ends are judged as `host`:
/// egress at the translation (`backend == the pod`), ingress by the
/// [`HAIRPIN_ADDR`] source.
pub const HAIRPIN_PEER: crate::IpcacheValue = crate::IpcacheValue {
    identity: crate::IDENTITY_HOST,
    cidr_identity: crate::IDENTITY_HOST,
};

/// The peer a new flow's policy is judged with: [`HAIRPIN_PEER`] for a
/// hairpin arriving at the pod, else what the ipcache says of the remote
/// address (`lookup`), `world` on a miss. Kernel and reference evaluator
/// both call this.
#[inline(always)]
pub fn policy_peer<A: SvcAddr>(
    dir: u8,
    remote: A,
    lookup: impl FnOnce(A) -> Option<IpcacheValue>,
) -> IpcacheValue {
    if dir == DIR_INGRESS && remote == A::HAIRPIN {
        HAIRPIN_PEER
    } else {
        A::peer_or_world(lookup(remote))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<SvcFrontendKey>(), 8);
        assert_eq!(size_of::<SvcFrontend>(), 12);
        assert_eq!(size_of::<SvcBackendKey>(), 8);
        assert_eq!(size_of::<SvcBackend>(), 8);
        assert_eq!(size_of::<SvcNat>(), 12);
        assert_eq!(size_of::<SvcAffinityKey>(), 8);
        assert_eq!(size_of::<SvcAffinity>(), 24);
        assert_eq!(size_of::<SvcFrontendKey6>(), 20);
        assert_eq!(size_of::<SvcBackend6>(), 20);
        assert_eq!(size_of::<SvcNat6>(), 24);
        assert_eq!(size_of::<SvcAffinityKey6>(), 20);
        assert_eq!(size_of::<SvcAffinity6>(), 32);
    }

    #[test]
    fn the_ipv6_hairpin_address_is_100_42_1() {
        let words = HAIRPIN_ADDR6;
        let mut b = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            core::net::Ipv6Addr::from(b),
            "100::42:1".parse::<core::net::Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn ipv6_slots_spread_and_ipv6_hairpins_reverse_to_it() {
        let k = |sport: u16| CtKeyOf::<Ip6> {
            saddr: [0xfd00, 0, 0, 2u32.to_be()],
            daddr: [0xfd00, 0, 0, 0x10u32.to_be()],
            sport_be: sport.to_be(),
            dport_be: 80u16.to_be(),
            protocol: 6,
            scope: DIR_EGRESS,
            _pad: 0,
            endpoint_id: 5,
        };
        let mut seen = [0u32; 3];
        for p in 1000..1300 {
            seen[backend_slot(&k(p), 3) as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        let o = k(40000);
        let h = reverse_key(&o, o.saddr, 8080u16.to_be(), true);
        assert_eq!((h.daddr, h.scope), (HAIRPIN_ADDR6, DIR_EGRESS));
        let r = reverse_key(&o, [9; 4], 8080u16.to_be(), false);
        assert_eq!(
            r,
            translated(&o, [9; 4], 8080u16.to_be()).reversed(DIR_INGRESS)
        );
        assert_eq!(
            policy_peer(DIR_INGRESS, HAIRPIN_ADDR6, |_| None).identity,
            crate::IDENTITY_HOST
        );
        assert_eq!(
            policy_peer::<Ip6>(DIR_INGRESS, [7; 4], |_| None).identity,
            crate::IDENTITY_WORLD6
        );
    }

    #[test]
    fn affinity_holds_for_its_timeout_after_the_last_new_flow() {
        let s = 1_000_000_000u64;
        assert!(affinity_holds(100 * s, 10, 100 * s));
        assert!(affinity_holds(100 * s, 10, 110 * s - 1));
        assert!(!affinity_holds(100 * s, 10, 110 * s));
        assert!(!affinity_holds(100 * s, 0, 100 * s), "no affinity");
        assert!(affinity_holds(100 * s, 10800, 100 * s + 10799 * s));
    }

    fn key(sport: u16) -> crate::CtKey {
        crate::CtKey {
            saddr: 0x0a00_0002,
            daddr: 0x0a60_0001,
            sport_be: sport.to_be(),
            dport_be: 80u16.to_be(),
            protocol: 6,
            scope: DIR_EGRESS,
            _pad: 0,
            endpoint_id: 5,
        }
    }

    #[test]
    fn slots_stay_in_range_and_spread() {
        let mut seen = [0u32; 3];
        for p in 1000..1300 {
            let s = backend_slot(&key(p), 3);
            seen[s as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        // connect() hands out even ports, a few apart: still both halves.
        let mut two = [0u32; 2];
        for p in (40000..40040).step_by(2) {
            two[backend_slot(&key(p), 2) as usize] += 1;
        }
        assert!(two.iter().all(|n| *n >= 5), "{two:?}");
        assert_eq!(backend_slot(&key(5), 0), 0);
        assert_eq!(backend_slot(&key(5), 7), backend_slot(&key(5), 7));
    }

    #[test]
    fn reverse_key_matches_the_reply() {
        let o = key(40000);
        let b = 0x0a00_0009;
        let r = reverse_key(&o, b, 8080u16.to_be(), false);
        let t = translated(&o, b, 8080u16.to_be());
        assert_eq!(r, t.reversed(DIR_INGRESS));
        let h = reverse_key(&o, o.saddr, 8080u16.to_be(), true);
        assert_eq!(
            (h.saddr, h.daddr, h.scope),
            (o.saddr, HAIRPIN_ADDR, DIR_EGRESS)
        );
    }
}
