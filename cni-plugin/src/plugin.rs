//! The CNI commands. An attachment is built in [`Step`] order and torn
//! down by one function, in reverse: a failed ADD undoes exactly the steps
//! it completed, DEL and GC undo all of them, and teardown keeps going after
//! a failure and reports everything that went wrong at the end.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use palisade_api::Registration;
use serde_json::Value;

use crate::{
    agent,
    config::{Command, Env, Ipam, NetConf, RouteConf},
    error::{self, CniError, Errors, Result},
    ipam::{self, Store},
    netlink::{self, host_ifname, Netlink},
    result::{self, CniResult, Interface, IpConfig},
};

/// The parts of an attachment, in setup order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// An address from the pool (built-in or delegated IPAM).
    Address,
    /// The veth pair, its addresses and routes (on the host and in the pod).
    Veth,
    /// The endpoint, registered with the agent.
    Registration,
}

/// Everything a non-chained attachment has; chained mode only registers.
const OWNED: [Step; 3] = [Step::Address, Step::Veth, Step::Registration];
const CHAINED: [Step; 1] = [Step::Registration];

pub struct Ctx<'a> {
    pub env: Env,
    pub conf: NetConf,
    /// The exact bytes received, for delegated plugins.
    pub stdin: &'a [u8],
}

/// One address of a lease, with the gateway of its family.
#[derive(Clone, Copy, Debug)]
struct Leased {
    /// With the prefix of its subnet (the pod's interface carries a /32 or
    /// /128).
    address: IpNetwork,
    gateway: IpAddr,
}

/// An address lease: what the IPAM step hands to the wiring step. At most
/// one address per family, IPv4 first; at least one.
struct Lease {
    addresses: Vec<Leased>,
    routes: Vec<RouteConf>,
    dns: Option<Value>,
}

impl Lease {
    fn v4(&self) -> Option<Ipv4Addr> {
        self.addresses.iter().find_map(|a| match a.address.ip() {
            IpAddr::V4(ip) => Some(ip),
            _ => None,
        })
    }

    fn v6(&self) -> Option<Ipv6Addr> {
        self.addresses.iter().find_map(|a| match a.address.ip() {
            IpAddr::V6(ip) => Some(ip),
            _ => None,
        })
    }

    /// The gateway of `dst`'s family, if the lease has that family.
    fn gateway_for(&self, dst: &IpNetwork) -> Option<IpAddr> {
        self.addresses
            .iter()
            .find(|a| a.address.is_ipv4() == dst.is_ipv4())
            .map(|a| a.gateway)
    }
}

/// The host prefix of an address: /32 or /128.
fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

impl Ctx<'_> {
    fn host_if(&self) -> String {
        host_ifname(&self.env.container_id, &self.env.ifname)
    }

    fn steps(&self) -> &'static [Step] {
        if self.conf.chained {
            &CHAINED
        } else {
            &OWNED
        }
    }

    fn prev_result(&self) -> Result<CniResult> {
        let prev = self.conf.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                error::INVALID_CONFIG,
                "no prevResult: chained mode and CHECK need the previous result",
            )
        })?;
        result::parse(prev, "prevResult")
    }
}

// ---- ADD ----------------------------------------------------------------

