//! The operator tools against a live agent on real veths: `verify` probes
//! the kernel's own verdict path against the live maps without recording
//! anything and catches a corrupted POLICY entry written behind the agent's
//! back; `coverage` and `preview` answer on crafted models.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use palisade_api::VerifyReport;
use palisade_common::{
    maps as names, CtKey, CtValue, PolicyKey, PolicyValue, ACTION_ALLOW, ACTION_DENY,
};
use palisade_tests::{agent::*, *};

const GW: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 3);
const METRICS: &str = "127.0.0.1:19963";

const CLUSTER: &str = r#"
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
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: server}}}]
      ports: [{port: 8000, endPort: 8100}]
"#;

fn metric(text: &str, line_prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// The verdict counters a probe that recorded anything would move (ARP and
/// IPv6 neighbour traffic of the veths moves the others meanwhile).
fn verdicts_total(m: &str) -> u64 {
    m.lines()
        .filter(|l| {
            l.starts_with("palisade_verdicts_total{") || l.starts_with("palisade_drops_total{")
        })
        .filter(|l| !l.contains("not-ip") && !l.contains("ipv6"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Flow records other than the veths' own IPv6 neighbour traffic.
fn ipv4_records(agent: &Agent) -> usize {
    std::fs::read_to_string(&agent.flow_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.contains("ipv6-unsupported"))
        .count()
}

fn verify(agent: &Agent) -> Result<(bool, VerifyReport)> {
    let (ok, out) = agent.cli(&["verify", "-o", "json"])?;
    let r = serde_json::from_str(&out).with_context(|| format!("verify output: {out}"))?;
    Ok((ok, r))
}

#[test]
fn verify_proves_the_kernel_agrees_and_catches_a_corrupted_entry() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new("palisade-verify-", &[("cluster.yaml", CLUSTER)])?;
    let mut node = Node::new(GW)?;
    for ip in [CLIENT, SERVER] {
        node.add_pod(ip)?;
    }
    tcp_echo_server(&node.pods[1].ns, 8080)?;
    let agent = scratch.agent(
        &node.ns,
        &[
            "--metrics-addr",
            METRICS,
            "--verify-interval",
            "300ms",
            "--verify-readiness",
        ],
    )?;
    agent.register("shop", "client", &node.pods[0])?;
    agent.register("shop", "server", &node.pods[1])?;
    assert!(tcp_connects(&node.pods[0].ns, SERVER, 8080, 2000)?);

    // Agreement, and nothing recorded: no counter, no flow record, no
    // conntrack entry (a probe admitted into conntrack would be an
    // ESTABLISHED verdict later; the counters would show it).
    std::thread::sleep(Duration::from_millis(300));
    let before = http_get(&node.ns, METRICS, "/metrics")?;
    let log_before = ipv4_records(&agent);
    let (ok, r) = verify(&agent)?;
    assert!(ok, "{r:?}");
    assert!(r.mismatches.is_empty(), "{:?}", r.mismatches);
    assert_eq!(r.endpoints, 2);
    assert!(
        r.distinguished >= 8,
        "every entry and its port edges: {r:?}"
    );
    assert!(r.probes > r.distinguished, "and a sample: {r:?}");
    let (ok, text) = agent.cli(&["verify"])?;
    assert!(
        ok && text.contains("OK: every kernel verdict matches"),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = http_get(&node.ns, METRICS, "/metrics")?;
    assert_eq!(
        verdicts_total(&before),
        verdicts_total(&after),
        "verify moved a kernel counter:\n{before}\n{after}"
    );
    assert_eq!(
        log_before,
        ipv4_records(&agent),
        "verify produced flow records"
    );
    assert!(http_get(&node.ns, METRICS, "/readyz")?.contains("200 OK"));
    // Probes the policy admits (client -> server on 8080, 8000..8100, from
    // source port 40000) would have left conntrack entries.
    let ct = MapData::from_pin(scratch.pins.pins.map(names::CONNTRACK))?;
    let ct: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::from_map_data(ct)?)?;
    let probe_entries = ct
        .keys()
        .filter_map(Result::ok)
        .filter(|k| u16::from_be(k.sport_be) == 40000 || u16::from_be(k.dport_be) == 40000)
        .count();
    assert_eq!(probe_entries, 0, "verify left conntrack entries");

    // Corrupt the kernel behind the agent's back: the server's allow entry
    // for the client on 8080 (one port: in `POLICY_EXACT`, the hash of the
    // policy map's full-length entries) becomes a deny.
    let data = MapData::from_pin(scratch.pins.pins.map(names::POLICY_EXACT))?;
    let mut exact: HashMap<MapData, PolicyKey, PolicyValue> =
        HashMap::try_from(Map::from_map_data(data)?)?;
    let entries: Vec<(PolicyKey, PolicyValue)> = exact.iter().collect::<Result<_, _>>()?;
    let (key, value) = *entries
        .iter()
        .find(|(k, v)| {
            v.action == ACTION_ALLOW && u16::from_be(k.dport_be) == 8080 && k.direction == 1
        })
        .context("the server's allow entry")?;
    exact.insert(
        key,
        PolicyValue {
            action: ACTION_DENY,
            cookie: value.cookie,
        },
        0,
    )?;
    assert!(
        !tcp_connects(&node.pods[0].ns, SERVER, 8080, 500)?,
        "the corruption is real: the kernel now drops"
    );

    let (ok, r) = verify(&agent)?;
    assert!(!ok, "verify must exit non-zero on a mismatch");
    let m = r
        .mismatches
        .iter()
        .find(|m| m.endpoint == "shop/server" && m.packet.contains(":8080"))
        .with_context(|| format!("no mismatch on shop/server:8080 in {:?}", r.mismatches))?;
    assert_eq!((m.kernel.as_str(), m.model.as_str()), ("DROP", "ALLOW"));
    assert_eq!(m.direction, "ingress");
    assert!(m.packet.contains(&CLIENT.to_string()), "{m:?}");
    assert_eq!(m.rule.as_deref(), Some("shop/server-ingress ingress[0]"));
    let (ok, text) = agent.cli(&["verify"])?;
    assert!(!ok && text.contains("MISMATCHES"), "{text}");

    // The periodic run sees it too: metric, log, readiness.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = http_get(&node.ns, METRICS, "/metrics")?;
        let ready = http_get(&node.ns, METRICS, "/readyz")?;
        if metric(&m, "palisade_verify_mismatches").unwrap_or(0) > 0 && ready.contains("503") {
            break;
        }
        if Instant::now() > deadline {
            bail!("periodic verify did not report the mismatch:\n{m}\n{ready}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent
        .log_text()
        .contains("verify mismatch: shop/server ingress"));

    // A resync rewrites the entry; verify agrees again.
    exact.insert(key, value, 0)?;
    let (ok, r) = verify(&agent)?;
    assert!(ok && r.mismatches.is_empty(), "{r:?}");
    drop(agent);
    Ok(())
}

const CRAFTED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: infra}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {podIP: 10.97.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: app, labels: {app: db}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cache, namespace: infra, labels: {app: cache}}
spec: {containers: [{name: c}]}
status: {podIP: 10.97.1.20}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: app}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-ingress, namespace: app}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {}}]
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
  - from: [{ipBlock: {cidr: 10.97.1.0/24}}]
  - from: [{namespaceSelector: {matchLabels: {team: ops}}}]
