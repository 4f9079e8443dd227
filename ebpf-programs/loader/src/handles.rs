//! Map handles of their own, opened from the pins independently of `Maps`
//! (and of the agent that owns `Maps`): the conntrack GC, which walks a map
//! that can hold hundreds of thousands of entries, and the counter reader
//! behind /metrics. Each holds its own file descriptors, so neither ever
//! waits for (or holds up) a registration or a map sync.
use std::{
    collections::{HashMap as StdHashMap, HashSet},
    sync::Arc,
};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray};
use palisade_common::{
    ct_budget::{charged, fits, CtBudget, CtCharge},
    maps as names, CtKey, CtKey6, CtValue, EndpointInfo, EndpointKey, FragKey, FragKey6, FragValue,
    Ip6, EP_KEY_IFINDEX, EP_KEY_IPV4,
};

use crate::{
    maps::{removed, sum_counters, Counters},
    pins::Pins,
    Error,
};

/// A pinned map as `T`, and its capacity as created.
pub(crate) fn open<T: TryFrom<Map, Error = MapError>>(
    pins: &Pins,
    name: &'static str,
) -> Result<(T, u32), Error> {
    let err = |source| Error::Map { name, source };
    let data = MapData::from_pin(pins.map(name)).map_err(err)?;
    let max_entries = data.info().map_err(err)?.max_entries();
    let map = Map::from_map_data(data).map_err(err)?;
    Ok((T::try_from(map).map_err(err)?, max_entries))
}

/// What one GC pass did and left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcPass {
    /// Expired conntrack and fragment entries deleted.
    pub removed: usize,
    /// Entries of endpoints that are gone (deregistered or forgotten)
    /// deleted: a pod's state goes with it.
    pub orphans_removed: usize,
    /// Conntrack entries left after the pass (the map's fill level).
    pub conntrack_entries: u64,
    /// The conntrack map's capacity (as created, which for an adopted map
    /// may differ from the configured size).
    pub conntrack_max: u32,
    pub fragment_entries: u64,
    pub fragment_max: u32,
    /// The same for the IPv6 tables (`CONNTRACK6`, `FRAGMENTS6`).
    pub conntrack6_entries: u64,
    pub conntrack6_max: u32,
    pub fragment6_entries: u64,
    pub fragment6_max: u32,
    /// What each endpoint of `ENDPOINTS` holding any entry is charged
    /// (`palisade_common::ct_budget`), by id.
    pub charges: Vec<(u32, CtCharge)>,
    /// Those of `charges` holding their whole conntrack or fragment budget.
    pub over_budget: Vec<(u32, CtCharge)>,
}

/// Deletes expired CONNTRACK and FRAGMENTS entries and those of endpoints
/// that are gone, and recounts what each endpoint is charged
/// (`CT_CHARGE`). Opened from the pinned maps (the datapath must have been
/// loaded once), `Send`: it lives in a task of its own.
pub struct ConntrackGc {
    conntrack: HashMap<MapData, CtKey, CtValue>,
    conntrack_max: u32,
    fragments: HashMap<MapData, FragKey, FragValue>,
    fragment_max: u32,
    conntrack6: HashMap<MapData, CtKey6, CtValue>,
    conntrack6_max: u32,
    fragments6: HashMap<MapData, FragKey6, FragValue>,
    fragment6_max: u32,
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    endpoints6: HashMap<MapData, Ip6, u32>,
    charge: HashMap<MapData, u32, CtCharge>,
    budget: CtBudget,
}

/// A conntrack or fragment table's key and value, as the GC sees them.
trait Entry: Copy {
    type Value: Copy;
    fn endpoint_id(&self) -> u32;
    fn expires_ns(v: &Self::Value) -> u64;
    /// Counted against the budget at all (a closing TCP entry is not).
    fn charged(&self, v: &Self::Value) -> bool;
    /// Which budget: fragment records or conntrack entries.
    const FRAGMENT: bool;
    fn charged_to(&self, live: &Live) -> u32;
}

