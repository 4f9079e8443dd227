//! `cargo xtask demo`: a three-tier application on one node, real packets.
//!
//! The agent runs in standalone mode on a manifest directory; every pod is
//! a network namespace wired by the `palisade` CNI plugin; policies are
//! written step by step. After each step every connection is attempted for
//! real, the matrix of what passed is printed, each drop is explained by
//! the agent's flow log, and the result is checked against what
//! NetworkPolicy semantics require. Everything is removed at the end, also
//! on failure or Ctrl-C.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use palisade_tests::conformance::{
    case::{Case, Protocol},
    cluster::Tools,
    dns,
    flows::{Flow, Tail},
    matrix::table,
    probe,
    runner::{Live, Options},
    signal,
};

/// The cluster and the policies of each step (shared case 05's story).
const STORY: &str = r#"
name: demo
cluster:
  namespaces:
    app: {labels: {name: app}}
    other: {labels: {name: other}}
    kube-system: {labels: {}}
  pods:
    - {namespace: app, name: frontend, labels: {tier: frontend}, ports: [{port: 80, protocol: TCP, name: http}]}
    - {namespace: app, name: backend, labels: {tier: backend}, ports: [{port: 8080, protocol: TCP, name: api}]}
    - {namespace: app, name: database, labels: {tier: database}, ports: [{port: 5432, protocol: TCP, name: postgres}]}
    - {namespace: app, name: probe, labels: {role: probe}, ports: []}
    - {namespace: other, name: probe, labels: {role: probe}, ports: []}
    - namespace: kube-system
      name: coredns
      labels: {k8s-app: kube-dns}
      ports: [{port: 53, protocol: UDP, name: dns}, {port: 53, protocol: TCP, name: dns-tcp}]
  dns: {namespace: kube-system, name: coredns, labels: {k8s-app: kube-dns}}
  external:
    - {name: api.partner.example, address: 192.0.2.10, ports: [{port: 443, protocol: TCP}]}
    - {name: tracker.example, address: 192.0.2.20, ports: [{port: 443, protocol: TCP}]}
steps:
  - {}
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: default-deny-all, namespace: app}
        spec:
          podSelector: {}
          policyTypes: [Ingress, Egress]
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: frontend-ingress, namespace: app}
        spec:
          podSelector: {matchLabels: {tier: frontend}}
          policyTypes: [Ingress]
          ingress: [{}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: backend-from-frontend, namespace: app}
        spec:
          podSelector: {matchLabels: {tier: backend}}
          policyTypes: [Ingress]
          ingress:
            - from: [{podSelector: {matchLabels: {tier: frontend}}}]
              ports: [{protocol: TCP, port: 8080}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: database-from-backend, namespace: app}
        spec:
          podSelector: {matchLabels: {tier: database}}
          policyTypes: [Ingress]
          ingress:
            - from: [{podSelector: {matchLabels: {tier: backend}}}]
              ports: [{protocol: TCP, port: 5432}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: frontend-egress, namespace: app}
        spec:
          podSelector: {matchLabels: {tier: frontend}}
          policyTypes: [Egress]
          egress:
            - to: [{podSelector: {matchLabels: {tier: backend}}}]
              ports: [{protocol: TCP, port: 8080}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: backend-egress, namespace: app}
        spec:
          podSelector: {matchLabels: {tier: backend}}
          policyTypes: [Egress]
          egress:
            - to: [{podSelector: {matchLabels: {tier: database}}}]
              ports: [{protocol: TCP, port: 5432}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow-dns, namespace: app}
        spec:
          podSelector: {}
          policyTypes: [Egress]
          egress:
            - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]
              ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
  - relabel:
      - {kind: Pod, namespace: app, name: probe, labels: {tier: frontend}}
  - apply:
      - apiVersion: policy.networking.k8s.io/v1alpha2
        kind: ClusterNetworkPolicy
        metadata: {name: baseline-default-deny}
        spec:
          tier: Baseline
          priority: 100
          subject: {namespaces: {}}
          ingress:
            - name: dns-in
              action: Accept
              from: [{namespaces: {}}]
              protocols: [{udp: {destinationPort: {number: 53}}}, {tcp: {destinationPort: {number: 53}}}]
            - {name: deny-rest, action: Deny, from: [{namespaces: {}}]}
          egress:
            - name: dns-out
              action: Accept
              to: [{pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}}]
              protocols: [{udp: {destinationPort: {number: 53}}}, {tcp: {destinationPort: {number: 53}}}]
            - {name: deny-rest, action: Deny, to: [{namespaces: {}}]}
      - apiVersion: policy.networking.k8s.io/v1alpha2
        kind: ClusterNetworkPolicy
        metadata: {name: protect-database}
        spec:
          tier: Admin
          priority: 10
          subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {tier: database}}}}
          ingress:
            - name: no-frontend
              action: Deny
              from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {tier: frontend}}}}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: database-from-frontend, namespace: app}
        spec:
          podSelector: {matchLabels: {tier: database}}
          policyTypes: [Ingress]
          ingress:
            - from: [{podSelector: {matchLabels: {tier: frontend}}}]
              ports: [{protocol: TCP, port: 5432}]
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: frontend-to-database, namespace: app}
        spec:
          podSelector: {matchLabels: {tier: frontend}}
          policyTypes: [Egress]
          egress:
            - to: [{podSelector: {matchLabels: {tier: database}}}]
              ports: [{protocol: TCP, port: 5432}]
  - apply:
      - apiVersion: policy.networking.k8s.io/v1alpha2
        kind: ClusterNetworkPolicy
        metadata: {name: frontend-egress-allow-list}
        spec:
          tier: Admin
          priority: 20
          subject:
            pods:
              namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: app}}
              podSelector: {matchLabels: {tier: frontend}}
          egress:
            - name: partner-api
              action: Accept
              to: [{domainNames: [api.partner.example]}]
              protocols: [{tcp: {destinationPort: {number: 443}}}]
