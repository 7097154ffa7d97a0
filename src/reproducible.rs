//! Bit-for-bit reproducible images. Every identifier an image carries (disk
//! and partition GUIDs, file-system UUIDs, the directory hash seed, the FAT
//! volume id, GRUB's lock) is derived from the build's inputs; every time
//! it carries is SOURCE_DATE_EPOCH or older. This module holds the
//! derivations, the ext4 inode-time fix-up after mke2fs, and the
//! comparisons `build --check-reproducible` prints when two builds differ.

use crate::formats::manifest::sha256_file;
use anyhow::{Context, Result, ensure};
use sha2::{Digest, Sha256, Sha512};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use uuid::Uuid;

/// A UUID derived from the build's seed and what it names: SHA-256 over
/// both, marked as an RFC 9562 version 8 ("custom") UUID.
pub fn derived_uuid(seed: &str, label: &str) -> Uuid {
    let d = Sha256::digest(format!("stemforge\0{seed}\0{label}").as_bytes());
    let mut b: [u8; 16] = d[..16].try_into().expect("32 bytes");
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    Uuid::from_bytes(b)
}

/// 64 bytes derived from the build's seed and what they are for.
pub fn derived_bytes(seed: &str, label: &str) -> [u8; 64] {
    Sha512::digest(format!("stemforge\0{seed}\0{label}").as_bytes()).into()
}

/// ext4 as the kernel checksums it: CRC-32C without the final inversion,
/// chained from `seed`.
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

use crate::ext4::{
    CHECKSUM_SEED, DESC_SIZE, FIRST_DATA_BLOCK, INCOMPAT, INCOMPAT_64BIT, INCOMPAT_CSUM_SEED,
    INODE_SIZE, INODES_COUNT, INODES_PER_GROUP, LOG_BLOCK_SIZE, MAGIC, MAGIC_VALUE, REV_LEVEL,
    RO_COMPAT, RO_COMPAT_METADATA_CSUM, SUPERBLOCK_AT, UUID, le16, le32,
};

// Group descriptor and inode fields the time fix-up touches.
const BG_INODE_UNINIT: u16 = 0x1;
const I_ATIME: usize = 0x08;
const I_CTIME: usize = 0x0c;
const I_MTIME: usize = 0x10;
const I_GENERATION: usize = 0x64;
const I_CHECKSUM_LO: usize = 0x7c;
const I_EXTRA_ISIZE: usize = 0x80;
const I_CHECKSUM_HI: usize = 0x82;
const I_CTIME_EXTRA: usize = 0x84;
const I_MTIME_EXTRA: usize = 0x88;
const I_ATIME_EXTRA: usize = 0x8c;
const I_CRTIME: usize = 0x90;
const I_CRTIME_EXTRA: usize = 0x94;

fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// Give every inode of the ext4 file system in `image` the times a
/// reproducible build needs: access, change and creation time
/// `epoch`, modification time clamped to `epoch`; then checksum it again.
/// Returns how many inodes it set.
///
/// Written here because mke2fs before 1.47.1 copies each file's access and
/// change times from the source tree (times of this build's copy, never
/// the same twice) and has no SOURCE_DATE_EPOCH clamping; debugfs can set
/// one field of one inode per command. No crate edits ext4 in place.
pub fn fix_ext4_times(image: &Path, epoch: u32) -> Result<u64> {
    let f = File::options()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let mut sb = vec![0u8; 1024];
    f.read_exact_at(&mut sb, SUPERBLOCK_AT)
        .with_context(|| format!("reading the superblock of {}", image.display()))?;
    ensure!(
        le16(&sb, MAGIC) == MAGIC_VALUE,
        "{} is not an ext4 file system",
        image.display()
    );
    let block = 1024u64 << le32(&sb, LOG_BLOCK_SIZE).min(6);
    let per_group = le32(&sb, INODES_PER_GROUP) as u64;
    let inode_size = if le32(&sb, REV_LEVEL) == 0 {
        128
    } else {
        le16(&sb, INODE_SIZE) as usize
    };
    ensure!(
        per_group > 0 && (128..=4096).contains(&inode_size),
        "{}: implausible inode geometry",
        image.display()
    );
    let incompat = le32(&sb, INCOMPAT);
    let csum = le32(&sb, RO_COMPAT) & RO_COMPAT_METADATA_CSUM != 0;
    let desc_size = if incompat & INCOMPAT_64BIT != 0 {
        (le16(&sb, DESC_SIZE) as usize).max(32)
    } else {
        32
    };
    let fs_seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
        le32(&sb, CHECKSUM_SEED)
    } else {
        crc32c_raw(!0, &sb[UUID..UUID + 16])
    };
    let groups = (le32(&sb, INODES_COUNT) as u64).div_ceil(per_group);
    let gdt_at = (le32(&sb, FIRST_DATA_BLOCK) as u64 + 1) * block;
    let mut descs = vec![0u8; groups as usize * desc_size];
    f.read_exact_at(&mut descs, gdt_at)
        .with_context(|| format!("reading the group descriptors of {}", image.display()))?;
    let mut bitmap = vec![0u8; per_group.div_ceil(8) as usize];
    let mut table = vec![0u8; per_group as usize * inode_size];
    let mut fixed = 0u64;
    for g in 0..groups as usize {
        let d = &descs[g * desc_size..(g + 1) * desc_size];
        if le16(d, 0x12) & BG_INODE_UNINIT != 0 {
            continue;
        }
        let hi = |o: usize| {
            if desc_size >= 64 {
                (le32(d, o) as u64) << 32
            } else {
                0
            }
        };
        let bitmap_at = (le32(d, 0x04) as u64 | hi(0x24)) * block;
        let table_at = (le32(d, 0x08) as u64 | hi(0x28)) * block;
        f.read_exact_at(&mut bitmap, bitmap_at)
            .with_context(|| format!("reading inode bitmap {g} of {}", image.display()))?;
        f.read_exact_at(&mut table, table_at)
            .with_context(|| format!("reading inode table {g} of {}", image.display()))?;
        let mut changed = false;
        for i in 0..per_group as usize {
            if bitmap[i / 8] & (1 << (i % 8)) == 0 {
                continue;
            }
            let ino = g as u32 * per_group as u32 + i as u32 + 1;
            let raw = &mut table[i * inode_size..(i + 1) * inode_size];
            if set_inode_times(raw, inode_size, epoch) {
                if csum {
                    checksum_inode(raw, inode_size, fs_seed, ino);
                }
                changed = true;
                fixed += 1;
            }
        }
        if changed {
            f.write_all_at(&table, table_at)
                .with_context(|| format!("writing inode table {g} of {}", image.display()))?;
        }
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", image.display()))?;
    Ok(fixed)
}

/// Set one inode's times; whether anything changed.
fn set_inode_times(raw: &mut [u8], inode_size: usize, epoch: u32) -> bool {
    let before = raw.to_vec();
    let extra = if inode_size > 128 {
        le16(raw, I_EXTRA_ISIZE) as usize
    } else {
        0
    };
    let has = |field: usize| field + 4 <= 128 + extra && field + 4 <= inode_size;
    // With the extra field, the top two bits of the extra word extend the
    // seconds past 2038: any of them set means later than `epoch`.
    let mtime_later =
        le32(raw, I_MTIME) > epoch || (has(I_MTIME_EXTRA) && le32(raw, I_MTIME_EXTRA) & 0x3 != 0);
    put32(raw, I_ATIME, epoch);
    put32(raw, I_CTIME, epoch);
    if mtime_later {
        put32(raw, I_MTIME, epoch);
        if has(I_MTIME_EXTRA) {
            put32(raw, I_MTIME_EXTRA, 0);
        }
    }
    for field in [I_CTIME_EXTRA, I_ATIME_EXTRA, I_CRTIME_EXTRA] {
        if has(field) {
            put32(raw, field, 0);
        }
    }
    if has(I_CRTIME) {
        put32(raw, I_CRTIME, epoch);
    }
    *raw != before[..]
}

