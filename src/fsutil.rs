//! File-system helpers shared by the phases: atomic outputs, safe tree
//! removal, hole-aware copies, mount inspection.

use crate::exec::cmd;
use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The temporary name an output is written under before it is complete:
/// `out/.name.raw.partial` for `out/name.raw`.
pub fn partial_path(final_path: &Path) -> PathBuf {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    final_path.with_file_name(format!(".{name}.partial"))
}

/// Move a completed output from its temporary name to its final name.
pub fn commit(partial: &Path, final_path: &Path) -> Result<()> {
    std::fs::rename(partial, final_path)
        .with_context(|| format!("renaming {} to {}", partial.display(), final_path.display()))
}

/// Write `bytes` to `path` atomically: a temporary name, then a rename.
/// A failed write leaves nothing behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = partial_path(path);
    let written = (|| {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    commit(&tmp, path)
}

/// Mount points at or below `path` in this process's mount namespace.
pub fn mounts_under(path: &Path) -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let base = canonical_or_self(path);
    Ok(parse_mountinfo_points(&text)
        .into_iter()
        .filter(|m| m.starts_with(&base))
        .collect())
}

/// The mount points (field 5) of a mountinfo text, unescaped.
pub fn parse_mountinfo_points(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_octal(p)))
        .collect()
}

/// Undo the `\040`-style escapes of /proc/self/mountinfo and fstab.
pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn canonical_or_self(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// Delete a tree (or a file), refusing when anything is mounted inside it (a /dev or
/// /proc left behind would take the host's files with it). Never crosses
/// into another file system.
pub fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() && path.symlink_metadata().is_err() {
        return Ok(());
    }
    let mounted = mounts_under(path)?;
    if let Some(m) = mounted.first() {
        bail!(
            "refusing to delete {}: {} is mounted inside it (unmount it first)",
            path.display(),
            m.display()
        );
    }
    // In-process rather than `rm`: a build stopped by Ctrl-C still
    // removes its trees while every program it started is being killed.
    // Nothing is mounted below (checked above); symlinks are removed, not
    // followed.
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return Ok(()),
    }
    .with_context(|| format!("deleting {}", path.display()))
}

/// Flush the file system holding `path` to disk (before a completion
/// marker is written: a crash must not leave a marker over lost data).
pub fn sync_fs(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&f)) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncing the file system of {}", path.display()));
    }
    Ok(())
}

/// Copy a tree with every attribute (owners, modes, xattrs, hard links,
/// device nodes), using reflinks where the file system has them.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    cmd("cp", ["-a", "--reflink=auto", "--"])
        .arg(src)
        .arg(dst)
        .run()
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    Ok(())
}

/// Copy the data regions of `src` into `dst` at `offset`, skipping holes,
/// so sparse partition images stay sparse inside the disk image. Returns
/// the number of bytes in data regions copied.
pub fn copy_sparse_into(src: &File, dst: &File, offset: u64) -> Result<u64> {
    let len = src.metadata().context("stat of partition image")?.len();
    copy_sparse_range(src, dst, offset, 0, len)
}

/// [`copy_sparse_into`] for the bytes `start..end` of `src` only.
pub fn copy_sparse_range(src: &File, dst: &File, offset: u64, start: u64, end: u64) -> Result<u64> {
    let fd = src.as_raw_fd();
    let mut pos: u64 = start;
    let mut copied = 0u64;
    let mut buf = Vec::new();
    while pos < end {
        // SAFETY: plain syscalls on an owned, open descriptor.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(err).context("SEEK_DATA on partition image");
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error()).context("SEEK_HOLE on partition image");
        }
        let hole = (hole as u64).min(end);
        if buf.is_empty() {
            buf = vec![0u8; 4 << 20];
        }
        copy_range(src, dst, data, offset + data, hole - data, &mut buf)?;
        copied += hole - data;
        pos = hole;
    }
    Ok(copied)
}

