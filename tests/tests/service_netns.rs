//! Service translation on real packets: pods in network namespaces routed
//! through a node namespace, the programs on every pod's host veth, and
//! frontends/backends written straight into the maps (the agent's
//! `set_services` is what writes them in production).
use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::Result;
use palisade_common::{
    reason,
    service::{SvcBackend, SvcBackendKey, SvcFrontend, SvcFrontendKey},
    EndpointInfo, FlowEvent, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW, DIR_EGRESS,
    EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED, IDENTITY_WORLD, POLICY_PREFIX_FULL, PROTO_TCP,
    PROTO_UDP, VERDICT_ALLOW, VERDICT_DROP,
};
use palisade_dataplane::{
    events::EventReader,
    maps::{be, from_be},
    Datapath, DatapathConfig, Maps,
};
use palisade_tests::*;

const GW: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
/// Client, and two backends.
const PODS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 98, 0, 2),
    Ipv4Addr::new(10, 98, 0, 3),
    Ipv4Addr::new(10, 98, 0, 4),
];
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 10);
const SVC_ID: u32 = 7;
const TARGET: u16 = 8080;

struct Rig {
    node: Node,
    _dp: Datapath,
    maps: Maps,
    events: EventReader,
    ifindexes: Vec<u32>,
    _pins: PinRoot,
}

fn identity(i: usize) -> u32 {
    1001 + i as u32
}

/// Node with pods A, B, C, programs attached to all three, registered
/// unenforced; each of B and C runs a TCP and a UDP server on TARGET that
/// answers with its own index (A too, for the hairpin).
fn rig() -> Result<Rig> {
    let pins = PinRoot::new()?;
    let mut node = Node::new(GW)?;
    for ip in PODS {
        node.add_pod(ip)?;
    }
    let cfg = DatapathConfig {
        pins: pins.pins.clone(),
        ..Default::default()
    };
    let ifs: Vec<(String, Ipv4Addr, u32)> = node
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| (p.host_if.clone(), p.ip, i as u32 + 1))
        .collect();
    let (dp, mut maps, ifindexes) =
        node.ns
            .enter(move || -> Result<(Datapath, Maps, Vec<u32>)> {
                let mut dp = Datapath::load(&cfg)?;
                let mut maps = dp.take_maps()?;
                let mut idx = Vec::new();
                for (ifname, ip, ep) in ifs {
                    let ifindex = palisade_dataplane::loader::ifindex(&ifname)?;
                    let info = EndpointInfo {
                        endpoint_id: ep,
                        identity: 1000 + ep,
                        ipv4: be(ip),
                        flags: 0,
                        generation: 0,
                        mac: [0; 6],
                        _pad: [0; 2],
                        ipv6: [0; 4],
                    };
                    maps.upsert_endpoint(ifindex, info)?;
                    dp.attach_pod(&ifname)?;
                    idx.push(ifindex);
                }
                Ok((dp, maps, idx))
            })??;
    let world = IpcacheValue {
        identity: IDENTITY_WORLD,
        cidr_identity: IDENTITY_WORLD,
    };
    maps.set_ipcache(Ipv4Addr::UNSPECIFIED, 0, world)?;
    for (i, ip) in PODS.iter().enumerate() {
        let v = IpcacheValue {
            identity: identity(i),
            cidr_identity: IDENTITY_WORLD,
        };
        maps.set_ipcache(*ip, 32, v)?;
    }
    for (i, p) in node.pods.iter().enumerate() {
        ident_servers(&p.ns, i as u8, Ipv4Addr::UNSPECIFIED.into(), TARGET)?;
    }
    let events = EventReader::new(maps.take_events().expect("events map"));
    Ok(Rig {
        node,
        _dp: dp,
        maps,
        events,
        ifindexes,
        _pins: pins,
    })
}

impl Rig {
    /// Program the frontend VIP:port/proto with these backend pods.
    fn service(&mut self, port: u16, protocol: u8, backends: &[usize]) -> Result<()> {
        self.sticky_service(port, protocol, backends, 0)
    }

