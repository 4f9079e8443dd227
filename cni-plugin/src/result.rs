//! Success results: built by palisade (ADD) or taken from prevResult
//! (chained), written in the dialect of the config's cniVersion.
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{json, Map, Value};

use crate::{
    config::{version_at_least, RouteConf},
    error::{self, CniError, Result},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    /// The netns path for container interfaces, empty on the host.
    pub sandbox: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    /// The pod address with the prefix of its subnet (as ptp reports it;
    /// the pod's interface carries it as /32 or /128).
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteConf>,
    pub dns: Option<Value>,
}

impl CniResult {
    /// Serialized for `version`: 0.3.x/0.4.0 carry `"version": "4"` (or
    /// "6") in each ip, 1.1.0 adds interface MTUs.
    pub fn to_json(&self, version: &str) -> Value {
        let v1 = version_at_least(version, "1.0.0");
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = Map::new();
                o.insert("name".into(), i.name.clone().into());
                if !i.mac.is_empty() {
                    o.insert("mac".into(), i.mac.clone().into());
                }
                if let Some(mtu) = i.mtu.filter(|_| version_at_least(version, "1.1.0")) {
                    o.insert("mtu".into(), mtu.into());
                }
                if !i.sandbox.is_empty() {
                    o.insert("sandbox".into(), i.sandbox.clone().into());
                }
                Value::Object(o)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = Map::new();
                if !v1 {
                    let fam = if ip.address.is_ipv4() { "4" } else { "6" };
                    o.insert("version".into(), fam.into());
                }
                o.insert("address".into(), ip.address.to_string().into());
                if let Some(gw) = ip.gateway {
                    o.insert("gateway".into(), gw.to_string().into());
                }
                if let Some(i) = ip.interface {
                    o.insert("interface".into(), i.into());
                }
                Value::Object(o)
            })
            .collect();
        let mut out = json!({ "cniVersion": version, "interfaces": interfaces, "ips": ips });
        if !self.routes.is_empty() {
            out["routes"] = self
                .routes
                .iter()
                .map(|r| {
                    let mut o = json!({ "dst": r.dst.to_string() });
                    if let Some(gw) = r.gw {
                        o["gw"] = gw.to_string().into();
                    }
                    o
                })
                .collect();
        }
        if let Some(dns) = &self.dns {
            out["dns"] = dns.clone();
        }
        out
    }
}

/// A result from elsewhere (prevResult, a delegated IPAM plugin) restamped
/// for `version` and otherwise unchanged: `version` in ips is added for
/// 0.3.x/0.4.0 and dropped for 1.x.
pub fn convert(mut v: Value, version: &str) -> Value {
    let v1 = version_at_least(version, "1.0.0");
    if let Some(o) = v.as_object_mut() {
        o.insert("cniVersion".into(), version.into());
        if let Some(ips) = o.get_mut("ips").and_then(Value::as_array_mut) {
            for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                if v1 {
                    ip.remove("version");
                } else if !ip.contains_key("version") {
                    let fam = ip
                        .get("address")
                        .and_then(Value::as_str)
                        .and_then(|a| a.parse::<IpNetwork>().ok())
                        .map(|n| if n.is_ipv4() { "4" } else { "6" });
                    if let Some(f) = fam {
                        ip.insert("version".into(), f.into());
                    }
                }
            }
        }
    }
    v
}

fn decode_err(what: &str, detail: impl ToString) -> CniError {
    CniError::with_details(
        error::DECODE,
        format!("failed to decode {what}"),
        detail.to_string(),
    )
}

