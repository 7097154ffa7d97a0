//! `stemforge cache ls|du|prune|export|import`: the cache as users and CI
//! systems manage it. Entries are directories under `KIND/KEY` with a
//! `.complete` marker whose modification time is the entry's last use.
//!
//! Export writes each entry as one tar archive (owners, modes, times,
//! extended attributes, device nodes and overlay whiteouts kept) beside an
//! index of their SHA-256: a plain directory a CI system can save and
//! restore as any user. Import checks every archive against the index
//! before it becomes an entry, so a damaged or tampered archive is
//! skipped, never used.

use crate::cache::{Cache, KINDS, Lock};
use crate::config::format_size;
use crate::fsutil;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// One cache entry.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub kind: String,
    pub key: String,
    #[serde(skip)]
    pub path: PathBuf,
    /// Seconds since the epoch of the entry's last use.
    pub last_used: i64,
    /// Bytes on disk (hard-linked files counted once per entry).
    pub bytes: u64,
    /// What it holds, in a few words.
    pub about: String,
}

fn last_used(dir: &Path) -> Option<SystemTime> {
    dir.join(".complete").metadata().ok()?.modified().ok()
}

/// Bytes on disk under `dir`, each inode once; symlinks not followed.
pub fn disk_usage(dir: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(md) = d.symlink_metadata() else {
            continue;
        };
        if seen.insert((md.dev(), md.ino())) {
            total += md.blocks() * 512;
        }
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

fn about(kind: &str, dir: &Path) -> String {
    let json = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(dir.join(name)).ok()?).ok()
    };
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("?").to_string();
    match kind {
        "bootstrap" => json("spec.json")
            .map(|v| format!("{} {}", s(&v, "distro"), s(&v, "codename")))
            .unwrap_or_default(),
        "layers" => json("layer.json")
            .map(|v| {
                let (k, n) = (s(&v, "kind"), s(&v, "name"));
                if k == n { k } else { format!("{k} {n}") }
            })
            .unwrap_or_default(),
        "disks" => json("disk.json")
            .map(|v| format!("kernel {}", s(&v, "kernel")))
            .unwrap_or_default(),
        "formats" => json("formats.json")
            .map(|v| {
                let names: BTreeSet<String> = v["files"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f["format"].as_str().map(str::to_string))
                    .collect();
                names.into_iter().collect::<Vec<_>>().join(",")
            })
            .unwrap_or_default(),
        "verdicts" => json("verdict.json")
            .map(|v| {
                format!(
                    "{} {}",
                    s(&v, "name"),
                    if v["passed"].as_bool() == Some(true) {
                        "passed"
                    } else {
                        "failed"
                    }
                )
            })
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// Every complete entry, newest use first within each kind.
pub fn entries(cache: &Cache, sizes: bool) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for kind in KINDS {
        let base = cache.kind_dir(kind);
        let Ok(rd) = std::fs::read_dir(&base) else {
            continue;
        };
        let mut mine = Vec::new();
        for e in rd.flatten() {
            let key = e.file_name().to_string_lossy().into_owned();
            if key.starts_with('.') {
                continue;
            }
            let path = e.path();
            let Some(t) = last_used(&path) else {
                continue;
            };
            mine.push(Entry {
                kind: kind.to_string(),
                about: about(kind, &path),
                bytes: if sizes { disk_usage(&path) } else { 0 },
                last_used: t
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
                key,
                path,
            });
        }
        mine.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        out.extend(mine);
    }
    Ok(out)
}