"#;

#[test]
fn coverage_reports_isolation_and_mistakes_and_gates_on_require() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new("palisade-coverage-", &[("cluster.yaml", CRAFTED)])?;
    let mut node = Node::new(Ipv4Addr::new(10, 97, 1, 1))?;
    node.add_pod(Ipv4Addr::new(10, 97, 1, 2))?;
    let agent = scratch.agent(&node.ns, &["--metrics-addr", "off"])?;
    agent.register("app", "db", &node.pods[0])?;

    let (ok, out) = agent.cli(&["coverage", "-o", "json"])?;
    assert!(ok, "no --require: exit 0\n{out}");
    let r: palisade_api::CoverageReport = serde_json::from_str(&out)?;
    let has = |kind: &str, subject: &str| {
        r.findings
            .iter()
            .any(|f| f.kind == kind && f.subject == subject)
    };
    let db = r.pods.iter().find(|p| p.pod == "db").context("db")?;
    assert_eq!(db.ingress, vec!["app/db-ingress", "app/default-deny"]);
    assert_eq!(db.egress, vec!["app/default-deny"]);
    assert!(has("unselected-pod", "infra/cache"));
    assert!(has("no-default-deny-ingress", "infra"));
    assert!(!has("no-default-deny-ingress", "app"));
    assert!(has("no-dns", "app/web") && has("no-dns", "app/db"));
    assert!(
        has("shadowed-rule", "app/db-ingress ingress[1]"),
        "{:?}",
        r.findings
    );
    assert!(has(
        "ipblock-contains-pods",
        "app/db-ingress ingress[2] peer 0"
    ));
    assert!(has("empty-selector", "app/db-ingress ingress[3] peer 0"));
    assert!(has(
        "ungoverned-namespace-label",
        "app/db-ingress ingress[3] peer 0"
    ));

    // Human output, and the CI gate.
    let (ok, text) = agent.cli(&["coverage"])?;
    assert!(
        ok && text.contains("FINDINGS") && text.contains("[no-dns] app/web"),
        "{text}"
    );
    let (ok, text) = agent.cli(&["coverage", "-n", "app", "--require", "default-deny"])?;
    assert!(ok, "app has a default deny both ways: {text}");
    let (ok, text) = agent.cli(&["coverage", "-n", "app", "--require", "default-deny,dns"])?;
    assert!(!ok && text.contains("require dns: FAILED"), "{text}");
    let (ok, text) = agent.cli(&["coverage", "--require", "nonsense"])?;
    assert!(!ok && text.contains("unknown check"), "{text}");

    // ClusterNetworkPolicies count: a Baseline deny gives infra its
    // default deny and isolates cache; an Admin Deny of every pod into app
    // makes db-ingress's pod rules dead (not its ipBlock rule: addresses
    // outside the pods are not denied above it).
    write_manifest(&scratch.manifests, "tiers.yaml", TIERS)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let (_, out) = agent.cli(&["coverage", "-o", "json"])?;
        let r: palisade_api::CoverageReport = serde_json::from_str(&out)?;
        if !r.findings.iter().any(|f| f.kind == "unselected-pod") {
            break r;
        }
        if Instant::now() > deadline {
            bail!("the ClusterNetworkPolicies never reached coverage: {out}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let has = |kind: &str, subject: &str| {
        r.findings
            .iter()
            .any(|f| f.kind == kind && f.subject == subject)
    };
    assert!(!has("no-default-deny-ingress", "infra"), "{:?}", r.findings);
    let cache = r.pods.iter().find(|p| p.pod == "cache").context("cache")?;
    assert_eq!(cache.ingress, vec!["ClusterNetworkPolicy/baseline-deny"]);
    let f = r
        .findings
        .iter()
        .find(|f| f.kind == "shadowed-rule" && f.subject == "app/db-ingress ingress[0]")
        .with_context(|| format!("ingress[0] not shadowed: {:?}", r.findings))?;
    assert!(
        f.detail
            .contains("ClusterNetworkPolicy/app-lockdown rule no-pods (Admin, Deny)"),
        "{f:?}"
    );
    assert!(!has("shadowed-rule", "app/db-ingress ingress[2]"));
    drop(agent);
    Ok(())
}

