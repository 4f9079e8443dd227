//! Issue 15, the CNI part: the `palisade` plugin as a process with an IPv6
//! range beside the IPv4 one (dual-stack) or instead of it (IPv6-only),
//! against the real agent inside a node namespace. The datapath does not
//! police IPv6 yet: an unenforced pod's IPv6 passes, an enforced pod's is
//! dropped (but neighbour discovery); both are checked here on real veths.
use std::{fs, net::IpAddr};

use anyhow::{ensure, Context, Result};
use palisade_tests::{
    agent::write_manifest,
    cni::{allocations, exec, links, CniNode, Json, Outcome},
    require_root, NetNs,
};

const V4: &str = "10.215.0.0/24";
const V6: &str = "fd00:215::/64";
const GW4: &str = "10.215.0.1";
const GW6: &str = "fd00:215::1";

/// A palisade config whose built-in IPAM has `ipam` (JSON members).
fn conf(version: &str, n: &CniNode, ipam: &str, top_extra: &str) -> String {
    format!(
        r#"{{"cniVersion":"{version}","name":"dualnet","type":"palisade","agentSocket":"{}","agentTimeoutMs":30000{top_extra},
            "ipam":{{"type":"palisade","dataDir":"{}",{ipam}}}}}"#,
        n.socket().display(),
        n.ipam_dir().display()
    )
}

