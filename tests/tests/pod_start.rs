//! A pod is never reachable before its policy is enforced: datagrams fired
//! at a new pod's address from before its CNI ADD until after it are all
//! dropped when its namespace is default-deny, and none arrives.
use std::{
    net::{Ipv4Addr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use palisade_tests::{
    agent::write_manifest,
    cni::{exec, CniNode},
    enter_thread, require_root, NetNs,
};

const TARGET: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 3);
const PORT: u16 = 9999;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: locked}
---
apiVersion: v1
kind: Namespace
metadata: {name: free}
---
apiVersion: v1
kind: Pod
metadata: {name: target, namespace: locked, labels: {app: target}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: flooder, namespace: free, labels: {app: flooder}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: locked}
spec: {podSelector: {}, policyTypes: [Ingress]}
"#;

fn conf(n: &CniNode) -> String {
    // .2 goes to the flooder, .3 (the only one left) to the target.
    format!(
        r#"{{"cniVersion":"1.0.0","name":"podstart","type":"palisade","agentSocket":"{}",
            "ipam":{{"type":"palisade","subnet":"10.211.0.0/24","rangeStart":"10.211.0.2","rangeEnd":"10.211.0.3","dataDir":"{}"}}}}"#,
        n.socket().display(),
        n.ipam_dir().display()
    )
}

fn add(n: &CniNode, pod: &NetNs, id: &str, ns: &str, name: &str) -> Result<()> {
    let netns = pod.path().display().to_string();
    let args = format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}");
    let env = [
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args.as_str()),
    ];
    exec(Some(&n.node), "ADD", &env, &conf(n))?.ok()?;
    Ok(())
}

#[test]
fn no_packet_reaches_a_default_deny_pod_while_it_starts() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let agent = n.agent.as_ref().expect("agent");
    write_manifest(&agent.manifests, "cluster.yaml", CLUSTER)?;
    agent.sync()?;
    let flooder = NetNs::new("pfl")?;
    add(&n, &flooder, "flooder", "free", "flooder")?;

    // The target's receiver listens before the pod has any interface.
    let target = NetNs::new("ptg")?;
    let receiver = target.enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)))??;
    receiver.set_read_timeout(Some(Duration::from_millis(100)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let rx = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if receiver.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let sent = Arc::new(AtomicU64::new(0));
    let tx = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let path = flooder.path();
        std::thread::spawn(move || -> Result<()> {
            enter_thread(&path)?;
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                // Errors (no route yet, ICMP unreachable) are expected early on.
                if s.send_to(b"x", (TARGET, PORT)).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        })
    };

    std::thread::sleep(Duration::from_millis(200));
    add(&n, &target, "target", "locked", "target")?;
    // Keep firing at the running pod for a while.
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    tx.join().expect("flooder")?;
    rx.join().expect("receiver");

    ensure!(sent.load(Ordering::Relaxed) > 100, "the flood did not run");
    assert_eq!(
        received.load(Ordering::Relaxed),
        0,
        "datagrams reached the pod unenforced"
    );
    // The flood did reach the pod's program, which dropped it.
    agent
        .wait_flow(|r| r.verdict == "DROP" && r.dst.ip == TARGET && r.dst.port == Some(PORT))
        .context("no drop of the flood was recorded")?;
    Ok(())
}

const LABELS_LATER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: locked}
---
apiVersion: v1
kind: Namespace
metadata: {name: free}
---
apiVersion: v1
kind: Pod
metadata: {name: flooder, namespace: free, labels: {app: flooder}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: target-from-free, namespace: locked}
spec:
  podSelector: {matchLabels: {app: target}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: free}}}]
"#;

const TARGET_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: target, namespace: locked, labels: {app: target}}
spec: {containers: [{name: c}]}
"#;

/// Datagrams from `from` to the target for `for_ms`: (sent, received).
fn fire(from: &NetNs, receiver: &UdpSocket, for_ms: u64) -> Result<(u64, u64)> {
    let sender = from.enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))??;
    let (mut sent, mut received) = (0, 0);
    receiver.set_read_timeout(Some(Duration::from_millis(5)))?;
    let deadline = Instant::now() + Duration::from_millis(for_ms);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        if sender.send_to(b"x", (TARGET, PORT)).is_ok() {
            sent += 1;
        }
        while receiver.recv(&mut buf).is_ok() {
            received += 1;
        }
    }
    Ok((sent, received))
}

/// A CNI ADD that reaches the agent before the pod's labels (its Pod
/// object) does: a `matchLabels` policy cannot select it yet, so it is
/// held closed both ways until the labels arrive, then judged by them.
#[test]
fn a_pod_whose_labels_are_not_known_yet_starts_closed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let agent = n.agent.as_ref().expect("agent");
    write_manifest(&agent.manifests, "cluster.yaml", LABELS_LATER)?;
    agent.sync()?;
    let flooder = NetNs::new("pul")?;
    add(&n, &flooder, "flooder", "free", "flooder")?;
    let target = NetNs::new("put")?;
    let receiver = target.enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)))??;
    add(&n, &target, "target", "locked", "target")?;

    let (sent, received) = fire(&flooder, &receiver, 500)?;
    ensure!(sent > 10, "the sender did not run");
    assert_eq!(received, 0, "a pod without known labels was open");
    agent
        .wait_flow(|r| {
            r.verdict == "DROP"
                && r.dst.ip == TARGET
                && r.policies
                    .iter()
                    .any(|p| p.contains("pod-labels-not-known-yet"))
        })
        .context("no drop names the pending labels")?;

    // The labels arrive: the policy selects the pod and admits `free`.
    write_manifest(&agent.manifests, "target.yaml", TARGET_POD)?;
    agent.sync()?;
    let (sent, received) = fire(&flooder, &receiver, 300)?;
    ensure!(
        received > 0 && received <= sent,
        "the known pod's policy admits free: {received}/{sent}"
    );
    Ok(())
}
