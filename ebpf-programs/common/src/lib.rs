//! Map keys, values and event records shared by palisade's kernel programs
//! and userspace. Everything here is `#[repr(C)]`, `Copy`, padding-free and
//! uses integer flags instead of `bool`, so the byte layout is the same on
//! both sides. IPv4 addresses are kept as the raw network-order `u32` read
//! from the packet (`u32::from_ne_bytes(addr.octets())` in userspace);
//! IPv6 addresses as four such words ([`Ip6`]: the header's 16 bytes, in
//! their order, `ip6_words` in userspace).
#![no_std]

pub mod conntrack;
pub mod ct_budget;
pub mod decision;
pub mod dns;
pub mod event_limit;
pub mod ipv6;
pub mod local;
pub mod reject;
pub mod related;
pub mod service;

/// Map names, as declared in the object and pinned under bpffs.
pub mod maps {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const IPCACHE: &str = "IPCACHE";
    pub const POLICY: &str = "POLICY";
    /// The full-length entries of the ipcaches and the policy map, in
    /// hash maps by the whole key (`IPCACHE`, `IPCACHE6` and `POLICY` hold
    /// the shorter prefixes): the programs look there first and walk the
    /// trie only on a miss (the loader's `exact` module).
    pub const IPCACHE_EXACT: &str = "IPCACHE_EXACT";
    pub const IPCACHE6_EXACT: &str = "IPCACHE6_EXACT";
    pub const POLICY_EXACT: &str = "POLICY_EXACT";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const XDP_DENY: &str = "XDP_DENY";
    pub const XDP_COUNTERS: &str = "XDP_COUNTERS";
    pub const SVC_FRONTENDS: &str = "SVC_FRONTENDS";
    pub const SVC_BACKENDS: &str = "SVC_BACKENDS";
    pub const SVC_NAT: &str = "SVC_NAT";
    pub const SVC_AFFINITY: &str = "SVC_AFFINITY";
    /// Per-endpoint event budgets (`event_limit`); not pinned: a reload
    /// starts with fresh windows.
    pub const EVENT_LIMIT: &str = "EVENT_LIMIT";
    /// The budget in force (one entry; zeros mean the defaults).
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    /// Conntrack and fragment entries charged to each endpoint
    /// (`ct_budget`), by endpoint id.
    pub const CT_CHARGE: &str = "CT_CHARGE";
    /// The per-endpoint conntrack budget in force (one entry; zeros mean
    /// the defaults); not pinned, set by the agent at every start.
    pub const CT_BUDGET: &str = "CT_BUDGET";
    /// IPv6: pod address -> endpoint id (what `EndpointKey::ipv4` is to IPv4).
    pub const ENDPOINTS6: &str = "ENDPOINTS6";
    pub const IPCACHE6: &str = "IPCACHE6";
    pub const CONNTRACK6: &str = "CONNTRACK6";
    pub const FRAGMENTS6: &str = "FRAGMENTS6";
    /// IPv6 Service translation (`service`): the IPv4 maps' roles.
    pub const SVC_FRONTENDS6: &str = "SVC_FRONTENDS6";
    pub const SVC_BACKENDS6: &str = "SVC_BACKENDS6";
    pub const SVC_NAT6: &str = "SVC_NAT6";
    pub const SVC_AFFINITY6: &str = "SVC_AFFINITY6";
    /// The programs reached by tail call (`SLOT_*`).
    pub const PROGRAMS: &str = "PROGRAMS";
    /// Cluster DNS servers whose answers are held (`dns::DnsServerKey`).
    pub const DNS_SERVERS: &str = "DNS_SERVERS";
    /// DNS answers held for the agent (`dns::DnsHeld`), a ring buffer.
    pub const DNS_HELD: &str = "DNS_HELD";
    /// Nonzero while a pod of the node has domain rules (one `u32`).
    pub const DNS_ACTIVE: &str = "DNS_ACTIVE";
    /// `DNS_SERVERS` for IPv6 (`dns::DnsServerKey6`).
    pub const DNS_SERVERS6: &str = "DNS_SERVERS6";
    /// `EndpointSlot`s: the fast index of `ENDPOINTS` by interface.
    pub const ENDPOINT_SLOTS: &str = "ENDPOINT_SLOTS";
    /// A pod's IPv4 address -> its host veth's ifindex, for local delivery
    /// (`local::LocalPod`).
    pub const LOCAL_PODS: &str = "LOCAL_PODS";
    /// `LOCAL_PODS` for IPv6 (`Ip6` keys).
    pub const LOCAL_PODS6: &str = "LOCAL_PODS6";
    /// Every map the programs share, in a stable order (pinning, adoption).
    pub const ALL: [&str; 33] = [
        ENDPOINTS,
        IPCACHE,
        POLICY,
        CONNTRACK,
        FRAGMENTS,
        EVENTS,
        COUNTERS,
        XDP_DENY,
        XDP_COUNTERS,
        SVC_FRONTENDS,
        SVC_BACKENDS,
        SVC_NAT,
        SVC_AFFINITY,
        CT_CHARGE,
        ENDPOINTS6,
        IPCACHE6,
        CONNTRACK6,
        FRAGMENTS6,
        SVC_FRONTENDS6,
        SVC_BACKENDS6,
        SVC_NAT6,
        SVC_AFFINITY6,
        PROGRAMS,
        DNS_SERVERS,
        DNS_HELD,
        DNS_ACTIVE,
        DNS_SERVERS6,
        ENDPOINT_SLOTS,
        IPCACHE_EXACT,
        IPCACHE6_EXACT,
        POLICY_EXACT,
        LOCAL_PODS,
        LOCAL_PODS6,
    ];
}

