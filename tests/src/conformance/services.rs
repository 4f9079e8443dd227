//! `--via-services` (FORMAT version 2): one ClusterIP Service per pod, as
//! the upstream e2e suite makes them, with its EndpointSlices written as
//! manifests, and kube-proxy's iptables rules for them installed in the
//! node namespace the way kube-proxy's iptables mode writes them, so probes
//! to the ClusterIPs go through kube-proxy's DNAT whether or not palisade
//! translates them itself.
//!
//! With IPv6 (`--ip-family ipv6|dual`) the objects are what a dual-stack
//! cluster holds: the Service has an IPv6 ClusterIP (from
//! [`SERVICE_RANGE6`], the `i`th pod's mirroring the IPv4 [`cluster_ip`])
//! with `ipFamilies`/`ipFamilyPolicy` set as the API server sets them
//! (`SingleStack` IPv6, or `RequireDualStack` with both ClusterIPs, IPv4
//! first), the EndpointSlice controller writes one slice per address type
//! (the IPv6 one named `<service>-ipv6`), and kube-proxy's IPv6 proxier
//! writes the same chains with `ip6tables-restore` (`/128`, ICMPv6
//! rejects, `[address]:port` DNAT targets). IPv4-only runs write exactly
//! the objects and rules they always did.
use std::{
    fmt::Write as _,
    hash::{Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde_yaml::Value;

use super::{
    case::{PodSpec, Protocol},
    family::Family,
};

/// ClusterIPs come from here; the range exists only inside each case's
/// namespaces (the node gets an unreachable route for the rest of it).
pub const SERVICE_RANGE: &str = "10.96.0.0/16";

/// IPv6 ClusterIPs come from this ULA range, which likewise exists only
/// inside each case's namespaces (an unreachable route in every node).
pub const SERVICE_RANGE6: &str = "fd00:96::/112";

/// The `i`th address past a range's base: 1-9 kept for kube-dns and friends.
fn offset(i: usize) -> u32 {
    10 + i as u32
}

/// The ClusterIP of the `i`th pod's Service.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + offset(i))
}

/// The IPv6 ClusterIP of the `i`th pod's Service (`fd00:96::<10+i>`, as
/// [`cluster_ip`] is `10.96.0.0 + 10 + i`).
pub fn cluster_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0)) + u128::from(offset(i)),
    )
}

/// The ClusterIP of family `f` of the `i`th pod's Service.
pub fn cluster_ip_of(f: Family, i: usize) -> IpAddr {
    match f {
        Family::V4 => cluster_ip(i).into(),
        Family::V6 => cluster_ip6(i).into(),
    }
}

/// An address's family.
pub fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// The API's name of a family (`ipFamilies`, `addressType`).
fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// `s-<namespace>-<pod>`
pub fn service_name(pod: &PodSpec) -> String {
    format!("s-{}-{}", pod.namespace, pod.name)
}

/// The Service port's name and target port: the pod's port name when it
/// has one (targetPort by name, as FORMAT says), else its number.
fn port_name_and_target(p: &super::case::PortSpec) -> (String, Value) {
    match &p.name {
        Some(n) => (n.clone(), n.as_str().into()),
        None => (
            format!("{}-{}", p.protocol.as_str().to_lowercase(), p.port),
            p.port.into(),
        ),
    }
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).expect("generated YAML parses")
}

