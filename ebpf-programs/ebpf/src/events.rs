//! Verdict events into the `EVENTS` ring: under each endpoint's budget
//! (`palisade_common::event_limit`), and without waking the reader per
//! record.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use palisade_common::{
    decision::{flow_event4, write_flow_event, Addr, Decision},
    event_limit::{admit, restore, Carry, EventLimitKey, EventLimitState},
    reason, CtKeyOf, EndpointInfo, FlowEvent, FlowEvent4,
};

use crate::{verdict::count, EVENTS, EVENT_BUDGET, EVENT_LIMIT, EVENT_WAKE};

/// Report one verdict (a new flow or a drop), if the endpoint's budget
/// allows; otherwise count it as suppressed, to be carried on the
/// endpoint's next event.
#[inline(always)]
pub fn report<A: Addr>(ep: &EndpointInfo, ifindex: u32, key: &CtKeyOf<A>, d: &Decision, svc: u32) {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let lk = EventLimitKey {
        ifindex,
        endpoint_id: ep.endpoint_id,
    };
    let state = budget_state(&lk, now);
    let carry = match state {
        Some(s) => {
            let budget = EVENT_BUDGET.get(0).copied().unwrap_or_default();
            // SAFETY: a per-CPU value, valid for this run (RCU); programs
            // run with migration disabled, so no other writer on this CPU.
            match admit(unsafe { &mut *s }, &budget, now, d.reason) {
                Some(c) => c,
                None => {
                    count::<false>(reason::EVENTS_SUPPRESSED);
                    return;
                }
            }
        }
        // No budget entry (the LRU could not make one): report unlimited
        // rather than lose verdicts.
        None => Carry::default(),
    };
    let written = if A::FAMILY == 4 {
        // Built on the stack and copied, as the IPv4 programs always did:
        // a short record, and the fewest instructions for the verifier.
        match EVENTS.reserve::<FlowEvent4>(0) {
            Some(mut e) => {
                let mut ev = flow_event4(now, ep.endpoint_id, ifindex, key, d, svc);
                carry.apply4(&mut ev);
                e.write(ev);
                e.submit(wakeup_flags(RECORD4_BYTES, now));
                true
            }
            None => false,
        }
    } else {
        match EVENTS.reserve::<FlowEvent>(0) {
            Some(mut e) => {
                let p = e.as_mut_ptr();
                // SAFETY: the reserved slot holds one FlowEvent; every field
                // is written before the submit.
                unsafe {
                    write_flow_event(p, now, ep.endpoint_id, ifindex, key, d, svc);
                    carry.apply(p);
                }
                e.submit(wakeup_flags(RECORD_BYTES, now));
                true
            }
            None => false,
        }
    };
    if !written {
        count::<false>(reason::EVENTS_LOST);
        if let Some(s) = state {
            // SAFETY: as above.
            restore(unsafe { &mut *s }, &carry);
        }
    }
}

#[inline(always)]
fn budget_state(k: &EventLimitKey, now: u64) -> Option<*mut EventLimitState> {
    if let Some(p) = EVENT_LIMIT.get_ptr_mut(k) {
        return Some(p);
    }
    let fresh = EventLimitState {
        window_start_ns: now,
        ..Default::default()
    };
    let _ = EVENT_LIMIT.insert(k, &fresh, 0);
    EVENT_LIMIT.get_ptr_mut(k)
}

/// Waking the reader on every record costs microseconds per event (an
/// inter-processor interrupt: a VM exit under a hypervisor); the agent
/// drains the ring on a short interval instead, and is woken when a
/// backlog builds up: by the record that crosses `WAKEUP_BACKLOG`, not by
/// every record after it (a stalled or slow reader then costs the
/// datapath nothing per event; a full ring refuses records, counted as
/// `EVENTS_LOST`). Records from several CPUs at once may skip the crossing
/// record; the interval drain still reads them.
///
/// A reader draining while records keep coming holds the backlog near the
/// threshold, where record after record crosses it again: those wake it
/// at most once per `WAKEUP_GAP_NS` (bench section 1, denied flows with
/// the drainer running: the interrupts took a tenth of the time). A
/// backlog that still reaches half the ring wakes it regardless.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_RING_SIZE: u64 = 1;
const WAKEUP_BACKLOG: u64 = 64 * 1024;
const WAKEUP_GAP_NS: u64 = 10_000_000;
/// A record's share of the ring: the event and the 8-byte record header.
const RECORD_BYTES: u64 = core::mem::size_of::<FlowEvent>() as u64 + 8;
const RECORD4_BYTES: u64 = core::mem::size_of::<FlowEvent4>() as u64 + 8;

/// Called after the record (of `record` bytes) was reserved, so the
/// backlog includes it; `now` is `bpf_ktime_get_ns`.
#[inline(always)]
fn wakeup_flags(record: u64, now: u64) -> u64 {
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA);
    let crossed = |at: u64| (at..at + record).contains(&avail);
    let wake = if crossed(WAKEUP_BACKLOG) {
        !woken_within_gap(now)
    } else {
        avail > WAKEUP_BACKLOG && crossed(EVENTS.query(BPF_RB_RING_SIZE) / 2)
    };
    if wake {
        if let Some(last) = EVENT_WAKE.get_ptr_mut(0) {
            // SAFETY: valid map value; a racing CPU's store is as good.
            unsafe { core::ptr::write_volatile(last, now) };
        }
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Whether a record forced a wakeup less than `WAKEUP_GAP_NS` ago.
#[inline(always)]
fn woken_within_gap(now: u64) -> bool {
    // SAFETY: valid map value, a plain word.
    EVENT_WAKE
        .get_ptr(0)
        .is_some_and(|p| now.wrapping_sub(unsafe { core::ptr::read_volatile(p) }) < WAKEUP_GAP_NS)
}
