//! palisade's kernel programs.
//!
//! `pod_egress` runs at tc ingress of a pod's host-side veth (packets the pod
//! sends), `pod_ingress` at tc egress of the same device (packets to the
//! pod). Both share one verdict path in `verdict.rs` (and so does
//! `pod_verify`, its side-effect-free twin for `palisade-agent verify`); `xdp_prefilter` drops
//! deny-listed sources on a node uplink before an skb exists.
#![no_std]
#![no_main]
// For `atomic_xadd` (`verdict::atomic_add`): the BPF target has no
// read-modify-write atomics in `core::sync::atomic`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod deliver;
mod dns;
mod events;
mod headers;
mod service;
mod service6;
mod verdict;
mod verdict6;

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map, xdp},
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray,
        ProgramArray, RingBuf,
    },
    programs::{TcContext, XdpContext},
};
use palisade_common::{
    ct_budget::{CtBudget, CtCharge},
    dns::{DnsServerKey, DnsServerKey6},
    event_limit::{EventBudget, EventLimitKey, EventLimitState},
    reason,
    service::{
        SvcAffinity, SvcAffinity6, SvcAffinityKey, SvcAffinityKey6, SvcBackend, SvcBackend6,
        SvcBackendKey, SvcFrontend, SvcFrontendKey, SvcFrontendKey6, SvcNat, SvcNat6,
    },
    sizes, CtKey, CtKey6, CtValue, EndpointInfo, EndpointKey, EndpointSlot, FragKey, FragKey6,
    FragValue, Ip6, IpcacheValue, PolicyKey, PolicyValue, DIR_EGRESS, DIR_INGRESS,
};

// ---- maps shared with userspace (layouts in palisade-common) ----

#[map]
static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> =
    HashMap::with_max_entries(sizes::ENDPOINTS, 0);

/// `ENDPOINTS` by interface, as an array (`palisade_common::EndpointSlot`).
#[map]
static ENDPOINT_SLOTS: Array<EndpointSlot> = Array::with_max_entries(sizes::ENDPOINT_SLOTS, 0);

#[map]
static IPCACHE: LpmTrie<u32, IpcacheValue> = LpmTrie::with_max_entries(sizes::IPCACHE, 0);

/// The ipcache's /32 entries, by address (`verdict::ipcache`; `IPCACHE`
/// holds the shorter prefixes): a hit is the longest match by definition,
/// one hash lookup instead of a trie walk. Allocated as used (the trie
/// is, too). The loader's `exact` module keeps the pair.
#[map]
static IPCACHE_EXACT: HashMap<u32, IpcacheValue> =
    HashMap::with_max_entries(sizes::IPCACHE, BPF_F_NO_PREALLOC);

#[map]
static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::with_max_entries(sizes::POLICY, 0);

/// The policy map's full-length (one-port) entries, by key
/// (`verdict::policy_entry`), as `IPCACHE_EXACT` is to `IPCACHE`.
#[map]
static POLICY_EXACT: HashMap<PolicyKey, PolicyValue> =
    HashMap::with_max_entries(sizes::POLICY, BPF_F_NO_PREALLOC);

#[map]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(sizes::CONNTRACK, 0);

#[map]
static FRAGMENTS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(sizes::FRAGMENTS, 0);

/// Pods of this node by address -> host veth ifindex (`deliver`; a hint
/// checked against the interface's endpoint entry).
#[map]
static LOCAL_PODS: HashMap<u32, u32> = HashMap::with_max_entries(sizes::ENDPOINTS, 0);

#[map]
static LOCAL_PODS6: HashMap<Ip6, u32> = HashMap::with_max_entries(sizes::ENDPOINTS, 0);

// ---- IPv6 (`verdict6`): the same roles, keyed by IPv6 addresses ----

/// A pod's IPv6 address -> its endpoint id (its veth's `ENDPOINTS` entry
/// holds the address itself).
#[map]
static ENDPOINTS6: HashMap<Ip6, u32> = HashMap::with_max_entries(sizes::ENDPOINTS, 0);

