//! Section 7: the agent-architecture floors, measured on the real
//! `palisade-agent` process in a node namespace, reading the synthetic
//! cluster (10k pods, 1k policies) from a manifest directory, with HTTP
//! (`--metrics-addr`) on 127.0.0.1 inside the node:
//!
//! 1. `/readyz` latency while the whole policy set is recompiled: the
//!    policy file is rewritten (every policy's selector moves to another
//!    app) and `Request::Sync` waits until that is programmed; meanwhile a
//!    thread in the node probes `/readyz` over plain HTTP/1.1 in a loop.
//! 2. The agent-side work of one registration (compile + map writes, the
//!    attach excluded), one at a time and 20 at once, registered through
//!    the API socket (`Request::Register`, what the CNI plugin sends) on
//!    veth pairs created in bulk in the node. The agent's own split comes
//!    from the `palisade_registration_{program,attach}_seconds` histograms
//!    on /metrics when it has them, else from its log line "registered …
//!    in X (program Y, attach Z)".
//! 3. VmRSS after many registrations: register/deregister churn over the
//!    same veths, counted over the agent's lifetime.
//! 4. Context (not targets): policy add, pod add and pod label change end
//!    to end through the process: manifest write until `Sync` answers.
//!
//! Every phase is bounded in count and in time; what a budget cut short is
//! recorded as such.
use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Barrier, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use palisade_api::{call, Registration, Request, Response};

use crate::{
    cluster::{self, ns_name, pod_yaml, policy_yaml, Cluster, Spec},
    node::Node,
    report::{AgentArch, Churn, E2eKind, ReadyzRun, RegBatch, RegRun},
    stats::percentile,
    sys::{self, enter_thread, rss_kib},
};

/// Where the agent serves HTTP inside the node namespace.
const HTTP_PORT: u16 = 9962;
const PROGRAM_HIST: &str = "palisade_registration_program_seconds";
const ATTACH_HIST: &str = "palisade_registration_attach_seconds";
/// Registrations each churn worker round covers (one per veth).
const CHURN_WORKERS: usize = 4;
/// Pause between two /readyz probes (2 CPUs are shared with the agent).
const PROBE_GAP: Duration = Duration::from_millis(1);

pub struct Plan {
    pub spec: Spec,
    pub quick: bool,
    /// Whole-policy-set recompiles while /readyz is probed.
    pub recompiles: usize,
    /// Registrations one at a time, each on a veth of its own; they stay
    /// registered to the end (a node with pods).
    pub sequential: usize,
    /// Batches of `concurrency` registrations at once.
    pub batches: usize,
    pub concurrency: usize,
    /// veth pairs the churn (and the concurrent batches) go over, besides
    /// the sequential ones.
    pub churn_veths: usize,
    /// Registrations over the agent's lifetime before VmRSS is read.
    pub registrations: usize,
    /// End-to-end changes per kind (context rows).
    pub e2e_changes: usize,
    /// Time budgets per phase.
    pub readyz_budget: Duration,
    pub reg_budget: Duration,
    /// The churn gets what is left of `section_budget` (counted from the
    /// agent's start), at least `churn_budget`.
    pub churn_budget: Duration,
    pub section_budget: Duration,
    pub e2e_budget: Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                spec: Spec::full(),
                quick,
                recompiles: 3,
                sequential: 20,
                batches: 1,
                concurrency: 20,
                churn_veths: 100,
                registrations: 1000,
                e2e_changes: 3,
                readyz_budget: Duration::from_secs(8),
                reg_budget: Duration::from_secs(8),
                churn_budget: Duration::from_secs(10),
                section_budget: Duration::from_secs(50),
                e2e_budget: Duration::from_secs(5),
            }
        } else {
            Self {
                spec: Spec::full(),
                quick,
                recompiles: 10,
                sequential: 100,
                batches: 5,
                concurrency: 20,
                churn_veths: 100,
                registrations: 10_000,
                e2e_changes: 10,
                readyz_budget: Duration::from_secs(20),
                reg_budget: Duration::from_secs(20),
                churn_budget: Duration::from_secs(660),
                section_budget: Duration::from_secs(800),
                e2e_budget: Duration::from_secs(12),
            }
        }
    }
}

// ---- pure helpers (unit-tested) --------------------------------------------

/// Seconds of a `Duration`'s `Debug` text: "850ns", "12.5µs", "3.2ms", "1.5s".
pub fn parse_debug_duration(s: &str) -> Option<f64> {
    let s = s.trim();
    for (suffix, scale) in [
        ("ns", 1e-9),
        ("µs", 1e-6),
        ("us", 1e-6),
        ("ms", 1e-3),
        ("s", 1.0),
    ] {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.trim().parse::<f64>().ok().map(|x| x * scale);
        }
    }
    None
}

