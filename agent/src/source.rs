//! The standalone source: a directory of YAML manifests (see `manifests`
//! for what is read), watched with inotify, that sends the owner a
//! [`SourceEvent::Resync`] with the directory's complete view whenever it
//! changes.
//!
//! Guarantees, on every rescan:
//! - a file that stops parsing (say, half-written by an editor) keeps its
//!   last good contents in force, with an error in `Snapshot::errors`, so a
//!   typo can never silently drop a policy;
//! - a deleted file's objects are gone;
//! - an unreadable directory keeps the last state (and says so once).
//!
//! Each file is parsed at most once per rescan, and only when its (size,
//! mtime, device, inode) changed, following symlinks so a mounted
//! ConfigMap's `..data` swap counts as a change of every file.
//!
//! Watching: the directory (files created, written, renamed over, deleted)
//! and its parent (the directory itself removed, renamed or recreated).
//! Events are debounced ([`DEBOUNCE`]) so an editor's write-rename-chmod or
//! a `kubectl cp` of many files makes one rescan. When inotify cannot be set
//! up the source polls every [`POLL_FALLBACK`] instead, and logs it.
use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{mpsc as std_mpsc, Arc},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use notify::{
    event::{AccessKind, AccessMode},
    EventKind, RecursiveMode, Watcher,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

pub use crate::change::Snapshot;
use crate::{
    change::SourceEvent,
    manifests::{self, Manifests},
};

const CLOSED_AFTER_WRITE: EventKind = EventKind::Access(AccessKind::Close(AccessMode::Write));

/// Quiet time after the last filesystem event before a rescan.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// A steady stream of events still rescans at least this often.
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);
/// Rescan interval when inotify is unavailable.
pub const POLL_FALLBACK: Duration = Duration::from_secs(2);
/// With inotify, a cheap (stat-only) rescan this often anyway, in case an
/// event was lost; it also notices that the owner went away.
const SAFETY_NET: Duration = Duration::from_secs(30);
/// A file modified more recently than this may change again within the
/// same mtime tick (ext3 and FAT count seconds): its stamp is not trusted,
/// and the next rescan re-reads it.
const SETTLE: Duration = Duration::from_secs(2);

