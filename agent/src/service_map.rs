//! Frontends (`crate::service`) -> the Service translation maps
//! (`palisade_common::service`), as a diff against what is programmed.
//!
//! Every frontend keeps its service id for as long as it exists (ids name
//! the Service in flow records). Backends change in an order the kernel
//! never sees half-done: new slots are written before the count grows, the
//! count shrinks before slots go. Open flows are not affected by any of it
//! (their backend is in their own translation entry).
//!
//! `sessionAffinity: ClientIP` is the frontend's `affinity_s` (the kernel
//! pins each client to its backend, `SVC_AFFINITY`). A frontend the
//! datapath cannot translate (SCTP, a backend of the other family, a
//! ClusterIP:port/protocol given twice) is left out with a clear error
//! naming it; every other frontend is still programmed.
//!
//! IPv4 and IPv6 frontends go to their family's maps ([`FrontendKey`],
//! [`BackendAddr`]) and share one id space, so a flow record's service id
//! names its Service whatever the family.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use palisade_common::{
    service::{
        SvcBackend, SvcBackend6, SvcBackendKey, SvcFrontend, SvcFrontendKey, SvcFrontendKey6,
    },
    PROTO_TCP, PROTO_UDP,
};
use palisade_dataplane::{
    maps::{be, ip6_words},
    Error,
};

use crate::service::Frontend;

/// A frontend's key in its family's map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKey {
    V4(SvcFrontendKey),
    V6(SvcFrontendKey6),
}

impl FrontendKey {
    pub fn is_v6(&self) -> bool {
        matches!(self, Self::V6(_))
    }
}

/// One backend slot's value in its family's map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendAddr {
    V4(SvcBackend),
    V6(SvcBackend6),
}

/// The map writes a diff needs. `v6`: the IPv6 maps.
pub trait ServiceWriter {
    fn set_frontend(&mut self, k: FrontendKey, v: SvcFrontend) -> Result<(), Error>;
    fn remove_frontend(&mut self, k: &FrontendKey) -> Result<(), Error>;
    fn set_backend(&mut self, k: SvcBackendKey, v: BackendAddr) -> Result<(), Error>;
    fn remove_backend(&mut self, v6: bool, k: &SvcBackendKey) -> Result<(), Error>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    id: u32,
    affinity_s: u32,
    backends: Vec<BackendAddr>,
}

/// What the maps hold, and which Service each id stands for.
#[derive(Clone, Debug, Default)]
pub struct ServiceMaps {
    programmed: BTreeMap<FrontendKey, Programmed>,
    by_id: BTreeMap<u32, Frontend>,
    next_id: u32,
}

/// The map key and backend slots of one frontend, or why it cannot be
/// translated.
pub fn compile(f: &Frontend) -> Result<(FrontendKey, Vec<BackendAddr>), String> {
    let what = || {
        format!(
            "Service {} port {} ({})",
            f.service,
            f.address,
            proto(f.protocol)
        )
    };
    if !matches!(f.protocol, PROTO_TCP | PROTO_UDP) {
        return Err(format!(
            "{}: only TCP and UDP are translated (SCTP's CRC32c checksum cannot be updated in place)",
            what()
        ));
    }
    let mut backends = Vec::with_capacity(f.backends.len());
    for b in &f.backends {
        let port_be = b.address.port().to_be();
        backends.push(match (f.address, b.address.ip()) {
            (SocketAddr::V4(_), IpAddr::V4(ip)) => BackendAddr::V4(SvcBackend {
                addr: be(ip),
                port_be,
                _pad: 0,
            }),
            (SocketAddr::V6(_), IpAddr::V6(ip)) => BackendAddr::V6(SvcBackend6 {
                addr: ip6_words(ip),
                port_be,
                _pad: 0,
            }),
            _ => {
                return Err(format!(
                    "{}: backend {} is of the other IP family",
                    what(),
                    b.address
                ))
            }
        });
    }
    let (port_be, protocol) = (f.address.port().to_be(), f.protocol);
    let key = match f.address {
        SocketAddr::V4(a) => FrontendKey::V4(SvcFrontendKey {
            addr: be(*a.ip()),
            port_be,
            protocol,
            _pad: 0,
        }),
        SocketAddr::V6(a) => FrontendKey::V6(SvcFrontendKey6 {
            addr: ip6_words(*a.ip()),
            port_be,
            protocol,
            _pad: 0,
        }),
    };
    Ok((key, backends))
}