/// Slots of `PROGRAMS`. Slot 0 held an older agent's IPv4 egress half
/// (`pod_egress4`), which its `pod_egress` tail-called; today's judges IPv4
/// itself, and the slot stays reserved so an older hook keeps its program
/// through an upgrade.
pub const SLOT_EGRESS4: u32 = 0;
pub const SLOT_EGRESS6: u32 = 1;
pub const SLOT_INGRESS6: u32 = 2;
pub const SLOT_VERIFY6: u32 = 3;
pub const SLOTS: u32 = 4;

/// Program names in the object.
pub mod programs {
    /// tc ingress of the host-side veth: packets leaving the pod.
    pub const POD_EGRESS: &str = "pod_egress";
    /// tc egress of the host-side veth: packets going to the pod.
    pub const POD_INGRESS: &str = "pod_ingress";
    /// XDP on a node uplink: CIDR deny list.
    pub const XDP_PREFILTER: &str = "xdp_prefilter";
    /// The verdict path in dry-run mode (no map writes, no events), attached
    /// nowhere: BPF_PROG_TEST_RUN only, for `palisade-agent verify`.
    pub const POD_VERIFY: &str = "pod_verify";
    /// Tail-called: the IPv6 halves of the three.
    pub const POD_EGRESS6: &str = "pod_egress6";
    pub const POD_INGRESS6: &str = "pod_ingress6";
    pub const POD_VERIFY6: &str = "pod_verify6";
}

/// skb marks that tell `pod_verify` which direction a probe is judged in
/// (nonzero, so a zeroed context is refused).
pub const VERIFY_MARK_EGRESS: u32 = 0x7601;
pub const VERIFY_MARK_INGRESS: u32 = 0x7602;

/// Default map sizes; userspace may override them before load.
pub mod sizes {
    pub const ENDPOINTS: u32 = 16 * 1024;
    /// `ENDPOINT_SLOTS`: a power of two (slot = ifindex & (n - 1)).
    pub const ENDPOINT_SLOTS: u32 = 16 * 1024;
    pub const IPCACHE: u32 = 256 * 1024;
    pub const POLICY: u32 = 512 * 1024;
    /// 512k, like Cilium's TCP table; each pod may hold an eighth
    /// (`ct_budget::ENTRIES`).
    pub const CONNTRACK: u32 = 512 * 1024;
    pub const FRAGMENTS: u32 = 8 * 1024;
    pub const EVENTS_BYTES: u32 = 1 << 22;
    pub const XDP_DENY: u32 = 64 * 1024;
    pub const SVC_FRONTENDS: u32 = 16 * 1024;
    pub const SVC_BACKENDS: u32 = 64 * 1024;
    /// One entry per translated IPv4 hairpin flow (its reverse
    /// translation; every other IPv4 flow's lives in its conntrack entries).
    pub const SVC_NAT: u32 = 128 * 1024;
    /// One entry per (client, sessionAffinity frontend).
    pub const SVC_AFFINITY: u32 = 64 * 1024;
    pub const IPCACHE6: u32 = 64 * 1024;
    /// Half the IPv4 table: an entry is twice the size, and most flows of
    /// a dual-stack cluster are still IPv4. Charged to the same per-pod
    /// budget as IPv4 entries.
    pub const CONNTRACK6: u32 = 256 * 1024;
    pub const FRAGMENTS6: u32 = 4 * 1024;
    /// IPv6 Service translation: the IPv4 sizes, NAT and affinity halved
    /// as conntrack's are (`SVC_NAT6` holds both directions of every
    /// translated IPv6 flow: two entries each).
    pub const SVC_FRONTENDS6: u32 = SVC_FRONTENDS;
    pub const SVC_BACKENDS6: u32 = SVC_BACKENDS;
    pub const SVC_NAT6: u32 = SVC_NAT / 2;
    pub const SVC_AFFINITY6: u32 = SVC_AFFINITY / 2;
    /// Cluster DNS (address, port, protocol) entries.
    pub const DNS_SERVERS: u32 = 1024;
    /// 512 held answers (`dns::DnsHeld` is 2 KiB) across the node.
    pub const DNS_HELD_BYTES: u32 = 1 << 20;
}

/// An IPv6 address as the kernel reads it: the header's 16 bytes as four
/// native-order words (so each word holds 4 network-order bytes). An LPM
/// key of this type matches the bytes in order, like a `[u8; 16]`.
pub type Ip6 = [u32; 4];

/// Direction of a packet relative to the pod whose veth carries it.
pub const DIR_EGRESS: u8 = 0;
pub const DIR_INGRESS: u8 = 1;

