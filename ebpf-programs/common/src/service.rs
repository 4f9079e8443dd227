//! Service translation maps and the rules shared by the kernel and the
//! reference evaluator.
//!
//! Layouts (all `#[repr(C)]`, padding-free, addresses and ports in network
//! order as read from the packet):
//! - `SVC_FRONTENDS` (hash): [`SvcFrontendKey`] (ClusterIP, port, protocol)
//!   -> [`SvcFrontend`] (service id, backend count, flags).
//! - `SVC_BACKENDS` (hash): [`SvcBackendKey`] (service id, slot
//!   `0..backends`) -> [`SvcBackend`] (pod address, target port).
//! - `SVC_NAT` (LRU hash): conntrack-style keys -> [`SvcNat`]. Two entries
//!   per translated flow: the forward one, keyed by the original tuple
//!   (client -> ClusterIP, scope egress), holds the chosen backend; the
//!   reverse one, keyed by the reply tuple as the program that reverse
//!   translates sees it, holds the ClusterIP:port the reply must come from.
//!   A flow keeps its backend while its conntrack entry (on the translated
//!   tuple) lives, whatever happens to the backend list meanwhile.
//! - `SVC_AFFINITY` (LRU hash): [`SvcAffinityKey`] (client, service id) ->
//!   [`SvcAffinity`], for `sessionAffinity: ClientIP` frontends only.
use crate::{CtKey, DIR_EGRESS, DIR_INGRESS};

/// Source address a hairpinned flow (a pod reaching its own Service and
/// chosen as its backend) carries towards the pod: the pod would drop a
/// packet from its own address arriving on eth0. Link-local, never a pod's
/// address; only palisade's translation produces it (pods cannot send from
/// it: anti-spoofing), so the pod's ingress judges it as the pod itself.
pub const HAIRPIN_ADDR: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

/// `SvcNat::flags`: the reverse entry of a hairpinned flow (the reply
/// leaves the pod towards [`HAIRPIN_ADDR`] and is turned back into the pod).
pub const NAT_HAIRPIN: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcFrontendKey {
    pub addr: u32,
    pub port_be: u16,
    pub protocol: u8,
    pub _pad: u8,
}

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
pub struct SvcAffinityKey {
    pub client: u32,
    pub service_id: u32,
}

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
pub struct SvcBackend {
    pub addr: u32,
    pub port_be: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcNat {
    /// Forward: the backend. Reverse: the ClusterIP.
    pub addr: u32,
    pub port_be: u16,
    /// `NAT_HAIRPIN`
    pub flags: u8,
    pub _pad: u8,
    pub service_id: u32,
}

/// The backend slot of a new flow: a hash of its original tuple (every
/// bit of it reaches every bit of the result: murmur3's finalizer), so a
/// retransmitted first packet picks the same backend and consecutive
/// client ports spread over all of them.
#[inline(always)]
pub fn backend_slot(key: &CtKey, backends: u32) -> u32 {
    let ports = (key.sport_be as u32) << 16 | key.dport_be as u32;
    let mut h = fmix32(key.saddr ^ 0x9e37_79b9);
    h = fmix32(h ^ key.daddr);
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
pub fn translated(orig: &CtKey, backend: u32, port_be: u16) -> CtKey {
    CtKey {
        daddr: backend,
        dport_be: port_be,
        ..*orig
    }
}

/// The reverse entry's key: the reply as the program that turns it back
/// sees it. Normally the client's ingress (backend -> client); for a
/// hairpin the client's own egress (pod -> [`HAIRPIN_ADDR`]).
#[inline(always)]
pub fn reverse_key(orig: &CtKey, backend: u32, port_be: u16, hairpin: bool) -> CtKey {
    if hairpin {
        CtKey {
            saddr: backend,
            daddr: HAIRPIN_ADDR,
            sport_be: port_be,
            dport_be: orig.sport_be,
            protocol: orig.protocol,
            scope: DIR_EGRESS,
            _pad: 0,
            endpoint_id: orig.endpoint_id,
        }
    } else {
        CtKey {
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
pub fn policy_peer(
    dir: u8,
    remote: u32,
    lookup: impl FnOnce(u32) -> Option<crate::IpcacheValue>,
) -> crate::IpcacheValue {
    if dir == DIR_INGRESS && remote == HAIRPIN_ADDR {
        HAIRPIN_PEER
    } else {
        crate::decision::peer_or_world(lookup(remote))
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

    fn key(sport: u16) -> CtKey {
        CtKey {
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
