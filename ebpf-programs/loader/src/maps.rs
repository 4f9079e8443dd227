//! Typed handles on the datapath maps, with methods named for what they do.
//! Writes that do not fit are `Error::MapFull`, never silently dropped. The
//! handles are private: every caller goes through the methods, and so
//! through their error mapping.
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf},
    Ebpf,
};
use palisade_common::{
    maps as names, reason,
    service::{
        SvcBackend, SvcBackend6, SvcBackendKey, SvcFrontend, SvcFrontendKey, SvcFrontendKey6,
    },
    EndpointInfo, EndpointKey, Ip6, IpcacheValue, PolicyKey, PolicyValue,
};
#[cfg(feature = "test-utils")]
use palisade_common::{CtKey, CtKey6, CtValue, FragKey, FragValue};

use crate::{
    exact::ExactLpm,
    local::{LocalDelivery, LocalPods},
    sizes::MapSizes,
    slots::EndpointSlots,
    state::MapState,
    Error,
};

pub struct Maps {
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    slots: EndpointSlots,
    local: LocalPods,
    ipcache: ExactLpm<u32, IpcacheValue>,
    endpoints6: HashMap<MapData, Ip6, u32>,
    ipcache6: ExactLpm<Ip6, IpcacheValue>,
    #[cfg(feature = "test-utils")]
    conntrack6: HashMap<MapData, CtKey6, CtValue>,
    policy: ExactLpm<PolicyKey, PolicyValue>,
    /// Raw access for tests only; the GC opens its own (`handles`).
    #[cfg(feature = "test-utils")]
    conntrack: HashMap<MapData, CtKey, CtValue>,
    #[cfg(feature = "test-utils")]
    fragments: HashMap<MapData, FragKey, FragValue>,
    counters: PerCpuArray<MapData, u64>,
    xdp_deny: LpmTrie<MapData, u32, u32>,
    xdp_counters: PerCpuArray<MapData, u64>,
    svc_frontends: HashMap<MapData, SvcFrontendKey, SvcFrontend>,
    svc_backends: HashMap<MapData, SvcBackendKey, SvcBackend>,
    #[cfg(feature = "test-utils")]
    svc_nat: HashMap<MapData, CtKey, palisade_common::service::SvcNat>,
    svc_frontends6: HashMap<MapData, SvcFrontendKey6, SvcFrontend>,
    svc_backends6: HashMap<MapData, SvcBackendKey, SvcBackend6>,
    #[cfg(feature = "test-utils")]
    svc_nat6: HashMap<MapData, CtKey6, palisade_common::service::SvcNat6>,
    event_budget: Array<MapData, palisade_common::event_limit::EventBudget>,
    ct_budget: Array<MapData, palisade_common::ct_budget::CtBudget>,
    #[cfg(feature = "test-utils")]
    ct_charge: HashMap<MapData, u32, palisade_common::ct_budget::CtCharge>,
    /// Until taken by the event reader (`take_events`).
    events: Option<RingBuf<MapData>>,
    sizes: MapSizes,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, Error> {
    let m = ebpf.take_map(name).ok_or(Error::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(m).map_err(|source| Error::Map { name, source })
}

/// A failed write: full maps get their own error (and metric upstream).
pub(crate) fn write_err(name: &'static str, entries: u32) -> impl Fn(MapError) -> Error {
    move |source| match &source {
        MapError::SyscallError(e)
            if matches!(
                e.io_error.raw_os_error(),
                Some(libc::E2BIG) | Some(libc::ENOSPC)
            ) =>
        {
            Error::MapFull { name, entries }
        }
        _ => Error::Map { name, source },
    }
}

/// Removing an absent entry is not an error.
pub(crate) fn removed(name: &'static str, r: Result<(), MapError>) -> Result<(), Error> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(Error::Map { name, source }),
    }
}

/// Remove every key of `keys` (a map's, collected first) with `remove`.
#[cfg(feature = "test-utils")]
pub(crate) fn clear_map<K>(
    name: &'static str,
    keys: Vec<Result<K, MapError>>,
    mut remove: impl FnMut(&K) -> Result<(), MapError>,
) -> Result<(), Error> {
    for k in keys {
        let k = k.map_err(|source| Error::Map { name, source })?;
        removed(name, remove(&k))?;
    }
    Ok(())
}

pub fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn from_be(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

/// An IPv6 address as the programs keep it (`palisade_common::Ip6`).
pub fn ip6_words(addr: Ipv6Addr) -> Ip6 {
    let o = addr.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

pub fn from_ip6_words(w: Ip6) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, x) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&x.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

impl Maps {
    pub(crate) fn take(
        ebpf: &mut Ebpf,
        sizes: &MapSizes,
        local: LocalDelivery,
    ) -> Result<Self, Error> {
        let mut maps = Self {
            endpoints: take(ebpf, names::ENDPOINTS)?,
            slots: EndpointSlots::new(take(ebpf, names::ENDPOINT_SLOTS)?),
            local: LocalPods::new(
                take(ebpf, names::LOCAL_PODS)?,
                take(ebpf, names::LOCAL_PODS6)?,
                local,
                sizes.endpoints,
            ),
            ipcache: ExactLpm::new(
                take(ebpf, names::IPCACHE)?,
                take(ebpf, names::IPCACHE_EXACT)?,
                (names::IPCACHE, names::IPCACHE_EXACT),
                sizes.ipcache,
            ),
            endpoints6: take(ebpf, names::ENDPOINTS6)?,
            ipcache6: ExactLpm::new(
                take(ebpf, names::IPCACHE6)?,
                take(ebpf, names::IPCACHE6_EXACT)?,
                (names::IPCACHE6, names::IPCACHE6_EXACT),
                sizes.ipcache6,
            ),
            #[cfg(feature = "test-utils")]
            conntrack6: take(ebpf, names::CONNTRACK6)?,
            policy: ExactLpm::new(
                take(ebpf, names::POLICY)?,
                take(ebpf, names::POLICY_EXACT)?,
                (names::POLICY, names::POLICY_EXACT),
                sizes.policy,
            ),
            #[cfg(feature = "test-utils")]
            conntrack: take(ebpf, names::CONNTRACK)?,
            #[cfg(feature = "test-utils")]
            fragments: take(ebpf, names::FRAGMENTS)?,
            counters: take(ebpf, names::COUNTERS)?,
            xdp_deny: take(ebpf, names::XDP_DENY)?,
            xdp_counters: take(ebpf, names::XDP_COUNTERS)?,
            svc_frontends: take(ebpf, names::SVC_FRONTENDS)?,
            svc_backends: take(ebpf, names::SVC_BACKENDS)?,
            #[cfg(feature = "test-utils")]
            svc_nat: take(ebpf, names::SVC_NAT)?,
            svc_frontends6: take(ebpf, names::SVC_FRONTENDS6)?,
            svc_backends6: take(ebpf, names::SVC_BACKENDS6)?,
            #[cfg(feature = "test-utils")]
            svc_nat6: take(ebpf, names::SVC_NAT6)?,
            event_budget: take(ebpf, names::EVENT_BUDGET)?,
            ct_budget: take(ebpf, names::CT_BUDGET)?,
            #[cfg(feature = "test-utils")]
            ct_charge: take(ebpf, names::CT_CHARGE)?,
            events: Some(take(ebpf, names::EVENTS)?),
            sizes: sizes.clone(),
        };
        // (An entry that cannot be read leaves its slot empty: the
        // programs then take it from the hash.)
        let entries: Vec<_> = maps.interface_endpoints().collect();
        maps.slots.resync(&entries)?;
        maps.local.resync(&entries)?;
        maps.ipcache.fill()?;
        maps.ipcache6.fill()?;
        maps.policy.fill()?;
        Ok(maps)
    }

    /// `ENDPOINTS`' entries by interface, (ifindex, entry); unreadable ones
    /// are skipped.
    fn interface_endpoints(&self) -> impl Iterator<Item = (u32, EndpointInfo)> + '_ {
        self.endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.kind == palisade_common::EP_KEY_IFINDEX)
            .map(|(k, v)| (k.value, v))
    }