/// The inode checksum (metadata_csum): CRC-32C seeded with the file
/// system's seed, the inode number and generation, over the inode with its
/// checksum fields zero.
fn checksum_inode(raw: &mut [u8], inode_size: usize, fs_seed: u32, ino: u32) {
    let has_hi = inode_size > 128 && le16(raw, I_EXTRA_ISIZE) >= 4;
    raw[I_CHECKSUM_LO..I_CHECKSUM_LO + 2].fill(0);
    if has_hi {
        raw[I_CHECKSUM_HI..I_CHECKSUM_HI + 2].fill(0);
    }
    let seed = crc32c_raw(fs_seed, &ino.to_le_bytes());
    let seed = crc32c_raw(seed, &raw[I_GENERATION..I_GENERATION + 4]);
    let c = crc32c_raw(seed, raw);
    raw[I_CHECKSUM_LO..I_CHECKSUM_LO + 2].copy_from_slice(&(c as u16).to_le_bytes());
    if has_hi {
        raw[I_CHECKSUM_HI..I_CHECKSUM_HI + 2].copy_from_slice(&((c >> 16) as u16).to_le_bytes());
    }
}

/// The first path at which two image trees differ, in sorted order, with
/// what differs; `None` when they are the same. Modification times compare
/// as the image stores them: clamped to `epoch`.
pub fn first_tree_difference(a: &Path, b: &Path, epoch: i64) -> Result<Option<String>> {
    compare_dir(a, b, Path::new("/"), epoch)
}

fn sorted_names(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    v.sort();
    Ok(v)
}

fn compare_dir(a: &Path, b: &Path, rel: &Path, epoch: i64) -> Result<Option<String>> {
    let (na, nb) = (sorted_names(a)?, sorted_names(b)?);
    let mut ia = na.iter().peekable();
    let mut ib = nb.iter().peekable();
    loop {
        let (x, y) = (ia.peek().copied(), ib.peek().copied());
        let name = match (x, y) {
            (None, None) => return Ok(None),
            (Some(x), Some(y)) if x == y => {
                ia.next();
                ib.next();
                x
            }
            (Some(x), Some(y)) if x < y => {
                return Ok(Some(format!(
                    "{}: only in the first build",
                    rel.join(x).display()
                )));
            }
            (Some(x), None) => {
                return Ok(Some(format!(
                    "{}: only in the first build",
                    rel.join(x).display()
                )));
            }
            (_, Some(y)) => {
                return Ok(Some(format!(
                    "{}: only in the second build",
                    rel.join(y).display()
                )));
            }
        };
        let (pa, pb, r) = (a.join(name), b.join(name), rel.join(name));
        if let Some(d) = compare_entry(&pa, &pb, &r, epoch)? {
            return Ok(Some(d));
        }
    }
}

fn compare_entry(a: &Path, b: &Path, rel: &Path, epoch: i64) -> Result<Option<String>> {
    let ma = a
        .symlink_metadata()
        .with_context(|| format!("stat {}", a.display()))?;
    let mb = b
        .symlink_metadata()
        .with_context(|| format!("stat {}", b.display()))?;
    let say = |what: String| Ok(Some(format!("{}: {what}", rel.display())));
    let clamp = |m: &std::fs::Metadata| m.mtime().min(epoch);
    if ma.mode() != mb.mode() {
        return say(format!("mode {:o} against {:o}", ma.mode(), mb.mode()));
    }
    if (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
        return say(format!(
            "owner {}:{} against {}:{}",
            ma.uid(),
            ma.gid(),
            mb.uid(),
            mb.gid()
        ));
    }
    if !ma.is_dir() && clamp(&ma) != clamp(&mb) {
        return say(format!(
            "modification time {} against {}",
            clamp(&ma),
            clamp(&mb)
        ));
    }
    let ft = ma.file_type();
    if ft.is_symlink() {
        let (ta, tb) = (std::fs::read_link(a)?, std::fs::read_link(b)?);
        if ta != tb {
            return say(format!(
                "links to {} against {}",
                ta.display(),
                tb.display()
            ));
        }
    } else if ft.is_file() {
        if ma.len() != mb.len() {
            return say(format!("{} bytes against {}", ma.len(), mb.len()));
        }
        if sha256_file(a)? != sha256_file(b)? {
            return say("contents differ".to_string());
        }
    } else if ft.is_dir() {
        if let Some(d) = compare_dir(a, b, rel, epoch)? {
            return Ok(Some(d));
        }
        if clamp(&ma) != clamp(&mb) {
            return say(format!(
                "modification time {} against {}",
                clamp(&ma),
                clamp(&mb)
            ));
        }
    } else if ma.rdev() != mb.rdev() {
        return say(format!("device {:x} against {:x}", ma.rdev(), mb.rdev()));
    }
    Ok(None)
}

