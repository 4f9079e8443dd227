//! Crafted Ethernet frames: what the unit tests, the differential test and
//! the reference evaluator (`palisade-agent trace`) feed the verdict path.
//!
//! A [`Packet`] is a description (addresses, L4 header, fragment fields,
//! deliberate malformations); [`Packet::bytes`] renders the frame. The IPv4
//! total length is always filled in from what was built (before any
//! truncation) and the IPv4 header checksum is correct; L4 checksums are left
//! zero because the programs never read them.
use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use palisade_common::{PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

pub use palisade_common::conntrack::{TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN};
pub const TCP_FLAG_PSH: u8 = 0x08;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;

pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const SCTP_HLEN: usize = 12;
pub const ICMP_HLEN: usize = 8;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub use palisade_common::ipv6::{ICMPV6_NEIGHBOUR_SOLICITATION, IPPROTO_ICMPV6};
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The transport header right after the IPv4 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        icmp_type: u8,
        code: u8,
        id: u16,
        seq: u16,
    },
    /// No header: another protocol, or the data of a later fragment.
    Opaque {
        protocol: u8,
    },
}

impl L4 {
    pub fn protocol(&self) -> u8 {
        match *self {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Sctp { .. } => PROTO_SCTP,
            L4::Icmp { .. } => PROTO_ICMP,
            L4::Opaque { protocol } => protocol,
        }
    }

    /// Header length as built.
    pub fn header_len(&self) -> usize {
        match self {
            L4::Tcp { .. } => TCP_HLEN,
            L4::Udp { .. } => UDP_HLEN,
            L4::Sctp { .. } => SCTP_HLEN,
            L4::Icmp { .. } => ICMP_HLEN,
            L4::Opaque { .. } => 0,
        }
    }

    /// (source, destination) port, where the protocol has them.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match *self {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } | L4::Sctp { sport, dport } => {
                Some((sport, dport))
            }
            _ => None,
        }
    }
}

/// An IPv4 datagram (or fragment) and its transport header.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units; non-zero means a later fragment.
    pub frag_offset: u16,
    pub ttl: u8,
    pub l4: L4,
    /// Bytes of data after the L4 header.
    pub payload_len: usize,
    /// 32-bit words of (zero) IP options; IHL is 5 + this unless overridden.
    pub option_words: u8,
    /// 4 unless deliberately wrong.
    pub version: u8,
    /// IHL field (32-bit words) to write instead of the real header length.
    pub ihl_override: Option<u8>,
    /// Total length to write instead of the real one.
    pub tot_len_override: Option<u16>,
    /// TCP data offset (words); 5 unless deliberately wrong.
    pub tcp_data_offset: u8,
    /// The data after the L4 header when given (then `payload_len` is its
    /// length), else `payload_len` counting bytes.
    pub data: Option<Vec<u8>>,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            src,
            dst,
            id: 0,
            more_fragments: false,
            frag_offset: 0,
            ttl: 64,
            l4,
            payload_len: 0,
            data: None,
            option_words: 0,
            version: 4,
            ihl_override: None,
            tot_len_override: None,
            tcp_data_offset: 5,
        }
    }

    pub fn header_len(&self) -> usize {
        IPV4_HLEN + 4 * self.option_words as usize
    }

    /// Total length as the header says it.
    pub fn tot_len(&self) -> u16 {
        self.tot_len_override
            .unwrap_or((self.header_len() + self.l4.header_len() + self.payload_len) as u16)
    }

    fn write(&self, out: &mut Vec<u8>) {
        let hlen = self.header_len();
        let ihl = self.ihl_override.unwrap_or((hlen / 4) as u8);
        let start = out.len();
        out.push((self.version << 4) | (ihl & 0x0f));
        out.push(0);
        out.extend_from_slice(&self.tot_len().to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        let frag = (if self.more_fragments { 0x2000 } else { 0 }) | (self.frag_offset & 0x1fff);
        out.extend_from_slice(&frag.to_be_bytes());
        out.push(self.ttl);
        out.push(self.l4.protocol());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.src.octets());
        out.extend_from_slice(&self.dst.octets());
        out.resize(start + hlen, 0);
        let sum = checksum(&out[start..start + hlen]);
        out[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());

        match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&1u32.to_be_bytes()); // seq
                out.extend_from_slice(&0u32.to_be_bytes()); // ack
                out.push(self.tcp_data_offset << 4);
                out.push(flags);
                out.extend_from_slice(&64240u16.to_be_bytes());
                out.extend_from_slice(&[0, 0, 0, 0]); // check, urg
            }
            L4::Udp { sport, dport } => {
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&((UDP_HLEN + self.payload_len) as u16).to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            L4::Sctp { sport, dport } => {
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&[0; 8]); // verification tag, checksum
            }
            L4::Icmp {
                icmp_type,
                code,
                id,
                seq,
            } => {
                out.extend_from_slice(&[icmp_type, code, 0, 0]);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
            }
            L4::Opaque { .. } => {}
        }
        match &self.data {
            Some(d) => out.extend_from_slice(d),
            None => out.extend((0..self.payload_len).map(|i| i as u8)),
        }
    }
}

