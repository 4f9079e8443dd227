//! ClusterNetworkPolicy as an operator meets it, on real packets through
//! veths: an Admin Deny no NetworkPolicy can open, an Admin Pass handing
//! the decision to a NetworkPolicy, a Baseline deny, audit mode passing a
//! ClusterNetworkPolicy deny as AUDIT; and what explains them: flow records
//! (deciding rule, tier, action, Pass chain), `trace`'s tier walk,
//! `status` (subjects, rejection) and the metrics by tier and action.
use std::net::Ipv4Addr;

use anyhow::Result;
use palisade_tests::{agent::*, *};

const GW: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 3);
const LABBOX: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 4);
const METRICS: &str = "127.0.0.1:19963";

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {env: prod}}
---
apiVersion: v1
kind: Namespace
metadata: {name: lab, labels: {env: dev}, annotations: {palisade.dev/audit: "true"}}
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
    - from: [{podSelector: {}}]
      ports: [{port: 8080}, {port: 9090}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-9090}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  ingress:
    - name: deny-9090
      action: Deny
      from: [{namespaces: {}}]
      protocols: [{tcp: {destinationPort: {number: 9090}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: defer-prod}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
    - name: to-namespace-policy
      action: Pass
      from: [{namespaces: {matchLabels: {env: prod}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: default-deny}
spec:
  tier: Baseline
  priority: 10
  subject: {namespaces: {}}
  ingress:
    - name: deny-rest
      action: Deny
      from: [{namespaces: {}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: out-of-range}
spec:
  tier: Admin
  priority: 5000
  subject: {namespaces: {}}
  ingress: [{action: Deny, from: [{namespaces: {}}]}]
"#;

#[test]
fn cluster_network_policy_verdicts_are_explained() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new(
        "palisade-cnp-ops-",
        &[("cluster.yaml", CLUSTER), ("policies.yaml", POLICIES)],
    )?;
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
    let (client, labbox) = (&node.pods[0].ns, &node.pods[2].ns);

    // Real packets.
    assert!(
        tcp_connects(client, SERVER, 8080, 2000)?,
        "passed by Admin, allowed by the NetworkPolicy"
    );
    assert!(
        !tcp_connects(client, SERVER, 9090, 500)?,
        "the Admin Deny beats the NetworkPolicy that allows 9090"
    );
    assert!(
        tcp_connects(client, LABBOX, 80, 2000)?,
        "the Baseline deny of box is only audited (lab is in audit mode)"
    );
    assert!(
        !tcp_connects(labbox, CLIENT, 80, 500)?,
        "Baseline deny: client has no NetworkPolicy"
    );

    // Flow records: deciding rule, tier, action, Pass chain.
    let denied = agent.wait_flow(|r| r.verdict == "DROP" && r.dst.port == Some(9090))?;
    assert_eq!(
        denied.policies,
        ["ClusterNetworkPolicy/no-9090 rule deny-9090 (Admin tier, Deny)"]
    );
    assert_eq!(denied.tier.as_deref(), Some("Admin"));
    assert_eq!(denied.action.as_deref(), Some("Deny"));
    assert!(denied.passed.is_empty());
    let passed = agent.wait_flow(|r| {
        r.verdict == "ALLOW" && r.dst.port == Some(8080) && r.direction == "ingress"
    })?;
    assert_eq!(passed.policies, ["shop/server-ingress"]);
    assert_eq!(
        passed.passed,
        ["ClusterNetworkPolicy/defer-prod rule to-namespace-policy (Admin tier, Pass)"]
    );
    assert_eq!(passed.tier.as_deref(), Some("NetworkPolicy"));
    let audited = agent.wait_flow(|r| r.verdict == "AUDIT" && r.dst.port == Some(80))?;
    assert_eq!(
        audited.policies,
        ["ClusterNetworkPolicy/default-deny rule deny-rest (Baseline tier, Deny)"]
    );
    assert_eq!(audited.dst.pod.as_deref(), Some("box"));
    let baseline = agent.wait_flow(|r| r.verdict == "DROP" && r.dst.ip == CLIENT)?;
    assert_eq!(baseline.tier.as_deref(), Some("Baseline"));
    let (ok, out) = agent.cli(&["observe", "--port", "8080"])?;
    assert!(
        ok && out.contains("passed by: ClusterNetworkPolicy/defer-prod"),
        "{out}"
    );

    // trace: the walk, and which step decided.
    let (ok, out) = agent.cli(&[
        "trace",
        "--from",
        "shop/client",
        "--to",
        "shop/server",
        "--port",
        "8080/TCP",
    ])?;
    assert!(ok && out.contains("verdict: ALLOW"), "{out}");
    let walk: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.contains("tier walk"))
        .skip(1)
        .map(str::trim)
        .take_while(|l| l.starts_with(char::is_numeric))
        .collect();
    assert_eq!(walk.len(), 3, "{out}");
    assert!(
        walk[0].starts_with(
            "1. Admin ClusterNetworkPolicy/no-9090 (priority 10) rule deny-9090 [Deny]: no match"
        ),
        "{out}"
    );
    assert!(
        walk[1].contains("defer-prod") && walk[1].contains("Pass, rest of the tier skipped"),
        "{out}"
    );
    assert!(
        walk[2].contains("NetworkPolicy: allowed by shop/server-ingress")
            && walk[2].ends_with("=> decides"),
        "{out}"
    );
    let (ok, out) = agent.cli(&[
        "trace",
        "--from",
        "lab/box",
        "--to",
        "shop/client",
        "--port",
        "80",
    ])?;
    assert!(!ok && out.contains("verdict: DROP"), "{out}");
    assert!(
        out.contains("NetworkPolicy: none isolates the pod"),
        "{out}"
    );
    assert!(out.contains("Baseline ClusterNetworkPolicy/default-deny (priority 10) rule deny-rest [Deny]: matched: Deny  => decides"), "{out}");

    // status: every ClusterNetworkPolicy, its subjects, the rejection.
    let st = agent.status()?;
    let row = |n: &str| {
        st.cluster_policies
            .iter()
            .find(|c| c.name == n)
            .unwrap()
            .clone()
    };
    assert_eq!(st.cluster_policies.len(), 4);
    assert_eq!(row("no-9090").subjects, 3);
    assert_eq!(row("defer-prod").subjects, 2);
    assert!(row("out-of-range")
        .rejected
        .as_deref()
        .unwrap_or("")
        .contains("priority"));
    let (ok, text) = agent.cli(&["status"])?;
    assert!(ok && text.contains("CLUSTER POLICIES (4)"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("defer-prod") && l.contains("2 subjects")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("out-of-range") && l.contains("REJECTED")),
        "{text}"
    );

    // Metrics by tier and action.
    let m = http_get(&node.ns, METRICS, "/metrics")?;
    let d = |t: &str, a: &str| {
        metric(
            &m,
            &format!("palisade_policy_decisions_total{{tier=\"{t}\",action=\"{a}\"}}"),
        )
    };
    assert!(d("Admin", "Deny") >= 1, "{m}");
    assert!(d("Admin", "Pass") >= 1, "{m}");
    assert!(d("NetworkPolicy", "Accept") >= 1, "{m}");
    assert!(
        d("Baseline", "Deny") >= 2,
        "the audited deny counts too: {m}"
    );
    assert!(metric(&m, "palisade_policy_rejections_total") >= 1, "{m}");
    drop(agent);
    drop(node);
    Ok(())
}