/// `Entry` for a key type of one family: `$fragment` says which budget
/// its entries count against, `$charged_to` how `Live` finds the sender.
macro_rules! entry {
    ($key:ty, $value:ty, $fragment:expr, $charged_to:ident) => {
        impl Entry for $key {
            type Value = $value;
            fn endpoint_id(&self) -> u32 {
                self.endpoint_id
            }
            fn expires_ns(v: &$value) -> u64 {
                v.expires_ns
            }
            fn charged(&self, v: &$value) -> bool {
                entry_charged(self.protocol, v)
            }
            const FRAGMENT: bool = $fragment;
            fn charged_to(&self, live: &Live) -> u32 {
                live.$charged_to(self.endpoint_id, self.scope, self.saddr)
            }
        }
    };
}
entry!(CtKey, CtValue, false, charged_to);
entry!(CtKey6, CtValue, false, charged_to6);
entry!(FragKey, FragValue, true, charged_to);
entry!(FragKey6, FragValue, true, charged_to6);

/// Counted against a budget at all: a closing TCP entry is not; every
/// fragment record is.
trait Charged {
    fn charged(&self, protocol: u8) -> bool;
}

impl Charged for CtValue {
    fn charged(&self, protocol: u8) -> bool {
        charged(protocol, self.tcp_state)
    }
}

impl Charged for FragValue {
    fn charged(&self, _: u8) -> bool {
        true
    }
}

fn entry_charged(protocol: u8, v: &impl Charged) -> bool {
    v.charged(protocol)
}

/// One table's share of a GC pass.
struct Swept<K> {
    live: u64,
    dead: Vec<K>,
    /// Entries of endpoints missing from the first read of `ENDPOINTS`.
    orphans: Vec<K>,
}

/// Walks one table: expired entries and orphans are set aside for
/// deletion, the rest counted and charged.
fn sweep<K: Entry + aya::Pod>(
    map: &HashMap<MapData, K, K::Value>,
    now_ns: u64,
    live: &Live,
    charges: &mut StdHashMap<u32, CtCharge>,
) -> Swept<K>
where
    K::Value: aya::Pod,
{
    let mut s = Swept {
        live: 0,
        dead: Vec::new(),
        orphans: Vec::new(),
    };
    for (k, v) in map.iter().filter_map(Result::ok) {
        if K::expires_ns(&v) <= now_ns {
            s.dead.push(k);
        } else if !live.ids.contains(&k.endpoint_id()) {
            s.orphans.push(k);
        } else {
            s.live += 1;
            charge(charges, live, &k, &v);
        }
    }
    s
}

fn charge<K: Entry>(charges: &mut StdHashMap<u32, CtCharge>, live: &Live, k: &K, v: &K::Value) {
    if !k.charged(v) {
        return;
    }
    let c = charges.entry(k.charged_to(live)).or_default();
    if K::FRAGMENT {
        c.fragments += 1;
    } else {
        c.entries += 1;
    }
}

/// Deletes a sweep's dead entries, and its orphans whose endpoint is still
/// missing from the second read (`after`); the others are counted and
/// charged after all. Returns (expired, orphans) deleted.
fn reap<K: Entry + aya::Pod>(
    map: &mut HashMap<MapData, K, K::Value>,
    name: &'static str,
    s: &mut Swept<K>,
    after: &Live,
    charges: &mut StdHashMap<u32, CtCharge>,
) -> Result<(usize, usize), Error>
where
    K::Value: aya::Pod,
{
    let mut orphans = 0;
    for k in &s.orphans {
        match map.get(k, 0) {
            Ok(v) if after.ids.contains(&k.endpoint_id()) => {
                s.live += 1;
                charge(charges, after, k, &v);
            }
            Ok(_) => {
                removed(name, map.remove(k))?;
                orphans += 1;
            }
            Err(_) => {}
        }
    }
    for k in &s.dead {
        removed(name, map.remove(k))?;
    }
    Ok((s.dead.len(), orphans))
}