    /// As `service`, with sessionAffinity ClientIP for `affinity_s`
    /// seconds (0: none). The service id is per port here.
    fn sticky_service(
        &mut self,
        port: u16,
        protocol: u8,
        backends: &[usize],
        affinity_s: u32,
    ) -> Result<()> {
        self.frontend_at(VIP, port, protocol, backends, affinity_s)
    }

    /// A NodePort: the frontend at 0.0.0.0, served on node addresses.
    fn node_port(&mut self, port: u16, protocol: u8, backends: &[usize]) -> Result<()> {
        self.frontend_at(Ipv4Addr::UNSPECIFIED, port, protocol, backends, 0)
    }

    fn frontend_at(
        &mut self,
        addr: Ipv4Addr,
        port: u16,
        protocol: u8,
        backends: &[usize],
        affinity_s: u32,
    ) -> Result<()> {
        let id = if affinity_s == 0 {
            SVC_ID + protocol as u32
        } else {
            1000 + port as u32
        };
        for (slot, i) in backends.iter().enumerate() {
            self.maps.set_backend(
                SvcBackendKey {
                    service_id: id,
                    slot: slot as u32,
                },
                SvcBackend {
                    addr: be(PODS[*i]),
                    port_be: TARGET.to_be(),
                    _pad: 0,
                },
            )?;
        }
        Ok(self.maps.set_frontend(
            SvcFrontendKey {
                addr: be(addr),
                port_be: port.to_be(),
                protocol,
                _pad: 0,
            },
            SvcFrontend {
                service_id: id,
                backends: backends.len() as u32,
                affinity_s,
            },
        )?)
    }

    fn ns(&self, i: usize) -> &NetNs {
        &self.node.pods[i].ns
    }

    fn enforce(&mut self, i: usize, flags: u32) -> Result<()> {
        let mut info = self.maps.endpoint(self.ifindexes[i]).expect("registered");
        info.flags |= flags;
        self.maps.upsert_endpoint(self.ifindexes[i], info)?;
        Ok(())
    }

    fn allow(&mut self, ep: usize, peer: usize, dir: u8, port: u16) -> Result<()> {
        let key = PolicyKey {
            endpoint_id: ep as u32 + 1,
            peer_identity: identity(peer),
            direction: dir,
            protocol: PROTO_TCP,
            dport_be: port.to_be(),
        };
        let v = PolicyValue {
            action: ACTION_ALLOW,
            cookie: 5,
        };
        Ok(self.maps.set_policy(POLICY_PREFIX_FULL, key, v)?)
    }
}

/// One UDP request from pod `from` to `to` on a connected socket (which
/// only accepts a reply from `to` itself): the answering server's tag.
fn udp_tag(ns: &NetNs, to: SocketAddr) -> Result<Option<u8>> {
    ns.enter(move || -> Result<Option<u8>> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(to)?;
        s.set_read_timeout(Some(Duration::from_millis(1500)))?;
        s.send(b"q")?;
        let mut buf = [0u8; 16];
        match s.recv(&mut buf) {
            Ok(1) => Ok(Some(buf[0])),
            Ok(n) => anyhow::bail!("unexpected {n}-byte answer"),
            Err(_) => Ok(None),
        }
    })?
}

/// A connect() that must fail: how, and how long it took.
fn tcp_refusal(ns: &NetNs, to: SocketAddr) -> Result<(std::io::ErrorKind, Duration)> {
    ns.enter(move || -> Result<_> {
        let t = std::time::Instant::now();
        match TcpStream::connect_timeout(&to, Duration::from_millis(1500)) {
            Ok(_) => anyhow::bail!("connected to {to}"),
            Err(e) => Ok((e.kind(), t.elapsed())),
        }
    })?
}

