//! The real programs on real veths: pods in network namespaces routed
//! through a node namespace, as the CNI plugin wires them.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use palisade_common::{
    reason, EndpointInfo, FlowEvent, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW,
    DIR_INGRESS, EP_INGRESS_ENFORCED, IDENTITY_WORLD, POLICY_PREFIX_FULL, PROTO_TCP, VERDICT_ALLOW,
    VERDICT_DROP,
};
use palisade_dataplane::{
    events::EventReader,
    maps::{be, from_be},
    Datapath, DatapathConfig, LocalDelivery, Maps,
};
use palisade_tests::*;

const GW: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const A: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);

struct Setup {
    node: Node,
    _dp: Datapath,
    maps: Maps,
    events: EventReader,
    // Dropped last: links are unpinned after the namespaces are gone.
    _pins: PinRoot,
}

/// Node with pods A and B; programs loaded and attached to B's host veth
/// (and A's when `both`), endpoints registered unenforced.
fn setup(both: bool) -> Result<Setup> {
    setup_with(both, LocalDelivery::default())
}

fn setup_with(both: bool, local_delivery: LocalDelivery) -> Result<Setup> {
    let pins = PinRoot::new()?;
    let mut node = Node::new(GW)?;
    node.add_pod(A)?;
    node.add_pod(B)?;
    let cfg = DatapathConfig {
        pins: pins.pins.clone(),
        local_delivery,
        ..Default::default()
    };
    let ifs: Vec<(String, Ipv4Addr, u32)> = node
        .pods
        .iter()
        .enumerate()
        .filter(|(i, _)| both || *i == 1)
        .map(|(i, p)| (p.host_if.clone(), p.ip, i as u32 + 1))
        .collect();
    let (dp, mut maps) = node.ns.enter(move || -> Result<(Datapath, Maps)> {
        let mut dp = Datapath::load(&cfg)?;
        let mut maps = dp.take_maps()?;
        for (ifname, ip, ep) in ifs {
            // The endpoint entry goes in before the programs: an attached
            // program fails closed for an interface it does not know.
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
        }
        Ok((dp, maps))
    })??;
    maps.set_ipcache(
        Ipv4Addr::UNSPECIFIED,
        0,
        IpcacheValue {
            identity: IDENTITY_WORLD,
            cidr_identity: IDENTITY_WORLD,
        },
    )?;
    maps.set_ipcache(
        A,
        32,
        IpcacheValue {
            identity: 1001,
            cidr_identity: IDENTITY_WORLD,
        },
    )?;
    maps.set_ipcache(
        B,
        32,
        IpcacheValue {
            identity: 1002,
            cidr_identity: IDENTITY_WORLD,
        },
    )?;
    let events = EventReader::new(maps.take_events().expect("events map"));
    Ok(Setup {
        node,
        _dp: dp,
        maps,
        events,
        _pins: pins,
    })
}

fn b_ifindex(s: &Setup) -> Result<u32> {
    let name = s.node.pods[1].host_if.clone();
    s.node
        .ns
        .enter(move || palisade_dataplane::loader::ifindex(&name))?
        .map_err(Into::into)
}

fn enforce_ingress(s: &mut Setup, ifindex: u32) -> Result<()> {
    let mut info = s.maps.endpoint(ifindex).expect("B registered");
    info.flags |= EP_INGRESS_ENFORCED;
    s.maps.upsert_endpoint(ifindex, info)?;
    Ok(())
}

fn is_tcp_to(e: &FlowEvent, dst: Ipv4Addr, port: u16) -> bool {
    e.protocol == PROTO_TCP && from_be(e.daddr) == dst && u16::from_be(e.dport_be) == port
}

#[test]
fn program_drops_on_map_entry_and_reports_the_drop() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = setup(false)?;
    tcp_echo_server(&s.node.pods[1].ns, 8080)?;
    let a = &s.node.pods[0].ns;
    assert!(
        tcp_connects(a, B, 8080, 3000)?,
        "unenforced pod must be reachable with programs attached"
    );
    let seen = s
        .events
        .wait_for(Duration::from_secs(5), |e| is_tcp_to(e, B, 8080));
    let e = seen.expect("an event for the new allowed flow");
    assert_eq!((e.verdict, e.reason), (VERDICT_ALLOW, reason::UNENFORCED));

    let ifindex = b_ifindex(&s)?;
    enforce_ingress(&mut s, ifindex)?;
    let a = &s.node.pods[0].ns;
    assert!(
        !tcp_connects(a, B, 8080, 1000)?,
        "enforced ingress with no rule must drop"
    );
    let e = s
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.verdict == VERDICT_DROP && is_tcp_to(e, B, 8080)
        })
        .expect("a drop event");
    assert_eq!(e.reason, reason::NO_POLICY_MATCH);
    assert_eq!(e.direction, DIR_INGRESS);
    assert_eq!(from_be(e.saddr), A);
    assert_eq!(e.ifindex, ifindex);
    assert!(s.maps.counters()?.get(reason::NO_POLICY_MATCH) >= 1);
    Ok(())
}