/// Where two files first differ: the byte offset, or `None` when equal.
/// Reads both in 1 MiB blocks.
pub fn first_byte_difference(a: &Path, b: &Path) -> Result<Option<u64>> {
    use std::io::Read;
    let mut fa = File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let mut fb = File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).with_context(|| format!("reading {}", a.display()))?;
        let nb = read_full(&mut fb, &mut bb).with_context(|| format!("reading {}", b.display()))?;
        let n = na.min(nb);
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            return Ok(Some(at + i as u64));
        }
        if na != nb {
            return Ok(Some(at + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        at += n as u64;
    }

    fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
}

/// One output of both builds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Compared {
    pub file: String,
    pub first: String,
    pub second: String,
    pub equal: bool,
}

/// What `build --check-reproducible` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReproReport {
    pub source_date_epoch: i64,
    pub input_hash: String,
    pub outputs: Vec<Compared>,
    /// Where the two builds first differ: a path in the image tree, or a
    /// region of the disk.
    pub first_difference: Option<String>,
    pub reproducible: bool,
}

impl ReproReport {
    pub fn render(&self) -> String {
        let equal = self.outputs.iter().filter(|c| c.equal).count();
        let mut s = format!(
            "reproducible: {equal} of {} outputs equal (SOURCE_DATE_EPOCH={})\n",
            self.outputs.len(),
            self.source_date_epoch
        );
        for c in &self.outputs {
            if c.equal {
                s.push_str(&format!("  {}  equal    {}\n", c.first, c.file));
            } else {
                s.push_str(&format!(
                    "  {}  DIFFERS  {}\n  {}           (second build)\n",
                    c.first, c.file, c.second
                ));
            }
        }
        if let Some(d) = &self.first_difference {
            s.push_str(&format!("first difference: {d}\n"));
        }
        s
    }
}

