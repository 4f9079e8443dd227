//! The addresses learned from DNS answers, by name, each until its TTL
//! runs out (clamped to a floor and a ceiling), with caps per name and per
//! node. Pure: the clock is a parameter.
use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Seconds an address stays at least (clients reuse an answer a little
    /// past a TTL of 0 or 1).
    pub ttl_min_s: u32,
    /// Seconds an address stays at most, whatever TTL the answer gave.
    pub ttl_max_s: u32,
    /// Addresses one name may hold; a new one evicts the one expiring first
    /// (names whose addresses churn, like cloud endpoints).
    pub per_name: usize,
    /// Addresses the node holds over all names; new ones past it are not
    /// learned (counted).
    pub per_node: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ttl_min_s: 5,
            ttl_max_s: 86_400,
            per_name: 64,
            per_node: 16_384,
        }
    }
}

/// What learning one address did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// New for the name: the datapath must learn it before the answer goes on.
    New,
    /// Known: its expiry moved (no datapath change).
    Refreshed,
    /// New, and it evicted another address of the name (per-name cap).
    Evicted,
    /// Not learned: the node holds its cap.
    NodeFull,
}

/// name -> address -> expiry (Unix milliseconds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cache {
    names: BTreeMap<String, BTreeMap<IpAddr, u64>>,
    /// Addresses held over all names.
    #[serde(skip)]
    total: usize,
    /// address -> the names it was learned for: every egress flow record
    /// asks (`names_of`), so it is one lookup, not a walk over the names.
    #[serde(skip)]
    by_addr: std::collections::HashMap<IpAddr, std::collections::BTreeSet<String>>,
}

