//! IPv6 Service translation on real packets (issues 12 and 15): IPv6-only
//! pods routed through a node namespace, the programs on every host veth,
//! IPv6 frontends and backends written straight into `SVC_FRONTENDS6` /
//! `SVC_BACKENDS6` (the agent's `set_services` writes them in production).
//! Each test would fail without the translation: the ClusterIP is routed
//! nowhere in the node (no kube-proxy here), and policy would judge it as
//! the IPv6 world.
use std::{
    net::{Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::Result;
use palisade_common::{
    reason,
    service::{SvcBackend6, SvcBackendKey, SvcFrontend, SvcFrontendKey6},
    EndpointInfo, FlowEvent, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW, DIR_EGRESS,
    DIR_INGRESS, EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED, IDENTITY_HOST, IDENTITY_WORLD6,
    POLICY_PREFIX_FULL, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_DROP,
};
use palisade_dataplane::{events::EventReader, maps::ip6_words, Datapath, DatapathConfig, Maps};
use palisade_tests::*;

const GW: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x9a, 0, 0, 0, 0, 0, 1);
/// Client, and two backends.
const PODS: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x9a, 0, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0xfd00, 0x9a, 0, 0, 0, 0, 0, 3),
    Ipv6Addr::new(0xfd00, 0x9a, 0, 0, 0, 0, 0, 4),
];
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
/// The ClusterIP: routed nowhere in the node.
const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x97, 0, 0, 0, 0, 0, 0x10);
const TARGET: u16 = 8080;

struct Rig {
    _node: NetNs,
    pods: Vec<NetNs>,
    ifindexes: Vec<u32>,
    _dp: Datapath,
    maps: Maps,
    events: EventReader,
    // Dropped last: links are unpinned after the namespaces are gone.
    _pins: PinRoot,
}

fn identity(i: usize) -> u32 {
    1001 + i as u32
}

/// Node with pods A, B, C, programs attached, registered unenforced; each
/// runs a TCP and a UDP server on TARGET answering with its own index.
fn rig() -> Result<Rig> {
    let pins = PinRoot::new()?;
    let node = NetNs::new("s6node")?;
    node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    let mut pods = Vec::new();
    let mut ifs = Vec::new();
    for (i, ip) in PODS.iter().enumerate() {
        let (ns, host_if) = add_pod6(&node, GW, *ip)?;
        pods.push(ns);
        ifs.push((host_if, *ip, i as u32 + 1));
    }
    let cfg = DatapathConfig {
        pins: pins.pins.clone(),
        ..Default::default()
    };
    let (dp, mut maps, ifindexes) =
        node.enter(move || -> Result<(Datapath, Maps, Vec<u32>)> {
            let mut dp = Datapath::load(&cfg)?;
            let mut maps = dp.take_maps()?;
            let mut idx = Vec::new();
            for (ifname, ip, ep) in ifs {
                let ifindex = palisade_dataplane::loader::ifindex(&ifname)?;
                let info = EndpointInfo {
                    endpoint_id: ep,
                    identity: 1000 + ep,
                    ipv4: 0,
                    flags: 0,
                    generation: 0,
                    mac: [0; 6],
                    _pad: [0; 2],
                    ipv6: ip6_words(ip),
                };
                maps.upsert_endpoint(ifindex, info)?;
                dp.attach_pod(&ifname)?;
                idx.push(ifindex);
            }
            Ok((dp, maps, idx))
        })??;
    let v = |identity| IpcacheValue {
        identity,
        cidr_identity: IDENTITY_WORLD6,
    };
    maps.set_ipcache6(Ipv6Addr::UNSPECIFIED, 0, v(IDENTITY_WORLD6))?;
    maps.set_ipcache6(GW, 128, v(IDENTITY_HOST))?;
    for (i, ip) in PODS.iter().enumerate() {
        maps.set_ipcache6(*ip, 128, v(identity(i)))?;
    }
    for (i, ns) in pods.iter().enumerate() {
        ident_servers(ns, i as u8, Ipv6Addr::UNSPECIFIED.into(), TARGET)?;
    }
    let events = maps.take_event_reader()?;
    Ok(Rig {
        _node: node,
        pods,
        ifindexes,
        _dp: dp,
        maps,
        events,
        _pins: pins,
    })
}

impl Rig {
    /// Program the frontend VIP:port/proto (service id `port`) with these
    /// backend pods.
    fn service(&mut self, port: u16, protocol: u8, backends: &[usize]) -> Result<()> {
        let id = port as u32;
        for (slot, i) in backends.iter().enumerate() {
            let k = SvcBackendKey {
                service_id: id,
                slot: slot as u32,
            };
            let b = SvcBackend6 {
                addr: ip6_words(PODS[*i]),
                port_be: TARGET.to_be(),
                _pad: 0,
            };
            self.maps.set_backend6(k, b)?;
        }
        let k = SvcFrontendKey6 {
            addr: ip6_words(VIP),
            port_be: port.to_be(),
            protocol,
            _pad: 0,
        };
        let v = SvcFrontend {
            service_id: id,
            backends: backends.len() as u32,
            affinity_s: 0,
        };
        Ok(self.maps.set_frontend6(k, v)?)
    }

    fn enforce(&mut self, i: usize, flags: u32) -> Result<()> {
        let mut info = self.maps.endpoint(self.ifindexes[i]).expect("registered");
        info.flags |= flags;
        self.maps.upsert_endpoint(self.ifindexes[i], info)?;
        Ok(())
    }

