//! The image tree as a stack of cached layers, as container builders keep
//! theirs: the bootstrapped tree at the bottom, then one layer per stage
//! (its packages, then its actions), and the image layer (stemforge itself, the role
//! inputs, the clean-up, the boot configuration). Each layer is an
//! overlayfs upper directory kept in the cache under a key made of its
//! parent's key and everything that decides its contents, so an edit
//! reruns only the layers from the edited one on; a hit costs nothing,
//! because nothing is copied: the layers are mounted, stacked.
//!
//! The mounts live in a private mount namespace that the build enters
//! (see [`private_mounts`]): nothing is ever mounted on the host, and the
//! mounts vanish with the process, however it ends.

use crate::cache::{Cache, Hit, Lock};
use crate::fsutil;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Bump when a layer's layout or meaning changes, to retire old entries.
const FORMAT: u32 = 1;

/// The cache kind of layers.
pub const KIND: &str = "layers";

/// Move this thread (and every thread and process it starts from now on)
/// into a mount namespace of its own, with nothing propagating back to
/// the host's: the build's overlay mounts exist only there.
pub fn private_mounts() -> Result<()> {
    // SAFETY: plain syscalls; unshare affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("entering a private mount namespace (building needs root)");
    }
    let root = CString::new("/").expect("no NUL");
    // SAFETY: a valid C string; no data argument.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("making the mounts private");
    }
    Ok(())
}

fn cstr(p: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("{} has a NUL", p.display()))
}

/// A mount, unmounted (lazily, so nothing can keep it) when dropped.
#[derive(Debug)]
pub struct Mount {
    target: PathBuf,
}

impl Mount {
    /// Mount `fstype` with `options` on `target`.
    pub fn new(
        source: &str,
        target: &Path,
        fstype: &str,
        flags: u64,
        options: &str,
    ) -> Result<Mount> {
        let (src, tgt, fs, opt) = (
            CString::new(source)?,
            cstr(target)?,
            CString::new(fstype)?,
            CString::new(options)?,
        );
        // SAFETY: valid C strings that outlive the call.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                fs.as_ptr(),
                flags,
                opt.as_ptr() as *const libc::c_void,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mounting {fstype} on {} ({options})", target.display()));
        }
        Ok(Mount {
            target: target.to_path_buf(),
        })
    }

    /// A bind mount of `source` (not of the mounts beneath it) on `target`.
    pub fn bind(source: &Path, target: &Path) -> Result<Mount> {
        let (src, tgt) = (cstr(source)?, cstr(target)?);
        // SAFETY: valid C strings.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("binding {} on {}", source.display(), target.display()));
        }
        Ok(Mount {
            target: target.to_path_buf(),
        })
    }

    /// An overlay of `lowers` (the top one first), writable into `upper`
    /// (with its work directory) when given, on `target`.
    pub fn overlay(
        lowers: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        target: &Path,
    ) -> Result<Mount> {
        let check = |p: &Path| -> Result<String> {
            let s = p
                .to_str()
                .with_context(|| format!("{} is not UTF-8", p.display()))?;
            if s.contains([',', ':', '\\']) {
                bail!("{s}: an overlay layer's path cannot hold ',', ':' or '\\' (move the cache)");
            }
            Ok(s.to_string())
        };
        let lower: Vec<String> = lowers.iter().map(|p| check(p)).collect::<Result<_>>()?;
        let mut options = format!("lowerdir={}", lower.join(":"));
        match upper {
            Some((u, w)) => {
                options.push_str(&format!(",upperdir={},workdir={}", check(u)?, check(w)?));
                // Directories of lower layers can be renamed (the disk
                // step moves mount points aside; scripts may too).
                options.push_str(",redirect_dir=on");
            }
            None => options.push_str(",redirect_dir=follow"),
        }
        options.push_str(",index=off,metacopy=off");
        let flags = if upper.is_none() { libc::MS_RDONLY } else { 0 };
        Mount::new("stemforge-layers", target, "overlay", flags, &options)
    }

    pub fn target(&self) -> &Path {
        &self.target
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Ok(t) = cstr(&self.target) {
            // SAFETY: a valid C string.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// What a layer records beside its upper directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMeta {
    pub format: u32,
    /// `stage` or `image`.
    pub kind: String,
    /// The stage's directory name, or the kind.
    pub name: String,
    /// The key of the layer beneath (the bootstrap's for the first).
    pub parent: String,
    /// The layer changed what the initramfs holds.
    pub initramfs_dirty: bool,
    /// How long making it took.
    pub seconds: f64,
}

/// One layer of the stack, held (shared lock) while the build uses it.
pub struct Layer {
    pub key: String,
    pub dir: PathBuf,
    pub meta: LayerMeta,
    pub hit: Hit,
    _lock: Lock,
}

impl Layer {
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
}

/// The bootstrapped tree and the layers on it.
pub struct Stack<'a> {
    cache: &'a Cache,
    base: PathBuf,
    base_key: String,
    /// Where a layer being made is mounted.
    mount_at: PathBuf,
    pub layers: Vec<Layer>,
}

