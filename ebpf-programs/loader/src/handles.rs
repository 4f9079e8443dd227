//! Map handles of their own, opened from the pins independently of `Maps`
//! (and of the agent that owns `Maps`): the conntrack GC, which walks a map
//! that can hold hundreds of thousands of entries, and the counter reader
//! behind /metrics. Each holds its own file descriptors, so neither ever
//! waits for (or holds up) a registration or a map sync.
use std::sync::Arc;

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray};
use palisade_common::{maps as names, CtKey, CtValue, FragKey, FragValue};

use crate::{
    maps::{removed, sum_counters, Counters},
    pins::Pins,
    Error,
};

fn open<T: TryFrom<Map, Error = MapError>>(
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcPass {
    /// Expired conntrack and fragment entries deleted.
    pub removed: usize,
    /// Conntrack entries left after the pass (the map's fill level).
    pub conntrack_entries: u64,
    /// The conntrack map's capacity (as created, which for an adopted map
    /// may differ from the configured size).
    pub conntrack_max: u32,
    pub fragment_entries: u64,
    pub fragment_max: u32,
}

/// Deletes expired CONNTRACK and FRAGMENTS entries. Opened from the pinned
/// maps (the datapath must have been loaded once), `Send`: it lives in a
/// task of its own.
pub struct ConntrackGc {
    conntrack: HashMap<MapData, CtKey, CtValue>,
    conntrack_max: u32,
    fragments: HashMap<MapData, FragKey, FragValue>,
    fragment_max: u32,
}

impl ConntrackGc {
    pub fn open(pins: &Pins) -> Result<Self, Error> {
        pins.check_bpffs()?;
        let (conntrack, conntrack_max) = open(pins, names::CONNTRACK)?;
        let (fragments, fragment_max) = open(pins, names::FRAGMENTS)?;
        Ok(Self {
            conntrack,
            conntrack_max,
            fragments,
            fragment_max,
        })
    }

    /// Delete the entries that expired before `now_ns` (CLOCK_MONOTONIC, the
    /// clock of bpf_ktime_get_ns, see `maps::monotonic_ns`) and count what
    /// is left, in one walk of each map.
    pub fn pass(&mut self, now_ns: u64) -> Result<GcPass, Error> {
        let mut live = 0u64;
        let mut dead = Vec::new();
        for (k, v) in self.conntrack.iter().filter_map(Result::ok) {
            if v.expires_ns <= now_ns {
                dead.push(k);
            } else {
                live += 1;
            }
        }
        for k in &dead {
            removed(names::CONNTRACK, self.conntrack.remove(k))?;
        }
        let mut live_frags = 0u64;
        let mut dead_frags = Vec::new();
        for (k, v) in self.fragments.iter().filter_map(Result::ok) {
            if v.expires_ns <= now_ns {
                dead_frags.push(k);
            } else {
                live_frags += 1;
            }
        }
        for k in &dead_frags {
            removed(names::FRAGMENTS, self.fragments.remove(k))?;
        }
        Ok(GcPass {
            removed: dead.len() + dead_frags.len(),
            conntrack_entries: live,
            conntrack_max: self.conntrack_max,
            fragment_entries: live_frags,
            fragment_max: self.fragment_max,
        })
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
