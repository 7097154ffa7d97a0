//! `NAME.SHA256SUMS` and `NAME.manifest.json`: what a build was made from
//! and what it wrote, so that a third party can check every file
//! (`sha256sum -c NAME.SHA256SUMS` in the output directory) and rebuild
//! from the same inputs.

use crate::fsutil;
use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The manifest's layout version; bump it when a field changes meaning.
pub const SCHEMA: &str = "stemforge-manifest/1";

#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub schema: &'static str,
    pub name: String,
    pub version: String,
    pub stemforge_version: String,
    pub source_date_epoch: i64,
    /// SHA-256 over every input below: equal inputs, equal hash.
    pub input_hash: String,
    pub inputs: Inputs,
    pub outputs: Vec<Output>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    pub profile: Named,
    pub stages: Vec<Named>,
    /// The bootstrap cache entry: the profile's package set, sources and
    /// the archive's signed Release files.
    pub bootstrap_key: String,
    /// `deb` lines of the archive sources.
    pub sources: Vec<String>,
    pub keyring: String,
    /// The image's packages: `name` (`name:arch` for foreign ones) to version.
    pub packages: BTreeMap<String, String>,
    /// Versions of the host packages that made the image.
    pub host_tools: BTreeMap<String, String>,
    /// The BOSH agent in the image: its version, or "none".
    pub bosh_agent: String,
}

/// An input by name and content hash.
#[derive(Debug, Clone, Serialize)]
pub struct Named {
    pub name: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Output {
    pub file: String,
    pub kind: String,
    pub size: u64,
    pub sha256: String,
}

/// The host packages whose versions a manifest records.
pub const HOST_PACKAGES: &[&str] = &[
    "mmdebstrap",
    "e2fsprogs",
    "dosfstools",
    "qemu-utils",
    "qemu-system-x86",
    "ovmf",
    "seabios",
];

/// Versions of [`HOST_PACKAGES`] installed on this host (missing ones are
/// left out).
pub fn host_tools() -> BTreeMap<String, String> {
    let out = crate::exec::cmd("dpkg-query", ["-W", "-f", "${Package} ${Version}\\n"])
        .args(HOST_PACKAGES)
        .run_unchecked()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, v)| !v.is_empty())
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect()
}

/// SHA-256 of a file: from the hash memo when the file is unchanged since
/// it was hashed (see [`remember_hashes_in`]), else streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    if let Some(h) = memo::get(path) {
        return Ok(h);
    }
    let h = digest_file::<Sha256>(path)?;
    memo::put(path, &h);
    Ok(h)
}

/// Keep the hashes of the files hashed from now on in `dir`, each under
/// its file's device and inode with its size and modification time: a
/// file written in any way is hashed again. (Not the change time: linking
/// a cached file into the output directory changes that.) Outputs that
/// are hard links of cache entries are then hashed once, not at every
/// build.
pub fn remember_hashes_in(dir: &Path) {
    memo::set_dir(dir);
}

/// Remember `hash` as the SHA-256 of `path` as it is now (one computed
/// while the file was written).
pub fn remember_sha256(path: &Path, hash: &str) {
    memo::put(path, hash);
}

mod memo {
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

    pub fn set_dir(dir: &Path) {
        *DIR.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.to_path_buf());
    }

    /// The memo file of `path`, and the stamp its hash is valid for.
    fn slot(path: &Path) -> Option<(PathBuf, String)> {
        let dir = DIR.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let md = path.metadata().ok()?;
        if !md.is_file() {
            return None;
        }
        let stamp = format!("{} {}.{}", md.len(), md.mtime(), md.mtime_nsec());
        Some((dir.join(format!("{}-{}", md.dev(), md.ino())), stamp))
    }

    pub fn get(path: &Path) -> Option<String> {
        let (file, stamp) = slot(path)?;
        let text = std::fs::read_to_string(file).ok()?;
        let (s, h) = text.trim_end().rsplit_once(' ')?;
        (s == stamp && h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| h.to_string())
    }

    /// Best effort: a memo that cannot be written only costs a rehash.
    pub fn put(path: &Path, hash: &str) {
        if let Some((file, stamp)) = slot(path) {
            if let Some(d) = file.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let _ = crate::fsutil::write_atomic(&file, format!("{stamp} {hash}\n").as_bytes());
        }
    }
}

