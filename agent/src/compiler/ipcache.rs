//! The ipcache: which identities an address resolves to.
use std::{collections::HashMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use palisade_common::IDENTITY_WORLD;

/// The prefix of length `len` that contains `ip`.
pub(crate) fn net_of(ip: Ipv4Addr, len: u8) -> Ipv4Network {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    Ipv4Network::new(Ipv4Addr::from(u32::from(ip) & mask), len).expect("valid")
}

/// The identity of the longest CIDR identity prefix that contains `ip`
/// (world if none): a pod address's `cidr_identity`.
pub(crate) fn longest_cidr(cidr_ids: &HashMap<Ipv4Network, u32>, ip: Ipv4Addr) -> u32 {
    (0..=32u8)
        .rev()
        .find_map(|len| cidr_ids.get(&net_of(ip, len)).copied())
        .unwrap_or(IDENTITY_WORLD)
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
        let n = |s: &str| s.parse::<Ipv4Network>().unwrap();
        let ids = HashMap::from([
            (world(), IDENTITY_WORLD),
            (n("10.0.0.0/8"), 300),
            (n("10.1.0.0/16"), 301),
        ]);
        assert_eq!(longest_cidr(&ids, "10.1.2.3".parse().unwrap()), 301);
        assert_eq!(longest_cidr(&ids, "10.2.2.3".parse().unwrap()), 300);
        assert_eq!(
            longest_cidr(&ids, "11.0.0.1".parse().unwrap()),
            IDENTITY_WORLD
        );
        assert_eq!(net_of("10.1.2.3".parse().unwrap(), 8), n("10.0.0.0/8"));
    }
}
