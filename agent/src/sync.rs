//! Map sync: applies only the difference between what the kernel maps hold
//! and what the compiler wants, in an order that never shows a flow a
//! state stricter or looser than either the old or the new policy:
//!
//! 1. policy upserts     (allows for new identities exist before they are used)
//! 2. ipcache upserts    (addresses move to new identities)
//! 3. endpoint upserts   (enforcement switches on after its rules are in)
//! 4. endpoint removals
//! 5. ipcache removals
//! 6. policy removals    (rules go only once nothing can reach them)
//! 7. generation bumps   (`EndpointInfo::generation`, last: every tracked
//!    flow of an endpoint whose verdicts may have changed is judged again
//!    on its next packet, against the maps as they now are)
//!
//! Before all of it, step 0: an endpoint about to get its first policy
//! entry of a class has that class's "no entries" bit cleared
//! (`palisade_common::no_entries_bit`: the programs skip the lookups, or
//! the part of the policy map (the hash of one-port entries, the trie of
//! wider ones), that could only hit entries of a class the endpoint has
//! none of; a class is a peer class and a length,
//! `palisade_common::entry_class`). The bits are set again in step
//! 7, for the classes the kernel then holds no entry of. So a bit is only
//! ever set while no entry it would hide exists: a skipped lookup is one
//! that could not have hit. The counts behind them are kept beside the
//! kernel mirror ([`Mirror`]), not recounted per sync.
//!
//! The generation (and the "no entries" bits) belong to the sync, not the
//! compiler: the compiler's endpoint values carry 0, compared without
//! them, and written with what the kernel holds. It is bumped for an endpoint whose policy
//! entries were written or removed or whose own value changed (flags:
//! enforcement, audit), and for every endpoint when an address already in
//! the ipcache changed or lost its identity (a peer's labels changed: the
//! verdict on any flow with it may differ). A new address does not bump
//! anything. So one pod's policy change re-judges that pod's flows only.
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::{Ipv4Addr, Ipv6Addr},
};

use palisade_common::{
    entry_class, no_entries_bit, EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, DIR_EGRESS,
    DIR_INGRESS, ENTRY_CLASSES, EP_NO_ENTRIES_MASK,
};
use palisade_dataplane::{MapState, Maps};

use crate::compiler::Touched;

/// What the kernel maps hold, and how many policy entries of each entry
/// class every endpoint id has per direction (for the "no entries" bits,
/// see the module doc). Read as a [`MapState`]; changed only by the sync,
/// which keeps the two together.
#[derive(Debug, Default, Clone)]
pub struct Mirror {
    state: MapState,
    classes: HashMap<(u32, u8, u32), u32>,
    /// Interfaces whose last endpoint write failed: the kernel may hold
    /// the value that was being written (an endpoint is written to three
    /// places), "no entries" bits included, not the mirror's.
    unsure: HashSet<u32>,
}

impl Mirror {
    pub fn new(state: MapState) -> Self {
        let mut classes: HashMap<_, u32> = HashMap::new();
        for (prefix, k) in state.policy.keys() {
            *classes.entry(Self::class_of(*prefix, k)).or_default() += 1;
        }
        Self {
            state,
            classes,
            unsure: HashSet::new(),
        }
    }

    fn class_of(prefix: u32, k: &PolicyKey) -> (u32, u8, u32) {
        (
            k.endpoint_id,
            k.direction,
            entry_class(prefix, k.peer_identity),
        )
    }

    fn insert_policy(&mut self, k: (u32, PolicyKey), v: PolicyValue) {
        if self.state.policy.insert(k, v).is_none() {
            *self.classes.entry(Self::class_of(k.0, &k.1)).or_default() += 1;
        }
    }

    fn remove_policy(&mut self, k: &(u32, PolicyKey)) {
        if self.state.policy.remove(k).is_some() {
            let c = Self::class_of(k.0, &k.1);
            if let Some(n) = self.classes.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.classes.remove(&c);
                }
            }
        }
    }

    /// Whether the kernel holds an entry of `class` (`Self::class_of`).
    fn has_class(&self, class: &(u32, u8, u32)) -> bool {
        self.classes.contains_key(class)
    }

    /// The "no entries" bits endpoint id `id` may carry now.
    pub fn no_entries_bits(&self, id: u32) -> u32 {
        let mut bits = 0;
        for dir in [DIR_EGRESS, DIR_INGRESS] {
            for class in 0..ENTRY_CLASSES {
                if !self.has_class(&(id, dir, class)) {
                    bits |= no_entries_bit(dir, class);
                }
            }
        }
        bits
    }
}

impl std::ops::Deref for Mirror {
    type Target = MapState;
    fn deref(&self) -> &MapState {
        &self.state
    }
}

/// The changes that turn one map state into another.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub policy_upserts: Vec<((u32, PolicyKey), PolicyValue)>,
    pub ipcache_upserts: Vec<((Ipv4Addr, u32), IpcacheValue)>,
    pub endpoint_upserts: Vec<(u32, EndpointInfo)>,
    pub endpoint_removals: Vec<(u32, EndpointInfo)>,
    pub ipcache_removals: Vec<(Ipv4Addr, u32)>,
    pub policy_removals: Vec<(u32, PolicyKey)>,
    /// IPv6 ipcache entries, written and removed beside the IPv4 ones.
    pub ipcache6_upserts: Vec<((Ipv6Addr, u32), IpcacheValue)>,
    pub ipcache6_removals: Vec<(Ipv6Addr, u32)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.policy_upserts.len()
            + self.ipcache_upserts.len()
            + self.endpoint_upserts.len()
            + self.endpoint_removals.len()
            + self.ipcache_removals.len()
            + self.policy_removals.len()
            + self.ipcache6_upserts.len()
            + self.ipcache6_removals.len()
    }
}

/// Entries to write and entries to delete.
type Changes<K, V> = (Vec<(K, V)>, Vec<(K, V)>);