/// The Service (None for a pod that serves no port: a Service needs one)
/// with the ClusterIPs `ips`, the primary family first: one IPv4 address
/// gives today's IPv4 manifest; otherwise `ipFamilies` and
/// `ipFamilyPolicy` as the API server fills them in (`SingleStack` for one
/// family, `RequireDualStack` for both).
pub fn service_manifest(pod: &PodSpec, ips: &[IpAddr]) -> Option<Value> {
    if pod.ports.is_empty() || ips.is_empty() {
        return None;
    }
    let primary = ips[0];
    let all = ips
        .iter()
        .map(|ip| format!("\"{ip}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let families = if let [IpAddr::V4(_)] = ips {
        String::new()
    } else {
        let names: Vec<&str> = ips.iter().map(|ip| family_name(family_of(*ip))).collect();
        let policy = if ips.len() > 1 {
            "RequireDualStack"
        } else {
            "SingleStack"
        };
        format!(
            " ipFamilies: [{}], ipFamilyPolicy: {policy},",
            names.join(", ")
        )
    };
    let mut doc = yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec: {{type: ClusterIP, clusterIP: \"{primary}\", clusterIPs: [{all}],{families} ports: []}}\n",
        service_name(pod),
        pod.namespace
    ));
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            let (name, target) = port_name_and_target(p);
            let mut m = serde_yaml::Mapping::new();
            m.insert("name".into(), name.into());
            m.insert("port".into(), p.port.into());
            m.insert("protocol".into(), p.protocol.as_str().into());
            m.insert("targetPort".into(), target);
            Value::Mapping(m)
        })
        .collect();
    doc["spec"]["ports"] = Value::Sequence(ports);
    Some(doc)
}

/// The name of the pod's Service's EndpointSlice of family `f` (the
/// controller writes one slice per address type).
pub fn slice_name(pod: &PodSpec, f: Family) -> String {
    match f {
        Family::V4 => format!("{}-1", service_name(pod)),
        Family::V6 => format!("{}-ipv6", service_name(pod)),
    }
}

/// The EndpointSlice the controller would write for the pod's address
/// `pod_ip` (its `addressType` that address's family): the pod, ready,
/// with the resolved target ports under the Service's port names.
pub fn endpoint_slice_manifest(pod: &PodSpec, pod_ip: IpAddr) -> Option<Value> {
    if pod.ports.is_empty() {
        return None;
    }
    let f = family_of(pod_ip);
    let mut doc = yaml(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {slice}, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: {family}\nendpoints: [{{addresses: [\"{pod_ip}\"], conditions: {{ready: true, serving: true, terminating: false}}, targetRef: {{kind: Pod, namespace: {ns}, name: {name}}}}}]\nports: []\n",
        slice = slice_name(pod, f),
        svc = service_name(pod),
        family = family_name(f),
        ns = pod.namespace,
        name = pod.name,
    ));
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            let (name, _) = port_name_and_target(p);
            let mut m = serde_yaml::Mapping::new();
            m.insert("name".into(), name.into());
            m.insert("port".into(), p.port.into());
            m.insert("protocol".into(), p.protocol.as_str().into());
            Value::Mapping(m)
        })
        .collect();
    doc["ports"] = Value::Sequence(ports);
    Some(doc)
}

/// The cluster DNS's Service (FORMAT v2 `cluster.dns` under
/// `--via-services`): `kube-system/kube-dns`, as in a cluster.
pub const KUBE_DNS_NAMESPACE: &str = "kube-system";
pub const KUBE_DNS_NAME: &str = "kube-dns";

/// The kube-dns ClusterIP of family `f`: the range's base + 2 (of the
/// addresses kept below the per-pod Services').
pub fn kube_dns_ip(f: Family) -> IpAddr {
    match f {
        Family::V4 => Ipv4Addr::new(10, 96, 0, 2).into(),
        Family::V6 => Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 2).into(),
    }
}

/// kube-dns's ports: (name, protocol), both on 53, target port 53 (the
/// DNS pod's ports have no names).
const KUBE_DNS_PORTS: [(&str, Protocol); 2] = [("dns", Protocol::Udp), ("dns-tcp", Protocol::Tcp)];

