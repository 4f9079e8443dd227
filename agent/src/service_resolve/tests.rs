//! Resolution from manifests (the same objects the API serves).
use super::*;
use crate::manifests::parse_str;

fn view(yaml: &str) -> Snapshot {
    let m = parse_str("t.yaml", yaml);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    m.into_snapshot()
}

fn backends(r: &Resolved, addr: &str, proto: u8) -> Vec<String> {
    let addr: SocketAddr = addr.parse().unwrap();
    let f = r
        .frontends
        .iter()
        .find(|f| f.address == addr && f.protocol == proto)
        .unwrap_or_else(|| panic!("no frontend {addr}/{proto} in {:?}", r.frontends));
    f.backends.iter().map(|b| b.address.to_string()).collect()
}

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: ns, labels: {app: web}}
spec:
  containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: ns, labels: {app: web}}
spec:
  containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: ns, labels: {app: web}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: ns2, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.0.3}
"#;

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
  - {name: raw, port: 81, targetPort: 7000}
"#;

#[test]
fn derived_slices_resolve_named_ports_per_pod() {
    let r = resolve(&view(&format!("{PODS}---{WEB}")));
    assert!(r.rejections.is_empty(), "{:?}", r.rejections);
    // Each pod's own container port of that name; no address, no backend;
    // another namespace's pod never.
    assert_eq!(
        backends(&r, "10.96.0.10:80", 6),
        ["10.0.0.1:8080", "10.0.0.2:9090"]
    );
    // b has no UDP port "dns": left out of that port only.
    assert_eq!(backends(&r, "10.96.0.10:53", 17), ["10.0.0.1:5353"]);
    assert_eq!(
        backends(&r, "10.96.0.10:81", 6),
        ["10.0.0.1:7000", "10.0.0.2:7000"]
    );
    let f = &r.frontends[0];
    assert_eq!(f.service, ObjectKey::new("ns", "web"));
    assert_eq!(f.affinity_timeout_s, None);
    assert_eq!(
        f.backends[0].pod,
        Some(ObjectKey::new("ns", "a")),
        "backends name their pod"
    );
}

#[test]
fn given_slices_are_used_with_kube_proxys_conditions() {
    let slices = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
- addresses: [10.0.0.2]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.0.0.2]
  conditions: {ready: false, serving: false, terminating: true}
"#;
    let r = resolve(&view(&format!("{PODS}---{WEB}---{slices}")));
    assert!(r.rejections.is_empty(), "{:?}", r.rejections);
    // Ready ones only while there are any.
    assert_eq!(backends(&r, "10.96.0.10:80", 6), ["10.0.0.1:8080"]);
    // None ready: serving-and-terminating ones; not serving: never.
    assert_eq!(backends(&r, "10.96.0.10:53", 17), ["10.0.0.1:5353"]);
    // Given slices replace derivation: no slice port "raw", no backend.
    assert!(backends(&r, "10.96.0.10:81", 6).is_empty());
}

#[test]
fn without_derivation_a_service_without_slices_has_no_backends() {
    let mut v = view(&format!("{PODS}---{WEB}"));
    v.derive_endpoint_slices = false; // Kubernetes mode: the controller writes slices.
    let r = resolve(&v);
    assert_eq!(r.frontends.len(), 3);
    assert!(r.frontends.iter().all(|f| f.backends.is_empty()));
}

#[test]
fn headless_and_external_name_are_left_alone() {
    let r = resolve(&view(&format!(
        r#"{PODS}---
apiVersion: v1
kind: Service
metadata: {{name: headless, namespace: ns}}
spec: {{clusterIP: None, selector: {{app: web}}, ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: ext, namespace: ns}}
spec: {{type: ExternalName, externalName: example.com}}
"#
    )));
    assert!(r.frontends.is_empty(), "{:?}", r.frontends);
    assert!(r.rejections.is_empty(), "{:?}", r.rejections);
}

#[test]
fn session_affinity_and_dual_stack() {
    let r = resolve(&view(&format!(
        r#"{PODS}---
apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: ns}}
spec:
  clusterIPs: [10.96.0.20, "fd00::20"]
  selector: {{app: web}}
  sessionAffinity: ClientIP
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: short, namespace: ns}}
spec:
  clusterIP: 10.96.0.21
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}
  ports: [{{port: 80}}]
