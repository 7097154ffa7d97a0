//! The vSphere outputs: streamOptimized VMDK, OVF envelope, OVA.

mod common;

use flate2::Compression;
use flate2::write::DeflateEncoder;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use stemforge::exec::{cmd, which};
use stemforge::formats::vmware::{
    self, HW_VERSION, TOOLS_VERSION, VmSpec, VmdkInfo, check_vmdk, ovf_xml,
};

const MIB: u64 = 1 << 20;

/// Real bytes to put on a test disk: the qemu-img binary.
fn qemu_img_bytes() -> Vec<u8> {
    let path = which("qemu-img").expect("qemu-img is installed (qemu-utils)");
    std::fs::read(path).unwrap()
}

/// A sparse raw disk of `size` with real data at `offsets`, and a last
/// 64 KiB that does not compress (deflated data), so the stream's last
/// grain fills its cluster.
fn raw_disk(path: &Path, size: u64, offsets: &[u64]) {
    let data = qemu_img_bytes();
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for off in offsets {
        f.write_all_at(&data, *off).unwrap();
    }
    let mut z = DeflateEncoder::new(Vec::new(), Compression::best());
    z.write_all(&data).unwrap();
    let packed = z.finish().unwrap();
    assert!(packed.len() >= 64 * 1024, "enough incompressible bytes");
    f.write_all_at(&packed[..64 * 1024], size - 64 * 1024)
        .unwrap();
    f.sync_all().unwrap();
}

fn small_disk(dir: &Path) -> PathBuf {
    let raw = dir.join("disk.raw");
    raw_disk(&raw, 64 * MIB, &[MIB, 40 * MIB]);
    raw
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn vmdk_is_stream_optimized_and_reads_back_identical() {
    let dir = common::scratch("vmware-vmdk");
    let raw = small_disk(&dir);
    let out = dir.join("disk.vmdk");
    let info = vmware::vmdk(&raw, &out, 0x5eed_cafe).unwrap();
    let size = out.metadata().unwrap().len();
    assert_eq!(
        info,
        VmdkInfo {
            version: 3,
            capacity_bytes: 64 * MIB,
            create_type: "streamOptimized".into(),
            adapter_type: "lsilogic".into(),
            hw_version: HW_VERSION.to_string(),
            tools_version: TOOLS_VERSION.into(),
            size,
            grains: info.grains,
        }
    );
    // One grain for every 64 KiB of the raw disk that holds data.
    let data_grains = std::fs::read(&raw)
        .unwrap()
        .chunks(64 * 1024)
        .filter(|c| c.iter().any(|b| *b != 0))
        .count() as u64;
    assert!(data_grains > 2, "the disk holds data");
    assert_eq!(info.grains, data_grains);
    assert_eq!(check_vmdk(&out).unwrap(), info);

    // Nothing is left under a temporary name.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // The header and the stream's end, byte by byte.
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[0..4], b"KDMV");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    let tail = &bytes[bytes.len() - 1536..];
    assert_eq!(
        &tail[0..16],
        &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0]
    );
    assert_eq!(&tail[512..516], b"KDMV", "footer");
    assert!(tail[1024..].iter().all(|b| *b == 0), "end-of-stream marker");
    let descriptor = String::from_utf8_lossy(&bytes[512..512 * 21]);
    assert!(
        descriptor.contains("RW 131072 SPARSE \"disk.vmdk\""),
        "{descriptor}"
    );
    assert!(descriptor.contains("\nCID=5eedcafe\n"), "{descriptor}");

    // The same disk and CID a second time: the same bytes.
    let again_dir = dir.join("again");
    std::fs::create_dir(&again_dir).unwrap();
    let again = again_dir.join("disk.vmdk");
    vmware::vmdk(&raw, &again, 0x5eed_cafe).unwrap();
    assert_eq!(
        sha256_hex(&std::fs::read(&again).unwrap()),
        sha256_hex(&bytes)
    );

    // QEMU reads the same disk back.
    let json = cmd("qemu-img", ["info", "--output=json"])
        .arg(&out)
        .read()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["format"], "vmdk");
    assert_eq!(v["virtual-size"], 64 * MIB);
    assert_eq!(
        v["format-specific"]["data"]["create-type"],
        "streamOptimized"
    );
    cmd("qemu-img", ["compare", "-f", "raw", "-F", "vmdk"])
        .arg(&raw)
        .arg(&out)
        .run()
        .expect("the VMDK holds the raw disk's data");
    common::done_with(&dir);
}

