//! Services + EndpointSlices (+ pods) -> the [`Frontend`] list the Service
//! datapath programs, and what was rejected. Pure: the agent calls
//! [`resolve`] on its source view after every change.
//!
//! The rules follow upstream so results match kube-proxy's:
//! - Only ClusterIP Services get frontends (every address of
//!   `clusterIPs`/`clusterIP`, IPv4 and IPv6). Headless (`None`) and
//!   ExternalName Services are left alone: no frontend, no error.
//! - A frontend's backends are the endpoints of its own family (a
//!   dual-stack Service has one EndpointSlice per family, `addressType`
//!   IPv4 or IPv6; derived slices take each pod's address of that family).
//! - A Service port's backends come from the EndpointSlices labelled
//!   `kubernetes.io/service-name: <service>` in its namespace, through the
//!   slice port of the same name and protocol (the EndpointSlice controller
//!   resolves named target ports per pod and groups pods by the result, so
//!   the slice port *is* the per-backend target port).
//! - kube-proxy's endpoint choice: ready endpoints; when there are none,
//!   serving-and-terminating ones. Unset `ready`/`serving` mean true, unset
//!   `terminating` false (the API's documented defaults).
//! - Standalone (`Snapshot::derive_endpoint_slices`): a Service with a
//!   selector and no given slice gets the slices the EndpointSlice
//!   controller would write: pods of its namespace matching the selector
//!   that have an address (host-network pods included, as upstream does),
//!   target port numeric or the pod's container port of that name and
//!   protocol (a pod without it is left out of that port, as upstream).
//! - Bad input is rejected narrowly, every other Service keeps working: a
//!   Service whose spec is invalid gets no frontend; an endpoint address
//!   that is no known pod's is left out (fail closed: palisade only ever
//!   translates to pods it can identify); two Services claiming the same
//!   ClusterIP:port/protocol: the older (creation time, then
//!   namespace/name) keeps it, the other's port is rejected.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    change::Snapshot,
    model::{ObjectKey, Pod},
    service::{Backend, Frontend},
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10800;

/// One rejected object (or part of one) and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejection {
    /// "Service" or "EndpointSlice".
    pub kind: &'static str,
    pub key: ObjectKey,
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.key, self.reason)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolved {
    /// Sorted by (address, protocol): one per ClusterIP:port/protocol.
    pub frontends: Vec<Frontend>,
    /// Sorted, deduplicated.
    pub rejections: Vec<Rejection>,
}

fn protocol_number(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(6),
        "UDP" => Ok(17),
        "SCTP" => Ok(132),
        other => Err(format!("protocol {other:?} is not TCP, UDP or SCTP")),
    }
}

fn port_number(p: i32, field: &str) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{field}: {p} is out of range 1-65535"))
}

#[derive(Clone, Debug)]
enum Target {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug)]
struct Port {
    name: String,
    port: u16,
    /// NodePort and LoadBalancer Services: the port on every node address.
    node_port: Option<u16>,
    protocol: u8,
    protocol_name: String,
    target: Target,
}

/// What a valid ClusterIP Service asks for.
#[derive(Debug)]
struct Spec {
    ips: Vec<IpAddr>,
    /// `externalIPs` and the load balancer's ingress addresses: served on
    /// the Service ports like the ClusterIP (kube-proxy DNATs them too).
    external: Vec<IpAddr>,
    ports: Vec<Port>,
    selector: Option<BTreeMap<String, String>>,
    affinity_timeout_s: Option<u32>,
}

