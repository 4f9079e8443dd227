//! Egress by domain name (ClusterNetworkPolicy `domainNames`): patterns,
//! the addresses learned from the cluster DNS's answers, and the task that
//! takes held answers from the datapath, learns, and lets them go on.
pub mod pattern;

pub use pattern::DomainPattern;
pub mod cache;
pub mod rules;
pub mod snoop;
pub mod wire;
