//! A content-addressed cache of bootstrapped trees. An entry is made under
//! a temporary name and renamed when complete, under an exclusive lock, so
//! concurrent builds wait for one another and a killed build leaves no
//! half-made entry behind. Its completion marker names its key: an entry
//! without one, or with another's, is made again, never used. A build
//! holds a shared lock on the entry it uses, so pruning (by another build)
//! skips it.

use crate::fsutil;
use anyhow::{Context, Result};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Entries of one kind kept after a new one is made (layers: the chains
/// of this many images).
fn keep_of(kind: &str) -> usize {
    match kind {
        "bootstrap" => 3,
        "layers" => 4,
        "disks" => 3,
        // A format set holds every output of an image (GiBs with the
        // stemcells).
        "formats" => 2,
        "verdicts" => 64,
        _ => 4,
    }
}

/// The kinds of entries, bottom up.
pub const KINDS: [&str; 5] = ["bootstrap", "layers", "disks", "formats", "verdicts"];

/// The default cache: `$STEMFORGE_CACHE_DIR`, else /var/cache/stemforge.
pub fn default_dir() -> PathBuf {
    std::env::var_os("STEMFORGE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/stemforge"))
}

/// An exclusive advisory lock, released when dropped (or when the process
/// dies).
pub struct Lock {
    file: File,
}

