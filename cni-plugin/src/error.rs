//! CNI error results: the spec's well-known codes and palisade's own (100+,
//! documented in cni-plugin/README.md).
use serde::Serialize;

/// 1: the config's cniVersion is not one this plugin speaks.
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// 3: the container (its network namespace) does not exist.
pub const CONTAINER_UNKNOWN: u32 = 3;
/// 4: a required CNI_* environment variable is missing or invalid.
pub const INVALID_ENV: u32 = 4;
/// 5: reading stdin failed.
pub const IO_FAILURE: u32 = 5;
/// 6: stdin (or a delegated plugin's output) is not decodable.
pub const DECODE: u32 = 6;
/// 7: the network config decodes but does not validate.
pub const INVALID_CONFIG: u32 = 7;
/// 11: transient: the agent is unreachable, did not answer in time, or
/// answered `Unavailable` (not ready, busy). Nothing else is 11.
pub const TRY_AGAIN_LATER: u32 = 11;
/// 50 (STATUS only): the plugin cannot service ADD requests.
pub const NOT_AVAILABLE: u32 = 50;

/// 100: every address of the IPAM pool is allocated.
pub const POOL_EXHAUSTED: u32 = 100;
/// 101: a netlink request (link, address, route) failed.
pub const NETLINK: u32 = 101;
/// 102: the delegated IPAM plugin could not be run or gave an unusable result.
pub const DELEGATE: u32 = 102;
/// 103: chained mode: prevResult / the host-side veth do not describe a pod.
pub const CHAINED_LOOKUP: u32 = 103;
/// 104: CHECK found the attachment not as prevResult describes it.
pub const CHECK_FAILED: u32 = 104;
/// 105: the IPAM state directory could not be read, written or locked.
pub const IPAM_STORE: u32 = 105;
/// 106: the sysctl net.ipv4.ip_forward could not be set.
pub const SYSCTL: u32 = 106;
/// 107: the agent refused: the request conflicts with an endpoint it has.
pub const AGENT_CONFLICT: u32 = 107;
/// 108: the agent refused: a datapath map is full (capacity, not transient).
pub const AGENT_MAP_FULL: u32 = 108;
/// 109: the agent failed (a bug, a kernel refusal, a protocol mismatch):
/// retrying the same request will not help.
pub const AGENT_INTERNAL: u32 = 109;
/// 110: the agent refused the caller: the plugin does not run as root (or
/// as the agent's user).
pub const AGENT_FORBIDDEN: u32 = 110;
/// 111: the agent refused what it cannot enforce (e.g. a kernel without
/// the IPv6 programs for a pod with an IPv6 address);
/// not transient: the configuration must change (or the agent).
pub const AGENT_UNSUPPORTED: u32 = 111;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error object, stamped with the version in use.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = self.details.clone().into();
        }
        v
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

/// Teardown keeps going after a failure; this collects what went wrong and
/// reports it at the end as one error (the first failure's code).
#[derive(Default, Debug)]
pub struct Errors(Vec<CniError>);

impl Errors {
    pub fn push(&mut self, e: CniError) {
        eprintln!("palisade: {e}");
        self.0.push(e);
    }

    pub fn check<T>(&mut self, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(e);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result(self) -> Result<()> {
        let mut it = self.0.into_iter();
        let Some(first) = it.next() else {
            return Ok(());
        };
        let rest: Vec<String> = it.map(|e| e.to_string()).collect();
        if rest.is_empty() {
            return Err(first);
        }
        let details = if first.details.is_empty() {
            format!("also: {}", rest.join("; "))
        } else {
            format!("{}; also: {}", first.details, rest.join("; "))
        };
        Err(CniError { details, ..first })
    }
}