/// What identifies a file's contents without reading them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: SystemTime,
    dev: u64,
    ino: u64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> io::Result<Self> {
        Ok(Self {
            len: m.len(),
            mtime: m.modified()?,
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Old enough that an equal stamp means equal contents.
    fn settled(&self, now: SystemTime) -> bool {
        now.duration_since(self.mtime)
            .is_ok_and(|age| age >= SETTLE)
    }
}

/// One file of the directory, as last read.
struct FileState {
    stamp: Option<Stamp>,
    settled: bool,
    /// A hash of the contents last read: a forced rescan re-reads every
    /// file but parses only those whose contents changed.
    digest: Option<u64>,
    /// The last contents that parsed without an error.
    good: Option<Arc<Manifests>>,
    /// What the file adds to the view now: its current contents, or its
    /// last good ones with the errors that keep the new ones out.
    contributes: Arc<Manifests>,
}

/// The manifest directory's reader: a rescan re-reads what changed and
/// produces the directory's view. [`ManifestSource::spawn`] drives one from
/// inotify; `scan` is also usable on its own.
pub struct ManifestSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The view of the last rescan.
    last: Option<Snapshot>,
    /// The directory could not be listed at the last rescan.
    unreadable: bool,
    /// Files parsed so far (tests check that unchanged files are not).
    parses: u64,
}

impl ManifestSource {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            last: None,
            unreadable: false,
            parses: 0,
        }
    }

    /// Re-reads the directory. Returns the new view, or None when nothing
    /// changed (unless `force`: then every file is re-read and the view is
    /// returned, changed or not). When the directory cannot be listed, the
    /// last view stays, with an error saying so (returned once, when it
    /// becomes unreadable).
    pub fn scan(&mut self, force: bool) -> Option<Snapshot> {
        let listed = match manifests::yaml_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                let first = !self.unreadable;
                self.unreadable = true;
                if first {
                    error!(
                        "reading manifests in {}: {e}; keeping the last good state",
                        self.dir.display()
                    );
                }
                if !first && !force {
                    return None;
                }
                let mut s = self.last.clone().unwrap_or_default();
                s.errors.push(format!(
                    "{}: {e}; keeping the last good state",
                    self.dir.display()
                ));
                return Some(s);
            }
        };
        let recovered = std::mem::take(&mut self.unreadable);
        let now = SystemTime::now();
        let mut changed = force || recovered || self.last.is_none();
        let mut files = BTreeMap::new();
        for path in listed {
            let old = self.files.remove(&path);
            let stamp = std::fs::metadata(&path).and_then(|m| Stamp::of(&m));
            if let Err(e) = &stamp {
                if e.kind() == io::ErrorKind::NotFound {
                    // Gone since the listing (or a dangling symlink).
                    changed |= old.is_some();
                    continue;
                }
            }
            let stamp = stamp.ok();
            match old {
                Some(old) if !force && old.settled && stamp.is_some() && old.stamp == stamp => {
                    files.insert(path, old);
                }
                old => {
                    let state = self.read(&path, stamp, now, old);
                    changed = true;
                    files.insert(path, state);
                }
            }
        }
        // Whatever is left was deleted.
        changed |= !self.files.is_empty();
        self.files = files;
        if !changed {
            return None;
        }
        let mut all = Manifests::default();
        for (path, f) in &self.files {
            all.merge(&path.display().to_string(), &f.contributes);
        }
        all.finish();
        let snap = all.into_snapshot();
        if !force && self.last.as_ref() == Some(&snap) {
            return None;
        }
        self.last = Some(snap.clone());
        Some(snap)
    }

    /// Reads and parses one file (once), falling back to its last good
    /// contents when it does not parse or cannot be read.
    fn read(
        &mut self,
        path: &Path,
        stamp: Option<Stamp>,
        now: SystemTime,
        old: Option<FileState>,
    ) -> FileState {
        let name = path.display().to_string();
        let settled = stamp.is_some_and(|s| s.settled(now));
        let text = std::fs::read_to_string(path);
        let digest = text.as_ref().ok().map(|t| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            t.hash(&mut h);
            h.finish()
        });
        if let Some(o) = old
            .as_ref()
            .filter(|o| digest.is_some() && o.digest == digest)
        {
            return FileState {
                stamp,
                settled,
                digest,
                good: o.good.clone(),
                contributes: o.contributes.clone(),
            };
        }
        let good = old.and_then(|o| o.good);
        let kept = |errors: Vec<String>, good: &Option<Arc<Manifests>>| {
            let mut m = good.as_deref().cloned().unwrap_or_default();
            m.errors = errors;
            Arc::new(m)
        };
        match text {
            Err(e) => {
                let mut errors = vec![format!("{name}: {e}")];
                if good.is_some() {
                    errors.push(format!("{name}: keeping its last good contents in force"));
                }
                FileState {
                    stamp,
                    // Try again on the next rescan.
                    settled: false,
                    digest: None,
                    contributes: kept(errors, &good),
                    good,
                }
            }
            Ok(text) => {
                self.parses += 1;
                let parsed = Arc::new(manifests::parse_file(&name, &text));
                if parsed.errors.is_empty() {
                    return FileState {
                        stamp,
                        settled,
                        digest,
                        good: Some(parsed.clone()),
                        contributes: parsed,
                    };
                }
                let contributes = match &good {
                    Some(_) => {
                        let mut errors = parsed.errors.clone();
                        errors.push(format!("{name}: keeping its last good contents in force"));
                        kept(errors, &good)
                    }
                    // A file that never parsed: what it has, with its errors.
                    None => parsed,
                };
                FileState {
                    stamp,
                    settled,
                    digest,
                    good,
                    contributes,
                }
            }
        }
    }

    /// Watches `dir` and sends a [`SourceEvent::Resync`] on `tx` for every
    /// change. The first Resync (the directory as it is now; empty with an
    /// error if it cannot be read) is sent before this returns, so `tx`
    /// must have room for one event. The source stops when the handle is
    /// dropped or the receiver is closed.
    pub fn spawn(dir: PathBuf, tx: mpsc::Sender<SourceEvent>) -> Result<ManifestHandle> {
        Self::spawn_with(dir, tx, true)
    }

    fn spawn_with(
        dir: PathBuf,
        tx: mpsc::Sender<SourceEvent>,
        inotify: bool,
    ) -> Result<ManifestHandle> {
        // inotify names paths from the watched ones: make them comparable.
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let (msg_tx, msg_rx) = std_mpsc::channel();
        // Watch first, then read: a change between the two is a rescan more,
        // never a change missed.
        let watch = inotify
            .then(|| DirWatch::start(&dir, msg_tx.clone()))
            .flatten();
        let inotify = watch.is_some();
        let mut source = ManifestSource::new(dir.clone());
        let first = source.scan(true).unwrap_or_default();
        tx.try_send(SourceEvent::Resync(first))
            .context("sending the manifests' first view")?;
        std::thread::Builder::new()
            .name("manifests".into())
            .spawn(move || source.run(watch, msg_rx, tx))
            .context("starting the manifest watcher")?;
        info!("watching manifests in {}", dir.display());
        Ok(ManifestHandle {
            msg: msg_tx,
            inotify,
        })
    }

    /// The watcher thread: debounce filesystem events, rescan, send.
    fn run(
        mut self,
        mut watch: Option<DirWatch>,
        rx: std_mpsc::Receiver<Msg>,
        tx: mpsc::Sender<SourceEvent>,
    ) {
        loop {
            let idle = if watch.is_some() {
                SAFETY_NET
            } else {
                POLL_FALLBACK
            };
            let mut replies = Vec::new();
            let force = match rx.recv_timeout(idle) {
                Err(std_mpsc::RecvTimeoutError::Timeout) => false,
                Err(std_mpsc::RecvTimeoutError::Disconnected) | Ok(Msg::Stop) => return,
                Ok(Msg::Rescan(reply)) => {
                    replies.push(reply);
                    true
                }
                Ok(Msg::Fs { dir_itself }) => {
                    // Debounce: wait for DEBOUNCE of quiet (at most
                    // DEBOUNCE_MAX); a rescan asked for meanwhile joins in.
                    let start = Instant::now();
                    let mut force = false;
                    let mut rewatch = dir_itself;
                    loop {
                        let wait = DEBOUNCE.min(DEBOUNCE_MAX.saturating_sub(start.elapsed()));
                        match rx.recv_timeout(wait) {
                            Ok(Msg::Fs { dir_itself }) => {
                                rewatch |= dir_itself;
                                if wait.is_zero() {
                                    break;
                                }
                            }
                            Ok(Msg::Rescan(reply)) => {
                                replies.push(reply);
                                force = true;
                            }
                            Ok(Msg::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                            Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                        }
                    }
                    if let Some(w) = &mut watch {
                        w.refresh(rewatch);
                    }
                    force
                }
            };
            if tx.is_closed() {
                return;
            }
            if let Some(snap) = self.scan(force) {
                if tx.blocking_send(SourceEvent::Resync(snap)).is_err() {
                    return;
                }
            }
            for r in replies {
                let _ = r.send(());
            }
        }
    }
}

