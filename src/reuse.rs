//! The steps after the layers, cached by content: the disk (keyed by the
//! top layer and the disk plan), the formats (keyed by the disk and the
//! format set) and the verification verdicts (keyed by the disk's SHA-256
//! and the virtual hardware). Cached files reach the output directory as
//! hard links (copies across file systems), so a hit costs no copying.
//! Each cached file's size and modification time are recorded: one
//! written through a link (an output booted writable, say) no longer
//! matches, and its entry is made again, never used.

use crate::cache::{Cache, Hit, Lock};
use crate::formats::{Artifact, Format, Products, Timing};
use crate::fsutil;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bump when an entry's layout changes.
const FORMAT: u32 = 1;

/// A cache key from `what` (32 hex digits).
pub fn key(kind: &str, what: &impl Serialize) -> String {
    let h = crate::formats::manifest::hash_json(&serde_json::json!({
        "reuse": FORMAT,
        "kind": kind,
        "stemforge": crate::VERSION,
        "what": what,
    }));
    h[..32].to_string()
}

/// A file's size and modification time, as recorded when it was cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
}

impl Stamp {
    pub fn of(path: &Path) -> Result<Stamp> {
        let md = path
            .symlink_metadata()
            .with_context(|| format!("stat {}", path.display()))?;
        Ok(Stamp {
            size: md.len(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
        })
    }
}

/// Put `src` at `dst` (atomically replacing it): a hard link, or a copy
/// that keeps holes when the two are on different file systems.
pub fn place(src: &Path, dst: &Path) -> Result<()> {
    let tmp = fsutil::partial_path(dst);
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(src, &tmp).is_err() {
        let from =
            std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
        let to =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let len = from.metadata()?.len();
        to.set_len(len)?;
        fsutil::copy_sparse_into(&from, &to, 0)
            .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
        to.sync_all()?;
        let mt = from.metadata()?.modified()?;
        to.set_modified(mt)?;
    }
    fsutil::commit(&tmp, dst)
}

/// Get an entry whose files must still match their stamps: a damaged one
/// is removed and made again.
fn get_checked(
    cache: &Cache,
    kind: &str,
    key: &str,
    make: &mut dyn FnMut(&Path) -> Result<()>,
    intact: &dyn Fn(&Path) -> bool,
) -> Result<(PathBuf, Hit, Lock)> {
    let (dir, hit, lock) = cache.get_or_make(kind, key, |d| make(d))?;
    if hit == Hit::Miss || intact(&dir) {
        return Ok((dir, hit, lock));
    }
    drop(lock);
    crate::progress::warn(&format!(
        "cache entry {} was changed after it was made (a file written through an output?): making it again",
        dir.display()
    ));
    crate::cachectl::discard(cache, kind, key)?;
    cache.get_or_make(kind, key, |d| make(d))
}

/// What the disk entry records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskMeta {
    pub kernel: String,
    pub sha256: String,
    pub stamp: Stamp,
}

/// The raw disk of `key`: from the cache, or made by `make` (it writes
/// the disk at the path it is given and returns the kernel version and
/// the disk's SHA-256).
/// The disk is then hard-linked at `at`.
pub fn disk(
    cache: &Cache,
    key: &str,
    at: &Path,
    make: impl FnOnce(&Path) -> Result<(String, String)>,
) -> Result<(DiskMeta, Hit, Lock)> {
    let mut make = Some(make);
    let (dir, hit, lock) = get_checked(
        cache,
        "disks",
        key,
        &mut |d| {
            let raw = d.join("disk.raw");
            let (kernel, sha256) = (make.take().context("the disk was made already")?)(&raw)?;
            crate::formats::manifest::remember_sha256(&raw, &sha256);
            let meta = DiskMeta {
                kernel,
                sha256,
                stamp: Stamp::of(&raw)?,
            };
            std::fs::write(d.join("disk.json"), serde_json::to_vec_pretty(&meta)?)
                .context("writing disk.json")
        },
        &|d| {
            read_json::<DiskMeta>(&d.join("disk.json"))
                .is_ok_and(|m| Stamp::of(&d.join("disk.raw")).is_ok_and(|s| s == m.stamp))
        },
    )?;
    let meta: DiskMeta = read_json(&dir.join("disk.json"))?;
    place(&dir.join("disk.raw"), at)?;
    Ok((meta, hit, lock))
}

fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> Result<T> {
    let b = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))
}

