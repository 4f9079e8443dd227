//! Several nodes, through the incremental engine: this node's addresses
//! (and the pods' gateway) are `host`, other nodes' are `remote-node`,
//! which is neither host nor a pod; remote pods are peers once their
//! address is known; a node that leaves takes its addresses with it.
use std::{net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_common::{reason, DIR_INGRESS, IDENTITY_HOST, IDENTITY_REMOTE_NODE};
use palisade_dataplane::{
    packet::{Packet, TCP_FLAG_SYN},
    reference::Evaluator,
};

use super::Engine;
use crate::{
    change::Change,
    model::{LocalEndpoint, Namespace, Node, ObjectKey, Pod},
};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

const WEB: &str = "10.0.0.10";
const GATEWAY: &str = "10.0.0.1";
const OWN_NODE: &str = "192.168.0.1";
const OTHER_NODE: &str = "192.168.0.2";
const REMOTE_POD: &str = "10.0.1.7";

fn node(name: &str, addr: &str, cidr: &str) -> Node {
    Node {
        name: name.into(),
        labels: [("kubernetes.io/hostname".to_string(), name.to_string())].into(),
        addresses: vec![ip(addr)],
        pod_cidrs: vec![cidr.parse().unwrap()],
        ..Default::default()
    }
}

fn pod(ns: &str, name: &str, app: &str, addr: Option<&str>) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ip: addr.map(ip),
        ipv6: None,
        host_network: false,
        ports: Vec::new(),
    }
}

fn policy(e: &mut Engine, name: &str, ingress: &str) {
    let y = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: a}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from: {ingress}\n");
    let np: NetworkPolicy = serde_yaml::from_str(&y).unwrap();
    e.apply(Change::Policy(ObjectKey::new("a", name), Arc::new(np)));
}

/// The reason the datapath gives a TCP SYN from `from` to the web pod.
fn ingress(e: &Engine, from: &str) -> u8 {
    let p = Packet::tcp(ip(from), 40000, ip(WEB), 80, TCP_FLAG_SYN);
    Evaluator::new(e.desired())
        .evaluate(1, DIR_INGRESS, &p)
        .reason
}

/// Node n1 (this one) with a local pod a/web behind an ingress policy
/// that allows any pod; node n2 with a pod b/client.
fn cluster() -> Engine {
    let mut e = Engine::new(false, Vec::new());
    e.set_node_name(Some("n1".into()));
    for n in ["a", "b"] {
        e.apply(Change::Namespace(Namespace {
            name: n.into(),
            labels: [("kubernetes.io/metadata.name".to_string(), n.to_string())].into(),
            audit: false,
        }));
    }
    e.apply(Change::Node(node("n1", OWN_NODE, "10.0.0.0/24")));
    e.apply(Change::Node(node("n2", OTHER_NODE, "10.0.1.0/24")));
    e.apply(Change::Pod(pod("a", "web", "web", Some(WEB)).into()));
    e.apply(Change::Pod(
        pod("b", "client", "client", Some(REMOTE_POD)).into(),
    ));
    e.add_endpoint(LocalEndpoint {
        key: ObjectKey::new("a", "web"),
        endpoint_id: 1,
        ifindex: 1,
        host_ifname: "veth1".into(),
        ipv4: ip(WEB),
        ipv6: None,
        container_id: "c1".into(),
        mac: [0; 6],
    });
    policy(
        &mut e,
        "any-pod",
        "[{podSelector: {}, namespaceSelector: {}}]",
    );
    e
}

#[test]
fn this_nodes_addresses_are_host_and_other_nodes_are_remote_node() {
    let e = cluster();
    let ipc = |a: &str| e.desired().ipcache[&(ip(a), 32)];
    assert_eq!(ipc(OWN_NODE).identity, IDENTITY_HOST);
    assert_eq!(ipc(OTHER_NODE).identity, IDENTITY_REMOTE_NODE);
    assert_eq!(ingress(&e, OWN_NODE), reason::HOST);
    // Not host, and not a pod: the any-pod rule does not admit it.
    assert_eq!(ingress(&e, OTHER_NODE), reason::NO_POLICY_MATCH);
    // A pod of the other node is a peer from its address.
    assert_eq!(ingress(&e, REMOTE_POD), reason::POLICY_ALLOW);
    assert_eq!(e.view().remote_node_at(ip(OTHER_NODE)).unwrap().name, "n2");
    assert!(e.view().remote_node_at(ip(OWN_NODE)).is_none());
}

