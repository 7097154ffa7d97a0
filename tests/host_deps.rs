//! `make deps`: scripts/host-deps.sh installs the host packages of
//! scripts/host-tools.tsv in one apt run, with every QEMU package at one
//! version, and checks every tool again; `stemforge build`'s preflight
//! reads the same table.

mod common;

use common::{done_with, scratch, text};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use stemforge::chroot::Chroot;
use stemforge::exec;

fn project(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The rows of the tools table: (tool, package, when).
fn rows() -> Vec<(String, String, String)> {
    let table = std::fs::read_to_string(project("scripts/host-tools.tsv")).unwrap();
    table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 3, "not TOOL<tab>PACKAGE<tab>WHEN: {l:?}");
            (f[0].to_string(), f[1].to_string(), f[2].to_string())
        })
        .collect()
}

/// The commands of the table (not its files).
fn commands() -> Vec<String> {
    rows()
        .into_iter()
        .filter(|(tool, _, _)| !tool.starts_with('/'))
        .map(|(tool, _, _)| tool)
        .collect()
}

/// A directory holding an executable stub for each of `tools`.
fn stub_dir(dir: &Path, tools: &[String]) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for t in tools {
        let p = bin.join(t);
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// A dpkg database holding just these status entries.
fn admindir(dir: &Path, stanzas: &[&str]) -> PathBuf {
    let d = dir.join("dpkg");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("status"), stanzas.join("\n")).unwrap();
    d
}

fn check(table: &Path, path: &Path, admindir: &Path) -> Output {
    Command::new("bash")
        .arg(project("scripts/host-deps.sh"))
        .arg("--check")
        .arg("--tools")
        .arg(table)
        .arg("--path")
        .arg(path)
        .arg("--admindir")
        .arg(admindir)
        .output()
        .expect("bash runs")
}

// dpkg status entries copied from a Debian 12 host: qemu-utils from
// bookworm-backports, then the bookworm set `make deps` installed there
// (binNMUs, +b3, beside the arch-all qemu-system-data without it).
const QEMU_UTILS_BPO: &str = r#"Package: qemu-utils
Status: install ok installed
Priority: optional
Section: otherosfs
Installed-Size: 12118
Maintainer: Debian QEMU Team <pkg-qemu-devel@lists.alioth.debian.org>
Architecture: amd64
Multi-Arch: foreign
Source: qemu
Version: 1:10.0.2+ds-2+deb13u1~bpo12+1
Replaces: qemu-system-common (<< 1:8.0+dfsg-5~)
Depends: libaio1 (>= 0.3.93), libc6 (>= 2.34), libfuse3-3 (>= 3.2.3), libglib2.0-0 (>= 2.67.3), libgmp10 (>= 2:6.2.1+dfsg1), libgnutls30 (>= 3.7.5), libhogweed6, libnettle8 (>= 3.8~), libnuma1 (>= 2.0.11), libselinux1 (>= 3.1~), liburing2 (>= 2.3), libzstd1 (>= 1.5.2), zlib1g (>= 1:1.1.4)
Recommends: qemu-block-extra (= 1:10.0.2+ds-2+deb13u1~bpo12+1)
Breaks: qemu-system-common (<< 1:8.0+dfsg-5~)
Description: QEMU utilities
 QEMU is a fast processor emulator: currently the package supports Alpha, ARM,
 CRIS, i386, LoongArch, M68k (ColdFire), MicroBlaze, MIPS, PowerPC, RISC-V,
 S390x, SH4, SPARC, x86-64, Xtensa and other emulations. By using dynamic
 translation it achieves reasonable speed while being easy to port on new host
 CPUs.
 .
 This package provides QEMU related utilities:
  * qemu-img: QEMU disk image utility
  * qemu-io:  QEMU disk exerciser
  * qemu-nbd: QEMU disk network block device server
Homepage: http://www.qemu.org/
"#;

const QEMU_UTILS: &str = r#"Package: qemu-utils
Status: install ok installed
Priority: optional
Section: otherosfs
Installed-Size: 6911
Maintainer: Debian QEMU Team <pkg-qemu-devel@lists.alioth.debian.org>
Architecture: amd64
Multi-Arch: foreign
Source: qemu (1:7.2+dfsg-7+deb12u18)
Version: 1:7.2+dfsg-7+deb12u18+b3
Depends: libaio1 (>= 0.3.93), libc6 (>= 2.34), libfuse3-3 (>= 3.2.3), libglib2.0-0 (>= 2.67.3), libgmp10 (>= 2:6.2.1+dfsg1), libgnutls30 (>= 3.7.5), libhogweed6, libnettle8, libnuma1 (>= 2.0.11), libselinux1 (>= 3.1~), liburing2 (>= 2.3), libzstd1 (>= 1.5.2), zlib1g (>= 1:1.1.4)
Recommends: qemu-block-extra (= 1:7.2+dfsg-7+deb12u18+b3)
Breaks: qemu-system-common (<< 1:3.1+dfsg-3~)
Description: QEMU utilities
 QEMU is a fast processor emulator: currently the package supports
 ARM, CRIS, i386, M68k (ColdFire), MicroBlaze, MIPS, PowerPC, SH4,
 SPARC and x86-64 emulation. By using dynamic translation it achieves
 reasonable speed while being easy to port on new host CPUs.
 .
 This package provides QEMU related utilities:
  * qemu-img: QEMU disk image utility
  * qemu-io:  QEMU disk exerciser
  * qemu-nbd: QEMU disk network block device server