fn changed<K: Eq + Hash + Clone, V: PartialEq + Clone>(
    cur: &HashMap<K, V>,
    want: &HashMap<K, V>,
) -> Changes<K, V> {
    let upserts = want
        .iter()
        .filter(|(k, v)| cur.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let removals = cur
        .iter()
        .filter(|(k, _)| !want.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (upserts, removals)
}

pub fn diff(cur: &MapState, want: &MapState) -> Diff {
    let (policy_upserts, pr) = changed(&cur.policy, &want.policy);
    let (ipcache_upserts, ir) = changed(&cur.ipcache, &want.ipcache);
    let (ipcache6_upserts, ir6) = changed(&cur.ipcache6, &want.ipcache6);
    let (endpoint_upserts, endpoint_removals) = endpoint_changes(cur, want);
    Diff {
        policy_upserts,
        ipcache_upserts,
        endpoint_upserts,
        endpoint_removals,
        ipcache_removals: ir.into_iter().map(|(k, _)| k).collect(),
        policy_removals: pr.into_iter().map(|(k, _)| k).collect(),
        ipcache6_upserts,
        ipcache6_removals: ir6.into_iter().map(|(k, _)| k).collect(),
    }
}

/// `s` with every endpoint's generation and "no entries" bits 0: map
/// states compared for what the compiler decides (those are the sync's).
pub fn without_generations(s: &MapState) -> MapState {
    let mut s = s.clone();
    for v in s.endpoints.values_mut() {
        *v = compiler_part(v);
    }
    s
}

/// An endpoint value without what the sync owns.
fn compiler_part(v: &EndpointInfo) -> EndpointInfo {
    EndpointInfo {
        generation: 0,
        flags: v.flags & !EP_NO_ENTRIES_MASK,
        ..*v
    }
}

/// Endpoint values equal but for what the sync keeps.
fn same_endpoint(a: &EndpointInfo, b: &EndpointInfo) -> bool {
    compiler_part(a) == compiler_part(b)
}

/// The value to write: `want` with the generation and "no entries" bits
/// the kernel holds.
fn with_generation(cur: Option<&EndpointInfo>, want: &EndpointInfo) -> EndpointInfo {
    let want = compiler_part(want);
    EndpointInfo {
        generation: cur.map_or(0, |c| c.generation),
        flags: want.flags | cur.map_or(0, |c| c.flags & EP_NO_ENTRIES_MASK),
        ..want
    }
}

fn endpoint_changes(cur: &MapState, want: &MapState) -> Changes<u32, EndpointInfo> {
    let upserts = want
        .endpoints
        .iter()
        .filter(|(k, v)| !cur.endpoints.get(*k).is_some_and(|c| same_endpoint(c, v)))
        .map(|(k, v)| (*k, with_generation(cur.endpoints.get(k), v)))
        .collect();
    let removals = cur
        .endpoints
        .iter()
        .filter(|(k, _)| !want.endpoints.contains_key(*k))
        .map(|(k, v)| (*k, *v))
        .collect();
    (upserts, removals)
}

/// The endpoint ids whose policy entries or own value a diff changes:
/// their tracked flows are judged again, their "no entries" bits redone.
fn changed_ids(d: &Diff) -> HashSet<u32> {
    d.policy_upserts
        .iter()
        .map(|((_, k), _)| k.endpoint_id)
        .chain(d.policy_removals.iter().map(|(_, k)| k.endpoint_id))
        .chain(d.endpoint_upserts.iter().map(|(_, v)| v.endpoint_id))
        .collect()
}

/// Whether a diff may change the verdict on every endpoint's tracked
/// flows, not only those of the `changed` ids.
fn bumps_all(current: &MapState, d: &Diff, changed: &HashSet<u32>) -> bool {
    let peer_changed = d
        .ipcache_upserts
        .iter()
        .any(|(k, _)| current.ipcache.contains_key(k))
        || !d.ipcache_removals.is_empty()
        || d.ipcache6_upserts
            .iter()
            .any(|(k, _)| current.ipcache6.contains_key(k))
        || !d.ipcache6_removals.is_empty();
    // The node's open ports (host protection) are every endpoint's.
    peer_changed || changed.contains(&palisade_common::HOST_PORTS_ENDPOINT)
}

/// A sync that could not write everything. Whatever could be written was
/// (`current` mirrors exactly what the kernel holds), so the failure closes
/// rather than opens: missing allows are drops, enforcement is still on.
#[derive(Debug, thiserror::Error)]
#[error("map sync left {failed} of {total} changes unwritten: {source}")]
pub struct SyncError {
    pub failed: usize,
    pub total: usize,
    #[source]
    pub source: palisade_dataplane::Error,
}

/// The kernel side of a sync; `Maps` in production, a recorder in tests.
pub trait MapWriter {
    fn upsert_policy(
        &mut self,
        prefix: u32,
        k: PolicyKey,
        v: PolicyValue,
    ) -> Result<(), palisade_dataplane::Error>;
    fn remove_policy(&mut self, prefix: u32, k: PolicyKey)
        -> Result<(), palisade_dataplane::Error>;
    fn upsert_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), palisade_dataplane::Error>;
    fn remove_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix: u32,
    ) -> Result<(), palisade_dataplane::Error>;
    fn upsert_endpoint(
        &mut self,
        ifindex: u32,
        v: EndpointInfo,
    ) -> Result<(), palisade_dataplane::Error>;
    fn remove_endpoint(
        &mut self,
        ifindex: u32,
        ipv4_be: u32,
    ) -> Result<(), palisade_dataplane::Error>;
    fn upsert_ipcache6(
        &mut self,
        addr: Ipv6Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), palisade_dataplane::Error>;
    fn remove_ipcache6(
        &mut self,
        addr: Ipv6Addr,
        prefix: u32,
    ) -> Result<(), palisade_dataplane::Error>;
}

