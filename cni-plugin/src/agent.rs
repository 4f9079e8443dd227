//! The agent's Unix-socket API as the plugin uses it.
use std::path::Path;

use palisade_api::{call, ClientError, Registration, Request, Response, StatusReport};

use crate::{
    config::NetConf,
    error::{self, CniError, Result},
};

fn unreachable(conf: &NetConf, e: ClientError) -> CniError {
    let timed_out = matches!(&e, ClientError::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    let msg = if timed_out {
        format!(
            "the palisade agent at {} did not answer within {} ms",
            conf.agent_socket.display(),
            conf.agent_timeout.as_millis()
        )
    } else {
        format!(
            "the palisade agent at {} is unreachable",
            conf.agent_socket.display()
        )
    };
    CniError::with_details(error::TRY_AGAIN_LATER, msg, e.to_string())
}

fn ask(conf: &NetConf, req: &Request) -> Result<Response> {
    call(Path::new(&conf.agent_socket), req, conf.agent_timeout).map_err(|e| unreachable(conf, e))
}

/// Returns once the agent has attached the programs and programmed the
/// pod's policy. Unreachable, refused or odd answers are all "try again
/// later": the pod must not start unenforced.
pub fn register(conf: &NetConf, reg: Registration) -> Result<()> {
    let who = format!(
        "{}/{} ({} on {})",
        reg.namespace, reg.pod, reg.ipv4, reg.host_ifname
    );
    match ask(conf, &Request::Register(reg))? {
        Response::Ok {
            generation,
            endpoint_id,
        } => {
            eprintln!(
                "palisade: registered {who}: endpoint {endpoint_id:?}, generation {generation}"
            );
            Ok(())
        }
        Response::Error { message } => Err(CniError::with_details(
            error::TRY_AGAIN_LATER,
            format!("the palisade agent rejected the registration of {who}"),
            message,
        )),
        other => Err(CniError::with_details(
            error::TRY_AGAIN_LATER,
            format!("unexpected answer from the palisade agent to the registration of {who}"),
            format!("{other:?}"),
        )),
    }
}

pub fn deregister(conf: &NetConf, container_id: &str, ifname: &str) -> Result<()> {
    let req = Request::Deregister {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    };
    match ask(conf, &req)? {
        Response::Ok { .. } => Ok(()),
        Response::Error { message } => Err(CniError::with_details(
            error::TRY_AGAIN_LATER,
            format!("the palisade agent refused to deregister {container_id}/{ifname}"),
            message,
        )),
        other => Err(CniError::with_details(
            error::TRY_AGAIN_LATER,
            "unexpected answer from the palisade agent to a deregistration",
            format!("{other:?}"),
        )),
    }
}

pub fn status(conf: &NetConf) -> Result<StatusReport> {
    match ask(conf, &Request::Status)? {
        Response::Status(s) => Ok(*s),
        Response::Error { message } => Err(CniError::with_details(
            error::TRY_AGAIN_LATER,
            "the palisade agent answered Status with an error",
            message,
        )),
        other => Err(CniError::with_details(
            error::TRY_AGAIN_LATER,
            "unexpected answer from the palisade agent to Status",
            format!("{other:?}"),
        )),
    }
}
