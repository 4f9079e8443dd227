//! The IPv4 address of a host-side pod veth. The host side of every pod
//! veth carries the pods' gateway address; the node uses it as its source
//! towards its pods (kubelet probes), so it is `host`.
//!
//! One `SIOCGIFADDR` per interface, asked once per registration: a
//! getifaddrs(3) per registration dumped every link of the node with its
//! statistics, half of the agent's time per CNI ADD at a few hundred pods.
use std::{io, net::Ipv4Addr, os::fd::AsRawFd};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_127_0_0_1_and_unknown_names_nothing() {
        assert_eq!(primary_ipv4("lo").unwrap(), Some(Ipv4Addr::LOCALHOST));
        assert_eq!(primary_ipv4("no-such-if0").unwrap(), None);
        assert_eq!(primary_ipv4("").unwrap(), None);
    }
}