/// Reserved identities. 0 is the wildcard peer in policy keys.
pub const IDENTITY_ANY: u32 = 0;
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;
/// Wildcard peer in policy keys for "any pod": matches every peer whose
/// identity is a label identity ([`is_label_identity`]), never host, world
/// or a CIDR identity. Never an ipcache identity itself.
pub const IDENTITY_ANY_POD: u32 = 3;
/// Another node's addresses. Not `host` (NetworkPolicy's "traffic from
/// the pod's own node is allowed" covers only the own node) and not a label
/// identity, so any-pod entries never match it: only rules whose ipBlock
/// contains the address (through its `cidr_identity`) or any-peer rules do.
pub const IDENTITY_REMOTE_NODE: u32 = 4;
/// The IPv6 outside world: an IPv6 address the ipcache has no prefix for,
/// and the ipBlock `::/0`. Apart from `IDENTITY_WORLD` (IPv4's) so that an
/// IPv4 ipBlock (`0.0.0.0/0` included) never admits an IPv6 address, nor
/// the reverse, as NetworkPolicy's ipBlock semantics say.
pub const IDENTITY_WORLD6: u32 = 5;
/// First identity userspace may hand out for label sets. Label identities
/// are `IDENTITY_FIRST_DYNAMIC..IDENTITY_FIRST_CIDR`.
pub const IDENTITY_FIRST_DYNAMIC: u32 = 256;
/// First CIDR identity (ipBlock prefixes, pod /32s of named-port ipBlock
/// egress rules). CIDR identities are `IDENTITY_FIRST_CIDR..`, disjoint from
/// label identities, so the kernel tells a pod peer by its number.
pub const IDENTITY_FIRST_CIDR: u32 = 0x0080_0000;

/// Whether `id` is a label identity (a pod's), by its range.
#[inline(always)]
pub const fn is_label_identity(id: u32) -> bool {
    id >= IDENTITY_FIRST_DYNAMIC && id < IDENTITY_FIRST_CIDR
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// `EndpointInfo::flags`
pub const EP_INGRESS_ENFORCED: u32 = 1;
pub const EP_EGRESS_ENFORCED: u32 = 1 << 1;
pub const EP_AUDIT: u32 = 1 << 2;
/// Host protection (`--host-protection`): what the pod sends to its own
/// node passes only on the node's listed ports (`HOST_PORTS_ENDPOINT`).
pub const EP_HOST_PROTECTED: u32 = 1 << 3;
/// A `domainNames` rule selects the pod: its DNS answers are held until
/// the agent has learned their addresses (`dns`).
pub const EP_DNS_SNOOP: u32 = 1 << 4;
/// Never in `ENDPOINTS`: set by the programs on their copy of the entry
/// for a packet to the pod that came through the node's stack, not by
/// local delivery (`local::LOCAL_MARK`); the flow's entry gets
/// `CT_VIA_STACK`.
pub const EP_VIA_STACK: u32 = 1 << 30;
/// "No policy entries of this class" bits, 16 of them from this one: bit
/// `EP_NO_ENTRIES_SHIFT + 2 * class + dir` ([`no_entries_bit`]) set means
/// the policy map holds no entry of this endpoint, direction and entry
/// class ([`entry_class`]: the peer's class, and one port or more), so a
/// new flow skips the lookup that could only hit such entries: a denied
/// flow of a pod whose rules name pods on single ports costs one hash
/// lookup, not four walks of the trie. Owned by the agent's map sync,
/// never by the compiler; a bit is only ever set while the map holds no
/// such entry (cleared before the first one is written, set after the
/// last is removed). All clear, the default, means every lookup is made.
pub const EP_NO_ENTRIES_SHIFT: u32 = 8;
pub const EP_NO_ENTRIES_MASK: u32 = 0xffff << EP_NO_ENTRIES_SHIFT;
/// [`peer_class`]es.
pub const PEER_CLASS_LABEL: u32 = 0;
pub const PEER_CLASS_OTHER: u32 = 1;
pub const PEER_CLASS_ANY_POD: u32 = 2;
pub const PEER_CLASS_ANY: u32 = 3;
pub const PEER_CLASSES: u32 = 4;

/// The class of a policy key's peer identity: a lookup with identity `id`
/// can only hit entries of `id`'s class (every policy prefix covers the
/// whole peer field, `POLICY_PREFIX_FIXED`).
#[inline(always)]
pub const fn peer_class(id: u32) -> u32 {
    if id == IDENTITY_ANY {
        PEER_CLASS_ANY
    } else if id == IDENTITY_ANY_POD {
        PEER_CLASS_ANY_POD
    } else if is_label_identity(id) {
        PEER_CLASS_LABEL
    } else {
        PEER_CLASS_OTHER
    }
}

/// [`entry_class`]es: two per peer class.
pub const ENTRY_CLASSES: u32 = 2 * PEER_CLASSES;

/// The class of the policy entry (`prefix`, peer identity `id`) for the
/// "no entries" bits: `2 * peer_class(id)` for a one-port entry (full
/// length: the programs find it in `POLICY_EXACT`), one more for a
/// shorter one (a port range, a protocol, everything: the trie alone).
#[inline(always)]
pub const fn entry_class(prefix: u32, id: u32) -> u32 {
    2 * peer_class(id) + (prefix < POLICY_PREFIX_FULL) as u32
}

/// The `EndpointInfo::flags` bit saying `dir` has no entries of entry
/// class `class`.
#[inline(always)]
pub const fn no_entries_bit(dir: u8, class: u32) -> u32 {
    1 << (EP_NO_ENTRIES_SHIFT + 2 * class + (dir & 1) as u32)
}

/// The "no entries" bits endpoint id `id` may carry when the policy map
/// holds `entries`, (prefix, key) (what the agent's map sync keeps up to
/// date).
pub fn no_entries_bits<'a>(
    id: u32,
    entries: impl IntoIterator<Item = (u32, &'a PolicyKey)>,
) -> u32 {
    let mut bits = EP_NO_ENTRIES_MASK;
    for (prefix, k) in entries {
        if k.endpoint_id == id {
            bits &= !no_entries_bit(k.direction, entry_class(prefix, k.peer_identity));
        }
    }
    bits
}

/// The endpoint id (never a pod's: ids count from 1) under which the
/// policy map holds host protection's open node ports: keys
/// (HOST_PORTS_ENDPOINT, IDENTITY_HOST, egress, protocol, port).
pub const HOST_PORTS_ENDPOINT: u32 = 0;

/// `EndpointKey::kind`: a pod is indexed both by its host veth and its IP.
pub const EP_KEY_IFINDEX: u32 = 1;
pub const EP_KEY_IPV4: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub kind: u32,
    /// ifindex of the host-side veth, or the pod IPv4 address (network order).
    pub value: u32,
}