/// A connected UDP socket's error after one datagram to `to` (the kernel
/// reports a port unreachable on the next call).
fn udp_refusal(ns: &NetNs, to: SocketAddr) -> Result<std::io::ErrorKind> {
    ns.enter(move || -> Result<_> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(to)?;
        s.set_read_timeout(Some(Duration::from_millis(1500)))?;
        s.send(b"q")?;
        let mut buf = [0u8; 16];
        match s.recv(&mut buf) {
            Ok(n) => anyhow::bail!("{n}-byte answer from {to}"),
            Err(e) => Ok(e.kind()),
        }
    })?
}

fn vip(port: u16) -> SocketAddr {
    (VIP, port).into()
}

fn is_to(e: &FlowEvent, i: usize) -> bool {
    from_be(e.daddr) == PODS[i] && u16::from_be(e.dport_be) == TARGET
}

#[test]
fn tcp_and_udp_to_a_cluster_ip_reach_backends_and_replies_come_from_the_cluster_ip() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    r.service(80, PROTO_TCP, &[B, C])?;
    r.service(53, PROTO_UDP, &[B, C])?;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let (tag, mut c) = tcp_tag(r.ns(A), vip(80))?;
        echo(&mut c, 3)?;
        seen.insert(tag);
    }
    assert_eq!(
        seen,
        [B as u8, C as u8].into(),
        "new flows spread over both backends: {seen:?}"
    );
    let mut useen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        useen.insert(udp_tag(r.ns(A), vip(53))?.expect("UDP answer from the ClusterIP"));
    }
    assert_eq!(useen, [B as u8, C as u8].into());
    // Records name the Service and carry the translated tuple.
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.direction == DIR_EGRESS && e.protocol == PROTO_TCP && e.service_id != 0
        })
        .expect("a record of a translated flow");
    assert_eq!(e.service_id, SVC_ID + PROTO_TCP as u32);
    assert!(is_to(&e, B) || is_to(&e, C), "{e:?}");
    assert!(r.maps.counters()?.get(reason::SVC_TRANSLATED) >= 24);
    // Unrelated traffic straight to a pod is untouched.
    assert_eq!(tcp_tag(r.ns(A), (PODS[C], TARGET).into())?.0, C as u8);
    Ok(())
}

#[test]
fn session_affinity_pins_a_client_to_its_backend_while_the_backend_stays() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    r.sticky_service(82, PROTO_TCP, &[B, C], 10800)?;
    r.sticky_service(54, PROTO_UDP, &[B, C], 10800)?;
    let first = tcp_tag(r.ns(A), vip(82))?.0;
    for _ in 0..10 {
        assert_eq!(tcp_tag(r.ns(A), vip(82))?.0, first, "pinned (TCP)");
    }
    let ufirst = udp_tag(r.ns(A), vip(54))?.expect("UDP answer");
    for _ in 0..10 {
        assert_eq!(udp_tag(r.ns(A), vip(54))?, Some(ufirst), "pinned (UDP)");
    }
    // The pinned backend leaves: the client gets the other, and keeps it
    // when the first comes back (at another slot order, too).
    let other = if first == B as u8 { C } else { B };
    r.sticky_service(82, PROTO_TCP, &[other], 10800)?;
    assert_eq!(tcp_tag(r.ns(A), vip(82))?.0, other as u8);
    r.sticky_service(82, PROTO_TCP, &[C, B], 10800)?;
    for _ in 0..10 {
        assert_eq!(tcp_tag(r.ns(A), vip(82))?.0, other as u8, "re-pinned");
    }
    // Without affinity the same client spreads over both.
    r.sticky_service(82, PROTO_TCP, &[B, C], 0)?;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        seen.insert(tcp_tag(r.ns(A), vip(82))?.0);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    Ok(())
}

