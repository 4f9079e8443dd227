//! `conformance --cases DIR...`: runs NetworkPolicy conformance cases on
//! real packets (see palisade_tests::conformance and
//! ../shared/conformance/FORMAT.md). Run as root; `cargo xtask conformance`
//! builds what it needs and runs this.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Result};
use palisade_tests::conformance::{
    runner::{self, Options},
    signal,
};

const USAGE: &str = "\
usage: conformance --cases DIR|FILE [--cases ...] [--filter TEXT] [--keep DIR] [--parallel N] [--verbose] [--skip-unsupported] [--via-services] [--nodes N] [--routing native|vxlan] [--ip-family ipv4|ipv6|dual]

  --cases DIR   a directory of case files (*.yaml) or one case file; repeatable
  --filter TEXT only cases whose name or file contains TEXT; repeatable (any)
  --keep DIR    copy each case's agent log, flow log and manifests below DIR
  --parallel N  probe threads per step (default 96)
  --verbose     print the agent's warnings under failing cases
  --skip-unsupported
                report cases that need a FORMAT version 2 feature this agent
                does not implement yet as skipped (with what they need),
                not as failed
  --via-services
                probe every pod through its own ClusterIP Service (with its
                EndpointSlice, and kube-proxy's iptables rules in the node),
                FORMAT version 2
  --nodes N     N simulated nodes (namespaces joined by a fabric, an agent
                and the CNI plugin each), pods spread round robin unless a
                case pins them (FORMAT version 2); cluster.nodes wins
  --routing M   how the agents route between nodes: native (default) or vxlan
  --ip-family F which addresses pods get (FORMAT version 2): ipv4 (default);
                ipv6, every address, placeholder and probe IPv6; dual, both,
                placeholders IPv4, every probe over both families except in
                cases with an ipBlock or networks peer (IPv4 only); a cell
                holds when it holds over every family probed. ipv6 and dual
                do not combine with --nodes/--via-services yet

Environment: PALISADE_AGENT_BIN, PALISADE_CNI_BIN (default: next to this
binary), PALISADE_AGENT_LOG (the agent's RUST_LOG, default info).";

struct Args {
    cases: Vec<PathBuf>,
    filters: Vec<String>,
    opts: Options,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args {
        cases: Vec::new(),
        filters: Vec::new(),
        opts: Options::default(),
    };
    while let Some(arg) = it.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) => Ok(v),
                None => bail!("{name} needs a value\n{USAGE}"),
            }
        };
        match key.as_str() {
            // `--cases A B C` works too: words after it that are not flags.
            "--cases" => a.cases.push(PathBuf::from(value("--cases")?)),
            "--filter" => a.filters.push(value("--filter")?),
            "--keep" => a.opts.keep = Some(PathBuf::from(value("--keep")?)),
            "--parallel" => a.opts.parallel = value("--parallel")?.parse()?,
            "--verbose" | "-v" => a.opts.verbose = true,
            "--skip-unsupported" => a.opts.skip_unsupported = true,
            "--via-services" => a.opts.via_services = true,
            "--nodes" => {
                a.opts.nodes = value("--nodes")?.parse()?;
                if a.opts.nodes == 0 {
                    bail!("--nodes 0: a cluster has at least one node");
                }
            }
            "--ip-family" => {
                a.opts.ip_family =
                    palisade_tests::conformance::family::IpFamily::parse(&value("--ip-family")?)?
            }
            "--routing" => {
                let r = value("--routing")?;
                if r != "native" && r != "vxlan" {
                    bail!("--routing {r}: native or vxlan");
                }
                a.opts.routing = r;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other if !other.starts_with('-') && !a.cases.is_empty() => {
                a.cases.push(PathBuf::from(other))
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if a.cases.is_empty() {
        bail!("no --cases given\n{USAGE}");
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("conformance: {e:#}");
            return ExitCode::from(2);
        }
    };
    if !palisade_tests::require_root() {
        eprintln!("conformance: needs root (network namespaces, BPF)");
        return ExitCode::from(2);
    }
    signal::install();
    match runner::run_paths(&args.cases, &args.filters, &args.opts) {
        Ok(t) if t.interrupted => {
            eprintln!("conformance: interrupted; everything it made was removed");
            ExitCode::from(130)
        }
        Ok(t) if t.failed > 0 => ExitCode::FAILURE,
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conformance: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