"#
    )));
    assert!(r.rejections.is_empty(), "{:?}", r.rejections);
    // Both families of the dual-stack Service are served, sorted by
    // address; these pods have no IPv6 address, so its IPv6 frontend has
    // no backend (new flows refused, as kube-proxy refuses them).
    assert_eq!(r.frontends.len(), 3);
    assert_eq!(r.frontends[0].affinity_timeout_s, Some(10800));
    assert_eq!(r.frontends[1].affinity_timeout_s, Some(60));
    assert_eq!(r.frontends[2].address, "[fd00::20]:80".parse().unwrap());
    assert_eq!(r.frontends[2].affinity_timeout_s, Some(10800));
    assert!(r.frontends[2].backends.is_empty());
}

const DUAL_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: ns, labels: {app: web}}
spec:
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: ns, labels: {app: web}}
spec:
  containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]
status: {podIP: "fd00::2", podIPs: [{ip: "fd00::2"}]}
"#;

#[test]
fn dual_stack_frontends_take_backends_of_their_own_family() {
    // Derived slices: one endpoint per pod and family.
    let r = resolve(&view(&format!(
        r#"{DUAL_PODS}---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns}}
spec:
  type: NodePort
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http, nodePort: 30080}}]
"#
    )));
    assert!(r.rejections.is_empty(), "{:?}", r.rejections);
    assert_eq!(backends(&r, "10.96.0.10:80", 6), ["10.0.0.1:8080"]);
    assert_eq!(
        backends(&r, "[fd00:96::10]:80", 6),
        ["[fd00::1]:8080", "[fd00::2]:9090"]
    );
    // The NodePort on both families' node addresses.
    assert_eq!(backends(&r, "0.0.0.0:30080", 6), ["10.0.0.1:8080"]);
    assert_eq!(backends(&r, "[::]:30080", 6).len(), 2);

    // Given slices: the IPv6 one feeds the IPv6 frontend only; an address
    // of the other family in a slice is left out and reported.
    let r = resolve(&view(&format!(
        r#"{DUAL_PODS}---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns}}
spec:
  clusterIPs: ["fd00:96::10", 10.96.0.10]
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-6, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
endpoints: [{{addresses: ["fd00::2"]}}, {{addresses: [10.0.0.1]}}]
ports: [{{name: http, port: 9090}}]
"#
    )));
    assert_eq!(backends(&r, "[fd00:96::10]:80", 6), ["[fd00::2]:9090"]);
    assert!(backends(&r, "10.96.0.10:80", 6).is_empty());
    assert_eq!(r.rejections.len(), 1, "{:?}", r.rejections);
    assert!(
        r.rejections[0].reason.contains("not an IPv6 address"),
        "{:?}",
        r.rejections
    );
}

#[test]
fn overlapping_frontends_go_to_the_older_service() {
    let svc = |name: &str, created: &str, port: u16| {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: ns, creationTimestamp: "{created}"}}
spec: {{clusterIP: 10.96.0.30, selector: {{app: web}}, ports: [{{port: {port}, targetPort: 8080}}, {{name: u, port: 1, protocol: UDP}}]}}
"#
        )
    };
    let yaml = format!(
        "{PODS}---{}---{}",
        svc("young", "2024-02-01T00:00:00Z", 80),
        svc("old", "2024-01-01T00:00:00Z", 80)
    );
    let r = resolve(&view(&yaml));
    let owner = |addr: &str, proto| {
        let a: SocketAddr = addr.parse().unwrap();
        r.frontends
            .iter()
            .find(|f| f.address == a && f.protocol == proto)
            .map(|f| f.service.name.clone())
    };
    assert_eq!(owner("10.96.0.30:80", 6).as_deref(), Some("old"));
    assert_eq!(owner("10.96.0.30:1", 17).as_deref(), Some("old"));
    assert_eq!(r.frontends.len(), 2);
    assert_eq!(r.rejections.len(), 2, "{:?}", r.rejections);
    assert!(r
        .rejections
        .iter()
        .all(|x| &*x.key.name == "young" && x.reason.contains("older Service ns/old")));
    // A different port of the same ClusterIP is not an overlap.
    let yaml = format!(
        "{PODS}---{}---{}",
        svc("young", "2024-02-01T00:00:00Z", 81).replace("port: 1,", "port: 2,"),
        svc("old", "2024-01-01T00:00:00Z", 80)
    );
    let r = resolve(&view(&yaml));
    assert!(r.rejections.is_empty(), "{:?}", r.rejections);
    assert_eq!(r.frontends.len(), 4);
}