/// A digest of a file's contents, lowercase hex. Data is read 1 MiB at a
/// time; holes (a sparse disk is mostly holes) are not read at all but
/// hashed as the zeros they are, which halves the time for a disk image.
pub fn digest_file<D: Digest>(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    let mut h = StreamHasher::<D>::new(file, path);
    h.advance(len)?;
    Ok(h.finish())
}

/// A digest of a file read front to back as it becomes final: `advance`
/// hashes up to an offset, so a writer can hand over each region it has
/// finished while it writes the next (the disk step hashes the disk as it
/// copies the partitions in).
pub struct StreamHasher<D: Digest> {
    file: crate::interrupt::Reader<std::fs::File>,
    fd: std::os::unix::io::RawFd,
    path: PathBuf,
    pos: u64,
    h: D,
    buf: Vec<u8>,
}

impl<D: Digest> StreamHasher<D> {
    pub fn new(file: std::fs::File, path: &Path) -> StreamHasher<D> {
        use std::os::unix::io::AsRawFd;
        StreamHasher {
            fd: file.as_raw_fd(),
            file: crate::interrupt::Reader(file),
            path: path.to_path_buf(),
            pos: 0,
            h: D::new(),
            buf: vec![0u8; 1 << 20],
        }
    }

    fn zeros(&mut self, n: u64) -> Result<()> {
        static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];
        let mut left = n;
        let mut since_check = 0u64;
        while left > 0 {
            if since_check >= 1 << 28 {
                crate::interrupt::check()?;
                since_check = 0;
            }
            let k = left.min(ZEROS.len() as u64) as usize;
            self.h.update(&ZEROS[..k]);
            left -= k as u64;
            since_check += k as u64;
        }
        Ok(())
    }

    /// Hash the file from where the last call stopped up to `end`.
    pub fn advance(&mut self, end: u64) -> Result<()> {
        let path = self.path.clone();
        while self.pos < end {
            // SAFETY: lseek on an open descriptor we own.
            let data = unsafe { libc::lseek(self.fd, self.pos as libc::off_t, libc::SEEK_DATA) };
            let data = if data < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // Only a hole remains.
                    Some(libc::ENXIO) => end,
                    // No hole support: read everything.
                    Some(libc::EINVAL) => self.pos,
                    _ => {
                        return Err(e).with_context(|| format!("SEEK_DATA in {}", path.display()));
                    }
                }
            } else {
                (data as u64).min(end)
            };
            self.zeros(data - self.pos)?;
            self.pos = data;
            if self.pos >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(self.fd, self.pos as libc::off_t, libc::SEEK_HOLE) };
            let stop = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            // SAFETY: as above.
            if unsafe { libc::lseek(self.fd, self.pos as libc::off_t, libc::SEEK_SET) } < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("seeking in {}", path.display()));
            }
            while self.pos < stop {
                let want = ((stop - self.pos) as usize).min(self.buf.len());
                let n = self
                    .file
                    .read(&mut self.buf[..want])
                    .with_context(|| format!("reading {}", path.display()))?;
                if n == 0 {
                    anyhow::bail!("{} changed while being hashed", path.display());
                }
                self.h.update(&self.buf[..n]);
                self.pos += n as u64;
            }
        }
        Ok(())
    }

    pub fn finish(self) -> String {
        hex::encode(self.h.finalize())
    }
}

/// Hash `files` on every core, keeping their order.
pub fn sha256_files(files: &[PathBuf]) -> Result<Vec<String>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(files.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Vec<(usize, Result<String>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(f) = files.get(i) else { break };
                        mine.push((i, sha256_file(f)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("hashing thread panicked"))
            .collect()
    });
    let mut ordered: Vec<(usize, Result<String>)> = results.into_iter().flatten().collect();
    ordered.sort_by_key(|(i, _)| *i);
    ordered.into_iter().map(|(_, r)| r).collect()
}