/// The parts of a result palisade needs, from any supported version.
pub fn parse(v: &Value, what: &str) -> Result<CniResult> {
    let o = v
        .as_object()
        .ok_or_else(|| decode_err(what, "not a JSON object"))?;
    let mut r = CniResult::default();
    if let Some(ifs) = o.get("interfaces") {
        for i in ifs
            .as_array()
            .ok_or_else(|| decode_err(what, "interfaces is not a list"))?
        {
            let s = |k: &str| {
                i.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            r.interfaces.push(Interface {
                name: s("name"),
                mac: s("mac"),
                mtu: i.get("mtu").and_then(Value::as_u64).map(|m| m as u32),
                sandbox: s("sandbox"),
            });
        }
    }
    if let Some(ips) = o.get("ips") {
        for ip in ips
            .as_array()
            .ok_or_else(|| decode_err(what, "ips is not a list"))?
        {
            let addr = ip
                .get("address")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let Ok(address) = addr.parse::<IpNetwork>() else {
                return Err(decode_err(what, format!("bad ips address {addr:?}")));
            };
            let gateway = match ip.get("gateway").and_then(Value::as_str) {
                None | Some("") => None,
                Some(g) => match g.parse::<IpAddr>() {
                    Ok(g) if g.is_ipv4() == address.is_ipv4() => Some(g),
                    _ => return Err(decode_err(what, format!("bad gateway {g:?} for {address}"))),
                },
            };
            let interface = ip
                .get("interface")
                .and_then(Value::as_u64)
                .map(|i| i as usize);
            r.ips.push(IpConfig {
                address,
                gateway,
                interface,
            });
        }
    }
    if let Some(routes) = o.get("routes") {
        for rt in routes
            .as_array()
            .ok_or_else(|| decode_err(what, "routes is not a list"))?
        {
            let dst = rt.get("dst").and_then(Value::as_str).unwrap_or_default();
            let Ok(dst) = dst.parse::<IpNetwork>() else {
                continue;
            };
            let gw = rt
                .get("gw")
                .and_then(Value::as_str)
                .and_then(|g| g.parse::<IpAddr>().ok())
                .filter(|g| g.is_ipv4() == dst.is_ipv4());
            r.routes.push(RouteConf { dst, gw });
        }
    }
    // An empty object (host-local prints one) says nothing.
    r.dns = o
        .get("dns")
        .cloned()
        .filter(|d| !d.is_null() && d.as_object().is_none_or(|m| !m.is_empty()));
    Ok(r)
}

/// The attachment a prevResult describes for `ifname`: the container
/// interface (sandbox set, that name), its address of each family (at
/// least one), and the sandbox-less (host) interfaces.
#[derive(Debug)]
pub struct Described<'a> {
    pub container: &'a Interface,
    pub ipv4: Option<&'a IpConfig>,
    pub ipv6: Option<&'a IpConfig>,
    pub host: Vec<&'a Interface>,
}

impl Described<'_> {
    /// Both addresses, IPv4 first.
    pub fn ips(&self) -> impl Iterator<Item = &IpConfig> {
        self.ipv4.into_iter().chain(self.ipv6)
    }
}

