//! Everything the agent does to the kernel, behind one trait (a driver
//! trait, as netavark's `NetworkDriver`): the map writes of a sync
//! ([`MapWriter`]), attaching and detaching a pod's programs, interface
//! lookup, adopting pinned links after a restart, reading the maps back, the
//! XDP prefilter and the counters.
//!
//! [`KernelDataplane`] is the real one (programs, pinned links, BPF maps);
//! `memory::MemoryDataplane` (tests) keeps the same state in memory, with a
//! fake interface table, map capacities, attach failures on demand and a log
//! of every write in order, so the agent's own logic is tested without root.
//!
//! The conntrack GC and the /metrics counters do not go through the agent at
//! all: they use handles of their own (`palisade_dataplane::ConntrackGc`,
//! [`StatsReader`]), opened from the pins ([`Dataplane::pins`]).
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
};

use palisade_common::{
    service::{SvcBackendKey, SvcFrontend},
    EndpointInfo, IpcacheValue, PolicyKey, PolicyValue,
};
use palisade_dataplane::{
    events::EventReader, loader, Counters, Datapath, DatapathConfig, Error, GcPass, MapSizes,
    MapState, Maps, Pins, StatsReader,
};

use crate::{
    service_map::{BackendAddr, FrontendKey, ServiceMaps, ServiceWriter},
    sync::MapWriter,
};

/// The kernel side of the agent. `Send`: the agent lives on its owner's
/// thread.
pub trait Dataplane: MapWriter + Send {
    /// The ifindex of a (host-side) interface.
    fn ifindex(&self, ifname: &str) -> Result<u32, Error>;
    /// Attach both policy programs to a pod's host-side interface; its
    /// ifindex. Idempotent.
    fn attach_pod(&mut self, ifname: &str) -> Result<u32, Error>;
    /// Detach both programs (the interface may be gone already).
    fn detach_pod(&mut self, ifindex: u32) -> Result<(), Error>;
    /// A registration's interfaces are one veth pair: `host_ifname` on the
    /// node, `ifname` in the namespace `netns`.
    fn check_pod_link(&self, host_ifname: &str, netns: &str, ifname: &str) -> anyhow::Result<()>;
    /// Keep palisade's programs first on a pod interface: where a TCX
    /// program now runs ahead of palisade's filter, move palisade into TCX,
    /// first (`Datapath::keep_first`). Whether anything moved.
    fn keep_first(&mut self, _ifname: &str) -> Result<bool, Error> {
        Ok(false)
    }
    /// After a restart: take over every pinned pod link whose interface
    /// still exists (dropping the others); their ifindexes.
    fn adopt_links(&mut self) -> Result<Vec<u32>, Error>;
    /// What the endpoint, ipcache and policy maps hold now.
    fn read_state(&self) -> MapState;
    /// Attach the XDP prefilter to an uplink; its ifindex.
    fn attach_xdp(&mut self, ifname: &str) -> Result<u32, Error>;
    /// The prefilter's deny list: (network address, prefix length).
    fn denied_sources(&self) -> Vec<(Ipv4Addr, u32)>;
    fn deny_source(&mut self, addr: Ipv4Addr, prefix: u32, cookie: u32) -> Result<(), Error>;
    fn allow_source(&mut self, addr: Ipv4Addr, prefix: u32) -> Result<(), Error>;
    /// Map capacities (as configured).
    fn sizes(&self) -> MapSizes;
    /// Verdict/reason counters of the tc programs, summed over CPUs.
    fn counters(&self) -> Result<Counters, Error>;
    /// The XDP prefilter's counters.
    fn xdp_counters(&self) -> Result<Counters, Error>;
    /// A counter reader that works without the agent; `None` without a
    /// kernel.
    fn stats_reader(&self) -> Option<StatsReader>;
    /// Where the maps are pinned, for handles of their own (conntrack GC);
    /// `None` without a kernel.
    fn pins(&self) -> Option<&Pins>;
    /// Program Service translation: the complete list of frontends (see
    /// `crate::service`), replacing what was programmed before. Flows
    /// already translated keep their backend.
    fn set_services(&mut self, frontends: &[crate::service::Frontend]) -> Result<(), Error> {
        if frontends.is_empty() {
            return Ok(());
        }
        Err(Error::Unsupported(
            "Service translation is not implemented by this dataplane".into(),
        ))
    }
    /// The Service each programmed frontend id stands for (the id flow
    /// events carry in `service_id`).
    fn services(&self) -> std::collections::BTreeMap<u32, crate::service::Frontend> {
        Default::default()
    }
}