impl MapWriter for Maps {
    fn upsert_policy(
        &mut self,
        prefix: u32,
        k: PolicyKey,
        v: PolicyValue,
    ) -> Result<(), palisade_dataplane::Error> {
        self.set_policy(prefix, k, v)
    }
    fn remove_policy(
        &mut self,
        prefix: u32,
        k: PolicyKey,
    ) -> Result<(), palisade_dataplane::Error> {
        Maps::remove_policy(self, prefix, k)
    }
    fn upsert_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), palisade_dataplane::Error> {
        self.set_ipcache(addr, prefix, v)
    }
    fn remove_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix: u32,
    ) -> Result<(), palisade_dataplane::Error> {
        Maps::remove_ipcache(self, addr, prefix)
    }
    fn upsert_ipcache6(
        &mut self,
        addr: Ipv6Addr,
        prefix: u32,
        v: IpcacheValue,
    ) -> Result<(), palisade_dataplane::Error> {
        self.set_ipcache6(addr, prefix, v)
    }
    fn remove_ipcache6(
        &mut self,
        addr: Ipv6Addr,
        prefix: u32,
    ) -> Result<(), palisade_dataplane::Error> {
        Maps::remove_ipcache6(self, addr, prefix)
    }
    fn upsert_endpoint(
        &mut self,
        ifindex: u32,
        v: EndpointInfo,
    ) -> Result<(), palisade_dataplane::Error> {
        Maps::upsert_endpoint(self, ifindex, v)
    }
    fn remove_endpoint(
        &mut self,
        ifindex: u32,
        ipv4_be: u32,
    ) -> Result<(), palisade_dataplane::Error> {
        Maps::remove_endpoint(self, ifindex, ipv4_be)
    }
}

/// Apply `want` on top of `current` (which mirrors the kernel) and keep the
/// mirror exact. A write that fails (e.g. a full map) does not stop the
/// sync: every other change is still made, in order, so enforcement still
/// switches on and stale allows still go; then, since removals may have
/// freed room, what failed is tried once more.
pub fn apply(
    w: &mut impl MapWriter,
    current: &mut Mirror,
    want: &MapState,
) -> Result<usize, SyncError> {
    let total = diff(current, want).len();
    let mut applied = 0;
    let mut failure = None;
    for _pass in 0..2 {
        // (A full sync also brings every endpoint's "no entries" bits up
        // to date: after a restart, the kernel's are an older agent's.)
        let (n, f) = apply_once(w, current, diff(current, want), true);
        applied += n;
        failure = f;
        if failure.is_none() {
            break;
        }
    }
    match failure {
        None => Ok(applied),
        Some(source) => Err(SyncError {
            failed: diff(current, want).len(),
            total,
            source,
        }),
    }
}

/// The changes among the `touched` keys only (what the engine says may
/// have changed): the same [`Diff`] as [`diff`] restricted to those keys.
pub fn diff_touched(cur: &MapState, want: &MapState, touched: &Touched) -> Diff {
    let mut d = Diff::default();
    for k in &touched.policy {
        match (cur.policy.get(k), want.policy.get(k)) {
            (c, Some(w)) if c != Some(w) => d.policy_upserts.push((*k, *w)),
            (Some(_), None) => d.policy_removals.push(*k),
            _ => {}
        }
    }
    for k in &touched.ipcache {
        match (cur.ipcache.get(k), want.ipcache.get(k)) {
            (c, Some(w)) if c != Some(w) => d.ipcache_upserts.push((*k, *w)),
            (Some(_), None) => d.ipcache_removals.push(*k),
            _ => {}
        }
    }
    for k in &touched.ipcache6 {
        match (cur.ipcache6.get(k), want.ipcache6.get(k)) {
            (c, Some(w)) if c != Some(w) => d.ipcache6_upserts.push((*k, *w)),
            (Some(_), None) => d.ipcache6_removals.push(*k),
            _ => {}
        }
    }
    for k in &touched.endpoints {
        match (cur.endpoints.get(k), want.endpoints.get(k)) {
            (c, Some(w)) if !c.is_some_and(|c| same_endpoint(c, w)) => {
                d.endpoint_upserts.push((*k, with_generation(c, w)))
            }
            (Some(c), None) => d.endpoint_removals.push((*k, *c)),
            _ => {}
        }
    }
    d
}

/// [`apply`] for the keys in `touched` only: the same order, the same
/// write-what-fits-then-retry-once behaviour, in time proportional to the
/// change rather than to the maps. On error, the keys still differing are
/// among `touched`: hand them back to the engine ([`crate::compiler::Engine::retouch`])
/// so the next sync retries them.
pub fn apply_touched(
    w: &mut impl MapWriter,
    current: &mut Mirror,
    want: &MapState,
    touched: &Touched,
) -> Result<usize, SyncError> {
    let total = diff_touched(current, want, touched).len();
    let mut applied = 0;
    let mut failure = None;
    for _pass in 0..2 {
        let (n, f) = apply_once(w, current, diff_touched(current, want, touched), false);
        applied += n;
        failure = f;
        if failure.is_none() {
            break;
        }
    }
    match failure {
        None => Ok(applied),
        Some(source) => Err(SyncError {
            failed: diff_touched(current, want, touched).len(),
            total,
            source,
        }),
    }
}