/// Dual-stack in host-local's `ranges` form.
fn dual_ipam() -> String {
    format!(r#""ranges":[[{{"subnet":"{V4}"}}],[{{"subnet":"{V6}","gateway":"{GW6}"}}]]"#)
}

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

fn expect_error(o: &Outcome, code: u64) -> Result<()> {
    ensure!(!o.status.success(), "expected failure: {}", o.stdout);
    ensure!(
        o.code() == Some(code),
        "expected code {code}, got {:?}: {} {}",
        o.code(),
        o.stdout,
        o.stderr
    );
    Ok(())
}

/// The result's address of each family, without the prefix.
fn ips(r: &Json) -> Vec<IpAddr> {
    r["ips"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

fn text(o: std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sysctl(ns: &NetNs, key: &str) -> Result<String> {
    let o = palisade_tests::run(ns.cmd("sysctl").args(["-n", key]))?;
    Ok(text(o).trim().to_string())
}

/// One ICMPv6 (or ICMP) echo from `ns` to `to`, busybox's ping.
fn pings(ns: &NetNs, to: &str) -> Result<bool> {
    let o = ns
        .cmd("busybox")
        .args(["ping", "-c", "1", "-W", "2", to])
        .output()
        .context("busybox ping")?;
    Ok(o.status.success())
}

/// The agent's endpoint on `host_if`: (ipv4, ipv6, what the datapath does
/// with its IPv6).
fn endpoint(n: &CniNode, host_if: &str) -> Result<Option<(String, Option<String>, String)>> {
    let st = n.agent.as_ref().context("agent")?.status()?;
    Ok(st
        .endpoints
        .into_iter()
        .find(|e| e.host_ifname == host_if)
        .map(|e| {
            (
                e.ipv4.to_string(),
                e.ipv6.map(|a| a.to_string()),
                e.ipv6_datapath.unwrap_or_default(),
            )
        }))
}

/// Dual-stack through ADD, CHECK, GC and DEL: both addresses in the result
/// (0.4.0 with `version` "6", 1.1.0 without), wired in the pod and on the
/// host, IPv6 on in the pod without router advertisements or
/// autoconfiguration and usable at once (no DAD), the registration carries
/// the IPv6 address, the pods reach their gateway and each other over IPv6
/// while no policy selects them and lose IPv6 (not IPv4) once one does.
#[test]
fn dual_stack_add_check_gc_del_and_ping6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let (a, b) = (NetNs::new("pcpod")?, NetNs::new("pcpod")?);
    let (pa, pb) = (
        a.path().display().to_string(),
        b.path().display().to_string(),
    );
    let c11 = conf("1.1.0", &n, &dual_ipam(), "");
    let env_a = add_env("dual-a", &pa, "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=server");
    let env_b = add_env("dual-b", &pb, "K8S_POD_NAMESPACE=prod;K8S_POD_NAME=client");
    let ra = exec(Some(&n.node), "ADD", &env_a, &c11)?.ok()?;
    // The other pod in the 0.4.0 dialect.
    let c04 = conf("0.4.0", &n, &dual_ipam(), "");
    let rb = exec(Some(&n.node), "ADD", &env_b, &c04)?.ok()?;

    // The result: both addresses on the container interface, with their
    // gateways, and a default route per family.
    let r = &ra.json;
    assert_eq!(r["ips"].as_array().map(Vec::len), Some(2), "{}", ra.stdout);
    let (ip4, ip6) = (ips(r)[0], ips(r)[1]);
    assert!(ip4.is_ipv4() && ip6.is_ipv6(), "{}", ra.stdout);
    assert!(r["ips"][1]["address"]
        .as_str()
        .unwrap_or_default()
        .ends_with("/64"));
    assert_eq!(r["ips"][0]["gateway"].as_str(), Some(GW4));
    assert_eq!(r["ips"][1]["gateway"].as_str(), Some(GW6));
    assert_eq!(r["ips"][1]["interface"].as_u64(), Some(1));
    assert!(r["ips"][1].get("version").is_none());
    let routes: Vec<(&str, &str)> = r["routes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|rt| {
            (
                rt["dst"].as_str().unwrap_or(""),
                rt["gw"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(routes, [("0.0.0.0/0", GW4), ("::/0", GW6)], "{}", ra.stdout);
    assert_eq!(
        rb.json["ips"][1]["version"].as_str(),
        Some("6"),
        "{}",
        rb.stdout
    );
    let ip6_b = ips(&rb.json)[1];
    assert_ne!(ip6, ip6_b);
    let host_a = r["interfaces"][0]["name"]
        .as_str()
        .context("host if")?
        .to_string();
    let host_b = rb.json["interfaces"][0]["name"]
        .as_str()
        .context("host if")?
        .to_string();

    // The pod: ip6/128 usable at once (not tentative), a link route to the
    // gateway and the default route via it; IPv6 on, no RA, no SLAAC.
    let addr6 = text(a.ip(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"])?);
    assert!(addr6.contains(&format!("{ip6}/128")), "{addr6}");
    assert!(!addr6.contains("tentative"), "{addr6}");
    let routes6 = text(a.ip(&["-6", "route"])?);
    assert!(routes6.contains(&format!("{GW6} dev eth0")), "{routes6}");
    assert!(
        routes6.contains(&format!("default via {GW6} dev eth0")),
        "{routes6}"
    );
    assert_eq!(sysctl(&a, "net.ipv6.conf.eth0.disable_ipv6")?, "0");
    assert_eq!(sysctl(&a, "net.ipv6.conf.eth0.accept_ra")?, "0");
    assert_eq!(sysctl(&a, "net.ipv6.conf.eth0.autoconf")?, "0");
    // The host: gateway/128 and a route to the pod's /128 on the host veth,
    // which takes no RA either; IPv6 forwarding on.
    let haddr = text(n.node.ip(&["-6", "-o", "addr", "show", "dev", &host_a])?);
    assert!(haddr.contains(&format!("{GW6}/128")), "{haddr}");
    let hroutes = text(n.node.ip(&["-6", "route"])?);
    assert!(
        hroutes.contains(&format!("{ip6} dev {host_a}")),
        "{hroutes}"
    );
    assert_eq!(
        sysctl(&n.node, &format!("net.ipv6.conf.{host_a}.accept_ra"))?,
        "0"
    );
    assert_eq!(
        sysctl(&n.node, &format!("net.ipv6.conf.{host_a}.autoconf"))?,
        "0"
    );
    assert_eq!(sysctl(&n.node, "net.ipv6.conf.all.forwarding")?, "1");

    // The agent has the IPv6 address, and says nothing enforces it yet.
    let (e4, e6, what) = endpoint(&n, &host_a)?.context("no endpoint for pod a")?;
    assert_eq!(e4, ip4.to_string());
    assert_eq!(e6, Some(ip6.to_string()));
    assert!(what.contains("not enforced"), "{what}");
    let (_, human) = n.agent.as_ref().context("agent")?.cli(&["status"])?;
    assert!(
        human.contains(&format!("IPv6 {ip6}: not enforced")),
        "{human}"
    );

    // Unenforced: the gateway and the other pod answer over IPv6 (and IPv4).
    ensure!(pings(&a, GW6)?, "pod a cannot ping6 its gateway {GW6}");
    ensure!(pings(&a, GW4)?, "pod a cannot ping its gateway {GW4}");
    ensure!(
        pings(&b, &ip6.to_string())?,
        "pod b cannot ping6 pod a at {ip6}"
    );

    // CHECK: both families; a lost IPv6 host route fails it (104).
    let checked = with_key(&c11, "prevResult", ra.stdout.trim());
    exec(Some(&n.node), "CHECK", &env_a, &checked)?.ok()?;
    n.node.ip(&["-6", "route", "del", &format!("{ip6}/128")])?;
    let o = exec(Some(&n.node), "CHECK", &env_a, &checked)?;
    expect_error(&o, 104)?;
    assert!(o.stdout.contains(&ip6.to_string()), "{}", o.stdout);
    n.node
        .ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_a])?;
    exec(Some(&n.node), "CHECK", &env_a, &checked)?.ok()?;
    // ... and so does a lost IPv6 address in the pod.
    a.ip(&["-6", "addr", "del", &format!("{ip6}/128"), "dev", "eth0"])?;
    expect_error(&exec(Some(&n.node), "CHECK", &env_a, &checked)?, 104)?;
    a.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip6}/128"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    a.ip(&[
        "-6", "route", "replace", "default", "via", GW6, "dev", "eth0",
    ])?;
    exec(Some(&n.node), "CHECK", &env_a, &checked)?.ok()?;

    // Once a policy selects pod a, its IPv6 is enforced as its IPv4 (and
    // status says so): b, which the policy admits, arrives over both.
    let manifests = n.dir.path().join("manifests");
    write_manifest(
        &manifests,
        "policy.yaml",
        r#"apiVersion: v1
kind: Pod
metadata: {name: server, namespace: prod, labels: {app: server}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: prod, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-prod, namespace: prod}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {}}]}]
"#,
    )?;
    n.agent.as_ref().context("agent")?.sync()?;
    let (_, _, what) = endpoint(&n, &host_a)?.context("endpoint a")?;
    assert!(what.contains("enforced as IPv4"), "{what}");
    ensure!(pings(&b, &ip4.to_string())?, "the policy admits b's IPv4");
    ensure!(
        pings(&b, &ip6.to_string())?,
        "the same policy admits b's IPv6"
    );
    // verify probes both families through the kernel's own verdict path
    // (the IPv6 half by tail call) and agrees with the model.
    let (ok, out) = n
        .agent
        .as_ref()
        .context("agent")?
        .cli(&["verify", "-o", "json"])?;
    let r: palisade_api::VerifyReport = serde_json::from_str(&out).context(out.clone())?;
    ensure!(ok && r.mismatches.is_empty(), "verify: {out}");
    ensure!(r.probes > 0, "{out}");

    // GC: b is not a valid attachment any more; both its addresses, its
    // veth and its endpoint go.
    let all: Vec<String> = [ip4, ip6, ips(&rb.json)[0], ip6_b]
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut held = allocations(&n.ipam_dir());
    held.sort();
    let mut want = all.clone();
    want.sort();
    assert_eq!(held, want);
    let gc = with_key(
        &c11,
        "cni.dev/valid-attachments",
        r#"[{"containerID":"dual-a","ifname":"eth0"}]"#,
    );
    exec(Some(&n.node), "GC", &[("CNI_PATH", "/usr/lib/cni")], &gc)?.ok()?;
    let mut held = allocations(&n.ipam_dir());
    held.sort();
    let mut want = vec![ip4.to_string(), ip6.to_string()];
    want.sort();
    assert_eq!(held, want);
    assert!(!links(&n.node)?.contains(&host_b));
    assert!(endpoint(&n, &host_b)?.is_none());

    // DEL: everything of a goes, twice.
    for _ in 0..2 {
        exec(Some(&n.node), "DEL", &env_a, &checked)?.ok()?;
    }
    assert_eq!(links(&n.node)?, ["lo"]);
    assert!(allocations(&n.ipam_dir()).is_empty());
    assert!(n
        .agent
        .as_ref()
        .context("agent")?
        .status()?
        .endpoints
        .is_empty());
    Ok(())
}

