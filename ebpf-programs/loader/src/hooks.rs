//! How the pod programs hook a host-side veth.
//!
//! By default through a `cls_bpf` direct-action filter under the `clsact`
//! qdisc, at priority 1 (the first filter that runs) with a handle of
//! palisade's own. A TCX attach swaps the hook's program array and then
//! waits for an RCU grace period under the RTNL lock (`tcx_entry_sync`),
//! about 8 ms per hook here, which was most of a pod start; adding a filter
//! does not wait for one.
//!
//! TCX programs on a device run before its filters, and one that returns
//! anything but TCX_NEXT ends the hook: a filter behind it would never see
//! the packet. So a hook that already carries TCX programs (another
//! dataplane's) gets palisade's program through TCX, first in that chain,
//! as every hook does with [`PodHook::Tcx`]. A hook with a pinned TCX link
//! (an older agent's, or one attached that way) keeps it.
//!
//! A filter outlives the agent as a pinned link does (the kernel holds the
//! program). A restarted agent finds its own by handle and replaces the
//! program in place: `cls_bpf` swaps it under RCU, so no packet meets an
//! empty hook.
use std::ffi::CStr;

use aya::programs::{
    links::Link,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    ProgramError, SchedClassifier, TcAttachType,
};
use log::debug;

use crate::Error;

/// How `attach_pod` hooks a pod's interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodHook {
    /// A `cls_bpf` filter, unless the hook already has TCX programs (then
    /// TCX, first in the chain).
    #[default]
    Filter,
    /// Always a pinned TCX link, first in the chain.
    Tcx,
}

impl std::str::FromStr for PodHook {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "filter" => Ok(Self::Filter),
            "tcx" => Ok(Self::Tcx),
            _ => Err(format!("unknown pod hook {s:?} (filter or tcx)")),
        }
    }
}

/// What a hook ended up with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hooked {
    Filter,
    Tcx,
}

/// Lowest priority number a filter can ask for: runs before every other.
pub const FILTER_PRIORITY: u16 = 1;
/// palisade's filter handle ("pa" "ls"): a filter at this priority and
/// handle is taken to be palisade's.
pub const FILTER_HANDLE: TcHandle = TcHandle::new(0x7061, 0x6c73);

fn errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::TcError(TcError::NetlinkError(n)) | ProgramError::NetlinkError(n) => {
            n.raw_os_error()
        }
        ProgramError::TcError(TcError::IoError(io)) => io.raw_os_error(),
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// The kernel's answers for "no such filter here": no filter at the handle
/// (ENOENT), no clsact qdisc or no chain (EINVAL), no interface (ENODEV).
fn absent(e: &ProgramError) -> bool {
    matches!(
        errno(e),
        Some(libc::ENOENT) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

/// Whether TCX programs are attached at `hook` (kernels without TCX: no).
pub(crate) fn tcx_occupied(ifname: &str, hook: TcAttachType) -> bool {
    match SchedClassifier::query_tcx(ifname, hook) {
        Ok((_, progs)) => !progs.is_empty(),
        Err(e) => {
            debug!("no TCX query on {ifname}: {e}");
            false
        }
    }
}

/// Add the clsact qdisc unless the interface has one.
pub(crate) fn ensure_clsact(ifname: &str, name: &'static str) -> Result<(), Error> {
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => Ok(()),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(Error::Program {
            name,
            source: e.into(),
        }),
    }
}

/// Attach `prog` as palisade's filter at `hook`, replacing the program of
/// a filter of ours already there.
pub(crate) fn attach_filter(
    prog: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    hook: TcAttachType,
) -> Result<(), Error> {
    let err = |source| Error::Program { name, source };
    let opts = NlOptions {
        priority: FILTER_PRIORITY,
        handle: FILTER_HANDLE,
        classid: None,
    };
    let id = match prog.attach_with_options(ifname, hook, TcAttachOptions::Netlink(opts)) {
        Ok(id) => id,
        Err(e) if errno(&e) == Some(libc::EEXIST) => match replace_filter(prog, name, ifname, hook)
        {
            Ok(true) => return Ok(()),
            Ok(false) => return Err(err(e)),
            Err(e) => return Err(e),
        },
        Err(e) => return Err(err(e)),
    };
    keep(prog, name, id)
}

/// Put `prog` into palisade's filter at `hook` if there is one; false if
/// there is none.
pub(crate) fn replace_filter(
    prog: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    hook: TcAttachType,
) -> Result<bool, Error> {
    let link =
        match SchedClassifierLink::attached(ifname, hook, FILTER_PRIORITY, FILTER_HANDLE, None) {
            Ok(l) => l,
            // The interface is gone.
            Err(_) => return Ok(false),
        };
    match prog.attach_to_link(link) {
        Ok(id) => keep(prog, name, id).map(|()| true),
        Err(e) if absent(&e) => Ok(false),
        Err(source) => Err(Error::Program { name, source }),
    }
}

/// The filter stays when the program's handle goes (aya would delete it
/// when the link is dropped): take the link out and forget it. It holds no
/// file descriptor, only the filter's coordinates.
fn keep(
    prog: &mut SchedClassifier,
    name: &'static str,
    id: tc::SchedClassifierLinkId,
) -> Result<(), Error> {
    let link = prog
        .take_link(id)
        .map_err(|source| Error::Program { name, source })?;
    std::mem::forget(link);
    Ok(())
}

/// Delete palisade's filter at `hook` of `ifname`: whether there was one.
pub(crate) fn delete_filter(ifname: &str, hook: TcAttachType) -> Result<bool, ProgramError> {
    let Ok(link) =
        SchedClassifierLink::attached(ifname, hook, FILTER_PRIORITY, FILTER_HANDLE, None)
    else {
        return Ok(false);
    };
    match link.detach() {
        Ok(()) => Ok(true),
        Err(e) if absent(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The name of interface `ifindex` in this network namespace, if any.
pub(crate) fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Every interface of this network namespace: (ifindex, name).
pub(crate) fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed
    // below with if_freenameindex; names are NUL-terminated.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return out;
        }
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push((
                (*p).if_index,
                CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(),
            ));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    out
}
