//! The pod sandbox ("pause") image, built from this machine's files so
//! containerd never pulls: a static C binary that blocks in pause(2) and
//! exits on SIGTERM/SIGINT, packed as a docker-archive that
//! `ctr images import` accepts.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::step;

/// The reference containerd's `sandbox_image` names.
pub const PAUSE_REF: &str = "localhost/palisade/pause:1";

const PAUSE_C: &str = r#"
#include <signal.h>
#include <unistd.h>
static void done(int s) { (void)s; _exit(0); }
int main(void) {
    signal(SIGTERM, done);
    signal(SIGINT, done);
    for (;;) pause();
}
"#;

/// Where setup leaves the archive (the containerd test imports it into
/// its own containerd).
pub fn archive_path(root: &Path) -> PathBuf {
    root.join(".tools/images/pause.tar")
}

pub fn ensure(root: &Path) -> Result<()> {
    let out = archive_path(root);
    if out.exists() {
        step(&format!("setup: pause image present ({})", out.display()));
        return Ok(());
    }
    step("setup: building the local pause image (static C, docker-archive)");
    let work = root.join(".tools/images/pause-build");
    let _ = fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    fs::create_dir_all(&rootfs)?;
    fs::write(work.join("pause.c"), PAUSE_C)?;
    run(Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(rootfs.join("pause"))
        .arg(work.join("pause.c")))?;
    pack(
        &work,
        &rootfs,
        r#"{"Entrypoint":["/pause"]}"#,
        PAUSE_REF,
        &out,
    )?;
    let _ = fs::remove_dir_all(&work);
    Ok(())
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
