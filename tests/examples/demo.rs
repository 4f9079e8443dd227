//! `cargo xtask demo` (datapath stage): a node namespace with two pods,
//! palisade's programs on their veths, and a live view of what passes and
//! what is dropped, with the verdict events that explain each.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use palisade_common::{
    reason, EndpointInfo, FlowEvent, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW,
    DIR_INGRESS, EP_INGRESS_ENFORCED, IDENTITY_WORLD, POLICY_PREFIX_FULL, PROTO_TCP,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DROP,
};
use palisade_dataplane::{events::EventReader, maps::{be, from_be}, Datapath, DatapathConfig};
use palisade_tests::*;

const GW: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 3);

fn show(e: &FlowEvent) {
    let verdict = match e.verdict {
        VERDICT_ALLOW => "ALLOW",
        VERDICT_DROP => "DROP",
        VERDICT_AUDIT => "AUDIT",
        _ => "?",
    };
    println!(
        "    event: {verdict:<5} {}:{} -> {}:{} proto {} reason={} identities {}->{} cookie={}",
        from_be(e.saddr),
        u16::from_be(e.sport_be),
        from_be(e.daddr),
        u16::from_be(e.dport_be),
        e.protocol,
        reason::name(e.reason),
        e.src_identity,
        e.dst_identity,
        e.cookie
    );
}

fn probe(node: &Node, events: &mut EventReader, port: u16) -> Result<()> {
    let ok = tcp_connects(&node.pods[0].ns, SERVER, port, 1000)?;
    println!("  client -> server:{port}  {}", if ok { "CONNECTED" } else { "BLOCKED" });
    if let Some(e) = events.wait_for(Duration::from_secs(2), |e| u16::from_be(e.dport_be) == port) {
        show(&e);
    }
    events.drain();
    Ok(())
}

fn main() -> Result<()> {
    if !require_root() {
        anyhow::bail!("the demo needs root (network namespaces, BPF)");
    }
    let pins = PinRoot::new()?;
    let mut node = Node::new(GW)?;
    node.add_pod(CLIENT)?;
    node.add_pod(SERVER)?;
    tcp_echo_server(&node.pods[1].ns, 8080)?;
    tcp_echo_server(&node.pods[1].ns, 9090)?;
    println!("node {} with pods client {CLIENT} and server {SERVER} (serving 8080, 9090)", node.ns.name);

    let cfg = DatapathConfig { pins: pins.pins.clone(), ..Default::default() };
    let ifname = node.pods[1].host_if.clone();
    let (_dp, mut maps, ifindex) = node.ns.enter(move || -> Result<_> {
        let mut dp = Datapath::load(&cfg)?;
        let mut maps = dp.take_maps()?;
        let ifindex = palisade_dataplane::loader::ifindex(&ifname)?;
        let info = EndpointInfo { endpoint_id: 1, identity: 1002, ipv4: be(SERVER), flags: 0 };
        maps.upsert_endpoint(ifindex, info)?;
        dp.attach_pod(&ifname)?;
        Ok((dp, maps, ifindex))
    })??;
    maps.set_ipcache(Ipv4Addr::UNSPECIFIED, 0, IpcacheValue { identity: IDENTITY_WORLD, cidr_identity: IDENTITY_WORLD })?;
    maps.set_ipcache(CLIENT, 32, IpcacheValue { identity: 1001, cidr_identity: IDENTITY_WORLD })?;
    let mut events = EventReader::new(maps.events.take().expect("events map"));

    println!("\n1. programs attached, server not isolated:");
    probe(&node, &mut events, 8080)?;
    probe(&node, &mut events, 9090)?;

    println!("\n2. server ingress isolated (default deny):");
    let mut info = maps.endpoint(ifindex).expect("registered");
    info.flags |= EP_INGRESS_ENFORCED;
    maps.upsert_endpoint(ifindex, info)?;
    probe(&node, &mut events, 8080)?;
    probe(&node, &mut events, 9090)?;

    println!("\n3. allow client identity 1001 -> server TCP/8080 (cookie 1):");
    let key = PolicyKey { endpoint_id: 1, peer_identity: 1001, direction: DIR_INGRESS, protocol: PROTO_TCP, dport_be: 8080u16.to_be() };
    maps.set_policy(POLICY_PREFIX_FULL, key, PolicyValue { action: ACTION_ALLOW, cookie: 1 })?;
    probe(&node, &mut events, 8080)?;
    probe(&node, &mut events, 9090)?;

    println!("\ncounters: {:?}", maps.counters()?.named());
    println!("cleaning up");
    Ok(())
}
