//! The agent as an operator meets it, against real programs and packets:
//! trace agrees with what packets do, flow records name the deciding
//! policy, status and metrics tell the truth, a policy that cannot compile
//! is rejected without disturbing the others, a broken manifest keeps the
//! last good state, and audit mode passes would-be drops as AUDIT.
use std::net::Ipv4Addr;

use anyhow::Result;
use palisade_tests::{agent::*, *};

const GW: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 3);
const LABBOX: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 4);
const METRICS: &str = "127.0.0.1:19962";

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: lab, annotations: {palisade.dev/audit: "true"}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {containers: [{name: c, ports: [{name: api, containerPort: 8080}, {containerPort: 9090}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: box, namespace: lab, labels: {app: box}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
"#;

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{port: api}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: lab}
spec: {podSelector: {}, policyTypes: [Ingress]}
"#;

const BROKEN_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: shop}
spec:
  # Rejected policies still isolate what they select (fail closed); this one
  # selects a pod that is isolated anyway, so only its allow is lost.
  podSelector: {matchLabels: {app: server}}
  ingress:
    - from: [{ipBlock: {cidr: 10.0.0.0/33}}]
"#;

fn metric(text: &str, line_prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[test]
fn operator_view_matches_the_kernel() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new(
        "palisade-ops-",
        &[
            ("cluster.yaml", CLUSTER),
            ("policies.yaml", POLICIES),
            ("broken.yaml", BROKEN_POLICY),
        ],
    )?;
    let manifests = &scratch.manifests;

    let mut node = Node::new(GW)?;
    for ip in [CLIENT, SERVER, LABBOX] {
        node.add_pod(ip)?;
    }
    tcp_echo_server(&node.pods[1].ns, 8080)?;
    tcp_echo_server(&node.pods[1].ns, 9090)?;
    tcp_echo_server(&node.pods[2].ns, 80)?;
    let agent = scratch.agent(&node.ns, &["--metrics-addr", METRICS])?;
    agent.register("shop", "client", &node.pods[0])?;
    agent.register("shop", "server", &node.pods[1])?;
    agent.register("lab", "box", &node.pods[2])?;

    // Status: endpoints, enforcement, the rejected policy beside the others.
    let st = agent.status()?;
    assert_eq!(st.endpoints.len(), 3);
    let server = st.endpoints.iter().find(|e| e.pod == "server").unwrap();
    assert!(server.ingress_enforced && !server.egress_enforced);
    let broken = st.policies.iter().find(|p| p.name == "broken").unwrap();
    assert!(
        broken.rejected.as_deref().unwrap_or("").contains("cidr"),
        "{broken:?}"
    );
    assert!(st
        .policies
        .iter()
        .filter(|p| p.name != "broken")
        .all(|p| p.rejected.is_none()));
    let (ok, text) = agent.cli(&["status"])?;
    assert!(
        ok && text.contains("shop/server") && text.contains("REJECTED"),
        "{text}"
    );
    assert!(
        agent.log_text().contains("shop/broken rejected"),
        "the rejection is logged by name"
    );

    // Real packets.
    let (client, labbox) = (&node.pods[0].ns, &node.pods[2].ns);
    assert!(
        tcp_connects(client, SERVER, 8080, 2000)?,
        "named port api = 8080 allowed"
    );
    assert!(
        !tcp_connects(client, SERVER, 9090, 500)?,
        "9090 not allowed"
    );
    assert!(
        !tcp_connects(labbox, SERVER, 8080, 500)?,
        "box is not a client"
    );
    assert!(
        tcp_connects(client, LABBOX, 80, 2000)?,
        "lab is in audit mode"
    );

    // trace says the same, naming the policy.
    let (ok, out) = agent.cli(&[
        "trace",
        "--from",
        "shop/client",
        "--to",
        "shop/server",
        "--port",
        "8080/TCP",
    ])?;
    assert!(
        ok && out.contains("verdict: ALLOW") && out.contains("shop/server-ingress"),
        "{out}"
    );
    let (ok, out) = agent.cli(&[
        "trace",
        "--from",
        "shop/client",
        "--to",
        "shop/server",
        "--port",
        "9090",
    ])?;
    assert!(
        !ok && out.contains("verdict: DROP") && out.contains("no-policy-match"),
        "{out}"
    );
    assert!(
        out.contains("shop/server-ingress"),
        "the isolating policy is named: {out}"
    );
    let (ok, out) = agent.cli(&[
        "trace",
        "--from",
        "shop/client",
        "--to",
        "lab/box",
        "--port",
        "80",
    ])?;
    // Exit status 3: policy would deny (the packet passes only by audit).
    assert!(!ok && out.contains("verdict: AUDIT"), "{out}");

    // Flow records name pods and policies.
    let dropped = agent.wait_flow(|r| r.verdict == "DROP" && r.dst.port == Some(9090))?;
    assert_eq!(dropped.src.pod.as_deref(), Some("client"));
    assert_eq!(dropped.dst.namespace.as_deref(), Some("shop"));
    assert_eq!(dropped.drop_reason.as_deref(), Some("no-policy-match"));
    // Both isolate the server (a rejected policy still does: fail closed).
    assert_eq!(
        dropped.policies,
        vec!["shop/broken".to_string(), "shop/server-ingress".to_string()]
    );
    assert_eq!(dropped.direction, "ingress");
    let allow = agent.wait_flow(|r| {
        r.verdict == "ALLOW" && r.dst.port == Some(8080) && r.reason == "policy-allow"
    })?;
    assert_eq!(allow.policies, vec!["shop/server-ingress".to_string()]);
    assert_eq!(
        allow.src.labels.get("app").map(String::as_str),
        Some("client")
    );
    let audit = agent.wait_flow(|r| r.verdict == "AUDIT")?;
    assert_eq!(audit.dst.pod.as_deref(), Some("box"));
    assert_eq!(audit.policies, vec!["lab/deny-all".to_string()]);
    let (ok, out) = agent.cli(&["observe", "--verdict", "drop", "--port", "9090", "--json"])?;
    assert!(
        ok && out.lines().count() >= 1 && out.lines().all(|l| l.contains("\"DROP\"")),
        "{out}"
    );
    let (ok, out) = agent.cli(&["observe", "--namespace", "lab"])?;
    assert!(
        ok && out.contains("AUDIT") && !out.contains(":9090"),
        "{out}"
    );

    // Metrics and health.
    let m = http_get(&node.ns, METRICS, "/metrics")?;
    assert_eq!(metric(&m, "palisade_policies_rejected "), Some(1), "{m}");
    assert!(
        metric(&m, "palisade_drops_total{reason=\"no-policy-match\"}").unwrap_or(0) >= 1,
        "{m}"
    );
    assert!(
        metric(&m, "palisade_policy_compile_seconds_count").unwrap_or(0) >= 1,
        "{m}"
    );
    assert!(m.contains("palisade_map_capacity{map=\"policy\"}"), "{m}");
    assert!(http_get(&node.ns, METRICS, "/healthz")?.starts_with("HTTP/1.1 200"));
    assert!(http_get(&node.ns, METRICS, "/readyz")?.contains("ready"));

    // A manifest broken mid-edit keeps its last good contents in force.
    write_manifest(
        manifests,
        "policies.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: [",
    )?;
    agent.sync()?;
    assert!(
        !tcp_connects(client, SERVER, 9090, 500)?,
        "still enforced after a broken edit"
    );
    assert!(tcp_connects(client, SERVER, 8080, 2000)?);
    assert!(agent
        .status()?
        .policies
        .iter()
        .any(|p| p.name == "server-ingress"));
    let m = http_get(&node.ns, METRICS, "/metrics")?;
    assert!(
        metric(&m, "palisade_source_errors_total").unwrap_or(0) >= 1,
        "{m}"
    );

    // Deleting the policy files is a real change: the server opens up.
    std::fs::remove_file(manifests.join("policies.yaml"))?;
    std::fs::remove_file(manifests.join("broken.yaml"))?;
    agent.sync()?;
    assert!(
        tcp_connects(client, SERVER, 9090, 2000)?,
        "no policy selects the server any more"
    );
    drop(agent);
    drop(node);
    Ok(())
}

#[test]
fn xdp_prefilter_drops_deny_listed_sources_on_the_uplink() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new("palisade-xdp-", &[])?;
    let node = Node::new(GW)?;
    // node:up0 (10.95.0.1) <-> outside:eth0 (10.95.0.2 and 10.95.0.3)
    let outside = NetNs::new("pout")?;
    node.ns.ip(&[
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &outside.name,
    ])?;
    node.ns.ip(&["addr", "add", "10.95.0.1/24", "dev", "up0"])?;
    node.ns.ip(&["link", "set", "up0", "up"])?;
    outside.ip(&["addr", "add", "10.95.0.2/24", "dev", "eth0"])?;
    outside.ip(&["addr", "add", "10.95.0.3/24", "dev", "eth0"])?;
    outside.ip(&["link", "set", "eth0", "up"])?;
    let listener = node
        .ns
        .enter(|| std::net::TcpListener::bind("10.95.0.1:7000"))??;
    std::thread::spawn(move || for _ in listener.incoming() {});

    let agent = scratch.agent(
        &node.ns,
        &[
            "--metrics-addr",
            METRICS,
            "--xdp-uplink",
            "up0",
            "--xdp-deny",
            "10.95.0.3/32",
        ],
    )?;
    let from = |src: &'static str| outside.enter(move || socket_from(src))?;
    assert!(from("10.95.0.2")?, "an allowed source reaches the node");
    assert!(
        !from("10.95.0.3")?,
        "a deny-listed source is dropped at XDP"
    );
    let m = http_get(&node.ns, METRICS, "/metrics")?;
    assert!(
        metric(&m, "palisade_xdp_packets_total{outcome=\"xdp-denylist\"}").unwrap_or(0) >= 1,
        "{m}"
    );
    drop(agent);
    Ok(())
}

/// TCP connect to the node's uplink address from a given local source.
fn socket_from(src: &str) -> Result<bool> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket/bind/connect syscalls on a fresh fd we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        anyhow::ensure!(fd >= 0, "socket");
        let s = std::net::TcpStream::from_raw_fd(fd);
        let mut a: libc::sockaddr_in = std::mem::zeroed();
        a.sin_family = libc::AF_INET as u16;
        a.sin_addr.s_addr = u32::from_ne_bytes(src.parse::<Ipv4Addr>()?.octets());
        anyhow::ensure!(
            libc::bind(
                fd,
                &a as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&a) as u32
            ) == 0,
            "bind"
        );
        s.set_nonblocking(true)?;
        let mut d: libc::sockaddr_in = std::mem::zeroed();
        d.sin_family = libc::AF_INET as u16;
        d.sin_port = 7000u16.to_be();
        d.sin_addr.s_addr = u32::from_ne_bytes([10, 95, 0, 1]);
        libc::connect(
            fd,
            &d as *const _ as *const libc::sockaddr,
            std::mem::size_of_val(&d) as u32,
        );
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let n = libc::poll(&mut p, 1, 700);
        Ok(n > 0 && s.take_error()?.is_none() && s.peer_addr().is_ok())
    }
}

