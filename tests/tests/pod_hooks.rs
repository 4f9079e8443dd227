//! How the pod programs hook a host veth (`palisade_dataplane::hooks`): a
//! `cls_bpf` filter by default, which outlives the agent and gets a
//! restarted agent's program swapped in place; TCX where TCX programs
//! already run on the hook (they would run before any filter), where a
//! pinned TCX link of ours is, or when asked for.
use std::net::Ipv4Addr;

use anyhow::{ensure, Result};
use aya::programs::TcAttachType;
use palisade_common::programs::{POD_EGRESS, POD_INGRESS};
use palisade_dataplane::{hooks::Hooked, Datapath, DatapathConfig, PodHook};
use palisade_tests::*;

const GW: Ipv4Addr = Ipv4Addr::new(10, 93, 0, 1);
const A: Ipv4Addr = Ipv4Addr::new(10, 93, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 93, 0, 3);

fn config(pins: &PinRoot, pod_hook: PodHook) -> DatapathConfig {
    DatapathConfig {
        pins: pins.pins.clone(),
        pod_hook,
        ..Default::default()
    }
}

/// The kernel ids of a datapath's (egress, ingress) pod programs.
fn prog_ids(dp: &mut Datapath) -> Result<[u64; 2]> {
    let id = |dp: &mut Datapath, name| -> Result<u64> {
        Ok(u64::from(dp.classifier(name)?.info()?.id()))
    };
    Ok([id(dp, POD_EGRESS)?, id(dp, POD_INGRESS)?])
}

/// The program ids of palisade's filters on `ifname`, checking that each
/// hook has exactly one.
fn filter_ids(node: &Node, ifname: &str) -> Result<[u64; 2]> {
    let [e, i] = palisade_filters(&node.ns, ifname)?;
    ensure!(
        e.len() == 1 && i.len() == 1,
        "one filter per hook: {e:?} {i:?}"
    );
    ensure!(
        e[0].name == POD_EGRESS && i[0].name == POD_INGRESS,
        "{e:?} {i:?}"
    );
    Ok([e[0].prog_id, i[0].prog_id])
}

/// The TCX programs on a hook, by name, in the order they run.
fn tcx_names(node: &Node, ifname: &str, hook: TcAttachType) -> Result<Vec<String>> {
    let ifname = ifname.to_string();
    node.ns.enter(move || -> Result<Vec<String>> {
        Ok(aya::programs::SchedClassifier::query_tcx(&ifname, hook)?
            .1
            .iter()
            .map(|p| p.name_as_str().unwrap_or_default().to_string())
            .collect())
    })?
}

fn tcx_count(node: &Node, ifname: &str, hook: TcAttachType) -> Result<usize> {
    Ok(tcx_names(node, ifname, hook)?.len())
}

#[test]
fn a_filter_is_attached_outlives_its_agent_is_swapped_on_restart_and_removed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let pins = PinRoot::new()?;
    let mut node = Node::new(GW)?;
    node.add_pod(A)?;
    let host_if = node.pods[0].host_if.clone();

    let cfg = config(&pins, PodHook::Filter);
    let h = host_if.clone();
    let (mut first, ifindex, via) = node.ns.enter(move || -> Result<_> {
        let mut dp = Datapath::load(&cfg)?;
        let (ifindex, via) = dp.attach_pod_via(&h)?;
        // A second ADD of the same interface: the same filters.
        let (_, again) = dp.attach_pod_via(&h)?;
        ensure!(again == via, "{again:?} vs {via:?}");
        Ok((dp, ifindex, via))
    })??;
    assert_eq!(via, [Hooked::Filter; 2]);
    let ids = prog_ids(&mut first)?;
    assert_eq!(filter_ids(&node, &host_if)?, ids, "the loaded programs");
    assert_eq!(tcx_count(&node, &host_if, TcAttachType::Ingress)?, 0);
    assert_eq!(tcx_count(&node, &host_if, TcAttachType::Egress)?, 0);
    assert!(pins.pins.pinned_links().is_empty(), "no TCX link pinned");

    // The agent goes (as with kill -9): the kernel keeps the filters and
    // their programs.
    drop(first);
    assert_eq!(
        filter_ids(&node, &host_if)?,
        ids,
        "filters outlive the agent"
    );

    // A new agent adopts them: its programs in place, nothing added.
    let cfg = config(&pins, PodHook::Filter);
    let (mut second, adopted) = node.ns.enter(move || -> Result<_> {
        let mut dp = Datapath::load(&cfg)?;
        let adopted = dp.adopt_links()?;
        Ok((dp, adopted))
    })??;
    assert_eq!(adopted, vec![ifindex]);
    let new_ids = prog_ids(&mut second)?;
    assert_ne!(new_ids, ids);
    assert_eq!(filter_ids(&node, &host_if)?, new_ids, "swapped in place");

    // DEL: both go; again (the interface may be gone by then) is fine.
    let (dp, out) = node.ns.enter(move || {
        let r = second.detach_pod(ifindex);
        (second, r)
    })?;
    out?;
    assert_eq!(palisade_filters(&node.ns, &host_if)?, [vec![], vec![]]);
    node.ns.ip(&["link", "del", &host_if])?;
    node.ns.enter(move || dp.detach_pod(ifindex))??;
    Ok(())
}

