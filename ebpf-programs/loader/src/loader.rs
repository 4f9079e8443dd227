//! Loads palisade's object, adopting pinned maps, and attaches programs to
//! pod veths (`hooks`: a `cls_bpf` filter, or a pinned TCX link where the
//! hook already runs TCX programs). Both outlive the agent: a restarted
//! agent (also after kill -9) finds them and swaps its freshly loaded
//! programs in atomically, so the interface is never without a program.
use std::{ffi::CString, fs, io, path::Path};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::{XdpLink, XdpMode},
        LinkOrder, SchedClassifier, TcAttachType, Xdp,
    },
    Ebpf, EbpfLoader,
};
use log::{debug, warn};
use palisade_common::{maps as names, programs, DIR_EGRESS, DIR_INGRESS};

pub use crate::sizes::MapSizes;
use crate::{
    hooks::{self, Hooked, PodHook},
    local::LocalDelivery,
    maps::Maps,
    object,
    pins::Pins,
    Error,
};

#[derive(Clone, Debug, Default)]
pub struct DatapathConfig {
    pub pins: Pins,
    pub sizes: MapSizes,
    pub pod_hook: PodHook,
    pub local_delivery: LocalDelivery,
}

pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
    sizes: MapSizes,
    pod_hook: PodHook,
    local_delivery: LocalDelivery,
}

/// The programs the pod programs tail-call, by `PROGRAMS` slot.
const TAIL_CALLED: [(&str, u32); 2] = [
    (programs::POD_EGRESS6, palisade_common::SLOT_EGRESS6),
    (programs::POD_INGRESS6, palisade_common::SLOT_INGRESS6),
];

