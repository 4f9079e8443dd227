//! The standalone source: a directory of Kubernetes YAML manifests.
//!
//! Every `*.yaml` / `*.yml` file directly in the directory (not in
//! subdirectories; names starting with `.` are skipped, so a mounted
//! ConfigMap's `..data` is ignored while its symlinked files are read), in
//! name order, each possibly holding several `---`-separated documents. The
//! kinds used are `Namespace` (v1), `Pod` (v1), `NetworkPolicy`
//! (networking.k8s.io/v1), `ClusterNetworkPolicy`
//! (policy.networking.k8s.io/v1alpha2), `Service` (v1), `EndpointSlice`
//! (discovery.k8s.io/v1) and `List` (of those). A Service without a given
//! EndpointSlice gets the ones its selector implies (`service_resolve`). A document that cannot be
//! parsed, or is of another kind, is reported in [`Manifests::errors`] and
//! skipped; every other document is kept. A later definition of the same
//! object replaces an earlier one (and is reported).
//!
//! Namespaces referenced by a pod or a policy but not declared are created
//! with no labels but `kubernetes.io/metadata.name`, which every namespace
//! carries.
//!
//! Each file is parsed once into its own [`Manifests`] ([`parse_file`]);
//! a directory is the [`Manifests::merge`] of its files in name order,
//! then [`Manifests::finish`]. The manifest source (`source.rs`) keeps the
//! per-file results and re-parses only files that changed.
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1 as core, discovery::v1::EndpointSlice, networking::v1::NetworkPolicy,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_yaml::Value;

use crate::{
    change::Snapshot,
    model::{convert, Model, Namespace, Node, ObjectKey, Pod},
};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manifests {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectKey, Arc<Pod>>,
    /// Shared with the snapshots built from them: a policy is parsed once
    /// and never copied afterwards.
    pub policies: BTreeMap<ObjectKey, Arc<NetworkPolicy>>,
    /// `kind: Node` documents (the cluster's nodes), by name.
    pub nodes: BTreeMap<String, Node>,
    /// ClusterNetworkPolicies by name.
    pub cluster_policies: BTreeMap<String, Arc<crate::cnp::ClusterNetworkPolicy>>,
    pub services: BTreeMap<ObjectKey, Arc<core::Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    /// One line per skipped file or document: `file: document N (line L): why`.
    pub errors: Vec<String>,
}

/// Reads every manifest in `dir`. Only failing to list the directory is an
/// error; unreadable files and bad documents end up in `errors`.
pub fn load_dir(dir: impl AsRef<Path>) -> io::Result<Manifests> {
    let mut m = Manifests::default();
    for path in yaml_files(dir.as_ref())? {
        match std::fs::read_to_string(&path) {
            Ok(text) => m.add_text(&path.display().to_string(), &text),
            Err(e) => m.errors.push(format!("{}: {e}", path.display())),
        }
    }
    m.finish();
    Ok(m)
}

/// The manifest files of a directory, sorted: `*.yaml`/`*.yml` directly in
/// it, not hidden (a mounted ConfigMap's `..data` is skipped, its symlinked
/// files are read).
pub fn yaml_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        if yaml && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses one file's text (for tests and single files).
pub fn parse_str(source: &str, text: &str) -> Manifests {
    let mut m = parse_file(source, text);
    m.finish();
    m
}

/// Parses one file of a directory: its objects and errors, without the
/// implied namespaces (those depend on every file: [`Manifests::finish`]
/// after [`Manifests::merge`]).
pub fn parse_file(source: &str, text: &str) -> Manifests {
    let mut m = Manifests::default();
    m.add_text(source, text);
    m
}

/// Splits a YAML stream into documents: (first line number, text).
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let marker = |m: &str| {
            line.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '#']))
        };
        if marker("---") || marker("...") {
            docs.push((start, std::mem::take(&mut cur)));
            start = i + 2;
            // `--- {inline: doc}` keeps its content.
            if let Some(rest) = line.strip_prefix("---").filter(|r| !r.trim().is_empty()) {
                cur.push_str(rest);
                cur.push('\n');
                start = i + 1;
            }
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    docs.push((start, cur));
    docs
}

