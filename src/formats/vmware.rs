//! vSphere outputs: a streamOptimized VMDK, an OVF 1.x envelope and an OVA.
//!
//! The VMDK is made by `qemu-img convert` (single-threaded: qemu-img
//! deflates the grains of a streamOptimized disk one after the other).
//! qemu-img writes the grain directory ahead of the grains and leaves the
//! zero-filled rest of the last grain's cluster as the end of the file, so
//! the stream has neither footer nor end-of-stream marker, and a truncated
//! file still looks whole to `qemu-img check`. [`vmdk`] therefore ends the
//! stream the way VMware's Virtual Disk Format 5.0 lays it out (footer
//! marker, footer, end-of-stream marker), and [`check_vmdk`] checks the
//! header, the embedded descriptor, every grain pointer and that tail.
//!
//! The `.ovf`, `.mf` and `.vmdk` are made by separate functions because a
//! BOSH vSphere stemcell packs the same three files.

use super::{Artifact, Format, Job, Producer, Products, input};
use crate::config::format_size;
use crate::exec::cmd;
use crate::fsutil;
use anyhow::{Context, Result, bail, ensure};
use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesText, Event};
use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// vSphere virtual hardware version of the OVF (`vmx-13`: ESXi 6.5 and
/// newer) and of the VMDK descriptor.
pub const HW_VERSION: u32 = 13;
/// `ddb.toolsVersion`: tools managed by the guest (open-vm-tools).
pub const TOOLS_VERSION: &str = "2147483647";
/// `ddb.adapterType`: VMware records SCSI disks, pvscsi ones included,
/// as `lsilogic`.
pub const ADAPTER_TYPE: &str = "lsilogic";
/// The network the NIC is connected to (vSphere's default port group).
pub const NETWORK: &str = "VM Network";
/// `ovf:format` of a streamOptimized VMDK.
pub const VMDK_FORMAT: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";

const OVF_NS: &str = "http://schemas.dmtf.org/ovf/envelope/1";
const RASD_NS: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData";
const VSSD_NS: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData";
const VMW_NS: &str = "http://www.vmware.com/schema/ovf";

/// The virtual machine an OVF describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// vSphere guest id, e.g. "debian12_64Guest", "ubuntu64Guest".
    pub os_type: String,
    /// CIM_OperatingSystem.OsType: 96 Debian 64-bit, 94 Ubuntu 64-bit,
    /// 101 Linux 64-bit.
    pub os_id: u16,
    pub os_version: String,
    pub os_description: String,
    pub product: String,
    pub version: String,
    /// The UEFI path is signed (shim): vSphere may enforce Secure Boot.
    pub secure_boot: bool,
}

impl VmSpec {
    /// 2 vCPUs and 2 GiB of memory, the guest ids vSphere knows for
    /// `distro` `version` ("debian" "12", "ubuntu" "24.04").
    pub fn for_os(name: &str, distro: &str, version: &str, image_version: &str) -> VmSpec {
        let major = version.split('.').next().unwrap_or_default();
        let (os_type, os_id, pretty) = match distro {
            "debian" => {
                let guest = match major {
                    "10" | "11" | "12" => format!("debian{major}_64Guest"),
                    _ => "otherLinux64Guest".to_string(),
                };
                (guest, 96, "Debian GNU/Linux")
            }
            "ubuntu" => ("ubuntu64Guest".to_string(), 94, "Ubuntu"),
            other => ("otherLinux64Guest".to_string(), 101, other),
        };
        VmSpec {
            name: name.to_string(),
            cpus: 2,
            memory_mib: 2048,
            os_type,
            os_id,
            os_version: version.to_string(),
            os_description: format!("{pretty} {version} (64-bit)"),
            product: name.to_string(),
            version: image_version.to_string(),
            secure_boot: false,
        }
    }
}

/// What a streamOptimized VMDK says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmdkInfo {
    /// Sparse header version (3 for streamOptimized).
    pub version: u32,
    /// Virtual disk size.
    pub capacity_bytes: u64,
    pub create_type: String,
    pub adapter_type: String,
    pub hw_version: String,
    pub tools_version: String,
    /// Size of the VMDK file.
    pub size: u64,
    /// Grains (64 KiB of the virtual disk each) the stream carries.
    pub grains: u64,
}

// ---------------------------------------------------------------- VMDK

const SECTOR: u64 = 512;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const GD_AT_END: u64 = u64::MAX;
const COMPRESSION_DEFLATE: u16 = 1;
const MARKER_FOOTER: u32 = 3;
/// Sectors after the last grain: footer marker, footer, end-of-stream.
const TAIL_SECTORS: u64 = 3;

