//! Registered endpoints (pods on this node wired by the CNI plugin), kept
//! in the state directory so a restarted agent knows them again, with
//! stable endpoint ids. One small file per endpoint (`endpoints/<container
//! id>.json`, written atomically: temp + rename) and the next id in
//! `endpoints/next_id`: a registration writes what it changes, not the
//! whole registry (a rewrite of every entry cost a CNI ADD more than its
//! compile at a few hundred pods). A registry in the older single file
//! (`endpoints.json`) is read and moved to this layout.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
};

use palisade_api::Registration;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub registration: Registration,
    pub endpoint_id: u32,
    pub ifindex: u32,
}

/// The older single-file layout.
#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    next_id: u32,
    /// By container id (one interface per pod).
    endpoints: BTreeMap<String, Entry>,
}

#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    next_id: u32,
    endpoints: BTreeMap<String, Entry>,
    ids: BTreeSet<u32>,
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

/// Write `bytes` to `path` atomically.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

impl Registry {
    /// Load the registry, or start an empty one if there is none.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let dir = state_dir.join("endpoints");
        fs::create_dir_all(&dir)?;
        let mut r = Self {
            dir,
            next_id: 1,
            endpoints: BTreeMap::new(),
            ids: BTreeSet::new(),
        };
        match fs::read(r.dir.join("next_id")) {
            Ok(b) => {
                let text = String::from_utf8_lossy(&b);
                r.next_id = text
                    .trim()
                    .parse()
                    .map_err(|e| invalid(&r.dir.join("next_id"), e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for f in fs::read_dir(&r.dir)? {
            let path = f?.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let e: Entry =
                serde_json::from_slice(&fs::read(&path)?).map_err(|e| invalid(&path, e))?;
            r.ids.insert(e.endpoint_id);
            r.endpoints.insert(e.registration.container_id.clone(), e);
        }
        let old = state_dir.join("endpoints.json");
        match fs::read(&old) {
            Ok(b) => {
                let file: File = serde_json::from_slice(&b).map_err(|e| invalid(&old, e))?;
                r.next_id = r.next_id.max(file.next_id);
                for e in file.endpoints.into_values() {
                    r.insert(e)?;
                }
                r.save_next_id()?;
                fs::remove_file(&old)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(r)
    }

    pub fn get(&self, container_id: &str) -> Option<&Entry> {
        self.endpoints.get(container_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.endpoints.values()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The endpoint id this container has, or a fresh one: ids count up
    /// (wrapping, skipping ids in use), so a new pod does not get a recently
    /// deregistered pod's id.
    pub fn id_for(&mut self, container_id: &str) -> u32 {
        if let Some(e) = self.endpoints.get(container_id) {
            return e.endpoint_id;
        }
        let mut id = self.next_id.max(1);
        while self.ids.contains(&id) || id == 0 {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        id
    }

    fn path(&self, container_id: &str) -> PathBuf {
        self.dir.join(format!("{container_id}.json"))
    }

    fn save_next_id(&self) -> io::Result<()> {
        write_atomic(
            &self.dir.join("next_id"),
            self.next_id.to_string().as_bytes(),
        )
    }

    pub fn insert(&mut self, e: Entry) -> io::Result<()> {
        write_atomic(
            &self.path(&e.registration.container_id),
            &serde_json::to_vec(&e)?,
        )?;
        self.save_next_id()?;
        if let Some(old) = self.endpoints.get(&e.registration.container_id) {
            self.ids.remove(&old.endpoint_id);
        }
        self.ids.insert(e.endpoint_id);
        self.endpoints
            .insert(e.registration.container_id.clone(), e);
        Ok(())
    }

    pub fn remove(&mut self, container_id: &str) -> io::Result<Option<Entry>> {
        let Some(e) = self.endpoints.remove(container_id) else {
            return Ok(None);
        };
        self.ids.remove(&e.endpoint_id);
        match fs::remove_file(self.path(container_id)) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        Ok(Some(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str) -> Registration {
        Registration {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            namespace: "default".into(),
            pod: id.into(),
            ipv4: Some("10.0.0.2".parse().unwrap()),
            host_ifname: "palx".into(),
            mac: None,
            ipv6: None,
        }
    }

    #[test]
    fn ids_are_stable_and_survive_a_reload() {
        let dir = std::env::temp_dir().join(format!("palisade-reg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut r = Registry::open(&dir).unwrap();
        let a = r.id_for("a");
        r.insert(Entry {
            registration: reg("a"),
            endpoint_id: a,
            ifindex: 5,
        })
        .unwrap();
        assert_eq!(r.id_for("a"), a);
        let b = r.id_for("b");
        assert_ne!(a, b);
        r.insert(Entry {
            registration: reg("b"),
            endpoint_id: b,
            ifindex: 6,
        })
        .unwrap();

        let mut again = Registry::open(&dir).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again.get("b").unwrap().endpoint_id, b);
        let c = again.id_for("c");
        assert!(c != a && c != b);
        assert_eq!(again.remove("a").unwrap().unwrap().ifindex, 5);
        assert!(again.remove("a").unwrap().is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_an_empty_registry() {
        let dir = std::env::temp_dir().join(format!("palisade-reg-bad-{}", std::process::id()));
        fs::create_dir_all(dir.join("endpoints")).unwrap();
        fs::write(dir.join("endpoints/c1.json"), b"{not json").unwrap();
        let e = Registry::open(&dir).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_older_single_file_is_moved_to_one_file_per_endpoint() {
        let dir = std::env::temp_dir().join(format!("palisade-reg-old-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let old = File {
            next_id: 9,
            endpoints: BTreeMap::from([(
                "a".to_string(),
                Entry {
                    registration: reg("a"),
                    endpoint_id: 4,
                    ifindex: 5,
                },
            )]),
        };
        fs::write(
            dir.join("endpoints.json"),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        let mut r = Registry::open(&dir).unwrap();
        assert_eq!(r.get("a").unwrap().endpoint_id, 4);
        assert!(!dir.join("endpoints.json").exists());
        assert!(dir.join("endpoints/a.json").exists());
        assert_eq!(r.id_for("b"), 9, "the next id carries over");
        let again = Registry::open(&dir).unwrap();
        assert_eq!(again.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
