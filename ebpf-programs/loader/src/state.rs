//! The desired contents of the policy maps as plain data: what the agent's
//! compiler produces, what the map sync diffs against the kernel, and what
//! the reference evaluator (and `palisade-agent trace`) decides verdicts on.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use palisade_common::{EndpointInfo, IpcacheValue, PolicyKey, PolicyValue};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// By host-side ifindex; the by-IP index is derived from `ipv4`.
    pub endpoints: HashMap<u32, EndpointInfo>,
    /// (network address, prefix length) -> identities.
    pub ipcache: HashMap<(Ipv4Addr, u32), IpcacheValue>,
    /// The same for IPv6 (`IPCACHE6`).
    pub ipcache6: HashMap<(Ipv6Addr, u32), IpcacheValue>,
    /// (prefix length, key) -> action and cookie.
    pub policy: HashMap<(u32, PolicyKey), PolicyValue>,
}
