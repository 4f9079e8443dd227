//! The `palisade` CNI plugin run as a process, as a runtime runs it:
//! CNI_* environment, config on stdin, result or error JSON on stdout.
//! Every error path has its code; ADD/CHECK/DEL/GC/STATUS run against the
//! real agent inside a node namespace.
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use anyhow::{ensure, Context, Result};
use palisade_api::{ErrorKind, Request, Response};
use palisade_tests::{
    agent::TempDir,
    cni::{allocations, exec, links, CniNode, Json, Outcome},
    require_root, tcp_connects, tcp_echo_server, NetNs,
};

const VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A palisade network config with the built-in IPAM.
fn conf(version: &str, n: &CniNode, subnet: &str, ipam_extra: &str, top_extra: &str) -> String {
    conf_at(
        version,
        &n.socket(),
        &n.ipam_dir(),
        subnet,
        ipam_extra,
        top_extra,
    )
}

fn conf_at(
    version: &str,
    socket: &Path,
    ipam_dir: &Path,
    subnet: &str,
    ipam_extra: &str,
    top_extra: &str,
) -> String {
    format!(
        r#"{{"cniVersion":"{version}","name":"specnet","type":"palisade","agentSocket":"{}","agentTimeoutMs":30000{top_extra},
            "ipam":{{"type":"palisade","subnet":"{subnet}","dataDir":"{}"{ipam_extra}}}}}"#,
        socket.display(),
        ipam_dir.display()
    )
}

/// `conf` with one more top-level key.
fn with_key(conf: &str, key: &str, json: &str) -> String {
    let end = conf.rfind('}').expect("an object");
    format!("{},\"{key}\":{json}}}", &conf[..end])
}

fn add_env<'a>(cid: &'a str, netns: &'a str, pod: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", pod),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

