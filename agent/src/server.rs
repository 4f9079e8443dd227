//! `palisade-agent run`: wires the agent to the world. One owner thread
//! holds the `Agent` (see `owner`); around it run the API socket (CNI
//! registrations, status, trace, sync), the flow socket (observe), the
//! event reader, the sources, conntrack GC and the HTTP endpoints, each
//! talking to the owner through its handle or reading what it publishes.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use palisade_api::{ErrorKind, Request, Response};
use palisade_dataplane::{events::EventReader, StatsReader};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    sync::{broadcast, mpsc, watch},
    task::JoinSet,
};
use tracing::{error, info, warn};

use crate::{
    change::SourceEvent,
    daemon::{Agent, Config, SharedServices, SharedView},
    dataplane::ConntrackFill,
    error::kind_of,
    flowlog::{self, FlowLog},
    http::{self, HttpState},
    metrics::{KernelStats, Metrics},
    owner::{Handle, Levels, Owner},
    source::{ManifestHandle, ManifestSource},
    tools::{gate_readiness, periodic_verify, Tools},
};

/// The flow stream lives next to the API socket.
pub fn flow_socket(api_socket: &Path) -> PathBuf {
    api_socket.with_file_name("flows.sock")
}

/// How the API asks the source to re-read (standalone manifests).
type Rescan = Option<Arc<ManifestHandle>>;

pub async fn run(cfg: Config) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (mut agent, events, generation_rx) = Agent::start(&cfg, metrics.clone())?;
    // Egress by domain name: what an earlier agent learned is in force
    // from the first sync (entries past their TTL are dropped on load).
    let learned_file = cfg.state_dir.join("dns-learned.json");
    let learned = crate::fqdn::cache::Cache::load(&learned_file, crate::fqdn::snoop::now_ms());
    agent.preload_learned(learned.addresses());
    metrics.dns.learned_addresses.set(learned.len() as u64);
    agent.set_dns_servers(
        palisade_dataplane::dns::DnsServers::open(&cfg.pins).context("opening DNS_SERVERS")?,
    );
    let learned = Arc::new(std::sync::Mutex::new(learned));
    agent.set_learned_cache(learned.clone());
    let fqdn_rules = agent.fqdn_rules.clone();
    let view = agent.view.clone();
    let services = agent.services.clone();
    let (stats, conntrack) = (agent.stats_reader(), agent.conntrack_fill());
    let (source_tx, source_rx) = mpsc::channel::<SourceEvent>(64);
    let owner = Owner::spawn(agent, source_rx)?;
    let handle = owner.handle.clone();
    let mut tasks = JoinSet::new();
    let tools = Tools::new(
        cfg.flow_log.clone(),
        cfg.pins.clone(),
        cfg.map_sizes.clone(),
        metrics.clone(),
    );

    // /healthz answers from the start; /readyz only after the first sync.
    // Neither they nor /metrics ever wait for the owner.
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = cfg.metrics_addr {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        let levels = owner.levels.clone();
        let ready = if cfg.verify_readiness {
            gate_readiness(owner.ready.clone(), tools.verified())
        } else {
            owner.ready.clone()
        };
        let state = HttpState {
            ready,
            metrics: metrics.clone(),
            kernel: Arc::new(move || kernel_stats(stats.as_ref(), &conntrack, &levels.borrow())),
        };
        tokio::spawn(async move {
            let stopped = async {
                let _ = http_stopped.await;
            };
            if let Err(e) = http::serve(l, state, stopped).await {
                error!("http endpoints: {e:#}");
            }
        });
    }

    let manifests = if cfg.kubernetes {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?;
        let watch = crate::k8s::spawn(client, cfg.node_name.clone(), source_tx.clone()).await?;
        tasks.spawn(async move {
            if let Err(e) = watch.await {
                error!("the Kubernetes source stopped: {e}");
            }
        });
        None
    } else {
        let dir = cfg
            .manifests
            .clone()
            .context("standalone mode needs --manifests DIR (or --kubernetes inside a cluster)")?;
        Some(Arc::new(ManifestSource::spawn(dir, source_tx.clone())?))
    };
    // The first complete view is in force before the API answers: a pod
    // registered earlier would run without the policies that select it.
    owner
        .ready
        .clone()
        .wait_for(|ready| *ready)
        .await
        .context("the agent stopped before its first sync")?;

    // The DNS task: held answers are learned from, then sent on.
    {
        let peers = palisade_dataplane::dns::ConntrackPeers::open(&cfg.pins)
            .context("opening conntrack for the DNS task")?;
        crate::fqdn::snoop::Snooper::new(
            palisade_dataplane::dns::HeldReader::open(&cfg.pins).context("opening DNS_HELD")?,
            crate::fqdn::snoop::Injector::open().context("opening the DNS answer socket")?,
            fqdn_rules,
            learned.clone(),
            crate::fqdn::snoop::Config {
                limits: cfg.dns.limits,
                hold_timeout: cfg.dns.hold_timeout,
                state_file: learned_file,
                in_use_grace: Duration::from_secs(30),
            },
            handle.clone(),
            tokio::runtime::Handle::current(),
            metrics.clone(),
            Box::new(move || peers.addresses()),
        )
        .spawn()
        .context("starting the DNS task")?;
    }

    let flowlog = Arc::new(Mutex::new(
        FlowLog::open(&cfg.flow_log, cfg.flow_log_max_bytes)
            .with_context(|| format!("opening flow log {}", cfg.flow_log.display()))?,
    ));
    let (flow_tx, _) = broadcast::channel::<String>(4096);
    tasks.spawn(read_events(
        events,
        view,
        services,
        learned.clone(),
        metrics.clone(),
        flowlog.clone(),
        flow_tx.clone(),
    ));

    let api = bind_unix(&cfg.socket)?;
    let flows = bind_unix(&flow_socket(&cfg.socket))?;
    tasks.spawn(serve_api(
        api,
        handle.clone(),
        manifests.clone(),
        generation_rx,
        tools.clone(),
    ));
    if let Some(every) = cfg.verify_interval {
        tasks.spawn(periodic_verify(tools.clone(), handle.clone(), every));
    }
    tasks.spawn(serve_flows(flows, flowlog.clone(), flow_tx.clone()));
    tasks.spawn(gc(handle.clone()));
    tasks.spawn(reap_endpoints(handle.clone(), cfg.endpoint_check_interval));
    drop(handle);
    info!("palisade-agent ready on {}", cfg.socket.display());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Graceful: stop taking work, let the owner finish what it has, flush.
    // Programs, links and maps stay pinned: enforcement continues, and the
    // next agent adopts them.
    info!("shutting down; programs stay attached");
    let _ = std::fs::remove_file(&cfg.socket);
    let _ = std::fs::remove_file(flow_socket(&cfg.socket));
    let _ = stop_http.send(());
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(source_tx);
    drop(manifests);
    owner.shutdown().await?;
    info!("stopped");
    Ok(())
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Accept errors (e.g. out of descriptors) back off instead of spinning.
async fn accept_backoff(e: std::io::Error) {
    warn!("accepting a connection: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve_api(
    l: UnixListener,
    handle: Handle,
    rescan: Rescan,
    generation: watch::Receiver<u64>,
    tools: Arc<Tools>,
) {
    loop {
        let conn = match l.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                accept_backoff(e).await;
                continue;
            }
        };
        let (handle, rescan, generation) = (handle.clone(), rescan.clone(), generation.clone());
        let tools = tools.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_api(conn, handle, rescan, generation, tools).await {
                warn!("api connection: {e:#}");
            }
        });
    }
}

