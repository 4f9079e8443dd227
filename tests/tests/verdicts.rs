//! Every verdict path of the real tc programs, through BPF_PROG_TEST_RUN
//! with crafted frames on ifindex 1 (loopback), plus the XDP prefilter.
//! Each run is also checked against the reference evaluator (same action,
//! same event, same counter), so these double as its unit tests.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use aya::programs::{TestRun, TestRunOptions};
use palisade_common::{
    conntrack::{TCP_CLOSE, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_SYN_RECV, TCP_SYN_SENT},
    programs, reason, CtKey, CtKey6, CtValue, EndpointInfo, FlowEvent, FragKey, FragValue,
    IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW, ACTION_DENY, CT_AUDIT, CT_SEEN_REPLY,
    CT_VIA_STACK, DIR_EGRESS, DIR_INGRESS, EP_AUDIT, EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED,
    IDENTITY_ANY, IDENTITY_ANY_POD, IDENTITY_FIRST_CIDR, IDENTITY_HOST, IDENTITY_WORLD,
    IDENTITY_WORLD6, POLICY_PREFIX_FIXED, POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO, PROTO_ICMP,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DROP,
};
use palisade_dataplane::{
    events::EventReader,
    loader::MapSizes,
    maps::{be, ct_clock_ns, ip6_words, monotonic_ns},
    packet::{Packet, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_PSH, TCP_FLAG_RST, TCP_FLAG_SYN},
    reference::{Evaluator, Verdict},
    testrun::{run_tc, TC_ACT_OK, TC_ACT_SHOT},
    Counters, Datapath, DatapathConfig, MapState, Maps,
};
use palisade_tests::{require_root, PinRoot};

/// test_run on ifindex 0/1 runs the program on the loopback device.
const IFINDEX: u32 = 1;
const EP_ID: u32 = 5;
const POD_IDENTITY: u32 = 1005;
const POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
/// A peer pod with its own label identity.
const PEER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);
const PEER_IDENTITY: u32 = 2001;
/// An ipBlock (CIDR identity) that contains PEER.
const BLOCK_IDENTITY: u32 = IDENTITY_FIRST_CIDR + 1;
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 44);
const EXTERNAL_IDENTITY: u32 = IDENTITY_FIRST_CIDR + 2;
const NODE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

/// The same pod, peer, node and external host over IPv6 (the ipcache and
/// policy semantics are the same: identities are family-blind).
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 5);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 9);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
const EXTERNAL6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 44);

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

struct Rig {
    dp: Datapath,
    maps: Maps,
    events: EventReader,
    state: MapState,
    ev: Evaluator,
    // Dropped last: the pins go after the programs and maps are closed.
    _pins: PinRoot,
}

/// What one run of a program did.
#[derive(Debug)]
struct Seen {
    action: u32,
    events: Vec<FlowEvent>,
    counters: Counters,
    /// The reference evaluator's verdict (already checked against the kernel).
    model: Verdict,
}

impl Seen {
    fn pass(&self) -> bool {
        self.action == TC_ACT_OK
    }

    fn event(&self) -> FlowEvent {
        assert_eq!(
            self.events.len(),
            1,
            "expected exactly one event, got {:?}",
            self.events
        );
        self.events[0]
    }

    fn no_event(&self) {
        assert!(
            self.events.is_empty(),
            "expected no event, got {:?}",
            self.events
        );
    }

    /// The counters that moved, as (reason, delta).
    fn counted(&self) -> Vec<(u8, u64)> {
        self.counters
            .0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i as u8, *n))
            .collect()
    }

    /// Passed, one event with (verdict, reason, cookie), that reason counted once.
    fn assert_reported(&self, pass: bool, verdict: u8, why: u8, cookie: u32) {
        assert_eq!(self.pass(), pass, "pass? {self:?}");
        let e = self.event();
        assert_eq!(
            (e.verdict, e.reason, e.cookie),
            (verdict, why, cookie),
            "event {e:?}"
        );
        assert_eq!(self.counted(), vec![(why, 1)]);
    }

    /// No event; `why` counted once (or nothing when `None`, and then the
    /// model says why: an unenforced direction, or no endpoint at all).
    fn assert_silent(&self, pass: bool, why: Option<u8>) {
        assert_eq!(self.pass(), pass, "pass? {self:?}");
        self.no_event();
        assert_eq!(
            self.counted(),
            why.map(|w| vec![(w, 1)]).unwrap_or_default()
        );
        let uncounted = if pass {
            reason::UNENFORCED
        } else {
            reason::NONE
        };
        assert_eq!(
            self.model.reason,
            why.unwrap_or(uncounted),
            "model reason {:?}",
            self.model
        );
    }
}

impl Rig {
    fn new() -> Result<Self> {
        let pins = PinRoot::new()?;
        let sizes = MapSizes {
            endpoints: 64,
            ipcache: 1024,
            policy: 1024,
            conntrack: 4096,
            fragments: 256,
            xdp_deny: 64,
            ..Default::default()
        };
        let cfg = DatapathConfig {
            pins: pins.pins.clone(),
            sizes,
            pod_hook: Default::default(),
            local_delivery: Default::default(),
        };
        let mut dp = Datapath::load(&cfg)?;
        let mut maps = dp.take_maps()?;
        // The reference has no conntrack budgets (conntrack_budget.rs).
        maps.set_conntrack_budget(palisade_common::ct_budget::CtBudget::UNLIMITED)?;
        let events = EventReader::new(maps.take_events().expect("events map"));
        let mut rig = Self {
            dp,
            maps,
            events,
            state: MapState::default(),
            ev: Evaluator::default(),
            _pins: pins,
        };
        // The usual ipcache: world, the node, a peer pod inside an ipBlock,
        // an external address in its own ipBlock.
        rig.ipcache(Ipv4Addr::UNSPECIFIED, 0, IDENTITY_WORLD, IDENTITY_WORLD)?;
        rig.ipcache(NODE, 32, IDENTITY_HOST, IDENTITY_WORLD)?;
        rig.ipcache(
            Ipv4Addr::new(10, 1, 0, 0),
            24,
            BLOCK_IDENTITY,
            BLOCK_IDENTITY,
        )?;
        rig.ipcache(PEER, 32, PEER_IDENTITY, BLOCK_IDENTITY)?;
        rig.ipcache(POD, 32, POD_IDENTITY, BLOCK_IDENTITY)?;
        rig.ipcache(
            Ipv4Addr::new(192, 0, 2, 0),
            24,
            EXTERNAL_IDENTITY,
            EXTERNAL_IDENTITY,
        )?;
        rig.ipcache6(Ipv6Addr::UNSPECIFIED, 0, IDENTITY_WORLD6, IDENTITY_WORLD6)?;
        rig.ipcache6(NODE6, 128, IDENTITY_HOST, IDENTITY_WORLD6)?;
        let block6 = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0);
        rig.ipcache6(block6, 64, BLOCK_IDENTITY, BLOCK_IDENTITY)?;
        rig.ipcache6(PEER6, 128, PEER_IDENTITY, BLOCK_IDENTITY)?;
        rig.ipcache6(POD6, 128, POD_IDENTITY, BLOCK_IDENTITY)?;
        let external6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0);
        rig.ipcache6(external6, 64, EXTERNAL_IDENTITY, EXTERNAL_IDENTITY)?;
        Ok(rig)
    }

    /// The pod on ifindex 1 with `flags`.
    fn endpoint(&mut self, flags: u32) -> Result<()> {
        self.endpoint_mac(flags, [0; 6])
    }

    /// The pod with `flags` and the MAC the CNI reported (zero: unknown).
    fn endpoint_mac(&mut self, flags: u32, mac: [u8; 6]) -> Result<()> {
        self.endpoint_info(EndpointInfo {
            endpoint_id: EP_ID,
            identity: POD_IDENTITY,
            ipv4: be(POD),
            flags,
            generation: 0,
            mac,
            _pad: [0; 2],
            ipv6: ip6_words(POD6),
        })
    }

    fn endpoint_info(&mut self, info: EndpointInfo) -> Result<()> {
        self.maps.upsert_endpoint(IFINDEX, info)?;
        self.state.endpoints.insert(IFINDEX, info);
        self.ev.set_maps(&self.state);
        Ok(())
    }

    fn ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix: u32,
        identity: u32,
        cidr_identity: u32,
    ) -> Result<()> {
        let v = IpcacheValue {
            identity,
            cidr_identity,
        };
        self.maps.set_ipcache(addr, prefix, v)?;
        self.state.ipcache.insert((addr, prefix), v);
        self.ev.set_maps(&self.state);
        Ok(())
    }

    fn ipcache6(
        &mut self,
        addr: Ipv6Addr,
        prefix: u32,
        identity: u32,
        cidr_identity: u32,
    ) -> Result<()> {
        let v = IpcacheValue {
            identity,
            cidr_identity,
        };
        self.maps.set_ipcache6(addr, prefix, v)?;
        self.state.ipcache6.insert((addr, prefix), v);
        self.ev.set_maps(&self.state);
        Ok(())
    }

    /// The IPv6 conntrack entry `k`, the kernel's and the model's alike.
    fn ct6(&self, k: &CtKey6) -> Option<CtValue> {
        let kernel = self.maps.conntrack6_entry(k);
        let model = self.ev.conntrack6().get(k).copied();
        assert_eq!(
            kernel.map(|v| (v.tcp_state, v.flags, v.cookie)),
            model.map(|v| (v.tcp_state, v.flags, v.cookie))
        );
        kernel
    }

    #[allow(clippy::too_many_arguments)]
    fn policy(
        &mut self,
        prefix: u32,
        peer: u32,
        dir: u8,
        protocol: u8,
        port: u16,
        action: u32,
        cookie: u32,
    ) -> Result<()> {
        let k = PolicyKey {
            endpoint_id: EP_ID,
            peer_identity: peer,
            direction: dir,
            protocol,
            dport_be: port.to_be(),
        };
        let v = PolicyValue { action, cookie };
        self.maps.set_policy(prefix, k, v)?;
        self.state.policy.insert((prefix, k), v);
        self.ev.set_maps(&self.state);
        Ok(())
    }

    fn unpolicy(&mut self, prefix: u32, peer: u32, dir: u8, protocol: u8, port: u16) -> Result<()> {
        let k = PolicyKey {
            endpoint_id: EP_ID,
            peer_identity: peer,
            direction: dir,
            protocol,
            dport_be: port.to_be(),
        };
        self.maps.remove_policy(prefix, k)?;
        self.state.policy.remove(&(prefix, k));
        self.ev.set_maps(&self.state);
        Ok(())
    }

    fn insert_ct(&mut self, k: CtKey, v: CtValue) -> Result<()> {
        self.maps.insert_conntrack(k, v)?;
        self.ev.conntrack_mut().insert(k, v);
        Ok(())
    }

    fn ct(&self, k: &CtKey) -> Option<CtValue> {
        let kernel = self.maps.conntrack_entry(k);
        let model = self.ev.conntrack().get(k).copied();
        assert_eq!(
            kernel.map(|v| (v.tcp_state, v.flags, v.cookie)),
            model.map(|v| (v.tcp_state, v.flags, v.cookie))
        );
        kernel
    }

    /// Run `p` through the program of `dir`; check the model agrees.
    fn run(&mut self, dir: u8, p: &Packet) -> Result<Seen> {
        let name = if dir == DIR_EGRESS {
            programs::POD_EGRESS
        } else {
            programs::POD_INGRESS
        };
        let before = self.maps.counters()?;
        let now = ct_clock_ns();
        let r = run_tc(self.dp.classifier(name)?, &p.bytes(), IFINDEX, 1)
            .map_err(|e| anyhow::anyhow!("test_run of {p} ({} bytes): {e:?}", p.bytes().len()))?;
        let events = self.events.drain();
        let after = self.maps.counters()?;
        let counters = Counters(after.0.iter().zip(&before.0).map(|(a, b)| a - b).collect());
        let model = self.ev.evaluate_at(now, IFINDEX, dir, p);

        let what = format!(
            "{p} at {}",
            if dir == DIR_EGRESS {
                "egress"
            } else {
                "ingress"
            }
        );
        assert_eq!(
            r.action,
            model.tc_action(),
            "{what}: kernel vs model action ({model:?})"
        );
        let stripped: Vec<FlowEvent> = events
            .iter()
            .map(|e| FlowEvent { ts_ns: 0, ..*e })
            .collect();
        assert_eq!(
            stripped,
            model.event.into_iter().collect::<Vec<_>>(),
            "{what}: kernel vs model event"
        );
        let want: Vec<(u8, u64)> = model.counter.map(|r| vec![(r, 1)]).unwrap_or_default();
        let got: Vec<(u8, u64)> = counters
            .0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i as u8, *n))
            .collect();
        assert_eq!(got, want, "{what}: kernel vs model counters");
        Ok(Seen {
            action: r.action,
            events,
            counters,
            model,
        })
    }
}