/// Text without ANSI escape sequences (ESC [ … letter).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The agent's timing of one registration from its log line "registered
/// ns/pod (ip, if) as endpoint N in X (program Y, attach Z)": seconds
/// (total, program, attach).
pub fn parse_registered_line(line: &str) -> Option<(f64, f64, f64)> {
    let line = strip_ansi(line);
    let at = line.find("registered ")?;
    if line[..at].ends_with("de") {
        return None;
    }
    let rest = &line[at..];
    let p = rest.find("(program ")?;
    let total = rest[..p].trim_end().rsplit(' ').next()?;
    let after = &rest[p + "(program ".len()..];
    let (program, after) = after.split_once(',')?;
    let after = after.trim_start().strip_prefix("attach ")?;
    let attach = after.split(')').next()?;
    Some((
        parse_debug_duration(total)?,
        parse_debug_duration(program)?,
        parse_debug_duration(attach)?,
    ))
}

/// A Prometheus histogram as scraped: cumulative buckets (upper bound,
/// count), sum and count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hist {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Hist {
    /// The histogram `name` in a text exposition, None when absent.
    pub fn parse(text: &str, name: &str) -> Option<Self> {
        let mut h = Hist::default();
        let mut found = false;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let value = |s: &str| s.split_whitespace().last()?.parse::<f64>().ok();
            if let Some(b) = rest.strip_prefix("_bucket{") {
                let Some(le) = b.split("le=\"").nth(1).and_then(|x| x.split('"').next()) else {
                    continue;
                };
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    match le.parse() {
                        Ok(x) => x,
                        Err(_) => continue,
                    }
                };
                if let Some(v) = value(b) {
                    h.buckets.push((le, v));
                    found = true;
                }
            } else if rest.starts_with("_sum") {
                h.sum = value(rest)?;
                found = true;
            } else if rest.starts_with("_count") {
                h.count = value(rest)?;
                found = true;
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        found.then_some(h)
    }

    /// What was observed between `before` and `self`.
    pub fn since(&self, before: &Hist) -> Hist {
        let was = |le: f64| {
            before
                .buckets
                .iter()
                .find(|b| b.0 == le)
                .map_or(0.0, |b| b.1)
        };
        Hist {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, c - was(le)))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// The upper bound of the bucket holding quantile `q` (0..1), in
    /// seconds; None without observations.
    pub fn quantile_upper(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let want = (q * self.count).ceil().max(1.0);
        self.buckets.iter().find(|b| b.1 >= want).map(|b| b.0)
    }
}

/// Registrations per second when `n` of them took `busy_s` seconds of
/// agent-side work in total (the agent does them one after the other).
pub fn agent_rate(n: usize, busy_s: f64) -> Option<f64> {
    (n > 0 && busy_s > 0.0 && busy_s.is_finite()).then(|| n as f64 / busy_s)
}

/// Which probes, each (start, duration) in seconds, overlap any of the
/// intervals (start, end).
pub fn overlapping(probes: &[(f64, f64)], intervals: &[(f64, f64)]) -> Vec<bool> {
    probes
        .iter()
        .map(|&(s, d)| intervals.iter().any(|&(a, b)| s <= b && s + d >= a))
        .collect()
}

/// The policy file of `spec` with every policy's selected app moved by
/// `shift` (0 is the file `cluster::generate` writes): each shift changes
/// what every policy selects and admits, so the whole set is recompiled.
pub fn policies_yaml(spec: &Spec, shift: usize) -> String {
    let mut pol = String::new();
    for i in 0..spec.policies {
        let n = i % spec.namespaces.max(1);
        let app = (i / spec.namespaces.max(1) + shift) % spec.apps.max(1);
        pol.push_str(&policy_yaml(&format!("pol-{i}"), &ns_name(n), app, i, spec));
    }
    pol
}

/// The pod of the cluster used for the `k`-th registration: consecutive
/// `k` give distinct pods (7919 is prime to any cluster size not a
/// multiple of it), so registrations alive at once never share an address.
pub fn pod_for(k: usize, pods: usize) -> usize {
    (k.wrapping_mul(7919)) % pods.max(1)
}

// ---- the process side ---------------------------------------------------------

/// One HTTP/1.1 GET from the calling thread (which must be in the node):
/// (status code, body).
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |x| x.1.to_string());
    Ok((code, body))
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], HTTP_PORT))
}

fn scrape(node: &Node) -> Result<String> {
    let (code, body) = node
        .ns
        .enter(|| http_get(addr(), "/metrics", Duration::from_secs(10)))??;
    if code != 200 {
        bail!("/metrics answered {code}");
    }
    Ok(body)
}

