//! A disk image file as a scan target, read in userspace: no mount, no
//! loop device, no root. The GPT (the `gpt` crate) gives the partitions;
//! each ext4 partition is read with `ext4-view` through a reader that
//! never leaves the partition's byte range; the image's own /etc/fstab
//! says where each one is mounted, so /var, /var/log, /tmp and the rest
//! read from their partitions as on the booted system. Symlinks are
//! resolved here, component by component across the mounts, with the
//! kernel's limit of 40, so none can leave the image.
//!
//! A qcow2 image is read through its own format ([`super::qcow2`]): only
//! the clusters the scan needs are read and inflated. A VMDK is first
//! converted by `qemu-img` into a sparse raw file in a private temporary
//! directory (no maintained crate reads streamOptimized VMDK).
//!
//! `ext4_view::Ext4` is single-threaded (it shares its block cache by
//! `Rc`), while a view is shared between threads; one worker thread owns
//! every mounted file system and answers the view's calls in turn.

use super::target::{MAX_HOPS, split};
use super::view::{FsView, Kind, Meta};
use crate::exec;
use anyhow::{Context, Result, bail};
use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;

/// The most directory entries read from one directory.
const MAX_ENTRIES: usize = 1_000_000;

/// The most GPT partition entries read (partitioning tools write 128).
const MAX_GPT_ENTRIES: u32 = 16_384;

/// The thread that owns the mounted file systems.
const WORKER: &str = "image-view";

/// What the image holds, in the order found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Layout {
    /// `raw`, `qcow2` or `vmdk`.
    pub format: String,
    /// Mount point, file system and where it came from.
    pub mounts: Vec<(String, String)>,
    /// Partitions and fstab lines not read, and why.
    pub notes: Vec<String>,
}

/// The guest disk: a raw file, or a qcow2 read cluster by cluster.
#[derive(Debug)]
enum Disk {
    Raw(std::fs::File, u64),
    Qcow2(super::qcow2::Qcow2),
}

impl Disk {
    fn len(&self) -> u64 {
        match self {
            Disk::Raw(_, len) => *len,
            Disk::Qcow2(q) => q.size,
        }
    }

    fn read_at(&mut self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        match self {
            Disk::Raw(f, _) => {
                use std::os::unix::fs::FileExt;
                f.read_exact_at(dst, offset)
            }
            Disk::Qcow2(q) => q.read_at(offset, dst),
        }
    }
}

type SharedDisk = std::rc::Rc<std::cell::RefCell<Disk>>;

/// The disk as a seekable device for the `gpt` crate (reads only).
#[derive(Debug)]
struct Device {
    disk: SharedDisk,
    pos: u64,
}

