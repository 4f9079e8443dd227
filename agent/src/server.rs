//! `palisade-agent run`: wires the agent to the world. The API socket (CNI
//! registrations, status, trace, sync), the flow socket (observe), the
//! event reader, source polling, conntrack GC and the metrics endpoint are
//! tasks around one shared `Agent`.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use log::{error, info, warn};
use palisade_api::{Request, Response};
use palisade_dataplane::events::EventReader;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    sync::{broadcast, watch},
};

use crate::{
    daemon::{Agent, Config, Shared},
    flowlog::{self, FlowLog},
    metrics::{KernelStats, Metrics},
    source::ManifestSource,
};

/// The flow stream lives next to the API socket.
pub fn flow_socket(api_socket: &Path) -> PathBuf {
    api_socket.with_file_name("flows.sock")
}

pub async fn run(cfg: Config) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (agent, events, generation_rx) = Agent::start(&cfg, metrics.clone())?;
    let shared: Shared = Arc::new(Mutex::new(agent));
    // /healthz answers from the start; /readyz only after the first sync.
    if let Some(addr) = cfg.metrics_addr {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        tokio::spawn(serve_http(l, shared.clone(), metrics.clone()));
    }

    let mut source = cfg
        .manifests
        .as_ref()
        .map(|d| ManifestSource::new(d.clone()));
    if cfg.kubernetes {
        crate::k8s::spawn(shared.clone(), cfg.node_name.clone()).await?;
    } else {
        let first = source
            .as_mut()
            .map(|s| s.scan(true))
            .unwrap_or_default()
            .unwrap_or_default();
        lock(&shared).apply_snapshot(first).context("first sync")?;
    }
    let source = Arc::new(Mutex::new(source));

    let flowlog = Arc::new(Mutex::new(
        FlowLog::open(&cfg.flow_log, cfg.flow_log_max_bytes)
            .with_context(|| format!("opening flow log {}", cfg.flow_log.display()))?,
    ));
    let (flow_tx, _) = broadcast::channel::<String>(4096);
    spawn_event_reader(events, shared.clone(), flowlog.clone(), flow_tx.clone());

    let api = bind_unix(&cfg.socket)?;
    let flows = bind_unix(&flow_socket(&cfg.socket))?;
    tokio::spawn(serve_api(
        api,
        shared.clone(),
        source.clone(),
        generation_rx,
    ));
    tokio::spawn(serve_flows(flows, flowlog, flow_tx));
    tokio::spawn(poll_source(shared.clone(), source));
    tokio::spawn(gc(shared.clone()));
    info!("palisade-agent ready on {}", cfg.socket.display());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Programs, links and maps stay pinned: enforcement continues, and the
    // next agent adopts them.
    info!("exiting; programs stay attached");
    let _ = std::fs::remove_file(&cfg.socket);
    let _ = std::fs::remove_file(flow_socket(&cfg.socket));
    Ok(())
}

pub fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Agent> {
    // A panic while holding the lock is a bug; the state is still the
    // kernel's mirror, so keep serving rather than poisoning every request.
    s.lock().unwrap_or_else(|p| p.into_inner())
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

async fn serve_api(
    l: UnixListener,
    shared: Shared,
    source: Arc<Mutex<Option<ManifestSource>>>,
    generation: watch::Receiver<u64>,
) {
    loop {
        let Ok((conn, _)) = l.accept().await else {
            continue;
        };
        let (shared, source, generation) = (shared.clone(), source.clone(), generation.clone());
        tokio::spawn(async move {
            if let Err(e) = handle_api(conn, shared, source, generation).await {
                warn!("api connection: {e:#}");
            }
        });
    }
}

async fn handle_api(
    conn: UnixStream,
    shared: Shared,
    source: Arc<Mutex<Option<ManifestSource>>>,
    mut generation: watch::Receiver<u64>,
) -> Result<()> {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
        Ok(req) => dispatch(req, &shared, &source, &mut generation).await,
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

fn error(e: anyhow::Error) -> Response {
    Response::Error {
        message: format!("{e:#}"),
    }
}

/// Blocking agent work (syscalls, compile) off the async threads.
async fn blocking<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&mut Agent) -> Result<T> + Send + 'static,
) -> Result<T> {
    let s = shared.clone();
    tokio::task::spawn_blocking(move || f(&mut lock(&s))).await?
}

