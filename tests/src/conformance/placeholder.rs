//! `{{ip ns/pod}}`, `{{cidr ns/pod N}}` and `{{subnet}}` in policies: pod
//! addresses are only known once the CNI plugin has allocated them, so
//! cases name them symbolically.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::Value;

/// What placeholders resolve against.
#[derive(Clone, Debug, Default)]
pub struct Addresses {
    /// `namespace/name` -> address.
    pub pods: BTreeMap<String, Ipv4Addr>,
    /// The CIDR all pod addresses come from, e.g. `10.213.0.0/24`.
    pub subnet: String,
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

    /// One placeholder's body (what is between `{{` and `}}`).
    fn resolve(&self, body: &str) -> Result<String> {
        let words: Vec<&str> = body.split_whitespace().collect();
        match words.as_slice() {
            ["ip", pod] => Ok(self.pod(pod)?.to_string()),
            ["cidr", pod, n] => {
                let prefix: u8 = n.parse().ok().filter(|p| *p <= 32).ok_or_else(|| anyhow!("{n:?} is not a prefix length 0-32"))?;
                Ok(format!("{}/{prefix}", network(self.pod(pod)?, prefix)))
            }
            ["subnet"] => Ok(self.subnet.clone()),
            ["host", pod] => Ok(format!("{}/32", self.pod(pod)?)),
            _ => bail!("unknown placeholder {{{{{body}}}}} (known: {{{{ip ns/pod}}}}, {{{{cidr ns/pod N}}}}, {{{{subnet}}}})"),
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
            out.push_str(
                &self
                    .resolve(&after[..end])
                    .with_context(|| format!("in {s:?}"))?,
            );
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Replaces placeholders in every string value of a YAML document
    /// (keys are left alone).
    pub fn substitute(&self, v: &Value) -> Result<Value> {
        Ok(match v {
            Value::String(s) => Value::String(self.substitute_str(s)?),
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
        }
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
