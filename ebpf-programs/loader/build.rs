//! Builds the eBPF object with Debian's rustc (see ../shared/TOOLCHAIN.md and
//! `cargo xtask setup`) and leaves it in OUT_DIR for `include_bytes_aligned!`.
//! Without the toolchain the build still succeeds: the loader then reports a
//! clear error at run time instead of failing `cargo check` on a laptop.
use std::{env, fs, path::PathBuf, process::Command};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let object = out.join("palisade");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../ebpf");
    let root = root.canonicalize()?;
    println!("cargo:rerun-if-changed={}", root.display());
    let common = root.join("../common").canonicalize()?;
    println!("cargo:rerun-if-changed={}", common.display());

    // `cargo xtask setup` installs bpf-linker into <workspace>/.tools/bin;
    // put it on PATH (aya-build passes PATH to the inner build).
    let tools = root.join("../../.tools/bin");
    if let Ok(tools) = tools.canonicalize() {
        let path = env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![tools];
        dirs.extend(env::split_paths(&path));
        env::set_var("PATH", env::join_paths(dirs)?);
    }
    let missing = toolchain_missing();
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v == "true");
    if skip || missing.is_some() {
        if let Some(why) = &missing {
            println!("cargo:warning=eBPF object not built ({why}); run `cargo xtask setup`");
        }
        // An empty object: the loader refuses to start with a clear error.
        fs::write(&object, [])?;
        return Ok(());
    }
    // Only aya-ebpf and the programs (the atomic add of `verdict::charge`)
    // use unstable features; see TOOLCHAIN.md.
    env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf,palisade");
    let root_dir = root.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "palisade-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("debian"),
    )
}

/// Why the eBPF toolchain is unusable, if it is.
fn toolchain_missing() -> Option<String> {
    let ok = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if !ok(Command::new("rustup").args(["run", "debian", "rustc", "--version"])) {
        return Some("rustup toolchain `debian` is not linked".into());
    }
    if !ok(Command::new("bpf-linker").arg("--version")) {
        return Some("bpf-linker is not on PATH".into());
    }
    None
}
