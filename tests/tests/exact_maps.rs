//! The hash maps of the full-length ipcache and policy entries
//! (`IPCACHE_EXACT`, `IPCACHE6_EXACT`, `POLICY_EXACT`; the loader's `exact`
//! module), on the real programs through BPF_PROG_TEST_RUN: full-length
//! entries go to the hash, shorter ones to the trie; the programs read the
//! hash first and walk the trie on a miss; a refused write leaves nothing
//! behind; a restart copies what an older agent left in the trie; each
//! part is read only when the endpoint's bits allow it; `read_state`
//! reports what the programs see.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{ensure, Result};
use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, Map, MapData};
use palisade_common::{
    maps as names, programs, EndpointInfo, Ip6, IpcacheValue, PolicyKey, PolicyValue, ACTION_ALLOW,
    ACTION_DENY, DIR_INGRESS, EP_INGRESS_ENFORCED, IDENTITY_WORLD, IDENTITY_WORLD6,
    POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO, PROTO_TCP,
};
use palisade_dataplane::{
    loader::MapSizes,
    maps::{be, ip6_words},
    packet::{Packet, TCP_FLAG_SYN},
    testrun::{run_tc, TC_ACT_OK, TC_ACT_SHOT},
    Datapath, DatapathConfig, Error, Maps,
};
use palisade_tests::{require_root, PinRoot};

/// test_run on ifindex 1 runs the program on the loopback device.
const IFINDEX: u32 = 1;
const EP_ID: u32 = 5;
const POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 5);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 9);
const ALLOWED: u32 = 2001;
const OTHER: u32 = 2002;

fn config(pins: &PinRoot, entries: u32) -> DatapathConfig {
    DatapathConfig {
        pins: pins.pins.clone(),
        sizes: MapSizes {
            endpoints: 64,
            ipcache: entries,
            ipcache6: entries,
            policy: entries,
            conntrack: 4096,
            fragments: 256,
            xdp_deny: 64,
            ..Default::default()
        },
        pod_hook: Default::default(),
        local_delivery: Default::default(),
    }
}

fn ident(identity: u32) -> IpcacheValue {
    IpcacheValue {
        identity,
        cidr_identity: identity,
    }
}

fn rule(peer: u32, port: u16) -> PolicyKey {
    PolicyKey {
        endpoint_id: EP_ID,
        peer_identity: peer,
        direction: DIR_INGRESS,
        protocol: PROTO_TCP,
        dport_be: port.to_be(),
    }
}

fn action(action: u32) -> PolicyValue {
    PolicyValue { action, cookie: 7 }
}

/// The pod on ifindex 1, ingress enforced; world, the peer (`ALLOWED`)
/// in both families, and one rule: `ALLOWED` on TCP 80.
fn setup(maps: &mut Maps) -> Result<()> {
    maps.upsert_endpoint(
        IFINDEX,
        EndpointInfo {
            endpoint_id: EP_ID,
            identity: 1005,
            ipv4: be(POD),
            ipv6: ip6_words(POD6),
            flags: EP_INGRESS_ENFORCED,
            ..Default::default()
        },
    )?;
    maps.set_ipcache(Ipv4Addr::UNSPECIFIED, 0, ident(IDENTITY_WORLD))?;
    maps.set_ipcache6(Ipv6Addr::UNSPECIFIED, 0, ident(IDENTITY_WORLD6))?;
    maps.set_ipcache(PEER, 32, ident(ALLOWED))?;
    maps.set_ipcache6(PEER6, 128, ident(ALLOWED))?;
    maps.set_policy(POLICY_PREFIX_FULL, rule(ALLOWED, 80), action(ACTION_ALLOW))?;
    Ok(())
}

/// The pinned maps, opened as another process would.
struct Pinned {
    ipcache: LpmTrie<MapData, u32, IpcacheValue>,
    ipcache_exact: HashMap<MapData, u32, IpcacheValue>,
    ipcache6: LpmTrie<MapData, Ip6, IpcacheValue>,
    ipcache6_exact: HashMap<MapData, Ip6, IpcacheValue>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    policy_exact: HashMap<MapData, PolicyKey, PolicyValue>,
}

impl Pinned {
    fn open(root: &PinRoot) -> Result<Self> {
        let open = |n: &str| -> Result<Map> {
            Ok(Map::from_map_data(MapData::from_pin(root.pins.map(n))?)?)
        };
        Ok(Self {
            ipcache: LpmTrie::try_from(open(names::IPCACHE)?)?,
            ipcache_exact: HashMap::try_from(open(names::IPCACHE_EXACT)?)?,
            ipcache6: LpmTrie::try_from(open(names::IPCACHE6)?)?,
            ipcache6_exact: HashMap::try_from(open(names::IPCACHE6_EXACT)?)?,
            policy: LpmTrie::try_from(open(names::POLICY)?)?,
            policy_exact: HashMap::try_from(open(names::POLICY_EXACT)?)?,
        })
    }