/// What follows the Ethernet header.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum L3 {
    Ipv4(Ipv4),
    /// A fixed IPv6 header followed by `payload` (no extension headers
    /// unless `payload` contains them).
    Ipv6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        next_header: u8,
        /// 255 unless set (what neighbour discovery must carry).
        hop_limit: u8,
        payload: Vec<u8>,
    },
    Arp {
        op: u16,
        sender: Ipv4Addr,
        target: Ipv4Addr,
    },
    /// Any other ethertype, followed by `payload_len` zero bytes.
    Other {
        ether_type: u16,
        payload_len: usize,
    },
}

/// One crafted frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Packet {
    pub l3: L3,
    /// Ethernet addresses (the ARP sender hardware address is `src_mac`).
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Cut the rendered frame to this many bytes (truncated headers).
    /// BPF_PROG_TEST_RUN refuses frames shorter than 14 bytes.
    pub truncate: Option<usize>,
}

impl Packet {
    pub fn new(l3: L3) -> Self {
        Self {
            l3,
            src_mac: SRC_MAC,
            dst_mac: DST_MAC,
            truncate: None,
        }
    }

    fn v4(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self::new(L3::Ipv4(Ipv4::new(src, dst, l4)))
    }

    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Self {
        Self::v4(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self::v4(src, dst, L4::Udp { sport, dport }).with_payload(32)
    }

    pub fn sctp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self::v4(src, dst, L4::Sctp { sport, dport }).with_payload(16)
    }

    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Self {
        Self::icmp(src, dst, ICMP_ECHO_REQUEST, 0, id, seq).with_payload(56)
    }

    pub fn icmp_echo_reply(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Self {
        Self::icmp(src, dst, ICMP_ECHO_REPLY, 0, id, seq).with_payload(56)
    }

    /// Any ICMP message; `id`/`seq` fill the second word (only echo
    /// messages give them meaning).
    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, icmp_type: u8, code: u8, id: u16, seq: u16) -> Self {
        Self::v4(
            src,
            dst,
            L4::Icmp {
                icmp_type,
                code,
                id,
                seq,
            },
        )
    }

    /// An IPv4 packet of another protocol (no transport header is built).
    pub fn ipv4_proto(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Self {
        Self::v4(src, dst, L4::Opaque { protocol }).with_payload(20)
    }

    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: Vec<u8>) -> Self {
        Self::new(L3::Ipv6 {
            src,
            dst,
            next_header,
            hop_limit: 255,
            payload,
        })
    }

    /// The same IPv6 packet with another hop limit (no-op for others).
    pub fn with_hop_limit(mut self, h: u8) -> Self {
        if let L3::Ipv6 { hop_limit, .. } = &mut self.l3 {
            *hop_limit = h;
        }
        self
    }

