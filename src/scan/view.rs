//! The read-only file system views a scan reads through: a root tree,
//! resolved by the kernel strictly inside its root (`openat2` with
//! `RESOLVE_IN_ROOT`), and the live host. A disk image backend fits the
//! same trait. Every view refuses what would hang or swamp a scan: reads
//! are of regular files only (a FIFO, socket or device is an error, never
//! opened for reading) and bounded; directories come back whole or as an
//! error, never silently short.

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The kinds of inode a view reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "regular file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Fifo => "FIFO",
            Kind::Socket => "socket",
            Kind::CharDevice => "character device",
            Kind::BlockDevice => "block device",
        }
    }
}

/// What checks read of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits with set-id and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
}

impl Meta {
    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }
    pub fn is_file(&self) -> bool {
        self.kind == Kind::File
    }
    pub fn is_symlink(&self) -> bool {
        self.kind == Kind::Symlink
    }

    fn from_stat(st: &rustix::fs::Stat) -> Meta {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDevice,
            FileType::BlockDevice => Kind::BlockDevice,
            _ => Kind::File,
        };
        Meta {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
        }
    }

    fn from_std(md: &std::fs::Metadata) -> Meta {
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_char_device() {
            Kind::CharDevice
        } else if ft.is_block_device() {
            Kind::BlockDevice
        } else {
            Kind::File
        };
        Meta {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
        }
    }
}

/// A read-only view of a file system. Paths are absolute within the view.
pub trait FsView: std::fmt::Debug + Send + Sync {
    /// What the view is, for reports: `root tree /x`, `live host`.
    fn describe(&self) -> String;
    /// The inode at `path`, symlinks followed (inside the view).
    fn metadata(&self, path: &str) -> io::Result<Meta>;
    /// The inode at `path`, a final symlink not followed.
    fn symlink_metadata(&self, path: &str) -> io::Result<Meta>;
    /// The target of the symlink at `path`, as written.
    fn read_link(&self, path: &str) -> io::Result<String>;
    /// At most `max` bytes of the regular file at `path`, and whether it
    /// holds more. Anything but a regular file is an error.
    fn read(&self, path: &str, max: u64) -> io::Result<(Vec<u8>, bool)>;
    /// The entries of the directory at `path` (symlinks not followed),
    /// sorted by name; an error when it cannot be read whole.
    fn read_dir(&self, path: &str) -> io::Result<Vec<(String, Meta)>>;
    /// `path` with every symlink resolved, as the view sees it.
    fn canonical(&self, path: &str) -> io::Result<String>;
}

fn not_regular(path: &str, kind: Kind) -> io::Error {
    io::Error::other(format!(
        "{path} is a {}, not a regular file: not read",
        kind.name()
    ))
}

/// Read at most `max` bytes from `r`, and whether there was more.
fn read_bounded(r: impl Read, max: u64) -> io::Result<(Vec<u8>, bool)> {
    let mut bytes = Vec::new();
    r.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    let more = bytes.len() as u64 > max;
    bytes.truncate(max as usize);
    Ok((bytes, more))
}

/// A root tree. Every path is resolved by the kernel as if the tree were
/// `/`: absolute symlinks and `..` stay inside it, loops end in ELOOP,
/// and nothing outside the root is reached.
#[derive(Debug)]
pub struct TreeView {
    root: PathBuf,
    fd: OwnedFd,
}