pub fn add(ctx: &Ctx) -> Result<Value> {
    if ctx.conf.chained {
        return add_chained(ctx);
    }
    let ns = netlink::open_netns(&ctx.env.netns)?;
    let host = Netlink::host()?;
    let pod = Netlink::in_netns(&ns, &ctx.env.netns)?;
    if pod.link(&ctx.env.ifname)?.is_some() {
        return Err(CniError::new(
            error::NETLINK,
            format!(
                "an interface named {} already exists in {}",
                ctx.env.ifname, ctx.env.netns
            ),
        ));
    }
    let mut done: Vec<Step> = Vec::new();
    let res = (|| -> Result<CniResult> {
        done.push(Step::Address);
        let lease = allocate(ctx)?;
        done.push(Step::Veth);
        let result = wire(ctx, &host, &pod, &ns, &lease)?;
        // Before the call: an agent that times out may still finish the
        // registration, and deregistering an unknown endpoint is harmless.
        done.push(Step::Registration);
        let mac = result.interfaces.get(1).map(|i| i.mac.clone());
        register(ctx, lease.v4(), lease.v6(), ctx.host_if(), mac)?;
        // Only now, with the programs attached and the pod's policy in the
        // kernel, does the pod get a carrier and a route (each family):
        // no packet ever reaches or leaves it unenforced.
        open_host_side(ctx, &host, &lease)?;
        settle(ctx, &host, &pod, &result);
        Ok(result)
    })();
    match res {
        Ok(r) => Ok(r.to_json(&ctx.conf.cni_version)),
        Err(e) => Err(rolled_back(e, teardown(ctx, &done, Some(&host)))),
    }
}

/// Bring the host end up and route the pod's addresses to it.
fn open_host_side(ctx: &Ctx, host: &Netlink, lease: &Lease) -> Result<()> {
    let host_if = ctx.host_if();
    let h = host.link(&host_if)?.ok_or_else(|| {
        CniError::new(
            error::NETLINK,
            format!("{host_if} vanished during registration"),
        )
    })?;
    host.set_up(h.index)?;
    for a in &lease.addresses {
        let ip = a.address.ip();
        host.add_route(ip, host_prefix(ip), None, h.index, true)?;
    }
    Ok(())
}

/// How long ADD waits for the kernel to finish bringing the veth up.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

/// Return only once the kernel has handled both ends' carrier: before
/// that, a neighbour solicitation for the pod's IPv6 gateway, or the
/// node's for the pod, is dropped as unroutable and the pod's first IPv6
/// packets go nowhere (about half of the first echoes to the gateway, in
/// a node namespace where the host end and the pod's eth0 have the same
/// ifindex). Asking for the link runs its pending event (the kernel's
/// `rtnl_getlink` syncs the link watch), so this takes one look per end,
/// 0.1-0.3 ms. Late is not fatal (the pod's network works once the kernel
/// catches up), so a timeout is only reported.
fn settle(ctx: &Ctx, host: &Netlink, pod: &Netlink, result: &CniResult) {
    let ends = [
        (host, result.interfaces.first(), "host"),
        (pod, result.interfaces.get(1), "pod"),
    ];
    for (nl, iface, side) in ends {
        let Some(iface) = iface else { continue };
        let ready = nl.wait_running(&iface.name, SETTLE).unwrap_or(false);
        if !ready {
            eprintln!(
                "palisade: {}'s {side} end {} is not running after {SETTLE:?}",
                ctx.env.container_id, iface.name
            );
        }
    }
}

/// The ADD error, with what its rollback could not undo.
fn rolled_back(e: CniError, rollback: Errors) -> CniError {
    if rollback.is_empty() {
        eprintln!("palisade: ADD failed, everything it created was removed: {e}");
        return e;
    }
    let left = rollback.into_result().expect_err("not empty");
    let details = if e.details.is_empty() {
        format!("rollback incomplete: {left}")
    } else {
        format!("{}; rollback incomplete: {left}", e.details)
    };
    CniError { details, ..e }
}

