//! The ipcache: which identities an address resolves to.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use palisade_common::{IDENTITY_WORLD, IDENTITY_WORLD6};

/// The prefix of length `len` that contains `ip`.
pub(crate) fn net_of(ip: Ipv4Addr, len: u8) -> Ipv4Network {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    Ipv4Network::new(Ipv4Addr::from(u32::from(ip) & mask), len).expect("valid")
}

/// The IPv6 prefix of length `len` that contains `ip`.
pub(crate) fn net6_of(ip: Ipv6Addr, len: u8) -> Ipv6Network {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    Ipv6Network::new(Ipv6Addr::from(u128::from(ip) & mask), len).expect("valid")
}

/// The identity of the longest CIDR identity prefix that contains `ip`
/// (its family's world if none): a pod address's `cidr_identity`.
pub(crate) fn longest_cidr(cidr_ids: &HashMap<IpNetwork, u32>, ip: impl Into<IpAddr>) -> u32 {
    match ip.into() {
        IpAddr::V4(ip) => (0..=32u8)
            .rev()
            .find_map(|len| cidr_ids.get(&IpNetwork::V4(net_of(ip, len))).copied())
            .unwrap_or(IDENTITY_WORLD),
        IpAddr::V6(ip) => (0..=128u8)
            .rev()
            .find_map(|len| cidr_ids.get(&IpNetwork::V6(net6_of(ip, len))).copied())
            .unwrap_or(IDENTITY_WORLD6),
    }
}

/// Each family's world prefix and identity: `0.0.0.0/0` is `world`, `::/0`
/// is `world-ipv6`.
pub(crate) fn worlds() -> [(IpNetwork, u32); 2] {
    [
        (IpNetwork::V4(world()), IDENTITY_WORLD),
        (
            IpNetwork::V6(Ipv6Network::new(Ipv6Addr::UNSPECIFIED, 0).expect("valid")),
            IDENTITY_WORLD6,
        ),
    ]
}

/// An endpoint's IPv6 address as `EndpointInfo::ipv6` keeps it (all zero:
/// the pod has no IPv6 address, and the programs drop its IPv6 as spoofed).
pub(crate) fn endpoint_ipv6(ep: &crate::model::LocalEndpoint) -> palisade_common::Ip6 {
    ep.ipv6
        .map(palisade_dataplane::maps::ip6_words)
        .unwrap_or_default()
}

/// The world prefix, `0.0.0.0/0`.
pub(crate) fn world() -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins() {
        let n = |s: &str| s.parse::<IpNetwork>().unwrap();
        let mut ids = HashMap::from(worlds());
        ids.extend([
            (n("10.0.0.0/8"), 300),
            (n("10.1.0.0/16"), 301),
            (n("fd00::/8"), 302),
            (n("fd00:1::/32"), 303),
        ]);
        assert_eq!(
            longest_cidr(&ids, "10.1.2.3".parse::<Ipv4Addr>().unwrap()),
            301
        );
        assert_eq!(
            longest_cidr(&ids, "10.2.2.3".parse::<Ipv4Addr>().unwrap()),
            300
        );
        assert_eq!(
            longest_cidr(&ids, "11.0.0.1".parse::<Ipv4Addr>().unwrap()),
            IDENTITY_WORLD
        );
        assert_eq!(
            IpNetwork::V4(net_of("10.1.2.3".parse().unwrap(), 8)),
            n("10.0.0.0/8")
        );
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(longest_cidr(&ids, v6("fd00:1::5")), 303);
        assert_eq!(longest_cidr(&ids, v6("fd00:2::5")), 302);
        assert_eq!(longest_cidr(&ids, v6("2001:db8::1")), IDENTITY_WORLD6);
        assert_eq!(
            IpNetwork::V6(net6_of(v6("fd00:1:2::5"), 32)),
            n("fd00:1::/32")
        );
        assert_eq!(IpNetwork::V6(net6_of(v6("fd00::5"), 0)), n("::/0"));
    }
}