Homepage: http://www.qemu.org/
"#;

const QEMU_SYSTEM_X86: &str = r#"Package: qemu-system-x86
Status: install ok installed
Priority: optional
Section: otherosfs
Installed-Size: 43488
Maintainer: Debian QEMU Team <pkg-qemu-devel@lists.alioth.debian.org>
Architecture: amd64
Multi-Arch: foreign
Source: qemu (1:7.2+dfsg-7+deb12u18)
Version: 1:7.2+dfsg-7+deb12u18+b3
Replaces: qemu-kvm
Provides: qemu-kvm, qemu-system-i386, qemu-system-x86-64
Depends: libaio1 (>= 0.3.93), libbpf1 (>= 1:0.0.8), libc6 (>= 2.34), libcapstone4 (>= 4), libfdt1 (>= 1.6.1), libfuse3-3 (>= 3.2.3), libgcc-s1 (>= 3.4), libglib2.0-0 (>= 2.67.3), libgmp10 (>= 2:6.2.1+dfsg1), libgnutls30 (>= 3.7.5), libhogweed6, libibverbs1 (>= 28), libjpeg62-turbo (>= 1.3.1), libnettle8, libnuma1 (>= 2.0.11), libpixman-1-0 (>= 0.19.6), libpmem1 (>= 1.4), libpng16-16 (>= 1.6.2-1), librdmacm1 (>= 1.0.15), libsasl2-2 (>= 2.1.28+dfsg), libseccomp2 (>= 2.1.0), libslirp0 (>= 4.7.0), libudev1 (>= 183), liburing2 (>= 2.3), libvdeplug2 (>= 4.0.1), libzstd1 (>= 1.5.2), zlib1g (>= 1:1.2.0), qemu-system-common (= 1:7.2+dfsg-7+deb12u18+b3), qemu-system-data (>> 1:7.2+dfsg~), seabios, ipxe-qemu
Recommends: qemu-system-gui (= 1:7.2+dfsg-7+deb12u18+b3), qemu-utils, ovmf, qemu-block-extra (= 1:7.2+dfsg-7+deb12u18+b3)
Suggests: samba, vde2
Breaks: qemu-kvm
Description: QEMU full system emulation binaries (x86)
 QEMU is a fast processor emulator: currently the package supports
 i386 and x86-64 emulation. By using dynamic translation it achieves
 reasonable speed while being easy to port on new host CPUs.
 .
 This package provides the full system emulation binaries to emulate
 the following x86 hardware:  i386 x86_64.
 .
 In system emulation mode QEMU emulates a full system, including a processor
 and various peripherals.  It enables easier testing and debugging of system
 code.  It can also be used to provide virtual hosting of several virtual
 machines on a single server.
 .
 On x86 host hardware this package also enables KVM kernel virtual machine
 usage on systems which supports it.
Homepage: http://www.qemu.org/
"#;

const QEMU_SYSTEM_DATA: &str = r#"Package: qemu-system-data
Status: install ok installed
Priority: optional
Section: otherosfs
Installed-Size: 7993
Maintainer: Debian QEMU Team <pkg-qemu-devel@lists.alioth.debian.org>
Architecture: all
Multi-Arch: foreign
Source: qemu
Version: 1:7.2+dfsg-7+deb12u18
Replaces: openbios-ppc, openbios-sparc, qemu-slof, qemu-system-common (<< 1:2.12+dfsg-2~), qemu-system-ppc (<< 1:6.1-4~), qemu-system-sparc (<< 1:4.2-4~), sgabios
Provides: openbios-ppc, openbios-sparc, qemu-keymaps, qemu-skiboot, qemu-slof, sgabios
Breaks: qemu-system-common (<< 1:2.12+dfsg-2~), qemu-system-ppc (<< 1:6.1-4~), qemu-system-sparc (<< 1:4.2-4~)
Conflicts: openbios-ppc, openbios-sparc, qemu-skiboot, qemu-slof, sgabios
Description: QEMU full system emulation (data files)
 This package provides architecture-neutral data files
 (such as keyboard definitions, icons) for system-mode
 QEMU emulation (qemu-system-*) packages.