impl Read for Device {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = self.disk.borrow().len();
        let n = (len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.disk.borrow_mut().read_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Device {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let len = self.disk.borrow().len() as i128;
        let next = match to {
            SeekFrom::Start(n) => n as i128,
            SeekFrom::End(d) => len + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if next < 0 {
            return Err(io::Error::other("seek before the start of the disk"));
        }
        self.pos = next as u64;
        Ok(self.pos)
    }
}

impl io::Write for Device {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("the image is read only"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A partition of the disk as ext4-view's data source: reads are
/// bounded by the partition.
struct Partition {
    disk: SharedDisk,
    start: u64,
    len: u64,
}

impl Ext4Read for Partition {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        start_byte
            .checked_add(dst.len() as u64)
            .filter(|e| *e <= self.len)
            .ok_or_else(|| {
                format!(
                    "read of {} bytes at {start_byte} beyond the partition's {} bytes",
                    dst.len(),
                    self.len
                )
            })?;
        self.disk
            .borrow_mut()
            .read_at(self.start + start_byte, dst)?;
        Ok(())
    }
}

struct Mount {
    point: String,
    fs: Ext4,
}

/// The mounted file systems, longest mount point first.
struct Mounts(Vec<Mount>);

fn err_io(e: Ext4Error, path: &str) -> io::Error {
    let kind = match e {
        Ext4Error::NotFound => io::ErrorKind::NotFound,
        Ext4Error::NotADirectory => io::ErrorKind::NotADirectory,
        Ext4Error::IsADirectory => io::ErrorKind::IsADirectory,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{path}: {e}"))
}

/// The longest symlink target read (the kernel's PATH_MAX).
const MAX_LINK: u64 = 4096;

/// The target of the symlink `inner` of `fs`, whose metadata is `md`.
/// ext4-view sizes its buffer for a target kept in data blocks from the
/// inode's size, which a damaged image can set to terabytes: a longer
/// target than the kernel allows is refused first.
fn link_target(
    fs: &Ext4,
    inner: &str,
    md: &ext4_view::Metadata,
    shown: &str,
) -> io::Result<ext4_view::PathBuf> {
    if md.len() > MAX_LINK {
        return Err(io::Error::other(format!(
            "{shown}: a symlink target of {} bytes (at most {MAX_LINK})",
            md.len()
        )));
    }
    fs.read_link(inner).map_err(|e| err_io(e, shown))
}

/// `/etc/fstab` of one file system, read as the view reads files:
/// symlinks resolved here, at most [`super::target::MAX_READ`] bytes
/// (ext4-view's own `read_to_string` sizes its buffer from the inode).
fn read_fstab(fs: &Ext4) -> io::Result<String> {
    let one = Mounts(vec![Mount {
        point: "/".into(),
        fs: fs.clone(),
    }]);
    let (bytes, more) = one.read("/etc/fstab", super::target::MAX_READ)?;
    if more {
        return Err(io::Error::other(format!(
            "/etc/fstab is larger than {} MiB",
            super::target::MAX_READ >> 20
        )));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The most block groups an ext4 superblock may claim: 2^20 groups hold
/// 128 TiB with 4 KiB blocks.
const MAX_BLOCK_GROUPS: u64 = 1 << 20;

/// Refuse an ext4 superblock whose blocks the partition cannot hold, or
/// with more block groups than [`MAX_BLOCK_GROUPS`]: ext4-view allocates
/// a descriptor for every group the superblock claims before it reads
/// one. Also the fields ext4-view trusts where the kernel checks them:
/// blocks per group (it divides by it) and, on a 64-bit file system, the
/// descriptor size (it reads 64-bit fields past a shorter one). What is
/// not ext4 at all is left to ext4-view to say.
fn check_superblock(part: &mut Partition) -> std::result::Result<(), String> {
    use crate::ext4::*;
    let mut sb = [0u8; 1024];
    if part.read(SUPERBLOCK_AT, &mut sb).is_err() || le16(&sb, MAGIC) != MAGIC_VALUE {
        return Ok(());
    }
    let le32 = |o: usize| le32(&sb, o);
    let log_block = le32(LOG_BLOCK_SIZE);
    if log_block > 6 {
        return Err(format!(
            "ext4 blocks of 2^{} bytes",
            u64::from(log_block) + 10
        ));
    }
    let block = 1024u64 << log_block;
    // As ext4-view counts them: the high half whatever the features say.
    let blocks = u64::from(le32(BLOCKS_COUNT_HI)) << 32 | u64::from(le32(BLOCKS_COUNT_LO));
    if blocks.checked_mul(block).is_none_or(|b| b > part.len) {
        return Err(format!(
            "the superblock claims {blocks} blocks of {block} bytes; the partition has {} bytes",
            part.len
        ));
    }
    let per_group = u64::from(le32(BLOCKS_PER_GROUP));
    if per_group == 0 {
        return Err("the superblock gives block groups of 0 blocks".into());
    }
    let groups = blocks
        .saturating_sub(u64::from(le32(FIRST_DATA_BLOCK)))
        .div_ceil(per_group);
    if groups > MAX_BLOCK_GROUPS {
        return Err(format!(
            "the superblock claims {groups} block groups (at most {MAX_BLOCK_GROUPS} are read)"
        ));
    }
    let desc_size = le16(&sb, DESC_SIZE);
    let is_64bit = le32(INCOMPAT) & INCOMPAT_64BIT != 0;
    if is_64bit && !(desc_size.is_power_of_two() && (64..=1024).contains(&desc_size)) {
        return Err(format!(
            "a 64-bit file system with group descriptors of {desc_size} bytes"
        ));
    }
    Ok(())
}

fn kind_of(t: FileType) -> Kind {
    if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Symlink
    } else if t.is_regular_file() {
        Kind::File
    } else if t.is_fifo() {
        Kind::Fifo
    } else if t.is_socket() {
        Kind::Socket
    } else if t.is_char_dev() {
        Kind::CharDevice
    } else {
        Kind::BlockDevice
    }
}

fn meta(m: &ext4_view::Metadata) -> Meta {
    Meta {
        kind: kind_of(m.file_type()),
        mode: u32::from(m.mode()) & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: m.len(),
    }
}

fn join(comps: &[String]) -> String {
    format!("/{}", comps.join("/"))
}

impl Mounts {
    /// The file system that holds the absolute, symlink-free `path`, and
    /// the path inside it.
    fn locate(&self, path: &str) -> (&Ext4, String) {
        for m in &self.0 {
            let inner = if m.point == "/" {
                Some(path)
            } else if path == m.point {
                Some("/")
            } else {
                path.strip_prefix(&m.point).filter(|r| r.starts_with('/'))
            };
            if let Some(inner) = inner {
                let inner = if inner.is_empty() { "/" } else { inner };
                return (&m.fs, inner.to_string());
            }
        }
        unreachable!("the root file system is always mounted")
    }

    fn lstat(&self, path: &str) -> io::Result<ext4_view::Metadata> {
        let (fs, inner) = self.locate(path);
        fs.symlink_metadata(inner.as_str())
            .map_err(|e| err_io(e, path))
    }

    /// `path` with its symlinks resolved across the mounts; the last
    /// component too when `follow_last`.
    fn resolve(&self, path: &str, follow_last: bool) -> io::Result<String> {
        let mut done: Vec<String> = Vec::new();
        let mut todo: Vec<String> = split(path).into_iter().rev().collect();
        let mut hops = 0;
        while let Some(comp) = todo.pop() {
            match comp.as_str() {
                "." => continue,
                ".." => {
                    done.pop();
                    continue;
                }
                _ => {}
            }
            let mut candidate = done.clone();
            candidate.push(comp.clone());
            let p = join(&candidate);
            let is_last = todo.is_empty();
            let md = match self.lstat(&p) {
                Ok(md) => md,
                // A missing component: the caller's lookup reports it.
                Err(_) => {
                    done.push(comp);
                    continue;
                }
            };
            if md.is_symlink() && (!is_last || follow_last) {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(io::Error::other(format!(
                        "{path}: too many levels of symbolic links"
                    )));
                }
                let (fs, inner) = self.locate(&p);
                let link = link_target(fs, &inner, &md, &p)?;
                let link = link
                    .to_str()
                    .map_err(|_| io::Error::other(format!("{p}: symlink target is not UTF-8")))?;
                if link.starts_with('/') {
                    done.clear();
                }
                for c in split(link).into_iter().rev() {
                    todo.push(c);
                }
            } else {
                done = candidate;
            }
        }
        Ok(join(&done))
    }

    /// Metadata of a resolved path; a mount point shows its mounted
    /// file system's root, as on the running system.
    fn stat_resolved(&self, path: &str) -> io::Result<Meta> {
        self.lstat(path).map(|m| meta(&m))
    }

    fn read(&self, path: &str, max: u64) -> io::Result<(Vec<u8>, bool)> {
        let p = self.resolve(path, true)?;
        let md = self.stat_resolved(&p)?;
        if md.kind != Kind::File {
            return Err(io::Error::other(format!(
                "{path}: a {}, not a regular file",
                md.kind.name()
            )));
        }
        let (fs, inner) = self.locate(&p);
        let mut f = fs.open(inner.as_str()).map_err(|e| err_io(e, path))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = f.read_bytes(&mut buf).map_err(|e| err_io(e, path))?;
            if n == 0 {
                return Ok((out, false));
            }
            out.extend_from_slice(&buf[..n]);
            if out.len() as u64 > max {
                out.truncate(max as usize);
                return Ok((out, true));
            }
        }
    }

    fn read_dir(&self, path: &str) -> io::Result<Vec<(String, Meta)>> {
        let p = self.resolve(path, true)?;
        let (fs, inner) = self.locate(&p);
        let mut out = Vec::new();
        for entry in fs.read_dir(inner.as_str()).map_err(|e| err_io(e, path))? {
            let entry = entry.map_err(|e| err_io(e, path))?;
            let name = entry.file_name();
            let Ok(name) = name.as_str() else {
                // Names that are not UTF-8 cannot be asked for again;
                // shown lossily, as the tree view does.
                let lossy = format!("{}", name.display());
                let md = entry.metadata().map_err(|e| err_io(e, path))?;
                out.push((lossy, meta(&md)));
                continue;
            };
            if name == "." || name == ".." {
                continue;
            }
            let child = if p == "/" {
                format!("/{name}")
            } else {
                format!("{p}/{name}")
            };
            // A mount point lists as its mounted root.
            let md = if self.0.iter().any(|m| m.point == child) {
                self.stat_resolved(&child)?
            } else {
                meta(&entry.metadata().map_err(|e| err_io(e, &child))?)
            };
            out.push((name.to_string(), md));
            if out.len() > MAX_ENTRIES {
                return Err(io::Error::other(format!(
                    "{path}: more than {MAX_ENTRIES} entries"
                )));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

type Job = Box<dyn FnOnce(&Mounts) + Send>;

/// The view over an image's file systems (see the module's notes).
pub struct ImageView {
    image: PathBuf,
    jobs: Mutex<mpsc::Sender<Job>>,
    pub layout: Layout,
    /// The converted raw file, removed with the view.
    _scratch: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for ImageView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageView({})", self.image.display())
    }
}

/// Run `f`, with a panic turned into an error. The GPT and ext4 readers
/// parse untrusted bytes; where one of them trips over damaged data (a
/// division by zero on a zeroed superblock field, say), that is the
/// image's error, not the end of the scan. The worker thread's panics are
/// not printed (see [`quiet_worker_panics`]): their message is here.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        format!("the image's data is damaged: its reader failed ({why})")
    })
}

/// Keep the default panic output for every thread but the image worker,
/// whose panics [`guarded`] reports as errors.
fn quiet_worker_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(WORKER) {
                previous(info);
            }
        }));
    });
}

