//! The disk phase: the profile's partition plan laid out on a GPT disk.
//!
//! No loop devices and no mounts: each ext4 file system is made with
//! `mkfs.ext4 -d` straight from its part of the tree, the ESP is written
//! with the `fatfs` crate, the GPT with the `gpt` crate into a fresh sparse
//! file, and the partition images are copied in hole by hole.
//!
//! The boot chain: with Secure Boot, the distribution's signed shim as
//! `EFI/BOOT/BOOTX64.EFI` and its signed GRUB; otherwise GRUB built from
//! the image's own modules. A hybrid disk adds a BIOS boot partition with
//! GRUB's i386-pc core image and boot code in the MBR. Every path reads an
//! early configuration that finds the root file system by UUID and loads
//! `/boot/grub/grub.cfg`.

use crate::chroot::Chroot;
use crate::config::format_size;
use crate::exec::cmd;
use crate::fsutil;
use crate::profile::{ExtraMount, ExtraMountKind, FsType, Profile};
use crate::progress;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use uuid::Uuid;

pub const SECTOR: u64 = 512;
/// Partitions start on 1 MiB boundaries.
pub const ALIGN: u64 = 1 << 20;

/// GPT partition type GUIDs (UEFI spec and the Discoverable Partitions
/// Specification).
pub mod types {
    pub const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    pub const ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
    pub const VAR: &str = "4D21B016-B534-45C2-A9FB-5C16E091FD2D";
    pub const VAR_TMP: &str = "7EC6F557-3BC5-4ACA-B293-16EF5DF639D1";
    pub const HOME: &str = "933AC7E1-2EB4-4F13-B844-0E14E2AEF915";
    pub const SRV: &str = "3B8F8425-20E0-4F3B-907F-1A25A76F98E8";
    pub const LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
    /// GRUB's BIOS boot partition ("Hah!IdontNeedEFI").
    pub const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
}

/// ext4 features named explicitly: what GRUB 2.06 and e2fsprogs 1.46
/// (Ubuntu 22.04) read, without the newer defaults (orphan_file,
/// metadata_csum_seed) that would make an older fsck refuse the disk.
pub const EXT4_FEATURES: &str = "none,has_journal,ext_attr,resize_inode,dir_index,filetype,extent,64bit,flex_bg,sparse_super,large_file,huge_file,dir_nlink,extra_isize,metadata_csum";

/// GRUB modules built into BOOTX64.EFI (nothing is loaded from disk).
pub const GRUB_MODULES: &[&str] = &[
    "part_gpt",
    "part_msdos",
    "fat",
    "ext2",
    "normal",
    "configfile",
    "search",
    "search_fs_uuid",
    "search_label",
    "linux",
    "gzio",
    "echo",
    "test",
    "all_video",
    "efi_gop",
    "serial",
    "terminal",
    "password_pbkdf2",
    "pbkdf2",
    "gcry_sha512",
    "sleep",
    "boot",
    "reboot",
    "halt",
    "ls",
    "cat",
];

#[derive(Debug, Clone, Serialize)]
pub struct PlannedPartition {
    /// GPT entry number, from 1.
    pub number: u32,
    pub mount: String,
    pub fs: FsType,
    pub label: String,
    pub options: Vec<String>,
    pub first_lba: u64,
    pub sectors: u64,
    pub type_guid: String,
    pub part_guid: Uuid,
    /// ext4: the file-system UUID; vfat: the volume id as `ABCD-1234`.
    pub fs_uuid: String,
    #[serde(skip)]
    pub fat_id: u32,
    /// ext4: the seed of the directory-index hash.
    #[serde(skip)]
    pub hash_seed: Uuid,
}

impl PlannedPartition {
    pub fn size(&self) -> u64 {
        self.sectors * SECTOR
    }
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskPlan {
    pub size: u64,
    pub disk_guid: Uuid,
    pub partitions: Vec<PlannedPartition>,
    pub mounts: Vec<ExtraMount>,
    /// The BIOS boot partition of a hybrid disk: first on the disk, the
    /// last GPT entry.
    pub bios_boot: Option<BiosBoot>,
    /// Every time in the file systems: SOURCE_DATE_EPOCH or older.
    pub epoch: i64,
    /// GRUB's superuser password hash (see [`locked_grub_password_hash`]).
    #[serde(skip)]
    pub grub_lock: String,
}

/// Where GRUB's i386-pc core image lives on a hybrid disk.
#[derive(Debug, Clone, Serialize)]
pub struct BiosBoot {
    pub number: u32,
    pub first_lba: u64,
    pub sectors: u64,
    pub part_guid: Uuid,
}

fn type_for(mount: &str, fs: FsType) -> &'static str {
    match (mount, fs) {
        (_, FsType::Vfat) => types::ESP,
        ("/", _) => types::ROOT_X86_64,
        ("/var", _) => types::VAR,
        ("/var/tmp", _) => types::VAR_TMP,
        ("/home", _) => types::HOME,
        ("/srv", _) => types::SRV,
        _ => types::LINUX_DATA,
    }
}

/// Lay the profile's partitions out, in order, on 1 MiB boundaries, with
/// identifiers derived from `seed` (the build's input hash): the same
/// inputs give the same disk, bit for bit.
pub fn plan(p: &Profile, seed: &str, epoch: i64) -> DiskPlan {
    use crate::reproducible::derived_uuid;
    let mut at = ALIGN;
    let bios_boot = p.boot.bios.then(|| {
        let b = BiosBoot {
            number: p.disk.partitions.len() as u32 + 1,
            first_lba: at / SECTOR,
            sectors: crate::profile::BIOS_BOOT_SIZE / SECTOR,
            part_guid: derived_uuid(seed, "bios-boot partition"),
        };
        at += crate::profile::BIOS_BOOT_SIZE;
        b
    });
    let mut partitions = Vec::new();
    for (i, part) in p.disk.partitions.iter().enumerate() {
        let size = part.size.div_ceil(ALIGN) * ALIGN;
        let id = |what: &str| derived_uuid(seed, &format!("{} {what}", part.mount));
        let fat_id =
            u32::from_le_bytes(id("volume id").as_bytes()[..4].try_into().expect("4 bytes"));
        let fs_uuid = match part.fs {
            FsType::Ext4 => id("file system").to_string(),
            FsType::Vfat => format!("{:04X}-{:04X}", fat_id >> 16, fat_id & 0xffff),
        };
        partitions.push(PlannedPartition {
            number: i as u32 + 1,
            mount: part.mount.clone(),
            fs: part.fs,
            label: part.label.clone(),
            options: part.options.clone(),
            first_lba: at / SECTOR,
            sectors: size / SECTOR,
            type_guid: type_for(&part.mount, part.fs).to_string(),
            part_guid: id("partition"),
            fs_uuid,
            fat_id,
            hash_seed: id("hash seed"),
        });
        at += size;
    }
    DiskPlan {
        size: p.disk.size,
        disk_guid: derived_uuid(seed, "disk"),
        partitions,
        mounts: p.disk.mounts.clone(),
        bios_boot,
        epoch,
        grub_lock: locked_grub_password_hash(seed),
    }
}

impl DiskPlan {
    pub fn root(&self) -> &PlannedPartition {
        self.partitions
            .iter()
            .find(|p| p.mount == "/")
            .expect("validated: one root")
    }

    pub fn esp(&self) -> &PlannedPartition {
        self.partitions
            .iter()
            .find(|p| p.fs == FsType::Vfat)
            .expect("validated: one ESP")
    }