impl Manifests {
    /// Adds the documents of one file.
    pub fn add_text(&mut self, source: &str, text: &str) {
        let mut n = 0;
        for (line, doc) in split_documents(text) {
            let value: Value = match serde_yaml::from_str(&doc) {
                Ok(v) => v,
                Err(e) => {
                    n += 1;
                    self.errors
                        .push(format!("{source}: document {n} (line {line}): {e}"));
                    continue;
                }
            };
            if value.is_null() {
                continue;
            }
            n += 1;
            let at = format!("{source}: document {n} (line {line})");
            self.add_value(&at, value);
        }
    }

    fn add_value(&mut self, at: &str, value: Value) {
        let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_string);
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            self.errors.push(format!(
                "{at}: not a Kubernetes object (apiVersion and kind required)"
            ));
            return;
        };
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "List") => {
                let items = match value.get("items") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Sequence(s)) => s.clone(),
                    Some(_) => {
                        self.errors.push(format!("{at}: List.items is not a list"));
                        return;
                    }
                };
                for (i, item) in items.into_iter().enumerate() {
                    self.add_value(&format!("{at} item {i}"), item);
                }
            }
            ("v1", "Namespace") => match serde_yaml::from_value::<core::Namespace>(value) {
                Ok(ns) => match convert::namespace(&ns) {
                    Some(ns) => {
                        if self.namespaces.contains_key(&ns.name) {
                            self.errors.push(format!(
                                "{at}: Namespace {} defined again; the later definition wins",
                                ns.name
                            ));
                        }
                        self.namespaces.insert(ns.name.clone(), ns);
                    }
                    None => self
                        .errors
                        .push(format!("{at}: Namespace: metadata.name is required")),
                },
                Err(e) => self.errors.push(format!("{at}: Namespace: {e}")),
            },
            ("v1", "Pod") => match serde_yaml::from_value::<core::Pod>(value) {
                Ok(p) => {
                    if let Some(why) = pod_problem(&p) {
                        self.errors.push(format!("{at}: Pod: {why}"));
                        return;
                    }
                    match convert::pod(&p) {
                        Some(pod) => {
                            let key = ObjectKey::new(&pod.namespace, &pod.name);
                            if self.pods.contains_key(&key) {
                                self.errors.push(format!(
                                    "{at}: Pod {key} defined again; the later definition wins"
                                ));
                            }
                            self.pods.insert(key, Arc::new(pod));
                        }
                        None => self
                            .errors
                            .push(format!("{at}: Pod: metadata.name is required")),
                    }
                }
                Err(e) => self.errors.push(format!("{at}: Pod: {e}")),
            },
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                match serde_yaml::from_value::<NetworkPolicy>(value) {
                    Ok(mut np) => match convert::key(&np.metadata) {
                        Some(key) => {
                            if self.policies.contains_key(&key) {
                                self.errors.push(format!(
                                    "{at}: NetworkPolicy {key} defined again; the later definition wins"
                                ));
                            }
                            np.metadata.namespace = Some(key.namespace.to_string());
                            self.policies.insert(key, Arc::new(np));
                        }
                        None => self
                            .errors
                            .push(format!("{at}: NetworkPolicy: metadata.name is required")),
                    },
                    Err(e) => self.errors.push(format!("{at}: NetworkPolicy: {e}")),
                }
            }
            ("v1", "Node") => match serde_yaml::from_value::<core::Node>(value) {
                Ok(n) => match convert::node(&n) {
                    Some(node) => {
                        if self.nodes.contains_key(&node.name) {
                            self.errors.push(format!(
                                "{at}: Node {} defined again; the later definition wins",
                                node.name
                            ));
                        }
                        self.nodes.insert(node.name.clone(), node);
                    }
                    None => self
                        .errors
                        .push(format!("{at}: Node: metadata.name is required")),
                },
                Err(e) => self.errors.push(format!("{at}: Node: {e}")),
            },
            (crate::cnp::API_VERSION, crate::cnp::KIND) => {
                match serde_yaml::from_value::<crate::cnp::ClusterNetworkPolicy>(value) {
                    Ok(c) => match c.metadata.name.clone() {
                        Some(name) => {
                            if self.cluster_policies.contains_key(&name) {
                                self.errors.push(format!(
                                    "{at}: ClusterNetworkPolicy {name} defined again; the later definition wins"
                                ));
                            }
                            self.cluster_policies.insert(name, Arc::new(c));
                        }
                        None => self.errors.push(format!(
                            "{at}: ClusterNetworkPolicy: metadata.name is required"
                        )),
                    },
                    Err(e) => self.errors.push(format!("{at}: ClusterNetworkPolicy: {e}")),
                }
            }
            ("v1", "Service") => {
                if let Some((key, svc)) = self.object::<core::Service>(at, "Service", value) {
                    if self.services.insert(key.clone(), svc).is_some() {
                        self.errors.push(format!(
                            "{at}: Service {key} defined again; the later definition wins"
                        ));
                    }
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                if let Some((key, es)) = self.object::<EndpointSlice>(at, "EndpointSlice", value) {
                    if self.endpoint_slices.insert(key.clone(), es).is_some() {
                        self.errors.push(format!(
                            "{at}: EndpointSlice {key} defined again; the later definition wins"
                        ));
                    }
                }
            }
            (v, k) => self
                .errors
                .push(format!("{at}: {v} {k} is not used by palisade; skipped")),
        }
    }

    /// A namespaced object kept as the API gives it (its namespace filled
    /// in); a parse error or a missing name is reported.
    fn object<T>(&mut self, at: &str, kind: &str, value: Value) -> Option<(ObjectKey, Arc<T>)>
    where
        T: serde::de::DeserializeOwned + k8s_openapi::Metadata<Ty = ObjectMeta>,
    {
        let mut obj = match serde_yaml::from_value::<T>(value) {
            Ok(o) => o,
            Err(e) => {
                self.errors.push(format!("{at}: {kind}: {e}"));
                return None;
            }
        };
        let Some(key) = convert::key(obj.metadata()) else {
            self.errors
                .push(format!("{at}: {kind}: metadata.name is required"));
            return None;
        };
        obj.metadata_mut().namespace = Some(key.namespace.to_string());
        Some((key, Arc::new(obj)))
    }

    /// Adds the objects and errors of a later file (`source`, parsed with
    /// [`parse_file`]): as in one file, a later definition replaces an
    /// earlier one and is reported.
    pub fn merge(&mut self, source: &str, later: &Manifests) {
        self.errors.extend(later.errors.iter().cloned());
        for (name, ns) in &later.namespaces {
            if self.namespaces.insert(name.clone(), ns.clone()).is_some() {
                self.errors.push(format!(
                    "{source}: Namespace {name} defined again (also in an earlier file); the later definition wins"
                ));
            }
        }
        for (key, pod) in &later.pods {
            if self.pods.insert(key.clone(), pod.clone()).is_some() {
                self.errors.push(format!(
                    "{source}: Pod {key} defined again (also in an earlier file); the later definition wins"
                ));
            }
        }
        for (name, n) in &later.nodes {
            if self.nodes.insert(name.clone(), n.clone()).is_some() {
                self.errors.push(format!(
                    "{source}: Node {name} defined again (also in an earlier file); the later definition wins"
                ));
            }
        }
        for (key, s) in &later.services {
            if self.services.insert(key.clone(), s.clone()).is_some() {
                self.errors.push(format!(
                    "{source}: Service {key} defined again (also in an earlier file); the later definition wins"
                ));
            }
        }
        for (key, s) in &later.endpoint_slices {
            if self
                .endpoint_slices
                .insert(key.clone(), s.clone())
                .is_some()
            {
                self.errors.push(format!(
                    "{source}: EndpointSlice {key} defined again (also in an earlier file); the later definition wins"
                ));
            }
        }
        for (key, np) in &later.policies {
            if self.policies.insert(key.clone(), np.clone()).is_some() {
                self.errors.push(format!(
                    "{source}: NetworkPolicy {key} defined again (also in an earlier file); the later definition wins"
                ));
            }
        }
        for (name, c) in &later.cluster_policies {
            if self
                .cluster_policies
                .insert(name.clone(), c.clone())
                .is_some()
            {
                self.errors.push(format!(
                    "{source}: ClusterNetworkPolicy {name} defined again (also in an earlier file); the later definition wins"
                ));
            }
        }
    }

    /// The objects as a source's complete view (no node addresses: a
    /// manifest directory has none).
    pub fn into_snapshot(self) -> Snapshot {
        Snapshot {
            namespaces: self.namespaces,
            pods: self.pods,
            policies: self.policies,
            host_ips: Vec::new(),
            nodes: self.nodes,
            services: self.services,
            endpoint_slices: self.endpoint_slices,
            // No EndpointSlice controller here: selectors imply the slices.
            derive_endpoint_slices: true,
            errors: self.errors,
            cluster_policies: self.cluster_policies,
        }
    }

    /// Creates the namespaces that objects reference but no document
    /// declares, and makes sure every namespace has its name label.
    pub fn finish(&mut self) {
        let referenced: Vec<String> = self
            .pods
            .keys()
            .chain(self.policies.keys())
            .chain(self.services.keys())
            .chain(self.endpoint_slices.keys())
            .map(|k| k.namespace.to_string())
            .collect();
        for name in referenced {
            self.namespaces
                .entry(name.clone())
                .or_insert_with(|| Namespace {
                    name,
                    labels: Default::default(),
                    audit: false,
                });
        }
        for (name, ns) in &mut self.namespaces {
            ns.labels.insert(convert::NAME_LABEL.into(), name.clone());
        }
    }

    /// Replaces the model's namespaces, pods and policies; endpoints, host
    /// addresses and the audit switch are left alone.
    pub fn apply_to(&self, model: &mut Model) {
        model.namespaces = self.namespaces.clone();
        model.pods = self.pods.clone();
        model.policies.clear();
        for (k, np) in &self.policies {
            model.add_policy(k.clone(), np);
        }
        model.cluster_policies.clear();
        for c in self.cluster_policies.values() {
            model.add_cluster_policy(c);
        }
        if model.cluster_policies.is_empty() {
            // Drops the hidden addresses policy too.
            model.remove_cluster_policy("");
        }
    }
}