/// Skips (returns Ok) when not root.
macro_rules! rig {
    () => {{
        if !require_root() {
            return Ok(());
        }
        Rig::new()?
    }};
}

fn tcp_in(sport: u16, dport: u16, flags: u8) -> Packet {
    Packet::tcp(PEER, sport, POD, dport, flags)
}

fn tcp_out(dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Packet {
    Packet::tcp(POD, sport, dst, dport, flags)
}

fn ct_key(p: &Packet, scope: u8) -> CtKey {
    let ip = p.ipv4().expect("ipv4");
    let (sport, dport) = ip.l4.ports().unwrap_or((0, 0));
    CtKey {
        saddr: be(ip.src),
        daddr: be(ip.dst),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        protocol: ip.l4.protocol(),
        scope,
        _pad: 0,
        endpoint_id: EP_ID,
    }
}

#[test]
fn unknown_endpoint_fails_closed() -> Result<()> {
    let mut rig = rig!();
    for dir in [DIR_EGRESS, DIR_INGRESS] {
        let s = rig.run(dir, &tcp_out(PEER, 40000, 80, TCP_FLAG_SYN))?;
        assert_eq!(s.action, TC_ACT_SHOT);
        s.assert_silent(false, None);
    }
    // Even ARP: the endpoint lookup comes first.
    let s = rig.run(DIR_INGRESS, &Packet::arp_request(PEER, POD))?;
    s.assert_silent(false, None);
    Ok(())
}

/// The programs take an interface's endpoint from its `ENDPOINT_SLOTS`
/// slot only when the slot is its own and whole; else from `ENDPOINTS`.
/// (The slot is made to disagree with the hash here, so the runs go
/// around the model, which knows only the hash.)
#[test]
fn endpoint_slots_are_read_only_when_whole_and_own() -> Result<()> {
    let mut rig = rig!();
    // The hash: enforced, nothing allowed.
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    let slot = rig.maps.endpoint_slot(IFINDEX)?;
    if cfg!(target_arch = "x86_64") {
        assert_eq!((slot.seq & 1, slot.ifindex), (0, IFINDEX), "{slot:?}");
        assert_eq!(slot.info, rig.maps.endpoint(IFINDEX).unwrap());
    }
    // A new tuple each time: an admitted SYN leaves a conntrack entry.
    let mut sport = 40000;
    let mut action = |rig: &mut Rig| -> Result<u32> {
        sport += 1;
        let syn = tcp_in(sport, 80, TCP_FLAG_SYN).bytes();
        let prog = rig.dp.classifier(programs::POD_INGRESS)?;
        Ok(run_tc(prog, &syn, IFINDEX, 1)?.action)
    };
    assert_eq!(action(&mut rig)?, TC_ACT_SHOT);
    // A whole slot of its own that says "unenforced" is what counts.
    let open = palisade_common::EndpointSlot {
        seq: 2,
        ifindex: IFINDEX,
        info: EndpointInfo {
            flags: 0,
            ..rig.maps.endpoint(IFINDEX).unwrap()
        },
    };
    rig.maps.write_endpoint_slot(IFINDEX, open)?;
    assert_eq!(action(&mut rig)?, TC_ACT_OK);
    // Mid-write (odd seq), or another interface's: the hash decides.
    rig.maps
        .write_endpoint_slot(IFINDEX, palisade_common::EndpointSlot { seq: 3, ..open })?;
    assert_eq!(action(&mut rig)?, TC_ACT_SHOT);
    let other = IFINDEX + palisade_common::sizes::ENDPOINT_SLOTS;
    rig.maps.write_endpoint_slot(
        IFINDEX,
        palisade_common::EndpointSlot {
            ifindex: other,
            ..open
        },
    )?;
    assert_eq!(action(&mut rig)?, TC_ACT_SHOT);
    // Back to its own whole slot, then deregistered: the slot is emptied
    // first, and nothing is left to pass the interface's packets.
    rig.maps.write_endpoint_slot(IFINDEX, open)?;
    assert_eq!(action(&mut rig)?, TC_ACT_OK);
    rig.maps.remove_endpoint(IFINDEX, be(POD))?;
    assert_eq!(rig.maps.endpoint_slot(IFINDEX)?.ifindex, 0);
    assert_eq!(action(&mut rig)?, TC_ACT_SHOT);
    Ok(())
}

#[test]
fn frames_from_a_pod_carry_its_mac_and_its_arp_speaks_only_for_it() -> Result<()> {
    const MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x05];
    const OTHER: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x07];
    const GW: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x01];
    const BCAST: [u8; 6] = [0xff; 6];
    let mut rig = rig!();
    // Unenforced both ways: the MAC checks hold anyway.
    rig.endpoint_mac(0, MAC)?;
    let out = tcp_out(EXTERNAL, 40000, 443, TCP_FLAG_SYN);
    rig.run(DIR_EGRESS, &out.clone().with_macs(MAC, GW))?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    rig.run(DIR_EGRESS, &out.clone().with_macs(OTHER, GW))?
        .assert_reported(false, VERDICT_DROP, reason::SPOOFED_MAC, 0);
    // ARP and IPv6 frames too.
    rig.run(
        DIR_EGRESS,
        &Packet::arp_request(POD, NODE).with_macs(OTHER, BCAST),
    )?
    .assert_reported(false, VERDICT_DROP, reason::SPOOFED_MAC, 0);
    let ns = Packet::neighbour_solicitation(
        "fe80::5".parse::<Ipv6Addr>()?,
        "fe80::1".parse::<Ipv6Addr>()?,
    );
    rig.run(DIR_EGRESS, &ns.with_macs(OTHER, BCAST))?
        .assert_reported(false, VERDICT_DROP, reason::SPOOFED_MAC, 0);
    // An ARP reply claiming another pod's address, from the pod's own MAC.
    rig.run(
        DIR_EGRESS,
        &Packet::arp_reply(PEER, NODE).with_macs(MAC, GW),
    )?
    .assert_reported(false, VERDICT_DROP, reason::SPOOFED_MAC, 0);
    // Its own address, and an RFC 5227 probe, pass.
    rig.run(
        DIR_EGRESS,
        &Packet::arp_request(POD, NODE).with_macs(MAC, BCAST),
    )?
    .assert_silent(true, Some(reason::NOT_IP));
    rig.run(
        DIR_EGRESS,
        &Packet::arp_request(Ipv4Addr::UNSPECIFIED, POD).with_macs(MAC, BCAST),
    )?
    .assert_silent(true, Some(reason::NOT_IP));
    // To the pod: its MAC, broadcast or multicast; another unicast MAC is
    // not its traffic.
    rig.run(
        DIR_INGRESS,
        &Packet::udp(PEER, 5353, POD, 53).with_macs(GW, OTHER),
    )?
    .assert_reported(false, VERDICT_DROP, reason::NOT_OWN_DESTINATION, 0);
    rig.run(
        DIR_INGRESS,
        &Packet::udp(PEER, 5353, POD, 53).with_macs(GW, MAC),
    )?
    .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    rig.run(
        DIR_INGRESS,
        &Packet::arp_request(NODE, POD).with_macs(GW, BCAST),
    )?
    .assert_silent(true, Some(reason::NOT_IP));
    // A MAC the CNI did not report is not checked.
    rig.endpoint(0)?;
    rig.run(DIR_EGRESS, &out.clone().with_macs(OTHER, GW))?
        .assert_silent(true, Some(reason::ESTABLISHED));
    Ok(())
}