/// `Ok(None)`: headless or ExternalName, left alone.
fn parse_service(svc: &Service) -> Result<Option<Spec>, String> {
    let Some(spec) = svc.spec.as_ref() else {
        return Err("spec is required".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let mut raw: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if raw.is_empty() {
        raw.extend(spec.cluster_ip.as_deref());
    }
    if raw.first() == Some(&"None") {
        return Ok(None);
    }
    if raw.is_empty() || raw == [""] {
        return Err(
            "spec.clusterIP is not set (the API server allocates it; a manifest must give it)"
                .into(),
        );
    }
    let mut ips = Vec::new();
    for (i, s) in raw.iter().enumerate() {
        match s.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => return Err(format!("spec.clusterIPs[{i}]: {s:?} is not an IP address")),
        }
    }
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let at = format!("spec.ports[{i}]");
        let protocol = protocol_number(p.protocol.as_deref()).map_err(|e| format!("{at}: {e}"))?;
        let port = port_number(p.port, &format!("{at}.port"))?;
        let target = match &p.target_port {
            None => Target::Number(port),
            Some(IntOrString::Int(n)) => {
                Target::Number(port_number(*n, &format!("{at}.targetPort"))?)
            }
            Some(IntOrString::String(s)) if s.is_empty() => Target::Number(port),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => Target::Number(port_number(n, &format!("{at}.targetPort"))?),
                Err(_) => Target::Name(s.clone()),
            },
        };
        if !seen.insert((port, protocol)) {
            return Err(format!("{at}: port {port}/{protocol} is given twice"));
        }
        let exposed = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let node_port = match p.node_port {
            Some(n) if exposed => Some(port_number(n, &format!("{at}.nodePort"))?),
            _ => None,
        };
        ports.push(Port {
            name: p.name.clone().unwrap_or_default(),
            port,
            node_port,
            protocol,
            protocol_name: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            target,
        });
    }
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if (1..=86400).contains(&t) => Some(t as u32),
                Some(t) => {
                    return Err(format!(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds: {t} is out of range 1-86400"
                    ))
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "spec.sessionAffinity: {other:?} is not None or ClientIP"
            ))
        }
    };
    Ok(Some(Spec {
        external: external_ips(svc)?,
        ips,
        ports,
        selector: spec.selector.clone(),
        affinity_timeout_s,
    }))
}

/// `spec.externalIPs` and `status.loadBalancer.ingress[].ip`, each once.
fn external_ips(svc: &Service) -> Result<Vec<IpAddr>, String> {
    let mut out = BTreeSet::new();
    let given = svc.spec.as_ref().and_then(|s| s.external_ips.as_ref());
    for (i, s) in given.into_iter().flatten().enumerate() {
        match s.parse::<IpAddr>() {
            Ok(ip) => {
                out.insert(ip);
            }
            Err(_) => return Err(format!("spec.externalIPs[{i}]: {s:?} is not an IP address")),
        }
    }
    let lb = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref());
    for ing in lb.into_iter().flatten() {
        // (A hostname-only ingress is reached through DNS: not ours.)
        if let Some(Ok(ip)) = ing.ip.as_deref().map(str::parse::<IpAddr>) {
            out.insert(ip);
        }
    }
    Ok(out.into_iter().collect())
}

/// One endpoint's addresses for a port, with kube-proxy's conditions.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    backend: Backend,
    ready: bool,
    serving_terminating: bool,
}

/// Per service port (name, protocol): the candidates of one slice.
type SlicePorts = HashMap<(String, u8), Vec<Candidate>>;

/// A slice's candidates per port name/protocol; endpoints at addresses no
/// known pod holds are left out and reported.
fn slice_candidates(
    key: &ObjectKey,
    slice: &EndpointSlice,
    pods_by_ip: &HashMap<IpAddr, ObjectKey>,
    rejections: &mut Vec<Rejection>,
) -> SlicePorts {
    let mut reject = |reason: String| {
        rejections.push(Rejection {
            kind: "EndpointSlice",
            key: key.clone(),
            reason,
        })
    };
    let mut out = SlicePorts::new();
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return out, // names, not addresses: kube-proxy ignores them too
        other => {
            reject(format!(
                "addressType {other:?} is not IPv4, IPv6 or FQDN; slice left out"
            ));
            return out;
        }
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(n) = p.port else { continue }; // "all ports": not a Service's slice.
        match (
            port_number(n, &format!("ports[{i}].port")),
            protocol_number(p.protocol.as_deref()),
        ) {
            (Ok(port), Ok(proto)) => ports.push((p.name.clone().unwrap_or_default(), proto, port)),
            (Err(e), _) | (_, Err(e)) => reject(format!("{e}; port left out")),
        }
    }
    let mut candidates = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        // Upstream uses the first address only.
        let Some(addr) = ep.addresses.first() else {
            continue;
        };
        let ip = match addr.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == v6 => ip,
            _ => {
                reject(format!(
                    "endpoints[{i}].addresses[0]: {addr:?} is not an {} address; left out",
                    slice.address_type
                ));
                continue;
            }
        };
        let Some(pod) = pods_by_ip.get(&ip) else {
            reject(format!(
                "endpoints[{i}]: {ip} is no known pod's address; left out"
            ));
            continue;
        };
        if let Some(t) = ep
            .target_ref
            .as_ref()
            .filter(|t| t.kind.as_deref() == Some("Pod"))
        {
            let named = ObjectKey::new(
                t.namespace
                    .clone()
                    .unwrap_or_else(|| key.namespace.to_string()),
                t.name.clone().unwrap_or_default(),
            );
            if &named != pod {
                reject(format!(
                    "endpoints[{i}]: {ip} names pod {named} but is pod {pod}'s address; left out"
                ));
                continue;
            }
        }
        candidates.push((ip, pod.clone(), ready, serving && terminating));
    }
    for (name, proto, port) in ports {
        let list = out.entry((name, proto)).or_default();
        for (ip, pod, ready, st) in &candidates {
            list.push(Candidate {
                backend: Backend {
                    address: SocketAddr::new(*ip, port),
                    pod: Some(pod.clone()),
                },
                ready: *ready,
                serving_terminating: *st,
            });
        }
    }
    out
}