/// The registration program-time histogram, when the agent has it.
fn program_hist(node: &Node) -> Option<Hist> {
    scrape(node)
        .ok()
        .and_then(|t| Hist::parse(&t, PROGRAM_HIST))
}

fn log_len(log: &Path) -> u64 {
    fs::metadata(log).map_or(0, |m| m.len())
}

/// The agent's (program, attach) seconds of every registration it logged
/// after byte `from`.
fn logged_since(log: &Path, from: u64) -> Vec<(f64, f64)> {
    let mut f = match fs::File::open(log) {
        Ok(f) => f,
        Err(_) => return Vec::new(),
    };
    let mut buf = Vec::new();
    use std::io::Seek;
    if f.seek(std::io::SeekFrom::Start(from)).is_err() || f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    String::from_utf8_lossy(&buf)
        .lines()
        .filter_map(parse_registered_line)
        .map(|(_, p, a)| (p, a))
        .collect()
}

/// Where the agent-side times of a phase came from, and what they were.
struct Timing {
    program_ms: Vec<f64>,
    attach_ms: Vec<f64>,
    /// Sum of program seconds (the histogram's exact sum when present).
    program_sum_s: Option<f64>,
    /// p99 upper bound from the histogram's buckets.
    hist_p99_ms: Option<f64>,
    source: String,
}

struct Mark {
    log_at: u64,
    program: Option<Hist>,
}

struct Ctx<'a> {
    node: &'a Node,
    socket: PathBuf,
    log: PathBuf,
    cluster: &'a Cluster,
    netns: String,
    /// Registrations over the agent's lifetime.
    registered: AtomicUsize,
    failures: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Ctx<'_> {
    fn mark(&self) -> Mark {
        Mark {
            log_at: log_len(&self.log),
            program: program_hist(self.node),
        }
    }

    fn timing(&self, m: &Mark, expected: usize) -> Timing {
        let logged = logged_since(&self.log, m.log_at);
        let hp = program_hist(self.node)
            .zip(m.program.clone())
            .map(|(a, b)| a.since(&b));
        let program_ms: Vec<f64> = logged.iter().map(|x| x.0 * 1000.0).collect();
        let attach_ms: Vec<f64> = logged.iter().map(|x| x.1 * 1000.0).collect();
        let log_sum: f64 = logged.iter().map(|x| x.0).sum();
        let (sum, source) = match (&hp, logged.len()) {
            (Some(h), n) if h.count > 0.0 => (
                Some(h.sum),
                format!(
                    "histogram {PROGRAM_HIST} (sum over {} registrations){}",
                    h.count,
                    if n > 0 {
                        format!("; per-registration values from {n} agent log lines")
                    } else {
                        String::new()
                    }
                ),
            ),
            (_, n) if n > 0 => (
                Some(log_sum),
                format!(
                    "agent log lines \"registered … (program Y, attach Z)\" ({n} of {expected}); \
                     no {PROGRAM_HIST} histogram on /metrics"
                ),
            ),
            _ => (
                None,
                "no agent-side timing (neither histogram nor log line)".into(),
            ),
        };
        Timing {
            program_ms,
            attach_ms,
            program_sum_s: sum,
            hist_p99_ms: hp.and_then(|h| h.quantile_upper(0.99)).map(|s| s * 1000.0),
            source,
        }
    }

    fn registration(&self, k: usize, veth: usize) -> Registration {
        let p = &self.cluster.pods[pod_for(k, self.cluster.pods.len())];
        Registration {
            container_id: format!("agentbench-{k}"),
            // The peer of `veth_name(veth)`, in the same (node) namespace.
            ifname: format!("pbagp{veth}"),
            netns: self.netns.clone(),
            namespace: p.namespace.clone(),
            pod: p.name.clone(),
            ipv4: Some(p.ip),
            host_ifname: veth_name(veth),
            mac: None,
            ipv6: None,
        }
    }

    /// Register; the client's round trip in ms, None (counted) on failure.
    fn register(&self, r: Registration) -> Option<f64> {
        let t = Instant::now();
        let res = call(
            &self.socket,
            &Request::Register(r),
            Duration::from_secs(120),
        );
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        self.registered.fetch_add(1, Ordering::SeqCst);
        match res {
            Ok(Response::Ok { .. }) => Some(ms),
            other => {
                self.failures.fetch_add(1, Ordering::SeqCst);
                let mut e = self.first_error.lock().expect("error slot");
                if e.is_none() {
                    *e = Some(format!("{other:?}"));
                }
                None
            }
        }
    }

    fn deregister(&self, k: usize) -> Result<()> {
        match call(
            &self.socket,
            &Request::Deregister {
                container_id: format!("agentbench-{k}"),
                ifname: "eth0".into(),
            },
            Duration::from_secs(120),
        )? {
            Response::Ok { .. } => Ok(()),
            other => bail!("deregister: {other:?}"),
        }
    }

    fn sync(&self) -> Result<u64> {
        match call(&self.socket, &Request::Sync, Duration::from_secs(180))? {
            Response::Ok { generation, .. } => Ok(generation),
            other => bail!("sync: {other:?}"),
        }
    }
}

