//! `LOCAL_PODS` / `LOCAL_PODS6`: pod address -> host veth, the index the
//! programs deliver local traffic by (`palisade_common::local`). Written
//! beside `ENDPOINTS` by `Maps::upsert_endpoint`/`remove_endpoint`; an
//! entry is a hint the programs check against the interface's endpoint
//! entry, so one left stale delivers nothing.
use std::collections::HashMap as Wanted;

use aya::maps::{HashMap, MapData};
use palisade_common::{maps as names, EndpointInfo, Ip6};

use crate::{
    maps::{removed, write_err},
    Error,
};

/// Whether allowed traffic between pods of the node skips the node's IP
/// stack (`palisade_common::local`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalDelivery {
    /// Redirected from the sender's host veth to the receiver's.
    #[default]
    Redirect,
    /// Routed by the node like any other traffic: its netfilter rules see
    /// it (no index is written, and the one there is emptied).
    Stack,
}

impl std::str::FromStr for LocalDelivery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redirect" => Ok(Self::Redirect),
            "stack" => Ok(Self::Stack),
            _ => Err(format!("unknown local delivery {s:?} (redirect or stack)")),
        }
    }
}

pub(crate) struct LocalPods {
    v4: HashMap<MapData, u32, u32>,
    v6: HashMap<MapData, Ip6, u32>,
    mode: LocalDelivery,
    entries: u32,
}

impl LocalPods {
    pub(crate) fn new(
        v4: HashMap<MapData, u32, u32>,
        v6: HashMap<MapData, Ip6, u32>,
        mode: LocalDelivery,
        entries: u32,
    ) -> Self {
        Self {
            v4,
            v6,
            mode,
            entries,
        }
    }

    /// Index `info`'s addresses by `ifindex`; `old` is the interface's
    /// previous entry, whose addresses it no longer has are dropped.
    pub(crate) fn set(
        &mut self,
        ifindex: u32,
        info: &EndpointInfo,
        old: Option<&EndpointInfo>,
    ) -> Result<(), Error> {
        if let Some(old) = old {
            if old.ipv4 != info.ipv4 || old.ipv6 != info.ipv6 {
                self.clear(ifindex, old)?;
            }
        }
        if self.mode == LocalDelivery::Stack {
            return Ok(());
        }
        if info.ipv4 != 0 {
            self.v4
                .insert(info.ipv4, ifindex, 0)
                .map_err(write_err(names::LOCAL_PODS, self.entries))?;
        }
        if info.ipv6 != [0; 4] {
            self.v6
                .insert(info.ipv6, ifindex, 0)
                .map_err(write_err(names::LOCAL_PODS6, self.entries))?;
        }
        Ok(())
    }

    /// Drop `info`'s addresses where they still point at `ifindex` (a new
    /// pod may already hold one).
    pub(crate) fn clear(&mut self, ifindex: u32, info: &EndpointInfo) -> Result<(), Error> {
        if info.ipv4 != 0 && self.v4.get(&info.ipv4, 0).ok() == Some(ifindex) {
            removed(names::LOCAL_PODS, self.v4.remove(&info.ipv4))?;
        }
        if info.ipv6 != [0; 4] && self.v6.get(&info.ipv6, 0).ok() == Some(ifindex) {
            removed(names::LOCAL_PODS6, self.v6.remove(&info.ipv6))?;
        }
        Ok(())
    }

    /// Make the (pinned, possibly older) index hold exactly `endpoints`'
    /// addresses: what a restarted agent finds is rebuilt, not trusted.
    /// (By address, so one pass over each: a node may have thousands.)
    pub(crate) fn resync(&mut self, endpoints: &[(u32, EndpointInfo)]) -> Result<(), Error> {
        let mut want4 = Wanted::new();
        let mut want6 = Wanted::new();
        if self.mode == LocalDelivery::Redirect {
            for (ifindex, info) in endpoints {
                if info.ipv4 != 0 {
                    want4.insert(info.ipv4, *ifindex);
                }
                if info.ipv6 != [0; 4] {
                    want6.insert(info.ipv6, *ifindex);
                }
            }
        }
        sync_index(&mut self.v4, &want4, names::LOCAL_PODS, self.entries)?;
        sync_index(&mut self.v6, &want6, names::LOCAL_PODS6, self.entries)
    }

    /// The interface `LOCAL_PODS` delivers `addr` (network order) to.
    pub(crate) fn get4(&self, addr: u32) -> Option<u32> {
        self.v4.get(&addr, 0).ok()
    }
}

/// `map` made to hold exactly `want`: what it has otherwise is removed,
/// what it lacks or holds differently is written.
fn sync_index<K: aya::Pod + Eq + std::hash::Hash>(
    map: &mut HashMap<MapData, K, u32>,
    want: &Wanted<K, u32>,
    name: &'static str,
    entries: u32,
) -> Result<(), Error> {
    let have: Wanted<K, u32> = map.iter().filter_map(Result::ok).collect();
    for (k, v) in &have {
        if want.get(k) != Some(v) {
            removed(name, map.remove(k))?;
        }
    }
    for (k, v) in want {
        if have.get(k) != Some(v) {
            map.insert(*k, *v, 0).map_err(write_err(name, entries))?;
        }
    }
    Ok(())
}
