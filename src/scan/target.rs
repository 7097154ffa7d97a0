//! What a scan reads: a file system view (a root tree resolved inside its
//! root, or the live host; see [`super::view`]) and, live, commands.

use super::view::{FsView, LiveView, Meta, TreeView};
use crate::exec;
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Symlink hops allowed while resolving one path (as the kernel's 40).
pub(super) const MAX_HOPS: usize = 40;

/// The largest file a check reads whole; a bigger one is an error, not a
/// partial read.
pub const MAX_READ: u64 = 16 << 20;

/// What a scan reads: a file system view and, live, commands. A scan
/// reads each file and runs each command once: the target keeps what it
/// read (up to [`CACHE_BYTES`]) and the facts checks parse from it.
#[derive(Debug, Clone)]
pub struct Target {
    view: Arc<dyn FsView>,
    root: PathBuf,
    live: bool,
    /// `root`, `image` or `live`, for reports.
    kind: &'static str,
    /// Set for the length of one scan ([`Target::scanning`]).
    cache: Option<Arc<Cache>>,
}

/// The most file text a target keeps for reuse; past it, files are read
/// again when asked again.
pub const CACHE_BYTES: u64 = 64 << 20;

type Shared = Arc<dyn std::any::Any + Send + Sync>;
/// A file's text, or the kind and message of the error reading it.
type Read = Result<Arc<str>, (io::ErrorKind, String)>;

#[derive(Debug, Default)]
struct Cache {
    files: Mutex<HashMap<String, Read>>,
    commands: Mutex<HashMap<String, Result<exec::Output, String>>>,
    facts: Mutex<HashMap<String, Shared>>,
    bytes: AtomicU64,
    /// How many reads and commands the cache answered (for tests).
    hits: AtomicU64,
}

impl Target {
    /// An offline root tree.
    pub fn root(dir: &Path) -> Result<Target> {
        let md = std::fs::metadata(dir).with_context(|| format!("scan root {}", dir.display()))?;
        if !md.is_dir() {
            bail!("scan root {} is not a directory", dir.display());
        }
        let root = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let view = TreeView::open(&root).with_context(|| format!("opening {}", root.display()))?;
        Ok(Target {
            view: Arc::new(view),
            root,
            live: false,
            kind: "root",
            cache: None,
        })
    }

    /// A disk image file, read in userspace through its partitions and
    /// its own fstab (see [`super::image`]); also what it holds.
    pub fn image(file: &Path) -> Result<(Target, super::image::Layout)> {
        let view = super::image::ImageView::open(file)?;
        let layout = view.layout.clone();
        Ok((
            Target {
                view: Arc::new(view),
                root: file.to_path_buf(),
                live: false,
                kind: "image",
                cache: None,
            },
            layout,
        ))
    }

    /// The running system this process is on.
    pub fn live() -> Target {
        Target {
            view: Arc::new(LiveView),
            root: PathBuf::from("/"),
            live: true,
            kind: "live",
            cache: None,
        }
    }

    pub fn is_live(&self) -> bool {
        self.live
    }

    /// `root`, `image` or `live`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The same target for one scan: what it reads and runs is kept and
    /// reused until the scan ends (the target must not change meanwhile).
    pub fn scanning(&self) -> Target {
        Target {
            cache: Some(Arc::default()),
            ..self.clone()
        }
    }

    /// Where the tree is on the host (for reports and for the build's
    /// writers; checks read through the view).
    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// A human description: `root tree /x` or `live host`.
    pub fn describe(&self) -> String {
        self.view.describe()
    }

    /// The host path of the in-target absolute `path`, with every symlink
    /// (the last one too, when `follow_last`) resolved inside the root;
    /// components that do not exist yet are kept. For the build, which
    /// writes into the tree; a check reads through the view instead.
    pub fn resolve_with(&self, path: &str, follow_last: bool) -> io::Result<PathBuf> {
        if self.live {
            return Ok(PathBuf::from(path));
        }
        let mut done: Vec<String> = Vec::new();
        let mut todo: Vec<String> = split(path).into_iter().rev().collect();
        let mut hops = 0;
        while let Some(comp) = todo.pop() {
            match comp.as_str() {
                "." | "" => continue,
                ".." => {
                    done.pop();
                    continue;
                }
                _ => {}
            }
            let candidate = self.host_path(&done).join(&comp);
            let is_last = todo.is_empty();
            match std::fs::symlink_metadata(&candidate) {
                Ok(md) if md.file_type().is_symlink() && (!is_last || follow_last) => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(io::Error::other(format!(
                            "too many levels of symbolic links resolving {path}"
                        )));
                    }
                    let link = std::fs::read_link(&candidate)?;
                    let link = link.to_string_lossy().into_owned();
                    if link.starts_with('/') {
                        done.clear();
                    }
                    for c in split(&link).into_iter().rev() {
                        todo.push(c);
                    }
                }
                _ => done.push(comp),
            }
        }
        Ok(self.host_path(&done))
    }

    fn host_path(&self, comps: &[String]) -> PathBuf {
        let mut p = self.root.clone();
        for c in comps {
            p.push(c);
        }
        p
    }

    /// Host path of `path`, following every symlink.
    pub fn resolve(&self, path: &str) -> io::Result<PathBuf> {
        self.resolve_with(path, true)
    }

    /// The text of the regular file at `path` (invalid UTF-8 replaced); an
    /// error for anything else, and for a file over [`MAX_READ`]. Read once
    /// per scan.
    pub fn read_to_string(&self, path: &str) -> io::Result<String> {
        let Some(cache) = &self.cache else {
            return self.read_uncached(path);
        };
        if let Some(r) = cache.files.lock().expect("cache lock").get(path) {
            cache.hits.fetch_add(1, Ordering::Relaxed);
            return r
                .as_ref()
                .map(|t| t.to_string())
                .map_err(|(kind, msg)| io::Error::new(*kind, msg.clone()));
        }
        let r = self.read_uncached(path);
        let size = r.as_ref().map_or(0, |t| t.len() as u64);
        if cache.bytes.fetch_add(size, Ordering::Relaxed) + size <= CACHE_BYTES {
            let kept = match &r {
                Ok(t) => Ok(Arc::from(t.as_str())),
                Err(e) => Err((e.kind(), e.to_string())),
            };
            cache
                .files
                .lock()
                .expect("cache lock")
                .insert(path.to_string(), kept);
        }
        r
    }

    fn read_uncached(&self, path: &str) -> io::Result<String> {
        let (bytes, more) = self.view.read(path, MAX_READ)?;
        if more {
            return Err(io::Error::other(format!(
                "{path} is larger than {} MiB: not read",
                MAX_READ >> 20
            )));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A fact derived from what the target holds (a parsed configuration,
    /// say), made by `make` once per scan and shared after.
    pub fn fact<T: Send + Sync + 'static>(&self, key: &str, make: impl FnOnce() -> T) -> Arc<T> {
        let Some(cache) = &self.cache else {
            return Arc::new(make());
        };
        if let Some(f) = cache.facts.lock().expect("cache lock").get(key) {
            if let Ok(t) = Arc::clone(f).downcast::<T>() {
                cache.hits.fetch_add(1, Ordering::Relaxed);
                return t;
            }
        }
        // Made without the lock held: `make` may ask for other facts.
        let made = Arc::new(make());
        cache
            .facts
            .lock()
            .expect("cache lock")
            .insert(key.to_string(), made.clone() as Shared);
        made
    }

    /// How many reads, commands and facts the scan's cache answered.
    pub fn cache_hits(&self) -> u64 {
        self.cache
            .as_ref()
            .map_or(0, |c| c.hits.load(Ordering::Relaxed))
    }

    /// At most `max` bytes of the regular file at `path`, and whether it
    /// holds more.
    pub fn read_head(&self, path: &str, max: u64) -> io::Result<(Vec<u8>, bool)> {
        self.view.read(path, max)
    }

    /// The text of `path`, or `None` when it does not exist.
    pub fn read_optional(&self, path: &str) -> io::Result<Option<String>> {
        match self.read_to_string(path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn metadata(&self, path: &str) -> io::Result<Meta> {
        self.view.metadata(path)
    }

    pub fn symlink_metadata(&self, path: &str) -> io::Result<Meta> {
        self.view.symlink_metadata(path)
    }

    pub fn exists(&self, path: &str) -> bool {
        self.metadata(path).is_ok()
    }

    /// The raw target of a symlink.
    pub fn read_link(&self, path: &str) -> io::Result<String> {
        self.view.read_link(path)
    }

    /// `path` with every symlink resolved inside the target.
    pub fn canonical(&self, path: &str) -> io::Result<String> {
        self.view.canonical(path)
    }

    /// Entries of a directory with their inodes (symlinks not followed),
    /// sorted; an error when it cannot be read whole.
    pub fn read_dir(&self, path: &str) -> io::Result<Vec<(String, Meta)>> {
        self.view.read_dir(path)
    }

    /// Entry names of a directory, sorted; empty when it does not exist.
    /// A name that is not UTF-8 is an error: it shows only lossily and
    /// cannot be asked for again, so a check that read the rest would
    /// judge without it (an sshd drop-in, a sysctl.d file) and might pass.
    pub fn list_dir(&self, path: &str) -> io::Result<Vec<String>> {
        let entries = match self.view.read_dir(path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::with_capacity(entries.len());
        for (name, _) in entries {
            if name.contains(char::REPLACEMENT_CHARACTER) {
                let full = format!("{}/{name}", path.trim_end_matches('/'));
                if let Err(e) = self.symlink_metadata(&full) {
                    if e.kind() == io::ErrorKind::NotFound {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{full}: a name that is not UTF-8; it cannot be read"),
                        ));
                    }
                }
            }
            names.push(name);
        }
        Ok(names)
    }

    /// In-target paths matching `pattern` (`*` and `?` in any component),
    /// sorted. A pattern without wildcards matches itself if it exists.
    pub fn glob(&self, pattern: &str) -> io::Result<Vec<String>> {
        let mut found = vec![String::new()];
        for comp in split(pattern) {
            let mut next = Vec::new();
            for base in &found {
                if comp.contains(['*', '?', '[']) {
                    let dir = if base.is_empty() { "/" } else { base.as_str() };
                    for name in self.list_dir(dir)? {
                        if (comp.starts_with('.') || !name.starts_with('.'))
                            && wildcard_match(&comp, &name)
                        {
                            next.push(format!("{base}/{name}"));
                        }
                    }
                } else {
                    next.push(format!("{base}/{comp}"));
                }
            }
            found = next;
        }
        let mut out: Vec<String> = found
            .into_iter()
            .map(|p| if p.is_empty() { "/".to_string() } else { p })
            .filter(|p| self.symlink_metadata(p).is_ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// The `*{suffix}` files of systemd-style configuration directories
    /// (highest priority first): a name in an earlier directory hides the
    /// same name in later ones; the result is in name order, the order the
    /// files apply in. A directory that is a symlink to another lists once.
    pub fn config_files(&self, dirs: &[&str], suffix: &str) -> io::Result<Vec<String>> {
        let mut by_name = std::collections::BTreeMap::new();
        for dir in dirs {
            for name in self.list_dir(dir)? {
                if name.ends_with(suffix) {
                    by_name
                        .entry(name.clone())
                        .or_insert_with(|| format!("{dir}/{name}"));
                }
            }
        }
        Ok(by_name.into_values().collect())
    }

    /// Where `program` is on the live host's PATH; `None` offline.
    pub fn find_program(&self, program: &str) -> Option<PathBuf> {
        if self.live {
            exec::which(program)
        } else {
            None
        }
    }

    /// Run a command on the live host (once per scan for the same
    /// arguments); `None` for offline targets.
    pub fn command(&self, program: &str, args: &[&str]) -> Option<Result<exec::Output>> {
        if !self.live {
            return None;
        }
        let key = std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join("\0");
        let run = || {
            exec::cmd(program, args)
                .timeout(std::time::Duration::from_secs(30))
                .run_unchecked()
        };
        let Some(cache) = &self.cache else {
            return Some(run());
        };
        if let Some(r) = cache.commands.lock().expect("cache lock").get(&key) {
            cache.hits.fetch_add(1, Ordering::Relaxed);
            return Some(r.clone().map_err(anyhow::Error::msg));
        }
        let r = run();
        let kept = match &r {
            Ok(o) => Ok(o.clone()),
            Err(e) => Err(format!("{e:#}")),
        };
        cache.commands.lock().expect("cache lock").insert(key, kept);
        Some(r)
    }

    /// The standard output of a command that must succeed on a live
    /// target (`sshd -T`, `auditctl -l`); otherwise why not, with the
    /// command line and its stderr.
    pub fn stdout(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let line = std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        match self.command(program, args) {
            Some(Ok(o)) if o.status.success() => Ok(o.stdout_str()),
            Some(Ok(o)) => Err(format!(
                "{line}: exit {:?}: {}",
                o.status.code(),
                o.stderr_str().trim()
            )),
            Some(Err(e)) => Err(format!("{line}: {e:#}")),
            None => Err(format!("{line}: runs on live targets only")),
        }
    }
}

pub(super) fn split(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// Shell-style matching (`*`, `?`, `[...]`) of one path component or
/// name; a pattern that does not parse matches only itself.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    match glob::Pattern::new(pattern) {
        Ok(p) => p.matches(name),
        Err(_) => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, Target) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("usr/lib/x")).unwrap();
        std::fs::create_dir_all(r.join("etc/ssh/sshd_config.d")).unwrap();
        std::fs::write(r.join("usr/lib/x/f"), "inside").unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        // An absolute link and a ../ escape must both stay inside the root.
        symlink("/etc/passwd", r.join("etc/abs")).unwrap();
        symlink("../../../../../../etc/hostname", r.join("etc/escape")).unwrap();
        std::fs::write(r.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(r.join("etc/ssh/sshd_config.d/a.conf"), "").unwrap();
        std::fs::write(r.join("etc/ssh/sshd_config.d/b.conf"), "").unwrap();
        std::fs::write(r.join("etc/ssh/sshd_config.d/.hidden.conf"), "").unwrap();
        let t = Target::root(r).unwrap();
        (d, t)
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let (_d, t) = tree();
        assert_eq!(t.read_to_string("/lib/x/f").unwrap(), "inside");
        assert_eq!(
            t.read_to_string("/etc/abs").unwrap(),
            "root:x:0:0::/root:/bin/sh\n"
        );
        // The escape resolves to <root>/etc/hostname, which does not exist,
        // even though the host's /etc/hostname does.
        assert!(t.read_to_string("/etc/escape").is_err());
        assert!(t.resolve("/etc/escape").unwrap().starts_with(t.root_dir()));
        assert!(t.symlink_metadata("/lib").unwrap().is_symlink());
    }

    #[test]
    fn symlink_loops_are_errors() {
        let (d, t) = tree();
        symlink("loop2", d.path().join("etc/loop1")).unwrap();
        symlink("loop1", d.path().join("etc/loop2")).unwrap();
        assert!(t.read_to_string("/etc/loop1").is_err());
    }

    #[test]
    fn glob_skips_hidden_and_sorts() {
        let (_d, t) = tree();
        assert_eq!(
            t.glob("/etc/ssh/sshd_config.d/*.conf").unwrap(),
            vec![
                "/etc/ssh/sshd_config.d/a.conf",
                "/etc/ssh/sshd_config.d/b.conf"
            ]
        );
        assert_eq!(t.glob("/etc/passwd").unwrap(), vec!["/etc/passwd"]);
        assert!(t.glob("/etc/nothing*").unwrap().is_empty());
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("ssh_host_*_key", "ssh_host_rsa_key"));
        assert!(!wildcard_match("ssh_host_*_key", "ssh_host_rsa_key.pub"));
        assert!(wildcard_match("*.conf", "a.conf"));
        assert!(wildcard_match("a?c", "abc"));
        assert!(!wildcard_match("a?c", "ac"));
        assert!(wildcard_match("vport[0-9]p1", "vport3p1"));
        assert!(wildcard_match("[", "["));
    }

    #[test]
    fn a_scan_reads_each_file_once() {
        let (d, t) = tree();
        let t = t.scanning();
        assert_eq!(
            t.read_to_string("/etc/passwd").unwrap(),
            "root:x:0:0::/root:/bin/sh\n"
        );
        std::fs::write(d.path().join("etc/passwd"), "changed").unwrap();
        // The same scan sees what it read first; a new target reads again.
        assert_eq!(
            t.read_to_string("/etc/passwd").unwrap(),
            "root:x:0:0::/root:/bin/sh\n"
        );
        assert_eq!(t.cache_hits(), 1);
        let fresh = Target::root(d.path()).unwrap();
        assert_eq!(fresh.read_to_string("/etc/passwd").unwrap(), "changed");
        // Errors are kept too, with their kind.
        let e = t.read_to_string("/etc/none").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            t.read_to_string("/etc/none").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let made = std::sync::atomic::AtomicUsize::new(0);
        let a = t.fact("answer", || {
            made.fetch_add(1, Ordering::Relaxed);
            42u32
        });
        let b = t.fact("answer", || 0u32);
        assert_eq!((*a, *b, made.load(Ordering::Relaxed)), (42, 42, 1));
    }

    #[test]
    fn offline_targets_run_no_commands() {
        let (_d, t) = tree();
        assert!(t.command("true", &[]).is_none());
    }
}
