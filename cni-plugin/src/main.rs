//! `palisade`: the CNI plugin. It wires a pod with a veth pair (or, chained,
//! finds the one an earlier plugin made), allocates its address, and
//! registers the endpoint with the palisade agent before the pod may start.
//! See cni-plugin/README.md for the configuration and the error codes.
mod agent;
mod config;
mod error;
mod ipam;
mod netlink;
mod plugin;
mod result;

use std::io::{Read, Write};

use config::{Command, Env, LATEST_VERSION, SUPPORTED_VERSIONS};
use error::CniError;
use serde_json::Value;

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let version = config::peek_version(&stdin)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string());
    let code = match run(&stdin, read.map(|_| ())) {
        Ok(Some(out)) => {
            print(&out);
            0
        }
        Ok(None) => 0,
        Err(e) => {
            eprintln!("palisade: {e}");
            print(&e.to_json(&version));
            // Codes above 255 would wrap; the exit status only has to be
            // non-zero, the code is in the JSON.
            1
        }
    };
    std::process::exit(code);
}

fn print(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn run(stdin: &[u8], read: std::io::Result<()>) -> Result<Option<Value>, CniError> {
    let cmd = match std::env::var("CNI_COMMAND") {
        Ok(c) if !c.is_empty() => Command::parse(&c).ok_or_else(|| {
            CniError::new(error::INVALID_ENV, format!("unknown CNI_COMMAND: {c}"))
        })?,
        _ => {
            return Err(CniError::new(
                error::INVALID_ENV,
                "required env variables [CNI_COMMAND] missing",
            ))
        }
    };
    if cmd == Command::Version {
        // The answer is in the dialect asked for, when we speak it.
        let asked = config::peek_version(stdin)
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| LATEST_VERSION.to_string());
        return Ok(Some(serde_json::json!({
            "cniVersion": asked,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let env = Env::from_env(cmd, |k| std::env::var(k).ok())?;
    read.map_err(|e| {
        CniError::with_details(
            error::IO_FAILURE,
            "failed to read the network config from stdin",
            e.to_string(),
        )
    })?;
    let conf = config::parse(stdin)?;
    let min = match cmd {
        Command::Check => "0.4.0",
        Command::Gc | Command::Status => "1.1.0",
        _ => "0.0.0",
    };
    if !config::version_at_least(&conf.cni_version, min) {
        return Err(CniError::with_details(
            error::INCOMPATIBLE_VERSION,
            format!("config version does not allow {}", cmd.as_str()),
            format!(
                "{} needs cniVersion {min} or later, the config has {}",
                cmd.as_str(),
                conf.cni_version
            ),
        ));
    }
    let who = if env.container_id.is_empty() {
        String::new()
    } else {
        format!(" {}/{}", env.container_id, env.ifname)
    };
    eprintln!("palisade: {}{who} on network {:?}", cmd.as_str(), conf.name);
    let ctx = plugin::Ctx { env, conf, stdin };
    match cmd {
        Command::Add => plugin::add(&ctx).map(Some),
        Command::Del => plugin::del(&ctx).map(|_| None),
        Command::Check => plugin::check(&ctx).map(|_| None),
        Command::Gc => plugin::gc(&ctx).map(|_| None),
        Command::Status => plugin::status(&ctx).map(|_| None),
        Command::Version => unreachable!("answered above"),
    }
}
