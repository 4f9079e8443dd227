//! `cargo xtask <task>`: palisade's setup, build, test, demo and bench
//! entry points. Every task prints what it does, step by step.
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "palisade's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and tests need (idempotent).
    Setup,
    /// Build the eBPF object and every userspace binary.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, build, lint, and run every test (unit, kernel, integration).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
        /// Skip fmt/clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// The main job: a node with pods in network namespaces, policy applied
    /// step by step, what passes and what is dropped, and why.
    Demo,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::run(&root),
        Task::Build { release } => {
            setup::run(&root)?;
            build(&root, release)
        }
        Task::Test { filter, no_lint } => {
            setup::run(&root)?;
            build(&root, false)?;
            if !no_lint {
                lint(&root)?;
            }
            test(&root, filter.as_deref())
        }
        Task::Demo => {
            setup::run(&root)?;
            build(&root, false)?;
            step("demo: datapath in network namespaces");
            cargo(&root, &["run", "--quiet", "-p", "palisade-tests", "--example", "demo"])
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// `cargo` with the repo's tools dir on PATH (bpf-linker).
pub fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .env("PATH", setup::path_with_tools(root))
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn build(root: &Path, release: bool) -> Result<()> {
    step("build: eBPF object (via aya-build) and all userspace binaries");
    let mut args = vec!["build", "--workspace", "--bins", "--examples"];
    if release {
        args.push("--release");
    }
    cargo(root, &args)
}

fn lint(root: &Path) -> Result<()> {
    step("lint: cargo fmt --check");
    cargo(root, &["fmt", "--all", "--check"])?;
    step("lint: cargo clippy -D warnings");
    cargo(root, &["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])
}

fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    step("test: unit, kernel (BPF_PROG_TEST_RUN) and netns integration tests");
    let mut args = vec!["test", "--workspace"];
    if let Some(f) = filter {
        args.push(f);
    }
    cargo(root, &args)
}
