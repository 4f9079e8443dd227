//! The IPv4 addresses of this node's interfaces (getifaddrs(3)). The host
//! side of every pod veth carries the pods' gateway address; the node uses
//! it as its source towards its pods (kubelet probes), so it is `host`.
use std::{collections::HashSet, ffi::CStr, io, net::Ipv4Addr};

/// The IPv4 addresses of the interfaces named in `names` (interfaces that
/// do not exist contribute nothing).
pub fn ipv4_of(names: &HashSet<&str>) -> io::Result<Vec<Ipv4Addr>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: non-null, points into the list.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: a NUL-terminated name from the kernel.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if !names.contains(name.as_ref()) {
            continue;
        }
        // SAFETY: AF_INET, so the address is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_127_0_0_1_and_unknown_names_nothing() {
        let lo = ipv4_of(&HashSet::from(["lo"])).unwrap();
        assert!(lo.contains(&Ipv4Addr::LOCALHOST), "{lo:?}");
        assert!(ipv4_of(&HashSet::from(["no-such-if0"])).unwrap().is_empty());
    }
}
