//! Packet header layouts and the one bounds-checked accessor every read goes
//! through. Only the fields palisade reads are named.

use core::mem::size_of;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type_be: u16,
}

/// An ARP header up to the sender's addresses (offset 14 of the sender
/// protocol address is not 4-aligned: bytes).
#[repr(C)]
pub struct ArpHdr {
    pub htype_be: u16,
    pub ptype_be: u16,
    pub hlen: u8,
    pub plen: u8,
    pub op_be: u16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// The fixed IPv6 header.
#[repr(C)]
pub struct Ipv6Hdr {
    pub ver_tc_flow: u32,
    pub payload_len_be: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}
pub const IPV6_HLEN: usize = 40;

pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;

/// First 14 bytes of a TCP header: ports, seq, ack, data offset, flags.
#[repr(C)]
pub struct TcpHdr {
    pub sport_be: u16,
    pub dport_be: u16,
    pub seq: u32,
    pub ack: u32,
    pub doff_res: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg: u16,
}
pub const TCP_MIN_HLEN: usize = 20;

/// UDP header, and the port half of SCTP's common header (same offsets).
#[repr(C)]
pub struct PortsHdr {
    pub sport_be: u16,
    pub dport_be: u16,
    pub len_or_vtag_hi: u16,
    pub check_or_vtag_lo: u16,
}
pub const SCTP_COMMON_HLEN: usize = 12;

#[repr(C)]
pub struct IcmpHdr {
    pub icmp_type: u8,
    pub code: u8,
    pub check: u16,
    pub id_be: u16,
    pub seq_be: u16,
}
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// A pointer to a `T` at `off` bytes into the packet, if all of it lies
/// before `end`. The only way the programs read packet memory.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, off: usize) -> Option<*const T> {
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// True when `len` bytes starting at `off` lie inside the packet.
#[inline(always)]
pub fn has_bytes(start: usize, end: usize, off: usize, len: usize) -> bool {
    start + off + len <= end
}

/// The IPv4 source of an Ethernet frame, for the XDP prefilter.
#[inline(always)]
pub fn ipv4_saddr(start: usize, end: usize) -> Option<u32> {
    let eth = ptr_at::<EthHdr>(start, end, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type_be }) != ETH_P_IP {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr>(start, end, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    Some(unsafe { (*ip).saddr })
}
