//! Section 1: Per-packet cost of the policy programs through BPF_PROG_TEST_RUN.
//!
//! One datapath ("rig") per (policy entries, identities) configuration is
//! loaded up front, each with its own maps filled, so configurations can be
//! interleaved round by round without refilling. In every round and rig the
//! empty program (`r0 = 0; exit`, the loop's own cost) runs right before the
//! scenarios, and each scenario is quoted as its difference to it.
//!
//! All scenarios run `pod_ingress` (packets to the pod, dir INGRESS) on
//! ifindex 1 for an endpoint enforced in both directions:
//!
//! * **established**: an ACK of a flow with a conntrack entry: endpoint
//!   lookup, parse, one conntrack hit and refresh.
//! * **new flow allowed**: test_run repeats one packet, so a plain SYN would
//!   be new only once. The packet is SYN+FIN: the first run admits it and
//!   records it in FIN_WAIT; every later run finds that entry, which a SYN
//!   *reopens* (`tcp_reopens`), so the full new-flow path runs every time:
//!   conntrack lookup (its own tuple: a SYN is not looked up as a reply,
//!   `decision::track`), ipcache, policy (exact hit),
//!   conntrack insert (replacing the entry), verdict event, counter. The
//!   only difference to a brand-new tuple is that the first lookup finds an
//!   entry and the insert replaces one (same work as a miss and an add).
//! * **new flow denied**: a SYN from a peer no rule admits: one conntrack
//!   miss, ipcache, policy once (exact peer: the endpoint's rules name
//!   pods only, so the agent's sync marks the CIDR, any-pod and any-peer
//!   lookups as skippable, `palisade_common::no_entries_bit`, and the
//!   endpoint carries those bits here too), drop event. Nothing is
//!   recorded, so every run is new.
//!
//! New flows emit a ring-buffer event each. Two variants of each new-flow
//! scenario: **events consumed** (a drainer thread reads the ring as the
//! agent does: asleep until the programs wake it, which they do once a
//! backlog builds up, or for 100 ms, then draining everything queued)
//! and **ring full** (the drainer is paused and the ring filled first: the
//! event reservation fails and nothing is written). The difference is what
//! writing the event costs. Events the ring could not take are reported
//! (`EVENTS_LOST`).
//!
//! A cross-check on the largest configuration runs genuinely distinct
//! tuples (a plain SYN with a new source port per call, repeat 1) against
//! the empty program at repeat 1.
use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{MapData, RingBuf},
    programs::SchedClassifier,
};
use palisade_common::{
    programs, reason, EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW, DIR_EGRESS,
    DIR_INGRESS, EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED, IDENTITY_WORLD, POLICY_PREFIX_FULL,
    POLICY_PREFIX_PROTO, PROTO_TCP, PROTO_UDP,
};
use palisade_dataplane::{
    packet::{Packet, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_SYN},
    testrun::{load_pass_all, run_tc, TC_ACT_OK, TC_ACT_SHOT},
    Datapath, DatapathConfig, Maps,
};

use crate::{
    report::{DistinctTuples, Scenario, Testrun, TestrunConfig},
    stats::{median, Rng},
    sys::{self, PinRoot},
};

const IFINDEX: u32 = 1;
const EP_ID: u32 = 7;
const POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const POD_IDENTITY: u32 = 300;
const CIDR_IDENTITY: u32 = palisade_common::IDENTITY_FIRST_CIDR + 900;
const FIRST_PEER_IDENTITY: u32 = 1000;

/// Scenario names, in measuring order (see the module docs). The IPv6
/// ones are the first three over IPv6 (the same peers, twins in
/// `IPCACHE6`, the same policy entries): `pod_ingress` tail-calls
/// `pod_ingress6` for them.
pub const SCENARIOS: [&str; 8] = [
    "established",
    "new flow allowed",
    "new flow denied",
    "new flow allowed, ring full",
    "new flow denied, ring full",
    "established, IPv6",
    "new flow allowed, IPv6",
    "new flow denied, IPv6",
];