/// The endpoints in `ENDPOINTS` at one moment: their ids, and which one
/// holds each address (to charge ingress entries to a local sender, as the
/// kernel does).
#[derive(Default)]
struct Live {
    ids: HashSet<u32>,
    by_addr: StdHashMap<u32, u32>,
    by_addr6: StdHashMap<Ip6, u32>,
}

impl Live {
    fn read(
        endpoints: &HashMap<MapData, EndpointKey, EndpointInfo>,
        endpoints6: &HashMap<MapData, Ip6, u32>,
    ) -> Self {
        let mut l = Live {
            by_addr6: endpoints6.iter().filter_map(Result::ok).collect(),
            ..Default::default()
        };
        for (k, v) in endpoints.iter().filter_map(Result::ok) {
            // (Both of an endpoint's keys name it; either keeps it live.)
            match k.kind {
                EP_KEY_IFINDEX => {
                    l.ids.insert(v.endpoint_id);
                }
                EP_KEY_IPV4 => {
                    l.ids.insert(v.endpoint_id);
                    l.by_addr.insert(k.value, v.endpoint_id);
                }
                _ => {}
            }
        }
        l
    }

    /// The endpoint an entry made on `endpoint_id`'s interface in `scope`
    /// is charged to (`palisade_common::ct_budget`).
    fn charged_to(&self, endpoint_id: u32, scope: u8, saddr: u32) -> u32 {
        palisade_common::ct_budget::charged_to(endpoint_id, scope, saddr, |a| {
            self.by_addr.get(&a).copied()
        })
    }

    fn charged_to6(&self, endpoint_id: u32, scope: u8, saddr: Ip6) -> u32 {
        palisade_common::ct_budget::charged_to(endpoint_id, scope, saddr, |a| {
            self.by_addr6.get(&a).copied()
        })
    }
}

impl ConntrackGc {
    pub fn open(pins: &Pins) -> Result<Self, Error> {
        pins.check_bpffs()?;
        let (conntrack, conntrack_max) = open(pins, names::CONNTRACK)?;
        let (fragments, fragment_max) = open(pins, names::FRAGMENTS)?;
        let (conntrack6, conntrack6_max) = open(pins, names::CONNTRACK6)?;
        let (fragments6, fragment6_max) = open(pins, names::FRAGMENTS6)?;
        let (endpoints, _) = open(pins, names::ENDPOINTS)?;
        let (endpoints6, _) = open(pins, names::ENDPOINTS6)?;
        let (charge, _) = open(pins, names::CT_CHARGE)?;
        Ok(Self {
            conntrack,
            conntrack_max,
            fragments,
            fragment_max,
            conntrack6,
            conntrack6_max,
            fragments6,
            fragment6_max,
            endpoints,
            endpoints6,
            charge,
            budget: CtBudget::default(),
        })
    }