    /// /etc/fstab: every partition by UUID with its options, then the
    /// extra mounts; parents before children.
    pub fn fstab(&self) -> String {
        let mut rows: Vec<(String, String, String, String, u8)> = Vec::new();
        for p in &self.partitions {
            let opts = if p.options.is_empty() {
                "defaults".to_string()
            } else {
                p.options.join(",")
            };
            let pass = if p.mount == "/" { 1 } else { 2 };
            rows.push((
                format!("UUID={}", p.fs_uuid),
                p.mount.clone(),
                p.fs.as_str().to_string(),
                opts,
                pass,
            ));
        }
        for m in &self.mounts {
            let (spec, fstype, mut opts) = match &m.kind {
                ExtraMountKind::Tmpfs => ("tmpfs".to_string(), "tmpfs", Vec::new()),
                ExtraMountKind::Bind { source } => {
                    (source.clone(), "none", vec!["bind".to_string()])
                }
            };
            opts.extend(m.options.iter().cloned());
            if opts.is_empty() {
                opts.push("defaults".into());
            }
            rows.push((spec, m.mount.clone(), fstype.to_string(), opts.join(","), 0));
        }
        rows.sort_by_key(|r| {
            if r.1 == "/" {
                0
            } else {
                r.1.matches('/').count()
            }
        });
        let mut out = String::from(
            "# /etc/fstab: written by stemforge from the profile's disk layout.\n# <file system> <mount point> <type> <options> <dump> <pass>\n",
        );
        for (spec, mount, fstype, opts, pass) in rows {
            out.push_str(&format!("{spec}\t{mount}\t{fstype}\t{opts}\t0\t{pass}\n"));
        }
        out
    }

    /// A table of the layout for the plan printout.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "GPT disk, {} (disk GUID {})\n",
            format_size(self.size),
            self.disk_guid
        );
        if let Some(b) = &self.bios_boot {
            s.push_str(&format!(
                "  {:>2}  {:<16} {:<5} {:>7}  at {:>7}  GRUB i386-pc core image\n",
                b.number,
                "(BIOS boot)",
                "-",
                format_size(b.sectors * SECTOR),
                format_size(b.first_lba * SECTOR),
            ));
        }
        for p in &self.partitions {
            s.push_str(&format!(
                "  {:>2}  {:<16} {:<5} {:>7}  at {:>7}  {}\n",
                p.number,
                p.mount,
                p.fs.as_str(),
                format_size(p.size()),
                format_size(p.offset()),
                if p.options.is_empty() {
                    "-".to_string()
                } else {
                    p.options.join(",")
                }
            ));
        }
        for m in &self.mounts {
            let what = match &m.kind {
                ExtraMountKind::Tmpfs => "tmpfs".to_string(),
                ExtraMountKind::Bind { source } => format!("bind of {source}"),
            };
            s.push_str(&format!(
                "      {:<16} {what}  {}\n",
                m.mount,
                m.options.join(",")
            ));
        }
        s
    }
}

/// Random bytes from the kernel.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b)
}

/// GRUB's `password_pbkdf2` hash of `password`:
/// `grub.pbkdf2.sha512.ROUNDS.SALT.HASH` (upper-case hex, 64-byte hash).
pub fn grub_pbkdf2(password: &[u8], salt: &[u8], rounds: u32) -> String {
    let mut out = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, rounds, &mut out);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
    format!("grub.pbkdf2.sha512.{rounds}.{}.{}", hex(salt), hex(&out))
}

/// GRUB's superuser password hash for this build, which no password
/// matches that anyone knows: its salt and its 64-byte "hash" are derived
/// from the build's inputs, not computed from a password, so logging in
/// would take a PBKDF2-SHA512 preimage. Nobody can edit boot entries or
/// boot into recovery mode from the console; unattended boots are
/// unaffected; and the same inputs give the same grub.cfg.
pub fn locked_grub_password_hash(seed: &str) -> String {
    use crate::reproducible::derived_bytes;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
    format!(
        "grub.pbkdf2.sha512.10000.{}.{}",
        hex(&derived_bytes(seed, "grub salt")),
        hex(&derived_bytes(seed, "grub lock"))
    )
}

/// The newest kernel in the tree's /boot.
pub fn kernel_version(tree: &Path) -> Result<String> {
    let boot = tree.join("boot");
    let mut versions: Vec<String> = std::fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_string)
        })
        .filter(|v| boot.join(format!("initrd.img-{v}")).exists())
        .collect();
    versions.sort_by(|a, b| version_cmp(a, b));
    versions.pop().with_context(|| {
        format!(
            "no kernel with an initrd in {} (is the kernel package installed?)",
            boot.display()
        )
    })
}

fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    parts(a).cmp(&parts(b))
}

/// /boot/grub/grub.cfg.
pub fn grub_cfg(plan: &DiskPlan, p: &Profile, kernel: &str, password_hash: &str) -> String {
    let root = &plan.root().fs_uuid;
    let title = if p.description.is_empty() {
        p.name.clone()
    } else {
        p.description.clone()
    };
    let cmdline = p.boot.cmdline.join(" ");
    let entry = |name: &str, id: &str, access: &str, extra: &str| {
        format!(
            "menuentry '{name}' --id {id} {access} {{\n\tsearch --no-floppy --fs-uuid --set=root {root}\n\tlinux /boot/vmlinuz-{kernel} root=UUID={root} ro{extra} {cmdline}\n\tinitrd /boot/initrd.img-{kernel}\n}}\n"
        )
    };
    format!(
        "# /boot/grub/grub.cfg: written by stemforge (disk phase). Root only, mode 0600.\n\
         # Booting the normal entry needs no password; editing an entry, the\n\
         # command line and the recovery entry need the superuser's.\n\
         set superusers=\"root\"\n\
         password_pbkdf2 root {password_hash}\n\n\
         serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1\n\
         terminal_input console serial\n\
         terminal_output console serial\n\
         set timeout={}\n\
         set default=stemforge\n\n{}\n{}",
        p.boot.timeout,
        entry(&title, "stemforge", "--unrestricted", ""),
        entry(
            &format!("{title} (recovery mode)"),
            "stemforge-recovery",
            "--users root",
            " single"
        ),
    )
}

/// The configuration embedded in BOOTX64.EFI.
pub fn early_cfg(plan: &DiskPlan) -> String {
    let root = &plan.root().fs_uuid;
    format!(
        "search --no-floppy --fs-uuid --set=root {root}\nset prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n"
    )
}

/// What the firmware starts: the files GRUB (and shim) put on the ESP and,
/// on a hybrid disk, GRUB's i386-pc boot and core images.
pub struct BootFiles {
    /// ESP path (8.3 names) and content.
    pub esp: Vec<(String, Vec<u8>)>,
    pub bios: Option<BiosImages>,
}

/// GRUB for BIOS firmware: `boot.img` for the MBR's code area and
/// `core.img` for the BIOS boot partition.
pub struct BiosImages {
    pub boot: Vec<u8>,
    pub core: Vec<u8>,
}

/// The files of the image's boot chain: the distribution's signed ones
/// for Secure Boot, else GRUB built with the image's own grub-mkimage; and
/// GRUB for BIOS on a hybrid disk.
pub fn boot_files(chroot: &Chroot, plan: &DiskPlan, p: &Profile) -> Result<BootFiles> {
    let root = chroot.root();
    let early = early_cfg(plan).into_bytes();
    let esp = if p.boot.secure_boot {
        signed_esp_files(root, &p.os.distro, &early)?
    } else {
        vec![(
            "EFI/BOOT/BOOTX64.EFI".to_string(),
            grub_mkimage(chroot, plan, "x86_64-efi", &[], "grub-efi-amd64-bin")?,
        )]
    };
    let bios = if plan.bios_boot.is_some() {
        let core = grub_mkimage(chroot, plan, "i386-pc", &["biosdisk"], "grub-pc-bin")?;
        let boot_img = root.join("usr/lib/grub/i386-pc/boot.img");
        let boot =
            std::fs::read(&boot_img).with_context(|| format!("reading {}", boot_img.display()))?;
        Some(BiosImages { boot, core })
    } else {
        None
    };
    Ok(BootFiles { esp, bios })
}

