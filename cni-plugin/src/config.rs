//! The environment (CNI_*) and the network configuration on stdin.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnetwork::Ipv4Network;
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

/// One `routes` entry of a config or a result.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RouteConf {
    pub dst: Ipv4Network,
    #[serde(default)]
    pub gw: Option<Ipv4Addr>,
}

/// The built-in allocator's section (`ipam.type` = "palisade").
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuiltinIpamConf {
    pub subnet: String,
    #[serde(default)]
    pub range_start: Option<Ipv4Addr>,
    #[serde(default)]
    pub range_end: Option<Ipv4Addr>,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub routes: Option<Vec<RouteConf>>,
}

/// A validated pool: the subnet, its gateway and the range handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    pub data_dir: PathBuf,
    pub routes: Vec<RouteConf>,
}

impl Pool {
    pub fn from_conf(c: &BuiltinIpamConf, network: &str) -> Result<Self> {
        let bad = |msg: String| CniError::new(error::INVALID_CONFIG, msg);
        let subnet: Ipv4Network = c.subnet.parse().map_err(|e| {
            bad(format!(
                "ipam.subnet {:?} is not an IPv4 CIDR: {e}",
                c.subnet
            ))
        })?;
        if subnet.network() != subnet.ip() {
            return Err(bad(format!(
                "ipam.subnet {} has host bits set (did you mean {}/{}?)",
                c.subnet,
                subnet.network(),
                subnet.prefix()
            )));
        }
        if subnet.prefix() > 30 {
            return Err(bad(format!(
                "ipam.subnet {subnet} is too small: it needs room for a gateway and a pod (/30 or larger)"
            )));
        }
        let first = u32::from(subnet.network()) + 1;
        let last = u32::from(subnet.broadcast()) - 1;
        let usable = |a: Ipv4Addr| (first..=last).contains(&u32::from(a));
        let gateway = c.gateway.unwrap_or(Ipv4Addr::from(first));
        if !usable(gateway) {
            return Err(bad(format!(
                "ipam.gateway {gateway} is not a usable address of {subnet}"
            )));
        }
        let start = c.range_start.unwrap_or(Ipv4Addr::from(first));
        let end = c.range_end.unwrap_or(Ipv4Addr::from(last));
        for (key, a) in [("rangeStart", start), ("rangeEnd", end)] {
            if !usable(a) {
                return Err(bad(format!(
                    "ipam.{key} {a} is not a usable address of {subnet}"
                )));
            }
        }
        if u32::from(start) > u32::from(end) {
            return Err(bad(format!(
                "ipam.rangeStart {start} is after ipam.rangeEnd {end}"
            )));
        }
        if start == end && start == gateway {
            return Err(bad(format!(
                "the range {start}-{end} holds only the gateway"
            )));
        }
        let data_dir = c
            .data_dir
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_IPAM_DIR).join(network));
        let routes = c.routes.clone().unwrap_or_else(|| {
            vec![RouteConf {
                dst: Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0"),
                gw: None,
            }]
        });
        Ok(Self {
            subnet,
            gateway,
            start,
            end,
            data_dir,
            routes,
        })
    }

    /// Addresses handed out, in order (the gateway is never one of them).
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (u32::from(self.start)..=u32::from(self.end))
            .map(Ipv4Addr::from)
            .filter(move |a| *a != self.gateway)
    }

    pub fn size(&self) -> usize {
        self.addresses().count()
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        (u32::from(self.start)..=u32::from(self.end)).contains(&u32::from(a)) && a != self.gateway
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

    #[test]
    fn builtin_pool_defaults() {
        let c = conf(r#"{"type":"palisade","subnet":"10.7.0.0/24"}"#).unwrap();
        let Some(Ipam::Builtin(p)) = c.ipam else {
            panic!()
        };
        assert_eq!(p.gateway, Ipv4Addr::new(10, 7, 0, 1));
        assert_eq!(p.start, Ipv4Addr::new(10, 7, 0, 1));
        assert_eq!(p.end, Ipv4Addr::new(10, 7, 0, 254));
        assert_eq!(p.size(), 253);
        assert_eq!(p.addresses().next(), Some(Ipv4Addr::new(10, 7, 0, 2)));
        assert_eq!(p.data_dir, PathBuf::from("/var/lib/palisade/ipam/n1"));
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.agent_timeout, Duration::from_secs(10));
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
