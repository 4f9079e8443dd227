//! Per-endpoint rate limit of verdict events, so that one pod flooding
//! denied packets (or new flows) cannot fill the shared `EVENTS` ring and
//! hide other pods' verdicts from the flow log.
//!
//! Each endpoint (per CPU: the state lives in a per-CPU LRU hash, so the
//! fast path never bounces a cache line between CPUs and needs no atomics)
//! may emit `drops` drop events and `flows` other events (new flows) per
//! one-second window. Events over the budget are not written; they are
//! counted in the endpoint's state, with the set of drop reasons, and that
//! count is carried on the next event the endpoint emits on that CPU (drop
//! or new flow): its `suppressed_*` fields say how many events of the same
//! endpoint were left out before it. Carrying on the next event (rather
//! than emitting a summary when the window refills) costs no extra ring
//! record and no timer; the price is that the count of a flood that stops
//! completely waits for the endpoint's next event.
//!
//! The packet verdict itself is never affected: only the record of it.
use crate::{reason, FlowEvent};

pub const WINDOW_NS: u64 = 1_000_000_000;
/// Drop events per endpoint, per CPU, per window (default).
pub const DROP_EVENTS: u32 = 128;
/// Other events (new flows, replies judged new) per endpoint, per CPU,
/// per window (default). Larger: a busy client opens many flows.
pub const FLOW_EVENTS: u32 = 1024;

/// The budget in force (`EVENT_BUDGET[0]`); zero fields mean the defaults
/// above, `u32::MAX` means no limit (tests that compare every event).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub drops: u32,
    pub flows: u32,
}

impl EventBudget {
    pub const UNLIMITED: EventBudget = EventBudget {
        drops: u32::MAX,
        flows: u32::MAX,
    };

    #[inline(always)]
    fn resolved(&self) -> (u32, u32) {
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        (or(self.drops, DROP_EVENTS), or(self.flows, FLOW_EVENTS))
    }
}

/// Key of `EVENT_LIMIT`: the endpoint and its interface, so a reused
/// ifindex or endpoint id starts with a fresh budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventLimitKey {
    pub ifindex: u32,
    pub endpoint_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventLimitState {
    pub window_start_ns: u64,
    /// Events emitted in the current window.
    pub drops: u32,
    pub flows: u32,
    /// Left out since the last emitted event (carried on the next).
    pub suppressed_drops: u32,
    pub suppressed_flows: u32,
    /// Bit `r` set: a drop with reason `r` was left out.
    pub suppressed_reasons: u64,
}

/// What an emitted event carries about the events left out before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carry {
    pub drops: u32,
    pub flows: u32,
    pub reasons: u64,
}

impl Carry {
    #[inline(always)]
    pub fn apply4(&self, e: &mut crate::FlowEvent4) {
        e.suppressed_drops = self.drops;
        e.suppressed_flows = self.flows;
        e.suppressed_reasons = self.reasons;
    }

    /// # Safety
    /// `e` is valid for writes.
    #[inline(always)]
    pub unsafe fn apply(&self, e: *mut FlowEvent) {
        // SAFETY: as the caller promised.
        unsafe {
            (*e).suppressed_drops = self.drops;
            (*e).suppressed_flows = self.flows;
            (*e).suppressed_reasons = self.reasons;
        }
    }
}

/// Account one event of reason `r` at `now`: `Some(carry)` when it may be
/// emitted (the state's suppressed counts move into `carry`), `None` when
/// it is over the budget (counted in the state instead).
#[inline(always)]
pub fn admit(s: &mut EventLimitState, budget: &EventBudget, now: u64, r: u8) -> Option<Carry> {
    let (max_drops, max_flows) = budget.resolved();
    if now.wrapping_sub(s.window_start_ns) >= WINDOW_NS {
        s.window_start_ns = now;
        s.drops = 0;
        s.flows = 0;
    }
    let drop = reason::is_drop(r);
    if drop {
        if s.drops >= max_drops {
            s.suppressed_drops = s.suppressed_drops.saturating_add(1);
            s.suppressed_reasons |= 1u64 << (r & 63);
            return None;
        }
        s.drops += 1;
    } else {
        if s.flows >= max_flows {
            s.suppressed_flows = s.suppressed_flows.saturating_add(1);
            return None;
        }
        s.flows += 1;
    }
    let c = Carry {
        drops: s.suppressed_drops,
        flows: s.suppressed_flows,
        reasons: s.suppressed_reasons,
    };
    // Cleared only when something was suppressed (rare): LLVM makes the
    // three zero stores one memset, which the BPF object turns into a call
    // of a byte loop, on every event otherwise.
    if c.drops != 0 || c.flows != 0 || c.reasons != 0 {
        s.suppressed_drops = 0;
        s.suppressed_flows = 0;
        s.suppressed_reasons = 0;
    }
    Some(c)
}

