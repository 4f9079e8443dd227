//! Every netlink message the plugin sends is built here (links, addresses,
//! routes), sent through rtnetlink on a current-thread tokio runtime.
//!
//! A [`Netlink`] talks to one network namespace: the socket is opened on a
//! short-lived thread that has entered the namespace (setns changes only
//! the calling thread), and a netlink socket stays bound to the namespace
//! it was created in, so the plugin's own thread never moves.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd},
    path::Path,
};

use futures_util::stream::TryStreamExt;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
    AddressFamily,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use tokio::runtime::Runtime;

use crate::error::{self, CniError, Result};

/// What the plugin reads back about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    pub up: bool,
    /// The kernel has processed the carrier (IFLA_OPERSTATE up, or unknown
    /// for a device that does not report one): see `Netlink::wait_running`.
    pub running: bool,
    /// "veth", "bridge", … (IFLA_INFO_KIND), empty when the kernel says none.
    pub kind: String,
    /// IFLA_LINK: for a veth, the peer's ifindex in the peer's namespace.
    pub peer_index: Option<u32>,
}

/// A route as read back from the main table (either family).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub scope: RouteScope,
}

pub struct Netlink {
    rt: Runtime,
    handle: Handle,
    /// "host" or the namespace path, for messages.
    pub place: String,
}

fn fail(op: impl std::fmt::Display, e: impl std::fmt::Display) -> CniError {
    CniError::with_details(error::NETLINK, format!("netlink: {op}"), e.to_string())
}

/// The errno of a netlink error reply, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn is_missing(e: &rtnetlink::Error) -> bool {
    matches!(
        errno(e),
        Some(libc::ENODEV) | Some(libc::ENOENT) | Some(libc::ESRCH)
    )
}

