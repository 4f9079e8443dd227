//! The agent's side of held DNS answers (`palisade_common::dns`): the
//! records of `DNS_HELD`, and the `DNS_SERVERS` set. Both opened from the
//! pins (`handles::open`), so the DNS task never waits on the agent's maps.
use std::{
    collections::BTreeSet,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use aya::maps::{Array, HashMap, MapData, RingBuf};
use palisade_common::{
    ct_budget::charged,
    dns::{DnsHeld, DnsServerKey, DnsServerKey6, HELD_DATA},
    maps as names,
};

use crate::{handles::open, pins::Pins, Error};

/// One held frame: the host veth it was leaving by, and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub ifindex: u32,
    pub frame: Vec<u8>,
}

/// The only consumer of `DNS_HELD`.
pub struct HeldReader {
    ring: RingBuf<MapData>,
}

impl HeldReader {
    pub fn open(pins: &Pins) -> Result<Self, Error> {
        Ok(Self {
            ring: open(pins, names::DNS_HELD)?.0,
        })
    }

    /// Everything held now, oldest first.
    pub fn drain(&mut self) -> Vec<Held> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<DnsHeld>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole DnsHeld (checked length);
            // read_unaligned because ring records are only 8-byte aligned.
            let h = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DnsHeld) };
            let len = (h.len as usize).min(HELD_DATA);
            out.push(Held {
                ifindex: h.ifindex,
                frame: h.data[..len].to_vec(),
            });
        }
        out
    }

    /// Block up to `timeout` for a record; true when woken (every held
    /// record wakes the reader).
    pub fn wait(&self, timeout: Duration) -> bool {
        crate::events::readable(self.ring.as_raw_fd(), timeout)
    }

    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// `DNS_SERVERS` and `DNS_SERVERS6`, written as whole sets, and
/// `DNS_ACTIVE`. Holds what it wrote, so a set equal to the last one
/// costs no system call (the agent sets them after every sync).
pub struct DnsServers {
    map: HashMap<MapData, DnsServerKey, u8>,
    map6: HashMap<MapData, DnsServerKey6, u8>,
    active: Array<MapData, u32>,
    /// What the maps hold (read once when opened, then as written).
    now: BTreeSet<DnsServerKey>,
    now6: BTreeSet<DnsServerKey6>,
    active_now: bool,
}

impl DnsServers {
    pub fn open(pins: &Pins) -> Result<Self, Error> {
        let (map, _): (HashMap<MapData, DnsServerKey, u8>, _) = open(pins, names::DNS_SERVERS)?;
        let (map6, _): (HashMap<MapData, DnsServerKey6, u8>, _) = open(pins, names::DNS_SERVERS6)?;
        let (active, _): (Array<MapData, u32>, _) = open(pins, names::DNS_ACTIVE)?;
        Ok(Self {
            now: map.keys().filter_map(Result::ok).collect(),
            now6: map6.keys().filter_map(Result::ok).collect(),
            active_now: active.get(&0, 0).is_ok_and(|v| v != 0),
            map,
            map6,
            active,
        })
    }

    /// Switches the to-pod program's hold check on (a pod of the node has
    /// domain rules) or off.
    pub fn set_active(&mut self, on: bool) -> Result<(), Error> {
        if on == self.active_now {
            return Ok(());
        }
        self.active
            .set(0, on as u32, 0)
            .map_err(|source| Error::Map {
                name: names::DNS_ACTIVE,
                source,
            })?;
        self.active_now = on;
        Ok(())
    }

    /// Makes the maps hold exactly `want` and `want6`.
    pub fn set(
        &mut self,
        want: &BTreeSet<DnsServerKey>,
        want6: &BTreeSet<DnsServerKey6>,
    ) -> Result<(), Error> {
        set_keys(&mut self.map, &mut self.now, names::DNS_SERVERS, want)?;
        set_keys(&mut self.map6, &mut self.now6, names::DNS_SERVERS6, want6)
    }
}

/// Writes the difference between `now` (what `map` holds) and `want`;
/// `now` follows every write made.
fn set_keys<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, u8>,
    now: &mut BTreeSet<K>,
    name: &'static str,
    want: &BTreeSet<K>,
) -> Result<(), Error> {
    let err = |source| Error::Map { name, source };
    let add: Vec<K> = want.difference(now).copied().collect();
    let remove: Vec<K> = now.difference(want).copied().collect();
    for k in add {
        map.insert(k, 1, 0).map_err(err)?;
        now.insert(k);
    }
    for k in remove {
        match map.remove(&k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(err(e)),
        }
        now.remove(&k);
    }
    Ok(())
}

/// The remote ends of tracked connections: an expired learned address
/// that one of them still uses stays allowed.
pub struct ConntrackPeers {
    v4: HashMap<MapData, palisade_common::CtKey, palisade_common::CtValue>,
    v6: HashMap<MapData, palisade_common::CtKey6, palisade_common::CtValue>,
}

impl ConntrackPeers {
    pub fn open(pins: &Pins) -> Result<Self, Error> {
        Ok(Self {
            v4: open(pins, names::CONNTRACK)?.0,
            v6: open(pins, names::CONNTRACK6)?.0,
        })
    }

    /// Every address at either end of a connection open now: a live entry
    /// (not past its expiry), and for TCP one not closing (what a pod's
    /// conntrack budget counts, `ct_budget::charged`).
    pub fn addresses(&self) -> std::collections::HashSet<std::net::IpAddr> {
        let now = crate::maps::ct_clock_ns();
        let open = |protocol: u8, v: &palisade_common::CtValue| {
            v.expires_ns > now && charged(protocol, v.tcp_state)
        };
        let mut out = std::collections::HashSet::new();
        for (k, v) in self.v4.iter().filter_map(Result::ok) {
            if open(k.protocol, &v) {
                for a in [k.saddr, k.daddr] {
                    out.insert(std::net::Ipv4Addr::from(a.to_ne_bytes()).into());
                }
            }
        }
        for (k, v) in self.v6.iter().filter_map(Result::ok) {
            if open(k.protocol, &v) {
                for a in [k.saddr, k.daddr] {
                    out.insert(crate::maps::from_ip6_words(a).into());
                }
            }
        }
        out
    }
}