/// Talks to a running manifest source.
pub struct ManifestHandle {
    msg: std_mpsc::Sender<Msg>,
    inotify: bool,
}

impl ManifestHandle {
    /// False when the source polls (inotify could not be set up).
    pub fn uses_inotify(&self) -> bool {
        self.inotify
    }

    /// Re-read every file now (`palisade-agent sync`). Returns once the
    /// resulting Resync was sent (always one, changed or not): the caller
    /// must not be the only reader of the channel, or must read it
    /// concurrently, since a full channel waits for room.
    pub async fn rescan(&self) {
        let (reply, done) = oneshot::channel();
        if self.msg.send(Msg::Rescan(reply)).is_ok() {
            let _ = done.await;
        }
    }
}

impl Drop for ManifestHandle {
    fn drop(&mut self) {
        let _ = self.msg.send(Msg::Stop);
    }
}

enum Msg {
    /// Something changed in the directory, or (`dir_itself`) the directory
    /// itself was created, removed, renamed or changed.
    Fs {
        dir_itself: bool,
    },
    Rescan(oneshot::Sender<()>),
    Stop,
}

/// The inotify watches: the directory itself, and its parent for the
/// directory being removed, renamed or recreated (the watch on a removed
/// directory dies with it).
struct DirWatch {
    watcher: notify::RecommendedWatcher,
    dir: PathBuf,
    /// (device, inode) of the directory now watched.
    watching: Option<(u64, u64)>,
}

