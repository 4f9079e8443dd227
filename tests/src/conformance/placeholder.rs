//! `{{ip ns/pod}}`, `{{cidr ns/pod N}}` and `{{subnet}}` in policies: pod
//! addresses are only known once the CNI plugin has allocated them, so
//! cases name them symbolically. Over IPv6 (`--ip-family ipv6`) they give
//! IPv6 forms: `{{host P}}` is a /128, `{{cidr P N}}` a /(N+60), and
//! `{{ip P}}/32` (and `{{node-ip N}}/32`) a /128 (see [`super::family`]).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use super::family::{network6, Family, SHIFT};

use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::Value;

/// What placeholders resolve against.
#[derive(Clone, Debug, Default)]
pub struct Addresses {
    /// `namespace/name` -> address.
    pub pods: BTreeMap<String, Ipv4Addr>,
    /// The CIDR all pod addresses come from, e.g. `10.213.0.0/24`.
    pub subnet: String,
    /// Node name -> address (`{{node-ip NODE}}`), FORMAT v2.
    pub nodes: BTreeMap<String, Ipv4Addr>,
    /// Node name -> IPv6 address (IPv6 runs with several nodes).
    pub nodes6: BTreeMap<String, Ipv6Addr>,
    /// `namespace/name` -> IPv6 address (pods that have one).
    pub pods6: BTreeMap<String, Ipv6Addr>,
    /// The IPv6 range pod addresses come from, when they have IPv6.
    pub subnet6: String,
    /// The family placeholders give (FORMAT: IPv4 unless `--ip-family
    /// ipv6`).
    pub family: Family,
}

/// The canonical network of `ip` with `prefix` bits: `{{cidr x/a 8}}`.
pub fn network(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    Ipv4Addr::from(u32::from(ip) & mask)
}

impl Addresses {
    fn pod(&self, key: &str) -> Result<Ipv4Addr> {
        self.pods
            .get(key)
            .copied()
            .ok_or_else(|| anyhow!("no pod {key} in this case"))
    }

    fn pod6(&self, key: &str) -> Result<Ipv6Addr> {
        if !self.pods.contains_key(key) && !self.pods6.contains_key(key) {
            bail!("no pod {key} in this case");
        }
        self.pods6
            .get(key)
            .copied()
            .ok_or_else(|| anyhow!("pod {key} has no IPv6 address"))
    }

