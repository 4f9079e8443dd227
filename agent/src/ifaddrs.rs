//! The IPv4 address of a host-side pod veth. The host side of every pod
//! veth carries the pods' gateway address; the node uses it as its source
//! towards its pods (kubelet probes), so it is `host`.
//!
//! One `SIOCGIFADDR` per interface, asked once per registration: a
//! getifaddrs(3) per registration dumped every link of the node with its
//! statistics, half of the agent's time per CNI ADD at a few hundred pods.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
};

/// The primary IPv4 address of interface `name`; `None` when it has none
/// (a bridge port in chained mode) or does not exist.
pub fn primary_ipv4(name: &str) -> io::Result<Option<Ipv4Addr>> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Ok(None);
    }
    // SAFETY: a plain datagram socket, owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours; OwnedFd closes it.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFADDR reads ifr_name and writes ifr_addr of `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFADDR, &mut req) } != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EADDRNOTAVAIL) | Some(libc::ENODEV) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel filled an AF_INET sockaddr_in into ifr_addr.
    let sin =
        unsafe { &*(&req.ifr_ifru.ifru_addr as *const libc::sockaddr as *const libc::sockaddr_in) };
    Ok(Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
}

/// The global IPv6 addresses of interface `name` (the IPv6 gateway a
/// dual-stack or IPv6 pod's host veth carries), from /proc/net/if_inet6
/// (one line per address: hex address, ifindex, prefix length, scope,
/// flags, name). Link-local ones are left out: they never leave the link,
/// and the datapath's neighbour discovery rules handle them.
pub fn global_ipv6(name: &str) -> io::Result<Vec<Ipv6Addr>> {
    match std::fs::read_to_string("/proc/net/if_inet6") {
        Ok(text) => Ok(parse_if_inet6(&text, name)),
        // No IPv6 in this kernel (or namespace): no IPv6 gateway.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn parse_if_inet6(text: &str, name: &str) -> Vec<Ipv6Addr> {
    const SCOPE_GLOBAL: u32 = 0;
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 6 || f[5] != name || u32::from_str_radix(f[3], 16).ok()? != SCOPE_GLOBAL {
                return None;
            }
            Some(Ipv6Addr::from(u128::from_str_radix(f[0], 16).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_ipv6_addresses_of_one_interface_are_read() {
        let text = "fd000009000000000000000000000001 05 80 00 80 vh1234\n\
                    fe80000000000000000000fffe000001 05 40 20 80 vh1234\n\
                    fd000009000000000000000000000002 06 80 00 80 vh9999\n\
                    00000000000000000000000000000001 01 80 10 80 lo\n";
        assert_eq!(
            parse_if_inet6(text, "vh1234"),
            vec!["fd00:9::1".parse::<Ipv6Addr>().unwrap()]
        );
        assert!(parse_if_inet6(text, "lo").is_empty(), "host scope");
        assert!(parse_if_inet6(text, "nope").is_empty());
    }

    #[test]
    fn loopback_has_127_0_0_1_and_unknown_names_nothing() {
        assert_eq!(primary_ipv4("lo").unwrap(), Some(Ipv4Addr::LOCALHOST));
        assert_eq!(primary_ipv4("no-such-if0").unwrap(), None);
        assert_eq!(primary_ipv4("").unwrap(), None);
    }
}