impl ImageView {
    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Mounts) -> io::Result<R> + Send + 'static,
    ) -> io::Result<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |m| {
            let r = guarded(|| f(m)).unwrap_or_else(|why| Err(io::Error::other(why)));
            let _ = tx.send(r);
        });
        let stopped = || io::Error::other("the image reader stopped");
        self.jobs
            .lock()
            .expect("image worker lock")
            .send(job)
            .map_err(|_| stopped())?;
        rx.recv().unwrap_or_else(|_| Err(stopped()))
    }

    /// Open `image` (raw, qcow2 or streamOptimized/sparse VMDK).
    pub fn open(image: &Path) -> Result<ImageView> {
        let format = sniff(image)?;
        let (raw, scratch) = if format != "vmdk" {
            (image.to_path_buf(), None)
        } else {
            let dir = tempfile::Builder::new()
                .prefix("stemforge-scan-")
                .tempdir()
                .context("making a scratch directory for the converted image")?;
            let raw = dir.path().join("disk.raw");
            let args: [&std::ffi::OsStr; 7] = [
                "convert".as_ref(),
                "-f".as_ref(),
                format.as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                image.as_os_str(),
                raw.as_os_str(),
            ];
            exec::cmd("qemu-img", args)
                .timeout(std::time::Duration::from_secs(600))
                .run()
                .with_context(|| format!("converting the {format} image to raw"))?;
            (raw, Some(dir))
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let raw2 = raw.clone();
        let qcow = format == "qcow2";
        quiet_worker_panics();
        std::thread::Builder::new()
            .name(WORKER.into())
            .spawn(move || match guarded(|| assemble(&raw2, qcow)) {
                Err(why) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!(why)));
                }
                Ok(Ok((mounts, mut layout))) => {
                    layout.format = String::new();
                    let _ = ready_tx.send(Ok(layout));
                    for job in rx {
                        job(&mounts);
                    }
                }
                Ok(Err(e)) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .context("starting the image reader")?;
        let mut layout = ready_rx.recv().context("the image reader stopped")??;
        layout.format = format;
        Ok(ImageView {
            image: image.to_path_buf(),
            jobs: Mutex::new(tx),
            layout,
            _scratch: scratch,
        })
    }
}