impl EndpointKey {
    pub const fn ifindex(ifindex: u32) -> Self {
        Self {
            kind: EP_KEY_IFINDEX,
            value: ifindex,
        }
    }
    pub const fn ipv4(addr_be: u32) -> Self {
        Self {
            kind: EP_KEY_IPV4,
            value: addr_be,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    pub endpoint_id: u32,
    pub identity: u32,
    /// The pod's IPv4 address (network order); anything else from it is spoofed.
    pub ipv4: u32,
    pub flags: u32,
    /// Policy generation of this endpoint: bumped by the map sync whenever
    /// the verdict on any of its flows may have changed (its policy
    /// entries, its flags, a peer's identity). A conntrack entry records
    /// the generation it was judged under (`CtValue::generation`); a packet
    /// that finds an entry of an older generation is judged again, and cut
    /// when now denied (`reason::POLICY_CHANGED`). One compare of a value
    /// already loaded for every packet: no lookup on the established path.
    pub generation: u32,
    /// The pod interface's MAC as the CNI plugin saw it; all zero when it
    /// is not known (then no MAC is checked: `decision::foreign_mac`).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The pod's IPv6 address (`Ip6`); all zero when it has none (then
    /// every IPv6 packet from it but neighbour discovery is spoofed).
    pub ipv6: Ip6,
}

impl EndpointInfo {
    #[inline(always)]
    pub fn enforced(&self, dir: u8) -> bool {
        let bit = if dir == DIR_EGRESS {
            EP_EGRESS_ENFORCED
        } else {
            EP_INGRESS_ENFORCED
        };
        self.flags & bit != 0
    }
    #[inline(always)]
    pub fn enforced_any(&self) -> bool {
        self.flags & (EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED) != 0
    }
}

/// `ENDPOINT_SLOTS` value: a pod veth's `EndpointInfo`, in an array
/// indexed by `ifindex & (sizes::ENDPOINT_SLOTS - 1)`. Every packet starts
/// with its interface's endpoint; an array read is inlined by the verifier
/// where the `ENDPOINTS` hash lookup costs ~25 ns (bench section 1).
/// `ENDPOINTS` stays the truth: a slot another interface holds, or one
/// caught mid-write, sends the program to it.
///
/// An array element is rewritten in place (not swapped under RCU as a
/// hash element is), so a reader could see half of an update: `seq` is a
/// seqlock. The agent writes a slot in three whole-value updates, each
/// changing either `seq` or the rest: `seq` made odd, then the new
/// content, then `seq` made even again. A reader takes the slot only if
/// `seq` is even, `ifindex` is its own, and `seq` is unchanged after its
/// copy (`slot_read`). The agent writes slots only on x86-64, whose
/// stores and loads are each seen in order; elsewhere slots stay empty
/// and every lookup goes to `ENDPOINTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointSlot {
    pub seq: u32,
    /// The interface the slot holds; 0 (no interface has it): empty.
    pub ifindex: u32,
    pub info: EndpointInfo,
}

const _: () = assert!(sizes::ENDPOINT_SLOTS.is_power_of_two());

/// The `ENDPOINT_SLOTS` index of interface `ifindex`.
#[inline(always)]
pub const fn endpoint_slot(ifindex: u32) -> u32 {
    ifindex & (sizes::ENDPOINT_SLOTS - 1)
}

/// The endpoint in slot `p` if it is `ifindex`'s and whole (see
/// [`EndpointSlot`]); `None`: ask `ENDPOINTS`.
///
/// # Safety
/// `p` points to a slot that stays mapped while this runs.
#[inline(always)]
pub unsafe fn slot_read(p: *const EndpointSlot, ifindex: u32) -> Option<EndpointInfo> {
    let mut info = EndpointInfo::default();
    // SAFETY: the caller's.
    unsafe { slot_copy(p, ifindex, &mut info) }.then_some(info)
}

/// [`slot_read`] into `out` (which may be left half written when false).
///
/// # Safety
/// As [`slot_read`]; `out` is valid for writes.
#[inline(always)]
pub unsafe fn slot_copy(p: *const EndpointSlot, ifindex: u32, out: *mut EndpointInfo) -> bool {
    use core::ptr::{read_volatile, write};
    // Volatile: the compiler keeps these reads in this order.
    // SAFETY: the caller's.
    let seq = unsafe { read_volatile(&raw const (*p).seq) };
    // SAFETY: as above.
    if seq & 1 != 0 || unsafe { read_volatile(&raw const (*p).ifindex) } != ifindex {
        return false;
    }
    // Copied in 32-bit words, not field by field: a volatile read of the
    // struct moves `mac` a byte at a time, and the programs then compare
    // it as a u32 and a u16, which no byte store forwards to (a stall of
    // ~15% of an established packet's program time, bench section 1
    // under `perf`).
    // SAFETY: as above; `EndpointInfo` is 4-aligned and a whole number
    // of words (asserted below).
    unsafe {
        let (src, dst) = ((&raw const (*p).info).cast::<u32>(), out.cast::<u32>());
        let mut i = 0;
        while i < ENDPOINT_INFO_WORDS {
            write(dst.add(i), read_volatile(src.add(i)));
            i += 1;
        }
    }
    // SAFETY: as above.
    unsafe { read_volatile(&raw const (*p).seq) == seq }
}

const ENDPOINT_INFO_WORDS: usize = core::mem::size_of::<EndpointInfo>() / 4;
const _: () = assert!(
    core::mem::size_of::<EndpointInfo>().is_multiple_of(4)
        && core::mem::align_of::<EndpointInfo>() == 4
);

/// ipcache value. `identity` is what the longest prefix says (a pod's label
/// identity for a pod /32, a CIDR identity, host or world). `cidr_identity`
/// is the identity of the longest ipBlock prefix containing the address,
/// ignoring pod /32s, so that ipBlock rules also match pod addresses.
/// Label identities (`IDENTITY_FIRST_DYNAMIC..IDENTITY_FIRST_CIDR`) and CIDR
/// identities (`IDENTITY_FIRST_CIDR..`) have disjoint ranges: an `identity`
/// in the label range is a pod, which `IDENTITY_ANY_POD` policy entries
/// match.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    pub cidr_identity: u32,
}