/// `sync::apply` takes a sized writer; the agent holds a boxed dataplane.
impl MapWriter for Box<dyn Dataplane> {
    fn upsert_policy(&mut self, prefix: u32, k: PolicyKey, v: PolicyValue) -> Result<(), Error> {
        (**self).upsert_policy(prefix, k, v)
    }
    fn remove_policy(&mut self, prefix: u32, k: PolicyKey) -> Result<(), Error> {
        (**self).remove_policy(prefix, k)
    }
    fn upsert_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), Error> {
        (**self).upsert_ipcache(addr, prefix, v)
    }
    fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix: u32) -> Result<(), Error> {
        (**self).remove_ipcache(addr, prefix)
    }
    fn upsert_ipcache6(
        &mut self,
        addr: Ipv6Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), Error> {
        (**self).upsert_ipcache6(addr, prefix, v)
    }
    fn remove_ipcache6(&mut self, addr: Ipv6Addr, prefix: u32) -> Result<(), Error> {
        (**self).remove_ipcache6(addr, prefix)
    }
    fn upsert_endpoint(&mut self, ifindex: u32, v: EndpointInfo) -> Result<(), Error> {
        (**self).upsert_endpoint(ifindex, v)
    }
    fn remove_endpoint(&mut self, ifindex: u32, ipv4_be: u32) -> Result<(), Error> {
        (**self).remove_endpoint(ifindex, ipv4_be)
    }
}

/// The programs, their pinned links and the BPF maps.
pub struct KernelDataplane {
    datapath: Datapath,
    maps: Maps,
    stats: StatsReader,
    services: ServiceMaps,
}

impl KernelDataplane {
    /// Load the programs, reusing (adopting) maps pinned by an earlier
    /// agent. The verdict event stream goes to the caller.
    pub fn load(cfg: &DatapathConfig) -> Result<(Self, EventReader), Error> {
        let mut datapath = Datapath::load(cfg)?;
        let mut maps = datapath.take_maps()?;
        let events = maps.take_event_reader()?;
        let stats = StatsReader::open(datapath.pins())?;
        // Frontends an earlier agent programmed keep their ids.
        let services = ServiceMaps::adopt(adopted_frontends(&maps), adopted_backends(&maps));
        Ok((
            Self {
                datapath,
                maps,
                stats,
                services,
            },
            events,
        ))
    }
}

impl KernelDataplane {
    /// See `Maps::set_conntrack_budget`.
    pub fn set_conntrack_budget(
        &mut self,
        b: palisade_common::ct_budget::CtBudget,
    ) -> Result<(), Error> {
        self.maps.set_conntrack_budget(b)
    }
}

impl MapWriter for KernelDataplane {
    fn upsert_policy(&mut self, prefix: u32, k: PolicyKey, v: PolicyValue) -> Result<(), Error> {
        self.maps.set_policy(prefix, k, v)
    }
    fn remove_policy(&mut self, prefix: u32, k: PolicyKey) -> Result<(), Error> {
        self.maps.remove_policy(prefix, k)
    }
    fn upsert_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), Error> {
        self.maps.set_ipcache(addr, prefix, v)
    }
    fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix: u32) -> Result<(), Error> {
        self.maps.remove_ipcache(addr, prefix)
    }
    fn upsert_ipcache6(
        &mut self,
        addr: Ipv6Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), Error> {
        self.maps.set_ipcache6(addr, prefix, v)
    }
    fn remove_ipcache6(&mut self, addr: Ipv6Addr, prefix: u32) -> Result<(), Error> {
        self.maps.remove_ipcache6(addr, prefix)
    }
    fn upsert_endpoint(&mut self, ifindex: u32, v: EndpointInfo) -> Result<(), Error> {
        self.maps.upsert_endpoint(ifindex, v)
    }
    fn remove_endpoint(&mut self, ifindex: u32, ipv4_be: u32) -> Result<(), Error> {
        self.maps.remove_endpoint(ifindex, ipv4_be)
    }
}