fn allocate(ctx: &Ctx) -> Result<Lease> {
    match ctx.conf.ipam.as_ref().expect("non-chained has ipam") {
        Ipam::Builtin(pool) => {
            let got = Store::lock(&pool.data_dir)?.allocate(
                pool,
                &ctx.env.container_id,
                &ctx.env.ifname,
            )?;
            let addresses = got
                .into_iter()
                .map(|(ip, range)| Leased {
                    address: IpNetwork::new(ip, range.subnet.prefix())
                        .expect("prefix of a valid subnet"),
                    gateway: range.gateway,
                })
                .collect();
            Ok(Lease {
                addresses,
                routes: pool.routes.clone(),
                dns: ctx.conf.dns.clone(),
            })
        }
        Ipam::Delegate(kind) => {
            let out =
                ipam::delegate(kind, Command::Add, &ctx.env, ctx.stdin)?.ok_or_else(|| {
                    CniError::new(
                        error::DELEGATE,
                        format!("IPAM plugin {kind:?} printed no result"),
                    )
                })?;
            let r = result::parse(&out, &format!("the result of IPAM plugin {kind:?}"))?;
            // The first address of each family.
            let mut addresses: Vec<Leased> = Vec::new();
            for v4 in [true, false] {
                let Some(ip) = r.ips.iter().find(|ip| ip.address.is_ipv4() == v4) else {
                    continue;
                };
                let gateway = ip.gateway.unwrap_or_else(|| match ip.address.network() {
                    IpAddr::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n) + 1)),
                    IpAddr::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n) + 1)),
                });
                if gateway == ip.address.ip() {
                    return Err(CniError::new(
                        error::DELEGATE,
                        format!("IPAM plugin {kind:?} handed out the gateway address {gateway}"),
                    ));
                }
                addresses.push(Leased {
                    address: ip.address,
                    gateway,
                });
            }
            if addresses.is_empty() {
                return Err(CniError::new(
                    error::DELEGATE,
                    format!("IPAM plugin {kind:?} returned no IP address"),
                ));
            }
            Ok(Lease {
                addresses,
                routes: r.routes,
                dns: r.dns.or_else(|| ctx.conf.dns.clone()),
            })
        }
    }
}

/// The veth pair, wired like tests/src/lib.rs Node::add_pod, per family:
/// the pod has ip/32 (ip/128), a link route to the gateway and its routes
/// via the gateway; the host side has gateway/32 (gateway/128) and, once
/// registered, a link route to the pod.
fn wire(
    ctx: &Ctx,
    host: &Netlink,
    pod: &Netlink,
    ns: &std::fs::File,
    lease: &Lease,
) -> Result<CniResult> {
    let (host_if, ifname, mtu) = (ctx.host_if(), &ctx.env.ifname, ctx.conf.mtu);
    if host.delete_link(&host_if)? {
        eprintln!(
            "palisade: removed a stale {host_if} of an earlier ADD of {}/{ifname}",
            ctx.env.container_id
        );
    }
    host.create_veth(&host_if, ifname, ns, mtu)?;
    let missing = |what: &str, place: &str| {
        CniError::new(
            error::NETLINK,
            format!("{what} vanished from {place} right after it was created"),
        )
    };

    let c = pod
        .link(ifname)?
        .ok_or_else(|| missing(ifname, &ctx.env.netns))?;
    // Before the pod's link comes up. Without an IPv6 address, IPv6 is off
    // in the pod: it would only emit router solicitations and MLD reports.
    // With one, it is on but takes no router advertisement and configures
    // no address from one: its address and routes are the ones set here.
    // The host end takes no router advertisements and configures no
    // address from one either (issue 17 point 4).
    if lease.v6().is_some() {
        netlink::ipv6_conf(Some(ns), ifname, "accept_ra", "0")?;
        netlink::ipv6_conf(Some(ns), ifname, "autoconf", "0")?;
        netlink::ipv6_conf(Some(ns), ifname, "disable_ipv6", "0")?;
    } else {
        netlink::ipv6_conf(Some(ns), ifname, "disable_ipv6", "1")?;
    }
    netlink::ipv6_conf(None, &host_if, "accept_ra", "0")?;
    netlink::ipv6_conf(None, &host_if, "autoconf", "0")?;
    if lease.v6().is_some() {
        // A node whose new interfaces start with IPv6 off
        // (default.disable_ipv6=1) still carries the pod's gateway.
        netlink::ipv6_conf(None, &host_if, "disable_ipv6", "0")?;
    }
    for a in &lease.addresses {
        let ip = a.address.ip();
        pod.add_address(c.index, ip, host_prefix(ip))?;
    }
    pod.set_up(c.index)?;
    for a in &lease.addresses {
        let gw = a.gateway;
        pod.add_route(gw, host_prefix(gw), None, c.index, true)?;
    }
    let mut routes: Vec<RouteConf> = Vec::new();
    for r in &lease.routes {
        let Some(gw) = r.gw.or_else(|| lease.gateway_for(&r.dst)) else {
            // Only from a delegated plugin (the built-in pool's routes
            // are checked against its families).
            eprintln!(
                "palisade: route {} skipped: the pod has no address of its family",
                r.dst
            );
            continue;
        };
        pod.add_route(r.dst.network(), r.dst.prefix(), Some(gw), c.index, false)?;
        routes.push(RouteConf {
            dst: r.dst,
            gw: Some(gw),
        });
    }

    let h = host
        .link(&host_if)?
        .ok_or_else(|| missing(&host_if, "the host"))?;
    // The host end stays down (the pod has no carrier) until the agent has
    // attached the programs: see `open_host_side`.
    for a in &lease.addresses {
        let gw = a.gateway;
        host.add_address(h.index, gw, host_prefix(gw))?;
    }
    if lease.v4().is_some() {
        netlink::enable_ip_forward()?;
    }
    if lease.v6().is_some() {
        netlink::enable_ipv6_forward()?;
    }

    Ok(CniResult {
        interfaces: vec![
            Interface {
                name: host_if,
                mac: h.mac,
                mtu: Some(h.mtu),
                sandbox: String::new(),
            },
            Interface {
                name: ifname.clone(),
                mac: c.mac,
                mtu: Some(c.mtu),
                sandbox: ctx.env.netns.clone(),
            },
        ],
        ips: lease
            .addresses
            .iter()
            .map(|a| IpConfig {
                address: a.address,
                gateway: Some(a.gateway),
                interface: Some(1),
            })
            .collect(),
        routes,
        dns: lease.dns.clone(),
    })
}

