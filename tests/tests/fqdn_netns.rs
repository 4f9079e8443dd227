//! Egress by domain name (issue 16) on real packets: a pod whose
//! ClusterNetworkPolicy allows names resolves them through a DNS server
//! pod and connects at once. The datapath holds each answer until the
//! agent has programmed its addresses, so the first connection after a
//! lookup is never dropped; TCP answers split over segments, CNAME chains
//! and TTL expiry are learned right; a pod no domain rule selects is left
//! alone; learned addresses survive an agent restart.
use std::{
    net::{Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use palisade_tests::{agent::*, fqdn::*, *};

const GW: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 2);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 3);
const LAB: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 4);
/// External hosts, in a namespace behind the node.
const EXT_GW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const API: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ADS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
const IMG: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 30);
const EDGE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);
const SHORT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
const PORT: u16 = 443;

/// (name, ttl, A address or CNAME target).
const RECORDS: Zone = &[
    ("api.example.com", 300, Rec::A(API)),
    ("ads.tracker.example", 30, Rec::A(ADS)),
    ("img.cdn.example", 30, Rec::A(IMG)),
    ("www.example.org", 300, Rec::Cname("edge.provider.example")),
    ("edge.provider.example", 300, Rec::A(EDGE)),
    ("short.example.com", 1, Rec::A(SHORT)),
];

const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: c, ports: [{containerPort: 53, protocol: UDP}, {containerPort: 53, protocol: TCP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: box, namespace: lab, labels: {app: box}}
spec: {containers: [{name: c}]}
"#;

const POLICIES: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: shop-egress}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: shop}}}
  egress:
    - name: dns
      action: Accept
      to: [{pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}}]
      protocols: [{udp: {destinationPort: {number: 53}}}, {tcp: {destinationPort: {number: 53}}}]
    - name: partners
      action: Accept
      to: [{domainNames: [api.example.com, "*.cdn.example", www.example.org, short.example.com]}]
      protocols: [{tcp: {destinationPort: {number: 443}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: shop-default-deny}
spec:
  tier: Baseline
  priority: 10
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: shop}}}
  egress:
    - {name: rest, action: Deny, to: [{networks: [0.0.0.0/0]}]}
"#;

/// Resolve and connect on PORT, from `ns`.
fn resolve_and_connect(ns: &NetNs, name: &'static str, tcp: bool) -> Result<(Vec<Ipv4Addr>, bool)> {
    let l = lookup_and_connect(ns, DNS, name, tcp, PORT)?;
    Ok((l.addresses, l.connected))
}

const METRICS: &str = "127.0.0.1:19971";