/// A copy of `src` at `dst` cut by `bytes`.
fn truncated_copy(src: &Path, dst: &Path, bytes: u64) {
    std::fs::copy(src, dst).unwrap();
    let f = File::options().write(true).open(dst).unwrap();
    f.set_len(src.metadata().unwrap().len() - bytes).unwrap();
}

#[test]
fn a_truncated_vmdk_is_an_error_naming_the_file() {
    let dir = common::scratch("vmware-truncated");
    let raw = small_disk(&dir);
    let good = dir.join("disk.vmdk");
    vmware::vmdk(&raw, &good, 1).unwrap();
    for cut in [1, 512, 4096, 64 * 1024] {
        let bad = dir.join(format!("cut-{cut}.vmdk"));
        truncated_copy(&good, &bad, cut);
        let err = format!("{:#}", check_vmdk(&bad).unwrap_err());
        assert!(err.contains(&format!("cut-{cut}.vmdk")), "{err}");
        assert!(err.contains("truncated"), "cut by {cut}: {err}");
    }

    // A stream that lost data in the middle but kept a valid-looking end:
    // the grain pointers reach past the data.
    let bytes = std::fs::read(&good).unwrap();
    let (body, tail) = bytes.split_at(bytes.len() - 1536);
    let mut spliced = body[..body.len() - 64 * 1024].to_vec();
    spliced.extend_from_slice(tail);
    let bad = dir.join("spliced.vmdk");
    std::fs::write(&bad, &spliced).unwrap();
    let err = format!("{:#}", check_vmdk(&bad).unwrap_err());
    assert!(err.contains("spliced.vmdk"), "{err}");
    assert!(
        err.contains("beyond the data") || err.contains("cut short"),
        "{err}"
    );
    common::done_with(&dir);
}

#[test]
fn qemu_img_alone_leaves_the_stream_without_its_end() {
    let dir = common::scratch("vmware-qemu-only");
    let raw = small_disk(&dir);
    let plain = dir.join("plain.vmdk");
    cmd("qemu-img", ["convert", "-q", "-f", "raw", "-O", "vmdk"])
        .args(["-o", "subformat=streamOptimized"])
        .arg(&raw)
        .arg(&plain)
        .run()
        .unwrap();
    // qemu-img's own check is content with it; a truncated copy too.
    cmd("qemu-img", ["check"]).arg(&plain).run().unwrap();
    let cut = dir.join("plain-cut.vmdk");
    truncated_copy(&plain, &cut, 512);
    cmd("qemu-img", ["check"]).arg(&cut).run().unwrap();
    let err = format!("{:#}", check_vmdk(&plain).unwrap_err());
    assert!(err.contains("plain.vmdk"), "{err}");
    common::done_with(&dir);
}

fn spec() -> VmSpec {
    VmSpec::for_os("debian-bookworm", "debian", "12", "1.2.3")
}

/// A VMDK, its OVF and the OVA made of them in `dir`.
fn package(dir: &Path) -> (PathBuf, PathBuf, PathBuf, VmdkInfo) {
    let raw = small_disk(dir);
    let vmdk = dir.join("debian-bookworm.vmdk");
    let info = vmware::vmdk(&raw, &vmdk, 1).unwrap();
    let ovf = dir.join("debian-bookworm.ovf");
    std::fs::write(
        &ovf,
        ovf_xml(&spec(), "debian-bookworm.vmdk", &info).unwrap(),
    )
    .unwrap();
    let ova = dir.join("debian-bookworm.ova");
    vmware::ova(&ovf, &vmdk, &ova).unwrap();
    (ovf, vmdk, ova, info)
}