"#;

/// What each step means, and the matrix NetworkPolicy semantics require
/// (rows: sources in SOURCES order; columns: SERVICES; `-` is the pod itself).
struct Narration {
    title: &'static str,
    lines: &'static [&'static str],
    expect: &'static str,
}

const NARRATION: [Narration; 6] = [
    Narration {
        title: "no NetworkPolicy: the flat network",
        lines: &["Kubernetes starts open: every pod reaches every port of every other pod."],
        expect: "
            - . . . .
            . - . . .
            . . - . .
            . . . . .
            . . . . .
            . . . - -",
    },
    Narration {
        title: "default deny in namespace app",
        lines: &[
            "+ app/default-deny-all   podSelector: {}   policyTypes: [Ingress, Egress]",
            "Every pod of app is isolated both ways: nothing in, nothing out (not even DNS).",
            "Pods elsewhere keep their open egress, but app's pods no longer accept it.",
        ],
        expect: "
            - X X X X
            X - X X X
            X X - X X
            X X X X X
            X X X . .
            X X X - -",
    },
    Narration {
        title: "the allow policies of the three tiers",
        lines: &[
            "+ app/frontend-ingress        tier=frontend accepts anything               ingress: [{}]",
            "+ app/backend-from-frontend   tier=backend accepts tier=frontend           on TCP 8080",
            "+ app/database-from-backend   tier=database accepts tier=backend           on TCP 5432",
            "+ app/frontend-egress         tier=frontend may reach tier=backend         on TCP 8080",
            "+ app/backend-egress          tier=backend may reach tier=database         on TCP 5432",
            "+ app/allow-dns               every app pod may reach namespace kube-system on UDP/TCP 53",
            "Allowed traffic is the union of the rules; both ends must allow a connection.",
        ],
        expect: "
            - . X . .
            X - . . .
            X X - . .
            X X X . .
            . X X . .
            . X X - -",
    },
    Narration {
        title: "labels are identity: app/probe is relabelled tier=frontend",
        lines: &[
            "~ app/probe   labels {role: probe} -> {tier: frontend}",
            "No policy names the pod: it gains exactly what tier=frontend may do (reach the backend on",
            "8080) and nothing more. other/probe is not in namespace app, so app's podSelectors never match it.",
        ],
        expect: "
            - . X . .
            X - . . .
            X X - . .
            X . X . .
            . X X . .
            . X X - -",
    },
    Narration {
        title: "cluster-wide: a Baseline default deny and an Admin Deny (ClusterNetworkPolicy)",
        lines: &[
            "+ ClusterNetworkPolicy/baseline-default-deny  Baseline, every namespace: only DNS in and out",
            "+ ClusterNetworkPolicy/protect-database       Admin: tier=database never accepts tier=frontend",
            "+ app/database-from-frontend, app/frontend-to-database   a namespace admin tries to open it",
            "Baseline decides only where no NetworkPolicy does: app keeps its policies, while other/probe",
            "and coredns lose everything but DNS. The Admin Deny is evaluated before any NetworkPolicy,",
            "so the namespace's new allow cannot open frontend -> database (the drop names the rule).",
        ],
        expect: "
            - . X . .
            X - . . .
            X X - . .
            X . X . .
            X X X . .
            X X X - -",
    },
    Narration {
        title: "egress allow-list by domain name: tier=frontend may reach api.partner.example, nothing else outside",
        lines: &[
            "+ ClusterNetworkPolicy/frontend-egress-allow-list  Admin: tier=frontend of app may reach",
            "  domainNames [api.partner.example] on TCP 443",
            "Outside the cluster: api.partner.example (192.0.2.10) and tracker.example (192.0.2.20), both",
            "served by kube-dns. The agent learns the name's addresses from kube-dns's answers to the pods the",
            "rule selects (the answer is held until they are programmed): the first connection passes. The",
            "frontend's NetworkPolicy already isolates its egress, so every other address outside stays closed.",
        ],
        expect: "
            - . X . .
            X - . . .
            X X - . .
            X . X . .
            X X X . .
            X X X - -",
    },
];

