//! Images as docker-archives, built offline from files on this machine
//! (what `ctr images import` and `podman load` read). Shared by
//! `cargo xtask image` / setup's pause image and, through `#[path]`, by
//! tests/tests/cni_containerd.rs, which builds the agent's image from the
//! debug binaries with the same layout.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// The agent image's config: deploy/kubernetes/30-daemonset.yaml gives
/// every container its own command.
pub const AGENT_CONFIG: &str = r#"{"Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Cmd":["palisade-agent","run","--kubernetes"]}"#;

/// The DaemonSet image's root filesystem in `rootfs`: the agent and the
/// plugin in /usr/local/bin, every shared library `ldd` says they load (at
/// the same paths, with the dynamic loader), and busybox-static for the
/// mount-bpffs init container's `sh`, `mount` and `stat`.
pub fn agent_rootfs(rootfs: &Path, agent: &Path, plugin: &Path) -> Result<()> {
    let bin = rootfs.join("usr/local/bin");
    fs::create_dir_all(&bin)?;
    let bins = [agent.to_path_buf(), plugin.to_path_buf()];
    for (b, name) in bins.iter().zip(["palisade-agent", "palisade"]) {
        fs::copy(b, bin.join(name)).with_context(|| format!("copying {}", b.display()))?;
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
    for d in [
        "etc", "tmp", "proc", "sys", "dev", "run", "var/run", "var/log",
    ] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    Ok(())
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

/// Packs `rootfs` as a one-layer docker-archive (what `ctr images import`
/// and `podman load` read) tagged `reference`, using `work` as scratch.
/// `config` is the image config's "config" object (Entrypoint, Cmd, ...).
pub fn pack(work: &Path, rootfs: &Path, config: &str, reference: &str, out: &Path) -> Result<()> {
    // Deterministic layer: fixed owner and mtime so the digest is stable.
    let layer = work.join("layer.tar");
    run(Command::new("tar")
        .args([
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-cf",
        ])
        .arg(&layer)
        .arg("-C")
        .arg(rootfs)
        .arg("."))?;
    let layer_digest = sha256(&layer)?;
    let image_config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{config},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#
    );
    let cfg_file = work.join("config.json");
    fs::write(&cfg_file, &image_config)?;
    let cfg_digest = sha256(&cfg_file)?;
    let pack = work.join("pack");
    fs::create_dir_all(pack.join(&layer_digest))?;
    fs::rename(&layer, pack.join(&layer_digest).join("layer.tar"))?;
    fs::rename(&cfg_file, pack.join(format!("{cfg_digest}.json")))?;
    fs::write(
        pack.join("manifest.json"),
        format!(
            r#"[{{"Config":"{cfg_digest}.json","RepoTags":["{reference}"],"Layers":["{layer_digest}/layer.tar"]}}]"#
        ),
    )?;
    fs::create_dir_all(out.parent().context("output has a parent")?)?;
    let tmp = out.with_extension("tar.tmp");
    run(Command::new("tar")
        .args([
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-cf",
        ])
        .arg(&tmp)
        .arg("-C")
        .arg(&pack)
        .arg("."))?;
    fs::rename(&tmp, out)?;
    Ok(())
}

fn sha256(file: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(file).output()?;
    if !out.status.success() {
        bail!("sha256sum {} failed", file.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .context("sha256sum output")?
        .to_string())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
