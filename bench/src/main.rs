//! `palisade-bench`: palisade's benchmarks (`cargo xtask bench`). Writes
//! `report.md`, `results.json` and PNG charts into `--out`. See
//! bench/README.md for what each section measures and how to read it.
mod agent;
mod cluster;
mod cni;
mod cnp_testrun;
mod dns;
mod memory;
mod node;
mod nodes;
mod plot;
mod podstart;
mod report;
mod services;
mod services_testrun;
mod stats;
mod sys;
mod testrun;
mod update;
mod veth;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::Parser;

use report::Results;

const SECTIONS: [&str; 11] = [
    "testrun", "veth", "update", "cni", "memory", "podstart", "agent", "services", "nodes", "cnp",
    "dns",
];

#[derive(Parser)]
#[command(
    name = "palisade-bench",
    about = "palisade's benchmarks: per-packet cost, veth rates, update latency, CNI latency, agent memory, pod-start enforcement, agent-architecture floors"
)]
struct Args {
    /// Directory for report.md, results.json and the PNG charts.
    #[arg(long, default_value = "bench-report")]
    out: PathBuf,
    /// A 1-2 minute smoke run: fewer sizes, rounds and samples.
    #[arg(long)]
    quick: bool,
    /// Only these sections (comma separated): testrun, veth, update, cni, memory, podstart, agent, services, nodes, cnp.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Rounds for the interleaved sections (default 5, quick 2).
    #[arg(long)]
    rounds: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn write_outputs(r: &Results, out: &Path) -> Result<()> {
    std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(r)?)?;
    std::fs::write(out.join("report.md"), report::render(r))?;
    Ok(())
}

fn run(args: Args) -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks need root (network namespaces, BPF, iptables)");
    }
    for s in &args.only {
        if !SECTIONS.contains(&s.as_str()) {
            bail!(
                "--only {s}: unknown section (one of {})",
                SECTIONS.join(", ")
            );
        }
    }
    sys::install_signal_handlers();
    let sections: Vec<&str> = SECTIONS
        .iter()
        .copied()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s))
        .collect();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let quick = args.quick;
    let rounds = args.rounds.unwrap_or(if quick { 2 } else { 5 }).max(1);
    let started = Instant::now();
    let mut r = Results {
        meta: report::Meta {
            started: now_utc(),
            machine: sys::machine(),
            quick,
            sections: sections.iter().map(|s| s.to_string()).collect(),
            duration_s: 0.0,
        },
        ..Default::default()
    };

    for sec in &sections {
        if sys::interrupted() {
            break;
        }
        let t = Instant::now();
        eprintln!("==> bench: {sec}");
        let res: Result<()> = match *sec {
            "testrun" => {
                let plan = if quick {
                    testrun::Plan {
                        policy_entries: vec![10, 100_000],
                        identities: vec![10, 10_000],
                        rounds,
                        repeat: 1_000_000,
                        distinct_calls: 2000,
                    }
                } else {
                    testrun::Plan {
                        policy_entries: vec![10, 1000, 10_000, 100_000],
                        identities: vec![10, 1000, 10_000],
                        rounds,
                        repeat: 1_000_000,
                        distinct_calls: 5000,
                    }
                };
                testrun::run(&plan).map(|x| r.testrun = Some(x))
            }
            "veth" => veth::run(&veth::Plan::new(quick, rounds)).map(|x| r.veth = Some(x)),
            "update" => update::run(&update::Plan::new(quick)).map(|x| r.update = Some(x)),
            "cni" => cni::run(&cni::Plan::new(quick)).map(|x| r.cni = Some(x)),
            "memory" => memory::run(&memory::Plan::new(quick)).map(|(m, adds)| {
                r.memory = Some(m);
                r.cni.get_or_insert_with(Default::default).runs.push(adds);
            }),
            "podstart" => podstart::run(&podstart::Plan::new(quick)).map(|x| r.podstart = Some(x)),
            "agent" => agent::run(&agent::Plan::new(quick)).map(|x| r.agent = Some(x)),
            "services" => {
                services::run(&services::Plan::new(quick, rounds)).map(|x| r.services = Some(x))
            }
            "nodes" => nodes::run(&nodes::Plan::new(quick, rounds)).map(|x| r.nodes = Some(x)),
            "cnp" => {
                cnp_testrun::run(&cnp_testrun::Plan::new(quick, rounds)).map(|x| r.cnp = Some(x))
            }
            "dns" => dns::run(&dns::Plan::new(quick)).map(|x| r.dns = Some(x)),
            _ => unreachable!("validated above"),
        };
        match res {
            Ok(()) => eprintln!("    {sec} done in {:.0} s", t.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("    {sec} FAILED: {e:#}");
                r.errors.push((sec.to_string(), format!("{e:#}")));
            }
        }
        r.meta.duration_s = started.elapsed().as_secs_f64();
        write_outputs(&r, &args.out)?;
    }

    if plot::init_font() {
        match plot::write_all(&r, &args.out) {
            Ok(files) => r.plots = files,
            Err(e) => r.plot_note = Some(format!("charts could not be drawn: {e:#}")),
        }
    } else {
        r.plot_note = Some(
            "no charts: the DejaVu font (Debian fonts-dejavu-core, installed by `cargo xtask setup`) is missing"
                .into(),
        );
    }
    r.meta.duration_s = started.elapsed().as_secs_f64();
    write_outputs(&r, &args.out)?;

    eprintln!("\n==> bench: targets");
    for t in report::targets(&r) {
        let m = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        };
        eprintln!(
            "    [{m:>6}] {}: {} (target {})",
            t.metric, t.measured, t.target
        );
    }
    eprintln!(
        "==> bench: report in {} ({:.0} s)",
        args.out.join("report.md").display(),
        r.meta.duration_s
    );
    if sys::interrupted() {
        bail!("interrupted; partial results written");
    }
    Ok(())
}