/// Copy `len` bytes from `src` at `from` to `dst` at `to`: in the kernel
/// (copy_file_range) where it can, through `buf` where it cannot.
fn copy_range(src: &File, dst: &File, from: u64, to: u64, len: u64, buf: &mut [u8]) -> Result<()> {
    let (mut off_in, mut off_out, mut left) = (from as libc::loff_t, to as libc::loff_t, len);
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both descriptors are open; the offsets are ours.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n > 0 {
            left -= n as u64;
            continue;
        }
        let err = std::io::Error::last_os_error();
        if n == 0
            || matches!(
                err.raw_os_error(),
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
            )
        {
            break; // fall back to copying by hand
        }
        return Err(err).context("copy_file_range into the disk image");
    }
    let mut at = off_in as u64;
    let end = from + len;
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], at)
            .context("reading partition image")?;
        dst.write_all_at(&buf[..n], to + (at - from))
            .context("writing disk image")?;
        at += n as u64;
    }
    Ok(())
}

/// Bytes a tree occupies on disk (hard links counted once), like `du -sb`
/// but in allocated blocks.
pub fn tree_usage(path: &Path) -> Result<u64> {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in rd {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let md = entry
                .metadata()
                .with_context(|| format!("stat {}", entry.path().display()))?;
            if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            total += md.blocks() * 512;
            if md.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// Free bytes on the file system holding `path` (or its nearest existing
/// parent).
pub fn free_space(path: &Path) -> Result<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            p = PathBuf::from(".");
            break;
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string, st a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", p.display()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Set owner and group of `path` without following a final symlink.
pub fn lchown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {uid}:{gid} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    #[test]
    fn partial_names() {
        assert_eq!(
            partial_path(Path::new("out/a.raw")),
            PathBuf::from("out/.a.raw.partial")
        );
    }

    #[test]
    fn mountinfo_points_unescape() {
        let text = "36 35 98:0 /mnt1 /mnt\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        let pts = parse_mountinfo_points(text);
        assert_eq!(
            pts,
            vec![PathBuf::from("/mnt space"), PathBuf::from("/proc")]
        );
    }

    #[test]
    fn proc_is_mounted_and_tmpdir_is_not() {
        assert!(!mounts_under(Path::new("/proc")).unwrap().is_empty());
        let d = tempfile::tempdir().unwrap();
        assert!(mounts_under(d.path()).unwrap().is_empty());
    }

    #[test]
    fn remove_tree_deletes_a_plain_tree() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        std::fs::create_dir_all(t.join("a/b")).unwrap();
        std::fs::write(t.join("a/b/f"), "x").unwrap();
        remove_tree(&t).unwrap();
        assert!(!t.exists());
        remove_tree(&t).unwrap(); // absent is fine
    }

    #[test]
    fn remove_tree_refuses_a_mounted_tree() {
        // /proc holds mounts (e.g. /proc/sys/fs/binfmt_misc) or is one.
        let err = remove_tree(Path::new("/proc")).unwrap_err();
        assert!(err.to_string().contains("refusing"), "{err}");
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let d = tempfile::tempdir().unwrap();
        let mut src = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(d.path().join("src"))
            .unwrap();
        src.set_len(64 << 20).unwrap();
        src.seek(SeekFrom::Start(1 << 20)).unwrap();
        src.write_all(b"hello").unwrap();
        src.seek(SeekFrom::Start(40 << 20)).unwrap();
        src.write_all(b"world").unwrap();
        src.sync_all().unwrap();
        let dst = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(d.path().join("dst"))
            .unwrap();
        dst.set_len(128 << 20).unwrap();
        let copied = copy_sparse_into(&src, &dst, 8 << 20).unwrap();
        assert!(copied < 16 << 20, "copied {copied}");
        let mut b = [0u8; 5];
        dst.read_exact_at(&mut b, (8 << 20) + (1 << 20)).unwrap();
        assert_eq!(&b, b"hello");
        dst.read_exact_at(&mut b, (8 << 20) + (40 << 20)).unwrap();
        assert_eq!(&b, b"world");
        use std::os::unix::fs::MetadataExt;
        let used = dst.metadata().unwrap().blocks() * 512;
        assert!(used < 32 << 20, "dst stayed sparse: {used}");
    }
}
