//! The contract between the Service sources and the Service datapath.
//!
//! Sources (Kubernetes Services + EndpointSlices, or manifests whose
//! EndpointSlices are given or derived from the Service's selector) resolve
//! into a list of [`Frontend`]s: one per ClusterIP, port and protocol, with
//! the backends that may take new flows already chosen (ready endpoints,
//! else serving-and-terminating ones, as kube-proxy does) and their target
//! ports already resolved per backend (named target ports through the
//! EndpointSlice's port names). The datapath only ever sees this list; it
//! never reads Service or EndpointSlice objects.
use std::net::{IpAddr, SocketAddr};

use crate::model::ObjectKey;

/// One ClusterIP:port/protocol and where its new flows may go.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    /// The Service (namespace/name), for flow records, `trace` and status.
    pub service: ObjectKey,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// ClusterIP and Service port.
    pub address: SocketAddr,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
    /// Backends for new flows: pod address and resolved target port. Empty
    /// means "no endpoints": new flows are refused, as kube-proxy does.
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP`: the timeout in seconds, None otherwise.
    pub affinity_timeout_s: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub address: SocketAddr,
    /// The pod behind it when known (namespace/name), for records.
    pub pod: Option<ObjectKey>,
}

impl Frontend {
    /// The ClusterIP.
    pub fn ip(&self) -> IpAddr {
        self.address.ip()
    }
}