/// The ESP of a Secure Boot image: the distribution's signed shim as
/// the removable-media loader, its signed GRUB beside it, MokManager when
/// the image has it, and the early configuration where that GRUB looks:
/// `EFI/<distro>` (Debian and Ubuntu build it with that prefix) and, as
/// its fallback, its own directory.
pub fn signed_esp_files(root: &Path, distro: &str, early: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut esp = Vec::new();
    // The first of each list that the image has: Ubuntu names its
    // current shim `.latest`; Debian signs MokManager separately.
    let first = |rels: &[&str]| rels.iter().map(|r| root.join(r)).find(|p| p.is_file());
    let read = |rels: &[&str], pkg: &str| -> Result<Vec<u8>> {
        let p = first(rels).with_context(|| {
            format!(
                "the image has no /{}: Secure Boot needs the package {pkg}",
                rels[rels.len() - 1]
            )
        })?;
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    esp.push((
        "EFI/BOOT/BOOTX64.EFI".to_string(),
        read(
            &[
                "usr/lib/shim/shimx64.efi.signed.latest",
                "usr/lib/shim/shimx64.efi.signed",
            ],
            "shim-signed",
        )?,
    ));
    esp.push((
        "EFI/BOOT/grubx64.efi".to_string(),
        read(
            &["usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"],
            "grub-efi-amd64-signed",
        )?,
    ));
    // MokManager, which shim starts when a key enrolment is pending.
    let mm = ["usr/lib/shim/mmx64.efi.signed", "usr/lib/shim/mmx64.efi"];
    if let Some(p) = first(&mm) {
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        esp.push(("EFI/BOOT/mmx64.efi".to_string(), bytes));
    }
    esp.push(("EFI/BOOT/grub.cfg".to_string(), early.to_vec()));
    esp.push((format!("EFI/{distro}/grub.cfg"), early.to_vec()));
    Ok(esp)
}

/// A GRUB image for `platform` from the image's own grub-mkimage and
/// modules, with the early configuration and every module built in
/// (nothing is loaded from disk).
fn grub_mkimage(
    chroot: &Chroot,
    plan: &DiskPlan,
    platform: &str,
    extra: &[&str],
    package: &str,
) -> Result<Vec<u8>> {
    let root = chroot.root();
    let dir = format!("/usr/lib/grub/{platform}");
    if !root.join(&dir[1..]).join("normal.mod").exists() {
        bail!("{dir} is missing from the image: install {package} in the profile");
    }
    let cfg = root.join("tmp/stemforge-early.cfg");
    std::fs::write(&cfg, early_cfg(plan)).with_context(|| format!("writing {}", cfg.display()))?;
    let out_rel = format!("/tmp/stemforge-grub-{platform}.img");
    let mut argv = vec![
        "grub-mkimage",
        "-O",
        platform,
        "-o",
        &out_rel,
        "-c",
        "/tmp/stemforge-early.cfg",
        "-p",
        "/boot/grub",
        "-d",
        &dir,
    ];
    argv.extend(
        GRUB_MODULES
            .iter()
            .filter(|m| platform.ends_with("-efi") || !m.starts_with("efi_")),
    );
    argv.extend(extra);
    let r = chroot
        .run(&argv)
        .with_context(|| format!("building GRUB for {platform} with the image's grub-mkimage"));
    let out = root.join(&out_rel[1..]);
    let bytes =
        r.and_then(|_| std::fs::read(&out).with_context(|| format!("reading {}", out.display())));
    let _ = std::fs::remove_file(&cfg);
    let _ = std::fs::remove_file(&out);
    bytes
}

/// GRUB's boot.img layout (grub-core/boot/i386/pc/boot.S): the LBA of
/// core.img's first sector, the boot drive, and the floppy probe jump.
const BOOT_KERNEL_SECTOR: usize = 0x5c;
const BOOT_DRIVE: usize = 0x64;
const BOOT_DRIVE_CHECK: usize = 0x66;
/// Where the MBR's own data starts: the disk signature, then the
/// partition table. boot.img's code ends before it.
const MBR_SIGNATURE: usize = 0x1b8;

/// Install GRUB for BIOS on a GPT disk file: boot.img into the MBR's code
/// area (keeping the protective partition table), core.img into the BIOS
/// boot partition, with the block list in core.img's first sector pointing
/// at the rest of it.
///
/// Written here because grub-bios-setup only works on a block device
/// whose root file system it can probe (on a disk file it stops at
/// "guessing the root device failed"). This does what it does for a GPT
/// disk with a BIOS boot partition, without Reed-Solomon codes (its
/// `--no-rs-codes`).
pub fn install_bios_boot(disk: &File, b: &BiosBoot, img: &BiosImages) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let sectors = img.core.len().div_ceil(SECTOR as usize) as u64;
    if img.boot.len() != SECTOR as usize || sectors < 2 {
        bail!(
            "GRUB's boot.img ({} bytes) or core.img ({} bytes) is not what GRUB makes",
            img.boot.len(),
            img.core.len()
        );
    }
    if sectors > b.sectors {
        bail!(
            "GRUB's core.img ({} sectors) does not fit the BIOS boot partition ({} sectors)",
            sectors,
            b.sectors
        );
    }
    let mut core = img.core.clone();
    core.resize((sectors * SECTOR) as usize, 0);
    // The last 12 bytes of the first sector: the first block list entry
    // (start LBA u64, sector count u16, load segment u16); the next entry
    // (before it) stays zero as the terminator.
    let list = SECTOR as usize - 12;
    core[list..list + 8].copy_from_slice(&(b.first_lba + 1).to_le_bytes());
    core[list + 8..list + 10].copy_from_slice(
        &u16::try_from(sectors - 1)
            .context("core.img is too large")?
            .to_le_bytes(),
    );
    core[list - 12..list].fill(0);
    let mut mbr = [0u8; SECTOR as usize];
    disk.read_exact_at(&mut mbr, 0)
        .context("reading the protective MBR")?;
    mbr[..MBR_SIGNATURE].copy_from_slice(&img.boot[..MBR_SIGNATURE]);
    mbr[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&b.first_lba.to_le_bytes());
    // 0xff: boot from the drive the BIOS passes.
    mbr[BOOT_DRIVE] = 0xff;
    // A hard disk: no probing for a floppy (two NOPs over the jump).
    mbr[BOOT_DRIVE_CHECK..BOOT_DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    disk.write_all_at(&core, b.first_lba * SECTOR)
        .context("writing GRUB's core.img into the BIOS boot partition")?;
    disk.write_all_at(&mbr, 0)
        .context("writing GRUB's boot.img into the MBR")?;
    Ok(())
}

/// A part of the tree that becomes its own file system, and where its
/// file system's contents are read from.
struct Carved {
    mount: String,
    staged: PathBuf,
}

/// The tree split into its partitions' sources without moving a file
/// (the tree may be a stack of read-only layers): each non-root
/// partition's subtree is bound at `stage_dir/LABEL`, then in every source
/// each partition directly beneath it is covered by an empty file system
/// with the mount point's mode and owner. The mounts are in the build's
/// private mount namespace; dropping the result removes them.
struct Separated {
    carved: Vec<Carved>,
    mounts: Vec<crate::layers::Mount>,
}

impl Drop for Separated {
    fn drop(&mut self) {
        // Covers first, then the binds beneath them.
        while self.mounts.pop().is_some() {}
    }
}

fn separate(tree: &Path, stage_dir: &Path, plan: &DiskPlan) -> Result<Separated> {
    use crate::layers::Mount;
    let mut parts: Vec<&PlannedPartition> =
        plan.partitions.iter().filter(|p| p.mount != "/").collect();
    parts.sort_by_key(|p| p.mount.matches('/').count());
    let mut out = Separated {
        carved: Vec::new(),
        mounts: Vec::new(),
    };
    for p in &parts {
        let src = tree.join(p.mount.trim_start_matches('/'));
        match src.symlink_metadata() {
            Ok(md) if md.file_type().is_symlink() => {
                bail!(
                    "{} is a symlink in the tree; it cannot be a mount point",
                    p.mount
                )
            }
            Ok(md) if !md.is_dir() => bail!("{} is not a directory in the tree", p.mount),
            Ok(_) => {}
            Err(_) => {
                std::fs::create_dir_all(&src)
                    .with_context(|| format!("creating mount point {}", p.mount))?;
            }
        }
    }
    for p in &parts {
        let staged = stage_dir.join(&p.label);
        std::fs::create_dir_all(&staged)
            .with_context(|| format!("creating {}", staged.display()))?;
        let src = tree.join(p.mount.trim_start_matches('/'));
        out.mounts.push(Mount::bind(&src, &staged)?);
        out.carved.push(Carved {
            mount: p.mount.clone(),
            staged,
        });
    }
    let mut sources: Vec<(String, PathBuf)> = vec![("/".to_string(), tree.to_path_buf())];
    sources.extend(
        out.carved
            .iter()
            .map(|c| (c.mount.clone(), c.staged.clone())),
    );
    let beneath = |outer: &str, inner: &str| -> bool {
        let prefix = if outer == "/" {
            "/".to_string()
        } else {
            format!("{outer}/")
        };
        inner != outer && inner.starts_with(&prefix)
    };
    for (mount, src) in &sources {
        for q in &parts {
            let direct = beneath(mount, &q.mount)
                && !parts
                    .iter()
                    .any(|r| beneath(mount, &r.mount) && beneath(&r.mount, &q.mount));
            if !direct {
                continue;
            }
            let rel = q.mount[mount.len()..].trim_start_matches('/');
            let dir = src.join(rel);
            let md = dir
                .metadata()
                .with_context(|| format!("stat {}", dir.display()))?;
            out.mounts.push(Mount::new(
                "stemforge-mount-point",
                &dir,
                "tmpfs",
                libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
                &format!(
                    "mode={:o},uid={},gid={},size=64k",
                    md.mode() & 0o7777,
                    md.uid(),
                    md.gid()
                ),
            )?);
        }
    }
    Ok(out)
}

/// The image files are fresh and sparse, so all zeros: tell mke2fs not to
/// write zeros (journal, inode tables). 1.47 can say so outright, and marks
/// the inode tables zeroed so the kernel does not zero them at first mount;
/// older versions only skip the writing.
fn prezeroed_option() -> &'static str {
    static OPT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    OPT.get_or_init(|| {
        let v = cmd("mke2fs", ["-V"])
            .run_unchecked()
            .map(|o| o.stderr_str() + &o.stdout_str())
            .unwrap_or_default();
        let version: Vec<u32> = v
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        if version >= vec![1, 47] {
            "assume_storage_prezeroed=1"
        } else {
            "lazy_itable_init=1,lazy_journal_init=1"
        }
    })
}