fn proto(p: u8) -> String {
    crate::flowlog::protocol_name(p)
}

impl ServiceMaps {
    /// Start from what an earlier agent left in the maps, so ids stay
    /// stable and nothing is rewritten needlessly.
    pub fn adopt(
        frontends: Vec<(FrontendKey, SvcFrontend)>,
        backends: Vec<(SvcBackendKey, BackendAddr)>,
    ) -> Self {
        // (Ids are one space over both families: a slot key is one
        // frontend's.)
        let slots: BTreeMap<SvcBackendKey, BackendAddr> = backends.into_iter().collect();
        let mut s = Self::default();
        for (k, v) in frontends {
            let backends = (0..v.backends)
                .map(|slot| {
                    let bk = SvcBackendKey {
                        service_id: v.service_id,
                        slot,
                    };
                    slots
                        .get(&bk)
                        .copied()
                        .unwrap_or(BackendAddr::V4(SvcBackend {
                            addr: 0,
                            port_be: 0,
                            _pad: 0,
                        }))
                })
                .collect();
            s.next_id = s.next_id.max(v.service_id);
            s.programmed.insert(
                k,
                Programmed {
                    id: v.service_id,
                    affinity_s: v.affinity_s,
                    backends,
                },
            );
        }
        s
    }

    /// The Service each programmed id stands for (flow records).
    pub fn by_id(&self) -> &BTreeMap<u32, Frontend> {
        &self.by_id
    }

    /// Make the maps hold exactly `frontends` (those that can be
    /// translated). Writes stop at the first map error; frontends that
    /// cannot be translated are reported together after the rest is
    /// programmed.
    pub fn apply(
        &mut self,
        w: &mut impl ServiceWriter,
        frontends: &[Frontend],
    ) -> Result<(), Error> {
        let mut rejected = Vec::new();
        let mut want: BTreeMap<FrontendKey, (&Frontend, Vec<BackendAddr>)> = BTreeMap::new();
        for f in frontends {
            match compile(f) {
                Ok((k, b)) => {
                    if let Some((other, _)) = want.get(&k) {
                        rejected.push(format!(
                            "Service {} port {} ({}): overlaps Service {}",
                            f.service,
                            f.address,
                            proto(f.protocol),
                            other.service
                        ));
                        continue;
                    }
                    want.insert(k, (f, b));
                }
                Err(e) => rejected.push(e),
            }
        }

        // Gone first (frees ids and map room).
        let gone: Vec<FrontendKey> = self
            .programmed
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            let p = self.programmed[&k].clone();
            w.remove_frontend(&k)?;
            for slot in 0..p.backends.len() as u32 {
                w.remove_backend(
                    k.is_v6(),
                    &SvcBackendKey {
                        service_id: p.id,
                        slot,
                    },
                )?;
            }
            self.programmed.remove(&k);
            self.by_id.remove(&p.id);
        }

        let used: BTreeSet<u32> = self.programmed.values().map(|p| p.id).collect();
        for (k, (f, backends)) in want {
            let old = self.programmed.get(&k).cloned();
            let id = match &old {
                Some(p) => p.id,
                None => self.fresh_id(&used),
            };
            let old_backends = old.as_ref().map_or(&[][..], |p| &p.backends[..]);
            for (slot, b) in backends.iter().enumerate() {
                if old_backends.get(slot) != Some(b) {
                    w.set_backend(
                        SvcBackendKey {
                            service_id: id,
                            slot: slot as u32,
                        },
                        *b,
                    )?;
                }
            }
            let affinity_s = f.affinity_timeout_s.unwrap_or(0);
            if old.as_ref().map(|p| (p.backends.len(), p.affinity_s))
                != Some((backends.len(), affinity_s))
            {
                w.set_frontend(
                    k,
                    SvcFrontend {
                        service_id: id,
                        backends: backends.len() as u32,
                        affinity_s,
                    },
                )?;
            }
            for slot in backends.len()..old_backends.len() {
                w.remove_backend(
                    k.is_v6(),
                    &SvcBackendKey {
                        service_id: id,
                        slot: slot as u32,
                    },
                )?;
            }
            self.programmed.insert(
                k,
                Programmed {
                    id,
                    affinity_s,
                    backends,
                },
            );
            self.by_id.insert(id, f.clone());
        }