fn register(
    ctx: &Ctx,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    host_if: String,
    mac: Option<String>,
) -> Result<()> {
    let (namespace, pod) = ctx.env.pod();
    agent::register(
        &ctx.conf,
        Registration {
            container_id: ctx.env.container_id.clone(),
            ifname: ctx.env.ifname.clone(),
            netns: ctx.env.netns.clone(),
            namespace,
            pod,
            ipv4,
            host_ifname: host_if,
            mac: mac.filter(|m| !m.is_empty()),
            ipv6,
        },
    )
}

/// Chained: nothing is created; the pod described by prevResult is
/// registered and prevResult passed on.
fn add_chained(ctx: &Ctx) -> Result<Value> {
    let prev = ctx.prev_result()?;
    let d = result::describe(&prev, &ctx.env.ifname)?;
    let ns = netlink::open_netns(&ctx.env.netns)?;
    let host = Netlink::host()?;
    let pod = Netlink::in_netns(&ns, &ctx.env.netns)?;
    let (host_if, mac) = host_peer(ctx, &host, &pod, &d.host)?;
    let ipv4 = d.ipv4.and_then(|ip| match ip.address.ip() {
        IpAddr::V4(a) => Some(a),
        _ => None,
    });
    let ipv6 = d.ipv6.and_then(|ip| match ip.address.ip() {
        IpAddr::V6(a) => Some(a),
        _ => None,
    });
    if let Err(e) = register(ctx, ipv4, ipv6, host_if, Some(mac)) {
        return Err(rolled_back(e, teardown(ctx, &CHAINED, Some(&host))));
    }
    let prev = ctx.conf.prev_result.clone().expect("parsed above");
    Ok(result::convert(prev, &ctx.conf.cni_version))
}

