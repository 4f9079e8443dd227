//! Registered endpoints (pods on this node wired by the CNI plugin), kept in
//! a state file so a restarted agent knows them again, with stable
//! endpoint ids. The file is rewritten atomically (temp + rename).
use std::{
    collections::BTreeMap,
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

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    next_id: u32,
    /// By container id (one interface per pod).
    endpoints: BTreeMap<String, Entry>,
}

#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    file: File,
}

impl Registry {
    /// Load the registry, or start an empty one if there is none.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(state_dir)?;
        let path = state_dir.join("endpoints.json");
        let file = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => File {
                next_id: 1,
                ..Default::default()
            },
            Err(e) => return Err(e),
        };
        Ok(Self { path, file })
    }

    pub fn get(&self, container_id: &str) -> Option<&Entry> {
        self.file.endpoints.get(container_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.file.endpoints.values()
    }

    pub fn len(&self) -> usize {
        self.file.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.file.endpoints.is_empty()
    }

    /// The endpoint id this container has, or a fresh one.
    pub fn id_for(&mut self, container_id: &str) -> u32 {
        if let Some(e) = self.file.endpoints.get(container_id) {
            return e.endpoint_id;
        }
        let used: std::collections::BTreeSet<u32> = self
            .file
            .endpoints
            .values()
            .map(|e| e.endpoint_id)
            .collect();
        let mut id = self.file.next_id.max(1);
        while used.contains(&id) || id == 0 {
            id = id.wrapping_add(1);
        }
        self.file.next_id = id.wrapping_add(1);
        id
    }

    pub fn insert(&mut self, e: Entry) -> io::Result<()> {
        self.file
            .endpoints
            .insert(e.registration.container_id.clone(), e);
        self.save()
    }

    pub fn remove(&mut self, container_id: &str) -> io::Result<Option<Entry>> {
        let e = self.file.endpoints.remove(container_id);
        if e.is_some() {
            self.save()?;
        }
        Ok(e)
    }

    fn save(&self) -> io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&self.file)?)?;
        fs::rename(&tmp, &self.path)
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
            ipv4: "10.0.0.2".parse().unwrap(),
            host_ifname: "palx".into(),
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
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("endpoints.json"), b"{not json").unwrap();
        let e = Registry::open(&dir).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        fs::remove_dir_all(&dir).unwrap();
    }
}