/// Policy LPM key data. Byte order of the bits matched by the prefix:
/// endpoint (32), peer (32), direction (8), protocol (8), port (16). A rule
/// for all protocols has prefix 72, for all ports of one protocol 80, for one
/// port 96; an `endPort` range is split into port prefixes. `peer_identity`
/// is a label, CIDR, host or world identity, `IDENTITY_ANY_POD` (any peer
/// with a label identity) or `IDENTITY_ANY` (any peer); a new flow looks up
/// its exact peer, its CIDR identity, `IDENTITY_ANY_POD` (pod peers only)
/// and `IDENTITY_ANY`, in that order, stopping at the first hit
/// (`decision::policy_lookups`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    pub peer_identity: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Destination port, network order.
    pub dport_be: u16,
}

pub const POLICY_PREFIX_FIXED: u32 = 72;
pub const POLICY_PREFIX_PROTO: u32 = 80;
pub const POLICY_PREFIX_FULL: u32 = 96;

pub const ACTION_ALLOW: u32 = 1;
pub const ACTION_DENY: u32 = 2;
/// The cookie of a deny the ClusterNetworkPolicy tier overlay writes where
/// a NetworkPolicy isolates the pod and none of its rules matched (not a
/// ClusterNetworkPolicy rule's: traffic with the pod's own node passes it).
pub const COOKIE_NP_ISOLATION: u32 = 0xffff_fffe;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub action: u32,
    /// Maps back (in userspace) to the policy and rule that produced the entry.
    pub cookie: u32,
}

/// Conntrack key: the packet's 5-tuple as seen, plus the scope (direction of
/// the program that admitted the flow) so a pod's egress verdict can never
/// stand in for its peer's ingress verdict, plus the endpoint whose program
/// judged it, so an entry made on one pod's veth is never found on
/// another's (a hostile pod cannot plant a verdict for its victim's tuple
/// through an unenforced veth). Endpoint ids are never reused
/// (`endpoints::Registry::id_for`), so a new pod on an old pod's address
/// inherits none of its entries.
///
/// Generic over the address: [`CtKey`] for IPv4, [`CtKey6`] for IPv6 (the
/// same fields, kept in `CONNTRACK` and `CONNTRACK6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKeyOf<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub scope: u8,
    pub _pad: u16,
    /// `EndpointInfo::endpoint_id` of the program that looked it up.
    pub endpoint_id: u32,
}

pub type CtKey = CtKeyOf<u32>;
pub type CtKey6 = CtKeyOf<Ip6>;

impl<A: Copy> CtKeyOf<A> {
    #[inline(always)]
    pub fn reversed(&self, scope: u8) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            protocol: self.protocol,
            scope,
            _pad: 0,
            endpoint_id: self.endpoint_id,
        }
    }
}