#[test]
fn allow_rule_admits_one_port_both_ways_and_drops_another() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = setup(true)?;
    tcp_echo_server(&s.node.pods[1].ns, 8080)?;
    tcp_echo_server(&s.node.pods[1].ns, 9090)?;
    let ifindex = b_ifindex(&s)?;
    enforce_ingress(&mut s, ifindex)?;
    let key = PolicyKey {
        endpoint_id: 2,
        peer_identity: 1001,
        direction: DIR_INGRESS,
        protocol: PROTO_TCP,
        dport_be: 8080u16.to_be(),
    };
    s.maps.set_policy(
        POLICY_PREFIX_FULL,
        key,
        PolicyValue {
            action: ACTION_ALLOW,
            cookie: 77,
        },
    )?;

    // 8080: a request and its echoed reply cross both programs (conntrack).
    let echoed = s.node.pods[0].ns.enter(|| -> Result<Vec<u8>> {
        use std::io::{Read, Write};
        let mut c =
            std::net::TcpStream::connect_timeout(&(B, 8080).into(), Duration::from_secs(3))?;
        c.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut got = Vec::new();
        for round in 0..5u8 {
            c.write_all(&[round; 1000])?;
            let mut buf = [0u8; 1000];
            c.read_exact(&mut buf)?;
            got.extend_from_slice(&buf);
        }
        Ok(got)
    })??;
    assert_eq!(echoed.len(), 5000);

    let a = &s.node.pods[0].ns;
    assert!(!tcp_connects(a, B, 9090, 1000)?, "9090 has no rule");

    let allow = s
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.direction == DIR_INGRESS && is_tcp_to(e, B, 8080)
        })
        .expect("allow event for 8080");
    assert_eq!(
        (allow.verdict, allow.reason, allow.cookie),
        (VERDICT_ALLOW, reason::POLICY_ALLOW, 77)
    );
    assert_eq!((allow.src_identity, allow.dst_identity), (1001, 1002));
    assert_eq!(allow.endpoint_id, 2);
    let drop = s
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.verdict == VERDICT_DROP && is_tcp_to(e, B, 9090)
        })
        .expect("drop event for 9090");
    assert_eq!(drop.reason, reason::NO_POLICY_MATCH);
    assert_eq!((drop.src_identity, drop.dst_identity), (1001, 1002));
    assert_eq!(from_be(drop.saddr), A);
    Ok(())
}

#[test]
fn gc_removes_expired_conntrack_and_fragment_entries_only() -> Result<()> {
    use palisade_common::{CtKey, CtValue, FragKey, FragValue};
    if !require_root() {
        return Ok(());
    }
    let pins = PinRoot::new()?;
    let cfg = DatapathConfig {
        pins: pins.pins.clone(),
        ..Default::default()
    };
    let mut dp = Datapath::load(&cfg)?;
    let mut maps = dp.take_maps()?;
    let now = palisade_dataplane::maps::ct_clock_ns();
    let ct = |sport: u16| CtKey {
        saddr: be(A),
        daddr: be(B),
        sport_be: sport.to_be(),
        dport_be: 80u16.to_be(),
        protocol: PROTO_TCP,
        scope: DIR_INGRESS,
        _pad: 0,
        endpoint_id: 1,
    };
    let value = |expires_ns| CtValue {
        expires_ns,
        cookie: 0,
        tcp_state: 3,
        flags: 0,
        generation: 0,
        ..CtValue::default()
    };
    maps.insert_conntrack(ct(1000), value(now - 1))?;
    maps.insert_conntrack(ct(1001), value(now + 60_000_000_000))?;
    let frag = |id: u16| FragKey {
        saddr: be(A),
        daddr: be(B),
        id_be: id.to_be(),
        protocol: PROTO_TCP,
        scope: DIR_INGRESS,
        endpoint_id: 1,
    };
    maps.insert_fragment(
        frag(1),
        FragValue {
            expires_ns: now - 1,
            verdict: 1,
            _pad: 0,
        },
    )?;
    maps.insert_fragment(
        frag(2),
        FragValue {
            expires_ns: now + 60_000_000_000,
            verdict: 1,
            _pad: 0,
        },
    )?;

    // Endpoint 1 is registered (the entries of one that is not are
    // orphans, deleted: conntrack_budget.rs).
    maps.upsert_endpoint(
        7,
        palisade_common::EndpointInfo {
            endpoint_id: 1,
            identity: 1001,
            ipv4: be(B),
            flags: 0,
            generation: 0,
            mac: [0; 6],
            _pad: [0; 2],
            ipv6: [0; 4],
        },
    )?;
    // The GC has map handles of its own, opened from the pins.
    let mut gc = palisade_dataplane::ConntrackGc::open(&pins.pins)?;
    let pass = gc.pass(palisade_dataplane::maps::ct_clock_ns())?;
    assert_eq!(pass.removed, 2);
    assert_eq!((pass.conntrack_entries, pass.fragment_entries), (1, 1));
    assert_eq!(pass.conntrack_max, palisade_common::sizes::CONNTRACK);
    let left: Vec<u16> = maps
        .conntrack_entries()?
        .into_iter()
        .map(|(k, _)| u16::from_be(k.sport_be))
        .collect();
    assert_eq!(left, vec![1001]);
    let left: Vec<u16> = maps
        .fragment_entries()?
        .into_iter()
        .map(|(k, _)| u16::from_be(k.id_be))
        .collect();
    assert_eq!(left, vec![2]);
    // A second pass finds nothing more to do and the same fill.
    let again = gc.pass(palisade_dataplane::maps::ct_clock_ns())?;
    assert_eq!((again.removed, again.conntrack_entries), (0, 1));
    drop(dp);
    Ok(())
}