    /// The per-endpoint event budget the programs apply
    /// (`palisade_common::event_limit`); zeros restore the defaults,
    /// `EventBudget::UNLIMITED` lifts it (tests that compare every event).
    pub fn set_event_budget(
        &mut self,
        b: palisade_common::event_limit::EventBudget,
    ) -> Result<(), Error> {
        self.event_budget.set(0, b, 0).map_err(|source| Error::Map {
            name: names::EVENT_BUDGET,
            source,
        })
    }

    /// The per-endpoint conntrack and fragment budget the programs apply
    /// (`palisade_common::ct_budget`); zeros restore the defaults,
    /// `CtBudget::UNLIMITED` lifts it.
    pub fn set_conntrack_budget(
        &mut self,
        b: palisade_common::ct_budget::CtBudget,
    ) -> Result<(), Error> {
        self.ct_budget.set(0, b, 0).map_err(|source| Error::Map {
            name: names::CT_BUDGET,
            source,
        })
    }

    /// What the kernel has charged endpoint `id` (tests).
    #[cfg(feature = "test-utils")]
    pub fn conntrack_charge(&self, id: u32) -> Option<palisade_common::ct_budget::CtCharge> {
        self.ct_charge.get(&id, 0).ok()
    }

    /// Index a pod by its host veth and by its address.
    pub fn upsert_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), Error> {
        let full = write_err(names::ENDPOINTS, self.sizes.endpoints);
        if info.ipv4 != 0 {
            self.endpoints
                .insert(EndpointKey::ipv4(info.ipv4), info, 0)
                .map_err(&full)?;
        }
        if info.ipv6 != [0; 4] {
            self.endpoints6
                .insert(info.ipv6, info.endpoint_id, 0)
                .map_err(write_err(names::ENDPOINTS6, self.sizes.endpoints))?;
        }
        // A changed IPv6 address leaves no stale index behind.
        let old = self.endpoint(ifindex);
        if let Some(old) = old {
            if old.ipv6 != info.ipv6 && old.ipv6 != [0; 4] {
                removed(names::ENDPOINTS6, self.endpoints6.remove(&old.ipv6))?;
            }
        }
        self.endpoints
            .insert(EndpointKey::ifindex(ifindex), info, 0)
            .map_err(&full)?;
        self.slots.set(ifindex, info)?;
        // Last: the programs check it against the entries written above.
        self.local.set(ifindex, &info, old.as_ref())
    }

    /// The host veth `LOCAL_PODS` delivers pod address `addr` to.
    pub fn local_pod(&self, addr: Ipv4Addr) -> Option<u32> {
        self.local.get4(be(addr))
    }

    pub fn endpoint(&self, ifindex: u32) -> Option<EndpointInfo> {
        self.endpoints.get(&EndpointKey::ifindex(ifindex), 0).ok()
    }

    pub fn remove_endpoint(&mut self, ifindex: u32, ipv4_be: u32) -> Result<(), Error> {
        // The fast copy goes first: the interface's packets then find the
        // hash alone, and none once the entry is gone.
        self.slots.clear(ifindex)?;
        let old = self.endpoint(ifindex);
        if let Some(old) = &old {
            self.local.clear(ifindex, old)?;
        }
        let c = match old {
            Some(old) if old.ipv6 != [0; 4] => {
                removed(names::ENDPOINTS6, self.endpoints6.remove(&old.ipv6))
            }
            _ => Ok(()),
        };
        let a = removed(
            names::ENDPOINTS,
            self.endpoints.remove(&EndpointKey::ifindex(ifindex)),
        );
        let b = removed(
            names::ENDPOINTS,
            self.endpoints.remove(&EndpointKey::ipv4(ipv4_be)),
        );
        c.and(a).and(b)
    }

    /// The endpoint id `IPCACHE6`'s pod address `addr` belongs to.
    pub fn endpoint6(&self, addr: Ipv6Addr) -> Option<u32> {
        self.endpoints6.get(&ip6_words(addr), 0).ok()
    }

    pub fn set_ipcache6(
        &mut self,
        addr: Ipv6Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), Error> {
        self.ipcache6.set(prefix, ip6_words(addr), v)
    }

    pub fn remove_ipcache6(&mut self, addr: Ipv6Addr, prefix: u32) -> Result<(), Error> {
        self.ipcache6.remove(prefix, ip6_words(addr))
    }

    pub fn set_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), Error> {
        self.ipcache.set(prefix, be(addr), v)
    }

    pub fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix: u32) -> Result<(), Error> {
        self.ipcache.remove(prefix, be(addr))
    }

    pub fn set_policy(&mut self, prefix: u32, k: PolicyKey, v: PolicyValue) -> Result<(), Error> {
        self.policy.set(prefix, k, v)
    }

    pub fn remove_policy(&mut self, prefix: u32, k: PolicyKey) -> Result<(), Error> {
        self.policy.remove(prefix, k)
    }

    pub fn deny_source(&mut self, addr: Ipv4Addr, prefix: u32, cookie: u32) -> Result<(), Error> {
        self.xdp_deny
            .insert(&Key::new(prefix, be(addr)), cookie, 0)
            .map_err(write_err(names::XDP_DENY, self.sizes.xdp_deny))
    }

    pub fn allow_source(&mut self, addr: Ipv4Addr, prefix: u32) -> Result<(), Error> {
        removed(
            names::XDP_DENY,
            self.xdp_deny.remove(&Key::new(prefix, be(addr))),
        )
    }

    /// Verdict/reason counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, Error> {
        sum_counters(&self.counters, names::COUNTERS)
    }

    pub fn xdp_counters(&self) -> Result<Counters, Error> {
        sum_counters(&self.xdp_counters, names::XDP_COUNTERS)
    }

    /// One counter summed over CPUs (index = `palisade_common::reason` code).
    pub fn counter(&self, r: u8) -> Result<u64, Error> {
        let v = self
            .counters
            .get(&(r as u32), 0)
            .map_err(|source| Error::Map {
                name: names::COUNTERS,
                source,
            })?;
        Ok(v.iter().sum())
    }

    /// The sizes the maps were configured with.
    pub fn sizes(&self) -> &MapSizes {
        &self.sizes
    }

    /// The verdict event ring, for `events::EventReader::new`; `None` once
    /// taken.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The verdict event stream (once: an error when already taken).
    pub fn take_event_reader(&mut self) -> Result<crate::events::EventReader, Error> {
        let ring = self.take_events().ok_or(Error::Map {
            name: names::EVENTS,
            source: MapError::InvalidName {
                name: format!("{} (already taken)", names::EVENTS),
            },
        })?;
        Ok(crate::events::EventReader::new(ring))
    }

    /// What the endpoint, ipcache and policy maps hold now (read back after
    /// a restart, before the first sync). Unreadable entries are skipped.
    pub fn read_state(&self) -> MapState {
        let mut s = MapState::default();
        s.endpoints.extend(self.interface_endpoints());
        for (prefix, k, v) in self.ipcache.entries() {
            s.ipcache.insert((from_be(k), prefix), v);
        }
        for (prefix, k, v) in self.ipcache6.entries() {
            s.ipcache6.insert((from_ip6_words(k), prefix), v);
        }
        for (prefix, k, v) in self.policy.entries() {
            s.policy.insert((prefix, k), v);
        }
        s
    }

    /// Program one Service frontend (ClusterIP, port, protocol).
    pub fn set_frontend(&mut self, k: SvcFrontendKey, v: SvcFrontend) -> Result<(), Error> {
        self.svc_frontends
            .insert(k, v, 0)
            .map_err(write_err(names::SVC_FRONTENDS, self.sizes.svc_frontends))
    }

    pub fn remove_frontend(&mut self, k: &SvcFrontendKey) -> Result<(), Error> {
        removed(names::SVC_FRONTENDS, self.svc_frontends.remove(k))
    }

    pub fn set_backend(&mut self, k: SvcBackendKey, v: SvcBackend) -> Result<(), Error> {
        self.svc_backends
            .insert(k, v, 0)
            .map_err(write_err(names::SVC_BACKENDS, self.sizes.svc_backends))
    }

    pub fn remove_backend(&mut self, k: &SvcBackendKey) -> Result<(), Error> {
        removed(names::SVC_BACKENDS, self.svc_backends.remove(k))
    }

    /// The frontends programmed now (read back after a restart).
    pub fn frontends(&self) -> Vec<(SvcFrontendKey, SvcFrontend)> {
        self.svc_frontends.iter().filter_map(Result::ok).collect()
    }

    /// The backend slots programmed now.
    pub fn backends(&self) -> Vec<(SvcBackendKey, SvcBackend)> {
        self.svc_backends.iter().filter_map(Result::ok).collect()
    }

    /// `set_frontend` for an IPv6 ClusterIP (`SVC_FRONTENDS6`).
    pub fn set_frontend6(&mut self, k: SvcFrontendKey6, v: SvcFrontend) -> Result<(), Error> {
        self.svc_frontends6
            .insert(k, v, 0)
            .map_err(write_err(names::SVC_FRONTENDS6, self.sizes.svc_frontends))
    }

    pub fn remove_frontend6(&mut self, k: &SvcFrontendKey6) -> Result<(), Error> {
        removed(names::SVC_FRONTENDS6, self.svc_frontends6.remove(k))
    }

    pub fn set_backend6(&mut self, k: SvcBackendKey, v: SvcBackend6) -> Result<(), Error> {
        self.svc_backends6
            .insert(k, v, 0)
            .map_err(write_err(names::SVC_BACKENDS6, self.sizes.svc_backends))
    }

    pub fn remove_backend6(&mut self, k: &SvcBackendKey) -> Result<(), Error> {
        removed(names::SVC_BACKENDS6, self.svc_backends6.remove(k))
    }

    pub fn frontends6(&self) -> Vec<(SvcFrontendKey6, SvcFrontend)> {
        self.svc_frontends6.iter().filter_map(Result::ok).collect()
    }

    pub fn backends6(&self) -> Vec<(SvcBackendKey, SvcBackend6)> {
        self.svc_backends6.iter().filter_map(Result::ok).collect()
    }

    /// The XDP prefilter's deny list: (network address, prefix length).
    pub fn denied_sources(&self) -> Vec<(Ipv4Addr, u32)> {
        self.xdp_deny
            .keys()
            .filter_map(Result::ok)
            .map(|k| (from_be(k.data()), k.prefix_len()))
            .collect()
    }
}

