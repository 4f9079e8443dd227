//! Typed handles on the datapath maps, with methods named for what they do.
//! Writes that do not fit are `Error::MapFull`, never silently dropped.
use std::net::Ipv4Addr;

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf},
    Ebpf,
};
use palisade_common::{
    maps as names, reason, CtKey, CtValue, EndpointInfo, EndpointKey, FragKey, FragValue,
    IpcacheValue, PolicyKey, PolicyValue,
};

use crate::{loader::MapSizes, Error};

pub struct Maps {
    pub endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    pub ipcache: LpmTrie<MapData, u32, IpcacheValue>,
    pub policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub fragments: HashMap<MapData, FragKey, FragValue>,
    pub counters: PerCpuArray<MapData, u64>,
    pub xdp_deny: LpmTrie<MapData, u32, u32>,
    pub xdp_counters: PerCpuArray<MapData, u64>,
    /// Taken by the event reader (`events::EventReader::new`).
    pub events: Option<RingBuf<MapData>>,
    pub sizes: MapSizes,
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
fn write_err(name: &'static str, entries: u32) -> impl Fn(MapError) -> Error {
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
fn removed(name: &'static str, r: Result<(), MapError>) -> Result<(), Error> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(Error::Map { name, source }),
    }
}

pub fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn from_be(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

impl Maps {
    pub(crate) fn take(ebpf: &mut Ebpf, sizes: &MapSizes) -> Result<Self, Error> {
        Ok(Self {
            endpoints: take(ebpf, names::ENDPOINTS)?,
            ipcache: take(ebpf, names::IPCACHE)?,
            policy: take(ebpf, names::POLICY)?,
            conntrack: take(ebpf, names::CONNTRACK)?,
            fragments: take(ebpf, names::FRAGMENTS)?,
            counters: take(ebpf, names::COUNTERS)?,
            xdp_deny: take(ebpf, names::XDP_DENY)?,
            xdp_counters: take(ebpf, names::XDP_COUNTERS)?,
            events: Some(take(ebpf, names::EVENTS)?),
            sizes: sizes.clone(),
        })
    }

    /// Index a pod by its host veth and by its address.
    pub fn upsert_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), Error> {
        let full = write_err(names::ENDPOINTS, self.sizes.endpoints);
        self.endpoints
            .insert(EndpointKey::ipv4(info.ipv4), info, 0)
            .map_err(&full)?;
        self.endpoints
            .insert(EndpointKey::ifindex(ifindex), info, 0)
            .map_err(&full)
    }

    pub fn endpoint(&self, ifindex: u32) -> Option<EndpointInfo> {
        self.endpoints.get(&EndpointKey::ifindex(ifindex), 0).ok()
    }

    pub fn remove_endpoint(&mut self, ifindex: u32, ipv4_be: u32) -> Result<(), Error> {
        let a = removed(
            names::ENDPOINTS,
            self.endpoints.remove(&EndpointKey::ifindex(ifindex)),
        );
        let b = removed(
            names::ENDPOINTS,
            self.endpoints.remove(&EndpointKey::ipv4(ipv4_be)),
        );
        a.and(b)
    }

    pub fn set_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), Error> {
        self.ipcache
            .insert(&Key::new(prefix, be(addr)), v, 0)
            .map_err(write_err(names::IPCACHE, self.sizes.ipcache))
    }

    pub fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix: u32) -> Result<(), Error> {
        removed(
            names::IPCACHE,
            self.ipcache.remove(&Key::new(prefix, be(addr))),
        )
    }

    pub fn set_policy(&mut self, prefix: u32, k: PolicyKey, v: PolicyValue) -> Result<(), Error> {
        self.policy
            .insert(&Key::new(prefix, k), v, 0)
            .map_err(write_err(names::POLICY, self.sizes.policy))
    }

    pub fn remove_policy(&mut self, prefix: u32, k: PolicyKey) -> Result<(), Error> {
        removed(names::POLICY, self.policy.remove(&Key::new(prefix, k)))
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

    /// Delete conntrack and fragment entries that expired before `now_ns`
    /// (CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns). Returns how many.
    pub fn gc(&mut self, now_ns: u64) -> Result<usize, Error> {
        let dead: Vec<CtKey> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns <= now_ns)
            .map(|(k, _)| k)
            .collect();
        for k in &dead {
            removed(names::CONNTRACK, self.conntrack.remove(k))?;
        }
        let dead_frags: Vec<FragKey> = self
            .fragments
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.expires_ns <= now_ns)
            .map(|(k, _)| k)
            .collect();
        for k in &dead_frags {
            removed(names::FRAGMENTS, self.fragments.remove(k))?;
        }
        Ok(dead.len() + dead_frags.len())
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

fn sum_counters(map: &PerCpuArray<MapData, u64>, name: &'static str) -> Result<Counters, Error> {
    let mut out = Vec::with_capacity(reason::MAX as usize);
    for i in 0..reason::MAX {
        let v = map
            .get(&i, 0)
            .map_err(|source| Error::Map { name, source })?;
        out.push(v.iter().sum());
    }
    Ok(Counters(out))
}

/// CLOCK_MONOTONIC in ns, comparable with bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