#[map]
static IPCACHE6: LpmTrie<Ip6, IpcacheValue> = LpmTrie::with_max_entries(sizes::IPCACHE6, 0);

/// The IPv6 ipcache's /128 entries (`verdict6::ipcache6`).
#[map]
static IPCACHE6_EXACT: HashMap<Ip6, IpcacheValue> =
    HashMap::with_max_entries(sizes::IPCACHE6, BPF_F_NO_PREALLOC);

#[map]
static CONNTRACK6: LruHashMap<CtKey6, CtValue> = LruHashMap::with_max_entries(sizes::CONNTRACK6, 0);

#[map]
static FRAGMENTS6: LruHashMap<FragKey6, FragValue> =
    LruHashMap::with_max_entries(sizes::FRAGMENTS6, 0);

/// The IPv6 path's flow, per CPU (`verdict6`: off the stack). Not shared
/// with userspace, not pinned.
#[map]
static SCRATCH6: PerCpuArray<verdict6::Scratch6> = PerCpuArray::with_max_entries(1, 0);

/// Programs reached by tail call, by slot (filled by the loader before
/// anything is attached): the IPv6 halves. Slot `SLOT_EGRESS4` is an older
/// agent's: its `pod_egress` reached IPv4 through it. This object neither
/// has nor fills it; the pinned map keeps the older program there until
/// the new agent has swapped its own `pod_egress` onto every hook.
#[map]
static PROGRAMS: ProgramArray = ProgramArray::with_max_entries(palisade_common::SLOTS, 0);
const SLOT_EGRESS6: u32 = palisade_common::SLOT_EGRESS6;
const SLOT_INGRESS6: u32 = palisade_common::SLOT_INGRESS6;
const SLOT_VERIFY6: u32 = palisade_common::SLOT_VERIFY6;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(sizes::EVENTS_BYTES, 0);

/// Per-endpoint event budgets (`events`, `palisade_common::event_limit`).
#[map]
static EVENT_LIMIT: LruPerCpuHashMap<EventLimitKey, EventLimitState> =
    LruPerCpuHashMap::with_max_entries(sizes::ENDPOINTS, 0);

#[map]
static EVENT_BUDGET: Array<EventBudget> = Array::with_max_entries(1, 0);

/// When a record last forced a wakeup of the `EVENTS` reader
/// (`events::wakeup_flags`). Not shared with userspace, not pinned.
#[map]
static EVENT_WAKE: Array<u64> = Array::with_max_entries(1, 0);

/// Conntrack and fragment entries charged to each endpoint, and the
/// budget in force (`palisade_common::ct_budget`).
#[map]
static CT_CHARGE: HashMap<u32, CtCharge> = HashMap::with_max_entries(sizes::ENDPOINTS, 0);

#[map]
static CT_BUDGET: Array<CtBudget> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::MAX, 0);

// ---- Service translation (layouts in palisade_common::service) ----

#[map]
static SVC_FRONTENDS: HashMap<SvcFrontendKey, SvcFrontend> =
    HashMap::with_max_entries(sizes::SVC_FRONTENDS, 0);

#[map]
static SVC_BACKENDS: HashMap<SvcBackendKey, SvcBackend> =
    HashMap::with_max_entries(sizes::SVC_BACKENDS, 0);

#[map]
static SVC_NAT: LruHashMap<CtKey, SvcNat> = LruHashMap::with_max_entries(sizes::SVC_NAT, 0);

#[map]
static SVC_AFFINITY: LruHashMap<SvcAffinityKey, SvcAffinity> =
    LruHashMap::with_max_entries(sizes::SVC_AFFINITY, 0);

/// IPv6 Service translation (`service6`): the same roles.
#[map]
static SVC_FRONTENDS6: HashMap<SvcFrontendKey6, SvcFrontend> =
    HashMap::with_max_entries(sizes::SVC_FRONTENDS6, 0);

#[map]
static SVC_BACKENDS6: HashMap<SvcBackendKey, SvcBackend6> =
    HashMap::with_max_entries(sizes::SVC_BACKENDS6, 0);