impl TreeView {
    pub fn open(root: &Path) -> io::Result<TreeView> {
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(TreeView {
            root: root.to_path_buf(),
            fd,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn open_at(&self, path: &str, flags: OFlags) -> io::Result<OwnedFd> {
        let rel = path.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        // openat2 refuses any flag but these beside O_PATH.
        let extra = if flags.contains(OFlags::PATH) {
            OFlags::CLOEXEC
        } else {
            OFlags::CLOEXEC | OFlags::NOCTTY
        };
        Ok(rustix::fs::openat2(
            self.fd.as_fd(),
            rel,
            flags | extra,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )?)
    }
}

impl FsView for TreeView {
    fn describe(&self) -> String {
        format!("root tree {}", self.root.display())
    }

    fn metadata(&self, path: &str) -> io::Result<Meta> {
        let fd = self.open_at(path, OFlags::PATH)?;
        Ok(Meta::from_stat(&rustix::fs::fstat(&fd)?))
    }

    fn symlink_metadata(&self, path: &str) -> io::Result<Meta> {
        let fd = self.open_at(path, OFlags::PATH | OFlags::NOFOLLOW)?;
        Ok(Meta::from_stat(&rustix::fs::fstat(&fd)?))
    }

    fn read_link(&self, path: &str) -> io::Result<String> {
        let fd = self.open_at(path, OFlags::PATH | OFlags::NOFOLLOW)?;
        let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
        Ok(target.to_string_lossy().into_owned())
    }

    fn read(&self, path: &str, max: u64) -> io::Result<(Vec<u8>, bool)> {
        // Look before opening for reading: opening a device can have
        // effects, and reading a FIFO can block for ever.
        let meta = self.metadata(path)?;
        if meta.kind != Kind::File {
            return Err(not_regular(path, meta.kind));
        }
        let fd = self.open_at(path, OFlags::RDONLY | OFlags::NONBLOCK)?;
        let meta = Meta::from_stat(&rustix::fs::fstat(&fd)?);
        if meta.kind != Kind::File {
            return Err(not_regular(path, meta.kind));
        }
        read_bounded(std::fs::File::from(fd), max)
    }

    fn read_dir(&self, path: &str) -> io::Result<Vec<(String, Meta)>> {
        let fd = self.open_at(path, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut dir = rustix::fs::Dir::read_from(&fd)?;
        let mut out = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let st = rustix::fs::statat(&fd, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)?;
            out.push((
                String::from_utf8_lossy(name).into_owned(),
                Meta::from_stat(&st),
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn canonical(&self, path: &str) -> io::Result<String> {
        let fd = self.open_at(path, OFlags::PATH)?;
        let host = std::fs::read_link(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            fd.as_raw_fd()
        }))?;
        let root = std::fs::read_link(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            self.fd.as_raw_fd()
        }))?;
        let inside = host
            .strip_prefix(&root)
            .map_err(|_| io::Error::other(format!("{path} resolved outside the root")))?;
        Ok(format!("/{}", inside.to_string_lossy()))
    }
}

/// The running system this process is on.
#[derive(Debug)]
pub struct LiveView;

impl FsView for LiveView {
    fn describe(&self) -> String {
        "live host".to_string()
    }

    fn metadata(&self, path: &str) -> io::Result<Meta> {
        Ok(Meta::from_std(&std::fs::metadata(path)?))
    }

    fn symlink_metadata(&self, path: &str) -> io::Result<Meta> {
        Ok(Meta::from_std(&std::fs::symlink_metadata(path)?))
    }

    fn read_link(&self, path: &str) -> io::Result<String> {
        Ok(std::fs::read_link(path)?.to_string_lossy().into_owned())
    }

    fn read(&self, path: &str, max: u64) -> io::Result<(Vec<u8>, bool)> {
        let meta = self.metadata(path)?;
        if meta.kind != Kind::File {
            return Err(not_regular(path, meta.kind));
        }
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        let meta = Meta::from_std(&f.metadata()?);
        if meta.kind != Kind::File {
            return Err(not_regular(path, meta.kind));
        }
        read_bounded(f, max)
    }

    fn read_dir(&self, path: &str) -> io::Result<Vec<(String, Meta)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(path)? {
            let e = e?;
            let md = e.metadata()?;
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                Meta::from_std(&md),
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn canonical(&self, path: &str) -> io::Result<String> {
        Ok(std::fs::canonicalize(path)?.to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, TreeView) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("etc/d")).unwrap();
        std::fs::write(r.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        symlink("/etc/passwd", r.join("etc/abs")).unwrap();
        symlink("../../../../../../../etc/hostname", r.join("etc/escape")).unwrap();
        symlink("loop2", r.join("etc/loop1")).unwrap();
        symlink("loop1", r.join("etc/loop2")).unwrap();
        let v = TreeView::open(r).unwrap();
        (d, v)
    }

    #[test]
    fn the_tree_view_stays_inside_its_root() {
        let (d, v) = tree();
        assert_eq!(
            v.read("/etc/abs", 100).unwrap().0,
            b"root:x:0:0::/root:/bin/sh\n"
        );
        // The host's /etc/hostname exists; the tree's does not.
        let e = v.read("/etc/escape", 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert_eq!(v.canonical("/etc/abs").unwrap(), "/etc/passwd");
        assert!(v.symlink_metadata("/etc/abs").unwrap().is_symlink());
        assert_eq!(v.read_link("/etc/abs").unwrap(), "/etc/passwd");
        let e = v.read("/etc/loop1", 100).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        let names: Vec<String> = v
            .read_dir("/etc")
            .unwrap()
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(names, ["abs", "d", "escape", "loop1", "loop2", "passwd"]);
        drop(d);
    }

    #[test]
    fn reads_are_bounded_and_of_regular_files_only() {
        let (d, v) = tree();
        let fifo = d.path().join("etc/fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let e = v.read("/etc/fifo", 100).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        // A sparse file of 4 GiB: only the bytes asked for are read.
        let big = std::fs::File::create(d.path().join("etc/big")).unwrap();
        big.set_len(4 << 30).unwrap();
        let (bytes, more) = v.read("/etc/big", 1024).unwrap();
        assert_eq!((bytes.len(), more), (1024, true));
        let (bytes, more) = v.read("/etc/passwd", 1024).unwrap();
        assert_eq!((bytes.len(), more), (26, false));
        assert!(
            v.read("/etc/d", 10)
                .unwrap_err()
                .to_string()
                .contains("directory")
        );
        // The live view refuses the same FIFO.
        let e = LiveView.read(fifo.to_str().unwrap(), 100).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
    }
}
