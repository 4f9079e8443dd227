//! The agent's Unix-socket API as the plugin uses it. The agent answers a
//! failed request with an `ErrorKind`; `code_for` turns it into the CNI
//! code that tells the runtime what to do (only a transient agent problem,
//! or an agent that does not answer, is 11 "try again later").
use std::path::Path;

use palisade_api::{call, ClientError, ErrorKind, Registration, Request, Response, StatusReport};

use crate::{
    config::NetConf,
    error::{self, CniError, Result},
};

/// The CNI error code for an error the agent answered with (the table is in
/// cni-plugin/README.md).
pub fn code_for(kind: ErrorKind) -> u32 {
    match kind {
        ErrorKind::Unavailable => error::TRY_AGAIN_LATER,
        // The registration's fields come from CNI_CONTAINERID, CNI_IFNAME,
        // CNI_NETNS and CNI_ARGS.
        ErrorKind::InvalidRequest => error::INVALID_ENV,
        ErrorKind::NotFound => error::CONTAINER_UNKNOWN,
        ErrorKind::Conflict => error::AGENT_CONFLICT,
        ErrorKind::MapFull => error::AGENT_MAP_FULL,
        ErrorKind::Forbidden => error::AGENT_FORBIDDEN,
        ErrorKind::Internal => error::AGENT_INTERNAL,
        ErrorKind::Unsupported => error::AGENT_UNSUPPORTED,
    }
}

/// What a kind means for the operator, appended to the plugin's message.
fn meaning(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Unavailable => "the agent is not ready or is busy; try again later",
        ErrorKind::InvalidRequest => "the agent found the request invalid",
        ErrorKind::NotFound => "the interface or container it names does not exist",
        ErrorKind::Conflict => "it conflicts with an endpoint the agent already has",
        ErrorKind::MapFull => {
            "a datapath map is full (raise the agent's map sizes or reduce the policies)"
        }
        ErrorKind::Forbidden => "the agent takes registrations only from root or its own user",
        ErrorKind::Internal => {
            "the agent failed in a way retrying will not fix (see the agent's log)"
        }
        ErrorKind::Unsupported => "the agent cannot enforce such a pod (the details say why)",
    }
}

/// The CNI error for the agent's error answer to `what` ("register x").
fn refused(what: &str, kind: ErrorKind, message: String) -> CniError {
    CniError::with_details(
        code_for(kind),
        format!("the palisade agent could not {what}: {}", meaning(kind)),
        format!("{kind}: {message}"),
    )
}

/// An answer of the wrong shape: the agent and the plugin disagree about
/// the protocol, which no retry fixes.
fn unexpected(what: &str, other: &Response) -> CniError {
    CniError::with_details(
        error::AGENT_INTERNAL,
        format!("unexpected answer from the palisade agent when asked to {what}"),
        format!("{other:?}"),
    )
}

/// No answer (not listening, timed out, cut off mid-answer): transient.
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
/// pod's policy. Any failure fails ADD (the pod must not start
/// unenforced); its code says whether retrying can help.
pub fn register(conf: &NetConf, reg: Registration) -> Result<()> {
    let who = format!(
        "{}/{} ({} on {})",
        reg.namespace,
        reg.pod,
        reg.addresses(),
        reg.host_ifname
    );
    let what = format!("register {who}");
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
        Response::Error { kind, message } => Err(refused(&what, kind, message)),
        other => Err(unexpected(&what, &other)),
    }
}

pub fn deregister(conf: &NetConf, container_id: &str, ifname: &str) -> Result<()> {
    let req = Request::Deregister {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    };
    let what = format!("deregister {container_id}/{ifname}");
    match ask(conf, &req)? {
        Response::Ok { .. } => Ok(()),
        Response::Error { kind, message } => Err(refused(&what, kind, message)),
        other => Err(unexpected(&what, &other)),
    }
}

