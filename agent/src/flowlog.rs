//! Verdict events -> flow records: JSON lines naming pods, namespaces,
//! labels and the policies that allowed or denied, written to a rotated
//! file and streamed to `palisade-agent observe` over a local socket.
use std::{
    collections::{BTreeMap, VecDeque},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use palisade_common::{
    reason, FlowEvent, DIR_EGRESS, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD, PROTO_ICMP,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_AUDIT,
};
use palisade_dataplane::maps::{from_be, monotonic_ns};
use serde::{Deserialize, Serialize};

use crate::{
    compiler::{IdentitySource, Names},
    model::Labels,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// IPv4, or IPv6 for an event of family 6.
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// pod, host, remote-node, world or cidr
    pub kind: String,
    /// The node the peer is on: a `remote-node` peer's own; a pod's (a
    /// local pod: this node; another: by the nodes' pod ranges); `host`:
    /// this node. None when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    pub identity: u32,
}

impl Default for Peer {
    fn default() -> Self {
        Self {
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: None,
            kind: String::new(),
            node: None,
            namespace: None,
            pod: None,
            labels: Labels::new(),
            identity: 0,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub time: String,
    /// ALLOW, DROP or AUDIT
    pub verdict: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// ingress or egress, relative to `endpoint`
    pub direction: String,
    pub protocol: String,
    pub src: Peer,
    pub dst: Peer,
    /// The pod whose policy decided (namespace/name).
    pub endpoint: String,
    /// The node whose agent recorded the verdict (its configured name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Policies that allowed the flow, or that isolate the endpoint and
    /// had no rule for it.
    pub policies: Vec<String>,
    /// The Service (namespace/name) of a flow sent to its ClusterIP and
    /// translated in the kernel; `dst` is then the backend it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// That Service's ClusterIP:port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_address: Option<String>,
    /// ClusterNetworkPolicy Pass rules the flow went through, in order,
    /// before what `policies` names decided it (e.g. passed by an Admin
    /// rule, decided by a NetworkPolicy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed: Vec<String>,
    /// The tier whose rule decided: "Admin", "NetworkPolicy", "Baseline",
    /// or "default" (no tier decided: allowed); absent for verdicts no
    /// policy made (conntrack, host, malformed packets, unenforced).
    /// The domain names the remote address was learned for (egress by
    /// domain name): what a `domainNames` rule allowed it as.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// "Accept" or "Deny" (a would-be deny in audit mode too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The tiers of `passed`, for the metrics (not written).
    #[serde(skip)]
    pub passed_tiers: Vec<&'static str>,
    /// Events of the same endpoint the kernel left out (over the
    /// endpoint's event budget, `palisade_common::event_limit`) before this
    /// one: "N more drops" of a flood this record stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<Suppressed>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Suppressed {
    /// Drop records left out, and their reasons.
    pub drops: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop_reasons: Vec<String>,
    /// Other records (new flows) left out.
    pub flows: u32,
}

/// The `suppressed` part of a record, if the event carries any.
pub fn suppressed(e: &FlowEvent) -> Option<Suppressed> {
    if e.suppressed_drops == 0 && e.suppressed_flows == 0 {
        return None;
    }
    Some(Suppressed {
        drops: e.suppressed_drops,
        drop_reasons: (0..64u8)
            .filter(|r| e.suppressed_reasons & (1u64 << r) != 0)
            .map(|r| reason::name(r).to_string())
            .collect(),
        flows: e.suppressed_flows,
    })
}

/// `tier` / `action` values and the metric's labels.
pub mod decision {
    pub const ADMIN: &str = "Admin";
    pub const NETWORK_POLICY: &str = "NetworkPolicy";
    pub const BASELINE: &str = "Baseline";
    pub const DEFAULT: &str = "default";
    pub const ACCEPT: &str = "Accept";
    pub const DENY: &str = "Deny";
    pub const PASS: &str = "Pass";

    pub fn tier_name(t: crate::compiler::cluster::Tier) -> &'static str {
        match t {
            crate::compiler::cluster::Tier::Admin => ADMIN,
            crate::compiler::cluster::Tier::Baseline => BASELINE,
        }
    }
}

pub fn protocol_name(p: u8) -> String {
    match p {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        PROTO_ICMP => "ICMP".into(),
        58 => "ICMPv6".into(),
        0 => "none".into(),
        n => format!("proto-{n}"),
    }
}

/// Wall-clock time of a bpf_ktime_get_ns() stamp.
fn wall_time(ts_ns: u64) -> SystemTime {
    let now_mono = monotonic_ns();
    let ago = Duration::from_nanos(now_mono.saturating_sub(ts_ns));
    SystemTime::now() - ago
}

/// An IPv6 peer: a pod by its ipcache6 address, else by its identity
/// (IPv6 node addresses are not known to the agent yet).
fn peer6<N: Names + ?Sized>(
    view: &N,
    ip: std::net::Ipv6Addr,
    port: Option<u16>,
    identity: u32,
) -> Peer {
    let mut p = Peer {
        ip: IpAddr::V6(ip),
        port,
        identity,
        ..Default::default()
    };
    if let Some(pod) = view.pod_at6(ip) {
        p.kind = "pod".into();
        p.namespace = Some(pod.key.namespace.to_string());
        p.pod = Some(pod.key.name.to_string());
        p.labels = pod.labels.clone();
        p.node = view
            .local_endpoint_of(pod.key)
            .and_then(|_| view.node_name())
            .map(str::to_string);
        return p;
    }
    p.kind = match (identity, view.identity(identity)) {
        (IDENTITY_HOST, _) => "host",
        (IDENTITY_REMOTE_NODE, _) => "remote-node",
        (_, Some(IdentitySource::Cidr(_))) => "cidr",
        _ => "world",
    }
    .into();
    if p.kind == "host" {
        p.node = view.node_name().map(str::to_string);
    }
    p
}

fn peer<N: Names + ?Sized>(view: &N, ip: Ipv4Addr, port: Option<u16>, identity: u32) -> Peer {
    let mut p = Peer {
        ip: IpAddr::V4(ip),
        port,
        identity,
        ..Default::default()
    };
    if let Some(pod) = view.pod_at(ip) {
        p.kind = "pod".into();
        p.namespace = Some(pod.key.namespace.to_string());
        p.pod = Some(pod.key.name.to_string());
        p.labels = pod.labels.clone();
        p.node = if view.local_endpoint_at(ip).is_some() {
            view.node_name()
        } else {
            view.pod_node_name(ip)
        }
        .map(str::to_string);
        return p;
    }
    if identity == IDENTITY_REMOTE_NODE {
        p.kind = "remote-node".into();
        p.node = view.remote_node_name(ip).map(str::to_string);
        return p;
    }
    p.kind = match (identity, view.identity(identity)) {
        (IDENTITY_HOST, _) => "host",
        (IDENTITY_WORLD, _) => "world",
        (_, Some(IdentitySource::Cidr(_))) => "cidr",
        _ if view.is_host_ip(ip) => "host",
        _ => "world",
    }
    .into();
    if p.kind == "host" {
        p.node = view.node_name().map(str::to_string);
    }
    p
}

/// Turn one kernel event into a record, naming what the view knows.
pub fn record<N: Names + ?Sized>(view: &N, e: &FlowEvent) -> FlowRecord {
    let has_ports = matches!(e.protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP);
    let port = |p: u16| has_ports.then_some(u16::from_be(p));
    let (src, dst) = if e.family == 6 {
        let a = palisade_dataplane::maps::from_ip6_words;
        (
            peer6(view, a(e.saddr6), port(e.sport_be), e.src_identity),
            peer6(view, a(e.daddr6), port(e.dport_be), e.dst_identity),
        )
    } else {
        (
            peer(view, from_be(e.saddr), port(e.sport_be), e.src_identity),
            peer(view, from_be(e.daddr), port(e.dport_be), e.dst_identity),
        )
    };
    let endpoint = view
        .endpoint_by_id(e.endpoint_id)
        .map(|le| le.key.to_string())
        .unwrap_or_else(|| format!("endpoint-{}", e.endpoint_id));
    let mut policies: Vec<String> = Vec::new();
    use crate::compiler::tiers::{COOKIE_DEFAULT_ALLOW, COOKIE_NP_ISOLATION};
    use decision::*;
    let mut decided: Option<(&str, &str)> = None;
    if let Some(r) = view.cookie(e.cookie) {
        policies.push(r.policy.to_string());
        decided = Some((NETWORK_POLICY, ACCEPT));
    } else if let Some(r) = view.cluster_cookie(e.cookie) {
        // "ClusterNetworkPolicy/<name> rule <rule> (<tier> tier, <action>)"
        policies.push(r.to_string());
        let action = match r.action {
            crate::compiler::cluster::Action::Accept => ACCEPT,
            _ => DENY,
        };
        decided = Some((tier_name(r.tier), action));
    } else if e.cookie == COOKIE_DEFAULT_ALLOW && e.cookie != 0 {
        policies.push("baseline default (no tier decided)".into());
        decided = Some((DEFAULT, ACCEPT));
    } else if e.reason == reason::NO_POLICY_MATCH || e.cookie == COOKIE_NP_ISOLATION {
        policies = view
            .isolating(e.endpoint_id, e.direction)
            .iter()
            .map(|k| k.to_string())
            .collect();
        decided = Some((NETWORK_POLICY, DENY));
    }
    // A Pass chain is possible only when no Admin rule decided.
    let passed = if view
        .cluster_cookie(e.cookie)
        .is_some_and(|r| r.tier == crate::compiler::cluster::Tier::Admin)
        || e.cookie == 0
    {
        Vec::new()
    } else {
        let remote = if e.direction == DIR_EGRESS {
            dst.ip
        } else {
            src.ip
        };
        match remote {
            IpAddr::V4(remote) => view.cluster_passed(
                e.endpoint_id,
                e.direction,
                remote,
                (e.protocol, dst.port.unwrap_or(0)),
                e.cookie,
            ),
            // The tier walk resolves IPv4 peers only: no pass chain shown.
            IpAddr::V6(_) => Vec::new(),
        }
    };
    let passed_tiers = passed.iter().map(|r| tier_name(r.tier)).collect();
    let passed = passed.iter().map(|r| r.to_string()).collect();
    let verdict = match e.verdict {
        VERDICT_ALLOW => "ALLOW",
        VERDICT_AUDIT => "AUDIT",
        _ => "DROP",
    };
    FlowRecord {
        time: humantime::format_rfc3339_micros(wall_time(e.ts_ns)).to_string(),
        verdict: verdict.into(),
        reason: reason::name(e.reason).into(),
        drop_reason: reason::is_drop(e.reason).then(|| reason::name(e.reason).into()),
        direction: if e.direction == DIR_EGRESS {
            "egress"
        } else {
            "ingress"
        }
        .into(),
        protocol: protocol_name(e.protocol),
        src,
        dst,
        endpoint,
        node: view.node_name().map(str::to_string),
        policies,
        service: None,
        service_address: None,
        passed,
        domains: Vec::new(),
        tier: decided.map(|d| d.0.to_string()),
        action: decided.map(|d| d.1.to_string()),
        passed_tiers,
        suppressed: suppressed(e),
    }
}

/// Name the Service of a translated flow (`FlowEvent::service_id`, as
/// programmed by `Dataplane::set_services`).
pub fn name_service(
    rec: &mut FlowRecord,
    e: &FlowEvent,
    services: &BTreeMap<u32, crate::service::Frontend>,
) {
    if e.service_id == 0 {
        return;
    }
    match services.get(&e.service_id) {
        Some(f) => {
            rec.service = Some(f.service.to_string());
            rec.service_address = Some(f.address.to_string());
        }
        // Removed since the event was written.
        None => rec.service = Some(format!("service-{}", e.service_id)),
    }
}

/// The flow log file, rotated by size (`path`, `path.1` .. `path.N`), and
/// a short history for new `observe` clients.
pub struct FlowLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    keep: usize,
    recent: VecDeque<String>,
}

const RECENT: usize = 2048;

impl FlowLog {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.into(),
            file: Some(file),
            size,
            max_bytes,
            keep: 3,
            recent: VecDeque::new(),
        })
    }

    pub fn write(&mut self, line: &str) -> io::Result<()> {
        if self.size + line.len() as u64 + 1 > self.max_bytes && self.size > 0 {
            self.rotate()?;
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(line.as_bytes())?;
            f.write_all(b"\n")?;
            self.size += line.len() as u64 + 1;
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(line.to_string());
        Ok(())
    }

    /// The current file (rotated ones beside it: `path.1`, ...).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn recent(&self) -> impl Iterator<Item = &String> {
        self.recent.iter()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let nth = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        for n in (1..self.keep).rev() {
            let _ = fs::rename(nth(n), nth(n + 1));
        }
        fs::rename(&self.path, nth(1))?;
        self.file = Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        );
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_a_bounded_number_of_files() {
        let dir = std::env::temp_dir().join(format!("palisade-flowlog-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("flows.jsonl");
        let mut log = FlowLog::open(&path, 100).unwrap();
        for i in 0..40 {
            log.write(&format!("{{\"n\":{i:020}}}")).unwrap();
        }
        assert!(fs::metadata(&path).unwrap().len() <= 100);
        assert!(dir.join("flows.jsonl.3").exists());
        assert!(!dir.join("flows.jsonl.4").exists());
        let last = fs::read_to_string(&path).unwrap();
        assert!(
            last.trim_end().ends_with(&format!("{:020}}}", 39)),
            "{last}"
        );
        assert_eq!(log.recent().count(), 40);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_event_carrying_suppressed_drops_says_how_many_and_why() {
        // SAFETY: FlowEvent is plain data; all-zero is a valid value.
        let mut e: FlowEvent = unsafe { std::mem::zeroed() };
        assert_eq!(suppressed(&e), None);
        e.suppressed_drops = 1234;
        e.suppressed_reasons = (1 << reason::DENY_RULE) | (1 << reason::MALFORMED);
        let s = suppressed(&e).expect("carried");
        assert_eq!(s.drops, 1234);
        assert_eq!(s.drop_reasons, ["deny-rule", "malformed-header"]);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"drops\":1234"), "{json}");
    }

    #[test]
    fn translated_flows_name_their_service() {
        use crate::{model::ObjectKey, service::Frontend};
        let f = Frontend {
            service: ObjectKey::new("kube-system", "kube-dns"),
            port_name: "dns".into(),
            address: "10.96.0.10:53".parse().unwrap(),
            protocol: PROTO_UDP,
            backends: vec![],
            affinity_timeout_s: None,
        };
        let services = [(4, f)].into_iter().collect();
        let mut e: FlowEvent = unsafe { std::mem::zeroed() };
        let mut rec = FlowRecord::default();
        name_service(&mut rec, &e, &services);
        assert_eq!(rec.service, None);
        e.service_id = 4;
        name_service(&mut rec, &e, &services);
        assert_eq!(rec.service.as_deref(), Some("kube-system/kube-dns"));
        assert_eq!(rec.service_address.as_deref(), Some("10.96.0.10:53"));
        let json = serde_json::to_string(&rec).unwrap();
        assert!(
            json.contains(r#""service":"kube-system/kube-dns""#),
            "{json}"
        );
    }

    #[test]
    fn protocol_names() {
        assert_eq!(protocol_name(6), "TCP");
        assert_eq!(protocol_name(132), "SCTP");
        assert_eq!(protocol_name(47), "proto-47");
    }
}

#[cfg(test)]
mod ipv6_tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        compiler::{view::View, Compiler},
        model::{LocalEndpoint, Model, ObjectKey, Pod},
    };

    /// An event of family 6 shows its IPv6 addresses and names the pod
    /// behind each (a local one by its registration, a remote one by its
    /// pod); an unknown IPv6 address is world.
    #[test]
    fn ipv6_events_name_their_pods() {
        let mut m = Model::default();
        let pod = |name: &str, app: &str, v6: &str| Pod {
            namespace: "a".into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ip: None,
            ipv6: Some(v6.parse().unwrap()),
            host_network: false,
            ports: vec![],
        };
        for (n, app, v6) in [("web", "web", "fd00::1"), ("db", "db", "fd00::2")] {
            m.pods
                .insert(ObjectKey::new("a", n), Arc::new(pod(n, app, v6)));
        }
        m.endpoints.insert(
            "c1".into(),
            LocalEndpoint {
                key: ObjectKey::new("a", "web"),
                endpoint_id: 1,
                ifindex: 1,
                host_ifname: "veth1".into(),
                ipv4: Ipv4Addr::UNSPECIFIED,
                ipv6: Some("fd00::1".parse().unwrap()),
                container_id: "c1".into(),
                mac: [0; 6],
            },
        );
        let c = Compiler::new().compile(&m);
        let view = View::from_compiled(&c, &m);
        let w = |s: &str| palisade_dataplane::maps::ip6_words(s.parse().unwrap());
        let mut e: FlowEvent = unsafe { std::mem::zeroed() };
        e.family = 6;
        e.endpoint_id = 1;
        e.protocol = PROTO_TCP;
        e.saddr6 = w("fd00::2");
        e.daddr6 = w("fd00::1");
        e.src_identity = c.maps.ipcache6[&("fd00::2".parse().unwrap(), 128)].identity;
        e.dst_identity = c.maps.ipcache6[&("fd00::1".parse().unwrap(), 128)].identity;
        e.dport_be = 80u16.to_be();
        let r = record(&view, &e);
        assert_eq!(r.src.ip.to_string(), "fd00::2");
        assert_eq!(
            (r.src.kind.as_str(), r.src.pod.as_deref()),
            ("pod", Some("db"))
        );
        assert_eq!(
            (r.dst.kind.as_str(), r.dst.pod.as_deref()),
            ("pod", Some("web"))
        );
        assert_eq!(r.dst.port, Some(80));
        assert_eq!(r.endpoint, "a/web");
        // An address no pod has: world.
        e.saddr6 = w("2001:db8::9");
        e.src_identity = palisade_common::IDENTITY_WORLD;
        let r = record(&view, &e);
        assert_eq!((r.src.kind.as_str(), r.src.pod.as_deref()), ("world", None));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""ip":"2001:db8::9""#), "{json}");
    }
}
