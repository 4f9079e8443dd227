//! The operator tools behind the API socket that need more than the owner's
//! state: `verify` (a kernel prober of its own, run off the owner thread)
//! and its periodic run with the `verify_mismatches` metric and the
//! optional readiness gate; `preview` (two compiles of a copy of the model
//! and a flow log replay, off the owner thread).
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use palisade_api::{PreviewReport, PreviewRequest, VerifyReport};
use palisade_dataplane::{probe::Prober, MapSizes, Pins};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{metrics::Metrics, owner::Handle, verify};

/// Runs whose generation changed meanwhile are repeated this often before
/// the last one is reported as is.
const ATTEMPTS: usize = 3;

pub struct Tools {
    flow_log: PathBuf,
    pins: Pins,
    sizes: MapSizes,
    /// Opened on first use (loads `pod_verify` against the pinned maps).
    prober: Mutex<Option<Prober>>,
    metrics: Arc<Metrics>,
    /// False while the last verify run found mismatches.
    verified: watch::Sender<bool>,
    runs: Mutex<u64>,
}

impl Tools {
    pub fn new(flow_log: PathBuf, pins: Pins, sizes: MapSizes, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            flow_log,
            pins,
            sizes,
            prober: Mutex::new(None),
            metrics,
            verified: watch::channel(true).0,
            runs: Mutex::new(0),
        })
    }

    pub fn verified(&self) -> watch::Receiver<bool> {
        self.verified.subscribe()
    }

    /// `preview`: the owner only copies the model; the compiles and the
    /// replay run on a blocking thread.
    pub async fn preview(&self, handle: &Handle, req: PreviewRequest) -> Result<PreviewReport> {
        let model = handle.with(|a| a.model().clone()).await?;
        let log = self.flow_log.clone();
        tokio::task::spawn_blocking(move || crate::preview::preview(&model, &req, &log))
            .await
            .context("the preview task stopped")?
    }

    /// One verify run against the programmed state. The maps the probes
    /// read are live: a change programmed during the run can make probes
    /// disagree with the snapshot, so such a run is repeated.
    pub async fn verify(self: &Arc<Self>, handle: &Handle) -> Result<VerifyReport> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let (state, view, generation) = handle
                .with(|a| (a.current().clone(), a.view(), a.programmed_generation()))
                .await?;
            let seed = {
                let mut r = self.runs.lock().unwrap_or_else(|p| p.into_inner());
                *r += 1;
                *r ^ generation.rotate_left(32)
            };
            let me = self.clone();
            let report = tokio::task::spawn_blocking(move || -> Result<VerifyReport> {
                let mut guard = me.prober.lock().unwrap_or_else(|p| p.into_inner());
                if guard.is_none() {
                    *guard = Some(
                        Prober::open(&me.pins, &me.sizes)
                            .context("loading the verify program (pod_verify)")?,
                    );
                }
                let prober = guard.as_ref().expect("opened above");
                verify::run(&state, &*view, generation, seed, |p| {
                    Ok(prober.verdict(p.ifindex, p.dir, &p.packet.bytes())?)
                })
            })
            .await
            .context("the verify task stopped")??;
            let now = handle.with(|a| a.programmed_generation()).await?;
            let settled = now == report.generation;
            last = Some(report);
            if settled {
                break;
            }
        }
        let report = last.expect("at least one attempt");
        self.metrics.verify_runs.inc();
        self.metrics
            .verify_mismatches
            .set(report.mismatches.len() as u64);
        self.verified.send_replace(report.mismatches.is_empty());
        Ok(report)
    }
}

/// `verify` every `interval`, logging mismatches.
pub async fn periodic_verify(tools: Arc<Tools>, handle: Handle, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tools.verify(&handle).await {
            Ok(r) if r.mismatches.is_empty() => {
                info!(
                    "verify: {} probes over {} endpoints agree with the model (generation {})",
                    r.probes, r.endpoints, r.generation
                );
            }
            Ok(r) => {
                for m in r.mismatches.iter().take(20) {
                    error!(
                        "verify mismatch: {} {} {}: kernel {}, model {} ({}){}",
                        m.endpoint,
                        m.direction,
                        m.packet,
                        m.kernel,
                        m.model,
                        m.model_reason,
                        m.rule
                            .as_deref()
                            .map(|r| format!(", {r}"))
                            .unwrap_or_default()
                    );
                }
                error!(
                    "verify: {} of {} probes disagree with the model (generation {})",
                    r.mismatches.len(),
                    r.probes,
                    r.generation
                );
            }
            Err(e) => warn!("verify: {e:#}"),
        }
    }
}

/// Readiness for /readyz: the owner's (first sync done) and, when asked,
/// the last verify run's.
pub fn gate_readiness(
    ready: watch::Receiver<bool>,
    verified: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let both = |r: &watch::Receiver<bool>, v: &watch::Receiver<bool>| *r.borrow() && *v.borrow();
    let (tx, rx) = watch::channel(both(&ready, &verified));
    tokio::spawn(async move {
        let (mut r, mut v) = (ready, verified);
        loop {
            tokio::select! {
                c = r.changed() => if c.is_err() { break },
                c = v.changed() => if c.is_err() { break },
            }
            tx.send_replace(both(&r, &v));
        }
        error!("readiness gate stopped");
    });
    rx
}
