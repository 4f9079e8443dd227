//! NetworkPolicy compiler: a deterministic function from the model (plus
//! the allocation tables that keep identities and cookies stable across
//! compiles) to the desired map contents.
use std::collections::{BTreeMap, HashMap};

use ipnetwork::Ipv4Network;
use palisade_dataplane::MapState;

use crate::model::{Labels, Model, ObjectKey};

/// Which policy rule a cookie in a policy entry stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub policy: ObjectKey,
    /// palisade_common::DIR_INGRESS / DIR_EGRESS
    pub direction: u8,
    /// Index in spec.ingress / spec.egress.
    pub rule: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    Reserved(&'static str),
    /// A distinct (namespace labels, pod labels) set.
    Labels { namespace: String, namespace_labels: Labels, pod_labels: Labels },
    Cidr(Ipv4Network),
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub maps: MapState,
    pub cookies: HashMap<u32, RuleRef>,
    pub identities: HashMap<u32, IdentitySource>,
    /// Policies that could not be compiled, with the reason. Every other
    /// policy is compiled and enforced as usual.
    pub rejected: BTreeMap<ObjectKey, String>,
}

/// Keeps identity and cookie numbers stable across compiles, so that a
/// change touches only the entries it really changes.
#[derive(Debug, Default)]
pub struct Compiler {}

impl Compiler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn compile(&mut self, _model: &Model) -> Compiled {
        unimplemented!("policy compiler: being written")
    }
}