const SOURCES: [&str; 6] = [
    "app/frontend",
    "app/backend",
    "app/database",
    "app/probe",
    "other/probe",
    "kube-system/coredns",
];
const SERVICES: [(&str, u16, Protocol); 5] = [
    ("app/frontend", 80, Protocol::Tcp),
    ("app/backend", 8080, Protocol::Tcp),
    ("app/database", 5432, Protocol::Tcp),
    ("kube-system/coredns", 53, Protocol::Udp),
    ("kube-system/coredns", 53, Protocol::Tcp),
];

/// kube-dns as in a cluster: a ClusterIP Service in kube-system whose
/// backend (its EndpointSlice derived from the selector by the agent) is
/// the coredns pod; pods' resolvers point at the ClusterIP.
const KUBE_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const KUBE_DNS: &str = "kube-system/kube-dns";
/// Who resolves what at each step, and whether NetworkPolicy lets it.
const DNS_CLIENT: &str = "app/frontend";
const DNS_NAME: &str = "backend";
/// One per step; the cluster-wide step keeps app's DNS allowance (its
/// NetworkPolicy decides before Baseline, which allows DNS too).
const DNS_EXPECT: [bool; 6] = [true, false, true, true, true, true];
// A step without its DNS expectation panicked the demo once (a merge added
// a step): the lengths must agree at compile time.
const _: () = assert!(DNS_EXPECT.len() == NARRATION.len());
/// The last step: DNS_CLIENT resolves each external name through kube-dns
/// and connects to the address it got on DOMAIN_PORT/TCP at once; whether
/// the allow-list lets that connection through, and the rule that must.
const DOMAIN_STEP: usize = 5;
const DOMAIN_PORT: u16 = 443;
const DOMAIN_EXPECT: [(&str, bool); 2] =
    [("api.partner.example", true), ("tracker.example", false)];
const DOMAIN_RULE: &str = "ClusterNetworkPolicy/frontend-egress-allow-list rule partner-api";
const _: () = assert!(DOMAIN_STEP < NARRATION.len());
/// The resolver configuration a kubelet writes for a pod of `app` (one
/// search domain and short timeouts keep the blocked step short).
const RESOLV_CONF: &str =
    "nameserver 10.96.0.10\nsearch app.svc.cluster.local\noptions ndots:5 timeout:1 attempts:1\n";

fn kube_dns_service() -> Result<serde_yaml::Value> {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
        "spec": {
            "clusterIP": KUBE_DNS_IP.to_string(),
            "selector": {"k8s-app": "kube-dns"},
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}
            ]
        }
    });
    Ok(serde_yaml::to_value(doc)?)
}

/// `name` resolved by glibc (`getent ahostsv4`) in the pod's network
/// namespace, with `resolv` bind-mounted over /etc/resolv.conf in a
/// private mount namespace of its own (what `ip netns exec` does): the
/// pod's own resolver, nothing of the node's changed.
fn resolve(netns: &Path, resolv: &Path, name: &str) -> Result<Option<Ipv4Addr>> {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            r#"mount --bind "$0" /etc/resolv.conf && exec nsenter --net="$1" getent ahostsv4 "$2""#,
        )
        .arg(resolv)
        .arg(netns)
        .arg(name)
        .output()
        .context("running unshare/nsenter/getent")?;
    if !out.status.success() {
        // getent: 2 = not found (here: no answer in time).
        return Ok(None);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok()))
}

