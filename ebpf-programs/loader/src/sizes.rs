//! Map sizes (entries). Its own module so that `loader` (which sizes the
//! maps at load) and `maps` (which names the size in a full-map error) both
//! depend on it and not on each other.
use palisade_common::sizes;

/// Map sizes (entries); the defaults come from `palisade_common::sizes`.
/// Maps already pinned keep the size they were created with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub endpoints: u32,
    pub ipcache: u32,
    pub policy: u32,
    pub conntrack: u32,
    pub fragments: u32,
    pub xdp_deny: u32,
    pub svc_frontends: u32,
    pub svc_backends: u32,
    pub svc_nat: u32,
    pub svc_affinity: u32,
    pub ipcache6: u32,
    pub conntrack6: u32,
    pub fragments6: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            endpoints: sizes::ENDPOINTS,
            ipcache: sizes::IPCACHE,
            policy: sizes::POLICY,
            conntrack: sizes::CONNTRACK,
            fragments: sizes::FRAGMENTS,
            xdp_deny: sizes::XDP_DENY,
            svc_frontends: sizes::SVC_FRONTENDS,
            svc_backends: sizes::SVC_BACKENDS,
            svc_nat: sizes::SVC_NAT,
            svc_affinity: sizes::SVC_AFFINITY,
            ipcache6: sizes::IPCACHE6,
            conntrack6: sizes::CONNTRACK6,
            fragments6: sizes::FRAGMENTS6,
        }
    }
}