#[test]
fn policy_judges_the_backend_and_the_backend_sees_the_client() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    // A may reach B only; B admits A only; C admits nobody.
    r.enforce(A, EP_EGRESS_ENFORCED)?;
    r.enforce(B, EP_INGRESS_ENFORCED)?;
    r.enforce(C, EP_INGRESS_ENFORCED)?;
    r.allow(A, B, DIR_EGRESS, TARGET)?;
    r.allow(B, A, palisade_common::DIR_INGRESS, TARGET)?;
    r.service(80, PROTO_TCP, &[B])?;
    let (tag, mut c) = tcp_tag(r.ns(A), vip(80))?;
    assert_eq!(tag, B as u8);
    echo(&mut c, 1)?;
    // The backend's ingress saw the client's own address and identity.
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.direction == palisade_common::DIR_INGRESS && is_to(e, B)
        })
        .expect("B's ingress record");
    assert_eq!((from_be(e.saddr), e.src_identity), (PODS[A], identity(A)));
    assert_eq!((e.verdict, e.reason), (VERDICT_ALLOW, reason::POLICY_ALLOW));

    // Behind the same ClusterIP, C is not allowed by A's egress policy.
    r.service(81, PROTO_TCP, &[C])?;
    assert!(tcp_tag(r.ns(A), vip(81)).is_err());
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.verdict == VERDICT_DROP && e.direction == DIR_EGRESS && is_to(e, C)
        })
        .expect("A's egress drop, naming C");
    assert_eq!(e.reason, reason::NO_POLICY_MATCH);
    assert_eq!(e.dst_identity, identity(C));
    assert_eq!(e.service_id, SVC_ID + PROTO_TCP as u32);
    Ok(())
}

#[test]
fn an_open_flow_keeps_its_backend_and_zero_backends_refuse_new_flows() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    r.service(80, PROTO_TCP, &[B])?;
    let (tag, mut open) = tcp_tag(r.ns(A), vip(80))?;
    assert_eq!(tag, B as u8);
    r.service(80, PROTO_TCP, &[C])?;
    r.maps.remove_backend(&SvcBackendKey {
        service_id: SVC_ID + PROTO_TCP as u32,
        slot: 1,
    })?;
    echo(&mut open, 9)?; // still B
    assert_eq!(tcp_tag(r.ns(A), vip(80))?.0, C as u8, "new flows go to C");

    // Scale-down to zero while the client holds a flow: the flow stays,
    // new flows are refused at once as kube-proxy's REJECT refuses them
    // (ICMP port unreachable from the ClusterIP), not left to time out.
    r.service(80, PROTO_TCP, &[])?;
    echo(&mut open, 8)?; // still open to B
    let (kind, took) = tcp_refusal(r.ns(A), vip(80))?;
    assert_eq!(kind, std::io::ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_millis(500), "refused in {took:?}");
    echo(&mut open, 7)?; // and still open after the refusal
    r.service(53, PROTO_UDP, &[])?;
    assert_eq!(
        udp_refusal(r.ns(A), vip(53))?,
        std::io::ErrorKind::ConnectionRefused
    );
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.reason == reason::NO_SERVICE_BACKEND
        })
        .expect("a no-backend drop record");
    assert_eq!(e.verdict, VERDICT_DROP);
    assert_eq!(from_be(e.daddr), VIP);
    assert!(r.maps.counters()?.get(reason::NO_SERVICE_BACKEND) >= 2);
    Ok(())
}