/// A failed run: non-zero exit, the spec's error object with `code`.
fn expect_error(o: &Outcome, code: u64, version: &str) -> Result<()> {
    ensure!(
        !o.status.success(),
        "expected failure, got success: {}",
        o.stdout
    );
    ensure!(
        o.code() == Some(code),
        "expected code {code}, got {:?}: {}",
        o.code(),
        o.stdout
    );
    ensure!(
        o.json["cniVersion"].as_str() == Some(version),
        "error cniVersion: {}",
        o.stdout
    );
    ensure!(
        o.json["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "error without msg: {}",
        o.stdout
    );
    Ok(())
}

fn ip_of(result: &Json) -> Result<Ipv4Addr> {
    let a = result["ips"][0]["address"]
        .as_str()
        .context("no ips[0].address")?;
    Ok(a.split('/').next().unwrap_or_default().parse()?)
}

#[test]
fn version_negotiation() -> Result<()> {
    for v in VERSIONS {
        let o = exec(None, "VERSION", &[], &format!(r#"{{"cniVersion":"{v}"}}"#))?.ok()?;
        assert_eq!(o.json["cniVersion"].as_str(), Some(v));
        let supported: Vec<&str> = o.json["supportedVersions"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(Json::as_str)
            .collect();
        assert_eq!(supported, VERSIONS);
    }
    // No input, or a version it does not speak: its own latest.
    let o = exec(None, "VERSION", &[], "")?.ok()?;
    assert_eq!(o.json["cniVersion"].as_str(), Some("1.1.0"));
    let o = exec(None, "VERSION", &[], r#"{"cniVersion":"0.2.0"}"#)?.ok()?;
    assert_eq!(o.json["cniVersion"].as_str(), Some("1.1.0"));
    Ok(())
}

#[test]
fn error_paths_have_their_codes() -> Result<()> {
    // No namespaces here: nothing gets as far as the network.
    let dir = TempDir::new("palisade-cni-")?;
    let (sock, ipam) = (dir.path().join("agent.sock"), dir.path().join("ipam"));
    let conf = |v: &str, subnet: &str, ipam_extra: &str, top_extra: &str| {
        conf_at(v, &sock, &ipam, subnet, ipam_extra, top_extra)
    };
    let good = conf("1.0.0", "10.201.0.0/24", "", "");
    let env = add_env("c1", "/nonexistent/netns", "");

    // 4: no CNI_COMMAND, an unknown one, missing variables (named).
    expect_error(&exec(None, "", &env, &good)?, 4, "1.0.0")?;
    expect_error(&exec(None, "FROB", &env, &good)?, 4, "1.0.0")?;
    let o = exec(None, "ADD", &[("CNI_CONTAINERID", "c1")], &good)?;
    expect_error(&o, 4, "1.0.0")?;
    let msg = o.json["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("CNI_NETNS") && msg.contains("CNI_IFNAME"),
        "{msg}"
    );
    expect_error(
        &exec(None, "DEL", &[("CNI_IFNAME", "eth0")], &good)?,
        4,
        "1.0.0",
    )?;
    expect_error(
        &exec(None, "GC", &[], &conf("1.1.0", "10.201.0.0/24", "", ""))?,
        4,
        "1.1.0",
    )?;
    let bad_id = add_env("-no", "/x", "");
    expect_error(&exec(None, "ADD", &bad_id, &good)?, 4, "1.0.0")?;
    let bad_if = [
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/x"),
        ("CNI_IFNAME", "a/b"),
    ];
    expect_error(&exec(None, "ADD", &bad_if, &good)?, 4, "1.0.0")?;

    // 6: not JSON, not an object, wrong types.
    expect_error(&exec(None, "ADD", &env, "{not json")?, 6, "1.1.0")?;
    expect_error(&exec(None, "ADD", &env, "[1,2]")?, 6, "1.1.0")?;
    expect_error(
        &exec(
            None,
            "ADD",
            &env,
            &conf("1.0.0", "10.201.0.0/24", r#","rangeStart":7"#, ""),
        )?,
        6,
        "1.0.0",
    )?;

    // 1: a version it does not speak; commands newer than the config.
    let o = exec(None, "ADD", &env, &conf("0.2.0", "10.201.0.0/24", "", ""))?;
    expect_error(&o, 1, "1.1.0")?;
    assert!(
        o.json["details"]
            .as_str()
            .unwrap_or_default()
            .contains("0.2.0"),
        "{}",
        o.stdout
    );
    expect_error(
        &exec(None, "ADD", &env, &conf("2.0.0", "10.201.0.0/24", "", ""))?,
        1,
        "1.1.0",
    )?;
    expect_error(
        &exec(None, "CHECK", &env, &conf("0.3.1", "10.201.0.0/24", "", ""))?,
        1,
        "0.3.1",
    )?;
    expect_error(&exec(None, "STATUS", &[], &good)?, 1, "1.0.0")?;
    expect_error(
        &exec(None, "GC", &[("CNI_PATH", "/usr/lib/cni")], &good)?,
        1,
        "1.0.0",
    )?;

    // 7: bad subnets, gateway, range, mtu, missing ipam, bad name.
    for (ipam_extra, subnet) in [
        ("", "10.201.0.0/33"),
        ("", "not-a-subnet"),
        ("", "10.201.0.5/24"),
        ("", "10.201.0.0/31"),
        (r#","gateway":"10.9.9.9""#, "10.201.0.0/24"),
        (
            r#","rangeStart":"10.201.0.9","rangeEnd":"10.201.0.3""#,
            "10.201.0.0/24",
        ),
        (r#","rangeEnd":"10.201.1.3""#, "10.201.0.0/24"),
    ] {
        let o = exec(None, "ADD", &env, &conf("1.0.0", subnet, ipam_extra, ""))?;
        expect_error(&o, 7, "1.0.0").with_context(|| format!("subnet {subnet} {ipam_extra}"))?;
    }
    expect_error(
        &exec(
            None,
            "ADD",
            &env,
            &conf("1.0.0", "10.201.0.0/24", "", r#","mtu":10"#),
        )?,
        7,
        "1.0.0",
    )?;
    let no_ipam = r#"{"cniVersion":"1.0.0","name":"specnet","type":"palisade"}"#;
    expect_error(&exec(None, "ADD", &env, no_ipam)?, 7, "1.0.0")?;
    let bad_name = r#"{"cniVersion":"1.0.0","name":"-x","type":"palisade","chained":true}"#;
    expect_error(&exec(None, "ADD", &env, bad_name)?, 7, "1.0.0")?;
    // Chained needs a prevResult (and says so before touching anything).
    let chained = r#"{"cniVersion":"1.0.0","name":"specnet","type":"palisade","chained":true}"#;
    expect_error(&exec(None, "ADD", &env, chained)?, 7, "1.0.0")?;
    // ... one describing CNI_IFNAME.
    let other_if = with_key(
        chained,
        "prevResult",
        r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth1","sandbox":"/x"}],"ips":[{"address":"10.201.0.2/24","interface":0}]}"#,
    );
    expect_error(&exec(None, "ADD", &env, &other_if)?, 103, "1.0.0")?;

    // 3: ADD into a namespace that does not exist; nothing is allocated.
    expect_error(&exec(None, "ADD", &env, &good)?, 3, "1.0.0")?;
    assert!(allocations(&ipam).is_empty());
    // 50: STATUS with no agent listening.
    let o = exec(None, "STATUS", &[], &conf("1.1.0", "10.201.0.0/24", "", ""))?;
    expect_error(&o, 50, "1.1.0")?;
    Ok(())
}

#[test]
fn exhausted_pool_is_code_100_and_creates_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::new()?;
    let pod = NetNs::new("pcpod")?;
    // One address in the range (.1 is the gateway), held by someone else.
    fs::create_dir_all(n.ipam_dir())?;
    fs::write(n.ipam_dir().join("10.202.0.2"), "other\neth0")?;
    let c = conf(
        "1.0.0",
        &n,
        "10.202.0.0/24",
        r#","rangeStart":"10.202.0.1","rangeEnd":"10.202.0.2""#,
        "",
    );
    let path = pod.path().display().to_string();
    let o = exec(Some(&n.node), "ADD", &add_env("c1", &path, ""), &c)?;
    expect_error(&o, 100, "1.0.0")?;
    assert!(
        o.json["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("exhausted"),
        "{}",
        o.stdout
    );
    assert_eq!(links(&n.node)?, ["lo"]);
    assert_eq!(links(&pod)?, ["lo"]);
    assert_eq!(allocations(&n.ipam_dir()), ["10.202.0.2"]);
    Ok(())
}

#[test]
fn add_without_agent_is_retryable_and_leaves_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::new()?;
    let pod = NetNs::new("pcpod")?;
    let path = pod.path().display().to_string();
    for v in VERSIONS {
        let o = exec(
            Some(&n.node),
            "ADD",
            &add_env("c1", &path, ""),
            &conf(v, &n, "10.203.0.0/24", "", ""),
        )?;
        expect_error(&o, 11, v)?;
        assert!(
            o.json["msg"].as_str().unwrap_or_default().contains("agent"),
            "{}",
            o.stdout
        );
        // The pod never runs unenforced: no veth, no address, on either side.
        assert_eq!(links(&n.node)?, ["lo"]);
        assert_eq!(links(&pod)?, ["lo"]);
        assert!(allocations(&n.ipam_dir()).is_empty());
    }
    // An interface of that name already in the pod: an error, untouched.
    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])?;
    let o = exec(
        Some(&n.node),
        "ADD",
        &add_env("c1", &path, ""),
        &conf("1.0.0", &n, "10.203.0.0/24", "", ""),
    )?;
    expect_error(&o, 101, "1.0.0")?;
    assert!(links(&pod)?.contains(&"eth0".to_string()));
    assert!(allocations(&n.ipam_dir()).is_empty());
    Ok(())
}

/// A stand-in agent on the CNI node's socket: every Register is answered
/// with an error of the kind in `kind`, everything else with Ok. It keeps
/// the ops it was asked, in order.
struct FakeAgent {
    socket: PathBuf,
    kind: Arc<Mutex<ErrorKind>>,
    ops: Arc<Mutex<Vec<&'static str>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeAgent {
    fn start(socket: PathBuf) -> Result<Self> {
        let l = UnixListener::bind(&socket)?;
        let kind = Arc::new(Mutex::new(ErrorKind::Internal));
        let ops = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (k, o, s) = (kind.clone(), ops.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    continue;
                }
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Register(_)) => {
                        o.lock().unwrap().push("register");
                        let kind = *k.lock().unwrap();
                        Response::error(kind, format!("the fake agent says {kind}"))
                    }
                    Ok(Request::Deregister { .. }) => {
                        o.lock().unwrap().push("deregister");
                        Response::Ok {
                            generation: 1,
                            endpoint_id: None,
                        }
                    }
                    _ => Response::error(ErrorKind::InvalidRequest, "not faked"),
                };
                let mut out = serde_json::to_vec(&resp).expect("encodes");
                out.push(b'\n');
                let _ = (&conn).write_all(&out);
            }
        });
        Ok(Self {
            socket,
            kind,
            ops,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn agent_error_kinds_have_their_codes_and_add_leaves_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::new()?;
    let agent = FakeAgent::start(n.socket())?;
    let pod = NetNs::new("pcpod")?;
    let path = pod.path().display().to_string();
    let c = conf("1.1.0", &n, "10.206.0.0/24", "", "");
    for (kind, code, says) in [
        (ErrorKind::Unavailable, 11, "try again later"),
        (ErrorKind::InvalidRequest, 4, "invalid"),
        (ErrorKind::NotFound, 3, "does not exist"),
        (ErrorKind::Conflict, 107, "conflicts"),
        (ErrorKind::MapFull, 108, "map is full"),
        (ErrorKind::Forbidden, 110, "root"),
        (ErrorKind::Internal, 109, "agent's log"),
        (ErrorKind::Unsupported, 111, "cannot enforce"),
    ] {
        *agent.kind.lock().unwrap() = kind;
        agent.ops.lock().unwrap().clear();
        let env = add_env("c1", &path, "K8S_POD_NAMESPACE=app;K8S_POD_NAME=web");
        let o = exec(Some(&n.node), "ADD", &env, &c)?;
        expect_error(&o, code, "1.1.0").with_context(|| format!("{kind}"))?;
        let msg = o.json["msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains("app/web") && msg.contains(says),
            "{kind}: {}",
            o.stdout
        );
        let details = o.json["details"].as_str().unwrap_or_default();
        assert!(
            details.contains(&format!("the fake agent says {kind}")),
            "{kind}: {}",
            o.stdout
        );
        // Rolled back: deregistered, no veth, no address.
        assert_eq!(*agent.ops.lock().unwrap(), ["register", "deregister"]);
        assert_eq!(links(&n.node)?, ["lo"], "{kind}");
        assert_eq!(links(&pod)?, ["lo"], "{kind}");
        assert!(allocations(&n.ipam_dir()).is_empty(), "{kind}");
    }
    Ok(())
}

#[test]
fn del_is_best_effort_and_gc_releases_stale_addresses() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::new()?;
    let c = conf("1.1.0", &n, "10.204.0.0/24", "", "");
    // DEL of something never added, with and without a (gone) netns, twice.
    for _ in 0..2 {
        exec(
            Some(&n.node),
            "DEL",
            &[("CNI_CONTAINERID", "ghost"), ("CNI_IFNAME", "eth0")],
            &c,
        )?
        .ok()?;
        let env = add_env("ghost", "/run/netns/does-not-exist", "");
        exec(Some(&n.node), "DEL", &env, &c)?.ok()?;
    }
    // GC: addresses of attachments not in the valid list are released.
    fs::create_dir_all(n.ipam_dir())?;
    for (ip, owner) in [
        ("10.204.0.2", "keep"),
        ("10.204.0.3", "stale"),
        ("10.204.0.4", "keep2"),
    ] {
        fs::write(n.ipam_dir().join(ip), format!("{owner}\neth0"))?;
    }
    let gc = with_key(
        &c,
        "cni.dev/valid-attachments",
        r#"[{"containerID":"keep","ifname":"eth0"},{"containerID":"keep2","ifname":"eth0"}]"#,
    );
    let o = exec(Some(&n.node), "GC", &[("CNI_PATH", "/usr/lib/cni")], &gc)?.ok()?;
    assert!(
        o.stdout.trim().is_empty(),
        "GC prints nothing on success: {}",
        o.stdout
    );
    assert_eq!(allocations(&n.ipam_dir()), ["10.204.0.2", "10.204.0.4"]);
    // An empty list: everything goes.
    let gc = with_key(&c, "cni.dev/valid-attachments", "[]");
    exec(Some(&n.node), "GC", &[("CNI_PATH", "/usr/lib/cni")], &gc)?.ok()?;
    assert!(allocations(&n.ipam_dir()).is_empty());
    Ok(())
}

/// One pod through ADD, CHECK, DEL in every result version, wired the way
/// tests/src/lib.rs Node::add_pod wires pods, registered with the agent.
#[test]
fn add_check_del_with_the_agent_in_every_version() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let status = exec(
        Some(&n.node),
        "STATUS",
        &[],
        &conf("1.1.0", &n, "10.205.0.0/24", "", ""),
    )?;
    ensure!(
        status.status.success() && status.stdout.trim().is_empty(),
        "STATUS with the agent: {status:?}"
    );

    let server = NetNs::new("pcpod")?;
    let client = NetNs::new("pcpod")?;
    for (round, v) in VERSIONS.into_iter().enumerate() {
        let c = conf(
            v,
            &n,
            "10.205.0.0/24",
            "",
            r#","mtu":1400,"dns":{"nameservers":["10.205.0.1"]}"#,
        );
        let cid_s = format!("srv-{}", v.replace('.', ""));
        let cid_c = format!("cli-{}", v.replace('.', ""));
        let (ps, pc) = (
            server.path().display().to_string(),
            client.path().display().to_string(),
        );
        let rs = exec(
            Some(&n.node),
            "ADD",
            &add_env(&cid_s, &ps, "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=server"),
            &c,
        )?
        .ok()?;
        let rc = exec(
            Some(&n.node),
            "ADD",
            &add_env(&cid_c, &pc, "IgnoreUnknown=1;K8S_POD_NAME=client"),
            &c,
        )?
        .ok()?;
        let r = &rs.json;

        // The result, in the config's dialect.
        assert_eq!(r["cniVersion"].as_str(), Some(v));
        let ifs = r["interfaces"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert_eq!(ifs.len(), 2, "{}", rs.stdout);
        let host_if = ifs[0]["name"].as_str().context("host if")?.to_string();
        assert!(
            host_if.starts_with("pal") && host_if.len() <= 15,
            "{host_if}"
        );
        assert!(ifs[0].get("sandbox").is_none());
        assert_eq!(ifs[1]["name"].as_str(), Some("eth0"));
        assert_eq!(ifs[1]["sandbox"].as_str(), Some(ps.as_str()));
        for i in ifs {
            assert_eq!(i["mac"].as_str().map(str::len), Some(17), "{}", rs.stdout);
        }
        assert_eq!(ifs[0].get("mtu").is_some(), v == "1.1.0");
        let ip0 = &r["ips"][0];
        assert!(
            ip0["address"].as_str().unwrap_or_default().ends_with("/24"),
            "{}",
            rs.stdout
        );
        assert_eq!(ip0["gateway"].as_str(), Some("10.205.0.1"));
        assert_eq!(ip0["interface"].as_f64(), Some(1.0));
        assert_eq!(
            ip0.get("version").is_some(),
            v.starts_with("0."),
            "{}",
            rs.stdout
        );
        assert_eq!(r["routes"][0]["dst"].as_str(), Some("0.0.0.0/0"));
        assert_eq!(r["dns"]["nameservers"][0].as_str(), Some("10.205.0.1"));
        let (ip_s, ip_c) = (ip_of(r)?, ip_of(&rc.json)?);
        assert_ne!(ip_s, ip_c);

        // The wiring: pod ip/32, link route to the gateway, default via it,
        // MTU; host side gateway/32 and a route to the pod; forwarding on.
        let addr = String::from_utf8(
            server
                .ip(&["-o", "-4", "addr", "show", "dev", "eth0"])?
                .stdout,
        )?;
        assert!(addr.contains(&format!("{ip_s}/32")), "{addr}");
        let routes = String::from_utf8(server.ip(&["route"])?.stdout)?;
        assert!(
            routes.contains("default via 10.205.0.1 dev eth0"),
            "{routes}"
        );
        assert!(
            routes.contains("10.205.0.1 dev eth0") && routes.contains("scope link"),
            "{routes}"
        );
        let link = String::from_utf8(server.ip(&["link", "show", "eth0"])?.stdout)?;
        assert!(link.contains("mtu 1400"), "{link}");
        let haddr = String::from_utf8(
            n.node
                .ip(&["-o", "-4", "addr", "show", "dev", &host_if])?
                .stdout,
        )?;
        assert!(haddr.contains("10.205.0.1/32"), "{haddr}");
        let hroutes = String::from_utf8(n.node.ip(&["route"])?.stdout)?;
        assert!(
            hroutes.contains(&format!("{ip_s} dev {host_if}")),
            "{hroutes}"
        );
        let fwd = String::from_utf8(
            palisade_tests::run(n.node.cmd("sysctl").args(["-n", "net.ipv4.ip_forward"]))?.stdout,
        )?;
        assert_eq!(fwd.trim(), "1");
        // IPv6 off in the pod (no IPv6 address: no RS/MLD); the host end
        // takes no router advertisement (issue 17 point 4).
        let sysctl = |ns: &NetNs, key: &str| -> Result<String> {
            let o = palisade_tests::run(ns.cmd("sysctl").args(["-n", key]))?;
            Ok(String::from_utf8(o.stdout)?.trim().to_string())
        };
        assert_eq!(sysctl(&server, "net.ipv6.conf.eth0.disable_ipv6")?, "1");
        let conf = |k: &str| format!("net.ipv6.conf.{host_if}.{k}");
        assert_eq!(sysctl(&n.node, &conf("accept_ra"))?, "0");
        assert_eq!(sysctl(&n.node, &conf("autoconf"))?, "0");

        // Pods reach each other through the node.
        // (A port per round: the echo listeners live as long as the test.)
        let port = 8080 + round as u16;
        tcp_echo_server(&server, port)?;
        ensure!(
            tcp_connects(&client, ip_s, port, 2000)?,
            "client cannot reach server {ip_s} ({v})"
        );

        // The agent knows both, with the pod names from CNI_ARGS.
        let eps = n.endpoints()?;
        assert!(
            eps.contains(&("prod/server".to_string(), ip_s, host_if.clone())),
            "{eps:?}"
        );
        assert!(
            eps.iter()
                .any(|(p, ip, _)| p == "default/client" && *ip == ip_c),
            "{eps:?}"
        );

        // CHECK passes with prevResult, and fails once a route is gone.
        let checked = with_key(&c, "prevResult", rs.stdout.trim());
        let env_s = add_env(&cid_s, &ps, "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=server");
        if v != "0.3.1" {
            exec(Some(&n.node), "CHECK", &env_s, &checked)?.ok()?;
            n.node.ip(&["route", "del", &format!("{ip_s}/32")])?;
            let o = exec(Some(&n.node), "CHECK", &env_s, &checked)?;
            expect_error(&o, 104, v)?;
            n.node
                .ip(&["route", "add", &format!("{ip_s}/32"), "dev", &host_if])?;
            exec(Some(&n.node), "CHECK", &env_s, &checked)?.ok()?;
        }

        // DEL with the prevResult, twice: all gone, the agent forgets.
        for _ in 0..2 {
            exec(Some(&n.node), "DEL", &env_s, &checked)?.ok()?;
            let env_c = add_env(&cid_c, &pc, "IgnoreUnknown=1;K8S_POD_NAME=client");
            exec(Some(&n.node), "DEL", &env_c, &c)?.ok()?;
        }
        assert_eq!(links(&n.node)?, ["lo"]);
        assert_eq!(links(&server)?, ["lo"]);
        assert!(
            allocations(&n.ipam_dir()).is_empty(),
            "{:?}",
            allocations(&n.ipam_dir())
        );
        assert!(n.endpoints()?.is_empty(), "{:?}", n.endpoints()?);
    }
    Ok(())
}

/// ADD again for the same (container, ifname) into a new sandbox (the
/// runtime recreated it without DEL) gets the same address; GC then tears
/// down an attachment that is no longer valid: endpoint, veth, address.
#[test]
fn readd_keeps_the_address_and_gc_tears_down_stale_attachments() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let c = conf(
        "1.1.0",
        &n,
        "10.206.0.0/24",
        r#","rangeEnd":"10.206.0.3""#,
        "",
    );
    let (first, second, other) = (
        NetNs::new("pcpod")?,
        NetNs::new("pcpod")?,
        NetNs::new("pcpod")?,
    );
    let p1 = first.path().display().to_string();
    let r1 = exec(Some(&n.node), "ADD", &add_env("keep", &p1, ""), &c)?.ok()?;
    let p2 = second.path().display().to_string();
    let r2 = exec(Some(&n.node), "ADD", &add_env("keep", &p2, ""), &c)?.ok()?;
    assert_eq!(ip_of(&r1.json)?, ip_of(&r2.json)?);
    assert_eq!(
        links(&first)?,
        ["lo"],
        "the stale veth of the first sandbox is replaced"
    );
    let po = other.path().display().to_string();
    let ro = exec(Some(&n.node), "ADD", &add_env("gone", &po, ""), &c)?.ok()?;

    // The pool (.2 and .3) is full now: STATUS says so, ADD fails with 100.
    let full = exec(Some(&n.node), "STATUS", &[], &c)?;
    expect_error(&full, 50, "1.1.0")?;
    assert!(
        full.json["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("exhausted"),
        "{}",
        full.stdout
    );
    let spare = NetNs::new("pcpod")?;
    let ps = spare.path().display().to_string();
    expect_error(
        &exec(Some(&n.node), "ADD", &add_env("third", &ps, ""), &c)?,
        100,
        "1.1.0",
    )?;

    let gc = with_key(
        &c,
        "cni.dev/valid-attachments",
        r#"[{"containerID":"keep","ifname":"eth0"}]"#,
    );
    exec(Some(&n.node), "GC", &[("CNI_PATH", "/usr/lib/cni")], &gc)?.ok()?;
    let host_gone = ro.json["interfaces"][0]["name"]
        .as_str()
        .context("host if")?
        .to_string();
    let host_kept = r2.json["interfaces"][0]["name"]
        .as_str()
        .context("host if")?
        .to_string();
    let node_links = links(&n.node)?;
    assert!(
        !node_links.contains(&host_gone) && node_links.contains(&host_kept),
        "{node_links:?}"
    );
    assert_eq!(allocations(&n.ipam_dir()), [ip_of(&r2.json)?.to_string()]);
    let eps = n.endpoints()?;
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0].2, host_kept);
    exec(Some(&n.node), "STATUS", &[], &c)?.ok()?;
    exec(Some(&n.node), "DEL", &add_env("keep", &p2, ""), &c)?.ok()?;
    assert!(n.endpoints()?.is_empty());
    Ok(())
}

/// `ipam.type` other than "palisade": the plugin runs that IPAM plugin from
/// CNI_PATH (here the reference host-local) for ADD, CHECK and DEL.
#[test]
fn delegated_ipam_host_local() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let hl = n.dir.path().join("host-local");
    let c = format!(
        r#"{{"cniVersion":"1.0.0","name":"hlnet","type":"palisade","agentSocket":"{}",
            "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.207.0.0/24"}}]],"routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"{}"}}}}"#,
        n.socket().display(),
        hl.display()
    );
    let pod = NetNs::new("pcpod")?;
    let p = pod.path().display().to_string();
    let env = add_env("hl1", &p, "IgnoreUnknown=1;K8S_POD_NAME=hl");
    let r = exec(Some(&n.node), "ADD", &env, &c)?.ok()?;
    let ip = ip_of(&r.json)?;
    assert_eq!(r.json["ips"][0]["gateway"].as_str(), Some("10.207.0.1"));
    assert_eq!(allocations(&hl.join("hlnet")), [ip.to_string()]);
    assert!(n.endpoints()?.iter().any(|e| e.1 == ip));
    let checked = with_key(&c, "prevResult", r.stdout.trim());
    exec(Some(&n.node), "CHECK", &env, &checked)?.ok()?;
    exec(Some(&n.node), "DEL", &env, &checked)?.ok()?;
    assert!(
        allocations(&hl.join("hlnet")).is_empty(),
        "host-local released the address"
    );
    assert_eq!(links(&n.node)?, ["lo"]);
    // A plugin that is not in CNI_PATH: 102, nothing left.
    let missing = c.replace("host-local", "no-such-ipam");
    expect_error(&exec(Some(&n.node), "ADD", &env, &missing)?, 102, "1.0.0")?;
    assert_eq!(links(&pod)?, ["lo"]);
    assert!(n.endpoints()?.is_empty());
    Ok(())
}