#[test]
fn ovf_describes_the_vm_and_its_disk() {
    let dir = common::scratch("vmware-ovf");
    let (ovf, _, _, info) = package(&dir);
    // The elements without the indentation between them.
    let text: String = std::fs::read_to_string(&ovf)
        .unwrap()
        .lines()
        .map(str::trim)
        .collect();
    for part in [
        "xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\"",
        &format!(
            "ovf:href=\"debian-bookworm.vmdk\" ovf:id=\"file1\" ovf:size=\"{}\"",
            info.size
        ),
        &format!(
            "ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte\"",
            64 * MIB
        ),
        "vmdk.html#streamOptimized",
        "<vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>",
        "ovf:id=\"96\" ovf:version=\"12\" vmw:osType=\"debian12_64Guest\"",
        "<rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity>",
        "<rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>",
        "<rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>",
        "<rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent>",
        "<rasd:Connection>VM Network</rasd:Connection>",
        "<rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>",
        "<vmw:Config ovf:required=\"false\" vmw:key=\"firmware\" vmw:value=\"efi\"/>",
        "<Version>1.2.3</Version>",
    ] {
        assert!(text.contains(part), "missing {part:?} in\n{text}");
    }
    assert_eq!(
        vmware::referenced_files(text.as_bytes()).unwrap(),
        vec!["debian-bookworm.vmdk".to_string()]
    );
    common::done_with(&dir);
}

/// One member of a tar archive as its ustar header says.
#[derive(Debug)]
struct Member {
    name: String,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    data: std::ops::Range<usize>,
}

fn octal(field: &[u8]) -> u64 {
    let s = String::from_utf8_lossy(field);
    u64::from_str_radix(s.trim_matches(|c: char| c == '\0' || c == ' '), 8).unwrap()
}

/// Parse a tar by hand: every header must be ustar ("ustar\0" "00").
fn ustar_members(tar: &[u8]) -> Vec<Member> {
    let mut members = Vec::new();
    let mut at = 0;
    while tar[at..at + 512].iter().any(|b| *b != 0) {
        let h = &tar[at..at + 512];
        assert_eq!(&h[257..263], b"ustar\0", "magic of the header at {at}");
        assert_eq!(&h[263..265], b"00", "version of the header at {at}");
        assert_eq!(h[156], b'0', "a regular file");
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(*b)
                }
            })
            .sum();
        assert_eq!(octal(&h[148..156]), sum, "header checksum");
        let name_end = h[..100].iter().position(|b| *b == 0).unwrap_or(100);
        let size = octal(&h[124..136]);
        members.push(Member {
            name: String::from_utf8(h[..name_end].to_vec()).unwrap(),
            size,
            mode: octal(&h[100..108]) as u32,
            uid: octal(&h[108..116]) as u32,
            gid: octal(&h[116..124]) as u32,
            mtime: octal(&h[136..148]),
            data: at + 512..at + 512 + size as usize,
        });
        at += 512 + (size as usize).div_ceil(512) * 512;
    }
    assert!(tar[at..].iter().all(|b| *b == 0), "only end blocks follow");
    members
}

