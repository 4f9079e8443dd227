//! The agent's local API, spoken over a Unix socket: one JSON request per
//! line, one JSON response line back. The CNI plugin registers and
//! deregisters endpoints through it; tools read status and wait for the
//! "programmed generation" (a counter the agent bumps each time a change has
//! reached the kernel maps) instead of sleeping.
use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/palisade/agent.sock";

/// "aa:bb:cc:dd:ee:ff" (either case) as bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// What the CNI plugin knows about a pod it just wired (or, chained, found).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub container_id: String,
    /// CNI_IFNAME inside the pod.
    pub ifname: String,
    pub netns: String,
    /// From CNI_ARGS K8S_POD_NAMESPACE / K8S_POD_NAME.
    pub namespace: String,
    pub pod: String,
    /// The pod's IPv4 address. None only for an IPv6-only pod (then
    /// `ipv6` is set); absent on the wire then, so IPv4 registrations read
    /// as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
    /// The host-side interface the agent attaches the programs to.
    pub host_ifname: String,
    /// The pod interface's MAC address ("aa:bb:cc:dd:ee:ff"), where the
    /// plugin knows it: frames from the pod must carry it as their source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The pod's IPv6 address, for a dual-stack or IPv6-only pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<std::net::Ipv6Addr>,
}