/// IPv6-only (issue 15): ADD registers the pod with its IPv6 address only
/// (IPv4 address 0 in the endpoint: no IPv4 from it passes the source
/// check), in both IPAM dialects; DEL leaves nothing behind.
#[test]
fn ipv6_only_registers_and_del_cleans_up() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let pod = NetNs::new("pcpod")?;
    let p = pod.path().display().to_string();
    for ipam in [
        format!(r#""subnet":"{V6}""#),
        format!(r#""ranges":[[{{"subnet":"{V6}"}}]]"#),
    ] {
        let c = conf("1.0.0", &n, &ipam, "");
        let env = add_env("v6only", &p, "");
        let o = exec(Some(&n.node), "ADD", &env, &c)?.ok()?;
        let got = ips(&o.json);
        assert!(got.len() == 1 && got[0].is_ipv6(), "{}", o.stdout);
        let host = o.json["interfaces"][0]["name"]
            .as_str()
            .context("host if")?
            .to_string();
        let (v4, v6, _) = endpoint(&n, &host)?.context("registered")?;
        assert_eq!(v4, "0.0.0.0");
        assert_eq!(v6, Some(got[0].to_string()));
        for _ in 0..2 {
            exec(Some(&n.node), "DEL", &env, &c)?.ok()?;
        }
        assert_eq!(links(&n.node)?, ["lo"]);
        assert!(allocations(&n.ipam_dir()).is_empty());
        assert!(n
            .agent
            .as_ref()
            .context("agent")?
            .status()?
            .endpoints
            .is_empty());
    }
    Ok(())
}

/// A malformed IPv6 range is a config error (7) naming the key, before
/// anything is touched.
#[test]
fn a_malformed_ipv6_range_is_code_7_and_says_where() -> Result<()> {
    let dir = palisade_tests::agent::TempDir::new("palisade-cni-")?;
    let env = add_env("c1", "/nonexistent/netns", "");
    for (ranges, says) in [
        (
            r#"[[{"subnet":"10.215.0.0/24"}],[{"subnet":"fd00:215::/129"}]]"#,
            "ipam.ranges[1][0].subnet",
        ),
        (r#"[[{"subnet":"fd00:215::7/64"}]]"#, "host bits"),
        (
            r#"[[{"subnet":"fd00:215::/64","gateway":"fd00:216::1"}]]"#,
            "gateway",
        ),
        (
            r#"[[{"subnet":"fd00:215::/64"}],[{"subnet":"fd00:216::/64"}]]"#,
            "second IPv6 range",
        ),
    ] {
        let c = format!(
            r#"{{"cniVersion":"1.1.0","name":"dualnet","type":"palisade","agentSocket":"/nonexistent",
                "ipam":{{"type":"palisade","dataDir":"{}","ranges":{ranges}}}}}"#,
            dir.path().display()
        );
        let o = exec(None, "ADD", &env, &c)?;
        expect_error(&o, 7)?;
        let msg = o.json["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{ranges}: {msg}");
        assert_eq!(o.json["cniVersion"].as_str(), Some("1.1.0"));
    }
    assert!(allocations(dir.path()).is_empty());
    Ok(())
}