/// Loads the programs `slots` names and puts them in their `PROGRAMS`
/// slots (the map is pinned: a restarted agent's programs replace the old
/// ones there, which the adopted links' programs call).
pub(crate) fn load_tail_called(
    ebpf: &mut Ebpf,
    slots: &[(&'static str, u32)],
) -> Result<(), Error> {
    let mut fds = Vec::new();
    for &(name, slot) in slots {
        let p = classifier(ebpf, name)?;
        p.load().map_err(|source| Error::Program { name, source })?;
        let fd = p
            .fd()
            .and_then(|fd| fd.try_clone().map_err(aya::programs::ProgramError::IOError))
            .map_err(|source| Error::Program { name, source })?;
        fds.push((slot, fd));
    }
    let name = names::PROGRAMS;
    let err = |source| Error::Map { name, source };
    let map = ebpf.map_mut(name).ok_or(Error::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    let mut array = aya::maps::ProgramArray::try_from(map).map_err(err)?;
    for (slot, fd) in &fds {
        array.set(*slot, fd, 0).map_err(err)?;
    }
    Ok(())
}

/// (program, tc hook on the host-side veth, policy direction)
const POD_HOOKS: [(&str, TcAttachType, u8); 2] = [
    (programs::POD_EGRESS, TcAttachType::Ingress, DIR_EGRESS),
    (programs::POD_INGRESS, TcAttachType::Egress, DIR_INGRESS),
];

impl Datapath {
    /// Load the programs. Maps already pinned under the root are reused
    /// with their contents; missing ones are created and pinned.
    pub fn load(cfg: &DatapathConfig) -> Result<Self, Error> {
        let obj = object()?;
        // Before anything is created: a root off bpffs would otherwise fail
        // later with a bare ENOENT (or pin nothing at all).
        cfg.pins.check_bpffs()?;
        for dir in [cfg.pins.maps_dir(), cfg.pins.links_dir()] {
            fs::create_dir_all(&dir).map_err(|source| Error::Io {
                what: format!("creating {}", dir.display()),
                source,
            })?;
        }
        raise_memlock();
        retire_incompatible_pins(obj, &cfg.pins)?;

        let s = &cfg.sizes;
        let paths: Vec<_> = names::ALL.iter().map(|n| (*n, cfg.pins.map(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(names::ENDPOINTS, s.endpoints)
            .map_max_entries(names::IPCACHE, s.ipcache)
            .map_max_entries(names::IPCACHE_EXACT, s.ipcache)
            .map_max_entries(names::POLICY, s.policy)
            .map_max_entries(names::POLICY_EXACT, s.policy)
            .map_max_entries(names::CONNTRACK, s.conntrack)
            .map_max_entries(names::FRAGMENTS, s.fragments)
            .map_max_entries(names::XDP_DENY, s.xdp_deny)
            .map_max_entries(names::SVC_FRONTENDS, s.svc_frontends)
            .map_max_entries(names::SVC_BACKENDS, s.svc_backends)
            .map_max_entries(names::SVC_NAT, s.svc_nat)
            .map_max_entries(names::SVC_AFFINITY, s.svc_affinity)
            .map_max_entries(names::SVC_FRONTENDS6, s.svc_frontends)
            .map_max_entries(names::SVC_BACKENDS6, s.svc_backends)
            .map_max_entries(names::SVC_NAT6, (s.svc_nat / 2).max(1))
            .map_max_entries(names::SVC_AFFINITY6, (s.svc_affinity / 2).max(1))
            .map_max_entries(names::ENDPOINTS6, s.endpoints)
            .map_max_entries(names::LOCAL_PODS, s.endpoints)
            .map_max_entries(names::LOCAL_PODS6, s.endpoints)
            .map_max_entries(names::IPCACHE6, s.ipcache6)
            .map_max_entries(names::IPCACHE6_EXACT, s.ipcache6)
            .map_max_entries(names::CONNTRACK6, s.conntrack6)
            .map_max_entries(names::FRAGMENTS6, s.fragments6);
        let mut ebpf = loader.load(obj).map_err(Error::Load)?;

        for (name, _, _) in POD_HOOKS {
            let p = classifier(&mut ebpf, name)?;
            p.load().map_err(|source| Error::Program { name, source })?;
        }
        // Before anything is attached: a frame meeting an empty slot is
        // dropped.
        load_tail_called(&mut ebpf, &TAIL_CALLED)?;
        let xdp = xdp_program(&mut ebpf)?;
        xdp.load().map_err(|source| Error::Program {
            name: programs::XDP_PREFILTER,
            source,
        })?;
        Ok(Self {
            ebpf,
            pins: cfg.pins.clone(),
            sizes: cfg.sizes.clone(),
            pod_hook: cfg.pod_hook,
            local_delivery: cfg.local_delivery,
        })
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Typed handles on the maps (call once; the maps move out of the object).
    pub fn take_maps(&mut self) -> Result<Maps, Error> {
        Maps::take(&mut self.ebpf, &self.sizes, self.local_delivery)
    }

    /// A loaded tc program, for BPF_PROG_TEST_RUN (`testrun`).
    #[cfg(feature = "test-utils")]
    pub fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, Error> {
        classifier(&mut self.ebpf, name)
    }

    /// The loaded XDP prefilter, for BPF_PROG_TEST_RUN.
    #[cfg(feature = "test-utils")]
    pub fn xdp(&mut self) -> Result<&mut Xdp, Error> {
        xdp_program(&mut self.ebpf)
    }

    /// Attach both policy programs to a pod's host-side interface and
    /// return its ifindex. Idempotent: a filter or pinned link of ours
    /// already there gets this instance's program swapped in atomically.
    pub fn attach_pod(&mut self, ifname: &str) -> Result<u32, Error> {
        self.attach_pod_via(ifname).map(|(ifindex, _)| ifindex)
    }

    /// `attach_pod`, also saying how each hook (egress, ingress) was made.
    pub fn attach_pod_via(&mut self, ifname: &str) -> Result<(u32, [Hooked; 2]), Error> {
        let ifindex = ifindex(ifname)?;
        let mut via = [Hooked::Filter; 2];
        let mut clsact = false;
        for (i, (name, hook, dir)) in POD_HOOKS.into_iter().enumerate() {
            let path = self.pins.link(ifindex, dir);
            let prog = classifier(&mut self.ebpf, name)?;
            let tcx =
                self.pod_hook == PodHook::Tcx || path.exists() || hooks::tcx_occupied(ifname, hook);
            if tcx {
                into_tcx(prog, name, ifname, hook, &path)?;
                via[i] = Hooked::Tcx;
            } else {
                if !clsact {
                    hooks::ensure_clsact(ifname, name)?;
                    clsact = true;
                }
                hooks::attach_filter(prog, name, ifname, hook)?;
            }
        }
        Ok((ifindex, via))
    }

    /// A TCX program attached to a hook after palisade's filter runs before
    /// it, and one answering anything but TCX_NEXT would take the packet
    /// past policy. Where that happened, palisade's program moves into TCX,
    /// first in that chain, and the filter goes. Whether anything moved.
    pub fn keep_first(&mut self, ifname: &str) -> Result<bool, Error> {
        let ifindex = ifindex(ifname)?;
        let mut moved = false;
        for (name, hook, dir) in POD_HOOKS {
            let path = self.pins.link(ifindex, dir);
            if path.exists() || !hooks::tcx_occupied(ifname, hook) {
                continue;
            }
            let prog = classifier(&mut self.ebpf, name)?;
            into_tcx(prog, name, ifname, hook, &path)?;
            moved = true;
        }
        Ok(moved)
    }

    /// Detach both programs from an interface (gone or not). Keeps going
    /// after an error so nothing stays half attached; returns the first.
    pub fn detach_pod(&self, ifindex: u32) -> Result<(), Error> {
        let mut first = None;
        for (_, _, dir) in POD_HOOKS {
            if let Err(e) = unpin_link(&self.pins.link(ifindex, dir)) {
                first.get_or_insert(e);
            }
        }
        // A gone interface took its filters with it.
        if let Some(ifname) = hooks::ifname(ifindex) {
            for (name, hook, _) in POD_HOOKS {
                if let Err(source) = hooks::delete_filter(&ifname, hook) {
                    first.get_or_insert(Error::Program { name, source });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// After a restart: move every pod hook of ours (pinned links, and
    /// filters found by handle on this namespace's interfaces) onto this
    /// instance's programs, and drop the pins of links whose interface is
    /// gone. Returns the ifindexes that are still attached.
    pub fn adopt_links(&mut self) -> Result<Vec<u32>, Error> {
        let mut live = Vec::new();
        for (ifindex, dir) in self.pins.pinned_links() {
            let path = self.pins.link(ifindex, dir);
            let name = if dir == DIR_EGRESS {
                programs::POD_EGRESS
            } else {
                programs::POD_INGRESS
            };
            let prog = classifier(&mut self.ebpf, name)?;
            match swap_into_link(prog, name, &path) {
                Ok(()) => {
                    if !live.contains(&ifindex) {
                        live.push(ifindex);
                    }
                }
                Err(e) => {
                    warn!("dropping stale link {}: {e}", path.display());
                    let _ = unpin_link(&path);
                }
            }
        }
        for (ifindex, ifname) in hooks::interfaces() {
            for (name, hook, _) in POD_HOOKS {
                let prog = classifier(&mut self.ebpf, name)?;
                match hooks::replace_filter(prog, name, &ifname, hook) {
                    Ok(true) if !live.contains(&ifindex) => live.push(ifindex),
                    Ok(_) => {}
                    Err(e) => warn!("adopting the filter on {ifname}: {e}"),
                }
            }
        }
        Ok(live)
    }

    /// Attach the XDP prefilter to an uplink (native mode, pinned link). A
    /// link pinned by an earlier agent gets this instance's program swapped in.
    pub fn attach_xdp(&mut self, ifname: &str) -> Result<u32, Error> {
        let ifindex = ifindex(ifname)?;
        let path = self.pins.xdp_link(ifindex);
        let name = programs::XDP_PREFILTER;
        let link_err = |source| Error::Link {
            path: path_str(&path),
            source,
        };
        let prog = xdp_program(&mut self.ebpf)?;
        let id = match PinnedLink::from_pin(&path) {
            Ok(pinned) => {
                let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
                prog.attach_to_link(link)
                    .map_err(|source| Error::Program { name, source })?
            }
            Err(_) => prog
                .attach(ifname, XdpMode::Driver)
                .map_err(|source| Error::Program { name, source })?,
        };
        let link: XdpLink = prog
            .take_link(id)
            .map_err(|source| Error::Program { name, source })?;
        let fd: FdLink = link.try_into().map_err(link_err)?;
        if !path.exists() {
            fd.pin(&path).map_err(|source| Error::Pin {
                path: path_str(&path),
                source,
            })?;
        }
        Ok(ifindex)
    }

    pub fn detach_xdp(&self, ifindex: u32) -> Result<(), Error> {
        unpin_link(&self.pins.xdp_link(ifindex))
    }
}

/// Set aside pinned maps whose key or value no longer has the size this
/// object gives it (an upgrade changed a layout): reused, such a map
/// would fail the verifier, or be read with the wrong layout. Its pin is
/// removed, so the load creates and pins an empty map in its place; the
/// old one lives on only while programs still hold it.
fn retire_incompatible_pins(obj: &[u8], pins: &Pins) -> Result<(), Error> {
    // (An object that does not parse fails the load itself, clearly.)
    let Ok(parsed) = aya_obj::Object::parse(obj) else {
        return Ok(());
    };
    for name in names::ALL {
        let path = pins.map(name);
        let Some(def) = parsed.maps.get(name) else {
            continue;
        };
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let (have, want) = (
            (info.key_size(), info.value_size()),
            (def.key_size(), def.value_size()),
        );
        if have == want {
            continue;
        }
        warn!(
            "pinned map {name} has {}-byte keys and {}-byte values where this datapath's have {} and {}: \
             replaced by an empty map",
            have.0, have.1, want.0, want.1
        );
        fs::remove_file(&path).map_err(|source| Error::Io {
            what: format!("removing {}", path.display()),
            source,
        })?;
    }
    Ok(())
}

/// Remove everything palisade pinned under `pins` (links first, so the
/// programs detach, then maps). For tests and `palisade-agent cleanup`
/// (which also calls `remove_filters`).
pub fn remove_all(pins: &Pins) -> Result<(), Error> {
    let io = |what: String| move |source| Error::Io { what, source };
    if let Ok(rd) = fs::read_dir(pins.links_dir()) {
        for e in rd.flatten() {
            unpin_link(&e.path())?;
        }
    }
    match fs::remove_dir_all(pins.root()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("removing {}", pins.root().display()))(e)),
    }
}

/// Delete palisade's pod filters from every interface of this network
/// namespace; returns how many interfaces had one.
pub fn remove_filters() -> Result<usize, Error> {
    let mut n = 0;
    for (ifindex, ifname) in hooks::interfaces() {
        let mut had = false;
        for (name, hook, _) in POD_HOOKS {
            match hooks::delete_filter(&ifname, hook) {
                Ok(d) => had |= d,
                Err(source) => return Err(Error::Program { name, source }),
            }
        }
        if had {
            debug!("removed palisade's filters from {ifname} ({ifindex})");
            n += 1;
        }
    }
    Ok(n)
}

pub(crate) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, Error> {
    let p = ebpf.program_mut(name).ok_or(Error::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    p.try_into()
        .map_err(|source| Error::Program { name, source })
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, Error> {
    let name = programs::XDP_PREFILTER;
    let p = ebpf.program_mut(name).ok_or(Error::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    p.try_into()
        .map_err(|source| Error::Program { name, source })
}

fn attach_tc(
    prog: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    hook: TcAttachType,
    path: &Path,
) -> Result<(), Error> {
    if path.exists() {
        match swap_into_link(prog, name, path) {
            Ok(()) => return Ok(()),
            // A pin left by an interface that no longer exists (ifindex reuse).
            Err(e) => {
                debug!("replacing stale link {}: {e}", path.display());
                unpin_link(path)?;
            }
        }
    }
    // First in the interface's TCX chain: a program attached before ours
    // (another CNI's, a leftover) that returns TC_ACT_OK would end the
    // chain and let packets past policy unseen.
    let id = prog
        .attach_with_options(ifname, hook, TcAttachOptions::TcxOrder(LinkOrder::first()))
        .map_err(|source| Error::Program { name, source })?;
    let link = prog
        .take_link(id)
        .map_err(|source| Error::Program { name, source })?;
    let fd: FdLink = link.try_into().map_err(|source| Error::Link {
        path: path_str(path),
        source,
    })?;
    fd.pin(path).map_err(|source| Error::Pin {
        path: path_str(path),
        source,
    })?;
    Ok(())
}

/// Hook `prog` at `hook` through TCX, first in the chain (the pinned link
/// at `path`), and delete a filter of ours there: behind TCX it would run
/// second.
fn into_tcx(
    prog: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    hook: TcAttachType,
    path: &Path,
) -> Result<(), Error> {
    attach_tc(prog, name, ifname, hook, path)?;
    hooks::delete_filter(ifname, hook).map_err(|source| Error::Program { name, source })?;
    Ok(())
}

/// Atomically replace the program behind a pinned TCX link with `prog`.
fn swap_into_link(
    prog: &mut SchedClassifier,
    name: &'static str,
    path: &Path,
) -> Result<(), Error> {
    let link_err = |source| Error::Link {
        path: path_str(path),
        source,
    };
    let pinned = PinnedLink::from_pin(path).map_err(link_err)?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
    let id = prog
        .attach_to_link(link)
        .map_err(|source| Error::Program { name, source })?;
    // The link stays pinned; forget our handle without detaching.
    let link = prog
        .take_link(id)
        .map_err(|source| Error::Program { name, source })?;
    let fd: FdLink = link.try_into().map_err(link_err)?;
    drop(fd);
    Ok(())
}

/// Remove a link's pin; with its last reference gone the kernel detaches it.
fn unpin_link(path: &Path) -> Result<(), Error> {
    match PinnedLink::from_pin(path) {
        Ok(l) => {
            let fd = l.unpin().map_err(|source| Error::Io {
                what: format!("unpinning {}", path.display()),
                source,
            })?;
            drop(fd);
            Ok(())
        }
        Err(_) if !path.exists() => Ok(()),
        Err(_) => fs::remove_file(path).map_err(|source| Error::Io {
            what: format!("removing {}", path.display()),
            source,
        }),
    }
}

pub fn ifindex(ifname: &str) -> Result<u32, Error> {
    let c = CString::new(ifname).map_err(|_| Error::NoSuchInterface(ifname.into()))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(Error::NoSuchInterface(ifname.into()));
    }
    Ok(idx)
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Kernels >= 5.11 account BPF memory to the cgroup; RLIMIT_MEMLOCK only
/// matters on older ones, and raising it fails in some sandboxes.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!(
            "setrlimit(RLIMIT_MEMLOCK) failed (not needed on this kernel): {}",
            io::Error::last_os_error()
        );
    }
}