impl Registration {
    /// The pod's addresses for messages: "10.0.0.2", "10.0.0.2, fd00::2".
    pub fn addresses(&self) -> String {
        let v4 = self.ipv4.map(|a| a.to_string());
        let v6 = self.ipv6.map(|a| a.to_string());
        let all: Vec<String> = v4.into_iter().chain(v6).collect();
        if all.is_empty() {
            "no address".to_string()
        } else {
            all.join(", ")
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Returns only after the programs are attached and the pod's policy is
    /// in the maps: the pod never runs unenforced.
    Register(Registration),
    /// Idempotent: unknown endpoints are not an error.
    Deregister {
        container_id: String,
        ifname: String,
    },
    Status,
    /// Wait until the programmed generation is at least `generation`.
    WaitProgrammed {
        generation: u64,
        timeout_ms: u64,
    },
    /// Re-read the source now (standalone manifests) and answer with the
    /// programmed generation that includes what it found.
    Sync,
    /// The verdict the datapath would give a new flow, and why.
    Trace(TraceRequest),
    /// Probe the kernel's verdict path (no traffic, nothing recorded) for
    /// every local endpoint and compare it with the model's.
    Verify,
    /// Which pods and namespaces policy isolates, and likely mistakes.
    Coverage,
    /// The effect of policy objects on the recorded flows, nothing applied.
    Preview(PreviewRequest),
}

/// `palisade-agent preview`: policy objects to apply or delete hypothetically.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewRequest {
    /// YAML documents (NetworkPolicy or ClusterNetworkPolicy objects) to
    /// apply or replace.
    #[serde(default)]
    pub apply: Vec<String>,
    /// namespace/name of NetworkPolicies, ClusterNetworkPolicy/name of
    /// cluster ones, to delete.
    #[serde(default)]
    pub delete: Vec<String>,
    /// Only flows recorded at or after this time (seconds since the epoch).
    #[serde(default)]
    pub since_unix: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// namespace/pod
    pub from: String,
    /// namespace/pod or an IPv4 address
    pub to: String,
    pub port: u16,
    /// TCP, UDP, SCTP
    pub protocol: String,
    /// "ipv4" or "ipv6": which addresses of the pods the flow uses
    /// (default: IPv6 when an end is an IPv6 address, else IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceStep {
    /// "egress of x/a" or "ingress of y/b"
    pub hop: String,
    pub verdict: String,
    pub reason: String,
    pub policies: Vec<String>,
    pub detail: String,
    /// For a pod a ClusterNetworkPolicy selects in this direction: the tier
    /// walk, one line per step (Admin rules considered in order →
    /// NetworkPolicy → Baseline → default), the deciding one marked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub walk: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceReport {
    pub verdict: String,
    pub steps: Vec<TraceStep>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok {
        generation: u64,
        endpoint_id: Option<u32>,
    },
    Status(Box<StatusReport>),
    Trace(TraceReport),
    /// The request failed. `kind` says what the caller should do about it;
    /// `message` says what went wrong, for people.
    Error {
        /// Absent in answers from agents that predate kinds: `Internal`.
        #[serde(default)]
        kind: ErrorKind,
        message: String,
    },
    Verify(Box<VerifyReport>),
    Coverage(Box<CoverageReport>),
    Preview(Box<PreviewReport>),
}

/// `palisade-agent verify`: kernel verdicts against the model's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The programmed generation the probes ran against.
    pub generation: u64,
    pub endpoints: usize,
    pub probes: usize,
    /// Probes the model distinguishes (one per policy entry and port edge);
    /// the rest are a sample.
    pub distinguished: usize,
    /// Probe generation stopped at the cap.
    pub truncated: bool,
    pub mismatches: Vec<VerifyMismatch>,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyMismatch {
    /// namespace/pod of the local endpoint
    pub endpoint: String,
    pub direction: String,
    /// The probe, e.g. "TCP 10.0.0.1:40000 -> 10.0.0.2:80 [S]".
    pub packet: String,
    /// The remote side's identity, named.
    pub peer: String,
    /// PASS or DROP as the kernel decided.
    pub kernel: String,
    /// ALLOW, AUDIT or DROP as the model decides, with its reason.
    pub model: String,
    pub model_reason: String,
    /// The policy rule the model's verdict comes from, if any.
    pub rule: Option<String>,
}

/// `palisade-agent coverage`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoverageReport {
    pub namespaces: Vec<NamespaceCoverage>,
    pub pods: Vec<PodCoverage>,
    pub findings: Vec<Finding>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceCoverage {
    pub namespace: String,
    pub pods: usize,
    pub ingress_isolated_pods: usize,
    pub egress_isolated_pods: usize,
    /// Policies selecting every pod of the namespace with no rule for
    /// the direction (default deny).
    pub default_deny_ingress: Vec<String>,
    pub default_deny_egress: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCoverage {
    pub namespace: String,
    pub pod: String,
    /// Policies isolating the pod's ingress (empty: not isolated).
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// e.g. `unselected-pod`, `no-default-deny-ingress`, `no-dns`,
    /// `empty-selector`, `shadowed-rule`, `ipblock-contains-pods`,
    /// `ungoverned-namespace-label`.
    pub kind: String,
    /// What it is about: a pod, namespace or policy (rule).
    pub subject: String,
    pub detail: String,
}

/// `palisade-agent preview`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewReport {
    /// Flow records replayed (new flows and drops in the window).
    pub replayed: usize,
    /// Records that could not be replayed (a side no longer known, no
    /// local endpoint, not a policy verdict).
    pub skipped: usize,
    pub newly_dropped: Vec<PreviewGroup>,
    pub newly_allowed: Vec<PreviewGroup>,
    /// Applied policies the compiler rejects ("ns/name: why"): they would
    /// still isolate what they select, and allow nothing.
    #[serde(default)]
    pub rejected: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewGroup {
    /// namespace/pod (or address) of each side.
    pub source: String,
    pub destination: String,
    /// e.g. 5432/TCP
    pub port: String,
    pub flows: usize,
    /// The rule (or isolating policies) that decides after the change.
    pub rule: String,
}

impl Response {
    /// The error answer (what the agent sends when a request fails).
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Error {
            kind,
            message: message.into(),
        }
    }
}

/// Why a request failed, chosen by what the caller should do next. Only
/// `Unavailable` is worth retrying as is; every other kind fails again
/// until something changes (the request, the cluster, the configuration,
/// the agent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Transient: the agent is starting (first sync not done), overloaded,
    /// shutting down, or a wait timed out. Retry later.
    Unavailable,
    /// The request is malformed or a field is invalid (an unparsable line,
    /// an empty container id, a bad address or protocol). Fix the caller.
    InvalidRequest,
    /// Something the request names does not exist: the host interface of a
    /// registration, a pod or endpoint of a trace.
    NotFound,
    /// The request contradicts state the agent holds (e.g. the address or
    /// interface is registered to another container).
    Conflict,
    /// A datapath map is full: a capacity limit, not transient. Needs larger
    /// maps or fewer policies/endpoints; whatever fitted is still enforced.
    MapFull,
    /// The caller may not do this: registering or removing endpoints is
    /// for root (the CNI plugin under the container runtime) or the agent's
    /// own user, whatever the socket's mode.
    Forbidden,
    /// The request is understood but asks for something this agent cannot
    /// enforce yet (older agents: an IPv6-only pod). Retrying fails until
    /// the agent is upgraded; older callers
    /// read it as `Internal`.
    // Before `Internal`: serde's catch-all must be the last variant.
    Unsupported,
    /// A bug, or the kernel refused an operation, in a way that will not fix
    /// itself by retrying. Also the kind of an error without one, and of
    /// kinds this build does not know.
    #[default]
    #[serde(other)]
    Internal,
}