Homepage: http://www.qemu.org/
"#;

#[test]
fn the_table_covers_the_host_set() {
    let rows = rows();
    for (tool, pkg, when) in &rows {
        assert!(
            ["always", "verify", "dev", "optional"].contains(&when.as_str()),
            "{tool}: unknown WHEN {when:?}"
        );
        assert!(!pkg.is_empty() && !pkg.contains(' '), "{tool}: {pkg:?}");
    }
    let has = |t: &str, p: &str, w: &str| {
        rows.iter()
            .any(|r| (r.0.as_str(), r.1.as_str(), r.2.as_str()) == (t, p, w))
    };
    assert!(has("qemu-img", "qemu-utils", "always"));
    assert!(has("qemu-system-x86_64", "qemu-system-x86", "verify"));
    assert!(has("mmdebstrap", "mmdebstrap", "always"));
    for pkg in [
        "mmdebstrap",
        "util-linux",
        "e2fsprogs",
        "dosfstools",
        "qemu-utils",
        "qemu-system-x86",
        "ovmf",
        "seabios",
        "debian-archive-keyring",
        "ca-certificates",
        "gcc",
        "libc6-dev",
        "python3-venv",
        "ubuntu-keyring",
    ] {
        assert!(rows.iter().any(|r| r.1 == pkg), "{pkg} is not in the table");
    }
}

#[test]
fn check_names_the_package_of_each_missing_tool() {
    let dir = scratch("host-deps-check");
    let table = dir.join("tools.tsv");
    let firmware = dir.join("firmware");
    std::fs::create_dir_all(&firmware).unwrap();
    // The table's commands, and one file row (a glob) under the scratch dir.
    let mut body = std::fs::read_to_string(project("scripts/host-tools.tsv"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('/'))
        .collect::<Vec<_>>()
        .join("\n");
    body.push_str(&format!(
        "\n{}/OVMF_CODE*.fd\tovmf\tverify\n",
        firmware.display()
    ));
    std::fs::write(&table, body).unwrap();
    let db = admindir(&dir, &[QEMU_UTILS, QEMU_SYSTEM_X86, QEMU_SYSTEM_DATA]);
    let all = commands();
    let some: Vec<String> = all
        .iter()
        .filter(|t| *t != "qemu-img" && *t != "debugfs")
        .cloned()
        .collect();

    let o = check(&table, &stub_dir(&dir.join("some"), &some), &db);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let mut lines: Vec<String> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    let ovmf = format!(
        "host-deps: {}/OVMF_CODE*.fd not found (package ovmf)",
        firmware.display()
    );
    let mut want = vec![
        "host-deps: debugfs not found (package e2fsprogs)".to_string(),
        "host-deps: qemu-img not found (package qemu-utils)".to_string(),
        ovmf,
    ];
    want.sort();
    assert_eq!(lines, want);

    std::fs::write(firmware.join("OVMF_CODE_4M.fd"), b"").unwrap();
    let o = check(&table, &stub_dir(&dir.join("all"), &all), &db);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(text(&o), "", "a complete host is checked quietly");
    done_with(&dir);
}

#[test]
fn check_finds_qemu_packages_of_two_versions() {
    let dir = scratch("host-deps-qemu");
    let table = dir.join("tools.tsv");
    std::fs::write(&table, "qemu-img\tqemu-utils\talways\n").unwrap();
    let bin = stub_dir(&dir, &["qemu-img".to_string()]);

    // The backported qemu-utils beside bookworm's qemu-system-x86.
    let mixed = admindir(&dir.join("mixed"), &[QEMU_UTILS_BPO, QEMU_SYSTEM_X86]);
    let o = check(&table, &bin, &mixed);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1")
            && err.contains("qemu-system-x86 1:7.2+dfsg-7+deb12u18+b3")
            && err.contains("different versions"),
        "{err}"
    );

    // One source version, though the binary versions differ (+b3).
    let one = admindir(
        &dir.join("one"),
        &[QEMU_UTILS, QEMU_SYSTEM_X86, QEMU_SYSTEM_DATA],
    );
    let o = check(&table, &bin, &one);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    done_with(&dir);
}