    /// One placeholder's body over IPv6.
    fn resolve6(&self, body: &str) -> Result<String> {
        let words: Vec<&str> = body.split_whitespace().collect();
        match words.as_slice() {
            ["ip", pod] => Ok(self.pod6(pod)?.to_string()),
            ["cidr", pod, n] => {
                let prefix: u8 = n
                    .parse()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| anyhow!("{n:?} is not a prefix length 0-32"))?;
                let len = prefix + SHIFT;
                Ok(format!("{}/{len}", network6(self.pod6(pod)?, len)))
            }
            ["subnet"] if self.subnet6.is_empty() => bail!("the pods have no IPv6 range"),
            ["subnet"] => Ok(self.subnet6.clone()),
            ["host", pod] => Ok(format!("{}/128", self.pod6(pod)?)),
            ["node-ip", node] => self
                .nodes6
                .get(*node)
                .map(|a| a.to_string())
                .ok_or_else(|| anyhow!("no node {node} with an IPv6 address in this cluster")),
            _ => self.resolve4(body),
        }
    }

    /// One placeholder's body (what is between `{{` and `}}`).
    fn resolve(&self, body: &str) -> Result<String> {
        if self.family == Family::V6 {
            return self.resolve6(body);
        }
        self.resolve4(body)
    }

    fn resolve4(&self, body: &str) -> Result<String> {
        let words: Vec<&str> = body.split_whitespace().collect();
        match words.as_slice() {
            ["ip", pod] => Ok(self.pod(pod)?.to_string()),
            ["cidr", pod, n] => {
                let prefix: u8 = n.parse().ok().filter(|p| *p <= 32).ok_or_else(|| anyhow!("{n:?} is not a prefix length 0-32"))?;
                Ok(format!("{}/{prefix}", network(self.pod(pod)?, prefix)))
            }
            ["subnet"] => Ok(self.subnet.clone()),
            ["host", pod] => Ok(format!("{}/32", self.pod(pod)?)),
            ["node-ip", node] => self
                .nodes
                .get(*node)
                .map(|a| a.to_string())
                .ok_or_else(|| anyhow!("no node {node} in this cluster")),
            _ => bail!("unknown placeholder {{{{{body}}}}} (known: {{{{ip ns/pod}}}}, {{{{host ns/pod}}}}, {{{{cidr ns/pod N}}}}, {{{{subnet}}}}, {{{{node-ip NODE}}}})"),
        }
    }

    /// Replaces every placeholder in `s`.
    pub fn substitute_str(&self, s: &str) -> Result<String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| anyhow!("unterminated placeholder in {s:?}"))?;
            let body = &after[..end];
            out.push_str(&self.resolve(body).with_context(|| format!("in {s:?}"))?);
            rest = &after[end + 2..];
            // `{{ip P}}/32` and `{{node-ip N}}/32`, host prefixes, are
            // `/128` over IPv6.
            let is_ip = matches!(body.split_whitespace().next(), Some("ip" | "node-ip"));
            if let (Family::V6, true, Some(r)) = (self.family, is_ip, rest.strip_prefix("/32")) {
                if !r.starts_with(|c: char| c.is_ascii_digit()) {
                    out.push_str("/128");
                    rest = r;
                }
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Over IPv6 (`--ip-family ipv6`: every address is IPv6), a literal
    /// IPv4 CIDR value (an ipBlock's `cidr` or `except`, a `networks`
    /// entry) becomes IPv6 too: `0.0.0.0/0` the IPv6 world `::/0`, any
    /// other its mirror (as `{{cidr P N}}` mirrors pods' networks, so
    /// containment between literals and pods holds in both families).
    fn literal6(&self, s: String) -> String {
        if self.family != Family::V6 {
            return s;
        }
        match s.split_once('/') {
            Some((ip, len)) if ip.parse::<Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok() => {
                if len == "0" {
                    "::/0".to_string()
                } else {
                    super::family::mirror_cidr(&s).unwrap_or(s)
                }
            }
            _ => s,
        }
    }

    /// Replaces placeholders in every string value of a YAML document
    /// (keys are left alone).
    pub fn substitute(&self, v: &Value) -> Result<Value> {
        Ok(match v {
            Value::String(s) => Value::String(self.literal6(self.substitute_str(s)?)),
            Value::Sequence(items) => Value::Sequence(
                items
                    .iter()
                    .map(|i| self.substitute(i))
                    .collect::<Result<_>>()?,
            ),
            Value::Mapping(m) => {
                let mut out = serde_yaml::Mapping::new();
                for (k, v) in m {
                    out.insert(k.clone(), self.substitute(v)?);
                }
                Value::Mapping(out)
            }
            Value::Tagged(t) => Value::Tagged(Box::new(serde_yaml::value::TaggedValue {
                tag: t.tag.clone(),
                value: self.substitute(&t.value)?,
            })),
            other => other.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Addresses {
        Addresses {
            pods: [
                ("x/a".to_string(), Ipv4Addr::new(10, 213, 0, 2)),
                ("x/b".to_string(), Ipv4Addr::new(10, 213, 0, 3)),
            ]
            .into(),
            subnet: "10.213.0.0/24".into(),
            nodes: [("n1".to_string(), Ipv4Addr::new(10, 212, 0, 1))].into(),
            ..Addresses::default()
        }
    }

    fn mirror_node() -> Ipv6Addr {
        crate::conformance::family::mirror(Ipv4Addr::new(10, 212, 0, 1))
    }

    /// The same pods with their IPv6 mirrors, as `--ip-family ipv6` or
    /// `dual` gives them.
    fn addrs6(family: Family) -> Addresses {
        use crate::conformance::family::{mirror, mirror_cidr};
        let mut a = addrs();
        a.pods6 = a
            .pods
            .iter()
            .map(|(k, v)| (k.clone(), mirror(*v)))
            .collect();
        a.subnet6 = mirror_cidr(&a.subnet).unwrap();
        a.family = family;
        a
    }

    #[test]
    fn over_ipv6_every_form_is_ipv6() {
        let a = addrs6(Family::V6);
        let s = |t: &str| a.substitute_str(t).unwrap();
        assert_eq!(s("{{ip x/b}}"), "fd00:212:213:0:ad50:30::");
        assert_eq!(s("{{host x/b}}"), "fd00:212:213:0:ad50:30::/128");
        // The FORMAT's N + 60.
        assert_eq!(s("{{cidr x/b 24}}"), "fd00:212:213:0:ad50::/84");
        assert_eq!(s("{{cidr x/b 4}}"), "fd00:212:213::/64");
        assert_eq!(s("{{cidr x/b 0}}"), "fd00:212:213::/60");
        assert_eq!(s("{{cidr x/b 32}}"), "fd00:212:213:0:ad50:30::/92");
        assert_eq!(s("{{cidr x/b 31}}"), "fd00:212:213:0:ad50:20::/91");
        assert_eq!(s("{{subnet}}"), "fd00:212:213:0:ad50::/84");
        // The version-1 host prefix is a /128; other suffixes stay.
        assert_eq!(s("{{ip x/b}}/32"), "fd00:212:213:0:ad50:30::/128");
        assert_eq!(
            s("{{ip x/a}}/32,{{ip x/b}}/320"),
            "fd00:212:213:0:ad50:20::/128,fd00:212:213:0:ad50:30::/320"
        );
        let v = |t: &str| {
            let v = a.substitute(&Value::String(t.into())).unwrap();
            v.as_str().unwrap().to_string()
        };
        assert_eq!(v("0.0.0.0/0"), "::/0", "IPv4's world is IPv6's");
        assert_eq!(v("10.213.0.0/24"), "fd00:212:213:0:ad50::/84", "mirrored");
        assert_eq!(v("10.213.0.0"), "10.213.0.0", "not a CIDR");
        let four = addrs();
        let v4 = four.substitute(&Value::String("0.0.0.0/0".into())).unwrap();
        assert_eq!(
            v4.as_str(),
            Some("0.0.0.0/0"),
            "IPv4 literals stay over IPv4"
        );
        assert!(
            format!("{:#}", a.substitute_str("{{cidr x/b 33}}").unwrap_err())
                .contains("prefix length")
        );
        assert!(format!("{:#}", a.substitute_str("{{ip y/z}}").unwrap_err()).contains("no pod y/z"));
        assert!(
            format!("{:#}", a.substitute_str("{{node-ip n1}}").unwrap_err())
                .contains("no node n1 with an IPv6 address")
        );
        let mut n = addrs6(Family::V6);
        n.nodes6 = [("n1".to_string(), mirror_node())].into();
        assert_eq!(
            n.substitute_str("{{node-ip n1}}/32").unwrap(),
            format!("{}/128", mirror_node())
        );
        // A pod without an IPv6 address cannot be named over IPv6.
        let mut b = addrs6(Family::V6);
        b.pods6.remove("x/a");
        assert!(format!("{:#}", b.substitute_str("{{ip x/a}}").unwrap_err())
            .contains("x/a has no IPv6 address"));
    }

    #[test]
    fn dual_stack_placeholders_give_ipv4_forms() {
        let a = addrs6(Family::V4);
        assert_eq!(a.substitute_str("{{ip x/b}}/32").unwrap(), "10.213.0.3/32");
        assert_eq!(a.substitute_str("{{host x/b}}").unwrap(), "10.213.0.3/32");
        assert_eq!(
            a.substitute_str("{{cidr x/b 24}}").unwrap(),
            "10.213.0.0/24"
        );
        assert_eq!(a.substitute_str("{{subnet}}").unwrap(), "10.213.0.0/24");
    }

    #[test]
    fn resolves_each_form() {
        let a = addrs();
        assert_eq!(a.substitute_str("{{ip x/b}}/32").unwrap(), "10.213.0.3/32");
        assert_eq!(a.substitute_str("{{ ip  x/a }}").unwrap(), "10.213.0.2");
        assert_eq!(a.substitute_str("{{cidr x/b 4}}").unwrap(), "0.0.0.0/4");
        assert_eq!(
            a.substitute_str("{{cidr x/b 30}}").unwrap(),
            "10.213.0.0/30"
        );
        assert_eq!(
            a.substitute_str("{{cidr x/b 32}}").unwrap(),
            "10.213.0.3/32"
        );
        assert_eq!(a.substitute_str("{{cidr x/b 0}}").unwrap(), "0.0.0.0/0");
        assert_eq!(a.substitute_str("{{subnet}}").unwrap(), "10.213.0.0/24");
        assert_eq!(
            a.substitute_str("{{node-ip n1}}/32").unwrap(),
            "10.212.0.1/32"
        );
        assert!(a.substitute_str("{{node-ip n9}}").is_err());
        assert_eq!(
            a.substitute_str("no placeholder").unwrap(),
            "no placeholder"
        );
        assert_eq!(
            a.substitute_str("{{ip x/a}}-{{ip x/b}}").unwrap(),
            "10.213.0.2-10.213.0.3"
        );
    }

    #[test]
    fn reports_bad_placeholders() {
        let a = addrs();
        assert!(a
            .substitute_str("{{ip y/z}}")
            .unwrap_err()
            .to_string()
            .contains("in \"{{ip y/z}}\""));
        assert!(format!("{:#}", a.substitute_str("{{ip y/z}}").unwrap_err()).contains("no pod y/z"));
        assert!(
            format!("{:#}", a.substitute_str("{{cidr x/a 33}}").unwrap_err())
                .contains("prefix length")
        );
        assert!(
            format!("{:#}", a.substitute_str("{{podip x/a}}").unwrap_err())
                .contains("unknown placeholder {{podip x/a}}")
        );
        assert!(a
            .substitute_str("{{ip x/a")
            .unwrap_err()
            .to_string()
            .contains("unterminated"));
    }

    #[test]
    fn substitutes_inside_documents() {
        let doc: Value = serde_yaml::from_str(
            "spec:\n  egress:\n  - to:\n    - ipBlock: {cidr: '{{subnet}}', except: ['{{ip x/b}}/32']}\n    ports: [{port: 80}]\n",
        )
        .unwrap();
        let out = addrs().substitute(&doc).unwrap();
        let block = &out["spec"]["egress"][0]["to"][0]["ipBlock"];
        assert_eq!(block["cidr"].as_str(), Some("10.213.0.0/24"));
        assert_eq!(block["except"][0].as_str(), Some("10.213.0.3/32"));
        assert_eq!(
            out["spec"]["egress"][0]["ports"][0]["port"].as_u64(),
            Some(80)
        );
    }
}
