//! `cargo xtask image`: the DaemonSet's image built offline. The root
//! filesystem is assembled from this machine: the release binaries, every
//! shared library `ldd` says they load (at the same paths, with the
//! dynamic loader), and busybox-static for the mount-bpffs init
//! container's `sh`, `mount` and `stat`. Packed as a docker-archive that
//! `ctr -n k8s.io images import` and `podman load` accept.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{pause_image, step};

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
    let bin = rootfs.join("usr/local/bin");
    fs::create_dir_all(&bin)?;
    let bins = [release.join("palisade-agent"), release.join("palisade")];
    for b in &bins {
        fs::copy(b, bin.join(b.file_name().expect("file name")))
            .with_context(|| format!("copying {}", b.display()))?;
    }
    for lib in libraries(&bins)? {
        let dst = rootfs.join(lib.strip_prefix("/").expect("absolute"));
        fs::create_dir_all(dst.parent().expect("parent"))?;
        // Follow symlinks: the image gets the file under the linked name.
        fs::copy(&lib, &dst).with_context(|| format!("copying {}", lib.display()))?;
    }
    fs::create_dir_all(rootfs.join("bin"))?;
    fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("busybox-static is not installed (cargo xtask setup)")?;
    for applet in ["sh", "mount", "stat", "mkdir", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    for d in ["etc", "tmp", "proc", "sys", "dev", "run", "var/run"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    let out = archive_path(target);
    pause_image::pack(
        &work,
        &rootfs,
        r#"{"Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Cmd":["palisade-agent","run","--kubernetes"]}"#,
        &reference(),
        &out,
    )?;
    let _ = fs::remove_dir_all(&work);
    step(&format!("image: {} -> {}", reference(), out.display()));
    Ok(out)
}

/// Absolute paths of the shared objects the binaries load, from ldd.
fn libraries(bins: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for b in bins {
        let out = Command::new("ldd").arg(b).output().context("running ldd")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("not found") {
            bail!("{}: unresolved libraries:\n{text}", b.display());
        }
        for line in text.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no path.
            let path = line
                .split("=>")
                .last()
                .and_then(|r| r.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(p) = path {
                let p = PathBuf::from(p);
                if !libs.contains(&p) {
                    libs.push(p);
                }
            }
        }
    }
    Ok(libs)
}
