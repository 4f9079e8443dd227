//! Service translation through BPF_PROG_TEST_RUN: the rewritten headers
//! and their checksums, byte for byte (packets with fully computed L4
//! checksums, CHECKSUM_NONE; the veth tests cover CHECKSUM_PARTIAL).
use std::net::Ipv4Addr;

use anyhow::Result;
use palisade_common::{
    service::{SvcBackend, SvcBackendKey, SvcFrontend, SvcFrontendKey},
    CtValue, EndpointInfo, IpcacheValue, CT_SVC_FWD, CT_SVC_NAT, IDENTITY_WORLD, PROTO_TCP,
    PROTO_UDP,
};
use palisade_dataplane::{
    maps::be,
    packet::{Packet, TCP_FLAG_SYN},
    testrun::{run_tc_out, TC_ACT_OK, TC_ACT_SHOT},
    Datapath, DatapathConfig,
};
use palisade_tests::{require_root, PinRoot};

const IFINDEX: u32 = 1;
const POD: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 9);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 1);

fn sum(bytes: &[u8], mut acc: u32) -> u32 {
    for c in bytes.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The L4 checksum of an Ethernet + IPv4 frame, with the field zeroed.
fn l4_checksum(f: &[u8], csum_off: usize) -> u16 {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let l4 = &f[14 + ihl..14 + tot];
    let mut seg = l4.to_vec();
    seg[csum_off] = 0;
    seg[csum_off + 1] = 0;
    let mut acc = sum(&f[26..34], 0);
    acc += u32::from(f[23]) + seg.len() as u32;
    fold(sum(&seg, acc))
}

fn with_checksum(mut f: Vec<u8>, csum_off: usize) -> Vec<u8> {
    let c = l4_checksum(&f, csum_off);
    let o = 14 + usize::from(f[14] & 0x0f) * 4 + csum_off;
    f[o..o + 2].copy_from_slice(&c.to_be_bytes());
    f
}

fn checksums_valid(f: &[u8], csum_off: usize) -> bool {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let o = 14 + ihl + csum_off;
    let stored = u16::from_be_bytes([f[o], f[o + 1]]);
    fold(sum(&f[14..14 + ihl], 0)) == 0 && stored == l4_checksum(f, csum_off)
}

fn addr(f: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(f[off], f[off + 1], f[off + 2], f[off + 3])
}

fn port(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

#[test]
fn translation_rewrites_headers_with_valid_checksums_both_ways() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let pins = PinRoot::new()?;
    let mut dp = Datapath::load(&DatapathConfig {
        pins: pins.pins.clone(),
        ..Default::default()
    })?;
    let mut maps = dp.take_maps()?;
    maps.upsert_endpoint(
        IFINDEX,
        EndpointInfo {
            endpoint_id: 1,
            identity: 1001,
            ipv4: be(POD),
            flags: 0,
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
    for (id, proto, sport, tport) in [(1, PROTO_TCP, 80, 8080), (2, PROTO_UDP, 53, 5353)] {
        maps.set_backend(
            SvcBackendKey {
                service_id: id,
                slot: 0,
            },
            SvcBackend {
                addr: be(BACKEND),
                port_be: u16::to_be(tport),
                _pad: 0,
            },
        )?;
        maps.set_frontend(
            SvcFrontendKey {
                addr: be(VIP),
                port_be: u16::to_be(sport),
                protocol: proto,
                _pad: 0,
            },
            SvcFrontend {
                service_id: id,
                backends: 1,
                affinity_s: 0,
            },
        )?;
    }

    for (proto, sport, tport, csum_off) in
        [(PROTO_TCP, 80u16, 8080u16, 16), (PROTO_UDP, 53, 5353, 6)]
    {
        let p = if proto == PROTO_TCP {
            Packet::tcp(POD, 40000, VIP, sport, TCP_FLAG_SYN)
        } else {
            Packet::udp(POD, 40000, VIP, sport)
        }
        .with_payload(37);
        let req = with_checksum(p.bytes(), csum_off);
        assert!(checksums_valid(&req, csum_off));
        let (act, out) = run_tc_out(dp.classifier("pod_egress")?, &req, IFINDEX)?;
        assert_eq!(act, TC_ACT_OK);
        assert_eq!((addr(&out, 26), addr(&out, 30)), (POD, BACKEND));
        assert_eq!((port(&out, 34), port(&out, 36)), (40000, tport));
        assert!(checksums_valid(&out, csum_off), "proto {proto}: {out:02x?}");
        let o = 34 + csum_off;
        assert_eq!(out[38..o], req[38..o], "nothing else changed");
        assert_eq!(out[o + 2..], req[o + 2..], "nothing else changed");

        // The reply, at the pod's ingress: from the ClusterIP again.
        let r = if proto == PROTO_TCP {
            Packet::tcp(BACKEND, tport, POD, 40000, TCP_FLAG_SYN | 0x10)
        } else {
            Packet::udp(BACKEND, tport, POD, 40000)
        }
        .with_payload(11);
        let reply = with_checksum(r.bytes(), csum_off);
        let (act, back) = run_tc_out(dp.classifier("pod_ingress")?, &reply, IFINDEX)?;
        assert_eq!(act, TC_ACT_OK);
        assert_eq!((addr(&back, 26), addr(&back, 30)), (VIP, POD));
        assert_eq!((port(&back, 34), port(&back, 36)), (sport, 40000));
        assert!(
            checksums_valid(&back, csum_off),
            "proto {proto}: {back:02x?}"
        );
    }

    // Each flow's translation lives in its two conntrack entries (the
    // original tuple's holds the backend, the translated tuple's the
    // ClusterIP:port); no translation map entry was written.
    let entries = maps.conntrack_entries()?;
    for (id, proto, sport, tport) in [(1, PROTO_TCP, 80u16, 8080u16), (2, PROTO_UDP, 53, 5353)] {
        let entry = |daddr: Ipv4Addr, dport: u16| {
            let k = entries.iter().find(|(k, _)| {
                (k.protocol, k.daddr, k.dport_be) == (proto, be(daddr), dport.to_be())
            });
            k.map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("no entry to {daddr}:{dport}: {entries:?}"))
        };
        let (fwd, tr) = (entry(VIP, sport), entry(BACKEND, tport));
        let nat = |v: CtValue| {
            (
                v.flags & (CT_SVC_NAT | CT_SVC_FWD),
                v.nat_addr,
                v.nat_port_be,
            )
        };
        assert_eq!(
            nat(fwd),
            (CT_SVC_NAT | CT_SVC_FWD, be(BACKEND), tport.to_be())
        );
        assert_eq!(nat(tr), (CT_SVC_NAT, be(VIP), sport.to_be()));
        assert_eq!((fwd.service_id, tr.service_id), (id, id));
    }
    assert_eq!(maps.svc_nat_entries(), vec![]);

    // A UDP datagram without a checksum (0) keeps "no checksum".
    let mut bare = Packet::udp(POD, 40002, VIP, 53).with_payload(8).bytes();
    bare[40] = 0;
    bare[41] = 0;
    let (act, out) = run_tc_out(dp.classifier("pod_egress")?, &bare, IFINDEX)?;
    assert_eq!(act, TC_ACT_OK);
    assert_eq!(addr(&out, 30), BACKEND);
    assert_eq!((out[40], out[41]), (0, 0));

    // No backends: refused.
    maps.set_frontend(
        SvcFrontendKey {
            addr: be(VIP),
            port_be: 80u16.to_be(),
            protocol: PROTO_TCP,
            _pad: 0,
        },
        SvcFrontend {
            service_id: 1,
            backends: 0,
            affinity_s: 0,
        },
    )?;
    let syn = with_checksum(
        Packet::tcp(POD, 40004, VIP, 80, TCP_FLAG_SYN)
            .with_payload(20)
            .bytes(),
        16,
    );
    let (act, out) = run_tc_out(dp.classifier("pod_egress")?, &syn, IFINDEX)?;
    assert_eq!(act, TC_ACT_REDIRECT, "answered, back into the pod");
    assert_unreachable(&syn, &out);
    // A short UDP datagram grows into the answer.
    maps.set_frontend(
        SvcFrontendKey {
            addr: be(VIP),
            port_be: 53u16.to_be(),
            protocol: PROTO_UDP,
            _pad: 0,
        },
        SvcFrontend {
            service_id: 2,
            backends: 0,
            affinity_s: 0,
        },
    )?;
    let dgram = with_checksum(Packet::udp(POD, 40005, VIP, 53).with_payload(1).bytes(), 6);
    let (act, out) = run_tc_out(dp.classifier("pod_egress")?, &dgram, IFINDEX)?;
    assert_eq!(act, TC_ACT_REDIRECT);
    assert_unreachable(&dgram, &out);
    // Never answered: a fragment, a packet with IP options, a reset.
    for p in [
        Packet::udp(POD, 40006, VIP, 53).first_fragment(9),
        Packet::udp(POD, 40007, VIP, 53).with_ip_options(1),
        Packet::tcp(POD, 40008, VIP, 80, 0x04),
    ] {
        let (act, _) = run_tc_out(dp.classifier("pod_egress")?, &p.bytes(), IFINDEX)?;
        assert_eq!(act, TC_ACT_SHOT, "{p:?}");
    }
    Ok(())
}

const TC_ACT_REDIRECT: u32 = 7;

/// `out` is an ICMP port unreachable from the ClusterIP to the pod,
/// quoting the first 28 bytes of `req`'s IP datagram, with valid checksums
/// and the MACs swapped.
fn assert_unreachable(req: &[u8], out: &[u8]) {
    assert_eq!(out.len(), 14 + 56, "{out:02x?}");
    assert_eq!((&out[0..6], &out[6..12]), (&req[6..12], &req[0..6]));
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    assert_eq!(fold(sum(&out[14..34], 0)), 0, "IP checksum");
    assert_eq!((out[14], out[23]), (0x45, 1), "IPv4, ICMP");
    assert_eq!((addr(out, 26), addr(out, 30)), (VIP, POD));
    assert_eq!((out[34], out[35]), (3, 3), "port unreachable");
    assert_eq!(fold(sum(&out[34..], 0)), 0, "ICMP checksum");
    assert_eq!(&out[42..], &req[14..42], "the quote");
}