/// The fields of a sparse extent header (or footer) this module reads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SparseHeader {
    version: u32,
    flags: u32,
    capacity: u64,
    grain_size: u64,
    descriptor_offset: u64,
    descriptor_size: u64,
    gtes_per_gt: u32,
    gd_offset: u64,
    overhead: u64,
    compression: u16,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl SparseHeader {
    fn parse(s: &[u8; 512]) -> Result<SparseHeader> {
        ensure!(&s[0..4] == b"KDMV", "no sparse header (magic KDMV)");
        let h = SparseHeader {
            version: le32(s, 4),
            flags: le32(s, 8),
            capacity: le64(s, 12),
            grain_size: le64(s, 20),
            descriptor_offset: le64(s, 28),
            descriptor_size: le64(s, 36),
            gtes_per_gt: le32(s, 44),
            gd_offset: le64(s, 56),
            overhead: le64(s, 64),
            compression: u16::from_le_bytes([s[77], s[78]]),
        };
        ensure!(h.version == 3, "header version {} (expected 3)", h.version);
        let stream = FLAG_COMPRESSED | FLAG_MARKERS;
        ensure!(
            h.flags & stream == stream,
            "header flags {:#x} lack compressed grains and markers",
            h.flags
        );
        // Damaged by a text-mode transfer if these are not "\n \r\n".
        ensure!(
            &s[73..77] == b"\n \r\n",
            "header newline check bytes are wrong"
        );
        ensure!(
            h.compression == COMPRESSION_DEFLATE,
            "compression {} (expected 1, deflate)",
            h.compression
        );
        ensure!(
            h.capacity > 0 && h.grain_size > 0,
            "empty capacity or grain"
        );
        ensure!(h.gtes_per_gt > 0, "no grain table entries per table");
        ensure!(
            h.descriptor_offset > 0 && h.descriptor_size > 0,
            "no embedded descriptor"
        );
        Ok(h)
    }

    fn grain_tables(&self) -> u64 {
        self.capacity
            .div_ceil(self.grain_size)
            .div_ceil(u64::from(self.gtes_per_gt))
    }
}

fn read_sector(f: &File, sector: u64) -> Result<[u8; 512]> {
    let mut s = [0u8; 512];
    f.read_exact_at(&mut s, sector * SECTOR)
        .with_context(|| format!("reading sector {sector}"))?;
    Ok(s)
}

/// Every grain pointer of the grain directory at `gd_offset`, checked
/// against its grain marker: returns the number of grains and the sector
/// after the last one's data. Nothing may reach `limit` (a sector).
fn scan_grains(f: &File, h: &SparseHeader, gd_offset: u64, limit: u64) -> Result<(u64, u64)> {
    ensure!(
        gd_offset < limit,
        "grain directory at sector {gd_offset} lies beyond the data (sector {limit})"
    );
    let tables = h.grain_tables();
    let mut gd = vec![0u8; tables as usize * 4];
    f.read_exact_at(&mut gd, gd_offset * SECTOR)
        .context("reading the grain directory")?;
    let mut gt = vec![0u8; h.gtes_per_gt as usize * 4];
    let (mut grains, mut end) = (0u64, h.overhead);
    for t in 0..tables {
        let gt_sector = u64::from(le32(&gd, t as usize * 4));
        ensure!(
            gt_sector > 0 && gt_sector < limit,
            "grain table {t} at sector {gt_sector} lies outside the file"
        );
        f.read_exact_at(&mut gt, gt_sector * SECTOR)
            .with_context(|| format!("reading grain table {t}"))?;
        for e in 0..u64::from(h.gtes_per_gt) {
            let sector = u64::from(le32(&gt, e as usize * 4));
            if sector == 0 {
                continue;
            }
            let lba = (t * u64::from(h.gtes_per_gt) + e) * h.grain_size;
            end = end.max(check_grain(f, sector, lba, limit)?);
            grains += 1;
        }
    }
    Ok((grains, end))
}

/// The grain marker at `sector` must name `lba` and its data end before
/// `limit`; returns the sector after it.
fn check_grain(f: &File, sector: u64, lba: u64, limit: u64) -> Result<u64> {
    ensure!(
        sector < limit,
        "grain of LBA {lba} at sector {sector} lies beyond the data (sector {limit})"
    );
    let mut m = [0u8; 12];
    f.read_exact_at(&mut m, sector * SECTOR)
        .with_context(|| format!("reading the grain marker at sector {sector}"))?;
    let (at, size) = (le64(&m, 0), u64::from(le32(&m, 8)));
    ensure!(
        at == lba && size > 0,
        "grain marker at sector {sector} names LBA {at} (size {size}), expected LBA {lba}"
    );
    let end = (sector * SECTOR + 12 + size).div_ceil(SECTOR);
    ensure!(
        end <= limit,
        "grain of LBA {lba} runs past sector {limit} (the data is cut short)"
    );
    Ok(end)
}