impl Dataplane for KernelDataplane {
    fn ifindex(&self, ifname: &str) -> Result<u32, Error> {
        loader::ifindex(ifname)
    }
    fn attach_pod(&mut self, ifname: &str) -> Result<u32, Error> {
        self.datapath.attach_pod(ifname)
    }
    fn detach_pod(&mut self, ifindex: u32) -> Result<(), Error> {
        self.datapath.detach_pod(ifindex)
    }
    fn check_pod_link(&self, host_ifname: &str, netns: &str, ifname: &str) -> anyhow::Result<()> {
        crate::netlink::check_veth_pair(host_ifname, netns, ifname)
    }
    fn keep_first(&mut self, ifname: &str) -> Result<bool, Error> {
        self.datapath.keep_first(ifname)
    }
    fn adopt_links(&mut self) -> Result<Vec<u32>, Error> {
        self.datapath.adopt_links()
    }
    fn read_state(&self) -> MapState {
        self.maps.read_state()
    }
    fn attach_xdp(&mut self, ifname: &str) -> Result<u32, Error> {
        self.datapath.attach_xdp(ifname)
    }
    fn denied_sources(&self) -> Vec<(Ipv4Addr, u32)> {
        self.maps.denied_sources()
    }
    fn deny_source(&mut self, addr: Ipv4Addr, prefix: u32, cookie: u32) -> Result<(), Error> {
        self.maps.deny_source(addr, prefix, cookie)
    }
    fn allow_source(&mut self, addr: Ipv4Addr, prefix: u32) -> Result<(), Error> {
        self.maps.allow_source(addr, prefix)
    }
    fn sizes(&self) -> MapSizes {
        self.maps.sizes().clone()
    }
    fn counters(&self) -> Result<Counters, Error> {
        self.stats.counters()
    }
    fn xdp_counters(&self) -> Result<Counters, Error> {
        self.stats.xdp_counters()
    }
    fn stats_reader(&self) -> Option<StatsReader> {
        Some(self.stats.clone())
    }
    fn pins(&self) -> Option<&Pins> {
        Some(self.datapath.pins())
    }
    fn set_services(&mut self, frontends: &[crate::service::Frontend]) -> Result<(), Error> {
        self.services.apply(&mut self.maps, frontends)
    }
    fn services(&self) -> std::collections::BTreeMap<u32, crate::service::Frontend> {
        self.services.by_id().clone()
    }
}

impl ServiceWriter for Maps {
    fn set_frontend(&mut self, k: FrontendKey, v: SvcFrontend) -> Result<(), Error> {
        match k {
            FrontendKey::V4(k) => Maps::set_frontend(self, k, v),
            FrontendKey::V6(k) => Maps::set_frontend6(self, k, v),
        }
    }
    fn remove_frontend(&mut self, k: &FrontendKey) -> Result<(), Error> {
        match k {
            FrontendKey::V4(k) => Maps::remove_frontend(self, k),
            FrontendKey::V6(k) => Maps::remove_frontend6(self, k),
        }
    }
    fn set_backend(&mut self, k: SvcBackendKey, v: BackendAddr) -> Result<(), Error> {
        match v {
            BackendAddr::V4(v) => Maps::set_backend(self, k, v),
            BackendAddr::V6(v) => Maps::set_backend6(self, k, v),
        }
    }
    fn remove_backend(&mut self, v6: bool, k: &SvcBackendKey) -> Result<(), Error> {
        if v6 {
            Maps::remove_backend6(self, k)
        } else {
            Maps::remove_backend(self, k)
        }
    }
}

/// Both families' frontends as an earlier agent left them.
fn adopted_frontends(maps: &Maps) -> Vec<(FrontendKey, SvcFrontend)> {
    let v4 = maps
        .frontends()
        .into_iter()
        .map(|(k, v)| (FrontendKey::V4(k), v));
    let v6 = maps
        .frontends6()
        .into_iter()
        .map(|(k, v)| (FrontendKey::V6(k), v));
    v4.chain(v6).collect()
}

