//! `cargo xtask setup`: the recipe of ../shared/TOOLCHAIN.md, made
//! idempotent. Each step checks first and only acts when something is
//! missing, so a second run takes seconds.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::step;

/// Debian packages: the eBPF toolchain, then what the tests drive for real
/// (iproute2 for netns, podman + reference CNI plugins + busybox for libcni
/// tests, python3-venv for the offline manifest validator, load generators
/// for the benchmarks).
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "iptables",
    // The nftables peer of the veth benchmark (d-N).
    "nftables",
    "podman",
    "runc",
    // The kubelet's runtime (its CRI plugin is built in) for cni_containerd;
    // gcc builds its local pause image.
    "containerd",
    "gcc",
    "libc6-dev",
    // k8s-cri generates its CRI client from the .proto files at build time.
    "protobuf-compiler",
    "containernetworking-plugins",
    "busybox-static",
    "python3",
    "python3-venv",
    "iperf3",
    "qperf",
    "sockperf",
    // The benchmark report's PNG charts render text with this font file.
    "fonts-dejavu-core",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn tools_dir(root: &Path) -> PathBuf {
    root.join(".tools")
}

/// PATH with `<root>/.tools/bin` first.
pub fn path_with_tools(root: &Path) -> OsString {
    let mut dirs = vec![tools_dir(root).join("bin")];
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(dirs).expect("valid PATH entries")
}

pub fn run(root: &Path) -> Result<()> {
    packages()?;
    rustup_link()?;
    bpf_linker(root)?;
    bpffs()?;
    crate::pause_image::ensure(root)?;
    step("setup: done");
    Ok(())
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step("setup: Debian packages present");
        return Ok(());
    }
    step(&format!(
        "setup: installing Debian packages: {}",
        missing.join(" ")
    ));
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()?
        .success();
    if !ok {
        bail!("apt-get update failed");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn rustup_link() -> Result<()> {
    if quiet_ok(Command::new("rustup").args(["run", "debian", "rustc", "--print", "target-list"])) {
        step("setup: rustup toolchain `debian` (Debian rustc-web, bpfel core) linked");
        return Ok(());
    }
    step("setup: linking Debian's rustc as rustup toolchain `debian`");
    let status = Command::new("rustup")
        .args(["toolchain", "link", "debian", "/usr"])
        .status()?;
    if !status.success() {
        bail!("rustup toolchain link debian /usr failed");
    }
    let out = Command::new("rustc")
        .args(["+debian", "--print", "target-list"])
        .output()?;
    if !String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l == "bpfel-unknown-none")
    {
        bail!("Debian's rustc has no bpfel-unknown-none target (libstd-rust-web-dev-bpf missing?)");
    }
    Ok(())
}

fn bpf_linker(root: &Path) -> Result<()> {
    let bin = tools_dir(root).join("bin/bpf-linker");
    let have = Command::new(&bin).arg("--version").output();
    if have.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        step(&format!(
            "setup: bpf-linker {BPF_LINKER_VERSION} present in .tools/bin"
        ));
        return Ok(());
    }
    step(&format!("setup: building bpf-linker {BPF_LINKER_VERSION} against llvm-22 into .tools (about a minute)"));
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features", "llvm-22", "--root"])
        .arg(tools_dir(root))
        // Without it the build finds llvm-14's llvm-config and fails.
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("building bpf-linker failed");
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        step("setup: bpffs mounted at /sys/fs/bpf");
        return Ok(());
    }
    step("setup: mounting bpffs at /sys/fs/bpf");
    if !quiet_ok(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
        bail!("mounting bpffs failed (needs root)");
    }
    Ok(())
}
