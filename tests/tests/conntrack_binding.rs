//! Issue 17 point 1 on real veths: a conntrack entry made on one pod's
//! veth is never found on another's, and a frame on its way to a pod must
//! be addressed to that pod.
//!
//! The setup is chained mode's: pods on a Linux bridge whose ports have
//! `hairpinMode` (as `deploy/cni/chained-flannel.conflist` ships), so a
//! frame a pod sends to its own MAC comes back out of its own port. An
//! unenforced pod with CAP_NET_RAW sends, from a raw socket, a SYN carrying
//! its victim's tuple to its own MAC: its own (unenforced) veth would pass
//! it towards the pod and record an INGRESS entry for the victim's tuple.
//! Then it opens that very connection, which the victim's ingress policy
//! denies: it must be dropped.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{bail, Result};
use palisade_common::{
    conntrack::TCP_FLAG_SYN, reason, EndpointInfo, IpcacheValue, DIR_INGRESS, EP_INGRESS_ENFORCED,
    IDENTITY_WORLD, PROTO_TCP, VERDICT_DROP,
};
use palisade_dataplane::{
    events::EventReader,
    maps::{be, from_be},
    packet::Packet,
    Datapath, DatapathConfig, Maps,
};
use palisade_tests::*;

const BR_ADDR: &str = "10.98.0.1/24";
const M: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const V: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 3);
const M_MAC: [u8; 6] = [0x02, 0x98, 0, 0, 0, 2];
const ATTACK_SPORT: u16 = 40123;

struct Bridged {
    pods: Vec<Pod>,
    ifindexes: Vec<u32>,
    _dp: Datapath,
    _maps: Maps,
    events: EventReader,
    node: NetNs,
    _pins: PinRoot,
}

/// A node namespace with a bridge, pods M (unenforced) and V (ingress
/// enforced, no rule: everything to it is denied), both ports hairpinned.
fn bridged() -> Result<Bridged> {
    let pins = PinRoot::new()?;
    let node = NetNs::new("pbr")?;
    node.ip(&["link", "add", "br0", "type", "bridge"])?;
    node.ip(&["addr", "add", BR_ADDR, "dev", "br0"])?;
    node.ip(&["link", "set", "br0", "up"])?;
    let mut pods = Vec::new();
    for (i, ip) in [M, V].into_iter().enumerate() {
        let ns = NetNs::new("pbrpod")?;
        let host_if: String = format!("h{}", unique("")).chars().take(15).collect();
        node.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        node.ip(&["link", "set", &host_if, "master", "br0"])?;
        node.ip(&[
            "link",
            "set",
            &host_if,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ])?;
        node.ip(&["link", "set", &host_if, "up"])?;
        let mac = format!("02:98:00:00:00:{:02x}", i + 2);
        ns.ip(&["link", "set", "eth0", "address", &mac])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        pods.push(Pod { ns, ip, host_if });
    }
    let cfg = DatapathConfig {
        pins: pins.pins.clone(),
        ..Default::default()
    };
    let ifs: Vec<(String, Ipv4Addr, u32)> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| (p.host_if.clone(), p.ip, i as u32 + 1))
        .collect();
    let (dp, mut maps, ifindexes) =
        node.enter(move || -> Result<(Datapath, Maps, Vec<u32>)> {
            let mut dp = Datapath::load(&cfg)?;
            let mut maps = dp.take_maps()?;
            let mut ifindexes = Vec::new();
            for (ifname, ip, ep) in ifs {
                let ifindex = palisade_dataplane::loader::ifindex(&ifname)?;
                let info = EndpointInfo {
                    endpoint_id: ep,
                    identity: 1000 + ep,
                    ipv4: be(ip),
                    // V (endpoint 2): ingress enforced, no rule.
                    flags: if ep == 2 { EP_INGRESS_ENFORCED } else { 0 },
                    generation: 0,
                    mac: [0; 6],
                    _pad: [0; 2],
                    ipv6: [0; 4],
                };
                maps.upsert_endpoint(ifindex, info)?;
                dp.attach_pod(&ifname)?;
                ifindexes.push(ifindex);
            }
            Ok((dp, maps, ifindexes))
        })??;
    maps.set_ipcache(
        Ipv4Addr::UNSPECIFIED,
        0,
        IpcacheValue {
            identity: IDENTITY_WORLD,
            cidr_identity: IDENTITY_WORLD,
        },
    )?;
    for (ip, id) in [(M, 1001), (V, 1002)] {
        maps.set_ipcache(
            ip,
            32,
            IpcacheValue {
                identity: id,
                cidr_identity: IDENTITY_WORLD,
            },
        )?;
    }
    let events = EventReader::new(maps.take_events().expect("events map"));
    Ok(Bridged {
        pods,
        ifindexes,
        _dp: dp,
        _maps: maps,
        events,
        node,
        _pins: pins,
    })
}

