//! A synthetic cluster for the scale benchmarks, as Kubernetes YAML (the
//! standalone agent reads it from a manifest directory) and, parsed by the
//! agent's own manifest reader, as the agent's `Model`.
//!
//! Shape: `namespaces` namespaces (labels `team`, `env`), pods spread over
//! them, each pod of one of `apps` apps per namespace (labels `app`,
//! `tier`, a named port `http`), so there is one label identity per
//! (namespace, app). Policies cycle through four shapes:
//!
//! 0. ingress from another app of the namespace on 8080/TCP (4 in 10);
//! 1. ingress from `tier: web` pods of the namespaces of a team, on the
//!    named port `http` and 9090 (3 in 10);
//! 2. egress to an ipBlock with an `except` on 443 and to another app on a
//!    port range 9000-9100 (2 in 10);
//! 3. isolation both ways with only DNS egress to any namespace (1 in 10).
use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use palisade_agent::{
    change::Change,
    compiler::Engine,
    manifests,
    model::{LocalEndpoint, Model, ObjectKey, Pod},
};

use crate::stats::Rng;

#[derive(Clone, Debug)]
pub struct Spec {
    pub namespaces: usize,
    pub pods: usize,
    pub policies: usize,
    pub apps: usize,
}

impl Spec {
    pub fn full() -> Self {
        Self {
            namespaces: 50,
            pods: 10_000,
            policies: 1000,
            apps: 20,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
}

pub struct Cluster {
    /// (file name, YAML text)
    pub files: Vec<(String, String)>,
    pub pods: Vec<PodInfo>,
}

pub fn ns_name(i: usize) -> String {
    format!("ns-{i:03}")
}

fn tier(app: usize) -> &'static str {
    ["web", "api", "db"][app % 3]
}

/// Pod addresses: 10.64.0.0/12 (only map keys; no traffic goes there).
pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + i as u32)
}

pub fn pod_yaml(out: &mut String, namespace: &str, name: &str, app: usize, ip: Ipv4Addr) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    app: app-{app}\n    tier: {tier}\nspec:\n  containers:\n  - name: main\n    image: bench\n    ports:\n    - name: http\n      containerPort: 8080\n      protocol: TCP\nstatus:\n  podIP: {ip}\n",
        tier = tier(app)
    );
}

/// One policy of shape `i % 10` (see the module docs).
pub fn policy_yaml(name: &str, namespace: &str, app: usize, shape: usize, spec: &Spec) -> String {
    let other = (app + 1) % spec.apps;
    let mut s = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  podSelector:\n    matchLabels:\n      app: app-{app}\n"
    );
    match shape % 10 {
        0..=3 => {
            let _ = write!(
                s,
                "  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: app-{other}\n    ports:\n    - protocol: TCP\n      port: 8080\n"
            );
        }
        4..=6 => {
            let team = (app + shape) % 10;
            let _ = write!(
                s,
                "  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels:\n          team: team-{team}\n      podSelector:\n        matchLabels:\n          tier: web\n    ports:\n    - protocol: TCP\n      port: http\n    - protocol: TCP\n      port: 9090\n"
            );
        }
        7..=8 => {
            let third = (app + 2) % spec.apps;
            let _ = write!(
                s,
                "  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: 10.0.0.0/8\n        except: [10.64.0.0/12]\n    ports:\n    - protocol: TCP\n      port: 443\n  - to:\n    - podSelector:\n        matchLabels:\n          app: app-{third}\n    ports:\n    - protocol: TCP\n      port: 9000\n      endPort: 9100\n"
            );
        }
        _ => {
            let _ = write!(
                s,
                "  policyTypes: [Ingress, Egress]\n  ingress: []\n  egress:\n  - to:\n    - namespaceSelector: {{}}\n    ports:\n    - protocol: UDP\n      port: 53\n"
            );
        }
    }
    s
}

pub fn generate(spec: &Spec) -> Cluster {
    let mut files = Vec::new();
    let mut ns = String::new();
    for i in 0..spec.namespaces {
        let _ = write!(
            ns,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n  labels:\n    team: team-{}\n    env: {}\n",
            ns_name(i),
            i % 10,
            if i % 2 == 0 { "prod" } else { "staging" }
        );
    }
    files.push(("00-namespaces.yaml".to_string(), ns));

    let mut pods = Vec::with_capacity(spec.pods);
    let per_file = 1000;
    let mut text = String::new();
    for i in 0..spec.pods {
        let n = i % spec.namespaces.max(1);
        let j = i / spec.namespaces.max(1);
        let app = j % spec.apps.max(1);
        let p = PodInfo {
            namespace: ns_name(n),
            name: format!("app-{app}-{j}"),
            ip: pod_ip(i),
        };
        pod_yaml(&mut text, &p.namespace, &p.name, app, p.ip);
        pods.push(p);
        if (i + 1) % per_file == 0 || i + 1 == spec.pods {
            files.push((
                format!("10-pods-{:03}.yaml", i / per_file),
                std::mem::take(&mut text),
            ));
        }
    }

    let mut pol = String::new();
    for i in 0..spec.policies {
        let n = i % spec.namespaces.max(1);
        let app = (i / spec.namespaces.max(1)) % spec.apps.max(1);
        pol.push_str(&policy_yaml(&format!("pol-{i}"), &ns_name(n), app, i, spec));
    }
    files.push(("20-policies.yaml".to_string(), pol));
    Cluster { files, pods }
}

