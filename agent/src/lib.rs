//! palisade-agent: the control plane of one node.
//!
//! sources (k8s | manifests) -> `model` -> `compiler` (pure) -> `sync`
//! (diff into the kernel maps); verdicts flow back through `flowlog`.
pub mod change;
pub mod cli;
pub mod cnp;
pub mod compiler;
pub mod coverage;
pub mod daemon;
pub mod dataplane;
pub mod endpoints;
pub mod error;
pub mod flowlog;
pub mod fqdn;
pub mod http;
pub mod identity;
pub mod ifaddrs;
pub mod k8s;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod node_status;
pub mod owner;
pub mod preview;
pub mod route_sync;
pub mod routing;
pub mod selector;
pub mod server;
pub mod service;
pub mod service_map;
pub mod service_resolve;
pub mod source;
pub mod sync;
pub mod tools;
pub mod trace;
pub mod trace_service;
pub mod verify;