/// The host end of the pod's veth: a sandbox-less interface of prevResult
/// that is the pod interface's peer, else the peer found through IFLA_LINK.
/// Both directions are checked, so an ifindex that only happens to match in
/// the other namespace is never taken. Also returns the pod end's MAC.
fn host_peer(
    ctx: &Ctx,
    host: &Netlink,
    pod: &Netlink,
    listed: &[&Interface],
) -> Result<(String, String)> {
    let lookup = |msg: String| CniError::new(error::CHAINED_LOOKUP, msg);
    let c = pod.link(&ctx.env.ifname)?.ok_or_else(|| {
        lookup(format!(
            "no interface {} in {}",
            ctx.env.ifname, ctx.env.netns
        ))
    })?;
    if c.kind != "veth" {
        return Err(lookup(format!(
            "{} in {} is a {:?} link, not a veth: palisade enforces on the host end of a veth",
            c.name, ctx.env.netns, c.kind
        )));
    }
    let is_peer = |l: &netlink::Link| {
        l.kind == "veth" && l.peer_index == Some(c.index) && c.peer_index == Some(l.index)
    };
    for i in listed {
        if let Some(l) = host.link(&i.name)? {
            if is_peer(&l) {
                return Ok((l.name, c.mac.clone()));
            }
        }
    }
    if let Some(idx) = c.peer_index {
        if let Some(l) = host.link_by_index(idx)? {
            if is_peer(&l) {
                return Ok((l.name, c.mac.clone()));
            }
        }
    }
    Err(lookup(format!(
        "the host end of {} in {} is not in this network namespace (checked prevResult's host interfaces {:?} and ifindex {:?})",
        c.name,
        ctx.env.netns,
        listed.iter().map(|i| &i.name).collect::<Vec<_>>(),
        c.peer_index
    )))
}

// ---- teardown (DEL, GC, failed ADD) ------------------------------------------

/// Undoes `steps` in reverse order for the attachment in `ctx`. Missing
/// things are not errors; the agent being unreachable is logged only (DEL
/// must not wedge a pod's removal). `host` is reused when the caller has
/// one open.
fn teardown(ctx: &Ctx, steps: &[Step], host: Option<&Netlink>) -> Errors {
    let mut errs = Errors::default();
    let (cid, ifname) = (&ctx.env.container_id, &ctx.env.ifname);
    for step in steps.iter().rev() {
        match step {
            Step::Registration => {
                if let Err(e) = agent::deregister(&ctx.conf, cid, ifname) {
                    eprintln!("palisade: deregistering {cid}/{ifname} (ignored): {e}");
                }
            }
            Step::Veth => {
                let opened;
                let host = match host {
                    Some(h) => Some(h),
                    None => {
                        opened = errs.check(Netlink::host());
                        opened.as_ref()
                    }
                };
                if let Some(host) = host {
                    errs.check(host.delete_link(&ctx.host_if()));
                }
                // Normally gone with its peer; if the host end was lost, the
                // pod end may remain.
                if !ctx.env.netns.is_empty() {
                    if let Ok(ns) = std::fs::File::open(&ctx.env.netns) {
                        if let Some(pod) = errs.check(Netlink::in_netns(&ns, &ctx.env.netns)) {
                            match pod.link(ifname) {
                                Ok(Some(l)) if l.kind == "veth" => {
                                    errs.check(pod.delete_link(ifname));
                                }
                                Ok(_) => {}
                                Err(e) => errs.push(e),
                            }
                        }
                    }
                }
            }
            Step::Address => match ctx.conf.ipam.as_ref() {
                Some(Ipam::Builtin(pool)) => {
                    if let Some(store) = errs.check(Store::lock(&pool.data_dir)) {
                        if let Some(freed) = errs.check(store.release(cid, ifname)) {
                            for ip in freed {
                                eprintln!("palisade: released {ip} of {cid}/{ifname}");
                            }
                        }
                    }
                }
                Some(Ipam::Delegate(kind)) => {
                    errs.check(ipam::delegate(kind, Command::Del, &ctx.env, ctx.stdin));
                }
                None => {}
            },
        }
    }
    errs
}

pub fn del(ctx: &Ctx) -> Result<()> {
    teardown(ctx, ctx.steps(), None).into_result()
}

// ---- CHECK ----------------------------------------------------------------