/// The IPv6 twin of a bench address (`fd00::` and its 32 bits).
fn twin6(a: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from(0xfd00u128 << 112 | u32::from(a) as u128)
}

pub struct Plan {
    pub policy_entries: Vec<usize>,
    pub identities: Vec<usize>,
    pub rounds: usize,
    pub repeat: u32,
    pub distinct_calls: usize,
}

fn peer_addr(k: usize) -> Ipv4Addr {
    // 10.2.0.0/16 and up: only map keys, never a packet's real address.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 1)) + k as u32)
}

struct Rig {
    policy_entries: usize,
    identities: usize,
    allowed_peer: Ipv4Addr,
    denied_peer: Ipv4Addr,
    dp: Datapath,
    maps: Maps,
    _pins: PinRoot,
}

impl Rig {
    fn new(policy_entries: usize, identities: usize) -> Result<(Self, RingBuf<MapData>)> {
        let pins = PinRoot::new()?;
        let mut dp = Datapath::load(&DatapathConfig {
            pins: pins.pins.clone(),
            ..Default::default()
        })
        .context("loading the datapath")?;
        let mut maps = dp.take_maps()?;
        // Per-packet cost of the verdict path as it runs for a pod within its
        // budgets: a packet repeated 50k times would otherwise be measured
        // on the cheaper over-budget paths (events suppressed, flows unrecorded).
        unlimited_budgets(&mut maps)?;
        let ring = maps.take_events().context("events map")?;

        let mut endpoint = EndpointInfo {
            endpoint_id: EP_ID,
            identity: POD_IDENTITY,
            ipv4: u32::from_ne_bytes(POD.octets()),
            flags: EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED,
            generation: 0,
            mac: [0; 6],
            _pad: [0; 2],
            ipv6: palisade_dataplane::maps::ip6_words(twin6(POD)),
        };
        maps.upsert_endpoint(IFINDEX, endpoint)?;
        // ipcache: world, one CIDR block containing every peer, and one /32
        // per identity.
        let world = IpcacheValue {
            identity: IDENTITY_WORLD,
            cidr_identity: IDENTITY_WORLD,
        };
        maps.set_ipcache(Ipv4Addr::UNSPECIFIED, 0, world)?;
        maps.set_ipcache6(Ipv6Addr::UNSPECIFIED, 0, world)?;
        let block = IpcacheValue {
            identity: CIDR_IDENTITY,
            cidr_identity: CIDR_IDENTITY,
        };
        maps.set_ipcache(Ipv4Addr::new(10, 0, 0, 0), 8, block)?;
        maps.set_ipcache6(twin6(Ipv4Addr::new(10, 0, 0, 0)), 104, block)?;
        for k in 0..identities {
            let v = IpcacheValue {
                identity: FIRST_PEER_IDENTITY + k as u32,
                cidr_identity: CIDR_IDENTITY,
            };
            maps.set_ipcache(peer_addr(k), 32, v)?;
            maps.set_ipcache6(twin6(peer_addr(k)), 128, v)?;
        }
        let allowed_k = identities / 2;
        let denied_k = identities / 3;
        ensure!(allowed_k != denied_k, "need at least 3 identities");
        let allowed_id = FIRST_PEER_IDENTITY + allowed_k as u32;
        let denied_id = FIRST_PEER_IDENTITY + denied_k as u32;

        let keys = policy_keys(policy_entries, identities, allowed_id, denied_id);
        for &(prefix, key) in &keys {
            maps.set_policy(
                prefix,
                key,
                PolicyValue {
                    action: ACTION_ALLOW,
                    cookie: 1,
                },
            )?;
        }
        // The lookups the agent's map sync lets the programs skip (no
        // entry of that class, peer class and length, for the endpoint and
        // direction), as it sets them: once the entries are in.
        endpoint.flags |=
            palisade_common::no_entries_bits(EP_ID, keys.iter().map(|(p, k)| (*p, k)));
        maps.upsert_endpoint(IFINDEX, endpoint)?;
        let rig = Self {
            policy_entries,
            identities,
            allowed_peer: peer_addr(allowed_k),
            denied_peer: peer_addr(denied_k),
            dp,
            maps,
            _pins: pins,
        };
        Ok((rig, ring))
    }

