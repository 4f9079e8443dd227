//! Every netlink message the agent sends is built here (routes to other
//! nodes' pod ranges, the vxlan device, its neighbour and forwarding
//! entries), sent through rtnetlink on a current-thread runtime of its own:
//! callers are plain threads (the route sync thread), never a tokio task.
//!
//! Routes the agent owns carry their own protocol number
//! ([`RTPROT_PALISADE`]), so a restarted agent finds them again, and a
//! route someone else put there (the primary CNI, an operator) is never
//! touched: adding ours over it fails with EEXIST and is reported.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd},
};

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::{
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol},
    AddressFamily,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tokio::runtime::Runtime;

/// The routing protocol number on the agent's routes (`ip route show proto
/// 0xb0`): not one iproute2 or a routing daemon uses.
pub const RTPROT_PALISADE: u8 = 0xb0;

/// A route of ours as read back (either family).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnedRoute {
    pub dst: IpNetwork,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

pub struct Netlink {
    rt: Runtime,
    handle: Handle,
}

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

/// An add that found something already there.
pub fn is_exists(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<rtnetlink::Error>()
            .is_some_and(|e| errno(e) == Some(libc::EEXIST))
    })
}

impl Netlink {
    /// A socket in the agent's own network namespace (the node's).
    pub fn open() -> Result<Self> {
        let socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
        Self::from_fd(socket.into_raw_fd())
    }