#[map]
static SVC_NAT6: LruHashMap<CtKey6, SvcNat6> = LruHashMap::with_max_entries(sizes::SVC_NAT6, 0);

#[map]
static SVC_AFFINITY6: LruHashMap<SvcAffinityKey6, SvcAffinity6> =
    LruHashMap::with_max_entries(sizes::SVC_AFFINITY6, 0);

// ---- DNS answers held for the agent (`dns`) ----

#[map]
static DNS_SERVERS: HashMap<DnsServerKey, u8> = HashMap::with_max_entries(sizes::DNS_SERVERS, 0);

#[map]
static DNS_SERVERS6: HashMap<DnsServerKey6, u8> = HashMap::with_max_entries(sizes::DNS_SERVERS, 0);

/// Nonzero while a pod of the node has domain rules (one entry): frames to
/// pods skip the hold check otherwise.
#[map]
static DNS_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static DNS_HELD: RingBuf = RingBuf::with_byte_size(sizes::DNS_HELD_BYTES, 0);

// ---- XDP prefilter maps ----

#[map]
static XDP_DENY: LpmTrie<u32, u32> = LpmTrie::with_max_entries(sizes::XDP_DENY, 0);

#[map]
static XDP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::MAX, 0);

/// Attached at tc ingress of a pod's veth: IPv4 (and ARP, and the rest)
/// judged here, IPv6 handed to `pod_egress6` (see `PROGRAMS`; an empty
/// slot, never once loaded, drops). The IPv4 path used to be a tail call
/// away too: inlined, an established packet costs 40-50 ns less
/// (test_run, one run per call), as `pod_ingress` has always had it.
#[classifier]
// Inlined into the entry point the macro makes: the tail call is made
// from the program's main function, whose frame is the only one below it.
#[inline(always)]
pub fn pod_egress(ctx: TcContext) -> i32 {
    if verdict::is_ipv6(&ctx) {
        // SAFETY: `ctx` is this program's context.
        unsafe { PROGRAMS.tail_call(&ctx, SLOT_EGRESS6) };
        verdict::count::<false>(reason::IPV6_UNSUPPORTED);
        return TC_ACT_SHOT;
    }
    egress4(&ctx)
}

#[inline(always)]
fn egress4(ctx: &TcContext) -> i32 {
    let mut redirect = None;
    let r = verdict::frame::<false>(ctx, DIR_EGRESS, &mut redirect);
    match (r, redirect) {
        // A hairpin turned back into its pod (`service`).
        (Ok(true), Some(act)) => act,
        // To a pod of this node: past the node's stack (`deliver`).
        (Ok(true), None) => deliver::local4(ctx).unwrap_or(TC_ACT_OK),
        _ => tc_action(r),
    }
}

#[classifier]
// Inlined into the entry point the macro makes: a subprogram would keep
// the program from tail-calling (see `verdict::ct_track`).
#[inline(always)]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    let mut redirect = None;
    let r = verdict::process::<false>(&ctx, DIR_INGRESS, &mut redirect);
    // A DNS answer for a pod with domain rules waits for the agent (`dns`):
    // the copy goes on later, this frame ends here. (Not TC_ACT_STOLEN:
    // TCX knows only pass, drop and redirect, and treats the rest as
    // "next", which passes.)
    if r == Ok(true) && dns::held(&ctx) {
        return TC_ACT_SHOT;
    }
    tc_action(r)
}

/// The verdict path of `pod_egress`/`pod_ingress` in dry-run mode: reads
/// the live maps, writes nothing (see `verdict.rs`). Attached nowhere; run
/// only through BPF_PROG_TEST_RUN by `palisade-agent verify`, which puts
/// the direction in the skb mark (`VERIFY_MARK_*`). Any other mark drops.
#[classifier]
// Inlined into the entry point the macro makes: a subprogram would keep
// the program from tail-calling (see `verdict::ct_track`).
#[inline(always)]
pub fn pod_verify(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's whole run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let dir = match mark {
        palisade_common::VERIFY_MARK_EGRESS => DIR_EGRESS,
        palisade_common::VERIFY_MARK_INGRESS => DIR_INGRESS,
        _ => return TC_ACT_SHOT,
    };
    // Dry run: never translates, so never redirects.
    let mut redirect = None;
    tc_action(verdict::process::<true>(&ctx, dir, &mut redirect))
}

