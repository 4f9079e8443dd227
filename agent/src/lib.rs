//! palisade-agent: the control plane of one node.
//!
//! sources (k8s | manifests) -> `model` -> `compiler` (pure) -> `sync`
//! (diff into the kernel maps); verdicts flow back through `flowlog`.
pub mod compiler;
pub mod model;
