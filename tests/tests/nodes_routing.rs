//! Several nodes for real: node namespaces on a fabric bridge, an agent and
//! the CNI plugin per node, every agent on the same manifests (Node objects
//! included). The agents route between nodes themselves (native routes or
//! their VXLAN device); policy is enforced at both ends, and the receiving
//! node sees the real source pod.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use palisade_tests::{
    agent::target_bin,
    conformance::{
        case::{Case, Protocol},
        cluster::{Cluster, Tools},
        family::{Family, IpFamily},
        flows::{Flow, Tail},
        probe::{self, Job},
        runner::{Live, Options},
        signal::RunPins,
    },
};

const CASE: &str = r#"
name: nodes
cluster:
  nodes: [{name: n1}, {name: n2}, {name: n3}]
  namespaces: {x: {}}
  pods:
    - {namespace: x, name: a, node: n1, labels: {pod: a}, ports: [{port: 80}, {port: 81}]}
    - {namespace: x, name: c, node: n1, labels: {pod: c}, ports: [{port: 80}]}
    - {namespace: x, name: b, node: n2, labels: {pod: b}, ports: [{port: 80}, {port: 81}]}
steps:
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: b-from-a, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: b}}
          policyTypes: [Ingress]
          ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a-to-b-80, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Egress, Ingress]
          egress: [{to: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}]}]
          ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
"#;

/// The tests share this process's pin parent (RunPins is per PID): one at
/// a time, so one's cleanup never unpins the other's programs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tools() -> Tools {
    Tools {
        agent: target_bin("palisade-agent"),
        cni: target_bin("palisade"),
    }
}

fn case(text: &str) -> Case {
    Case::parse(text, Path::new("nodes.yaml")).expect("the test's case parses")
}

/// One TCP connection attempt from inside pod `src`'s namespace (a probe
/// thread enters it; never from the test's own namespace).
fn connects(live: &Live, src: &str, dst_ip: impl Into<IpAddr>, port: u16) -> bool {
    let dst_ip = dst_ip.into();
    let job = Job {
        src_netns: live.cluster.pod(src).expect("pod").netns_path(),
        dst: dst_ip,
        port,
        protocol: Protocol::Tcp,
        resolve: None,
    };
    assert!(
        job.src_netns.starts_with("/run/netns"),
        "{src} has a namespace"
    );
    probe::run_all(&[job], 1).expect("probe ran")[0]
}

fn node_ns(c: &Cluster, i: usize) -> String {
    c.node_ns(i).expect("node").name.clone()
}

/// `ip route show proto 0xb0` in node `i`: the agent's routes.
fn agent_routes(c: &Cluster, i: usize) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", &node_ns(c, i), "route", "show", "proto", "0xb0"])
        .output()
        .expect("ip route");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Node records until one of each `(src, dst, port)` is there (or 3 s).
fn records(tail: &mut Tail, want: &[(Ipv4Addr, Ipv4Addr, u16)]) -> Vec<Flow> {
    tail.gather(Duration::from_secs(3), |fs| {
        want.iter()
            .all(|(s, d, p)| fs.iter().any(|f| f.is(*s, *d, *p, "TCP")))
    })
}

fn expect(cond: bool, what: &str, live: &Live) -> Result<()> {
    if !cond {
        let mut flows = String::new();
        for f in live.cluster.flow_logs() {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(6)..] {
                flows.push_str(&format!("    {l}\n"));
            }
        }
        bail!(
            "{what}\nagent logs:\n{}\nlast flow records:\n{flows}",
            live.cluster.agent_log_tail(40)
        );
    }
    Ok(())
}

fn setup<'a>(c: &'a Case, pins: &RunPins, routing: &str) -> Result<Live<'a>> {
    setup_family(c, pins, routing, IpFamily::Ipv4)
}

