//! `domainNames` patterns (ClusterNetworkPolicy v1alpha2): a fully
//! qualified name, or `*.` and one: the wildcard stands for one or more
//! whole labels in front of the rest, never for nothing (`*.example.com`
//! matches `a.example.com` and `a.b.example.com`, not `example.com`).
//! Names compare case-insensitively and a trailing dot is ignored.

/// Labels of at most 63 characters, names of at most 253.
const MAX_LABEL: usize = 63;
const MAX_NAME: usize = 253;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainPattern {
    /// `*.` in front.
    pub wildcard: bool,
    /// The rest: lowercase, without a trailing dot.
    pub base: String,
}

impl DomainPattern {
    /// Validates `s` as the API's schema does (letters, digits and inner
    /// hyphens per label, at least two labels, an optional `*.` in front and
    /// trailing dot).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(r) => (true, r),
            None => (false, s),
        };
        let base = normalize(rest);
        if base.is_empty() || base.len() > MAX_NAME {
            return Err(format!("{s:?} is not a domain name"));
        }
        let labels: Vec<&str> = base.split('.').collect();
        if labels.len() < 2 {
            return Err(format!("{s:?} is not a fully qualified domain name"));
        }
        for l in &labels {
            let ok = !l.is_empty()
                && l.len() <= MAX_LABEL
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-');
            if !ok {
                return Err(format!("{s:?}: {l:?} is not a valid label"));
            }
        }
        Ok(Self { wildcard, base })
    }

    /// Whether `name` (as a DNS answer spells it) is one this pattern names.
    pub fn matches(&self, name: &str) -> bool {
        let name = normalize(name);
        if !self.wildcard {
            return name == self.base;
        }
        name.len() > self.base.len() + 1
            && name.ends_with(&self.base)
            && name.as_bytes()[name.len() - self.base.len() - 1] == b'.'
            && !name[..name.len() - self.base.len() - 1].is_empty()
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.base)
    }
}

/// Lowercase, without the trailing dot.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    #[test]
    fn exact_names_match_case_insensitively_with_or_without_the_dot() {
        let x = p("Payments.Partner.Example.");
        assert!(x.matches("payments.partner.example"));
        assert!(x.matches("PAYMENTS.partner.example."));
        assert!(!x.matches("api.payments.partner.example"));
        assert!(!x.matches("partner.example"));
    }

    #[test]
    fn a_wildcard_is_one_or_more_whole_labels_never_none() {
        let x = p("*.cdn.example");
        assert!(x.matches("img.cdn.example"));
        assert!(x.matches("a.b.cdn.example"));
        assert!(x.matches("IMG.CDN.EXAMPLE."));
        assert!(!x.matches("cdn.example"));
        assert!(!x.matches("imgcdn.example"));
        assert!(!x.matches("xcdn.example"));
        assert!(!x.matches(".cdn.example"));
    }

    #[test]
    fn what_the_schema_refuses_is_refused() {
        for bad in [
            "",
            "*",
            "*.",
            "example",
            "*.example",
            "a..example.com",
            "-a.example.com",
            "a-.example.com",
            "a_b.example.com",
            "*.*.example.com",
            "a.*.example.com",
            &format!("{}.com", "a".repeat(64)),
        ] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(p("*.Example.COM").to_string(), "*.example.com");
    }
}
