//! Kubernetes label selectors (`metav1.LabelSelector`), parsed once and
//! matched against label sets. `matchLabels` and every `matchExpressions`
//! requirement are ANDed; the empty selector `{}` matches everything.
use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::model::Labels;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// The label is present and its value is one of the set.
    In(String, BTreeSet<String>),
    /// The label is absent, or its value is none of the set.
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A validated label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The empty selector: matches every label set.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Validates and converts a Kubernetes selector. The error names the
    /// offending part (`matchExpressions[1].operator`, ...), relative to the
    /// selector; callers prefix it with the selector's own path.
    pub fn parse(sel: &LabelSelector) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            if k.is_empty() {
                return Err("matchLabels: empty label key".into());
            }
            requirements.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let at = format!("matchExpressions[{i}]");
            if e.key.is_empty() {
                return Err(format!("{at}.key: empty label key"));
            }
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let req = match e.operator.as_str() {
                "In" | "NotIn" => {
                    if values.is_empty() {
                        return Err(format!(
                            "{at}.values: must be non-empty for operator {}",
                            e.operator
                        ));
                    }
                    if e.operator == "In" {
                        Requirement::In(e.key.clone(), values)
                    } else {
                        Requirement::NotIn(e.key.clone(), values)
                    }
                }
                "Exists" | "DoesNotExist" => {
                    if !values.is_empty() {
                        return Err(format!(
                            "{at}.values: must be empty for operator {}",
                            e.operator
                        ));
                    }
                    if e.operator == "Exists" {
                        Requirement::Exists(e.key.clone())
                    } else {
                        Requirement::DoesNotExist(e.key.clone())
                    }
                }
                other => {
                    let known = "In, NotIn, Exists, DoesNotExist";
                    return Err(format!(
                        "{at}.operator: unknown operator {other:?} ({known})"
                    ));
                }
            };
            requirements.push(req);
        }
        Ok(Self { requirements })
    }

    /// `None` (the field is absent) is the empty selector.
    pub fn parse_opt(sel: Option<&LabelSelector>) -> Result<Self, String> {
        sel.map_or_else(|| Ok(Self::everything()), Self::parse)
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(yaml: &str) -> Result<Selector, String> {
        let s: LabelSelector = serde_yaml::from_str(yaml).unwrap();
        Selector::parse(&s)
    }

    fn expr(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
            }]),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = sel("{}").unwrap();
        assert!(s.is_everything());
        assert!(s.matches(&Labels::new()));
        assert!(s.matches(&labels(&[("a", "b")])));
        assert!(Selector::parse_opt(None).unwrap().is_everything());
    }

    #[test]
    fn match_labels_all_must_match() {
        let s = sel("matchLabels: {app: web, tier: front}").unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn operator_in() {
        let s = Selector::parse(&expr("env", "In", Some(&["prod", "staging"]))).unwrap();
        assert!(s.matches(&labels(&[("env", "prod")])));
        assert!(s.matches(&labels(&[("env", "staging")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&Labels::new()));
    }

    #[test]
    fn operator_not_in_matches_absent_key() {
        let s = Selector::parse(&expr("env", "NotIn", Some(&["prod"]))).unwrap();
        assert!(!s.matches(&labels(&[("env", "prod")])));
        assert!(s.matches(&labels(&[("env", "dev")])));
        assert!(s.matches(&Labels::new()));
    }

    #[test]
    fn operator_exists_and_does_not_exist() {
        let e = Selector::parse(&expr("canary", "Exists", None)).unwrap();
        let d = Selector::parse(&expr("canary", "DoesNotExist", Some(&[]))).unwrap();
        let with = labels(&[("canary", "")]);
        assert!(e.matches(&with));
        assert!(!d.matches(&with));
        assert!(!e.matches(&Labels::new()));
        assert!(d.matches(&Labels::new()));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = sel(
            "matchLabels: {app: web}\nmatchExpressions:\n- {key: env, operator: In, values: [prod]}\n- {key: debug, operator: DoesNotExist}",
        )
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "prod"), ("debug", "1")])));
    }

    #[test]
    fn invalid_selectors_are_rejected_with_the_field() {
        let e = Selector::parse(&expr("a", "Equals", Some(&["x"]))).unwrap_err();
        assert!(e.contains("matchExpressions[0].operator"), "{e}");
        let e = Selector::parse(&expr("a", "In", None)).unwrap_err();
        assert!(e.contains("matchExpressions[0].values"), "{e}");
        let e = Selector::parse(&expr("a", "Exists", Some(&["x"]))).unwrap_err();
        assert!(e.contains("must be empty"), "{e}");
        let e = Selector::parse(&expr("", "Exists", None)).unwrap_err();
        assert!(e.contains(".key"), "{e}");
    }
}