#[test]
fn ova_is_ustar_with_ovf_then_manifest_then_disk() {
    let dir = common::scratch("vmware-ova");
    let (ovf, vmdk, ova, _) = package(&dir);
    let tar = std::fs::read(&ova).unwrap();
    let members = ustar_members(&tar);
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "debian-bookworm.ovf",
            "debian-bookworm.mf",
            "debian-bookworm.vmdk"
        ]
    );
    for m in &members {
        assert_eq!((m.mode, m.uid, m.gid, m.mtime), (0o644, 0, 0, 0), "{m:?}");
    }
    let ovf_bytes = std::fs::read(&ovf).unwrap();
    let vmdk_bytes = std::fs::read(&vmdk).unwrap();
    assert_eq!(&tar[members[0].data.clone()], ovf_bytes.as_slice());
    assert_eq!(&tar[members[2].data.clone()], vmdk_bytes.as_slice());
    assert_eq!(members[2].size, vmdk.metadata().unwrap().len());

    // The manifest's hashes are those of the members, recomputed here.
    let mf = String::from_utf8(tar[members[1].data.clone()].to_vec()).unwrap();
    let expected = format!(
        "SHA256(debian-bookworm.ovf)= {}\nSHA256(debian-bookworm.vmdk)= {}\n",
        sha256_hex(&tar[members[0].data.clone()]),
        sha256_hex(&tar[members[2].data.clone()]),
    );
    assert_eq!(mf, expected);
    assert_eq!(
        vmware::manifest(&[
            ("debian-bookworm.ovf", &ovf),
            ("debian-bookworm.vmdk", &vmdk)
        ])
        .unwrap(),
        expected
    );

    // Same inputs, same archive.
    let again = dir.join("again.ova");
    vmware::ova(&ovf, &vmdk, &again).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), tar);
    let dated = dir.join("dated.ova");
    vmware::ova_at(&ovf, &vmdk, &dated, 1_700_000_000).unwrap();
    let members = ustar_members(&std::fs::read(&dated).unwrap());
    assert!(members.iter().all(|m| m.mtime == 1_700_000_000));
    common::done_with(&dir);
}

#[test]
fn ova_refuses_a_disk_the_ovf_does_not_reference() {
    let dir = common::scratch("vmware-ova-mismatch");
    let (ovf, vmdk, _, _) = package(&dir);
    let other = dir.join("other.vmdk");
    std::fs::rename(&vmdk, &other).unwrap();
    let out = dir.join("x.ova");
    let err = format!("{:#}", vmware::ova(&ovf, &other, &out).unwrap_err());
    assert!(err.contains("other.vmdk"), "{err}");
    assert!(!out.exists());
    common::done_with(&dir);
}

// ------------------------------------------------- DSP8023 validation

use common::validate::check_ovf as validate;

#[test]
#[ignore = "needs the validators `make deps` installs (target/validators)"]
fn ovf_validates_against_dsp8023_and_broken_ones_do_not() {
    let dir = common::scratch("vmware-ovf-schema");
    let (ovf, _, _, _) = package(&dir);
    validate(&ovf).expect("the OVF is valid DSP8023");
    let text = std::fs::read_to_string(&ovf).unwrap();

    // InstanceID before ElementName: CIM orders an Item's elements.
    let cpu_id = "<rasd:InstanceID>1</rasd:InstanceID>";
    let cpu_name = "<rasd:ElementName>2 virtual CPU(s)</rasd:ElementName>";
    let swapped = text
        .replacen(cpu_id, "@ID@", 1)
        .replacen(cpu_name, cpu_id, 1)
        .replacen("@ID@", cpu_name, 1);
    // A File without its required ovf:href.
    let no_href = text.replacen("ovf:href=\"debian-bookworm.vmdk\" ", "", 1);
    // An OperatingSystemSection id that is not an unsignedShort.
    let bad_os = text.replacen("ovf:id=\"96\"", "ovf:id=\"debian\"", 1);
    for (name, broken, why) in [
        (
            "swapped",
            swapped,
            "Unexpected child with tag 'rasd:InstanceID'",
        ),
        ("no-href", no_href, "missing required attribute"),
        (
            "bad-os",
            bad_os,
            "OperatingSystemSection attribute ovf:id='debian'",
        ),
    ] {
        assert_ne!(broken, text, "{name} changed nothing");
        let path = dir.join(format!("{name}.ovf"));
        std::fs::write(&path, broken).unwrap();
        let err = validate(&path).expect_err(name);
        assert!(
            err.contains(why),
            "{name}: expected {why:?}, the validator said {err}"
        );
    }
    common::done_with(&dir);
}
