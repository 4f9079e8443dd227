//! `palisade-agent verify`: proof that the kernel enforces what the model
//! says, without sending traffic. For every local endpoint, probe packets
//! for every (peer identity, port range edge) its policy entries
//! distinguish, plus a sample of other peers and ports, go through the
//! kernel's own verdict path (`pod_verify`: the attached programs' code in
//! dry-run mode, against the live maps, recording nothing) and through the
//! reference evaluator over the map contents the agent compiled from the
//! model (`Agent::current`). Any difference is a mismatch: a corrupted or
//! missing kernel entry, or kernel code that decides differently.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::Result;
use palisade_api::{VerifyMismatch, VerifyReport};
use palisade_common::{
    decision::{peer_or_world, peer_or_world6},
    is_label_identity, reason, EndpointInfo, PolicyKey, DIR_EGRESS, IDENTITY_ANY, IDENTITY_ANY_POD,
    IDENTITY_WORLD, IDENTITY_WORLD6, POLICY_PREFIX_FIXED, POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO,
    PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_AUDIT,
};
use palisade_dataplane::{
    packet::{Packet, TCP_FLAG_SYN},
    reference::Evaluator,
    MapState,
};

use crate::{compiler::Names, trace::identity_text};

/// At most this many probes per run (about 5 µs each through the kernel).
pub const MAX_PROBES: usize = 200_000;
/// Sampled peer identities (all of them up to this many) and sampled ports
/// per endpoint and direction, besides the distinguished ones; each set is
/// crossed with the other.
pub const SAMPLE_PEERS: usize = 32;
pub const SAMPLE_PORTS: usize = 8;
/// A peer no ipcache entry names (TEST-NET-1: never sent anywhere, only
/// judged): the world.
const WORLD_PROBE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The same over IPv6 (the documentation prefix): the IPv6 world.
const WORLD6_PROBE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const SOURCE_PORT: u16 = 40000;

#[derive(Clone, Debug)]
pub struct Probe {
    pub ifindex: u32,
    pub endpoint: EndpointInfo,
    pub dir: u8,
    pub peer: IpAddr,
    pub packet: Packet,
}

/// The probes of one run; `distinguished` of them come from policy entries.
#[derive(Debug, Default)]
pub struct Probes {
    pub probes: Vec<Probe>,
    pub distinguished: usize,
    pub truncated: bool,
}

/// A few addresses that carry each identity (exact or as CIDR identity),
/// from one family's ipcache entries ((prefix address, length) → value);
/// `inside` picks an address inside a prefix, off its network address
/// where there is room.
fn addresses_by_identity<'a>(
    entries: impl Iterator<Item = (IpAddr, u32, &'a palisade_common::IpcacheValue)>,
    world: (u32, IpAddr),
) -> BTreeMap<u32, Vec<IpAddr>> {
    let mut by: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
    let mut entries: Vec<_> = entries.collect();
    entries.sort_by_key(|(a, p, _)| (std::cmp::Reverse(*p), *a));
    for (net, prefix, v) in entries {
        let addr = match net {
            IpAddr::V4(n) if prefix <= 30 => IpAddr::V4(Ipv4Addr::from(u32::from(n) | 1)),
            IpAddr::V6(n) if prefix <= 126 => IpAddr::V6(Ipv6Addr::from(u128::from(n) | 1)),
            a => a,
        };
        for id in [v.identity, v.cidr_identity] {
            let list = by.entry(id).or_default();
            if id != IDENTITY_ANY && list.len() < 2 && !list.contains(&addr) {
                list.push(addr);
            }
        }
    }
    by.entry(world.0).or_default().push(world.1);
    by
}

/// One family's probe peers: addresses by identity and its world probe.
struct Family {
    addrs: BTreeMap<u32, Vec<IpAddr>>,
    world: IpAddr,
}

impl Family {
    fn v4(state: &MapState) -> Self {
        let entries = state.ipcache.iter();
        let entries = entries.map(|((a, p), v)| (IpAddr::V4(*a), *p, v));
        Self::new(entries, IDENTITY_WORLD, IpAddr::V4(WORLD_PROBE))
    }

