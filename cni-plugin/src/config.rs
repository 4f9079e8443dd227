//! The environment (CNI_*) and the network configuration on stdin.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{self, CniError, Result};

/// The spec versions this plugin speaks; results follow the config's.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST_VERSION: &str = "1.1.0";
pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_AGENT_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_IPAM_DIR: &str = "/var/lib/palisade/ipam";
/// The `ipam.type` served by the built-in allocator.
pub const BUILTIN_IPAM: &str = "palisade";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Gc => "GC",
            Self::Status => "STATUS",
            Self::Version => "VERSION",
        }
    }
}

/// The CNI_* variables, validated for the command.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

impl Env {
    /// Reads the variables `cmd` needs (spec section 2): missing or invalid
    /// ones are error 4, naming the variables.
    pub fn from_env(cmd: Command, get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let required: &[&str] = match cmd {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Gc => &["CNI_PATH"],
            Command::Status | Command::Version => &[],
        };
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|k| get(k).is_none_or(|v| v.is_empty()))
            .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                error::INVALID_ENV,
                format!("required env variables [{}] missing", missing.join(",")),
            ));
        }
        let env = Self {
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args: get("CNI_ARGS").unwrap_or_default(),
            path: get("CNI_PATH").unwrap_or_default(),
        };
        if !env.container_id.is_empty() && !valid_container_id(&env.container_id) {
            return Err(CniError::with_details(
                error::INVALID_ENV,
                "invalid CNI_CONTAINERID",
                format!(
                    "{:?}: must start with an alphanumeric character, followed by alphanumerics, '_', '.' or '-'",
                    env.container_id
                ),
            ));
        }
        if !env.ifname.is_empty() {
            if let Err(why) = valid_ifname(&env.ifname) {
                return Err(CniError::with_details(
                    error::INVALID_ENV,
                    "invalid CNI_IFNAME",
                    format!("{:?}: {why}", env.ifname),
                ));
            }
        }
        Ok(env)
    }

    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from CNI_ARGS. podman passes
    /// only the name; the namespace then is "default", and without a name
    /// the container id stands in for it.
    pub fn pod(&self) -> (String, String) {
        let mut ns = None;
        let mut pod = None;
        for kv in self.args.split(';') {
            match kv.split_once('=') {
                Some(("K8S_POD_NAMESPACE", v)) if !v.is_empty() => ns = Some(v.to_string()),
                Some(("K8S_POD_NAME", v)) if !v.is_empty() => pod = Some(v.to_string()),
                _ => {}
            }
        }
        (
            ns.unwrap_or_else(|| "default".to_string()),
            pod.unwrap_or_else(|| self.container_id.clone()),
        )
    }
}

fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The kernel's rules for interface names (dev_valid_name).
pub fn valid_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 15 {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("'.' and '..' are not interface names");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err("contains '/', ':' or whitespace");
    }
    Ok(())
}

/// Orders two spec versions ("0.4.0" < "1.0.0"); unknown ones sort first.
pub fn version_at_least(v: &str, min: &str) -> bool {
    fn parts(v: &str) -> Vec<u32> {
        v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
    }
    parts(v) >= parts(min)
}

/// One `routes` entry of a config or a result (either family).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RouteConf {
    pub dst: IpNetwork,
    #[serde(default)]
    pub gw: Option<IpAddr>,
}

/// One range, as host-local writes it in `ranges`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeConf {
    pub subnet: String,
    #[serde(default)]
    pub range_start: Option<IpAddr>,
    #[serde(default)]
    pub range_end: Option<IpAddr>,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
}

/// The built-in allocator's section (`ipam.type` = "palisade"): a single
/// `subnet` (with `rangeStart`, `rangeEnd`, `gateway`), or host-local's
/// `ranges` (a list of range sets, each a list of ranges), or both, as
/// host-local takes them: `subnet` is then the first range set. At most
/// one range set per family (dual-stack: one IPv4, one IPv6), and one
/// range per set.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuiltinIpamConf {
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub range_start: Option<IpAddr>,
    #[serde(default)]
    pub range_end: Option<IpAddr>,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub ranges: Vec<Vec<RangeConf>>,
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub routes: Option<Vec<RouteConf>>,
}