/// `CtValue::flags`
pub const CT_AUDIT: u8 = 1;
pub const CT_SEEN_REPLY: u8 = 1 << 1;
/// The flow was translated from a Service frontend (`service`): both of
/// its entries carry this flag.
pub const CT_SVC_NAT: u8 = 1 << 2;
/// IPv4: the original tuple's entry (client -> ClusterIP) of a translated
/// flow; its `nat_*` fields hold the backend. Without it, a `CT_SVC_NAT`
/// entry of IPv4 is the translated tuple's and holds the ClusterIP:port
/// its replies must come from. (IPv6 keeps both in `SVC_NAT6`.)
pub const CT_SVC_FWD: u8 = 1 << 3;
/// IPv4, with `CT_SVC_FWD`: the pod reaches itself through its Service.
pub const CT_SVC_HAIRPIN: u8 = 1 << 4;
/// An ingress entry whose flow reached its pod through the node's IP
/// stack, not by local delivery (`local`): netfilter may have translated
/// it on the way (kube-proxy's NodePort or a Service palisade leaves to
/// it, a hostPort), and only the stack can undo that on the pod's
/// answers, so they are not delivered past it.
pub const CT_VIA_STACK: u8 = 1 << 5;

/// `CONNTRACK` and `CONNTRACK6` value.
///
/// An IPv4 translated flow's two entries carry its translation, so its
/// later packets and replies are rewritten from the entry conntrack
/// already found: no translation map is written when the flow opens or
/// read per packet (only a hairpin's replies, which meet the pod's own
/// ingress entry, keep an `SVC_NAT` entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// ct clock (`bpf_ktime_get_coarse_ns`) after which the entry is dead.
    pub expires_ns: u64,
    pub cookie: u32,
    pub tcp_state: u8,
    pub flags: u8,
    /// IPv4 `CT_SVC_NAT` entries: the port of `nat_addr` (network order).
    pub nat_port_be: u16,
    /// `EndpointInfo::generation` the flow was last judged under.
    pub generation: u32,
    /// IPv4 `CT_SVC_NAT` entries: the backend (`CT_SVC_FWD`) or the
    /// ClusterIP (network order).
    pub nat_addr: u32,
    /// `CT_SVC_NAT` entries of IPv4: the Service, for flow records.
    pub service_id: u32,
    pub _pad: u32,
}

/// Fragment tracking: non-first fragments inherit the first one's verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id_be: u16,
    pub protocol: u8,
    pub scope: u8,
    /// As in `CtKey`: a first fragment judged on one veth says nothing on
    /// another's.
    pub endpoint_id: u32,
}

/// [`FragKey`] of IPv6, whose fragment identification has 32 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey6 {
    pub saddr: Ip6,
    pub daddr: Ip6,
    pub id: u32,
    pub protocol: u8,
    pub scope: u8,
    pub _pad: u16,
    pub endpoint_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragValue {
    pub expires_ns: u64,
    /// VERDICT_* of the first fragment.
    pub verdict: u32,
    pub _pad: u32,
}

pub const FRAG_TIMEOUT_NS: u64 = 30 * 1_000_000_000;

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DROP: u8 = 2;
pub const VERDICT_AUDIT: u8 = 3;

/// Why a verdict was reached. Also the index into the per-CPU `COUNTERS`.
pub mod reason {
    pub const NONE: u8 = 0;
    // Allowed.
    pub const POLICY_ALLOW: u8 = 1;
    pub const UNENFORCED: u8 = 2;
    pub const HOST: u8 = 3;
    pub const ESTABLISHED: u8 = 4;
    pub const REPLY: u8 = 5;
    pub const FRAG_ALLOWED: u8 = 6;
    pub const NOT_IP: u8 = 7;
    /// An ICMP or ICMPv6 error (unreachable, fragmentation needed / packet
    /// too big, time exceeded, parameter problem) about a tracked flow:
    /// passed with that flow, as path MTU discovery needs.
    pub const RELATED: u8 = 8;
    // Dropped (or, in audit mode, would have been).
    pub const NO_POLICY_MATCH: u8 = 16;
    pub const DENY_RULE: u8 = 17;
    pub const SPOOFED_SOURCE: u8 = 18;
    pub const FRAG_UNTRACKED: u8 = 19;
    pub const FRAG_DENIED: u8 = 20;
    pub const IPV6_UNSUPPORTED: u8 = 21;
    pub const MALFORMED: u8 = 22;
    pub const UNSUPPORTED_L3: u8 = 23;
    pub const XDP_DENYLIST: u8 = 24;
    /// A new flow to a Service frontend without backends.
    pub const NO_SERVICE_BACKEND: u8 = 25;
    /// The translation entry could not be written (SVC_NAT full).
    pub const SVC_NAT_FAILED: u8 = 26;
    /// A frame on the way to a pod whose destination is not that pod's
    /// address (nor broadcast or multicast): never the pod's traffic.
    pub const NOT_OWN_DESTINATION: u8 = 27;
    /// A packet of a tracked flow that the endpoint's current policy no
    /// longer admits (its generation changed, or audit mode ended): the
    /// entry is deleted and the flow cut.
    pub const POLICY_CHANGED: u8 = 28;
    /// A new flow whose conntrack entry its verdicts depend on, from or
    /// to an endpoint that has spent its conntrack budget (`ct_budget`).
    pub const CT_BUDGET: u8 = 29;
    /// A frame from a pod whose source MAC is not the pod's, or an ARP
    /// packet from it that claims another address.
    pub const SPOOFED_MAC: u8 = 30;
    /// IPv6 neighbour discovery a pod may not send (router advertisement,
    /// redirect), or any with a hop limit other than 255.
    pub const ND_FORBIDDEN: u8 = 31;
    // Bookkeeping.
    pub const EVENTS_LOST: u8 = 32;
    pub const XDP_PASS: u8 = 33;
    /// A new flow translated from a Service frontend to a backend.
    pub const SVC_TRANSLATED: u8 = 34;
    /// An event left out by the per-endpoint budget (`event_limit`); the
    /// verdict itself was counted under its own reason.
    pub const EVENTS_SUPPRESSED: u8 = 35;
    /// A new flow or first fragment passed without an entry because its
    /// endpoint's conntrack budget was spent (`ct_budget`).
    pub const CT_BUDGET_UNTRACKED: u8 = 36;
    /// A DNS answer to a pod with domain rules, held for the agent (`dns`).
    pub const DNS_HELD: u8 = 37;
    /// A DNS answer passed unheld: the hold ring was full.
    pub const DNS_HOLD_FULL: u8 = 38;
    /// A DNS answer passed unheld: the frame is larger than a held record.
    pub const DNS_TOO_LARGE: u8 = 39;
    // Dropped (the range after the bookkeeping ones).
    /// UDP from a pod to a tunnel port (VXLAN, Geneve) of a node: the node
    /// would decapsulate it and forward its inner packet, whatever source
    /// that claims, past the pod's anti-spoofing and policy.
    pub const TUNNEL_FROM_POD: u8 = 40;
    /// Host protection: a new flow from a pod to its own node on a port
    /// the node does not list.
    pub const HOST_PROTECTED: u8 = 41;