/// The footer marker (`val` 1 sector, `size` 0, type 3) and the
/// end-of-stream marker (all zero).
fn tail_markers() -> ([u8; 512], [u8; 512]) {
    let mut footer_marker = [0u8; 512];
    footer_marker[0..8].copy_from_slice(&1u64.to_le_bytes());
    footer_marker[12..16].copy_from_slice(&MARKER_FOOTER.to_le_bytes());
    (footer_marker, [0u8; 512])
}

/// Check the last three sectors (footer marker, footer, end-of-stream
/// marker) against the header; returns the footer.
fn check_tail(f: &File, h: &SparseHeader, sectors: u64) -> Result<SparseHeader> {
    let (footer_marker, eos) = tail_markers();
    ensure!(
        sectors >= h.overhead + TAIL_SECTORS,
        "{sectors} sectors cannot hold the metadata and the stream's end"
    );
    ensure!(
        read_sector(f, sectors - 1)? == eos,
        "the last sector is not an end-of-stream marker (the file is truncated)"
    );
    ensure!(
        read_sector(f, sectors - 3)? == footer_marker,
        "no footer marker before the footer (the file is truncated)"
    );
    let footer = SparseHeader::parse(&read_sector(f, sectors - 2)?).context("in the footer")?;
    let same = (
        footer.capacity,
        footer.grain_size,
        footer.descriptor_offset,
        footer.descriptor_size,
        footer.gtes_per_gt,
    ) == (
        h.capacity,
        h.grain_size,
        h.descriptor_offset,
        h.descriptor_size,
        h.gtes_per_gt,
    );
    ensure!(same, "the footer disagrees with the header");
    ensure!(
        footer.gd_offset != GD_AT_END
            && (h.gd_offset == GD_AT_END || h.gd_offset == footer.gd_offset),
        "the footer's grain directory offset is unusable"
    );
    Ok(footer)
}

/// The `key=value` lines of an embedded descriptor and its extent lines.
struct Descriptor {
    pairs: Vec<(String, String)>,
    extents: Vec<String>,
}

impl Descriptor {
    fn parse(text: &str) -> Descriptor {
        let mut d = Descriptor {
            pairs: Vec::new(),
            extents: Vec::new(),
        };
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('=') {
                Some((k, v)) if !k.contains('"') => d
                    .pairs
                    .push((k.trim().to_string(), v.trim().trim_matches('"').to_string())),
                _ => d.extents.push(line.to_string()),
            }
        }
        d
    }

    fn get(&self, key: &str) -> Result<String> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("the descriptor has no {key}"))
    }
}

fn read_descriptor(f: &File, h: &SparseHeader) -> Result<Descriptor> {
    ensure!(
        h.descriptor_size <= 2048,
        "descriptor of {} sectors",
        h.descriptor_size
    );
    let mut buf = vec![0u8; (h.descriptor_size * SECTOR) as usize];
    f.read_exact_at(&mut buf, h.descriptor_offset * SECTOR)
        .context("reading the embedded descriptor")?;
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(Descriptor::parse(&String::from_utf8_lossy(&buf[..len])))
}

/// The descriptor's fields, checked: one sparse extent as large as the
/// header's capacity, createType streamOptimized.
fn descriptor_info(d: &Descriptor, h: &SparseHeader) -> Result<VmdkInfo> {
    let create_type = d.get("createType")?;
    ensure!(
        create_type == "streamOptimized",
        "createType is \"{create_type}\" (expected \"streamOptimized\")"
    );
    let extent = match d.extents.as_slice() {
        [one] => one.split_whitespace().collect::<Vec<_>>(),
        other => bail!("{} extent lines (expected one)", other.len()),
    };
    let sectors = h.capacity.to_string();
    ensure!(
        extent.len() >= 3 && extent[0] == "RW" && extent[1] == sectors && extent[2] == "SPARSE",
        "extent line `{}` is not `RW {sectors} SPARSE ...`",
        extent.join(" ")
    );
    Ok(VmdkInfo {
        version: h.version,
        capacity_bytes: h.capacity * SECTOR,
        create_type,
        adapter_type: d.get("ddb.adapterType")?,
        hw_version: d.get("ddb.virtualHWVersion")?,
        tools_version: d.get("ddb.toolsVersion")?,
        size: 0,
        grains: 0,
    })
}

