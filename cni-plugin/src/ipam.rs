//! Address management: the built-in allocator (one file per allocated
//! address, like host-local, under an flock), and delegation to another
//! IPAM plugin found in CNI_PATH.
use std::{
    fs::{self, File, OpenOptions},
    io::{ErrorKind, Write},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command as Process, Stdio},
};

use serde_json::Value;

use crate::{
    config::{Attachment, Command, Env, Pool},
    error::{self, CniError, Result},
};

const LOCK_FILE: &str = "lock";
const LAST_RESERVED: &str = "last_reserved_ip.0";

fn store_err(what: &str, path: &Path, e: impl std::fmt::Display) -> CniError {
    CniError::with_details(
        error::IPAM_STORE,
        format!("IPAM store: {what}"),
        format!("{}: {e}", path.display()),
    )
}

/// The allocator's directory, locked for as long as this value lives.
/// Every allocated address is a file named by the address holding
/// "containerid\nifname"; the state survives restarts, and the exclusive
/// flock serializes concurrent plugin runs.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

/// One allocation on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub container_id: String,
    pub ifname: String,
}

impl Store {
    pub fn lock(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)
            .map_err(|e| store_err("cannot create the state directory", dir, e))?;
        let path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| store_err("cannot open the lock file", &path, e))?;
        loop {
            // SAFETY: valid fd; flock has no memory effects.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(store_err("cannot lock", &path, e));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Every allocation; files that are not an address are ignored, an
    /// address file that cannot be parsed counts as allocated to nobody
    /// (never handed out, removed by GC).
    pub fn list(&self) -> Result<Vec<Allocation>> {
        let rd = fs::read_dir(&self.dir).map_err(|e| store_err("cannot list", &self.dir, e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| store_err("cannot list", &self.dir, e))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = text.lines();
            let container_id = lines.next().unwrap_or_default().trim().to_string();
            let ifname = lines.next().unwrap_or_default().trim().to_string();
            out.push(Allocation {
                ip,
                container_id,
                ifname,
            });
        }
        out.sort_by_key(|a| u32::from(a.ip));
        Ok(out)
    }

    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
            .map(|a| a.ip))
    }

    /// The address of (container, ifname): the one it already holds (ADD is
    /// idempotent), else the next free one after the last handed out.
    pub fn allocate(&self, pool: &Pool, container_id: &str, ifname: &str) -> Result<Ipv4Addr> {
        let taken = self.list()?;
        if let Some(a) = taken
            .iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
        {
            return Ok(a.ip);
        }
        let last = fs::read_to_string(self.dir.join(LAST_RESERVED))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .filter(|a| pool.contains(*a));
        let all: Vec<Ipv4Addr> = pool.addresses().collect();
        let from = last
            .and_then(|l| all.iter().position(|a| *a == l))
            .map_or(0, |p| p + 1);
        let busy = |a: &Ipv4Addr| taken.iter().any(|t| t.ip == *a);
        for ip in all[from..].iter().chain(all[..from].iter()).copied() {
            if busy(&ip) {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(format!("{container_id}\n{ifname}").as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(|e| {
                            let _ = fs::remove_file(&path);
                            store_err("cannot write the allocation", &path, e)
                        })?;
                    let lr = self.dir.join(LAST_RESERVED);
                    fs::write(&lr, ip.to_string())
                        .map_err(|e| store_err("cannot write", &lr, e))?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(store_err("cannot create the allocation", &path, e)),
            }
        }
        Err(CniError::with_details(
            error::POOL_EXHAUSTED,
            format!(
                "IPAM pool exhausted: all {} addresses of {}-{} are allocated",
                all.len(),
                pool.start,
                pool.end
            ),
            format!("network state in {}", self.dir.display()),
        ))
    }

    /// Frees what (container, ifname) holds; nothing held is fine.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<Ipv4Addr>> {
        let mut freed = Vec::new();
        for a in self.list()? {
            if a.container_id == container_id && a.ifname == ifname {
                self.remove(a.ip)?;
                freed.push(a.ip);
            }
        }
        Ok(freed)
    }

    pub fn remove(&self, ip: Ipv4Addr) -> Result<()> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(store_err("cannot release", &path, e)),
        }
    }

    /// The allocations not in `valid` (GC's stale set).
    pub fn stale(&self, valid: &[Attachment]) -> Result<Vec<Allocation>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|a| {
                !valid
                    .iter()
                    .any(|v| v.container_id == a.container_id && v.ifname == a.ifname)
            })
            .collect())
    }
}

/// The executable `kind` in CNI_PATH.
pub fn find_plugin(kind: &str, cni_path: &str) -> Result<PathBuf> {
    cni_path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                error::DELEGATE,
                format!("failed to find IPAM plugin {kind:?} in CNI_PATH {cni_path:?}"),
            )
        })
}