/// `pod_egress` for IPv6 frames (tail-called from it).
#[classifier]
pub fn pod_egress6(ctx: TcContext) -> i32 {
    let r = verdict6::frame::<false>(&ctx, DIR_EGRESS);
    match (r, verdict6::redirect()) {
        // A hairpin or an answer turned back into its pod (`service6`).
        (Ok(true), Some(act)) => act,
        (Ok(true), None) if !verdict6::via_stack() => deliver::local6(&ctx).unwrap_or(TC_ACT_OK),
        _ => tc_action(r),
    }
}

/// `pod_ingress` for IPv6 frames (tail-called from it).
#[classifier]
pub fn pod_ingress6(ctx: TcContext) -> i32 {
    // Replies are rewritten in place; nothing at a pod's ingress redirects.
    let r = verdict6::frame::<false>(&ctx, DIR_INGRESS);
    // A DNS answer for a pod with domain rules waits for the agent (`dns`).
    if r == Ok(true) && dns::held6(&ctx) {
        return TC_ACT_SHOT;
    }
    tc_action(r)
}

/// `pod_verify` for IPv6 frames (tail-called from it).
#[classifier]
pub fn pod_verify6(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's whole run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let dir = match mark {
        palisade_common::VERIFY_MARK_EGRESS => DIR_EGRESS,
        palisade_common::VERIFY_MARK_INGRESS => DIR_INGRESS,
        _ => return TC_ACT_SHOT,
    };
    // Dry run: never translates, so never redirects.
    tc_action(verdict6::frame::<true>(&ctx, dir))
}

/// `Err` means the program could not reach a verdict (e.g. a map it relies
/// on was unreadable). A pod's traffic must never pass unenforced, so that
/// is a drop, not TC_ACT_OK.
#[inline(always)]
fn tc_action(r: Result<bool, ()>) -> i32 {
    match r {
        Ok(true) => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

#[xdp]
pub fn xdp_prefilter(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    let Some(saddr) = headers::ipv4_saddr(start, end) else {
        return xdp_action::XDP_PASS;
    };
    let r = if XDP_DENY.get(Key::new(32, saddr)).is_some() {
        reason::XDP_DENYLIST
    } else {
        reason::XDP_PASS
    };
    if let Some(c) = XDP_COUNTERS.get_ptr_mut(r as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
    if r == reason::XDP_DENYLIST {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The licence the kernel records for these programs (BPF_PROG_LOAD's
/// `license`), and the object's licence: MIT OR GPL-2.0-only, as this
/// crate's Cargo.toml says (the userspace crates are Apache-2.0; this object
/// is built from MIT-available code only, see Cargo.toml).
///
/// Why a GPL-compatible string and not "Apache-2.0": the verifier refuses
/// calls to helpers marked `gpl_only` from a program whose licence is not
/// in the kernel's GPL-compatible list ("GPL", "GPL v2", "Dual MIT/GPL",
/// "Dual BSD/GPL", ...; "Apache-2.0" is not in it). None of the helpers
/// these programs call today is `gpl_only`: bpf_map_lookup_elem,
/// bpf_map_update_elem, bpf_ktime_get_ns, bpf_ktime_get_coarse_ns, bpf_skb_pull_data,
/// bpf_ringbuf_reserve, bpf_ringbuf_submit and bpf_ringbuf_query all load
/// under a non-GPL licence too (checked on this machine's 6.18 kernel: all
/// three programs load with the string patched to "Apache-2.0"). The dual
/// licence keeps the GPL-only ones available to the datapath without a
/// licence change the day it needs one: bpf_trace_printk, the
/// bpf_perf_event_output behind aya-log, bpf_probe_read_kernel, or
/// GPL-only kfuncs.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