pub fn describe<'a>(r: &'a CniResult, ifname: &str) -> Result<Described<'a>> {
    let lookup = |msg: String| CniError::new(error::CHAINED_LOOKUP, msg);
    let (idx, container) = r
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| i.name == ifname && !i.sandbox.is_empty())
        .ok_or_else(|| {
            lookup(format!(
                "prevResult has no container interface named {ifname:?}"
            ))
        })?;
    // The interface's own address of the family, else one that names no
    // interface.
    let of = |v4: bool| {
        let fam = |ip: &&IpConfig| ip.address.is_ipv4() == v4;
        r.ips
            .iter()
            .filter(fam)
            .find(|ip| ip.interface == Some(idx))
            .or_else(|| r.ips.iter().filter(fam).find(|ip| ip.interface.is_none()))
    };
    let (ipv4, ipv6) = (of(true), of(false));
    if ipv4.is_none() && ipv6.is_none() {
        return Err(lookup(format!(
            "prevResult has no IP address for {ifname:?}"
        )));
    }
    let host = r
        .interfaces
        .iter()
        .filter(|i| i.sandbox.is_empty())
        .collect();
    Ok(Described {
        container,
        ipv4,
        ipv6,
        host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "pal0123456789a".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: Some(1500),
                    sandbox: String::new(),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: Some(1500),
                    sandbox: "/run/netns/x".into(),
                },
            ],
            ips: vec![IpConfig {
                address: "10.7.0.2/24".parse().unwrap(),
                gateway: Some("10.7.0.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![RouteConf {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.7.0.1".parse().unwrap()),
            }],
            dns: Some(json!({"nameservers": ["10.7.0.1"]})),
        }
    }

    #[test]
    fn dialects() {
        let r = sample();
        let old = r.to_json("0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(old["interfaces"][0].get("mtu").is_none());
        let new = r.to_json("1.0.0");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["ips"][0]["address"], "10.7.0.2/24");
        assert_eq!(new["ips"][0]["interface"], 1);
        assert_eq!(new["interfaces"][1]["sandbox"], "/run/netns/x");
        assert!(new["interfaces"][0].get("sandbox").is_none());
        assert_eq!(r.to_json("1.1.0")["interfaces"][0]["mtu"], 1500);
        assert_eq!(new["dns"]["nameservers"][0], "10.7.0.1");
        // Round trip through both dialects.
        assert_eq!(parse(&old, "x").unwrap().ips, r.ips);
        assert_eq!(
            parse(&new, "x").unwrap().interfaces[1].sandbox,
            "/run/netns/x"
        );
    }

    #[test]
    fn convert_restamps_only() {
        let old = sample().to_json("0.4.0");
        let new = convert(old.clone(), "1.0.0");
        assert_eq!(new["cniVersion"], "1.0.0");
        assert!(new["ips"][0].get("version").is_none());
        let back = convert(new, "0.4.0");
        assert_eq!(back, old);
    }

    #[test]
    fn describe_finds_the_container_side() {
        let r = sample();
        let d = describe(&r, "eth0").unwrap();
        assert_eq!(
            d.ipv4.unwrap().address.ip(),
            "10.7.0.2".parse::<IpAddr>().unwrap()
        );
        assert!(d.ipv6.is_none());
        assert_eq!(d.host.len(), 1);
        assert_eq!(
            describe(&r, "eth1").unwrap_err().code,
            error::CHAINED_LOOKUP
        );
    }
}

#[cfg(test)]
mod dual_stack_tests {
    use super::*;

    /// host-local's dual-stack result, as 0.4.0 and 1.0.0 print it.
    #[test]
    fn both_families_are_read_written_and_described() {
        let hl = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/p"}],
            "ips": [
                {"version": "4", "address": "10.7.0.2/24", "gateway": "10.7.0.1", "interface": 1},
                {"version": "6", "address": "fd00:7::2/64", "gateway": "fd00:7::1", "interface": 1}
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00:7::1"}]
        });
        let r = parse(&hl, "x").unwrap();
        assert_eq!(r.ips.len(), 2);
        assert_eq!(r.routes.len(), 2);
        assert_eq!(r.routes[1].gw, Some("fd00:7::1".parse().unwrap()));
        let d = describe(&r, "eth0").unwrap();
        assert_eq!(d.ipv4.unwrap().address.to_string(), "10.7.0.2/24");
        assert_eq!(d.ipv6.unwrap().address.to_string(), "fd00:7::2/64");
        assert_eq!(d.ips().count(), 2);
        let old = r.to_json("0.4.0");
        assert_eq!(old["ips"][1]["version"], "6");
        assert_eq!(old["ips"], hl["ips"]);
        assert!(r.to_json("1.0.0")["ips"][1].get("version").is_none());
        assert_eq!(
            convert(r.to_json("1.0.0"), "0.4.0")["ips"][1]["version"],
            "6"
        );

        // IPv6 only.
        let v6 = json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/p"}],
            "ips": [{"address": "fd00:7::2/64", "interface": 0}]});
        let r = parse(&v6, "x").unwrap();
        let d = describe(&r, "eth0").unwrap();
        assert!(d.ipv4.is_none() && d.ipv6.is_some());
        // No address at all, or a gateway of the other family.
        let none = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/p"}], "ips": []});
        let r = parse(&none, "x").unwrap();
        assert_eq!(
            describe(&r, "eth0").unwrap_err().code,
            error::CHAINED_LOOKUP
        );
        let mixed = json!({"cniVersion": "1.0.0", "ips": [{"address": "fd00:7::2/64", "gateway": "10.0.0.1"}]});
        assert_eq!(parse(&mixed, "x").unwrap_err().code, error::DECODE);
    }
}
