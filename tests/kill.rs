//! Builds that are killed, interrupted, doubled or starved of disk: each
//! leaves no mount, no process and no finished-looking output, and the
//! next build succeeds from a valid cache.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A build running in the background, its stderr collected line by line
/// (with `-v`: every command line, `-- activity` and `==> step`).
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

fn start(args: &[&str], envs: &[(&str, &str)]) -> Running {
    let mut c = Command::new(bin());
    c.arg("-v")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("stemforge starts");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    Running { child, lines }
}

impl Running {
    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Wait until `pred` holds (polled every 10 ms, at most 15 minutes).
    fn wait_for(&mut self, what: &str, pred: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            if pred(&self.lines.lock().unwrap()) {
                return;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("the build ended ({st}) before {what}:\n{}", self.text());
            }
            assert!(Instant::now() < deadline, "not {what} in 15 minutes");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn wait(&mut self) -> ExitStatus {
        let st = self.child.wait().unwrap();
        // The reader thread drains what is left.
        std::thread::sleep(Duration::from_millis(100));
        st
    }
}

/// When to kill: the `nth` (from 1) stderr line containing `needle`, or a
/// file in the output directory whose name has `needle`, then `delay`.
#[derive(Clone, Copy)]
enum When {
    Line(&'static str, usize),
    File(&'static str),
}

struct Point {
    name: &'static str,
    when: When,
    delay_ms: u64,
    verify: bool,
}

const fn p(name: &'static str, when: When, delay_ms: u64) -> Point {
    Point {
        name,
        when,
        delay_ms,
        verify: false,
    }
}

fn build_args<'a>(out: &'a str, verify: bool, formats: &'a str) -> Vec<&'a str> {
    let mut a = vec![
        "build",
        "--profile",
        "debian-bookworm",
        "--format",
        formats,
        "--image-version",
        "1.0",
        "--out",
        out,
        // Every step runs (nothing is found in the layer cache), so every
        // kill point is reached.
        "--no-layer-cache",
    ];
    if !verify {
        a.push("--no-verify");
    }
    a
}

fn triggered(when: When, lines: &[String], out: &Path) -> bool {
    match when {
        When::Line(needle, nth) => lines.iter().filter(|l| l.contains(needle)).count() >= nth,
        When::File(needle) => std::fs::read_dir(out).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains(needle))
        }),
    }
}

/// Processes that belong to a build under `dirs`: chrooted below one, or
/// naming one on their command line (QEMU, qemu-img, mkfs, cp, mmdebstrap).
fn leftover_processes(dirs: &[&Path]) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap_or_default();
        if dirs
            .iter()
            .any(|d| root.starts_with(d) || cmdline.contains(&*d.to_string_lossy()))
        {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// The host's mount table has nothing of a build: nothing under `dirs`,
/// and none of the chroot's own tmpfs mounts.
fn leftover_mounts(dirs: &[&Path]) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut found: Vec<String> = table
        .lines()
        .filter(|l| l.contains("stemforge-shm") || l.contains("stemforge-run"))
        .map(str::to_string)
        .collect();
    for d in dirs {
        found.extend(
            stemforge::fsutil::mounts_under(d)
                .unwrap()
                .into_iter()
                .map(|p| p.display().to_string()),
        );
    }
    found
}

/// After a kill: no mount, no process (given a few seconds to die), and
/// every file in `out` under a final name is whole, the set unsealed.
/// Processes are looked for by `out` (the shared cache may serve other
/// builds on the machine); mounts by both.
fn assert_nothing_half_done(what: &str, out: &Path, cache: &Path) {
    let dirs = [out, cache];
    let own = [out];
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = leftover_processes(&own);
        if procs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "{what}: processes left:\n{}",
            procs.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mounts = leftover_mounts(&dirs);
    assert!(mounts.is_empty(), "{what}: mounts left: {mounts:?}");
    for e in std::fs::read_dir(out).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with('.') || name.ends_with(".log") || name.ends_with("steps.json") {
            continue;
        }
        assert!(
            !name.ends_with("SHA256SUMS") && !name.ends_with(".manifest.json"),
            "{what}: {name} seals a set that a killed build did not finish"
        );
        let ok = |c: &mut Command| c.output().unwrap().status.success();
        let whole = match path.extension().and_then(|x| x.to_str()).unwrap_or("") {
            "tgz" => ok(Command::new("gzip").arg("-t").arg(&path)),
            "qcow2" => ok(Command::new("qemu-img").args(["check", "-q"]).arg(&path)),
            "vmdk" => ok(Command::new("qemu-img")
                .args(["check", "-q", "-f", "vmdk"])
                .arg(&path)),
            "ova" => ok(Command::new("tar").arg("-tf").arg(&path)),
            "json" => serde_json::from_slice::<Value>(&std::fs::read(&path).unwrap()).is_ok(),
            "raw" => std::fs::metadata(&path).unwrap().len() == 5 << 30,
            _ => std::fs::metadata(&path).unwrap().len() > 0,
        };
        assert!(
            whole,
            "{what}: {name} is under its final name but not whole"
        );
    }
}