impl<'a> Stack<'a> {
    pub fn new(
        cache: &'a Cache,
        base: &Path,
        base_key: &str,
        mount_at: &Path,
    ) -> Result<Stack<'a>> {
        std::fs::create_dir_all(mount_at)
            .with_context(|| format!("creating {}", mount_at.display()))?;
        Ok(Stack {
            cache,
            base: base.to_path_buf(),
            base_key: base_key.to_string(),
            mount_at: mount_at.to_path_buf(),
            layers: Vec::new(),
        })
    }

    /// The key of the top of the stack.
    pub fn key(&self) -> &str {
        self.layers.last().map_or(&self.base_key, |l| &l.key)
    }

    /// The lower directories of an overlay of the whole stack, top first.
    pub fn lowers(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.layers.iter().rev().map(|l| l.upper()).collect();
        v.push(self.base.clone());
        v
    }

    /// The key of a layer of `kind`/`name` over the current top, decided
    /// by `inputs`.
    pub fn key_for(&self, kind: &str, name: &str, inputs: &impl Serialize) -> String {
        let h = crate::formats::manifest::hash_json(&serde_json::json!({
            "layers": FORMAT,
            "stemforge": crate::VERSION,
            "parent": self.key(),
            "kind": kind,
            "name": name,
            "inputs": inputs,
        }));
        h[..32].to_string()
    }

    /// Push the layer of `kind`/`name` decided by `inputs`: from the cache,
    /// or made by `make` on the stack mounted writable at the mount point
    /// (it returns whether the initramfs must be rebuilt).
    pub fn push(
        &mut self,
        kind: &str,
        name: &str,
        inputs: &impl Serialize,
        make: impl FnOnce(&Path) -> Result<bool>,
    ) -> Result<&Layer> {
        let key = self.key_for(kind, name, inputs);
        let parent = self.key().to_string();
        let lowers = self.lowers();
        let mount_at = self.mount_at.clone();
        let (dir, hit, lock) = self.cache.get_or_make(KIND, &key, |tmp| {
            let t0 = std::time::Instant::now();
            let upper = tmp.join("upper");
            let work = tmp.join("overlay-work");
            for d in [&upper, &work] {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            let dirty = {
                let _m = Mount::overlay(&lowers, Some((&upper, &work)), &mount_at)?;
                make(&mount_at)?
            };
            fsutil::remove_tree(&work)?;
            let meta = LayerMeta {
                format: FORMAT,
                kind: kind.to_string(),
                name: name.to_string(),
                parent,
                initramfs_dirty: dirty,
                seconds: t0.elapsed().as_secs_f64(),
            };
            std::fs::write(tmp.join("layer.json"), serde_json::to_vec_pretty(&meta)?)
                .context("writing layer.json")?;
            Ok(())
        })?;
        let meta: LayerMeta = read_meta(&dir)?;
        self.layers.push(Layer {
            key,
            dir,
            meta,
            hit,
            _lock: lock,
        });
        Ok(self.layers.last().expect("just pushed"))
    }

    /// The whole stack mounted at the mount point, writable into the
    /// scratch directory `scratch` (thrown away with the build).
    pub fn view(&self, scratch: &Path) -> Result<Mount> {
        let upper = scratch.join("upper");
        let work = scratch.join("overlay-work");
        fsutil::remove_tree(scratch)?;
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Mount::overlay(&self.lowers(), Some((&upper, &work)), &self.mount_at)
    }

    /// Layers made by this build, and layers found.
    pub fn counts(&self) -> (usize, usize) {
        let made = self.layers.iter().filter(|l| l.hit == Hit::Miss).count();
        (made, self.layers.len() - made)
    }
}

/// A layer entry's `layer.json`.
pub fn read_meta(dir: &Path) -> Result<LayerMeta> {
    let p = dir.join("layer.json");
    let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", p.display()))
}