    fn prog(&mut self) -> Result<&SchedClassifier> {
        Ok(&*self.dp.classifier(programs::POD_INGRESS)?)
    }

    fn counter(&self, r: u8) -> Result<u64> {
        Ok(self.maps.counters()?.get(r))
    }
}

/// `n` distinct policy entries: the one allow the scenarios use, about a
/// tenth more for the same endpoint (other peers, ports, directions), the
/// rest for other endpoints. None of them admits the denied peer, its CIDR
/// identity or "any peer" for the measured endpoint, port and protocol.
pub fn policy_keys(
    n: usize,
    identities: usize,
    allowed_id: u32,
    denied_id: u32,
) -> Vec<(u32, PolicyKey)> {
    let measured = PolicyKey {
        endpoint_id: EP_ID,
        peer_identity: allowed_id,
        direction: DIR_INGRESS,
        protocol: PROTO_TCP,
        dport_be: 80u16.to_be(),
    };
    let mut seen: HashSet<(u32, PolicyKey)> = HashSet::new();
    let mut out = vec![(POLICY_PREFIX_FULL, measured)];
    seen.insert(out[0]);
    let mut rng = Rng::new(0x9e37_79b9 ^ n as u64);
    let endpoints = (n / 50).max(1) as u64;
    const PORTS: [u16; 9] = [80, 443, 8080, 5432, 6379, 9090, 3306, 53, 8443];
    let mut guard = 0usize;
    while out.len() < n {
        guard += 1;
        if guard > n * 50 + 1000 {
            break;
        }
        let own = rng.below(10) == 0;
        let endpoint_id = if own {
            EP_ID
        } else {
            100 + rng.below(endpoints) as u32
        };
        let peer_identity = FIRST_PEER_IDENTITY + rng.below(identities as u64) as u32;
        let direction = if rng.below(2) == 0 {
            DIR_INGRESS
        } else {
            DIR_EGRESS
        };
        let protocol = if rng.below(4) == 0 {
            PROTO_UDP
        } else {
            PROTO_TCP
        };
        let all_ports = rng.below(10) == 0;
        let port = if rng.below(3) == 0 {
            9000 + rng.below(1000) as u16
        } else {
            PORTS[rng.below(PORTS.len() as u64) as usize]
        };
        let (prefix, dport) = if all_ports {
            (POLICY_PREFIX_PROTO, 0)
        } else {
            (POLICY_PREFIX_FULL, port)
        };
        let key = PolicyKey {
            endpoint_id,
            peer_identity,
            direction,
            protocol,
            dport_be: dport.to_be(),
        };
        let would_admit_denied = endpoint_id == EP_ID
            && direction == DIR_INGRESS
            && protocol == PROTO_TCP
            && peer_identity == denied_id;
        if would_admit_denied || !seen.insert((prefix, key)) {
            continue;
        }
        out.push((prefix, key));
    }
    out
}

