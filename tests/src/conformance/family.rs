//! `--ip-family ipv4|ipv6|dual` (FORMAT version 2): which addresses pods
//! get, which family each probe runs over, and where pods' IPv6 addresses
//! come from.
//!
//! Decisions the format leaves open:
//! - A pod's IPv6 address mirrors the IPv4 address it has (or would have)
//!   at bits 60..92 of a ULA prefix: `10.213.0.2` is
//!   `fd00:212:213:0:ad50:20::`. So `{{cidr P N}}` over IPv6 (length
//!   `N + 60`) contains exactly the pods the IPv4 form contains, for every
//!   `N`, and `{{subnet}}` (`10.213.0.0/24`) is `fd00:212:213:0:ad50::/84`.
//!   The runner asks the CNI plugin's IPAM for that address (a one-address
//!   IPv6 range in the pod's network configuration, as a runtime passes
//!   per-pod configuration); the prefix exists only in the case's
//!   namespaces.
//! - Over IPv6 `{{ip P}}/32` (the version-1 way of writing a host prefix)
//!   is `/128`; literal IPv4 CIDRs in a case stay as written (they match no
//!   IPv6 address).
//! - A probe pinned to a family the run has no addresses of (`family:
//!   ipv6` under `--ip-family ipv4`) is skipped, never passed.
//! - `--via-services` works with every family: each pod's Service gets a
//!   ClusterIP per family the run has (IPv6 ones from a ULA range that
//!   exists only in the case's namespaces), an EndpointSlice per family,
//!   and kube-proxy's rules per family (`ip6tables-restore` for IPv6); a
//!   probe over a family goes to the ClusterIP of that family (see
//!   [`super::services`]).
//! - Several nodes work with every family: under `ipv6`/`dual` each node
//!   also gets the mirror of its fabric address and of its pod range, both
//!   in its Node object, and the agents route the IPv6 ranges between
//!   nodes. A host-network pod has its node's addresses of both families,
//!   and `{{node-ip NODE}}` over IPv6 is the node's IPv6 address.
use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{bail, Result};
use serde_yaml::Value;

/// What pods get (`--ip-family`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpFamily {
    #[default]
    Ipv4,
    Ipv6,
    Dual,
}

impl IpFamily {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ipv4" => Ok(Self::Ipv4),
            "ipv6" => Ok(Self::Ipv6),
            "dual" => Ok(Self::Dual),
            _ => bail!("--ip-family {s}: ipv4, ipv6 or dual"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
            Self::Dual => "dual",
        }
    }

    pub fn has(self, f: Family) -> bool {
        match self {
            Self::Ipv4 => f == Family::V4,
            Self::Ipv6 => f == Family::V6,
            Self::Dual => true,
        }
    }

    /// The family placeholders resolve to (FORMAT: dual gives IPv4 forms).
    pub fn placeholders(self) -> Family {
        match self {
            Self::Ipv6 => Family::V6,
            Self::Ipv4 | Self::Dual => Family::V4,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One probe's family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    /// A probe's `family:` value.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ipv4" => Ok(Self::V4),
            "ipv6" => Ok(Self::V6),
            _ => bail!("family {s:?} is not ipv4 or ipv6"),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// The families a probe runs over (FORMAT dual rule): its pinned family if
/// the run has it; under dual both, except IPv4 only in a case whose
/// objects have an ipBlock or `networks` peer. Empty: skipped (pinned to a
/// family the run has no addresses of).
pub fn probe_families(run: IpFamily, pinned: Option<Family>, address_peers: bool) -> Vec<Family> {
    match (pinned, run) {
        (Some(f), run) if run.has(f) => vec![f],
        (Some(_), _) => Vec::new(),
        (None, IpFamily::Ipv4) => vec![Family::V4],
        (None, IpFamily::Ipv6) => vec![Family::V6],
        (None, IpFamily::Dual) if address_peers => vec![Family::V4],
        (None, IpFamily::Dual) => vec![Family::V4, Family::V6],
    }
}

/// Whether an object has an ipBlock or `networks` peer anywhere (an
/// `ipBlock` mapping or a `networks` list; a label of that name is not).
pub fn has_address_peer(doc: &Value) -> bool {
    match doc {
        Value::Mapping(m) => m.iter().any(|(k, v)| {
            matches!(
                (k.as_str(), v),
                (Some("ipBlock"), Value::Mapping(_)) | (Some("networks"), Value::Sequence(_))
            ) || has_address_peer(v)
        }),
        Value::Sequence(items) => items.iter().any(has_address_peer),
        Value::Tagged(t) => has_address_peer(&t.value),
        _ => false,
    }
}

/// The ULA prefix pods' IPv6 addresses live under (its first 60 bits).
pub const PREFIX6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x212, 0x213, 0, 0, 0, 0, 0);
/// IPv6 prefix length = IPv4 prefix length + this (FORMAT).
pub const SHIFT: u8 = 60;

/// The IPv6 mirror of an IPv4 address: its 32 bits at bits 60..92.
pub fn mirror(v4: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(PREFIX6) | (u128::from(u32::from(v4)) << (128 - 32 - SHIFT)))
}