    /// An IPv6 UDP datagram.
    pub fn ipv6_udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        let mut p = Vec::with_capacity(UDP_HLEN + 8);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&((UDP_HLEN + 8) as u16).to_be_bytes());
        p.extend_from_slice(&[0; 10]);
        Self::ipv6(src, dst, PROTO_UDP, p)
    }

    /// An SCTP common header (ports, verification tag, checksum) over IPv6.
    pub fn ipv6_sctp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Self {
        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        Self::ipv6(src, dst, PROTO_SCTP, p)
    }

    /// An ICMPv6 message of `icmp_type` with `body_len` zero bytes after
    /// the 4-byte type/code/checksum word.
    pub fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, body_len: usize) -> Self {
        let mut p = vec![icmp_type, 0, 0, 0];
        p.resize(4 + body_len, 0);
        Self::ipv6(src, dst, IPPROTO_ICMPV6, p)
    }

    /// An ICMP error (`icmp_type`/`code`, e.g. 3/4 fragmentation needed)
    /// from `src` quoting `quoted`'s IPv4 datagram, to its source.
    pub fn icmp_error(src: Ipv4Addr, icmp_type: u8, code: u8, quoted: &Packet) -> Self {
        let q = quoted.ipv4().expect("icmp_error quotes an IPv4 packet");
        let data = quoted.bytes()[ETH_HLEN..].to_vec();
        // The 4 bytes after type/code/checksum: unused, next-hop MTU 1400.
        let l4 = L4::Icmp {
            icmp_type,
            code,
            id: 0,
            seq: 1400,
        };
        let mut ip = Ipv4::new(src, q.src, l4);
        ip.payload_len = data.len();
        ip.data = Some(data);
        Self::new(L3::Ipv4(ip))
    }

    /// An IPv6 TCP segment with `flags` (a 20-byte header).
    pub fn ipv6_tcp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Self {
        let mut p = Vec::with_capacity(TCP_HLEN);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        Self::ipv6(src, dst, PROTO_TCP, p).with_hop_limit(64)
    }

    /// An ICMPv6 echo request (128) or reply (129) with identifier `id`.
    pub fn icmpv6_echo(src: Ipv6Addr, dst: Ipv6Addr, icmp_type: u8, id: u16) -> Self {
        let mut p = vec![icmp_type, 0, 0, 0];
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&[0, 1]);
        Self::ipv6(src, dst, IPPROTO_ICMPV6, p).with_hop_limit(64)
    }

    /// An ICMPv6 error of `icmp_type` (e.g. 2, packet too big) from `src`
    /// quoting `quoted`'s IPv6 packet, to its source.
    pub fn icmpv6_error(src: Ipv6Addr, icmp_type: u8, quoted: &Packet) -> Self {
        let L3::Ipv6 { src: qsrc, .. } = &quoted.l3 else {
            panic!("icmpv6_error quotes an IPv6 packet");
        };
        let mut p = vec![icmp_type, 0, 0, 0, 0, 0, 0x05, 0xdc];
        p.extend_from_slice(&quoted.bytes()[ETH_HLEN..]);
        Self::ipv6(src, *qsrc, IPPROTO_ICMPV6, p).with_hop_limit(64)
    }

    /// The IPv6 packet `inner` (next header and payload) behind a fragment
    /// header: offset in 8-byte units, M flag, identification.
    pub fn ipv6_fragment(inner: &Packet, offset: u16, more: bool, id: u32) -> Self {
        let L3::Ipv6 {
            src,
            dst,
            next_header,
            payload,
            hop_limit,
        } = &inner.l3
        else {
            panic!("ipv6_fragment of an IPv6 packet");
        };
        let off = offset << 3 | more as u16;
        let mut p = vec![*next_header, 0];
        p.extend_from_slice(&off.to_be_bytes());
        p.extend_from_slice(&id.to_be_bytes());
        if offset == 0 {
            p.extend_from_slice(payload);
        } else {
            p.extend_from_slice(&[0; 16]);
        }
        Self::ipv6(*src, *dst, 44, p).with_hop_limit(*hop_limit)
    }

    /// ICMPv6 neighbour solicitation for `target`, to its solicited-node
    /// multicast address.
    pub fn neighbour_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Self {
        let t = target.octets();
        let dst = Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | t[13] as u16,
            u16::from_be_bytes([t[14], t[15]]),
        );
        let mut p = vec![ICMPV6_NEIGHBOUR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(&t);
        // Source link-layer address option.
        p.extend_from_slice(&[1, 1]);
        p.extend_from_slice(&SRC_MAC);
        Self::ipv6(src, dst, IPPROTO_ICMPV6, p)
    }

    pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Self {
        Self::new(L3::Arp {
            op: ARP_REQUEST,
            sender,
            target,
        })
    }

    pub fn arp_reply(sender: Ipv4Addr, target: Ipv4Addr) -> Self {
        Self::new(L3::Arp {
            op: ARP_REPLY,
            sender,
            target,
        })
    }

    /// A frame of another ethertype (e.g. 0x88cc LLDP, 0x8847 MPLS).
    pub fn ethertype(ether_type: u16, payload_len: usize) -> Self {
        Self::new(L3::Other {
            ether_type,
            payload_len,
        })
    }

    // ---- modifiers ----

    pub fn with_macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// As a frame of the pod with MAC `mac` in direction `dir` carries it:
    /// its source leaving the pod (egress), its destination towards it.
    pub fn at_pod_mac(self, mac: [u8; 6], dir: u8) -> Self {
        if mac == [0; 6] {
            return self;
        }
        let (src, dst) = (self.src_mac, self.dst_mac);
        if dir == palisade_common::DIR_EGRESS {
            self.with_macs(mac, dst)
        } else {
            self.with_macs(src, mac)
        }
    }

    pub fn ipv4(&self) -> Option<&Ipv4> {
        match &self.l3 {
            L3::Ipv4(ip) => Some(ip),
            _ => None,
        }
    }

    pub fn ipv4_mut(&mut self) -> Option<&mut Ipv4> {
        match &mut self.l3 {
            L3::Ipv4(ip) => Some(ip),
            _ => None,
        }
    }

    fn map_v4(mut self, f: impl FnOnce(&mut Ipv4)) -> Self {
        if let Some(ip) = self.ipv4_mut() {
            f(ip);
        }
        self
    }

    /// Bytes of data after the transport header (IPv4 only).
    pub fn with_payload(self, len: usize) -> Self {
        self.map_v4(|ip| ip.payload_len = len)
    }

    pub fn with_id(self, id: u16) -> Self {
        self.map_v4(|ip| ip.id = id)
    }

    pub fn with_src(self, src: Ipv4Addr) -> Self {
        self.map_v4(|ip| ip.src = src)
    }

    pub fn with_dst(self, dst: Ipv4Addr) -> Self {
        self.map_v4(|ip| ip.dst = dst)
    }

    /// New TCP flags (no effect on other protocols).
    pub fn with_tcp_flags(self, f: u8) -> Self {
        self.map_v4(|ip| {
            if let L4::Tcp { flags, .. } = &mut ip.l4 {
                *flags = f;
            }
        })
    }

    /// The first fragment of datagram `id`: offset 0 with More Fragments.
    pub fn first_fragment(self, id: u16) -> Self {
        self.map_v4(|ip| {
            ip.id = id;
            ip.more_fragments = true;
            ip.frag_offset = 0;
        })
    }

    /// A later fragment of datagram `id` at `offset` (8-byte units, > 0):
    /// same addresses and protocol, no transport header, `more` for MF.
    pub fn later_fragment(self, id: u16, offset: u16, more: bool) -> Self {
        self.map_v4(|ip| {
            ip.id = id;
            ip.more_fragments = more;
            ip.frag_offset = offset;
            ip.l4 = L4::Opaque {
                protocol: ip.l4.protocol(),
            };
            ip.payload_len = 24;
        })
    }

    /// `words` 32-bit words of IP options (a longer, valid header).
    pub fn with_ip_options(self, words: u8) -> Self {
        self.map_v4(|ip| ip.option_words = words)
    }

    /// Write `ihl` into the IHL field whatever the real header length.
    pub fn with_ihl(self, ihl: u8) -> Self {
        self.map_v4(|ip| ip.ihl_override = Some(ihl))
    }

    pub fn with_ip_version(self, version: u8) -> Self {
        self.map_v4(|ip| ip.version = version)
    }

    pub fn with_tot_len(self, tot_len: u16) -> Self {
        self.map_v4(|ip| ip.tot_len_override = Some(tot_len))
    }

    pub fn with_tcp_data_offset(self, words: u8) -> Self {
        self.map_v4(|ip| ip.tcp_data_offset = words)
    }

    /// Cut the frame to `len` bytes.
    pub fn truncated(mut self, len: usize) -> Self {
        self.truncate = Some(len);
        self
    }

    /// Cut the frame `n` bytes short of what was built.
    pub fn short_by(self, n: usize) -> Self {
        let len = self.full_len().saturating_sub(n);
        self.truncated(len)
    }

    /// The answer to this packet: addresses and ports swapped, an echo
    /// request becomes an echo reply, TCP carries `tcp_flags`. Fragment
    /// fields and malformations are reset; the payload length is kept.
    pub fn reply(&self, tcp_flags: u8) -> Self {
        if let L3::Ipv6 {
            src,
            dst,
            next_header,
            hop_limit,
            payload,
        } = &self.l3
        {
            // Addresses and ports swapped (TCP, UDP, SCTP: ports first).
            let mut payload = payload.clone();
            if matches!(*next_header, PROTO_TCP | PROTO_UDP | PROTO_SCTP) && payload.len() >= 4 {
                let (a, b) = ([payload[0], payload[1]], [payload[2], payload[3]]);
                payload[0..2].copy_from_slice(&b);
                payload[2..4].copy_from_slice(&a);
                if *next_header == PROTO_TCP && payload.len() > 13 {
                    payload[13] = tcp_flags;
                }
            }
            return Self::ipv6(*dst, *src, *next_header, payload).with_hop_limit(*hop_limit);
        }
        let Some(ip) = self.ipv4() else {
            return self.clone();
        };
        let l4 = match ip.l4 {
            L4::Tcp { sport, dport, .. } => L4::Tcp {
                sport: dport,
                dport: sport,
                flags: tcp_flags,
            },
            L4::Udp { sport, dport } => L4::Udp {
                sport: dport,
                dport: sport,
            },
            L4::Sctp { sport, dport } => L4::Sctp {
                sport: dport,
                dport: sport,
            },
            L4::Icmp {
                icmp_type,
                code,
                id,
                seq,
            } => L4::Icmp {
                icmp_type: if icmp_type == ICMP_ECHO_REQUEST {
                    ICMP_ECHO_REPLY
                } else {
                    icmp_type
                },
                code,
                id,
                seq,
            },
            other => other,
        };
        let mut r = Ipv4::new(ip.dst, ip.src, l4);
        r.payload_len = ip.payload_len;
        Self::new(L3::Ipv4(r))
    }

    fn full_len(&self) -> usize {
        self.render().len()
    }

    fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        match &self.l3 {
            L3::Ipv4(ip) => {
                out.extend_from_slice(&ETH_P_IP.to_be_bytes());
                ip.write(&mut out);
            }
            L3::Ipv6 {
                src,
                dst,
                next_header,
                hop_limit,
                payload,
            } => {
                out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                out.push(*next_header);
                out.push(*hop_limit);
                out.extend_from_slice(&src.octets());
                out.extend_from_slice(&dst.octets());
                out.extend_from_slice(payload);
            }
            L3::Arp { op, sender, target } => {
                out.extend_from_slice(&ETH_P_ARP.to_be_bytes());
                out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
                out.extend_from_slice(&op.to_be_bytes());
                out.extend_from_slice(&self.src_mac);
                out.extend_from_slice(&sender.octets());
                out.extend_from_slice(&[0; 6]);
                out.extend_from_slice(&target.octets());
            }
            L3::Other {
                ether_type,
                payload_len,
            } => {
                out.extend_from_slice(&ether_type.to_be_bytes());
                out.resize(out.len() + payload_len, 0);
            }
        }
        out
    }

    /// The frame as the program sees it.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = self.render();
        if let Some(n) = self.truncate {
            out.truncate(n);
        }
        out
    }
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn tcp_flags_str(flags: u8) -> String {
    let names = [
        (TCP_FLAG_SYN, 'S'),
        (TCP_FLAG_ACK, 'A'),
        (TCP_FLAG_FIN, 'F'),
        (TCP_FLAG_RST, 'R'),
        (TCP_FLAG_PSH, 'P'),
    ];
    let s: String = names
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, c)| *c)
        .collect();
    if s.is_empty() {
        ".".into()
    } else {
        s
    }
}