/// `raw`, `qcow2` or `vmdk`, by the file's magic.
fn sniff(image: &Path) -> Result<String> {
    // Look before opening: opening a FIFO for reading blocks until a
    // writer comes, and opening a device can have effects.
    let md = std::fs::metadata(image)
        .with_context(|| format!("opening the image {}", image.display()))?;
    if !md.is_file() {
        bail!("not a regular file");
    }
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(image)
        .with_context(|| format!("opening the image {}", image.display()))?;
    if !f.metadata()?.is_file() {
        bail!("not a regular file");
    }
    let mut head = [0u8; 4];
    let n = f.read(&mut head)?;
    Ok(match &head[..n] {
        b"QFI\xfb" => "qcow2",
        b"KDMV" => "vmdk",
        _ => "raw",
    }
    .to_string())
}

/// Open every ext4 partition, find the root by its fstab, mount the
/// rest where the fstab says.
fn assemble(file: &Path, qcow: bool) -> Result<(Mounts, Layout)> {
    let f = std::fs::File::open(file).context("opening the image")?;
    let disk = if qcow {
        Disk::Qcow2(super::qcow2::Qcow2::open(f)?)
    } else {
        let len = f.metadata().context("reading its size")?.len();
        Disk::Raw(f, len)
    };
    let size = disk.len();
    let disk: SharedDisk = std::rc::Rc::new(std::cell::RefCell::new(disk));
    check_gpt_header(&disk)?;
    let device = Device {
        disk: disk.clone(),
        pos: 0,
    };
    let table = gpt::GptConfig::new()
        .writable(false)
        .open_from_device(device)
        .map_err(|e| anyhow::anyhow!("no valid GPT partition table: {e}"))?;
    let lb = u64::from(*table.logical_block_size());
    let mut notes = Vec::new();
    let mut filesystems: Vec<(u32, Ext4, String, String)> = Vec::new();
    for (n, p) in table.partitions() {
        let start = p.first_lba.checked_mul(lb);
        let end = p.last_lba.checked_add(1).and_then(|l| l.checked_mul(lb));
        let (Some(start), Some(end)) = (start, end) else {
            bail!("partition {n} has impossible bounds");
        };
        if end > size || start >= end {
            bail!("partition {n} claims bytes {start}..{end}, but the image has {size} bytes");
        }
        let mut part = Partition {
            disk: disk.clone(),
            start,
            len: end - start,
        };
        if let Err(why) = check_superblock(&mut part) {
            notes.push(format!("partition {n} ({}): not read ({why})", p.name));
            continue;
        }
        match Ext4::load(Box::new(part)) {
            Ok(fs) => {
                let uuid = fs.uuid().to_string().to_ascii_lowercase();
                let label = fs.label().to_str().unwrap_or("").to_string();
                filesystems.push((*n, fs, uuid, label));
            }
            Err(e) => notes.push(format!("partition {n} ({}): not ext4 ({e})", p.name)),
        }
    }
    let root = filesystems.iter().position(|(_, fs, uuid, _)| {
        read_fstab(fs).is_ok_and(|t| {
            fstab(&t).iter().any(|(spec, point, fstype)| {
                point == "/" && fstype != "swap" && matches_spec(spec, uuid, "", "")
            })
        })
    });
    let Some(root) = root else {
        // Why the partitions were not read is the news of a damaged image.
        let why = if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        };
        bail!(
            "no ext4 partition holds an /etc/fstab that mounts it as / ({} ext4 file systems found{why})",
            filesystems.len()
        );
    };
    let fstab_lines =
        fstab(&read_fstab(&filesystems[root].1).map_err(|e| anyhow::anyhow!("/etc/fstab: {e}"))?);
    let mut mounts = Vec::new();
    let mut layout = Layout {
        format: String::new(),
        mounts: Vec::new(),
        notes,
    };
    for (spec, point, fstype) in &fstab_lines {
        if !point.starts_with('/') || fstype == "swap" {
            continue;
        }
        let found = filesystems.iter().find(|(n, _, uuid, label)| {
            let partuuid = table
                .partitions()
                .get(n)
                .map(|p| p.part_guid.to_string())
                .unwrap_or_default();
            matches_spec(spec, uuid, label, &partuuid)
        });
        match found {
            Some((n, fs, uuid, _)) => {
                mounts.push(Mount {
                    point: point.clone(),
                    fs: fs.clone(),
                });
                layout
                    .mounts
                    .push((point.clone(), format!("ext4 partition {n} (UUID {uuid})")));
            }
            None => layout.notes.push(format!(
                "fstab: {spec} on {point} ({fstype}) is not an ext4 partition of the image; the directory beneath shows"
            )),
        }
    }
    mounts.sort_by_key(|m| std::cmp::Reverse(m.point.len()));
    Ok((Mounts(mounts), layout))
}