/// The IPv6 mirror of an IPv4 CIDR (`10.213.0.0/24` ->
/// `fd00:212:213:0:ad50::/84`).
pub fn mirror_cidr(cidr: &str) -> Result<String> {
    let Some((ip, len)) = cidr.split_once('/') else {
        bail!("{cidr:?} is not a CIDR");
    };
    let (ip, len): (Ipv4Addr, u8) = match (ip.parse(), len.parse()) {
        (Ok(i), Ok(l)) if l <= 32 => (i, l),
        _ => bail!("{cidr:?} is not an IPv4 CIDR"),
    };
    Ok(format!("{}/{}", mirror(ip), len + SHIFT))
}

/// The canonical IPv6 network of `ip` with `prefix` bits.
pub fn network6(ip: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    };
    Ipv6Addr::from(u128::from(ip) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_keep_containment_at_n_plus_60() {
        let a: Ipv4Addr = "10.213.0.2".parse().unwrap();
        assert_eq!(mirror(a).to_string(), "fd00:212:213:0:ad50:20::");
        assert_eq!(
            mirror_cidr("10.213.0.0/24").unwrap(),
            "fd00:212:213:0:ad50::/84"
        );
        assert!(mirror_cidr("10.213.0.0/33").is_err());
        assert!(mirror_cidr("fd00::/64").is_err());
        // For every prefix length, the IPv6 network of a's mirror holds
        // b's mirror exactly when the IPv4 network of a holds b.
        let b: Ipv4Addr = "10.213.0.3".parse().unwrap();
        let c: Ipv4Addr = "10.213.1.7".parse().unwrap();
        for n in 0..=32u8 {
            for other in [b, c] {
                let v4 = super::super::placeholder::network(a, n)
                    == super::super::placeholder::network(other, n);
                let v6 = network6(mirror(a), n + SHIFT) == network6(mirror(other), n + SHIFT);
                assert_eq!(v4, v6, "/{n} and {other}");
            }
        }
        // Every pod mirror is under the ULA prefix, never a global address.
        assert_eq!(network6(mirror(c), SHIFT), PREFIX6);
        assert_eq!(mirror(c).segments()[0] & 0xfe00, 0xfc00);
    }

    #[test]
    fn the_dual_rule_and_pinned_probes() {
        use Family::*;
        let all = [IpFamily::Ipv4, IpFamily::Ipv6, IpFamily::Dual];
        let got: Vec<Vec<Family>> = all
            .iter()
            .map(|r| probe_families(*r, None, false))
            .collect();
        assert_eq!(got, [vec![V4], vec![V6], vec![V4, V6]]);
        // ipBlock / networks: IPv4 only under dual; ipv6 runs still use IPv6.
        let got: Vec<Vec<Family>> = all.iter().map(|r| probe_families(*r, None, true)).collect();
        assert_eq!(got, [vec![V4], vec![V6], vec![V4]]);
        // Pinned: that family when the run has it, else nothing (skipped).
        assert_eq!(probe_families(IpFamily::Dual, Some(V6), true), [V6]);
        assert_eq!(probe_families(IpFamily::Dual, Some(V4), false), [V4]);
        assert!(probe_families(IpFamily::Ipv4, Some(V6), false).is_empty());
        assert!(probe_families(IpFamily::Ipv6, Some(V4), false).is_empty());
        assert_eq!(probe_families(IpFamily::Ipv6, Some(V6), false), [V6]);
    }

    #[test]
    fn finds_address_peers_anywhere_in_an_object() {
        let yaml = |s: &str| -> Value { serde_yaml::from_str(s).unwrap() };
        assert!(has_address_peer(&yaml(
            "spec: {egress: [{to: [{ipBlock: {cidr: '{{subnet}}'}}]}]}"
        )));
        assert!(has_address_peer(&yaml(
            "spec: {egress: [{action: Deny, to: [{networks: ['{{host a/x}}']}]}]}"
        )));
        assert!(!has_address_peer(&yaml(
            "spec: {ingress: [{from: [{podSelector: {matchLabels: {networks: x}}}]}]}"
        )));
    }

    #[test]
    fn families_parse() {
        assert_eq!(IpFamily::parse("dual").unwrap(), IpFamily::Dual);
        assert!(IpFamily::parse("v6").is_err());
        assert_eq!(Family::parse("IPv6").unwrap(), Family::V6);
    }
}
