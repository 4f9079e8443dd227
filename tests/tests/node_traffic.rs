//! Traffic between a pod and nodes, on a real kernel: the node's own
//! sources towards its pods (the gateway every host veth carries, which is
//! what kubelet probes leave from, and its Node addresses) are `host`, so
//! an ingress-isolated pod still answers its probes; another node's
//! address is `remote-node`, not `host`, and is dropped like any peer no
//! rule admits.
use std::net::Ipv4Addr;

use anyhow::Result;
use palisade_tests::{agent::*, *};

const GW: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 3);
const OWN_NODE: &str = "192.0.2.61";
const OTHER_NODE: &str = "192.0.2.62";

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: probes}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: probes, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: probes, labels: {app: server}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.96.9.0/24}
status: {addresses: [{type: InternalIP, address: 192.0.2.61}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
spec: {podCIDR: 10.96.10.0/24}
status: {addresses: [{type: InternalIP, address: 192.0.2.62}]}
"#;

/// The server admits no one: every pod peer is dropped at its ingress.
const ISOLATE_SERVER: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: isolate, namespace: probes}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
"#;

#[test]
fn probes_from_the_own_node_pass_and_another_nodes_address_is_not_host() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new(
        "palisade-nodetraffic-",
        &[("objects.yaml", OBJECTS), ("policy.yaml", ISOLATE_SERVER)],
    )?;
    let mut node = Node::new(GW)?;
    node.add_pod(CLIENT)?;
    node.add_pod(SERVER)?;
    tcp_echo_server(&node.pods[1].ns, 8080)?;
    // Both Node addresses exist in this node's namespace only so that a
    // connection can leave from each (the route's preferred source).
    for a in [OWN_NODE, OTHER_NODE] {
        node.ns
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
    }
    let agent = scratch.agent(&node.ns, &["--metrics-addr", "off", "--node-name", "n1"])?;
    agent.register("probes", "client", &node.pods[0])?;
    agent.register("probes", "server", &node.pods[1])?;

    assert!(
        !tcp_connects(&node.pods[0].ns, SERVER, 8080, 300)?,
        "the server is isolated from pods"
    );
    // From the node: the source is the gateway the host veth carries.
    assert!(
        tcp_connects(&node.ns, SERVER, 8080, 2000)?,
        "a kubelet probe from the gateway address reaches an isolated pod:\n{}",
        agent.log_text()
    );
    let server_if = node.pods[1].host_if.clone();
    let from = |src: &str| -> Result<bool> {
        node.ns.ip(&[
            "route",
            "replace",
            &format!("{SERVER}/32"),
            "dev",
            &server_if,
            "src",
            src,
        ])?;
        tcp_connects(&node.ns, SERVER, 8080, 500)
    };
    assert!(from(OWN_NODE)?, "this node's Node address is host");
    assert!(
        !from(OTHER_NODE)?,
        "another node's address is remote-node, not host"
    );
    drop(agent);
    Ok(())
}