    /// The trie's own entry at exactly (prefix, key), not a longest match.
    fn in_trie<K: aya::Pod + PartialEq, V: aya::Pod>(
        trie: &LpmTrie<MapData, K, V>,
        prefix: u32,
        k: K,
    ) -> Option<V> {
        trie.iter()
            .filter_map(Result::ok)
            .find(|(key, _)| key.prefix_len() == prefix && key.data() == k)
            .map(|(_, v)| v)
    }
}

/// A datapath with `setup`'s entries and its pinned maps opened.
struct Rig {
    dp: Datapath,
    maps: Maps,
    pinned: Pinned,
    // Dropped last: the pins go after the programs and maps are closed.
    _root: PinRoot,
}

impl Rig {
    fn new(entries: u32) -> Result<Self> {
        let root = PinRoot::new()?;
        let mut dp = Datapath::load(&config(&root, entries))?;
        let mut maps = dp.take_maps()?;
        setup(&mut maps)?;
        Ok(Self {
            dp,
            maps,
            pinned: Pinned::open(&root)?,
            _root: root,
        })
    }
}

/// A `Rig` of `$entries` entries per map; skips the test (returns Ok)
/// when not root.
macro_rules! rig {
    ($entries:expr) => {{
        if !require_root() {
            return Ok(());
        }
        Rig::new($entries)?
    }};
}

/// Whether a new TCP flow from the peer to the pod's port 80 passes
/// (a fresh source port each time: conntrack never answers).
fn passes(dp: &mut Datapath, v6: bool, sport: &mut u16) -> Result<bool> {
    *sport += 1;
    let p = if v6 {
        Packet::ipv6_tcp(PEER6, *sport, POD6, 80, TCP_FLAG_SYN)
    } else {
        Packet::tcp(PEER, *sport, POD, 80, TCP_FLAG_SYN)
    };
    let r = run_tc(
        dp.classifier(programs::POD_INGRESS)?,
        &p.bytes(),
        IFINDEX,
        1,
    )?;
    ensure!(
        r.action == TC_ACT_OK || r.action == TC_ACT_SHOT,
        "action {}",
        r.action
    );
    Ok(r.action == TC_ACT_OK)
}