impl ErrorKind {
    /// Every kind, for tables and tests.
    pub const ALL: [ErrorKind; 8] = [
        Self::Unavailable,
        Self::InvalidRequest,
        Self::NotFound,
        Self::Conflict,
        Self::MapFull,
        Self::Forbidden,
        Self::Internal,
        Self::Unsupported,
    ];

    /// Retrying the same request later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable)
    }

    /// The wire name (`snake_case`), also used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::InvalidRequest => "invalid_request",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::MapFull => "map_full",
            Self::Forbidden => "forbidden",
            Self::Internal => "internal",
            Self::Unsupported => "unsupported",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Bumped each time a model change has been written to the kernel.
    pub programmed_generation: u64,
    /// Bumped each time the agent's sources changed the model.
    pub model_generation: u64,
    pub endpoints: Vec<EndpointStatus>,
    pub identities: usize,
    pub policies: Vec<PolicyStatus>,
    pub maps: Vec<MapFill>,
    pub audit: bool,
    /// Every ClusterNetworkPolicy, by name (absent from older agents).
    #[serde(default)]
    pub cluster_policies: Vec<ClusterPolicyStatus>,
    /// Services with frontends (absent from an older agent's report).
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// Services and EndpointSlices (or parts of them) rejected, one line each.
    #[serde(default)]
    pub service_rejections: Vec<String>,
    /// Why the frontends could not be programmed, if they could not.
    #[serde(default)]
    pub services_error: Option<String>,
    /// The cluster's nodes as this agent knows them, with the peers (pods)
    /// of each other node (absent from older agents).
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
    /// Routing between nodes (None when the agent leaves routing alone).
    #[serde(default)]
    pub routing: Option<RoutingStatus>,
    /// Egress by domain name: the names learned from the cluster DNS's
    /// answers, each with its addresses and when they expire.
    #[serde(default)]
    pub domains: Vec<DomainStatus>,
}

/// One learned domain name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStatus {
    pub name: String,
    /// (address, seconds until it expires; 0: kept past its TTL while a
    /// connection uses it).
    pub addresses: Vec<(std::net::IpAddr, u64)>,
}

/// One node of the cluster as an agent knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    /// This agent's own node.
    pub local: bool,
    pub addresses: Vec<std::net::Ipv4Addr>,
    pub pod_cidrs: Vec<String>,
    /// Pods with an address in the node's pod ranges, `namespace/name ip`,
    /// and host-network pods at one of its addresses.
    pub pods: Vec<String>,
}

/// What the agent's route sync installed, and what it could not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingStatus {
    /// native, vxlan or none.
    pub mode: String,
    /// Installed routes, one line each (`10.1.2.0/24 via 192.0.2.3 (n3)`).
    pub routes: Vec<String>,
    /// Nodes or ranges left out, and why.
    pub problems: Vec<String>,
    /// The last pass failed (it is retried).
    pub error: Option<String>,
    pub failures: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPolicyStatus {
    pub name: String,
    /// "Admin" or "Baseline"; empty when rejected before the tier was read.
    pub tier: String,
    pub priority: Option<u32>,
    /// Pods of the cluster it selects (host-network pods never count).
    pub subjects: usize,
    /// None when compiled; the reason when rejected (it then does nothing).
    pub rejected: Option<String>,
    /// E.g. a priority shared with another policy of the tier.
    pub warning: Option<String>,
}

