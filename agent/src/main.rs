//! palisade-agent: the daemon (`run`) and the operator CLI (`status`,
//! `observe`, `trace`, `sync`, `cleanup`, `install-cni`).
use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use palisade_agent::{
    cli,
    daemon::{Config, METRICS_DEFAULT_ADDR},
    server,
};
use palisade_api::{Request, Response, TraceRequest, DEFAULT_SOCKET};
use palisade_dataplane::{pins, Pins};

#[derive(Parser)]
#[command(
    name = "palisade-agent",
    version,
    about = "palisade's per-node NetworkPolicy agent and operator CLI"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct SocketArg {
    /// The agent's API socket.
    #[arg(long, default_value = DEFAULT_SOCKET, env = "PALISADE_SOCKET")]
    socket: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (foreground).
    Run(RunArgs),
    /// Endpoints, identities, policies and map fill levels.
    Status {
        #[command(flatten)]
        s: SocketArg,
        #[arg(long)]
        json: bool,
    },
    /// Flow records, filtered; recent ones, then live with --follow.
    Observe(cli::ObserveArgs),
    /// The verdict for a new flow and the policies that decide it. Exit
    /// status 0 when allowed, 3 when policy denies it (DROP, or AUDIT in
    /// audit mode).
    Trace {
        #[command(flatten)]
        s: SocketArg,
        /// namespace/pod
        #[arg(long)]
        from: String,
        /// namespace/pod, an IPv4 address, or svc/<namespace>/<name>: every
        /// backend of that Service port (verdict PARTIAL when only some
        /// would be allowed)
        #[arg(
            long,
            required_unless_present = "to_domain",
            conflicts_with = "to_domain"
        )]
        to: Option<String>,
        /// A domain name: every address learned for it from the cluster
        /// DNS (egress by domain name), each traced.
        #[arg(long)]
        to_domain: Option<String>,
        /// PORT/PROTOCOL, e.g. 8080/TCP (protocol defaults to TCP; for
        /// svc/..., the Service port)
        #[arg(long)]
        port: String,
        /// ipv4 or ipv6: which addresses of the pods the flow uses
        /// (default: IPv6 when --from or --to is an IPv6 address).
        #[arg(long)]
        family: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Re-read the source now and wait until the result is programmed.
    Sync {
        #[command(flatten)]
        s: SocketArg,
    },
    /// Detach every program and remove palisade's pinned state (uninstall).
    Cleanup {
        #[arg(long, default_value = pins::DEFAULT_ROOT)]
        pin_root: PathBuf,
    },
    /// Install the CNI binary and a conflist atomically (DaemonSet init).
    InstallCni(cli::InstallCniArgs),
    /// Prove the kernel enforces what the model says: probe packets through
    /// the programs' own verdict path against the live maps (nothing sent,
    /// nothing recorded) and compare with the model. Exit 1 on a mismatch.
    Verify {
        #[command(flatten)]
        s: SocketArg,
        #[command(flatten)]
        o: cli::OutputArg,
    },
    /// Which pods and namespaces policy isolates and by what, and the
    /// classic mistakes. Exit 1 when a --require check fails.
    Coverage(cli::CoverageArgs),
    /// The effect of applying (-f) or deleting (--delete) NetworkPolicies
    /// on the flows in the flow log; nothing is applied.
    Preview(cli::PreviewArgs),
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    s: SocketArg,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = pins::DEFAULT_ROOT)]
    pin_root: PathBuf,
    /// Where the endpoint registry is kept.
    #[arg(long, default_value = "/var/run/palisade")]
    state_dir: PathBuf,
    /// Standalone mode: a directory of YAML manifests (Namespaces, Pods, NetworkPolicies).
    #[arg(long, conflicts_with = "kubernetes")]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster config or KUBECONFIG).
    #[arg(long)]
    kubernetes: bool,
    /// This node's name (Kubernetes mode).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    #[arg(long, default_value = "/var/log/palisade/flows.jsonl")]
    flow_log: PathBuf,
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    flow_log_max_bytes: u64,
    /// Address of /metrics, /healthz, /readyz: "node" (the node's address
    /// from NODE_IP, else 127.0.0.1; port 9962), an address:port, or "off".
    #[arg(long, default_value = METRICS_DEFAULT_ADDR)]
    metrics_addr: String,
    /// Global audit mode: would-be drops pass and are logged as AUDIT.
    #[arg(long)]
    audit: bool,
    /// The node's own addresses, IPv4 or IPv6 (reserved `host`
    /// identity); repeatable.
    #[arg(long = "host-ip")]
    host_ips: Vec<IpAddr>,
    /// Attach the XDP prefilter to this uplink; repeatable.
    #[arg(long = "xdp-uplink")]
    xdp_uplinks: Vec<String>,
    /// A source prefix the XDP prefilter drops (e.g. 198.51.100.0/24); repeatable.
    #[arg(long = "xdp-deny")]
    xdp_deny: Vec<ipnetwork::Ipv4Network>,
    /// Entries of the policy map, for its one-port entries (a hash) and
    /// for its wider ones (a trie) each (a full map is an error and a metric).
    #[arg(long, default_value_t = palisade_common::sizes::POLICY)]
    policy_map_entries: u32,
    /// Entries of the ipcache, for its /32s (a hash) and for its shorter
    /// prefixes (a trie) each.
    #[arg(long, default_value_t = palisade_common::sizes::IPCACHE)]
    ipcache_map_entries: u32,
    #[arg(long, default_value_t = palisade_common::sizes::ENDPOINTS)]
    endpoint_map_entries: u32,
    #[arg(long, default_value_t = palisade_common::sizes::CONNTRACK)]
    conntrack_map_entries: u32,
    /// Run `verify` in the agent this often, e.g. 5m ("off" disables).
    #[arg(long, default_value = "off")]
    verify_interval: String,
    /// /readyz fails while the last verify run found mismatches.
    #[arg(long)]
    verify_readiness: bool,
    /// How often endpoints whose host interface is gone are forgotten (a
    /// CNI DEL whose deregistration never reached the agent), e.g. 15s.
    #[arg(long, default_value = "15s")]
    endpoint_check_interval: String,
    /// Conntrack entries one pod may hold (its egress flows, and ingress
    /// flows from pods of this node it sends to, are charged to it; 0: no
    /// limit). A pod over it gets its new flows dropped as
    /// `conntrack-budget` where an entry is needed, never others' flushed.
    #[arg(long, default_value_t = palisade_common::ct_budget::ENTRIES)]
    conntrack_budget: u32,
    /// How the policy programs hook a pod's host-side interface: `filter`
    /// (a cls_bpf filter under clsact, first among filters; a hook that
    /// already runs TCX programs gets TCX instead, ahead of them) or `tcx`
    /// (always a pinned TCX link, first in its chain; every attach waits
    /// for an RCU grace period).
    #[arg(long, default_value = "filter", env = "PALISADE_POD_HOOK")]
    pod_hook: palisade_dataplane::PodHook,
    /// How an allowed packet from a pod to another pod of this node gets
    /// there: `redirect` (from the sender's host veth straight to the
    /// receiver's, TTL and MACs rewritten as a router does, the receiver's
    /// ingress policy judged as always; the node's IP stack and netfilter
    /// never see it) or `stack` (routed by the node like any other packet,
    /// e.g. for host firewall rules on pod-to-pod traffic).
    #[arg(long, default_value = "redirect", env = "PALISADE_LOCAL_DELIVERY")]
    local_delivery: palisade_dataplane::LocalDelivery,
    /// IP fragment records (first fragments in flight) one pod may hold
    /// (0: no limit).
    #[arg(long, default_value_t = palisade_common::ct_budget::FRAGMENTS)]
    fragment_budget: u32,
    /// Host protection (off by default): what pods send to their own node
    /// passes only on these ports, e.g. "53/UDP,53/TCP,ICMP" (a protocol
    /// alone opens all its ports; "none" closes every port). Replies to the
    /// node's own connections (kubelet probes) still pass.
    #[arg(long, env = "PALISADE_HOST_PROTECTION")]
    host_protection: Option<String>,
    /// Routing between nodes: native (a route per other node's pod range
    /// via its address), vxlan (an overlay the agent manages) or none
    /// (chained mode: the primary CNI routes). Needs --node-name.
    #[arg(long, env = "PALISADE_ROUTING", default_value = "native")]
    routing: palisade_agent::routing::Mode,
    /// The cluster DNS pods, NAMESPACE/KEY=VALUE[,KEY=VALUE]: egress by
    /// domain name learns addresses only from their answers (and from
    /// Services in front of them).
    #[arg(long, default_value = "kube-system/k8s-app=kube-dns")]
    cluster_dns: palisade_agent::fqdn::rules::ClusterDns,
    /// Seconds a learned address stays allowed at least, whatever the TTL.
    #[arg(long, default_value_t = 5)]
    dns_min_ttl: u32,
    /// Seconds a learned address stays allowed at most, whatever the TTL.
    #[arg(long, default_value_t = 86_400)]
    dns_max_ttl: u32,
    /// Addresses one domain name may hold (older ones are evicted).
    #[arg(long, default_value_t = 64)]
    dns_max_per_name: usize,
    /// Addresses the node may hold over all names.
    #[arg(long, default_value_t = 16_384)]
    dns_max_addresses: usize,
    /// Longest a DNS answer waits for its addresses to be programmed
    /// before it is sent on anyway (counted), e.g. 500ms.
    #[arg(long, default_value = "500ms")]
    dns_hold_timeout: String,
}

