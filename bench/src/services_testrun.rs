//! Section 8's per-packet part: what Service translation adds to a packet
//! of an established flow, through BPF_PROG_TEST_RUN on one enforced pod
//! (egress: the pod's packets; ingress: the replies it gets), direct to
//! the backend and through a ClusterIP.
//!
//! A translated packet is rewritten by the program, and test_run repeats
//! a program on the same skb, so every call runs once (repeat 1, a fresh
//! packet) and the kernel's own time of that run is taken, median of many
//! calls: absolute numbers include the test_run timer's overhead, the
//! differences between paths do not.
use std::net::Ipv4Addr;

use anyhow::{ensure, Result};
use palisade_common::{
    service::{SvcBackend, SvcBackendKey, SvcFrontend, SvcFrontendKey},
    EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW, DIR_EGRESS,
    EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED, IDENTITY_WORLD, POLICY_PREFIX_FULL, PROTO_TCP,
};
use palisade_dataplane::{
    maps::be,
    packet::{Packet, TCP_FLAG_ACK, TCP_FLAG_SYN},
    testrun::{run_tc, TC_ACT_OK},
    Datapath, DatapathConfig,
};
use palisade_tests::PinRoot;

use crate::stats::median;

const IFINDEX: u32 = 1;
const POD: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 9);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 5, 0, 1);
const BACKEND_IDENTITY: u32 = 500;

/// (scenario, median ns per packet), in this order.
pub const SCENARIOS: [&str; 4] = [
    "egress established, direct",
    "egress established, clusterip",
    "ingress reply, direct",
    "ingress reply, clusterip",
];

pub fn run(calls: usize) -> Result<Vec<(String, f64)>> {
    let pins = PinRoot::new()?;
    let mut dp = Datapath::load(&DatapathConfig {
        pins: pins.pins.clone(),
        ..Default::default()
    })?;
    let mut maps = dp.take_maps()?;
    // Per-packet cost of the verdict path as it runs for a pod within its
    // budgets: a packet repeated 50k times would otherwise be measured
    // on the cheaper over-budget paths (events suppressed, flows unrecorded).
    crate::testrun::unlimited_budgets(&mut maps)?;
    maps.upsert_endpoint(
        IFINDEX,
        EndpointInfo {
            endpoint_id: 1,
            identity: 1001,
            ipv4: be(POD),
            flags: EP_EGRESS_ENFORCED | EP_INGRESS_ENFORCED,
            generation: 0,
            mac: [0; 6],
            _pad: [0; 2],
            ipv6: [0; 4],
        },
    )?;
    let world = IpcacheValue {
        identity: IDENTITY_WORLD,
        cidr_identity: IDENTITY_WORLD,
    };
    maps.set_ipcache(Ipv4Addr::UNSPECIFIED, 0, world)?;
    maps.set_ipcache(
        BACKEND,
        32,
        IpcacheValue {
            identity: BACKEND_IDENTITY,
            cidr_identity: IDENTITY_WORLD,
        },
    )?;
    maps.set_policy(
        POLICY_PREFIX_FULL,
        PolicyKey {
            endpoint_id: 1,
            peer_identity: BACKEND_IDENTITY,
            direction: DIR_EGRESS,
            protocol: PROTO_TCP,
            dport_be: 8080u16.to_be(),
        },
        PolicyValue {
            action: ACTION_ALLOW,
            cookie: 1,
        },
    )?;
    maps.set_backend(
        SvcBackendKey {
            service_id: 1,
            slot: 0,
        },
        SvcBackend {
            addr: be(BACKEND),
            port_be: 8080u16.to_be(),
            _pad: 0,
        },
    )?;
    maps.set_frontend(
        SvcFrontendKey {
            addr: be(VIP),
            port_be: 80u16.to_be(),
            protocol: PROTO_TCP,
            _pad: 0,
        },
        SvcFrontend {
            service_id: 1,
            backends: 1,
            affinity_s: 0,
        },
    )?;

    let egress = |dst: Ipv4Addr, dport: u16, sport: u16, flags: u8| {
        Packet::tcp(POD, sport, dst, dport, flags)
            .with_payload(1)
            .bytes()
    };
    let reply = |sport: u16| {
        Packet::tcp(BACKEND, 8080, POD, sport, TCP_FLAG_ACK)
            .with_payload(1)
            .bytes()
    };
    // Open both flows (SYN out, SYN-ACK back).
    for (dst, dport, sport) in [(BACKEND, 8080, 40000), (VIP, 80, 40001)] {
        let out = dp.classifier("pod_egress")?;
        ensure!(
            run_tc(out, &egress(dst, dport, sport, TCP_FLAG_SYN), IFINDEX, 1)?.action == TC_ACT_OK
        );
        let back = Packet::tcp(BACKEND, 8080, POD, sport, TCP_FLAG_SYN | TCP_FLAG_ACK).bytes();
        let inp = dp.classifier("pod_ingress")?;
        ensure!(run_tc(inp, &back, IFINDEX, 1)?.action == TC_ACT_OK);
    }
    let packets = [
        ("pod_egress", egress(BACKEND, 8080, 40000, TCP_FLAG_ACK)),
        ("pod_egress", egress(VIP, 80, 40001, TCP_FLAG_ACK)),
        ("pod_ingress", reply(40000)),
        ("pod_ingress", reply(40001)),
    ];
    let mut samples = vec![Vec::with_capacity(calls); packets.len()];
    // Interleaved, so drift on a shared machine hits every path alike.
    for _ in 0..calls {
        for (i, (prog, pkt)) in packets.iter().enumerate() {
            let r = run_tc(dp.classifier(prog)?, pkt, IFINDEX, 1)?;
            ensure!(r.action == TC_ACT_OK, "{}: dropped", SCENARIOS[i]);
            samples[i].push(r.per_run.as_nanos() as f64);
        }
    }
    Ok(SCENARIOS
        .iter()
        .zip(samples)
        .map(|(n, s)| (n.to_string(), median(&s).unwrap_or(f64::NAN)))
        .collect())
}
