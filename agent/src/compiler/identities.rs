//! Label and CIDR identities: what a number stands for.
use std::collections::BTreeSet;

use ipnetwork::IpNetwork;

use super::{parse::protocol_number, IdentitySource, NAMESPACE_NAME_LABEL};
use crate::model::{ContainerPort, Labels, Model};

/// Label identity key. The named container ports are part of it: egress
/// named ports resolve per destination pod, and the kernel only sees
/// identities (replicas of one workload share their ports, so this rarely
/// adds identities).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct LabelSet {
    pub(crate) namespace: String,
    pub(crate) namespace_labels: Labels,
    pub(crate) pod_labels: Labels,
    /// (name, protocol number, port)
    pub(crate) named_ports: BTreeSet<(String, u8, u16)>,
}

impl LabelSet {
    pub(crate) fn new(
        namespace: &str,
        namespace_labels: Labels,
        pod_labels: &Labels,
        ports: &[ContainerPort],
    ) -> Self {
        Self {
            namespace: namespace.to_string(),
            namespace_labels,
            pod_labels: pod_labels.clone(),
            named_ports: ports
                .iter()
                .filter_map(|cp| {
                    Some((
                        cp.name.clone()?,
                        protocol_number(Some(&cp.protocol))?,
                        cp.port,
                    ))
                })
                .collect(),
        }
    }

    /// The port numbers of `name`/`proto` on the pods of this identity.
    pub(crate) fn named(&self, name: &str, proto: u8) -> impl Iterator<Item = u16> + '_ {
        let name = name.to_string();
        self.named_ports
            .iter()
            .filter(move |(n, p, _)| *n == name && *p == proto)
            .map(|(_, _, port)| *port)
    }

    pub(crate) fn source(&self) -> IdentitySource {
        IdentitySource::Labels {
            namespace: self.namespace.clone(),
            namespace_labels: self.namespace_labels.clone(),
            pod_labels: self.pod_labels.clone(),
        }
    }
}

/// What an identity number stands for, as the allocators key it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum IdentityKey {
    Labels(LabelSet),
    Cidr(IpNetwork),
}

/// A namespace's labels, always with the name label (also for namespaces
/// the model does not know yet).
pub(crate) fn namespace_labels(model: &Model, name: &str) -> Labels {
    let mut l = model
        .namespaces
        .get(name)
        .map(|n| n.labels.clone())
        .unwrap_or_default();
    l.insert(NAMESPACE_NAME_LABEL.into(), name.into());
    l
}