/// `mkfs.ext4 -d` of `src` into a fresh image file, then give the file
/// system's top directory the mode and owner of `src` (mke2fs does not),
/// and every inode the times of `epoch` (see
/// [`crate::reproducible::fix_ext4_times`]). The UUID, the directory hash
/// seed and mke2fs's own clock come from the plan, so the same tree gives
/// the same bytes.
pub fn mkfs_ext4(image: &Path, p: &PlannedPartition, src: &Path, epoch: i64) -> Result<()> {
    let md = src
        .metadata()
        .with_context(|| format!("stat {}", src.display()))?;
    let used = fsutil::tree_usage(src)?;
    // Room for metadata: the journal (up to 64 MiB here), inode tables and
    // the 5% reserve.
    let need = used + used / 10 + (64 << 20).min(p.size() / 8) + p.size() / 20;
    if need > p.size() {
        bail!(
            "partition {} ({}) is too small for its {} of files; raise its size in the profile",
            p.mount,
            format_size(p.size()),
            format_size(used)
        );
    }
    let f = File::create(image).with_context(|| format!("creating {}", image.display()))?;
    f.set_len(p.size())
        .with_context(|| format!("sizing {}", image.display()))?;
    drop(f);
    let epoch = u32::try_from(epoch).context("SOURCE_DATE_EPOCH does not fit ext4's times")?;
    cmd(
        "mkfs.ext4",
        [
            "-q",
            "-F",
            "-b",
            "4096",
            "-O",
            EXT4_FEATURES,
            "-L",
            &p.label,
            "-U",
            &p.fs_uuid,
            "-E",
            &format!(
                "root_owner={}:{},hash_seed={},{}",
                md.uid(),
                md.gid(),
                p.hash_seed,
                prezeroed_option()
            ),
            "-d",
        ],
    )
    .arg(src)
    .arg(image)
    .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
    .run()
    .with_context(|| format!("making the {} file system", p.mount))?;
    let mode = 0o040000 | (md.mode() & 0o7777);
    cmd(
        "debugfs",
        ["-w", "-R", &format!("set_inode_field / mode 0{mode:o}")],
    )
    .arg(image)
    .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
    .run()
    .with_context(|| format!("setting the mode of {}", p.mount))?;
    crate::reproducible::fix_ext4_times(image, epoch)
        .with_context(|| format!("setting the times of the {} file system", p.mount))?;
    Ok(())
}

/// What the FAT file system's clock says: `epoch`, no earlier than FAT's
/// first day (1980-01-01).
#[derive(Debug)]
struct EpochClock(fatfs::Date, fatfs::Time);

impl fatfs::TimeProvider for EpochClock {
    fn get_current_date(&self) -> fatfs::Date {
        self.0
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.0,
            time: self.1,
        }
    }
}

/// fatfs takes its clock as a `&'static`; one small clock per file system
/// made is leaked (a build makes one).
fn epoch_clock(epoch: i64) -> &'static EpochClock {
    use chrono::{Datelike, Timelike};
    let t = chrono::DateTime::from_timestamp(epoch.max(315_532_800), 0)
        .unwrap_or_default()
        .naive_utc();
    Box::leak(Box::new(EpochClock(
        fatfs::Date {
            year: t.year().clamp(1980, 2107) as u16,
            month: t.month() as u16,
            day: t.day() as u16,
        },
        fatfs::Time {
            hour: t.hour() as u16,
            min: t.minute() as u16,
            sec: t.second() as u16,
            millis: 0,
        },
    )))
}