#[test]
fn flow_records_name_this_node_and_a_remote_node_peer() {
    use palisade_common::{FlowEvent, PROTO_TCP, VERDICT_DROP};
    let e = cluster();
    let v = e.view();
    let ev = FlowEvent {
        saddr: u32::from_ne_bytes(ip(OTHER_NODE).octets()),
        daddr: u32::from_ne_bytes(ip(WEB).octets()),
        src_identity: IDENTITY_REMOTE_NODE,
        endpoint_id: 1,
        direction: DIR_INGRESS,
        protocol: PROTO_TCP,
        verdict: VERDICT_DROP,
        reason: reason::NO_POLICY_MATCH,
        ts_ns: 0,
        ifindex: 1,
        sport_be: 40000u16.to_be(),
        dport_be: 80u16.to_be(),
        dst_identity: 0,
        cookie: 0,
        service_id: 0,
        suppressed_drops: 0,
        suppressed_flows: 0,
        suppressed_reasons: 0,
        family: 4,
        _pad: 0,
        saddr6: [0; 4],
        daddr6: [0; 4],
    };
    let r = crate::flowlog::record(&*v, &ev);
    assert_eq!(r.node.as_deref(), Some("n1"));
    assert_eq!(r.src.kind, "remote-node");
    assert_eq!(r.src.node.as_deref(), Some("n2"));
    assert_eq!(r.endpoint, "a/web");
    assert_eq!(r.dst.node.as_deref(), Some("n1"), "a local pod: this node");
    // A pod of the other node is on it by the node's pod range (what
    // `observe --from-node n2` selects).
    let from_pod = FlowEvent {
        saddr: u32::from_ne_bytes(ip(REMOTE_POD).octets()),
        src_identity: 0,
        ..ev
    };
    let r = crate::flowlog::record(&*v, &from_pod);
    assert_eq!(
        (r.src.kind.as_str(), r.src.node.as_deref()),
        ("pod", Some("n2"))
    );
}

#[test]
fn another_node_is_matched_only_by_an_ipblock_containing_it() {
    let mut e = cluster();
    policy(&mut e, "nodes", "[{ipBlock: {cidr: 192.168.0.0/24}}]");
    assert_eq!(ingress(&e, OTHER_NODE), reason::POLICY_ALLOW);
    let v = e.desired().ipcache[&(ip(OTHER_NODE), 32)];
    assert_eq!(v.identity, IDENTITY_REMOTE_NODE, "still remote-node");
    policy(&mut e, "nodes", "[{ipBlock: {cidr: 192.168.0.1/32}}]");
    assert_eq!(ingress(&e, OTHER_NODE), reason::NO_POLICY_MATCH);
}

#[test]
fn the_gateway_the_host_veths_carry_is_host() {
    // kubelet probes leave the node from the gateway address.
    let mut e = cluster();
    assert_eq!(ingress(&e, GATEWAY), reason::NO_POLICY_MATCH);
    e.set_gateway_ips(vec![ip(GATEWAY)]);
    assert_eq!(ingress(&e, GATEWAY), reason::HOST);
    e.set_gateway_ips(Vec::new());
    assert_eq!(ingress(&e, GATEWAY), reason::NO_POLICY_MATCH);
}

#[test]
fn a_node_that_leaves_takes_its_addresses_and_a_moved_pod_follows_its_address() {
    let mut e = cluster();
    e.apply(Change::NodeDeleted("n2".into()));
    assert!(!e.desired().ipcache.contains_key(&(ip(OTHER_NODE), 32)));
    assert_eq!(ingress(&e, OTHER_NODE), reason::NO_POLICY_MATCH);
    assert!(e.view().remote_node_at(ip(OTHER_NODE)).is_none());

    // The client pod moves: deleted, recreated on another node without an
    // address yet (not a peer of anything), then with its new address.
    e.apply(Change::PodDeleted(ObjectKey::new("b", "client")));
    assert_eq!(ingress(&e, REMOTE_POD), reason::NO_POLICY_MATCH);
    e.apply(Change::Pod(pod("b", "client", "client", None).into()));
    assert_eq!(ingress(&e, REMOTE_POD), reason::NO_POLICY_MATCH);
    e.apply(Change::Pod(
        pod("b", "client", "client", Some("10.0.2.9")).into(),
    ));
    assert_eq!(ingress(&e, "10.0.2.9"), reason::POLICY_ALLOW);
    assert_eq!(ingress(&e, REMOTE_POD), reason::NO_POLICY_MATCH);
}