/// The IPv6 range runs out while IPv4 has room: code 100 naming the IPv6
/// range, and the IPv4 address taken for the pod is given back.
#[test]
fn an_exhausted_ipv6_range_is_code_100_and_keeps_no_ipv4_address() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::new()?;
    let pod = NetNs::new("pcpod")?;
    fs::create_dir_all(n.ipam_dir())?;
    // fd00:215::1 is the gateway, ::2 the only address, held by another pod.
    fs::write(n.ipam_dir().join("fd00:215::2"), "other\neth0")?;
    let ipam =
        format!(r#""subnet":"{V4}","ranges":[[{{"subnet":"{V6}","rangeEnd":"fd00:215::2"}}]]"#);
    let c = conf("1.1.0", &n, &ipam, "");
    let p = pod.path().display().to_string();
    let o = exec(Some(&n.node), "ADD", &add_env("c1", &p, ""), &c)?;
    expect_error(&o, 100)?;
    let msg = o.json["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("exhausted") && msg.contains(V6), "{msg}");
    assert_eq!(allocations(&n.ipam_dir()), ["fd00:215::2"]);
    assert_eq!(links(&n.node)?, ["lo"]);
    assert_eq!(links(&pod)?, ["lo"]);
    // STATUS says so too (the agent is not running: 50 either way, but
    // the pool is checked only once the agent answers; see cni_spec.rs).
    Ok(())
}

/// Delegated IPAM: host-local with an IPv4 and an IPv6 range set; the
/// plugin wires and registers both addresses (also on a node whose new
/// interfaces start with IPv6 off), CHECK and DEL go through host-local
/// too.
#[test]
fn delegated_host_local_dual_stack() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    // A node whose new interfaces start with IPv6 off: the host veth still
    // gets the IPv6 gateway.
    n.node.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    let hl = n.dir.path().join("host-local");
    let c = format!(
        r#"{{"cniVersion":"1.0.0","name":"hldual","type":"palisade","agentSocket":"{}",
            "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.217.0.0/24"}}],[{{"subnet":"fd00:217::/64"}}]],
                     "routes":[{{"dst":"0.0.0.0/0"}},{{"dst":"::/0"}}],"dataDir":"{}"}}}}"#,
        n.socket().display(),
        hl.display()
    );
    let pod = NetNs::new("pcpod")?;
    let p = pod.path().display().to_string();
    let env = add_env("hl6", &p, "IgnoreUnknown=1;K8S_POD_NAME=hl");
    let r = exec(Some(&n.node), "ADD", &env, &c)?.ok()?;
    let got = ips(&r.json);
    assert_eq!(got.len(), 2, "{}", r.stdout);
    assert_eq!(r.json["ips"][1]["gateway"].as_str(), Some("fd00:217::1"));
    let host_if = r.json["interfaces"][0]["name"]
        .as_str()
        .context("host if")?
        .to_string();
    let (_, e6, _) = endpoint(&n, &host_if)?.context("endpoint")?;
    assert_eq!(e6, Some(got[1].to_string()));
    let routes6 = text(pod.ip(&["-6", "route"])?);
    assert!(
        routes6.contains("default via fd00:217::1 dev eth0"),
        "{routes6}"
    );
    // The first echo right after ADD: in this fresh node namespace the
    // host veth and the pod's eth0 have the same ifindex, so the kernel
    // defers the host end's link-up by up to a second, and IPv6 on it
    // (the multicast route a neighbour solicitation for the gateway needs)
    // with it. ADD waits for it (`settle`); without that, this echo went
    // unanswered about half the time.
    ensure!(pings(&pod, "fd00:217::1")?, "ping6 to host-local's gateway");
    let checked = with_key(&c, "prevResult", r.stdout.trim());
    exec(Some(&n.node), "CHECK", &env, &checked)?.ok()?;
    exec(Some(&n.node), "DEL", &env, &checked)?.ok()?;
    assert_eq!(links(&n.node)?, ["lo"]);
    assert!(n
        .agent
        .as_ref()
        .context("agent")?
        .status()?
        .endpoints
        .is_empty());
    Ok(())
}