/// One Service's frontends: `ClusterIP:port/PROTO` and its backend count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub frontends: Vec<FrontendStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendStatus {
    /// `10.96.0.10:53/UDP`
    pub frontend: String,
    pub port_name: String,
    pub backends: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub namespace: String,
    pub pod: String,
    pub endpoint_id: u32,
    pub ipv4: Ipv4Addr,
    pub host_ifname: String,
    pub identity: u32,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub audit: bool,
    /// What the conntrack GC's last pass found it charged (absent before
    /// the first pass and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackCharge>,
    /// The pod's IPv6 address (dual-stack), absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<std::net::Ipv6Addr>,
    /// What the datapath does with this pod's IPv6 today: IPv6 is not
    /// policed by rule yet, so an endpoint enforced in either direction has
    /// all its IPv6 dropped but neighbour discovery. None without an IPv6
    /// address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_datapath: Option<String>,
}

/// An endpoint's share of the conntrack and fragment tables (issue 17
/// point 7: a per-pod budget, so no pod can flush the others' state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackCharge {
    pub entries: u64,
    pub fragments: u64,
    /// It holds its whole budget: new flows that need an entry are
    /// dropped as `conntrack-budget`.
    pub budget_spent: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub namespace: String,
    pub name: String,
    /// None when compiled; the reason when rejected.
    pub rejected: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the palisade agent at {path}: {source}")]
    Unreachable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the palisade agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad response from the palisade agent: {0}")]
    Decode(#[from] serde_json::Error),
}

/// One request, one response, blocking (the CNI plugin is synchronous).
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        path: socket.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp)?;
    Ok(serde_json::from_str(&resp)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_tagged_json() {
        let r = Request::Deregister {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"op":"deregister","container_id":"c1","ifname":"eth0"}"#
        );
        let back: Request = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
        let ok = Response::Ok {
            generation: 3,
            endpoint_id: Some(7),
        };
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"result":"ok","generation":3,"endpoint_id":7}"#
        );
    }

    #[test]
    fn registrations_read_as_before_and_may_lack_ipv4() {
        // What plugins before dual-stack send.
        let old = r#"{"op":"register","container_id":"c","ifname":"eth0","netns":"/n","namespace":"a","pod":"p","ipv4":"10.0.0.2","host_ifname":"palx"}"#;
        let Request::Register(r) = serde_json::from_str(old).unwrap() else {
            panic!()
        };
        assert_eq!(r.ipv4, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(r.ipv6, None);
        assert_eq!(
            serde_json::to_string(&Request::Register(r.clone())).unwrap(),
            old
        );
        assert_eq!(r.addresses(), "10.0.0.2");
        // IPv6-only: no ipv4 key at all.
        let v6 = Registration {
            ipv4: None,
            ipv6: Some("fd00::2".parse().unwrap()),
            ..r
        };
        let wire = serde_json::to_string(&v6).unwrap();
        assert!(
            !wire.contains("ipv4") && wire.contains(r#""ipv6":"fd00::2""#),
            "{wire}"
        );
        assert_eq!(serde_json::from_str::<Registration>(&wire).unwrap(), v6);
        assert_eq!(v6.addresses(), "fd00::2");
    }

    #[test]
    fn errors_carry_a_kind() {
        let e = Response::error(ErrorKind::MapFull, "map POLICY is full");
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"result":"error","kind":"map_full","message":"map POLICY is full"}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), e);
        for k in ErrorKind::ALL {
            let wire = serde_json::to_string(&k).unwrap();
            assert_eq!(wire, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<ErrorKind>(&wire).unwrap(), k);
            assert_eq!(k.is_transient(), k == ErrorKind::Unavailable);
        }
    }

    #[test]
    fn errors_without_or_with_unknown_kinds_decode_as_internal() {
        // An agent that predates kinds.
        let old: Response = serde_json::from_str(r#"{"result":"error","message":"x"}"#).unwrap();
        assert_eq!(old, Response::error(ErrorKind::Internal, "x"));
        // A kind from a newer agent.
        let new: Response =
            serde_json::from_str(r#"{"result":"error","kind":"rate_limited","message":"y"}"#)
                .unwrap();
        assert_eq!(new, Response::error(ErrorKind::Internal, "y"));
    }

    #[test]
    fn unreachable_agent_is_a_clear_error() {
        let e = call(
            Path::new("/nonexistent/agent.sock"),
            &Request::Status,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("cannot reach the palisade agent"),
            "{e}"
        );
    }
}