/// One ordered pass; (changes made, first error). `all_bits`: bring every
/// endpoint's "no entries" bits up to date, not only those of endpoints
/// the pass changes.
fn apply_once(
    w: &mut impl MapWriter,
    current: &mut Mirror,
    mut d: Diff,
    all_bits: bool,
) -> (usize, Option<palisade_dataplane::Error>) {
    let mut applied = 0;
    let mut first = None;
    let changed = changed_ids(&d);
    let bump_all = bumps_all(&current.state, &d, &changed);
    // 0. Lookups of a class about to get its first entry run again first;
    // where that could not be written, neither are the entries.
    let blocked = open_classes(w, current, &d, &mut first);
    if !blocked.is_empty() {
        d.policy_upserts.retain(|((prefix, k), _)| {
            let bit = no_entries_bit(k.direction, entry_class(*prefix, k.peer_identity));
            blocked.get(&k.endpoint_id).is_none_or(|b| b & bit == 0)
        });
    }
    let mut done = |r: Result<(), palisade_dataplane::Error>| match r {
        Ok(()) => {
            applied += 1;
            true
        }
        Err(e) => {
            first.get_or_insert(e);
            false
        }
    };
    for ((prefix, k), v) in d.policy_upserts {
        if done(w.upsert_policy(prefix, k, v)) {
            current.insert_policy((prefix, k), v);
        }
    }
    let state = &mut current.state;
    for ((addr, prefix), v) in d.ipcache_upserts {
        if done(w.upsert_ipcache(addr, prefix, v)) {
            state.ipcache.insert((addr, prefix), v);
        }
    }
    for ((addr, prefix), v) in d.ipcache6_upserts {
        if done(w.upsert_ipcache6(addr, prefix, v)) {
            state.ipcache6.insert((addr, prefix), v);
        }
    }
    for (ifindex, mut v) in d.endpoint_upserts {
        // A pod whose address changed must not keep its old by-IP entry.
        let moved = state
            .endpoints
            .get(&ifindex)
            .filter(|old| old.ipv4 != v.ipv4)
            .copied();
        // The bits as the kernel holds them now (step 0 may have cleared
        // some since the diff was taken); none for a moved pod, whose
        // value may outlive the mirror's if this fails.
        let bits = match moved {
            Some(_) => 0,
            None => state
                .endpoints
                .get(&ifindex)
                .map_or(0, |c| c.flags & EP_NO_ENTRIES_MASK),
        };
        v.flags = v.flags & !EP_NO_ENTRIES_MASK | bits;
        let r = match moved {
            Some(old) => w
                .remove_endpoint(ifindex, old.ipv4)
                .and_then(|()| w.upsert_endpoint(ifindex, v)),
            None => w.upsert_endpoint(ifindex, v),
        };
        if done(r) {
            state.endpoints.insert(ifindex, v);
            current.unsure.remove(&ifindex);
        } else {
            current.unsure.insert(ifindex);
            if moved.is_some() {
                // Both indexes of the old address may be gone: fail closed.
                // (Should the removal also have half failed, the kernel may
                // keep the old value, bits included, unseen by step 0 until
                // the next sync writes the pod again: two failures of
                // writes that do not fail in practice.)
                state.endpoints.remove(&ifindex);
            }
        }
    }
    for (ifindex, v) in d.endpoint_removals {
        if done(w.remove_endpoint(ifindex, v.ipv4)) {
            state.endpoints.remove(&ifindex);
        }
    }
    for (addr, prefix) in d.ipcache_removals {
        if done(w.remove_ipcache(addr, prefix)) {
            state.ipcache.remove(&(addr, prefix));
        }
    }
    for (addr, prefix) in d.ipcache6_removals {
        if done(w.remove_ipcache6(addr, prefix)) {
            state.ipcache6.remove(&(addr, prefix));
        }
    }
    for (prefix, k) in d.policy_removals {
        if done(w.remove_policy(prefix, k)) {
            current.remove_policy(&(prefix, k));
        }
    }
    // Not counted as changes: they follow from the ones above. The bits
    // are set only now, once every removal has been made (a bit set
    // earlier could hide an entry still in the map).
    let rewritten: Vec<(u32, EndpointInfo)> = current
        .state
        .endpoints
        .iter()
        .filter_map(|(k, v)| {
            let mut n = *v;
            let changed = changed.contains(&v.endpoint_id);
            if bump_all || changed {
                n.generation = n.generation.wrapping_add(1);
            }
            if all_bits || changed {
                n.flags = n.flags & !EP_NO_ENTRIES_MASK | current.no_entries_bits(v.endpoint_id);
            }
            (n != *v).then_some((*k, n))
        })
        .collect();
    for (ifindex, v) in rewritten {
        if let Err(e) = w.upsert_endpoint(ifindex, v) {
            first.get_or_insert(e);
            current.unsure.insert(ifindex);
        } else {
            current.state.endpoints.insert(ifindex, v);
            current.unsure.remove(&ifindex);
        }
    }
    (applied, first)
}

/// Step 0 of a pass: clear the "no entries" bit of every endpoint that
/// `d` writes the first entry of a class for. Returns, by endpoint id, the
/// bits that could not be cleared: their classes' entries must not be
/// written yet.
fn open_classes(
    w: &mut impl MapWriter,
    current: &mut Mirror,
    d: &Diff,
    first: &mut Option<palisade_dataplane::Error>,
) -> HashMap<u32, u32> {
    // Classes with no entry in the kernel yet (a bit can only be set then).
    let mut opening: HashMap<u32, u32> = HashMap::new();
    for ((prefix, k), _) in &d.policy_upserts {
        let c = Mirror::class_of(*prefix, k);
        if !current.has_class(&c) {
            *opening.entry(c.0).or_default() |= no_entries_bit(c.1, c.2);
        }
    }
    let mut blocked = HashMap::new();
    if opening.is_empty() {
        return blocked;
    }
    let clear: Vec<(u32, EndpointInfo)> = current
        .state
        .endpoints
        .iter()
        // Also where the mirror shows the bits clear but a failed write
        // may have set them in the kernel.
        .filter_map(|(k, v)| {
            let bits = opening.get(&v.endpoint_id)?;
            (v.flags & bits != 0 || current.unsure.contains(k)).then_some((
                *k,
                EndpointInfo {
                    flags: v.flags & !bits,
                    ..*v
                },
            ))
        })
        .collect();
    for (ifindex, v) in clear {
        match w.upsert_endpoint(ifindex, v) {
            Ok(()) => {
                current.state.endpoints.insert(ifindex, v);
                current.unsure.remove(&ifindex);
            }
            Err(e) => {
                first.get_or_insert(e);
                current.unsure.insert(ifindex);
                blocked.insert(v.endpoint_id, opening[&v.endpoint_id]);
            }
        }
    }
    blocked
}