impl Cluster {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, t)| t.len() as u64).sum()
    }

    /// The agent's model of this cluster (through its own manifest
    /// reader), with `local` pods as local endpoints on made-up ifindexes
    /// (the map sync only uses them as keys; nothing is attached).
    pub fn model(&self, local: usize) -> anyhow::Result<Model> {
        let mut m = manifests::Manifests::default();
        for (name, text) in &self.files {
            m.add_text(name, text);
        }
        m.finish();
        if !m.errors.is_empty() {
            anyhow::bail!(
                "generated manifests do not parse: {:?}",
                &m.errors[..m.errors.len().min(3)]
            );
        }
        let mut model = Model {
            host_ips: vec![Ipv4Addr::new(10, 255, 255, 1)],
            ..Default::default()
        };
        m.apply_to(&mut model);
        let mut rng = Rng::new(42);
        let mut chosen = BTreeMap::new();
        while chosen.len() < local.min(self.pods.len()) {
            let i = rng.below(self.pods.len() as u64) as usize;
            chosen.insert(i, ());
        }
        for (k, i) in chosen.keys().enumerate() {
            let p = &self.pods[*i];
            let cid = format!("local-{k}");
            model.endpoints.insert(
                cid.clone(),
                LocalEndpoint {
                    key: ObjectKey::new(&p.namespace, &p.name),
                    endpoint_id: k as u32 + 1,
                    ifindex: 1_000_000 + k as u32,
                    host_ifname: format!("fake{k}"),
                    ipv4: p.ip,
                    ipv6: None,
                    container_id: cid,
                    mac: [0; 6],
                },
            );
        }
        Ok(model)
    }
}

/// The agent's incremental engine loaded with `model`, in the order the
/// owner task feeds a first list: namespaces, pods, policies (already
/// parsed by the manifest reader), then the local endpoints.
pub fn engine(model: &Model) -> Engine {
    let mut e = Engine::new(model.audit, model.host_ips.clone());
    for ns in model.namespaces.values() {
        e.apply(Change::Namespace(ns.clone()));
    }
    for p in model.pods.values() {
        e.apply(Change::Pod(p.clone()));
    }
    for (k, p) in &model.policies {
        e.apply_parsed(k.clone(), p.clone());
    }
    for ep in model.endpoints.values() {
        e.add_endpoint(ep.clone());
    }
    e
}

/// A pod for the model directly (the "pod add" change).
pub fn model_pod(namespace: &str, name: &str, app: usize, ip: Ipv4Addr) -> Pod {
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: [
            ("app".to_string(), format!("app-{app}")),
            ("tier".to_string(), tier(app).to_string()),
        ]
        .into(),
        ip: Some(ip),
        ipv6: None,
        host_network: false,
        ports: vec![palisade_agent::model::ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: "TCP".into(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_cluster_parses_into_the_model_it_describes() {
        let spec = Spec {
            namespaces: 3,
            pods: 60,
            policies: 20,
            apps: 4,
        };
        let c = generate(&spec);
        let m = c.model(5).unwrap();
        assert_eq!(m.namespaces.len(), 3);
        assert_eq!(m.pods.len(), 60);
        assert_eq!(m.policies.len(), 20);
        assert_eq!(m.endpoints.len(), 5);
        let p = &m.pods[&ObjectKey::new("ns-001", "app-0-0")];
        assert_eq!(p.labels["app"], "app-0");
        assert_eq!(p.ip, Some(pod_ip(1)));
        assert!(m.namespaces["ns-001"].labels.contains_key("team"));
    }

    #[test]
    fn every_policy_shape_parses_and_compiles_without_rejection() {
        let spec = Spec {
            namespaces: 2,
            pods: 40,
            policies: 20,
            apps: 4,
        };
        let c = generate(&spec);
        let m = c.model(4).unwrap();
        let compiled = palisade_agent::compiler::Compiler::new().compile(&m);
        assert!(compiled.rejected.is_empty(), "{:?}", compiled.rejected);
        assert!(!compiled.maps.policy.is_empty());
        // The engine the update benchmark drives makes the same maps (its
        // numbering may differ; the sizes may not).
        let e = engine(&m);
        assert!(e.view().rejected.is_empty());
        assert_eq!(e.desired().policy.len(), compiled.maps.policy.len());
        assert_eq!(e.desired().ipcache.len(), compiled.maps.ipcache.len());
        assert_eq!(e.desired().endpoints.len(), compiled.maps.endpoints.len());
    }
}
