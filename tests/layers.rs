//! The layer cache, the verdict cache and the matrix, as root against the
//! Debian archive; the cache's export and import as root alone.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

fn build(args: &[&str]) -> (Output, f64) {
    let t0 = Instant::now();
    let o = Command::new(bin())
        .args(args)
        .env("SOURCE_DATE_EPOCH", SHARED_EPOCH.to_string())
        .output()
        .expect("stemforge runs");
    (o, t0.elapsed().as_secs_f64())
}

fn steps(out: &Path, name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join(format!("{name}.steps.json"))).unwrap())
        .unwrap()
}

/// The note of step `name` in a steps.json.
fn note(steps: &Value, name: &str) -> String {
    steps["steps"]
        .as_array()
        .or_else(|| steps.as_array())
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .map(|s| s["note"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn sha_of(out: &Path, file: &str) -> String {
    let sums = std::fs::read_to_string(out.join("debian-bookworm.SHA256SUMS")).unwrap();
    sums.lines()
        .find(|l| l.ends_with(file))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn an_edit_reruns_only_the_layers_from_the_edited_stage_on() {
    require_root();
    let _g = heavy();
    let d = scratch("layers-edit");
    let stages = d.join("stages");
    let st = Command::new("cp")
        .args(["-r", concat!(env!("CARGO_MANIFEST_DIR"), "/stages")])
        .arg(&stages)
        .status()
        .unwrap();
    assert!(st.success());
    let out = d.join("out");
    let args = [
        "build",
        "--profile",
        "debian-bookworm",
        "--stages",
        stages.to_str().unwrap(),
        "--format",
        "raw",
        "--verify",
        "never",
        "--out",
        out.to_str().unwrap(),
    ];
    let (o, first) = build(&args);
    assert!(o.status.success(), "{}", text(&o));
    let raw_before = sha_of(&out, "debian-bookworm.raw");

    // Nothing changed: every layer, the disk and the formats are found.
    let (o, noop) = build(&args);
    assert!(o.status.success(), "{}", text(&o));
    let s = steps(&out, "debian-bookworm");
    assert!(
        note(&s, "stages").contains("0 made, 14 from the cache"),
        "{s}"
    );
    assert!(note(&s, "disk").contains("cache hit"), "{s}");
    assert!(note(&s, "formats").contains("cache hit"), "{s}");
    assert_eq!(sha_of(&out, "debian-bookworm.raw"), raw_before);
    let sums = Command::new("sha256sum")
        .args(["-c", "debian-bookworm.SHA256SUMS"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(sums.status.success(), "{}", text(&sums));

    // One file of the last stage edited: its layer and the image layer
    // are made again, the 12 beneath are found; the disk is new.
    let umask = stages.join("90-system/files/umask.sh");
    let mut body = std::fs::read_to_string(&umask).unwrap();
    body.push_str("# edited\n");
    std::fs::write(&umask, body).unwrap();
    let (o, edit) = build(&args);
    assert!(o.status.success(), "{}", text(&o));
    let s = steps(&out, "debian-bookworm");
    assert!(
        note(&s, "stages").contains("2 made, 12 from the cache"),
        "{s}"
    );
    assert!(!note(&s, "disk").contains("cache hit"), "{s}");
    assert_ne!(sha_of(&out, "debian-bookworm.raw"), raw_before);
    let scan = scan_image(&out.join("debian-bookworm.raw"));
    assert_eq!(scan["summary"]["fail"], 0, "{scan}");
    // A package added to a stage's list: that stage's layer and the ones
    // above it are made again (the package installs in it), none beneath.
    let accounts = stages.join("80-accounts/stage.yml");
    let yml = std::fs::read_to_string(&accounts).unwrap();
    assert!(yml.contains("install: [cron, libpam-pwquality]"), "{yml}");
    std::fs::write(
        &accounts,
        yml.replace(
            "install: [cron, libpam-pwquality]",
            "install: [cron, libpam-pwquality, acl]",
        ),
    )
    .unwrap();
    let (o, packages) = build(&args);
    assert!(o.status.success(), "{}", text(&o));
    let s = steps(&out, "debian-bookworm");
    assert!(
        note(&s, "stages").contains("3 made, 11 from the cache"),
        "{s}"
    );
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("debian-bookworm.manifest.json")).unwrap(),
    )
    .unwrap();
    assert!(
        m["inputs"]["packages"]["acl"].is_string(),
        "acl installed: {m}"
    );
    eprintln!(
        "layer cache: first build {first:.1} s, no-op rebuild {noop:.1} s, edit of the last stage {edit:.1} s, a package added to 80-accounts {packages:.1} s"
    );

    // The cache lists what it holds.
    let o = stemforge(["cache", "ls", "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let entries: Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers: Vec<&Value> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "layers")
        .collect();
    assert!(
        layers.iter().any(|e| e["about"] == "stage 90-system"),
        "{entries}"
    );
    assert!(layers.iter().any(|e| e["about"] == "image"), "{entries}");
    let o = stemforge(["cache", "du"]);
    assert!(text(&o).contains("layers"), "{}", text(&o));
    done_with(&d);
}

fn scan_image(raw: &Path) -> Value {
    let o = stemforge(["scan", "--image", raw.to_str().unwrap(), "--format", "json"]);
    assert!(matches!(o.status.code(), Some(0) | Some(1)), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn the_matrix_builds_two_profiles_by_two_formats_over_one_bootstrap() {
    require_root();
    let _g = heavy();
    let d = scratch("matrix");
    let junit = d.join("junit.xml");
    let t0 = Instant::now();
    let o = Command::new(bin())
        .args([
            "matrix",
            "--profiles",
            "debian-bookworm",
            "--roles",
            "base,postgres",
            "--formats",
            "raw,sbom",
            "--jobs",
            "2",
            "--verify",
            "never",
            "--junit",
            junit.to_str().unwrap(),
            "--out",
            d.to_str().unwrap(),
        ])
        .env("SOURCE_DATE_EPOCH", SHARED_EPOCH.to_string())
        .output()
        .unwrap();
    let t = text(&o);
    eprintln!("matrix: {:.0} s\n{t}", t0.elapsed().as_secs_f64());
    assert!(o.status.success(), "{t}");
    assert!(t.contains("4 of 4 cells ok"), "{t}");
    let mut keys = std::collections::BTreeSet::new();
    for (name, format) in [
        ("debian-bookworm", "raw"),
        ("debian-bookworm", "sbom"),
        ("debian-bookworm-postgres", "raw"),
        ("debian-bookworm-postgres", "sbom"),
    ] {
        let cell = d.join(name).join(format);
        assert!(t.contains(&format!("{name}  ")), "{t}");
        let m: Value = serde_json::from_str(
            &std::fs::read_to_string(cell.join(format!("{name}.manifest.json"))).unwrap(),
        )
        .unwrap();
        keys.insert(m["inputs"]["bootstrap_key"].as_str().unwrap().to_string());
    }
    assert_eq!(keys.len(), 1, "one bootstrap for every cell: {keys:?}");
    validate::check_junit(&junit).unwrap();
    let x = std::fs::read_to_string(&junit).unwrap();
    assert!(x.contains("debian-bookworm-postgres/raw"), "{x}");
    assert!(x.contains("sshd-no-root-login"), "{x}");
    done_with(&d);
}

#[test]
#[ignore = "needs root, the Debian archive and QEMU (make test runs it as root)"]
fn a_verdict_is_reused_for_the_same_disk_and_said_so() {
    require_root();
    let _g = heavy();
    let d = scratch("verdicts");
    let out = d.join("out");
    let args = [
        "build",
        "--profile",
        "debian-bookworm",
        "--format",
        "qcow2",
        "--out",
        out.to_str().unwrap(),
        "--verify",
        "always",
    ];
    let (o, booted) = build(&args);
    assert!(o.status.success(), "{}", text(&o));
    let mut again = args.to_vec();
    *again.last_mut().unwrap() = "auto";
    let (o, reused) = build(&again);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("verdict reused"), "{t}");
    assert!(!t.contains("$ qemu-system-x86_64"), "no boot: {t}");
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("debian-bookworm.verify.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(v["passed"], true);
    assert!(
        v["reused"]["disk_sha256"].as_str().unwrap().len() == 64,
        "{v}"
    );
    assert!(out.join("debian-bookworm.console.log").exists());
    eprintln!("verify: booted build {booted:.0} s, reused {reused:.0} s");
    done_with(&d);
}

#[test]
#[ignore = "needs root (device nodes, trusted extended attributes)"]
fn an_exported_cache_comes_back_whole_and_a_damaged_archive_is_refused() {
    require_root();
    let d = scratch("cache-export");
    let (a, b, x) = (d.join("a"), d.join("b"), d.join("export"));
    // A layer as overlayfs leaves one: a whiteout, an opaque directory,
    // a setuid file, a file capability.
    let entry = a.join("layers/0123456789abcdef0123456789abcdef");
    let upper = entry.join("upper");
    std::fs::create_dir_all(upper.join("etc/opaque")).unwrap();
    std::fs::write(upper.join("etc/setuid"), "x").unwrap();
    let chmod = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
    };
    chmod(&upper.join("etc/setuid"), 0o4755);
    let run = |argv: &[&str]| {
        let o = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
        assert!(o.status.success(), "{argv:?}: {}", text(&o));
    };
    let p = |q: &Path| q.to_str().unwrap().to_string();
    run(&["mknod", &p(&upper.join("etc/gone")), "c", "0", "0"]);
    rustix::fs::setxattr(
        upper.join("etc/opaque"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    std::fs::write(
        entry.join("layer.json"),
        r#"{"format":1,"kind":"stage","name":"50-sshd","parent":"p","initramfs_dirty":false,"seconds":1.0}"#,
    )
    .unwrap();
    std::fs::write(entry.join(".complete"), "0123456789abcdef0123456789abcdef").unwrap();

    let o = stemforge(["cache", "export", &p(&x), "--cache-dir", &p(&a)]);
    assert!(o.status.success(), "{}", text(&o));
    let o = stemforge(["cache", "import", &p(&x), "--cache-dir", &p(&b)]);
    assert!(o.status.success(), "{}", text(&o));
    let got = b.join("layers/0123456789abcdef0123456789abcdef/upper");
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let gone = got.join("etc/gone").symlink_metadata().unwrap();
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
    assert_eq!(
        got.join("etc/setuid").metadata().unwrap().mode() & 0o7777,
        0o4755
    );
    let mut attr = [0u8; 8];
    let n =
        rustix::fs::getxattr(got.join("etc/opaque"), "trusted.overlay.opaque", &mut attr).unwrap();
    assert_eq!(&attr[..n], b"y");
    let ls = stemforge(["cache", "ls", "--cache-dir", &p(&b)]);
    assert!(text(&ls).contains("stage 50-sshd"), "{}", text(&ls));

    // One byte of the archive changed: the import refuses the entry.
    let tar = x.join("layers/0123456789abcdef0123456789abcdef.tar");
    let mut bytes = std::fs::read(&tar).unwrap();
    bytes[700] ^= 1;
    std::fs::write(&tar, bytes).unwrap();
    let c = d.join("c");
    let o = stemforge(["cache", "import", &p(&x), "--cache-dir", &p(&c)]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("rejected layers/0123456789abcdef"),
        "{}",
        text(&o)
    );
    assert!(!c.join("layers/0123456789abcdef0123456789abcdef").exists());
    done_with(&d);
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn a_build_killed_while_making_a_layer_leaves_the_cache_whole() {
    use std::io::BufRead;
    require_root();
    let _g = heavy();
    let d = scratch("layers-kill");
    let out = d.join("out");
    // An epoch of its own: every layer is new, so they are made.
    let epoch = (SHARED_EPOCH + 3 * 86_400).to_string();
    let args = [
        "-v",
        "build",
        "--profile",
        "debian-bookworm",
        "--format",
        "raw",
        "--verify",
        "never",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut child = Command::new(bin())
        .args(args)
        .env("SOURCE_DATE_EPOCH", &epoch)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(err).lines() {
        let line = line.unwrap();
        let at = line.contains("-- stage 50-sshd");
        seen.push(line);
        if at {
            std::thread::sleep(std::time::Duration::from_millis(300));
            // SAFETY: our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            break;
        }
    }
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l.contains("-- stage 50-sshd")),
        "{}",
        seen.join("\n")
    );
    let o = Command::new(bin())
        .args(&args[1..])
        .env("SOURCE_DATE_EPOCH", &epoch)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let s = steps(&out, "debian-bookworm");
    // The 8 stages beneath 50-sshd were made and kept whole before the
    // kill (and perhaps more after it); the layer being made was not.
    let n = note(&s, "stages");
    let counts: Vec<usize> = n
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (made, found) = (counts[1], counts[2]);
    assert_eq!(made + found, 14, "{n}");
    assert!(found >= 8 && made >= 1, "{n}");
    let layers = std::path::PathBuf::from(
        std::env::var("STEMFORGE_CACHE_DIR").unwrap_or_else(|_| "/var/cache/stemforge".into()),
    )
    .join("layers");
    let tmps: Vec<String> = std::fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(tmps.is_empty(), "half-made layers left: {tmps:?}");
    let scan = scan_image(&out.join("debian-bookworm.raw"));
    assert_eq!(scan["summary"]["fail"], 0, "{scan}");
    done_with(&d);
}