/// Check a streamOptimized VMDK: the sparse header (magic, version 3,
/// flags, capacity, descriptor), the embedded descriptor (createType,
/// ddb.adapterType, ddb.virtualHWVersion, ddb.toolsVersion), every grain
/// table entry against its grain marker, and the end of the stream
/// (footer marker, footer, end-of-stream marker). A truncated file is an
/// error naming it.
pub fn check_vmdk(path: &Path) -> Result<VmdkInfo> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    check_stream(&f, size)
        .with_context(|| format!("{} is not a complete streamOptimized VMDK", path.display()))
}

fn check_stream(f: &File, size: u64) -> Result<VmdkInfo> {
    ensure!(
        size >= 4 * SECTOR && size % SECTOR == 0,
        "{size} bytes is not a whole number of sectors (the file is truncated)"
    );
    let h = SparseHeader::parse(&read_sector(f, 0)?).context("in the header")?;
    let mut info = descriptor_info(&read_descriptor(f, &h)?, &h)?;
    let sectors = size / SECTOR;
    let footer = check_tail(f, &h, sectors)?;
    let (grains, _) = scan_grains(f, &h, footer.gd_offset, sectors - TAIL_SECTORS)?;
    info.size = size;
    info.grains = grains;
    Ok(info)
}

/// End the stream qemu-img wrote: cut the zero fill after the last grain
/// and append footer marker, footer (the header, whose grain directory
/// offset is real) and end-of-stream marker. A stream that already ends
/// that way is left as it is.
fn seal_stream(path: &Path) -> Result<()> {
    let f = File::options()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata().context("stat")?.len();
    ensure!(
        size % SECTOR == 0,
        "{size} bytes is not a whole number of sectors"
    );
    let header_sector = read_sector(&f, 0)?;
    let h = SparseHeader::parse(&header_sector)?;
    if check_tail(&f, &h, size / SECTOR).is_ok() {
        return Ok(());
    }
    ensure!(h.gd_offset != GD_AT_END, "no footer and no grain directory");
    let (_, end) = scan_grains(&f, &h, h.gd_offset, size / SECTOR)?;
    ensure_zero(&f, end * SECTOR, size)?;
    f.set_len(end * SECTOR).context("cutting the zero fill")?;
    let (footer_marker, eos) = tail_markers();
    let mut tail = Vec::with_capacity(3 * SECTOR as usize);
    tail.extend_from_slice(&footer_marker);
    tail.extend_from_slice(&header_sector);
    tail.extend_from_slice(&eos);
    f.write_all_at(&tail, end * SECTOR)
        .context("writing the footer and end-of-stream marker")?;
    f.sync_all().context("syncing")
}

/// Bytes `from..to` of `f` are all zero (only fill is ever cut).
fn ensure_zero(f: &File, from: u64, to: u64) -> Result<()> {
    let mut buf = vec![0u8; (to.saturating_sub(from)).min(1 << 20) as usize];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], at)
            .context("reading the fill")?;
        ensure!(
            buf[..n].iter().all(|b| *b == 0),
            "data after the last grain at byte {at}"
        );
        at += n as u64;
    }
    Ok(())
}