    fn v6(state: &MapState) -> Self {
        let entries = state.ipcache6.iter();
        let entries = entries.map(|((a, p), v)| (IpAddr::V6(*a), *p, v));
        Self::new(entries, IDENTITY_WORLD6, IpAddr::V6(WORLD6_PROBE))
    }

    fn new<'a>(
        entries: impl Iterator<Item = (IpAddr, u32, &'a palisade_common::IpcacheValue)>,
        world_id: u32,
        world: IpAddr,
    ) -> Self {
        Self {
            addrs: addresses_by_identity(entries, (world_id, world)),
            world,
        }
    }
}

/// (protocol, port) pairs a policy entry's prefix distinguishes: each end
/// of its port range and the ports just outside it.
fn ports_of(prefix: u32, key: &PolicyKey) -> Vec<(u8, u16)> {
    if prefix <= POLICY_PREFIX_FIXED {
        return vec![(PROTO_TCP, 80), (PROTO_UDP, 53), (PROTO_ICMP, 0)];
    }
    let proto = key.protocol;
    if prefix <= POLICY_PREFIX_PROTO || proto == PROTO_ICMP {
        return vec![(proto, 1), (proto, 443), (proto, 65535)];
    }
    let bits = prefix.min(POLICY_PREFIX_FULL) - POLICY_PREFIX_PROTO;
    let port = u16::from_be(key.dport_be);
    let host_mask = (0xffff_u32 >> bits) as u16;
    let (lo, hi) = (port & !host_mask, port | host_mask);
    let mut v = vec![(proto, lo), (proto, hi)];
    if lo > 0 {
        v.push((proto, lo - 1));
    }
    if hi < u16::MAX {
        v.push((proto, hi + 1));
    }
    v
}

fn packet(ep: IpAddr, dir: u8, peer: IpAddr, proto: u8, port: u16) -> Packet {
    let (src, dst) = if dir == DIR_EGRESS {
        (ep, peer)
    } else {
        (peer, ep)
    };
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => match proto {
            PROTO_UDP => Packet::udp(src, SOURCE_PORT, dst, port),
            PROTO_SCTP => Packet::sctp(src, SOURCE_PORT, dst, port),
            PROTO_ICMP => Packet::icmp_echo(src, dst, SOURCE_PORT, 1),
            PROTO_TCP => Packet::tcp(src, SOURCE_PORT, dst, port, TCP_FLAG_SYN),
            p => Packet::ipv4_proto(src, dst, p),
        },
        (IpAddr::V6(src), IpAddr::V6(dst)) => match proto {
            PROTO_UDP => Packet::ipv6_udp(src, SOURCE_PORT, dst, port),
            PROTO_SCTP => Packet::ipv6_sctp(src, SOURCE_PORT, dst, port),
            // ICMP entries hold for ICMPv6 echo requests (128).
            PROTO_ICMP => Packet::icmpv6_echo(src, dst, 128, SOURCE_PORT),
            _ => Packet::ipv6_tcp(src, SOURCE_PORT, dst, port, TCP_FLAG_SYN),
        },
        _ => unreachable!("probes pair addresses of one family"),
    }
}