#[test]
fn host_protection_opens_only_the_listed_node_ports() -> Result<()> {
    let mut rig = rig!();
    // The node lists DNS (UDP 53) and all of ICMP (the agent writes these
    // as entries of HOST_PORTS_ENDPOINT).
    let host_port = |rig: &mut Rig, prefix, protocol, port: u16| {
        let k = PolicyKey {
            endpoint_id: palisade_common::HOST_PORTS_ENDPOINT,
            peer_identity: IDENTITY_HOST,
            direction: DIR_EGRESS,
            protocol,
            dport_be: port.to_be(),
        };
        let v = PolicyValue {
            action: ACTION_ALLOW,
            cookie: 0,
        };
        rig.maps.set_policy(prefix, k, v)?;
        rig.state.policy.insert((prefix, k), v);
        rig.ev.set_maps(&rig.state);
        anyhow::Ok(())
    };
    host_port(&mut rig, POLICY_PREFIX_FULL, PROTO_UDP, 53)?;
    host_port(&mut rig, POLICY_PREFIX_PROTO, PROTO_ICMP, 0)?;
    // Unenforced, and egress allowed to anything: host protection holds
    // over both.
    rig.endpoint(palisade_common::EP_HOST_PROTECTED)?;
    rig.run(DIR_EGRESS, &Packet::udp(POD, 40000, NODE, 53))?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    rig.run(DIR_EGRESS, &Packet::icmp_echo(POD, NODE, 9, 1))?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    rig.run(DIR_EGRESS, &tcp_out(NODE, 40001, 22, TCP_FLAG_SYN))?
        .assert_reported(false, VERDICT_DROP, reason::HOST_PROTECTED, 0);
    rig.run(DIR_EGRESS, &Packet::udp(POD, 40002, NODE, 54))?
        .assert_reported(false, VERDICT_DROP, reason::HOST_PROTECTED, 0);
    // Other peers are not the node's business.
    rig.run(DIR_EGRESS, &tcp_out(EXTERNAL, 40003, 22, TCP_FLAG_SYN))?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    // The node's own connections (a kubelet probe) get their replies.
    rig.endpoint(palisade_common::EP_HOST_PROTECTED | EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    let probe = Packet::tcp(NODE, 51000, POD, 8080, TCP_FLAG_SYN);
    rig.run(DIR_INGRESS, &probe)?
        .assert_reported(true, VERDICT_ALLOW, reason::HOST, 0);
    rig.run(DIR_EGRESS, &probe.reply(TCP_FLAG_SYN | TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::REPLY));
    // Enforced, NetworkPolicy's "traffic with the own node passes" holds
    // only on the listed ports.
    rig.run(DIR_EGRESS, &Packet::udp(POD, 40004, NODE, 53))?
        .assert_reported(true, VERDICT_ALLOW, reason::HOST, 0);
    rig.run(DIR_EGRESS, &tcp_out(NODE, 40005, 10250, TCP_FLAG_SYN))?
        .assert_reported(false, VERDICT_DROP, reason::HOST_PROTECTED, 0);
    // Off: the node's traffic passes on any port.
    rig.endpoint(EP_EGRESS_ENFORCED)?;
    rig.run(DIR_EGRESS, &tcp_out(NODE, 40006, 10250, TCP_FLAG_SYN))?
        .assert_reported(true, VERDICT_ALLOW, reason::HOST, 0);
    Ok(())
}

#[test]
fn pods_never_reach_a_nodes_tunnel_port() -> Result<()> {
    let mut rig = rig!();
    // Unenforced, and its node's traffic would pass anyway when enforced:
    // a tunnel packet is neither.
    rig.endpoint(0)?;
    let other_node = Ipv4Addr::new(10, 2, 0, 1);
    rig.ipcache(
        other_node,
        32,
        palisade_common::IDENTITY_REMOTE_NODE,
        IDENTITY_WORLD,
    )?;
    for (to, port) in [(NODE, 8472), (NODE, 4789), (other_node, 6081)] {
        let s = rig.run(DIR_EGRESS, &Packet::udp(POD, 40000, to, port))?;
        s.assert_reported(false, VERDICT_DROP, reason::TUNNEL_FROM_POD, 0);
    }
    // Other UDP to the node, and the tunnel port of an address that is no
    // node's, are not tunnel traffic.
    rig.run(DIR_EGRESS, &Packet::udp(POD, 40001, NODE, 53))?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    rig.run(DIR_EGRESS, &Packet::udp(POD, 40002, EXTERNAL, 8472))?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    // Enforced egress with the node allowed: still dropped.
    rig.endpoint(EP_EGRESS_ENFORCED)?;
    rig.run(DIR_EGRESS, &Packet::udp(POD, 40003, NODE, 8472))?
        .assert_reported(false, VERDICT_DROP, reason::TUNNEL_FROM_POD, 0);
    Ok(())
}

#[test]
fn unenforced_passes_and_reports_the_new_flow() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(0)?;
    let syn = tcp_out(EXTERNAL, 40000, 443, TCP_FLAG_SYN);
    let s = rig.run(DIR_EGRESS, &syn)?;
    s.assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    let e = s.event();
    assert_eq!(
        e,
        FlowEvent {
            ts_ns: e.ts_ns,
            endpoint_id: EP_ID,
            ifindex: IFINDEX,
            saddr: be(POD),
            daddr: be(EXTERNAL),
            sport_be: 40000u16.to_be(),
            dport_be: 443u16.to_be(),
            protocol: PROTO_TCP,
            direction: DIR_EGRESS,
            verdict: VERDICT_ALLOW,
            reason: reason::UNENFORCED,
            src_identity: POD_IDENTITY,
            dst_identity: EXTERNAL_IDENTITY,
            cookie: 0,
            service_id: 0,
            suppressed_drops: 0,
            suppressed_flows: 0,
            suppressed_reasons: 0,
            family: 4,
            _pad: 0,
            saddr6: [0; 4],
            daddr6: [0; 4],
        }
    );
    assert!(e.ts_ns > 0 && e.ts_ns <= monotonic_ns());
    // The flow is tracked: its next packet is silent.
    rig.run(DIR_EGRESS, &syn.clone().with_tcp_flags(TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::ESTABLISHED));
    // Ingress: identities are (peer, pod).
    let s = rig.run(DIR_INGRESS, &Packet::udp(PEER, 5353, POD, 53))?;
    s.assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    let e = s.event();
    assert_eq!(
        (e.src_identity, e.dst_identity, e.direction),
        (PEER_IDENTITY, POD_IDENTITY, DIR_INGRESS)
    );
    assert_eq!(
        (
            u16::from_be(e.sport_be),
            u16::from_be(e.dport_be),
            e.protocol
        ),
        (5353, 53, PROTO_UDP)
    );
    Ok(())
}

#[test]
fn policy_allows_exact_peer() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        11,
    )?;
    let s = rig.run(DIR_INGRESS, &tcp_in(40000, 80, TCP_FLAG_SYN))?;
    s.assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 11);
    let e = s.event();
    assert_eq!(
        (e.src_identity, e.dst_identity),
        (PEER_IDENTITY, POD_IDENTITY)
    );
    assert_eq!(
        rig.ct(&ct_key(&tcp_in(40000, 80, 0), DIR_INGRESS))
            .map(|v| v.cookie),
        Some(11)
    );
    // Another port, another direction, another protocol: no match.
    rig.run(DIR_INGRESS, &tcp_in(40000, 81, TCP_FLAG_SYN))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    rig.run(DIR_INGRESS, &Packet::udp(PEER, 40000, POD, 80))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    // Another peer in the same block: no match either.
    let other = Ipv4Addr::new(10, 1, 0, 77);
    let s = rig.run(
        DIR_INGRESS,
        &Packet::tcp(other, 40000, POD, 80, TCP_FLAG_SYN),
    )?;
    s.assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    assert_eq!(s.event().src_identity, BLOCK_IDENTITY);
    Ok(())
}

#[test]
fn policy_allows_cidr_identity() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    // ipBlock 10.1.0.0/24 matches the peer pod through its cidr_identity.
    rig.policy(
        POLICY_PREFIX_FULL,
        BLOCK_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        21,
    )?;
    let s = rig.run(DIR_INGRESS, &tcp_in(40000, 80, TCP_FLAG_SYN))?;
    s.assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 21);
    // The event carries the peer's own identity, not the block's.
    assert_eq!(s.event().src_identity, PEER_IDENTITY);
    // An external address whose identity is the CIDR identity itself.
    rig.policy(
        POLICY_PREFIX_PROTO,
        EXTERNAL_IDENTITY,
        DIR_EGRESS,
        PROTO_UDP,
        0,
        ACTION_ALLOW,
        22,
    )?;
    let s = rig.run(DIR_EGRESS, &Packet::udp(POD, 5000, EXTERNAL, 53))?;
    s.assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 22);
    assert_eq!(s.event().dst_identity, EXTERNAL_IDENTITY);
    // Outside the block: world, no rule.
    let s = rig.run(
        DIR_EGRESS,
        &Packet::udp(POD, 5000, Ipv4Addr::new(198, 51, 100, 1), 53),
    )?;
    s.assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    assert_eq!(s.event().dst_identity, IDENTITY_WORLD);
    Ok(())
}

#[test]
fn policy_allows_any_peer() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        IDENTITY_ANY,
        DIR_INGRESS,
        PROTO_TCP,
        8443,
        ACTION_ALLOW,
        31,
    )?;
    for src in [PEER, EXTERNAL, Ipv4Addr::new(203, 0, 113, 1)] {
        let s = rig.run(
            DIR_INGRESS,
            &Packet::tcp(src, 40000, POD, 8443, TCP_FLAG_SYN),
        )?;
        s.assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 31);
    }
    // Another port: no entry.
    let s = rig.run(
        DIR_INGRESS,
        &Packet::tcp(EXTERNAL, 40000, POD, 8444, TCP_FLAG_SYN),
    )?;
    s.assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    Ok(())
}

#[test]
fn port_prefixes_cover_ranges() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    // 8080-8083 = 8080/14 port bits = prefix 94.
    rig.policy(
        94,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        8080,
        ACTION_ALLOW,
        41,
    )?;
    // 0-32767 = prefix 81.
    rig.policy(
        81,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_UDP,
        0,
        ACTION_ALLOW,
        42,
    )?;
    for (port, allowed) in [
        (8079, false),
        (8080, true),
        (8081, true),
        (8083, true),
        (8084, false),
    ] {
        let s = rig.run(DIR_INGRESS, &tcp_in(40000 + port, port, TCP_FLAG_SYN))?;
        if allowed {
            s.assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 41);
        } else {
            s.assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
        }
    }
    for (port, allowed) in [
        (0, true),
        (53, true),
        (32767, true),
        (32768, false),
        (65535, false),
    ] {
        let s = rig.run(DIR_INGRESS, &Packet::udp(PEER, 1000, POD, port))?;
        assert_eq!(s.pass(), allowed, "udp {port}");
        assert_eq!(s.event().cookie, if allowed { 42 } else { 0 });
    }
    Ok(())
}

#[test]
fn all_protocols_and_protocol_only_entries() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    // Prefix 72: every protocol and port from the peer.
    rig.policy(
        POLICY_PREFIX_FIXED,
        PEER_IDENTITY,
        DIR_INGRESS,
        0,
        0,
        ACTION_ALLOW,
        51,
    )?;
    let from_peer = [
        tcp_in(1, 2, TCP_FLAG_SYN),
        Packet::udp(PEER, 1, POD, 2),
        Packet::sctp(PEER, 1, POD, 2),
        Packet::icmp_echo(PEER, POD, 7, 1),
        Packet::ipv4_proto(PEER, POD, 47),
    ];
    for p in &from_peer {
        rig.run(DIR_INGRESS, p)?
            .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 51);
    }
    // Prefix 80: one protocol, every port (ICMP has no port: dport 0).
    rig.policy(
        POLICY_PREFIX_PROTO,
        EXTERNAL_IDENTITY,
        DIR_EGRESS,
        PROTO_SCTP,
        0,
        ACTION_ALLOW,
        52,
    )?;
    rig.policy(
        POLICY_PREFIX_PROTO,
        EXTERNAL_IDENTITY,
        DIR_EGRESS,
        PROTO_ICMP,
        0,
        ACTION_ALLOW,
        53,
    )?;
    for port in [1, 9999, 65535] {
        let s = rig.run(DIR_EGRESS, &Packet::sctp(POD, 7000, EXTERNAL, port))?;
        s.assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 52);
    }
    let s = rig.run(DIR_EGRESS, &Packet::icmp_echo(POD, EXTERNAL, 99, 1))?;
    s.assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 53);
    let s = rig.run(
        DIR_EGRESS,
        &Packet::tcp(POD, 7000, EXTERNAL, 80, TCP_FLAG_SYN),
    )?;
    s.assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    Ok(())
}

#[test]
fn no_match_drops_and_reports_both_identities() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_EGRESS_ENFORCED)?;
    let p = Packet::udp(POD, 5000, PEER, 53);
    let s = rig.run(DIR_EGRESS, &p)?;
    s.assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    let e = s.event();
    assert_eq!(
        (e.src_identity, e.dst_identity),
        (POD_IDENTITY, PEER_IDENTITY)
    );
    assert_eq!(
        (e.saddr, e.daddr, e.direction, e.endpoint_id),
        (be(POD), be(PEER), DIR_EGRESS, EP_ID)
    );
    // A drop leaves no conntrack entry: the next packet is decided (and reported) again.
    assert!(rig.ct(&ct_key(&p, DIR_EGRESS)).is_none());
    rig.run(DIR_EGRESS, &p)?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    Ok(())
}