/// An address as a number, so both families share the range arithmetic.
fn num(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// `n` as an address of `like`'s family (`n` fits: it comes from a range
/// of that family).
fn addr(like: IpAddr, n: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// A validated range: its subnet, gateway and the addresses handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNetwork,
    pub gateway: IpAddr,
    pub start: IpAddr,
    pub end: IpAddr,
}

impl Range {
    /// `at` names the range in messages ("ipam", "ipam.ranges[1][0]").
    pub fn from_conf(c: &RangeConf, at: &str) -> Result<Self> {
        let bad = |msg: String| CniError::new(error::INVALID_CONFIG, msg);
        let subnet: IpNetwork = c
            .subnet
            .parse()
            .map_err(|e| bad(format!("{at}.subnet {:?} is not a CIDR: {e}", c.subnet)))?;
        if subnet.network() != subnet.ip() {
            return Err(bad(format!(
                "{at}.subnet {} has host bits set (did you mean {}/{}?)",
                c.subnet,
                subnet.network(),
                subnet.prefix()
            )));
        }
        // Room for a gateway and a pod: /30 (the IPv4 broadcast address is
        // not handed out), /126.
        let (max_prefix, broadcast) = if subnet.is_ipv4() { (30, 1) } else { (126, 0) };
        if subnet.prefix() > max_prefix {
            return Err(bad(format!(
                "{at}.subnet {subnet} is too small: it needs room for a gateway and a pod (/{max_prefix} or larger)"
            )));
        }
        let net = num(subnet.network());
        let host_bits = u32::from(if subnet.is_ipv4() { 32u8 } else { 128 } - subnet.prefix());
        let last_in = net + (u128::MAX >> (128 - host_bits));
        let (first, last) = (net + 1, last_in - broadcast);
        let usable =
            |a: IpAddr| a.is_ipv4() == subnet.is_ipv4() && (first..=last).contains(&num(a));
        let gateway = c.gateway.unwrap_or(addr(subnet.ip(), first));
        if !usable(gateway) {
            return Err(bad(format!(
                "{at}.gateway {gateway} is not a usable address of {subnet}"
            )));
        }
        let start = c.range_start.unwrap_or(addr(subnet.ip(), first));
        let end = c.range_end.unwrap_or(addr(subnet.ip(), last));
        for (key, a) in [("rangeStart", start), ("rangeEnd", end)] {
            if !usable(a) {
                return Err(bad(format!(
                    "{at}.{key} {a} is not a usable address of {subnet}"
                )));
            }
        }
        if num(start) > num(end) {
            return Err(bad(format!(
                "{at}.rangeStart {start} is after {at}.rangeEnd {end}"
            )));
        }
        if start == end && start == gateway {
            return Err(bad(format!(
                "the range {start}-{end} holds only the gateway"
            )));
        }
        Ok(Self {
            subnet,
            gateway,
            start,
            end,
        })
    }

    pub fn is_ipv4(&self) -> bool {
        self.subnet.is_ipv4()
    }

    /// Addresses handed out (the gateway is never one of them).
    pub fn size(&self) -> u128 {
        let all = num(self.end) - num(self.start) + 1;
        all - u128::from(self.contains_raw(self.gateway))
    }

    fn contains_raw(&self, a: IpAddr) -> bool {
        a.is_ipv4() == self.is_ipv4() && (num(self.start)..=num(self.end)).contains(&num(a))
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        self.contains_raw(a) && a != self.gateway
    }

    /// Every address handed out, in round-robin order from the one after
    /// `last` (wrapping), lazily: an IPv6 range is far too large to list.
    pub fn after(&self, last: Option<IpAddr>) -> impl Iterator<Item = IpAddr> + '_ {
        let (lo, hi) = (num(self.start), num(self.end));
        let from = last.filter(|l| self.contains_raw(*l)).map_or(lo, |l| {
            if num(l) == hi {
                lo
            } else {
                num(l) + 1
            }
        });
        (from..=hi)
            .chain(lo..from)
            .map(|n| addr(self.start, n))
            .filter(|a| *a != self.gateway)
    }
}