/// The slice the EndpointSlice controller would write for a selector
/// Service (standalone mode).
fn derived_candidates<'a>(
    ns: &str,
    spec: &Spec,
    pods: impl Iterator<Item = (&'a ObjectKey, &'a Pod)>,
) -> SlicePorts {
    let mut out = SlicePorts::new();
    let Some(selector) = spec.selector.as_ref() else {
        return out;
    };
    // One endpoint per pod and family (the controller writes a slice per
    // family of the Service).
    let matching: Vec<(&ObjectKey, &Pod, IpAddr)> = pods
        .filter(|(k, p)| {
            *k.namespace == *ns && selector.iter().all(|(l, v)| p.labels.get(l) == Some(v))
        })
        .flat_map(|(k, p)| {
            let v4 = p.ip.map(IpAddr::V4);
            let v6 = p.ipv6.map(IpAddr::V6);
            v4.into_iter().chain(v6).map(move |ip| (k, p, ip))
        })
        .collect();
    for port in &spec.ports {
        let list = out.entry((port.name.clone(), port.protocol)).or_default();
        for (key, pod, ip) in &matching {
            let target = match &port.target {
                Target::Number(n) => Some(*n),
                Target::Name(name) => pod
                    .ports
                    .iter()
                    .find(|c| {
                        c.name.as_deref() == Some(name.as_str()) && c.protocol == port.protocol_name
                    })
                    .map(|c| c.port),
            };
            if let Some(target) = target {
                list.push(Candidate {
                    backend: Backend {
                        address: SocketAddr::new(*ip, target),
                        pod: Some((*key).clone()),
                    },
                    ready: true,
                    serving_terminating: false,
                });
            }
        }
    }
    out
}

/// kube-proxy's choice: ready endpoints, else serving-and-terminating ones.
fn choose(candidates: &[Candidate]) -> Vec<Backend> {
    let pick = |f: fn(&Candidate) -> bool| -> Vec<Backend> {
        let set: BTreeSet<&Backend> = candidates
            .iter()
            .filter(|c| f(c))
            .map(|c| &c.backend)
            .collect();
        set.into_iter().cloned().collect()
    };
    let ready = pick(|c| c.ready);
    if ready.is_empty() {
        pick(|c| c.serving_terminating)
    } else {
        ready
    }
}

