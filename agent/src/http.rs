//! The agent's HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the
//! process answers) and `/readyz` (the first sync has reached the kernel).
//!
//! Routing is axum's; each connection is served by hyper's HTTP/1 with a
//! header read timeout (a client that does not send its request in time is
//! dropped) and without keep-alive (one request per connection, the way
//! probes and scrapes use it). Accepting goes through axum's `Listener`,
//! which on an accept error other than a reset connection (EMFILE, ENFILE,
//! ENOBUFS) logs and sleeps a second instead of spinning. At most
//! `Limits::max_connections` connections are served at once: beyond that
//! they wait in the kernel's listen backlog, and as slow ones time out the
//! waiting ones are served. Handlers run under a deadline, and `/metrics`
//! reads the kernel (`HttpState::kernel`) on the blocking pool, a few
//! scrapes at a time; `/readyz` reads a watch channel only, so it answers
//! at once whatever the agent is doing.
use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{watch, Semaphore},
};
use tower::limit::ConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::{debug, warn};

use crate::metrics::{KernelStats, Metrics, CONTENT_TYPE};

/// What the endpoints read.
#[derive(Clone)]
pub struct HttpState {
    /// True once the first sync has been programmed.
    pub ready: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    /// Reads the kernel counters and map fill; may do a few syscalls (it
    /// runs on the blocking pool).
    pub kernel: Arc<dyn Fn() -> KernelStats + Send + Sync>,
}

/// Bounds on what clients can make the server hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection's request head must arrive within this.
    pub header_timeout: Duration,
    /// A handler must answer within this (else 503).
    pub request_timeout: Duration,
    /// `/metrics` requests handled at once; more wait (within
    /// `request_timeout`).
    pub max_scrapes: usize,
    /// How long `serve` waits, after the shutdown signal, for requests in
    /// flight.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_scrapes: 4,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The routes, with the handler deadline and the scrape limit.
pub fn router(state: HttpState, limits: Limits) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(metrics).layer(ConcurrencyLimitLayer::new(limits.max_scrapes)),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            limits.request_timeout,
        ))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> Response {
    if *s.ready.borrow() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let kernel = s.kernel.clone();
    match tokio::task::spawn_blocking(move || kernel()).await {
        Ok(k) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], s.metrics.render(&k)).into_response(),
        Err(e) => {
            warn!("reading kernel stats for /metrics: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "reading the kernel's counters failed\n",
            )
                .into_response()
        }
    }
}

/// Serves until `shutdown` completes, with `Limits::default()`.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(listener, state, shutdown, Limits::default()).await
}