// ---- issue 17 point 2: entries do not outlive the decision that made them ----

/// B's endpoint value with `f` applied and its generation bumped, as the
/// agent's map sync does after a change of B's policy (`sync.rs`).
fn bump_b(s: &mut Setup, ifindex: u32, f: impl FnOnce(&mut EndpointInfo)) -> Result<()> {
    let mut info = s.maps.endpoint(ifindex).expect("B registered");
    f(&mut info);
    info.generation = info.generation.wrapping_add(1);
    s.maps.upsert_endpoint(ifindex, info)?;
    Ok(())
}

fn allow_a_to_b_8080(s: &mut Setup, endpoint_id: u32) -> Result<PolicyKey> {
    let key = PolicyKey {
        endpoint_id,
        peer_identity: 1001,
        direction: DIR_INGRESS,
        protocol: PROTO_TCP,
        dport_be: 8080u16.to_be(),
    };
    s.maps.set_policy(
        POLICY_PREFIX_FULL,
        key,
        PolicyValue {
            action: ACTION_ALLOW,
            cookie: 78,
        },
    )?;
    Ok(key)
}

/// A connection from A to B:8080 whose one echo round worked.
fn open_echo(s: &Setup) -> Result<std::net::TcpStream> {
    s.node.pods[0].ns.enter(|| -> Result<std::net::TcpStream> {
        let c = std::net::TcpStream::connect_timeout(&(B, 8080).into(), Duration::from_secs(3))?;
        c.set_read_timeout(Some(Duration::from_millis(1500)))?;
        assert!(echo_round(&c), "first round");
        Ok(c)
    })?
}

fn echo_round(mut c: &std::net::TcpStream) -> bool {
    use std::io::{Read, Write};
    let mut buf = [0u8; 100];
    c.write_all(&[7u8; 100]).is_ok() && c.read_exact(&mut buf).is_ok()
}

#[test]
fn a_policy_change_cuts_an_established_connection_it_now_denies() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = setup(true)?;
    tcp_echo_server(&s.node.pods[1].ns, 8080)?;
    let ifindex = b_ifindex(&s)?;
    enforce_ingress(&mut s, ifindex)?;
    let key = allow_a_to_b_8080(&mut s, 2)?;
    let c = open_echo(&s)?;
    // An unrelated change elsewhere (no bump of B) leaves it alone.
    assert!(echo_round(&c), "still allowed");

    // Deny it: the rule goes, B's generation moves on.
    s.maps.remove_policy(POLICY_PREFIX_FULL, key)?;
    bump_b(&mut s, ifindex, |_| {})?;
    // (B may still send to A, e.g. a delayed ACK: its unenforced egress
    // passes that unrecorded, so it cannot revive the connection.)
    assert!(!echo_round(&c), "the established connection must be cut");
    let e = s
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.reason == reason::POLICY_CHANGED && e.ifindex == ifindex
        })
        .expect("a policy-changed drop");
    assert_eq!(e.verdict, VERDICT_DROP);
    assert_eq!((from_be(e.saddr), from_be(e.daddr)), (A, B));

    // And back: a new connection is judged by the new rule.
    let a = &s.node.pods[0].ns;
    assert!(!tcp_connects(a, B, 8080, 1000)?, "denied now");
    allow_a_to_b_8080(&mut s, 2)?;
    bump_b(&mut s, ifindex, |_| {})?;
    let c = open_echo(&s)?;
    assert!(echo_round(&c), "allowed again");
    Ok(())
}

