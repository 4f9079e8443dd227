//! `status`: the cluster's nodes and, for each, the pods this agent knows
//! there (peers of other nodes by node): pods whose address is in the
//! node's pod ranges, and host-network pods at one of its addresses.
use palisade_api::NodeStatus;

use crate::model::Model;

pub fn nodes(model: &Model, me: Option<&str>) -> Vec<NodeStatus> {
    model
        .nodes
        .values()
        .map(|n| {
            let pods = model
                .pods
                .iter()
                .filter_map(|(k, p)| {
                    let ip = p.ip?;
                    let here = if p.host_network {
                        n.addresses.contains(&ip)
                    } else {
                        n.pod_cidrs.iter().any(|c| c.contains(ip))
                    };
                    here.then(|| format!("{}/{} {ip}", k.namespace, k.name))
                })
                .collect();
            NodeStatus {
                name: n.name.clone(),
                local: Some(n.name.as_str()) == me,
                addresses: n.addresses.clone(),
                pod_cidrs: (n.pod_cidrs.iter().map(|c| c.to_string()))
                    .chain(n.pod_cidrs6.iter().map(|c| c.to_string()))
                    .collect(),
                pods,
            }
        })
        .collect()
}

/// The NODES and ROUTING sections of `palisade-agent status`.
pub fn render(s: &mut String, r: &palisade_api::StatusReport) {
    use std::fmt::Write as _;
    let routing_says_something = r
        .routing
        .as_ref()
        .is_some_and(|rt| !rt.routes.is_empty() || !rt.problems.is_empty() || rt.error.is_some());
    if r.nodes.is_empty() && !routing_says_something {
        return; // a single node without Node objects: nothing to show
    }
    let _ = writeln!(s, "\nNODES ({})", r.nodes.len());
    for n in &r.nodes {
        let addrs: Vec<String> = n.addresses.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(
            s,
            "  {}{}  {}  pods {}  ({} pods)",
            n.name,
            if n.local { " (this node)" } else { "" },
            addrs.join(","),
            n.pod_cidrs.join(","),
            n.pods.len()
        );
        if !n.local {
            for p in &n.pods {
                let _ = writeln!(s, "    {p}");
            }
        }
    }
    if let Some(rt) = &r.routing {
        let _ = writeln!(s, "\nROUTING ({})", rt.mode);
        for l in &rt.routes {
            let _ = writeln!(s, "  {l}");
        }
        for p in &rt.problems {
            let _ = writeln!(s, "  NOT ROUTED: {p}");
        }
        if let Some(e) = &rt.error {
            let _ = writeln!(s, "  FAILING ({} passes): {e}", rt.failures);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Node, ObjectKey, Pod};

    #[test]
    fn pods_are_listed_under_their_node() {
        let mut m = Model::default();
        for (name, addr, cidr) in [
            ("n1", "192.0.2.1", "10.1.0.0/24"),
            ("n2", "192.0.2.2", "10.1.1.0/24"),
        ] {
            m.nodes.insert(
                name.into(),
                Node {
                    name: name.into(),
                    addresses: vec![addr.parse().unwrap()],
                    pod_cidrs: vec![cidr.parse().unwrap()],
                    ..Default::default()
                },
            );
        }
        let pod = |ip: &str, host_network: bool| Pod {
            namespace: "x".into(),
            name: String::new(),
            labels: Default::default(),
            ip: Some(ip.parse().unwrap()),
            ipv6: None,
            host_network,
            ports: vec![],
        };
        m.pods
            .insert(ObjectKey::new("x", "a"), pod("10.1.1.7", false).into());
        m.pods
            .insert(ObjectKey::new("x", "h"), pod("192.0.2.1", true).into());
        let s = nodes(&m, Some("n1"));
        assert!(s[0].local && !s[1].local);
        assert_eq!(s[0].pods, ["x/h 192.0.2.1"]);
        assert_eq!(s[1].pods, ["x/a 10.1.1.7"]);
    }
}