        if rejected.is_empty() {
            Ok(())
        } else {
            Err(Error::Unsupported(rejected.join("; ")))
        }
    }

    fn fresh_id(&mut self, used: &BTreeSet<u32>) -> u32 {
        loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !used.contains(&self.next_id) && !self.by_id.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model::ObjectKey, service::Backend};

    #[derive(Default)]
    struct Log {
        frontends: BTreeMap<FrontendKey, SvcFrontend>,
        backends: BTreeMap<SvcBackendKey, BackendAddr>,
        ops: Vec<String>,
    }

    impl ServiceWriter for Log {
        fn set_frontend(&mut self, k: FrontendKey, v: SvcFrontend) -> Result<(), Error> {
            self.ops
                .push(format!("fe {} n={}", v.service_id, v.backends));
            self.frontends.insert(k, v);
            Ok(())
        }
        fn remove_frontend(&mut self, k: &FrontendKey) -> Result<(), Error> {
            self.ops.push("fe-".into());
            self.frontends.remove(k);
            Ok(())
        }
        fn set_backend(&mut self, k: SvcBackendKey, v: BackendAddr) -> Result<(), Error> {
            self.ops.push(format!("be {}/{}", k.service_id, k.slot));
            self.backends.insert(k, v);
            Ok(())
        }
        fn remove_backend(&mut self, _v6: bool, k: &SvcBackendKey) -> Result<(), Error> {
            self.ops.push(format!("be- {}/{}", k.service_id, k.slot));
            self.backends.remove(k);
            Ok(())
        }
    }

    fn fe(name: &str, port: u16, backends: &[&str]) -> Frontend {
        fe_at("10.96.0.10", name, port, backends)
    }

    fn fe_at(ip: &str, name: &str, port: u16, backends: &[&str]) -> Frontend {
        Frontend {
            service: ObjectKey::new("default", name),
            port_name: String::new(),
            address: SocketAddr::new(ip.parse().unwrap(), port),
            protocol: PROTO_TCP,
            backends: backends
                .iter()
                .map(|b| Backend {
                    address: b.parse().unwrap(),
                    pod: None,
                })
                .collect(),
            affinity_timeout_s: None,
        }
    }

    #[test]
    fn backends_are_written_before_the_count_grows_and_removed_after_it_shrinks() {
        let mut m = ServiceMaps::default();
        let mut w = Log::default();
        m.apply(&mut w, &[fe("a", 80, &["10.0.0.1:8080", "10.0.0.2:8080"])])
            .unwrap();
        assert_eq!(w.ops, ["be 1/0", "be 1/1", "fe 1 n=2"]);
        w.ops.clear();
        m.apply(&mut w, &[fe("a", 80, &["10.0.0.2:8080"])]).unwrap();
        assert_eq!(w.ops, ["be 1/0", "fe 1 n=1", "be- 1/1"]);
        w.ops.clear();
        m.apply(&mut w, &[fe("a", 80, &[])]).unwrap();
        assert_eq!(w.ops, ["fe 1 n=0", "be- 1/0"]);
        assert_eq!(m.by_id()[&1].service.name.as_ref(), "a");
        w.ops.clear();
        m.apply(&mut w, &[]).unwrap();
        assert_eq!(w.ops, ["fe-"]);
        assert!(w.frontends.is_empty() && w.backends.is_empty());
        assert!(m.by_id().is_empty());
    }

    #[test]
    fn unchanged_frontends_are_not_rewritten_and_ids_are_stable() {
        let mut m = ServiceMaps::default();
        let mut w = Log::default();
        let list = [
            fe("a", 80, &["10.0.0.1:8080"]),
            fe("b", 81, &["10.0.0.2:80"]),
        ];
        m.apply(&mut w, &list).unwrap();
        w.ops.clear();
        m.apply(&mut w, &list).unwrap();
        assert!(w.ops.is_empty(), "{:?}", w.ops);
        // A restarted agent adopts the maps: same ids, no writes.
        let mut m2 = ServiceMaps::adopt(
            w.frontends.clone().into_iter().collect(),
            w.backends.clone().into_iter().collect(),
        );
        m2.apply(&mut w, &list).unwrap();
        assert!(w.ops.is_empty(), "{:?}", w.ops);
        let ids: Vec<u32> = m2.by_id().keys().copied().collect();
        assert_eq!(ids, [1, 2]);
        m2.apply(&mut w, &[list[0].clone(), fe("c", 82, &[])])
            .unwrap();
        assert_eq!(
            m2.by_id()[&3].service.name.as_ref(),
            "c",
            "a fresh id, not b's"
        );
    }

    #[test]
    fn untranslatable_frontends_are_refused_by_name_and_the_rest_programmed() {
        let mut m = ServiceMaps::default();
        let mut w = Log::default();
        let mut sctp = fe("sctp", 91, &["10.0.0.1:80"]);
        sctp.protocol = palisade_common::PROTO_SCTP;
        let dup = fe("dup", 80, &["10.0.0.9:80"]);
        let err = m
            .apply(&mut w, &[fe("a", 80, &["10.0.0.1:8080"]), sctp, dup])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("default/sctp") && err.contains("SCTP"),
            "{err}"
        );
        assert!(
            err.contains("default/dup") && err.contains("overlaps Service default/a"),
            "{err}"
        );
        assert_eq!(w.frontends.len(), 1);
        assert_eq!(m.by_id().len(), 1);
    }
    #[test]
    fn session_affinity_is_programmed_and_a_timeout_change_rewrites_the_frontend() {
        let mut m = ServiceMaps::default();
        let mut w = Log::default();
        let mut sticky = fe("sticky", 90, &["10.0.0.1:80", "10.0.0.2:80"]);
        sticky.affinity_timeout_s = Some(10800);
        m.apply(&mut w, &[sticky.clone()]).unwrap();
        let v = *w.frontends.values().next().unwrap();
        assert_eq!((v.backends, v.affinity_s), (2, 10800));
        w.ops.clear();
        sticky.affinity_timeout_s = Some(60);
        m.apply(&mut w, &[sticky.clone()]).unwrap();
        assert_eq!(w.ops, ["fe 1 n=2"], "only the frontend, backends kept");
        assert_eq!(w.frontends.values().next().unwrap().affinity_s, 60);
        sticky.affinity_timeout_s = None;
        m.apply(&mut w, &[sticky]).unwrap();
        assert_eq!(w.frontends.values().next().unwrap().affinity_s, 0);
        // Adopted as programmed: no writes.
        let mut m2 = ServiceMaps::adopt(
            w.frontends.clone().into_iter().collect(),
            w.backends.clone().into_iter().collect(),
        );
        w.ops.clear();
        let mut again = fe("sticky", 90, &["10.0.0.1:80", "10.0.0.2:80"]);
        again.affinity_timeout_s = None;
        m2.apply(&mut w, &[again]).unwrap();
        assert!(w.ops.is_empty(), "{:?}", w.ops);
    }

    #[test]
    fn ipv6_frontends_go_to_the_ipv6_maps_and_share_the_id_space() {
        let mut m = ServiceMaps::default();
        let mut w = Log::default();
        let list = [
            fe("a", 80, &["10.0.0.1:8080"]),
            fe_at(
                "fd00:96::10",
                "a",
                80,
                &["[fd00::1]:8080", "[fd00::2]:8080"],
            ),
        ];
        m.apply(&mut w, &list).unwrap();
        let keys: Vec<bool> = w.frontends.keys().map(FrontendKey::is_v6).collect();
        assert_eq!(keys, [false, true]);
        let ids: BTreeSet<u32> = w.frontends.values().map(|v| v.service_id).collect();
        assert_eq!(ids.len(), 2, "one id space");
        let v6 = w.frontends[&w
            .frontends
            .keys()
            .copied()
            .find(FrontendKey::is_v6)
            .unwrap()];
        assert_eq!(v6.backends, 2);
        let slot = w.backends[&SvcBackendKey {
            service_id: v6.service_id,
            slot: 1,
        }];
        let BackendAddr::V6(b) = slot else {
            panic!("{slot:?}")
        };
        assert_eq!(
            (b.addr, u16::from_be(b.port_be)),
            (ip6_words("fd00::2".parse().unwrap()), 8080)
        );
        // Adopted as programmed: no writes.
        let mut m2 = ServiceMaps::adopt(
            w.frontends.clone().into_iter().collect(),
            w.backends.clone().into_iter().collect(),
        );
        w.ops.clear();
        m2.apply(&mut w, &list).unwrap();
        assert!(w.ops.is_empty(), "{:?}", w.ops);
        // A backend of the other family is refused by name.
        let err = m
            .apply(
                &mut w,
                &[fe_at("fd00:96::11", "mixed", 80, &["10.0.0.1:80"])],
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("default/mixed") && err.contains("other IP family"),
            "{err}"
        );
    }
}
