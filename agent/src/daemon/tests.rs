//! The agent's own logic on the in-memory dataplane: no root, no kernel.
//! The same paths run for real in tests/tests/agent_{restart,operations}.rs.
use std::{net::Ipv4Addr, path::PathBuf, sync::Arc};

use palisade_api::{ErrorKind, Registration};
use palisade_common::{maps as names, EP_INGRESS_ENFORCED};
use palisade_dataplane::{GcPass, Pins};

use super::{Agent, Config};
use crate::{
    dataplane::memory::{MemoryDataplane, Op},
    endpoints::Registry,
    manifests,
    metrics::Metrics,
    source::Snapshot,
};

/// A scratch directory (registry, sockets), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("palisade-agent-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }

    fn config(&self) -> Config {
        Config {
            socket: self.0.join("agent.sock"),
            pins: Pins::new(self.0.join("pins")),
            state_dir: self.0.join("state"),
            manifests: None,
            kubernetes: false,
            node_name: None,
            flow_log: self.0.join("flows.jsonl"),
            flow_log_max_bytes: 1 << 20,
            metrics_addr: None,
            audit: false,
            host_ips: Vec::new(),
            host_ips6: Vec::new(),
            xdp_uplinks: Vec::new(),
            xdp_deny: Vec::new(),
            map_sizes: Default::default(),
            pod_hook: Default::default(),
            local_delivery: Default::default(),
            verify_interval: None,
            verify_readiness: false,
            routing: crate::routing::Mode::None,
            endpoint_check_interval: std::time::Duration::from_secs(15),
            conntrack_budget: Default::default(),
            host_protection: None,
            dns: Default::default(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(s: &Scratch, dp: &MemoryDataplane) -> Agent {
    Agent::with_dataplane(
        &s.config(),
        Arc::new(Metrics::default()),
        Box::new(dp.clone()),
    )
    .expect("agent starts on the memory dataplane")
    .0
}

/// A pod with its host-side interface created in the fake interface table.
fn pod(dp: &MemoryDataplane, name: &str, last_octet: u8) -> (Registration, u32) {
    let host_ifname = format!("pal{name}");
    let ifindex = dp.add_interface(&host_ifname);
    let r = Registration {
        container_id: format!("c-{name}"),
        ifname: "eth0".into(),
        netns: format!("/run/netns/{name}"),
        namespace: "app".into(),
        pod: name.into(),
        ipv4: Some(Ipv4Addr::new(10, 244, 0, last_octet)),
        host_ifname,
        mac: None,
        ipv6: None,
    };
    (r, ifindex)
}

/// The Pod objects of the pods the tests register (a registration whose
/// pod the model lacks is held closed where policy could apply), with one
/// label set: one identity, as the tests count entries.
const APP_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {tier: app}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: app, labels: {tier: app}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: app, labels: {tier: app}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: app, labels: {tier: app}}
spec: {containers: [{name: c}]}
"#;

/// The policy alone: the registered pods stay unknown to the model.
fn isolating_policy_without_policy() -> Snapshot {
    let mut s = isolating_policy();
    s.policies.clear();
    s
}

fn isolating_policy_without_pods() -> Snapshot {
    let mut s = isolating_policy();
    s.pods.clear();
    s
}

/// Every pod in `app` isolated for ingress, TCP/80 allowed from any pod of
/// `app`: per selected endpoint, at least one policy entry. With the pods.
fn isolating_policy() -> Snapshot {
    let m = manifests::parse_str(
        "test",
        &(APP_PODS.to_string()
            + r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-from-app
  namespace: app
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector: {}
      ports:
        - protocol: TCP
          port: 80
"#),
    );
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    m.into_snapshot()
}

fn enforced(dp: &MemoryDataplane, ifindex: u32) -> bool {
    dp.maps()
        .endpoints
        .get(&ifindex)
        .is_some_and(|e| e.flags & EP_INGRESS_ENFORCED != 0)
}

fn position(log: &[Op], pred: impl Fn(&Op) -> bool) -> Option<usize> {
    log.iter().position(pred)
}

fn rposition(log: &[Op], pred: impl Fn(&Op) -> bool) -> Option<usize> {
    log.iter().rposition(pred)
}

#[test]
fn a_failed_attach_leaves_nothing_behind() {
    let s = Scratch::new("rollback");
    let dp = MemoryDataplane::new();
    let mut agent = start(&s, &dp);
    agent.apply_snapshot(isolating_policy()).unwrap();
    let (web, web_if) = pod(&dp, "web", 2);
    agent.register(web).unwrap();
    let before = dp.maps();
    assert!(enforced(&dp, web_if));

    let (db, db_if) = pod(&dp, "db", 3);
    dp.fail_attach(Some(&db.host_ifname));
    let e = agent.register(db.clone()).unwrap_err();
    assert!(format!("{e:#}").contains("attaching programs"), "{e:#}");

    // The entries were written (they must precede the attach), then removed.
    let log = dp.log();
    assert!(log.contains(&Op::UpsertEndpoint {
        ifindex: db_if,
        flags: EP_INGRESS_ENFORCED
    }));
    assert!(log.contains(&Op::RemoveEndpoint { ifindex: db_if }));
    // (But for web's generation: db's address came and went, so web's
    // flows are judged again on their next packet; see sync.rs.)
    assert_eq!(
        crate::sync::without_generations(&dp.maps()),
        crate::sync::without_generations(&before),
        "the maps are as before the attempt"
    );
    assert!(!dp.attached().contains(&db_if));
    assert!(dp.attached().contains(&web_if));
    assert!(agent.registry.get(&db.container_id).is_none());
    assert!(!agent.current.endpoints.contains_key(&db_if));
    // Also on disk: a restarted agent would not know the pod either.
    let on_disk = Registry::open(&s.config().state_dir).unwrap();
    assert!(on_disk.get(&db.container_id).is_none());
    assert_eq!(on_disk.len(), 1);

    // Once attaching works, the same ADD (the runtime's retry) succeeds.
    dp.fail_attach(None);
    agent.register(db).unwrap();
    assert!(enforced(&dp, db_if));
    assert!(dp.attached().contains(&db_if));
}

#[test]
fn a_restarted_agent_adopts_the_kernel_state_and_forgets_vanished_pods() {
    let s = Scratch::new("restart");
    let dp = MemoryDataplane::new();
    let mut first = start(&s, &dp);
    // Pods the model does not know (held closed both ways): their label
    // identity cannot change when the restarted agent learns their labels.
    first
        .apply_snapshot(isolating_policy_without_pods())
        .unwrap();
    let (web, web_if) = pod(&dp, "web", 2);
    let (db, db_if) = pod(&dp, "db", 3);
    first.register(web.clone()).unwrap();
    first.register(db.clone()).unwrap();
    let written = dp.maps();
    // kill -9: nothing is cleaned up. While the agent is down, db's
    // interface goes away.
    drop(first);
    dp.remove_interface(&db.host_ifname);
    dp.clear_log();

    let mut second = start(&s, &dp);
    // The kernel's maps were read back as the mirror, before any sync.
    assert_eq!(*second.current, written);
    assert!(second.registry.get(&web.container_id).is_some());
    assert!(
        second.registry.get(&db.container_id).is_none(),
        "an endpoint whose interface vanished is forgotten"
    );
    assert_eq!(dp.attached().into_iter().collect::<Vec<_>>(), vec![web_if]);
    // Adoption touched nothing of the live pod: no detach, no re-attach,
    // no write.
    let log = dp.log();
    assert!(
        !log.iter().any(|op| matches!(op,
            Op::AttachPod { ifindex } | Op::DetachPod { ifindex } if *ifindex == web_if)),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|op| matches!(op, Op::UpsertEndpoint { .. })),
        "{log:?}"
    );

    // The first sync removes what belonged to db and leaves web as it was.
    dp.clear_log();
    let web_flags = dp.maps().endpoints[&web_if].flags & !palisade_common::EP_NO_ENTRIES_MASK;
    second
        .apply_snapshot(isolating_policy_without_pods())
        .unwrap();
    assert!(!dp.maps().endpoints.contains_key(&db_if));
    assert!(enforced(&dp, web_if));
    let log = dp.log();
    assert!(
        log.contains(&Op::RemoveEndpoint { ifindex: db_if }),
        "{log:?}"
    );
    // Web's value is unchanged; only its generation may move on (db's
    // address went: flows with it are judged again; see sync.rs).
    assert!(
        !log.iter().any(|op| matches!(op,
            Op::UpsertEndpoint { ifindex, flags } if *ifindex == web_if
                && *flags != web_flags)),
        "web's entry is rewritten by nobody: {log:?}"
    );
    assert_eq!(*second.current, dp.maps());
}

#[test]
fn a_full_policy_map_writes_what_fits_enforces_and_is_counted() {
    let s = Scratch::new("full");
    let dp = MemoryDataplane::new();
    let mut agent = start(&s, &dp);
    let (web, web_if) = pod(&dp, "web", 2);
    let (db, db_if) = pod(&dp, "db", 3);
    agent.register(web).unwrap();
    agent.register(db).unwrap();
    assert!(!enforced(&dp, web_if) && !enforced(&dp, db_if));

    // Room for one policy entry only: two endpoints need at least two.
    dp.set_capacity(|c| c.policy = Some(1));
    let e = agent.apply_snapshot(isolating_policy()).unwrap_err();
    assert!(format!("{e:#}").contains("full"), "{e:#}");
    assert_eq!(dp.maps().policy.len(), 1, "what fits was written");
    assert!(
        enforced(&dp, web_if) && enforced(&dp, db_if),
        "enforcement still switched on (fail closed)"
    );
    assert_eq!(*agent.current, dp.maps(), "the mirror is exact");
    assert_eq!(agent.metrics.sync_errors.get(), 1);
    assert_eq!(agent.metrics.map_full.get(names::POLICY), 1);
    let fill = agent.map_fill();
    let policy = fill.iter().find(|m| m.name == "policy").unwrap();
    assert_eq!((policy.entries, policy.max_entries), (1, 1));

    // With room again, the next change writes the rest.
    dp.set_capacity(|c| c.policy = None);
    agent.apply_snapshot(isolating_policy()).unwrap();
    assert_eq!(
        dp.maps().policy,
        agent.engine.desired().policy,
        "everything compiled is in the kernel"
    );
    assert_eq!(agent.metrics.sync_errors.get(), 1);
}

#[test]
fn allows_go_in_before_enforcement_and_out_after_it() {
    let s = Scratch::new("order");
    let dp = MemoryDataplane::new();
    let mut agent = start(&s, &dp);
    let (web, web_if) = pod(&dp, "web", 2);
    agent.register(web).unwrap();
    assert!(!enforced(&dp, web_if));

    dp.clear_log();
    agent.apply_snapshot(isolating_policy()).unwrap();
    let log = dp.log();
    let on = position(&log, |op| {
        *op == Op::UpsertEndpoint {
            ifindex: web_if,
            flags: EP_INGRESS_ENFORCED,
        }
    })
    .expect("enforcement switched on");
    let last_allow =
        rposition(&log, |op| matches!(op, Op::UpsertPolicy { .. })).expect("allows written");
    assert!(last_allow < on, "allows before enforcement: {log:?}");
    if let Some(ipc) = rposition(&log, |op| matches!(op, Op::UpsertIpcache { .. })) {
        assert!(ipc < on, "identities before enforcement: {log:?}");
    }

    dp.clear_log();
    agent.apply_snapshot(Snapshot::default()).unwrap();
    let log = dp.log();
    let off = position(&log, |op| {
        *op == Op::UpsertEndpoint {
            ifindex: web_if,
            flags: 0,
        }
    })
    .expect("enforcement switched off");
    let first_removal =
        position(&log, |op| matches!(op, Op::RemovePolicy { .. })).expect("allows removed");
    assert!(
        off < first_removal,
        "removals after enforcement off: {log:?}"
    );
    assert!(dp.maps().policy.is_empty());
}

#[test]
fn conntrack_fill_comes_from_the_last_gc_pass() {
    let s = Scratch::new("fill");
    let dp = MemoryDataplane::new();
    let mut agent = start(&s, &dp);
    let (web, _) = pod(&dp, "web", 5);
    agent.register(web).expect("registers");
    let id = agent.model().endpoints["c-web"].endpoint_id;
    let ct = |a: &Agent| {
        a.map_fill()
            .into_iter()
            .find(|m| m.name == "conntrack")
            .map(|m| (m.entries, m.max_entries))
            .unwrap()
    };
    assert_eq!(ct(&agent).0, 0, "nothing known before the first pass");
    // The memory dataplane has no pinned maps: no GC of its own to open.
    assert!(agent.conntrack_gc().is_err());
    assert_eq!(agent.status().endpoints[0].conntrack, None);
    let held = palisade_common::ct_budget::CtCharge {
        entries: 40,
        fragments: 2,
    };
    agent.conntrack_fill.record(GcPass {
        removed: 3,
        conntrack_entries: 42,
        conntrack_max: 1000,
        fragment_entries: 2,
        fragment_max: 10,
        charges: vec![(id, held)],
        over_budget: vec![(id, held)],
        ..Default::default()
    });
    assert_eq!(ct(&agent), (42, 1000));
    // Each endpoint's share, and whether it is spent, in its status.
    assert_eq!(
        agent.status().endpoints[0].conntrack,
        Some(palisade_api::ConntrackCharge {
            entries: 40,
            fragments: 2,
            budget_spent: true,
        })
    );
    assert_eq!(
        agent
            .status()
            .maps
            .iter()
            .find(|m| m.name == "conntrack")
            .map(|m| m.entries),
        Some(42)
    );
}

#[test]
fn a_live_pods_address_or_interface_cannot_be_claimed_by_another_container() {
    let s = Scratch::new("claims");
    let dp = MemoryDataplane::default();
    let mut agent = start(&s, &dp);
    let (a, _) = pod(&dp, "a", 5);
    agent.register(a.clone()).expect("a registers");

    // Same address, another container, a's interface still there: refused.
    let (mut b, _) = pod(&dp, "b", 6);
    b.ipv4 = a.ipv4;
    let e = agent.register(b.clone()).expect_err("address taken");
    assert_eq!(
        crate::error::kind_of(&e),
        palisade_api::ErrorKind::Conflict,
        "{e:#}"
    );
    // Same interface, another container: refused too.
    let mut c = b.clone();
    c.container_id = "c-c".into();
    c.ipv4 = Some(Ipv4Addr::new(10, 244, 0, 7));
    c.host_ifname = a.host_ifname.clone();
    assert!(agent.register(c).is_err());
    assert_eq!(agent.model().endpoints.len(), 1, "a alone is registered");

    // a's interface goes away without a DEL (a crashed runtime): its
    // registration is stale, and b takes the address.
    dp.remove_interface(&a.host_ifname);
    agent
        .register(b.clone())
        .expect("the stale claim is forgotten");
    let eps: Vec<String> = agent.model().endpoints.keys().cloned().collect();
    assert_eq!(eps, vec![b.container_id.clone()]);
}

/// Issue 17: a DEL whose deregistration never reached the agent leaves no
/// stale endpoint once the interface is gone: the periodic check forgets
/// it and its address stops carrying its identity.
#[test]
fn endpoints_whose_interface_vanished_are_reaped_while_running() {
    let s = Scratch::new("reap");
    let dp = MemoryDataplane::default();
    let mut agent = start(&s, &dp);
    agent.apply_snapshot(isolating_policy()).expect("policy");
    let (a, _) = pod(&dp, "a", 5);
    let (b, _) = pod(&dp, "b", 6);
    agent.register(a.clone()).expect("a");
    agent.register(b.clone()).expect("b");
    assert_eq!(agent.reap_vanished_endpoints().expect("check"), 0);
    let ip = u32::from(a.ipv4.expect("v4")).to_be();
    assert!(dp.lock().endpoints_by_ip.contains_key(&ip));

    dp.remove_interface(&a.host_ifname);
    assert_eq!(agent.reap_vanished_endpoints().expect("check"), 1);
    let eps: Vec<String> = agent.model().endpoints.keys().cloned().collect();
    assert_eq!(eps, vec![b.container_id.clone()]);
    assert!(
        !dp.lock().endpoints_by_ip.contains_key(&ip),
        "a's address is no longer an endpoint"
    );
    assert_eq!(agent.reap_vanished_endpoints().expect("check"), 0);
}

#[test]
fn malformed_registrations_are_invalid_requests() {
    let s = Scratch::new("invalid");
    let dp = MemoryDataplane::default();
    let mut agent = start(&s, &dp);
    let (good, _) = pod(&dp, "a", 5);
    let cases: [fn(&mut Registration); 13] = [
        |r| r.container_id.clear(),
        |r| r.container_id = "../../etc".into(),
        |r| r.pod.clear(),
        |r| r.host_ifname = "a/b".into(),
        |r| r.host_ifname = "x".repeat(16),
        |r| r.ipv4 = Some(Ipv4Addr::UNSPECIFIED),
        |r| r.ipv4 = Some(Ipv4Addr::new(224, 0, 0, 1)),
        |r| r.mac = Some("02:00:00:00:00".into()),
        |r| r.mac = Some("01:00:5e:00:00:01".into()),
        |r| r.mac = Some("zz:00:00:00:00:01".into()),
        |r| r.ipv4 = None,
        |r| r.ipv6 = Some("fe80::1".parse().unwrap()),
        |r| r.ipv6 = Some("ff02::1".parse().unwrap()),
    ];
    for (i, break_it) in cases.iter().enumerate() {
        let mut r = good.clone();
        break_it(&mut r);
        let e = agent.register(r).expect_err("invalid");
        assert_eq!(
            crate::error::kind_of(&e),
            palisade_api::ErrorKind::InvalidRequest,
            "case {i}: {e:#}"
        );
    }
    assert!(agent.model().endpoints.is_empty());
    agent.register(good).expect("the valid one registers");
}

/// The owner: source events queued before a barrier are applied before it
/// answers; a failed apply is reported by the next barrier (`sync`), and
/// readiness is published without asking the owner.
#[test]
fn the_owner_orders_source_events_before_barriers_and_reports_failures() {
    use crate::{change::SourceEvent, owner::Owner};
    let s = Scratch::new("owner");
    let dp = MemoryDataplane::default();
    let agent = start(&s, &dp);
    let (a, ifindex) = pod(&dp, "a", 5);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let owner = Owner::spawn(agent, rx).expect("owner");
        assert!(!*owner.ready.borrow(), "not ready before the first view");
        tx.send(SourceEvent::Resync(Snapshot::default()))
            .await
            .unwrap();
        let g1 = owner.handle.barrier().await.expect("first view applied");
        assert!(*owner.ready.clone().wait_for(|r| *r).await.unwrap());
        owner.handle.register(a).await.expect("registers");
        assert!(!enforced(&dp, ifindex));

        tx.send(SourceEvent::Resync(isolating_policy()))
            .await
            .unwrap();
        let g2 = owner.handle.barrier().await.expect("policy applied");
        assert!(g2 > g1);
        assert!(enforced(&dp, ifindex), "the barrier came after the policy");

        // A policy map with no room: the apply fails; `sync` says so.
        dp.set_capacity(|c| c.policy = Some(0));
        let mut more = isolating_policy();
        let port_81 = manifests::parse_str(
            "test",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p81, namespace: app}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 81}]}]\n",
        )
        .into_snapshot();
        more.policies.extend(port_81.policies);
        tx.send(SourceEvent::Resync(more)).await.unwrap();
        let e = owner.handle.barrier().await.expect_err("a full map");
        assert_eq!(
            crate::error::kind_of(&e),
            palisade_api::ErrorKind::MapFull,
            "{e:#}"
        );
        let agent = owner.shutdown().await.expect("stops");
        assert_eq!(agent.model().endpoints.len(), 1);
    });
}