/// The last step's own checks (DOMAIN_EXPECT): each name resolved through
/// the kube-dns ClusterIP and connected to at once from DNS_CLIENT, each
/// outcome explained by its flow record, then what the agent says about
/// the name (`palisade-agent trace --to-domain`, the learned names of
/// `palisade-agent status`). False when anything differs from what the
/// allow-list requires.
fn domain_step(live: &Live, case: &Case, tools: &Tools, style: &Style) -> Result<bool> {
    let mut ok = true;
    let client = live.cluster.pod(DNS_CLIENT).context("the DNS client pod")?;
    let client_ip = live.ip(DNS_CLIENT);
    let mut tails: Vec<Tail> = live
        .cluster
        .flow_logs()
        .iter()
        .map(|f| Tail::new(f))
        .collect();
    let jobs: Vec<probe::Job> = DOMAIN_EXPECT
        .iter()
        .map(|(name, _)| probe::Job {
            src_netns: client.netns_path(),
            dst: Ipv4Addr::UNSPECIFIED.into(),
            port: DOMAIN_PORT,
            protocol: Protocol::Tcp,
            resolve: Some(probe::Resolve {
                name: name.to_string(),
                server: KUBE_DNS_IP.into(),
                qtype: dns::TYPE_A,
            }),
        })
        .collect();
    let t = Instant::now();
    let outcomes = probe::run_all_detailed(&jobs, jobs.len())?;
    let took = t.elapsed();
    // Where each name should lead (the story's external hosts).
    let hosts: Vec<Ipv4Addr> = DOMAIN_EXPECT
        .iter()
        .map(|(name, _)| {
            case.externals
                .host(name)
                .map(|(a, _)| a)
                .with_context(|| format!("{name}: not an external host of the story"))
        })
        .collect::<Result<_>>()?;
    let record = |fs: &[Flow], a: Ipv4Addr| -> Option<Flow> {
        fs.iter()
            .find(|f| {
                f.direction == "egress"
                    && f.is(client_ip, a, DOMAIN_PORT, "TCP")
                    && (f.verdict == "DROP" || !f.policies.is_empty())
            })
            .cloned()
    };
    let mut flows = Vec::new();
    for tail in &mut tails {
        flows.extend(tail.gather(Duration::from_millis(1500), |fs| {
            hosts.iter().all(|a| record(fs, *a).is_some())
        }));
    }
    println!();
    println!(
        "  Egress by domain name: {DNS_CLIENT} resolves each name through {KUBE_DNS} {KUBE_DNS_IP}:53 and connects at once to {DOMAIN_PORT}/TCP ({:.1} s):",
        took.as_secs_f64()
    );
    for (((name, want), (passed, got)), host) in DOMAIN_EXPECT.iter().zip(&outcomes).zip(&hosts) {
        let verdict = if *passed { "pass" } else { "DROP" };
        match got {
            Ok(a) => println!("    {name} -> {a}, connect: {}", style.cell(verdict)),
            Err(e) => println!("    {name}: {e}"),
        }
        if got.as_ref().ok() != Some(&std::net::IpAddr::from(*host)) {
            ok = false;
            println!(
                "    {} {name}: kube-dns must answer {host} (the frontend's NetworkPolicy allows DNS)",
                style.paint("1;31", "✗")
            );
            continue;
        }
        match record(&flows, *host) {
            Some(f) => {
                let colour = if f.verdict == "ALLOW" { "32" } else { "31" };
                let domains = if f.domains.is_empty() {
                    String::new()
                } else {
                    format!(" domain: {}", f.domains.join(", "))
                };
                println!(
                    "      {}",
                    style.paint(colour, &format!("{}{domains}", f.describe()))
                );
                // An allowed connection: the record names the rule and the name.
                if *want
                    && f.verdict == "ALLOW"
                    && !(f.domains.iter().any(|d| d == name)
                        && f.policies.iter().any(|p| p.contains(DOMAIN_RULE)))
                {
                    ok = false;
                    println!(
                        "    {} the ALLOW record must name {DOMAIN_RULE} and domain {name}",
                        style.paint("1;31", "✗")
                    );
                }
            }
            None => {
                ok = false;
                println!("      no flow record of {DNS_CLIENT} -> {host}:{DOMAIN_PORT} TCP reached the flow log");
            }
        }
        if passed != want {
            ok = false;
            println!(
                "    {} {DNS_CLIENT} -> {name}:{DOMAIN_PORT} TCP: the allow-list requires {}, saw {verdict}",
                style.paint("1;31", "✗"),
                if *want { "pass" } else { "DROP" },
            );
        }
    }

    // What the agent says about the name: on the client's node.
    let node = &live.cluster.nodes[client.node];
    let socket = &node.agent.as_ref().expect("running").socket;
    let allowed = DOMAIN_EXPECT
        .iter()
        .find(|(_, w)| *w)
        .map(|(n, _)| *n)
        .context("an allowed name")?;
    let port = format!("{DOMAIN_PORT}/TCP");
    let args = [
        "trace",
        "--from",
        DNS_CLIENT,
        "--to-domain",
        allowed,
        "--port",
        &port,
    ];
    println!();
    println!("  $ palisade-agent {}", args.join(" "));
    let out = Command::new(&tools.agent)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .context("running palisade-agent trace")?;
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {l}");
    }
    if !out.status.success() {
        ok = false;
        println!(
            "    {} palisade-agent trace: {} (the allow-list allows it) {}",
            style.paint("1;31", "✗"),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!();
    println!("  $ palisade-agent status   (its learned names)");
    let status = status_output(&tools.agent, socket)?;
    let learned: Vec<&str> = status
        .lines()
        .skip_while(|l| !l.starts_with("LEARNED DOMAIN NAMES"))
        .take_while(|l| !l.trim().is_empty())
        .collect();
    for l in &learned {
        println!("    {l}");
    }
    // Learned: the names a rule names, once a selected pod resolved them.
    for (name, want) in DOMAIN_EXPECT {
        let listed = learned
            .iter()
            .skip(1)
            .any(|l| l.split_whitespace().next() == Some(name));
        if listed != want {
            ok = false;
            println!(
                "    {} {name}: {} in the status's learned names",
                style.paint("1;31", "✗"),
                if want { "missing" } else { "unexpected" }
            );
        }
    }
    if ok {
        println!();
        println!(
            "  {} by name exactly what the allow-list requires: {} reached, everything else outside dropped",
            style.paint("32", "✓"),
            allowed
        );
    }
    Ok(ok)
}

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
    fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
    fn cell(&self, s: &str) -> String {
        match s {
            "pass" => self.paint("32", s),
            "DROP" => self.paint("1;31", s),
            _ => self.dim(s),
        }
    }
}