impl Cache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Learns `addr` for `name` (normalized) for `ttl_s` from `now_ms`.
    pub fn learn(
        &mut self,
        name: &str,
        addr: IpAddr,
        ttl_s: u32,
        now_ms: u64,
        l: &Limits,
    ) -> Learned {
        let ttl = ttl_s.clamp(l.ttl_min_s, l.ttl_max_s.max(l.ttl_min_s)) as u64;
        let expiry = now_ms + ttl * 1000;
        let full = self.total >= l.per_node;
        let addrs = self.names.entry(name.to_string()).or_default();
        if let Some(e) = addrs.get_mut(&addr) {
            *e = (*e).max(expiry);
            return Learned::Refreshed;
        }
        if full {
            if addrs.is_empty() {
                self.names.remove(name);
            }
            return Learned::NodeFull;
        }
        let mut r = Learned::New;
        if addrs.len() >= l.per_name.max(1) {
            let first = addrs
                .iter()
                .min_by_key(|(_, e)| **e)
                .map(|(a, _)| *a)
                .expect("not empty");
            addrs.remove(&first);
            self.total -= 1;
            if let Some(n) = self.by_addr.get_mut(&first) {
                n.remove(name);
                if n.is_empty() {
                    self.by_addr.remove(&first);
                }
            }
            r = Learned::Evicted;
        }
        addrs.insert(addr, expiry);
        self.total += 1;
        self.by_addr
            .entry(addr)
            .or_default()
            .insert(name.to_string());
        r
    }

    /// Forgets what expired by `now_ms`, except addresses `in_use` says a
    /// tracked connection still uses (kept `grace_ms` more, then asked
    /// again); whether anything was forgotten.
    pub fn expire(&mut self, now_ms: u64, grace_ms: u64, in_use: &dyn Fn(IpAddr) -> bool) -> bool {
        let mut gone = false;
        for addrs in self.names.values_mut() {
            addrs.retain(|a, e| {
                if *e > now_ms {
                    return true;
                }
                if in_use(*a) {
                    *e = now_ms + grace_ms;
                    return true;
                }
                gone = true;
                false
            });
        }
        self.names.retain(|_, a| !a.is_empty());
        self.recount();
        gone
    }

    /// Forgets every name `keep` refuses (no pattern matches it any more).
    pub fn retain_names(&mut self, keep: impl Fn(&str) -> bool) -> bool {
        let before = self.names.len();
        self.names.retain(|n, _| keep(n));
        self.recount();
        before != self.names.len()
    }

    fn recount(&mut self) {
        self.total = self.names.values().map(BTreeMap::len).sum();
        self.by_addr.clear();
        for (n, addrs) in &self.names {
            for a in addrs.keys() {
                self.by_addr.entry(*a).or_default().insert(n.clone());
            }
        }
    }

    /// Whether anything expires by `now_ms`.
    pub fn due(&self, now_ms: u64) -> bool {
        self.names
            .values()
            .flat_map(|a| a.values())
            .any(|e| *e <= now_ms)
    }

    /// name -> addresses, for the model.
    pub fn addresses(&self) -> BTreeMap<String, Vec<IpAddr>> {
        self.names
            .iter()
            .map(|(n, a)| (n.clone(), a.keys().copied().collect()))
            .collect()
    }

    /// name -> (address, expiry in Unix ms), for `status` and the state file.
    pub fn entries(&self) -> &BTreeMap<String, BTreeMap<IpAddr, u64>> {
        &self.names
    }

    /// The names `addr` was learned for.
    pub fn names_of(&self, addr: IpAddr) -> Vec<&str> {
        self.by_addr
            .get(&addr)
            .map(|n| n.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Reads the state file; entries expired by `now_ms` are dropped.
    pub fn load(path: &std::path::Path, now_ms: u64) -> Self {
        let mut c: Cache = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        c.expire(now_ms, 0, &|_| false);
        c
    }

    /// Writes the state file (atomically: a crash leaves the old one).
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_lives_for_its_clamped_ttl() {
        let l = Limits {
            ttl_min_s: 5,
            ttl_max_s: 60,
            ..Limits::default()
        };
        let mut c = Cache::new();
        assert_eq!(
            c.learn("a.example", ip("192.0.2.1"), 0, 0, &l),
            Learned::New
        );
        assert_eq!(
            c.learn("a.example", ip("192.0.2.2"), 3600, 0, &l),
            Learned::New
        );
        assert_eq!(
            c.learn("a.example", ip("192.0.2.1"), 1, 0, &l),
            Learned::Refreshed
        );
        assert!(!c.expire(4_999, 0, &|_| false));
        assert!(c.expire(5_000, 0, &|_| false), "floor: 5 s");
        assert_eq!(c.addresses()["a.example"], [ip("192.0.2.2")]);
        assert!(c.expire(60_000, 0, &|_| false), "ceiling: 60 s");
        assert!(c.is_empty());
    }

    #[test]
    fn an_address_in_use_outlives_its_ttl() {
        let l = Limits::default();
        let mut c = Cache::new();
        c.learn("a.example", ip("192.0.2.1"), 10, 0, &l);
        c.learn("a.example", ip("192.0.2.2"), 10, 0, &l);
        let used = ip("192.0.2.1");
        assert!(c.expire(10_000, 1_000, &|a| a == used));
        assert_eq!(c.addresses()["a.example"], [used]);
        assert!(!c.expire(10_500, 1_000, &|_| false));
        assert!(c.expire(11_000, 1_000, &|_| false), "closed: it goes");
    }

    #[test]
    fn caps_bound_a_churning_name_and_the_node() {
        let l = Limits {
            per_name: 2,
            per_node: 3,
            ..Limits::default()
        };
        let mut c = Cache::new();
        c.learn("churn.example", ip("192.0.2.1"), 10, 0, &l);
        c.learn("churn.example", ip("192.0.2.2"), 20, 0, &l);
        assert_eq!(
            c.learn("churn.example", ip("192.0.2.3"), 30, 0, &l),
            Learned::Evicted
        );
        assert_eq!(
            c.addresses()["churn.example"],
            [ip("192.0.2.2"), ip("192.0.2.3")]
        );
        c.learn("b.example", ip("192.0.2.9"), 30, 0, &l);
        assert_eq!(
            c.learn("c.example", ip("192.0.2.8"), 30, 0, &l),
            Learned::NodeFull
        );
        assert!(!c.addresses().contains_key("c.example"));
        assert_eq!(c.len(), 3);
        assert!(c.names_of(ip("192.0.2.1")).is_empty(), "evicted");
        assert!(c.names_of(ip("192.0.2.8")).is_empty(), "refused");
        assert_eq!(c.names_of(ip("192.0.2.3")), ["churn.example"]);
    }

    #[test]
    fn both_families_of_a_name_live_side_by_side() {
        let l = Limits::default();
        let mut c = Cache::new();
        c.learn("a.example", ip("192.0.2.1"), 30, 0, &l);
        c.learn("a.example", ip("2001:db8::1"), 30, 0, &l);
        c.learn("a.example", ip("192.0.2.1"), 30, 1, &l);
        assert_eq!(c.addresses()["a.example"].len(), 2);
    }

    #[test]
    fn the_state_file_round_trips_without_what_expired() {
        let dir = std::env::temp_dir().join(format!("fqdn-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("learned.json");
        let l = Limits::default();
        let mut c = Cache::new();
        c.learn("a.example", ip("192.0.2.1"), 10, 0, &l);
        c.learn("b.example", ip("192.0.2.2"), 100, 0, &l);
        c.save(&path).unwrap();
        let back = Cache::load(&path, 50_000);
        assert_eq!(back.addresses().keys().collect::<Vec<_>>(), ["b.example"]);
        assert_eq!(back.len(), 1);
        assert_eq!(
            back.names_of(ip("192.0.2.2")),
            ["b.example"],
            "indexed on load"
        );
        assert!(back.names_of(ip("192.0.2.1")).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