/// What `convert::pod` would silently drop but a manifest author should hear.
fn pod_problem(p: &core::Pod) -> Option<String> {
    for (ci, c) in p.spec.iter().flat_map(|s| s.containers.iter()).enumerate() {
        for (pi, cp) in c.ports.iter().flatten().enumerate() {
            if !(1..=65535).contains(&cp.container_port) {
                return Some(format!(
                    "spec.containers[{ci}].ports[{pi}].containerPort: {} is out of range 1-65535",
                    cp.container_port
                ));
            }
        }
    }
    let ip = p.status.as_ref().and_then(|s| s.pod_ip.as_deref());
    if let Some(ip) = ip {
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Some(format!("status.podIP: {ip:?} is not an IP address"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ContainerPort;

    const GOOD_AND_BAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: prod
  labels: {team: a}
  annotations: {palisade.dev/audit: "true"}
---
# a broken document in the middle
apiVersion: v1
kind: Pod
metadata: {name: broken
  namespace: prod
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: prod
  labels: {app: web}
spec:
  containers:
  - name: c
    image: x
    ports:
    - {name: http, containerPort: 8080}
    - {name: dns, containerPort: 53, protocol: UDP}
status:
  podIP: 10.0.0.5
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: other}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
"#;

    #[test]
    fn nodes_are_read_with_labels_addresses_and_pod_cidrs() {
        let m = parse_str(
            "nodes.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n2, labels: {zone: b}}\nspec: {podCIDR: 10.0.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.2}, {type: InternalIP, address: 'fd00:9::2'}, {type: Hostname, address: n2}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {labels: {zone: c}}\n",
        );
        let n = &m.nodes["n2"];
        assert_eq!(n.labels["zone"], "b");
        assert_eq!(
            n.addresses,
            vec!["192.168.0.2".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            n.addresses6,
            vec!["fd00:9::2".parse::<std::net::Ipv6Addr>().unwrap()]
        );
        assert_eq!(n.pod_cidrs, vec!["10.0.1.0/24".parse().unwrap()]);
        assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
        assert!(m.errors[0].contains("Node: metadata.name is required"));
        assert_eq!(m.into_snapshot().nodes.len(), 1);
    }

    #[test]
    fn parses_good_documents_and_reports_bad_ones() {
        let m = parse_str("a.yaml", GOOD_AND_BAD);
        assert_eq!(m.errors.len(), 2, "{:?}", m.errors);
        assert!(
            m.errors[0].starts_with("a.yaml: document 2 (line 9)"),
            "{}",
            m.errors[0]
        );
        assert!(
            m.errors[1].contains("apps/v1 Deployment"),
            "{}",
            m.errors[1]
        );

        let prod = &m.namespaces["prod"];
        assert!(prod.audit);
        assert_eq!(prod.labels["team"], "a");
        assert_eq!(prod.labels["kubernetes.io/metadata.name"], "prod");
        // Referenced by the policy only: created implicitly.
        let other = &m.namespaces["other"];
        assert!(!other.audit);
        assert_eq!(other.labels.len(), 1);
        assert_eq!(other.labels["kubernetes.io/metadata.name"], "other");

        let web = &m.pods[&ObjectKey::new("prod", "web")];
        assert_eq!(web.labels["app"], "web");
        assert_eq!(web.ip, Some("10.0.0.5".parse().unwrap()));
        assert!(!web.host_network);
        assert_eq!(
            web.ports,
            vec![
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: "TCP".into()
                },
                ContainerPort {
                    name: Some("dns".into()),
                    port: 53,
                    protocol: "UDP".into()
                },
            ]
        );
        let np = &m.policies[&ObjectKey::new("other", "deny")];
        assert_eq!(
            np.spec.as_ref().unwrap().policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
    }

    #[test]
    fn defaults_and_host_network() {
        let m = parse_str(
            "b.yml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: h}\nspec:\n  hostNetwork: true\n  containers: [{name: c}]\n",
        );
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let h = &m.pods[&ObjectKey::new("default", "h")];
        assert!(h.host_network);
        assert_eq!(h.ip, None);
        assert!(m.namespaces.contains_key("default"));
    }

    #[test]
    fn type_errors_and_missing_fields_are_reported() {
        let text = "\
apiVersion: v1
kind: Pod
metadata: {namespace: x}
spec: {containers: []}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p}
spec: {podSelector: 7}
---
apiVersion: v1
kind: Pod
metadata: {name: badip}
spec: {containers: []}
status: {podIP: 10.0.0.300}
---
just a string
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: listed}
";
        let m = parse_str("c.yaml", text);
        assert_eq!(m.errors.len(), 4, "{:?}", m.errors);
        assert!(m.errors[0].contains("document 1") && m.errors[0].contains("metadata.name"));
        assert!(m.errors[1].contains("document 2") && m.errors[1].contains("NetworkPolicy"));
        assert!(m.errors[2].contains("status.podIP"));
        assert!(
            m.errors[3].contains("document 4") && m.errors[3].contains("not a Kubernetes object")
        );
        assert!(m.pods.is_empty());
        assert!(m.policies.is_empty());
        assert!(m.namespaces.contains_key("listed"));
    }

    #[test]
    fn later_definitions_win_and_are_reported() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {v: '1'}}
---
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {v: '2'}}
";
        let m = parse_str("d.yaml", text);
        assert_eq!(m.errors.len(), 1);
        assert_eq!(m.namespaces["a"].labels["v"], "2");
    }

    #[test]
    fn load_dir_reads_yaml_files_and_skips_the_rest() {
        let dir = std::env::temp_dir().join(format!("palisade-manifests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(
            dir.join("1-ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: one}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("2-pol.yml"),
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: one}\nspec: {podSelector: {}}\n---\na: [1, 2\n",
        )
        .unwrap();
        std::fs::write(dir.join("3-broken.yaml"), [0xff, 0xfe, 0x00]).unwrap();
        std::fs::write(dir.join("notes.txt"), "kind: Pod").unwrap();
        std::fs::write(dir.join(".hidden.yaml"), "kind: Pod").unwrap();
        std::fs::write(
            dir.join("sub/x.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: nested}\n",
        )
        .unwrap();

        let m = load_dir(&dir).unwrap();
        assert!(m.namespaces.contains_key("one"));
        assert!(!m.namespaces.contains_key("nested"));
        assert!(m.policies.contains_key(&ObjectKey::new("one", "p")));
        assert_eq!(m.errors.len(), 2, "{:?}", m.errors);
        assert!(
            m.errors[0].contains("2-pol.yml: document 2"),
            "{}",
            m.errors[0]
        );
        assert!(m.errors[1].contains("3-broken.yaml"), "{}", m.errors[1]);

        let mut model = Model::default();
        model.host_ips.push("192.168.1.1".parse().unwrap());
        m.apply_to(&mut model);
        assert_eq!(model.namespaces.len(), 1);
        assert_eq!(model.policies.len(), 1);
        assert_eq!(model.host_ips.len(), 1);

        assert!(load_dir(dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_parse_alone_and_merge_in_order() {
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {v: '1'}}\n";
        let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}}\n";
        // A file referencing a namespace another file declares: no implied
        // namespace until the merge is finished.
        let second = parse_file("2.yaml", np);
        assert!(second.namespaces.is_empty());
        let mut all = Manifests::default();
        all.merge("1.yaml", &parse_file("1.yaml", ns));
        all.merge("2.yaml", &second);
        all.merge("3.yaml", &parse_file("3.yaml", np));
        all.finish();
        assert_eq!(all.namespaces["a"].labels["v"], "1", "the declared one");
        assert_eq!(all.policies.len(), 1);
        assert_eq!(all.errors.len(), 1, "{:?}", all.errors);
        assert!(
            all.errors[0].starts_with("3.yaml: NetworkPolicy a/p defined again"),
            "{}",
            all.errors[0]
        );
        // The snapshot shares the parsed policy, it does not copy it.
        let snap = all.clone().into_snapshot();
        assert!(Arc::ptr_eq(
            &snap.policies[&ObjectKey::new("a", "p")],
            &all.policies[&ObjectKey::new("a", "p")]
        ));
        // Merging the same files gives what one text gives.
        let mut one = parse_str("x", &format!("{ns}---\n{np}"));
        one.errors.clear();
        all.errors.clear();
        assert_eq!(one, all);
    }

    #[test]
    fn services_and_endpoint_slices_are_read_and_bad_ones_reported() {
        let text = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: http}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1]}]
