//! The connection-tracking state machine, as plain functions so the kernel
//! programs and the userspace reference evaluator share one definition and
//! it has host unit tests.

use crate::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

pub const TCP_NONE: u8 = 0;
pub const TCP_SYN_SENT: u8 = 1;
pub const TCP_SYN_RECV: u8 = 2;
pub const TCP_ESTABLISHED: u8 = 3;
pub const TCP_FIN_WAIT: u8 = 4;
pub const TCP_CLOSE: u8 = 5;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

const SEC: u64 = 1_000_000_000;
pub const TIMEOUT_TCP_HANDSHAKE_NS: u64 = 60 * SEC;
pub const TIMEOUT_TCP_ESTABLISHED_NS: u64 = 6 * 3600 * SEC;
pub const TIMEOUT_TCP_FIN_NS: u64 = 60 * SEC;
pub const TIMEOUT_TCP_CLOSE_NS: u64 = 10 * SEC;
pub const TIMEOUT_UDP_NS: u64 = 60 * SEC;
pub const TIMEOUT_ICMP_NS: u64 = 30 * SEC;
pub const TIMEOUT_OTHER_NS: u64 = 60 * SEC;

/// Next TCP state after a packet with `flags`; `reply` is true when the
/// packet travels against the direction that opened the flow.
#[inline(always)]
pub fn tcp_next_state(state: u8, flags: u8, reply: bool) -> u8 {
    if flags & TCP_FLAG_RST != 0 {
        return TCP_CLOSE;
    }
    if flags & TCP_FLAG_FIN != 0 {
        return if state == TCP_CLOSE {
            TCP_CLOSE
        } else {
            TCP_FIN_WAIT
        };
    }
    let syn = flags & TCP_FLAG_SYN != 0;
    let ack = flags & TCP_FLAG_ACK != 0;
    match state {
        TCP_NONE | TCP_CLOSE if syn && !ack && !reply => TCP_SYN_SENT,
        // A flow picked up mid-stream (e.g. after the agent restarted with an
        // empty table) is treated as established once policy admitted it.
        TCP_NONE if !syn => TCP_ESTABLISHED,
        TCP_SYN_SENT if syn && ack && reply => TCP_SYN_RECV,
        TCP_SYN_SENT | TCP_SYN_RECV if ack && !syn => TCP_ESTABLISHED,
        s => s,
    }
}

/// A SYN without ACK: the segment that opens a connection.
#[inline(always)]
pub fn tcp_opens(flags: u8) -> bool {
    flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

/// A SYN on an established, closing or closed entry starts a new
/// connection that must be checked against policy again instead of riding
/// on the old verdict (a retransmitted SYN during the handshake does not).
#[inline(always)]
pub fn tcp_reopens(state: u8, flags: u8) -> bool {
    tcp_opens(flags) && (state == TCP_ESTABLISHED || state == TCP_CLOSE || state == TCP_FIN_WAIT)
}

/// How long an entry lives after the last packet that refreshed it.
#[inline(always)]
pub fn timeout_ns(protocol: u8, tcp_state: u8) -> u64 {
    match protocol {
        PROTO_TCP => match tcp_state {
            TCP_ESTABLISHED => TIMEOUT_TCP_ESTABLISHED_NS,
            TCP_FIN_WAIT => TIMEOUT_TCP_FIN_NS,
            TCP_CLOSE => TIMEOUT_TCP_CLOSE_NS,
            _ => TIMEOUT_TCP_HANDSHAKE_NS,
        },
        PROTO_UDP => TIMEOUT_UDP_NS,
        PROTO_ICMP => TIMEOUT_ICMP_NS,
        _ => TIMEOUT_OTHER_NS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_way_handshake_then_close() {
        let s = tcp_next_state(TCP_NONE, TCP_FLAG_SYN, false);
        assert_eq!(s, TCP_SYN_SENT);
        let s = tcp_next_state(s, TCP_FLAG_SYN | TCP_FLAG_ACK, true);
        assert_eq!(s, TCP_SYN_RECV);
        let s = tcp_next_state(s, TCP_FLAG_ACK, false);
        assert_eq!(s, TCP_ESTABLISHED);
        let s = tcp_next_state(s, TCP_FLAG_ACK, true);
        assert_eq!(s, TCP_ESTABLISHED);
        let s = tcp_next_state(s, TCP_FLAG_FIN | TCP_FLAG_ACK, false);
        assert_eq!(s, TCP_FIN_WAIT);
        let s = tcp_next_state(s, TCP_FLAG_RST, true);
        assert_eq!(s, TCP_CLOSE);
    }

    #[test]
    fn syn_ack_from_the_originator_does_not_advance() {
        assert_eq!(
            tcp_next_state(TCP_SYN_SENT, TCP_FLAG_SYN | TCP_FLAG_ACK, false),
            TCP_SYN_SENT
        );
    }

    #[test]
    fn midstream_pickup_is_established() {
        assert_eq!(
            tcp_next_state(TCP_NONE, TCP_FLAG_ACK, false),
            TCP_ESTABLISHED
        );
    }

    #[test]
    fn syn_on_closed_entry_reopens() {
        assert!(tcp_reopens(TCP_CLOSE, TCP_FLAG_SYN));
        assert!(tcp_reopens(TCP_FIN_WAIT, TCP_FLAG_SYN));
        assert!(tcp_reopens(TCP_ESTABLISHED, TCP_FLAG_SYN));
        assert!(!tcp_reopens(TCP_SYN_SENT, TCP_FLAG_SYN));
        assert!(!tcp_reopens(TCP_CLOSE, TCP_FLAG_SYN | TCP_FLAG_ACK));
    }

    #[test]
    fn timeouts_follow_state() {
        assert!(timeout_ns(PROTO_TCP, TCP_ESTABLISHED) > timeout_ns(PROTO_TCP, TCP_SYN_SENT));
        assert_eq!(timeout_ns(PROTO_TCP, TCP_CLOSE), TIMEOUT_TCP_CLOSE_NS);
        assert_eq!(timeout_ns(PROTO_UDP, 0), TIMEOUT_UDP_NS);
    }
}