/// The event could not be written (ring full): keep its carry for the next.
#[inline(always)]
pub fn restore(s: &mut EventLimitState, c: &Carry) {
    s.suppressed_drops = s.suppressed_drops.saturating_add(c.drops);
    s.suppressed_flows = s.suppressed_flows.saturating_add(c.flows);
    s.suppressed_reasons |= c.reasons;
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: EventBudget = EventBudget { drops: 2, flows: 3 };

    #[test]
    fn over_budget_drops_are_counted_and_carried_on_the_next_event() {
        let mut s = EventLimitState::default();
        let t = 10 * WINDOW_NS;
        assert_eq!(
            admit(&mut s, &B, t, reason::DENY_RULE),
            Some(Carry::default())
        );
        assert!(admit(&mut s, &B, t + 1, reason::DENY_RULE).is_some());
        assert_eq!(admit(&mut s, &B, t + 2, reason::DENY_RULE), None);
        assert_eq!(admit(&mut s, &B, t + 3, reason::MALFORMED), None);
        // New flows have their own budget: a drop flood does not hide them,
        // and the first one carries the drops left out so far.
        let c = admit(&mut s, &B, t + 4, reason::POLICY_ALLOW).expect("own budget");
        assert_eq!(c.drops, 2);
        assert_eq!(
            c.reasons,
            (1 << reason::DENY_RULE) | (1 << reason::MALFORMED)
        );
        assert_eq!(admit(&mut s, &B, t + 5, reason::DENY_RULE), None);
        // The next window refills; the first drop carries what was left.
        let c = admit(&mut s, &B, t + WINDOW_NS, reason::DENY_RULE).expect("refilled");
        assert_eq!((c.drops, c.flows), (1, 0));
        assert_eq!(
            admit(&mut s, &B, t + WINDOW_NS + 1, reason::DENY_RULE),
            Some(Carry::default())
        );
    }

    #[test]
    fn flow_events_are_limited_too() {
        let mut s = EventLimitState::default();
        for _ in 0..3 {
            assert!(admit(&mut s, &B, WINDOW_NS, reason::POLICY_ALLOW).is_some());
        }
        assert_eq!(admit(&mut s, &B, WINDOW_NS, reason::UNENFORCED), None);
        let c = admit(&mut s, &B, WINDOW_NS, reason::NO_POLICY_MATCH).expect("drop budget");
        assert_eq!((c.drops, c.flows, c.reasons), (0, 1, 0));
    }

    #[test]
    fn zero_means_default_and_max_means_unlimited() {
        let mut s = EventLimitState::default();
        let d = EventBudget::default();
        let emitted = (0..DROP_EVENTS + 10)
            .filter(|_| admit(&mut s, &d, WINDOW_NS, reason::DENY_RULE).is_some())
            .count();
        assert_eq!(emitted, DROP_EVENTS as usize);
        let mut s = EventLimitState::default();
        assert!((0..100_000).all(|_| admit(
            &mut s,
            &EventBudget::UNLIMITED,
            WINDOW_NS,
            reason::DENY_RULE
        )
        .is_some()));
    }

    #[test]
    fn a_failed_write_keeps_its_carry() {
        let mut s = EventLimitState {
            suppressed_drops: 5,
            suppressed_reasons: 1 << reason::DENY_RULE,
            ..Default::default()
        };
        let c = admit(&mut s, &B, WINDOW_NS, reason::DENY_RULE).expect("budget");
        assert_eq!(c.drops, 5);
        restore(&mut s, &c);
        let c = admit(&mut s, &B, WINDOW_NS, reason::DENY_RULE).expect("budget");
        assert_eq!((c.drops, c.reasons), (5, 1 << reason::DENY_RULE));
    }
}
