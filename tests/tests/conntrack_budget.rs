//! Per-endpoint conntrack and fragment budgets (issue 17 point 7) on the
//! real programs through BPF_PROG_TEST_RUN, and the GC that recounts them
//! and deletes a gone endpoint's entries.
//!
//! Every run is on ifindex 1 (loopback); the pod on it is switched between
//! a victim and an attacker by rewriting its `ENDPOINTS` entry (entries are
//! bound to the endpoint id, so each keeps its own). Both addresses stay
//! indexed, so ingress entries from the attacker are charged to it.
use std::net::Ipv4Addr;

use anyhow::Result;
use palisade_common::{
    ct_budget::CtBudget, programs, reason, CtKey, EndpointInfo, IpcacheValue, PolicyKey,
    PolicyValue, ACTION_ALLOW, DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED,
    IDENTITY_ANY, IDENTITY_WORLD, POLICY_PREFIX_FIXED, PROTO_UDP,
};
use palisade_dataplane::{
    events::EventReader,
    loader::MapSizes,
    maps::{be, ct_clock_ns},
    packet::{Packet, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_SYN},
    testrun::{run_tc, TC_ACT_OK, TC_ACT_SHOT},
    ConntrackGc, Datapath, DatapathConfig, Maps,
};
use palisade_tests::{require_root, PinRoot};

const IFINDEX: u32 = 1;
const VICTIM: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const VICTIM_ID: u32 = 5;
const ATTACKER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 6);
const ATTACKER_ID: u32 = 6;
/// Another pod on another node: world to these maps.
const PEER: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 9);
const BOTH: u32 = EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED;

struct Rig {
    dp: Datapath,
    maps: Maps,
    events: EventReader,
    pins: PinRoot,
}

impl Rig {
    /// A small conntrack table (so a flood would overflow it) and `budget`.
    fn new(conntrack: u32, budget: CtBudget) -> Result<Self> {
        let pins = PinRoot::new()?;
        let cfg = DatapathConfig {
            pins: pins.pins.clone(),
            pod_hook: Default::default(),
            local_delivery: Default::default(),
            sizes: MapSizes {
                endpoints: 64,
                ipcache: 64,
                policy: 64,
                conntrack,
                fragments: 256,
                xdp_deny: 16,
                ..Default::default()
            },
        };
        let mut dp = Datapath::load(&cfg)?;
        let mut maps = dp.take_maps()?;
        maps.set_conntrack_budget(budget)?;
        let events = EventReader::new(maps.take_events().expect("events map"));
        maps.set_ipcache(
            Ipv4Addr::UNSPECIFIED,
            0,
            IpcacheValue {
                identity: IDENTITY_WORLD,
                cidr_identity: IDENTITY_WORLD,
            },
        )?;
        let mut rig = Self {
            dp,
            maps,
            events,
            pins,
        };
        // Both pods allow everything in both directions: only the budget
        // can drop anything here.
        for id in [VICTIM_ID, ATTACKER_ID] {
            for dir in [DIR_EGRESS, DIR_INGRESS] {
                rig.maps.set_policy(
                    POLICY_PREFIX_FIXED,
                    PolicyKey {
                        endpoint_id: id,
                        peer_identity: IDENTITY_ANY,
                        direction: dir,
                        protocol: 0,
                        dport_be: 0,
                    },
                    PolicyValue {
                        action: ACTION_ALLOW,
                        cookie: 7,
                    },
                )?;
            }
        }
        // Index both addresses (ingress charges find the sender by them).
        rig.on(ATTACKER_ID, BOTH)?;
        rig.on(VICTIM_ID, BOTH)?;
        Ok(rig)
    }