#[test]
fn bad_objects_are_rejected_and_the_rest_keeps_working() {
    let bad = r#"
apiVersion: v1
kind: Service
metadata: {name: noip, namespace: ns}
spec: {selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: badport, namespace: ns}
spec: {clusterIP: 10.96.0.40, ports: [{port: 70000}]}
---
apiVersion: v1
kind: Service
metadata: {name: badproto, namespace: ns}
spec: {clusterIP: 10.96.0.41, ports: [{port: 80, protocol: ICMP}]}
---
apiVersion: v1
kind: Service
metadata: {name: badaffinity, namespace: ns}
spec: {clusterIP: 10.96.0.42, sessionAffinity: Sticky, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: badip, namespace: ns}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: good, namespace: ns}
spec: {clusterIP: 10.96.0.43, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: good-x, namespace: ns, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.0.0.1]
- addresses: [192.0.2.99]
- addresses: [10.0.0.2]
  targetRef: {kind: Pod, name: a}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, namespace: ns}
addressType: IPv4
endpoints: []
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: notype, namespace: ns, labels: {kubernetes.io/service-name: good}}
endpoints: [{addresses: [10.0.0.2]}]
ports: [{port: 8080}]
"#;
    let r = resolve(&view(&format!("{PODS}---{bad}")));
    let why = |name: &str| -> Vec<&str> {
        r.rejections
            .iter()
            .filter(|x| *x.key.name == *name)
            .map(|x| x.reason.as_str())
            .collect()
    };
    assert!(
        why("noip")[0].contains("spec.clusterIP is not set"),
        "{r:?}"
    );
    assert!(why("badport")[0].contains("spec.ports[0].port: 70000"));
    assert!(why("badproto")[0].contains("\"ICMP\""));
    assert!(why("badaffinity")[0].contains("spec.sessionAffinity"));
    assert!(why("badip")[0].contains("spec.clusterIPs[0]"));
    let slice = why("good-x");
    assert_eq!(slice.len(), 2, "{slice:?}");
    assert!(slice[0].contains("192.0.2.99 is no known pod's address"));
    assert!(slice[1].contains("names pod ns/a but is pod ns/b's address"));
    assert!(why("orphan")[0].contains("kubernetes.io/service-name"));
    assert!(why("notype")[0].contains("addressType \"\""), "{r:?}");
    // The good Service keeps its one known backend.
    assert_eq!(r.frontends.len(), 1, "{:?}", r.frontends);
    assert_eq!(backends(&r, "10.96.0.43:80", 6), ["10.0.0.1:8080"]);
}

#[test]
fn node_ports_external_ips_and_load_balancer_addresses_are_frontends_too() {
    let svc = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ns}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.7, "2001:db8::7"]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
status:
  loadBalancer: {ingress: [{ip: 198.51.100.9}, {hostname: lb.example.com}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: ns}
spec:
  clusterIP: 10.96.0.11
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30081}
"#;
    let r = resolve(&view(&format!("{PODS}---{svc}")));
    assert!(r.rejections.is_empty(), "{:?}", r.rejections);
    let want = ["10.0.0.1:8080", "10.0.0.2:9090"];
    for at in [
        "10.96.0.10:80",
        "192.0.2.7:80",
        "198.51.100.9:80",
        // Every node's address: the datapath serves 0.0.0.0 frontends on
        // addresses the ipcache calls host or remote-node.
        "0.0.0.0:30080",
    ] {
        assert_eq!(backends(&r, at, 6), want, "{at}");
    }
    // A ClusterIP Service's nodePort field means nothing.
    let plain: Vec<_> = r
        .frontends
        .iter()
        .filter(|f| f.service.name.as_ref() == "plain")
        .map(|f| f.address.to_string())
        .collect();
    assert_eq!(plain, ["10.96.0.11:80"]);

    let bad = svc.replace("nodePort: 30080", "nodePort: 70000");
    let r = resolve(&view(&format!("{PODS}---{bad}")));
    assert!(
        r.rejections.iter().any(|x| x
            .reason
            .contains("spec.ports[0].nodePort: 70000 is out of range")),
        "{:?}",
        r.rejections
    );
}
