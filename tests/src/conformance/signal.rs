//! Ctrl-C and SIGTERM set a flag; the runner checks it between operations
//! and unwinds through its guards, so an interrupted run cleans up like a
//! finished one. Leftovers of runs that were killed outright (SIGKILL) are
//! reaped at the next start.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the sigaction struct is fully initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Stop as if interrupted (e.g. stdout was closed: nobody is reading).
pub fn request_stop() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// An error when a signal arrived: call between steps of work.
pub fn check() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Prefix of everything a run creates: netns names `pcf<pid>-<n>`, pin
/// roots `/sys/fs/bpf/palisade-conf-<pid>`, scratch dirs
/// `<tmp>/palisade-conf-<pid>-<n>`.
pub const NETNS_PREFIX: &str = "pcf";
pub const PIN_PREFIX: &str = "palisade-conf-";

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH))
}

/// The pid in `<prefix><pid>[-...]`.
fn owner(name: &str, prefix: &str) -> Option<i32> {
    let rest = name.strip_prefix(prefix)?;
    rest.split('-').next()?.parse().ok()
}

/// Removes namespaces, pin roots and scratch dirs of earlier runs whose
/// process is gone. Returns what was removed.
pub fn reap_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if owner(&name, NETNS_PREFIX).is_some_and(|pid| !alive(pid)) {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
                removed.push(format!("netns {name}"));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if owner(&name, PIN_PREFIX).is_some_and(|pid| !alive(pid)) {
                let path = e.path();
                // One pin root per case below the run's directory.
                if let Ok(cases) = std::fs::read_dir(&path) {
                    for c in cases.flatten() {
                        let _ = palisade_dataplane::loader::remove_all(
                            &palisade_dataplane::Pins::new(c.path()),
                        );
                    }
                }
                let _ = std::fs::remove_dir_all(&path);
                removed.push(path.display().to_string());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if owner(&name, PIN_PREFIX).is_some_and(|pid| !alive(pid)) && e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
                removed.push(e.path().display().to_string());
            }
        }
    }
    removed
}

/// The pin root of this run (each case's agent pins below it), removed on
/// drop, also when the run unwinds from a panic.
pub struct RunPins(pub PathBuf);

impl RunPins {
    pub fn create() -> Result<Self> {
        let p = Path::new("/sys/fs/bpf").join(format!("{PIN_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for RunPins {
    fn drop(&mut self) {
        if let Err(e) =
            palisade_dataplane::loader::remove_all(&palisade_dataplane::Pins::new(&self.0))
        {
            eprintln!("cleanup: removing {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids() {
        assert_eq!(owner("pcf123-4", NETNS_PREFIX), Some(123));
        assert_eq!(owner("pcf77", NETNS_PREFIX), Some(77));
        assert_eq!(owner("pnode1-2", NETNS_PREFIX), None);
        assert_eq!(owner("palisade-conf-9-1", PIN_PREFIX), Some(9));
        assert_eq!(owner("palisade-conf-x", PIN_PREFIX), None);
        assert!(alive(std::process::id() as i32));
        assert!(!alive(0));
    }
}
