//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) as a typed
//! kube-rs resource. The CRD is not part of Kubernetes: [`installed`] asks
//! the API server first, so a cluster without it still gets every other
//! kind (and a log line saying ClusterNetworkPolicies are not read).
use std::{borrow::Cow, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{api::ListParams, core::ClusterResourceScope, Api, Resource};

use super::{hash_of, identity_meta, Watch};
use crate::{
    change::{Change, Snapshot},
    cnp::{self, ClusterNetworkPolicy},
};

impl Resource for ClusterNetworkPolicy {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        cnp::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "policy.networking.k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha2".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "clusternetworkpolicies".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Watch for ClusterNetworkPolicy {
    /// The compiler reads name and spec (the type has no `status`: the
    /// API's conditions are never decoded).
    fn trim(&mut self) {
        self.metadata = identity_meta(&self.metadata, false);
    }

    fn relevant(&self) -> Option<u64> {
        let spec = serde_json::to_vec(&self.spec).ok()?;
        Some(hash_of(&(&self.metadata.name, spec)))
    }

    fn applied(&self) -> Option<Change> {
        self.metadata.name.as_ref()?;
        Some(Change::ClusterPolicy(Arc::new(self.clone())))
    }

    fn deleted(&self) -> Option<Change> {
        self.metadata.name.clone().map(Change::ClusterPolicyDeleted)
    }

    fn fill(objects: &[Arc<Self>], view: &mut Snapshot) {
        for c in objects {
            if let Some(name) = &c.metadata.name {
                view.cluster_policies.insert(name.clone(), c.clone());
            }
        }
    }
}

/// Whether the API server serves the CRD (404: not installed). Any other
/// error is returned: the agent does not guess.
pub async fn installed(api: &Api<ClusterNetworkPolicy>) -> anyhow::Result<bool> {
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context(
            "listing clusternetworkpolicies.policy.networking.k8s.io (is the agent allowed to?)",
        )),
    }
}