#[test]
fn deny_rule_drops_with_its_cookie() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_PROTO,
        IDENTITY_ANY,
        DIR_INGRESS,
        PROTO_TCP,
        0,
        ACTION_ALLOW,
        61,
    )?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        22,
        ACTION_DENY,
        62,
    )?;
    rig.run(DIR_INGRESS, &tcp_in(40000, 22, TCP_FLAG_SYN))?
        .assert_reported(false, VERDICT_DROP, reason::DENY_RULE, 62);
    // The deny is for the exact peer and port only.
    rig.run(DIR_INGRESS, &tcp_in(40000, 23, TCP_FLAG_SYN))?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 61);
    rig.run(
        DIR_INGRESS,
        &Packet::tcp(EXTERNAL, 40000, POD, 22, TCP_FLAG_SYN),
    )?
    .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 61);
    // Within one lookup the longest prefix wins, allow or deny.
    rig.policy(
        95,
        IDENTITY_ANY,
        DIR_INGRESS,
        PROTO_TCP,
        8000,
        ACTION_DENY,
        63,
    )?;
    rig.run(
        DIR_INGRESS,
        &Packet::tcp(EXTERNAL, 1, POD, 8001, TCP_FLAG_SYN),
    )?
    .assert_reported(false, VERDICT_DROP, reason::DENY_RULE, 63);
    Ok(())
}

#[test]
fn any_pod_matches_pod_peers_only_after_the_exact_and_cidr_lookups() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    let allow = |rig: &mut Rig, peer, dir, proto, port, action, cookie| {
        rig.policy(POLICY_PREFIX_FULL, peer, dir, proto, port, action, cookie)
    };
    allow(
        &mut rig,
        IDENTITY_ANY_POD,
        DIR_EGRESS,
        PROTO_UDP,
        53,
        ACTION_ALLOW,
        81,
    )?;
    // A pod (label identity): the any-pod entry matches.
    let s = rig.run(DIR_EGRESS, &Packet::udp(POD, 5000, PEER, 53))?;
    s.assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 81);
    assert_eq!(
        s.event().dst_identity,
        PEER_IDENTITY,
        "the real peer is reported"
    );
    // An address in an ipBlock (CIDR identity), an external one, the world
    // and a no-pod address inside the pod's block: no pods.
    for (dst, id) in [
        (EXTERNAL, EXTERNAL_IDENTITY),
        (Ipv4Addr::new(8, 8, 8, 8), IDENTITY_WORLD),
        (Ipv4Addr::new(10, 1, 0, 77), BLOCK_IDENTITY),
    ] {
        let s = rig.run(DIR_EGRESS, &Packet::udp(POD, 5000, dst, 53))?;
        s.assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
        assert_eq!(s.event().dst_identity, id);
    }
    // The node: host, before any lookup.
    rig.run(DIR_EGRESS, &Packet::udp(POD, 5000, NODE, 53))?
        .assert_reported(true, VERDICT_ALLOW, reason::HOST, 0);

    // Order: exact peer, then its CIDR identity, then any pod, then any.
    allow(
        &mut rig,
        PEER_IDENTITY,
        DIR_EGRESS,
        PROTO_UDP,
        54,
        ACTION_ALLOW,
        82,
    )?;
    allow(
        &mut rig,
        IDENTITY_ANY_POD,
        DIR_EGRESS,
        PROTO_UDP,
        54,
        ACTION_DENY,
        83,
    )?;
    rig.run(DIR_EGRESS, &Packet::udp(POD, 5000, PEER, 54))?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 82);
    allow(
        &mut rig,
        BLOCK_IDENTITY,
        DIR_EGRESS,
        PROTO_UDP,
        55,
        ACTION_ALLOW,
        84,
    )?;
    allow(
        &mut rig,
        IDENTITY_ANY_POD,
        DIR_EGRESS,
        PROTO_UDP,
        55,
        ACTION_DENY,
        85,
    )?;
    rig.run(DIR_EGRESS, &Packet::udp(POD, 5000, PEER, 55))?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 84);
    allow(
        &mut rig,
        IDENTITY_ANY_POD,
        DIR_EGRESS,
        PROTO_UDP,
        56,
        ACTION_DENY,
        86,
    )?;
    allow(
        &mut rig,
        IDENTITY_ANY,
        DIR_EGRESS,
        PROTO_UDP,
        56,
        ACTION_ALLOW,
        87,
    )?;
    rig.run(DIR_EGRESS, &Packet::udp(POD, 5000, PEER, 56))?
        .assert_reported(false, VERDICT_DROP, reason::DENY_RULE, 86);
    // Not a pod: straight from the CIDR lookup to any.
    rig.run(DIR_EGRESS, &Packet::udp(POD, 5000, EXTERNAL, 56))?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 87);

    // Ingress from any pod, likewise.
    allow(
        &mut rig,
        IDENTITY_ANY_POD,
        DIR_INGRESS,
        PROTO_TCP,
        8080,
        ACTION_ALLOW,
        88,
    )?;
    let s = rig.run(DIR_INGRESS, &tcp_in(40000, 8080, TCP_FLAG_SYN))?;
    s.assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 88);
    assert_eq!(s.event().src_identity, PEER_IDENTITY);
    rig.run(
        DIR_INGRESS,
        &Packet::tcp(EXTERNAL, 40000, POD, 8080, TCP_FLAG_SYN),
    )?
    .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    rig.run(DIR_INGRESS, &tcp_in(40000, 8081, TCP_FLAG_SYN))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    Ok(())
}

#[test]
fn host_identity_is_always_allowed() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FIXED,
        IDENTITY_HOST,
        DIR_INGRESS,
        0,
        0,
        ACTION_DENY,
        71,
    )?;
    let s = rig.run(
        DIR_INGRESS,
        &Packet::tcp(NODE, 40000, POD, 8080, TCP_FLAG_SYN),
    )?;
    s.assert_reported(true, VERDICT_ALLOW, reason::HOST, 0);
    assert_eq!(s.event().src_identity, IDENTITY_HOST);
    let s = rig.run(DIR_EGRESS, &Packet::udp(POD, 5000, NODE, 53))?;
    s.assert_reported(true, VERDICT_ALLOW, reason::HOST, 0);
    assert_eq!(s.event().dst_identity, IDENTITY_HOST);
    Ok(())
}

#[test]
fn conntrack_established_and_replies_cross_directions() -> Result<()> {
    let mut rig = rig!();
    // Both directions enforced, only egress to PEER:80 allowed.
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_EGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        81,
    )?;
    let syn = tcp_out(PEER, 41000, 80, TCP_FLAG_SYN);
    let fwd = ct_key(&syn, DIR_EGRESS);

    rig.run(DIR_EGRESS, &syn)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 81);
    assert_eq!(
        rig.ct(&fwd).map(|v| (v.tcp_state, v.flags)),
        Some((TCP_SYN_SENT, 0))
    );
    // The SYN-ACK comes in at ingress, where nothing allows it as a new flow.
    rig.run(DIR_INGRESS, &syn.reply(TCP_FLAG_SYN | TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::REPLY));
    assert_eq!(
        rig.ct(&fwd).map(|v| (v.tcp_state, v.flags)),
        Some((TCP_SYN_RECV, CT_SEEN_REPLY))
    );
    rig.run(DIR_EGRESS, &syn.clone().with_tcp_flags(TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::ESTABLISHED));
    assert_eq!(rig.ct(&fwd).map(|v| v.tcp_state), Some(TCP_ESTABLISHED));
    rig.run(DIR_INGRESS, &syn.reply(TCP_FLAG_PSH | TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::REPLY));
    // The reply entry is the egress one: no ingress entry was created.
    assert!(rig.ct(&ct_key(&syn.reply(0), DIR_INGRESS)).is_none());

    // The scope matters: the same tuple at ingress is not admitted by the
    // egress entry (it is not even addressed to the pod: refused first).
    let s = rig.run(DIR_INGRESS, &syn.clone().with_tcp_flags(TCP_FLAG_ACK))?;
    s.assert_reported(false, VERDICT_DROP, reason::NOT_OWN_DESTINATION, 0);
    // UDP and ICMP echo replies work the same way.
    let q = Packet::udp(POD, 5353, PEER, 80);
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_EGRESS,
        PROTO_UDP,
        80,
        ACTION_ALLOW,
        82,
    )?;
    rig.run(DIR_EGRESS, &q)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 82);
    rig.run(DIR_INGRESS, &q.reply(0))?
        .assert_silent(true, Some(reason::REPLY));
    // Another source port is another flow.
    let s = rig.run(DIR_INGRESS, &Packet::udp(PEER, 80, POD, 5354))?;
    s.assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    rig.policy(
        POLICY_PREFIX_PROTO,
        PEER_IDENTITY,
        DIR_EGRESS,
        PROTO_ICMP,
        0,
        ACTION_ALLOW,
        83,
    )?;
    let ping = Packet::icmp_echo(POD, PEER, 4242, 1);
    rig.run(DIR_EGRESS, &ping)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 83);
    rig.run(DIR_INGRESS, &ping.reply(0))?
        .assert_silent(true, Some(reason::REPLY));
    rig.run(DIR_INGRESS, &Packet::icmp_echo_reply(PEER, POD, 4243, 1))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    Ok(())
}

#[test]
fn syn_on_a_closed_entry_rechecks_policy() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        91,
    )?;
    let syn = tcp_in(42000, 80, TCP_FLAG_SYN);
    let k = ct_key(&syn, DIR_INGRESS);
    rig.run(DIR_INGRESS, &syn)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 91);
    rig.run(DIR_EGRESS, &syn.reply(TCP_FLAG_SYN | TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::REPLY));
    rig.run(DIR_INGRESS, &syn.clone().with_tcp_flags(TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::ESTABLISHED));
    rig.run(
        DIR_INGRESS,
        &syn.clone().with_tcp_flags(TCP_FLAG_FIN | TCP_FLAG_ACK),
    )?
    .assert_silent(true, Some(reason::ESTABLISHED));
    assert_eq!(rig.ct(&k).map(|v| v.tcp_state), Some(TCP_FIN_WAIT));
    rig.run(DIR_EGRESS, &syn.reply(TCP_FLAG_RST))?
        .assert_silent(true, Some(reason::REPLY));
    assert_eq!(
        rig.ct(&k).map(|v| (v.tcp_state, v.flags & CT_SEEN_REPLY)),
        Some((TCP_CLOSE, CT_SEEN_REPLY))
    );

    // A new SYN on the closed tuple is a new connection: policy again. Its
    // entry takes the closed one's place whole (written over in place):
    // nothing of the old connection, such as its reply seen, stays.
    rig.run(DIR_INGRESS, &syn)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 91);
    assert_eq!(
        rig.ct(&k).map(|v| (v.tcp_state, v.flags, v.cookie)),
        Some((TCP_SYN_SENT, CT_VIA_STACK, 91))
    );
    rig.run(DIR_INGRESS, &syn.clone().with_tcp_flags(TCP_FLAG_RST))?
        .assert_silent(true, Some(reason::ESTABLISHED));
    // With the rule gone the reopen is dropped, not carried by the old entry.
    rig.unpolicy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
    )?;
    rig.run(DIR_INGRESS, &syn)?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    // A retransmitted SYN on a live handshake is not a reopen.
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        81,
        ACTION_ALLOW,
        92,
    )?;
    let syn81 = tcp_in(42000, 81, TCP_FLAG_SYN);
    rig.run(DIR_INGRESS, &syn81)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 92);
    rig.unpolicy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        81,
    )?;
    rig.run(DIR_INGRESS, &syn81)?
        .assert_silent(true, Some(reason::ESTABLISHED));
    Ok(())
}