fn adopted_backends(maps: &Maps) -> Vec<(SvcBackendKey, BackendAddr)> {
    let v4 = maps
        .backends()
        .into_iter()
        .map(|(k, v)| (k, BackendAddr::V4(v)));
    let v6 = maps
        .backends6()
        .into_iter()
        .map(|(k, v)| (k, BackendAddr::V6(v)));
    v4.chain(v6).collect()
}

/// The conntrack fill level as of the last GC pass, shared between the GC
/// task (which writes it) and status and /metrics (which read it), so that
/// no reader walks the conntrack map.
#[derive(Clone, Debug, Default)]
pub struct ConntrackFill(Arc<Mutex<Option<GcPass>>>);

impl ConntrackFill {
    pub fn record(&self, pass: GcPass) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(pass);
    }

    /// `None` until the first pass.
    pub fn last(&self) -> Option<GcPass> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
pub mod memory {
    //! The dataplane in memory, for the agent's tests.
    use std::{
        collections::{BTreeMap, BTreeSet, HashMap},
        net::{Ipv4Addr, Ipv6Addr},
        sync::{Arc, Mutex, MutexGuard},
    };

    use palisade_common::{
        maps as names, reason,
        service::{SvcBackendKey, SvcFrontend},
        EndpointInfo, IpcacheValue, PolicyKey, PolicyValue,
    };
    use palisade_dataplane::{Counters, Error, MapSizes, MapState, Pins, StatsReader};

    use super::Dataplane;
    use crate::service_map::{BackendAddr, FrontendKey};
    use crate::sync::MapWriter;

