//! Where palisade keeps its state in bpffs. Everything lives under one root
//! so that a restarted agent finds it and a test can remove it whole.
use std::path::{Path, PathBuf};

use palisade_common::DIR_EGRESS;

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/palisade";

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

impl Default for Pins {
    fn default() -> Self {
        Self::new(DEFAULT_ROOT)
    }
}