#[test]
fn expired_entries_are_ignored() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    let now = ct_clock_ns();
    let p = tcp_in(43000, 80, TCP_FLAG_ACK);
    let ct = |expires_ns| CtValue {
        expires_ns,
        cookie: 5,
        tcp_state: TCP_ESTABLISHED,
        flags: 0,
        generation: 0,
        ..CtValue::default()
    };
    rig.insert_ct(ct_key(&p, DIR_INGRESS), ct(now - 1))?;
    rig.run(DIR_INGRESS, &p)?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    rig.insert_ct(ct_key(&p, DIR_INGRESS), ct(now + 60_000_000_000))?;
    rig.run(DIR_INGRESS, &p)?
        .assert_silent(true, Some(reason::ESTABLISHED));
    // An expired egress entry lets no reply in.
    let q = tcp_in(43001, 80, TCP_FLAG_ACK);
    rig.insert_ct(ct_key(&q.reply(0), DIR_EGRESS), ct(now - 1))?;
    rig.run(DIR_INGRESS, &q)?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    rig.insert_ct(ct_key(&q.reply(0), DIR_EGRESS), ct(now + 60_000_000_000))?;
    rig.run(DIR_INGRESS, &q)?
        .assert_silent(true, Some(reason::REPLY));
    // An expired fragment entry: the later fragment is untracked.
    let frag = Packet::udp(PEER, 1, POD, 2).later_fragment(77, 10, false);
    let fk = FragKey {
        saddr: be(PEER),
        daddr: be(POD),
        id_be: 77u16.to_be(),
        protocol: PROTO_UDP,
        scope: DIR_INGRESS,
        endpoint_id: EP_ID,
    };
    let fv = FragValue {
        expires_ns: now - 1,
        verdict: VERDICT_ALLOW as u32,
        _pad: 0,
    };
    rig.maps.insert_fragment(fk, fv)?;
    rig.ev.fragments_mut().insert(fk, fv);
    rig.run(DIR_INGRESS, &frag)?
        .assert_reported(false, VERDICT_DROP, reason::FRAG_UNTRACKED, 0);
    Ok(())
}

#[test]
fn spoofed_sources_are_dropped_even_unenforced_and_in_audit() -> Result<()> {
    let mut rig = rig!();
    for flags in [0, EP_EGRESS_ENFORCED, EP_AUDIT | EP_EGRESS_ENFORCED] {
        rig.endpoint(flags)?;
        let s = rig.run(DIR_EGRESS, &Packet::udp(PEER, 5000, EXTERNAL, 53))?;
        s.assert_reported(false, VERDICT_DROP, reason::SPOOFED_SOURCE, 0);
        let e = s.event();
        assert_eq!(
            (e.saddr, e.daddr, e.protocol),
            (be(PEER), be(EXTERNAL), PROTO_UDP)
        );
        assert_eq!((e.sport_be, e.dport_be), (0, 0));
        assert_eq!((e.src_identity, e.dst_identity), (POD_IDENTITY, 0));
        // Later fragments are checked too.
        let f = Packet::udp(PEER, 5000, EXTERNAL, 53).later_fragment(3, 100, false);
        rig.run(DIR_EGRESS, &f)?
            .assert_reported(false, VERDICT_DROP, reason::SPOOFED_SOURCE, 0);
        // So are malformed headers: the source check comes before the
        // header check, whose drop an unenforced pod would skip.
        let tcp = Packet::tcp(PEER, 5000, EXTERNAL, 80, TCP_FLAG_SYN);
        for bad in [
            tcp.clone().with_ihl(4),
            tcp.clone().with_ip_version(6),
            tcp.clone().with_tot_len(19),
            tcp.clone().with_ihl(15).with_tot_len(80),
        ] {
            rig.run(DIR_EGRESS, &bad)?.assert_reported(
                false,
                VERDICT_DROP,
                reason::SPOOFED_SOURCE,
                0,
            );
        }
    }
    // A frame too short to hold an IPv4 source never leaves a pod (the
    // kernel's test run refuses such frames: the model's alone).
    for flags in [0, EP_AUDIT | EP_EGRESS_ENFORCED] {
        rig.endpoint(flags)?;
        let short = Packet::udp(POD, 5000, EXTERNAL, 53).truncated(14 + 10);
        let v = rig.ev.evaluate(IFINDEX, DIR_EGRESS, &short);
        assert_eq!(
            (v.pass, v.reason, v.counter),
            (false, reason::MALFORMED, Some(reason::MALFORMED))
        );
    }
    // Ingress has no source check: a packet to the pod from anywhere is decided by policy.
    rig.endpoint(0)?;
    let s = rig.run(DIR_INGRESS, &Packet::udp(PEER, 5000, POD, 53))?;
    assert!(s.pass());
    Ok(())
}

#[test]
fn later_fragments_inherit_the_first_fragment_verdict() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_UDP,
        53,
        ACTION_ALLOW,
        101,
    )?;
    // Allowed datagram.
    let first = Packet::udp(PEER, 5000, POD, 53)
        .with_payload(1400)
        .first_fragment(500);
    rig.run(DIR_INGRESS, &first)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 101);
    let mid = Packet::udp(PEER, 5000, POD, 53).later_fragment(500, 176, true);
    rig.run(DIR_INGRESS, &mid)?
        .assert_silent(true, Some(reason::FRAG_ALLOWED));
    let last = Packet::udp(PEER, 5000, POD, 53).later_fragment(500, 352, false);
    rig.run(DIR_INGRESS, &last)?
        .assert_silent(true, Some(reason::FRAG_ALLOWED));
    // Denied datagram (other port).
    let first = Packet::udp(PEER, 5000, POD, 54)
        .with_payload(1400)
        .first_fragment(501);
    rig.run(DIR_INGRESS, &first)?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    // Every drop is reported, a denied datagram's later fragments too.
    let last = Packet::udp(PEER, 5000, POD, 54).later_fragment(501, 176, false);
    rig.run(DIR_INGRESS, &last)?
        .assert_reported(false, VERDICT_DROP, reason::FRAG_DENIED, 0);
    // The verdict is per datagram id, source, destination and protocol.
    let other_id = Packet::udp(PEER, 5000, POD, 53).later_fragment(502, 176, false);
    rig.run(DIR_INGRESS, &other_id)?.assert_reported(
        false,
        VERDICT_DROP,
        reason::FRAG_UNTRACKED,
        0,
    );
    let other_proto = Packet::tcp(PEER, 5000, POD, 53, 0).later_fragment(500, 176, false);
    rig.run(DIR_INGRESS, &other_proto)?.assert_reported(
        false,
        VERDICT_DROP,
        reason::FRAG_UNTRACKED,
        0,
    );
    // A first fragment of a known flow inherits the conntrack verdict.
    let first = Packet::udp(PEER, 5000, POD, 53)
        .with_payload(1400)
        .first_fragment(503);
    rig.run(DIR_INGRESS, &first)?
        .assert_silent(true, Some(reason::ESTABLISHED));
    let last = Packet::udp(PEER, 5000, POD, 53).later_fragment(503, 176, false);
    rig.run(DIR_INGRESS, &last)?
        .assert_silent(true, Some(reason::FRAG_ALLOWED));
    Ok(())
}

#[test]
fn untracked_later_fragments_drop_when_enforced_pass_when_not() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    let f = Packet::udp(PEER, 5000, POD, 53).later_fragment(9, 185, false);
    let s = rig.run(DIR_INGRESS, &f)?;
    s.assert_reported(false, VERDICT_DROP, reason::FRAG_UNTRACKED, 0);
    let e = s.event();
    assert_eq!(
        (e.saddr, e.daddr, e.protocol, e.sport_be, e.dport_be),
        (be(PEER), be(POD), PROTO_UDP, 0, 0)
    );
    assert_eq!((e.src_identity, e.dst_identity), (0, POD_IDENTITY));
    // Egress is not enforced.
    let g = Packet::udp(POD, 5000, PEER, 53).later_fragment(9, 185, false);
    rig.run(DIR_EGRESS, &g)?.assert_silent(true, None);
    Ok(())
}

