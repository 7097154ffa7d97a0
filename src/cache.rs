//! A content-addressed cache of bootstrapped trees. An entry is made under
//! a temporary name and renamed when complete, under an exclusive lock, so
//! concurrent builds wait for one another and a killed build leaves no
//! half-made entry behind.

use crate::fsutil;
use anyhow::{Context, Result};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Entries of one kind kept after a new one is made.
const KEEP: usize = 3;

/// The default cache: `$STEMFORGE_CACHE_DIR`, else /var/cache/stemforge.
pub fn default_dir() -> PathBuf {
    std::env::var_os("STEMFORGE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/stemforge"))
}

/// An exclusive advisory lock, released when dropped (or when the process
/// dies).
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn acquire(path: &Path) -> Result<Lock> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let file =
            File::create(path).with_context(|| format!("creating lock {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(Lock { _file: file })
    }
}

#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
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
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of entry `key` of `kind`, making it with `make` (which
    /// fills the directory it is given) when absent.
    pub fn get_or_make(
        &self,
        kind: &str,
        key: &str,
        make: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<(PathBuf, Hit)> {
        let base = self.dir.join(kind);
        let entry = base.join(key);
        let _lock = Lock::acquire(&base.join(format!(".{key}.lock")))?;
        if entry.join(".complete").exists() {
            touch(&entry.join(".complete"));
            return Ok((entry, Hit::Hit));
        }
        // Leftovers of a killed run: an incomplete entry or a temporary.
        fsutil::remove_tree(&entry)?;
        let tmp = base.join(format!(".tmp-{key}"));
        fsutil::remove_tree(&tmp)?;
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        make(&tmp)?;
        std::fs::write(tmp.join(".complete"), b"")
            .with_context(|| format!("marking {} complete", tmp.display()))?;
        std::fs::rename(&tmp, &entry)
            .with_context(|| format!("renaming {} to {}", tmp.display(), entry.display()))?;
        self.prune(kind, key)?;
        Ok((entry, Hit::Miss))
    }

    /// Keep the newest entries of a kind; never the one just used.
    fn prune(&self, kind: &str, keep_key: &str) -> Result<()> {
        let base = self.dir.join(kind);
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
        for (_, p) in entries.into_iter().skip(KEEP) {
            if p.file_name().map(|n| n != keep_key).unwrap_or(true) {
                fsutil::remove_tree(&p)?;
            }
        }
        Ok(())
    }
}

fn touch(p: &Path) {
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
        let (p, hit) = c
            .get_or_make("t", "k1", |dir| {
                std::fs::write(dir.join("x"), "1")?;
                Ok(())
            })
            .unwrap();
        assert_eq!(hit, Hit::Miss);
        assert_eq!(std::fs::read_to_string(p.join("x")).unwrap(), "1");
        let (_, hit) = c
            .get_or_make("t", "k1", |_| panic!("must not remake"))
            .unwrap();
        assert_eq!(hit, Hit::Hit);
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
        let (_, hit) = c.get_or_make("t", "k", |_| Ok(())).unwrap();
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
        assert_eq!(n, KEEP);
        assert!(d.path().join("t/k4").exists());
    }
}