fn mac_string(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Netlink {
    /// The namespace the plugin runs in (the node's).
    pub fn host() -> Result<Self> {
        let socket = Socket::new(NETLINK_ROUTE).map_err(|e| fail("opening a socket", e))?;
        Self::from_fd(socket.into_raw_fd(), "host".to_string())
    }

    /// The namespace whose file (e.g. /run/netns/x) is `ns`.
    pub fn in_netns(ns: &File, path: &str) -> Result<Self> {
        let nsfd = ns.as_raw_fd();
        let fd = std::thread::scope(|s| {
            s.spawn(|| -> std::io::Result<RawFd> {
                // SAFETY: a valid namespace fd; only this short-lived thread moves.
                if unsafe { libc::setns(nsfd, libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(Socket::new(NETLINK_ROUTE)?.into_raw_fd())
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
        })
        .map_err(|e| fail(format!("opening a socket in {path}"), e))?;
        Self::from_fd(fd, path.to_string())
    }

    fn from_fd(fd: RawFd, place: String) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| fail("starting the runtime", e))?;
        let handle = {
            let _guard = rt.enter();
            // SAFETY: `fd` is an open netlink socket we own (from
            // Socket::into_raw_fd); TokioSocket takes it over.
            let sock = unsafe { TokioSocket::from_raw_fd(fd) };
            let (conn, handle, _) = rtnetlink::from_socket(sock);
            rt.spawn(conn);
            handle
        };
        Ok(Self { rt, handle, place })
    }

    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    // ---- links --------------------------------------------------------

    /// `ip link add <host> mtu M type veth peer name <peer> mtu M netns <fd>`:
    /// the container end is born inside the pod's namespace.
    pub fn create_veth(&self, host: &str, peer: &str, peer_netns: &File, mtu: u32) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(host, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.run(self.handle.link().add(msg).execute()).map_err(|e| {
            if errno(&e) == Some(libc::EEXIST) {
                CniError::with_details(
                    error::NETLINK,
                    format!("cannot create veth {host}/{peer}: an interface of that name already exists"),
                    e.to_string(),
                )
            } else {
                fail(format!("creating veth {host} (peer {peer})"), e)
            }
        })
    }

    /// `ip link set <index> up`
    pub fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.run(self.handle.link().change(msg).execute())
            .map_err(|e| fail(format!("setting link {index} up in {}", self.place), e))
    }

    /// Wait, up to `within`, until the kernel has processed link `name`'s
    /// carrier: until then IPv6 is not configured on it (no multicast
    /// route, so neighbour solicitations to its addresses are dropped as
    /// unroutable) and its transmit queue may still be the no-op one.
    /// The carrier event is handled by the kernel's link watch, which
    /// defers any event it does not deem urgent by up to a second: a
    /// veth's own link-up is one when its ifindex equals its peer's (each
    /// namespace numbers its own interfaces). A link lookup runs the
    /// link's pending event, so the first look usually finds it done.
    /// Returns whether it happened.
    pub fn wait_running(&self, name: &str, within: std::time::Duration) -> Result<bool> {
        let start = std::time::Instant::now();
        let mut pause = std::time::Duration::from_micros(200);
        loop {
            match self.link(name)? {
                Some(l) if l.running => return Ok(true),
                Some(_) => {}
                None => return Ok(false),
            }
            if start.elapsed() >= within {
                return Ok(false);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(20));
        }
    }

    /// `ip link del <name>`; false when there was no such link.
    pub fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link(name)? else {
            return Ok(false);
        };
        match self.run(self.handle.link().del(link.index).execute()) {
            Ok(()) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(fail(format!("deleting {name} in {}", self.place), e)),
        }
    }

    fn parse_link(m: LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            mac: String::new(),
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
            running: false,
            kind: String::new(),
            peer_index: None,
        };
        for a in m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n,
                LinkAttribute::Address(b) => l.mac = mac_string(&b),
                LinkAttribute::Mtu(m) => l.mtu = m,
                LinkAttribute::Link(i) => l.peer_index = Some(i),
                LinkAttribute::OperState(st) => {
                    l.running = matches!(st, State::Up | State::Unknown)
                }
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            l.kind = match k {
                                InfoKind::Veth => "veth".to_string(),
                                InfoKind::Bridge => "bridge".to_string(),
                                other => other.to_string(),
                            };
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }

    async fn first_link(req: rtnetlink::LinkGetRequest) -> Result<Option<Link>, rtnetlink::Error> {
        match req.execute().try_next().await {
            Ok(m) => Ok(m.map(Self::parse_link)),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ip link show <name>`
    pub fn link(&self, name: &str) -> Result<Option<Link>> {
        self.run(Self::first_link(
            self.handle.link().get().match_name(name.to_string()),
        ))
        .map_err(|e| fail(format!("looking up {name} in {}", self.place), e))
    }

    /// `ip link show` by index.
    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        self.run(Self::first_link(
            self.handle.link().get().match_index(index),
        ))
        .map_err(|e| fail(format!("looking up link {index} in {}", self.place), e))
    }

    // ---- addresses ----------------------------------------------------

    /// `ip addr add <ip>/<prefix> dev <index>`; an IPv6 address with
    /// `nodad`: it is unique on its veth by construction (the IPAM store
    /// hands it out once; the gateway is never handed out), so duplicate
    /// address detection could find nothing and would only keep it
    /// tentative, unusable, for a second or more after the link comes up.
    pub fn add_address(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        let msg = match ip {
            IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(v4, prefix)
                .build(),
            IpAddr::V6(v6) => {
                let mut m = AddressMessageBuilder::<Ipv6Addr>::new()
                    .index(index)
                    .address(v6, prefix)
                    .build();
                m.header.flags = AddressHeaderFlags::Nodad;
                m.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
                m
            }
        };
        let res = self.run(async {
            let mut req = self.handle.address().add(index, ip, prefix);
            *req.message_mut() = msg;
            req.execute().await
        });
        match res {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(fail(
                format!("adding {ip}/{prefix} to link {index} in {}", self.place),
                e,
            )),
        }
    }

    /// The IPv4 and IPv6 addresses on a link.
    pub fn addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
        let msgs: Vec<AddressMessage> = self
            .run(
                self.handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute()
                    .try_collect(),
            )
            .map_err(|e| {
                fail(
                    format!("listing addresses of link {index} in {}", self.place),
                    e,
                )
            })?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                let prefix = m.header.prefix_len;
                // IPv4 carries the local address in IFA_LOCAL, IPv6 in
                // IFA_ADDRESS only.
                m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => {
                        Some((ip, prefix))
                    }
                    _ => None,
                })
            })
            .collect())
    }

    // ---- routes -------------------------------------------------------

    /// `ip route add <dst>/<prefix> [via <gw>] dev <oif> [scope link]`
    /// (IPv6 routes have no scope: `link_scope` is for IPv4). The gateway
    /// must be of the destination's family.
    pub fn add_route(
        &self,
        dst: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
        oif: u32,
        link_scope: bool,
    ) -> Result<()> {
        let family = |gw: IpAddr| {
            CniError::new(
                error::NETLINK,
                format!("route {dst}/{prefix} via {gw}: the gateway is not of the route's family"),
            )
        };
        let msg: RouteMessage = match dst {
            IpAddr::V4(d) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d, prefix)
                    .output_interface(oif);
                match gateway {
                    Some(IpAddr::V4(gw)) => b = b.gateway(gw),
                    Some(gw) => return Err(family(gw)),
                    None => {}
                }
                if link_scope {
                    b = b.scope(RouteScope::Link);
                }
                b.build()
            }
            IpAddr::V6(d) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(d, prefix)
                    .output_interface(oif);
                match gateway {
                    Some(IpAddr::V6(gw)) => b = b.gateway(gw),
                    Some(gw) => return Err(family(gw)),
                    None => {}
                }
                b.build()
            }
        };
        match self.run(self.handle.route().add(msg).execute()) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => {
                let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
                Err(fail(
                    format!(
                        "adding route {dst}/{prefix}{via} dev {oif} in {}",
                        self.place
                    ),
                    e,
                ))
            }
        }
    }

    /// The main table's routes of both families.
    pub fn routes(&self) -> Result<Vec<Route>> {
        let mut msgs: Vec<RouteMessage> = Vec::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let got: Vec<RouteMessage> = self
                .run(self.handle.route().get(query).execute().try_collect())
                .map_err(|e| fail(format!("listing routes in {}", self.place), e))?;
            msgs.extend(got);
        }
        Ok(msgs
            .into_iter()
            .filter(|m| {
                matches!(
                    m.header.address_family,
                    AddressFamily::Inet | AddressFamily::Inet6
                )
            })
            .filter(|m| {
                m.header.table == netlink_packet_route::route::RouteHeader::RT_TABLE_MAIN
                    || m.attributes
                        .iter()
                        .any(|a| matches!(a, RouteAttribute::Table(254)))
            })
            .map(|m| {
                let unspecified = if m.header.address_family == AddressFamily::Inet6 {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                };
                let mut r = Route {
                    dst: unspecified,
                    prefix: m.header.destination_prefix_length,
                    gateway: None,
                    oif: None,
                    scope: m.header.scope,
                };
                for a in m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => r.dst = d.into(),
                        RouteAttribute::Destination(RouteAddress::Inet6(d)) => r.dst = d.into(),
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => {
                            r.gateway = Some(g.into())
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => {
                            r.gateway = Some(g.into())
                        }
                        RouteAttribute::Oif(i) => r.oif = Some(i),
                        _ => {}
                    }
                }
                r
            })
            .collect())
    }
}

/// Opens a network namespace file (CNI_NETNS).
pub fn open_netns(path: &str) -> Result<File> {
    File::open(Path::new(path)).map_err(|e| {
        CniError::with_details(
            error::CONTAINER_UNKNOWN,
            format!("cannot open the container netns {path}"),
            e.to_string(),
        )
    })
}

/// net.ipv4.ip_forward=1 in the namespace the plugin runs in (the
/// /proc/sys/net files follow the opener's network namespace).
pub fn enable_ip_forward() -> Result<()> {
    enable_forward("/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward")
}

/// net.ipv6.conf.all.forwarding=1, for pods with an IPv6 address: IPv6
/// forwarding is one switch for the whole namespace. It also makes the
/// node's interfaces with accept_ra=1 ignore router advertisements (an
/// uplink configured by SLAAC needs accept_ra=2), as for every dual-stack
/// Kubernetes node.
pub fn enable_ipv6_forward() -> Result<()> {
    enable_forward(
        "/proc/sys/net/ipv6/conf/all/forwarding",
        "net.ipv6.conf.all.forwarding",
    )
}

fn enable_forward(path: &str, name: &str) -> Result<()> {
    if std::fs::read_to_string(path)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|e| {
        CniError::with_details(
            error::SYSCTL,
            format!("cannot enable {name}"),
            e.to_string(),
        )
    })
}

/// Sets `net.ipv6.conf.<ifname>.<key>` in the namespace of `ns` (None: the
/// plugin's own), from a short-lived thread that entered it (the
/// /proc/sys/net files follow the opener's namespace). A node or pod
/// without IPv6 has no such file, and nothing to set.
pub fn ipv6_conf(ns: Option<&File>, ifname: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/{key}");
    let write = || -> std::io::Result<()> {
        if let Some(ns) = ns {
            // SAFETY: a valid namespace fd; only this short-lived thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        match std::fs::write(&path, value) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    };
    // Only a namespace switch needs a thread of its own.
    let written = match ns {
        None => write(),
        Some(_) => std::thread::scope(|s| {
            s.spawn(write)
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
        }),
    };
    written.map_err(|e| {
        CniError::with_details(
            error::SYSCTL,
            format!("cannot set {path} to {value}"),
            e.to_string(),
        )
    })
}

/// The host-side veth name of an attachment: "pal" and 11 hex digits of a
/// stable hash (FNV-1a 64) of container id and ifname, 14 bytes in all.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("pal{:011x}", h >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_and_short() {
        let a = host_ifname("0123456789abcdef", "eth0");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("pal"));
        assert_eq!(a, host_ifname("0123456789abcdef", "eth0"));
        assert_ne!(a, host_ifname("0123456789abcdef", "eth1"));
        assert_ne!(a, host_ifname("0123456789abcdee", "eth0"));
        // Pinned: a changed hash would orphan veths across an upgrade.
        assert_eq!(host_ifname("c1", "eth0"), "palf53f02b3bfe");
    }

    #[test]
    fn mac_format() {
        assert_eq!(mac_string(&[2, 0, 0xab, 1, 2, 3]), "02:00:ab:01:02:03");
    }
}
