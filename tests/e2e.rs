//! End to end, as root, against the real Debian archive: a built image's
//! tree and disk, compared with the stock tree it started from; a stage
//! that breaks its own control; a build killed in the chroot phase.
//! (CI also runs `make build PROFILE=debian-bookworm`: the same build,
//! booted under QEMU and scanned from inside.)

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn scan_json(root: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["scan", "--root", root.to_str().unwrap(), "--format", "json"];
    args.extend(extra);
    let o = stemforge(&args);
    assert!(matches!(o.status.code(), Some(0) | Some(1)), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The ids of the controls whose `when` limits them to `target`
/// (`offline` or `live`).
fn controls_for(target: &str) -> Vec<Value> {
    let o = stemforge(["controls", "--format", "json"]);
    let controls: Value = serde_json::from_slice(&o.stdout).unwrap();
    controls
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["when"]["control"]["target"] == target)
        .map(|c| c["id"].clone())
        .collect()
}

/// Not applicable because the control belongs to a role the target
/// does not have.
fn for_another_role(r: &Value) -> bool {
    r["status"] == "not_applicable"
        && r["evidence"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("applies to roles"))
}

fn statuses(report: &Value) -> Vec<(String, String)> {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn stock_tree_fails_most_controls_and_the_built_tree_passes_all() {
    require_root();
    let b = shared_build();
    let stock = scan_json(&stock_tree(), &[]);
    let built = scan_json(&b.tree, &[]);
    // The role stages' controls do not apply to the base image.
    let roles = stock["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| for_another_role(r))
        .count() as u64;
    assert!(roles >= 50, "{roles} role controls");
    let total = stock["summary"]["total"].as_u64().unwrap() - roles;
    let failed = stock["summary"]["fail"].as_u64().unwrap();
    assert!(total >= 40, "{total} controls");
    assert!(
        failed * 2 > total,
        "stock tree: only {failed} of {total} controls fail"
    );
    assert_eq!(
        built["summary"]["fail"],
        0,
        "{}",
        serde_json::to_string_pretty(&built).unwrap()
    );
    assert_eq!(built["summary"]["error"], 0);
    // Everything passes but what only a running system can show.
    let live_only = controls_for("live");
    for r in built["results"].as_array().unwrap() {
        if r["status"] != "pass" && !for_another_role(r) {
            assert!(live_only.contains(&r["id"]), "{r}");
            assert_eq!(r["status"], "not_applicable", "{r}");
        }
    }
    assert!(built["summary"]["pass"].as_u64().unwrap() + live_only.len() as u64 >= total);
    assert_eq!(built["context"]["distro"], "debian");
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn every_control_is_proven_by_its_break_recipe_on_a_copy_of_the_built_tree() {
    require_root();
    let b = shared_build();
    let scratch_dir = scratch("prove");
    let copy = scratch_dir.join("rootfs");
    let st = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&b.tree)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    let before = scan_json(&copy, &[]);
    let o = stemforge([
        "prove",
        "--root",
        copy.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let t = text(&o);
    let proofs: Value = serde_json::from_slice(&o.stdout).expect(&t);
    let proofs = proofs.as_array().unwrap();
    // Every control the scan ran was proven: it passed on the tree as
    // built and failed once its recipe was applied.
    assert_eq!(
        proofs.len() as u64,
        before["summary"]["total"].as_u64().unwrap()
            - before["summary"]["not_applicable"].as_u64().unwrap(),
        "{t}"
    );
    let unproven: Vec<&Value> = proofs
        .iter()
        .filter(|p| p["intact"] != "pass" || p["broken"] != "fail")
        .collect();
    assert!(unproven.is_empty(), "{unproven:#?}");
    assert_eq!(o.status.code(), Some(0), "{t}");
    // The tree was put back: the same scan, the same results.
    assert_eq!(statuses(&scan_json(&copy, &[])), statuses(&before));
    let diff = Command::new("diff")
        .args(["-rq", "--no-dereference", "--exclude=dev"])
        .arg(&b.tree)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(diff.status.success(), "{}", text(&diff));
    // A control whose recipe does not break it is reported, exit 1.
    let stages = scratch_dir.join("stages");
    let st = Command::new("cp")
        .args(["-r", "stages"])
        .arg(&stages)
        .status()
        .unwrap();
    assert!(st.success());
    let banners = stages.join("70-banners/stage.yml");
    let y = std::fs::read_to_string(&banners).unwrap();
    let weak = y.replacen("mode: \"0666\"", "mode: \"0644\"", 1);
    assert_ne!(y, weak, "the banner recipe chmods 0666");
    std::fs::write(&banners, weak).unwrap();
    let o = stemforge([
        "prove",
        "--root",
        copy.to_str().unwrap(),
        "--stages",
        stages.to_str().unwrap(),
        "--control",
        "banner-files-protected",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("NOT PROVEN"), "{}", text(&o));
    done_with(&scratch_dir);
}

/// Run a tool on a partition of the raw image, in place (`image?offset=`).
fn at(raw: &Path, offset: u64) -> String {
    format!("{}?offset={offset}", raw.display())
}

fn debugfs(raw: &Path, offset: u64, request: &str) -> String {
    let o = Command::new("debugfs")
        .args(["-R", request])
        .arg(at(raw, offset))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn the_disk_reads_back_as_planned() {
    require_root();
    let b = shared_build();
    let profile = stemforge::profile::load(
        "debian-bookworm",
        &stemforge::profile::ProfileSource::Embedded,
    )
    .unwrap();
    let disk = gpt::GptConfig::new().writable(false).open(&b.raw).unwrap();
    let parts: Vec<&gpt::partition::Partition> = disk.partitions().values().collect();
    // The profile's partitions, then the hybrid disk's BIOS boot partition.
    assert!(profile.boot.bios && profile.boot.secure_boot);
    assert_eq!(parts.len(), profile.disk.partitions.len() + 1);
    assert_eq!(std::fs::metadata(&b.raw).unwrap().len(), profile.disk.size);
    let bios = parts.last().unwrap();
    assert_eq!(
        bios.part_type_guid.guid.to_string().to_uppercase(),
        stemforge::disk::types::BIOS_BOOT
    );
    assert_eq!(
        (bios.first_lba, bios.last_lba),
        (2048, 4095),
        "first, 1 MiB"
    );
    {
        // GRUB's boot code in the MBR points at core.img, whose block
        // list points at the rest of it; the protective MBR stays.
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&b.raw).unwrap();
        let mut mbr = [0u8; 512];
        f.read_exact_at(&mut mbr, 0).unwrap();
        assert_eq!(&mbr[510..], &[0x55, 0xaa]);
        assert_eq!(mbr[0x1be + 4], 0xee, "protective GPT entry kept");
        assert_eq!(
            u64::from_le_bytes(mbr[0x5c..0x64].try_into().unwrap()),
            2048
        );
        assert!(
            mbr[..0x1b8].windows(4).any(|w| w == b"GRUB"),
            "boot.img code"
        );
        let mut core = [0u8; 512];
        f.read_exact_at(&mut core, 2048 * 512).unwrap();
        let start = u64::from_le_bytes(core[500..508].try_into().unwrap());
        let len = u16::from_le_bytes(core[508..510].try_into().unwrap());
        assert_eq!(start, 2049);
        assert!(len > 20 && (len as u64) < 2047, "{len} sectors");
        assert_eq!(&core[488..500], &[0u8; 12], "list terminator");
    }
    let types = [
        stemforge::disk::types::ESP,
        stemforge::disk::types::ROOT_X86_64,
        stemforge::disk::types::VAR,
        stemforge::disk::types::LINUX_DATA,
        stemforge::disk::types::LINUX_DATA,
        stemforge::disk::types::HOME,
        stemforge::disk::types::LINUX_DATA,
    ];
    let mut uuids = Vec::new();
    for ((gp, want), ty) in parts.iter().zip(&profile.disk.partitions).zip(types) {
        assert_eq!(
            gp.part_type_guid.guid.to_string().to_uppercase(),
            ty,
            "{}",
            want.mount
        );
        assert_eq!(
            gp.bytes_len(gpt::disk::LogicalBlockSize::Lb512).unwrap(),
            want.size,
            "{}",
            want.mount
        );
        assert_eq!(gp.first_lba % 2048, 0, "{} is 1 MiB aligned", want.mount);
        assert_eq!(gp.name, want.label);
        let offset = gp.first_lba * 512;
        if want.mount == "/boot/efi" {
            // The ESP, copied out and checked by fsck.fat.
            let esp = scratch("esp").join("esp.img");
            let mut data = vec![0u8; want.size as usize];
            use std::os::unix::fs::FileExt;
            std::fs::File::open(&b.raw)
                .unwrap()
                .read_exact_at(&mut data, offset)
                .unwrap();
            std::fs::write(&esp, &data).unwrap();
            let o = Command::new("fsck.fat")
                .args(["-n", "-l"])
                .arg(&esp)
                .output()
                .unwrap();
            let t = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "fsck.fat: {t}");
            // Secure Boot: the signed shim, the signed GRUB beside it,
            // and the early configuration where that GRUB looks.
            for file in [
                "/EFI/BOOT/BOOTX64.EFI",
                "/EFI/BOOT/GRUBX64.EFI",
                "/EFI/BOOT/MMX64.EFI",
                "/EFI/BOOT/GRUB.CFG",
                "/EFI/DEBIAN/GRUB.CFG",
            ] {
                assert!(t.to_uppercase().contains(file), "{file} in {t}");
            }
            continue;
        }
        let o = Command::new("dumpe2fs")
            .arg("-h")
            .arg(at(&b.raw, offset))
            .output()
            .unwrap();
        let h = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let field = |name: &str| {
            h.lines()
                .find(|l| l.starts_with(name))
                .map(|l| l[name.len()..].trim().to_string())
                .unwrap_or_default()
        };
        assert_eq!(field("Block size:"), "4096", "{}", want.mount);
        assert_eq!(field("Filesystem volume name:"), want.label);
        let features = field("Filesystem features:");
        assert!(
            !features.contains("orphan_file") && !features.contains("metadata_csum_seed"),
            "{features}"
        );
        uuids.push((want.mount.clone(), field("Filesystem UUID:"), offset));
    }
    let root = uuids.iter().find(|u| u.0 == "/").unwrap().2;
    let fstab = debugfs(&b.raw, root, "cat /etc/fstab");
    for (mount, uuid, _) in &uuids {
        let opts = profile
            .disk
            .partitions
            .iter()
            .find(|p| &p.mount == mount)
            .unwrap()
            .options
            .join(",");
        let want = format!(
            "UUID={uuid}\t{mount}\text4\t{}",
            if opts.is_empty() { "defaults" } else { &opts }
        );
        assert!(fstab.contains(&want), "fstab lacks {want:?}:\n{fstab}");
    }
    assert!(
        fstab.contains("tmpfs\t/dev/shm\ttmpfs\tnodev,nosuid,noexec"),
        "{fstab}"
    );
    // The top of /tmp is sticky and world-writable; grub.cfg is root's only.
    let tmp = uuids.iter().find(|u| u.0 == "/tmp").unwrap().2;
    assert!(debugfs(&b.raw, tmp, "stat /").contains("Mode:  01777"));
    let grub = debugfs(&b.raw, root, "stat /boot/grub/grub.cfg");
    assert!(
        grub.contains("Mode:  0600") && grub.contains("User:     0   Group:     0"),
        "{grub}"
    );
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn the_image_ships_no_secrets_or_host_leftovers() {
    require_root();
    let b = shared_build();
    let disk = gpt::GptConfig::new().writable(false).open(&b.raw).unwrap();
    let off = |name: &str| {
        disk.partitions()
            .values()
            .find(|p| p.name == name)
            .unwrap()
            .first_lba
            * 512
    };
    let (root, var) = (off("root"), off("var"));
    let ssh = debugfs(&b.raw, root, "ls /etc/ssh");
    assert!(!ssh.contains("ssh_host_"), "host keys in the image: {ssh}");
    assert_eq!(debugfs(&b.raw, root, "cat /etc/machine-id"), "");
    assert_eq!(debugfs(&b.raw, root, "cat /etc/hostname"), "localhost\n");
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let hosts = debugfs(&b.raw, root, "cat /etc/hosts");
    if !host.trim().is_empty() && host.trim() != "localhost" {
        assert!(
            !hosts.contains(host.trim()),
            "the build host's name is in /etc/hosts"
        );
    }
    let resolv = debugfs(&b.raw, root, "stat /etc/resolv.conf");
    assert!(resolv.contains("Type: symlink"), "{resolv}");
    let shadow = debugfs(&b.raw, root, "cat /etc/shadow");
    for l in shadow.lines() {
        let pw = l.split(':').nth(1).unwrap_or("");
        assert!(
            pw.starts_with('*') || pw.starts_with('!'),
            "password set: {l}"
        );
    }
    let lists = debugfs(&b.raw, var, "ls /lib/apt/lists");
    assert!(
        !lists.contains("_dists_"),
        "apt lists in the image: {lists}"
    );
    assert!(!debugfs(&b.raw, root, "ls /usr/sbin").contains("policy-rc.d"));
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn a_stage_that_violates_its_own_control_fails_the_build() {
    require_root();
    let _ = shared_build(); // the bootstrap is cached by now
    let _g = heavy();
    let d = scratch("violating-stage");
    let stages = d.join("stages");
    assert!(
        Command::new("cp")
            .args(["-a", "stages"])
            .arg(&stages)
            .status()
            .unwrap()
            .success()
    );
    let conf = stages.join("50-sshd/files/hardening.conf");
    let text_ = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text_.replace("PermitRootLogin no", "PermitRootLogin yes"),
    )
    .unwrap();
    let out = d.join("out");
    let o = stemforge([
        "build",
        "--profile",
        "debian-bookworm",
        "--stages",
        stages.to_str().unwrap(),
        "--no-verify",
        "--format",
        "raw",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("FAIL sshd-no-root-login"), "{t}");
    assert!(
        !out.join("debian-bookworm.raw").exists(),
        "a failing image was published"
    );
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("debian-bookworm.offline-scan.json")).unwrap(),
    )
    .unwrap();
    let r = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "sshd-no-root-login")
        .unwrap();
    assert_eq!(r["status"], "fail");
    assert!(
        r["evidence"][0]
            .as_str()
            .unwrap()
            .contains("00-stemforge.conf:"),
        "{r}"
    );
    // Only that control failed.
    assert_eq!(report["summary"]["fail"], 1, "{}", report["summary"]);
    done_with(&d);
}

/// The processes (by pid) for which `pred` holds.
fn processes(pred: impl Fn(u32) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| pred(*pid))
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    stemforge::fsutil::mounts_under(dir).unwrap()
}

/// QEMU processes with `needle` on their command line.
fn qemu_running(needle: &str) -> Vec<u32> {
    processes(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        cmdline.starts_with("qemu-system") && cmdline.contains(needle)
    })
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn the_built_image_boots_and_passes_every_control_live() {
    require_root();
    let b = shared_build();
    let _g = heavy();
    let out = scratch("verify");
    // Through the signed shim, GRUB and kernel, with OVMF enforcing
    // Secure Boot with Microsoft's keys.
    let o = stemforge([
        "verify",
        b.raw.to_str().unwrap(),
        "--boot-firmware",
        "secure-boot",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["passed"], true, "{t}");
    assert_eq!(v["boot_firmware"], "secure-boot");
    assert!(
        v["firmware"]
            .as_str()
            .unwrap()
            .contains("Secure Boot enforced"),
        "{}",
        v["firmware"]
    );
    let console =
        String::from_utf8_lossy(&std::fs::read(out.join("debian-bookworm.console.log")).unwrap())
            .into_owned();
    assert!(
        console.contains("Secure boot enabled"),
        "the kernel saw Secure Boot on"
    );
    let agent = &v["agent"];
    assert_eq!(agent["system_state"], "running");
    assert_eq!(agent["failed_units"].as_array().unwrap().len(), 0);
    assert_eq!(agent["sshd_listening"], true);
    // The BOSH agent given with --bosh-agent started at boot.
    assert_eq!(agent["bosh_agent_active"], true, "{agent}");
    assert!(
        v["host_ssh_banner"]
            .as_str()
            .unwrap()
            .starts_with("SSH-2.0-OpenSSH"),
        "{}",
        v["host_ssh_banner"]
    );
    assert_eq!(v["clean_shutdown"], true);
    // The host logged in with the run's own key (from the NoCloud seed)
    // and ran the scan through that connection too.
    let login = &v["ssh_login"];
    assert_eq!(login["user"], "stemforge", "{login}");
    assert_eq!(login["passed"], true, "{login}");
    assert_eq!(login["scan"]["fail"], 0, "{login}");
    assert!(login["scan"]["pass"].as_u64().unwrap() > 40, "{login}");
    // Every control that applies to a running system passes inside it.
    let scan: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("debian-bookworm.scan.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(scan["target"]["kind"], "live");
    eprintln!(
        "live scan: {} controls in {} ms (boot to agent {} s)",
        scan["summary"]["total"], scan["duration_ms"], v["boot_seconds"]
    );
    assert_eq!(scan["summary"]["fail"], 0, "{}", scan["summary"]);
    assert_eq!(scan["summary"]["error"], 0);
    // Only the controls about the shipped file are not applicable live.
    let offline_only = controls_for("offline");
    assert!(offline_only.len() >= 5, "{offline_only:?}");
    for r in scan["results"].as_array().unwrap() {
        if r["status"] == "not_applicable" && !for_another_role(r) {
            assert!(
                offline_only.contains(&r["id"]),
                "{} is not applicable live",
                r["id"]
            );
        }
    }
    // Live evidence comes from the running system, not from files.
    let ev = |id: &str| {
        scan["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()["evidence"]
            .to_string()
    };
    assert!(
        ev("sshd-no-root-login").contains("sshd -T"),
        "{}",
        ev("sshd-no-root-login")
    );
    assert!(ev("audit-rule-count").contains("audit rules"));
    assert!(ev("fs-tmp-noexec").contains("mountinfo"));
    let console =
        String::from_utf8_lossy(&std::fs::read(out.join("debian-bookworm.console.log")).unwrap())
            .into_owned();
    assert!(
        console.contains("stemforge agent: scan"),
        "the agent's progress is on the console"
    );
    assert!(qemu_running(b.raw.to_str().unwrap()).is_empty());
    done_with(&out);
}

/// `efi` without its Authenticode signature: the PE certificate table
/// entry cleared and the table cut off (the same loader, unsigned).
fn strip_signature(efi: &mut Vec<u8>) {
    let pe = u32::from_le_bytes(efi[0x3c..0x40].try_into().unwrap()) as usize;
    assert_eq!(&efi[pe..pe + 4], b"PE\0\0");
    let opt = pe + 24;
    assert_eq!(u16::from_le_bytes([efi[opt], efi[opt + 1]]), 0x20b, "PE32+");
    let dir = opt + 112 + 4 * 8;
    let at = u32::from_le_bytes(efi[dir..dir + 4].try_into().unwrap()) as usize;
    assert!(at > 0 && at < efi.len(), "the loader is signed");
    efi[dir..dir + 8].fill(0);
    efi.truncate(at);
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn secure_boot_refuses_the_image_when_its_loader_is_unsigned() {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::FileExt;
    require_root();
    let b = shared_build();
    let _g = heavy();
    let d = scratch("unsigned");
    let raw = d.join("unsigned.raw");
    let o = Command::new("cp")
        .arg("--sparse=always")
        .arg(&b.raw)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // The ESP, in memory: BOOTX64.EFI (the signed shim) loses its signature.
    let disk = gpt::GptConfig::new().writable(false).open(&raw).unwrap();
    let esp = disk
        .partitions()
        .values()
        .find(|p| p.part_type_guid.guid.to_string().to_uppercase() == stemforge::disk::types::ESP)
        .unwrap()
        .clone();
    let (offset, len) = (
        esp.first_lba * 512,
        esp.bytes_len(gpt::disk::LogicalBlockSize::Lb512).unwrap(),
    );
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&raw)
        .unwrap();
    let mut bytes = vec![0u8; len as usize];
    f.read_exact_at(&mut bytes, offset).unwrap();
    let mut cur = std::io::Cursor::new(bytes);
    {
        let fs = fatfs::FileSystem::new(&mut cur, fatfs::FsOptions::new()).unwrap();
        let mut file = fs.root_dir().open_file("EFI/BOOT/BOOTX64.EFI").unwrap();
        let mut efi = Vec::new();
        file.read_to_end(&mut efi).unwrap();
        assert!(
            efi.windows(4).any(|w| w == b"shim"),
            "BOOTX64.EFI is the shim"
        );
        strip_signature(&mut efi);
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        file.truncate().unwrap();
        file.write_all(&efi).unwrap();
        file.flush().unwrap();
        drop(file);
        fs.unmount().unwrap();
    }
    f.write_all_at(cur.get_ref(), offset).unwrap();
    f.sync_all().unwrap();
    drop(f);
    // OVMF enforcing Secure Boot refuses it, and verify says so at once
    // instead of waiting out its boot time.
    let t0 = Instant::now();
    let o = stemforge([
        "verify",
        raw.to_str().unwrap(),
        "--boot-firmware",
        "secure-boot",
        "--out",
        d.to_str().unwrap(),
        "--json",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["passed"], false);
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("the firmware refused to start the bootloader")
            && problems.contains("Access Denied"),
        "{problems}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(200),
        "{:?}",
        t0.elapsed()
    );
    assert!(qemu_running(raw.to_str().unwrap()).is_empty());
    done_with(&d);
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn verify_fails_in_time_and_kills_qemu_when_the_guest_never_reports() {
    require_root();
    let _g = heavy();
    let d = scratch("verify-timeout");
    // A blank disk: the firmware finds nothing to boot.
    let image = d.join("blank.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let t0 = Instant::now();
    let o = stemforge([
        "verify",
        image.to_str().unwrap(),
        "--timeout",
        "20",
        "--out",
        d.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("did not report within 20 s"), "{t}");
    assert!(
        t0.elapsed() < Duration::from_secs(90),
        "took {:?}",
        t0.elapsed()
    );
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("blank.verify.json")).unwrap())
            .unwrap();
    assert_eq!(v["passed"], false);
    assert!(
        d.join("blank.console.log").exists(),
        "the console log is kept"
    );
    assert!(
        qemu_running(image.to_str().unwrap()).is_empty(),
        "QEMU was left running"
    );
    done_with(&d);
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn the_stage_engine_applies_every_action_kind_inside_a_namespaced_chroot() {
    require_root();
    let stock = stock_tree();
    let _g = heavy();
    let d = scratch("stage-engine");
    let tree = d.join("rootfs");
    assert!(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&stock)
            .arg(&tree)
            .status()
            .unwrap()
            .success()
    );
    let stages = d.join("stages");
    std::fs::create_dir_all(stages.join("10-demo/files")).unwrap();
    std::fs::write(stages.join("10-demo/files/demo.conf"), "demo = 1\n").unwrap();
    std::fs::write(
        stages.join("10-demo/apply.sh"),
        "# runs under set -eu, services may not start, /proc is mounted\n\
         test -x /usr/sbin/policy-rc.d\n\
         test -r /proc/self/stat\n\
         test -c /dev/null\n\
         echo \"$STEMFORGE_SCRIPT\" > /etc/demo-script-ran\n",
    )
    .unwrap();
    std::fs::write(
        stages.join("10-demo/stage.yml"),
        r#"name: demo
summary: every action kind
packages: { install: [less], purge: [dosfstools] }
files:
  - { path: /etc/demo/demo.conf, source: demo.conf, mode: "0640", owner: root, group: adm }
  - { path: /etc/demo/inline.conf, content: "inline\n" }
permissions:
  - { path: /etc/issue, mode: "0600" }
sysctl: { kernel.dmesg_restrict: 1 }
kernel_modules: { disable: [cramfs] }
services: { enable: [auditd], disable: [ssh, no-such-unit], mask: [e2scrub_reap] }
script: apply.sh
controls:
  - id: demo-file
    title: the demo file
    severity: low
    description: a test control
    check: { file: { path: /etc/demo/demo.conf, mode: "0640", group: adm } }
"#,
    )
    .unwrap();
    let catalog =
        stemforge::stage::Catalog::load(&stemforge::stage::StageSource::Dir(stages.clone()))
            .unwrap();
    let chroot = stemforge::chroot::Chroot::new(&tree).unwrap();
    let stage_refs: Vec<&stemforge::stage::Stage> = catalog.stages.iter().collect();
    let applied = stemforge::osimage::apply_stages(&chroot, &stage_refs).unwrap();
    assert_eq!(applied.stages, vec!["10-demo"]);
    assert!(
        applied.initramfs_dirty,
        "a new modprobe.d file must rebuild the initramfs"
    );
    let status = std::fs::read_to_string(tree.join("var/lib/dpkg/status")).unwrap();
    let installed = stemforge::scan::kinds::package::installed(&status);
    assert!(installed.contains("less") && !installed.contains("dosfstools"));
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(tree.join("etc/demo/demo.conf")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!(
        std::fs::read_to_string(tree.join("etc/demo/inline.conf")).unwrap(),
        "inline\n"
    );
    assert_eq!(
        std::fs::metadata(tree.join("etc/issue")).unwrap().mode() & 0o777,
        0o600
    );
    assert!(
        std::fs::read_to_string(tree.join("etc/sysctl.d/99-stemforge-demo.conf"))
            .unwrap()
            .contains("kernel.dmesg_restrict = 1")
    );
    let modprobe =
        std::fs::read_to_string(tree.join("etc/modprobe.d/stemforge-demo.conf")).unwrap();
    assert!(
        modprobe.contains("install cramfs /bin/false") && modprobe.contains("blacklist cramfs")
    );
    assert!(
        !tree
            .join("etc/systemd/system/multi-user.target.wants/ssh.service")
            .exists()
    );
    assert_eq!(
        std::fs::read_link(tree.join("etc/systemd/system/e2scrub_reap.service")).unwrap(),
        Path::new("/dev/null")
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("etc/demo-script-ran")).unwrap(),
        "stages/10-demo/apply.sh\n"
    );
    // The control reads what the stage wrote.
    let r = scan_json(&tree, &["--stages", stages.to_str().unwrap()]);
    assert_eq!(r["summary"]["pass"], 1, "{r}");
    // Finalizing removes the service-start policy and host leftovers.
    stemforge::osimage::finalize(&chroot, false).unwrap();
    assert!(!tree.join("usr/sbin/policy-rc.d").exists());
    assert!(
        std::fs::read_dir(tree.join("etc/ssh"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("ssh_host_"))
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("etc/machine-id")).unwrap(),
        ""
    );
    assert!(mounts_under(&d).is_empty());

    // A failing script fails the stage, naming it, with its stderr.
    std::fs::write(
        stages.join("10-demo/apply.sh"),
        "echo 'about to fail' >&2\nfalse\n",
    )
    .unwrap();
    let catalog =
        stemforge::stage::Catalog::load(&stemforge::stage::StageSource::Dir(stages.clone()))
            .unwrap();
    let stage_refs: Vec<&stemforge::stage::Stage> = catalog.stages.iter().collect();
    let err = stemforge::osimage::apply_stages(&chroot, &stage_refs).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("stages/10-demo/apply.sh")
            && msg.contains("about to fail")
            && msg.contains("exit status 1"),
        "{msg}"
    );
    assert!(mounts_under(&d).is_empty());
    done_with(&d);
}

/// Members of a tar archive, in order, as GNU tar lists them.
fn tar_members(archive: &Path, gzip: bool) -> Vec<String> {
    let o = Command::new("tar")
        .arg(if gzip { "-tzf" } else { "-tf" })
        .arg(archive)
        .output()
        .unwrap();
    assert!(o.status.success(), "tar -t {}: {o:?}", archive.display());
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// One member of a tar archive, read with GNU tar.
fn tar_member(archive: &Path, member: &str, gzip: bool) -> Vec<u8> {
    let o = Command::new("tar")
        .arg(if gzip { "-xzOf" } else { "-xOf" })
        .arg(archive)
        .arg(member)
        .output()
        .unwrap();
    assert!(o.status.success(), "tar -x {member}: {o:?}");
    o.stdout
}

fn hex_digest<D: sha2::Digest>(bytes: &[u8]) -> String {
    D::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn every_output_passes_the_validator_its_consumers_use() {
    use common::validate::{check_cyclonedx, check_ovf, check_spdx};
    require_root();
    let b = shared_build();
    let out = &b.out;
    let f = |name: &str| out.join(format!("debian-bookworm.{name}"));

    // SHA256SUMS: sha256sum -c passes over every output and the manifest.
    let o = Command::new("sha256sum")
        .args(["-c", "debian-bookworm.SHA256SUMS"])
        .current_dir(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let sums = std::fs::read_to_string(f("SHA256SUMS")).unwrap();
    for name in [
        "raw",
        "qcow2",
        "vmdk",
        "ovf",
        "ova",
        "aws.json",
        "openstack.json",
        "spdx.json",
        "cdx.json",
        "manifest.json",
    ] {
        assert!(
            sums.contains(&format!("  debian-bookworm.{name}\n")),
            "{name} not in SHA256SUMS:\n{sums}"
        );
    }
    assert_eq!(sums.matches("go_agent.tgz\n").count(), 3, "{sums}");

    // The manifest names the inputs and every output with its hash.
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(f("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["version"], "1.0");
    assert!(
        m["inputs"]["packages"]["openssh-server"].is_string(),
        "{}",
        m["inputs"]["packages"]
    );
    assert!(m["inputs"]["packages"]["cloud-init"].is_string());
    assert!(
        m["inputs"]["host_tools"]["qemu-utils"].is_string(),
        "{}",
        m["inputs"]["host_tools"]
    );
    assert!(
        m["inputs"]["bootstrap_key"]
            .as_str()
            .unwrap()
            .starts_with("debian-bookworm-")
    );
    let stages = m["inputs"]["stages"].as_array().unwrap();
    assert!(
        stages
            .iter()
            .any(|s| s["name"] == "05-cloud" && s["sha256"].as_str().unwrap().len() == 64)
    );
    for o in m["outputs"].as_array().unwrap() {
        let line = format!(
            "{}  {}\n",
            o["sha256"].as_str().unwrap(),
            o["file"].as_str().unwrap()
        );
        assert!(sums.contains(&line), "{line} not in SHA256SUMS");
    }

    // VMDK: a streamOptimized sparse extent, complete to its end marker.
    let vmdk = stemforge::formats::vmware::check_vmdk(&f("vmdk")).unwrap();
    assert_eq!(
        (vmdk.version, vmdk.create_type.as_str()),
        (3, "streamOptimized")
    );
    let head = std::fs::read(f("vmdk")).unwrap();
    assert_eq!(&head[..4], b"KDMV");
    assert_eq!(vmdk.capacity_bytes, 5 << 30);

    // OVF against the DMTF schema; OVA: .ovf, .mf, .vmdk in that order,
    // and the .mf's hashes are the members'.
    check_ovf(&f("ovf")).unwrap();
    let members = tar_members(&f("ova"), false);
    assert_eq!(
        members,
        [
            "debian-bookworm.ovf",
            "debian-bookworm.mf",
            "debian-bookworm.vmdk"
        ]
    );
    let mf = String::from_utf8(tar_member(&f("ova"), "debian-bookworm.mf", false)).unwrap();
    for member in ["debian-bookworm.ovf", "debian-bookworm.vmdk"] {
        let bytes = tar_member(&f("ova"), member, false);
        let line = format!("SHA256({member})= {}", hex_digest::<sha2::Sha256>(&bytes));
        assert!(mf.lines().any(|l| l == line), "{line} not in\n{mf}");
    }

    // SBOMs: their formats' own validators, and every installed package.
    check_spdx(&f("spdx.json")).unwrap();
    check_cyclonedx(&f("cdx.json")).unwrap();
    let installed = std::fs::read_to_string(b.tree.join("var/lib/dpkg/status"))
        .unwrap()
        .split("\n\n")
        .filter(|p| p.contains("Status: install ok installed"))
        .count();
    let cdx: Value =
        serde_json::from_str(&std::fs::read_to_string(f("cdx.json")).unwrap()).unwrap();
    assert_eq!(cdx["components"].as_array().unwrap().len(), installed);
    assert!(cdx["components"].as_array().unwrap().iter().any(|c| {
        c["purl"]
            .as_str()
            .unwrap()
            .starts_with("pkg:deb/debian/openssh-server@")
            && c["purl"].as_str().unwrap().contains("distro=debian-12")
    }));

    // Cloud metadata.
    let aws: Value =
        serde_json::from_str(&std::fs::read_to_string(f("aws.json")).unwrap()).unwrap();
    let aws_text = aws.to_string();
    for needle in [
        "x86_64",
        "uefi-preferred",
        "ena",
        "/dev/xvda",
        "v2.0",
        "debian-bookworm.raw",
    ] {
        assert!(aws_text.contains(needle), "{needle} not in {aws_text}");
    }
    let os: Value =
        serde_json::from_str(&std::fs::read_to_string(f("openstack.json")).unwrap()).unwrap();
    let os_text = os.to_string();
    for needle in [
        "hw_firmware_type",
        "uefi",
        "hw_machine_type",
        "hw_disk_bus",
        "hw_vif_model",
        "\"os_distro\":\"debian\"",
        "\"os_version\":\"12\"",
    ] {
        assert!(os_text.contains(needle), "{needle} not in {os_text}");
    }

    // BOSH stemcells: stemcell.MF's typing rules, and sha1 of `image`.
    for (iaas, hv, inner) in [
        ("aws", "xen-hvm", vec!["root.img"]),
        ("openstack", "kvm", vec!["root.img"]),
        (
            "vsphere",
            "esxi",
            vec![
                "debian-bookworm.ovf",
                "debian-bookworm.mf",
                "debian-bookworm.vmdk",
            ],
        ),
    ] {
        let tgz = out.join(format!(
            "bosh-stemcell-1.0-{iaas}-{hv}-debian-bookworm-go_agent.tgz"
        ));
        let members = tar_members(&tgz, true);
        for m in [
            "stemcell.MF",
            "image",
            "packages.txt",
            "dev_tools_file_list.txt",
            "sbom.spdx.json",
            "sbom.cdx.json",
        ] {
            assert!(
                members.iter().any(|x| x == m),
                "{m} not in {}: {members:?}",
                tgz.display()
            );
        }
        let mf = String::from_utf8(tar_member(&tgz, "stemcell.MF", true)).unwrap();
        for key in ["name", "version", "operating_system", "sha1"] {
            let line = mf
                .lines()
                .find(|l| l.starts_with(&format!("{key}:")))
                .unwrap_or_else(|| panic!("{key} in\n{mf}"));
            let value = line.split_once(':').unwrap().1.trim();
            assert!(
                value.starts_with('"') || value.starts_with('\''),
                "{key} is not a quoted string: {line}"
            );
        }
        assert!(mf.lines().any(|l| l == "api_version: 3"), "{mf}");
        let doc: serde_yaml::Value = serde_yaml::from_str(&mf).unwrap();
        assert_eq!(doc["operating_system"].as_str(), Some("debian-bookworm"));
        assert_eq!(doc["bosh_agent"]["installed"].as_bool(), Some(true), "{mf}");
        assert_eq!(
            doc["cloud_properties"]["infrastructure"].as_str(),
            Some(iaas)
        );
        assert!(doc["bosh_protocol"].as_u64().is_some() || doc["bosh_protocol"].as_str().is_some());
        let image = tar_member(&tgz, "image", true);
        assert_eq!(
            doc["sha1"].as_str(),
            Some(hex_digest::<sha1::Sha1>(&image).as_str())
        );
        let d = scratch(&format!("stemcell-{iaas}"));
        std::fs::write(d.join("image"), &image).unwrap();
        assert_eq!(tar_members(&d.join("image"), true), inner);
        done_with(&d);
    }
    // The cloud drivers are in the initramfs.
    let initrd = std::fs::read_dir(b.tree.join("boot"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("initrd.img-"))
        .expect("an initramfs");
    let chroot = stemforge::chroot::Chroot::new(&b.tree).unwrap();
    let list = chroot
        .run(&["lsinitramfs", &format!("/boot/{initrd}")])
        .unwrap()
        .stdout_str();
    for module in [
        "vmw_pvscsi.ko",
        "vmxnet3.ko",
        "ena.ko",
        "virtio_blk.ko",
        "virtio_net.ko",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(module)),
            "{module} not in the initramfs"
        );
    }
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn boot_through_bios_prints_an_ssh_command_that_logs_in_and_ctrl_c_powers_off() {
    use std::io::BufRead;
    require_root();
    let b = shared_build();
    let _g = heavy();
    let d = scratch("boot");
    let console = d.join("console.log");
    /// Kills `stemforge boot` if the test fails before Ctrl-C (its QEMU
    /// dies with it).
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        // The hybrid disk's BIOS path, on AWS's NVMe hardware.
        Command::new(bin())
            .args([
                "boot",
                "--boot-as",
                "aws",
                "--boot-firmware",
                "bios",
                "--console",
            ])
            .arg(&console)
            .arg(&b.raw)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(420);
    let ssh = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("boot printed an ssh command in time");
        if let Some(c) = line.strip_prefix("ssh ") {
            break c.to_string();
        }
    };
    // The printed command, with a command to run, logs in (cloud-init may
    // still be making the user for a few seconds).
    let login = Instant::now() + Duration::from_secs(120);
    let who = loop {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("ssh {ssh} id -un"))
            .output()
            .unwrap();
        if o.status.success() {
            break String::from_utf8_lossy(&o.stdout).trim().to_string();
        }
        assert!(Instant::now() < login, "ssh {ssh}: {o:?}");
        std::thread::sleep(Duration::from_secs(3));
    };
    assert_eq!(who, "stemforge");
    // Ctrl-C: the guest powers off and QEMU is gone.
    let t0 = Instant::now();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let status = child.0.wait().unwrap();
    let log = String::from_utf8_lossy(&std::fs::read(&console).unwrap()).into_owned();
    let tail: String = log
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    // boot exits 0 only when the guest powered itself off.
    assert!(
        status.success(),
        "{status:?} after {:?}; console:\n{tail}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(130),
        "{:?}",
        t0.elapsed()
    );
    assert!(qemu_running(b.raw.to_str().unwrap()).is_empty());
    assert!(
        log.contains("reboot: Power down"),
        "no clean power-off on the console:\n{tail}"
    );
    // Booted by the BIOS: the kernel found no EFI system table.
    assert!(log.contains("Linux version") && !log.contains("efi: EFI v"));
    done_with(&d);
}

/// The statuses and evidence of a scan, by control; the file walk's
/// count aside (an image's file systems each hold a lost+found).
fn outcomes(report: &Value) -> Vec<(String, String, Vec<String>)> {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
                r["evidence"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e.as_str().unwrap().to_string())
                    .filter(|e| !e.ends_with(" files walked"))
                    .collect(),
            )
        })
        .collect()
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn an_image_file_scans_like_its_tree_in_every_format_without_mounting() {
    require_root();
    let b = shared_build();
    let tree = scan_json(&b.tree, &[]);
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for file in [
        "debian-bookworm.raw",
        "debian-bookworm.qcow2",
        "debian-bookworm.vmdk",
    ] {
        let image = b.out.join(file);
        let t0 = Instant::now();
        let o = stemforge([
            "scan",
            "--image",
            image.to_str().unwrap(),
            "--format",
            "json",
        ]);
        let secs = t0.elapsed().as_secs_f64();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{file}: {t}");
        let scan: Value = serde_json::from_slice(&o.stdout).unwrap();
        eprintln!("scan --image {file}: {secs:.1} s");
        assert_eq!(scan["target"]["kind"], "image");
        assert_eq!(scan["summary"], tree["summary"], "{file}");
        assert_eq!(outcomes(&scan), outcomes(&tree), "{file}");
        // The separate partitions are read as the image mounts them.
        let ev = scan["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "fs-tmp-separate")
            .unwrap()["evidence"]
            .to_string();
        assert!(ev.contains("/tmp"), "{ev}");
    }
    // Nothing was mounted to do it.
    assert_eq!(
        std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        mounts_before
    );
    // Every report, each checked by the validator its consumers use.
    let dir = scratch("reports");
    let o = stemforge([
        "scan",
        "--image",
        b.out.join("debian-bookworm.qcow2").to_str().unwrap(),
        "--report-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    validate::check_junit(&dir.join("scan.junit.xml")).unwrap();
    validate::check_ckl(&dir.join("scan.ckl")).unwrap();
    validate::check_json_schema(
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/cklb/cklb.schema.json"
        )),
        &dir.join("scan.cklb"),
    )
    .unwrap();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("scan.json")).unwrap()).unwrap();
    assert_eq!(outcomes(&json), outcomes(&tree));
    // The JSON report follows the schema `stemforge schema` prints.
    let o = stemforge(["schema"]);
    assert!(o.status.success(), "{}", text(&o));
    let schema = dir.join("scan.schema.json");
    std::fs::write(&schema, &o.stdout).unwrap();
    validate::check_json_schema(&schema, &dir.join("scan.json")).unwrap();
    let ckl = std::fs::read_to_string(dir.join("scan.ckl")).unwrap();
    assert!(ckl.contains("<VULN_ATTRIBUTE>Vuln_Num</VULN_ATTRIBUTE>"));
    assert!(ckl.contains("<STATUS>NotAFinding</STATUS>"));
    assert!(ckl.contains("<HOST_NAME>debian-bookworm.qcow2</HOST_NAME>"));
    let cklb: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("scan.cklb")).unwrap()).unwrap();
    let stigs = cklb["stigs"].as_array().unwrap();
    assert!(
        stigs.iter().any(|s| s["stig_id"] == "ubuntu2204"),
        "{stigs:?}"
    );
    let rules = stigs[0]["rules"].as_array().unwrap();
    assert_eq!(rules.len() as u64, stigs[0]["size"].as_u64().unwrap());
    assert!(rules.iter().any(|r| r["status"] == "not_a_finding"));
    // The page loads in a real browser without console errors, its
    // script runs, and its screenshot is kept as a test artifact.
    let page = dir.join("scan.html");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external asset"
    );
    let browse = |extra: &[&str]| {
        let profile = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,1400",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("file://{}", page.display()));
        let o = Command::new("chromium")
            .args(&args)
            .output()
            .expect("chromium runs");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            !err.lines().any(|l| l.contains(":CONSOLE")),
            "the page logged to the console: {err}"
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let dom = browse(&["--dump-dom"]);
    assert!(
        dom.contains("data-ready=\"yes\""),
        "the page's script did not run"
    );
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("scan-html.png");
    let _ = std::fs::remove_file(&shot);
    browse(&[&format!("--screenshot={}", shot.display())]);
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "{}",
        shot.display()
    );
    done_with(&dir);
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn a_damaged_image_is_a_clear_error_in_bounded_time() {
    require_root();
    let b = shared_build();
    let dir = scratch("damaged");
    let copy = |name: &str| {
        let p = dir.join(name);
        let st = Command::new("cp")
            .args(["--sparse=always"])
            .arg(&b.raw)
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        p
    };
    let write_at = |file: &Path, offset: u64, bytes: &[u8]| {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(bytes).unwrap();
    };
    // The root partition's first byte, from the image's own GPT (the
    // base layout: the ESP, then /).
    let disk = gpt::GptConfig::new().writable(false).open(&b.raw).unwrap();
    let root_start = disk.partitions()[&2].first_lba * 512;
    let size = std::fs::metadata(&b.raw).unwrap().len();
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "truncated",
            Box::new(move |p: &Path| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(size / 2).unwrap();
            }),
            "but the image has",
        ),
        (
            "no-gpt",
            Box::new(move |p: &Path| {
                write_at(p, 512, &[0u8; 512]);
                write_at(p, size - 512, &[0u8; 512]);
            }),
            "no valid GPT",
        ),
        (
            "bad-superblock",
            // The ext4 magic (0xEF53) at byte 56 of the superblock.
            Box::new(move |p: &Path| write_at(p, root_start + 1024 + 56, &[0, 0])),
            "no ext4 partition holds an /etc/fstab",
        ),
        (
            "unknown-fs",
            Box::new(move |p: &Path| {
                let noise: Vec<u8> = (0..4u32 << 20)
                    .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                    .collect();
                write_at(p, root_start, &noise);
            }),
            "no ext4 partition holds an /etc/fstab",
        ),
    ];
    for (name, damage, says) in cases {
        let file = copy(&format!("{name}.raw"));
        damage(&file);
        let t0 = Instant::now();
        let o = stemforge(["scan", "--image", file.to_str().unwrap()]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {t}");
        assert!(t.contains(says), "{name}: {t}");
        assert!(
            t.contains(&format!("{name}.raw")),
            "{name}: names the file: {t}"
        );
        assert!(!t.contains("panicked"), "{name}: {t}");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{name}: {:?}",
            t0.elapsed()
        );
        std::fs::remove_file(&file).unwrap();
    }
    // A truncated qcow2 is refused when opened.
    let short = dir.join("truncated.qcow2");
    std::fs::copy(b.out.join("debian-bookworm.qcow2"), &short).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    let o = stemforge(["scan", "--image", short.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("beyond the end"), "{}", text(&o));
    // Not a disk image at all.
    let junk = dir.join("junk.qcow2");
    std::fs::write(&junk, b"QFI\xfbnot really").unwrap();
    let o = stemforge(["scan", "--image", junk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("qcow2: not a qcow2 file"), "{}", text(&o));
    done_with(&dir);
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn two_builds_from_the_same_inputs_give_every_output_bit_for_bit() {
    require_root();
    let b = shared_build();
    let report: Value = serde_json::from_slice(
        &std::fs::read(b.out.join("debian-bookworm.reproducible.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["reproducible"], true, "{report:#}");
    assert_eq!(report["source_date_epoch"], SHARED_EPOCH);
    let outputs = report["outputs"].as_array().unwrap();
    let names: Vec<&str> = outputs
        .iter()
        .map(|c| c["file"].as_str().unwrap())
        .collect();
    for ext in [
        ".raw",
        ".qcow2",
        ".vmdk",
        ".ova",
        ".spdx.json",
        ".cdx.json",
        ".tgz",
    ] {
        assert!(names.iter().any(|n| n.ends_with(ext)), "{ext}: {names:?}");
    }
    assert!(outputs.len() >= 13, "{names:?}");
    // The report's hashes are the files' own, in both output directories.
    let second = b.out.join(".reproduce");
    for c in outputs {
        let file = c["file"].as_str().unwrap();
        for dir in [&b.out, &second] {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            assert_eq!(hex_digest::<sha2::Sha256>(&bytes), c["first"], "{file}");
        }
    }
    // What the manifest records lets a third party rebuild.
    let m: Value = serde_json::from_slice(
        &std::fs::read(b.out.join("debian-bookworm.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["source_date_epoch"], SHARED_EPOCH);
    assert_eq!(m["inputs"]["profile"]["name"], "debian-bookworm");
    assert!(m["inputs"]["bootstrap_key"].as_str().unwrap().len() >= 16);
    assert!(!m["inputs"]["stages"].as_array().unwrap().is_empty());
    assert_eq!(
        m["input_hash"].as_str().unwrap().len(),
        64,
        "{}",
        m["input_hash"]
    );
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn a_stage_that_writes_the_time_makes_the_check_fail_and_name_the_file() {
    require_root();
    let _ = shared_build(); // the bootstrap is cached by now
    let _g = heavy();
    let d = scratch("unreproducible");
    let stages = d.join("stages");
    let st = Command::new("cp")
        .args(["-a", concat!(env!("CARGO_MANIFEST_DIR"), "/stages")])
        .arg(&stages)
        .status()
        .unwrap();
    assert!(st.success());
    let extra = stages.join("95-nonce");
    std::fs::create_dir(&extra).unwrap();
    std::fs::write(
        extra.join("stage.yml"),
        "name: nonce\nsummary: Writes the build's clock into the image.\nscript: apply.sh\ncontrols: []\n",
    )
    .unwrap();
    std::fs::write(extra.join("apply.sh"), "date +%s%N > /etc/build-nonce\n").unwrap();
    let out = d.join("out");
    let o = Command::new(bin())
        .args(["build", "--profile", "debian-bookworm", "--no-verify"])
        .args(["--format", "raw", "--check-reproducible", "--stages"])
        .arg(&stages)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("DIFFERS  debian-bookworm.raw"), "{t}");
    assert!(
        t.contains("first difference: in the image tree: /etc/build-nonce: contents differ"),
        "{t}"
    );
    let report: Value = serde_json::from_slice(
        &std::fs::read(out.join("debian-bookworm.reproducible.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["reproducible"], false);
    // The second build's scratch and both work trees are gone.
    assert!(!out.join(".reproduce").exists());
    assert!(!out.join(".work/debian-bookworm").exists());
    done_with(&d);
}