fn setup_family<'a>(
    c: &'a Case,
    pins: &RunPins,
    routing: &str,
    ip_family: IpFamily,
) -> Result<Live<'a>> {
    palisade_tests::ensure_bpffs()?;
    let opts = Options {
        routing: routing.into(),
        ip_family,
        ..Options::default()
    };
    let mut live = Live::start_on(c, &tools(), &pins.0, None, &opts)?;
    let notes = live.apply(&c.steps[0])?;
    if !notes.is_empty() {
        bail!("{notes:?}");
    }
    let st = live.cluster.status_on(0)?;
    if st.policies.len() != 2 {
        bail!("n1 has policies {:?}", st.policies);
    }
    Ok(live)
}

/// Both ways across nodes, policy at both ends: the source node's egress
/// and the destination node's ingress, which names the real source pod.
fn policy_at_both_ends(live: &Live) -> Result<()> {
    let (a, b, c) = (live.ip("x/a"), live.ip("x/b"), live.ip("x/c"));
    let logs = live.cluster.flow_logs();
    let mut n1 = Tail::new(&logs[0]);
    let mut n2 = Tail::new(&logs[1]);
    expect(
        connects(live, "x/a", b, 80),
        "a (n1) -> b (n2):80 must connect",
        live,
    )?;
    expect(
        connects(live, "x/b", a, 80),
        "b (n2) -> a (n1):80 must connect",
        live,
    )?;
    expect(
        !connects(live, "x/a", b, 81),
        "a -> b:81: a's egress (n1) denies",
        live,
    )?;
    expect(
        !connects(live, "x/c", b, 80),
        "c -> b:80: b's ingress (n2) denies",
        live,
    )?;
    expect(
        connects(live, "x/b", c, 80),
        "b -> c:80 (no policy) must connect",
        live,
    )?;

    let at_n2 = records(&mut n2, &[(a, b, 80), (c, b, 80)]);
    let at_b: Vec<&Flow> = at_n2.iter().filter(|f| f.is(a, b, 80, "TCP")).collect();
    expect(
        at_b.iter()
            .any(|f| f.verdict == "ALLOW" && f.direction == "ingress" && f.src.who() == "x/a"),
        &format!("n2 admits a -> b at b's ingress, naming pod x/a as the source: {at_b:?}"),
        live,
    )?;
    let denied_c: Vec<&Flow> = at_n2.iter().filter(|f| f.is(c, b, 80, "TCP")).collect();
    expect(
        denied_c
            .iter()
            .any(|f| f.verdict == "DROP" && f.direction == "ingress" && f.src.who() == "x/c"),
        &format!("n2 drops c -> b at b's ingress, naming pod x/c: {denied_c:?}"),
        live,
    )?;
    let denied_81: Vec<Flow> = records(&mut n1, &[(a, b, 81)])
        .into_iter()
        .filter(|f| f.is(a, b, 81, "TCP"))
        .collect();
    expect(
        denied_81
            .iter()
            .any(|f| f.verdict == "DROP" && f.direction == "egress" && f.dst.who() == "x/b"),
        &format!("n1 drops a -> b:81 at a's egress, naming pod x/b: {denied_81:?}"),
        live,
    )?;
    Ok(())
}