/// One cached output file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    format: Format,
    file: String,
    /// In the output directory (else the work directory: an
    /// intermediate another format or a verification boot reads).
    output: bool,
    size: u64,
    disk_usage: u64,
    stamp: Stamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FormatsMeta {
    files: Vec<Stored>,
    timings: Vec<Timing>,
    /// Formats with no file of their own in the entry (the raw disk when
    /// it is only an intermediate: it is the disk entry's).
    #[serde(default)]
    disk_only: Vec<Format>,
}

/// The products of the formats step for `key`: from the cache, placed
/// back where they were written, or made by `make`.
pub fn formats(
    cache: &Cache,
    key: &str,
    out_dir: &Path,
    work: &Path,
    disk: &Path,
    make: impl FnOnce() -> Result<(Products, Vec<Timing>)>,
) -> Result<(Products, Vec<Timing>, Hit, Lock)> {
    let mut make = Some(make);
    let mut made: Option<(Products, Vec<Timing>)> = None;
    let (dir, hit, lock) = get_checked(
        cache,
        "formats",
        key,
        &mut |d| {
            let (products, timings) = (make.take().context("the formats were made already")?)()?;
            let mut meta = FormatsMeta {
                files: Vec::new(),
                timings: timings.clone(),
                disk_only: Vec::new(),
            };
            for (f, artifacts) in &products {
                for a in artifacts {
                    if a.path == disk {
                        meta.disk_only.push(*f);
                        continue;
                    }
                    let file = a.file_name();
                    place(&a.path, &d.join(&file))
                        .with_context(|| format!("keeping {} in the cache", a.path.display()))?;
                    meta.files.push(Stored {
                        format: *f,
                        output: a.path.parent() == Some(out_dir),
                        size: a.size,
                        disk_usage: a.disk_usage,
                        stamp: Stamp::of(&d.join(&file))?,
                        file,
                    });
                }
            }
            std::fs::write(d.join("formats.json"), serde_json::to_vec_pretty(&meta)?)
                .context("writing formats.json")?;
            made = Some((products, timings));
            Ok(())
        },
        &|d| {
            read_json::<FormatsMeta>(&d.join("formats.json")).is_ok_and(|m| {
                m.files
                    .iter()
                    .all(|s| Stamp::of(&d.join(&s.file)).is_ok_and(|t| t == s.stamp))
            })
        },
    )?;
    if let Some((p, t)) = made {
        return Ok((p, t, hit, lock));
    }
    let meta: FormatsMeta = read_json(&dir.join("formats.json"))?;
    let mut products = Products::new();
    for s in &meta.files {
        let at = if s.output { out_dir } else { work }.join(&s.file);
        place(&dir.join(&s.file), &at)?;
        products.entry(s.format).or_default().push(Artifact {
            format: s.format,
            path: at,
            disk_usage: s.disk_usage,
            size: s.size,
        });
    }
    for f in &meta.disk_only {
        products
            .entry(*f)
            .or_default()
            .push(Artifact::of(*f, disk)?);
    }
    Ok((products, meta.timings, hit, lock))
}

/// A verification boot's reports, as the verdict entry keeps them.
pub const REPORTS: [&str; 3] = ["console.log", "scan.json", "verify.json"];

/// The verdict of `key` when one is cached: its reports are written to
/// `out_dir` as `NAME.*`, marked reused.
pub fn cached_verdict(
    cache: &Cache,
    key: &str,
    disk_sha256: &str,
    out_dir: &Path,
    name: &str,
) -> Result<Option<crate::verify::Verdict>> {
    let dir = cache.kind_dir("verdicts").join(key);
    if std::fs::read_to_string(dir.join(".complete"))
        .ok()
        .as_deref()
        != Some(key)
    {
        return Ok(None);
    }
    let _held = Lock::shared(&cache.kind_dir("verdicts").join(format!(".{key}.lock")))?;
    let Ok(mut v) = read_json::<crate::verify::Verdict>(&dir.join("verify.json")) else {
        return Ok(None);
    };
    let verified_at = dir
        .join("verify.json")
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64);
    v.reused = Some(crate::verify::Reused {
        key: key.to_string(),
        disk_sha256: disk_sha256.to_string(),
        verified_at,
    });
    v.console_log = out_dir.join(format!("{name}.console.log"));
    for r in ["console.log", "scan.json"] {
        let src = dir.join(r);
        if src.is_file() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            fsutil::write_atomic(&out_dir.join(format!("{name}.{r}")), &bytes)?;
        }
    }
    fsutil::write_atomic(
        &out_dir.join(format!("{name}.verify.json")),
        (serde_json::to_string_pretty(&v)? + "\n").as_bytes(),
    )?;
    crate::cache::touch(&dir.join(".complete"));
    Ok(Some(v))
}

