//! The agent's side of held DNS answers (`palisade_common::dns`): the
//! records of `DNS_HELD`, and the `DNS_SERVERS` set. Both opened from the
//! pins, like `handles`, so the DNS task never waits on the agent's maps.
use std::{
    collections::BTreeSet,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData, RingBuf};
use palisade_common::{
    dns::{DnsHeld, DnsServerKey, DnsServerKey6, HELD_DATA},
    maps as names,
};

use crate::{pins::Pins, Error};

fn open(pins: &Pins, name: &'static str) -> Result<Map, Error> {
    let err = |source| Error::Map { name, source };
    let data = MapData::from_pin(pins.map(name)).map_err(err)?;
    Map::from_map_data(data).map_err(err)
}

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
        let ring =
            RingBuf::try_from(open(pins, names::DNS_HELD)?).map_err(|source| Error::Map {
                name: names::DNS_HELD,
                source,
            })?;
        Ok(Self { ring })
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

/// `DNS_SERVERS`, written as a whole set (added before removed), and
/// `DNS_ACTIVE`.
pub struct DnsServers {
    map: HashMap<MapData, DnsServerKey, u8>,
    map6: HashMap<MapData, DnsServerKey6, u8>,
    active: aya::maps::Array<MapData, u32>,
}

impl DnsServers {
    pub fn open(pins: &Pins) -> Result<Self, Error> {
        let map =
            HashMap::try_from(open(pins, names::DNS_SERVERS)?).map_err(|source| Error::Map {
                name: names::DNS_SERVERS,
                source,
            })?;
        let active =
            aya::maps::Array::try_from(open(pins, names::DNS_ACTIVE)?).map_err(|source| {
                Error::Map {
                    name: names::DNS_ACTIVE,
                    source,
                }
            })?;
        let map6 =
            HashMap::try_from(open(pins, names::DNS_SERVERS6)?).map_err(|source| Error::Map {
                name: names::DNS_SERVERS6,
                source,
            })?;
        Ok(Self { map, map6, active })
    }

    /// Switches the to-pod program's hold check on (a pod of the node has
    /// domain rules) or off.
    pub fn set_active(&mut self, on: bool) -> Result<(), Error> {
        self.active
            .set(0, on as u32, 0)
            .map_err(|source| Error::Map {
                name: names::DNS_ACTIVE,
                source,
            })
    }

    pub fn active(&self) -> bool {
        self.active.get(&0, 0).is_ok_and(|v| v != 0)
    }

    /// What the maps hold.
    pub fn read(&self) -> (BTreeSet<DnsServerKey>, BTreeSet<DnsServerKey6>) {
        (
            self.map.keys().filter_map(Result::ok).collect(),
            self.map6.keys().filter_map(Result::ok).collect(),
        )
    }

    /// Makes the maps hold exactly `want` and `want6`.
    pub fn set(
        &mut self,
        want: &BTreeSet<DnsServerKey>,
        want6: &BTreeSet<DnsServerKey6>,
    ) -> Result<(), Error> {
        set_keys(&mut self.map, names::DNS_SERVERS, want)?;
        set_keys(&mut self.map6, names::DNS_SERVERS6, want6)
    }
}

fn set_keys<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, u8>,
    name: &'static str,
    want: &BTreeSet<K>,
) -> Result<(), Error> {
    let err = |source| Error::Map { name, source };
    let have: BTreeSet<K> = map.keys().filter_map(Result::ok).collect();
    for k in want.difference(&have) {
        map.insert(k, 1, 0).map_err(err)?;
    }
    for k in have.difference(want) {
        match map.remove(k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(err(e)),
        }
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
        let err = |name| move |source| Error::Map { name, source };
        Ok(Self {
            v4: HashMap::try_from(open(pins, names::CONNTRACK)?).map_err(err(names::CONNTRACK))?,
            v6: HashMap::try_from(open(pins, names::CONNTRACK6)?)
                .map_err(err(names::CONNTRACK6))?,
        })
    }

    /// Every address at either end of a connection open now: a live entry
    /// (not past its expiry), and for TCP one not closing.
    pub fn addresses(&self) -> std::collections::HashSet<std::net::IpAddr> {
        use palisade_common::conntrack::{TCP_ESTABLISHED, TCP_SYN_RECV, TCP_SYN_SENT};
        let now = crate::maps::monotonic_ns();
        let open = |protocol: u8, v: &palisade_common::CtValue| {
            v.expires_ns > now
                && (protocol != palisade_common::PROTO_TCP
                    || matches!(v.tcp_state, TCP_SYN_SENT | TCP_SYN_RECV | TCP_ESTABLISHED))
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