/// Serves until `shutdown` completes: stops accepting, lets requests in
/// flight finish (up to `Limits::shutdown_grace`) and returns.
pub async fn serve_with(
    mut listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> anyhow::Result<()> {
    let app = router(state, limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot?,
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            // axum's accept retries: a reset connection at once, anything
            // else (out of descriptors) after a second.
            c = axum::serve::Listener::accept(&mut listener) => c,
        };
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                debug!("http connection from {peer}: {e}");
            }
        });
    }
    stop_tx.send_replace(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.shutdown_grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        warn!(
            "http: requests still in flight after {:?}; leaving them",
            limits.shutdown_grace
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        time::{Duration, Instant},
    };

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        sync::oneshot,
    };

    use super::*;

    fn stats() -> KernelStats {
        KernelStats {
            reasons: vec![("no-policy-match", true, 5)],
            maps: vec![("policy".into(), 10, 100)],
            endpoints: 1,
            ..Default::default()
        }
    }

    struct Server {
        addr: SocketAddr,
        ready: watch::Sender<bool>,
        stop: Option<oneshot::Sender<()>>,
        done: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl Server {
        async fn start(
            limits: Limits,
            kernel: impl Fn() -> KernelStats + Send + Sync + 'static,
        ) -> Self {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (ready, ready_rx) = watch::channel(false);
            let metrics = Arc::new(Metrics::default());
            metrics.programmed_generation.set(3);
            let state = HttpState {
                ready: ready_rx,
                metrics,
                kernel: Arc::new(kernel),
            };
            let (stop, stop_rx) = oneshot::channel::<()>();
            let done = tokio::spawn(serve_with(
                l,
                state,
                async move {
                    let _ = stop_rx.await;
                },
                limits,
            ));
            Self {
                addr,
                ready,
                stop: Some(stop),
                done,
            }
        }

        async fn shutdown(mut self) {
            let _ = self.stop.take().unwrap().send(());
            tokio::time::timeout(Duration::from_secs(5), self.done)
                .await
                .expect("serve returns after shutdown")
                .unwrap()
                .unwrap();
        }
    }

    /// One request, the whole answer (the server closes the connection).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("an answer and a close")
            .unwrap();
        let code = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, out)
    }

    #[tokio::test]
    async fn readyz_follows_the_watch_and_healthz_always_answers() {
        let srv = Server::start(Limits::default(), stats).await;
        assert_eq!(get(srv.addr, "/healthz").await.0, 200);
        let (code, body) = get(srv.addr, "/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.ends_with("not ready\n"), "{body}");
        srv.ready.send_replace(true);
        let (code, body) = get(srv.addr, "/readyz").await;
        assert_eq!(code, 200, "{body}");
        assert!(
            body.to_ascii_lowercase().contains("connection: close"),
            "{body}"
        );
        assert!(body.ends_with("\r\n\r\nready\n"), "{body}");
        assert_eq!(get(srv.addr, "/nope").await.0, 404);
        srv.shutdown().await;
    }

    #[tokio::test]
    async fn metrics_render_the_agent_and_the_kernel() {
        let srv = Server::start(Limits::default(), stats).await;
        let (code, body) = get(srv.addr, "/metrics").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(CONTENT_TYPE), "{body}");
        assert!(
            body.contains("\npalisade_programmed_generation 3\n"),
            "{body}"
        );
        assert!(
            body.contains("\npalisade_drops_total{reason=\"no-policy-match\"} 5\n"),
            "{body}"
        );
        assert!(
            body.contains("\npalisade_map_capacity{map=\"policy\"} 100\n"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        srv.shutdown().await;
    }

    #[tokio::test]
    async fn readyz_answers_at_once_while_a_scrape_is_slow() {
        let srv = Server::start(Limits::default(), || {
            std::thread::sleep(Duration::from_millis(1500));
            stats()
        })
        .await;
        srv.ready.send_replace(true);
        let addr = srv.addr;
        let scrape = tokio::spawn(async move { get(addr, "/metrics").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let (code, _) = get(srv.addr, "/readyz").await;
        let took = t.elapsed();
        assert_eq!(code, 200);
        // Well under 10 ms on an idle machine; the bound leaves room for a
        // loaded CI box.
        assert!(took < Duration::from_millis(250), "readyz took {took:?}");
        assert!(!scrape.is_finished(), "the scrape was meant to be slow");
        assert_eq!(scrape.await.unwrap().0, 200);
        srv.shutdown().await;
    }

    #[tokio::test]
    async fn a_handler_past_its_deadline_is_503() {
        let limits = Limits {
            request_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let srv = Server::start(limits, || {
            std::thread::sleep(Duration::from_millis(1000));
            stats()
        })
        .await;
        let t = Instant::now();
        assert_eq!(get(srv.addr, "/metrics").await.0, 503);
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        srv.shutdown().await;
    }

    #[tokio::test]
    async fn a_client_that_never_sends_its_request_is_dropped() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let srv = Server::start(limits, stats).await;
        for partial in ["", "GET /healthz HTTP/1.1\r\nHost"] {
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            s.write_all(partial.as_bytes()).await.unwrap();
            let t = Instant::now();
            let mut buf = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
                .await
                .expect("the server closes the connection");
            let took = t.elapsed();
            // Closed (maybe after a 408), never answered.
            assert!(r.is_err() || !String::from_utf8_lossy(&buf).contains(" 200 "));
            assert!(
                took >= Duration::from_millis(250) && took < Duration::from_secs(3),
                "{partial:?}: dropped after {took:?}"
            );
        }
        srv.shutdown().await;
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_cap_do_not_starve_healthz() {
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let srv = Server::start(limits, stats).await;
        let mut idle = Vec::new();
        for _ in 0..6 {
            idle.push(TcpStream::connect(srv.addr).await.unwrap());
        }
        let t = Instant::now();
        let (code, _) = get(srv.addr, "/healthz").await;
        let took = t.elapsed();
        assert_eq!(code, 200);
        // Served only after idle ones gave their slots back: the cap holds.
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "healthz after {took:?}"
        );
        drop(idle);
        srv.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_returns_with_an_idle_client_connected() {
        let srv = Server::start(Limits::default(), stats).await;
        let _idle = TcpStream::connect(srv.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        srv.shutdown().await;
    }
}
