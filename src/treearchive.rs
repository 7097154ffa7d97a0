//! A directory tree as a tar archive and back, with everything an image
//! tree holds: owners, modes, times, hard links, extended attributes
//! (file capabilities, overlayfs's opaque and redirect marks), device
//! nodes and FIFOs (overlayfs whiteouts are 0:0 character devices).
//!
//! The tar crate writes and reads the format; it leaves device nodes and
//! FIFOs out of unpacking, so those are made here with mknod.

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// Extended attributes of `path` (not following a symlink), by name.
fn xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("listing the attributes of {}", path.display()));
            }
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut value = vec![0u8; 4096];
        let len = loop {
            match rustix::fs::lgetxattr(path, name.as_str(), &mut value) {
                Ok(l) => break l,
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 4, 0),
                Err(e) => {
                    return Err(std::io::Error::from(e))
                        .with_context(|| format!("reading {name} of {}", path.display()));
                }
            }
        };
        value.truncate(len);
        out.push((name, value));
    }
    Ok(out)
}

/// Archive the tree at `root` (its contents, by relative paths, in name
/// order) into `w`.
pub fn write<W: Write>(root: &Path, w: W) -> Result<()> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        crate::interrupt::check()?;
        let path = root.join(&rel);
        let md = path
            .symlink_metadata()
            .with_context(|| format!("stat {}", path.display()))?;
        let ft = md.file_type();
        if ft.is_socket() {
            continue;
        }
        if !rel.as_os_str().is_empty() {
            let attrs = if ft.is_symlink() {
                Vec::new()
            } else {
                xattrs(&path)?
            };
            if !attrs.is_empty() {
                let pax: Vec<(String, Vec<u8>)> = attrs
                    .into_iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v))
                    .collect();
                b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
            }
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&md, tar::HeaderMode::Complete);
            if ft.is_file() && md.nlink() > 1 {
                if let Some(first) = links.get(&(md.dev(), md.ino())) {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, &rel, first)?;
                    continue;
                }
                links.insert((md.dev(), md.ino()), rel.clone());
            }
            if ft.is_file() {
                let f = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                b.append_data(&mut h, &rel, crate::interrupt::Reader(f))?;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path)?;
                b.append_link(&mut h, &rel, target)?;
            } else if ft.is_dir() {
                b.append_data(&mut h, &rel, std::io::empty())?;
            } else {
                let (major, minor) = (libc::major(md.rdev()), libc::minor(md.rdev()));
                h.set_entry_type(if ft.is_char_device() {
                    tar::EntryType::Char
                } else if ft.is_block_device() {
                    tar::EntryType::Block
                } else {
                    tar::EntryType::Fifo
                });
                h.set_device_major(major)?;
                h.set_device_minor(minor)?;
                h.set_size(0);
                b.append_data(&mut h, &rel, std::io::empty())?;
            }
        }
        if ft.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<std::io::Result<_>>()?;
            // Reversed: the stack pops them in name order.
            names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
            stack.extend(names.into_iter().map(|n| rel.join(n)));
        }
    }
    b.into_inner()?.flush()?;
    Ok(())
}