/// A validated pool: one range per family it serves (dual-stack: both).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub v4: Option<Range>,
    pub v6: Option<Range>,
    pub data_dir: PathBuf,
    pub routes: Vec<RouteConf>,
}

impl Pool {
    pub fn from_conf(c: &BuiltinIpamConf, network: &str) -> Result<Self> {
        let bad = |msg: String| CniError::new(error::INVALID_CONFIG, msg);
        let mut sets: Vec<(String, RangeConf)> = Vec::new();
        match &c.subnet {
            Some(subnet) => sets.push((
                "ipam".to_string(),
                RangeConf {
                    subnet: subnet.clone(),
                    range_start: c.range_start,
                    range_end: c.range_end,
                    gateway: c.gateway,
                },
            )),
            None if c.range_start.is_some() || c.range_end.is_some() || c.gateway.is_some() => {
                return Err(bad(
                    "ipam.rangeStart, rangeEnd and gateway belong to ipam.subnet; with \"ranges\", give them in each range".to_string(),
                ))
            }
            None => {}
        }
        for (i, set) in c.ranges.iter().enumerate() {
            match set.as_slice() {
                [] => return Err(bad(format!("ipam.ranges[{i}] is an empty range set"))),
                [one] => sets.push((format!("ipam.ranges[{i}][0]"), one.clone())),
                more => {
                    return Err(bad(format!(
                        "ipam.ranges[{i}] has {} ranges: palisade takes one range per range set (one set for IPv4, one for IPv6)",
                        more.len()
                    )))
                }
            }
        }
        if sets.is_empty() {
            return Err(bad(
                "ipam: a \"subnet\" or \"ranges\" (one IPv4 and/or one IPv6 range) is required"
                    .to_string(),
            ));
        }
        // Each family's range, with where it was given.
        let mut v4: Option<(String, Range)> = None;
        let mut v6: Option<(String, Range)> = None;
        for (at, rc) in &sets {
            let r = Range::from_conf(rc, at)?;
            let slot = if r.is_ipv4() { &mut v4 } else { &mut v6 };
            if let Some((first, _)) = slot {
                return Err(bad(format!(
                    "{at} is a second {} range (the first is {first}): palisade takes at most one range per family",
                    family(r.subnet.ip())
                )));
            }
            *slot = Some((at.clone(), r));
        }
        let (v4, v6) = (v4.map(|(_, r)| r), v6.map(|(_, r)| r));
        let data_dir = c
            .data_dir
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_IPAM_DIR).join(network));
        let routes = match &c.routes {
            Some(routes) => routes.clone(),
            None => {
                let default4 =
                    IpNetwork::V4(Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0"));
                let default6 =
                    IpNetwork::V6(Ipv6Network::new(Ipv6Addr::UNSPECIFIED, 0).expect("/0"));
                [(v4.is_some(), default4), (v6.is_some(), default6)]
                    .into_iter()
                    .filter(|(has, _)| *has)
                    .map(|(_, dst)| RouteConf { dst, gw: None })
                    .collect()
            }
        };
        for r in &routes {
            let fam = family(r.dst.ip());
            if (r.dst.is_ipv4() && v4.is_none()) || (r.dst.is_ipv6() && v6.is_none()) {
                return Err(bad(format!(
                    "ipam.routes: {} is {fam} but ipam has no {fam} range",
                    r.dst
                )));
            }
            if let Some(gw) = r.gw.filter(|g| g.is_ipv4() != r.dst.is_ipv4()) {
                return Err(bad(format!(
                    "ipam.routes: the gateway {gw} of {} is not {fam}",
                    r.dst
                )));
            }
        }
        Ok(Self {
            v4,
            v6,
            data_dir,
            routes,
        })
    }

    /// The ranges, IPv4 first.
    pub fn ranges(&self) -> impl Iterator<Item = &Range> {
        self.v4.iter().chain(self.v6.iter())
    }
}

