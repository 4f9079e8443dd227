//! `cargo xtask image`: the DaemonSet's image built offline. The root
//! filesystem is assembled from this machine: the release binaries, every
//! shared library `ldd` says they load (at the same paths, with the
//! dynamic loader), and busybox-static for the mount-bpffs init
//! container's `sh`, `mount` and `stat`. Packed as a docker-archive that
//! `ctr -n k8s.io images import` and `podman load` accept.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};

use crate::{oci_archive, step};

/// The reference deploy/kubernetes/30-daemonset.yaml's containers use.
pub fn reference() -> String {
    format!("localhost/palisade:{}", env!("CARGO_PKG_VERSION"))
}

pub fn archive_path(target: &Path) -> PathBuf {
    target.join("palisade-image.tar")
}

pub fn run(root: &Path, target: &Path) -> Result<PathBuf> {
    crate::build(root, true)?;
    let release = target.join("release");
    // As in deploy/Containerfile: an empty embedded eBPF object would give
    // an image whose agent refuses to start.
    let objects = fs::read_dir(release.join("build"))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("palisade-dataplane-")
        })
        .map(|e| e.path().join("out/palisade"))
        .any(|p| fs::metadata(&p).is_ok_and(|m| m.len() > 0));
    if !objects {
        bail!(
            "no eBPF object in {}/build (bpf-linker missing?)",
            release.display()
        );
    }
    step("image: assembling the root filesystem (binaries, their libraries, busybox)");
    let work = target.join("image-build");
    let _ = fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    oci_archive::agent_rootfs(
        &rootfs,
        &release.join("palisade-agent"),
        &release.join("palisade"),
    )?;
    let out = archive_path(target);
    oci_archive::pack(
        &work,
        &rootfs,
        oci_archive::AGENT_CONFIG,
        &reference(),
        &out,
    )?;
    let _ = fs::remove_dir_all(&work);
    step(&format!("image: {} -> {}", reference(), out.display()));
    Ok(out)
}