const TIERS: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: app-lockdown}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: app}}}
  ingress:
  - name: no-pods
    action: Deny
    from: [{namespaces: {}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: baseline-deny}
spec:
  tier: Baseline
  priority: 5
  subject: {namespaces: {}}
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
"#;

const OPEN_SHOP: &str = r#"
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
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: shop, labels: {app: intruder}}
spec: {containers: [{name: c}]}
"#;

const SERVER_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
      ports: [{port: 8080}]
"#;

/// Until `n` flow records have `pred`.
fn wait_records(agent: &Agent, n: usize, pred: impl Fn(&str) -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&agent.flow_log).unwrap_or_default();
        if text.lines().filter(|l| pred(l)).count() >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("fewer than {n} matching flow records in:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn preview_replays_recorded_flows_against_a_change_and_programs_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new("palisade-preview-", &[("cluster.yaml", OPEN_SHOP)])?;
    let (client_ip, server_ip, intruder_ip) = (
        Ipv4Addr::new(10, 97, 2, 2),
        Ipv4Addr::new(10, 97, 2, 3),
        Ipv4Addr::new(10, 97, 2, 4),
    );
    let mut node = Node::new(Ipv4Addr::new(10, 97, 2, 1))?;
    for ip in [client_ip, server_ip, intruder_ip] {
        node.add_pod(ip)?;
    }
    tcp_echo_server(&node.pods[1].ns, 8080)?;
    let agent = scratch.agent(&node.ns, &["--metrics-addr", "off"])?;
    for (i, name) in ["client", "server", "intruder"].iter().enumerate() {
        agent.register("shop", name, &node.pods[i])?;
    }
    // Real flows, all open today.
    assert!(tcp_connects(&node.pods[0].ns, server_ip, 8080, 2000)?);
    assert!(tcp_connects(&node.pods[2].ns, server_ip, 8080, 2000)?);
    assert!(tcp_connects(&node.pods[2].ns, server_ip, 8080, 2000)?);
    let _ = tcp_connects(&node.pods[0].ns, server_ip, 9090, 500)?;
    let server_ingress = |l: &str| l.contains("\"endpoint\":\"shop/server\"");
    wait_records(&agent, 4, server_ingress)?;

    let policy = scratch.dir.path().join("server-policy.yaml");
    std::fs::write(&policy, SERVER_POLICY)?;
    let policy = policy.to_str().context("path")?;
    let (ok, out) = agent.cli(&["preview", "-f", policy, "-o", "json"])?;
    assert!(ok, "{out}");
    let r: palisade_api::PreviewReport = serde_json::from_str(&out)?;
    assert!(r.newly_allowed.is_empty(), "{r:?}");
    let groups: Vec<(&str, &str, &str, usize)> = r
        .newly_dropped
        .iter()
        .map(|g| {
            (
                g.source.as_str(),
                g.destination.as_str(),
                g.port.as_str(),
                g.flows,
            )
        })
        .collect();
    assert_eq!(
        groups,
        vec![
            ("shop/intruder", "shop/server", "8080/TCP", 2),
            ("shop/client", "shop/server", "9090/TCP", 1),
        ],
        "{r:?}"
    );
    assert_eq!(
        r.newly_dropped[0].rule,
        "isolated by shop/server-ingress, no rule matches"
    );
    let (ok, text) = agent.cli(&["preview", "-f", policy])?;
    assert!(
        ok && text.contains("NEWLY DROPPED (2)")
            && text.contains("shop/intruder -> shop/server 8080/TCP"),
        "{text}"
    );
    // A window after the flows replays nothing.
    let (ok, out) = agent.cli(&[
        "preview",
        "-f",
        policy,
        "--since",
        "2999-01-01T00:00:00Z",
        "-o",
        "json",
    ])?;
    let r: palisade_api::PreviewReport = serde_json::from_str(&out)?;
    assert!(ok && r.replayed == 0 && r.newly_dropped.is_empty(), "{out}");
    // Bad input: a clear error, the agent unharmed.
    let (ok, text) = agent.cli(&["preview", "--delete", "shop/nothing"])?;
    assert!(!ok && text.contains("no such NetworkPolicy"), "{text}");

    // Nothing was programmed.
    assert!(agent.status()?.policies.is_empty());
    assert!(tcp_connects(&node.pods[2].ns, server_ip, 8080, 2000)?);

    // Once applied for real, previewing its deletion shows the reverse.
    write_manifest(&scratch.manifests, "server-policy.yaml", SERVER_POLICY)?;
    agent.sync()?;
    assert!(!tcp_connects(&node.pods[2].ns, server_ip, 8080, 500)?);
    // observe: the busiest dropped triples, and a time window.
    wait_records(&agent, 1, |l| l.contains("\"verdict\":\"DROP\""))?;
    let (ok, text) = agent.cli(&["observe", "--top"])?;
    // (The veths' IPv6 neighbour traffic is dropped too, and counted.)
    assert!(
        ok && text.lines().any(|l| l.contains("shop/intruder")
            && l.contains("shop/server")
            && l.contains("8080/TCP")
            && l.contains("shop/server-ingress")),
        "{text}"
    );
    let (ok, text) = agent.cli(&["observe", "--since", "1h", "--verdict", "drop"])?;
    assert!(
        ok && text.contains("shop/intruder") && !text.contains("ALLOW"),
        "{text}"
    );
    let (ok, text) = agent.cli(&["observe", "--since", "2999-01-01T00:00:00Z"])?;
    assert!(ok && text.trim().is_empty(), "{text}");
    let (ok, out) = agent.cli(&["observe", "--top", "1", "--json"])?;
    let top: serde_json::Value = serde_json::from_str(&out)?;
    assert!(ok && top.as_array().map(Vec::len) == Some(1), "{out}");

    let (ok, out) = agent.cli(&["preview", "--delete", "shop/server-ingress", "-o", "json"])?;
    let r: palisade_api::PreviewReport = serde_json::from_str(&out)?;
    assert!(ok && r.newly_dropped.is_empty(), "{out}");
    let g = r
        .newly_allowed
        .iter()
        .find(|g| g.source == "shop/intruder" && g.port == "8080/TCP")
        .with_context(|| format!("{r:?}"))?;
    assert!(
        g.flows >= 3,
        "two before, and the dropped SYN(s) since: {g:?}"
    );
    drop(agent);
    Ok(())
}
