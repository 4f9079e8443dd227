//! The system side of the benchmarks: network namespaces, scratch
//! directories, bpffs roots and child processes, each a guard that cleans
//! up on drop, and a Ctrl-C flag that makes every loop stop early so that
//! the guards get to run. Every address used lives only inside namespaces
//! these guards create.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Child,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

// The namespace, scratch-directory and bpffs guards are the test harness's.
pub use palisade_tests::{agent::TempDir, enter_thread, unique, NetNs, PinRoot};

use anyhow::{bail, Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag instead of killing the process: the running
/// measurement stops at its next check and every guard cleans up.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once Ctrl-C was pressed: `check()?` between steps.
pub fn check() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleep that wakes early on Ctrl-C.
pub fn sleep(d: Duration) {
    let end = Instant::now() + d;
    while !interrupted() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// A binary of this workspace, next to this one (`target/release/`).
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("own executable path")?;
    let p = exe.parent().context("executable directory")?.join(name);
    if !p.is_file() {
        bail!(
            "{} is not built (`cargo build --release --workspace --bins`)",
            p.display()
        );
    }
    Ok(p)
}

pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = path.to_path_buf();
    std::thread::spawn(move || -> Result<T> {
        enter_thread(&path)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

/// A child process killed (by its PID) and reaped on drop.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pin the calling thread to one CPU.
pub fn pin_thread(cpu: usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays in bounds.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % n, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which ends with the last ')'.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5): 12 and 13 here.
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// VmRSS and VmHWM of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resident memory of a process by kind of mapping, in KiB, largest
/// first: the main heap, other anonymous memory (thread arenas, stacks),
/// BPF maps mapped into the process (the event ring), files (binary,
/// libraries).
pub fn rss_breakdown(pid: u32) -> Result<Vec<(String, u64)>> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(smaps_breakdown(&text))
}

pub fn smaps_breakdown(smaps: &str) -> Vec<(String, u64)> {
    let mut by: Vec<(String, u64)> = Vec::new();
    let mut kind = String::new();
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or_default();
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let name = line.split_whitespace().nth(5).unwrap_or("");
            kind = match name {
                "[heap]" => "heap".into(),
                "" => "other anonymous (thread arenas, stacks)".into(),
                n if n.starts_with("anon_inode:bpf") => "BPF maps mapped in (event ring)".into(),
                n if n.starts_with('[') => "other".into(),
                _ => "files (binary, libraries)".into(),
            };
        } else if first == "Rss:" {
            let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match by.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, v)) => *v += kib,
                None => by.push((kind.clone(), kib)),
            }
        }
    }
    by.sort_by_key(|x| std::cmp::Reverse(x.1));
    by
}

/// One line about the machine, for the report header.
pub fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cpus} CPUs ({cpu}), Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_are_summed_by_kind_of_mapping() {
        let smaps = "\
55d0a000-55d0b000 r-xp 00000000 08:01 123 /usr/bin/palisade-agent
Size:                  4 kB
Rss:                   4 kB
55d0c000-55d1c000 rw-p 00000000 00:00 0 [heap]
Rss:                1000 kB
7f00000-7f10000 rw-p 00000000 00:00 0
Rss:                 300 kB
7f20000-7f30000 rw-p 00000000 00:00 0
Rss:                 200 kB
7f40000-7f50000 r--s 00000000 00:0e 99 anon_inode:bpf-map
Rss:                 800 kB
";
        let b = smaps_breakdown(smaps);
        assert_eq!(b[0], ("heap".to_string(), 1000));
        assert_eq!(b[1], ("BPF maps mapped in (event ring)".to_string(), 800));
        assert_eq!(
            b[2],
            ("other anonymous (thread arenas, stacks)".to_string(), 500)
        );
        assert_eq!(b[3], ("files (binary, libraries)".to_string(), 4));
    }

    #[test]
    fn cpu_seconds_of_this_process_are_read() {
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }
}