fn veth_name(i: usize) -> String {
    format!("pbag{i}")
}

/// `n` veth pairs in the node (host side `pbagN`, peer `pbagpN`, both
/// staying in the node), up; they go with the namespace.
fn make_veths(node: &Node, n: usize) -> Result<()> {
    let mut batch = String::new();
    for i in 0..n {
        batch.push_str(&format!(
            "link add {} type veth peer name pbagp{i}\nlink set {} up\nlink set pbagp{i} up\n",
            veth_name(i),
            veth_name(i)
        ));
    }
    let f = node.dir.path().join("veths.batch");
    fs::write(&f, batch)?;
    node.ns
        .ip(&["-batch", &f.display().to_string()])
        .context("creating veths")?;
    Ok(())
}

/// Replace a manifest file atomically (a hidden temporary file, which the
/// agent ignores, renamed over it).
fn write_manifest(dir: &Path, name: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// Sets the flag on drop, so a probe thread in a scope ends even when the
/// scope's body fails.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn readyz_phase(plan: &Plan, ctx: &Ctx, mdir: &Path) -> Result<ReadyzRun> {
    let stop = AtomicBool::new(false);
    let probes: Mutex<Vec<(f64, f64, bool)>> = Mutex::default();
    let t0 = Instant::now();
    let path = ctx.node.ns.path();
    let mut recompiles: Vec<(f64, f64)> = Vec::new();
    let mut cut = false;
    std::thread::scope(|s| -> Result<()> {
        let _stop = StopOnDrop(&stop);
        let prober = s.spawn(|| -> Result<()> {
            enter_thread(&path)?;
            let hard = Instant::now() + plan.readyz_budget + Duration::from_secs(240);
            while !stop.load(Ordering::SeqCst) && !sys::interrupted() && Instant::now() < hard {
                let at = t0.elapsed().as_secs_f64();
                let t = Instant::now();
                let ok = matches!(
                    http_get(addr(), "/readyz", Duration::from_secs(5)),
                    Ok((200, _))
                );
                let d = t.elapsed().as_secs_f64();
                probes.lock().expect("probes").push((at, d, ok));
                std::thread::sleep(PROBE_GAP);
            }
            Ok(())
        });
        // Idle probes first, then recompiles with a pause between them.
        sys::sleep(Duration::from_millis(300));
        let end = Instant::now() + plan.readyz_budget;
        for k in 0..plan.recompiles {
            sys::check()?;
            if Instant::now() > end {
                cut = true;
                break;
            }
            let text = policies_yaml(&plan.spec, (k + 1) % 2);
            let a = t0.elapsed().as_secs_f64();
            write_manifest(mdir, "20-policies.yaml", &text)?;
            ctx.sync()?;
            recompiles.push((a, t0.elapsed().as_secs_f64()));
            sys::sleep(Duration::from_millis(300));
        }
        // Leave the original policies in force for what follows.
        if plan.recompiles % 2 == 1 || cut {
            write_manifest(mdir, "20-policies.yaml", &policies_yaml(&plan.spec, 0))?;
            ctx.sync()?;
        }
        stop.store(true, Ordering::SeqCst);
        prober
            .join()
            .map_err(|_| anyhow::anyhow!("prober panicked"))??;
        Ok(())
    })?;
    let probes = std::mem::take(&mut *probes.lock().expect("probes"));
    let spans: Vec<(f64, f64)> = probes.iter().map(|p| (p.0, p.1)).collect();
    let over = overlapping(&spans, &recompiles);
    let mut r = ReadyzRun {
        recompile_ms: recompiles.iter().map(|(a, b)| (b - a) * 1000.0).collect(),
        planned_recompiles: plan.recompiles,
        cut_by_budget: cut,
        ..Default::default()
    };
    for (p, o) in probes.iter().zip(over) {
        if !p.2 {
            r.failures += 1;
        }
        if o {
            r.overlapped_ms.push(p.1 * 1000.0);
        } else {
            r.idle_ms.push(p.1 * 1000.0);
        }
    }
    Ok(r)
}