/// Unpack an archive [`write`] made into `dest` (created), as it was.
pub fn read<R: Read>(r: R, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut a = tar::Archive::new(r);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_preserve_mtime(true);
    // Set below for every kind (the tar crate sets them on files only,
    // and overlayfs keeps its marks on directories).
    a.set_unpack_xattrs(false);
    a.set_overwrite(false);
    // Directory times last: unpacking their contents changes them.
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    for entry in a.entries()? {
        crate::interrupt::check()?;
        let mut e = entry?;
        let rel = e.path()?.into_owned();
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            bail!("{} is not a plain relative path", rel.display());
        }
        let kind = e.header().entry_type();
        let path = dest.join(&rel);
        let mut attrs: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(exts) = e.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    attrs.push((
                        String::from_utf8_lossy(name).into_owned(),
                        ext.value_bytes().to_vec(),
                    ));
                }
            }
        }
        let mtime = e.header().mtime().unwrap_or(0) as i64;
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let h = e.header();
            let mode = h.mode()? & 0o7777;
            let (fmt, dev) = if kind.is_fifo() {
                (libc::S_IFIFO, 0)
            } else {
                let (ma, mi) = (
                    h.device_major()?.unwrap_or(0),
                    h.device_minor()?.unwrap_or(0),
                );
                let fmt = if kind.is_character_special() {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                (fmt, libc::makedev(ma, mi))
            };
            let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
            // SAFETY: a valid C string.
            if unsafe { libc::mknod(c.as_ptr(), fmt | mode, dev) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("mknod {}", path.display()));
            }
            let (uid, gid) = (h.uid()? as u32, h.gid()? as u32);
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            set_mtime(&path, mtime)?;
            continue;
        }
        if !e.unpack_in(dest)? {
            bail!("{} would land outside {}", rel.display(), dest.display());
        }
        if !kind.is_symlink() {
            for (name, value) in &attrs {
                rustix::fs::lsetxattr(&path, name.as_str(), value, rustix::fs::XattrFlags::empty())
                    .map_err(std::io::Error::from)
                    .with_context(|| format!("setting {name} on {}", path.display()))?;
            }
        }
        if kind.is_dir() {
            dir_times.push((path, mtime));
        }
    }
    for (p, t) in dir_times.into_iter().rev() {
        set_mtime(&p, t)?;
    }
    Ok(())
}

fn set_mtime(path: &Path, secs: i64) -> Result<()> {
    let t = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &t,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("setting the time of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_comes_back_as_it_was() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("etc/deep/er")).unwrap();
        std::fs::write(src.join("etc/a"), "alpha").unwrap();
        std::fs::hard_link(src.join("etc/a"), src.join("etc/deep/a-link")).unwrap();
        std::os::unix::fs::symlink("../a", src.join("etc/deep/sym")).unwrap();
        std::fs::write(src.join("etc/deep/er/x"), vec![7u8; 100_000]).unwrap();
        std::fs::set_permissions(
            src.join("etc/a"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4750),
        )
        .unwrap();
        set_mtime(&src.join("etc/deep"), 1_000_000).unwrap();
        // Extended attributes on a directory and a file (user.*: no root
        // needed; overlayfs's trusted.* marks take the same path).
        let xattrs_here = ["etc/deep", "etc/a"].iter().all(|p| {
            rustix::fs::lsetxattr(
                src.join(p),
                "user.stemforge",
                p.as_bytes(),
                rustix::fs::XattrFlags::empty(),
            )
            .is_ok()
        });
        let mut buf = Vec::new();
        write(&src, &mut buf).unwrap();
        let dst = d.path().join("dst");
        read(&buf[..], &dst).unwrap();
        let md = |p: &Path| p.symlink_metadata().unwrap();
        assert_eq!(std::fs::read(dst.join("etc/a")).unwrap(), b"alpha");
        assert_eq!(md(&dst.join("etc/a")).mode() & 0o7777, 0o4750);
        assert_eq!(
            md(&dst.join("etc/a")).ino(),
            md(&dst.join("etc/deep/a-link")).ino(),
            "hard links stay links"
        );
        assert_eq!(
            std::fs::read_link(dst.join("etc/deep/sym")).unwrap(),
            Path::new("../a")
        );
        assert_eq!(
            std::fs::read(dst.join("etc/deep/er/x")).unwrap().len(),
            100_000
        );
        assert_eq!(md(&dst.join("etc/deep")).mtime(), 1_000_000);
        if xattrs_here {
            for p in ["etc/deep", "etc/a"] {
                let got = xattrs(&dst.join(p)).unwrap();
                assert!(
                    got.contains(&("user.stemforge".to_string(), p.as_bytes().to_vec())),
                    "{p}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn an_archive_cannot_write_outside_its_directory() {
        let mut raw = Vec::new();
        {
            let mut b = tar::Builder::new(&mut raw);
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses `..`; write the name bytes directly.
            h.as_gnu_mut().unwrap().name[..8].copy_from_slice(b"../evil\0");
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
            b.finish().unwrap();
        }
        let d = tempfile::tempdir().unwrap();
        let e = read(&raw[..], &d.path().join("in")).unwrap_err();
        assert!(format!("{e:#}").contains("plain relative path"), "{e:#}");
        assert!(!d.path().join("evil").exists());
    }
}