#[test]
fn a_pod_reaches_its_own_service_hairpin() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    // Strict reverse-path filtering on the node, as on many hosts: the
    // hairpin's link-local source never crosses the node's routing.
    r.node.ns.sysctl("net.ipv4.conf.all.rp_filter", "1")?;
    r.node.ns.sysctl("net.ipv4.conf.default.rp_filter", "1")?;
    let h = r.node.pods[A].host_if.clone();
    r.node
        .ns
        .sysctl(&format!("net.ipv4.conf.{h}.rp_filter"), "1")?;
    r.service(80, PROTO_TCP, &[A])?;
    r.service(53, PROTO_UDP, &[A])?;
    let (tag, mut c) = tcp_tag(r.ns(A), vip(80))?;
    assert_eq!(tag, A as u8);
    echo(&mut c, 4)?;
    assert_eq!(udp_tag(r.ns(A), vip(53))?, Some(A as u8));
    // Both directions enforced with no rule at all: a hairpin is the pod
    // talking to itself (kube-proxy would masquerade it to the node), so
    // it is judged as `host` at both ends and passes, as a pod's traffic
    // to its own address does.
    r.enforce(A, EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    assert_eq!(
        tcp_tag(r.ns(A), vip(80))?.0,
        A as u8,
        "hairpin under default deny"
    );
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.direction == palisade_common::DIR_INGRESS && e.reason == reason::HOST
        })
        .expect("A's ingress judged its hairpin as host");
    assert_eq!(e.verdict, palisade_common::VERDICT_ALLOW);
    // Another pod is still refused by A's ingress.
    assert!(tcp_tag(r.ns(B), vip(80)).is_err(), "B is not A's hairpin");
    Ok(())
}

#[test]
fn a_node_port_on_the_nodes_address_is_translated_and_judged_on_its_backend() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    r.enforce(A, EP_EGRESS_ENFORCED)?;
    r.allow(A, B, DIR_EGRESS, TARGET)?;
    // The node's address (the pods' gateway) is `host`.
    let host = IpcacheValue {
        identity: palisade_common::IDENTITY_HOST,
        cidr_identity: IDENTITY_WORLD,
    };
    r.maps.set_ipcache(GW, 32, host)?;
    // kube-proxy's NodePort rule: the node's address:30080 -> C.
    node_dnat(&r.node.ns, GW.into(), 30080, (PODS[C], 8080).into())?;
    let np = SocketAddr::from((GW, 30080));
    // Without palisade's frontend the packet is traffic to the pod's own
    // node, which passes; kube-proxy then carries it to C, which A's
    // egress policy does not allow: what the frontend closes.
    assert_eq!(tcp_tag(r.ns(A), np)?.0, C as u8);
    // With it: translated first and judged on the backend.
    r.node_port(30080, PROTO_TCP, &[B])?;
    assert_eq!(tcp_tag(r.ns(A), np)?.0, B as u8);
    r.node_port(30080, PROTO_TCP, &[C])?;
    assert!(tcp_tag(r.ns(A), np).is_err());
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.verdict == VERDICT_DROP && e.direction == DIR_EGRESS && is_to(e, C)
        })
        .expect("A's egress drop, naming C");
    assert_eq!(e.reason, reason::NO_POLICY_MATCH);
    // A port no NodePort has on the node is the node's traffic as before.
    assert!(tcp_tag(r.ns(A), SocketAddr::from((GW, 30081))).is_err());
    Ok(())
}

#[test]
fn kube_proxy_dnat_rules_in_the_node_change_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    r.enforce(A, EP_EGRESS_ENFORCED)?;
    r.allow(A, B, DIR_EGRESS, TARGET)?;
    r.service(80, PROTO_TCP, &[B])?;
    let before = tcp_tag(r.ns(A), vip(80))?.0;
    // kube-proxy's rule for the same Service (DNAT in PREROUTING). Pointed
    // at C so that a packet it translated would show.
    node_dnat(&r.node.ns, VIP.into(), 80, (PODS[C], 8080).into())?;
    let after = tcp_tag(r.ns(A), vip(80))?.0;
    assert_eq!((before, after), (B as u8, B as u8));
    // And with palisade's translation off, kube-proxy's rule is what works.
    r.maps.remove_frontend(&SvcFrontendKey {
        addr: be(VIP),
        port_be: 80u16.to_be(),
        protocol: PROTO_TCP,
        _pad: 0,
    })?;
    // Untranslated, A's egress policy judges the ClusterIP as world...
    assert!(
        tcp_tag(r.ns(A), vip(80)).is_err(),
        "ClusterIP judged as world"
    );
    // ...and unenforced, kube-proxy's rule is what carries it (to C): the
    // rule was live all along, palisade's translation ran first.
    let mut info = r.maps.endpoint(r.ifindexes[A]).expect("registered");
    info.flags = 0;
    r.maps.upsert_endpoint(r.ifindexes[A], info)?;
    assert_eq!(tcp_tag(r.ns(A), vip(80))?.0, C as u8);
    Ok(())
}