#[test]
fn audit_entries_are_judged_again_when_audit_ends() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = setup(true)?;
    tcp_echo_server(&s.node.pods[1].ns, 8080)?;
    let ifindex = b_ifindex(&s)?;
    // Enforced in audit mode with no rule: audited through.
    bump_b(&mut s, ifindex, |i| {
        i.flags |= EP_INGRESS_ENFORCED | palisade_common::EP_AUDIT
    })?;
    let c = open_echo(&s)?;
    assert!(echo_round(&c), "audit passes");
    // Audit off (the flags change; no generation bump needed for this).
    let mut info = s.maps.endpoint(ifindex).expect("B");
    info.flags &= !palisade_common::EP_AUDIT;
    s.maps.upsert_endpoint(ifindex, info)?;
    assert!(!echo_round(&c), "the audited connection must be cut");
    s.events
        .wait_for(Duration::from_secs(5), |e| {
            e.reason == reason::POLICY_CHANGED && e.ifindex == ifindex
        })
        .expect("a policy-changed drop");
    Ok(())
}

#[test]
fn a_new_pod_on_an_old_pods_address_inherits_none_of_its_flows() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = setup(true)?;
    tcp_echo_server(&s.node.pods[1].ns, 8080)?;
    let ifindex = b_ifindex(&s)?;
    // The old pod (endpoint 2, unenforced) had a connection open.
    let c = open_echo(&s)?;
    // A new registration on the address: a new endpoint id, isolated.
    let mut info = s.maps.endpoint(ifindex).expect("B");
    info.endpoint_id = 9;
    info.flags = EP_INGRESS_ENFORCED;
    s.maps.upsert_endpoint(ifindex, info)?;
    assert!(
        !echo_round(&c),
        "the old pod's connection is not the new pod's"
    );
    let e = s
        .events
        .wait_for(Duration::from_secs(5), |e| {
            e.endpoint_id == 9 && e.verdict == VERDICT_DROP && is_tcp_to(e, B, 8080)
        })
        .expect("the new pod's ingress judges it as a new flow");
    assert_eq!(e.reason, reason::NO_POLICY_MATCH);
    Ok(())
}

/// Both pods' MACs in their endpoint entries, as the CNI plugin
/// registers them (local delivery needs the receiver's).
fn register_macs(s: &mut Setup) -> Result<()> {
    for i in 0..2 {
        let (host_if, mac) = (
            s.node.pods[i].host_if.clone(),
            link_mac(&s.node.pods[i].ns, "eth0")?,
        );
        let ifx = s
            .node
            .ns
            .enter(move || palisade_dataplane::loader::ifindex(&host_if))??;
        let mut info = s.maps.endpoint(ifx).expect("registered");
        info.mac = mac;
        s.maps.upsert_endpoint(ifx, info)?;
    }
    Ok(())
}

#[test]
fn local_delivery_stack_leaves_pod_traffic_to_the_node() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = setup_with(true, LocalDelivery::Stack)?;
    tcp_echo_server(&s.node.pods[1].ns, 8080)?;
    register_macs(&mut s)?;
    assert_eq!(s.maps.local_pod(B), None, "no index written");
    assert!(tcp_connects(&s.node.pods[0].ns, B, 8080, 3000)?);
    let before = ip_counter(&s.node.ns, false, "ForwDatagrams")?;
    let c = open_echo(&s)?;
    assert!(echo_round(&c));
    let after = ip_counter(&s.node.ns, false, "ForwDatagrams")?;
    assert!(after - before >= 4, "forwarded: {}", after - before);
    Ok(())
}