/// The EFI system partition: FAT32 with the tree's /boot/efi content and
/// the boot chain's files (the loader at the removable-media path).
pub fn write_esp(
    image: &Path,
    p: &PlannedPartition,
    src: &Path,
    files: &[(String, Vec<u8>)],
    epoch: i64,
) -> Result<()> {
    use fatfs::{FatType, FileSystem, FormatVolumeOptions, FsOptions};
    let f = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("creating {}", image.display()))?;
    f.set_len(p.size())
        .with_context(|| format!("sizing {}", image.display()))?;
    // FAT32 needs at least 65525 clusters: the largest cluster that leaves
    // that many, with room to spare.
    let mut cluster: u32 = 4096;
    while cluster > 512 && p.size() / cluster as u64 <= 65_525 * 21 / 20 {
        cluster /= 2;
    }
    let mut label = [b' '; 11];
    for (i, b) in p.label.to_ascii_uppercase().bytes().take(11).enumerate() {
        label[i] = b;
    }
    fatfs::format_volume(
        &f,
        FormatVolumeOptions::new()
            .fat_type(FatType::Fat32)
            .bytes_per_cluster(cluster)
            .volume_id(p.fat_id)
            .volume_label(label),
    )
    .with_context(|| format!("formatting the ESP {}", image.display()))?;
    let fs = FileSystem::new(&f, FsOptions::new().time_provider(epoch_clock(epoch)))
        .context("opening the fresh ESP")?;
    {
        let root = fs.root_dir();
        copy_into_fat(&root, src)?;
        for (path, bytes) in files {
            let (dirs, name) = path.rsplit_once('/').unwrap_or(("", path));
            let mut dir = root.clone();
            for d in dirs.split('/').filter(|d| !d.is_empty()) {
                dir = dir
                    .create_dir(d)
                    .with_context(|| format!("ESP: creating {d} for {path}"))?;
            }
            let mut file = dir
                .create_file(name)
                .with_context(|| format!("ESP: creating {path}"))?;
            file.truncate()
                .with_context(|| format!("ESP: truncating {path}"))?;
            file.write_all(bytes)
                .with_context(|| format!("ESP: writing {path}"))?;
            file.flush()
                .with_context(|| format!("ESP: flushing {path}"))?;
        }
    }
    fs.unmount().context("closing the ESP")?;
    fix_root_dotdot(&f).context("fixing the ESP's directory entries")?;
    f.sync_all().context("syncing the ESP")?;
    Ok(())
}

/// fatfs 0.3.6 points the `..` entry of a directory in the root at the
/// root's cluster; FAT32 requires 0 there (fsck.fat: "Invalid '..' entry in
/// the second slot"). Set it to 0 for every directory in the root.
/// Upstream: rafalh/rust-fatfs (fixed on master, not released).
fn fix_root_dotdot(f: &File) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut bs = [0u8; 512];
    f.read_exact_at(&mut bs, 0)?;
    let u16at = |o: usize| u16::from_le_bytes([bs[o], bs[o + 1]]) as u64;
    let u32at = |o: usize| u32::from_le_bytes([bs[o], bs[o + 1], bs[o + 2], bs[o + 3]]) as u64;
    let bps = u16at(11);
    let cluster_bytes = bps * bs[13] as u64;
    let fat_start = u16at(14) * bps;
    let data_start = fat_start + bs[16] as u64 * u32at(36) * bps;
    let offset = |c: u64| data_start + (c - 2) * cluster_bytes;
    let next = |c: u64| -> std::io::Result<u64> {
        let mut e = [0u8; 4];
        f.read_exact_at(&mut e, fat_start + c * 4)?;
        Ok(u32::from_le_bytes(e) as u64 & 0x0FFF_FFFF)
    };
    let mut cluster = u32at(44);
    let mut buf = vec![0u8; cluster_bytes as usize];
    while (2..0x0FFF_FFF8).contains(&cluster) {
        f.read_exact_at(&mut buf, offset(cluster))?;
        for e in buf.chunks(32) {
            if e[0] == 0 {
                return Ok(());
            }
            let attr = e[11];
            if e[0] == 0xE5 || attr == 0x0F || attr & 0x08 != 0 || attr & 0x10 == 0 {
                continue;
            }
            let child = (u16::from_le_bytes([e[20], e[21]]) as u64) << 16
                | u16::from_le_bytes([e[26], e[27]]) as u64;
            let mut dotdot = [0u8; 32];
            f.read_exact_at(&mut dotdot, offset(child) + 32)?;
            if &dotdot[..11] == b"..         " {
                dotdot[20..22].fill(0);
                dotdot[26..28].fill(0);
                f.write_all_at(&dotdot, offset(child) + 32)?;
            }
        }
        cluster = next(cluster)?;
    }
    Ok(())
}

/// Copy a directory into the FAT file system, entries in name order (the
/// host directory's order would change the bytes from build to build).
fn copy_into_fat<T: fatfs::ReadWriteSeek>(dir: &fatfs::Dir<T>, src: &Path) -> Result<()> {
    let mut entries = std::fs::read_dir(src)
        .and_then(|d| d.collect::<std::io::Result<Vec<_>>>())
        .with_context(|| format!("reading {}", src.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let md = entry.metadata()?;
        if md.is_dir() {
            let sub = dir
                .create_dir(&name)
                .with_context(|| format!("ESP: creating {name}"))?;
            copy_into_fat(&sub, &entry.path())?;
        } else if md.is_file() {
            let mut f = dir
                .create_file(&name)
                .with_context(|| format!("ESP: creating {name}"))?;
            f.truncate()?;
            f.write_all(&std::fs::read(entry.path())?)
                .with_context(|| format!("ESP: writing {name}"))?;
        }
    }
    Ok(())
}

/// Write the GPT into a fresh sparse file of the disk's size and copy each
/// partition image into place.
pub fn write_gpt_disk(
    out: &Path,
    plan: &DiskPlan,
    images: &[(u32, PathBuf)],
    bios: Option<&BiosImages>,
) -> Result<String> {
    use gpt::disk::LogicalBlockSize;
    use gpt::partition_types::{OperatingSystem, Type};
    let mut f = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    f.set_len(plan.size)
        .with_context(|| format!("sizing {}", out.display()))?;
    let lbas = u32::try_from(plan.size / SECTOR - 1).unwrap_or(u32::MAX);
    gpt::mbr::ProtectiveMBR::with_lb_size(lbas)
        .overwrite_lba0(&mut f)
        .with_context(|| format!("writing the protective MBR to {}", out.display()))?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .create_from_device(f, Some(plan.disk_guid))
        .with_context(|| format!("creating the GPT of {}", out.display()))?;
    for p in &plan.partitions {
        let guid = Uuid::parse_str(&p.type_guid).expect("static GUIDs parse");
        disk.add_partition_at(
            &p.label,
            p.number,
            p.first_lba,
            p.sectors,
            Type {
                guid,
                os: OperatingSystem::Linux,
            },
            0,
        )
        .with_context(|| format!("adding partition {} ({}) to the GPT", p.number, p.mount))?;
    }
    if let Some(b) = &plan.bios_boot {
        disk.add_partition_at(
            "bios",
            b.number,
            b.first_lba,
            b.sectors,
            Type {
                guid: Uuid::parse_str(types::BIOS_BOOT).expect("static GUIDs parse"),
                os: OperatingSystem::None,
            },
            0,
        )
        .context("adding the BIOS boot partition to the GPT")?;
    }
    let mut entries = disk.partitions().clone();
    for (n, e) in entries.iter_mut() {
        if let Some(p) = plan.partitions.iter().find(|p| p.number == *n) {
            e.part_guid = p.part_guid;
        }
        if let Some(b) = plan.bios_boot.as_ref().filter(|b| b.number == *n) {
            e.part_guid = b.part_guid;
        }
    }
    disk.update_partitions(entries)
        .context("setting partition GUIDs")?;
    let f = disk
        .write()
        .with_context(|| format!("writing the GPT to {}", out.display()))?;
    // GRUB for BIOS first: it writes into the MBR, and everything before
    // the first partition must be final before the hashing starts.
    match (&plan.bios_boot, bios) {
        (Some(b), Some(img)) => install_bios_boot(&f, b, img)?,
        (None, None) => {}
        _ => bail!("the plan's BIOS boot partition and GRUB's BIOS images must come together"),
    }
    // The partitions in disk order; the hashing follows behind on a
    // thread of its own, each region once it is final.
    let mut order: Vec<(&PlannedPartition, &PathBuf)> = images
        .iter()
        .map(|(n, img)| {
            let p = plan
                .partitions
                .iter()
                .find(|p| p.number == *n)
                .expect("an image per planned partition");
            (p, img)
        })
        .collect();
    order.sort_by_key(|(p, _)| p.first_lba);
    let final_up_to = std::sync::Mutex::new(order.first().map_or(plan.size, |(p, _)| p.offset()));
    let moved = std::sync::Condvar::new();
    let reader = File::open(out).with_context(|| format!("opening {}", out.display()))?;
    let sha256 = std::thread::scope(|s| -> Result<String> {
        let hasher = s.spawn(|| -> Result<String> {
            let mut h = crate::formats::manifest::StreamHasher::<sha2::Sha256>::new(reader, out);
            let mut done = 0u64;
            while done < plan.size {
                let mut upto = final_up_to.lock().unwrap_or_else(|e| e.into_inner());
                while *upto <= done {
                    upto = moved.wait(upto).unwrap_or_else(|e| e.into_inner());
                }
                let target = *upto;
                drop(upto);
                if target == u64::MAX {
                    anyhow::bail!("the disk was not finished");
                }
                h.advance(target)?;
                done = target;
            }
            Ok(h.finish())
        });
        let copied = (|| -> Result<()> {
            let hand_over = |upto: u64| {
                *final_up_to.lock().unwrap_or_else(|e| e.into_inner()) = upto;
                moved.notify_all();
            };
            // In slices, so the hashing follows close behind.
            const SLICE: u64 = 64 << 20;
            for (i, (p, img)) in order.iter().enumerate() {
                let src = File::open(img).with_context(|| format!("opening {}", img.display()))?;
                let len = src
                    .metadata()
                    .with_context(|| format!("stat {}", img.display()))?
                    .len();
                let mut at = 0;
                while at < len {
                    let to = (at + SLICE).min(len);
                    fsutil::copy_sparse_range(&src, &f, p.offset(), at, to).with_context(|| {
                        format!("copying {} into {}", img.display(), out.display())
                    })?;
                    hand_over(p.offset() + to);
                    at = to;
                }
                hand_over(order.get(i + 1).map_or(plan.size, |(q, _)| q.offset()));
            }
            Ok(())
        })();
        if copied.is_err() {
            // The hashing stops rather than wait for regions never made.
            *final_up_to.lock().unwrap_or_else(|e| e.into_inner()) = u64::MAX;
            moved.notify_all();
        }
        let hashed = hasher
            .join()
            .map_err(|_| anyhow::anyhow!("hashing the disk panicked"))?;
        copied?;
        hashed
    })?;
    // Start writing it out now, without waiting: whoever keeps the disk
    // (the cache) syncs before marking it complete.
    // SAFETY: an open descriptor; the whole file.
    unsafe {
        libc::sync_file_range(
            std::os::unix::io::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    Ok(sha256)
}

/// What the disk phase made.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub kernel: String,
    /// SHA-256 of the disk image.
    pub sha256: String,
    pub partitions: Vec<(String, u64)>,
}

/// The disk's configuration in the tree: /etc/fstab and GRUB's
/// configuration. Returns the kernel version the image boots.
pub fn configure_tree(tree: &Path, profile: &Profile, plan: &DiskPlan) -> Result<String> {
    let kernel = kernel_version(tree)?;
    // Every partition's mount point, as the disk step will find it.
    for p in plan.partitions.iter().filter(|p| p.mount != "/") {
        let dir = tree.join(p.mount.trim_start_matches('/'));
        if dir.symlink_metadata().is_err() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating mount point {}", p.mount))?;
        }
    }
    let fstab = tree.join("etc/fstab");
    std::fs::write(&fstab, plan.fstab()).context("writing /etc/fstab")?;
    let grub_dir = tree.join("boot/grub");
    std::fs::create_dir_all(&grub_dir).context("creating /boot/grub")?;
    let cfg = grub_dir.join("grub.cfg");
    std::fs::write(&cfg, grub_cfg(plan, profile, &kernel, &plan.grub_lock))
        .context("writing /boot/grub/grub.cfg")?;
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600))
        .context("chmod grub.cfg")?;
    fsutil::lchown(&cfg, 0, 0)?;
    Ok(kernel)
}

