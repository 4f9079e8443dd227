//! Per-endpoint budgets of conntrack and fragment entries (issue 17
//! point 7), so that one pod cannot flush every other pod's state out of
//! the node-wide LRU tables (256k UDP packets with varying ports would).
//!
//! Only what a pod keeps open counts: an entry of a closing or closed TCP
//! connection is released when it closes (`charged`).
//!
//! Every new entry is charged to the endpoint that caused it: for its
//! egress, the pod itself; for ingress, the sending pod when it is one of
//! this node's (its address is in `ENDPOINTS`), else the receiving pod. So
//! a flood between two local pods charges the sender twice (its egress and
//! the receiver's ingress entry) and never the receiver. The charge is kept
//! in `CT_CHARGE` (by endpoint id): the kernel adds one per entry it writes
//! (an atomic add, new flows only), and the agent's conntrack GC sets it to
//! the number of that endpoint's live entries on every pass (entries the
//! LRU evicted or that expired stop counting then, not before).
//!
//! Over budget, a new flow whose entry verdicts depend on (`needed`) is
//! dropped as `conntrack-budget` (counted and reported); one whose later
//! packets and replies pass without it (both directions unenforced, or
//! traffic with the pod's own node) passes unrecorded; a first fragment is
//! not recorded (its later fragments are judged as untracked ones). Either
//! way the pod only spends its own budget: other pods' entries stay.
use crate::{
    conntrack::{TCP_CLOSE, TCP_FIN_WAIT},
    decision::opposite,
    reason, EndpointInfo, PROTO_TCP,
};

/// Conntrack entries one endpoint may hold (default): an eighth of the
/// default table (`sizes::CONNTRACK`), so at least eight pods are needed
/// to fill it. A client making a new UDP flow per DNS lookup (each lives
/// 60 s) fits at 1,000 lookups/s.
pub const ENTRIES: u32 = 64 * 1024;
/// Fragment records one endpoint may hold (default): an eighth of the table.
pub const FRAGMENTS: u32 = 1024;

/// The budget in force (`CT_BUDGET[0]`); zero fields mean the defaults,
/// `u32::MAX` no limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtBudget {
    pub entries: u32,
    pub fragments: u32,
}

impl CtBudget {
    pub const UNLIMITED: CtBudget = CtBudget {
        entries: u32::MAX,
        fragments: u32::MAX,
    };

    /// The limit for conntrack entries (`fragments` false) or fragment
    /// records.
    #[inline(always)]
    pub fn limit(&self, fragments: bool) -> u32 {
        let (v, d) = if fragments {
            (self.fragments, FRAGMENTS)
        } else {
            (self.entries, ENTRIES)
        };
        if v == 0 {
            d
        } else {
            v
        }
    }
}

/// `CT_CHARGE` value: what one endpoint holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtCharge {
    /// u64: the BPF target has 64-bit atomics only.
    pub entries: u64,
    pub fragments: u64,
}

/// The endpoint a new entry made on `endpoint_id`'s interface in `scope`
/// is charged to: for ingress, the sending pod when it is on this node
/// (`local_sender` finds the endpoint id holding an address), else the
/// interface's own endpoint. The kernel charges by it, the GC recounts by
/// it.
#[inline(always)]
pub fn charged_to<A>(
    endpoint_id: u32,
    scope: u8,
    saddr: A,
    local_sender: impl FnOnce(A) -> Option<u32>,
) -> u32 {
    if scope == crate::DIR_INGRESS {
        if let Some(id) = local_sender(saddr) {
            return id;
        }
    }
    endpoint_id
}

/// Whether `n` more entries fit when `charged` are held under `limit`.
/// A charge above `i64::MAX` is one that two CPUs releasing the same last
/// entry took below zero: it counts as none (the GC writes the truth).
#[inline(always)]
pub fn fits(charged: u64, n: u64, limit: u32) -> bool {
    let charged = if charged > i64::MAX as u64 {
        0
    } else {
        charged
    };
    limit == u32::MAX || charged.saturating_add(n) <= limit as u64
}

