//! Stable number allocation for identities and rule cookies.
//!
//! The compiler runs in rounds (one per compile). During a round it calls
//! [`Allocator::assign`] for every key that is in use; a key that was in use
//! in the previous round keeps its number. [`Allocator::finish_round`] then
//! forgets the keys that were not assigned this round and puts their numbers
//! on the free list. A freed number is handed out again only in a *later*
//! round (lowest first), so a number is never reused while the map state
//! that still carries it (the previous compile's) is the desired state, and
//! never stands for two keys within one compile.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    hash::Hash,
};

use palisade_common::{IDENTITY_FIRST_CIDR, IDENTITY_FIRST_DYNAMIC};

#[derive(Debug, Clone)]
pub struct Allocator<K> {
    first: u32,
    /// Numbers stay below this bound.
    end: u32,
    next: u32,
    by_key: HashMap<K, u32>,
    live: HashSet<u32>,
    free: BTreeSet<u32>,
}

impl<K: Hash + Eq + Clone> Allocator<K> {
    /// Numbers are handed out from `first` upwards.
    pub fn new(first: u32) -> Self {
        Self {
            first,
            end: u32::MAX,
            next: first,
            by_key: HashMap::new(),
            live: HashSet::new(),
            free: BTreeSet::new(),
        }
    }

    /// An allocator that already holds `pairs` (numbers from `first` on).
    pub fn seeded(first: u32, pairs: impl IntoIterator<Item = (K, u32)>) -> Self {
        let mut a = Self::new(first);
        for (k, n) in pairs {
            a.next = a.next.max(n + 1);
            a.by_key.insert(k, n);
        }
        let used: HashSet<u32> = a.by_key.values().copied().collect();
        a.free = (first..a.next).filter(|n| !used.contains(n)).collect();
        a
    }

    /// The allocator for label identities (`IDENTITY_FIRST_DYNAMIC..`,
    /// below `IDENTITY_FIRST_CIDR`).
    pub fn label_identities() -> Self {
        Self {
            end: IDENTITY_FIRST_CIDR,
            ..Self::new(IDENTITY_FIRST_DYNAMIC)
        }
    }

    /// The allocator for CIDR identities (`IDENTITY_FIRST_CIDR..`).
    pub fn cidr_identities() -> Self {
        Self::new(IDENTITY_FIRST_CIDR)
    }

    /// The allocator for rule cookies (0 means "no rule").
    pub fn cookies() -> Self {
        Self::new(1)
    }

    /// The number of `key`, allocating one if the key is new, and marks it
    /// in use for the current round.
    pub fn assign(&mut self, key: &K) -> u32 {
        let n = match self.by_key.get(key) {
            Some(&n) => n,
            None => {
                let n = match self.free.pop_first() {
                    Some(n) => n,
                    None => {
                        let n = self.next;
                        assert!(n < self.end, "allocator exhausted");
                        self.next = n + 1;
                        n
                    }
                };
                self.by_key.insert(key.clone(), n);
                n
            }
        };
        self.live.insert(n);
        n
    }

    /// The current number of `key`, without allocating or marking.
    pub fn get(&self, key: &K) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// Ends a round: keys not assigned since the previous call are dropped
    /// and their numbers become reusable from the next round on.
    pub fn finish_round(&mut self) {
        let live = std::mem::take(&mut self.live);
        let mut freed = Vec::new();
        self.by_key.retain(|_, n| {
            let keep = live.contains(n);
            if !keep {
                freed.push(*n);
            }
            keep
        });
        self.free.extend(freed);
        // Keep the free list from growing past the high-water mark.
        while self.next > self.first && self.free.remove(&(self.next - 1)) {
            self.next -= 1;
        }
    }

    /// Number of keys currently holding a number.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Numbers for the incremental engine, which knows exactly when a key
/// appears and disappears. A released number is not handed out again until
/// [`Pool::flush`] (called once the maps that may still carry it have been
/// synced), so one sync never sees a number stand for two keys.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Numbers stay below this bound.
    end: u32,
    next: u32,
    free: BTreeSet<u32>,
    pending: Vec<u32>,
}

impl Pool {
    pub fn new(first: u32) -> Self {
        Self::bounded(first, u32::MAX)
    }

    /// Numbers in `first..end`.
    pub fn bounded(first: u32, end: u32) -> Self {
        Self {
            end,
            next: first,
            free: BTreeSet::new(),
            pending: Vec::new(),
        }
    }

    /// The pool of label identities (below the CIDR range).
    pub fn label_identities() -> Self {
        Self::bounded(IDENTITY_FIRST_DYNAMIC, IDENTITY_FIRST_CIDR)
    }

    /// The pool of CIDR identities.
    pub fn cidr_identities() -> Self {
        Self::new(IDENTITY_FIRST_CIDR)
    }

    /// The lowest free number.
    pub fn take(&mut self) -> u32 {
        self.free.pop_first().unwrap_or_else(|| {
            let n = self.next;
            assert!(n < self.end, "number pool exhausted");
            self.next = n + 1;
            n
        })
    }

    /// `n` is no longer in use; reusable after the next flush.
    pub fn release(&mut self, n: u32) {
        self.pending.push(n);
    }

    /// Numbers released so far become reusable.
    pub fn flush(&mut self) {
        self.free.extend(self.pending.drain(..));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_reuses_numbers_only_after_a_flush() {
        let mut p = Pool::new(256);
        assert_eq!(p.take(), 256);
        assert_eq!(p.take(), 257);
        p.release(256);
        assert_eq!(p.take(), 258);
        p.flush();
        assert_eq!(p.take(), 256);
    }

    #[test]
    fn numbers_are_stable_across_rounds() {
        let mut a = Allocator::<&str>::new(256);
        assert_eq!(a.assign(&"a"), 256);
        assert_eq!(a.assign(&"b"), 257);
        assert_eq!(a.assign(&"a"), 256);
        a.finish_round();
        assert_eq!(a.assign(&"b"), 257);
        assert_eq!(a.assign(&"a"), 256);
        a.finish_round();
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn freed_numbers_are_not_reused_in_the_same_round() {
        let mut a = Allocator::<&str>::new(256);
        a.assign(&"a");
        a.assign(&"b");
        a.assign(&"c");
        a.finish_round();
        // "a" disappears in this round; "d" is new and must not get 256.
        a.assign(&"b");
        a.assign(&"c");
        assert_eq!(a.assign(&"d"), 259);
        a.finish_round();
        assert_eq!(a.get(&"a"), None);
        // Next round: 256 is free again and handed out lowest first.
        a.assign(&"b");
        a.assign(&"c");
        a.assign(&"d");
        assert_eq!(a.assign(&"e"), 256);
        a.finish_round();
    }

    #[test]
    fn the_high_water_mark_shrinks_when_the_top_is_freed() {
        let mut a = Allocator::<u32>::cookies();
        for k in 0..3 {
            a.assign(&k);
        }
        a.finish_round();
        a.assign(&0);
        a.finish_round();
        assert_eq!(a.assign(&7), 2);
        assert_eq!(a.assign(&8), 3);
        a.finish_round();
        assert!(!a.is_empty());
    }
}
