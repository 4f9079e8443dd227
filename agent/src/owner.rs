//! The one owner of the agent's state. An [`Agent`] lives on its own thread
//! and is driven by two channels: typed events from the sources and
//! commands (CNI registrations, operator requests). Nothing else touches it:
//! readiness and the programmed generation are published on watch channels,
//! the flow log reads a published view, conntrack GC and /metrics use map
//! handles of their own. So a long compile delays only the commands queued
//! behind it, never a readiness probe.
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};
use palisade_api::{ErrorKind, MapFill, Registration, StatusReport, TraceReport, TraceRequest};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info};

use crate::{
    change::SourceEvent,
    daemon::Agent,
    error::{kind_of, refuse},
};

/// What the owner is asked to do. Each carries the channel for its answer.
pub enum Command {
    Register(Registration, oneshot::Sender<Result<(u32, u64)>>),
    Deregister(String, oneshot::Sender<Result<u64>>),
    Status(oneshot::Sender<StatusReport>),
    Trace(TraceRequest, oneshot::Sender<Result<TraceReport>>),
    /// Answers with the programmed generation once every source event sent
    /// before it has been applied, or with why the last apply failed.
    Barrier(oneshot::Sender<Result<u64>>),
    /// Runs `f` on the agent: for work that has no handle of its own yet.
    With(Box<dyn FnOnce(&mut Agent) + Send>),
    /// Stop after the commands queued before this one.
    Shutdown,
}

/// A cloneable way to ask the owner for something.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

/// Commands waiting beyond this many make callers wait to enqueue.
const QUEUE: usize = 1024;

impl Handle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| refuse(ErrorKind::Unavailable, "the agent is shutting down"))?;
        rx.await
            .map_err(|_| refuse(ErrorKind::Unavailable, "the agent stopped before answering"))
    }

    /// CNI ADD: answers once the pod's policy is in the kernel and its
    /// programs are attached.
    pub async fn register(&self, r: Registration) -> Result<(u32, u64)> {
        self.ask(|tx| Command::Register(r, tx)).await?
    }

    /// CNI DEL.
    pub async fn deregister(&self, container_id: String) -> Result<u64> {
        self.ask(|tx| Command::Deregister(container_id, tx)).await?
    }

    pub async fn status(&self) -> Result<StatusReport> {
        self.ask(Command::Status).await
    }

    pub async fn trace(&self, t: TraceRequest) -> Result<TraceReport> {
        self.ask(|tx| Command::Trace(t, tx)).await?
    }

    /// The programmed generation that includes every source event sent
    /// before this call.
    pub async fn barrier(&self) -> Result<u64> {
        self.ask(Command::Barrier).await?
    }

    /// Runs `f` on the agent and returns what it returns.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Agent) -> T + Send + 'static,
    ) -> Result<T> {
        self.ask(|tx| {
            Command::With(Box::new(move |a: &mut Agent| {
                let _ = tx.send(f(a));
            }))
        })
        .await
    }
}

/// Map fill levels and endpoint count as of the owner's last step (for
/// /metrics, without asking the owner).
#[derive(Clone, Debug, Default)]
pub struct Levels {
    pub maps: Vec<MapFill>,
    pub endpoints: u64,
}

impl Levels {
    fn of(agent: &Agent) -> Self {
        Self {
            maps: agent.map_fill(),
            endpoints: agent.model().endpoints.len() as u64,
        }
    }
}

/// The owner thread and what it publishes.
pub struct Owner {
    pub handle: Handle,
    /// True once the first complete view reached the kernel.
    pub ready: watch::Receiver<bool>,
    pub levels: watch::Receiver<Levels>,
    thread: JoinHandle<Agent>,
}

impl Owner {
    /// Starts the owner. It runs until [`Owner::shutdown`] (or until every
    /// [`Handle`] is dropped).
    pub fn spawn(agent: Agent, sources: mpsc::Receiver<SourceEvent>) -> Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (ready_tx, ready) = watch::channel(agent.ready);
        let (levels_tx, levels) = watch::channel(Levels::of(&agent));
        let published = Published {
            ready: ready_tx,
            levels: levels_tx,
        };
        let thread = std::thread::Builder::new()
            .name("agent-owner".into())
            .spawn(move || run(agent, sources, rx, published))?;
        Ok(Self {
            handle: Handle { tx },
            ready,
            levels,
            thread,
        })
    }

    /// Stops the owner: the command in progress completes and the ones
    /// queued before are answered; later ones fail with "shutting down".
    pub async fn shutdown(self) -> Result<Agent> {
        let _ = self.handle.tx.send(Command::Shutdown).await;
        drop(self.handle);
        tokio::task::spawn_blocking(move || self.thread.join())
            .await?
            .map_err(|_| anyhow!("the agent's owner thread panicked"))
    }
}

/// What the owner publishes after every step.
struct Published {
    ready: watch::Sender<bool>,
    levels: watch::Sender<Levels>,
}

/// The owner loop: a current-thread runtime of its own, so the blocking work
/// (compile, map writes, attach) never occupies the async workers that serve
/// probes and sockets. Source events are taken first and coalesced: a burst
/// of changes is one recompile.
fn run(
    mut agent: Agent,
    mut sources: mpsc::Receiver<SourceEvent>,
    mut commands: mpsc::Receiver<Command>,
    published: Published,
) -> Agent {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("agent owner: cannot start its runtime: {e}");
            return agent;
        }
    };
    rt.block_on(async {
        let mut sources_open = true;
        // Why the last source apply failed (a full map, say), until one
        // succeeds: `sync` reports it.
        let mut failed: Option<(ErrorKind, String)> = None;
        loop {
            tokio::select! {
                biased;
                ev = sources.recv(), if sources_open => match ev {
                    Some(ev) => {
                        let mut batch = vec![ev];
                        while let Ok(ev) = sources.try_recv() {
                            batch.push(ev);
                        }
                        failed = agent.apply_events(batch).err().map(|e| {
                            error!("applying the cluster view: {e:#}");
                            (kind_of(&e), format!("{e:#}"))
                        });
                    }
                    None => sources_open = false,
                },
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Shutdown) => break,
                    Some(cmd) => handle(&mut agent, cmd, &failed),
                },
            }
            published
                .ready
                .send_if_modified(|r| std::mem::replace(r, agent.ready) != agent.ready);
            published.levels.send_replace(Levels::of(&agent));
        }
    });
    info!("agent owner stopped");
    agent
}

/// One command. `failed` is why the last source apply failed, if it did.
fn handle(agent: &mut Agent, cmd: Command, failed: &Option<(ErrorKind, String)>) {
    // A receiver that gave up (client gone) is not an error.
    match cmd {
        Command::Register(r, tx) => {
            let _ = tx.send(agent.register(r));
        }
        Command::Deregister(id, tx) => {
            let _ = tx.send(agent.deregister(&id));
        }
        Command::Status(tx) => {
            let _ = tx.send(agent.status());
        }
        Command::Trace(t, tx) => {
            let _ = tx.send(agent.trace(&t));
        }
        Command::Barrier(tx) => {
            let _ = tx.send(match failed {
                None => Ok(agent.programmed_generation()),
                Some((kind, why)) => Err(refuse(*kind, why.clone())),
            });
        }
        Command::With(f) => f(agent),
        // The loop stops on it before asking here.
        Command::Shutdown => {}
    }
}
