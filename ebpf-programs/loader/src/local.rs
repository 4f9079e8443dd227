//! `LOCAL_PODS` / `LOCAL_PODS6`: pod address -> host veth, the index the
//! programs deliver local traffic by (`palisade_common::local`). Written
//! beside `ENDPOINTS` by `Maps::upsert_endpoint`/`remove_endpoint`; an
//! entry is a hint the programs check against the interface's endpoint
//! entry, so one left stale delivers nothing.
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
    pub(crate) fn resync(&mut self, endpoints: &[(u32, EndpointInfo)]) -> Result<(), Error> {
        let keep = |ifindex: u32, matches: &dyn Fn(&EndpointInfo) -> bool| {
            self.mode == LocalDelivery::Redirect
                && endpoints
                    .iter()
                    .any(|(i, info)| *i == ifindex && matches(info))
        };
        let stale4: Vec<u32> = self
            .v4
            .iter()
            .filter_map(Result::ok)
            .filter(|(a, i)| !keep(*i, &|info| info.ipv4 == *a))
            .map(|(a, _)| a)
            .collect();
        let stale6: Vec<Ip6> = self
            .v6
            .iter()
            .filter_map(Result::ok)
            .filter(|(a, i)| !keep(*i, &|info| info.ipv6 == *a))
            .map(|(a, _)| a)
            .collect();
        for a in stale4 {
            removed(names::LOCAL_PODS, self.v4.remove(&a))?;
        }
        for a in stale6 {
            removed(names::LOCAL_PODS6, self.v6.remove(&a))?;
        }
        for (ifindex, info) in endpoints {
            self.set(*ifindex, info, None)?;
        }
        Ok(())
    }

    /// The interface `LOCAL_PODS` delivers `addr` (network order) to.
    pub(crate) fn get4(&self, addr: u32) -> Option<u32> {
        self.v4.get(&addr, 0).ok()
    }
}