#[test]
fn a_pod_claiming_a_node_address_does_not_make_it_a_pod() {
    let mut e = cluster();
    e.apply(Change::Pod(
        pod("b", "liar", "client", Some(OTHER_NODE)).into(),
    ));
    assert_eq!(
        e.desired().ipcache[&(ip(OTHER_NODE), 32)].identity,
        IDENTITY_REMOTE_NODE
    );
    assert_eq!(ingress(&e, OTHER_NODE), reason::NO_POLICY_MATCH);
}

// -- IPv6 ---------------------------------------------------------------

const WEB6: &str = "fd00:a::10";

/// The reason the datapath gives an IPv6 TCP SYN from `from` to the web
/// pod (given the IPv6 address `WEB6`).
fn ingress6(e: &Engine, from: &str) -> u8 {
    let p = Packet::ipv6_tcp(
        from.parse().unwrap(),
        40000,
        WEB6.parse().unwrap(),
        80,
        TCP_FLAG_SYN,
    );
    Evaluator::new(e.desired())
        .evaluate(1, DIR_INGRESS, &p)
        .reason
}

/// Nodes' IPv6 addresses and the IPv6 gateways are `host` / `remote-node`
/// as their IPv4 ones are: the node's own (kubelet probes over IPv6) pass,
/// another node's is no pod, a pod claiming one does not make it a pod.
#[test]
fn nodes_ipv6_addresses_and_ipv6_gateways_are_host_or_remote_node() {
    let mut e = cluster();
    e.add_endpoint(LocalEndpoint {
        key: ObjectKey::new("a", "web"),
        endpoint_id: 1,
        ifindex: 1,
        host_ifname: "veth1".into(),
        ipv4: ip(WEB),
        ipv6: Some(WEB6.parse().unwrap()),
        container_id: "c1".into(),
        mac: [0; 6],
    });
    let with6 = |name: &str, v4: &str, v6: &str, cidr: &str| Node {
        addresses6: vec![v6.parse().unwrap()],
        ..node(name, v4, cidr)
    };
    e.apply(Change::Node(with6(
        "n1",
        OWN_NODE,
        "fd00:1::1",
        "10.0.0.0/24",
    )));
    e.apply(Change::Node(with6(
        "n2",
        OTHER_NODE,
        "fd00:1::2",
        "10.0.1.0/24",
    )));
    let mut liar = pod("b", "liar", "client", None);
    liar.ipv6 = Some("fd00:1::2".parse().unwrap());
    e.apply(Change::Pod(liar.into()));
    let ipc6 = |e: &Engine, a: &str| {
        e.desired()
            .ipcache6
            .get(&(a.parse().unwrap(), 128))
            .copied()
    };
    assert_eq!(ipc6(&e, "fd00:1::1").unwrap().identity, IDENTITY_HOST);
    assert_eq!(
        ipc6(&e, "fd00:1::2").unwrap().identity,
        IDENTITY_REMOTE_NODE
    );
    assert_eq!(ingress6(&e, "fd00:1::1"), reason::HOST);
    assert_eq!(ingress6(&e, "fd00:1::2"), reason::NO_POLICY_MATCH);
    assert!(e
        .view()
        .pods_by_ip6
        .get(&"fd00:1::2".parse().unwrap())
        .is_none());

    // The IPv6 gateway the host veths carry, while they carry it.
    assert_eq!(ingress6(&e, "fd00:a::1"), reason::NO_POLICY_MATCH);
    e.set_gateway_ips6(vec!["fd00:a::1".parse().unwrap()]);
    assert_eq!(ingress6(&e, "fd00:a::1"), reason::HOST);
    e.set_gateway_ips6(Vec::new());
    assert_eq!(ingress6(&e, "fd00:a::1"), reason::NO_POLICY_MATCH);

    // A configured IPv6 address (`--host-ip`) is host too.
    let e2 = Engine::new(false, Vec::new()).with_host_ips6(vec!["fd00:7::7".parse().unwrap()]);
    assert_eq!(ipc6(&e2, "fd00:7::7").unwrap().identity, IDENTITY_HOST);

    // A node that leaves takes its IPv6 address with it.
    e.apply(Change::NodeDeleted("n2".into()));
    assert_eq!(
        ipc6(&e, "fd00:1::2").map(|v| v.identity),
        Some(e.view().pods_by_ip6[&"fd00:1::2".parse().unwrap()].1)
    );
}