    fn from_fd(fd: RawFd) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .context("starting the netlink runtime")?;
        let handle = {
            let _guard = rt.enter();
            // SAFETY: `fd` is the open netlink socket we just made and own.
            let sock = unsafe { TokioSocket::from_raw_fd(fd) };
            let (conn, handle, _) = rtnetlink::from_socket(sock);
            rt.spawn(conn);
            handle
        };
        Ok(Self { rt, handle })
    }

    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    // ---- routes -------------------------------------------------------

    /// The main table's routes of both families with our protocol number.
    pub fn owned_routes(&self) -> Result<Vec<OwnedRoute>> {
        let v4 = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let v6 = RouteMessageBuilder::<Ipv6Addr>::new().build();
        let mut msgs: Vec<RouteMessage> = Vec::new();
        for query in [v4, v6] {
            let got: Vec<RouteMessage> = self
                .run(self.handle.route().get(query).execute().try_collect())
                .context("listing routes")?;
            msgs.extend(got);
        }
        let mut out: Vec<OwnedRoute> = msgs
            .into_iter()
            .filter(|m| m.header.protocol == RouteProtocol::from(RTPROT_PALISADE))
            .filter(|m| {
                m.header.table == RouteHeader::RT_TABLE_MAIN
                    || m.attributes
                        .iter()
                        .any(|a| matches!(a, RouteAttribute::Table(254)))
            })
            .filter_map(|m| {
                let mut dst = match m.header.address_family {
                    AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    _ => return None,
                };
                let mut gateway = None;
                let mut oif = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = (*d).into(),
                        RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = (*d).into(),
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => {
                            gateway = Some((*g).into())
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => {
                            gateway = Some((*g).into())
                        }
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                let dst = IpNetwork::new(dst, m.header.destination_prefix_length).ok()?;
                Some(OwnedRoute { dst, gateway, oif })
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn route_message(r: &OwnedRoute, onlink: bool) -> RouteMessage {
        fn finish<T>(
            mut b: RouteMessageBuilder<T>,
            r: &OwnedRoute,
            onlink: bool,
        ) -> RouteMessageBuilder<T> {
            b = b.protocol(RouteProtocol::from(RTPROT_PALISADE));
            if let Some(oif) = r.oif {
                b = b.output_interface(oif);
            }
            if onlink {
                b = b.onlink();
            }
            b
        }
        match (r.dst, r.gateway) {
            (IpNetwork::V4(dst), gw) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(dst.network(), dst.prefix());
                if let Some(IpAddr::V4(gw)) = gw {
                    b = b.gateway(gw);
                }
                finish(b, r, onlink).build()
            }
            (IpNetwork::V6(dst), gw) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(dst.network(), dst.prefix());
                if let Some(IpAddr::V6(gw)) = gw {
                    b = b.gateway(gw);
                }
                finish(b, r, onlink).build()
            }
        }
    }

    /// `ip route add <dst> via <gw> [dev <oif> onlink] proto 0xb0`; fails
    /// with EEXIST (see [`is_exists`]) when any route for `dst` is there.
    pub fn add_route(&self, r: &OwnedRoute, onlink: bool) -> Result<()> {
        let msg = Self::route_message(r, onlink);
        self.run(self.handle.route().add(msg).execute())
            .with_context(|| format!("adding route {} via {:?}", r.dst, r.gateway))
    }

    /// Removes one of our routes (gone already is fine).
    pub fn del_route(&self, r: &OwnedRoute) -> Result<()> {
        let msg = Self::route_message(r, false);
        match self.run(self.handle.route().del(msg).execute()) {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing route {}", r.dst)),
        }
    }

    // ---- the vxlan device ---------------------------------------------

    fn link(&self, name: &str) -> Result<Option<LinkMessage>> {
        let req = self.handle.link().get().match_name(name.to_string());
        match self.run(async { req.execute().try_next().await }) {
            Ok(m) => Ok(m),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
        }
    }

    /// The device `name`: (ifindex, is it vxlan, its local address, its MAC).
    fn vxlan_info(m: &LinkMessage) -> (bool, Option<Ipv4Addr>, Vec<u8>) {
        let mut vxlan = false;
        let mut local = None;
        let mut mac = Vec::new();
        for a in &m.attributes {
            match a {
                LinkAttribute::Address(b) => mac = b.clone(),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(InfoKind::Vxlan) => vxlan = true,
                            LinkInfo::Data(InfoData::Vxlan(d)) => {
                                for x in d {
                                    if let InfoVxlan::Local(l) = x {
                                        local = Some(*l);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        (vxlan, local, mac)
    }

    /// The vxlan device exists, with this VNI/port, `local` as its source,
    /// `mac`, `mtu`, learning off, up; an existing one with other settings
    /// is replaced. Returns its ifindex.
    pub fn ensure_vxlan(
        &self,
        name: &str,
        vni: u32,
        port: u16,
        local: Ipv4Addr,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<u32> {
        if let Some(m) = self.link(name)? {
            let (vxlan, have_local, have_mac) = Self::vxlan_info(&m);
            if vxlan && have_local == Some(local) && have_mac == mac {
                let msg = LinkUnspec::new_with_index(m.header.index)
                    .mtu(mtu)
                    .up()
                    .build();
                self.run(self.handle.link().change(msg).execute())
                    .with_context(|| format!("setting {name} up"))?;
                return Ok(m.header.index);
            }
            self.run(self.handle.link().del(m.header.index).execute())
                .with_context(|| format!("replacing {name} (other settings)"))?;
        }
        let msg = LinkVxlan::new(name, vni)
            .port(port)
            .local(local)
            .learning(false)
            .mtu(mtu)
            .address(mac.to_vec())
            .up()
            .build();
        self.run(self.handle.link().add(msg).execute())
            .with_context(|| format!("creating vxlan device {name}"))?;
        self.link(name)?
            .map(|m| m.header.index)
            .ok_or_else(|| anyhow!("{name} vanished right after it was created"))
    }

    /// `ip link del <name>` (absent is fine).
    pub fn delete_link(&self, name: &str) -> Result<()> {
        let Some(m) = self.link(name)? else {
            return Ok(());
        };
        match self.run(self.handle.link().del(m.header.index).execute()) {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting {name}")),
        }
    }

    /// The ifindex of `name`, if it exists.
    pub fn ifindex(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link(name)?.map(|m| m.header.index))
    }

    /// Permanent neighbour entries of both families on `index`:
    /// (address, MAC).
    pub fn neighbours(&self, index: u32) -> Result<Vec<(IpAddr, Vec<u8>)>> {
        let mut msgs = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let req = self.handle.neighbours().get().set_address_family(family);
            let got: Vec<_> = self
                .run(req.execute().try_collect())
                .context("listing neighbours")?;
            msgs.extend(got);
        }
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent)
            .filter_map(|m| {
                let mut ip = None;
                let mut mac = Vec::new();
                for a in m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => {
                            ip = Some(IpAddr::V4(d))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => {
                            ip = Some(IpAddr::V6(d))
                        }
                        NeighbourAttribute::LinkLayerAddress(l) => mac = l,
                        _ => {}
                    }
                }
                Some((ip?, mac))
            })
            .collect())
    }

    /// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`
    pub fn set_neighbour(&self, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
        let req = self
            .handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace();
        self.run(req.execute())
            .with_context(|| format!("setting neighbour {ip} on link {index}"))
    }

    /// `ip neigh del <ip> dev <index>`
    pub fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<()> {
        let mut msg = netlink_packet_route::neighbour::NeighbourMessage::default();
        msg.header.ifindex = index;
        let (family, dst) = match ip {
            IpAddr::V4(a) => (AddressFamily::Inet, NeighbourAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, NeighbourAddress::Inet6(a)),
        };
        msg.header.family = family;
        msg.attributes.push(NeighbourAttribute::Destination(dst));
        match self.run(self.handle.neighbours().del(msg).execute()) {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing neighbour {ip}")),
        }
    }

    /// Forwarding entries of the vxlan device: (MAC, remote address).
    pub fn fdb(&self, index: u32) -> Result<Vec<(Vec<u8>, Ipv4Addr)>> {
        let req = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge);
        let msgs: Vec<_> = self
            .run(req.execute().try_collect())
            .context("listing forwarding entries")?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .filter_map(|m| {
                let mut dst = None;
                let mut mac = Vec::new();
                for a in m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => dst = Some(d),
                        NeighbourAttribute::LinkLayerAddress(l) => mac = l,
                        _ => {}
                    }
                }
                Some((mac, dst?))
            })
            .collect())
    }

    /// `bridge fdb replace <mac> dev <index> dst <remote> self permanent`
    pub fn set_fdb(&self, index: u32, mac: [u8; 6], remote: Ipv4Addr) -> Result<()> {
        let req = self
            .handle
            .neighbours()
            .add_bridge(index, &mac)
            .destination(IpAddr::V4(remote))
            .flags(NeighbourFlags::Own)
            .replace();
        self.run(req.execute())
            .with_context(|| format!("setting forwarding entry to {remote} on link {index}"))
    }

    /// `bridge fdb del <mac> dev <index> dst <remote> self`
    pub fn del_fdb(&self, index: u32, mac: &[u8], remote: Ipv4Addr) -> Result<()> {
        let mut msg = netlink_packet_route::neighbour::NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                remote,
            )));
        match self.run(self.handle.neighbours().del(msg).execute()) {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing forwarding entry to {remote}")),
        }
    }
}