    /// One thing done to the (pretend) kernel, in the order it was done.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Op {
        UpsertPolicy { prefix: u32, key: PolicyKey },
        RemovePolicy { prefix: u32, key: PolicyKey },
        UpsertIpcache { addr: Ipv4Addr, prefix: u32 },
        RemoveIpcache { addr: Ipv4Addr, prefix: u32 },
        UpsertEndpoint { ifindex: u32, flags: u32 },
        RemoveEndpoint { ifindex: u32 },
        AttachPod { ifindex: u32 },
        DetachPod { ifindex: u32 },
        AttachXdp { ifindex: u32 },
        DenySource { addr: Ipv4Addr, prefix: u32 },
        AllowSource { addr: Ipv4Addr, prefix: u32 },
        UpsertIpcache6 { addr: Ipv6Addr, prefix: u32 },
        RemoveIpcache6 { addr: Ipv6Addr, prefix: u32 },
    }

    /// Entries a map can hold; `None` is unlimited.
    #[derive(Clone, Debug, Default)]
    pub struct Capacities {
        /// Counts both indexes (by ifindex and by address), as the kernel map.
        pub endpoints: Option<usize>,
        pub ipcache: Option<usize>,
        pub policy: Option<usize>,
        pub xdp_deny: Option<usize>,
    }

    #[derive(Debug, Default)]
    pub struct Memory {
        /// Interface name -> ifindex.
        pub interfaces: BTreeMap<String, u32>,
        next_ifindex: u32,
        /// Endpoints by ifindex, ipcache, policy.
        pub maps: MapState,
        /// The endpoint map's second index, by address (network order).
        pub endpoints_by_ip: HashMap<u32, EndpointInfo>,
        pub capacity: Capacities,
        /// Interfaces with pod programs attached (pinned links).
        pub attached: BTreeSet<u32>,
        pub xdp: BTreeSet<u32>,
        pub deny: BTreeMap<(Ipv4Addr, u32), u32>,
        /// Attaching to this interface fails.
        pub fail_attach: Option<String>,
        pub log: Vec<Op>,
        pub counters: Counters,
        pub xdp_counters: Counters,
        /// The Service translation maps.
        pub frontends: BTreeMap<FrontendKey, SvcFrontend>,
        pub backends: BTreeMap<(bool, SvcBackendKey), BackendAddr>,
        pub services: crate::service_map::ServiceMaps,
    }

    impl crate::service_map::ServiceWriter for Memory {
        fn set_frontend(&mut self, k: FrontendKey, v: SvcFrontend) -> Result<(), Error> {
            self.frontends.insert(k, v);
            Ok(())
        }
        fn remove_frontend(&mut self, k: &FrontendKey) -> Result<(), Error> {
            self.frontends.remove(k);
            Ok(())
        }
        fn set_backend(&mut self, k: SvcBackendKey, v: BackendAddr) -> Result<(), Error> {
            self.backends
                .insert((matches!(v, BackendAddr::V6(_)), k), v);
            Ok(())
        }
        fn remove_backend(&mut self, v6: bool, k: &SvcBackendKey) -> Result<(), Error> {
            self.backends.remove(&(v6, *k));
            Ok(())
        }
    }

    /// Clones share the state: a test keeps one to look at what the agent
    /// (which owns another) did, and to hand the same "kernel" to a
    /// restarted agent.
    #[derive(Clone, Debug, Default)]
    pub struct MemoryDataplane(Arc<Mutex<Memory>>);

    fn full(name: &'static str, cap: usize) -> Error {
        Error::MapFull {
            name,
            entries: cap as u32,
        }
    }

    /// An update, or an insert the capacity still has room for (a full
    /// kernel map refuses new keys, not updates).
    fn insert_capped<K: std::hash::Hash + Eq, V>(
        map: &mut std::collections::HashMap<K, V>,
        cap: Option<usize>,
        name: &'static str,
        k: K,
        v: V,
    ) -> Result<(), Error> {
        if let Some(cap) = cap.filter(|c| !map.contains_key(&k) && map.len() >= *c) {
            return Err(full(name, cap));
        }
        map.insert(k, v);
        Ok(())
    }

    impl MemoryDataplane {
        pub fn new() -> Self {
            Self::default()
        }

        pub fn lock(&self) -> MutexGuard<'_, Memory> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// A new interface (with a fresh ifindex, never reused).
        pub fn add_interface(&self, name: &str) -> u32 {
            let mut m = self.lock();
            m.next_ifindex = m.next_ifindex.max(10) + 1;
            let idx = m.next_ifindex;
            m.interfaces.insert(name.into(), idx);
            idx
        }

        /// The interface disappears (pod deleted behind the agent's back).
        /// Its pinned links stay until adopted (and then dropped), as in the
        /// kernel.
        pub fn remove_interface(&self, name: &str) {
            self.lock().interfaces.remove(name);
        }

        pub fn fail_attach(&self, ifname: Option<&str>) {
            self.lock().fail_attach = ifname.map(Into::into);
        }

        pub fn set_capacity(&self, f: impl FnOnce(&mut Capacities)) {
            f(&mut self.lock().capacity)
        }

        /// Every write so far, in order.
        pub fn log(&self) -> Vec<Op> {
            self.lock().log.clone()
        }

        pub fn clear_log(&self) {
            self.lock().log.clear()
        }

        pub fn maps(&self) -> MapState {
            self.lock().maps.clone()
        }

        pub fn attached(&self) -> BTreeSet<u32> {
            self.lock().attached.clone()
        }
    }

    impl MapWriter for MemoryDataplane {
        fn upsert_policy(
            &mut self,
            prefix: u32,
            key: PolicyKey,
            v: PolicyValue,
        ) -> Result<(), Error> {
            let mut m = self.lock();
            let cap = m.capacity.policy;
            insert_capped(&mut m.maps.policy, cap, names::POLICY, (prefix, key), v)?;
            m.log.push(Op::UpsertPolicy { prefix, key });
            Ok(())
        }
        fn remove_policy(&mut self, prefix: u32, key: PolicyKey) -> Result<(), Error> {
            let mut m = self.lock();
            m.maps.policy.remove(&(prefix, key));
            m.log.push(Op::RemovePolicy { prefix, key });
            Ok(())
        }
        fn upsert_ipcache(
            &mut self,
            addr: Ipv4Addr,
            prefix: u32,
            v: IpcacheValue,
        ) -> Result<(), Error> {
            let mut m = self.lock();
            let cap = m.capacity.ipcache;
            insert_capped(&mut m.maps.ipcache, cap, names::IPCACHE, (addr, prefix), v)?;
            m.log.push(Op::UpsertIpcache { addr, prefix });
            Ok(())
        }
        fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix: u32) -> Result<(), Error> {
            let mut m = self.lock();
            m.maps.ipcache.remove(&(addr, prefix));
            m.log.push(Op::RemoveIpcache { addr, prefix });
            Ok(())
        }
        fn upsert_ipcache6(
            &mut self,
            addr: Ipv6Addr,
            prefix: u32,
            v: IpcacheValue,
        ) -> Result<(), Error> {
            let mut m = self.lock();
            m.maps.ipcache6.insert((addr, prefix), v);
            m.log.push(Op::UpsertIpcache6 { addr, prefix });
            Ok(())
        }
        fn remove_ipcache6(&mut self, addr: Ipv6Addr, prefix: u32) -> Result<(), Error> {
            let mut m = self.lock();
            m.maps.ipcache6.remove(&(addr, prefix));
            m.log.push(Op::RemoveIpcache6 { addr, prefix });
            Ok(())
        }
        fn upsert_endpoint(&mut self, ifindex: u32, v: EndpointInfo) -> Result<(), Error> {
            let mut m = self.lock();
            // As the kernel map: no by-address entry for IPv4 address 0
            // (an IPv6-only pod).
            let by_ip = v.ipv4 != 0;
            let new = usize::from(!m.maps.endpoints.contains_key(&ifindex))
                + usize::from(by_ip && !m.endpoints_by_ip.contains_key(&v.ipv4));
            let used = m.maps.endpoints.len() + m.endpoints_by_ip.len();
            if let Some(cap) = m.capacity.endpoints.filter(|c| used + new > *c) {
                return Err(full(names::ENDPOINTS, cap));
            }
            if by_ip {
                m.endpoints_by_ip.insert(v.ipv4, v);
            }
            m.maps.endpoints.insert(ifindex, v);
            m.log.push(Op::UpsertEndpoint {
                ifindex,
                // The compiler's flags: the sync's "no entries" bits are
                // checked by the sync's own tests.
                flags: v.flags & !palisade_common::EP_NO_ENTRIES_MASK,
            });
            Ok(())
        }
        fn remove_endpoint(&mut self, ifindex: u32, ipv4_be: u32) -> Result<(), Error> {
            let mut m = self.lock();
            m.maps.endpoints.remove(&ifindex);
            m.endpoints_by_ip.remove(&ipv4_be);
            m.log.push(Op::RemoveEndpoint { ifindex });
            Ok(())
        }
    }

    impl Dataplane for MemoryDataplane {
        fn ifindex(&self, ifname: &str) -> Result<u32, Error> {
            self.lock()
                .interfaces
                .get(ifname)
                .copied()
                .ok_or_else(|| Error::NoSuchInterface(ifname.into()))
        }
        /// Interfaces here are names in a table, with no peers to check.
        fn check_pod_link(&self, host_ifname: &str, _: &str, _: &str) -> anyhow::Result<()> {
            self.ifindex(host_ifname)?;
            Ok(())
        }
        fn attach_pod(&mut self, ifname: &str) -> Result<u32, Error> {
            let ifindex = self.ifindex(ifname)?;
            let mut m = self.lock();
            if m.fail_attach.as_deref() == Some(ifname) {
                return Err(Error::Io {
                    what: format!("attaching to {ifname} (made to fail)"),
                    source: std::io::Error::from_raw_os_error(libc::EBUSY),
                });
            }
            m.attached.insert(ifindex);
            m.log.push(Op::AttachPod { ifindex });
            Ok(ifindex)
        }
        fn detach_pod(&mut self, ifindex: u32) -> Result<(), Error> {
            let mut m = self.lock();
            m.attached.remove(&ifindex);
            m.log.push(Op::DetachPod { ifindex });
            Ok(())
        }
        fn adopt_links(&mut self) -> Result<Vec<u32>, Error> {
            let mut m = self.lock();
            let live: BTreeSet<u32> = m.interfaces.values().copied().collect();
            m.attached.retain(|i| live.contains(i));
            Ok(m.attached.iter().copied().collect())
        }
        fn read_state(&self) -> MapState {
            self.maps()
        }
        fn attach_xdp(&mut self, ifname: &str) -> Result<u32, Error> {
            let ifindex = self.ifindex(ifname)?;
            let mut m = self.lock();
            m.xdp.insert(ifindex);
            m.log.push(Op::AttachXdp { ifindex });
            Ok(ifindex)
        }
        fn denied_sources(&self) -> Vec<(Ipv4Addr, u32)> {
            self.lock().deny.keys().copied().collect()
        }
        fn deny_source(&mut self, addr: Ipv4Addr, prefix: u32, cookie: u32) -> Result<(), Error> {
            let mut m = self.lock();
            let fresh = !m.deny.contains_key(&(addr, prefix));
            if let Some(cap) = m.capacity.xdp_deny.filter(|c| fresh && m.deny.len() >= *c) {
                return Err(full(names::XDP_DENY, cap));
            }
            m.deny.insert((addr, prefix), cookie);
            m.log.push(Op::DenySource { addr, prefix });
            Ok(())
        }
        fn allow_source(&mut self, addr: Ipv4Addr, prefix: u32) -> Result<(), Error> {
            let mut m = self.lock();
            m.deny.remove(&(addr, prefix));
            m.log.push(Op::AllowSource { addr, prefix });
            Ok(())
        }
        fn sizes(&self) -> MapSizes {
            let c = self.lock().capacity.clone();
            let d = MapSizes::default();
            let or = |v: Option<usize>, d: u32| v.map_or(d, |v| v as u32);
            MapSizes {
                endpoints: or(c.endpoints, d.endpoints),
                ipcache: or(c.ipcache, d.ipcache),
                policy: or(c.policy, d.policy),
                xdp_deny: or(c.xdp_deny, d.xdp_deny),
                ..d
            }
        }
        fn counters(&self) -> Result<Counters, Error> {
            let c = self.lock().counters.clone();
            Ok(if c.0.is_empty() {
                Counters(vec![0; reason::MAX as usize])
            } else {
                c
            })
        }
        fn xdp_counters(&self) -> Result<Counters, Error> {
            Ok(self.lock().xdp_counters.clone())
        }
        fn stats_reader(&self) -> Option<StatsReader> {
            None
        }
        fn pins(&self) -> Option<&Pins> {
            None
        }
        fn set_services(&mut self, frontends: &[crate::service::Frontend]) -> Result<(), Error> {
            let mut m = self.lock();
            let mut services = std::mem::take(&mut m.services);
            let r = services.apply(&mut *m, frontends);
            m.services = services;
            r
        }
        fn services(&self) -> BTreeMap<u32, crate::service::Frontend> {
            self.lock().services.by_id().clone()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn send<T: Send>() {}

        #[test]
        fn both_dataplanes_can_move_to_the_owner_thread() {
            send::<Box<dyn Dataplane>>();
            send::<super::super::KernelDataplane>();
        }

        #[test]
        fn a_full_map_refuses_new_keys_but_takes_updates() {
            let mut d = MemoryDataplane::new();
            d.set_capacity(|c| c.ipcache = Some(1));
            let v = IpcacheValue {
                identity: 1,
                cidr_identity: 0,
            };
            let a = Ipv4Addr::new(10, 0, 0, 1);
            d.upsert_ipcache(a, 32, v).unwrap();
            d.upsert_ipcache(a, 32, v).unwrap();
            let e = d
                .upsert_ipcache(Ipv4Addr::new(10, 0, 0, 2), 32, v)
                .unwrap_err();
            assert!(matches!(e, Error::MapFull { name, .. } if name == names::IPCACHE));
            d.remove_ipcache(a, 32).unwrap();
            d.upsert_ipcache(Ipv4Addr::new(10, 0, 0, 2), 32, v).unwrap();
            assert_eq!(d.log().len(), 4);
        }
    }
}