/// Logs go to stderr through tracing: `RUST_LOG` filters (default info),
/// `PALISADE_LOG_FORMAT=json` makes them JSON lines for log collectors.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = std::env::var("PALISADE_LOG_FORMAT").is_ok_and(|f| f == "json");
    // `try_init` also routes the `log` crate's records into tracing.
    let r = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = r {
        eprintln!("palisade-agent: logging not set up: {e}");
    }
}

fn main() -> ExitCode {
    init_logging();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("palisade-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn call(s: &SocketArg, req: &Request, timeout: Duration) -> Result<Response> {
    Ok(palisade_api::call(&s.socket, req, timeout)?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Run(a) => {
            let node_ip = std::env::var("NODE_IP").ok();
            let metrics_addr =
                palisade_agent::daemon::metrics_bind(&a.metrics_addr, node_ip.as_deref())?;
            let cfg = Config {
                socket: a.s.socket,
                pins: Pins::new(a.pin_root),
                state_dir: a.state_dir,
                manifests: a.manifests,
                kubernetes: a.kubernetes,
                node_name: a.node_name,
                flow_log: a.flow_log,
                flow_log_max_bytes: a.flow_log_max_bytes,
                metrics_addr,
                audit: a.audit,
                host_ips: a
                    .host_ips
                    .iter()
                    .filter_map(|ip| match ip {
                        IpAddr::V4(v4) => Some(*v4),
                        IpAddr::V6(_) => None,
                    })
                    .collect(),
                host_ips6: a
                    .host_ips
                    .iter()
                    .filter_map(|ip| match ip {
                        IpAddr::V6(v6) => Some(*v6),
                        IpAddr::V4(_) => None,
                    })
                    .collect(),
                xdp_uplinks: a.xdp_uplinks,
                xdp_deny: a.xdp_deny,
                map_sizes: palisade_dataplane::loader::MapSizes {
                    policy: a.policy_map_entries,
                    ipcache: a.ipcache_map_entries,
                    endpoints: a.endpoint_map_entries,
                    conntrack: a.conntrack_map_entries,
                    ..Default::default()
                },
                pod_hook: a.pod_hook,
                local_delivery: a.local_delivery,
                verify_interval: match a.verify_interval.as_str() {
                    "off" | "" | "0" => None,
                    s => Some(
                        humantime::parse_duration(s)
                            .with_context(|| format!("--verify-interval {s}"))?,
                    ),
                },
                verify_readiness: a.verify_readiness,
                routing: a.routing,
                endpoint_check_interval: humantime::parse_duration(&a.endpoint_check_interval)
                    .with_context(|| {
                        format!("--endpoint-check-interval {}", a.endpoint_check_interval)
                    })?,
                host_protection: a
                    .host_protection
                    .as_deref()
                    .map(palisade_agent::daemon::parse_host_ports)
                    .transpose()
                    .context("--host-protection")?,
                dns: palisade_agent::daemon::DnsConfig {
                    cluster_dns: a.cluster_dns,
                    limits: palisade_agent::fqdn::cache::Limits {
                        ttl_min_s: a.dns_min_ttl,
                        ttl_max_s: a.dns_max_ttl,
                        per_name: a.dns_max_per_name,
                        per_node: a.dns_max_addresses,
                    },
                    hold_timeout: humantime::parse_duration(&a.dns_hold_timeout)
                        .with_context(|| format!("--dns-hold-timeout {}", a.dns_hold_timeout))?,
                },
                conntrack_budget: palisade_common::ct_budget::CtBudget {
                    entries: if a.conntrack_budget == 0 {
                        u32::MAX
                    } else {
                        a.conntrack_budget
                    },
                    fragments: if a.fragment_budget == 0 {
                        u32::MAX
                    } else {
                        a.fragment_budget
                    },
                },
            };
            // Agent work is serialized by one lock: a few blocking threads
            // suffice, and glibc would give each of them its own malloc
            // arena (tens of MiB of RSS at 10k pods).
            // SAFETY: mallopt before any other thread exists.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(4)
                .enable_all()
                .build()?;
            rt.block_on(server::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { s, json } => match call(&s, &Request::Status, Duration::from_secs(10))? {
            Response::Status(r) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    print!("{}", cli::render_status(&r));
                }
                Ok(ExitCode::SUCCESS)
            }
            other => unexpected(other),
        },
        Cmd::Observe(a) => {
            let mut conn =
                UnixStream::connect(server::flow_socket(&a.socket)).with_context(|| {
                    format!(
                        "connecting to the flow stream next to {}",
                        a.socket.display()
                    )
                })?;
            let since = a.since.as_deref().map(cli::since_unix).transpose()?;
            let mode = match (since, a.follow) {
                (Some(s), true) => format!("since={s} follow\n"),
                (Some(s), false) => format!("since={s}\n"),
                (None, true) => "recent follow\n".into(),
                (None, false) => "recent\n".into(),
            };
            conn.write_all(mode.as_bytes())?;
            let filter = a.filter()?;
            let mut out = std::io::stdout().lock();
            let mut kept = Vec::new();
            for line in BufReader::new(conn).lines() {
                let line = line?;
                let Ok(rec) = serde_json::from_str::<palisade_agent::flowlog::FlowRecord>(&line)
                else {
                    continue;
                };
                if !filter.matches(&rec) {
                    continue;
                }
                if a.top.is_some() {
                    kept.push(rec);
                    continue;
                }
                if a.json {
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "{}", cli::render_flow(&rec))?;
                }
                out.flush()?;
            }
            if let Some(n) = a.top {
                let top = cli::top_drops(&kept, n);
                if a.json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&top)?)?;
                } else {
                    write!(out, "{}", cli::render_top(&top))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Trace {
            s,
            from,
            to_domain: Some(name),
            port,
            json,
            ..
        } => {
            let (port, protocol) = cli::parse_port(&port)?;
            let Response::Status(st) = call(&s, &Request::Status, Duration::from_secs(10))? else {
                anyhow::bail!("status: unexpected answer");
            };
            let want = palisade_agent::fqdn::pattern::normalize(&name);
            let addrs: Vec<IpAddr> = st
                .domains
                .iter()
                .filter(|d| d.name == want)
                .flat_map(|d| d.addresses.iter().map(|(a, _)| *a))
                .collect();
            if addrs.is_empty() {
                println!(
                    "{want}: no address learned (a pod that a domainNames rule selects learns them when it resolves the name); nothing is allowed by name yet"
                );
                return Ok(ExitCode::from(3));
            }
            let mut all = true;
            for a in addrs {
                let req = Request::Trace(TraceRequest {
                    from: from.clone(),
                    to: a.to_string(),
                    port,
                    protocol: protocol.clone(),
                    family: None,
                });
                match call(&s, &req, Duration::from_secs(10))? {
                    Response::Trace(r) => {
                        all &= r.verdict == "ALLOW";
                        if json {
                            println!("{}", serde_json::to_string_pretty(&r)?);
                        } else {
                            println!("{want} -> {a}");
                            print!("{}", cli::render_trace(&r));
                        }
                    }
                    other => return unexpected(other),
                }
            }
            Ok(if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Cmd::Trace {
            s,
            from,
            to,
            port,
            family,
            json,
            ..
        } => {
            let to = to.context("--to or --to-domain is required")?;
            let (port, protocol) = cli::parse_port(&port)?;
            let req = Request::Trace(TraceRequest {
                from,
                to,
                port,
                protocol,
                family,
            });
            match call(&s, &req, Duration::from_secs(10))? {
                Response::Trace(r) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r)?);
                    } else {
                        print!("{}", cli::render_trace(&r));
                    }
                    Ok(if r.verdict == "ALLOW" {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(3)
                    })
                }
                other => unexpected(other),
            }
        }
        Cmd::Sync { s } => match call(&s, &Request::Sync, Duration::from_secs(60))? {
            Response::Ok { generation, .. } => {
                println!("programmed generation {generation}");
                Ok(ExitCode::SUCCESS)
            }
            other => unexpected(other),
        },
        Cmd::Verify { s, o } => match call(&s, &Request::Verify, Duration::from_secs(300))? {
            Response::Verify(r) => {
                o.print(&*r, cli::render_verify)?;
                Ok(if r.mismatches.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            other => unexpected(other),
        },
        Cmd::Coverage(a) => {
            let s = SocketArg {
                socket: a.socket.clone(),
            };
            match call(&s, &Request::Coverage, Duration::from_secs(60))? {
                Response::Coverage(r) => {
                    let r = cli::coverage_in(*r, a.namespace.as_deref());
                    a.o.print(&r, cli::render_coverage)?;
                    let failed =
                        palisade_agent::coverage::failed_requirements(&r.findings, &a.require)
                            .map_err(anyhow::Error::msg)?;
                    for (name, n) in &failed {
                        eprintln!("require {name}: FAILED ({n} finding(s))");
                    }
                    Ok(if failed.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                other => unexpected(other),
            }
        }
        Cmd::Preview(a) => {
            let req = Request::Preview(a.request()?);
            let s = SocketArg {
                socket: a.socket.clone(),
            };
            match call(&s, &req, Duration::from_secs(300))? {
                Response::Preview(r) => {
                    a.o.print(&*r, cli::render_preview)?;
                    Ok(ExitCode::SUCCESS)
                }
                other => unexpected(other),
            }
        }
        Cmd::Cleanup { pin_root } => {
            palisade_dataplane::loader::remove_all(&Pins::new(&pin_root))?;
            let filters = palisade_dataplane::loader::remove_filters()?;
            println!(
                "removed {} and the pod filters of {filters} interfaces",
                pin_root.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::InstallCni(mut a) => {
            if a.kubernetes && a.pod_cidr.is_none() && cli::needs_pod_cidr(&a)? {
                let node = a
                    .node_name
                    .clone()
                    .context("--kubernetes needs --node-name or NODE_NAME")?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                a.pod_cidr = Some(rt.block_on(palisade_agent::k8s::node_pod_cidr(&node))?);
            }
            cli::install_cni(&a)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn unexpected(r: Response) -> Result<ExitCode> {
    match r {
        Response::Error { message, .. } => bail!("agent: {message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}
