//! `--via-services` (FORMAT version 2): one ClusterIP Service per pod, as
//! the upstream e2e suite makes them, with its EndpointSlice written as a
//! manifest, and kube-proxy's iptables rules for them installed in the node
//! namespace the way kube-proxy's iptables mode writes them, so probes to
//! the ClusterIPs go through kube-proxy's DNAT whether or not palisade
//! translates them itself.
use std::{
    fmt::Write as _,
    hash::{Hash, Hasher},
    net::Ipv4Addr,
};

use serde_yaml::Value;

use super::case::{PodSpec, Protocol};

/// ClusterIPs come from here; the range exists only inside each case's
/// namespaces (the node gets an unreachable route for the rest of it).
pub const SERVICE_RANGE: &str = "10.96.0.0/16";

/// The ClusterIP of the `i`th pod's Service.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    let n = 10 + i as u32; // 10.96.0.1-9 kept for kube-dns and friends
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + n)
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

/// The Service (None for a pod that serves no port: a Service needs one).
pub fn service_manifest(pod: &PodSpec, ip: Ipv4Addr) -> Option<Value> {
    if pod.ports.is_empty() {
        return None;
    }
    let mut doc = yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec: {{type: ClusterIP, clusterIP: {ip}, clusterIPs: [{ip}], ports: []}}\n",
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

/// The EndpointSlice the controller would write: the pod, ready, with the
/// resolved target ports under the Service's port names.
pub fn endpoint_slice_manifest(pod: &PodSpec, pod_ip: Ipv4Addr) -> Option<Value> {
    if pod.ports.is_empty() {
        return None;
    }
    let mut doc = yaml(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [\"{pod_ip}\"], conditions: {{ready: true, serving: true, terminating: false}}, targetRef: {{kind: Pod, namespace: {ns}, name: {name}}}}}]\nports: []\n",
        svc = service_name(pod),
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

/// One Service port as kube-proxy sees it.
pub struct ServicePort {
    /// `namespace/service:port-name`
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// Ready endpoints: address and target port.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// The ports of one pod's Service.
pub fn service_ports(pod: &PodSpec, ip: Ipv4Addr, pod_ip: Option<Ipv4Addr>) -> Vec<ServicePort> {
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

/// kube-proxy's iptables-mode ruleset for `ports`, as `iptables-restore
/// --noflush` input: nat KUBE-SERVICES (from PREROUTING and OUTPUT) ->
/// KUBE-SVC-* -> KUBE-SEP-* DNAT, hairpin masquerade through
/// KUBE-MARK-MASQ/KUBE-POSTROUTING, and in the filter table a REJECT for
/// a port without endpoints.
pub fn kube_proxy_rules(ports: &[ServicePort]) -> String {
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
                "-A KUBE-SERVICES -d {ip}/32 -p {proto} -m comment --comment \"{name} has no endpoints\" -m {proto} --dport {port} -j REJECT --reject-with icmp-port-unreachable"
            );
            continue;
        }
        let svc = chain("KUBE-SVC-", &[name, &proto]);
        let _ = writeln!(nat, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {ip}/32 -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {port} -j {svc}"
        );
        let n = sp.endpoints.len();
        for (i, (addr, target)) in sp.endpoints.iter().enumerate() {
            let sep = chain("KUBE-SEP-", &[name, &proto, &format!("{addr}:{target}")]);
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
                "-A {svc} -m comment --comment \"{name} -> {addr}:{target}\"{pick} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {addr}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p {proto} -m comment --comment \"{name}\" -m {proto} -j DNAT --to-destination {addr}:{target}"
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
        let svc = service_manifest(&p, cluster_ip(0)).unwrap();
        assert_eq!(svc["metadata"]["name"], "s-x-a");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "serve-80-tcp");
        assert_eq!(svc["spec"]["ports"][1]["targetPort"], 81);
        let slice = endpoint_slice_manifest(&p, "10.213.0.5".parse().unwrap()).unwrap();
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
            ..pod()
        };
        assert!(service_manifest(&none, cluster_ip(1)).is_none());
    }

    #[test]
    fn kube_proxy_rules_have_its_shape() {
        let p = pod();
        let mut ports = service_ports(&p, cluster_ip(0), Some("10.213.0.5".parse().unwrap()));
        ports[1].endpoints.clear();
        let r = kube_proxy_rules(&ports);
        assert!(r.starts_with("*nat\n"));
        assert!(r.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(r.contains("-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment \"x/s-x-a:serve-80-tcp cluster IP\" -m tcp --dport 80 -j KUBE-SVC-"));
        assert!(r.contains("-j DNAT --to-destination 10.213.0.5:80"));
        assert!(r.contains("-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment \"x/s-x-a:udp-81 has no endpoints\" -m udp --dport 81 -j REJECT"));
        assert_eq!(r.matches("COMMIT").count(), 2);
    }
}