---
apiVersion: v1
kind: Service
metadata: {name: bad}
spec: {ports: 80}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: badendpoints}
addressType: IPv4
endpoints: 5
";
        let m = parse_str("s.yaml", text);
        assert_eq!(m.errors.len(), 2, "{:?}", m.errors);
        assert!(m.errors[0].contains("document 3") && m.errors[0].contains("Service:"));
        assert!(m.errors[1].contains("document 4") && m.errors[1].contains("EndpointSlice:"));
        let web = &m.services[&ObjectKey::new("shop", "web")];
        assert_eq!(web.metadata.namespace.as_deref(), Some("shop"));
        assert!(m
            .endpoint_slices
            .contains_key(&ObjectKey::new("shop", "web-1")));
        assert!(m.namespaces.contains_key("shop"), "implied namespace");
        let snap = m.into_snapshot();
        assert!(
            snap.derive_endpoint_slices,
            "no controller in standalone mode"
        );
        assert_eq!(snap.services.len(), 1);
    }

    #[test]
    fn document_splitting() {
        let docs = split_documents("a: 1\n---\nb: 2\n--- # c\nc: 3\n...\n---x: 4\n");
        let texts: Vec<&str> = docs.iter().map(|(_, d)| d.trim()).collect();
        assert_eq!(texts, vec!["a: 1", "b: 2", "# c\nc: 3", "---x: 4"]);
        assert_eq!(docs[1].0, 3);
    }
}