    /// The budget the programs apply (`Maps::set_conntrack_budget`), for
    /// `GcPass::over_budget`.
    pub fn with_budget(mut self, budget: CtBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Delete the entries that expired before `now_ns` (CLOCK_MONOTONIC_COARSE,
    /// the programs' clock, see `maps::ct_clock_ns`) and those of
    /// endpoints no longer in `ENDPOINTS`, count what is left, in one walk
    /// of each map, and set every endpoint's charge to what it holds.
    ///
    /// `ENDPOINTS` is read before and after the walks: an entry of an
    /// endpoint missing from both is an orphan (one registered during the
    /// walk is in the second read; one deregistered during it is not).
    /// Charges the kernel adds while the pass runs are overwritten by the
    /// recount, so a budget may be overrun by what one pass's duration
    /// allows; the next pass counts those entries.
    pub fn pass(&mut self, now_ns: u64) -> Result<GcPass, Error> {
        let before = Live::read(&self.endpoints, &self.endpoints6);
        let mut charges: StdHashMap<u32, CtCharge> = StdHashMap::new();
        let mut ct = sweep(&self.conntrack, now_ns, &before, &mut charges);
        let mut frag = sweep(&self.fragments, now_ns, &before, &mut charges);
        let mut ct6 = sweep(&self.conntrack6, now_ns, &before, &mut charges);
        let mut frag6 = sweep(&self.fragments6, now_ns, &before, &mut charges);
        let after = Live::read(&self.endpoints, &self.endpoints6);
        let c = &mut charges;
        let reaped = [
            reap(&mut self.conntrack, names::CONNTRACK, &mut ct, &after, c)?,
            reap(&mut self.fragments, names::FRAGMENTS, &mut frag, &after, c)?,
            reap(&mut self.conntrack6, names::CONNTRACK6, &mut ct6, &after, c)?,
            reap(
                &mut self.fragments6,
                names::FRAGMENTS6,
                &mut frag6,
                &after,
                c,
            )?,
        ];
        let charges = self.recharge(charges, &after)?;
        let over_budget = charges
            .iter()
            .filter(|(_, c)| {
                !fits(c.entries, 1, self.budget.limit(false))
                    || !fits(c.fragments, 1, self.budget.limit(true))
            })
            .copied()
            .collect();
        Ok(GcPass {
            removed: reaped.iter().map(|r| r.0).sum(),
            orphans_removed: reaped.iter().map(|r| r.1).sum(),
            conntrack_entries: ct.live,
            conntrack_max: self.conntrack_max,
            fragment_entries: frag.live,
            fragment_max: self.fragment_max,
            conntrack6_entries: ct6.live,
            conntrack6_max: self.conntrack6_max,
            fragment6_entries: frag6.live,
            fragment6_max: self.fragment6_max,
            charges,
            over_budget,
        })
    }

    /// Sets every endpoint's charge to what it was found holding; the
    /// charges of endpoints that are gone and hold nothing are deleted.
    /// Returns the charges of live endpoints, by id.
    fn recharge(
        &mut self,
        mut charges: StdHashMap<u32, CtCharge>,
        live: &Live,
    ) -> Result<Vec<(u32, CtCharge)>, Error> {
        let known: Vec<u32> = self.charge.keys().filter_map(Result::ok).collect();
        let write = |m: &mut HashMap<MapData, u32, CtCharge>, id: u32, c: CtCharge| {
            m.insert(id, c, 0).map_err(|source| Error::Map {
                name: names::CT_CHARGE,
                source,
            })
        };
        for id in known {
            let c = charges.get(&id).copied().unwrap_or_default();
            if c == CtCharge::default() && !live.ids.contains(&id) {
                removed(names::CT_CHARGE, self.charge.remove(&id))?;
            } else {
                write(&mut self.charge, id, c)?;
            }
        }
        let mut out = Vec::new();
        for (id, c) in charges.drain() {
            if !live.ids.contains(&id) {
                continue;
            }
            // (An endpoint the kernel has not charged yet: written too, so
            // its count starts from the truth.)
            if self.charge.get(&id, 0).is_err() {
                write(&mut self.charge, id, c)?;
            }
            out.push((id, c));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }
}

struct Counting {
    counters: PerCpuArray<MapData, u64>,
    xdp_counters: PerCpuArray<MapData, u64>,
}

/// The per-CPU verdict/reason counters of the tc programs and of the XDP
/// prefilter, summed over CPUs. Cheap to clone, `Send + Sync`: /metrics
/// reads it without the agent.
#[derive(Clone)]
pub struct StatsReader(Arc<Counting>);

impl StatsReader {
    pub fn open(pins: &Pins) -> Result<Self, Error> {
        pins.check_bpffs()?;
        let (counters, _) = open(pins, names::COUNTERS)?;
        let (xdp_counters, _) = open(pins, names::XDP_COUNTERS)?;
        Ok(Self(Arc::new(Counting {
            counters,
            xdp_counters,
        })))
    }

    pub fn counters(&self) -> Result<Counters, Error> {
        sum_counters(&self.0.counters, names::COUNTERS)
    }

    pub fn xdp_counters(&self) -> Result<Counters, Error> {
        sum_counters(&self.0.xdp_counters, names::XDP_COUNTERS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}

    #[test]
    fn handles_can_live_in_tasks_of_their_own() {
        send_sync::<StatsReader>();
        send::<ConntrackGc>();
    }
}
