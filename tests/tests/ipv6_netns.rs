//! IPv6 on real veths (issue 15): two IPv6-only pods routed through a node
//! namespace, the programs attached to their host veths. Neighbour
//! discovery must work through the programs (the pods resolve their
//! gateway), and TCP over IPv6 must be enforced as IPv4 is: denied
//! without a rule, admitted by the same policy entry an IPv4 flow would
//! hit, replies through conntrack, events with the IPv6 addresses.
use std::{
    net::{Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::Result;
use palisade_common::{
    reason, EndpointInfo, FlowEvent, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW,
    DIR_INGRESS, EP_INGRESS_ENFORCED, IDENTITY_HOST, IDENTITY_WORLD, POLICY_PREFIX_FULL, PROTO_TCP,
    VERDICT_ALLOW, VERDICT_DROP,
};
use palisade_dataplane::{events::EventReader, maps::ip6_words, Datapath, DatapathConfig, Maps};
use palisade_tests::*;

const GW: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2);
const B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 3);
const A_ID: u32 = 1001;
const B_ID: u32 = 1002;

struct Setup {
    node: NetNs,
    pods: Vec<NetNs>,
    a_ifindex: u32,
    b_ifindex: u32,
    _dp: Datapath,
    maps: Maps,
    events: EventReader,
    // Dropped last: links are unpinned after the namespaces are gone.
    _pins: PinRoot,
}

fn setup() -> Result<Setup> {
    let pins = PinRoot::new()?;
    let node = NetNs::new("p6node")?;
    node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    let (a, a_if) = add_pod6(&node, GW, A)?;
    let (b, b_if) = add_pod6(&node, GW, B)?;
    let cfg = DatapathConfig {
        pins: pins.pins.clone(),
        ..Default::default()
    };
    let pods = [(a_if, A, 1, A_ID), (b_if, B, 2, B_ID)];
    let (dp, mut maps, a_ifindex, b_ifindex) = node.enter(move || -> Result<_> {
        let mut dp = Datapath::load(&cfg)?;
        let mut maps = dp.take_maps()?;
        let (mut a_ifindex, mut b_ifindex) = (0, 0);
        for (ifname, ip, ep, identity) in pods {
            // The endpoint first: a program fails closed for an interface
            // it does not know.
            let ifindex = palisade_dataplane::loader::ifindex(&ifname)?;
            let info = EndpointInfo {
                endpoint_id: ep,
                identity,
                ipv4: 0,
                flags: 0,
                generation: 0,
                mac: [0; 6],
                _pad: [0; 2],
                ipv6: ip6_words(ip),
            };
            maps.upsert_endpoint(ifindex, info)?;
            dp.attach_pod(&ifname)?;
            (a_ifindex, b_ifindex) = (b_ifindex, ifindex);
        }
        Ok((dp, maps, a_ifindex, b_ifindex))
    })??;
    let v = |identity| IpcacheValue {
        identity,
        cidr_identity: IDENTITY_WORLD,
    };
    maps.set_ipcache6(Ipv6Addr::UNSPECIFIED, 0, v(IDENTITY_WORLD))?;
    // The gateway is the node: its neighbour advertisements come from it.
    maps.set_ipcache6(GW, 128, v(IDENTITY_HOST))?;
    maps.set_ipcache6(A, 128, v(A_ID))?;
    maps.set_ipcache6(B, 128, v(B_ID))?;
    let events = maps.take_event_reader()?;
    Ok(Setup {
        node,
        pods: vec![a, b],
        a_ifindex,
        b_ifindex,
        _dp: dp,
        maps,
        events,
        _pins: pins,
    })
}

/// Both pods' MACs in their endpoint entries, as the CNI plugin
/// registers them (local delivery needs the receiver's).
fn register_macs(s: &mut Setup) -> Result<()> {
    for (i, ifindex) in [(0, s.a_ifindex), (1, s.b_ifindex)] {
        let mut info = s.maps.endpoint(ifindex).expect("registered");
        info.mac = link_mac(&s.pods[i], "eth0")?;
        s.maps.upsert_endpoint(ifindex, info)?;
    }
    Ok(())
}

fn connects(ns: &NetNs, to: Ipv6Addr, port: u16) -> Result<bool> {
    ns.enter(move || {
        TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_millis(700))
            .is_ok()
    })
}

/// A server on [::]:`port` in `ns`, echoing.
fn serve(ns: &NetNs, port: u16) -> Result<()> {
    let l = ns.enter(move || std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))??;
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut c = c;
                let mut buf = [0u8; 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// A round trip of `msg` to the echo server (replies pass by conntrack).
fn echoes(ns: &NetNs, to: Ipv6Addr, port: u16) -> Result<bool> {
    ns.enter(move || {
        use std::io::{Read, Write};
        let Ok(mut c) =
            TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(2))
        else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 5];
        let ok =
            c.write_all(b"hello").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"hello";
        // Closed before returning: no FIN of this flow is left to cross
        // the node while a caller counts what it forwards.
        if ok {
            let _ = close_both_ways(&c);
        }
        ok
    })
}