/// The text of a SHA256SUMS file: `HEX  NAME` per line, as `sha256sum`
/// writes it, sorted by name.
pub fn sums_text(entries: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
        .iter()
        .map(|(name, hex)| format!("{hex}  {name}\n"))
        .collect()
}

/// Hash every file in `files` (all in `out_dir`), write the manifest, then
/// `NAME.SHA256SUMS` over the files and the manifest. Returns both paths.
pub fn write(
    out_dir: &Path,
    mut manifest: Manifest,
    files: &[(PathBuf, String)],
) -> Result<(PathBuf, PathBuf)> {
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let hashes = sha256_files(&paths)?;
    let mut sums = Vec::new();
    manifest.outputs.clear();
    for ((path, kind), sha256) in files.iter().zip(hashes) {
        let file = path
            .strip_prefix(out_dir)
            .with_context(|| format!("{} is not in {}", path.display(), out_dir.display()))?
            .to_string_lossy()
            .into_owned();
        let size = path
            .metadata()
            .with_context(|| format!("stat {}", path.display()))?
            .len();
        sums.push((file.clone(), sha256.clone()));
        manifest.outputs.push(Output {
            file,
            kind: kind.clone(),
            size,
            sha256,
        });
    }
    manifest.outputs.sort_by(|a, b| a.file.cmp(&b.file));
    let json = serde_json::to_string_pretty(&manifest)? + "\n";
    let manifest_path = out_dir.join(format!("{}.manifest.json", manifest.name));
    fsutil::write_atomic(&manifest_path, json.as_bytes())?;
    sums.push((
        format!("{}.manifest.json", manifest.name),
        hex::encode(Sha256::digest(json.as_bytes())),
    ));
    let sums_path = out_dir.join(format!("{}.SHA256SUMS", manifest.name));
    fsutil::write_atomic(&sums_path, sums_text(&sums).as_bytes())?;
    Ok((manifest_path, sums_path))
}

/// SHA-256 over a canonical JSON rendering of `value`.
pub fn hash_json<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).expect("inputs serialize");
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_hashes_match_known_vectors_and_keep_order() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::write(&a, b"abc").unwrap();
        std::fs::write(&b, b"").unwrap();
        let h = sha256_files(&[a, b]).unwrap();
        assert_eq!(
            h[0],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            h[1],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(sha256_files(&[d.path().join("missing")]).is_err());
    }

    #[test]
    fn sums_are_what_sha256sum_checks() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("x.raw");
        std::fs::write(&img, vec![7u8; 3 << 20]).unwrap();
        let m = Manifest {
            schema: SCHEMA,
            name: "x".into(),
            version: "0.0.1".into(),
            stemforge_version: crate::VERSION.into(),
            source_date_epoch: 0,
            input_hash: "0".into(),
            inputs: Inputs {
                profile: Named {
                    name: "p".into(),
                    sha256: "0".into(),
                },
                stages: vec![],
                bootstrap_key: "k".into(),
                sources: vec![],
                keyring: "k".into(),
                packages: BTreeMap::new(),
                host_tools: BTreeMap::new(),
                bosh_agent: "none".into(),
            },
            outputs: vec![],
        };
        let (manifest, sums) = write(d.path(), m, &[(img.clone(), "raw".into())]).unwrap();
        let check = || {
            std::process::Command::new("sha256sum")
                .arg("-c")
                .arg(&sums)
                .current_dir(d.path())
                .output()
                .unwrap()
        };
        let o = check();
        assert!(o.status.success(), "{o:?}");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        assert_eq!(v["outputs"][0]["file"], "x.raw");
        assert_eq!(v["outputs"][0]["size"], 3 << 20);
        // A changed byte is caught.
        std::fs::write(&img, vec![8u8; 3 << 20]).unwrap();
        assert!(!check().status.success());
    }
}
