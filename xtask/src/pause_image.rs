//! The pod sandbox ("pause") image, built from this machine's files so
//! containerd never pulls: a static C binary that blocks in pause(2) and
//! exits on SIGTERM/SIGINT, packed as a docker-archive that
//! `ctr images import` accepts.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::{
    oci_archive::{pack, run},
    step,
};

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
