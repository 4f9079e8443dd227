//! 100 ADDs at once against one pool of exactly 100 addresses, then 100
//! DELs at once: every pod gets its own address, and afterwards no address,
//! interface or endpoint is left. Without an agent, 100 concurrent ADDs all
//! fail and roll back completely.
use std::{collections::BTreeSet, net::Ipv4Addr, thread};

use anyhow::{ensure, Context, Result};
use palisade_tests::{
    cni::{allocations, exec, links, CniNode, Outcome},
    require_root, NetNs,
};

const PODS: usize = 100;

fn conf(n: &CniNode) -> String {
    // .1 is the gateway; .2-.101 are exactly PODS addresses.
    format!(
        r#"{{"cniVersion":"1.1.0","name":"concnet","type":"palisade","agentSocket":"{}","agentTimeoutMs":120000,
            "ipam":{{"type":"palisade","subnet":"10.210.0.0/24","rangeStart":"10.210.0.2","rangeEnd":"10.210.0.101","dataDir":"{}"}}}}"#,
        n.socket().display(),
        n.ipam_dir().display()
    )
}

/// Runs `command` for every pod at once; outcomes in pod order.
fn all_at_once(n: &CniNode, pods: &[NetNs], command: &'static str) -> Result<Vec<Outcome>> {
    let conf = conf(n);
    thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let conf = &conf;
                s.spawn(move || {
                    let cid = format!("conc{i:03}");
                    let netns = pod.path().display().to_string();
                    let name = format!("K8S_POD_NAME=pod{i}");
                    let env = [
                        ("CNI_CONTAINERID", cid.as_str()),
                        ("CNI_NETNS", netns.as_str()),
                        ("CNI_IFNAME", "eth0"),
                        ("CNI_ARGS", name.as_str()),
                    ];
                    exec(Some(&n.node), command, &env, conf)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("runner thread"))
            .collect()
    })
}

fn pods() -> Result<Vec<NetNs>> {
    (0..PODS).map(|_| NetNs::new("pcc")).collect()
}

fn assert_nothing_left(n: &CniNode, pods: &[NetNs]) -> Result<()> {
    ensure!(
        allocations(&n.ipam_dir()).is_empty(),
        "leaked addresses: {:?}",
        allocations(&n.ipam_dir())
    );
    let node_links = links(&n.node)?;
    ensure!(
        node_links == ["lo"],
        "leaked host interfaces: {node_links:?}"
    );
    for p in pods {
        let l = links(p)?;
        ensure!(l == ["lo"], "leaked pod interface in {}: {l:?}", p.name);
    }
    Ok(())
}

#[test]
fn hundred_concurrent_adds_then_dels() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::with_agent()?;
    let pods = pods()?;

    let added = all_at_once(&n, &pods, "ADD")?;
    let mut ips = BTreeSet::new();
    let mut host_ifs = BTreeSet::new();
    for (i, o) in added.iter().enumerate() {
        ensure!(o.status.success(), "ADD {i}: {} {}", o.stdout, o.stderr);
        let addr = o.json["ips"][0]["address"].as_str().context("address")?;
        let ip: Ipv4Addr = addr.split('/').next().unwrap_or_default().parse()?;
        ensure!(ips.insert(ip), "address {ip} handed out twice");
        host_ifs.insert(
            o.json["interfaces"][0]["name"]
                .as_str()
                .context("host if")?
                .to_string(),
        );
    }
    assert_eq!(ips.len(), PODS);
    assert_eq!(host_ifs.len(), PODS);
    let on_disk: BTreeSet<Ipv4Addr> = allocations(&n.ipam_dir())
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(
        on_disk, ips,
        "the store holds exactly the addresses handed out"
    );
    let node_links: BTreeSet<String> = links(&n.node)?.into_iter().filter(|l| l != "lo").collect();
    assert_eq!(node_links, host_ifs);
    let eps = n.endpoints()?;
    assert_eq!(eps.len(), PODS, "the agent has every pod");
    assert_eq!(eps.iter().map(|e| e.1).collect::<BTreeSet<_>>(), ips);

    // The pool is full: one more ADD is refused and leaves nothing.
    let extra = NetNs::new("pcc")?;
    let netns = extra.path().display().to_string();
    let env = [
        ("CNI_CONTAINERID", "extra"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let o = exec(Some(&n.node), "ADD", &env, &conf(&n))?;
    assert_eq!(o.code(), Some(100), "{}", o.stdout);
    assert_eq!(links(&extra)?, ["lo"]);

    for (i, o) in all_at_once(&n, &pods, "DEL")?.iter().enumerate() {
        ensure!(o.status.success(), "DEL {i}: {} {}", o.stdout, o.stderr);
    }
    assert_nothing_left(&n, &pods)?;
    assert!(n.endpoints()?.is_empty(), "{:?}", n.endpoints()?);
    Ok(())
}

#[test]
fn hundred_concurrent_adds_without_agent_roll_back() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n = CniNode::new()?;
    let pods = pods()?;
    for (i, o) in all_at_once(&n, &pods, "ADD")?.iter().enumerate() {
        ensure!(
            o.code() == Some(11),
            "ADD {i} without agent: {} {}",
            o.stdout,
            o.stderr
        );
    }
    assert_nothing_left(&n, &pods)
}