/// Keep a passing verdict's reports (`out_dir/NAME.*`) under `key`.
pub fn keep_verdict(cache: &Cache, key: &str, out_dir: &Path, name: &str) -> Result<()> {
    let (_, _, _lock) = cache.get_or_make("verdicts", key, |d| {
        for r in REPORTS {
            let src = out_dir.join(format!("{name}.{r}"));
            if src.is_file() {
                std::fs::copy(&src, d.join(r))
                    .with_context(|| format!("keeping {} in the cache", src.display()))?;
            }
        }
        let v: serde_json::Value = read_json(&d.join("verify.json"))?;
        let summary = serde_json::json!({"name": name, "passed": v["passed"]});
        std::fs::write(d.join("verdict.json"), summary.to_string()).context("writing verdict.json")
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn products_of(dir: &Path, name: &str, body: &str) -> Products {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        let mut m = Products::new();
        m.insert(
            Format::Qcow2,
            vec![Artifact::of(Format::Qcow2, &p).unwrap()],
        );
        m
    }

    #[test]
    fn formats_are_made_once_then_placed_back_from_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(&d.path().join("cache"));
        let (out, work) = (d.path().join("out"), d.path().join("work"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        let disk = work.join("x.raw");
        std::fs::write(&disk, "disk").unwrap();
        let (p, _, hit, lock) = formats(&cache, "k", &out, &work, &disk, || {
            Ok((products_of(&out, "x.qcow2", "one"), vec![]))
        })
        .unwrap();
        drop(lock);
        assert_eq!(hit, Hit::Miss);
        assert_eq!(p[&Format::Qcow2][0].path, out.join("x.qcow2"));
        // The output is gone; the cache puts it back, unmade.
        std::fs::remove_file(out.join("x.qcow2")).unwrap();
        let (p, _, hit, lock) = formats(&cache, "k", &out, &work, &disk, || {
            panic!("must not remake")
        })
        .unwrap();
        drop(lock);
        assert_eq!(hit, Hit::Hit);
        assert_eq!(
            std::fs::read_to_string(&p[&Format::Qcow2][0].path).unwrap(),
            "one"
        );
    }

    #[test]
    fn a_cached_output_written_through_its_link_is_made_again() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(&d.path().join("cache"));
        let (out, work) = (d.path().join("out"), d.path().join("work"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        let disk = work.join("x.raw");
        std::fs::write(&disk, "disk").unwrap();
        let (_, _, _, lock) = formats(&cache, "k", &out, &work, &disk, || {
            Ok((products_of(&out, "x.qcow2", "one"), vec![]))
        })
        .unwrap();
        drop(lock);
        // Booted writable, say: the same inode, new bytes.
        std::fs::write(out.join("x.qcow2"), "changed by a boot").unwrap();
        let mut made = false;
        let (p, _, _, _lock) = formats(&cache, "k", &out, &work, &disk, || {
            made = true;
            Ok((products_of(&out, "x.qcow2", "two"), vec![]))
        })
        .unwrap();
        assert!(made, "the damaged entry was not used");
        assert_eq!(
            std::fs::read_to_string(&p[&Format::Qcow2][0].path).unwrap(),
            "two"
        );
    }

    #[test]
    fn a_disk_is_placed_from_the_cache_with_its_hash() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(&d.path().join("cache"));
        let at = d.path().join("x.raw");
        let (m, hit, lock) = disk(&cache, "k", &at, |raw| {
            std::fs::write(raw, "bytes")?;
            Ok(("6.1".into(), "ab".repeat(32)))
        })
        .unwrap();
        drop(lock);
        assert_eq!((hit, m.kernel.as_str()), (Hit::Miss, "6.1"));
        std::fs::remove_file(&at).unwrap();
        let (m, hit, _lock) = disk(&cache, "k", &at, |_| panic!("must not remake")).unwrap();
        assert_eq!(hit, Hit::Hit);
        assert_eq!(m.sha256, "ab".repeat(32));
        assert_eq!(std::fs::read_to_string(&at).unwrap(), "bytes");
    }
}
