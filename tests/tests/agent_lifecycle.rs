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
    let (scratch, node) = client_and_server("palisade-life-")?;

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
        ipv4: Some(CLIENT),
        host_ifname: "nosuchif0".into(),
        mac: None,
        ipv6: None,
    };
    let r = agent.request(&Request::Register(reg))?;
    assert_eq!(kind(&r), Some(ErrorKind::NotFound), "{r:?}");
    // Nothing was left behind by the failed registration.
    assert!(agent.status()?.endpoints.is_empty());
    drop(agent);
    drop(node);
    Ok(())
}

const NODE_A: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.96.7.0/24}
"#;

/// Issue 17: the API socket takes registrations only for what is really
/// a pod on this node: the caller is root (or the agent's user), the two
/// interfaces are one veth pair (host end here, pod end in the named
/// namespace), and the address is in this node's pod range.
#[test]
fn registrations_are_checked_against_the_caller_the_veth_pair_and_the_pool() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new(
        "palisade-regs-",
        &[("pods.yaml", PODS), ("node.yaml", NODE_A)],
    )?;
    let mut node = Node::new(GW)?;
    node.add_pod(CLIENT)?;
    node.add_pod(SERVER)?;
    let agent = scratch.agent(
        &node.ns,
        &["--metrics-addr", "off", "--node-name", "node-a"],
    )?;
    let reg = |pod: &Pod, netns: &Pod, ip: Ipv4Addr| Registration {
        container_id: format!("c-{}", pod.host_if),
        ifname: "eth0".into(),
        netns: netns.ns.path().display().to_string(),
        namespace: "life".into(),
        pod: "client".into(),
        ipv4: Some(ip),
        host_ifname: pod.host_if.clone(),
        mac: None,
        ipv6: None,
    };
    let refused = |r: Registration, says: &str| -> Result<()> {
        let a = agent.request(&Request::Register(r))?;
        match &a {
            Response::Error {
                kind: ErrorKind::InvalidRequest,
                message,
            } if message.contains(says) => Ok(()),
            other => anyhow::bail!("expected invalid_request saying {says:?}, got {other:?}"),
        }
    };
    let (client, server) = (&node.pods[0], &node.pods[1]);

    // The client's host veth, but the server's namespace: not a pair.
    refused(reg(client, server, CLIENT), "not one veth pair")?;
    // A host interface that is no veth at all.
    let mut r = reg(client, client, CLIENT);
    r.host_ifname = "lo".into();
    refused(r, "not a veth")?;
    // An address outside node-a's 10.96.7.0/24.
    refused(
        reg(client, client, Ipv4Addr::new(10, 96, 8, 2)),
        "outside node node-a's pod ranges",
    )?;
    assert!(agent.status()?.endpoints.is_empty(), "nothing registered");

    // Another user, even with the socket opened up, is refused changes but
    // may still read.
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    let open = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
    };
    open(scratch.dir.path(), 0o755)?;
    open(&agent.socket, 0o666)?;
    let as_nobody = |line: String| -> Result<Response> {
        let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.sendall(sys.argv[2].encode()+b'\\n')\nprint(s.makefile().readline(),end='')";
        let o = std::process::Command::new("python3")
            .args(["-c", script, &agent.socket.display().to_string(), &line])
            .uid(65534)
            .gid(65534)
            .output()?;
        anyhow::ensure!(
            o.status.success(),
            "python3: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(serde_json::from_slice(&o.stdout)?)
    };
    let line = serde_json::to_string(&Request::Register(reg(client, client, CLIENT)))?;
    assert_eq!(kind(&as_nobody(line)?), Some(ErrorKind::Forbidden));
    let line = serde_json::to_string(&Request::Deregister {
        container_id: "c-x".into(),
        ifname: "eth0".into(),
    })?;
    assert_eq!(kind(&as_nobody(line)?), Some(ErrorKind::Forbidden));
    let status = as_nobody(serde_json::to_string(&Request::Status)?)?;
    assert!(matches!(status, Response::Status(_)), "{status:?}");
    assert!(agent.status()?.endpoints.is_empty(), "nothing registered");

    // The real thing still registers.
    agent.register("life", "client", client)?;
    assert_eq!(agent.status()?.endpoints.len(), 1);
    drop(agent);
    drop(node);
    Ok(())
}