/// Consumes every ring while the benchmark runs, as the agent does
/// (`agent/src/server.rs::read_events`): it sleeps until the programs wake
/// it (edge-triggered: they wake readers once a backlog builds up, not
/// per record) or 100 ms pass, then drains everything queued. Can be
/// paused so that a ring fills up.
pub(crate) struct Drainer {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The agent's drain interval when not woken.
const DRAIN_INTERVAL_MS: i32 = 100;

impl Drainer {
    pub(crate) fn start(mut rings: Vec<RingBuf<MapData>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (s, p, ack) = (stop.clone(), pause.clone(), paused.clone());
        let thread = std::thread::spawn(move || {
            let ep = Epoll::new(rings.iter().map(|r| r.as_raw_fd()));
            while !s.load(Ordering::SeqCst) {
                if p.load(Ordering::SeqCst) {
                    ack.store(true, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    continue;
                }
                ack.store(false, Ordering::SeqCst);
                for r in &mut rings {
                    while r.next().is_some() {}
                }
                // (A pause or stop is seen within one interval.)
                ep.wait(DRAIN_INTERVAL_MS);
            }
        });
        Self {
            stop,
            pause,
            paused,
            thread: Some(thread),
        }
    }

    /// Returns once the drainer no longer reads.
    fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        while !self.paused.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Edge-triggered readiness of the rings, as tokio's `AsyncFd` gives the
/// agent: a wait returns on a wakeup the programs send, not merely because
/// records are queued.
struct Epoll(std::os::fd::OwnedFd);

impl Epoll {
    fn new(fds: impl Iterator<Item = std::os::fd::RawFd>) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscalls; the descriptor is owned from here on.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(
            ep >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a descriptor just created and owned by nobody else.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(ep) };
        for fd in fds {
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                u64: fd as u64,
            };
            // SAFETY: valid descriptors and event.
            let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
            assert_eq!(r, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
        }
        Self(owned)
    }

    fn wait(&self, timeout_ms: i32) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: a valid epoll descriptor and buffer.
        unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), 8, timeout_ms) };
    }
}

/// No event or conntrack budget (both still looked up on their paths).
pub fn unlimited_budgets(maps: &mut palisade_dataplane::Maps) -> Result<()> {
    maps.set_event_budget(palisade_common::event_limit::EventBudget::UNLIMITED)?;
    maps.set_conntrack_budget(palisade_common::ct_budget::CtBudget::UNLIMITED)?;
    Ok(())
}

/// With the drainer paused: run `pkt` (a packet that emits an event) until
/// the ring refuses events.
fn fill_ring(rig: &mut Rig, pkt: &[u8]) -> Result<()> {
    for _ in 0..20 {
        let before = rig.counter(reason::EVENTS_LOST)?;
        run_tc(rig.prog()?, pkt, IFINDEX, 50_000)?;
        if rig.counter(reason::EVENTS_LOST)? > before {
            return Ok(());
        }
    }
    bail!("the event ring did not fill up")
}

struct Measured {
    ns: f64,
    events_lost: u64,
}

/// One test_run of `pkt`, checked: the expected action, and the expected
/// reason counted once per run (so the path really is the one named).
fn measure(
    rig: &mut Rig,
    pkt: &[u8],
    repeat: u32,
    want_action: u32,
    want_reason: Option<u8>,
) -> Result<Measured> {
    let before = rig.maps.counters()?;
    let r = run_tc(rig.prog()?, pkt, IFINDEX, repeat)?;
    let after = rig.maps.counters()?;
    ensure!(
        r.action == want_action,
        "action {} instead of {want_action}",
        r.action
    );
    if let Some(why) = want_reason {
        let d = after.get(why) - before.get(why);
        ensure!(
            d == repeat as u64,
            "reason {} counted {d} times in {repeat} runs",
            reason::name(why)
        );
    }
    Ok(Measured {
        ns: r.per_run.as_nanos() as f64,
        events_lost: after.get(reason::EVENTS_LOST) - before.get(reason::EVENTS_LOST),
    })
}