    /// Put pod `id` (with `flags`) on the test interface.
    fn on(&mut self, id: u32, flags: u32) -> Result<()> {
        let addr = if id == VICTIM_ID { VICTIM } else { ATTACKER };
        let info = EndpointInfo {
            endpoint_id: id,
            identity: 1000 + id,
            ipv4: be(addr),
            flags,
            generation: 0,
            mac: [0; 6],
            _pad: [0; 2],
            ipv6: [0; 4],
        };
        self.maps.upsert_endpoint(IFINDEX, info)?;
        Ok(())
    }

    fn run(&mut self, dir: u8, p: &Packet) -> Result<bool> {
        let name = if dir == DIR_EGRESS {
            programs::POD_EGRESS
        } else {
            programs::POD_INGRESS
        };
        let r = run_tc(self.dp.classifier(name)?, &p.bytes(), IFINDEX, 1)?;
        assert!(r.action == TC_ACT_OK || r.action == TC_ACT_SHOT);
        Ok(r.action == TC_ACT_OK)
    }

    fn counter(&self, r: u8) -> Result<u64> {
        Ok(self.maps.counters()?.get(r))
    }

    fn charged(&self, id: u32) -> u64 {
        self.maps.conntrack_charge(id).map_or(0, |c| c.entries)
    }
}

fn udp_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, scope: u8, id: u32) -> CtKey {
    CtKey {
        saddr: be(src),
        daddr: be(dst),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        protocol: PROTO_UDP,
        scope,
        _pad: 0,
        endpoint_id: id,
    }
}

/// The victim opens a UDP flow, the attacker sends `flood` new flows, then
/// the victim's reply comes back: does it still find its entry?
fn victim_reply_after_flood(rig: &mut Rig, flood: u16) -> Result<bool> {
    rig.on(VICTIM_ID, BOTH)?;
    assert!(rig.run(DIR_EGRESS, &Packet::udp(VICTIM, 5000, PEER, 53))?);
    rig.on(ATTACKER_ID, BOTH)?;
    for i in 0..flood {
        rig.run(DIR_EGRESS, &Packet::udp(ATTACKER, 10000 + i, PEER, 9))?;
    }
    rig.on(VICTIM_ID, BOTH)?;
    // No policy admits this as a new flow from the peer's port 53 (the
    // pod's ingress allows any peer, so drop only what conntrack decides:
    // judge it by the reason).
    let before = rig.counter(reason::REPLY)?;
    rig.run(DIR_INGRESS, &Packet::udp(PEER, 53, VICTIM, 5000))?;
    Ok(rig.counter(reason::REPLY)? == before + 1)
}

#[test]
fn a_flood_of_new_flows_does_not_flush_another_pods_entries() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Without a budget the flood (4x the table) evicts the victim's entry:
    // what the budget is for (and what this test would see without it).
    let mut open = Rig::new(1024, CtBudget::UNLIMITED)?;
    assert!(
        !victim_reply_after_flood(&mut open, 4096)?,
        "the victim's entry survived a flood of 4x the table without budgets: the test cannot show anything"
    );

    let mut rig = Rig::new(
        1024,
        CtBudget {
            entries: 100,
            fragments: 0,
        },
    )?;
    let drops_before = rig.counter(reason::CT_BUDGET)?;
    rig.events.drain();
    assert!(victim_reply_after_flood(&mut rig, 4096)?);
    // The attacker got its budget and no more: the rest of its new flows
    // were dropped and counted, and reported (a record per drop, under the
    // event budget).
    assert_eq!(rig.charged(ATTACKER_ID), 100);
    assert_eq!(rig.counter(reason::CT_BUDGET)? - drops_before, 4096 - 100);
    let events = rig.events.drain();
    let budget_drops: Vec<_> = events
        .iter()
        .filter(|e| e.reason == reason::CT_BUDGET)
        .collect();
    assert!(!budget_drops.is_empty(), "no conntrack-budget record");
    assert!(budget_drops
        .iter()
        .all(|e| e.endpoint_id == ATTACKER_ID && e.saddr == be(ATTACKER)));
    // Its flows inside the budget keep working.
    rig.on(ATTACKER_ID, BOTH)?;
    let before = rig.counter(reason::REPLY)?;
    assert!(rig.run(DIR_INGRESS, &Packet::udp(PEER, 9, ATTACKER, 10000))?);
    assert_eq!(rig.counter(reason::REPLY)?, before + 1);
    Ok(())
}