#[test]
fn the_programs_read_the_hash_first_and_walk_the_trie_on_a_miss() -> Result<()> {
    let mut r = rig!(1024);
    let mut sport = 40000;

    // Full-length entries: the hash alone.
    let peer = be(PEER);
    let peer6 = ip6_words(PEER6);
    ensure!(r.pinned.ipcache_exact.get(&peer, 0)? == ident(ALLOWED));
    ensure!(Pinned::in_trie(&r.pinned.ipcache, 32, peer).is_none());
    ensure!(Pinned::in_trie(&r.pinned.policy, POLICY_PREFIX_FULL, rule(ALLOWED, 80)).is_none());
    ensure!(r.pinned.ipcache6_exact.get(&peer6, 0)? == ident(ALLOWED));
    ensure!(r.pinned.policy_exact.get(&rule(ALLOWED, 80), 0)? == action(ACTION_ALLOW));
    // Shorter prefixes: the trie alone.
    ensure!(r.pinned.ipcache_exact.keys().count() == 1);
    ensure!(r.pinned.ipcache6_exact.keys().count() == 1);
    r.maps
        .set_policy(POLICY_PREFIX_PROTO, rule(3003, 0), action(ACTION_ALLOW))?;
    ensure!(r.pinned.policy_exact.keys().count() == 1);
    ensure!(passes(&mut r.dp, false, &mut sport)?);
    ensure!(passes(&mut r.dp, true, &mut sport)?);

    // An older agent's /32s left in the trie say otherwise: the hash
    // answers first.
    r.pinned
        .ipcache
        .insert(&Key::new(32, peer), ident(OTHER), 0)?;
    r.pinned
        .ipcache6
        .insert(&Key::new(128, peer6), ident(OTHER), 0)?;
    ensure!(passes(&mut r.dp, false, &mut sport)?, "the hash's identity");
    ensure!(
        passes(&mut r.dp, true, &mut sport)?,
        "the hash's identity (IPv6)"
    );
    // And what the programs see is what the agent reads back.
    let s = r.maps.read_state();
    ensure!(s.ipcache.get(&(PEER, 32)) == Some(&ident(ALLOWED)));
    ensure!(s.ipcache6.get(&(PEER6, 128)) == Some(&ident(ALLOWED)));

    // Not in the hash: the trie's /32 is found by the walk (identity
    // OTHER, no rule).
    r.pinned.ipcache_exact.remove(&peer)?;
    r.pinned.ipcache6_exact.remove(&peer6)?;
    ensure!(
        !passes(&mut r.dp, false, &mut sport)?,
        "the trie's identity"
    );
    ensure!(
        !passes(&mut r.dp, true, &mut sport)?,
        "the trie's identity (IPv6)"
    );
    let s = r.maps.read_state();
    ensure!(s.ipcache.get(&(PEER, 32)) == Some(&ident(OTHER)));
    // Rewritten by the agent: into the hash, which shadows the trie's.
    r.maps.set_ipcache(PEER, 32, ident(ALLOWED))?;
    r.maps.set_ipcache6(PEER6, 128, ident(ALLOWED))?;
    ensure!(passes(&mut r.dp, false, &mut sport)?);
    ensure!(passes(&mut r.dp, true, &mut sport)?);

    // The same for a policy entry: the hash's allow beats a deny left in
    // the trie, and without the hash's the trie's deny decides.
    let k = rule(ALLOWED, 80);
    r.pinned
        .policy
        .insert(&Key::new(POLICY_PREFIX_FULL, k), action(ACTION_DENY), 0)?;
    ensure!(passes(&mut r.dp, false, &mut sport)?, "the hash's allow");
    r.pinned.policy_exact.remove(&k)?;
    ensure!(!passes(&mut r.dp, false, &mut sport)?, "the trie's deny");
    ensure!(
        !passes(&mut r.dp, true, &mut sport)?,
        "the trie's deny (IPv6)"
    );

    // The hash's entry alone is seen by the programs, and reported.
    r.pinned.policy_exact.insert(k, action(ACTION_ALLOW), 0)?;
    r.pinned.policy.remove(&Key::new(POLICY_PREFIX_FULL, k))?;
    ensure!(passes(&mut r.dp, false, &mut sport)?, "the hash alone");
    let s = r.maps.read_state();
    ensure!(s.policy.get(&(POLICY_PREFIX_FULL, k)) == Some(&action(ACTION_ALLOW)));

    // A removal takes the trie's leftover too.
    r.maps.remove_policy(POLICY_PREFIX_FULL, k)?;
    r.maps.remove_ipcache(PEER, 32)?;
    r.maps.remove_ipcache6(PEER6, 128)?;
    ensure!(r.pinned.policy_exact.get(&k, 0).is_err());
    ensure!(r.pinned.ipcache_exact.get(&peer, 0).is_err());
    ensure!(Pinned::in_trie(&r.pinned.ipcache, 32, peer).is_none());
    ensure!(Pinned::in_trie(&r.pinned.ipcache6, 128, peer6).is_none());
    ensure!(!passes(&mut r.dp, false, &mut sport)?);
    let s = r.maps.read_state();
    ensure!(!s.policy.contains_key(&(POLICY_PREFIX_FULL, k)));
    ensure!(!s.ipcache.contains_key(&(PEER, 32)));
    Ok(())
}

#[test]
fn a_refused_write_leaves_nothing_behind() -> Result<()> {
    let mut r = rig!(8);
    let mut sport = 41000;
    // Fill the hash behind the agent's back (1 entry is the peer's).
    for i in 0..7u32 {
        r.pinned
            .ipcache_exact
            .insert(be(Ipv4Addr::new(192, 0, 2, i as u8)), ident(OTHER), 0)?;
    }
    let fresh = Ipv4Addr::new(10, 1, 0, 10);
    let err = r
        .maps
        .set_ipcache(fresh, 32, ident(ALLOWED))
        .expect_err("the hash is full");
    ensure!(
        // (Under the map's name, which its size is given by.)
        matches!(err, Error::MapFull { name, .. } if name == names::IPCACHE),
        "{err:?}"
    );
    ensure!(
        Pinned::in_trie(&r.pinned.ipcache, 32, be(fresh)).is_none(),
        "the entry went to the trie instead"
    );
    ensure!(!r.maps.read_state().ipcache.contains_key(&(fresh, 32)));
    // An entry already there is still updated in place (no room needed).
    r.maps.set_ipcache(PEER, 32, ident(OTHER))?;
    ensure!(r.pinned.ipcache_exact.get(&be(PEER), 0)? == ident(OTHER));
    ensure!(!passes(&mut r.dp, false, &mut sport)?);
    Ok(())
}