#[test]
fn native_routing_moves_and_node_removal() -> Result<()> {
    if !palisade_tests::require_root() {
        return Ok(());
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = case(CASE);
    let pins = RunPins::create()?;
    let mut live = setup(&c, &pins, "native")?;
    // Every agent routes the two other nodes' ranges via their addresses.
    let r1 = agent_routes(&live.cluster, 0);
    for want in [
        "10.213.1.0/24 via 10.212.0.2",
        "10.213.2.0/24 via 10.212.0.3",
    ] {
        expect(r1.contains(want), &format!("n1 routes {want}: {r1}"), &live)?;
    }
    policy_at_both_ends(&live)?;

    // A pod the agent has not heard of is `world`: d (n3, label pod=a, so
    // b's ingress would admit it) has an address but no status yet.
    let d_spec = c.pod("x/a").expect("a").clone();
    let d_spec = palisade_tests::conformance::case::PodSpec {
        name: "d".into(),
        node: Some("n3".into()),
        ..d_spec
    };
    live.cluster.placement.insert("x/d".into(), 2);
    live.cluster.write_pod(&d_spec, &d_spec.labels, None)?;
    let d_ip = live.cluster.add_pod_on(2, "x", "d")?.ip;
    live.cluster.sync()?;
    let b = live.ip("x/b");
    expect(
        !connects(&live, "x/d", b, 80),
        "d (n3) -> b before its address is known: world, denied",
        &live,
    )?;
    live.cluster
        .write_pod(&d_spec, &d_spec.labels, Some(d_ip))?;
    live.cluster.sync()?;
    expect(
        connects(&live, "x/d", b, 80),
        "d (n3) -> b once the source reports its address (label pod=a)",
        &live,
    )?;

    // Moving: a leaves n1 (CNI DEL, manifest gone) and comes back on n3
    // with a new address; b's ingress follows the new address.
    let old_a = live.ip("x/a");
    let a_spec = c.pod("x/a").expect("a").clone();
    remove_pod(&mut live.cluster, "x/a")?;
    live.cluster.placement.insert("x/a".into(), 2);
    let new_a = live.cluster.add_pod_on(2, "x", "a")?.ip;
    expect(new_a != old_a, "a new address on n3", &live)?;
    live.cluster
        .write_pod(&a_spec, &a_spec.labels, Some(new_a))?;
    live.cluster.sync()?;
    live.cluster
        .serve("x/a", vec![(80, Protocol::Tcp), (81, Protocol::Tcp)])?;
    live.addresses.pods.insert("x/a".into(), new_a);
    expect(
        connects(&live, "x/a", b, 80),
        "a (now on n3) -> b:80",
        &live,
    )?;
    expect(connects(&live, "x/b", new_a, 80), "b -> a (n3):80", &live)?;
    expect(
        !connects(&live, "x/a", b, 81),
        "a (n3) -> b:81 still denied at a's egress",
        &live,
    )?;
    let st = live.cluster.status_on(1)?;
    let peers = |n: &str| {
        st.nodes
            .iter()
            .find(|x| x.name == n)
            .map(|x| x.pods.clone())
            .unwrap_or_default()
    };
    expect(
        peers("n3").contains(&format!("x/a {new_a}"))
            && !peers("n1").iter().any(|p| p.starts_with("x/a ")),
        &format!("n2's status lists a under n3 only: {:?}", st.nodes),
        &live,
    )?;

    // n3 leaves: its pods go, then its Node object; the other agents drop
    // its route and its peers.
    remove_pod(&mut live.cluster, "x/a")?;
    remove_pod(&mut live.cluster, "x/d")?;
    std::fs::remove_file(live.cluster.manifests().join("node_n3.yaml"))?;
    live.cluster.sync()?;
    for i in 0..2 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = agent_routes(&live.cluster, i);
            let st = live.cluster.status_on(i)?;
            let gone = !r.contains("10.213.2.0/24")
                && !st.nodes.iter().any(|n| n.name == "n3")
                && st.routing.as_ref().is_some_and(|r| r.routes.len() == 1);
            if gone {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("node {i}: n3's route or peers remain: {r}\n{:?}", st.nodes);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The rest of the cluster is untouched.
    let (c_ip, b) = (live.ip("x/c"), live.ip("x/b"));
    expect(
        connects(&live, "x/b", c_ip, 80),
        "b -> c after n3 left",
        &live,
    )?;
    expect(
        !connects(&live, "x/c", b, 80),
        "c -> b still denied after n3 left",
        &live,
    )?;
    let errs = live.cluster.teardown();
    assert!(errs.is_empty(), "cleanup: {errs:?}");
    Ok(())
}

/// CNI DEL of a pod and its manifest removed, as when it is deleted.
fn remove_pod(c: &mut Cluster, key: &str) -> Result<()> {
    c.remove_pod(key)
        .with_context(|| format!("removing pod {key}"))
}

#[test]
fn vxlan_overlay_with_policy_at_both_ends() -> Result<()> {
    if !palisade_tests::require_root() {
        return Ok(());
    }
    let text = CASE.replace(
        "nodes: [{name: n1}, {name: n2}, {name: n3}]",
        "nodes: [{name: n1}, {name: n2}]",
    );
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = case(&text);
    let pins = RunPins::create()?;
    let live = setup(&c, &pins, "vxlan")?;
    let ns1 = node_ns(&live.cluster, 0);
    // The overlay: the device, a route through it, the neighbour and the
    // forwarding entry for n2.
    let run = |args: &[&str]| -> String {
        let out = std::process::Command::new("ip")
            .args(["-n", &ns1])
            .args(args)
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let link = run(&["-d", "link", "show", "palisade.vx"]);
    expect(
        link.contains("vxlan id") && link.contains("local 10.212.0.1"),
        &format!("device: {link}"),
        &live,
    )?;
    let route = run(&["route", "show", "proto", "0xb0"]);
    expect(
        route.contains("10.213.1.0/24 via 10.213.1.0 dev palisade.vx"),
        &format!("route: {route}"),
        &live,
    )?;
    let out = std::process::Command::new("bridge")
        .args(["-n", &ns1, "fdb", "show", "dev", "palisade.vx"])
        .output()?;
    let fdb = String::from_utf8_lossy(&out.stdout);
    expect(
        fdb.contains("0a:50:0a:d4:00:02 dst 10.212.0.2"),
        &format!("fdb: {fdb}"),
        &live,
    )?;
    policy_at_both_ends(&live)?;
    // The packets really crossed the overlay: its counters moved.
    let out = std::process::Command::new("ip")
        .args(["-n", &ns1, "-j", "-s", "link", "show", "palisade.vx"])
        .output()?;
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let tx = j[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0);
    let rx = j[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or(0);
    expect(
        tx > 0 && rx > 0,
        &format!("vxlan counters tx {tx} rx {rx}"),
        &live,
    )?;
    drop(live);
    Ok(())
}

/// IPv6-only pods on two nodes: the agents route the nodes' IPv6 pod
/// ranges (natively via the nodes' IPv6 addresses, then inside the VXLAN
/// tunnel via IPv6 VTEP addresses), and policy holds at both ends over
/// IPv6 as over IPv4.
#[test]
fn ipv6_pods_cross_nodes_natively_and_over_vxlan() -> Result<()> {
    if !palisade_tests::require_root() {
        return Ok(());
    }
    let text = CASE.replace(
        "nodes: [{name: n1}, {name: n2}, {name: n3}]",
        "nodes: [{name: n1}, {name: n2}]",
    );
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let c = case(&text);
    for routing in ["native", "vxlan"] {
        let pins = RunPins::create()?;
        let live = setup_family(&c, &pins, routing, IpFamily::Ipv6)?;
        let v6 = |k: &str| live.ip_of(k, Family::V6);
        let (a, b, cc) = (v6("x/a"), v6("x/b"), v6("x/c"));
        let out = std::process::Command::new("ip")
            .args([
                "-n",
                &node_ns(&live.cluster, 0),
                "-6",
                "route",
                "show",
                "proto",
                "0xb0",
            ])
            .output()?;
        let routes = String::from_utf8_lossy(&out.stdout).into_owned();
        let n2 = &live.cluster.nodes[1];
        let range = n2.subnet6.clone().expect("an IPv6 range");
        let via = match routing {
            "native" => format!("via {}", n2.address6.expect("an IPv6 node address")),
            _ => "dev palisade.vx".to_string(),
        };
        expect(
            routes
                .lines()
                .any(|l| l.starts_with(range.as_str()) && l.contains(&via)),
            &format!("{routing}: n1 routes n2's {range} {via}: {routes}"),
            &live,
        )?;
        expect(
            connects(&live, "x/a", b, 80),
            &format!("{routing}: a -> b:80 over IPv6"),
            &live,
        )?;
        expect(
            connects(&live, "x/b", a, 80),
            &format!("{routing}: b -> a:80 over IPv6"),
            &live,
        )?;
        expect(
            !connects(&live, "x/a", b, 81),
            &format!("{routing}: a -> b:81 denied by a's egress"),
            &live,
        )?;
        expect(
            !connects(&live, "x/c", b, 80),
            &format!("{routing}: c -> b:80 denied by b's ingress"),
            &live,
        )?;
        expect(
            connects(&live, "x/b", cc, 80),
            &format!("{routing}: b -> c:80"),
            &live,
        )?;
        drop(live);
    }
    Ok(())
}