/// Remove one entry unless a build holds it.
fn remove_entry(cache: &Cache, e: &Entry) -> Result<bool> {
    let lock = cache.kind_dir(&e.kind).join(format!(".{}.lock", e.key));
    match Lock::try_acquire(&lock)? {
        Some(_held) => {
            // The marker first: a half-removed entry is never complete.
            let _ = std::fs::remove_file(e.path.join(".complete"));
            fsutil::remove_tree(&e.path)?;
            let _ = std::fs::remove_file(&lock);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Layers worth keeping: the chains (an image layer and every layer
/// beneath it) of the `keep` most recently used images, and `also`.
pub fn prune_layers(
    cache: &Cache,
    keep: usize,
    older_than: Option<Duration>,
    also: Option<&str>,
) -> Result<Vec<Entry>> {
    let all: Vec<Entry> = entries(cache, false)?
        .into_iter()
        .filter(|e| e.kind == "layers")
        .collect();
    let meta: BTreeMap<String, crate::layers::LayerMeta> = all
        .iter()
        .filter_map(|e| Some((e.key.clone(), crate::layers::read_meta(&e.path).ok()?)))
        .collect();
    // Each image layer's chain: it and every layer beneath it.
    let chain = |top: &str| -> Vec<String> {
        let mut v = Vec::new();
        let mut k = top.to_string();
        while let Some(m) = meta.get(&k) {
            if v.contains(&k) {
                break;
            }
            v.push(k.clone());
            k = m.parent.clone();
        }
        v
    };
    let images: Vec<&Entry> = all
        .iter()
        .filter(|e| meta.get(&e.key).is_some_and(|m| m.kind == "image"))
        .collect();
    let kept: BTreeSet<String> = images
        .iter()
        .take(keep)
        .flat_map(|e| chain(&e.key))
        .chain(also.map(str::to_string))
        .collect();
    let in_some_chain: BTreeSet<String> = images.iter().flat_map(|e| chain(&e.key)).collect();
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for e in all {
        let old = older_than.is_some_and(|d| {
            now.duration_since(SystemTime::UNIX_EPOCH + Duration::from_secs(e.last_used as u64))
                .is_ok_and(|age| age > d)
        });
        // Layers of no image yet (a build under way, or one that failed)
        // go only when they are old: an hour, or `older_than`.
        let young = now
            .duration_since(SystemTime::UNIX_EPOCH + Duration::from_secs(e.last_used as u64))
            .is_ok_and(|age| age < Duration::from_secs(3600));
        let drop_it = old
            || (in_some_chain.contains(&e.key) && !kept.contains(&e.key))
            || (!in_some_chain.contains(&e.key) && !young);
        if drop_it && Some(e.key.as_str()) != also && remove_entry(cache, &e)? {
            removed.push(e);
        }
    }
    Ok(removed)
}

/// `cache prune`: entries beyond the `keep` newest of each kind (layers:
/// chains of images), and entries unused for `older_than`. Entries a
/// running build holds are skipped.
pub fn prune(
    cache: &Cache,
    keep: Option<usize>,
    older_than: Option<Duration>,
) -> Result<Vec<Entry>> {
    let mut removed = Vec::new();
    for kind in KINDS {
        if kind == "layers" {
            removed.extend(prune_layers(
                cache,
                keep.unwrap_or(usize::MAX),
                older_than,
                None,
            )?);
            continue;
        }
        let now = SystemTime::now();
        let mine: Vec<Entry> = entries(cache, false)?
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect();
        for (i, e) in mine.into_iter().enumerate() {
            let beyond = keep.is_some_and(|k| i >= k);
            let old = older_than.is_some_and(|d| {
                now.duration_since(SystemTime::UNIX_EPOCH + Duration::from_secs(e.last_used as u64))
                    .is_ok_and(|age| age > d)
            });
            if (beyond || old) && remove_entry(cache, &e)? {
                removed.push(e);
            }
        }
    }
    // Remembered hashes are a cache of the cache: they go with it.
    fsutil::remove_tree(&cache.hash_memo_dir())?;
    Ok(removed)
}

/// `7d`, `12h`, `30m`, `90s` or plain seconds.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}`: write a number and a unit, e.g. 7d, 12h, 30m"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(format!("`{text}`: the unit is one of s, m, h, d, w")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// The table `cache ls` prints.
pub fn render_ls(entries: &[Entry]) -> String {
    let mut s = format!(
        "{:<10} {:<34} {:<17} {:>10}  {}\n",
        "kind", "key", "last used", "size", "holds"
    );
    for e in entries {
        let when = chrono::DateTime::from_timestamp(e.last_used, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default();
        let key: String = e.key.chars().take(34).collect();
        s.push_str(&format!(
            "{:<10} {:<34} {:<17} {:>10}  {}\n",
            e.kind,
            key,
            when,
            format_size(e.bytes),
            e.about
        ));
    }
    s
}

/// Per kind: entries and bytes (`cache du`).
pub fn totals(entries: &[Entry]) -> Vec<(String, usize, u64)> {
    KINDS
        .iter()
        .map(|k| {
            let mine: Vec<&Entry> = entries.iter().filter(|e| e.kind == *k).collect();
            (
                k.to_string(),
                mine.len(),
                mine.iter().map(|e| e.bytes).sum(),
            )
        })
        .collect()
}

pub fn render_du(totals: &[(String, usize, u64)]) -> String {
    let mut s = format!("{:<10} {:>7} {:>10}\n", "kind", "entries", "size");
    for (k, n, b) in totals {
        s.push_str(&format!("{k:<10} {n:>7} {:>10}\n", format_size(*b)));
    }
    let (n, b) = totals
        .iter()
        .fold((0, 0), |(n, b), (_, n2, b2)| (n + n2, b + b2));
    s.push_str(&format!("{:<10} {n:>7} {:>10}\n", "total", format_size(b)));
    s
}

/// The index of an export directory.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Index {
    pub format: u32,
    /// `KIND/KEY` → SHA-256 of `KIND/KEY.tar`.
    pub entries: BTreeMap<String, String>,
}

const INDEX: &str = "index.json";

fn read_index(dir: &Path) -> Result<Index> {
    let p = dir.join(INDEX);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index {
            format: 1,
            ..Index::default()
        }),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// `cache export DIR`: every entry of `kinds` as `DIR/KIND/KEY.tar` and
/// the index of their hashes (the command writes bootstrap, layers and
/// verdicts unless told: a disk or a format set takes seconds to make
/// from its layers but gigabytes to carry, as a tar archive has no
/// holes). Archives already there for the same entry
/// are kept; archives of entries no longer exported are removed.
pub fn export(cache: &Cache, dir: &Path, kinds: &[String]) -> Result<(usize, usize)> {
    for k in kinds {
        if !KINDS.contains(&k.as_str()) {
            return Err(crate::config::ConfigError::new(
                "--kinds",
                format!("unknown kind `{k}` (kinds: {})", KINDS.join(", ")),
            )
            .into());
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let old = read_index(dir)?;
    let mut index = Index {
        format: 1,
        ..Index::default()
    };
    let (mut written, mut kept) = (0, 0);
    for e in entries(cache, false)?
        .into_iter()
        .filter(|e| kinds.contains(&e.kind))
    {
        let name = format!("{}/{}", e.kind, e.key);
        let tar = dir.join(format!("{name}.tar"));
        if let Some(h) = old.entries.get(&name) {
            if tar.is_file() {
                index.entries.insert(name, h.clone());
                kept += 1;
                continue;
            }
        }
        // Shared: a build may use the entry meanwhile, none may remove it.
        let _held = Lock::shared(&cache.kind_dir(&e.kind).join(format!(".{}.lock", e.key)))?;
        crate::progress::activity(&format!("exporting {name}"));
        std::fs::create_dir_all(tar.parent().expect("has a parent"))?;
        let partial = fsutil::partial_path(&tar);
        let f = std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        let mut w = std::io::BufWriter::new(f);
        crate::treearchive::write(&e.path, &mut w)
            .with_context(|| format!("archiving {}", e.path.display()))?;
        use std::io::Write;
        w.flush()?;
        drop(w);
        fsutil::commit(&partial, &tar)?;
        index
            .entries
            .insert(name, crate::formats::manifest::sha256_file(&tar)?);
        written += 1;
    }
    for name in old.entries.keys() {
        if !index.entries.contains_key(name) {
            let _ = std::fs::remove_file(dir.join(format!("{name}.tar")));
        }
    }
    fsutil::write_atomic(
        &dir.join(INDEX),
        (serde_json::to_string_pretty(&index)? + "\n").as_bytes(),
    )?;
    Ok((written, kept))
}

/// What an import did.
#[derive(Debug, Default, Serialize)]
pub struct Imported {
    pub added: Vec<String>,
    pub present: Vec<String>,
    /// Entries whose archive failed its hash or could not be read.
    pub rejected: Vec<(String, String)>,
}

/// `cache import DIR`: every archive of the index whose hash matches,
/// as a complete entry.
pub fn import(cache: &Cache, dir: &Path) -> Result<Imported> {
    let index = read_index(dir)?;
    if !dir.join(INDEX).is_file() {
        bail!(
            "{} has no {INDEX}: not a `stemforge cache export` directory",
            dir.display()
        );
    }
    let mut r = Imported::default();
    for (name, sha) in &index.entries {
        let Some((kind, key)) = name.split_once('/') else {
            r.rejected.push((name.clone(), "not KIND/KEY".into()));
            continue;
        };
        let sane = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !s.starts_with('.')
        };
        if !KINDS.contains(&kind) || !sane(key) {
            r.rejected
                .push((name.clone(), "unknown kind or bad key".into()));
            continue;
        }
        let base = cache.kind_dir(kind);
        let entry = base.join(key);
        if entry.join(".complete").is_file() {
            r.present.push(name.clone());
            continue;
        }
        let tar = dir.join(format!("{name}.tar"));
        let got = match crate::formats::manifest::sha256_file(&tar) {
            Ok(h) => h,
            Err(e) => {
                r.rejected.push((name.clone(), format!("{e:#}")));
                continue;
            }
        };
        if &got != sha {
            r.rejected
                .push((name.clone(), format!("sha256 {got}, the index says {sha}")));
            continue;
        }
        crate::progress::activity(&format!("importing {name}"));
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        let _lock = Lock::acquire(&base.join(format!(".{key}.lock")))?;
        let tmp = base.join(format!(".tmp-{key}"));
        fsutil::remove_tree(&tmp)?;
        fsutil::remove_tree(&entry)?;
        let unpacked = std::fs::File::open(&tar)
            .with_context(|| format!("opening {}", tar.display()))
            .and_then(|f| crate::treearchive::read(std::io::BufReader::new(f), &tmp));
        match unpacked {
            Ok(()) if std::fs::read_to_string(tmp.join(".complete")).is_ok_and(|k| k == key) => {
                fsutil::sync_fs(&tmp)?;
                std::fs::rename(&tmp, &entry).with_context(|| {
                    format!("renaming {} to {}", tmp.display(), entry.display())
                })?;
                crate::cache::touch(&entry.join(".complete"));
                r.added.push(name.clone());
            }
            Ok(()) => {
                fsutil::remove_tree(&tmp)?;
                r.rejected
                    .push((name.clone(), "its completion marker is not its key".into()));
            }
            Err(e) => {
                fsutil::remove_tree(&tmp)?;
                r.rejected.push((name.clone(), format!("{e:#}")));
            }
        }
    }
    Ok(r)
}

/// Remove the entry `kind/key` (waiting for builds that hold it).
pub fn discard(cache: &Cache, kind: &str, key: &str) -> Result<()> {
    let base = cache.kind_dir(kind);
    let _lock = Lock::acquire(&base.join(format!(".{key}.lock")))?;
    let entry = base.join(key);
    let _ = std::fs::remove_file(entry.join(".complete"));
    fsutil::remove_tree(&entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(cache: &Cache, key: &str, kind: &str, parent: &str) {
        let (_, _, _lock) = cache
            .get_or_make("layers", key, |d| {
                std::fs::create_dir(d.join("upper"))?;
                let meta = crate::layers::LayerMeta {
                    format: 1,
                    kind: kind.into(),
                    name: key.into(),
                    parent: parent.into(),
                    initramfs_dirty: false,
                    seconds: 0.0,
                };
                std::fs::write(d.join("layer.json"), serde_json::to_vec(&meta)?)?;
                Ok(())
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(15));
    }

    #[test]
    fn pruning_keeps_whole_chains_of_the_newest_images() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path());
        // Two images over a shared stage layer; the older has its own too.
        layer(&cache, "s1", "stage", "boot");
        layer(&cache, "old-s2", "stage", "s1");
        layer(&cache, "old-img", "image", "old-s2");
        layer(&cache, "new-s2", "stage", "s1");
        layer(&cache, "new-img", "image", "new-s2");
        // The young-orphan rule keeps fresh chains; age them all.
        let long_ago = SystemTime::now() - Duration::from_secs(7200);
        for e in entries(&cache, false).unwrap() {
            std::fs::File::options()
                .write(true)
                .open(e.path.join(".complete"))
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        crate::cache::touch(&d.path().join("layers/new-img/.complete"));
        let removed = prune(&cache, Some(1), None).unwrap();
        let gone: BTreeSet<String> = removed.iter().map(|e| e.key.clone()).collect();
        assert_eq!(
            gone,
            ["old-img", "old-s2"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        for kept in ["s1", "new-s2", "new-img"] {
            assert!(d.path().join("layers").join(kept).exists(), "{kept}");
        }
        // Older than an hour: everything goes.
        let removed = prune(&cache, None, Some(Duration::from_secs(3600))).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
    }

    #[test]
    fn ages_parse_with_their_units() {
        assert_eq!(parse_age("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_age("12h").unwrap(), Duration::from_secs(12 * 3600));
        assert_eq!(parse_age("90").unwrap(), Duration::from_secs(90));
        for bad in ["", "d", "7y", "-1d", "99999999999999999999w"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }
}