#[test]
fn domain_names_are_learned_before_the_answer_reaches_the_pod() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let scratch = Scratch::new(
        "palisade-fqdn-",
        &[
            ("namespaces.yaml", NAMESPACES),
            ("cluster.yaml", CLUSTER),
            ("policies.yaml", POLICIES),
        ],
    )?;
    let mut node = Node::new(GW)?;
    for ip in [CLIENT, DNS, LAB] {
        node.add_pod(ip)?;
    }
    let _ext = external(&node.ns, EXT_GW, &[API, ADS, IMG, EDGE, SHORT], PORT)?;
    dns_server(&node.pods[1].ns, RECORDS)?;
    let mut agent = scratch.agent(&node.ns, &["--metrics-addr", METRICS, "--dns-min-ttl", "1"])?;
    agent.register("shop", "client", &node.pods[0])?;
    agent.register("kube-system", "coredns", &node.pods[1])?;
    agent.register("lab", "box", &node.pods[2])?;
    let (client, lab) = (&node.pods[0].ns, &node.pods[2].ns);

    // Nothing resolved yet: the allowed address is closed.
    assert!(!tcp_connects(client, API, PORT, 500)?, "not learned yet");
    // The first connection right after each lookup passes, every time.
    for i in 0..20 {
        let (addrs, ok) = resolve_and_connect(client, "api.example.com", false)?;
        assert_eq!(addrs, [API]);
        assert!(
            ok,
            "lookup {i}: the connection after the answer was dropped"
        );
    }
    // A name no rule names resolves (DNS is allowed) but stays closed.
    let (addrs, ok) = resolve_and_connect(client, "ads.tracker.example", false)?;
    assert_eq!(addrs, [ADS]);
    assert!(!ok, "ads.tracker.example is not allowed");
    // An answer over TCP, split over two segments; a wildcard.
    let (addrs, ok) = resolve_and_connect(client, "img.cdn.example", true)?;
    assert_eq!(addrs, [IMG]);
    assert!(ok, "an answer over TCP was not learned");
    // A CNAME chain: the rule names the alias, the address is the target's.
    let (addrs, ok) = resolve_and_connect(client, "www.example.org", false)?;
    assert_eq!(addrs, [EDGE]);
    assert!(
        ok,
        "the CNAME chain's address was not learned for the alias"
    );
    // A pod no domain rule selects: its answers are not held, nothing is
    // restricted.
    let (addrs, ok) = resolve_and_connect(lab, "ads.tracker.example", false)?;
    assert_eq!((addrs.as_slice(), ok), (&[ADS][..], true));

    // TTL: a 1 s answer. While a connection uses the address it stays;
    // once none does, it expires.
    let (_, ok) = resolve_and_connect(client, "short.example.com", false)?;
    assert!(ok);
    let mut open = client
        .enter(|| TcpStream::connect_timeout(&(SHORT, PORT).into(), Duration::from_secs(1)))??;
    open.set_read_timeout(Some(Duration::from_secs(1)))?;
    std::thread::sleep(Duration::from_millis(3500));
    echo(&mut open, 7).context("an open connection was cut when its address expired")?;
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if !tcp_connects(client, SHORT, PORT, 300)? {
            break;
        }
        if Instant::now() > deadline {
            bail!("short.example.com never expired");
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // Metrics: answers held, none released early.
    let text = http_get(&node.ns, METRICS, "/metrics")?;
    assert!(
        metric(&text, "palisade_dns_answers_held_total") >= 23,
        "{text}"
    );
    assert_eq!(
        metric(&text, "palisade_dns_hold_timeouts_total"),
        0,
        "{text}"
    );
    assert!(
        metric(&text, "palisade_dns_addresses_learned_total") >= 4,
        "{text}"
    );

    // Explanations: the record names the rule and the name, observe
    // filters by name, trace follows the name, status lists it.
    let rec = agent.wait_flow(|r| r.verdict == "ALLOW" && r.dst.ip == API)?;
    assert_eq!(rec.domains, ["api.example.com"]);
    assert_eq!(
        rec.policies,
        ["ClusterNetworkPolicy/shop-egress rule partners (Admin tier, Accept)"]
    );
    let (ok, out) = agent.cli(&["observe", "--domain", "API.example.com."])?;
    assert!(ok && out.contains("domain: api.example.com"), "{out}");
    assert!(!out.contains("192.0.2.40"), "{out}");
    let (ok, out) = agent.cli(&[
        "trace",
        "--from",
        "shop/client",
        "--to-domain",
        "www.example.org",
        "--port",
        "443/TCP",
    ])?;
    assert!(
        ok && out.contains("192.0.2.40") && out.contains("rule partners"),
        "{out}"
    );
    let (ok, out) = agent.cli(&[
        "trace",
        "--from",
        "shop/client",
        "--to-domain",
        "never.example.com",
        "--port",
        "443/TCP",
    ])?;
    assert!(!ok && out.contains("no address learned"), "{out}");
    let st = agent.status()?;
    let names: Vec<&str> = st.domains.iter().map(|d| d.name.as_str()).collect();
    assert!(names.contains(&"api.example.com"), "{names:?}");
    assert!(
        !names.contains(&"edge.provider.example"),
        "only names a pattern matches are kept: {names:?}"
    );

    // A restart keeps what was learned (within its TTL): no new lookup.
    agent.kill9()?;
    agent.spawn()?;
    agent.sync()?;
    assert!(
        tcp_connects(client, API, PORT, 1000)?,
        "learned addresses lost on restart"
    );
    assert!(
        !tcp_connects(client, ADS, PORT, 500)?,
        "a restart opened what was closed"
    );
    Ok(())
}