/// Check the GPT header the `gpt` crate will use (the primary one, else
/// the backup in the disk's last sector, whichever has a valid CRC) where
/// the crate trusts it: it asserts 128-byte entries, and it reads the
/// claimed entries one by one and allocates them whole (2^32 of them on a
/// large sparse disk: hours, and 512 GiB).
fn check_gpt_header(disk: &SharedDisk) -> Result<()> {
    let len = disk.borrow().len();
    let mut headers = vec![512];
    if len >= 3 * 512 {
        headers.push((len - 512) / 512 * 512);
    }
    for at in headers {
        let mut h = [0u8; 92];
        if at + 92 > len || disk.borrow_mut().read_at(at, &mut h).is_err() {
            continue;
        }
        let le32 = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
        if &h[..8] != b"EFI PART" {
            continue;
        }
        let stored = le32(16);
        let mut zeroed = h;
        zeroed[16..20].fill(0);
        let mut crc = flate2::Crc::new();
        crc.update(&zeroed);
        if crc.sum() != stored {
            continue;
        }
        let (count, size) = (le32(80), le32(84));
        let start = u64::from_le_bytes(h[72..80].try_into().expect("8 bytes"));
        if size != 128 {
            bail!(
                "the GPT header at byte {at} gives partition entries of {size} bytes (GPT's are 128)"
            );
        }
        if count > MAX_GPT_ENTRIES {
            bail!(
                "the GPT header at byte {at} claims {count} partition entries (at most {MAX_GPT_ENTRIES} are read)"
            );
        }
        let end = start
            .checked_mul(512)
            .and_then(|s| s.checked_add(u64::from(count) * 128));
        if end.is_none_or(|e| e > len) {
            bail!(
                "the GPT header at byte {at} puts its partition entries beyond the end of the {len}-byte disk"
            );
        }
        return Ok(());
    }
    Ok(())
}

