//! The agent process at its edges: graceful shutdown on SIGTERM (the
//! DaemonSet's rolling update) keeps enforcement in the kernel and the next
//! agent adopts it; API errors carry the kind the CNI plugin maps to a CNI
//! error code.
use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    time::Duration,
};

use anyhow::Result;
use palisade_api::{ErrorKind, Registration, Request, Response};
use palisade_tests::{agent::*, *};

const GW: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 3);

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: life}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: life, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: life, labels: {app: server}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 9090}]}]}
"#;

const ALLOW_8080: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-8080, namespace: life}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{port: 8080}]
"#;

#[test]
fn sigterm_stops_gracefully_and_enforcement_stays() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new(
        "palisade-life-",
        &[("pods.yaml", PODS), ("policy.yaml", ALLOW_8080)],
    )?;
    let mut node = Node::new(GW)?;
    node.add_pod(CLIENT)?;
    node.add_pod(SERVER)?;
    tcp_echo_server(&node.pods[1].ns, 8080)?;
    tcp_echo_server(&node.pods[1].ns, 9090)?;

    let mut agent = scratch.agent(&node.ns, &["--metrics-addr", "off"])?;
    agent.register("life", "client", &node.pods[0])?;
    agent.register("life", "server", &node.pods[1])?;
    assert!(tcp_connects(&node.pods[0].ns, SERVER, 8080, 2000)?);
    assert!(!tcp_connects(&node.pods[0].ns, SERVER, 9090, 300)?);

    let status = agent.terminate(Duration::from_secs(10))?;
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        agent.log_text()
    );
    assert!(
        !agent.socket.exists(),
        "the API socket is removed on a graceful stop"
    );
    let log = agent.log_text();
    assert!(log.contains("shutting down"), "{log}");

    // Nobody runs the agent now; the kernel still enforces.
    assert!(tcp_connects(&node.pods[0].ns, SERVER, 8080, 2000)?);
    assert!(
        !tcp_connects(&node.pods[0].ns, SERVER, 9090, 300)?,
        "9090 opened while the agent was stopped"
    );

    agent.spawn()?;
    agent.sync()?;
    let st = agent.status()?;
    assert_eq!(st.endpoints.len(), 2, "endpoints adopted: {st:?}");
    assert!(!tcp_connects(&node.pods[0].ns, SERVER, 9090, 300)?);
    drop(agent);
    drop(node);
    Ok(())
}

/// A raw request line and its answer.
fn raw(socket: &std::path::Path, line: &str) -> Result<Response> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}

fn kind(r: &Response) -> Option<ErrorKind> {
    match r {
        Response::Error { kind, .. } => Some(*kind),
        _ => None,
    }
}

#[test]
fn api_errors_say_what_the_caller_should_do() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new("palisade-errs-", &[("pods.yaml", PODS)])?;
    let node = Node::new(GW)?;
    let agent = scratch.agent(&node.ns, &["--metrics-addr", "off"])?;

    let r = raw(&agent.socket, "{\"op\": \"register\", \"container_id\": 7}")?;
    assert_eq!(kind(&r), Some(ErrorKind::InvalidRequest), "{r:?}");

    // An interface that does not exist: the pod's sandbox is gone.
    let reg = Registration {
        container_id: "c-missing".into(),
        ifname: "eth0".into(),
        netns: "/proc/1/ns/net".into(),
        namespace: "life".into(),
        pod: "client".into(),
        ipv4: CLIENT,
        host_ifname: "nosuchif0".into(),
    };
    let r = agent.request(&Request::Register(reg))?;
    assert_eq!(kind(&r), Some(ErrorKind::NotFound), "{r:?}");
    // Nothing was left behind by the failed registration.
    assert!(agent.status()?.endpoints.is_empty());
    drop(agent);
    drop(node);
    Ok(())
}