/// Registration churn leaves nothing behind: after every pod that came
/// has gone, the engine, the kernel mirror and the published view are
/// what they were before the first one.
#[test]
fn registration_churn_leaves_no_state_behind() {
    let s = Scratch::new("churn");
    let dp = MemoryDataplane::default();
    let mut agent = start(&s, &dp);
    let mut yaml = String::new();
    for i in 0..300 {
        yaml.push_str(&format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: app, labels: {{app: a{}}}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: 10.1.{}.{}}}\n", i % 20, i / 250, i % 250));
    }
    for i in 0..30 {
        yaml.push_str(&format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{i}, namespace: app}}\nspec:\n  podSelector: {{matchLabels: {{app: a{}}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}], ports: [{{port: 80}}]}}]\n  egress: [{{to: [{{namespaceSelector: {{}}}}], ports: [{{port: 53, protocol: UDP}}]}}]\n", i % 20, (i + 1) % 20));
    }
    let m = manifests::parse_str("big", &yaml);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    agent.apply_snapshot(m.into_snapshot()).unwrap();
    let before = (agent.engine.desired().clone(), (*agent.current).clone());
    let view = agent.view();
    let pods: Vec<(Registration, u32)> = (0..20)
        .map(|i| pod(&dp, &format!("q{i}"), 10 + i as u8))
        .collect();
    for round in 0..10 {
        for (r, _) in &pods {
            let mut r = r.clone();
            // Pods of the manifests, so policies select them.
            r.pod = format!("p{}", round * 7 % 20);
            agent.register(r).unwrap();
        }
        assert!(agent.current.policy.len() > before.1.policy.len());
        for (r, _) in &pods {
            agent.deregister(&r.container_id).unwrap();
        }
    }
    assert_eq!(
        agent.engine.desired(),
        &before.0,
        "desired state back to where it was"
    );
    assert_eq!(
        *agent.current, before.1,
        "kernel mirror back to where it was"
    );
    assert_eq!(dp.maps(), before.1, "and so is the (fake) kernel");
    let after = agent.view();
    assert!(after.endpoints.is_empty() && after.endpoints_by_id.is_empty());
    assert_eq!(after.identities.len(), view.identities.len());
    assert_eq!(after.cookies.len(), view.cookies.len());
}