#[test]
fn a_pod_that_needs_no_entries_passes_unrecorded_over_its_budget() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut rig = Rig::new(
        1024,
        CtBudget {
            entries: 10,
            fragments: 0,
        },
    )?;
    // Unenforced both ways: replies pass without an entry, so over its
    // budget its new flows still pass, just unrecorded.
    rig.on(ATTACKER_ID, 0)?;
    let untracked = rig.counter(reason::CT_BUDGET_UNTRACKED)?;
    for i in 0..30 {
        assert!(rig.run(DIR_EGRESS, &Packet::udp(ATTACKER, 20000 + i, PEER, 9))?);
    }
    assert_eq!(rig.charged(ATTACKER_ID), 10);
    assert_eq!(rig.counter(reason::CT_BUDGET_UNTRACKED)? - untracked, 20);
    assert_eq!(rig.counter(reason::CT_BUDGET)?, 0);
    // Enforced on ingress, its replies need the entry: dropped over budget.
    rig.on(ATTACKER_ID, EP_INGRESS_ENFORCED)?;
    assert!(!rig.run(DIR_EGRESS, &Packet::udp(ATTACKER, 30000, PEER, 9))?);
    assert_eq!(rig.counter(reason::CT_BUDGET)?, 1);
    Ok(())
}

#[test]
fn ingress_entries_are_charged_to_the_local_sender() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut rig = Rig::new(
        1024,
        CtBudget {
            entries: 10,
            fragments: 0,
        },
    )?;
    // The attacker (a pod of this node) floods the victim: the victim's
    // ingress entries are the attacker's to pay for.
    rig.on(VICTIM_ID, BOTH)?;
    let mut passed = 0;
    for i in 0..30 {
        if rig.run(DIR_INGRESS, &Packet::udp(ATTACKER, 40000 + i, VICTIM, 80))? {
            passed += 1;
        }
    }
    assert_eq!(passed, 10);
    assert_eq!(rig.charged(ATTACKER_ID), 10);
    assert_eq!(rig.charged(VICTIM_ID), 0);
    // So the victim's own new flows are unaffected.
    for i in 0..5 {
        assert!(rig.run(DIR_EGRESS, &Packet::udp(VICTIM, 50000 + i, PEER, 53))?);
    }
    assert_eq!(rig.charged(VICTIM_ID), 5);
    // A sender of another node is charged to the receiving pod.
    for i in 0..3 {
        assert!(rig.run(DIR_INGRESS, &Packet::udp(PEER, 60000 + i, VICTIM, 80))?);
    }
    assert_eq!(rig.charged(VICTIM_ID), 8);
    Ok(())
}

#[test]
fn closed_connections_give_their_charge_back() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut rig = Rig::new(
        1024,
        CtBudget {
            entries: 3,
            fragments: 0,
        },
    )?;
    rig.on(VICTIM_ID, BOTH)?;
    // Many more short connections than the budget, one after another.
    for i in 0..20u16 {
        let port = 33000 + i;
        let syn = Packet::tcp(VICTIM, port, PEER, 443, TCP_FLAG_SYN);
        assert!(rig.run(DIR_EGRESS, &syn)?, "connection {i} refused");
        assert!(rig.run(DIR_INGRESS, &syn.reply(TCP_FLAG_SYN | TCP_FLAG_ACK))?);
        assert!(rig.run(DIR_EGRESS, &syn.clone().with_tcp_flags(TCP_FLAG_ACK))?);
        assert!(rig.run(
            DIR_EGRESS,
            &syn.clone().with_tcp_flags(TCP_FLAG_FIN | TCP_FLAG_ACK)
        )?);
        assert!(rig.run(DIR_INGRESS, &syn.reply(TCP_FLAG_FIN | TCP_FLAG_ACK))?);
    }
    assert_eq!(rig.charged(VICTIM_ID), 0);
    // Open ones hold it.
    for i in 0..3u16 {
        let syn = Packet::tcp(VICTIM, 34000 + i, PEER, 443, TCP_FLAG_SYN);
        assert!(rig.run(DIR_EGRESS, &syn)?);
    }
    assert!(!rig.run(
        DIR_EGRESS,
        &Packet::tcp(VICTIM, 34100, PEER, 443, TCP_FLAG_SYN)
    )?);
    Ok(())
}