    pub const MAX: u32 = 64;

    pub fn name(r: u8) -> &'static str {
        match r {
            POLICY_ALLOW => "policy-allow",
            UNENFORCED => "unenforced",
            HOST => "host",
            ESTABLISHED => "established",
            REPLY => "reply",
            FRAG_ALLOWED => "fragment-allowed",
            NOT_IP => "not-ip",
            RELATED => "related",
            NO_POLICY_MATCH => "no-policy-match",
            DENY_RULE => "deny-rule",
            SPOOFED_SOURCE => "spoofed-source",
            FRAG_UNTRACKED => "fragment-untracked",
            FRAG_DENIED => "fragment-denied",
            IPV6_UNSUPPORTED => "ipv6-unsupported",
            MALFORMED => "malformed-header",
            UNSUPPORTED_L3 => "unsupported-l3",
            XDP_DENYLIST => "xdp-denylist",
            NO_SERVICE_BACKEND => "no-service-backend",
            EVENTS_LOST => "events-lost",
            XDP_PASS => "xdp-pass",
            SVC_TRANSLATED => "service-translated",
            SVC_NAT_FAILED => "service-nat-failed",
            NOT_OWN_DESTINATION => "not-own-destination",
            POLICY_CHANGED => "policy-changed",
            ND_FORBIDDEN => "nd-forbidden",
            EVENTS_SUPPRESSED => "events-suppressed",
            CT_BUDGET => "conntrack-budget",
            SPOOFED_MAC => "spoofed-mac",
            CT_BUDGET_UNTRACKED => "conntrack-budget-untracked",
            DNS_HELD => "dns-held",
            DNS_HOLD_FULL => "dns-hold-full",
            DNS_TOO_LARGE => "dns-too-large",
            TUNNEL_FROM_POD => "tunnel-from-pod",
            HOST_PROTECTED => "host-protected",
            _ => "none",
        }
    }

    pub fn is_drop(r: u8) -> bool {
        (NO_POLICY_MATCH..EVENTS_LOST).contains(&r) || (40..MAX as u8).contains(&r)
    }
}

/// The IPv4 path's record in `EVENTS`: the first 64 bytes of [`FlowEvent`]
/// (the reader tells the two apart by length), kept short because the
/// IPv4 programs build it on their stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowEvent4 {
    pub ts_ns: u64,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub cookie: u32,
    /// The Service frontend (`SvcFrontend::service_id`) the flow was
    /// translated from, 0 when it was not; the 5-tuple is the translated one.
    pub service_id: u32,
    /// Events of the same endpoint left out by its budget (`event_limit`)
    /// since its previous event on this CPU: drops, other events, and the
    /// drop reasons (bit `r` for reason `r`).
    pub suppressed_drops: u32,
    pub suppressed_flows: u32,
    pub suppressed_reasons: u64,
}

/// A verdict record in the `EVENTS` ring buffer: one per new flow and one
/// per dropped packet, never one per forwarded packet of a known flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowEvent {
    pub ts_ns: u64,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub cookie: u32,
    /// The Service frontend (`SvcFrontend::service_id`) the flow was
    /// translated from, 0 when it was not; the 5-tuple is the translated one.
    pub service_id: u32,
    /// Events of the same endpoint left out by its budget (`event_limit`)
    /// since its previous event on this CPU: drops, other events, and the
    /// drop reasons (bit `r` for reason `r`).
    pub suppressed_drops: u32,
    pub suppressed_flows: u32,
    pub suppressed_reasons: u64,
    /// 4 or 6. An IPv6 event has its addresses in `saddr6`/`daddr6` (and
    /// zero in `saddr`/`daddr`); an IPv4 one (written as a [`FlowEvent4`])
    /// has zero there.
    pub family: u32,
    pub _pad: u32,
    pub saddr6: Ip6,
    pub daddr6: Ip6,
}