impl DirWatch {
    /// None (and a log line) when inotify is not available: the caller
    /// polls instead.
    fn start(dir: &Path, tx: std_mpsc::Sender<Msg>) -> Option<Self> {
        let ours = dir.to_path_buf();
        let handler = move |ev: notify::Result<notify::Event>| {
            let msg = match &ev {
                // An error or a queue overflow: rescan (and re-watch) to be
                // sure.
                Err(_) => Some(Msg::Fs { dir_itself: true }),
                Ok(ev) if ev.need_rescan() => Some(Msg::Fs { dir_itself: true }),
                // Opening and reading change nothing (and our own rescans
                // open the directory and its files).
                Ok(ev) if ev.kind.is_access() && ev.kind != CLOSED_AFTER_WRITE => None,
                Ok(ev) => ev
                    .paths
                    .iter()
                    .any(|p| p.starts_with(&ours))
                    .then(|| Msg::Fs {
                        dir_itself: ev.paths.contains(&ours),
                    }),
            };
            if let Some(msg) = msg {
                let _ = tx.send(msg);
            }
        };
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let started = notify::recommended_watcher(handler).and_then(|mut w| {
            w.watch(parent, RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        match started {
            Ok(watcher) => {
                let mut w = Self {
                    watcher,
                    dir: dir.to_path_buf(),
                    watching: None,
                };
                w.refresh(false);
                Some(w)
            }
            Err(e) => {
                warn!(
                    "cannot watch {} with inotify ({e}); polling it every {} s instead",
                    dir.display(),
                    POLL_FALLBACK.as_secs()
                );
                None
            }
        }
    }

    /// (Re-)watches the directory if it is not the one watched (created or
    /// replaced since), or anyway (`again`: the directory itself moved; a
    /// recreated directory may have the old one's inode number).
    fn refresh(&mut self, again: bool) {
        let now = std::fs::metadata(&self.dir)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| (m.dev(), m.ino()));
        if now == self.watching && !again {
            return;
        }
        // Gone with the old directory already, most likely.
        let _ = self.watcher.unwatch(&self.dir);
        self.watching = None;
        if now.is_some() {
            match self.watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
                Ok(()) => self.watching = now,
                Err(e) => warn!("watching {}: {e}", self.dir.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::model::ObjectKey;

    fn policy(name: &str) -> String {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec: {{podSelector: {{}}}}\n")
    }

    fn policy_names(s: &Snapshot) -> Vec<String> {
        s.policies.keys().map(|k| k.name.to_string()).collect()
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("palisade-source-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Writes a file whose mtime is an hour old, so its stamp is trusted.
    fn write_settled(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
        let f = fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_objects() {
        let tmp = TempDir::new("lastgood");
        let dir = tmp.0.clone();
        fs::write(dir.join("p.yaml"), policy("p")).unwrap();
        let mut src = ManifestSource::new(dir.clone());
        let s = src.scan(false).unwrap();
        assert_eq!(policy_names(&s), ["p"]);
        assert!(s.errors.is_empty());

        fs::write(
            dir.join("p.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p\n",
        )
        .unwrap();
        let s = src.scan(false).unwrap();
        assert_eq!(policy_names(&s), ["p"], "the policy stays in force");
        assert!(
            s.errors.iter().any(|e| e.contains("last good")),
            "{:?}",
            s.errors
        );

        // A new broken file contributes what it can and reports the rest.
        fs::write(dir.join("q.yaml"), "kind: [").unwrap();
        let s = src.scan(false).unwrap();
        assert_eq!(policy_names(&s), ["p"]);
        assert!(
            s.errors.iter().any(|e| e.contains("q.yaml")),
            "{:?}",
            s.errors
        );

        // Fixed again: the new contents, and no error.
        fs::write(dir.join("p.yaml"), policy("p2")).unwrap();
        fs::remove_file(dir.join("q.yaml")).unwrap();
        let s = src.scan(false).unwrap();
        assert_eq!(policy_names(&s), ["p2"]);
        assert!(s.errors.is_empty(), "{:?}", s.errors);

        // Deleting the file removes its objects.
        fs::remove_file(dir.join("p.yaml")).unwrap();
        let s = src.scan(false).unwrap();
        assert!(s.policies.is_empty());

        // An unreadable directory keeps the last state, says so once.
        fs::write(dir.join("r.yaml"), policy("r")).unwrap();
        assert_eq!(policy_names(&src.scan(false).unwrap()), ["r"]);
        fs::remove_dir_all(&dir).unwrap();
        let s = src.scan(false).unwrap();
        assert_eq!(policy_names(&s), ["r"], "the last state stays");
        assert!(!s.errors.is_empty());
        assert!(src.scan(false).is_none(), "reported once");
        assert_eq!(policy_names(&src.scan(true).unwrap()), ["r"]);
    }

    #[test]
    fn each_file_is_parsed_once_and_only_when_it_changed() {
        let tmp = TempDir::new("once");
        let dir = tmp.0.clone();
        for n in ["a", "b", "c"] {
            write_settled(&dir.join(format!("{n}.yaml")), &policy(n));
        }
        let mut src = ManifestSource::new(dir.clone());
        let s = src.scan(false).unwrap();
        assert_eq!(policy_names(&s), ["a", "b", "c"]);
        assert_eq!(src.parses, 3, "one parse per file");

        assert!(src.scan(false).is_none(), "nothing changed");
        assert_eq!(src.parses, 3, "no file re-read");

        // Same size, new mtime: re-read that file only.
        write_settled(&dir.join("b.yaml"), &policy("d"));
        let s = src.scan(false).unwrap();
        assert_eq!(policy_names(&s), ["a", "c", "d"]);
        assert_eq!(src.parses, 4);

        // Replaced by rename (new inode), the old mtime kept.
        let b = dir.join("b.yaml");
        let old = fs::metadata(&b).unwrap().modified().unwrap();
        write_settled(&dir.join(".b.tmp"), &policy("e"));
        fs::File::options()
            .write(true)
            .open(dir.join(".b.tmp"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        fs::rename(dir.join(".b.tmp"), &b).unwrap();
        let s = src.scan(false).unwrap();
        assert_eq!(policy_names(&s), ["a", "c", "e"]);
        assert_eq!(src.parses, 5);

        // A file just written is re-read on the next rescan too (its mtime
        // may not move if it changes again within the same tick).
        fs::write(dir.join("a.yaml"), policy("f")).unwrap();
        assert_eq!(policy_names(&src.scan(false).unwrap()), ["c", "e", "f"]);
        assert_eq!(src.parses, 6);
        assert!(src.scan(false).is_none());
        assert_eq!(
            src.parses, 6,
            "unsettled: read again, same contents: not parsed"
        );

        // A forced rescan reads everything and parses only what changed,
        // even behind an unchanged size and modification time.
        assert!(src.scan(true).is_some());
        assert_eq!(src.parses, 6, "nothing changed");
        let c = dir.join("c.yaml");
        let before = fs::metadata(&c).unwrap();
        let text = fs::read_to_string(&c)
            .unwrap()
            .replace("name: c", "name: g");
        assert_eq!(text.len() as u64, before.len(), "same size");
        fs::write(&c, text).unwrap();
        fs::File::options()
            .write(true)
            .open(&c)
            .unwrap()
            .set_modified(before.modified().unwrap())
            .unwrap();
        assert_eq!(policy_names(&src.scan(true).unwrap()), ["e", "f", "g"]);
        assert_eq!(src.parses, 7);
    }

    const WITHIN: Duration = Duration::from_secs(5);

    async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> Snapshot {
        match tokio::time::timeout(WITHIN, rx.recv()).await {
            Ok(Some(SourceEvent::Resync(s))) => s,
            Ok(Some(SourceEvent::Changes(c))) => panic!("a manifest source sends Resyncs: {c:?}"),
            Ok(None) => panic!("the source stopped"),
            Err(_) => panic!("no event within {WITHIN:?}"),
        }
    }

    /// Waits for a view with these policies; returns how many events came.
    async fn until(rx: &mut mpsc::Receiver<SourceEvent>, want: &[&str]) -> (Snapshot, usize) {
        let mut n = 0;
        loop {
            let s = next(rx).await;
            n += 1;
            if policy_names(&s) == want {
                return (s, n);
            }
        }
    }

    async fn quiet(rx: &mut mpsc::Receiver<SourceEvent>) {
        let r = tokio::time::timeout(DEBOUNCE * 6, rx.recv()).await;
        assert!(r.is_err(), "an event when nothing changed: {r:?}");
    }

    #[tokio::test]
    async fn inotify_create_modify_rename_over_delete() {
        let tmp = TempDir::new("inotify");
        let dir = tmp.0.clone();
        fs::write(dir.join("a.yaml"), policy("a")).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let handle = ManifestSource::spawn(dir.clone(), tx).unwrap();
        assert!(handle.uses_inotify());
        let first = rx.try_recv().expect("the first view is sent by spawn");
        let SourceEvent::Resync(first) = first else {
            panic!("{first:?}")
        };
        assert_eq!(policy_names(&first), ["a"]);
        quiet(&mut rx).await;

        // Create: well before a poll would have seen it.
        let t = Instant::now();
        fs::write(dir.join("b.yaml"), policy("b")).unwrap();
        until(&mut rx, &["a", "b"]).await;
        assert!(t.elapsed() < POLL_FALLBACK / 2, "{:?}", t.elapsed());
        // Modify in place.
        fs::write(dir.join("b.yaml"), policy("c")).unwrap();
        until(&mut rx, &["a", "c"]).await;
        // Rename over, as editors and kubectl-like tools do.
        fs::write(dir.join(".b.yaml.swp"), policy("d")).unwrap();
        fs::rename(dir.join(".b.yaml.swp"), dir.join("b.yaml")).unwrap();
        until(&mut rx, &["a", "d"]).await;
        // Delete.
        fs::remove_file(dir.join("a.yaml")).unwrap();
        until(&mut rx, &["d"]).await;
        // Broken: the last good contents stay, with an error.
        fs::write(dir.join("b.yaml"), "kind: [").unwrap();
        let mut s;
        loop {
            s = next(&mut rx).await;
            if !s.errors.is_empty() {
                break;
            }
        }
        assert_eq!(policy_names(&s), ["d"]);
        assert!(
            s.errors.iter().any(|e| e.contains("last good")),
            "{:?}",
            s.errors
        );

        // `sync`: a Resync even when nothing changed, sent before rescan returns.
        while rx.try_recv().is_ok() {}
        handle.rescan().await;
        let SourceEvent::Resync(s) = rx.try_recv().expect("sent before rescan returned") else {
            panic!()
        };
        assert_eq!(policy_names(&s), ["d"]);
        assert_eq!(
            s.policies[&ObjectKey::new("x", "d")]
                .metadata
                .namespace
                .as_deref(),
            Some("x")
        );
    }

    #[tokio::test]
    async fn the_directory_removed_and_recreated_is_watched_again() {
        let tmp = TempDir::new("recreate");
        let dir = tmp.0.join("manifests");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("a.yaml"), policy("a")).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _handle = ManifestSource::spawn(dir.clone(), tx).unwrap();
        assert_eq!(policy_names(&next(&mut rx).await), ["a"]);

        // Gone: the last state stays, with an error.
        fs::remove_dir_all(&dir).unwrap();
        let s = next(&mut rx).await;
        assert_eq!(policy_names(&s), ["a"]);
        assert!(!s.errors.is_empty());

        // Recreated by a rename, as a deploy tool would: watched again.
        let staged = tmp.0.join(".staged");
        fs::create_dir(&staged).unwrap();
        fs::write(staged.join("b.yaml"), policy("b")).unwrap();
        fs::rename(&staged, &dir).unwrap();
        until(&mut rx, &["b"]).await;
        fs::write(dir.join("c.yaml"), policy("c")).unwrap();
        until(&mut rx, &["b", "c"]).await;
    }

    #[tokio::test]
    async fn a_mounted_configmap_update_is_seen() {
        // The kubelet's layout: files are symlinks through `..data`, which
        // is swapped by a rename to a new timestamped directory.
        use std::os::unix::fs::symlink;
        let tmp = TempDir::new("configmap");
        let dir = tmp.0.clone();
        fs::create_dir(dir.join("..2026_1")).unwrap();
        write_settled(&dir.join("..2026_1/p.yaml"), &policy("a"));
        symlink("..2026_1", dir.join("..data")).unwrap();
        symlink("..data/p.yaml", dir.join("p.yaml")).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _handle = ManifestSource::spawn(dir.clone(), tx).unwrap();
        assert_eq!(policy_names(&next(&mut rx).await), ["a"]);

        fs::create_dir(dir.join("..2026_2")).unwrap();
        // Same size, an old mtime: only the inode behind the link differs.
        write_settled(&dir.join("..2026_2/p.yaml"), &policy("b"));
        symlink("..2026_2", dir.join("..data_tmp")).unwrap();
        fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        fs::remove_dir_all(dir.join("..2026_1")).unwrap();
        until(&mut rx, &["b"]).await;
    }

    #[tokio::test]
    async fn without_inotify_it_polls() {
        let tmp = TempDir::new("poll");
        let dir = tmp.0.clone();
        let (tx, mut rx) = mpsc::channel(16);
        let handle = ManifestSource::spawn_with(dir.clone(), tx, false).unwrap();
        assert!(!handle.uses_inotify());
        assert!(policy_names(&next(&mut rx).await).is_empty());
        fs::write(dir.join("a.yaml"), policy("a")).unwrap();
        until(&mut rx, &["a"]).await;
        handle.rescan().await;
        assert!(matches!(rx.try_recv(), Ok(SourceEvent::Resync(_))));
    }

    #[tokio::test]
    async fn a_burst_of_writes_makes_few_events() {
        let tmp = TempDir::new("burst");
        let dir = tmp.0.clone();
        let (tx, mut rx) = mpsc::channel(64);
        let _handle = ManifestSource::spawn(dir.clone(), tx).unwrap();
        assert!(policy_names(&next(&mut rx).await).is_empty());

        // 50 files written back to back, each twice (write, then rewrite).
        let want: Vec<String> = (0..50).map(|i| format!("p{i:02}")).collect();
        for name in &want {
            let path = dir.join(format!("{name}.yaml"));
            fs::write(&path, policy("tmp")).unwrap();
            fs::write(&path, policy(name)).unwrap();
        }
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        let (_, events) = until(&mut rx, &want).await;
        assert!(events <= 3, "{events} events for one burst");
        quiet(&mut rx).await;
    }
}