fn run_reg(ctx: &Ctx, timing: Timing, wall_ms: Vec<f64>, planned: usize, cut: bool) -> RegRun {
    RegRun {
        planned,
        done: wall_ms.len(),
        cut_by_budget: cut,
        wall_ms,
        program_ms: timing.program_ms,
        attach_ms: timing.attach_ms,
        program_sum_s: timing.program_sum_s,
        hist_p99_ms: timing.hist_p99_ms,
        source: timing.source,
        failures: ctx.failures.load(Ordering::SeqCst),
    }
}

/// Registrations one at a time on veths 0.. (left registered).
fn sequential_phase(plan: &Plan, ctx: &Ctx, next_k: &mut usize) -> Result<(RegRun, Vec<usize>)> {
    let n = plan.sequential;
    let m = ctx.mark();
    let end = Instant::now() + plan.reg_budget;
    let mut wall = Vec::new();
    let mut alive = Vec::new();
    let mut cut = false;
    for i in 0..n {
        sys::check()?;
        if Instant::now() > end {
            cut = true;
            break;
        }
        let k = *next_k;
        *next_k += 1;
        if let Some(ms) = ctx.register(ctx.registration(k, i)) {
            wall.push(ms);
            alive.push(k);
        }
    }
    let t = ctx.timing(&m, wall.len());
    Ok((run_reg(ctx, t, wall, n, cut), alive))
}

/// Batches of `concurrency` registrations sent at once (on veths after
/// the ones `alive` holds), each deregistered before the next.
fn concurrent_phase(
    plan: &Plan,
    ctx: &Ctx,
    next_k: &mut usize,
    first_veth: usize,
) -> Result<Vec<RegBatch>> {
    let c = plan.concurrency.min(plan.churn_veths);
    if c == 0 {
        bail!("no free veths for the concurrent registrations");
    }
    let end = Instant::now() + plan.reg_budget;
    let mut out = Vec::new();
    for _ in 0..plan.batches {
        sys::check()?;
        if Instant::now() > end && !out.is_empty() {
            break;
        }
        let base = *next_k;
        *next_k += c;
        let regs: Vec<Registration> = (0..c)
            .map(|j| ctx.registration(base + j, first_veth + j))
            .collect();
        let fail_before = ctx.failures.load(Ordering::SeqCst);
        let m = ctx.mark();
        let barrier = Barrier::new(c);
        let t = Instant::now();
        let walls: Vec<Option<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = regs
                .into_iter()
                .map(|r| {
                    let b = &barrier;
                    s.spawn(move || {
                        b.wait();
                        ctx.register(r)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().ok().flatten()).collect()
        });
        let wall_s = t.elapsed().as_secs_f64();
        let timing = ctx.timing(&m, c);
        out.push(RegBatch {
            size: c,
            ok: walls.iter().flatten().count(),
            wall_s,
            client_ms: walls.iter().flatten().copied().collect(),
            program_ms: timing.program_ms,
            attach_ms: timing.attach_ms,
            program_sum_s: timing.program_sum_s,
            source: timing.source,
            failures: ctx.failures.load(Ordering::SeqCst) - fail_before,
        });
        for j in 0..c {
            ctx.deregister(base + j)?;
        }
    }
    Ok(out)
}

/// Register/deregister rounds over the churn veths (from `first_veth`)
/// until the agent has seen `plan.registrations` registrations or the
/// budget is spent (checked before each registration).
fn churn_phase(
    plan: &Plan,
    ctx: &Ctx,
    next_k: &mut usize,
    first_veth: usize,
    budget: Duration,
) -> Result<(usize, f64, bool)> {
    let t = Instant::now();
    let end = t + budget;
    let mut rounds = 0;
    let mut cut = false;
    while ctx.registered.load(Ordering::SeqCst) < plan.registrations {
        sys::check()?;
        if Instant::now() > end {
            cut = true;
            break;
        }
        let n = plan
            .churn_veths
            .min(plan.registrations - ctx.registered.load(Ordering::SeqCst));
        let base = *next_k;
        *next_k += n;
        // Deregistering costs about what registering does: a round stops
        // registering halfway through what is left of the budget.
        let now = Instant::now();
        let round_end = now + end.saturating_duration_since(now) / 2;
        let slot = AtomicUsize::new(0);
        let sent = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..CHURN_WORKERS {
                s.spawn(|| loop {
                    if sys::interrupted() || Instant::now() > round_end {
                        return;
                    }
                    let i = slot.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return;
                    }
                    sent.fetch_max(i + 1, Ordering::SeqCst);
                    ctx.register(ctx.registration(base + i, first_veth + i));
                });
            }
        });
        // Every one sent is deregistered (unknown ones are no error).
        let n = sent.load(Ordering::SeqCst);
        let slot = AtomicUsize::new(0);
        let errs: Mutex<Vec<String>> = Mutex::default();
        std::thread::scope(|s| {
            for _ in 0..CHURN_WORKERS {
                s.spawn(|| loop {
                    let i = slot.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return;
                    }
                    if let Err(e) = ctx.deregister(base + i) {
                        errs.lock().expect("errs").push(format!("{e:#}"));
                    }
                });
            }
        });
        if let Some(e) = errs.lock().expect("errs").first() {
            bail!("churn: {e}");
        }
        rounds += 1;
    }
    if ctx.registered.load(Ordering::SeqCst) < plan.registrations {
        cut = true;
    }
    Ok((rounds, t.elapsed().as_secs_f64(), cut))
}