impl From<FlowEvent4> for FlowEvent {
    fn from(e: FlowEvent4) -> Self {
        FlowEvent {
            ts_ns: e.ts_ns,
            endpoint_id: e.endpoint_id,
            ifindex: e.ifindex,
            saddr: e.saddr,
            daddr: e.daddr,
            sport_be: e.sport_be,
            dport_be: e.dport_be,
            protocol: e.protocol,
            direction: e.direction,
            verdict: e.verdict,
            reason: e.reason,
            src_identity: e.src_identity,
            dst_identity: e.dst_identity,
            cookie: e.cookie,
            service_id: e.service_id,
            suppressed_drops: e.suppressed_drops,
            suppressed_flows: e.suppressed_flows,
            suppressed_reasons: e.suppressed_reasons,
            family: 4,
            _pad: 0,
            saddr6: [0; 4],
            daddr6: [0; 4],
        }
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no padding bytes or
    // invalid bit patterns.
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for EndpointSlot {}
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for FragKey6 {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for FlowEvent4 {}
    unsafe impl aya::Pod for crate::event_limit::EventBudget {}
    unsafe impl aya::Pod for crate::event_limit::EventLimitKey {}
    unsafe impl aya::Pod for crate::event_limit::EventLimitState {}
    unsafe impl aya::Pod for crate::ct_budget::CtBudget {}
    unsafe impl aya::Pod for crate::ct_budget::CtCharge {}
    unsafe impl aya::Pod for service::SvcFrontendKey {}
    unsafe impl aya::Pod for service::SvcFrontend {}
    unsafe impl aya::Pod for service::SvcBackendKey {}
    unsafe impl aya::Pod for service::SvcBackend {}
    unsafe impl aya::Pod for service::SvcNat {}
    unsafe impl aya::Pod for service::SvcAffinityKey {}
    unsafe impl aya::Pod for service::SvcAffinity {}
    unsafe impl aya::Pod for service::SvcFrontendKey6 {}
    unsafe impl aya::Pod for service::SvcBackend6 {}
    unsafe impl aya::Pod for service::SvcNat6 {}
    unsafe impl aya::Pod for service::SvcAffinityKey6 {}
    unsafe impl aya::Pod for service::SvcAffinity6 {}
    unsafe impl aya::Pod for crate::dns::DnsServerKey {}
    unsafe impl aya::Pod for crate::dns::DnsServerKey6 {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<EndpointKey>(), 8);
        assert_eq!(size_of::<EndpointInfo>(), 44);
        assert_eq!(size_of::<EndpointSlot>(), 52);
        assert_eq!(size_of::<IpcacheValue>(), 8);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<PolicyKey>() as u32 * 8, POLICY_PREFIX_FULL);
        assert_eq!(size_of::<PolicyValue>(), 8);
        assert_eq!(size_of::<CtKey>(), 20);
        assert_eq!(size_of::<CtKey6>(), 44);
        assert_eq!(size_of::<FragKey6>(), 44);
        assert_eq!(size_of::<CtValue>(), 32);
        assert_eq!(size_of::<FragKey>(), 16);
        assert_eq!(size_of::<FragValue>(), 16);
        assert_eq!(size_of::<FlowEvent>(), 104);
        assert_eq!(size_of::<FlowEvent4>(), 64);
        assert_eq!(size_of::<event_limit::EventLimitState>(), 32);
        assert_eq!(size_of::<ct_budget::CtBudget>(), 8);
        assert_eq!(size_of::<ct_budget::CtCharge>(), 16);
    }

    #[test]
    fn a_slot_read_copies_every_byte_of_the_endpoint() {
        let info = EndpointInfo {
            endpoint_id: 0x0102_0304,
            identity: 0x0506_0708,
            ipv4: 0x090a_0b0c,
            flags: 0x0d0e_0f10,
            generation: 0x1112_1314,
            mac: [0x15, 0x16, 0x17, 0x18, 0x19, 0x1a],
            _pad: [0x1b, 0x1c],
            ipv6: [0x1d1e_1f20, 0x2122_2324, 0x2526_2728, 0x292a_2b2c],
        };
        let slot = EndpointSlot {
            seq: 4,
            ifindex: 9,
            info,
        };
        // SAFETY: a valid slot.
        assert_eq!(unsafe { slot_read(&slot, 9) }, Some(info));
        let odd = EndpointSlot { seq: 5, ..slot };
        // SAFETY: as above.
        assert_eq!(unsafe { slot_read(&odd, 9) }, None, "mid-write");
    }

    #[test]
    fn drop_reasons_are_classified() {
        assert!(reason::is_drop(reason::NO_POLICY_MATCH));
        assert!(reason::is_drop(reason::XDP_DENYLIST));
        assert!(!reason::is_drop(reason::POLICY_ALLOW));
        assert!(!reason::is_drop(reason::EVENTS_LOST));
    }
}