#[test]
fn tcx_where_asked_where_pinned_and_where_tcx_programs_run_first() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let pins = PinRoot::new()?;
    let other = PinRoot::new()?;
    let mut node = Node::new(GW)?;
    node.add_pod(A)?;
    node.add_pod(B)?;
    let (a_if, b_if) = (node.pods[0].host_if.clone(), node.pods[1].host_if.clone());

    // Asked for TCX: pinned links, no filter.
    let cfg = config(&pins, PodHook::Tcx);
    let a = a_if.clone();
    let via = node.ns.enter(move || -> Result<_> {
        let mut dp = Datapath::load(&cfg)?;
        Ok(dp.attach_pod_via(&a)?.1)
    })??;
    assert_eq!(via, [Hooked::Tcx; 2]);
    assert_eq!(pins.pins.pinned_links().len(), 2);
    assert_eq!(palisade_filters(&node.ns, &a_if)?, [vec![], vec![]]);

    // A filter-mode agent keeps the pinned links it finds (an upgrade from
    // an agent that used TCX), and where someone else's TCX program runs
    // (on B's tc ingress only), hooks that one through TCX, ahead of it.
    let pass_all = palisade_dataplane::testrun::load_pass_all(other.pins.root())?;
    let cfg = config(&pins, PodHook::Filter);
    let (a, b) = (a_if.clone(), b_if.clone());
    let (via_a, via_b, _pass_all, removed) = node.ns.enter(move || -> Result<_> {
        let mut pass_all = pass_all;
        pass_all.attach(&b, TcAttachType::Ingress)?;
        let mut dp = Datapath::load(&cfg)?;
        let via_a = dp.attach_pod_via(&a)?.1;
        let via_b = dp.attach_pod_via(&b)?.1;
        // `palisade-agent cleanup`'s sweep: B's one filter.
        let removed = palisade_dataplane::loader::remove_filters()?;
        Ok((via_a, via_b, pass_all, removed))
    })??;
    assert_eq!(via_a, [Hooked::Tcx; 2]);
    assert_eq!(palisade_filters(&node.ns, &a_if)?, [vec![], vec![]]);
    assert_eq!(via_b, [Hooked::Tcx, Hooked::Filter]);
    assert_eq!(
        tcx_names(&node, &b_if, TcAttachType::Ingress)?,
        [POD_EGRESS, "bench_empty"],
        "palisade first"
    );
    assert_eq!(tcx_count(&node, &b_if, TcAttachType::Egress)?, 0);
    assert_eq!(removed, 1, "one interface had a filter");
    assert_eq!(palisade_filters(&node.ns, &b_if)?, [vec![], vec![]]);
    Ok(())
}

#[test]
fn a_tcx_program_attached_after_the_filter_is_overtaken() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let pins = PinRoot::new()?;
    let other = PinRoot::new()?;
    let mut node = Node::new(GW)?;
    node.add_pod(A)?;
    let a_if = node.pods[0].host_if.clone();
    let pass_all = palisade_dataplane::testrun::load_pass_all(other.pins.root())?;
    let cfg = config(&pins, PodHook::Filter);
    let a = a_if.clone();
    let (first, after, _pass_all) = node.ns.enter(move || -> Result<_> {
        let mut dp = Datapath::load(&cfg)?;
        ensure!(dp.attach_pod_via(&a)?.1 == [Hooked::Filter; 2]);
        // Nothing ahead of the filters: nothing moves.
        let first = dp.keep_first(&a)?;
        // Someone attaches a pass-everything TCX program to the pod's tc
        // ingress (its egress path) after palisade.
        let mut pass_all = pass_all;
        pass_all.attach(&a, TcAttachType::Ingress)?;
        let after = dp.keep_first(&a)?;
        Ok((first, after, pass_all))
    })??;
    assert!(!first);
    assert!(after, "the program ahead of the filter was noticed");
    // palisade's program is now in the TCX chain (first, with the other
    // behind it) and its filter on that hook is gone; the other hook keeps
    // its filter.
    assert_eq!(
        tcx_names(&node, &a_if, TcAttachType::Ingress)?,
        [POD_EGRESS, "bench_empty"],
        "palisade first"
    );
    let [egress, ingress] = palisade_filters(&node.ns, &a_if)?;
    assert!(egress.is_empty(), "{egress:?}");
    assert_eq!(ingress.len(), 1);
    assert_eq!(pins.pins.pinned_links().len(), 1);
    Ok(())
}