#[test]
fn a_restart_copies_what_an_older_agent_left_in_the_trie() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let root = PinRoot::new()?;
    let cfg = config(&root, 1024);
    {
        let mut dp = Datapath::load(&cfg)?;
        let mut maps = dp.take_maps()?;
        setup(&mut maps)?;
    }
    // An older agent wrote every entry into the tries.
    {
        let mut pinned = Pinned::open(&root)?;
        let (peer, peer6) = (be(PEER), ip6_words(PEER6));
        pinned
            .ipcache
            .insert(&Key::new(32, peer), ident(ALLOWED), 0)?;
        pinned
            .ipcache6
            .insert(&Key::new(128, peer6), ident(ALLOWED), 0)?;
        let k = Key::new(POLICY_PREFIX_FULL, rule(ALLOWED, 80));
        pinned.policy.insert(&k, action(ACTION_ALLOW), 0)?;
        pinned.ipcache_exact.remove(&be(PEER))?;
        pinned.ipcache6_exact.remove(&ip6_words(PEER6))?;
        pinned.policy_exact.remove(&rule(ALLOWED, 80))?;
        ensure!(pinned.ipcache_exact.keys().count() == 0);
    }
    let mut dp = Datapath::load(&cfg)?;
    let maps = dp.take_maps()?;
    let pinned = Pinned::open(&root)?;
    ensure!(pinned.ipcache_exact.get(&be(PEER), 0)? == ident(ALLOWED));
    ensure!(pinned.ipcache6_exact.get(&ip6_words(PEER6), 0)? == ident(ALLOWED));
    ensure!(pinned.policy_exact.get(&rule(ALLOWED, 80), 0)? == action(ACTION_ALLOW));
    // Only the full-length ones.
    ensure!(pinned.ipcache_exact.keys().count() == 1);
    ensure!(pinned.ipcache6_exact.keys().count() == 1);
    let s = maps.read_state();
    ensure!(s.ipcache.len() == 2 && s.ipcache6.len() == 2 && s.policy.len() == 1);
    let mut sport = 42000;
    ensure!(passes(&mut dp, false, &mut sport)?);
    ensure!(passes(&mut dp, true, &mut sport)?);
    Ok(())
}

#[test]
fn the_programs_read_only_the_part_holding_entries_of_the_class() -> Result<()> {
    let mut r = rig!(1024);
    let mut sport = 43000;
    // The peer's class (label identities), ingress: one-port entries, and
    // wider ones.
    let class = palisade_common::entry_class(POLICY_PREFIX_FULL, ALLOWED);
    let one_port = palisade_common::no_entries_bit(DIR_INGRESS, class);
    let wider = palisade_common::no_entries_bit(DIR_INGRESS, class + 1);
    let flags = |maps: &mut Maps, bits: u32| -> Result<()> {
        let pod = maps.endpoint(IFINDEX).expect("the pod");
        let flags = EP_INGRESS_ENFORCED | bits;
        Ok(maps.upsert_endpoint(IFINDEX, EndpointInfo { flags, ..pod })?)
    };
    // The rule has one port: found with the trie skipped, not with the
    // hash skipped (the bits are the sync's promise; here it is broken on
    // purpose, to see that the programs keep it).
    flags(&mut r.maps, wider)?;
    ensure!(passes(&mut r.dp, false, &mut sport)?, "read from the hash");
    ensure!(
        passes(&mut r.dp, true, &mut sport)?,
        "read from the hash (IPv6)"
    );
    flags(&mut r.maps, one_port)?;
    ensure!(!passes(&mut r.dp, false, &mut sport)?, "the hash was read");
    ensure!(
        !passes(&mut r.dp, true, &mut sport)?,
        "the hash was read (IPv6)"
    );
    // A rule for every TCP port instead: the trie alone holds it.
    r.maps
        .remove_policy(POLICY_PREFIX_FULL, rule(ALLOWED, 80))?;
    r.maps
        .set_policy(POLICY_PREFIX_PROTO, rule(ALLOWED, 0), action(ACTION_ALLOW))?;
    ensure!(passes(&mut r.dp, false, &mut sport)?, "read from the trie");
    ensure!(
        passes(&mut r.dp, true, &mut sport)?,
        "read from the trie (IPv6)"
    );
    flags(&mut r.maps, wider)?;
    ensure!(!passes(&mut r.dp, false, &mut sport)?, "the trie was read");
    // Both bits: no lookup of the class at all; none: both copies.
    flags(&mut r.maps, one_port | wider)?;
    ensure!(!passes(&mut r.dp, false, &mut sport)?);
    flags(&mut r.maps, 0)?;
    ensure!(passes(&mut r.dp, false, &mut sport)?);
    Ok(())
}