#[test]
fn first_fragments_over_the_budget_are_not_recorded() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut rig = Rig::new(
        1024,
        CtBudget {
            entries: 0,
            fragments: 4,
        },
    )?;
    rig.on(ATTACKER_ID, BOTH)?;
    for id in 0..10u16 {
        let first = Packet::udp(ATTACKER, 7000, PEER, 9)
            .with_payload(64)
            .first_fragment(100 + id);
        assert!(rig.run(DIR_EGRESS, &first)?);
    }
    assert_eq!(rig.maps.fragment_entries()?.len(), 4);
    assert_eq!(rig.maps.conntrack_charge(ATTACKER_ID).unwrap().fragments, 4);
    // A later fragment of a recorded datagram passes; of one over the
    // budget it is untracked (dropped where enforced).
    let later = |id| Packet::udp(ATTACKER, 7000, PEER, 9).later_fragment(id, 9, false);
    assert!(rig.run(DIR_EGRESS, &later(100))?);
    assert!(!rig.run(DIR_EGRESS, &later(109))?);
    Ok(())
}

#[test]
fn gc_recounts_charges_and_deletes_a_gone_endpoints_entries() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut rig = Rig::new(4096, CtBudget::default())?;
    rig.on(VICTIM_ID, BOTH)?;
    for i in 0..7 {
        assert!(rig.run(DIR_EGRESS, &Packet::udp(VICTIM, 1000 + i, PEER, 53))?);
    }
    rig.on(ATTACKER_ID, BOTH)?;
    for i in 0..4 {
        assert!(rig.run(DIR_EGRESS, &Packet::udp(ATTACKER, 2000 + i, PEER, 53))?);
    }
    // The charge drifts (evictions, deletions the kernel does not see):
    // the GC sets it to what each endpoint holds.
    let mut gc = ConntrackGc::open(&rig.pins.pins)?.with_budget(CtBudget {
        entries: 7,
        fragments: 0,
    });
    let k = udp_key(VICTIM, 1000, PEER, 53, DIR_EGRESS, VICTIM_ID);
    assert!(rig.maps.conntrack_entry(&k).is_some());
    let pass = gc.pass(ct_clock_ns())?;
    assert_eq!(pass.orphans_removed, 0);
    assert_eq!(rig.charged(VICTIM_ID), 7);
    assert_eq!(rig.charged(ATTACKER_ID), 4);
    let ids: Vec<u32> = pass.over_budget.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![VICTIM_ID]);

    // The victim is deregistered (its ifindex entry now belongs to the
    // attacker, and its address is gone): its entries and charge go.
    rig.maps.remove_endpoint(999, be(VICTIM))?;
    let pass = gc.pass(ct_clock_ns())?;
    assert_eq!(pass.orphans_removed, 7);
    assert!(rig.maps.conntrack_entry(&k).is_none());
    assert!(rig.maps.conntrack_charge(VICTIM_ID).is_none());
    assert_eq!(rig.charged(ATTACKER_ID), 4);
    assert_eq!(pass.conntrack_entries, 4);
    Ok(())
}