async fn dispatch(
    req: Request,
    shared: &Shared,
    source: &Arc<Mutex<Option<ManifestSource>>>,
    generation: &mut watch::Receiver<u64>,
) -> Response {
    match req {
        Request::Register(r) => match blocking(shared, move |a| a.register(r)).await {
            Ok((id, g)) => Response::Ok {
                generation: g,
                endpoint_id: Some(id),
            },
            Err(e) => error(e),
        },
        Request::Deregister { container_id, .. } => {
            match blocking(shared, move |a| a.deregister(&container_id)).await {
                Ok(g) => Response::Ok {
                    generation: g,
                    endpoint_id: None,
                },
                Err(e) => error(e),
            }
        }
        Request::Status => Response::Status(Box::new(lock(shared).status())),
        Request::WaitProgrammed {
            generation: want,
            timeout_ms,
        } => {
            let wait = generation.wait_for(|g| *g >= want);
            match tokio::time::timeout(Duration::from_millis(timeout_ms), wait).await {
                Ok(Ok(g)) => Response::Ok {
                    generation: *g,
                    endpoint_id: None,
                },
                _ => Response::Error {
                    message: format!("generation {want} not programmed within {timeout_ms} ms"),
                },
            }
        }
        Request::Sync => {
            let source = source.clone();
            let r = blocking(shared, move |a| {
                let snap = source
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                    .and_then(|s| s.scan(true));
                match snap {
                    Some(s) => a.apply_snapshot(s),
                    None => Ok(a.programmed_generation()),
                }
            })
            .await;
            match r {
                Ok(g) => Response::Ok {
                    generation: g,
                    endpoint_id: None,
                },
                Err(e) => error(e),
            }
        }
        Request::Trace(t) => match lock(shared).trace(&t) {
            Ok(r) => Response::Trace(r),
            Err(e) => error(e),
        },
    }
}

/// Kernel events -> flow records, on a thread of its own (blocking poll).
fn spawn_event_reader(
    mut events: EventReader,
    shared: Shared,
    log: Arc<Mutex<FlowLog>>,
    tx: broadcast::Sender<String>,
) {
    let view = lock(&shared).view.clone();
    let metrics = lock(&shared).metrics.clone();
    std::thread::Builder::new()
        .name("flow-events".into())
        .spawn(move || loop {
            // The kernel wakes us only for a backlog; poll often enough that
            // flow records trail their packets by well under a second.
            events.wait(Duration::from_millis(100));
            let batch = events.drain();
            if batch.is_empty() {
                continue;
            }
            let v = view.read().unwrap_or_else(|p| p.into_inner());
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            for e in &batch {
                let rec = flowlog::record(&v, e);
                let Ok(line) = serde_json::to_string(&rec) else {
                    continue;
                };
                if let Err(err) = log.write(&line) {
                    error!("writing flow log: {err}");
                }
                metrics.flow_records.inc();
                let _ = tx.send(line);
            }
        })
        .expect("spawning the event thread");
}

/// `observe`: the client sends "recent", "follow" or "recent follow".
async fn serve_flows(l: UnixListener, log: Arc<Mutex<FlowLog>>, tx: broadcast::Sender<String>) {
    loop {
        let Ok((conn, _)) = l.accept().await else {
            continue;
        };
        let (log, mut rx) = (log.clone(), tx.subscribe());
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut mode = String::new();
            if BufReader::new(r).read_line(&mut mode).await.is_err() {
                return;
            }
            if mode.contains("recent") {
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

/// Standalone manifests: re-read when the directory changes.
async fn poll_source(shared: Shared, source: Arc<Mutex<Option<ManifestSource>>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let source = source.clone();
        let r = blocking(&shared, move |a| {
            let snap = source
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .and_then(|s| s.scan(false));
            if let Some(s) = snap {
                a.apply_snapshot(s)?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = r {
            error!("applying manifests: {e:#}");
        }
    }
}

/// Expired conntrack and fragment entries.
async fn gc(shared: Shared) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tick.tick().await;
        let r = blocking(&shared, |a| {
            Ok(a.maps.gc(palisade_dataplane::maps::monotonic_ns())?)
        })
        .await;
        match r {
            Ok(n) if n > 0 => log::debug!("conntrack gc: {n} expired entries removed"),
            Ok(_) => {}
            Err(e) => warn!("conntrack gc: {e:#}"),
        }
    }
}

fn kernel_stats(a: &Agent) -> KernelStats {
    let mut k = KernelStats::default();
    if let Ok(c) = a.maps.counters() {
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
    if let Ok(c) = a.maps.xdp_counters() {
        k.xdp = c.named();
    }
    k.maps = a
        .map_fill()
        .into_iter()
        .map(|m| (m.name, m.entries, m.max_entries))
        .collect();
    k.endpoints = a.model().endpoints.len() as u64;
    k
}

/// /metrics, /healthz (the process answers), /readyz (first sync done).
async fn serve_http(l: TcpListener, shared: Shared, metrics: Arc<Metrics>) {
    loop {
        let Ok((conn, _)) = l.accept().await else {
            continue;
        };
        let (shared, metrics) = (shared.clone(), metrics.clone());
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut first = String::new();
            let mut r = BufReader::new(r);
            if r.read_line(&mut first).await.is_err() {
                return;
            }
            let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (code, body) = match path.as_str() {
                "/metrics" => {
                    let k = tokio::task::spawn_blocking(move || kernel_stats(&lock(&shared)))
                        .await
                        .unwrap_or_default();
                    ("200 OK", metrics.render(&k))
                }
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/readyz" => {
                    if lock(&shared).ready {
                        ("200 OK", "ready\n".to_string())
                    } else {
                        ("503 Service Unavailable", "not ready\n".to_string())
                    }
                }
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = w.write_all(resp.as_bytes()).await;
        });
    }
}