/// A request line larger than this is refused (`preview` carries policy
/// objects).
const MAX_REQUEST: u64 = 1024 * 1024;

async fn handle_api(
    conn: UnixStream,
    handle: Handle,
    rescan: Rescan,
    mut generation: watch::Receiver<u64>,
    tools: Arc<Tools>,
) -> Result<()> {
    let uid = conn
        .peer_cred()
        .context("reading the caller's credentials")?
        .uid();
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST));
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .context("reading the request timed out")??;
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::error(ErrorKind::InvalidRequest, format!("malformed request: {e}")),
        Ok(req) if changes_endpoints(&req) && !may_change_endpoints(uid) => {
            warn!("refused a registration change from uid {uid}");
            Response::error(
                ErrorKind::Forbidden,
                format!("uid {uid} may not register or remove endpoints (root or the agent's user only)"),
            )
        }
        Ok(req) => dispatch(req, &handle, &rescan, &mut generation, &tools).await,
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

fn changes_endpoints(req: &Request) -> bool {
    matches!(req, Request::Register(_) | Request::Deregister { .. })
}

/// Registering an endpoint makes the agent attach to an interface and vouch
/// for an address; only root (the CNI plugin runs as root under the
/// container runtime) or the agent's own user may, whatever the socket's
/// mode (0600 by default) is later loosened to for the read-only tools.
fn may_change_endpoints(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// The error answer, its kind read from the typed errors in the chain.
fn error(e: anyhow::Error) -> Response {
    Response::error(kind_of(&e), format!("{e:#}"))
}

fn ok(generation: u64, endpoint_id: Option<u32>) -> Response {
    Response::Ok {
        generation,
        endpoint_id,
    }
}

/// Re-read the source (standalone) and wait until what it found is
/// programmed; the generation that includes it.
async fn sync_source(rescan: &Rescan, handle: &Handle) -> Result<u64> {
    if let Some(m) = rescan {
        // Returns once the rescan's event is queued, so the barrier below
        // comes after it.
        m.rescan().await;
    }
    handle.barrier().await
}

async fn dispatch(
    req: Request,
    handle: &Handle,
    rescan: &Rescan,
    generation: &mut watch::Receiver<u64>,
    tools: &Arc<Tools>,
) -> Response {
    match req {
        Request::Register(r) => match handle.register(r).await {
            Ok((id, g)) => ok(g, Some(id)),
            Err(e) => error(e),
        },
        Request::Deregister { container_id, .. } => match handle.deregister(container_id).await {
            Ok(g) => ok(g, None),
            Err(e) => error(e),
        },
        Request::Status => match handle.status().await {
            Ok(s) => Response::Status(Box::new(s)),
            Err(e) => error(e),
        },
        Request::WaitProgrammed {
            generation: want,
            timeout_ms,
        } => {
            let wait = generation.wait_for(|g| *g >= want);
            match tokio::time::timeout(Duration::from_millis(timeout_ms), wait).await {
                Ok(Ok(g)) => ok(*g, None),
                _ => Response::error(
                    ErrorKind::Unavailable,
                    format!("generation {want} not programmed within {timeout_ms} ms"),
                ),
            }
        }
        Request::Sync => match sync_source(rescan, handle).await {
            Ok(g) => ok(g, None),
            Err(e) => error(e),
        },
        Request::Trace(t) => match handle.trace(t).await {
            Ok(r) => Response::Trace(r),
            Err(e) => error(e),
        },
        Request::Verify => match tools.verify(handle).await {
            Ok(r) => Response::Verify(Box::new(r)),
            Err(e) => error(e),
        },
        Request::Coverage => match handle.with(|a| crate::coverage::report(a.model())).await {
            Ok(r) => Response::Coverage(Box::new(r)),
            Err(e) => error(e),
        },
        Request::Preview(p) => match tools.preview(handle, p).await {
            Ok(r) => Response::Preview(Box::new(r)),
            Err(e) => Response::error(ErrorKind::InvalidRequest, format!("{e:#}")),
        },
    }
}

/// Kernel events -> flow records. The ring buffer's descriptor is polled
/// through tokio (the programs wake readers only once a backlog builds up,
/// so it is also drained every 100 ms).
async fn read_events(
    events: EventReader,
    view: SharedView,
    services: SharedServices,
    learned: crate::fqdn::snoop::SharedCache,
    metrics: Arc<Metrics>,
    log: Arc<Mutex<FlowLog>>,
    tx: broadcast::Sender<String>,
) {
    // SAFETY: the ring buffer map owns its descriptor for as long as the
    // EventReader (moved into the AsyncFd) lives, and never replaces it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            EventFd(events),
            tokio::io::Interest::READABLE,
        )
    };
    let mut events = match registered {
        Ok(fd) => fd,
        Err(e) => {
            error!("flow events: cannot poll the ring buffer: {e}; no flow records");
            return;
        }
    };
    loop {
        tokio::select! {
            r = events.readable_mut() => if let Ok(mut guard) = r {
                guard.clear_ready();
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let batch = events.get_mut().0.drain();
        if batch.is_empty() {
            continue;
        }
        let v = view.read().unwrap_or_else(|p| p.into_inner()).clone();
        let svcs = services.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        for e in &batch {
            let mut rec = flowlog::record(&v, e);
            flowlog::name_service(&mut rec, e, &svcs);
            if rec.direction == "egress" {
                // Held only for the lookup: the DNS task takes this lock
                // with an answer held.
                rec.domains = learned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .names_of(rec.dst.ip)
                    .into_iter()
                    .map(str::to_string)
                    .collect();
            }
            let Ok(line) = serde_json::to_string(&rec) else {
                continue;
            };
            if let Err(err) = log.write(&line) {
                error!("writing flow log: {err}");
            }
            metrics.flow_records.inc();
            metrics.flow_families.count(&rec);
            metrics.policy_decisions.count(&rec);
            metrics.events_suppressed.count(&rec);
            let _ = tx.send(line);
        }
    }
}

struct EventFd(EventReader);

impl std::os::fd::AsRawFd for EventFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.fd()
    }
}