fn frontend(name: &str, port: u16, backends: &[&str]) -> crate::service::Frontend {
    crate::service::Frontend {
        service: crate::model::ObjectKey::new("default", name),
        port_name: String::new(),
        address: format!("10.96.0.20:{port}").parse().unwrap(),
        protocol: palisade_common::PROTO_TCP,
        backends: backends
            .iter()
            .map(|b| crate::service::Backend {
                address: b.parse().unwrap(),
                pod: None,
            })
            .collect(),
        affinity_timeout_s: None,
    }
}

#[test]
fn programmed_services_name_their_ids_and_survive_a_restart() {
    let s = Scratch::new("services");
    let dp = MemoryDataplane::new();
    let mut agent = start(&s, &dp);
    agent
        .program_services(vec![frontend("web", 80, &["10.0.0.2:8080"])])
        .unwrap();
    let ids = agent.services.read().unwrap().clone();
    assert_eq!(ids.len(), 1);
    let (id, f) = ids.iter().next().unwrap();
    assert_eq!(f.service.to_string(), "default/web");
    assert_eq!(dp.lock().frontends.values().next().unwrap().service_id, *id);
    assert_eq!(agent.metrics.services_programmed.get(), 1);

    // A frontend the datapath cannot translate is refused by name; the
    // others stay programmed. sessionAffinity ClientIP is programmed.
    let mut sticky = frontend("sticky", 81, &["10.0.0.3:80"]);
    sticky.affinity_timeout_s = Some(60);
    let mut sctp = frontend("sctp", 82, &["10.0.0.3:80"]);
    sctp.protocol = palisade_common::PROTO_SCTP;
    let e = agent
        .program_services(vec![frontend("web", 80, &["10.0.0.2:8080"]), sticky, sctp])
        .unwrap_err();
    assert!(format!("{e:#}").contains("default/sctp"), "{e:#}");
    assert_eq!(dp.lock().frontends.len(), 2);
    assert!(dp.lock().frontends.values().any(|f| f.affinity_s == 60));

    // A restarted agent (same kernel) names the same id.
    drop(agent);
    let agent = start(&s, &dp);
    assert_eq!(
        agent
            .services
            .read()
            .unwrap()
            .get(id)
            .map(|f| f.service.to_string()),
        Some("default/web".into())
    );
}