#[test]
fn preflight_reads_the_host_tools_table() {
    let dir = scratch("host-deps-preflight");
    // `mount` is a row the preflight's old built-in list lacked.
    let present: Vec<String> = commands()
        .into_iter()
        .filter(|t| !["qemu-img", "qemu-system-x86_64", "mount"].contains(&t.as_str()))
        .collect();
    let bin = stub_dir(&dir, &present);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "build",
            "--profile",
            "debian-bookworm",
            "--mirror",
            "http://127.0.0.1:9/debian",
            "--suite-mirror",
            "bookworm-security=http://127.0.0.1:9/debian-security",
        ];
        args.extend_from_slice(extra);
        let out = dir.join("out");
        let cache = dir.join("cache");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        Command::new(common::bin())
            .args(&args)
            .arg("--out")
            .arg(&out)
            .arg("--cache-dir")
            .arg(&cache)
            .env("PATH", &bin)
            .output()
            .unwrap()
    };
    let o = run(&["--no-verify"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(
        t.contains("qemu-img not found: apt-get install qemu-utils"),
        "{t}"
    );
    assert!(
        !t.contains("qemu-system-x86_64"),
        "--no-verify needs no QEMU system: {t}"
    );
    assert!(t.contains("mount not found: apt-get install mount"), "{t}");
    assert_eq!(t.matches(" not found: apt-get install ").count(), 2, "{t}");

    let o = run(&[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(
        t.contains("qemu-system-x86_64 not found: apt-get install qemu-system-x86"),
        "{t}"
    );
    done_with(&dir);
}

/// A throwaway root tree, removed when dropped (never while anything is
/// mounted inside it).
struct Tree(PathBuf);

impl Drop for Tree {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = format!("{}/", self.0.display());
        if mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|m| m.starts_with(&prefix))
        {
            eprintln!(
                "{} still has mounts inside: left in place",
                self.0.display()
            );
            return;
        }
        done_with(&self.0);
    }
}

const BOOKWORM: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];
const BACKPORTS: &str = "deb http://deb.debian.org/debian bookworm-backports main";

fn version_line(c: &Chroot, tool: &str) -> String {
    let o = c.run(&[tool, "--version"]).unwrap();
    o.stdout_str()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The issue, for real: a bookworm machine whose qemu-utils came from
/// bookworm-backports (no longer in its sources) gets the whole host set,
/// and keeps qemu-img.
#[test]
#[ignore = "needs root and the Debian archive"]
fn make_deps_keeps_qemu_img_on_a_host_with_backported_qemu_utils() {
    assert!(
        exec::which("mmdebstrap").is_some(),
        "mmdebstrap not found: run `make deps`"
    );
    let _g = common::heavy();
    let tree = Tree(scratch("host-deps-tree"));
    let root = &tree.0.join("rootfs");

    // A fresh machine: qemu-utils from backports, then the backports
    // source gone.
    exec::cmd(
        "mmdebstrap",
        [
            "--variant=apt",
            "--include=ca-certificates,qemu-utils/bookworm-backports",
            "bookworm",
        ],
    )
    .arg(root)
    .args(BOOKWORM)
    .arg(BACKPORTS)
    .run()
    .unwrap();
    let sources = root.join("etc/apt/sources.list");
    let list = std::fs::read_to_string(&sources).unwrap();
    assert!(list.contains(BACKPORTS), "{list}");
    std::fs::write(&sources, list.replace(BACKPORTS, "")).unwrap();
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf")).unwrap();
    let c = Chroot::new(root).unwrap();
    c.deny_service_starts().unwrap();
    c.run(&["apt-get", "update", "-qq"]).unwrap();

    // The bug is there: qemu-system-x86 alone would take qemu-img away.
    assert!(version_line(&c, "qemu-img").contains("~bpo12"));
    let sim = c
        .run(&[
            "apt-get",
            "install",
            "-s",
            "--no-install-recommends",
            "qemu-system-x86",
        ])
        .unwrap()
        .stdout_str();
    assert!(sim.contains("Remv qemu-utils"), "{sim}");

    // `make deps`' script, inside the tree.
    let dest = root.join("tmp/host-deps");
    std::fs::create_dir_all(&dest).unwrap();
    for f in ["host-deps.sh", "host-tools.tsv"] {
        std::fs::copy(project("scripts").join(f), dest.join(f)).unwrap();
    }
    let script = "/tmp/host-deps/host-deps.sh";
    let o = c.command(["bash", script]).run_unchecked().unwrap();
    let said = format!("{}{}", o.stdout_str(), o.stderr_str());
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains("host-deps: all host tools and files are present"),
        "{said}"
    );

    // Both QEMU tools run, built from the same upload.
    let img = version_line(&c, "qemu-img");
    let system = version_line(&c, "qemu-system-x86_64");
    let debian = |l: &str| l.rsplit('(').next().unwrap_or_default().to_string();
    assert!(img.starts_with("qemu-img version"), "{img}");
    assert!(system.starts_with("QEMU emulator version"), "{system}");
    assert_eq!(debian(&img), debian(&system), "{img} / {system}");

    // Idempotent: a second run has nothing to do and says nothing.
    let o = c.command(["bash", script]).run_unchecked().unwrap();
    assert!(o.status.success());
    assert_eq!(format!("{}{}", o.stdout_str(), o.stderr_str()), "");
    let o = c
        .command(["bash", script, "--check"])
        .run_unchecked()
        .unwrap();
    assert!(o.status.success(), "{}", o.stderr_str());
}
