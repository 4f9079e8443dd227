//! DNS answers held for the agent (egress by domain name, issue 16).
//!
//! A pod that a `domainNames` rule selects (`EP_DNS_SNOOP`) gets its DNS
//! answers only after the agent has learned the addresses in them: the
//! to-pod program copies each UDP datagram, and each TCP segment with
//! payload, that comes from a cluster DNS server (`DNS_SERVERS`: its pods'
//! and Services' address, port and protocol, written by the agent) into
//! `DNS_HELD` and drops it. The agent parses the copy, programs what it
//! learned, then sends the frame to the pod itself (an AF_PACKET socket
//! that bypasses tc, so the frame is not held twice). A frame the ring
//! cannot take, or too large to copy, goes on unheld and is counted: the
//! pod then gets an answer whose addresses may not be allowed yet, which
//! fails closed (the connection is dropped), never open.

/// Bytes of a frame a held record carries (Ethernet header included): a
/// 1500-byte MTU frame with room to spare. A power of two: the program
/// bounds the copy's length by masking with `HELD_DATA - 1`.
pub const HELD_DATA: usize = 2048;

/// One held frame in `DNS_HELD`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsHeld {
    /// The host-side veth the frame was on its way out of.
    pub ifindex: u32,
    /// Bytes of `data` in use: the whole frame.
    pub len: u32,
    pub data: [u8; HELD_DATA],
}

/// `DNS_SERVERS` key: where cluster DNS answers come from, as the to-pod
/// program sees them before a Service reply is translated back (a DNS pod's
/// address and port) and after (a ClusterIP and the Service port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsServerKey {
    pub addr: u32,
    pub port_be: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// `DNS_SERVERS6` key: [`DnsServerKey`] for IPv6 sources.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsServerKey6 {
    pub addr: crate::Ip6,
    pub port_be: u16,
    pub protocol: u8,
    pub _pad: u8,
}

impl DnsServerKey6 {
    pub fn new(addr: crate::Ip6, port: u16, protocol: u8) -> Self {
        Self {
            addr,
            port_be: port.to_be(),
            protocol,
            _pad: 0,
        }
    }
}

impl DnsServerKey {
    pub fn new(addr: u32, port: u16, protocol: u8) -> Self {
        Self {
            addr,
            port_be: port.to_be(),
            protocol,
            _pad: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_what_the_kernel_reads() {
        assert_eq!(core::mem::size_of::<DnsHeld>(), 8 + 2048);
        assert_eq!(core::mem::size_of::<DnsServerKey>(), 8);
        assert_eq!(core::mem::size_of::<DnsServerKey6>(), 20);
        let k = DnsServerKey::new(u32::from_ne_bytes([10, 0, 0, 10]), 53, 17);
        assert_eq!(k.port_be.to_ne_bytes(), [0, 53]);
    }
}