/// Services resolve beside the policy: a bad one is logged, listed in
/// status and counted, the good one is listed with its backends, and a
/// dataplane that cannot translate yet is reported, never fatal.
#[test]
fn services_are_resolved_and_bad_ones_reported_without_stopping_policy() {
    let s = Scratch::new("services");
    let dp = MemoryDataplane::default();
    let mut agent = start(&s, &dp);
    let mut snap = isolating_policy();
    let more = manifests::parse_str(
        "svc",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.7}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: app}
spec: {clusterIP: 10.96.0.11, ports: [{port: 0}]}
"#,
    )
    .into_snapshot();
    snap.pods.extend(more.pods);
    snap.services.extend(more.services);
    agent
        .apply_snapshot(snap.clone())
        .expect("policy still programmed");
    let st = agent.status();
    assert_eq!(st.policies.len(), 1);
    assert_eq!(st.services.len(), 1, "{:?}", st.services);
    assert_eq!(st.services[0].name, "web");
    assert_eq!(st.services[0].frontends[0].frontend, "10.96.0.10:80/TCP");
    assert_eq!(st.services[0].frontends[0].backends, 1);
    assert_eq!(st.service_rejections.len(), 1);
    assert!(
        st.service_rejections[0].starts_with("Service app/broken: spec.ports[0].port: 0"),
        "{:?}",
        st.service_rejections
    );
    assert_eq!(st.services_error, None, "the memory dataplane translates");
    assert_eq!(
        dp.lock().frontends.len(),
        1,
        "the good Service is programmed"
    );
    assert_eq!(agent.metrics.service_rejections.get(), 1);
    // The same view again: the rejection is not counted twice.
    snap.pods.clear();
    agent.apply_snapshot(snap).unwrap();
    assert_eq!(agent.metrics.service_rejections.get(), 1);
    assert_eq!(agent.status().services[0].frontends[0].backends, 0);
}

