//! Where palisade keeps its state in bpffs. Everything lives under one root
//! so that a restarted agent finds it and a test can remove it whole.
use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use palisade_common::DIR_EGRESS;

use crate::Error;

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/palisade";

/// `f_type` of a bpf filesystem (linux/magic.h).
pub const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Fail unless the root is (or would be created) on a bpf filesystem.
    /// The nearest existing directory at or above the root is checked with
    /// statfs: without bpffs mounted there (not mounted at all, or hidden by
    /// the fresh /sys that `ip netns exec` mounts) every pin would fail with
    /// a bare "No such file or directory".
    pub fn check_bpffs(&self) -> Result<(), Error> {
        let mut dir = self.root.as_path();
        while !dir.exists() {
            match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => dir = p,
                _ => break,
            }
        }
        match fs_type(dir) {
            Ok(BPF_FS_MAGIC) => Ok(()),
            Ok(fs_type) => Err(Error::NotBpffs {
                root: self.root.clone(),
                checked: dir.to_path_buf(),
                fs_type,
            }),
            Err(source) => Err(Error::Io {
                what: format!("statfs {}", dir.display()),
                source,
            }),
        }
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The TCX link of one direction on one host-side interface.
    pub fn link(&self, ifindex: u32, dir: u8) -> PathBuf {
        let d = if dir == DIR_EGRESS {
            "egress"
        } else {
            "ingress"
        };
        self.links_dir().join(format!("{ifindex}-{d}"))
    }

    /// The XDP prefilter link on an uplink.
    pub fn xdp_link(&self, ifindex: u32) -> PathBuf {
        self.links_dir().join(format!("{ifindex}-xdp"))
    }

    /// (ifindex, dir) of every pinned pod link.
    pub fn pinned_links(&self) -> Vec<(u32, u8)> {
        let Ok(rd) = std::fs::read_dir(self.links_dir()) else {
            return Vec::new();
        };
        rd.filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let (idx, d) = name.split_once('-')?;
            let dir = match d {
                "egress" => DIR_EGRESS,
                "ingress" => palisade_common::DIR_INGRESS,
                _ => return None,
            };
            Some((idx.parse().ok()?, dir))
        })
        .collect()
    }
}

/// The filesystem type (`statfs` `f_type`) `path` lives on.
fn fs_type(path: &Path) -> io::Result<u32> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type's width and signedness differ by target; magics are 32 bits.
    Ok(st.f_type as u32)
}

impl Default for Pins {
    fn default() -> Self {
        Self::new(DEFAULT_ROOT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_off_bpffs_is_a_clear_error() {
        // /tmp (or wherever the temp dir is) is not bpffs, existing or not.
        let root = std::env::temp_dir().join("palisade-not-bpffs/sub");
        let e = Pins::new(&root).check_bpffs().unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::NotBpffs { .. }), "{msg}");
        assert!(msg.contains("not on a bpf filesystem"), "{msg}");
        assert!(msg.contains("mount -t bpf"), "{msg}");
        assert!(msg.contains("ip netns exec"), "{msg}");
        assert!(msg.contains("--pin-root"), "{msg}");
    }
}