/// The pod's name without its namespace (the column headers).
fn short(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// What one probe round saw: (source, service index) -> connected.
type Seen = BTreeMap<(usize, usize), bool>;

fn probe_all(live: &Live) -> Result<Seen> {
    let mut cells = Vec::new();
    let mut jobs = Vec::new();
    for (r, src) in SOURCES.iter().enumerate() {
        for (c, (dst, port, proto)) in SERVICES.iter().enumerate() {
            if src == dst {
                continue;
            }
            cells.push((r, c));
            jobs.push(live.job(src, dst, *port, *proto)?);
        }
    }
    let results = probe::run_all(&jobs, 64)?;
    Ok(cells.into_iter().zip(results).collect())
}

fn expected(n: &Narration) -> Result<Seen> {
    let mut m = Seen::new();
    let rows: Vec<&str> = n
        .expect
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if rows.len() != SOURCES.len() {
        bail!("narration {:?}: {} rows", n.title, rows.len());
    }
    for (r, row) in rows.iter().enumerate() {
        for (c, cell) in row.split_whitespace().enumerate() {
            match cell {
                "." => m.insert((r, c), true),
                "X" => m.insert((r, c), false),
                _ => None,
            };
        }
    }
    Ok(m)
}

fn matrix(seen: &Seen, style: &Style) -> String {
    let header: Vec<String> = SERVICES
        .iter()
        .map(|(dst, port, proto)| {
            format!("{}:{port}/{}", short(dst), proto.as_str().to_lowercase())
        })
        .collect();
    let rows: Vec<(String, Vec<String>)> = SOURCES
        .iter()
        .enumerate()
        .map(|(r, src)| {
            let cells = (0..SERVICES.len())
                .map(|c| match seen.get(&(r, c)) {
                    Some(true) => "pass".to_string(),
                    Some(false) => "DROP".to_string(),
                    None => "-".to_string(),
                })
                .collect();
            (format!("  {src}"), cells)
        })
        .collect();
    table("  from \\ to", &header, &rows, &|c| style.cell(c))
}

fn status_output(agent: &Path, socket: &Path) -> Result<String> {
    let out = Command::new(agent)
        .arg("status")
        .arg("--socket")
        .arg(socket)
        .output()
        .context("running palisade-agent status")?;
    if !out.status.success() {
        bail!(
            "palisade-agent status failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `--nodes N`: the same story on N simulated nodes (pods round robin).
fn nodes_arg() -> Result<usize> {
    let mut it = std::env::args().skip(1);
    let mut n = 1;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nodes" => {
                n = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n >= 1)
                    .context("--nodes needs a number >= 1")?
            }
            other => bail!("unknown argument {other:?} (usage: demo [--nodes N])"),
        }
    }
    Ok(n)
}