/// How addresses are managed for a non-chained attachment.
#[derive(Clone, Debug)]
pub enum Ipam {
    Builtin(Pool),
    /// Another IPAM plugin (`ipam.type`), run from CNI_PATH.
    Delegate(String),
}

/// One `cni.dev/valid-attachments` entry (GC).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The fields palisade reads; everything else is passed through untouched.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    chained: bool,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default)]
    agent_timeout_ms: Option<u64>,
    #[serde(default)]
    ipam: Option<Value>,
    #[serde(default)]
    dns: Option<Value>,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

/// The network configuration, decoded and validated.
#[derive(Clone, Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub mtu: u32,
    pub chained: bool,
    pub agent_socket: PathBuf,
    pub agent_timeout: Duration,
    /// None in chained mode.
    pub ipam: Option<Ipam>,
    pub dns: Option<Value>,
    pub prev_result: Option<Value>,
    pub valid_attachments: Vec<Attachment>,
}

/// Only the version, to answer in the right dialect before anything else
/// is known (also for errors while decoding the rest).
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        v: String,
    }
    serde_json::from_slice::<V>(stdin).ok().map(|v| v.v)
}

/// Decode (6), check the version (1), validate (7).
pub fn parse(stdin: &[u8]) -> Result<NetConf> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::with_details(
            error::DECODE,
            "failed to decode the network config",
            e.to_string(),
        )
    })?;
    if !value.is_object() {
        return Err(CniError::new(
            error::DECODE,
            "the network config is not a JSON object",
        ));
    }
    let raw: RawConf = serde_json::from_value(value).map_err(|e| {
        CniError::with_details(
            error::DECODE,
            "failed to decode the network config",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&raw.cni_version.as_str()) {
        return Err(CniError::with_details(
            error::INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            format!(
                "config is {:?}, plugin supports {:?}",
                raw.cni_version, SUPPORTED_VERSIONS
            ),
        ));
    }
    let bad = |msg: String| CniError::new(error::INVALID_CONFIG, msg);
    if !valid_network_name(&raw.name) {
        return Err(bad(format!(
            "network name {:?} is invalid: it must start with an alphanumeric character, followed by alphanumerics, '_', '.' or '-'",
            raw.name
        )));
    }
    let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
    if !(68..=65535).contains(&mtu) {
        return Err(bad(format!("mtu {mtu} is out of range (68-65535)")));
    }
    let agent_timeout_ms = raw.agent_timeout_ms.unwrap_or(DEFAULT_AGENT_TIMEOUT_MS);
    if agent_timeout_ms == 0 {
        return Err(bad("agentTimeoutMs must be positive".to_string()));
    }
    let ipam = if raw.chained {
        None
    } else {
        let Some(ipam) = raw.ipam.as_ref() else {
            return Err(bad(
                "an \"ipam\" section is required unless \"chained\": true".to_string(),
            ));
        };
        let kind = ipam.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "" => return Err(bad("ipam.type is missing".to_string())),
            BUILTIN_IPAM => {
                let c: BuiltinIpamConf = serde_json::from_value(ipam.clone()).map_err(|e| {
                    if e.to_string().contains("missing field") {
                        bad(format!("ipam: {e}"))
                    } else {
                        CniError::with_details(
                            error::DECODE,
                            "failed to decode the ipam section",
                            e.to_string(),
                        )
                    }
                })?;
                Some(Ipam::Builtin(Pool::from_conf(&c, &raw.name)?))
            }
            other => {
                if other.contains('/') {
                    return Err(bad(format!(
                        "ipam.type {other:?} must be a plugin name, not a path"
                    )));
                }
                Some(Ipam::Delegate(other.to_string()))
            }
        }
    };
    if raw.kind.is_empty() {
        eprintln!("palisade: the network config has no \"type\"");
    }
    Ok(NetConf {
        cni_version: raw.cni_version,
        name: raw.name,
        mtu,
        chained: raw.chained,
        agent_socket: raw
            .agent_socket
            .unwrap_or_else(|| PathBuf::from(palisade_api::DEFAULT_SOCKET)),
        agent_timeout: Duration::from_millis(agent_timeout_ms),
        ipam,
        dns: raw.dns.filter(|d| !d.is_null()),
        prev_result: raw.prev_result.filter(|p| !p.is_null()),
        valid_attachments: raw.valid_attachments.unwrap_or_default(),
    })
}