/// Resolves the source view into frontends and rejections.
pub fn resolve(view: &Snapshot) -> Resolved {
    let mut rejections = Vec::new();
    let pods_by_ip: HashMap<IpAddr, ObjectKey> = view
        .pods
        .iter()
        .flat_map(|(k, p)| {
            let v4 = p.ip.map(IpAddr::V4);
            let v6 = p.ipv6.map(IpAddr::V6);
            v4.into_iter().chain(v6).map(move |ip| (ip, k.clone()))
        })
        .collect();

    // Slices per Service.
    let mut slices: BTreeMap<ObjectKey, Vec<SlicePorts>> = BTreeMap::new();
    for (key, slice) in &view.endpoint_slices {
        let svc = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        let Some(svc) = svc.filter(|s| !s.is_empty()) else {
            rejections.push(Rejection {
                kind: "EndpointSlice",
                key: key.clone(),
                reason: format!("no {SERVICE_NAME_LABEL} label: it belongs to no Service"),
            });
            continue;
        };
        let ports = slice_candidates(key, slice, &pods_by_ip, &mut rejections);
        slices
            .entry(ObjectKey::new(&key.namespace, svc))
            .or_default()
            .push(ports);
    }

    // Every frontend claimed, with its claimants ordered oldest first.
    type Claim = (Option<String>, ObjectKey, Frontend);
    let mut claims: BTreeMap<(SocketAddr, u8), Vec<Claim>> = BTreeMap::new();
    for (key, svc) in &view.services {
        let spec = match parse_service(svc) {
            Ok(Some(spec)) => spec,
            Ok(None) => continue,
            Err(reason) => {
                rejections.push(Rejection {
                    kind: "Service",
                    key: key.clone(),
                    reason: format!("{reason}; the Service gets no frontend"),
                });
                continue;
            }
        };
        let given = slices.get(key);
        let derived;
        let sources: &[SlicePorts] = match given {
            Some(s) => s,
            None if view.derive_endpoint_slices => {
                derived = [derived_candidates(
                    &key.namespace,
                    &spec,
                    view.pods.iter().map(|(k, p)| (k, &**p)),
                )];
                &derived
            }
            None => &[],
        };
        let created = svc
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string());
        for port in &spec.ports {
            let candidates: Vec<Candidate> = sources
                .iter()
                .filter_map(|s| s.get(&(port.name.clone(), port.protocol)))
                .flatten()
                .cloned()
                .collect();
            let backends = [false, true].map(|v6| {
                let of_family: Vec<Candidate> = candidates
                    .iter()
                    .filter(|c| c.backend.address.is_ipv6() == v6)
                    .cloned()
                    .collect();
                choose(&of_family)
            });
            // The ClusterIPs and external addresses on the Service port; a
            // NodePort at 0.0.0.0 (and `::` for a Service with an IPv6
            // ClusterIP), which the datapath serves on every node's address
            // (`host` and `remote-node` in the ipcache).
            let any = [
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ];
            let families: Vec<IpAddr> = any
                .into_iter()
                .filter(|a| spec.ips.iter().any(|ip| ip.is_ipv6() == a.is_ipv6()))
                .collect();
            let addresses = spec
                .ips
                .iter()
                .chain(&spec.external)
                .map(|ip| SocketAddr::new(*ip, port.port))
                .chain(
                    port.node_port
                        .into_iter()
                        .flat_map(|n| families.iter().map(move |a| SocketAddr::new(*a, n))),
                );
            for address in addresses {
                let backends = &backends[usize::from(address.is_ipv6())];
                claims.entry((address, port.protocol)).or_default().push((
                    created.clone(),
                    key.clone(),
                    Frontend {
                        service: key.clone(),
                        port_name: port.name.clone(),
                        address,
                        protocol: port.protocol,
                        backends: backends.clone(),
                        affinity_timeout_s: spec.affinity_timeout_s,
                    },
                ));
            }
        }
    }

    let mut frontends = Vec::new();
    for ((address, proto), mut list) in claims {
        // Oldest first; no timestamp (a manifest) sorts after any.
        list.sort_by(|a, b| (a.0.is_none(), &a.0, &a.1).cmp(&(b.0.is_none(), &b.0, &b.1)));
        let mut list = list.into_iter();
        let (_, winner, f) = list.next().expect("a claim has a claimant");
        for (_, loser, _) in list {
            rejections.push(Rejection {
                kind: "Service",
                key: loser,
                reason: format!(
                    "{address}/{} is also claimed by the older Service {winner}, which keeps it; this port is not served",
                    protocol_name(proto)
                ),
            });
        }
        frontends.push(f);
    }
    rejections.sort();
    rejections.dedup();
    Resolved {
        frontends,
        rejections,
    }
}

pub fn protocol_name(p: u8) -> &'static str {
    match p {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        _ => "?",
    }
}

#[cfg(test)]
mod tests;