/// The whole phase on a tree [`configure_tree`] prepared: BOOTX64.EFI,
/// every file system, the GPT disk at `out` (complete when this returns).
/// It needs a private mount namespace ([`crate::layers::private_mounts`]).
pub fn assemble(
    chroot: &Chroot,
    profile: &Profile,
    plan: &DiskPlan,
    work: &Path,
    out: &Path,
) -> Result<DiskReport> {
    let tree = chroot.root().to_path_buf();
    let kernel = kernel_version(&tree)?;
    progress::activity("boot loaders");
    let boot = boot_files(chroot, plan, profile)?;

    let stage_dir = work.join("parts");
    fsutil::remove_tree(&stage_dir)?;
    std::fs::create_dir_all(&stage_dir)
        .with_context(|| format!("creating {}", stage_dir.display()))?;
    // The partition images are made in memory (a tmpfs in the build's
    // mount namespace): mke2fs's flush and the copy into the disk then
    // cost no disk writes; only the disk itself is written. They are
    // sparse, so the memory they take is their data.
    let images_dir = work.join("images");
    std::fs::create_dir_all(&images_dir)
        .with_context(|| format!("creating {}", images_dir.display()))?;
    let _in_memory = crate::layers::Mount::new(
        "stemforge-images",
        &images_dir,
        "tmpfs",
        libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
        &format!("mode=0700,size={}", plan.size),
    )?;
    let images = {
        let sources = separate(&tree, &stage_dir, plan)?;
        make_filesystems(&tree, plan, &sources.carved, &images_dir, &boot.esp)?
    };
    progress::activity("writing the GPT disk (and hashing it)");
    let sha256 = write_gpt_disk(out, plan, &images, boot.bios.as_ref())?;
    for (_, img) in &images {
        let _ = std::fs::remove_file(img);
    }
    Ok(DiskReport {
        kernel,
        sha256,
        partitions: plan
            .partitions
            .iter()
            .map(|p| (p.mount.clone(), p.size()))
            .collect(),
    })
}

