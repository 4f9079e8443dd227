//! The Kubernetes source: kube-rs reflectors over every Pod (remote pod
//! addresses feed the ipcache), Namespace and NetworkPolicy of the cluster
//! and over this Node. Any change yields a fresh `Snapshot` from the
//! stores. Watch restarts and 410 Gone are the watcher's job: it re-lists,
//! and the store is replaced with what the re-list returns.
use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use log::{info, warn};
use tokio::sync::{mpsc, Notify};

use crate::{daemon::Shared, model::convert, server::lock, source::Snapshot};

/// What the agent reads from the API server. deploy/'s ClusterRole is
/// checked against this table (deploy/tests), and `watch_cluster` builds its
/// watchers from the same resources.
pub struct Watched {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

pub const WATCHED: &[Watched] = &[
    Watched {
        group: "",
        resource: "pods",
        verbs: &["get", "list", "watch"],
    },
    Watched {
        group: "",
        resource: "namespaces",
        verbs: &["get", "list", "watch"],
    },
    Watched {
        group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: &["get", "list", "watch"],
    },
    Watched {
        group: "",
        resource: "nodes",
        verbs: &["get", "list", "watch"],
    },
];

/// This node's spec.podCIDR (for `install-cni --kubernetes`).
pub async fn node_pod_cidr(node: &str) -> Result<String> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let n = Api::<Node>::all(client)
        .get(node)
        .await
        .with_context(|| format!("reading node {node}"))?;
    n.spec.and_then(|s| s.pod_cidr).with_context(|| {
        format!(
            "node {node} has no spec.podCIDR (is the controller manager allocating node CIDRs?)"
        )
    })
}

/// Changes arriving within this window are compiled together.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// Start watching and apply the first complete snapshot before returning,
/// so the agent reports ready only once it enforces the cluster's policy.
pub async fn spawn(shared: Shared, node: Option<String>) -> Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let mut rx = watch_cluster(client, node);
    let first = rx
        .recv()
        .await
        .context("the Kubernetes watch ended before the first sync")?;
    let s = shared.clone();
    tokio::task::spawn_blocking(move || lock(&s).apply_snapshot(first)).await??;
    tokio::spawn(async move {
        while let Some(snap) = rx.recv().await {
            let s = shared.clone();
            match tokio::task::spawn_blocking(move || lock(&s).apply_snapshot(snap)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("applying the cluster view: {e:#}"),
                Err(e) => warn!("applying the cluster view: {e}"),
            }
        }
    });
    info!("watching the Kubernetes API");
    Ok(())
}

fn resource_of<K: Resource<DynamicType = ()>>() -> (String, String) {
    (K::group(&()).to_string(), K::plural(&()).to_string())
}

fn is_watched<K: Resource<DynamicType = ()>>() -> bool {
    let (g, r) = resource_of::<K>();
    WATCHED.iter().any(|w| w.group == g && w.resource == r)
}

/// One reflector: keep `store` current and ping `changed` on every event.
fn reflect<K>(api: Api<K>, cfg: watcher::Config, changed: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    assert!(
        is_watched::<K>(),
        "{:?} is not in WATCHED (RBAC)",
        resource_of::<K>()
    );
    let (reader, writer) = reflector::store();
    let stream = watcher(api, cfg)
        .default_backoff()
        .modify(|o: &mut K| {
            // Only labels, names, addresses and specs matter to policy.
            let m = o.meta_mut();
            m.managed_fields = None;
        })
        .reflect(writer);
    tokio::spawn(drive(stream, changed));
    reader
}

async fn drive<S, T>(stream: S, changed: Arc<Notify>)
where
    S: Stream<Item = Result<T, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(_) => changed.notify_one(),
            Err(e) => warn!("kubernetes watch: {e} (retrying with backoff)"),
        }
    }
}

/// Watch the cluster; every burst of changes yields one `Snapshot`.
pub fn watch_cluster(client: Client, node: Option<String>) -> mpsc::Receiver<Snapshot> {
    let changed = Arc::new(Notify::new());
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
    );
    let namespaces = reflect(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
    );
    let policies = reflect(
        Api::<NetworkPolicy>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
    );
    let node_cfg = match &node {
        Some(n) => watcher::Config::default().fields(&format!("metadata.name={n}")),
        None => watcher::Config::default(),
    };
    let nodes = node
        .as_ref()
        .map(|_| reflect(Api::<Node>::all(client), node_cfg, changed.clone()));

    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        // The first snapshot waits for every initial list.
        let _ = pods.wait_until_ready().await;
        let _ = namespaces.wait_until_ready().await;
        let _ = policies.wait_until_ready().await;
        if let Some(n) = &nodes {
            let _ = n.wait_until_ready().await;
        }
        loop {
            let snap = snapshot(&pods, &namespaces, &policies, nodes.as_ref());
            if tx.send(snap).await.is_err() {
                return;
            }
            changed.notified().await;
            tokio::time::sleep(DEBOUNCE).await;
        }
    });
    rx
}