/// `observe`: the client sends "recent", "follow" or "recent follow", or
/// "since=SECS" (seconds since the epoch; from the flow log files rather
/// than the in-memory history), optionally with "follow".
async fn serve_flows(l: UnixListener, log: Arc<Mutex<FlowLog>>, tx: broadcast::Sender<String>) {
    loop {
        let conn = match l.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                accept_backoff(e).await;
                continue;
            }
        };
        let (log, mut rx) = (log.clone(), tx.subscribe());
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut mode = String::new();
            if BufReader::new(r).read_line(&mut mode).await.is_err() {
                return;
            }
            if let Some(since) = since_of(&mode) {
                let path = log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .path()
                    .to_path_buf();
                let lines = tokio::task::spawn_blocking(move || {
                    crate::preview::read_records(&path, Some(since))
                })
                .await
                .unwrap_or_default();
                for rec in lines {
                    let Ok(line) = serde_json::to_string(&rec) else {
                        continue;
                    };
                    if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            } else if mode.contains("recent") {
                let recent: Vec<String> = log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .recent()
                    .cloned()
                    .collect();
                for line in recent {
                    if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
            if !mode.contains("follow") {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(line) => {
                        if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = w
                            .write_all(format!("{{\"lagged\":{n}}}\n").as_bytes())
                            .await;
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

/// "since=SECS" in an observe request.
fn since_of(mode: &str) -> Option<std::time::SystemTime> {
    let secs = mode
        .split_whitespace()
        .find_map(|w| w.strip_prefix("since="))?
        .parse()
        .ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Expired conntrack and fragment entries.
/// Endpoints whose interface vanished without a deregistration go.
async fn reap_endpoints(handle: Handle, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        match handle.with(|a| a.reap_vanished_endpoints()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!("forgot {n} endpoints whose interface is gone"),
            Ok(Err(e)) | Err(e) => warn!("checking endpoints: {e:#}"),
        }
    }
}

async fn gc(handle: Handle) {
    // Asks the owner once for map handles of its own; the passes (a walk of
    // the whole conntrack map) then never wait for or hold up the agent.
    let (mut gc, fill) = match handle.with(|a| a.conntrack_gc()).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) | Err(e) => {
            error!("conntrack gc not running: {e:#}");
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tick.tick().await;
        let r = tokio::task::spawn_blocking(move || {
            release_free_memory();
            let r = gc.pass(palisade_dataplane::maps::ct_clock_ns());
            (gc, r)
        })
        .await;
        let r = match r {
            Ok((g, r)) => {
                gc = g;
                r
            }
            Err(e) => {
                error!("conntrack gc stopped: {e}");
                return;
            }
        };
        match r {
            Ok(pass) => {
                if pass.orphans_removed > 0 {
                    info!(
                        "conntrack gc: {} entries of endpoints that are gone removed",
                        pass.orphans_removed
                    );
                }
                for (id, c) in &pass.over_budget {
                    warn!(
                        endpoint_id = id,
                        entries = c.entries,
                        fragments = c.fragments,
                        "endpoint holds its whole conntrack budget: its new flows that need an entry are dropped (conntrack-budget)"
                    );
                }
                if pass.removed > 0 {
                    tracing::debug!(
                        "conntrack gc: {} expired entries removed, {} left",
                        pass.removed,
                        pass.conntrack_entries
                    );
                }
                fill.record(pass);
            }
            Err(e) => warn!("conntrack gc: {e:#}"),
        }
    }
}

/// What /metrics shows of the kernel: counters through a reader of their
/// own, conntrack fill from the GC's last pass, the rest as the owner last
/// published it. No map walk, no wait for the owner.
fn kernel_stats(
    stats: Option<&StatsReader>,
    conntrack: &ConntrackFill,
    levels: &Levels,
) -> KernelStats {
    let mut k = KernelStats::default();
    if let Some(Ok(c)) = stats.map(|s| s.counters()) {
        for (i, n) in c.0.iter().enumerate() {
            let r = i as u8;
            if *n > 0 || palisade_common::reason::is_drop(r) {
                let name = palisade_common::reason::name(r);
                if name != "none" {
                    k.reasons
                        .push((name, palisade_common::reason::is_drop(r), *n));
                }
            }
        }
    }
    if let Some(Ok(c)) = stats.map(|s| s.xdp_counters()) {
        k.xdp = c.named();
    }
    let last_gc = conntrack.last();
    k.maps = levels
        .maps
        .iter()
        .map(|m| match (&last_gc, m.name.as_str()) {
            (Some(p), "conntrack") => (m.name.clone(), p.conntrack_entries, p.conntrack_max as u64),
            (Some(p), "fragments") => (m.name.clone(), p.fragment_entries, p.fragment_max as u64),
            _ => (m.name.clone(), m.entries, m.max_entries),
        })
        .collect();
    k.endpoints = levels.endpoints;
    k.conntrack_over_budget = last_gc.map_or(0, |p| p.over_budget.len() as u64);
    k
}

/// Hands the heap's free pages back to the kernel: registration churn and
/// resyncs free memory glibc would otherwise keep resident. Run with every
/// GC pass, off the owner's path.
fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own arenas; thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