pub fn status(conf: &NetConf) -> Result<StatusReport> {
    let what = "report its status";
    match ask(conf, &Request::Status)? {
        Response::Status(s) => Ok(*s),
        Response::Error { kind, message } => Err(refused(what, kind, message)),
        other => Err(unexpected(what, &other)),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        os::unix::net::UnixListener,
        path::PathBuf,
        time::Duration,
    };

    use super::*;

    const KINDS: [ErrorKind; 8] = ErrorKind::ALL;

    #[test]
    fn each_kind_has_its_code_and_only_unavailable_is_retryable() {
        let table: Vec<(ErrorKind, u32)> = KINDS.iter().map(|k| (*k, code_for(*k))).collect();
        assert_eq!(
            table,
            [
                (ErrorKind::Unavailable, 11),
                (ErrorKind::InvalidRequest, 4),
                (ErrorKind::NotFound, 3),
                (ErrorKind::Conflict, 107),
                (ErrorKind::MapFull, 108),
                (ErrorKind::Forbidden, 110),
                (ErrorKind::Internal, 109),
                (ErrorKind::Unsupported, 111),
            ]
        );
        for k in KINDS {
            assert_eq!(code_for(k) == error::TRY_AGAIN_LATER, k.is_transient());
        }
    }

    #[test]
    fn the_message_says_what_failed_and_the_details_keep_the_agents_words() {
        let e = refused(
            "register app/web (10.0.0.5 on pal0)",
            ErrorKind::MapFull,
            "map POLICY is full (2 entries)".into(),
        );
        assert_eq!(e.code, 108);
        assert!(e.msg.contains("register app/web") && e.msg.contains("map is full"));
        assert_eq!(e.details, "map_full: map POLICY is full (2 entries)");
        let u = unexpected("report its status", &Response::Status(Box::default()));
        assert_eq!(u.code, error::AGENT_INTERNAL);
    }

    /// A one-shot agent on a scratch socket that answers `resp`.
    fn fake_agent(resp: Response) -> (PathBuf, std::thread::JoinHandle<Request>) {
        let dir = std::env::temp_dir().join(format!(
            "palisade-cni-agent-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&c).read_line(&mut line).unwrap();
            let mut out = serde_json::to_vec(&resp).unwrap();
            out.push(b'\n');
            (&c).write_all(&out).unwrap();
            serde_json::from_str(&line).unwrap()
        });
        (sock, t)
    }

    fn conf(sock: PathBuf) -> NetConf {
        NetConf {
            cni_version: "1.1.0".into(),
            name: "t".into(),
            mtu: 1500,
            chained: true,
            agent_socket: sock,
            agent_timeout: Duration::from_secs(5),
            ipam: None,
            dns: None,
            prev_result: None,
            valid_attachments: Vec::new(),
        }
    }

    #[test]
    fn register_maps_the_agents_error_kind() {
        for kind in KINDS {
            let (sock, agent) = fake_agent(Response::error(kind, "because"));
            let reg = Registration {
                container_id: "c1".into(),
                ifname: "eth0".into(),
                netns: "/run/netns/x".into(),
                namespace: "app".into(),
                pod: "web".into(),
                ipv4: Some("10.0.0.5".parse().unwrap()),
                host_ifname: "pal0".into(),
                mac: None,
                ipv6: None,
            };
            let e = register(&conf(sock.clone()), reg).unwrap_err();
            assert!(matches!(agent.join().unwrap(), Request::Register(_)));
            assert_eq!(e.code, code_for(kind), "{kind}: {e}");
            assert!(e.details.ends_with("because"), "{e}");
            let _ = std::fs::remove_dir_all(sock.parent().unwrap());
        }
    }

    #[test]
    fn no_agent_is_try_again_later() {
        let e = status(&conf("/nonexistent/agent.sock".into())).unwrap_err();
        assert_eq!(e.code, error::TRY_AGAIN_LATER);
        assert!(e.msg.contains("unreachable"), "{e}");
    }
}