fn default_cache() -> PathBuf {
    PathBuf::from("/var/cache/stemforge")
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn sigkill_at_every_phase_leaves_nothing_behind_and_the_next_build_succeeds() {
    require_root();
    let _g = heavy();
    let d = scratch("kill-campaign");
    let out = d.join("out");
    let outs = out.to_str().unwrap().to_string();
    let mut survived = 0;

    // The bootstrap, in a cache of its own: killed twice while mmdebstrap
    // works, then made whole by the next build.
    let cold = d.join("cache");
    let colds = cold.to_str().unwrap().to_string();
    for (n, delay) in [(1, 4_000u64), (2, 20_000)] {
        let mut args = build_args(&outs, false, "raw");
        args.extend(["--cache-dir", &colds]);
        let mut b = start(&args, &[]);
        b.wait_for("mmdebstrap starts", |l| {
            l.iter()
                .any(|x| x.contains("mmdebstrap") && x.starts_with("$ "))
        });
        std::thread::sleep(Duration::from_millis(delay));
        b.signal(libc::SIGKILL);
        b.wait();
        assert_nothing_half_done(&format!("bootstrap kill {n}"), &out, &cold);
        let complete: Vec<_> = walkdir_markers(&cold.join("bootstrap"));
        assert!(
            complete.is_empty(),
            "a killed bootstrap left a complete entry: {complete:?}"
        );
        survived += 1;
    }
    let mut args = build_args(&outs, false, "raw");
    args.extend(["--cache-dir", &colds]);
    let mut b = start(&args, &[]);
    let st = b.wait();
    assert!(
        st.success(),
        "the build after the bootstrap kills:\n{}",
        b.text()
    );
    assert!(b.text().contains("bootstrap: done in"), "{}", b.text());
    assert!(b.text().contains("(cache miss)"), "{}", b.text());
    assert_eq!(walkdir_markers(&cold.join("bootstrap")).len(), 1);
    done_with(&cold);

    // Every later phase, over the shared cache.
    use When::*;
    let points = [
        p("stages: the first stage", Line("-- stage 00-base", 1), 50),
        p(
            "stages: first chroot",
            Line("$ unshare --mount --pid", 1),
            200,
        ),
        p(
            "stages: fifth chroot",
            Line("$ unshare --mount --pid", 5),
            500,
        ),
        p(
            "stages: tenth chroot",
            Line("$ unshare --mount --pid", 10),
            300,
        ),
        p("stages: apt-get clean", Line("-- apt-get clean", 1), 100),
        p("disk: boot loaders", Line("-- boot loaders", 1), 200),
        p("disk: first mkfs.ext4", Line("$ mkfs.ext4", 1), 800),
        p("disk: first debugfs", Line("$ debugfs", 1), 0),
        p("disk: third mkfs.ext4", Line("$ mkfs.ext4", 3), 100),
        p("disk: the ESP", Line("-- vfat /boot/efi", 1), 50),
        p(
            "disk: the GPT disk",
            Line("-- writing the GPT disk", 1),
            300,
        ),
        p("scan", Line("==> scan", 1), 200),
        p("formats: start", Line("==> formats", 1), 0),
        p("formats: qcow2", Line("-O qcow2", 1), 3_000),
        p("formats: vmdk", Line("-O vmdk", 1), 4_000),
        p("formats: ova", File(".ova.partial"), 100),
        p("formats: a stemcell", File(".bosh-stemcell-"), 1_000),
        p("formats: a later stemcell", File("-openstack-kvm-"), 500),
        // The manifest step takes well under a second (the outputs'
        // hashes are known): the kill follows the step's first line.
        p("manifest", Line("==> manifest", 1), 0),
        Point {
            verify: true,
            ..p(
                "verify: QEMU starting",
                Line("$ qemu-system-x86_64", 1),
                2_000,
            )
        },
        Point {
            verify: true,
            ..p(
                "verify: the guest running",
                Line("$ qemu-system-x86_64", 1),
                40_000,
            )
        },
    ];
    let cache = default_cache();
    for pt in &points {
        let formats = if pt.verify { "qcow2" } else { "all" };
        let mut b = start(&build_args(&outs, pt.verify, formats), &[]);
        b.wait_for(pt.name, |l| triggered(pt.when, l, &out));
        std::thread::sleep(Duration::from_millis(pt.delay_ms));
        b.signal(libc::SIGKILL);
        if b.wait().success() {
            // The step outran the kill and the build finished: its set
            // is sealed, and must check.
            let sums = Command::new("sha256sum")
                .args(["-c", "debian-bookworm.SHA256SUMS"])
                .current_dir(&out)
                .output()
                .unwrap();
            assert!(sums.status.success(), "{}: {}", pt.name, text(&sums));
            eprintln!("{}: the build finished before the kill landed", pt.name);
            continue;
        }
        assert_nothing_half_done(pt.name, &out, &cache);
        survived += 1;
    }
    eprintln!("kill points survived: {survived}");
    assert!(survived >= 20);

    // The next build clears what the last one left and succeeds from the
    // cached bootstrap.
    let mut b = start(&build_args(&outs, false, "all"), &[]);
    let st = b.wait();
    let t = b.text();
    assert!(st.success(), "the build after the kills:\n{t}");
    assert!(t.contains("(cache hit)"), "{t}");
    let sums = Command::new("sha256sum")
        .args(["-c", "debian-bookworm.SHA256SUMS"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(sums.status.success(), "{}", text(&sums));
    let partial: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(partial.is_empty(), "{partial:?}");
    done_with(&d);
}

/// The completion markers of a cache kind's entries.
fn walkdir_markers(kind: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(kind)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(".complete"))
        .filter(|m| m.exists())
        .collect()
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn ctrl_c_and_sigterm_stop_a_build_within_five_seconds_and_clean_up() {
    require_root();
    let _g = heavy();
    let d = scratch("interrupt");
    let out = d.join("out");
    let outs = out.to_str().unwrap().to_string();
    let cases: [(i32, &str, When, u64, bool, &str); 4] = [
        (
            libc::SIGINT,
            "the stages step",
            When::Line("$ unshare --mount --pid", 3),
            300,
            false,
            "all",
        ),
        (
            libc::SIGTERM,
            "the formats step",
            When::Line("-O vmdk", 1),
            2_000,
            false,
            "all",
        ),
        (
            libc::SIGTERM,
            "the formats step",
            When::File(".bosh-stemcell-"),
            300,
            false,
            "all",
        ),
        (
            libc::SIGINT,
            "the verify step",
            When::Line("$ qemu-system-x86_64", 1),
            5_000,
            true,
            "qcow2",
        ),
    ];
    for (sig, phase, when, delay, verify, formats) in cases {
        let what = format!("signal {sig} in {phase}");
        let mut b = start(&build_args(&outs, verify, formats), &[]);
        b.wait_for(&what, |l| triggered(when, l, &out));
        std::thread::sleep(Duration::from_millis(delay));
        let t0 = Instant::now();
        b.signal(sig);
        let st = b.wait();
        let took = t0.elapsed();
        let t = b.text();
        assert!(took <= Duration::from_secs(5), "{what}: took {took:?}\n{t}");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            None,
            "{what}: died of the signal instead of stopping:\n{t}"
        );
        assert_eq!(st.code(), Some(128 + sig), "{what}:\n{t}");
        let name = if sig == libc::SIGINT {
            "SIGINT (Ctrl-C)"
        } else {
            "SIGTERM"
        };
        assert!(
            t.contains(&format!("interrupted by {name} during {phase}")),
            "{what}:\n{t}"
        );
        assert_nothing_half_done(&what, &out, &default_cache());
        assert!(
            !out.join(".work/debian-bookworm").exists(),
            "{what}: the work tree is left"
        );
        let partial: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial"))
            .collect();
        assert!(partial.is_empty(), "{what}: {partial:?}");
        eprintln!("{what}: stopped in {took:?}");
    }
    done_with(&d);
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn one_build_per_out_dir_and_two_profiles_share_the_cache_at_once() {
    require_root();
    let _g = heavy();
    let d = scratch("concurrent");
    let (x, y) = (d.join("x"), d.join("y"));
    let (xs, ys) = (x.to_str().unwrap(), y.to_str().unwrap());
    let mut a = start(&build_args(xs, false, "raw"), &[]);
    a.wait_for("the first build's stages", |l| {
        l.iter().any(|x| x.starts_with("==> stages"))
    });
    // The same --out: refused at once, the first build untouched.
    let t0 = Instant::now();
    let refused = Command::new(bin())
        .args(build_args(xs, false, "raw"))
        .output()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        text(&refused).contains("is in use by another build (pid"),
        "{}",
        text(&refused)
    );
    // Another profile into another directory, over the same cache, at
    // the same time.
    let mut c = start(
        &[
            "build",
            "--profile",
            "debian-bookworm-postgres",
            "--format",
            "raw",
            "--no-verify",
            "--out",
            ys,
        ],
        &[],
    );
    let (sa, sc) = (a.wait(), c.wait());
    assert!(sa.success(), "{}", a.text());
    assert!(sc.success(), "{}", c.text());
    assert!(x.join("debian-bookworm.raw").exists());
    assert!(y.join("debian-bookworm-postgres.raw").exists());
    assert!(leftover_mounts(&[&x, &y]).is_empty());
    done_with(&d);
}

#[test]
#[ignore = "needs root and the Debian archive (make test runs it as root)"]
fn a_full_disk_is_a_clear_error_that_leaves_no_output_and_the_cache_intact() {
    require_root();
    let _g = heavy();
    let d = scratch("disk-full");
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // A 6.5 GiB tmpfs as --out, in a mount namespace of its own (it goes
    // when the shell does); after the build, the shell lists what is left.
    let script = r#"set -u
mount -t tmpfs -o size=6656m stemforge-test-full "$1"
"$2" -v build --profile debian-bookworm --format all --no-verify --image-version 1.0 --out "$1"
rc=$?
echo "left:"
find "$1" -maxdepth 1 -mindepth 1 -printf '%f\n' | sort
exit $rc
"#;
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&out)
        .arg(bin())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    // When the disk step starts, fill the tmpfs to within 100 MiB.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("==> disk"))
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended early: {:?}",
            lines.lock().unwrap()
        );
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let shell = child.id();
    let builder = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s[s.rfind(')')? + 1..]
                        .split_whitespace()
                        .nth(1)?
                        .parse()
                        .ok()
                })
                == Some(shell)
        })
        .expect("the build runs under the shell");
    let inside =
        PathBuf::from(format!("/proc/{builder}/root")).join(out.strip_prefix("/").unwrap());
    // Allocate 64 MiB at a time until the tmpfs is full, then give back
    // the last 100 MiB.
    let ballast = std::fs::File::create(inside.join("ballast")).unwrap();
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&ballast);
    let mut size: i64 = 0;
    // SAFETY: fallocate on a file we own.
    while unsafe { libc::fallocate(fd, 0, size, 64 << 20) } == 0 {
        size += 64 << 20;
    }
    assert!(size > 1 << 30, "the tmpfs took only {size} bytes");
    ballast.set_len((size - (100 << 20)) as u64).unwrap();
    drop(ballast);
    let o = child.wait_with_output().unwrap();
    reader.join().unwrap();
    let err = lines.lock().unwrap().join("\n");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}\n{stdout}");
    assert!(err.contains("the disk step"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("error: disk full: "), "{err}");
    assert!(err.contains("the disk is full"), "{err}");
    assert!(
        err.contains(out.to_str().unwrap()),
        "the error names the path: {err}"
    );
    let left: Vec<&str> = stdout
        .split("left:\n")
        .nth(1)
        .unwrap_or("")
        .lines()
        .filter(|n| !n.is_empty())
        .collect();
    for n in &left {
        assert!(
            [
                "ballast",
                ".stemforge.lock",
                ".work",
                "debian-bookworm.build.log",
                "debian-bookworm.steps.json"
            ]
            .contains(n)
                || n.ends_with("offline-scan.json"),
            "left in the full --out: {n} ({left:?})"
        );
    }
    // The cache entry the build used is whole.
    let markers = walkdir_markers(&default_cache().join("bootstrap"));
    assert!(!markers.is_empty());
    for m in markers {
        let key = std::fs::read_to_string(&m).unwrap();
        assert_eq!(
            m.parent().unwrap().file_name().unwrap().to_str().unwrap(),
            key
        );
    }
    assert!(leftover_mounts(&[&out]).is_empty());
    done_with(&d);
}