/// One line, e.g. `tcp 10.0.0.1:40000 > 10.0.0.2:80 [S] id=7 MF`.
impl fmt::Display for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.l3 {
            L3::Ipv4(ip) => {
                let (s, d) = (ip.src, ip.dst);
                match ip.l4 {
                    L4::Tcp {
                        sport,
                        dport,
                        flags,
                    } => write!(
                        f,
                        "tcp {s}:{sport} > {d}:{dport} [{}]",
                        tcp_flags_str(flags)
                    )?,
                    L4::Udp { sport, dport } => write!(f, "udp {s}:{sport} > {d}:{dport}")?,
                    L4::Sctp { sport, dport } => write!(f, "sctp {s}:{sport} > {d}:{dport}")?,
                    L4::Icmp {
                        icmp_type,
                        code,
                        id,
                        seq,
                    } => write!(
                        f,
                        "icmp {s} > {d} type={icmp_type} code={code} id={id} seq={seq}"
                    )?,
                    L4::Opaque { protocol } => write!(f, "ip proto={protocol} {s} > {d}")?,
                }
                if ip.id != 0 {
                    write!(f, " id={}", ip.id)?;
                }
                if ip.more_fragments {
                    write!(f, " MF")?;
                }
                if ip.frag_offset != 0 {
                    write!(f, " off={}", ip.frag_offset)?;
                }
                if ip.payload_len != 0 {
                    write!(f, " len={}", ip.payload_len)?;
                }
                if ip.option_words != 0 {
                    write!(f, " opts={}w", ip.option_words)?;
                }
                if ip.version != 4 {
                    write!(f, " version={}", ip.version)?;
                }
                if let Some(v) = ip.ihl_override {
                    write!(f, " ihl={v}")?;
                }
                if let Some(v) = ip.tot_len_override {
                    write!(f, " tot_len={v}")?;
                }
                if ip.tcp_data_offset != 5 && matches!(ip.l4, L4::Tcp { .. }) {
                    write!(f, " doff={}", ip.tcp_data_offset)?;
                }
            }
            L3::Ipv6 {
                src,
                dst,
                next_header,
                hop_limit,
                payload,
            } => {
                write!(f, "ipv6 {src} > {dst} nh={next_header} hlim={hop_limit}")?;
                if *next_header == IPPROTO_ICMPV6 {
                    if let Some(t) = payload.first() {
                        write!(f, " icmpv6 type={t}")?;
                    }
                }
            }
            L3::Arp { op, sender, target } => write!(f, "arp op={op} {sender} > {target}")?,
            L3::Other {
                ether_type,
                payload_len,
            } => write!(f, "ethertype {ether_type:#06x} len={payload_len}")?,
        }
        if let Some(n) = self.truncate {
            write!(f, " truncated to {n}B")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn tcp_frame_layout() {
        let b = Packet::tcp(A, 40000, B, 80, TCP_FLAG_SYN).bytes();
        assert_eq!(b.len(), ETH_HLEN + IPV4_HLEN + TCP_HLEN);
        assert_eq!(&b[12..14], &[0x08, 0x00]);
        assert_eq!(b[14], 0x45);
        assert_eq!(u16::from_be_bytes([b[16], b[17]]), 40);
        assert_eq!(b[23], PROTO_TCP);
        assert_eq!(&b[26..30], &A.octets());
        assert_eq!(u16::from_be_bytes([b[34], b[35]]), 40000);
        assert_eq!(u16::from_be_bytes([b[36], b[37]]), 80);
        assert_eq!(b[46], 0x50);
        assert_eq!(b[47], TCP_FLAG_SYN);
        // A correct header checksum sums to zero.
        assert_eq!(checksum(&b[14..34]), 0);
    }

    #[test]
    fn fragments_and_malformations() {
        let f = Packet::udp(A, 1, B, 2).first_fragment(7).bytes();
        assert_eq!(u16::from_be_bytes([f[20], f[21]]), 0x2000);
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 7);
        let l = Packet::udp(A, 1, B, 2).later_fragment(7, 5, false).bytes();
        assert_eq!(u16::from_be_bytes([l[20], l[21]]), 5);
        assert_eq!(l[23], PROTO_UDP);
        assert_eq!(l.len(), ETH_HLEN + IPV4_HLEN + 24);
        let t = Packet::tcp(A, 1, B, 2, 0).short_by(4);
        assert_eq!(t.bytes().len(), ETH_HLEN + IPV4_HLEN + TCP_HLEN - 4);
        // Total length still says what was built.
        assert_eq!(u16::from_be_bytes([t.bytes()[16], t.bytes()[17]]), 40);
        assert_eq!(Packet::tcp(A, 1, B, 2, 0).with_ihl(3).bytes()[14], 0x43);
        let o = Packet::tcp(A, 1, B, 2, 0).with_ip_options(2).bytes();
        assert_eq!(o[14], 0x47);
        assert_eq!(u16::from_be_bytes([o[16], o[17]]), 48);
    }

    #[test]
    fn reply_swaps_the_tuple() {
        let p = Packet::tcp(A, 40000, B, 80, TCP_FLAG_SYN);
        assert_eq!(
            p.reply(TCP_FLAG_SYN | TCP_FLAG_ACK),
            Packet::tcp(B, 80, A, 40000, 0x12)
        );
        let e = Packet::icmp_echo(A, B, 9, 1).reply(0);
        assert_eq!(e, Packet::icmp_echo_reply(B, A, 9, 1));
    }

    #[test]
    fn other_frames() {
        let ns = Packet::neighbour_solicitation(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST).bytes();
        assert_eq!(&ns[12..14], &[0x86, 0xdd]);
        assert_eq!(ns[ETH_HLEN + 6], IPPROTO_ICMPV6);
        assert_eq!(ns[ETH_HLEN + IPV6_HLEN], ICMPV6_NEIGHBOUR_SOLICITATION);
        assert_eq!(Packet::arp_request(A, B).bytes().len(), 42);
        assert_eq!(Packet::ethertype(0x88cc, 10).bytes().len(), 24);
    }
}