pub fn check(ctx: &Ctx) -> Result<()> {
    let prev = ctx.prev_result()?;
    let d = result::describe(&prev, &ctx.env.ifname)?;
    let bad = |msg: String| CniError::new(error::CHECK_FAILED, msg);
    let ns = netlink::open_netns(&ctx.env.netns)?;
    let host = Netlink::host()?;
    let pod = Netlink::in_netns(&ns, &ctx.env.netns)?;

    let c = pod.link(&ctx.env.ifname)?.ok_or_else(|| {
        bad(format!(
            "{} is missing from {}",
            ctx.env.ifname, ctx.env.netns
        ))
    })?;
    if !d.container.mac.is_empty() && !c.mac.eq_ignore_ascii_case(&d.container.mac) {
        return Err(bad(format!(
            "{} has MAC {}, prevResult says {}",
            c.name, c.mac, d.container.mac
        )));
    }
    let have = pod.addresses(c.index)?;
    for ip in d.ips().map(|i| i.address.ip()) {
        if !have.iter().any(|(a, _)| *a == ip) {
            return Err(bad(format!(
                "{} in {} does not have {ip}",
                c.name, ctx.env.netns
            )));
        }
    }

    let host_if = if ctx.conf.chained {
        host_peer(ctx, &host, &pod, &d.host)?.0
    } else {
        check_owned(ctx, &host, &pod, &c, &d, &prev)?;
        ctx.host_if()
    };

    let (v4, v6) = (
        d.ipv4.map(|i| i.address.ip()),
        d.ipv6.map(|i| i.address.ip()),
    );
    let report = agent::status(&ctx.conf)?;
    let known = report.endpoints.iter().any(|e| {
        e.host_ifname == host_if
            && v4.is_none_or(|ip| ip == IpAddr::V4(e.ipv4))
            && v6.is_none_or(|ip| e.ipv6.map(IpAddr::V6) == Some(ip))
    });
    if !known {
        let ips: Vec<String> = d.ips().map(|i| i.address.ip().to_string()).collect();
        return Err(bad(format!(
            "the palisade agent has no endpoint for {} on {host_if}",
            ips.join(" and ")
        )));
    }
    Ok(())
}

/// What palisade itself created, per family: pod routes, the host side,
/// the reservation.
fn check_owned(
    ctx: &Ctx,
    host: &Netlink,
    pod: &Netlink,
    c: &netlink::Link,
    d: &result::Described,
    prev: &CniResult,
) -> Result<()> {
    let bad = |msg: String| CniError::new(error::CHECK_FAILED, msg);
    let routes = pod.routes()?;
    let has = |rs: &[netlink::Route], dst: IpAddr, prefix: u8, via: Option<IpAddr>, oif: u32| {
        rs.iter()
            .any(|r| r.dst == dst && r.prefix == prefix && r.gateway == via && r.oif == Some(oif))
    };
    let host_if = ctx.host_if();
    let h = host
        .link(&host_if)?
        .ok_or_else(|| bad(format!("host veth {host_if} is missing")))?;
    if !h.up {
        return Err(bad(format!("host veth {host_if} is down")));
    }
    let host_addrs = host.addresses(h.index)?;
    let host_routes = host.routes()?;
    for ipc in d.ips() {
        let ip = ipc.address.ip();
        let gw = ipc
            .gateway
            .ok_or_else(|| bad(format!("prevResult has no gateway for {ip}")))?;
        let gw_prefix = host_prefix(gw);
        if !has(&routes, gw, gw_prefix, None, c.index) {
            return Err(bad(format!(
                "route {gw}/{gw_prefix} dev {} is missing in {}",
                c.name, ctx.env.netns
            )));
        }
        for r in prev
            .routes
            .iter()
            .filter(|r| r.dst.is_ipv4() == ip.is_ipv4())
        {
            let via = Some(r.gw.unwrap_or(gw));
            if !has(&routes, r.dst.network(), r.dst.prefix(), via, c.index) {
                return Err(bad(format!(
                    "route {} via {gw} is missing in {}",
                    r.dst, ctx.env.netns
                )));
            }
        }
        if !host_addrs.iter().any(|(a, p)| *a == gw && *p == gw_prefix) {
            return Err(bad(format!(
                "host veth {host_if} does not have {gw}/{gw_prefix}"
            )));
        }
        let prefix = host_prefix(ip);
        if !has(&host_routes, ip, prefix, None, h.index) {
            return Err(bad(format!(
                "host route {ip}/{prefix} dev {host_if} is missing"
            )));
        }
    }
    match ctx.conf.ipam.as_ref() {
        Some(Ipam::Builtin(pool)) => {
            let held = Store::lock(&pool.data_dir)?.find(&ctx.env.container_id, &ctx.env.ifname)?;
            for ip in d.ips().map(|i| i.address.ip()) {
                if !held.contains(&ip) {
                    return Err(bad(format!(
                        "the IPAM reservation of {ip} is missing (store holds {held:?})"
                    )));
                }
            }
        }
        Some(Ipam::Delegate(kind)) => {
            ipam::delegate(kind, Command::Check, &ctx.env, ctx.stdin)?;
        }
        None => {}
    }
    Ok(())
}