/// Issue 15: IPv6 is enforced with IPv4's semantics: the same policy
/// entries (identities are family-blind), conntrack for replies, ipBlocks
/// through CIDR identities, anti-spoofing by address, frames to the pod
/// addressed to it; events carry the IPv6 addresses.
#[test]
fn ipv6_is_enforced_like_ipv4() -> Result<()> {
    let mut rig = rig!();
    let udp_in = Packet::ipv6_udp(PEER6, 5000, POD6, 53);
    let udp_out = Packet::ipv6_udp(POD6, 5000, PEER6, 53);

    rig.endpoint(0)?;
    let s = rig.run(DIR_EGRESS, &udp_out)?;
    s.assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    let e = s.event();
    assert_eq!(
        (e.family, e.saddr6, e.daddr6, e.saddr),
        (6, ip6_words(POD6), ip6_words(PEER6), 0)
    );
    assert_eq!(
        (e.src_identity, e.dst_identity),
        (POD_IDENTITY, PEER_IDENTITY)
    );
    rig.run(DIR_INGRESS, &udp_out.reply(0))?
        .assert_silent(true, Some(reason::REPLY));

    rig.endpoint(EP_INGRESS_ENFORCED)?;
    let s = rig.run(DIR_INGRESS, &udp_in)?;
    s.assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    assert_eq!(s.event().src_identity, PEER_IDENTITY);
    // An IPv4 rule for the peer's identity holds for its IPv6 address.
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_UDP,
        53,
        ACTION_ALLOW,
        61,
    )?;
    rig.run(DIR_INGRESS, &udp_in)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 61);
    let k = CtKey6 {
        saddr: ip6_words(PEER6),
        daddr: ip6_words(POD6),
        sport_be: 5000u16.to_be(),
        dport_be: 53u16.to_be(),
        protocol: PROTO_UDP,
        scope: DIR_INGRESS,
        _pad: 0,
        endpoint_id: EP_ID,
    };
    assert_eq!(rig.ct6(&k).map(|v| v.cookie), Some(61));
    rig.run(DIR_EGRESS, &udp_in.reply(0))?
        .assert_silent(true, Some(reason::REPLY));
    // Another port is not allowed; an ipBlock (CIDR identity) rule is.
    let tcp_in = Packet::ipv6_tcp(PEER6, 40000, POD6, 80, TCP_FLAG_SYN);
    rig.run(DIR_INGRESS, &tcp_in)?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    rig.policy(
        POLICY_PREFIX_FULL,
        BLOCK_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        62,
    )?;
    rig.run(DIR_INGRESS, &tcp_in)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 62);
    // Answered, then reset: a new SYN on the closed tuple is judged again
    // and its entry takes the closed one's place whole (as IPv4's, see
    // `syn_on_a_closed_entry_rechecks_policy`).
    let k = CtKey6 {
        sport_be: 40000u16.to_be(),
        dport_be: 80u16.to_be(),
        protocol: PROTO_TCP,
        ..k
    };
    rig.run(DIR_EGRESS, &tcp_in.reply(TCP_FLAG_SYN | TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::REPLY));
    let rst_in = Packet::ipv6_tcp(PEER6, 40000, POD6, 80, TCP_FLAG_RST);
    rig.run(DIR_INGRESS, &rst_in)?
        .assert_silent(true, Some(reason::ESTABLISHED));
    assert_eq!(
        rig.ct6(&k).map(|v| (v.tcp_state, v.flags & CT_SEEN_REPLY)),
        Some((TCP_CLOSE, CT_SEEN_REPLY))
    );
    rig.run(DIR_INGRESS, &tcp_in)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 62);
    assert_eq!(
        rig.ct6(&k).map(|v| (v.tcp_state, v.flags, v.cookie)),
        Some((TCP_SYN_SENT, CT_VIA_STACK, 62))
    );
    // The world (no ipcache prefix but ::/0) is not the block.
    let ext_in = Packet::ipv6_tcp("2001:db9::1".parse()?, 40000, POD6, 80, TCP_FLAG_SYN);
    let s = rig.run(DIR_INGRESS, &ext_in)?;
    s.assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    assert_eq!(s.event().src_identity, IDENTITY_WORLD6);
    // IPv4's world (`0.0.0.0/0`) does not admit the IPv6 world; `::/0` does.
    rig.policy(
        POLICY_PREFIX_FULL,
        IDENTITY_WORLD,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        63,
    )?;
    rig.run(DIR_INGRESS, &ext_in)?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    rig.policy(
        POLICY_PREFIX_FULL,
        IDENTITY_WORLD6,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        64,
    )?;
    rig.run(DIR_INGRESS, &ext_in)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 64);

    // Anti-spoofing by address, enforced or not; a pod without an IPv6
    // address sends none.
    rig.endpoint(0)?;
    let spoofed = Packet::ipv6_udp(PEER6, 5000, EXTERNAL6, 53);
    rig.run(DIR_EGRESS, &spoofed)?
        .assert_reported(false, VERDICT_DROP, reason::SPOOFED_SOURCE, 0);
    let mut v4_only = *rig.state.endpoints.get(&IFINDEX).expect("endpoint");
    v4_only.ipv6 = [0; 4];
    rig.endpoint_info(v4_only)?;
    rig.run(DIR_EGRESS, &udp_out)?
        .assert_reported(false, VERDICT_DROP, reason::SPOOFED_SOURCE, 0);
    rig.endpoint(0)?;
    // To the pod: its own address, or multicast.
    rig.run(DIR_INGRESS, &Packet::ipv6_udp(PEER6, 5000, EXTERNAL6, 53))?
        .assert_reported(false, VERDICT_DROP, reason::NOT_OWN_DESTINATION, 0);
    rig.run(
        DIR_INGRESS,
        &Packet::ipv6_udp(PEER6, 5000, "ff02::fb".parse()?, 5353),
    )?
    .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    Ok(())
}

/// Issue 15: ICMPv6 echo is tracked (the reply passes), and an ICMPv6
/// error about a tracked flow (packet too big) reaches the pod however its
/// ingress is enforced, as path MTU discovery needs; one about no flow of
/// the pod's is judged as any packet.
#[test]
fn ipv6_echo_is_tracked_and_errors_about_tracked_flows_pass() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_PROTO,
        EXTERNAL_IDENTITY,
        DIR_EGRESS,
        PROTO_TCP,
        0,
        ACTION_ALLOW,
        71,
    )?;
    rig.policy(
        POLICY_PREFIX_PROTO,
        EXTERNAL_IDENTITY,
        DIR_EGRESS,
        58,
        0,
        ACTION_ALLOW,
        72,
    )?;
    let ping = Packet::icmpv6_echo(POD6, EXTERNAL6, 128, 7);
    rig.run(DIR_EGRESS, &ping)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 72);
    rig.run(DIR_INGRESS, &Packet::icmpv6_echo(EXTERNAL6, POD6, 129, 7))?
        .assert_silent(true, Some(reason::REPLY));
    // Another identifier is another flow: no reply of anything.
    rig.run(DIR_INGRESS, &Packet::icmpv6_echo(EXTERNAL6, POD6, 129, 8))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);

    let syn = Packet::ipv6_tcp(POD6, 40000, EXTERNAL6, 443, TCP_FLAG_SYN);
    rig.run(DIR_EGRESS, &syn)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 71);
    let router: Ipv6Addr = "2001:db8::fe".parse()?;
    let big = syn.clone().with_tcp_flags(TCP_FLAG_ACK);
    rig.run(DIR_INGRESS, &Packet::icmpv6_error(router, 2, &big))?
        .assert_silent(true, Some(reason::RELATED));
    // About a flow the pod never opened: dropped by ingress policy.
    let other = Packet::ipv6_tcp(POD6, 40001, EXTERNAL6, 443, TCP_FLAG_ACK);
    rig.run(DIR_INGRESS, &Packet::icmpv6_error(router, 2, &other))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    Ok(())
}

/// Issue 15: an IPv4 ICMP error about a tracked flow (fragmentation
/// needed) reaches the pod however its ingress is enforced: path MTU
/// discovery needs it. One about no flow of the pod's is judged as any
/// packet.
#[test]
fn icmp_errors_about_tracked_flows_pass() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_PROTO,
        EXTERNAL_IDENTITY,
        DIR_EGRESS,
        PROTO_TCP,
        0,
        ACTION_ALLOW,
        91,
    )?;
    let syn = tcp_out(EXTERNAL, 40000, 443, TCP_FLAG_SYN);
    rig.run(DIR_EGRESS, &syn)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 91);
    let router = Ipv4Addr::new(192, 0, 2, 254);
    let seg = syn.clone().with_tcp_flags(TCP_FLAG_ACK);
    rig.run(DIR_INGRESS, &Packet::icmp_error(router, 3, 4, &seg))?
        .assert_silent(true, Some(reason::RELATED));
    let other = tcp_out(EXTERNAL, 40001, 443, TCP_FLAG_ACK);
    rig.run(DIR_INGRESS, &Packet::icmp_error(router, 3, 4, &other))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    // A pod's own error about a flow it accepted (port unreachable for a
    // datagram the peer sent) leaves as related too.
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_UDP,
        53,
        ACTION_ALLOW,
        92,
    )?;
    let dgram = Packet::udp(PEER, 5353, POD, 53);
    rig.run(DIR_INGRESS, &dgram)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 92);
    rig.run(DIR_EGRESS, &Packet::icmp_error(POD, 3, 3, &dgram))?
        .assert_silent(true, Some(reason::RELATED));
    Ok(())
}

/// Issue 15: IPv6 fragments get their first fragment's verdict, as IPv4
/// fragments do; a later fragment without a first one is dropped where
/// enforced.
#[test]
fn ipv6_fragments_inherit_the_first_fragments_verdict() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_UDP,
        53,
        ACTION_ALLOW,
        81,
    )?;
    let allowed = Packet::ipv6_udp(PEER6, 5000, POD6, 53);
    let denied = Packet::ipv6_udp(PEER6, 5000, POD6, 54);
    rig.run(
        DIR_INGRESS,
        &Packet::ipv6_fragment(&allowed, 0, true, 0x1234),
    )?
    .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 81);
    rig.run(
        DIR_INGRESS,
        &Packet::ipv6_fragment(&allowed, 2, false, 0x1234),
    )?
    .assert_silent(true, Some(reason::FRAG_ALLOWED));
    rig.run(DIR_INGRESS, &Packet::ipv6_fragment(&denied, 0, true, 0x99))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    rig.run(DIR_INGRESS, &Packet::ipv6_fragment(&denied, 2, false, 0x99))?
        .assert_reported(false, VERDICT_DROP, reason::FRAG_DENIED, 0);
    rig.run(
        DIR_INGRESS,
        &Packet::ipv6_fragment(&allowed, 2, false, 0x777),
    )?
    .assert_reported(false, VERDICT_DROP, reason::FRAG_UNTRACKED, 0);
    Ok(())
}

/// Issue 15: neighbour discovery and MLD pass only on the link: from the
/// pod's own, link-local or unspecified address to link-local, link-scope
/// multicast or its node's address, with hop limit 255 for ND.
#[test]
fn ipv6_neighbour_discovery_stays_on_the_link() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    let ll: Ipv6Addr = "fe80::5".parse()?;
    for ns in [
        Packet::neighbour_solicitation(POD6, NODE6),
        Packet::neighbour_solicitation(ll, NODE6),
        Packet::neighbour_solicitation(Ipv6Addr::UNSPECIFIED, POD6),
        Packet::icmpv6(POD6, NODE6, 135, 20),
        Packet::icmpv6(ll, "ff02::16".parse()?, 143, 20).with_hop_limit(1),
    ] {
        rig.run(DIR_EGRESS, &ns)?
            .assert_silent(true, Some(reason::NOT_IP));
    }
    for bad in [
        // From another address, beyond the link, or off hop limit 255.
        Packet::icmpv6(POD6, "ff05::2".parse()?, 135, 20),
        Packet::icmpv6(PEER6, "ff02::1".parse()?, 136, 20),
        Packet::icmpv6(POD6, "ff02::1".parse()?, 136, 20).with_hop_limit(64),
    ] {
        rig.run(DIR_EGRESS, &bad)?
            .assert_reported(false, VERDICT_DROP, reason::ND_FORBIDDEN, 0);
    }
    rig.run(DIR_INGRESS, &Packet::icmpv6(NODE6, POD6, 136, 20))?
        .assert_silent(true, Some(reason::NOT_IP));
    rig.run(DIR_INGRESS, &Packet::icmpv6(PEER6, EXTERNAL6, 136, 20))?
        .assert_reported(false, VERDICT_DROP, reason::ND_FORBIDDEN, 0);
    Ok(())
}

