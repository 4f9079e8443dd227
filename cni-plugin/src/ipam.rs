//! Address management: the built-in allocator (one file per allocated
//! address, like host-local, under an flock), and delegation to another
//! IPAM plugin found in CNI_PATH.
use std::{
    fs::{self, File, OpenOptions},
    io::{ErrorKind, Write},
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command as Process, Stdio},
};

use serde_json::Value;

use crate::{
    config::{Attachment, Command, Env, Pool, Range},
    error::{self, CniError, Result},
};

const LOCK_FILE: &str = "lock";
/// The last address handed out, per family: round robin resumes after it.
/// (IPv4 keeps the name it had before IPv6.)
fn last_reserved(range: &Range) -> &'static str {
    if range.is_ipv4() {
        "last_reserved_ip.0"
    } else {
        "last_reserved_ip.1"
    }
}

fn store_err(what: &str, path: &Path, e: impl std::fmt::Display) -> CniError {
    CniError::with_details(
        error::IPAM_STORE,
        format!("IPAM store: {what}"),
        format!("{}: {e}", path.display()),
    )
}

/// The allocator's directory, locked for as long as this value lives.
/// Every allocated address, of either family, is a file named by the
/// address holding "containerid\nifname"; the state survives restarts, and
/// the exclusive flock serializes concurrent plugin runs.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