/// Runs the delegated IPAM plugin with the same stdin and environment
/// (CNI_COMMAND set to `cmd`); its stderr goes to ours. A CNI error it
/// prints is passed on as is; its stdout on success is returned.
pub fn delegate(kind: &str, cmd: Command, env: &Env, stdin: &[u8]) -> Result<Option<Value>> {
    let exe = find_plugin(kind, &env.path)?;
    let mut child = Process::new(&exe)
        .env("CNI_COMMAND", cmd.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            CniError::with_details(
                error::DELEGATE,
                format!("failed to run IPAM plugin {kind:?}"),
                format!("{}: {e}", exe.display()),
            )
        })?;
    {
        let mut input = child.stdin.take().expect("piped");
        // A plugin may exit without reading everything: not our failure.
        let _ = input.write_all(stdin);
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::with_details(
            error::DELEGATE,
            format!("failed to run IPAM plugin {kind:?}"),
            e.to_string(),
        )
    })?;
    let parsed: Option<Value> = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(serde_json::from_slice(&out.stdout).map_err(|e| {
            CniError::with_details(
                error::DELEGATE,
                format!("IPAM plugin {kind:?} printed something that is not JSON"),
                format!("{e}: {}", String::from_utf8_lossy(&out.stdout).trim()),
            )
        })?)
    };
    if !out.status.success() {
        if let Some(code) = parsed
            .as_ref()
            .and_then(|v| v.get("code"))
            .and_then(Value::as_u64)
        {
            let v = parsed.as_ref().expect("has code");
            let s = |k: &str| {
                v.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            return Err(CniError::with_details(
                code as u32,
                format!("IPAM plugin {kind:?}: {}", s("msg")),
                s("details"),
            ));
        }
        return Err(CniError::new(
            error::DELEGATE,
            format!("IPAM plugin {kind:?} failed ({})", out.status),
        ));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BuiltinIpamConf;

    fn tmp(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("palisade-ipam-test-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn pool(dir: &Path, subnet: &str, start: Option<&str>, end: Option<&str>) -> Pool {
        Pool::from_conf(
            &BuiltinIpamConf {
                subnet: subnet.into(),
                range_start: start.map(|s| s.parse().unwrap()),
                range_end: end.map(|s| s.parse().unwrap()),
                gateway: None,
                data_dir: Some(dir.to_path_buf()),
                routes: None,
            },
            "t",
        )
        .unwrap()
    }

    #[test]
    fn allocate_is_idempotent_and_release_frees() {
        let d = tmp("idem");
        let p = pool(&d, "10.9.0.0/29", None, None);
        let s = Store::lock(&d).unwrap();
        let a = s.allocate(&p, "c1", "eth0").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(s.allocate(&p, "c1", "eth0").unwrap(), a);
        let b = s.allocate(&p, "c1", "eth1").unwrap();
        assert_ne!(a, b);
        assert_eq!(
            fs::read_to_string(d.join(a.to_string())).unwrap(),
            "c1\neth0"
        );
        assert_eq!(s.release("c1", "eth0").unwrap(), vec![a]);
        assert!(s.release("c1", "eth0").unwrap().is_empty());
        // Round robin: the next allocation does not reuse the freed one.
        let c = s.allocate(&p, "c2", "eth0").unwrap();
        assert_ne!(c, a);
        drop(s);
        // State survives a new store (a restart).
        let s = Store::lock(&d).unwrap();
        assert_eq!(s.find("c2", "eth0").unwrap(), Some(c));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn exhaustion_is_code_100_and_gc_frees_stale() {
        let d = tmp("exh");
        let p = pool(&d, "10.9.0.0/24", Some("10.9.0.1"), Some("10.9.0.3"));
        assert_eq!(p.size(), 2); // .1 is the gateway
        let s = Store::lock(&d).unwrap();
        s.allocate(&p, "a", "eth0").unwrap();
        s.allocate(&p, "b", "eth0").unwrap();
        let e = s.allocate(&p, "c", "eth0").unwrap_err();
        assert_eq!(e.code, error::POOL_EXHAUSTED);
        assert!(e.msg.contains("exhausted"), "{e}");
        let valid = vec![Attachment {
            container_id: "a".into(),
            ifname: "eth0".into(),
        }];
        let stale = s.stale(&valid).unwrap();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].container_id, "b");
        s.remove(stale[0].ip).unwrap();
        assert_eq!(s.allocate(&p, "c", "eth0").unwrap(), stale[0].ip);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let d = tmp("conc");
        let p = pool(&d, "10.9.0.0/24", None, None);
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let (d, p) = (d.clone(), p.clone());
                std::thread::spawn(move || {
                    // A store per thread: separate open file descriptions
                    // contend for the flock like separate processes.
                    let s = Store::lock(&d).unwrap();
                    s.allocate(&p, &format!("c{i}"), "eth0").unwrap()
                })
            })
            .collect();
        let mut ips: Vec<Ipv4Addr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 64);
        fs::remove_dir_all(&d).unwrap();
    }
}