/// The content ID of the build's VMDK, derived from its inputs.
pub fn vmdk_cid(input_hash: &str) -> u32 {
    let b = crate::reproducible::derived_bytes(input_hash, "vmdk cid");
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Convert a raw disk to a streamOptimized VMDK at `out`: qemu-img writes
/// it under a temporary name, the stream is ended as the format lays it
/// out and checked with [`check_vmdk`], then it is renamed.
pub fn vmdk(raw: &Path, out: &Path, cid: u32) -> Result<VmdkInfo> {
    // The descriptor names the extent after the file qemu-img writes, so
    // the temporary file keeps the final name inside a temporary directory.
    let dir = fsutil::partial_path(out);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = dir.join(out.file_name().context("the VMDK path has no file name")?);
    let made = convert(raw, &partial, cid);
    let result = made.and_then(|info| {
        fsutil::commit(&partial, out)?;
        Ok(info)
    });
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    result
}

fn convert(raw: &Path, partial: &Path, cid: u32) -> Result<VmdkInfo> {
    let options = format!(
        "subformat=streamOptimized,adapter_type={ADAPTER_TYPE},\
         hwversion={HW_VERSION},toolsversion={TOOLS_VERSION}"
    );
    cmd(
        "qemu-img",
        ["convert", "-q", "-f", "raw", "-O", "vmdk", "-o"],
    )
    .arg(options)
    .arg(raw)
    .arg(partial)
    .run()
    .with_context(|| format!("converting {} to a streamOptimized VMDK", raw.display()))?;
    seal_stream(partial).with_context(|| format!("ending the stream of {}", partial.display()))?;
    set_cid(partial, cid).with_context(|| format!("setting the CID of {}", partial.display()))?;
    check_vmdk(partial)
}

/// Put `cid` into the embedded descriptor's `CID=` line in place of the
/// random one qemu-img writes, so the same disk gives the same VMDK. The
/// descriptor is text padded with zeros to its sectors; it is written
/// back the same way.
fn set_cid(path: &Path, cid: u32) -> Result<()> {
    let f = File::options()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let h = SparseHeader::parse(&read_sector(&f, 0)?)?;
    ensure!(
        h.descriptor_size <= 2048,
        "descriptor of {} sectors",
        h.descriptor_size
    );
    let mut buf = vec![0u8; (h.descriptor_size * SECTOR) as usize];
    f.read_exact_at(&mut buf, h.descriptor_offset * SECTOR)
        .context("reading the descriptor")?;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let text = std::str::from_utf8(&buf[..end]).context("the descriptor is not text")?;
    let mut found = false;
    let out: String = text
        .split_inclusive('\n')
        .map(|line| {
            if line.starts_with("CID=") {
                found = true;
                format!("CID={cid:08x}\n")
            } else {
                line.to_string()
            }
        })
        .collect();
    ensure!(found, "the descriptor has no CID line");
    ensure!(
        out.len() <= buf.len(),
        "the descriptor outgrows its sectors"
    );
    let mut bytes = out.into_bytes();
    bytes.resize(buf.len(), 0);
    f.write_all_at(&bytes, h.descriptor_offset * SECTOR)
        .context("writing the descriptor")?;
    f.sync_all().context("syncing")
}

// ----------------------------------------------------------------- OVF

/// One `Item` of a VirtualHardwareSection. [`Item::write`] emits the
/// fields in the order CIM_ResourceAllocationSettingData defines.
#[derive(Default)]
struct Item {
    address: Option<String>,
    address_on_parent: Option<String>,
    allocation_units: Option<String>,
    automatic_allocation: Option<bool>,
    connection: Option<String>,
    description: Option<String>,
    element_name: String,
    host_resource: Option<String>,
    instance_id: u32,
    parent: Option<u32>,
    resource_sub_type: Option<String>,
    resource_type: u16,
    virtual_quantity: Option<u64>,
}

impl Item {
    fn fields(&self) -> Vec<(&'static str, String)> {
        let fields = [
            ("rasd:Address", self.address.clone()),
            ("rasd:AddressOnParent", self.address_on_parent.clone()),
            ("rasd:AllocationUnits", self.allocation_units.clone()),
            (
                "rasd:AutomaticAllocation",
                self.automatic_allocation.map(|b| b.to_string()),
            ),
            ("rasd:Connection", self.connection.clone()),
            ("rasd:Description", self.description.clone()),
            ("rasd:ElementName", Some(self.element_name.clone())),
            ("rasd:HostResource", self.host_resource.clone()),
            ("rasd:InstanceID", Some(self.instance_id.to_string())),
            ("rasd:Parent", self.parent.map(|p| p.to_string())),
            ("rasd:ResourceSubType", self.resource_sub_type.clone()),
            ("rasd:ResourceType", Some(self.resource_type.to_string())),
            (
                "rasd:VirtualQuantity",
                self.virtual_quantity.map(|q| q.to_string()),
            ),
        ];
        fields
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect()
    }

    fn write(&self, w: &mut Writer<Vec<u8>>) -> std::io::Result<()> {
        w.create_element("Item").write_inner_content(|w| {
            for (name, value) in self.fields() {
                text_element(w, name, &value)?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

fn text_element(w: &mut Writer<Vec<u8>>, name: &str, text: &str) -> std::io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

/// `<vmw:Config ovf:required="false" vmw:key=KEY vmw:value=VALUE/>`
fn vmw_config(w: &mut Writer<Vec<u8>>, key: &str, value: &str) -> std::io::Result<()> {
    w.create_element("vmw:Config")
        .with_attributes([
            ("ovf:required", "false"),
            ("vmw:key", key),
            ("vmw:value", value),
        ])
        .write_empty()?;
    Ok(())
}

const CONTROLLER_ID: u32 = 3;

/// CPU, memory, a pvscsi controller with the disk, a VmxNet3 NIC.
fn hardware_items(spec: &VmSpec) -> [Item; 5] {
    [
        Item {
            allocation_units: Some("hertz * 10^6".into()),
            description: Some("Number of virtual CPUs".into()),
            element_name: format!("{} virtual CPU(s)", spec.cpus),
            instance_id: 1,
            resource_type: 3,
            virtual_quantity: Some(spec.cpus.into()),
            ..Item::default()
        },
        Item {
            allocation_units: Some("byte * 2^20".into()),
            description: Some("Memory size".into()),
            element_name: format!("{} MB of memory", spec.memory_mib),
            instance_id: 2,
            resource_type: 4,
            virtual_quantity: Some(spec.memory_mib),
            ..Item::default()
        },
        Item {
            address: Some("0".into()),
            description: Some("SCSI controller".into()),
            element_name: "SCSI controller 0".into(),
            instance_id: CONTROLLER_ID,
            resource_sub_type: Some("VirtualSCSI".into()),
            resource_type: 6,
            ..Item::default()
        },
        Item {
            address_on_parent: Some("0".into()),
            element_name: "Hard disk 1".into(),
            host_resource: Some("ovf:/disk/vmdisk1".into()),
            instance_id: 4,
            parent: Some(CONTROLLER_ID),
            resource_type: 17,
            ..Item::default()
        },
        Item {
            automatic_allocation: Some(true),
            connection: Some(NETWORK.into()),
            description: Some(format!("VmxNet3 ethernet adapter on \"{NETWORK}\"")),
            element_name: "Network adapter 1".into(),
            instance_id: 5,
            resource_sub_type: Some("VmxNet3".into()),
            resource_type: 10,
            ..Item::default()
        },
    ]
}

fn virtual_hardware(w: &mut Writer<Vec<u8>>, spec: &VmSpec) -> std::io::Result<()> {
    text_element(w, "Info", "Virtual hardware requirements")?;
    w.create_element("System").write_inner_content(|w| {
        text_element(w, "vssd:ElementName", "Virtual Hardware Family")?;
        text_element(w, "vssd:InstanceID", "0")?;
        text_element(w, "vssd:VirtualSystemIdentifier", &spec.name)?;
        text_element(w, "vssd:VirtualSystemType", &format!("vmx-{HW_VERSION}"))
    })?;
    for item in hardware_items(spec) {
        item.write(w)?;
    }
    vmw_config(w, "firmware", "efi")?;
    // On when the UEFI path starts with the distribution's signed shim.
    vmw_config(
        w,
        "bootOptions.efiSecureBootEnabled",
        if spec.secure_boot { "true" } else { "false" },
    )
}

fn virtual_system(w: &mut Writer<Vec<u8>>, spec: &VmSpec) -> std::io::Result<()> {
    text_element(w, "Info", "A virtual machine")?;
    text_element(w, "Name", &spec.name)?;
    w.create_element("OperatingSystemSection")
        .with_attributes([
            ("ovf:id", spec.os_id.to_string().as_str()),
            ("ovf:version", spec.os_version.as_str()),
            ("vmw:osType", spec.os_type.as_str()),
        ])
        .write_inner_content(|w| {
            text_element(w, "Info", "The operating system installed")?;
            text_element(w, "Description", &spec.os_description)
        })?;
    w.create_element("VirtualHardwareSection")
        .write_inner_content(|w| virtual_hardware(w, spec))?;
    w.create_element("ProductSection")
        .write_inner_content(|w| {
            text_element(w, "Info", "Information about the installed software")?;
            text_element(w, "Product", &spec.product)?;
            text_element(w, "Version", &spec.version)?;
            text_element(w, "FullVersion", &spec.version)
        })?;
    Ok(())
}

fn envelope(
    w: &mut Writer<Vec<u8>>,
    spec: &VmSpec,
    file: &str,
    disk: &VmdkInfo,
) -> std::io::Result<()> {
    let size = disk.size.to_string();
    let capacity = disk.capacity_bytes.to_string();
    w.create_element("References").write_inner_content(|w| {
        w.create_element("File")
            .with_attributes([
                ("ovf:href", file),
                ("ovf:id", "file1"),
                ("ovf:size", size.as_str()),
            ])
            .write_empty()?;
        Ok(())
    })?;
    w.create_element("DiskSection").write_inner_content(|w| {
        text_element(w, "Info", "Virtual disk information")?;
        w.create_element("Disk")
            .with_attributes([
                ("ovf:capacity", capacity.as_str()),
                ("ovf:capacityAllocationUnits", "byte"),
                ("ovf:diskId", "vmdisk1"),
                ("ovf:fileRef", "file1"),
                ("ovf:format", VMDK_FORMAT),
            ])
            .write_empty()?;
        Ok(())
    })?;
    w.create_element("NetworkSection")
        .write_inner_content(|w| {
            text_element(w, "Info", "The logical networks")?;
            w.create_element("Network")
                .with_attribute(("ovf:name", NETWORK))
                .write_inner_content(|w| text_element(w, "Description", "The VM network"))?;
            Ok(())
        })?;
    w.create_element("VirtualSystem")
        .with_attribute(("ovf:id", spec.name.as_str()))
        .write_inner_content(|w| virtual_system(w, spec))?;
    Ok(())
}

/// The OVF 1.x envelope for one VM with the streamOptimized disk
/// `vmdk_file_name` (described by `vmdk`), EFI firmware, a pvscsi
/// controller and a VmxNet3 NIC.
pub fn ovf_xml(spec: &VmSpec, vmdk_file_name: &str, vmdk: &VmdkInfo) -> Result<Vec<u8>> {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))
        .context("writing the OVF")?;
    w.create_element("Envelope")
        .with_attributes([
            ("xmlns", OVF_NS),
            ("xmlns:ovf", OVF_NS),
            ("xmlns:rasd", RASD_NS),
            ("xmlns:vssd", VSSD_NS),
            ("xmlns:vmw", VMW_NS),
            ("xml:lang", "en-US"),
        ])
        .write_inner_content(|w| envelope(w, spec, vmdk_file_name, vmdk))
        .context("writing the OVF")?;
    let mut out = w.into_inner();
    out.push(b'\n');
    Ok(out)
}

/// The files an OVF's References name (`ovf:href`).
pub fn referenced_files(ovf: &[u8]) -> Result<Vec<String>> {
    use quick_xml::events::Event as E;
    let mut reader = quick_xml::Reader::from_reader(ovf);
    let mut buf = Vec::new();
    let mut files = Vec::new();
    loop {
        match reader
            .read_event_into(&mut buf)
            .context("parsing the OVF")?
        {
            E::Eof => return Ok(files),
            E::Start(e) | E::Empty(e) if e.local_name().as_ref() == b"File" => {
                for a in e.attributes() {
                    let a = a.context("parsing the OVF")?;
                    if a.key.local_name().as_ref() == b"href" {
                        let v = a.normalized_value(quick_xml::XmlVersion::Explicit1_0);
                        files.push(v.context("parsing the OVF")?.into_owned());
                    }
                }
            }
            _ => {}
        }
        buf.clear();
    }
}

// ------------------------------------------------------------ MF / OVA

/// An OVF manifest: `SHA256(name)= hex` for every member, in order.
pub fn manifest(members: &[(&str, &Path)]) -> Result<String> {
    let mut text = String::new();
    for (name, path) in members {
        let sum = super::manifest::sha256_file(path)?;
        text.push_str(&format!("SHA256({name})= {sum}\n"));
    }
    Ok(text)
}

/// [`ova_at`] with member times 0.
pub fn ova(ovf: &Path, vmdk: &Path, out: &Path) -> Result<()> {
    ova_at(ovf, vmdk, out, 0)
}

/// An OVA at `out`: a ustar tar of NAME.ovf, NAME.mf (the SHA-256 of the
/// other two) and the VMDK, in that order, owned by 0:0, mode 0644, every
/// member dated `mtime`. The VMDK is streamed; the archive is written
/// under a temporary name and renamed when complete.
pub fn ova_at(ovf: &Path, vmdk: &Path, out: &Path, mtime: u64) -> Result<()> {
    let ovf_name = file_name(ovf)?;
    let vmdk_name = file_name(vmdk)?;
    let stem = ovf_name
        .strip_suffix(".ovf")
        .with_context(|| format!("{} does not end with .ovf", ovf.display()))?;
    let mf_name = format!("{stem}.mf");
    let ovf_bytes = std::fs::read(ovf).with_context(|| format!("reading {}", ovf.display()))?;
    let refs = referenced_files(&ovf_bytes).with_context(|| format!("in {}", ovf.display()))?;
    ensure!(
        refs == [vmdk_name.clone()],
        "{} references {refs:?}, not the disk {vmdk_name}",
        ovf.display()
    );
    let mf = manifest(&[(&ovf_name, ovf), (&vmdk_name, vmdk)])?;
    let partial = fsutil::partial_path(out);
    let file = File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, file));
    let disk = File::open(vmdk).with_context(|| format!("opening {}", vmdk.display()))?;
    let disk_size = disk.metadata().context("stat of the VMDK")?.len();
    let members: [(&str, u64, Box<dyn std::io::Read + '_>); 3] = [
        (
            &ovf_name,
            ovf_bytes.len() as u64,
            Box::new(ovf_bytes.as_slice()),
        ),
        (&mf_name, mf.len() as u64, Box::new(mf.as_bytes())),
        (
            &vmdk_name,
            disk_size,
            Box::new(crate::interrupt::Reader(disk)),
        ),
    ];
    for (name, size, data) in members {
        let header = member_header(name, size, mtime)?;
        tar.append(&header, data)
            .with_context(|| format!("writing {name} into {}", partial.display()))?;
    }
    let file = tar
        .into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .with_context(|| format!("writing {}", partial.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", partial.display()))?;
    fsutil::commit(&partial, out)
}

fn file_name(p: &Path) -> Result<String> {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name", p.display()))
}

fn member_header(name: &str, size: u64, mtime: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .with_context(|| format!("{name} cannot be a tar member name"))?;
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_cksum();
    Ok(h)
}

// ----------------------------------------------------------- producers

/// `NAME.vmdk` from the raw disk.
pub struct Vmdk;

impl Producer for Vmdk {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn needs(&self) -> &'static [Format] {
        &[Format::Raw]
    }

    fn files(&self, name: &str) -> Vec<String> {
        vec![format!("{name}.vmdk")]
    }

    fn produce(&self, job: &Job, inputs: &Products) -> Result<(Vec<Artifact>, String)> {
        let raw = input(inputs, Format::Raw, ".raw")?;
        let out = job.named(Format::Vmdk, "vmdk");
        let info = vmdk(&raw.path, &out, vmdk_cid(job.input_hash))?;
        let note = format!(
            "{}, {} virtual",
            format_size(info.size),
            format_size(info.capacity_bytes)
        );
        Ok((vec![Artifact::of(Format::Vmdk, &out)?], note))
    }
}

/// `NAME.ovf` and `NAME.ova` from the VMDK.
pub struct Ova;

impl Producer for Ova {
    fn format(&self) -> Format {
        Format::Ova
    }

    fn needs(&self) -> &'static [Format] {
        &[Format::Vmdk]
    }

    fn files(&self, name: &str) -> Vec<String> {
        vec![format!("{name}.ovf"), format!("{name}.ova")]
    }

    fn produce(&self, job: &Job, inputs: &Products) -> Result<(Vec<Artifact>, String)> {
        let disk = input(inputs, Format::Vmdk, ".vmdk")?;
        let info = check_vmdk(&disk.path)?;
        let os = &job.profile.os;
        let mut spec = VmSpec::for_os(job.name, &os.distro, &os.version, job.version);
        spec.secure_boot = job.profile.boot.secure_boot;
        let ovf = job.named(Format::Ova, "ovf");
        fsutil::write_atomic(&ovf, &ovf_xml(&spec, &disk.file_name(), &info)?)?;
        let out = job.named(Format::Ova, "ova");
        ova_at(&ovf, &disk.path, &out, job.epoch.max(0) as u64)?;
        let ova = Artifact::of(Format::Ova, &out)?;
        let note = format_size(ova.size);
        Ok((vec![Artifact::of(Format::Ova, &ovf)?, ova], note))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ids_follow_the_distribution() {
        let d = VmSpec::for_os("debian-bookworm", "debian", "12", "1.0");
        assert_eq!((d.os_type.as_str(), d.os_id), ("debian12_64Guest", 96));
        assert_eq!((d.cpus, d.memory_mib), (2, 2048));
        assert_eq!(d.os_description, "Debian GNU/Linux 12 (64-bit)");
        let u = VmSpec::for_os("ubuntu-noble", "ubuntu", "24.04", "1.0");
        assert_eq!((u.os_type.as_str(), u.os_id), ("ubuntu64Guest", 94));
        let t = VmSpec::for_os("debian-trixie", "debian", "13", "1.0");
        assert_eq!((t.os_type.as_str(), t.os_id), ("otherLinux64Guest", 96));
    }

    #[test]
    fn item_fields_keep_the_cim_order() {
        let spec = VmSpec::for_os("x", "debian", "12", "1");
        for item in hardware_items(&spec) {
            let names: Vec<&str> = item.fields().iter().map(|(k, _)| *k).collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            assert_eq!(names, sorted, "CIM orders rasd elements by name");
        }
    }

    #[test]
    fn descriptor_lines_split_into_pairs_and_extents() {
        // The descriptor qemu-img 10.0 embeds in a streamOptimized VMDK.
        let text = "# Disk DescriptorFile\nversion=1\nCID=a7080756\nparentCID=ffffffff\n\
                    createType=\"streamOptimized\"\n\n# Extent description\n\
                    RW 131072 SPARSE \"a.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
                    ddb.virtualHWVersion = \"13\"\nddb.adapterType = \"lsilogic\"\n";
        let d = Descriptor::parse(text);
        assert_eq!(d.get("createType").unwrap(), "streamOptimized");
        assert_eq!(d.get("ddb.virtualHWVersion").unwrap(), "13");
        assert_eq!(d.extents, vec!["RW 131072 SPARSE \"a.vmdk\"".to_string()]);
        let err = d.get("ddb.toolsVersion").unwrap_err().to_string();
        assert!(err.contains("ddb.toolsVersion"), "{err}");
    }
}