#[test]
fn a_restarted_datapath_keeps_open_translated_flows_and_the_frontends() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    r.service(80, PROTO_TCP, &[B])?;
    let (tag, mut open) = tcp_tag(r.ns(A), vip(80))?;
    assert_eq!(tag, B as u8);
    // A new agent: programs loaded again on the same pins, links adopted
    // (the old programs stay attached until swapped).
    let cfg = DatapathConfig {
        pins: r._pins.pins.clone(),
        ..Default::default()
    };
    let (dp2, maps2) = r.node.ns.enter(move || -> Result<(Datapath, Maps)> {
        let mut dp = Datapath::load(&cfg)?;
        let maps = dp.take_maps()?;
        dp.adopt_links()?;
        Ok((dp, maps))
    })??;
    assert_eq!(
        maps2.frontends().len(),
        1,
        "frontends adopted from the pins"
    );
    assert_eq!(maps2.backends().len(), 1);
    let old = std::mem::replace(&mut r._dp, dp2);
    drop(old);
    r.maps = maps2;
    // The open flow keeps its backend through the new programs, even with
    // the Service now pointing elsewhere; new flows follow the Service.
    r.service(80, PROTO_TCP, &[C])?;
    echo(&mut open, 6)?;
    assert_eq!(tcp_tag(r.ns(A), vip(80))?.0, C as u8);
    Ok(())
}

/// Issue 17 point 2 through a Service: a translated flow is judged again
/// on its backend tuple when the client's generation moves on (kept while
/// allowed, cut once not), and a hairpin stays a hairpin.
#[test]
fn a_policy_change_rejudges_translated_flows_on_their_backend() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut r = rig()?;
    r.enforce(A, EP_EGRESS_ENFORCED)?;
    r.allow(A, B, DIR_EGRESS, TARGET)?;
    r.service(80, PROTO_TCP, &[B])?;
    // (A service id of its own: `service` gives one per protocol.)
    r.sticky_service(90, PROTO_TCP, &[A], 1)?;
    let (tag, mut c) = tcp_tag(r.ns(A), vip(80))?;
    assert_eq!(tag, B as u8);
    let (tag, mut h) = tcp_tag(r.ns(A), vip(90))?;
    assert_eq!(tag, A as u8);
    echo(&mut c, 1)?;
    let bump = |r: &mut Rig| -> Result<()> {
        let mut info = r.maps.endpoint(r.ifindexes[A]).expect("A");
        info.generation += 1;
        Ok(r.maps.upsert_endpoint(r.ifindexes[A], info)?)
    };
    // A change that still admits both: they go on, translated as before.
    bump(&mut r)?;
    echo(&mut c, 2)?;
    echo(&mut h, 3)?;
    // A's rule for B goes: the translated flow is cut, the hairpin stays.
    r.maps.remove_policy(
        POLICY_PREFIX_FULL,
        PolicyKey {
            endpoint_id: A as u32 + 1,
            peer_identity: identity(B),
            direction: DIR_EGRESS,
            protocol: PROTO_TCP,
            dport_be: TARGET.to_be(),
        },
    )?;
    bump(&mut r)?;
    c.set_read_timeout(Some(Duration::from_millis(1500)))?;
    assert!(echo(&mut c, 4).is_err(), "the flow to B must be cut");
    let e = r
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.reason == reason::POLICY_CHANGED
        })
        .expect("a policy-changed drop");
    assert_eq!((e.verdict, e.direction), (VERDICT_DROP, DIR_EGRESS));
    echo(&mut h, 5)?;
    Ok(())
}