fn snapshot(
    pods: &Store<Pod>,
    namespaces: &Store<Namespace>,
    policies: &Store<NetworkPolicy>,
    nodes: Option<&Store<Node>>,
) -> Snapshot {
    let mut s = Snapshot::default();
    for ns in namespaces.state() {
        if let Some(n) = convert::namespace(&ns) {
            s.namespaces.insert(n.name.clone(), n);
        }
    }
    for p in pods.state() {
        if let Some(p) = convert::pod(&p) {
            s.pods
                .insert(crate::model::ObjectKey::new(&p.namespace, &p.name), p);
        }
    }
    for np in policies.state() {
        if let Some(k) = convert::key(&np.metadata) {
            s.policies.insert(k, (*np).clone());
        }
    }
    if let Some(nodes) = nodes {
        s.host_ips = nodes
            .state()
            .iter()
            .flat_map(|n| n.status.iter().flat_map(|st| st.addresses.iter().flatten()))
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
            .collect();
    }
    s
}

#[cfg(test)]
mod tests {
    //! Recorded API-server responses through a tower-test mock service: the
    //! only mock in the project, because no API server runs on these machines.
    use std::collections::BTreeSet;

    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};
    use tower_test::mock::{self, Handle};

    use super::*;

    fn pod(name: &str, ip: &str, app: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}, "resourceVersion": "1"},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"podIP": ip, "phase": "Running"}})
    }

    fn list(kind: &str, rv: &str, items: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv}, "items": items}))
            .unwrap()
    }

    fn events(lines: &[Value]) -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| {
                let mut v = serde_json::to_vec(l).unwrap();
                v.push(b'\n');
                v
            })
            .collect()
    }

    /// Serve a scripted API server: lists by resource (the pods list changes
    /// after the first one), one scripted watch per resource, and watches
    /// that stay open afterwards.
    async fn api_server(mut handle: Handle<Request<Body>, Response<Body>>) {
        let mut pod_lists = 0;
        let mut pod_watches = 0;
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let uri = req.uri().to_string();
            let watch = uri.contains("watch=true");
            let body = if uri.starts_with("/api/v1/pods") && !watch {
                pod_lists += 1;
                if pod_lists == 1 {
                    list("PodList", "10", vec![pod("a", "10.0.0.1", "web")])
                } else {
                    // After 410 Gone: `a` was deleted while we were not watching.
                    list("PodList", "20", vec![pod("b", "10.0.0.2", "db")])
                }
            } else if uri.starts_with("/api/v1/pods") && watch && pod_watches == 0 {
                pod_watches += 1;
                events(&[
                    json!({"type": "ADDED", "object": pod("b", "10.0.0.2", "db")}),
                    json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "status": "Failure",
                        "code": 410, "reason": "Expired", "message": "too old resource version"}}),
                ])
            } else if uri.starts_with("/api/v1/namespaces") && !watch {
                list(
                    "NamespaceList",
                    "3",
                    vec![json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "default", "labels": {"team": "x"}}})],
                )
            } else if uri.starts_with("/apis/networking.k8s.io/v1/networkpolicies") && !watch {
                list(
                    "NetworkPolicyList",
                    "4",
                    vec![
                        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "deny", "namespace": "default"}, "spec": {"podSelector": {}}}),
                    ],
                )
            } else if uri.starts_with("/api/v1/nodes") && !watch {
                assert!(uri.contains("fieldSelector=metadata.name%3Dn1"), "{uri}");
                list(
                    "NodeList",
                    "5",
                    vec![
                        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
                    "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}, {"type": "Hostname", "address": "n1"}]}}),
                    ],
                )
            } else {
                // Later watches stay open with nothing to say.
                held.push(send);
                continue;
            };
            send.send_response(Response::new(Body::from(body)));
        }
    }

    fn names(s: &Snapshot) -> BTreeSet<String> {
        s.pods.keys().map(|k| k.name.clone()).collect()
    }

    #[tokio::test]
    async fn snapshots_follow_watch_events_and_relist_after_410_gone() {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(api_server(handle));
        let mut rx = watch_cluster(Client::new(svc, "default"), Some("n1".into()));

        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while let Ok(Some(s)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            let done = names(&s) == BTreeSet::from(["b".to_string()]);
            seen.push(s);
            if done {
                break;
            }
        }
        let first = &seen[0];
        assert_eq!(
            names(first),
            BTreeSet::from(["a".to_string()]),
            "initial list"
        );
        assert_eq!(
            first.namespaces["default"].labels["kubernetes.io/metadata.name"],
            "default"
        );
        assert_eq!(first.namespaces["default"].labels["team"], "x");
        assert_eq!(first.policies.len(), 1);
        assert_eq!(first.host_ips, vec![Ipv4Addr::new(192, 0, 2, 10)]);
        let a = &first.pods.values().next().unwrap();
        assert_eq!(a.ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(a.ports[0].name.as_deref(), Some("http"));
        assert!(
            seen.iter().any(|s| names(s).len() == 2),
            "the ADDED event was applied: {:?}",
            seen.iter().map(names).collect::<Vec<_>>()
        );
        let last = seen.last().unwrap();
        assert_eq!(
            names(last),
            BTreeSet::from(["b".to_string()]),
            "the relist after 410 replaced the store"
        );
    }

    #[test]
    fn every_watched_kind_is_in_the_rbac_table() {
        assert!(is_watched::<Pod>());
        assert!(is_watched::<Namespace>());
        assert!(is_watched::<NetworkPolicy>());
        assert!(is_watched::<Node>());
        assert_eq!(
            WATCHED.len(),
            4,
            "a resource in WATCHED that nothing watches"
        );
    }
}