/// A dual-stack Service: a frontend per ClusterIP, each in its family's
/// maps with its family's backend, both listed in status under one name.
#[test]
fn a_dual_stack_service_is_programmed_in_both_families() {
    let s = Scratch::new("services6");
    let dp = MemoryDataplane::default();
    let mut agent = start(&s, &dp);
    let mut snap = isolating_policy();
    let more = manifests::parse_str(
        "svc6",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.7, podIPs: [{ip: 10.244.0.7}, {ip: "fd00:244::7"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app}
spec: {clusterIPs: [10.96.0.10, "fd00:96::10"], ipFamilies: [IPv4, IPv6], selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
"#,
    )
    .into_snapshot();
    snap.pods.extend(more.pods);
    snap.services.extend(more.services);
    agent.apply_snapshot(snap).expect("programmed");
    let st = agent.status();
    assert!(
        st.service_rejections.is_empty(),
        "{:?}",
        st.service_rejections
    );
    let fronts: Vec<(&str, usize)> = st.services[0]
        .frontends
        .iter()
        .map(|f| (f.frontend.as_str(), f.backends))
        .collect();
    assert_eq!(
        fronts,
        [("10.96.0.10:80/TCP", 1), ("[fd00:96::10]:80/TCP", 1)]
    );
    let m = dp.lock();
    let v6: Vec<_> = m.frontends.keys().filter(|k| k.is_v6()).collect();
    assert_eq!((m.frontends.len(), v6.len()), (2, 1));
    let ids: std::collections::BTreeSet<u32> = m.frontends.values().map(|v| v.service_id).collect();
    assert_eq!(ids.len(), 2, "one id per frontend, one space");
    assert!(m.backends.iter().any(|((is6, _), b)| *is6
        && *b
            == crate::service_map::BackendAddr::V6(palisade_common::service::SvcBackend6 {
                addr: palisade_dataplane::maps::ip6_words("fd00:244::7".parse().unwrap()),
                port_be: 8080u16.to_be(),
                _pad: 0,
            })));
}

/// `--host-protection`: every endpoint carries the flag and the node's
/// open ports are policy entries of `HOST_PORTS_ENDPOINT`; off, neither.
#[test]
fn host_protection_marks_every_endpoint_and_writes_the_open_ports() {
    use palisade_common::{EP_HOST_PROTECTED, HOST_PORTS_ENDPOINT};
    let s = Scratch::new("hostprot");
    let dp = MemoryDataplane::default();
    let mut cfg = s.config();
    cfg.host_protection = Some(crate::daemon::parse_host_ports("53/UDP, 53/tcp,ICMP").unwrap());
    let mut agent = Agent::with_dataplane(&cfg, Arc::new(Metrics::default()), Box::new(dp.clone()))
        .expect("starts")
        .0;
    let (web, ifindex) = pod(&dp, "web", 5);
    agent.register(web).expect("registers");
    let maps = dp.maps();
    assert_ne!(maps.endpoints[&ifindex].flags & EP_HOST_PROTECTED, 0);
    let mut open: Vec<(u8, u16)> = maps
        .policy
        .keys()
        .filter(|(_, k)| k.endpoint_id == HOST_PORTS_ENDPOINT)
        .map(|(_, k)| (k.protocol, u16::from_be(k.dport_be)))
        .collect();
    open.sort();
    assert_eq!(open, [(1, 0), (6, 53), (17, 53)]);

    let s2 = Scratch::new("hostprot-off");
    let dp2 = MemoryDataplane::default();
    let mut agent2 = start(&s2, &dp2);
    let (web, ifindex) = pod(&dp2, "web", 5);
    agent2.register(web).expect("registers");
    let maps = dp2.maps();
    assert_eq!(maps.endpoints[&ifindex].flags & EP_HOST_PROTECTED, 0);
    assert!(!maps
        .policy
        .keys()
        .any(|(_, k)| k.endpoint_id == HOST_PORTS_ENDPOINT));

    for bad in ["53/HTTP", "0/TCP", "70000/UDP", "8/ICMP"] {
        assert!(crate::daemon::parse_host_ports(bad).is_err(), "{bad}");
    }
    assert_eq!(crate::daemon::parse_host_ports("none").unwrap(), []);
}

/// Issue 15 (CNI part): a dual-stack registration keeps its IPv6 address
/// (persisted, in `status` with what the datapath does with it), claims it
/// like its IPv4 one, and is held to the node's IPv6 pod ranges; both
/// addresses reach the endpoint map and the ipcaches. An IPv6-only one
/// registers with IPv4 address 0 (no by-address IPv4 entry).
#[test]
fn dual_stack_registrations_keep_and_check_their_ipv6_address() {
    let s = Scratch::new("dual");
    let dp = MemoryDataplane::default();
    let mut cfg = s.config();
    cfg.node_name = Some("n1".into());
    let mut agent = Agent::with_dataplane(&cfg, Arc::new(Metrics::default()), Box::new(dp.clone()))
        .expect("agent starts")
        .0;
    let node = "---\napiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [10.244.0.0/24, 'fd00:244::/64']}\n";
    let with_node = |mut snap: Snapshot| {
        let m = manifests::parse_str("node", node);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        snap.nodes = m.into_snapshot().nodes;
        snap
    };
    agent
        .apply_snapshot(with_node(isolating_policy_without_policy()))
        .expect("node");

    let (mut a, _) = pod(&dp, "web", 5);
    a.ipv6 = Some("fd00:244::5".parse().unwrap());
    agent.register(a.clone()).expect("dual-stack registers");
    let st = agent.status();
    let ep = st
        .endpoints
        .iter()
        .find(|e| e.pod == "web")
        .expect("listed");
    assert_eq!(ep.ipv6, a.ipv6);
    assert_eq!(st.nodes[0].pod_cidrs, ["10.244.0.0/24", "fd00:244::/64"]);
    assert!(
        ep.ipv6_datapath
            .as_deref()
            .is_some_and(|d| d.contains("not enforced")),
        "{ep:?}"
    );

    // Another live pod claiming the IPv6 address: a conflict.
    let (mut b, _) = pod(&dp, "db", 6);
    b.ipv6 = a.ipv6;
    let e = agent.register(b.clone()).expect_err("v6 taken");
    assert_eq!(crate::error::kind_of(&e), ErrorKind::Conflict, "{e:#}");
    assert!(format!("{e:#}").contains("fd00:244::5"), "{e:#}");
    // Outside the node's IPv6 pod range: invalid.
    b.ipv6 = Some("fd00:999::6".parse().unwrap());
    let e = agent.register(b.clone()).expect_err("outside");
    assert_eq!(crate::error::kind_of(&e), ErrorKind::InvalidRequest);
    assert!(format!("{e:#}").contains("fd00:244::/64"), "{e:#}");
    // Neither address: invalid.
    b.ipv4 = None;
    b.ipv6 = None;
    let e = agent.register(b.clone()).expect_err("no address");
    assert_eq!(crate::error::kind_of(&e), ErrorKind::InvalidRequest);
    assert_eq!(agent.model().endpoints.len(), 1);
    // IPv6-only: registered.
    b.ipv6 = Some("fd00:244::6".parse().unwrap());
    agent.register(b.clone()).expect("v6-only registers");
    assert_eq!(agent.model().endpoints.len(), 2);
    let maps = dp.maps();
    let words = palisade_dataplane::maps::ip6_words;
    let info = |v6: &str| {
        let w = words(v6.parse().unwrap());
        *maps
            .endpoints
            .values()
            .find(|i| i.ipv6 == w)
            .unwrap_or_else(|| panic!("no endpoint with {v6}: {:?}", maps.endpoints))
    };
    let (web, db) = (info("fd00:244::5"), info("fd00:244::6"));
    assert_ne!(web.ipv4, 0);
    assert_eq!(db.ipv4, 0, "IPv6-only");
    for (v6, i) in [("fd00:244::5", web), ("fd00:244::6", db)] {
        let v = maps.ipcache6[&(v6.parse().unwrap(), 128)];
        assert_eq!(v.identity, i.identity, "{v6}");
    }
    assert!(
        !maps
            .ipcache
            .contains_key(&(std::net::Ipv4Addr::UNSPECIFIED, 32)),
        "no ipcache entry for the IPv6-only pod's missing IPv4 address"
    );
    // Each refusal counted by its kind.
    let refused = &agent.metrics.registration_refusals;
    assert_eq!(
        (
            refused.get("unsupported"),
            refused.get("conflict"),
            refused.get("invalid_request")
        ),
        (0, 1, 2)
    );

    // Enforced: its IPv6 is reported dropped.
    agent
        .apply_snapshot(with_node(isolating_policy()))
        .expect("policy");
    let st = agent.status();
    let ep = st
        .endpoints
        .iter()
        .find(|e| e.pod == "web")
        .expect("listed");
    assert!(ep.ingress_enforced);
    assert!(
        ep.ipv6_datapath
            .as_deref()
            .is_some_and(|d| d.contains("enforced as IPv4")),
        "{ep:?}"
    );

    // Persisted: a restarted agent knows the address.
    drop(agent);
    let agent = Agent::with_dataplane(&cfg, Arc::new(Metrics::default()), Box::new(dp.clone()))
        .expect("agent restarts")
        .0;
    let st = agent.status();
    let ep = st
        .endpoints
        .iter()
        .find(|e| e.pod == "web")
        .expect("adopted");
    assert_eq!(ep.ipv6, a.ipv6);
}