/// Raw conntrack and fragment access and wholesale clearing, for the
/// verdict, differential and netns tests and the benchmarks only.
#[cfg(feature = "test-utils")]
impl Maps {
    pub fn insert_conntrack(&mut self, k: CtKey, v: CtValue) -> Result<(), Error> {
        self.conntrack
            .insert(k, v, 0)
            .map_err(write_err(names::CONNTRACK, self.sizes.conntrack))
    }

    pub fn conntrack_entry(&self, k: &CtKey) -> Option<CtValue> {
        self.conntrack.get(k, 0).ok()
    }

    /// The `ENDPOINT_SLOTS` slot of `ifindex`, as the programs see it.
    pub fn endpoint_slot(&self, ifindex: u32) -> Result<palisade_common::EndpointSlot, Error> {
        self.slots.raw(ifindex)
    }

    /// Writes a slot as it is, bypassing the seqlock and `ENDPOINTS`
    /// (tests of what the programs make of a slot that disagrees).
    pub fn write_endpoint_slot(
        &mut self,
        ifindex: u32,
        slot: palisade_common::EndpointSlot,
    ) -> Result<(), Error> {
        self.slots.write_raw(ifindex, slot)
    }

    pub fn conntrack6_entry(&self, k: &CtKey6) -> Option<CtValue> {
        self.conntrack6.get(k, 0).ok()
    }