/// Policy add, pod add, pod label change, each from the manifest write
/// until `Sync` answers (which waits until it is programmed).
fn e2e_phase(plan: &Plan, ctx: &Ctx, mdir: &Path, alive: &[usize]) -> Result<Vec<E2eKind>> {
    let spec = &plan.spec;
    let mut kinds = vec![
        E2eKind {
            name: "policy add (selects a local pod)".into(),
            ..Default::default()
        },
        E2eKind {
            name: "pod add (remote)".into(),
            ..Default::default()
        },
        E2eKind {
            name: "pod label change (remote)".into(),
            ..Default::default()
        },
    ];
    let end = Instant::now() + plan.e2e_budget;
    for k in 0..plan.e2e_changes {
        for (j, kind) in kinds.iter_mut().enumerate() {
            sys::check()?;
            if Instant::now() > end {
                return Ok(kinds);
            }
            let (file, text) = match j {
                0 => {
                    // The app of a registered pod, in its namespace.
                    let reg = alive.get(k % alive.len().max(1)).copied().unwrap_or(0);
                    let p = &ctx.cluster.pods[pod_for(reg, ctx.cluster.pods.len())];
                    let app: usize = p
                        .name
                        .strip_prefix("app-")
                        .and_then(|x| x.split('-').next())
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0);
                    (
                        format!("30-e2e-policy-{k}.yaml"),
                        policy_yaml(&format!("e2e-{k}"), &p.namespace, app, k, spec),
                    )
                }
                _ => {
                    // Pod k lives in its own file; the label change moves
                    // it to the next app (another identity).
                    let app = if j == 1 { 0 } else { 1 };
                    let mut t = String::new();
                    pod_yaml(
                        &mut t,
                        &ns_name(k % spec.namespaces),
                        &format!("e2e-pod-{k}"),
                        app,
                        cluster::pod_ip(spec.pods + 100 + k),
                    );
                    (format!("31-e2e-pod-{k}.yaml"), t)
                }
            };
            let t = Instant::now();
            write_manifest(mdir, &file, &text)?;
            ctx.sync()?;
            kind.ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(kinds)
}

pub fn run(plan: &Plan) -> Result<AgentArch> {
    let started = Instant::now();
    let c = cluster::generate(&plan.spec);
    let files: Vec<(&str, String)> = c
        .files
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let node = Node::with_agent_metrics(
        "pbag",
        &files,
        &[("RUST_LOG", "warn,palisade_agent=info"), ("NO_COLOR", "1")],
        &format!("127.0.0.1:{HTTP_PORT}"),
    )?;
    let agent = node.agent().context("agent")?;
    let st = agent.status()?;
    anyhow::ensure!(
        st.policies.len() == plan.spec.policies,
        "the agent knows {} policies, not {}",
        st.policies.len(),
        plan.spec.policies
    );
    let mdir = node.dir.path().join("manifests");
    let ctx = Ctx {
        node: &node,
        socket: agent.socket.clone(),
        log: agent.log.clone(),
        cluster: &c,
        netns: node.ns.path().display().to_string(),
        registered: AtomicUsize::new(0),
        failures: AtomicUsize::new(0),
        first_error: Mutex::new(None),
    };
    let mut out = AgentArch {
        pods: plan.spec.pods,
        policies: plan.spec.policies,
        namespaces: plan.spec.namespaces,
        quick: plan.quick,
        startup_s: agent.startup.as_secs_f64(),
        ..Default::default()
    };
    let metrics = scrape(&node).context("/metrics inside the node")?;
    out.histograms = [PROGRAM_HIST, ATTACH_HIST]
        .iter()
        .filter(|h| metrics.contains(*h))
        .map(|h| h.to_string())
        .collect();
    let (rss0, _) = rss_kib(agent.pid())?;
    out.rss_kib_after_startup = rss0;
    eprintln!(
        "    agent ready in {:.1} s, VmRSS {:.1} MiB; registration histograms on /metrics: {}",
        out.startup_s,
        rss0 as f64 / 1024.0,
        if out.histograms.is_empty() {
            "none (agent log lines used)".to_string()
        } else {
            out.histograms.join(", ")
        }
    );

    make_veths(&node, plan.sequential + plan.churn_veths)?;

    // 1.
    let rz = readyz_phase(plan, &ctx, &mdir).context("readyz during recompiles")?;
    eprintln!(
        "    /readyz during {} recompiles (median {:.0} ms): {} probes overlapped, p99 {:.2} ms, max {:.2} ms; {} idle probes, {} failed",
        rz.recompile_ms.len(),
        crate::stats::median(&rz.recompile_ms).unwrap_or(f64::NAN),
        rz.overlapped_ms.len(),
        percentile(&rz.overlapped_ms, 99.0).unwrap_or(f64::NAN),
        percentile(&rz.overlapped_ms, 100.0).unwrap_or(f64::NAN),
        rz.idle_ms.len(),
        rz.failures
    );
    out.readyz = Some(rz);

    // 2.
    let mut next_k = 0;
    let (seq, alive) = sequential_phase(plan, &ctx, &mut next_k)?;
    eprintln!(
        "    {} sequential registrations: agent-side program p50 {:.2} ms p99 {:.2} ms, attach p50 {:.2} ms; client round trip p50 {:.1} ms ({})",
        seq.done,
        crate::stats::median(&seq.program_ms).unwrap_or(f64::NAN),
        percentile(&seq.program_ms, 99.0).unwrap_or(f64::NAN),
        crate::stats::median(&seq.attach_ms).unwrap_or(f64::NAN),
        crate::stats::median(&seq.wall_ms).unwrap_or(f64::NAN),
        seq.source
    );
    if seq.done == 0 {
        bail!(
            "no registration succeeded: {}\n{}",
            ctx.first_error
                .lock()
                .expect("error slot")
                .clone()
                .unwrap_or_default(),
            agent.log_tail()
        );
    }
    out.sequential = Some(seq);

    // 4. (context) with the sequential endpoints registered.
    match e2e_phase(plan, &ctx, &mdir, &alive) {
        Ok(k) => {
            for x in &k {
                eprintln!(
                    "    end to end, {}: p50 {:.0} ms over {}",
                    x.name,
                    crate::stats::median(&x.ms).unwrap_or(f64::NAN),
                    x.ms.len()
                );
            }
            out.e2e = k;
        }
        Err(e) => out.notes.push(format!("end-to-end changes failed: {e:#}")),
    }

    // The sequential endpoints stay registered from here on.
    let first_churn = plan.sequential;
    let batches = concurrent_phase(plan, &ctx, &mut next_k, first_churn)?;
    for b in &batches {
        eprintln!(
            "    {} at once: agent-side rate {:.0}/s (program sum {:.1} ms), wall {:.0}/s incl. attach ({} failed)",
            b.size,
            b.program_sum_s
                .and_then(|s| agent_rate(b.ok, s))
                .unwrap_or(f64::NAN),
            b.program_sum_s.unwrap_or(f64::NAN) * 1000.0,
            b.ok as f64 / b.wall_s,
            b.failures
        );
    }
    out.concurrent = batches;

    // 3.
    let budget = plan
        .section_budget
        .saturating_sub(started.elapsed())
        .max(plan.churn_budget);
    let (rounds, secs, cut) = churn_phase(plan, &ctx, &mut next_k, first_churn, budget)?;
    sys::sleep(Duration::from_secs(1));
    let (rss, hwm) = rss_kib(agent.pid())?;
    let breakdown = sys::rss_breakdown(agent.pid()).unwrap_or_default();
    let st = agent.status()?;
    let churn = Churn {
        interfaces: plan.churn_veths,
        rounds,
        registrations: ctx.registered.load(Ordering::SeqCst),
        planned: plan.registrations,
        seconds: secs,
        cut_by_budget: cut,
        failures: ctx.failures.load(Ordering::SeqCst),
        endpoints_left: st.endpoints.len(),
        rss_kib: rss,
        hwm_kib: hwm,
        rss_breakdown_kib: breakdown,
    };
    eprintln!(
        "    {} registrations ({} churn rounds over {} veths in {:.0} s{}): VmRSS {:.1} MiB, peak {:.1} MiB",
        churn.registrations,
        rounds,
        plan.churn_veths,
        secs,
        if cut { ", cut by the time budget" } else { "" },
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    out.churn = Some(churn);
    if let Some(e) = ctx.first_error.lock().expect("error slot").clone() {
        out.notes.push(format!("first failed registration: {e}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_durations_are_read_in_seconds() {
        assert_eq!(parse_debug_duration("1.5s"), Some(1.5));
        assert_eq!(parse_debug_duration("250ms"), Some(0.25));
        assert!((parse_debug_duration("12.5µs").unwrap() - 12.5e-6).abs() < 1e-12);
        assert!((parse_debug_duration("850ns").unwrap() - 850e-9).abs() < 1e-15);
        assert_eq!(parse_debug_duration("fast"), None);
    }

    #[test]
    fn the_registration_log_line_gives_program_and_attach() {
        let l = "2026-12-04T10:00:00.000Z  INFO palisade_agent::daemon: registered ns-001/app-3-7 (10.64.0.9, pbag3) as endpoint 12 in 3.5ms (program 2.9ms, attach 600µs)";
        let (t, p, a) = parse_registered_line(l).unwrap();
        assert!((t - 0.0035).abs() < 1e-9);
        assert!((p - 0.0029).abs() < 1e-9);
        assert!((a - 0.0006).abs() < 1e-9);
        // Colours do not get in the way; deregistrations are not counted.
        let c = "\u{1b}[32m INFO\u{1b}[0m \u{1b}[2mx\u{1b}[0m: registered a/b (1.2.3.4, v) as endpoint 1 in 1s (program 1s, attach 2ns)";
        assert_eq!(parse_registered_line(c).map(|x| x.1), Some(1.0));
        assert_eq!(
            parse_registered_line("INFO deregistered a/b (endpoint 3)"),
            None
        );
        assert_eq!(parse_registered_line("INFO ready"), None);
    }

    #[test]
    fn histograms_are_parsed_subtracted_and_bounded() {
        let before = "# TYPE x_seconds histogram\nx_seconds_sum 0.5\nx_seconds_count 2\nx_seconds_bucket{le=\"0.001\"} 1\nx_seconds_bucket{le=\"0.01\"} 2\nx_seconds_bucket{le=\"+Inf\"} 2\nother 1\n";
        let after = "x_seconds_sum 0.52\nx_seconds_count 102\nx_seconds_bucket{le=\"0.001\"} 91\nx_seconds_bucket{le=\"0.01\"} 101\nx_seconds_bucket{le=\"+Inf\"} 102\n";
        let a = Hist::parse(after, "x_seconds").unwrap();
        let b = Hist::parse(before, "x_seconds").unwrap();
        let d = a.since(&b);
        assert_eq!(d.count, 100.0);
        assert!((d.sum - 0.02).abs() < 1e-12);
        // 90 of 100 under 1 ms, 99 under 10 ms, 1 above.
        assert_eq!(d.quantile_upper(0.5), Some(0.001));
        assert_eq!(d.quantile_upper(0.99), Some(0.01));
        assert_eq!(d.quantile_upper(1.0), Some(f64::INFINITY));
        assert!(Hist::parse(after, "y_seconds").is_none());
        assert_eq!(Hist::default().quantile_upper(0.99), None);
    }

    #[test]
    fn the_concurrent_rate_is_registrations_over_agent_busy_time() {
        assert_eq!(agent_rate(20, 0.05), Some(400.0));
        assert_eq!(agent_rate(20, 0.0), None);
        assert_eq!(agent_rate(0, 1.0), None);
        assert_eq!(agent_rate(20, f64::NAN), None);
    }

    #[test]
    fn probes_overlapping_a_recompile_are_found() {
        let probes = [(0.0, 0.1), (0.95, 0.1), (1.5, 0.1), (2.1, 0.01), (3.0, 0.5)];
        let recompiles = [(1.0, 2.0), (3.2, 3.3)];
        assert_eq!(
            overlapping(&probes, &recompiles),
            [false, true, true, false, true]
        );
    }

    #[test]
    fn shifted_policy_files_differ_and_shift_zero_is_the_clusters() {
        let spec = Spec {
            namespaces: 2,
            pods: 20,
            policies: 10,
            apps: 4,
        };
        let c = cluster::generate(&spec);
        let orig = &c
            .files
            .iter()
            .find(|f| f.0 == "20-policies.yaml")
            .unwrap()
            .1;
        assert_eq!(&policies_yaml(&spec, 0), orig);
        assert_ne!(&policies_yaml(&spec, 1), orig);
        // Same policy names: a change, not an add/remove.
        assert_eq!(
            policies_yaml(&spec, 1).matches("name: pol-").count(),
            spec.policies
        );
    }

    #[test]
    fn consecutive_registrations_get_distinct_pods() {
        let pods = 10_000;
        for start in [0, 9_950, 123_456] {
            let mut seen: Vec<usize> = (start..start + 100).map(|k| pod_for(k, pods)).collect();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), 100);
        }
    }
}
