//! Sources of the cluster view. Both the Kubernetes watcher (`k8s`) and the
//! standalone manifest directory produce whole `Snapshot`s, so the rest of
//! the agent cannot tell them apart.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::Ipv4Addr,
    path::PathBuf,
    time::SystemTime,
};

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::{
    manifests::{self, Manifests},
    model::{Namespace, ObjectKey, Pod},
};

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub policies: BTreeMap<ObjectKey, NetworkPolicy>,
    /// Node addresses the source knows (Kubernetes: this Node's InternalIPs).
    pub host_ips: Vec<Ipv4Addr>,
    /// Objects the source could not read; everything else is in the snapshot.
    pub errors: Vec<String>,
}

/// The standalone source: a directory of YAML manifests, re-read when any
/// file in it changes (name, size or modification time). A file that stops
/// parsing (say, half-written by an editor) keeps its last good contents in
/// force, so a typo can never silently drop a policy; a deleted file is gone.
pub struct ManifestSource {
    dir: PathBuf,
    fingerprint: Option<Vec<(PathBuf, u64, SystemTime)>>,
    last_good: HashMap<PathBuf, String>,
}

impl ManifestSource {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            fingerprint: None,
            last_good: HashMap::new(),
        }
    }

    fn fingerprint(&self) -> io::Result<Vec<(PathBuf, u64, SystemTime)>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let m = e.metadata()?;
            v.push((e.path(), m.len(), m.modified()?));
        }
        v.sort();
        Ok(v)
    }

    /// A new snapshot when the directory changed (or `force`), None when
    /// nothing changed or the directory cannot be read: then the last good
    /// state stays in force.
    pub fn scan(&mut self, force: bool) -> Option<Snapshot> {
        let listed = self
            .fingerprint()
            .and_then(|fp| Ok((fp, manifests::yaml_files(&self.dir)?)));
        let (fp, files) = match listed {
            Ok(x) => x,
            Err(e) => {
                log::error!(
                    "reading manifests in {}: {e}; keeping the last good state",
                    self.dir.display()
                );
                return None;
            }
        };
        if !force && self.fingerprint.as_ref() == Some(&fp) {
            return None;
        }
        self.fingerprint = Some(fp);
        let mut all = Manifests::default();
        let mut kept = HashMap::new();
        for path in files {
            let name = path.display().to_string();
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    all.errors.push(format!("{name}: {e}"));
                    self.last_good.get(&path).cloned().unwrap_or_default()
                }
            };
            let errors = manifests::parse_str(&name, &text).errors;
            let text = match (errors.is_empty(), self.last_good.get(&path)) {
                (true, _) => {
                    kept.insert(path.clone(), text.clone());
                    text
                }
                (false, Some(good)) => {
                    all.errors.extend(errors);
                    all.errors
                        .push(format!("{name}: keeping its last good contents in force"));
                    kept.insert(path.clone(), good.clone());
                    good.clone()
                }
                // A new file that never parsed: what it has, with its errors.
                (false, None) => text,
            };
            all.add_text(&name, &text);
        }
        all.finish();
        self.last_good = kept;
        Some(Snapshot {
            namespaces: all.namespaces,
            pods: all.pods,
            policies: all.policies,
            host_ips: Vec::new(),
            errors: all.errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}}\n";

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_objects() {
        let dir = std::env::temp_dir().join(format!("palisade-source-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.yaml"), POLICY).unwrap();
        let mut src = ManifestSource::new(dir.clone());
        let s = src.scan(false).unwrap();
        assert_eq!(s.policies.len(), 1);
        assert!(s.errors.is_empty());
        assert!(src.scan(false).is_none(), "unchanged directory");

        std::fs::write(
            dir.join("p.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p\n",
        )
        .unwrap();
        let s = src.scan(true).unwrap();
        assert_eq!(s.policies.len(), 1, "the policy stays in force");
        assert!(
            s.errors.iter().any(|e| e.contains("last good")),
            "{:?}",
            s.errors
        );

        // A new broken file contributes what it can and reports the rest.
        std::fs::write(dir.join("q.yaml"), "kind: [").unwrap();
        let s = src.scan(true).unwrap();
        assert_eq!(s.policies.len(), 1);
        assert!(
            s.errors.iter().any(|e| e.contains("q.yaml")),
            "{:?}",
            s.errors
        );

        // Deleting the file removes its objects.
        std::fs::remove_file(dir.join("p.yaml")).unwrap();
        let s = src.scan(true).unwrap();
        assert!(s.policies.is_empty());

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            src.scan(true).is_none(),
            "an unreadable directory keeps the last state"
        );
    }
}