/// Whether an entry in this state counts against its endpoint's budget:
/// a closing or closed TCP connection does not (the kernel releases its
/// charge when it closes). Short connections would otherwise hold a busy
/// client's budget for the closing timeouts (10 s after a close at 12k
/// connections/s is 120k entries), while what it may keep open is what
/// the budget is about.
#[inline(always)]
pub fn charged(protocol: u8, tcp_state: u8) -> bool {
    !(protocol == PROTO_TCP && (tcp_state == TCP_FIN_WAIT || tcp_state == TCP_CLOSE))
}

/// Whether the verdicts on a flow of `ep` admitted in `scope` with `why`
/// depend on its conntrack entry: they do when replies cross an enforced
/// direction (they would be judged as new flows of the peer and denied).
/// Traffic with the pod's own node passes both ways without one, and so
/// does everything of a pod enforced in neither direction; in the
/// scope's own direction later packets are judged again as new ones, with
/// the same result.
///
/// Under host protection (`EP_HOST_PROTECTED`) every ingress flow needs
/// its entry: replies to the node would otherwise be judged as new flows
/// to it, on ports it does not list.
#[inline(always)]
pub fn needed(ep: &EndpointInfo, scope: u8, why: u8) -> bool {
    if scope == crate::DIR_INGRESS && ep.flags & crate::EP_HOST_PROTECTED != 0 {
        return true;
    }
    why != reason::HOST && ep.enforced(opposite(scope))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ENFORCED, EP_INGRESS_ENFORCED};

    fn ep(flags: u32) -> EndpointInfo {
        EndpointInfo {
            endpoint_id: 1,
            identity: 300,
            ipv4: 0,
            flags,
            generation: 0,
            mac: [0; 6],
            _pad: [0; 2],
            ipv6: [0; 4],
        }
    }

    #[test]
    fn defaults_and_unlimited() {
        let b = CtBudget::default();
        assert_eq!((b.limit(false), b.limit(true)), (ENTRIES, FRAGMENTS));
        let u = CtBudget::UNLIMITED;
        assert!(fits(u64::MAX - 1, 5, u.limit(false)));
        let b = CtBudget {
            entries: 2,
            fragments: 0,
        };
        assert!(fits(0, 2, b.limit(false)));
        assert!(!fits(1, 2, b.limit(false)));
        assert!(!fits(2, 1, b.limit(false)));
        // Taken below zero by a race: counts as nothing held.
        assert!(fits(u64::MAX, 1, 7));
        assert!(!fits(7, 1, 7));
    }

    #[test]
    fn ingress_is_charged_to_a_local_sender_else_to_the_receiver() {
        use crate::{DIR_EGRESS, DIR_INGRESS};
        let local = |a: u32| (a == 7).then_some(42);
        assert_eq!(charged_to(1, DIR_INGRESS, 7, local), 42);
        assert_eq!(charged_to(1, DIR_INGRESS, 8, local), 1);
        assert_eq!(charged_to(1, DIR_EGRESS, 7, local), 1);
    }

    #[test]
    fn closing_connections_are_not_charged() {
        use crate::conntrack::{TCP_ESTABLISHED, TCP_SYN_SENT};
        assert!(charged(PROTO_TCP, TCP_SYN_SENT));
        assert!(charged(PROTO_TCP, TCP_ESTABLISHED));
        assert!(!charged(PROTO_TCP, TCP_FIN_WAIT));
        assert!(!charged(PROTO_TCP, TCP_CLOSE));
        assert!(charged(crate::PROTO_UDP, TCP_CLOSE));
    }

    #[test]
    fn an_entry_is_needed_where_replies_cross_an_enforced_direction() {
        let both = ep(EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED);
        let ingress_only = ep(EP_INGRESS_ENFORCED);
        let none = ep(0);
        assert!(needed(&both, DIR_EGRESS, reason::POLICY_ALLOW));
        assert!(needed(&ingress_only, DIR_EGRESS, reason::UNENFORCED));
        assert!(!needed(&ingress_only, DIR_INGRESS, reason::POLICY_ALLOW));
        assert!(!needed(&none, DIR_EGRESS, reason::UNENFORCED));
        assert!(!needed(&none, DIR_INGRESS, reason::UNENFORCED));
        assert!(!needed(&both, DIR_EGRESS, reason::HOST));
    }
}