/// Issue 17 point 4: a pod is never a router. Router advertisements and
/// redirects from a pod are dropped whether or not it is enforced (on a
/// shared bridge they would reconfigure its neighbours), also behind
/// extension headers; neighbour discovery passes only with hop limit 255;
/// an IPv6 chain from a pod that cannot be followed is dropped.
#[test]
fn pods_never_send_router_advertisements_or_redirects() -> Result<()> {
    use palisade_common::ipv6::{ICMPV6_REDIRECT, ICMPV6_ROUTER_ADVERTISEMENT, IPPROTO_ICMPV6};
    let mut rig = rig!();
    let pod6: Ipv6Addr = "fe80::5".parse()?;
    let all_nodes: Ipv6Addr = "ff02::1".parse()?;
    let ra = Packet::icmpv6(pod6, all_nodes, ICMPV6_ROUTER_ADVERTISEMENT, 12);
    let redirect = Packet::icmpv6(pod6, "fe80::9".parse()?, ICMPV6_REDIRECT, 36);
    // The same RA behind a hop-by-hop header (8 bytes of options).
    let mut body = vec![IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0];
    body.extend_from_slice(&[ICMPV6_ROUTER_ADVERTISEMENT, 0, 0, 0]);
    body.resize(8 + 16, 0);
    let hidden = Packet::ipv6(pod6, all_nodes, 0, body);
    // Seven destination-options headers: more than the walk follows.
    let mut chain = Vec::new();
    for _ in 0..7 {
        chain.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    chain[7 * 8 - 8] = 17;
    chain.resize(7 * 8 + 8, 0);
    let endless = Packet::ipv6(pod6, all_nodes, 60, chain);
    let udp_out = Packet::ipv6_udp(POD6, 5000, PEER6, 53);

    for flags in [0, EP_INGRESS_ENFORCED, EP_EGRESS_ENFORCED | EP_AUDIT] {
        rig.endpoint(flags)?;
        for p in [&ra, &redirect, &hidden] {
            rig.run(DIR_EGRESS, p)?
                .assert_reported(false, VERDICT_DROP, reason::ND_FORBIDDEN, 0);
        }
        rig.run(DIR_EGRESS, &endless)?
            .assert_reported(false, VERDICT_DROP, reason::MALFORMED, 0);
        // Towards the pod an RA is the node's business, and passes.
        rig.run(DIR_INGRESS, &ra)?
            .assert_silent(true, Some(reason::NOT_IP));
        // ND with a hop limit other than 255 was forwarded: never valid.
        let ns = Packet::neighbour_solicitation(pod6, "fe80::9".parse()?);
        rig.run(DIR_EGRESS, &ns)?
            .assert_silent(true, Some(reason::NOT_IP));
        rig.run(DIR_EGRESS, &ns.clone().with_hop_limit(64))?
            .assert_reported(false, VERDICT_DROP, reason::ND_FORBIDDEN, 0);
    }
    // An unenforced pod's other IPv6 still passes (as a new flow).
    rig.endpoint(0)?;
    rig.run(DIR_EGRESS, &udp_out)?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    Ok(())
}

#[test]
fn malformed_headers_drop_when_enforced() -> Result<()> {
    let mut rig = rig!();
    let tcp = tcp_in(44000, 80, TCP_FLAG_SYN);
    // BPF_PROG_TEST_RUN refuses frames that do not hold a whole IPv4
    // (IPv6) header, so a short IP header is the model's alone to check
    // (below); on a real interface the kernel would not build such an skb
    // for an IPv4 packet either.
    let malformed = [
        tcp.clone().with_ihl(4),                   // IHL < 5
        tcp.clone().with_ip_version(6),            // not version 4
        tcp.clone().with_tot_len(19),              // total length < header
        tcp.clone().short_by(1),                   // truncated TCP header
        tcp.clone().with_tcp_data_offset(4),       // TCP data offset < 5
        tcp.clone().with_ihl(15).with_tot_len(80), // header longer than the packet
        Packet::udp(PEER, 1, POD, 53).truncated(14 + 20 + 7),
        Packet::sctp(PEER, 1, POD, 53).truncated(14 + 20 + 11),
        Packet::icmp_echo(PEER, POD, 1, 1).truncated(14 + 20 + 7),
    ];
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FIXED,
        PEER_IDENTITY,
        DIR_INGRESS,
        0,
        0,
        ACTION_ALLOW,
        111,
    )?;
    for p in &malformed {
        let s = rig.run(DIR_INGRESS, p)?;
        s.assert_reported(false, VERDICT_DROP, reason::MALFORMED, 0);
        let e = s.event();
        assert_eq!(
            (e.saddr, e.daddr, e.protocol, e.src_identity, e.dst_identity),
            (0, 0, 0, 0, POD_IDENTITY)
        );
    }
    for short in [tcp.clone().truncated(30), tcp.clone().truncated(14)] {
        assert!(run_tc(
            rig.dp.classifier(programs::POD_INGRESS)?,
            &short.bytes(),
            IFINDEX,
            1
        )
        .is_err());
        let v = rig.ev.evaluate(IFINDEX, DIR_INGRESS, &short);
        assert_eq!(
            (v.pass, v.reason, v.counter),
            (false, reason::MALFORMED, Some(reason::MALFORMED))
        );
    }
    // Valid IP options and an unknown protocol without a header are fine.
    rig.run(DIR_INGRESS, &tcp.clone().with_ip_options(3))?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 111);
    rig.run(
        DIR_INGRESS,
        &Packet::ipv4_proto(PEER, POD, 47).truncated(34),
    )?
    .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 111);
    // Unenforced: passed silently.
    for p in &malformed {
        let reversed = match p.ipv4() {
            Some(_) => p.clone().with_src(POD).with_dst(PEER),
            None => p.clone(),
        };
        rig.run(DIR_EGRESS, &reversed)?.assert_silent(true, None);
    }
    Ok(())
}

#[test]
fn arp_passes_and_other_ethertypes_drop_when_enforced() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    rig.run(DIR_INGRESS, &Packet::arp_request(PEER, POD))?
        .assert_silent(true, Some(reason::NOT_IP));
    rig.run(DIR_EGRESS, &Packet::arp_reply(POD, PEER))?
        .assert_silent(true, Some(reason::NOT_IP));
    for t in [0x88cc, 0x8847, 0x0842] {
        let s = rig.run(DIR_INGRESS, &Packet::ethertype(t, 46))?;
        s.assert_reported(false, VERDICT_DROP, reason::UNSUPPORTED_L3, 0);
        assert_eq!(s.event().direction, DIR_INGRESS);
    }
    rig.endpoint(EP_EGRESS_ENFORCED)?;
    rig.run(DIR_INGRESS, &Packet::ethertype(0x88cc, 46))?
        .assert_silent(true, None);
    Ok(())
}

#[test]
fn audit_mode_passes_would_be_drops_as_audit() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_AUDIT)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        22,
        ACTION_DENY,
        121,
    )?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        122,
    )?;
    let nomatch = tcp_in(45000, 8080, TCP_FLAG_SYN);
    rig.run(DIR_INGRESS, &nomatch)?.assert_reported(
        true,
        VERDICT_AUDIT,
        reason::NO_POLICY_MATCH,
        0,
    );
    // The audited flow is tracked (flagged) and not reported again. (A
    // test_run frame came through the node's stack, not by local
    // delivery: its ingress entry says so.)
    assert_eq!(
        rig.ct(&ct_key(&nomatch, DIR_INGRESS)).map(|v| v.flags),
        Some(CT_AUDIT | CT_VIA_STACK)
    );
    rig.run(DIR_INGRESS, &nomatch.clone().with_tcp_flags(TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::ESTABLISHED));
    rig.run(DIR_INGRESS, &tcp_in(45000, 22, TCP_FLAG_SYN))?
        .assert_reported(true, VERDICT_AUDIT, reason::DENY_RULE, 121);
    rig.run(DIR_INGRESS, &tcp_in(45000, 80, TCP_FLAG_SYN))?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 122);
    rig.run(DIR_INGRESS, &tcp_in(45001, 80, 0).truncated(40))?
        .assert_reported(true, VERDICT_AUDIT, reason::MALFORMED, 0);
    let frag = Packet::udp(PEER, 1, POD, 2).later_fragment(1, 1, false);
    rig.run(DIR_INGRESS, &frag)?
        .assert_reported(true, VERDICT_AUDIT, reason::FRAG_UNTRACKED, 0);
    rig.run(DIR_INGRESS, &Packet::ethertype(0x88cc, 46))?
        .assert_reported(true, VERDICT_AUDIT, reason::UNSUPPORTED_L3, 0);
    // An audited first fragment lets the rest of its datagram through.
    let first = Packet::udp(PEER, 1, POD, 2).first_fragment(2);
    rig.run(DIR_INGRESS, &first)?
        .assert_reported(true, VERDICT_AUDIT, reason::NO_POLICY_MATCH, 0);
    let later = Packet::udp(PEER, 1, POD, 2).later_fragment(2, 3, false);
    rig.run(DIR_INGRESS, &later)?
        .assert_silent(true, Some(reason::FRAG_ALLOWED));
    Ok(())
}

#[test]
fn counters_add_up_over_a_sequence() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        131,
    )?;
    let before = rig.maps.counters()?;
    let syn = tcp_in(46000, 80, TCP_FLAG_SYN);
    rig.run(DIR_INGRESS, &syn)?;
    for _ in 0..3 {
        rig.run(DIR_EGRESS, &syn.reply(TCP_FLAG_ACK))?;
        rig.run(DIR_INGRESS, &syn.clone().with_tcp_flags(TCP_FLAG_ACK))?;
    }
    for port in 1..=4 {
        rig.run(DIR_INGRESS, &tcp_in(46000, port, TCP_FLAG_SYN))?;
    }
    rig.run(DIR_INGRESS, &Packet::arp_request(PEER, POD))?;
    let after = rig.maps.counters()?;
    let d = |r| after.get(r) - before.get(r);
    assert_eq!(d(reason::POLICY_ALLOW), 1);
    assert_eq!(d(reason::REPLY), 3);
    assert_eq!(d(reason::ESTABLISHED), 3);
    assert_eq!(d(reason::NO_POLICY_MATCH), 4);
    assert_eq!(d(reason::NOT_IP), 1);
    assert_eq!(d(reason::EVENTS_LOST), 0);
    assert_eq!(
        after.0.iter().sum::<u64>() - before.0.iter().sum::<u64>(),
        12
    );
    assert!(after.named().contains(&("reply", 3)));
    Ok(())
}

#[test]
fn xdp_prefilter_drops_denied_sources_and_counts() -> Result<()> {
    let mut rig = rig!();
    rig.maps.deny_source(Ipv4Addr::new(203, 0, 113, 0), 24, 1)?;
    rig.maps
        .deny_source(Ipv4Addr::new(198, 51, 100, 7), 32, 2)?;
    let mut run = |p: &Packet| -> Result<u32> {
        let data = p.bytes();
        let mut out = vec![0u8; data.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(&data),
            data_out: Some(&mut out),
            ..Default::default()
        };
        Ok(rig.dp.xdp()?.test_run(opts)?.return_value)
    };
    let cases = [
        (
            Packet::udp(Ipv4Addr::new(203, 0, 113, 9), 1, POD, 2),
            XDP_DROP,
        ),
        (
            Packet::tcp(Ipv4Addr::new(203, 0, 113, 255), 1, POD, 2, TCP_FLAG_SYN),
            XDP_DROP,
        ),
        (
            Packet::udp(Ipv4Addr::new(198, 51, 100, 7), 1, POD, 2),
            XDP_DROP,
        ),
        (
            Packet::udp(Ipv4Addr::new(198, 51, 100, 8), 1, POD, 2),
            XDP_PASS,
        ),
        (
            Packet::udp(Ipv4Addr::new(203, 0, 114, 1), 1, POD, 2),
            XDP_PASS,
        ),
        // Destination in the deny list does not matter.
        (
            Packet::udp(PEER, 1, Ipv4Addr::new(203, 0, 113, 9), 2),
            XDP_PASS,
        ),
    ];
    let mut want = (0, 0);
    for (p, action) in &cases {
        assert_eq!(run(p)?, *action, "{p}");
        if *action == XDP_DROP {
            want.0 += 1;
        } else {
            want.1 += 1;
        }
    }
    // Not IPv4, or too short to carry a source: passed, not counted.
    assert_eq!(
        run(&Packet::arp_request(Ipv4Addr::new(203, 0, 113, 9), POD))?,
        XDP_PASS
    );
    assert_eq!(
        run(&Packet::udp(Ipv4Addr::new(203, 0, 113, 9), 1, POD, 2).truncated(30))?,
        XDP_PASS
    );
    let c = rig.maps.xdp_counters()?;
    assert_eq!((c.get(reason::XDP_DENYLIST), c.get(reason::XDP_PASS)), want);
    assert_eq!(c.0.iter().sum::<u64>(), want.0 + want.1);
    // The tc counters are separate.
    assert_eq!(rig.maps.counters()?.0.iter().sum::<u64>(), 0);
    // Allowing the source again.
    rig.maps.allow_source(Ipv4Addr::new(198, 51, 100, 7), 32)?;
    let data = Packet::udp(Ipv4Addr::new(198, 51, 100, 7), 1, POD, 2).bytes();
    let opts = TestRunOptions {
        data_in: Some(&data),
        ..Default::default()
    };
    assert_eq!(rig.dp.xdp()?.test_run(opts)?.return_value, XDP_PASS);
    Ok(())
}