/// Send one raw Ethernet frame out of `ifname` in `ns` (AF_PACKET: what a
/// pod with CAP_NET_RAW can do).
fn send_frame(ns: &NetNs, ifname: &'static str, frame: Vec<u8>) -> Result<()> {
    ns.enter(move || -> Result<()> {
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: plain syscalls on a socket this closure owns and closes.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr());
            if ifindex == 0 {
                bail!("no {ifname}");
            }
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&frame[..6]);
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n < 0 {
                bail!("sendto: {err}");
            }
        }
        Ok(())
    })?
}

/// A TCP connection from `ns` bound to source port `sport`; true when it
/// was established within `timeout`.
fn connect_from_port(ns: &NetNs, sport: u16, to: Ipv4Addr, port: u16) -> Result<bool> {
    ns.enter(move || -> Result<bool> {
        // SAFETY: plain syscalls on a socket this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                4,
            );
            // connect(2) gives up after SO_SNDTIMEO.
            let tv = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let sa = |addr: Ipv4Addr, p: u16| libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: p.to_be(),
                sin_addr: libc::in_addr { s_addr: be(addr) },
                sin_zero: [0; 8],
            };
            let local = sa(Ipv4Addr::UNSPECIFIED, sport);
            let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
            if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                bail!("bind :{sport}: {e}");
            }
            let remote = sa(to, port);
            let r = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
            libc::close(fd);
            Ok(r == 0)
        }
    })?
}

#[test]
fn a_pod_cannot_plant_an_ingress_entry_for_its_victim_through_a_hairpinned_bridge() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut b = bridged()?;
    tcp_echo_server(&b.pods[1].ns, 8080)?;
    let (m_if, v_if) = (b.ifindexes[0], b.ifindexes[1]);
    // The victim's policy holds for an ordinary connection.
    assert!(
        !tcp_connects(&b.pods[0].ns, V, 8080, 1000)?,
        "V's ingress denies M"
    );

    // The planted SYN: M -> V:8080 from the port the attack will use, to
    // M's own MAC, which the hairpinned bridge port sends back to M.
    let mut frame = Packet::tcp(M, ATTACK_SPORT, V, 8080, TCP_FLAG_SYN).bytes();
    frame[..6].copy_from_slice(&M_MAC);
    frame[6..12].copy_from_slice(&M_MAC);
    for _ in 0..3 {
        send_frame(&b.pods[0].ns, "eth0", frame.clone())?;
    }
    // The hairpinned copy reaches M's pod_ingress and is refused there.
    let refused = b.events.wait_for(Duration::from_secs(5), |e| {
        e.ifindex == m_if && e.direction == DIR_INGRESS && e.reason == reason::NOT_OWN_DESTINATION
    });
    let e = refused.expect("M's ingress reports the frame not addressed to M");
    assert_eq!(e.verdict, VERDICT_DROP);
    assert_eq!((from_be(e.saddr), from_be(e.daddr)), (M, V));

    // The connection V's policy denies stays denied.
    assert!(
        !connect_from_port(&b.pods[0].ns, ATTACK_SPORT, V, 8080)?,
        "the planted entry must not admit M's connection to V"
    );
    let drop = b.events.wait_for(Duration::from_secs(5), |e| {
        e.ifindex == v_if
            && e.protocol == PROTO_TCP
            && u16::from_be(e.sport_be) == ATTACK_SPORT
            && e.verdict == VERDICT_DROP
    });
    let drop = drop.expect("V's ingress drops the attack connection");
    assert_eq!(drop.reason, reason::NO_POLICY_MATCH);
    let _ = &b.node;
    Ok(())
}