#[test]
fn a_full_policy_map_is_an_error_and_a_metric_never_a_silent_drop() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new("palisade-full-", &[("cluster.yaml", CLUSTER)])?;
    let manifests = &scratch.manifests;
    let mut node = Node::new(GW)?;
    node.add_pod(SERVER)?;
    let agent = scratch.agent(
        &node.ns,
        &["--metrics-addr", METRICS, "--policy-map-entries", "2"],
    )?;
    agent.register("shop", "server", &node.pods[0])?;
    // Three ports from one peer: three policy entries for a map of two.
    write_manifest(
        manifests,
        "policy.yaml",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: three-ports, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{port: 81}, {port: 82}, {port: 83}]
"#,
    )?;
    let err = agent
        .sync()
        .expect_err("a sync that cannot write every entry must fail");
    assert!(format!("{err:#}").contains("POLICY is full"), "{err:#}");
    let m = http_get(&node.ns, METRICS, "/metrics")?;
    assert_eq!(
        metric(&m, "palisade_map_full_errors_total{map=\"POLICY\"}"),
        Some(1),
        "{m}"
    );
    assert!(agent.log_text().contains("POLICY is full"), "logged");
    // What did fit is what the kernel holds, and status says so.
    let st = agent.status()?;
    let policy = st.maps.iter().find(|m| m.name == "policy").unwrap();
    assert_eq!((policy.entries, policy.max_entries), (2, 2), "{st:?}");
    drop(agent);
    Ok(())
}
