//! Keeps the kernel's routes to other nodes' pod ranges equal to what
//! [`crate::routing::desired`] says, on a thread of its own (netlink calls
//! block; the owner thread only hands over the latest desired state).
//! It reconciles on every change and every 30 s (a route someone deleted
//! comes back), retries a failed pass after 2 s, and publishes what it
//! installed and what it could not for `status`.
use std::{
    net::IpAddr,
    sync::{
        mpsc::{self, RecvTimeoutError},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;
use palisade_api::RoutingStatus;
use tracing::{info, warn};

use crate::{
    netlink::{is_exists, Netlink, OwnedRoute},
    routing::{self, Desired, Mode},
};

const RESYNC: Duration = Duration::from_secs(30);
const RETRY: Duration = Duration::from_secs(2);

pub struct RouteSync {
    tx: Option<mpsc::Sender<Desired>>,
    last: Option<Desired>,
    pub status: Arc<Mutex<RoutingStatus>>,
    thread: Option<JoinHandle<()>>,
}

impl RouteSync {
    pub fn spawn(mode: Mode) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Desired>();
        let status = Arc::new(Mutex::new(RoutingStatus {
            mode: mode.to_string(),
            ..Default::default()
        }));
        let st = status.clone();
        let thread = std::thread::Builder::new()
            .name("route-sync".into())
            .spawn(move || run(mode, rx, st))?;
        Ok(Self {
            tx: Some(tx),
            last: None,
            status,
            thread: Some(thread),
        })
    }

    /// Hands over `d` if it differs from the last one handed over.
    pub fn want(&mut self, d: Desired) {
        if self.last.as_ref() == Some(&d) {
            return;
        }
        self.last = Some(d.clone());
        if let Some(tx) = &self.tx {
            let _ = tx.send(d);
        }
    }
}

impl Drop for RouteSync {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mode: Mode, rx: mpsc::Receiver<Desired>, status: Arc<Mutex<RoutingStatus>>) {
    let nl = match Netlink::open() {
        Ok(n) => n,
        Err(e) => {
            let msg = format!("routing between nodes is off: {e:#}");
            warn!("{msg}");
            status.lock().unwrap_or_else(|p| p.into_inner()).error = Some(msg);
            return;
        }
    };
    let mut current: Option<Desired> = None;
    let mut wait = RESYNC;
    loop {
        match rx.recv_timeout(wait) {
            Ok(d) => {
                // Only the latest matters.
                let mut d = d;
                while let Ok(n) = rx.try_recv() {
                    d = n;
                }
                current = Some(d);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(d) = &current else { continue };
        let r = reconcile(&nl, mode, d);
        let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
        st.mode = mode.to_string();
        match r {
            Ok((routes, mut problems)) => {
                if st.routes != routes {
                    info!("routes to other nodes' pods: {}", routes.join(", "));
                }
                for p in &problems {
                    if !st.problems.contains(p) {
                        warn!("routing: {p}");
                    }
                }
                problems.extend(d.problems.iter().cloned());
                st.routes = routes;
                st.problems = problems;
                st.error = None;
                wait = RESYNC;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if st.error.as_deref() != Some(&msg) {
                    warn!("routing to other nodes failed (retrying): {msg}");
                }
                st.error = Some(msg);
                st.failures += 1;
                wait = RETRY;
            }
        }
    }
}

/// One pass: makes the kernel hold exactly `d`'s routes (and, for VXLAN,
/// the device and its entries). Returns the installed routes as text and
/// the routes it had to leave out (someone else's route for that range).
fn reconcile(nl: &Netlink, mode: Mode, d: &Desired) -> Result<(Vec<String>, Vec<String>)> {
    let mut problems = Vec::new();
    let mut installed = Vec::new();
    let vx = match mode {
        Mode::None => return Ok((installed, problems)),
        Mode::Vxlan => match d.local_address {
            Some(local) if !d.peers.is_empty() => Some(nl.ensure_vxlan(
                routing::VXLAN_DEVICE,
                routing::VXLAN_VNI,
                routing::VXLAN_PORT,
                local,
                routing::vxlan_mac(local),
                vxlan_mtu(),
            )?),
            _ => nl.ifindex(routing::VXLAN_DEVICE)?,
        },
        Mode::Native => None,
    };
    // The routes as they must be.
    let want: Vec<(OwnedRoute, &routing::Peer)> = d
        .routes()
        .filter_map(|(dst, p)| {
            let r = match vx {
                Some(idx) => OwnedRoute {
                    dst,
                    gateway: Some(p.gateway(&dst, true)?),
                    oif: Some(idx),
                },
                None if mode == Mode::Native => OwnedRoute {
                    dst,
                    gateway: Some(p.gateway(&dst, false)?),
                    oif: None,
                },
                None => return None,
            };
            Some((r, p))
        })
        .collect();
    let same = |a: &OwnedRoute, b: &OwnedRoute| {
        a.dst == b.dst && a.gateway == b.gateway && (b.oif.is_none() || a.oif == b.oif)
    };
    let have = nl.owned_routes()?;
    for h in &have {
        if !want.iter().any(|(w, _)| same(h, w)) {
            nl.del_route(h)?;
        }
    }
    if let Some(idx) = vx {
        // Neighbour and forwarding entries first: a route is usable the
        // moment it exists.
        // An IPv4 and an IPv6 VTEP address per peer (IPv6 pods ride the
        // same IPv4 tunnel), both at the peer's device MAC.
        let want_neigh: Vec<_> = d
            .peers
            .iter()
            .flat_map(|p| {
                let mac = routing::vxlan_mac(p.address);
                let v4 = p.vtep().map(IpAddr::V4);
                let v6 = p.vtep6().map(IpAddr::V6);
                v4.into_iter().chain(v6).map(move |ip| (ip, mac))
            })
            .collect();
        for (ip, mac) in nl.neighbours(idx)? {
            if !want_neigh.iter().any(|(i, m)| *i == ip && m[..] == mac[..]) {
                nl.del_neighbour(idx, ip)?;
            }
        }
        let want_fdb: Vec<_> = d
            .peers
            .iter()
            .map(|p| (routing::vxlan_mac(p.address), p.address))
            .collect();
        for (mac, dst) in nl.fdb(idx)? {
            if !want_fdb.iter().any(|(m, a)| m[..] == mac[..] && *a == dst) {
                nl.del_fdb(idx, &mac, dst)?;
            }
        }
        for (ip, mac) in want_neigh {
            nl.set_neighbour(idx, ip, mac)?;
        }
        for (mac, dst) in want_fdb {
            nl.set_fdb(idx, mac, dst)?;
        }
        if d.peers.is_empty() {
            nl.delete_link(routing::VXLAN_DEVICE)?;
        }
    } else if mode == Mode::Native {
        // Switched from VXLAN: its device goes with its routes.
        nl.delete_link(routing::VXLAN_DEVICE)?;
    }
    for (w, p) in &want {
        let text = match w.oif {
            Some(_) => format!(
                "{} via {} dev {} ({}: {})",
                w.dst,
                w.gateway.unwrap_or(p.address.into()),
                routing::VXLAN_DEVICE,
                p.node,
                p.address
            ),
            None => format!(
                "{} via {} ({})",
                w.dst,
                w.gateway.unwrap_or(p.address.into()),
                p.node
            ),
        };
        if !have.iter().any(|h| same(h, w)) {
            match nl.add_route(w, vx.is_some()) {
                Ok(()) => {}
                Err(e) if is_exists(&e) => {
                    problems.push(format!(
                        "node {}: a route for {} exists that palisade did not make; left alone",
                        p.node, w.dst
                    ));
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        installed.push(text);
    }
    Ok((installed, problems))
}

/// The vxlan device's MTU: `PALISADE_VXLAN_MTU`, else 1450 (a 1500-byte
/// underlay minus the encapsulation).
fn vxlan_mtu() -> u32 {
    std::env::var("PALISADE_VXLAN_MTU")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500 - routing::VXLAN_OVERHEAD)
}