/// A registration's interfaces are one veth pair: `host_ifname` here and
/// `ifname` inside the namespace `netns`, each the other's peer (checked
/// both ways, so an ifindex that merely coincides in the other namespace
/// is never taken). Keeps a local process from having the agent attach to
/// (and vouch for) an interface that is not the pod's.
pub fn check_veth_pair(host_ifname: &str, netns: &str, ifname: &str) -> Result<()> {
    let host = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    let (h, h_peer, elsewhere) = veth_attrs(
        &link_blocking(&host, host_ifname)?
            .ok_or_else(|| anyhow!("no interface {host_ifname} on the node"))?,
        host_ifname,
    )?;
    // An agent in a container sees the runtime's netns files only where
    // they are mounted in (the DaemonSet mounts /var/run/netns). Without
    // the file, what can be checked from here is that the interface is a
    // veth whose peer lives in another namespace.
    if !std::path::Path::new(netns).exists() {
        if h_peer.is_some() && elsewhere {
            tracing::warn!(
                "{netns} is not visible to the agent: {host_ifname} checked as a veth into another namespace only"
            );
            return Ok(());
        }
        return Err(anyhow!(
            "{host_ifname} is not a veth into another namespace (and {netns} is not visible to the agent)"
        ));
    }
    let pod = socket_in(netns)?;
    let (p, p_peer, _) = veth_attrs(
        &link_blocking(&pod, ifname)
            .with_context(|| format!("in {netns}"))?
            .ok_or_else(|| anyhow!("no interface {ifname} in {netns}"))?,
        ifname,
    )?;
    if h_peer != Some(p) || p_peer != Some(h) {
        return Err(anyhow!(
            "{host_ifname} (ifindex {h}, peer {h_peer:?}) and {ifname} in {netns} (ifindex {p}, peer {p_peer:?}) are not one veth pair"
        ));
    }
    Ok(())
}

/// A netlink socket in the network namespace whose file is `path` (a
/// pod's), opened from a short-lived thread that entered it: setns moves
/// only the calling thread, and the socket stays bound to that namespace.
fn socket_in(path: &str) -> Result<Socket> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening netns {path}"))?;
    let fd = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<RawFd> {
            // SAFETY: a valid namespace fd; only this thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Socket::new(NETLINK_ROUTE)?.into_raw_fd())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
    })
    .with_context(|| format!("opening a netlink socket in {path}"))?;
    // SAFETY: `fd` is the netlink socket just made, owned by nobody else.
    Ok(unsafe { Socket::from_raw_fd(fd) })
}

/// The link called `name`, asked with one blocking request on a plain
/// socket. The pair check runs for every registration on the agent's
/// owner thread, where a runtime and a thread per call (rtnetlink's way)
/// cost more than the check itself.
fn link_blocking(sock: &Socket, name: &str) -> Result<Option<LinkMessage>> {
    use rtnetlink::packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
    use rtnetlink::packet_route::RouteNetlinkMessage;
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    let mut req = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(m)),
    );
    req.header.flags = NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)
        .with_context(|| format!("asking for link {name}"))?;
    let mut reply = Vec::with_capacity(32 * 1024);
    let n = sock
        .recv(&mut reply, 0)
        .with_context(|| format!("reading link {name}"))?;
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..n])
        .map_err(|e| anyhow!("parsing the answer for link {name}: {e}"))?;
    match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => Ok(Some(l)),
        NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
            Some(libc::ENODEV) | Some(libc::ENOENT) => Ok(None),
            _ => Err(anyhow!("looking up link {name}: {e}")),
        },
        other => Err(anyhow!(
            "looking up link {name}: unexpected answer {other:?}"
        )),
    }
}

/// (ifindex, peer ifindex, is the peer in another namespace) of a veth;
/// an error when `m` is not one.
fn veth_attrs(m: &LinkMessage, name: &str) -> Result<(u32, Option<u32>, bool)> {
    let mut veth = false;
    let mut peer = None;
    let mut elsewhere = false;
    for a in &m.attributes {
        match a {
            LinkAttribute::LinkNetNsId(_) => elsewhere = true,
            LinkAttribute::Link(i) => peer = Some(*i),
            LinkAttribute::LinkInfo(infos) => {
                veth |= infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    if !veth {
        return Err(anyhow!("{name} is not a veth"));
    }
    Ok((m.header.index, peer, elsewhere))
}
