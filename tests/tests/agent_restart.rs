//! kill -9 the agent while a TCP stream runs and a denied probe repeats:
//! the stream is not interrupted, the probe stays denied throughout, and
//! the restarted agent adopts the pinned state, swaps its programs into
//! the pods' filters, and applies a policy change made while it was down.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use palisade_tests::{agent::*, *};

const GW: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 3);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 4);

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 9090}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: shop, labels: {app: other}}
spec: {containers: [{name: c}]}
"#;

const ALLOW_CLIENT: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{port: 8080}]
"#;

const ALLOW_OTHER_9090: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-other-9090, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: other}}}]
      ports: [{port: 9090}]
"#;

#[test]
fn kill_dash_nine_keeps_enforcing_and_the_restarted_agent_adopts() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new(
        "palisade-restart-",
        &[("pods.yaml", PODS), ("policy.yaml", ALLOW_CLIENT)],
    )?;

    let mut node = Node::new(GW)?;
    node.add_pod(CLIENT)?;
    node.add_pod(SERVER)?;
    node.add_pod(OTHER)?;
    tcp_echo_server(&node.pods[1].ns, 8080)?;
    tcp_echo_server(&node.pods[1].ns, 9090)?;

    let mut agent = scratch.agent(&node.ns, &["--metrics-addr", "off"])?;
    for (i, name) in ["client", "server", "other"].iter().enumerate() {
        agent.register("shop", name, &node.pods[i])?;
    }
    let st = agent.status()?;
    let server = st
        .endpoints
        .iter()
        .find(|e| e.pod == "server")
        .expect("server endpoint");
    assert!(server.ingress_enforced, "{st:?}");

    // A stream client -> server:8080 that checks every echo.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let max_gap_ms = Arc::new(AtomicU64::new(0));
    let stream = {
        let (stop, rounds, max_gap_ms) = (stop.clone(), rounds.clone(), max_gap_ms.clone());
        let path = node.pods[0].ns.path();
        std::thread::spawn(move || -> Result<()> {
            enter_thread(&path)?;
            let mut c = TcpStream::connect_timeout(&(SERVER, 8080).into(), Duration::from_secs(3))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut last = Instant::now();
            let mut n = 0u8;
            while !stop.load(Ordering::Relaxed) {
                let msg = [n; 512];
                c.write_all(&msg)?;
                let mut back = [0u8; 512];
                c.read_exact(&mut back)?;
                anyhow::ensure!(back == msg, "corrupted echo");
                let gap = last.elapsed().as_millis() as u64;
                max_gap_ms.fetch_max(gap, Ordering::Relaxed);
                last = Instant::now();
                rounds.fetch_add(1, Ordering::Relaxed);
                n = n.wrapping_add(1);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })
    };
    // The denied probe: other -> server:8080, again and again.
    let leaked = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(AtomicU64::new(0));
    let prober = {
        let (stop, leaked, probes) = (stop.clone(), leaked.clone(), probes.clone());
        let path = node.pods[2].ns.path();
        std::thread::spawn(move || -> Result<()> {
            enter_thread(&path)?;
            while !stop.load(Ordering::Relaxed) {
                if TcpStream::connect_timeout(&(SERVER, 8080).into(), Duration::from_millis(150))
                    .is_ok()
                {
                    leaked.fetch_add(1, Ordering::Relaxed);
                }
                probes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };

    std::thread::sleep(Duration::from_millis(500));
    let hooked = |node: &Node| -> Result<Vec<u64>> {
        let [e, i] = palisade_filters(&node.ns, &node.pods[1].host_if)?;
        anyhow::ensure!(
            e.len() == 1 && i.len() == 1,
            "one filter per hook: {e:?} {i:?}"
        );
        Ok(vec![e[0].prog_id, i[0].prog_id])
    };
    let before_kill = hooked(&node)?;
    agent.kill9()?;
    // Changed while the agent is down.
    write_manifest(&scratch.manifests, "policy-other.yaml", ALLOW_OTHER_9090)?;
    let before = rounds.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        rounds.load(Ordering::Relaxed) > before,
        "stream stalled while the agent was down"
    );

    agent.spawn()?;
    agent.sync()?;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    stream.join().expect("stream thread")?;
    prober.join().expect("probe thread")?;

    assert_eq!(
        leaked.load(Ordering::Relaxed),
        0,
        "the denied probe got through"
    );
    assert!(
        probes.load(Ordering::Relaxed) >= 5,
        "too few probes to mean anything"
    );
    assert!(
        max_gap_ms.load(Ordering::Relaxed) < 1000,
        "stream gap {} ms",
        max_gap_ms.load(Ordering::Relaxed)
    );
    let st = agent.status()?;
    assert_eq!(st.endpoints.len(), 3, "endpoints adopted: {st:?}");
    let after = hooked(&node)?;
    assert!(
        after.iter().zip(&before_kill).all(|(a, b)| a != b),
        "the restarted agent's programs replace the filters' ({before_kill:?} -> {after:?})"
    );
    assert!(
        tcp_connects(&node.pods[2].ns, SERVER, 9090, 2000)?,
        "policy made while down not applied"
    );
    assert!(
        !tcp_connects(&node.pods[2].ns, SERVER, 8080, 500)?,
        "other -> 8080 must stay denied"
    );
    assert!(tcp_connects(&node.pods[0].ns, SERVER, 8080, 2000)?);
    drop(agent);
    drop(node);
    Ok(())
}