/// Build twice from the same inputs (the second build into
/// `OUT/.reproduce`, without verify, with the first build's
/// SOURCE_DATE_EPOCH) and compare every output. The first build is the
/// build the user asked for; its outputs stay.
pub fn check(o: &crate::pipeline::BuildOptions) -> Result<(crate::pipeline::Built, ReproReport)> {
    use crate::pipeline;
    let mut first_opts = o.clone();
    first_opts.keep_work = true;
    let first = pipeline::build(&first_opts)?.context("a dry run builds nothing to compare")?;
    let plan = &first.plan;
    let work_of = |out: &Path| out.join(".work").join(&plan.name);
    let second_out = o.out_dir.join(".reproduce");
    let mut second_opts = o.clone();
    second_opts.out_dir = second_out.clone();
    second_opts.verify = false;
    second_opts.keep_work = true;
    // Every layer, the disk and the formats made again, not found.
    second_opts.layer_cache = false;
    second_opts.source_date_epoch = Some(plan.source_date_epoch);
    crate::progress::info("\nsecond build, to compare with the first");
    let result = (|| {
        let second = pipeline::build(&second_opts)?.context("the second build made nothing")?;
        // Each build's manifest has every output's sha256 already.
        let (sums_a, sums_b) = (
            manifest_sums(&o.out_dir, &plan.name)?,
            manifest_sums(&second_out, &plan.name)?,
        );
        let mut outputs = Vec::new();
        for a in &first.artifacts {
            let name = a
                .path
                .file_name()
                .context("outputs have names")?
                .to_string_lossy()
                .into_owned();
            let sum = |sums: &std::collections::BTreeMap<String, String>, dir: &Path| match sums
                .get(&name)
            {
                Some(s) => Ok(s.clone()),
                None => sha256_file(&dir.join(&name)),
            };
            let (x, y) = (sum(&sums_a, &o.out_dir)?, sum(&sums_b, &second_out)?);
            outputs.push(Compared {
                file: name,
                equal: x == y,
                first: x,
                second: y,
            });
        }
        ensure!(
            first.passed() == second.offline.passed(),
            "the two builds disagree on the offline scan"
        );
        let reproducible = outputs.iter().all(|c| c.equal);
        let first_difference = if reproducible {
            None
        } else {
            locate(
                &work_of(&o.out_dir),
                &work_of(&second_out),
                &o.out_dir,
                &second_out,
                plan,
            )?
        };
        Ok(ReproReport {
            source_date_epoch: plan.source_date_epoch,
            input_hash: plan.input_hash.clone(),
            outputs,
            first_difference,
            reproducible,
        })
    })();
    if !o.keep_work {
        crate::fsutil::remove_tree(&work_of(&o.out_dir))?;
        crate::fsutil::remove_tree(&second_out)?;
    }
    let report = result?;
    let json = serde_json::to_string_pretty(&report)? + "\n";
    crate::fsutil::write_atomic(
        &o.out_dir.join(format!("{}.reproducible.json", plan.name)),
        json.as_bytes(),
    )?;
    Ok((first, report))
}