pub fn run(plan: &Plan) -> Result<Testrun> {
    let empty_pins = PinRoot::new()?;
    let empty = load_pass_all(empty_pins.pins.root())?;

    let mut rigs = Vec::new();
    let mut rings = Vec::new();
    for &p in &plan.policy_entries {
        for &i in &plan.identities {
            sys::check()?;
            let t = Instant::now();
            let (rig, ring) = Rig::new(p, i)?;
            eprintln!(
                "    rig: {p} policy entries, {i} identities loaded and filled in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            rigs.push(rig);
            rings.push(ring);
        }
    }
    let drainer = Drainer::start(rings);

    let mut configs: Vec<TestrunConfig> = rigs
        .iter()
        .map(|r| TestrunConfig {
            policy_entries: r.policy_entries,
            identities: r.identities,
            empty: Vec::new(),
            scenarios: SCENARIOS
                .iter()
                .map(|n| Scenario {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
        })
        .collect();

    let order: Vec<usize> = (0..rigs.len()).collect();
    for round in 0..plan.rounds {
        for &ri in &crate::stats::rotated(&order, round) {
            sys::check()?;
            let rig = &mut rigs[ri];
            let est = Packet::tcp(rig.allowed_peer, 40000, POD, 80, TCP_FLAG_ACK).bytes();
            let new_ok = Packet::tcp(
                rig.allowed_peer,
                40001,
                POD,
                80,
                TCP_FLAG_SYN | TCP_FLAG_FIN,
            )
            .bytes();
            let new_no = Packet::tcp(rig.denied_peer, 40002, POD, 80, TCP_FLAG_SYN).bytes();
            let (allowed6, denied6, pod6) =
                (twin6(rig.allowed_peer), twin6(rig.denied_peer), twin6(POD));
            let est6 = Packet::ipv6_tcp(allowed6, 40000, pod6, 80, TCP_FLAG_ACK).bytes();
            let syn_fin = TCP_FLAG_SYN | TCP_FLAG_FIN;
            let new_ok6 = Packet::ipv6_tcp(allowed6, 40001, pod6, 80, syn_fin).bytes();
            let new_no6 = Packet::ipv6_tcp(denied6, 40002, pod6, 80, TCP_FLAG_SYN).bytes();
            if round == 0 {
                // Warm up: the ACK creates the established entry, SYN+FIN
                // its FIN_WAIT entry.
                measure(rig, &est, 1, TC_ACT_OK, None)?;
                measure(rig, &new_ok, 1, TC_ACT_OK, None)?;
                measure(rig, &est6, 1, TC_ACT_OK, None)?;
                measure(rig, &new_ok6, 1, TC_ACT_OK, None)?;
            }
            let e = run_tc(&empty, &est, IFINDEX, plan.repeat)?;
            configs[ri].empty.push(e.per_run.as_nanos() as f64);
            let cases: [(&[u8], u32, u8, bool); 8] = [
                (&est, TC_ACT_OK, reason::ESTABLISHED, false),
                (&new_ok, TC_ACT_OK, reason::POLICY_ALLOW, true),
                (&new_no, TC_ACT_SHOT, reason::NO_POLICY_MATCH, true),
                (&new_ok, TC_ACT_OK, reason::POLICY_ALLOW, true),
                (&new_no, TC_ACT_SHOT, reason::NO_POLICY_MATCH, true),
                (&est6, TC_ACT_OK, reason::ESTABLISHED, false),
                (&new_ok6, TC_ACT_OK, reason::POLICY_ALLOW, true),
                (&new_no6, TC_ACT_SHOT, reason::NO_POLICY_MATCH, true),
            ];
            for (k, (pkt, action, why, emits)) in cases.iter().enumerate() {
                if k == 3 {
                    drainer.pause();
                    fill_ring(rig, &new_no)?;
                }
                if k == 5 {
                    drainer.resume();
                }
                let m = measure(rig, pkt, plan.repeat, *action, Some(*why))
                    .with_context(|| configs[ri].scenarios[k].name.clone())?;
                let sc = &mut configs[ri].scenarios[k];
                sc.ns.push(m.ns);
                if *emits {
                    sc.events += plan.repeat as u64;
                    sc.events_lost += m.events_lost;
                }
            }
            drainer.resume();
        }
        let last = &configs[rigs.len() - 1];
        eprintln!(
            "    round {}/{}: {} entries/{} ids: empty {:.1} ns, {}",
            round + 1,
            plan.rounds,
            last.policy_entries,
            last.identities,
            last.empty.last().copied().unwrap_or(f64::NAN),
            last.scenarios
                .iter()
                .map(|s| format!(
                    "{} {:.1} ns",
                    s.name,
                    s.ns.last().copied().unwrap_or(f64::NAN)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // Cross-check: distinct tuples at repeat 1, on the largest rig.
    let mut cross = None;
    if plan.distinct_calls > 0 {
        let rig = rigs.last_mut().context("no rig")?;
        let mut dt = DistinctTuples {
            policy_entries: rig.policy_entries,
            identities: rig.identities,
            calls_per_round: plan.distinct_calls,
            ..Default::default()
        };
        let mut sport: u16 = 1024;
        let denied = Packet::tcp(rig.denied_peer, 40002, POD, 80, TCP_FLAG_SYN).bytes();
        for _ in 0..plan.rounds {
            for full in [false, true] {
                sys::check()?;
                if full {
                    drainer.pause();
                    fill_ring(rig, &denied)?;
                }
                let mut e = Vec::with_capacity(plan.distinct_calls);
                let mut n = Vec::with_capacity(plan.distinct_calls);
                for _ in 0..plan.distinct_calls {
                    // 2 x rounds x calls stays below the port range: no reuse.
                    sport = sport.wrapping_add(1).max(1024);
                    let pkt = Packet::tcp(rig.allowed_peer, sport, POD, 80, TCP_FLAG_SYN).bytes();
                    e.push(run_tc(&empty, &pkt, IFINDEX, 1)?.per_run.as_nanos() as f64);
                    let before = rig.counter(reason::POLICY_ALLOW)?;
                    let r = run_tc(rig.prog()?, &pkt, IFINDEX, 1)?;
                    let counted = rig.counter(reason::POLICY_ALLOW)? - before;
                    // A reused source port finds its entry (SYN_SENT): not new.
                    if r.action == TC_ACT_OK && counted == 1 {
                        n.push(r.per_run.as_nanos() as f64);
                    }
                }
                drainer.resume();
                let (e, n) = (
                    median(&e).unwrap_or(f64::NAN),
                    median(&n).unwrap_or(f64::NAN),
                );
                if full {
                    dt.new_flow_full_ns.push(n);
                    dt.empty_full_ns.push(e);
                } else {
                    dt.empty_ns.push(e);
                    dt.new_flow_ns.push(n);
                }
            }
        }
        cross = Some(dt);
    }

    Ok(Testrun {
        repeat: plan.repeat,
        rounds: plan.rounds,
        configs,
        distinct: cross,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_policy_keys_are_distinct_and_never_admit_the_denied_peer() {
        let keys = policy_keys(5000, 1000, 1500, 1333);
        assert_eq!(keys.len(), 5000);
        let set: HashSet<_> = keys.iter().collect();
        assert_eq!(set.len(), keys.len());
        assert_eq!(keys[0].1.peer_identity, 1500);
        assert!(!keys.iter().any(|(_, k)| k.endpoint_id == EP_ID
            && k.direction == DIR_INGRESS
            && k.protocol == PROTO_TCP
            && (k.peer_identity == 1333
                || k.peer_identity == CIDR_IDENTITY
                || k.peer_identity == 0)));
        // Some entries are for the measured endpoint itself.
        assert!(keys.iter().filter(|(_, k)| k.endpoint_id == EP_ID).count() > 100);
    }

    #[test]
    fn small_rule_sets_are_exact() {
        assert_eq!(policy_keys(10, 10, 1005, 1003).len(), 10);
        assert_eq!(policy_keys(1, 10, 1005, 1003).len(), 1);
    }
}