fn run(style: &Style) -> Result<bool> {
    let nodes = nodes_arg()?;
    let case = Case::parse(STORY, Path::new("demo"))?;
    let tools = Tools::locate()?;
    palisade_tests::ensure_bpffs()?;
    for r in signal::reap_leftovers() {
        eprintln!("removed a leftover of an earlier, killed run: {r}");
    }
    let pins = signal::RunPins::create()?;
    let pin_parent = pins.0.clone();
    let result = (|| -> Result<bool> {
        println!(
            "{}",
            style.bold("palisade demo: NetworkPolicy enforced by eBPF, on real packets")
        );
        println!();
        let t = Instant::now();
        let opts = Options {
            nodes,
            ..Options::default()
        };
        let mut live = Live::start_on(&case, &tools, &pin_parent, None, &opts)?;
        for n in &live.cluster.nodes {
            let agent = n.agent.as_ref().expect("started");
            let at = match n.address {
                Some(a) => format!(" {} at {a}, pods {}", n.name, n.subnet),
                None => String::new(),
            };
            println!(
                "node   {at} network namespace {}, palisade-agent pid {} (standalone: reads {})",
                n.netns.as_ref().map(|x| x.name.as_str()).unwrap_or("-"),
                agent.pid(),
                live.cluster.manifests().display()
            );
        }
        println!(
            "pods    wired by the palisade CNI plugin (CNI ADD from the node, IPAM {}), set up in {:.1} s:",
            live.cluster.subnet,
            t.elapsed().as_secs_f64()
        );
        let rows: Vec<(String, Vec<String>)> = case
            .pods
            .iter()
            .map(|p| {
                let pod = live.cluster.pod(&p.key()).expect("added");
                let labels = p
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let serves = if p.ports.is_empty() {
                    "-".to_string()
                } else {
                    p.ports
                        .iter()
                        .map(|q| format!("{}/{}", q.port, q.protocol))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                let node = &live.cluster.nodes[pod.node].name;
                let at = if node.is_empty() {
                    pod.ip.to_string()
                } else {
                    format!("{} ({node})", pod.ip)
                };
                (
                    format!("  {}", p.key()),
                    vec![at, labels, serves, pod.host_if.clone()],
                )
            })
            .collect();
        print!(
            "{}",
            table(
                "",
                &[
                    "address".into(),
                    "labels".into(),
                    "serves".into(),
                    "host veth".into()
                ],
                &rows,
                &|c| c.to_string()
            )
        );

        // kube-dns: the Service, its names, the pods' resolver.
        live.cluster
            .write_object("svc-kube-system-kube-dns.yaml", &kube_dns_service()?)?;
        live.cluster.sync()?;
        dns::set_records(case.pods.iter().map(|p| {
            (
                format!("{}.{}.svc.cluster.local", p.name, p.namespace),
                live.ip(&p.key()),
            )
        }));
        let resolv = live.cluster.dir().join("resolv.conf");
        std::fs::write(&resolv, RESOLV_CONF)?;
        let dns_netns = live.cluster.pod(DNS_CLIENT).expect("added").netns_path();
        println!(
            "dns     Service {KUBE_DNS} ClusterIP {KUBE_DNS_IP}:53 UDP/TCP -> kube-system/coredns (EndpointSlice derived from its selector); pods resolve through it (nameserver {KUBE_DNS_IP}, search app.svc.cluster.local)"
        );

        let mut all_ok = true;
        for (i, (step, n)) in case.steps.iter().zip(&NARRATION).enumerate() {
            signal::check()?;
            println!();
            println!("{}", style.bold(&format!("Step {i}: {}", n.title)));
            for l in n.lines {
                println!("  {l}");
            }
            let mut tails: Vec<Tail> = live
                .cluster
                .flow_logs()
                .iter()
                .map(|f| Tail::new(f))
                .collect();
            let t = Instant::now();
            let notes = live.apply(step)?;
            let generation = live.cluster.status()?.programmed_generation;
            let synced = t.elapsed();
            for n in notes {
                println!("  note: {n}");
            }
            let t = Instant::now();
            let seen = probe_all(&live)?;
            let probed = t.elapsed();
            println!(
                "  {}",
                style.dim(&format!(
                    "(agent synced in {} ms, programmed generation {generation}; {} connections attempted at once in {:.1} s)",
                    synced.as_millis(),
                    seen.len(),
                    probed.as_secs_f64()
                ))
            );
            println!();
            print!("{}", matrix(&seen, style));

            let ip = |k: &str| live.ip(k);
            let drops: Vec<(usize, usize)> = seen
                .iter()
                .filter(|(_, ok)| !**ok)
                .map(|(k, _)| *k)
                .collect();
            // Every node's flow log: across nodes a connection is judged by
            // the source's node (egress) and the destination's (ingress).
            let mut flows = Vec::new();
            for tail in &mut tails {
                flows.extend(tail.gather(Duration::from_millis(1500), |fs| {
                    drops.iter().all(|(r, c)| {
                        let (dst, port, proto) = SERVICES[*c];
                        fs.iter().any(|f| {
                            f.verdict == "DROP"
                                && f.is(ip(SOURCES[*r]), ip(dst), port, proto.as_str())
                        })
                    })
                }));
            }
            let on = |f: &Flow| {
                f.node
                    .as_ref()
                    .map(|n| format!("[{n}] "))
                    .unwrap_or_default()
            };
            if !drops.is_empty() {
                println!();
                println!("  Why each drop happened (agent flow log):");
                for (r, c) in &drops {
                    let (dst, port, proto) = SERVICES[*c];
                    let rec: Option<&Flow> = flows.iter().find(|f| {
                        f.verdict == "DROP" && f.is(ip(SOURCES[*r]), ip(dst), port, proto.as_str())
                    });
                    match rec {
                        Some(f) => println!(
                            "    {}",
                            style.paint("31", &format!("{}{}", on(f), f.describe()))
                        ),
                        None => println!(
                            "    {} -> {dst}:{port} {proto}: dropped, but no DROP record reached the flow log",
                            SOURCES[*r]
                        ),
                    }
                }
            }
            let allowed: Vec<String> = seen
                .iter()
                .filter(|(_, ok)| **ok)
                .filter_map(|((r, c), _)| {
                    let (dst, port, proto) = SERVICES[*c];
                    let by: Vec<String> = flows
                        .iter()
                        .filter(|f| f.verdict == "ALLOW" && !f.policies.is_empty())
                        .filter(|f| f.is(ip(SOURCES[*r]), ip(dst), port, proto.as_str()))
                        .map(|f| {
                            format!(
                                "{}{} of {} by {}",
                                on(f),
                                f.direction,
                                f.endpoint,
                                f.policies.join(", ")
                            )
                        })
                        .collect();
                    (!by.is_empty()).then(|| {
                        format!(
                            "ALLOW {} -> {dst}:{port} {proto}: {}",
                            SOURCES[*r],
                            by.join("; ")
                        )
                    })
                })
                .collect();
            if !allowed.is_empty() {
                println!();
                println!("  What allowed each permitted connection (agent flow log):");
                for a in allowed {
                    println!("    {}", style.paint("32", &a));
                }
            }

            // DNS the way a pod does it: its resolver, the kube-dns
            // ClusterIP, translated to coredns before policy judges it.
            // The client's node records its egress (every node's log: the
            // demo may run on several).
            let mut dns_tails: Vec<Tail> = live
                .cluster
                .flow_logs()
                .iter()
                .map(|f| Tail::new(f))
                .collect();
            let got = resolve(&dns_netns, &resolv, DNS_NAME)?;
            let dns_ok = got == Some(live.ip("app/backend"));
            let client_ip = live.ip(DNS_CLIENT);
            let named = |f: &Flow| {
                f.src.ip == client_ip
                    && f.dst.port == Some(53)
                    && f.service.as_deref() == Some(KUBE_DNS)
            };
            let mut dns_flows = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                for t in &mut dns_tails {
                    dns_flows.extend(t.read());
                }
                if dns_flows.iter().any(named) || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            println!();
            match got {
                Some(a) => println!(
                    "  DNS: {DNS_CLIENT} resolves {DNS_NAME} -> {a} (getent, through {KUBE_DNS} {KUBE_DNS_IP}:53)"
                ),
                None => println!(
                    "  DNS: {DNS_CLIENT} cannot resolve {DNS_NAME}: no answer from {KUBE_DNS} {KUBE_DNS_IP}:53"
                ),
            }
            match dns_flows.iter().find(|f| named(f)) {
                Some(f) => {
                    let colour = if f.verdict == "ALLOW" { "32" } else { "31" };
                    println!("    {}", style.paint(colour, &f.describe()));
                }
                None => {
                    all_ok = false;
                    println!("    no flow record naming {KUBE_DNS} reached the flow log");
                }
            }
            if dns_ok != DNS_EXPECT[i] {
                all_ok = false;
                println!(
                    "  {} DNS through the ClusterIP: NetworkPolicy requires {}, saw {}",
                    style.paint("1;31", "✗"),
                    if DNS_EXPECT[i] { "an answer" } else { "none" },
                    got.map_or("none".to_string(), |a| a.to_string())
                );
            }

            let want = expected(n)?;
            let wrong: Vec<String> = want
                .iter()
                .filter(|(k, w)| seen.get(k) != Some(w))
                .map(|((r, c), w)| {
                    let (dst, port, proto) = SERVICES[*c];
                    format!(
                        "{} -> {dst}:{port} {proto}: NetworkPolicy requires {}, saw {}",
                        SOURCES[*r],
                        if *w { "pass" } else { "DROP" },
                        if seen[&(*r, *c)] { "pass" } else { "DROP" }
                    )
                })
                .collect();
            let passed = seen.values().filter(|v| **v).count();
            println!();
            if wrong.is_empty() {
                println!(
                    "  {} {passed} pass, {} dropped: exactly what NetworkPolicy semantics require",
                    style.paint("32", "✓"),
                    seen.len() - passed
                );
            } else {
                all_ok = false;
                println!(
                    "  {} {} connections differ from NetworkPolicy semantics:",
                    style.paint("1;31", "✗"),
                    wrong.len()
                );
                for w in wrong {
                    println!("    {w}");
                }
            }
            if i == DOMAIN_STEP && !domain_step(&live, &case, &tools, style)? {
                all_ok = false;
            }
        }

        println!();
        for n in &live.cluster.nodes {
            let title = if n.name.is_empty() {
                "palisade-agent status".to_string()
            } else {
                format!("palisade-agent status on {}", n.name)
            };
            println!("{}", style.bold(&title));
            let agent = n.agent.as_ref().expect("running");
            match status_output(&tools.agent, &agent.socket) {
                Ok(s) => print!("{s}"),
                Err(e) => {
                    all_ok = false;
                    println!("  {e:#}");
                }
            }
        }
        println!();
        let errs = live.cluster.teardown();
        if errs.is_empty() {
            println!("{}", style.dim("cleaned up: CNI DEL of every pod, their namespaces, the agent, its pinned maps and programs, the node."));
        } else {
            for e in errs {
                println!("cleanup: {e}");
            }
        }
        Ok(all_ok)
    })();
    drop(pins);
    result
}

fn main() -> ExitCode {
    if !palisade_tests::require_root() {
        eprintln!("demo: needs root (network namespaces, BPF)");
        return ExitCode::from(2);
    }
    signal::install();
    // SAFETY: isatty on a standard fd.
    let color = unsafe { libc::isatty(1) } == 1 && std::env::var_os("NO_COLOR").is_none();
    match run(&Style { color }) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "demo: what the datapath did differs from NetworkPolicy semantics (see above)"
            );
            ExitCode::FAILURE
        }
        Err(e) if signal::interrupted() => {
            eprintln!("demo: interrupted ({e:#}); everything it made was removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