/// file name → sha256 from a build's `NAME.manifest.json`.
fn manifest_sums(out: &Path, name: &str) -> Result<std::collections::BTreeMap<String, String>> {
    let path = out.join(format!("{name}.manifest.json"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let m: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(m["outputs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| {
            Some((
                o["file"].as_str()?.to_string(),
                o["sha256"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// The first difference between two builds: in their image trees, else
/// in their raw disks (the GPT or which partition, at which byte).
fn locate(
    work_a: &Path,
    work_b: &Path,
    out_a: &Path,
    out_b: &Path,
    plan: &crate::pipeline::Plan,
) -> Result<Option<String>> {
    if let Some(d) = first_tree_difference(
        &work_a.join("tree"),
        &work_b.join("tree"),
        plan.source_date_epoch,
    )? {
        return Ok(Some(format!("in the image tree: {d}")));
    }
    let raw_name = format!("{}.raw", plan.name);
    let raw = |work: &Path, out: &Path| {
        [out.join(&raw_name), work.join(&raw_name)]
            .into_iter()
            .find(|p| p.is_file())
    };
    let (Some(ra), Some(rb)) = (raw(work_a, out_a), raw(work_b, out_b)) else {
        return Ok(Some(
            "the trees are equal; the raw disks were not kept to compare".into(),
        ));
    };
    let Some(at) = first_byte_difference(&ra, &rb)? else {
        let hint = if crate::exec::which("diffoscope").is_some() {
            "; diffoscope OUTPUT OUT/.reproduce/OUTPUT (with --keep-work) shows where"
        } else {
            ""
        };
        return Ok(Some(format!(
            "the trees and raw disks are equal: a format's own bytes differ{hint}"
        )));
    };
    let part = plan
        .disk
        .partitions
        .iter()
        .find(|p| (p.offset()..p.offset() + p.size()).contains(&at));
    Ok(Some(match part {
        Some(p) => format!(
            "the trees are equal; the raw disks differ in partition {} ({}, {}) at byte {} of it",
            p.number,
            p.mount,
            p.fs.as_str(),
            at - p.offset()
        ),
        None => format!(
            "the trees are equal; the raw disks differ at byte {at}, outside every file system (GPT, boot code)"
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::cmd;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = derived_uuid("seed", "disk");
        assert_eq!(a, derived_uuid("seed", "disk"));
        assert_ne!(a, derived_uuid("seed", "root"));
        assert_ne!(a, derived_uuid("other", "disk"));
        assert_eq!(a.get_version_num(), 8);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
    }

    /// mke2fs -d twice from two copies of a tree made at different times:
    /// different images, until both have their times fixed; then equal,
    /// and e2fsck finds every inode checksum right.
    #[test]
    fn fixed_ext4_times_make_equal_images_that_fsck_accepts() {
        let d = tempfile::tempdir().unwrap();
        let epoch = 1_700_000_000u32;
        let mut images = Vec::new();
        for run in 0..2 {
            let src = d.path().join(format!("src{run}"));
            std::fs::create_dir_all(src.join("etc/deep/er")).unwrap();
            std::fs::write(src.join("etc/hostname"), "h\n").unwrap();
            std::fs::write(src.join("etc/deep/er/f"), vec![7u8; 50_000]).unwrap();
            std::os::unix::fs::symlink("hostname", src.join("etc/link")).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let img = d.path().join(format!("fs{run}.img"));
            File::create(&img).unwrap().set_len(16 << 20).unwrap();
            cmd("mkfs.ext4", ["-q", "-F", "-b", "4096", "-U"])
                .arg("d3b07384-d9a0-4c6b-8a1e-2f0e3c1b5a77")
                .args(["-E", "hash_seed=5f1d7a3e-9b2c-4e8f-a6d0-1c3b5e7f9a2d", "-d"])
                .arg(&src)
                .arg(&img)
                .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
                .run()
                .unwrap();
            images.push(img);
        }
        assert_ne!(
            sha256_file(&images[0]).unwrap(),
            sha256_file(&images[1]).unwrap(),
            "the copies' change times differ"
        );
        for img in &images {
            assert!(fix_ext4_times(img, epoch).unwrap() >= 5);
            let out = cmd("e2fsck", ["-fn"]).arg(img).run_unchecked().unwrap();
            assert!(
                out.status.success(),
                "e2fsck: {}{}",
                out.stdout_str(),
                out.stderr_str()
            );
        }
        assert_eq!(first_byte_difference(&images[0], &images[1]).unwrap(), None);
        let stat = cmd("debugfs", ["-R", "stat /etc/hostname"])
            .arg(&images[0])
            .run()
            .unwrap()
            .stdout_str();
        assert!(stat.contains("ctime: 0x6553f100:00000000"), "{stat}");
    }

    #[test]
    fn not_ext4_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        assert!(fix_ext4_times(&f, 1).is_err());
    }

    #[test]
    fn tree_differences_name_the_first_path() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        for t in [&a, &b] {
            std::fs::create_dir_all(t.join("etc")).unwrap();
            std::fs::write(t.join("etc/fstab"), "x").unwrap();
        }
        let epoch = 0;
        assert_eq!(first_tree_difference(&a, &b, epoch).unwrap(), None);
        std::fs::write(b.join("etc/fstab"), "y").unwrap();
        std::fs::write(b.join("etc/zzz"), "").unwrap();
        assert_eq!(
            first_tree_difference(&a, &b, epoch).unwrap().unwrap(),
            "/etc/fstab: contents differ"
        );
        std::fs::write(b.join("etc/fstab"), "x").unwrap();
        assert_eq!(
            first_tree_difference(&a, &b, epoch).unwrap().unwrap(),
            "/etc/zzz: only in the second build"
        );
    }

    #[test]
    fn byte_differences() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, vec![1u8; 3 << 20]).unwrap();
        let mut v = vec![1u8; 3 << 20];
        assert_eq!(first_byte_difference(&a, &a).unwrap(), None);
        v[(2 << 20) + 5] = 0;
        std::fs::write(&b, &v).unwrap();
        assert_eq!(first_byte_difference(&a, &b).unwrap(), Some((2 << 20) + 5));
        std::fs::write(&b, vec![1u8; 10]).unwrap();
        assert_eq!(first_byte_difference(&a, &b).unwrap(), Some(10));
    }
}