/// A client and a server (echoing on 8080 and 9090) on one node, and the
/// manifests allowing client -> server:8080.
fn client_and_server(prefix: &str) -> Result<(Scratch, Node)> {
    let scratch = Scratch::new(prefix, &[("pods.yaml", PODS), ("policy.yaml", ALLOW_8080)])?;
    let mut node = Node::new(GW)?;
    node.add_pod(CLIENT)?;
    node.add_pod(SERVER)?;
    tcp_echo_server(&node.pods[1].ns, 8080)?;
    tcp_echo_server(&node.pods[1].ns, 9090)?;
    Ok((scratch, node))
}

/// Someone else's pass-everything program on the server's host veth, at
/// `hooks` (through TCX); kept attached while the result lives.
fn pass_all_on_server(
    node: &Node,
    hooks: &'static [aya::programs::TcAttachType],
) -> Result<(PinRoot, aya::programs::SchedClassifier)> {
    let other = PinRoot::new()?;
    let prog = palisade_dataplane::testrun::load_pass_all(other.pins.root())?;
    let host_if = node.pods[1].host_if.clone();
    let prog = node.ns.enter(move || -> Result<_> {
        let mut prog = prog;
        for hook in hooks {
            prog.attach(&host_if, *hook)?;
        }
        Ok(prog)
    })??;
    Ok((other, prog))
}

/// Issue 17: palisade's programs run first on a pod's interface. A program
/// already attached there (another CNI's, a leftover) that answers
/// TC_ACT_OK would end the TCX chain before policy; attached after it,
/// palisade would never see the packets.
#[test]
fn palisade_runs_before_programs_already_on_the_interface() -> Result<()> {
    use aya::programs::TcAttachType;
    if !require_root() {
        return Ok(());
    }
    let (scratch, node) = client_and_server("palisade-order-")?;
    // On both hooks of the server's host veth before palisade attaches.
    let _other = pass_all_on_server(&node, &[TcAttachType::Ingress, TcAttachType::Egress])?;

    let agent = scratch.agent(&node.ns, &["--metrics-addr", "off"])?;
    agent.register("life", "client", &node.pods[0])?;
    agent.register("life", "server", &node.pods[1])?;
    assert!(tcp_connects(&node.pods[0].ns, SERVER, 8080, 2000)?);
    assert!(
        !tcp_connects(&node.pods[0].ns, SERVER, 9090, 300)?,
        "a program attached earlier let 9090 past the policy"
    );
    drop(agent);
    drop(node);
    Ok(())
}

/// The same program attached *after* palisade's filter: TCX runs before
/// any filter, so it would take the server's packets past policy. The
/// agent's endpoint check notices and moves palisade's program into the
/// TCX chain, ahead of it.
#[test]
fn palisade_overtakes_a_tcx_program_attached_after_it() -> Result<()> {
    use aya::programs::TcAttachType;
    if !require_root() {
        return Ok(());
    }
    let (scratch, node) = client_and_server("palisade-order-late-")?;
    let agent = scratch.agent(
        &node.ns,
        &[
            "--metrics-addr",
            "off",
            "--endpoint-check-interval",
            "200ms",
        ],
    )?;
    agent.register("life", "client", &node.pods[0])?;
    agent.register("life", "server", &node.pods[1])?;
    assert!(!tcp_connects(&node.pods[0].ns, SERVER, 9090, 300)?);

    // On the server's tc egress (its ingress path), after palisade.
    let _other = pass_all_on_server(&node, &[TcAttachType::Egress])?;
    let host_if = node.pods[1].host_if.clone();
    let order = move || -> Result<Vec<String>> {
        Ok(
            aya::programs::SchedClassifier::query_tcx(&host_if, TcAttachType::Egress)?
                .1
                .iter()
                .map(|p| p.name_as_str().unwrap_or_default().to_string())
                .collect(),
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = node.ns.enter(order.clone())??;
        if now.first().map(String::as_str) == Some("pod_ingress") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "palisade is not first on the server's veth: {now:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(tcp_connects(&node.pods[0].ns, SERVER, 8080, 2000)?);
    assert!(
        !tcp_connects(&node.pods[0].ns, SERVER, 9090, 300)?,
        "a program attached later let 9090 past the policy"
    );
    drop(agent);
    drop(node);
    Ok(())
}