/// One allocation on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
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
                .and_then(|n| n.parse::<IpAddr>().ok())
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
        out.sort_by_key(|a| a.ip);
        Ok(out)
    }

    /// Every address (container, ifname) holds, IPv4 first.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|a| a.container_id == container_id && a.ifname == ifname)
            .map(|a| a.ip)
            .collect())
    }

    /// An address of (container, ifname) from each range of the pool, IPv4
    /// first: the one it already holds there (ADD is idempotent), else the
    /// next free one after the last handed out. If one range has none left,
    /// what this call took from the others is given back.
    pub fn allocate(
        &self,
        pool: &Pool,
        container_id: &str,
        ifname: &str,
    ) -> Result<Vec<(IpAddr, Range)>> {
        let taken = self.list()?;
        let mut got: Vec<(IpAddr, Range)> = Vec::new();
        let mut new: Vec<IpAddr> = Vec::new();
        for range in pool.ranges() {
            match self.allocate_in(range, &taken, container_id, ifname) {
                Ok((ip, fresh)) => {
                    got.push((ip, range.clone()));
                    if fresh {
                        new.push(ip);
                    }
                }
                Err(e) => {
                    for ip in new {
                        let _ = self.remove(ip);
                    }
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    /// One range's address; true when it was not held before.
    fn allocate_in(
        &self,
        range: &Range,
        taken: &[Allocation],
        container_id: &str,
        ifname: &str,
    ) -> Result<(IpAddr, bool)> {
        if let Some(a) = taken
            .iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname && range.contains(a.ip))
        {
            return Ok((a.ip, false));
        }
        let lr = self.dir.join(last_reserved(range));
        let last = fs::read_to_string(&lr)
            .ok()
            .and_then(|s| s.trim().parse::<IpAddr>().ok());
        let busy: std::collections::HashSet<IpAddr> = taken.iter().map(|t| t.ip).collect();
        // At most busy.len() + 1 candidates are looked at before a free one
        // (or the end of a full range), whatever the range's size.
        for ip in range.after(last) {
            if busy.contains(&ip) {
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
                    if let Err(e) = fs::write(&lr, ip.to_string()) {
                        let _ = fs::remove_file(&path);
                        return Err(store_err("cannot write", &lr, e));
                    }
                    return Ok((ip, true));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(store_err("cannot create the allocation", &path, e)),
            }
        }
        Err(CniError::with_details(
            error::POOL_EXHAUSTED,
            format!(
                "IPAM pool exhausted: all {} addresses of {}-{} ({}) are allocated",
                range.size(),
                range.start,
                range.end,
                range.subnet
            ),
            format!("network state in {}", self.dir.display()),
        ))
    }

    /// Addresses held in `range` (STATUS: is there room?).
    pub fn held_in(&self, range: &Range) -> Result<u128> {
        Ok(self.list()?.iter().filter(|a| range.contains(a.ip)).count() as u128)
    }

    /// Frees what (container, ifname) holds; nothing held is fine.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        let mut freed = Vec::new();
        for a in self.list()? {
            if a.container_id == container_id && a.ifname == ifname {
                self.remove(a.ip)?;
                freed.push(a.ip);
            }
        }
        Ok(freed)
    }

    pub fn remove(&self, ip: IpAddr) -> Result<()> {
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pool(dir: &Path, subnet: &str, start: Option<&str>, end: Option<&str>) -> Pool {
        Pool::from_conf(
            &BuiltinIpamConf {
                subnet: Some(subnet.into()),
                range_start: start.map(|s| s.parse().unwrap()),
                range_end: end.map(|s| s.parse().unwrap()),
                data_dir: Some(dir.to_path_buf()),
                ..Default::default()
            },
            "t",
        )
        .unwrap()
    }

    /// `subnet` and an IPv6 range set beside it.
    fn dual(dir: &Path, v4: &str, v6: &str, v6_end: Option<&str>) -> Pool {
        let conf = format!(
            r#"{{"subnet":"{v4}","dataDir":"{}","ranges":[[{{"subnet":"{v6}"{}}}]]}}"#,
            dir.display(),
            v6_end
                .map(|e| format!(r#","rangeEnd":"{e}""#))
                .unwrap_or_default()
        );
        Pool::from_conf(&serde_json::from_str(&conf).unwrap(), "t").unwrap()
    }

    fn only(got: Vec<(IpAddr, Range)>) -> IpAddr {
        assert_eq!(got.len(), 1, "{got:?}");
        got[0].0
    }

    #[test]
    fn allocate_is_idempotent_and_release_frees() {
        let d = tmp("idem");
        let p = pool(&d, "10.9.0.0/29", None, None);
        let s = Store::lock(&d).unwrap();
        let a = only(s.allocate(&p, "c1", "eth0").unwrap());
        assert_eq!(a, ip("10.9.0.2"));
        assert_eq!(only(s.allocate(&p, "c1", "eth0").unwrap()), a);
        let b = only(s.allocate(&p, "c1", "eth1").unwrap());
        assert_ne!(a, b);
        assert_eq!(
            fs::read_to_string(d.join(a.to_string())).unwrap(),
            "c1\neth0"
        );
        assert_eq!(s.release("c1", "eth0").unwrap(), vec![a]);
        assert!(s.release("c1", "eth0").unwrap().is_empty());
        // Round robin: the next allocation does not reuse the freed one.
        let c = only(s.allocate(&p, "c2", "eth0").unwrap());
        assert_ne!(c, a);
        drop(s);
        // State survives a new store (a restart).
        let s = Store::lock(&d).unwrap();
        assert_eq!(s.find("c2", "eth0").unwrap(), vec![c]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn exhaustion_is_code_100_and_gc_frees_stale() {
        let d = tmp("exh");
        let p = pool(&d, "10.9.0.0/24", Some("10.9.0.1"), Some("10.9.0.3"));
        assert_eq!(p.v4.as_ref().unwrap().size(), 2); // .1 is the gateway
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
        assert_eq!(only(s.allocate(&p, "c", "eth0").unwrap()), stale[0].ip);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn dual_stack_takes_one_address_per_family_in_the_same_store() {
        let d = tmp("dual");
        let p = dual(&d, "10.9.0.0/29", "fd00:9::/64", None);
        let s = Store::lock(&d).unwrap();
        let got = s.allocate(&p, "c1", "eth0").unwrap();
        let ips: Vec<IpAddr> = got.iter().map(|(ip, _)| *ip).collect();
        assert_eq!(ips, [ip("10.9.0.2"), ip("fd00:9::2")]);
        assert!(got[1].1.subnet.is_ipv6());
        // Idempotent for both; files named by the address, as host-local.
        let again: Vec<IpAddr> = s
            .allocate(&p, "c1", "eth0")
            .unwrap()
            .into_iter()
            .map(|(ip, _)| ip)
            .collect();
        assert_eq!(again, ips);
        assert_eq!(fs::read_to_string(d.join("fd00:9::2")).unwrap(), "c1\neth0");
        assert_eq!(
            fs::read_to_string(d.join("last_reserved_ip.1")).unwrap(),
            "fd00:9::2"
        );
        let second = s.allocate(&p, "c2", "eth0").unwrap();
        assert_eq!(second[1].0, ip("fd00:9::3"));
        assert_eq!(s.find("c1", "eth0").unwrap(), ips);
        // DEL releases both families; GC finds both stale.
        assert_eq!(s.release("c1", "eth0").unwrap(), ips);
        let stale: Vec<IpAddr> = s.stale(&[]).unwrap().into_iter().map(|a| a.ip).collect();
        assert_eq!(stale, [ip("10.9.0.3"), ip("fd00:9::3")]);
        // Round robin per family, across a restart.
        drop(s);
        let s = Store::lock(&d).unwrap();
        let third = s.allocate(&p, "c3", "eth0").unwrap();
        assert_eq!(third[0].0, ip("10.9.0.4"));
        assert_eq!(third[1].0, ip("fd00:9::4"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_exhausted_ipv6_range_gives_back_the_ipv4_address_it_took() {
        let d = tmp("v6exh");
        // fd00:9::1 is the gateway: one IPv6 address to hand out.
        let p = dual(&d, "10.9.0.0/29", "fd00:9::/64", Some("fd00:9::2"));
        assert_eq!(p.v6.as_ref().unwrap().size(), 1);
        let s = Store::lock(&d).unwrap();
        s.allocate(&p, "c1", "eth0").unwrap();
        let e = s.allocate(&p, "c2", "eth0").unwrap_err();
        assert_eq!(e.code, error::POOL_EXHAUSTED);
        assert!(e.msg.contains("fd00:9::/64"), "{e}");
        assert!(s.find("c2", "eth0").unwrap().is_empty(), "nothing kept");
        assert_eq!(s.list().unwrap().len(), 2, "c1's two addresses only");
        // STATUS's measure: the IPv6 range is full, the IPv4 one is not.
        let (v4, v6) = (p.v4.as_ref().unwrap(), p.v6.as_ref().unwrap());
        assert_eq!(s.held_in(v6).unwrap(), v6.size());
        assert!(s.held_in(v4).unwrap() < v4.size());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_huge_ipv6_range_allocates_without_listing_it() {
        let d = tmp("v6big");
        let p = Pool::from_conf(
            &serde_json::from_str(&format!(
                r#"{{"subnet":"fd00:a::/48","dataDir":"{}"}}"#,
                d.display()
            ))
            .unwrap(),
            "t",
        )
        .unwrap();
        let s = Store::lock(&d).unwrap();
        let a = only(s.allocate(&p, "c1", "eth0").unwrap());
        assert_eq!(a, ip("fd00:a::2"));
        // Wraps from the end of the range to its start.
        fs::write(
            d.join("last_reserved_ip.1"),
            "fd00:a:0:ffff:ffff:ffff:ffff:ffff",
        )
        .unwrap();
        assert_eq!(only(s.allocate(&p, "c2", "eth0").unwrap()), ip("fd00:a::3"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let d = tmp("conc");
        let p = dual(&d, "10.9.0.0/24", "fd00:9::/120", None);
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
        let mut ips: Vec<IpAddr> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap().into_iter().map(|(ip, _)| ip))
            .collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 128);
        fs::remove_dir_all(&d).unwrap();
    }
}