    pub fn insert_conntrack6(&mut self, k: CtKey6, v: CtValue) -> Result<(), Error> {
        self.conntrack6
            .insert(k, v, 0)
            .map_err(write_err(names::CONNTRACK6, self.sizes.conntrack6))
    }

    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtValue)>, Error> {
        self.conntrack
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| Error::Map {
                name: names::CONNTRACK,
                source,
            })
    }

    pub fn conntrack6_entries(&self) -> Result<Vec<(CtKey6, CtValue)>, Error> {
        self.conntrack6
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| Error::Map {
                name: names::CONNTRACK6,
                source,
            })
    }

    /// Service translation entries (forward and reverse).
    pub fn svc_nat_entries(&self) -> Vec<(CtKey, palisade_common::service::SvcNat)> {
        self.svc_nat.iter().filter_map(Result::ok).collect()
    }

    /// The IPv6 ones.
    pub fn svc_nat6_entries(&self) -> Vec<(CtKey6, palisade_common::service::SvcNat6)> {
        self.svc_nat6.iter().filter_map(Result::ok).collect()
    }

    pub fn insert_fragment(&mut self, k: FragKey, v: FragValue) -> Result<(), Error> {
        self.fragments
            .insert(k, v, 0)
            .map_err(write_err(names::FRAGMENTS, self.sizes.fragments))
    }

    pub fn fragment_entries(&self) -> Result<Vec<(FragKey, FragValue)>, Error> {
        self.fragments
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| Error::Map {
                name: names::FRAGMENTS,
                source,
            })
    }

    /// Empty the endpoint, ipcache, policy, conntrack, fragment and charge maps.
    pub fn clear(&mut self) -> Result<(), Error> {
        self.slots.resync(&[])?;
        let keys = self.endpoints.keys().collect();
        clear_map(names::ENDPOINTS, keys, |k| self.endpoints.remove(k))?;
        self.ipcache.clear()?;
        self.policy.clear()?;
        let keys = self.conntrack.keys().collect();
        clear_map(names::CONNTRACK, keys, |k| self.conntrack.remove(k))?;
        let keys = self.fragments.keys().collect();
        clear_map(names::FRAGMENTS, keys, |k| self.fragments.remove(k))?;
        let keys = self.endpoints6.keys().collect();
        clear_map(names::ENDPOINTS6, keys, |k| self.endpoints6.remove(k))?;
        self.ipcache6.clear()?;
        let keys = self.conntrack6.keys().collect();
        clear_map(names::CONNTRACK6, keys, |k| self.conntrack6.remove(k))?;
        let keys = self.ct_charge.keys().collect();
        clear_map(names::CT_CHARGE, keys, |k| self.ct_charge.remove(k))
    }
}

/// Per-reason packet counts (index = `palisade_common::reason` code).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub Vec<u64>);

impl Counters {
    pub fn get(&self, r: u8) -> u64 {
        self.0.get(r as usize).copied().unwrap_or(0)
    }

    /// Non-zero counters as (reason name, count).
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (reason::name(i as u8), *n))
            .collect()
    }
}

pub(crate) fn sum_counters(
    map: &PerCpuArray<MapData, u64>,
    name: &'static str,
) -> Result<Counters, Error> {
    let mut out = Vec::with_capacity(reason::MAX as usize);
    for i in 0..reason::MAX {
        let v = map
            .get(&i, 0)
            .map_err(|source| Error::Map { name, source })?;
        out.push(v.iter().sum());
    }
    Ok(Counters(out))
}

/// The clock of conntrack, fragment and affinity entries in ns:
/// CLOCK_MONOTONIC_COARSE, which the programs read with
/// bpf_ktime_get_coarse_ns() (the same tick count).
pub fn ct_clock_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// CLOCK_MONOTONIC in ns, comparable with bpf_ktime_get_ns() (the clock of
/// event timestamps).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
