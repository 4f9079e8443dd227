//! Which nodes a case runs on (FORMAT v2): `cluster.nodes` when the case
//! lists them, else `--nodes N` nodes named `n1`..`nN`; pods with `node:`
//! go there, the others are spread round robin in file order. Each node
//! gets its own /24 of [`SUBNET`] as its podCIDR.
use std::collections::BTreeMap;

use anyhow::{bail, Result};

use super::case::{Case, Labels, NodeSpec};

/// The range every pod address comes from when there are several nodes
/// (`{{subnet}}`); node `i` allocates from `10.213.i.0/24`.
pub const SUBNET: &str = "10.213.0.0/16";

#[derive(Clone, Debug)]
pub struct Layout {
    pub nodes: Vec<NodeSpec>,
    /// Node `i`'s podCIDR.
    pub subnets: Vec<String>,
    /// Pod `namespace/name` -> node index.
    pub placement: BTreeMap<String, usize>,
}

impl Layout {
    /// None: the classic single node (no Node objects, no uplink), which
    /// is what a version-1 case without options gets.
    pub fn of(case: &Case, nodes: usize) -> Result<Option<Self>> {
        let needs = !case.nodes.is_empty()
            || nodes > 1
            || case.pods.iter().any(|p| p.host_network || p.node.is_some());
        if !needs {
            return Ok(None);
        }
        let specs: Vec<NodeSpec> = if case.nodes.is_empty() {
            (1..=nodes.max(1))
                .map(|i| NodeSpec::named(&format!("n{i}"), &Labels::new()))
                .collect()
        } else {
            case.nodes.clone()
        };
        if specs.len() > 250 {
            bail!("{} nodes: at most 250", specs.len());
        }
        let mut placement = BTreeMap::new();
        let mut next = 0;
        for p in &case.pods {
            let i = match &p.node {
                Some(name) => match specs.iter().position(|n| &n.name == name) {
                    Some(i) => i,
                    None => bail!(
                        "pod {}: no node {name} (the nodes are {})",
                        p.key(),
                        specs
                            .iter()
                            .map(|n| n.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
                None => {
                    let i = next % specs.len();
                    next += 1;
                    i
                }
            };
            placement.insert(p.key(), i);
        }
        let subnets = (0..specs.len())
            .map(|i| format!("10.213.{i}.0/24"))
            .collect();
        Ok(Some(Self {
            nodes: specs,
            subnets,
            placement,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn round_robin_in_file_order_unless_pinned() {
        let text = "name: t\ncluster:\n  pods:\n  - {namespace: x, name: a}\n  - {namespace: x, name: b, node: n1}\n  - {namespace: x, name: c}\n  - {namespace: x, name: d}\n  - {namespace: x, name: e}\n";
        let case = Case::parse(text, Path::new("t.yaml")).unwrap();
        assert!(
            Layout::of(&case, 1).unwrap().is_some(),
            "a node: pin needs nodes"
        );
        let l = Layout::of(&case, 3).unwrap().unwrap();
        let got: Vec<(String, usize)> = l.placement.clone().into_iter().collect();
        assert_eq!(
            got,
            [
                ("x/a".into(), 0),
                ("x/b".into(), 0),
                ("x/c".into(), 1),
                ("x/d".into(), 2),
                ("x/e".into(), 0)
            ]
        );
        assert_eq!(l.subnets[2], "10.213.2.0/24");
        assert_eq!(l.nodes[1].labels["kubernetes.io/hostname"], "n2");
        let v1 = "name: t\ncluster:\n  pods:\n  - {namespace: x, name: a}\n";
        let case = Case::parse(v1, Path::new("t.yaml")).unwrap();
        assert!(Layout::of(&case, 1).unwrap().is_none());
        let bad = text.replace("node: n1", "node: n7");
        let case = Case::parse(&bad, Path::new("t.yaml")).unwrap();
        assert!(Layout::of(&case, 3).is_err());
    }
}