// ---- GC and STATUS ----------------------------------------------------------

/// Tears down every attachment the built-in allocator knows that is not in
/// `cni.dev/valid-attachments`, and forwards GC to a delegated IPAM plugin.
pub fn gc(ctx: &Ctx) -> Result<()> {
    let mut errs = Errors::default();
    match ctx.conf.ipam.as_ref() {
        Some(Ipam::Builtin(pool)) => {
            // The list is taken under the lock, which is then let go:
            // teardown takes it again for each release.
            let stale =
                Store::lock(&pool.data_dir).and_then(|s| s.stale(&ctx.conf.valid_attachments));
            if let Some(stale) = errs.check(stale) {
                let host = errs.check(Netlink::host());
                for a in stale {
                    eprintln!(
                        "palisade: GC: {} of {}/{} is not a valid attachment",
                        a.ip, a.container_id, a.ifname
                    );
                    let one = Ctx {
                        env: Env {
                            container_id: a.container_id.clone(),
                            ifname: a.ifname.clone(),
                            netns: String::new(),
                            ..ctx.env.clone()
                        },
                        conf: ctx.conf.clone(),
                        stdin: ctx.stdin,
                    };
                    let mut rest = teardown(&one, &OWNED, host.as_ref());
                    // A file that names no attachment is released by address.
                    if a.container_id.is_empty() {
                        let r = Store::lock(&pool.data_dir).and_then(|s| s.remove(a.ip));
                        rest.check(r);
                    }
                    if let Err(e) = rest.into_result() {
                        errs.push(e);
                    }
                }
            }
        }
        Some(Ipam::Delegate(kind)) => {
            errs.check(ipam::delegate(kind, Command::Gc, &ctx.env, ctx.stdin));
        }
        None => eprintln!("palisade: GC in chained mode: nothing of palisade's own to collect"),
    }
    errs.into_result()
}

/// Ready when the agent answers and (built-in IPAM) the pool has room;
/// a delegated IPAM plugin is asked too.
pub fn status(ctx: &Ctx) -> Result<()> {
    let unavailable =
        |msg: String, details: String| CniError::with_details(error::NOT_AVAILABLE, msg, details);
    agent::status(&ctx.conf).map_err(|e| {
        unavailable(
            "the plugin is not available: the palisade agent does not answer".to_string(),
            e.to_string(),
        )
    })?;
    match ctx.conf.ipam.as_ref() {
        Some(Ipam::Builtin(pool)) => {
            let store = Store::lock(&pool.data_dir)?;
            for range in pool.ranges() {
                let held = store.held_in(range)?;
                if held >= range.size() {
                    return Err(unavailable(
                        format!(
                            "the plugin is not available: IPAM pool {}-{} ({}) is exhausted",
                            range.start, range.end, range.subnet
                        ),
                        format!("{held} of {} addresses allocated", range.size()),
                    ));
                }
            }
        }
        Some(Ipam::Delegate(kind)) => {
            ipam::delegate(kind, Command::Status, &ctx.env, ctx.stdin)?;
        }
        None => {}
    }
    Ok(())
}