fn make_filesystems(
    tree: &Path,
    plan: &DiskPlan,
    carved: &[Carved],
    work: &Path,
    esp_files: &[(String, Vec<u8>)],
) -> Result<Vec<(u32, PathBuf)>> {
    let mut images = Vec::new();
    for p in &plan.partitions {
        let src = if p.mount == "/" {
            tree.to_path_buf()
        } else {
            carved
                .iter()
                .find(|c| c.mount == p.mount)
                .map(|c| c.staged.clone())
                .expect("every partition was carved")
        };
        let img = work.join(format!("part{}-{}.img", p.number, p.label));
        progress::activity(&format!("{} {}", p.fs.as_str(), p.mount));
        match p.fs {
            FsType::Ext4 => mkfs_ext4(&img, p, &src, plan.epoch)?,
            FsType::Vfat => write_esp(&img, p, &src, esp_files, plan.epoch)?,
        }
        images.push((p.number, img));
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{ProfileSource, load};

    fn profile() -> Profile {
        load("debian-bookworm", &ProfileSource::Embedded).unwrap()
    }

    #[test]
    fn plan_is_aligned_ordered_and_fits() {
        let p = profile();
        let plan = plan(&p, "seed", 1_700_000_000);
        assert_eq!(plan.partitions.len(), p.disk.partitions.len());
        let mut end = 0;
        for part in &plan.partitions {
            assert_eq!(part.offset() % ALIGN, 0, "{} aligned", part.mount);
            assert!(part.offset() >= end, "{} does not overlap", part.mount);
            end = part.offset() + part.size();
        }
        assert!(end + (1 << 20) <= plan.size, "backup GPT fits");
        assert_eq!(plan.esp().type_guid, types::ESP);
        assert_eq!(plan.root().type_guid, types::ROOT_X86_64);
        assert!(plan.esp().fs_uuid.len() == 9 && plan.esp().fs_uuid.contains('-'));
    }

    #[test]
    fn a_hybrid_plan_puts_the_bios_boot_partition_first_on_the_disk_last_in_the_table() {
        let p = profile();
        assert!(p.boot.bios);
        let plan = plan(&p, "seed", 1_700_000_000);
        let b = plan.bios_boot.as_ref().unwrap();
        assert_eq!((b.first_lba, b.sectors), (2048, 2048));
        assert_eq!(b.number as usize, p.disk.partitions.len() + 1);
        assert_eq!(plan.partitions[0].offset(), 2 << 20, "the ESP follows it");
        assert!(
            plan.describe().contains("(BIOS boot)"),
            "{}",
            plan.describe()
        );
        let mut plain = p.clone();
        plain.boot.bios = false;
        let plan = super::plan(&plain, "seed", 1_700_000_000);
        assert!(plan.bios_boot.is_none());
        assert_eq!(plan.partitions[0].offset(), 1 << 20);
    }

    #[test]
    fn bios_boot_code_points_at_core_img_and_keeps_the_partition_table() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("disk.img");
        let mut f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(8 << 20).unwrap();
        gpt::mbr::ProtectiveMBR::with_lb_size(16383)
            .overwrite_lba0(&mut f)
            .unwrap();
        let mut before = [0u8; 512];
        f.read_exact_at(&mut before, 0).unwrap();
        let boot = vec![0xAB; 512];
        // core.img: 2.5 sectors, as grub-mkimage leaves its block list
        // (start 2, its own length, segment 0x820).
        let mut core = vec![0xCD; 1280];
        core[500..512].copy_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0x20, 0x08]);
        let b = BiosBoot {
            number: 8,
            first_lba: 2048,
            sectors: 2048,
            part_guid: Uuid::nil(),
        };
        install_bios_boot(
            &f,
            &b,
            &BiosImages {
                boot: boot.clone(),
                core,
            },
        )
        .unwrap();
        let mut mbr = [0u8; 512];
        f.read_exact_at(&mut mbr, 0).unwrap();
        assert_eq!(&mbr[..0x5c], &boot[..0x5c]);
        assert_eq!(
            u64::from_le_bytes(mbr[0x5c..0x64].try_into().unwrap()),
            2048
        );
        assert_eq!((mbr[0x64], mbr[0x66], mbr[0x67]), (0xff, 0x90, 0x90));
        assert_eq!(&mbr[0x68..0x1b8], &boot[0x68..0x1b8]);
        assert_eq!(
            &mbr[0x1b8..],
            &before[0x1b8..],
            "disk signature and table kept"
        );
        let mut first = [0u8; 512];
        f.read_exact_at(&mut first, 2048 * 512).unwrap();
        assert_eq!(
            u64::from_le_bytes(first[500..508].try_into().unwrap()),
            2049
        );
        assert_eq!(
            u16::from_le_bytes([first[508], first[509]]),
            2,
            "the rest: 2 sectors"
        );
        assert_eq!(
            u16::from_le_bytes([first[510], first[511]]),
            0x820,
            "segment kept"
        );
        let mut third = [0u8; 512];
        f.read_exact_at(&mut third, 2050 * 512).unwrap();
        assert_eq!(&third[..256], &[0xCD; 256][..]);
        assert_eq!(&third[256..], &[0u8; 256][..], "padded to a whole sector");
        // A core image larger than the partition is refused.
        let small = BiosBoot { sectors: 2, ..b };
        let big = BiosImages {
            boot,
            core: vec![0; 1536],
        };
        let e = install_bios_boot(&f, &small, &big).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }

    #[test]
    fn the_signed_esp_takes_each_distributions_file_names() {
        let d = tempfile::tempdir().unwrap();
        let put = |rel: &str, body: &str| {
            let p = d.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        // Ubuntu: the current shim is `.latest`, MokManager is unsuffixed.
        put("usr/lib/shim/shimx64.efi.signed.latest", "shim-latest");
        put("usr/lib/shim/shimx64.efi.signed", "shim-old");
        put("usr/lib/shim/mmx64.efi", "mm");
        let e = signed_esp_files(d.path(), "ubuntu", b"cfg").unwrap_err();
        assert!(e.to_string().contains("grub-efi-amd64-signed"), "{e}");
        put("usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed", "grub");
        let files = signed_esp_files(d.path(), "ubuntu", b"cfg").unwrap();
        let get = |name: &str| {
            files
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        };
        assert_eq!(get("EFI/BOOT/BOOTX64.EFI").as_deref(), Some("shim-latest"));
        assert_eq!(get("EFI/BOOT/grubx64.efi").as_deref(), Some("grub"));
        assert_eq!(get("EFI/BOOT/mmx64.efi").as_deref(), Some("mm"));
        assert_eq!(get("EFI/ubuntu/grub.cfg").as_deref(), Some("cfg"));
        assert_eq!(get("EFI/BOOT/grub.cfg").as_deref(), Some("cfg"));
        // Debian: plain `.signed` names, MokManager signed separately.
        std::fs::remove_file(d.path().join("usr/lib/shim/shimx64.efi.signed.latest")).unwrap();
        put("usr/lib/shim/mmx64.efi.signed", "mm-signed");
        let files = signed_esp_files(d.path(), "debian", b"cfg").unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"EFI/debian/grub.cfg"), "{names:?}");
        assert!(
            files
                .iter()
                .any(|(n, b)| n == "EFI/BOOT/mmx64.efi" && b == b"mm-signed")
        );
        assert!(
            files
                .iter()
                .any(|(n, b)| n == "EFI/BOOT/BOOTX64.EFI" && b == b"shim-old")
        );
        // Every name fits FAT's 8.3 form (the ESP is written without long
        // names).
        for n in names {
            for part in n.split('/') {
                let (stem, ext) = part.split_once('.').unwrap_or((part, ""));
                assert!(stem.len() <= 8 && ext.len() <= 3, "{part}");
            }
        }
    }

    #[test]
    fn fstab_lists_uuids_options_and_extra_mounts() {
        let plan = plan(&profile(), "seed", 1_700_000_000);
        let f = plan.fstab();
        let root = format!(
            "UUID={}\t/\text4\terrors=remount-ro\t0\t1",
            plan.root().fs_uuid
        );
        assert!(f.contains(&root), "{f}");
        assert!(f.contains("\t/tmp\text4\tnodev,nosuid,noexec\t0\t2"), "{f}");
        assert!(
            f.contains("tmpfs\t/dev/shm\ttmpfs\tnodev,nosuid,noexec\t0\t0"),
            "{f}"
        );
        assert!(
            f.contains("/tmp\t/var/tmp\tnone\tbind,nodev,nosuid,noexec\t0\t0"),
            "{f}"
        );
        // Parents come before children.
        let pos = |m: &str| f.find(&format!("\t{m}\t")).unwrap();
        assert!(pos("/var") < pos("/var/log") && pos("/var/log") < pos("/var/log/audit"));
        // The scanner reads what the disk phase writes.
        let parsed = crate::scan::kinds::mount::parse_fstab(&f);
        assert_eq!(parsed.len(), plan.partitions.len() + plan.mounts.len());
    }

    #[test]
    fn grub_pbkdf2_matches_a_known_vector() {
        // PBKDF2-HMAC-SHA512("password", "salt", 1), first bytes.
        let h = grub_pbkdf2(b"password", b"salt", 1);
        assert!(
            h.starts_with("grub.pbkdf2.sha512.1.73616C74.867F70CF1ADE02CF"),
            "{h}"
        );
        let locked = locked_grub_password_hash("seed");
        let re = regex::Regex::new(r"^grub\.pbkdf2\.sha512\.10000\.[0-9A-F]{128}\.[0-9A-F]{128}$")
            .unwrap();
        assert!(re.is_match(&locked), "{locked}");
        assert_eq!(locked, locked_grub_password_hash("seed"));
        assert_ne!(locked, locked_grub_password_hash("other inputs"));
    }

    #[test]
    fn grub_cfg_restricts_all_but_the_normal_entry() {
        let p = profile();
        let plan = plan(&p, "seed", 1_700_000_000);
        let cfg = grub_cfg(
            &plan,
            &p,
            "6.1.0-50-amd64",
            "grub.pbkdf2.sha512.10000.AA.BB",
        );
        assert!(cfg.contains(
            "set superusers=\"root\"\npassword_pbkdf2 root grub.pbkdf2.sha512.10000.AA.BB"
        ));
        assert!(cfg.contains("--id stemforge --unrestricted {"), "{cfg}");
        assert!(
            cfg.contains("--id stemforge-recovery --users root {"),
            "{cfg}"
        );
        let linux = format!(
            "root=UUID={} ro console=tty1 console=ttyS0,115200n8 audit=1 audit_backlog_limit=8192 apparmor=1 security=apparmor\n",
            plan.root().fs_uuid
        );
        assert!(cfg.contains(&linux), "{cfg}");
        assert!(cfg.contains(" ro single console=tty1"), "{cfg}");
        assert!(cfg.contains("linux /boot/vmlinuz-6.1.0-50-amd64"));
        assert!(early_cfg(&plan).contains(&plan.root().fs_uuid));
    }

    #[test]
    fn kernel_versions_sort_numerically() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("boot")).unwrap();
        for v in ["6.1.0-9-amd64", "6.1.0-50-amd64", "6.1.0-51-amd64"] {
            std::fs::write(d.path().join(format!("boot/vmlinuz-{v}")), "").unwrap();
        }
        for v in ["6.1.0-9-amd64", "6.1.0-50-amd64"] {
            std::fs::write(d.path().join(format!("boot/initrd.img-{v}")), "").unwrap();
        }
        assert_eq!(kernel_version(d.path()).unwrap(), "6.1.0-50-amd64");
    }

    #[test]
    fn the_esp_passes_fsck_fat() {
        let d = tempfile::tempdir().unwrap();
        let plan = plan(&profile(), "seed", 1_700_000_000);
        let src = d.path().join("efi");
        std::fs::create_dir_all(src.join("VENDOR")).unwrap();
        std::fs::write(src.join("VENDOR/NOTE.TXT"), "x").unwrap();
        let img = d.path().join("esp.img");
        write_esp(
            &img,
            plan.esp(),
            &src,
            &[("EFI/BOOT/BOOTX64.EFI".into(), vec![0x4d; 700_000])],
            plan.epoch,
        )
        .unwrap();
        // The same inputs a second later: the same bytes.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let again = d.path().join("esp2.img");
        write_esp(
            &again,
            plan.esp(),
            &src,
            &[("EFI/BOOT/BOOTX64.EFI".into(), vec![0x4d; 700_000])],
            plan.epoch,
        )
        .unwrap();
        assert_eq!(
            crate::reproducible::first_byte_difference(&img, &again).unwrap(),
            None
        );
        let out = cmd("fsck.fat", ["-n", "-v"])
            .arg(&img)
            .run_unchecked()
            .expect("fsck.fat (dosfstools) is installed");
        let text = out.stdout_str();
        assert!(out.status.success(), "fsck.fat: {text}{}", out.stderr_str());
        for bad in [
            "Expected a valid",
            "share clusters",
            "Bad short file name",
            "Invalid",
            "Deleting",
        ] {
            assert!(!text.contains(bad), "fsck.fat found problems:\n{text}");
        }
        assert!(
            text.contains(&format!("Volume id {:08x}", plan.esp().fat_id))
                || text.contains("FAT32")
                || text.contains("32 bit entries"),
            "{text}"
        );
        let listing = cmd("fsck.fat", ["-n", "-l"]).arg(&img).read().unwrap();
        assert!(listing.contains("/EFI/BOOT/BOOTX64.EFI"), "{listing}");
        assert!(listing.contains("/VENDOR/NOTE.TXT"), "{listing}");
    }

    #[test]
    fn the_disk_is_hashed_as_it_is_written() {
        let d = tempfile::tempdir().unwrap();
        let plan = plan(&profile(), "seed", 1_700_000_000);
        let images: Vec<(u32, PathBuf)> = plan
            .partitions
            .iter()
            .map(|p| {
                let img = d.path().join(format!("p{}", p.number));
                let f = File::create(&img).unwrap();
                f.set_len(3 << 20).unwrap();
                use std::os::unix::fs::FileExt;
                f.write_all_at(format!("partition {}", p.number).as_bytes(), 1 << 20)
                    .unwrap();
                (p.number, img)
            })
            .collect();
        let out = d.path().join("disk.raw");
        let bios = plan.bios_boot.as_ref().map(|_| BiosImages {
            boot: vec![0x11; SECTOR as usize],
            core: vec![0x22; 4 * SECTOR as usize],
        });
        let got = write_gpt_disk(&out, &plan, &images, bios.as_ref()).unwrap();
        assert_eq!(
            got,
            crate::formats::manifest::digest_file::<sha2::Sha256>(&out).unwrap()
        );
        use std::os::unix::fs::FileExt;
        let root = plan.partitions.iter().find(|p| p.number == 2).unwrap();
        let mut window = [0u8; 11];
        File::open(&out)
            .unwrap()
            .read_exact_at(&mut window, root.offset() + (1 << 20))
            .unwrap();
        assert_eq!(&window, b"partition 2", "the partitions were copied in");
    }

    #[test]
    #[ignore = "needs root (mounts, in a mount namespace of its own)"]
    fn separating_gives_each_partition_its_subtree_and_leaves_the_tree_alone() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        for dir in ["var/log/audit", "tmp", "home", "boot/efi"] {
            std::fs::create_dir_all(tree.join(dir)).unwrap();
        }
        std::fs::set_permissions(tree.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        std::fs::write(tree.join("var/log/audit/a.log"), "a").unwrap();
        std::fs::write(tree.join("var/log/syslog"), "s").unwrap();
        std::fs::write(tree.join("var/x"), "x").unwrap();
        let staged = d.path().join("parts");
        std::fs::create_dir(&staged).unwrap();
        let plan = plan(&profile(), "seed", 1_700_000_000);
        // A thread of its own: the namespace stays with it.
        std::thread::spawn(move || {
            crate::layers::private_mounts().unwrap();
            let sep = separate(&tree, &staged, &plan).unwrap();
            assert!(staged.join("audit/a.log").exists());
            assert!(staged.join("var-log/syslog").exists());
            assert!(staged.join("var-log/audit").is_dir());
            assert!(!staged.join("var-log/audit/a.log").exists());
            assert!(staged.join("var/x").exists());
            assert_eq!(
                std::fs::read_dir(staged.join("var/log")).unwrap().count(),
                0
            );
            assert_eq!(std::fs::read_dir(tree.join("var")).unwrap().count(), 0);
            assert_eq!(std::fs::read_dir(tree.join("tmp")).unwrap().count(), 0);
            assert_eq!(tree.join("tmp").metadata().unwrap().mode() & 0o7777, 0o1777);
            assert_eq!(sep.carved.len(), 6);
            drop(sep);
            assert!(tree.join("var/log/audit/a.log").exists());
            assert!(tree.join("var/log/syslog").exists());
            assert!(tree.join("var/x").exists());
            assert_eq!(tree.join("tmp").metadata().unwrap().mode() & 0o7777, 0o1777);
        })
        .join()
        .unwrap();
    }
}