fn tcp_event_to(events: &[FlowEvent], port: u16) -> Option<FlowEvent> {
    events
        .iter()
        .find(|e| {
            e.family == 6
                && e.daddr6 == ip6_words(B)
                && e.protocol == PROTO_TCP
                && u16::from_be(e.dport_be) == port
                && e.direction == DIR_INGRESS
        })
        .copied()
}

#[test]
fn ipv6_tcp_between_pods_is_enforced_on_real_veths() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = setup()?;
    serve(&s.pods[1], 8080)?;
    serve(&s.pods[1], 8081)?;
    // Unenforced: open (and neighbour discovery got the pods their
    // gateway through the programs).
    assert!(echoes(&s.pods[0], B, 8080)?, "unenforced IPv6 is open");

    let mut info = s.maps.endpoint(s.b_ifindex).expect("B registered");
    info.flags |= EP_INGRESS_ENFORCED;
    info.generation += 1;
    s.maps.upsert_endpoint(s.b_ifindex, info)?;
    assert!(!connects(&s.pods[0], B, 8081)?, "no rule: denied");
    let e = tcp_event_to(&s.events.drain(), 8081).expect("a drop event for 8081");
    assert_eq!(
        (e.verdict, e.reason),
        (VERDICT_DROP, reason::NO_POLICY_MATCH)
    );
    assert_eq!((e.saddr6, e.src_identity), (ip6_words(A), A_ID));

    // The entry an IPv4 flow from A would hit.
    let k = PolicyKey {
        endpoint_id: 2,
        peer_identity: A_ID,
        direction: DIR_INGRESS,
        protocol: PROTO_TCP,
        dport_be: 8080u16.to_be(),
    };
    s.maps.set_policy(
        POLICY_PREFIX_FULL,
        k,
        PolicyValue {
            action: ACTION_ALLOW,
            cookie: 66,
        },
    )?;
    assert!(echoes(&s.pods[0], B, 8080)?, "allowed port over IPv6");
    let e = tcp_event_to(&s.events.drain(), 8080).expect("an allow event for 8080");
    assert_eq!(
        (e.verdict, e.reason, e.cookie),
        (VERDICT_ALLOW, reason::POLICY_ALLOW, 66)
    );
    assert!(!connects(&s.pods[0], B, 8081)?, "other port still denied");
    Ok(())
}

#[test]
fn ipv6_between_local_pods_is_delivered_past_the_node_stack() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = setup()?;
    serve(&s.pods[1], 8080)?;
    register_macs(&mut s)?;
    let mut info = s.maps.endpoint(s.b_ifindex).expect("B registered");
    info.flags |= EP_INGRESS_ENFORCED;
    info.generation += 1;
    s.maps.upsert_endpoint(s.b_ifindex, info)?;
    for port in [8080u16, 8082, 8083] {
        let k = PolicyKey {
            endpoint_id: 2,
            peer_identity: A_ID,
            direction: DIR_INGRESS,
            protocol: PROTO_TCP,
            dport_be: port.to_be(),
        };
        let v = PolicyValue {
            action: ACTION_ALLOW,
            cookie: 67,
        };
        s.maps.set_policy(POLICY_PREFIX_FULL, k, v)?;
    }
    // (The pods resolve their gateway first.)
    assert!(echoes(&s.pods[0], B, 8080)?);

    let before = ip_counter(&s.node, true, "Ip6OutForwDatagrams")?;
    for _ in 0..10 {
        assert!(echoes(&s.pods[0], B, 8080)?, "echo through the redirect");
    }
    // B's ingress program still judges what is redirected to it.
    assert!(!connects(&s.pods[0], B, 8081)?, "no rule for 8081");
    let after = ip_counter(&s.node, true, "Ip6OutForwDatagrams")?;
    assert_eq!(after - before, 0, "datagrams the node forwarded");

    // The hop limit is a router's: one less.
    for (port, min, admitted) in [(8082u16, 64, false), (8083, 63, true)] {
        let _l = listener_min_hops(&s.pods[1], B.into(), port, min)?;
        assert_eq!(
            connects(&s.pods[0], B, port)?,
            admitted,
            "port {port}, IPV6_MINHOPCOUNT {min}"
        );
    }
    Ok(())
}

#[test]
fn ipv6_answers_to_a_flow_the_node_translated_go_back_through_the_node() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // As `datapath_netns::answers_to_a_flow_the_node_translated_go_back_through_the_node`.
    const FRONT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 9, 9);
    let mut s = setup()?;
    serve(&s.pods[1], 8080)?;
    register_macs(&mut s)?;
    s.node
        .ip(&["-6", "addr", "add", &format!("{FRONT}/128"), "dev", "lo"])?;
    node_dnat(&s.node, FRONT.into(), 80, (B, 8080).into())?;
    assert!(
        echoes(&s.pods[0], FRONT, 80)?,
        "echo through the node's DNAT"
    );
    // (Its last ACK may still be on its way through the node.)
    std::thread::sleep(Duration::from_millis(200));
    let before = ip_counter(&s.node, true, "Ip6OutForwDatagrams")?;
    assert!(echoes(&s.pods[0], B, 8080)?);
    let after = ip_counter(&s.node, true, "Ip6OutForwDatagrams")?;
    assert_eq!(
        after - before,
        0,
        "the direct flow is delivered past the stack"
    );
    Ok(())
}