impl Lock {
    fn open(path: &Path) -> Result<File> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))
    }

    fn flock(file: &File, op: i32) -> std::io::Result<()> {
        // SAFETY: flock on a descriptor we own.
        match unsafe { libc::flock(file.as_raw_fd(), op) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    /// Wait for the exclusive lock.
    pub fn acquire(path: &Path) -> Result<Lock> {
        let file = Lock::open(path)?;
        Lock::flock(&file, libc::LOCK_EX).with_context(|| format!("locking {}", path.display()))?;
        Ok(Lock { file })
    }

    /// Wait for a shared lock (others may hold it shared too).
    pub fn shared(path: &Path) -> Result<Lock> {
        let file = Lock::open(path)?;
        Lock::flock(&file, libc::LOCK_SH).with_context(|| format!("locking {}", path.display()))?;
        Ok(Lock { file })
    }

    /// The exclusive lock if nobody holds the lock now; `None` otherwise.
    pub fn try_acquire(path: &Path) -> Result<Option<Lock>> {
        let file = Lock::open(path)?;
        match Lock::flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(Lock { file })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }

    /// Turn an exclusive lock into a shared one (others may share it).
    pub fn share(self) -> Result<Lock> {
        Lock::flock(&self.file, libc::LOCK_SH).context("sharing a lock")?;
        Ok(self)
    }

    /// Write a note into the lock file (who holds it).
    pub fn note(&self, text: &str) -> Result<()> {
        use std::io::{Seek, Write};
        let mut f = &self.file;
        f.set_len(0)?;
        f.seek(std::io::SeekFrom::Start(0))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    /// Every kind but bootstrap goes here instead (a build that must not
    /// reuse or leave layers: the second build of a reproducibility check).
    private: Option<PathBuf>,
}

/// Whether `get_or_make` found the entry or made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    Hit,
    Miss,
}

impl Cache {
    pub fn new(dir: &Path) -> Cache {
        Cache {
            dir: dir.to_path_buf(),
            private: None,
        }
    }

    /// The same bootstrap entries, every other kind in `dir`.
    pub fn with_private_layers(mut self, dir: &Path) -> Cache {
        self.private = Some(dir.to_path_buf());
        self
    }

    /// Where entries of `kind` live.
    pub fn kind_dir(&self, kind: &str) -> PathBuf {
        match &self.private {
            Some(p) if kind != "bootstrap" => p.join(kind),
            _ => self.dir.join(kind),
        }
    }

    /// Where file hashes are remembered (see
    /// [`crate::formats::manifest::remember_hashes_in`]).
    pub fn hash_memo_dir(&self) -> PathBuf {
        self.dir.join("hashes")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of entry `key` of `kind`, making it with `make` (which
    /// fills the directory it is given) when absent, and a shared lock on
    /// it: hold it while the entry is in use.
    pub fn get_or_make(
        &self,
        kind: &str,
        key: &str,
        make: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<(PathBuf, Hit, Lock)> {
        let base = self.kind_dir(kind);
        let entry = base.join(key);
        let lock_path = base.join(format!(".{key}.lock"));
        let marker = entry.join(".complete");
        let complete = || std::fs::read_to_string(&marker).is_ok_and(|k| k == key);
        // Builds that find the entry share it; one that must make it waits
        // for them, makes it alone, then shares it.
        let shared = Lock::shared(&lock_path)?;
        if complete() {
            touch(&marker);
            return Ok((entry, Hit::Hit, shared));
        }
        drop(shared);
        let lock = Lock::acquire(&lock_path)?;
        if complete() {
            touch(&marker);
            return Ok((entry, Hit::Hit, lock.share()?));
        }
        if entry.exists() {
            crate::progress::warn(&format!(
                "cache entry {} is incomplete or damaged (no completion marker for its key): making it again",
                entry.display()
            ));
        }
        // Leftovers of a killed run: an incomplete entry or a temporary.
        fsutil::remove_tree(&entry)?;
        let tmp = base.join(format!(".tmp-{key}"));
        fsutil::remove_tree(&tmp)?;
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        make(&tmp)?;
        fsutil::sync_fs(&tmp)?;
        std::fs::write(tmp.join(".complete"), key.as_bytes())
            .with_context(|| format!("marking {} complete", tmp.display()))?;
        std::fs::rename(&tmp, &entry)
            .with_context(|| format!("renaming {} to {}", tmp.display(), entry.display()))?;
        self.prune(kind, key)?;
        Ok((entry, Hit::Miss, lock.share()?))
    }

    /// Keep the newest entries of a kind; never the one just used.
    fn prune(&self, kind: &str, keep_key: &str) -> Result<()> {
        if kind == "layers" {
            return crate::cachectl::prune_layers(self, keep_of(kind), None, Some(keep_key))
                .map(|_| ());
        }
        let base = self.kind_dir(kind);
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&base)
            .with_context(|| format!("reading {}", base.display()))?
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| {
                let m = e
                    .path()
                    .join(".complete")
                    .metadata()
                    .ok()?
                    .modified()
                    .ok()?;
                Some((m, e.path()))
            })
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (_, p) in entries.into_iter().skip(keep_of(kind)) {
            let Some(name) = p.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if name == keep_key {
                continue;
            }
            // An entry another build uses holds its lock shared: skip it.
            if let Some(_gone) = Lock::try_acquire(&base.join(format!(".{name}.lock")))? {
                fsutil::remove_tree(&p)?;
            }
        }
        Ok(())
    }
}

pub(crate) fn touch(p: &Path) {
    let _ = File::options()
        .write(true)
        .open(p)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_once_then_hits() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path());
        let (p, hit, _lock) = c
            .get_or_make("t", "k1", |dir| {
                std::fs::write(dir.join("x"), "1")?;
                Ok(())
            })
            .unwrap();
        assert_eq!(hit, Hit::Miss);
        assert_eq!(std::fs::read_to_string(p.join("x")).unwrap(), "1");
        let (_, hit, _) = c
            .get_or_make("t", "k1", |_| panic!("must not remake"))
            .unwrap();
        assert_eq!(hit, Hit::Hit);
    }

    #[test]
    fn an_entry_without_its_marker_is_made_again() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path());
        let (p, _, lock) = c
            .get_or_make("t", "k", |dir| Ok(std::fs::write(dir.join("x"), "1")?))
            .unwrap();
        drop(lock);
        // A marker of another key (a copied or damaged entry), then none.
        for marker in [Some("other"), None] {
            match marker {
                Some(m) => std::fs::write(p.join(".complete"), m).unwrap(),
                None => std::fs::remove_file(p.join(".complete")).unwrap(),
            }
            std::fs::write(p.join("x"), "half").unwrap();
            let (p2, hit, _) = c
                .get_or_make("t", "k", |dir| Ok(std::fs::write(dir.join("x"), "1")?))
                .unwrap();
            assert_eq!(hit, Hit::Miss);
            assert_eq!(std::fs::read_to_string(p2.join("x")).unwrap(), "1");
        }
    }

    #[test]
    fn pruning_skips_an_entry_in_use() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path());
        let (_, _, in_use) = c.get_or_make("t", "old", |_| Ok(())).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        for i in 0..keep_of("t") + 1 {
            c.get_or_make("t", &format!("k{i}"), |_| Ok(())).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(d.path().join("t/old").exists(), "in use: kept");
        assert!(
            !d.path().join("t/k0").exists(),
            "not in use, oldest: pruned"
        );
        drop(in_use);
        c.get_or_make("t", "k9", |_| Ok(())).unwrap();
        assert!(!d.path().join("t/old").exists());
    }

    #[test]
    fn a_held_lock_is_not_taken_twice() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        let held = Lock::try_acquire(&p).unwrap().unwrap();
        assert!(Lock::try_acquire(&p).unwrap().is_none());
        drop(held);
        assert!(Lock::try_acquire(&p).unwrap().is_some());
    }

    #[test]
    fn a_failed_make_leaves_no_entry() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path());
        let r = c.get_or_make("t", "k", |dir| {
            std::fs::write(dir.join("half"), "x")?;
            anyhow::bail!("boom")
        });
        assert!(r.is_err());
        assert!(!d.path().join("t/k").exists());
        let (_, hit, _) = c.get_or_make("t", "k", |_| Ok(())).unwrap();
        assert_eq!(hit, Hit::Miss);
    }

    #[test]
    fn prunes_old_entries() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path());
        for i in 0..5 {
            c.get_or_make("t", &format!("k{i}"), |_| Ok(())).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let n = std::fs::read_dir(d.path().join("t"))
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count();
        assert_eq!(n, keep_of("t"));
        assert!(d.path().join("t/k4").exists());
    }
}