/// Chained after the reference bridge + host-local with an IPv4 and an
/// IPv6 range set: palisade registers the bridge's veth with both of
/// prevResult's addresses and passes prevResult on unchanged.
#[test]
fn chained_after_a_dual_stack_bridge_registers_both_addresses() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let bridge = format!("pc6br{}", std::process::id() % 100_000);
    let br_conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"br6net","type":"bridge","bridge":"{bridge}","isGateway":true,
            "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.218.0.0/24"}}],[{{"subnet":"fd00:218::/64"}}]],"dataDir":"{}"}}}}"#,
        n.dir.path().join("hl").display()
    );
    let pod = NetNs::new("pcpod")?;
    let p = pod.path().display().to_string();
    let env = add_env(
        "ch6",
        &p,
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=front",
    );
    let prev = run_reference(&n.node, "/usr/lib/cni/bridge", "ADD", &env, &br_conf)?;
    let prev_json: Json = serde_json::from_str(&prev)?;
    let want = ips(&prev_json);
    assert_eq!(want.len(), 2, "{prev}");
    let chained = format!(
        r#"{{"cniVersion":"1.1.0","name":"br6net","type":"palisade","chained":true,"agentSocket":"{}"}}"#,
        n.socket().display()
    );
    let c = with_key(&chained, "prevResult", &prev);
    let out = exec(Some(&n.node), "ADD", &env, &c)?.ok()?;
    assert_eq!(out.json["ips"], prev_json["ips"]);
    let st = n.agent.as_ref().context("agent")?.status()?;
    assert_eq!(st.endpoints.len(), 1, "{:?}", st.endpoints);
    let e = &st.endpoints[0];
    assert_eq!(IpAddr::V4(e.ipv4), want[0]);
    assert_eq!(e.ipv6.map(IpAddr::V6), Some(want[1]));
    exec(Some(&n.node), "CHECK", &env, &c)?.ok()?;
    exec(Some(&n.node), "DEL", &env, &c)?.ok()?;
    assert!(n
        .agent
        .as_ref()
        .context("agent")?
        .status()?
        .endpoints
        .is_empty());
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