/// (spec, mount point, type) of each fstab line.
fn fstab(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.to_string(),
                f.get(1)?.to_string(),
                f.get(2).unwrap_or(&"auto").to_string(),
            ))
        })
        .collect()
}

fn matches_spec(spec: &str, uuid: &str, label: &str, partuuid: &str) -> bool {
    if let Some(u) = spec.strip_prefix("UUID=") {
        return u.eq_ignore_ascii_case(uuid);
    }
    if let Some(l) = spec.strip_prefix("LABEL=") {
        return !label.is_empty() && l == label;
    }
    if let Some(p) = spec.strip_prefix("PARTUUID=") {
        return !partuuid.is_empty() && p.eq_ignore_ascii_case(partuuid);
    }
    false
}

impl FsView for ImageView {
    fn describe(&self) -> String {
        format!("disk image {}", self.image.display())
    }

    fn metadata(&self, path: &str) -> io::Result<Meta> {
        let path = path.to_string();
        self.call(move |m| {
            let p = m.resolve(&path, true)?;
            m.stat_resolved(&p)
        })
    }

    fn symlink_metadata(&self, path: &str) -> io::Result<Meta> {
        let path = path.to_string();
        self.call(move |m| {
            let p = m.resolve(&path, false)?;
            m.stat_resolved(&p)
        })
    }

    fn read_link(&self, path: &str) -> io::Result<String> {
        let path = path.to_string();
        self.call(move |m| {
            let p = m.resolve(&path, false)?;
            let md = m.lstat(&p)?;
            let (fs, inner) = m.locate(&p);
            let link = link_target(fs, &inner, &md, &path)?;
            Ok(link.display().to_string())
        })
    }

    fn read(&self, path: &str, max: u64) -> io::Result<(Vec<u8>, bool)> {
        let path = path.to_string();
        self.call(move |m| m.read(&path, max))
    }

    fn read_dir(&self, path: &str) -> io::Result<Vec<(String, Meta)>> {
        let path = path.to_string();
        self.call(move |m| m.read_dir(&path))
    }

    fn canonical(&self, path: &str) -> io::Result<String> {
        let path = path.to_string();
        self.call(move |m| {
            let p = m.resolve(&path, true)?;
            m.stat_resolved(&p)?;
            Ok(p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_specs_match_by_uuid_label_or_partuuid() {
        let t = fstab(
            "# c\nUUID=ABCD-1 / ext4 defaults 0 1\nLABEL=audit /var/log/audit ext4 x 0 2\ntmpfs /dev/shm tmpfs x 0 0\n",
        );
        assert_eq!(t.len(), 3);
        assert!(matches_spec(&t[0].0, "abcd-1", "", ""));
        assert!(matches_spec(&t[1].0, "x", "audit", ""));
        assert!(!matches_spec(&t[2].0, "x", "", ""));
        assert!(matches_spec("PARTUUID=AA", "", "", "aa"));
    }

    #[test]
    fn what_is_not_a_gpt_disk_is_refused_clearly() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x.raw");
        std::fs::write(&f, vec![0u8; 1 << 20]).unwrap();
        let e = ImageView::open(&f).unwrap_err();
        assert!(format!("{e:#}").contains("no valid GPT"), "{e:#}");
        let e = ImageView::open(&d.path().join("missing.raw")).unwrap_err();
        assert!(format!("{e:#}").contains("missing.raw"), "{e:#}");
    }
}