/// Chained after the reference bridge + host-local plugins: palisade
/// creates nothing, finds the bridge's host veth (not the bridge), registers
/// it and passes prevResult on unchanged (converted to the config version).
#[test]
fn chained_after_bridge() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let bridge = format!("pcbr{}", std::process::id() % 100_000);
    let br_conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"brnet","type":"bridge","bridge":"{bridge}","isGateway":true,
            "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.208.0.0/24"}}]],"dataDir":"{}"}}}}"#,
        n.dir.path().join("hl").display()
    );
    let pod = NetNs::new("pcpod")?;
    let p = pod.path().display().to_string();
    let env = add_env(
        "ch1",
        &p,
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=front",
    );
    let prev = run_reference(&n.node, "/usr/lib/cni/bridge", "ADD", &env, &br_conf)?;
    let prev_json = serde_json::from_str::<Json>(&prev)?;
    let veth = prev_json["interfaces"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|i| i.get("sandbox").is_none())
        .filter_map(|i| i["name"].as_str())
        .find(|name| *name != bridge)
        .context("bridge result names a host veth")?
        .to_string();

    for v in ["1.0.0", "1.1.0"] {
        let chained = format!(
            r#"{{"cniVersion":"{v}","name":"brnet","type":"palisade","chained":true,"agentSocket":"{}"}}"#,
            n.socket().display()
        );
        let c = with_key(&chained, "prevResult", &prev);
        let out = exec(Some(&n.node), "ADD", &env, &c)?.ok()?;
        assert_eq!(out.json["cniVersion"].as_str(), Some(v));
        assert_eq!(out.json["ips"], prev_json["ips"]);
        assert_eq!(out.json["interfaces"], prev_json["interfaces"]);
        let eps = n.endpoints()?;
        assert_eq!(eps.len(), 1, "{eps:?}");
        assert_eq!(eps[0].0, "web/front");
        assert_eq!(eps[0].2, veth, "registered the veth, not the bridge");
        exec(Some(&n.node), "CHECK", &env, &c)?.ok()?;
        // DEL in chained mode only deregisters.
        exec(Some(&n.node), "DEL", &env, &c)?.ok()?;
        assert!(n.endpoints()?.is_empty());
        assert!(
            links(&n.node)?.contains(&veth),
            "chained DEL leaves the bridge's veth alone"
        );
    }
    // With a 0.4.0 config the same prevResult comes out in 0.4.0 form.
    let old = with_key(
        &format!(
            r#"{{"cniVersion":"0.4.0","name":"brnet","type":"palisade","chained":true,"agentSocket":"{}"}}"#,
            n.socket().display()
        ),
        "prevResult",
        &prev,
    );
    let out = exec(Some(&n.node), "ADD", &env, &old)?.ok()?;
    assert_eq!(out.json["cniVersion"].as_str(), Some("0.4.0"));
    assert_eq!(out.json["ips"][0]["version"].as_str(), Some("4"));
    exec(Some(&n.node), "DEL", &env, &old)?.ok()?;
    run_reference(&n.node, "/usr/lib/cni/bridge", "DEL", &env, &br_conf)?;
    Ok(())
}

/// A reference plugin run inside `node`, stdout on success.
fn run_reference(
    node: &NetNs,
    plugin: &str,
    command: &str,
    env: &[(&str, &str)],
    stdin: &str,
) -> Result<String> {
    use std::io::Write;
    let mut child = node
        .cmd(plugin)
        .envs(env.iter().copied())
        .env("CNI_COMMAND", command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8(out.stdout)?;
    ensure!(
        out.status.success(),
        "{plugin} {command}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}