/// The kube-dns Service with the ClusterIPs `ips` (the primary family
/// first); its endpoints are the slices of [`kube_dns_slice`] (no
/// selector, as the per-pod Services).
pub fn kube_dns_service(ips: &[IpAddr]) -> Value {
    let all = ips
        .iter()
        .map(|ip| format!("\"{ip}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let names: Vec<&str> = ips.iter().map(|ip| family_name(family_of(*ip))).collect();
    let policy = if ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    let ports: Vec<String> = KUBE_DNS_PORTS
        .iter()
        .map(|(n, p)| format!("{{name: {n}, port: 53, protocol: {p}, targetPort: 53}}"))
        .collect();
    yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {KUBE_DNS_NAME}, namespace: {KUBE_DNS_NAMESPACE}, labels: {{k8s-app: kube-dns, kubernetes.io/name: CoreDNS}}}}\nspec: {{type: ClusterIP, clusterIP: \"{}\", clusterIPs: [{all}], ipFamilies: [{}], ipFamilyPolicy: {policy}, ports: [{}]}}\n",
        ips[0],
        names.join(", "),
        ports.join(", ")
    ))
}

/// kube-dns's EndpointSlice of the DNS pod's address `pod_ip`.
pub fn kube_dns_slice(pod: &PodSpec, pod_ip: IpAddr) -> Value {
    let f = family_of(pod_ip);
    let slice = match f {
        Family::V4 => format!("{KUBE_DNS_NAME}-1"),
        Family::V6 => format!("{KUBE_DNS_NAME}-ipv6"),
    };
    let ports: Vec<String> = KUBE_DNS_PORTS
        .iter()
        .map(|(n, p)| format!("{{name: {n}, port: 53, protocol: {p}}}"))
        .collect();
    yaml(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {slice}, namespace: {KUBE_DNS_NAMESPACE}, labels: {{kubernetes.io/service-name: {KUBE_DNS_NAME}}}}}\naddressType: {family}\nendpoints: [{{addresses: [\"{pod_ip}\"], conditions: {{ready: true, serving: true, terminating: false}}, targetRef: {{kind: Pod, namespace: {ns}, name: {name}}}}}]\nports: [{ports}]\n",
        family = family_name(f),
        ns = pod.namespace,
        name = pod.name,
        ports = ports.join(", "),
    ))
}

/// kube-dns's ports as the proxier of `ip`'s family sees them.
pub fn kube_dns_ports(ip: IpAddr, pod_ip: IpAddr) -> Vec<ServicePort> {
    KUBE_DNS_PORTS
        .iter()
        .map(|(n, p)| ServicePort {
            name: format!("{KUBE_DNS_NAMESPACE}/{KUBE_DNS_NAME}:{n}"),
            cluster_ip: ip,
            port: 53,
            protocol: *p,
            endpoints: vec![(pod_ip, 53)],
        })
        .collect()
}

/// One Service port as kube-proxy sees it.
pub struct ServicePort {
    /// `namespace/service:port-name`
    pub name: String,
    /// The ClusterIP of one family (kube-proxy runs one proxier per
    /// family, each seeing its family's ClusterIP and endpoints).
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Ready endpoints: address (of the ClusterIP's family) and target port.
    pub endpoints: Vec<(IpAddr, u16)>,
}

/// The ports of one pod's Service as the proxier of `ip`'s family sees
/// them, `pod_ip` the pod's address of that family.
pub fn service_ports(pod: &PodSpec, ip: IpAddr, pod_ip: Option<IpAddr>) -> Vec<ServicePort> {
    pod.ports
        .iter()
        .map(|p| ServicePort {
            name: format!(
                "{}/{}:{}",
                pod.namespace,
                service_name(pod),
                port_name_and_target(p).0
            ),
            cluster_ip: ip,
            port: p.port,
            protocol: p.protocol,
            endpoints: pod_ip.map(|a| (a, p.port)).into_iter().collect(),
        })
        .collect()
}

/// kube-proxy's chain names: a prefix and 16 characters of a hash of the
/// service port name and protocol (kube-proxy: base32 of a SHA-256; the
/// names only need to be stable and distinct here).
fn chain(prefix: &str, parts: &[&str]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    format!("{prefix}{:016X}", h.finish())
}

/// kube-proxy's iptables-mode ruleset for `ports`, all of family `f`, as
/// `iptables-restore --noflush` input (IPv4) or `ip6tables-restore
/// --noflush` input (IPv6, what kube-proxy's IPv6 proxier writes): nat
/// KUBE-SERVICES (from PREROUTING and OUTPUT) -> KUBE-SVC-* -> KUBE-SEP-*
/// DNAT, hairpin masquerade through KUBE-MARK-MASQ/KUBE-POSTROUTING, and
/// in the filter table a REJECT for a port without endpoints. IPv6: host
/// prefixes are `/128`, the REJECT an ICMPv6 port unreachable, DNAT
/// targets `[address]:port`.
pub fn kube_proxy_rules(f: Family, ports: &[ServicePort]) -> String {
    assert!(
        ports
            .iter()
            .all(|p| family_of(p.cluster_ip) == f
                && p.endpoints.iter().all(|(a, _)| family_of(*a) == f)),
        "kube_proxy_rules({f}): every ClusterIP and endpoint is of that family"
    );
    let (host, reject) = match f {
        Family::V4 => ("32", "icmp-port-unreachable"),
        Family::V6 => ("128", "icmp6-port-unreachable"),
    };
    // net.JoinHostPort, as kube-proxy writes the DNAT target.
    let target_of = |addr: IpAddr, port: u16| match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    let mut nat = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::new();
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let filter = String::from("*filter\n:KUBE-SERVICES - [0:0]\n");
    let mut filter_rules = String::new();
    for chain_in in ["INPUT", "FORWARD", "OUTPUT"] {
        let _ = writeln!(
            filter_rules,
            "-A {chain_in} -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        );
    }
    for sp in ports {
        let proto = sp.protocol.as_str().to_lowercase();
        let (ip, port, name) = (sp.cluster_ip, sp.port, &sp.name);
        if sp.endpoints.is_empty() {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -d {ip}/{host} -p {proto} -m comment --comment \"{name} has no endpoints\" -m {proto} --dport {port} -j REJECT --reject-with {reject}"
            );
            continue;
        }
        let svc = chain("KUBE-SVC-", &[name, &proto]);
        let _ = writeln!(nat, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {ip}/{host} -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {port} -j {svc}"
        );
        let n = sp.endpoints.len();
        for (i, (addr, target)) in sp.endpoints.iter().enumerate() {
            let to = target_of(*addr, *target);
            let sep = chain("KUBE-SEP-", &[name, &proto, &to]);
            let _ = writeln!(nat, ":{sep} - [0:0]");
            // kube-proxy's random spread: 1/n, 1/(n-1), ..., the last unconditional.
            let pick = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} -> {to}\"{pick} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {addr}/{host} -m comment --comment \"{name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p {proto} -m comment --comment \"{name}\" -m {proto} -j DNAT --to-destination {to}"
            );
        }
    }
    format!("{nat}{rules}COMMIT\n{filter}{filter_rules}COMMIT\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::case::PortSpec;

    fn pod() -> PodSpec {
        serde_yaml::from_str(
            "{namespace: x, name: a, ports: [{port: 80, name: serve-80-tcp}, {port: 81, protocol: UDP}]}",
        )
        .unwrap()
    }

    #[test]
    fn per_pod_service_and_slice_resolve_to_the_pod() {
        let p = pod();
        let svc = service_manifest(&p, &[cluster_ip(0).into()]).unwrap();
        assert_eq!(svc["metadata"]["name"], "s-x-a");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "serve-80-tcp");
        assert_eq!(svc["spec"]["ports"][1]["targetPort"], 81);
        let slice = endpoint_slice_manifest(&p, "10.213.0.5".parse().unwrap()).unwrap();
        // IPv4 runs write the manifests they always did.
        let mut before = yaml("apiVersion: v1\nkind: Service\nmetadata: {name: s-x-a, namespace: x}\nspec: {type: ClusterIP, clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10], ports: []}\n");
        before["spec"]["ports"] = svc["spec"]["ports"].clone();
        assert_eq!(svc, before);
        assert_eq!(slice["metadata"]["name"], "s-x-a-1");
        assert_eq!(slice["addressType"], "IPv4");
        // The agent reads them as a cluster would serve them.
        let text = format!(
            "{}---\n{}",
            serde_yaml::to_string(&svc).unwrap(),
            serde_yaml::to_string(&slice).unwrap()
        );
        let text = format!(
            "{text}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: 10.213.0.5}}\n"
        );
        let m = palisade_agent::manifests::parse_str("t", &text);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let r = palisade_agent::service_resolve::resolve(&m.into_snapshot());
        assert!(r.rejections.is_empty(), "{:?}", r.rejections);
        let got: Vec<String> = r
            .frontends
            .iter()
            .map(|f| format!("{}/{} -> {}", f.address, f.protocol, f.backends[0].address))
            .collect();
        assert_eq!(
            got,
            [
                "10.96.0.10:80/6 -> 10.213.0.5:80",
                "10.96.0.10:81/17 -> 10.213.0.5:81"
            ]
        );
        let none = PodSpec {
            ports: Vec::<PortSpec>::new(),
            node: None,
            host_network: false,
            ..pod()
        };
        assert!(service_manifest(&none, &[cluster_ip(1).into()]).is_none());
    }

    #[test]
    fn kube_proxy_rules_have_its_shape() {
        let p = pod();
        let mut ports = service_ports(
            &p,
            cluster_ip(0).into(),
            Some("10.213.0.5".parse().unwrap()),
        );
        ports[1].endpoints.clear();
        let r = kube_proxy_rules(Family::V4, &ports);
        assert!(r.starts_with("*nat\n"));
        assert!(r.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(r.contains("-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment \"x/s-x-a:serve-80-tcp cluster IP\" -m tcp --dport 80 -j KUBE-SVC-"));
        assert!(r.contains("-j DNAT --to-destination 10.213.0.5:80"));
        assert!(r.contains("-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment \"x/s-x-a:udp-81 has no endpoints\" -m udp --dport 81 -j REJECT"));
        assert_eq!(r.matches("COMMIT").count(), 2);
    }

    /// The manifests, beside pod x/a with `pod_ips`, as the agent reads
    /// them: no parse errors, no rejections, and whatever families the
    /// agent serves, a frontend translates to the pod's address of its own
    /// family only.
    fn agent_view(docs: &[Value], pod_ips: &[IpAddr]) -> palisade_agent::service_resolve::Resolved {
        let mut text: Vec<String> = docs
            .iter()
            .map(|d| serde_yaml::to_string(d).unwrap())
            .collect();
        let ips: Vec<String> = pod_ips.iter().map(|ip| format!("{{ip: '{ip}'}}")).collect();
        text.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: '{}', podIPs: [{}]}}\n",
            pod_ips[0],
            ips.join(", ")
        ));
        let m = palisade_agent::manifests::parse_str("t", &text.join("---\n"));
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let r = palisade_agent::service_resolve::resolve(&m.into_snapshot());
        assert!(r.rejections.is_empty(), "{:?}", r.rejections);
        for f in &r.frontends {
            for b in &f.backends {
                let same = pod_ips
                    .iter()
                    .find(|ip| ip.is_ipv6() == f.address.is_ipv6());
                assert_eq!(Some(&b.address.ip()), same, "{f:?}");
            }
        }
        r
    }

    #[test]
    fn ipv6_clusterips_mirror_the_ipv4_ones_in_a_ula_range() {
        assert_eq!(cluster_ip6(0).to_string(), "fd00:96::a");
        assert_eq!(cluster_ip6(6).to_string(), "fd00:96::10");
        assert_eq!(cluster_ip_of(Family::V4, 3), IpAddr::from(cluster_ip(3)));
        assert_eq!(cluster_ip_of(Family::V6, 3), IpAddr::from(cluster_ip6(3)));
        // In the range, unused ones included (a pod without a Service).
        let range = u128::from("fd00:96::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(SERVICE_RANGE6, "fd00:96::/112");
        for i in [0, 1, 65000] {
            assert_eq!(u128::from(cluster_ip6(i)) >> 16, range >> 16, "{i}");
            assert_eq!(
                u128::from(cluster_ip6(i)) & 0xffff,
                u128::from(u32::from(cluster_ip(i)) & 0xffff),
                "{i}"
            );
        }
        assert_eq!(cluster_ip6(0).segments()[0] & 0xfe00, 0xfc00, "ULA");
    }

    #[test]
    fn ipv6_service_and_slice_are_what_a_cluster_holds() {
        let p = pod();
        let six: IpAddr = "fd00:212:213:0:ad50:50::".parse().unwrap();
        let svc = service_manifest(&p, &[cluster_ip6(0).into()]).unwrap();
        assert_eq!(svc["spec"]["clusterIP"], "fd00:96::a");
        assert_eq!(svc["spec"]["clusterIPs"], yaml("[\"fd00:96::a\"]"));
        assert_eq!(svc["spec"]["ipFamilies"], yaml("[IPv6]"));
        assert_eq!(svc["spec"]["ipFamilyPolicy"], "SingleStack");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "serve-80-tcp");
        let slice = endpoint_slice_manifest(&p, six).unwrap();
        assert_eq!(slice["metadata"]["name"], "s-x-a-ipv6");
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "s-x-a"
        );
        assert_eq!(slice["addressType"], "IPv6");
        assert_eq!(
            slice["endpoints"][0]["addresses"][0],
            "fd00:212:213:0:ad50:50::"
        );
        assert_eq!(slice["ports"][1]["name"], "udp-81");
        // Read back as the agent reads them (it serves no IPv6 frontend
        // yet, and rejects nothing).
        let r = agent_view(&[svc, slice], &[six]);
        assert!(r.frontends.iter().all(|f| f.address.is_ipv6()));
    }

    #[test]
    fn dual_stack_service_has_both_clusterips_and_a_slice_per_family() {
        let p = pod();
        let (four, six): (IpAddr, IpAddr) = (
            "10.213.0.5".parse().unwrap(),
            "fd00:212:213:0:ad50:50::".parse().unwrap(),
        );
        let ips = [cluster_ip_of(Family::V4, 0), cluster_ip_of(Family::V6, 0)];
        let svc = service_manifest(&p, &ips).unwrap();
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(
            svc["spec"]["clusterIPs"],
            yaml("[\"10.96.0.10\", \"fd00:96::a\"]")
        );
        assert_eq!(svc["spec"]["ipFamilies"], yaml("[IPv4, IPv6]"));
        assert_eq!(svc["spec"]["ipFamilyPolicy"], "RequireDualStack");
        let s4 = endpoint_slice_manifest(&p, four).unwrap();
        let s6 = endpoint_slice_manifest(&p, six).unwrap();
        assert_ne!(s4["metadata"]["name"], s6["metadata"]["name"]);
        assert_eq!(
            (&s4["addressType"], &s6["addressType"]),
            (&yaml("IPv4"), &yaml("IPv6"))
        );
        let r = agent_view(&[svc, s4, s6], &[four, six]);
        let got: Vec<String> = r
            .frontends
            .iter()
            .filter(|f| f.address.is_ipv4())
            .map(|f| format!("{}/{} -> {}", f.address, f.protocol, f.backends[0].address))
            .collect();
        assert_eq!(
            got,
            [
                "10.96.0.10:80/6 -> 10.213.0.5:80",
                "10.96.0.10:81/17 -> 10.213.0.5:81"
            ]
        );
    }

    #[test]
    fn ipv6_kube_proxy_rules_have_its_shape() {
        let p = pod();
        let mut ports = service_ports(
            &p,
            cluster_ip6(0).into(),
            Some("fd00:212:213:0:ad50:50::".parse().unwrap()),
        );
        ports[1].endpoints.clear();
        let r = kube_proxy_rules(Family::V6, &ports);
        assert!(r.starts_with("*nat\n:KUBE-SERVICES - [0:0]\n"));
        for chain in ["PREROUTING", "OUTPUT"] {
            assert!(r.contains(&format!(
                "-A {chain} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
            )));
        }
        assert!(r.contains("-A KUBE-SERVICES -d fd00:96::a/128 -p tcp -m comment --comment \"x/s-x-a:serve-80-tcp cluster IP\" -m tcp --dport 80 -j KUBE-SVC-"));
        assert!(r.contains(" -s fd00:212:213:0:ad50:50::/128 -m comment --comment \"x/s-x-a:serve-80-tcp\" -j KUBE-MARK-MASQ\n"));
        assert!(r.contains("-m tcp -j DNAT --to-destination [fd00:212:213:0:ad50:50::]:80\n"));
        assert!(r.contains("-j MASQUERADE --random-fully\n"));
        assert!(r.contains("-A KUBE-SERVICES -d fd00:96::a/128 -p udp -m comment --comment \"x/s-x-a:udp-81 has no endpoints\" -m udp --dport 81 -j REJECT --reject-with icmp6-port-unreachable\n"));
        assert!(!r.contains("/32 ") && !r.contains("icmp-port-unreachable"));
        assert_eq!(r.matches("COMMIT").count(), 2);
        // The same chains as the IPv4 proxier's for the same Service port.
        let four = kube_proxy_rules(
            Family::V4,
            &service_ports(
                &p,
                cluster_ip(0).into(),
                Some("10.213.0.5".parse().unwrap()),
            ),
        );
        let svc_chain = |r: &str| {
            r.lines()
                .find(|l| l.starts_with(":KUBE-SVC-"))
                .map(str::to_string)
        };
        assert_eq!(svc_chain(&r), svc_chain(&four));
    }

    #[test]
    fn kube_dns_service_slices_and_rules() {
        let dns: PodSpec = serde_yaml::from_str(
            "{namespace: kube-system, name: coredns, labels: {k8s-app: kube-dns}, ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]}",
        )
        .unwrap();
        let ip = kube_dns_ip(Family::V4);
        let svc = kube_dns_service(&[ip, kube_dns_ip(Family::V6)]);
        assert_eq!(svc["metadata"]["name"], "kube-dns");
        assert_eq!(svc["spec"]["clusterIPs"][1], "fd00:96::2");
        assert_eq!(svc["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(svc["spec"]["ports"][1]["protocol"], "TCP");
        let pod_ip: IpAddr = "10.213.0.9".parse().unwrap();
        let slice = kube_dns_slice(&dns, pod_ip);
        // The agent resolves it to the DNS pod on both protocols.
        let svc4 = kube_dns_service(&[ip]);
        let text = format!(
            "{}---\n{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: coredns, namespace: kube-system}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: 10.213.0.9}}\n",
            serde_yaml::to_string(&svc4).unwrap(),
            serde_yaml::to_string(&slice).unwrap()
        );
        let m = palisade_agent::manifests::parse_str("t", &text);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let r = palisade_agent::service_resolve::resolve(&m.into_snapshot());
        assert!(r.rejections.is_empty(), "{:?}", r.rejections);
        let mut got: Vec<String> = r
            .frontends
            .iter()
            .map(|f| format!("{}/{} -> {}", f.address, f.protocol, f.backends[0].address))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "10.96.0.2:53/17 -> 10.213.0.9:53",
                "10.96.0.2:53/6 -> 10.213.0.9:53"
            ]
        );
        let rules = kube_proxy_rules(Family::V4, &kube_dns_ports(ip, pod_ip));
        assert!(rules.contains(
            "-d 10.96.0.2/32 -p udp -m comment --comment \"kube-system/kube-dns:dns cluster IP\""
        ));
        assert!(rules.contains("-m tcp -j DNAT --to-destination 10.213.0.9:53\n"));
    }

    #[test]
    #[should_panic(expected = "of that family")]
    fn rules_of_one_family_only() {
        let ports = service_ports(&pod(), cluster_ip(0).into(), None);
        kube_proxy_rules(Family::V6, &ports);
    }
}