fn valid_network_name(n: &str) -> bool {
    valid_container_id(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn env_names_missing_variables() {
        let e = Env::from_env(Command::Add, env(&[("CNI_IFNAME", "eth0")])).unwrap_err();
        assert_eq!(e.code, error::INVALID_ENV);
        assert!(e.msg.contains("CNI_CONTAINERID,CNI_NETNS"), "{e}");
        assert!(Env::from_env(
            Command::Del,
            env(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")])
        )
        .is_ok());
        assert_eq!(
            Env::from_env(Command::Gc, env(&[])).unwrap_err().code,
            error::INVALID_ENV
        );
        assert!(Env::from_env(Command::Status, env(&[])).is_ok());
    }

    #[test]
    fn env_rejects_bad_ids_and_names() {
        let base = [
            ("CNI_CONTAINERID", "-bad"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(
            Env::from_env(Command::Add, env(&base)).unwrap_err().code,
            error::INVALID_ENV
        );
        let base = [
            ("CNI_CONTAINERID", "ok"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "a/b"),
        ];
        assert_eq!(
            Env::from_env(Command::Add, env(&base)).unwrap_err().code,
            error::INVALID_ENV
        );
        let base = [
            ("CNI_CONTAINERID", "ok"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "waytoolonginterface"),
        ];
        assert_eq!(
            Env::from_env(Command::Add, env(&base)).unwrap_err().code,
            error::INVALID_ENV
        );
    }

    #[test]
    fn pod_from_cni_args() {
        let mut e = Env {
            container_id: "abc".into(),
            ..Default::default()
        };
        assert_eq!(e.pod(), ("default".into(), "abc".into()));
        e.args = "IgnoreUnknown=1;K8S_POD_NAME=web".into();
        assert_eq!(e.pod(), ("default".into(), "web".into()));
        e.args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc".into();
        assert_eq!(e.pod(), ("prod".into(), "web".into()));
    }

    #[test]
    fn versions_order() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("1.0.0", "1.1.0"));
    }

    fn conf(ipam: &str) -> Result<NetConf> {
        parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"n1","type":"palisade","ipam":{ipam}}}"#)
                .as_bytes(),
        )
    }

    fn pool(ipam: &str) -> Pool {
        match conf(ipam).unwrap().ipam {
            Some(Ipam::Builtin(p)) => p,
            other => panic!("{other:?}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn builtin_pool_defaults() {
        let c = conf(r#"{"type":"palisade","subnet":"10.7.0.0/24"}"#).unwrap();
        let Some(Ipam::Builtin(p)) = c.ipam else {
            panic!()
        };
        assert!(p.v6.is_none());
        let r = p.v4.as_ref().unwrap();
        assert_eq!(r.gateway, ip("10.7.0.1"));
        assert_eq!(r.start, ip("10.7.0.1"));
        assert_eq!(r.end, ip("10.7.0.254"));
        assert_eq!(r.size(), 253);
        assert_eq!(r.after(None).next(), Some(ip("10.7.0.2")));
        assert_eq!(p.data_dir, PathBuf::from("/var/lib/palisade/ipam/n1"));
        assert_eq!(
            p.routes,
            vec![RouteConf {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None
            }]
        );
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.agent_timeout, Duration::from_secs(10));
    }

    #[test]
    fn dual_stack_in_host_locals_ranges_form_and_beside_subnet() {
        let both = [
            r#"{"type":"palisade","ranges":[[{"subnet":"10.7.0.0/24"}],[{"subnet":"fd00:7::/64","gateway":"fd00:7::1"}]]}"#,
            r#"{"type":"palisade","subnet":"10.7.0.0/24","ranges":[[{"subnet":"fd00:7::/64"}]]}"#,
        ];
        for c in both {
            let p = pool(c);
            assert_eq!(
                p.v4.as_ref().unwrap().subnet,
                "10.7.0.0/24".parse().unwrap()
            );
            let r6 = p.v6.as_ref().unwrap();
            assert_eq!(r6.gateway, ip("fd00:7::1"));
            assert_eq!(r6.start, ip("fd00:7::1"));
            assert_eq!(r6.end, ip("fd00:7::ffff:ffff:ffff:ffff"));
            assert_eq!(r6.size(), (1u128 << 64) - 2);
            assert_eq!(r6.after(None).next(), Some(ip("fd00:7::2")));
            let dsts: Vec<String> = p.routes.iter().map(|r| r.dst.to_string()).collect();
            assert_eq!(dsts, ["0.0.0.0/0", "::/0"], "a default route per family");
            assert!(r6.contains(ip("fd00:7::9")));
            assert!(!r6.contains(ip("fd00:7::1")), "the gateway");
        }
        // IPv6 only, in either form.
        for c in [
            r#"{"type":"palisade","subnet":"fd00:8::/120","rangeStart":"fd00:8::10","rangeEnd":"fd00:8::11"}"#,
            r#"{"type":"palisade","ranges":[[{"subnet":"fd00:8::/120","rangeStart":"fd00:8::10","rangeEnd":"fd00:8::11"}]]}"#,
        ] {
            let p = pool(c);
            assert!(p.v4.is_none());
            let r6 = p.v6.as_ref().unwrap();
            assert_eq!(r6.size(), 2);
            // Round robin wraps.
            let order: Vec<IpAddr> = r6.after(Some(ip("fd00:8::10"))).collect();
            assert_eq!(order, [ip("fd00:8::11"), ip("fd00:8::10")]);
            assert_eq!(p.routes.len(), 1);
            assert_eq!(p.routes[0].dst.to_string(), "::/0");
        }
    }

    #[test]
    fn malformed_ipv6_ranges_are_config_errors_that_say_where() {
        let err = |ipam: &str| {
            let e = conf(ipam).unwrap_err();
            (e.code, e.msg)
        };
        for (ipam, says) in [
            (
                r#"{"type":"palisade","ranges":[[{"subnet":"fd00::/129"}]]}"#,
                "ipam.ranges[0][0].subnet",
            ),
            (
                r#"{"type":"palisade","ranges":[[{"subnet":"fd00::5/64"}]]}"#,
                "host bits",
            ),
            (
                r#"{"type":"palisade","ranges":[[{"subnet":"fd00::/127"}]]}"#,
                "too small",
            ),
            (
                r#"{"type":"palisade","ranges":[[{"subnet":"fd00::/64","gateway":"10.0.0.1"}]]}"#,
                "gateway 10.0.0.1",
            ),
            (
                r#"{"type":"palisade","ranges":[[{"subnet":"fd00::/64","rangeStart":"fd01::1"}]]}"#,
                "rangeStart",
            ),
            (
                r#"{"type":"palisade","ranges":[[{"subnet":"fd00::/64","rangeStart":"fd00::9","rangeEnd":"fd00::3"}]]}"#,
                "after",
            ),
            (
                r#"{"type":"palisade","ranges":[[{"subnet":"fd00::/64"}],[{"subnet":"fd01::/64"}]]}"#,
                "second IPv6 range",
            ),
            (
                r#"{"type":"palisade","subnet":"10.0.0.0/24","ranges":[[{"subnet":"10.1.0.0/24"}]]}"#,
                "second IPv4 range",
            ),
            (
                r#"{"type":"palisade","ranges":[[{"subnet":"fd00::/64"},{"subnet":"fd01::/64"}]]}"#,
                "one range per range set",
            ),
            (r#"{"type":"palisade","ranges":[[]]}"#, "empty range set"),
            (
                r#"{"type":"palisade","ranges":[]}"#,
                "\"subnet\" or \"ranges\"",
            ),
            (
                r#"{"type":"palisade","ranges":[[{"gateway":"fd00::1"}]]}"#,
                "subnet",
            ),
            (
                r#"{"type":"palisade","gateway":"fd00::1","ranges":[[{"subnet":"fd00::/64"}]]}"#,
                "belong to ipam.subnet",
            ),
            (
                r#"{"type":"palisade","subnet":"10.0.0.0/24","routes":[{"dst":"::/0"}]}"#,
                "no IPv6 range",
            ),
            (
                r#"{"type":"palisade","subnet":"10.0.0.0/24","ranges":[[{"subnet":"fd00::/64"}]],"routes":[{"dst":"::/0","gw":"10.0.0.1"}]}"#,
                "not IPv6",
            ),
        ] {
            let (code, msg) = err(ipam);
            assert_eq!(code, error::INVALID_CONFIG, "{ipam}: {msg}");
            assert!(msg.contains(says), "{ipam}: {msg:?} should say {says:?}");
        }
        // Not an address at all: the section does not decode.
        assert_eq!(
            conf(r#"{"type":"palisade","ranges":[[{"subnet":"fd00::/64","gateway":"nope"}]]}"#)
                .unwrap_err()
                .code,
            error::DECODE
        );
    }

    #[test]
    fn config_errors_have_their_codes() {
        let code = |ipam: &str| conf(ipam).unwrap_err().code;
        assert_eq!(
            code(r#"{"type":"palisade","subnet":"10.7.0.0/33"}"#),
            error::INVALID_CONFIG
        );
        assert_eq!(
            code(r#"{"type":"palisade","subnet":"nonsense"}"#),
            error::INVALID_CONFIG
        );
        assert_eq!(
            code(r#"{"type":"palisade","subnet":"10.7.0.1/24"}"#),
            error::INVALID_CONFIG
        );
        assert_eq!(
            code(r#"{"type":"palisade","subnet":"10.7.0.0/31"}"#),
            error::INVALID_CONFIG
        );
        assert_eq!(code(r#"{"type":"palisade"}"#), error::INVALID_CONFIG);
        assert_eq!(
            code(r#"{"type":"palisade","subnet":"10.7.0.0/24","gateway":"10.8.0.1"}"#),
            error::INVALID_CONFIG
        );
        assert_eq!(
            code(
                r#"{"type":"palisade","subnet":"10.7.0.0/24","rangeStart":"10.7.0.9","rangeEnd":"10.7.0.3"}"#
            ),
            error::INVALID_CONFIG
        );
        assert_eq!(
            code(r#"{"type":"palisade","subnet":"10.7.0.0/24","rangeStart":42}"#),
            error::DECODE
        );
        assert_eq!(parse(b"{").unwrap_err().code, error::DECODE);
        assert_eq!(parse(b"[]").unwrap_err().code, error::DECODE);
        assert_eq!(
            parse(br#"{"cniVersion":"0.2.0","name":"n","type":"palisade"}"#)
                .unwrap_err()
                .code,
            error::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            parse(br#"{"cniVersion":"1.0.0","name":"n","type":"palisade"}"#)
                .unwrap_err()
                .code,
            error::INVALID_CONFIG
        );
        assert_eq!(
            parse(
                br#"{"cniVersion":"1.0.0","name":"n","type":"palisade","chained":true,"mtu":20}"#
            )
            .unwrap_err()
            .code,
            error::INVALID_CONFIG
        );
    }

    #[test]
    fn chained_needs_no_ipam_and_delegation_is_by_name() {
        let c = parse(br#"{"cniVersion":"1.1.0","name":"n","type":"palisade","chained":true}"#)
            .unwrap();
        assert!(c.chained && c.ipam.is_none());
        let c = conf(r#"{"type":"host-local","subnet":"10.7.0.0/24"}"#).unwrap();
        assert!(matches!(c.ipam, Some(Ipam::Delegate(ref t)) if t == "host-local"));
        assert_eq!(
            conf(r#"{"type":"../evil"}"#).unwrap_err().code,
            error::INVALID_CONFIG
        );
    }

    #[test]
    fn valid_attachments_decode() {
        let c = parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"palisade","chained":true,
                 "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments,
            vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }]
        );
    }
}
