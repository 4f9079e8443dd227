//! An LPM trie whose full-length entries live in a hash map by the whole
//! key instead: `IPCACHE` + `IPCACHE_EXACT`, `IPCACHE6` + `IPCACHE6_EXACT`,
//! `POLICY` + `POLICY_EXACT`.
//!
//! The programs look in the hash first: a hit is the longest match by
//! definition, one hash lookup where the trie walk grows with the map
//! (10 -> 10k /32s added about 57 ns to a new flow, 10 -> 10k one-port
//! policy entries about 90 ns). A miss walks the trie, which holds the
//! shorter prefixes alone, so its walks stay short too.
//!
//! Pins of an older agent have full-length entries in the trie. Loading
//! over them copies each into the hash (`fill`; a copy that cannot be
//! written fails the load) and leaves the trie's, which the older agent's
//! programs read until the new ones replace them (`adopt_links`). Such a
//! leftover is shadowed by its copy, goes when the key is removed, and is
//! never written again.
//!
//! - an upsert of a full-length entry writes the hash alone; a shorter
//!   prefix, the trie alone. One write each, as with the trie alone.
//! - a removal of a full-length key takes it from the trie (a leftover),
//!   then from the hash, which answers with the old entry until then: a
//!   removal that fails half-way leaves the entry visible, as the caller
//!   is told.
//! - `entries` reads back what the programs see: the hash's entries, and
//!   the trie's but for a leftover the hash shadows.
//!
//! The endpoint's "no entries" bits (`palisade_common::entry_class`) tell
//! the programs which of the two to read: a class with one-port entries
//! only is never looked for in the trie, one without them never in the
//! hash. So every full-length entry must be in the hash: a write or a
//! `fill` that cannot put it there fails.
use std::{collections::HashSet, hash::Hash};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData},
    Pod,
};

use crate::{
    maps::{removed, write_err},
    Error,
};

pub(crate) struct ExactLpm<K, V> {
    trie: LpmTrie<MapData, K, V>,
    exact: HashMap<MapData, K, V>,
    /// The key's length in bits: the prefix of a full-length entry.
    full: u32,
    names: (&'static str, &'static str),
    entries: u32,
}

impl<K: Pod + Eq + Hash, V: Pod> ExactLpm<K, V> {
    pub(crate) fn new(
        trie: LpmTrie<MapData, K, V>,
        exact: HashMap<MapData, K, V>,
        names: (&'static str, &'static str),
        entries: u32,
    ) -> Self {
        Self {
            trie,
            exact,
            full: (size_of::<K>() * 8) as u32,
            names,
            entries,
        }
    }

    /// A failed write is reported under the trie's name, the map the
    /// operator sizes (`--policy-map-entries` sizes both parts) and the
    /// `map_full` metric counts.
    pub(crate) fn set(&mut self, prefix: u32, k: K, v: V) -> Result<(), Error> {
        let err = write_err(self.names.0, self.entries);
        if prefix == self.full {
            return self.exact.insert(k, v, 0).map_err(err);
        }
        self.trie.insert(&Key::new(prefix, k), v, 0).map_err(err)
    }

    pub(crate) fn remove(&mut self, prefix: u32, k: K) -> Result<(), Error> {
        let (trie_name, exact_name) = self.names;
        removed(trie_name, self.trie.remove(&Key::new(prefix, k)))?;
        if prefix != self.full {
            return Ok(());
        }
        removed(exact_name, self.exact.remove(&k))
    }

    /// Every entry as the programs see it, (prefix, key, value): a
    /// leftover the hash shadows is reported with the hash's value.
    /// Unreadable entries are skipped.
    pub(crate) fn entries(&self) -> Vec<(u32, K, V)> {
        let mut full = HashSet::new();
        let mut out = Vec::new();
        for (key, v) in self.trie.iter().filter_map(Result::ok) {
            let (prefix, k) = (key.prefix_len(), key.data());
            let v = if prefix == self.full {
                full.insert(k);
                // A leftover: the hash's entry wins where both hold the key.
                self.exact.get(&k, 0).unwrap_or(v)
            } else {
                v
            };
            out.push((prefix, k, v));
        }
        for (k, v) in self.exact.iter().filter_map(Result::ok) {
            if !full.contains(&k) {
                out.push((self.full, k, v));
            }
        }
        out
    }

    /// Copy into the hash every full-length trie entry it lacks (an older
    /// agent wrote them into the trie). A copy that cannot be written fails
    /// the load: the programs skip the trie for a class whose entries all
    /// have one port (`palisade_common::entry_class`), and would not see
    /// the entry.
    pub(crate) fn fill(&mut self) -> Result<(), Error> {
        let missing: Vec<(K, V)> = self
            .trie
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, _)| key.prefix_len() == self.full)
            .map(|(key, v)| (key.data(), v))
            .filter(|(k, _)| self.exact.get(k, 0).is_err())
            .collect();
        for (k, v) in missing {
            self.exact
                .insert(k, v, 0)
                .map_err(write_err(self.names.0, self.entries))?;
        }
        Ok(())
    }

    /// Remove every entry from both maps.
    #[cfg(feature = "test-utils")]
    pub(crate) fn clear(&mut self) -> Result<(), Error> {
        let (trie_name, exact_name) = self.names;
        let keys = self.trie.keys().collect();
        crate::maps::clear_map(trie_name, keys, |k| self.trie.remove(k))?;
        let keys = self.exact.keys().collect();
        crate::maps::clear_map(exact_name, keys, |k| self.exact.remove(k))
    }
}