    fn allow(&mut self, ep: usize, peer: usize, dir: u8) -> Result<()> {
        let key = PolicyKey {
            endpoint_id: ep as u32 + 1,
            peer_identity: identity(peer),
            direction: dir,
            protocol: PROTO_TCP,
            dport_be: TARGET.to_be(),
        };
        let v = PolicyValue {
            action: ACTION_ALLOW,
            cookie: 5,
        };
        Ok(self.maps.set_policy(POLICY_PREFIX_FULL, key, v)?)
    }
}

fn vip(port: u16) -> SocketAddr {
    (VIP, port).into()
}

/// One datagram on a connected socket (which takes a reply from `to`
/// only): the answer's tag, or the error the socket reports.
fn udp_tag(ns: &NetNs, to: SocketAddr) -> Result<std::io::Result<u8>> {
    ns.enter(move || -> Result<std::io::Result<u8>> {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        s.connect(to)?;
        s.set_read_timeout(Some(Duration::from_millis(1500)))?;
        s.send(b"q")?;
        let mut buf = [0u8; 16];
        Ok(s.recv(&mut buf).map(|_| buf[0]))
    })?
}

fn to_pod(e: &FlowEvent, i: usize) -> bool {
    e.daddr6 == ip6_words(PODS[i]) && u16::from_be(e.dport_be) == TARGET
}

#[test]
fn tcp_and_udp_to_an_ipv6_cluster_ip_reach_backends_and_replies_come_from_it() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    r.service(80, PROTO_TCP, &[B, C])?;
    r.service(53, PROTO_UDP, &[B, C])?;
    let mut tcp = std::collections::BTreeSet::new();
    let mut udp = std::collections::BTreeSet::new();
    for i in 0..12 {
        let (tag, mut c) = tcp_tag(&r.pods[A], vip(80))?;
        echo(&mut c, i)?;
        tcp.insert(tag);
        udp.insert(udp_tag(&r.pods[A], vip(53))??);
    }
    let both: std::collections::BTreeSet<u8> = [B as u8, C as u8].into();
    assert_eq!(tcp, both, "TCP spread over both backends");
    assert_eq!(udp, both, "UDP spread over both backends");
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.service_id == 80 && e.verdict == VERDICT_ALLOW
        })
        .expect("a translated flow's record");
    assert!(
        to_pod(&e, B) || to_pod(&e, C),
        "the record names the backend"
    );
    Ok(())
}

#[test]
fn ipv6_policy_judges_the_backend_an_open_flow_keeps_it_and_a_hairpin_works() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    // A may reach B only; the Service's one backend is C: denied on C.
    r.enforce(A, EP_EGRESS_ENFORCED)?;
    r.allow(A, B, DIR_EGRESS)?;
    r.service(80, PROTO_TCP, &[C])?;
    assert!(tcp_tag(&r.pods[A], vip(80)).is_err(), "C is denied");
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.verdict == VERDICT_DROP && to_pod(e, C)
        })
        .expect("the drop names backend C");
    assert_eq!(e.service_id, 80);
    // With B as the backend the same ClusterIP is allowed.
    r.service(80, PROTO_TCP, &[B])?;
    let (tag, mut open) = tcp_tag(&r.pods[A], vip(80))?;
    assert_eq!(tag, B as u8);
    // The backend list changes under an open flow: it keeps B.
    r.allow(A, C, DIR_EGRESS)?;
    r.service(80, PROTO_TCP, &[C])?;
    echo(&mut open, 7)?;
    assert_eq!(
        tcp_tag(&r.pods[A], vip(80))?.0,
        C as u8,
        "new flows go to C"
    );
    echo(&mut open, 8)?;
    // The ingress side judges the client as itself, not the ClusterIP.
    r.enforce(C, EP_INGRESS_ENFORCED)?;
    assert!(
        tcp_tag(&r.pods[A], vip(80)).is_err(),
        "C's ingress denies A"
    );
    r.allow(C, A, DIR_INGRESS)?;
    assert_eq!(tcp_tag(&r.pods[A], vip(80))?.0, C as u8);

    // A hairpin: C reaching its own Service, under default deny both ways.
    r.enforce(C, EP_EGRESS_ENFORCED)?;
    let (tag, mut c) = tcp_tag(&r.pods[C], vip(80))?;
    assert_eq!(tag, C as u8, "C reached itself");
    echo(&mut c, 9)?;
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.direction == DIR_INGRESS && e.reason == reason::HOST
        })
        .expect("C's ingress judged its hairpin as host");
    assert_eq!(e.verdict, VERDICT_ALLOW);
    Ok(())
}

#[test]
fn an_ipv6_service_without_backends_refuses_at_once() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    r.service(80, PROTO_TCP, &[])?;
    r.service(53, PROTO_UDP, &[])?;
    let t = std::time::Instant::now();
    let err = match tcp_tag(&r.pods[A], vip(80)) {
        Ok(_) => anyhow::bail!("connected to a Service without backends"),
        Err(e) => e,
    };
    let io = err
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind);
    assert_eq!(io, Some(std::io::ErrorKind::ConnectionRefused), "{err}");
    // Refused, not timed out: the answer is a valid ICMPv6 port
    // unreachable the client's TCP takes. (Over IPv6 the answer to the
    // first SYN arrives while connect() still holds the socket, which
    // drops it, as it drops ip6tables REJECT's; the retransmitted SYN's
    // answer, a second later, ends the connect.)
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1400), "refused in {took:?}");
    let udp = udp_tag(&r.pods[A], vip(53))?;
    assert_eq!(
        udp.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the ICMPv6 port unreachable reached the UDP socket"
    );
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.reason == reason::NO_SERVICE_BACKEND
        })
        .expect("a no-backend drop");
    assert_eq!(e.service_id, 80);
    Ok(())
}
