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
    path::Path,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use palisade_tests::conformance::{
    case::{Case, Protocol},
    cluster::Tools,
    flows::{Flow, Tail},
    matrix::table,
    probe,
    runner::Live,
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
"#;

/// What each step means, and the matrix NetworkPolicy semantics require
/// (rows: sources in SOURCES order; columns: SERVICES; `-` is the pod itself).
struct Narration {
    title: &'static str,
    lines: &'static [&'static str],
    expect: &'static str,
}

const NARRATION: [Narration; 4] = [
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

fn run(style: &Style) -> Result<bool> {
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
        let mut live = Live::start(&case, &tools, &pin_parent, None, false)?;
        let agent = live.cluster.agent.as_ref().expect("started");
        println!(
            "node    network namespace {}, palisade-agent pid {} (standalone: reads {})",
            live.cluster.node()?.name,
            agent.pid(),
            live.cluster.manifests().display()
        );
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
                (
                    format!("  {}", p.key()),
                    vec![pod.ip.to_string(), labels, serves, pod.host_if.clone()],
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

        let mut all_ok = true;
        for (i, (step, n)) in case.steps.iter().zip(&NARRATION).enumerate() {
            signal::check()?;
            println!();
            println!("{}", style.bold(&format!("Step {i}: {}", n.title)));
            for l in n.lines {
                println!("  {l}");
            }
            let mut tail = Tail::new(&live.cluster.agent.as_ref().expect("running").flow_log);
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
            let flows = tail.gather(Duration::from_secs(3), |fs| {
                drops.iter().all(|(r, c)| {
                    let (dst, port, proto) = SERVICES[*c];
                    fs.iter().any(|f| {
                        f.verdict == "DROP" && f.is(ip(SOURCES[*r]), ip(dst), port, proto.as_str())
                    })
                })
            });
            if !drops.is_empty() {
                println!();
                println!("  Why each drop happened (agent flow log):");
                for (r, c) in &drops {
                    let (dst, port, proto) = SERVICES[*c];
                    let rec: Option<&Flow> = flows.iter().find(|f| {
                        f.verdict == "DROP" && f.is(ip(SOURCES[*r]), ip(dst), port, proto.as_str())
                    });
                    match rec {
                        Some(f) => println!("    {}", style.paint("31", &f.describe())),
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
                                "{} of {} by {}",
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
        }

        println!();
        println!("{}", style.bold("palisade-agent status"));
        let agent = live.cluster.agent.as_ref().expect("running");
        match status_output(&tools.agent, &agent.socket) {
            Ok(s) => print!("{s}"),
            Err(e) => {
                all_ok = false;
                println!("  {e:#}");
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
