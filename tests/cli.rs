//! The command line as a user meets it, without root or network: listing,
//! planning, and bad input (exit code 2, a message naming file, line and
//! key, nothing written to the output directory).

mod common;
use common::*;
use std::path::Path;

#[test]
fn profiles_and_stages_list() {
    let o = stemforge(["profiles"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for p in ["debian-bookworm", "ubuntu-jammy", "ubuntu-noble"] {
        assert!(t.contains(p), "{t}");
    }
    assert!(t.contains("ubuntu-noble") && t.contains("(default)"), "{t}");
    let o = stemforge(["stages", "--format", "json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let controls: usize = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["controls"].as_array().unwrap().len())
        .sum();
    assert!(controls >= 40, "{controls} controls");
}

#[test]
fn controls_carry_structured_references_and_the_faq_is_covered() {
    let o = stemforge(["controls", "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let all: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let all = all.as_array().unwrap();
    assert!(all.len() >= 250, "{} controls", all.len());
    for c in all {
        assert!(
            !c["break"].as_array().unwrap().is_empty() || c["when"]["control"]["target"] == "live",
            "{}: no break recipe",
            c["id"]
        );
        assert!(c["when"].is_object(), "{}", c["id"]);
    }
    let from_boot = all.iter().find(|c| c["id"] == "audit-from-boot").unwrap();
    let stig = &from_boot["refs"]["stig"][0];
    assert_eq!(stig["version"], "UBTU-22-212015", "{stig}");
    assert!(stig["id"].as_str().unwrap().starts_with("V-"), "{stig}");
    assert!(stig["rule"].as_str().unwrap().starts_with("SV-"), "{stig}");
    assert!(
        stig["version"].as_str().unwrap().starts_with("UBTU-"),
        "{stig}"
    );
    // --benchmark selects by reference.
    let count = |b: &str| {
        let o = stemforge(["controls", "--format", "json", "--benchmark", b]);
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_array().unwrap().len()
    };
    let (stig, l1, l2, faq) = (
        count("stig"),
        count("cis-l1"),
        count("cis-l2"),
        count("faq"),
    );
    assert!(stig > 10 && stig < all.len(), "{stig}");
    assert!(l1 > 50 && l1 <= l2 && l2 < all.len(), "{l1} {l2}");
    assert!(faq > 100 && faq < all.len(), "{faq}");
    // Every FAQ item is covered by a control or has its reason.
    let o = stemforge(["coverage", "--source", "faq", "--format", "json"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["items"], 104);
    assert_eq!(v["gaps"], 0, "{t}");
    let rows = v["rows"].as_array().unwrap();
    let item = |id: &str| rows.iter().find(|r| r["id"] == id).unwrap();
    assert_eq!(item("4.8.14")["controls"][0], "sshd-no-root-login");
    assert_eq!(item("4.7.8")["status"], "justified");
    // A source with gaps says so in its exit code.
    let o = stemforge(["coverage", "--source", "stig-ubuntu2204"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("stig-ubuntu2204: 188 items"),
        "{}",
        text(&o)
    );
}

#[test]
fn ubuntu_dry_run_prints_the_full_plan_without_network() {
    // An unroutable mirror: a dry run must not touch it.
    let t0 = std::time::Instant::now();
    let o = stemforge([
        "build",
        "--profile",
        "ubuntu-noble",
        "--dry-run",
        "--mirror",
        "http://192.0.2.1/ubuntu",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(t0.elapsed().as_secs() < 10);
    let plan = String::from_utf8_lossy(&o.stdout);
    for want in [
        "ubuntu 24.04 (noble)",
        "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
        "http://192.0.2.1/ubuntu noble main universe",
        "http://192.0.2.1/ubuntu noble-updates main universe",
        "http://security.ubuntu.com/ubuntu noble-security main universe",
        "linux-image-virtual",
        "openssh-server",
        "/var/log/audit",
        "50-sshd",
        "out/ubuntu-noble.qcow2",
    ] {
        assert!(plan.contains(want), "plan lacks {want:?}:\n{plan}");
    }
    // The default profile is ubuntu-noble.
    let o = stemforge(["build", "--dry-run"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Build plan for ubuntu-noble"));
    let o = stemforge(["build", "--profile", "ubuntu-jammy", "--dry-run"]);
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(
        plan.contains("jammy-security main universe") && !plan.contains("systemd-resolved"),
        "{plan}"
    );
}

fn assert_config_error(o: &std::process::Output, file: &str, line: usize, key: &str) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    let needle = format!("{file}:{line}:");
    assert!(t.contains(&needle), "no {needle} in: {t}");
    assert!(t.contains(key), "no key {key} in: {t}");
}

#[test]
fn malformed_profile_exits_2_naming_file_line_key_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string("os-profiles/debian-bookworm.yml").unwrap();
    let cases = [
        (
            good.replace(
                "kernel: linux-image-cloud-amd64",
                "kernal: linux-image-cloud-amd64",
            ),
            "kernal",
        ),
        (
            good.replace("formats: [all]", "formats: [raw, vhdx]"),
            "formats",
        ),
        (
            good.replace(
                "size: 512MiB, options: [nodev, nosuid, noexec] }\n  mounts",
                "size: 512XB, options: [nodev, nosuid, noexec] }\n  mounts",
            ),
            "disk.partitions[6].size",
        ),
        (
            good.replace(
                "{ mount: /home, fs: ext4, size: 256MiB, options: [nodev, nosuid] }",
                "{ mount: /home, fs: ext4, size: 256MiB, options: [nodev, nosiud] }",
            ),
            "disk.partitions[5].options",
        ),
    ];
    for (i, (text_, key)) in cases.iter().enumerate() {
        assert_ne!(text_, &good, "case {i} changed nothing");
        let file = d.path().join(format!("bad{i}.yml"));
        std::fs::write(&file, text_).unwrap();
        let line = text_
            .lines()
            .position(|l| {
                l.contains(key.rsplit('.').next().unwrap().split('[').next().unwrap())
                    && !good.lines().any(|g| g == l)
            })
            .map(|n| n + 1)
            .unwrap();
        let out = d.path().join("out");
        let o = stemforge([
            "build",
            "--profile",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_config_error(&o, file.to_str().unwrap(), line, key);
        assert!(!out.exists(), "case {i}: the output directory was created");
    }
}

#[test]
fn malformed_stage_exits_2_naming_file_line_key_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let stages = d.path().join("stages");
    copy_dir(Path::new("stages"), &stages);
    let yml = stages.join("50-sshd/stage.yml");
    let good = std::fs::read_to_string(&yml).unwrap();
    let out = d.path().join("out");
    let run = |t: &str| {
        std::fs::write(&yml, t).unwrap();
        stemforge([
            "build",
            "--profile",
            "debian-bookworm",
            "--stages",
            stages.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    // An unknown key in a control.
    let bad = good.replacen(
        "    severity: high\n",
        "    severity: high\n    severty: high\n",
        1,
    );
    let line = bad.lines().position(|l| l.contains("severty")).unwrap() + 1;
    assert_config_error(&run(&bad), yml.to_str().unwrap(), line, "severty");
    // An unknown check kind.
    let bad = good.replacen("check: { sshd: { LogLevel", "check: { sshdd: { LogLevel", 1);
    let line = bad.lines().position(|l| l.contains("sshdd")).unwrap() + 1;
    let o = run(&bad);
    assert_config_error(&o, yml.to_str().unwrap(), line, "check");
    assert!(text(&o).contains("unknown variant `sshdd`"), "{}", text(&o));
    // A duplicate control id, reported at the second occurrence.
    let bad = good.replacen("- id: sshd-log-level", "- id: sshd-protocol-2", 1);
    let line = bad
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("id: sshd-protocol-2"))
        .nth(1)
        .unwrap()
        .0
        + 1;
    assert_config_error(&run(&bad), yml.to_str().unwrap(), line, "id");
    // A STIG rule the benchmark tables do not hold.
    let bad = good.replacen(
        "refs: { faq: [\"4.8.9\"]",
        "refs: { stig: [UBTU-22-000000], faq: [\"4.8.9\"]",
        1,
    );
    let line = bad
        .lines()
        .position(|l| l.contains("UBTU-22-000000"))
        .unwrap()
        + 1;
    let o = run(&bad);
    assert_config_error(&o, yml.to_str().unwrap(), line, "refs.stig");
    assert!(!out.exists(), "the output directory was created");
}

#[test]
fn scan_errors_and_exit_codes() {
    let o = stemforge(["scan", "--root", "/nonexistent/tree"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("/nonexistent/tree"));
    let o = stemforge(["scan", "--root", "/", "--control", "no-such-control"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("no-such-control"));
    // A tree that is not an image fails its controls: exit 1, JSON report.
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("etc")).unwrap();
    std::fs::write(
        d.path().join("etc/os-release"),
        "ID=debian\nVERSION_CODENAME=bookworm\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
    )
    .unwrap();
    let report = d.path().join("r.json");
    let o = stemforge([
        "scan",
        "--root",
        d.path().to_str().unwrap(),
        "--format",
        "json",
        "--output",
        report.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(v["context"]["distro"], "debian");
    assert!(
        v["summary"]["fail"].as_u64().unwrap() > 30,
        "{}",
        v["summary"]
    );
}

#[test]
fn verify_refuses_a_missing_image() {
    let o = stemforge(["verify", "/nonexistent/image.qcow2", "--out", "/tmp"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("/nonexistent/image.qcow2"),
        "{}",
        text(&o)
    );
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

#[test]
fn preflight_fails_in_seconds_naming_the_mirror_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let t0 = std::time::Instant::now();
    // Nothing listens on the discard port: the connection is refused at once.
    let o = stemforge([
        "build",
        "--profile",
        "debian-bookworm",
        "--mirror",
        "http://127.0.0.1:9/debian",
        "--no-verify",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(
        t0.elapsed().as_secs() < 30,
        "preflight took {:?}",
        t0.elapsed()
    );
    assert!(t.contains("preflight failed"), "{t}");
    assert!(
        t.contains("mirror http://127.0.0.1:9/debian does not answer"),
        "{t}"
    );
    assert!(!out.exists(), "the output directory was created");
}

#[test]
fn unknown_formats_and_bad_versions_exit_2_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    for (args, needle) in [
        (
            vec!["--format", "raw,vhdx"],
            "--format: unknown format `vhdx`",
        ),
        (vec!["--image-version", "1/2"], "--image-version"),
        (
            vec!["--bosh-agent", "/nonexistent/bosh-agent"],
            "--bosh-agent: /nonexistent/bosh-agent",
        ),
    ] {
        let mut argv = vec!["build", "--profile", "debian-bookworm", "--out"];
        argv.push(out.to_str().unwrap());
        argv.extend(args);
        let o = stemforge(&argv);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{t}");
        assert!(t.contains(needle), "no {needle:?} in: {t}");
        assert!(!out.exists(), "{argv:?} wrote {}", out.display());
    }
    // Every format and group plans; the plan names each output.
    let o = stemforge([
        "build",
        "--profile",
        "debian-bookworm",
        "--format",
        "all",
        "--image-version",
        "2.5",
        "--dry-run",
    ]);
    let plan = String::from_utf8_lossy(&o.stdout);
    for f in [
        "debian-bookworm.vmdk",
        "debian-bookworm.ova",
        "debian-bookworm.aws.json",
        "debian-bookworm.cdx.json",
        "bosh-stemcell-2.5-vsphere-esxi-debian-bookworm-go_agent.tgz",
        "debian-bookworm.SHA256SUMS",
    ] {
        assert!(plan.contains(f), "{f} not in the plan:\n{plan}");
    }
}

/// A tree built to trip a scanner: a FIFO where sshd's configuration
/// belongs, a 4 GiB sparse sysctl.conf, a symlink loop, a symlink that
/// climbs out of the root towards a file on the host, a socket, a deep
/// directory chain. The scan finishes in seconds within a small memory
/// bound, reads nothing outside the root, and calls what it could not
/// read an error, never a pass.
#[test]
fn a_hostile_tree_is_scanned_in_bounded_time_and_memory_without_false_passes() {
    use std::os::unix::fs::symlink;
    let d = tempfile::tempdir().unwrap();
    let r = d.path().join("root");
    for dir in ["etc/ssh", "etc/sysctl.d", "usr/lib", "var/log"] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
    }
    std::fs::write(
        r.join("etc/os-release"),
        "ID=debian\nVERSION_CODENAME=bookworm\nVERSION_ID=\"12\"\n",
    )
    .unwrap();
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\n").unwrap();
    let fifo = r.join("etc/ssh/sshd_config");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    std::fs::File::create(r.join("etc/sysctl.conf"))
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    symlink("login.defs.b", r.join("etc/login.defs")).unwrap();
    symlink("login.defs", r.join("etc/login.defs.b")).unwrap();
    // Outside the root, next to it: what an escaping link would reach.
    let secret = "outside-the-root-4c1f9e";
    std::fs::write(d.path().join("issue.net"), secret).unwrap();
    symlink("../../../../../../../../issue.net", r.join("etc/issue.net")).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(r.join("etc/hosts.allow")).unwrap();
    let mut deep = r.join("var/log");
    for i in 0..300 {
        deep = deep.join(format!("d{i}"));
    }
    std::fs::create_dir_all(&deep).unwrap();

    let report = d.path().join("r.json");
    let t0 = std::time::Instant::now();
    let log = std::fs::File::create(d.path().join("scan.log")).unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["scan", "--root"])
        .arg(&r)
        .args(["--format", "json", "--output"])
        .arg(&report)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // A scan that blocks on the FIFO never ends: stop it and fail.
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the scan hung on the hostile tree");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let secs = t0.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(d.path().join("scan.log")).unwrap();
    // SAFETY: getrusage writes into the struct it is given.
    let peak_kib = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru.ru_maxrss
    };
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(secs < 20.0, "{secs} s");
    assert!(peak_kib < 256 * 1024, "peak {peak_kib} KiB");
    let raw = std::fs::read_to_string(&report).unwrap();
    assert!(!raw.contains(secret), "read outside the root");
    let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let status = |id: &str| {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in the report"))["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Every sshd control looks at the FIFO: none may pass, and the ones
    // that read its settings say they could not.
    let sshd: Vec<(String, String)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["id"].as_str().unwrap().starts_with("sshd-"))
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(sshd.len() > 5, "{sshd:?}");
    for (id, st) in &sshd {
        assert_ne!(st, "pass", "{id}");
    }
    assert_eq!(status("sshd-no-root-login"), "error");
    let evidence = v.to_string();
    assert!(evidence.contains("is a FIFO"), "the reason is given");
    assert_eq!(
        status("banner-issue-net"),
        "fail",
        "the escape found nothing inside"
    );
    for r in v["results"].as_array().unwrap() {
        let ev = r["evidence"].to_string();
        if ev.contains("sysctl.conf") {
            assert_ne!(r["status"], "pass", "{r}");
        }
    }
}

#[test]
fn role_coverage_tables_map_every_row_to_controls_or_reasons() {
    let table = |source: &str| {
        let o = stemforge(["coverage", "--source", source, "--format", "json"]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{source}: {t}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["gaps"], 0, "{t}");
        v
    };
    let row = |v: &serde_json::Value, id: &str| {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no row {id}"))
            .clone()
    };
    let docker = table("docker");
    assert_eq!(docker["items"], 59);
    let privileged = row(&docker, "V-235802");
    assert_eq!(
        privileged["controls"][0],
        "docker-containers-not-privileged"
    );
    assert_eq!(row(&docker, "CIS 2.1")["controls"][0], "docker-icc-off");
    assert_eq!(row(&docker, "V-235861")["status"], "justified");
    let pg = table("postgres");
    assert_eq!(pg["items"], 109);
    assert!(
        row(&pg, "V-214099")["controls"]
            .as_array()
            .unwrap()
            .contains(&"pg-pgaudit-loaded".into())
    );
    let k8s = table("kubernetes");
    assert_eq!(k8s["items"], 91);
    assert_eq!(
        row(&k8s, "V-242391")["controls"][0],
        "k8s-kubelet-anonymous-off"
    );
    // The role's decision on SSH is written down with the controls it touches.
    let ssh = row(&k8s, "V-242393");
    assert_eq!(ssh["status"], "justified");
    assert!(
        ssh["reason"].as_str().unwrap().contains("Role decision"),
        "{ssh}"
    );
    assert!(
        ssh["reason"]
            .as_str()
            .unwrap()
            .contains("sshd-no-root-login"),
        "{ssh}"
    );
    let mke = table("mke");
    assert_eq!(mke["items"], 44);
    // Docker's controls carry the role documents' structured references.
    let o = stemforge(["controls", "--format", "json"]);
    let all: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = all
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "docker-no-new-privileges")
        .unwrap();
    let stig = c["refs"]["stig"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "V-235816")
        .expect("the Docker EE STIG rule");
    assert_eq!(stig["benchmark"], "docker-enterprise-2.x", "{stig}");
    assert_eq!(stig["version"], "DKER-EE-002110", "{stig}");
    assert_eq!(c["refs"]["cis"][0]["benchmark"], "docker-v1.6.0");
}

#[test]
fn roles_and_role_inputs_are_checked_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let build = |profile: &str, extra: &[&str]| {
        let mut args = vec![
            "build",
            "--dry-run",
            "--profile",
            profile,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = stemforge(&args);
        assert!(
            !out.exists(),
            "{profile} {extra:?}: the output directory was created"
        );
        o
    };
    // Two roles that exclude each other, named at their line.
    let both = d.path().join("both.yml");
    std::fs::write(
        &both,
        "extends: debian-bookworm\nname: both\nroles: [docker, k8s-node]\n",
    )
    .unwrap();
    let o = build(both.to_str().unwrap(), &[]);
    assert_config_error(&o, both.to_str().unwrap(), 3, "roles");
    assert!(text(&o).contains("exclude each other"), "{}", text(&o));
    // An unknown role.
    let typo = d.path().join("typo.yml");
    std::fs::write(
        &typo,
        "extends: debian-bookworm\nname: typo\nroles: [dockr]\n",
    )
    .unwrap();
    let o = build(typo.to_str().unwrap(), &[]);
    assert_config_error(&o, typo.to_str().unwrap(), 3, "roles");
    assert!(text(&o).contains("unknown role `dockr`"), "{}", text(&o));
    // A kubelet that is not an executable ELF file, or is missing.
    let script = d.path().join("kubelet");
    std::fs::write(&script, "#!/bin/sh\necho kubelet\n").unwrap();
    let flag = format!("kubelet={}", script.display());
    let o = build("debian-bookworm-k8s-node", &["--role-input", &flag]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("--role-input") && text(&o).contains("not an executable"),
        "{}",
        text(&o)
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = build("debian-bookworm-k8s-node", &["--role-input", &flag]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("not an x86-64 ELF executable"),
        "{}",
        text(&o)
    );
    let o = build(
        "debian-bookworm-k8s-node",
        &["--role-input", "kubelet=/nonexistent/kubelet"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("/nonexistent/kubelet"), "{}", text(&o));
    // A real x86-64 executable is accepted and shown in the plan.
    let o = build(
        "debian-bookworm-k8s-node",
        &["--role-input", "kubelet=/bin/true"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("input kubelet=/bin/true (k8s-node"),
        "{}",
        text(&o)
    );
    // An input of a role the image does not have.
    let o = build(
        "debian-bookworm-docker",
        &["--role-input", "kubelet=/bin/true"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("no input of this image's roles [docker]"),
        "{}",
        text(&o)
    );
    // Overrides that do not parse, named at their line.
    let json = d.path().join("daemon.json");
    std::fs::write(
        &json,
        "{\n  \"icc\": false,\n  \"log-driver\" \"journald\"\n}\n",
    )
    .unwrap();
    let o = build(
        "debian-bookworm-docker",
        &["--role-input", &format!("daemon.json={}", json.display())],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("{}:3:", json.display())),
        "{}",
        text(&o)
    );
    let conf = d.path().join("site.conf");
    std::fs::write(&conf, "work_mem = '64MB'\nlisten_addresses = '10.0.0.5\n").unwrap();
    let o = build(
        "debian-bookworm-postgres",
        &[
            "--role-input",
            &format!("postgresql.conf={}", conf.display()),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("{}:2:", conf.display())),
        "{}",
        text(&o)
    );
    // The same in a profile names the profile's key.
    let p = d.path().join("pg.yml");
    std::fs::write(
        &p,
        "extends: debian-bookworm-postgres\nname: pg\nrole_inputs:\n  postgresql.conf: site.conf\n",
    )
    .unwrap();
    let o = build(p.to_str().unwrap(), &[]);
    assert_config_error(&o, p.to_str().unwrap(), 4, "role_inputs.postgresql.conf");
}

#[test]
fn ubuntu_role_profiles_plan_their_roles_offline() {
    for (os, pg) in [("ubuntu-noble", "16"), ("ubuntu-jammy", "14")] {
        for role in ["docker", "postgres", "k8s-node"] {
            let profile = format!("{os}-{role}");
            let o = stemforge(["build", "--profile", &profile, "--dry-run"]);
            let plan = text(&o);
            assert_eq!(o.status.code(), Some(0), "{plan}");
            assert!(plan.contains(&format!("roles       {role}")), "{plan}");
            assert!(plan.contains(&format!("role-{role}")), "{profile}: {plan}");
            let pkgs = plan
                .lines()
                .find(|l| l.contains(&format!("-role-{role} installs in its layer:")))
                .unwrap_or_else(|| panic!("{profile}: {plan}"));
            match role {
                "postgres" => {
                    assert!(pkgs.contains(&format!("postgresql-{pg}-pgaudit")), "{pkgs}");
                    assert!(!pkgs.contains("postgresql-15-pgaudit"), "{pkgs}");
                }
                "docker" => {
                    assert!(
                        pkgs.contains("docker.io") && plan.contains("/var/lib/docker"),
                        "{plan}"
                    );
                }
                _ => {
                    assert!(
                        pkgs.contains("containerd") && plan.contains("/var/lib/containerd"),
                        "{plan}"
                    );
                }
            }
            // The role's packages are not in the shared bootstrap.
            let bootstrap = plan.split("roles ").next().unwrap();
            assert!(
                !bootstrap.contains("docker.io") && !bootstrap.contains("pgaudit"),
                "{profile}"
            );
        }
    }
}

#[test]
fn waivers_waive_failing_controls_until_they_expire_and_diff_gates_on_regressions() {
    let d = tempfile::tempdir().unwrap();
    // A tree whose sshd forwards X11: the control fails.
    let root = d.path().join("tree");
    std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
    std::fs::write(root.join("etc/ssh/sshd_config"), "X11Forwarding yes\n").unwrap();
    std::fs::write(
        root.join("etc/os-release"),
        "ID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\n",
    )
    .unwrap();
    let waivers = d.path().join("waivers.yml");
    let write_waiver = |expires: &str| {
        std::fs::write(
            &waivers,
            format!(
                "waivers:\n  - control: sshd-no-x11-forwarding\n    reason: break-glass access while the vendor agent is migrated\n    approver: J. Doe (ISSM)\n    expires: {expires}\n"
            ),
        )
        .unwrap();
    };
    let scan = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "scan",
            "--root",
            root.to_str().unwrap(),
            "--control",
            "sshd-no-x11-forwarding",
            "--format",
            "json",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        stemforge(&args)
    };
    let plain = d.path().join("plain.json");
    let o = scan(&[], &plain);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    // A current waiver: waived with its reason, not pass; exit 0.
    write_waiver("2999-12-31");
    let waived = d.path().join("waived.json");
    let o = scan(&["--waivers", waivers.to_str().unwrap()], &waived);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&waived).unwrap()).unwrap();
    let r = &v["results"][0];
    assert_eq!(r["status"], "waived", "{r}");
    assert_eq!(r["waiver"]["approver"], "J. Doe (ISSM)");
    assert!(
        r["evidence"][0].as_str().unwrap().contains("break-glass"),
        "{r}"
    );
    assert_eq!(v["summary"]["waived"], 1);
    // Every report shows it: JUnit skipped with the reason, the CKL's comments.
    let reports = d.path().join("reports");
    let o = stemforge([
        "scan",
        "--root",
        root.to_str().unwrap(),
        "--waivers",
        waivers.to_str().unwrap(),
        "--report-dir",
        reports.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "other controls fail: {}",
        text(&o)
    );
    let junit = std::fs::read_to_string(reports.join("scan.junit.xml")).unwrap();
    assert!(
        junit.contains("<skipped message=\"waived until 2999-12-31 by J. Doe (ISSM)"),
        "{junit}"
    );
    let ckl = std::fs::read_to_string(reports.join("scan.ckl")).unwrap();
    assert!(
        ckl.contains("Current waiver for sshd-no-x11-forwarding"),
        "no waiver in the CKL"
    );
    // An expired one fails, and says so.
    write_waiver("2020-01-31");
    let expired = d.path().join("expired.json");
    let o = scan(&["--waivers", waivers.to_str().unwrap()], &expired);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&expired).unwrap()).unwrap();
    assert_eq!(v["results"][0]["status"], "fail");
    assert_eq!(v["results"][0]["waiver"]["expired"], true);
    assert!(
        v["results"][0]["evidence"][0]
            .as_str()
            .unwrap()
            .contains("EXPIRED")
    );
    // diff: the lapsed waiver is a regression (exit 1); the reverse is a fix.
    let o = stemforge(["diff", waived.to_str().unwrap(), expired.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("regressions (1)"), "{}", text(&o));
    let o = stemforge([
        "diff",
        plain.to_str().unwrap(),
        plain.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["regressions"], 0);
    let o = stemforge([
        "diff",
        waived.to_str().unwrap(),
        expired.to_str().unwrap(),
        "--format",
        "junit",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("<failure"),
        "{}",
        text(&o)
    );
    // Bad input: an unknown control in a waiver file, a report that is not one.
    std::fs::write(
        &waivers,
        "waivers:\n  - control: sshd-no-x11-forwarding\n    reason: r\n    approver: a\n    expires: 2999-01-01\n  - control: sshd-no-such-thing\n    reason: r\n    approver: a\n    expires: 2999-01-01\n",
    )
    .unwrap();
    let o = scan(
        &["--waivers", waivers.to_str().unwrap()],
        &d.path().join("x.json"),
    );
    assert_config_error(&o, waivers.to_str().unwrap(), 6, "waivers[1].control");
    assert!(text(&o).contains("sshd-no-such-thing"), "{}", text(&o));
    let bad = d.path().join("bad.json");
    std::fs::write(&bad, "{\n  \"results\": 3\n}\n").unwrap();
    let o = stemforge(["diff", bad.to_str().unwrap(), plain.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("bad.json"), "{}", text(&o));
    // Several formats without a directory is refused before any work.
    let o = stemforge([
        "scan",
        "--root",
        root.to_str().unwrap(),
        "--format",
        "json",
        "--format",
        "ckl",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