/// A small deterministic generator for the sample (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The probes for every endpoint of `state`.
pub fn probes(state: &MapState, seed: u64, cap: usize) -> Probes {
    let families = [Family::v4(state), Family::v6(state)];
    // Policy entries by endpoint id.
    let mut entries: BTreeMap<u32, Vec<(u32, PolicyKey)>> = BTreeMap::new();
    for (prefix, key) in state.policy.keys() {
        entries
            .entry(key.endpoint_id)
            .or_default()
            .push((*prefix, *key));
    }
    let mut rng = Rng(seed | 1);
    let mut out = Probes::default();
    let mut endpoints: Vec<_> = state.endpoints.iter().collect();
    endpoints.sort_by_key(|(i, _)| **i);
    // Every endpoint over each family it has an address of.
    let sides = endpoints.into_iter().flat_map(|(ifindex, ep)| {
        let v4 = Some(ep.ipv4)
            .filter(|a| *a != 0)
            .map(|a| IpAddr::V4(palisade_dataplane::maps::from_be(a)));
        let v6 = Some(ep.ipv6)
            .filter(|a| *a != [0; 4])
            .map(|a| IpAddr::V6(palisade_dataplane::maps::from_ip6_words(a)));
        [(v4, &families[0]), (v6, &families[1])]
            .into_iter()
            .filter_map(move |(ip, f)| Some((*ifindex, *ep, ip?, f)))
    });
    for (ifindex, ep, ep_ip, family) in sides {
        let addrs = &family.addrs;
        let pod_addrs: Vec<IpAddr> = addrs
            .iter()
            .filter(|(id, _)| is_label_identity(**id))
            .flat_map(|(_, a)| a.iter().copied())
            .collect();
        // One address per identity: the sampled peers are distinct identities.
        let reps: Vec<IpAddr> = addrs.values().filter_map(|a| a.first().copied()).collect();
        let peers_of = |id: u32| -> Vec<IpAddr> {
            match id {
                IDENTITY_ANY => {
                    let mut v = vec![family.world];
                    v.extend(pod_addrs.iter().take(1));
                    v
                }
                IDENTITY_ANY_POD => pod_addrs.iter().take(2).copied().collect(),
                id => addrs.get(&id).cloned().unwrap_or_default(),
            }
        };
        let list = entries.get(&ep.endpoint_id).cloned().unwrap_or_default();
        for dir in [DIR_EGRESS, palisade_common::DIR_INGRESS] {
            // What this endpoint's entries distinguish in this direction...
            let mut peers = BTreeSet::new();
            let mut ports = BTreeSet::new();
            for (prefix, key) in list.iter().filter(|(_, k)| k.direction == dir) {
                peers.extend(peers_of(key.peer_identity));
                ports.extend(ports_of(*prefix, key));
            }
            // ... then every pair of those (an entry the kernel has and the
            // model does not shows up as a distinguished peer on another
            // entry's port), plus sampled peers and ports.
            let (known_peers, known_ports) = (peers.clone(), ports.clone());
            let mut pool = reps.clone();
            for i in 0..pool.len().min(SAMPLE_PEERS) {
                let j = i + rng.below(pool.len() - i);
                pool.swap(i, j);
                peers.insert(pool[i]);
            }
            for _ in 0..SAMPLE_PORTS {
                let proto = [PROTO_TCP, PROTO_TCP, PROTO_UDP, PROTO_SCTP][rng.below(4)];
                ports.insert((proto, 1 + rng.below(65535) as u16));
            }
            peers.insert(family.world);
            ports.insert((PROTO_ICMP, 0));
            for &peer in &peers {
                for &(proto, port) in &ports {
                    if out.probes.len() >= cap {
                        out.truncated = true;
                        return out;
                    }
                    if known_peers.contains(&peer) && known_ports.contains(&(proto, port)) {
                        out.distinguished += 1;
                    }
                    out.probes.push(Probe {
                        ifindex,
                        endpoint: ep,
                        dir,
                        peer,
                        // (The pod's own MAC: probes are about policy.)
                        packet: packet(ep_ip, dir, peer, proto, port).at_pod_mac(ep.mac, dir),
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
fn proto_port(p: &Packet) -> Option<(u8, u16)> {
    let ip = p.ipv4()?;
    let proto = ip.l4.protocol();
    Some((proto, ip.l4.ports().map_or(0, |(_, d)| d)))
}

fn model_name(v: u8) -> &'static str {
    match v {
        VERDICT_ALLOW => "ALLOW",
        VERDICT_AUDIT => "AUDIT",
        _ => "DROP",
    }
}

/// Runs every probe through `kernel` (true: the packet passes) and the
/// reference evaluator over `state`; the mismatches, named through `names`.
pub fn compare<N: Names + ?Sized>(
    state: &MapState,
    names: &N,
    probes: &[Probe],
    mut kernel: impl FnMut(&Probe) -> Result<bool>,
) -> Result<Vec<VerifyMismatch>> {
    let mut eval = Evaluator::new(state);
    let mut out = Vec::new();
    for p in probes {
        eval.clear_tracking();
        let model = eval.evaluate(p.ifindex, p.dir, &p.packet);
        let passed = kernel(p)?;
        if passed == model.pass {
            continue;
        }
        let peer = match p.peer {
            IpAddr::V4(a) => peer_or_world(eval.ipcache_lookup(a)),
            IpAddr::V6(a) => peer_or_world6(eval.ipcache6_lookup(a)),
        };
        let peer = identity_text(names, peer.identity);
        out.push(VerifyMismatch {
            endpoint: names.endpoint_by_id(p.endpoint.endpoint_id).map_or_else(
                || format!("endpoint {}", p.endpoint.endpoint_id),
                |e| e.key.to_string(),
            ),
            direction: if p.dir == DIR_EGRESS {
                "egress".into()
            } else {
                "ingress".into()
            },
            packet: p.packet.to_string(),
            peer,
            kernel: if passed { "PASS" } else { "DROP" }.into(),
            model: model_name(model.verdict).into(),
            model_reason: reason::name(model.reason).into(),
            rule: names.cookie(model.cookie).map(|r| r.to_string()),
        });
    }
    Ok(out)
}

/// One verify run over `state` (the map contents of generation
/// `generation`) with `kernel` as the kernel's verdict.
pub fn run<N: Names + ?Sized>(
    state: &MapState,
    names: &N,
    generation: u64,
    seed: u64,
    kernel: impl FnMut(&Probe) -> Result<bool>,
) -> Result<VerifyReport> {
    let started = Instant::now();
    let p = probes(state, seed, MAX_PROBES);
    let mismatches = compare(state, names, &p.probes, kernel)?;
    Ok(VerifyReport {
        generation,
        endpoints: state.endpoints.len(),
        probes: p.probes.len(),
        distinguished: p.distinguished,
        truncated: p.truncated,
        mismatches,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use palisade_common::{PolicyValue, ACTION_ALLOW, DIR_INGRESS};

    use super::*;
    use crate::{
        change::Change,
        compiler::Engine,
        model::{Labels, LocalEndpoint, ObjectKey, Pod},
    };

    fn engine() -> Engine {
        let mut e = Engine::new(false, Vec::new());
        for (name, app, ip) in [("web", "web", 1), ("db", "db", 2), ("other", "x", 3)] {
            e.apply(Change::Pod(
                Pod {
                    namespace: "a".into(),
                    name: name.into(),
                    labels: Labels::from([("app".to_string(), app.to_string())]),
                    ip: Some(Ipv4Addr::new(10, 0, 0, ip)),
                    ipv6: None,
                    host_network: false,
                    ports: Vec::new(),
                }
                .into(),
            ));
        }
        let y = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 5432, endPort: 5439, protocol: TCP}]\n";
        let np: NetworkPolicy = serde_yaml::from_str(y).unwrap();
        e.apply(Change::Policy(ObjectKey::new("a", "db"), Arc::new(np)));
        e.add_endpoint(LocalEndpoint {
            key: ObjectKey::new("a", "db"),
            endpoint_id: 1,
            ifindex: 11,
            host_ifname: "veth1".into(),
            ipv4: Ipv4Addr::new(10, 0, 0, 2),
            ipv6: None,
            container_id: "c1".into(),
            mac: [0; 6],
        });
        e
    }

    #[test]
    fn probes_cover_every_entry_and_its_port_edges() {
        let e = engine();
        let p = probes(e.desired(), 7, MAX_PROBES);
        let web = Ipv4Addr::new(10, 0, 0, 1);
        let ingress_from_web: BTreeSet<u16> = p
            .probes
            .iter()
            .filter(|p| p.dir == DIR_INGRESS && p.peer == web)
            .filter_map(|p| proto_port(&p.packet).map(|(_, port)| port))
            .collect();
        for port in [5431, 5432, 5439, 5440] {
            assert!(
                ingress_from_web.contains(&port),
                "{port}: {ingress_from_web:?}"
            );
        }
        assert!(p.distinguished >= 4);
        assert!(p.probes.len() > p.distinguished, "a sample besides");
        assert!(!p.truncated);
        assert!(probes(e.desired(), 7, 3).truncated);
    }

    #[test]
    fn a_kernel_that_differs_is_reported_with_both_verdicts() {
        let e = engine();
        let state = e.desired().clone();
        // The same evaluator as "kernel": no mismatch.
        let mut k = Evaluator::new(&state);
        let r = run(&state, &*e.view(), 1, 3, |p| {
            k.clear_tracking();
            Ok(k.evaluate(p.ifindex, p.dir, &p.packet).pass)
        })
        .unwrap();
        assert!(r.mismatches.is_empty(), "{:?}", r.mismatches);
        // A "kernel" whose policy map lets every pod in on 5432..5439.
        let mut bad = state.clone();
        let k0 = bad.policy.keys().next().copied().unwrap();
        let mut key = k0.1;
        key.peer_identity = IDENTITY_ANY_POD;
        bad.policy.insert(
            (k0.0, key),
            PolicyValue {
                action: ACTION_ALLOW,
                cookie: 0,
            },
        );
        let mut k = Evaluator::new(&bad);
        let r = run(&state, &*e.view(), 1, 3, |p| {
            k.clear_tracking();
            Ok(k.evaluate(p.ifindex, p.dir, &p.packet).pass)
        })
        .unwrap();
        assert!(!r.mismatches.is_empty());
        let m = r
            .mismatches
            .iter()
            .find(|m| m.packet.starts_with("tcp 10.0.0.3:"))
            .expect("the pod no rule admits is let in");
        assert_eq!((m.kernel.as_str(), m.model.as_str()), ("PASS", "DROP"));
        assert_eq!(m.endpoint, "a/db");
        assert_eq!(m.direction, "ingress");
        assert_eq!(m.model_reason, "no-policy-match");
        // Only ports the bad entry covers differ.
        assert!(
            r.mismatches.iter().all(|m| m.packet.contains(":543")),
            "{:?}",
            r.mismatches
        );
    }

    /// Endpoints with an IPv6 address are probed over IPv6 too, with IPv6
    /// peers (pods' /128s, the IPv6 world), and a kernel that differs
    /// there is caught.
    #[test]
    fn ipv6_is_probed_over_ipv6_peers() {
        let mut e = engine();
        let mut web = (**e.model().pods.get(&ObjectKey::new("a", "web")).unwrap()).clone();
        web.ipv6 = Some("fd00::1".parse().unwrap());
        e.apply(Change::Pod(web.into()));
        e.add_endpoint(LocalEndpoint {
            key: ObjectKey::new("a", "db"),
            endpoint_id: 1,
            ifindex: 11,
            host_ifname: "veth1".into(),
            ipv4: Ipv4Addr::new(10, 0, 0, 2),
            ipv6: Some("fd00::2".parse().unwrap()),
            container_id: "c1".into(),
            mac: [0; 6],
        });
        let state = e.desired().clone();
        let p = probes(&state, 7, MAX_PROBES);
        let web6: IpAddr = "fd00::1".parse().unwrap();
        let world6 = IpAddr::V6(WORLD6_PROBE);
        assert!(p
            .probes
            .iter()
            .any(|p| p.dir == DIR_INGRESS && p.peer == web6));
        assert!(p.probes.iter().any(|p| p.peer == world6));
        assert!(
            p.probes
                .iter()
                .all(|p| p.peer.is_ipv6() == p.packet.ipv4().is_none()),
            "each probe's packet is of its peer's family"
        );
        // A "kernel" that lets the IPv6 world in everywhere.
        let mut k = Evaluator::new(&state);
        let r = run(&state, &*e.view(), 1, 3, |p| {
            k.clear_tracking();
            let v = k.evaluate(p.ifindex, p.dir, &p.packet);
            Ok(v.pass || p.peer == world6)
        })
        .unwrap();
        assert!(!r.mismatches.is_empty());
        assert!(
            r.mismatches.iter().all(|m| m.peer.contains("world-ipv6")),
            "{:?}",
            r.mismatches
        );
    }
}