#[test]
fn transport_header_must_lie_inside_the_ip_datagram() -> Result<()> {
    // RFC 1858 tiny-fragment attack: a first fragment whose IP datagram
    // holds only 8 bytes of TCP (ports, seq) but whose frame carries a full
    // TCP header after it. The receiving stack trims the frame to the IP
    // total length, so the flags it acts on come from the *next* fragment,
    // which no program inspects. Here it would smuggle a SYN through a closed
    // conntrack entry whose policy is gone.
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        141,
    )?;
    let syn = tcp_in(47000, 80, TCP_FLAG_SYN);
    rig.run(DIR_INGRESS, &syn)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 141);
    rig.run(DIR_INGRESS, &syn.clone().with_tcp_flags(TCP_FLAG_RST))?
        .assert_silent(true, Some(reason::ESTABLISHED));
    rig.unpolicy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
    )?;
    rig.run(DIR_INGRESS, &syn)?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);

    let tiny_first = syn
        .clone()
        .with_tcp_flags(TCP_FLAG_ACK)
        .first_fragment(9)
        .with_tot_len(20 + 8);
    let s = rig.run(DIR_INGRESS, &tiny_first)?;
    s.assert_reported(false, VERDICT_DROP, reason::MALFORMED, 0);
    let rest = syn.clone().later_fragment(9, 1, false);
    rig.run(DIR_INGRESS, &rest)?
        .assert_reported(false, VERDICT_DROP, reason::FRAG_UNTRACKED, 0);
    // The same for UDP, SCTP and ICMP headers cut by the total length.
    for p in [
        Packet::udp(PEER, 1, POD, 53).with_tot_len(20 + 7),
        Packet::sctp(PEER, 1, POD, 53).with_tot_len(20 + 11),
        Packet::icmp_echo(PEER, POD, 1, 1).with_tot_len(20 + 7),
        syn.clone().with_tot_len(20 + 19),
    ] {
        rig.run(DIR_INGRESS, &p)?
            .assert_reported(false, VERDICT_DROP, reason::MALFORMED, 0);
    }
    // A total length that covers the header (and no more) is fine.
    rig.policy(
        POLICY_PREFIX_FIXED,
        PEER_IDENTITY,
        DIR_INGRESS,
        0,
        0,
        ACTION_ALLOW,
        142,
    )?;
    let exact = Packet::udp(PEER, 2, POD, 53).with_tot_len(20 + 8);
    rig.run(DIR_INGRESS, &exact)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 142);
    Ok(())
}

#[test]
fn peer_syn_on_a_closed_tuple_is_a_new_flow_not_a_reply() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        95,
    )?;
    let syn = tcp_in(42000, 80, TCP_FLAG_SYN);
    rig.run(DIR_INGRESS, &syn)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 95);
    rig.run(DIR_EGRESS, &syn.reply(TCP_FLAG_SYN | TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::REPLY));
    rig.run(DIR_EGRESS, &syn.reply(TCP_FLAG_RST))?
        .assert_silent(true, Some(reason::REPLY));
    // The pod now opens a connection on the same (closed) tuple towards the
    // peer: its egress policy decides, the old ingress entry does not.
    rig.run(DIR_EGRESS, &syn.reply(TCP_FLAG_SYN))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    Ok(())
}

// ---- issue 17 points 1 and 2: entries bound to their endpoint and to the
// policy generation that admitted them (kernel and reference compared) ----

impl Rig {
    /// Rewrite the endpoint's value (as the map sync does).
    fn endpoint_with(&mut self, f: impl FnOnce(&mut EndpointInfo)) -> Result<()> {
        let mut info = self.state.endpoints[&IFINDEX];
        f(&mut info);
        self.maps.upsert_endpoint(IFINDEX, info)?;
        self.state.endpoints.insert(IFINDEX, info);
        self.ev.set_maps(&self.state);
        Ok(())
    }
}

#[test]
fn a_generation_change_rejudges_and_cuts_denied_flows_keeps_allowed_ones() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        90,
    )?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        81,
        ACTION_ALLOW,
        91,
    )?;
    let a = tcp_in(44000, 80, TCP_FLAG_SYN);
    let b = tcp_in(44001, 81, TCP_FLAG_SYN);
    rig.run(DIR_INGRESS, &a)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 90);
    rig.run(DIR_INGRESS, &b)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 91);
    // Port 81's rule goes; the generation moves on.
    rig.unpolicy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        81,
    )?;
    rig.endpoint_with(|i| i.generation += 1)?;
    // Still allowed: judged again silently, brought up to date.
    rig.run(DIR_INGRESS, &a.clone().with_tcp_flags(TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::ESTABLISHED));
    assert_eq!(
        rig.ct(&ct_key(&a, DIR_INGRESS)).map(|v| v.generation),
        Some(1)
    );
    // Now denied: cut, reported, the entry gone.
    rig.run(DIR_INGRESS, &b.clone().with_tcp_flags(TCP_FLAG_ACK))?
        .assert_reported(false, VERDICT_DROP, reason::POLICY_CHANGED, 0);
    assert!(rig.ct(&ct_key(&b, DIR_INGRESS)).is_none());
    // The pod's own segments of the cut flow are no replies any more:
    // its unenforced egress passes them as new, unrecorded (mid-stream),
    // so the peer's next segment is judged by policy again.
    let back = b.reply(TCP_FLAG_ACK);
    rig.run(DIR_EGRESS, &back)?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    assert!(rig.ct(&ct_key(&back, DIR_EGRESS)).is_none());
    rig.run(DIR_INGRESS, &b.clone().with_tcp_flags(TCP_FLAG_ACK))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    Ok(())
}

#[test]
fn a_syn_on_an_established_entry_is_a_new_flow() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    rig.policy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        ACTION_ALLOW,
        92,
    )?;
    let syn = tcp_in(44100, 80, TCP_FLAG_SYN);
    rig.run(DIR_INGRESS, &syn)?
        .assert_reported(true, VERDICT_ALLOW, reason::POLICY_ALLOW, 92);
    rig.run(DIR_EGRESS, &syn.reply(TCP_FLAG_SYN | TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::REPLY));
    rig.run(DIR_INGRESS, &syn.clone().with_tcp_flags(TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::ESTABLISHED));
    assert_eq!(
        rig.ct(&ct_key(&syn, DIR_INGRESS)).map(|v| v.tcp_state),
        Some(TCP_ESTABLISHED)
    );
    // A retransmitted SYN during the handshake rides on the entry; a SYN
    // on the established entry goes to policy again (reported).
    rig.unpolicy(
        POLICY_PREFIX_FULL,
        PEER_IDENTITY,
        DIR_INGRESS,
        PROTO_TCP,
        80,
    )?;
    rig.run(DIR_INGRESS, &syn)?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    Ok(())
}

#[test]
fn audited_entries_are_judged_again_when_audit_ends() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED | EP_AUDIT)?;
    let p = Packet::udp(PEER, 5000, POD, 53);
    rig.run(DIR_INGRESS, &p)?
        .assert_reported(true, VERDICT_AUDIT, reason::NO_POLICY_MATCH, 0);
    rig.run(DIR_INGRESS, &p)?
        .assert_silent(true, Some(reason::ESTABLISHED));
    rig.endpoint_with(|i| i.flags &= !EP_AUDIT)?;
    rig.run(DIR_INGRESS, &p)?
        .assert_reported(false, VERDICT_DROP, reason::POLICY_CHANGED, 0);
    Ok(())
}

#[test]
fn entries_of_another_endpoint_are_never_used() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    let now = ct_clock_ns();
    let p = tcp_in(44200, 80, TCP_FLAG_ACK);
    // An established entry for the tuple, made on another endpoint's veth
    // (or by the pod that had this address before: another id).
    let mut k = ct_key(&p, DIR_INGRESS);
    k.endpoint_id = EP_ID + 1;
    let v = CtValue {
        expires_ns: now + 60_000_000_000,
        cookie: 5,
        tcp_state: TCP_ESTABLISHED,
        flags: 0,
        generation: 0,
        ..CtValue::default()
    };
    rig.insert_ct(k, v)?;
    rig.run(DIR_INGRESS, &p)?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    // A frame to the pod's veth not addressed to the pod, enforced or not.
    rig.endpoint(0)?;
    let stray = Packet::udp(PEER, 1, Ipv4Addr::new(10, 1, 0, 77), 2);
    rig.run(DIR_INGRESS, &stray)?.assert_reported(
        false,
        VERDICT_DROP,
        reason::NOT_OWN_DESTINATION,
        0,
    );
    // Broadcast still reaches it (judged as usual: unenforced here).
    let bcast = Packet::udp(PEER, 68, Ipv4Addr::BROADCAST, 67);
    rig.run(DIR_INGRESS, &bcast)?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    Ok(())
}

#[test]
fn tcp_picked_up_mid_stream_in_an_unenforced_direction_is_not_recorded() -> Result<()> {
    let mut rig = rig!();
    rig.endpoint(EP_INGRESS_ENFORCED)?;
    let mid = tcp_out(PEER, 44300, 8080, TCP_FLAG_ACK);
    rig.run(DIR_EGRESS, &mid)?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    assert!(rig.ct(&ct_key(&mid, DIR_EGRESS)).is_none());
    // So the peer's segments are judged by the pod's ingress policy.
    rig.run(DIR_INGRESS, &mid.reply(TCP_FLAG_ACK))?
        .assert_reported(false, VERDICT_DROP, reason::NO_POLICY_MATCH, 0);
    // A connection the pod opens is recorded: its replies pass.
    let syn = tcp_out(PEER, 44301, 8080, TCP_FLAG_SYN);
    rig.run(DIR_EGRESS, &syn)?
        .assert_reported(true, VERDICT_ALLOW, reason::UNENFORCED, 0);
    rig.run(DIR_INGRESS, &syn.reply(TCP_FLAG_SYN | TCP_FLAG_ACK))?
        .assert_silent(true, Some(reason::REPLY));
    Ok(())
}