/// What the kernel maps hold now (after a restart, before the first sync).
pub fn read_back(maps: &Maps) -> MapState {
    maps.read_state()
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_common::{ACTION_ALLOW, DIR_INGRESS, EP_INGRESS_ENFORCED, PROTO_TCP};

    #[derive(Default)]
    struct Recorder {
        ops: Vec<String>,
        /// Every op starting with this fails.
        fail_on: Option<String>,
        /// Policy map capacity, and entries in it.
        capacity: Option<usize>,
        policies: usize,
    }

    impl Recorder {
        fn op(&mut self, s: String) -> Result<(), palisade_dataplane::Error> {
            let full = palisade_dataplane::Error::MapFull {
                name: "POLICY",
                entries: 1,
            };
            if self
                .fail_on
                .as_ref()
                .is_some_and(|f| s.starts_with(f.as_str()))
            {
                return Err(full);
            }
            if s.starts_with("policy+") {
                if self.capacity.is_some_and(|c| self.policies >= c) {
                    return Err(full);
                }
                self.policies += 1;
            }
            if s.starts_with("policy-") {
                self.policies = self.policies.saturating_sub(1);
            }
            self.ops.push(s);
            Ok(())
        }
    }

    impl MapWriter for Recorder {
        fn upsert_policy(
            &mut self,
            p: u32,
            k: PolicyKey,
            _: PolicyValue,
        ) -> Result<(), palisade_dataplane::Error> {
            self.op(format!("policy+ {p} {}", k.peer_identity))
        }
        fn remove_policy(&mut self, p: u32, k: PolicyKey) -> Result<(), palisade_dataplane::Error> {
            self.op(format!("policy- {p} {}", k.peer_identity))
        }
        fn upsert_ipcache(
            &mut self,
            a: Ipv4Addr,
            p: u32,
            v: IpcacheValue,
        ) -> Result<(), palisade_dataplane::Error> {
            self.op(format!("ipcache+ {a}/{p} {}", v.identity))
        }
        fn remove_ipcache(&mut self, a: Ipv4Addr, p: u32) -> Result<(), palisade_dataplane::Error> {
            self.op(format!("ipcache- {a}/{p}"))
        }
        fn upsert_ipcache6(
            &mut self,
            a: Ipv6Addr,
            p: u32,
            v: IpcacheValue,
        ) -> Result<(), palisade_dataplane::Error> {
            self.op(format!("ipcache6+ {a}/{p} {}", v.identity))
        }
        fn remove_ipcache6(
            &mut self,
            a: Ipv6Addr,
            p: u32,
        ) -> Result<(), palisade_dataplane::Error> {
            self.op(format!("ipcache6- {a}/{p}"))
        }
        fn upsert_endpoint(
            &mut self,
            i: u32,
            v: EndpointInfo,
        ) -> Result<(), palisade_dataplane::Error> {
            // (The "no entries" bits are checked by `Kernel`'s tests.)
            self.op(format!("endpoint+ {i} {}", v.flags & !EP_NO_ENTRIES_MASK))
        }
        fn remove_endpoint(&mut self, i: u32, _: u32) -> Result<(), palisade_dataplane::Error> {
            self.op(format!("endpoint- {i}"))
        }
    }

    fn key(peer: u32) -> PolicyKey {
        PolicyKey {
            endpoint_id: 1,
            peer_identity: peer,
            direction: DIR_INGRESS,
            protocol: PROTO_TCP,
            dport_be: 80u16.to_be(),
        }
    }

    fn state(peer: u32, enforced: bool) -> MapState {
        let mut s = MapState::default();
        let flags = if enforced { EP_INGRESS_ENFORCED } else { 0 };
        s.endpoints.insert(
            7,
            EndpointInfo {
                endpoint_id: 1,
                identity: 300,
                ipv4: 1,
                flags,
                generation: 0,
                mac: [0; 6],
                _pad: [0; 2],
                ipv6: [0; 4],
            },
        );
        s.ipcache.insert(
            (Ipv4Addr::new(10, 0, 0, 2), 32),
            IpcacheValue {
                identity: peer,
                cidr_identity: 2,
            },
        );
        s.policy.insert(
            (96, key(peer)),
            PolicyValue {
                action: ACTION_ALLOW,
                cookie: 1,
            },
        );
        s
    }

    #[test]
    fn identity_change_adds_rules_before_moving_addresses_and_removes_after() {
        let mut cur = Mirror::new(state(400, true));
        let want = state(401, true);
        let mut r = Recorder::default();
        assert_eq!(apply(&mut r, &mut cur, &want).unwrap(), 3);
        assert_eq!(
            r.ops,
            [
                "policy+ 96 401",
                "ipcache+ 10.0.0.2/32 401",
                "policy- 96 400",
                // The peer's identity changed: its flows are judged again.
                "endpoint+ 7 1"
            ]
        );
        assert!(same(&cur, &want), "{cur:?} {want:?}");
        // Nothing left to do.
        assert!(diff(&cur, &want).is_empty());
    }

    #[test]
    fn enforcement_switches_on_after_rules_and_off_before_their_removal() {
        let mut cur = Mirror::new(MapState {
            endpoints: state(400, false).endpoints,
            ..Default::default()
        });
        let want = state(400, true);
        let mut r = Recorder::default();
        apply(&mut r, &mut cur, &want).unwrap();
        assert_eq!(r.ops.last().unwrap(), "endpoint+ 7 1");
        assert!(r.ops[0].starts_with("policy+"));

        let back = MapState {
            endpoints: state(400, false).endpoints,
            ..Default::default()
        };
        let mut r = Recorder::default();
        apply(&mut r, &mut cur, &back).unwrap();
        assert_eq!(r.ops.first().unwrap(), "endpoint+ 7 0");
        let n = r.ops.len();
        assert!(r.ops[n - 2].starts_with("policy-"));
        assert_eq!(r.ops[n - 1], "endpoint+ 7 0", "generation bump, last");
        assert_eq!(cur.endpoints[&7].generation, 2);
    }

    #[test]
    fn a_failed_write_still_switches_enforcement_on_and_mirrors_the_kernel() {
        let mut cur = Mirror::default();
        let want = state(400, true);
        // The first write (the policy entry) fails, in both passes.
        let mut r = Recorder {
            fail_on: Some("policy+".into()),
            ..Default::default()
        };
        let e = apply(&mut r, &mut cur, &want).unwrap_err();
        assert_eq!((e.failed, e.total), (1, 3));
        assert!(
            cur.policy.is_empty(),
            "the mirror holds only what was written"
        );
        assert!(
            same_endpoint(&cur.endpoints[&7], &want.endpoints[&7]),
            "enforcement is on (fail closed)"
        );
        assert_eq!(cur.ipcache, want.ipcache);
        // A later sync writes exactly the rest.
        assert_eq!(diff(&cur, &want).len(), 1);
    }

    #[test]
    fn room_freed_by_removals_is_used_in_the_second_pass() {
        let mut cur = Mirror::new(state(400, true));
        let want = state(401, true);
        // A map of one entry: the new rule fits only once the old one is gone.
        let mut r = Recorder {
            capacity: Some(1),
            ..Default::default()
        };
        r.policies = 1;
        assert_eq!(apply(&mut r, &mut cur, &want).unwrap(), 3);
        assert!(same(&cur, &want), "{cur:?} {want:?}");
    }

    /// Equal but for endpoint generations (the sync's own).
    fn same(a: &MapState, b: &MapState) -> bool {
        a.policy == b.policy
            && a.ipcache == b.ipcache
            && a.ipcache6 == b.ipcache6
            && a.endpoints.len() == b.endpoints.len()
            && a.endpoints
                .iter()
                .all(|(k, v)| b.endpoints.get(k).is_some_and(|w| same_endpoint(v, w)))
    }

    #[test]
    fn generations_bump_for_the_endpoints_whose_verdicts_may_change() {
        let mut s = state(400, true);
        let mut other = s.endpoints[&7];
        other.endpoint_id = 2;
        other.ipv4 = 5;
        s.endpoints.insert(8, other);
        let mut cur = Mirror::new(s);
        let mut want = (*cur).clone();
        // A new rule of endpoint 1: its generation only.
        let mut k = key(402);
        k.dport_be = 81u16.to_be();
        want.policy.insert(
            (96, k),
            PolicyValue {
                action: ACTION_ALLOW,
                cookie: 2,
            },
        );
        let mut r = Recorder::default();
        apply(&mut r, &mut cur, &want).unwrap();
        assert_eq!(
            (cur.endpoints[&7].generation, cur.endpoints[&8].generation),
            (1, 0)
        );
        // Nothing changed: nothing bumped, nothing written.
        let mut r = Recorder::default();
        assert_eq!(apply(&mut r, &mut cur, &want).unwrap(), 0);
        assert!(r.ops.is_empty());
        // A new address bumps nothing; a changed one bumps every endpoint.
        want.ipcache.insert(
            (Ipv4Addr::new(10, 0, 0, 9), 32),
            IpcacheValue {
                identity: 500,
                cidr_identity: 2,
            },
        );
        apply(&mut r, &mut cur, &want).unwrap();
        assert_eq!(
            (cur.endpoints[&7].generation, cur.endpoints[&8].generation),
            (1, 0)
        );
        want.ipcache.insert(
            (Ipv4Addr::new(10, 0, 0, 9), 32),
            IpcacheValue {
                identity: 501,
                cidr_identity: 2,
            },
        );
        apply(&mut r, &mut cur, &want).unwrap();
        assert_eq!(
            (cur.endpoints[&7].generation, cur.endpoints[&8].generation),
            (2, 1)
        );
        // Audit switched on for endpoint 2: its generation.
        want.endpoints.get_mut(&8).unwrap().flags |= palisade_common::EP_AUDIT;
        apply(&mut r, &mut cur, &want).unwrap();
        assert_eq!(
            (cur.endpoints[&7].generation, cur.endpoints[&8].generation),
            (2, 2)
        );
    }

    /// IPv6 ipcache entries are written, moved and removed like IPv4 ones
    /// (full and touched syncs alike), and an IPv6 address that changes
    /// identity re-judges every endpoint's flows.
    #[test]
    fn ipcache6_syncs_like_ipcache() {
        let a: Ipv6Addr = "fd00::2".parse().unwrap();
        let v = |identity| IpcacheValue {
            identity,
            cidr_identity: 2,
        };
        for touched in [false, true] {
            let mut cur = Mirror::new(state(400, true));
            let mut want = (*cur).clone();
            // A full sync brings the "no entries" bits up to date first.
            apply(&mut Recorder::default(), &mut cur, &want).unwrap();
            let sync = |cur: &mut Mirror, want: &MapState| {
                let mut r = Recorder::default();
                let n = if touched {
                    apply_touched(&mut r, cur, want, &all_keys(cur, want)).unwrap()
                } else {
                    apply(&mut r, cur, want).unwrap()
                };
                assert!(same(cur, want), "{cur:?} {want:?}");
                (n, r.ops)
            };
            // A new address: written, nothing re-judged.
            want.ipcache6.insert((a, 128), v(400));
            assert_eq!(
                sync(&mut cur, &want),
                (1, vec!["ipcache6+ fd00::2/128 400".into()])
            );
            assert_eq!(cur.endpoints[&7].generation, 0);
            // Its identity changes: every endpoint's flows are judged again.
            want.ipcache6.insert((a, 128), v(401));
            let (n, ops) = sync(&mut cur, &want);
            assert_eq!(
                (n, &ops[..1]),
                (1, &["ipcache6+ fd00::2/128 401".to_string()][..])
            );
            assert_eq!(cur.endpoints[&7].generation, 1);
            // Removed.
            want.ipcache6.clear();
            let (n, ops) = sync(&mut cur, &want);
            assert_eq!(
                (n, &ops[..1]),
                (1, &["ipcache6- fd00::2/128".to_string()][..])
            );
            assert!(cur.ipcache6.is_empty());
            assert!(diff(&cur, &want).is_empty());
        }
    }

    /// Every key of both states: what a full diff looks at.
    fn all_keys(a: &MapState, b: &MapState) -> Touched {
        let mut t = Touched::default();
        for s in [a, b] {
            t.policy.extend(s.policy.keys().copied());
            t.ipcache.extend(s.ipcache.keys().copied());
            t.ipcache6.extend(s.ipcache6.keys().copied());
            t.endpoints.extend(s.endpoints.keys().copied());
        }
        t
    }

    #[test]
    fn touched_keys_sync_in_the_same_order_as_a_full_sync() {
        let mut cur = Mirror::new(state(400, true));
        let want = state(401, true);
        let mut r = Recorder::default();
        let t = all_keys(&cur, &want);
        assert_eq!(diff_touched(&cur, &want, &t), diff(&cur, &want));
        assert_eq!(apply_touched(&mut r, &mut cur, &want, &t).unwrap(), 3);
        assert_eq!(
            r.ops,
            [
                "policy+ 96 401",
                "ipcache+ 10.0.0.2/32 401",
                "policy- 96 400",
                // The peer's identity changed: its flows are judged again.
                "endpoint+ 7 1"
            ]
        );
        assert!(same(&cur, &want), "{cur:?} {want:?}");
    }

    #[test]
    fn only_touched_keys_are_written() {
        let mut cur = Mirror::new(state(400, true));
        let want = state(401, true);
        let mut t = Touched::default();
        t.ipcache.insert((Ipv4Addr::new(10, 0, 0, 2), 32));
        let mut r = Recorder::default();
        assert_eq!(apply_touched(&mut r, &mut cur, &want, &t).unwrap(), 1);
        assert_eq!(r.ops, ["ipcache+ 10.0.0.2/32 401", "endpoint+ 7 1"]);
        // The untouched policy keys still differ.
        assert_eq!(diff(&cur, &want).len(), 2);
    }

    #[test]
    fn touched_sync_retries_once_when_removals_free_room() {
        let mut cur = Mirror::new(state(400, true));
        let want = state(401, true);
        let mut r = Recorder {
            capacity: Some(1),
            ..Default::default()
        };
        r.policies = 1;
        let t = all_keys(&cur, &want);
        assert_eq!(apply_touched(&mut r, &mut cur, &want, &t).unwrap(), 3);
        assert!(same(&cur, &want), "{cur:?} {want:?}");
    }

    /// A kernel that checks, after every write, that no "no entries" bit
    /// hides an entry the map holds; writes fail at random when asked.
    struct Kernel {
        maps: MapState,
        rng: rand::rngs::StdRng,
        fail_one_in: u32,
        writes: usize,
        /// Failed writes that reached the kernel anyway.
        partial: usize,
    }

    impl Kernel {
        /// `partial`: a failed write may still have reached the kernel (an
        /// endpoint is written to three places, one after the other).
        fn write(
            &mut self,
            partial: bool,
            f: impl FnOnce(&mut MapState),
        ) -> Result<(), palisade_dataplane::Error> {
            use rand::Rng;
            if self.fail_one_in > 0 && self.rng.gen_range(0..self.fail_one_in) == 0 {
                if partial && self.rng.gen_bool(0.5) {
                    f(&mut self.maps);
                    self.partial += 1;
                    self.check();
                }
                return Err(palisade_dataplane::Error::MapFull {
                    name: "ANY",
                    entries: 1,
                });
            }
            f(&mut self.maps);
            self.check();
            Ok(())
        }

        fn check(&mut self) {
            self.writes += 1;
            for v in self.maps.endpoints.values() {
                for (prefix, k) in self.maps.policy.keys() {
                    if k.endpoint_id == v.endpoint_id {
                        let bit =
                            no_entries_bit(k.direction, entry_class(*prefix, k.peer_identity));
                        assert_eq!(
                            v.flags & bit,
                            0,
                            "write {}: endpoint {} skips a class it has {k:?} of",
                            self.writes,
                            v.endpoint_id
                        );
                    }
                }
            }
        }
    }

    /// `MapWriter` for `Kernel`: each write applied to its maps, then checked.
    macro_rules! kernel_writes {
        ($($name:ident($($arg:ident: $ty:ty),*) $partial:literal => |$m:ident| $apply:expr;)*) => {
            impl MapWriter for Kernel {
                $(fn $name(&mut self, $($arg: $ty),*) -> Result<(), palisade_dataplane::Error> {
                    self.write($partial, |$m: &mut MapState| {
                        $apply;
                    })
                })*
            }
        };
    }

    kernel_writes! {
        upsert_policy(p: u32, k: PolicyKey, v: PolicyValue) false => |m| m.policy.insert((p, k), v);
        remove_policy(p: u32, k: PolicyKey) false => |m| m.policy.remove(&(p, k));
        upsert_ipcache(a: Ipv4Addr, p: u32, v: IpcacheValue) false => |m| m.ipcache.insert((a, p), v);
        remove_ipcache(a: Ipv4Addr, p: u32) false => |m| m.ipcache.remove(&(a, p));
        upsert_ipcache6(a: Ipv6Addr, p: u32, v: IpcacheValue) false => |m| m.ipcache6.insert((a, p), v);
        remove_ipcache6(a: Ipv6Addr, p: u32) false => |m| m.ipcache6.remove(&(a, p));
        upsert_endpoint(i: u32, v: EndpointInfo) true => |m| m.endpoints.insert(i, v);
        remove_endpoint(i: u32, _ipv4: u32) false => |m| m.endpoints.remove(&i);
    }

    /// A random map state: three pods (some absent) and entries of every
    /// entry class (peer class and length), both directions.
    fn random_state(rng: &mut impl rand::Rng) -> MapState {
        let mut s = MapState::default();
        for (ifindex, id) in [(10, 1), (11, 2), (12, 3)] {
            if rng.gen_bool(0.8) {
                let flags = rng.gen_range(0..4) | (rng.gen_range(0..2) * palisade_common::EP_AUDIT);
                s.endpoints.insert(
                    ifindex,
                    EndpointInfo {
                        endpoint_id: id,
                        identity: 300 + id,
                        ipv4: id,
                        flags,
                        generation: 0,
                        mac: [0; 6],
                        _pad: [0; 2],
                        ipv6: [0; 4],
                    },
                );
            }
        }
        let peers = [
            300,
            301,
            palisade_common::IDENTITY_FIRST_CIDR + 1,
            palisade_common::IDENTITY_WORLD,
            palisade_common::IDENTITY_ANY_POD,
            palisade_common::IDENTITY_ANY,
        ];
        for _ in 0..rng.gen_range(0..12) {
            let k = PolicyKey {
                endpoint_id: rng.gen_range(1..4),
                peer_identity: peers[rng.gen_range(0..peers.len())],
                direction: rng.gen_range(0..2),
                protocol: PROTO_TCP,
                dport_be: [80u16, 443][rng.gen_range(0..2)].to_be(),
            };
            let action = rng.gen_range(1..3);
            // One port (the hash of full-length entries) or the whole
            // protocol (the trie): entry classes of both lengths.
            let (prefix, k) = if rng.gen_bool(0.7) {
                (96, k)
            } else {
                (
                    palisade_common::POLICY_PREFIX_PROTO,
                    PolicyKey { dport_be: 0, ..k },
                )
            };
            s.policy
                .insert((prefix, k), PolicyValue { action, cookie: 1 });
        }
        if rng.gen_bool(0.5) {
            s.ipcache.insert(
                (Ipv4Addr::new(10, 0, 0, 2), 32),
                IpcacheValue {
                    identity: 300 + rng.gen_range(0..2),
                    cidr_identity: 2,
                },
            );
        }
        s
    }

    #[test]
    fn no_entries_bits_never_hide_an_entry_the_kernel_holds() {
        use rand::{Rng, SeedableRng};
        let mut skipped = 0;
        for seed in 0..300u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut k = Kernel {
                maps: MapState::default(),
                rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed),
                fail_one_in: if seed % 3 == 0 { 0 } else { 6 },
                writes: 0,
                partial: 0,
            };
            let mut cur = Mirror::default();
            for step in 0..12 {
                let want = random_state(&mut rng);
                let full = rng.gen_bool(0.3);
                let r = if full {
                    apply(&mut k, &mut cur, &want)
                } else {
                    let t = all_keys(&cur, &want);
                    apply_touched(&mut k, &mut cur, &want, &t)
                };
                // The mirror, bits and counts included, is the kernel (but
                // for endpoint values a failed write left behind).
                if k.partial == 0 {
                    assert_eq!(*cur, k.maps, "seed {seed} step {step}");
                }
                assert_eq!(cur.policy, k.maps.policy, "seed {seed} step {step}");
                assert_eq!(
                    cur.classes,
                    Mirror::new(k.maps.clone()).classes,
                    "seed {seed} step {step}: class counts"
                );
                if r.is_ok() {
                    assert!(same(&cur, &want), "seed {seed} step {step}");
                    // Every endpoint the sync changed skips exactly the
                    // classes it has no entries of; after a full sync,
                    // every endpoint.
                    for v in cur.endpoints.values() {
                        let bits = v.flags & EP_NO_ENTRIES_MASK;
                        assert_eq!(bits & !cur.no_entries_bits(v.endpoint_id), 0);
                        if full {
                            assert_eq!(bits, cur.no_entries_bits(v.endpoint_id));
                        }
                        skipped += bits.count_ones();
                    }
                }
            }
        }
        // Bits do get set: the lookups they save are made.
        assert!(skipped > 1000, "{skipped}");
    }

    #[test]
    fn a_class_opens_before_its_first_entry_and_closes_after_its_last() {
        let mut cur = Mirror::new(state(400, true));
        apply(&mut Recorder::default(), &mut cur, &state(400, true)).unwrap();
        let any_in = no_entries_bit(DIR_INGRESS, entry_class(96, palisade_common::IDENTITY_ANY));
        assert_ne!(cur.endpoints[&7].flags & any_in, 0, "no \"any\" entry yet");
        // An "any peer" entry: the endpoint is written first, without the bit.
        let with_any = {
            let mut s = state(400, true);
            s.policy.insert(
                (96, key(palisade_common::IDENTITY_ANY)),
                PolicyValue {
                    action: ACTION_ALLOW,
                    cookie: 2,
                },
            );
            s
        };
        let want = with_any.clone();
        let mut r = Recorder::default();
        let t = all_keys(&cur, &want);
        apply_touched(&mut r, &mut cur, &want, &t).unwrap();
        assert_eq!(r.ops[0], "endpoint+ 7 1");
        assert_eq!(r.ops[1], "policy+ 96 0");
        assert_eq!(cur.endpoints[&7].flags & any_in, 0);
        // Removed again: the bit comes back after the removal.
        let want = state(400, true);
        let mut r = Recorder::default();
        let t = all_keys(&cur, &want);
        apply_touched(&mut r, &mut cur, &want, &t).unwrap();
        assert_eq!(r.ops, ["policy- 96 0", "endpoint+ 7 1"]);
        assert_ne!(cur.endpoints[&7].flags & any_in, 0);
        // A bit that cannot be cleared keeps its class's entries out.
        let want = with_any;
        let mut r = Recorder {
            fail_on: Some("endpoint+".into()),
            ..Default::default()
        };
        let t = all_keys(&cur, &want);
        assert!(apply_touched(&mut r, &mut cur, &want, &t).is_err());
        assert!(r.ops.is_empty(), "{:?}", r.ops);
        assert!(!cur
            .policy
            .contains_key(&(96, key(palisade_common::IDENTITY_ANY))));
    }
}