#[test]
fn allowed_traffic_between_local_pods_is_delivered_past_the_node_stack() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = setup(true)?;
    tcp_echo_server(&s.node.pods[1].ns, 8080)?;
    tcp_echo_server(&s.node.pods[1].ns, 9090)?;
    let ifindex = b_ifindex(&s)?;
    register_macs(&mut s)?;
    assert_eq!(s.maps.local_pod(B), Some(ifindex));
    enforce_ingress(&mut s, ifindex)?;
    allow_a_to_b_8080(&mut s, 2)?;
    // (The pods resolve their gateway first.)
    assert!(tcp_connects(&s.node.pods[0].ns, B, 8080, 3000)?);

    let before = ip_counter(&s.node.ns, false, "ForwDatagrams")?;
    let c = open_echo(&s)?;
    for _ in 0..20 {
        assert!(echo_round(&c), "echo through the redirect");
    }
    drop(c);
    // B's ingress program still judges what is redirected to it.
    assert!(!tcp_connects(&s.node.pods[0].ns, B, 9090, 1000)?);
    let after = ip_counter(&s.node.ns, false, "ForwDatagrams")?;
    // 20 rounds and a handshake each way: at least 40 packets, none of
    // which the node forwarded.
    assert_eq!(after - before, 0, "datagrams the node forwarded");

    // The TTL is a router's: one less. B's listeners refuse segments
    // under their IP_MINTTL, so 64 admits none and 63 admits A's.
    for (port, min_ttl, connects) in [(8081u16, 64, false), (8082, 63, true)] {
        let mut key = allow_a_to_b_8080(&mut s, 2)?;
        key.dport_be = port.to_be();
        s.maps.set_policy(
            POLICY_PREFIX_FULL,
            key,
            PolicyValue {
                action: ACTION_ALLOW,
                cookie: 79,
            },
        )?;
        let _l = listener_min_hops(&s.node.pods[1].ns, B.into(), port, min_ttl)?;
        assert_eq!(
            tcp_connects(&s.node.pods[0].ns, B, port, 1000)?,
            connects,
            "port {port}, IP_MINTTL {min_ttl}"
        );
    }
    Ok(())
}

#[test]
fn answers_to_a_flow_the_node_translated_go_back_through_the_node() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // kube-proxy's NodePort, a hostPort: the node DNATs an address of its
    // own to B. A's connection to it reaches B through the stack; B's
    // answers must go back through the stack, whose conntrack turns their
    // source back into the address A connected to.
    const FRONT: Ipv4Addr = Ipv4Addr::new(10, 99, 9, 9);
    let mut s = setup(true)?;
    tcp_echo_server(&s.node.pods[1].ns, 8080)?;
    register_macs(&mut s)?;
    let ifindex = b_ifindex(&s)?;
    enforce_ingress(&mut s, ifindex)?;
    allow_a_to_b_8080(&mut s, 2)?;
    s.node
        .ns
        .ip(&["addr", "add", &format!("{FRONT}/32"), "dev", "lo"])?;
    node_dnat(&s.node.ns, FRONT.into(), 80, (B, 8080).into())?;
    let echoed = s.node.pods[0].ns.enter(|| -> Result<bool> {
        let c = std::net::TcpStream::connect_timeout(&(FRONT, 80).into(), Duration::from_secs(3))?;
        c.set_read_timeout(Some(Duration::from_millis(1500)))?;
        let echoed = (0..5).all(|_| echo_round(&c));
        // Closed before the count below: its FINs go through the node too.
        close_both_ways(&c)?;
        Ok(echoed)
    })??;
    assert!(echoed, "echo through the node's DNAT");
    std::thread::sleep(Duration::from_millis(200));
    // The direct flow is still delivered past the stack.
    let before = ip_counter(&s.node.ns, false, "ForwDatagrams")?;
    let c = open_echo(&s)?;
    assert!(echo_round(&c));
    assert_eq!(ip_counter(&s.node.ns, false, "ForwDatagrams")? - before, 0);
    Ok(())
}

#[test]
fn a_reloaded_datapath_rebuilds_its_local_index_from_the_endpoints() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = setup(true)?;
    register_macs(&mut s)?;
    let ifindex = b_ifindex(&s)?;
    assert_eq!(s.maps.local_pod(B), Some(ifindex));
    // A restarted agent takes the pinned maps: with `stack` it empties the
    // index, with `redirect` it writes it again from ENDPOINTS.
    for (mode, want) in [
        (LocalDelivery::Stack, None),
        (LocalDelivery::Redirect, Some(ifindex)),
    ] {
        let cfg = DatapathConfig {
            pins: s._pins.pins.clone(),
            local_delivery: mode,
            ..Default::default()
        };
        let maps = s
            .node
            .ns
            .enter(move || -> Result<Maps> { Ok(Datapath::load(&cfg)?.take_maps()?) })??;
        assert_eq!(maps.local_pod(B), want, "{mode:?}");
        assert_eq!(s.maps.local_pod(B), want, "the pinned map itself");
    }
    Ok(())
}
